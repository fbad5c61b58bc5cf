//! Network namespaces that clean up after themselves, pass or fail.

use std::{fs::File, os::fd::AsRawFd, process::Command};

/// Moves the calling thread into a fresh, anonymous network namespace. Child processes spawned
/// from this thread inherit it. Dropping the guard moves the thread back; the namespace dies with
/// its last user, so a panicking test leaves nothing behind.
pub struct ThreadNetns {
    original: File,
}

impl ThreadNetns {
    pub fn enter() -> Self {
        let original = File::open("/proc/thread-self/ns/net").expect("open own netns");
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        ThreadNetns { original }
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// A named namespace (`ip netns add`), for topologies where several processes live in different
/// namespaces. Deleted on drop, including after a panic.
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn new(name: &str) -> Self {
        // A previous run killed mid-test may have left it: start clean.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip netns add");
        assert!(ok.success(), "ip netns add {name}");
        NamedNetns {
            name: name.to_owned(),
        }
    }

    /// A shell command inside the namespace; panics on failure.
    pub fn sh(&self, cmd: &str) -> String {
        crate::sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            cmd.replace('\'', "'\\''")
        ))
    }

    /// A command inside the namespace, for callers that want the status or a child.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        // Processes still inside would keep the namespace alive; kill them first.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
