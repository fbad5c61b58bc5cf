//! The reconciler fed through kube-rs store writers: the same stores, events and translation the
//! Kubernetes source uses, programmed into the in-memory map model.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use proxy_common::user::port_host;
use proxy_common::{BackendState, FrontendKind};
use serde_json::{Value, json};

use super::cluster::ClusterState;
use super::events::EventTracker;
use super::node::{self, NodeOverrides};
use super::source::{SourceConfig, translate_cluster};
use crate::names::{SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};
use crate::reconcile::{Limits, MapOp, MapState, Reconciler};
use crate::translate::{ClaimReason, IpFamily, ObjectKey, Protocol, ServicePortKey, Translation};

const LIMITS: Limits = Limits {
    max_services: 64,
    max_backends: 256,
};
const NODE: &str = "node-a";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn service(namespace: &str, name: &str, labelled: bool, spec: Value) -> Service {
    let labels = if labelled {
        json!({ SERVICE_PROXY_NAME_LABEL: "extproxy" })
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": spec,
    }))
    .unwrap()
}

/// A labelled selector-less ClusterIP Service with the given ports ([name, port, protocol]).
fn cluster_ip(name: &str, cluster_ip: &str, ports: Value) -> Service {
    service(
        "default",
        name,
        true,
        json!({"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports}),
    )
}

fn slice(name: &str, service: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name, "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn ready(addrs: &[&str]) -> Value {
    Value::Array(
        addrs
            .iter()
            .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
            .collect(),
    )
}

fn node(internal: &str, external: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": NODE},
        "status": {"addresses": [
            {"type": "InternalIP", "address": internal},
            {"type": "ExternalIP", "address": external},
            {"type": "Hostname", "address": NODE},
        ]},
    }))
    .unwrap()
}

fn list<K: Clone>(objects: &[K]) -> Vec<Event<K>> {
    let mut events = vec![Event::Init];
    events.extend(objects.iter().cloned().map(Event::InitApply));
    events.push(Event::InitDone);
    events
}

fn cluster(services: &[Service], slices: &[EndpointSlice]) -> ClusterState {
    let mut c = ClusterState::new(NODE);
    for e in list(services) {
        c.apply_service(&e);
    }
    for e in list(slices) {
        c.apply_slice(&e);
    }
    for e in list(&[node("10.240.0.10", "198.51.100.10")]) {
        c.apply_node(&e);
    }
    c
}

fn config(claim_all_selectorless: bool) -> SourceConfig {
    SourceConfig {
        node_name: NODE.to_owned(),
        claim_all_selectorless,
        overrides: NodeOverrides::default(),
        streaming_lists: false,
        cluster_egress: Default::default(),
    }
}

fn translate(c: &ClusterState, config: &SourceConfig) -> Translation {
    let facts = node::resolve(c.node().as_deref(), &config.overrides);
    translate_cluster(c, config, &facts)
}

/// The agent's loop in miniature: translate the stores, program the model, return the ops.
struct Harness {
    config: SourceConfig,
    reconciler: Reconciler,
    maps: MapState,
}

impl Harness {
    fn new() -> Self {
        Harness {
            config: config(false),
            reconciler: Reconciler::new(LIMITS),
            maps: MapState::default(),
        }
    }

    fn program(&mut self, c: &ClusterState) -> Vec<MapOp> {
        assert!(c.synced(), "never program before every initial list");
        let t = translate(c, &self.config);
        let plan = self.reconciler.plan(&t.desired);
        let ops = plan.map_ops();
        let report = self.reconciler.apply(plan, &mut self.maps);
        assert!(report.failures.is_empty());
        ops
    }

    fn id(&self, key: &ServicePortKey) -> Option<u32> {
        self.reconciler.service_id(key)
    }

    /// The live endpoints of a Service port in the maps: (address, port) -> Active/Draining.
    fn endpoints(&self, key: &ServicePortKey) -> BTreeMap<(IpAddr, u16), BackendState> {
        let Some(id) = self.id(key) else {
            return BTreeMap::new();
        };
        self.maps
            .backends
            .values()
            .filter(|b| b.service_id == id && b.state != BackendState::Free as u8)
            .map(|b| {
                let state = if b.state == BackendState::Active as u8 {
                    BackendState::Active
                } else {
                    BackendState::Draining
                };
                ((b.addr.to_ip(), port_host(b.port)), state)
            })
            .collect()
    }

