//! The map ABI shared by the eBPF data path (`proxy-ebpf`) and the agent (`proxy-user`).
//!
//! One definition for both sides: every key and value is `#[repr(C)]` with explicit padding so its
//! layout is identical on the BPF target and the host. Byte order is stated on every field:
//! "net" means network byte order exactly as on the wire; "host" means native order.
//!
//! Addresses are always 16 bytes: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address
//! (`::ffff:a.b.c.d`). One set of maps serves both families.
//!
//! When a layout below changes, bump [`ABI_VERSION`]: a restarted agent compares it with the
//! version recorded in the pinned [`Config`] before adopting pinned maps.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

#[cfg(feature = "user")]
pub mod user;

/// Version of the layouts in this crate. Stored in [`Config::abi_version`].
pub const ABI_VERSION: u32 = 3;

// ---------------------------------------------------------------------------------------------
// Map names (the ELF symbol names; the kernel keeps the first 15 bytes).
// ---------------------------------------------------------------------------------------------

pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_FRONTENDS: &str = "FRONTENDS";
pub const MAP_SERVICES: &str = "SERVICES";
pub const MAP_SLOTS: &str = "SLOTS";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_CT: &str = "CT";
pub const MAP_CT_NEW: &str = "CT_NEW";
pub const MAP_REVNAT: &str = "REVNAT";
pub const MAP_AFFINITY: &str = "AFFINITY";
pub const MAP_SRC_RANGES: &str = "SRC_RANGES";
pub const MAP_FRAGS: &str = "FRAGS";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_SVC_STATS: &str = "SVC_STATS";
pub const MAP_FE_FILTER: &str = "FE_FILTER";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_EVENT_LIMIT: &str = "EVENT_LIMIT";
pub const MAP_BACKEND_HEALTH: &str = "BACKEND_HEALTH";
pub const MAP_CLUSTER_EGRESS: &str = "CLUSTER_EGRESS";
pub const MAP_TUNNEL_PEERS: &str = "TUNNEL_PEERS";
pub const MAP_MAGLEV: &str = "MAGLEV";
pub const MAP_EGRESS_POOLS: &str = "EGRESS_POOLS";
pub const MAP_SNAT_CURSOR: &str = "SNAT_CURSOR";

/// Every map the data path defines, in the order the agent pins and checks them.
pub const ALL_MAPS: [&str; 22] = [
    MAP_CONFIG,
    MAP_FRONTENDS,
    MAP_SERVICES,
    MAP_SLOTS,
    MAP_BACKENDS,
    MAP_CT,
    MAP_CT_NEW,
    MAP_REVNAT,
    MAP_AFFINITY,
    MAP_SRC_RANGES,
    MAP_FRAGS,
    MAP_COUNTERS,
    MAP_SVC_STATS,
    MAP_FE_FILTER,
    MAP_EVENTS,
    MAP_EVENT_LIMIT,
    MAP_BACKEND_HEALTH,
    MAP_CLUSTER_EGRESS,
    MAP_TUNNEL_PEERS,
    MAP_MAGLEV,
    MAP_EGRESS_POOLS,
    MAP_SNAT_CURSOR,
];

/// Program names (the Rust function names of the entry points).
pub const PROG_XDP: &str = "extproxy_xdp";
pub const PROG_TC_INGRESS: &str = "extproxy_tc_ingress";
pub const PROG_TC_EGRESS: &str = "extproxy_tc_egress";
/// TC ingress on pods' host-side veths (`--pod-ifaces`).
pub const PROG_TC_POD: &str = "extproxy_tc_pod";
/// Parses a packet exactly as the real programs do and passes it: the benchmarks' floor.
pub const PROG_PARSE_ONLY: &str = "extproxy_parse_only";

// ---------------------------------------------------------------------------------------------
// Default map sizes. The agent may override max_entries at load time (EbpfLoader::set_max_entries).
// ---------------------------------------------------------------------------------------------

/// Service ports (a Service with two ports is two services here). Also bounds service ids.
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Frontends: ClusterIP, NodePort x node addresses, LB ingress IPs, externalIPs, per service port.
pub const DEFAULT_MAX_FRONTENDS: u32 = 262_144;
/// Endpoints over all service ports; also bounds backend ids (BACKENDS is an array).
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
/// Selection slots: one per (service port, ready endpoint).
pub const DEFAULT_MAX_SLOTS: u32 = 262_144;
/// Established connections tracked (LRU).
pub const DEFAULT_CT_MAX: u32 = 262_144;
/// Connections not established yet (LRU of their own, so that a flood of them never evicts an
/// established flow): this fraction of the established table.
pub const CT_NEW_DIVISOR: u32 = 4;
/// Reverse NAT entries per established flow: live flows plus closed flows whose port is held
/// for its client (see [`RevNatValue::closed_at`]). Not LRU: an entry is never evicted.
pub const REVNAT_PER_CT: u32 = 2;
/// Cluster egress addresses (one per IP family per address set a cluster uses).
pub const DEFAULT_MAX_CLUSTER_EGRESS: u32 = 256;
/// Nodes a cluster egress owner accepts tunnelled flows from.
pub const DEFAULT_MAX_TUNNEL_PEERS: u32 = 8_192;
/// Service ports with a Maglev table (those with a cluster egress address).
pub const DEFAULT_MAX_MAGLEV: u32 = 1_024;
/// Bytes of the data path's event ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 64 * 1024;
/// Rate-limit buckets for events (per CPU); an event's bucket is its backend id modulo this.
pub const EVENT_LIMIT_SLOTS: u32 = 256;
pub const DEFAULT_AFFINITY_MAX: u32 = 65_536;
pub const DEFAULT_SRC_RANGES_MAX: u32 = 16_384;
pub const DEFAULT_FRAGS_MAX: u32 = 8_192;

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

/// An IP address: 16 bytes in network byte order; IPv4 is IPv4-mapped (`::ffff:a.b.c.d`).
///
/// Stored as four `u32` words only so the data path copies and compares it in four operations;
/// each word holds four address bytes in wire order (read the memory, not the integer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub words: [u32; 4],
}

impl Addr {
    pub const ZERO: Addr = Addr { words: [0; 4] };

