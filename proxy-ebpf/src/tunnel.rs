//! The tunnel between nodes for cluster egress addresses (see DESIGN.md, "Cluster egress").
//!
//! GUE variant 1: the IP packet right after a UDP header (no GUE header; the first nibble of the
//! payload tells IPv4 from IPv6), to port [`TUNNEL_PORT`], in an IPv4 packet between the nodes'
//! addresses. UDP because clouds and firewalls pass it where they drop IP-in-IP (protocol 4) or
//! GRE, and its source port carries the flow's hash for ECMP and RSS; no kernel tunnel device
//! (no IPIP, FOU or GENEVE module needed): the TC programs add and strip the 28 bytes with
//! `bpf_skb_adjust_room`, which also marks GSO packets so the kernel segments them as UDP
//! tunnel packets.

use aya_ebpf::bindings::{
    BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
    BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
};
use proxy_common::{Addr, Config, Counter, PROTO_UDP, TUNNEL_OVERHEAD_V4, TUNNEL_PORT};

use crate::{
    csum,
    ctx::{Ctx, load, ptr_at, store},
    fwd::{FibParams, Route, route},
    hdr::{Ipv4Hdr, UdpHdr},
    parse::{ETH_HLEN, IPV4_HLEN, Pkt, TCP_HLEN, TCP_SYN},
    stats::count,
};

const ETH_P_IP_RAW: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_RAW: u16 = 0x86ddu16.to_be();
const UDP_HLEN: usize = 8;
/// The MSS option first among a SYN's options, as every common stack sends it: kind 2, length 4.
const MSS_OPTION: u16 = u16::from_ne_bytes([2, 4]);

/// Whether the parsed packet is a tunnelled one (UDP to the tunnel port, over IPv4).
#[inline(always)]
pub fn is_tunnel(pkt: &Pkt) -> bool {
    !pkt.v6
        && pkt.tuple.proto == PROTO_UDP
        && pkt.tuple.dport == TUNNEL_PORT.to_be()
        && pkt.has_l4()
}

/// Strips the outer IPv4 and UDP headers of the tunnelled packet `pkt` (TC only).
#[inline(always)]
pub fn decap<C: Ctx>(ctx: &C, pkt: &Pkt) -> Result<(), Counter> {
    // The outer header has no options (we send none): the inner packet starts 28 bytes in.
    if pkt.l4_off != ETH_HLEN + IPV4_HLEN {
        return Err(Counter::DropTunnelMalformed);
    }
    let first = load::<C, u8>(ctx, ETH_HLEN + TUNNEL_OVERHEAD_V4 as usize)
        .ok_or(Counter::DropTunnelMalformed)?;
    let v6 = match first >> 4 {
        4 => false,
        6 => true,
        _ => return Err(Counter::DropTunnelMalformed),
    };
    let flags = if v6 {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6
    } else {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4
    };
    ctx.adjust_room(-(TUNNEL_OVERHEAD_V4 as i32), flags as u64)
        .map_err(|()| Counter::DropTunnelFailed)?;
    store(ctx, 12, if v6 { ETH_P_IPV6_RAW } else { ETH_P_IP_RAW })
        .map_err(|()| Counter::DropTunnelFailed)
}

/// Wraps the packet in the tunnel toward `peer` (an IPv4 node address) and routes it: the route
/// to the peer is in `fib` afterwards. `entropy`: the flow's hash, for the outer source port.
#[inline(always)]
pub fn encap<C: Ctx>(
    ctx: &C,
    cfg: &Config,
    fib: &mut FibParams,
    peer: &Addr,
    entropy: u32,
) -> Result<Route, Counter> {
    let src = Addr::from_v4_raw(cfg.tunnel_src_v4);
    let r = route(ctx, fib, false, &src, peer);
    if !matches!(r, Route::Out | Route::NoNeigh) {
        return Err(Counter::DropNoRoute);
    }
    ctx.adjust_room(
        TUNNEL_OVERHEAD_V4 as i32,
        (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP) as u64,
    )
    .map_err(|()| Counter::DropTunnelFailed)?;
    let total = ctx.len().saturating_sub(ETH_HLEN as u32);
    // Over 64 KB only as a GSO packet, which the kernel segments and sizes itself.
    let tot_len = if total > 0xffff { 0 } else { total as u16 };
    let mut ip = Ipv4Hdr {
        vihl: 0x45,
        tos: 0,
        tot_len: tot_len.to_be(),
        id: 0,
        frag: 0x4000u16.to_be(),
        ttl: 64,
        proto: PROTO_UDP,
        csum: 0,
        src: cfg.tunnel_src_v4,
        dst: peer.v4_raw(),
    };
    ip.csum = !csum::fold(csum::sum_words(header_words(&ip)));
    let udp = UdpHdr {
        // An ephemeral-range port from the flow's hash: ECMP and RSS spread flows, and every
        // packet of one flow takes the same way.
        sport: (0xc000 | (entropy as u16 & 0x3fff)).to_be(),
        dport: TUNNEL_PORT.to_be(),
        len: ((tot_len as u32).saturating_sub(IPV4_HLEN as u32) as u16).to_be(),
        // Zero over IPv4: the inner packet carries its own checksums.
        csum: 0,
    };
    let fail = |()| Counter::DropTunnelFailed;
    store(ctx, ETH_HLEN, ip).map_err(fail)?;
    store(ctx, ETH_HLEN + IPV4_HLEN, udp).map_err(fail)?;
    store(ctx, 12, ETH_P_IP_RAW).map_err(fail)?;
    if r == Route::Out {
        store(ctx, 0, fib.dmac).map_err(fail)?;
        store(ctx, 6, fib.smac).map_err(fail)?;
    }
    count(Counter::TunnelSent);
    Ok(r)
}

#[inline(always)]
fn header_words(ip: &Ipv4Hdr) -> &[u32; 5] {
    unsafe { &*(ip as *const Ipv4Hdr as *const [u32; 5]) }
}

/// Lowers the MSS a SYN (or SYN-ACK) `pkt` announces to what fits the tunnel, if it is higher:
/// the endpoint then never sends the client segments the tunnel would have to fragment.
#[inline(always)]
pub fn clamp_mss<C: Ctx>(ctx: &C, cfg: &Config, pkt: &Pkt) {
    if pkt.tcp_flags & TCP_SYN == 0 || (pkt.tcp_hlen as usize) < TCP_HLEN + 4 {
        return;
    }
    let max = if pkt.v6 {
        cfg.tunnel_mss_v6
    } else {
        cfg.tunnel_mss_v4
    };
    let off = pkt.l4_off + TCP_HLEN;
    // One bounds check, then constant offsets from the pointer (see tcpts::find).
    let Some(opt) = ptr_at::<C, [u16; 2]>(ctx, off) else {
        return;
    };
    let opt = opt as *mut u16;
    let (kind_len, mss_raw) = unsafe {
        (
            core::ptr::read_unaligned(opt),
            core::ptr::read_unaligned(opt.add(1)),
        )
    };
    if kind_len != MSS_OPTION || u16::from_be(mss_raw) <= max {
        return;
    }
    let new = max.to_be();
    unsafe { core::ptr::write_unaligned(opt.add(1), new) };
    let _ = ctx.csum_l4(pkt.l4_off + 16, csum::diff16(mss_raw, new), false, false);
    count(Counter::TunnelMssClamped);
}

const _: () = assert!(TUNNEL_OVERHEAD_V4 as usize == IPV4_HLEN + UDP_HLEN);
