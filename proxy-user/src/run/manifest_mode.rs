//! Manifest mode: a folder of manifests, watched for changes, is the source of truth.

use std::{net::IpAddr, path::Path, time::Instant};

use anyhow::{Context as _, bail};
use extproxy::{
    health::{self, Monitor, PassiveReads},
    host,
    manifest::{ManifestSet, ParseQueue},
    metrics::Telemetry,
    state::AgentState,
    translate::{
        self, ClaimPolicy, ClusterEgressRules, Incremental, NodeInfo, Settings, Translation,
    },
    watch::DirWatcher,
};

use super::{
    Housekeeping,
    datapath::{Running, finish, start},
    fqdn, iface_addresses, refused, service_names, snat_ranges, stall_after, start_metrics, sweep,
};
use crate::cli::{RunArgs, ServiceArgs};

pub async fn run_manifests(
    args: &RunArgs,
    cluster_egress: &super::egress::Parsed,
    dir: &Path,
    ifaces: &[String],
) -> anyhow::Result<()> {
    let dp = &args.datapath;
    let manifests =
        std::fs::canonicalize(dir).with_context(|| format!("--manifests {}", dir.display()))?;

    // Node addresses: NodePorts listen on them; the first of each family is the default egress.
    let mut iface_addrs = Vec::new();
    for iface in ifaces {
        let addrs = iface_addresses(std::slice::from_ref(iface))?;
        if addrs.is_empty() {
            bail!("--iface {iface}: the interface has no addresses (or does not exist)");
        }
        iface_addrs.extend(addrs);
    }
    let node_addresses = if args.node.node_ips.is_empty() {
        iface_addrs.clone()
    } else {
        args.node.node_ips.clone()
    };
    let mut egress = args.node.egress_ips.clone();
    for v6 in [false, true] {
        if !egress.iter().any(|a| a.is_ipv6() == v6)
            && let Some(a) = iface_addrs.iter().find(|a| a.is_ipv6() == v6)
        {
            egress.push(*a);
        }
    }
    tracing::info!(
        "egress (SNAT) address(es): {}; NodePort addresses: {}",
        host::join_addrs(&egress, ", ", "none"),
        host::join_addrs(&node_addresses, ", ", "none")
    );
    let snat = snat_ranges(args);
    for w in host::check_sysctls(true, egress.iter().any(IpAddr::is_ipv6), &snat) {
        tracing::warn!("{w}");
    }

    let state = AgentState {
        pid: std::process::id(),
        source: format!("manifests:{}", manifests.display()),
        interfaces: ifaces.to_vec(),
        egress: egress.clone(),
        node_addresses: node_addresses.clone(),
        ..AgentState::default()
    };
    let started = Instant::now();
    let (verifying, mut agent, mut dp_events) = start(dp, ifaces, state, &snat)?;
    agent.tunnel_ip = args.egress.tunnel_ip;
    agent.set_tunnel_source(&iface_addrs);
    let mut refusals = extproxy::refusals::Refusals::default();
    let loaded = started.elapsed();
    let telemetry = Telemetry::new(stall_after(dp.gc_interval));
    start_metrics(args.kube.metrics_address, None, &telemetry, &dp.pin_dir).await?;

    let settings = settings(
        &args.services,
        &egress,
        cluster_egress.config.rules(),
        true,
        ClaimPolicy::SelectorLess,
    );
    let node = NodeInfo {
        addresses: node_addresses,
    };
    let started = Instant::now();
    let mut set = ManifestSet::read_dir(&manifests)
        .with_context(|| format!("reading {}", manifests.display()))?;
    let read = started.elapsed();
    let mut watcher = DirWatcher::new(&manifests).context("watching the manifests")?;
    let mut translator = Incremental::new(node, settings);
    // Frontends the (adopted) maps serve stay with their Service, whatever a newer file says.
    translator.set_incumbents(agent.incumbents());
    set.feed(&mut translator);
    let mut dns = fqdn::resolver(args, &telemetry);
    fqdn::want(&mut dns, &translator.dns_wanted(), true).await;
    translator.set_resolved(dns.resolved());
    let t = translator.update();
    tracing::info!(
        "start-up: maps created in {:.0} ms, {} manifest file(s) read in {:.0} ms, translated in \
         {:.0} ms",
        loaded.as_secs_f64() * 1e3,
        set.files().count(),
        read.as_secs_f64() * 1e3,
        (started.elapsed() - read).as_secs_f64() * 1e3
    );
    print_summary(t, SUMMARY_LINES);
    let applied = agent.apply(t);
    telemetry.record_apply(t, &applied, Some(service_names(&agent)));
    let mut health = Monitor::new();
    telemetry.set_health_metrics(health.metrics());
    health.sync(t, agent.reconciler());
    tracing::info!(
        "programmed {} service port(s) with {} map updates in {:.1} ms",
        applied.services,
        applied.ops,
        applied.elapsed.as_secs_f64() * 1e3
    );
    host::release_free_memory();

    // Attached only now: the programs must find the maps programmed.
    let (loaded, verified) = verifying.wait()?;
    tracing::info!(
        "start-up: programs verified in {:.0} ms (beside the above)",
        verified.as_secs_f64() * 1e3
    );
    let mut running = Running::attach(loaded, agent, ifaces, dp, "none", &telemetry)?;
    let cluster_egress =
        super::egress::start_manifest(args, cluster_egress, ifaces, &iface_addrs, &telemetry)?;
    tracing::info!("extproxy is running; watching {}", manifests.display());

    let mut reads = ParseQueue::new();
    let mut hk = Housekeeping::new(dp)?;
    let mut passive = health_poll();
    let mut passive_reads = PassiveReads::open(&dp.pin_dir);
    loop {
        tokio::select! {
            _ = hk.sigint.recv() => break,
            _ = hk.sigterm.recv() => break,
            changes = watcher.next() => {
                // Read and parsed on other threads: a slow file holds up no other.
                for path in changes.removed {
                    reads.remove(path);
                }
                for path in changes.updated {
                    reads.read(path);
                }
            }
            files = reads.next() => {
                let count = files.len();
                for (path, read) in files {
                    set.apply_read(&path, read);
                }
                set.feed(&mut translator);
                fqdn::want(&mut dns, &translator.dns_wanted(), false).await;
                let t = translator.update();
                let applied = running.agent.apply(t);
                let names = applied.names_changed.then(|| service_names(&running.agent));
                telemetry.record_apply(t, &applied, names);
                tracing::info!(
                    "manifests changed ({count} file(s)): {} map updates in {:.2} ms",
                    applied.ops,
                    applied.elapsed.as_secs_f64() * 1e3
                );
                health.sync(t, running.agent.reconciler());
            }
            resolved = dns.next() => {
                translator.set_resolved(resolved);
                dns_changed(&mut translator, &mut running.agent, &telemetry, &mut health);
            }
            result = health.next_result() => health.on_probe(result),
            _ = passive.tick() => health.poll_on(&running.agent.maps, passive_reads.as_mut()),
            (counters, took) = PassiveReads::done_of(&mut passive_reads) => {
                health.counters_read(counters, took);
            }
            events = running.pods.next() => running.pod_events(events, &telemetry),
            events = dp_events.next() => {
                refused(&events, &mut refusals, &running.agent, &telemetry);
            }
            _ = hk.gc.tick() => {
                let report = sweep(&mut running.agent, &telemetry);
                refused(&[], &mut refusals, &running.agent, &telemetry);
                if let Some(resolved) = fqdn::after_sweep(&mut dns, report.as_ref()) {
                    translator.set_resolved(resolved);
                    dns_changed(&mut translator, &mut running.agent, &telemetry, &mut health);
                }
            }
            _ = hk.flush.tick() => running.agent.flush_state(),
        }
        if health.tell(&mut translator) {
            let t = translator.update();
            let applied = running.agent.apply(t);
            let names = applied.names_changed.then(|| service_names(&running.agent));
            telemetry.record_apply(t, &applied, names);
            health.sync(t, running.agent.reconciler());
        }
        health.take_reports();
        if let Some(records) = health.take_records() {
            running.agent.set_health(records);
        }
    }
    running.agent.flush_state_now();
    dns.flush_state_now();
    if !dp.keep_on_exit {
        let _ = std::fs::remove_file(extproxy::dns::report::path(&dp.state_dir));
    }
    if let Some(egress) = cluster_egress {
        egress.stop().await;
    }
    finish(running, dp, dp.keep_on_exit)
}

