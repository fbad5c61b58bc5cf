//! Counters: every drop has a named reason, every service its packets and bytes.

use proxy_common::Counter;

use crate::maps::{COUNTERS, SVC_STATS};

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn count_service(service_id: u32, bytes: u32, reply: bool) {
    if let Some(p) = SVC_STATS.get_ptr_mut(service_id) {
        let s = unsafe { &mut *p };
        if reply {
            s.rev_packets += 1;
            s.rev_bytes += bytes as u64;
        } else {
            s.fwd_packets += 1;
            s.fwd_bytes += bytes as u64;
        }
    }
}
