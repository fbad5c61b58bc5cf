//! The Kubernetes source end to end against responses recorded from a real kube-apiserver
//! v1.36.2 (tests/fixtures/k8s-api): the real kube client, watchers, reflector stores,
//! translation and reconciler, programming the in-memory map model.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use extproxy::kube::{NodeOverrides, SourceConfig};
use extproxy::metrics::Telemetry;
use extproxy::reconcile::{MapOp, MapWriter, Reconciler};
use extproxy::translate::{Protocol, ServicePortKey};
use proxy_common::FrontendKind;
use serde_json::json;
use support::view::{endpoints, eps, frontends, ids_touched, ip, key, snapshot_of, source_ranges};
use support::{
    FakeApi, LIMITS, Model, drive_for, drive_until, drive_until_programmed, metric_lines, node_a,
    start_source,
};

fn proxy_service() -> ServicePortKey {
    key("proxy-test", "proxy-service", "http", Protocol::Tcp)
}

fn myapp() -> ServicePortKey {
    key("default", "myapp-proxy", "", Protocol::Tcp)
}

fn legacy_pg() -> ServicePortKey {
    key("shop", "legacy-db", "pg", Protocol::Tcp)
}

fn legacy_metrics() -> ServicePortKey {
    key("shop", "legacy-db", "metrics", Protocol::Udp)
}

fn final_state_reached<W: MapWriter>(m: &Model<W>) -> bool {
    endpoints(m, &proxy_service())
        == eps(&[
            ("10.240.0.131", 80, "active"),
            ("10.240.0.132", 80, "active"),
        ])
        && endpoints(m, &myapp()).len() == 2
        && m.reconciler.service_id(&legacy_pg()).is_none()
}

