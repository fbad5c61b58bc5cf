use std::net::IpAddr;

use proxy_common::{FrontendKind, PROTO_TCP};

use super::*;
use crate::translate::{FrontendSpec, IpFamily, Protocol};

const LIMITS: Limits = Limits {
    max_services: 8,
    max_backends: 16,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(name: &str) -> ServicePortKey {
    ServicePortKey {
        namespace: "default".into(),
        name: name.into(),
        port_name: "".into(),
        protocol: Protocol::Tcp,
        family: IpFamily::V4,
    }
}

fn fe(addr: &str, port: u16) -> FrontendKey {
    FrontendKey {
        addr: Addr::from(ip(addr)),
        port: port_net(port),
        proto: PROTO_TCP,
        pad: 0,
    }
}

const EGRESS: &str = "192.0.2.100";

fn service(frontends: &[(&str, u16)], backends: &[(&str, BackendRole)]) -> DesiredService {
    DesiredService {
        frontends: frontends
            .iter()
            .map(|(a, p)| {
                (
                    fe(a, *p),
                    FrontendSpec {
                        kind: FrontendKind::ClusterIp,
                        flags: 0,
                    },
                )
            })
            .collect(),
        backends: backends
            .iter()
            .map(|(a, role)| ((ip(a), 80), *role))
            .collect(),
        affinity_timeout: 0,
        cluster_egress: false,
        egress: Some(ip(EGRESS)),
        extra_egress: Vec::new(),
        source_ranges: Vec::new(),
        port: 80,
        cluster_ip: None,
        node_port: None,
        health: Default::default(),
    }
}

fn desired(services: &[(&str, DesiredService)]) -> Desired {
    Desired {
        services: services.iter().map(|(n, s)| (key(n), s.clone())).collect(),
    }
}

use BackendRole::{Active, Draining};

/// Adds LoadBalancer frontend 20.0.0.1:80, which consults the service's source ranges.
fn add_ranged_lb(s: &mut DesiredService) {
    s.frontends.insert(
        fe("20.0.0.1", 80),
        FrontendSpec {
            kind: FrontendKind::LoadBalancer,
            flags: FE_F_SOURCE_RANGES,
        },
    );
}

fn backend(addr: &str, state: BackendState, generation: u32) -> BackendValue {
    BackendValue {
        addr: Addr::from(ip(addr)),
        port: port_net(80),
        state: state as u8,
        pad: 0,
        generation,
        service_id: 0,
        reserved: 0,
    }
}

fn freed(generation: u32) -> BackendValue {
    BackendValue {
        state: BackendState::Free as u8,
        generation,
        ..BackendValue::default()
    }
}

fn service_value(count: u32) -> ServiceValue {
    ServiceValue {
        backend_count: count,
        affinity_timeout: 0,
        egress: Addr::from(ip(EGRESS)),
        flags: 0,
        reserved: 0,
    }
}

fn cluster_ip(service_id: u32) -> FrontendValue {
    FrontendValue {
        service_id,
        kind: FrontendKind::ClusterIp as u8,
        flags: 0,
        pad: [0; 2],
    }
}

fn slot(service_id: u32, slot: u32) -> SlotKey {
    SlotKey { service_id, slot }
}

/// A kernel stand-in that checks, after every single write, that a packet arriving right then
/// would follow no dangling reference: frontends name existing services, the first
/// `backend_count` slots exist and name live backends.
#[derive(Default)]
struct CheckingKernel {
    maps: MapState,
    /// Fail the write with this index (0-based, counted over the kernel's life).
    fail_at: Option<usize>,
    /// Skip the safety checks.
    unchecked: bool,
    writes: usize,
}

impl CheckingKernel {
    fn assert_safe(&self, after: &MapOp) {
        for (frontend, value) in &self.maps.frontends {
            assert!(
                self.maps.services.contains_key(&value.service_id),
                "after {after:?}: frontend {frontend:?} names missing service {}",
                value.service_id
            );
        }
        for (id, value) in &self.maps.services {
            for s in 1..=value.backend_count {
                let backend_id = self.maps.slots.get(&slot(*id, s));
                let backend_id = backend_id
                    .unwrap_or_else(|| panic!("after {after:?}: service {id} slot {s} missing"));
                let state = self.maps.backends.get(backend_id).map(|b| b.state);
                assert!(
                    state.is_some_and(|s| s != BackendState::Free as u8),
                    "after {after:?}: service {id} slot {s} names free backend {backend_id}"
                );
            }
            if value.flags & SVC_F_EGRESS_POOL != 0 {
                let pool = self.maps.egress_pools.get(id);
                assert!(
                    pool.is_some_and(|p| p.count >= 2 && p.addrs[0] == value.egress),
                    "after {after:?}: service {id} names egress pool {pool:?}"
                );
            }
        }
    }
}

impl MapWriter for CheckingKernel {
    fn apply(&mut self, op: &MapOp) -> Result<(), MapWriteError> {
        let index = self.writes;
        self.writes += 1;
        if self.fail_at == Some(index) {
            return Err(MapWriteError::Full {
                map: op.map_name(),
                max_entries: 4,
            });
        }
        self.maps.record(op);
        if !self.unchecked {
            self.assert_safe(op);
        }
        Ok(())
    }
}

fn sync(reconciler: &mut Reconciler, kernel: &mut CheckingKernel, desired: &Desired) -> Vec<MapOp> {
    let plan = reconciler.plan(desired);
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    let ops = plan.map_ops();
    let report = reconciler.apply(plan, kernel);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        reconciler.state(),
        &kernel.maps,
        "the model must match the maps"
    );
    ops
}

