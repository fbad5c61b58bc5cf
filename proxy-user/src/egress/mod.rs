//! Cluster egress: one address per IP family that every flow of a Service leaves from, whichever
//! node its client is on (see DESIGN.md, "Cluster egress").
//!
//! The control plane here decides, for each declared address, which node owns it, and makes the
//! node and the data path act on it:
//!
//! ```text
//!  Kubernetes mode: Lease per address ──elector (lease.rs)──┐
//!  manifest mode:   --cluster-egress-owner ─────────────────┤ Status per address
//!                                                           ▼
//!                                  Controller: CLUSTER_EGRESS (owner's node address, local)
//!                                              TUNNEL_PEERS (nodes that may tunnel to us)
//!                                              the address on the uplink (uplink.rs)
//!                                              announcements (announce.rs)
//!                                              metrics, Events, state for `inspect`
//! ```
//!
//! The controller owns its own handles on the pinned maps (as the metrics reader does): the
//! agent's control loop is never held up by an election, nor an election by a big sync.

pub mod announce;
pub mod config;
pub mod kube;
pub mod lease;
pub mod maglev;
pub mod uplink;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::maps::{DatapathMaps, MapsError};
use crate::metrics::{EgressOwnership, Telemetry};
use announce::Announcer;
use config::{AnnounceMode, ClusterEgressConfig, Fencing, OwnerSpec, Timing};
use lease::{Candidacy, Holder, Role, Status};

/// What `extproxy inspect` reads about the addresses (beside the maps).
pub const STATE_FILE: &str = "cluster-egress.json";

/// Announcements after taking an address, from the moment it is on the uplink: neighbours that
/// miss the first (or ignore it inside their `locktime`, 1 s on Linux) take a later one.
const ANNOUNCE_AT: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_millis(2000),
];

#[derive(Debug, Error)]
pub enum EgressError {
    #[error("cluster egress: opening the pinned maps: {0}")]
    Maps(#[from] MapsError),
    #[error("cluster egress: uplink {iface}: {source}")]
    Uplink {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--cluster-egress-owner {address}={node} names this node, which is not a gateway: pass \
         --egress-gateway on it (or name another node)"
    )]
    NotGateway { address: IpAddr, node: Ipv4Addr },
    #[error("--cluster-egress-owner {0} is not declared: add --cluster-egress-ip {0}")]
    UndeclaredOwner(IpAddr),
    #[error("--cluster-egress-owner {0} is given twice")]
    TwoOwners(IpAddr),
    #[error(
        "cluster egress needs this node's IPv4 address for the tunnel: pass --tunnel-ip, or give \
         the uplink an IPv4 address"
    )]
    NoTunnelAddress,
}