    /// The third word of an IPv4-mapped address: bytes `00 00 ff ff` in memory.
    pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    /// Builds an IPv4-mapped address from the four IPv4 bytes as they are on the wire.
    #[inline(always)]
    pub const fn from_v4_raw(raw_net: u32) -> Self {
        Addr {
            words: [0, 0, Self::V4_MAPPED_WORD, raw_net],
        }
    }

    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == Self::V4_MAPPED_WORD
    }

    /// The IPv4 address as it is on the wire (only meaningful when [`Addr::is_v4`]).
    #[inline(always)]
    pub const fn v4_raw(&self) -> u32 {
        self.words[3]
    }

    #[inline(always)]
    pub const fn is_zero(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == 0 && self.words[3] == 0
    }
}

// ---------------------------------------------------------------------------------------------
// Protocols, kinds, states
// ---------------------------------------------------------------------------------------------

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// What kind of Service address a frontend is. Informational for the data path (stats,
/// inspect); behaviour is driven by [`FrontendValue::flags`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp = 1,
    NodePort = 2,
    LoadBalancer = 3,
    ExternalIp = 4,
    /// An endpoint's own address and port, for a Service with a cluster egress address: pods
    /// that connect to the endpoint directly (an Ingress controller in front of the Service, a
    /// name resolving to it) leave from the cluster egress address too. Only pods' packets
    /// (and tunnelled ones) match it; the endpoint is the one in [`FrontendValue::flags`] and
    /// [`FrontendValue::pad`] ([`FrontendValue::endpoint`]).
    Endpoint = 5,
}

impl FrontendKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::ClusterIp),
            2 => Some(Self::NodePort),
            3 => Some(Self::LoadBalancer),
            4 => Some(Self::ExternalIp),
            5 => Some(Self::Endpoint),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "ExternalIP",
            Self::Endpoint => "Endpoint",
        }
    }
}

/// Check the client address against [`MAP_SRC_RANGES`] (loadBalancerSourceRanges).
pub const FE_F_SOURCE_RANGES: u8 = 1;

/// Lifecycle of a backend slot in [`MAP_BACKENDS`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Unused: flows that still point here were cut off (TCP is reset, UDP re-balanced).
    Free = 0,
    /// Selectable for new flows (it is in the service's slots).
    Active = 1,
    /// Terminating or no longer ready: existing flows continue, no new flows or affinity.
    Draining = 2,
}

// ---------------------------------------------------------------------------------------------
// CONFIG: ARRAY[1] of Config
// ---------------------------------------------------------------------------------------------

/// An inclusive range of ports (host order). Unused when `min == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub const NONE: PortRange = PortRange { min: 0, max: 0 };

    #[inline(always)]
    pub const fn len(&self) -> u32 {
        if self.min == 0 || self.max < self.min {
            0
        } else {
            (self.max - self.min) as u32 + 1
        }
    }

    #[inline(always)]
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline(always)]
    pub const fn contains(&self, port: u16) -> bool {
        self.min != 0 && port >= self.min && port <= self.max
    }
}

/// SNAT source ports come from up to this many disjoint ranges: the default leaves out the
/// node's ephemeral ports and the NodePort range, which sit in the middle of 1024-65535.
pub const SNAT_RANGES: usize = 4;

/// Node-wide settings, written by the agent before any service is programmed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// [`ABI_VERSION`] of the agent that created the pinned maps.
    pub abi_version: u32,
    /// `CFG_F_*` bits.
    pub flags: u32,
    /// Conntrack timeouts in seconds.
    pub tcp_syn_timeout: u32,
    pub tcp_established_timeout: u32,
    pub tcp_closing_timeout: u32,
    pub udp_timeout: u32,
    pub udp_stream_timeout: u32,
    /// The data path's clock: seconds = ((jiffies64 * clock_mult) >> 32) - clock_offset, which
    /// tracks CLOCK_MONOTONIC (see [`Config::clock_secs`]). jiffies are read inline, where the
    /// coarse ktime helper costs ~30 ns a packet. 0: use bpf_ktime_get_coarse_ns.
    pub clock_mult: u32,
    pub clock_offset: u32,
    /// Ticks per second of the data path's fine clock (SNAT port holds): jiffies, so the
    /// kernel's HZ, or milliseconds of the coarse ktime when `clock_mult` is 0 (then 1000).
    pub hz: u32,
    /// SNAT source ports: the union of these ranges (unused ones are [`PortRange::NONE`]).
    pub snat_ranges: [PortRange; SNAT_RANGES],
    /// How many ports `snat_ranges` hold together (host order).
    pub snat_ports: u32,
    /// The lowest and highest SNAT port: replies outside them are not looked up (host order).
    pub snat_port_lo: u16,
    pub snat_port_hi: u16,
    /// A closed TCP flow's port goes to the SAME client (address and frontend) again only after
    /// this many ticks, so that the client's TCP timestamps are newer than the last ones the
    /// endpoint saw on that port and its TIME_WAIT accepts the new SYN. Milliseconds, rounded up
    /// to whole ticks (at least two) by the agent into `snat_reuse_gap_ticks`.
    pub snat_reuse_gap_ms: u32,
    pub snat_reuse_gap_ticks: u32,
    /// A closed TCP flow's port goes to ANOTHER client only after this many seconds when the
    /// endpoint closed first: its TIME_WAIT (60 s on Linux) would refuse about half of the SYNs a
    /// different client sends from that port. When the client closed first (or either side
    /// reset), the endpoint holds no TIME_WAIT and `tcp_closing_timeout` applies instead.
    pub snat_timewait_hold: u32,
    /// A new TCP flow whose SYN is resent this many seconds after the first, unanswered, counts
    /// as a failure of its endpoint ([`BackendHealth`]); 0: never.
    pub health_syn_timeout: u32,
    /// This node's IPv4 address as the tunnel's outer source (raw, as on the wire); 0: this node
    /// sends nothing through the tunnel (cluster egress flows are refused here).
    pub tunnel_src_v4: u32,
    /// The largest TCP MSS that fits the tunnel (the uplink's MTU less the outer headers and
    /// the inner IP and TCP headers), per inner family (host order); SYNs entering or leaving the
    /// tunnel are clamped to it.
    pub tunnel_mss_v4: u16,
    pub tunnel_mss_v6: u16,
    pub reserved: [u32; 10],
}