/// After the recorded list (resourceVersion 245), then after each recorded watch event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_lists_and_watch_events_program_the_maps() {
    let api = FakeApi::recorded().await;
    let telemetry = Telemetry::new(Duration::from_secs(60));
    let mut source = start_source(&api, &telemetry, node_a());
    let mut m = Model::new();

    drive_until_programmed(&mut source, &mut m, &telemetry, "the initial sync").await;
    assert_eq!(telemetry.readiness(), Ok(()));
    let facts = m.node.clone().unwrap();
    assert_eq!(
        facts.egress,
        vec![ip("10.240.0.10")],
        "egress is the Node's InternalIP"
    );
    assert_eq!(
        facts.node_ports,
        vec![ip("10.240.0.10"), ip("198.51.100.10")]
    );
    // Claimed: the two labelled Services. legacy-db (unlabelled), web (selector), kubernetes
    // and the ExternalName are left to kube-proxy.
    let t = m.last.clone().unwrap();
    let claimed: Vec<String> = t.claimed.iter().map(|c| c.service.to_string()).collect();
    assert_eq!(
        claimed,
        vec!["default/myapp-proxy", "proxy-test/proxy-service"]
    );
    assert_eq!(
        endpoints(&m, &proxy_service()),
        eps(&[
            ("10.240.0.129", 80, "active"),
            // ready: false, serving, terminating: keeps its flows, gets no new ones.
            ("10.240.0.130", 80, "draining"),
            ("10.240.0.131", 80, "active"),
        ]),
        "the two slices of proxy-service are merged"
    );
    assert_eq!(
        frontends(&m, &proxy_service()),
        vec![(ip("10.96.85.182"), 80, FrontendKind::ClusterIp, false)]
    );
    // Endpoints object -> mirrored slice myapp-proxy-ql4sn.
    assert_eq!(endpoints(&m, &myapp()), eps(&[("2.3.4.5", 8080, "active")]));
    assert_eq!(
        frontends(&m, &myapp()),
        vec![
            (ip("10.96.12.14"), 80, FrontendKind::ClusterIp, false),
            (ip("10.240.0.10"), 32518, FrontendKind::NodePort, false),
            (ip("20.50.60.70"), 80, FrontendKind::LoadBalancer, true),
            (ip("198.51.100.10"), 32518, FrontendKind::NodePort, false),
        ]
    );
    assert_eq!(source_ranges(&m, &myapp()), vec!["1.2.3.4/32"]);
    let myapp_id = m.reconciler.service_id(&myapp()).unwrap();
    let svc = m.state().services[&myapp_id];
    assert_eq!(svc.affinity_timeout, 600);
    assert_eq!(svc.egress.to_ip(), ip("10.240.0.10"));
    let requests = api.requests();
    for expected in [
        "GET /api/v1/services?&limit=500",
        "GET /apis/discovery.k8s.io/v1/endpointslices?&limit=500",
        "GET /api/v1/nodes?&fieldSelector=metadata.name%3Dnode-a&limit=500",
    ] {
        assert!(
            requests.iter().any(|r| r == expected),
            "{expected} not in {requests:#?}"
        );
    }

    // 1. An endpoint is added to proxy-service-def34.
    api.release_through(246);
    let proxy_id = m.reconciler.service_id(&proxy_service()).unwrap();
    let before = m.rounds.len();
    let before_state = m.state().clone();
    drive_until(&mut source, &mut m, &telemetry, "10.240.0.132", |m, _| {
        endpoints(m, &proxy_service()).contains_key(&(ip("10.240.0.132"), 80))
    })
    .await;
    let touched = ids_touched(&m.rounds[before..], &before_state);
    assert_eq!(
        touched,
        BTreeSet::from([proxy_id]),
        "only proxy-service is written"
    );

    // 2. myapp-proxy's source ranges change.
    api.release_through(247);
    let before = m.rounds.len();
    drive_until(
        &mut source,
        &mut m,
        &telemetry,
        "the new source range",
        |m, _| source_ranges(m, &myapp()).len() == 2,
    )
    .await;
    assert_eq!(
        source_ranges(&m, &myapp()),
        vec!["1.2.3.4/32", "5.6.7.0/24"]
    );
    let ops: Vec<MapOp> = m.rounds[before..].concat();
    assert!(
        ops.iter().all(|op| matches!(op, MapOp::PutSrcRange(_))),
        "only the range is added: {ops:?}"
    );

    // 3. The legacy Endpoints object gets a second address; it arrives as the mirrored slice.
    api.release_through(249);
    drive_until(&mut source, &mut m, &telemetry, "2.3.4.6", |m, _| {
        endpoints(m, &myapp()).len() == 2
    })
    .await;
    assert_eq!(
        endpoints(&m, &myapp()),
        eps(&[("2.3.4.5", 8080, "active"), ("2.3.4.6", 8080, "active")])
    );

    // 4. shop/legacy-db is labelled: now claimed, with its named ports.
    api.release_through(250);
    drive_until(
        &mut source,
        &mut m,
        &telemetry,
        "legacy-db claimed",
        |m, _| m.reconciler.service_id(&legacy_pg()).is_some(),
    )
    .await;
    assert_eq!(
        endpoints(&m, &legacy_pg()),
        eps(&[("203.0.113.7", 15432, "active")])
    );
    assert_eq!(
        endpoints(&m, &legacy_metrics()),
        eps(&[("203.0.113.7", 9187, "active")])
    );
    assert_eq!(
        frontends(&m, &legacy_pg()),
        vec![
            (ip("10.96.10.242"), 5432, FrontendKind::ClusterIp, false),
            (ip("10.240.0.10"), 31732, FrontendKind::NodePort, false),
            (ip("192.0.2.10"), 5432, FrontendKind::ExternalIp, false),
            (ip("198.51.100.10"), 31732, FrontendKind::NodePort, false),
        ]
    );

    // 5. Slice proxy-service-abc12 is deleted: its endpoints go, def34's stay.
    api.release_through(251);
    drive_until(&mut source, &mut m, &telemetry, "abc12 gone", |m, _| {
        endpoints(m, &proxy_service()).len() == 2
    })
    .await;

    // 6. Service legacy-db is deleted, then a bookmark.
    api.release_through(252);
    drive_until(&mut source, &mut m, &telemetry, "legacy-db gone", |m, _| {
        final_state_reached(m)
    })
    .await;
    assert_eq!(m.reconciler.service_id(&legacy_metrics()), None);

    // The Node's address changes (an event made from the recorded Node): NodePorts and egress
    // follow.
    let mut node = api.object("nodes", "", "node-a");
    node["metadata"]["resourceVersion"] = json!("300");
    node["status"]["addresses"][0]["address"] = json!("10.240.0.20");
    api.push_event("nodes", "MODIFIED", node);
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
    assert!(frontends(&m, &myapp()).contains(&(
        ip("10.240.0.20"),
        32518,
        FrontendKind::NodePort,
        false
    )));
    assert_eq!(
        m.state().services[&myapp_id].egress.to_ip(),
        ip("10.240.0.20")
    );

    let requests = api.requests();
    for resource in [
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET {resource}?&watch=true"))
                    && r.contains("resourceVersion=245")),
            "watches start from the list's version: {requests:#?}"
        );
    }

    // Every live change was timed from its arrival to the maps.
    let count = metric_lines(
        &telemetry,
        "extproxy_network_programming_duration_seconds_count",
    );
    let n: u64 = count[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 7, "{count:?}");
    assert_eq!(
        metric_lines(&telemetry, "extproxy_objects{kind=\"Service\"}"),
        vec!["extproxy_objects{kind=\"Service\"} 5"]
    );
    assert_eq!(
        metric_lines(&telemetry, "extproxy_services_claimed{reason=\"label\"}"),
        vec!["extproxy_services_claimed{reason=\"label\"} 2"]
    );
}

