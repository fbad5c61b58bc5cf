//! Keeping a [`Translation`] up to date one change at a time.
//!
//! A Service's translation depends on its own object, the EndpointSlices labelled with its name,
//! the node and the settings, and on things decided across Services: who keeps a contested
//! frontend (the Service serving it, else the oldest wanting it), which values filling hands out
//! (explicit values of every Service are taken, then each Service fills in turn, in
//! namespace/name order), which addresses are cluster IPs (not usable as endpoints) and which
//! are endpoints (not usable as external frontends). Each Service's result is cached with what
//! it wanted (frontends, fills, external addresses), and a change re-translates the Services it
//! touches: the changed ones, the other claimants of a frontend whose claims changed, the
//! Services whose endpoints or external addresses became or stopped being a cluster IP or an
//! endpoint, and, when the taken values changed, every later Service whose fills come out
//! differently. The result is the one a single pass over the whole inventory gives, with the same
//! frontends served before ([`super::translate_with`] is that pass: an update from nothing).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use proxy_common::FrontendKey;

use super::{
    Changes, ClaimReason, Claimed, DesiredService, Filled, NodeInfo, ObjectKey, ServicePortKey,
    Settings, SliceFacts, Sourced, Translation, Translator, Unhealthy, alloc, explicit_cluster_ips,
    fqdn, slice_facts, spec_of,
};
use crate::diag::{Diagnostic, ObjectRef, Origin, Site};
use crate::dns::{Resolved, Wanted};
use crate::names::SERVICE_NAME_LABEL;
use crate::objects::{ServiceObject as Service, SliceObject as EndpointSlice};

/// One value filling handed out (or could not), with what it was asked with: replaying the
/// request against the values taken now tells whether the answer would still be the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Allocation {
    ClusterIp(IpNet, u64, Option<IpAddr>),
    NodePort(u64, Option<u16>),
}

/// One Service's translation.
#[derive(Debug, Default)]
pub(super) struct ServiceOut {
    pub claimed: Option<ClaimReason>,
    pub diagnostics: Vec<Diagnostic>,
    pub filled: Vec<Filled>,
    /// Filled by the translator; moved into the translation's [`super::Desired`] afterwards.
    pub ports: Vec<(ServicePortKey, DesiredService)>,
    /// The keys of `ports`, kept once the values moved.
    port_keys: Vec<ServicePortKey>,
    /// Every frontend the Service wanted, kept or not, with the index of its port in `ports`.
    pub wanted: Vec<(FrontendKey, u32)>,
    pub allocations: Vec<Allocation>,
    /// External and load balancer addresses it wanted: they must not be endpoint addresses.
    pub external_addrs: Vec<IpAddr>,
}

impl ServiceOut {
    /// Kept until the Service changes again: drop the growth slack.
    fn shrink_to_fit(&mut self) {
        self.diagnostics.shrink_to_fit();
        self.filled.shrink_to_fit();
        self.port_keys.shrink_to_fit();
        self.wanted.shrink_to_fit();
        self.allocations.shrink_to_fit();
        self.external_addrs.sort_unstable();
        self.external_addrs.dedup();
        self.external_addrs.shrink_to_fit();
    }

    /// The first port (by key) wanting each frontend.
    fn first_claims(&self) -> Vec<(FrontendKey, &ServicePortKey)> {
        let mut first: Vec<(FrontendKey, &ServicePortKey)> = Vec::new();
        for (frontend, port) in &self.wanted {
            if !first.iter().any(|(f, _)| f == frontend) {
                first.push((*frontend, &self.port_keys[*port as usize]));
            }
        }
        first
    }
}

/// Explicit cluster IPs and nodePorts: taken for filling whether the Service is claimed or not.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reserved {
    ips: Vec<IpAddr>,
    node_ports: Vec<u16>,
}

impl Reserved {
    fn of(service: &Service) -> Self {
        let mut reserved = Reserved::default();
        let Some(spec) = spec_of(service) else {
            return reserved;
        };
        for (_, ip) in explicit_cluster_ips(spec) {
            if let Ok(ip) = ip.parse() {
                reserved.ips.push(ip);
            }
        }
        for port in spec.ports.iter().flatten() {
            if let Some(n) = port.node_port.and_then(|n| u16::try_from(n).ok()) {
                reserved.node_ports.push(n);
            }
        }
        // Kept with the Service: drop the growth slack.
        reserved.ips.shrink_to_fit();
        reserved.node_ports.shrink_to_fit();
        reserved
    }
}

#[derive(Debug)]
struct ServiceEntry {
    /// None once removed, until the next update forgets the entry.
    source: Option<Sourced<Service>>,
    reserved: Reserved,
    out: ServiceOut,
}

#[derive(Debug)]
pub(super) struct SliceEntry {
    /// Where the slice was read, and the Endpoints it was mirrored from: the slice's [`Site`]
    /// is made from these and its key when a diagnostic needs it, rather than kept for each of
    /// 10k slices.
    origin: Origin,
    mirrored_from: Option<Box<ObjectRef>>,
    /// The Service its label names, with the slice validated; None without the label.
    labelled: Option<(ObjectKey, SliceFacts)>,
    diagnostics: Vec<Diagnostic>,
}

