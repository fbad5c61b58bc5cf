//! BPF_PROG_TEST_RUN tests: the real programs, verified by the kernel, fed crafted packets.
//! Every test asserts the output bytes (via an independent decoder that checks every checksum),
//! the verdict, and the map state. Needs root.

use extproxy_tests::{packet::*, *};
use proxy_common::*;

const CLIENT_EXT: &str = "198.51.100.9";
const CLIENT_EXT6: &str = "2001:db8:c::9";
const EP1: &str = "203.0.113.7";
const EP2: &str = "203.0.113.8";
const EP1_6: &str = "2001:db8:e::7";
const CLUSTER_IP: &str = "10.96.0.10";
const CLUSTER_IP6: &str = "fd00:96::10";
const LB_IP: &str = "192.0.2.50";
const EXT_IP: &str = "192.0.2.60";

fn in_snat_range(port: u16) -> bool {
    (Config::DEFAULT.snat_port_min..=Config::DEFAULT.snat_port_max).contains(&port)
}

/// One TCP service, id 1, with every frontend kind and two active endpoints on port 8080.
fn tcp_service(dp: &mut Datapath) {
    dp.program(&Svc {
        id: 1,
        frontends: &[
            (FrontendKind::ClusterIp, CLUSTER_IP, 80),
            (FrontendKind::NodePort, NODE_V4, 30080),
            (FrontendKind::LoadBalancer, LB_IP, 80),
            (FrontendKind::ExternalIp, EXT_IP, 80),
        ],
        proto: PROTO_TCP,
        backends: &[(1, EP1, 8080, BackendState::Active), (2, EP2, 8080, BackendState::Active)],
        egress: NODE_V4,
        affinity_timeout: 0,
        source_ranges: &[],
    });
}

/// A SYN from a pod to the ClusterIP, as the TC egress program sees it on the uplink.
fn pod_syn(sport: u16) -> Vec<u8> {
    let ip = Ip::new(POD_V4, CLUSTER_IP, TCP).wrap(tcp_seg(sport, 80, 1000, 0, SYN, &[]), false);
    frame(UPLINK_MAC, GW_MAC, &ip)
}

#[test]
fn pod_to_cluster_ip_is_dnated_and_snated_at_tc_egress() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    tcp_service(&mut dp);

    let run = dp.tc_egress(node.uplink, &pod_syn(40000));
    // The endpoint is out of the uplink, the device the packet is already leaving by.
    assert_eq!(run.verdict, TC_ACT_OK);
    let d = decode(&run.out);
    assert_eq!(d.src, ip(NODE_V4), "SNAT to the egress IP");
    assert!(d.dst == ip(EP1) || d.dst == ip(EP2), "DNAT to an endpoint, got {}", d.dst);
    assert_eq!(d.dport, 8080);
    assert!(in_snat_range(d.sport), "SNAT port {} outside the range", d.sport);
    assert_eq!((d.tcp_flags, d.seq), (SYN, 1000), "the segment itself is untouched");
    assert_eq!(d.dmac, GW_MAC);
    assert_eq!(d.smac, UPLINK_MAC);

    let ct = dp.ct_entries();
    assert_eq!(ct.len(), 1);
    let (k, v) = ct[0];
    assert_eq!((k.src, k.dst, port_host(k.sport), port_host(k.dport)), (addr(POD_V4), addr(CLUSTER_IP), 40000, 80));
    assert_eq!((v.backend, port_host(v.backend_port), v.snat), (Addr::from(d.dst), 8080, addr(NODE_V4)));
    assert_eq!(port_host(v.snat_port), d.sport);
    assert_eq!(v.kind, FrontendKind::ClusterIp as u8);
    let rn = dp.revnat_entries();
    assert_eq!(rn.len(), 1);
    assert_eq!((rn[0].1.client, port_host(rn[0].1.client_port)), (addr(POD_V4), 40000));
    assert_eq!(dp.counter(Counter::CtCreated), 1);
    let stats = dp.service_stats(1);
    assert_eq!((stats.fwd_packets, stats.fwd_bytes), (1, 40));
}

fn port_host(p: u16) -> u16 {
    u16::from_be(p)
}

