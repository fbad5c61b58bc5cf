//! What the agent tells the outside: `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! [`Telemetry`] is the shared, cheap-to-update record the control loop writes (API connection,
//! sync state, latencies, object counts). Data path statistics come from the pinned maps through a
//! separate [`DatapathReader`] with its own file descriptors, so a scrape never waits for the
//! control loop and the control loop never waits for a scrape; walking conntrack is cached for
//! [`DATAPATH_STATS_TTL`] because a full table is a million syscalls.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use proxy_common::{
    Counter, CtKey, CtValue, MAP_CT, MAP_CT_NEW, MAP_REVNAT, RevNatKey, RevNatValue, ServiceStats,
    user::{port_host, proto_name},
};
use thiserror::Error;
use tokio::net::TcpListener;

use crate::agent::Applied;
use crate::diag::Severity;
use crate::gc::GcReport;
use crate::maps::{DatapathMaps, MapsError};
use crate::refusals::RefusalKey;
use crate::translate::{ClaimReason, ServicePortKey, Translation};

/// Where `extproxy run` serves health and metrics in Kubernetes mode unless told otherwise.
pub const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:9464";

/// Data path statistics are collected at most this often; scrapes in between get the last ones.
pub const DATAPATH_STATS_TTL: Duration = Duration::from_secs(5);

/// The watched API resources, in the order readiness names them.
pub const API_RESOURCES: [&str; 3] = ["services", "endpointslices", "nodes"];

/// Bounds of the latency histograms, seconds. kube-proxy's start at 0.25 s; extproxy programs in
/// milliseconds, so the low end is finer.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("{0}")]
    Maps(#[from] MapsError),
    #[error("pinned map {}: {source}", path.display())]
    Pinned {
        path: std::path::PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the data path statistics task failed: {0}")]
    Task(String),
}

// ---------------------------------------------------------------------------------------------
// Telemetry: what the control loop records
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; LATENCY_BUCKETS.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: Duration) {
        let v = value.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Clone, Debug)]
enum ApiState {
    /// No request answered yet.
    Unknown,
    Connected,
    Failed(String),
}

#[derive(Debug)]
struct Inner {
    /// Set by the source while it cannot program yet (initial list incomplete, Node missing).
    waiting: Option<String>,
    programmed: bool,
    api: BTreeMap<&'static str, ApiState>,
    api_errors: BTreeMap<&'static str, u64>,
    /// When the first of the watched resources lost the API server (None while all are fine).
    outage_since: Option<Instant>,
    heartbeat: Instant,
    objects: BTreeMap<&'static str, u64>,
    claimed_by_label: u64,
    claimed_selectorless: u64,
    service_ports: u64,
    diagnostics: BTreeMap<Severity, u64>,
    programming: Histogram,
    sync: Histogram,
    syncs: u64,
    map_updates: u64,
    map_errors: u64,
    events: BTreeMap<String, u64>,
    event_errors: u64,
    ct_expired: u64,
    ct_frontend_removed: u64,
    nat_orphans: u64,
    /// None outside of `--pod-ifaces` (the gauge is not shown then).
    pod_interfaces: Option<usize>,
    /// Which Service port each service id is, to name the per-service rows.
    service_names: Vec<(u32, ServicePortKey)>,
    /// New flows the data path refused for want of room, by problem (see `refusals`).
    refused: Vec<(RefusalKey, u64)>,
    /// The DNS names' families, rendered by `dns::report::metrics` (empty without FQDN
    /// endpoints).
    dns: String,
    /// Health checking's own metrics, rendered at scrape time.
    health: Option<Arc<Mutex<crate::health::HealthMetrics>>>,
    /// None unless cluster egress addresses are declared.
    cluster_egress: Option<ClusterEgressTelemetry>,
}

/// Who owns a cluster egress address, as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressOwnership {
    pub address: IpAddr,
    /// The owner's node name (manifest mode: its address); None: nobody.
    pub owner: Option<String>,
    /// This node owns it.
    pub local: bool,
    /// This node holds its Lease but could not renew it in time: the address is off its uplink.
    pub fenced: bool,
}

#[derive(Clone, Debug, Default)]
struct ClusterEgressTelemetry {
    owners: Vec<EgressOwnership>,
    failovers: BTreeMap<IpAddr, u64>,
    tunnel_peers: usize,
}

/// Shared record of the agent's state for probes and metrics.
#[derive(Debug)]
pub struct Telemetry {
    inner: Mutex<Inner>,
    /// /healthz fails when the control loop has not checked in for this long.
    stall_after: Duration,
}