impl SliceEntry {
    /// What diagnostics name the slice by: the Endpoints it mirrors, else itself.
    fn site(&self, key: &ObjectKey) -> Site {
        slice_site(&self.origin, self.mirrored_from.as_deref(), key)
    }
}

/// Every EndpointSlice by key.
pub(super) type Slices = BTreeMap<ObjectKey, Box<SliceEntry>>;

/// A slice labelled with the Service being translated.
pub(super) struct SliceRef<'a> {
    key: &'a ObjectKey,
    entry: &'a SliceEntry,
    facts: &'a SliceFacts,
}

impl<'a> SliceRef<'a> {
    pub fn facts(&self) -> &'a SliceFacts {
        self.facts
    }

    pub fn site(&self) -> Site {
        self.entry.site(self.key)
    }
}

/// The Service labelled on the first slice (by key) with an endpoint at `ip`.
pub(super) fn endpoint_service<'a>(slices: &'a Slices, ip: &IpAddr) -> Option<&'a ObjectKey> {
    slices.values().find_map(|entry| {
        let (service, facts) = entry.labelled.as_ref()?;
        facts
            .endpoints
            .iter()
            .any(|(e, _, _)| e == ip)
            .then_some(service)
    })
}

/// Why one Service keeps a frontend another one wants too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Precedence {
    /// It is serving the frontend.
    Serving,
    /// It was created first (Kubernetes mode).
    Older,
    /// Its manifest file was modified first.
    OlderFile,
    /// Its manifest file comes first by path.
    File,
    /// Its namespace/name comes first.
    Name,
}

/// Orders the Services wanting one frontend: the first keeps it.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank<'a> {
    /// Not the Service serving the frontend.
    newcomer: bool,
    age: (bool, Option<SystemTime>, Option<&'a str>),
    file: Option<&'a Path>,
    key: &'a ObjectKey,
}

impl Rank<'_> {
    /// Why `self`, ranked first, keeps the frontend from `other`.
    fn over(&self, other: &Rank<'_>) -> Precedence {
        if self.newcomer != other.newcomer {
            Precedence::Serving
        } else if self.age != other.age && self.file.is_some() {
            Precedence::OlderFile
        } else if self.age != other.age {
            Precedence::Older
        } else if self.file != other.file {
            Precedence::File
        } else {
            Precedence::Name
        }
    }
}

/// The Services wanting one frontend, and the one serving it after the last update.
#[derive(Debug, Default)]
struct Claim {
    claimants: Vec<Arc<ObjectKey>>,
    holder: Option<Arc<ObjectKey>>,
}

/// What ranks a Service among others wanting one frontend, besides its name.
fn rank_basis(source: &Sourced<Service>) -> (&super::Seniority, Option<&Path>) {
    let file = match &source.origin {
        Origin::Manifest { file, .. } => Some(&**file),
        Origin::Cluster => None,
    };
    (&source.seniority, file)
}

/// Where diagnostics about the slice `key` point: the Endpoints it mirrors, else itself.
fn slice_site(origin: &Origin, mirrored_from: Option<&ObjectRef>, key: &ObjectKey) -> Site {
    let reported = mirrored_from
        .cloned()
        .unwrap_or_else(|| ObjectRef::new("EndpointSlice", &*key.namespace, &*key.name));
    Site::new(origin.clone(), reported)
}

/// What every Service's translation may ask about the others.
#[derive(Debug, Default)]
pub(super) struct World {
    /// Boxed: an entry is a few hundred bytes, and B-tree nodes are mostly slack for values
    /// that large.
    services: BTreeMap<Arc<ObjectKey>, Box<ServiceEntry>>,
    /// The Services wanting each frontend.
    claims: HashMap<FrontendKey, Claim>,
    /// Who serves frontends that have no claim yet (the agent's incumbents, or the holders
    /// before a full update started over); consumed by the next update.
    pending_holders: HashMap<FrontendKey, Arc<ObjectKey>>,
    /// Frontends whose claims changed in this update: their holders are settled after it.
    touched: HashSet<FrontendKey>,
    /// The Services wanting each external or load balancer address.
    external_addrs: HashMap<IpAddr, Vec<Arc<ObjectKey>>>,
    /// How many endpoints (over all labelled slices) have each address.
    endpoint_addrs: HashMap<IpAddr, u32>,
    /// Explicit values, counted per Service that names them.
    reserved_ips: HashMap<IpAddr, u32>,
    reserved_node_ports: HashMap<u16, u32>,
    /// Filled-in values and the Service holding each.
    filled_ips: HashMap<IpAddr, Arc<ObjectKey>>,
    filled_node_ports: HashMap<u16, Arc<ObjectKey>>,
    /// Services that asked for values to be filled in.
    requesters: BTreeSet<Arc<ObjectKey>>,
}