/// WatchList: the initial list arrives as a watch stream that ends with the
/// `k8s.io/initial-events-end` bookmark (recorded for EndpointSlices).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_list_ends_at_the_initial_events_bookmark() {
    let api = FakeApi::recorded().await;
    api.release_through(252);
    let telemetry = Telemetry::new(Duration::from_secs(60));
    let mut source = start_source(
        &api,
        &telemetry,
        SourceConfig {
            streaming_lists: true,
            ..node_a()
        },
    );
    let mut m = Model::new();
    drive_until_programmed(&mut source, &mut m, &telemetry, "the initial sync").await;
    assert!(final_state_reached(&m), "{:?}", m.state());
    assert_eq!(
        source_ranges(&m, &myapp()),
        vec!["1.2.3.4/32", "5.6.7.0/24"]
    );
    let requests = api.requests();
    assert!(
        requests.iter().any(
            |r| r.starts_with("GET /apis/discovery.k8s.io/v1/endpointslices?")
                && r.contains("sendInitialEvents=true")
        ),
        "{requests:#?}"
    );
    assert!(
        !requests.iter().any(|r| r.contains("limit=500")),
        "no list calls: {requests:#?}"
    );
    assert_eq!(telemetry.readiness(), Ok(()));
}

/// The API server goes away mid-watch: nothing is deleted, readiness and metrics say why, the
/// watchers reconnect with backoff, and the relist (the history was compacted meanwhile)
/// converges on what changed during the outage, touching nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_keeps_the_maps_then_converges() {
    let api = FakeApi::recorded().await;
    api.release_through(252);
    let telemetry = Telemetry::new(Duration::from_secs(60));
    let mut source = start_source(&api, &telemetry, node_a());
    let mut m = Model::new();
    drive_until(
        &mut source,
        &mut m,
        &telemetry,
        "the final state",
        |m, t| final_state_reached(m) && t.readiness().is_ok(),
    )
    .await;
    let before = m.state().clone();
    let proxy_id = m.reconciler.service_id(&proxy_service()).unwrap();

    api.set_down(true);
    drive_until(
        &mut source,
        &mut m,
        &telemetry,
        "readiness to fail",
        |_, t| t.readiness().is_err(),
    )
    .await;
    let reason = telemetry.readiness().unwrap_err();
    assert!(
        reason.starts_with("API server unreachable for "),
        "{reason}"
    );
    assert!(
        reason.ends_with("; forwarding with the last known state"),
        "{reason}"
    );
    let rounds = m.rounds.len();
    drive_for(&mut source, &mut m, Duration::from_secs(2)).await;
    assert!(
        m.rounds[rounds..].iter().all(Vec::is_empty),
        "no map writes during the outage"
    );
    assert_eq!(m.state(), &before, "the last known state keeps forwarding");
    assert_eq!(
        metric_lines(&telemetry, "extproxy_ready "),
        vec!["extproxy_ready 0"]
    );
    assert!(
        metric_lines(&telemetry, "extproxy_api_connected{")
            .iter()
            .any(|l| l.ends_with(" 0")),
        "{:?}",
        metric_lines(&telemetry, "extproxy_api_connected")
    );
    let errors = metric_lines(
        &telemetry,
        "extproxy_api_errors_total{resource=\"services\"}",
    );
    assert!(!errors[0].ends_with(" 0"), "{errors:?}");

    // Meanwhile proxy-service loses its last slice, and the history is compacted.
    api.compact_with("endpointslices", 300, |items| {
        items.remove(&("proxy-test".into(), "proxy-service-def34".into()));
    });
    api.compact("services", 300);
    api.compact("nodes", 300);
    let rounds = m.rounds.len();
    api.set_down(false);
    drive_until(
        &mut source,
        &mut m,
        &telemetry,
        "reconnect and converge",
        |m, t| t.readiness().is_ok() && endpoints(m, &proxy_service()).is_empty(),
    )
    .await;
    let touched = ids_touched(&m.rounds[rounds..], &before);
    assert_eq!(
        touched,
        BTreeSet::from([proxy_id]),
        "only proxy-service changed: {:#?}",
        &m.rounds[rounds..]
    );
    assert_eq!(m.state().frontends, before.frontends, "no frontend moved");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("resourceVersion=252")),
        "the watch first tried to resume"
    );

    // The problem a user must fix is an Event on the Service, in the log's words, once it has
    // lasted the settle time (the agent publishes it while it runs).
    let no_endpoints_posted = || {
        api.events_posted()
            .into_iter()
            .find(|e| e["reason"] == "NoEndpoints")
    };
    drive_until(&mut source, &mut m, &telemetry, "the Event", |_, _| {
        no_endpoints_posted().is_some()
    })
    .await;
    let event = no_endpoints_posted().unwrap();
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "Service");
    assert_eq!(event["regarding"]["namespace"], "proxy-test");
    assert_eq!(event["regarding"]["name"], "proxy-service");
    assert_eq!(
        event["note"],
        "Service proxy-test/proxy-service: no endpoints: connections will be refused"
    );
    assert_eq!(event["reportingController"], "extproxy");
    assert_eq!(event["reportingInstance"], "extproxy-node-a");

    // Another node (or this one restarted) sees the same problem: it asks for the same Event,
    // which exists, so the Service keeps one Event instead of one per node.
    let attempts = api.event_attempts();
    let other = Telemetry::new(Duration::from_secs(60));
    let mut second = start_source(
        &api,
        &other,
        SourceConfig {
            node_name: "node-b".into(),
            ..node_a()
        },
    );
    let mut m2 = Model::new();
    drive_until(
        &mut second,
        &mut m2,
        &other,
        "the second agent's Event",
        |_, _| api.event_attempts() > attempts,
    )
    .await;
    let no_endpoints: Vec<_> = api
        .events_posted()
        .into_iter()
        .filter(|e| e["reason"] == "NoEndpoints")
        .collect();
    assert_eq!(
        no_endpoints.len(),
        1,
        "one Event per problem: {no_endpoints:#?}"
    );
}

