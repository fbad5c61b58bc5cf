//! Kubernetes mode: Services, EndpointSlices and this node's Node object from the API server.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, bail};
use extproxy::{
    health::{Monitor, PassiveReads, share::Sharing},
    host,
    kube::{self as kubemode, Batch, KubeSource, NodeOverrides, SourceConfig},
    metrics::{self, Telemetry},
    state::AgentState,
};

use super::{
    Housekeeping,
    datapath::{Running, finish, start},
    fqdn, iface_addresses, refused, snat_ranges, stall_after, start_metrics, sweep,
};
use crate::cli::RunArgs;

pub async fn run_kube(
    args: &RunArgs,
    cluster_egress: &super::egress::Parsed,
    ifaces: &[String],
) -> anyhow::Result<()> {
    let dp = &args.datapath;
    let Some(node_name) = args.kube.node_name.clone().filter(|n| !n.is_empty()) else {
        bail!(
            "Kubernetes mode needs this node's name: pass --node-name NAME or set NODE_NAME \
             (the DaemonSet in deploy/ sets it from spec.nodeName); or pass --manifests DIR for \
             manifest mode"
        );
    };
    let iface_addrs = iface_addresses(ifaces)?;
    if iface_addrs.is_empty() {
        tracing::warn!(
            "{} has no addresses: egress and NodePort addresses come from Node {node_name} only",
            ifaces.join(", ")
        );
    }
    let overrides = NodeOverrides {
        egress_ips: args.node.egress_ips.clone(),
        node_ips: args.node.node_ips.clone(),
        iface_addrs,
    };
    let v6 = overrides
        .egress_ips
        .iter()
        .chain(&overrides.iface_addrs)
        .any(IpAddr::is_ipv6);
    let snat = snat_ranges(args);
    for w in host::check_sysctls(true, v6, &snat) {
        tracing::warn!("{w}");
    }

    let telemetry = Telemetry::new(stall_after(dp.gc_interval));
    let config = kubemode::load_config(args.kube.kubeconfig.as_deref())
        .await
        .context("Kubernetes client configuration")?;
    let api_url = config.cluster_url.to_string();
    let client = kubemode::client::client(config, telemetry.clone())
        .context("building the Kubernetes client")?;
    {
        // Only for the log: the watchers do the real connecting (and retrying).
        let client = client.clone();
        tokio::spawn(async move {
            match client.apiserver_version().await {
                Ok(v) => tracing::info!("API server {api_url}: Kubernetes {}", v.git_version),
                Err(err) => tracing::warn!("API server {api_url} does not answer yet: {err}"),
            }
        });
    }

    let state = AgentState {
        pid: std::process::id(),
        source: format!("kubernetes:{node_name}"),
        interfaces: ifaces.to_vec(),
        ..AgentState::default()
    };
    let (verifying, mut agent, mut dp_events) = start(dp, ifaces, state, &snat)?;
    // The node facts (set at each batch) give the tunnel its source unless this says otherwise.
    agent.tunnel_ip = args.egress.tunnel_ip;
    let mut refusals = extproxy::refusals::Refusals::default();
    let mut source = KubeSource::new(
        client.clone(),
        SourceConfig {
            node_name: node_name.clone(),
            claim_all_selectorless: args.kube.claim_all_selectorless,
            overrides,
            streaming_lists: args.kube.streaming_lists,
            cluster_egress: cluster_egress.config.rules(),
        },
        telemetry.clone(),
    );
    // The initial lists (seconds at 10k Services) arrive while the kernel verifies the programs,
    // instead of after.
    let (loaded, mut first_batch) = verified_while_listing(verifying, &mut source).await?;
    // Attach before the first sync: a previous agent's links are taken over at once (its maps
    // keep forwarding until the cluster is known again); fresh maps pass everything meanwhile.
    let mut running = Running::attach(loaded, agent, ifaces, dp, "auto", &telemetry)?;
    let default_listen: SocketAddr = metrics::DEFAULT_METRICS_ADDRESS.parse()?;
    start_metrics(
        args.kube.metrics_address,
        Some(default_listen),
        &telemetry,
        &dp.pin_dir,
    )
    .await?;

    let namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| extproxy::health::share::DEFAULT_NAMESPACE.to_owned());
    let mut sharing = Sharing::start(client.clone(), &namespace, &node_name);
    let cluster_egress = super::egress::start_kube(
        args,
        cluster_egress,
        ifaces,
        client.clone(),
        &node_name,
        &telemetry,
    )?;
    tracing::info!(
        "extproxy is running on node {node_name}; watching Services, EndpointSlices and Node \
         {node_name}"
    );
    let mut hk = Housekeeping::new(dp)?;
    let mut trimmed = false;
    let mut dns = fqdn::resolver(args, &telemetry);
    let mut health = Monitor::new();
    telemetry.set_health_metrics(health.metrics());
    let mut passive = super::manifest_mode::health_poll();
    let mut passive_reads = PassiveReads::open(&dp.pin_dir);
    loop {
        tokio::select! {
            _ = hk.sigint.recv() => break,
            _ = hk.sigterm.recv() => break,
            batch = next_batch(&mut source, &mut first_batch) => {
                // The first programming (and one after a relist) waits for the names' answers.
                fqdn::want(&mut dns, &source.dns_wanted(), batch.fresh()).await;
                source.set_resolved(dns.resolved());
                source.apply(batch, &mut running.agent);
                if let Some(t) = source.translation() {
                    health.sync(t, running.agent.reconciler());
                }
                if !trimmed {
                    // The initial lists and the first translation leave much freed memory.
                    host::release_free_memory();
                    trimmed = true;
                }
            }
            events = running.pods.next() => running.pod_events(events, &telemetry),
            events = dp_events.next() => {
                let reports = refused(&events, &mut refusals, &running.agent, &telemetry);
                report_refusals(&source, reports);
            }
            resolved = dns.next() => {
                source.set_resolved(resolved);
                source.dns_changed();
            }
            _ = hk.gc.tick() => {
                let report = sweep(&mut running.agent, &telemetry);
                let reports = refused(&[], &mut refusals, &running.agent, &telemetry);
                report_refusals(&source, reports);
                if let Some(resolved) = fqdn::after_sweep(&mut dns, report.as_ref()) {
                    source.set_resolved(resolved);
                    source.dns_changed();
                }
            }
            result = health.next_result() => health.on_probe(result),
            (counters, took) = PassiveReads::done_of(&mut passive_reads) => {
                health.counters_read(counters, took);
            }
            _ = passive.tick() => {
                health.poll_on(&running.agent.maps, passive_reads.as_mut());
                // Probers publish; the others follow them while one is live.
                let prober = source.is_health_prober();
                health.set_follow(sharing.to_follow(prober, std::time::SystemTime::now()));
                if prober {
                    sharing.publish(health.own_verdicts());
                }
            }
            _ = hk.flush.tick() => running.agent.flush_state(),
        }
        // New verdicts make the next batch at once (the source is marked dirty).
        for (service, unhealthy) in health.take_changes() {
            source.set_unhealthy(service, unhealthy);
        }
        for report in health.take_reports() {
            source.report_health(&report);
        }
        if let Some(records) = health.take_records() {
            running.agent.set_health(records);
        }
    }
    running.agent.flush_state_now();
    dns.flush_state_now();
    if dp.detach_on_exit {
        let _ = std::fs::remove_file(extproxy::dns::report::path(&dp.state_dir));
    }
    if let Some(egress) = cluster_egress {
        egress.stop().await;
    }
    // A DaemonSet rollout restarts the agent: flows must survive it, so keeping is the default.
    finish(running, dp, !dp.detach_on_exit)
}

