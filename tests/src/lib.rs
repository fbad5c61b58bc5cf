//! Harness for extproxy's real-kernel tests.
//!
//! Everything here talks to the real kernel: the real eBPF object is loaded and verified, packets
//! go through BPF_PROG_TEST_RUN, namespaces and veths are real. All tests need root
//! (CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN).

pub mod agent;
pub mod dns_server;
pub mod kube;
pub mod packet;

pub use testbed::{netns, require_root, sh};

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use extproxy::loader::{self, Limits};
use proxy_common::*;

pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "no interface {name}");
    idx
}

pub fn mac_of(name: &str) -> [u8; 6] {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap();
    let mut mac = [0u8; 6];
    for (i, part) in s.trim().split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

// -------------------------------------------------------------------------------------------------
// The node used by the BPF_PROG_TEST_RUN tests
// -------------------------------------------------------------------------------------------------

pub const NODE_V4: &str = "10.0.0.1";
pub const NODE_V6: &str = "fd00::1";
pub const GW_V4: &str = "10.0.0.254";
pub const GW_V6: &str = "fd00::fe";
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const POD_V4: &str = "10.244.0.5";
pub const POD_V6: &str = "fd00:244::5";
pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x05];

/// A node in a private network namespace of the calling thread: uplink `up0` (10.0.0.1,
/// fd00::1) with a default route via a gateway whose neighbour entry is static, and a pod
/// interface `pod0` (10.244.0.0/24, fd00:244::/64) with one pod. Forwarding is on, as on every
/// Kubernetes node. The namespace disappears with the thread: nothing is left behind.
pub struct TestNode {
    pub uplink: u32,
    pub pod_if: u32,
    _ns: netns::ThreadNetns,
}

impl TestNode {
    pub fn new() -> Self {
        require_root();
        let ns = netns::ThreadNetns::enter();
        sh("ip link set lo up
            ip link add up0 address 02:00:00:00:00:01 type veth peer name up1 address 02:00:00:00:00:fe
            ip link add pod0 address 02:00:00:00:01:01 type veth peer name pod1 address 02:00:00:00:02:05
            for d in up0 up1 pod0 pod1; do ip link set $d up; done
            ip addr add 10.0.0.1/24 dev up0
            ip -6 addr add fd00::1/64 dev up0 nodad
            ip addr add 10.244.0.1/24 dev pod0
            ip -6 addr add fd00:244::1/64 dev pod0 nodad
            ip route add default via 10.0.0.254 dev up0
            ip -6 route add default via fd00::fe dev up0
            ip neigh replace 10.0.0.254 lladdr 02:00:00:00:00:fe dev up0 nud permanent
            ip -6 neigh replace fd00::fe lladdr 02:00:00:00:00:fe dev up0 nud permanent
            ip neigh replace 10.244.0.5 lladdr 02:00:00:00:02:05 dev pod0 nud permanent
            ip -6 neigh replace fd00:244::5 lladdr 02:00:00:00:02:05 dev pod0 nud permanent
            sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");
        TestNode {
            uplink: ifindex("up0"),
            pod_if: ifindex("pod0"),
            _ns: ns,
        }
    }
}

impl Default for TestNode {
    fn default() -> Self {
        Self::new()
    }
}

// -------------------------------------------------------------------------------------------------
// Data path under test
// -------------------------------------------------------------------------------------------------

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn addr(s: &str) -> Addr {
    Addr::from(ip(s))
}

/// Small maps: tests create a handful of entries and exhaustion tests need small limits.
pub fn test_limits() -> Limits {
    Limits {
        max_services: 64,
        max_frontends: 256,
        max_backends: 256,
        max_slots: 256,
        ct_max: 1024,
        affinity_max: 256,
        src_ranges_max: 64,
        frags_max: 64,
    }
}

/// A service as the tests program it, straight into the maps.
pub struct Svc<'a> {
    pub id: u32,
    pub frontends: &'a [(FrontendKind, &'a str, u16)],
    pub proto: u8,
    /// (backend id, address, port, state)
    pub backends: &'a [(u32, &'a str, u16, BackendState)],
    pub egress: &'a str,
    pub affinity_timeout: u32,
    /// CIDRs; non-empty sets the source-range flag on LoadBalancer frontends.
    pub source_ranges: &'a [&'a str],
    /// `egress` is a cluster egress address: flags SVC_F_CLUSTER_EGRESS | SVC_F_MAGLEV and a
    /// Maglev table built as the agent builds it.
    pub cluster_egress: bool,
}

