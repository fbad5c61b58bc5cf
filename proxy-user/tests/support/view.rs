//! What the maps hold, read back per Service port: the assertions of the Kubernetes tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use extproxy::reconcile::{MapOp, MapSnapshot, MapState, MapWriter};
use extproxy::translate::{IpFamily, Protocol, ServicePortKey};
use proxy_common::user::port_host;
use proxy_common::{BackendState, FE_F_SOURCE_RANGES, FrontendKind};

use super::Model;

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn key(namespace: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortKey {
    ServicePortKey {
        namespace: namespace.into(),
        name: name.into(),
        port_name: port.into(),
        protocol,
        family: IpFamily::V4,
    }
}

pub fn endpoints<W: MapWriter>(
    m: &Model<W>,
    k: &ServicePortKey,
) -> BTreeMap<(IpAddr, u16), &'static str> {
    let Some(id) = m.reconciler.service_id(k) else {
        return BTreeMap::new();
    };
    m.state()
        .backends
        .values()
        .filter(|b| b.service_id == id && b.state != BackendState::Free as u8)
        .map(|b| {
            let state = if b.state == BackendState::Active as u8 {
                "active"
            } else {
                "draining"
            };
            ((b.addr.to_ip(), port_host(b.port)), state)
        })
        .collect()
}

pub fn eps(list: &[(&str, u16, &'static str)]) -> BTreeMap<(IpAddr, u16), &'static str> {
    list.iter().map(|(a, p, s)| ((ip(a), *p), *s)).collect()
}

pub fn frontends<W: MapWriter>(
    m: &Model<W>,
    k: &ServicePortKey,
) -> Vec<(IpAddr, u16, FrontendKind, bool)> {
    let Some(id) = m.reconciler.service_id(k) else {
        return Vec::new();
    };
    let mut out: Vec<_> = m
        .state()
        .frontends
        .iter()
        .filter(|(_, v)| v.service_id == id)
        .map(|(fk, v)| {
            (
                fk.addr.to_ip(),
                port_host(fk.port),
                FrontendKind::from_u8(v.kind).unwrap(),
                v.flags & FE_F_SOURCE_RANGES != 0,
            )
        })
        .collect();
    out.sort();
    out
}

pub fn source_ranges<W: MapWriter>(m: &Model<W>, k: &ServicePortKey) -> Vec<String> {
    let Some(id) = m.reconciler.service_id(k) else {
        return Vec::new();
    };
    m.state()
        .src_ranges_of(id)
        .map(|r| {
            let bits = r.prefix_len - 32 - if r.addr.to_ip().is_ipv4() { 96 } else { 0 };
            format!("{}/{bits}", r.addr.to_ip())
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

pub fn ids_touched(rounds: &[Vec<MapOp>], before: &MapState) -> BTreeSet<u32> {
    rounds
        .iter()
        .flatten()
        .filter_map(|op| match op {
            MapOp::PutFrontend(_, v) => Some(v.service_id),
            MapOp::DeleteFrontend(k) => before.frontends.get(k).map(|v| v.service_id),
            MapOp::PutService(id, _) | MapOp::DeleteService(id) => Some(*id),
            MapOp::PutSlot(k, _) | MapOp::DeleteSlot(k) => Some(k.service_id),
            MapOp::PutBackend(id, b) if b.state == BackendState::Free as u8 => {
                before.backends.get(id).map(|old| old.service_id)
            }
            MapOp::PutBackend(_, b) => Some(b.service_id),
            MapOp::PutSrcRange(r) | MapOp::DeleteSrcRange(r) => Some(r.service_id),
            MapOp::PutMaglev(id, _) | MapOp::DeleteMaglev(id) => Some(*id),
            MapOp::PutEgressPool(id, _) | MapOp::DeleteEgressPool(id) => Some(*id),
        })
        .collect()
}

pub fn snapshot_of(state: &MapState) -> MapSnapshot {
    MapSnapshot {
        frontends: state.frontends.iter().map(|(k, v)| (*k, *v)).collect(),
        services: state.services.iter().map(|(k, v)| (*k, *v)).collect(),
        slots: state.slots.iter().map(|(k, v)| (*k, *v)).collect(),
        backends: state.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        src_ranges: state.src_ranges.iter().copied().collect(),
    }
}
