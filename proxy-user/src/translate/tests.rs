use std::path::Path;

use proxy_common::user::port_host;

use super::*;
use crate::manifest::ManifestSet;

const SEED_000_SERVICE: &str = include_str!("../../tests/fixtures/seeds/000-proxy-service.yaml");
const SEED_000_SLICE: &str = include_str!("../../tests/fixtures/seeds/000-endpointslice.yaml");
const SEED_001: &str = include_str!("../../tests/fixtures/seeds/001-myapp-proxy.yaml");
const OBJECTS: &str = include_str!("../../tests/fixtures/objects.yaml");
const LIST_SERVICES: &str = include_str!("../../tests/fixtures/k8s-api/list-services.json");
const LIST_SLICES: &str = include_str!("../../tests/fixtures/k8s-api/list-endpointslices.json");

fn inventory(files: &[(&str, &str)]) -> Inventory {
    let mut set = ManifestSet::default();
    for (path, text) in files {
        set.update_file_text(Path::new(path), text);
    }
    set.inventory().0
}

fn manifest_settings() -> Settings {
    Settings {
        egress_v4: vec!["192.0.2.100".parse().unwrap()],
        egress_v6: vec!["2001:db8::100".parse().unwrap()],
        service_cidrs: vec![
            "10.96.0.0/16".parse().unwrap(),
            "fd00:96::/112".parse().unwrap(),
        ],
        fill_missing: true,
        ..Settings::default()
    }
}

fn node() -> NodeInfo {
    NodeInfo {
        addresses: vec![
            "10.240.0.10".parse().unwrap(),
            "198.51.100.10".parse().unwrap(),
            "2001:db8:1::10".parse().unwrap(),
        ],
    }
}

fn run(yaml: &str) -> Translation {
    run_with(yaml, &manifest_settings())
}

fn run_with(yaml: &str, settings: &Settings) -> Translation {
    translate(&inventory(&[("m.yaml", yaml)]), &node(), settings)
}

/// The Service ports the translation programs, in order.
fn service_keys(t: &Translation) -> Vec<ServicePortKey> {
    t.desired.services.keys().cloned().collect()
}

fn spk(
    namespace: &str,
    name: &str,
    port_name: &str,
    protocol: Protocol,
    family: IpFamily,
) -> ServicePortKey {
    ServicePortKey {
        namespace: namespace.into(),
        name: name.into(),
        port_name: port_name.into(),
        protocol,
        family,
    }
}

fn v4(namespace: &str, name: &str, port_name: &str) -> ServicePortKey {
    spk(namespace, name, port_name, Protocol::Tcp, IpFamily::V4)
}

