//! DNS-name endpoints (EndpointSlices with `addressType: FQDN`), as root: an authoritative DNS
//! server in the outside namespace (`extproxy_tests::dns_server`, the agent pointed at it with
//! `--dns-server`), the real `extproxy` binary on the node, real traffic from the pod through the
//! Service to whatever the name answers. Names that change address, TTLs longer than
//! `--dns-max-ttl`, addresses that leave the answer while a connection to them is open, NXDOMAIN,
//! a resolver that stops answering; manifest mode and Kubernetes mode (a real API server).

use extproxy_tests::ip;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use extproxy_envtest::{ControlPlane, Options, binaries_or_skip};
use extproxy_tests::agent::*;
use extproxy_tests::dns_server::{Answer, DnsServer};
use extproxy_tests::kube::{NodeApi, meta};
use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams, PostParams};

const NAME: &str = "db.xp.test";
/// The DNS server: the outside router's address (reachable from the node).
const DNS: &str = "10.0.0.254:53";
const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:10:96::10";
const METRICS: &str = "127.0.0.1:19465";
const WAIT: Duration = Duration::from_secs(40);

/// A dual-stack selector-less Service on port 80 and an FQDN EndpointSlice naming [`NAME`] on
/// port 8080.
fn manifests() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: db, namespace: demo}}
spec:
  clusterIPs: [{VIP}, '{VIP6}']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{{name: http, port: 80, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-fqdn
  namespace: demo
  labels: {{kubernetes.io/service-name: db}}
addressType: FQDN
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- addresses: [{NAME}]
"#
    )
}