impl Telemetry {
    /// `stall_after`: how long the control loop may stay silent before /healthz fails. The loop
    /// checks in at least once per conntrack sweep.
    pub fn new(stall_after: Duration) -> Arc<Self> {
        Arc::new(Telemetry {
            inner: Mutex::new(Inner {
                waiting: None,
                programmed: false,
                api: BTreeMap::new(),
                api_errors: BTreeMap::new(),
                outage_since: None,
                heartbeat: Instant::now(),
                objects: BTreeMap::new(),
                claimed_by_label: 0,
                claimed_selectorless: 0,
                service_ports: 0,
                diagnostics: BTreeMap::new(),
                programming: Histogram::new(),
                sync: Histogram::new(),
                syncs: 0,
                map_updates: 0,
                map_errors: 0,
                events: BTreeMap::new(),
                event_errors: 0,
                ct_expired: 0,
                ct_frontend_removed: 0,
                nat_orphans: 0,
                pod_interfaces: None,
                service_names: Vec::new(),
                refused: Vec::new(),
                dns: String::new(),
                health: None,
                cluster_egress: None,
            }),
            stall_after,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind: still fine to read.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the API resources whose connection readiness depends on.
    pub fn track_api(&self, resources: &[&'static str]) {
        let mut inner = self.lock();
        for r in resources {
            inner.api.entry(r).or_insert(ApiState::Unknown);
        }
    }

    /// The API server answered a request for `resource`.
    pub fn api_ok(&self, resource: &'static str) {
        let mut inner = self.lock();
        let Some(state) = inner.api.get_mut(resource) else {
            return;
        };
        *state = ApiState::Connected;
        let all_fine = inner
            .api
            .values()
            .all(|s| !matches!(s, ApiState::Failed(_)));
        if all_fine && let Some(since) = inner.outage_since.take() {
            tracing::info!(
                "the API server is reachable again after {:.1} s; resyncing",
                since.elapsed().as_secs_f64()
            );
        }
    }

    /// A request or watch for `resource` failed (transport error, 5xx, broken stream, refused).
    pub fn api_failed(&self, resource: &'static str, error: String) {
        let mut inner = self.lock();
        if !inner.api.contains_key(resource) {
            return;
        }
        *inner.api_errors.entry(resource).or_default() += 1;
        if inner.outage_since.is_none() {
            tracing::warn!(
                "lost the API server ({resource}: {error}); the data path keeps forwarding with the last \
                 known state; reconnecting with backoff"
            );
            inner.outage_since = Some(Instant::now());
        } else {
            tracing::debug!("API server still unreachable ({resource}: {error})");
        }
        inner.api.insert(resource, ApiState::Failed(error));
    }

    /// The last request for every watched resource was answered: no outage, no reconnect in
    /// progress.
    pub fn api_connected(&self) -> bool {
        self.lock()
            .api
            .values()
            .all(|s| matches!(s, ApiState::Connected))
    }

    /// Why the agent cannot program yet; None once it can.
    pub fn set_waiting(&self, reason: Option<String>) {
        self.lock().waiting = reason;
    }

    /// The control loop is alive.
    pub fn heartbeat(&self) {
        self.lock().heartbeat = Instant::now();
    }

    /// Ok when the maps hold the desired state and the API watch is connected; otherwise the
    /// one-line reason.
    pub fn readiness(&self) -> Result<(), String> {
        let inner = self.lock();
        // Resources failing the same way are named together: one line, however many.
        let mut failed: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (resource, state) in &inner.api {
            if let ApiState::Failed(e) = state {
                failed.entry(e).or_default().push(resource);
            }
        }
        if let (false, Some(since)) = (failed.is_empty(), inner.outage_since) {
            let why: Vec<String> = failed
                .iter()
                .map(|(e, resources)| format!("{}: {e}", resources.join(", ")))
                .collect();
            return Err(format!(
                "API server unreachable for {:.0} s ({}); forwarding with the last known state",
                since.elapsed().as_secs_f64(),
                why.join("; ")
            ));
        }
        if let Some(waiting) = &inner.waiting {
            return Err(waiting.clone());
        }
        if !inner.programmed {
            return Err("the initial state is not programmed yet".to_owned());
        }
        Ok(())
    }

    fn stalled(&self) -> Option<Duration> {
        let age = self.lock().heartbeat.elapsed();
        (age > self.stall_after).then_some(age)
    }

    /// How many objects of `kind` the agent sees.
    /// How many pods' interfaces carry the pod program (`--pod-ifaces`), or None when disabled.
    pub fn set_pod_interfaces(&self, count: Option<usize>) {
        self.lock().pod_interfaces = count;
    }

    pub fn set_objects(&self, kind: &'static str, count: usize) {
        self.lock().objects.insert(kind, count as u64);
    }

    /// Records one programming round: what was claimed and programmed, how long it took.
    pub fn record_apply(
        &self,
        translation: &Translation,
        applied: &Applied,
        service_names: Option<Vec<(u32, ServicePortKey)>>,
    ) {
        let mut inner = self.lock();
        inner.programmed = true;
        inner.claimed_by_label = count_claims(translation, ClaimReason::Label);
        inner.claimed_selectorless = count_claims(translation, ClaimReason::SelectorLess);
        inner.service_ports = translation.desired.services.len() as u64;
        inner.diagnostics.clear();
        for d in &translation.diagnostics {
            *inner.diagnostics.entry(d.severity).or_default() += 1;
        }
        inner.sync.observe(applied.elapsed);
        inner.syncs += 1;
        inner.map_updates += applied.ops as u64;
        inner.map_errors += applied.errors as u64;
        if let Some(names) = service_names {
            inner.service_names = names;
        }
    }

    /// Time from a change (its trigger time, or its arrival) to the maps holding it.
    pub fn observe_programming(&self, latency: Duration) {
        self.lock().programming.observe(latency);
    }

    pub fn record_gc(&self, report: &GcReport) {
        let mut inner = self.lock();
        inner.ct_expired += report.ct_expired as u64;
        inner.ct_frontend_removed += report.ct_frontend_removed as u64;
        inner.nat_orphans += report.revnat_orphans as u64;
    }

    /// The totals of refused flows, by problem.
    pub fn set_refused<'a>(&self, totals: impl Iterator<Item = (&'a RefusalKey, u64)>) {
        self.lock().refused = totals.map(|(k, n)| (k.clone(), n)).collect();
    }

    /// The DNS names' metrics, as `dns::report::metrics` renders them.
    pub fn set_dns_metrics(&self, text: String) {
        self.lock().dns = text;
    }

    /// Health checking's metrics join the exposition.
    pub fn set_health_metrics(&self, metrics: Arc<Mutex<crate::health::HealthMetrics>>) {
        self.lock().health = Some(metrics);
    }

    /// Who owns each cluster egress address, and how many nodes may tunnel flows here.
    pub fn set_cluster_egress(&self, owners: Vec<EgressOwnership>, tunnel_peers: usize) {
        let mut inner = self.lock();
        let egress = inner.cluster_egress.get_or_insert_with(Default::default);
        for o in &owners {
            egress.failovers.entry(o.address).or_default();
        }
        egress.owners = owners;
        egress.tunnel_peers = tunnel_peers;
    }

    /// A cluster egress address moved from one node to another.
    pub fn count_cluster_egress_failover(&self, address: IpAddr) {
        let mut inner = self.lock();
        let egress = inner.cluster_egress.get_or_insert_with(Default::default);
        *egress.failovers.entry(address).or_default() += 1;
    }

    pub fn record_event(&self, reason: &str, published: bool) {
        let mut inner = self.lock();
        if published {
            *inner.events.entry(reason.to_owned()).or_default() += 1;
        } else {
            inner.event_errors += 1;
        }
    }

    fn service_ids(&self) -> Vec<u32> {
        self.lock()
            .service_names
            .iter()
            .map(|(id, _)| *id)
            .collect()
    }

    /// The Prometheus text exposition of everything recorded, plus `datapath` if given.
    pub fn render(&self, datapath: Option<&DatapathStats>) -> String {
        let ready = self.readiness().is_ok();
        let inner = self.lock();
        let mut out = Exposition::default();
        out.family("extproxy_ready", "gauge", "1 when /readyz answers 200.");
        out.sample("extproxy_ready", &[], u8::from(ready));
        out.labelled(
            "extproxy_api_connected",
            "gauge",
            "1 while the last request for the resource was answered by the API server.",
            "resource",
            inner.api.iter().map(|(resource, state)| {
                (resource, u8::from(matches!(state, ApiState::Connected)))
            }),
        );
        out.labelled(
            "extproxy_api_errors_total",
            "counter",
            "Failed requests and broken watches per resource.",
            "resource",
            inner.api.keys().map(|resource| {
                (
                    resource,
                    inner.api_errors.get(resource).copied().unwrap_or(0),
                )
            }),
        );
        if let Some(n) = inner.pod_interfaces {
            out.family(
                "extproxy_pod_interfaces",
                "gauge",
                "Pods' host-side interfaces the pod program is attached to (--pod-ifaces).",
            );
            out.sample("extproxy_pod_interfaces", &[], n);
        }
        out.labelled(
            "extproxy_objects",
            "gauge",
            "Objects the agent sees, by kind.",
            "kind",
            &inner.objects,
        );
        out.labelled(
            "extproxy_services_claimed",
            "gauge",
            "Services extproxy proxies, by why it claims them.",
            "reason",
            [
                ("label", inner.claimed_by_label),
                ("selectorless", inner.claimed_selectorless),
            ],
        );
        out.family(
            "extproxy_service_ports",
            "gauge",
            "Service ports (per IP family) programmed into the data path.",
        );
        out.sample("extproxy_service_ports", &[], inner.service_ports);
        out.labelled(
            "extproxy_diagnostics",
            "gauge",
            "Open problems with the Services and endpoints, by severity (see the log).",
            "severity",
            [Severity::Error, Severity::Warning, Severity::Info].map(|severity| {
                let n = inner.diagnostics.get(&severity).copied().unwrap_or(0);
                (severity.to_string(), n)
            }),
        );
        out.histogram(
            "extproxy_network_programming_duration_seconds",
            "From a change (the EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time, \
             else its arrival) to the maps holding it.",
            &inner.programming,
        );
        out.histogram(
            "extproxy_sync_duration_seconds",
            "Time to translate and program one batch of changes.",
            &inner.sync,
        );
        out.counter("extproxy_syncs_total", "Programming rounds.", inner.syncs);
        out.counter(
            "extproxy_map_updates_total",
            "Map entries written or deleted by the agent.",
            inner.map_updates,
        );
        out.counter(
            "extproxy_map_update_errors_total",
            "Map updates that failed (map full, kernel error); see the log.",
            inner.map_errors,
        );
        out.labelled(
            "extproxy_kube_events_total",
            "counter",
            "Kubernetes Events published on claimed Services, by reason.",
            "reason",
            &inner.events,
        );
        out.family(
            "extproxy_refused_flows_total",
            "counter",
            "New flows the data path refused at once (TCP RST, ICMP unreachable) for want of room, \
             by Service port, egress address, endpoint and reason (SnatPortsExhausted, \
             NatTableFull).",
        );
        for (key, n) in &inner.refused {
            out.sample(
                "extproxy_refused_flows_total",
                &[
                    ("namespace", &*key.service.namespace),
                    ("service", &*key.service.name),
                    ("port", &*key.service.port_name),
                    ("protocol", proto_name(key.protocol)),
                    ("egress_ip", &key.egress.to_string()),
                    ("destination", &key.endpoint.to_string()),
                    ("reason", key.reason.name()),
                ],
                n,
            );
        }
        out.counter(
            "extproxy_kube_event_errors_total",
            "Kubernetes Events the API server did not accept.",
            inner.event_errors,
        );
        out.counter(
            "extproxy_conntrack_expired_total",
            "Idle flows removed by the conntrack sweep.",
            inner.ct_expired,
        );
        out.counter(
            "extproxy_conntrack_frontend_removed_total",
            "Flows removed by the sweep because their frontend was removed.",
            inner.ct_frontend_removed,
        );
        out.counter(
            "extproxy_nat_orphans_removed_total",
            "Reverse NAT entries without a flow removed by the sweep (SNAT ports freed).",
            inner.nat_orphans,
        );
        out.text.push_str(&inner.dns);
        if let Some(egress) = &inner.cluster_egress {
            egress.render(&mut out);
        }
        if let Some(stats) = datapath {
            stats.render(&inner.service_names, &mut out);
        }
        if let Some(health) = &inner.health {
            let health = health.lock().unwrap_or_else(|e| e.into_inner());
            out.text.push_str(&health.render());
        }
        out.text
    }
}

impl ClusterEgressTelemetry {
    fn render(&self, out: &mut Exposition) {
        out.family(
            "extproxy_cluster_egress_owner",
            "gauge",
            "1 for the node owning each cluster egress address, as this node sees it (its Lease \
             holder; manifest mode: --cluster-egress-owner).",
        );
        for o in &self.owners {
            if let Some(node) = &o.owner {
                out.sample(
                    "extproxy_cluster_egress_owner",
                    &[("address", &o.address.to_string()), ("node", node)],
                    1,
                );
            }
        }
        for (metric, help, pick) in [
            (
                "extproxy_cluster_egress_local",
                "1 while this node owns the cluster egress address (it is on its uplink).",
                (|o: &EgressOwnership| o.local) as fn(&EgressOwnership) -> bool,
            ),
            (
                "extproxy_cluster_egress_fenced",
                "1 while this node holds the address's Lease but could not renew it in time: \
                 the address is off its uplink until a renewal succeeds.",
                |o: &EgressOwnership| o.fenced,
            ),
        ] {
            out.labelled(
                metric,
                "gauge",
                help,
                "address",
                self.owners
                    .iter()
                    .map(|o| (o.address.to_string(), u8::from(pick(o)))),
            );
        }
        out.labelled(
            "extproxy_cluster_egress_failovers_total",
            "counter",
            "Times this node saw a cluster egress address move from one node to another.",
            "address",
            self.failovers.iter().map(|(a, n)| (a.to_string(), *n)),
        );
        out.gauge(
            "extproxy_tunnel_peers",
            "Nodes whose tunnelled flows this node serves when it owns a cluster egress address.",
            self.tunnel_peers,
        );
    }
}

fn count_claims(translation: &Translation, reason: ClaimReason) -> u64 {
    translation
        .claimed
        .iter()
        .filter(|c| c.reason == reason)
        .count() as u64
}

// ---------------------------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Exposition {
    text: String,
}

/// Label values may hold anything; the format needs backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family with one sample per value of a single label.
    fn labelled<L: AsRef<str>, V: fmt::Display>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) {
        self.family(name, kind, help);
        for (value, n) in samples {
            self.sample(name, &[(label, value.as_ref())], n);
        }
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl fmt::Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&h.counts) {
            cumulative += n;
            self.sample(&bucket, &[("le", &bound.to_string())], cumulative);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.count);
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], h.count);
    }
}

