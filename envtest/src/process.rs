//! Child processes that cannot outlive the test: a process group each (one kill takes anything
//! they started), SIGKILL on the parent's death, and optionally a network namespace to run in.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;

use crate::{Error, io_err};

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process. PR_SET_PDEATHSIG fires when the
/// *thread* that forked the child exits, not the process: a child forked from a test's thread or
/// a tokio worker would be killed when that thread ends, while the control plane is still in use.
fn spawn_from_long_lived_thread(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("envtest-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the envtest spawner thread");
        tx
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the envtest spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the envtest spawner thread is gone"))?
}

/// One running binary; killed (its whole process group) on drop.
pub(crate) struct Proc {
    pub name: &'static str,
    pub log: PathBuf,
    child: Child,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `program args` with its output in `log`, inside the network namespace at `netns`
    /// (a path such as /var/run/netns/NAME) when given.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: &Path,
        netns: Option<&Path>,
    ) -> Result<Proc, Error> {
        let out = File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("{}", log.display())))?;
        let netns_file = netns
            .map(|p| File::open(p).map_err(io_err(format!("network namespace {}", p.display()))))
            .transpose()?;
        let netns_fd = netns_file.as_ref().map(|f| f.as_raw_fd());
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec (no allocation).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the prctl: then nobody would kill us.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = spawn_from_long_lived_thread(cmd)
            .map_err(io_err(format!("starting {}", program.display())))?;
        // The namespace file stays open until the child has entered it (spawn returns after exec).
        drop(netns_file);
        Ok(Proc {
            name,
            log: log.to_owned(),
            child,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// SIGKILL to the whole group, then reap. An unreaped child keeps its pid, so the group id is
    /// still ours when the signal is sent.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let pgid = self.child.id() as libc::pid_t;
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            self.exited = self.child.wait().ok();
        }
    }

    /// The last `lines` lines of the log.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `f` on a thread inside the network namespace at `netns` (or here when None): sockets it
/// opens live there.
pub(crate) fn in_netns<T: Send>(
    netns: Option<&Path>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, Error> {
    let Some(path) = netns else {
        return Ok(f());
    };
    let file = File::open(path).map_err(io_err(format!("network namespace {}", path.display())))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io_err(format!("entering {}", path.display()))(
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(f())
        })
        .join()
        .expect("a thread in a network namespace panicked")
    })
}

/// Moves the calling thread into the network namespace at `netns` (nothing when None), for
/// threads that stay there.
pub(crate) fn enter_netns(netns: Option<&Path>) -> Result<(), Error> {
    let Some(path) = netns else {
        return Ok(());
    };
    let file = File::open(path).map_err(io_err(format!("network namespace {}", path.display())))?;
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io_err(format!("entering {}", path.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
