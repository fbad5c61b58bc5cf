//! Diffs [`Desired`] against a model of what is in the maps and emits ordered map operations.
//!
//! The [`Reconciler`] keeps two things apart:
//! - the *model* ([`MapState`]): exactly what the maps hold, changed only by operations a
//!   [`MapWriter`] confirmed, so it stays truthful when a write fails half-way;
//! - the *identity*: which service id belongs to which [`ServicePortKey`] and which backend id to
//!   which (service id, endpoint). The maps carry no names, so this is what gives them meaning.
//!
//! Operations come in an order that keeps every packet safe mid-update: backends before the
//! slots naming them, slots before the count that exposes them, the service before frontends
//! pointing at it; removals in reverse (frontends, service, slots, ranges, then backends). Ids are released only once the model shows nothing refers
//! to them any more.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use proxy_common::user::{port_host, port_net};
use proxy_common::{
    Addr, BackendState, BackendValue, EGRESS_POOL_MAX, EgressPool, FE_F_SOURCE_RANGES, FrontendKey,
    FrontendKind, FrontendValue, MAP_BACKENDS, MAP_EGRESS_POOLS, MAP_FRONTENDS, MAP_MAGLEV,
    MAP_SERVICES, MAP_SLOTS, MAP_SRC_RANGES, SVC_F_CLUSTER_EGRESS, SVC_F_EGRESS_POOL, SVC_F_MAGLEV,
    ServiceValue, SlotKey, SrcRangeKey, src_range_prefix_len,
};
use thiserror::Error;

use crate::translate::{BackendRole, Desired, DesiredService, ServicePortKey};

#[cfg(test)]
mod tests;

// ---------------------------------------------------------------------------------------------
// Operations and writers
// ---------------------------------------------------------------------------------------------

/// One write to one map, in the ABI's own types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutFrontend(FrontendKey, FrontendValue),
    DeleteFrontend(FrontendKey),
    PutService(u32, ServiceValue),
    DeleteService(u32),
    PutSlot(SlotKey, u32),
    DeleteSlot(SlotKey),
    /// BACKENDS is an array: a backend is freed by writing state Free and a new generation.
    PutBackend(u32, BackendValue),
    PutSrcRange(SrcRange),
    DeleteSrcRange(SrcRange),
    /// A Service port's Maglev table: slot -> backend id, [`proxy_common::MAGLEV_M`] slots.
    PutMaglev(u32, Arc<[u32]>),
    DeleteMaglev(u32),
    /// A Service port's egress pool (`SVC_F_EGRESS_POOL`), keyed by its service id. Boxed: 264
    /// bytes, where every other operation fits in 48.
    PutEgressPool(u32, Box<EgressPool>),
    DeleteEgressPool(u32),
}

impl MapOp {
    pub fn map_name(&self) -> &'static str {
        match self {
            MapOp::PutFrontend(..) | MapOp::DeleteFrontend(_) => MAP_FRONTENDS,
            MapOp::PutService(..) | MapOp::DeleteService(_) => MAP_SERVICES,
            MapOp::PutSlot(..) | MapOp::DeleteSlot(_) => MAP_SLOTS,
            MapOp::PutBackend(..) => MAP_BACKENDS,
            MapOp::PutSrcRange(_) | MapOp::DeleteSrcRange(_) => MAP_SRC_RANGES,
            MapOp::PutMaglev(..) | MapOp::DeleteMaglev(_) => MAP_MAGLEV,
            MapOp::PutEgressPool(..) | MapOp::DeleteEgressPool(_) => MAP_EGRESS_POOLS,
        }
    }
}

/// An entry of SRC_RANGES: the LPM key's prefix length and data (the value is always 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange {
    pub service_id: u32,
    pub addr: Addr,
    pub prefix_len: u32,
}

impl SrcRange {
    pub fn new(service_id: u32, range: &IpNet) -> Self {
        let range = range.trunc();
        SrcRange {
            service_id,
            addr: Addr::from(range.network()),
            prefix_len: src_range_prefix_len(range.network().is_ipv4(), range.prefix_len()),
        }
    }

    pub fn key(&self) -> SrcRangeKey {
        SrcRangeKey {
            service_id: self.service_id,
            addr: self.addr,
        }
    }
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MapWriteError {
    #[error("map {map} is full (max_entries {max_entries})")]
    Full { map: &'static str, max_entries: u32 },
    #[error("{map}: {reason}")]
    Failed { map: &'static str, reason: String },
}

/// Applies operations to maps (the kernel's in [`crate::maps`]; [`MapState`] in memory).
pub trait MapWriter {
    fn apply(&mut self, op: &MapOp) -> Result<(), MapWriteError>;

    /// After every plan, with the model of what the maps now hold: writers that keep state
    /// derived from several entries (the kernel's frontend filter) bring it up to date.
    fn finish(&mut self, _state: &MapState) {}
}

/// Map contents as read from pinned maps. BACKENDS lists only entries that are not all zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapSnapshot {
    pub frontends: Vec<(FrontendKey, FrontendValue)>,
    pub services: Vec<(u32, ServiceValue)>,
    pub slots: Vec<(SlotKey, u32)>,
    pub backends: Vec<(u32, BackendValue)>,
    pub src_ranges: Vec<SrcRange>,
}

/// A model of the maps the reconciler writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub frontends: BTreeMap<FrontendKey, FrontendValue>,
    pub services: BTreeMap<u32, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    /// Entries that were ever written (or found non-zero); the rest of the array is zero.
    pub backends: BTreeMap<u32, BackendValue>,
    pub src_ranges: BTreeSet<SrcRange>,
    /// Maglev tables written (not read back on adoption: rewritten once, then kept).
    pub maglev: BTreeMap<u32, Arc<[u32]>>,
    /// Egress pools written (not read back on adoption either: rewritten once; a pool left by
    /// the previous agent is deleted by its service value's flag).
    pub egress_pools: BTreeMap<u32, EgressPool>,
}

impl MapState {
    pub fn from_snapshot(snapshot: MapSnapshot) -> Self {
        MapState {
            frontends: snapshot.frontends.into_iter().collect(),
            services: snapshot.services.into_iter().collect(),
            slots: snapshot.slots.into_iter().collect(),
            backends: snapshot
                .backends
                .into_iter()
                .filter(|(_, v)| *v != BackendValue::default())
                .collect(),
            src_ranges: snapshot.src_ranges.into_iter().collect(),
            maglev: BTreeMap::new(),
            egress_pools: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutFrontend(k, v) => {
                self.frontends.insert(k, v);
            }
            MapOp::DeleteFrontend(k) => {
                self.frontends.remove(&k);
            }
            MapOp::PutService(id, v) => {
                self.services.insert(id, v);
            }
            MapOp::DeleteService(id) => {
                self.services.remove(&id);
            }
            MapOp::PutSlot(k, v) => {
                self.slots.insert(k, v);
            }
            MapOp::DeleteSlot(k) => {
                self.slots.remove(&k);
            }
            MapOp::PutBackend(id, v) => {
                self.backends.insert(id, v);
            }
            MapOp::PutSrcRange(r) => {
                self.src_ranges.insert(r);
            }
            MapOp::DeleteSrcRange(r) => {
                self.src_ranges.remove(&r);
            }
            MapOp::PutMaglev(id, ref table) => {
                self.maglev.insert(id, table.clone());
            }
            MapOp::DeleteMaglev(id) => {
                self.maglev.remove(&id);
            }
            MapOp::PutEgressPool(id, ref pool) => {
                self.egress_pools.insert(id, **pool);
            }
            MapOp::DeleteEgressPool(id) => {
                self.egress_pools.remove(&id);
            }
        }
    }

