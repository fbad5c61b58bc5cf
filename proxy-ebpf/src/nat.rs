//! Address translation: SNAT port allocation, header rewriting, ICMP error translation.

use aya_ebpf::{bindings::BPF_NOEXIST, cty::c_void, helpers::bpf_loop};
use proxy_common::*;

use crate::{
    conntrack::{ct_get, revnat_key},
    csum,
    ctx::{Ctx, load, ptr_at, store},
    lb,
    maps::{CONFIG, CT, CT_NEW, EGRESS_POOLS, REVNAT, SCRATCH, SNAT_CURSOR},
    mem,
    parse::{ETH_HLEN, Inner, Pkt, TCP_ACK, TCP_SYN},
    stats::count,
    tcpts,
};

/// Seed of the flow hash SNAT candidates come from; the endpoint choice has its own, so the two
/// are not correlated.
const SEED_SNAT: u32 = 0x5eed_0002;

/// (Address, port) pairs tried before a new flow is refused as `snat_ports_exhausted`. The candidates are
/// independent, so with a fraction f of the range unusable a new flow is refused with probability
/// about f^SNAT_TRIES: 0.08% at f = 0.8, 3.4% at 0.9. The tries run under bpf_loop, so their
/// number costs no verification time.
const SNAT_TRIES: u32 = 32;

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
    /// Every candidate was in use or held.
    Exhausted,
    /// The reverse NAT table had no room for a new entry.
    TableFull,
}

