//! The driver with a scripted resolver: lookups run as they fall due and every change of what is
//! served reaches the caller.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::*;

/// Answers each lookup with the next scripted outcome of its name (the last one repeats).
struct Script {
    outcomes: Mutex<BTreeMap<String, VecDeque<Outcome>>>,
}

impl Script {
    fn new(list: &[(&str, Vec<Outcome>)]) -> Arc<Self> {
        Arc::new(Script {
            outcomes: Mutex::new(
                list.iter()
                    .map(|(n, o)| (n.to_string(), o.iter().cloned().collect()))
                    .collect(),
            ),
        })
    }
}

impl Lookup for Script {
    fn lookup(&self, name: Arc<str>, _family: IpFamily) -> lookup::LookupFuture {
        let mut all = self.outcomes.lock().unwrap();
        let queue = all.get_mut(&*name).expect("scripted name");
        let outcome = if queue.len() > 1 {
            queue.pop_front().unwrap()
        } else {
            queue.front().cloned().unwrap()
        };
        Box::pin(async move { outcome })
    }

    fn describe(&self) -> String {
        "script".into()
    }
}

fn timing() -> Timing {
    Timing {
        min_ttl: Duration::from_secs(1),
        max_ttl: Duration::from_secs(300),
        stale_for: Duration::from_secs(600),
        drain_for: Duration::from_secs(3600),
        nxdomain_for: Duration::from_secs(10),
    }
}

fn answer(addrs: &[&str], ttl: u64) -> Outcome {
    Outcome::Answer {
        addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        ttl: Duration::from_secs(ttl),
    }
}

fn wanted(names: &[&str]) -> Wanted {
    names
        .iter()
        .map(|n| (Arc::from(*n), [IpFamily::V4].into()))
        .collect()
}

fn serving(resolved: &Resolved, name: &str) -> Vec<String> {
    resolved.get(name).unwrap().families[&IpFamily::V4]
        .serving
        .iter()
        .map(|a| a.to_string())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn settle_waits_for_first_answers_and_next_follows_changes() {
    let script = Script::new(&[(
        "a.test",
        vec![answer(&["192.0.2.1"], 5), answer(&["192.0.2.2"], 5)],
    )]);
    let mut dns = Dns::new(timing(), script, None, None);
    dns.want(&wanted(&["a.test"]));
    assert!(dns.settle(Duration::from_secs(5)).await);
    assert_eq!(serving(&dns.resolved(), "a.test"), ["192.0.2.1"]);
    // The TTL runs out (paused time moves on by itself), the next answer differs.
    let next = dns.next().await;
    assert_eq!(serving(&next, "a.test"), ["192.0.2.2"]);
    let draining = &next.get("a.test").unwrap().families[&IpFamily::V4].draining;
    assert_eq!(draining, &["192.0.2.1".parse::<IpAddr>().unwrap()]);
}

#[tokio::test(start_paused = true)]
async fn settle_is_bounded_when_lookups_never_finish() {
    struct Never;
    impl Lookup for Never {
        fn lookup(&self, _: Arc<str>, _: IpFamily) -> lookup::LookupFuture {
            Box::pin(futures::future::pending())
        }
        fn describe(&self) -> String {
            "never".into()
        }
    }
    let mut dns = Dns::new(timing(), Arc::new(Never), None, None);
    dns.want(&wanted(&["a.test"]));
    assert!(!dns.settle(Duration::from_secs(3)).await);
    assert_eq!(
        dns.resolved().get("a.test").unwrap().families[&IpFamily::V4].condition,
        Condition::Pending
    );
}

#[tokio::test(start_paused = true)]
async fn failures_keep_serving_and_metrics_name_no_address() {
    let script = Script::new(&[(
        "a.test",
        vec![answer(&["192.0.2.1"], 1), Outcome::Failed(Failure::Timeout)],
    )]);
    let telemetry = Telemetry::new(Duration::from_secs(60));
    let mut dns = Dns::new(timing(), script, Some(telemetry.clone()), None);
    dns.want(&wanted(&["a.test"]));
    dns.settle(Duration::from_secs(5)).await;
    let stale = dns.next().await;
    let a = &stale.get("a.test").unwrap().families[&IpFamily::V4];
    assert_eq!(a.condition, Condition::Stale(Failure::Timeout));
    assert_eq!(serving(&stale, "a.test"), ["192.0.2.1"]);
    let text = telemetry.render(None);
    assert!(
        text.contains(
            "extproxy_dns_condition{name=\"a.test\",family=\"IPv4\",condition=\"stale\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "extproxy_dns_lookups_total{name=\"a.test\",family=\"IPv4\",result=\"error\"} 1"
        ),
        "{text}"
    );
    assert!(!text.contains("192.0.2.1"), "no series per address");
}

#[test]
fn servers_parse_with_and_without_ports() {
    assert_eq!(
        parse_server("10.0.0.10").unwrap(),
        "10.0.0.10:53".parse().unwrap()
    );
    assert_eq!(
        parse_server("10.0.0.10:5353").unwrap(),
        "10.0.0.10:5353".parse().unwrap()
    );
    assert_eq!(
        parse_server("fd00::a").unwrap(),
        "[fd00::a]:53".parse().unwrap()
    );
    assert_eq!(
        parse_server("[fd00::a]:5353").unwrap(),
        "[fd00::a]:5353".parse().unwrap()
    );
    assert!(parse_server("dns.example").is_err());
}

#[test]
fn durations_parse_with_units() {
    let secs = |s: &str| parse_duration(s).unwrap().as_secs();
    assert_eq!(
        [
            secs("90"),
            secs("90s"),
            secs("5m"),
            secs("1h"),
            secs("1d"),
            secs("0")
        ],
        [90, 90, 300, 3600, 86_400, 0]
    );
    assert!(parse_duration("5 min").is_err());
    assert!(parse_duration("m").is_err());
}

/// A restart while the resolver is down serves what the previous agent served.
#[tokio::test(start_paused = true)]
async fn a_restarted_agent_serves_the_previous_answers_until_its_own_lookups_answer() {
    struct Never;
    impl Lookup for Never {
        fn lookup(&self, _: Arc<str>, _: IpFamily) -> lookup::LookupFuture {
            Box::pin(futures::future::pending())
        }
        fn describe(&self) -> String {
            "never".into()
        }
    }
    let dir = std::env::temp_dir().join(format!("extproxy-dns-restore-{}", std::process::id()));
    let script = Script::new(&[("a.test", vec![answer(&["192.0.2.1"], 30)])]);
    let mut first = Dns::new(timing(), script, None, Some(dir.clone()));
    first.want(&wanted(&["a.test"]));
    first.settle(Duration::from_secs(5)).await;
    first.flush_state_now();
    drop(first);

    let mut second = Dns::new(timing(), Arc::new(Never), None, Some(dir.clone()));
    second.want(&wanted(&["a.test"]));
    assert!(
        second.settle(Duration::from_secs(5)).await,
        "nothing to wait for"
    );
    assert_eq!(serving(&second.resolved(), "a.test"), ["192.0.2.1"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
