//! `extproxy`: eBPF proxy for Kubernetes Services whose endpoints live outside the cluster.

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::Ebpf;
use clap::{Args, Parser, Subcommand, ValueEnum};
use extproxy::{
    agent::Agent,
    diag, host, inspect,
    kube::{self as kubemode, KubeSource, NodeOverrides, SourceConfig},
    loader::{self, Attached, DEFAULT_PIN_DIR, Limits, XdpAttach},
    manifest::ManifestSet,
    maps::DatapathMaps,
    metrics::{self, DatapathReader, Telemetry},
    pins::{self, Pinned},
    podlinks::{LinkEvent, Patterns, PodLinks},
    reconcile::{self, Reconciler},
    state::{AgentState, DEFAULT_STATE_DIR},
    translate::{self, ClaimPolicy, Incremental, NodeInfo, Settings, Translation},
    watch::DirWatcher,
};
use ipnet::IpNet;
use proxy_common::Config;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "extproxy",
    version,
    about = "eBPF proxy for Kubernetes Services whose endpoints live outside the cluster"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax): error, warn, info, debug, or per module. kube's
    /// per-request error lines and its warning per broken watch are off by default: extproxy
    /// logs API trouble itself, once.
    #[arg(
        long,
        global = true,
        env = "EXTPROXY_LOG",
        default_value = "info,kube_client::client=error,kube_client::client::builder=off"
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the data path, then keep it programmed from the Kubernetes API server
    /// (default) or from a folder of manifests (--manifests).
    Run(Box<RunArgs>),
    /// Show what the data path holds: services, frontends, endpoints, flows, drops.
    Inspect(InspectArgs),
    /// Detach the programs and remove every pin and state file extproxy created.
    Cleanup(CleanupArgs),
    /// Read and translate manifests without touching the kernel; exit 1 if any is in error.
    Validate(ValidateArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Manifest mode: a folder of Service, EndpointSlice and Endpoints manifests (YAML or JSON),
    /// watched for changes. Without it, extproxy runs in Kubernetes mode.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kubeconfig", "claim_all_selectorless", "streaming_lists"])]
    manifests: Option<PathBuf>,
    #[command(flatten)]
    kube: KubeArgs,
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    services: ServiceArgs,
    #[command(flatten)]
    datapath: DatapathArgs,
}

#[derive(Args)]
struct KubeArgs {
    /// Kubernetes mode: the kubeconfig to use (its current context). Default: the pod's service
    /// account (in-cluster configuration).
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: this node's name, to read its addresses from its Node object.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// Kubernetes mode: also proxy every Service without a selector, labelled or not. Only for
    /// clusters without kube-proxy (it would proxy them too).
    #[arg(long)]
    claim_all_selectorless: bool,
    /// Kubernetes mode: receive initial lists as watch streams (WatchList; API server 1.27+ with
    /// the feature enabled). Lighter on the API server.
    #[arg(long)]
    streaming_lists: bool,
    /// Serve /healthz, /readyz and /metrics here; `off` for none. Default: 0.0.0.0:9464 in
    /// Kubernetes mode, off in manifest mode.
    #[arg(long, value_name = "ADDR|off", value_parser = parse_listen)]
    metrics_address: Option<Listen>,
}

#[derive(Clone, Copy, Debug)]
enum Listen {
    Off,
    At(SocketAddr),
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen::Off);
    }
    s.parse()
        .map(Listen::At)
        .map_err(|e| format!("{s}: {e} (expected IP:PORT or off)"))
}