#[test]
fn a_new_service_is_written_backends_first_frontends_last() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let mut s = service(
        &[("10.96.0.1", 80), ("192.0.2.10", 80)],
        &[
            ("10.1.0.2", Active),
            ("10.1.0.1", Active),
            ("10.1.0.3", Draining),
        ],
    );
    add_ranged_lb(&mut s);
    s.source_ranges = vec!["1.2.3.4/32".parse().unwrap()];
    s.affinity_timeout = 600;
    let mut ops = sync(&mut r, &mut kernel, &desired(&[("a", s)]));
    // Frontends come last; among themselves their order is the map key order.
    let mut frontend_ops = ops.split_off(7);
    frontend_ops.sort_by_key(|op| match op {
        MapOp::PutFrontend(k, _) => k.addr.to_ip(),
        _ => panic!("{op:?} after the frontends"),
    });
    ops.extend(frontend_ops);
    let range = SrcRange {
        service_id: 0,
        addr: Addr::from(ip("1.2.3.4")),
        prefix_len: 160,
    };
    assert_eq!(
        ops,
        [
            MapOp::PutBackend(0, backend("10.1.0.1", BackendState::Active, 0)),
            MapOp::PutBackend(1, backend("10.1.0.2", BackendState::Active, 0)),
            MapOp::PutBackend(2, backend("10.1.0.3", BackendState::Draining, 0)),
            MapOp::PutSlot(slot(0, 1), 0),
            MapOp::PutSlot(slot(0, 2), 1),
            MapOp::PutService(
                0,
                ServiceValue {
                    affinity_timeout: 600,
                    ..service_value(2)
                }
            ),
            MapOp::PutSrcRange(range),
            MapOp::PutFrontend(fe("10.96.0.1", 80), cluster_ip(0)),
            MapOp::PutFrontend(
                fe("20.0.0.1", 80),
                FrontendValue {
                    kind: FrontendKind::LoadBalancer as u8,
                    flags: FE_F_SOURCE_RANGES,
                    ..cluster_ip(0)
                }
            ),
            MapOp::PutFrontend(fe("192.0.2.10", 80), cluster_ip(0)),
        ]
    );
    assert_eq!(r.service_id(&key("a")), Some(0));
}

#[test]
fn an_unchanged_service_costs_nothing() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let d = desired(&[
        (
            "a",
            service(
                &[("10.96.0.1", 80)],
                &[("10.1.0.1", Active), ("10.1.0.2", Draining)],
            ),
        ),
        ("b", service(&[("10.96.0.2", 80)], &[])),
    ]);
    assert!(!sync(&mut r, &mut kernel, &d).is_empty());
    assert_eq!(sync(&mut r, &mut kernel, &d), []);
    assert_eq!(sync(&mut r, &mut kernel, &d), []);
}

#[test]
fn endpoint_changes_touch_only_what_changed() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let frontends = [("10.96.0.1", 80)];
    let step =
        |r: &mut Reconciler, kernel: &mut CheckingKernel, backends: &[(&str, BackendRole)]| {
            sync(r, kernel, &desired(&[("a", service(&frontends, backends))]))
        };
    step(
        &mut r,
        &mut kernel,
        &[
            ("10.1.0.1", Active),
            ("10.1.0.2", Active),
            ("10.1.0.3", Active),
        ],
    );
    assert_eq!(
        kernel.maps.slots,
        BTreeMap::from([(slot(0, 1), 0), (slot(0, 2), 1), (slot(0, 3), 2)])
    );

    // .2 goes, .4 comes: .4 takes .2's slot; the count does not change.
    let ops = step(
        &mut r,
        &mut kernel,
        &[
            ("10.1.0.1", Active),
            ("10.1.0.3", Active),
            ("10.1.0.4", Active),
        ],
    );
    assert_eq!(
        ops,
        [
            MapOp::PutBackend(3, backend("10.1.0.4", BackendState::Active, 0)),
            MapOp::PutSlot(slot(0, 2), 3),
            MapOp::PutBackend(1, freed(1)),
        ]
    );

    // .1 goes: the last slot's backend moves into its hole, then the count shrinks.
    let ops = step(
        &mut r,
        &mut kernel,
        &[("10.1.0.3", Active), ("10.1.0.4", Active)],
    );
    assert_eq!(
        ops,
        [
            MapOp::PutSlot(slot(0, 1), 2),
            MapOp::PutService(0, service_value(2)),
            MapOp::DeleteSlot(slot(0, 3)),
            MapOp::PutBackend(0, freed(1)),
        ]
    );

    // .4 starts terminating: it drains, out of the slots.
    let ops = step(
        &mut r,
        &mut kernel,
        &[("10.1.0.3", Active), ("10.1.0.4", Draining)],
    );
    assert_eq!(
        ops,
        [
            MapOp::PutBackend(3, backend("10.1.0.4", BackendState::Draining, 0)),
            MapOp::PutService(0, service_value(1)),
            MapOp::DeleteSlot(slot(0, 2)),
        ]
    );

    // .3 is gone too and .4 is the only one left, serving while terminating: active again.
    let ops = step(&mut r, &mut kernel, &[("10.1.0.4", Active)]);
    assert_eq!(
        ops,
        [
            MapOp::PutBackend(3, backend("10.1.0.4", BackendState::Active, 0)),
            MapOp::PutSlot(slot(0, 1), 3),
            MapOp::PutBackend(2, freed(1)),
        ]
    );
}