/// XDP may transmit translated packets back out of the interface they came in on (XDP_TX).
pub const CFG_F_XDP_TX: u32 = 1;

impl Config {
    pub const DEFAULT: Config = Config {
        abi_version: ABI_VERSION,
        flags: CFG_F_XDP_TX,
        tcp_syn_timeout: 60,
        // kube-proxy sets nf_conntrack_tcp_timeout_established to 24h; match it so idle pooled
        // connections behave the same under either proxy.
        tcp_established_timeout: 86_400,
        tcp_closing_timeout: 10,
        udp_timeout: 30,
        udp_stream_timeout: 120,
        clock_mult: 0,
        clock_offset: 0,
        hz: 1000,
        // 1024-29999 and 61000-65535: above the privileged ports, below the NodePort range and
        // above Linux's default ephemeral range (32768-60999). The agent computes the real default
        // from the node's own settings.
        snat_ranges: [
            PortRange {
                min: 1024,
                max: 29_999,
            },
            PortRange {
                min: 61_000,
                max: 65_535,
            },
            PortRange::NONE,
            PortRange::NONE,
        ],
        snat_ports: (29_999 - 1024 + 1) + (65_535 - 61_000 + 1),
        snat_port_lo: 1024,
        snat_port_hi: 65_535,
        snat_reuse_gap_ms: 10,
        snat_reuse_gap_ticks: 10,
        snat_timewait_hold: 60,
        // Linux resends an unanswered SYN after one second.
        health_syn_timeout: 1,
        tunnel_src_v4: 0,
        // A 1500-byte MTU less the tunnel's 28 bytes and the inner headers.
        tunnel_mss_v4: 1500 - 28 - 40,
        tunnel_mss_v6: 1500 - 28 - 60,
        reserved: [0; 10],
    };

    /// This configuration with SNAT ports from `ranges` (at most [`SNAT_RANGES`]; extra ones
    /// are ignored): the derived count and bounds are filled in.
    pub fn with_snat_ranges(mut self, ranges: &[PortRange]) -> Config {
        let mut out = [PortRange::NONE; SNAT_RANGES];
        let mut ports = 0;
        let mut lo = u16::MAX;
        let mut hi = 0;
        let mut n = 0;
        for r in ranges {
            if r.is_empty() || n == SNAT_RANGES {
                continue;
            }
            out[n] = *r;
            n += 1;
            ports += r.len();
            lo = lo.min(r.min);
            hi = hi.max(r.max);
        }
        self.snat_ranges = out;
        self.snat_ports = ports;
        self.snat_port_lo = if ports == 0 { 0 } else { lo };
        self.snat_port_hi = hi;
        self
    }

    /// This configuration with the tick rate of the data path's fine clock; the tick-based
    /// settings derived from it are filled in.
    pub const fn with_hz(mut self, hz: u32) -> Config {
        self.hz = hz;
        // Rounded up, plus one: the clock may tick right after the close was stamped.
        let ticks = (self.snat_reuse_gap_ms as u64 * hz as u64).div_ceil(1000) as u32 + 1;
        self.snat_reuse_gap_ticks = if ticks < 2 { 2 } else { ticks };
        self
    }

    /// Whether `port` (host order) is one of the SNAT ports.
    #[inline(always)]
    pub fn is_snat_port(&self, port: u16) -> bool {
        if port < self.snat_port_lo || port > self.snat_port_hi {
            return false;
        }
        let r = &self.snat_ranges;
        r[0].contains(port) || r[1].contains(port) || r[2].contains(port) || r[3].contains(port)
    }

    /// The `index`-th SNAT port (`index < snat_ports`), counting through the ranges in order.
    #[inline(always)]
    pub fn snat_port_at(&self, index: u32) -> u16 {
        let mut i = index;
        let mut k = 0;
        while k < SNAT_RANGES {
            let r = &self.snat_ranges[k];
            let n = r.len();
            if i < n {
                return r.min + i as u16;
            }
            i -= n;
            k += 1;
        }
        0
    }

    /// Seconds of CLOCK_MONOTONIC (to within a second or so) from the kernel's jiffies, with
    /// the factors the agent derived from the tick length ([`Config::clock_mult`]).
    #[inline(always)]
    pub const fn clock_secs(&self, jiffies: u64) -> u32 {
        ((jiffies.wrapping_mul(self.clock_mult as u64) >> 32) as u32)
            .wrapping_sub(self.clock_offset)
    }

    /// How long a flow in state `flags` (`CT_F_*`) may stay idle. The one definition for the
    /// data path, which ages flows on lookup, and the agent's sweep and `inspect`.
    #[inline(always)]
    pub const fn ct_timeout(&self, proto: u8, flags: u8) -> u32 {
        if proto == PROTO_TCP {
            if ct_closed(flags) {
                self.tcp_closing_timeout
            } else if flags & CT_F_SEEN_REPLY == 0 {
                self.tcp_syn_timeout
            } else {
                self.tcp_established_timeout
            }
        } else if flags & CT_F_SEEN_REPLY != 0 {
            self.udp_stream_timeout
        } else {
            self.udp_timeout
        }
    }

    /// Whether `ct` has been idle past its timeout at `now` (seconds of CLOCK_MONOTONIC).
    #[inline(always)]
    pub const fn ct_expired(&self, proto: u8, ct: &CtValue, now: u32) -> bool {
        now.wrapping_sub(ct.last_seen) > self.ct_timeout(proto, ct.flags)
    }

    /// How long (ticks) the port of a flow closed as `rn_flags` (`RN_F_*`) stays with its client
    /// before another client may take it. The one definition for the data path's allocator and
    /// the agent's sweep, which deletes closed flows' entries once nobody needs them.
    #[inline(always)]
    pub const fn snat_hold_ticks(&self, rn_flags: u8) -> u32 {
        let secs = if rn_flags & RN_F_ENDPOINT_TIME_WAIT != 0 {
            self.snat_timewait_hold
        } else {
            self.tcp_closing_timeout
        };
        secs.saturating_mul(self.hz)
    }
}

// ---------------------------------------------------------------------------------------------
// FRONTENDS: HASH FrontendKey -> FrontendValue
// ---------------------------------------------------------------------------------------------