/// What both modes share.
pub struct Setup {
    pub config: ClusterEgressConfig,
    pub timing: Timing,
    pub fencing: Fencing,
    pub announce: AnnounceMode,
    /// The uplinks the address may go on.
    pub uplinks: Vec<String>,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

/// Kubernetes mode's part.
pub struct KubeSetup {
    pub client: ::kube::Client,
    /// Where the Leases are (extproxy's namespace).
    pub namespace: String,
    pub node_name: String,
    /// `--tunnel-ip`: this node's tunnel address instead of its Node's InternalIP.
    pub tunnel_ip: Option<Ipv4Addr>,
}

/// Manifest mode's part.
pub struct ManifestSetup {
    /// `--egress-gateway`: this node may own addresses.
    pub gateway: bool,
    pub owners: Vec<OwnerSpec>,
    /// `--tunnel-peer`: the nodes whose tunnelled flows this node serves.
    pub peers: BTreeSet<IpAddr>,
    /// This node's tunnel address.
    pub tunnel_ip: Ipv4Addr,
}

/// The running control plane of cluster egress.
pub struct ClusterEgress {
    stop: watch::Sender<bool>,
    electors: Vec<JoinHandle<()>>,
    helpers: Vec<JoinHandle<()>>,
    controller: JoinHandle<()>,
}

impl ClusterEgress {
    /// Kubernetes mode: Leases, a Node watch, Events. None when no address is declared.
    pub fn start_kube(
        setup: Setup,
        kube: KubeSetup,
        telemetry: Arc<Telemetry>,
    ) -> Result<Option<Self>, EgressError> {
        if setup.config.is_empty() {
            return Ok(None);
        }
        let (stop, stop_rx) = watch::channel(false);
        let (views_tx, views_rx) = watch::channel(None);
        let (candidacy_tx, candidacy_rx) = watch::channel(Candidacy::default());
        let (peers_tx, peers_rx) = watch::channel(BTreeSet::new());
        let mut helpers = vec![tokio::spawn(kube::watch_nodes(
            kube.client.clone(),
            kube.node_name.clone(),
            kube.tunnel_ip,
            views_tx,
            stop_rx.clone(),
        ))];
        helpers.push(tokio::spawn(follow_nodes(
            views_rx,
            candidacy_tx,
            peers_tx,
            kube.node_name.clone(),
        )));
        let election = kube::elect(
            &kube.client,
            &kube.namespace,
            &kube.node_name,
            setup.config.addresses(),
            setup.timing,
            setup.fencing,
            candidacy_rx.clone(),
            stop_rx.clone(),
        );
        let electors = election.electors;
        helpers.push(election.watch);
        let updates_rx = election.updates;
        tracing::info!(
            "cluster egress: {}; electing owners with Leases in {} (lease {} s, renewed every \
             {:.1} s, fencing {:?}); gateway candidates are Nodes labelled {}=true",
            describe(&setup.config),
            kube.namespace,
            setup.timing.lease.as_secs(),
            setup.timing.renew_interval.as_secs_f64(),
            setup.fencing,
            kube::GATEWAY_LABEL
        );
        let client = kube.client.clone();
        let namespace = kube.namespace.clone();
        let node = kube.node_name.clone();
        let notify: Notify = Box::new(move |status| {
            kube::publish_move(&client, &namespace, &node, status);
        });
        let controller = Controller::new(&setup, telemetry, Some(notify))?;
        let controller = tokio::spawn(controller.run(
            updates_rx,
            candidacy_rx,
            peers_rx,
            stop_rx,
            setup.timing,
            true,
        ));
        Ok(Some(ClusterEgress {
            stop,
            electors,
            helpers,
            controller,
        }))
    }

    /// Manifest mode: owners and peers from flags. None when no address is declared.
    pub fn start_manifest(
        setup: Setup,
        manifest: ManifestSetup,
        telemetry: Arc<Telemetry>,
    ) -> Result<Option<Self>, EgressError> {
        if setup.config.is_empty() {
            return Ok(None);
        }
        let statuses = static_statuses(&setup.config, &manifest)?;
        let (stop, stop_rx) = watch::channel(false);
        let (_candidacy_tx, candidacy_rx) = watch::channel(Candidacy {
            candidate: manifest.gateway,
            address: Some(manifest.tunnel_ip),
        });
        let (_peers_tx, peers_rx) = watch::channel(manifest.peers.clone());
        let (updates_tx, updates_rx) = mpsc::unbounded_channel();
        for s in statuses {
            let _ = updates_tx.send(s);
        }
        tracing::info!(
            "cluster egress: {}; owners from --cluster-egress-owner; this node ({}) {} a \
             gateway; {} tunnel peer(s)",
            describe(&setup.config),
            manifest.tunnel_ip,
            if manifest.gateway { "is" } else { "is not" },
            manifest.peers.len()
        );
        let controller = Controller::new(&setup, telemetry, None)?;
        let controller = tokio::spawn(async move {
            // Kept open: the controller waits for more until told to stop.
            let _updates_tx = updates_tx;
            let _candidacy_tx = _candidacy_tx;
            let _peers_tx = _peers_tx;
            controller
                .run(
                    updates_rx,
                    candidacy_rx,
                    peers_rx,
                    stop_rx,
                    setup.timing,
                    false,
                )
                .await
        });
        Ok(Some(ClusterEgress {
            stop,
            electors: Vec::new(),
            helpers: Vec::new(),
            controller,
        }))
    }