    /// Sorted by address.
    fn frontends(&self, key: &ServicePortKey) -> Vec<(IpAddr, u16, FrontendKind)> {
        let Some(id) = self.id(key) else {
            return Vec::new();
        };
        let mut out: Vec<_> = self
            .maps
            .frontends
            .iter()
            .filter(|(_, v)| v.service_id == id)
            .map(|(k, v)| {
                (
                    k.addr.to_ip(),
                    port_host(k.port),
                    FrontendKind::from_u8(v.kind).unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Ops touching anything of the given service ids (frontends, service, slots, backends).
    fn touches(&self, ops: &[MapOp], id: u32) -> bool {
        ops.iter().any(|op| match op {
            MapOp::PutFrontend(_, v) => v.service_id == id,
            MapOp::DeleteFrontend(k) => {
                self.maps.frontends.get(k).map(|v| v.service_id) == Some(id)
            }
            MapOp::PutService(s, _) | MapOp::DeleteService(s) => *s == id,
            MapOp::PutSlot(k, _) | MapOp::DeleteSlot(k) => k.service_id == id,
            MapOp::PutBackend(_, b) => b.service_id == id,
            MapOp::PutSrcRange(r) | MapOp::DeleteSrcRange(r) => r.service_id == id,
            MapOp::PutMaglev(s, _) | MapOp::DeleteMaglev(s) => *s == id,
            MapOp::PutEgressPool(s, _) | MapOp::DeleteEgressPool(s) => *s == id,
        })
    }
}

fn spk(name: &str, port_name: &str, protocol: Protocol) -> ServicePortKey {
    ServicePortKey {
        namespace: "default".into(),
        name: name.into(),
        port_name: port_name.into(),
        protocol,
        family: IpFamily::V4,
    }
}

fn claimed(t: &Translation) -> BTreeMap<String, ClaimReason> {
    t.claimed
        .iter()
        .map(|c| (c.service.to_string(), c.reason))
        .collect()
}

fn messages(t: &Translation) -> Vec<String> {
    t.diagnostics.iter().map(ToString::to_string).collect()
}

#[test]
fn claims_follow_the_label_and_the_claim_all_flag() {
    let ports = json!([{"port": 80}]);
    let services = [
        service("default", "labelled", true, json!({"ports": ports})),
        service("default", "bare", false, json!({"ports": ports})),
        service(
            "default",
            "web",
            false,
            json!({"selector": {"app": "web"}, "ports": ports}),
        ),
        service(
            "default",
            "labelled-with-selector",
            true,
            json!({"selector": {"app": "web"}, "ports": ports}),
        ),
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": "other-proxy",
                         "labels": {SERVICE_PROXY_NAME_LABEL: "cilium"}},
            "spec": {"ports": ports},
        }))
        .unwrap(),
    ];
    let c = cluster(&services, &[]);

    let t = translate(&c, &config(false));
    assert_eq!(
        claimed(&t),
        BTreeMap::from([
            ("default/labelled".to_owned(), ClaimReason::Label),
            // The label is the contract with kube-proxy: it skips the Service, so extproxy must
            // serve it, selector or not.
            (
                "default/labelled-with-selector".to_owned(),
                ClaimReason::Label
            ),
        ])
    );
    let m = messages(&t);
    for expected in [
        "Service default/bare: metadata.labels: not labelled service.kubernetes.io/service-proxy-name: extproxy: left to kube-proxy",
        "Service default/web: metadata.labels: not labelled service.kubernetes.io/service-proxy-name: extproxy: left to kube-proxy",
        "Service default/other-proxy: metadata.labels[service.kubernetes.io/service-proxy-name]: service-proxy-name is \"cilium\", not extproxy: left to that proxy",
    ] {
        assert!(m.iter().any(|l| l == expected), "{expected} not in {m:#?}");
    }

