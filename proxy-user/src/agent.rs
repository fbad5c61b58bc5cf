//! The agent's steady state, shared by manifest mode and Kubernetes mode: take a translation,
//! program the difference, say what happened, keep conntrack swept.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
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
    reported: BTreeSet<String>,
    ct_max: u32,
    /// The reconciler's ids as last published.
    published_ids: Option<u64>,
    /// `state` differs from the file.
    state_dirty: bool,
    last_write: Option<Instant>,
    /// The Service each service id of adopted maps was, by the previous agent's state file;
    /// until the first apply gives the ids names of their own.
    adopted_names: HashMap<u32, ObjectKey>,
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
            reported: BTreeSet::new(),
            ct_max,
            published_ids: None,
            state_dirty: true,
            last_write: None,
            adopted_names,
        }
    }

    /// The Service serving each frontend in the maps. A frontend stays with it, whoever else
    /// comes to want it: see [`crate::translate::Incremental::set_incumbents`].
    pub fn incumbents(&self) -> Vec<(FrontendKey, ObjectKey)> {
        serving(&self.reconciler, &self.adopted_names)
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
        let texts: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
        for (d, text) in diagnostics.iter().zip(&texts) {
            if self.reported.contains(text) {
                continue;
            }
            match d.severity {
                Severity::Error => tracing::error!("{text}"),
                Severity::Warning => tracing::warn!("{text}"),
                Severity::Info => tracing::info!("{text}"),
            }
        }
        let now: BTreeSet<String> = texts.iter().cloned().collect();
        for gone in self.reported.difference(&now) {
            tracing::info!("resolved: {gone}");
        }
        self.reported = now;
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
        let frontends = &self.reconciler.state().frontends;
        match self
            .collector
            .sweep(&mut self.maps, &self.config, now, frontends)
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
                let service = ObjectKey {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                };
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
                source_ranges: Vec::new(),
                port: 80,
                cluster_ip: None,
                node_port: None,
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
