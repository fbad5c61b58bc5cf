//! Kubernetes mode against a real kube-apiserver v1.36.2 and etcd (extproxy-envtest): the real
//! kube client, watchers, reflector stores, translation and reconciler, programming the
//! in-memory map model, which counts every map write. Each test starts a control plane of its
//! own (~3 s): the agent watches every namespace, so tests sharing a server would see each
//! other's Services. Skipped, saying so, without $EXTPROXY_K8S_BIN (`cargo xtask test` sets it).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use extproxy::kube::SourceConfig;
use extproxy::metrics::Telemetry;
use extproxy::reconcile::MapState;
use extproxy::translate::{Protocol, ServicePortKey};
use extproxy_envtest::{ControlPlane, Options, StaticUser, binaries_or_skip};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::{Api, Client};
use proxy_common::FrontendKind;
use support::cluster::{
    Ep, apply_deploy, claimed_service, create, create_namespace, create_node, delete, node, ready,
    replace, service, service_account_token, set_node_addresses, slice, source_from_kubeconfig,
    wait_until_authorized,
};
use support::view::{endpoints, eps, frontends, ids_touched, ip, key};
use support::{Background, Model, drive_until, drive_until_programmed, node_a};

/// A static user the agent runs as, so the audit log tells its requests from the test's.
const AGENT: &str = "agent";

fn start(test: &str) -> Option<ControlPlane> {
    let bins = binaries_or_skip(test)?;
    support::init_logs();
    Some(
        ControlPlane::start(
            &bins,
            Options {
                audit: true,
                users: vec![StaticUser {
                    name: AGENT.into(),
                    groups: vec!["system:masters".into()],
                }],
                ..Options::default()
            },
        )
        .expect("starting etcd and kube-apiserver"),
    )
}

fn tcp(ns: &str, name: &str, port: &str) -> ServicePortKey {
    key(ns, name, port, Protocol::Tcp)
}

fn cluster_ip(s: &Service) -> String {
    s.spec.as_ref().unwrap().cluster_ip.clone().unwrap()
}

fn node_port(s: &Service, index: usize) -> u16 {
    s.spec.as_ref().unwrap().ports.as_ref().unwrap()[index]
        .node_port
        .unwrap() as u16
}

const PG: (&str, i32, &str) = ("pg", 5432, "TCP");
const METRICS: (&str, i32, &str) = ("metrics", 9187, "UDP");

