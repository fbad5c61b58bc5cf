//! Header parsing: Ethernet, IPv4 (with options), IPv6 (with extension headers), TCP, UDP and
//! ICMP errors. Parsing never writes; what it cannot read it reports, and the caller passes such
//! packets on untouched.

use proxy_common::{Addr, CtKey, PROTO_TCP, PROTO_UDP};

use crate::{
    ctx::{Ctx, Hook, load, ptr_at},
    hdr::{IcmpHdr, Ipv4Hdr, Ipv6Ext, Ipv6Hdr, TcpHdr, UdpHdr, get},
};

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// EtherTypes as they are on the wire, loaded raw.
const ETH_P_IP_RAW: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_RAW: u16 = 0x86ddu16.to_be();

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers walked before the transport header; longer chains are not parsed.
const IPV6_MAX_EXT: usize = 4;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Bytes a TC program makes linear when the headers it reads are not ([`headers_linear`]): the
/// deepest are an ICMP error's inner IP and transport headers behind an outer IPv6 header with
/// extensions.
pub const PULL_LEN: u32 = 192;

/// IPv4 header length in bytes, from its version and IHL byte.
#[inline(always)]
fn ipv4_hlen(vihl: u8) -> usize {
    ((vihl & 0x0f) as usize) << 2
}

/// TCP header length in bytes (data offset x 4), from its data offset byte.
#[inline(always)]
fn tcp_hlen(doff: u8) -> u8 {
    (doff >> 4) << 2
}

/// A later IPv4 fragment (its fragment offset, in the host-order flags and offset field, not 0):
/// it has no transport header.
#[inline(always)]
fn ipv4_later_fragment(frag_field: u16) -> bool {
    frag_field & 0x1fff != 0
}

#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    None,
    /// First fragment: carries the transport header.
    First,
    /// Later fragment: no transport header; ports come from FRAGS.
    Later,
}

/// What the data path needs to know about a packet.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pkt {
    /// Addresses, ports (net order; zero until known for later fragments) and protocol, laid
    /// out as the conntrack key of a client's flow: the data path looks flows up with it as is.
    pub tuple: CtKey,
    pub v6: bool,
    /// Offset of the transport header (IPv4 options and IPv6 extension headers skipped).
    pub l4_off: usize,
    pub tcp_flags: u8,
    /// TCP header length in bytes (data offset x 4); 0 for other protocols.
    pub tcp_hlen: u8,
    /// IP datagram length from the IP header (IPv4 total length, IPv6 40 + payload length).
    pub l3_len: u32,
    pub frag: Frag,
    /// Fragment identification (IPv4: 16 bits; IPv6: 32 bits), raw.
    pub frag_id: u32,
    /// The IP header claims more bytes than the frame has, or fewer than its own headers.
    pub bad_len: bool,
    /// ICMP or ICMPv6 error message (destination unreachable, packet too big, time exceeded,
    /// parameter problem): its payload quotes a packet we may have translated.
    pub icmp_error: bool,
}

impl Pkt {
    #[inline(always)]
    pub fn has_l4(&self) -> bool {
        self.frag != Frag::Later
    }
}

pub enum Parsed {
    /// `Pkt` filled in: TCP, UDP or an ICMP error.
    Pkt,
    /// Not IP, or an IP protocol the data path does not handle: not ours.
    Other,
    /// IP, but the transport header could not be found.
    Unparsed,
    /// A transport header that contradicts the IP header (the counter says how): passed on
    /// untouched, never translated.
    Malformed(proxy_common::Counter),
}

/// Whether the headers the data path reads are in the linear data already, judged from the few
/// fields that say where they end: an IPv4 header (options included) or a bare IPv6 header, then
/// TCP's data offset (its options are read) or UDP's fixed header. ICMP (an error's quote is
/// read) and IPv6 extension headers are answered no, and pulled; protocols the data path does
/// not read are answered yes.
#[inline(always)]
pub fn headers_linear<C: Ctx>(ctx: &C) -> bool {
    let linear = ctx.data_end() - ctx.data();
    let len = ctx.len() as usize;
    if linear >= len || linear >= PULL_LEN as usize {
        return true;
    }
    let Some(eth_type) = load::<C, u16>(ctx, 12) else {
        return false;
    };
    let (l4_off, proto) = if eth_type == ETH_P_IP_RAW {
        let Some(ip) = ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN) else {
            return false;
        };
        // A later fragment's IP header is all that is read of it.
        if ipv4_later_fragment(u16::from_be(get!(ip, frag))) {
            return true;
        }
        (ETH_HLEN + ipv4_hlen(get!(ip, vihl)), get!(ip, proto))
    } else if eth_type == ETH_P_IPV6_RAW {
        let Some(ip) = ptr_at::<C, Ipv6Hdr>(ctx, ETH_HLEN) else {
            return false;
        };
        (ETH_HLEN + IPV6_HLEN, get!(ip, next))
    } else {
        return true;
    };
    match proto {
        PROTO_TCP => match ptr_at::<C, TcpHdr>(ctx, l4_off) {
            Some(tcp) => l4_off + tcp_hlen(get!(tcp, doff)) as usize <= linear,
            None => false,
        },
        PROTO_UDP => l4_off + UDP_HLEN <= linear,
        PROTO_ICMP | PROTO_ICMPV6 => false,
        next => !is_ipv6_ext(next),
    }
}