/// A Service address as a client addresses it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: Addr,
    /// net order
    pub port: u16,
    /// IP protocol number ([`PROTO_TCP`], [`PROTO_UDP`]).
    pub proto: u8,
    pub pad: u8,
}

impl FrontendKey {
    #[inline(always)]
    pub const fn filter_slot(&self) -> FilterSlot {
        FilterSlot::of(&self.addr, self.port, self.proto)
    }
}

/// Where a frontend's FE_FILTER bit lives: the word to read and the bit within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterSlot {
    pub word: u32,
    pub mask: u64,
}

impl FilterSlot {
    #[inline(always)]
    pub const fn of(addr: &Addr, port: u16, proto: u8) -> FilterSlot {
        let bit = frontend_filter_bit(addr, port, proto);
        FilterSlot {
            word: bit / 64,
            mask: 1 << (bit % 64),
        }
    }
}

/// Bits in FE_FILTER, the data path's first question about a packet: could its destination be
/// a frontend? A clear bit answers "no" with one array read, so traffic that is not for a Service
/// skips the conntrack and FRONTENDS hash lookups; a set bit may be a false positive (~4% at 10k
/// frontends), which costs only those lookups. The agent sets the bit of every frontend it
/// programs and rebuilds the filter after removals.
pub const FE_FILTER_BITS: u32 = 1 << 18;
/// FE_FILTER entries: u64 words, bit `b` in word `b / 64` at `1 << (b % 64)` ([`FilterSlot`]).
pub const FE_FILTER_WORDS: u32 = FE_FILTER_BITS / 64;

/// The FE_FILTER bit of a frontend. One definition for both sides: the agent sets the bit the
/// data path tests. Address words and port are mixed raw (as in memory), as both sides see them.
#[inline(always)]
pub const fn frontend_filter_bit(addr: &Addr, port: u16, proto: u8) -> u32 {
    let w = &addr.words;
    // The address words in memory order put an IPv4 address's last byte (the one that differs
    // between ClusterIPs) in the top bits; the multiplications carry every bit into the top bits
    // taken below (Fibonacci hashing), the port through its own odd factor.
    let a = w[3] ^ (w[0] ^ w[1] ^ w[2]).rotate_left(16);
    let h = (a.rotate_left(8) ^ ((port as u32) << 8 | proto as u32).wrapping_mul(0x85eb_ca6b))
        .wrapping_mul(0x9e37_79b1);
    h >> (32 - FE_FILTER_BITS.trailing_zeros())
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrontendValue {
    /// Key into SERVICES and index into SVC_STATS (host order).
    pub service_id: u32,
    /// [`FrontendKind`] as u8.
    pub kind: u8,
    /// `FE_F_*` bits; for [`FrontendKind::Endpoint`], bits 16..24 of the endpoint's backend id.
    pub flags: u8,
    /// For [`FrontendKind::Endpoint`], bits 0..16 of the endpoint's backend id (host order).
    pub pad: [u8; 2],
}

/// Backend ids an [`FrontendKind::Endpoint`] frontend can name (24 bits; the default
/// `--max-backends` is 2^18).
pub const ENDPOINT_FRONTEND_IDS: u32 = 1 << 24;

impl FrontendValue {
    /// An [`FrontendKind::Endpoint`] frontend: connections to the endpoint `backend_id` of
    /// service `service_id`. None when the id does not fit ([`ENDPOINT_FRONTEND_IDS`]).
    pub const fn endpoint(service_id: u32, backend_id: u32) -> Option<Self> {
        if backend_id >= ENDPOINT_FRONTEND_IDS {
            return None;
        }
        let low = (backend_id as u16).to_ne_bytes();
        Some(FrontendValue {
            service_id,
            kind: FrontendKind::Endpoint as u8,
            flags: (backend_id >> 16) as u8,
            pad: low,
        })
    }

    /// The backend id of an [`FrontendKind::Endpoint`] frontend.
    #[inline(always)]
    pub const fn endpoint_backend(&self) -> u32 {
        (self.flags as u32) << 16 | u16::from_ne_bytes(self.pad) as u32
    }
}

// ---------------------------------------------------------------------------------------------
// SERVICES: HASH service_id (u32, host order) -> ServiceValue
// ---------------------------------------------------------------------------------------------

/// One Service port. Hash map, not array: an update replaces the value atomically, so a reader
/// never sees a backend count from one version and an egress address from another.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Selectable backends, in SLOTS `1..=backend_count` (host order). 0 = reject new flows.
    pub backend_count: u32,
    /// sessionAffinity ClientIP timeout in seconds; 0 = no affinity (host order).
    pub affinity_timeout: u32,
    /// SNAT source address for this service's flows. Zero: the Service has no egress address
    /// for its family; new flows are rejected and counted as `no_egress_address`.
    pub egress: Addr,
    /// `SVC_F_*` bits.
    pub flags: u32,
    pub reserved: u32,
}

/// `egress` is a cluster egress address ([`MAP_CLUSTER_EGRESS`]): one node owns it and serves the
/// Service's flows; every other node sends them to it through the tunnel.
pub const SVC_F_CLUSTER_EGRESS: u32 = 1;
/// Endpoints are chosen by the Service's Maglev table ([`MAP_MAGLEV`]) instead of its slots, so
/// that every node chooses the same endpoint for the same flow.
pub const SVC_F_MAGLEV: u32 = 2;
/// The Service SNATs to a pool of addresses ([`MAP_EGRESS_POOLS`], keyed by its service id), of
/// which `egress` is the first: SNAT ports are unique per (egress address, endpoint, protocol),
/// so every address adds a full port range per endpoint. Without the flag, or while the pool
/// entry is missing, `egress` alone is used.
pub const SVC_F_EGRESS_POOL: u32 = 4;

// ---------------------------------------------------------------------------------------------
// EGRESS_POOLS: HASH service_id (u32, host order) -> EgressPool
// ---------------------------------------------------------------------------------------------

/// Addresses an egress pool holds at most. A power of two: the data path bounds its index with a
/// mask the verifier follows.
pub const EGRESS_POOL_MAX: usize = 16;
const _: () = assert!(EGRESS_POOL_MAX.is_power_of_two());

