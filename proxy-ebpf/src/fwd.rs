//! Where a translated packet goes next: a FIB lookup decides between sending it out ourselves and
//! handing it to the kernel.

pub use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_fib_lookup,
};
use proxy_common::Addr;

use crate::ctx::Ctx;

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
    *p = unsafe { core::mem::zeroed() };
    p.ifindex = ctx.ifindex();
    if v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = src.words;
        p.__bindgen_anon_4.ipv6_dst = dst.words;
    } else {
        p.family = AF_INET;
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