/// Frontends as readable (address:port, kind, flags) triples.
fn frontends(service: &DesiredService) -> Vec<(String, &'static str, u8)> {
    let mut list: Vec<(String, &'static str, u8)> = service
        .frontends
        .iter()
        .map(|(k, v)| {
            let ip = k.addr.to_ip();
            let addr = if ip.is_ipv4() {
                format!("{ip}:{}", port_host(k.port))
            } else {
                format!("[{ip}]:{}", port_host(k.port))
            };
            (addr, v.kind.name(), v.flags)
        })
        .collect();
    list.sort();
    list
}

fn backends(service: &DesiredService) -> Vec<(String, BackendRole)> {
    service
        .backends
        .iter()
        .map(|((ip, port), role)| (format!("{ip}:{port}"), *role))
        .collect()
}

fn messages(t: &Translation) -> Vec<String> {
    t.diagnostics
        .iter()
        .map(|d| format!("{}: {}", d.severity, d))
        .collect()
}

fn service_yaml(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{spec}\n")
}

fn slice_yaml(
    name: &str,
    service: &str,
    address_type: &str,
    ports: &str,
    endpoints: &str,
) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: {address_type}\nports: {ports}\nendpoints: {endpoints}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Seeds and fixtures
// ---------------------------------------------------------------------------------------------

#[test]
fn seed_000_named_service_port_gets_no_endpoints_and_says_how_to_fix_it() {
    let inv = inventory(&[
        ("m/000-endpointslice.yaml", SEED_000_SLICE),
        ("m/000-proxy-service.yaml", SEED_000_SERVICE),
    ]);
    let t = translate(&inv, &node(), &manifest_settings());
    assert_eq!(
        messages(&t),
        [
            "error: m/000-proxy-service.yaml:1: Service proxy-test/proxy-service: spec.ports[0].name: port \"http\" matches no endpoint port (the endpoints have ports: \"\" (80/TCP)); kube-proxy matches by name: name the endpoint port \"http\" or remove the name from the Service port; until then this port has no endpoints and refuses connections"
        ]
    );
    let service = &t.desired.services[&v4("proxy-test", "proxy-service", "http")];
    assert!(service.backends.is_empty());
    let cluster_ip = service.cluster_ip.expect("filled cluster IP");
    assert_eq!(
        frontends(service),
        [(format!("{cluster_ip}:80"), "ClusterIP", 0)]
    );
    assert_eq!(
        t.filled,
        [Filled {
            service: ObjectKey::new("proxy-test", "proxy-service"),
            field: "spec.clusterIPs[IPv4]".into(),
            value: cluster_ip.to_string(),
        }]
    );
    assert_eq!(t.desired.services.len(), 1);

    // The fix the message suggests works: an unnamed Service port matches the unnamed endpoints,
    // and the Endpoints and the slice for the same address merge into one backend.
    let fixed = SEED_000_SERVICE.replace("      name: http\n", "");
    let t = translate(
        &inventory(&[("a.yaml", SEED_000_SLICE), ("b.yaml", &fixed)]),
        &node(),
        &manifest_settings(),
    );
    assert_eq!(messages(&t), Vec::<String>::new());
    let service = &t.desired.services[&v4("proxy-test", "proxy-service", "")];
    assert_eq!(
        backends(service),
        [("10.240.0.129:80".to_owned(), BackendRole::Active)]
    );
}

#[test]
fn seed_001_load_balancer_without_valid_endpoints() {
    let t = translate(
        &inventory(&[("m/001.yaml", SEED_001)]),
        &node(),
        &manifest_settings(),
    );
    assert_eq!(
        messages(&t),
        [
            "warning: m/001.yaml:13: Service default/myapp-proxy: no endpoints: connections will be refused"
        ]
    );
    let service = &t.desired.services[&v4("default", "myapp-proxy", "")];
    let cluster_ip = service.cluster_ip.expect("cluster IP");
    let node_port = service.node_port.expect("node port");
    assert!((30000..=32767).contains(&node_port));
    // No load balancer status in a manifest and no loadBalancerIP: ClusterIP and NodePorts only.
    assert_eq!(
        frontends(service),
        [
            (format!("10.240.0.10:{node_port}"), "NodePort", 0),
            (format!("{cluster_ip}:80"), "ClusterIP", 0),
            (format!("198.51.100.10:{node_port}"), "NodePort", 0),
        ]
    );
    assert_eq!(
        service.source_ranges,
        ["1.2.3.4/32".parse::<IpNet>().unwrap()]
    );
    assert!(service.backends.is_empty());
}

#[test]
fn objects_fixture_in_manifest_mode() {
    let t = translate(
        &inventory(&[("objects.yaml", OBJECTS)]),
        &node(),
        &manifest_settings(),
    );
    assert_eq!(
        t.claimed,
        [
            Claimed {
                service: ObjectKey::new("default", "myapp-proxy"),
                reason: ClaimReason::SelectorLess
            },
            Claimed {
                service: ObjectKey::new("proxy-test", "proxy-service"),
                reason: ClaimReason::SelectorLess
            },
            Claimed {
                service: ObjectKey::new("shop", "legacy-db"),
                reason: ClaimReason::SelectorLess
            },
        ]
    );
    assert_eq!(
        messages(&t),
        [
            "info: objects.yaml:54: Service default/httpbin-service: spec.type: type ExternalName: nothing to proxy (DNS CNAME)",
            "info: objects.yaml:107: Service shop/web: spec.selector: has a selector: belongs to kube-proxy",
        ]
    );
    assert_eq!(
        service_keys(&t),
        [
            v4("default", "myapp-proxy", ""),
            v4("proxy-test", "proxy-service", "http"),
            spk("shop", "legacy-db", "metrics", Protocol::Udp, IpFamily::V4),
            v4("shop", "legacy-db", "pg"),
        ]
    );
    let proxy = &t.desired.services[&v4("proxy-test", "proxy-service", "http")];
    assert_eq!(
        backends(proxy),
        [
            ("10.240.0.129:80".to_owned(), BackendRole::Active),
            ("10.240.0.130:80".to_owned(), BackendRole::Draining),
            ("10.240.0.131:80".to_owned(), BackendRole::Active),
        ]
    );
    let myapp = &t.desired.services[&v4("default", "myapp-proxy", "")];
    assert_eq!(myapp.affinity_timeout, 600);
    assert_eq!(
        backends(myapp),
        [("2.3.4.5:8080".to_owned(), BackendRole::Active)]
    );
    let pg = &t.desired.services[&v4("shop", "legacy-db", "pg")];
    assert_eq!(
        backends(pg),
        [("203.0.113.7:15432".to_owned(), BackendRole::Active)]
    );
    assert!(frontends(pg).contains(&("192.0.2.10:5432".to_owned(), "ExternalIP", 0)));
    let metrics =
        &t.desired.services[&spk("shop", "legacy-db", "metrics", Protocol::Udp, IpFamily::V4)];
    assert_eq!(
        backends(metrics),
        [("203.0.113.7:9187".to_owned(), BackendRole::Active)]
    );
    assert_eq!(
        metrics.frontends.keys().next().map(|k| k.proto),
        Some(PROTO_UDP)
    );
    assert_eq!(metrics.egress, Some("192.0.2.100".parse().unwrap()));
}

#[test]
fn api_server_lists_in_kube_mode() {
    let inv = inventory(&[
        ("services.json", LIST_SERVICES),
        ("slices.json", LIST_SLICES),
    ]);
    let settings = Settings {
        fill_missing: false,
        claim: ClaimPolicy::Label {
            claim_all_selectorless: false,
        },
        ..manifest_settings()
    };
    let node = NodeInfo {
        addresses: vec![
            "10.240.0.10".parse().unwrap(),
            "198.51.100.10".parse().unwrap(),
        ],
    };
    let t = translate(&inv, &node, &settings);
    assert!(t.filled.is_empty());
    assert_eq!(
        t.claimed
            .iter()
            .map(|c| (c.service.to_string(), c.reason))
            .collect::<Vec<_>>(),
        [
            ("default/myapp-proxy".to_owned(), ClaimReason::Label),
            ("proxy-test/proxy-service".to_owned(), ClaimReason::Label),
        ]
    );
    let myapp = &t.desired.services[&v4("default", "myapp-proxy", "")];
    assert_eq!(
        frontends(myapp),
        [
            ("10.240.0.10:32518".to_owned(), "NodePort", 0),
            ("10.96.12.14:80".to_owned(), "ClusterIP", 0),
            ("198.51.100.10:32518".to_owned(), "NodePort", 0),
            (
                "20.50.60.70:80".to_owned(),
                "LoadBalancer",
                FE_F_SOURCE_RANGES
            ),
        ]
    );
    assert_eq!(
        backends(myapp),
        [("2.3.4.5:8080".to_owned(), BackendRole::Active)]
    );
    assert_eq!(myapp.affinity_timeout, 600);
    let proxy = &t.desired.services[&v4("proxy-test", "proxy-service", "http")];
    assert_eq!(
        frontends(proxy),
        [("10.96.85.182:80".to_owned(), "ClusterIP", 0)]
    );
    assert_eq!(t.desired.services.len(), 2);
    // legacy-db is selector-less but not labelled: with the flag it is claimed too.
    let settings = Settings {
        claim: ClaimPolicy::Label {
            claim_all_selectorless: true,
        },
        ..settings
    };
    let t = translate(&inv, &node, &settings);
    assert_eq!(t.claimed.len(), 4, "{:?}", t.claimed);
    assert!(
        t.claimed
            .iter()
            .any(|c| c.service.to_string() == "default/kubernetes")
    );
    assert!(
        t.claimed
            .iter()
            .any(|c| c.service.to_string() == "shop/legacy-db")
    );
}

// ---------------------------------------------------------------------------------------------
// Claims
// ---------------------------------------------------------------------------------------------

#[test]
fn services_not_claimed_say_why() {
    let yaml = [
        service_yaml("selected", "  selector: {app: x}\n  ports: [{port: 80}]"),
        service_yaml("empty-selector", "  selector: {}\n  ports: [{port: 80}]"),
        service_yaml("cname", "  type: ExternalName\n  externalName: example.com"),
        service_yaml("headless", "  clusterIP: None\n  ports: [{port: 80}]"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: other\n  labels: {service.kubernetes.io/service-proxy-name: cilium}\nspec: {ports: [{port: 80}]}\n".to_owned(),
    ]
    .join("---\n");
    let inv = inventory(&[("m.yaml", &yaml)]);
    let t = translate(&inv, &node(), &manifest_settings());
    assert_eq!(
        messages(&t),
        [
            "info: m.yaml:15: Service default/cname: spec.type: type ExternalName: nothing to proxy (DNS CNAME)",
            "warning: m.yaml:8: Service default/empty-selector: no endpoints: connections will be refused",
            "info: m.yaml:22: Service default/headless: spec.clusterIP: headless (clusterIP: None): no virtual IP to proxy",
            "warning: m.yaml:29: Service default/other: no endpoints: connections will be refused",
            "info: m.yaml:1: Service default/selected: spec.selector: has a selector: belongs to kube-proxy",
        ]
    );
    // Manifest mode claims by selector only; the label names another proxy in kube mode.
    assert_eq!(
        t.claimed
            .iter()
            .map(|c| &*c.service.name)
            .collect::<Vec<_>>(),
        ["empty-selector", "other"]
    );
    let kube = Settings {
        claim: ClaimPolicy::Label {
            claim_all_selectorless: true,
        },
        ..manifest_settings()
    };
    let t = translate(&inv, &node(), &kube);
    assert!(
        messages(&t).contains(&"info: m.yaml:29: Service default/other: metadata.labels[service.kubernetes.io/service-proxy-name]: service-proxy-name is \"cilium\", not extproxy: left to that proxy".to_owned()),
        "{:#?}",
        messages(&t)
    );
    assert_eq!(
        t.claimed
            .iter()
            .map(|c| &*c.service.name)
            .collect::<Vec<_>>(),
        ["empty-selector"]
    );
}

// ---------------------------------------------------------------------------------------------
// Frontends
// ---------------------------------------------------------------------------------------------

#[test]
fn every_frontend_kind_in_both_families() {
    let yaml = service_yaml(
        "lb",
        "  type: LoadBalancer
  clusterIPs: [10.96.0.50, 'fd00:96::50']
  ipFamilyPolicy: RequireDualStack
  externalIPs: [192.0.2.10, '2001:db8:e::1', bogus]
  ports: [{name: web, port: 80, nodePort: 30080}]",
    ) + "status:
  loadBalancer:
    ingress:
    - {ip: 20.0.0.1}
    - {ip: 20.0.0.2, ipMode: Proxy}
    - {hostname: lb.example.com}
    - {ip: '2001:db8:1b::1', ipMode: VIP}
";
    let t = run(&yaml);
    assert_eq!(
        messages(&t),
        [
            "info: m.yaml:1: Service default/lb: status.loadBalancer.ingress[1].ipMode: ipMode Proxy: traffic to 20.0.0.2 must go through the real load balancer (kubernetes#97928), so it is not captured",
            "info: m.yaml:1: Service default/lb: status.loadBalancer.ingress[2].hostname: load balancer \"lb.example.com\" has no IP: traffic reaches it outside extproxy; skipped",
            "error: m.yaml:1: Service default/lb: spec.externalIPs[2]: \"bogus\" is not an IP address; ignored",
            "warning: m.yaml:1: Service default/lb: no endpoints: connections will be refused",
        ]
    );
    assert!(t.filled.is_empty());
    let v4_service = &t.desired.services[&v4("default", "lb", "web")];
    assert_eq!(
        frontends(v4_service),
        [
            ("10.240.0.10:30080".to_owned(), "NodePort", 0),
            ("10.96.0.50:80".to_owned(), "ClusterIP", 0),
            ("192.0.2.10:80".to_owned(), "ExternalIP", 0),
            ("198.51.100.10:30080".to_owned(), "NodePort", 0),
            ("20.0.0.1:80".to_owned(), "LoadBalancer", 0),
        ]
    );
    assert_eq!(v4_service.cluster_ip, Some("10.96.0.50".parse().unwrap()));
    assert_eq!(v4_service.egress, Some("192.0.2.100".parse().unwrap()));
    let v6_service = &t.desired.services[&spk("default", "lb", "web", Protocol::Tcp, IpFamily::V6)];
    assert_eq!(
        frontends(v6_service),
        [
            ("[2001:db8:1::10]:30080".to_owned(), "NodePort", 0),
            ("[2001:db8:1b::1]:80".to_owned(), "LoadBalancer", 0),
            ("[2001:db8:e::1]:80".to_owned(), "ExternalIP", 0),
            ("[fd00:96::50]:80".to_owned(), "ClusterIP", 0),
        ]
    );
    assert_eq!(v6_service.egress, Some("2001:db8::100".parse().unwrap()));
}

#[test]
fn node_ports_follow_the_type() {
    let cases = [
        ("ClusterIP", "", None),
        ("NodePort", "", Some(31000)),
        ("LoadBalancer", "", Some(31000)),
        (
            "LoadBalancer",
            "  allocateLoadBalancerNodePorts: false\n",
            None,
        ),
    ];
    for (type_, extra, expected) in cases {
        let spec =
            format!("  type: {type_}\n  clusterIP: 10.96.0.9\n{extra}  ports: [{{port: 80}}]");
        let t = run(&service_yaml("s", &spec));
        let service = &t.desired.services[&v4("default", "s", "")];
        assert_eq!(
            service.node_port.is_some(),
            expected.is_some(),
            "{type_} {extra}"
        );
        let node_ports = frontends(service)
            .into_iter()
            .filter(|f| f.1 == "NodePort")
            .count();
        assert_eq!(
            node_ports,
            if expected.is_some() { 2 } else { 0 },
            "{type_} {extra}"
        );
    }
}

#[test]
fn lb_ip_fallback_and_single_stack_filters_other_family_addresses() {
    let t = run(&service_yaml(
        "s",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.9\n  loadBalancerIP: 203.0.113.9\n  externalIPs: ['2001:db8::9']\n  allocateLoadBalancerNodePorts: false\n  ports: [{port: 443}]",
    ));
    assert_eq!(
        messages(&t),
        [
            "info: m.yaml:1: Service default/s: spec.loadBalancerIP: no load balancer status: serving spec.loadBalancerIP 203.0.113.9",
            "warning: m.yaml:1: Service default/s: spec.externalIPs[0]: 2001:db8::9 is IPv6 but the Service is not (spec.ipFamilies): ignored, like kube-proxy does",
            "warning: m.yaml:1: Service default/s: no endpoints: connections will be refused",
        ]
    );
    assert_eq!(
        frontends(&t.desired.services[&v4("default", "s", "")]),
        [
            ("10.96.0.9:443".to_owned(), "ClusterIP", 0),
            ("203.0.113.9:443".to_owned(), "LoadBalancer", 0),
        ]
    );
    assert_eq!(t.desired.services.len(), 1);
}

#[test]
fn duplicate_frontends_go_to_the_first_service_by_namespace_and_name() {
    let yaml = [
        service_yaml("b", "  clusterIP: 10.96.0.2\n  externalIPs: [192.0.2.1]\n  type: NodePort\n  ports: [{port: 80, nodePort: 30001}]"),
        service_yaml("a", "  clusterIP: 10.96.0.1\n  externalIPs: [192.0.2.1]\n  type: NodePort\n  ports: [{port: 80, nodePort: 30001}]"),
        // Same address, other protocol: no conflict.
        service_yaml("c", "  clusterIP: 10.96.0.3\n  externalIPs: [192.0.2.1]\n  ports: [{port: 80, protocol: UDP}]"),
    ]
    .join("---\n");
    let t = run(&yaml);
    let errors: Vec<String> = messages(&t)
        .into_iter()
        .filter(|m| m.starts_with("error"))
        .collect();
    assert_eq!(
        errors,
        [
            "error: m.yaml:1: Service default/b: spec.ports[0].nodePort: 10.240.0.10:30001/TCP (NodePort) is already used by Service default/a port \"\", which keeps it (first by namespace/name); not programmed here",
            "error: m.yaml:1: Service default/b: spec.externalIPs[0]: 192.0.2.1:80/TCP (ExternalIP) is already used by Service default/a port \"\", which keeps it (first by namespace/name); not programmed here",
        ]
    );
    assert_eq!(
        frontends(&t.desired.services[&v4("default", "b", "")]),
        [("10.96.0.2:80".to_owned(), "ClusterIP", 0)]
    );
    assert_eq!(
        frontends(&t.desired.services[&v4("default", "a", "")]).len(),
        4
    );
    let c = &t.desired.services[&spk("default", "c", "", Protocol::Udp, IpFamily::V4)];
    assert!(frontends(c).contains(&("192.0.2.1:80".to_owned(), "ExternalIP", 0)));
}

#[test]
fn port_problems() {
    let t = run(&service_yaml(
        "s",
        "  clusterIP: 10.96.0.9\n  ports:\n  - {name: a, port: 80, protocol: SCTP}\n  - {name: b, port: 70000}\n  - {name: c, port: 81, protocol: QUIC}\n  - {port: 82}\n  - {port: 83}\n  - {name: d, port: 84, protocol: UDP}",
    ));
    assert_eq!(
        messages(&t),
        [
            "warning: m.yaml:1: Service default/s: spec.ports[0].protocol: SCTP is not proxied by extproxy; port skipped",
            "error: m.yaml:1: Service default/s: spec.ports[1].port: port 70000 is out of range 1-65535; port skipped",
            "error: m.yaml:1: Service default/s: spec.ports[2].protocol: unknown protocol \"QUIC\": use TCP or UDP; port skipped",
            "error: m.yaml:1: Service default/s: spec.ports[4].name: port name \"\" (TCP) is also used by spec.ports[3]: when a Service has several ports each needs a unique name (endpoints are matched by name); port skipped",
            "warning: m.yaml:1: Service default/s: no endpoints: connections will be refused",
        ]
    );
    assert_eq!(
        service_keys(&t),
        [
            v4("default", "s", ""),
            spk("default", "s", "d", Protocol::Udp, IpFamily::V4)
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn ports_match_by_name_and_protocol() {
    let yaml = [
        service_yaml("dns", "  clusterIP: 10.96.0.10\n  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]"),
        slice_yaml("dns-1", "dns", "IPv4", "[{name: dns, port: 5353, protocol: TCP}, {name: dns-tcp, port: 5354}]", "[{addresses: [10.1.0.1]}]"),
        service_yaml("web", "  clusterIP: 10.96.0.11\n  ports: [{port: 80}]"),
        slice_yaml("web-1", "web", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.1.0.2]}]"),
    ]
    .join("---\n");
    let t = run(&yaml);
    assert_eq!(
        messages(&t),
        [
            "error: m.yaml:1: Service default/dns: spec.ports[0].name: port \"dns\" (UDP) matches no endpoint port (the endpoints have ports: \"dns\" (5353/TCP), \"dns-tcp\" (5354/TCP)); kube-proxy matches by name and protocol: give the endpoint port \"dns\" protocol UDP; until then this port has no endpoints and refuses connections",
            "error: m.yaml:17: Service default/web: spec.ports[0].name: port 80 has no name and matches no endpoint port (the endpoints have ports: \"http\" (8080/TCP)); kube-proxy matches by name: name this Service port \"http\" or remove the name from the endpoint port; until then this port has no endpoints and refuses connections",
        ]
    );
    let dns_tcp = &t.desired.services[&v4("default", "dns", "dns-tcp")];
    assert_eq!(
        backends(dns_tcp),
        [("10.1.0.1:5354".to_owned(), BackendRole::Active)]
    );
    let dns_udp = &t.desired.services[&spk("default", "dns", "dns", Protocol::Udp, IpFamily::V4)];
    assert!(dns_udp.backends.is_empty());
}

#[test]
fn endpoint_conditions_decide_roles() {
    // (conditions, role when another endpoint is ready, role when none is)
    let cases = [
        ("{}", BackendRole::Active, BackendRole::Active),
        ("{ready: true}", BackendRole::Active, BackendRole::Active),
        (
            "{ready: false}",
            BackendRole::Draining,
            BackendRole::Draining,
        ),
        (
            "{ready: false, serving: true, terminating: true}",
            BackendRole::Draining,
            BackendRole::Active,
        ),
        (
            "{ready: false, serving: false, terminating: true}",
            BackendRole::Draining,
            BackendRole::Draining,
        ),
        (
            "{ready: false, serving: true}",
            BackendRole::Draining,
            BackendRole::Draining,
        ),
        (
            "{ready: false, terminating: true}",
            BackendRole::Draining,
            BackendRole::Draining,
        ),
    ];
    for (conditions, with_ready, alone) in cases {
        for (other, expected) in [
            (
                Some("{addresses: [10.1.0.9], conditions: {ready: true}}"),
                with_ready,
            ),
            (None, alone),
        ] {
            let endpoints = match other {
                Some(other) => {
                    format!("[{{addresses: [10.1.0.1], conditions: {conditions}}}, {other}]")
                }
                None => format!("[{{addresses: [10.1.0.1], conditions: {conditions}}}]"),
            };
            let yaml = [
                service_yaml("s", "  clusterIP: 10.96.0.9\n  ports: [{port: 80}]"),
                slice_yaml("s-1", "s", "IPv4", "[{port: 80}]", &endpoints),
            ]
            .join("---\n");
            let t = run(&yaml);
            let service = &t.desired.services[&v4("default", "s", "")];
            let ip: IpAddr = "10.1.0.1".parse().unwrap();
            assert_eq!(
                service.backends[&(ip, 80)],
                expected,
                "{conditions} other ready: {}",
                other.is_some()
            );
        }
    }
}

#[test]
fn slices_merge_and_ready_wins() {
    let yaml = [
        service_yaml("s", "  clusterIPs: [10.96.0.9, 'fd00:96::9']\n  ipFamilyPolicy: RequireDualStack\n  ports: [{name: p, port: 80}]"),
        slice_yaml("s-a", "s", "IPv4", "[{name: p, port: 80}]", "[{addresses: [10.1.0.1], conditions: {ready: false}}, {addresses: [10.1.0.2]}]"),
        slice_yaml("s-b", "s", "IPv4", "[{name: p, port: 80}]", "[{addresses: [10.1.0.1]}, {addresses: ['fd00::1']}, {addresses: [not-an-ip]}]"),
        slice_yaml("s-c", "s", "IPv6", "[{name: p, port: 80}, {name: p, port: 0}]", "[{addresses: ['fd00::2']}]"),
        // Names nothing resolved (no answers in this translation's input): no endpoints.
        slice_yaml("s-d", "s", "FQDN", "[{name: p, port: 80}]", "[{addresses: [db.example.com]}]"),
        slice_yaml("s-e", "s", "IPv4", "[{name: p, port: 80}]", "[{addresses: [10.1.0.3]}]")
            .replace("  labels: {kubernetes.io/service-name: s}\n", ""),
        slice_yaml("s-f", "gone", "IPv4", "[{name: p, port: 80}]", "[{addresses: [10.1.0.4]}]"),
    ]
    .join("---\n");
    let t = run(&yaml);
    assert_eq!(
        messages(&t),
        [
            "error: m.yaml:18: EndpointSlice default/s-b: endpoints[1].addresses[0]: fd00::1 is IPv6 but the slice's addressType is IPv4; endpoint ignored",
            "error: m.yaml:18: EndpointSlice default/s-b: endpoints[2].addresses[0]: \"not-an-ip\" is not an IP address; endpoint ignored",
            "error: m.yaml:27: EndpointSlice default/s-c: ports[1].port: port 0 is out of range 1-65535; port ignored",
            "info: m.yaml:45: EndpointSlice default/s-e: metadata.labels: no kubernetes.io/service-name label: these endpoints belong to no Service",
            "info: m.yaml:53: EndpointSlice default/s-f: metadata.labels[kubernetes.io/service-name]: there is no Service default/gone: these endpoints are not used",
        ]
    );
    assert_eq!(
        backends(&t.desired.services[&v4("default", "s", "p")]),
        [
            ("10.1.0.1:80".to_owned(), BackendRole::Active),
            ("10.1.0.2:80".to_owned(), BackendRole::Active),
        ]
    );
    assert_eq!(
        backends(&t.desired.services[&spk("default", "s", "p", Protocol::Tcp, IpFamily::V6)]),
        [("fd00::2:80".to_owned(), BackendRole::Active)]
    );
}

// ---------------------------------------------------------------------------------------------
// Per-Service settings
// ---------------------------------------------------------------------------------------------

#[test]
fn session_affinity() {
    let cases = [
        ("", 0, None),
        ("  sessionAffinity: None\n", 0, None),
        ("  sessionAffinity: ClientIP\n", 10_800, None),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
            60,
            None,
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}\n",
            86_400,
            None,
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
            10_800,
            Some(
                "error: m.yaml:1: Service default/s: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is out of range 1-86400; using the default 10800",
            ),
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n",
            10_800,
            Some(
                "error: m.yaml:1: Service default/s: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is out of range 1-86400; using the default 10800",
            ),
        ),
        (
            "  sessionAffinity: Cookie\n",
            0,
            Some(
                "error: m.yaml:1: Service default/s: spec.sessionAffinity: unknown sessionAffinity \"Cookie\": use None or ClientIP; no affinity",
            ),
        ),
    ];
    for (spec, timeout, error) in cases {
        let t = run(&service_yaml(
            "s",
            &format!("{spec}  clusterIP: 10.96.0.9\n  ports: [{{port: 80}}]"),
        ));
        assert_eq!(
            t.desired.services[&v4("default", "s", "")].affinity_timeout,
            timeout,
            "{spec}"
        );
        let errors: Vec<String> = messages(&t)
            .into_iter()
            .filter(|m| m.starts_with("error"))
            .collect();
        assert_eq!(
            errors,
            error.into_iter().map(str::to_owned).collect::<Vec<_>>(),
            "{spec}"
        );
    }
}

#[test]
fn source_ranges_fail_closed() {
    struct Case {
        ranges: &'static str,
        v4: &'static [&'static str],
        v6: &'static [&'static str],
        diagnostics: &'static [&'static str],
    }
    let cases = [
        Case {
            ranges: "[1.2.3.4/32, ' 10.0.0.0/8 ']",
            v4: &["1.2.3.4/32", "10.0.0.0/8"],
            v6: &[],
            diagnostics: &[
                "warning: m.yaml:1: Service default/s: spec.loadBalancerSourceRanges: no IPv6 range: IPv6 load balancer traffic is denied",
            ],
        },
        Case {
            ranges: "[1.2.3.77/24, '2001:db8::1']",
            v4: &["1.2.3.0/24"],
            v6: &["2001:db8::1/128"],
            diagnostics: &[
                "warning: m.yaml:1: Service default/s: spec.loadBalancerSourceRanges[0]: 1.2.3.77/24 has host bits set; using 1.2.3.0/24",
            ],
        },
        Case {
            ranges: "[1.2.3.4/33, nonsense]",
            v4: &[],
            v6: &[],
            diagnostics: &[
                "error: m.yaml:1: Service default/s: spec.loadBalancerSourceRanges[0]: \"1.2.3.4/33\" is not a CIDR (like 1.2.3.0/24); left out, which admits fewer clients",
                "error: m.yaml:1: Service default/s: spec.loadBalancerSourceRanges[1]: \"nonsense\" is not a CIDR (like 1.2.3.0/24); left out, which admits fewer clients",
                "error: m.yaml:1: Service default/s: spec.loadBalancerSourceRanges: no valid range: all IPv4 load balancer traffic is denied (fail closed)",
                "error: m.yaml:1: Service default/s: spec.loadBalancerSourceRanges: no valid range: all IPv6 load balancer traffic is denied (fail closed)",
            ],
        },
    ];
    for case in cases {
        let spec = format!(
            "  type: LoadBalancer\n  allocateLoadBalancerNodePorts: false\n  clusterIPs: [10.96.0.9, 'fd00:96::9']\n  ipFamilyPolicy: RequireDualStack\n  loadBalancerSourceRanges: {}\n  ports: [{{port: 80}}]",
            case.ranges
        );
        let yaml = service_yaml("s", &spec)
            + "status: {loadBalancer: {ingress: [{ip: 20.0.0.1}, {ip: '2001:db8:1b::1'}]}}\n";
        let t = run(&yaml);
        let got: Vec<String> = messages(&t)
            .into_iter()
            .filter(|m| !m.contains("no endpoints"))
            .collect();
        assert_eq!(got, case.diagnostics, "{}", case.ranges);
        for (family, expected) in [(IpFamily::V4, case.v4), (IpFamily::V6, case.v6)] {
            let service = &t.desired.services[&spk("default", "s", "", Protocol::Tcp, family)];
            let ranges: Vec<String> = service
                .source_ranges
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(ranges, expected, "{} {family:?}", case.ranges);
            // The LB frontend always consults the ranges; the ClusterIP never does.
            let mut flags: Vec<(&str, u8)> =
                frontends(service).into_iter().map(|f| (f.1, f.2)).collect();
            flags.sort();
            assert_eq!(
                flags,
                [("ClusterIP", 0), ("LoadBalancer", FE_F_SOURCE_RANGES)],
                "{}",
                case.ranges
            );
        }
    }
}

