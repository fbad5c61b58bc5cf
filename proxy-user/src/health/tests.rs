use std::path::Path;

use super::*;
use crate::diag::Severity;
use crate::manifest::ManifestSet;
use crate::reconcile::{Limits, MapState};
use crate::translate::{NodeInfo, Settings};

const LIMITS: Limits = Limits {
    max_services: 16,
    max_backends: 64,
};

/// A Service with two TCP endpoints, annotated with `annotations` (YAML lines, indented 4).
fn manifest(annotations: &str) -> String {
    manifest_with(annotations, &["203.0.113.7", "203.0.113.8"])
}

/// [`manifest`] with the given endpoints.
fn manifest_with(annotations: &str, endpoints: &[&str]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n"))
        .collect();
    format!(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: shop
  annotations:
    {annotations}
spec:
  clusterIP: 10.96.0.50
  ports:
  - port: 5432
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: shop
  labels:
    kubernetes.io/service-name: db
addressType: IPv4
ports:
- port: 5432
endpoints:
{endpoints}"#
    )
}

struct Rig {
    set: ManifestSet,
    translator: Incremental,
    reconciler: Reconciler,
    maps: MapState,
    monitor: Monitor,
}

impl Rig {
    fn new(annotations: &str) -> Self {
        let mut rig = Rig {
            set: ManifestSet::default(),
            translator: Incremental::new(
                NodeInfo::default(),
                Settings {
                    egress_v4: vec!["192.0.2.100".parse().unwrap()],
                    ..Settings::default()
                },
            ),
            reconciler: Reconciler::new(LIMITS),
            maps: MapState::default(),
            monitor: Monitor::new(),
        };
        rig.edit(annotations);
        rig
    }

    fn edit(&mut self, annotations: &str) {
        self.set
            .update_file_text(Path::new("m.yaml"), &manifest(annotations));
        self.set.feed(&mut self.translator);
        self.program();
    }

    fn set_endpoints(&mut self, annotations: &str, endpoints: &[&str]) {
        self.set
            .update_file_text(Path::new("m.yaml"), &manifest_with(annotations, endpoints));
        self.set.feed(&mut self.translator);
        self.program();
    }

    /// Translates, programs and lets the monitor learn the result.
    fn program(&mut self) {
        let t = self.translator.update();
        self.reconciler.sync(&t.desired, &mut self.maps);
        self.monitor.sync(t, &self.reconciler);
    }

    /// Tells the translator the monitor's verdicts and programs them.
    fn settle(&mut self) {
        if self.monitor.tell(&mut self.translator) {
            self.program();
        }
    }

    fn roles(&self) -> Vec<(String, BackendRole)> {
        let t = self.translator.translation();
        let (_, service) = t.desired.services.iter().next().expect("one port");
        service
            .backends
            .iter()
            .map(|((ip, port), role)| (format!("{ip}:{port}"), *role))
            .collect()
    }

    fn diagnostics(&self) -> Vec<(Severity, String)> {
        self.translator
            .translation()
            .diagnostics
            .iter()
            .map(|d| (d.severity, d.to_string()))
            .collect()
    }

    fn probe(&mut self, ip: &str, result: Result<(), Cause>, check: &config::ActiveCheck) {
        let key = Arc::new(ProbeKey {
            target: SocketAddr::new(ip.parse().unwrap(), 5432),
            source: Some("192.0.2.100".parse().unwrap()),
            check: check.clone(),
        });
        assert!(
            self.monitor.probes.contains_key(&key),
            "a probe runs for {ip} as {key:?}"
        );
        self.monitor.on_probe(ProbeResult {
            key,
            result,
            latency: Duration::from_millis(3),
            source_fallback: false,
        });
    }
}

fn active_of(rig: &Rig) -> config::ActiveCheck {
    rig.monitor
        .configs
        .get(&ObjectKey::new("shop", "db"))
        .and_then(|c| c.active.clone())
        .expect("an active check")
}