impl<'a> Svc<'a> {
    /// A service SNATed to the node's address, without affinity or source ranges.
    pub fn new(
        id: u32,
        proto: u8,
        frontends: &'a [(FrontendKind, &'a str, u16)],
        backends: &'a [(u32, &'a str, u16, BackendState)],
    ) -> Self {
        Svc {
            id,
            frontends,
            proto,
            backends,
            egress: NODE_V4,
            affinity_timeout: 0,
            source_ranges: &[],
            cluster_egress: false,
        }
    }
}

pub struct Datapath {
    pub ebpf: Ebpf,
}

impl Datapath {
    pub fn load() -> Self {
        Self::load_with(Config::DEFAULT)
    }

    pub fn load_with(cfg: Config) -> Self {
        Self::load_sized(cfg, &test_limits())
    }

    pub fn load_sized(cfg: Config, limits: &Limits) -> Self {
        let mut ebpf = loader::load(limits, None).expect("load the real eBPF object");
        loader::write_config(&mut ebpf, &cfg).unwrap();
        Datapath { ebpf }
    }

    pub fn set_config(&mut self, cfg: Config) {
        loader::write_config(&mut self.ebpf, &cfg).unwrap();
    }

    pub fn program(&mut self, s: &Svc) {
        for (id, a, port, state) in s.backends {
            self.put_backend(*id, a, *port, *state, 1);
        }
        let active: Vec<u32> = s
            .backends
            .iter()
            .filter(|b| b.3 == BackendState::Active)
            .map(|b| b.0)
            .collect();
        {
            let mut slots: HashMap<_, SlotKey, u32> =
                HashMap::try_from(self.ebpf.map_mut(MAP_SLOTS).unwrap()).unwrap();
            for (i, id) in active.iter().enumerate() {
                slots
                    .insert(
                        SlotKey {
                            service_id: s.id,
                            slot: i as u32 + 1,
                        },
                        *id,
                        0,
                    )
                    .unwrap();
            }
        }
        {
            let mut svcs: HashMap<_, u32, ServiceValue> =
                HashMap::try_from(self.ebpf.map_mut(MAP_SERVICES).unwrap()).unwrap();
            let v = ServiceValue {
                backend_count: active.len() as u32,
                affinity_timeout: s.affinity_timeout,
                egress: addr(s.egress),
                flags: if s.cluster_egress {
                    SVC_F_CLUSTER_EGRESS | SVC_F_MAGLEV
                } else {
                    0
                },
                reserved: 0,
            };
            svcs.insert(s.id, v, 0).unwrap();
        }
        if s.cluster_egress {
            let endpoints: Vec<(IpAddr, u16)> = s
                .backends
                .iter()
                .filter(|b| b.3 == BackendState::Active)
                .map(|b| (ip(b.1), b.2))
                .collect();
            let ids = extproxy::reconcile::maglev_table(&endpoints, &active);
            let mut table = Box::new(MaglevTable {
                backend_ids: [0; MAGLEV_SLOTS],
            });
            table.backend_ids[..ids.len()].copy_from_slice(&ids);
            let mut maglev: HashMap<_, u32, MaglevTable> =
                HashMap::try_from(self.ebpf.map_mut(MAP_MAGLEV).unwrap()).unwrap();
            // By reference: by value would put the 64 KiB table on the stack.
            #[allow(clippy::needless_borrows_for_generic_args)]
            maglev.insert(s.id, &*table, 0).unwrap();
        }
        {
            let mut ranges: LpmTrie<_, SrcRangeKey, u8> =
                LpmTrie::try_from(self.ebpf.map_mut(MAP_SRC_RANGES).unwrap()).unwrap();
            for r in s.source_ranges {
                let net: ipnet_lite::Net = r.parse().unwrap();
                let key = Key::new(
                    src_range_prefix_len(net.addr.is_ipv4(), net.prefix),
                    SrcRangeKey {
                        service_id: s.id,
                        addr: Addr::from(net.addr),
                    },
                );
                ranges.insert(&key, 1, 0).unwrap();
            }
        }
        for (kind, a, port) in s.frontends {
            let flags = if *kind == FrontendKind::LoadBalancer && !s.source_ranges.is_empty() {
                FE_F_SOURCE_RANGES
            } else {
                0
            };
            let key = FrontendKey {
                addr: addr(a),
                port: port.to_be(),
                proto: s.proto,
                pad: 0,
            };
            let value = FrontendValue {
                service_id: s.id,
                kind: *kind as u8,
                flags,
                pad: [0; 2],
            };
            self.put_frontend(key, value);
        }
    }