    let t = translate(&c, &config(true));
    assert_eq!(
        claimed(&t),
        BTreeMap::from([
            ("default/bare".to_owned(), ClaimReason::SelectorLess),
            ("default/labelled".to_owned(), ClaimReason::Label),
            (
                "default/labelled-with-selector".to_owned(),
                ClaimReason::Label
            ),
        ])
    );
    assert!(
        messages(&t)
            .iter()
            .any(|l| l
                == "Service default/web: spec.selector: has a selector: belongs to kube-proxy")
    );
}

#[test]
fn slices_of_one_service_are_merged() {
    let mut h = Harness::new();
    let svc = cluster_ip("db", "10.96.0.10", json!([{"port": 5432}]));
    let port = json!([{"port": 15432}]);
    let c = cluster(
        &[svc],
        &[
            slice(
                "db-a",
                "db",
                port.clone(),
                ready(&["203.0.113.1", "203.0.113.2"]),
            ),
            slice("db-b", "db", port, ready(&["203.0.113.2", "203.0.113.3"])),
        ],
    );
    h.program(&c);
    let key = spk("db", "", Protocol::Tcp);
    assert_eq!(
        h.endpoints(&key),
        BTreeMap::from([
            ((ip("203.0.113.1"), 15432), BackendState::Active),
            ((ip("203.0.113.2"), 15432), BackendState::Active),
            ((ip("203.0.113.3"), 15432), BackendState::Active),
        ])
    );
    assert_eq!(
        h.frontends(&key),
        vec![(ip("10.96.0.10"), 5432, FrontendKind::ClusterIp)]
    );
}

