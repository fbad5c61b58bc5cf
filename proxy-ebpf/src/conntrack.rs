//! Connection tracking: timeouts by protocol and TCP state, flow teardown.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use proxy_common::*;

use crate::{
    maps::{CT, REVNAT},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Seconds of CLOCK_MONOTONIC, the clock the agent uses to age entries too.
#[inline(always)]
pub fn now_secs() -> u32 {
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
pub fn is_closed(flags: u8) -> bool {
    flags & CT_F_RST != 0
        || flags & (CT_F_CLIENT_FIN | CT_F_BACKEND_FIN) == (CT_F_CLIENT_FIN | CT_F_BACKEND_FIN)
}

#[inline(always)]
pub fn timeout(cfg: &Config, proto: u8, flags: u8) -> u32 {
    if proto == PROTO_TCP {
        if is_closed(flags) {
            cfg.tcp_closing_timeout
        } else if flags & CT_F_SEEN_REPLY == 0 {
            cfg.tcp_syn_timeout
        } else {
            cfg.tcp_established_timeout
        }
    } else if flags & CT_F_SEEN_REPLY != 0 {
        cfg.udp_stream_timeout
    } else {
        cfg.udp_timeout
    }
}

#[inline(always)]
pub fn is_expired(cfg: &Config, proto: u8, ct: &CtValue, now: u32) -> bool {
    now.wrapping_sub(ct.last_seen) > timeout(cfg, proto, ct.flags)
}

/// A SYN without ACK on a closed flow's tuple is a new connection: it chooses again.
#[inline(always)]
pub fn is_reopen(proto: u8, tcp_flags: u8, ct: &CtValue) -> bool {
    proto == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && is_closed(ct.flags)
}

/// CT flag bits a TCP segment sets.
#[inline(always)]
pub fn tcp_ct_flags(tcp_flags: u8, from_backend: bool) -> u8 {
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
