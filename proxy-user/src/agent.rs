//! The agent's steady state, shared by manifest mode and Kubernetes mode: take a translation,
//! program the difference, say what happened, keep conntrack swept.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use proxy_common::{Config, Counter, FrontendKey};

use crate::{
    diag::{Diagnostic, Severity},
    gc::{Collector, GcReport},
    maps::DatapathMaps,
    reconcile::{Reconciler, SyncReport},
    state::{self, AgentState, ServiceName},
    translate::{ObjectKey, Translation},
};

pub struct Agent {
    pub maps: DatapathMaps,
    reconciler: Reconciler,
    config: Config,
    collector: Collector,
    state_dir: PathBuf,
    state: AgentState,
    /// Diagnostics already logged, so a re-translation repeats none of them.
    reported: Reported,
    ct_max: u32,
    /// The reconciler's ids as last published.
    published_ids: Option<u64>,
    /// `state` differs from the file.
    state_dirty: bool,
    last_write: Option<Instant>,
    /// The Service each service id of adopted maps was, by the previous agent's state file;
    /// until the first apply gives the ids names of their own.
    adopted_names: HashMap<u32, ObjectKey>,
    /// The uplink's MTU: it bounds what fits the tunnel to cluster egress owners.
    pub uplink_mtu: u32,
    /// `--tunnel-ip`: the tunnel's source instead of the node's first IPv4 address.
    pub tunnel_ip: Option<std::net::Ipv4Addr>,
}

/// The state file is rewritten at most this often: with 10k Services it is a megabyte of JSON,
/// and a burst of changes needs it written once, not once per change.
const STATE_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// What one `apply` did, for logs and metrics.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub services: usize,
    pub ops: usize,
    pub errors: usize,
    pub elapsed: Duration,
    /// Service ids were given to or taken from Service ports (their names need publishing).
    pub names_changed: bool,
}

impl Agent {
    pub fn new(
        maps: DatapathMaps,
        reconciler: Reconciler,
        config: Config,
        state_dir: PathBuf,
        state: AgentState,
    ) -> Self {
        let ct_max = maps.max_entries(proxy_common::MAP_CT);
        let adopted_names = if reconciler.state().frontends.is_empty() {
            HashMap::new()
        } else {
            previous_names(&state_dir)
        };
        Agent {
            maps,
            reconciler,
            config,
            collector: Collector::default(),
            state_dir,
            state,
            reported: Reported::default(),
            ct_max,
            published_ids: None,
            state_dirty: true,
            uplink_mtu: 1500,
            tunnel_ip: None,
            last_write: None,
            adopted_names,
        }
    }

    /// The Service serving each frontend in the maps. A frontend stays with it, whoever else
    /// comes to want it: see [`crate::translate::Incremental::set_incumbents`].
    pub fn incumbents(&self) -> Vec<(FrontendKey, ObjectKey)> {
        serving(&self.reconciler, &self.adopted_names)
    }

    /// The configuration written to the data path (its clock factors included).
    pub fn config(&self) -> Config {
        self.config
    }

    pub fn reconciler(&self) -> &Reconciler {
        &self.reconciler
    }

    /// New egress and NodePort addresses (Kubernetes mode follows the Node); published with the
    /// next `apply`.
    pub fn set_node_facts(&mut self, egress: &[IpAddr], node_addresses: &[IpAddr]) {
        if self.state.egress != egress || self.state.node_addresses != node_addresses {
            self.state.egress = egress.to_vec();
            self.state.node_addresses = node_addresses.to_vec();
            self.state_dirty = true;
            self.set_tunnel_source(node_addresses);
        }
    }

    /// The tunnel to cluster egress owners leaves from the node's first IPv4 address (the
    /// Node's InternalIP comes first), the one other nodes know it by.
    pub fn set_tunnel_source(&mut self, node_addresses: &[IpAddr]) {
        let source = self.tunnel_ip.or_else(|| {
            node_addresses.iter().find_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
        });
        if let Err(err) = self.maps.set_tunnel(source, self.uplink_mtu) {
            tracing::warn!("cannot configure the tunnel to cluster egress owners: {err}");
        }
    }

    /// The endpoints' health, published with the state file.
    pub fn set_health(&mut self, records: Vec<crate::health::HealthRecord>) {
        if self.state.health != records {
            self.state.health = records;
            self.state_dirty = true;
        }
    }