fn wait_until(what: &str, agent: &Agent, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; agent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The endpoint a new connection from the pod to `vip`:80 reaches (SNAT checked), or the error.
fn connect(pod_ns: &str, vip: &str) -> std::io::Result<IpAddr> {
    let seen = tcp_once(pod_ns, None, vip, 80)?;
    let node = if vip.contains(':') { NODE6 } else { NODE };
    assert_eq!(seen.peer_ip, ip(node), "SNAT to the node's address");
    Ok(seen.endpoint)
}

fn reached(pod_ns: &str, vip: &str, n: usize) -> BTreeSet<IpAddr> {
    (0..n)
        .map(|_| connect(pod_ns, vip).unwrap_or_else(|e| panic!("connecting to {vip}:80: {e}")))
        .collect()
}

fn refused(pod_ns: &str, vip: &str) -> bool {
    matches!(connect(pod_ns, vip), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// The agent's published state of [`NAME`] in `family` (IPv4, IPv6), from `extproxy inspect`.
fn dns_state(agent: &Agent, family: &str) -> serde_json::Value {
    let report = agent.inspect();
    report["dns"]["names"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == NAME && n["family"] == family)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

fn addresses(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|a| match a {
            serde_json::Value::Array(pair) => pair[0].as_str().unwrap().to_owned(),
            other => other.as_str().unwrap().to_owned(),
        })
        .collect()
}

/// GET on the agent's metrics address (inside the node's namespace).
fn metrics_text(node_ns: &str) -> String {
    use std::io::{Read, Write};
    in_netns(node_ns, || {
        let mut s = std::net::TcpStream::connect(METRICS).expect("the agent's metrics address");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

/// Needs root. A name's address changes while a connection to the old one is open: new
/// connections follow the name at once although its TTL is an hour (`--dns-max-ttl`), the open
/// connection goes on (the old address drains), and once it ends the old address goes, long
/// before `--dns-drain-for`. IPv6 ports get the AAAA records. The metrics name the name, never
/// an address.
#[test]
fn fqdn_endpoints_follow_the_name_and_keep_established_connections() {
    let t = Topology::new("dnsrot");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP2, 8080), (EP1_6, 8080)]);
    let dns = DnsServer::start(&t.ext.name, DNS);
    dns.set_addresses(NAME, &[EP1, EP1_6], 3600);
    t.write_manifest("db.yaml", &manifests());
    let agent = t.start_agent(&[
        "--dns-server",
        "10.0.0.254",
        "--dns-max-ttl",
        "2s",
        "--metrics-address",
        METRICS,
    ]);

    assert_eq!(reached(&t.pod.name, VIP, 4), BTreeSet::from([ip(EP1)]));
    assert_eq!(reached(&t.pod.name, VIP6, 2), BTreeSet::from([ip(EP1_6)]));
    let mut established =
        TcpClient::connect(&t.pod.name, None, VIP, 80, Duration::from_secs(3)).unwrap();
    assert_eq!(established.exchange("before").unwrap().endpoint, ip(EP1));

    // The name moves. Its TTL says an hour; --dns-max-ttl asks again within 2 s.
    dns.set_addresses(NAME, &[EP2, EP1_6], 3600);
    wait_until("new connections to reach the new address", &agent, || {
        connect(&t.pod.name, VIP).ok() == Some(ip(EP2))
    });
    assert_eq!(reached(&t.pod.name, VIP, 6), BTreeSet::from([ip(EP2)]));
    // The open connection to the old address goes on.
    assert_eq!(established.exchange("after").unwrap().endpoint, ip(EP1));
    // The state file for inspect is written at most once a second.
    wait_until("inspect to show the old address draining", &agent, || {
        let v4 = dns_state(&agent, "IPv4");
        v4["condition"] == "Fresh"
            && addresses(&v4["serving"]) == [EP2]
            && addresses(&v4["draining"]) == [EP1]
    });
    assert_eq!(addresses(&dns_state(&agent, "IPv6")["serving"]), [EP1_6]);
    let text = agent.inspect_text();
    assert!(text.contains("DNS NAMES"), "{text}");
    let metrics = metrics_text(&t.node.name);
    assert!(
        metrics.contains(&format!(
            "extproxy_dns_addresses{{name=\"{NAME}\",family=\"IPv4\",state=\"draining\"}} 1"
        )),
        "{metrics}"
    );
    let dns_lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("extproxy_dns_"))
        .collect();
    assert!(!dns_lines.is_empty());
    assert!(
        dns_lines
            .iter()
            .all(|l| !l.contains(EP1) && !l.contains(EP2)),
        "no series per address: {dns_lines:#?}"
    );

    // The connection ends: the old address goes at the next sweeps, not after an hour.
    drop(established);
    wait_until(
        "the drained address to go once its flow ended",
        &agent,
        || addresses(&dns_state(&agent, "IPv4")["draining"]).is_empty(),
    );
    assert_eq!(addresses(&dns_state(&agent, "IPv4")["serving"]), [EP2]);
    assert!(dns.queries(NAME) >= 4, "A and AAAA, asked again");
    agent.stop();
}

/// Needs root. NXDOMAIN is believed once confirmed (`--dns-nxdomain-for`): until then the name's
/// address keeps serving, then connections are refused; the name coming back brings its
/// endpoint back. A resolver that stops answering: the last answer keeps serving (stale-if-error)
/// until `--dns-stale-for`, then connections are refused; answers again: served again.
#[test]
fn nxdomain_and_a_silent_resolver() {
    let t = Topology::new("dnsnx");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP3, 8080)]);
    let dns = DnsServer::start(&t.ext.name, DNS);
    dns.set_addresses(NAME, &[EP1], 1);
    t.write_manifest("db.yaml", &manifests().replace(&format!(", '{VIP6}'"), ""));
    let agent = t.start_agent(&[
        "--dns-server",
        DNS,
        "--dns-max-ttl",
        "2s",
        "--dns-nxdomain-for",
        "3s",
        "--dns-stale-for",
        "15s",
    ]);
    assert_eq!(reached(&t.pod.name, VIP, 3), BTreeSet::from([ip(EP1)]));

    dns.set(NAME, Answer::NxDomain);
    agent.wait_for_log(
        &format!("DNS name {NAME}: NXDOMAIN (the name does not exist); its addresses ({EP1}) are served until"),
        WAIT,
    );
    agent.wait_for_log(
        &format!("DNS name {NAME}: NXDOMAIN (the name does not exist): no IPv4 endpoints from it"),
        WAIT,
    );
    wait_until("connections to be refused", &agent, || {
        refused(&t.pod.name, VIP)
    });
    // The state file for inspect is written at most once a second.
    wait_until("inspect to show NXDOMAIN", &agent, || {
        dns_state(&agent, "IPv4")["condition"] == "NxDomain"
    });

    // The name is back, elsewhere.
    dns.set_addresses(NAME, &[EP3], 1);
    wait_until("the name's new address to serve", &agent, || {
        connect(&t.pod.name, VIP).ok() == Some(ip(EP3))
    });

    // The resolver goes silent: the last answer keeps serving past its TTL...
    dns.set_silent(true);
    agent.wait_for_log(
        &format!("its last answer ({EP3}) is served past its TTL (stale-if-error"),
        WAIT,
    );
    assert_eq!(reached(&t.pod.name, VIP, 3), BTreeSet::from([ip(EP3)]));
    wait_until("inspect to show the stale answer", &agent, || {
        dns_state(&agent, "IPv4")["condition"]["Stale"].is_string()
    });
    // ... until --dns-stale-for: then its address drains and new connections are refused.
    agent.wait_for_log("has not answered for longer than --dns-stale-for", WAIT);
    wait_until("connections to be refused", &agent, || {
        refused(&t.pod.name, VIP)
    });
    // It answers again.
    dns.set_silent(false);
    wait_until("the name to serve again", &agent, || {
        connect(&t.pod.name, VIP).ok() == Some(ip(EP3))
    });
    agent.stop();
}