#[test]
fn legacy_source_range_annotation_is_honoured() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  annotations: {service.beta.kubernetes.io/load-balancer-source-ranges: '5.6.7.0/24,8.8.8.8/32'}\nspec:\n  type: LoadBalancer\n  loadBalancerIP: 20.0.0.1\n  clusterIP: 10.96.0.9\n  ports: [{port: 80, nodePort: 30000}]\n";
    let t = run(yaml);
    let service = &t.desired.services[&v4("default", "s", "")];
    assert_eq!(
        service.source_ranges,
        [
            "5.6.7.0/24".parse::<IpNet>().unwrap(),
            "8.8.8.8/32".parse().unwrap()
        ]
    );
    assert!(frontends(service).contains(&(
        "20.0.0.1:80".to_owned(),
        "LoadBalancer",
        FE_F_SOURCE_RANGES
    )));
}

#[test]
fn egress_comes_from_settings_or_the_annotation() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  annotations: {extproxy.io/egress-ip: '192.0.2.7, 2001:db8::7, x'}\nspec:\n  clusterIPs: [10.96.0.9, 'fd00:96::9']\n  ipFamilyPolicy: RequireDualStack\n  ports: [{port: 80}]\n";
    let t = run(yaml);
    assert_eq!(
        messages(&t),
        [
            "error: m.yaml:1: Service default/s: metadata.annotations[extproxy.io/egress-ip]: \"x\" is not an IP address; ignored",
            "warning: m.yaml:1: Service default/s: no endpoints: connections will be refused",
        ]
    );
    let v4_port = &t.desired.services[&v4("default", "s", "")];
    assert_eq!(v4_port.egress, Some("192.0.2.7".parse().unwrap()));
    assert!(v4_port.extra_egress.is_empty(), "one address, no pool");
    assert_eq!(
        t.desired.services[&spk("default", "s", "", Protocol::Tcp, IpFamily::V6)].egress,
        Some("2001:db8::7".parse().unwrap())
    );
}

