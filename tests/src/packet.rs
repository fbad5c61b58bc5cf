//! Packet building and checking for the BPF_PROG_TEST_RUN tests.
//!
//! Checksums here are computed from scratch over whole headers (RFC 1071), independently of the
//! data path's incremental updates; etherparse is a second, independent parser of the results.

use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// RFC 1071 sum, not complemented.
pub fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

pub fn csum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// RFC 1071 sum of the transport pseudo-header, not complemented.
pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
            acc += proto as u32 + len as u32;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
            acc += (len as u32 >> 16) + (len as u32 & 0xffff) + proto as u32;
        }
        _ => panic!("mixed families"),
    }
    acc
}

/// A transport segment with a correct checksum.
pub fn l4_with_csum(src: IpAddr, dst: IpAddr, proto: u8, mut seg: Vec<u8>) -> Vec<u8> {
    let off = match proto {
        TCP => 16,
        UDP => 6,
        ICMP | ICMPV6 => 2,
        _ => return seg,
    };
    seg[off] = 0;
    seg[off + 1] = 0;
    let mut acc = sum16(&seg, 0);
    if proto != ICMP {
        acc += pseudo(src, dst, proto, seg.len());
    }
    let mut c = !fold(acc);
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    seg[off..off + 2].copy_from_slice(&c.to_be_bytes());
    seg
}

pub fn tcp_seg(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(20 + payload.len());
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&seq.to_be_bytes());
    s.extend_from_slice(&ack.to_be_bytes());
    s.push(5 << 4);
    s.push(flags);
    s.extend_from_slice(&64240u16.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 0]);
    s.extend_from_slice(payload);
    s
}

/// A TCP segment with options (`opts`, a multiple of 4 bytes).
pub fn tcp_seg_opts(
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    opts: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(opts.len() % 4, 0);
    let mut s = tcp_seg(sport, dport, seq, ack, flags, &[]);
    s[12] = ((5 + opts.len() / 4) as u8) << 4;
    s.extend_from_slice(opts);
    s.extend_from_slice(payload);
    s
}

/// TCP options carrying a timestamp, laid out as Linux does: MSS, SACK permitted, timestamp,
/// NOP, window scale on a SYN; NOP, NOP, timestamp after it.
pub fn ts_opts(syn: bool, tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = Vec::new();
    if syn {
        o.extend_from_slice(&[2, 4, 0x05, 0xb4, 4, 2]);
    } else {
        o.extend_from_slice(&[1, 1]);
    }
    o.extend_from_slice(&[8, 10]);
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    if syn {
        o.extend_from_slice(&[1, 3, 3, 7]);
    }
    o
}

pub fn udp_dgram(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(8 + payload.len());
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    s
}

/// An ICMP(v6) error quoting `quoted` (an IP packet without Ethernet header).
pub fn icmp_error(ty: u8, code: u8, rest: u32, quoted: &[u8]) -> Vec<u8> {
    let mut s = vec![ty, code, 0, 0];
    s.extend_from_slice(&rest.to_be_bytes());
    s.extend_from_slice(quoted);
    s
}

/// An IP packet (no Ethernet header) around a finished transport segment.
#[derive(Clone)]
pub struct Ip {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub ttl: u8,
    pub id: u32,
    /// IPv4 options (multiple of 4 bytes).
    pub options: Vec<u8>,
    /// (offset in 8-byte units, more fragments)
    pub frag: Option<(u16, bool)>,
    /// Total-length override, to build lying headers.
    pub tot_len: Option<u16>,
}

impl Ip {
    pub fn new(src: &str, dst: &str, proto: u8) -> Self {
        Ip {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            ttl: 64,
            id: 0x1234,
            options: Vec::new(),
            frag: None,
            tot_len: None,
        }
    }

