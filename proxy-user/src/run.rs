//! `extproxy run`: the two modes, and what their start, control loop and exit share.

mod datapath;
mod egress;
mod kube_mode;
// `validate` prints and translates manifests the way manifest mode does.
pub mod manifest_mode;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use extproxy::{
    agent::Agent,
    host, kube as kubemode, loader,
    metrics::{self, DatapathReader, Telemetry},
    refusals::{self, Refusals},
    snat::{self, SnatPorts},
    translate,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{DatapathArgs, Listen, RunArgs};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    loader::ensure_bpffs().context("bpffs")?;
    let ifaces = resolve_ifaces(&args.node.ifaces)?;
    match &args.manifests {
        Some(dir) => manifest_mode::run_manifests(&args, dir, &ifaces).await,
        None => kube_mode::run_kube(&args, &ifaces).await,
    }
}

/// The SNAT port ranges `--snat-ports` asks for (`auto`: from the node's settings), logged with
/// what they sustain and a warning when that is too little.
fn snat_ranges(args: &RunArgs) -> Vec<std::ops::RangeInclusive<u16>> {
    let ranges = match &args.datapath.snat_ports {
        SnatPorts::Ranges(r) => r.clone(),
        SnatPorts::Auto => {
            let ephemeral = snat::ephemeral_range();
            if ephemeral.is_none() {
                tracing::warn!(
                    "net.ipv4.ip_local_port_range is unreadable: --snat-ports auto leaves out only \
                     the NodePort range; local sockets may collide with SNAT ports"
                );
            }
            snat::auto_ranges(ephemeral, &args.services.node_port_range)
        }
    };
    let described = snat::describe(&ranges);
    let ports: u32 = ranges.iter().map(|r| r.len() as u32).sum();
    let capacity = snat::Capacity::of(
        ports,
        proxy_common::Config::DEFAULT.tcp_closing_timeout,
        snat::ENDPOINT_TIME_WAIT_SECS,
    );
    tracing::info!("SNAT ports {described}: {capacity}");
    if let Some(w) = capacity.warning(&described) {
        tracing::warn!("{w}");
    }
    ranges
}

/// `--iface auto` stands for the interface(s) of the default route: the uplink name differs
/// between clusters and nodes, one DaemonSet must fit all.
fn resolve_ifaces(ifaces: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for iface in ifaces {
        if iface != "auto" {
            out.push(iface.clone());
            continue;
        }
        let found = kubemode::node::default_route_interfaces().context("--iface auto")?;
        tracing::info!(
            "--iface auto: {} (the default route's interface)",
            found.join(", ")
        );
        out.extend(found.into_iter().filter(|i| !ifaces.contains(i)));
    }
    out.dedup();
    Ok(out)
}

fn iface_addresses(ifaces: &[String]) -> anyhow::Result<Vec<IpAddr>> {
    let mut addrs = Vec::new();
    for iface in ifaces {
        addrs.extend(host::interface_addresses(iface).with_context(|| format!("--iface {iface}"))?);
    }
    Ok(addrs)
}

/// What both modes' control loops wait on besides their source of changes.
struct Housekeeping {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    /// Conntrack sweep (and the health heartbeat).
    gc: tokio::time::Interval,
    /// Publishing the state file for `inspect`.
    flush: tokio::time::Interval,
}

impl Housekeeping {
    fn new(dp: &DatapathArgs) -> anyhow::Result<Self> {
        Ok(Housekeeping {
            sigint: signal(SignalKind::interrupt())?,
            sigterm: signal(SignalKind::terminate())?,
            gc: tokio::time::interval(Duration::from_secs(dp.gc_interval.max(1))),
            flush: tokio::time::interval(Duration::from_secs(1)),
        })
    }
}

/// Binds the health and metrics address (failing start-up if it is taken) and serves it in the
/// background.
async fn start_metrics(
    listen: Option<Listen>,
    default: Option<SocketAddr>,
    telemetry: &Arc<Telemetry>,
    pin_dir: &Path,
) -> anyhow::Result<()> {
    let addr = match (listen, default) {
        (Some(Listen::At(addr)), _) | (None, Some(addr)) => addr,
        (Some(Listen::Off), _) | (None, None) => return Ok(()),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-address {addr}"))?;
    let reader = match DatapathReader::open(pin_dir) {
        Ok(reader) => Some(reader),
        Err(err) => {
            tracing::warn!("/metrics will not show data path statistics: {err}");
            None
        }
    };
    tracing::info!("serving /healthz, /readyz and /metrics on http://{addr}");
    tokio::spawn(metrics::serve(listener, telemetry.clone(), reader));
    Ok(())
}

/// /healthz fails when the control loop misses this many conntrack sweeps in a row (it checks in
/// at every sweep), and never sooner than a minute.
fn stall_after(gc_interval: u64) -> Duration {
    Duration::from_secs((3 * gc_interval.max(1)).max(60))
}

fn service_names(agent: &Agent) -> Vec<(u32, translate::ServicePortKey)> {
    kubemode::Programmer::service_names(agent)
}

/// New flows the data path refused: counted, logged per problem at most every
/// [`refusals::LOG_INTERVAL`], exported; returns what is to be reported (Kubernetes mode turns it
/// into Events).
fn refused(
    events: &[proxy_common::Event],
    refusals: &mut Refusals,
    agent: &Agent,
    telemetry: &Telemetry,
) -> Vec<refusals::Report> {
    if !events.is_empty() {
        let names: std::collections::HashMap<u32, translate::ServicePortKey> =
            service_names(agent).into_iter().collect();
        refusals.record(events, |id| names.get(&id).cloned());
    }
    let reports = refusals.due(std::time::Instant::now());
    for r in &reports {
        tracing::warn!("{}", r.log_line());
    }
    telemetry.set_refused(refusals.totals());
    reports
}

fn sweep(agent: &mut Agent, telemetry: &Telemetry) {
    telemetry.heartbeat();
    if let Some(report) = agent.sweep() {
        telemetry.record_gc(&report);
    }
}