impl World {
    fn rank<'a>(&'a self, key: &'a ObjectKey, holder: Option<&ObjectKey>) -> Rank<'a> {
        let basis = self
            .services
            .get(key)
            .and_then(|e| e.source.as_ref())
            .map(rank_basis);
        Rank {
            newcomer: holder != Some(key),
            age: basis.map_or((true, None, None), |(seniority, _)| seniority.order()),
            file: basis.and_then(|(_, file)| file),
            key,
        }
    }

    /// The Service that keeps a claimed frontend.
    fn winner<'a>(&'a self, claim: &'a Claim) -> Option<&'a Arc<ObjectKey>> {
        let holder = claim.holder.as_deref();
        claim
            .claimants
            .iter()
            .min_by(|a, b| self.rank(a, holder).cmp(&self.rank(b, holder)))
    }

    /// The port of another Service wanting `frontend` that keeps it from `key`, and why.
    pub fn owner_over(
        &self,
        key: &ObjectKey,
        frontend: &FrontendKey,
    ) -> Option<(ServicePortKey, Precedence)> {
        let claim = self.claims.get(frontend)?;
        let holder = claim.holder.as_deref();
        let (first, rank) = claim
            .claimants
            .iter()
            .filter(|c| ***c != *key)
            .map(|c| (c, self.rank(c, holder)))
            .min_by(|a, b| a.1.cmp(&b.1))?;
        if rank > self.rank(key, holder) {
            return None;
        }
        // The reason given is the one that would decide without the serving Service too, so
        // that it stays the same once the winner serves the frontend.
        let (theirs, ours) = (self.rank(first, None), self.rank(key, None));
        let why = if theirs < ours {
            theirs.over(&ours)
        } else {
            Precedence::Serving
        };
        let out = &self.services.get(first)?.out;
        let (_, port) = out.wanted.iter().find(|(f, _)| f == frontend)?;
        Some((out.port_keys.get(*port as usize)?.clone(), why))
    }

    /// After an update: whoever kept each frontend whose claims changed now serves it.
    fn settle_holders(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        let winners: Vec<(FrontendKey, Option<Arc<ObjectKey>>)> = touched
            .into_iter()
            .filter_map(|f| Some((f, self.winner(self.claims.get(&f)?).cloned())))
            .collect();
        for (frontend, winner) in winners {
            if let Some(claim) = self.claims.get_mut(&frontend) {
                claim.holder = winner;
            }
        }
        self.pending_holders.clear();
        self.pending_holders.shrink_to_fit();
    }

    /// Whether some endpoint has the address `ip`.
    pub fn is_endpoint_address(&self, ip: &IpAddr) -> bool {
        self.endpoint_addrs.contains_key(ip)
    }

    /// The Service whose cluster IP (explicit or filled in) is `ip`, if any.
    pub fn cluster_ip_owner(&self, ip: &IpAddr) -> Option<&ObjectKey> {
        if let Some(owner) = self.filled_ips.get(ip) {
            return Some(owner);
        }
        if !self.reserved_ips.contains_key(ip) {
            return None;
        }
        self.services
            .iter()
            .find(|(_, e)| e.reserved.ips.contains(ip))
            .map(|(k, _)| &**k)
    }

    /// A cluster IP for the Service `key`, as a single pass would hand it out: explicit values
    /// and what Services before `key` (and `key` itself, `own`) filled in are taken.
    pub fn cluster_ip(
        &self,
        key: &ObjectKey,
        cidr: &IpNet,
        seed: u64,
        own: &BTreeSet<IpAddr>,
    ) -> Option<IpAddr> {
        let at_most = self.reserved_ips.len() + self.filled_ips.len() + own.len();
        alloc::cluster_ip(cidr, seed, at_most, |ip| {
            self.reserved_ips.contains_key(ip)
                || own.contains(ip)
                || self.filled_ips.get(ip).is_some_and(|o| **o < *key)
        })
    }

    pub fn node_port(
        &self,
        key: &ObjectKey,
        range: &std::ops::RangeInclusive<u16>,
        seed: u64,
        own: &BTreeSet<u16>,
    ) -> Option<u16> {
        alloc::node_port(range, seed, |port| {
            self.reserved_node_ports.contains_key(port)
                || own.contains(port)
                || self.filled_node_ports.get(port).is_some_and(|o| **o < *key)
        })
    }

    /// Whether the fills of `key` come out as cached.
    fn fills_unchanged(&self, key: &ObjectKey, settings: &Settings) -> bool {
        let Some(entry) = self.services.get(key) else {
            return true;
        };
        let mut own_ips = BTreeSet::new();
        let mut own_ports = BTreeSet::new();
        entry.out.allocations.iter().all(|a| match a {
            Allocation::ClusterIp(cidr, seed, was) => {
                let now = self.cluster_ip(key, cidr, *seed, &own_ips);
                own_ips.extend(now);
                now == *was
            }
            Allocation::NodePort(seed, was) => {
                let now = self.node_port(key, &settings.node_port_range, *seed, &own_ports);
                own_ports.extend(now);
                now == *was
            }
        })
    }

