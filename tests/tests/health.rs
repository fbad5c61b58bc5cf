//! Health checking with the real binary in network namespaces (root): endpoints whose server
//! stops, whose host stops answering, or that reset new flows lose their new flows and get them
//! back when they recover; established flows are left alone. The times printed are what the
//! benchmark measures; the assertions wait with generous bounds.

use extproxy_tests::ip;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use extproxy_tests::agent::*;

/// Generous: detection takes a few seconds at a 1 s interval; a loaded CI machine is slower.
const DETECT: Duration = Duration::from_secs(20);

/// A ClusterIP Service with one TCP port and `endpoints`, annotated with `annotations` (YAML map
/// entries, one per line).
fn service(annotations: &str, endpoints: &[&str]) -> String {
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!(
            "  annotations:\n{}",
            annotations
                .lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        )
    };
    let endpoints: String = endpoints
        .iter()
        .map(|ip| format!("  - addresses: [\"{ip}\"]\n"))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
{annotations}spec:
  clusterIP: 10.96.0.10
  ports:
    - {{name: http, port: 80, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
  - {{name: http, port: 8080, protocol: TCP}}
endpoints:
{endpoints}"#
    )
}

/// The target's check: interval 1s, timeout 500ms, thresholds 2/2.
const FAST_TCP: &str = "extproxy.io/health-check: tcp
extproxy.io/health-check-interval: 1s
extproxy.io/health-check-timeout: 500ms
extproxy.io/health-check-unhealthy-threshold: \"2\"
extproxy.io/health-check-healthy-threshold: \"2\"";

/// One short connection from the pod to the Service: the endpoint that answered, or None.
fn connect(t: &Topology) -> Option<IpAddr> {
    let mut c =
        TcpClient::connect(&t.pod.name, None, "10.96.0.10", 80, Duration::from_secs(2)).ok()?;
    c.exchange("hi").ok().map(|seen| seen.endpoint)
}

/// Connections every 50 ms until `done(endpoint)` holds for `run` in a row (or `within`
/// passes: panic). Returns how long it took until the run began, and the failed connections
/// before it.
fn until_steady(
    t: &Topology,
    what: &str,
    within: Duration,
    run: usize,
    done: impl Fn(Option<IpAddr>) -> bool,
) -> (Duration, usize) {
    let start = Instant::now();
    let mut failed = 0;
    let mut streak = 0;
    let mut streak_began = start;
    loop {
        let before = Instant::now();
        let seen = connect(t);
        if seen.is_none() {
            failed += 1;
        }
        if done(seen) {
            if streak == 0 {
                streak_began = before;
            }
            streak += 1;
            if streak >= run {
                let took = streak_began - start;
                eprintln!("{what}: after {took:?}, {failed} failed connection(s) before");
                return (took, failed);
            }
        } else {
            streak = 0;
        }
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?} ({failed} failed)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// When the agent logged the first line containing `needle` (its log's UTC timestamps).
fn logged_at(agent: &Agent, needle: &str) -> std::time::SystemTime {
    agent.wait_for_log(needle, DETECT);
    let log = agent.log_text();
    let line = log.lines().find(|l| l.contains(needle)).unwrap();
    let stamp = line.split_whitespace().next().unwrap();
    let t: k8s_openapi::jiff::Timestamp = stamp.parse().unwrap();
    t.into()
}

/// Prints how long after `since` the agent logged `needle` (what the benchmark would measure).
fn report_after(agent: &Agent, what: &str, needle: &str, since: std::time::SystemTime) {
    let at = logged_at(agent, needle);
    eprintln!(
        "{what}: logged {:?} after the fault",
        at.duration_since(since).unwrap_or_default()
    );
}

/// The endpoints of `n` connections, counted.
fn spread(t: &Topology, n: usize) -> HashMap<Option<IpAddr>, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        *seen.entry(connect(t)).or_default() += 1;
    }
    seen
}

