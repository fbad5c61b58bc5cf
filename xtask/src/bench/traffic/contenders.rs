//! Starting and stopping the contenders in a run's node namespace: the real extproxy (Kubernetes
//! or manifest mode), the real kube-proxy, and kube-proxy's rules loaded by hand.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use testbed::topo::{NODE, Topology};

use super::super::{
    iptables::{self, Backend},
    kubeproxy::{BenchService, NodeConfig, ProxyMode, kube_proxy_sysctls},
    nftables,
};
use super::cluster::NODE_NAME;

/// A contender's process in the node namespace: stopped (SIGINT or SIGTERM, then SIGKILL) when
/// dropped, its log kept for [`Process::check_log`].
pub struct Process {
    pub name: &'static str,
    child: Child,
    pub log: PathBuf,
    stop_signal: i32,
    /// When it was spawned: "first answer after start" counts from here.
    pub started: Instant,
}

impl Process {
    /// `program args` in `topo`'s node namespace (nsenter execs it: the child's pid is the
    /// program's). If this process dies without dropping it, the kernel sends `stop_signal`.
    fn spawn(
        name: &'static str,
        topo: &Topology,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        stop_signal: i32,
    ) -> Result<Self> {
        Self::spawn_in(
            name,
            &topo.node.name,
            &topo.dir,
            program,
            args,
            env,
            stop_signal,
        )
    }

