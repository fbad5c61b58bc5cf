//! Connection tracking: timeouts by protocol and TCP state, flow teardown.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use proxy_common::*;

use crate::{
    maps::{CT, REVNAT},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Seconds of CLOCK_MONOTONIC, the clock the agent uses to age entries too. From jiffies, which
/// the verifier inlines into a load, where the coarse ktime helper costs as much as a hash lookup.
#[inline(always)]
pub fn now_secs(cfg: &Config) -> u32 {
    if cfg.clock_mult == 0 {
        return (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32;
    }
    cfg.clock_secs(unsafe { bpf_jiffies64() })
}

/// A SYN without ACK on a closed flow's tuple is a new connection: it chooses again.
#[inline(always)]
pub fn is_reopen(proto: u8, tcp_flags: u8, ct: &CtValue) -> bool {
    proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && ct_closed(ct.flags)
}

/// CT flag bits a packet of `proto` with `tcp_flags` sets (none but for TCP).
#[inline(always)]
pub fn ct_flags(proto: u8, tcp_flags: u8, from_backend: bool) -> u8 {
    if proto != PROTO_TCP {
        return 0;
    }
    let mut f = 0;
    if tcp_flags & TCP_RST != 0 {
        f |= CT_F_RST;
    }
    if tcp_flags & TCP_FIN != 0 {
        f |= if from_backend {
            CT_F_BACKEND_FIN
        } else {
            CT_F_CLIENT_FIN
        };
    }
    f
}

/// Refreshes the entry. Written in place: the value lives in the LRU map.
#[inline(always)]
pub fn touch(ct: &mut CtValue, now: u32, flags: u8) {
    if ct.last_seen != now {
        ct.last_seen = now;
    }
    if ct.flags & flags != flags {
        ct.flags |= flags;
    }
}

#[inline(always)]
pub fn revnat_key(ct: &CtValue, proto: u8) -> RevNatKey {
    RevNatKey {
        backend: ct.backend,
        snat: ct.snat,
        backend_port: ct.backend_port,
        snat_port: ct.snat_port,
        proto,
        pad: 0,
        pad16: 0,
    }
}

/// Removes a flow and its reverse NAT entry, unless that SNAT port already serves another flow.
#[inline(always)]
pub fn delete_flow(key: &CtKey, ct: &CtValue) {
    let rk = revnat_key(ct, key.proto);
    if let Some(rn) = unsafe { REVNAT.get(&rk) }
        && rn.client == key.src
        && rn.client_port == key.sport
        && rn.frontend == key.dst
        && rn.frontend_port == key.dport
    {
        let _ = REVNAT.remove(&rk);
    }
    let _ = CT.remove(key);
}