#[test]
fn frontend_and_setting_changes() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let mut s = service(
        &[("10.96.0.1", 80), ("192.0.2.1", 80)],
        &[("10.1.0.1", Active)],
    );
    sync(&mut r, &mut kernel, &desired(&[("a", s.clone())]));
    s.frontends.remove(&fe("192.0.2.1", 80));
    s.frontends.insert(
        fe("192.0.2.2", 80),
        FrontendSpec {
            kind: FrontendKind::ExternalIp,
            flags: 0,
        },
    );
    s.affinity_timeout = 10;
    let ops = sync(&mut r, &mut kernel, &desired(&[("a", s.clone())]));
    assert_eq!(
        ops,
        [
            MapOp::PutService(
                0,
                ServiceValue {
                    affinity_timeout: 10,
                    ..service_value(1)
                }
            ),
            MapOp::PutFrontend(
                fe("192.0.2.2", 80),
                FrontendValue {
                    kind: FrontendKind::ExternalIp as u8,
                    ..cluster_ip(0)
                }
            ),
            MapOp::DeleteFrontend(fe("192.0.2.1", 80)),
        ]
    );

    // No egress: the zero egress address makes the data path reject (counted as
    // no_egress_address); frontends, slots and backends stay as they are.
    s.egress = None;
    let ops = sync(&mut r, &mut kernel, &desired(&[("a", s)]));
    assert_eq!(
        ops,
        [MapOp::PutService(
            0,
            ServiceValue {
                backend_count: 1,
                affinity_timeout: 10,
                egress: Addr::ZERO,
                flags: 0,
                reserved: 0,
            }
        ),]
    );
}

/// An endpoint frontend (cluster egress: pods connecting to the endpoint directly) names the
/// endpoint's backend id, written after the backend and following it when the id changes.
#[test]
fn endpoint_frontends_name_their_backend() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let mut s = service(
        &[("10.96.0.1", 80)],
        &[("10.1.0.1", Active), ("10.1.0.2", Active)],
    );
    s.egress = Some(ip("10.0.0.100"));
    s.cluster_egress = true;
    let endpoint = FrontendSpec {
        kind: FrontendKind::Endpoint,
        flags: 0,
    };
    s.frontends.insert(fe("10.1.0.2", 80), endpoint);
    let ops = sync(&mut r, &mut kernel, &desired(&[("a", s.clone())]));
    let put = |backend_id: u32| {
        MapOp::PutFrontend(
            fe("10.1.0.2", 80),
            FrontendValue::endpoint(0, backend_id).unwrap(),
        )
    };
    let backend_of = |ops: &[MapOp]| {
        ops.iter().position(
            |op| matches!(op, MapOp::PutBackend(_, b) if b.addr == Addr::from(ip("10.1.0.2"))),
        )
    };
    let at = ops
        .iter()
        .position(|op| *op == put(1))
        .unwrap_or_else(|| panic!("{ops:?}"));
    assert!(backend_of(&ops).unwrap() < at, "backend first: {ops:?}");
    assert_eq!(
        kernel.maps.frontends[&fe("10.1.0.2", 80)].endpoint_backend(),
        1
    );
    // Unchanged: nothing written.
    assert!(sync(&mut r, &mut kernel, &desired(&[("a", s.clone())])).is_empty());
    // The endpoint leaves: its frontend goes with it.
    s.backends.remove(&(ip("10.1.0.2"), 80));
    s.frontends.remove(&fe("10.1.0.2", 80));
    let ops = sync(&mut r, &mut kernel, &desired(&[("a", s)]));
    assert!(
        ops.contains(&MapOp::DeleteFrontend(fe("10.1.0.2", 80))),
        "{ops:?}"
    );
}