/// Parses the packet at the start of `ctx` into `pkt`.
#[inline(always)]
pub fn parse<C: Ctx>(ctx: &C, pkt: &mut Pkt) -> Parsed {
    let Some(eth_type) = load::<C, u16>(ctx, 12) else {
        return Parsed::Other;
    };
    if eth_type == ETH_P_IP_RAW {
        parse_v4(ctx, pkt)
    } else if eth_type == ETH_P_IPV6_RAW {
        parse_v6(ctx, pkt)
    } else {
        Parsed::Other
    }
}

#[inline(always)]
fn parse_v4<C: Ctx>(ctx: &C, out: &mut Pkt) -> Parsed {
    let Some(ip) = ptr_at::<C, Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Parsed::Unparsed;
    };
    let vihl = get!(ip, vihl);
    let ihl = ipv4_hlen(vihl);
    if vihl >> 4 != 4 || ihl < IPV4_HLEN {
        return Parsed::Unparsed;
    }
    let mut tot_len = u16::from_be(get!(ip, tot_len)) as u32;
    // IPv4 BIG TCP: an skb over 64 KB carries total length 0 (never seen on a wire, so not at
    // XDP); its length is the skb's.
    if tot_len == 0 && C::HOOK != Hook::Xdp {
        tot_len = ctx.len().saturating_sub(ETH_HLEN as u32);
    }
    let frag_field = u16::from_be(get!(ip, frag));
    let frag = if ipv4_later_fragment(frag_field) {
        Frag::Later
    } else if frag_field & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    *out = Pkt {
        tuple: CtKey {
            src: Addr::from_v4_raw(get!(ip, src)),
            dst: Addr::from_v4_raw(get!(ip, dst)),
            sport: 0,
            dport: 0,
            proto: get!(ip, proto),
            pad: 0,
            pad16: 0,
        },
        v6: false,
        l4_off: ETH_HLEN + ihl,
        tcp_flags: 0,
        tcp_hlen: 0,
        l3_len: tot_len,
        frag,
        frag_id: if frag == Frag::None {
            0
        } else {
            get!(ip, id) as u32
        },
        bad_len: tot_len < ihl as u32 || ETH_HLEN as u32 + tot_len > ctx.len(),
        icmp_error: false,
    };
    parse_l4(ctx, out)
}

#[inline(always)]
fn parse_v6<C: Ctx>(ctx: &C, out: &mut Pkt) -> Parsed {
    let Some(ip) = ptr_at::<C, Ipv6Hdr>(ctx, ETH_HLEN) else {
        return Parsed::Unparsed;
    };
    if get!(ip, vtcfl).to_ne_bytes()[0] >> 4 != 6 {
        return Parsed::Unparsed;
    }
    let payload_len = u16::from_be(get!(ip, payload_len)) as u32;
    // Payload length 0: a jumbogram (RFC 2675) or IPv6 BIG TCP; the length is the packet's.
    let l3_len = if payload_len == 0 {
        ctx.len().saturating_sub(ETH_HLEN as u32)
    } else {
        IPV6_HLEN as u32 + payload_len
    };
    let src = Addr {
        words: get!(ip, src),
    };
    let dst = Addr {
        words: get!(ip, dst),
    };
    let mut next = get!(ip, next);
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut frag = Frag::None;
    let mut frag_id = 0u32;
    for _ in 0..IPV6_MAX_EXT {
        if !is_ipv6_ext(next) {
            break;
        }
        let Some(ext) = ptr_at::<C, Ipv6Ext>(ctx, off) else {
            return Parsed::Unparsed;
        };
        let len = get!(ext, len) as usize;
        match next {
            IPV6_FRAGMENT => {
                let offm = u16::from_be(get!(ext, frag_off));
                frag = if offm >> 3 != 0 {
                    Frag::Later
                } else if offm & 1 != 0 {
                    Frag::First
                } else {
                    Frag::None
                };
                frag_id = get!(ext, frag_id);
                off += 8;
            }
            IPV6_AH => off += (len + 2) << 2,
            _ => off += (len + 1) << 3,
        }
        next = get!(ext, next);
    }
    // Still an extension header after IPV6_MAX_EXT of them: the transport header is too deep.
    if is_ipv6_ext(next) {
        return Parsed::Unparsed;
    }
    *out = Pkt {
        tuple: CtKey {
            src,
            dst,
            sport: 0,
            dport: 0,
            proto: next,
            pad: 0,
            pad16: 0,
        },
        v6: true,
        l4_off: off,
        tcp_flags: 0,
        tcp_hlen: 0,
        l3_len,
        frag,
        frag_id,
        bad_len: ETH_HLEN as u32 + l3_len > ctx.len() || (off - ETH_HLEN) as u32 > l3_len,
        icmp_error: false,
    };
    parse_l4(ctx, out)
}