#[test]
fn conditions_choose_who_gets_new_flows() {
    let mut h = Harness::new();
    let svc = cluster_ip("app", "10.96.0.11", json!([{"port": 80}]));
    let endpoints = json!([
        {"addresses": ["203.0.113.1"], "conditions": {"ready": true, "serving": true, "terminating": false}},
        {"addresses": ["203.0.113.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        {"addresses": ["203.0.113.3"], "conditions": {"ready": false, "serving": false, "terminating": false}},
        // No conditions: ready, as the API defines.
        {"addresses": ["203.0.113.4"]},
    ]);
    let port = json!([{"port": 8080}]);
    let mut c = cluster(&[svc], &[slice("app-1", "app", port.clone(), endpoints)]);
    h.program(&c);
    let key = spk("app", "", Protocol::Tcp);
    assert_eq!(
        h.endpoints(&key),
        BTreeMap::from([
            ((ip("203.0.113.1"), 8080), BackendState::Active),
            ((ip("203.0.113.2"), 8080), BackendState::Draining),
            ((ip("203.0.113.3"), 8080), BackendState::Draining),
            ((ip("203.0.113.4"), 8080), BackendState::Active),
        ])
    );

    // Rolling away: none ready, one still serving while terminating. kube-proxy then sends new
    // connections to the serving one rather than refusing them.
    let endpoints = json!([
        {"addresses": ["203.0.113.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        {"addresses": ["203.0.113.3"], "conditions": {"ready": false, "serving": false, "terminating": true}},
    ]);
    c.apply_slice(&Event::Apply(slice("app-1", "app", port, endpoints)));
    h.program(&c);
    assert_eq!(
        h.endpoints(&key),
        BTreeMap::from([
            ((ip("203.0.113.2"), 8080), BackendState::Active),
            ((ip("203.0.113.3"), 8080), BackendState::Draining),
        ])
    );
}

#[test]
fn named_ports_match_by_name_and_protocol() {
    let mut h = Harness::new();
    let svc = cluster_ip(
        "db",
        "10.96.0.12",
        json!([
            {"name": "pg", "port": 5432, "protocol": "TCP"},
            {"name": "metrics", "port": 9187, "protocol": "UDP"},
            {"name": "admin", "port": 8443, "protocol": "TCP"},
        ]),
    );
    let ports = json!([
        {"name": "pg", "port": 15432, "protocol": "TCP"},
        {"name": "metrics", "port": 19187, "protocol": "UDP"},
        {"name": "metrics", "port": 29187, "protocol": "TCP"},
        {"name": "adm", "port": 18443, "protocol": "TCP"},
    ]);
    let c = cluster(
        &[svc],
        &[slice("db-1", "db", ports, ready(&["203.0.113.7"]))],
    );
    h.program(&c);
    assert_eq!(
        h.endpoints(&spk("db", "pg", Protocol::Tcp)),
        BTreeMap::from([((ip("203.0.113.7"), 15432), BackendState::Active)])
    );
    assert_eq!(
        h.endpoints(&spk("db", "metrics", Protocol::Udp)),
        BTreeMap::from([((ip("203.0.113.7"), 19187), BackendState::Active)])
    );
    assert_eq!(
        h.endpoints(&spk("db", "admin", Protocol::Tcp)),
        BTreeMap::new()
    );
    let t = translate(&c, &h.config);
    let mismatch = messages(&t)
        .into_iter()
        .find(|m| m.contains("spec.ports[2].name"))
        .expect("the unmatched port is reported");
    assert!(
        mismatch.contains("port \"admin\" matches no endpoint port"),
        "{mismatch}"
    );

    // The same words become an Event on the Service, once.
    let mut tracker = EventTracker::default();
    let events = tracker.plan(&t, &c);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason, "PortNameMismatch");
    assert_eq!(events[0].service, ObjectKey::new("default", "db"));
    assert_eq!(events[0].note, mismatch);
    assert!(tracker.plan(&t, &c).is_empty(), "only new problems");
}

#[test]
fn deletes_remove_what_they_name() {
    let mut h = Harness::new();
    let port = json!([{"port": 80}]);
    let mut c = cluster(
        &[
            cluster_ip("a", "10.96.0.21", port.clone()),
            cluster_ip("b", "10.96.0.22", port.clone()),
        ],
        &[
            slice("a-1", "a", port.clone(), ready(&["203.0.113.1"])),
            slice("a-2", "a", port.clone(), ready(&["203.0.113.2"])),
            slice("b-1", "b", port.clone(), ready(&["203.0.113.9"])),
        ],
    );
    h.program(&c);
    let (a, b) = (spk("a", "", Protocol::Tcp), spk("b", "", Protocol::Tcp));
    let b_id = h.id(&b).unwrap();

    c.apply_slice(&Event::Delete(slice(
        "a-1",
        "a",
        port.clone(),
        ready(&["203.0.113.1"]),
    )));
    let ops = h.program(&c);
    assert_eq!(
        h.endpoints(&a),
        BTreeMap::from([((ip("203.0.113.2"), 80), BackendState::Active)])
    );
    assert!(!h.touches(&ops, b_id), "b is untouched: {ops:?}");

    c.apply_service(&Event::Delete(cluster_ip("a", "10.96.0.21", port)));
    h.program(&c);
    assert_eq!(h.id(&a), None);
    assert!(
        h.maps.frontends.values().all(|v| v.service_id == b_id),
        "only b's frontends are left"
    );
    assert_eq!(
        h.maps.services.keys().copied().collect::<Vec<_>>(),
        vec![b_id]
    );
}

#[test]
fn relist_converges_and_touches_nothing_else() {
    let mut h = Harness::new();
    let port = json!([{"port": 80}]);
    let services = [
        cluster_ip("keep", "10.96.0.31", port.clone()),
        cluster_ip("change", "10.96.0.32", port.clone()),
        cluster_ip("gone", "10.96.0.33", port.clone()),
    ];
    let slices = [
        slice("keep-1", "keep", port.clone(), ready(&["203.0.113.1"])),
        slice("change-1", "change", port.clone(), ready(&["203.0.113.2"])),
        slice("gone-1", "gone", port.clone(), ready(&["203.0.113.3"])),
    ];
    let mut c = cluster(&services, &slices);
    h.program(&c);
    let keep = h.id(&spk("keep", "", Protocol::Tcp)).unwrap();
    let before = h.maps.clone();

    // A relist (after a 410 or an outage) while it is in flight: kube-rs buffers it, the store
    // still shows the old, complete list, and programming it changes nothing.
    c.apply_service(&Event::Init);
    c.apply_service(&Event::InitApply(services[0].clone()));
    c.apply_slice(&Event::Init);
    assert!(c.synced());
    assert!(h.program(&c).is_empty());
    assert_eq!(h.maps, before);

    // The relist ends: "gone" was deleted and "change" got another endpoint meanwhile.
    c.apply_service(&Event::InitApply(services[1].clone()));
    c.apply_service(&Event::InitDone);
    for s in [
        slices[0].clone(),
        slice(
            "change-1",
            "change",
            port,
            ready(&["203.0.113.2", "203.0.113.4"]),
        ),
        slices[2].clone(),
    ] {
        c.apply_slice(&Event::InitApply(s));
    }
    c.apply_slice(&Event::InitDone);
    let ops = h.program(&c);
    assert!(!ops.is_empty());
    assert!(
        !h.touches(&ops, keep),
        "an unchanged Service is never rewritten: {ops:?}"
    );
    assert_eq!(h.id(&spk("gone", "", Protocol::Tcp)), None);
    assert_eq!(
        h.endpoints(&spk("change", "", Protocol::Tcp)).len(),
        2,
        "the relisted endpoint is programmed"
    );
    // A second pass over the same stores is a no-op.
    assert!(h.program(&c).is_empty());
}

#[test]
fn adopted_maps_wait_for_every_initial_list() {
    // A first agent programmed the cluster...
    let mut first = Harness::new();
    let port = json!([{"port": 80}]);
    let services = [
        cluster_ip("a", "10.96.0.41", port.clone()),
        cluster_ip("b", "10.96.0.42", port.clone()),
    ];
    let slices = [
        slice("a-1", "a", port.clone(), ready(&["203.0.113.1"])),
        slice("b-1", "b", port, ready(&["203.0.113.2"])),
    ];
    first.program(&cluster(&services, &slices));

    // ...and a restarted one adopts its maps, then hears from the watchers one by one.
    let snapshot = crate::reconcile::MapSnapshot {
        frontends: first.maps.frontends.iter().map(|(k, v)| (*k, *v)).collect(),
        services: first.maps.services.iter().map(|(k, v)| (*k, *v)).collect(),
        slots: first.maps.slots.iter().map(|(k, v)| (*k, *v)).collect(),
        backends: first.maps.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        src_ranges: first.maps.src_ranges.iter().copied().collect(),
    };
    let mut h = Harness {
        config: config(false),
        reconciler: Reconciler::from_snapshot(snapshot, LIMITS),
        maps: first.maps.clone(),
    };
    let mut c = ClusterState::new(NODE);
    for e in list(&services) {
        c.apply_service(&e);
    }
    for e in list(&[node("10.240.0.10", "198.51.100.10")]) {
        c.apply_node(&e);
    }
    // Services and the Node are complete, the slices are not: translating now would program
    // every Service without endpoints. The source must not, and does not.
    assert!(!c.synced());
    assert_eq!(c.waiting_for(), vec!["endpointslices"]);
    let premature = translate(&c, &h.config);
    let key = spk("a", "", Protocol::Tcp);
    assert!(premature.desired.services[&key].backends.is_empty());

    c.apply_slice(&Event::Init);
    c.apply_slice(&Event::InitApply(slices[0].clone()));
    assert!(!c.synced(), "an initial list in flight is not complete");
    for e in [Event::InitApply(slices[1].clone()), Event::InitDone] {
        c.apply_slice(&e);
    }
    assert!(c.synced());
    assert_eq!(
        h.program(&c),
        Vec::<MapOp>::new(),
        "adoption rewrites nothing"
    );
    assert_eq!(h.maps, first.maps);
}

#[test]
fn node_changes_move_node_ports_and_egress() {
    let mut h = Harness::new();
    let svc = service(
        "default",
        "np",
        true,
        json!({"type": "NodePort", "clusterIP": "10.96.0.51", "clusterIPs": ["10.96.0.51"],
               "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    let mut c = cluster(
        &[svc],
        &[slice(
            "np-1",
            "np",
            json!([{"port": 80}]),
            ready(&["203.0.113.1"]),
        )],
    );
    h.program(&c);
    let key = spk("np", "", Protocol::Tcp);
    assert_eq!(
        h.frontends(&key),
        vec![
            (ip("10.96.0.51"), 80, FrontendKind::ClusterIp),
            (ip("10.240.0.10"), 30080, FrontendKind::NodePort),
            (ip("198.51.100.10"), 30080, FrontendKind::NodePort),
        ]
    );
    let id = h.id(&key).unwrap();
    assert_eq!(h.maps.services[&id].egress.to_ip(), ip("10.240.0.10"));

    c.apply_node(&Event::Apply(node("10.240.0.11", "198.51.100.10")));
    h.program(&c);
    assert_eq!(
        h.frontends(&key),
        vec![
            (ip("10.96.0.51"), 80, FrontendKind::ClusterIp),
            (ip("10.240.0.11"), 30080, FrontendKind::NodePort),
            (ip("198.51.100.10"), 30080, FrontendKind::NodePort),
        ]
    );
    assert_eq!(h.maps.services[&id].egress.to_ip(), ip("10.240.0.11"));
    assert_eq!(h.id(&key), Some(id), "the same service, updated in place");
}

#[test]
fn events_go_to_claimed_services_only_and_name_the_slice() {
    let port = json!([{"port": 80}]);
    let services = [
        cluster_ip("empty", "10.96.0.61", port.clone()),
        cluster_ip("bad-endpoint", "10.96.0.62", port.clone()),
        // Not claimed: its problems are kube-proxy's business.
        service("default", "theirs", false, json!({"ports": port})),
    ];
    let bad = json!([{"addresses": ["2.3.4.5k"]}]);
    let slices = [
        slice("bad-1", "bad-endpoint", port.clone(), bad),
        slice(
            "theirs-1",
            "theirs",
            port,
            json!([{"addresses": ["nonsense"]}]),
        ),
    ];
    let mut c = cluster(&services, &slices);
    let t = translate(&c, &config(false));
    let mut tracker = EventTracker::default();
    let events = tracker.plan(&t, &c);
    let summary: Vec<(String, &str, Option<String>)> = events
        .iter()
        .map(|e| {
            (
                e.service.to_string(),
                e.reason,
                e.slice.as_ref().map(ToString::to_string),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "default/bad-endpoint".to_owned(),
                "InvalidEndpoints",
                Some("default/bad-1".to_owned())
            ),
            ("default/empty".to_owned(), "NoEndpoints", None),
        ]
    );
    let no_endpoints = &events[1];
    assert_eq!(
        no_endpoints.note,
        "Service default/empty: no endpoints: connections will be refused"
    );

    // Resolved, then back: published again.
    c.apply_slice(&Event::Apply(slice(
        "empty-1",
        "empty",
        json!([{"port": 80}]),
        ready(&["203.0.113.1"]),
    )));
    let t = translate(&c, &config(false));
    assert!(tracker.plan(&t, &c).is_empty());
    c.apply_slice(&Event::Delete(slice(
        "empty-1",
        "empty",
        json!([{"port": 80}]),
        ready(&["203.0.113.1"]),
    )));
    let t = translate(&c, &config(false));
    let again = tracker.plan(&t, &c);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].reason, "NoEndpoints");
}

#[test]
fn bad_source_ranges_are_their_own_reason() {
    let svc = service(
        "default",
        "lb",
        true,
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.71", "clusterIPs": ["10.96.0.71"],
               "loadBalancerSourceRanges": ["1.2.3.4/32", "not-a-cidr"],
               "ports": [{"port": 80, "nodePort": 30071}]}),
    );
    let c = cluster(
        &[svc],
        &[slice(
            "lb-1",
            "lb",
            json!([{"port": 80}]),
            ready(&["203.0.113.1"]),
        )],
    );
    let t = translate(&c, &config(false));
    let events = EventTracker::default().plan(&t, &c);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason, "BadSourceRange");
    assert!(events[0].note.contains("\"not-a-cidr\" is not a CIDR"));
}