    /// Gives service `id` the egress pool `addrs` (the first should be its `egress`) and flags
    /// its service value to use it, in that order, as the agent does.
    pub fn set_egress_pool(&mut self, id: u32, addrs: &[&str]) {
        {
            let mut pools: HashMap<_, u32, EgressPool> =
                HashMap::try_from(self.ebpf.map_mut(MAP_EGRESS_POOLS).unwrap()).unwrap();
            let mut pool = EgressPool {
                count: addrs.len() as u32,
                ..EgressPool::default()
            };
            for (slot, a) in pool.addrs.iter_mut().zip(addrs) {
                *slot = addr(a);
            }
            pools.insert(id, pool, 0).unwrap();
        }
        self.flag_egress_pool(id);
    }

    /// Sets SVC_F_EGRESS_POOL on service `id` (whether or not its pool is there).
    pub fn flag_egress_pool(&mut self, id: u32) {
        let mut svcs: HashMap<_, u32, ServiceValue> =
            HashMap::try_from(self.ebpf.map_mut(MAP_SERVICES).unwrap()).unwrap();
        let mut v = svcs.get(&id, 0).unwrap();
        v.flags |= SVC_F_EGRESS_POOL;
        svcs.insert(id, v, 0).unwrap();
    }

    /// Writes a frontend and sets its FE_FILTER bit, as the agent does.
    pub fn put_frontend(&mut self, key: FrontendKey, value: FrontendValue) {
        let mut fes: HashMap<_, FrontendKey, FrontendValue> =
            HashMap::try_from(self.ebpf.map_mut(MAP_FRONTENDS).unwrap()).unwrap();
        fes.insert(key, value, 0).unwrap();
        self.mark_frontend(&key);
    }

    pub fn remove_frontend(&mut self, key: &FrontendKey) {
        let mut fes: HashMap<_, FrontendKey, FrontendValue> =
            HashMap::try_from(self.ebpf.map_mut(MAP_FRONTENDS).unwrap()).unwrap();
        fes.remove(key).unwrap();
    }

    /// Clears every FE_FILTER bit.
    pub fn clear_frontend_filter(&mut self) {
        let mut filter: Array<_, u64> =
            Array::try_from(self.ebpf.map_mut(MAP_FE_FILTER).unwrap()).unwrap();
        for i in 0..FE_FILTER_WORDS {
            filter.set(i, 0, 0).unwrap();
        }
    }

    fn mark_frontend(&mut self, key: &FrontendKey) {
        let mut filter: Array<_, u64> =
            Array::try_from(self.ebpf.map_mut(MAP_FE_FILTER).unwrap()).unwrap();
        let slot = key.filter_slot();
        let word = filter.get(&slot.word, 0).unwrap();
        filter.set(slot.word, word | slot.mask, 0).unwrap();
    }

    pub fn put_backend(
        &mut self,
        id: u32,
        a: &str,
        port: u16,
        state: BackendState,
        generation: u32,
    ) {
        let mut backends: Array<_, BackendValue> =
            Array::try_from(self.ebpf.map_mut(MAP_BACKENDS).unwrap()).unwrap();
        let v = BackendValue {
            addr: addr(a),
            port: port.to_be(),
            state: state as u8,
            pad: 0,
            generation,
            service_id: 0,
            reserved: 0,
        };
        backends.set(id, v, 0).unwrap();
    }