/// The SNAT addresses of one Service port ([`SVC_F_EGRESS_POOL`]), all of its family. The SNAT
/// allocator's candidates are (address, port) pairs over `addrs[..count]` x the SNAT ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EgressPool {
    /// Addresses in use, `addrs[0..count]` (host order); 2..=[`EGRESS_POOL_MAX`]. The data path
    /// takes anything above [`EGRESS_POOL_MAX`] as that bound.
    pub count: u32,
    pub reserved: u32,
    /// `addrs[0]` is the Service's `egress`; unused entries are zero.
    pub addrs: [Addr; EGRESS_POOL_MAX],
}

// ---------------------------------------------------------------------------------------------
// SLOTS: HASH SlotKey -> backend_id (u32, host order)
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// host order
    pub service_id: u32,
    /// 1-based (host order).
    pub slot: u32,
}

// ---------------------------------------------------------------------------------------------
// BACKENDS: ARRAY[backend_id] of BackendValue
// ---------------------------------------------------------------------------------------------

/// An endpoint of one service port. Array indexed by backend id: the per-packet validity check of
/// an established flow is a direct load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendValue {
    pub addr: Addr,
    /// net order
    pub port: u16,
    /// [`BackendState`] as u8.
    pub state: u8,
    pub pad: u8,
    /// Bumped by the agent whenever the id is freed; conntrack entries record it so a reused id
    /// never inherits old flows (host order).
    pub generation: u32,
    /// The service port this endpoint belongs to (host order). Not read by the data path: it lets
    /// a restarted agent and `extproxy inspect` attribute draining endpoints, which sit in no slot.
    pub service_id: u32,
    pub reserved: u32,
}

// ---------------------------------------------------------------------------------------------
// CT: LRU_HASH CtKey -> CtValue   (the client-side 5-tuple, before translation)
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Client address.
    pub src: Addr,
    /// Frontend address.
    pub dst: Addr,
    /// net order
    pub sport: u16,
    /// net order
    pub dport: u16,
    pub proto: u8,
    /// Explicit padding in two stores' worth: a 3-byte array compiles to a memset call on BPF.
    pub pad: u8,
    pub pad16: u16,
}

/// Client has sent a FIN.
pub const CT_F_CLIENT_FIN: u8 = 1;
/// Backend has sent a FIN.
pub const CT_F_BACKEND_FIN: u8 = 2;
/// Either side sent a RST.
pub const CT_F_RST: u8 = 4;
/// The backend has answered at least once.
pub const CT_F_SEEN_REPLY: u8 = 8;
/// The client spoke after the backend answered (TCP: the handshake completed): the flow moved
/// from CT_NEW to CT.
pub const CT_F_ESTABLISHED: u8 = 16;
/// The flow's TCP timestamps are shifted by `ts_offset`.
pub const CT_F_TS_OFFSET: u8 = 32;
/// The flow's failure to reach its endpoint has been counted ([`BackendHealth`]).
pub const CT_F_FAIL_COUNTED: u8 = 64;
/// The flow came through the pod program: its packets went from the pod's interface straight
/// to the endpoint's, so its replies go straight back to the pod's (TC), and neither direction
/// passes the node's forwarding and netfilter, which would see half a connection.
pub const CT_F_FROM_POD: u8 = 128;

/// A TCP flow both sides have finished, or that was reset.
#[inline(always)]
pub const fn ct_closed(flags: u8) -> bool {
    flags & CT_F_RST != 0
        || flags & (CT_F_CLIENT_FIN | CT_F_BACKEND_FIN) == (CT_F_CLIENT_FIN | CT_F_BACKEND_FIN)
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// Endpoint the flow was sent to (cached so teardown never depends on BACKENDS).
    pub backend: Addr,
    /// Source address after SNAT.
    pub snat: Addr,
    /// host order
    pub backend_id: u32,
    /// BACKENDS generation at selection (host order).
    pub backend_generation: u32,
    /// host order
    pub service_id: u32,
    /// Seconds of CLOCK_MONOTONIC (bpf_ktime_get_coarse_ns / 1e9), host order.
    pub created: u32,
    pub last_seen: u32,
    /// net order
    pub backend_port: u16,
    /// net order
    pub snat_port: u16,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// [`FrontendKind`] of the frontend the flow came in on.
    pub kind: u8,
    pub pad: [u8; 2],
    /// With [`CT_F_TS_OFFSET`]: added to the client's TCP TSvals toward the endpoint (and taken
    /// from the endpoint's TSecrs), so that they continue after those of the SNAT port's previous
    /// flow (host order).
    pub ts_offset: u32,
    /// Where packets of this flow go next, so established packets skip the FIB lookup.
    pub to_backend: NextHop,
    pub to_client: NextHop,
    /// The node the flow came from through the tunnel (its replies go back the same way);
    /// zero for flows that started on this node.
    pub tunnel_peer: Addr,
}

/// A cached FIB result. Trusted for [`NEXT_HOP_CACHE_SECS`] after `stamp`; 0 = none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// Output device (host order).
    pub ifindex: u32,
    /// Seconds of CLOCK_MONOTONIC when cached (host order); 0 = nothing cached.
    pub stamp: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// How long a flow trusts its cached next hop: a neighbour's new MAC address or a new route
/// reaches established flows within this time.
pub const NEXT_HOP_CACHE_SECS: u32 = 1;

// ---------------------------------------------------------------------------------------------
// REVNAT: LRU_HASH RevNatKey -> RevNatValue   (the backend-side 5-tuple of a reply)
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    /// Endpoint address (source of the reply).
    pub backend: Addr,
    /// SNAT address (destination of the reply).
    pub snat: Addr,
    /// net order
    pub backend_port: u16,
    /// net order
    pub snat_port: u16,
    pub proto: u8,
    /// Explicit padding in two stores' worth: a 3-byte array compiles to a memset call on BPF.
    pub pad: u8,
    pub pad16: u16,
}