// ---------------------------------------------------------------------------------------------
// Data path statistics
// ---------------------------------------------------------------------------------------------

/// SNAT ports are unique per (egress address, endpoint address and port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnatDestination {
    pub egress: IpAddr,
    pub destination: SocketAddr,
    pub protocol: u8,
}

/// One reading of the data path's maps.
#[derive(Clone, Debug, Default)]
pub struct DatapathStats {
    pub counters: Vec<(Counter, u64)>,
    pub services: Vec<(u32, ServiceStats)>,
    pub ct_entries: u64,
    pub ct_max: u32,
    pub nat_entries: u64,
    pub nat_max: u32,
    pub snat_in_use: BTreeMap<SnatDestination, u64>,
    /// Ports of closed flows still held for their clients, per destination.
    pub snat_held: BTreeMap<SnatDestination, u64>,
    /// Size of the SNAT port range: the most flows one destination can have per egress address.
    pub snat_range: u32,
    /// Flows that have not completed their handshake (CT_NEW) and its capacity.
    pub ct_new_entries: u64,
    pub ct_new_max: u32,
    /// How long reading took (mostly walking conntrack and reverse NAT).
    pub collect_duration: Duration,
}

fn ratio(n: u64, max: u32) -> f64 {
    if max == 0 { 0.0 } else { n as f64 / max as f64 }
}

