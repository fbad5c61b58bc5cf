//! Health checking of external endpoints: active probes (per Service, by annotation) and passive
//! outlier detection from what the data path saw of new flows (`BACKEND_HEALTH`). The verdicts go
//! back into the translation as an input ([`crate::translate::Unhealthy`]): an unhealthy
//! endpoint gets no new flows (BACKENDS state Draining, its established flows go on), and when
//! every endpoint of a port is unhealthy the port fails open or refuses.
//!
//! The [`Monitor`] lives in the control loop and never waits there: probes run as tokio tasks
//! and report over a channel; the passive counters are read in one batch five times a second.

pub mod config;
pub mod probe;
pub mod share;
pub mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use proxy_common::BackendHealth;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::maps::{DatapathMaps, HealthCounters};
use crate::reconcile::Reconciler;
use crate::translate::{
    BackendRole, HealthSetting, Incremental, IpFamily, ObjectKey, Protocol, ServicePortKey,
    Translation, Unhealthy, VecMap,
};
use config::{AllDown, HealthConfig};
use probe::{ProbeKey, ProbeResult};
use state::{Cause, EndpointHealth, PassiveStep, Transition};

/// How often the data path's passive counters are read, at most. A refused new flow is seen
/// within this long.
pub const PASSIVE_POLL: Duration = Duration::from_millis(200);
/// Reading the counters may take this share of the agent's time at most: at scale the reads
/// are spaced out (measured: 40k backends take ~17 ms in one batch, so they are read every
/// ~850 ms instead of every 200 ms; DESIGN.md, "Health checking").
const PASSIVE_BUDGET: u32 = 50;
/// A single lookup costs about this many entries of a batch read (3.2 µs against 0.43 µs).
const SINGLE_LOOKUP_COST: usize = 8;
/// How long the verdict of an unhealthy endpoint that left its Service port is kept, should it
/// come back. A DNS name's answer rotates (a load balancer's name answers a few of its
/// addresses at each TTL, at most `--dns-max-ttl` apart, 5 min by default): a dead address that
/// rotates back in must not be taken for a new, healthy one and get new flows until its check
/// fails again. Longer than a few rotations; short enough that an endpoint repaired while out
/// of its slice comes back healthy.
pub const DEPARTED_MEMORY: Duration = Duration::from_secs(600);

/// A change of one endpoint's verdict, for Events.
#[derive(Clone, Debug)]
pub struct Report {
    pub port: ServicePortKey,
    pub endpoint: SocketAddr,
    pub transition: Transition,
}

impl Report {
    pub fn service(&self) -> ObjectKey {
        self.port.service()
    }

    /// The log line (and the Event's note).
    pub fn describe(&self) -> String {
        let verdict = if self.transition.healthy {
            "healthy"
        } else {
            "unhealthy"
        };
        format!(
            "endpoint {} of Service {}/{} port {:?} ({}) is {verdict}: {}",
            self.endpoint,
            self.port.namespace,
            self.port.name,
            self.port.port_name,
            self.port.protocol.name(),
            self.transition.cause
        )
    }
}

/// One endpoint's health as published in the state file (`extproxy inspect`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthRecord {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port_name: Arc<str>,
    pub protocol: String,
    pub family: String,
    pub endpoint: String,
    pub healthy: bool,
    /// What checks it: "tcp every 1s", "passive", "tcp every 1s, passive", "none".
    pub checks: String,
    /// Why it is as it is (the last transition's cause).
    pub cause: Option<String>,
    /// When it last changed (Unix seconds); None: healthy since the agent started.
    pub since: Option<u64>,
}

struct Endpoint {
    health: EndpointHealth,
    backend_id: Option<u32>,
    probe: Option<Arc<ProbeKey>>,
}

struct PortHealth {
    egress: Option<IpAddr>,
    config: Arc<HealthConfig>,
    endpoints: VecMap<(IpAddr, u16), Endpoint>,
}

/// An unhealthy endpoint that left its port, remembered for [`DEPARTED_MEMORY`].
struct Departed {
    health: EndpointHealth,
    /// The probe it was judged by: a different check starts afresh.
    probe: Option<Arc<ProbeKey>>,
    changed_at: Option<u64>,
    left: Instant,
}