/// Programs what new DNS answers changed.
fn dns_changed(
    translator: &mut Incremental,
    agent: &mut extproxy::agent::Agent,
    telemetry: &Telemetry,
    health: &mut Monitor,
) {
    let t = translator.update();
    let applied = agent.apply(t);
    let names = applied.names_changed.then(|| service_names(agent));
    telemetry.record_apply(t, &applied, names);
    // New addresses are new endpoints to check.
    health.sync(t, agent.reconciler());
    if applied.ops > 0 {
        tracing::info!(
            "DNS answers changed: {} map updates in {:.2} ms",
            applied.ops,
            applied.elapsed.as_secs_f64() * 1e3
        );
    }
}

/// The passive health counters' reading pace; a late tick is not caught up (a busy loop must
/// not read them twice in a row).
pub(super) fn health_poll() -> tokio::time::Interval {
    let mut poll = tokio::time::interval(health::PASSIVE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll
}

pub fn settings(
    args: &ServiceArgs,
    egress: &[IpAddr],
    cluster_egress: ClusterEgressRules,
    fill_missing: bool,
    claim: ClaimPolicy,
) -> Settings {
    Settings {
        egress_v4: egress
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(v) => Some(*v),
                _ => None,
            })
            .collect(),
        egress_v6: egress
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(v) => Some(*v),
                _ => None,
            })
            .collect(),
        cluster_egress,
        service_cidrs: args.service_cidrs.clone(),
        node_port_range: args.node_port_range.clone(),
        fill_missing,
        claim,
    }
}

