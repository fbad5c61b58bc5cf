//! The traffic part of `cargo xtask bench`: the same client traffic through every contender
//! (extproxy with its defaults, the real kube-proxy in iptables and nftables modes against a
//! real API server, no proxy at all), at several Service counts, interleaved, round after round.
//! Methodology: `TRAFFIC.md` beside this file.
//!
//! Every run gets a fresh `testbed` topology (pod, node, outside), so no contender inherits
//! another's conntrack entries, TIME_WAIT sockets or rules. The outside namespace runs
//! [`testbed::load::LoadServer`] on the four endpoints; the pod runs the load clients. The
//! Kubernetes contenders read their Services from a real etcd and kube-apiserver
//! ([`cluster`]), filled once per size and linked to each run's node.

mod cluster;
pub(crate) mod contenders;
pub mod egress;
mod layout;
mod measures;

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use extproxy_envtest::Binaries;
use serde::Serialize;
use testbed::{
    load::{self, LoadServer},
    topo::{NODE, POD, Topology, Wire},
};

use super::{cpu, iptables::Backend, kubeproxy::ProxyMode};
use cluster::{ApiNetns, Cluster, Flavor};
use contenders::{AgentSource, ManifestDir, Process};
pub use layout::{ENDPOINT_PORT, ENDPOINTS, Layout, SERVICE_PORT};

/// What carries the pod's traffic to the endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Contender {
    /// The real agent in Kubernetes mode with its defaults (XDP auto: off on this veth uplink,
    /// TC does everything), reading labelled Services from its own API server.
    #[serde(rename = "extproxy")]
    Extproxy,
    /// The same with [`TrafficOpts::tuned_args`] (labelled with them).
    #[serde(rename = "extproxy-tuned")]
    ExtproxyTuned,
    /// The agent in manifest mode (a folder of JSON files), defaults. Opt-in.
    #[serde(rename = "extproxy-manifests")]
    ExtproxyManifests,
    /// The real kube-proxy, iptables mode, defaults (pods' own traffic is not masqueraded).
    #[serde(rename = "kube-proxy-iptables")]
    KubeProxyIptables,
    /// The real kube-proxy, nftables mode, defaults.
    #[serde(rename = "kube-proxy-nftables")]
    KubeProxyNftables,
    /// kube-proxy iptables mode with --masquerade-all: endpoints see the node's address.
    #[serde(rename = "kube-proxy-iptables-masquerade-all")]
    KubeProxyIptablesMasq,
    /// kube-proxy nftables mode with --masquerade-all.
    #[serde(rename = "kube-proxy-nftables-masquerade-all")]
    KubeProxyNftablesMasq,
    /// kube-proxy's iptables rules written by hand (`iptables` model, masqueradeAll) through
    /// iptables-legacy. Opt-in: the real kube-proxy replaced these.
    #[serde(rename = "iptables-legacy")]
    IptablesLegacy,
    /// The same rules through iptables-nft. Opt-in.
    #[serde(rename = "iptables-nft")]
    IptablesNft,
    /// kube-proxy's nftables rules written by hand. Opt-in.
    #[serde(rename = "nftables")]
    Nftables,
    /// No proxy: the pod talks to the endpoints' own addresses (the node only routes).
    #[serde(rename = "direct")]
    Direct,
}

impl Contender {
    /// Every contender.
    pub const ALL: [Contender; 11] = [
        Contender::Extproxy,
        Contender::ExtproxyTuned,
        Contender::ExtproxyManifests,
        Contender::KubeProxyIptables,
        Contender::KubeProxyNftables,
        Contender::KubeProxyIptablesMasq,
        Contender::KubeProxyNftablesMasq,
        Contender::IptablesLegacy,
        Contender::IptablesNft,
        Contender::Nftables,
        Contender::Direct,
    ];
    /// The contenders the report has a row for, run or not (a row that was not run says why).
    pub const REPORTED: [Contender; 7] = [
        Contender::Extproxy,
        Contender::ExtproxyTuned,
        Contender::KubeProxyIptables,
        Contender::KubeProxyNftables,
        Contender::KubeProxyIptablesMasq,
        Contender::KubeProxyNftablesMasq,
        Contender::Direct,
    ];
    /// The quick mode's: extproxy with its defaults, kube-proxy's defaults in both modes and the
    /// masquerading variant in the default mode, no proxy.
    pub const QUICK: [Contender; 5] = [
        Contender::Extproxy,
        Contender::KubeProxyIptables,
        Contender::KubeProxyNftables,
        Contender::KubeProxyIptablesMasq,
        Contender::Direct,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Extproxy => "extproxy",
            Contender::ExtproxyTuned => "extproxy-tuned",
            Contender::ExtproxyManifests => "extproxy-manifests",
            Contender::KubeProxyIptables => "kube-proxy-iptables",
            Contender::KubeProxyNftables => "kube-proxy-nftables",
            Contender::KubeProxyIptablesMasq => "kube-proxy-iptables-masquerade-all",
            Contender::KubeProxyNftablesMasq => "kube-proxy-nftables-masquerade-all",
            Contender::IptablesLegacy => "iptables-legacy",
            Contender::IptablesNft => "iptables-nft",
            Contender::Nftables => "nftables",
            Contender::Direct => "direct",
        }
    }

    pub fn from_name(name: &str) -> Option<Contender> {
        Contender::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The API server it reads its Services from.
    fn cluster(self) -> Option<Flavor> {
        match self {
            Contender::Extproxy | Contender::ExtproxyTuned => Some(Flavor::Extproxy),
            Contender::KubeProxyIptables
            | Contender::KubeProxyNftables
            | Contender::KubeProxyIptablesMasq
            | Contender::KubeProxyNftablesMasq => Some(Flavor::KubeProxy),
            _ => None,
        }
    }

    /// The real kube-proxy's mode, and whether it masquerades everything.
    fn kube_proxy(self) -> Option<(ProxyMode, bool)> {
        match self {
            Contender::KubeProxyIptables => Some((ProxyMode::Iptables, false)),
            Contender::KubeProxyNftables => Some((ProxyMode::Nftables, false)),
            Contender::KubeProxyIptablesMasq => Some((ProxyMode::Iptables, true)),
            Contender::KubeProxyNftablesMasq => Some((ProxyMode::Nftables, true)),
            _ => None,
        }
    }

    /// Whether the endpoints see the node's address (SNAT / masquerade) rather than the
    /// client's own.
    pub fn snat(self) -> bool {
        !matches!(
            self,
            Contender::Direct | Contender::KubeProxyIptables | Contender::KubeProxyNftables
        )
    }

    /// Whether it is a process whose start is timed (first answer) and whose programming from
    /// the API is measured.
    fn reads_the_api(self) -> bool {
        self.cluster().is_some()
    }

    fn is_extproxy(self) -> bool {
        matches!(
            self,
            Contender::Extproxy | Contender::ExtproxyTuned | Contender::ExtproxyManifests
        )
    }

    fn is_kube_proxy(self) -> bool {
        self.kube_proxy().is_some()
    }

    /// Its flags beyond the defaults (and beyond what the harness must pass: interface, pins,
    /// kubeconfig, node name), for its label.
    pub fn flags(self, opts: &TrafficOpts) -> Vec<String> {
        let mut flags = match self {
            Contender::ExtproxyTuned => opts.tuned_args.clone(),
            Contender::KubeProxyIptablesMasq | Contender::KubeProxyNftablesMasq => {
                vec!["--masquerade-all".into()]
            }
            _ => Vec::new(),
        };
        if self.is_extproxy() {
            flags.extend(opts.extproxy_args.iter().cloned());
        }
        flags
    }
}

