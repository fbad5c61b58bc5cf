//! The incremental translator against a single pass over the same inventory, over random
//! sequences of changes built to collide: few names, shared external IPs (contested frontends),
//! tiny fill ranges (fills that probe past each other and run out).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;
use crate::diag::Origin;
use crate::translate::{ClaimPolicy, Inventory, Seniority, translate_with};

/// xorshift64*: deterministic without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NAMESPACES: [&str; 2] = ["a", "b"];
const NAMES: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];

fn service(rng: &mut Rng, name: &str) -> Value {
    let mut spec = serde_json::Map::new();
    if rng.chance(40) {
        spec.insert(
            "clusterIP".into(),
            json!(format!("10.96.0.{}", 1 + rng.below(14))),
        );
    }
    if rng.chance(20) {
        spec.insert(
            "ipFamilyPolicy".into(),
            json!(rng.pick(&["PreferDualStack", "RequireDualStack", "SingleStack"])),
        );
    }
    let type_ = *rng.pick(&["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"]);
    spec.insert("type".into(), json!(type_));
    if rng.chance(10) {
        spec.insert("selector".into(), json!({"app": name}));
    }
    let mut ports = Vec::new();
    for (i, port_name) in ["http", "dns"].iter().enumerate().take(1 + rng.below(2)) {
        let mut port = json!({"name": port_name, "port": 80 + i, "protocol": rng.pick(&["TCP", "TCP", "UDP"])});
        if type_ != "ClusterIP" && rng.chance(30) {
            port["nodePort"] = json!(30000 + rng.below(8));
        }
        ports.push(port);
    }
    spec.insert("ports".into(), json!(ports));
    if rng.chance(50) {
        let ips: Vec<String> = (0..1 + rng.below(2))
            .map(|_| {
                rng.pick(&["192.0.2.1", "192.0.2.2", "10.96.0.3", "2001:db8::7"])
                    .to_string()
            })
            .collect();
        spec.insert("externalIPs".into(), json!(ips));
    }
    let mut object =
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec});
    if type_ == "LoadBalancer" && rng.chance(50) {
        object["status"] = json!({"loadBalancer": {"ingress": [{"ip": rng.pick(&["192.0.2.1", "198.51.100.9"])}]}});
        if rng.chance(50) {
            object["spec"]["loadBalancerSourceRanges"] =
                json!([rng.pick(&["10.0.0.0/8", "bogus"])]);
        }
    }
    object
}