// -------------------------------------------------------------------------------------------
// Kubernetes mode
// -------------------------------------------------------------------------------------------

/// Needs root and $EXTPROXY_K8S_BIN. The real API server takes an FQDN EndpointSlice (with a
/// deprecation warning); the agent on a kubeconfig resolves its name, the pod's connections to
/// the cluster IP reach the address and follow it when it changes; NXDOMAIN becomes a
/// `DNSNameNotFound` Event on the Service.
#[test]
fn kube_mode_serves_fqdn_endpoint_slices() {
    let Some(bins) = binaries_or_skip("kube_mode_serves_fqdn_endpoint_slices") else {
        return;
    };
    let topo = Topology::new("kdns");
    let _servers = EchoServers::start(&topo.ext.name, &[(EP1, 8080), (EP2, 8080)]);
    let dns = DnsServer::start(&topo.ext.name, DNS);
    dns.set_addresses(NAME, &[EP1], 1);
    let cp = ControlPlane::start(
        &bins,
        Options {
            netns: Some(format!("/var/run/netns/{}", topo.node.name).into()),
            ..Options::default()
        },
    )
    .expect("etcd and kube-apiserver in the node's namespace");
    let api = NodeApi::new(&topo.node.name);
    api.run(|| async {
        let client = cp.client().unwrap();
        let pp = PostParams::default();
        Api::<Namespace>::all(client.clone())
            .create(
                &pp,
                &Namespace {
                    metadata: meta("", "demo", &[]),
                    ..Namespace::default()
                },
            )
            .await
            .unwrap();
        Api::<Node>::all(client.clone())
            .create(
                &pp,
                &Node {
                    metadata: meta("", "node-a", &[]),
                    status: Some(NodeStatus {
                        addresses: Some(vec![NodeAddress {
                            type_: "InternalIP".into(),
                            address: NODE.into(),
                        }]),
                        ..NodeStatus::default()
                    }),
                    ..Node::default()
                },
            )
            .await
            .unwrap();
        let service = Service {
            metadata: meta(
                "demo",
                "db",
                &[("service.kubernetes.io/service-proxy-name", "extproxy")],
            ),
            spec: Some(ServiceSpec {
                cluster_ip: Some(VIP.into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        Api::<Service>::namespaced(client.clone(), "demo")
            .create(&pp, &service)
            .await
            .unwrap();
        let slice = EndpointSlice {
            metadata: meta("demo", "db-fqdn", &[("kubernetes.io/service-name", "db")]),
            address_type: "FQDN".into(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..EndpointPort::default()
            }]),
            endpoints: vec![Endpoint {
                addresses: vec![NAME.into()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..EndpointConditions::default()
                }),
                ..Endpoint::default()
            }],
        };
        // The API server accepts it (FQDN slices are deprecated, not refused).
        Api::<EndpointSlice>::namespaced(client, "demo")
            .create(&pp, &slice)
            .await
            .expect("the API server accepts an FQDN EndpointSlice");
    });

    let agent = Agent::start_kube(
        &topo,
        &cp.kubeconfig(),
        "node-a",
        &[
            "--metrics-address",
            METRICS,
            "--pod-ifaces",
            "none",
            "--detach-on-exit",
            "--dns-server",
            "10.0.0.254",
            "--dns-max-ttl",
            "2s",
            "--dns-nxdomain-for",
            "1s",
        ],
    );
    wait_until("the name's address to serve", &agent, || {
        connect(&topo.pod.name, VIP).ok() == Some(ip(EP1))
    });
    dns.set_addresses(NAME, &[EP2], 1);
    wait_until("the name's new address to serve", &agent, || {
        connect(&topo.pod.name, VIP).ok() == Some(ip(EP2))
    });
    assert_eq!(reached(&topo.pod.name, VIP, 4), BTreeSet::from([ip(EP2)]));

    dns.set(NAME, Answer::NxDomain);
    wait_until("connections to be refused", &agent, || {
        refused(&topo.pod.name, VIP)
    });
    let metrics = metrics_text(&topo.node.name);
    assert!(
        metrics.contains(&format!(
            "extproxy_dns_condition{{name=\"{NAME}\",family=\"IPv4\",condition=\"nxdomain\"}} 1"
        )),
        "{metrics}"
    );
    // The Event comes once the problem has lasted the agent's settle time (5 s).
    wait_until("a DNSNameNotFound Event on Service demo/db", &agent, || {
        api.run(|| async {
            let client = cp.client().unwrap();
            Api::<K8sEvent>::namespaced(client, "demo")
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("DNSNameNotFound")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("db")
                        && e.note.as_deref().is_some_and(|n| n.contains(NAME))
                })
        })
    });
    agent.stop();
}

