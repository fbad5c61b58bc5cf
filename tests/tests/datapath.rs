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
    Config::DEFAULT.is_snat_port(port)
}

/// The default configuration with SNAT ports `min..=max` only.
fn snat_ports(min: u16, max: u16) -> Config {
    Config::DEFAULT.with_snat_ranges(&[PortRange { min, max }])
}

/// One TCP service, id 1, with every frontend kind and two active endpoints on port 8080.
fn tcp_service(dp: &mut Datapath) {
    dp.program(&Svc::new(
        1,
        PROTO_TCP,
        &[
            (FrontendKind::ClusterIp, CLUSTER_IP, 80),
            (FrontendKind::NodePort, NODE_V4, 30080),
            (FrontendKind::LoadBalancer, LB_IP, 80),
            (FrontendKind::ExternalIp, EXT_IP, 80),
        ],
        &[
            (1, EP1, 8080, BackendState::Active),
            (2, EP2, 8080, BackendState::Active),
        ],
    ));
}

/// The test node with the data path loaded and `tcp_service` programmed.
fn with_tcp_service() -> (TestNode, Datapath) {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    tcp_service(&mut dp);
    (node, dp)
}

/// A packet leaving by the uplink, as the TC egress program sees it.
fn outbound(src: &str, dst: &str, seg: Vec<u8>, proto: u8) -> Vec<u8> {
    frame(
        UPLINK_MAC,
        GW_MAC,
        &Ip::new(src, dst, proto).wrap(seg, false),
    )
}

/// A SYN from a pod to the ClusterIP, as the TC egress program sees it on the uplink.
fn pod_syn(sport: u16) -> Vec<u8> {
    outbound(
        POD_V4,
        CLUSTER_IP,
        tcp_seg(sport, 80, 1000, 0, SYN, &[]),
        TCP,
    )
}

/// A SYN from a pod to the IPv6 ClusterIP's port 443, as the TC egress program sees it.
fn pod_syn6() -> Vec<u8> {
    outbound(
        POD_V6,
        CLUSTER_IP6,
        tcp_seg(40000, 443, 7, 0, SYN, &[]),
        TCP,
    )
}

/// The endpoint's SYN-ACK to the node for the translated SYN `out`.
fn endpoint_synack(out: &Decoded, seq: u32, ack: u32) -> Vec<u8> {
    from_outside(
        &out.dst.to_string(),
        NODE_V4,
        tcp_seg(8080, out.sport, seq, ack, SYN | ACK, &[]),
        TCP,
    )
}

#[test]
fn pod_to_cluster_ip_is_dnated_and_snated_at_tc_egress() {
    let (node, mut dp) = with_tcp_service();

    let run = dp.tc_egress(node.uplink, &pod_syn(40000));
    // The endpoint is out of the uplink, the device the packet is already leaving by.
    assert_eq!(run.verdict, TC_ACT_OK);
    let d = decode(&run.out);
    assert_eq!(d.src, ip(NODE_V4), "SNAT to the egress IP");
    assert!(
        d.dst == ip(EP1) || d.dst == ip(EP2),
        "DNAT to an endpoint, got {}",
        d.dst
    );
    assert_eq!(d.dport, 8080);
    assert!(
        in_snat_range(d.sport),
        "SNAT port {} outside the range",
        d.sport
    );
    assert_eq!(
        (d.tcp_flags, d.seq),
        (SYN, 1000),
        "the segment itself is untouched"
    );
    assert_eq!(d.dmac, GW_MAC);
    assert_eq!(d.smac, UPLINK_MAC);

    let ct = dp.ct_entries();
    assert_eq!(ct.len(), 1);
    let (k, v) = ct[0];
    assert_eq!(
        (k.src, k.dst, port_host(k.sport), port_host(k.dport)),
        (addr(POD_V4), addr(CLUSTER_IP), 40000, 80)
    );
    assert_eq!(
        (v.backend, port_host(v.backend_port), v.snat),
        (Addr::from(d.dst), 8080, addr(NODE_V4))
    );
    assert_eq!(port_host(v.snat_port), d.sport);
    assert_eq!(v.kind, FrontendKind::ClusterIp as u8);
    let rn = dp.revnat_entries();
    assert_eq!(rn.len(), 1);
    assert_eq!(
        (rn[0].1.client, port_host(rn[0].1.client_port)),
        (addr(POD_V4), 40000)
    );
    assert_eq!(dp.counter(Counter::CtCreated), 1);
    let stats = dp.service_stats(1);
    assert_eq!((stats.fwd_packets, stats.fwd_bytes), (1, 40));
}

fn port_host(p: u16) -> u16 {
    u16::from_be(p)
}

#[test]
fn conntrack_is_stamped_with_the_agents_clock() {
    let (node, mut dp) = with_tcp_service();
    let before = extproxy::host::datapath_secs();
    dp.tc_egress(node.uplink, &pod_syn(40000));
    let after = extproxy::host::datapath_secs();
    let (_, v) = dp.ct_entries()[0];
    // The data path counts jiffies, the agent's sweep computes the same clock from times(2): they
    // must agree, or the sweep would end live flows early (or keep dead ones).
    assert!(
        v.created + 2 >= before && v.created <= after + 2,
        "flow created at {} by the data path's clock, the agent's says {before}..{after}",
        v.created
    );
    assert_eq!(v.last_seen, v.created);
}

#[test]
fn tracked_flows_skip_the_frontend_lookup_and_the_filter_gates_both() {
    let (node, mut dp) = with_tcp_service();
    let first = decode(&dp.tc_egress(node.uplink, &pod_syn(40000)).out);
    let next = || {
        outbound(
            POD_V4,
            CLUSTER_IP,
            tcp_seg(40000, 80, 1001, 5, ACK, b"x"),
            TCP,
        )
    };
    let frontend = FrontendKey {
        addr: addr(CLUSTER_IP),
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        pad: 0,
    };
    dp.remove_frontend(&frontend);
    // The flow goes on from conntrack (the agent's sweep ends it once the frontend is gone).
    let run = dp.tc_egress(node.uplink, &next());
    let d = decode(&run.out);
    assert_eq!(
        (d.src, d.sport, d.dst, d.dport),
        (first.src, first.sport, first.dst, first.dport),
        "translated like the flow's first packet"
    );
    // A clear filter bit: not a frontend, so not looked up at all, tracked or not.
    dp.clear_frontend_filter();
    let pkt = next();
    let run = dp.tc_egress(node.uplink, &pkt);
    assert_eq!((run.verdict, run.out), (TC_ACT_OK, pkt), "passed untouched");
    tcp_service(&mut dp);
    dp.clear_frontend_filter();
    let syn = pod_syn(40001);
    let run = dp.tc_egress(node.uplink, &syn);
    assert_eq!(
        (run.verdict, run.out),
        (TC_ACT_OK, syn),
        "a frontend without its bit is invisible: the agent must set it"
    );
    assert_eq!(dp.counter(Counter::CtCreated), 1);
}

#[test]
fn endpoint_reply_is_reverse_translated_and_passed_to_the_pod() {
    let (node, mut dp) = with_tcp_service();
    let out = decode(&dp.tc_egress(node.uplink, &pod_syn(40001)).out);

    let run = dp.xdp(node.uplink, &endpoint_synack(&out, 5000, 1001));
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
    let (node, mut dp) = with_tcp_service();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "other host",
            from_outside(CLIENT_EXT, "10.0.0.77", tcp_seg(1, 80, 0, 0, SYN, &[]), TCP),
        ),
        (
            "cluster IP, other port",
            from_outside(CLIENT_EXT, CLUSTER_IP, tcp_seg(1, 81, 0, 0, SYN, &[]), TCP),
        ),
        (
            "cluster IP, UDP",
            from_outside(CLIENT_EXT, CLUSTER_IP, udp_dgram(1, 80, b"x"), UDP),
        ),
        (
            "node IP, unknown SNAT-range port",
            from_outside(
                EP1,
                NODE_V4,
                tcp_seg(8080, 62000, 0, 0, SYN | ACK, &[]),
                TCP,
            ),
        ),
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
    let (node, mut dp) = with_tcp_service();
    let syn = from_outside(
        CLIENT_EXT,
        NODE_V4,
        tcp_seg(5555, 30080, 1, 0, SYN, &[]),
        TCP,
    );
    let run = dp.xdp(node.uplink, &syn);
    assert_eq!(run.verdict, XDP_TX);
    let out = decode(&run.out);
    assert_eq!((out.src, out.dport), (ip(NODE_V4), 8080));
    assert!(in_snat_range(out.sport));
    assert_eq!((out.smac, out.dmac), (UPLINK_MAC, GW_MAC));

    let run = dp.xdp(node.uplink, &endpoint_synack(&out, 9, 2));
    assert_eq!(
        run.verdict, XDP_TX,
        "the client is outside: straight back out"
    );
    let back = decode(&run.out);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(NODE_V4), 30080, ip(CLIENT_EXT), 5555)
    );
    assert_eq!((back.smac, back.dmac), (UPLINK_MAC, GW_MAC));
}

fn from_outside(src: &str, dst: &str, seg: Vec<u8>, proto: u8) -> Vec<u8> {
    frame(
        GW_MAC,
        UPLINK_MAC,
        &Ip::new(src, dst, proto).wrap(seg, false),
    )
}

#[test]
fn every_frontend_kind_reaches_an_endpoint() {
    let (node, mut dp) = with_tcp_service();
    // (frontend address, port, kind recorded in conntrack)
    let cases = [
        (CLUSTER_IP, 80, FrontendKind::ClusterIp),
        (NODE_V4, 30080, FrontendKind::NodePort),
        (LB_IP, 80, FrontendKind::LoadBalancer),
        (EXT_IP, 80, FrontendKind::ExternalIp),
    ];
    for (i, (fe, port, kind)) in cases.iter().enumerate() {
        let sport = 7000 + i as u16;
        let run = dp.xdp(
            node.uplink,
            &from_outside(CLIENT_EXT, fe, tcp_seg(sport, *port, 1, 0, SYN, &[]), TCP),
        );
        assert_eq!(run.verdict, XDP_TX, "{kind:?}");
        let d = decode(&run.out);
        assert_eq!((d.src, d.dport), (ip(NODE_V4), 8080), "{kind:?}");
        let ct = dp.ct_entries();
        let (_, v) = ct
            .iter()
            .find(|(k, _)| port_host(k.sport) == sport)
            .expect("conntrack entry");
        assert_eq!(v.kind, *kind as u8);
    }
}

#[test]
fn load_balancer_source_ranges_admit_listed_clients_only() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    dp.program(&Svc {
        source_ranges: &["1.2.3.4/32", "5.6.7.0/24"],
        ..Svc::new(
            3,
            PROTO_TCP,
            &[
                (FrontendKind::LoadBalancer, LB_IP, 80),
                (FrontendKind::NodePort, NODE_V4, 30081),
            ],
            &[(5, EP1, 8080, BackendState::Active)],
        )
    });
    for (client, admitted) in [
        ("1.2.3.4", true),
        ("5.6.7.200", true),
        ("1.2.3.5", false),
        ("9.9.9.9", false),
    ] {
        let run = dp.xdp(
            node.uplink,
            &from_outside(client, LB_IP, tcp_seg(4000, 80, 1, 0, SYN, &[]), TCP),
        );
        let expected = if admitted { XDP_TX } else { XDP_DROP };
        assert_eq!(run.verdict, expected, "client {client}");
    }
    assert_eq!(dp.counter(Counter::DropSourceRange), 2);
    // Source ranges apply to the LoadBalancer address only, as in kube-proxy.
    let run = dp.xdp(
        node.uplink,
        &from_outside(
            "9.9.9.9",
            NODE_V4,
            tcp_seg(4000, 30081, 1, 0, SYN, &[]),
            TCP,
        ),
    );
    assert_eq!(run.verdict, XDP_TX);
}

