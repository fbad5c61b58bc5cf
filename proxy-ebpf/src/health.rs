//! Passive health checking: how new flows to each endpoint fare, for the agent's outlier
//! detection. A new flow answered counts for its endpoint; one reset, refused by ICMP or left
//! without an answer to its SYN counts against it. Only a flow's first answer or first failure
//! counts, so a long flow weighs as much as a short one.

use proxy_common::{BackendHealth, CT_F_FAIL_COUNTED, CT_F_SEEN_REPLY, CtValue};

use crate::maps::BACKEND_HEALTH;

/// Atomic add on a counter every CPU updates.
#[inline(always)]
fn add<T: Copy>(p: *mut T, v: T) {
    unsafe {
        core::intrinsics::atomic_xadd::<T, T, { core::intrinsics::AtomicOrdering::Relaxed }>(p, v)
    };
}

#[inline(always)]
fn entry(backend_id: u32) -> Option<&'static mut BackendHealth> {
    BACKEND_HEALTH
        .get_ptr_mut(backend_id)
        .map(|p| unsafe { &mut *p })
}

/// The flow `ct` got its endpoint's first answer.
#[inline(always)]
pub fn answered(ct: &CtValue) {
    if let Some(h) = entry(ct.backend_id) {
        add(&mut h.answered, 1u64);
        if h.consecutive != 0 {
            h.consecutive = 0;
        }
    }
}

/// The new flow `ct` failed (`kind`: `HF_*`) at `ticks`, unless it was answered or its failure
/// counted already; marks it counted.
#[inline(always)]
pub fn failed(ct: &mut CtValue, kind: u32, ticks: u32) {
    if ct.flags & (CT_F_SEEN_REPLY | CT_F_FAIL_COUNTED) != 0 {
        return;
    }
    ct.flags |= CT_F_FAIL_COUNTED;
    if let Some(h) = entry(ct.backend_id) {
        add(&mut h.failed, 1u64);
        add(&mut h.consecutive, 1u32);
        h.last_kind = kind;
        h.last_at = ticks;
    }
}