#[test]
fn source_ranges_are_written_only_where_consulted() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let mut s = service(&[("10.96.0.1", 80)], &[]);
    s.source_ranges = vec!["1.2.3.0/24".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
    let ops = sync(&mut r, &mut kernel, &desired(&[("a", s.clone())]));
    assert!(
        !ops.iter().any(|op| matches!(op, MapOp::PutSrcRange(_))),
        "{ops:?}"
    );
    add_ranged_lb(&mut s);
    sync(&mut r, &mut kernel, &desired(&[("a", s.clone())]));
    assert_eq!(kernel.maps.src_ranges.len(), 2);
    s.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    let ops = sync(&mut r, &mut kernel, &desired(&[("a", s.clone())]));
    assert_eq!(
        ops,
        [MapOp::DeleteSrcRange(SrcRange::new(
            0,
            &"1.2.3.0/24".parse().unwrap()
        ))]
    );
    // Every range invalid: the flag stays and no range remains: deny all.
    s.source_ranges.clear();
    let ops = sync(&mut r, &mut kernel, &desired(&[("a", s)]));
    assert_eq!(
        ops,
        [MapOp::DeleteSrcRange(SrcRange::new(
            0,
            &"10.0.0.0/8".parse().unwrap()
        ))]
    );
    assert_eq!(
        kernel.maps.frontends[&fe("20.0.0.1", 80)].flags,
        FE_F_SOURCE_RANGES
    );
}

#[test]
fn a_removed_service_goes_frontends_first_backends_last() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let mut a = service(
        &[("10.96.0.1", 80)],
        &[("10.1.0.1", Active), ("10.1.0.2", Draining)],
    );
    add_ranged_lb(&mut a);
    a.source_ranges = vec!["1.2.3.0/24".parse().unwrap()];
    let b = service(&[("10.96.0.2", 80)], &[("10.1.0.1", Active)]);
    sync(&mut r, &mut kernel, &desired(&[("a", a), ("b", b.clone())]));
    let ops = sync(&mut r, &mut kernel, &desired(&[("b", b)]));
    assert_eq!(
        ops,
        [
            // In map key order (the address bytes as native-endian words).
            MapOp::DeleteFrontend(fe("20.0.0.1", 80)),
            MapOp::DeleteFrontend(fe("10.96.0.1", 80)),
            MapOp::DeleteService(0),
            MapOp::DeleteSlot(slot(0, 1)),
            MapOp::DeleteSrcRange(SrcRange::new(0, &"1.2.3.0/24".parse().unwrap())),
            MapOp::PutBackend(0, freed(1)),
            MapOp::PutBackend(1, freed(1)),
        ]
    );
    assert_eq!(r.service_id(&key("a")), None);
    // b's backend for the same endpoint is its own and untouched.
    assert_eq!(
        kernel.maps.backends[&2],
        BackendValue {
            service_id: 1,
            ..backend("10.1.0.1", BackendState::Active, 0)
        }
    );
}

#[test]
fn a_frontend_moving_between_services_is_never_deleted() {
    let shared = ("192.0.2.1", 80);
    for (from, to) in [("a", "b"), ("b", "a")] {
        let mut r = Reconciler::new(LIMITS);
        let mut kernel = CheckingKernel::default();
        let with = service(&[("10.96.0.1", 80), shared], &[]);
        let without = service(&[("10.96.0.1", 80)], &[]);
        let other_with = service(&[("10.96.0.2", 80), shared], &[]);
        let other_without = service(&[("10.96.0.2", 80)], &[]);
        sync(
            &mut r,
            &mut kernel,
            &desired(&[(from, with.clone()), (to, other_without)]),
        );
        let from_id = kernel.maps.frontends[&fe(shared.0, shared.1)].service_id;
        // Moved while the old owner stays.
        let ops = sync(
            &mut r,
            &mut kernel,
            &desired(&[(from, without), (to, other_with)]),
        );
        assert!(
            !ops.contains(&MapOp::DeleteFrontend(fe(shared.0, shared.1))),
            "{from}->{to}: {ops:?}"
        );
        let to_id = r.service_id(&key(to)).unwrap();
        assert_ne!(from_id, to_id);
        assert_eq!(
            kernel.maps.frontends[&fe(shared.0, shared.1)].service_id,
            to_id
        );
        // Moved back while the new owner is removed entirely.
        let ops = sync(&mut r, &mut kernel, &desired(&[(from, with)]));
        assert!(
            !ops.contains(&MapOp::DeleteFrontend(fe(shared.0, shared.1))),
            "{from}<-{to}: {ops:?}"
        );
        assert_eq!(
            kernel.maps.frontends[&fe(shared.0, shared.1)].service_id,
            from_id
        );
    }
}