/// Several addresses of a family in the annotation make the Service's egress pool, in the
/// order given; what cannot be an egress address is an error and left out, the rest serve.
#[test]
fn the_annotation_lists_a_pool_per_family() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  annotations: {extproxy.io/egress-ip: '192.0.2.7, 2001:db8::7,192.0.2.8 , 192.0.2.7, 127.0.0.1, 224.0.0.5, 0.0.0.0, 2001:db8::9, fe80::1'}\nspec:\n  clusterIPs: [10.96.0.9, 'fd00:96::9']\n  ipFamilyPolicy: RequireDualStack\n  ports: [{port: 80}]\n";
    let t = run(yaml);
    let field = "error: m.yaml:1: Service default/s: metadata.annotations[extproxy.io/egress-ip]:";
    assert_eq!(
        messages(&t),
        [
            format!("{field} 192.0.2.7 is listed twice; ignored"),
            format!(
                "{field} 127.0.0.1 is a loopback address, which cannot be an egress address; ignored"
            ),
            format!(
                "{field} 224.0.0.5 is a multicast address, which cannot be an egress address; ignored"
            ),
            format!(
                "{field} 0.0.0.0 is the unspecified address, which cannot be an egress address; ignored"
            ),
            format!(
                "{field} fe80::1 is a link-local address, which cannot be an egress address; ignored"
            ),
            "warning: m.yaml:1: Service default/s: no endpoints: connections will be refused"
                .to_owned(),
        ]
    );
    let v4_port = &t.desired.services[&v4("default", "s", "")];
    assert_eq!(v4_port.egress, Some("192.0.2.7".parse().unwrap()));
    assert_eq!(
        v4_port.extra_egress,
        ["192.0.2.8".parse::<IpAddr>().unwrap()]
    );
    let v6_port = &t.desired.services[&spk("default", "s", "", Protocol::Tcp, IpFamily::V6)];
    assert_eq!(v6_port.egress, Some("2001:db8::7".parse().unwrap()));
    assert_eq!(
        v6_port.extra_egress,
        ["2001:db8::9".parse::<IpAddr>().unwrap()]
    );
}