    pub fn set_backend_count(&mut self, service_id: u32, count: u32) {
        let mut svcs: HashMap<_, u32, ServiceValue> =
            HashMap::try_from(self.ebpf.map_mut(MAP_SERVICES).unwrap()).unwrap();
        let mut v = svcs.get(&service_id, 0).unwrap();
        v.backend_count = count;
        svcs.insert(service_id, v, 0).unwrap();
    }

    pub fn counter(&self, c: Counter) -> u64 {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_COUNTERS).unwrap()).unwrap();
        map.get(&(c as u32), 0).unwrap().iter().sum()
    }

    pub fn service_stats(&self, id: u32) -> ServiceStats {
        let map: PerCpuArray<_, ServiceStats> =
            PerCpuArray::try_from(self.ebpf.map(MAP_SVC_STATS).unwrap()).unwrap();
        map.get(&id, 0)
            .unwrap()
            .iter()
            .fold(ServiceStats::default(), |mut acc, s| {
                acc.fwd_packets += s.fwd_packets;
                acc.fwd_bytes += s.fwd_bytes;
                acc.rev_packets += s.rev_packets;
                acc.rev_bytes += s.rev_bytes;
                acc
            })
    }

    /// Every tracked flow: established (CT), then not established yet (CT_NEW).
    pub fn ct_entries(&self) -> Vec<(CtKey, CtValue)> {
        let mut flows = self.ct_table(MAP_CT);
        flows.extend(self.ct_table(MAP_CT_NEW));
        flows
    }

    /// The flows of one conntrack table (MAP_CT or MAP_CT_NEW).
    pub fn ct_table(&self, name: &str) -> Vec<(CtKey, CtValue)> {
        let map: HashMap<&MapData, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map(name).unwrap()).unwrap();
        map.iter().map(|r| r.unwrap()).collect()
    }

    /// Who owns the cluster egress address `address`: the node `owner` (None: nobody), this one
    /// if `local`.
    pub fn set_cluster_egress(&mut self, address: &str, owner: Option<&str>, local: bool) {
        let mut map: HashMap<_, Addr, ClusterEgress> =
            HashMap::try_from(self.ebpf.map_mut(MAP_CLUSTER_EGRESS).unwrap()).unwrap();
        let v = ClusterEgress {
            owner: owner.map_or(Addr::ZERO, addr),
            flags: if local { CE_F_LOCAL } else { 0 },
            reserved: 0,
        };
        map.insert(addr(address), v, 0).unwrap();
    }

    /// A node whose tunnelled packets this one serves.
    pub fn add_tunnel_peer(&mut self, peer: &str) {
        let mut map: HashMap<_, Addr, u32> =
            HashMap::try_from(self.ebpf.map_mut(MAP_TUNNEL_PEERS).unwrap()).unwrap();
        map.insert(addr(peer), 1, 0).unwrap();
    }

    /// How new flows to backend `id` fared (passive health).
    pub fn backend_health(&self, id: u32) -> BackendHealth {
        let map: Array<&MapData, BackendHealth> =
            Array::try_from(self.ebpf.map(MAP_BACKEND_HEALTH).unwrap()).unwrap();
        map.get(&id, 0).unwrap()
    }

    /// The events the data path has reported since the last call.
    pub fn events(&mut self) -> Vec<Event> {
        let mut ring =
            aya::maps::RingBuf::try_from(self.ebpf.map_mut(MAP_EVENTS).unwrap()).unwrap();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), std::mem::size_of::<Event>(), "event size");
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
        }
        out
    }

    pub fn revnat_entries(&self) -> Vec<(RevNatKey, RevNatValue)> {
        let map: HashMap<&MapData, RevNatKey, RevNatValue> =
            HashMap::try_from(self.ebpf.map(MAP_REVNAT).unwrap()).unwrap();
        map.iter().map(|r| r.unwrap()).collect()
    }

    pub fn xdp(&mut self, ifindex: u32, pkt: &[u8]) -> Run {
        let prog: &mut Xdp = self.ebpf.program_mut(PROG_XDP).unwrap().try_into().unwrap();
        run_xdp(prog, ifindex, pkt)
    }

    pub fn tc_ingress(&mut self, ifindex: u32, pkt: &[u8]) -> Run {
        self.tc(PROG_TC_INGRESS, ifindex, pkt)
    }

    pub fn tc_pod(&mut self, ifindex: u32, pkt: &[u8]) -> Run {
        self.tc(PROG_TC_POD, ifindex, pkt)
    }

    pub fn tc_egress(&mut self, ifindex: u32, pkt: &[u8]) -> Run {
        self.tc(PROG_TC_EGRESS, ifindex, pkt)
    }

    fn tc(&mut self, name: &str, ifindex: u32, pkt: &[u8]) -> Run {
        let prog: &mut SchedClassifier = self.ebpf.program_mut(name).unwrap().try_into().unwrap();
        run_tc(prog, ifindex, pkt)
    }
}