#[test]
fn udp_flows_are_translated_both_ways() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    dp.program(&Svc::new(
        4,
        PROTO_UDP,
        &[
            (FrontendKind::ClusterIp, CLUSTER_IP, 53),
            (FrontendKind::NodePort, NODE_V4, 30053),
        ],
        &[(6, EP1, 5353, BackendState::Active)],
    ));
    let q = outbound(POD_V4, CLUSTER_IP, udp_dgram(33333, 53, b"query"), UDP);
    let run = dp.tc_egress(node.uplink, &q);
    assert_eq!(run.verdict, TC_ACT_OK);
    let out = decode(&run.out);
    assert_eq!((out.src, out.dst, out.dport), (ip(NODE_V4), ip(EP1), 5353));
    assert_eq!(&out.l4[8..], b"query");
    let ans = from_outside(EP1, NODE_V4, udp_dgram(5353, out.sport, b"answer"), UDP);
    let back = decode(&dp.xdp(node.uplink, &ans).out);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(CLUSTER_IP), 53, ip(POD_V4), 33333)
    );
    // A UDP datagram without checksum (IPv4 allows it) stays without one.
    let mut nocsum = udp_dgram(33334, 53, b"q2");
    let ip4 = Ip::new(POD_V4, CLUSTER_IP, UDP);
    let mut pkt = ip4.wrap(std::mem::take(&mut nocsum), false);
    pkt[26] = 0;
    pkt[27] = 0;
    let run = dp.tc_egress(node.uplink, &frame(UPLINK_MAC, GW_MAC, &pkt));
    let d = decode(&run.out);
    assert_eq!(&d.l4[6..8], &[0, 0]);
}

#[test]
fn ipv6_cluster_ip_and_nodeport() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    dp.program(&Svc {
        egress: NODE_V6,
        ..Svc::new(
            7,
            PROTO_TCP,
            &[
                (FrontendKind::ClusterIp, CLUSTER_IP6, 443),
                (FrontendKind::NodePort, NODE_V6, 30443),
            ],
            &[(9, EP1_6, 8443, BackendState::Active)],
        )
    });
    let syn = pod_syn6();
    let run = dp.tc_egress(node.uplink, &syn);
    assert_eq!(run.verdict, TC_ACT_OK);
    let out = decode(&run.out);
    assert_eq!(
        (out.src, out.dst, out.dport),
        (ip(NODE_V6), ip(EP1_6), 8443)
    );
    let synack = from_outside(
        EP1_6,
        NODE_V6,
        tcp_seg(8443, out.sport, 1, 8, SYN | ACK, &[]),
        TCP,
    );
    let back = decode(&dp.xdp(node.uplink, &synack).out);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(CLUSTER_IP6), 443, ip(POD_V6), 40000)
    );

    let syn = from_outside(
        CLIENT_EXT6,
        NODE_V6,
        tcp_seg(5000, 30443, 1, 0, SYN, &[b'x'; 10]),
        TCP,
    );
    let run = dp.xdp(node.uplink, &syn);
    assert_eq!(run.verdict, XDP_TX);
    let out = decode(&run.out);
    assert_eq!(
        (out.src, out.dst, out.dport),
        (ip(NODE_V6), ip(EP1_6), 8443)
    );
    assert_eq!(&out.l4[20..], &[b'x'; 10]);
}

#[test]
fn a_service_family_without_egress_address_is_refused_with_its_reason() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    // An IPv6 service whose egress address is IPv4: cannot SNAT across families.
    dp.program(&Svc::new(
        8,
        PROTO_TCP,
        &[(FrontendKind::ClusterIp, CLUSTER_IP6, 80)],
        &[(10, EP1_6, 80, BackendState::Active)],
    ));
    let syn = outbound(POD_V6, CLUSTER_IP6, tcp_seg(1, 80, 1, 0, SYN, &[]), TCP);
    let run = dp.tc_egress(node.uplink, &syn);
    // Refused, not leaked out with the pod's own address and not black-holed.
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(decode(&run.out).tcp_flags, RST | ACK);
    assert_eq!(dp.counter(Counter::DropNoEgressAddress), 1);
    assert!(dp.ct_entries().is_empty());
}

// ------------------------------------------------------------------------------------------------
// Rejects: a Service without endpoints answers, it does not black-hole.
// ------------------------------------------------------------------------------------------------

fn empty_service(dp: &mut Datapath, proto: u8) {
    dp.program(&Svc::new(
        11,
        proto,
        &[
            (FrontendKind::ClusterIp, CLUSTER_IP, 80),
            (FrontendKind::NodePort, NODE_V4, 30090),
            (FrontendKind::ClusterIp, CLUSTER_IP6, 80),
        ],
        &[],
    ));
}

#[test]
fn tcp_to_a_service_without_endpoints_gets_a_reset() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    empty_service(&mut dp, PROTO_TCP);

    // From outside, at XDP: the RST goes straight back out.
    let syn = from_outside(
        CLIENT_EXT,
        NODE_V4,
        tcp_seg(5555, 30090, 1000, 0, SYN, &[]),
        TCP,
    );
    let run = dp.xdp(node.uplink, &syn);
    assert_eq!(run.verdict, XDP_TX);
    let d = decode(&run.out);
    assert_eq!(
        (d.src, d.sport, d.dst, d.dport),
        (ip(NODE_V4), 30090, ip(CLIENT_EXT), 5555)
    );
    assert_eq!((d.tcp_flags, d.seq, d.ack), (RST | ACK, 0, 1001));
    assert_eq!((d.smac, d.dmac), (UPLINK_MAC, GW_MAC));
    assert_eq!(run.out.len(), 14 + 20 + 20);

    // From a pod, at TC egress: turned around into the node's ingress.
    let run = dp.tc_egress(node.uplink, &pod_syn(40000));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let d = decode(&run.out);
    assert_eq!(
        (d.src, d.sport, d.dst, d.dport),
        (ip(CLUSTER_IP), 80, ip(POD_V4), 40000)
    );
    assert_eq!((d.tcp_flags, d.ack), (RST | ACK, 1001));

    // A segment with ACK and payload: the RST takes its sequence number from the ACK.
    let data = outbound(
        POD_V4,
        CLUSTER_IP,
        tcp_seg(40000, 80, 50, 777, ACK | PSH, b"hello"),
        TCP,
    );
    let d = decode(&dp.tc_egress(node.uplink, &data).out);
    assert_eq!((d.tcp_flags, d.seq), (RST, 777));

    // IPv6.
    let syn6 = outbound(POD_V6, CLUSTER_IP6, tcp_seg(40000, 80, 9, 0, SYN, &[]), TCP);
    let d = decode(&dp.tc_egress(node.uplink, &syn6).out);
    assert_eq!(
        (d.src, d.dst, d.tcp_flags, d.ack),
        (ip(CLUSTER_IP6), ip(POD_V6), RST | ACK, 10)
    );

    assert_eq!(dp.counter(Counter::DropNoEndpoints), 4);
    assert!(
        dp.ct_entries().is_empty(),
        "a rejected packet creates no flow"
    );
}

#[test]
fn udp_to_a_service_without_endpoints_gets_port_unreachable() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    empty_service(&mut dp, PROTO_UDP);

    let orig_ip =
        Ip::new(POD_V4, CLUSTER_IP, UDP).wrap(udp_dgram(33333, 80, b"some payload"), false);
    let run = dp.tc_egress(node.uplink, &frame(UPLINK_MAC, GW_MAC, &orig_ip));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let d = decode(&run.out);
    assert_eq!((d.src, d.dst, d.proto), (ip(CLUSTER_IP), ip(POD_V4), ICMP));
    assert_eq!(
        &d.l4[..2],
        &[3, 3],
        "destination unreachable / port unreachable"
    );
    // The quote: the original IP header and the first 8 bytes of UDP, unchanged.
    assert_eq!(&d.l4[8..], &orig_ip[..28]);

    let orig6 = Ip::new(POD_V6, CLUSTER_IP6, UDP).wrap(udp_dgram(33333, 80, b"x"), false);
    let run = dp.tc_egress(node.uplink, &frame(UPLINK_MAC, GW_MAC, &orig6));
    let d = decode(&run.out);
    assert_eq!(
        (d.src, d.dst, d.proto),
        (ip(CLUSTER_IP6), ip(POD_V6), ICMPV6)
    );
    assert_eq!(
        &d.l4[..2],
        &[1, 4],
        "ICMPv6 destination unreachable / port unreachable"
    );
    assert_eq!(&d.l4[8..], &orig6[..48]);

    // From outside at XDP: same answer, sent back out.
    let orig_ip = Ip::new(CLIENT_EXT, NODE_V4, UDP).wrap(udp_dgram(1234, 30090, b"q"), false);
    let run = dp.xdp(node.uplink, &frame(GW_MAC, UPLINK_MAC, &orig_ip));
    assert_eq!(run.verdict, XDP_TX);
    let d = decode(&run.out);
    assert_eq!(
        (d.src, d.dst, d.smac, d.dmac),
        (ip(NODE_V4), ip(CLIENT_EXT), UPLINK_MAC, GW_MAC)
    );
    assert_eq!(&d.l4[8..], &orig_ip[..28]);
}

// ------------------------------------------------------------------------------------------------
// ICMP errors about translated flows
// ------------------------------------------------------------------------------------------------

#[test]
fn icmp_errors_about_a_translated_flow_reach_the_client_translated() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    dp.program(&Svc::new(
        12,
        PROTO_UDP,
        &[(FrontendKind::ClusterIp, CLUSTER_IP, 53)],
        &[(12, EP1, 5353, BackendState::Active)],
    ));
    let q = outbound(POD_V4, CLUSTER_IP, udp_dgram(33333, 53, b"query"), UDP);
    let sent = dp.tc_egress(node.uplink, &q).out;
    let quoted = sent[14..14 + 28].to_vec();

    // Port unreachable from the endpoint itself: outer source becomes the frontend.
    let err = from_outside(EP1, NODE_V4, icmp_error(3, 3, 0, &quoted), ICMP);
    let run = dp.xdp(node.uplink, &err);
    assert_eq!(
        run.verdict, XDP_PASS,
        "the pod is behind pod0: the kernel delivers"
    );
    let d = decode(&run.out);
    assert_eq!((d.src, d.dst), (ip(CLUSTER_IP), ip(POD_V4)));
    let inner = &d.l4[8..];
    assert_eq!(csum(&inner[..20]), 0, "quoted IPv4 header checksum");
    assert_eq!(&inner[12..16], &[10, 244, 0, 5], "quoted source: the pod");
    assert_eq!(
        &inner[16..20],
        &[10, 96, 0, 10],
        "quoted destination: the ClusterIP"
    );
    assert_eq!(
        &inner[20..24],
        &[0x82, 0x35, 0, 53],
        "quoted ports 33333 -> 53"
    );
    // The quoted UDP checksum was updated too: recompute it over the quoted datagram.
    let orig_udp = Ip::new(POD_V4, CLUSTER_IP, UDP).wrap(udp_dgram(33333, 53, b"query"), false);
    assert_eq!(
        &inner[26..28],
        &orig_udp[26..28],
        "quoted UDP checksum as the pod sent it"
    );
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);

    // Fragmentation needed from a router on the way: its own address stays the outer source.
    let err = from_outside(GW_V4, NODE_V4, icmp_error(3, 4, 1400, &quoted), ICMP);
    let d = decode(&dp.xdp(node.uplink, &err).out);
    assert_eq!((d.src, d.dst), (ip(GW_V4), ip(POD_V4)));
    assert_eq!(
        u32::from_be_bytes(d.l4[4..8].try_into().unwrap()),
        1400,
        "the MTU is kept"
    );

    // An error quoting a flow we never made passes untouched.
    let stranger = Ip::new(NODE_V4, "203.0.113.99", UDP).wrap(udp_dgram(62000, 53, b"q"), false);
    let err = from_outside(
        "203.0.113.99",
        NODE_V4,
        icmp_error(3, 3, 0, &stranger[..28]),
        ICMP,
    );
    let run = dp.xdp(node.uplink, &err);
    assert_eq!((run.verdict, run.out == err), (XDP_PASS, true));
}

