//! The agent's steady state, shared by manifest mode and Kubernetes mode: take a translation,
//! program the difference, say what happened, keep conntrack swept.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use proxy_common::{Config, Counter};

use crate::{
    diag::{Diagnostic, Severity},
    gc::{Collector, GcReport},
    maps::DatapathMaps,
    reconcile::{Reconciler, SyncReport},
    state::{self, AgentState, ServiceName},
    translate::Translation,
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
        }
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

fn log_sync_report(report: &SyncReport) -> usize {
    for err in &report.capacity_errors {
        tracing::error!("{err}");
    }
    for failure in &report.apply.failures {
        tracing::error!("{failure}");
    }
    report.capacity_errors.len() + report.apply.failures.len()
}
