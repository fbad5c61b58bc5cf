//! Kubernetes mode: a `coordination.k8s.io/v1` Lease per address in extproxy's namespace, one
//! watch of those Leases shared by every address's elector, a light watch of all Nodes (who is a
//! gateway candidate, and every node's address for the tunnel), and an Event on each move.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use futures::StreamExt as _;
use k8s_openapi::Resource as _;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeStatus, ObjectReference};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

use super::config::{Fencing, Timing, lease_name};
use super::lease::{
    Acquired, Candidacy, Elector, ElectorConfig, LeaseRecord, LeaseStore, LeaseWrite, Observation,
    Status, StoreError, Watched,
};

/// Nodes carrying this label with value `true` are gateway candidates.
pub const GATEWAY_LABEL: &str = "extproxy.io/egress-gateway";
/// The Leases' label, which the watch selects.
pub const COMPONENT_LABEL: (&str, &str) = ("app.kubernetes.io/component", "cluster-egress");
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "extproxy");
/// On the Lease: the address it elects the owner of (its name says it too, less readably).
pub const ADDRESS_ANNOTATION: &str = "extproxy.io/cluster-egress-ip";
/// On the Lease: the holder's node address, where the other nodes tunnel the flows. Written by
/// the holder with its identity in one update, so a reader never pairs one holder with another's
/// address.
pub const OWNER_ADDRESS_ANNOTATION: &str = "extproxy.io/owner-address";

/// The Leases of one namespace through the API server.
#[derive(Clone)]
pub struct KubeLeases {
    api: Api<Lease>,
    namespace: String,
}

impl KubeLeases {
    pub fn new(client: Client, namespace: &str) -> Self {
        KubeLeases {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }
}

fn store_error(err: kube::Error) -> StoreError {
    match err {
        kube::Error::Api(status) if status.code == 409 => StoreError::Conflict,
        other => StoreError::Other(crate::kube::source::error_chain(&other)),
    }
}

/// A Lease as the elector reads it.
pub fn record(lease: &Lease) -> LeaseRecord {
    let spec = lease.spec.clone().unwrap_or_default();
    let annotations = lease.metadata.annotations.as_ref();
    LeaseRecord {
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        owner_address: annotations
            .and_then(|a| a.get(OWNER_ADDRESS_ANNOTATION))
            .and_then(|a| a.parse().ok()),
        duration_secs: spec.lease_duration_seconds.map_or(0, |d| d.max(0) as u32),
        transitions: spec.lease_transitions.unwrap_or(0),
        acquire_time: spec.acquire_time.map(|t| t.0),
        renew_time: spec.renew_time.map(|t| t.0),
        version: lease.metadata.resource_version.clone().unwrap_or_default(),
    }
}

/// The Lease object for `write`.
pub fn lease_object(
    name: &str,
    namespace: &str,
    address: IpAddr,
    version: Option<&str>,
    write: &LeaseWrite,
) -> Lease {
    let mut annotations = BTreeMap::from([(ADDRESS_ANNOTATION.to_owned(), address.to_string())]);
    if let Some(owner) = write.owner_address {
        annotations.insert(OWNER_ADDRESS_ANNOTATION.to_owned(), owner.to_string());
    }
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            resource_version: version.map(str::to_owned),
            labels: Some(BTreeMap::from([
                (COMPONENT_LABEL.0.to_owned(), COMPONENT_LABEL.1.to_owned()),
                (MANAGED_BY_LABEL.0.to_owned(), MANAGED_BY_LABEL.1.to_owned()),
            ])),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: write.holder.clone(),
            lease_duration_seconds: Some(write.duration_secs as i32),
            lease_transitions: Some(write.transitions),
            acquire_time: write.acquire_time.map(MicroTime),
            renew_time: write.renew_time.map(MicroTime),
            ..LeaseSpec::default()
        }),
    }
}

impl LeaseStore for KubeLeases {
    async fn get(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        self.api
            .get_opt(name)
            .await
            .map(|l| l.as_ref().map(record))
            .map_err(store_error)
    }

