//! Address translation: SNAT port allocation, header rewriting, ICMP error translation.

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::*;

use crate::{
    conntrack::revnat_key,
    csum,
    ctx::{Ctx, load, ptr_at, store},
    lb,
    maps::{CT, REVNAT},
    parse::{ETH_HLEN, Inner, Pkt},
    stats::count,
};

/// Ports tried before a new flow is dropped as `snat_ports_exhausted`. The candidates are
/// independent, so with a fraction f of the range in use a new flow is refused with probability
/// about f^SNAT_TRIES: 0.08% at f = 0.8, 3.4% at 0.9 (consecutive candidates refused flows from
/// 50-70% in use). Flows pay one try while the range is mostly free. The bound is the verifier's
/// cost: it walks every iteration; 64 tries took program verification from ~210 to ~370 ms,
/// which a cold start at 10k Services cannot afford.
const SNAT_TRIES: u32 = 32;

#[inline(always)]
pub fn in_snat_range(cfg: &Config, port_net: u16) -> bool {
    let p = u16::from_be(port_net);
    p >= cfg.snat_port_min && p <= cfg.snat_port_max
}

/// The next candidate of a probe sequence: murmur3's finalizer over a Weyl step, so every try
/// lands anywhere in the range independently of the last one.
#[inline(always)]
fn next_candidate(x: u32) -> u32 {
    lb::fmix32(x.wrapping_add(0x9e37_79b9))
}

/// Reserves a source port on `rn_key.snat` for a flow to `rn_key.backend:backend_port` by
/// inserting its reverse NAT entry `rn`. On success `rn_key.snat_port` holds the port.
///
/// The first candidate comes from the flow hash, so a flow recreated after losing its conntrack
/// entry usually gets the same port again. The others are re-hashes of it scattered over the
/// whole range: consecutive ports would pile flows up behind each other (primary clustering),
/// and then the tries of a new flow all fall in one taken run while half of the range is still
/// free. Ranges no larger than the tries are walked port by port instead, so a refusal there
/// always means that every port is in use. A taken port whose flow has expired is reused.
#[inline(always)]
pub fn snat_alloc(
    cfg: &Config,
    now: u32,
    rn_key: &mut RevNatKey,
    rn: &RevNatValue,
    old_key: &mut CtKey,
    hash: u32,
) -> bool {
    let min = cfg.snat_port_min as u32;
    let max = cfg.snat_port_max as u32;
    if max < min {
        return false;
    }
    let range = max - min + 1;
    let scatter = if range > SNAT_TRIES { u32::MAX } else { 0 };
    let mut x = hash;
    let mut off = hash % range;
    for _ in 0..SNAT_TRIES {
        let port = (min + off) as u16;
        rn_key.snat_port = port.to_be();
        // Look before inserting: an LRU map takes a free node (evicting the oldest entry when
        // none is left) before it finds out the key exists, so probing taken ports with
        // inserts would push out live flows' entries once the map is full.
        let reserved = match unsafe { REVNAT.get(&*rn_key) } {
            None => REVNAT.insert(&*rn_key, rn, BPF_NOEXIST as u64).is_ok(),
            Some(existing) => take_if_stale(cfg, now, rn_key, rn, existing, old_key),
        };
        if reserved {
            return true;
        }
        count(Counter::SnatCollision);
        // The next port at random (off + 1 + a random offset), or, for small ranges, the next
        // port. Branch-free on purpose: a branch on the range makes LLVM duplicate the loop, one
        // copy per case, and the verifier then walks both (+50% instructions at 32 tries).
        x = next_candidate(x);
        off = (off + 1 + ((x % range) & scatter)) % range;
    }
    false
}

