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
    translate::{Desired, Translation},
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
}

/// What one `apply` did, for logs and metrics.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub services: usize,
    pub ops: usize,
    pub errors: usize,
    pub elapsed: Duration,
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
        }
    }

    pub fn reconciler(&self) -> &Reconciler {
        &self.reconciler
    }

    /// New egress and NodePort addresses (Kubernetes mode follows the Node); published with the
    /// next `apply`.
    pub fn set_node_facts(&mut self, egress: &[IpAddr], node_addresses: &[IpAddr]) {
        self.state.egress = egress.to_vec();
        self.state.node_addresses = node_addresses.to_vec();
    }

    /// Programs `translation` as a diff against what the maps hold and reports problems.
    pub fn apply(&mut self, translation: &Translation) -> Applied {
        let start = Instant::now();
        self.report_diagnostics(&translation.diagnostics);
        let report = self.reconciler.sync(&translation.desired, &mut self.maps);
        let errors = log_sync_report(&report);
        self.publish(&translation.desired, &translation.diagnostics);
        Applied {
            services: translation.desired.services.len(),
            ops: report.apply.applied,
            errors,
            elapsed: start.elapsed(),
        }
    }

    fn report_diagnostics(&mut self, diagnostics: &[Diagnostic]) {
        let now: BTreeSet<String> = diagnostics.iter().map(|d| d.to_string()).collect();
        for d in diagnostics {
            let text = d.to_string();
            if self.reported.contains(&text) {
                continue;
            }
            match d.severity {
                Severity::Error => tracing::error!("{text}"),
                Severity::Warning => tracing::warn!("{text}"),
                Severity::Info => tracing::info!("{text}"),
            }
        }
        for gone in self.reported.difference(&now) {
            tracing::info!("resolved: {gone}");
        }
        self.reported = now;
    }

    fn publish(&mut self, desired: &Desired, diagnostics: &[Diagnostic]) {
        self.state.services = self
            .reconciler
            .service_ids()
            .filter(|(key, _)| desired.services.contains_key(*key))
            .map(|(key, id)| ServiceName {
                id,
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                port_name: key.port_name.clone(),
                protocol: key.protocol.name().to_owned(),
                family: key.family.name().to_owned(),
            })
            .collect();
        self.state.diagnostics = diagnostics.iter().map(|d| d.to_string()).collect();
        if let Err(err) = state::write(&self.state_dir, &self.state) {
            tracing::warn!(
                "cannot write {}: {err} (extproxy inspect will show ids without names)",
                state::path(&self.state_dir).display()
            );
        }
    }

    /// Sweeps expired flows and warns when conntrack is close to full.
    pub fn sweep(&mut self) -> Option<GcReport> {
        let now = crate::host::monotonic_secs();
        match self.collector.sweep(&mut self.maps, &self.config, now) {
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
