//! The cluster egress part of `cargo xtask bench` (issue 12): what a flow through the gateway
//! costs beside the same Service served on the pod's own node and beside no proxy at all.
//!
//! Every run builds `testbed`'s three-node LAN ([`Cluster`]): a pod behind node1, node2 the
//! static owner of the cluster egress address, node3 a second gateway, the outside host with the
//! endpoints. The contenders ([`Path`]) take turns, round after round, each on a fresh cluster.
//! Methodology: `TRAFFIC.md`, "Cluster egress".

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde::Serialize;
use testbed::{
    cluster::{Cluster, EP1, EP2, NODE_IPS, NODES_CIDR, POD},
    load::{self, LoadServer, OpStats},
};

use super::{
    ENDPOINT_PORT, Measure, SERVICE_PORT, STALL,
    contenders::{self, Process},
    cpu,
    measures::{check_sources, settle},
    probe_until_from, tail, wait_for_quiet,
};

/// The records' suite in bench.json.
pub const SUITE: &str = "cluster-egress";
/// The cluster egress address: on the nodes' segment, so the outside host finds its owner by ARP.
pub const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// The node that owns [`ADDR`] (0-based: node2).
const OWNER: usize = 1;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The pod's address for the readiness probes, apart from the load's (as in the traffic suite).
const PROBER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 200);
/// The records' Service count: one Service.
const SERVICES: usize = 1;
/// The agents' process names (their logs are `NAME.log` in the node's folder).
const AGENT_NAMES: [&str; 3] = ["extproxy-node1", "extproxy-node2", "extproxy-node3"];

/// The measures, in the order a run takes them.
pub const MEASURES: [Measure; 3] = [
    Measure::NewConnections,
    Measure::ConnectionLatency,
    Measure::TcpThroughput,
];