/// Claims, several slices of one Service merged, endpoint conditions, named ports, deletes and
/// Node address changes, each live change writing only the Service it concerns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_from_a_real_api_server() {
    let Some(cp) = start("live_changes_from_a_real_api_server") else {
        return;
    };
    let admin = cp.client().unwrap();
    create_namespace(&admin, "shop").await;
    create_node(
        &admin,
        &node(
            "node-a",
            &[
                ("InternalIP", "10.240.0.10"),
                ("ExternalIP", "198.51.100.10"),
            ],
        ),
    )
    .await;
    // Claimed: labelled, no selector. db has two slices and named ports on both protocols.
    let db = create(
        &admin,
        &claimed_service("shop", "db", "ClusterIP", &[PG, METRICS]),
    )
    .await;
    let slice_ports = [("pg", 15432, "TCP"), ("metrics", 9187, "UDP")];
    create(
        &admin,
        &slice("shop", "db-1", "db", &slice_ports, &[ready("203.0.113.7")]),
    )
    .await;
    create(
        &admin,
        &slice(
            "shop",
            "db-2",
            "db",
            &slice_ports,
            &[
                // Serving but terminating: keeps its flows, no new ones while one is ready.
                Ep {
                    addr: "203.0.113.8",
                    ready: false,
                    serving: true,
                    terminating: true,
                },
                // The same address in both slices counts once, with its best conditions.
                ready("203.0.113.7"),
            ],
        ),
    )
    .await;
    // web: NodePort with a port named `admin` that no endpoint port matches.
    let web = create(
        &admin,
        &claimed_service(
            "shop",
            "web",
            "NodePort",
            &[("http", 80, "TCP"), ("admin", 8081, "TCP")],
        ),
    )
    .await;
    create(
        &admin,
        &slice(
            "shop",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[ready("203.0.113.9")],
        ),
    )
    .await;
    // Left to kube-proxy: unlabelled, or labelled for another proxy.
    create(
        &admin,
        &service("shop", "legacy", &[], "ClusterIP", &[("tcp", 7000, "TCP")]),
    )
    .await;
    create(
        &admin,
        &slice(
            "shop",
            "legacy-1",
            "legacy",
            &[("tcp", 7000, "TCP")],
            &[ready("203.0.113.20")],
        ),
    )
    .await;
    create(
        &admin,
        &service(
            "shop",
            "other-proxy",
            &[("service.kubernetes.io/service-proxy-name", "other")],
            "ClusterIP",
            &[("tcp", 7001, "TCP")],
        ),
    )
    .await;

    let telemetry = Telemetry::new(Duration::from_secs(60));
    let mut source = source_from_kubeconfig(&cp.kubeconfig_for(AGENT), &telemetry, node_a()).await;
    let mut m = Model::new();
    drive_until_programmed(&mut source, &mut m, &telemetry, "the initial sync").await;
    assert_eq!(telemetry.readiness(), Ok(()));
    let claimed: Vec<String> = m
        .last
        .as_ref()
        .unwrap()
        .claimed
        .iter()
        .map(|c| c.service.to_string())
        .collect();
    assert_eq!(claimed, vec!["shop/db", "shop/web"]);
    let node_facts = m.node.clone().unwrap();
    assert_eq!(node_facts.egress, vec![ip("10.240.0.10")]);
    assert_eq!(
        node_facts.node_ports,
        vec![ip("10.240.0.10"), ip("198.51.100.10")]
    );
    assert_eq!(
        endpoints(&m, &tcp("shop", "db", "pg")),
        eps(&[
            ("203.0.113.7", 15432, "active"),
            ("203.0.113.8", 15432, "draining"),
        ]),
        "both slices merged, by name and protocol"
    );
    assert_eq!(
        endpoints(&m, &key("shop", "db", "metrics", Protocol::Udp)),
        eps(&[
            ("203.0.113.7", 9187, "active"),
            ("203.0.113.8", 9187, "draining"),
        ])
    );
    let web_ip = cluster_ip(&web);
    assert_eq!(
        frontends(&m, &tcp("shop", "web", "http")),
        vec![
            (ip(&web_ip), 80, FrontendKind::ClusterIp, false),
            (
                ip("10.240.0.10"),
                node_port(&web, 0),
                FrontendKind::NodePort,
                false
            ),
            (
                ip("198.51.100.10"),
                node_port(&web, 0),
                FrontendKind::NodePort,
                false
            ),
        ],
        "the cluster IP and node ports the API server allocated"
    );
    assert_eq!(
        endpoints(&m, &tcp("shop", "web", "http")),
        eps(&[("203.0.113.9", 8080, "active")])
    );
    assert_eq!(
        endpoints(&m, &tcp("shop", "web", "admin")),
        eps(&[]),
        "no endpoint port is named admin"
    );
    assert_eq!(
        frontends(&m, &tcp("shop", "db", "pg")),
        vec![(ip(&cluster_ip(&db)), 5432, FrontendKind::ClusterIp, false)]
    );

    // Each live change: converge, and write only the Service it concerns.
    let db_ids: BTreeSet<u32> = [
        tcp("shop", "db", "pg"),
        key("shop", "db", "metrics", Protocol::Udp),
    ]
    .iter()
    .map(|k| m.reconciler.service_id(k).unwrap())
    .collect();

    // 1. The terminating endpoint is ready again.
    let before = m.state().clone();
    let rounds = m.rounds.len();
    replace(
        &admin,
        &slice(
            "shop",
            "db-2",
            "db",
            &slice_ports,
            &[ready("203.0.113.8"), ready("203.0.113.7")],
        ),
    )
    .await;
    drive_until(
        &mut source,
        &mut m,
        &telemetry,
        "203.0.113.8 active",
        |m, _| {
            endpoints(m, &tcp("shop", "db", "pg")).get(&(ip("203.0.113.8"), 15432))
                == Some(&"active")
        },
    )
    .await;
    assert_eq!(ids_touched(&m.rounds[rounds..], &before), db_ids);

    // 2. A slice is deleted: its endpoints go unless another slice has them.
    let before = m.state().clone();
    let rounds = m.rounds.len();
    delete::<EndpointSlice>(&admin, "shop", "db-2").await;
    drive_until(&mut source, &mut m, &telemetry, "db-2 gone", |m, _| {
        endpoints(m, &tcp("shop", "db", "pg")).len() == 1
    })
    .await;
    assert_eq!(
        endpoints(&m, &tcp("shop", "db", "pg")),
        eps(&[("203.0.113.7", 15432, "active")]),
        "203.0.113.7 stays: db-1 has it too"
    );
    assert_eq!(ids_touched(&m.rounds[rounds..], &before), db_ids);

    // 3. legacy is labelled: claimed now, nothing else written.
    let before = m.state().clone();
    let rounds = m.rounds.len();
    replace(
        &admin,
        &claimed_service("shop", "legacy", "ClusterIP", &[("tcp", 7000, "TCP")]),
    )
    .await;
    drive_until(&mut source, &mut m, &telemetry, "legacy claimed", |m, _| {
        m.reconciler
            .service_id(&tcp("shop", "legacy", "tcp"))
            .is_some()
    })
    .await;
    let legacy_id = m
        .reconciler
        .service_id(&tcp("shop", "legacy", "tcp"))
        .unwrap();
    assert_eq!(
        endpoints(&m, &tcp("shop", "legacy", "tcp")),
        eps(&[("203.0.113.20", 7000, "active")])
    );
    assert_eq!(
        ids_touched(&m.rounds[rounds..], &before),
        BTreeSet::from([legacy_id])
    );

    // 4. The Node's addresses change: NodePorts and the egress address follow.
    set_node_addresses(&admin, "node-a", &[("InternalIP", "10.240.0.20")]).await;
    drive_until(
        &mut source,
        &mut m,
        &telemetry,
        "the new InternalIP",
        |m, _| {
            m.node
                .as_ref()
                .is_some_and(|n| n.egress == vec![ip("10.240.0.20")])
        },
    )
    .await;
    assert_eq!(
        frontends(&m, &tcp("shop", "web", "http")),
        vec![
            (ip(&web_ip), 80, FrontendKind::ClusterIp, false),
            (
                ip("10.240.0.20"),
                node_port(&web, 0),
                FrontendKind::NodePort,
                false
            ),
        ]
    );
    let db_id = m.reconciler.service_id(&tcp("shop", "db", "pg")).unwrap();
    assert_eq!(m.state().services[&db_id].egress.to_ip(), ip("10.240.0.20"));

    // 5. web is deleted: its frontends and endpoints go, nothing else is written.
    let web_ids: BTreeSet<u32> = [tcp("shop", "web", "http"), tcp("shop", "web", "admin")]
        .iter()
        .map(|k| m.reconciler.service_id(k).unwrap())
        .collect();
    let before = m.state().clone();
    let rounds = m.rounds.len();
    delete::<Service>(&admin, "shop", "web").await;
    drive_until(&mut source, &mut m, &telemetry, "web gone", |m, _| {
        m.reconciler
            .service_id(&tcp("shop", "web", "http"))
            .is_none()
    })
    .await;
    assert!(frontends(&m, &tcp("shop", "web", "http")).is_empty());
    assert!(
        m.state()
            .frontends
            .values()
            .all(|f| !web_ids.contains(&f.service_id)),
        "no frontend of web is left"
    );
    assert_eq!(ids_touched(&m.rounds[rounds..], &before), web_ids);
    assert_no_forbidden_requests(&cp, AGENT);
}

