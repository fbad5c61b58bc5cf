//! ABI 2 (main up to 3ce4d89): the flow tables' layouts as that agent created them, frozen here
//! so that this agent can read them. Never change these: they describe maps already pinned on
//! nodes. Byte order as in `proxy_common` (addresses and ports as on the wire, the rest host).

use proxy_common::{
    Addr, CT_F_BACKEND_FIN, CT_F_ESTABLISHED, CT_F_RST, CT_F_SEEN_REPLY, CtValue, NextHop,
    PROTO_TCP, RN_F_ENDPOINT_TIME_WAIT, RevNatValue, ct_closed,
};

use super::Table;

/// CONFIG's value under ABI 2: only its first word, the ABI version, is read.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub abi_version: u32,
    pub rest: [u32; 15],
}

/// CT's value under ABI 2 (one LRU table for every flow, established or not). ABI 3 used
/// `reserved` for `ts_offset` and appended `tunnel_peer`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValueV2 {
    pub backend: Addr,
    pub snat: Addr,
    pub backend_id: u32,
    pub backend_generation: u32,
    pub service_id: u32,
    pub created: u32,
    pub last_seen: u32,
    pub backend_port: u16,
    pub snat_port: u16,
    /// `CT_F_*` bits 1, 2, 4 and 8 (the same meaning in ABI 3).
    pub flags: u8,
    pub kind: u8,
    pub pad: [u8; 2],
    pub reserved: u32,
    pub to_backend: NextHop,
    pub to_client: NextHop,
}

/// REVNAT's value under ABI 2 (an LRU table: a closed flow's port was held by its CT entry).
/// ABI 3 appended how and when the flow closed, and the tunnel peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValueV2 {
    pub client: Addr,
    pub frontend: Addr,
    pub client_port: u16,
    pub frontend_port: u16,
    pub service_id: u32,
}

// SAFETY: plain #[repr(C)] integers with no implicit padding (checked below).
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for CtValueV2 {}
unsafe impl aya::Pod for RevNatValueV2 {}

const _: () = {
    assert!(core::mem::size_of::<Config>() == 64);
    assert!(core::mem::size_of::<CtValueV2>() == 104);
    assert!(core::mem::size_of::<RevNatValueV2>() == 40);
};

/// An ABI 2 flow in this version's tables: answered flows are established (CT), the others still
/// wait for their first answer (CT_NEW), where a SYN flood cannot evict established flows.
pub fn ct(old: &CtValueV2) -> (CtValue, Table) {
    let mut flags = old.flags & 0x0f;
    let table = if flags & CT_F_SEEN_REPLY != 0 {
        flags |= CT_F_ESTABLISHED;
        Table::Established
    } else {
        Table::New
    };
    let value = CtValue {
        backend: old.backend,
        snat: old.snat,
        backend_id: old.backend_id,
        backend_generation: old.backend_generation,
        service_id: old.service_id,
        created: old.created,
        last_seen: old.last_seen,
        backend_port: old.backend_port,
        snat_port: old.snat_port,
        flags,
        kind: old.kind,
        pad: [0; 2],
        ts_offset: 0,
        to_backend: old.to_backend,
        to_client: old.to_client,
        tunnel_peer: Addr::default(),
    };
    (value, table)
}

/// An ABI 2 SNAT port entry of protocol `proto` given its flow (`flow`: the flow's ABI 2 CT
/// flags, None if the flow is no longer tracked). ABI 3 holds a closed TCP flow's port in REVNAT
/// itself (`closed_at`); a flow that closed under ABI 2 is held from `now` (ticks), as if it had
/// just closed. Who sent the first FIN is not recorded there: a flow the endpoint finished is
/// assumed to leave it in TIME_WAIT (the longer hold), as is a TCP entry whose flow is gone. A
/// UDP entry whose flow is gone frees its port (None), as ABI 3 does when a UDP flow ends.
pub fn revnat(old: &RevNatValueV2, proto: u8, flow: Option<u8>, now: u32) -> Option<RevNatValue> {
    if proto != PROTO_TCP && flow.is_none() {
        return None;
    }
    let hold = match flow {
        Some(flags) if !ct_closed(flags) => None,
        Some(flags) if flags & CT_F_RST != 0 => Some(0),
        Some(flags) if flags & CT_F_BACKEND_FIN != 0 => Some(RN_F_ENDPOINT_TIME_WAIT),
        Some(_) => Some(0),
        None => Some(RN_F_ENDPOINT_TIME_WAIT),
    };
    let (closed_at, flags) = match hold {
        // 0 marks an open flow: a hold starts at a non-zero tick, as the data path's clock does.
        Some(flags) => (now | 1, flags),
        None => (0, 0),
    };
    Some(RevNatValue {
        client: old.client,
        frontend: old.frontend,
        client_port: old.client_port,
        frontend_port: old.frontend_port,
        service_id: old.service_id,
        closed_at,
        ts_last: 0,
        flags,
        pad: 0,
        pad16: 0,
        tunnel_v4: 0,
    })
}
