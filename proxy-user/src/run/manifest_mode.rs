//! Manifest mode: a folder of manifests, watched for changes, is the source of truth.

use std::{net::IpAddr, path::Path, time::Instant};

use anyhow::{Context as _, bail};
use extproxy::{
    host,
    manifest::ManifestSet,
    metrics::Telemetry,
    state::AgentState,
    translate::{self, ClaimPolicy, Incremental, NodeInfo, Settings, Translation},
    watch::DirWatcher,
};

use super::{
    Housekeeping,
    datapath::{Running, finish, start},
    iface_addresses, refused, service_names, snat_ranges, stall_after, start_metrics, sweep,
};
use crate::cli::{RunArgs, ServiceArgs};

pub async fn run_manifests(args: &RunArgs, dir: &Path, ifaces: &[String]) -> anyhow::Result<()> {
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
    let mut refusals = extproxy::refusals::Refusals::default();
    let loaded = started.elapsed();
    let telemetry = Telemetry::new(stall_after(dp.gc_interval));
    start_metrics(args.kube.metrics_address, None, &telemetry, &dp.pin_dir).await?;

    let settings = settings(&args.services, &egress, true, ClaimPolicy::SelectorLess);
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
    let t = translator.update();
    tracing::info!(
        "start-up: maps created in {:.0} ms, {} manifest file(s) read in {:.0} ms, translated in \
         {:.0} ms",
        loaded.as_secs_f64() * 1e3,
        set.files().count(),
        read.as_secs_f64() * 1e3,
        (started.elapsed() - read).as_secs_f64() * 1e3
    );
    print_summary(t);
    let applied = agent.apply(t);
    telemetry.record_apply(t, &applied, Some(service_names(&agent)));
    tracing::info!(
        "programmed {} service port(s) with {} map updates in {:.1} ms",
        applied.services,
        applied.ops,
        applied.elapsed.as_secs_f64() * 1e3
    );
    host::release_free_memory();

    // Attached only now: the programs must find the maps programmed.
    let (ebpf, verified) = verifying.wait()?;
    tracing::info!(
        "start-up: programs verified in {:.0} ms (beside the above)",
        verified.as_secs_f64() * 1e3
    );
    let mut running = Running::attach(ebpf, agent, ifaces, dp, "none", &telemetry)?;
    let cluster_egress = super::egress::start_manifest(args, ifaces, &iface_addrs, &telemetry)?;
    tracing::info!("extproxy is running; watching {}", manifests.display());

    let mut hk = Housekeeping::new(dp)?;
    loop {
        tokio::select! {
            _ = hk.sigint.recv() => break,
            _ = hk.sigterm.recv() => break,
            changes = watcher.next() => {
                for path in &changes.removed {
                    set.remove_file(path);
                }
                for path in &changes.updated {
                    set.update_file(path);
                }
                set.feed(&mut translator);
                let t = translator.update();
                let applied = running.agent.apply(t);
                let names = applied.names_changed.then(|| service_names(&running.agent));
                telemetry.record_apply(t, &applied, names);
                tracing::info!(
                    "manifests changed ({} file(s)): {} map updates in {:.2} ms",
                    changes.updated.len() + changes.removed.len(),
                    applied.ops,
                    applied.elapsed.as_secs_f64() * 1e3
                );
            }
            events = running.pods.next() => running.pod_events(events, &telemetry),
            events = dp_events.next() => {
                refused(&events, &mut refusals, &running.agent, &telemetry);
            }
            _ = hk.gc.tick() => {
                sweep(&mut running.agent, &telemetry);
                refused(&[], &mut refusals, &running.agent, &telemetry);
            }
            _ = hk.flush.tick() => running.agent.flush_state(),
        }
    }
    running.agent.flush_state_now();
    if let Some(egress) = cluster_egress {
        egress.stop().await;
    }
    finish(running, dp, dp.keep_on_exit)
}

pub fn settings(
    args: &ServiceArgs,
    egress: &[IpAddr],
    fill_missing: bool,
    claim: ClaimPolicy,
) -> Settings {
    Settings {
        egress_v4: egress.iter().find_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            _ => None,
        }),
        egress_v6: egress.iter().find_map(|a| match a {
            IpAddr::V6(v) => Some(*v),
            _ => None,
        }),
        service_cidrs: args.service_cidrs.clone(),
        node_port_range: args.node_port_range.clone(),
        fill_missing,
        claim,
    }
}

/// One line per service port: what clients reach and where it goes.
pub fn print_summary(t: &Translation) {
    for f in &t.filled {
        tracing::info!(
            "{}: {} = {} (filled in: the manifest has none)",
            f.service,
            f.field,
            f.value
        );
    }
    for (key, svc) in &t.desired.services {
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
        tracing::info!("serving {key}: {} -> {endpoints}", fronts.join(", "));
    }
}
