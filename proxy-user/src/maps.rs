//! The data path's maps as the agent sees them: apply [`MapOp`]s, read snapshots and tables.
//!
//! Opened either from a loaded object (taking the maps out of [`aya::Ebpf`]) or from their pins
//! (`extproxy inspect`, adoption after a restart).

use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key;
use aya::maps::{
    Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues,
};
use std::collections::BTreeSet;
use std::net::IpAddr;

use aya::sys::SyscallError;
use proxy_common::{
    ALL_MAPS, Addr, AffinityKey, AffinityValue, BackendHealth, BackendValue, CE_F_LOCAL,
    ClusterEgress, Config, Counter, CtKey, CtValue, EgressPool, FE_FILTER_WORDS, FrontendKey,
    FrontendValue, MAGLEV_SLOTS, MAP_AFFINITY, MAP_BACKEND_HEALTH, MAP_BACKENDS,
    MAP_CLUSTER_EGRESS, MAP_CONFIG, MAP_COUNTERS, MAP_CT, MAP_CT_NEW, MAP_EGRESS_POOLS,
    MAP_FE_FILTER, MAP_FRONTENDS, MAP_MAGLEV, MAP_REVNAT, MAP_SERVICES, MAP_SLOTS, MAP_SRC_RANGES,
    MAP_SVC_STATS, MAP_TUNNEL_PEERS, MaglevTable, RevNatKey, RevNatValue, ServiceStats,
    ServiceValue, SlotKey, SrcRangeKey,
};
use thiserror::Error;

use crate::reconcile::{MapOp, MapSnapshot, MapState, MapWriteError, MapWriter, SrcRange};

#[derive(Debug, Error)]
pub enum MapsError {
    #[error("map {0} is not in the eBPF object")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinned map {}: {source}", path.display())]
    Pinned {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("pinning map {name} at {}: {source}", path.display())]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}

/// The maps the agent reads or writes (FRAGS is the data path's alone).
pub struct DatapathMaps {
    config: Array<MapData, Config>,
    frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    services: HashMap<MapData, u32, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: Array<MapData, BackendValue>,
    backend_health: HealthCounters,
    cluster_egress: HashMap<MapData, Addr, ClusterEgress>,
    tunnel_peers: HashMap<MapData, Addr, u32>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    egress_pools: HashMap<MapData, u32, EgressPool>,
    ct: HashMap<MapData, CtKey, CtValue>,
    ct_new: HashMap<MapData, CtKey, CtValue>,
    revnat: HashMap<MapData, RevNatKey, RevNatValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    src_ranges: LpmTrie<MapData, SrcRangeKey, u8>,
    counters: PerCpuArray<MapData, u64>,
    svc_stats: PerCpuArray<MapData, ServiceStats>,
    fe_filter: Array<MapData, u64>,
    filter: FilterWords,
}

/// FE_FILTER as the agent wants it and as it last wrote it. Bits are set as frontends are put;
/// removals only mark the filter for a rebuild from all frontends: a stale bit costs a lookup,
/// never a wrong answer, so the order against the FRONTENDS writes does not matter.
struct FilterWords {
    want: Vec<u64>,
    /// None until written once: pinned maps may hold anything.
    written: Option<Vec<u64>>,
    rebuild: bool,
}

impl FilterWords {
    fn new() -> Self {
        FilterWords {
            want: vec![0; FE_FILTER_WORDS as usize],
            written: None,
            rebuild: true,
        }
    }