/// Reserves a source address and port for a flow to `s.rn_key.backend:backend_port` by writing
/// its reverse NAT entry `s.rn`. On success `s.rn_key.snat` and `s.rn_key.snat_port` hold them,
/// and the result is the TCP timestamp offset the flow needs on that pair (0: none; see
/// [`crate::tcpts`]).
///
/// `syn_ts`: the TSval of the flow's SYN, if it carries one.
///
/// The candidates are (egress address, port) pairs: the Service's `egress` (`s.egress`) times
/// the SNAT ports, or with an egress pool (`SVC_F_EGRESS_POOL`) every pool address times them
/// ([`set_candidate`]), so that a pool of n addresses offers n times the pairs per endpoint. A
/// Service with one address never looks at the pool map.
///
/// A new connection takes the next pair in sequence ([`next_in_sequence`]). Other flows, and a
/// new connection whose pair in sequence is not usable, take candidates from the flow's hash
/// (a flow recreated after losing its conntrack entry usually gets its pair again), scattered
/// over all pairs: consecutive ports pile flows up behind each other. Pair sets no larger than
/// the tries are walked one by one instead, so a refusal there always means that no pair is
/// usable. Of the first two usable candidates the one idle longer is taken: a pair no flow has
/// used within its hold has no entry at all and beats every closed flow's pair.
///
/// A pair is usable when no flow has it, when its flow is gone or expired, or when its flow
/// closed and the endpoint will accept a new connection on it: see [`judge`].
#[inline(always)]
pub fn snat_alloc(
    cfg: &Config,
    now: u32,
    ticks: u32,
    syn_ts: Option<u32>,
) -> Result<u32, AllocError> {
    let range = cfg.snat_ports;
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return Err(AllocError::Exhausted);
    };
    let s = unsafe { &mut *s };
    s.alloc.addrs = 1;
    if range == 0 {
        return Err(AllocError::Exhausted);
    }
    if s.svc_flags & SVC_F_EGRESS_POOL != 0
        && let Some(pool) = unsafe { EGRESS_POOLS.get(&s.rn.service_id) }
    {
        s.alloc.addrs = pool.count.clamp(1, EGRESS_POOL_MAX as u32);
    }
    // At most 16 x 65,535; never 0, but the check spares the division its panic path.
    let total = range.wrapping_mul(s.alloc.addrs);
    if total == 0 {
        return Err(AllocError::Exhausted);
    }
    let st = &mut s.alloc;
    st.now = now;
    st.ticks = ticks;
    st.total = total;
    st.syn_ts = syn_ts.unwrap_or(0);
    st.has_ts = syn_ts.is_some() as u32;
    mem::zero(&mut st.taken);
    mem::zero(&mut st.full);
    mem::zero(&mut st.offset);
    mem::zero(&mut st.best_port);
    let in_sequence = sequential(s);
    if in_sequence
        && let Some(idx) = next_in_sequence(range, s.alloc.addrs)
        && set_candidate(cfg, s, idx)
        && let Some(offset) = take_in_sequence(cfg, s)
    {
        // A new connection: the pair after the last one handed out, which of all pairs was
        // handed out longest ago. Once the range has gone round, its entry is a closed flow's
        // the new one may reuse (see `judge`); the random tries below are for the rest.
        return Ok(offset);
    }
    // The flow's own candidates, from its hash: hashed only here, as a new connection in
    // sequence never needs it.
    let flow = lb::flow_hash(&s.ct_key, SEED_SNAT);
    s.alloc.x = flow;
    s.alloc.start = flow % total;
    if !in_sequence
        && set_candidate(cfg, s, s.alloc.start)
        && REVNAT.insert(&s.rn_key, &s.rn, BPF_NOEXIST as u64).is_ok()
    {
        // The common case of the flow hash's first candidate: no entry (no flow used it within
        // its hold). A plain hash refuses the insert of a taken key without side effects, so
        // no lookup first; anything else is for the tries.
        return Ok(0);
    }
    unsafe {
        bpf_loop(
            SNAT_TRIES,
            alloc_try as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    let st = &s.alloc;
    if st.taken != 0 {
        // A new owner after a failover derives the port from the flow: it finds only the
        // first candidate again.
        if s.svc_flags & SVC_F_CLUSTER_EGRESS != 0
            && s.rn_key.snat_port != cfg.snat_port_at(flow % range).to_be()
        {
            count(Counter::SnatNotFirstCandidate);
        }
        Ok(st.offset)
    } else if st.full != 0 {
        Err(AllocError::TableFull)
    } else {
        Err(AllocError::Exhausted)
    }
}

/// Whether the new flow takes its pair in sequence ([`next_in_sequence`]) rather than from its
/// hash: a TCP connection's SYN. Not a cluster egress flow, whose next owner after a failover
/// must find its port from the flow alone; not a flow recreated mid-stream (its conntrack entry
/// lost), for which only its old port keeps the connection; not UDP, whose flows are recreated
/// on the same tuple after an idle timeout and are best kept on their port.
#[inline(always)]
fn sequential(s: &crate::maps::Scratch) -> bool {
    s.pkt.tuple.proto == PROTO_TCP
        && s.pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && s.svc_flags & SVC_F_CLUSTER_EGRESS == 0
}

/// The next pair of the node-wide sequence, as a candidate index (`< range x addrs`, see
/// [`set_candidate`]). One counter for every CPU, Service and endpoint: a pair comes round again
/// only after every other pair was handed out once, so the one at the counter is the one idle
/// longest, for whatever endpoint. With a pool the sequence takes the addresses in turn, so
/// consecutive flows spread over all of them.
///
/// Advanced by compare-and-swap (BPF v1, which the programs are built for, has no add that
/// returns the old value), so no two flows are offered the same pair: the second would find it
/// claimed but its conntrack entry not written yet, and take it as a stale flow's. A CPU that
/// loses the swap twice in a row (others opening flows at that very moment) goes without.
#[inline(always)]
fn next_in_sequence(range: u32, addrs: u32) -> Option<u32> {
    let total = range.wrapping_mul(addrs);
    if total == 0 || addrs == 0 {
        return None;
    }
    let cursor = SNAT_CURSOR.get_ptr_mut(0)?;
    let seen = unsafe { core::ptr::read_volatile(cursor) };
    let n = match advance(cursor, seen) {
        Ok(()) => seen,
        // Another CPU took it: the one after, if nobody takes that first.
        Err(now) => advance(cursor, now).ok().map(|()| now)?,
    };
    let n = (n % total as u64) as u32;
    Some(n % addrs * range + n / addrs)
}

/// Moves the sequence on from `seen`; Err(the value another CPU moved it to) if it was not there.
#[inline(always)]
fn advance(cursor: *mut u64, seen: u64) -> Result<(), u64> {
    let (was, swapped) = unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::SeqCst },
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(cursor, seen, seen.wrapping_add(1))
    };
    if swapped { Ok(()) } else { Err(was) }
}