fn slice(rng: &mut Rng) -> Value {
    let mut labels = serde_json::Map::new();
    if rng.chance(90) {
        labels.insert(SERVICE_NAME_LABEL.into(), json!(rng.pick(&NAMES)));
    }
    let endpoints: Vec<Value> = (0..rng.below(3))
        .map(|_| {
            json!({
                // Also: an external IP, a cluster IP (explicit or filled in), a node address, a
                // loopback address.
                "addresses": [rng.pick(&["203.0.113.1", "203.0.113.2", "2001:db8::9", "nope", "192.0.2.2", "10.96.0.3", "10.240.0.11", "127.0.0.1"])],
                "conditions": {"ready": rng.chance(70), "serving": rng.chance(50), "terminating": rng.chance(30)},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"labels": labels},
        "addressType": rng.pick(&["IPv4", "IPv4", "IPv6"]),
        "ports": [{"name": rng.pick(&["http", "dns", ""]), "port": 8080, "protocol": rng.pick(&["TCP", "UDP"])}],
        "endpoints": endpoints,
    })
}

fn settings() -> Settings {
    Settings {
        egress_v4: vec!["192.0.2.100".parse().unwrap()],
        egress_v6: Vec::new(),
        cluster_egress: Default::default(),
        // Tiny ranges: fills collide, probe past each other and run out.
        service_cidrs: vec![
            "10.96.0.0/28".parse().unwrap(),
            "fd00::/125".parse().unwrap(),
        ],
        node_port_range: 30000..=30007,
        fill_missing: true,
        claim: ClaimPolicy::SelectorLess,
    }
}

fn node(n: usize) -> NodeInfo {
    NodeInfo {
        addresses: ["10.240.0.10", "10.240.0.11", "2001:db8:1::10"][..n]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect(),
    }
}

fn assert_same(step: usize, incremental: &Translation, full: &Translation) {
    assert_eq!(
        incremental.desired, full.desired,
        "desired after step {step}"
    );
    if incremental.diagnostics != full.diagnostics {
        let only = |a: &[Diagnostic], b: &[Diagnostic]| -> Vec<String> {
            a.iter()
                .filter(|d| !b.contains(d))
                .map(|d| format!("{}: {d}", d.severity))
                .collect()
        };
        panic!(
            "diagnostics after step {step}: only incremental: {:#?}; only single pass: {:#?}",
            only(&incremental.diagnostics, &full.diagnostics),
            only(&full.diagnostics, &incremental.diagnostics)
        );
    }
    assert_eq!(
        incremental.claimed, full.claimed,
        "claimed after step {step}"
    );
    assert_eq!(incremental.filled, full.filled, "filled after step {step}");
}

#[test]
fn every_update_equals_a_single_pass() {
    for seed in 1..=60u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut inventory = Inventory::default();
        let mut nodes = 2;
        let mut inc = Incremental::new(node(nodes), settings());
        let mut previous: Option<Translation> = None;
        for step in 0..120 {
            // A few changes per update, like a debounced batch.
            for _ in 0..1 + rng.below(3) {
                let namespace = *rng.pick(&NAMESPACES);
                match rng.below(10) {
                    0..=3 => {
                        let name = *rng.pick(&NAMES);
                        let key = ObjectKey::new(namespace, name);
                        let mut object = service(&mut rng, name);
                        object["metadata"]["namespace"] = json!(namespace);
                        // Ages collide too: then the file, then the name decides.
                        let since = (!rng.chance(20)).then(|| {
                            std::time::UNIX_EPOCH
                                + std::time::Duration::from_secs(rng.below(3) as u64)
                        });
                        let s: Sourced<Service> = Sourced::new(
                            serde_json::from_value::<Service>(object).unwrap(),
                            Origin::file(format!("{namespace}-{name}.yaml")),
                        )
                        .with_seniority(Seniority { since, uid: None });
                        inventory.services.insert(key.clone(), s.clone());
                        inc.set_service(key, Some(s));
                    }
                    4 => {
                        let key = ObjectKey::new(namespace, *rng.pick(&NAMES));
                        inventory.services.remove(&key);
                        inc.set_service(key, None);
                    }
                    5..=7 => {
                        let name = format!("e{}", rng.below(6));
                        let key = ObjectKey::new(namespace, &name);
                        let mut object = slice(&mut rng);
                        object["metadata"]["name"] = json!(name);
                        object["metadata"]["namespace"] = json!(namespace);
                        let s: Sourced<EndpointSlice> = Sourced::new(
                            serde_json::from_value::<EndpointSlice>(object).unwrap(),
                            Origin::file("slices.yaml"),
                        );
                        inventory.slices.insert(key.clone(), s.clone());
                        inc.set_slice(key, Some(s));
                    }
                    8 => {
                        let key = ObjectKey::new(namespace, format!("e{}", rng.below(6)));
                        inventory.slices.remove(&key);
                        inc.set_slice(key, None);
                    }
                    _ if rng.chance(20) => {
                        nodes = 1 + rng.below(3);
                        inc.reconfigure(&node(nodes), &settings());
                    }
                    _ => {}
                }
            }
            let got = inc.update().clone();
            // The frontends served before stay with their Services.
            let serving = previous
                .as_ref()
                .map(|p| p.desired.frontend_owners())
                .unwrap_or_default();
            let want = translate_with(&inventory, &node(nodes), &settings(), serving);
            assert_same(step, &got, &want);
            // Whatever differs from the previous translation is named as changed.
            if let (Some(prev), Some(changes)) = (&previous, &got.changes) {
                let keys: BTreeSet<&ServicePortKey> = prev
                    .desired
                    .services
                    .keys()
                    .chain(got.desired.services.keys())
                    .collect();
                for key in keys {
                    if prev.desired.services.get(key) != got.desired.services.get(key) {
                        assert!(
                            changes.services.contains(key),
                            "{key} changed unannounced (seed {seed}, step {step})"
                        );
                    }
                }
                assert!(changes.diagnostics || prev.diagnostics == got.diagnostics);
                assert!(
                    changes.claims || (prev.claimed == got.claimed && prev.filled == got.filled)
                );
            }
            previous = Some(got);
        }
    }
}

#[test]
fn an_unrelated_change_translates_one_service() {
    let mut inc = Incremental::new(node(1), settings());
    let mut objects = BTreeMap::new();
    for i in 0..50 {
        let name = format!("s{i}");
        let object = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "a"}, "spec": {"ports": [{"port": 80}]}});
        objects.insert(name.clone(), object.clone());
        inc.set_service(
            ObjectKey::new("a", &name),
            Some(Sourced::new(
                serde_json::from_value::<Service>(object).unwrap(),
                Origin::Cluster,
            )),
        );
    }
    assert_eq!(inc.update().changes, None, "the first update is a full one");
    let mut object = objects["s7"].clone();
    object["spec"]["externalIPs"] = json!(["192.0.2.9"]);
    inc.set_service(
        ObjectKey::new("a", "s7"),
        Some(Sourced::new(
            serde_json::from_value::<Service>(object).unwrap(),
            Origin::Cluster,
        )),
    );
    let changes = inc.update().changes.clone().unwrap();
    assert_eq!(
        changes
            .services
            .iter()
            .map(|k| &*k.name)
            .collect::<Vec<_>>(),
        ["s7"]
    );
    assert!(!changes.diagnostics && !changes.claims);
    // Nothing changed: nothing to do.
    let changes = inc.update().changes.clone().unwrap();
    assert_eq!(changes, Changes::default());
}
