//! The measures of one run: traffic from the pod through the contender, each for a fixed time,
//! and the programming latency seen from outside.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use testbed::{
    load::{self, ConnectOpts, LoadServer, OpStats, Probe, Tally},
    netns::NamedNetns,
    topo::Topology,
};

use super::{
    Contender, MIN_PROGRAMMING_SAMPLES, Measure, Record, Routes, STALL, TrafficOpts,
    cluster::{self, Cluster},
    contenders::in_netns_cmd,
    layout::{self, ENDPOINTS, Layout},
};

/// What the measures of one run share.
pub struct Ctx<'a> {
    pub opts: &'a TrafficOpts,
    pub pod: &'a str,
    pub pod_ip: IpAddr,
    pub routes: &'a Routes,
    pub server: &'a LoadServer,
    /// The many-clients measures' source addresses in the pod.
    pub clients: &'a [IpAddr],
    pub topo: &'a Topology,
}

/// Waits until the endpoints accept no more connections (at most 2 s): connections a previous
/// step abandoned in flight (a probe, a load worker at its deadline) may have completed their
/// handshake and still wait in the server's accept queue, and must not be counted in the next
/// step's tally.
pub fn settle(server: &LoadServer) {
    let start = Instant::now();
    let mut last = server.tcp_tally().total();
    while start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
        let now = server.tcp_tally().total();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Short connections until every endpoint of the four-endpoint Service has answered, and the
/// one-endpoint Service's only endpoint (neighbour entries resolved, programs and rules warm),
/// checking the endpoints saw the expected source.
pub fn warm_up(pod: &str, routes: &Routes, server: &LoadServer, clients: &[IpAddr]) -> Result<()> {
    let allowed = routes.sources(clients);
    settle(server);
    let before = server.tcp_tally();
    let stats = load::connection_rate(pod, &routes.four, 4, 1, Duration::from_millis(500))?;
    let seen = server.tcp_tally().since(&before);
    ensure!(
        stats.ops > 0,
        "no connection completed in 0.5 s ({} failed)",
        stats.errors
    );
    check_sources(&seen, &allowed, "TCP")?;
    ensure!(
        seen.by_endpoint.len() == ENDPOINTS.len(),
        "connections reached only {:?}, not all {} endpoints",
        seen.by_endpoint,
        ENDPOINTS.len()
    );
    settle(server);
    let before = server.tcp_tally();
    let stats = load::connection_rate(pod, &[routes.one], 2, 1, Duration::from_millis(200))?;
    ensure!(
        stats.ops > 0,
        "no connection to the one-endpoint Service completed ({} failed)",
        stats.errors
    );
    check_one_endpoint(&server.tcp_tally().since(&before))?;
    Ok(())
}

/// Every connection or datagram the endpoints counted came from an allowed source: the traffic
/// really went through the contender (SNAT to the node) or really kept its own address.
pub(super) fn check_sources(seen: &Tally, allowed: &BTreeSet<IpAddr>, what: &str) -> Result<()> {
    ensure!(seen.total() > 0, "the endpoints saw no {what} traffic");
    ensure!(
        seen.by_source.keys().all(|ip| allowed.contains(ip)),
        "the endpoints saw {what} traffic from {:?}, expected only {allowed:?}",
        seen.by_source.keys().collect::<Vec<_>>()
    );
    Ok(())
}

/// Only the one-endpoint Service's endpoint was reached.
fn check_one_endpoint(seen: &Tally) -> Result<()> {
    let one = IpAddr::V4(layout::ONE_ENDPOINT);
    ensure!(
        seen.by_endpoint.keys().all(|ip| *ip == one),
        "the one-endpoint Service reached {:?}",
        seen.by_endpoint
    );
    Ok(())
}

fn from_ops(stats: &OpStats, base: Record) -> Record {
    Record {
        value: stats.per_second(),
        p50_us: stats.latency_us(0.50),
        p99_us: stats.latency_us(0.99),
        count: stats.ops,
        errors: stats.errors,
        stalled: Some(stats.slower_than(STALL)),
        seconds: stats.elapsed.as_secs_f64(),
        ..base
    }
}

pub fn measure_one(ctx: &Ctx<'_>, measure: Measure, base: Record) -> Result<Record> {
    let opts = ctx.opts;
    let duration = opts.duration(measure);
    let base = Record {
        seconds: duration.as_secs_f64(),
        ..base
    };
    let pod_only = [ctx.pod_ip];
    settle(ctx.server);
    let closed_loop = |sources: Vec<IpAddr>, rate: Option<f64>, workers: usize| ConnectOpts {
        workers,
        threads: opts.threads,
        sources,
        rate,
    };
    let tcp_before = ctx.server.tcp_tally();
    let mut clients: &[IpAddr] = &pod_only;
    let record = match measure {
        Measure::NewConnections | Measure::NewConnectionsOneEndpoint => {
            let targets = if measure == Measure::NewConnections {
                ctx.routes.four.clone()
            } else {
                vec![ctx.routes.one]
            };
            let stats = load::connections(
                ctx.pod,
                &targets,
                &closed_loop(Vec::new(), None, opts.workers),
                duration,
            )?;
            let seen = ctx.server.tcp_tally().since(&tcp_before);
            ensure!(
                seen.total() >= stats.ops,
                "the endpoints accepted {} connections, the client completed {}",
                seen.total(),
                stats.ops
            );
            if measure == Measure::NewConnectionsOneEndpoint {
                check_one_endpoint(&seen)?;
            }
            from_ops(&stats, base)
        }
        Measure::ManyClients | Measure::ManyClientsMax => {
            clients = ctx.clients;
            let (rate, workers) = if measure == Measure::ManyClients {
                // Enough workers that connections waiting for a resent SYN (a second each) do
                // not hold the offered rate back.
                (Some(opts.many_clients_rate), 64)
            } else {
                (None, opts.workers)
            };
            let stats = load::connections(
                ctx.pod,
                &[ctx.routes.one],
                &closed_loop(ctx.clients.to_vec(), rate, workers),
                duration,
            )?;
            let seen = ctx.server.tcp_tally().since(&tcp_before);
            check_one_endpoint(&seen)?;
            if !ctx.routes.snat {
                ensure!(
                    seen.by_source.len() == ctx.clients.len(),
                    "the endpoint saw {} client addresses, {} called",
                    seen.by_source.len(),
                    ctx.clients.len()
                );
            }
            Record {
                offered: rate,
                ..from_ops(&stats, base)
            }
        }
        Measure::Requests => from_ops(
            &load::request_rate(
                ctx.pod,
                &ctx.routes.four,
                opts.workers,
                opts.threads,
                duration,
            )?,
            base,
        ),
        Measure::ConnectionLatency | Measure::RequestLatency => {
            let stats = if measure == Measure::ConnectionLatency {
                load::connection_rate(ctx.pod, &ctx.routes.four, 1, 1, duration)?
            } else {
                load::request_rate(ctx.pod, &ctx.routes.four, 1, 1, duration)?
            };
            Record {
                value: stats
                    .latency_us(0.99)
                    .context("not one operation completed")?,
                ..from_ops(&stats, base)
            }
        }
        Measure::TcpThroughput => {
            let (bytes, elapsed) = load::tcp_stream(ctx.pod, ctx.routes.four[0], duration)?;
            Record {
                value: bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
                count: bytes,
                seconds: elapsed.as_secs_f64(),
                ..base
            }
        }
        Measure::TcpThroughputOffload => throughput_with_offloads(ctx, duration, base)?,
        Measure::UdpPackets => {
            let before = ctx.server.udp_tally();
            let sent = load::udp_flood(ctx.pod, ctx.routes.udp, duration)?;
            // Let the datagrams still in queues arrive.
            std::thread::sleep(Duration::from_millis(300));
            let seen = ctx.server.udp_tally().since(&before);
            check_sources(&seen, &ctx.routes.sources(&pod_only), "UDP")?;
            let received = seen.total();
            Record {
                value: received as f64 / duration.as_secs_f64(),
                count: received,
                errors: sent.saturating_sub(received),
                loss: Some(1.0 - received as f64 / sent.max(1) as f64),
                ..base
            }
        }
        Measure::FirstAnswer | Measure::ProgrammingLatency => {
            bail!("{measure} is not a traffic measure")
        }
    };
    if measure != Measure::UdpPackets {
        check_sources(
            &ctx.server.tcp_tally().since(&tcp_before),
            &ctx.routes.sources(clients),
            "TCP",
        )?;
    }
    Ok(record)
}

// -------------------------------------------------------------------------------------------------
// Throughput with offloads, checksums verified
// -------------------------------------------------------------------------------------------------

/// Checksum errors a namespace's stack counted on receive (IP header, TCP, UDP, ICMP: every
/// `InCsumErrors` of /proc/net/snmp and /proc/net/netstat there).
fn checksum_errors(ns: &NamedNetns) -> Result<u64> {
    let args = ["/proc/net/snmp".into(), "/proc/net/netstat".into()];
    let out = in_netns_cmd(&ns.name, "cat", &args, None)?;
    ensure!(
        out.status.success(),
        "reading /proc/net/snmp in {}",
        ns.name
    );
    Ok(sum_csum_errors(&String::from_utf8_lossy(&out.stdout)))
}

/// The sum of every `InCsumErrors` column in /proc/net/snmp's or /proc/net/netstat's text
/// (header and value lines come in pairs per protocol).
fn sum_csum_errors(snmp: &str) -> u64 {
    let lines: Vec<&str> = snmp.lines().collect();
    lines
        .chunks(2)
        .filter_map(|pair| {
            let [names, values] = pair else { return None };
            let col = names.split_whitespace().position(|n| n == "InCsumErrors")?;
            values.split_whitespace().nth(col)?.parse::<u64>().ok()
        })
        .sum()
}

/// Packets a device in a namespace received (`rx`) or sent.
fn link_packets(ns: &NamedNetns, dev: &str, rx: bool) -> Result<u64> {
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "-s", "-j", "link", "show", dev])
        .output()?;
    ensure!(out.status.success(), "ip -s link show {dev} in {}", ns.name);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["stats64"][if rx { "rx" } else { "tx" }]["packets"]
        .as_u64()
        .with_context(|| format!("no packet count for {dev} in {v}"))
}