    /// Updates the counts of explicit values; true if a value became taken or free. The cluster
    /// IPs named are added to `changed_ips`: whose they are may have changed.
    fn reserve(&mut self, old: &Reserved, new: &Reserved, changed_ips: &mut Vec<IpAddr>) -> bool {
        let mut flipped_ips = Vec::new();
        count(&mut self.reserved_ips, &old.ips, &new.ips, &mut flipped_ips);
        let mut flipped_ports = Vec::new();
        count(
            &mut self.reserved_node_ports,
            &old.node_ports,
            &new.node_ports,
            &mut flipped_ports,
        );
        changed_ips.extend(old.ips.iter().chain(&new.ips));
        !flipped_ips.is_empty() || !flipped_ports.is_empty()
    }

    /// Replaces what `key` wanted: frontend claims, external addresses and filled values. The
    /// other claimants of a frontend whose claims changed are added to `queue`, and filled
    /// cluster IPs that changed hands to `flipped_ips`; returns whether fills changed.
    fn record(
        &mut self,
        key: &Arc<ObjectKey>,
        old: &ServiceOut,
        new: &ServiceOut,
        queue: &mut BTreeSet<Arc<ObjectKey>>,
        flipped_ips: &mut Vec<IpAddr>,
    ) -> bool {
        let old_first = old.first_claims();
        let new_first = new.first_claims();
        for (frontend, port) in &old_first {
            match new_first.iter().find(|(f, _)| f == frontend) {
                Some((_, now)) if now == port => continue,
                Some(_) => {}
                None => {
                    if let Some(claim) = self.claims.get_mut(frontend) {
                        claim.claimants.retain(|c| c != key);
                        if claim.claimants.is_empty() {
                            self.claims.remove(frontend);
                        }
                    }
                }
            }
            self.touched.insert(*frontend);
            self.requeue_others(key, frontend, queue);
        }
        for (frontend, _) in &new_first {
            if old_first.iter().any(|(f, _)| f == frontend) {
                continue;
            }
            let pending = self.pending_holders.get(frontend);
            let claim = self.claims.entry(*frontend).or_insert_with(|| Claim {
                // Almost every frontend has one claimant.
                claimants: Vec::with_capacity(1),
                holder: pending.cloned(),
            });
            if !claim.claimants.contains(key) {
                claim.claimants.push(key.clone());
            }
            self.touched.insert(*frontend);
            self.requeue_others(key, frontend, queue);
        }

        if old.external_addrs != new.external_addrs {
            for ip in &old.external_addrs {
                if let Some(wanting) = self.external_addrs.get_mut(ip) {
                    wanting.retain(|c| c != key);
                    if wanting.is_empty() {
                        self.external_addrs.remove(ip);
                    }
                }
            }
            for ip in &new.external_addrs {
                let wanting = self.external_addrs.entry(*ip).or_default();
                if !wanting.contains(key) {
                    wanting.push(key.clone());
                }
            }
        }

        if old.allocations == new.allocations {
            return false;
        }
        for a in old.allocations.iter().chain(&new.allocations) {
            if let Allocation::ClusterIp(_, _, Some(ip)) = a {
                flipped_ips.push(*ip);
            }
        }
        for a in &old.allocations {
            match a {
                Allocation::ClusterIp(_, _, Some(ip)) if self.filled_ips.get(ip) == Some(key) => {
                    self.filled_ips.remove(ip);
                }
                Allocation::NodePort(_, Some(port))
                    if self.filled_node_ports.get(port) == Some(key) =>
                {
                    self.filled_node_ports.remove(port);
                }
                _ => {}
            }
        }
        for a in &new.allocations {
            match a {
                Allocation::ClusterIp(_, _, Some(ip)) => {
                    self.filled_ips.insert(*ip, key.clone());
                }
                Allocation::NodePort(_, Some(port)) => {
                    self.filled_node_ports.insert(*port, key.clone());
                }
                _ => {}
            }
        }
        if new.allocations.is_empty() {
            self.requesters.remove(key);
        } else {
            self.requesters.insert(key.clone());
        }
        true
    }

    /// Queues the other Services wanting `frontend`: who keeps it may have changed.
    fn requeue_others(
        &self,
        key: &ObjectKey,
        frontend: &FrontendKey,
        queue: &mut BTreeSet<Arc<ObjectKey>>,
    ) {
        if let Some(claim) = self.claims.get(frontend) {
            queue.extend(claim.claimants.iter().filter(|c| ***c != *key).cloned());
        }
    }
}

/// Counts `new` in and `old` out of `map`, adding the values that became present or absent to
/// `flipped`.
fn count<T: std::hash::Hash + Eq + Copy>(
    map: &mut HashMap<T, u32>,
    old: &[T],
    new: &[T],
    flipped: &mut Vec<T>,
) {
    for v in new {
        let n = map.entry(*v).or_default();
        *n += 1;
        if *n == 1 {
            flipped.push(*v);
        }
    }
    for v in old {
        if let Some(n) = map.get_mut(v) {
            *n -= 1;
            if *n == 0 {
                map.remove(v);
                flipped.push(*v);
            }
        }
    }
}