/// Probes must not fire on their own during these tests: an hour's interval (and jitter).
const SLOW_TCP: &str = "extproxy.io/health-check: tcp\n    extproxy.io/health-check-interval: 1h\n    extproxy.io/health-check-timeout: 1s\n    extproxy.io/health-check-unhealthy-threshold: \"2\"";

#[tokio::test]
async fn an_unhealthy_endpoint_drains_and_comes_back() {
    let mut rig = Rig::new(SLOW_TCP);
    let check = active_of(&rig);
    assert_eq!(
        rig.monitor.counts(),
        (2, 2),
        "two endpoints, one probe each"
    );
    use BackendRole::*;
    rig.probe("203.0.113.7", Err(Cause::Refused), &check);
    rig.settle();
    assert_eq!(
        rig.roles(),
        [
            ("203.0.113.7:5432".into(), Active),
            ("203.0.113.8:5432".into(), Active)
        ],
        "one failure is below the threshold"
    );
    rig.probe("203.0.113.7", Err(Cause::Refused), &check);
    rig.settle();
    assert_eq!(
        rig.roles(),
        [
            ("203.0.113.7:5432".into(), Unhealthy),
            ("203.0.113.8:5432".into(), Active)
        ]
    );
    // In the maps: Draining (established flows go on), and not in a slot.
    let id = rig
        .reconciler
        .service_id(
            rig.translator
                .translation()
                .desired
                .services
                .keys()
                .next()
                .unwrap(),
        )
        .unwrap();
    let slots: Vec<u32> = rig.maps.slots_of(id).map(|(_, b)| b).collect();
    assert_eq!(slots.len(), 1);
    let reports = rig.monitor.take_reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(
        reports[0].describe(),
        "endpoint 203.0.113.7:5432 of Service shop/db port \"\" (TCP) is unhealthy: refused"
    );
    let records = rig.monitor.take_records().unwrap();
    assert_eq!(records.len(), 2);
    assert!(!records[0].healthy);
    assert_eq!(records[0].checks, "tcp every 60m, passive");
    assert_eq!(records[0].cause.as_deref(), Some("refused"));
    let metrics = rig.monitor.metrics().lock().unwrap().render();
    assert!(
        metrics.contains(
            "extproxy_endpoint_healthy{namespace=\"shop\",service=\"db\",endpoint=\"203.0.113.7:5432\"} 0"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("extproxy_endpoint_health_transitions_total{namespace=\"shop\",service=\"db\",endpoint=\"203.0.113.7:5432\",to=\"unhealthy\"} 1"));

    // Back: two passes (the default healthy threshold).
    rig.probe("203.0.113.7", Ok(()), &check);
    rig.probe("203.0.113.7", Ok(()), &check);
    rig.settle();
    assert_eq!(
        rig.roles(),
        [
            ("203.0.113.7:5432".into(), Active),
            ("203.0.113.8:5432".into(), Active)
        ]
    );
    assert!(rig.monitor.take_reports()[0].transition.healthy);
}

/// An unhealthy endpoint that leaves (a DNS name's answer rotating it out, a slice dropping
/// it) is neither listed nor probed; back within [`DEPARTED_MEMORY`], it is still unhealthy from
/// its first programming (no new flows until its check passes), and probed again. A healthy one
/// that leaves comes back new.
#[tokio::test]
async fn an_unhealthy_endpoint_that_leaves_and_comes_back_is_still_unhealthy() {
    use BackendRole::*;
    let mut rig = Rig::new(SLOW_TCP);
    let check = active_of(&rig);
    rig.probe("203.0.113.7", Err(Cause::Refused), &check);
    rig.probe("203.0.113.7", Err(Cause::Refused), &check);
    rig.settle();
    assert_eq!(rig.roles()[0], ("203.0.113.7:5432".into(), Unhealthy));
    rig.monitor.take_reports();

    // Both leave: no record, no probe; the unhealthy one is remembered.
    rig.set_endpoints(SLOW_TCP, &["203.0.113.9"]);
    rig.settle();
    assert_eq!(
        rig.monitor.counts(),
        (1, 1),
        "only the remaining endpoint is probed"
    );
    assert_eq!(rig.monitor.departed(), 1);
    let records = rig.monitor.take_records().unwrap();
    assert_eq!(
        records
            .iter()
            .map(|r| r.endpoint.as_str())
            .collect::<Vec<_>>(),
        ["203.0.113.9:5432"]
    );

    // Both come back: the unhealthy one is Unhealthy in the very translation that brings it
    // back, without a transition (it never was healthy in between); the healthy one is new.
    rig.set_endpoints(SLOW_TCP, &["203.0.113.7", "203.0.113.8"]);
    assert_eq!(
        rig.roles(),
        [
            ("203.0.113.7:5432".into(), Unhealthy),
            ("203.0.113.8:5432".into(), Active)
        ]
    );
    rig.settle();
    assert_eq!(rig.monitor.counts(), (2, 2), "probed again");
    assert_eq!(rig.monitor.departed(), 0);
    assert!(rig.monitor.take_reports().is_empty());
    // Records are built at most once a second.
    rig.monitor.records_built = None;
    let records = rig.monitor.take_records().unwrap();
    let back = records
        .iter()
        .find(|r| r.endpoint == "203.0.113.7:5432")
        .unwrap();
    assert!(!back.healthy);
    assert_eq!(back.cause.as_deref(), Some("refused"));
    // Its check passes twice: new flows again.
    rig.probe("203.0.113.7", Ok(()), &check);
    rig.probe("203.0.113.7", Ok(()), &check);
    rig.settle();
    assert_eq!(rig.roles()[0], ("203.0.113.7:5432".into(), Active));

    // Remembered for a while only: gone longer, it comes back new (and healthy).
    rig.probe("203.0.113.7", Err(Cause::Refused), &check);
    rig.probe("203.0.113.7", Err(Cause::Refused), &check);
    rig.settle();
    rig.set_endpoints(SLOW_TCP, &["203.0.113.8"]);
    rig.settle();
    for d in rig.monitor.departed.values_mut() {
        d.left -= DEPARTED_MEMORY;
    }
    rig.set_endpoints(SLOW_TCP, &["203.0.113.7", "203.0.113.8"]);
    rig.settle();
    assert_eq!(rig.monitor.departed(), 0);
    assert_eq!(
        rig.roles(),
        [
            ("203.0.113.7:5432".into(), Active),
            ("203.0.113.8:5432".into(), Active)
        ]
    );
}

#[tokio::test]
async fn all_down_fails_open_unless_told_to_refuse() {
    use BackendRole::*;
    let mut rig = Rig::new(SLOW_TCP);
    let check = active_of(&rig);
    for ip in ["203.0.113.7", "203.0.113.8"] {
        rig.probe(ip, Err(Cause::Timeout), &check);
        rig.probe(ip, Err(Cause::Timeout), &check);
    }
    rig.settle();
    assert_eq!(
        rig.roles(),
        [
            ("203.0.113.7:5432".into(), Active),
            ("203.0.113.8:5432".into(), Active)
        ],
        "fail open"
    );
    assert!(
        rig.diagnostics()
            .iter()
            .any(|(s, d)| *s == Severity::Warning
                && d.ends_with(
                    "port \"\" (TCP IPv4): every endpoint is unhealthy: using them all (fail open; \
                 extproxy.io/health-check-all-down: refuse refuses connections instead)"
                )),
        "{:?}",
        rig.diagnostics()
    );

    rig.edit(&format!(
        "{SLOW_TCP}\n    extproxy.io/health-check-all-down: refuse"
    ));
    // The check did not change: its verdicts stand, and the policy is told with them.
    rig.settle();
    assert_eq!(
        rig.roles(),
        [
            ("203.0.113.7:5432".into(), Unhealthy),
            ("203.0.113.8:5432".into(), Unhealthy)
        ],
        "refused"
    );
    assert!(
        rig.diagnostics().iter().any(|(s, d)| *s == Severity::Error
            && d.contains("every endpoint is unhealthy: new connections are refused")),
        "{:?}",
        rig.diagnostics()
    );
}

#[tokio::test]
async fn a_bad_annotation_keeps_the_previous_setting() {
    let mut rig = Rig::new(SLOW_TCP);
    let check = active_of(&rig);
    rig.edit(&format!(
        "{SLOW_TCP}\n    extproxy.io/health-check-healthy-threshold: lots"
    ));
    assert_eq!(active_of(&rig), check, "the previous check stays");
    assert_eq!(rig.monitor.counts().1, 2, "its probes keep running");
    assert!(
        rig.diagnostics().iter().any(|(s, d)| *s == Severity::Error
            && d.contains("metadata.annotations[extproxy.io/health-check-healthy-threshold]: \"lots\" is not a count")
            && d.contains("keeps its previous setting")),
        "{:?}",
        rig.diagnostics()
    );
    // At first sight, a bad value means no active check.
    let fresh = Rig::new("extproxy.io/health-check: icmp");
    assert_eq!(fresh.monitor.counts(), (2, 0));
    // Removing the check stops the probes and forgets its verdicts.
    let mut rig = Rig::new(SLOW_TCP);
    let check = active_of(&rig);
    rig.probe("203.0.113.7", Err(Cause::Refused), &check);
    rig.probe("203.0.113.7", Err(Cause::Refused), &check);
    rig.settle();
    assert_eq!(rig.roles()[0].1, BackendRole::Unhealthy);
    rig.edit("extproxy.io/health-check: none");
    rig.settle();
    assert_eq!(rig.monitor.counts(), (2, 0));
    assert_eq!(rig.roles()[0].1, BackendRole::Active);
}

#[tokio::test]
async fn a_tcp_check_on_a_udp_port_needs_a_check_port() {
    let yaml = manifest("extproxy.io/health-check: tcp").replace(
        "  - port: 5432\n---",
        "  - port: 5432\n    protocol: UDP\n---",
    );
    let mut set = ManifestSet::default();
    set.update_file_text(Path::new("m.yaml"), &yaml);
    let mut translator = Incremental::new(NodeInfo::default(), Settings::default());
    set.feed(&mut translator);
    let t = translator.update();
    assert!(
        t.diagnostics.iter().any(|d| d
            .to_string()
            .contains("a tcp check cannot probe UDP port 5432 (spec.ports[0]): set extproxy.io/health-check-port")),
        "{:?}",
        t.diagnostics
    );
    let (_, service) = t.desired.services.iter().next().unwrap();
    assert_eq!(service.health, HealthSetting::Invalid);
    // With a port to check, it is fine.
    set.update_file_text(
        Path::new("m.yaml"),
        &yaml.replace(
            "extproxy.io/health-check: tcp",
            "extproxy.io/health-check: tcp\n    extproxy.io/health-check-port: \"22\"",
        ),
    );
    set.feed(&mut translator);
    let t = translator.update();
    let (_, service) = t.desired.services.iter().next().unwrap();
    assert!(matches!(service.health, HealthSetting::Configured(_)));
}

#[tokio::test]
async fn a_follower_takes_the_probers_verdicts_instead_of_probing() {
    use BackendRole::*;
    let mut rig = Rig::new(SLOW_TCP);
    let check = active_of(&rig);
    rig.probe("203.0.113.8", Err(Cause::Refused), &check);
    rig.probe("203.0.113.8", Err(Cause::Refused), &check);
    rig.settle();
    // What a prober publishes: its own active verdicts.
    let own = rig.monitor.own_verdicts();
    assert_eq!(
        own[&ObjectKey::new("shop", "db")],
        [(ip("203.0.113.8"), 5432, Protocol::Tcp)].into()
    );

    let mut published = Endpoints::new();
    published
        .entry(ObjectKey::new("shop", "db"))
        .or_default()
        .insert((ip("203.0.113.7"), 5432, Protocol::Tcp));
    rig.monitor.set_follow(Some(Arc::new(published)));
    rig.settle();
    assert_eq!(rig.monitor.counts(), (2, 0), "a follower does not probe");
    assert_eq!(
        rig.roles(),
        [
            ("203.0.113.7:5432".into(), Unhealthy),
            ("203.0.113.8:5432".into(), Active)
        ],
        "the probers' verdicts replace its own"
    );
    assert!(rig.monitor.own_verdicts().is_empty());

    // The probers are gone: it probes by itself again, starting from healthy.
    rig.monitor.set_follow(None);
    rig.settle();
    assert_eq!(rig.monitor.counts(), (2, 2));
    assert_eq!(
        rig.roles(),
        [
            ("203.0.113.7:5432".into(), Active),
            ("203.0.113.8:5432".into(), Active)
        ]
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// What health checking adds to a change at 10k passive-only Services x 4 endpoints (run it
/// with `cargo test --release -p proxy-user --lib health::tests::scale -- --ignored
/// --nocapture`; DESIGN.md quotes it).
#[tokio::test]
#[ignore = "a measurement: run it by hand in release mode"]
async fn scale() {
    // One file per 100 Services (a manifest file's documents are bounded).
    let mut files = vec![String::new(); 100];
    for i in 0..10_000 {
        let yaml = &mut files[i / 100];
        let svc = manifest("x: y")
            .replace("name: db\n", &format!("name: db{i}\n"))
            .replace("name: db-1\n", &format!("name: db{i}-1\n"))
            .replace(
                "kubernetes.io/service-name: db\n",
                &format!("kubernetes.io/service-name: db{i}\n"),
            )
            .replace(
                "clusterIP: 10.96.0.50",
                &format!("clusterIP: 10.96.{}.{}", i / 250, i % 250 + 1),
            )
            .replace(
                "endpoints:\n- addresses: [\"203.0.113.7\"]\n- addresses: [\"203.0.113.8\"]\n",
                &format!(
                    "endpoints:\n{}",
                    (1..=4)
                        .map(|e| format!("- addresses: [\"10.{}.{}.{e}\"]\n", i / 250, i % 250))
                        .collect::<String>()
                ),
            );
        yaml.push_str(&svc);
        yaml.push_str("\n---\n");
    }
    let mut set = ManifestSet::default();
    for (n, yaml) in files.iter().enumerate() {
        set.update_file_text(Path::new(&format!("m{n}.yaml")), yaml);
    }
    let mut translator = Incremental::new(
        NodeInfo::default(),
        Settings {
            egress_v4: vec!["192.0.2.100".parse().unwrap()],
            ..Settings::default()
        },
    );
    set.feed(&mut translator);
    let mut reconciler = Reconciler::new(Limits {
        max_services: 16_384,
        max_backends: 65_536,
    });
    let mut maps = MapState::default();
    let mut monitor = Monitor::new();
    let t = translator.update();
    reconciler.sync(&t.desired, &mut maps);
    let started = Instant::now();
    monitor.sync(t, &reconciler);
    eprintln!(
        "full sync of {} endpoints: {:?}",
        monitor.counts().0,
        started.elapsed()
    );
    let started = Instant::now();
    let records = monitor.take_records().map_or(0, |r| r.len());
    eprintln!("records: {records} in {:?}", started.elapsed());
    // One Service changes (an endpoint more).
    let changed = files[0].replacen(
        "- addresses: [\"10.0.0.4\"]\n",
        "- addresses: [\"10.0.0.4\"]\n- addresses: [\"10.0.0.5\"]\n",
        1,
    );
    set.update_file_text(Path::new("m0.yaml"), &changed);
    set.feed(&mut translator);
    let t = translator.update();
    reconciler.sync_changes(&t.desired, &t.changes.clone().unwrap().services, &mut maps);
    let started = Instant::now();
    monitor.sync(t, &reconciler);
    let took = started.elapsed();
    monitor.take_changes();
    eprintln!(
        "a one-Service change: {took:?}, then {:?} with the verdicts",
        started.elapsed()
    );
    assert_eq!(monitor.counts().0, 40_001);
}

/// The backend id of endpoint `ip`:5432 of the rig's one Service port.
fn backend_id_of(rig: &Rig, ip: &str) -> Option<u32> {
    let (_, sid) = rig.reconciler.service_ids().next().expect("one port");
    rig.reconciler.backend_id(sid, ip.parse().unwrap(), 5432)
}

/// The data path's counters of an endpoint that failed its last 50 new flows (refused).
fn failing_every_flow() -> BackendHealth {
    BackendHealth {
        failed: 50,
        consecutive: 50,
        last_kind: proxy_common::HF_REFUSED,
        ..BackendHealth::default()
    }
}

/// The counters are read on another thread while the agent goes on: a backend id given to a new
/// endpoint meanwhile must not hand it the failures the read found for the old one.
#[tokio::test]
async fn counters_read_before_an_id_changed_hands_are_not_the_new_endpoints() {
    let eps = ["203.0.113.1", "203.0.113.3", "203.0.113.4"];
    let mut rig = Rig::new("");
    rig.set_endpoints("", &eps);
    let old = backend_id_of(&rig, "203.0.113.1").expect("an id");
    let ids = rig.monitor.counters_due().expect("a read is due");
    assert!(ids.contains(&old));

    // While the read is under way, endpoints come and go until one gets .1's id (the
    // reconciler hands out fresh ids first).
    let newcomer = (10..200)
        .map(|i| format!("203.0.113.{i}"))
        .find(|ip| {
            rig.set_endpoints("", &[ip, eps[1], eps[2]]);
            backend_id_of(&rig, ip) == Some(old)
        })
        .expect("the id was given again");

    // The read saw .1 failing every new flow.
    let failing = failing_every_flow();
    let read_failing = |rig: &mut Rig| {
        rig.monitor.counters_read(
            Counters::Sparse(vec![(old, failing)]),
            Duration::from_millis(1),
        );
        rig.settle();
    };
    read_failing(&mut rig);
    assert!(
        rig.roles()
            .iter()
            .all(|(_, role)| *role == BackendRole::Active),
        "{:?}",
        rig.roles()
    );
    // The next read is the new endpoint's own.
    rig.monitor.next_read = None;
    assert!(rig.monitor.counters_due().is_some());
    read_failing(&mut rig);
    assert!(
        rig.roles()
            .contains(&(format!("{newcomer}:5432"), BackendRole::Unhealthy)),
        "{:?}",
        rig.roles()
    );
}

/// Ticks (no counters) only look at the endpoints when one may be ejected: a pass that finds
/// none lets the next ticks return at once, an ejection makes them look again.
#[tokio::test]
async fn ticks_look_at_the_endpoints_only_while_one_is_ejected() {
    let eps = ["203.0.113.1", "203.0.113.3", "203.0.113.4"];
    let mut rig = Rig::new("");
    rig.set_endpoints("", &eps);
    assert!(rig.monitor.may_be_ejected, "unknown until a pass looked");
    rig.monitor.tick();
    assert!(!rig.monitor.may_be_ejected, "nobody is ejected");

    let id = backend_id_of(&rig, eps[0]).expect("an id");
    let failing = failing_every_flow();
    assert!(rig.monitor.counters_due().is_some());
    rig.monitor.counters_read(
        Counters::Sparse(vec![(id, failing)]),
        Duration::from_millis(1),
    );
    rig.settle();
    assert!(
        rig.roles()
            .contains(&(format!("{}:5432", eps[0]), BackendRole::Unhealthy)),
        "{:?}",
        rig.roles()
    );
    assert!(rig.monitor.may_be_ejected);
    // Its ejection runs for seconds: ticks keep looking, so they readmit it when it is over.
    rig.monitor.tick();
    assert!(rig.monitor.may_be_ejected);
}