// -------------------------------------------------------------------------------------------
// Health checking of DNS-name endpoints
// -------------------------------------------------------------------------------------------

/// An IPv4 Service with a fast TCP health check (interval 1s, timeout 500ms, thresholds 2/2)
/// and an FQDN EndpointSlice naming [`NAME`] on port 8080.
fn checked_manifests() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: demo
  annotations:
    extproxy.io/health-check: tcp
    extproxy.io/health-check-interval: 1s
    extproxy.io/health-check-timeout: 500ms
    extproxy.io/health-check-unhealthy-threshold: "2"
    extproxy.io/health-check-healthy-threshold: "2"
spec:
  clusterIP: {VIP}
  ports: [{{name: http, port: 80, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-fqdn
  namespace: demo
  labels: {{kubernetes.io/service-name: db}}
addressType: FQDN
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- addresses: [{NAME}]
"#
    )
}

/// Counts the SYNs that reach each of some addresses' port 8080 in the outside namespace: with
/// no client traffic, they are the agent's TCP probes.
struct SynCounter<'t> {
    topo: &'t Topology,
}

impl<'t> SynCounter<'t> {
    fn install(topo: &'t Topology, addrs: &[&str]) -> Self {
        let mut script = "nft add table inet xpsyns
             nft add chain inet xpsyns in '{ type filter hook prerouting priority -300; }'"
            .to_owned();
        for a in addrs {
            script += &format!(
                "\nnft add rule inet xpsyns in ip daddr {a} tcp dport 8080 \
                 'tcp flags & (syn|ack) == syn' counter"
            );
        }
        topo.ext.sh(&script);
        SynCounter { topo }
    }

    fn count(&self, addr: &str) -> u64 {
        let listing = self.topo.ext.sh("nft list chain inet xpsyns in");
        let line = listing
            .lines()
            .find(|l| l.contains(&format!("ip daddr {addr} ")))
            .unwrap_or_else(|| panic!("no counter for {addr}:\n{listing}"));
        let after = line.split("packets ").nth(1).expect("a packet count");
        after.split_whitespace().next().unwrap().parse().unwrap()
    }
}

