//! Address translation: SNAT port allocation, header rewriting, ICMP error translation.

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::*;

use crate::{
    conntrack::{ct_get, revnat_key},
    csum,
    ctx::{Ctx, load, ptr_at, store},
    lb,
    maps::{CT, CT_NEW, REVNAT},
    parse::{ETH_HLEN, Inner, Pkt},
    stats::count,
};

/// Ports tried before a new flow is refused as `snat_ports_exhausted`. The candidates are
/// independent, so with a fraction f of the range unusable a new flow is refused with probability
/// about f^SNAT_TRIES: 0.08% at f = 0.8, 3.4% at 0.9. Flows pay one try while the range is mostly
/// usable. The bound is the verifier's cost: it walks every iteration.
const SNAT_TRIES: u32 = 32;

/// Tries 1..=CLIENT_TRIES follow the client's own sequence of ports (a hash of its address,
/// the frontend and the endpoint): ports it closed itself, which it may take again at once.
const CLIENT_TRIES: u32 = 4;

#[inline(always)]
pub fn in_snat_range(cfg: &Config, port_net: u16) -> bool {
    cfg.is_snat_port(u16::from_be(port_net))
}

/// The next candidate of a probe sequence: murmur3's finalizer over a Weyl step, so every try
/// lands anywhere in the range independently of the last one.
#[inline(always)]
fn next_candidate(x: u32) -> u32 {
    lb::fmix32(x.wrapping_add(0x9e37_79b9))
}

/// Why no port was reserved.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AllocError {
    /// Every candidate was in use or held for its client.
    Exhausted,
    /// The reverse NAT table had no room for a new entry.
    TableFull,
}

/// Reserves a source port on `rn_key.snat` for a flow to `rn_key.backend:backend_port` by
/// writing its reverse NAT entry `rn`. On success `rn_key.snat_port` holds the port.
///
/// Candidates, in order: one from the flow hash `flow`, so a flow recreated after losing its
/// conntrack entry usually gets its port again; then [`CLIENT_TRIES`] from the client's own
/// sequence `client` (address, frontend, endpoint), where its recently closed ports are; then
/// more from the flow hash. Scattered over the whole range: consecutive ports pile flows up
/// behind each other. Ranges no larger than the tries are walked port by port instead, so a
/// refusal there always means that no port is usable.
///
/// A port is usable when no flow has it; when its flow is gone or expired; or when its flow
/// closed and the hold is over for this client: at once (after a few milliseconds) for the
/// client that closed it, whose TCP timestamps are newer than the ones the endpoint saw last on
/// that port; after the endpoint's TIME_WAIT for any other client (see DESIGN.md, "SNAT ports").
#[inline(always)]
pub fn snat_alloc(
    cfg: &Config,
    now: u32,
    ticks: u32,
    rn_key: &mut RevNatKey,
    rn: &RevNatValue,
    old_key: &mut CtKey,
    flow: u32,
    client: u32,
) -> Result<(), AllocError> {
    let range = cfg.snat_ports;
    if range == 0 {
        return Err(AllocError::Exhausted);
    }
    // All-ones for ranges larger than the tries; branch-free on purpose: a branch on the range
    // makes LLVM duplicate the loop, one copy per case, and the verifier then walks both.
    let scatter = 0u32.wrapping_sub((range > SNAT_TRIES) as u32);
    let start = flow % range;
    let mut x = flow;
    let mut full = false;
    for k in 0..SNAT_TRIES {
        let own = 0u32.wrapping_sub((k.wrapping_sub(1) < CLIENT_TRIES) as u32);
        let h = (lb::fmix32(client.wrapping_add(k.wrapping_mul(0x9e37_79b9))) & own) | (x & !own);
        let idx = ((h % range) & scatter) | ((start + k) % range & !scatter);
        rn_key.snat_port = cfg.snat_port_at(idx).to_be();
        // Look before inserting: an insert that finds the key taken still costs a lookup, and
        // taken ports are the common case once a busy range has filled with held ports.
        match REVNAT.get_ptr_mut(&*rn_key) {
            None => match REVNAT.insert(&*rn_key, rn, BPF_NOEXIST as u64) {
                Ok(()) => return Ok(()),
                // Taken meanwhile by another CPU: try the next one.
                Err(e) if e == -EEXIST => {}
                Err(_) => full = true,
            },
            Some(existing) => {
                if take(cfg, now, ticks, rn_key, rn, unsafe { &mut *existing }, old_key) {
                    return Ok(());
                }
            }
        }
        count(Counter::SnatCollision);
        x = next_candidate(x);
    }
    Err(if full {
        AllocError::TableFull
    } else {
        AllocError::Exhausted
    })
}

