//! The map writer against the kernel's maps. Needs root and the eBPF object (a build without
//! AYA_BUILD_SKIP).

use std::path::PathBuf;

use aya::maps::Array;
use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use extproxy::gc::Collector;
use extproxy::loader::{self, Limits};
use extproxy::maps::DatapathMaps;
use extproxy::pins;
use extproxy::reconcile::{MapOp, MapState, MapWriter};
use proxy_common::{
    Addr, CT_F_SEEN_REPLY, Config, CtKey, CtValue, FE_FILTER_WORDS, FrontendKey, FrontendValue,
    MAP_CT, MAP_FE_FILTER, MAP_SVC_STATS, PROTO_TCP, ServiceStats, ServiceValue,
};

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = pins::remove_all(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Loads the real object with its maps pinned in a private directory (needs root).
fn load_pinned(what: &str) -> Option<(PinDir, DatapathMaps)> {
    if loader::OBJECT.is_empty() {
        eprintln!("SKIP: this build has no eBPF object (AYA_BUILD_SKIP)");
        return None;
    }
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (it loads eBPF programs): run it as root"
    );
    loader::ensure_bpffs().unwrap();
    let pin_dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/xp-maps-test-{what}-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&pin_dir.0).unwrap();
    let limits = Limits {
        max_services: 64,
        max_frontends: 1024,
        max_backends: 64,
        max_slots: 64,
        ct_max: 1024,
        ..Limits::default()
    };
    let mut ebpf = loader::load(&limits, Some(&pin_dir.0)).unwrap();
    loader::write_config(&mut ebpf, &Config::DEFAULT).unwrap();
    let maps = DatapathMaps::take_from(&mut ebpf).unwrap();
    Some((pin_dir, maps))
}

/// Needs root: a reused service id starts with zeroed traffic counters.
#[test]
fn a_deleted_service_leaves_no_counters_to_its_ids_next_owner() {
    let Some((pin_dir, mut maps)) = load_pinned("stats") else {
        return;
    };

    let id = 7;
    maps.apply(&MapOp::PutService(id, ServiceValue::default()))
        .unwrap();
    // Traffic as the data path counts it, on every CPU.
    let mut stats: PerCpuArray<MapData, ServiceStats> = PerCpuArray::try_from(Map::PerCpuArray(
        MapData::from_pin(pin_dir.0.join(MAP_SVC_STATS)).unwrap(),
    ))
    .unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let busy = ServiceStats {
        fwd_packets: 3,
        fwd_bytes: 300,
        rev_packets: 2,
        rev_bytes: 200,
    };
    stats
        .set(id, PerCpuValues::try_from(vec![busy; cpus]).unwrap(), 0)
        .unwrap();
    assert_eq!(
        maps.service_stats(&[id]).unwrap()[0].1.fwd_packets,
        3 * cpus as u64
    );

    maps.apply(&MapOp::DeleteService(id)).unwrap();
    maps.apply(&MapOp::PutService(id, ServiceValue::default()))
        .unwrap();
    assert_eq!(
        maps.service_stats(&[id]).unwrap(),
        vec![(id, ServiceStats::default())]
    );
}

fn cluster_ip_frontend(i: u32) -> FrontendKey {
    FrontendKey {
        addr: Addr::from(std::net::IpAddr::from([10, 96, (i >> 8) as u8, i as u8])),
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        pad: 0,
    }
}

fn filter_words(pin_dir: &PinDir) -> Vec<u64> {
    let map = MapData::from_pin(pin_dir.0.join(MAP_FE_FILTER)).unwrap();
    let array: Array<MapData, u64> = Array::try_from(Map::Array(map)).unwrap();
    (0..FE_FILTER_WORDS)
        .map(|i| array.get(&i, 0).unwrap())
        .collect()
}

/// Exactly the bits of `keys`.
fn expected_words(keys: impl Iterator<Item = FrontendKey>) -> Vec<u64> {
    let mut words = vec![0u64; FE_FILTER_WORDS as usize];
    for key in keys {
        let slot = key.filter_slot();
        words[slot.word as usize] |= slot.mask;
    }
    words
}

/// Needs root: the data path skips its lookups for packets whose FE_FILTER bit is clear, so every
/// programmed frontend must have its bit, and removed ones must not keep stale bits for ever.
#[test]
fn the_frontend_filter_holds_exactly_the_programmed_frontends() {
    let Some((pin_dir, mut maps)) = load_pinned("filter") else {
        return;
    };
    // A previous agent's leftovers in the pinned filter.
    {
        let map = MapData::from_pin(pin_dir.0.join(MAP_FE_FILTER)).unwrap();
        let mut array: Array<MapData, u64> = Array::try_from(Map::Array(map)).unwrap();
        array.set(5, 0xdead_beef, 0).unwrap();
    }
    let mut state = MapState::default();
    let value = FrontendValue {
        service_id: 1,
        kind: 0,
        flags: 0,
        pad: [0; 2],
    };
    for i in 0..500 {
        let op = MapOp::PutFrontend(cluster_ip_frontend(i), value);
        maps.apply(&op).unwrap();
        state.record(&op);
    }
    maps.finish(&state);
    assert_eq!(
        filter_words(&pin_dir),
        expected_words((0..500).map(cluster_ip_frontend)),
        "every frontend's bit, and nothing left of the earlier agent's"
    );
    assert!(
        maps.frontend_filter_bits() > 450,
        "500 frontends spread over the filter"
    );

    for i in 100..500 {
        let op = MapOp::DeleteFrontend(cluster_ip_frontend(i));
        maps.apply(&op).unwrap();
        state.record(&op);
    }
    let op = MapOp::PutFrontend(cluster_ip_frontend(1000), value);
    maps.apply(&op).unwrap();
    state.record(&op);
    maps.finish(&state);
    assert_eq!(
        filter_words(&pin_dir),
        expected_words((0..100).chain([1000]).map(cluster_ip_frontend)),
        "removed frontends' bits are cleared, the new one's set"
    );
}

/// Needs root: the sweep ends the flows of a removed frontend, whatever its FE_FILTER bit says.
#[test]
fn the_sweep_removes_flows_whose_frontend_is_gone() {
    let Some((pin_dir, mut maps)) = load_pinned("sweep") else {
        return;
    };
    let now = extproxy::host::datapath_secs();
    let flow = |frontend: &FrontendKey| CtKey {
        src: Addr::from(std::net::IpAddr::from([10, 244, 0, 5])),
        dst: frontend.addr,
        sport: 40000u16.to_be(),
        dport: frontend.port,
        proto: frontend.proto,
        pad: 0,
        pad16: 0,
    };
    let kept = cluster_ip_frontend(1);
    let removed = cluster_ip_frontend(2);
    {
        let map = MapData::from_pin(pin_dir.0.join(MAP_CT)).unwrap();
        let mut ct: aya::maps::HashMap<MapData, CtKey, CtValue> =
            aya::maps::HashMap::try_from(Map::LruHashMap(map)).unwrap();
        let value = CtValue {
            created: now,
            last_seen: now,
            flags: CT_F_SEEN_REPLY,
            ..CtValue::default()
        };
        for frontend in [&kept, &removed] {
            ct.insert(flow(frontend), value, 0).unwrap();
        }
    }
    let frontends = [(kept, FrontendValue::default())].into_iter().collect();
    let report = Collector::default()
        .sweep(&mut maps, &Config::DEFAULT, now, 1, &frontends)
        .unwrap();
    assert_eq!((report.ct_frontend_removed, report.ct_expired), (1, 0));
    let left: Vec<CtKey> = maps
        .conntrack()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(left, vec![flow(&kept)]);
}