/// One stream with the node's links offloading like a NIC; after the node the wire segments and
/// checksums in software, and both ends verify every checksum. Any checksum error fails the run.
fn throughput_with_offloads(ctx: &Ctx<'_>, duration: Duration, base: Record) -> Result<Record> {
    let topo = ctx.topo;
    let wire = topo
        .wire
        .as_ref()
        .context("the offload measure needs the offload topology")?;
    let csum_before = (checksum_errors(&topo.ext)?, checksum_errors(&topo.pod)?);
    let packets_before = (
        link_packets(wire, "w0", true)?,
        link_packets(wire, "w1", false)?,
    );
    let (bytes, elapsed) = load::tcp_stream(ctx.pod, ctx.routes.four[0], duration)?;
    let csum = (
        checksum_errors(&topo.ext)? - csum_before.0,
        checksum_errors(&topo.pod)? - csum_before.1,
    );
    let from_node = link_packets(wire, "w0", true)? - packets_before.0;
    let segments = link_packets(wire, "w1", false)? - packets_before.1;
    ensure!(
        csum == (0, 0),
        "checksum errors after the translation: {} at the endpoints, {} in the pod",
        csum.0,
        csum.1
    );
    let ratio = segments as f64 / from_node.max(1) as f64;
    // Without super-packets from the node the hop proves nothing: the harness is broken (the
    // contenders may legitimately send smaller packets; direct must not).
    ensure!(
        base.contender != Contender::Direct || ratio >= 1.5,
        "the node sent {from_node} packets and the wire {segments} segments: no TSO/GSO on the \
         node's uplink, the offload topology is not what it claims"
    );
    Ok(Record {
        value: bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        count: bytes,
        seconds: elapsed.as_secs_f64(),
        note: Some(format!(
            "{from_node} packets from the node became {segments} segments on the wire \
             ({ratio:.1} per packet); no checksum errors at either end"
        )),
        ..base
    })
}