#[test]
fn icmpv6_packet_too_big_is_translated() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    dp.program(&Svc {
        egress: NODE_V6,
        ..Svc::new(
            13,
            PROTO_TCP,
            &[(FrontendKind::ClusterIp, CLUSTER_IP6, 443)],
            &[(13, EP1_6, 8443, BackendState::Active)],
        )
    });
    let syn = pod_syn6();
    let sent = dp.tc_egress(node.uplink, &syn).out;
    // The router quotes our whole 60-byte segment (IPv6 header + TCP header).
    let err = from_outside(GW_V6, NODE_V6, icmp_error(2, 0, 1280, &sent[14..]), ICMPV6);
    let run = dp.xdp(node.uplink, &err);
    let d = decode(&run.out);
    assert_eq!((d.src, d.dst), (ip(GW_V6), ip(POD_V6)));
    let inner = &d.l4[8..];
    assert_eq!(&inner[8..24], &ip6_octets(POD_V6));
    assert_eq!(&inner[24..40], &ip6_octets(CLUSTER_IP6));
    assert_eq!(
        &inner[40..44],
        &[0x9c, 0x40, 0x01, 0xbb],
        "quoted ports 40000 -> 443"
    );
    // The quoted TCP checksum is whole again, as the pod computed it.
    let orig = Ip::new(POD_V6, CLUSTER_IP6, TCP).wrap(tcp_seg(40000, 443, 7, 0, SYN, &[]), false);
    assert_eq!(&inner[56..58], &orig[56..58]);
}

fn ip6_octets(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

// ------------------------------------------------------------------------------------------------
// Endpoint lifecycle, affinity, selection
// ------------------------------------------------------------------------------------------------

fn outside_syn(sport: u16) -> Vec<u8> {
    from_outside(
        CLIENT_EXT,
        NODE_V4,
        tcp_seg(sport, 30080, 1, 0, SYN, &[]),
        TCP,
    )
}

fn outside_ack(sport: u16) -> Vec<u8> {
    from_outside(
        CLIENT_EXT,
        NODE_V4,
        tcp_seg(sport, 30080, 2, 100, ACK, b"data"),
        TCP,
    )
}

/// Service 1: NodePort 30080 to one active endpoint `ep`:8080.
fn nodeport_service(dp: &mut Datapath, ep: &str) {
    dp.program(&Svc::new(
        1,
        PROTO_TCP,
        &[(FrontendKind::NodePort, NODE_V4, 30080)],
        &[(1, ep, 8080, BackendState::Active)],
    ));
}

/// Opens flows from the ports of `sports` until one lands on EP1; returns its port.
fn flow_on_ep1(dp: &mut Datapath, node: &TestNode, sports: std::ops::Range<u16>) -> u16 {
    sports
        .into_iter()
        .find(|p| decode(&dp.xdp(node.uplink, &outside_syn(*p)).out).dst == ip(EP1))
        .unwrap()
}

/// EP1 leaves `tcp_service` in `state` with `generation`: out of the slots, EP2 alone in them.
fn ep1_leaves(dp: &mut Datapath, state: BackendState, generation: u32) {
    dp.put_backend(1, EP1, 8080, state, generation);
    dp.program(&Svc::new(
        1,
        PROTO_TCP,
        &[],
        &[(2, EP2, 8080, BackendState::Active)],
    ));
}

#[test]
fn new_flows_spread_over_active_endpoints() {
    let (node, mut dp) = with_tcp_service();
    let mut seen = std::collections::HashMap::new();
    for sport in 20000..20064 {
        let d = decode(&dp.xdp(node.uplink, &outside_syn(sport)).out);
        *seen.entry(d.dst).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both endpoints used: {seen:?}");
    assert!(seen.values().all(|n| *n >= 16), "roughly even: {seen:?}");
}

#[test]
fn session_affinity_keeps_a_client_on_one_endpoint() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    dp.program(&Svc {
        affinity_timeout: 10800,
        ..Svc::new(
            1,
            PROTO_TCP,
            &[(FrontendKind::NodePort, NODE_V4, 30080)],
            &[
                (1, EP1, 8080, BackendState::Active),
                (2, EP2, 8080, BackendState::Active),
            ],
        )
    });
    let first = decode(&dp.xdp(node.uplink, &outside_syn(21000)).out).dst;
    for sport in 21001..21020 {
        let d = decode(&dp.xdp(node.uplink, &outside_syn(sport)).out);
        assert_eq!(
            d.dst, first,
            "flow from port {sport} left its affinity endpoint"
        );
    }
    assert_eq!(dp.counter(Counter::AffinityHit), 19);
    // Another client is free to land elsewhere (and does, for some address).
    let mut others = std::collections::HashSet::new();
    for i in 1..40 {
        let client = format!("198.51.100.{i}");
        let pkt = from_outside(&client, NODE_V4, tcp_seg(1000, 30080, 1, 0, SYN, &[]), TCP);
        others.insert(decode(&dp.xdp(node.uplink, &pkt).out).dst);
    }
    assert_eq!(others.len(), 2);
}

#[test]
fn draining_endpoints_keep_their_flows_but_get_no_new_ones() {
    let (node, mut dp) = with_tcp_service();
    let sport = flow_on_ep1(&mut dp, &node, 22000..22100);
    // EP1 starts terminating: out of the slots, still in BACKENDS as Draining.
    ep1_leaves(&mut dp, BackendState::Draining, 1);
    let d = decode(&dp.xdp(node.uplink, &outside_ack(sport)).out);
    assert_eq!(d.dst, ip(EP1), "the established flow stays");
    for p in 23000..23020 {
        assert_eq!(
            decode(&dp.xdp(node.uplink, &outside_syn(p)).out).dst,
            ip(EP2)
        );
    }
}

#[test]
fn removed_endpoints_reset_tcp_and_rebalance_udp() {
    let (node, mut dp) = with_tcp_service();
    let sport = flow_on_ep1(&mut dp, &node, 24000..24100);
    // EP1 removed: the agent frees the id (generation bump) and shrinks the slots.
    ep1_leaves(&mut dp, BackendState::Free, 2);
    let run = dp.xdp(node.uplink, &outside_ack(sport));
    assert_eq!(run.verdict, XDP_TX);
    let d = decode(&run.out);
    assert_eq!(
        (d.src, d.dst, d.tcp_flags, d.seq),
        (ip(NODE_V4), ip(CLIENT_EXT), RST, 100),
        "the client is told"
    );
    assert_eq!(dp.counter(Counter::DropEndpointRemoved), 1);
    assert!(
        dp.ct_entries()
            .iter()
            .all(|(k, _)| port_host(k.sport) != sport),
        "flow removed"
    );
    assert!(
        dp.revnat_entries()
            .iter()
            .all(|(_, v)| port_host(v.client_port) != sport || v.is_closed()),
        "its SNAT port is no longer in use (only held for the client)"
    );

    // UDP: the flow moves to a remaining endpoint instead of black-holing.
    dp.program(&Svc::new(
        2,
        PROTO_UDP,
        &[(FrontendKind::NodePort, NODE_V4, 30053)],
        &[
            (3, EP1, 53, BackendState::Active),
            (4, EP2, 53, BackendState::Active),
        ],
    ));
    let udp = |p: u16| from_outside(CLIENT_EXT, NODE_V4, udp_dgram(p, 30053, b"q"), UDP);
    let p = (25000..25100)
        .find(|p| decode(&dp.xdp(node.uplink, &udp(*p)).out).dst == ip(EP1))
        .unwrap();
    dp.put_backend(3, EP1, 53, BackendState::Free, 2);
    dp.program(&Svc::new(
        2,
        PROTO_UDP,
        &[],
        &[(4, EP2, 53, BackendState::Active)],
    ));
    let d = decode(&dp.xdp(node.uplink, &udp(p)).out);
    assert_eq!(d.dst, ip(EP2));
    assert_eq!(dp.counter(Counter::UdpRebalanced), 1);
}

#[test]
fn a_syn_reusing_a_closed_tuple_chooses_again_and_midstream_misses_are_counted() {
    let (node, mut dp) = with_tcp_service();
    dp.xdp(node.uplink, &outside_syn(26000));
    let rst = from_outside(
        CLIENT_EXT,
        NODE_V4,
        tcp_seg(26000, 30080, 2, 0, RST, &[]),
        TCP,
    );
    dp.xdp(node.uplink, &rst);
    dp.xdp(node.uplink, &outside_syn(26000));
    assert_eq!(dp.counter(Counter::CtReopened), 1);
    assert_eq!(dp.counter(Counter::CtCreated), 2);
    // A data segment for a flow we never saw still gets a flow (the endpoint will reset it).
    let run = dp.xdp(node.uplink, &outside_ack(26001));
    assert_eq!(run.verdict, XDP_TX);
    assert_eq!(dp.counter(Counter::CtMissMidstream), 1);
}

#[test]
fn snat_port_exhaustion_is_refused_at_once_counted_and_reported() {
    let node = TestNode::new();
    let mut dp = Datapath::load_with(snat_ports(61000, 61001));
    nodeport_service(&mut dp, EP1);
    let mut ports = std::collections::HashSet::new();
    for sport in [27000, 27001] {
        let run = dp.xdp(node.uplink, &outside_syn(sport));
        assert_eq!(run.verdict, XDP_TX);
        ports.insert(decode(&run.out).sport);
    }
    assert_eq!(ports, [61000, 61001].into_iter().collect());
    assert!(dp.events().is_empty());
    // The third client is told at once (a RST from the NodePort), not left to time out.
    for sport in [27002, 27003] {
        let run = dp.xdp(node.uplink, &outside_syn(sport));
        assert_eq!(run.verdict, XDP_TX);
        let rst = decode(&run.out);
        assert_eq!(
            (rst.src, rst.sport, rst.dst, rst.dport),
            (ip(NODE_V4), 30080, ip(CLIENT_EXT), sport)
        );
        assert_eq!(rst.tcp_flags & RST, RST, "a reset, not a translated SYN");
    }
    assert_eq!(dp.counter(Counter::DropSnatExhausted), 2);
    // One event for the agent (rate-limited: the second refusal within a second is folded into
    // the next event's count), naming the service, the endpoint and the egress address.
    let events = dp.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (e.kind, e.count, e.service_id, e.backend, e.egress),
        (EV_SNAT_EXHAUSTED, 1, 1, addr(EP1), addr(NODE_V4))
    );
    assert_eq!((port_host(e.backend_port), e.proto), (8080, PROTO_TCP));
}

/// A second egress address for the pool tests (the first is the node's, NODE_V4).
const POOL_2: &str = "10.0.0.2";

/// With an egress pool, the SNAT pairs span its addresses: one port and two addresses carry two
/// flows to one endpoint, one from each address; the third is refused at once, counted, and
/// reported naming the pool's first address and its size. Replies to either address find
/// their flow.
#[test]
fn an_egress_pool_multiplies_the_snat_pairs_per_endpoint() {
    let node = TestNode::new();
    let mut dp = Datapath::load_with(snat_ports(61000, 61000));
    nodeport_service(&mut dp, EP1);
    dp.set_egress_pool(1, &[NODE_V4, POOL_2]);
    let mut sources = std::collections::BTreeSet::new();
    let mut outs = Vec::new();
    for sport in [29000, 29001] {
        let run = dp.xdp(node.uplink, &outside_syn(sport));
        assert_eq!(run.verdict, XDP_TX);
        let out = decode(&run.out);
        assert_eq!((out.dst, out.dport, out.sport), (ip(EP1), 8080, 61000));
        sources.insert(out.src);
        outs.push((sport, out));
    }
    assert_eq!(
        sources,
        [ip(NODE_V4), ip(POOL_2)].into_iter().collect(),
        "one flow from each pool address"
    );
    let refused = decode(&dp.xdp(node.uplink, &outside_syn(29002)).out);
    assert_eq!(refused.tcp_flags & RST, RST, "every pair is taken");
    assert_eq!(refused.dport, 29002);
    assert_eq!(dp.counter(Counter::DropSnatExhausted), 1);
    let events = dp.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].kind, events[0].egress, events[0].egress_count),
        (EV_SNAT_EXHAUSTED, addr(NODE_V4), 2)
    );
    // Each flow's reverse NAT entry is keyed by its own address.
    let keyed: std::collections::BTreeSet<_> = dp
        .revnat_entries()
        .iter()
        .map(|(k, v)| (k.snat.to_ip(), port_host(v.client_port)))
        .collect();
    assert_eq!(keyed.len(), 2, "{keyed:?}");
    for (sport, out) in &outs {
        assert!(keyed.contains(&(out.src, *sport)), "{keyed:?}");
        let reply = from_outside(
            EP1,
            &out.src.to_string(),
            tcp_seg(8080, 61000, 500, 2, SYN | ACK, &[]),
            TCP,
        );
        let run = dp.xdp(node.uplink, &reply);
        assert_eq!(run.verdict, XDP_TX);
        let back = decode(&run.out);
        assert_eq!(
            (back.src, back.sport, back.dst, back.dport),
            (ip(NODE_V4), 30080, ip(CLIENT_EXT), *sport),
            "the reply to {} reaches its client",
            out.src
        );
    }
}