struct Probe {
    task: tokio::task::JoinHandle<()>,
    users: BTreeSet<(ServicePortKey, (IpAddr, u16))>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Health checking's state: every endpoint that would take new flows, the probes, the verdicts.
pub struct Monitor {
    ports: BTreeMap<ServicePortKey, PortHealth>,
    /// The setting in force per Service (a bad annotation keeps the previous one).
    configs: HashMap<ObjectKey, Arc<HealthConfig>>,
    default_config: Arc<HealthConfig>,
    probes: HashMap<Arc<ProbeKey>, Probe>,
    results_tx: mpsc::UnboundedSender<ProbeResult>,
    results_rx: mpsc::UnboundedReceiver<ProbeResult>,
    /// What the translator was told, by Service.
    told: HashMap<ObjectKey, Arc<Unhealthy>>,
    /// Services whose verdicts may have changed since the translator was last told.
    pending: BTreeSet<ObjectKey>,
    reports: Vec<Report>,
    /// Endpoints whose passive ejection was refused (the Service's share was used up): said once.
    capped: HashSet<(ServicePortKey, (IpAddr, u16))>,
    fallback_logged: HashSet<IpAddr>,
    metrics: Arc<Mutex<HealthMetrics>>,
    records_dirty: bool,
    /// Unix time of the transitions, by endpoint (for the state file).
    changed_at: HashMap<(ServicePortKey, (IpAddr, u16)), u64>,
    /// The counters are not read again before this (see [`PASSIVE_BUDGET`]).
    next_read: Option<Instant>,
    /// A read of the counters is under way ([`Monitor::counters_due`]).
    reading: bool,
    /// Backend ids given to another endpoint while a read was under way: their counters in it
    /// are not this endpoint's.
    reassigned: HashSet<u32>,
    /// Verdicts published by prober nodes, which this node follows instead of probing
    /// (Kubernetes mode); None: it probes itself.
    follow: Option<Arc<Endpoints>>,
    /// Services one of whose endpoints ever changed verdict: with those of Services with an
    /// active check, the only ones the state file and the healthy gauge list (at 10k
    /// passive-only Services, listing every endpoint at every change cost milliseconds).
    touched: HashSet<ObjectKey>,
    /// When the state file's records were last built (at most once a second).
    records_built: Option<Instant>,
    /// Unhealthy endpoints that left their port lately: their verdict holds if they come back,
    /// and the translator keeps them in the Service's unhealthy set so that they come back
    /// without new flows.
    departed: BTreeMap<(ServicePortKey, (IpAddr, u16)), Departed>,
    /// Some endpoint may be passively ejected: only then has a tick anything to do (every
    /// other change of a verdict is settled where it happens). False once a pass over every
    /// endpoint found none; true again when one is ejected or comes back remembered.
    may_be_ejected: bool,
}

/// Endpoints (address, port, protocol) by Service.
pub type Endpoints = BTreeMap<ObjectKey, BTreeSet<(IpAddr, u16, Protocol)>>;

impl Default for Monitor {
    fn default() -> Self {
        Self::new()
    }
}

impl Monitor {
    pub fn new() -> Self {
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        Monitor {
            ports: BTreeMap::new(),
            configs: HashMap::new(),
            default_config: Arc::new(HealthConfig::default()),
            probes: HashMap::new(),
            results_tx,
            results_rx,
            told: HashMap::new(),
            pending: BTreeSet::new(),
            reports: Vec::new(),
            capped: HashSet::new(),
            fallback_logged: HashSet::new(),
            metrics: Arc::new(Mutex::new(HealthMetrics::default())),
            records_dirty: true,
            changed_at: HashMap::new(),
            next_read: None,
            reading: false,
            reassigned: HashSet::new(),
            follow: None,
            touched: HashSet::new(),
            records_built: None,
            departed: BTreeMap::new(),
            may_be_ejected: true,
        }
    }

    /// The metrics, for `/metrics` (rendered at scrape time).
    pub fn metrics(&self) -> Arc<Mutex<HealthMetrics>> {
        self.metrics.clone()
    }

    /// Learns the endpoints, settings and backend ids of what was just programmed: the Service
    /// ports the translation changed (all of them after a full translation).
    pub fn sync(&mut self, translation: &Translation, reconciler: &Reconciler) {
        let now = Instant::now();
        let keys: Vec<ServicePortKey> = match &translation.changes {
            Some(c) => c.services.iter().cloned().collect(),
            None => {
                let mut all: BTreeSet<ServicePortKey> =
                    translation.desired.services.keys().cloned().collect();
                all.extend(self.ports.keys().cloned());
                all.into_iter().collect()
            }
        };
        self.forget_departed(now);
        let mut gone = Vec::new();
        // Whether a port the gauges list changed (the rest do not need them rebuilt).
        let mut listed = false;
        for key in keys {
            listed |= self
                .ports
                .get(&key)
                .is_some_and(|p| p.config.active.is_some())
                || self.touched.contains(&key.service());
            match translation.desired.services.get(&key) {
                None => {
                    self.remove_port(&key);
                    gone.push(key.service());
                }
                Some(desired) => {
                    let service = key.service();
                    let config = match &desired.health {
                        HealthSetting::Default => self.default_config.clone(),
                        HealthSetting::Configured(c) => c.clone(),
                        // Keeps the previous setting; at first sight, passive only.
                        HealthSetting::Invalid => self
                            .configs
                            .get(&service)
                            .cloned()
                            .unwrap_or_else(|| self.default_config.clone()),
                    };
                    let previous = self.configs.insert(service.clone(), config.clone());
                    if previous.is_some_and(|p| p.all_down != config.all_down) {
                        // The translator is told the policy with the verdicts.
                        self.pending.insert(service);
                    }
                    let candidates: Vec<(IpAddr, u16)> = desired
                        .backends
                        .iter()
                        .filter(|(_, role)| **role != BackendRole::Draining)
                        .map(|(e, _)| *e)
                        .collect();
                    listed |= config.active.is_some();
                    let service_id = reconciler.service_id(&key);
                    self.update_port(&key, desired.egress, config, &candidates, now);
                    if let Some(port) = self.ports.get_mut(&key) {
                        for (&(ip, number), endpoint) in port.endpoints.iter_mut() {
                            let id =
                                service_id.and_then(|id| reconciler.backend_id(id, ip, number));
                            // Counters read before this may be another endpoint's.
                            if let Some(new) =
                                id.filter(|_| self.reading && endpoint.backend_id != id)
                            {
                                self.reassigned.insert(new);
                            }
                            endpoint.backend_id = id;
                        }
                    }
                }
            }
        }
        // Forget the settings of Services that are gone.
        for service in gone {
            let first = first_port_key(&service);
            let any_port =
                self.ports.range(first..).next().is_some_and(|(k, _)| {
                    k.namespace == service.namespace && k.name == service.name
                });
            if !any_port {
                self.configs.remove(&service);
                self.touched.remove(&service);
            }
        }
        if listed {
            self.publish_gauges();
        }
    }

