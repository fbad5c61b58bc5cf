//! TCP timestamps (RFC 7323) of flows on reused SNAT ports.
//!
//! An endpoint that closed a connection first keeps it in TIME_WAIT for a minute (Linux) and
//! accepts a new SYN on the same {address, port} pair only if its sequence number or its
//! timestamp is newer than the old connection's. Clients randomise both per connection (on 6.x
//! kernels, per 4-tuple: measured), so a SNAT port reused by another connection is refused about
//! half the time. A flow on such a port gets a timestamp offset: its TSvals toward the endpoint
//! continue where the port's previous flow stopped, and the endpoint's TSecrs are shifted back
//! for the client. See DESIGN.md, "SNAT ports".

use crate::{
    csum,
    ctx::{Ctx, load, ptr_at, store},
    parse::{Pkt, TCP_HLEN, TCP_SYN},
};

const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_WINDOW_SCALE: u8 = 3;
const OPT_SACK_PERMITTED: u8 = 4;
const OPT_TIMESTAMP: u8 = 8;
const TIMESTAMP_LEN: u8 = 10;

/// Option bytes as they are in memory, read as one integer.
const fn raw2(a: u8, b: u8) -> u16 {
    u16::from_ne_bytes([a, b])
}
const fn raw4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_ne_bytes([a, b, c, d])
}

/// NOP, NOP, timestamp: the first option of every segment after the handshake that carries a
/// timestamp, from Linux, Windows, the BSDs and macOS alike.
const NOP_NOP_TS: u32 = raw4(OPT_NOP, OPT_NOP, OPT_TIMESTAMP, TIMESTAMP_LEN);
const MSS4: u16 = raw2(OPT_MSS, 4);
const TS10: u16 = raw2(OPT_TIMESTAMP, TIMESTAMP_LEN);
/// What follows the MSS option in a Linux SYN or SYN-ACK: SACK permitted, or two NOPs without it.
const SACK_OK: u16 = raw2(OPT_SACK_PERMITTED, 2);
const NOP_NOP: u16 = raw2(OPT_NOP, OPT_NOP);
/// What follows the MSS option in a macOS/BSD SYN: NOP, window scale (3 bytes), NOP, NOP.
const NOP_WSCALE: u16 = raw2(OPT_NOP, OPT_WINDOW_SCALE);

/// Offset of the TSval field (TSecr follows it) of the TCP segment `pkt`, if it has one where
/// the common stacks put it: first after the header (NOP, NOP, timestamp) in every segment after
/// the handshake; after MSS and SACK-permitted (or two NOPs) in Linux's SYN and SYN-ACK; after
/// MSS, NOP, window scale and two NOPs in macOS's and the BSDs'.
///
/// Fixed places, not a walk over the options: a walk inlined where the data path looks for
/// timestamps made the verifier walk six times as many instructions. A SYN with its timestamp
/// elsewhere counts as having none (its flow then only takes free ports); a flow's later segments
/// from the same stack put theirs first.
#[inline(always)]
pub fn find<C: Ctx>(ctx: &C, pkt: &Pkt) -> Option<usize> {
    let hlen = pkt.tcp_hlen as usize;
    if hlen < TCP_HLEN + 12 || !pkt.has_l4() {
        return None;
    }
    let o = pkt.l4_off + TCP_HLEN;
    // One bounds check for the bytes looked at, then constant offsets from it: checked one by
    // one, LLVM rebases the offsets in ways the verifier cannot follow.
    let first = ptr_at::<C, [u8; 12]>(ctx, o)? as *const u8;
    if at::<u32>(first, 0) == NOP_NOP_TS {
        return Some(o + 4);
    }
    if pkt.tcp_flags & TCP_SYN == 0 || hlen < TCP_HLEN + 20 {
        return None;
    }
    let syn = ptr_at::<C, [u8; 20]>(ctx, o)? as *const u8;
    if at::<u16>(syn, 0) != MSS4 {
        return None;
    }
    let after_mss = at::<u16>(syn, 4);
    if (after_mss == SACK_OK || after_mss == NOP_NOP) && at::<u16>(syn, 6) == TS10 {
        return Some(o + 8);
    }
    if after_mss == NOP_WSCALE && at::<u32>(syn, 8) == NOP_NOP_TS {
        return Some(o + 12);
    }
    None
}

/// A `T` at constant `off` bytes from a bounds-checked packet pointer `p`.
#[inline(always)]
fn at<T: Copy>(p: *const u8, off: usize) -> T {
    unsafe { core::ptr::read_unaligned(p.add(off) as *const T) }
}

/// The TSval (host order) at `off`.
#[inline(always)]
pub fn tsval<C: Ctx>(ctx: &C, off: usize) -> Option<u32> {
    load::<C, u32>(ctx, off).map(u32::from_be)
}

/// Adds `delta` to the 32-bit field at `off` (TSval forward, TSecr with the negated offset
/// backward) and to the TCP checksum of the segment at `l4_off`.
#[inline(always)]
pub fn shift<C: Ctx>(ctx: &C, l4_off: usize, off: usize, delta: u32) -> Result<(), ()> {
    let old = load::<C, u32>(ctx, off).ok_or(())?;
    let new = u32::from_be(old).wrapping_add(delta).to_be();
    store(ctx, off, new)?;
    ctx.csum_l4(l4_off + 16, csum::diff32(old, new), false, false)
}

/// The offset that makes a SYN whose TSval is `syn` follow `last`, the last TSval the endpoint
/// saw on the port: 0 when it already does.
#[inline(always)]
pub fn offset_after(last: u32, syn: u32) -> u32 {
    if (syn.wrapping_sub(last) as i32) > 0 {
        0
    } else {
        last.wrapping_add(1).wrapping_sub(syn)
    }
}
