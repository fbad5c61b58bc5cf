//! Per-packet cost of the real programs, measured in the kernel with BPF_PROG_TEST_RUN, at 1, 1k,
//! 10k and 100k Services (4 endpoints each). Run by `cargo xtask bench`; needs root.
//!
//! The kernel reuses one buffer across the `repeat` iterations of a test run, so a packet the
//! program rewrites would stop being ours on the second iteration. Every sample is therefore a
//! single run on a fresh copy of the packet, timed by the kernel; the cost of an empty XDP
//! program measured the same way is reported beside it (and subtracted in the "net" figures).
//!
//! Output: one JSON object per line on stdout, `{"metric":..,"services":..,"ns":..}`, plus a
//! table on stderr.

use std::net::IpAddr;
use std::time::Instant;

use aya::programs::{SchedClassifier, Xdp};
use extproxy::loader::{self, Limits};
use extproxy_tests::{packet::*, *};
use proxy_common::*;

struct Args {
    runs: usize,
    rounds: usize,
    sizes: Vec<u32>,
    /// Measure only this metric (for profiling).
    only: Option<String>,
    /// Only report what the verifier walked for this eBPF object (e.g. an older build's), then
    /// stop.
    object: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        runs: 100_000,
        rounds: 3,
        sizes: vec![1, 1_000, 10_000, 100_000],
        only: None,
        object: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => a.runs = it.next().unwrap().parse().unwrap(),
            "--rounds" => a.rounds = it.next().unwrap().parse().unwrap(),
            "--sizes" => {
                a.sizes = it
                    .next()
                    .unwrap()
                    .split(',')
                    .map(|s| s.parse().unwrap())
                    .collect()
            }
            "--only" => a.only = it.next(),
            "--object" => a.object = it.next(),
            // cargo bench passes --bench; ignore what we do not know.
            _ => {}
        }
    }
    a
}

/// The outside client of the measured established flow.
const EST_CLIENT: &str = "198.51.100.9";

const EPS: [&str; 4] = ["203.0.113.7", "203.0.113.8", "203.0.113.9", "203.0.113.10"];

fn cluster_ip(i: u32) -> String {
    format!("10.{}.{}.{}", 96 + (i >> 16), (i >> 8) & 0xff, i & 0xff)
}

/// Programs services `from..to` straight into the maps, as the agent would.
fn program(dp: &mut Datapath, from: u32, to: u32) {
    use aya::maps::{Array, HashMap};
    let egress = addr(NODE_V4);
    let eps: Vec<Addr> = EPS.iter().map(|e| addr(e)).collect();
    {
        let mut backends: Array<_, BackendValue> =
            Array::try_from(dp.ebpf.map_mut(MAP_BACKENDS).unwrap()).unwrap();
        for i in from..to {
            for (j, ep) in eps.iter().enumerate() {
                let v = BackendValue {
                    addr: *ep,
                    port: 8080u16.to_be(),
                    state: BackendState::Active as u8,
                    pad: 0,
                    generation: 1,
                    service_id: i,
                    reserved: 0,
                };
                backends.set(i * 4 + j as u32, v, 0).unwrap();
            }
        }
    }
    {
        let mut slots: HashMap<_, SlotKey, u32> =
            HashMap::try_from(dp.ebpf.map_mut(MAP_SLOTS).unwrap()).unwrap();
        for i in from..to {
            for j in 0..4 {
                slots
                    .insert(
                        SlotKey {
                            service_id: i,
                            slot: j + 1,
                        },
                        i * 4 + j,
                        0,
                    )
                    .unwrap();
            }
        }
    }
    {
        let mut svcs: HashMap<_, u32, ServiceValue> =
            HashMap::try_from(dp.ebpf.map_mut(MAP_SERVICES).unwrap()).unwrap();
        for i in from..to {
            let v = ServiceValue {
                backend_count: 4,
                affinity_timeout: 0,
                egress,
                flags: 0,
                reserved: 0,
            };
            svcs.insert(i, v, 0).unwrap();
        }
    }
    for i in from..to {
        let key = FrontendKey {
            addr: addr(&cluster_ip(i)),
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            pad: 0,
        };
        let value = FrontendValue {
            service_id: i,
            kind: FrontendKind::ClusterIp as u8,
            flags: 0,
            pad: [0; 2],
        };
        dp.put_frontend(key, value);
    }
}

