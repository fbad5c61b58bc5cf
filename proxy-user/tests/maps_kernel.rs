//! The map writer against the kernel's maps. Needs root and the eBPF object (a build without
//! AYA_BUILD_SKIP).

use std::path::PathBuf;

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use extproxy::loader::{self, Limits};
use extproxy::maps::DatapathMaps;
use extproxy::pins;
use extproxy::reconcile::{MapOp, MapWriter};
use proxy_common::{Config, MAP_SVC_STATS, ServiceStats, ServiceValue};

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = pins::remove_all(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Needs root: a reused service id starts with zeroed traffic counters.
#[test]
fn a_deleted_service_leaves_no_counters_to_its_ids_next_owner() {
    if loader::OBJECT.is_empty() {
        eprintln!("SKIP: this build has no eBPF object (AYA_BUILD_SKIP)");
        return;
    }
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (it loads eBPF programs): run it as root"
    );
    loader::ensure_bpffs().unwrap();
    let pin_dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/xp-maps-test-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&pin_dir.0).unwrap();
    let limits = Limits {
        max_services: 64,
        max_frontends: 64,
        max_backends: 64,
        max_slots: 64,
        ct_max: 1024,
        ..Limits::default()
    };
    let mut ebpf = loader::load(&limits, Some(&pin_dir.0)).unwrap();
    loader::write_config(&mut ebpf, &Config::DEFAULT).unwrap();
    let mut maps = DatapathMaps::take_from(&mut ebpf).unwrap();

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