/// The flow holding an SNAT port, or (closed) the last one that held it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    pub client: Addr,
    pub frontend: Addr,
    /// net order
    pub client_port: u16,
    /// net order
    pub frontend_port: u16,
    /// host order
    pub service_id: u32,
    /// 0 while the flow is open. Once it closed (FINs both ways, a RST, or its entry ended):
    /// when, in ticks of the data path's fine clock ([`Config::hz`]; never 0). The port then
    /// stays held for a while (see [`Config::snat_hold_ticks`]) unless a new flow can take it
    /// safely: one from the same client address and port (its sequence numbers and timestamps
    /// continue the old ones), or one with TCP timestamps when the closed flow had them (the new
    /// flow's timestamps are shifted to continue after `ts_last`).
    pub closed_at: u32,
    /// The last TSval the endpoint saw on the closed flow (host order), if `RN_F_TIMESTAMPS`.
    /// Claimed together with `closed_at` (one 8-byte compare-and-swap).
    pub ts_last: u32,
    /// `RN_F_*` bits.
    pub flags: u8,
    pub pad: u8,
    pub pad16: u16,
    /// The node the flow came from through the tunnel (its IPv4 address, raw; 0: none): its
    /// replies go back there even when the conntrack entry is gone.
    pub tunnel_v4: u32,
}

/// The endpoint sent its FIN first: it holds the old connection in TIME_WAIT.
pub const RN_F_ENDPOINT_TIME_WAIT: u8 = 1;
/// The closed flow carried TCP timestamps (and `ts_last` holds the last one).
pub const RN_F_TIMESTAMPS: u8 = 2;
/// The pod program opened the flow (as [`CT_F_FROM_POD`]): its replies go back to the pod from
/// TC, and XDP hands them on after this one lookup. Kept when the flow closes.
pub const RN_F_FROM_POD: u8 = 4;

impl RevNatValue {
    /// Whether the port's flow has closed (the entry only holds the port for its client).
    #[inline(always)]
    pub const fn is_closed(&self) -> bool {
        self.closed_at != 0
    }

    /// The conntrack key of the flow this reply belongs to.
    #[inline(always)]
    pub const fn ct_key(&self, proto: u8) -> CtKey {
        CtKey {
            src: self.client,
            dst: self.frontend,
            sport: self.client_port,
            dport: self.frontend_port,
            proto,
            pad: 0,
            pad16: 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AFFINITY: LRU_HASH AffinityKey -> AffinityValue   (sessionAffinity: ClientIP)
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// host order
    pub service_id: u32,
    pub client: Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// host order
    pub backend_id: u32,
    pub backend_generation: u32,
    /// Seconds of CLOCK_MONOTONIC, host order.
    pub last_used: u32,
    pub reserved: u32,
}

// ---------------------------------------------------------------------------------------------
// SRC_RANGES: LPM_TRIE {prefix_len, SrcRangeKey} -> u8   (loadBalancerSourceRanges)
// ---------------------------------------------------------------------------------------------

/// The data of an LPM key. The prefix length always covers all 32 bits of `service_id`, then
/// the range's bits of `addr` (IPv4 ranges add 96 for the mapped prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcRangeKey {
    /// host order (matched whole, so byte order is irrelevant to the trie)
    pub service_id: u32,
    /// Addresses bytes in net order, matched most significant bit first.
    pub addr: Addr,
}

/// Prefix length of an LPM key for a range of `prefix` bits of an address of the given family.
pub const fn src_range_prefix_len(is_v4: bool, prefix: u8) -> u32 {
    32 + if is_v4 { 96 } else { 0 } + prefix as u32
}

// ---------------------------------------------------------------------------------------------
// FRAGS: LRU_HASH FragKey -> FragValue   (ports of the first fragment, for the later ones)
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// IPv4: the 16-bit identification; IPv6: the fragment header's 32-bit id (net order).
    pub id: u32,
    pub proto: u8,
    /// Explicit padding in two stores' worth: a 3-byte array compiles to a memset call on BPF.
    pub pad: u8,
    pub pad16: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    /// net order
    pub sport: u16,
    /// net order
    pub dport: u16,
}

// ---------------------------------------------------------------------------------------------
// EVENTS: RINGBUF of Event   (what the agent must log, count per Service and report)
// ---------------------------------------------------------------------------------------------

/// Event kinds.
pub const EV_SNAT_EXHAUSTED: u32 = 1;
pub const EV_NAT_TABLE_FULL: u32 = 2;

/// Something the data path cannot put right itself. Rate-limited per CPU and backend bucket
/// ([`EVENT_LIMIT_SLOTS`]): `count` says how many occurrences this event stands for (the
/// suppressed ones since the bucket's previous event, plus this one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Event {
    /// `EV_*`.
    pub kind: u32,
    pub count: u32,
    /// host order
    pub service_id: u32,
    pub backend_id: u32,
    pub egress: Addr,
    pub backend: Addr,
    /// net order
    pub backend_port: u16,
    pub proto: u8,
    pub pad: u8,
    /// How many egress addresses the allocator tried (host order): the Service's pool size, the
    /// first of which is `egress`; 0 or 1 for a Service with one address.
    pub egress_count: u32,
}

/// Per CPU and bucket: when the bucket last emitted (ticks) and what it suppressed since.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventLimit {
    pub last: u32,
    pub suppressed: u32,
}

// ---------------------------------------------------------------------------------------------
// BACKEND_HEALTH: ARRAY[backend_id] of BackendHealth   (passive health: what new flows saw)
// ---------------------------------------------------------------------------------------------

/// How new flows to one endpoint fared, as the data path saw them; the agent's outlier detection
/// reads it (passive health checking). Updated with atomic adds: one entry for all CPUs. The
/// agent zeroes an entry when it gives the backend id to another endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendHealth {
    /// New flows the endpoint answered (its first reply was not a reset).
    pub answered: u64,
    /// New flows it failed: reset, ICMP unreachable, or SYN unanswered.
    pub failed: u64,
    /// Failures since the last answer (an answer sets it back to 0).
    pub consecutive: u32,
    /// The last failure: its kind (`HF_*`) and when (ticks of the fine clock, [`Config::hz`]).
    pub last_kind: u32,
    pub last_at: u32,
    pub reserved: u32,
}

/// The endpoint answered a new flow's SYN with a RST: nothing listens.
pub const HF_REFUSED: u32 = 1;
/// An ICMP destination unreachable came back for a new flow.
pub const HF_UNREACHABLE: u32 = 2;
/// A new flow's SYN went unanswered for [`Config::health_syn_timeout`].
pub const HF_TIMEOUT: u32 = 3;