/// An endpoint at the node's address, a loopback address or another Service's cluster IP
/// cannot be refused in Kubernetes mode: it is skipped, and the Service gets an Event naming
/// the slice.
#[test]
fn unusable_endpoints_are_skipped_with_an_event() {
    let port = json!([{"port": 80}]);
    let services = [
        cluster_ip("web", "10.96.0.81", port.clone()),
        cluster_ip("other", "10.96.0.82", port.clone()),
    ];
    let slices = [slice(
        "web-1",
        "web",
        port,
        ready(&["10.240.0.10", "127.0.0.1", "10.96.0.82", "203.0.113.5"]),
    )];
    let c = cluster(&services, &slices);
    let t = translate(&c, &config(false));
    let web = &t.desired.services[&ServicePortKey {
        namespace: "default".into(),
        name: "web".into(),
        port_name: "".into(),
        protocol: Protocol::Tcp,
        family: IpFamily::V4,
    }];
    assert_eq!(
        web.backends.keys().copied().collect::<Vec<_>>(),
        [(ip("203.0.113.5"), 80)]
    );
    let events = EventTracker::default().plan(&t, &c);
    let notes: Vec<(&str, Option<String>, &str)> = events
        .iter()
        .filter(|e| e.reason != "NoEndpoints")
        .map(|e| {
            (
                e.reason,
                e.slice.as_ref().map(ToString::to_string),
                e.note.as_str(),
            )
        })
        .collect();
    let slice = Some("default/web-1".to_owned());
    assert_eq!(
        notes,
        [
            (
                "InvalidEndpoints",
                slice.clone(),
                "EndpointSlice default/web-1: endpoints[1].addresses[0]: 127.0.0.1 is a loopback address, which no endpoint can be reached at; endpoint ignored (the API server refuses it too)"
            ),
            (
                "InvalidEndpoints",
                slice.clone(),
                "EndpointSlice default/web-1: endpoints[0].addresses[0]: 10.240.0.10 is this node's own address: connections to it would come back to the node; endpoint ignored (extproxy refuses it, though the API server accepts it)"
            ),
            (
                "InvalidEndpoints",
                slice,
                "EndpointSlice default/web-1: endpoints[2].addresses[0]: 10.96.0.82 is the cluster IP of Service default/other: a virtual address, which no host answers on; endpoint ignored (extproxy refuses it, though the API server accepts it)"
            ),
        ]
    );
}