/// A pool holds at most EGRESS_POOL_MAX addresses: the ones beyond are errors.
#[test]
fn a_pool_beyond_its_bound_is_cut_with_an_error() {
    let list: Vec<String> = (1..=proxy_common::EGRESS_POOL_MAX + 1)
        .map(|i| format!("192.0.2.{i}"))
        .collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  annotations: {{extproxy.io/egress-ip: '{}'}}\nspec:\n  clusterIP: 10.96.0.9\n  ports: [{{port: 80}}]\n",
        list.join(",")
    );
    let t = run(&yaml);
    let last = list.last().unwrap();
    assert!(
        messages(&t).iter().any(|m| m.ends_with(&format!(
            "more than {} IPv4 egress addresses: {last}; ignored",
            proxy_common::EGRESS_POOL_MAX
        ))),
        "{:#?}",
        messages(&t)
    );
    let port = &t.desired.services[&v4("default", "s", "")];
    assert_eq!(port.extra_egress.len(), proxy_common::EGRESS_POOL_MAX - 1);
}

/// The node's pool (`--egress-ip` given several times) is every Service's, unless the
/// annotation names that family; the node's pool addresses are never endpoints.
#[test]
fn the_node_pool_applies_to_services_without_the_annotation() {
    let settings = Settings {
        egress_v4: vec![
            "192.0.2.100".parse().unwrap(),
            "192.0.2.101".parse().unwrap(),
        ],
        ..manifest_settings()
    };
    let yaml = [
        service_yaml("plain", "  clusterIP: 10.96.0.9\n  ports: [{port: 80}]"),
        slice_yaml(
            "plain-1",
            "plain",
            "IPv4",
            "[{port: 80}]",
            "[{addresses: [192.0.2.101]}, {addresses: [203.0.113.7]}]",
        ),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: own\n  annotations: {extproxy.io/egress-ip: '192.0.2.7'}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80}]\n".to_owned(),
    ]
    .join("---\n");
    let t = run_with(&yaml, &settings);
    let plain = &t.desired.services[&v4("default", "plain", "")];
    assert_eq!(plain.egress, Some("192.0.2.100".parse().unwrap()));
    assert_eq!(
        plain.extra_egress,
        ["192.0.2.101".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(backends(plain).len(), 1, "{:#?}", messages(&t));
    assert!(
        messages(&t)
            .iter()
            .any(|m| m.contains("192.0.2.101") && m.contains("this node's own address")),
        "{:#?}",
        messages(&t)
    );
    let own = &t.desired.services[&v4("default", "own", "")];
    assert_eq!(own.egress, Some("192.0.2.7".parse().unwrap()));
    assert!(own.extra_egress.is_empty());
}

#[test]
fn node_egress_addresses_are_checked() {
    let ips = |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|s| s.parse().unwrap()).collect() };
    assert_eq!(
        check_egress_addresses(&ips(&["192.0.2.1", "192.0.2.2", "2001:db8::1"])),
        Ok(())
    );
    assert_eq!(
        check_egress_addresses(&ips(&["192.0.2.1", "192.0.2.1", "255.255.255.255", "::1"])),
        Err(vec![
            "192.0.2.1 is listed twice".to_owned(),
            "255.255.255.255 is the broadcast address, which cannot be an egress address"
                .to_owned(),
            "::1 is a loopback address, which cannot be an egress address".to_owned(),
        ])
    );
    let many: Vec<IpAddr> = (1..=17)
        .map(|i| format!("192.0.2.{i}").parse().unwrap())
        .collect();
    assert_eq!(
        check_egress_addresses(&many),
        Err(vec![
            "more than 16 IPv4 egress addresses: 192.0.2.17".to_owned()
        ])
    );
}