/// Takes over the port of `rn_key` from `existing` if that flow is gone, expired, or already
/// moved to another port (its conntrack entry, `old_key`, goes with it if it still owns the port).
#[inline(always)]
fn take_if_stale(
    cfg: &Config,
    now: u32,
    rn_key: &RevNatKey,
    rn: &RevNatValue,
    existing: &RevNatValue,
    old_key: &mut CtKey,
) -> bool {
    let proto = rn_key.proto;
    *old_key = existing.ct_key(proto);
    let (stale, owned) = match unsafe { CT.get(&*old_key) } {
        None => (true, false),
        Some(ct) => {
            let owned = revnat_key(ct, proto) == *rn_key;
            (!owned || cfg.ct_expired(proto, ct, now), owned)
        }
    };
    if !stale {
        return false;
    }
    if owned {
        let _ = CT.remove(&*old_key);
    }
    if REVNAT.insert(rn_key, rn, 0).is_err() {
        return false;
    }
    count(Counter::CtStaleReplaced);
    true
}

/// Offsets of the source and destination address fields of the IP header at `l3_off`.
#[inline(always)]
fn addr_offsets(v6: bool, l3_off: usize) -> (usize, usize) {
    if v6 {
        (l3_off + 8, l3_off + 24)
    } else {
        (l3_off + 12, l3_off + 16)
    }
}

#[inline(always)]
fn store_addr<C: Ctx>(ctx: &C, v6: bool, off: usize, a: &Addr) -> Result<(), ()> {
    // Word by word: a 16-byte copy whose source LLVM cannot prove apart from the packet
    // becomes a byte-loop memmove call.
    if v6 {
        // One bounds check for all 16 bytes: checked word by word, LLVM merges the checks in
        // a way the verifier cannot follow.
        let p = ptr_at::<C, [u32; 4]>(ctx, off).ok_or(())? as *mut u32;
        let [w0, w1, w2, w3] = a.words;
        unsafe {
            core::ptr::write_unaligned(p, w0);
            core::ptr::write_unaligned(p.add(1), w1);
            core::ptr::write_unaligned(p.add(2), w2);
            core::ptr::write_unaligned(p.add(3), w3);
        }
        Ok(())
    } else {
        store(ctx, off, a.words[3])
    }
}

/// Offset of the checksum of the TCP or UDP header at `l4_off`.
#[inline(always)]
fn l4_csum_off(proto: u8, l4_off: usize) -> usize {
    l4_off + if proto == PROTO_TCP { 16 } else { 6 }
}

/// Rewrites addresses and ports and fixes every checksum they are part of. Later fragments only
/// carry the IP header; their transport checksum was fixed with the first fragment.
#[inline(always)]
pub fn xlate<C: Ctx>(
    ctx: &C,
    pkt: &Pkt,
    src: &Addr,
    sport: u16,
    dst: &Addr,
    dport: u16,
) -> Result<(), ()> {
    let (src_off, dst_off) = addr_offsets(pkt.v6, ETH_HLEN);
    store_addr(ctx, pkt.v6, src_off, src)?;
    store_addr(ctx, pkt.v6, dst_off, dst)?;
    let addr_delta = csum::add(
        csum::diff_addr_family(pkt.v6, &pkt.tuple.src, src),
        csum::diff_addr_family(pkt.v6, &pkt.tuple.dst, dst),
    );
    if !pkt.v6 {
        ctx.csum_l3(ETH_HLEN + 10, addr_delta)?;
    }
    if pkt.has_l4() {
        store(ctx, pkt.l4_off, [sport, dport])?;
        let port_delta = csum::add(
            csum::diff16(pkt.tuple.sport, sport),
            csum::diff16(pkt.tuple.dport, dport),
        );
        let udp = pkt.tuple.proto == PROTO_UDP;
        let off = l4_csum_off(pkt.tuple.proto, pkt.l4_off);
        ctx.csum_l4_both(off, addr_delta, port_delta, udp)?;
    }
    Ok(())
}

#[inline(always)]
pub fn set_macs<C: Ctx>(ctx: &C, src: &[u8; 6], dst: &[u8; 6]) -> Result<(), ()> {
    store(ctx, 0, *dst)?;
    store(ctx, 6, *src)
}