#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT
    )
}

#[inline(always)]
fn parse_l4<C: Ctx>(ctx: &C, pkt: &mut Pkt) -> Parsed {
    match pkt.tuple.proto {
        PROTO_TCP => {
            if !pkt.has_l4() {
                return Parsed::Pkt;
            }
            // The whole base header must be present: we rewrite its checksum.
            let Some(tcp) = ptr_at::<C, TcpHdr>(ctx, pkt.l4_off) else {
                return Parsed::Unparsed;
            };
            pkt.tuple.sport = get!(tcp, sport);
            pkt.tuple.dport = get!(tcp, dport);
            pkt.tcp_flags = get!(tcp, flags);
            pkt.tcp_hlen = tcp_hlen(get!(tcp, doff));
            // Checked against the IP header's length, not the linear data a TC skb happens to
            // have: the header must lie within the datagram.
            // An IP header that lies about the length is the data path's to drop (bad_len).
            if !pkt.bad_len
                && ((pkt.tcp_hlen as usize) < TCP_HLEN
                    || (pkt.l4_off - ETH_HLEN) as u32 + pkt.tcp_hlen as u32 > pkt.l3_len)
            {
                return Parsed::Malformed(proxy_common::Counter::MalformedTcpHeader);
            }
            Parsed::Pkt
        }
        PROTO_UDP => {
            if !pkt.has_l4() {
                return Parsed::Pkt;
            }
            let Some(udp) = ptr_at::<C, UdpHdr>(ctx, pkt.l4_off) else {
                return Parsed::Unparsed;
            };
            pkt.tuple.sport = get!(udp, sport);
            pkt.tuple.dport = get!(udp, dport);
            let len = u16::from_be(get!(udp, len)) as u32;
            let payload = pkt.l3_len.saturating_sub((pkt.l4_off - ETH_HLEN) as u32);
            // A jumbogram's UDP length is 0 (RFC 2675); a first fragment's covers the whole
            // datagram, beyond this fragment.
            let jumbo = pkt.v6 && len == 0 && payload > 0xffff;
            if !pkt.bad_len
                && !jumbo
                && (len < UDP_HLEN as u32 || (len > payload && pkt.frag != Frag::First))
            {
                return Parsed::Malformed(proxy_common::Counter::MalformedUdpLength);
            }
            Parsed::Pkt
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if !pkt.has_l4() || (pkt.tuple.proto == PROTO_ICMPV6) != pkt.v6 {
                return Parsed::Other;
            }
            let Some(icmp) = ptr_at::<C, IcmpHdr>(ctx, pkt.l4_off) else {
                return Parsed::Unparsed;
            };
            let ty = get!(icmp, ty);
            pkt.icmp_error = if pkt.v6 {
                // Destination unreachable, packet too big, time exceeded, parameter problem.
                matches!(ty, 1..=4)
            } else {
                // Destination unreachable, time exceeded, parameter problem.
                matches!(ty, 3 | 11 | 12)
            };
            if pkt.icmp_error {
                Parsed::Pkt
            } else {
                Parsed::Other
            }
        }
        _ => Parsed::Other,
    }
}

/// The packet an ICMP error quotes: its addresses and ports as we sent them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Inner {
    pub l3_off: usize,
    pub l4_off: usize,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
}

/// Parses the IP packet quoted by the ICMP error in `pkt`. Inner IPv6 extension headers are not
/// walked: errors about such packets are passed on untranslated.
#[inline(always)]
pub fn parse_inner<C: Ctx>(ctx: &C, pkt: &Pkt, out: &mut Inner) -> Option<()> {
    let l3 = pkt.l4_off + ICMP_HLEN;
    let (l4_off, proto, src, dst) = if pkt.v6 {
        let ip = ptr_at::<C, Ipv6Hdr>(ctx, l3)?;
        let src = Addr {
            words: get!(ip, src),
        };
        let dst = Addr {
            words: get!(ip, dst),
        };
        (l3 + IPV6_HLEN, get!(ip, next), src, dst)
    } else {
        let ip = ptr_at::<C, Ipv4Hdr>(ctx, l3)?;
        let ihl = ipv4_hlen(get!(ip, vihl));
        // A quoted later fragment has no ports to match.
        if ihl < IPV4_HLEN || ipv4_later_fragment(u16::from_be(get!(ip, frag))) {
            return None;
        }
        let src = Addr::from_v4_raw(get!(ip, src));
        let dst = Addr::from_v4_raw(get!(ip, dst));
        (l3 + ihl, get!(ip, proto), src, dst)
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    // Only the ports are certain to be quoted (RFC 792 promises 8 bytes).
    let ports = load::<C, [u16; 2]>(ctx, l4_off)?;
    *out = Inner {
        l3_off: l3,
        l4_off,
        proto,
        src,
        dst,
        sport: ports[0],
        dport: ports[1],
    };
    Some(())
}