/// A Service flagged for a pool whose entry is missing (an agent that recreated the pool map
/// and has not written it yet) SNATs to its `egress` alone.
#[test]
fn a_missing_pool_leaves_the_service_its_one_address() {
    let node = TestNode::new();
    let mut dp = Datapath::load_with(snat_ports(61000, 61000));
    nodeport_service(&mut dp, EP1);
    dp.flag_egress_pool(1);
    let run = dp.xdp(node.uplink, &outside_syn(29100));
    assert_eq!(run.verdict, XDP_TX);
    assert_eq!(decode(&run.out).src, ip(NODE_V4));
    let refused = decode(&dp.xdp(node.uplink, &outside_syn(29101)).out);
    assert_eq!(refused.tcp_flags & RST, RST, "one address, one port");
    assert_eq!(dp.events()[0].egress_count, 1);
}

/// A large pool with a range beyond the walked size: candidates are scattered over every
/// (address, port) pair, so flows spread over all addresses.
#[test]
fn flows_spread_over_every_pool_address() {
    let node = TestNode::new();
    let mut dp = Datapath::load_with(snat_ports(61000, 61099));
    nodeport_service(&mut dp, EP1);
    let pool = [NODE_V4, POOL_2, "10.0.0.3", "10.0.0.4"];
    dp.set_egress_pool(1, &pool);
    let mut per_address = std::collections::BTreeMap::new();
    for sport in 30000..30200 {
        let run = dp.xdp(node.uplink, &outside_syn(sport));
        assert_eq!(run.verdict, XDP_TX);
        let out = decode(&run.out);
        assert_eq!(out.dst, ip(EP1));
        assert!((61000..=61099).contains(&out.sport));
        *per_address.entry(out.src).or_insert(0u32) += 1;
    }
    assert_eq!(
        per_address.keys().copied().collect::<Vec<_>>(),
        pool.iter().map(|a| ip(a)).collect::<Vec<_>>(),
        "{per_address:?}"
    );
    // 200 flows over 4 x 100 pairs: each address carries a fair share, not a trickle.
    assert!(per_address.values().all(|n| *n >= 25), "{per_address:?}");
    assert_eq!(dp.counter(Counter::DropSnatExhausted), 0);
}

#[test]
fn expired_flows_release_their_snat_port() {
    let node = TestNode::new();
    let mut dp = Datapath::load_with(Config {
        tcp_syn_timeout: 1,
        ..snat_ports(61000, 61000)
    });
    nodeport_service(&mut dp, EP1);
    assert_eq!(dp.xdp(node.uplink, &outside_syn(28000)).verdict, XDP_TX);
    let refused = decode(&dp.xdp(node.uplink, &outside_syn(28001)).out);
    assert_eq!(refused.tcp_flags & RST, RST, "the only port is taken");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let run = dp.xdp(node.uplink, &outside_syn(28001));
    assert_eq!(run.verdict, XDP_TX);
    assert_eq!(
        decode(&run.out).dst,
        ip(EP1),
        "the unanswered SYN's flow expired and its port went to the new one"
    );
    assert_eq!(dp.counter(Counter::CtStaleReplaced), 1);
}

#[test]
fn xdp_hands_flows_it_cannot_forward_to_tc_which_redirects_them() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    // The endpoint is on the pod network: reachable through pod0, not the uplink.
    nodeport_service(&mut dp, POD_V4);
    let syn = outside_syn(29000);
    let run = dp.xdp(node.uplink, &syn);
    assert_eq!(
        (run.verdict, run.out == syn),
        (XDP_PASS, true),
        "passed on untouched"
    );
    assert_eq!(dp.counter(Counter::XdpPassToTc), 1);
    assert!(dp.ct_entries().is_empty(), "nothing allocated at XDP");
    let run = dp.tc_ingress(node.uplink, &syn);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let d = decode(&run.out);
    assert_eq!((d.dst, d.dport, d.dmac), (ip(POD_V4), 8080, POD_MAC));
}

// ------------------------------------------------------------------------------------------------
// Malformed, truncated, optioned and fragmented packets: passed or dropped on purpose, never
// misrewritten.
// ------------------------------------------------------------------------------------------------

#[test]
fn ipv4_options_are_kept_and_the_transport_header_found_behind_them() {
    let (node, mut dp) = with_tcp_service();
    let mut ip4 = Ip::new(CLIENT_EXT, NODE_V4, TCP);
    ip4.options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0]; // router alert, NOPs, end of list
    let pkt = frame(
        GW_MAC,
        UPLINK_MAC,
        &ip4.wrap(tcp_seg(30000, 30080, 1, 0, SYN, b"opt"), false),
    );
    let run = dp.xdp(node.uplink, &pkt);
    assert_eq!(run.verdict, XDP_TX);
    let d = decode(&run.out);
    assert_eq!(
        (d.src, d.dport, &d.l4[20..]),
        (ip(NODE_V4), 8080, &b"opt"[..])
    );
    assert_eq!(&run.out[34..42], &ip4.options[..], "options untouched");
}

#[test]
fn lying_lengths_to_a_frontend_are_dropped_and_cut_headers_passed() {
    let (node, mut dp) = with_tcp_service();
    // Total length claims 200 bytes; the frame has 40.
    let mut ip4 = Ip::new(CLIENT_EXT, NODE_V4, TCP);
    ip4.tot_len = Some(200);
    let pkt = frame(
        GW_MAC,
        UPLINK_MAC,
        &ip4.wrap(tcp_seg(31000, 30080, 1, 0, SYN, &[]), false),
    );
    assert_eq!(dp.xdp(node.uplink, &pkt).verdict, XDP_DROP);
    assert_eq!(dp.counter(Counter::DropMalformed), 1);
    // Total length shorter than the header.
    ip4.tot_len = Some(12);
    let pkt = frame(
        GW_MAC,
        UPLINK_MAC,
        &ip4.wrap(tcp_seg(31001, 30080, 1, 0, SYN, &[]), false),
    );
    assert_eq!(dp.tc_ingress(node.uplink, &pkt).verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropMalformed), 2);
    // TCP header cut after the ports: cannot be translated safely, handed to the kernel as is.
    let full = from_outside(
        CLIENT_EXT,
        NODE_V4,
        tcp_seg(31002, 30080, 1, 0, SYN, &[]),
        TCP,
    );
    let cut = full[..14 + 20 + 10].to_vec();
    let run = dp.xdp(node.uplink, &cut);
    assert_eq!((run.verdict, run.out == cut), (XDP_PASS, true));
    // An IPv4 header with IHL < 5.
    let mut bad = full.clone();
    bad[14] = 0x44;
    let run = dp.xdp(node.uplink, &bad);
    assert_eq!((run.verdict, run.out == bad), (XDP_PASS, true));
    assert_eq!(dp.counter(Counter::UnparsedPassed), 2);
    assert!(dp.ct_entries().is_empty());
}

#[test]
fn fragments_follow_their_first_fragment() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    dp.program(&Svc::new(
        4,
        PROTO_UDP,
        &[
            (FrontendKind::NodePort, NODE_V4, 30053),
            (FrontendKind::NodePort, NODE_V6, 30053),
        ],
        &[(6, EP1, 5353, BackendState::Active)],
    ));
    // A 40-byte UDP datagram in two fragments: header + 16 bytes, then 16 more.
    let payload: Vec<u8> = (0u8..32).collect();
    let dgram = l4_with_csum(
        ip(CLIENT_EXT),
        ip(NODE_V4),
        UDP,
        udp_dgram(40000, 30053, &payload),
    );
    let mut first = Ip::new(CLIENT_EXT, NODE_V4, UDP);
    first.frag = Some((0, true));
    let mut later = first.clone();
    later.frag = Some((3, false));
    let f1 = frame(GW_MAC, UPLINK_MAC, &first.wrap(dgram[..24].to_vec(), true));
    let f2 = frame(GW_MAC, UPLINK_MAC, &later.wrap(dgram[24..].to_vec(), true));

    // Later fragment first: nothing to match it with; passed untouched, counted.
    let run = dp.xdp(node.uplink, &f2);
    assert_eq!((run.verdict, run.out == f2), (XDP_PASS, true));
    assert_eq!(dp.counter(Counter::FragmentUntracked), 1);

    let r1 = dp.xdp(node.uplink, &f1);
    assert_eq!(r1.verdict, XDP_TX);
    let r2 = dp.xdp(node.uplink, &f2);
    assert_eq!(r2.verdict, XDP_TX);
    assert_eq!(dp.counter(Counter::FragmentTranslated), 1);
    let (h1, h2) = (&r1.out[14..34], &r2.out[14..34]);
    assert_eq!((csum(h1), csum(h2)), (0, 0));
    assert_eq!(
        (&h1[12..16], &h2[12..16]),
        (&[10, 0, 0, 1][..], &[10, 0, 0, 1][..]),
        "both SNATed"
    );
    assert_eq!(
        (&h1[16..20], &h2[16..20]),
        (&[203, 0, 113, 7][..], &[203, 0, 113, 7][..]),
        "both DNATed"
    );
    assert_eq!(
        &r2.out[34..],
        &dgram[24..],
        "the later fragment's payload is untouched"
    );
    // Reassembled, the datagram's checksum is right for the new addresses.
    let mut whole = r1.out[34..].to_vec();
    whole.extend_from_slice(&r2.out[34..]);
    assert_eq!(
        fold(sum16(
            &whole,
            pseudo(ip(NODE_V4), ip(EP1), UDP, whole.len())
        )),
        0xffff
    );
}

#[test]
fn without_xdp_tx_xdp_leaves_sending_back_out_to_tc() {
    let node = TestNode::new();
    let mut dp = Datapath::load_with(Config {
        flags: 0,
        ..Config::DEFAULT
    });
    tcp_service(&mut dp);
    // A NodePort SYN from outside: XDP could only send it by XDP_TX, so it passes it on whole.
    let syn = outside_syn(32000);
    let run = dp.xdp(node.uplink, &syn);
    assert_eq!((run.verdict, run.out == syn), (XDP_PASS, true));
    assert!(dp.ct_entries().is_empty());
    // TC translates and redirects it out of the uplink.
    let run = dp.tc_ingress(node.uplink, &syn);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let out = decode(&run.out);
    // The endpoint's answer to an outside client: XDP passes it, TC sends it back out.
    let synack = endpoint_synack(&out, 9, 2);
    let run = dp.xdp(node.uplink, &synack);
    assert_eq!((run.verdict, run.out == synack), (XDP_PASS, true));
    let run = dp.tc_ingress(node.uplink, &synack);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(decode(&run.out).dst, ip(CLIENT_EXT));
    // A reply to a pod needs no XDP_TX: XDP still translates it.
    let out = decode(&dp.tc_egress(node.uplink, &pod_syn(40005)).out);
    let synack = endpoint_synack(&out, 9, 2);
    let d = decode(&dp.xdp(node.uplink, &synack).out);
    assert_eq!(d.dst, ip(POD_V4));
}