#[test]
fn endpoint_reply_is_reverse_translated_and_passed_to_the_pod() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    tcp_service(&mut dp);
    let out = decode(&dp.tc_egress(node.uplink, &pod_syn(40001)).out);

    let synack = Ip::new(&out.dst.to_string(), NODE_V4, TCP)
        .wrap(tcp_seg(8080, out.sport, 5000, 1001, SYN | ACK, &[]), false);
    let run = dp.xdp(node.uplink, &frame(GW_MAC, UPLINK_MAC, &synack));
    // The pod is behind pod0, not the uplink: the kernel forwards the translated reply.
    assert_eq!(run.verdict, XDP_PASS);
    let d = decode(&run.out);
    assert_eq!((d.src, d.sport), (ip(CLUSTER_IP), 80));
    assert_eq!((d.dst, d.dport), (ip(POD_V4), 40001));
    assert_eq!((d.tcp_flags, d.seq, d.ack), (SYN | ACK, 5000, 1001));
    let (_, ct) = dp.ct_entries()[0];
    assert_ne!(ct.flags & CT_F_SEEN_REPLY, 0);
    assert_eq!(dp.service_stats(1).rev_packets, 1);
}

#[test]
fn traffic_that_is_not_ours_passes_byte_for_byte() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    tcp_service(&mut dp);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("other host", frame(GW_MAC, UPLINK_MAC, &Ip::new(CLIENT_EXT, "10.0.0.77", TCP).wrap(tcp_seg(1, 80, 0, 0, SYN, &[]), false))),
        ("cluster IP, other port", frame(GW_MAC, UPLINK_MAC, &Ip::new(CLIENT_EXT, CLUSTER_IP, TCP).wrap(tcp_seg(1, 81, 0, 0, SYN, &[]), false))),
        ("cluster IP, UDP", frame(GW_MAC, UPLINK_MAC, &Ip::new(CLIENT_EXT, CLUSTER_IP, UDP).wrap(udp_dgram(1, 80, b"x"), false))),
        ("node IP, unknown SNAT-range port", frame(GW_MAC, UPLINK_MAC, &Ip::new(EP1, NODE_V4, TCP).wrap(tcp_seg(8080, 62000, 0, 0, SYN | ACK, &[]), false))),
        ("ARP", {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&GW_MAC);
            f.extend_from_slice(&[0x08, 0x06]);
            f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&[0u8; 20]);
            f
        }),
    ];
    for (what, pkt) in cases {
        for (hook, run) in [
            ("xdp", dp.xdp(node.uplink, &pkt)),
            ("tc ingress", dp.tc_ingress(node.uplink, &pkt)),
            ("tc egress", dp.tc_egress(node.uplink, &pkt)),
        ] {
            let pass = if hook == "xdp" { XDP_PASS } else { TC_ACT_OK };
            assert_eq!(run.verdict, pass, "{what} at {hook}");
            assert_eq!(run.out, pkt, "{what} at {hook} was modified");
        }
    }
    assert!(dp.ct_entries().is_empty());
}

#[test]
fn nodeport_from_outside_hairpins_at_xdp_both_ways() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    tcp_service(&mut dp);
    let syn = frame(GW_MAC, UPLINK_MAC, &Ip::new(CLIENT_EXT, NODE_V4, TCP).wrap(tcp_seg(5555, 30080, 1, 0, SYN, &[]), false));
    let run = dp.xdp(node.uplink, &syn);
    assert_eq!(run.verdict, XDP_TX);
    let out = decode(&run.out);
    assert_eq!((out.src, out.dport), (ip(NODE_V4), 8080));
    assert!(in_snat_range(out.sport));
    assert_eq!((out.smac, out.dmac), (UPLINK_MAC, GW_MAC));

    let synack = frame(GW_MAC, UPLINK_MAC, &Ip::new(&out.dst.to_string(), NODE_V4, TCP).wrap(tcp_seg(8080, out.sport, 9, 2, SYN | ACK, &[]), false));
    let run = dp.xdp(node.uplink, &synack);
    assert_eq!(run.verdict, XDP_TX, "the client is outside: straight back out");
    let back = decode(&run.out);
    assert_eq!((back.src, back.sport, back.dst, back.dport), (ip(NODE_V4), 30080, ip(CLIENT_EXT), 5555));
    assert_eq!((back.smac, back.dmac), (UPLINK_MAC, GW_MAC));
}