    /// Slots of a service in slot order: (slot, backend id).
    pub fn slots_of(&self, service_id: u32) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.slots
            .range(slot_keys(service_id))
            .map(|(k, v)| (k.slot, *v))
    }

    pub fn src_ranges_of(&self, service_id: u32) -> impl Iterator<Item = &SrcRange> + '_ {
        self.src_ranges
            .range(first_src_range(service_id)..)
            .take_while(move |r| r.service_id == service_id)
    }

    fn backend(&self, id: u32) -> BackendValue {
        self.backends.get(&id).copied().unwrap_or_default()
    }

    /// Service ids anything in the maps points to.
    fn referenced_service_ids(&self) -> BTreeSet<u32> {
        let mut ids: BTreeSet<u32> = self.services.keys().copied().collect();
        ids.extend(self.frontends.values().map(|v| v.service_id));
        ids.extend(self.slots.keys().map(|k| k.service_id));
        ids.extend(self.src_ranges.iter().map(|r| r.service_id));
        ids
    }

    /// Backend ids that are live (not Free) or that a slot still names.
    fn referenced_backend_ids(&self) -> BTreeSet<u32> {
        let mut ids: BTreeSet<u32> = self
            .backends
            .iter()
            .filter(|(_, v)| v.state != BackendState::Free as u8)
            .map(|(id, _)| *id)
            .collect();
        ids.extend(self.slots.values().copied());
        ids
    }
}

/// Every slot key of a service, in order.
fn slot_keys(service_id: u32) -> std::ops::RangeInclusive<SlotKey> {
    let key = |slot| SlotKey { service_id, slot };
    key(0)..=key(u32::MAX)
}

/// The least source range of a service: those of the service follow it.
fn first_src_range(service_id: u32) -> SrcRange {
    SrcRange {
        service_id,
        addr: Addr::ZERO,
        prefix_len: 0,
    }
}

/// The in-memory model is a writer that never fails: a dry run, and the tests' kernel.
impl MapWriter for MapState {
    fn apply(&mut self, op: &MapOp) -> Result<(), MapWriteError> {
        self.record(op);
        Ok(())
    }
}

/// [`MapState`] with the indexes planning needs, kept as writes are recorded so that neither a
/// plan nor an apply has to scan the whole model.
#[derive(Clone, Debug, Default)]
struct Model {
    state: MapState,
    /// Sorted Vecs, not BTreeSets: a service has a frontend or two, and a B-tree leaf each was
    /// 3 MB at 10k services.
    frontends_by_service: HashMap<u32, Vec<FrontendKey>>,
    /// Entries naming each service id (its service value, frontends, slots, source ranges).
    service_refs: HashMap<u32, u32>,
    /// Slots naming each backend id.
    slot_refs: HashMap<u32, u32>,
}

fn count_up(counts: &mut HashMap<u32, u32>, id: u32) {
    *counts.entry(id).or_default() += 1;
}

fn count_down(counts: &mut HashMap<u32, u32>, id: u32) {
    if let Some(n) = counts.get_mut(&id) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&id);
        }
    }
}

impl Model {
    fn new(state: MapState) -> Self {
        let mut model = Model::default();
        for (key, value) in &state.frontends {
            model.record(&MapOp::PutFrontend(*key, *value));
        }
        for (id, value) in &state.services {
            model.record(&MapOp::PutService(*id, *value));
        }
        for (key, backend) in &state.slots {
            model.record(&MapOp::PutSlot(*key, *backend));
        }
        for range in &state.src_ranges {
            model.record(&MapOp::PutSrcRange(*range));
        }
        model.state.backends = state.backends;
        model
    }

    /// Drops the model's frontend `key` (if any) from the indexes, ahead of its put or delete.
    fn unindex_frontend(&mut self, key: &FrontendKey) {
        let Some(old) = self.state.frontends.get(key) else {
            return;
        };
        count_down(&mut self.service_refs, old.service_id);
        if let Some(set) = self.frontends_by_service.get_mut(&old.service_id) {
            if let Ok(at) = set.binary_search(key) {
                set.remove(at);
            }
            if set.is_empty() {
                self.frontends_by_service.remove(&old.service_id);
            }
        }
    }