/// The gateway's new MAC address after [`move_gateway`].
const MOVED_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfd];

/// The gateway moves to another MAC address ([`MOVED_GW_MAC`]).
fn move_gateway() {
    sh("ip neigh replace 10.0.0.254 lladdr 02:00:00:00:00:fd dev up0 nud permanent");
}

/// Sends `packet(i)` every 100 ms until one leaves for [`MOVED_GW_MAC`] (each before it for
/// the old one), and asserts that it took at most NEXT_HOP_CACHE_SECS (and a tick). `who`: whose
/// packets, for the message.
fn reaches_moved_gateway_within_the_cache_time(
    dp: &mut Datapath,
    node: &TestNode,
    who: &str,
    packet: impl Fn(u16) -> Vec<u8>,
) {
    let mut seen_new = None;
    for i in 0..30u16 {
        let d = decode(&dp.xdp(node.uplink, &packet(i)).out);
        if d.dmac == MOVED_GW_MAC {
            seen_new = Some(i as usize);
            break;
        }
        assert_eq!(d.dmac, GW_MAC);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let after = seen_new.unwrap_or_else(|| panic!("the new MAC address never reached {who}"));
    assert!(
        after <= (NEXT_HOP_CACHE_SECS as usize + 1) * 10,
        "took {after} x 100 ms"
    );
}

#[test]
fn established_flows_cache_their_next_hop_for_a_second() {
    let (node, mut dp) = with_tcp_service();
    let first = decode(&dp.xdp(node.uplink, &outside_syn(33000)).out);
    assert_eq!(first.dmac, GW_MAC);
    move_gateway();
    // The flow keeps its cached next hop for at most NEXT_HOP_CACHE_SECS, then looks again.
    reaches_moved_gateway_within_the_cache_time(&mut dp, &node, "the established flow", |_| {
        outside_ack(33000)
    });
    // New flows share their endpoint's route for as long (see the next test): by now it is
    // the new one for them too.
    assert_eq!(
        decode(&dp.xdp(node.uplink, &outside_syn(33001)).out).dmac,
        MOVED_GW_MAC
    );
}

/// New flows to one endpoint share the route the FIB last gave one of them (on the same CPU)
/// for at most NEXT_HOP_CACHE_SECS, as long as an established flow trusts its own.
#[test]
fn new_flows_to_an_endpoint_share_its_route_for_a_second() {
    // The cache is per CPU: this thread stays on one, so every packet meets the same cache.
    testbed::load::pin_thread(0).expect("this thread pinned to CPU 0");
    let node = TestNode::new();
    let mut dp = Datapath::load();
    nodeport_service(&mut dp, EP1);
    // The data path's clock (Config::DEFAULT: whole seconds of CLOCK_MONOTONIC_COARSE) must not
    // tick between the first two flows, or the cached route would be a second old already.
    loop {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: t is a valid timespec to write.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) };
        if t.tv_nsec < 500_000_000 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        decode(&dp.xdp(node.uplink, &outside_syn(34000)).out).dmac,
        GW_MAC
    );
    move_gateway();
    // The FIB would answer with the new address at once; the next new flow does not ask it.
    assert_eq!(
        decode(&dp.xdp(node.uplink, &outside_syn(34001)).out).dmac,
        GW_MAC,
        "the second new flow to the endpoint asked the FIB"
    );
    reaches_moved_gateway_within_the_cache_time(&mut dp, &node, "new flows", |i| {
        outside_syn(34002 + i)
    });
}

/// A SYN to `dst`:80 as the pod sends it: from the pod's MAC to the node's pod-side MAC.
fn from_pod(dst: &str, sport: u16) -> Vec<u8> {
    frame(
        POD_MAC,
        [0x02, 0, 0, 0, 0x01, 0x01],
        &Ip::new(POD_V4, dst, TCP).wrap(tcp_seg(sport, 80, 1, 0, SYN, &[]), false),
    )
}

#[test]
fn pod_traffic_is_translated_at_the_pod_veth_before_netfilter() {
    let (node, mut dp) = with_tcp_service();
    let syn = from_pod(CLUSTER_IP, 40100);
    let run = dp.tc_pod(node.pod_if, &syn);
    // Straight to the uplink: passing a packet from the egress IP up the stack would be a martian.
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let d = decode(&run.out);
    assert_eq!(
        (d.src, d.dport, d.smac, d.dmac),
        (ip(NODE_V4), 8080, UPLINK_MAC, GW_MAC)
    );
    assert!(d.dst == ip(EP1) || d.dst == ip(EP2));
    // The reply comes back through the uplink: XDP leaves a pod's flow to TC, which translates
    // it and sends it straight to the pod's interface, as the pod's packets left it.
    // The reverse NAT entry says whose flow it is, so XDP needs no conntrack lookup to know.
    let synack = endpoint_synack(&d, 9, 2);
    let rn = dp.revnat_entries();
    assert_eq!(rn.len(), 1);
    assert_eq!(rn[0].1.flags & RN_F_FROM_POD, RN_F_FROM_POD);
    let run = dp.xdp(node.uplink, &synack);
    assert_eq!((run.verdict, run.out == synack), (XDP_PASS, true));
    let run = dp.tc_ingress(node.uplink, &synack);
    let back = decode(&run.out);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(CLUSTER_IP), 80, ip(POD_V4), 40100)
    );
    assert_eq!((run.verdict, back.dmac), (TC_ACT_REDIRECT, POD_MAC));
    // Anything else from the pod is not ours.
    let other = from_pod("192.0.2.99", 1);
    let run = dp.tc_pod(node.pod_if, &other);
    assert_eq!((run.verdict, run.out == other), (TC_ACT_OK, true));
    // A Service without endpoints answers the pod directly (a new flow: a new source port).
    empty_service(&mut dp, PROTO_TCP);
    let syn = from_pod(CLUSTER_IP, 40101);
    let run = dp.tc_pod(node.pod_if, &syn);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let d = decode(&run.out);
    assert_eq!(
        (d.src, d.dst, d.tcp_flags, d.dmac),
        (ip(CLUSTER_IP), ip(POD_V4), RST | ACK, POD_MAC)
    );
}

// ------------------------------------------------------------------------------------------------
// SNAT port allocation under load
// ------------------------------------------------------------------------------------------------

/// Opens new flows from one client to one endpoint through a SNAT range of `ports` ports. Up to
/// `fill_pct` percent of the range in use no flow may be refused; every port handed out is
/// distinct and in the range; the last free ports are still found; a full range refuses new flows
/// as counted drops and leaves every live flow its port.
///
/// `first`: the flows' first segments. SYNs take the ports in sequence; a segment without SYN (a
/// flow that lost its conntrack entry) takes them from its hash, with the scattered tries.
fn snat_range_fills_up(ports: u16, fill_pct: usize, first: fn(u16) -> Vec<u8>) {
    let node = TestNode::new();
    let (min, max) = (61000, 61000 + (ports - 1));
    // Conntrack and reverse NAT (LRU maps) far larger than the range: no eviction frees a port.
    let limits = extproxy::loader::Limits {
        ct_max: 8 * ports as u32,
        ..test_limits()
    };
    let mut dp = Datapath::load_sized(snat_ports(min, max), &limits);
    nodeport_service(&mut dp, EP1);
    let n = ports as usize;
    let mut used = std::collections::HashSet::new();
    let mut sports = 1024u16..;
    // A SYN from a client port not used before: true if it was translated, false if refused.
    let mut new_flow = |dp: &mut Datapath, used: &mut std::collections::HashSet<u16>| {
        let run = dp.xdp(node.uplink, &first(sports.next().unwrap()));
        assert_eq!(run.verdict, XDP_TX);
        let out = decode(&run.out);
        if out.tcp_flags & RST != 0 {
            return false;
        }
        let port = out.sport;
        assert!(
            (min..=max).contains(&port),
            "port {port} outside {min}-{max}"
        );
        assert!(used.insert(port), "port {port} handed out twice");
        true
    };

    for in_use in 0..n * fill_pct / 100 {
        assert!(
            new_flow(&mut dp, &mut used),
            "{ports} ports: a new flow was refused with {in_use} in use ({:.1}% of the range)",
            in_use as f64 * 100.0 / n as f64
        );
    }
    assert_eq!(dp.counter(Counter::DropSnatExhausted), 0);

    // The last free ports: refusals are allowed now (and counted), but the range fills up.
    let mut refused = 0;
    for _ in 0..8 * n {
        if used.len() == n {
            break;
        }
        if !new_flow(&mut dp, &mut used) {
            refused += 1;
        }
    }
    assert_eq!(used.len(), n, "{ports} ports: the range never filled up");
    assert_eq!(dp.counter(Counter::DropSnatExhausted), refused);

    let by_port = |dp: &Datapath| {
        let mut rn = dp.revnat_entries();
        rn.sort_by_key(|(k, _)| port_host(k.snat_port));
        rn
    };
    let before = by_port(&dp);
    assert_eq!(before.len(), n);
    assert!(
        !new_flow(&mut dp, &mut used),
        "{ports} ports: a new flow got a port of a full range"
    );
    assert_eq!(dp.counter(Counter::DropSnatExhausted), refused + 1);
    assert!(
        by_port(&dp) == before,
        "{ports} ports: a refused flow changed the reverse NAT entries"
    );
    assert_eq!(dp.ct_entries().len(), n);
}

#[test]
fn snat_ports_are_handed_out_until_the_range_is_nearly_full() {
    // (ports, percent in use before the first refusal is allowed). Consecutive candidates (linear
    // probing) first refused a flow at 85.9%, 68.1% and 67.5% in use of the first three. With 32
    // scattered tries a flow is refused with probability f^32 at a fraction f in use: filling a
    // 4536-port range to 80% expects 0.09 refusals on the way.
    for (ports, fill_pct) in [
        (256, 80),
        (1000, 80),
        // The old default range.
        (4536, 80),
        // No larger than the tries: walked port by port, so nothing is refused before it is full.
        (20, 100),
    ] {
        snat_range_fills_up(ports, fill_pct, outside_ack);
        // In sequence: no port is taken twice before every other was, so none is refused
        // before the range is full.
        snat_range_fills_up(ports, 100, outside_syn);
    }
}

/// New connections take the SNAT ports in sequence, so a port comes round again only after
/// every other one was handed out: of the closed flows' ports, the one idle longest. Here the
/// endpoint closes first and the flows have no timestamps, so a reused port would meet its
/// TIME_WAIT; a range of 50 ports carries 50 connections before any port is held for another.
#[test]
fn new_connections_take_the_snat_ports_in_sequence() {
    let node = TestNode::new();
    let mut dp = Datapath::load_with(snat_ports(61000, 61049));
    nodeport_service(&mut dp, EP1);
    let mut ports = Vec::new();
    for i in 0..50u16 {
        let sport = 20000 + i;
        let snat = connect(&mut dp, &node, CLIENT_EXT, sport);
        close(&mut dp, &node, CLIENT_EXT, sport, snat, true);
        ports.push(snat);
    }
    // One full round of the range, each port once, one after the other.
    let mut sorted = ports.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, (61000..=61049).collect::<Vec<_>>(), "{ports:?}");
    let steps: Vec<u16> = ports
        .windows(2)
        .map(|w| w[1].wrapping_sub(w[0]) % 50)
        .collect();
    assert!(steps.iter().all(|d| *d == 1), "not in sequence: {ports:?}");
    assert_eq!(dp.counter(Counter::SnatCollision), 0);
    assert_eq!(dp.counter(Counter::SnatTimeWaitSkipped), 0);
    // Every port is now held for the endpoint's TIME_WAIT: a 51st connection from another
    // client port is refused at once, not handed a port the endpoint would not accept.
    assert!(refused(&mut dp, &node, CLIENT_EXT, 21000));
    assert_eq!(dp.counter(Counter::DropSnatExhausted), 1);
}

// ------------------------------------------------------------------------------------------------
// SNAT port holds, the new-flow table, port ranges
// ------------------------------------------------------------------------------------------------

const CLIENT_EXT2: &str = "198.51.100.10";

