//! Rejecting instead of black-holing, as kube-proxy does for Services without endpoints: TCP gets
//! a RST, UDP an ICMP port unreachable. The packet is turned into its own answer in place, so no
//! buffer is allocated and the reply leaves by the way the packet came.

use proxy_common::{Addr, PROTO_TCP};

use crate::{
    csum,
    ctx::{Ctx, load, ptr_at, store},
    hdr::{IcmpHdr, Ipv4Hdr, Ipv6Hdr, TcpHdr, get},
    parse::{
        ETH_HLEN, ICMP_HLEN, IPV4_HLEN, IPV6_HLEN, PROTO_ICMP, PROTO_ICMPV6, Pkt, TCP_ACK, TCP_FIN,
        TCP_HLEN, TCP_RST, TCP_SYN, UDP_HLEN,
    },
};

const ETH_P_IP_RAW: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_RAW: u16 = 0x86ddu16.to_be();
const TTL: u8 = 64;
/// Quoting more than this much of an IPv6 header chain is not worth the bounds: such packets
/// are dropped (`reject_failed`) instead.
const MAX_QUOTED_V6_HEADERS: usize = 104;

#[inline(always)]
fn words<T, const N: usize>(v: &T) -> &[u32; N] {
    const { assert!(core::mem::size_of::<T>() == N * 4) };
    unsafe { &*(v as *const T as *const [u32; N]) }
}

/// Pseudo-header sum for a transport checksum.
#[inline(always)]
fn pseudo_sum(v6: bool, src: &Addr, dst: &Addr, proto: u8, len: u16) -> u32 {
    if v6 {
        let s = csum::add(csum::sum_words(&src.words), csum::sum_words(&dst.words));
        let s = csum::add(s, (len as u32).to_be());
        csum::add(s, u32::from_ne_bytes([0, 0, 0, proto]))
    } else {
        let s = csum::add(src.words[3], dst.words[3]);
        let l = len.to_be_bytes();
        csum::add(s, u32::from_ne_bytes([0, proto, l[0], l[1]]))
    }
}

/// Writes the new IP header at ETH_HLEN: from `src` to `dst`, carrying `payload` bytes of `proto`.
#[inline(always)]
fn write_ip<C: Ctx>(
    ctx: &C,
    v6: bool,
    src: &Addr,
    dst: &Addr,
    proto: u8,
    payload: u16,
) -> Result<(), ()> {
    if v6 {
        let ip = Ipv6Hdr {
            vtcfl: u32::from_ne_bytes([0x60, 0, 0, 0]),
            payload_len: payload.to_be(),
            next: proto,
            hop_limit: TTL,
            src: src.words,
            dst: dst.words,
        };
        store(ctx, ETH_HLEN, ip)
    } else {
        let mut ip = Ipv4Hdr {
            vihl: 0x45,
            tos: 0,
            tot_len: (IPV4_HLEN as u16 + payload).to_be(),
            id: 0,
            frag: 0x4000u16.to_be(),
            ttl: TTL,
            proto,
            csum: 0,
            src: src.words[3],
            dst: dst.words[3],
        };
        ip.csum = !csum::fold(csum::sum_words(words::<_, 5>(&ip)));
        store(ctx, ETH_HLEN, ip)
    }
}

/// Swaps the Ethernet addresses: the reply goes back to where the packet came from.
#[inline(always)]
fn swap_macs<C: Ctx>(ctx: &C, macs: &[u8; 12]) -> Result<(), ()> {
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    store(ctx, 0, swapped)
}