/// The outcome of one BPF_PROG_TEST_RUN.
#[derive(Debug)]
pub struct Run {
    pub verdict: u32,
    pub out: Vec<u8>,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// xdp_md as BPF_PROG_TEST_RUN takes it: data = 0, data_end = length, the ingress device.
fn xdp_md(ifindex: u32, len: usize) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// __sk_buff (192 bytes) with only `ifindex` set: the skb's device.
fn sk_buff(ifindex: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// One BPF_PROG_TEST_RUN with `ctx` as the context; the output goes to `out`. Returns the verdict,
/// the output length and the kernel-measured duration (ns).
fn test_run<P>(prog: &P, ctx: &[u8], pkt: &[u8], out: &mut [u8]) -> (u32, usize, u64)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(out),
            ctx_in: Some(ctx),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    (
        r.return_value,
        r.data_size_out as usize,
        r.duration.as_nanos() as u64,
    )
}

/// Kernel-measured time of one run (ns), for benchmarks: BPF_PROG_TEST_RUN reuses one buffer
/// across `repeat` iterations, so a packet the program rewrites must be fed fresh every run.
pub fn time_xdp(prog: &Xdp, ifindex: u32, pkt: &[u8], out: &mut [u8]) -> (u32, u64) {
    let (verdict, _, ns) = test_run(prog, &xdp_md(ifindex, pkt.len()), pkt, out);
    (verdict, ns)
}

pub fn time_tc(prog: &SchedClassifier, ifindex: u32, pkt: &[u8], out: &mut [u8]) -> (u32, u64) {
    let (verdict, _, ns) = test_run(prog, &sk_buff(ifindex), pkt, out);
    (verdict, ns)
}

pub fn run_xdp(prog: &Xdp, ifindex: u32, pkt: &[u8]) -> Run {
    let mut out = vec![0u8; pkt.len() + 512];
    let (verdict, len, _) = test_run(prog, &xdp_md(ifindex, pkt.len()), pkt, &mut out);
    out.truncate(len);
    Run { verdict, out }
}

pub fn run_tc(prog: &SchedClassifier, ifindex: u32, pkt: &[u8]) -> Run {
    let mut out = vec![0u8; pkt.len() + 512];
    let (verdict, len, _) = test_run(prog, &sk_buff(ifindex), pkt, &mut out);
    out.truncate(len);
    Run { verdict, out }
}

/// Minimal CIDR parsing for test tables (the agent has its own, tested separately).
pub mod ipnet_lite {
    use std::net::IpAddr;

    pub struct Net {
        pub addr: IpAddr,
        pub prefix: u8,
    }

    impl std::str::FromStr for Net {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            let (a, p) = s.split_once('/').ok_or("no prefix")?;
            Ok(Net {
                addr: a.parse().map_err(|e| format!("{e}"))?,
                prefix: p.parse().map_err(|e| format!("{e}"))?,
            })
        }
    }
}