    fn record(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutFrontend(key, value) => {
                self.unindex_frontend(&key);
                count_up(&mut self.service_refs, value.service_id);
                let set = self
                    .frontends_by_service
                    .entry(value.service_id)
                    .or_insert_with(|| Vec::with_capacity(1));
                if let Err(at) = set.binary_search(&key) {
                    set.insert(at, key);
                }
            }
            MapOp::DeleteFrontend(key) => self.unindex_frontend(&key),
            MapOp::PutService(id, _) if !self.state.services.contains_key(&id) => {
                count_up(&mut self.service_refs, id);
            }
            MapOp::DeleteService(id) if self.state.services.contains_key(&id) => {
                count_down(&mut self.service_refs, id);
            }
            MapOp::PutSlot(key, backend) => {
                match self.state.slots.get(&key) {
                    Some(old) => count_down(&mut self.slot_refs, *old),
                    None => count_up(&mut self.service_refs, key.service_id),
                }
                count_up(&mut self.slot_refs, backend);
            }
            MapOp::DeleteSlot(key) => {
                if let Some(old) = self.state.slots.get(&key) {
                    count_down(&mut self.slot_refs, *old);
                    count_down(&mut self.service_refs, key.service_id);
                }
            }
            MapOp::PutSrcRange(range) if !self.state.src_ranges.contains(&range) => {
                count_up(&mut self.service_refs, range.service_id);
            }
            MapOp::DeleteSrcRange(range) if self.state.src_ranges.contains(&range) => {
                count_down(&mut self.service_refs, range.service_id);
            }
            MapOp::PutMaglev(id, _) if !self.state.maglev.contains_key(&id) => {
                count_up(&mut self.service_refs, id);
            }
            MapOp::DeleteMaglev(id) if self.state.maglev.contains_key(&id) => {
                count_down(&mut self.service_refs, id);
            }
            MapOp::PutEgressPool(id, _) if !self.state.egress_pools.contains_key(&id) => {
                count_up(&mut self.service_refs, id);
            }
            MapOp::DeleteEgressPool(id) if self.state.egress_pools.contains_key(&id) => {
                count_down(&mut self.service_refs, id);
            }
            _ => {}
        }
        self.state.record(op);
    }

    fn service_referenced(&self, id: u32) -> bool {
        self.service_refs.contains_key(&id)
    }

    fn backend_referenced(&self, id: u32) -> bool {
        self.state.backend(id).state != BackendState::Free as u8 || self.slot_refs.contains_key(&id)
    }
}