/// No request of `user` was refused (a 403 would mean the agent asks for more than it needs, or
/// the RBAC grants less).
fn assert_no_forbidden_requests(cp: &ControlPlane, user: &str) {
    let audit = cp.audit().unwrap();
    let refused: Vec<String> = audit
        .iter()
        .filter(|e| e.user.username == user && matches!(e.code(), 401 | 403))
        .map(|e| e.summary())
        .collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
}

/// The API server's list requests of `user` for `resource`, once there are `expected` (the
/// audit line is written just after the response, so it may trail the client by a moment), or
/// as many as there are after a few seconds.
async fn lists(cp: &ControlPlane, user: &str, resource: &str, expected: usize) -> usize {
    let count = || {
        cp.audit()
            .unwrap()
            .iter()
            .filter(|e| e.user.username == user && e.verb == "list" && e.resource() == resource)
            .count()
    };
    for _ in 0..50 {
        if count() == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    count()
}

fn bulk_service(i: usize) -> (Service, EndpointSlice) {
    let name = format!("svc-{i}");
    (
        claimed_service("bulk", &name, "ClusterIP", &[("http", 80, "TCP")]),
        slice(
            "bulk",
            &format!("{name}-1"),
            &name,
            &[("http", 8080, "TCP")],
            &[ready(&format!("203.0.113.{}", 10 + i))],
        ),
    )
}

async fn create_bulk(client: &Client, i: usize) {
    let (svc, sl) = bulk_service(i);
    create(client, &svc).await;
    create(client, &sl).await;
}

/// The agent's watches break (the API server dies), the cluster changes meanwhile through
/// another API server on the same etcd, and etcd's history is compacted: the watches resume
/// from a version that is gone (410 Gone), the agent relists, converges, and writes only the
/// Services that changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_watch_relists_and_writes_only_what_changed() {
    let Some(mut cp) = start("an_expired_watch_relists_and_writes_only_what_changed") else {
        return;
    };
    let admin = cp.client().unwrap();
    create_namespace(&admin, "bulk").await;
    create_node(&admin, &node("node-a", &[("InternalIP", "10.240.0.10")])).await;
    for i in 0..12 {
        create_bulk(&admin, i).await;
    }
    let telemetry = Telemetry::new(Duration::from_secs(60));
    let mut source = source_from_kubeconfig(&cp.kubeconfig_for(AGENT), &telemetry, node_a()).await;
    let settle = Duration::from_secs(1);
    source.set_event_settle(settle);
    let mut m = Model::new();
    drive_until(
        &mut source,
        &mut m,
        &telemetry,
        "the initial sync",
        |m, _| m.state().services.len() == 12,
    )
    .await;
    let svc = |i: usize| tcp("bulk", &format!("svc-{i}"), "http");
    let before = m.state().clone();
    let id = |m: &Model<MapState>, i: usize| m.reconciler.service_id(&svc(i)).unwrap();
    let (id3, id7, id9) = (id(&m, 3), id(&m, 7), id(&m, 9));
    for resource in ["services", "endpointslices", "nodes"] {
        assert_eq!(
            lists(&cp, AGENT, resource, 1).await,
            1,
            "{resource}: one initial list"
        );
    }

    cp.stop_apiserver();
    drive_until(
        &mut source,
        &mut m,
        &telemetry,
        "the outage noticed",
        |_, t| t.readiness().is_err(),
    )
    .await;
    {
        let side = cp.side_apiserver().unwrap();
        let other = side.client().unwrap();
        // svc-3 gets a second endpoint; svc-7 goes; svc-12 comes; svc-9 changes in a way
        // that does not concern the data path (an annotation).
        replace(
            &other,
            &slice(
                "bulk",
                "svc-3-1",
                "svc-3",
                &[("http", 8080, "TCP")],
                &[ready("203.0.113.13"), ready("203.0.113.99")],
            ),
        )
        .await;
        delete::<Service>(&other, "bulk", "svc-7").await;
        delete::<EndpointSlice>(&other, "bulk", "svc-7-1").await;
        create_bulk(&other, 12).await;
        let (mut svc9, _) = bulk_service(9);
        svc9.metadata.annotations = Some([("note".to_owned(), "unrelated".to_owned())].into());
        replace(&other, &svc9).await;
    }
    // The history the agent's watches would resume from is gone.
    cp.compact_now().unwrap();
    cp.start_apiserver().unwrap();
    drive_until(&mut source, &mut m, &telemetry, "convergence", |m, t| {
        t.readiness().is_ok()
            && m.reconciler.service_id(&svc(12)).is_some()
            && m.reconciler.service_id(&svc(7)).is_none()
            && endpoints(m, &svc(3)).len() == 2
    })
    .await;
    let id12 = id(&m, 12);
    // Round 0 was the initial sync; everything after it came from the relist.
    let touched_after_sync = ids_touched(&m.rounds[1..], &before);
    assert_eq!(
        touched_after_sync,
        BTreeSet::from([id3, id7, id12]),
        "svc-9's annotation and the other Services wrote nothing"
    );
    assert!(!touched_after_sync.contains(&id9));
    assert_eq!(
        endpoints(&m, &svc(3)),
        eps(&[
            ("203.0.113.13", 8080, "active"),
            ("203.0.113.99", 8080, "active")
        ])
    );
    for i in (0..12).filter(|i| ![3, 7].contains(i)) {
        assert_eq!(
            m.state().services.get(&id(&m, i)),
            before.services.get(&id(&m, i)),
            "svc-{i}"
        );
    }
    // The Services were relisted before the EndpointSlices: for a moment svc-12 had no
    // endpoints. That passing state must not become a Warning Event on it.
    support::drive_for(&mut source, &mut m, settle * 3).await;
    assert_eq!(
        event_requests(&cp, AGENT, "create"),
        Vec::<u16>::new(),
        "no Event for a problem that lasted less than the settle time"
    );
    // The watches could not resume: every resource was listed again.
    for resource in ["services", "endpointslices", "nodes"] {
        assert_eq!(
            lists(&cp, AGENT, resource, 2).await,
            2,
            "{resource}: relisted once"
        );
    }
    assert_no_forbidden_requests(&cp, AGENT);
}

