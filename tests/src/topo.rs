//! Network-namespace topologies with real traffic.
//!
//! ```text
//!   {p}-pod                {p}-node (runs extproxy)              {p}-ext ("the outside")
//!   eth0 10.244.0.5 ---- pod0 10.244.0.1   up0 10.0.0.1 ---- ext0 10.0.0.254 (router)
//!        fd00:244::5          fd00:244::1      fd00::1            fd00::fe
//!                                                             lo: endpoints 203.0.113.7-9,
//!                                                                 2001:db8:e::7-8, 10.240.0.129
//!                                                                 clients 198.51.100.9-10,
//!                                                                 2001:db8:c::9
//! ```
//! The ext namespace routes the LoadBalancer and external IPs (192.0.2.0/24, 2001:db8:f::/64)
//! to the node, as an upstream router or cloud LB would.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{netns::NamedNetns, require_root, sh};

pub const NODE: &str = "10.0.0.1";
pub const NODE6: &str = "fd00::1";
pub const POD: &str = "10.244.0.5";
pub const POD6: &str = "fd00:244::5";
pub const EP1: &str = "203.0.113.7";
pub const EP2: &str = "203.0.113.8";
pub const EP3: &str = "203.0.113.9";
pub const EP1_6: &str = "2001:db8:e::7";
pub const CLIENT: &str = "198.51.100.9";
pub const CLIENT2: &str = "198.51.100.10";
pub const CLIENT6: &str = "2001:db8:c::9";

/// Namespace tests share the machine's CPUs and bpffs: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub struct Topology {
    pub prefix: String,
    pub pod: NamedNetns,
    pub node: NamedNetns,
    pub ext: NamedNetns,
    pub dir: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

impl Topology {
    pub fn new(name: &str) -> Self {
        require_root();
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = format!("xp{}", name);
        let pod = NamedNetns::new(&format!("{prefix}-pod"));
        let node = NamedNetns::new(&format!("{prefix}-node"));
        let ext = NamedNetns::new(&format!("{prefix}-ext"));
        let (p, n, e) = (&pod.name, &node.name, &ext.name);
        sh(&format!(
            "ip link add up0 netns {n} type veth peer name ext0 netns {e}
             ip link add pod0 netns {n} type veth peer name eth0 netns {p}"
        ));
        node.sh("ip link set lo up; ip link set up0 up; ip link set pod0 up
             ip addr add 10.0.0.1/24 dev up0; ip -6 addr add fd00::1/64 dev up0 nodad
             ip addr add 10.244.0.1/24 dev pod0; ip -6 addr add fd00:244::1/64 dev pod0 nodad
             ip route add default via 10.0.0.254; ip -6 route add default via fd00::fe
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");
        pod.sh("ip link set lo up; ip link set eth0 up
             ip addr add 10.244.0.5/24 dev eth0; ip -6 addr add fd00:244::5/64 dev eth0 nodad
             ip route add default via 10.244.0.1; ip -6 route add default via fd00:244::1");
        ext.sh(
            "ip link set lo up; ip link set ext0 up
             ip addr add 10.0.0.254/24 dev ext0; ip -6 addr add fd00::fe/64 dev ext0 nodad
             for a in 203.0.113.7 203.0.113.8 203.0.113.9 10.240.0.129 198.51.100.9 198.51.100.10; do ip addr add $a/32 dev lo; done
             for a in 2001:db8:e::7 2001:db8:e::8 2001:db8:c::9; do ip -6 addr add $a/128 dev lo nodad; done
             ip route add 192.0.2.0/24 via 10.0.0.1; ip -6 route add 2001:db8:f::/64 via fd00::1
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        );
        // Packets must carry complete checksums on the wire, as from a real NIC: with veth
        // checksum offload they carry only the pseudo-header part.
        for (ns, dev) in [
            (&node, "up0"),
            (&node, "pod0"),
            (&ext, "ext0"),
            (&pod, "eth0"),
        ] {
            ns.sh(&format!("ethtool -K {dev} tx off >/dev/null"));
        }
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        Topology {
            prefix,
            pod,
            node,
            ext,
            dir,
            _serial: serial,
        }
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Writes (or replaces) a manifest file; the agent picks changes up by itself.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.manifests().join(file)).unwrap();
    }

    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.prefix))
    }

    /// The XDP_TX fast path on veths needs an XDP program on the far ends (see xdp_pass.rs).
    pub fn attach_xdp_pass_on_peers(&self) {
        for (ns, dev) in [(&self.ext, "ext0")] {
            let pin = self.pin_dir().join(format!("peer-{dev}"));
            std::fs::create_dir_all(self.pin_dir()).unwrap();
            in_netns(&ns.name, || extproxy::loader::attach_xdp_pass(dev, &pin))
                .expect("attach xdp-pass");
        }
    }

    pub fn start_agent(&self, extra: &[&str]) -> Agent {
        Agent::start(self, extra)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = extproxy::pins::remove_all(&self.pin_dir());
        let _ = std::fs::remove_dir(self.pin_dir());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a thread inside the named network namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .unwrap()
    })
}