/// Services with a cluster egress address: the annotation names a declared address the
/// namespace may use; each endpoint becomes a frontend of its own (pods bypassing the cluster
/// IP); two Services sharing an endpoint leave it to the first.
#[test]
fn cluster_egress_services_take_their_endpoints_as_frontends() {
    let settings = Settings {
        cluster_egress: ClusterEgressRules {
            addresses: vec![("10.0.0.100".parse().unwrap(), vec!["default".into()])],
            default_v4: None,
            default_v6: None,
        },
        // A node pool: a cluster egress address replaces it, alone.
        egress_v4: vec![
            "192.0.2.100".parse().unwrap(),
            "192.0.2.101".parse().unwrap(),
        ],
        ..manifest_settings()
    };
    let service = |name: &str, ip: &str, annotation: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  annotations: {{extproxy.io/cluster-egress-ip: '{annotation}'}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80, targetPort: 8080}}]\n"
        )
    };
    let slice = |name: &str, svc: &str, eps: &str| {
        slice_yaml(
            name,
            svc,
            "IPv4",
            "[{port: 8080}]",
            &format!(
                "[{}]",
                eps.split(", ")
                    .map(|e| format!("{{addresses: [{e}]}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    };
    let yaml = [
        service("api", "10.96.0.10", "10.0.0.100"),
        slice("api-1", "api", "203.0.113.7, 203.0.113.8"),
        service("twin", "10.96.0.11", "10.0.0.100"),
        slice("twin-1", "twin", "203.0.113.8"),
        service("typo", "10.96.0.12", "10.0.0.101"),
        slice("typo-1", "typo", "203.0.113.9"),
    ]
    .join("---\n");
    let t = run_with(&yaml, &settings);
    let api = &t.desired.services[&v4("default", "api", "")];
    assert!(api.cluster_egress);
    assert_eq!(api.egress, Some("10.0.0.100".parse().unwrap()));
    assert!(
        api.extra_egress.is_empty(),
        "no pool for a cluster egress address"
    );
    assert_eq!(
        frontends(api),
        [
            ("10.96.0.10:80".to_owned(), "ClusterIP", 0),
            ("203.0.113.7:8080".to_owned(), "Endpoint", 0),
            ("203.0.113.8:8080".to_owned(), "Endpoint", 0),
        ]
    );
    let twin = &t.desired.services[&v4("default", "twin", "")];
    assert_eq!(
        frontends(twin),
        [("10.96.0.11:80".to_owned(), "ClusterIP", 0)],
        "the shared endpoint stays with the first Service"
    );
    assert_eq!(backends(twin).len(), 1, "and is still twin's endpoint");
    let typo = &t.desired.services[&v4("default", "typo", "")];
    assert!(
        frontends(typo).iter().all(|f| f.1 != "Endpoint"),
        "no cluster egress address, no endpoint frontends"
    );
    let m = messages(&t);
    assert!(
        m.iter().any(|m| m.starts_with("warning: m.yaml:")
            && m.contains("Service default/twin")
            && m.contains(
                "203.0.113.8:8080/TCP (Endpoint) is already used by Service default/api"
            )),
        "{m:#?}"
    );
    assert!(
        m.iter().any(|m| m.starts_with("error: m.yaml:")
            && m.contains("Service default/typo")
            && m.contains("10.0.0.101 is not a declared cluster egress address")),
        "{m:#?}"
    );
}

#[test]
fn missing_egress_is_an_error_but_the_service_is_still_programmed() {
    let settings = Settings {
        egress_v6: Vec::new(),
        ..manifest_settings()
    };
    let yaml = service_yaml(
        "s",
        "  clusterIPs: [10.96.0.9, 'fd00:96::9']\n  ipFamilyPolicy: RequireDualStack\n  ports: [{port: 80}]",
    );
    let t = run_with(&yaml, &settings);
    assert_eq!(
        messages(&t),
        [
            "warning: m.yaml:1: Service default/s: no endpoints: connections will be refused",
            "error: m.yaml:1: Service default/s: no IPv6 egress IP: pass --egress-ip with an IPv6 address or annotate extproxy.io/egress-ip; IPv6 connections will be refused",
        ]
    );
    let v6 = &t.desired.services[&spk("default", "s", "", Protocol::Tcp, IpFamily::V6)];
    assert_eq!(v6.egress, None);
    assert_eq!(
        frontends(v6),
        [("[fd00:96::9]:80".to_owned(), "ClusterIP", 0)]
    );
}

// ---------------------------------------------------------------------------------------------
// Filling (manifest mode)
// ---------------------------------------------------------------------------------------------

#[test]
fn filling_is_deterministic_and_avoids_explicit_values() {
    let a = service_yaml("a", "  type: NodePort\n  ports: [{port: 80}]");
    let b = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: other}\nspec:\n  type: NodePort\n  ipFamilyPolicy: PreferDualStack\n  ports: [{port: 80}, {name: x, port: 81, protocol: UDP}]\n";
    let explicit = service_yaml(
        "z",
        "  type: NodePort\n  clusterIP: 10.96.0.1\n  ports: [{port: 80, nodePort: 30000}]",
    );
    let forward = inventory(&[("1.yaml", &a), ("2.yaml", b), ("3.yaml", &explicit)]);
    let backward = inventory(&[("1.yaml", &explicit), ("2.yaml", b), ("3.yaml", &a)]);
    let t1 = translate(&forward, &node(), &manifest_settings());
    let t2 = translate(&backward, &node(), &manifest_settings());
    assert_eq!(t1.desired, t2.desired);
    assert_eq!(t1.filled, t2.filled);
    let fields: Vec<(String, &str)> = t1
        .filled
        .iter()
        .map(|f| (f.service.to_string(), f.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("default/a".to_owned(), "spec.ports[0].nodePort"),
            ("default/a".to_owned(), "spec.clusterIPs[IPv4]"),
            ("other/b".to_owned(), "spec.ports[0].nodePort"),
            ("other/b".to_owned(), "spec.ports[1].nodePort"),
            ("other/b".to_owned(), "spec.clusterIPs[IPv4]"),
            ("other/b".to_owned(), "spec.clusterIPs[IPv6]"),
        ]
    );
    let mut seen_ips = BTreeSet::new();
    let mut seen_ports = BTreeSet::new();
    for filled in &t1.filled {
        if filled.field.contains("clusterIPs") {
            let ip: IpAddr = filled.value.parse().unwrap();
            assert!(
                ip != "10.96.0.1".parse::<IpAddr>().unwrap()
                    && ip != "10.96.0.0".parse::<IpAddr>().unwrap()
            );
            assert!(
                manifest_settings()
                    .service_cidrs
                    .iter()
                    .any(|c| c.contains(&ip))
            );
            assert!(seen_ips.insert(ip));
        } else {
            let port: u16 = filled.value.parse().unwrap();
            assert!((30001..=32767).contains(&port));
            assert!(seen_ports.insert(port));
        }
    }
    // A fill is a function of the name: adding another Service does not move existing ones.
    let more = inventory(&[
        ("1.yaml", &a),
        ("2.yaml", b),
        ("3.yaml", &explicit),
        ("4.yaml", &service_yaml("m", "  ports: [{port: 9}]")),
    ]);
    let t3 = translate(&more, &node(), &manifest_settings());
    for filled in &t1.filled {
        assert!(t3.filled.contains(filled), "{filled:?} moved");
    }
}

#[test]
fn filling_needs_a_service_cidr_of_the_family() {
    let settings = Settings {
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        ..manifest_settings()
    };
    let yaml = [
        service_yaml(
            "six",
            "  ipFamilies: [IPv6]\n  type: NodePort\n  ports: [{port: 80}]",
        ),
        service_yaml(
            "prefer",
            "  ipFamilyPolicy: PreferDualStack\n  ports: [{port: 80}]",
        ),
    ]
    .join("---\n");
    let t = run_with(&yaml, &settings);
    assert_eq!(
        messages(&t),
        [
            "warning: m.yaml:9: Service default/prefer: no endpoints: connections will be refused",
            "error: m.yaml:1: Service default/six: spec.clusterIP: no IPv6 cluster IP and no IPv6 service CIDR to allocate one from: pass --service-cidr with an IPv6 range or set spec.clusterIP; served without a cluster IP",
            "warning: m.yaml:1: Service default/six: no endpoints: connections will be refused",
        ]
    );
    // PreferDualStack without an IPv6 range: IPv4 only, no complaint.
    assert_eq!(
        service_keys(&t),
        [
            v4("default", "prefer", ""),
            spk("default", "six", "", Protocol::Tcp, IpFamily::V6)
        ]
    );
    let six = &t.desired.services[&spk("default", "six", "", Protocol::Tcp, IpFamily::V6)];
    assert_eq!(six.cluster_ip, None);
    let node_port = six.node_port.expect("filled node port");
    assert_eq!(
        frontends(six),
        [(format!("[2001:db8:1::10]:{node_port}"), "NodePort", 0)]
    );

    // Only an IPv6 range configured: an unspecified Service becomes IPv6.
    let settings = Settings {
        service_cidrs: vec!["fd00:96::/112".parse().unwrap()],
        ..manifest_settings()
    };
    let t = run_with(&service_yaml("x", "  ports: [{port: 80}]"), &settings);
    assert_eq!(
        service_keys(&t),
        [spk("default", "x", "", Protocol::Tcp, IpFamily::V6)]
    );
}

#[test]
fn kube_mode_never_fills() {
    let settings = Settings {
        fill_missing: false,
        ..manifest_settings()
    };
    let t = run_with(
        &service_yaml("x", "  type: NodePort\n  ports: [{port: 80}]"),
        &settings,
    );
    assert!(t.filled.is_empty());
    let service = &t.desired.services[&v4("default", "x", "")];
    assert_eq!((service.cluster_ip, service.node_port), (None, None));
    assert!(service.frontends.is_empty());
}

#[test]
fn invalid_cluster_ips_and_families() {
    let t = run(&service_yaml(
        "s",
        "  clusterIPs: [10.96.0.9, 10.96.0.10]\n  ipFamilies: [IPv5]\n  ipFamilyPolicy: Maybe\n  ports: [{port: 80}]",
    ));
    assert_eq!(
        messages(&t),
        [
            "error: m.yaml:1: Service default/s: spec.clusterIPs[1]: a second IPv4 cluster IP (10.96.0.10): at most one per family; ignored",
            "error: m.yaml:1: Service default/s: spec.ipFamilies[0]: unknown IP family \"IPv5\": use IPv4 or IPv6; ignored",
            "error: m.yaml:1: Service default/s: spec.ipFamilyPolicy: unknown ipFamilyPolicy \"Maybe\": treated as SingleStack",
            "warning: m.yaml:1: Service default/s: no endpoints: connections will be refused",
        ]
    );
    assert_eq!(
        t.desired.services[&v4("default", "s", "")].cluster_ip,
        Some("10.96.0.9".parse().unwrap())
    );
}

/// `clusterIP: 2.3.4.5k` logged "ignored", then "filled in: the manifest has none", and the
/// Service was served on an address nobody asked for. Now it is not served, with one message;
/// so is a clusterIP outside --service-cidr, which the API server refuses too.
#[test]
fn an_invalid_cluster_ip_makes_the_service_unservable() {
    let yaml = [
        service_yaml(
            "bad",
            "  type: NodePort\n  clusterIP: 2.3.4.5k\n  ports: [{port: 80}]",
        ),
        service_yaml("outside", "  clusterIP: 203.0.113.7\n  ports: [{port: 80}]"),
        service_yaml("loopback", "  clusterIP: 127.0.0.1\n  ports: [{port: 80}]"),
        service_yaml("good", "  clusterIP: 10.96.0.7\n  ports: [{port: 80}]"),
    ]
    .join("---\n");
    let t = run(&yaml);
    assert_eq!(
        messages(&t)
            .iter()
            .filter(|m| !m.contains("no endpoints"))
            .collect::<Vec<_>>(),
        [
            "error: m.yaml:1: Service default/bad: spec.clusterIP: \"2.3.4.5k\" is not an IP address: the Service is not served until this is fixed (or remove it to have one filled in)",
            "error: m.yaml:16: Service default/loopback: spec.clusterIP: 127.0.0.1 is a loopback address, which cannot be a cluster IP: the Service is not served until this is fixed (or remove it to have one filled in)",
            "error: m.yaml:9: Service default/outside: spec.clusterIP: 203.0.113.7 is outside the service CIDRs (10.96.0.0/16, fd00:96::/112, --service-cidr): the Service is not served until this is fixed (or remove it to have one filled in)",
        ]
    );
    assert!(t.filled.is_empty(), "{:?}", t.filled);
    assert_eq!(service_keys(&t), [v4("default", "good", "")]);
    // Kubernetes mode: the API server allocated it, whatever the (unknown) service CIDR.
    let kube = Settings {
        fill_missing: false,
        service_cidrs: Vec::new(),
        ..manifest_settings()
    };
    let t = run_with(
        &service_yaml("outside", "  clusterIP: 203.0.113.7\n  ports: [{port: 80}]"),
        &kube,
    );
    assert_eq!(service_keys(&t), [v4("default", "outside", "")]);
}

// ---------------------------------------------------------------------------------------------
// Who keeps a frontend; frontends and endpoints that cannot work
// ---------------------------------------------------------------------------------------------

/// Feeds manifest files (path, text) to `t` and updates it.
fn feed(t: &mut Incremental, set: &mut ManifestSet, files: &[(&str, &str)]) -> Translation {
    for (path, text) in files {
        set.update_file_text(Path::new(path), text);
    }
    set.feed(t);
    t.update().clone()
}

/// A new Service in another namespace with the serving Service's clusterIP, or with the node's
/// address as externalIP on its NodePort, took the frontend (namespace/name decided) and the
/// serving Service timed out from then on; the error went to the serving Service's file.
#[test]
fn a_serving_frontend_stays_with_its_service() {
    let serving = service_yaml(
        "serving",
        "  type: NodePort\n  clusterIP: 10.96.0.50\n  ports: [{port: 80, nodePort: 30080}]",
    )
    .replace("{name: serving}", "{name: serving, namespace: z}");
    let newcomers = [
        service_yaml("same-ip", "  clusterIP: 10.96.0.50\n  ports: [{port: 80}]"),
        service_yaml(
            "node-ip",
            "  clusterIP: 10.96.0.51\n  externalIPs: [10.240.0.10]\n  ports: [{port: 30080}]",
        ),
    ]
    .join("---\n");
    let mut t = Incremental::new(node(), manifest_settings());
    let mut set = ManifestSet::default();
    let before = feed(&mut t, &mut set, &[("m/z.yaml", &serving)]);
    let serving_key = v4("z", "serving", "");
    let served = frontends(&before.desired.services[&serving_key]);
    assert_eq!(served.len(), 3, "{served:?}");

    // The newcomers' file comes first by name, and so do their namespace and names.
    let after = feed(&mut t, &mut set, &[("m/a.yaml", &newcomers)]);
    assert_eq!(frontends(&after.desired.services[&serving_key]), served);
    let errors: Vec<String> = messages(&after)
        .into_iter()
        .filter(|m| m.starts_with("error"))
        .collect();
    assert_eq!(
        errors,
        [
            "error: m/a.yaml:8: Service default/node-ip: spec.externalIPs[0]: 10.240.0.10:30080/TCP (ExternalIP) is already used by Service z/serving port \"\", which keeps it (it serves it already); not programmed here",
            "error: m/a.yaml:1: Service default/same-ip: spec.clusterIP: 10.96.0.50:80/TCP (ClusterIP) is already used by Service z/serving port \"\", which keeps it (it serves it already); not programmed here",
        ]
    );
    assert!(frontends(&after.desired.services[&v4("default", "same-ip", "")]).is_empty());

    // A cold start decides alike when told what the maps serve.
    let (inventory, _) = set.inventory();
    let cold = translate_with(
        &inventory,
        &node(),
        &manifest_settings(),
        before.desired.frontend_owners(),
    );
    assert_eq!(cold.desired, after.desired);
    assert_eq!(cold.diagnostics, after.diagnostics);

    // Once the serving Service lets the address go, the newcomer gets it.
    let gone = serving.replace("clusterIP: 10.96.0.50", "clusterIP: 10.96.0.52");
    let moved = feed(&mut t, &mut set, &[("m/z.yaml", &gone)]);
    assert_eq!(
        frontends(&moved.desired.services[&v4("default", "same-ip", "")]),
        [("10.96.0.50:80".to_owned(), "ClusterIP", 0)]
    );
}

/// Without a Service serving the frontend yet, the oldest one wanting it keeps it, whatever
/// its name: creationTimestamp (uid for the same second) in Kubernetes mode, the file's
/// modification time in manifest mode.
#[test]
fn the_oldest_service_keeps_a_contested_frontend() {
    let at = |secs: u64, uid: &str| Seniority {
        since: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)),
        uid: Some(uid.into()),
    };
    let services = [
        ("a", at(200, "u1")),
        ("b", at(100, "u9")),
        ("c", at(100, "u2")),
    ];
    let mut inventory = Inventory::default();
    for (name, age) in services {
        let object: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": format!("10.96.0.6{}", name.as_bytes()[0] - b'a'),
                     "externalIPs": ["192.0.2.77"], "ports": [{"port": 80}]},
        }))
        .unwrap();
        inventory.services.insert(
            ObjectKey::new("default", name),
            Sourced::new(object, Origin::Cluster).with_seniority(age),
        );
    }
    let t = translate(&inventory, &node(), &manifest_settings());
    let has_external = |name: &str| {
        frontends(&t.desired.services[&v4("default", name, "")])
            .iter()
            .any(|(addr, _, _)| addr == "192.0.2.77:80")
    };
    assert!(has_external("c"), "created first (then by uid)");
    assert!(!has_external("a") && !has_external("b"));
    assert!(
        messages(&t).contains(&"error: Service default/b: spec.externalIPs[0]: 192.0.2.77:80/TCP (ExternalIP) is already used by Service default/c port \"\", which keeps it (it was created first); not programmed here".to_owned()),
        "{:#?}",
        messages(&t)
    );
}

