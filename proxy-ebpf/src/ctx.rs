//! Packet access for XDP and TC behind one trait, so the data path is written once.
//!
//! XDP sees raw frames: checksums are fixed by hand. TC sees skbs that may be CHECKSUM_PARTIAL
//! (local TCP with offload) or CHECKSUM_COMPLETE: there the kernel helpers must apply checksum
//! deltas, or the result is wrong in ways a test on raw bytes would not show.

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{
        bpf_l4_csum_replace, bpf_skb_adjust_room, bpf_skb_change_tail, bpf_skb_pull_data,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len,
    },
    programs::{TcContext, XdpContext},
};

use crate::csum;

/// Where a program runs. Decides how a finished packet leaves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// XDP on the uplink: traffic from outside (clients of NodePort/LB/externalIP, endpoint replies).
    Xdp,
    /// TC ingress on the uplink: whatever XDP passed on, or all traffic where XDP is not attached.
    TcIngress,
    /// TC egress on the uplink: pods and host processes talking to frontends.
    TcEgress,
    /// TC ingress on a pod's host-side veth: the pod's packets, before netfilter sees them (where
    /// kube-proxy's nftables mode drops ClusterIPs it does not know).
    PodIngress,
}

impl Hook {
    /// Whether endpoints' replies and ICMP errors arrive at this hook.
    pub const fn sees_replies(self) -> bool {
        matches!(self, Hook::Xdp | Hook::TcIngress)
    }
}

pub trait Ctx {
    const HOOK: Hook;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Whole packet length from the Ethernet header (TC: including non-linear parts).
    fn len(&self) -> u32;
    /// The device the program runs on.
    fn ifindex(&self) -> u32;
    /// The raw context pointer, for helpers that take it.
    fn raw(&self) -> *mut core::ffi::c_void;
    /// Makes at least `len` bytes (or the whole packet, if shorter) directly accessible.
    fn pull(&self, len: u32);
    /// Adds `delta` to the IPv4 header checksum at `off`.
    fn csum_l3(&self, off: usize, delta: u32) -> Result<(), ()>;
    /// Adds `delta` to the L4 checksum at `off`. `pseudo`: the delta comes from pseudo-header
    /// fields (addresses), which matters for offloaded checksums. `udp`: a zero field means "no
    /// checksum" and must stay zero; a computed zero is written as 0xffff.
    fn csum_l4(&self, off: usize, delta: u32, pseudo: bool, udp: bool) -> Result<(), ()>;
    /// [`Ctx::csum_l4`] for a pseudo-header delta and a plain one. Raw frames take their sum in
    /// one update; skbs need the two kinds apart.
    #[inline(always)]
    fn csum_l4_both(&self, off: usize, pseudo_delta: u32, delta: u32, udp: bool) -> Result<(), ()> {
        self.csum_l4(off, pseudo_delta, true, udp)?;
        self.csum_l4(off, delta, false, udp)
    }
    /// Opens `by` bytes of room in front of the IP header. The Ethernet header is left in an
    /// unspecified state (XDP moves the frame start), so callers rewrite it completely.
    fn make_room_before_ip(&self, by: u32) -> Result<(), ()>;
    /// Shrinks the packet to `new_len` bytes.
    fn truncate(&self, new_len: u32) -> Result<(), ()>;
    /// Adds (`delta` > 0) or removes room right after the Ethernet header, with
    /// `bpf_skb_adjust_room`'s encapsulation `flags` (TC only: XDP cannot).
    fn adjust_room(&self, delta: i32, flags: u64) -> Result<(), ()>;
    /// Marks a packet our programs are done with, on its way to a device's egress, where our
    /// egress program lets it go at once ([`TC_INDEX_DONE`]). XDP's frames never reach it.
    fn mark_done(&self) {}
}

/// Bit 15 of `skb->tc_index`: a packet one of our TC programs translated (or tunnelled) and
/// redirected to a device's egress, where our egress program (on the uplinks) would parse it and
/// look its flow up for nothing. No qdisc has read `tc_index` since dsmark went (Linux 6.3);
/// Cilium passes flags between its programs there too, from bit 0 up. Not set on replies sent
/// into a pod, which carry no trace of us into its namespace.
const TC_INDEX_DONE: u32 = 1 << 15;