/// A TCP segment from `client`:`sport` to NodePort 30080.
fn client_seg(client: &str, sport: u16, flags: u8) -> Vec<u8> {
    from_outside(
        client,
        NODE_V4,
        tcp_seg(sport, 30080, 1, 1, flags, &[]),
        TCP,
    )
}

/// A segment from EP1:8080 to the node's SNAT port `snat_port`.
fn endpoint_seg(snat_port: u16, flags: u8) -> Vec<u8> {
    from_outside(
        EP1,
        NODE_V4,
        tcp_seg(8080, snat_port, 1, 1, flags, &[]),
        TCP,
    )
}

/// Opens a flow from `client`:`sport` to EP1 through the NodePort, completes its handshake, and
/// returns its SNAT port.
fn connect(dp: &mut Datapath, node: &TestNode, client: &str, sport: u16) -> u16 {
    let run = dp.xdp(node.uplink, &client_seg(client, sport, SYN));
    assert_eq!(run.verdict, XDP_TX);
    let out = decode(&run.out);
    assert_eq!(
        (out.dst, out.tcp_flags),
        (ip(EP1), SYN),
        "{client}:{sport} was refused"
    );
    assert_eq!(
        dp.xdp(node.uplink, &endpoint_seg(out.sport, SYN | ACK))
            .verdict,
        XDP_TX
    );
    assert_eq!(
        dp.xdp(node.uplink, &client_seg(client, sport, ACK)).verdict,
        XDP_TX
    );
    out.sport
}

/// Closes a flow with FINs both ways, the endpoint's first when `endpoint_first`.
fn close(
    dp: &mut Datapath,
    node: &TestNode,
    client: &str,
    sport: u16,
    snat: u16,
    endpoint_first: bool,
) {
    let from_endpoint = endpoint_seg(snat, FIN | ACK);
    let from_client = client_seg(client, sport, FIN | ACK);
    let (a, b) = if endpoint_first {
        (from_endpoint, from_client)
    } else {
        (from_client, from_endpoint)
    };
    assert_eq!(dp.xdp(node.uplink, &a).verdict, XDP_TX);
    assert_eq!(dp.xdp(node.uplink, &b).verdict, XDP_TX);
}

/// The reverse NAT entry of SNAT port `port`.
fn held(dp: &Datapath, port: u16) -> RevNatValue {
    dp.revnat_entries()
        .into_iter()
        .find(|(k, _)| port_host(k.snat_port) == port)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no reverse NAT entry for port {port}"))
}

fn refused(dp: &mut Datapath, node: &TestNode, client: &str, sport: u16) -> bool {
    let out = decode(&dp.xdp(node.uplink, &client_seg(client, sport, SYN)).out);
    out.tcp_flags & RST != 0
}