const EEXIST: i32 = 17;

/// Takes the port of `existing` (the entry of `rn_key`) for `rn` if its hold allows. The entry is
/// claimed with one compare-and-swap of `closed_at`, so two CPUs never take the same port; a
/// taken-over open flow's conntrack entry (`old_key`) goes with it.
#[inline(always)]
fn take(
    cfg: &Config,
    now: u32,
    ticks: u32,
    rn_key: &RevNatKey,
    rn: &RevNatValue,
    existing: &mut RevNatValue,
    old_key: &mut CtKey,
) -> bool {
    let closed_at = existing.closed_at;
    if closed_at != 0 {
        let age = ticks.wrapping_sub(closed_at);
        if existing.client == rn.client && existing.frontend == rn.frontend {
            if age < cfg.snat_reuse_gap_ticks {
                return false;
            }
            if !claim(existing, closed_at, rn) {
                return false;
            }
            count(Counter::SnatReusedByClient);
            return true;
        }
        if age < cfg.snat_hold_ticks(existing.flags) {
            count(Counter::SnatTimeWaitSkipped);
            return false;
        }
        return claim(existing, closed_at, rn);
    }
    // An open flow's port: free only if the flow is gone, expired, or moved to another port.
    let proto = rn_key.proto;
    *old_key = existing.ct_key(proto);
    let (stale, owned) = match ct_get(&*old_key) {
        None => (true, false),
        Some(ct) => {
            let owned = revnat_key(ct, proto) == *rn_key;
            (!owned || cfg.ct_expired(proto, ct, now), owned)
        }
    };
    if !stale {
        return false;
    }
    // Rare (flows that ended without closing): replaced through the map, so that of two CPUs
    // taking the same port, one insert fails.
    let _ = REVNAT.remove(rn_key);
    if REVNAT.insert(rn_key, rn, BPF_NOEXIST as u64).is_err() {
        return false;
    }
    if owned {
        let _ = CT.remove(&*old_key);
        let _ = CT_NEW.remove(&*old_key);
    }
    count(Counter::CtStaleReplaced);
    true
}

/// Writes `rn` over the closed flow's entry `existing` if its `closed_at` is still `seen`: one
/// compare-and-swap to 0 (open), which only one CPU can win. Nothing else reads the entry's other
/// fields meanwhile but replies of the closed flow, which may as well be lost.
#[inline(always)]
fn claim(existing: &mut RevNatValue, seen: u32, rn: &RevNatValue) -> bool {
    // BPF has 64-bit atomics only: `closed_at` and the flags after it, one aligned word (map
    // values are 8-byte aligned and `closed_at` sits at offset 40).
    const _: () = assert!(core::mem::offset_of!(RevNatValue, closed_at) % 8 == 0);
    let word = &mut existing.closed_at as *mut u32 as *mut u64;
    let current = unsafe { core::ptr::read_volatile(word) };
    if current as u32 != seen {
        return false;
    }
    // core's Atomic types offer no compare-and-swap on the BPF target, but the instruction
    // exists (BPF_CMPXCHG, kernel 5.12).
    let (_, swapped) = unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::SeqCst },
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(word, current, 0)
    };
    if !swapped {
        return false;
    }
    existing.client = rn.client;
    existing.frontend = rn.frontend;
    existing.client_port = rn.client_port;
    existing.frontend_port = rn.frontend_port;
    existing.service_id = rn.service_id;
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