// ---------------------------------------------------------------------------------------------
// Plans and reports
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum CapacityError {
    #[error(
        "{service}: cannot be programmed: all {max} service ids are in use (raise the services map size)"
    )]
    ServiceIds { service: ServicePortKey, max: u32 },
    #[error(
        "{service}: cannot be programmed: needs {needed} new backend ids but only {available} of {max} are free (raise the backends map size)"
    )]
    BackendIds {
        service: ServicePortKey,
        needed: usize,
        available: usize,
        max: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedOp {
    /// The Service port the operation is for; None for leftovers found in pinned maps.
    pub service: Option<ServicePortKey>,
    pub op: MapOp,
    /// Operations of one unit depend on each other's order: after a failure the rest of the
    /// unit is skipped.
    unit: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<PlannedOp>,
    /// Services left as they are because a limit would be exceeded.
    pub errors: Vec<CapacityError>,
}

impl Plan {
    pub fn map_ops(&self) -> Vec<MapOp> {
        self.ops.iter().map(|p| p.op.clone()).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpFailure {
    pub service: Option<ServicePortKey>,
    pub op: MapOp,
    pub error: MapWriteError,
}

impl fmt::Display for OpFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.service {
            Some(service) => write!(f, "{service}: {} (update left unfinished)", self.error),
            None => write!(f, "cleaning up stale map entries: {}", self.error),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub applied: usize,
    /// Operations not attempted because an earlier one of the same service failed.
    pub skipped: usize,
    pub failures: Vec<OpFailure>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub capacity_errors: Vec<CapacityError>,
    pub apply: ApplyReport,
}

// ---------------------------------------------------------------------------------------------
// The reconciler
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Service ids are 0..max_services (SERVICES / SVC_STATS size).
    pub max_services: u32,
    /// Backend ids are 0..max_backends (BACKENDS size).
    pub max_backends: u32,
}

/// Hands out ids 0..max: never-used ids first, then released ones in release order, so an id
/// is reused as late as possible (stale conntrack and stats age out meanwhile).
#[derive(Clone, Debug)]
struct IdPool {
    max: u32,
    next_fresh: u32,
    released: VecDeque<u32>,
}

impl IdPool {
    /// Ids below `next_fresh` were handed out before; those not `in_use` count as released.
    fn resume(max: u32, next_fresh: u32, in_use: &BTreeSet<u32>) -> Self {
        IdPool {
            max,
            next_fresh,
            released: (0..next_fresh.min(max))
                .filter(|id| !in_use.contains(id))
                .collect(),
        }
    }

    fn available(&self) -> usize {
        self.max.saturating_sub(self.next_fresh) as usize + self.released.len()
    }

    fn take(&mut self) -> Option<u32> {
        if self.next_fresh < self.max {
            self.next_fresh += 1;
            Some(self.next_fresh - 1)
        } else {
            self.released.pop_front()
        }
    }
}

#[derive(Clone, Debug)]
pub struct Reconciler {
    limits: Limits,
    model: Model,
    service_ids: BTreeMap<ServicePortKey, u32>,
    backend_ids: BTreeMap<(u32, IpAddr, u16), u32>,
    service_pool: IdPool,
    backend_pool: IdPool,
    /// Ids no longer owned whose entries are still (or may still be) in the maps. Cleaned up by
    /// every plan, released once the model shows them unreferenced.
    limbo_services: BTreeMap<u32, Option<ServicePortKey>>,
    limbo_backends: BTreeMap<u32, Option<ServicePortKey>>,
    /// `limbo_backends` by owner: a service's diff must not scan every limbo entry (that made
    /// programming 10k services quadratic).
    limbo_by_owner: BTreeMap<ServicePortKey, BTreeSet<u32>>,
    /// Service ids found in pinned maps, waiting to be matched to a desired Service port.
    adoptable: BTreeSet<u32>,
    /// Bumped whenever a service id is given to or taken from a Service port, so the names of
    /// the ids are republished only when they change.
    ids_version: u64,
    /// Service ports the last plan could not program in full (no ids, a failed write): an
    /// incremental plan takes them up again as if they had changed.
    retry: BTreeSet<ServicePortKey>,
}

impl Reconciler {
    pub fn new(limits: Limits) -> Self {
        Self::from_state(MapState::default(), limits)
    }

    /// Adopts maps left by a previous agent. The first plan matches them to the desired
    /// Services (by frontend) and removes whatever matches nothing.
    pub fn from_snapshot(snapshot: MapSnapshot, limits: Limits) -> Self {
        Self::from_state(MapState::from_snapshot(snapshot), limits)
    }

    fn from_state(state: MapState, limits: Limits) -> Self {
        let services = state.referenced_service_ids();
        let backends = state.referenced_backend_ids();
        let next_service = services.last().map_or(0, |id| id + 1);
        let next_backend = backends
            .last()
            .copied()
            .max(state.backends.keys().last().copied())
            .map_or(0, |id| id + 1);
        let service_pool = IdPool::resume(limits.max_services, next_service, &services);
        let backend_pool = IdPool::resume(limits.max_backends, next_backend, &backends);
        Reconciler {
            limits,
            limbo_backends: backends.iter().map(|id| (*id, None)).collect(),
            limbo_by_owner: BTreeMap::new(),
            adoptable: services,
            model: Model::new(state),
            ids_version: 0,
            retry: BTreeSet::new(),
            service_ids: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            service_pool,
            backend_pool,
            limbo_services: BTreeMap::new(),
        }
    }

    /// What the maps hold, as far as confirmed writes tell.
    pub fn state(&self) -> &MapState {
        &self.model.state
    }

    pub fn service_id(&self, key: &ServicePortKey) -> Option<u32> {
        self.service_ids.get(key).copied()
    }

    /// The backend id of an endpoint of a service id (health checking reads its record).
    pub fn backend_id(&self, service_id: u32, ip: IpAddr, port: u16) -> Option<u32> {
        self.backend_ids.get(&(service_id, ip, port)).copied()
    }

    /// Changes whenever [`Reconciler::service_ids`] does.
    pub fn ids_version(&self) -> u64 {
        self.ids_version
    }

    /// Service port of every owned service id (to name SVC_STATS rows).
    pub fn service_ids(&self) -> impl Iterator<Item = (&ServicePortKey, u32)> {
        self.service_ids.iter().map(|(k, v)| (k, *v))
    }

    /// Plans and applies in one go.
    pub fn sync(&mut self, desired: &Desired, writer: &mut impl MapWriter) -> SyncReport {
        let plan = self.plan(desired);
        self.apply_with_errors(plan, writer)
    }

    /// Plans and applies only what `changed` names (see [`Reconciler::plan_changes`]).
    pub fn sync_changes(
        &mut self,
        desired: &Desired,
        changed: &BTreeSet<ServicePortKey>,
        writer: &mut impl MapWriter,
    ) -> SyncReport {
        let plan = self.plan_changes(desired, changed);
        self.apply_with_errors(plan, writer)
    }

    fn apply_with_errors(&mut self, mut plan: Plan, writer: &mut impl MapWriter) -> SyncReport {
        SyncReport {
            capacity_errors: std::mem::take(&mut plan.errors),
            apply: self.apply(plan, writer),
        }
    }

    /// Computes the operations that turn the maps into `desired`. Ids are assigned here; apply
    /// the plan (or drop it) before planning again.
    pub fn plan(&mut self, desired: &Desired) -> Plan {
        self.retry.clear();
        self.plan_services(desired, None)
    }

    /// Like [`Reconciler::plan`] when only the Service ports in `changed` (added, removed or
    /// different) differ from the `desired` of the previous plan: the same operations in the same
    /// order, found without looking at the other services. Every service a plan left unfinished
    /// is planned again too; maps still to be adopted take a full plan.
    pub fn plan_changes(&mut self, desired: &Desired, changed: &BTreeSet<ServicePortKey>) -> Plan {
        if !self.adoptable.is_empty() {
            return self.plan(desired);
        }
        let mut keys = std::mem::take(&mut self.retry);
        keys.extend(changed.iter().cloned());
        self.plan_services(desired, Some(&keys))
    }

    /// Plans `only` those service ports, or all of `desired` (and the removal of every other).
    fn plan_services(
        &mut self,
        desired: &Desired,
        only: Option<&BTreeSet<ServicePortKey>>,
    ) -> Plan {
        let mut plan = Plan::default();
        if !self.adoptable.is_empty() {
            self.adopt(desired);
        }

        let removed: Vec<ServicePortKey> = match only {
            Some(keys) => keys
                .iter()
                .filter(|k| self.service_ids.contains_key(*k) && !desired.services.contains_key(*k))
                .cloned()
                .collect(),
            None => self
                .service_ids
                .keys()
                .filter(|k| !desired.services.contains_key(*k))
                .cloned()
                .collect(),
        };
        for key in removed {
            if let Some(id) = self.service_ids.remove(&key) {
                self.ids_version += 1;
                self.disown_backends(id, &key, |_| true);
                self.limbo_services.insert(id, Some(key));
            }
        }

        // Ids first, so that services that cannot be programmed are known before any frontend
        // is handed from one service to another.
        let wanted: Vec<(&ServicePortKey, &DesiredService)> = match only {
            Some(keys) => keys
                .iter()
                .filter_map(|k| desired.services.get_key_value(k))
                .collect(),
            None => desired.services.iter().collect(),
        };
        let mut programmed: Vec<(&ServicePortKey, &DesiredService, u32)> = Vec::new();
        for (key, service) in wanted {
            match self.assign_ids(key, service) {
                Ok(id) => programmed.push((key, service, id)),
                Err(err) => {
                    self.retry.insert(key.clone());
                    plan.errors.push(err);
                }
            }
        }
        // A frontend moving between services moves between two changed ones (the translation
        // gives each frontend to one service), so planning only changed services sees both ends.
        let frontend_owner: HashMap<FrontendKey, u32> = programmed
            .iter()
            .flat_map(|(_, service, id)| service.frontends.keys().map(move |k| (*k, *id)))
            .collect();

        let mut projected = Projection::new(&self.model);
        let mut emitter = Emitter {
            ops: &mut plan.ops,
            projected: &mut projected,
            unit: 0,
        };
        for (key, service, id) in programmed {
            emitter.unit += 1;
            self.diff_service(&mut emitter, key, service, id, &frontend_owner);
        }
        for (id, key) in &self.limbo_services {
            emitter.unit += 1;
            remove_service(&mut emitter, key, *id);
        }
        for (id, key) in &self.limbo_backends {
            if !emitter.projected.slotted(*id) {
                emitter.unit += 1;
                free_backend(&mut emitter, key, *id);
            }
        }
        plan
    }

    /// Applies a plan through `writer`, recording every confirmed write in the model. After a
    /// failed write the rest of that service's operations are skipped so no later operation
    /// depends on a write that did not happen; the next plan picks up from the model.
    pub fn apply(&mut self, plan: Plan, writer: &mut impl MapWriter) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut failed_unit = None;
        for planned in plan.ops {
            if failed_unit == Some(planned.unit) {
                report.skipped += 1;
                continue;
            }
            match writer.apply(&planned.op) {
                Ok(()) => {
                    self.model.record(&planned.op);
                    report.applied += 1;
                }
                Err(error) => {
                    failed_unit = Some(planned.unit);
                    if let Some(service) = &planned.service {
                        self.retry.insert(service.clone());
                    }
                    report.failures.push(OpFailure {
                        service: planned.service,
                        op: planned.op,
                        error,
                    });
                }
            }
        }
        writer.finish(&self.model.state);
        self.release_unreferenced();
        report
    }

    fn release_unreferenced(&mut self) {
        let released: Vec<u32> = self
            .limbo_services
            .keys()
            .filter(|id| !self.model.service_referenced(**id))
            .copied()
            .collect();
        for id in released {
            self.limbo_services.remove(&id);
            self.service_pool.released.push_back(id);
        }
        let released: Vec<u32> = self
            .limbo_backends
            .keys()
            .filter(|id| !self.model.backend_referenced(**id))
            .copied()
            .collect();
        for id in released {
            self.limbo_backend_remove(id);
            self.backend_pool.released.push_back(id);
        }
    }

    /// Matches pinned services to desired Service ports through their frontends, and their
    /// backends by address. Whatever stays unmatched is cleaned up by this plan.
    fn adopt(&mut self, desired: &Desired) {
        let adoptable = std::mem::take(&mut self.adoptable);
        let mut adopted: Vec<(&DesiredService, u32)> = Vec::new();
        for (key, service) in &desired.services {
            if self.service_ids.contains_key(key) {
                continue;
            }
            let found = service
                .frontends
                .keys()
                .filter_map(|k| self.model.state.frontends.get(k))
                .map(|v| v.service_id)
                .find(|id| adoptable.contains(id) && !adopted.iter().any(|(_, a)| a == id));
            if let Some(id) = found {
                self.service_ids.insert(key.clone(), id);
                self.ids_version += 1;
                adopted.push((service, id));
            }
        }
        for id in adoptable
            .iter()
            .filter(|id| !adopted.iter().any(|(_, a)| a == *id))
        {
            self.limbo_services.insert(*id, None);
        }

        // Backends in a service's slots are surely its own; backends in no slot (draining) are
        // matched by address to adopted services still missing that endpoint.
        let mut owned: BTreeSet<u32> = BTreeSet::new();
        for (service, id) in &adopted {
            for (_, backend_id) in self.model.state.slots_of(*id) {
                let value = self.model.state.backend(backend_id);
                let endpoint = (value.addr.to_ip(), port_host(value.port));
                if service.backends.contains_key(&endpoint) && owned.insert(backend_id) {
                    self.backend_ids
                        .insert((*id, endpoint.0, endpoint.1), backend_id);
                }
            }
        }
        let slotted: BTreeSet<u32> = self.model.state.slots.values().copied().collect();
        let mut unslotted: BTreeMap<(Addr, u16), VecDeque<u32>> = BTreeMap::new();
        for (backend_id, value) in &self.model.state.backends {
            if value.state != BackendState::Free as u8 && !slotted.contains(backend_id) {
                unslotted
                    .entry((value.addr, value.port))
                    .or_default()
                    .push_back(*backend_id);
            }
        }
        for (service, id) in &adopted {
            for (ip, port) in service.backends.keys() {
                if self.backend_ids.contains_key(&(*id, *ip, *port)) {
                    continue;
                }
                let candidate = unslotted
                    .get_mut(&(Addr::from(*ip), port_net(*port)))
                    .and_then(VecDeque::pop_front);
                if let Some(backend_id) = candidate {
                    owned.insert(backend_id);
                    self.backend_ids.insert((*id, *ip, *port), backend_id);
                }
            }
        }
        for id in owned {
            self.limbo_backend_remove(id);
        }
    }

    fn limbo_backend_remove(&mut self, id: u32) {
        if let Some(Some(owner)) = self.limbo_backends.remove(&id)
            && let Some(ids) = self.limbo_by_owner.get_mut(&owner)
        {
            ids.remove(&id);
            if ids.is_empty() {
                self.limbo_by_owner.remove(&owner);
            }
        }
    }

    /// Moves the backend ids of `service_id` whose endpoint `is_gone` from the identity to limbo.
    fn disown_backends(
        &mut self,
        service_id: u32,
        key: &ServicePortKey,
        is_gone: impl Fn(&(IpAddr, u16)) -> bool,
    ) {
        let gone: Vec<((u32, IpAddr, u16), u32)> = self
            .backend_ids
            .range((service_id, IpAddr::from([0u8; 4]), 0)..)
            .take_while(|((sid, _, _), _)| *sid == service_id)
            .filter(|((_, ip, port), _)| is_gone(&(*ip, *port)))
            .map(|(k, v)| (*k, *v))
            .collect();
        for (k, backend_id) in gone {
            self.backend_ids.remove(&k);
            self.limbo_backends.insert(backend_id, Some(key.clone()));
            self.limbo_by_owner
                .entry(key.clone())
                .or_default()
                .insert(backend_id);
        }
    }

    /// The service id of `key` and a backend id for each of its endpoints, or why not.
    fn assign_ids(
        &mut self,
        key: &ServicePortKey,
        service: &DesiredService,
    ) -> Result<u32, CapacityError> {
        let existing = self.service_ids.get(key).copied();
        let needed = service
            .backends
            .keys()
            .filter(|(ip, port)| {
                existing.is_none_or(|id| !self.backend_ids.contains_key(&(id, *ip, *port)))
            })
            .count();
        let available = self.backend_pool.available();
        if needed > available {
            return Err(CapacityError::BackendIds {
                service: key.clone(),
                needed,
                available,
                max: self.limits.max_backends,
            });
        }
        let id = match existing {
            Some(id) => id,
            None => {
                let id = self
                    .service_pool
                    .take()
                    .ok_or_else(|| CapacityError::ServiceIds {
                        service: key.clone(),
                        max: self.limits.max_services,
                    })?;
                self.service_ids.insert(key.clone(), id);
                self.ids_version += 1;
                id
            }
        };
        self.disown_backends(id, key, |endpoint| !service.backends.contains_key(endpoint));
        for (ip, port) in service.backends.keys() {
            if !self.backend_ids.contains_key(&(id, *ip, *port)) {
                // Checked above: enough ids are available.
                if let Some(backend_id) = self.backend_pool.take() {
                    self.backend_ids.insert((id, *ip, *port), backend_id);
                }
            }
        }
        Ok(id)
    }

    fn diff_service(
        &self,
        emitter: &mut Emitter<'_, '_>,
        key: &ServicePortKey,
        service: &DesiredService,
        id: u32,
        frontend_owner: &HashMap<FrontendKey, u32>,
    ) {
        let owner = Some(key.clone());
        let owner = &owner;

        // (1) new backends, (2) role changes.
        let mut new_backends = Vec::new();
        let mut role_changes = Vec::new();
        let mut active: Vec<u32> = Vec::new();
        let mut owned_backends: BTreeSet<u32> = BTreeSet::new();
        for ((ip, port), role) in &service.backends {
            let Some(&backend_id) = self.backend_ids.get(&(id, *ip, *port)) else {
                continue;
            };
            owned_backends.insert(backend_id);
            let current = emitter.projected.backend(backend_id);
            let state = match role {
                BackendRole::Active => BackendState::Active,
                BackendRole::Draining | BackendRole::Unhealthy => BackendState::Draining,
            };
            let value = BackendValue {
                addr: Addr::from(*ip),
                port: port_net(*port),
                state: state as u8,
                pad: 0,
                generation: current.generation,
                service_id: id,
                reserved: 0,
            };
            if current != value {
                let same_endpoint = current.addr == value.addr && current.port == value.port;
                if current.state != BackendState::Free as u8 && same_endpoint {
                    role_changes.push(MapOp::PutBackend(backend_id, value));
                } else {
                    new_backends.push(MapOp::PutBackend(backend_id, value));
                }
            }
            if *role == BackendRole::Active {
                active.push(backend_id);
            }
        }
        for op in new_backends.into_iter().chain(role_changes) {
            emitter.emit(owner, op);
        }

        // (3) slots 1..=n_new. A service without egress address keeps its slots: the data path
        // sees the zero egress and rejects, counting the real reason.
        let old_slots: BTreeMap<u32, u32> = emitter.projected.slots_of(id);
        let new_slots = assign_slots(&old_slots, &active);
        for (i, backend_id) in new_slots.iter().enumerate() {
            let slot = i as u32 + 1;
            if old_slots.get(&slot) != Some(backend_id) {
                emitter.emit(
                    owner,
                    MapOp::PutSlot(
                        SlotKey {
                            service_id: id,
                            slot,
                        },
                        *backend_id,
                    ),
                );
            }
        }

        // (3b) the Maglev table of a Service with a cluster egress address, from its active
        // endpoints' identities: in place before the service value points the data path at it.
        if service.cluster_egress {
            let endpoints: Vec<(IpAddr, u16)> = active
                .iter()
                .map(|id| {
                    let b = emitter.projected.backend(*id);
                    (b.addr.to_ip(), port_host(b.port))
                })
                .collect();
            let table = maglev_table(&endpoints, &active);
            if emitter.projected.maglev(id).as_deref() != Some(&*table) {
                emitter.emit(owner, MapOp::PutMaglev(id, table));
            }
        } else if emitter.projected.maglev(id).is_some() {
            emitter.emit(owner, MapOp::DeleteMaglev(id));
        }

        // (3c) the egress pool, in place before the service value's flag sends the data path
        // to it.
        let pool = egress_pool(service);
        if let Some(pool) = pool
            && emitter.projected.egress_pool(id) != Some(pool)
        {
            emitter.emit(owner, MapOp::PutEgressPool(id, Box::new(pool)));
        }
        let had_pool = emitter.projected.had_egress_pool(id);

        // (4) the service value, which exposes the new slot count.
        let mut flags = if service.cluster_egress {
            SVC_F_CLUSTER_EGRESS | SVC_F_MAGLEV
        } else {
            0
        };
        if pool.is_some() {
            flags |= SVC_F_EGRESS_POOL;
        }
        let value = ServiceValue {
            backend_count: new_slots.len() as u32,
            affinity_timeout: service.affinity_timeout,
            egress: service.egress.map_or(Addr::ZERO, Addr::from),
            flags,
            reserved: 0,
        };
        if emitter.projected.service(id) != Some(value) {
            emitter.emit(owner, MapOp::PutService(id, value));
        }
        // (4b) a pool no longer wanted, once the service value no longer names it.
        if pool.is_none() && had_pool {
            emitter.emit(owner, MapOp::DeleteEgressPool(id));
        }

        // (5) new source ranges: written only if a frontend consults them.
        let restricted = service
            .frontends
            .values()
            .any(|f| f.flags & FE_F_SOURCE_RANGES != 0);
        let wanted_ranges: BTreeSet<SrcRange> = if restricted {
            service
                .source_ranges
                .iter()
                .map(|r| SrcRange::new(id, r))
                .collect()
        } else {
            BTreeSet::new()
        };
        let old_ranges: BTreeSet<SrcRange> = emitter.projected.src_ranges_of(id);
        for range in wanted_ranges.difference(&old_ranges) {
            emitter.emit(owner, MapOp::PutSrcRange(*range));
        }

        // (6) frontends.
        for (frontend, spec) in &service.frontends {
            let value = if spec.kind == FrontendKind::Endpoint {
                // The endpoint's own address: the frontend names its backend id.
                let endpoint = (frontend.addr.to_ip(), port_host(frontend.port));
                let Some(value) = self
                    .backend_ids
                    .get(&(id, endpoint.0, endpoint.1))
                    .and_then(|backend_id| FrontendValue::endpoint(id, *backend_id))
                else {
                    continue;
                };
                value
            } else {
                FrontendValue {
                    service_id: id,
                    kind: spec.kind as u8,
                    flags: spec.flags,
                    pad: [0; 2],
                }
            };
            if emitter.projected.frontend(frontend) != Some(value) {
                emitter.emit(owner, MapOp::PutFrontend(*frontend, value));
            }
        }
        let stale: Vec<FrontendKey> = emitter
            .projected
            .frontends_of(id)
            .into_iter()
            .filter(|k| !service.frontends.contains_key(k))
            // Moving to another service: its put replaces this entry without a gap.
            .filter(|k| frontend_owner.get(k).is_none_or(|owner_id| *owner_id == id))
            .collect();
        for frontend in stale {
            emitter.emit(owner, MapOp::DeleteFrontend(frontend));
        }

        // (7) slots past the new count.
        for slot in old_slots.keys().filter(|s| **s as usize > new_slots.len()) {
            emitter.emit(
                owner,
                MapOp::DeleteSlot(SlotKey {
                    service_id: id,
                    slot: *slot,
                }),
            );
        }

        // (8) stale source ranges.
        for range in old_ranges.difference(&wanted_ranges) {
            emitter.emit(owner, MapOp::DeleteSrcRange(*range));
        }

        // (9) backends this service no longer has. Backend ids are per service, so only this
        // service's slots can still hold one of them.
        if let Some(limbo) = self.limbo_by_owner.get(key) {
            let own_slots: BTreeSet<u32> = emitter.projected.slots_of(id).into_values().collect();
            let owner = Some(key.clone());
            for backend_id in limbo {
                if !owned_backends.contains(backend_id) && !own_slots.contains(backend_id) {
                    free_backend(emitter, &owner, *backend_id);
                }
            }
        }
    }
}

/// Slot assignment that moves as little as possible: backends keep their slot, new ones fill the
/// holes left by removed ones, and the ones past the new end move into the remaining holes.
fn assign_slots(old: &BTreeMap<u32, u32>, active: &[u32]) -> Vec<u32> {
    let wanted: BTreeSet<u32> = active.iter().copied().collect();
    let mut slots: Vec<Option<u32>> = vec![None; active.len()];
    let mut placed: BTreeSet<u32> = BTreeSet::new();
    let mut displaced: Vec<u32> = Vec::new();
    for (slot, backend_id) in old {
        if !wanted.contains(backend_id) || !placed.insert(*backend_id) {
            continue;
        }
        let index = (*slot as usize).checked_sub(1);
        match index.and_then(|i| slots.get_mut(i)) {
            Some(entry @ None) => *entry = Some(*backend_id),
            _ => displaced.push(*backend_id),
        }
    }
    let mut fill = active
        .iter()
        .filter(|id| !placed.contains(id))
        .chain(&displaced)
        .copied();
    slots
        .into_iter()
        .map(|entry| entry.or_else(|| fill.next()))
        .collect::<Option<Vec<u32>>>()
        .unwrap_or_default()
}

/// Removal in the safe order: frontends (no new packet finds the service), the service (whose
/// count names the slots: deleting slots first would leave it pointing at missing ones, e.g.
/// for a UDP flow being re-balanced), slots, source ranges. Its backends are freed afterwards
/// by the plan's backend cleanup.
fn remove_service(emitter: &mut Emitter<'_, '_>, owner: &Option<ServicePortKey>, id: u32) {
    let frontends = emitter.projected.frontends_of(id);
    for frontend in frontends {
        emitter.emit(owner, MapOp::DeleteFrontend(frontend));
    }
    let had_pool = emitter.projected.had_egress_pool(id);
    if emitter.projected.service(id).is_some() {
        emitter.emit(owner, MapOp::DeleteService(id));
    }
    if emitter.projected.maglev(id).is_some() {
        emitter.emit(owner, MapOp::DeleteMaglev(id));
    }
    if had_pool {
        emitter.emit(owner, MapOp::DeleteEgressPool(id));
    }
    let slots: Vec<u32> = emitter.projected.slots_of(id).into_keys().collect();
    for slot in slots {
        emitter.emit(
            owner,
            MapOp::DeleteSlot(SlotKey {
                service_id: id,
                slot,
            }),
        );
    }
    let ranges = emitter.projected.src_ranges_of(id);
    for range in ranges {
        emitter.emit(owner, MapOp::DeleteSrcRange(range));
    }
}

/// Frees a backend: state Free and a new generation, so flows still pinned to it end (TCP) or
/// move (UDP) and a later owner of the id never inherits them.
fn free_backend(emitter: &mut Emitter<'_, '_>, owner: &Option<ServicePortKey>, backend_id: u32) {
    let current = emitter.projected.backend(backend_id);
    if current.state == BackendState::Free as u8 {
        return;
    }
    let freed = BackendValue {
        state: BackendState::Free as u8,
        generation: current.generation.wrapping_add(1),
        ..BackendValue::default()
    };
    emitter.emit(owner, MapOp::PutBackend(backend_id, freed));
}

/// The maps as they will be once the plan so far is applied: the model, overlaid with what the
/// plan wrote. A plan reads only the services it touches, so it never copies the model.
struct Projection<'a> {
    base: &'a Model,
    /// Written by the plan: Some(value) put, None deleted.
    frontends: HashMap<FrontendKey, Option<FrontendValue>>,
    services: HashMap<u32, Option<ServiceValue>>,
    slots: BTreeMap<SlotKey, Option<u32>>,
    backends: HashMap<u32, BackendValue>,
    src_ranges: BTreeMap<SrcRange, bool>,
    maglev: HashMap<u32, Option<Arc<[u32]>>>,
    egress_pools: HashMap<u32, Option<EgressPool>>,
    /// Frontends the plan gave each service id.
    frontends_added: HashMap<u32, BTreeSet<FrontendKey>>,
    /// Frontends of the model that the plan deleted or gave another service id.
    frontends_gone: HashSet<FrontendKey>,
    /// Change of each backend id's slot count.
    slot_refs: HashMap<u32, i64>,
}