// -------------------------------------------------------------------------------------------------
// Programming latency
// -------------------------------------------------------------------------------------------------

/// Moves the one-endpoint Service's endpoint back and forth through the API (a merge patch of
/// its EndpointSlice, one every 1-2 s) while the pod keeps asking which endpoint answers (a new
/// connection every millisecond). A sample is the time from sending the write to the SYN of the
/// first connection the new endpoint answered.
pub fn programming_latency(
    ctx: &Ctx<'_>,
    cluster: &Cluster,
    layout: &Layout,
    first_answer: Option<Duration>,
    base: Record,
) -> Result<Record> {
    let samples = ctx.opts.programming_samples.max(1);
    // iptables mode at 10k rewrites everything per change; give it what its start took.
    let timeout = Duration::from_secs(60).max(first_answer.unwrap_or_default() * 3);
    let probes: Mutex<Vec<Probe>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (latencies, failed) = std::thread::scope(|s| -> Result<(Vec<Duration>, Vec<String>)> {
        let prober = s.spawn(|| {
            load::probe_endpoints(
                ctx.pod,
                ctx.routes.one,
                Some(super::PROBER.into()),
                Duration::from_millis(1),
                Duration::from_secs(1),
                |probe| {
                    probes.lock().expect("probes").push(probe);
                    !stop.load(Ordering::Relaxed)
                },
            )
        });
        let result = cluster.with_connection(|conn| {
            let mut latencies = Vec::with_capacity(samples);
            let mut failed = Vec::new();
            let mut at = layout::ONE_ENDPOINT;
            let mut jitter = Jitter::new();
            let mut k = 0;
            // Until enough samples (or enough time, with a few), and an even number of moves:
            // the Service ends where it started.
            while (k < samples
                && (k < MIN_PROGRAMMING_SAMPLES || started.elapsed() < ctx.opts.programming_budget))
                || k % 2 == 1
            {
                // kube-proxy syncs at most once a second (minSyncPeriod) after a burst of two:
                // 1-2 s apart, every change finds it ready, as changes spread over time would.
                std::thread::sleep(Duration::from_millis(1_000 + jitter.next() % 1_000));
                let to = if at == layout::ONE_ENDPOINT {
                    layout::ALTERNATE_ENDPOINT
                } else {
                    layout::ONE_ENDPOINT
                };
                let sent = cluster::move_target(conn, layout, to)?;
                let (latency, errors) = wait_for_switch(&probes, sent, to, timeout)?;
                at = to;
                if k < samples {
                    latencies.push(latency);
                    failed.extend(errors);
                }
                k += 1;
            }
            Ok((latencies, failed))
        });
        stop.store(true, Ordering::Relaxed);
        prober.join().expect("the prober panicked")?;
        result
    })?;
    let mut sorted = latencies.clone();
    sorted.sort_unstable();
    let pct = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    // Connections refused or lost while the proxy switched: what a client would have seen.
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for f in &failed {
        *kinds.entry(f.as_str()).or_default() += 1;
    }
    let detail = if failed.is_empty() {
        base.detail.clone()
    } else {
        let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!(
            "{}; connections that failed during the switches: {}",
            base.detail,
            list.join(", ")
        )
    };
    Ok(Record {
        value: pct(0.99).as_secs_f64() * 1e3,
        p50_us: Some(us(pct(0.50))),
        p99_us: Some(us(pct(0.99))),
        count: latencies.len() as u64,
        errors: failed.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        detail,
        ..base
    })
}