impl DatapathStats {
    fn render(&self, names: &[(u32, ServicePortKey)], out: &mut Exposition) {
        let by_id: BTreeMap<u32, &ServicePortKey> = names.iter().map(|(id, k)| (*id, k)).collect();
        for (metric, help, pick) in [
            (
                "extproxy_service_packets_total",
                "Packets of a Service port; direction forward is client to endpoint, reply the way back.",
                (|s: &ServiceStats| (s.fwd_packets, s.rev_packets))
                    as fn(&ServiceStats) -> (u64, u64),
            ),
            (
                "extproxy_service_bytes_total",
                "Bytes (IP length) of a Service port, by direction.",
                |s: &ServiceStats| (s.fwd_bytes, s.rev_bytes),
            ),
        ] {
            out.family(metric, "counter", help);
            for (id, stats) in &self.services {
                let Some(key) = by_id.get(id) else { continue };
                let (forward, reply) = pick(stats);
                for (direction, value) in [("forward", forward), ("reply", reply)] {
                    out.sample(
                        metric,
                        &[
                            ("namespace", &*key.namespace),
                            ("service", &*key.name),
                            ("port", &*key.port_name),
                            ("protocol", key.protocol.name()),
                            ("family", key.family.name()),
                            ("direction", direction),
                        ],
                        value,
                    );
                }
            }
        }
        let counters = |drops: bool| {
            self.counters
                .iter()
                .filter(move |(c, _)| c.is_drop() == drops)
                .map(|(c, value)| (c.name(), value))
        };
        out.labelled(
            "extproxy_drops_total",
            "counter",
            "Packets the data path did not deliver, by reason.",
            "reason",
            counters(true),
        );
        out.labelled(
            "extproxy_datapath_events_total",
            "counter",
            "Other data path events (new flows, SNAT collisions, XDP to TC hand-offs, ...).",
            "event",
            counters(false),
        );
        out.gauge(
            "extproxy_conntrack_entries",
            "Tracked flows.",
            self.ct_entries,
        );
        out.gauge(
            "extproxy_conntrack_max_entries",
            "Conntrack capacity (--ct-max); when full the least recently used flow is evicted.",
            self.ct_max,
        );
        out.gauge(
            "extproxy_conntrack_fill_ratio",
            "Conntrack entries / capacity.",
            ratio(self.ct_entries, self.ct_max),
        );
        out.gauge(
            "extproxy_conntrack_new_entries",
            "Flows that have not completed their handshake (a table of their own, so that a flood \
             of them never evicts an established flow).",
            self.ct_new_entries,
        );
        out.gauge(
            "extproxy_conntrack_new_max_entries",
            "Capacity of the table of flows not established yet (--ct-max / 4).",
            self.ct_new_max,
        );
        out.gauge(
            "extproxy_nat_entries",
            "Reverse NAT entries: SNAT ports in use, and ports of closed flows held for their clients.",
            self.nat_entries,
        );
        out.gauge(
            "extproxy_nat_max_entries",
            "Reverse NAT capacity.",
            self.nat_max,
        );
        out.gauge(
            "extproxy_nat_fill_ratio",
            "Reverse NAT entries / capacity.",
            ratio(self.nat_entries, self.nat_max),
        );
        for (metric, help, ports) in [
            (
                "extproxy_snat_ports_in_use",
                "SNAT ports of open flows per egress address and destination (endpoint \
                 address:port, protocol).",
                &self.snat_in_use,
            ),
            (
                "extproxy_snat_ports_held",
                "SNAT ports of closed flows held for their clients (another client gets one only \
                 after the endpoint's TIME_WAIT), per egress address and destination.",
                &self.snat_held,
            ),
        ] {
            out.family(metric, "gauge", help);
            for (d, n) in ports {
                out.sample(
                    metric,
                    &[
                        ("egress_ip", &d.egress.to_string()),
                        ("destination", &d.destination.to_string()),
                        ("protocol", proto_name(d.protocol)),
                    ],
                    n,
                );
            }
        }
        out.gauge(
            "extproxy_snat_ports_per_destination",
            "Size of the SNAT port range (--snat-ports): concurrent flows one egress address can \
             have to one destination.",
            self.snat_range,
        );
        out.gauge(
            "extproxy_datapath_stats_collect_seconds",
            "Time the last reading of the data path maps took.",
            self.collect_duration.as_secs_f64(),
        );
    }
}