/// Turns a TCP segment from client to frontend into the frontend's RST (RFC 9293 3.10.7.1).
#[inline(always)]
pub fn tcp_reset<C: Ctx>(ctx: &C, pkt: &Pkt) -> Result<(), ()> {
    let macs: [u8; 12] = load(ctx, 0).ok_or(())?;
    let orig = ptr_at::<C, TcpHdr>(ctx, pkt.l4_off).ok_or(())?;
    let seq = get!(orig, seq);
    let ack = get!(orig, ack);
    let doff = (get!(orig, doff) >> 4) as u32 * 4;
    let l3_hdr = (pkt.l4_off - ETH_HLEN) as u32;
    let payload = pkt.l3_len.saturating_sub(l3_hdr + doff);
    let (rst_seq, rst_ack, flags) = if pkt.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let mut len = payload;
        if pkt.tcp_flags & TCP_SYN != 0 {
            len += 1;
        }
        if pkt.tcp_flags & TCP_FIN != 0 {
            len += 1;
        }
        (
            0,
            u32::from_be(seq).wrapping_add(len).to_be(),
            TCP_RST | TCP_ACK,
        )
    };
    let ip_len = if pkt.v6 { IPV6_HLEN } else { IPV4_HLEN };
    let new_len = (ETH_HLEN + ip_len + TCP_HLEN) as u32;
    if ctx.len() > new_len {
        ctx.truncate(new_len)?;
    }
    swap_macs(ctx, &macs)?;
    write_ip(
        ctx,
        pkt.v6,
        &pkt.tuple.dst,
        &pkt.tuple.src,
        PROTO_TCP,
        TCP_HLEN as u16,
    )?;
    let mut tcp = TcpHdr {
        sport: pkt.tuple.dport,
        dport: pkt.tuple.sport,
        seq: rst_seq,
        ack: rst_ack,
        doff: (5 << 4) as u8,
        flags,
        window: 0,
        csum: 0,
        urg: 0,
    };
    let sum = csum::add(
        pseudo_sum(
            pkt.v6,
            &pkt.tuple.dst,
            &pkt.tuple.src,
            PROTO_TCP,
            TCP_HLEN as u16,
        ),
        csum::sum_words(words::<_, 5>(&tcp)),
    );
    tcp.csum = !csum::fold(sum);
    store(ctx, ETH_HLEN + ip_len, tcp)
}

/// Longest quote: an IPv6 header chain of MAX_QUOTED_V6_HEADERS plus 8 bytes, in 32-bit words.
const MAX_QUOTE_WORDS: usize = (MAX_QUOTED_V6_HEADERS + UDP_HLEN) / 4;

/// Sum of the quoted packet, word by word: its length varies, and a helper taking a
/// variable-length packet range would need the longest range to be in bounds.
#[inline(always)]
fn sum_quote<C: Ctx>(ctx: &C, off: usize, len: usize) -> Option<u32> {
    let mut sum = 0u32;
    for i in 0..MAX_QUOTE_WORDS {
        if i * 4 >= len {
            break;
        }
        sum = csum::add(sum, load::<C, u32>(ctx, off + i * 4)?);
    }
    Some(sum)
}

/// Turns a UDP datagram from client to frontend into an ICMP port unreachable quoting it.
#[inline(always)]
pub fn icmp_unreachable<C: Ctx>(ctx: &C, pkt: &Pkt) -> Result<(), ()> {
    let macs: [u8; 12] = load(ctx, 0).ok_or(())?;
    let quoted_hdrs = pkt.l4_off - ETH_HLEN;
    if pkt.v6 && quoted_hdrs > MAX_QUOTED_V6_HEADERS {
        return Err(());
    }
    // The original IP header (options and extension headers included) and 8 bytes of UDP.
    let quoted = (quoted_hdrs & 0xff) + UDP_HLEN;
    let ip_len = if pkt.v6 { IPV6_HLEN } else { IPV4_HLEN };
    let grow = (ip_len + ICMP_HLEN) as u32;
    ctx.make_room_before_ip(grow)?;
    // The new headers go between the Ethernet header and the quoted packet.
    let quote_off = ETH_HLEN + ip_len + ICMP_HLEN;
    let new_len = (quote_off + quoted) as u32;
    if ctx.len() > new_len {
        ctx.truncate(new_len)?;
    }
    swap_macs(ctx, &macs)?;
    store(ctx, 12, if pkt.v6 { ETH_P_IPV6_RAW } else { ETH_P_IP_RAW })?;
    let (proto, ty, code) = if pkt.v6 {
        (PROTO_ICMPV6, 1u8, 4u8)
    } else {
        (PROTO_ICMP, 3u8, 3u8)
    };
    let icmp_len = (ICMP_HLEN + quoted) as u16;
    write_ip(ctx, pkt.v6, &pkt.tuple.dst, &pkt.tuple.src, proto, icmp_len)?;
    let mut icmp = IcmpHdr {
        ty,
        code,
        csum: 0,
        unused: 0,
    };
    let quote_sum = sum_quote(ctx, quote_off, quoted).ok_or(())?;
    let mut sum = csum::add(quote_sum, csum::sum_words(words::<_, 2>(&icmp)));
    if pkt.v6 {
        sum = csum::add(
            sum,
            pseudo_sum(true, &pkt.tuple.dst, &pkt.tuple.src, PROTO_ICMPV6, icmp_len),
        );
    }
    icmp.csum = !csum::fold(sum);
    store(ctx, ETH_HLEN + ip_len, icmp)
}
