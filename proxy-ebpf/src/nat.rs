//! Address translation: SNAT port allocation, header rewriting, ICMP error translation.

use aya_ebpf::{bindings::BPF_NOEXIST, cty::c_void, helpers::bpf_loop};
use proxy_common::*;

use crate::{
    conntrack::{ct_get, revnat_key},
    csum,
    ctx::{Ctx, load, ptr_at, store},
    lb,
    maps::{CONFIG, CT, CT_NEW, REVNAT, SCRATCH},
    parse::{ETH_HLEN, Inner, Pkt},
    stats::count,
};

/// Ports tried before a new flow is refused as `snat_ports_exhausted`. The candidates are
/// independent, so with a fraction f of the range unusable a new flow is refused with probability
/// about f^SNAT_TRIES: 0.08% at f = 0.8, 3.4% at 0.9. Flows pay one try while the range is mostly
/// usable. The bound is the verifier's cost: it walks every iteration.
const SNAT_TRIES: u32 = 32;

/// After a candidate turned out held for another client (the range is crowded with recently
/// closed flows of other clients), this many tries follow the client's own sequence of ports (a
/// hash of its address, the frontend and the endpoint): the ports it closed itself are there, and
/// it may take them again at once.
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

/// Reserves a source port on `s.rn_key.snat` for a flow to `s.rn_key.backend:backend_port` by
/// writing its reverse NAT entry `s.rn`. On success `s.rn_key.snat_port` holds the port.
///
/// Candidates come from the flow hash `flow`, so a flow recreated after losing its conntrack
/// entry usually gets its port again, scattered over the whole range: consecutive ports pile
/// flows up behind each other. Once a candidate turns out held for another client, the next
/// [`CLIENT_TRIES`] follow the client's own sequence `client`, where the ports it closed itself
/// are. Ranges no larger than the tries are walked port by port instead, so a refusal there
/// always means that no port is usable.
///
/// A port is usable when no flow has it; when its flow is gone or expired; or when its flow
/// closed and the hold is over for this client: after a few milliseconds for the client that
/// closed it, whose TCP timestamps are newer than the ones the endpoint saw last on that port;
/// after the endpoint's TIME_WAIT for any other client (see DESIGN.md, "SNAT ports").
///
/// The tries run under bpf_loop: the verifier checks one try, not every one of them, so the
/// number of tries costs no verification time (unrolled, 32 tries with this much logic each
/// did not verify in minutes).
#[inline(always)]
pub fn snat_alloc(
    cfg: &Config,
    now: u32,
    ticks: u32,
    flow: u32,
    client: u32,
) -> Result<(), AllocError> {
    let range = cfg.snat_ports;
    if range == 0 {
        return Err(AllocError::Exhausted);
    }
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return Err(AllocError::Exhausted);
    };
    let s = unsafe { &mut *s };
    s.alloc = AllocLoop {
        now,
        ticks,
        client,
        x: flow,
        start: flow % range,
        own_from: u32::MAX,
        taken: 0,
        full: 0,
    };
    unsafe {
        bpf_loop(
            SNAT_TRIES,
            alloc_try as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    if s.alloc.taken != 0 {
        Ok(())
    } else if s.alloc.full != 0 {
        Err(AllocError::TableFull)
    } else {
        Err(AllocError::Exhausted)
    }
}

/// The state of [`snat_alloc`]'s tries. In the per-CPU scratch, not on the stack (where
/// bpf_loop contexts usually live): the call chain's 512 bytes of stack have no room left.
#[repr(C)]
pub struct AllocLoop {
    now: u32,
    ticks: u32,
    client: u32,
    /// The flow's probe sequence: the next random candidate.
    x: u32,
    /// First candidate, for ranges walked port by port.
    start: u32,
    /// The try at which the client's own sequence starts (never, until a held port is met).
    own_from: u32,
    taken: u32,
    full: u32,
}

/// One try of [`snat_alloc`]: 1 (stop) once a port is taken or nothing can go on, else 0.
#[inline(never)]
extern "C" fn alloc_try(k: u64, _ctx: *mut c_void) -> i64 {
    let (Some(cfg), Some(s)) = (CONFIG.get(0), SCRATCH.get_ptr_mut(0)) else {
        return 1;
    };
    let s = unsafe { &mut *s };
    let st = &mut s.alloc;
    let range = cfg.snat_ports;
    if range == 0 {
        return 1;
    }
    let k = k as u32;
    let j = k.wrapping_sub(st.own_from);
    let idx = if range <= SNAT_TRIES {
        (st.start + k) % range
    } else if j < CLIENT_TRIES {
        lb::fmix32(st.client.wrapping_add(j.wrapping_mul(0x9e37_79b9))) % range
    } else {
        st.x % range
    };
    st.x = next_candidate(st.x);
    s.rn_key.snat_port = cfg.snat_port_at(idx).to_be();
    // Look before inserting: an insert that finds the key taken still costs a lookup, and
    // taken ports are the common case once a busy range has filled with held ports.
    let outcome = match REVNAT.get_ptr_mut(&s.rn_key) {
        None => match REVNAT.insert(&s.rn_key, &s.rn, BPF_NOEXIST as u64) {
            Ok(()) => Take::Taken,
            // Taken meanwhile by another CPU.
            Err(e) if e == -EEXIST => Take::Busy,
            Err(_) => {
                s.alloc.full = 1;
                Take::Busy
            }
        },
        Some(existing) => take(
            cfg,
            s.alloc.now,
            s.alloc.ticks,
            &s.rn_key,
            &s.rn,
            unsafe { &mut *existing },
            &mut s.old_key,
        ),
    };
    match outcome {
        Take::Taken => {
            s.alloc.taken = 1;
            return 1;
        }
        Take::Busy => {}
        Take::HeldForOther => {
            if s.alloc.own_from == u32::MAX {
                s.alloc.own_from = k + 1;
            }
        }
    }
    count(Counter::SnatCollision);
    0
}

/// What a candidate port turned out to be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Take {
    Taken,
    /// In use, or held for this client but too briefly closed.
    Busy,
    /// Held for another client (the endpoint may still be in TIME_WAIT for it).
    HeldForOther,
}

const EEXIST: i32 = 17;

/// Takes the port of `existing` (the entry of `rn_key`) for `rn` if its hold allows. A closed
/// flow's entry is claimed with one compare-and-swap, so two CPUs never take the same port; a
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
) -> Take {
    let closed_at = existing.closed_at;
    if closed_at != 0 {
        let age = ticks.wrapping_sub(closed_at);
        if existing.client == rn.client && existing.frontend == rn.frontend {
            if age < cfg.snat_reuse_gap_ticks || !claim(existing, closed_at, rn) {
                return Take::Busy;
            }
            count(Counter::SnatReusedByClient);
            return Take::Taken;
        }
        if age < cfg.snat_hold_ticks(existing.flags) {
            count(Counter::SnatTimeWaitSkipped);
            return Take::HeldForOther;
        }
        return if claim(existing, closed_at, rn) {
            Take::Taken
        } else {
            Take::Busy
        };
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
        return Take::Busy;
    }
    // Rare (flows that ended without closing): replaced through the map, so that of two CPUs
    // taking the same port, one insert fails.
    let _ = REVNAT.remove(rn_key);
    if REVNAT.insert(rn_key, rn, BPF_NOEXIST as u64).is_err() {
        return Take::Busy;
    }
    if owned {
        let _ = CT.remove(&*old_key);
        let _ = CT_NEW.remove(&*old_key);
    }
    count(Counter::CtStaleReplaced);
    Take::Taken
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