/// Takes the pair in `s.rn_key` for the new flow if it is free or usable, as one try of the
/// allocator would but without keeping it for a second opinion (in sequence, no other pair was
/// idle longer). The timestamp offset the flow needs on it, or None.
#[inline(always)]
fn take_in_sequence(cfg: &Config, s: &mut crate::maps::Scratch) -> Option<u32> {
    // Insert first: a pair no flow used within its hold has no entry, and a refused insert
    // leaves the bucket in cache for the lookup after it.
    match REVNAT.insert(&s.rn_key, &s.rn, BPF_NOEXIST as u64) {
        Ok(()) => return Some(0),
        Err(e) if e != -EEXIST => {
            s.alloc.full = 1;
            return None;
        }
        Err(_) => {}
    }
    let existing = unsafe { &mut *REVNAT.get_ptr_mut(&s.rn_key)? };
    match judge(cfg, &s.alloc, &s.rn, existing) {
        Verdict::Reusable(offset) => {
            let word = unsafe { core::ptr::read_volatile(closed_word(existing)) };
            claim(existing, word, &s.rn).then_some(offset)
        }
        Verdict::Stale => take_stale(cfg, s).then_some(0),
        Verdict::Busy | Verdict::HeldForOther => None,
    }
}

/// Points `s.rn_key` at the `idx`-th (address, port) pair (`idx < range x addresses`): ports
/// vary fastest, so with one address the pairs are the ports, in the order they always had, and
/// the address is `s.egress`. False when the pool no longer has that address (it shrank since
/// the allocation began): the candidate is skipped.
#[inline(always)]
fn set_candidate(cfg: &Config, s: &mut crate::maps::Scratch, idx: u32) -> bool {
    let range = cfg.snat_ports;
    if range == 0 {
        return false;
    }
    s.rn_key.snat_port = cfg.snat_port_at(idx % range).to_be();
    let member = idx / range;
    if member == 0 {
        s.rn_key.snat = s.egress;
        return true;
    }
    let Some(pool) = (unsafe { EGRESS_POOLS.get(&s.rn.service_id) }) else {
        return false;
    };
    if member >= pool.count {
        return false;
    }
    // Word by word: a copy between two map values becomes a byte-loop memmove call.
    let a = &pool.addrs[member as usize & (EGRESS_POOL_MAX - 1)];
    let [w0, w1, w2, w3] = a.words;
    if w0 | w1 | w2 | w3 == 0 {
        return false;
    }
    s.rn_key.snat.words = [w0, w1, w2, w3];
    true
}

/// The state of [`snat_alloc`]'s tries. In the per-CPU scratch, not on the stack (where
/// bpf_loop contexts usually live): the call chain's 512 bytes of stack have no room left.
#[repr(C)]
pub struct AllocLoop {
    now: u32,
    ticks: u32,
    /// The flow's probe sequence: the next random candidate.
    x: u32,
    /// First candidate, for pair sets walked one by one.
    start: u32,
    /// Candidate (address, port) pairs: SNAT ports x `addrs`.
    total: u32,
    /// Egress addresses the pairs span (1 without a pool); the event reports it.
    pub addrs: u32,
    /// The new flow's SYN: its TSval, and whether it has one.
    syn_ts: u32,
    has_ts: u32,
    /// Out: a pair was taken, with this timestamp offset.
    taken: u32,
    offset: u32,
    /// A candidate met a full reverse NAT table.
    full: u32,
    /// The first usable closed pair's port (net order; 0: none) and address, kept until the
    /// second candidate is seen: the one idle longer is taken.
    best_port: u16,
    pad: u16,
    best_addr: Addr,
    best_word: u64,
    best_offset: u32,
    pad32: u32,
}