impl<'a> Projection<'a> {
    fn new(base: &'a Model) -> Self {
        Projection {
            base,
            frontends: HashMap::new(),
            services: HashMap::new(),
            slots: BTreeMap::new(),
            backends: HashMap::new(),
            src_ranges: BTreeMap::new(),
            maglev: HashMap::new(),
            egress_pools: HashMap::new(),
            frontends_added: HashMap::new(),
            frontends_gone: HashSet::new(),
            slot_refs: HashMap::new(),
        }
    }

    fn frontend(&self, key: &FrontendKey) -> Option<FrontendValue> {
        match self.frontends.get(key) {
            Some(written) => *written,
            None => self.base.state.frontends.get(key).copied(),
        }
    }

    fn service(&self, id: u32) -> Option<ServiceValue> {
        match self.services.get(&id) {
            Some(written) => *written,
            None => self.base.state.services.get(&id).copied(),
        }
    }

    fn maglev(&self, id: u32) -> Option<Arc<[u32]>> {
        match self.maglev.get(&id) {
            Some(written) => written.clone(),
            None => self.base.state.maglev.get(&id).cloned(),
        }
    }

    fn egress_pool(&self, id: u32) -> Option<EgressPool> {
        match self.egress_pools.get(&id) {
            Some(written) => *written,
            None => self.base.state.egress_pools.get(&id).copied(),
        }
    }