    fn remove_port(&mut self, key: &ServicePortKey) {
        let Some(port) = self.ports.remove(key) else {
            return;
        };
        for (endpoint, e) in port.endpoints {
            if let Some(probe) = e.probe {
                self.release(&probe, key, endpoint);
            }
            self.changed_at.remove(&(key.clone(), endpoint));
        }
        self.departed.retain(|(k, _), _| k != key);
        self.pending.insert(key.service());
        self.records_dirty = true;
    }

    fn update_port(
        &mut self,
        key: &ServicePortKey,
        egress: Option<IpAddr>,
        config: Arc<HealthConfig>,
        candidates: &[(IpAddr, u16)],
        now: Instant,
    ) {
        let mut port = self.ports.remove(key).unwrap_or_else(|| PortHealth {
            egress,
            config: config.clone(),
            endpoints: VecMap::new(),
        });
        let passive_dropped = port.config.passive && !config.passive;
        port.egress = egress;
        port.config = config.clone();
        let mut transitions = Vec::new();
        // Endpoints that are gone.
        let gone: Vec<(IpAddr, u16)> = port
            .endpoints
            .keys()
            .filter(|e| !candidates.contains(e))
            .copied()
            .collect();
        for endpoint in gone {
            let changed_at = self.changed_at.remove(&(key.clone(), endpoint));
            if let Some(e) = port.endpoints.remove(&endpoint) {
                if let Some(probe) = &e.probe {
                    self.release(probe, key, endpoint);
                }
                if !e.health.healthy() {
                    self.departed.insert(
                        (key.clone(), endpoint),
                        Departed {
                            health: e.health,
                            probe: e.probe,
                            changed_at,
                            left: now,
                        },
                    );
                }
            }
            self.pending.insert(key.service());
        }
        for &endpoint in candidates {
            let wanted = config
                .active
                .as_ref()
                .filter(|_| self.follow.is_none())
                .map(|check| {
                    Arc::new(ProbeKey {
                        target: SocketAddr::new(endpoint.0, check.port.unwrap_or(endpoint.1)),
                        source: egress,
                        check: check.clone(),
                    })
                });
            if !port.endpoints.contains_key(&endpoint)
                && let Some(d) = self.departed.remove(&(key.clone(), endpoint))
            {
                // Back while remembered: still unhealthy until its check says otherwise (a
                // passive ejection runs out its back-off). Judged by another check, or while
                // following a prober: new.
                self.pending.insert(key.service());
                self.may_be_ejected = true;
                if d.probe == wanted && self.follow.is_none() {
                    if let Some(probe) = &wanted {
                        self.acquire(probe, key, endpoint);
                    }
                    if let Some(at) = d.changed_at {
                        self.changed_at.insert((key.clone(), endpoint), at);
                    }
                    port.endpoints.insert(
                        endpoint,
                        Endpoint {
                            health: d.health,
                            backend_id: None,
                            probe: wanted.clone(),
                        },
                    );
                }
            }
            let e = port.endpoints.get_or_insert_with(endpoint, || Endpoint {
                health: EndpointHealth::new(now),
                backend_id: None,
                probe: None,
            });
            if e.probe != wanted {
                if let Some(old) = e.probe.take() {
                    self.release(&old, key, endpoint);
                }
                if let Some(new) = &wanted {
                    self.acquire(new, key, endpoint);
                }
                e.probe = wanted;
                if let Some(t) = e.health.reset_active(config.active.as_ref(), now) {
                    transitions.push((endpoint, t));
                }
            }
            if passive_dropped && let Some(t) = e.health.reset_passive(config.active.as_ref(), now)
            {
                transitions.push((endpoint, t));
            }
            if let Some(follow) = &self.follow
                && config.active.is_some()
            {
                let listed = follow
                    .get(&key.service())
                    .is_some_and(|eps| eps.contains(&(endpoint.0, endpoint.1, key.protocol)));
                if let Some(t) = e.health.follow(!listed, now) {
                    transitions.push((endpoint, t));
                }
            }
        }
        // Endpoints come and go: keep what the port has, not what it once had (a map per
        // Service port, 40k endpoints at 10k Services).
        port.endpoints.shrink_to_fit();
        self.ports.insert(key.clone(), port);
        for (endpoint, t) in transitions {
            self.transition(key, endpoint, t);
        }
        self.records_dirty = true;
    }