/// Deepest offset the data path reads at. Bounding every offset explicitly matters: offsets kept
/// in the scratch map come back from memory with no bounds the verifier knows.
pub const MAX_PKT_OFF: usize = 1024;

/// A bounds-checked pointer to a `T` at `off` bytes into the packet.
///
/// Variable offsets must not be used with one-byte `T`: LLVM rewrites `p + 1 > end` into
/// `p >= end`, which the verifier cannot turn into a readable range for a variable pointer.
#[inline(always)]
pub fn ptr_at<C: Ctx, T>(ctx: &C, off: usize) -> Option<*mut T> {
    if off > MAX_PKT_OFF {
        return None;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn load<C: Ctx, T: Copy>(ctx: &C, off: usize) -> Option<T> {
    let p = ptr_at::<C, T>(ctx, off)?;
    Some(unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
pub fn store<C: Ctx, T: Copy>(ctx: &C, off: usize, v: T) -> Result<(), ()> {
    let p = ptr_at::<C, T>(ctx, off).ok_or(())?;
    unsafe { core::ptr::write_unaligned(p, v) };
    Ok(())
}

/// Adds a delta to a raw checksum field in place (XDP, and TC-built packets we own entirely).
#[inline(always)]
fn csum_fix_in_place<C: Ctx>(ctx: &C, off: usize, delta: u32, udp: bool) -> Result<(), ()> {
    let p = ptr_at::<C, u16>(ctx, off).ok_or(())?;
    let old = unsafe { core::ptr::read_unaligned(p) };
    if udp && old == 0 {
        return Ok(());
    }
    let mut new = csum::apply(old, delta);
    if udp && new == 0 {
        new = 0xffff;
    }
    unsafe { core::ptr::write_unaligned(p, new) };
    Ok(())
}

impl Ctx for XdpContext {
    const HOOK: Hook = Hook::Xdp;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        // Pointer arithmetic on data_end is not allowed; the helper knows the length.
        unsafe { bpf_xdp_get_buff_len(self.ctx) as u32 }
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.ctx).ingress_ifindex }
    }
    #[inline(always)]
    fn raw(&self) -> *mut core::ffi::c_void {
        self.ctx.cast()
    }
    #[inline(always)]
    fn pull(&self, _len: u32) {}
    #[inline(always)]
    fn csum_l3(&self, off: usize, delta: u32) -> Result<(), ()> {
        csum_fix_in_place(self, off, delta, false)
    }
    #[inline(always)]
    fn csum_l4(&self, off: usize, delta: u32, _pseudo: bool, udp: bool) -> Result<(), ()> {
        csum_fix_in_place(self, off, delta, udp)
    }
    #[inline(always)]
    fn csum_l4_both(&self, off: usize, pseudo_delta: u32, delta: u32, udp: bool) -> Result<(), ()> {
        csum_fix_in_place(self, off, csum::add(pseudo_delta, delta), udp)
    }
    #[inline(always)]
    fn make_room_before_ip(&self, by: u32) -> Result<(), ()> {
        let ret = unsafe { bpf_xdp_adjust_head(self.ctx, -(by as i32)) };
        if ret == 0 { Ok(()) } else { Err(()) }
    }
    #[inline(always)]
    fn adjust_room(&self, _delta: i32, _flags: u64) -> Result<(), ()> {
        Err(())
    }
    #[inline(always)]
    fn truncate(&self, new_len: u32) -> Result<(), ()> {
        let cur = Ctx::len(self);
        if new_len > cur {
            return Err(());
        }
        let delta = new_len as i32 - cur as i32;
        let ret = unsafe { bpf_xdp_adjust_tail(self.ctx, delta) };
        if ret == 0 { Ok(()) } else { Err(()) }
    }
}

/// TC ingress and egress share the skb implementation; only the hook differs.
pub struct TcIngress(pub TcContext);
pub struct TcEgress(pub TcContext);
pub struct TcPod(pub TcContext);

#[inline(always)]
fn skb(ctx: &TcContext) -> *mut __sk_buff {
    ctx.skb.skb
}

macro_rules! impl_tc_ctx {
    ($t:ty, $hook:expr) => {
        impl Ctx for $t {
            const HOOK: Hook = $hook;

            #[inline(always)]
            fn data(&self) -> usize {
                self.0.data()
            }
            #[inline(always)]
            fn data_end(&self) -> usize {
                self.0.data_end()
            }
            #[inline(always)]
            fn len(&self) -> u32 {
                self.0.len()
            }
            #[inline(always)]
            fn ifindex(&self) -> u32 {
                unsafe { (*skb(&self.0)).ifindex }
            }
            #[inline(always)]
            fn raw(&self) -> *mut core::ffi::c_void {
                skb(&self.0).cast()
            }
            #[inline(always)]
            fn pull(&self, len: u32) {
                let want = if len > self.0.len() {
                    self.0.len()
                } else {
                    len
                };
                if self.0.data() + want as usize > self.0.data_end() {
                    // Failure leaves the packet as it was; the bounds checks that follow decide.
                    let _ = unsafe { bpf_skb_pull_data(skb(&self.0), want) };
                }
            }
            /// In place: what `bpf_l3_csum_replace` writes, without a helper call. A
            /// CHECKSUM_COMPLETE sum stays right, as with the helper: the header with its
            /// checksum sums to the same before and after.
            #[inline(always)]
            fn csum_l3(&self, off: usize, delta: u32) -> Result<(), ()> {
                csum_fix_in_place(self, off, delta, false)
            }
            #[inline(always)]
            fn mark_done(&self) {
                unsafe { (*skb(&self.0)).tc_index |= TC_INDEX_DONE };
            }
            #[inline(always)]
            fn csum_l4(&self, off: usize, delta: u32, pseudo: bool, udp: bool) -> Result<(), ()> {
                let mut flags = 0u64;
                if pseudo {
                    flags |= BPF_F_PSEUDO_HDR as u64;
                }
                if udp {
                    flags |= BPF_F_MARK_MANGLED_0 as u64;
                }
                // Size 0 in the flags: `to` is a precomputed checksum delta.
                let ret = unsafe {
                    bpf_l4_csum_replace(skb(&self.0), off as u32, 0, delta as u64, flags)
                };
                if ret == 0 { Ok(()) } else { Err(()) }
            }
            #[inline(always)]
            fn make_room_before_ip(&self, by: u32) -> Result<(), ()> {
                let ret =
                    unsafe { bpf_skb_adjust_room(skb(&self.0), by as i32, BPF_ADJ_ROOM_MAC, 0) };
                if ret == 0 { Ok(()) } else { Err(()) }
            }
            #[inline(always)]
            fn truncate(&self, new_len: u32) -> Result<(), ()> {
                let ret = unsafe { bpf_skb_change_tail(skb(&self.0), new_len, 0) };
                if ret == 0 { Ok(()) } else { Err(()) }
            }
            #[inline(always)]
            fn adjust_room(&self, delta: i32, flags: u64) -> Result<(), ()> {
                let ret =
                    unsafe { bpf_skb_adjust_room(skb(&self.0), delta, BPF_ADJ_ROOM_MAC, flags) };
                if ret == 0 { Ok(()) } else { Err(()) }
            }
        }
    };
}

impl TcEgress {
    /// Whether one of our programs is done with the packet ([`Ctx::mark_done`]); clears the mark.
    #[inline(always)]
    pub fn take_done(&self) -> bool {
        let skb = skb(&self.0);
        let tc_index = unsafe { (*skb).tc_index };
        if tc_index & TC_INDEX_DONE == 0 {
            return false;
        }
        unsafe { (*skb).tc_index = tc_index & !TC_INDEX_DONE };
        true
    }
}

impl_tc_ctx!(TcIngress, Hook::TcIngress);
impl_tc_ctx!(TcEgress, Hook::TcEgress);
impl_tc_ctx!(TcPod, Hook::PodIngress);