#[derive(Args)]
struct NodeArgs {
    /// Uplink interface(s): XDP and TC ingress for traffic from outside, TC egress for pods
    /// and host processes. Repeat for several uplinks. `auto`: the interface(s) of the default
    /// route.
    #[arg(long = "iface", value_name = "IFACE", required = true)]
    ifaces: Vec<String>,
    /// Source address the external endpoints see (one per IP family). Default: the Node's
    /// InternalIP (Kubernetes mode) or the uplink's first address of each family.
    #[arg(long = "egress-ip", value_name = "IP")]
    egress_ips: Vec<IpAddr>,
    /// Addresses NodePorts listen on. Default: the Node's InternalIP and ExternalIP addresses
    /// (Kubernetes mode) or every address of the uplink(s).
    #[arg(long = "node-ip", value_name = "IP")]
    node_ips: Vec<IpAddr>,
}

/// Manifest mode only: in Kubernetes mode the API server allocates these.
#[derive(Args)]
struct ServiceArgs {
    /// Manifest mode: where Services without spec.clusterIP get one (first CIDR of each family).
    #[arg(long = "service-cidr", value_name = "CIDR", default_values = ["10.96.0.0/12", "fd00:10:96::/112"])]
    service_cidrs: Vec<IpNet>,
    /// Manifest mode: where NodePorts without a number get one.
    #[arg(long, value_name = "FROM-TO", default_value = "30000-32767", value_parser = parse_range)]
    node_port_range: RangeInclusive<u16>,
}

#[derive(Args)]
struct DatapathArgs {
    /// Source ports for SNAT. Keep them outside net.ipv4.ip_local_port_range (or reserve them).
    #[arg(long, value_name = "FROM-TO", default_value = "61000-65535", value_parser = parse_range)]
    snat_ports: RangeInclusive<u16>,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpArg::Auto)]
    xdp: XdpArg,
    /// Let XDP send packets back out of the uplink itself (XDP_TX). `auto`: on, except on veth
    /// uplinks (containers, kind), whose peer would hold such frames; TC redirects them there.
    #[arg(long, value_enum, default_value_t = Toggle::Auto)]
    xdp_tx: Toggle,
    /// Pods' host-side interfaces to translate on as packets leave the pod, before netfilter
    /// (needed beside kube-proxy in nftables mode, which drops ClusterIPs it does not serve):
    /// comma-separated names or globs (`veth*`), `auto` for the usual CNI prefixes (veth, cali,
    /// lxc, eni, azv, gke) or `none`. Interfaces appearing later are picked up. Default: `auto` in
    /// Kubernetes mode, `none` in manifest mode.
    #[arg(long, value_name = "PATTERNS")]
    pod_ifaces: Option<String>,
    /// bpffs directory for the maps (mounted at /sys/fs/bpf if needed).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Where the agent publishes service names and diagnostics for `extproxy inspect`.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Leave programs and maps in place on exit so a restarted agent adopts them (always so in
    /// Kubernetes mode unless --detach-on-exit).
    #[arg(long)]
    keep_on_exit: bool,
    /// Kubernetes mode: detach and remove the maps on exit (tracked flows are dropped) instead of
    /// leaving them for the next agent.
    #[arg(long, conflicts_with = "keep_on_exit")]
    detach_on_exit: bool,
    /// Pinned maps with another layout or size: replace them (drops tracked flows) instead of
    /// refusing to start.
    #[arg(long)]
    replace_incompatible_pins: bool,
    /// Tracked connections (and reverse NAT entries).
    #[arg(long, default_value_t = proxy_common::DEFAULT_CT_MAX)]
    ct_max: u32,
    /// Service ports.
    #[arg(long, default_value_t = proxy_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Endpoints over all service ports.
    #[arg(long, default_value_t = proxy_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Frontend addresses over all service ports.
    #[arg(long, default_value_t = proxy_common::DEFAULT_MAX_FRONTENDS)]
    max_frontends: u32,
    /// TCP idle timeout of established connections, seconds (kube-proxy's conntrack setting: 24h).
    #[arg(long, default_value_t = Config::DEFAULT.tcp_established_timeout)]
    tcp_established_timeout: u32,
    /// UDP idle timeout once the endpoint has answered, seconds.
    #[arg(long, default_value_t = Config::DEFAULT.udp_stream_timeout)]
    udp_timeout: u32,
    /// How often expired flows are swept, seconds.
    #[arg(long, default_value_t = 10)]
    gc_interval: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpArg {
    /// Native XDP, generic XDP if the driver has none; off on veth uplinks, where XDP copies
    /// every packet it sees and TC ingress alone is faster (measured: `cargo xtask bench`).
    Auto,
    Driver,
    Generic,
    /// No XDP: TC ingress does all the ingress work.
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum Toggle {
    Auto,
    On,
    Off,
}

#[derive(Args)]
struct InspectArgs {
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CleanupArgs {
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Args)]
struct ValidateArgs {
    #[arg(long, value_name = "DIR")]
    manifests: PathBuf,
    #[command(flatten)]
    services: ServiceArgs,
}

fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or("expected FROM-TO, e.g. 61000-65535")?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{a}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{b}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s}: need 1 <= FROM <= TO"));
    }
    Ok(a..=b)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_target(false)
        .init();
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run(*args)),
        Command::Inspect(args) => {
            let report = inspect::collect(&args.pin_dir, &args.state_dir).with_context(|| {
                format!(
                    "reading the maps pinned in {} (is extproxy running?)",
                    args.pin_dir.display()
                )
            })?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", inspect::render(&report));
            }
            Ok(())
        }
        Command::Cleanup(args) => cleanup(&args.pin_dir, &args.state_dir),
        Command::Validate(args) => validate(&args),
    }
}