/// Frontends outside the service CIDR, or on addresses nothing routes to one host, or on
/// another Service's endpoint (whose traffic they then captured), were accepted silently.
#[test]
fn frontends_that_cannot_work_are_refused() {
    let yaml = [
        service_yaml(
            "lb",
            "  type: LoadBalancer\n  clusterIP: 10.96.0.80\n  externalIPs: [127.0.0.1, 0.0.0.0, 224.0.0.1, 255.255.255.255, 169.254.1.1, 203.0.113.7, 10.240.0.10, 192.0.2.80]\n  ports: [{port: 80, nodePort: 30080}]",
        ) + "status: {loadBalancer: {ingress: [{ip: 203.0.113.8}, {ip: 'fe80::1'}, {ip: 192.0.2.81}]}}\n",
        service_yaml("other", "  clusterIP: 10.96.0.81\n  ports: [{port: 443}]"),
        slice_yaml(
            "other-1",
            "other",
            "IPv4",
            "[{port: 443}]",
            "[{addresses: [203.0.113.7]}, {addresses: [203.0.113.8]}]",
        ),
    ]
    .join("---\n");
    let t = run(&yaml);
    let errors: Vec<String> = messages(&t)
        .into_iter()
        .filter(|m| m.starts_with("error"))
        .collect();
    assert_eq!(
        errors,
        [
            "error: m.yaml:1: Service default/lb: status.loadBalancer.ingress[1].ip: fe80::1 is a link-local address, which cannot be a Service's frontend; ignored",
            "error: m.yaml:1: Service default/lb: spec.externalIPs[0]: 127.0.0.1 is a loopback address, which cannot be a Service's frontend; ignored",
            "error: m.yaml:1: Service default/lb: spec.externalIPs[1]: 0.0.0.0 is the unspecified address, which cannot be a Service's frontend; ignored",
            "error: m.yaml:1: Service default/lb: spec.externalIPs[2]: 224.0.0.1 is a multicast address, which cannot be a Service's frontend; ignored",
            "error: m.yaml:1: Service default/lb: spec.externalIPs[3]: 255.255.255.255 is the broadcast address, which cannot be a Service's frontend; ignored",
            "error: m.yaml:1: Service default/lb: spec.externalIPs[4]: 169.254.1.1 is a link-local address, which cannot be a Service's frontend; ignored",
            "error: m.yaml:1: Service default/lb: status.loadBalancer.ingress[0].ip: 203.0.113.8 is an endpoint address of Service default/other: as a frontend it would capture the connections to that endpoint; ignored",
            "error: m.yaml:1: Service default/lb: spec.externalIPs[5]: 203.0.113.7 is an endpoint address of Service default/other: as a frontend it would capture the connections to that endpoint; ignored",
        ]
    );
    // The node's own address is a legitimate external IP (k3s ServiceLB).
    assert_eq!(
        frontends(&t.desired.services[&v4("default", "lb", "")]),
        [
            ("10.240.0.10:30080".to_owned(), "NodePort", 0),
            ("10.240.0.10:80".to_owned(), "ExternalIP", 0),
            ("10.96.0.80:80".to_owned(), "ClusterIP", 0),
            ("192.0.2.80:80".to_owned(), "ExternalIP", 0),
            ("192.0.2.81:80".to_owned(), "LoadBalancer", 0),
            ("198.51.100.10:30080".to_owned(), "NodePort", 0),
        ]
    );
    // The endpoints keep working.
    assert_eq!(
        backends(&t.desired.services[&v4("default", "other", "")]).len(),
        2
    );
}