const SA_USER: &str = "system:serviceaccount:extproxy-system:extproxy";

/// extproxy's `events.k8s.io` Events in `namespace`, by reason. The API server's own (its ClusterIP repair loop
/// once reported `ClusterIPNotAllocated` for a Service it had not finished allocating) are not
/// ours to count.
async fn events_by_reason(
    client: &Client,
    namespace: &str,
) -> std::collections::BTreeMap<String, Vec<K8sEvent>> {
    let mut out = std::collections::BTreeMap::<String, Vec<K8sEvent>>::new();
    for e in Api::<K8sEvent>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("extproxy"))
    {
        out.entry(e.reason.clone().unwrap_or_default())
            .or_default()
            .push(e);
    }
    out
}

/// Audit entries of `user` for Events with `verb` (and any code).
fn event_requests(cp: &ControlPlane, user: &str, verb: &str) -> Vec<u16> {
    cp.audit()
        .unwrap()
        .iter()
        .filter(|e| e.user.username == user && e.verb == verb && e.resource() == "events")
        .map(|e| e.code())
        .collect()
}

/// Polls (up to [`support::WAIT`]) until `done` holds.
async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The agent runs as the ServiceAccount of deploy/, bound by deploy/'s ClusterRole and nothing
/// else: none of its requests is refused. Two agents (two nodes) publish one Event per problem;
/// a problem that goes away and comes back is counted once more in that Event's series, not
/// once per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_rbac_suffices_and_events_count_episodes_not_nodes() {
    let Some(cp) = start("deploy_rbac_suffices_and_events_count_episodes_not_nodes") else {
        return;
    };
    let admin = cp.client().unwrap();
    apply_deploy(&admin).await;
    wait_until_authorized(
        &admin,
        SA_USER,
        &[
            ("list", "", "services"),
            ("watch", "discovery.k8s.io", "endpointslices"),
            ("watch", "", "nodes"),
            ("create", "events.k8s.io", "events"),
            ("update", "events.k8s.io", "events"),
        ],
    )
    .await;
    let token = service_account_token(&admin, "extproxy-system", "extproxy").await;
    let kubeconfig = cp.write_kubeconfig("extproxy-sa", &token).unwrap();
    create_namespace(&admin, "shop").await;
    for (name, addr) in [("node-a", "10.240.0.10"), ("node-b", "10.240.0.11")] {
        create_node(&admin, &node(name, &[("InternalIP", addr)])).await;
    }
    // Two problems users must fix: no endpoints at all, and a port no endpoint port matches.
    create(
        &admin,
        &claimed_service("shop", "empty", "ClusterIP", &[PG]),
    )
    .await;
    create(
        &admin,
        &claimed_service(
            "shop",
            "web",
            "ClusterIP",
            &[("http", 80, "TCP"), ("admin", 8081, "TCP")],
        ),
    )
    .await;
    create(
        &admin,
        &slice(
            "shop",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[ready("203.0.113.9")],
        ),
    )
    .await;

    let gap = Duration::from_secs(3);
    let start_agent = async |node_name: &str| {
        let telemetry = Telemetry::new(Duration::from_secs(60));
        let mut source = source_from_kubeconfig(
            &kubeconfig,
            &telemetry,
            SourceConfig {
                node_name: node_name.into(),
                ..node_a()
            },
        )
        .await;
        source.set_event_episode_gap(gap);
        source.set_event_settle(Duration::from_millis(500));
        Background::start(source, telemetry)
    };
    let a = start_agent("node-a").await;
    a.wait_for("node-a's initial sync", |m, t| {
        !m.rounds.is_empty() && t.readiness().is_ok()
    })
    .await;
    // Both reasons, then exactly one Event each: waiting for "two Events" alone once caught two
    // of which neither was NoEndpoints (and said nothing more).
    let events = eventually("the NoEndpoints and PortNameMismatch Events", async || {
        let e = events_by_reason(&admin, "shop").await;
        (e.contains_key("NoEndpoints") && e.contains_key("PortNameMismatch")).then_some(e)
    })
    .await;
    assert_eq!(
        events.values().map(Vec::len).sum::<usize>(),
        2,
        "one Event per problem: {events:#?}"
    );
    let no_endpoints = &events["NoEndpoints"][0];
    assert_eq!(no_endpoints.type_.as_deref(), Some("Warning"));
    assert_eq!(
        no_endpoints.note.as_deref(),
        Some("Service shop/empty: no endpoints: connections will be refused")
    );
    let regarding = no_endpoints.regarding.as_ref().unwrap();
    assert_eq!(
        (regarding.kind.as_deref(), regarding.name.as_deref()),
        (Some("Service"), Some("empty"))
    );
    assert_eq!(
        no_endpoints.reporting_controller.as_deref(),
        Some("extproxy")
    );
    assert_eq!(
        no_endpoints.reporting_instance.as_deref(),
        Some("extproxy-node-a")
    );
    assert_eq!(no_endpoints.series, None, "one occurrence so far");
    let mismatch = &events["PortNameMismatch"][0];
    assert!(
        mismatch
            .note
            .as_deref()
            .unwrap()
            .contains("port \"admin\" matches no endpoint port"),
        "{mismatch:?}"
    );

    // A second node sees the same problems: its creates meet the existing Events (409) and, at
    // its start, it counts nothing (it did not see them begin).
    let b = start_agent("node-b").await;
    b.wait_for("node-b's initial sync", |m, t| {
        !m.rounds.is_empty() && t.readiness().is_ok()
    })
    .await;
    let creates = eventually("node-b's two creates", async || {
        let codes = event_requests(&cp, SA_USER, "create");
        (codes.len() == 4).then_some(codes)
    })
    .await;
    assert_eq!(
        creates.iter().filter(|c| **c == 409).count(),
        2,
        "{creates:?}"
    );
    assert!(event_requests(&cp, SA_USER, "update").is_empty());
    let events = events_by_reason(&admin, "shop").await;
    assert_eq!(events.values().map(Vec::len).sum::<usize>(), 2);

    // The problem goes away on both nodes, and comes back after the episode gap: both agents
    // report it, one counts it, the other finds it counted.
    create(
        &admin,
        &slice(
            "shop",
            "empty-1",
            "empty",
            &[("pg", 5432, "TCP")],
            &[ready("203.0.113.5")],
        ),
    )
    .await;
    for agent in [&a, &b] {
        agent
            .wait_for("shop/empty's endpoint", |m, _| {
                !endpoints(m, &tcp("shop", "empty", "pg")).is_empty()
            })
            .await;
    }
    tokio::time::sleep(gap + Duration::from_millis(500)).await;
    let gets_before = event_requests(&cp, SA_USER, "get").len();
    delete::<EndpointSlice>(&admin, "shop", "empty-1").await;
    // Both look at the Event (one may look twice: its update lost to the other's), one
    // updates it; then the requests stop.
    let mut last = None;
    eventually("both agents done with the Event", async || {
        assert_no_forbidden_requests(&cp, SA_USER);
        let seen = (
            event_requests(&cp, SA_USER, "create"),
            event_requests(&cp, SA_USER, "get"),
            event_requests(&cp, SA_USER, "update"),
        );
        let done = seen.1.len() >= gets_before + 2
            && seen.2.contains(&200)
            && last.as_ref() == Some(&seen);
        last = Some(seen);
        done.then_some(())
    })
    .await;
    let gets = event_requests(&cp, SA_USER, "get");
    assert!(gets.iter().all(|c| *c == 200), "{gets:?}");
    let updates = event_requests(&cp, SA_USER, "update");
    assert_eq!(
        updates.iter().filter(|c| **c == 200).count(),
        1,
        "one agent counts the episode: {updates:?}"
    );
    let events = events_by_reason(&admin, "shop").await;
    assert_eq!(
        events.values().map(Vec::len).sum::<usize>(),
        2,
        "still one Event per problem"
    );
    let series = events["NoEndpoints"][0].series.clone().expect("a series");
    assert_eq!(series.count, 2, "two episodes, however many nodes saw them");
    assert!(events["PortNameMismatch"][0].series.is_none());

    // Nothing the agents asked for was refused, and they used every verb deploy/ grants.
    assert_no_forbidden_requests(&cp, SA_USER);
    let audit = cp.audit().unwrap();
    for (verb, resource) in [
        ("list", "services"),
        ("watch", "services"),
        ("list", "endpointslices"),
        ("watch", "endpointslices"),
        ("list", "nodes"),
        ("watch", "nodes"),
        ("create", "events"),
        ("get", "events"),
        ("update", "events"),
    ] {
        assert!(
            audit
                .iter()
                .any(|e| e.user.username == SA_USER && e.verb == verb && e.resource() == resource),
            "no {verb} {resource}"
        );
    }
    for agent in [&a, &b] {
        assert_eq!(agent.telemetry.readiness(), Ok(()));
        assert_eq!(
            support::metric_lines(&agent.telemetry, "extproxy_kube_event_errors_total"),
            vec!["extproxy_kube_event_errors_total 0"]
        );
    }
}