impl fmt::Display for Contender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// From the proxy's start to the first connection answered through the one-endpoint
    /// Service (ms, lower is better).
    FirstAnswer,
    /// New TCP connections per second to the four-endpoint Service: connect, one request, the
    /// answer, the server closes.
    NewConnections,
    /// The same through the one-endpoint Service, sustained: one client's sustainable rate.
    NewConnectionsOneEndpoint,
    /// 200 client addresses, one endpoint, a stated offered rate: completed, failed, stalled.
    ManyClients,
    /// 200 client addresses, one endpoint, as fast as they go: many clients' sustainable rate.
    ManyClientsMax,
    /// Requests per second on kept-alive connections, one outstanding per connection.
    Requests,
    /// One TCP stream's goodput on veths without offloads.
    TcpThroughput,
    /// One TCP stream's goodput with NIC-like offloads (TSO/GSO, GRO, partial checksums),
    /// software segmentation and checksums after the node, every checksum verified.
    TcpThroughputOffload,
    /// One UDP flow of small datagrams: what the endpoint receives per second.
    UdpPackets,
    /// One worker opening connections one after the other: a new connection's latency on an
    /// otherwise idle path.
    ConnectionLatency,
    /// One kept-alive connection, one request at a time: the round trip on an idle path.
    RequestLatency,
    /// From an API write (the one-endpoint Service's endpoint replaced) to traffic reaching
    /// the new endpoint (ms, p99; p50 beside it).
    ProgrammingLatency,
}

impl Measure {
    /// In the order a run measures them: the one-endpoint measures come late because they use
    /// up the most SNAT ports and conntrack entries (what they leave behind must not weigh on
    /// the others), the programming latency last because it moves the endpoint.
    pub const ALL: [Measure; 12] = [
        Measure::FirstAnswer,
        Measure::NewConnections,
        Measure::Requests,
        Measure::TcpThroughput,
        Measure::UdpPackets,
        Measure::ConnectionLatency,
        Measure::RequestLatency,
        Measure::NewConnectionsOneEndpoint,
        Measure::ManyClients,
        Measure::ManyClientsMax,
        Measure::ProgrammingLatency,
        Measure::TcpThroughputOffload,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Measure::FirstAnswer => "first_answer",
            Measure::NewConnections => "new_connections",
            Measure::NewConnectionsOneEndpoint => "new_connections_one_endpoint",
            Measure::ManyClients => "many_clients",
            Measure::ManyClientsMax => "many_clients_max",
            Measure::Requests => "requests",
            Measure::TcpThroughput => "tcp_throughput",
            Measure::TcpThroughputOffload => "tcp_throughput_offload",
            Measure::UdpPackets => "udp_packets",
            Measure::ConnectionLatency => "connection_latency",
            Measure::RequestLatency => "request_latency",
            Measure::ProgrammingLatency => "programming_latency",
        }
    }

    pub fn from_name(name: &str) -> Option<Measure> {
        Measure::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn unit(self) -> &'static str {
        match self {
            Measure::FirstAnswer => "ms",
            Measure::NewConnections
            | Measure::NewConnectionsOneEndpoint
            | Measure::ManyClients
            | Measure::ManyClientsMax => "conn/s",
            Measure::Requests => "req/s",
            Measure::TcpThroughput | Measure::TcpThroughputOffload => "Gbit/s",
            Measure::UdpPackets => "pps",
            Measure::ConnectionLatency | Measure::RequestLatency => "us (p99)",
            Measure::ProgrammingLatency => "ms (p99)",
        }
    }

    /// Whether `contender` has this measure at all (no start to time without a process, no
    /// API write without an API server).
    fn applies(self, contender: Contender) -> bool {
        match self {
            Measure::FirstAnswer => contender.is_extproxy() || contender.is_kube_proxy(),
            Measure::ProgrammingLatency => contender.reads_the_api(),
            _ => true,
        }
    }
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One measurement: one contender, one measure, one Service count, one round. Or a contender
/// that was not run at a size, and why (`not_run`).
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub contender: Contender,
    pub measure: Measure,
    /// N: Services programmed (the `direct` contender programs none; its rows carry the count
    /// of the runs it is interleaved with).
    pub services: usize,
    /// 0-based.
    pub round: usize,
    /// In `unit`; higher is better except for `first_answer`, `programming_latency` and the
    /// two latency measures, whose value is a time (their p99 for the latency ones).
    pub value: f64,
    pub unit: &'static str,
    /// Per-operation latency (connection: connect to the server's close; request: request to
    /// answer; programming: write to the first answer from the new endpoint), microseconds.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Operations completed (connections, requests, bytes, datagrams received, samples).
    pub count: u64,
    /// Failed operations (refused, reset, short answers); for UDP, datagrams sent but not
    /// received; for programming, probe connections that failed while a change was under way.
    pub errors: u64,
    /// Connections that took longer than [`STALL`]: a SYN went unanswered and was resent.
    pub stalled: Option<u64>,
    /// `many_clients`: the offered rate (conn/s).
    pub offered: Option<f64>,
    /// UDP: the share of sent datagrams that never arrived.
    pub loss: Option<f64>,
    pub seconds: f64,
    /// Share of both cores that processes other than the benchmark's (a build, another test)
    /// used during the measure; above a few per cent the value is disturbed.
    pub others_cpu: f64,
    /// The contender's flags beyond its defaults (its label), e.g. `--masquerade-all`.
    pub flags: Vec<String>,
    /// How the contender ran.
    pub detail: String,
    /// A side note, e.g. the proxy's own programming-latency metric.
    pub note: Option<String>,
    /// Set when the contender was not run at this size: why. `value` is NaN then.
    pub not_run: Option<String>,
    /// Set when the measure failed (e.g. connections that never completed): the error. `value`
    /// is NaN then.
    pub failed: Option<String>,
}