/// A translation kept up to date: feed it object changes, then [`Incremental::update`].
#[derive(Debug)]
pub struct Incremental {
    node: NodeInfo,
    settings: Settings,
    world: World,
    /// Boxed, as [`World::services`].
    slices: Slices,
    /// Slices by the Service their label names.
    /// Sorted Vecs, not BTreeSets: a Service has a slice or two, and a B-tree leaf for each of
    /// 10k Services was 5 MB.
    slices_by_service: BTreeMap<ObjectKey, Vec<ObjectKey>>,
    /// Services to translate again (their object or their slices changed).
    dirty: BTreeSet<ObjectKey>,
    /// Services whose age or file changed: the messages of Services losing a frontend to them
    /// give another reason.
    reranked: BTreeSet<ObjectKey>,
    /// The next update translates everything (the first one, new node facts or settings).
    full: bool,
    diagnostics_dirty: bool,
    /// Problems found before translation (reading manifests): reported first.
    source_diagnostics: Vec<Diagnostic>,
    /// Endpoints health checking judged unhealthy, by Service.
    unhealthy: HashMap<ObjectKey, Arc<Unhealthy>>,
    translation: Translation,
    /// The resolver's answers, which FQDN slices' endpoints come from.
    resolved: Arc<Resolved>,
    /// FQDN slices as given: translated again when their names' answers change.
    fqdn_slices: BTreeMap<ObjectKey, Sourced<EndpointSlice>>,
}

impl Incremental {
    pub fn new(node: NodeInfo, settings: Settings) -> Self {
        Incremental {
            node,
            settings,
            world: World::default(),
            slices: BTreeMap::new(),
            slices_by_service: BTreeMap::new(),
            dirty: BTreeSet::new(),
            reranked: BTreeSet::new(),
            full: true,
            diagnostics_dirty: true,
            source_diagnostics: Vec::new(),
            unhealthy: HashMap::new(),
            translation: Translation::default(),
            resolved: Arc::default(),
            fqdn_slices: BTreeMap::new(),
        }
    }

    /// New answers from the resolver: the FQDN slices naming a name whose answer changed are
    /// translated again at the next update.
    pub fn set_resolved(&mut self, resolved: Arc<Resolved>) {
        let changed = self.resolved.changed_names(&resolved);
        self.resolved = resolved;
        if changed.is_empty() {
            return;
        }
        let affected: Vec<(ObjectKey, Sourced<EndpointSlice>)> = self
            .fqdn_slices
            .iter()
            .filter(|(_, s)| {
                s.object
                    .endpoints
                    .iter()
                    .filter_map(|e| e.addresses.first())
                    .any(|name| changed.contains(name.as_str()))
            })
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for (key, slice) in affected {
            self.set_slice(key, Some(slice));
        }
    }

    /// The names the FQDN slices of served Services need looked up, and in which families.
    pub fn dns_wanted(&self) -> Wanted {
        let mut wanted = Wanted::new();
        for (key, slice) in &self.fqdn_slices {
            let Some(label) = slice.object.metadata.labels.get(SERVICE_NAME_LABEL) else {
                continue;
            };
            let service_key = ObjectKey {
                namespace: key.namespace.clone(),
                name: label.into(),
            };
            let service = self
                .world
                .services
                .get(&service_key)
                .and_then(|e| e.source.as_ref())
                .map(|s| &*s.object);
            fqdn::want(&slice.object, service, &self.settings, &mut wanted);
        }
        wanted
    }

    /// The endpoints of Service `key` health checking judges unhealthy (None: all healthy);
    /// the Service is translated again at the next update if that changed.
    pub fn set_unhealthy(&mut self, key: ObjectKey, unhealthy: Option<Arc<Unhealthy>>) {
        let unhealthy = unhealthy.filter(|u| !u.endpoints.is_empty());
        if self.unhealthy.get(&key) == unhealthy.as_ref() {
            return;
        }
        match unhealthy {
            Some(u) => self.unhealthy.insert(key.clone(), u),
            None => self.unhealthy.remove(&key),
        };
        self.dirty.insert(key);
    }

    /// The translation as of the last update.
    pub fn translation(&self) -> &Translation {
        &self.translation
    }

    pub fn into_translation(self) -> Translation {
        self.translation
    }

    /// New node facts or settings: the next update translates everything (rare: a Node's
    /// addresses or egress changed).
    pub fn reconfigure(&mut self, node: &NodeInfo, settings: &Settings) {
        if self.node != *node || self.settings != *settings {
            self.node = node.clone();
            self.settings = settings.clone();
            self.full = true;
        }
    }

