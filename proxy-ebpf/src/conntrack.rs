//! Connection tracking: timeouts by protocol and TCP state, the two tables (new and established),
//! flow teardown.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use proxy_common::*;

use crate::{
    maps::{CT, CT_NEW, REVNAT},
    mem,
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
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

/// The fine clock SNAT port holds are kept in ([`Config::hz`] ticks a second): jiffies, or
/// milliseconds of the coarse ktime where the agent found no tick length. Never 0, which marks
/// an open flow's port.
#[inline(always)]
pub fn now_ticks(cfg: &Config) -> u32 {
    let t = if cfg.clock_mult == 0 {
        (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000) as u32
    } else {
        (unsafe { bpf_jiffies64() }) as u32
    };
    t | 1
}

/// Where a flow lives: established flows in CT, the others in CT_NEW.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Established,
    New,
}

/// The flow of `key` and its table: CT first (established flows, the common case), then CT_NEW.
#[inline(always)]
pub fn ct_lookup(key: &CtKey) -> Option<(*mut CtValue, Table)> {
    if let Some(ct) = CT.get_ptr_mut(key) {
        return Some((ct, Table::Established));
    }
    CT_NEW.get_ptr_mut(key).map(|ct| (ct, Table::New))
}

/// As [`ct_lookup`], CT_NEW first: for a handshake's packets, whose flow has not completed it.
#[inline(always)]
pub fn ct_lookup_new_first(key: &CtKey) -> Option<(*mut CtValue, Table)> {
    if let Some(ct) = CT_NEW.get_ptr_mut(key) {
        return Some((ct, Table::New));
    }
    CT.get_ptr_mut(key).map(|ct| (ct, Table::Established))
}

/// Whether the flow `ct` is (still) tracked in either table, for SNAT ports' owners.
#[inline(always)]
pub fn ct_get(key: &CtKey) -> Option<&'static CtValue> {
    match unsafe { CT.get(key) } {
        Some(ct) => Some(ct),
        None => unsafe { CT_NEW.get(key) },
    }
}

/// A packet from the client on a flow the endpoint has answered completes it: TCP's handshake
/// ACK (or anything later), UDP's next datagram.
#[inline(always)]
pub fn completes(proto: u8, tcp_flags: u8, ct: &CtValue) -> bool {
    ct.flags & CT_F_SEEN_REPLY != 0
        && (proto != PROTO_TCP || tcp_flags & (TCP_SYN | TCP_RST) == 0 && tcp_flags & TCP_ACK != 0)
}

/// Moves a completed flow from CT_NEW to CT. `ct` is the scratch copy of the entry, already
/// brought up to date for this packet. False if CT had no room and no entry to give (the flow
/// then stays in CT_NEW, which still forwards it).
#[inline(always)]
pub fn promote(key: &CtKey, ct: &mut CtValue) -> bool {
    ct.flags |= CT_F_ESTABLISHED;
    if CT.insert(key, &*ct, BPF_NOEXIST as u64).is_err() {
        return false;
    }
    let _ = CT_NEW.remove(key);
    count(Counter::CtEstablished);
    true
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

/// Refreshes the entry (written in place: the value lives in the map). Returns the `RN_F_*`
/// flags of the SNAT port's hold if this packet closed the flow, else None.
#[inline(always)]
pub fn touch(ct: &mut CtValue, now: u32, flags: u8) -> Option<u8> {
    if ct.last_seen != now {
        ct.last_seen = now;
    }
    let old = ct.flags;
    if old & flags == flags {
        return None;
    }
    ct.flags = old | flags;
    if ct_closed(old) || !ct_closed(old | flags) {
        return None;
    }
    // The side that sent the first FIN holds TIME_WAIT. A reset leaves no state anywhere.
    let endpoint_first = flags & CT_F_RST == 0 && old & CT_F_BACKEND_FIN != 0;
    Some(if endpoint_first {
        RN_F_ENDPOINT_TIME_WAIT
    } else {
        0
    })
}

#[inline(always)]
pub fn revnat_key(ct: &CtValue, proto: u8) -> RevNatKey {
    RevNatKey {
        backend: mem::addr(&ct.backend),
        snat: mem::addr(&ct.snat),
        backend_port: ct.backend_port,
        snat_port: ct.snat_port,
        proto,
        pad: 0,
        pad16: 0,
    }
}

/// Whether the reverse NAT entry `rn` belongs to the flow `key`.
#[inline(always)]
pub fn owns(rn: &RevNatValue, key: &CtKey) -> bool {
    rn.client == key.src
        && rn.client_port == key.sport
        && rn.frontend == key.dst
        && rn.frontend_port == key.dport
}

/// Marks the SNAT port of a flow that just closed (`rn_flags`: how; `ts_last`: the last TCP
/// timestamp the endpoint saw, with `RN_F_TIMESTAMPS`) as held. `closed_at` last: the allocator
/// claims closed entries by it.
#[inline(always)]
pub fn hold_port(rn: &mut RevNatValue, ticks: u32, rn_flags: u8, ts_last: u32) {
    rn.flags = rn_flags | rn.flags & RN_F_FROM_POD;
    rn.ts_last = ts_last;
    rn.closed_at = ticks;
}

/// Marks the port of the closed flow `key` as held, if that port is still the flow's.
#[inline(always)]
pub fn hold_port_of(key: &CtKey, ct: &CtValue, ticks: u32, rn_flags: u8, ts_last: u32) {
    let rk = revnat_key(ct, key.proto);
    if let Some(rn) = REVNAT.get_ptr_mut(&rk) {
        let rn = unsafe { &mut *rn };
        if owns(rn, key) && !rn.is_closed() {
            hold_port(rn, ticks, rn_flags, ts_last);
        }
    }
}

/// Ends a flow. A TCP flow's SNAT port stays held for its client (see
/// [`RevNatValue::closed_at`]), unless it already serves another flow; a UDP flow's port is free.
#[inline(always)]
pub fn delete_flow(key: &CtKey, ct: &CtValue, table: Table, ticks: u32) {
    let rk = revnat_key(ct, key.proto);
    if let Some(rn) = REVNAT.get_ptr_mut(&rk) {
        let rn = unsafe { &mut *rn };
        if owns(rn, key) {
            if key.proto == PROTO_TCP {
                if !rn.is_closed() {
                    hold_port(rn, ticks, 0, 0);
                }
            } else {
                let _ = REVNAT.remove(&rk);
            }
        }
    }
    let _ = match table {
        Table::Established => CT.remove(key),
        Table::New => CT_NEW.remove(key),
    };
}
