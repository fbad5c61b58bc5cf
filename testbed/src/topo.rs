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
//!
//! [`Wire::Offloads`] (benchmarks) keeps the veths' offloads as a NIC has them and puts a bridge
//! (`{p}-wire`) between `up0` and `ext0`, whose port towards ext does no offloads at all: what
//! the node sends as 64 KB super-packets with partial checksums is cut into segments and
//! checksummed in software there, after any translation, and ext (RX checksum offload off)
//! verifies every checksum, so a wrong one shows up in its `InCsumErrors`.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
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

/// This process's turn at a topology (a test that panicked while holding it does not poison it).
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One topology on the machine at a time, across processes too: two checkouts testing at once
/// would otherwise build namespaces and pins of the same names.
pub struct MachineLock {
    _file: File,
}

impl MachineLock {
    pub const PATH: &'static str = "/run/lock/extproxy-netns.lock";

    /// Blocks until no other process holds the lock; released when dropped (or the process dies).
    pub fn acquire() -> Self {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Self::PATH)
            .unwrap_or_else(|e| panic!("{}: {e}", Self::PATH));
        let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            ret,
            0,
            "flock {}: {}",
            Self::PATH,
            std::io::Error::last_os_error()
        );
        MachineLock { _file: file }
    }
}

/// What the veths between the namespaces do with checksums and segmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// TX checksum offload off on every veth (so no TSO either): every packet on every link
    /// carries a complete checksum and at most one MTU, as on a wire. The tests' default.
    FullChecksums,
    /// The veths keep their offloads (TX checksum, TSO, GSO) and GRO is on, as with a NIC; a
    /// bridge hop between the node and ext forces software segmentation and checksums after
    /// the node, and ext and the pod verify the checksums they receive.
    Offloads,
}

pub struct Topology {
    pub prefix: String,
    pub pod: NamedNetns,
    pub node: NamedNetns,
    pub ext: NamedNetns,
    /// [`Wire::Offloads`] only: the bridge between `up0` and `ext0` (ports `w0` towards the node,
    /// `w1` towards ext, the one without offloads).
    pub wire: Option<NamedNetns>,
    /// The node's end of the pod's veth (`pod0`; the benchmarks name it as a CNI would).
    pub pod_link: String,
    pub dir: PathBuf,
    _machine: MachineLock,
    _serial: MutexGuard<'static, ()>,
}

impl Topology {
    /// Builds the topology under namespace names `xp<name>-{pod,node,ext}`.
    pub fn new(name: &str) -> Self {
        Self::with_wire(name, Wire::FullChecksums)
    }

    /// [`Topology::new`] with the given links; [`Wire::Offloads`] adds `xp<name>-wire`.
    pub fn with_wire(name: &str, wire: Wire) -> Self {
        Self::with_links(name, wire, "pod0")
    }

    /// [`Topology::with_wire`] with the node's end of the pod's veth named `pod_link`.
    pub fn with_links(name: &str, wire: Wire, pod_link: &str) -> Self {
        require_root();
        let serial = serial();
        let machine = MachineLock::acquire();
        let prefix = format!("xp{}", name);
        let pod = NamedNetns::new(&format!("{prefix}-pod"));
        let node = NamedNetns::new(&format!("{prefix}-node"));
        let ext = NamedNetns::new(&format!("{prefix}-ext"));
        let bridge = (wire == Wire::Offloads).then(|| NamedNetns::new(&format!("{prefix}-wire")));
        let (p, n, e) = (&pod.name, &node.name, &ext.name);
        match &bridge {
            None => sh(&format!(
                "ip link add up0 netns {n} type veth peer name ext0 netns {e}
                 ip link add {pod_link} netns {n} type veth peer name eth0 netns {p}"
            )),
            Some(w) => {
                let w = &w.name;
                sh(&format!(
                    "ip link add up0 netns {n} type veth peer name w0 netns {w}
                     ip link add w1 netns {w} type veth peer name ext0 netns {e}
                     ip link add {pod_link} netns {n} type veth peer name eth0 netns {p}"
                ))
            }
        };
        if let Some(w) = &bridge {
            w.sh("ip link set lo up; ip link add br0 type bridge
                 ip link set w0 master br0; ip link set w1 master br0
                 ip link set br0 up; ip link set w0 up; ip link set w1 up");
        }
        node.sh(&format!(
            "ip link set lo up; ip link set up0 up; ip link set {pod_link} up
             ip addr add 10.0.0.1/24 dev up0; ip -6 addr add fd00::1/64 dev up0 nodad
             ip addr add 10.244.0.1/24 dev {pod_link}
             ip -6 addr add fd00:244::1/64 dev {pod_link} nodad
             ip route add default via 10.0.0.254; ip -6 route add default via fd00::fe
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
        ));
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
        match &bridge {
            None => {
                // Packets must carry complete checksums on the wire, as from a real NIC: with
                // veth checksum offload they carry only the pseudo-header part.
                for (ns, dev) in [
                    (&node, "up0"),
                    (&node, pod_link),
                    (&ext, "ext0"),
                    (&pod, "eth0"),
                ] {
                    ns.sh(&format!("ethtool -K {dev} tx off >/dev/null"));
                }
            }
            Some(w) => {
                // GRO as a NIC driver does it (veths leave it off by default).
                for (ns, dev) in [
                    (&node, "up0"),
                    (&node, pod_link),
                    (w, "w0"),
                    (&ext, "ext0"),
                    (&pod, "eth0"),
                ] {
                    ns.sh(&format!("ethtool -K {dev} gro on >/dev/null"));
                }
                // After the node, towards the endpoints: no TX checksum (hence no TSO), so the
                // node's super-packets are segmented and checksummed in software on w1, and ext
                // checks every checksum it receives (no RX checksum offload to trust).
                w.sh("ethtool -K w1 tx off >/dev/null");
                ext.sh("ethtool -K ext0 rx off >/dev/null");
                // The same for the way back: replies translated on the node are checksummed in
                // software on pod0 and verified in the pod.
                node.sh(&format!("ethtool -K {pod_link} tx off >/dev/null"));
                pod.sh("ethtool -K eth0 rx off >/dev/null");
            }
        }
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        Topology {
            prefix,
            pod,
            node,
            ext,
            wire: bridge,
            pod_link: pod_link.to_owned(),
            dir,
            _machine: machine,
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

    /// Where an agent on this topology pins its maps.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.prefix))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Pins an agent left behind (killed, --keep-on-exit, a failed test): bpffs entries are
        // removed like files, and removing the last reference detaches and frees them.
        let _ = std::fs::remove_dir_all(self.pin_dir());
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

/// Moves the calling thread into the named network namespace (for threads that stay there).
pub(crate) fn enter(ns: &str) {
    let f =
        File::open(format!("/var/run/netns/{ns}")).unwrap_or_else(|e| panic!("netns {ns}: {e}"));
    let ret = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "setns {ns}: {}", std::io::Error::last_os_error());
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
                            Ok(_) if line.starts_with("GET ") || line.starts_with("HEAD ") => {
                                // Enough HTTP for curl: skip the headers, answer, close.
                                let mut header = String::new();
                                while r.read_line(&mut header).is_ok_and(|n| n > 2) {
                                    header.clear();
                                }
                                let body = format!("peer={peer} ep={local}\n");
                                let msg = format!(
                                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                    body.len()
                                );
                                let _ = w.write_all(msg.as_bytes());
                                return;
                            }
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
