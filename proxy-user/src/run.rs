//! `extproxy run`: the two modes, and what their start, control loop and exit share.

mod datapath;
mod egress;
pub use egress::config as egress_config;
mod fqdn;
mod kube_mode;
// `validate` prints and translates manifests the way manifest mode does.
pub mod manifest_mode;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use extproxy::{
    agent::Agent,
    bpffs::Lifetime,
    host, kube as kubemode, loader,
    lock::AgentLock,
    metrics::{self, DatapathReader, Telemetry},
    refusals::{self, Refusals},
    snat::{self, SnatPorts},
    state, translate,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{DatapathArgs, Listen, RunArgs};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if let Err(problems) = extproxy::translate::check_egress_addresses(&args.node.egress_ips) {
        bail!("--egress-ip: {}", problems.join("; "));
    }
    let cluster_egress = egress::parse(&args.egress)?;
    let mounted_here = loader::ensure_bpffs().context("bpffs")?;
    check_pins_outlive_us(&args, mounted_here)?;
    let dp = &args.datapath;
    let lock = AgentLock::acquire(
        &dp.state_dir,
        &dp.pin_dir,
        Duration::from_secs(dp.lock_wait),
        |holder| {
            tracing::warn!(
                "{holder}; waiting up to {} s for it to exit (--lock-wait)",
                dp.lock_wait
            );
        },
    );
    let lock = match lock {
        Ok(lock) => lock,
        Err(err) => {
            state::remove_dir_if_empty(&dp.state_dir);
            return Err(err).context(
                "one agent per node: stop the other one first (two would swap programs under \
                 each other)",
            );
        }
    };
    let result = match resolve_ifaces(&args.node.ifaces) {
        Ok(ifaces) => match &args.manifests {
            Some(dir) => manifest_mode::run_manifests(&args, &cluster_egress, dir, &ifaces).await,
            None => kube_mode::run_kube(&args, &cluster_egress, &ifaces).await,
        },
        Err(err) => Err(err),
    };
    lock.release();
    // Nothing is left in it unless the next agent needs it (--keep-on-exit: the state file).
    state::remove_dir_if_empty(&dp.state_dir);
    result
}

/// Whether the agent leaves its data path (pins) to the next agent when it exits.
fn keeps_pins(args: &RunArgs) -> bool {
    match args.manifests {
        Some(_) => args.datapath.keep_on_exit,
        // A DaemonSet rollout restarts the agent: flows must survive it.
        None => !args.datapath.detach_on_exit,
    }
}

/// Refuses to leave the data path to a next agent when its pins would not outlive this process:
/// under `ip netns exec` the agent pinned into a bpffs of its own, which went with it, and the
/// next agent started from empty maps without a word (the issue saw 100 of 100 flows lost).
fn check_pins_outlive_us(args: &RunArgs, mounted_here: bool) -> anyhow::Result<()> {
    let pin_dir = &args.datapath.pin_dir;
    let lifetime = Lifetime::of(pin_dir, mounted_here);
    if let Lifetime::NotBpffs(fs) = &lifetime {
        bail!(
            "--pin-dir {}: not on a bpffs ({fs}); maps and links can only be pinned in one \
             (`mount -t bpf bpf DIR`)",
            pin_dir.display()
        );
    }
    let Some(why) = lifetime.dies_with_process() else {
        return Ok(());
    };
    let pins = format!(
        "the pins in {} would not outlive this process: {why}",
        pin_dir.display()
    );
    if !keeps_pins(args) {
        tracing::info!(
            "{pins}. Without --keep-on-exit they are removed at exit anyway; if the agent is \
             killed, its data path goes with it"
        );
        return Ok(());
    }
    match args.manifests {
        Some(_) => bail!(
            "--keep-on-exit: {pins}. The next agent would find nothing: every tracked connection \
             would be forgotten. Start extproxy in the host's mount namespace \
             (`nsenter --net=/var/run/netns/NAME extproxy run ...` instead of \
             `ip netns exec NAME extproxy run ...`), or run without --keep-on-exit"
        ),
        None => bail!(
            "{pins}. Kubernetes mode leaves the data path to the next agent so that established \
             connections survive a restart; here every one would be forgotten. Give the agent the \
             host's /sys/fs/bpf (deploy/daemonset.yaml mounts it as a hostPath), or pass \
             --detach-on-exit"
        ),
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
        snat::pool_size(&args.node.egress_ips),
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

fn sweep(agent: &mut Agent, telemetry: &Telemetry) -> Option<extproxy::gc::GcReport> {
    telemetry.heartbeat();
    let report = agent.sweep();
    if let Some(report) = &report {
        telemetry.record_gc(report);
    }
    report
}