    /// Programs `translation` as a diff against what the maps hold and reports problems. An
    /// incremental translation is planned for the Service ports it changed only.
    pub fn apply(&mut self, translation: &Translation) -> Applied {
        let start = Instant::now();
        let changes = translation.changes.as_ref();
        let diagnostics = changes
            .is_none_or(|c| c.diagnostics)
            .then(|| self.report_diagnostics(&translation.diagnostics));
        let report = match changes {
            Some(c) => {
                self.reconciler
                    .sync_changes(&translation.desired, &c.services, &mut self.maps)
            }
            None => self.reconciler.sync(&translation.desired, &mut self.maps),
        };
        let errors = log_sync_report(&report);
        // The ids have names of their own now.
        self.adopted_names = HashMap::new();
        let names_changed = self.published_ids != Some(self.reconciler.ids_version());
        self.publish(translation, names_changed, diagnostics);
        Applied {
            services: translation.desired.services.len(),
            ops: report.apply.applied,
            errors,
            elapsed: start.elapsed(),
            names_changed,
        }
    }

    /// Logs the diagnostics not logged before and those resolved since; returns their texts.
    fn report_diagnostics(&mut self, diagnostics: &[Diagnostic]) -> Vec<String> {
        let (lines, texts) = self.reported.update(diagnostics);
        for (severity, line) in lines {
            match severity {
                Severity::Error => tracing::error!("{line}"),
                Severity::Warning => tracing::warn!("{line}"),
                Severity::Info => tracing::info!("{line}"),
            }
        }
        texts
    }

    /// Updates the state file's names (when the ids changed) and diagnostics (when given).
    fn publish(
        &mut self,
        translation: &Translation,
        names: bool,
        diagnostics: Option<Vec<String>>,
    ) {
        let desired = &translation.desired;
        if names {
            self.published_ids = Some(self.reconciler.ids_version());
            self.state.services = self
                .reconciler
                .service_ids()
                .filter(|(key, _)| desired.services.contains_key(*key))
                .map(|(key, id)| ServiceName {
                    id,
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    port_name: key.port_name.clone(),
                    protocol: key.protocol.name().into(),
                    family: key.family.name().into(),
                })
                .collect();
            // Kept until the ids change again; the filter leaves collect without an exact size.
            self.state.services.shrink_to_fit();
        }
        let diagnostics_changed = diagnostics.is_some();
        if let Some(texts) = diagnostics {
            self.state.diagnostics = texts;
        }
        self.state_dirty |= names || diagnostics_changed;
        self.flush_state();
    }

    /// Writes the state file if it is out of date and was not written within the last second;
    /// call it every second or so so that the last change of a burst gets written too.
    pub fn flush_state(&mut self) {
        let recent = self
            .last_write
            .is_some_and(|t| t.elapsed() < STATE_WRITE_INTERVAL);
        if !self.state_dirty || recent {
            return;
        }
        self.state_dirty = false;
        self.last_write = Some(Instant::now());
        if let Err(err) = state::write(&self.state_dir, &self.state) {
            tracing::warn!(
                "cannot write {}: {err} (extproxy inspect will show ids without names)",
                state::path(&self.state_dir).display()
            );
        }
    }

    /// Writes the state file now if it is out of date (before exiting).
    pub fn flush_state_now(&mut self) {
        self.last_write = None;
        self.flush_state();
    }

    /// Sweeps expired flows and warns when conntrack is close to full.
    pub fn sweep(&mut self) -> Option<GcReport> {
        let now = crate::host::datapath_secs();
        let now_ticks = crate::host::datapath_ticks(&self.config);
        let frontends = &self.reconciler.state().frontends;
        match self
            .collector
            .sweep(&mut self.maps, &self.config, now, now_ticks, frontends)
        {
            Ok(report) => {
                tracing::debug!(?report, "conntrack sweep");
                let fill = report.ct_entries as f64 / self.ct_max.max(1) as f64;
                if fill > 0.9 {
                    tracing::warn!(
                        "conntrack is {:.0}% full ({} of {}): the oldest idle flows are being evicted; raise --ct-max",
                        fill * 100.0,
                        report.ct_entries,
                        self.ct_max
                    );
                }
                Some(report)
            }
            Err(err) => {
                tracing::warn!("conntrack sweep failed: {err}");
                None
            }
        }
    }

    /// Data path counters, for logs and metrics.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        self.maps.counters().unwrap_or_default()
    }
}

/// Alike diagnostics (the same problem of different objects) logged one by one in one go; the
/// rest are counted in one more line. 20,000 Services without endpoints made 20,000 lines.
pub const ALIKE_LOGGED: usize = 5;

/// The diagnostics logged so far: a re-translation repeats none of them, and a crowd of alike
/// ones is said in a few lines (`extproxy inspect` lists them all).
#[derive(Debug, Default)]
struct Reported {
    /// Each text logged, with its gist: what it says, without where and of which object
    /// (shared by the alike ones).
    texts: BTreeMap<String, Arc<str>>,
}