    /// [`Process::spawn`] in namespace `netns`, its log `name.log` in `log_dir`.
    pub fn spawn_in(
        name: &'static str,
        netns: &str,
        log_dir: &Path,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        stop_signal: i32,
    ) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new("nsenter");
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. (The
        // signal follows the spawning thread, which holds the process until it is dropped.)
        unsafe {
            use std::os::unix::process::CommandExt as _;
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, stop_signal) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let started = Instant::now();
        let child = command
            .arg(format!("--net=/var/run/netns/{netns}"))
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Process {
            name,
            child,
            log,
            stop_signal,
            started,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if it exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); the end of its log:\n{}",
                self.name,
                tail(&self.log_text(), 30)
            );
        }
        Ok(())
    }

    /// Waits (up to `timeout`) until the log contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            self.check_alive()?;
            ensure!(
                start.elapsed() < timeout,
                "{} did not log {needle:?} in {timeout:?}:\n{}",
                self.name,
                tail(&self.log_text(), 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Errors the log reports (lines `is_error` picks, minus those `expected` explains).
    pub fn log_errors(&self, is_error: impl Fn(&str) -> bool, expected: &[&str]) -> Vec<String> {
        let text = self.log_text();
        let mut errors: Vec<String> = Vec::new();
        let mut in_error = false;
        for line in text.lines() {
            if is_error(line) {
                in_error = true;
                errors.push(line.to_owned());
            } else if in_error && line.starts_with([' ', '\t', '>']) {
                // klog's multi-line values (err=<, indented lines, >) belong to the error.
                let last = errors.last_mut().expect("in an error");
                last.push('\n');
                last.push_str(line);
            } else {
                in_error = false;
            }
        }
        errors.retain(|e| !expected.iter().any(|x| e.contains(x)));
        errors
    }

    /// Stops it and waits for it to exit.
    pub fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, self.stop_signal) };
        let start = Instant::now();
        while let Ok(None) = self.child.try_wait() {
            if start.elapsed() > Duration::from_secs(15) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Where the agent gets its Services from.
pub enum AgentSource<'a> {
    Kubernetes { kubeconfig: &'a Path },
    Manifests { dir: &'a Path },
}

/// The real agent: its defaults, plus `extra` (a tuned variant's flags, named in its label).
/// Only what a run needs besides: the uplink, where to pin (the topology removes it), and in
/// Kubernetes mode the cluster and the node's name.
pub fn start_extproxy(
    agent_bin: &Path,
    topo: &Topology,
    source: AgentSource<'_>,
    extra: &[String],
) -> Result<Process> {
    let mut args: Vec<String> = vec!["run".into(), "--iface".into(), "up0".into()];
    match source {
        AgentSource::Kubernetes { kubeconfig } => {
            args.push("--kubeconfig".into());
            args.push(kubeconfig.display().to_string());
            args.push("--node-name".into());
            args.push(NODE_NAME.into());
        }
        AgentSource::Manifests { dir } => {
            args.push("--manifests".into());
            args.push(dir.display().to_string());
        }
    }
    args.push("--pin-dir".into());
    args.push(topo.pin_dir().display().to_string());
    args.push("--state-dir".into());
    args.push(topo.dir.join("state").display().to_string());
    args.extend(extra.iter().cloned());
    // SIGINT: the agent detaches (manifest mode) or leaves its pins for the topology to remove.
    Process::spawn(
        "extproxy",
        topo,
        agent_bin,
        &args,
        &[("EXTPROXY_LOG", "info"), ("NO_COLOR", "1")],
        libc::SIGINT,
    )
}

/// The agent's log lines that are errors.
pub fn extproxy_error(line: &str) -> bool {
    line.contains(" ERROR ")
}

/// The flags kube-proxy gets besides the defaults, and why.
pub fn kube_proxy_args(kubeconfig: &Path, mode: ProxyMode, masquerade_all: bool) -> Vec<String> {
    let mut args = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--hostname-override={NODE_NAME}"),
        format!(
            "--proxy-mode={}",
            match mode {
                ProxyMode::Iptables => "iptables",
                ProxyMode::Nftables => "nftables",
            }
        ),
        // What kubeadm sets from the pod subnet: pods' own traffic to a Service is not
        // masqueraded (the default local detector), traffic from elsewhere is.
        "--cluster-cidr=10.244.0.0/16".into(),
        // nf_conntrack_max is global and read-only outside the initial namespace: kube-proxy
        // would fail to set it (kind runs kube-proxy with the same setting for that reason).
        "--conntrack-max-per-core=0".into(),
    ];
    if masquerade_all {
        args.push("--masquerade-all".into());
    }
    args
}

pub fn start_kube_proxy(kube_proxy: &Path, topo: &Topology, args: &[String]) -> Result<Process> {
    Process::spawn("kube-proxy", topo, kube_proxy, args, &[], libc::SIGTERM)
}

/// kube-proxy's error lines (klog: `E0519 10:00:00.000000 ...`).
pub fn kube_proxy_error(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 5 && b[0] == b'E' && b[1..5].iter().all(u8::is_ascii_digit)
}

/// Errors kube-proxy logs in every run here that say nothing about the run (each says why).
pub const KUBE_PROXY_EXPECTED_ERRORS: &[&str] = &[
    // Its advice about a default (NodePorts on every local address), logged at error level at
    // every start of a default configuration; the benchmark runs the defaults on purpose.
    "err=\"nodePortAddresses is unset; NodePort connections will be accepted on all local IPs.",
    // nftables mode's first sync on a fresh node looks for its table before it created it.
    "\"Failed to list existing nftables objects\" err=<\n\tfailed to run nft: Error: No such \
     file or directory\n\tlist table ip",
];

/// Loads kube-proxy's rules for `services` into the node by hand (the opt-in hand-written
/// layouts). Returns a description for the records.
pub fn load_rules(
    topo: &Topology,
    services: &[BenchService],
    backend: Option<Backend>,
) -> Result<String> {
    let node = &topo.node.name;
    let node_config = NodeConfig::new(NODE.parse()?);
    match backend {
        Some(backend) => {
            // kube-proxy inserts its jump rules first and restores with --noflush; into a fresh
            // namespace, restoring (flushing the empty tables) and then inserting the jump rules
            // gives the very same rules and spares iptables-nft a quadratic cache walk.
            let input = iptables::iptables_restore(services, &node_config);
            let args = ["-w".to_string(), "5".to_string()];
            let out = in_netns_cmd(node, backend.restore(), &args, Some(input.as_bytes()))?;
            ensure!(
                out.status.success(),
                "{}: {}",
                backend.restore(),
                String::from_utf8_lossy(&out.stderr)
            );
            for cmd in iptables::setup_commands(&node_config) {
                let out = in_netns_cmd(node, backend.iptables(), &cmd.args, None)?;
                ensure!(
                    cmd.may_fail || out.status.success(),
                    "{} {}: {}",
                    backend.iptables(),
                    cmd.args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            apply_sysctls(node, &kube_proxy_sysctls(&node_config, ProxyMode::Iptables))?;
            Ok(format!("{} (masqueradeAll)", backend.restore()))
        }
        None => {
            let script = nftables::nft_script(services, &node_config);
            let args = ["-f".to_string(), "-".to_string()];
            let out = in_netns_cmd(node, "nft", &args, Some(script.as_bytes()))?;
            ensure!(
                out.status.success(),
                "nft -f: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            apply_sysctls(node, &kube_proxy_sysctls(&node_config, ProxyMode::Nftables))?;
            Ok("nft -f, table ip kube-proxy (masqueradeAll)".into())
        }
    }
}

fn apply_sysctls(ns: &str, sysctls: &[(&str, &str)]) -> Result<()> {
    for (key, value) in sysctls {
        let args = vec!["-qw".to_string(), format!("{key}={value}")];
        let out = in_netns_cmd(ns, "sysctl", &args, None)?;
        ensure!(
            out.status.success(),
            "sysctl {key}={value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `ip netns exec NS PROGRAM ARGS` with `stdin` fed from a thread (a chatty child cannot
/// deadlock us). The caller judges the exit status.
pub fn in_netns_cmd(
    ns: &str,
    program: &str,
    args: &[String],
    stdin: Option<&[u8]>,
) -> Result<std::process::Output> {
    use std::io::Write as _;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {program} in {ns}"))?;
    std::thread::scope(|s| {
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            s.spawn(move || pipe.write_all(data));
        }
        child
            .wait_with_output()
            .with_context(|| format!("waiting for {program} in {ns}"))
    })
}

/// A temporary directory of agent manifests (one `List` per Service), removed on drop.
pub struct ManifestDir {
    pub path: PathBuf,
}

impl ManifestDir {
    pub fn write(layout: &super::layout::Layout) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "xp-bench-manifests-{}-{}",
            std::process::id(),
            layout.services
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let dir = ManifestDir { path };
        for i in 0..layout.count() {
            let file = dir
                .path
                .join(format!("{}.json", super::layout::Layout::name(i)));
            std::fs::write(&file, layout.manifest(i).to_string())
                .with_context(|| format!("writing {}", file.display()))?;
        }
        Ok(dir)
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_kube_proxy_errors_match_whole_multi_line_errors() {
        let dir = std::env::temp_dir().join(format!("xp-klog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("kube-proxy.log");
        std::fs::write(
            &log,
            "I1207 10:14:25.5 1 server.go:1] \"Starting\"\n\
             E1207 10:14:25.504483   13201 proxier.go:1169] \"Failed to list existing nftables objects\" err=<\n\
             \tfailed to run nft: Error: No such file or directory\n\
             \tlist table ip kube-proxy\n\
             \t              ^^^^^^^^^^\n\
             \x20> ipFamily=\"IPv4\"\n\
             E1207 10:14:26.0   13201 proxier.go:1] \"Failed to list existing nftables objects\" err=<\n\
             \tfailed to run nft: Error: Permission denied\n\
             \x20> ipFamily=\"IPv4\"\n\
             I1207 10:14:27.0 1 proxier.go:1] \"Done\"\n",
        )
        .unwrap();
        let process = Process {
            name: "kube-proxy",
            child: Command::new("true").spawn().unwrap(),
            log,
            stop_signal: libc::SIGTERM,
            started: Instant::now(),
        };
        let errors = process.log_errors(kube_proxy_error, KUBE_PROXY_EXPECTED_ERRORS);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("Permission denied"), "{errors:?}");
        assert!(errors[0].ends_with("ipFamily=\"IPv4\""), "{errors:?}");
        drop(process);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn klog_error_lines_are_told_apart() {
        assert!(kube_proxy_error(
            "E0519 10:00:00.000000   123 proxier.go:1] \"Failed\""
        ));
        assert!(!kube_proxy_error(
            "I0519 10:00:00.000000   123 server.go:1] \"Starting\""
        ));
        assert!(!kube_proxy_error("Error: nothing like klog"));
    }
}