    /// Whether the maps may hold an egress pool for `id`: one written, or one the service value
    /// names (adopted maps: pools are not read back).
    fn had_egress_pool(&self, id: u32) -> bool {
        self.egress_pool(id).is_some()
            || self
                .service(id)
                .is_some_and(|v| v.flags & SVC_F_EGRESS_POOL != 0)
    }

    fn backend(&self, id: u32) -> BackendValue {
        match self.backends.get(&id) {
            Some(written) => *written,
            None => self.base.state.backend(id),
        }
    }

    /// Slots of a service: slot -> backend id.
    fn slots_of(&self, service_id: u32) -> BTreeMap<u32, u32> {
        let mut slots: BTreeMap<u32, u32> = self.base.state.slots_of(service_id).collect();
        for (key, written) in self.slots.range(slot_keys(service_id)) {
            match written {
                Some(backend) => slots.insert(key.slot, *backend),
                None => slots.remove(&key.slot),
            };
        }
        slots
    }

    fn src_ranges_of(&self, service_id: u32) -> BTreeSet<SrcRange> {
        let mut ranges: BTreeSet<SrcRange> =
            self.base.state.src_ranges_of(service_id).copied().collect();
        for (range, present) in self
            .src_ranges
            .range(first_src_range(service_id)..)
            .take_while(|(r, _)| r.service_id == service_id)
        {
            if *present {
                ranges.insert(*range);
            } else {
                ranges.remove(range);
            }
        }
        ranges
    }