impl Record {
    fn blank(contender: Contender, measure: Measure, services: usize, round: usize) -> Self {
        Record {
            contender,
            measure,
            services,
            round,
            value: f64::NAN,
            unit: measure.unit(),
            p50_us: None,
            p99_us: None,
            count: 0,
            errors: 0,
            stalled: None,
            offered: None,
            loss: None,
            seconds: 0.0,
            others_cpu: 0.0,
            flags: Vec::new(),
            detail: String::new(),
            note: None,
            not_run: None,
            failed: None,
        }
    }

    /// The record as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Record always serializes")
    }
}

/// How long filling an API server took (reported beside the results, not a contender's).
#[derive(Clone, Debug, Serialize)]
pub struct FillRecord {
    /// `extproxy` (labelled Services) or `kube-proxy`.
    pub cluster: &'static str,
    pub services: usize,
    /// Objects written (Services, EndpointSlices, patches of the earlier targets).
    pub objects: usize,
    pub seconds: f64,
    /// etcd and kube-apiserver start-up (first fill only).
    pub startup_seconds: Option<f64>,
}

/// What [`run`] measured.
#[derive(Default)]
pub struct Results {
    pub records: Vec<Record>,
    pub fills: Vec<FillRecord>,
}

/// Programming-latency samples taken however long they take.
pub const MIN_PROGRAMMING_SAMPLES: usize = 3;

/// A connection slower than this waited for a resent SYN (Linux resends after 1 s).
pub const STALL: Duration = Duration::from_millis(900);

/// The pod's address for probes (first answer, programming latency), apart from the load's:
/// probes sent before a contender has programmed a Service leave netfilter conntrack entries
/// without NAT behind (see [`load::probe_endpoints`]), which a load connection reusing the same
/// source port would otherwise run into.
pub const PROBER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 200);

#[derive(Clone, Debug)]
pub struct TrafficOpts {
    /// The release `extproxy` binary.
    pub agent_bin: PathBuf,
    /// etcd, kube-apiserver and kube-proxy (`$EXTPROXY_K8S_BIN`); without them the Kubernetes
    /// contenders are reported as not run.
    pub k8s_bin: Option<PathBuf>,
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub contenders: Vec<Contender>,
    /// The contenders were chosen by hand (XP_TRAFFIC_CONTENDERS), not by the mode.
    pub contenders_chosen: bool,
    pub measures: Vec<Measure>,
    /// The quick mode (named in the reasons a contender was not run).
    pub quick: bool,
    pub connection_time: Duration,
    /// The one-endpoint measure: "sustained for 60 s (not a burst)" in the full mode.
    pub sustain_time: Duration,
    pub request_time: Duration,
    pub stream_time: Duration,
    pub udp_time: Duration,
    /// Each of the two latency measures.
    pub latency_time: Duration,
    /// Client addresses of the many-clients measures, and the paced one's offered rate
    /// (conn/s, all together) and time (the unpaced one takes `connection_time`).
    pub many_clients: usize,
    pub many_clients_rate: f64,
    pub many_clients_time: Duration,
    /// Programming-latency samples per run, and the smallest N measured (the issue asks for 1k
    /// and 10k).
    pub programming_samples: usize,
    pub programming_min_services: usize,
    /// Sampling stops early once this much time went by and [`MIN_PROGRAMMING_SAMPLES`] were
    /// taken: kube-proxy's iptables mode at 10k takes far longer per change than the rest.
    pub programming_budget: Duration,
    /// Sizes at which the offload topology runs (`tcp_throughput_offload`).
    pub offload_sizes: Vec<usize>,
    /// Interleaved rounds of the offload topology, and each stream's length. A stream's rate
    /// here swings by a quarter between two runs of the same contender (all of the sender's
    /// path, the wire's software segmentation included, runs on one core): one short stream
    /// per contender decided a 0.70x that three medians put at 0.9-1.0x. Quick mode keeps
    /// them cheap: about 10 s per contender and round.
    pub offload_rounds: usize,
    pub offload_time: Duration,
    /// Concurrent connections of the connection and request measures.
    pub workers: usize,
    /// Client and server threads each (one per core).
    pub threads: usize,
    /// `extproxy-tuned`'s flags.
    pub tuned_args: Vec<String>,
    /// Appended to every extproxy run (e.g. `--xdp driver` to compare the XDP path; profiling);
    /// named in the records' flags.
    pub extproxy_args: Vec<String>,
    /// The real kube-proxy is not run above this many Services (quick: 1k; it takes minutes to
    /// program 10k).
    pub kube_proxy_max_services: usize,
    /// The hand-written nftables layout is skipped above this many Services (`nft -f` of 10k
    /// takes ~80 s here).
    pub nftables_max_services: usize,
    /// How long a run waits for the machine to calm down (under 15 % busy) before it starts.
    pub quiet_wait: Duration,
    /// Progress lines on stderr.
    pub verbose: bool,
}

impl TrafficOpts {
    /// One round, short measures, the real kube-proxy up to 1k Services.
    pub fn quick(agent_bin: PathBuf, k8s_bin: Option<PathBuf>) -> Self {
        TrafficOpts {
            agent_bin,
            k8s_bin,
            sizes: vec![1, 1_000, 10_000],
            rounds: 1,
            contenders: Contender::QUICK.to_vec(),
            contenders_chosen: false,
            measures: Measure::ALL.to_vec(),
            quick: true,
            connection_time: Duration::from_secs(3),
            // Issue 9's bar is a rate sustained for 60 s, past the endpoint's TIME_WAIT, where
            // SNAT ports come back to other clients; 5 s measured a burst. The report calls
            // it sustained, so quick mode sustains it too (about 11 of its ~25 minutes).
            sustain_time: Duration::from_secs(60),
            request_time: Duration::from_millis(1500),
            stream_time: Duration::from_millis(1500),
            udp_time: Duration::from_millis(1500),
            latency_time: Duration::from_secs(1),
            many_clients: 200,
            many_clients_rate: 1_000.0,
            many_clients_time: Duration::from_secs(4),
            programming_samples: 8,
            programming_min_services: 1_000,
            programming_budget: Duration::from_secs(60),
            offload_sizes: vec![1],
            offload_rounds: 3,
            offload_time: Duration::from_secs(4),
            workers: 16,
            threads: 2,
            tuned_args: ["--snat-ports", "1024-65535", "--ct-max", "1048576"]
                .map(String::from)
                .to_vec(),
            extproxy_args: Vec::new(),
            kube_proxy_max_services: 1_000,
            nftables_max_services: 1_000,
            quiet_wait: Duration::from_secs(5),
            verbose: true,
        }
    }