/// One try of [`snat_alloc`]: 1 (stop) once a pair is taken or nothing can go on, else 0.
#[inline(never)]
extern "C" fn alloc_try(k: u64, _ctx: *mut c_void) -> i64 {
    let (Some(cfg), Some(s)) = (CONFIG.get(0), SCRATCH.get_ptr_mut(0)) else {
        return 1;
    };
    let s = unsafe { &mut *s };
    let total = s.alloc.total;
    if total == 0 {
        return 1;
    }
    let k = k as u32;
    let st = &mut s.alloc;
    let idx = if total <= SNAT_TRIES {
        (st.start + k) % total
    } else {
        st.x % total
    };
    st.x = next_candidate(st.x);
    if !set_candidate(cfg, s, idx) {
        count(Counter::SnatCollision);
        return 0;
    }
    // Look before inserting: an insert that finds the key taken still costs a lookup, and
    // taken ports are the common case once a busy range has filled with closed flows' ports.
    let verdict = match REVNAT.get_ptr_mut(&s.rn_key) {
        None => match REVNAT.insert(&s.rn_key, &s.rn, BPF_NOEXIST as u64) {
            // No entry: idle longer than any closed flow's port still held.
            Ok(()) => {
                s.alloc.taken = 1;
                return 1;
            }
            // Taken meanwhile by another CPU.
            Err(e) if e == -EEXIST => Verdict::Busy,
            Err(_) => {
                s.alloc.full = 1;
                Verdict::Busy
            }
        },
        Some(existing) => {
            let existing = unsafe { &mut *existing };
            judge(cfg, &s.alloc, &s.rn, existing)
        }
    };
    match verdict {
        Verdict::Stale => {
            if take_stale(cfg, s) {
                s.alloc.taken = 1;
                return 1;
            }
        }
        Verdict::Reusable(offset) => {
            let st = &mut s.alloc;
            let entry = REVNAT.get_ptr_mut(&s.rn_key);
            let word = match entry {
                Some(e) => unsafe { core::ptr::read_volatile(closed_word(&mut *e)) },
                None => 0,
            };
            if k == 0 && total > SNAT_TRIES {
                // Keep it; the next candidate may have been idle longer.
                st.best_port = s.rn_key.snat_port;
                st.best_addr = s.rn_key.snat;
                st.best_word = word;
                st.best_offset = offset;
                count(Counter::SnatCollision);
                return 0;
            }
            let here = st.ticks.wrapping_sub(word as u32);
            let best = st.ticks.wrapping_sub(st.best_word as u32);
            if st.best_port != 0 && best > here {
                if claim_best(s) {
                    return 1;
                }
            } else if let Some(e) = entry
                && claim(unsafe { &mut *e }, word, &s.rn)
            {
                s.alloc.taken = 1;
                s.alloc.offset = offset;
                return 1;
            }
        }
        Verdict::Busy | Verdict::HeldForOther => {
            if s.alloc.best_port != 0 && claim_best(s) {
                return 1;
            }
        }
    }
    // The kept candidate had its chance against the second one.
    s.alloc.best_port = 0;
    count(Counter::SnatCollision);
    0
}

const EEXIST: i32 = 17;

/// What a candidate port's entry allows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// In use, or closed too recently.
    Busy,
    /// Its flow ended without closing (gone, expired, or moved to another port).
    Stale,
    /// Its flow closed; a new flow may take it with this timestamp offset.
    Reusable(u32),
    /// Its flow closed and the endpoint may still hold it in TIME_WAIT, which the new flow could
    /// not pass: it waits out the hold.
    HeldForOther,
}

/// Whether a new flow (`rn`, its SYN's timestamp in `st`) may take the port of `existing`.
///
/// An endpoint that closed a flow first keeps it in TIME_WAIT and accepts a new SYN on the same
/// {address, port} pair only if its sequence number or its timestamp is newer (Linux,
/// tcp_timewait_state_process). A closed flow's port may therefore go to:
/// - a flow with TCP timestamps, when the closed one had them too: its timestamps are shifted to
///   continue after the last one the endpoint saw (offset, see [`crate::tcpts`]);
/// - the same client address and port (a reconnect): its sequence numbers continue;
/// - anyone once the hold is over ([`Config::snat_hold_ticks`]).
///
/// A few milliseconds after the close in every case ([`Config::snat_reuse_gap_ticks`]), so that
/// a late retransmission of the old flow finds it closed.
#[inline(always)]
fn judge(cfg: &Config, st: &AllocLoop, rn: &RevNatValue, existing: &RevNatValue) -> Verdict {
    let closed_at = existing.closed_at;
    if closed_at == 0 {
        return Verdict::Stale;
    }
    let age = st.ticks.wrapping_sub(closed_at);
    if age < cfg.snat_reuse_gap_ticks {
        return Verdict::Busy;
    }
    if existing.flags & RN_F_TIMESTAMPS != 0 && st.has_ts != 0 {
        return Verdict::Reusable(tcpts::offset_after(existing.ts_last, st.syn_ts));
    }
    let reconnect = existing.client == rn.client
        && existing.client_port == rn.client_port
        && existing.frontend == rn.frontend
        && existing.frontend_port == rn.frontend_port;
    if reconnect || age >= cfg.snat_hold_ticks(existing.flags) {
        return Verdict::Reusable(0);
    }
    count(Counter::SnatTimeWaitSkipped);
    Verdict::HeldForOther
}