fn settings(
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

fn validate(args: &ValidateArgs) -> anyhow::Result<()> {
    let set = ManifestSet::read_dir(&args.manifests)
        .with_context(|| format!("reading {}", args.manifests.display()))?;
    let (inventory, mut diagnostics) = set.inventory();
    let settings = settings(
        &args.services,
        &["192.0.2.1".parse()?, "2001:db8::1".parse()?],
        true,
        ClaimPolicy::SelectorLess,
    );
    let node = NodeInfo {
        addresses: vec!["192.0.2.1".parse()?],
    };
    let t = translate::translate(&inventory, &node, &settings);
    diagnostics.extend(t.diagnostics.iter().cloned());
    print_summary(&t);
    for d in &diagnostics {
        println!("{d}");
    }
    if diag::has_errors(&diagnostics) {
        std::process::exit(1);
    }
    Ok(())
}

/// One line per service port: what clients reach and where it goes.
fn print_summary(t: &Translation) {
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    loader::ensure_bpffs().context("bpffs")?;
    let ifaces = resolve_ifaces(&args.node.ifaces)?;
    match &args.manifests {
        Some(dir) => run_manifests(&args, dir, &ifaces).await,
        None => run_kube(&args, &ifaces).await,
    }
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

/// The loaded data path and the agent programming it, shared by both modes.
struct Running {
    ebpf: Ebpf,
    agent: Agent,
    attached: Vec<Attached>,
    pods: PodLinks,
}

impl Running {
    /// Attaches to the uplinks and, per `--pod-ifaces` (default `pod_default`), the pods'
    /// interfaces.
    fn attach(
        mut ebpf: Ebpf,
        agent: Agent,
        ifaces: &[String],
        dp: &DatapathArgs,
        pod_default: &str,
        telemetry: &Telemetry,
    ) -> anyhow::Result<Running> {
        let attached = attach_all(&mut ebpf, ifaces, dp)?;
        let pods = attach_pods(&mut ebpf, ifaces, dp, pod_default)?;
        telemetry.set_pod_interfaces(pods.count());
        Ok(Running {
            ebpf,
            agent,
            attached,
            pods,
        })
    }

    fn pod_events(&mut self, events: Vec<LinkEvent>, telemetry: &Telemetry) {
        self.pods.handle(&mut self.ebpf, events);
        telemetry.set_pod_interfaces(self.pods.count());
    }
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

/// The data path's programs, being verified on other threads; the maps are usable meanwhile.
struct Verifying {
    thread: std::thread::JoinHandle<Result<Ebpf, loader::LoadError>>,
    started: Instant,
}

impl Verifying {
    /// The loaded object once every program is verified, and how long verifying took.
    fn wait(self) -> anyhow::Result<(Ebpf, Duration)> {
        let ebpf = match self.thread.join() {
            Ok(result) => result.context("loading the data path")?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        Ok((ebpf, self.started.elapsed()))
    }
}

/// Loads the data path (adopting compatible pinned maps) and builds the agent around it. The
/// kernel verifies the programs in the background: the maps can be programmed meanwhile, which
/// hides most of a cold start's verification time.
fn start(
    dp: &DatapathArgs,
    ifaces: &[String],
    state: AgentState,
) -> anyhow::Result<(Verifying, Agent)> {
    let limits = Limits {
        max_services: dp.max_services,
        max_frontends: dp.max_frontends,
        max_backends: dp.max_backends,
        max_slots: dp.max_backends,
        ct_max: dp.ct_max,
        ..Limits::default()
    };
    std::fs::create_dir_all(&dp.pin_dir)
        .with_context(|| format!("creating {}", dp.pin_dir.display()))?;
    let adopting = match pins::check(&dp.pin_dir, &limits) {
        Pinned::Absent => false,
        Pinned::Compatible => {
            tracing::info!(
                "adopting the maps pinned in {}: tracked flows continue",
                dp.pin_dir.display()
            );
            true
        }
        Pinned::Incompatible(problems) => {
            let why = problems.join("; ");
            if !dp.replace_incompatible_pins {
                bail!(
                    "the maps pinned in {} do not match this agent ({why}). Adopting them could \
                     corrupt flows. Run `extproxy cleanup` (drops tracked connections) or start with \
                     --replace-incompatible-pins",
                    dp.pin_dir.display()
                );
            }
            tracing::warn!("replacing incompatible pinned maps ({why}); tracked flows are lost");
            pins::remove_all(&dp.pin_dir)?;
            std::fs::create_dir_all(&dp.pin_dir)?;
            false
        }
    };
    let mut ebpf =
        loader::create_maps(&limits, Some(&dp.pin_dir)).context("loading the data path")?;
    let xdp_tx = match dp.xdp_tx {
        Toggle::On => true,
        Toggle::Off => false,
        Toggle::Auto => {
            // Only where XDP runs on a veth could XDP_TX stall.
            let veths: Vec<&String> = ifaces
                .iter()
                .filter(|i| is_veth(i) && xdp_attach(dp.xdp, true).0 != XdpAttach::Off)
                .collect();
            if !veths.is_empty() {
                tracing::info!(
                    "{} is a veth: XDP hands packets it would send back out to TC (--xdp-tx on \
                     overrides; then the veth's peer must run an XDP program)",
                    veths
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            veths.is_empty()
        }
    };
    let config = Config {
        snat_port_min: *dp.snat_ports.start(),
        snat_port_max: *dp.snat_ports.end(),
        tcp_established_timeout: dp.tcp_established_timeout,
        udp_stream_timeout: dp.udp_timeout,
        flags: if xdp_tx {
            proxy_common::CFG_F_XDP_TX
        } else {
            0
        },
        ..Config::DEFAULT
    };
    loader::write_config(&mut ebpf, &config)?;
    let maps = DatapathMaps::take_from(&mut ebpf)?;
    let rlimits = reconcile::Limits {
        max_services: limits.max_services,
        max_backends: limits.max_backends,
    };
    let reconciler = if adopting {
        Reconciler::from_snapshot(maps.snapshot()?, rlimits)
    } else {
        Reconciler::new(rlimits)
    };
    let agent = Agent::new(maps, reconciler, config, dp.state_dir.clone(), state);
    let started = Instant::now();
    let thread = std::thread::Builder::new()
        .name("verifier".into())
        .spawn(move || loader::load_programs(&mut ebpf).map(|()| ebpf))
        .context("starting the program loader")?;
    Ok((Verifying { thread, started }, agent))
}

fn attach_all(
    ebpf: &mut Ebpf,
    ifaces: &[String],
    dp: &DatapathArgs,
) -> anyhow::Result<Vec<Attached>> {
    let mut attached = Vec::new();
    for iface in ifaces {
        let (xdp, why_off) = xdp_attach(dp.xdp, is_veth(iface));
        let a = loader::attach(ebpf, iface, xdp, Some(&dp.pin_dir))
            .with_context(|| format!("attaching to {iface}"))?;
        tracing::info!(
            "{} {iface}: XDP {}, TC ingress and egress",
            if a.adopted {
                "took over the programs on"
            } else {
                "attached to"
            },
            match a.xdp {
                Some(mode) => format!("{mode:?}").to_lowercase(),
                None => format!("off{why_off}"),
            }
        );
        attached.push(a);
    }
    Ok(attached)
}

fn is_veth(iface: &str) -> bool {
    host::driver(iface).as_deref() == Some("veth")
}

/// How XDP goes on an interface (`veth`: whether it is one), and why it is off when `auto` turns
/// it off. A veth's XDP receive
/// path copies every frame into a page of its own before the program runs (and the frames it
/// passes are rebuilt as skbs), which costs more than the program saves: TC ingress, which runs
/// the same code on the skb the kernel has anyway, is 10-35% faster there in new connections per
/// second (xtask/src/bench/TRAFFIC.md). Physical and virtio NICs keep XDP.
fn xdp_attach(arg: XdpArg, veth: bool) -> (XdpAttach, &'static str) {
    match arg {
        XdpArg::Auto if veth => (
            XdpAttach::Off,
            " (a veth: TC ingress is faster there; --xdp driver overrides)",
        ),
        XdpArg::Auto => (XdpAttach::Auto, ""),
        XdpArg::Driver => (XdpAttach::Driver, ""),
        XdpArg::Generic => (XdpAttach::Generic, ""),
        XdpArg::Off => (XdpAttach::Off, ""),
    }
}

/// Attaches the pod program per `--pod-ifaces` and starts following links as they come and go.
fn attach_pods(
    ebpf: &mut Ebpf,
    ifaces: &[String],
    dp: &DatapathArgs,
    default: &str,
) -> anyhow::Result<PodLinks> {
    let spec = dp.pod_ifaces.as_deref().unwrap_or(default);
    let patterns = if spec.trim() == "none" {
        Patterns::default()
    } else {
        Patterns::parse(spec)
    };
    if patterns.is_empty() {
        // A previous agent may have run with pod interfaces: its links must not linger.
        loader::prune_pod_pins(&dp.pin_dir, &|_| false);
        return Ok(PodLinks::disabled());
    }
    let pods = PodLinks::start(ebpf, patterns.clone(), ifaces, Some(&dp.pin_dir))
        .context("--pod-ifaces: watching network interfaces")?;
    let names = pods.names();
    tracing::info!(
        "pod interfaces ({patterns}): attached to {}{}",
        names.len(),
        if names.is_empty() || names.len() > 8 {
            String::new()
        } else {
            format!(" ({})", names.join(", "))
        }
    );
    Ok(pods)
}

/// Leaves everything for the next agent (`keep`) or detaches and removes the pins.
fn finish(running: Running, dp: &DatapathArgs, keep: bool) -> anyhow::Result<()> {
    if keep {
        // The pins keep links and maps alive after our file descriptors close.
        tracing::info!(
            "exiting; programs and maps stay in place for the next agent; `extproxy cleanup` \
             removes them"
        );
        return Ok(());
    }
    let Running {
        mut ebpf,
        agent,
        attached,
        pods,
    } = running;
    pods.detach_all(&mut ebpf);
    for a in attached {
        let iface = a.iface.clone();
        loader::detach(&mut ebpf, a).with_context(|| format!("detaching from {iface}"))?;
    }
    drop(agent);
    drop(ebpf);
    pins::remove_all(&dp.pin_dir)?;
    let _ = std::fs::remove_dir(&dp.pin_dir);
    let _ = std::fs::remove_file(extproxy::state::path(&dp.state_dir));
    tracing::info!("detached and cleaned up");
    Ok(())
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

async fn run_manifests(args: &RunArgs, dir: &Path, ifaces: &[String]) -> anyhow::Result<()> {
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
    for w in host::check_sysctls(true, egress.iter().any(IpAddr::is_ipv6), &dp.snat_ports) {
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
    let (verifying, mut agent) = start(dp, ifaces, state)?;
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
            _ = hk.gc.tick() => sweep(&mut running.agent, &telemetry),
            _ = hk.flush.tick() => running.agent.flush_state(),
        }
    }
    running.agent.flush_state_now();
    finish(running, dp, dp.keep_on_exit)
}

fn service_names(agent: &Agent) -> Vec<(u32, translate::ServicePortKey)> {
    kubemode::Programmer::service_names(agent)
}

fn sweep(agent: &mut Agent, telemetry: &Telemetry) {
    telemetry.heartbeat();
    if let Some(report) = agent.sweep() {
        telemetry.record_gc(&report);
    }
}

async fn run_kube(args: &RunArgs, ifaces: &[String]) -> anyhow::Result<()> {
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
    for w in host::check_sysctls(true, v6, &dp.snat_ports) {
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
    let (verifying, agent) = start(dp, ifaces, state)?;
    let (ebpf, _) = verifying.wait()?;
    // Attach before the first sync: a previous agent's links are taken over at once (its maps
    // keep forwarding until the cluster is known again); fresh maps pass everything meanwhile.
    let mut running = Running::attach(ebpf, agent, ifaces, dp, "auto", &telemetry)?;
    let default_listen: SocketAddr = metrics::DEFAULT_METRICS_ADDRESS.parse()?;
    start_metrics(
        args.kube.metrics_address,
        Some(default_listen),
        &telemetry,
        &dp.pin_dir,
    )
    .await?;

    let mut source = KubeSource::new(
        client,
        SourceConfig {
            node_name: node_name.clone(),
            claim_all_selectorless: args.kube.claim_all_selectorless,
            overrides,
            streaming_lists: args.kube.streaming_lists,
        },
        telemetry.clone(),
    );
    tracing::info!(
        "extproxy is running on node {node_name}; watching Services, EndpointSlices and Node \
         {node_name}"
    );
    let mut hk = Housekeeping::new(dp)?;
    let mut trimmed = false;
    loop {
        tokio::select! {
            _ = hk.sigint.recv() => break,
            _ = hk.sigterm.recv() => break,
            batch = source.next() => {
                source.apply(batch, &mut running.agent);
                if !trimmed {
                    // The initial lists and the first translation leave much freed memory.
                    host::release_free_memory();
                    trimmed = true;
                }
            }
            events = running.pods.next() => running.pod_events(events, &telemetry),
            _ = hk.gc.tick() => sweep(&mut running.agent, &telemetry),
            _ = hk.flush.tick() => running.agent.flush_state(),
        }
    }
    running.agent.flush_state_now();
    // A DaemonSet rollout restarts the agent: flows must survive it, so keeping is the default.
    finish(running, dp, !dp.detach_on_exit)
}

fn cleanup(pin_dir: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let removed = pins::remove_all(pin_dir)
        .with_context(|| format!("removing pins in {}", pin_dir.display()))?;
    let _ = std::fs::remove_dir(pin_dir);
    let _ = std::fs::remove_file(extproxy::state::path(state_dir));
    if removed.is_empty() {
        println!("nothing pinned in {}", pin_dir.display());
    } else {
        println!(
            "removed {} pin(s) from {}; programs detached",
            removed.len(),
            pin_dir.display()
        );
    }
    Ok(())
}