/// Rewrites a checksum field inside an ICMP payload by `delta`; returns the change of the field
/// itself (which the ICMP checksum covers). Fields cut off by the quote are skipped.
#[inline(always)]
fn fix_quoted_csum<C: Ctx>(ctx: &C, off: usize, delta: u32, udp: bool) -> u32 {
    let Some(old) = load::<C, u16>(ctx, off) else {
        return 0;
    };
    if udp && old == 0 {
        return 0;
    }
    let mut new = csum::apply(old, delta);
    if udp && new == 0 {
        new = 0xffff;
    }
    if store(ctx, off, new).is_err() {
        return 0;
    }
    csum::diff16(old, new)
}

/// The source an ICMP error about `inner` gets toward the client: the frontend if the endpoint
/// itself complained; a router on the way keeps its own address.
#[inline(always)]
pub fn icmp_error_source(pkt: &Pkt, inner: &Inner, rn: &RevNatValue) -> Addr {
    if pkt.tuple.src == inner.dst {
        rn.frontend
    } else {
        pkt.tuple.src
    }
}

/// Translates an ICMP error about a flow we SNATed (quoted packet: egress -> endpoint) into one
/// the client understands (quoted packet: client -> frontend), outer header included: from
/// `new_src` ([`icmp_error_source`]) to the client.
#[inline(always)]
pub fn xlate_icmp_error_reply<C: Ctx>(
    ctx: &C,
    pkt: &Pkt,
    inner: &Inner,
    rn: &RevNatValue,
    new_src: &Addr,
) -> Result<(), ()> {
    let v6 = pkt.v6;
    // Quoted packet: src egress:snat_port -> client:client_port, dst endpoint -> frontend.
    let (isrc_off, idst_off) = addr_offsets(v6, inner.l3_off);
    store_addr(ctx, v6, isrc_off, &rn.client)?;
    store_addr(ctx, v6, idst_off, &rn.frontend)?;
    store(ctx, inner.l4_off, [rn.client_port, rn.frontend_port])?;
    let inner_addr_delta = csum::add(
        csum::diff_addr_family(v6, &inner.src, &rn.client),
        csum::diff_addr_family(v6, &inner.dst, &rn.frontend),
    );
    let inner_port_delta = csum::add(
        csum::diff16(inner.sport, rn.client_port),
        csum::diff16(inner.dport, rn.frontend_port),
    );
    // The quoted transport checksum covers the quoted addresses and ports; the ICMP checksum
    // covers all of the quote, that checksum field included.
    let quoted_delta = csum::add(inner_addr_delta, inner_port_delta);
    let mut icmp_delta = quoted_delta;
    if !v6 {
        icmp_delta = csum::add(
            icmp_delta,
            fix_quoted_csum(ctx, inner.l3_off + 10, inner_addr_delta, false),
        );
    }
    let quoted_l4_csum = fix_quoted_csum(
        ctx,
        l4_csum_off(inner.proto, inner.l4_off),
        quoted_delta,
        inner.proto == PROTO_UDP,
    );
    icmp_delta = csum::add(icmp_delta, quoted_l4_csum);

    let (src_off, dst_off) = addr_offsets(v6, ETH_HLEN);
    store_addr(ctx, v6, src_off, new_src)?;
    store_addr(ctx, v6, dst_off, &rn.client)?;
    let outer_delta = csum::add(
        csum::diff_addr_family(v6, &pkt.tuple.src, new_src),
        csum::diff_addr_family(v6, &pkt.tuple.dst, &rn.client),
    );
    let icmp_csum_off = pkt.l4_off + 2;
    if v6 {
        // ICMPv6 covers a pseudo-header with the outer addresses.
        ctx.csum_l4(icmp_csum_off, outer_delta, true, false)?;
    } else {
        ctx.csum_l3(ETH_HLEN + 10, outer_delta)?;
    }
    ctx.csum_l4(icmp_csum_off, icmp_delta, false, false)
}