    /// Three rounds, 60 s of the one-endpoint measure, every reported contender at every size.
    pub fn full(agent_bin: PathBuf, k8s_bin: Option<PathBuf>) -> Self {
        TrafficOpts {
            rounds: 3,
            contenders: Contender::REPORTED.to_vec(),
            quick: false,
            connection_time: Duration::from_secs(10),
            sustain_time: Duration::from_secs(60),
            request_time: Duration::from_secs(5),
            stream_time: Duration::from_secs(5),
            udp_time: Duration::from_secs(5),
            latency_time: Duration::from_secs(5),
            offload_rounds: 5,
            offload_time: Duration::from_secs(10),
            // Longer than the endpoint's TIME_WAIT (60 s), and at 1,000/s more connections than
            // the default SNAT range has ports: every port is reused, by other clients too.
            many_clients_time: Duration::from_secs(75),
            programming_samples: 10,
            programming_budget: Duration::from_secs(180),
            kube_proxy_max_services: usize::MAX,
            nftables_max_services: usize::MAX,
            quiet_wait: Duration::from_secs(30),
            ..TrafficOpts::quick(agent_bin, k8s_bin)
        }
    }

    /// Narrows or changes the options from `XP_TRAFFIC_*` variables (TRAFFIC.md lists them):
    /// for profiling one case, or a development run.
    pub fn apply_env(&mut self) -> Result<()> {
        let list = |var: &str| -> Option<Vec<String>> {
            std::env::var(var).ok().map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
        };
        if let Some(sizes) = list("XP_TRAFFIC_SIZES") {
            self.sizes = sizes.iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
        }
        if let Some(names) = list("XP_TRAFFIC_CONTENDERS") {
            self.contenders = names
                .iter()
                .map(|n| {
                    Contender::from_name(n).with_context(|| {
                        format!(
                            "XP_TRAFFIC_CONTENDERS: unknown contender {n:?} (known: {})",
                            Contender::ALL.map(Contender::name).join(", ")
                        )
                    })
                })
                .collect::<Result<_>>()?;
            self.contenders_chosen = true;
        }
        if let Some(names) = list("XP_TRAFFIC_MEASURES") {
            self.measures = names
                .iter()
                .map(|n| {
                    Measure::from_name(n).with_context(|| {
                        format!(
                            "XP_TRAFFIC_MEASURES: unknown measure {n:?} (known: {})",
                            Measure::ALL.map(Measure::name).join(", ")
                        )
                    })
                })
                .collect::<Result<_>>()?;
        }
        if let Some(args) = list("XP_TRAFFIC_EXTPROXY_ARGS") {
            self.extproxy_args = args;
        }
        if let Some(args) = list("XP_TRAFFIC_TUNED_ARGS") {
            self.tuned_args = args;
        }
        if let Ok(secs) = std::env::var("XP_TRAFFIC_SECS") {
            let secs = Duration::from_secs_f64(secs.parse()?);
            self.connection_time = secs;
            self.sustain_time = secs;
            self.request_time = secs;
            self.stream_time = secs;
            self.offload_time = secs;
            self.udp_time = secs;
            self.latency_time = secs;
            self.many_clients_time = secs;
        }
        if let Ok(rounds) = std::env::var("XP_TRAFFIC_ROUNDS") {
            self.rounds = rounds.parse()?;
            self.offload_rounds = self.rounds;
        }
        if let Ok(rounds) = std::env::var("XP_TRAFFIC_OFFLOAD_ROUNDS") {
            self.offload_rounds = rounds.parse()?;
        }
        if let Ok(n) = std::env::var("XP_TRAFFIC_SAMPLES") {
            self.programming_samples = n.parse()?;
        }
        if let Ok(rate) = std::env::var("XP_TRAFFIC_RATE") {
            self.many_clients_rate = rate.parse()?;
        }
        if let Ok(n) = std::env::var("XP_TRAFFIC_KUBE_PROXY_MAX") {
            self.kube_proxy_max_services = n.parse()?;
        }
        if let Ok(n) = std::env::var("XP_TRAFFIC_NFT_MAX") {
            self.nftables_max_services = n.parse()?;
        }
        if let Some(sizes) = list("XP_TRAFFIC_OFFLOAD_SIZES") {
            self.offload_sizes = sizes.iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
        }
        Ok(())
    }

    /// Why `contender` does not run at `services`, if it does not.
    pub fn not_run(&self, contender: Contender, services: usize) -> Option<String> {
        let mode = if self.quick { "quick mode" } else { "this run" };
        if !self.contenders.contains(&contender) {
            return Some(if self.quick && !self.contenders_chosen {
                "not run in quick mode (`cargo xtask bench` runs it)".into()
            } else {
                "not selected (XP_TRAFFIC_CONTENDERS)".into()
            });
        }
        if contender.reads_the_api() && self.k8s_bin.is_none() {
            return Some(
                "not run: no Kubernetes binaries (../shared/k8s or $EXTPROXY_K8S_BIN)".into(),
            );
        }
        if contender.is_kube_proxy() && services > self.kube_proxy_max_services {
            return Some(format!(
                "not run in {mode}: kube-proxy takes minutes to program {services} Services \
                 here (ANCHORS.md: 322 s to first answer in iptables mode, 22 s in nftables \
                 mode at 10k); `cargo xtask bench` runs it"
            ));
        }
        if contender == Contender::Nftables && services > self.nftables_max_services {
            return Some(format!(
                "not run in {mode}: `nft -f` of {services} Services takes ~80 s here"
            ));
        }
        None
    }

    fn duration(&self, measure: Measure) -> Duration {
        match measure {
            Measure::NewConnections => self.connection_time,
            Measure::NewConnectionsOneEndpoint => self.sustain_time,
            Measure::ManyClients => self.many_clients_time,
            Measure::ManyClientsMax => self.connection_time,
            Measure::Requests => self.request_time,
            Measure::TcpThroughput => self.stream_time,
            Measure::TcpThroughputOffload => self.offload_time,
            Measure::UdpPackets => self.udp_time,
            Measure::ConnectionLatency | Measure::RequestLatency => self.latency_time,
            Measure::FirstAnswer | Measure::ProgrammingLatency => Duration::ZERO,
        }
    }

    /// The measures of a run on the standard topology (`offload`: on the offload topology).
    fn measures_at(&self, contender: Contender, services: usize, offload: bool) -> Vec<Measure> {
        self.measures
            .iter()
            .copied()
            .filter(|m| m.applies(contender))
            .filter(|m| (*m == Measure::TcpThroughputOffload) == offload)
            .filter(|m| {
                *m != Measure::ProgrammingLatency || services >= self.programming_min_services
            })
            .collect()
    }

    /// How long a contender may take to answer after its start: kube-proxy's iptables mode
    /// took 322 s at 10k Services here (ANCHORS.md).
    fn start_timeout(&self, services: usize) -> Duration {
        Duration::from_secs(60) + Duration::from_millis(90 * services as u64)
    }
}

