//! Network-namespace topologies for extproxy: the tests, `cargo xtask run` and the benchmarks
//! build the same pod / node / outside layout from here.

pub mod cluster;
pub mod load;
pub mod netns;
pub mod topo;

use std::process::Command;

/// Fails with a clear reason when not run as root.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this needs root (eBPF, network namespaces): run it as root, e.g. `sudo -E cargo xtask test`"
    );
}

/// Runs a shell command (in the calling thread's network namespace) and panics on failure.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap_or_else(|e| panic!("spawn `{cmd}`: {e}"));
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