impl Reported {
    /// The lines to log for the diagnostics in force now: the new ones, then those resolved.
    /// Also returns every diagnostic's text.
    fn update(&mut self, diagnostics: &[Diagnostic]) -> (Vec<(Severity, String)>, Vec<String>) {
        let mut gists: HashMap<String, Arc<str>> = HashMap::new();
        let mut now: BTreeMap<String, Arc<str>> = BTreeMap::new();
        let mut texts = Vec::with_capacity(diagnostics.len());
        let mut new: Vec<(Severity, Arc<str>, String)> = Vec::new();
        for d in diagnostics {
            let text = d.to_string();
            let gist = match self.texts.get(&text) {
                Some(gist) => gist.clone(),
                None => {
                    let said = match &d.field {
                        Some(field) => format!("{field}: {}", d.message),
                        None => d.message.clone(),
                    };
                    let gist = gists
                        .entry(said)
                        .or_insert_with_key(|s| Arc::from(s.as_str()))
                        .clone();
                    new.push((d.severity, gist.clone(), text.clone()));
                    gist
                }
            };
            now.insert(text.clone(), gist);
            texts.push(text);
        }
        let mut lines = summarized(
            new.into_iter(),
            |text| text,
            |n, gist| {
                format!("{n} more with the same problem: {gist} (extproxy inspect lists them all)")
            },
        );
        let gone = self
            .texts
            .iter()
            .filter(|(text, _)| !now.contains_key(*text))
            .map(|(text, gist)| (Severity::Info, gist.clone(), text.clone()));
        lines.extend(summarized(
            gone,
            |text| format!("resolved: {text}"),
            |n, gist| format!("resolved for {n} more: {gist}"),
        ));
        self.texts = now;
        (lines, texts)
    }
}

/// `items` (severity, gist, text) as lines: the first few of each gist as `one(text)`, the
/// rest counted in one `more(count, gist)` after them.
fn summarized(
    items: impl Iterator<Item = (Severity, Arc<str>, String)>,
    one: impl Fn(String) -> String,
    more: impl Fn(usize, &str) -> String,
) -> Vec<(Severity, String)> {
    let mut lines = Vec::new();
    // Per gist, in order of first appearance: severity and how many were left out.
    let mut left_out: Vec<(Arc<str>, Severity, usize)> = Vec::new();
    let mut seen: HashMap<Arc<str>, usize> = HashMap::new();
    for (severity, gist, text) in items {
        let n = seen.entry(gist.clone()).or_default();
        *n += 1;
        if *n <= ALIKE_LOGGED {
            lines.push((severity, one(text)));
        } else if *n == ALIKE_LOGGED + 1 {
            left_out.push((gist, severity, 1));
        } else if let Some(entry) = left_out.iter_mut().find(|(g, _, _)| *g == gist) {
            entry.2 += 1;
        }
    }
    for (gist, severity, n) in left_out {
        lines.push((severity, more(n, &gist)));
    }
    lines
}

/// The Service serving each frontend in the maps `reconciler` programs: by its own ids, or
/// before it has given any, by `adopted` (the names of the ids of maps a previous agent left).
fn serving(
    reconciler: &Reconciler,
    adopted: &HashMap<u32, ObjectKey>,
) -> Vec<(FrontendKey, ObjectKey)> {
    let own: HashMap<u32, ObjectKey>;
    let names = if adopted.is_empty() {
        own = reconciler
            .service_ids()
            .map(|(key, id)| {
                let service = key.service();
                (id, service)
            })
            .collect();
        &own
    } else {
        adopted
    };
    reconciler
        .state()
        .frontends
        .iter()
        .filter_map(|(frontend, value)| Some((*frontend, names.get(&value.service_id)?.clone())))
        .collect()
}

/// Which Service each service id was, by the state file of the agent that left the maps.
fn previous_names(state_dir: &std::path::Path) -> HashMap<u32, ObjectKey> {
    let Ok(previous) = state::read(state_dir) else {
        return HashMap::new();
    };
    previous
        .services
        .into_iter()
        .map(|s| {
            let service = ObjectKey {
                namespace: s.namespace,
                name: s.name,
            };
            (s.id, service)
        })
        .collect()
}

fn log_sync_report(report: &SyncReport) -> usize {
    for err in &report.capacity_errors {
        tracing::error!("{err}");
    }
    for failure in &report.apply.failures {
        tracing::error!("{failure}");
    }
    report.capacity_errors.len() + report.apply.failures.len()
}

#[cfg(test)]
mod tests {
    use proxy_common::{Addr, FrontendKind, FrontendValue, PROTO_TCP, user::port_net};

    use super::*;
    use crate::reconcile::{Limits, MapSnapshot, MapState};
    use crate::translate::{
        Desired, DesiredService, FrontendSpec, IpFamily, Protocol, ServicePortKey, VecMap,
    };

    const LIMITS: Limits = Limits {
        max_services: 8,
        max_backends: 8,
    };