/// Runs every contender on every size for every round. Within a round the contenders take
/// turns, starting one later each round, so none always runs first (or on a warmer machine).
pub fn run(opts: &TrafficOpts) -> Result<Results> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the traffic benchmark needs root (network namespaces, eBPF)"
    );
    ensure!(
        opts.agent_bin.exists(),
        "{} not found: build it with `cargo build --release -p proxy-user`",
        opts.agent_bin.display()
    );
    let bins = opts
        .k8s_bin
        .as_ref()
        .map(Binaries::in_dir)
        .transpose()
        .context("the Kubernetes binaries")?;
    let mut results = Results::default();
    let api_netns = match &bins {
        Some(_) if opts.contenders.iter().any(|c| c.reads_the_api()) => Some(ApiNetns::new()?),
        _ => None,
    };
    // Declared after the namespace: stopped before it is deleted.
    let mut clusters: Vec<Cluster> = Vec::new();
    for &n in &opts.sizes {
        ensure!(n >= 1, "a Service count must be at least 1");
        let layout = Layout::new(n);
        let mut reported: Vec<Contender> = Contender::REPORTED.to_vec();
        reported.extend(opts.contenders.iter().copied());
        reported.sort();
        reported.dedup();
        let mut running = Vec::new();
        for &c in &reported {
            match opts.not_run(c, n) {
                Some(why) => {
                    for offload in [false, true] {
                        if offload && !opts.offload_sizes.contains(&n) {
                            continue;
                        }
                        for m in opts.measures_at(c, n, offload) {
                            results.records.push(Record {
                                not_run: Some(why.clone()),
                                flags: c.flags(opts),
                                ..Record::blank(c, m, n, 0)
                            });
                        }
                    }
                }
                None => running.push(c),
            }
        }
        // Keep the requested order (the rotation below interleaves it).
        let running: Vec<Contender> = opts
            .contenders
            .iter()
            .copied()
            .filter(|c| running.contains(c))
            .collect();
        for flavor in [Flavor::Extproxy, Flavor::KubeProxy] {
            if !running.iter().any(|c| c.cluster() == Some(flavor)) {
                continue;
            }
            let (Some(bins), Some(netns)) = (&bins, &api_netns) else {
                bail!("no Kubernetes binaries for the Kubernetes contenders");
            };
            let fresh = !clusters.iter().any(|c| c.flavor == flavor);
            if fresh {
                clusters.push(Cluster::start(bins, netns, flavor)?);
            }
            let cluster = clusters
                .iter_mut()
                .find(|c| c.flavor == flavor)
                .expect("started above");
            let (objects, took) = cluster.fill(&layout)?;
            let name = match flavor {
                Flavor::Extproxy => "extproxy",
                Flavor::KubeProxy => "kube-proxy",
            };
            if opts.verbose {
                eprintln!(
                    "[traffic] {name}'s API server: {n} Services, {objects} objects written in {:.1} s",
                    took.as_secs_f64()
                );
            }
            results.fills.push(FillRecord {
                cluster: name,
                services: n,
                objects,
                seconds: took.as_secs_f64(),
                startup_seconds: fresh.then_some(cluster.startup.as_secs_f64()),
            });
        }
        let manifests = if running.contains(&Contender::ExtproxyManifests) {
            Some(ManifestDir::write(&layout)?)
        } else {
            None
        };
        let plan = SizePlan {
            layout,
            manifests,
            api_netns: api_netns.as_ref(),
            clusters: &clusters,
        };
        for round in 0..opts.rounds {
            for contender in rotated(&running, round) {
                let rows = run_one(opts, &plan, contender, round, Wire::FullChecksums)
                    .with_context(|| format!("{contender} with {n} Services, round {round}"))?;
                results.records.extend(rows);
            }
        }
        if opts.offload_sizes.contains(&n) && opts.measures.contains(&Measure::TcpThroughputOffload)
        {
            for round in 0..opts.offload_rounds {
                for contender in rotated(&running, round) {
                    let rows = run_one(opts, &plan, contender, round, Wire::Offloads)
                        .with_context(|| {
                            format!("{contender} with {n} Services, round {round}, offloads on")
                        })?;
                    results.records.extend(rows);
                }
            }
        }
    }
    Ok(results)
}

/// The node's end of the pod's veth, named as the bridge, Flannel and most CNIs name theirs
/// (`veth` and a suffix): extproxy's default `--pod-ifaces` (veth*, cali*, lxc*, ...) finds it
/// as it finds a real cluster's pods, and translates their packets as they leave the pod.
/// Named `pod0`, which no CNI uses, it was left to the uplink's TC egress, behind the kernel's
/// forwarding: a path the default does not give a pod in a real cluster.
const POD_LINK: &str = "vethpod0";

/// The contenders in the order of `round`: each round starts one later, so none always runs
/// first (or on a warmer machine).
fn rotated(running: &[Contender], round: usize) -> Vec<Contender> {
    running
        .iter()
        .cycle()
        .skip(round % running.len().max(1))
        .take(running.len())
        .copied()
        .collect()
}

/// What every run at one size shares.
struct SizePlan<'a> {
    layout: Layout,
    /// Manifest mode's files (only when `extproxy-manifests` runs).
    manifests: Option<ManifestDir>,
    api_netns: Option<&'a ApiNetns>,
    clusters: &'a [Cluster],
}

impl SizePlan<'_> {
    fn cluster(&self, flavor: Flavor) -> Result<&Cluster> {
        self.clusters
            .iter()
            .find(|c| c.flavor == flavor)
            .context("the cluster was not started")
    }
}

/// Where the clients send their traffic, and what the endpoints must see.
pub(crate) struct Routes {
    /// The four-endpoint Service (direct: the four endpoints in turn).
    pub four: Vec<SocketAddr>,
    /// The one-endpoint Service (direct: that endpoint).
    pub one: SocketAddr,
    pub udp: SocketAddr,
    /// The endpoints see the node's address rather than the clients'.
    pub snat: bool,
}

impl Routes {
    fn new(contender: Contender, layout: &Layout) -> Self {
        let service = |ip: Ipv4Addr| SocketAddr::new(IpAddr::V4(ip), SERVICE_PORT);
        let endpoint = |ip: Ipv4Addr| SocketAddr::new(IpAddr::V4(ip), ENDPOINT_PORT);
        match contender {
            Contender::Direct => Routes {
                four: ENDPOINTS.iter().map(|ip| endpoint(*ip)).collect(),
                one: endpoint(layout::ONE_ENDPOINT),
                udp: endpoint(ENDPOINTS[0]),
                snat: false,
            },
            _ => Routes {
                four: vec![service(layout.four_target())],
                one: service(layout.one_target()),
                udp: service(layout.four_target()),
                snat: contender.snat(),
            },
        }
    }

    /// The sources the endpoints may see from `clients`.
    pub fn sources(&self, clients: &[IpAddr]) -> BTreeSet<IpAddr> {
        if self.snat {
            BTreeSet::from([NODE.parse().expect("an address")])
        } else {
            clients.iter().copied().collect()
        }
    }
}

/// A contender running on a topology.
struct Started {
    process: Option<Process>,
    detail: String,
    /// From the process's start to the first answer through the one-endpoint Service.
    first_answer: Option<Duration>,
}