/// How the pod's flows reach the endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// pod -> ClusterIP of a Service annotated with the cluster egress address: node1 tunnels
    /// the flow to node2, which translates it (DNAT, SNAT to the address).
    Gateway,
    /// The same agents and Service without the annotation: node1 translates (SNAT to its own
    /// address), what a Service gets on one node.
    Local,
    /// No Service, no agent: the pod calls the endpoints' own addresses, node1 only routes.
    Direct,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Gateway, Path::Local, Path::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Path::Gateway => "gateway",
            Path::Local => "local",
            Path::Direct => "direct",
        }
    }

    pub fn from_name(name: &str) -> Option<Path> {
        Path::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Where the pod sends its flows (in turn).
    fn targets(self) -> Vec<SocketAddr> {
        match self {
            Path::Gateway | Path::Local => vec![SocketAddr::from((CLUSTER_IP, SERVICE_PORT))],
            Path::Direct => [EP1, EP2]
                .iter()
                .map(|ip| SocketAddr::new(ip.parse().expect("an address"), ENDPOINT_PORT))
                .collect(),
        }
    }

    /// The only source address the endpoints may see.
    fn source(self) -> IpAddr {
        match self {
            Path::Gateway => ADDR.into(),
            Path::Local => NODE_IPS[0].parse().expect("an address"),
            Path::Direct => POD.parse().expect("an address"),
        }
    }

    /// Node `i`'s flags beyond the agent's defaults and what the harness must pass (uplink,
    /// manifests, pins, state): the cluster egress setup of tests/tests/cluster_egress.rs, the
    /// same for both Service variants so that only the annotation differs.
    fn agent_flags(self, node: usize) -> Vec<String> {
        if self == Path::Direct {
            return Vec::new();
        }
        let mut flags: Vec<String> = [
            "--cluster-egress-ip".into(),
            ADDR.to_string(),
            "--cluster-egress-owner".into(),
            format!("{ADDR}={}", NODE_IPS[OWNER]),
            "--tunnel-peer".into(),
            NODES_CIDR.into(),
        ]
        .into();
        if node == 0 {
            // The pod program, as in Kubernetes mode (`--pod-ifaces auto` there).
            flags.extend(["--pod-ifaces".into(), "pod0".into()]);
        } else {
            flags.push("--egress-gateway".into());
        }
        flags
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One measurement: one path, one measure, one round (the same fields as the traffic suite's
/// records, so the report reads both alike).
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub contender: Path,
    pub measure: Measure,
    pub services: usize,
    /// 0-based.
    pub round: usize,
    /// In `unit`; NaN (null) when not run or failed.
    pub value: f64,
    pub unit: &'static str,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Connections or bytes.
    pub count: u64,
    /// Failed connections (refused, reset, answered short).
    pub errors: u64,
    /// Connections that waited for a resent SYN (longer than [`STALL`]).
    pub stalled: Option<u64>,
    pub seconds: f64,
    /// Share of both cores others (a build, another test) used during the measure.
    pub others_cpu: f64,
    /// node1's flags beyond the agent's defaults.
    pub flags: Vec<String>,
    pub detail: String,
    pub not_run: Option<String>,
    pub failed: Option<String>,
}

impl Record {
    fn blank(contender: Path, measure: Measure, round: usize) -> Self {
        Record {
            contender,
            measure,
            services: SERVICES,
            round,
            value: f64::NAN,
            unit: measure.unit(),
            p50_us: None,
            p99_us: None,
            count: 0,
            errors: 0,
            stalled: None,
            seconds: 0.0,
            others_cpu: 0.0,
            flags: contender.agent_flags(0),
            detail: String::new(),
            not_run: None,
            failed: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct EgressOpts {
    /// The release `extproxy` binary.
    pub agent_bin: PathBuf,
    pub rounds: usize,
    pub contenders: Vec<Path>,
    /// New connections, 16 at a time.
    pub connection_time: Duration,
    /// One connection at a time.
    pub latency_time: Duration,
    /// One TCP stream.
    pub stream_time: Duration,
    pub workers: usize,
    /// Client and server threads each (one per core).
    pub threads: usize,
    /// How long a run waits for the machine to calm down before it starts.
    pub quiet_wait: Duration,
    /// From the agents' start to the first answer through the Service.
    pub start_timeout: Duration,
    pub verbose: bool,
}

impl EgressOpts {
    /// One round of short measures: well under a minute per contender.
    pub fn quick(agent_bin: PathBuf) -> Self {
        EgressOpts {
            agent_bin,
            rounds: 1,
            contenders: Path::ALL.to_vec(),
            connection_time: Duration::from_secs(3),
            latency_time: Duration::from_secs(1),
            stream_time: Duration::from_millis(1500),
            workers: 16,
            threads: 2,
            quiet_wait: Duration::from_secs(5),
            start_timeout: Duration::from_secs(60),
            verbose: true,
        }
    }

    /// Three rounds, the traffic suite's full-mode times.
    pub fn full(agent_bin: PathBuf) -> Self {
        EgressOpts {
            rounds: 3,
            connection_time: Duration::from_secs(10),
            latency_time: Duration::from_secs(5),
            stream_time: Duration::from_secs(5),
            quiet_wait: Duration::from_secs(30),
            ..EgressOpts::quick(agent_bin)
        }
    }

    /// `XP_EGRESS_CONTENDERS` (names, comma-separated), `XP_EGRESS_ROUNDS`, `XP_EGRESS_SECS`
    /// (every measure).
    pub fn apply_env(&mut self) -> Result<()> {
        if let Ok(names) = std::env::var("XP_EGRESS_CONTENDERS") {
            self.contenders = names
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| {
                    Path::from_name(n).with_context(|| {
                        format!(
                            "XP_EGRESS_CONTENDERS: unknown contender {n:?} (known: {})",
                            Path::ALL.map(Path::name).join(", ")
                        )
                    })
                })
                .collect::<Result<_>>()?;
        }
        if let Ok(rounds) = std::env::var("XP_EGRESS_ROUNDS") {
            self.rounds = rounds.parse().context("XP_EGRESS_ROUNDS")?;
        }
        if let Ok(secs) = std::env::var("XP_EGRESS_SECS") {
            let secs = Duration::from_secs_f64(secs.parse().context("XP_EGRESS_SECS")?);
            self.connection_time = secs;
            self.latency_time = secs;
            self.stream_time = secs;
        }
        Ok(())
    }

    fn duration(&self, measure: Measure) -> Duration {
        match measure {
            Measure::NewConnections => self.connection_time,
            Measure::ConnectionLatency => self.latency_time,
            _ => self.stream_time,
        }
    }
}

/// Every selected path, every round, interleaved: the order rotates by one each round. A path
/// that was not selected is reported as not run.
pub fn run(opts: &EgressOpts) -> Result<Vec<Record>> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the cluster egress benchmark needs root (network namespaces, eBPF)"
    );
    ensure!(
        opts.agent_bin.exists(),
        "{} not found: build it with `cargo build --release -p proxy-user`",
        opts.agent_bin.display()
    );
    let mut records = Vec::new();
    for path in Path::ALL {
        if !opts.contenders.contains(&path) {
            records.extend(MEASURES.map(|m| Record {
                not_run: Some("not selected (XP_EGRESS_CONTENDERS)".into()),
                ..Record::blank(path, m, 0)
            }));
        }
    }
    let running = &opts.contenders;
    for round in 0..opts.rounds {
        let order = running
            .iter()
            .cycle()
            .skip(round % running.len().max(1))
            .take(running.len());
        for &path in order {
            let rows =
                run_one(opts, path, round).with_context(|| format!("{path}, round {round}"))?;
            records.extend(rows);
        }
    }
    Ok(records)
}

/// The Service the pod calls: selector-less, port 80 -> 8080 on both endpoints, annotated with
/// the cluster egress address for the gateway.
fn service_yaml(annotated: bool) -> String {
    let annotation = if annotated {
        format!("\n  annotations:\n    extproxy.io/cluster-egress-ip: \"{ADDR}\"")
    } else {
        String::new()
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: partner
  namespace: bench{annotation}
spec:
  clusterIP: {CLUSTER_IP}
  ports:
    - {{name: http, port: {SERVICE_PORT}, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: partner-1
  namespace: bench
  labels: {{kubernetes.io/service-name: partner}}
addressType: IPv4
ports:
  - {{name: http, port: {ENDPOINT_PORT}, protocol: TCP}}
endpoints:
  - addresses: ["{EP1}"]
  - addresses: ["{EP2}"]
"#
    )
}

/// Starts every node's agent (nothing for `direct`).
fn start_agents(opts: &EgressOpts, cluster: &Cluster, path: Path) -> Result<Vec<Process>> {
    if path == Path::Direct {
        return Ok(Vec::new());
    }
    cluster.write_manifest("svc.yaml", &service_yaml(path == Path::Gateway));
    (0..3)
        .map(|i| {
            let dir = cluster.node_dir(i);
            let mut args: Vec<String> = vec![
                "run".into(),
                "--iface".into(),
                "up0".into(),
                "--manifests".into(),
                cluster.manifests().display().to_string(),
                "--pin-dir".into(),
                cluster.node_pin_dir(i).display().to_string(),
                "--state-dir".into(),
                dir.join("state").display().to_string(),
            ];
            args.extend(path.agent_flags(i));
            Process::spawn_in(
                AGENT_NAMES[i],
                &cluster.nodes[i].name,
                &dir,
                &opts.agent_bin,
                &args,
                &[("EXTPROXY_LOG", "info"), ("NO_COLOR", "1")],
                libc::SIGINT,
            )
        })
        .collect()
}

/// The end of every agent's log, for an error message.
fn logs(agents: &[Process]) -> String {
    agents
        .iter()
        .map(|a| format!("--- {}:\n{}", a.name, tail(&a.log_text(), 15)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the pod gets answers through the Service, then checks that the address is where
/// the path claims: on the owner's uplink only (gateway).
fn wait_until_served(
    opts: &EgressOpts,
    cluster: &Cluster,
    path: Path,
    agents: &mut [Process],
) -> Result<()> {
    let started = Instant::now();
    let deadline = started + opts.start_timeout;
    let target = path.targets()[0];
    let answered = probe_until_from(&cluster.pod.name, PROBER.into(), target, deadline, agents)?;
    ensure!(
        answered.is_some(),
        "no answer through {target} within {:?}; the agents' logs:\n{}",
        opts.start_timeout,
        logs(agents)
    );
    if path == Path::Gateway {
        for (i, node) in cluster.nodes.iter().enumerate() {
            let has = node
                .sh("ip -4 -o addr show dev up0")
                .contains(&format!(" {ADDR}/"));
            ensure!(
                has == (i == OWNER),
                "{ADDR} {} node{}'s uplink",
                if has { "is on" } else { "is not on" },
                i + 1
            );
        }
    }
    Ok(())
}

/// Short connections until both endpoints answered (neighbour entries resolved, programs warm),
/// every one from the path's source address.
fn warm_up(pod: &str, path: Path, server: &LoadServer) -> Result<()> {
    settle(server);
    let before = server.tcp_tally();
    let stats = load::connection_rate(pod, &path.targets(), 4, 1, Duration::from_millis(500))?;
    let seen = server.tcp_tally().since(&before);
    ensure!(
        stats.ops > 0,
        "no connection completed in 0.5 s ({} failed)",
        stats.errors
    );
    check_sources(&seen, &BTreeSet::from([path.source()]), "TCP")?;
    ensure!(
        seen.by_endpoint.len() == 2,
        "connections reached only {:?}, not both endpoints",
        seen.by_endpoint
    );
    Ok(())
}

fn from_ops(stats: &OpStats, base: Record) -> Record {
    Record {
        value: stats.per_second(),
        p50_us: stats.latency_us(0.50),
        p99_us: stats.latency_us(0.99),
        count: stats.ops,
        errors: stats.errors,
        stalled: Some(stats.slower_than(STALL)),
        seconds: stats.elapsed.as_secs_f64(),
        ..base
    }
}

/// One measure through `path`, checked: the endpoints accepted every connection the client
/// completed, all from the path's source address.
fn measure_one(
    opts: &EgressOpts,
    pod: &str,
    path: Path,
    server: &LoadServer,
    measure: Measure,
    base: Record,
) -> Result<Record> {
    let duration = opts.duration(measure);
    let targets = path.targets();
    settle(server);
    let before = server.tcp_tally();
    let record = match measure {
        Measure::NewConnections => {
            let stats = load::connection_rate(pod, &targets, opts.workers, opts.threads, duration)?;
            let seen = server.tcp_tally().since(&before);
            ensure!(
                seen.total() >= stats.ops,
                "the endpoints accepted {} connections, the client completed {}",
                seen.total(),
                stats.ops
            );
            from_ops(&stats, base)
        }
        Measure::ConnectionLatency => {
            let stats = load::connection_rate(pod, &targets, 1, 1, duration)?;
            Record {
                value: stats
                    .latency_us(0.99)
                    .context("not one connection completed")?,
                ..from_ops(&stats, base)
            }
        }
        Measure::TcpThroughput => {
            let (bytes, elapsed) = load::tcp_stream(pod, targets[0], duration)?;
            Record {
                value: bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
                count: bytes,
                seconds: elapsed.as_secs_f64(),
                ..base
            }
        }
        other => anyhow::bail!("{other} is not a cluster egress measure"),
    };
    check_sources(
        &server.tcp_tally().since(&before),
        &BTreeSet::from([path.source()]),
        "TCP",
    )?;
    Ok(record)
}

/// One path on a fresh cluster: every measure, or every measure failed with why.
fn run_one(opts: &EgressOpts, path: Path, round: usize) -> Result<Vec<Record>> {
    let busy = wait_for_quiet(opts.quiet_wait)?;
    // Takes the machine lock; removes namespaces and pins when dropped, pass or fail. Declared
    // before the server and the agents: they go first.
    let cluster = Cluster::new("bce");
    cluster.pod.sh(&format!("ip addr add {PROBER}/24 dev eth0"));
    if path == Path::Direct {
        // The endpoints answer the pod's own address: the way back is through node1.
        cluster
            .ext
            .sh(&format!("ip route add 10.244.1.0/24 via {}", NODE_IPS[0]));
    }
    let server = LoadServer::start(&cluster.ext.name, ENDPOINT_PORT, &[], opts.threads)
        .context("starting the load server on the outside host")?;
    let failed_run = |e: anyhow::Error| -> Vec<Record> {
        let why = format!("{e:#}");
        if opts.verbose {
            eprintln!("[cluster-egress] round {round}, {path}: FAILED: {why}");
        }
        MEASURES
            .map(|m| Record {
                failed: Some(why.clone()),
                ..Record::blank(path, m, round)
            })
            .to_vec()
    };
    let mut agents = match start_agents(opts, &cluster, path) {
        Ok(agents) => agents,
        Err(e) => return Ok(failed_run(e)),
    };
    if !agents.is_empty()
        && let Err(e) = wait_until_served(opts, &cluster, path, &mut agents)
    {
        return Ok(failed_run(e));
    }
    let pod = cluster.pod.name.as_str();
    if let Err(e) = warm_up(pod, path, &server) {
        return Ok(failed_run(e.context(format!(
            "no working path ({path}); the agents' logs:\n{}",
            logs(&agents)
        ))));
    }
    let detail = match path {
        Path::Gateway => format!(
            "pod -> {CLUSTER_IP}:{SERVICE_PORT}, tunnelled to node2, from {ADDR}; node2 and node3 \
             with --egress-gateway; CPU {:.0} % busy before the run",
            busy * 100.0
        ),
        Path::Local => format!(
            "pod -> {CLUSTER_IP}:{SERVICE_PORT} (no annotation), from node1's address; CPU {:.0} \
             % busy before the run",
            busy * 100.0
        ),
        Path::Direct => format!(
            "pod -> {EP1}, {EP2}:{ENDPOINT_PORT}, no agent; CPU {:.0} % busy before the run",
            busy * 100.0
        ),
    };
    if opts.verbose {
        eprintln!("[cluster-egress] round {round}, {path} ({detail})");
    }
    let our_pids: Vec<u32> = agents.iter().map(Process::pid).collect();
    let mut records = Vec::new();
    for measure in MEASURES {
        let base = Record {
            seconds: opts.duration(measure).as_secs_f64(),
            detail: detail.clone(),
            ..Record::blank(path, measure, round)
        };
        let meter = cpu::CpuMeter::start(&our_pids)?;
        let record =
            measure_one(opts, pod, path, &server, measure, base.clone()).unwrap_or_else(|e| {
                Record {
                    failed: Some(format!("{e:#}")),
                    ..base
                }
            });
        let record = Record {
            others_cpu: meter.others_share()?,
            ..record
        };
        if opts.verbose {
            eprintln!("[cluster-egress]   {}", summary(&record));
        }
        records.push(record);
        for agent in &mut agents {
            agent.check_alive()?;
        }
    }
    for mut agent in agents {
        agent.stop();
        let errors = agent.log_errors(contenders::extproxy_error, &[]);
        ensure!(
            errors.is_empty(),
            "{} logged errors ({}):\n{}",
            agent.name,
            agent.log.display(),
            errors.join("\n")
        );
    }
    Ok(records)
}

fn summary(r: &Record) -> String {
    if let Some(why) = &r.failed {
        return format!("{:<20} FAILED: {why}", r.measure.name());
    }
    let mut s = format!("{:<20} {:>10.2} {}", r.measure.name(), r.value, r.unit);
    if let (Some(p50), Some(p99)) = (r.p50_us, r.p99_us) {
        s += &format!("  p50 {p50:.0} us  p99 {p99:.0} us");
    }
    if r.errors > 0 {
        s += &format!("  errors {}", r.errors);
    }
    if let Some(stalled) = r.stalled.filter(|s| *s > 0) {
        s += &format!("  stalled {stalled}");
    }
    if r.others_cpu > 0.05 {
        s += &format!("  (others used {:.0} % of the CPU)", r.others_cpu * 100.0);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_gateway_service_is_annotated_and_only_agents_get_flags() {
        assert!(service_yaml(true).contains(&format!("extproxy.io/cluster-egress-ip: \"{ADDR}\"")));
        assert!(!service_yaml(false).contains("cluster-egress"));
        assert!(Path::Direct.agent_flags(0).is_empty());
        for path in [Path::Gateway, Path::Local] {
            let node1 = path.agent_flags(0).join(" ");
            assert!(node1.contains("--pod-ifaces pod0"), "{node1}");
            assert!(!node1.contains("--egress-gateway"), "{node1}");
            let node2 = path.agent_flags(1).join(" ");
            assert!(node2.contains("--egress-gateway"), "{node2}");
            assert!(
                node2.contains(&format!("--cluster-egress-owner {ADDR}=10.0.0.2")),
                "{node2}"
            );
        }
        assert_eq!(
            Path::Gateway.agent_flags(0),
            Path::Local.agent_flags(0),
            "the two Service variants run the same agents"
        );
    }

    #[test]
    fn each_path_has_its_own_source_and_targets() {
        assert_eq!(Path::Gateway.source(), IpAddr::V4(ADDR));
        assert_eq!(Path::Local.source().to_string(), NODE_IPS[0]);
        assert_eq!(Path::Direct.source().to_string(), POD);
        assert_eq!(Path::Direct.targets().len(), 2);
        assert_eq!(Path::Gateway.targets(), Path::Local.targets());
        for p in Path::ALL {
            assert_eq!(Path::from_name(p.name()), Some(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
    }

    /// The section alone, as `cargo xtask bench --only cluster-egress --quick` runs it:
    /// `cargo test -p xtask -- --ignored cluster_egress_quick --nocapture` (as root; uses
    /// $EXTPROXY_BIN or builds the release agent). `XP_EGRESS_*` narrow it.
    #[test]
    #[ignore = "needs root; creates network namespaces, runs three agents"]
    fn cluster_egress_quick() -> Result<()> {
        let bin = match std::env::var_os("EXTPROXY_BIN") {
            Some(p) => PathBuf::from(p),
            None => crate::build_agent(true)?,
        };
        let mut opts = EgressOpts::quick(bin);
        opts.apply_env()?;
        let records = run(&opts)?;
        for r in &records {
            println!("{}", serde_json::to_string(r)?);
        }
        for r in records.iter().filter(|r| r.not_run.is_none()) {
            assert!(r.failed.is_none(), "{} {}", r.contender, summary(r));
            assert!(r.value.is_finite() && r.value > 0.0, "{}", summary(r));
        }
        Ok(())
    }
}