    async fn create(
        &self,
        name: &str,
        address: IpAddr,
        write: &LeaseWrite,
    ) -> Result<LeaseRecord, StoreError> {
        let lease = lease_object(name, &self.namespace, address, None, write);
        self.api
            .create(&PostParams::default(), &lease)
            .await
            .map(|l| record(&l))
            .map_err(store_error)
    }

    async fn replace(
        &self,
        name: &str,
        address: IpAddr,
        version: &str,
        write: &LeaseWrite,
    ) -> Result<LeaseRecord, StoreError> {
        let lease = lease_object(name, &self.namespace, address, Some(version), write);
        self.api
            .replace(name, &PostParams::default(), &lease)
            .await
            .map(|l| record(&l))
            .map_err(store_error)
    }
}

/// A running election: an elector per address and the Lease watch they share.
pub struct Election {
    /// Each address's status, whenever it changes (and after every renewal while owning).
    pub updates: tokio::sync::mpsc::UnboundedReceiver<Status>,
    /// End when stopped (after releasing what they hold).
    pub electors: Vec<tokio::task::JoinHandle<()>>,
    /// Runs until stopped.
    pub watch: tokio::task::JoinHandle<()>,
}

/// Elects the owners of `addresses` with Leases in `namespace`, as `identity` (the node name).
/// `candidacy` says whether this node stands; `stop` ends it, releasing held Leases.
#[allow(clippy::too_many_arguments)]
pub fn elect(
    client: &Client,
    namespace: &str,
    identity: &str,
    addresses: impl IntoIterator<Item = IpAddr>,
    timing: Timing,
    fencing: Fencing,
    candidacy: watch::Receiver<Candidacy>,
    stop: watch::Receiver<bool>,
) -> Election {
    let (updates_tx, updates) = tokio::sync::mpsc::unbounded_channel();
    let mut senders = HashMap::new();
    let mut electors = Vec::new();
    for address in addresses {
        let (tx, rx) = watch::channel(Watched::default());
        senders.insert(lease_name(address), tx);
        let elector = Elector::new(
            ElectorConfig {
                address,
                identity: identity.to_owned(),
                timing,
                fencing,
            },
            KubeLeases::new(client.clone(), namespace),
        );
        electors.push(tokio::spawn(elector.run(
            rx,
            candidacy.clone(),
            stop.clone(),
            updates_tx.clone(),
        )));
    }
    let watch = tokio::spawn(watch_leases(
        client.clone(),
        namespace.to_owned(),
        senders,
        stop,
    ));
    Election {
        updates,
        electors,
        watch,
    }
}

/// Watches the cluster egress Leases of `namespace` and hands each address's elector what its
/// Lease holds (`senders`: by Lease name). Runs until `stop`.
pub async fn watch_leases(
    client: Client,
    namespace: String,
    senders: HashMap<String, watch::Sender<Watched>>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let selector = format!("{}={}", COMPONENT_LABEL.0, COMPONENT_LABEL.1);
    let mut stream = watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .boxed();
    // A relist is collected whole and swapped in at its end, like a reflector store.
    let mut listing: Option<HashMap<String, Lease>> = None;
    let mut lists = 0;
    let mut failing = false;
    loop {
        let event = tokio::select! {
            _ = stop.changed() => return,
            event = stream.next() => match event {
                Some(e) => e,
                None => return,
            },
        };
        let event = match event {
            Ok(e) => {
                if failing {
                    tracing::info!("cluster egress: watching Leases in {namespace} again");
                    failing = false;
                }
                e
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(
                        "cluster egress: watching Leases in {namespace}: {}; owners are kept \
                         as last seen; retrying",
                        crate::kube::source::error_chain(&err)
                    );
                    failing = true;
                }
                continue;
            }
        };
        match event {
            watcher::Event::Init => listing = Some(HashMap::new()),
            watcher::Event::InitApply(lease) => {
                if let (Some(list), Some(name)) = (listing.as_mut(), lease.metadata.name.clone()) {
                    list.insert(name, lease);
                }
            }
            watcher::Event::InitDone => {
                let list = listing.take().unwrap_or_default();
                lists += 1;
                for (name, tx) in &senders {
                    let observation = list
                        .get(name)
                        .map_or(Observation::Absent, |l| Observation::Present(record(l)));
                    tx.send_replace(Watched {
                        observation,
                        listing: lists,
                    });
                }
            }
            watcher::Event::Apply(lease) => {
                if let Some(tx) = lease.metadata.name.as_ref().and_then(|n| senders.get(n)) {
                    let observation = Observation::Present(record(&lease));
                    tx.send_if_modified(|w| replace_if_changed(w, observation, lists));
                }
            }
            watcher::Event::Delete(lease) => {
                if let Some(tx) = lease.metadata.name.as_ref().and_then(|n| senders.get(n)) {
                    tx.send_if_modified(|w| replace_if_changed(w, Observation::Absent, lists));
                }
            }
        }
    }
}

