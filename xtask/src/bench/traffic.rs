//! The traffic part of `cargo xtask bench`: the same client traffic through every contender
//! (extproxy as shipped, kube-proxy's iptables and nftables layouts, no proxy at all), at
//! several Service counts, interleaved, round after round. Methodology: `TRAFFIC.md` beside
//! this file.
//!
//! Every run gets a fresh `testbed` topology (pod, node, outside), so no contender inherits
//! another's conntrack entries, TIME_WAIT sockets or rules. The outside namespace runs
//! [`testbed::load::LoadServer`] on the four endpoints; the pod runs the load clients.

use std::{
    fmt,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use testbed::{
    load::{self, LoadServer, OpStats, Tally},
    topo::{NODE, POD, Topology},
};

use super::iptables::{self, Backend};
use super::kubeproxy::{
    BenchService, NodeConfig, Protocol, ProxyMode, SyntheticSpec, kube_proxy_sysctls,
    synthetic_services,
};
use super::{
    cpu::{self, CpuMeter},
    nftables,
};

/// The four endpoints every Service gets; the outside namespace answers on all of them.
/// testbed's topology has the first three; the fourth is added per run.
pub const ENDPOINTS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(203, 0, 113, 7),
    Ipv4Addr::new(203, 0, 113, 8),
    Ipv4Addr::new(203, 0, 113, 9),
    Ipv4Addr::new(203, 0, 113, 10),
];
/// The endpoints' port (TCP and UDP).
pub const ENDPOINT_PORT: u16 = 8080;
/// The Services' port (TCP and, on the target Service, UDP).
pub const SERVICE_PORT: u16 = 80;
/// ClusterIP of Service 0; Service `i` has `FIRST_CLUSTER_IP + i` (10k end at 10.96.39.25,
/// inside the default 10.96.0.0/12).
pub const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// What carries the pod's traffic to the endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Contender {
    /// The real agent with its defaults (XDP auto: off on this veth uplink, TC does everything).
    Extproxy,
    /// kube-proxy's iptables-mode rules through iptables-legacy (x_tables).
    #[serde(rename = "iptables-legacy")]
    IptablesLegacy,
    /// The same rules through iptables-nft (nf_tables with xtables matches): what kube-proxy
    /// would use on this host, whose `iptables` is iptables-nft 1.8.9.
    #[serde(rename = "iptables-nft")]
    IptablesNft,
    /// kube-proxy's nftables-mode rules.
    Nftables,
    /// No proxy: the pod talks to the endpoints' own addresses (the node only routes).
    Direct,
}

impl Contender {
    pub const ALL: [Contender; 5] = [
        Contender::Extproxy,
        Contender::IptablesLegacy,
        Contender::IptablesNft,
        Contender::Nftables,
        Contender::Direct,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Extproxy => "extproxy",
            Contender::IptablesLegacy => "iptables-legacy",
            Contender::IptablesNft => "iptables-nft",
            Contender::Nftables => "nftables",
            Contender::Direct => "direct",
        }
    }
}

impl fmt::Display for Contender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What is measured, each for a fixed time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// New TCP connections per second: connect, one request, the answer, the server closes.
    NewConnections,
    /// Requests per second on kept-alive connections, one outstanding per connection.
    Requests,
    /// One TCP stream's goodput.
    TcpThroughput,
    /// One UDP flow of small datagrams: what the endpoint receives per second.
    UdpPackets,
    /// One worker opening connections one after the other: the latency of a new connection
    /// (first packet included: where a linear rule list costs) on an otherwise idle path.
    ConnectionLatency,
    /// One kept-alive connection, one request at a time: the round trip on an idle path.
    RequestLatency,
}

