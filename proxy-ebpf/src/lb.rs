//! Service lookup and endpoint choice: frontends, source ranges, affinity, selection.

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::*;

use crate::maps::{AFFINITY, BACKENDS, FE_FILTER, FRONTENDS, MAGLEV, SERVICES, SLOTS, SRC_RANGES};
use crate::mem;

/// False: certainly not a frontend. True: maybe (look it up).
#[inline(always)]
pub fn maybe_frontend(addr: &Addr, port: u16, proto: u8) -> bool {
    let slot = FilterSlot::of(addr, port, proto);
    match FE_FILTER.get(slot.word) {
        Some(word) => *word & slot.mask != 0,
        None => false,
    }
}

#[inline(always)]
pub fn lookup_frontend(addr: &Addr, port: u16, proto: u8) -> Option<&'static FrontendValue> {
    let key = FrontendKey {
        addr: *addr,
        port,
        proto,
        pad: 0,
    };
    unsafe { FRONTENDS.get(&key) }
}

#[inline(always)]
pub fn lookup_service(service_id: u32) -> Option<&'static ServiceValue> {
    unsafe { SERVICES.get(&service_id) }
}

/// loadBalancerSourceRanges: is `client` inside one of the service's ranges?
#[inline(always)]
pub fn source_allowed(service_id: u32, client: &Addr) -> bool {
    let key = Key::new(
        32 + 128,
        SrcRangeKey {
            service_id,
            addr: *client,
        },
    );
    SRC_RANGES.get(&key).is_some()
}

/// A backend chosen for a new flow.
#[derive(Clone, Copy)]
pub struct Chosen {
    pub id: u32,
    pub generation: u32,
    pub addr: Addr,
    /// net order
    pub port: u16,
}

#[inline(always)]
fn active_backend(id: u32) -> Option<Chosen> {
    let b = BACKENDS.get(id)?;
    if b.state != BackendState::Active as u8 {
        return None;
    }
    Some(Chosen {
        id,
        generation: b.generation,
        addr: mem::addr(&b.addr),
        port: b.port,
    })
}

/// The endpoint an [`FrontendKind::Endpoint`] frontend names, if it is still that address and
/// port (draining and unhealthy endpoints too: the pod chose it).
#[inline(always)]
pub fn direct_backend(fe: &FrontendValue, addr: &Addr, port: u16) -> Option<Chosen> {
    let id = fe.endpoint_backend();
    let b = BACKENDS.get(id)?;
    if b.state == BackendState::Free as u8 || b.addr != *addr || b.port != port {
        return None;
    }
    Some(Chosen {
        id,
        generation: b.generation,
        addr: mem::addr(&b.addr),
        port: b.port,
    })
}

/// Picks a slot by flow hash. kube-proxy picks at random; a hash gives the same spread and lets a
/// flow whose conntrack entry was lost land on the same endpoint again.
#[inline(always)]
pub fn select_backend(service_id: u32, svc: &ServiceValue, hash: u32) -> Option<Chosen> {
    let count = svc.backend_count;
    if count == 0 {
        return None;
    }
    // Every node maps a flow to the same endpoint (cluster egress: the owner may change). A slot
    // on an endpoint that just left falls back to the slots until the agent rebuilds the table.
    if svc.flags & SVC_F_MAGLEV != 0
        && let Some(table) = unsafe { MAGLEV.get(&service_id) }
    {
        // hash * M / 2^32 rather than hash % M: the same spread, and a bound the verifier
        // follows through the multiplication (a modulo reaches it as a multiply-shift it loses).
        let i = ((hash as u64 * MAGLEV_M as u64) >> 32) as usize;
        if let Some(c) = active_backend(table.backend_ids[i]) {
            return Some(c);
        }
    }
    let slot = 1 + hash % count;
    let id = match unsafe { SLOTS.get(&SlotKey { service_id, slot }) } {
        Some(id) => *id,
        // The agent shrinks the slot list after lowering the count; a reader that saw the old
        // count can miss. Slot 1 exists whenever the count is non-zero.
        None => *unsafe {
            SLOTS.get(&SlotKey {
                service_id,
                slot: 1,
            })
        }?,
    };
    active_backend(id)
}

/// sessionAffinity: ClientIP. The remembered endpoint, if it is still active and not timed out.
#[inline(always)]
pub fn affinity_backend(service_id: u32, timeout: u32, client: &Addr, now: u32) -> Option<Chosen> {
    let key = AffinityKey {
        service_id,
        client: *client,
    };
    let a = AFFINITY.get_ptr_mut(&key)?;
    let a = unsafe { &mut *a };
    if now.wrapping_sub(a.last_used) > timeout {
        return None;
    }
    let chosen = active_backend(a.backend_id)?;
    if chosen.generation != a.backend_generation {
        return None;
    }
    a.last_used = now;
    Some(chosen)
}

#[inline(always)]
pub fn affinity_record(service_id: u32, client: &Addr, chosen: &Chosen, now: u32) {
    let key = AffinityKey {
        service_id,
        client: *client,
    };
    let value = AffinityValue {
        backend_id: chosen.id,
        backend_generation: chosen.generation,
        last_used: now,
        reserved: 0,
    };
    // A lost affinity record only costs stickiness for one flow.
    let _ = AFFINITY.insert(&key, &value, 0);
}

/// Flow hash over the client 5-tuple (murmur3-style mixing; not cryptographic).
#[inline(always)]
pub fn flow_hash(key: &CtKey, seed: u32) -> u32 {
    let mut h = seed;
    let words = [
        key.src.words[0],
        key.src.words[1],
        key.src.words[2],
        key.src.words[3],
        key.dst.words[3],
        ((key.sport as u32) << 16) | key.dport as u32,
        key.proto as u32,
    ];
    for w in words {
        let mut k = w.wrapping_mul(0xcc9e_2d51);
        k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    fmix32(h)
}

/// murmur3's finaliser: every input bit moves every output bit.
#[inline(always)]
pub fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
