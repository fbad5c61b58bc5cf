//! The agent under test: the real `extproxy` binary running in a topology's node namespace.

use std::{
    ffi::OsString,
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use testbed::topo::*;

/// What the tests do with a topology that needs extproxy itself.
pub trait TopologyExt {
    /// The XDP_TX fast path on veths needs an XDP program on the far end (see xdp_pass.rs).
    fn attach_xdp_pass_on_peers(&self);
    fn start_agent(&self, extra: &[&str]) -> Agent;
}

impl TopologyExt for Topology {
    fn attach_xdp_pass_on_peers(&self) {
        let pin = self.pin_dir().join("peer-ext0");
        std::fs::create_dir_all(self.pin_dir()).unwrap();
        in_netns(&self.ext.name, || {
            extproxy::loader::attach_xdp_pass("ext0", &pin)
        })
        .expect("attach xdp-pass");
    }

    fn start_agent(&self, extra: &[&str]) -> Agent {
        Agent::start(self, extra)
    }
}

/// The `extproxy` binary next to this test executable (cargo xtask test builds it first), or
/// $EXTPROXY_BIN.
pub fn extproxy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EXTPROXY_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("extproxy");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p proxy-user`, done by `cargo xtask test`) or set EXTPROXY_BIN",
        bin.display()
    );
    bin
}

/// Runs `cmd` to its end with its output captured; kills it and panics if it still runs after
/// `timeout` (a command expected to refuse that serves instead).
pub fn output_within(mut cmd: Command, timeout: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still ran after {timeout:?}; its output:\n{}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Where an agent runs: its node's namespace and uplink, its pins, state folder and log.
#[derive(Clone, Debug)]
pub struct AgentSite {
    pub node_ns: String,
    pub iface: String,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Appended to, across restarts.
    pub log: PathBuf,
}

pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    node_ns: String,
    pin_dir: PathBuf,
    state_dir: PathBuf,
}

impl AgentSite {
    /// The node of a topology with one: its uplink `up0`, logging to `log_name` in its folder.
    pub fn node(topo: &Topology, log_name: &str) -> AgentSite {
        AgentSite {
            node_ns: topo.node.name.clone(),
            iface: "up0".into(),
            pin_dir: topo.pin_dir(),
            state_dir: topo.dir.join("state"),
            log: topo.dir.join(log_name),
        }
    }
}

/// Manifest mode, reading `dir`.
fn manifest_source(dir: &Path) -> Vec<OsString> {
    vec!["--manifests".into(), dir.into()]
}

/// Kubernetes mode: the agent of Node `node_name`, reading the API server of `kubeconfig`.
fn kube_source(kubeconfig: &Path, node_name: &str) -> Vec<OsString> {
    vec![
        "--kubeconfig".into(),
        kubeconfig.into(),
        "--node-name".into(),
        node_name.into(),
    ]
}

/// How long an agent may take to say it runs.
const START_WITHIN: Duration = Duration::from_secs(20);

impl Agent {
    fn start(topo: &Topology, extra: &[&str]) -> Agent {
        let site = AgentSite::node(topo, "agent.log");
        let source = manifest_source(&topo.manifests());
        Agent::run_at(
            &site,
            &extproxy_bin(),
            &source,
            extra,
            Some("info"),
            Some(START_WITHIN),
        )
    }

    /// Manifest mode, logging to `log_name` in the topology's folder, without waiting for it to
    /// run: a second agent on one node.
    pub fn launch(topo: &Topology, extra: &[&str], log_name: &str) -> Agent {
        let site = AgentSite::node(topo, log_name);
        let source = manifest_source(&topo.manifests());
        Agent::run_at(&site, &extproxy_bin(), &source, extra, Some("info"), None)
    }

    /// Kubernetes mode: the agent of Node `node_name`, reading the API server of `kubeconfig`.
    pub fn start_kube(
        topo: &Topology,
        kubeconfig: &Path,
        node_name: &str,
        extra: &[&str],
    ) -> Agent {
        let site = AgentSite::node(topo, "agent.log");
        let source = kube_source(kubeconfig, node_name);
        // The agent's own default log filter: the log as operators see it.
        Agent::run_at(
            &site,
            &extproxy_bin(),
            &source,
            extra,
            None,
            Some(START_WITHIN),
        )
    }

    /// Manifest mode with another build of the agent (`bin`): a previous release, to upgrade from.
    pub fn start_binary(topo: &Topology, bin: &Path, extra: &[&str]) -> Agent {
        let site = AgentSite::node(topo, "agent.log");
        let source = manifest_source(&topo.manifests());
        Agent::run_at(&site, bin, &source, extra, Some("info"), Some(START_WITHIN))
    }

    /// Manifest mode at `site` (a node of a topology with several), waiting until it runs.
    pub fn start_at(site: &AgentSite, manifests: &Path, extra: &[&str]) -> Agent {
        let source = manifest_source(manifests);
        Agent::run_at(
            site,
            &extproxy_bin(),
            &source,
            extra,
            Some("info"),
            Some(START_WITHIN),
        )
    }

    /// Kubernetes mode at `site` (a node of a topology with several): the agent of Node
    /// `node_name`, reading the API server of `kubeconfig`, waiting until it runs.
    pub fn start_kube_at(
        site: &AgentSite,
        kubeconfig: &Path,
        node_name: &str,
        extra: &[&str],
    ) -> Agent {
        let source = kube_source(kubeconfig, node_name);
        let within = Duration::from_secs(30);
        Agent::run_at(
            site,
            &extproxy_bin(),
            &source,
            extra,
            Some("info"),
            Some(within),
        )
    }

    /// Starts `bin` at `site` and, with `wait`, waits until it says it runs (once more than the
    /// log, appended to across restarts, said so before).
    fn run_at(
        site: &AgentSite,
        bin: &Path,
        source: &[OsString],
        extra: &[&str],
        log_filter: Option<&str>,
        wait: Option<Duration>,
    ) -> Agent {
        let runs_before = strip_ansi(&std::fs::read_to_string(&site.log).unwrap_or_default())
            .matches("extproxy is running")
            .count();
        let agent = Agent::launch_at(site, bin, source, extra, log_filter);
        if let Some(within) = wait {
            agent.wait_for_log_count("extproxy is running", runs_before + 1, within);
        }
        agent
    }

    fn launch_at(
        site: &AgentSite,
        bin: &Path,
        source: &[OsString],
        extra: &[&str],
        log_filter: Option<&str>,
    ) -> Agent {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", site.node_ns))
            .arg(bin)
            .args(["run", "--iface", &site.iface, "--gc-interval", "1"])
            .args(source)
            .arg("--pin-dir")
            .arg(&site.pin_dir)
            .arg("--state-dir")
            .arg(&site.state_dir)
            .args(extra);
        // Every uplink here is a veth, where `--xdp auto` leaves XDP off: the tests want the XDP
        // program in the path, as on a NIC, unless they choose otherwise.
        if !extra.contains(&"--xdp") {
            cmd.args(["--xdp", "driver"]);
        }
        match log_filter {
            Some(filter) => cmd.env("EXTPROXY_LOG", filter),
            None => cmd.env_remove("EXTPROXY_LOG"),
        };
        let log = || {
            File::options()
                .create(true)
                .append(true)
                .open(&site.log)
                .unwrap()
        };
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log())
            .stderr(log());
        let child = cmd.spawn().expect("start extproxy");
        Agent {
            child: Some(child),
            log: site.log.clone(),
            node_ns: site.node_ns.clone(),
            pin_dir: site.pin_dir.clone(),
            state_dir: site.state_dir.clone(),
        }
    }

    /// The agent's pid (nsenter execs it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent has exited").id()
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Waits for the agent to exit by itself; None if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        strip_ansi(&raw)
    }

    /// Waits until the log contains `needle` (panics with the log on timeout).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let text = self.log_text();
            if text.contains(needle) {
                return;
            }
            if start.elapsed() > timeout {
                panic!("agent log never said {needle:?} within {timeout:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Counts of a log line, to wait for the next occurrence.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) {
        let start = Instant::now();
        while self.log_count(needle) < count {
            assert!(
                start.elapsed() < timeout,
                "agent log: {needle:?} < {count} times:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `extproxy inspect --json` against this agent's pins.
    pub fn inspect(&self) -> serde_json::Value {
        let out = Command::new(extproxy_bin())
            .args(["inspect", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn inspect_text(&self) -> String {
        let out = Command::new(extproxy_bin())
            .args(["inspect", "--pin-dir"])
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn counter(&self, name: &str) -> u64 {
        let v = self.inspect();
        v["drops"][name]
            .as_u64()
            .or_else(|| v["events"][name].as_u64())
            .unwrap_or(0)
    }

    /// SIGINT and wait: the agent detaches and removes its pins.
    pub fn stop(mut self) -> String {
        self.signal_and_wait(libc::SIGINT);
        self.log_text()
    }

    /// SIGKILL: nothing is cleaned up; pinned maps and links keep the data path running.
    pub fn kill(mut self) {
        self.signal_and_wait(libc::SIGKILL);
    }

    fn signal_and_wait(&mut self, sig: i32) {
        if let Some(mut child) = self.child.take() {
            // nsenter execs the agent: the child's pid is the agent's.
            unsafe { libc::kill(child.id() as i32, sig) };
            let start = Instant::now();
            while child.try_wait().unwrap().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn node_ns(&self) -> &str {
        &self.node_ns
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal_and_wait(libc::SIGINT);
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c2 in chars.by_ref() {
                if c2.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