fn run_one(
    opts: &TrafficOpts,
    plan: &SizePlan<'_>,
    contender: Contender,
    round: usize,
    wire: Wire,
) -> Result<Vec<Record>> {
    let n = plan.layout.services;
    let offload = wire == Wire::Offloads;
    let measures = opts.measures_at(contender, n, offload);
    // Everything else on the machine (a build, another benchmark, the kernel still tearing down
    // the previous run's namespaces) takes CPU from the path under test: wait for it to calm
    // down, and say in the records how busy it was.
    let busy = wait_for_quiet(opts.quiet_wait)?;
    let topo = Topology::with_links("bench", wire, POD_LINK);
    // The fourth endpoint, and a route back to the pods for the contenders that do not SNAT
    // (for the others it turns a missing SNAT into a visible wrong source instead of a hang).
    topo.ext.sh(&format!(
        "ip addr add {}/32 dev lo; ip route add 10.244.0.0/16 via {NODE}",
        ENDPOINTS[3]
    ));
    topo.pod.sh(&format!("ip addr add {PROBER}/24 dev eth0"));
    let endpoint_ips: Vec<IpAddr> = ENDPOINTS.iter().map(|ip| IpAddr::V4(*ip)).collect();
    let server = LoadServer::start(&topo.ext.name, ENDPOINT_PORT, &endpoint_ips, opts.threads)
        .context("starting the load server in the outside namespace")?;
    let many = measures
        .iter()
        .any(|m| matches!(m, Measure::ManyClients | Measure::ManyClientsMax));
    let clients = if many {
        add_clients(&topo, opts.many_clients)?
    } else {
        Vec::new()
    };
    let routes = Routes::new(contender, &plan.layout);
    let flags = contender.flags(opts);
    // A contender that does not start or carry traffic is a result too: every measure of the
    // run is reported as failed, with why.
    let failed_run = |e: anyhow::Error| -> Vec<Record> {
        let why = format!("{e:#}");
        if opts.verbose {
            eprintln!("[traffic] round {round}, {n} Services, {contender}: FAILED: {why}");
        }
        measures
            .iter()
            .map(|&m| Record {
                failed: Some(why.clone()),
                flags: flags.clone(),
                ..Record::blank(contender, m, n, round)
            })
            .collect()
    };
    let mut started = match start(opts, plan, contender, &topo, &routes) {
        Ok(started) => started,
        Err(e) => return Ok(failed_run(e)),
    };
    let mut our_pids: Vec<u32> = started.process.iter().map(Process::pid).collect();
    our_pids.extend(plan.clusters.iter().flat_map(Cluster::pids));
    let detail = format!(
        "{}; CPU {:.0} % busy before the run",
        started.detail,
        busy * 100.0
    );
    if opts.verbose {
        let first = started
            .first_answer
            .map(|d| format!(", first answer {:.0} ms after start", d.as_secs_f64() * 1e3))
            .unwrap_or_default();
        eprintln!(
            "[traffic] round {round}, {n} Services, {contender}{}{first} ({detail})",
            if offload { ", offloads on" } else { "" },
        );
    }
    let pod = &topo.pod.name;
    let pod_ip: IpAddr = POD.parse()?;
    if let Err(e) = measures::warm_up(pod, &routes, &server, &[pod_ip]) {
        return Ok(failed_run(e.context(format!(
            "no working path through {contender} ({detail})"
        ))));
    }

    let mut records = Vec::new();
    let base = |measure: Measure| Record {
        flags: flags.clone(),
        detail: detail.clone(),
        ..Record::blank(contender, measure, n, round)
    };
    let ctx = measures::Ctx {
        opts,
        pod,
        pod_ip,
        routes: &routes,
        server: &server,
        clients: &clients,
        topo: &topo,
    };
    for &measure in &measures {
        let record = match measure {
            Measure::FirstAnswer => {
                let Some(d) = started.first_answer else {
                    continue;
                };
                Record {
                    value: d.as_secs_f64() * 1e3,
                    count: 1,
                    ..base(measure)
                }
            }
            _ => {
                let meter = cpu::CpuMeter::start(&our_pids)?;
                let result = if measure == Measure::ProgrammingLatency {
                    let cluster = plan.cluster(contender.cluster().context("no API server")?)?;
                    measures::programming_latency(
                        &ctx,
                        cluster,
                        &plan.layout,
                        started.first_answer,
                        base(measure),
                    )
                    .map(|r| Record {
                        note: measures::own_programming_metric(&topo, contender),
                        ..r
                    })
                } else {
                    measures::measure_one(&ctx, measure, base(measure))
                };
                // A measure the contender cannot complete is a result (reported as failed, with
                // why), not the end of a benchmark that may have run for hours.
                let record = result.unwrap_or_else(|e| Record {
                    failed: Some(format!("{e:#}")),
                    ..base(measure)
                });
                Record {
                    others_cpu: meter.others_share()?,
                    ..record
                }
            }
        };
        if opts.verbose {
            eprintln!("[traffic]   {}", summary(&record));
        }
        records.push(record);
        if let Some(process) = started.process.as_mut() {
            process.check_alive()?;
        }
    }
    if let Some(mut process) = started.process.take() {
        process.stop();
        if let Some(dir) = std::env::var_os("XP_TRAFFIC_LOGS") {
            // Keep the contender's log (the topology's directory goes with it).
            let name = format!(
                "{contender}-{n}-round{round}{}.log",
                if offload { "-offloads" } else { "" }
            );
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::copy(&process.log, std::path::Path::new(&dir).join(name));
        }
        check_log(contender, &process)?;
    }
    Ok(records)
}

/// Adds `count` client addresses (10.244.1.1..) to the pod and routes them on the node.
fn add_clients(topo: &Topology, count: usize) -> Result<Vec<IpAddr>> {
    ensure!(count <= 250 * 256, "too many client addresses");
    let clients: Vec<IpAddr> = (0..count)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::new(
                10,
                244,
                1 + (i / 250) as u8,
                1 + (i % 250) as u8,
            ))
        })
        .collect();
    let batch: String = clients
        .iter()
        .map(|c| format!("addr add {c}/32 dev eth0\n"))
        .collect();
    let file = topo.dir.join("clients.batch");
    std::fs::write(&file, batch)?;
    let status = std::process::Command::new("ip")
        .args(["-n", &topo.pod.name, "-batch"])
        .arg(&file)
        .status()?;
    ensure!(status.success(), "adding the client addresses to the pod");
    topo.node
        .sh(&format!("ip route add 10.244.1.0/24 dev {}", topo.pod_link));
    if count > 250 {
        topo.node.sh(&format!(
            "ip route add 10.244.0.0/16 dev {} metric 100",
            topo.pod_link
        ));
    }
    Ok(clients)
}