#[test]
fn ids_are_reused_oldest_first_with_a_new_generation() {
    let limits = Limits {
        max_services: 3,
        max_backends: 2,
    };
    let mut r = Reconciler::new(limits);
    let mut kernel = CheckingKernel::default();
    // Service i has ClusterIP 10.96.0.(i+1); only the first has backends.
    let d = |names: &[&str], backends: &[(&str, BackendRole)]| {
        let services: Vec<(&str, DesiredService)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let backends = if i == 0 { backends } else { &[] };
                (
                    *n,
                    service(&[(&format!("10.96.0.{}", i + 1), 80)], backends),
                )
            })
            .collect();
        desired(&services)
    };
    // Backends: ids 0 and 1; .2 leaves (id 1 freed, generation 1); .3 reuses id 1 with it.
    sync(
        &mut r,
        &mut kernel,
        &d(&["a"], &[("10.1.0.1", Active), ("10.1.0.2", Active)]),
    );
    sync(&mut r, &mut kernel, &d(&["a"], &[("10.1.0.1", Active)]));
    let ops = sync(
        &mut r,
        &mut kernel,
        &d(&["a"], &[("10.1.0.1", Active), ("10.1.0.3", Active)]),
    );
    assert_eq!(
        ops[0],
        MapOp::PutBackend(1, backend("10.1.0.3", BackendState::Active, 1))
    );

    // Service ids: never-used ones first, then released ones oldest first.
    let mut r = Reconciler::new(limits);
    let mut kernel = CheckingKernel::default();
    let ids = |r: &Reconciler| {
        r.service_ids()
            .map(|(k, id)| (k.name.to_string(), id))
            .collect::<Vec<_>>()
    };
    sync(&mut r, &mut kernel, &d(&["a"], &[]));
    sync(&mut r, &mut kernel, &d(&["b"], &[]));
    assert_eq!(
        ids(&r),
        [("b".to_owned(), 1)],
        "a fresh id, not a's just-freed 0"
    );
    sync(&mut r, &mut kernel, &d(&["b", "c"], &[]));
    sync(&mut r, &mut kernel, &d(&["c"], &[]));
    assert_eq!(ids(&r), [("c".to_owned(), 2)]);
    sync(&mut r, &mut kernel, &d(&["c", "d", "e"], &[]));
    assert_eq!(
        ids(&r),
        [
            ("c".to_owned(), 2),
            ("d".to_owned(), 0),
            ("e".to_owned(), 1)
        ]
    );
}

#[test]
fn limits_are_refused_loudly_per_service() {
    let limits = Limits {
        max_services: 1,
        max_backends: 2,
    };
    let mut r = Reconciler::new(limits);
    let d = desired(&[
        (
            "a",
            service(
                &[("10.96.0.1", 80)],
                &[
                    ("10.1.0.1", Active),
                    ("10.1.0.2", Active),
                    ("10.1.0.3", Active),
                ],
            ),
        ),
        ("b", service(&[("10.96.0.2", 80)], &[("10.1.0.1", Active)])),
        ("c", service(&[("10.96.0.3", 80)], &[])),
    ]);
    let plan = r.plan(&d);
    assert_eq!(
        plan.errors,
        [
            CapacityError::BackendIds {
                service: key("a"),
                needed: 3,
                available: 2,
                max: 2,
            },
            CapacityError::ServiceIds {
                service: key("c"),
                max: 1,
            },
        ]
    );
    assert_eq!(
        plan.errors[1].to_string(),
        "Service default/c port \"\" TCP IPv4: cannot be programmed: all 1 service ids are in use (raise the services map size)"
    );
    assert!(
        plan.ops.iter().all(|op| op.service == Some(key("b"))),
        "{:?}",
        plan.ops
    );
    let mut kernel = CheckingKernel::default();
    let report = r.apply(plan, &mut kernel);
    assert_eq!(report.failures, []);
    assert_eq!(r.service_id(&key("b")), Some(0));
}

#[test]
fn a_failed_write_is_reported_with_its_service_and_the_model_stays_true() {
    let mut r = Reconciler::new(LIMITS);
    // Write 2 is b's first slot (a: backend, service; b: backend, slot...).
    let mut kernel = CheckingKernel {
        fail_at: Some(3),
        ..CheckingKernel::default()
    };
    let d = desired(&[
        ("a", service(&[("10.96.0.1", 80)], &[])),
        ("b", service(&[("10.96.0.2", 80)], &[("10.1.0.1", Active)])),
        ("c", service(&[("10.96.0.3", 80)], &[])),
    ]);
    let plan = r.plan(&d);
    assert_eq!(plan.ops[3].op, MapOp::PutSlot(slot(1, 1), 0));
    let report = r.apply(plan, &mut kernel);
    assert_eq!(
        report.failures,
        [OpFailure {
            service: Some(key("b")),
            op: MapOp::PutSlot(slot(1, 1), 0),
            error: MapWriteError::Full {
                map: "SLOTS",
                max_entries: 4,
            },
        }]
    );
    assert_eq!(
        report.failures[0].to_string(),
        "Service default/b port \"\" TCP IPv4: map SLOTS is full (max_entries 4) (update left unfinished)"
    );
    // b's service value and frontend were skipped; c went ahead.
    assert_eq!(report.skipped, 2);
    assert_eq!(r.state(), &kernel.maps);
    assert!(!kernel.maps.services.contains_key(&1));
    assert!(kernel.maps.services.contains_key(&2));
    // The next round finishes the job and then nothing is left to do.
    let ops = sync(&mut r, &mut kernel, &d);
    assert_eq!(
        ops,
        [
            MapOp::PutSlot(slot(1, 1), 0),
            MapOp::PutService(1, service_value(1)),
            MapOp::PutFrontend(fe("10.96.0.2", 80), cluster_ip(1)),
        ]
    );
    assert_eq!(sync(&mut r, &mut kernel, &d), []);
}