    /// Releases this node's Leases and takes its addresses off the uplink (a graceful stop: the
    /// next candidate takes over at once instead of after the Lease expires).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for e in self.electors {
            let _ = e.await;
        }
        let _ = self.controller.await;
        for h in self.helpers {
            h.abort();
        }
    }
}

fn describe(config: &ClusterEgressConfig) -> String {
    config
        .allowed
        .iter()
        .map(|(a, ns)| {
            let default = if Some(*a) == config.default_v4 || Some(*a) == config.default_v6 {
                ", the default"
            } else {
                ""
            };
            if ns.is_any() {
                format!("{a} (every namespace{default})")
            } else {
                format!("{a} (namespaces {ns}{default})")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Candidacy and peers from the Node view, logged when they change.
async fn follow_nodes(
    mut views: watch::Receiver<Option<kube::NodeView>>,
    candidacy: watch::Sender<Candidacy>,
    peers: watch::Sender<BTreeSet<IpAddr>>,
    node_name: String,
) {
    let mut last: Option<kube::NodeView> = None;
    while views.changed().await.is_ok() {
        let Some(view) = views.borrow_and_update().clone() else {
            continue;
        };
        if last.as_ref().map(|l| &l.candidacy) != Some(&view.candidacy) {
            match (view.candidacy.candidate, view.candidacy.address) {
                (true, Some(a)) => tracing::info!(
                    "cluster egress: Node {node_name} is a gateway candidate (tunnel address {a})"
                ),
                (true, None) => tracing::warn!(
                    "cluster egress: Node {node_name} is labelled {}=true but has no IPv4 \
                     InternalIP for the tunnel (pass --tunnel-ip): it does not stand",
                    kube::GATEWAY_LABEL
                ),
                (false, _) => tracing::info!(
                    "cluster egress: Node {node_name} is not a gateway candidate; candidates: {}",
                    if view.gateways.is_empty() {
                        "none (label Nodes extproxy.io/egress-gateway=true)".to_owned()
                    } else {
                        view.gateways.iter().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            }
        }
        candidacy.send_if_modified(|c| replace(c, view.candidacy.clone()));
        peers.send_if_modified(|p| replace(p, view.peers.clone()));
        last = Some(view);
    }
}

fn replace<T: PartialEq>(current: &mut T, new: T) -> bool {
    if *current == new {
        return false;
    }
    *current = new;
    true
}

/// Manifest mode's owners: fixed at start.
pub fn static_statuses(
    config: &ClusterEgressConfig,
    manifest: &ManifestSetup,
) -> Result<Vec<Status>, EgressError> {
    let mut owners: BTreeMap<IpAddr, Ipv4Addr> = BTreeMap::new();
    for o in &manifest.owners {
        if !config.allowed.contains_key(&o.address) {
            return Err(EgressError::UndeclaredOwner(o.address));
        }
        if owners.insert(o.address, o.node).is_some() {
            return Err(EgressError::TwoOwners(o.address));
        }
        if o.node == manifest.tunnel_ip && !manifest.gateway {
            return Err(EgressError::NotGateway {
                address: o.address,
                node: o.node,
            });
        }
    }
    Ok(config
        .addresses()
        .map(|address| {
            let owner = owners.get(&address).copied();
            let local = owner == Some(manifest.tunnel_ip);
            if owner.is_none() {
                tracing::warn!(
                    "cluster egress {address}: no --cluster-egress-owner: nobody owns it; its \
                     Services' new connections are refused"
                );
            }
            Status {
                address,
                lease: String::new(),
                holder: owner.map(|node| Holder {
                    node: node.to_string(),
                    address: Some(node),
                }),
                role: if local { Role::Owner } else { Role::Follower },
                valid_until: None,
                acquired: None,
                handoff: None,
            }
        })
        .collect())
}

/// Called with the status that follows this node's acquisition of an address.
type Notify = Box<dyn Fn(&Status) + Send + Sync>;

/// What the data path is told about one address: the owner's node address, and whether it is
/// this node.
pub fn map_entry(status: &Status, own: Option<Ipv4Addr>) -> (Option<IpAddr>, bool) {
    match status.role {
        // Fenced: the address is off the uplink, but flows whose packets still come here are
        // served; the entry changes when another node is seen to hold the Lease.
        Role::Owner | Role::Fenced => (own.map(IpAddr::V4), true),
        Role::Follower => (
            status
                .holder
                .as_ref()
                .and_then(|h| h.address)
                .map(IpAddr::V4),
            false,
        ),
    }
}

/// The uplink address's lifetime for an owner: what is left of its deadline, less the second
/// by which the kernel may remove an address late; None when no refresh should happen now (the
/// address keeps its earlier, shorter lifetime).
pub fn owner_lifetime(
    valid_until: Option<Instant>,
    now: Instant,
    default: Duration,
) -> Option<u32> {
    match valid_until {
        None => Some(default.as_secs().max(1) as u32),
        Some(until) => {
            let left = until.saturating_duration_since(now);
            let secs = left.saturating_sub(Duration::from_secs(1)).as_secs();
            (secs >= 1).then_some(secs as u32)
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EgressState {
    pub pid: u32,
    /// This node's tunnel address.
    pub node_address: Option<Ipv4Addr>,
    pub announce: String,
    pub tunnel_peers: Vec<IpAddr>,
    pub addresses: Vec<AddressState>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AddressState {
    pub address: IpAddr,
    /// Kubernetes mode: the Lease's name (in extproxy's namespace).
    pub lease: Option<String>,
    pub owner: Option<String>,
    pub owner_address: Option<Ipv4Addr>,
    /// owner, fenced, follower, unknown.
    pub role: String,
    /// The uplink the address is on (owner only).
    pub interface: Option<String>,
    /// Seconds since the Unix epoch of the last change of owner seen here.
    pub since: Option<u64>,
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

pub fn read_state(dir: &Path) -> std::io::Result<EgressState> {
    let bytes = std::fs::read(state_path(dir))?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

fn write_state(dir: &Path, state: &EgressState) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, state_path(dir))
}

struct Address {
    status: Option<Status>,
    /// What the map holds for it (as written by this controller).
    written: Option<(Option<IpAddr>, bool)>,
    /// Index into the uplinks when the address is on one.
    on_uplink: Option<usize>,
    announce_at: Vec<Instant>,
    since: Option<SystemTime>,
}

struct Controller {
    maps: DatapathMaps,
    uplinks: Vec<(String, u32)>,
    announcer: Box<dyn Announcer>,
    announce_name: &'static str,
    telemetry: Arc<Telemetry>,
    state_dir: PathBuf,
    notify: Option<Notify>,
    addresses: BTreeMap<IpAddr, Address>,
    own: Option<Ipv4Addr>,
    peers: BTreeSet<IpAddr>,
    lifetime: Duration,
}

impl Controller {
    fn new(
        setup: &Setup,
        telemetry: Arc<Telemetry>,
        notify: Option<Notify>,
    ) -> Result<Self, EgressError> {
        let mut maps = DatapathMaps::from_pinned(&setup.pin_dir)?;
        let mut uplinks = Vec::new();
        for iface in &setup.uplinks {
            let index = uplink::index(iface).map_err(|source| EgressError::Uplink {
                iface: iface.clone(),
                source,
            })?;
            uplinks.push((iface.clone(), index));
        }
        // Addresses no longer declared leave the data path (their Services are refused by the
        // translation anyway); declared ones keep what a previous agent wrote until this one
        // knows better.
        for (addr, _) in maps.cluster_egress()? {
            let ip = addr.to_ip();
            if !setup.config.allowed.contains_key(&ip) {
                tracing::info!("cluster egress {ip}: no longer declared; forgotten");
                maps.remove_cluster_egress(ip)?;
                for (_, index) in &uplinks {
                    let _ = uplink::remove(*index, ip);
                }
            }
        }
        let announcer: Box<dyn Announcer> = match setup.announce {
            AnnounceMode::Arp => Box::new(announce::Neighbours),
            AnnounceMode::None => Box::new(announce::Silent),
        };
        let addresses = setup
            .config
            .addresses()
            .map(|a| {
                (
                    a,
                    Address {
                        status: None,
                        written: None,
                        on_uplink: None,
                        announce_at: Vec::new(),
                        since: None,
                    },
                )
            })
            .collect();
        Ok(Controller {
            maps,
            uplinks,
            announce_name: announcer.name(),
            announcer,
            telemetry,
            state_dir: setup.state_dir.clone(),
            notify,
            addresses,
            own: None,
            peers: BTreeSet::new(),
            lifetime: setup.timing.renew_deadline,
        })
    }

    async fn run(
        mut self,
        mut updates: mpsc::UnboundedReceiver<Status>,
        mut candidacy: watch::Receiver<Candidacy>,
        mut peers: watch::Receiver<BTreeSet<IpAddr>>,
        mut stop: watch::Receiver<bool>,
        timing: Timing,
        electors: bool,
    ) {
        self.own = candidacy.borrow_and_update().address;
        let initial = peers.borrow_and_update().clone();
        self.set_peers(initial);
        self.publish();
        let mut tick = tokio::time::interval(timing.renew_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        loop {
            let next_announce = self
                .addresses
                .values()
                .flat_map(|a| a.announce_at.first().copied())
                .min();
            tokio::select! {
                status = updates.recv() => match status {
                    Some(s) => self.apply(s),
                    // Every elector has ended (stopping): nothing more will change.
                    None => break,
                },
                changed = candidacy.changed(), if !stopping => {
                    if changed.is_ok() {
                        self.own = candidacy.borrow_and_update().address;
                        self.rewrite_all();
                    }
                }
                changed = peers.changed(), if !stopping => {
                    if changed.is_ok() {
                        let p = peers.borrow_and_update().clone();
                        self.set_peers(p);
                        self.publish();
                    }
                }
                changed = stop.changed(), if !stopping => {
                    stopping = changed.is_err() || *stop.borrow();
                    // With electors, their last statuses (releases) come before the channel
                    // closes; manifest mode has none to wait for.
                    if stopping && !electors {
                        break;
                    }
                }
                _ = tick.tick() => self.refresh(),
                () = sleep_until(next_announce) => self.announce_due(),
            }
        }
        self.shutdown();
    }

    fn set_peers(&mut self, peers: BTreeSet<IpAddr>) {
        if peers == self.peers {
            return;
        }
        match self.maps.set_tunnel_peers(&peers) {
            Ok(()) => {
                tracing::info!(
                    "cluster egress: {} node(s) may tunnel flows here: {}",
                    peers.len(),
                    crate::host::join_addrs(
                        &peers.iter().copied().collect::<Vec<_>>(),
                        ", ",
                        "none"
                    )
                );
                self.peers = peers;
            }
            Err(err) => tracing::warn!("cluster egress: writing the tunnel peers: {err}"),
        }
    }

    /// Acts on an elector's status.
    fn apply(&mut self, mut status: Status) {
        // Dropped at the end, once the address is off the uplink: the elector waits for that
        // before it releases the Lease.
        let _handoff = status.handoff.take();
        let address = status.address;
        let Some(entry) = self.addresses.get_mut(&address) else {
            return;
        };
        let previous = entry.status.take();
        let moved = match (&previous, &status.holder) {
            (
                Some(Status {
                    holder: Some(old), ..
                }),
                Some(new),
            ) => old.node != new.node,
            _ => false,
        };
        if previous.as_ref().map(|p| &p.holder) != Some(&status.holder) {
            entry.since = Some(SystemTime::now());
            match &status.holder {
                Some(h) => tracing::info!(
                    "cluster egress {address}: owned by {}{}{}",
                    h.node,
                    h.address.map_or(String::new(), |a| format!(" ({a})")),
                    if status.role == Role::Owner {
                        ", this node"
                    } else {
                        ""
                    }
                ),
                None => tracing::info!(
                    "cluster egress {address}: nobody owns it; its Services' new connections are \
                     refused until a gateway candidate takes it"
                ),
            }
        }
        if moved {
            self.telemetry.count_cluster_egress_failover(address);
        }
        let was_owner = previous.as_ref().is_some_and(|p| p.role == Role::Owner);
        if status.acquired.is_some()
            && let Some(notify) = &self.notify
        {
            notify(&status);
        }
        entry.status = Some(status);
        self.write_entry(address);
        let role = self.addresses[&address].status.as_ref().map(|s| s.role);
        match role {
            Some(Role::Owner) => {
                self.put_on_uplink(address);
                if !was_owner {
                    let now = Instant::now();
                    let entry = self.addresses.get_mut(&address).expect("known address");
                    entry.announce_at = ANNOUNCE_AT.iter().map(|d| now + *d).collect();
                }
            }
            Some(Role::Fenced | Role::Follower) | None => self.take_off_uplink(address),
        }
        self.publish();
    }

    fn rewrite_all(&mut self) {
        let addresses: Vec<IpAddr> = self.addresses.keys().copied().collect();
        for a in addresses {
            self.write_entry(a);
        }
    }

    fn write_entry(&mut self, address: IpAddr) {
        let entry = self.addresses.get_mut(&address).expect("known address");
        let Some(status) = &entry.status else { return };
        let want = map_entry(status, self.own);
        if entry.written == Some(want) {
            return;
        }
        match self.maps.set_cluster_egress(address, want.0, want.1) {
            Ok(()) => entry.written = Some(want),
            Err(err) => tracing::warn!("cluster egress {address}: writing the data path: {err}"),
        }
    }

    /// Adds the address to its uplink, or extends its lifetime.
    fn put_on_uplink(&mut self, address: IpAddr) {
        let now = Instant::now();
        let entry = self.addresses.get_mut(&address).expect("known address");
        let valid_until = entry.status.as_ref().and_then(|s| s.valid_until);
        let Some(secs) = owner_lifetime(valid_until, now, self.lifetime) else {
            return;
        };
        let which = match entry.on_uplink {
            Some(i) => i,
            None => {
                let known = uplink::list().unwrap_or_default();
                uplink::choose(&self.uplinks, &known, address)
            }
        };
        let Some((iface, index)) = self.uplinks.get(which) else {
            return;
        };
        match uplink::add(*index, address, uplink::Lifetime::Secs(secs)) {
            Ok(()) => {
                if entry.on_uplink.is_none() {
                    tracing::info!(
                        "cluster egress {address}: added to {iface}; announcing it ({})",
                        self.announce_name
                    );
                }
                entry.on_uplink = Some(which);
            }
            Err(err) => tracing::warn!("cluster egress {address}: adding it to {iface}: {err}"),
        }
    }

    fn take_off_uplink(&mut self, address: IpAddr) {
        let entry = self.addresses.get_mut(&address).expect("known address");
        entry.announce_at.clear();
        // Also after a restart, when this process did not add it: whatever uplink has it.
        let mut removed = Vec::new();
        for (iface, index) in &self.uplinks {
            match uplink::remove(*index, address) {
                Ok(true) => removed.push(iface.clone()),
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!("cluster egress {address}: removing it from {iface}: {err}")
                }
            }
        }
        if let Some(i) = entry.on_uplink.take()
            && let Some((iface, _)) = self.uplinks.get(i)
            && let Err(err) = self.announcer.withdraw(iface, address)
        {
            tracing::warn!("cluster egress {address}: withdrawing it: {err}");
        }
        if !removed.is_empty() {
            tracing::info!(
                "cluster egress {address}: removed from {}",
                removed.join(", ")
            );
        }
    }

    /// Owners without an expiring Lease (manifest mode, keep mode) extend the lifetime here.
    fn refresh(&mut self) {
        let due: Vec<IpAddr> = self
            .addresses
            .iter()
            .filter(|(_, a)| {
                a.status
                    .as_ref()
                    .is_some_and(|s| s.role == Role::Owner && s.valid_until.is_none())
            })
            .map(|(ip, _)| *ip)
            .collect();
        for a in due {
            self.put_on_uplink(a);
        }
    }

    fn announce_due(&mut self) {
        let now = Instant::now();
        for (address, entry) in &mut self.addresses {
            if entry.announce_at.first().is_none_or(|t| *t > now) {
                continue;
            }
            entry.announce_at.retain(|t| *t > now);
            let Some((iface, _)) = entry.on_uplink.and_then(|i| self.uplinks.get(i)) else {
                continue;
            };
            if let Err(err) = self.announcer.announce(iface, *address) {
                tracing::warn!("cluster egress {address}: announcing it on {iface}: {err}");
            }
        }
    }

    /// Stopping: addresses off the uplinks; what this node owned is refused here until the next
    /// agent learns the new owner (a moment), rather than sent from an address it gave up.
    fn shutdown(&mut self) {
        let owned: Vec<IpAddr> = self
            .addresses
            .iter()
            .filter(|(_, a)| a.written.is_some_and(|w| w.1))
            .map(|(ip, _)| *ip)
            .collect();
        let all: Vec<IpAddr> = self.addresses.keys().copied().collect();
        for a in all {
            if self.addresses[&a].on_uplink.is_some() {
                self.take_off_uplink(a);
            }
        }
        for a in owned {
            if let Err(err) = self.maps.set_cluster_egress(a, None, false) {
                tracing::warn!("cluster egress {a}: {err}");
            }
        }
        let _ = std::fs::remove_file(state_path(&self.state_dir));
    }

    fn publish(&mut self) {
        let owners: Vec<EgressOwnership> = self
            .addresses
            .iter()
            .map(|(address, a)| EgressOwnership {
                address: *address,
                owner: a
                    .status
                    .as_ref()
                    .and_then(|s| s.holder.clone())
                    .map(|h| h.node),
                local: a.status.as_ref().is_some_and(|s| s.role == Role::Owner),
                fenced: a.status.as_ref().is_some_and(|s| s.role == Role::Fenced),
            })
            .collect();
        self.telemetry.set_cluster_egress(owners, self.peers.len());
        let state = EgressState {
            pid: std::process::id(),
            node_address: self.own,
            announce: self.announce_name.to_owned(),
            tunnel_peers: self.peers.iter().copied().collect(),
            addresses: self
                .addresses
                .iter()
                .map(|(address, a)| {
                    let status = a.status.as_ref();
                    AddressState {
                        address: *address,
                        lease: status.map(|s| s.lease.clone()).filter(|l| !l.is_empty()),
                        owner: status
                            .and_then(|s| s.holder.as_ref())
                            .map(|h| h.node.clone()),
                        owner_address: status
                            .and_then(|s| s.holder.as_ref())
                            .and_then(|h| h.address),
                        role: match status.map(|s| s.role) {
                            Some(Role::Owner) => "owner",
                            Some(Role::Fenced) => "fenced",
                            Some(Role::Follower) => "follower",
                            None => "unknown",
                        }
                        .to_owned(),
                        interface: a
                            .on_uplink
                            .and_then(|i| self.uplinks.get(i))
                            .map(|(n, _)| n.clone()),
                        since: a.since.and_then(|t| {
                            t.duration_since(SystemTime::UNIX_EPOCH)
                                .ok()
                                .map(|d| d.as_secs())
                        }),
                    }
                })
                .collect(),
        };
        if let Err(err) = write_state(&self.state_dir, &state) {
            tracing::debug!("cluster egress: writing {}: {err}", STATE_FILE);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn status(role: Role, holder: Option<(&str, &str)>) -> Status {
        Status {
            address: ip("10.0.0.50"),
            lease: "l".into(),
            holder: holder.map(|(n, a)| Holder {
                node: n.into(),
                address: Some(a.parse().unwrap()),
            }),
            role,
            valid_until: None,
            acquired: None,
            handoff: None,
        }
    }

    #[test]
    fn the_data_path_is_told_the_owner_and_whether_it_is_here() {
        let own = Some(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(
            map_entry(&status(Role::Owner, Some(("b", "10.0.0.2"))), own),
            (Some(ip("10.0.0.2")), true)
        );
        assert_eq!(
            map_entry(&status(Role::Fenced, Some(("b", "10.0.0.2"))), own),
            (Some(ip("10.0.0.2")), true),
            "a fenced owner keeps serving what still reaches it"
        );
        assert_eq!(
            map_entry(&status(Role::Follower, Some(("c", "10.0.0.3"))), own),
            (Some(ip("10.0.0.3")), false)
        );
        assert_eq!(map_entry(&status(Role::Follower, None), own), (None, false));
    }

    #[test]
    fn the_uplink_lifetime_ends_before_the_owners_deadline() {
        let now = Instant::now();
        let default = Duration::from_millis(3333);
        assert_eq!(owner_lifetime(None, now, default), Some(3));
        // Renewed a moment ago, deadline 3.3 s on: 2 s, plus up to 1 s of the kernel's lateness
        // stays inside the deadline.
        assert_eq!(
            owner_lifetime(Some(now + Duration::from_millis(3300)), now, default),
            Some(2)
        );
        assert_eq!(
            owner_lifetime(Some(now + Duration::from_millis(1900)), now, default),
            None,
            "too close to the deadline: no extension"
        );
        assert_eq!(owner_lifetime(Some(now), now, default), None);
    }

    #[test]
    fn manifest_owners_are_checked_against_the_declaration_and_this_node() {
        let config = ClusterEgressConfig::new(
            &["10.0.0.50".parse().unwrap(), "fd00::50".parse().unwrap()],
            &[],
        )
        .unwrap();
        let me = Ipv4Addr::new(10, 0, 0, 2);
        let setup = |gateway, owners: &[&str]| ManifestSetup {
            gateway,
            owners: owners.iter().map(|o| o.parse().unwrap()).collect(),
            peers: BTreeSet::new(),
            tunnel_ip: me,
        };
        let statuses = static_statuses(
            &config,
            &setup(true, &["10.0.0.50=10.0.0.2", "fd00::50=10.0.0.3"]),
        )
        .unwrap();
        assert_eq!(statuses.len(), 2);
        assert_eq!(statuses[0].role, Role::Owner);
        assert_eq!(statuses[1].role, Role::Follower);
        assert_eq!(
            statuses[1].holder.as_ref().unwrap().address,
            Some(Ipv4Addr::new(10, 0, 0, 3))
        );
        assert!(matches!(
            static_statuses(&config, &setup(false, &["10.0.0.50=10.0.0.2"])),
            Err(EgressError::NotGateway { .. })
        ));
        assert!(matches!(
            static_statuses(&config, &setup(true, &["10.0.0.51=10.0.0.2"])),
            Err(EgressError::UndeclaredOwner(_))
        ));
        assert!(matches!(
            static_statuses(
                &config,
                &setup(true, &["10.0.0.50=10.0.0.2", "10.0.0.50=10.0.0.3"])
            ),
            Err(EgressError::TwoOwners(_))
        ));
        let nobody = static_statuses(&config, &setup(true, &[])).unwrap();
        assert!(
            nobody
                .iter()
                .all(|s| s.holder.is_none() && s.role == Role::Follower)
        );
    }
}