/// Starts (or programs) the contender on the node; for a process, waits until it answers
/// through the one-endpoint Service, timing that from its start, and through the
/// four-endpoint one.
fn start(
    opts: &TrafficOpts,
    plan: &SizePlan<'_>,
    contender: Contender,
    topo: &Topology,
    routes: &Routes,
) -> Result<Started> {
    let n = plan.layout.services;
    let flags = contender.flags(opts);
    let label = if flags.is_empty() {
        "defaults".to_owned()
    } else {
        flags.join(" ")
    };
    match contender {
        Contender::Direct => Ok(Started {
            process: None,
            detail: "no rules; pod to endpoint addresses".into(),
            first_answer: None,
        }),
        Contender::IptablesLegacy | Contender::IptablesNft | Contender::Nftables => {
            let backend = match contender {
                Contender::IptablesLegacy => Some(Backend::Legacy),
                Contender::IptablesNft => Some(Backend::Nft),
                _ => None,
            };
            let detail = contenders::load_rules(topo, &plan.layout.bench_services(), backend)?;
            Ok(Started {
                process: None,
                detail: format!("hand-written kube-proxy rules through {detail}"),
                first_answer: None,
            })
        }
        _ => {
            if let Some(flavor) = contender.cluster() {
                let cluster = plan.cluster(flavor)?;
                plan.api_netns.context("no API namespace")?.link(topo);
                cluster.reset_target(&plan.layout)?;
            }
            let (process, detail) = spawn(opts, plan, contender, topo, &flags)?;
            let detail = format!("{detail} ({label})");
            let mut process = process;
            let first_answer = wait_for_answers(opts, n, topo, routes, &mut process)?;
            Ok(Started {
                process: Some(process),
                detail,
                first_answer: Some(first_answer),
            })
        }
    }
}

fn spawn(
    opts: &TrafficOpts,
    plan: &SizePlan<'_>,
    contender: Contender,
    topo: &Topology,
    flags: &[String],
) -> Result<(Process, String)> {
    if contender.is_extproxy() {
        let kubeconfig = match contender.cluster() {
            Some(flavor) => Some(plan.cluster(flavor)?.kubeconfig()),
            None => None,
        };
        let source = match &kubeconfig {
            Some(kubeconfig) => AgentSource::Kubernetes { kubeconfig },
            None => AgentSource::Manifests {
                dir: &plan
                    .manifests
                    .as_ref()
                    .context("manifests were not prepared")?
                    .path,
            },
        };
        let mode = match source {
            AgentSource::Kubernetes { .. } => "extproxy, Kubernetes mode",
            AgentSource::Manifests { .. } => "extproxy, manifest mode",
        };
        let process = contenders::start_extproxy(&opts.agent_bin, topo, source, flags)?;
        return Ok((process, mode.into()));
    }
    let (mode, masquerade_all) = contender.kube_proxy().context("not a kube-proxy")?;
    let cluster = plan.cluster(Flavor::KubeProxy)?;
    let bins = opts.k8s_bin.as_ref().context("no Kubernetes binaries")?;
    let args = contenders::kube_proxy_args(&cluster.kubeconfig(), mode, masquerade_all);
    let process = contenders::start_kube_proxy(&bins.join("kube-proxy"), topo, &args)?;
    let mode = match mode {
        ProxyMode::Iptables => "kube-proxy v1.36 iptables mode (iptables-nft)",
        ProxyMode::Nftables => "kube-proxy v1.36 nftables mode",
    };
    Ok((process, mode.into()))
}

/// Probes the one-endpoint Service from the pod while the process starts: the time from its
/// start to the first answer. Then waits for the four-endpoint Service too.
fn wait_for_answers(
    opts: &TrafficOpts,
    services: usize,
    topo: &Topology,
    routes: &Routes,
    process: &mut Process,
) -> Result<Duration> {
    let timeout = opts.start_timeout(services);
    let deadline = process.started + timeout;
    let pod = topo.pod.name.as_str();
    let first = probe_until(pod, routes.one, deadline, process)?.with_context(|| {
        format!(
            "{} did not answer through {} within {timeout:?}; the end of its log:\n{}",
            process.name,
            routes.one,
            tail(&process.log_text(), 30)
        )
    })?;
    let first_answer = first.finished.saturating_duration_since(process.started);
    probe_until(pod, routes.four[0], deadline, process)?.with_context(|| {
        format!(
            "{} answered through {} but not through {} within {timeout:?}",
            process.name, routes.one, routes.four[0]
        )
    })?;
    Ok(first_answer)
}

/// The first answer through `target` before `deadline`, watching that `process` stays alive.
fn probe_until(
    pod: &str,
    target: SocketAddr,
    deadline: Instant,
    process: &mut Process,
) -> Result<Option<load::Probe>> {
    probe_until_from(
        pod,
        PROBER.into(),
        target,
        deadline,
        std::slice::from_mut(process),
    )
}

