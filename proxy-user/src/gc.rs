//! Conntrack garbage collection. The data path ages entries lazily (on lookup) and the maps are
//! LRU, but idle expired entries would still hold SNAT ports and map slots until something
//! evicts them; the agent sweeps them and reports how full the tables are.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use proxy_common::*;

use crate::maps::{DatapathMaps, MapsError};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub ct_entries: usize,
    pub ct_expired: usize,
    /// Flows whose frontend no longer exists (see [`Collector::sweep`]).
    pub ct_frontend_removed: usize,
    pub revnat_entries: usize,
    pub revnat_orphans: usize,
    /// Closed flows' ports still held for their clients.
    pub snat_held: usize,
    /// Closed flows' ports whose hold ended: free for any client again.
    pub snat_released: usize,
    /// Endpoint addresses some live flow goes to: a draining DNS-name address without any is
    /// dropped before its bound (`dns::Dns::forget_idle_drained`).
    pub busy_endpoints: HashSet<IpAddr>,
}

/// Keeps reverse-NAT entries without a flow for one round before deleting them: the data path
/// inserts the reverse entry an instant before the conntrack entry, and a sweep landing in
/// between must not take a live flow's port.
#[derive(Default)]
pub struct Collector {
    suspects: HashSet<RevNatKey>,
}

impl Collector {
    /// Removes expired flows, flows whose frontend is not among `frontends` (what FRONTENDS
    /// holds), and reverse NAT entries left without a flow.
    ///
    /// The data path follows a tracked flow without looking its frontend up, and only asks
    /// conntrack about packets whose FE_FILTER bit is set. When a frontend goes, its bit is
    /// usually cleared at once and its flows stop; a bit shared with another frontend would keep
    /// them going. Removing them here makes "a removed frontend ends its flows" hold every time,
    /// at the latest one sweep later.
    ///
    /// Reverse NAT entries of closed flows hold their port for the flow's client (see
    /// [`RevNatValue::closed_at`]); they go once the hold is over at `now_ticks` (the data path's
    /// fine clock, [`crate::host::datapath_ticks`]).
    pub fn sweep(
        &mut self,
        maps: &mut DatapathMaps,
        cfg: &Config,
        now: u32,
        now_ticks: u32,
        frontends: &BTreeMap<FrontendKey, FrontendValue>,
    ) -> Result<GcReport, MapsError> {
        let mut report = GcReport::default();
        let ct = maps.conntrack()?;
        report.ct_entries = ct.len();
        // Live flow -> the SNAT address and port it holds.
        let mut live = HashMap::with_capacity(ct.len());
        for (key, value) in &ct {
            let frontend = FrontendKey {
                addr: key.dst,
                port: key.dport,
                proto: key.proto,
                pad: 0,
            };
            if cfg.ct_expired(key.proto, value, now) {
                maps.remove_ct(key)?;
                report.ct_expired += 1;
            } else if !frontends.contains_key(&frontend) {
                maps.remove_ct(key)?;
                report.ct_frontend_removed += 1;
            } else {
                live.insert(*key, (value.snat, value.snat_port));
                report.busy_endpoints.insert(value.backend.to_ip());
            }
        }
        let revnat = maps.reverse_nat()?;
        report.revnat_entries = revnat.len();
        let mut suspects = HashSet::new();
        for (key, value) in revnat {
            if value.is_closed() {
                let age = now_ticks.wrapping_sub(value.closed_at);
                if age >= cfg.snat_hold_ticks(value.flags) && age < u32::MAX / 2 {
                    maps.remove_revnat(&key)?;
                    report.snat_released += 1;
                } else {
                    report.snat_held += 1;
                }
                continue;
            }
            let owned = live.get(&value.ct_key(key.proto)) == Some(&(key.snat, key.snat_port));
            if owned {
                continue;
            }
            if self.suspects.contains(&key) {
                maps.remove_revnat(&key)?;
                report.revnat_orphans += 1;
            } else {
                suspects.insert(key);
            }
        }
        self.suspects = suspects;
        Ok(report)
    }
}