/// `endpoint`'s health in `extproxy inspect --json`: None while it has no published verdict
/// (not health checked, or not an endpoint any more).
fn health_of(agent: &Agent, endpoint: &str) -> Option<String> {
    agent.inspect()["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == endpoint)
        .and_then(|e| e["health"].as_str().map(str::to_owned))
}

/// The `extproxy_endpoint_healthy` gauge of `endpoint` of Service demo/db, if listed.
fn healthy_gauge(node_ns: &str, endpoint: &str) -> Option<u8> {
    let prefix = format!(
        "extproxy_endpoint_healthy{{namespace=\"demo\",service=\"db\",endpoint=\"{endpoint}\"}} "
    );
    metrics_text(node_ns)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().parse().unwrap()))
}

/// Needs root. A Service with a TCP health check whose endpoints come from a DNS name: every
/// address the name answers is probed and judged on its own. One server stops: its address is
/// judged unhealthy by its probes (no client traffic in between) and new connections all go to
/// the other address; it comes back: new flows again. The answer changes: a new address is
/// probed (and, with nothing listening, judged unhealthy); an address that left the answer
/// loses its verdict, its gauge and its probes, whether it was healthy or unhealthy; a healthy
/// one that comes back is checked afresh, an unhealthy one (a dead address rotating back in)
/// keeps its verdict and gets no new flow.
#[test]
fn each_resolved_address_is_health_checked() {
    const E1: &str = "203.0.113.7:8080";
    const E2: &str = "203.0.113.8:8080";
    const E3: &str = "203.0.113.9:8080";
    let t = Topology::new("dnshc");
    let mut ep1 = Some(EchoServers::start(&t.ext.name, &[(EP1, 8080)]));
    let _ep2 = EchoServers::start(&t.ext.name, &[(EP2, 8080)]);
    // EP3 has no server: its address refuses.
    let syns = SynCounter::install(&t, &[EP1, EP2, EP3]);
    let dns = DnsServer::start(&t.ext.name, DNS);
    dns.set_addresses(NAME, &[EP1, EP2], 1);
    t.write_manifest("db.yaml", &checked_manifests());
    let agent = t.start_agent(&[
        "--dns-server",
        "10.0.0.254",
        "--dns-max-ttl",
        "2s",
        "--metrics-address",
        METRICS,
    ]);
    let node = t.node.name.clone();
    let probed = |addr: &str, what: &str| {
        let before = syns.count(addr);
        wait_until(what, &agent, || syns.count(addr) >= before + 2);
    };

    // Both addresses of the answer are checked: probed (with no client traffic yet), with a
    // verdict in inspect and a gauge.
    probed(EP1, "probes of the first resolved address");
    probed(EP2, "probes of the second resolved address");
    wait_until(
        "both resolved addresses healthy in inspect and metrics",
        &agent,
        || {
            health_of(&agent, E1).as_deref() == Some("healthy")
                && health_of(&agent, E2).as_deref() == Some("healthy")
                && healthy_gauge(&node, E1) == Some(1)
                && healthy_gauge(&node, E2) == Some(1)
        },
    );
    assert_eq!(
        syns.count(EP3),
        0,
        "an address outside the answer is not probed"
    );
    assert_eq!(
        reached(&t.pod.name, VIP, 20),
        BTreeSet::from([ip(EP1), ip(EP2)]),
        "new flows spread over both addresses"
    );

    // EP1's server stops. No client connection until the verdict: it is the probes' own.
    ep1.take();
    wait_until(
        "the stopped address judged unhealthy by its probes",
        &agent,
        || health_of(&agent, E1).as_deref() == Some("unhealthy: refused"),
    );
    agent.wait_for_log(
        &format!("endpoint {E1} of Service demo/db port \"http\" (TCP) is unhealthy: refused"),
        WAIT,
    );
    assert_eq!(health_of(&agent, E2).as_deref(), Some("healthy"));
    assert_eq!(healthy_gauge(&node, E1), Some(0));
    assert_eq!(
        reached(&t.pod.name, VIP, 20),
        BTreeSet::from([ip(EP2)]),
        "no new flow to the unhealthy address"
    );

    // It comes back: healthy again, new flows again.
    let _ep1 = EchoServers::start(&t.ext.name, &[(EP1, 8080)]);
    wait_until("the address back judged healthy", &agent, || {
        health_of(&agent, E1).is_some_and(|h| h.starts_with("healthy: check passed"))
    });
    wait_until("new flows to reach the recovered address", &agent, || {
        connect(&t.pod.name, VIP).ok() == Some(ip(EP1))
    });

    // The answer changes: EP1 (healthy) leaves, EP3 (nothing listening) joins.
    dns.set_addresses(NAME, &[EP2, EP3], 1);
    wait_until(
        "the new address probed and judged unhealthy",
        &agent,
        || health_of(&agent, E3).as_deref() == Some("unhealthy: refused"),
    );
    assert!(syns.count(EP3) >= 2, "the new address was probed");
    wait_until(
        "the departed address's verdict and gauge to go",
        &agent,
        || health_of(&agent, E1).is_none() && healthy_gauge(&node, E1).is_none(),
    );
    assert_eq!(healthy_gauge(&node, E3), Some(0));
    assert_eq!(
        reached(&t.pod.name, VIP, 20),
        BTreeSet::from([ip(EP2)]),
        "the departed address and the unhealthy new one get no new flow"
    );
    let departed = syns.count(EP1);
    // Three check intervals: a probe still running would have sent a SYN in that time.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        syns.count(EP1),
        departed,
        "an address that left the answer is not probed any more"
    );

    // EP3 leaves while unhealthy, EP1 comes back: EP3's verdict, gauge and probes go; EP1 is
    // checked afresh and gets new flows.
    dns.set_addresses(NAME, &[EP1, EP2], 1);
    wait_until(
        "the unhealthy departed address's verdict and gauge to go",
        &agent,
        || health_of(&agent, E3).is_none() && healthy_gauge(&node, E3).is_none(),
    );
    probed(EP1, "probes of the address back in the answer");
    wait_until(
        "the address back in the answer checked and healthy",
        &agent,
        || {
            health_of(&agent, E1).as_deref() == Some("healthy")
                && healthy_gauge(&node, E1) == Some(1)
        },
    );
    assert_eq!(
        reached(&t.pod.name, VIP, 20),
        BTreeSet::from([ip(EP1), ip(EP2)]),
        "new flows spread over both addresses again"
    );
    let departed = syns.count(EP3);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        syns.count(EP3),
        departed,
        "an unhealthy address that left the answer is not probed any more"
    );

    // EP3, still dead, rotates back in: its verdict was kept, so it gets no new flow (not even
    // before its first probe), and it is probed again.
    let state_of_e3 = || {
        agent.inspect()["services"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
            .find(|e| e["address"] == E3)
            .map(|e| e["state"].as_str().unwrap().to_owned())
    };
    // Its drained backend is gone from the maps first (no flow used it: the next sweep).
    wait_until("the departed address out of the maps", &agent, || {
        state_of_e3().is_none()
    });
    dns.set_addresses(NAME, &[EP1, EP2, EP3], 1);
    let mut first_seen = None;
    wait_until("the returning address programmed", &agent, || {
        first_seen = state_of_e3();
        first_seen.is_some()
    });
    assert_eq!(
        first_seen.as_deref(),
        Some("draining"),
        "a dead address back in the answer is programmed without new flows from the start"
    );
    assert_eq!(
        reached(&t.pod.name, VIP, 20),
        BTreeSet::from([ip(EP1), ip(EP2)]),
        "no new flow to a dead address that rotated back into the answer"
    );
    probed(EP3, "probes of the returning address");
    wait_until(
        "the returning address listed unhealthy again",
        &agent,
        || {
            health_of(&agent, E3).as_deref() == Some("unhealthy: refused")
                && healthy_gauge(&node, E3) == Some(0)
        },
    );
    assert!(
        !agent.log_text().contains(&format!(
            "endpoint {E3} of Service demo/db port \"http\" (TCP) is healthy"
        )),
        "the returning dead address was never taken for a healthy one"
    );
    agent.stop();
}
