//! Where a translated packet goes next: a FIB lookup decides between sending it out ourselves and
//! handing it to the kernel.

pub use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_fib_lookup,
};
use proxy_common::{Addr, NEXT_HOP_CACHE_SECS, NextHop};

use crate::{ctx::Ctx, maps::ROUTE_CACHE, mem};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The outcome of a route lookup; next hop details stay in the lookup parameters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Next hop known: out of `params.ifindex` with `params.smac`/`params.dmac`.
    Out,
    /// Route known but the neighbour is not resolved yet (TC can let the kernel resolve it).
    NoNeigh,
    /// The destination is this node.
    Local,
    /// No usable route (unreachable, blackhole, prohibited, forwarding disabled).
    None,
}

/// Looks up the route for a packet from `src` to `dst` as if it arrived on the program's device.
#[inline(always)]
pub fn route<C: Ctx>(ctx: &C, p: &mut FibParams, v6: bool, src: &Addr, dst: &Addr) -> Route {
    // The first eight bytes (family, protocol, ports, length) in one store: field by field,
    // LLVM merges the zero stores into an odd-sized memset call.
    let head = p as *mut FibParams as *mut u64;
    unsafe { core::ptr::write(head, if v6 { AF_INET6 } else { AF_INET } as u64) };
    p.__bindgen_anon_2.flowinfo = 0;
    p.__bindgen_anon_5.tbid = 0;
    p.ifindex = ctx.ifindex();
    if v6 {
        p.__bindgen_anon_3.ipv6_src = src.words;
        p.__bindgen_anon_4.ipv6_dst = dst.words;
    } else {
        p.__bindgen_anon_3.ipv4_src = src.words[3];
        p.__bindgen_anon_4.ipv4_dst = dst.words[3];
    }
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.raw(),
            p as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Out,
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeigh,
        BPF_FIB_LKUP_RET_NOT_FWDED => Route::Local,
        _ => Route::None,
    }
}

/// The cached next hop if it is fresh, loaded into `p` as a lookup would have left it.
#[inline(always)]
pub fn cached(hop: &NextHop, now: u32, p: &mut FibParams) -> Option<Route> {
    if hop.stamp == 0 || now.wrapping_sub(hop.stamp) >= NEXT_HOP_CACHE_SECS {
        return None;
    }
    p.ifindex = hop.ifindex;
    copy_mac(&mut p.smac, &hop.smac);
    copy_mac(&mut p.dmac, &hop.dmac);
    Some(Route::Out)
}

/// Remembers a resolved next hop (only complete answers are worth remembering).
#[inline(always)]
pub fn remember(hop: &mut NextHop, r: Route, now: u32, p: &FibParams) {
    if r == Route::Out {
        hop.ifindex = p.ifindex;
        hop.stamp = now.max(1);
        copy_mac(&mut hop.smac, &p.smac);
        copy_mac(&mut hop.dmac, &p.dmac);
    }
}

/// The route from a flow's cache, else from the FIB (and cached).
#[inline(always)]
pub fn route_cached<C: Ctx>(
    ctx: &C,
    p: &mut FibParams,
    hop: &mut NextHop,
    now: u32,
    v6: bool,
    src: &Addr,
    dst: &Addr,
) -> Route {
    if let Some(r) = cached(hop, now, p) {
        return r;
    }
    let r = route(ctx, p, v6, src, dst);
    remember(hop, r, now, p);
    r
}

/// Slots of the per-CPU cache of new flows' routes ([`route_new`]); a power of two.
pub const ROUTE_CACHE_SLOTS: u32 = 1024;

/// A route a new flow was given: to `dst` from `src`, asked for a packet that arrived on
/// `in_ifindex` (policy routing may look at it).
#[repr(C)]
pub struct RouteCacheEntry {
    in_ifindex: u32,
    pad: u32,
    src: Addr,
    dst: Addr,
    hop: NextHop,
    pad2: u32,
}

/// A new flow's route to its endpoint `dst` (`slot`: the endpoint's backend id): the FIB's
/// answer for the same endpoint, egress address and arrival device if one was found within
/// NEXT_HOP_CACHE_SECS on this CPU (as long as a flow trusts its own), else the FIB's now.
/// Thousands of new flows a second to one endpoint would otherwise each ask the FIB the same
/// question, a tenth of a new flow's cost.
#[inline(always)]
pub fn route_new<C: Ctx>(
    ctx: &C,
    p: &mut FibParams,
    now: u32,
    v6: bool,
    src: &Addr,
    dst: &Addr,
    slot: u32,
) -> Route {
    let Some(e) = ROUTE_CACHE.get_ptr_mut(slot & (ROUTE_CACHE_SLOTS - 1)) else {
        return route(ctx, p, v6, src, dst);
    };
    let e = unsafe { &mut *e };
    let in_ifindex = ctx.ifindex();
    if e.in_ifindex == in_ifindex
        && e.dst == *dst
        && e.src == *src
        && let Some(r) = cached(&e.hop, now, p)
    {
        return r;
    }
    let r = route(ctx, p, v6, src, dst);
    if r == Route::Out {
        e.in_ifindex = in_ifindex;
        e.src = mem::addr(src);
        e.dst = mem::addr(dst);
        remember(&mut e.hop, r, now, p);
    }
    r
}

/// A MAC address as one u32 and one u16 store: LLVM turns a plain 6-byte copy between two map
/// values it cannot tell apart into a byte-loop memmove call.
#[inline(always)]
fn copy_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
    unsafe {
        let hi = core::ptr::read_unaligned(src.as_ptr() as *const u32);
        let lo = core::ptr::read_unaligned(src.as_ptr().add(4) as *const u16);
        core::ptr::write_unaligned(dst.as_mut_ptr() as *mut u32, hi);
        core::ptr::write_unaligned(dst.as_mut_ptr().add(4) as *mut u16, lo);
    }
}