impl Measure {
    pub const ALL: [Measure; 6] = [
        Measure::NewConnections,
        Measure::Requests,
        Measure::TcpThroughput,
        Measure::UdpPackets,
        Measure::ConnectionLatency,
        Measure::RequestLatency,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Measure::NewConnections => "new_connections",
            Measure::Requests => "requests",
            Measure::TcpThroughput => "tcp_throughput",
            Measure::UdpPackets => "udp_packets",
            Measure::ConnectionLatency => "connection_latency",
            Measure::RequestLatency => "request_latency",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Measure::NewConnections => "conn/s",
            Measure::Requests => "req/s",
            Measure::TcpThroughput => "Gbit/s",
            Measure::UdpPackets => "pps",
            Measure::ConnectionLatency | Measure::RequestLatency => "us (p99)",
        }
    }
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One measurement: one contender, one measure, one Service count, one round.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub contender: Contender,
    pub measure: Measure,
    /// Services programmed (the `direct` contender programs none; its rows carry the count of
    /// the runs it is interleaved with).
    pub services: usize,
    /// 0-based.
    pub round: usize,
    /// In `unit`; higher is better except for the latency measures (`connection_latency`,
    /// `request_latency`), whose value is their p99 in microseconds.
    pub value: f64,
    pub unit: &'static str,
    /// Per-operation latency (connection: connect to the server's close; request: request to
    /// answer); `None` for the throughput measures.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Operations completed (connections, requests, bytes, datagrams received).
    pub count: u64,
    /// Failed operations (refused, reset, short answers); for UDP, datagrams sent but not received.
    pub errors: u64,
    /// UDP: the share of sent datagrams that never arrived.
    pub loss: Option<f64>,
    pub seconds: f64,
    /// Share of both cores that processes other than the benchmark's (a build, another test)
    /// used during the measure; above a few per cent the value is disturbed.
    pub others_cpu: f64,
    /// How the contender ran, e.g. `iptables-legacy, target at rule 5001 of 10001`.
    pub detail: String,
}

impl Record {
    /// The record as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Record always serializes")
    }
}

#[derive(Clone, Debug)]
pub struct TrafficOpts {
    /// The release `extproxy` binary.
    pub agent_bin: PathBuf,
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub contenders: Vec<Contender>,
    pub measures: Vec<Measure>,
    pub connection_time: Duration,
    pub request_time: Duration,
    pub stream_time: Duration,
    pub udp_time: Duration,
    /// Each of the two latency measures.
    pub latency_time: Duration,
    /// Concurrent connections of the connection and request measures.
    pub workers: usize,
    /// Client and server threads each (one per core).
    pub threads: usize,
    /// Appended to `extproxy run` (e.g. `--xdp driver` to compare the XDP path); named in the
    /// records' `detail`.
    pub extproxy_args: Vec<String>,
    /// nftables is skipped above this many Services (`nft -f` of 10k takes ~80 s here).
    pub nftables_max_services: usize,
    /// How long a run waits for the machine to calm down (under 15 % busy) before it starts.
    pub quiet_wait: Duration,
    /// Progress lines on stderr.
    pub verbose: bool,
}

impl TrafficOpts {
    /// Under three minutes on 2 cores: one round, short measures, nftables up to 1k Services.
    pub fn quick(agent_bin: PathBuf) -> Self {
        TrafficOpts {
            agent_bin,
            sizes: vec![1, 1_000, 10_000],
            rounds: 1,
            contenders: Contender::ALL.to_vec(),
            measures: Measure::ALL.to_vec(),
            connection_time: Duration::from_secs(3),
            request_time: Duration::from_millis(1500),
            stream_time: Duration::from_millis(1500),
            udp_time: Duration::from_millis(1500),
            latency_time: Duration::from_secs(1),
            workers: 16,
            threads: 2,
            extproxy_args: Vec::new(),
            nftables_max_services: 1_000,
            quiet_wait: Duration::from_secs(5),
            verbose: true,
        }
    }

    /// Three rounds, 10 s of new connections, every contender at every size.
    pub fn full(agent_bin: PathBuf) -> Self {
        TrafficOpts {
            rounds: 3,
            connection_time: Duration::from_secs(10),
            request_time: Duration::from_secs(5),
            stream_time: Duration::from_secs(5),
            udp_time: Duration::from_secs(5),
            latency_time: Duration::from_secs(5),
            nftables_max_services: usize::MAX,
            quiet_wait: Duration::from_secs(30),
            ..TrafficOpts::quick(agent_bin)
        }
    }

    fn runs(&self, contender: Contender, services: usize) -> bool {
        contender != Contender::Nftables || services <= self.nftables_max_services
    }

