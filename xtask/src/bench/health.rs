//! The health part of `cargo xtask bench` (issue 11): how fast an endpoint that fails loses its
//! new flows, how many client connections fail meanwhile, and how fast it gets them back.
//!
//! One topology per round (pod, node, outside): the real agent in the node namespace in
//! manifest mode with its defaults, one Service (10.96.0.10:80) with two endpoints
//! (203.0.113.7 and .8, port 8080) served from the outside namespace. A client in the pod
//! starts a connection to the Service every 50 ms whether or not the earlier ones have finished
//! (an open-loop client, like independent callers: a stuck connection does not hold the next
//! back), each with a 2 s connect timeout and a 2 s wait for the endpoint's one-line answer,
//! and records which endpoint answered or that it failed.
//!
//! Scenarios, each on a fresh agent (passive back-off state is per agent):
//! * port closed: the active check (`tcp`, interval 1s, timeout 500ms, thresholds 2/2) and
//!   passive detection; the first endpoint's server stops (the kernel resets new connections).
//! * host silent: the same check; the outside namespace drops everything sent to the first
//!   endpoint (nftables, before routing).
//! * passive only: no annotation, port closed: the data path's signals alone.
//!
//! Measured from the client's view (connection start times, 50 ms apart):
//! * off: from the fault to the start of the first of 20 consecutive connections (1 s) that all
//!   reached the other endpoint: every connection after that point avoided the failed one, the
//!   connection just before it did not (it reached or failed on the failed endpoint).
//! * failed: connections started between the fault and that point that failed (refused, reset,
//!   timed out); counted once all of them have finished.
//! * back: from the recovery (server restarted, drop rule removed; done once `off` and `failed`
//!   are known) to the start of the first connection the recovered endpoint answered.
//!
//! The fault's and the recovery's instants are taken just before they are made, so the few
//! milliseconds they take are included.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use testbed::topo::{EP1, EP2, Topology, in_netns};

use super::traffic::contenders::{AgentSource, start_extproxy};
use crate::report::Cell;

const SERVICE_IP: &str = "10.96.0.10";
const SERVICE_PORT: u16 = 80;
const ENDPOINT_PORT: u16 = 8080;
/// One connection started every PACE.
const PACE: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive connections to the healthy endpoint that say the failed one is out: 1 s of
/// them; with both endpoints in use, 20 in a row by chance is one in a million.
const RUN: usize = 20;
/// How long a scenario may take to get each of its figures before the round fails.
const OFF_WITHIN: Duration = Duration::from_secs(20);
const BACK_WITHIN: Duration = Duration::from_secs(40);

/// The issue's targets, in seconds.
pub const PORT_CLOSED_TARGET_S: f64 = 3.0;
pub const HOST_SILENT_TARGET_S: f64 = 4.0;
pub const BACK_TARGET_S: f64 = 3.0;

/// The target's check: interval 1s, timeout 500ms, thresholds 2/2.
const FAST_TCP: &str = "extproxy.io/health-check: tcp
extproxy.io/health-check-interval: 1s
extproxy.io/health-check-timeout: 500ms
extproxy.io/health-check-unhealthy-threshold: \"2\"
extproxy.io/health-check-healthy-threshold: \"2\"";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    PortClosed,
    HostSilent,
    PassivePortClosed,
}

pub const SCENARIOS: [Scenario; 3] = [
    Scenario::PortClosed,
    Scenario::HostSilent,
    Scenario::PassivePortClosed,
];

impl Scenario {
    /// The prefix of its measures in the records.
    pub fn key(self) -> &'static str {
        match self {
            Scenario::PortClosed => "port_closed",
            Scenario::HostSilent => "host_silent",
            Scenario::PassivePortClosed => "passive_port_closed",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Scenario::PortClosed => "server stopped (port closed), active check",
            Scenario::HostSilent => "host silent (packets dropped), active check",
            Scenario::PassivePortClosed => "server stopped (port closed), passive only",
        }
    }

    fn annotations(self) -> &'static str {
        match self {
            Scenario::PortClosed | Scenario::HostSilent => FAST_TCP,
            Scenario::PassivePortClosed => "",
        }
    }
}