/// A restarted agent adopts the maps and programs nothing until every initial list is complete;
/// then the first sync writes nothing, because nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_waits_for_every_list_and_rewrites_nothing() {
    let api = FakeApi::recorded().await;
    api.release_through(252);
    let first_state = {
        let telemetry = Telemetry::new(Duration::from_secs(60));
        let mut source = start_source(&api, &telemetry, node_a());
        let mut m = Model::new();
        drive_until(
            &mut source,
            &mut m,
            &telemetry,
            "the first agent",
            |m, _| final_state_reached(m),
        )
        .await;
        m.state().clone()
    };

    api.hold_lists("endpointslices", true);
    let telemetry = Telemetry::new(Duration::from_secs(60));
    let mut source = start_source(&api, &telemetry, node_a());
    let mut m = Model::with_writer(
        Reconciler::from_snapshot(snapshot_of(&first_state), LIMITS),
        first_state.clone(),
    );
    assert_eq!(
        drive_for(&mut source, &mut m, Duration::from_millis(1500)).await,
        0
    );
    assert_eq!(
        telemetry.readiness(),
        Err("waiting for the initial list of endpointslices".to_owned())
    );
    api.hold_lists("endpointslices", false);
    drive_until_programmed(&mut source, &mut m, &telemetry, "the first sync").await;
    assert_eq!(
        m.rounds,
        vec![Vec::<MapOp>::new()],
        "adoption writes nothing"
    );
    assert_eq!(m.writer, first_state);
    assert_eq!(telemetry.readiness(), Ok(()));
}

/// A wrong node name: the agent still serves (with the uplink's addresses) and says why it is
/// not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_node_is_reported_and_the_uplink_stands_in() {
    let api = FakeApi::recorded().await;
    let telemetry = Telemetry::new(Duration::from_secs(60));
    let mut source = start_source(
        &api,
        &telemetry,
        SourceConfig {
            node_name: "node-b".into(),
            overrides: NodeOverrides {
                iface_addrs: vec![ip("192.0.2.50")],
                ..NodeOverrides::default()
            },
            ..node_a()
        },
    );
    let mut m = Model::new();
    drive_until_programmed(&mut source, &mut m, &telemetry, "the initial sync").await;
    assert_eq!(
        telemetry.readiness(),
        Err(
            "Node node-b does not exist (check --node-name); serving with the uplink's addresses"
                .to_owned()
        )
    );
    assert!(frontends(&m, &myapp()).contains(&(
        ip("192.0.2.50"),
        32518,
        FrontendKind::NodePort,
        false
    )));
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("fieldSelector=metadata.name%3Dnode-b"))
    );
}