/// How many lines of each kind [`print_summary`] logs at start: at 20,000 Services one line per
/// Service port made 20,000 INFO lines (`extproxy inspect` lists them all).
pub const SUMMARY_LINES: usize = extproxy::agent::ALIKE_LOGGED;

/// What clients reach and where it goes, a line per service port, and the values filled in:
/// the first `at_most` of each, then a count of the rest.
pub fn print_summary(t: &Translation, at_most: usize) {
    for line in summary(t, at_most) {
        tracing::info!("{line}");
    }
}

fn summary(t: &Translation, at_most: usize) -> Vec<String> {
    let mut lines: Vec<String> = t
        .filled
        .iter()
        .take(at_most)
        .map(|f| {
            format!(
                "{}: {} = {} (filled in: the manifest has none)",
                f.service, f.field, f.value
            )
        })
        .collect();
    if let Some(more) = t.filled.len().checked_sub(at_most).filter(|n| *n > 0) {
        lines.push(format!(
            "{more} more values filled in (extproxy inspect shows every frontend)"
        ));
    }
    for (key, svc) in t.desired.services.iter().take(at_most) {
        let mut fronts: Vec<String> = svc
            .frontends
            .iter()
            .map(|(k, v)| {
                let kind =
                    proxy_common::FrontendKind::from_u8(v.kind as u8).map_or("?", |k| k.name());
                format!("{kind} {}:{}", k.addr, u16::from_be(k.port))
            })
            .collect();
        fronts.dedup();
        let active = svc
            .backends
            .values()
            .filter(|r| **r == translate::BackendRole::Active)
            .count();
        let endpoints = if active == 0 {
            "no endpoints: connections refused".to_owned()
        } else {
            format!("{active} endpoint(s)")
        };
        lines.push(format!(
            "serving {key}: {} -> {endpoints}",
            fronts.join(", ")
        ));
    }
    let services = t.desired.services.len();
    if services > at_most {
        lines.push(format!(
            "serving {} more service port(s) (extproxy inspect lists them all)",
            services - at_most
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use extproxy::manifest::ManifestSet;

    /// 20,000 Services without clusterIP or nodePort made 40,000 "filled in" and 20,000
    /// "serving" INFO lines at start; 2,000 here.
    #[test]
    fn the_start_up_summary_is_a_few_lines_at_any_size() {
        let mut set = ManifestSet::default();
        let text: String = (0..2_000)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: d}}\n\
                     spec: {{type: NodePort, ports: [{{port: 80}}]}}\n---\n"
                )
            })
            .collect();
        set.update_file_text(std::path::Path::new("all.yaml"), &text);
        let (inventory, _) = set.inventory();
        let settings = Settings {
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            fill_missing: true,
            ..Settings::default()
        };
        let t = translate::translate(&inventory, &NodeInfo::default(), &settings);
        assert_eq!(t.desired.services.len(), 2_000);
        assert_eq!(t.filled.len(), 4_000);
        let lines = summary(&t, SUMMARY_LINES);
        assert_eq!(lines.len(), 2 * (SUMMARY_LINES + 1), "{lines:#?}");
        assert_eq!(
            lines[SUMMARY_LINES],
            "3995 more values filled in (extproxy inspect shows every frontend)"
        );
        assert_eq!(
            lines.last().unwrap(),
            "serving 1995 more service port(s) (extproxy inspect lists them all)"
        );
        // `validate` lists them all.
        assert_eq!(summary(&t, usize::MAX).len(), 6_000);
    }
}