/// Two Services wanting one external IP: the one created first keeps it, whatever the names,
/// so every agent and every restart decides alike.
#[test]
fn the_service_created_first_keeps_a_contested_external_ip() {
    let aged = |name: &str, created: &str, uid: &str| {
        let mut s = service(
            "default",
            name,
            true,
            json!({"type": "ClusterIP", "clusterIP": format!("10.96.0.{}", 90 + name.len()),
                   "externalIPs": ["192.0.2.90"], "ports": [{"port": 80}]}),
        );
        s.metadata.creation_timestamp = Some(serde_json::from_value(json!(created)).unwrap());
        s.metadata.uid = Some(uid.to_owned());
        s
    };
    let services = [
        aged("aaa", "2026-03-01T10:00:00Z", "uid-1"),
        aged("zz", "2026-01-01T10:00:00Z", "uid-2"),
    ];
    let c = cluster(&services, &[]);
    let t = translate(&c, &config(false));
    let has = |name: &str| {
        let key = ServicePortKey {
            namespace: "default".into(),
            name: name.into(),
            port_name: "".into(),
            protocol: Protocol::Tcp,
            family: IpFamily::V4,
        };
        t.desired.services[&key]
            .frontends
            .keys()
            .any(|f| f.addr.to_ip() == ip("192.0.2.90"))
    };
    assert!(has("zz") && !has("aaa"));
    assert!(t.diagnostics.iter().any(|d| d.message
        == "192.0.2.90:80/TCP (ExternalIP) is already used by Service default/zz port \"\", which keeps it (it was created first); not programmed here"));
}