// ---------------------------------------------------------------------------------------------
// CLUSTER_EGRESS: HASH Addr -> ClusterEgress   (who serves a cluster egress address)
// TUNNEL_PEERS:   HASH Addr -> u32             (nodes whose tunnelled flows an owner accepts)
// MAGLEV:         HASH service_id -> MaglevTable
// ---------------------------------------------------------------------------------------------

/// A cluster egress address: SNATed to by one node, its owner. The agent's election (a Lease per
/// address, or flags in manifest mode) writes it; every node has the entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClusterEgress {
    /// The owner's node address: where the other nodes tunnel the flows (zero: no owner; new
    /// flows are refused as `no_egress_address`).
    pub owner: Addr,
    /// `CE_F_*` bits.
    pub flags: u32,
    pub reserved: u32,
}

/// This node owns the address: it serves the flows itself.
pub const CE_F_LOCAL: u32 = 1;

/// Slots of a Maglev table: a prime, about 100 times the endpoints a Service has at most, as
/// Maglev's paper and Cilium (16381) advise for even spread and minimal disruption.
pub const MAGLEV_M: usize = 16_381;

/// Entries a [`MaglevTable`] holds: the power of two above [`MAGLEV_M`], so that the data path
/// can bound its index with a mask the verifier follows (the slots past M are never used).
pub const MAGLEV_SLOTS: usize = 16_384;
const _: () = assert!(MAGLEV_SLOTS.is_power_of_two() && MAGLEV_SLOTS >= MAGLEV_M);

/// A Service port's Maglev lookup table: slot -> backend id (node-local ids, filled from a
/// permutation of endpoint identities, address:port, so every node maps a slot to the same
/// endpoint). Slots `MAGLEV_M..` are unused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub backend_ids: [u32; MAGLEV_SLOTS],
}

/// The tunnel between nodes: GUE variant 1 (direct IP in UDP, draft-ietf-intarea-gue), IANA
/// port 6080. See DESIGN.md, "Cluster egress".
pub const TUNNEL_PORT: u16 = 6080;
/// Outer IPv4 + UDP header bytes the tunnel adds.
pub const TUNNEL_OVERHEAD_V4: u32 = 20 + 8;