/// The kept candidate of the first try (`alloc.best_*`), claimed if it is still as it was.
#[inline(always)]
fn claim_best(s: &mut crate::maps::Scratch) -> bool {
    s.rn_key.snat_port = s.alloc.best_port;
    s.rn_key.snat = s.alloc.best_addr;
    let Some(e) = REVNAT.get_ptr_mut(&s.rn_key) else {
        return false;
    };
    if !claim(unsafe { &mut *e }, s.alloc.best_word, &s.rn) {
        return false;
    }
    s.alloc.taken = 1;
    s.alloc.offset = s.alloc.best_offset;
    true
}

/// Takes the port of an open flow that ended without closing (`s.rn_key`'s entry), if that flow
/// is gone, expired, or moved to another port; its conntrack entry goes with it. Rare: replaced
/// through the map, so that of two CPUs taking the same port, one insert fails.
#[inline(always)]
fn take_stale(cfg: &Config, s: &mut crate::maps::Scratch) -> bool {
    let Some(existing) = (unsafe { REVNAT.get(&s.rn_key) }) else {
        return false;
    };
    let proto = s.rn_key.proto;
    s.old_key = existing.ct_key(proto);
    let (stale, owned) = match ct_get(&s.old_key) {
        None => (true, false),
        Some(ct) => {
            let owned = revnat_key(ct, proto) == s.rn_key;
            (!owned || cfg.ct_expired(proto, ct, s.alloc.now), owned)
        }
    };
    if !stale {
        return false;
    }
    let _ = REVNAT.remove(&s.rn_key);
    if REVNAT.insert(&s.rn_key, &s.rn, BPF_NOEXIST as u64).is_err() {
        return false;
    }
    if owned {
        let _ = CT.remove(&s.old_key);
        let _ = CT_NEW.remove(&s.old_key);
    }
    count(Counter::CtStaleReplaced);
    true
}

/// `closed_at` and `ts_last` of an entry, one aligned 8-byte word (map values are 8-byte
/// aligned; the layout is asserted in proxy-common).
#[inline(always)]
fn closed_word(e: &mut RevNatValue) -> *mut u64 {
    &mut e.closed_at as *mut u32 as *mut u64
}

/// Writes `rn` over the closed flow's entry `existing` if its close (`closed_at` and `ts_last`)
/// is still `seen`: one compare-and-swap to open, which only one CPU can win. Nothing else reads
/// the entry's other fields meanwhile but replies of the closed flow, which may as well be lost.
#[inline(always)]
fn claim(existing: &mut RevNatValue, seen: u64, rn: &RevNatValue) -> bool {
    if seen as u32 == 0 {
        return false;
    }
    // core's Atomic types offer no compare-and-swap on the BPF target, but the instruction
    // exists (BPF_CMPXCHG, kernel 5.12).
    let (_, swapped) = unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::SeqCst },
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(closed_word(existing), seen, 0)
    };
    if !swapped {
        return false;
    }
    existing.client = mem::addr(&rn.client);
    existing.frontend = mem::addr(&rn.frontend);
    existing.client_port = rn.client_port;
    existing.frontend_port = rn.frontend_port;
    existing.service_id = rn.service_id;
    existing.flags = rn.flags;
    count(Counter::SnatClosedPortReused);
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