/// What one round measured.
#[derive(Debug)]
struct Outcome {
    off: Duration,
    failed: usize,
    back: Duration,
    /// The agent's verdict for the failed endpoint (its log's cause), if it logged one.
    cause: Option<String>,
}

/// Every scenario, `rounds` times; one record per figure and round (a failed round's records
/// say why instead of giving a value).
pub fn run(rounds: usize, agent_bin: &Path) -> Result<Vec<Value>> {
    println!(
        "== health: endpoints failing and recovering, {rounds} round(s) per scenario (a connection \
         every {} ms)",
        PACE.as_millis()
    );
    let mut out = Vec::new();
    for scenario in SCENARIOS {
        for round in 0..rounds {
            let record = |measure: &str, value: Value, unit: &str| {
                json!({
                    "suite": "health",
                    "measure": format!("{}_{measure}", scenario.key()),
                    "contender": "extproxy",
                    "services": 1,
                    "round": round,
                    "value": value,
                    "unit": unit,
                })
            };
            match measure_round(agent_bin, scenario) {
                Ok(o) => {
                    println!(
                        "  {}, round {}: off after {:.2} s, {} failed connection(s), back {:.2} s after recovery{}",
                        scenario.label(),
                        round + 1,
                        o.off.as_secs_f64(),
                        o.failed,
                        o.back.as_secs_f64(),
                        o.cause
                            .as_deref()
                            .map(|c| format!(" (agent: {c})"))
                            .unwrap_or_default()
                    );
                    let mut off = record("off_s", json!(o.off.as_secs_f64()), "s");
                    if let Some(cause) = &o.cause {
                        off["note"] = json!(cause);
                    }
                    out.push(off);
                    out.push(record("failed", json!(o.failed), "connections"));
                    out.push(record("back_s", json!(o.back.as_secs_f64()), "s"));
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    println!("  {}, round {}: failed: {why}", scenario.label(), round + 1);
                    for (measure, unit) in
                        [("off_s", "s"), ("failed", "connections"), ("back_s", "s")]
                    {
                        let mut r = record(measure, Value::Null, unit);
                        r["failed"] = json!(why);
                        out.push(r);
                    }
                }
            }
        }
    }
    Ok(out)
}