    /// Which Service serves each frontend now (the maps, when the agent starts on maps a
    /// previous agent left): a frontend stays with that Service as long as it wants it, whoever
    /// else comes to want it too. Frontends of Services that do not want them any more, and
    /// frontends nobody serves yet, go to the oldest Service wanting them. After every update
    /// the translator goes on from what it decided itself.
    pub fn set_incumbents(
        &mut self,
        incumbents: impl IntoIterator<Item = (FrontendKey, ObjectKey)>,
    ) {
        let mut shared: HashMap<ObjectKey, Arc<ObjectKey>> = HashMap::new();
        self.world.pending_holders = incumbents
            .into_iter()
            .map(|(frontend, key)| {
                let key = shared
                    .entry(key)
                    .or_insert_with_key(|k| Arc::new(k.clone()))
                    .clone();
                (frontend, key)
            })
            .collect();
        self.full = true;
    }

    /// Problems the source found (manifest mode: files, duplicates, mirroring), reported ahead of
    /// the translation's own.
    pub fn set_source_diagnostics(&mut self, diagnostics: Vec<Diagnostic>) {
        if self.source_diagnostics != diagnostics {
            self.source_diagnostics = diagnostics;
            self.diagnostics_dirty = true;
        }
    }

    /// Adds, replaces (Some) or removes (None) a Service.
    pub fn set_service(&mut self, key: ObjectKey, service: Option<Sourced<Service>>) {
        let existed = match self.world.services.get_mut(&key) {
            Some(entry) => {
                let existed = entry.source.is_some();
                // Compared with what the last translation ranked, even when the Service is
                // removed and added back before the next update.
                if let Some(old) = &entry.source
                    && service
                        .as_ref()
                        .is_none_or(|new| rank_basis(old) != rank_basis(new))
                {
                    self.reranked.insert(key.clone());
                }
                entry.source = service;
                existed != entry.source.is_some()
            }
            None if service.is_none() => return,
            None => {
                self.world.services.insert(
                    Arc::new(key.clone()),
                    Box::new(ServiceEntry {
                        source: service,
                        reserved: Reserved::default(),
                        out: ServiceOut::default(),
                    }),
                );
                true
            }
        };
        // Slices naming a Service that comes or goes gain or lose "there is no Service".
        if existed && self.slices_by_service.contains_key(&key) {
            self.diagnostics_dirty = true;
        }
        self.dirty.insert(key);
    }

    /// Adds, replaces (Some) or removes (None) an EndpointSlice.
    pub fn set_slice(&mut self, key: ObjectKey, slice: Option<Sourced<EndpointSlice>>) {
        match &slice {
            Some(s) if s.object.address_type == "FQDN" => {
                self.fqdn_slices.insert(key.clone(), s.clone());
            }
            _ => {
                self.fqdn_slices.remove(&key);
            }
        }
        // Endpoint addresses that come or go: a Service with one as an external address is
        // translated again (the address is refused, or no longer, or its message names
        // another Service).
        let mut changed = Vec::new();
        if let Some(old) = self.slices.remove(&key) {
            self.note_slice(&old);
            if let Some((_, facts)) = &old.labelled {
                let old_ips: Vec<IpAddr> = facts.endpoints.iter().map(|(ip, _, _)| *ip).collect();
                count(
                    &mut self.world.endpoint_addrs,
                    &old_ips,
                    &[],
                    &mut Vec::new(),
                );
                changed.extend(old_ips);
            }
            if let Some((service, _)) = old.labelled {
                if let Some(keys) = self.slices_by_service.get_mut(&service) {
                    if let Ok(at) = keys.binary_search(&key) {
                        keys.remove(at);
                    }
                    if keys.is_empty() {
                        self.slices_by_service.remove(&service);
                    }
                }
                self.dirty.insert(service);
            }
        }
        let Some(slice) = slice else {
            self.requeue_external(&changed);
            return;
        };
        let site = slice_site(&slice.origin, slice.mirrored_from.as_deref(), &key);
        let label = slice.object.metadata.labels.get(SERVICE_NAME_LABEL);
        let mut diagnostics = Vec::new();
        let labelled = label.map(|name| {
            let service = ObjectKey {
                namespace: key.namespace.clone(),
                name: name.into(),
            };
            let facts = slice_facts(&slice.object, &site, &mut diagnostics, &self.resolved);
            (service, facts)
        });
        let Site { origin, object } = site;
        let entry = SliceEntry {
            origin,
            mirrored_from: slice.mirrored_from.is_some().then(|| Box::new(object)),
            labelled,
            diagnostics,
        };
        self.note_slice(&entry);
        if let Some((_, facts)) = &entry.labelled {
            let new_ips: Vec<IpAddr> = facts.endpoints.iter().map(|(ip, _, _)| *ip).collect();
            count(
                &mut self.world.endpoint_addrs,
                &[],
                &new_ips,
                &mut Vec::new(),
            );
            changed.extend(new_ips);
        }
        self.requeue_external(&changed);
        if let Some((service, _)) = &entry.labelled {
            let keys = self
                .slices_by_service
                .entry(service.clone())
                .or_insert_with(|| Vec::with_capacity(1));
            if let Err(at) = keys.binary_search(&key) {
                keys.insert(at, key.clone());
            }
            self.dirty.insert(service.clone());
        }
        self.slices.insert(key, Box::new(entry));
    }