    fn set(&mut self, key: &FrontendKey) {
        let slot = key.filter_slot();
        self.want[slot.word as usize] |= slot.mask;
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, map: Map) -> Result<T, MapsError> {
    T::try_from(map).map_err(in_map(name))
}

/// Names the map an error came from.
fn in_map(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Every entry of a map, or the first error reading it.
fn entries<T>(
    name: &'static str,
    iter: impl Iterator<Item = Result<T, MapError>>,
) -> Result<Vec<T>, MapsError> {
    iter.collect::<Result<_, _>>().map_err(in_map(name))
}

impl DatapathMaps {
    /// Takes the maps out of a loaded object; the programs keep their own references.
    pub fn take_from(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        Self::open(|name| ebpf.take_map(name).ok_or(MapsError::Missing(name)))
    }

    /// Opens the maps pinned in `dir` (one file per map, named as in proxy_common).
    pub fn from_pinned(dir: &Path) -> Result<Self, MapsError> {
        Self::open(|name| {
            let path = dir.join(name);
            MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .map_err(|source| MapsError::Pinned { path, source })
        })
    }

    fn open(
        mut get: impl FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        Ok(DatapathMaps {
            config: typed(MAP_CONFIG, get(MAP_CONFIG)?)?,
            frontends: typed(MAP_FRONTENDS, get(MAP_FRONTENDS)?)?,
            services: typed(MAP_SERVICES, get(MAP_SERVICES)?)?,
            slots: typed(MAP_SLOTS, get(MAP_SLOTS)?)?,
            backends: typed(MAP_BACKENDS, get(MAP_BACKENDS)?)?,
            backend_health: HealthCounters(typed(MAP_BACKEND_HEALTH, get(MAP_BACKEND_HEALTH)?)?),
            cluster_egress: typed(MAP_CLUSTER_EGRESS, get(MAP_CLUSTER_EGRESS)?)?,
            tunnel_peers: typed(MAP_TUNNEL_PEERS, get(MAP_TUNNEL_PEERS)?)?,
            maglev: typed(MAP_MAGLEV, get(MAP_MAGLEV)?)?,
            egress_pools: typed(MAP_EGRESS_POOLS, get(MAP_EGRESS_POOLS)?)?,
            ct: typed(MAP_CT, get(MAP_CT)?)?,
            ct_new: typed(MAP_CT_NEW, get(MAP_CT_NEW)?)?,
            revnat: typed(MAP_REVNAT, get(MAP_REVNAT)?)?,
            affinity: typed(MAP_AFFINITY, get(MAP_AFFINITY)?)?,
            src_ranges: typed(MAP_SRC_RANGES, get(MAP_SRC_RANGES)?)?,
            counters: typed(MAP_COUNTERS, get(MAP_COUNTERS)?)?,
            svc_stats: typed(MAP_SVC_STATS, get(MAP_SVC_STATS)?)?,
            fe_filter: typed(MAP_FE_FILTER, get(MAP_FE_FILTER)?)?,
            filter: FilterWords::new(),
        })
    }

    fn map_data(&self, name: &'static str) -> Option<&MapData> {
        Some(match name {
            MAP_CONFIG => IterableMap::map(&self.config),
            MAP_FRONTENDS => IterableMap::map(&self.frontends),
            MAP_SERVICES => IterableMap::map(&self.services),
            MAP_SLOTS => IterableMap::map(&self.slots),
            MAP_BACKENDS => IterableMap::map(&self.backends),
            MAP_BACKEND_HEALTH => IterableMap::map(&self.backend_health.0),
            MAP_CLUSTER_EGRESS => IterableMap::map(&self.cluster_egress),
            MAP_TUNNEL_PEERS => IterableMap::map(&self.tunnel_peers),
            MAP_MAGLEV => IterableMap::map(&self.maglev),
            MAP_EGRESS_POOLS => IterableMap::map(&self.egress_pools),
            MAP_CT => IterableMap::map(&self.ct),
            MAP_CT_NEW => IterableMap::map(&self.ct_new),
            MAP_REVNAT => IterableMap::map(&self.revnat),
            MAP_AFFINITY => IterableMap::map(&self.affinity),
            MAP_SRC_RANGES => IterableMap::map(&self.src_ranges),
            MAP_COUNTERS => IterableMap::map(&self.counters),
            MAP_SVC_STATS => IterableMap::map(&self.svc_stats),
            MAP_FE_FILTER => IterableMap::map(&self.fe_filter),
            _ => return None,
        })
    }

    /// Pins every map this struct holds under `dir` (which must be on a bpffs).
    pub fn pin(&self, dir: &Path) -> Result<(), MapsError> {
        for name in ALL_MAPS {
            if let Some(data) = self.map_data(name) {
                let path = dir.join(name);
                data.pin(&path)
                    .map_err(|source| MapsError::Pin { name, path, source })?;
            }
        }
        Ok(())
    }

    /// max_entries of a map as the kernel reports it (0 if it cannot be read).
    pub fn max_entries(&self, name: &'static str) -> u32 {
        self.map_data(name)
            .and_then(|data| data.info().ok())
            .map_or(0, |info| info.max_entries())
    }

    fn write_error(&self, name: &'static str, err: MapError) -> MapWriteError {
        let full = match &err {
            MapError::OutOfBounds { .. } => true,
            // Hash maps say E2BIG when full, LPM tries ENOSPC.
            MapError::SyscallError(SyscallError { io_error, .. }) => {
                matches!(io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
            }
            _ => false,
        };
        if full {
            MapWriteError::Full {
                map: name,
                max_entries: self.max_entries(name),
            }
        } else {
            MapWriteError::Failed {
                map: name,
                reason: err.to_string(),
            }
        }
    }

    pub fn config(&self) -> Result<Config, MapsError> {
        self.config.get(&0, 0).map_err(in_map(MAP_CONFIG))
    }

    /// The tunnel to cluster egress owners: this node's IPv4 address as the outer source (None:
    /// this node sends nothing through it) and the uplink's MTU, which bounds the MSS of
    /// tunnelled TCP flows.
    pub fn set_tunnel(
        &mut self,
        source: Option<std::net::Ipv4Addr>,
        mtu: u32,
    ) -> Result<(), MapsError> {
        let mut cfg = self.config()?;
        cfg.tunnel_src_v4 = source.map_or(0, |a| u32::from_ne_bytes(a.octets()));
        let room = mtu.saturating_sub(proxy_common::TUNNEL_OVERHEAD_V4);
        cfg.tunnel_mss_v4 = room.saturating_sub(40).min(u16::MAX as u32) as u16;
        cfg.tunnel_mss_v6 = room.saturating_sub(60).min(u16::MAX as u32) as u16;
        self.config.set(0, cfg, 0).map_err(in_map(MAP_CONFIG))
    }

    /// How many FE_FILTER bits are set (of [`proxy_common::FE_FILTER_BITS`]), as last written.
    pub fn frontend_filter_bits(&self) -> u32 {
        self.filter
            .written
            .as_ref()
            .map_or(0, |w| w.iter().map(|word| word.count_ones()).sum())
    }

    /// What the reconciler needs to adopt the maps.
    pub fn snapshot(&self) -> Result<MapSnapshot, MapsError> {
        let mut backends = Vec::new();
        for id in 0..self.backends.len() {
            let value = self.backends.get(&id, 0).map_err(in_map(MAP_BACKENDS))?;
            if value != BackendValue::default() {
                backends.push((id, value));
            }
        }
        Ok(MapSnapshot {
            frontends: entries(MAP_FRONTENDS, self.frontends.iter())?,
            services: entries(MAP_SERVICES, self.services.iter())?,
            slots: entries(MAP_SLOTS, self.slots.iter())?,
            backends,
            src_ranges: entries(
                MAP_SRC_RANGES,
                self.src_ranges.iter().map(|entry| {
                    entry.map(|(key, _)| {
                        let data = key.data();
                        SrcRange {
                            service_id: data.service_id,
                            addr: data.addr,
                            prefix_len: key.prefix_len(),
                        }
                    })
                }),
            )?,
        })
    }

    /// Every tracked flow: established ones (CT), then those not established yet (CT_NEW).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>, MapsError> {
        let mut flows = entries(MAP_CT, self.ct.iter())?;
        flows.extend(entries(MAP_CT_NEW, self.ct_new.iter())?);
        Ok(flows)
    }

    /// How many flows each table holds: (established, not established yet).
    pub fn conntrack_counts(&self) -> (usize, usize) {
        (self.ct.keys().count(), self.ct_new.keys().count())
    }

    /// Deletes a flow from whichever table holds it (already gone is fine: the data path may
    /// have beaten us).
    pub fn remove_ct(&mut self, key: &CtKey) -> Result<(), MapsError> {
        ignore_missing(self.ct.remove(key)).map_err(in_map(MAP_CT))?;
        ignore_missing(self.ct_new.remove(key)).map_err(in_map(MAP_CT_NEW))
    }

    pub fn remove_revnat(&mut self, key: &RevNatKey) -> Result<(), MapsError> {
        ignore_missing(self.revnat.remove(key)).map_err(in_map(MAP_REVNAT))
    }

    pub fn reverse_nat(&self) -> Result<Vec<(RevNatKey, RevNatValue)>, MapsError> {
        entries(MAP_REVNAT, self.revnat.iter())
    }

    /// Who serves the cluster egress address `addr`: `owner` (its node address; None: nobody, new
    /// flows are refused), `local` when it is this node.
    pub fn set_cluster_egress(
        &mut self,
        addr: IpAddr,
        owner: Option<IpAddr>,
        local: bool,
    ) -> Result<(), MapsError> {
        let value = ClusterEgress {
            owner: owner.map_or(Addr::ZERO, Addr::from),
            flags: if local { CE_F_LOCAL } else { 0 },
            reserved: 0,
        };
        self.cluster_egress
            .insert(Addr::from(addr), value, 0)
            .map_err(in_map(MAP_CLUSTER_EGRESS))
    }

    /// Forgets the cluster egress address `addr` (its Services' new flows are refused).
    pub fn remove_cluster_egress(&mut self, addr: IpAddr) -> Result<(), MapsError> {
        ignore_missing(self.cluster_egress.remove(&Addr::from(addr)))
            .map_err(in_map(MAP_CLUSTER_EGRESS))
    }

    /// Every cluster egress address the data path knows, with its owner.
    pub fn cluster_egress(&self) -> Result<Vec<(Addr, ClusterEgress)>, MapsError> {
        entries(MAP_CLUSTER_EGRESS, self.cluster_egress.iter())
    }

    /// Every egress pool (service id, pool): the Services with more than one egress address.
    pub fn egress_pools(&self) -> Result<Vec<(u32, EgressPool)>, MapsError> {
        entries(MAP_EGRESS_POOLS, self.egress_pools.iter())
    }

    /// The nodes whose tunnelled packets are served.
    pub fn tunnel_peers(&self) -> Result<Vec<Addr>, MapsError> {
        entries(MAP_TUNNEL_PEERS, self.tunnel_peers.keys())
    }

    /// Makes the set of nodes whose tunnelled packets are served exactly `peers`.
    pub fn set_tunnel_peers(&mut self, peers: &BTreeSet<IpAddr>) -> Result<(), MapsError> {
        let want: BTreeSet<Addr> = peers.iter().map(|p| Addr::from(*p)).collect();
        let have: BTreeSet<Addr> = entries(MAP_TUNNEL_PEERS, self.tunnel_peers.keys())?
            .into_iter()
            .collect();
        for gone in have.difference(&want) {
            ignore_missing(self.tunnel_peers.remove(gone)).map_err(in_map(MAP_TUNNEL_PEERS))?;
        }
        for new in want.difference(&have) {
            self.tunnel_peers
                .insert(*new, 1, 0)
                .map_err(in_map(MAP_TUNNEL_PEERS))?;
        }
        Ok(())
    }

    /// How new flows to each backend fared (passive health checking).
    pub fn health_counters(&self) -> &HealthCounters {
        &self.backend_health
    }

    pub fn affinity(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, MapsError> {
        entries(MAP_AFFINITY, self.affinity.iter())
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, MapsError> {
        Counter::ALL
            .iter()
            .map(|counter| {
                let values = self
                    .counters
                    .get(&(*counter as u32), 0)
                    .map_err(in_map(MAP_COUNTERS))?;
                Ok((
                    *counter,
                    values.iter().fold(0u64, |sum, v| sum.wrapping_add(*v)),
                ))
            })
            .collect()
    }

    /// Traffic of the given service ids, summed over CPUs.
    pub fn service_stats(
        &self,
        service_ids: &[u32],
    ) -> Result<Vec<(u32, ServiceStats)>, MapsError> {
        service_ids
            .iter()
            .map(|id| {
                let values = self.svc_stats.get(id, 0).map_err(in_map(MAP_SVC_STATS))?;
                let sum = values
                    .iter()
                    .fold(ServiceStats::default(), |sum, v| ServiceStats {
                        fwd_packets: sum.fwd_packets.wrapping_add(v.fwd_packets),
                        fwd_bytes: sum.fwd_bytes.wrapping_add(v.fwd_bytes),
                        rev_packets: sum.rev_packets.wrapping_add(v.rev_packets),
                        rev_bytes: sum.rev_bytes.wrapping_add(v.rev_bytes),
                    });
                Ok((*id, sum))
            })
            .collect()
    }
}

impl DatapathMaps {
    /// Writes a backend. A new generation is another endpoint (or the same one again, after it
    /// left): it starts with a clean health record.
    fn put_backend(&mut self, id: u32, value: BackendValue) -> Result<(), MapError> {
        let previous = self.backends.get(&id, 0)?;
        if previous.generation != value.generation {
            self.backend_health.0.set(id, BackendHealth::default(), 0)?;
        }
        self.backends.set(id, value, 0)
    }

    /// Service ids are reused: a new Service must not inherit the counters of the one before.
    fn zero_service_stats(&mut self, id: u32) -> Result<(), MapError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, io_error)| {
            MapError::SyscallError(SyscallError {
                call: "nr_cpus",
                io_error,
            })
        })?;
        let zeros = PerCpuValues::try_from(vec![ServiceStats::default(); cpus])?;
        self.svc_stats.set(id, zeros, 0)
    }
}

/// A missing entry on delete means the map already is as wanted.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        other => other,
    }
}