// ---------------------------------------------------------------------------------------------
// SVC_STATS: PERCPU_ARRAY[service_id] of ServiceStats
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceStats {
    /// Client to endpoint (host order; bytes are L3 lengths).
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    /// Endpoint to client.
    pub rev_packets: u64,
    pub rev_bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// COUNTERS: PERCPU_ARRAY[Counter] of u64
// ---------------------------------------------------------------------------------------------

macro_rules! counters {
    ($( $(#[$doc:meta])* $variant:ident = $idx:literal, $name:literal, $drop:literal; )*) => {
        /// Everything the data path counts besides per-service traffic. Drops (`is_drop`) are
        /// packets the data path did not deliver; each has exactly one reason.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Counter {
            $( $(#[$doc])* $variant = $idx, )*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// Stable snake_case name, used in logs, `extproxy inspect` and metrics labels.
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)* }
            }

            pub const fn is_drop(self) -> bool {
                match self { $(Counter::$variant => $drop,)* }
            }

            pub const fn from_u32(v: u32) -> Option<Counter> {
                match v { $($idx => Some(Counter::$variant),)* _ => None }
            }
        }
    };
}

counters! {
    /// A packet to a frontend (or a reply to an SNAT port) whose IP header claims more bytes than
    /// the frame holds, or fewer than its own headers.
    DropMalformed = 0, "malformed", true;
    /// Client address outside the Service's loadBalancerSourceRanges.
    DropSourceRange = 1, "source_range_denied", true;
    /// No free SNAT port for (egress address, endpoint address, port, protocol).
    DropSnatExhausted = 2, "snat_ports_exhausted", true;
    /// The Service has no egress address for the packet's IP family: rejected like `no_endpoints`.
    DropNoEgressAddress = 3, "no_egress_address", true;
    /// The node has no route to the endpoint.
    DropNoRoute = 4, "no_route_to_endpoint", true;
    /// A frontend names a service id that has no entry (agent bug or mid-update).
    DropNoService = 5, "no_service", true;
    /// A map update failed (conntrack or reverse NAT could not be written).
    DropMapUpdate = 6, "map_update_failed", true;
    /// No usable endpoint: rejected with a TCP RST or ICMP port unreachable.
    DropNoEndpoints = 7, "no_endpoints", true;
    /// The flow's endpoint was removed: TCP is reset, the packet is not forwarded.
    DropEndpointRemoved = 8, "endpoint_removed", true;
    /// A reject reply could not be built (buffer helpers failed); the packet was dropped.
    DropRejectFailed = 9, "reject_failed", true;
    /// The reverse NAT table is full: the new flow was refused (RST / ICMP unreachable).
    DropNatTableFull = 10, "nat_table_full", true;
    /// A packet to a cluster egress address's SNAT port matching no flow: dropped, never handed to
    /// the stack (whose RST would kill a flow the client's next packet rebuilds after a
    /// failover).
    DropClusterEgressUnmatched = 11, "cluster_egress_unmatched", true;
    /// A tunnelled packet from a node that is not a known peer.
    DropTunnelUnknownPeer = 12, "tunnel_unknown_peer", true;
    /// A tunnelled packet whose inner packet cannot be parsed.
    DropTunnelMalformed = 13, "tunnel_malformed", true;
    /// A packet too big for the tunnel (after encapsulation): answered with ICMP fragmentation
    /// needed / packet too big.
    DropTunnelTooBig = 14, "tunnel_too_big", true;
    /// The tunnel could not be opened or closed around a packet (buffer helpers failed).
    DropTunnelFailed = 15, "tunnel_failed", true;
    /// A tunnelled packet this node neither serves (no frontend here, or the address's owner
    /// moved) nor can deliver as a reply (its source is no frontend of this node): never sent on.
    DropTunnelNotOurs = 16, "tunnel_not_ours", true;
    /// A new flow was created for a TCP packet without SYN: conntrack lost the flow (LRU full,
    /// restart without pins) or the client is confused.
    CtMissMidstream = 32, "ct_miss_midstream", false;
    /// A reply matched reverse NAT but its conntrack entry was gone.
    CtMissReply = 33, "ct_miss_reply", false;
    /// New flows created.
    CtCreated = 34, "ct_created", false;
    /// SNAT port candidates that were taken and had to be skipped.
    SnatCollision = 35, "snat_collisions", false;
    /// XDP could not forward a packet itself and passed it on to the TC program.
    XdpPassToTc = 36, "xdp_pass_to_tc", false;
    /// ICMP errors about a translated flow, translated for the client.
    IcmpErrorTranslated = 37, "icmp_error_translated", false;
    /// Non-first IP fragments translated using the first fragment's ports.
    FragmentTranslated = 38, "fragment_translated", false;
    /// UDP flows moved to another endpoint because theirs was removed.
    UdpRebalanced = 39, "udp_rebalanced", false;
    /// New flows that followed sessionAffinity to their previous endpoint.
    AffinityHit = 40, "affinity_hit", false;
    /// A stale conntrack or reverse NAT entry was replaced when its slot was needed.
    CtStaleReplaced = 41, "ct_stale_replaced", false;
    /// A later IP fragment whose first fragment was not seen: passed to the kernel untouched (it
    /// cannot be matched to a flow; the kernel discards it if it is not for the node).
    FragmentUntracked = 42, "fragment_untracked", false;
    /// An IP packet whose transport header could not be found (cut short, unknown IPv6 extension
    /// chain): passed to the kernel untouched, never rewritten.
    UnparsedPassed = 43, "unparsed_passed", false;
    /// A TCP SYN reused the 5-tuple of a closed flow: it got a new endpoint choice.
    CtReopened = 44, "ct_reopened", false;
    /// A new flow took the port of a closed flow (its TCP timestamps shifted to continue the old
    /// flow's where that was needed).
    SnatClosedPortReused = 45, "snat_closed_port_reused", false;
    /// SNAT port candidates skipped because the endpoint may still hold a closed flow on them
    /// in TIME_WAIT and the new flow could not be made to pass it (no TCP timestamps).
    SnatTimeWaitSkipped = 46, "snat_time_wait_skipped", false;
    /// Flows that completed their handshake and moved from CT_NEW to CT.
    CtEstablished = 47, "ct_established", false;
    /// Events the agent's ring buffer had no room for (its reader is behind).
    EventsLost = 48, "events_lost", false;
    /// A TCP segment whose data offset is under 5 words or reaches past the IP datagram:
    /// passed to the kernel untouched, never translated.
    MalformedTcpHeader = 49, "malformed_tcp_header", false;
    /// A UDP datagram whose length field is under 8 or longer than the IP payload (first
    /// fragments and IPv6 jumbograms excepted): passed to the kernel untouched.
    MalformedUdpLength = 50, "malformed_udp_length", false;
    /// Flows sent to the owner of their Service's cluster egress address through the tunnel
    /// (counted per packet).
    TunnelSent = 51, "tunnel_sent", false;
    /// Packets received through the tunnel (from another node) and served here.
    TunnelReceived = 52, "tunnel_received", false;
    /// Cluster egress flows whose SNAT port was not their first candidate: after a failover the
    /// new owner cannot rebuild them (it derives the port from the flow).
    SnatNotFirstCandidate = 53, "snat_not_first_candidate", false;
    /// TCP SYNs whose MSS was lowered to fit the tunnel.
    TunnelMssClamped = 54, "tunnel_mss_clamped", false;
    /// Packets one of our programs had translated (or tunnelled) and redirected out of an
    /// uplink, which its egress program let go at once.
    EgressAlreadyTranslated = 55, "egress_already_translated", false;
}

/// Size of the COUNTERS array: room for the indices above and future ones.
pub const COUNTER_SLOTS: u32 = 64;

// ---------------------------------------------------------------------------------------------
// Pod impls: aya needs to know these are plain old data to copy them in and out of maps.
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "user")]
mod pod {
    use super::*;
    macro_rules! pod {
        ($($t:ty),*) => { $( unsafe impl aya::Pod for $t {} )* };
    }
    pod!(
        Addr,
        Config,
        FrontendKey,
        FrontendValue,
        ServiceValue,
        SlotKey,
        BackendValue,
        CtKey,
        CtValue,
        NextHop,
        RevNatKey,
        RevNatValue,
        AffinityKey,
        AffinityValue,
        SrcRangeKey,
        FragKey,
        FragValue,
        ServiceStats,
        PortRange,
        Event,
        EventLimit,
        BackendHealth,
        ClusterEgress,
        MaglevTable,
        EgressPool
    );
}

// Layout guards: a change here is an ABI change (bump ABI_VERSION).
const _: () = {
    assert!(core::mem::size_of::<Addr>() == 16);
    assert!(core::mem::size_of::<Config>() == 128);
    assert!(core::mem::size_of::<FrontendKey>() == 20);
    assert!(core::mem::size_of::<FrontendValue>() == 8);
    assert!(core::mem::size_of::<ServiceValue>() == 32);
    assert!(core::mem::size_of::<SlotKey>() == 8);
    assert!(core::mem::size_of::<BackendValue>() == 32);
    assert!(core::mem::size_of::<CtKey>() == 40);
    assert!(core::mem::size_of::<CtValue>() == 120);
    assert!(core::mem::size_of::<RevNatKey>() == 40);
    assert!(core::mem::size_of::<RevNatValue>() == 56);
    // Claimed with one 8-byte compare-and-swap: closed_at and ts_last share an aligned word.
    assert!(core::mem::offset_of!(RevNatValue, closed_at) == 40);
    assert!(core::mem::size_of::<AffinityKey>() == 20);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<SrcRangeKey>() == 20);
    assert!(core::mem::size_of::<FragKey>() == 40);
    assert!(core::mem::size_of::<FragValue>() == 4);
    assert!(core::mem::size_of::<ServiceStats>() == 32);
    assert!(core::mem::size_of::<Event>() == 56);
    assert!(core::mem::size_of::<EventLimit>() == 8);
    assert!(core::mem::size_of::<BackendHealth>() == 32);
    assert!(core::mem::size_of::<ClusterEgress>() == 24);
    assert!(core::mem::size_of::<MaglevTable>() == MAGLEV_SLOTS * 4);
    assert!(core::mem::size_of::<EgressPool>() == 8 + 16 * EGRESS_POOL_MAX);
};
