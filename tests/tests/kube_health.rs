//! Health checking in Kubernetes mode, as root: a real etcd and kube-apiserver (extproxy-envtest)
//! in the node's namespace, the real agent, an endpoint whose server stops and comes back. Each
//! transition is an Event on the Service (Warning when unhealthy, Normal when healthy again) and
//! shows in /metrics. Skipped, saying so, without $EXTPROXY_K8S_BIN (`cargo xtask test` sets it).

use std::time::{Duration, Instant};

use extproxy_envtest::{ControlPlane, Options, binaries_or_skip};
use extproxy_tests::agent::*;
use extproxy_tests::kube::{NodeApi, meta};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

const METRICS: &str = "127.0.0.1:19465";
const WAIT: Duration = Duration::from_secs(40);

/// The agent's /metrics (inside the node's namespace).
fn metrics(node_ns: &str) -> String {
    use std::io::{Read, Write};
    in_netns(node_ns, || {
        let Ok(mut s) = std::net::TcpStream::connect(METRICS) else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}

/// (reason, type, note) of the Events about Service demo/web.
fn events(api: &NodeApi, cp: &ControlPlane) -> Vec<(String, String, String)> {
    api.run(|| async {
        let events: Api<Event> = Api::namespaced(cp.client().unwrap(), "demo");
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web"))
            .map(|e| {
                (
                    e.reason.unwrap_or_default(),
                    e.type_.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    })
}

fn wait_until(what: &str, agent: &Agent, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; agent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates namespace demo, Node node-a and Service demo/web (a tcp check at 1 s, thresholds
/// 2/2) with endpoints EP1 and EP2.
fn create_objects(api: &NodeApi, cp: &ControlPlane) {
    api.run(|| async {
        let client = cp.client().unwrap();
        let pp = PostParams::default();
        for ns in ["demo", "extproxy-system"] {
            Api::<Namespace>::all(client.clone())
                .create(
                    &pp,
                    &Namespace {
                        metadata: meta("", ns, &[]),
                        ..Namespace::default()
                    },
                )
                .await
                .unwrap();
        }
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
        let mut svc_meta = meta(
            "demo",
            "web",
            &[("service.kubernetes.io/service-proxy-name", "extproxy")],
        );
        svc_meta.annotations = Some(
            [
                ("extproxy.io/health-check", "tcp"),
                ("extproxy.io/health-check-interval", "1s"),
                ("extproxy.io/health-check-timeout", "500ms"),
                ("extproxy.io/health-check-unhealthy-threshold", "2"),
                ("extproxy.io/health-check-healthy-threshold", "2"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
        Api::<Service>::namespaced(client.clone(), "demo")
            .create(
                &pp,
                &Service {
                    metadata: svc_meta,
                    spec: Some(ServiceSpec {
                        cluster_ip: Some("10.96.0.10".into()),
                        ports: Some(vec![ServicePort {
                            name: Some("http".into()),
                            port: 80,
                            ..ServicePort::default()
                        }]),
                        ..ServiceSpec::default()
                    }),
                    ..Service::default()
                },
            )
            .await
            .unwrap();
        Api::<EndpointSlice>::namespaced(client, "demo")
            .create(
                &pp,
                &EndpointSlice {
                    metadata: meta("demo", "web-1", &[("kubernetes.io/service-name", "web")]),
                    address_type: "IPv4".into(),
                    ports: Some(vec![EndpointPort {
                        name: Some("http".into()),
                        port: Some(8080),
                        protocol: Some("TCP".into()),
                        ..EndpointPort::default()
                    }]),
                    endpoints: [EP1, EP2]
                        .iter()
                        .map(|a| Endpoint {
                            addresses: vec![(*a).into()],
                            ..Endpoint::default()
                        })
                        .collect(),
                },
            )
            .await
            .unwrap();
    });
}

fn start_control_plane(
    topo: &Topology,
    bins: &extproxy_envtest::Binaries,
) -> (ControlPlane, NodeApi) {
    let cp = ControlPlane::start(
        bins,
        Options {
            netns: Some(format!("/var/run/netns/{}", topo.node.name).into()),
            ..Options::default()
        },
    )
    .expect("etcd and kube-apiserver in the node's namespace");
    let api = NodeApi::new(&topo.node.name);
    (cp, api)
}

/// Needs root.
#[test]
fn health_transitions_are_events_on_the_service_and_metrics() {
    let Some(bins) = binaries_or_skip("health_transitions_are_events_on_the_service_and_metrics")
    else {
        return;
    };
    let topo = Topology::new("khealth");
    let mut ep1 = Some(EchoServers::start(&topo.ext.name, &[(EP1, 8080)]));
    let _ep2 = EchoServers::start(&topo.ext.name, &[(EP2, 8080)]);
    let (cp, api) = start_control_plane(&topo, &bins);
    create_objects(&api, &cp);

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
        ],
    );
    let node_ns = topo.node.name.clone();
    let gauge = "extproxy_endpoint_healthy{namespace=\"demo\",service=\"web\",endpoint=\"203.0.113.7:8080\"}";
    wait_until("the healthy gauge", &agent, || {
        metrics(&node_ns).contains(&format!("{gauge} 1"))
    });

    ep1.take();
    wait_until("an EndpointUnhealthy Event", &agent, || {
        events(&api, &cp)
            .iter()
            .any(|(reason, type_, note)| {
                reason == "EndpointUnhealthy"
                    && type_ == "Warning"
                    && note.contains("endpoint 203.0.113.7:8080 of Service demo/web port \"http\" (TCP) is unhealthy")
            })
    });
    let text = metrics(&node_ns);
    assert!(text.contains(&format!("{gauge} 0")), "{text}");
    assert!(
        text.contains("extproxy_endpoint_health_transitions_total{namespace=\"demo\",service=\"web\",endpoint=\"203.0.113.7:8080\",to=\"unhealthy\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("extproxy_health_probe_duration_seconds_count{check=\"tcp\"}"),
        "{text}"
    );
    // New flows go to EP2 only.
    for _ in 0..10 {
        assert_eq!(
            tcp_once(&topo.pod.name, None, "10.96.0.10", 80)
                .unwrap()
                .endpoint,
            EP2.parse::<std::net::IpAddr>().unwrap()
        );
    }

    let _ep1 = EchoServers::start(&topo.ext.name, &[(EP1, 8080)]);
    wait_until("an EndpointHealthy Event", &agent, || {
        events(&api, &cp).iter().any(|(reason, type_, note)| {
            reason == "EndpointHealthy" && type_ == "Normal" && note.contains("203.0.113.7:8080")
        })
    });
    assert!(metrics(&node_ns).contains(&format!("{gauge} 1")));
    agent.stop();
}

/// Needs root. A node not labelled as prober follows the verdicts a live prober published in its
/// Lease (without a probe of its own failing); labelled, it probes itself and publishes its own.
#[test]
fn followers_take_the_verdicts_probers_publish() {
    let Some(bins) = binaries_or_skip("followers_take_the_verdicts_probers_publish") else {
        return;
    };
    let topo = Topology::new("kprober");
    let _servers = EchoServers::start(&topo.ext.name, &[(EP1, 8080), (EP2, 8080)]);
    let (cp, api) = start_control_plane(&topo, &bins);
    create_objects(&api, &cp);
    // Another node, a prober, says EP1 is down (EP1 answers this node's probes fine).
    api.run(|| async {
        let leases: Api<Lease> = Api::namespaced(cp.client().unwrap(), "extproxy-system");
        let mut lease_meta = meta(
            "extproxy-system",
            "extproxy-health-node-b",
            &[("extproxy.io/health-verdicts", "true")],
        );
        lease_meta.annotations = Some(
            [(
                "extproxy.io/unhealthy".to_owned(),
                r#"{"demo/web":["203.0.113.7:8080/TCP"]}"#.to_owned(),
            )]
            .into(),
        );
        leases
            .create(
                &PostParams::default(),
                &Lease {
                    metadata: lease_meta,
                    spec: Some(LeaseSpec {
                        holder_identity: Some("node-b".into()),
                        lease_duration_seconds: Some(60),
                        renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                        ..LeaseSpec::default()
                    }),
                },
            )
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
            "--detach-on-exit",
        ],
    );
    agent.wait_for_log("following the verdicts the prober nodes publish", WAIT);
    agent.wait_for_log(
        "endpoint 203.0.113.7:8080 of Service demo/web port \"http\" (TCP) is unhealthy: probers say so",
        WAIT,
    );
    let ep2: std::net::IpAddr = EP2.parse().unwrap();
    wait_until("new flows on EP2 only", &agent, || {
        (0..10).all(|_| {
            tcp_once(&topo.pod.name, None, "10.96.0.10", 80).is_ok_and(|s| s.endpoint == ep2)
        })
    });

    // Labelled a prober: it probes by itself (EP1 answers) and publishes its own Lease.
    api.run(|| async {
        let nodes: Api<Node> = Api::all(cp.client().unwrap());
        let patch =
            serde_json::json!({"metadata": {"labels": {"extproxy.io/health-prober": "true"}}});
        nodes
            .patch("node-a", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    });
    agent.wait_for_log("no live prober node; this node probes by itself", WAIT);
    agent.wait_for_log(
        "endpoint 203.0.113.7:8080 of Service demo/web port \"http\" (TCP) is healthy",
        WAIT,
    );
    wait_until("node-a's own Lease", &agent, || {
        api.run(|| async {
            let leases: Api<Lease> = Api::namespaced(cp.client().unwrap(), "extproxy-system");
            leases
                .get_opt("extproxy-health-node-a")
                .await
                .unwrap()
                .is_some_and(|l| {
                    l.spec.and_then(|s| s.holder_identity).as_deref() == Some("node-a")
                        && l.metadata
                            .annotations
                            .and_then(|a| a.get("extproxy.io/unhealthy").cloned())
                            .as_deref()
                            == Some("{}")
                })
        })
    });
    agent.stop();
}
