//! Kubernetes mode end to end, as root: a real etcd and kube-apiserver (extproxy-envtest) inside
//! the node's network namespace, the real `extproxy` binary on the node reading them with a
//! kubeconfig, real traffic from the pod through the Service's cluster IP to the endpoints
//! outside, and the pinned kernel maps read back. Skipped, saying so, without $EXTPROXY_K8S_BIN
//! (`cargo xtask test` sets it).

use extproxy_tests::ip;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use extproxy::maps::DatapathMaps;
use extproxy::reconcile::MapState;
use extproxy_envtest::{ControlPlane, Options, binaries_or_skip};
use extproxy_tests::agent::*;
use extproxy_tests::kube::{NodeApi, meta};
use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::api::{Api, PostParams};
use proxy_common::BackendState;
use proxy_common::user::port_host;

const METRICS: &str = "127.0.0.1:19464";
const WEB_IP: &str = "10.96.0.10";
const STEADY_IP: &str = "10.96.0.20";
const NEW_IP: &str = "10.96.0.30";
const WAIT: Duration = Duration::from_secs(30);

/// A Service handed to extproxy, at a fixed cluster IP, port 80.
fn service(name: &str, cluster_ip: &str) -> Service {
    Service {
        metadata: meta(
            "demo",
            name,
            &[("service.kubernetes.io/service-proxy-name", "extproxy")],
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice(name: &str, service: &str, endpoints: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta("demo", name, &[("kubernetes.io/service-name", service)]),
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
        endpoints: endpoints
            .iter()
            .map(|a| Endpoint {
                addresses: vec![(*a).into()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                ..Endpoint::default()
            })
            .collect(),
    }
}

/// GET on the agent's health and metrics address (inside the node's namespace).
fn agent_http(node_ns: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    in_netns(node_ns, || {
        let mut s = std::net::TcpStream::connect(METRICS).expect("the agent's metrics address");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
}

/// The value of the metric line that starts with `prefix` (labels included).
fn metric(node_ns: &str, prefix: &str) -> u64 {
    let (_, text) = agent_http(node_ns, "/metrics");
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {prefix} in /metrics:\n{text}")) as u64
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

fn kernel_maps(topo: &Topology) -> MapState {
    let maps = DatapathMaps::from_pinned(&topo.pin_dir()).expect("the agent's pinned maps");
    MapState::from_snapshot(maps.snapshot().unwrap())
}

/// Everything the maps hold for the Service at `vip`:80: its frontend, service value, slots and
/// live backends (with their generations).
fn entries_of(state: &MapState, vip: &str) -> String {
    let Some((_, fe)) = state
        .frontends
        .iter()
        .find(|(k, _)| k.addr.to_ip() == ip(vip) && port_host(k.port) == 80)
    else {
        return String::new();
    };
    let id = fe.service_id;
    let backends: Vec<_> = state
        .backends
        .iter()
        .filter(|(_, b)| b.service_id == id && b.state != BackendState::Free as u8)
        .collect();
    format!(
        "{fe:?} {:?} {:?} {backends:?}",
        state.services.get(&id),
        state.slots_of(id).collect::<Vec<_>>()
    )
}

/// The endpoints the maps give new flows to, for the Service at `vip`:80.
fn active_endpoints(state: &MapState, vip: &str) -> BTreeSet<IpAddr> {
    let Some((_, fe)) = state
        .frontends
        .iter()
        .find(|(k, _)| k.addr.to_ip() == ip(vip) && port_host(k.port) == 80)
    else {
        return BTreeSet::new();
    };
    state
        .backends
        .values()
        .filter(|b| b.service_id == fe.service_id && b.state == BackendState::Active as u8)
        .map(|b| b.addr.to_ip())
        .collect()
}

/// The endpoints new connections from the pod to `vip`:80 reach, over `n` connections; each
/// must come from the node's address (SNAT).
fn reached(pod_ns: &str, vip: &str, n: usize) -> BTreeSet<IpAddr> {
    (0..n)
        .map(|_| {
            let seen = tcp_once(pod_ns, None, vip, 80)
                .unwrap_or_else(|e| panic!("connecting to {vip}:80: {e}"));
            assert_eq!(seen.peer_ip, ip(NODE), "SNAT to the node's address");
            seen.endpoint
        })
        .collect()
}

/// Needs root. The API server goes away: forwarding goes on with the last state (new and
/// established connections), /readyz says why, the metrics say so, the log says it once while
/// the agent retries with back-off. Objects change meanwhile (through another API server on the
/// same etcd); when the API server is back the agent converges, and an unchanged Service's
/// entries stay exactly as they were.
#[test]
fn kube_mode_forwards_through_an_api_outage_and_converges() {
    let Some(bins) = binaries_or_skip("kube_mode_forwards_through_an_api_outage_and_converges")
    else {
        return;
    };
    let topo = Topology::new("kapi");
    let _servers = EchoServers::start(&topo.ext.name, &[(EP1, 8080), (EP2, 8080), (EP3, 8080)]);
    // Declared after the topology: stopped before its namespaces are deleted.
    let mut cp = ControlPlane::start(
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
        let services: Api<Service> = Api::namespaced(client.clone(), "demo");
        let slices: Api<EndpointSlice> = Api::namespaced(client, "demo");
        services.create(&pp, &service("web", WEB_IP)).await.unwrap();
        slices
            .create(&pp, &slice("web-1", "web", &[EP1, EP2]))
            .await
            .unwrap();
        services
            .create(&pp, &service("steady", STEADY_IP))
            .await
            .unwrap();
        slices
            .create(&pp, &slice("steady-1", "steady", &[EP3]))
            .await
            .unwrap();
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
            // Kubernetes mode keeps the data path on exit by default; the test cleans up.
            "--detach-on-exit",
        ],
    );
    let node_ns = topo.node.name.clone();
    wait_until("/readyz ok", &agent, || {
        agent_http(&node_ns, "/readyz").0 == 200
    });
    let maps = kernel_maps(&topo);
    assert_eq!(
        active_endpoints(&maps, WEB_IP),
        BTreeSet::from([ip(EP1), ip(EP2)])
    );
    assert_eq!(
        active_endpoints(&maps, STEADY_IP),
        BTreeSet::from([ip(EP3)])
    );
    let steady_before = entries_of(&maps, STEADY_IP);
    assert!(reached(&topo.pod.name, WEB_IP, 12).is_subset(&BTreeSet::from([ip(EP1), ip(EP2)])));
    assert_eq!(
        reached(&topo.pod.name, STEADY_IP, 2),
        BTreeSet::from([ip(EP3)])
    );
    // A connection that lives through everything below.
    let mut established =
        TcpClient::connect(&topo.pod.name, None, STEADY_IP, 80, Duration::from_secs(3)).unwrap();
    assert_eq!(established.exchange("before").unwrap().endpoint, ip(EP3));

    // The outage.
    let down_at = Instant::now();
    cp.stop_apiserver();
    wait_until("/readyz to fail", &agent, || {
        agent_http(&node_ns, "/readyz").0 == 503
    });
    let (_, reason) = agent_http(&node_ns, "/readyz");
    assert!(
        reason.starts_with("API server unreachable for "),
        "{reason}"
    );
    assert!(
        reason
            .trim_end()
            .ends_with("forwarding with the last known state"),
        "{reason}"
    );
    assert_eq!(metric(&node_ns, "extproxy_ready "), 0);
    for resource in ["services", "endpointslices", "nodes"] {
        assert_eq!(
            metric(
                &node_ns,
                &format!("extproxy_api_connected{{resource=\"{resource}\"}}")
            ),
            0,
            "{resource}"
        );
    }
    // It keeps trying: three failed attempts per resource at least.
    wait_until("three failed attempts", &agent, || {
        metric(&node_ns, "extproxy_api_errors_total{resource=\"services\"}") >= 3
    });
    // Meanwhile everything forwards as before.
    assert!(reached(&topo.pod.name, WEB_IP, 6).is_subset(&BTreeSet::from([ip(EP1), ip(EP2)])));
    assert_eq!(established.exchange("during").unwrap().endpoint, ip(EP3));
    assert_eq!(entries_of(&kernel_maps(&topo), STEADY_IP), steady_before);

    // The cluster changes while this agent cannot see it: web loses EP1, a new Service comes.
    {
        let side = cp
            .side_apiserver()
            .expect("a second API server on the same etcd");
        api.run(|| async {
            let client = side.client().unwrap();
            let pp = PostParams::default();
            let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "demo");
            let mut web = slices.get("web-1").await.unwrap();
            web.endpoints.retain(|e| e.addresses[0] == EP2);
            slices.replace("web-1", &pp, &web).await.unwrap();
            Api::<Service>::namespaced(client, "demo")
                .create(&pp, &service("new", NEW_IP))
                .await
                .unwrap();
            slices
                .create(&pp, &slice("new-1", "new", &[EP1]))
                .await
                .unwrap();
        });
    }
    let errors = metric(&node_ns, "extproxy_api_errors_total{resource=\"services\"}");
    let outage = down_at.elapsed();
    // kube-rs backs off 0.8 s doubling (plus jitter) between attempts; a client without
    // back-off would have made hundreds by now.
    assert!(
        (errors as f64) <= outage.as_secs_f64() / 0.8 + 2.0,
        "{errors} failed attempts in {outage:?}: no back-off"
    );

    cp.start_apiserver().unwrap();
    wait_until("convergence", &agent, || {
        agent_http(&node_ns, "/readyz").0 == 200
            && active_endpoints(&kernel_maps(&topo), WEB_IP) == BTreeSet::from([ip(EP2)])
            && active_endpoints(&kernel_maps(&topo), NEW_IP) == BTreeSet::from([ip(EP1)])
    });
    assert_eq!(
        reached(&topo.pod.name, WEB_IP, 6),
        BTreeSet::from([ip(EP2)])
    );
    assert_eq!(
        reached(&topo.pod.name, NEW_IP, 2),
        BTreeSet::from([ip(EP1)])
    );
    assert_eq!(
        entries_of(&kernel_maps(&topo), STEADY_IP),
        steady_before,
        "the unchanged Service was not rewritten"
    );
    assert_eq!(established.exchange("after").unwrap().endpoint, ip(EP3));
    for resource in ["services", "endpointslices", "nodes"] {
        assert_eq!(
            metric(
                &node_ns,
                &format!("extproxy_api_connected{{resource=\"{resource}\"}}")
            ),
            1,
            "{resource}"
        );
    }
    assert_eq!(metric(&node_ns, "extproxy_ready "), 1);

    // The log told the story once, not once per retry.
    let log = agent.stop();
    assert_eq!(log.matches("lost the API server").count(), 1, "{log}");
    assert_eq!(log.matches("reachable again").count(), 1, "{log}");
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        // The message, without the timestamp.
        .map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest))
        .collect();
    let distinct: BTreeSet<&str> = warnings.iter().copied().collect();
    assert_eq!(
        warnings.len(),
        distinct.len(),
        "a warning repeated:\n{}",
        warnings.join("\n")
    );
    assert!(
        !log.contains("eof in poll"),
        "the client library's own reports of the broken watches:\n{log}"
    );
    drop(cp);
}