#[test]
fn without_timestamps_a_closed_flows_port_waits_out_the_endpoints_time_wait() {
    let node = TestNode::new();
    // One port, so every flow must reuse it; short holds so the test does not wait a minute.
    let mut dp = Datapath::load_with(Config {
        tcp_closing_timeout: 1,
        snat_timewait_hold: 2,
        ..snat_ports(61000, 61000)
    });
    nodeport_service(&mut dp, EP1);

    // The endpoint closes first (as an HTTP server with Connection: close does): it holds the
    // old connection in TIME_WAIT and would refuse about half of the SYNs of another connection
    // on the same port, those whose sequence number is not newer.
    let port = connect(&mut dp, &node, CLIENT_EXT, 40000);
    assert_eq!(port, 61000);
    close(&mut dp, &node, CLIENT_EXT, 40000, port, true);
    let rn = held(&dp, port);
    assert!(
        rn.is_closed(),
        "a closed flow's entry stays, holding the port"
    );
    assert_eq!(rn.flags, RN_F_ENDPOINT_TIME_WAIT, "no timestamps seen");

    // Another connection, even from the same address, is refused at once (counted) while the
    // hold lasts, rather than left to the endpoint.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(refused(&mut dp, &node, CLIENT_EXT2, 50000));
    assert!(refused(&mut dp, &node, CLIENT_EXT, 40001));
    assert!(dp.counter(Counter::SnatTimeWaitSkipped) >= 2);
    // The same client address and port reconnecting continues its sequence numbers: at once.
    assert_eq!(connect(&mut dp, &node, CLIENT_EXT, 40000), 61000);
    assert_eq!(dp.counter(Counter::SnatClosedPortReused), 1);

    // This time the client closes first: the endpoint keeps no TIME_WAIT, and the port goes to
    // anyone after the closing timeout (1 s here).
    close(&mut dp, &node, CLIENT_EXT, 40000, 61000, false);
    assert_eq!(held(&dp, 61000).flags, 0);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(refused(&mut dp, &node, CLIENT_EXT2, 50001));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(connect(&mut dp, &node, CLIENT_EXT2, 50002), 61000);
    assert_eq!(held(&dp, 61000).client, addr(CLIENT_EXT2));

    // Endpoint first again: another client waits out the (2 s) hold.
    close(&mut dp, &node, CLIENT_EXT2, 50002, 61000, true);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(refused(&mut dp, &node, CLIENT_EXT, 40004));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(
        refused(&mut dp, &node, CLIENT_EXT, 40005),
        "1.1 s into a 2 s hold"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(connect(&mut dp, &node, CLIENT_EXT, 40006), 61000);
}

/// A segment from `client`:`sport` to NodePort 30080 with a timestamp option.
fn client_seg_ts(client: &str, sport: u16, flags: u8, tsval: u32, tsecr: u32) -> Vec<u8> {
    let opts = ts_opts(flags & SYN != 0, tsval, tsecr);
    from_outside(
        client,
        NODE_V4,
        tcp_seg_opts(sport, 30080, 1, 1, flags, &opts, &[]),
        TCP,
    )
}

/// A segment from EP1:8080 to SNAT port `snat_port` with a timestamp option.
fn endpoint_seg_ts(snat_port: u16, flags: u8, tsval: u32, tsecr: u32) -> Vec<u8> {
    let opts = ts_opts(flags & SYN != 0, tsval, tsecr);
    from_outside(
        EP1,
        NODE_V4,
        tcp_seg_opts(8080, snat_port, 1, 1, flags, &opts, &[]),
        TCP,
    )
}

#[test]
fn with_timestamps_a_closed_flows_port_is_reused_at_once_with_its_timestamps_continued() {
    let node = TestNode::new();
    let mut dp = Datapath::load_with(snat_ports(61000, 61000));
    nodeport_service(&mut dp, EP1);
    let xdp = |dp: &mut Datapath, pkt: Vec<u8>| {
        let run = dp.xdp(node.uplink, &pkt);
        assert_eq!(run.verdict, XDP_TX);
        decode(&run.out)
    };

    // Flow A: client timestamps around 3,000,000; the endpoint's around 50.
    let syn = xdp(&mut dp, client_seg_ts(CLIENT_EXT, 40000, SYN, 3_000_000, 0));
    assert_eq!(
        syn.timestamps(),
        Some((3_000_000, 0)),
        "the first flow on a port is untouched"
    );
    xdp(&mut dp, endpoint_seg_ts(61000, SYN | ACK, 50, 3_000_000));
    xdp(
        &mut dp,
        client_seg_ts(CLIENT_EXT, 40000, ACK, 3_000_001, 50),
    );
    // The endpoint closes first: its FIN, then the client's FIN+ACK closes the flow.
    xdp(&mut dp, endpoint_seg_ts(61000, FIN | ACK, 51, 3_000_001));
    xdp(
        &mut dp,
        client_seg_ts(CLIENT_EXT, 40000, FIN | ACK, 3_000_002, 51),
    );
    let rn = held(&dp, 61000);
    assert_eq!(rn.flags, RN_F_ENDPOINT_TIME_WAIT | RN_F_TIMESTAMPS);
    assert_eq!(rn.ts_last, 3_000_002);

    // Flow B from another client, whose clock starts far below A's: the endpoint's TIME_WAIT
    // would refuse its SYN. It gets the port at once, its timestamps shifted past A's.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let syn = xdp(&mut dp, client_seg_ts(CLIENT_EXT2, 50000, SYN, 1_000, 0));
    assert_eq!((syn.dst, syn.sport, syn.tcp_flags), (ip(EP1), 61000, SYN));
    let (tsval, _) = syn.timestamps().unwrap();
    assert_eq!(
        tsval, 3_000_003,
        "continues right after the last TSval the endpoint saw"
    );
    let offset = tsval.wrapping_sub(1_000);
    let ct = dp
        .ct_entries()
        .into_iter()
        .find(|(k, _)| port_host(k.sport) == 50000)
        .unwrap()
        .1;
    assert_eq!(
        (ct.flags & CT_F_TS_OFFSET, ct.ts_offset),
        (CT_F_TS_OFFSET, offset)
    );
    // The endpoint echoes the shifted value; the client gets its own back.
    let synack = xdp(&mut dp, endpoint_seg_ts(61000, SYN | ACK, 80, tsval));
    assert_eq!(
        (synack.dst, synack.dport, synack.timestamps()),
        (ip(CLIENT_EXT2), 50000, Some((80, 1_000)))
    );
    let ack = xdp(&mut dp, client_seg_ts(CLIENT_EXT2, 50000, ACK, 1_005, 80));
    assert_eq!(ack.timestamps(), Some((1_005u32.wrapping_add(offset), 80)));
    // Segments without the option pass as they are (and the checksums, verified by decode,
    // stay right both ways).
    xdp(&mut dp, client_seg(CLIENT_EXT2, 50000, ACK));
    assert_eq!(dp.counter(Counter::SnatClosedPortReused), 1);
    assert_eq!(dp.counter(Counter::SnatTimeWaitSkipped), 0);

    // A client whose clock is already past the last TSval needs no shift.
    xdp(
        &mut dp,
        endpoint_seg_ts(61000, FIN | ACK, 81, 1_005u32.wrapping_add(offset)),
    );
    xdp(
        &mut dp,
        client_seg_ts(CLIENT_EXT2, 50000, FIN | ACK, 1_006, 81),
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    let syn = xdp(&mut dp, client_seg_ts(CLIENT_EXT, 40001, SYN, 9_000_000, 0));
    assert_eq!((syn.sport, syn.timestamps()), (61000, Some((9_000_000, 0))));
}

#[test]
fn a_flood_of_unfinished_handshakes_never_evicts_an_established_flow() {
    let node = TestNode::new();
    // 1024 established flows, 256 unfinished ones, 2048 reverse NAT entries.
    let mut dp = Datapath::load_sized(Config::DEFAULT, &test_limits());
    nodeport_service(&mut dp, EP1);
    let flows: Vec<(u16, u16)> = (0..50)
        .map(|i| (41000 + i, connect(&mut dp, &node, CLIENT_EXT, 41000 + i)))
        .collect();
    assert_eq!(dp.ct_table(MAP_CT).len(), 50);
    assert_eq!(dp.counter(Counter::CtEstablished), 50);

    // 5,000 SYNs from 5,000 client addresses that never complete their handshake: twenty times
    // what the table for new flows holds.
    let mut answered = 0;
    for i in 0..5000u32 {
        let client = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        let out = decode(&dp.xdp(node.uplink, &client_seg(&client, 9999, SYN)).out);
        if out.tcp_flags & RST == 0 {
            answered += 1;
        }
    }
    assert!(
        answered > 4000,
        "most flood SYNs still get through: {answered}"
    );
    assert!(dp.ct_table(MAP_CT_NEW).len() <= 256);

    // Every established flow is still there, both ways: the endpoint speaking first, then the
    // client, each translated with the flow's own port.
    assert_eq!(dp.ct_table(MAP_CT).len(), 50, "no established flow evicted");
    for (sport, snat) in flows {
        let run = dp.xdp(
            node.uplink,
            &from_outside(EP1, NODE_V4, tcp_seg(8080, snat, 5, 5, ACK, b"hello"), TCP),
        );
        assert_eq!(run.verdict, XDP_TX);
        let back = decode(&run.out);
        assert_eq!((back.dst, back.dport), (ip(CLIENT_EXT), sport));
        let run = dp.xdp(
            node.uplink,
            &from_outside(
                CLIENT_EXT,
                NODE_V4,
                tcp_seg(sport, 30080, 5, 10, ACK, b"hi"),
                TCP,
            ),
        );
        let out = decode(&run.out);
        assert_eq!((out.dst, out.sport), (ip(EP1), snat));
    }
    assert_eq!(dp.counter(Counter::CtMissReply), 0);
    assert_eq!(dp.counter(Counter::CtMissMidstream), 0);
}

#[test]
fn snat_ports_come_from_every_range_and_only_from_them() {
    let node = TestNode::new();
    let mut dp = Datapath::load_with(Config::DEFAULT.with_snat_ranges(&[
        PortRange {
            min: 61000,
            max: 61001,
        },
        PortRange {
            min: 62000,
            max: 62000,
        },
    ]));
    nodeport_service(&mut dp, EP1);
    let ports: std::collections::BTreeSet<u16> = (0..3)
        .map(|i| decode(&dp.xdp(node.uplink, &outside_syn(43000 + i)).out).sport)
        .collect();
    assert_eq!(ports, [61000, 61001, 62000].into());
    assert!(
        refused(&mut dp, &node, CLIENT_EXT, 43003),
        "three ports, three flows"
    );
    // A reply to a port of the second range is translated; one between the ranges is not ours.
    let run = dp.xdp(node.uplink, &endpoint_seg(62000, SYN | ACK));
    assert_eq!(decode(&run.out).dst, ip(CLIENT_EXT));
    let stray = endpoint_seg(61500, SYN | ACK);
    let run = dp.xdp(node.uplink, &stray);
    assert_eq!((run.verdict, run.out), (XDP_PASS, stray));
}

#[test]
fn new_flows_tell_how_their_endpoint_answers() {
    let node = TestNode::new();
    let mut dp = Datapath::load();
    nodeport_service(&mut dp, EP1);
    let xdp = |dp: &mut Datapath, pkt: Vec<u8>| {
        let run = dp.xdp(node.uplink, &pkt);
        assert_eq!(run.verdict, XDP_TX);
        decode(&run.out)
    };
    // Refused: the endpoint resets the SYN (nothing listens).
    let syn = xdp(&mut dp, client_seg(CLIENT_EXT, 44000, SYN));
    xdp(&mut dp, endpoint_seg(syn.sport, RST | ACK));
    let h = dp.backend_health(1);
    assert_eq!(
        (h.answered, h.failed, h.consecutive, h.last_kind),
        (0, 1, 1, HF_REFUSED)
    );
    // Answered: the count of failures in a row starts again.
    let port = connect(&mut dp, &node, CLIENT_EXT, 44001);
    let h = dp.backend_health(1);
    assert_eq!((h.answered, h.failed, h.consecutive), (1, 1, 0));
    // Later packets of an answered flow, and its end, count for nothing more.
    xdp(&mut dp, endpoint_seg(port, RST | ACK));
    assert_eq!(dp.backend_health(1), h);

    // Unreachable: an ICMP error about a new flow.
    let syn_frame = client_seg(CLIENT_EXT, 44002, SYN);
    let sent = dp.xdp(node.uplink, &syn_frame).out;
    let quoted = sent[14..14 + 28].to_vec();
    let err = from_outside(GW_V4, NODE_V4, icmp_error(3, 1, 0, &quoted), ICMP);
    dp.xdp(node.uplink, &err);
    let h = dp.backend_health(1);
    assert_eq!(
        (h.failed, h.consecutive, h.last_kind),
        (2, 1, HF_UNREACHABLE)
    );

    // No answer: the client resends its SYN a second later. Counted once per flow.
    xdp(&mut dp, client_seg(CLIENT_EXT, 44003, SYN));
    xdp(&mut dp, client_seg(CLIENT_EXT, 44003, SYN));
    assert_eq!(
        dp.backend_health(1).failed,
        2,
        "resent at once: not a timeout yet"
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    xdp(&mut dp, client_seg(CLIENT_EXT, 44003, SYN));
    xdp(&mut dp, client_seg(CLIENT_EXT, 44003, SYN));
    let h = dp.backend_health(1);
    assert_eq!((h.failed, h.consecutive, h.last_kind), (3, 2, HF_TIMEOUT));
}

/// A segment `seg` (checksummed as is) from the outside client to the NodePort: `tot_len`
/// overrides the IPv4 total length.
fn raw_from_outside(seg: Vec<u8>, proto: u8, tot_len: Option<u16>) -> Vec<u8> {
    let mut ip = Ip::new(CLIENT_EXT, NODE_V4, proto);
    ip.tot_len = tot_len;
    frame(GW_MAC, UPLINK_MAC, &ip.wrap(seg, false))
}

#[test]
fn transport_headers_that_contradict_the_ip_header_pass_untouched_and_counted() {
    let (node, mut dp) = with_tcp_service();
    dp.program(&Svc::new(
        2,
        PROTO_UDP,
        &[(FrontendKind::NodePort, NODE_V4, 30053)],
        &[(3, EP1, 53, BackendState::Active)],
    ));
    let tcp = |doff: u8, payload: &[u8]| {
        let mut s = tcp_seg(32000, 30080, 1, 0, SYN, payload);
        s[12] = doff << 4;
        s
    };
    let udp = |len: u16, payload: &[u8]| {
        let mut s = udp_dgram(32001, 30053, payload);
        s[4..6].copy_from_slice(&len.to_be_bytes());
        s
    };
    // (what, frame, counter it must show in)
    let cases = [
        (
            "TCP data offset 4 (under the base header)",
            raw_from_outside(tcp(4, &[]), TCP, None),
            Counter::MalformedTcpHeader,
        ),
        (
            "TCP data offset 15 on a 20-byte segment",
            raw_from_outside(tcp(15, &[]), TCP, None),
            Counter::MalformedTcpHeader,
        ),
        (
            // The frame has 60 bytes of TCP, but the IP header says the datagram ends at 28.
            "TCP header past the IP total length",
            raw_from_outside(tcp(10, &[0; 40]), TCP, Some(20 + 28)),
            Counter::MalformedTcpHeader,
        ),
        (
            "UDP length 0",
            raw_from_outside(udp(0, b"query"), UDP, None),
            Counter::MalformedUdpLength,
        ),
        (
            "UDP length 7",
            raw_from_outside(udp(7, b"query"), UDP, None),
            Counter::MalformedUdpLength,
        ),
        (
            "UDP length longer than the IP payload",
            raw_from_outside(udp(200, b"query"), UDP, None),
            Counter::MalformedUdpLength,
        ),
    ];
    for (what, frame, counter) in cases {
        let before = dp.counter(counter);
        for (hook, run) in [
            ("xdp", dp.xdp(node.uplink, &frame)),
            ("tc", dp.tc_ingress(node.uplink, &frame)),
        ] {
            let pass = if hook == "xdp" { XDP_PASS } else { TC_ACT_OK };
            assert_eq!(run.verdict, pass, "{what} at {hook}");
            assert!(run.out == frame, "{what} at {hook}: rewritten");
        }
        assert_eq!(dp.counter(counter), before + 2, "{what}: counted");
    }
    assert!(dp.ct_entries().is_empty(), "no flow for a malformed packet");
    assert_eq!(dp.counter(Counter::DropMalformed), 0);

    // What is legitimate stays so: a first fragment's UDP length covers the whole datagram.
    let mut first = Ip::new(CLIENT_EXT, NODE_V4, UDP);
    first.frag = Some((0, true));
    let seg = udp(8 + 1000, &[7; 64]);
    let run = dp.xdp(
        node.uplink,
        &frame(GW_MAC, UPLINK_MAC, &first.wrap(seg, true)),
    );
    assert_eq!(run.verdict, XDP_TX, "a first fragment is translated");
    // IPv4 BIG TCP: total length 0 on an skb (the length is the skb's), at TC.
    let big = raw_from_outside(tcp(5, &[0; 100]), TCP, Some(0));
    let run = dp.tc_ingress(node.uplink, &big);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "BIG TCP is translated at TC");
    assert!(
        [[203, 0, 113, 7], [203, 0, 113, 8]].contains(&run.out[30..34].try_into().unwrap()),
        "to an endpoint: {:?}",
        &run.out[30..34]
    );
    assert_eq!(&run.out[16..18], &[0, 0], "total length left 0");
}

// ------------------------------------------------------------------------------------------------
// Cluster egress: the tunnel between nodes, Maglev
// ------------------------------------------------------------------------------------------------

const CLUSTER_EGRESS_IP: &str = "10.0.0.50";
const OWNER: &str = "10.0.0.2";
const ORIGIN: &str = "10.0.0.3";

/// Service 7: ClusterIP 10.96.0.70:80 to EP1 and EP2 :8080, egress through the cluster egress
/// address.
fn cluster_egress_service(dp: &mut Datapath) {
    let mut svc = Svc::new(
        7,
        PROTO_TCP,
        &[(FrontendKind::ClusterIp, "10.96.0.70", 80)],
        &[
            (70, EP1, 8080, BackendState::Active),
            (71, EP2, 8080, BackendState::Active),
        ],
    );
    svc.egress = CLUSTER_EGRESS_IP;
    svc.cluster_egress = true;
    dp.program(&svc);
}

/// The packet inside a tunnelled frame, as a frame of its own (to decode it).
fn inner(tunnelled: &Decoded) -> Vec<u8> {
    assert_eq!(
        (tunnelled.proto, tunnelled.dport),
        (UDP, 6080),
        "a tunnel packet"
    );
    frame(GW_MAC, UPLINK_MAC, &tunnelled.l4[8..])
}

fn tunnel_config() -> Config {
    Config {
        tunnel_src_v4: u32::from_ne_bytes([10, 0, 0, 1]),
        ..Config::DEFAULT
    }
}

#[test]
fn other_nodes_send_cluster_egress_flows_to_the_owner_untranslated() {
    let node = TestNode::new();
    sh("ip neigh replace 10.0.0.2 lladdr 02:00:00:00:00:02 dev up0 nud permanent");
    let mut dp = Datapath::load_with(tunnel_config());
    cluster_egress_service(&mut dp);
    dp.set_cluster_egress(CLUSTER_EGRESS_IP, Some(OWNER), false);
    // A pod's SYN to the ClusterIP, leaving by the uplink (MSS 1460 as from a 1500-byte link).
    let opts = [2, 4, 0x05, 0xb4];
    let syn = outbound(
        POD_V4,
        "10.96.0.70",
        tcp_seg_opts(41000, 80, 1, 0, SYN, &opts, &[]),
        TCP,
    );
    let run = dp.tc_egress(node.uplink, &syn);
    assert_eq!(run.verdict, TC_ACT_OK, "leaves by the uplink it is on");
    let outer = decode(&run.out);
    assert_eq!(
        (outer.src, outer.dst, outer.dmac),
        (ip(NODE_V4), ip(OWNER), [2, 0, 0, 0, 0, 2])
    );
    let inside = decode(&inner(&outer));
    assert_eq!(
        (inside.src, inside.sport, inside.dst, inside.dport),
        (ip(POD_V4), 41000, ip("10.96.0.70"), 80),
        "untranslated: the owner serves the flow"
    );
    // The MSS leaves room for the tunnel's 28 bytes.
    assert_eq!(&inside.l4[20..24], &[2, 4, 0x05, 0x98], "MSS 1432");
    assert!(dp.ct_entries().is_empty(), "no state on the sending node");
    assert_eq!(dp.counter(Counter::TunnelSent), 1);
    assert_eq!(dp.counter(Counter::TunnelMssClamped), 1);

    // Nobody owns the address: refused.
    dp.set_cluster_egress(CLUSTER_EGRESS_IP, None, false);
    let run = dp.tc_egress(node.uplink, &syn);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(decode(&run.out).tcp_flags & RST, RST);
}

/// A frame from `peer` through the tunnel carrying `inner_ip` (an IP packet).
fn tunnelled_from(peer: &str, inner_ip: &[u8]) -> Vec<u8> {
    let mut udp = udp_dgram(0xc123, 6080, inner_ip);
    // Zero checksum: allowed over IPv4, and what the data path sends.
    udp[6] = 0;
    udp[7] = 0;
    frame(
        GW_MAC,
        UPLINK_MAC,
        &Ip::new(peer, NODE_V4, UDP).wrap(udp, true),
    )
}

#[test]
fn the_owner_serves_tunnelled_flows_and_sends_replies_back_through_the_tunnel() {
    let node = TestNode::new();
    sh("ip neigh replace 10.0.0.3 lladdr 02:00:00:00:00:03 dev up0 nud permanent");
    let mut dp = Datapath::load_with(tunnel_config());
    cluster_egress_service(&mut dp);
    dp.set_cluster_egress(CLUSTER_EGRESS_IP, Some(NODE_V4), true);
    let client = "10.244.7.9";
    let syn_ip = Ip::new(client, "10.96.0.70", TCP).wrap(tcp_seg(42000, 80, 1, 0, SYN, &[]), false);

    // From a node that is not a peer: dropped, counted.
    let run = dp.tc_ingress(node.uplink, &tunnelled_from("10.0.0.9", &syn_ip));
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropTunnelUnknownPeer), 1);

    dp.add_tunnel_peer(ORIGIN);
    let run = dp.tc_ingress(node.uplink, &tunnelled_from(ORIGIN, &syn_ip));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let out = decode(&run.out);
    assert_eq!(
        out.src,
        ip(CLUSTER_EGRESS_IP),
        "SNAT to the cluster egress address"
    );
    assert!([ip(EP1), ip(EP2)].contains(&out.dst));
    assert_eq!(dp.counter(Counter::TunnelReceived), 1);
    let (_, ct) = dp
        .ct_entries()
        .into_iter()
        .find(|(k, _)| k.src == addr(client))
        .unwrap();
    assert_eq!(ct.tunnel_peer, addr(ORIGIN));

    // The endpoint's answer goes back to the client's node through the tunnel, translated.
    let synack = from_outside(
        &out.dst.to_string(),
        CLUSTER_EGRESS_IP,
        tcp_seg(8080, out.sport, 9, 2, SYN | ACK, &[]),
        TCP,
    );
    let run = dp.tc_ingress(node.uplink, &synack);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let outer = decode(&run.out);
    assert_eq!((outer.src, outer.dst), (ip(NODE_V4), ip(ORIGIN)));
    let back = decode(&inner(&outer));
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip("10.96.0.70"), 80, ip(client), 42000)
    );

    // A packet to one of the address's SNAT ports that matches no flow is not for the stack.
    let stray = from_outside(
        EP1,
        CLUSTER_EGRESS_IP,
        tcp_seg(
            8080,
            if out.sport == 1024 { 1025 } else { 1024 },
            9,
            2,
            ACK,
            &[],
        ),
        TCP,
    );
    let run = dp.tc_ingress(node.uplink, &stray);
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropClusterEgressUnmatched), 1);
}