    /// Marks dirty the Services wanting one of `ips` as an external address.
    fn requeue_external(&mut self, ips: &[IpAddr]) {
        for ip in ips {
            if let Some(wanting) = self.world.external_addrs.get(ip) {
                self.dirty.extend(wanting.iter().map(|k| (**k).clone()));
            }
        }
    }

    /// Queues the Services with an endpoint at one of `ips`: whether it is a cluster IP changed.
    fn requeue_endpoint_users(&self, ips: &[IpAddr], queue: &mut BTreeSet<Arc<ObjectKey>>) {
        for ip in ips {
            if !self.world.is_endpoint_address(ip) {
                continue;
            }
            for entry in self.slices.values() {
                let Some((service, facts)) = &entry.labelled else {
                    continue;
                };
                if !facts.endpoints.iter().any(|(e, _, _)| e == ip) {
                    continue;
                }
                if let Some((key, e)) = self.world.services.get_key_value(service)
                    && e.source.is_some()
                {
                    queue.insert(key.clone());
                }
            }
        }
    }

    /// Marks the diagnostics dirty if `slice` contributes any.
    fn note_slice(&mut self, slice: &SliceEntry) {
        let contributes = match &slice.labelled {
            None => true,
            Some((service, _)) => !slice.diagnostics.is_empty() || !self.service_exists(service),
        };
        self.diagnostics_dirty |= contributes;
    }

    fn service_exists(&self, key: &ObjectKey) -> bool {
        self.world
            .services
            .get(key)
            .is_some_and(|e| e.source.is_some())
    }

    /// Translates what changed since the last update.
    pub fn update(&mut self) -> &Translation {
        let full = std::mem::take(&mut self.full);
        let mut changes = Changes {
            diagnostics: std::mem::take(&mut self.diagnostics_dirty),
            ..Changes::default()
        };
        let mut dirty = std::mem::take(&mut self.dirty);
        if full {
            let world = &mut self.world;
            for entry in world.services.values_mut() {
                entry.out = ServiceOut::default();
                entry.reserved = Reserved::default();
            }
            // Starting over forgets the claims, not who serves what.
            for (frontend, claim) in world.claims.drain() {
                if let Some(holder) = claim.holder {
                    world.pending_holders.entry(frontend).or_insert(holder);
                }
            }
            world.touched.clear();
            world.external_addrs.clear();
            world.reserved_ips.clear();
            world.reserved_node_ports.clear();
            world.filled_ips.clear();
            world.filled_node_ports.clear();
            world.requesters.clear();
            self.translation.desired.services.clear();
            dirty.extend(world.services.keys().map(|k| (**k).clone()));
            changes.diagnostics = true;
            changes.claims = true;
        }

        // Explicit values and removals first: both change what every later Service sees.
        let mut queue: BTreeSet<Arc<ObjectKey>> = BTreeSet::new();
        let mut refill = false;
        let mut flipped_ips = Vec::new();
        for key in dirty {
            let Some((arc, entry)) = self.world.services.get_key_value(&key) else {
                continue;
            };
            let arc = arc.clone();
            let reserved = entry
                .source
                .as_ref()
                .map(|s| Reserved::of(&s.object))
                .unwrap_or_default();
            if reserved != entry.reserved {
                let old = std::mem::take(&mut self.world.services.get_mut(&key).unwrap().reserved);
                refill |= self.world.reserve(&old, &reserved, &mut flipped_ips);
                self.world.services.get_mut(&key).unwrap().reserved = reserved;
            }
            if self.world.services[&key].source.is_some() {
                queue.insert(arc);
                continue;
            }
            let Some(entry) = self.world.services.remove(&key) else {
                continue;
            };
            refill |= self.world.record(
                &arc,
                &entry.out,
                &ServiceOut::default(),
                &mut queue,
                &mut flipped_ips,
            );
            self.forget_outputs(&entry.out, &ServiceOut::default(), &mut changes);
        }
        self.requeue_endpoint_users(&flipped_ips, &mut queue);
        for key in std::mem::take(&mut self.reranked) {
            if let Some(entry) = self.world.services.get(&key) {
                for (frontend, _) in entry.out.first_claims() {
                    self.world.requeue_others(&key, &frontend, &mut queue);
                }
            }
        }

        // In namespace/name order, so every Service sees the Services before it as they are now.
        // The cursor is how far fills are known to be settled: a Service translated again for
        // a frontend or an endpoint, its fills unchanged, does not move it back.
        let mut cursor: Option<Arc<ObjectKey>> = None;
        loop {
            let next_dirty = queue.first().cloned();
            let next_requester = if refill {
                let from = match &cursor {
                    Some(c) => Bound::Excluded(&**c),
                    None => Bound::Unbounded,
                };
                self.world
                    .requesters
                    .range::<ObjectKey, _>((from, Bound::Unbounded))
                    .next()
                    .cloned()
            } else {
                None
            };
            let key = match (next_dirty, next_requester) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => break,
            };
            let was_dirty = queue.remove(&key);
            let ahead = cursor.as_ref().is_none_or(|c| key > *c);
            if ahead {
                cursor = Some(key.clone());
            }
            if !was_dirty && self.world.fills_unchanged(&key, &self.settings) {
                continue;
            }
            let refilled = self.retranslate(&key, &mut queue, &mut changes);
            if refilled && !ahead {
                cursor = Some(key.clone());
            }
            refill |= refilled;
        }
        self.world.settle_holders();