#[test]
fn a_restarted_agent_adopts_the_maps_without_a_single_write() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let mut a = service(
        &[("10.96.0.1", 80), ("20.0.0.1", 80)],
        &[
            ("10.1.0.1", Active),
            ("10.1.0.2", Active),
            ("10.1.0.3", Draining),
        ],
    );
    add_ranged_lb(&mut a);
    a.source_ranges = vec!["1.2.3.0/24".parse().unwrap()];
    let b = service(
        &[("10.96.0.2", 80)],
        &[("10.1.0.1", Active), ("10.1.0.3", Draining)],
    );
    let gone = service(&[("10.96.0.3", 80)], &[("10.1.0.9", Active)]);
    // History, so ids and generations are not trivially 0..n.
    sync(
        &mut r,
        &mut kernel,
        &desired(&[
            ("gone", gone),
            ("x", service(&[("10.96.0.9", 80)], &[("10.1.0.8", Active)])),
        ]),
    );
    sync(
        &mut r,
        &mut kernel,
        &desired(&[
            ("a", a.clone()),
            ("b", b.clone()),
            (
                "gone",
                service(&[("10.96.0.3", 80)], &[("10.1.0.9", Active)]),
            ),
        ]),
    );

    let snapshot = MapSnapshot {
        frontends: kernel
            .maps
            .frontends
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect(),
        services: kernel.maps.services.iter().map(|(k, v)| (*k, *v)).collect(),
        slots: kernel.maps.slots.iter().map(|(k, v)| (*k, *v)).collect(),
        backends: kernel.maps.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        src_ranges: kernel.maps.src_ranges.iter().copied().collect(),
    };
    let mut adopted = Reconciler::from_snapshot(snapshot.clone(), LIMITS);
    let same = desired(&[
        ("a", a.clone()),
        ("b", b.clone()),
        (
            "gone",
            service(&[("10.96.0.3", 80)], &[("10.1.0.9", Active)]),
        ),
    ]);
    assert_eq!(sync(&mut adopted, &mut kernel, &same), []);
    for name in ["a", "b", "gone"] {
        assert_eq!(
            adopted.service_id(&key(name)),
            r.service_id(&key(name)),
            "{name}"
        );
    }
    // And it carries on from there like the original would.
    let next = desired(&[
        ("a", a.clone()),
        ("b", service(&[("10.96.0.2", 80)], &[("10.1.0.1", Active)])),
    ]);
    let mut original_kernel = CheckingKernel {
        maps: kernel.maps.clone(),
        ..CheckingKernel::default()
    };
    let adopted_ops = sync(&mut adopted, &mut kernel, &next);
    let original_ops = sync(&mut r, &mut original_kernel, &next);
    assert_eq!(adopted_ops, original_ops);

    // Whatever in the maps matches nothing desired is removed by the first plan.
    let mut fresh = Reconciler::from_snapshot(snapshot, LIMITS);
    let mut kernel = CheckingKernel {
        maps: MapState::default(),
        ..CheckingKernel::default()
    };
    kernel.maps = fresh.state().clone();
    sync(&mut fresh, &mut kernel, &desired(&[("b", b)]));
    assert_eq!(kernel.maps.services.len(), 1);
    assert_eq!(kernel.maps.frontends.len(), 1);
    assert!(kernel.maps.src_ranges.is_empty());
    let live: Vec<u32> = kernel
        .maps
        .backends
        .iter()
        .filter(|(_, v)| v.state != BackendState::Free as u8)
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(live.len(), 2, "b's two endpoints");
}

