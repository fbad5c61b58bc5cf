//! Kubernetes mode into the real kernel maps. Needs root and the eBPF object (a build without
//! AYA_BUILD_SKIP): the recorded API responses are programmed into loaded, pinned maps, read
//! back from the kernel, read by the metrics reader, and adopted by a restarted source.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use extproxy::loader::{self, Limits};
use extproxy::maps::DatapathMaps;
use extproxy::metrics::{DatapathReader, Telemetry};
use extproxy::pins::{self, Pinned};
use extproxy::reconcile::{self, MapState, Reconciler};
use proxy_common::Config;
use support::{FakeApi, Model, drive_until_programmed, node_a, start_source};

/// Removes the test's pins however the test ends.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = pins::remove_all(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn limits() -> Limits {
    Limits {
        max_services: 256,
        max_frontends: 1024,
        max_backends: 1024,
        max_slots: 1024,
        ct_max: 4096,
        ..Limits::default()
    }
}

fn rlimits() -> reconcile::Limits {
    reconcile::Limits {
        max_services: 256,
        max_backends: 1024,
    }
}

fn load(pin_dir: &std::path::Path) -> DatapathMaps {
    let mut ebpf = loader::load(&limits(), Some(pin_dir)).expect("loading the data path");
    loader::write_config(&mut ebpf, &Config::DEFAULT).unwrap();
    // The maps stay alive through their pins (and these handles) once the object is dropped.
    DatapathMaps::take_from(&mut ebpf).unwrap()
}

/// Needs root: programs real maps from the recorded API responses, then restarts onto them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_cluster_into_kernel_maps_and_adopted_after_restart() {
    if loader::OBJECT.is_empty() {
        eprintln!(
            "SKIP: this build has no eBPF object (AYA_BUILD_SKIP); build without it to run this test"
        );
        return;
    }
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (it loads eBPF programs and pins maps): run it as root, e.g. \
         `sudo -E cargo test -p proxy-user --test kube_datapath`"
    );
    loader::ensure_bpffs().unwrap();
    let pin_dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/xp-kube-test-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&pin_dir.0).unwrap();

    let api = FakeApi::recorded().await;
    api.release_through(252);

    // First agent: program the cluster into fresh maps.
    let first_state = {
        let telemetry = Telemetry::new(Duration::from_secs(60));
        let mut source = start_source(&api, &telemetry, node_a());
        let mut m = Model::with_writer(Reconciler::new(rlimits()), load(&pin_dir.0));
        drive_until_programmed(&mut source, &mut m, &telemetry, "the initial sync").await;
        let kernel = MapState::from_snapshot(m.writer.snapshot().unwrap());
        assert_eq!(
            &kernel,
            m.state(),
            "the kernel holds exactly what was planned"
        );
        assert_eq!(kernel.services.len(), 2, "proxy-service and myapp-proxy");
        assert_eq!(
            kernel.frontends.len(),
            5,
            "1 + (ClusterIP, 2 NodePorts, LB)"
        );
        assert_eq!(kernel.src_ranges.len(), 2, "1.2.3.4/32 and 5.6.7.0/24");
        let live = kernel
            .backends
            .values()
            .filter(|b| b.state != proxy_common::BackendState::Free as u8)
            .count();
        assert_eq!(live, 4, "10.240.0.131, .132, 2.3.4.5, 2.3.4.6");

        // The metrics reader opens the pins on its own.
        let reader = DatapathReader::open(&pin_dir.0).expect("opening the pinned maps");
        reader.check().unwrap();
        let ids: Vec<u32> = m.reconciler.service_ids().map(|(_, id)| id).collect();
        let stats = reader.collect(&ids).unwrap();
        assert_eq!(stats.ct_entries, 0);
        assert_eq!(stats.ct_max, 4096);
        assert_eq!(stats.snat_range, Config::DEFAULT.snat_ports);
        assert_eq!(stats.services.len(), 2);
        telemetry.record_apply(
            m.last.as_ref().unwrap(),
            &Default::default(),
            Some(extproxy::kube::Programmer::service_names(&m)),
        );
        let text = telemetry.render(Some(&stats));
        assert!(
            text.contains("extproxy_service_packets_total{namespace=\"proxy-test\",service=\"proxy-service\",port=\"http\",protocol=\"TCP\",family=\"IPv4\",direction=\"forward\"} 0"),
            "{text}"
        );
        assert!(text.contains("extproxy_conntrack_fill_ratio 0\n"), "{text}");
        kernel
    };

    // Restart: the pinned maps are adopted, nothing is written before every list is complete,
    // and the first sync writes nothing.
    assert_eq!(pins::check(&pin_dir.0, &limits()), Pinned::Compatible);
    api.hold_lists("endpointslices", true);
    let telemetry = Telemetry::new(Duration::from_secs(60));
    let maps = load(&pin_dir.0);
    let reconciler = Reconciler::from_snapshot(maps.snapshot().unwrap(), rlimits());
    let mut m = Model::with_writer(reconciler, maps);
    let mut source = start_source(&api, &telemetry, node_a());
    assert_eq!(
        support::drive_for(&mut source, &mut m, Duration::from_millis(1000)).await,
        0
    );
    api.hold_lists("endpointslices", false);
    drive_until_programmed(&mut source, &mut m, &telemetry, "the first sync").await;
    assert_eq!(m.rounds, vec![Vec::new()], "adopted maps are not rewritten");
    assert_eq!(
        MapState::from_snapshot(m.writer.snapshot().unwrap()),
        first_state
    );
}