/// Waits for the programs' verification, pulling the cluster's initial state meanwhile: the
/// loaded data path, and the first batch if it came before verification ended.
async fn verified_while_listing(
    verifying: super::datapath::Verifying,
    source: &mut KubeSource,
) -> anyhow::Result<(super::datapath::Loaded, Option<Batch>)> {
    let mut verified = tokio::task::spawn_blocking(move || verifying.wait());
    let mut first = None;
    loop {
        tokio::select! {
            done = &mut verified => {
                let (loaded, _) = done.context("the program verifier")??;
                return Ok((loaded, first));
            }
            batch = source.next(), if first.is_none() => first = Some(batch),
        }
    }
}

/// The batch pulled before the programs were attached, else the source's next.
async fn next_batch(source: &mut KubeSource, early: &mut Option<Batch>) -> Batch {
    match early.take() {
        Some(batch) => batch,
        None => source.next().await,
    }
}

/// An Event on the Service of each refusal problem (one per problem, counting its episodes).
fn report_refusals(source: &KubeSource, reports: Vec<extproxy::refusals::Report>) {
    for r in reports {
        let key = &r.key;
        source.report_problem(
            extproxy::translate::ObjectKey::new(&key.service.namespace, &key.service.name),
            key.reason.name(),
            format!("{} from {}", key.endpoint, key.egress),
            key.describe(),
        );
    }
}