fn replace_if_changed(current: &mut Watched, observation: Observation, listing: u64) -> bool {
    if current.observation == observation {
        return false;
    }
    *current = Watched {
        observation,
        listing,
    };
    true
}

/// What the Node watch tells the electors and the data path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub candidacy: Candidacy,
    /// Every node's tunnel address (this one's too): those an owner accepts tunnelled flows from.
    pub peers: BTreeSet<IpAddr>,
    /// Nodes labelled as gateway candidates (for the log).
    pub gateways: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeFacts {
    gateway: bool,
    tunnel: Option<Ipv4Addr>,
}

fn node_facts(node: &Node) -> NodeFacts {
    let gateway = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(GATEWAY_LABEL))
        .is_some_and(|v| v == "true");
    let tunnel = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| match a.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => Some(v4),
            _ => None,
        });
    NodeFacts { gateway, tunnel }
}

/// Keeps only what the view needs: a Node's status is mostly its image list.
fn strip_node(node: &mut Node) {
    let meta = &mut node.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == GATEWAY_LABEL);
    }
    node.spec = None;
    node.status = node.status.take().map(|s| NodeStatus {
        addresses: s.addresses,
        ..NodeStatus::default()
    });
}

/// The view from every node's facts: `own` is this node's name, `tunnel_override` `--tunnel-ip`.
fn view(
    nodes: &BTreeMap<String, NodeFacts>,
    own: &str,
    tunnel_override: Option<Ipv4Addr>,
) -> NodeView {
    let mine = nodes.get(own);
    NodeView {
        candidacy: Candidacy {
            candidate: mine.is_some_and(|n| n.gateway),
            address: tunnel_override.or(mine.and_then(|n| n.tunnel)),
        },
        peers: nodes
            .values()
            .filter_map(|n| n.tunnel.map(IpAddr::V4))
            .chain(tunnel_override.map(IpAddr::V4))
            .collect(),
        gateways: nodes
            .iter()
            .filter(|(_, n)| n.gateway)
            .map(|(name, _)| name.clone())
            .collect(),
    }
}

/// Watches every Node (metadata and addresses only are kept) and publishes the view once the
/// first list is complete, then on every change of it.
pub async fn watch_nodes(
    client: Client,
    own: String,
    tunnel_override: Option<Ipv4Addr>,
    views: watch::Sender<Option<NodeView>>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Node> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(strip_node)
        .boxed();
    let mut nodes: BTreeMap<String, NodeFacts> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, NodeFacts>> = None;
    let mut synced = false;
    let mut failing = false;
    loop {
        let event = tokio::select! {
            _ = stop.changed() => return,
            event = stream.next() => match event {
                Some(e) => e,
                None => return,
            },
        };
        let event = match event {
            Ok(e) => {
                failing = false;
                e
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(
                        "cluster egress: watching Nodes: {}; retrying",
                        crate::kube::source::error_chain(&err)
                    );
                    failing = true;
                }
                continue;
            }
        };
        match event {
            watcher::Event::Init => listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(node) => {
                if let (Some(list), Some(name)) = (listing.as_mut(), node.metadata.name.clone()) {
                    list.insert(name, node_facts(&node));
                }
            }
            watcher::Event::InitDone => {
                nodes = listing.take().unwrap_or_default();
                synced = true;
            }
            watcher::Event::Apply(node) => {
                if let Some(name) = node.metadata.name.clone() {
                    nodes.insert(name, node_facts(&node));
                }
            }
            watcher::Event::Delete(node) => {
                if let Some(name) = &node.metadata.name {
                    nodes.remove(name);
                }
            }
        }
        if synced {
            let v = view(&nodes, &own, tunnel_override);
            views.send_if_modified(|current| {
                if current.as_ref() == Some(&v) {
                    return false;
                }
                *current = Some(v);
                true
            });
        }
    }
}