/// The first answer through `target` from `source` before `deadline`, watching that every one
/// of `processes` stays alive.
fn probe_until_from(
    pod: &str,
    source: IpAddr,
    target: SocketAddr,
    deadline: Instant,
    processes: &mut [Process],
) -> Result<Option<load::Probe>> {
    let gave_up = AtomicBool::new(false);
    std::thread::scope(|s| {
        let prober = s.spawn(|| {
            load::first_answer(pod, target, Some(source), Duration::from_millis(2), || {
                !gave_up.load(Ordering::Relaxed) && Instant::now() < deadline
            })
        });
        while !prober.is_finished() {
            if let Err(e) = processes.iter_mut().try_for_each(Process::check_alive) {
                gave_up.store(true, Ordering::Relaxed);
                let _ = prober.join();
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(prober.join().expect("the prober panicked")?)
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Fails the run if the contender's log reports errors.
fn check_log(contender: Contender, process: &Process) -> Result<()> {
    let errors = if contender.is_kube_proxy() {
        process.log_errors(
            contenders::kube_proxy_error,
            contenders::KUBE_PROXY_EXPECTED_ERRORS,
        )
    } else {
        process.log_errors(contenders::extproxy_error, &[])
    };
    ensure!(
        errors.is_empty(),
        "{} logged errors ({}):\n{}",
        process.name,
        process.log.display(),
        errors.join("\n")
    );
    Ok(())
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
    if let Some(why) = &r.failed {
        return format!("{:<28} FAILED: {why}", r.measure.name());
    }
    let mut s = format!("{:<28} {:>10.2} {}", r.measure.name(), r.value, r.unit);
    if let (Some(p50), Some(p99)) = (r.p50_us, r.p99_us) {
        s += &format!("  p50 {p50:.0} us  p99 {p99:.0} us");
    }
    if let Some(offered) = r.offered {
        s += &format!("  offered {offered:.0}/s");
    }
    if let Some(loss) = r.loss {
        s += &format!("  loss {:.1} %", loss * 100.0);
    }
    if r.errors > 0 {
        s += &format!("  errors {}", r.errors);
        if r.measure == Measure::ProgrammingLatency
            && let Some((_, how)) = r.detail.split_once("failed during the switches: ")
        {
            s += &format!(" ({how})");
        }
    }
    if let Some(stalled) = r.stalled.filter(|s| *s > 0) {
        s += &format!("  stalled {stalled}");
    }
    if let Some(note) = &r.note {
        s += &format!("  ({note})");
    }
    if r.others_cpu > 0.05 {
        s += &format!("  (others used {:.0} % of the CPU)", r.others_cpu * 100.0);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> TrafficOpts {
        TrafficOpts::quick(PathBuf::new(), Some(PathBuf::new()))
    }

    #[test]
    fn every_reported_contender_that_does_not_run_says_why() {
        let o = opts();
        assert_eq!(o.not_run(Contender::Extproxy, 10_000), None);
        assert_eq!(o.not_run(Contender::KubeProxyIptables, 1_000), None);
        let why = o.not_run(Contender::KubeProxyNftables, 10_000).unwrap();
        assert!(why.contains("quick mode"), "{why}");
        let why = o.not_run(Contender::ExtproxyTuned, 1).unwrap();
        assert!(why.contains("quick mode"), "{why}");
        let no_bins = TrafficOpts {
            k8s_bin: None,
            ..opts()
        };
        let why = no_bins.not_run(Contender::KubeProxyIptables, 1).unwrap();
        assert!(why.contains("no Kubernetes binaries"), "{why}");
        assert_eq!(no_bins.not_run(Contender::Direct, 1), None);
        let full = TrafficOpts::full(PathBuf::new(), Some(PathBuf::new()));
        for c in Contender::REPORTED {
            assert_eq!(full.not_run(c, 10_000), None, "{c}");
        }
    }

    #[test]
    fn measures_follow_the_contender_and_the_size() {
        let o = opts();
        let direct = o.measures_at(Contender::Direct, 1_000, false);
        assert!(!direct.contains(&Measure::FirstAnswer));
        assert!(!direct.contains(&Measure::ProgrammingLatency));
        assert!(!direct.contains(&Measure::TcpThroughputOffload));
        let kp = o.measures_at(Contender::KubeProxyIptables, 1_000, false);
        assert!(kp.contains(&Measure::FirstAnswer));
        assert!(kp.contains(&Measure::ProgrammingLatency));
        assert!(
            !o.measures_at(Contender::Extproxy, 1, false)
                .contains(&Measure::ProgrammingLatency)
        );
        assert_eq!(
            o.measures_at(Contender::Extproxy, 1, true),
            vec![Measure::TcpThroughputOffload]
        );
    }

    #[test]
    fn only_the_default_kube_proxy_rows_keep_the_clients_address() {
        for c in Contender::ALL {
            let keeps = matches!(
                c,
                Contender::Direct | Contender::KubeProxyIptables | Contender::KubeProxyNftables
            );
            assert_eq!(!c.snat(), keeps, "{c}");
        }
        let o = opts();
        assert_eq!(
            Contender::KubeProxyIptablesMasq.flags(&o),
            vec!["--masquerade-all"]
        );
        assert!(Contender::Extproxy.flags(&o).is_empty());
        assert_eq!(Contender::ExtproxyTuned.flags(&o), o.tuned_args);
    }

    #[test]
    fn names_round_trip() {
        for c in Contender::ALL {
            assert_eq!(Contender::from_name(c.name()), Some(c));
            assert_eq!(serde_json::to_value(c).unwrap(), c.name());
        }
        for m in Measure::ALL {
            assert_eq!(Measure::from_name(m.name()), Some(m));
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
        }
    }

    /// `$EXTPROXY_BIN`, or the release agent built now.
    fn agent_bin() -> Result<PathBuf> {
        match std::env::var_os("EXTPROXY_BIN") {
            Some(p) => Ok(PathBuf::from(p)),
            None => crate::build_agent(true),
        }
    }

    fn k8s_bin() -> Result<Option<PathBuf>> {
        crate::k8s::binaries(&crate::workspace_root())
    }

    /// A tiny end-to-end run: every quick contender, one Service, every measure briefly.
    /// `cargo test -p xtask -- --ignored traffic_smoke --nocapture` (as root; uses
    /// $EXTPROXY_BIN or builds the release agent; the Kubernetes binaries as `cargo xtask
    /// test` finds them). `XP_TRAFFIC_*` narrow it (TRAFFIC.md).
    #[test]
    #[ignore = "needs root; creates network namespaces, runs the agent, kube-proxy and an API server"]
    fn traffic_smoke() -> Result<()> {
        let half = Duration::from_millis(500);
        let mut opts = TrafficOpts {
            sizes: vec![1],
            connection_time: half,
            sustain_time: half,
            request_time: half,
            stream_time: half,
            offload_time: half,
            offload_rounds: 1,
            udp_time: half,
            latency_time: half,
            many_clients_time: Duration::from_secs(1),
            programming_samples: 2,
            programming_min_services: 1,
            ..TrafficOpts::quick(agent_bin()?, k8s_bin()?)
        };
        opts.apply_env()?;
        let results = run(&opts)?;
        for r in &results.records {
            println!("{}", r.to_json());
        }
        for r in results.records.iter().filter(|r| r.not_run.is_none()) {
            assert!(r.failed.is_none(), "{} {}", r.contender, summary(r));
            assert!(r.value.is_finite() && r.value > 0.0, "{}", summary(r));
        }
        for c in &opts.contenders {
            assert!(
                results
                    .records
                    .iter()
                    .any(|r| r.contender == *c && r.not_run.is_none()),
                "{c} has no results"
            );
        }
        Ok(())
    }

    /// The quick mode on its own: `cargo test -p xtask -- --ignored traffic_quick --nocapture`
    /// (as root). For profiling one case, narrow it: `XP_TRAFFIC_CONTENDERS=extproxy,direct
    /// XP_TRAFFIC_SIZES=10000 XP_TRAFFIC_MEASURES=new_connections XP_TRAFFIC_SECS=20`;
    /// `XP_TRAFFIC_FULL=1` starts from the full mode instead.
    #[test]
    #[ignore = "needs root; about ten minutes"]
    fn traffic_quick() -> Result<()> {
        let mut opts = if std::env::var_os("XP_TRAFFIC_FULL").is_some() {
            TrafficOpts::full(agent_bin()?, k8s_bin()?)
        } else {
            TrafficOpts::quick(agent_bin()?, k8s_bin()?)
        };
        opts.apply_env()?;
        let started = Instant::now();
        let results = run(&opts)?;
        println!(
            "traffic benchmark took {:.0} s",
            started.elapsed().as_secs_f64()
        );
        for f in &results.fills {
            println!("{}", serde_json::to_string(f)?);
        }
        for r in &results.records {
            println!("{}", r.to_json());
        }
        Ok(())
    }
}