    /// The IP packet carrying `seg`; a segment built with the `*_seg` helpers gets its checksum
    /// here (pass `raw = true` to keep the bytes as they are, e.g. for later fragments).
    pub fn wrap(&self, seg: Vec<u8>, raw: bool) -> Vec<u8> {
        let seg = if raw {
            seg
        } else {
            l4_with_csum(self.src, self.dst, self.proto, seg)
        };
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let hlen = 20 + self.options.len();
                let mut h = vec![0u8; hlen];
                h[0] = 0x40 | (hlen / 4) as u8;
                let tot = self.tot_len.unwrap_or((hlen + seg.len()) as u16);
                h[2..4].copy_from_slice(&tot.to_be_bytes());
                h[4..6].copy_from_slice(&(self.id as u16).to_be_bytes());
                let frag = match self.frag {
                    Some((off, more)) => off | if more { 0x2000 } else { 0 },
                    None => 0x4000,
                };
                h[6..8].copy_from_slice(&frag.to_be_bytes());
                h[8] = self.ttl;
                h[9] = self.proto;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                h[20..].copy_from_slice(&self.options);
                let c = csum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h.extend_from_slice(&seg);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                let mut next = self.proto;
                let mut ext = Vec::new();
                if let Some((off, more)) = self.frag {
                    ext.push(self.proto);
                    ext.push(0);
                    ext.extend_from_slice(&((off << 3) | more as u16).to_be_bytes());
                    ext.extend_from_slice(&self.id.to_be_bytes());
                    next = 44;
                }
                let plen = self.tot_len.unwrap_or((ext.len() + seg.len()) as u16);
                h[4..6].copy_from_slice(&plen.to_be_bytes());
                h[6] = next;
                h[7] = self.ttl;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                h.extend_from_slice(&ext);
                h.extend_from_slice(&seg);
                h
            }
            _ => panic!("mixed families"),
        }
    }
}

/// An Ethernet frame around an IP packet.
pub fn frame(smac: [u8; 6], dmac: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + ip.len());
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    let ethertype: u16 = if ip[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// A decoded frame, with every checksum verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// The transport segment (header and payload).
    pub l4: Vec<u8>,
}

impl Decoded {
    /// The TCP timestamp option's (TSval, TSecr), if the segment has one.
    pub fn timestamps(&self) -> Option<(u32, u32)> {
        let hlen = (self.l4[12] >> 4) as usize * 4;
        let mut off = 20;
        while off < hlen {
            match self.l4[off] {
                0 => return None,
                1 => off += 1,
                8 => {
                    let v = |i: usize| u32::from_be_bytes(self.l4[i..i + 4].try_into().unwrap());
                    return Some((v(off + 2), v(off + 6)));
                }
                _ => off += self.l4[off + 1] as usize,
            }
        }
        None
    }
}

/// Decodes `f` and asserts its IPv4 header checksum and transport checksum are right. Packets
/// that are later fragments are decoded at the IP level only.
pub fn decode(f: &[u8]) -> Decoded {
    assert!(
        etherparse::SlicedPacket::from_ethernet(f).is_ok(),
        "etherparse cannot parse the output: {f:02x?}"
    );
    let smac = f[6..12].try_into().unwrap();
    let dmac = f[0..6].try_into().unwrap();
    let ip = &f[14..];
    let (src, dst, mut proto, l4_off, l3_len, later) = if ip[0] >> 4 == 4 {
        let hlen = (ip[0] & 0xf) as usize * 4;
        assert_eq!(csum(&ip[..hlen]), 0, "bad IPv4 header checksum");
        let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
        let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
        (src, dst, ip[9], hlen, tot, frag & 0x1fff != 0)
    } else {
        let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        let (mut next, mut off, mut later) = (ip[6], 40, false);
        if next == 44 {
            later = u16::from_be_bytes([ip[42], ip[43]]) >> 3 != 0;
            next = ip[40];
            off += 8;
        }
        (src, dst, next, off, 40 + plen, later)
    };
    let l4 = ip[l4_off..l3_len].to_vec();
    let mut d = Decoded {
        smac,
        dmac,
        src,
        dst,
        proto,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        seq: 0,
        ack: 0,
        l4: l4.clone(),
    };
    if later {
        proto = 0;
    }
    // Folded sum over the segment and its pseudo-header: 0xffff when the checksum is right.
    let l4_sum = |proto| fold(sum16(&l4, pseudo(src, dst, proto, l4.len())));
    match proto {
        TCP => {
            assert_eq!(l4_sum(TCP), 0xffff, "bad TCP checksum");
            d.sport = u16::from_be_bytes([l4[0], l4[1]]);
            d.dport = u16::from_be_bytes([l4[2], l4[3]]);
            d.seq = u32::from_be_bytes(l4[4..8].try_into().unwrap());
            d.ack = u32::from_be_bytes(l4[8..12].try_into().unwrap());
            d.tcp_flags = l4[13];
        }
        UDP => {
            if !(src.is_ipv4() && l4[6] == 0 && l4[7] == 0) {
                assert_eq!(l4_sum(UDP), 0xffff, "bad UDP checksum");
            }
            d.sport = u16::from_be_bytes([l4[0], l4[1]]);
            d.dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        ICMP => assert_eq!(csum(&l4), 0, "bad ICMP checksum"),
        ICMPV6 => assert_eq!(l4_sum(ICMPV6), 0xffff, "bad ICMPv6 checksum"),
        _ => {}
    }
    d
}