fn manifest(annotations: &str) -> String {
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
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: bench
{annotations}spec:
  clusterIP: {SERVICE_IP}
  ports:
    - {{name: http, port: {SERVICE_PORT}, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: bench
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
  - {{name: http, port: {ENDPOINT_PORT}, protocol: TCP}}
endpoints:
  - addresses: ["{EP1}"]
  - addresses: ["{EP2}"]
"#
    )
}

const NFT_DROP: &str = "nft add table inet xphealth
nft add chain inet xphealth in '{ type filter hook prerouting priority -300; }'
nft add rule inet xphealth in ip daddr 203.0.113.7 drop";

fn measure_round(agent_bin: &Path, scenario: Scenario) -> Result<Outcome> {
    // The topology takes the machine lock and removes its namespaces and pins when dropped,
    // after the agent and the client (declared later, dropped first).
    let topo = Topology::new("hbench");
    let failed_ep: Ipv4Addr = EP1.parse()?;
    let healthy_ep: Ipv4Addr = EP2.parse()?;
    let mut ep1 = Some(EndpointServer::start(&topo.ext.name, failed_ep)?);
    let _ep2 = EndpointServer::start(&topo.ext.name, healthy_ep)?;
    std::fs::write(
        topo.manifests().join("svc.yaml"),
        manifest(scenario.annotations()),
    )?;
    let manifests = topo.manifests();
    let mut agent = start_extproxy(
        agent_bin,
        &topo,
        AgentSource::Manifests { dir: &manifests },
        &[],
    )?;
    agent.wait_for_log("extproxy is running", Duration::from_secs(60))?;
    let client = Client::start(&topo.pod.name);
    let result = (|| -> Result<Outcome> {
        client.wait_for(Duration::from_secs(10), "both endpoints answering", |s| {
            [failed_ep, healthy_ep]
                .iter()
                .all(|ep| s.iter().any(|a| a.answer == Some(Answer::Endpoint(*ep))))
                .then_some(())
        })?;
        // The first probe waits a random part of the interval: let every check have run once
        // (and passed) before the fault, as on a node that has been up for a while.
        std::thread::sleep(Duration::from_millis(1500));

        let fault = Instant::now();
        match scenario {
            Scenario::PortClosed | Scenario::PassivePortClosed => drop(ep1.take()),
            Scenario::HostSilent => {
                topo.ext.sh(NFT_DROP);
            }
        }
        let from = client.first_started_at(fault);
        let off_at = client.wait_for(OFF_WITHIN, "new flows off the failed endpoint", |s| {
            run_start(s, from, healthy_ep)
        })?;
        // run_start waits for every connection before the run to finish: the count is final.
        let attempts = client.snapshot();
        let off = attempts[off_at].started - fault;
        let failed = attempts[from..off_at]
            .iter()
            .filter(|a| a.answer == Some(Answer::Failed))
            .count();
        agent.check_alive()?;

        let recovered = Instant::now();
        match scenario {
            Scenario::PortClosed | Scenario::PassivePortClosed => {
                ep1 = Some(EndpointServer::start(&topo.ext.name, failed_ep)?)
            }
            Scenario::HostSilent => {
                topo.ext.sh("nft delete table inet xphealth");
            }
        }
        let from = client.first_started_at(recovered);
        let back_at = client.wait_for(BACK_WITHIN, "new flows to the endpoint again", |s| {
            s[from..]
                .iter()
                .position(|a| a.answer == Some(Answer::Endpoint(failed_ep)))
                .map(|i| from + i)
        })?;
        let back = client.snapshot()[back_at].started - recovered;
        let cause = agent.log_text().lines().find_map(|l| {
            let (_, cause) = l
                .split_once(&format!("{EP1}:{ENDPOINT_PORT} "))?
                .1
                .split_once("is unhealthy: ")?;
            Some(cause.trim().to_owned())
        });
        Ok(Outcome {
            off,
            failed,
            back,
            cause,
        })
    })();
    client.stop();
    drop(agent);
    drop(ep1);
    result
}

/// Where the first run of [`RUN`] connections from index `from` on all reached `healthy`.
fn run_start(attempts: &[Attempt], from: usize, healthy: Ipv4Addr) -> Option<usize> {
    let mut streak = 0;
    for (i, a) in attempts.iter().enumerate().skip(from) {
        match a.answer {
            Some(Answer::Endpoint(ep)) if ep == healthy => {
                streak += 1;
                if streak == RUN {
                    return Some(i + 1 - RUN);
                }
            }
            // Still under way: whatever it becomes decides the run.
            None => return None,
            _ => streak = 0,
        }
    }
    None
}

// -------------------------------------------------------------------------------------------------
// The endpoints' servers and the client
// -------------------------------------------------------------------------------------------------

/// Answers every connection to `ip:8080` with `ep=IP` and closes it. Dropping it closes the
/// port at once (nothing accepted is left waiting, unlike a server that finishes its
/// connections first), so the fault's instant is the drop's.
struct EndpointServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EndpointServer {
    fn start(ns: &str, ip: Ipv4Addr) -> Result<Self> {
        let addr = SocketAddr::from((ip, ENDPOINT_PORT));
        // std sets SO_REUSEADDR: a restarted server binds again despite TIME_WAIT.
        let listener = in_netns(ns, || TcpListener::bind(addr))
            .with_context(|| format!("listening on {addr} in {ns}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let line = format!("ep={ip}\n");
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.write_all(line.as_bytes());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Ok(EndpointServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EndpointServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Endpoint(Ipv4Addr),
    /// Refused, reset, timed out, or closed without an answer.
    Failed,
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    started: Instant,
    /// None while under way.
    answer: Option<Answer>,
}

/// Starts a connection to the Service every [`PACE`] from the pod, each on its own thread.
struct Client {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    pacer: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl Client {
    fn start(pod_ns: &str) -> Self {
        let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (list, stopping, ns) = (attempts.clone(), stop.clone(), pod_ns.to_owned());
        let pacer = std::thread::spawn(move || {
            let epoch = Instant::now();
            let mut threads = Vec::new();
            let mut i = 0u32;
            while !stopping.load(Ordering::SeqCst) {
                let index = {
                    let mut list = list.lock().expect("attempts");
                    list.push(Attempt {
                        started: Instant::now(),
                        answer: None,
                    });
                    list.len() - 1
                };
                let (list, ns) = (list.clone(), ns.clone());
                threads.push(std::thread::spawn(move || {
                    let answer = in_netns(&ns, connect_once);
                    list.lock().expect("attempts")[index].answer = Some(answer);
                }));
                // Finished threads need no joining later.
                threads.retain(|t| !t.is_finished());
                i += 1;
                let next = epoch + PACE * i;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            threads
        });
        Client {
            attempts,
            stop,
            pacer: Some(pacer),
        }
    }

    fn snapshot(&self) -> Vec<Attempt> {
        self.attempts.lock().expect("attempts").clone()
    }

    /// The index of the first connection started at or after `t` (the next one to start, if
    /// none has yet).
    fn first_started_at(&self, t: Instant) -> usize {
        let attempts = self.attempts.lock().expect("attempts");
        attempts
            .iter()
            .position(|a| a.started >= t)
            .unwrap_or(attempts.len())
    }

    /// Polls the connections until `found` returns something (or `within` passes: an error
    /// naming `what`).
    fn wait_for<T>(
        &self,
        within: Duration,
        what: &str,
        found: impl Fn(&[Attempt]) -> Option<T>,
    ) -> Result<T> {
        let start = Instant::now();
        loop {
            if let Some(v) = found(&self.snapshot()) {
                return Ok(v);
            }
            if start.elapsed() > within {
                let s = self.snapshot();
                let failed = s
                    .iter()
                    .filter(|a| a.answer == Some(Answer::Failed))
                    .count();
                bail!(
                    "no {what} within {within:?} ({} connections, {failed} failed)",
                    s.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops starting connections and waits for those under way (their timeouts bound it).
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(pacer) = self.pacer.take()
            && let Ok(threads) = pacer.join()
        {
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One connection to the Service from the calling thread's namespace: who answered.
fn connect_once() -> Answer {
    let attempt = || -> std::io::Result<Ipv4Addr> {
        use socket2::{Domain, Socket, Type};
        let sa = SocketAddr::new(SERVICE_IP.parse().expect("address"), SERVICE_PORT);
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        sock.connect_timeout(&sa.into(), CONNECT_TIMEOUT)?;
        let stream: std::net::TcpStream = sock.into();
        stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        line.trim()
            .strip_prefix("ep=")
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("unexpected answer {line:?}")))
    };
    attempt().map_or(Answer::Failed, Answer::Endpoint)
}

// -------------------------------------------------------------------------------------------------
// BENCHMARKS.md
// -------------------------------------------------------------------------------------------------

type Cells = BTreeMap<(String, String, String, u64), Cell>;

fn cell<'a>(c: &'a Cells, scenario: Scenario, figure: &str) -> Option<&'a Cell> {
    c.get(&(
        "health".to_owned(),
        format!("{}_{figure}", scenario.key()),
        "extproxy".to_owned(),
        1,
    ))
    .filter(|x| x.rounds > 0 && x.median.is_finite())
}

/// `median (min–max)` with `digits` decimals.
fn spread(c: &Cell, digits: usize) -> String {
    if (c.max - c.min).abs() < f64::EPSILON {
        format!("{:.digits$}", c.median)
    } else {
        format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            c.median, c.min, c.max
        )
    }
}

/// The Targets table's rows: (target, measured, met). Judged on the worst round.
pub fn targets(c: &Cells) -> Vec<(String, String, Option<bool>)> {
    let mut out = Vec::new();
    let check = "active `tcp` check, interval 1s, timeout 500ms, thresholds 2/2";
    for (scenario, what, bar) in [
        (
            Scenario::PortClosed,
            "An endpoint whose server stops (port closed) gets no new flows within 3 s",
            PORT_CLOSED_TARGET_S,
        ),
        (
            Scenario::HostSilent,
            "An endpoint whose host stops answering (packets dropped) gets no new flows within 4 s",
            HOST_SILENT_TARGET_S,
        ),
    ] {
        if let Some(off) = cell(c, scenario, "off_s") {
            let failed = cell(c, scenario, "failed")
                .map(|f| format!(", {} failed client connections", spread(f, 0)))
                .unwrap_or_default();
            out.push((
                format!("{what} ({check}; issue 11)"),
                format!("{} s over {} round(s){failed}", spread(off, 2), off.rounds),
                Some(off.max <= bar),
            ));
        }
    }
    let backs: Vec<(&str, &Cell)> = [
        (Scenario::PortClosed, "port closed"),
        (Scenario::HostSilent, "host silent"),
    ]
    .into_iter()
    .filter_map(|(s, name)| Some((name, cell(c, s, "back_s")?)))
    .collect();
    if !backs.is_empty() {
        out.push((
            "Either gets new flows again within 3 s of recovering (issue 11)".to_owned(),
            backs
                .iter()
                .map(|(name, x)| format!("{name} {} s", spread(x, 2)))
                .collect::<Vec<_>>()
                .join(", "),
            Some(backs.iter().all(|(_, x)| x.max <= BACK_TARGET_S)),
        ));
    }
    out
}

/// The section of BENCHMARKS.md, if the run measured health.
pub fn section(c: &Cells) -> Option<String> {
    let any = c.keys().any(|(suite, ..)| suite == "health");
    if !any {
        return None;
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Health checking\n\nThe agent in manifest mode with its defaults, one Service with two \
         endpoints; the first fails, then recovers. A client in the pod starts a connection every \
         {} ms (each on its own, 2 s connect timeout) and records which endpoint answered. **Off**: \
         from the fault to the start of the first of {RUN} consecutive connections that all reached \
         the other endpoint; **failed**: the connections started in between that failed; **back**: \
         from the recovery to the first connection the endpoint answered. Median of the rounds \
         (range); a fresh agent each round. Active check: `tcp`, interval 1s, timeout 500ms, \
         thresholds 2/2; passive detection is always on. Targets: port closed off within {} s, \
         host silent within {} s, back within {} s.\n",
        PACE.as_millis(),
        PORT_CLOSED_TARGET_S,
        HOST_SILENT_TARGET_S,
        BACK_TARGET_S,
    );
    let _ = writeln!(
        md,
        "| fault | off (s) | failed connections | back after recovery (s) | agent's verdict |\n|---|---|---|---|---|"
    );
    for s in SCENARIOS {
        let text = |figure: &str, digits: usize| {
            let key = (
                "health".to_owned(),
                format!("{}_{figure}", s.key()),
                "extproxy".to_owned(),
                1,
            );
            match (cell(c, s, figure), c.get(&key)) {
                (Some(x), _) => {
                    let failed = if x.failed.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} round(s) failed)", x.failed.len())
                    };
                    spread(x, digits) + &failed
                }
                (None, Some(x)) if !x.failed.is_empty() => {
                    format!("failed: {}", x.failed[0].replace('\n', " "))
                }
                _ => "-".to_owned(),
            }
        };
        let cause = cell(c, s, "off_s")
            .and_then(|x| x.note.clone())
            .unwrap_or_else(|| "-".to_owned());
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {cause} |",
            s.label(),
            text("off_s", 2),
            text("failed", 0),
            text("back_s", 2)
        );
    }
    let _ = writeln!(
        md,
        "\nEvery connection the client starts towards the failed endpoint before it is out fails, \
         so the failed count grows with the client's rate (here 20 a second, half of them to each \
         endpoint): a silent host costs more than a closed port because each of its failures \
         takes the client's SYN retransmission (1 s) to be seen. Passive only: an ejection lasts \
         5 s, so the endpoint comes back when that is over (the server here returns as soon as \
         20 connections in a row have avoided it, about a second after the ejection). The last \
         column is one round's first verdict from the agent's log.\n"
    );
    Some(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, answers: &[Option<Answer>]) -> Vec<Attempt> {
        answers
            .iter()
            .enumerate()
            .map(|(i, a)| Attempt {
                started: base + PACE * i as u32,
                answer: *a,
            })
            .collect()
    }

    #[test]
    fn the_run_starts_after_the_last_connection_that_did_not_avoid_the_endpoint() {
        let (bad, good) = (Ipv4Addr::new(203, 0, 113, 7), Ipv4Addr::new(203, 0, 113, 8));
        let mut answers = vec![
            Some(Answer::Endpoint(good)),
            Some(Answer::Failed),
            Some(Answer::Endpoint(good)),
            Some(Answer::Endpoint(bad)),
        ];
        answers.extend(std::iter::repeat_n(Some(Answer::Endpoint(good)), RUN - 1));
        let attempts = at(Instant::now(), &answers);
        assert_eq!(run_start(&attempts, 0, good), None, "one short of a run");
        answers.push(Some(Answer::Endpoint(good)));
        assert_eq!(run_start(&at(Instant::now(), &answers), 0, good), Some(4));
        // A connection under way inside the run keeps it undecided.
        answers[10] = None;
        assert_eq!(run_start(&at(Instant::now(), &answers), 0, good), None);
    }

    #[test]
    fn the_section_and_targets_show_medians_ranges_and_failed_rounds() {
        let mut records = Vec::new();
        for (round, off, failed, back) in [(0, 0.4, 3, 1.5), (1, 0.6, 5, 1.9), (2, 0.5, 4, 1.6)] {
            for (measure, value) in [
                ("port_closed_off_s", json!(off)),
                ("port_closed_failed", json!(failed)),
                ("port_closed_back_s", json!(back)),
                ("host_silent_off_s", json!(off + 4.0)),
                ("host_silent_back_s", json!(back)),
            ] {
                records.push(json!({"suite": "health", "measure": measure,
                    "contender": "extproxy", "services": 1, "round": round, "value": value}));
            }
        }
        records.push(
            json!({"suite": "health", "measure": "passive_port_closed_off_s",
            "contender": "extproxy", "services": 1, "round": 0, "value": null,
            "failed": "no new flows off the failed endpoint within 20s"}),
        );
        let c = crate::report::cells(&records);
        let t = targets(&c);
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(
            t[0].1,
            "0.50 (0.40–0.60) s over 3 round(s), 4 (3–5) failed client connections"
        );
        assert_eq!(t[0].2, Some(true));
        assert_eq!(t[1].2, Some(false), "4.4-4.6 s misses 4 s");
        assert_eq!(t[2].2, Some(true));
        let md = section(&c).unwrap();
        assert!(
            md.contains("| server stopped (port closed), active check | 0.50 (0.40–0.60) | 4 (3–5) | 1.60 (1.50–1.90) |"),
            "{md}"
        );
        assert!(
            md.contains("| failed: no new flows off the failed endpoint within 20s |"),
            "{md}"
        );
        assert!(section(&crate::report::cells(&[])).is_none());
    }
}