#[test]
fn slot_assignment_moves_little() {
    let old = |slots: &[u32]| -> BTreeMap<u32, u32> {
        slots
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u32 + 1, *b))
            .collect()
    };
    let cases: [(&[u32], &[u32], &[u32]); 6] = [
        (&[], &[1, 2, 3], &[1, 2, 3]),
        (&[1, 2, 3], &[1, 2, 3], &[1, 2, 3]),
        (&[1, 2, 3], &[1, 3, 4], &[1, 4, 3]),
        (&[1, 2, 3], &[2, 3], &[3, 2]),
        (&[1, 2, 3, 4], &[1, 4], &[1, 4]),
        (&[1, 2, 3], &[], &[]),
    ];
    for (before, active, after) in cases {
        assert_eq!(
            assign_slots(&old(before), active),
            after,
            "{before:?} -> {active:?}"
        );
    }
}

/// xorshift64*: deterministic without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

/// A random desired state over few names and addresses, so frontends move between services,
/// endpoints come and go, and the limits are hit.
fn random_desired(rng: &mut Rng) -> Desired {
    const FRONTENDS: [&str; 6] = [
        "10.96.0.1",
        "10.96.0.2",
        "10.96.0.3",
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.3",
    ];
    const BACKENDS: [&str; 5] = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5"];
    let mut d = Desired::default();
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    for name in ["a", "b", "c", "d", "e", "f", "g", "h", "i"] {
        if rng.below(4) == 0 {
            continue;
        }
        let frontends: Vec<(&str, u16)> = (0..rng.below(3))
            .map(|_| FRONTENDS[rng.below(FRONTENDS.len())])
            .filter(|f| taken.insert(*f))
            .map(|f| (f, 80))
            .collect();
        let backends: Vec<(&str, BackendRole)> = (0..rng.below(5))
            .map(|_| {
                let role = if rng.below(4) == 0 { Draining } else { Active };
                (BACKENDS[rng.below(BACKENDS.len())], role)
            })
            .collect();
        let mut s = service(&frontends, &backends);
        s.affinity_timeout = [0, 10][rng.below(2)];
        if rng.below(3) == 0 {
            s.egress = None;
        }
        if let Some((first, spec)) = s.frontends.iter_mut().next().filter(|_| rng.below(3) == 0) {
            let _ = first;
            spec.kind = FrontendKind::LoadBalancer;
            spec.flags = FE_F_SOURCE_RANGES;
            s.source_ranges = vec![["1.2.3.0/24", "5.6.0.0/16"][rng.below(2)].parse().unwrap()];
        }
        d.services.insert(key(name), s);
    }
    d
}

#[test]
fn incremental_plans_equal_full_plans() {
    for seed in 1..=200u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut r = Reconciler::new(LIMITS);
        // Which packets a half-applied plan mishandles is not the question here.
        let mut kernel = CheckingKernel {
            unchecked: true,
            ..CheckingKernel::default()
        };
        let mut previous = Desired::default();
        for step in 0..40 {
            let next = random_desired(&mut rng);
            let changed: BTreeSet<ServicePortKey> = previous
                .services
                .keys()
                .chain(next.services.keys())
                .filter(|k| previous.services.get(*k) != next.services.get(*k))
                .cloned()
                .collect();
            let mut full = r.clone();
            let want = full.plan(&next);
            let got = r.plan_changes(&next, &changed);
            assert_eq!(got.map_ops(), want.map_ops(), "seed {seed} step {step}");
            assert_eq!(got.errors, want.errors, "seed {seed} step {step}");
            // Now and then a write fails half-way: the next plans must take it up again.
            if rng.below(5) == 0 {
                kernel.fail_at = Some(kernel.writes + rng.below(got.ops.len().max(1)));
            }
            r.apply(got, &mut kernel);
            kernel.fail_at = None;
            assert_eq!(r.state(), &kernel.maps, "seed {seed} step {step}");
            previous = next;
        }
        // Once nothing fails, retries converge to what a full plan would do.
        for round in 0..3 {
            let want = r.clone().plan(&previous);
            let got = r.plan_changes(&previous, &BTreeSet::new());
            assert_eq!(got.map_ops(), want.map_ops(), "seed {seed} retry {round}");
            r.apply(got, &mut kernel);
        }
    }
}

#[test]
fn unchanged_services_are_not_planned() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let a = service(&[("10.96.0.1", 80)], &[("10.1.0.1", Active)]);
    let b = service(&[("10.96.0.2", 80)], &[("10.1.0.2", Active)]);
    let d = desired(&[("a", a.clone()), ("b", b)]);
    sync(&mut r, &mut kernel, &d);
    let plan = r.plan_changes(&d, &BTreeSet::new());
    assert!(plan.ops.is_empty());
    let b2 = service(
        &[("10.96.0.2", 80), ("192.0.2.9", 80)],
        &[("10.1.0.2", Active)],
    );
    let d = desired(&[("a", a), ("b", b2)]);
    let plan = r.plan_changes(&d, &BTreeSet::from([key("b")]));
    assert_eq!(
        plan.ops
            .iter()
            .map(|p| p.service.clone())
            .collect::<Vec<_>>(),
        [Some(key("b"))]
    );
}