    fn duration(&self, measure: Measure) -> Duration {
        match measure {
            Measure::NewConnections => self.connection_time,
            Measure::Requests => self.request_time,
            Measure::TcpThroughput => self.stream_time,
            Measure::UdpPackets => self.udp_time,
            Measure::ConnectionLatency | Measure::RequestLatency => self.latency_time,
        }
    }
}

/// Runs every contender on every size for every round. Within a round the contenders take
/// turns, starting one later each round, so none always runs first (or on a warmer machine).
pub fn run(opts: &TrafficOpts) -> Result<Vec<Record>> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the traffic benchmark needs root (network namespaces, eBPF)"
    );
    ensure!(
        opts.agent_bin.exists(),
        "{} not found: build it with `cargo build --release -p proxy-user`",
        opts.agent_bin.display()
    );
    let mut records = Vec::new();
    for &n in &opts.sizes {
        ensure!(n >= 1, "a Service count must be at least 1");
        let plan = SizePlan::new(n, opts)?;
        for round in 0..opts.rounds {
            let contenders: Vec<Contender> = opts
                .contenders
                .iter()
                .cycle()
                .skip(round % opts.contenders.len().max(1))
                .take(opts.contenders.len())
                .copied()
                .filter(|c| opts.runs(*c, n))
                .collect();
            for contender in contenders {
                let rows = run_one(opts, &plan, contender, round)
                    .with_context(|| format!("{contender} with {n} Services, round {round}"))?;
                records.extend(rows);
            }
        }
    }
    Ok(records)
}

// -------------------------------------------------------------------------------------------------
// The Services, in every contender's form
// -------------------------------------------------------------------------------------------------

/// The N Services and what each contender is programmed with, prepared once per size.
struct SizePlan {
    services: usize,
    /// ClusterIP of the last Service, the one the client calls (like ANCHORS.md).
    target: Ipv4Addr,
    /// One JSON List (Service + EndpointSlice) per Service, for the agent.
    manifests: Option<ManifestDir>,
    /// Service ports in kube-proxy's order for iptables: the target sits in the middle of
    /// KUBE-SERVICES (see [`iptables_order`]).
    iptables_services: Vec<BenchService>,
    iptables_position: usize,
    /// Service ports for nftables (order does not matter: one verdict-map lookup).
    nft_services: Vec<BenchService>,
}

impl SizePlan {
    fn new(n: usize, opts: &TrafficOpts) -> Result<Self> {
        let tcp = synthetic_services(&SyntheticSpec {
            count: n,
            namespace: "bench".into(),
            first_cluster_ip: FIRST_CLUSTER_IP,
            port: SERVICE_PORT,
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            endpoints_per_service: ENDPOINTS.len(),
            endpoint_pool: ENDPOINTS.iter().map(|ip| (*ip, ENDPOINT_PORT)).collect(),
            first_node_port: None,
        });
        let last = tcp.last().expect("at least one Service").clone();
        // The target Service also has a UDP port, as a DNS-like Service would: the UDP measure
        // goes through it. Every contender gets the same N + 1 Service ports.
        let udp = BenchService {
            port_name: "udp".into(),
            protocol: Protocol::Udp,
            ..last.clone()
        };
        let manifests = if opts.contenders.contains(&Contender::Extproxy) {
            Some(ManifestDir::write(&tcp, &udp)?)
        } else {
            None
        };
        let (iptables_services, iptables_position) = iptables_order(&tcp, &udp);
        let mut nft_services = tcp;
        nft_services.push(udp);
        Ok(SizePlan {
            services: n,
            target: last.cluster_ip,
            manifests,
            iptables_services,
            iptables_position,
            nft_services,
        })
    }
}

/// kube-proxy writes KUBE-SERVICES in Go map order, random per sync: a given Service's rule is
/// on average half-way down the list. The target goes there (with its UDP port after it), so
/// the linear walk iptables does per new connection is the average one, not the worst.
/// Returns the order and the target's 1-based rule position.
fn iptables_order(tcp: &[BenchService], udp: &BenchService) -> (Vec<BenchService>, usize) {
    let mut order = tcp.to_vec();
    let target = order.pop().expect("at least one Service");
    let middle = order.len() / 2;
    order.insert(middle, target);
    order.insert(middle + 1, udp.clone());
    (order, middle + 1)
}