    fn acquire(&mut self, probe: &Arc<ProbeKey>, port: &ServicePortKey, endpoint: (IpAddr, u16)) {
        let entry = self.probes.entry(probe.clone()).or_insert_with(|| Probe {
            task: probe::spawn(probe.clone(), self.results_tx.clone()),
            users: BTreeSet::new(),
        });
        entry.users.insert((port.clone(), endpoint));
    }

    fn release(&mut self, probe: &Arc<ProbeKey>, port: &ServicePortKey, endpoint: (IpAddr, u16)) {
        if let Some(entry) = self.probes.get_mut(probe) {
            entry.users.remove(&(port.clone(), endpoint));
            if entry.users.is_empty() {
                // Dropping aborts the task.
                self.probes.remove(probe);
            }
        }
    }

    /// The next probe result (cancel-safe: results wait in the channel).
    pub async fn next_result(&mut self) -> ProbeResult {
        match self.results_rx.recv().await {
            Some(r) => r,
            // The monitor holds a sender: never reached.
            None => std::future::pending().await,
        }
    }

    pub fn on_probe(&mut self, result: ProbeResult) {
        let now = Instant::now();
        if let Ok(mut m) = self.metrics.lock() {
            m.observe_probe(
                result.key.check.kind.name(),
                result.result.is_ok(),
                result.latency,
            );
        }
        if result.source_fallback
            && let Some(source) = result.key.source
            && self.fallback_logged.insert(source)
        {
            tracing::warn!(
                "health probes cannot leave from {source} (the egress address is not on this node): \
                 they leave from the node's default source address instead, which the endpoints \
                 may not allow"
            );
        }
        let Some(probe) = self.probes.get(&result.key) else {
            // Released since it was sent.
            return;
        };
        let users: Vec<(ServicePortKey, (IpAddr, u16))> = probe.users.iter().cloned().collect();
        let mut transitions = Vec::new();
        for (port_key, endpoint) in users {
            let Some(e) = self
                .ports
                .get_mut(&port_key)
                .and_then(|p| p.endpoints.get_mut(&endpoint))
            else {
                continue;
            };
            if let Some(t) = e
                .health
                .on_probe(result.result.clone(), &result.key.check, now)
            {
                transitions.push((port_key, endpoint, t));
            }
        }
        for (port, endpoint, t) in transitions {
            self.transition(&port, endpoint, t);
        }
    }

    /// Reads the data path's counters of every endpoint with passive detection on (when due),
    /// ejects the outliers, and readmits those whose ejection is over. With `reads`, the read
    /// runs on its thread and its counters come back through [`PassiveReads::done`] to
    /// [`Monitor::counters_read`]; without, it runs here.
    pub fn poll_on(&mut self, maps: &DatapathMaps, reads: Option<&mut PassiveReads>) {
        match (self.counters_due(), reads) {
            (Some(ids), Some(reads)) => {
                reads.start(ids);
                self.tick();
            }
            (Some(ids), None) => {
                let started = Instant::now();
                let counters = read_counters(maps.health_counters(), &ids);
                self.counters_read(counters, started.elapsed());
            }
            (None, _) => self.tick(),
        }
    }

    /// The backend ids whose counters are due for reading (none while a read is under way):
    /// read them ([`read_counters`]) and hand them to [`Monitor::counters_read`].
    pub fn counters_due(&mut self) -> Option<Vec<u32>> {
        if self.reading || self.next_read.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        self.reading = true;
        self.reassigned.clear();
        Some(
            self.ports
                .values()
                .filter(|p| p.config.passive)
                .flat_map(|p| p.endpoints.values().filter_map(|e| e.backend_id))
                .collect(),
        )
    }

    /// The counters read (taking `took`): ejects the outliers, readmits those whose ejection is
    /// over. Reads are spaced so that they take at most 1/[`PASSIVE_BUDGET`] of the time.
    pub fn counters_read(&mut self, counters: Counters, took: Duration) {
        let now = Instant::now();
        self.reading = false;
        self.next_read = Some(now + (took * PASSIVE_BUDGET).max(PASSIVE_POLL) - PASSIVE_POLL / 4);
        let reassigned = std::mem::take(&mut self.reassigned);
        self.judge(&counters, &reassigned, now);
    }