        if changes.diagnostics {
            self.translation.diagnostics = self.collect_diagnostics();
            // These lists are kept until the next change: drop the growth slack.
            self.translation.diagnostics.shrink_to_fit();
        }
        if changes.claims {
            let services = &self.world.services;
            self.translation.claimed = services
                .iter()
                .filter_map(|(key, e)| {
                    e.out.claimed.map(|reason| Claimed {
                        service: (**key).clone(),
                        reason,
                    })
                })
                .collect();
            self.translation.filled = services
                .values()
                .flat_map(|e| e.out.filled.iter().cloned())
                .collect();
            self.translation.claimed.shrink_to_fit();
            self.translation.filled.shrink_to_fit();
        }
        self.translation.changes = (!full).then_some(changes);
        &self.translation
    }

    /// Translates one Service again; returns whether its fills changed.
    fn retranslate(
        &mut self,
        key: &Arc<ObjectKey>,
        queue: &mut BTreeSet<Arc<ObjectKey>>,
        changes: &mut Changes,
    ) -> bool {
        let Some(source) = self
            .world
            .services
            .get(&**key)
            .and_then(|e| e.source.as_ref())
        else {
            return false;
        };
        let slices: Vec<SliceRef<'_>> = self
            .slices_by_service
            .get(&**key)
            .into_iter()
            .flatten()
            .filter_map(|k| {
                let (key, entry) = self.slices.get_key_value(k)?;
                let (_, facts) = entry.labelled.as_ref()?;
                Some(SliceRef { key, entry, facts })
            })
            .collect();
        let site = Site::new(
            source.origin.clone(),
            ObjectRef::new("Service", &*key.namespace, &*key.name),
        );
        let mut t = Translator {
            settings: &self.settings,
            node: &self.node,
            world: &self.world,
            slices: &self.slices,
            key,
            out: ServiceOut::default(),
            own_ips: BTreeSet::new(),
            own_node_ports: BTreeSet::new(),
            frontend_owners: HashMap::new(),
            unusable_endpoints: BTreeSet::new(),
            unhealthy: self.unhealthy.get(&**key).map(|u| &**u),
        };
        if let Some(reason) = t.claim(&source.object, &site) {
            t.out.claimed = Some(reason);
            t.service(key, &source.object, &site, &slices);
        }
        let mut new = t.out;
        new.port_keys = new.ports.iter().map(|(k, _)| k.clone()).collect();
        let old = std::mem::take(&mut self.world.services.get_mut(&**key).unwrap().out);
        let mut flipped_ips = Vec::new();
        let refill = self.world.record(key, &old, &new, queue, &mut flipped_ips);
        self.requeue_endpoint_users(&flipped_ips, queue);
        self.forget_outputs(&old, &new, changes);
        let desired = &mut self.translation.desired.services;
        for (port, service) in std::mem::take(&mut new.ports) {
            if desired.get(&port) != Some(&service) {
                changes.services.insert(port.clone());
                desired.insert(port, service);
            }
        }
        new.shrink_to_fit();
        self.world.services.get_mut(&**key).unwrap().out = new;
        refill
    }

    /// Drops the service ports `old` had and `new` has not, and notes which lists changed.
    fn forget_outputs(&mut self, old: &ServiceOut, new: &ServiceOut, changes: &mut Changes) {
        for port in &old.port_keys {
            if !new.port_keys.contains(port) {
                self.translation.desired.services.remove(port);
                changes.services.insert(port.clone());
            }
        }
        changes.diagnostics |= old.diagnostics != new.diagnostics;
        changes.claims |= old.claimed != new.claimed || old.filled != new.filled;
    }

    /// Every diagnostic in the order a single pass reports them: slices, then Services, each
    /// by namespace/name.
    fn collect_diagnostics(&self) -> Vec<Diagnostic> {
        let mut all = self.source_diagnostics.clone();
        for (key, slice) in &self.slices {
            let site = || slice.site(key);
            match &slice.labelled {
                None => all.push(site().info(
                    "metadata.labels",
                    format!("no {SERVICE_NAME_LABEL} label: these endpoints belong to no Service"),
                )),
                Some((service, _)) if !self.service_exists(service) => all.push(site().info(
                    &format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                    format!("there is no Service {service}: these endpoints are not used"),
                )),
                Some(_) => {}
            }
            all.extend(slice.diagnostics.iter().cloned());
        }
        for entry in self.world.services.values() {
            all.extend(entry.out.diagnostics.iter().cloned());
        }
        all
    }
}

#[cfg(test)]
mod tests;