/// A temporary directory of agent manifests, removed on drop.
struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    fn write(tcp: &[BenchService], udp: &BenchService) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "xp-bench-manifests-{}-{}",
            std::process::id(),
            tcp.len()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let dir = ManifestDir { path };
        for (i, svc) in tcp.iter().enumerate() {
            let extra = (i + 1 == tcp.len()).then_some(udp);
            let file = dir.path.join(format!("{}.json", svc.name));
            std::fs::write(&file, service_manifest(svc, extra).to_string())
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

/// A selector-less Service with an explicit ClusterIP and its EndpointSlice, as a `List`;
/// `extra` is a second port of the same Service (same name and address).
fn service_manifest(svc: &BenchService, extra: Option<&BenchService>) -> serde_json::Value {
    use serde_json::json;
    let ports: Vec<&BenchService> = std::iter::once(svc).chain(extra).collect();
    let proto = |p: &BenchService| match p.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    };
    let endpoint_port = svc.endpoints[0].1;
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": svc.name, "namespace": svc.namespace},
                "spec": {
                    "clusterIP": svc.cluster_ip.to_string(),
                    "ports": ports.iter().map(|p| json!({
                        "name": p.port_name,
                        "protocol": proto(p),
                        "port": p.port,
                        "targetPort": endpoint_port,
                    })).collect::<Vec<_>>(),
                },
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-1", svc.name),
                    "namespace": svc.namespace,
                    "labels": {"kubernetes.io/service-name": svc.name},
                },
                "addressType": "IPv4",
                "ports": ports.iter().map(|p| json!({
                    "name": p.port_name,
                    "protocol": proto(p),
                    "port": endpoint_port,
                })).collect::<Vec<_>>(),
                "endpoints": svc.endpoints.iter().map(|(ip, _)| json!({
                    "addresses": [ip.to_string()],
                    "conditions": {"ready": true},
                })).collect::<Vec<_>>(),
            },
        ],
    })
}

// -------------------------------------------------------------------------------------------------
// One contender, one size, one round
// -------------------------------------------------------------------------------------------------

/// Where the client sends its traffic and the source address the endpoints must see.
struct Route {
    tcp: Vec<SocketAddr>,
    udp: SocketAddr,
    source: IpAddr,
}

fn run_one(
    opts: &TrafficOpts,
    plan: &SizePlan,
    contender: Contender,
    round: usize,
) -> Result<Vec<Record>> {
    // Everything else on the machine (a build, another benchmark, the kernel still tearing down
    // the previous run's namespaces) takes CPU from the path under test: wait for it to calm
    // down, and say in the records how busy it was.
    let busy = wait_for_quiet(opts.quiet_wait)?;
    let topo = Topology::new("bench");
    // The fourth endpoint, and a route back to the pods for the direct contender (the others
    // SNAT to the node; the route only makes a missing SNAT visible instead of a hang).
    topo.ext.sh(&format!(
        "ip addr add {}/32 dev lo; ip route add 10.244.0.0/16 via {NODE}",
        ENDPOINTS[3]
    ));
    let endpoint_ips: Vec<IpAddr> = ENDPOINTS.iter().map(|ip| IpAddr::V4(*ip)).collect();
    let server = LoadServer::start(&topo.ext.name, ENDPOINT_PORT, &endpoint_ips, opts.threads)
        .context("starting the load server in the outside namespace")?;

    let setup = Instant::now();
    let (agent, mut detail) = program(opts, plan, contender, &topo)?;
    let our_pids: Vec<u32> = agent.iter().map(|a| a.child.id()).collect();
    detail += &format!("; CPU {:.0} % busy before the run", busy * 100.0);
    let setup = setup.elapsed();
    let route = match contender {
        Contender::Direct => Route {
            tcp: ENDPOINTS
                .iter()
                .map(|ip| SocketAddr::new(IpAddr::V4(*ip), ENDPOINT_PORT))
                .collect(),
            udp: SocketAddr::new(IpAddr::V4(ENDPOINTS[0]), ENDPOINT_PORT),
            source: POD.parse()?,
        },
        _ => Route {
            tcp: vec![SocketAddr::new(IpAddr::V4(plan.target), SERVICE_PORT)],
            udp: SocketAddr::new(IpAddr::V4(plan.target), SERVICE_PORT),
            source: NODE.parse()?,
        },
    };
    if opts.verbose {
        eprintln!(
            "[traffic] round {round}, {} Services, {contender}: programmed in {:.1} s ({detail})",
            plan.services,
            setup.as_secs_f64()
        );
    }
    let pod = &topo.pod.name;
    warm_up(pod, &route, &server)
        .with_context(|| format!("no working path through {contender} ({detail})"))?;

    let mut records = Vec::new();
    for &measure in &opts.measures {
        let meter = CpuMeter::start(&our_pids)?;
        let record = measure_one(opts, pod, &route, &server, measure)
            .with_context(|| format!("measuring {measure}"))?;
        let others_cpu = meter.others_share()?;
        let record = Record {
            contender,
            services: plan.services,
            round,
            detail: detail.clone(),
            others_cpu,
            ..record
        };
        if opts.verbose {
            eprintln!("[traffic]   {}", summary(&record));
        }
        records.push(record);
    }
    Ok(records)
}