/// Waits until a connection started after `sent` was answered by `to`: the latency (from `sent`
/// to that connection's SYN) and how the connections started meanwhile that failed failed.
fn wait_for_switch(
    probes: &Mutex<Vec<Probe>>,
    sent: Instant,
    to: Ipv4Addr,
    timeout: Duration,
) -> Result<(Duration, Vec<String>)> {
    let to = IpAddr::V4(to);
    loop {
        {
            let mut probes = probes.lock().expect("probes");
            if let Some(switched) = probes
                .iter()
                .filter(|p| p.started >= sent && p.endpoint() == Some(to))
                .map(|p| p.started)
                .min()
            {
                let failed = probes
                    .iter()
                    .filter(|p| p.started >= sent && p.started < switched)
                    .filter_map(|p| p.outcome.err())
                    .map(|kind| kind.to_string())
                    .collect();
                // What came before is no longer needed (the prober keeps appending).
                probes.retain(|p| p.started >= switched);
                return Ok((switched - sent, failed));
            }
        }
        ensure!(
            sent.elapsed() < timeout,
            "traffic did not move to {to} within {timeout:?} of the API write"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A little spread for the gaps between changes (no need for a random number crate).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Jitter(seed)
    }

    fn next(&mut self) -> u64 {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The proxy's own programming-latency histogram (from the trigger-time annotation the writes
/// carry), as a side note: its buckets are coarse.
pub fn own_programming_metric(topo: &Topology, contender: Contender) -> Option<String> {
    let (addr, name, who) = if contender.is_kube_proxy() {
        (
            "127.0.0.1:10249",
            "kubeproxy_network_programming_duration_seconds",
            "kube-proxy",
        )
    } else {
        (
            "127.0.0.1:9464",
            "extproxy_network_programming_duration_seconds",
            "extproxy",
        )
    };
    let addr: SocketAddr = addr.parse().ok()?;
    let text = testbed::topo::in_netns(&topo.node.name, || http_get(addr, "/metrics")).ok()?;
    let buckets = histogram(&text, name);
    let total = buckets.last()?.1;
    if total == 0 {
        return Some(format!("{who}'s own metric {name}: no observations"));
    }
    let bound = |q: f64| -> String {
        let rank = (total as f64 * q).ceil().max(1.0) as u64;
        buckets
            .iter()
            .find(|(_, count)| *count >= rank)
            .map(|(le, _)| {
                if le.is_finite() {
                    format!("<= {le} s")
                } else {
                    "above the last bucket".to_owned()
                }
            })
            .unwrap_or_default()
    };
    Some(format!(
        "{who}'s own {name} ({total} observations, bucket bounds): p50 {}, p99 {}",
        bound(0.5),
        bound(0.99)
    ))
}

/// `(le, cumulative count)` of a Prometheus histogram, in order.
fn histogram(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, u64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offload topology's proof of correctness must be able to fail: a translation that
    /// gets the checksum seed of a partially checksummed packet wrong (here an nftables rule on
    /// the node that overwrites the TCP checksum field, as a rewrite of the pseudo-header's
    /// addresses without the seed's update would leave it) must show up as checksum errors at
    /// the endpoints, after the wire's software checksumming.
    #[test]
    #[ignore = "needs root; creates network namespaces"]
    fn the_offload_hop_catches_a_translation_that_breaks_checksums() {
        let topo = Topology::with_wire("csumt", testbed::topo::Wire::Offloads);
        let before = checksum_errors(&topo.ext).unwrap();
        let attempt = |n: usize| {
            for _ in 0..n {
                let _ = testbed::topo::tcp_once(&topo.pod.name, None, "203.0.113.7", 8080);
            }
        };
        // The path is clean as built: nothing listens, so the SYNs are refused, correctly.
        attempt(3);
        assert_eq!(checksum_errors(&topo.ext).unwrap(), before);
        topo.node.sh("nft add table ip t
             nft add chain ip t p \"{ type filter hook postrouting priority 0; }\"
             nft add rule ip t p ip daddr 203.0.113.7 tcp dport 8080 @th,128,16 set 0x1234");
        attempt(3);
        let after = checksum_errors(&topo.ext).unwrap();
        assert!(
            after > before,
            "a rewritten source address without a checksum fix went unnoticed ({before} -> {after})"
        );
    }

    #[test]
    fn checksum_errors_are_summed_over_protocols() {
        let snmp = "Ip: Forwarding InReceives InCsumErrors\nIp: 1 100 0\n\
                    Icmp: InMsgs InErrors InCsumErrors\nIcmp: 5 0 1\n\
                    Tcp: RtoAlgorithm InSegs InCsumErrors\nTcp: 1 900 3\n\
                    Udp: InDatagrams InCsumErrors IgnoredMulti\nUdp: 7 2 0\n";
        assert_eq!(sum_csum_errors(snmp), 6);
        assert_eq!(sum_csum_errors(""), 0);
    }

    #[test]
    fn histogram_buckets_are_read_in_order() {
        let text = "# HELP x\nx_bucket{le=\"0.5\"} 3\nx_bucket{le=\"+Inf\"} 4\n\
                    x_bucket{le=\"0.25\"} 1\nx_count 4\ny_bucket{le=\"1\"} 9\n";
        assert_eq!(
            histogram(text, "x"),
            vec![(0.25, 1), (0.5, 3), (f64::INFINITY, 4)]
        );
    }

    #[test]
    fn a_switch_counts_from_the_first_syn_the_new_endpoint_answered() {
        let sent = Instant::now();
        let at = |ms: u64| sent + Duration::from_millis(ms);
        let probe = |started: Instant, ep: Option<Ipv4Addr>| Probe {
            started,
            finished: started + Duration::from_micros(300),
            outcome: ep
                .map(IpAddr::V4)
                .ok_or(std::io::ErrorKind::ConnectionRefused),
        };
        let old = layout::ONE_ENDPOINT;
        let new = layout::ALTERNATE_ENDPOINT;
        let probes = Mutex::new(vec![
            // Before the write, even if answered by the new one: not counted.
            probe(sent - Duration::from_millis(1), Some(new)),
            probe(at(1), Some(old)),
            probe(at(2), None),
            probe(at(5), Some(new)),
            probe(at(4), Some(new)),
        ]);
        let (latency, failed) =
            wait_for_switch(&probes, sent, new, Duration::from_secs(1)).unwrap();
        assert_eq!(latency, Duration::from_millis(4));
        assert_eq!(failed, vec!["connection refused"]);
        assert_eq!(probes.lock().unwrap().len(), 2);
        let err = wait_for_switch(&probes, at(100), old, Duration::from_millis(5)).unwrap_err();
        assert!(err.to_string().contains("did not move"), "{err}");
    }
}