    /// Ejections that end, active checks' verdicts that fall due, without new counters.
    pub fn tick(&mut self) {
        self.judge(
            &Counters::Sparse(Vec::new()),
            &HashSet::new(),
            Instant::now(),
        );
    }

    /// Ejects the outliers `counters` show (none: a tick), and readmits the endpoints whose
    /// ejection is over. A tick with no endpoint ejected returns at once: at 40k endpoints the
    /// passes over all of them, five times a second, cost the node's connections 5% of their
    /// rate.
    fn judge(&mut self, counters: &Counters, reassigned: &HashSet<u32>, now: Instant) {
        let counted = !counters.is_empty();
        if !counted && !self.may_be_ejected {
            return;
        }
        let mut transitions = Vec::new();
        let following = self.follow.is_some();
        let mut any_ejected = false;
        for (key, port) in self.ports.iter_mut() {
            // A follower's passive ejections end by their back-off alone.
            let check = port.config.active.as_ref().filter(|_| !following);
            if port.config.passive && counted {
                let n = port.endpoints.len();
                let allowed = state::max_passive_ejections(n);
                let mut ejected = port
                    .endpoints
                    .values()
                    .filter(|e| e.health.ejected())
                    .count();
                for (&endpoint, e) in port.endpoints.iter_mut() {
                    let Some(c) = e
                        .backend_id
                        .filter(|id| !reassigned.contains(id))
                        .and_then(|id| counters.get(&id))
                    else {
                        continue;
                    };
                    match e.health.on_passive(*c, ejected < allowed, check, now) {
                        PassiveStep::Nothing => {}
                        PassiveStep::Transition(t) => {
                            ejected += 1;
                            self.capped.remove(&(key.clone(), endpoint));
                            transitions.push((key.clone(), endpoint, t));
                        }
                        PassiveStep::Ejected => {
                            ejected += 1;
                            self.capped.remove(&(key.clone(), endpoint));
                        }
                        PassiveStep::Capped => {
                            if self.capped.insert((key.clone(), endpoint)) {
                                tracing::warn!(
                                    "endpoint {} of Service {}/{} port {:?} failed {} new flows \
                                     in a row but is not ejected: {ejected} of its {n} endpoints \
                                     are already (at most {}%, so that a flood or an overload \
                                     cannot empty a Service)",
                                    sock(endpoint),
                                    key.namespace,
                                    key.name,
                                    key.port_name,
                                    c.consecutive,
                                    state::MAX_EJECTED_PERCENT
                                );
                                if let Ok(mut m) = self.metrics.lock() {
                                    m.capped += 1;
                                }
                            }
                        }
                    }
                }
            }
            for (&endpoint, e) in port.endpoints.iter_mut() {
                if let Some(t) = e.health.tick(check, now) {
                    transitions.push((key.clone(), endpoint, t));
                }
                any_ejected |= e.health.ejected();
            }
        }
        self.may_be_ejected = any_ejected;
        for (port, endpoint, t) in transitions {
            self.transition(&port, endpoint, t);
        }
    }

    fn transition(&mut self, port: &ServicePortKey, endpoint: (IpAddr, u16), t: Transition) {
        let report = Report {
            port: port.clone(),
            endpoint: SocketAddr::new(endpoint.0, endpoint.1),
            transition: t,
        };
        let line = report.describe();
        if report.transition.healthy {
            tracing::info!("{line}");
        } else {
            tracing::warn!("{line}");
        }
        if let Ok(mut m) = self.metrics.lock() {
            m.count_transition(port, &sock(endpoint), &report.transition);
        }
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.changed_at.insert((port.clone(), endpoint), unix);
        self.touched.insert(port.service());
        self.pending.insert(port.service());
        self.reports.push(report);
        self.records_dirty = true;
    }

    /// Follows the verdicts prober nodes published (Some), or probes itself (None). Switching
    /// stops or starts this node's probes.
    pub fn set_follow(&mut self, follow: Option<Arc<Endpoints>>) {
        if self.follow == follow {
            return;
        }
        match (&self.follow, &follow) {
            (None, Some(_)) => tracing::info!(
                "health: following the verdicts the prober nodes publish (this node does not probe)"
            ),
            (Some(_), None) => {
                tracing::info!("health: no live prober node; this node probes by itself")
            }
            _ => {}
        }
        self.follow = follow;
        let now = Instant::now();
        let keys: Vec<ServicePortKey> = self
            .ports
            .iter()
            .filter(|(_, p)| p.config.active.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let Some(p) = self.ports.get(&key) else {
                continue;
            };
            let (egress, config) = (p.egress, p.config.clone());
            let endpoints: Vec<(IpAddr, u16)> = p.endpoints.keys().copied().collect();
            self.update_port(&key, egress, config, &endpoints, now);
        }
    }