/// Median of per-sample nanoseconds, as floating point.
fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
    }
}

fn mean(v: &[u64]) -> f64 {
    v.iter().sum::<u64>() as f64 / v.len() as f64
}

struct Bench {
    node: TestNode,
    dp: Datapath,
    empty: aya::Ebpf,
    out: Vec<u8>,
}

impl Bench {
    fn xdp(&mut self) -> &mut Xdp {
        self.dp
            .ebpf
            .program_mut(PROG_XDP)
            .unwrap()
            .try_into()
            .unwrap()
    }

    fn samples_xdp(
        &mut self,
        prog: &str,
        runs: usize,
        pkt: impl FnMut(usize) -> Vec<u8>,
        expect: u32,
    ) -> Vec<u64> {
        let ifindex = self.node.uplink;
        let mut out = std::mem::take(&mut self.out);
        let p: &mut Xdp = match prog {
            "empty" => self
                .empty
                .program_mut("xdp_pass")
                .unwrap()
                .try_into()
                .unwrap(),
            name => self.dp.ebpf.program_mut(name).unwrap().try_into().unwrap(),
        };
        let v = sample(runs, pkt, expect, prog, |input| {
            time_xdp(p, ifindex, input, &mut out)
        });
        self.out = out;
        v
    }

    fn samples_tc(
        &mut self,
        runs: usize,
        pkt: impl FnMut(usize) -> Vec<u8>,
        expect: u32,
    ) -> Vec<u64> {
        let ifindex = self.node.uplink;
        let p: &mut SchedClassifier = self
            .dp
            .ebpf
            .program_mut(PROG_TC_EGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = std::mem::take(&mut self.out);
        let v = sample(runs, pkt, expect, "tc egress", |input| {
            time_tc(p, ifindex, input, &mut out)
        });
        self.out = out;
        v
    }
}

/// `runs` kernel-timed runs (ns), each on a fresh packet from `pkt` and expected to return
/// `expect`.
fn sample(
    runs: usize,
    mut pkt: impl FnMut(usize) -> Vec<u8>,
    expect: u32,
    what: &str,
    mut time: impl FnMut(&[u8]) -> (u32, u64),
) -> Vec<u64> {
    (0..runs)
        .map(|i| {
            let (ret, ns) = time(&pkt(i));
            assert_eq!(ret, expect, "{what}: unexpected verdict on run {i}");
            ns
        })
        .collect()
}

fn emit(metric: &str, services: u32, round: usize, samples: &[u64]) {
    let med = median(samples.to_vec());
    println!(
        "{{\"metric\":\"{metric}\",\"services\":{services},\"round\":{round},\"median_ns\":{med},\"mean_ns\":{:.1},\"samples\":{}}}",
        mean(samples),
        samples.len()
    );
    eprintln!(
        "  {metric:<28} {services:>7} services  round {round}: median {med:>6.0} ns  mean {:>6.1} ns",
        mean(samples)
    );
}

/// Instructions the verifier processed, per program of `ebpf` (loaded).
fn verified(ebpf: &aya::Ebpf) -> Vec<(String, u32)> {
    ebpf.programs()
        .map(|(name, program)| {
            let insns = program
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count())
                .unwrap_or(0);
            (name.to_owned(), insns)
        })
        .collect()
}