fn pool_of(addrs: &[&str]) -> Box<EgressPool> {
    let mut pool = EgressPool {
        count: addrs.len() as u32,
        ..EgressPool::default()
    };
    for (slot, a) in pool.addrs.iter_mut().zip(addrs) {
        *slot = Addr::from(ip(a));
    }
    Box::new(pool)
}

/// A Service with several egress addresses: its pool is written before the service value that
/// flags it, changed in place, and deleted only after the value stops naming it.
#[test]
fn an_egress_pool_is_written_before_its_service_and_deleted_after() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let mut s = service(&[("10.96.0.1", 80)], &[("10.1.0.1", Active)]);
    s.extra_egress = vec![ip("192.0.2.101")];
    let ops = sync(&mut r, &mut kernel, &desired(&[("a", s.clone())]));
    let pooled = ServiceValue {
        flags: SVC_F_EGRESS_POOL,
        ..service_value(1)
    };
    assert_eq!(
        ops,
        [
            MapOp::PutBackend(0, backend("10.1.0.1", BackendState::Active, 0)),
            MapOp::PutSlot(slot(0, 1), 0),
            MapOp::PutEgressPool(0, pool_of(&[EGRESS, "192.0.2.101"])),
            MapOp::PutService(0, pooled),
            MapOp::PutFrontend(fe("10.96.0.1", 80), cluster_ip(0)),
        ]
    );
    assert_eq!(sync(&mut r, &mut kernel, &desired(&[("a", s.clone())])), []);

    // A third address: the pool alone changes.
    s.extra_egress.push(ip("192.0.2.102"));
    let ops = sync(&mut r, &mut kernel, &desired(&[("a", s.clone())]));
    assert_eq!(
        ops,
        [MapOp::PutEgressPool(
            0,
            pool_of(&[EGRESS, "192.0.2.101", "192.0.2.102"])
        )]
    );

    // Back to one address: the value first, then the pool.
    s.extra_egress.clear();
    let ops = sync(&mut r, &mut kernel, &desired(&[("a", s.clone())]));
    assert_eq!(
        ops,
        [
            MapOp::PutService(0, service_value(1)),
            MapOp::DeleteEgressPool(0),
        ]
    );
    assert!(kernel.maps.egress_pools.is_empty());

    // A removed Service's pool goes after its value.
    s.extra_egress = vec![ip("192.0.2.101")];
    sync(&mut r, &mut kernel, &desired(&[("a", s.clone())]));
    let ops = sync(&mut r, &mut kernel, &desired(&[]));
    let value_at = ops.iter().position(|op| *op == MapOp::DeleteService(0));
    let pool_at = ops.iter().position(|op| *op == MapOp::DeleteEgressPool(0));
    assert!(value_at.is_some() && pool_at > value_at, "{ops:?}");
    assert!(kernel.maps.egress_pools.is_empty());
}

/// Pools are not read back from pinned maps: an adopting agent writes each one again, and a
/// pool the previous agent left for a Service that no longer has one is deleted (its service
/// value's flag says it is there).
#[test]
fn an_adopting_agent_rewrites_pools_and_deletes_stale_ones() {
    let mut r = Reconciler::new(LIMITS);
    let mut kernel = CheckingKernel::default();
    let mut a = service(&[("10.96.0.1", 80)], &[("10.1.0.1", Active)]);
    a.extra_egress = vec![ip("192.0.2.101")];
    let mut b = service(&[("10.96.0.2", 80)], &[("10.1.0.2", Active)]);
    b.extra_egress = vec![ip("192.0.2.101")];
    sync(
        &mut r,
        &mut kernel,
        &desired(&[("a", a.clone()), ("b", b.clone())]),
    );
    let snapshot = MapSnapshot {
        frontends: kernel
            .maps
            .frontends
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect(),
        services: kernel.maps.services.iter().map(|(k, v)| (*k, *v)).collect(),
        slots: kernel.maps.slots.iter().map(|(k, v)| (*k, *v)).collect(),
        backends: kernel.maps.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        src_ranges: kernel.maps.src_ranges.iter().copied().collect(),
    };
    let mut adopted = Reconciler::from_snapshot(snapshot, LIMITS);
    let a_id = r.service_id(&key("a")).unwrap();
    let b_id = r.service_id(&key("b")).unwrap();
    // The kernel still holds both pools; the adopted model knows none.
    b.extra_egress.clear();
    let plan = adopted.plan(&desired(&[("a", a), ("b", b)]));
    let ops = plan.map_ops();
    adopted.apply(plan, &mut kernel);
    assert_eq!(
        ops,
        [
            MapOp::PutEgressPool(a_id, pool_of(&[EGRESS, "192.0.2.101"])),
            MapOp::PutService(b_id, service_value(1)),
            MapOp::DeleteEgressPool(b_id),
        ]
    );
    assert_eq!(adopted.state(), &kernel.maps);
    assert_eq!(kernel.maps.egress_pools.keys().collect::<Vec<_>>(), [&a_id]);
}