    /// Frontends pointing at a service, in key order.
    fn frontends_of(&self, service_id: u32) -> BTreeSet<FrontendKey> {
        let mut keys: BTreeSet<FrontendKey> = self
            .base
            .frontends_by_service
            .get(&service_id)
            .into_iter()
            .flatten()
            .filter(|k| !self.frontends_gone.contains(*k))
            .copied()
            .collect();
        keys.extend(self.frontends_added.get(&service_id).into_iter().flatten());
        keys
    }

    /// Whether a slot still names this backend id.
    fn slotted(&self, backend_id: u32) -> bool {
        let base = self.base.slot_refs.get(&backend_id).copied().unwrap_or(0);
        i64::from(base) + self.slot_refs.get(&backend_id).copied().unwrap_or(0) > 0
    }

    fn slot(&self, key: &SlotKey) -> Option<u32> {
        match self.slots.get(key) {
            Some(written) => *written,
            None => self.base.state.slots.get(key).copied(),
        }
    }

    fn leave(&mut self, key: FrontendKey, service_id: u32) {
        let added = self
            .frontends_added
            .get_mut(&service_id)
            .is_some_and(|set| set.remove(&key));
        if !added {
            self.frontends_gone.insert(key);
        }
    }

    fn join(&mut self, key: FrontendKey, service_id: u32) {
        let in_base = self
            .base
            .state
            .frontends
            .get(&key)
            .is_some_and(|v| v.service_id == service_id);
        if in_base {
            self.frontends_gone.remove(&key);
        } else {
            self.frontends_added
                .entry(service_id)
                .or_default()
                .insert(key);
        }
    }