/// Waits until `extproxy inspect` shows `endpoint`'s health starting with `prefix` (the agent
/// publishes its state file at most once a second).
fn wait_health(agent: &Agent, endpoint: &str, prefix: &str) -> HashMap<String, String> {
    let start = Instant::now();
    loop {
        let health = health_of(agent);
        if health.get(endpoint).is_some_and(|h| h.starts_with(prefix)) {
            return health;
        }
        assert!(
            start.elapsed() < DETECT,
            "{endpoint} never {prefix:?}: {health:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The endpoints' health as `extproxy inspect --json` shows it.
fn health_of(agent: &Agent) -> HashMap<String, String> {
    let report = agent.inspect();
    let mut out = HashMap::new();
    for s in report["services"].as_array().unwrap() {
        for e in s["endpoints"].as_array().unwrap() {
            out.insert(
                e["address"].as_str().unwrap().to_owned(),
                e["health"].as_str().unwrap_or("-").to_owned(),
            );
        }
    }
    out
}

#[test]
fn a_stopped_server_loses_new_flows_and_gets_them_back() {
    let t = Topology::new("hcstop");
    let mut ep1 = Some(EchoServers::start(&t.ext.name, &[(EP1, 8080)]));
    let _ep2 = EchoServers::start(&t.ext.name, &[(EP2, 8080)]);
    t.write_manifest("svc.yaml", &service(FAST_TCP, &[EP1, EP2]));
    let agent = t.start_agent(&[]);
    let seen = spread(&t, 20);
    assert!(
        seen.contains_key(&Some(ip(EP1))) && seen.contains_key(&Some(ip(EP2))),
        "{seen:?}"
    );

    // The server stops: its port is closed (the kernel resets new connections).
    let fault = std::time::SystemTime::now();
    ep1.take();
    let (moved, failed) = until_steady(&t, "port closed: new flows off EP1", DETECT, 20, |e| {
        e == Some(ip(EP2))
    });
    report_after(&agent, "port closed: unhealthy", UNHEALTHY, fault);
    eprintln!("port closed: moved after {moved:?} with {failed} failed connections");
    let health = wait_health(&agent, "203.0.113.7:8080", "unhealthy: ");
    assert_eq!(health["203.0.113.8:8080"], "healthy");
    let text = agent.inspect_text();
    assert!(
        text.contains("ENDPOINT HEALTH") && text.contains("203.0.113.7:8080 (unhealthy)"),
        "{text}"
    );

    // Back: new flows reach it again.
    let recovered = std::time::SystemTime::now();
    let _ep1 = EchoServers::start(&t.ext.name, &[(EP1, 8080)]);
    until_steady(&t, "port open again: EP1 gets new flows", DETECT, 1, |e| {
        e == Some(ip(EP1))
    });
    report_after(&agent, "port open again: healthy", HEALTHY, recovered);
    let log = agent.stop();
    assert!(log.contains("is unhealthy: "), "{log}");
}

const UNHEALTHY: &str =
    "endpoint 203.0.113.7:8080 of Service demo/web port \"http\" (TCP) is unhealthy";
const HEALTHY: &str =
    "endpoint 203.0.113.7:8080 of Service demo/web port \"http\" (TCP) is healthy";

#[test]
fn a_host_that_stops_answering_loses_new_flows_and_gets_them_back() {
    let t = Topology::new("hcdrop");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP2, 8080)]);
    t.write_manifest("svc.yaml", &service(FAST_TCP, &[EP1, EP2]));
    let agent = t.start_agent(&[]);
    let seen = spread(&t, 20);
    assert!(seen.contains_key(&Some(ip(EP1))), "{seen:?}");

    // EP1's host drops everything sent to it.
    let fault = std::time::SystemTime::now();
    t.ext.sh("nft add table inet xphealth
         nft add chain inet xphealth in '{ type filter hook prerouting priority -300; }'
         nft add rule inet xphealth in ip daddr 203.0.113.7 drop");
    let (moved, failed) = until_steady(&t, "host silent: new flows off EP1", DETECT, 20, |e| {
        e == Some(ip(EP2))
    });
    eprintln!("host silent: moved after {moved:?} with {failed} failed connections");
    report_after(&agent, "host silent: unhealthy", UNHEALTHY, fault);

    let recovered = std::time::SystemTime::now();
    t.ext.sh("nft delete table inet xphealth");
    until_steady(
        &t,
        "host answers again: EP1 gets new flows",
        DETECT,
        1,
        |e| e == Some(ip(EP1)),
    );
    report_after(&agent, "host answers again: healthy", HEALTHY, recovered);
    agent.stop();
}

/// No annotation: the data path's signals alone eject an endpoint that resets new flows, and
/// readmit it once its back-off is over and it answers.
#[test]
fn passive_detection_ejects_an_endpoint_that_resets_new_flows() {
    let t = Topology::new("hcpass");
    let mut ep1 = Some(EchoServers::start(&t.ext.name, &[(EP1, 8080)]));
    let _ep2 = EchoServers::start(&t.ext.name, &[(EP2, 8080)]);
    t.write_manifest("svc.yaml", &service("", &[EP1, EP2]));
    let agent = t.start_agent(&[]);
    ep1.take();
    let (moved, failed) = until_steady(&t, "passive: new flows off EP1", DETECT, 20, |e| {
        e == Some(ip(EP2))
    });
    eprintln!("passive: moved after {moved:?} with {failed} failed connections");
    assert!(failed >= 3, "ejected after three resets, {failed} failed");
    // Three or more: the counters are read five times a second.
    agent.wait_for_log("is unhealthy: passive: ", DETECT);
    let line = agent
        .log_text()
        .lines()
        .find(|l| l.contains("is unhealthy: passive: "))
        .unwrap()
        .to_owned();
    assert!(
        line.ends_with(" RSTs") && line.contains("203.0.113.7:8080"),
        "{line}"
    );
    wait_health(&agent, "203.0.113.7:8080", "unhealthy: passive: ");

    let _ep1 = EchoServers::start(&t.ext.name, &[(EP1, 8080)]);
    // Readmitted after 5 s (on probation), answered: it stays in.
    until_steady(&t, "passive: EP1 back", Duration::from_secs(30), 1, |e| {
        e == Some(ip(EP1))
    });
    agent.wait_for_log("is healthy: passive ejection of 5s over", DETECT);
    agent.stop();
}

/// An active check that fails while the Service port works (it probes another port): new flows
/// leave the endpoint, its established flow carries on.
#[test]
fn an_unhealthy_endpoints_established_flows_are_left_alone() {
    let t = Topology::new("hckeep");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP2, 8080), (EP2, 9999)]);
    let annotations = format!(
        "{}\nextproxy.io/health-check-port: \"9999\"\nextproxy.io/health-check-interval: 2s",
        FAST_TCP.replace("extproxy.io/health-check-interval: 1s\n", "")
    );
    t.write_manifest("svc.yaml", &service(&annotations, &[EP1, EP2]));
    let agent = t.start_agent(&[]);
    // A long connection to EP1, opened before its check fails twice (it starts healthy).
    let mut long = None;
    for _ in 0..40 {
        let mut c = TcpClient::connect(&t.pod.name, None, "10.96.0.10", 80, Duration::from_secs(3))
            .unwrap();
        if c.exchange("first").unwrap().endpoint == ip(EP1) {
            long = Some(c);
            break;
        }
    }
    let mut long = long.expect("a connection to EP1");
    agent.wait_for_log(
        "endpoint 203.0.113.7:8080 of Service demo/web port \"http\" (TCP) is unhealthy: refused",
        DETECT,
    );
    for _ in 0..20 {
        assert_eq!(connect(&t), Some(ip(EP2)), "no new flow goes to EP1");
    }
    assert_eq!(long.exchange("still there").unwrap().endpoint, ip(EP1));
    let state = agent.inspect();
    let eps = state["services"][0]["endpoints"].as_array().unwrap();
    let ep1 = eps
        .iter()
        .find(|e| e["address"] == "203.0.113.7:8080")
        .unwrap();
    assert_eq!(ep1["state"], "draining");
    agent.stop();
}

