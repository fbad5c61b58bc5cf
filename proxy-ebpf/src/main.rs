//! extproxy data path: DNAT from Service frontends to external endpoints, SNAT to the node's
//! egress IP, own conntrack, reverse translation of replies and ICMP errors.
//!
//! Entry points are thin: `datapath::process` decides, the hook turns its `Action` into a verdict.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Compare-and-swap (nat::claim): core's Atomic types have none on the BPF target.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// Map helpers take `impl Borrow<K>`: passing keys by value, as this lint suggests, copies them
// onto a stack that holds 512 bytes for the whole call chain.
#![allow(clippy::needless_borrows_for_generic_args)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod datapath;
#[cfg(target_arch = "bpf")]
mod fwd;
#[cfg(target_arch = "bpf")]
mod hdr;
#[cfg(target_arch = "bpf")]
mod health;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod mem;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod tcpts;
#[cfg(target_arch = "bpf")]
mod tunnel;

#[cfg(target_arch = "bpf")]
mod entry {
    use aya_ebpf::{
        bindings::{BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
        helpers::{bpf_redirect, bpf_redirect_neigh},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };

    use crate::{
        ctx::{Ctx, TcEgress, TcIngress, TcPod},
        datapath::{Action, Verdict, process},
        maps::SCRATCH,
        parse::{Parsed, parse},
        stats::count,
    };
    use proxy_common::Counter;

    #[xdp]
    pub fn extproxy_xdp(ctx: XdpContext) -> u32 {
        match process(&ctx).verdict() {
            Verdict::Pass => xdp_action::XDP_PASS,
            Verdict::Drop => xdp_action::XDP_DROP,
            Verdict::Tx => xdp_action::XDP_TX,
            Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
            // Not produced at XDP: the datapath passes such packets on to TC instead.
            Verdict::RedirectNeigh(_) | Verdict::RedirectIngress(_) | Verdict::RedirectPod(_) => {
                xdp_action::XDP_PASS
            }
        }
    }

    #[inline(always)]
    fn tc_verdict<C: Ctx>(ctx: &C, action: Action) -> i32 {
        let verdict = action.verdict();
        if matches!(
            verdict,
            Verdict::Tx | Verdict::Redirect(_) | Verdict::RedirectNeigh(_)
        ) {
            ctx.mark_done();
        }
        match verdict {
            Verdict::Pass => TC_ACT_OK,
            Verdict::Drop => TC_ACT_SHOT,
            Verdict::Tx => unsafe { bpf_redirect(ctx.ifindex(), 0) as i32 },
            Verdict::Redirect(ifindex) | Verdict::RedirectPod(ifindex) => unsafe {
                bpf_redirect(ifindex, 0) as i32
            },
            Verdict::RedirectNeigh(ifindex) => unsafe {
                bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
            },
            Verdict::RedirectIngress(ifindex) => unsafe {
                bpf_redirect(ifindex, BPF_F_INGRESS as u64) as i32
            },
        }
    }

    #[classifier]
    pub fn extproxy_tc_ingress(ctx: TcContext) -> i32 {
        let ctx = TcIngress(ctx);
        let action = process(&ctx);
        tc_verdict(&ctx, action)
    }

    #[classifier]
    pub fn extproxy_tc_egress(ctx: TcContext) -> i32 {
        let ctx = TcEgress(ctx);
        // Translated (or tunnelled) by one of our programs already: on its way out as it is.
        if ctx.take_done() {
            count(Counter::EgressAlreadyTranslated);
            return TC_ACT_OK;
        }
        let action = process(&ctx);
        tc_verdict(&ctx, action)
    }

    /// Pods' own packets at their host-side veth, translated before netfilter: kube-proxy's
    /// nftables mode drops traffic to ClusterIPs it does not serve in the forward hook.
    #[classifier]
    pub fn extproxy_tc_pod(ctx: TcContext) -> i32 {
        let ctx = TcPod(ctx);
        let action = process(&ctx);
        tc_verdict(&ctx, action)
    }

    /// Parses like the real programs and passes: the floor the benchmarks compare against.
    #[xdp]
    pub fn extproxy_parse_only(ctx: XdpContext) -> u32 {
        let Some(s) = SCRATCH.get_ptr_mut(0) else {
            return xdp_action::XDP_PASS;
        };
        let pkt = unsafe { &mut (*s).pkt };
        match parse(&ctx, pkt) {
            // Keeps the parse from being optimised away; port 0 never occurs in our tests.
            Parsed::Pkt if pkt.tuple.dport == 0 && pkt.tuple.sport == 0 => xdp_action::XDP_DROP,
            _ => xdp_action::XDP_PASS,
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