/// The Event on the Lease when this node took its address: reason `ClusterEgressMoved` (from
/// another node) or `ClusterEgressAcquired` (nobody held it). Only the new owner writes it, once
/// per move.
pub fn move_event(namespace: &str, node: &str, status: &Status, acquired: &Acquired) -> K8sEvent {
    let (reason, note) = match &acquired.previous {
        Some(previous) if acquired.expired => (
            "ClusterEgressMoved",
            format!(
                "cluster egress address {} moved from {previous} to {node}: {previous} stopped \
                 renewing Lease {}",
                status.address, status.lease
            ),
        ),
        Some(previous) => (
            "ClusterEgressMoved",
            format!(
                "cluster egress address {} moved from {previous} to {node}: {previous} released \
                 Lease {}",
                status.address, status.lease
            ),
        ),
        None => (
            "ClusterEgressAcquired",
            format!(
                "cluster egress address {} is owned by {node} (nobody held Lease {})",
                status.address, status.lease
            ),
        ),
    };
    K8sEvent {
        metadata: ObjectMeta {
            // One per move: the transition count tells moves apart, every node's name is unique.
            name: Some(format!("{}.{}-{node}", status.lease, acquired.transitions)),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        type_: Some("Normal".to_owned()),
        reason: Some(reason.to_owned()),
        action: Some("Acquire".to_owned()),
        note: Some(note),
        regarding: Some(ObjectReference {
            api_version: Some("coordination.k8s.io/v1".to_owned()),
            kind: Some(Lease::KIND.to_owned()),
            namespace: Some(namespace.to_owned()),
            name: Some(status.lease.clone()),
            ..ObjectReference::default()
        }),
        reporting_controller: Some("extproxy".to_owned()),
        reporting_instance: Some(format!("extproxy-{node}")),
        ..K8sEvent::default()
    }
}

/// Publishes the move's Event in the background (a failure is logged, never retried).
pub fn publish_move(client: &Client, namespace: &str, node: &str, status: &Status) {
    let Some(acquired) = &status.acquired else {
        return;
    };
    let event = move_event(namespace, node, status, acquired);
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), namespace);
    tokio::spawn(async move {
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(err) => tracing::warn!(
                "cluster egress: publishing the Event of the move: {}",
                crate::kube::source::error_chain(&err)
            ),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeAddress;

    fn node(name: &str, gateway: Option<&str>, addresses: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: gateway.map(|v| {
                    BTreeMap::from([
                        (GATEWAY_LABEL.to_owned(), v.to_owned()),
                        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                    ])
                }),
                annotations: Some(BTreeMap::from([("big".to_owned(), "x".repeat(100))])),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: (*t).into(),
                            address: (*a).into(),
                        })
                        .collect(),
                ),
                images: Some(vec![Default::default(); 50]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn the_node_view_names_candidates_and_every_tunnel_address() {
        let nodes: BTreeMap<String, NodeFacts> = [
            node(
                "a",
                None,
                &[("InternalIP", "fd00::1"), ("InternalIP", "10.0.0.1")],
            ),
            node("b", Some("true"), &[("InternalIP", "10.0.0.2")]),
            node("c", Some("false"), &[("InternalIP", "10.0.0.3")]),
            node("d", Some("true"), &[("ExternalIP", "198.51.100.4")]),
        ]
        .iter()
        .map(|n| (n.metadata.name.clone().unwrap(), node_facts(n)))
        .collect();
        let b = view(&nodes, "b", None);
        assert_eq!(
            b.candidacy,
            Candidacy {
                candidate: true,
                address: Some(Ipv4Addr::new(10, 0, 0, 2))
            }
        );
        assert_eq!(
            b.peers,
            ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect()
        );
        assert_eq!(b.gateways, BTreeSet::from(["b".to_owned(), "d".to_owned()]));
        let c = view(&nodes, "c", None);
        assert!(!c.candidacy.candidate, "labelled false");
        // A gateway without an IPv4 InternalIP cannot be tunnelled to: no address, so it never
        // stands (the elector needs both).
        let d = view(&nodes, "d", None);
        assert!(d.candidacy.candidate && d.candidacy.address.is_none());
        let d = view(&nodes, "d", Some(Ipv4Addr::new(10, 0, 0, 4)));
        assert_eq!(d.candidacy.address, Some(Ipv4Addr::new(10, 0, 0, 4)));
        assert!(d.peers.contains(&"10.0.0.4".parse::<IpAddr>().unwrap()));
        assert_eq!(
            view(&nodes, "unknown", None).candidacy,
            Candidacy::default()
        );
    }

    #[test]
    fn nodes_are_stripped_to_the_gateway_label_and_addresses() {
        let mut n = node("b", Some("true"), &[("InternalIP", "10.0.0.2")]);
        let before = node_facts(&n);
        strip_node(&mut n);
        assert_eq!(node_facts(&n), before);
        assert_eq!(n.metadata.annotations, None);
        assert_eq!(n.metadata.labels.as_ref().unwrap().len(), 1);
        assert_eq!(n.status.as_ref().unwrap().images, None);
    }

    #[test]
    fn leases_round_trip_through_the_api_types() {
        let write = LeaseWrite {
            holder: Some("node-b".into()),
            owner_address: Some(Ipv4Addr::new(10, 0, 0, 2)),
            duration_secs: 5,
            transitions: 3,
            acquire_time: Some("2026-12-07T10:00:00Z".parse().unwrap()),
            renew_time: Some("2026-12-07T10:00:04.5Z".parse().unwrap()),
        };
        let mut lease = lease_object(
            "extproxy-egress-10-0-0-50",
            "extproxy-system",
            "10.0.0.50".parse().unwrap(),
            Some("41"),
            &write,
        );
        let json = serde_json::to_value(&lease).unwrap();
        assert_eq!(json["spec"]["holderIdentity"], "node-b");
        assert_eq!(json["spec"]["leaseDurationSeconds"], 5);
        assert_eq!(
            json["metadata"]["annotations"][OWNER_ADDRESS_ANNOTATION],
            "10.0.0.2"
        );
        assert_eq!(
            json["metadata"]["labels"][COMPONENT_LABEL.0],
            COMPONENT_LABEL.1
        );
        let r = record(&lease);
        assert_eq!(r.holder.as_deref(), Some("node-b"));
        assert_eq!(r.owner_address, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!((r.duration_secs, r.transitions), (5, 3));
        assert_eq!(r.renew_time, write.renew_time);
        assert_eq!(r.version, "41");
        // Released: no holder, no owner address.
        lease.spec.as_mut().unwrap().holder_identity = Some(String::new());
        assert_eq!(record(&lease).holder, None);
    }

    #[test]
    fn a_move_event_says_from_where_to_where_and_why() {
        let status = Status {
            address: "10.0.0.50".parse().unwrap(),
            lease: "extproxy-egress-10-0-0-50".into(),
            holder: None,
            role: super::super::lease::Role::Owner,
            valid_until: None,
            acquired: None,
            handoff: None,
        };
        let expired = Acquired {
            previous: Some("node-b".into()),
            expired: true,
            transitions: 4,
        };
        let e = move_event("extproxy-system", "node-c", &status, &expired);
        assert_eq!(
            e.metadata.name.as_deref(),
            Some("extproxy-egress-10-0-0-50.4-node-c")
        );
        assert_eq!(e.reason.as_deref(), Some("ClusterEgressMoved"));
        assert_eq!(
            e.note.as_deref(),
            Some(
                "cluster egress address 10.0.0.50 moved from node-b to node-c: node-b stopped \
                 renewing Lease extproxy-egress-10-0-0-50"
            )
        );
        assert_eq!(e.regarding.as_ref().unwrap().kind.as_deref(), Some("Lease"));
        let first = Acquired {
            previous: None,
            expired: false,
            transitions: 0,
        };
        let e = move_event("extproxy-system", "node-c", &status, &first);
        assert_eq!(e.reason.as_deref(), Some("ClusterEgressAcquired"));
    }
}