/// Waits (up to `patience`) until the machine is less than [`QUIET_BUSY`] busy; returns the
/// last busy share seen.
fn wait_for_quiet(patience: Duration) -> Result<f64> {
    let start = Instant::now();
    loop {
        let busy = cpu::busy_share(Duration::from_millis(250))?;
        if busy < QUIET_BUSY || start.elapsed() > patience {
            return Ok(busy);
        }
    }
}

const QUIET_BUSY: f64 = 0.15;

fn summary(r: &Record) -> String {
    let mut s = format!("{:<18} {:>10.2} {}", r.measure.name(), r.value, r.unit);
    if let (Some(p50), Some(p99)) = (r.p50_us, r.p99_us) {
        s += &format!("  p50 {p50:.0} us  p99 {p99:.0} us");
    }
    if let Some(loss) = r.loss {
        s += &format!("  loss {:.1} %", loss * 100.0);
    }
    if r.others_cpu > 0.05 {
        s += &format!("  (others used {:.0} % of the CPU)", r.others_cpu * 100.0);
    }
    if r.errors > 0 {
        s += &format!("  errors {}", r.errors);
    }
    s
}

/// Programs the contender in the node namespace. Returns the running agent (extproxy only: it
/// stops when dropped) and a description for the records.
fn program(
    opts: &TrafficOpts,
    plan: &SizePlan,
    contender: Contender,
    topo: &Topology,
) -> Result<(Option<AgentProcess>, String)> {
    let node = &topo.node.name;
    let node_config = NodeConfig::new(NODE.parse()?);
    match contender {
        Contender::Direct => Ok((None, "no rules; pod to endpoint addresses".into())),
        Contender::Extproxy => {
            let manifests = plan
                .manifests
                .as_ref()
                .context("manifests were not prepared")?;
            let agent = AgentProcess::start(opts, topo, &manifests.path, plan.services)?;
            let mut detail = String::from(
                "agent defaults (XDP auto: off on this veth uplink, TC only), --snat-ports 1024-65535",
            );
            for arg in &opts.extproxy_args {
                detail.push(' ');
                detail.push_str(arg);
            }
            Ok((Some(agent), detail))
        }
        Contender::IptablesLegacy | Contender::IptablesNft => {
            let backend = if contender == Contender::IptablesNft {
                Backend::Nft
            } else {
                Backend::Legacy
            };
            // kube-proxy inserts its jump rules first and restores with --noflush; into a fresh
            // namespace, restoring (flushing the empty tables) and then inserting the jump rules
            // gives the very same rules (iptables-save output identical) and spares
            // iptables-nft a quadratic cache walk: 10k Services in 5 s instead of 13 minutes.
            // How long kube-proxy's own sequence takes is the programming benchmark's business.
            let input = iptables::iptables_restore(&plan.iptables_services, &node_config);
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
            Ok((
                None,
                format!(
                    "{}, target at KUBE-SERVICES rule {} of {}",
                    backend.iptables(),
                    plan.iptables_position,
                    plan.iptables_services.len()
                ),
            ))
        }
        Contender::Nftables => {
            let script = nftables::nft_script(&plan.nft_services, &node_config);
            let args = ["-f".to_string(), "-".to_string()];
            let out = in_netns_cmd(node, "nft", &args, Some(script.as_bytes()))?;
            ensure!(
                out.status.success(),
                "nft -f: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            apply_sysctls(node, &kube_proxy_sysctls(&node_config, ProxyMode::Nftables))?;
            Ok((None, "nft -f, table ip kube-proxy".into()))
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
fn in_netns_cmd(
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

/// The real agent in the node namespace, stopped with SIGINT (then SIGKILL) when dropped.
struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    fn start(
        opts: &TrafficOpts,
        topo: &Topology,
        manifests: &Path,
        services: usize,
    ) -> Result<Self> {
        let log_path = topo.dir.join("agent.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = Command::new("nsenter");
        // If this process dies without dropping us (a signal), the agent still gets its SIGINT,
        // detaches and removes its pins, rather than serving a deleted namespace forever. (The
        // signal follows the spawning thread, which holds the agent until it is dropped.)
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command
            .arg(format!("--net=/var/run/netns/{}", topo.node.name))
            .arg(&opts.agent_bin)
            .args(["run", "--iface", "up0", "--manifests"])
            .arg(manifests)
            .arg("--pin-dir")
            .arg(topo.pin_dir())
            .arg("--state-dir")
            .arg(topo.dir.join("state"))
            // Short flows close at thousands per second and each holds its SNAT port for the
            // closing timeout (10 s): the default 4,536 ports per endpoint would run out.
            // A production node would reserve the range or add egress addresses.
            .args(["--snat-ports", "1024-65535", "--ct-max", "1048576"])
            .args(&opts.extproxy_args)
            .env("EXTPROXY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", opts.agent_bin.display()))?;
        let mut agent = AgentProcess { child };
        // Reading 10k manifests and programming them takes a few seconds; allow for a slow box.
        let timeout = Duration::from_secs(30) + Duration::from_millis(10 * services as u64);
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("extproxy is running") {
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!("extproxy exited ({status}) before it was running:\n{text}");
            }
            if start.elapsed() > timeout {
                bail!("extproxy not running after {timeout:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // nsenter execs the agent: the child's pid is the agent's. SIGINT lets it detach and
        // remove its pins.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let start = Instant::now();
        while let Ok(None) = self.child.try_wait() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Measures
// -------------------------------------------------------------------------------------------------

/// Short connections until every endpoint has answered (neighbour entries resolved, programs
/// and rules warm), checking the endpoints saw the expected source.
fn warm_up(pod: &str, route: &Route, server: &LoadServer) -> Result<()> {
    let before = server.tcp_tally();
    let stats = load::connection_rate(pod, &route.tcp, 4, 1, Duration::from_millis(500))?;
    let seen = server.tcp_tally().since(&before);
    ensure!(
        stats.ops > 0,
        "no connection completed in 0.5 s ({} failed)",
        stats.errors
    );
    check_sources(&seen, route.source, "TCP")?;
    ensure!(
        seen.by_endpoint.len() == ENDPOINTS.len(),
        "connections reached only {:?}, not all {} endpoints",
        seen.by_endpoint,
        ENDPOINTS.len()
    );
    Ok(())
}

/// Every connection or datagram the endpoints counted came from `source`: the traffic really
/// went through the contender (SNAT to the node) or really bypassed it (the pod's own address).
fn check_sources(seen: &Tally, source: IpAddr, what: &str) -> Result<()> {
    ensure!(seen.total() > 0, "the endpoints saw no {what} traffic");
    ensure!(
        seen.by_source.keys().all(|ip| *ip == source),
        "the endpoints saw {what} traffic from {:?}, expected only {source}",
        seen.by_source
    );
    Ok(())
}

fn measure_one(
    opts: &TrafficOpts,
    pod: &str,
    route: &Route,
    server: &LoadServer,
    measure: Measure,
) -> Result<Record> {
    let duration = opts.duration(measure);
    let blank = Record {
        contender: Contender::Direct,
        measure,
        services: 0,
        round: 0,
        value: 0.0,
        unit: measure.unit(),
        p50_us: None,
        p99_us: None,
        count: 0,
        errors: 0,
        loss: None,
        seconds: duration.as_secs_f64(),
        others_cpu: 0.0,
        detail: String::new(),
    };
    let from_ops = |stats: OpStats| Record {
        value: stats.per_second(),
        p50_us: stats.latency_us(0.50),
        p99_us: stats.latency_us(0.99),
        count: stats.ops,
        errors: stats.errors,
        seconds: stats.elapsed.as_secs_f64(),
        ..blank.clone()
    };
    let tcp_before = server.tcp_tally();
    let record = match measure {
        Measure::NewConnections => {
            let stats =
                load::connection_rate(pod, &route.tcp, opts.workers, opts.threads, duration)?;
            let accepted = server.tcp_tally().since(&tcp_before).total();
            ensure!(
                accepted >= stats.ops,
                "the endpoints accepted {accepted} connections, the client completed {}",
                stats.ops
            );
            from_ops(stats)
        }
        Measure::Requests => from_ops(load::request_rate(
            pod,
            &route.tcp,
            opts.workers,
            opts.threads,
            duration,
        )?),
        Measure::ConnectionLatency | Measure::RequestLatency => {
            let stats = if measure == Measure::ConnectionLatency {
                load::connection_rate(pod, &route.tcp, 1, 1, duration)?
            } else {
                load::request_rate(pod, &route.tcp, 1, 1, duration)?
            };
            Record {
                value: stats
                    .latency_us(0.99)
                    .context("not one operation completed")?,
                ..from_ops(stats)
            }
        }
        Measure::TcpThroughput => {
            let (bytes, elapsed) = load::tcp_stream(pod, route.tcp[0], duration)?;
            Record {
                value: bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
                count: bytes,
                seconds: elapsed.as_secs_f64(),
                ..blank.clone()
            }
        }
        Measure::UdpPackets => {
            let before = server.udp_tally();
            let sent = load::udp_flood(pod, route.udp, duration)?;
            // Let the datagrams still in queues arrive.
            std::thread::sleep(Duration::from_millis(300));
            let seen = server.udp_tally().since(&before);
            check_sources(&seen, route.source, "UDP")?;
            let received = seen.total();
            Record {
                value: received as f64 / duration.as_secs_f64(),
                count: received,
                errors: sent.saturating_sub(received),
                loss: Some(1.0 - received as f64 / sent.max(1) as f64),
                ..blank
            }
        }
    };
    if measure != Measure::UdpPackets {
        check_sources(&server.tcp_tally().since(&tcp_before), route.source, "TCP")?;
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench_services(n: usize) -> (Vec<BenchService>, BenchService) {
        let opts = TrafficOpts {
            contenders: vec![Contender::IptablesLegacy],
            ..TrafficOpts::quick(PathBuf::new())
        };
        let plan = SizePlan::new(n, &opts).unwrap();
        let udp = plan.nft_services.last().unwrap().clone();
        let tcp = plan.nft_services[..n].to_vec();
        (tcp, udp)
    }

    #[test]
    fn target_sits_mid_chain_for_iptables() {
        let (tcp, udp) = bench_services(5);
        let (order, position) = iptables_order(&tcp, &udp);
        assert_eq!(order.len(), 6);
        assert_eq!(position, 3);
        assert_eq!(order[2].name, "svc-000004");
        assert_eq!(order[2].protocol, Protocol::Tcp);
        assert_eq!(order[3].protocol, Protocol::Udp);
        let (order, position) = iptables_order(&tcp[..1], &udp);
        assert_eq!(position, 1);
        assert_eq!(order.len(), 2);
    }

    #[test]
    fn cluster_ips_stay_in_the_service_cidr() {
        let (tcp, _) = bench_services(10_000);
        let last = u32::from(tcp.last().unwrap().cluster_ip);
        assert_eq!(Ipv4Addr::from(last), Ipv4Addr::new(10, 96, 39, 25));
        assert!(last < u32::from(Ipv4Addr::new(10, 112, 0, 0)));
    }

    #[test]
    fn manifest_is_a_selectorless_service_with_its_slice() {
        let (tcp, udp) = bench_services(2);
        let v = service_manifest(&tcp[1], Some(&udp));
        assert_eq!(v["kind"], "List");
        let svc = &v["items"][0];
        assert!(svc["spec"].get("selector").is_none());
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.11");
        assert_eq!(svc["spec"]["ports"][1]["protocol"], "UDP");
        let slice = &v["items"][1];
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "svc-000001"
        );
        assert_eq!(slice["ports"][0]["name"], "http");
        assert_eq!(slice["ports"][0]["port"], 8080);
        assert_eq!(slice["endpoints"].as_array().unwrap().len(), 4);
    }

    /// `$EXTPROXY_BIN`, or the release agent built now.
    fn agent_bin() -> Result<PathBuf> {
        match std::env::var_os("EXTPROXY_BIN") {
            Some(p) => Ok(PathBuf::from(p)),
            None => crate::build_agent(true),
        }
    }

    /// A tiny end-to-end run: every contender, one Service, every measure for half a second.
    /// `cargo test -p xtask -- --ignored traffic_smoke --nocapture` (as root; uses
    /// $EXTPROXY_BIN or builds the release agent).
    #[test]
    #[ignore = "needs root; creates network namespaces and runs the agent"]
    fn traffic_smoke() -> Result<()> {
        let agent_bin = agent_bin()?;
        let half = Duration::from_millis(500);
        let opts = TrafficOpts {
            sizes: vec![1],
            connection_time: half,
            request_time: half,
            stream_time: half,
            udp_time: half,
            ..TrafficOpts::quick(agent_bin)
        };
        let records = run(&opts)?;
        assert_eq!(records.len(), Contender::ALL.len() * Measure::ALL.len());
        for r in &records {
            println!("{}", r.to_json());
            assert!(r.value > 0.0, "{}", summary(r));
        }
        Ok(())
    }

    /// The quick mode on its own, until `cargo xtask bench` drives it:
    /// `cargo test -p xtask -- --ignored traffic_quick --nocapture` (as root). For profiling one
    /// case, narrow it: `XP_TRAFFIC_CONTENDERS=extproxy,direct XP_TRAFFIC_SIZES=10000
    /// XP_TRAFFIC_MEASURES=new_connections XP_TRAFFIC_SECS=20`; `XP_TRAFFIC_FULL=1` starts from
    /// the full mode instead (about 35 minutes).
    #[test]
    #[ignore = "needs root; about three minutes"]
    fn traffic_quick() -> Result<()> {
        let agent_bin = agent_bin()?;
        let mut opts = if std::env::var_os("XP_TRAFFIC_FULL").is_some() {
            TrafficOpts::full(agent_bin)
        } else {
            TrafficOpts::quick(agent_bin)
        };
        let list = |var: &str| -> Option<Vec<String>> {
            std::env::var(var).ok().map(|v| {
                v.split(',')
                    .filter(|item| !item.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
        };
        if let Some(sizes) = list("XP_TRAFFIC_SIZES") {
            opts.sizes = sizes.iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
        }
        if let Some(names) = list("XP_TRAFFIC_CONTENDERS") {
            opts.contenders = Contender::ALL
                .into_iter()
                .filter(|c| names.iter().any(|n| n == c.name()))
                .collect();
        }
        if let Some(names) = list("XP_TRAFFIC_MEASURES") {
            opts.measures = Measure::ALL
                .into_iter()
                .filter(|m| names.iter().any(|n| n == m.name()))
                .collect();
        }
        if let Some(args) = list("XP_TRAFFIC_EXTPROXY_ARGS") {
            opts.extproxy_args = args;
        }
        if let Ok(secs) = std::env::var("XP_TRAFFIC_SECS") {
            let secs = Duration::from_secs_f64(secs.parse()?);
            opts.connection_time = secs;
            opts.request_time = secs;
            opts.stream_time = secs;
            opts.udp_time = secs;
            opts.latency_time = secs;
        }
        opts.nftables_max_services = opts.nftables_max_services.max(
            std::env::var("XP_TRAFFIC_NFT_MAX")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        );
        let started = Instant::now();
        let records = run(&opts)?;
        println!(
            "traffic benchmark took {:.0} s",
            started.elapsed().as_secs_f64()
        );
        for r in &records {
            println!("{}", r.to_json());
        }
        Ok(())
    }
}