    fn record(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutFrontend(key, value) => {
                if let Some(old) = self.frontend(&key) {
                    self.leave(key, old.service_id);
                }
                self.join(key, value.service_id);
                self.frontends.insert(key, Some(value));
            }
            MapOp::DeleteFrontend(key) => {
                if let Some(old) = self.frontend(&key) {
                    self.leave(key, old.service_id);
                }
                self.frontends.insert(key, None);
            }
            MapOp::PutService(id, value) => {
                self.services.insert(id, Some(value));
            }
            MapOp::DeleteService(id) => {
                self.services.insert(id, None);
            }
            MapOp::PutSlot(key, backend) => {
                if let Some(old) = self.slot(&key) {
                    *self.slot_refs.entry(old).or_default() -= 1;
                }
                *self.slot_refs.entry(backend).or_default() += 1;
                self.slots.insert(key, Some(backend));
            }
            MapOp::DeleteSlot(key) => {
                if let Some(old) = self.slot(&key) {
                    *self.slot_refs.entry(old).or_default() -= 1;
                }
                self.slots.insert(key, None);
            }
            MapOp::PutBackend(id, value) => {
                self.backends.insert(id, value);
            }
            MapOp::PutSrcRange(range) => {
                self.src_ranges.insert(range, true);
            }
            MapOp::DeleteSrcRange(range) => {
                self.src_ranges.insert(range, false);
            }
            MapOp::PutMaglev(id, ref table) => {
                self.maglev.insert(id, Some(table.clone()));
            }
            MapOp::DeleteMaglev(id) => {
                self.maglev.insert(id, None);
            }
            MapOp::PutEgressPool(id, ref pool) => {
                self.egress_pools.insert(id, Some(**pool));
            }
            MapOp::DeleteEgressPool(id) => {
                self.egress_pools.insert(id, None);
            }
        }
    }
}

struct Emitter<'a, 'm> {
    ops: &'a mut Vec<PlannedOp>,
    projected: &'a mut Projection<'m>,
    unit: usize,
}

impl Emitter<'_, '_> {
    fn emit(&mut self, service: &Option<ServicePortKey>, op: MapOp) {
        self.projected.record(&op);
        self.ops.push(PlannedOp {
            service: service.clone(),
            op,
            unit: self.unit,
        });
    }
}

/// The egress pool of a Service with more than one egress address: `egress` first, then the
/// others (translation caps them at [`EGRESS_POOL_MAX`]). None for one address (the data path
/// then never looks for a pool).
pub fn egress_pool(service: &DesiredService) -> Option<EgressPool> {
    let first = service.egress?;
    if service.extra_egress.is_empty() || service.cluster_egress {
        return None;
    }
    let mut pool = EgressPool::default();
    for (slot, ip) in pool
        .addrs
        .iter_mut()
        .zip(std::iter::once(&first).chain(&service.extra_egress))
    {
        *slot = Addr::from(*ip);
    }
    pool.count = (1 + service.extra_egress.len()).min(EGRESS_POOL_MAX) as u32;
    Some(pool)
}

/// A Maglev table for the endpoints `endpoints` whose backend ids (this node's) are `ids`, in the
/// same order: slot -> backend id. Every node builds the same slot -> endpoint mapping (from the
/// endpoints' identities) and writes its own ids. Without endpoints every slot is 0 (the data
/// path then falls back to the slots, which are empty too: the Service rejects).
pub fn maglev_table(endpoints: &[(IpAddr, u16)], ids: &[u32]) -> Arc<[u32]> {
    let (sorted, table) = crate::egress::maglev::table(endpoints);
    if sorted.is_empty() {
        return vec![0; proxy_common::MAGLEV_M].into();
    }
    let id_of: Vec<u32> = sorted
        .iter()
        .map(|e| endpoints.iter().position(|x| x == e).map_or(0, |i| ids[i]))
        .collect();
    table.iter().map(|i| id_of[*i as usize]).collect()
}