    fn frontend(ip: &str, port: u16) -> FrontendKey {
        FrontendKey {
            addr: Addr::from(ip.parse::<IpAddr>().unwrap()),
            port: port_net(port),
            proto: PROTO_TCP,
            pad: 0,
        }
    }

    /// 20,000 Services without endpoints gave 20,000 WARN lines at start, and as many
    /// "resolved" lines once they got endpoints.
    #[test]
    fn alike_diagnostics_are_summed_up() {
        use crate::diag::{ObjectRef, Origin, Site};
        let no_endpoints = |i: usize| {
            Site::new(
                Origin::Cluster,
                ObjectRef::new("Service", "default", format!("s{i}")),
            )
            .diagnostic(
                Severity::Warning,
                None,
                "no endpoints: connections will be refused",
            )
        };
        let mut all: Vec<Diagnostic> = (0..20_000).map(no_endpoints).collect();
        all.push(
            Site::new(Origin::Cluster, ObjectRef::new("Service", "default", "x"))
                .error("spec.type", "unknown type \"Foo\": treated as ClusterIP"),
        );
        let mut reported = Reported::default();
        let (lines, texts) = reported.update(&all);
        assert_eq!(texts.len(), 20_001);
        let rendered: Vec<String> = lines.iter().map(|(s, l)| format!("{s}: {l}")).collect();
        assert_eq!(
            rendered,
            [
                "warning: Service default/s0: no endpoints: connections will be refused",
                "warning: Service default/s1: no endpoints: connections will be refused",
                "warning: Service default/s2: no endpoints: connections will be refused",
                "warning: Service default/s3: no endpoints: connections will be refused",
                "warning: Service default/s4: no endpoints: connections will be refused",
                "error: Service default/x: spec.type: unknown type \"Foo\": treated as ClusterIP",
                "warning: 19995 more with the same problem: no endpoints: connections will be refused (extproxy inspect lists them all)",
            ]
        );
        // Nothing new: nothing said.
        assert!(reported.update(&all).0.is_empty());
        // One more: said alone.
        all.push(no_endpoints(20_000));
        assert_eq!(reported.update(&all).0.len(), 1);
        // All resolved but the error: five lines and a count.
        let (lines, _) = reported.update(&all[20_000..20_001]);
        assert_eq!(lines.len(), ALIKE_LOGGED + 1);
        assert_eq!(
            lines[ALIKE_LOGGED].1,
            "resolved for 19996 more: no endpoints: connections will be refused"
        );
    }

    /// What the translator is told is served comes from the maps: the reconciler's own ids, or
    /// after a restart the names the previous agent published for the ids it left.
    #[test]
    fn incumbents_are_read_from_the_maps_and_the_previous_agents_names() {
        let f = frontend("10.96.0.50", 80);
        let mut frontends = VecMap::new();
        frontends.insert(
            f,
            FrontendSpec {
                kind: FrontendKind::ClusterIp,
                flags: 0,
            },
        );
        let port = ServicePortKey {
            namespace: "z".into(),
            name: "serving".into(),
            port_name: "".into(),
            protocol: Protocol::Tcp,
            family: IpFamily::V4,
        };
        let mut desired = Desired::default();
        desired.services.insert(
            port,
            DesiredService {
                frontends,
                backends: VecMap::new(),
                affinity_timeout: 0,
                egress: None,
                extra_egress: Vec::new(),
                cluster_egress: false,
                source_ranges: Vec::new(),
                port: 80,
                cluster_ip: None,
                node_port: None,
                health: Default::default(),
            },
        );
        let mut reconciler = Reconciler::new(LIMITS);
        let mut maps = MapState::default();
        reconciler.sync(&desired, &mut maps);
        let serving_key = ObjectKey::new("z", "serving");
        assert_eq!(
            serving(&reconciler, &HashMap::new()),
            [(f, serving_key.clone())]
        );

        // Adopted maps: the ids are the previous agent's, and so are their names.
        let value = FrontendValue {
            service_id: 5,
            kind: FrontendKind::ClusterIp as u8,
            flags: 0,
            pad: [0; 2],
        };
        let snapshot = MapSnapshot {
            frontends: vec![(f, value)],
            ..MapSnapshot::default()
        };
        let adopted = Reconciler::from_snapshot(snapshot, LIMITS);
        assert!(serving(&adopted, &HashMap::new()).is_empty());
        let dir = std::env::temp_dir().join(format!("extproxy-agent-{}", std::process::id()));
        let previous = AgentState {
            services: vec![ServiceName {
                id: 5,
                namespace: "z".into(),
                name: "serving".into(),
                port_name: "".into(),
                protocol: "TCP".into(),
                family: "IPv4".into(),
            }],
            ..AgentState::default()
        };
        state::write(&dir, &previous).unwrap();
        let names = previous_names(&dir);
        assert_eq!(serving(&adopted, &names), [(f, serving_key)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
