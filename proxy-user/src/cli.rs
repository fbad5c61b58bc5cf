//! The command line: every clap type and value parser of `extproxy`.

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use extproxy::{
    egress::config::{AddressSpec, AnnounceMode, Fencing, OwnerSpec, Timing},
    loader::DEFAULT_PIN_DIR,
    snat::SnatPorts,
    state::DEFAULT_STATE_DIR,
};
use ipnet::IpNet;
use proxy_common::Config;

#[derive(Parser)]
#[command(
    name = "extproxy",
    version,
    about = "eBPF proxy for Kubernetes Services whose endpoints live outside the cluster"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax): error, warn, info, debug, or per module. kube's
    /// per-request error lines and its warning per broken watch are off by default: extproxy
    /// logs API trouble itself, once.
    #[arg(
        long,
        global = true,
        env = "EXTPROXY_LOG",
        default_value = "info,kube_client::client=error,kube_client::client::builder=off"
    )]
    pub log: String,
    /// Log lines as text (coloured only on a terminal; NO_COLOR turns colour off there too) or
    /// as one JSON object per line, for log pipelines.
    #[arg(
        long,
        global = true,
        env = "EXTPROXY_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load and attach the data path, then keep it programmed from the Kubernetes API server
    /// (default) or from a folder of manifests (--manifests).
    Run(Box<RunArgs>),
    /// Show what the data path holds: services, frontends, endpoints, flows, drops.
    Inspect(InspectArgs),
    /// Detach the programs and remove every pin and state file extproxy created.
    Cleanup(CleanupArgs),
    /// Read and translate manifests without touching the kernel; exit 1 if any is in error.
    Validate(ValidateArgs),
    /// Print an ExternalName Service as a selector-less Service plus an FQDN EndpointSlice that
    /// extproxy serves (a cluster IP, a static egress address, health checks).
    ConvertExternalname(ConvertArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// Manifest mode: a folder of Service, EndpointSlice and Endpoints manifests (YAML or JSON),
    /// watched for changes. Without it, extproxy runs in Kubernetes mode.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kubeconfig", "claim_all_selectorless", "streaming_lists"])]
    pub manifests: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub services: ServiceArgs,
    #[command(flatten)]
    pub datapath: DatapathArgs,
    #[command(flatten)]
    pub dns: DnsArgs,
    #[command(flatten)]
    pub egress: EgressArgs,
}

/// EndpointSlices with `addressType: FQDN`: how their names are looked up. Durations are
/// seconds, or a number with s, m, h or d.
#[derive(Args)]
pub struct DnsArgs {
    /// DNS server for FQDN endpoints (repeat for several). Default: the node's /etc/resolv.conf
    /// (the agent runs in the node's network namespace), which may answer split-horizon names
    /// differently from the cluster DNS pods use: pass the cluster DNS here to resolve as pods do.
    #[arg(long = "dns-server", value_name = "ADDR[:PORT]", value_parser = extproxy::dns::parse_server)]
    pub dns_servers: Vec<SocketAddr>,
    /// Shortest time between two lookups of a name, whatever its TTL.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = extproxy::dns::parse_duration)]
    pub dns_min_ttl: Duration,
    /// Longest time between two lookups of a name, whatever its TTL.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = extproxy::dns::parse_duration)]
    pub dns_max_ttl: Duration,
    /// While lookups fail, a name's last answer keeps serving this long past its TTL
    /// (stale-if-error, RFC 8767); then its addresses drain.
    #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = extproxy::dns::parse_duration)]
    pub dns_stale_for: Duration,
    /// An address that leaves a name's answer takes no new flows; its established flows go on
    /// until they end, or this long.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = extproxy::dns::parse_duration)]
    pub dns_drain_for: Duration,
    /// NXDOMAIN is believed when a lookup this long after the first NXDOMAIN still says so;
    /// until then the name's addresses keep serving. 0: at once.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = extproxy::dns::parse_duration)]
    pub dns_nxdomain_for: Duration,
}