impl MapWriter for DatapathMaps {
    fn apply(&mut self, op: &MapOp) -> Result<(), MapWriteError> {
        let result = match *op {
            MapOp::PutFrontend(key, value) => {
                self.filter.set(&key);
                self.frontends.insert(key, value, 0)
            }
            MapOp::DeleteFrontend(key) => {
                self.filter.rebuild = true;
                ignore_missing(self.frontends.remove(&key))
            }
            MapOp::PutService(id, value) => self.services.insert(id, value, 0),
            MapOp::DeleteService(id) => {
                ignore_missing(self.services.remove(&id)).and_then(|()| self.zero_service_stats(id))
            }
            MapOp::PutSlot(key, backend_id) => self.slots.insert(key, backend_id, 0),
            MapOp::DeleteSlot(key) => ignore_missing(self.slots.remove(&key)),
            MapOp::PutBackend(id, value) => self.put_backend(id, value),
            MapOp::PutSrcRange(range) => {
                self.src_ranges
                    .insert(&Key::new(range.prefix_len, range.key()), 1, 0)
            }
            MapOp::DeleteSrcRange(range) => ignore_missing(
                self.src_ranges
                    .remove(&Key::new(range.prefix_len, range.key())),
            ),
            MapOp::PutMaglev(id, ref ids) => {
                let mut table = Box::new(MaglevTable {
                    backend_ids: [0; MAGLEV_SLOTS],
                });
                let n = ids.len().min(MAGLEV_SLOTS);
                table.backend_ids[..n].copy_from_slice(&ids[..n]);
                // By reference: by value would put the 64 KiB table on the stack.
                #[allow(clippy::needless_borrows_for_generic_args)]
                self.maglev.insert(id, &*table, 0)
            }
            MapOp::DeleteMaglev(id) => ignore_missing(self.maglev.remove(&id)),
            MapOp::PutEgressPool(id, ref pool) => self.egress_pools.insert(id, **pool, 0),
            MapOp::DeleteEgressPool(id) => ignore_missing(self.egress_pools.remove(&id)),
        };
        result.map_err(|err| self.write_error(op.map_name(), err))
    }