#[test]
fn every_node_sends_a_flow_to_the_same_endpoint() {
    // Two nodes with different backend ids for the same endpoints: their Maglev tables come
    // from the endpoints' identities, so a flow lands on the same endpoint on either.
    let node = TestNode::new();
    let endpoints = ["203.0.113.7", "203.0.113.8", "203.0.113.9", "203.0.113.10"];
    let program = |dp: &mut Datapath, first_id: u32| {
        let backends: Vec<(u32, &str, u16, BackendState)> = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (first_id + i as u32, *e, 8080, BackendState::Active))
            .collect();
        let mut svc = Svc::new(
            7,
            PROTO_TCP,
            &[(FrontendKind::ClusterIp, "10.96.0.70", 80)],
            &backends,
        );
        svc.egress = CLUSTER_EGRESS_IP;
        svc.cluster_egress = true;
        dp.program(&svc);
        dp.set_cluster_egress(CLUSTER_EGRESS_IP, Some(NODE_V4), true);
    };
    let mut a = Datapath::load_with(tunnel_config());
    program(&mut a, 10);
    let mut b = Datapath::load_with(tunnel_config());
    program(&mut b, 100);
    let mut per_endpoint = std::collections::BTreeMap::new();
    for sport in 20000..20400 {
        let syn = outbound(
            POD_V4,
            "10.96.0.70",
            tcp_seg(sport, 80, 1, 0, SYN, &[]),
            TCP,
        );
        let ea = decode(&a.tc_egress(node.uplink, &syn).out).dst;
        let eb = decode(&b.tc_egress(node.uplink, &syn).out).dst;
        assert_eq!(ea, eb, "flow from port {sport}");
        *per_endpoint.entry(ea).or_insert(0) += 1;
    }
    assert_eq!(per_endpoint.len(), 4, "{per_endpoint:?}");
    assert!(per_endpoint.values().all(|n| *n > 60), "{per_endpoint:?}");
}

/// The endpoint EP1:8080 of service 7 (backend 70) as a frontend of its own, as the agent writes
/// it for a Service with a cluster egress address.
fn direct_endpoint(dp: &mut Datapath) {
    dp.put_frontend(
        FrontendKey {
            addr: addr(EP1),
            port: 8080u16.to_be(),
            proto: PROTO_TCP,
            pad: 0,
        },
        FrontendValue::endpoint(7, 70).unwrap(),
    );
}

fn pod_syn_to(dst: &str, dport: u16, sport: u16) -> Vec<u8> {
    frame(
        POD_MAC,
        [0x02, 0, 0, 0, 0x01, 0x01],
        &Ip::new(POD_V4, dst, TCP).wrap(tcp_seg(sport, dport, 1, 0, SYN, &[]), false),
    )
}

#[test]
fn pods_bypassing_the_cluster_ip_leave_from_the_cluster_egress_address_too() {
    let node = TestNode::new();
    sh("ip neigh replace 10.0.0.2 lladdr 02:00:00:00:00:02 dev up0 nud permanent");
    sh("ip neigh replace 10.0.0.3 lladdr 02:00:00:00:00:03 dev up0 nud permanent");

    // A node that does not own the address: the pod's SYN to the endpoint goes to the owner,
    // untranslated.
    let mut origin = Datapath::load_with(tunnel_config());
    cluster_egress_service(&mut origin);
    direct_endpoint(&mut origin);
    origin.set_cluster_egress(CLUSTER_EGRESS_IP, Some(OWNER), false);
    let syn = pod_syn_to(EP1, 8080, 43000);
    let run = origin.tc_pod(node.pod_if, &syn);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let outer = decode(&run.out);
    assert_eq!((outer.src, outer.dst), (ip(NODE_V4), ip(OWNER)));
    let inside = decode(&inner(&outer));
    assert_eq!(
        (inside.src, inside.sport, inside.dst, inside.dport),
        (ip(POD_V4), 43000, ip(EP1), 8080)
    );
    // Only pods' packets: a host process, or a packet from outside, to the endpoint is not ours
    // (the owner's own translated packets leave through the same hooks).
    let host = outbound(NODE_V4, EP1, tcp_seg(43001, 8080, 1, 0, SYN, &[]), TCP);
    let run = origin.tc_egress(node.uplink, &host);
    assert_eq!((run.verdict, run.out == host), (TC_ACT_OK, true));
    let outside = from_outside(CLIENT_EXT, EP1, tcp_seg(43002, 8080, 1, 0, SYN, &[]), TCP);
    let run = origin.xdp(node.uplink, &outside);
    assert_eq!((run.verdict, run.out == outside), (XDP_PASS, true));
    // Another endpoint of the Service, not written as a frontend, is not ours either.
    let other = pod_syn_to(EP2, 8080, 43003);
    let run = origin.tc_pod(node.pod_if, &other);
    assert_eq!((run.verdict, run.out == other), (TC_ACT_OK, true));

    // The owner serves it: the endpoint the pod chose, from the cluster egress address.
    let mut owner = Datapath::load_with(tunnel_config());
    cluster_egress_service(&mut owner);
    direct_endpoint(&mut owner);
    owner.set_cluster_egress(CLUSTER_EGRESS_IP, Some(NODE_V4), true);
    owner.add_tunnel_peer(ORIGIN);
    let pod_ip = Ip::new(POD_V4, EP1, TCP).wrap(tcp_seg(43000, 8080, 1, 0, SYN, &[]), false);
    let run = owner.tc_ingress(node.uplink, &tunnelled_from(ORIGIN, &pod_ip));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let out = decode(&run.out);
    assert_eq!(
        (out.src, out.dst, out.dport),
        (ip(CLUSTER_EGRESS_IP), ip(EP1), 8080),
        "SNAT only, to the cluster egress address"
    );
    let (_, ct) = owner
        .ct_entries()
        .into_iter()
        .find(|(k, _)| k.src == addr(POD_V4))
        .unwrap();
    assert_eq!((ct.backend_id, ct.tunnel_peer), (70, addr(ORIGIN)));
    // The answer goes back to the pod's node, from the endpoint's own address.
    let synack = from_outside(
        EP1,
        CLUSTER_EGRESS_IP,
        tcp_seg(8080, out.sport, 9, 2, SYN | ACK, &[]),
        TCP,
    );
    let run = owner.tc_ingress(node.uplink, &synack);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let outer = decode(&run.out);
    assert_eq!(outer.dst, ip(ORIGIN));
    let back = decode(&inner(&outer));
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(EP1), 8080, ip(POD_V4), 43000)
    );

    // A pod on the owner itself: translated there and then.
    let run = owner.tc_pod(node.pod_if, &pod_syn_to(EP1, 8080, 43010));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let d = decode(&run.out);
    assert_eq!(
        (d.src, d.dst, d.dport),
        (ip(CLUSTER_EGRESS_IP), ip(EP1), 8080)
    );
}

/// A client outside calls the NodePort of a node that does not own the address: that node's
/// address is no frontend on the owner, whose own NodePort of the same number stands for it.
#[test]
fn the_owner_serves_another_nodes_node_port() {
    let node = TestNode::new();
    sh("ip neigh replace 10.0.0.3 lladdr 02:00:00:00:00:03 dev up0 nud permanent");
    let mut dp = Datapath::load_with(Config {
        tunnel_src_v4: u32::from_ne_bytes(addr(NODE_V4).words[3].to_ne_bytes()),
        ..Config::DEFAULT
    });
    let mut svc = Svc::new(
        7,
        PROTO_TCP,
        &[(FrontendKind::NodePort, NODE_V4, 30070)],
        &[(70, EP1, 8080, BackendState::Active)],
    );
    svc.egress = CLUSTER_EGRESS_IP;
    svc.cluster_egress = true;
    dp.program(&svc);
    dp.set_cluster_egress(CLUSTER_EGRESS_IP, Some(NODE_V4), true);
    dp.add_tunnel_peer(ORIGIN);
    let to_origin = |dport: u16| {
        Ip::new(CLIENT_EXT, ORIGIN, TCP).wrap(tcp_seg(44000, dport, 1, 0, SYN, &[]), false)
    };
    let run = dp.tc_ingress(node.uplink, &tunnelled_from(ORIGIN, &to_origin(30070)));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let out = decode(&run.out);
    assert_eq!(
        (out.src, out.dst, out.dport),
        (ip(CLUSTER_EGRESS_IP), ip(EP1), 8080)
    );
    // The answer leaves through the tunnel from the origin's NodePort address.
    let synack = from_outside(
        EP1,
        CLUSTER_EGRESS_IP,
        tcp_seg(8080, out.sport, 9, 2, SYN | ACK, &[]),
        TCP,
    );
    let back = decode(&inner(&decode(&dp.tc_ingress(node.uplink, &synack).out)));
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(ORIGIN), 30070, ip(CLIENT_EXT), 44000)
    );
    // Another port of the origin's address is no frontend here: not relayed anywhere.
    let run = dp.tc_ingress(node.uplink, &tunnelled_from(ORIGIN, &to_origin(30071)));
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropTunnelNotOurs), 1);
    assert_eq!(dp.ct_entries().len(), 1);
}