fn main() {
    let a = args();
    if let Some(path) = &a.object {
        let _node = TestNode::new();
        let bytes = std::fs::read(path).expect("read the object");
        let mut ebpf = aya::EbpfLoader::new()
            .load(&bytes)
            .expect("load the object");
        for (name, program) in ebpf.programs_mut() {
            match program {
                aya::programs::Program::Xdp(p) => p.load().unwrap(),
                aya::programs::Program::SchedClassifier(p) => p.load().unwrap(),
                _ => panic!("{name}: unexpected program type"),
            }
        }
        for (name, insns) in verified(&ebpf) {
            eprintln!("  verifier: {name:<22} {insns:>8} instructions processed");
        }
        return;
    }
    let node = TestNode::new();
    let max = *a.sizes.iter().max().unwrap();
    let limits = Limits {
        max_services: max.next_power_of_two().max(1024),
        max_frontends: (max * 2).next_power_of_two().max(1024),
        max_backends: (max * 4).next_power_of_two().max(4096),
        max_slots: (max * 4).next_power_of_two().max(4096),
        // At the default 100k runs: the agent's default --ct-max (262,144; CT_NEW a quarter),
        // the tables a user has. A round's later first packets then evict earlier ones from
        // CT_NEW, as new flows that never complete do on a node.
        ct_max: (a.runs as u32 * 2).next_power_of_two().max(1 << 16),
        ..Limits::default()
    };
    // A wide SNAT range: every first-packet sample is a new flow to one of four endpoints.
    let cfg = Config::DEFAULT.with_snat_ranges(&[PortRange {
        min: 1024,
        max: 65535,
    }]);
    let started = Instant::now();
    let dp = Datapath::load_sized(cfg, &limits);
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    // What the verifier walked per program: deterministic, unlike verification time on a
    // shared machine. Any growth here shows in the agent's cold start.
    let mut total = 0;
    for (name, insns) in verified(&dp.ebpf) {
        total += insns;
        eprintln!("  verifier: {name:<22} {insns:>8} instructions processed");
        println!("{{\"metric\":\"verified_insns\",\"program\":\"{name}\",\"value\":{insns}}}");
    }
    eprintln!(
        "  verifier: all programs     {total:>8} instructions processed ({load_ms:.0} ms to load)"
    );
    if a.only.as_deref() == Some("verifier") {
        return;
    }
    let mut empty = aya::Ebpf::load(loader::XDP_PASS_OBJECT).unwrap();
    {
        let p: &mut Xdp = empty.program_mut("xdp_pass").unwrap().try_into().unwrap();
        p.load().unwrap();
    }
    let mut b = Bench {
        node,
        dp,
        empty,
        out: vec![0u8; 2048],
    };
    let _ = b.xdp();
    let mut programmed = 0;
    for &n in &a.sizes {
        let t = Instant::now();
        program(&mut b.dp, programmed, n);
        programmed = n;
        eprintln!(
            "{n} services programmed ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
        let target = cluster_ip(n - 1);
        // One established flow from outside to the last service, and its reply.
        let syn = frame(
            GW_MAC,
            UPLINK_MAC,
            &Ip::new(EST_CLIENT, &target, TCP).wrap(tcp_seg(40000, 80, 1, 0, SYN, &[]), false),
        );
        let sent = decode(&b.dp.xdp(b.node.uplink, &syn).out);
        let est = frame(
            GW_MAC,
            UPLINK_MAC,
            &Ip::new(EST_CLIENT, &target, TCP).wrap(tcp_seg(40000, 80, 2, 9, ACK, b"x"), false),
        );
        let reply = frame(
            GW_MAC,
            UPLINK_MAC,
            &Ip::new(&sent.dst.to_string(), NODE_V4, TCP)
                .wrap(tcp_seg(8080, sent.sport, 9, 3, ACK, b"y"), false),
        );
        let pod_est = frame(
            UPLINK_MAC,
            GW_MAC,
            &Ip::new(POD_V4, &target, TCP).wrap(tcp_seg(41000, 80, 2, 9, ACK, b"x"), false),
        );
        b.dp.tc_egress(
            b.node.uplink,
            &frame(
                UPLINK_MAC,
                GW_MAC,
                &Ip::new(POD_V4, &target, TCP).wrap(tcp_seg(41000, 80, 1, 0, SYN, &[]), false),
            ),
        );
        let measured_clients =
            [EST_CLIENT, POD_V4].map(|c| Addr::from(c.parse::<IpAddr>().unwrap()));
        let want = |m: &str| a.only.as_deref().is_none_or(|o| o == m);
        for round in 0..a.rounds {
            if want("empty_xdp_program") {
                let s = b.samples_xdp("empty", a.runs, |_| est.clone(), XDP_PASS);
                emit("empty_xdp_program", n, round, &s);
            }
            if want("parse_only") {
                let s = b.samples_xdp(PROG_PARSE_ONLY, a.runs, |_| est.clone(), XDP_PASS);
                emit("parse_only", n, round, &s);
            }
            if want("xdp_established") {
                let s = b.samples_xdp(PROG_XDP, a.runs, |_| est.clone(), XDP_TX);
                emit("xdp_established", n, round, &s);
            }
            if want("xdp_reply") {
                let s = b.samples_xdp(PROG_XDP, a.runs, |_| reply.clone(), XDP_TX);
                emit("xdp_reply", n, round, &s);
            }
            // New flows: a fresh (client, port) per sample.
            let base = round * a.runs;
            if want("xdp_first_packet") {
                let s = b.samples_xdp(
                    PROG_XDP,
                    a.runs,
                    |i| {
                        let k = base + i;
                        let client =
                            format!("198.51.{}.{}", 101 + (k >> 16) % 100, (k >> 8) & 0xff);
                        frame(
                            GW_MAC,
                            UPLINK_MAC,
                            &Ip::new(&client, &target, TCP).wrap(
                                tcp_seg(
                                    1024 + (k & 0xff) as u16 * 200 + (n % 200) as u16,
                                    80,
                                    1,
                                    0,
                                    SYN,
                                    &[],
                                ),
                                false,
                            ),
                        )
                    },
                    XDP_TX,
                );
                emit("xdp_first_packet", n, round, &s);
                // Each round's new flows hold SNAT ports: 3 x 100k of them would exhaust the four
                // endpoints' 64k ports each. The measured established flows stay.
                clear_flows(&mut b.dp, &measured_clients);
            }
            if want("tc_egress_established") {
                let s = b.samples_tc(a.runs, |_| pod_est.clone(), TC_ACT_OK);
                emit("tc_egress_established", n, round, &s);
            }
        }
        // The next size sets up its own established flows.
        clear_flows(&mut b.dp, &[]);
    }
}

/// Removes the flows (conntrack, both tables, and reverse NAT entries) of every client but those
/// in `keep`.
fn clear_flows(dp: &mut Datapath, keep: &[Addr]) {
    use aya::maps::HashMap;
    for table in [MAP_CT, MAP_CT_NEW] {
        let mut ct: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(dp.ebpf.map_mut(table).unwrap()).unwrap();
        let gone: Vec<CtKey> = ct
            .keys()
            .map(Result::unwrap)
            .filter(|k| !keep.contains(&k.src))
            .collect();
        for k in &gone {
            let _ = ct.remove(k);
        }
    }
    let mut revnat: HashMap<_, RevNatKey, RevNatValue> =
        HashMap::try_from(dp.ebpf.map_mut(MAP_REVNAT).unwrap()).unwrap();
    let gone: Vec<RevNatKey> = revnat
        .iter()
        .map(Result::unwrap)
        .filter(|(_, v)| !keep.contains(&v.client))
        .map(|(k, _)| k)
        .collect();
    for k in &gone {
        let _ = revnat.remove(k);
    }
}