fn enter(ns: &str) {
    let f =
        File::open(format!("/var/run/netns/{ns}")).unwrap_or_else(|e| panic!("netns {ns}: {e}"));
    let ret = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

// -------------------------------------------------------------------------------------------------
// The agent under test: the real binary
// -------------------------------------------------------------------------------------------------

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

pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    node_ns: String,
    pin_dir: PathBuf,
    state_dir: PathBuf,
}

impl Agent {
    fn start(topo: &Topology, extra: &[&str]) -> Agent {
        let log = topo.dir.join("agent.log");
        let state_dir = topo.dir.join("state");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", topo.node.name))
            .arg(extproxy_bin())
            .args(["run", "--iface", "up0", "--gc-interval", "1"])
            .arg("--manifests")
            .arg(topo.manifests())
            .arg("--pin-dir")
            .arg(topo.pin_dir())
            .arg("--state-dir")
            .arg(&state_dir)
            .args(extra)
            .env("EXTPROXY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(
                File::options()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .stderr(
                File::options()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            );
        let runs_before = strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default())
            .matches("extproxy is running")
            .count();
        let child = cmd.spawn().expect("start extproxy");
        let agent = Agent {
            child: Some(child),
            log,
            node_ns: topo.node.name.clone(),
            pin_dir: topo.pin_dir(),
            state_dir,
        };
        agent.wait_for_log_count(
            "extproxy is running",
            runs_before + 1,
            Duration::from_secs(20),
        );
        agent
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

// -------------------------------------------------------------------------------------------------
// Echo servers in the outside namespace
// -------------------------------------------------------------------------------------------------

/// TCP and UDP servers that answer every line / datagram with `peer=<ip>:<port> ep=<local ip>`.
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EchoServers {
    /// Listens on each `ip:port` (TCP and UDP) inside namespace `ns`.
    pub fn start(ns: &str, addrs: &[(&str, u16)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (ip, port) in addrs {
            let ip: IpAddr = ip.parse().unwrap();
            let sa = std::net::SocketAddr::new(ip, *port);
            let (tcp, udp) = in_netns(ns, || {
                (
                    std::net::TcpListener::bind(sa).unwrap(),
                    std::net::UdpSocket::bind(sa).unwrap(),
                )
            });
            tcp.set_nonblocking(true).unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let s = stop.clone();
            threads.push(std::thread::spawn(move || serve_tcp(tcp, s)));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || serve_udp(udp, s)));
        }
        EchoServers { stop, threads }
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(listener: std::net::TcpListener, stop: Arc<AtomicBool>) {
    use std::io::{BufRead, BufReader, Write};
    let mut conns = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let local = stream.local_addr().unwrap().ip();
                let s = stop.clone();
                conns.push(std::thread::spawn(move || {
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    let mut w = stream.try_clone().unwrap();
                    let mut r = BufReader::new(stream);
                    let mut line = String::new();
                    while !s.load(Ordering::SeqCst) {
                        match r.read_line(&mut line) {
                            Ok(0) => return,
                            Ok(_) => {
                                let msg = format!("peer={peer} ep={local} got={}\n", line.trim());
                                if w.write_all(msg.as_bytes()).is_err() {
                                    return;
                                }
                                line.clear();
                            }
                            Err(e)
                                if e.kind() == std::io::ErrorKind::WouldBlock
                                    || e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => return,
                        }
                    }
                }));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn serve_udp(sock: std::net::UdpSocket, stop: Arc<AtomicBool>) {
    let local = sock.local_addr().unwrap().ip();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let msg = format!(
                "peer={peer} ep={local} got={}",
                String::from_utf8_lossy(&buf[..n]).trim()
            );
            let _ = sock.send_to(msg.as_bytes(), peer);
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Clients
// -------------------------------------------------------------------------------------------------

/// What an echo server answered: the peer it saw and the endpoint that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub peer_ip: IpAddr,
    pub peer_port: u16,
    pub endpoint: IpAddr,
}

pub fn parse_seen(line: &str) -> Seen {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .to_owned()
    };
    let peer: std::net::SocketAddr = field("peer=").parse().unwrap();
    Seen {
        peer_ip: peer.ip(),
        peer_port: peer.port(),
        endpoint: field("ep=").parse().unwrap(),
    }
}

/// One TCP exchange from namespace `ns` (optionally bound to `bind`): connect, send a line,
/// read the answer.
pub fn tcp_once(ns: &str, bind: Option<&str>, dst: &str, port: u16) -> std::io::Result<Seen> {
    let mut c = TcpClient::connect(ns, bind, dst, port, Duration::from_secs(3))?;
    c.exchange("hello")
}

/// A TCP connection opened inside a namespace, usable from the test thread.
pub struct TcpClient {
    stream: std::net::TcpStream,
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl TcpClient {
    pub fn connect(
        ns: &str,
        bind: Option<&str>,
        dst: &str,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        let dst: IpAddr = dst.parse().unwrap();
        let bind: Option<IpAddr> = bind.map(|b| b.parse().unwrap());
        let stream = in_netns(ns, move || -> std::io::Result<std::net::TcpStream> {
            use socket2::{Domain, Socket, Type};
            let sa = std::net::SocketAddr::new(dst, port);
            let sock = Socket::new(Domain::for_address(sa), Type::STREAM, None)?;
            if let Some(b) = bind {
                sock.bind(&std::net::SocketAddr::new(b, 0).into())?;
            }
            sock.connect_timeout(&sa.into(), timeout)?;
            Ok(sock.into())
        })?;
        stream.set_read_timeout(Some(timeout))?;
        let reader = std::io::BufReader::new(stream.try_clone()?);
        Ok(TcpClient { stream, reader })
    }

    pub fn exchange(&mut self, msg: &str) -> std::io::Result<Seen> {
        use std::io::{BufRead, Write};
        self.stream.write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(parse_seen(&line))
    }

    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().unwrap().port()
    }
}

/// One UDP exchange from a connected socket in `ns`. An ICMP port unreachable comes back as
/// ConnectionRefused.
pub fn udp_once(ns: &str, bind: Option<&str>, dst: &str, port: u16) -> std::io::Result<Seen> {
    let dst: IpAddr = dst.parse().unwrap();
    let bind: Option<IpAddr> = bind.map(|b| b.parse().unwrap());
    in_netns(ns, move || {
        let local = bind.unwrap_or(if dst.is_ipv4() {
            "0.0.0.0".parse().unwrap()
        } else {
            "::".parse().unwrap()
        });
        let sock = std::net::UdpSocket::bind(std::net::SocketAddr::new(local, 0))?;
        sock.connect(std::net::SocketAddr::new(dst, port))?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 2048];
        // A datagram can be lost while the agent is busy: retry a little.
        let mut last = None;
        for _ in 0..3 {
            sock.send(b"hello")?;
            match sock.recv(&mut buf) {
                Ok(n) => return Ok(parse_seen(&String::from_utf8_lossy(&buf[..n]))),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap())
    })
}