/// Read-only handles on the pinned maps, independent of the control loop's.
pub struct DatapathReader {
    maps: DatapathMaps,
    ct: HashMap<MapData, CtKey, CtValue>,
    ct_new: HashMap<MapData, CtKey, CtValue>,
    revnat: HashMap<MapData, RevNatKey, RevNatValue>,
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &str,
) -> Result<HashMap<MapData, K, V>, MetricsError> {
    let path = dir.join(name);
    MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .and_then(HashMap::try_from)
        .map_err(|source| MetricsError::Pinned { path, source })
}

impl DatapathReader {
    pub fn open(pin_dir: &Path) -> Result<Self, MetricsError> {
        Ok(DatapathReader {
            maps: DatapathMaps::from_pinned(pin_dir)?,
            ct: open_hash(pin_dir, MAP_CT)?,
            ct_new: open_hash(pin_dir, MAP_CT_NEW)?,
            revnat: open_hash(pin_dir, MAP_REVNAT)?,
        })
    }

    /// The maps can be read (CONFIG is one lookup).
    pub fn check(&self) -> Result<(), MetricsError> {
        self.maps.config()?;
        Ok(())
    }

    pub fn collect(&self, service_ids: &[u32]) -> Result<DatapathStats, MetricsError> {
        let start = Instant::now();
        let config = self.maps.config()?;
        let ct_max = self.maps.max_entries(MAP_CT);
        let nat_max = self.maps.max_entries(MAP_REVNAT);
        // Walking a hash map that changes underneath can revisit keys (the kernel restarts from
        // the first key when the cursor was deleted): never read more than the map can hold.
        let ct_entries = self
            .ct
            .keys()
            .take(ct_max as usize)
            .filter(Result::is_ok)
            .count() as u64;
        let ct_new_max = self.maps.max_entries(MAP_CT_NEW);
        let ct_new_entries = self
            .ct_new
            .keys()
            .take(ct_new_max as usize)
            .filter(Result::is_ok)
            .count() as u64;
        let mut snat_in_use: BTreeMap<SnatDestination, u64> = BTreeMap::new();
        let mut snat_held: BTreeMap<SnatDestination, u64> = BTreeMap::new();
        let mut nat_entries = 0;
        for (key, value) in self.revnat.iter().take(nat_max as usize).flatten() {
            nat_entries += 1;
            let destination = SocketAddr::new(key.backend.to_ip(), port_host(key.backend_port));
            let counts = if value.is_closed() {
                &mut snat_held
            } else {
                &mut snat_in_use
            };
            *counts
                .entry(SnatDestination {
                    egress: key.snat.to_ip(),
                    destination,
                    protocol: key.proto,
                })
                .or_default() += 1;
        }
        Ok(DatapathStats {
            counters: self.maps.counters()?,
            services: self.maps.service_stats(service_ids)?,
            ct_entries,
            ct_max,
            nat_entries,
            nat_max,
            snat_in_use,
            snat_held,
            snat_range: config.snat_ports,
            ct_new_entries,
            ct_new_max,
            collect_duration: start.elapsed(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

struct Server {
    telemetry: Arc<Telemetry>,
    reader: Option<Arc<DatapathReader>>,
    /// The last reading and when it was taken. A tokio mutex: concurrent scrapes of a stale
    /// cache wait for one walk instead of each starting their own.
    cache: tokio::sync::Mutex<Option<(Instant, Arc<DatapathStats>)>>,
}

impl Server {
    async fn datapath_stats(&self) -> Option<Result<Arc<DatapathStats>, MetricsError>> {
        let reader = self.reader.clone()?;
        let mut cache = self.cache.lock().await;
        if let Some((at, stats)) = cache.as_ref()
            && at.elapsed() < DATAPATH_STATS_TTL
        {
            return Some(Ok(stats.clone()));
        }
        let ids = self.telemetry.service_ids();
        let result = tokio::task::spawn_blocking(move || reader.collect(&ids))
            .await
            .map_err(|e| MetricsError::Task(e.to_string()))
            .and_then(|r| r);
        Some(result.map(|stats| {
            let stats = Arc::new(stats);
            *cache = Some((Instant::now(), stats.clone()));
            stats
        }))
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned());
        }
        match req.uri().path() {
            "/healthz" => {
                if let Some(age) = self.telemetry.stalled() {
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "the control loop has not run for {:.0} s\n",
                            age.as_secs_f64()
                        ),
                    );
                }
                match self.reader.as_ref().map(|r| r.check()) {
                    Some(Err(err)) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the data path maps cannot be read: {err}\n"),
                    ),
                    _ => text(StatusCode::OK, "ok\n".to_owned()),
                }
            }
            "/readyz" => match self.telemetry.readiness() {
                Ok(()) => text(StatusCode::OK, "ok\n".to_owned()),
                Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
            },
            "/metrics" => {
                let stats = match self.datapath_stats().await {
                    Some(Ok(stats)) => Some(stats),
                    Some(Err(err)) => {
                        tracing::warn!("reading the data path for /metrics: {err}");
                        None
                    }
                    None => None,
                };
                let mut response = text(StatusCode::OK, self.telemetry.render(stats.as_deref()));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "try /healthz, /readyz or /metrics\n".to_owned(),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Serves /healthz, /readyz and /metrics on `listener` until the task is dropped. With `reader`,
/// /metrics includes the data path's statistics and /healthz checks the maps can be read.
pub async fn serve(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    reader: Option<DatapathReader>,
) {
    let server = Arc::new(Server {
        telemetry,
        reader: reader.map(Arc::new),
        cache: tokio::sync::Mutex::new(None),
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("metrics server: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics server connection: {err}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::{Claimed, IpFamily, ObjectKey, Protocol};

    fn key() -> ServicePortKey {
        ServicePortKey {
            namespace: "shop".into(),
            name: "db \"main\"".into(),
            port_name: "pg".into(),
            protocol: Protocol::Tcp,
            family: IpFamily::V4,
        }
    }

    #[test]
    fn readiness_says_why_not() {
        let t = Telemetry::new(Duration::from_secs(60));
        t.track_api(&API_RESOURCES);
        t.set_waiting(Some("waiting for the initial list of nodes".into()));
        assert_eq!(
            t.readiness().unwrap_err(),
            "waiting for the initial list of nodes"
        );
        t.set_waiting(None);
        assert_eq!(
            t.readiness().unwrap_err(),
            "the initial state is not programmed yet"
        );
        t.record_apply(
            &Translation::default(),
            &Applied::default(),
            Some(Vec::new()),
        );
        assert_eq!(t.readiness(), Ok(()));
        t.api_failed("services", "connection refused".into());
        t.api_failed("nodes", "connection refused".into());
        let reason = t.readiness().unwrap_err();
        assert!(
            reason.starts_with(
                "API server unreachable for 0 s (nodes, services: connection refused)"
            ),
            "{reason}"
        );
        assert!(reason.ends_with("forwarding with the last known state"));
        t.api_ok("services");
        assert!(t.readiness().is_err(), "nodes still failing");
        t.api_ok("nodes");
        assert_eq!(t.readiness(), Ok(()));
        // Untracked resources (Events) do not count.
        t.api_failed("events", "forbidden".into());
        assert_eq!(t.readiness(), Ok(()));
    }

    #[test]
    fn exposition_is_prometheus_text() {
        let t = Telemetry::new(Duration::from_secs(60));
        t.track_api(&API_RESOURCES);
        t.api_ok("services");
        t.set_objects("Service", 6);
        let translation = Translation {
            claimed: vec![Claimed {
                service: ObjectKey::new("shop", "db"),
                reason: ClaimReason::Label,
            }],
            ..Default::default()
        };
        let applied = Applied {
            services: 1,
            ops: 7,
            errors: 0,
            elapsed: Duration::from_millis(3),
            names_changed: true,
        };
        t.record_apply(&translation, &applied, Some(vec![(4, key())]));
        t.observe_programming(Duration::from_millis(20));
        let mut snat_in_use = BTreeMap::new();
        snat_in_use.insert(
            SnatDestination {
                egress: "10.0.0.1".parse().unwrap(),
                destination: "2.3.4.5:8080".parse().unwrap(),
                protocol: proxy_common::PROTO_TCP,
            },
            3,
        );
        let stats = DatapathStats {
            counters: vec![(Counter::DropNoEndpoints, 2), (Counter::CtCreated, 9)],
            services: vec![(
                4,
                ServiceStats {
                    fwd_packets: 10,
                    fwd_bytes: 1000,
                    rev_packets: 8,
                    rev_bytes: 800,
                },
            )],
            ct_entries: 3,
            ct_max: 12,
            nat_entries: 3,
            nat_max: 12,
            snat_held: snat_in_use.clone(),
            snat_in_use,
            snat_range: 4536,
            ct_new_entries: 1,
            ct_new_max: 3,
            collect_duration: Duration::ZERO,
        };
        assert!(
            !t.render(Some(&stats)).contains("extproxy_pod_interfaces"),
            "no pod gauge without --pod-ifaces"
        );
        assert!(
            !t.render(None).contains("extproxy_cluster_egress"),
            "no cluster egress rows without cluster egress"
        );
        let egress: IpAddr = "10.0.0.50".parse().unwrap();
        t.set_cluster_egress(
            vec![EgressOwnership {
                address: egress,
                owner: Some("node-b".into()),
                local: true,
                fenced: false,
            }],
            3,
        );
        t.count_cluster_egress_failover(egress);
        t.set_pod_interfaces(Some(5));
        let text = t.render(Some(&stats));
        for line in [
            "extproxy_ready 1",
            "extproxy_pod_interfaces 5",
            "extproxy_api_connected{resource=\"services\"} 1",
            "extproxy_api_connected{resource=\"nodes\"} 0",
            "extproxy_objects{kind=\"Service\"} 6",
            "extproxy_services_claimed{reason=\"label\"} 1",
            "extproxy_map_updates_total 7",
            "extproxy_network_programming_duration_seconds_bucket{le=\"0.01\"} 0",
            "extproxy_network_programming_duration_seconds_bucket{le=\"0.025\"} 1",
            "extproxy_network_programming_duration_seconds_bucket{le=\"+Inf\"} 1",
            "extproxy_network_programming_duration_seconds_count 1",
            "extproxy_sync_duration_seconds_bucket{le=\"0.005\"} 1",
            "extproxy_service_packets_total{namespace=\"shop\",service=\"db \\\"main\\\"\",port=\"pg\",protocol=\"TCP\",family=\"IPv4\",direction=\"forward\"} 10",
            "extproxy_service_bytes_total{namespace=\"shop\",service=\"db \\\"main\\\"\",port=\"pg\",protocol=\"TCP\",family=\"IPv4\",direction=\"reply\"} 800",
            "extproxy_drops_total{reason=\"no_endpoints\"} 2",
            "extproxy_datapath_events_total{event=\"ct_created\"} 9",
            "extproxy_conntrack_fill_ratio 0.25",
            "extproxy_snat_ports_in_use{egress_ip=\"10.0.0.1\",destination=\"2.3.4.5:8080\",protocol=\"TCP\"} 3",
            "extproxy_snat_ports_per_destination 4536",
            "extproxy_cluster_egress_owner{address=\"10.0.0.50\",node=\"node-b\"} 1",
            "extproxy_cluster_egress_local{address=\"10.0.0.50\"} 1",
            "extproxy_cluster_egress_fenced{address=\"10.0.0.50\"} 0",
            "extproxy_cluster_egress_failovers_total{address=\"10.0.0.50\"} 1",
            "extproxy_tunnel_peers 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample belongs to a family announced with HELP and TYPE.
        let mut typed = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "{name} has no TYPE line");
            }
        }
    }
}