impl DnsArgs {
    pub fn timing(&self) -> extproxy::dns::Timing {
        extproxy::dns::Timing {
            min_ttl: self.dns_min_ttl,
            max_ttl: self.dns_max_ttl.max(self.dns_min_ttl),
            stale_for: self.dns_stale_for,
            drain_for: self.dns_drain_for,
            nxdomain_for: self.dns_nxdomain_for,
        }
    }
}

#[derive(Args)]
pub struct ConvertArgs {
    /// A manifest holding one or more ExternalName Services (YAML); `-` for standard input.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Annotate the Services with this egress (source) address (extproxy.io/egress-ip); several
    /// of a family make a pool. Repeat or separate with commas.
    #[arg(long = "egress-ip", value_name = "IP", value_delimiter = ',')]
    pub egress_ips: Vec<IpAddr>,
}

/// Cluster egress: addresses that one gateway node at a time owns, and every node's flows of
/// the Services using them leave from (DESIGN.md, "Cluster egress"). Give every node the same
/// --cluster-egress-* flags.
#[derive(Args)]
pub struct EgressArgs {
    /// Declares a cluster egress address, and the namespaces whose Services may use it in their
    /// `extproxy.io/cluster-egress-ip` annotation (names or globs like `pay-*`; default every
    /// namespace). Repeat for more addresses. A Service naming an undeclared address gets an
    /// error, not the address.
    #[arg(long = "cluster-egress-ip", value_name = "ADDR[=NAMESPACE,...]")]
    pub cluster_egress_ips: Vec<AddressSpec>,
    /// The cluster egress address (at most one per IP family, declared with --cluster-egress-ip)
    /// of Services without an egress annotation, in the namespaces allowed to use it.
    #[arg(long = "cluster-egress-default", value_name = "ADDR")]
    pub cluster_egress_defaults: Vec<IpAddr>,
    /// How long a cluster egress Lease lasts without renewal, seconds: a dead owner is replaced
    /// this long (plus up to a renew interval) after its last renewal.
    #[arg(long, value_name = "SECONDS", default_value_t = Timing::DEFAULT_LEASE_SECS)]
    pub cluster_egress_lease_duration: u32,
    /// How often the owner renews its Lease and candidates look for an expired one, seconds
    /// (under a third of the Lease).
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_seconds)]
    pub cluster_egress_renew_interval: std::time::Duration,
    /// What an owner that cannot renew its Lease does: `fence` gives the address up two thirds
    /// into the Lease (never two owners; an API server outage that long stops cluster egress),
    /// `keep` keeps it (forwarding survives API outages; an owner cut off from the API server
    /// alone keeps answering for the address beside its successor).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Fencing::Fence)]
    pub cluster_egress_fencing: Fencing,
    /// How the owner tells the network: `arp` (gratuitous ARP / unsolicited neighbour
    /// advertisement on the uplink), or `none` (something else moves the address: BGP, a cloud
    /// controller watching the Leases).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = AnnounceMode::Arp)]
    pub cluster_egress_announce: AnnounceMode,
    /// Kubernetes mode: extproxy's namespace, where the cluster egress Leases live.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        value_name = "NAMESPACE",
        default_value = "extproxy-system"
    )]
    pub namespace: String,
    /// This node's IPv4 address for the tunnel between nodes. Default: the Node's InternalIP
    /// (Kubernetes mode), the first IPv4 of --node-ip or of the uplink (manifest mode).
    #[arg(long, value_name = "IP")]
    pub tunnel_ip: Option<std::net::Ipv4Addr>,
    /// Manifest mode: this node may own cluster egress addresses (Kubernetes mode: label the
    /// Node extproxy.io/egress-gateway=true).
    #[arg(long)]
    pub egress_gateway: bool,
    /// Manifest mode: which node owns a cluster egress address (its tunnel address). The same
    /// on every node; moving the address means changing it and restarting the agents.
    #[arg(long = "cluster-egress-owner", value_name = "ADDR=NODE_IP")]
    pub cluster_egress_owners: Vec<OwnerSpec>,
    /// Manifest mode: nodes whose tunnelled flows an owner serves (addresses or CIDRs, repeat);
    /// packets from others are dropped (`tunnel_unknown_peer`). Kubernetes mode: every Node.
    #[arg(long = "tunnel-peer", value_name = "IP|CIDR", value_parser = parse_net)]
    pub tunnel_peers: Vec<IpNet>,
}

fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|e| format!("{s}: {e} (expected seconds, e.g. 1 or 0.5)"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s}: must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// An address (a host network) or a CIDR.
fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s}: expected an IP address or a CIDR"))
}

#[derive(Args)]
pub struct KubeArgs {
    /// Kubernetes mode: the kubeconfig to use (its current context). Default: the pod's service
    /// account (in-cluster configuration).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: this node's name, to read its addresses from its Node object.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Kubernetes mode: also proxy every Service without a selector, labelled or not. Only for
    /// clusters without kube-proxy (it would proxy them too).
    #[arg(long)]
    pub claim_all_selectorless: bool,
    /// Kubernetes mode: receive initial lists as watch streams (WatchList; API server 1.27+ with
    /// the feature enabled). Lighter on the API server.
    #[arg(long)]
    pub streaming_lists: bool,
    /// Serve /healthz, /readyz and /metrics here; `off` for none. Default: 0.0.0.0:9464 in
    /// Kubernetes mode, off in manifest mode.
    #[arg(long, value_name = "ADDR|off", value_parser = parse_listen)]
    pub metrics_address: Option<Listen>,
}

#[derive(Clone, Copy, Debug)]
pub enum Listen {
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
pub struct NodeArgs {
    /// Uplink interface(s): XDP and TC ingress for traffic from outside, TC egress for pods
    /// and host processes. Repeat for several uplinks. `auto`: the interface(s) of the default
    /// route.
    #[arg(long = "iface", value_name = "IFACE", required = true)]
    pub ifaces: Vec<String>,
    /// Source address the external endpoints see. Several of a family (repeat the flag or
    /// separate with commas, up to 16) make a pool: SNAT ports are unique per (address, endpoint),
    /// so each address adds a port range per endpoint. Default: the Node's InternalIP
    /// (Kubernetes mode) or the uplink's first address of each family.
    #[arg(long = "egress-ip", value_name = "IP", value_delimiter = ',')]
    pub egress_ips: Vec<IpAddr>,
    /// Addresses NodePorts listen on. Default: the Node's InternalIP and ExternalIP addresses
    /// (Kubernetes mode) or every address of the uplink(s).
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<IpAddr>,
}

/// Manifest mode only: in Kubernetes mode the API server allocates these.
#[derive(Args)]
pub struct ServiceArgs {
    /// Manifest mode: where Services without spec.clusterIP get one (first CIDR of each family).
    #[arg(long = "service-cidr", value_name = "CIDR", default_values = ["10.96.0.0/12", "fd00:10:96::/112"])]
    pub service_cidrs: Vec<IpNet>,
    /// Where NodePorts without a number get one (manifest mode); in both modes, kept out of the
    /// SNAT ports (`--snat-ports auto`).
    #[arg(long, value_name = "FROM-TO", default_value = "30000-32767", value_parser = parse_range)]
    pub node_port_range: RangeInclusive<u16>,
}

#[derive(Args)]
pub struct DatapathArgs {
    /// Source ports for SNAT: `auto` (every port from 1024 outside the node's
    /// net.ipv4.ip_local_port_range and --node-port-range, so the node's own sockets never pick
    /// one), or up to four comma-separated FROM-TO ranges.
    #[arg(long, value_name = "auto|FROM-TO,...", default_value = "auto")]
    pub snat_ports: SnatPorts,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpArg::Auto)]
    pub xdp: XdpArg,
    /// Let XDP send packets back out of the uplink itself (XDP_TX). `auto`: on, except on veth
    /// uplinks (containers, kind), whose peer would hold such frames; TC redirects them there.
    #[arg(long, value_enum, default_value_t = Toggle::Auto)]
    pub xdp_tx: Toggle,
    /// Pods' host-side interfaces to translate on as packets leave the pod, before netfilter
    /// (needed beside kube-proxy in nftables mode, which drops ClusterIPs it does not serve):
    /// comma-separated names or globs (`veth*`), `auto` for the usual CNI prefixes (veth, cali,
    /// lxc, eni, azv, gke) or `none`. Interfaces appearing later are picked up. Default: `auto` in
    /// Kubernetes mode, `none` in manifest mode.
    #[arg(long, value_name = "PATTERNS")]
    pub pod_ifaces: Option<String>,
    /// bpffs directory for the maps (mounted at /sys/fs/bpf if needed).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Where the agent publishes service names and diagnostics for `extproxy inspect`.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Leave programs and maps in place on exit so a restarted agent adopts them (always so in
    /// Kubernetes mode unless --detach-on-exit).
    #[arg(long)]
    pub keep_on_exit: bool,
    /// Kubernetes mode: detach and remove the maps on exit (tracked flows are dropped) instead of
    /// leaving them for the next agent.
    #[arg(long, conflicts_with = "keep_on_exit")]
    pub detach_on_exit: bool,
    /// Another agent holding this node's data path (the same --pin-dir or --state-dir): wait
    /// this long for it to exit (a rolling update's successor starts while its predecessor
    /// exits), then give up saying who it is.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub lock_wait: u64,
    /// Pinned maps with another layout or size: replace them (drops tracked flows) instead of
    /// refusing to start.
    #[arg(long)]
    pub replace_incompatible_pins: bool,
    /// Tracked connections (and reverse NAT entries).
    #[arg(long, default_value_t = proxy_common::DEFAULT_CT_MAX)]
    pub ct_max: u32,
    /// Service ports.
    #[arg(long, default_value_t = proxy_common::DEFAULT_MAX_SERVICES)]
    pub max_services: u32,
    /// Endpoints over all service ports.
    #[arg(long, default_value_t = proxy_common::DEFAULT_MAX_BACKENDS)]
    pub max_backends: u32,
    /// Frontend addresses over all service ports.
    #[arg(long, default_value_t = proxy_common::DEFAULT_MAX_FRONTENDS)]
    pub max_frontends: u32,
    /// TCP idle timeout of established connections, seconds (kube-proxy's conntrack setting: 24h).
    #[arg(long, default_value_t = Config::DEFAULT.tcp_established_timeout)]
    pub tcp_established_timeout: u32,
    /// UDP idle timeout once the endpoint has answered, seconds.
    #[arg(long, default_value_t = Config::DEFAULT.udp_stream_timeout)]
    pub udp_timeout: u32,
    /// How often expired flows are swept, seconds.
    #[arg(long, default_value_t = 10)]
    pub gc_interval: u64,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum XdpArg {
    /// Native XDP, generic XDP if the driver has none; off on veth uplinks, where XDP copies
    /// every packet it sees and TC ingress alone is faster (measured: `cargo xtask bench`).
    Auto,
    Driver,
    Generic,
    /// No XDP: TC ingress does all the ingress work.
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Toggle {
    Auto,
    On,
    Off,
}

#[derive(Args)]
pub struct InspectArgs {
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CleanupArgs {
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Args)]
pub struct ValidateArgs {
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    #[command(flatten)]
    pub services: ServiceArgs,
    /// The agents' cluster egress flags: which Services may use which address.
    #[command(flatten)]
    pub egress: EgressArgs,
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