    /// This node's own active verdicts: the endpoints its checks judge unhealthy (what a prober
    /// publishes). Empty while it follows.
    pub fn own_verdicts(&self) -> Endpoints {
        let mut out = Endpoints::new();
        if self.follow.is_some() {
            return out;
        }
        for (key, port) in &self.ports {
            if port.config.active.is_none() {
                continue;
            }
            for (&(ip, number), e) in &port.endpoints {
                if !e.health.active_healthy() {
                    out.entry(key.service())
                        .or_default()
                        .insert((ip, number, key.protocol));
                }
            }
        }
        out
    }

    /// Whether verdicts changed since the translator was last told.
    pub fn has_changes(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Tells the translator the verdicts that changed; true if any did (translate and program
    /// then).
    pub fn tell(&mut self, translator: &mut Incremental) -> bool {
        let changes = self.take_changes();
        let any = !changes.is_empty();
        for (service, unhealthy) in changes {
            translator.set_unhealthy(service, unhealthy);
        }
        any
    }

    /// The Services whose unhealthy endpoints changed, with the new set (None: all healthy).
    pub fn take_changes(&mut self) -> Vec<(ObjectKey, Option<Arc<Unhealthy>>)> {
        let mut out = Vec::new();
        for service in std::mem::take(&mut self.pending) {
            let refuse = self
                .configs
                .get(&service)
                .is_some_and(|c| c.all_down == AllDown::Refuse);
            let mut endpoints = BTreeSet::new();
            let first = first_port_key(&service);
            for (key, port) in self.ports.range(first.clone()..) {
                if key.namespace != service.namespace || key.name != service.name {
                    break;
                }
                for (&(ip, number), e) in &port.endpoints {
                    if !e.health.healthy() {
                        endpoints.insert((ip, number, key.protocol));
                    }
                }
            }
            for ((key, (ip, number)), _) in self.departed.range((first, MIN_ENDPOINT)..) {
                if key.namespace != service.namespace || key.name != service.name {
                    break;
                }
                endpoints.insert((*ip, *number, key.protocol));
            }
            let now = (!endpoints.is_empty()).then(|| {
                Arc::new(Unhealthy {
                    endpoints,
                    refuse_when_all_down: refuse,
                })
            });
            if self.told.get(&service) == now.as_ref() {
                continue;
            }
            match &now {
                Some(u) => self.told.insert(service.clone(), u.clone()),
                None => self.told.remove(&service),
            };
            out.push((service, now));
        }
        if !out.is_empty() {
            self.publish_gauges();
        }
        out
    }

    /// Everything the translator has been told: to tell a translator built anew (a relist).
    pub fn verdicts(&self) -> Vec<(ObjectKey, Arc<Unhealthy>)> {
        self.told
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The transitions since the last call (Kubernetes mode makes Events of them).
    pub fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.reports)
    }

    /// The records for the state file (endpoints of Services with an active check, and of
    /// Services with an endpoint that changed verdict), when they changed since the last call;
    /// built at most once a second, as the state file is written.
    pub fn take_records(&mut self) -> Option<Vec<HealthRecord>> {
        let recent = self
            .records_built
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
        if !self.records_dirty || recent {
            return None;
        }
        self.records_dirty = false;
        self.records_built = Some(Instant::now());
        let mut records = Vec::new();
        for (key, port) in &self.ports {
            if port.config.active.is_none() && !self.touched.contains(&key.service()) {
                continue;
            }
            let mut checks = Vec::new();
            if let Some(c) = &port.config.active {
                checks.push(format!(
                    "{} every {}",
                    c.kind.name(),
                    config::show(c.interval)
                ));
            }
            if port.config.passive {
                checks.push("passive".to_owned());
            }
            let checks = if checks.is_empty() {
                "none".to_owned()
            } else {
                checks.join(", ")
            };
            for (&endpoint, e) in &port.endpoints {
                records.push(HealthRecord {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    port_name: key.port_name.clone(),
                    protocol: key.protocol.name().to_owned(),
                    family: key.family.name().to_owned(),
                    endpoint: sock(endpoint),
                    healthy: e.health.healthy(),
                    checks: checks.clone(),
                    cause: e.health.cause().map(Cause::to_string),
                    since: self.changed_at.get(&(key.clone(), endpoint)).copied(),
                });
            }
        }
        Some(records)
    }

    /// Sets the healthy gauges: one per Service endpoint of Services with an active check, and
    /// of every endpoint that was ever unhealthy (a passive-only Service's endpoints appear once
    /// they matter: 10k Services x 4 endpoints would otherwise be 40k series of 1).
    fn publish_gauges(&self) {
        let Ok(mut m) = self.metrics.lock() else {
            return;
        };
        let mut healthy: BTreeMap<EndpointLabels, bool> = BTreeMap::new();
        for (key, port) in &self.ports {
            if port.config.active.is_none() && !self.touched.contains(&key.service()) {
                continue;
            }
            for (&endpoint, e) in &port.endpoints {
                let id = (key.namespace.clone(), key.name.clone(), sock(endpoint));
                let shown = port.config.active.is_some() || m.ever_unhealthy.contains(&id);
                if shown {
                    let h = healthy.entry(id).or_insert(true);
                    *h &= e.health.healthy();
                }
            }
        }
        m.healthy = healthy;
    }

    /// Endpoints tracked and probes running (for tests and the log).
    /// Forgets the departed endpoints kept longer than [`DEPARTED_MEMORY`] (their Services'
    /// unhealthy sets shrink).
    fn forget_departed(&mut self, now: Instant) {
        let pending = &mut self.pending;
        self.departed.retain(|(key, _), d| {
            let keep = now.duration_since(d.left) < DEPARTED_MEMORY;
            if !keep {
                pending.insert(key.service());
            }
            keep
        });
    }

    /// Unhealthy endpoints that left their port and are remembered.
    pub fn departed(&self) -> usize {
        self.departed.len()
    }

    pub fn counts(&self) -> (usize, usize) {
        (
            self.ports.values().map(|p| p.endpoints.len()).sum(),
            self.probes.len(),
        )
    }
}

/// The smallest endpoint, to range over a port's departed endpoints.
const MIN_ENDPOINT: (IpAddr, u16) = (IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// The smallest key of Service `service`'s ports.
fn first_port_key(service: &ObjectKey) -> ServicePortKey {
    ServicePortKey {
        namespace: service.namespace.clone(),
        name: service.name.clone(),
        port_name: "".into(),
        protocol: Protocol::Tcp,
        family: IpFamily::V4,
    }
}

fn sock((ip, port): (IpAddr, u16)) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// The passive counters of some backend ids, as read at one poll.
pub enum Counters {
    /// Every entry up to the largest id, indexed by id (one batch read).
    Dense(Vec<BackendHealth>),
    /// The ids asked for, sorted, with their entries (single reads).
    Sparse(Vec<(u32, BackendHealth)>),
}

impl Counters {
    fn is_empty(&self) -> bool {
        match self {
            Counters::Dense(all) => all.is_empty(),
            Counters::Sparse(some) => some.is_empty(),
        }
    }

    fn get(&self, id: &u32) -> Option<&BackendHealth> {
        match self {
            Counters::Dense(all) => all.get(*id as usize),
            Counters::Sparse(some) => some
                .binary_search_by_key(id, |(i, _)| *i)
                .ok()
                .map(|i| &some[i].1),
        }
    }
}

/// Reads the counters on a blocking thread, one read at a time: at 40k endpoints a read takes
/// ~17 ms, which the agent's loop (a manifest change, an API event) must not wait behind.
pub struct PassiveReads {
    /// The counters' map, while no read has it.
    source: Option<HealthCounters>,
    running: Option<tokio::task::JoinHandle<(HealthCounters, Counters, Duration)>>,
}

impl PassiveReads {
    /// Reads from the BACKEND_HEALTH map pinned in `pin_dir`; None if it cannot be opened (then
    /// [`Monitor::poll_on`] reads on the loop).
    pub fn open(pin_dir: &std::path::Path) -> Option<PassiveReads> {
        match HealthCounters::open_pinned(pin_dir) {
            Ok(source) => Some(PassiveReads {
                source: Some(source),
                running: None,
            }),
            Err(err) => {
                tracing::warn!("passive health reads run on the agent's loop: {err}");
                None
            }
        }
    }

    /// Starts reading `ids` (ignored while a read is under way).
    pub fn start(&mut self, ids: Vec<u32>) {
        let Some(source) = self.source.take() else {
            return;
        };
        self.running = Some(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let counters = read_counters(&source, &ids);
            (source, counters, started.elapsed())
        }));
    }