/// The passive monitor reads BACKEND_HEALTH in one BPF_MAP_LOOKUP_BATCH (a raw system call):
/// it must return what single lookups return. Prints what both cost at 40k backends (10k
/// Services x 4 endpoints), which DESIGN.md quotes.
#[test]
fn batched_health_reads_match_single_lookups() {
    extproxy_tests::require_root();
    const N: u32 = 40_000;
    let limits = extproxy::loader::Limits {
        max_backends: N,
        max_slots: N,
        ..extproxy::loader::Limits::default()
    };
    let mut ebpf = extproxy::loader::create_maps(&limits, None).expect("maps");
    {
        let map = ebpf
            .map_mut(proxy_common::MAP_BACKEND_HEALTH)
            .expect("BACKEND_HEALTH");
        let mut health: aya::maps::Array<_, proxy_common::BackendHealth> =
            aya::maps::Array::try_from(map).unwrap();
        for id in (0..N).step_by(7) {
            let value = proxy_common::BackendHealth {
                answered: id as u64 * 3,
                failed: id as u64,
                consecutive: id % 5,
                last_kind: proxy_common::HF_REFUSED,
                last_at: id,
                reserved: 0,
            };
            health.set(id, value, 0).unwrap();
        }
    }
    let maps = extproxy::maps::DatapathMaps::take_from(&mut ebpf).expect("maps");
    let started = Instant::now();
    let batch = maps.health_counters().batch(N).expect("batch read");
    let batch_took = started.elapsed();
    assert_eq!(batch.len(), N as usize);
    let started = Instant::now();
    let single: Vec<_> = (0..N)
        .map(|id| maps.health_counters().get(id).unwrap())
        .collect();
    let single_took = started.elapsed();
    assert_eq!(batch, single);
    assert_eq!(batch[7].failed, 7);
    assert_eq!(batch[8], proxy_common::BackendHealth::default());
    // A partial read (the highest id in use + 1).
    assert_eq!(maps.health_counters().batch(100).unwrap(), single[..100]);
    eprintln!(
        "{N} backend health records: one batch {batch_took:?}, one lookup each {single_took:?}"
    );
}