/// 0.0.0.0, 127.0.0.1, 255.255.255.255, 224.0.0.1, the node's address and a ClusterIP were
/// programmed as endpoints without a word. They are skipped, each with an error on the slice.
#[test]
fn endpoints_that_cannot_work_are_skipped() {
    let yaml = [
        service_yaml("web", "  clusterIP: 10.96.0.90\n  ports: [{port: 80}]"),
        service_yaml("other", "  clusterIP: 10.96.0.91\n  ports: [{port: 80}]"),
        slice_yaml(
            "web-1",
            "web",
            "IPv4",
            "[{port: 8080}]",
            "[{addresses: [0.0.0.0]}, {addresses: [127.0.0.1]}, {addresses: [255.255.255.255]}, {addresses: [224.0.0.1]}, {addresses: [10.240.0.10]}, {addresses: [10.96.0.91]}, {addresses: [192.0.2.100]}, {addresses: [203.0.113.9]}]",
        ),
    ]
    .join("---\n");
    let t = run(&yaml);
    let errors: Vec<String> = messages(&t)
        .into_iter()
        .filter(|m| m.starts_with("error"))
        .collect();
    let refused = "extproxy refuses it, though the API server accepts it";
    assert_eq!(
        errors,
        [
            "error: m.yaml:15: EndpointSlice default/web-1: endpoints[0].addresses[0]: 0.0.0.0 is the unspecified address, which no endpoint can be reached at; endpoint ignored (the API server refuses it too)".to_owned(),
            "error: m.yaml:15: EndpointSlice default/web-1: endpoints[1].addresses[0]: 127.0.0.1 is a loopback address, which no endpoint can be reached at; endpoint ignored (the API server refuses it too)".to_owned(),
            format!("error: m.yaml:15: EndpointSlice default/web-1: endpoints[2].addresses[0]: 255.255.255.255 is the broadcast address, which no endpoint can be reached at; endpoint ignored ({refused})"),
            "error: m.yaml:15: EndpointSlice default/web-1: endpoints[3].addresses[0]: 224.0.0.1 is a multicast address, which no endpoint can be reached at; endpoint ignored (the API server refuses it too)".to_owned(),
            format!("error: m.yaml:15: EndpointSlice default/web-1: endpoints[4].addresses[0]: 10.240.0.10 is this node's own address: connections to it would come back to the node; endpoint ignored ({refused})"),
            format!("error: m.yaml:15: EndpointSlice default/web-1: endpoints[5].addresses[0]: 10.96.0.91 is the cluster IP of Service default/other: a virtual address, which no host answers on; endpoint ignored ({refused})"),
            format!("error: m.yaml:15: EndpointSlice default/web-1: endpoints[6].addresses[0]: 192.0.2.100 is this node's own address: connections to it would come back to the node; endpoint ignored ({refused})"),
        ]
    );
    assert_eq!(
        backends(&t.desired.services[&v4("default", "web", "")]),
        [("203.0.113.9:8080".to_owned(), BackendRole::Active)]
    );
}

/// A cluster IP handed out later (filling) or an endpoint address added later is found by an
/// incremental update as by a single pass.
#[test]
fn later_cluster_ips_and_endpoints_are_checked_incrementally() {
    let mut t = Incremental::new(node(), manifest_settings());
    let mut set = ManifestSet::default();
    let web = [
        service_yaml(
            "web",
            "  clusterIP: 10.96.0.90\n  externalIPs: [203.0.113.40]\n  ports: [{port: 80}]",
        ),
        slice_yaml(
            "web-1",
            "web",
            "IPv4",
            "[{port: 8080}]",
            "[{addresses: [10.96.0.95]}, {addresses: [203.0.113.9]}]",
        ),
    ]
    .join("---\n");
    let first = feed(&mut t, &mut set, &[("m/web.yaml", &web)]);
    assert_eq!(
        backends(&first.desired.services[&v4("default", "web", "")]).len(),
        2
    );
    let later = [
        service_yaml("later", "  clusterIP: 10.96.0.95\n  ports: [{port: 80}]"),
        slice_yaml(
            "later-1",
            "later",
            "IPv4",
            "[{port: 80}]",
            "[{addresses: [203.0.113.40]}]",
        ),
    ]
    .join("---\n");
    let second = feed(&mut t, &mut set, &[("m/later.yaml", &later)]);
    let web_port = &second.desired.services[&v4("default", "web", "")];
    assert_eq!(
        backends(web_port),
        [("203.0.113.9:8080".to_owned(), BackendRole::Active)]
    );
    assert_eq!(
        frontends(web_port),
        [("10.96.0.90:80".to_owned(), "ClusterIP", 0)]
    );
    let (inventory, _) = set.inventory();
    let single = translate_with(
        &inventory,
        &node(),
        &manifest_settings(),
        first.desired.frontend_owners(),
    );
    assert_eq!(second.desired, single.desired);
    assert_eq!(second.diagnostics, single.diagnostics);
}

/// A cluster egress address is one per family (one owner node serves it): a second one is an
/// error saying where pools belong, and the first serves alone.
#[test]
fn cluster_egress_takes_one_address_per_family() {
    let settings = Settings {
        cluster_egress: ClusterEgressRules {
            addresses: vec![
                ("10.0.0.100".parse().unwrap(), vec!["*".into()]),
                ("10.0.0.101".parse().unwrap(), vec!["*".into()]),
            ],
            default_v4: None,
            default_v6: None,
        },
        ..manifest_settings()
    };
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  annotations: {extproxy.io/cluster-egress-ip: '10.0.0.100,10.0.0.101'}\nspec:\n  clusterIP: 10.96.0.9\n  ports: [{port: 80}]\n";
    let t = run_with(yaml, &settings);
    assert!(
        messages(&t).iter().any(|m| m.contains(
            "more than one IPv4 address: 10.0.0.101 ignored, the first one is used (a cluster egress address is one address per family"
        ) && m.contains("pools of addresses are for extproxy.io/egress-ip")),
        "{:#?}",
        messages(&t)
    );
    let port = &t.desired.services[&v4("default", "s", "")];
    assert_eq!(port.egress, Some("10.0.0.100".parse().unwrap()));
    assert!(port.extra_egress.is_empty());
}