    /// The counters of the read under way of `reads`, once done (pending while none is).
    pub async fn done_of(reads: &mut Option<PassiveReads>) -> (Counters, Duration) {
        match reads {
            Some(reads) => reads.done().await,
            None => std::future::pending().await,
        }
    }

    /// The counters of the read under way, once done (pending while none is).
    pub async fn done(&mut self) -> (Counters, Duration) {
        let Some(running) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let result = running.await;
        self.running = None;
        match result {
            Ok((source, counters, took)) => {
                self.source = Some(source);
                (counters, took)
            }
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
}

/// Reads the counters of `ids`: one lookup each for a few, one batch for many. Kept in vectors,
/// not a map: at 40k endpoints a map of them was 4 MB built anew at every poll.
pub fn read_counters(maps: &HealthCounters, ids: &[u32]) -> Counters {
    let max = ids.iter().copied().max().unwrap_or(0);
    let one_by_one = || {
        let mut some: Vec<(u32, BackendHealth)> = ids
            .iter()
            .filter_map(|id| Some((*id, maps.get(*id).ok()?)))
            .collect();
        some.sort_unstable_by_key(|(id, _)| *id);
        Counters::Sparse(some)
    };
    if ids.len() * SINGLE_LOOKUP_COST <= max as usize + 1 {
        return one_by_one();
    }
    match maps.batch(max + 1) {
        Ok(all) => Counters::Dense(all),
        Err(err) => {
            tracing::debug!("batch read of backend health failed ({err}); reading one by one");
            one_by_one()
        }
    }
}

/// Probe latency buckets, seconds.
const PROBE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// (namespace, Service, endpoint) as the metrics label them.
type EndpointLabels = (Arc<str>, Arc<str>, String);

/// Health checking's metrics, rendered at scrape time.
#[derive(Debug, Default)]
pub struct HealthMetrics {
    healthy: BTreeMap<EndpointLabels, bool>,
    ever_unhealthy: BTreeSet<EndpointLabels>,
    /// By endpoint and what it became ("healthy", "unhealthy").
    transitions: BTreeMap<(EndpointLabels, &'static str), u64>,
    /// check kind -> (bucket counts, sum, count, failures).
    probes: BTreeMap<&'static str, ProbeStats>,
    capped: u64,
}

#[derive(Debug, Default)]
struct ProbeStats {
    buckets: [u64; PROBE_BUCKETS.len()],
    sum: f64,
    count: u64,
    failed: u64,
}

impl HealthMetrics {
    fn observe_probe(&mut self, kind: &'static str, ok: bool, latency: Duration) {
        let s = self.probes.entry(kind).or_default();
        let v = latency.as_secs_f64();
        if let Some(i) = PROBE_BUCKETS.iter().position(|b| v <= *b) {
            s.buckets[i] += 1;
        }
        s.sum += v;
        s.count += 1;
        if !ok {
            s.failed += 1;
        }
    }

    fn count_transition(&mut self, port: &ServicePortKey, endpoint: &str, t: &Transition) {
        let id = (
            port.namespace.clone(),
            port.name.clone(),
            endpoint.to_owned(),
        );
        if !t.healthy {
            self.ever_unhealthy.insert(id.clone());
        }
        let to = if t.healthy { "healthy" } else { "unhealthy" };
        *self.transitions.entry((id, to)).or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let esc = |v: &str| {
            v.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        };
        out.push_str(
            "# HELP extproxy_endpoint_healthy 1 while the endpoint gets new flows, 0 while health \
             checking keeps them away (endpoints of Services with an active check, and any that \
             was ever unhealthy).\n# TYPE extproxy_endpoint_healthy gauge\n",
        );
        for ((ns, svc, ep), healthy) in &self.healthy {
            let _ = writeln!(
                out,
                "extproxy_endpoint_healthy{{namespace=\"{}\",service=\"{}\",endpoint=\"{}\"}} {}",
                esc(ns),
                esc(svc),
                esc(ep),
                u8::from(*healthy)
            );
        }
        out.push_str(
            "# HELP extproxy_endpoint_health_transitions_total Endpoints becoming healthy or \
             unhealthy.\n# TYPE extproxy_endpoint_health_transitions_total counter\n",
        );
        for (((ns, svc, ep), to), n) in &self.transitions {
            let _ = writeln!(
                out,
                "extproxy_endpoint_health_transitions_total{{namespace=\"{}\",service=\"{}\",endpoint=\"{}\",to=\"{to}\"}} {n}",
                esc(ns),
                esc(svc),
                esc(ep)
            );
        }
        out.push_str(
            "# HELP extproxy_health_probe_duration_seconds Time an active probe took (connect, \
             TLS, HTTP status), by check.\n# TYPE extproxy_health_probe_duration_seconds histogram\n",
        );
        for (kind, s) in &self.probes {
            let mut cumulative = 0;
            for (bound, n) in PROBE_BUCKETS.iter().zip(s.buckets) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "extproxy_health_probe_duration_seconds_bucket{{check=\"{kind}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "extproxy_health_probe_duration_seconds_bucket{{check=\"{kind}\",le=\"+Inf\"}} {}\n\
                 extproxy_health_probe_duration_seconds_sum{{check=\"{kind}\"}} {}\n\
                 extproxy_health_probe_duration_seconds_count{{check=\"{kind}\"}} {}",
                s.count, s.sum, s.count
            );
        }
        out.push_str(
            "# HELP extproxy_health_probe_failures_total Active probes that failed, by check.\n\
             # TYPE extproxy_health_probe_failures_total counter\n",
        );
        for (kind, s) in &self.probes {
            let _ = writeln!(
                out,
                "extproxy_health_probe_failures_total{{check=\"{kind}\"}} {}",
                s.failed
            );
        }
        let _ = writeln!(
            out,
            "# HELP extproxy_passive_ejections_capped_total Passive ejections not made because the \
             Service port's share ({}%) was used up.\n# TYPE extproxy_passive_ejections_capped_total \
             counter\nextproxy_passive_ejections_capped_total {}",
            state::MAX_EJECTED_PERCENT,
            self.capped
        );
        out
    }
}

#[cfg(test)]
mod tests;