    fn finish(&mut self, state: &MapState) {
        let filter = &mut self.filter;
        if filter.rebuild {
            filter.want.fill(0);
            for key in state.frontends.keys() {
                filter.set(key);
            }
            filter.rebuild = false;
        }
        if filter.written.as_ref() == Some(&filter.want) {
            return;
        }
        for (i, want) in filter.want.iter().enumerate() {
            if filter.written.as_ref().is_some_and(|w| w[i] == *want) {
                continue;
            }
            if let Err(err) = self.fe_filter.set(i as u32, *want, 0) {
                // Frontends whose bit is not written stay invisible to the data path: say so,
                // and write every word again after the next plan.
                tracing::warn!("writing {MAP_FE_FILTER} word {i}: {err}");
                filter.written = None;
                return;
            }
        }
        match &mut filter.written {
            Some(written) => written.copy_from_slice(&filter.want),
            None => filter.written = Some(filter.want.clone()),
        }
    }
}

/// The health records of backend ids `0..count`, in as few system calls as the kernel
/// allows (BPF_MAP_LOOKUP_BATCH): the health monitor reads them five times a second, and
/// one lookup per backend was ~1 µs each (40k backends: 200k system calls a second).
fn backend_health_batch(
    map: &Array<MapData, BackendHealth>,
    count: u32,
) -> Result<Vec<BackendHealth>, MapsError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let count = count as usize;
    let mut keys = vec![0u32; count];
    let mut values = vec![BackendHealth::default(); count];
    let fd = IterableMap::map(map).fd().as_fd().as_raw_fd();
    let mut done = 0usize;
    let mut next: u32 = 0;
    while done < count {
        #[repr(C)]
        struct BatchAttr {
            in_batch: u64,
            out_batch: u64,
            keys: u64,
            values: u64,
            count: u32,
            map_fd: u32,
            elem_flags: u64,
            flags: u64,
        }
        let mut out_batch: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if done == 0 {
                0
            } else {
                &next as *const u32 as u64
            },
            out_batch: &mut out_batch as *mut u32 as u64,
            keys: keys[done..].as_mut_ptr() as u64,
            values: values[done..].as_mut_ptr() as u64,
            count: (count - done) as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
        // SAFETY: attr points at buffers of `attr.count` keys and values that outlive the
        // call; the kernel writes at most that many.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let got = attr.count as usize;
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOENT) {
                done += got;
                break;
            }
            return Err(MapsError::Map {
                name: MAP_BACKEND_HEALTH,
                source: MapError::SyscallError(SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error: err,
                }),
            });
        }
        done += got;
        next = out_batch;
        if got == 0 {
            break;
        }
    }
    values.truncate(done);
    Ok(values)
}

/// The passive health counters (BACKEND_HEALTH): the agent's maps hold one, and one opened from
/// the pin reads them on another thread.
pub struct HealthCounters(Array<MapData, BackendHealth>);

impl HealthCounters {
    pub fn open_pinned(dir: &Path) -> Result<Self, MapsError> {
        let path = dir.join(MAP_BACKEND_HEALTH);
        let map = MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .map_err(|source| MapsError::Pinned { path, source })?;
        Ok(HealthCounters(typed(MAP_BACKEND_HEALTH, map)?))
    }

    /// How new flows to backend `id` fared.
    pub fn get(&self, id: u32) -> Result<BackendHealth, MapsError> {
        self.0.get(&id, 0).map_err(in_map(MAP_BACKEND_HEALTH))
    }

    /// The records of backend ids `0..count`.
    pub fn batch(&self, count: u32) -> Result<Vec<BackendHealth>, MapsError> {
        backend_health_batch(&self.0, count)
    }
}
