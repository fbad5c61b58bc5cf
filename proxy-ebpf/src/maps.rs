//! Map definitions. Layouts live in proxy-common; sizes are defaults the agent overrides at load.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use proxy_common::*;

use crate::{
    fwd::{FibParams, ROUTE_CACHE_SLOTS, Route, RouteCacheEntry},
    lb::Chosen,
    nat::AllocLoop,
    parse::{Inner, Pkt},
};

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static FRONTENDS: HashMap<FrontendKey, FrontendValue> =
    HashMap::with_max_entries(DEFAULT_MAX_FRONTENDS, 0);

/// Which (address, port, protocol) may be frontends: see `proxy_common::FE_FILTER_BITS`.
#[map]
pub static FE_FILTER: Array<u64> = Array::with_max_entries(FE_FILTER_WORDS, 0);

#[map]
pub static SERVICES: HashMap<u32, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map]
pub static SLOTS: HashMap<SlotKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_SLOTS, 0);

#[map]
pub static BACKENDS: Array<BackendValue> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Established flows. LRU: when full, the flow idle longest goes.
#[map]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(DEFAULT_CT_MAX, 0);

/// Flows that have not completed their handshake. A table of their own, so that a flood of them
/// (SYNs nobody completes) evicts only its own kind, never an established flow.
#[map]
pub static CT_NEW: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(DEFAULT_CT_MAX / CT_NEW_DIVISOR, 0);

/// SNAT port -> flow. A plain hash, not LRU: an entry is removed by its flow's end (the data
/// path) or the agent's sweep, never evicted from under a live flow; when full, new flows are
/// refused (`nat_table_full`).
#[map]
pub static REVNAT: HashMap<RevNatKey, RevNatValue> =
    HashMap::with_max_entries(DEFAULT_CT_MAX * REVNAT_PER_CT, 0);

/// The node-wide sequence new TCP connections take their SNAT (address, port) pair from
/// (`nat::next_in_sequence`): one counter, every CPU adds to it.
#[map]
pub static SNAT_CURSOR: Array<u64> = Array::with_max_entries(1, 0);

/// What the agent must hear about (`Event`), rate-limited through EVENT_LIMIT.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// How new flows to each endpoint fared (passive health checking; see `health`).
#[map]
pub static BACKEND_HEALTH: Array<BackendHealth> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Cluster egress addresses and their owners (see DESIGN.md, "Cluster egress").
#[map]
pub static CLUSTER_EGRESS: HashMap<Addr, ClusterEgress> =
    HashMap::with_max_entries(DEFAULT_MAX_CLUSTER_EGRESS, 0);

/// Nodes whose tunnelled packets this node serves (value unused).
#[map]
pub static TUNNEL_PEERS: HashMap<Addr, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_TUNNEL_PEERS, 0);

/// Maglev tables of the Services with a cluster egress address. Allocated on insert: 64 KB each,
/// only for the Services that have one.
#[map]
pub static MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::with_max_entries(DEFAULT_MAX_MAGLEV, BPF_F_NO_PREALLOC);

/// SNAT address pools of the Services with more than one egress address (`SVC_F_EGRESS_POOL`).
/// Allocated on insert: only those Services have an entry.
#[map]
pub static EGRESS_POOLS: HashMap<u32, EgressPool> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map]
pub static EVENT_LIMIT: PerCpuArray<EventLimit> =
    PerCpuArray::with_max_entries(EVENT_LIMIT_SLOTS, 0);

#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_AFFINITY_MAX, 0);

#[map]
pub static SRC_RANGES: LpmTrie<SrcRangeKey, u8> =
    LpmTrie::with_max_entries(DEFAULT_SRC_RANGES_MAX, BPF_F_NO_PREALLOC);

#[map]
pub static FRAGS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(DEFAULT_FRAGS_MAX, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
pub static SVC_STATS: PerCpuArray<ServiceStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Per-CPU room for the large structs of one packet's processing. The BPF stack holds 512 bytes
/// over the whole call chain; these would not fit beside everything else. Networking programs do
/// not nest on a CPU (redirects happen after the program returns), so one slot per CPU is enough.
#[repr(C)]
pub struct Scratch {
    pub pkt: Pkt,
    pub inner: Inner,
    pub ct_key: CtKey,
    pub ct: CtValue,
    pub rn_key: RevNatKey,
    pub rn: RevNatValue,
    /// Key of a flow whose SNAT port we may take over.
    pub old_key: CtKey,
    /// The event being reported.
    pub event: Event,
    /// SNAT port allocation's tries (bpf_loop).
    pub alloc: AllocLoop,
    /// A new flow's choices, from `new_flow` to `open_flow` and where it is sent.
    pub route: Route,
    pub chosen: Chosen,
    pub fe: FrontendValue,
    pub egress: Addr,
    pub affinity_timeout: u32,
    /// The new flow's SYN carries a TCP timestamp, this one.
    pub syn_ts: u32,
    pub syn_has_ts: bool,
    /// The node this packet came from through the tunnel; zero when it did not.
    pub tunnel_peer: Addr,
    /// The node a packet is to be tunnelled to: the owner of its cluster egress address, or the
    /// node of the client a reply is for.
    pub tunnel_to: Addr,
    /// The new flow's Service's `SVC_F_*` flags.
    pub svc_flags: u32,
    pub frag_key: FragKey,
    pub fib: FibParams,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// New flows' routes, by endpoint (`fwd::route_new`). Per CPU, and never pinned: a cache the
/// next agent's programs start without.
#[map]
pub static ROUTE_CACHE: PerCpuArray<RouteCacheEntry> =
    PerCpuArray::with_max_entries(ROUTE_CACHE_SLOTS, 0);
