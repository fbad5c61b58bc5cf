//! Network-namespace tests: a pod, a node running the real `extproxy` binary on its uplink, and
//! an outside network with endpoints and clients; real TCP and UDP through Service addresses,
//! asserting what the far side saw. Needs root; each test builds and deletes its own namespaces.

use extproxy_tests::ip;
use std::time::Duration;

use extproxy_tests::{agent::*, sh};

const SETTLE: Duration = Duration::from_secs(5);

/// A selector-less Service with every frontend kind and an EndpointSlice.
fn service_yaml(name: &str, extra_spec: &str, endpoints: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.60]
  ports:
    - {{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}
    - {{name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}}
{extra_spec}
status:
  loadBalancer:
    ingress: [{{ip: 192.0.2.50}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: demo
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
  - {{name: http, port: 8080, protocol: TCP}}
  - {{name: dns, port: 5353, protocol: UDP}}
endpoints:
{endpoints}
"#
    )
}

fn endpoint(ip: &str, ready: bool, serving: bool, terminating: bool) -> String {
    format!(
        "  - addresses: [\"{ip}\"]\n    conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
    )
}

fn ready(ip: &str) -> String {
    endpoint(ip, true, true, false)
}

fn assert_snat(seen: &Seen, ep: &str) {
    assert_eq!(
        seen.peer_ip,
        ip(NODE),
        "the endpoint must see the node's egress IP"
    );
    // `--snat-ports auto` on a node with Linux's default ephemeral range (32768-60999) and the
    // default NodePort range.
    assert!(
        (1024..=29_999).contains(&seen.peer_port) || (61_000..=65_535).contains(&seen.peer_port),
        "SNAT port {}",
        seen.peer_port
    );
    assert_eq!(seen.endpoint, ip(ep));
}

/// One TCP connection from the pod to the ClusterIP; the endpoint that answered.
fn pod_to_cluster_ip(t: &Topology) -> std::net::IpAddr {
    tcp_once(&t.pod.name, None, "10.96.0.10", 80)
        .unwrap()
        .endpoint
}

#[test]
fn every_frontend_kind_over_tcp_and_udp() {
    let t = Topology::new("kinds");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP1, 5353)]);
    t.write_manifest("svc.yaml", &service_yaml("web", "", &ready(EP1)));
    let agent = t.start_agent(&[]);

    // A pod to the ClusterIP (TC egress on the uplink).
    assert_snat(&tcp_once(&t.pod.name, None, "10.96.0.10", 80).unwrap(), EP1);
    assert_snat(&udp_once(&t.pod.name, None, "10.96.0.10", 53).unwrap(), EP1);
    // A process on the node itself to the ClusterIP.
    assert_snat(
        &tcp_once(&t.node.name, None, "10.96.0.10", 80).unwrap(),
        EP1,
    );
    // Outside clients to the NodePort, the LoadBalancer IP and the externalIP.
    for (dst, port) in [(NODE, 30080), ("192.0.2.50", 80), ("192.0.2.60", 80)] {
        assert_snat(
            &tcp_once(&t.ext.name, Some(CLIENT), dst, port).unwrap(),
            EP1,
        );
    }
    assert_snat(
        &udp_once(&t.ext.name, Some(CLIENT), NODE, 30053).unwrap(),
        EP1,
    );

    let report = agent.inspect();
    let svc = &report["services"][0];
    assert!(svc["fwd_packets"].as_u64().unwrap() > 0 && svc["rev_packets"].as_u64().unwrap() > 0);
    assert_eq!(
        report["drops"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        0
    );
    let text = agent.inspect_text();
    assert!(text.contains("demo/web:http/TCP/IPv4"), "{text}");
    let log = agent.stop();
    assert!(log.contains("detached and cleaned up"), "{log}");
    assert!(!t.pin_dir().join("CT").exists(), "pins removed on exit");
}

#[test]
fn source_ranges_admit_one_client_and_refuse_another() {
    let t = Topology::new("ranges");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080)]);
    t.write_manifest(
        "svc.yaml",
        &service_yaml(
            "lb",
            "  loadBalancerSourceRanges: [198.51.100.9/32]",
            &ready(EP1),
        ),
    );
    let agent = t.start_agent(&[]);
    assert_snat(
        &tcp_once(&t.ext.name, Some(CLIENT), "192.0.2.50", 80).unwrap(),
        EP1,
    );
    let refused = TcpClient::connect(
        &t.ext.name,
        Some(CLIENT2),
        "192.0.2.50",
        80,
        Duration::from_secs(1),
    );
    assert!(
        refused.is_err(),
        "a client outside the source ranges got through"
    );
    assert!(agent.counter("source_range_denied") >= 1);
    // Source ranges restrict the LoadBalancer address only (as in kube-proxy).
    assert_snat(
        &tcp_once(&t.ext.name, Some(CLIENT2), NODE, 30080).unwrap(),
        EP1,
    );
}

#[test]
fn endpoint_changes_keep_a_long_connection_up() {
    let t = Topology::new("churn");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP2, 8080), (EP3, 8080)]);
    t.write_manifest("svc.yaml", &service_yaml("churn", "", &ready(EP1)));
    let agent = t.start_agent(&[]);
    let mut long =
        TcpClient::connect(&t.pod.name, None, "10.96.0.10", 80, Duration::from_secs(3)).unwrap();
    assert_eq!(long.exchange("1").unwrap().endpoint, ip(EP1));

    let changed = |n: usize| agent.wait_for_log_count("manifests changed", n, SETTLE);
    // Added: new connections spread, the long one stays on EP1.
    t.write_manifest(
        "svc.yaml",
        &service_yaml("churn", "", &(ready(EP1) + &ready(EP2))),
    );
    changed(1);
    let seen: std::collections::HashSet<_> = (0..24).map(|_| pod_to_cluster_ip(&t)).collect();
    assert_eq!(seen, [ip(EP1), ip(EP2)].into_iter().collect());
    assert_eq!(long.exchange("2").unwrap().endpoint, ip(EP1));

    // EP1 terminating: no new flows, the established one keeps going.
    t.write_manifest(
        "svc.yaml",
        &service_yaml(
            "churn",
            "",
            &(endpoint(EP1, false, true, true) + &ready(EP2)),
        ),
    );
    changed(2);
    for _ in 0..12 {
        assert_eq!(pod_to_cluster_ip(&t), ip(EP2));
    }
    assert_eq!(long.exchange("3").unwrap().endpoint, ip(EP1));

    // EP1 removed: its connection ends cleanly (reset), it does not hang.
    t.write_manifest(
        "svc.yaml",
        &service_yaml("churn", "", &(ready(EP2) + &ready(EP3))),
    );
    changed(3);
    let err = long
        .exchange("4")
        .expect_err("the removed endpoint's connection must end");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
        ),
        "ended with {err:?}"
    );
    assert!(agent.counter("endpoint_removed") >= 1);
}

/// A new Service with a serving Service's clusterIP took it over (conflicts were decided by
/// namespace/name) and the serving Service's clients reached the newcomer's endpoint, or timed
/// out, from then on. The newcomer's manifest here is even older (moved in with its old
/// modification time): the Service serving the address keeps it all the same.
#[test]
fn a_newcomer_cannot_take_a_serving_services_address() {
    let t = Topology::new("taken");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP2, 8080)]);
    let in_namespace = |name: &str, ns: &str, ep: &str| {
        service_yaml(name, "", &ready(ep)).replace("namespace: demo", &format!("namespace: {ns}"))
    };
    t.write_manifest("z.yaml", &in_namespace("serving", "zz", EP1));
    let agent = t.start_agent(&[]);
    assert_eq!(pod_to_cluster_ip(&t), ip(EP1));

    let old = t.dir.join("a.yaml");
    std::fs::write(&old, in_namespace("newcomer", "aa", EP2)).unwrap();
    let year_2020 = std::time::UNIX_EPOCH + Duration::from_secs(1_577_836_800);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(year_2020)
        .unwrap();
    std::fs::rename(&old, t.manifests().join("a.yaml")).unwrap();
    agent.wait_for_log_count("manifests changed", 1, SETTLE);
    for _ in 0..8 {
        assert_eq!(
            pod_to_cluster_ip(&t),
            ip(EP1),
            "the serving Service keeps its address"
        );
    }
    let log = agent.log_text();
    assert!(
        log.contains("a.yaml:1: Service aa/newcomer: spec.clusterIP: 10.96.0.10:80/TCP (ClusterIP) is already used by Service zz/serving port \"http\", which keeps it (it serves it already); not programmed here"),
        "{log}"
    );
    assert!(!log.contains("z.yaml:1: Service zz/serving: spec"), "{log}");
}

#[test]
fn no_endpoints_is_refused_not_black_holed() {
    let t = Topology::new("empty");
    t.write_manifest(
        "svc.yaml",
        &service_yaml("empty", "", "  []\n").replace("endpoints:\n  []", "endpoints: []"),
    );
    let agent = t.start_agent(&[]);
    let start = std::time::Instant::now();
    let err = TcpClient::connect(&t.pod.name, None, "10.96.0.10", 80, Duration::from_secs(3))
        .err()
        .expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refused at once, not after a timeout"
    );
    let err = tcp_once(&t.ext.name, Some(CLIENT), NODE, 30080).expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let err = udp_once(&t.pod.name, None, "10.96.0.10", 53).expect_err("port unreachable");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(agent.counter("no_endpoints") >= 3);
}

#[test]
fn ipv6_services() {
    let t = Topology::new("v6");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1_6, 8443)]);
    t.write_manifest(
        "svc.yaml",
        r#"apiVersion: v1
kind: Service
metadata: {name: web6, namespace: demo}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: fd00:10:96::10
  ports: [{name: https, port: 443, targetPort: 8443, nodePort: 30443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web6-1, namespace: demo, labels: {kubernetes.io/service-name: web6}}
addressType: IPv6
ports: [{name: https, port: 8443}]
endpoints: [{addresses: ["2001:db8:e::7"]}]
"#,
    );
    let _agent = t.start_agent(&[]);
    for (ns, bind, dst, port) in [
        (&t.pod.name, None, "fd00:10:96::10", 443),
        (&t.ext.name, Some(CLIENT6), NODE6, 30443),
    ] {
        let seen = tcp_once(ns, bind, dst, port).unwrap();
        assert_eq!(seen.peer_ip, ip(NODE6), "IPv6 egress address");
        assert_eq!(seen.endpoint, ip(EP1_6));
    }
}

#[test]
fn xdp_tx_fast_path_and_tc_only_mode() {
    // XDP sending translated packets back out itself (the peer runs an XDP program, as a NIC
    // would need nothing).
    let t = Topology::new("xdptx");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080)]);
    t.write_manifest("svc.yaml", &service_yaml("fast", "", &ready(EP1)));
    t.attach_xdp_pass_on_peers();
    // With the gateway's address resolved, XDP never needs the kernel's neighbour code.
    let gw_mac = t.ext.sh("cat /sys/class/net/ext0/address");
    t.node.sh(&format!(
        "ip neigh replace 10.0.0.254 lladdr {} dev up0 nud permanent",
        gw_mac.trim()
    ));
    let agent = t.start_agent(&["--xdp-tx", "on"]);
    for _ in 0..5 {
        assert_snat(
            &tcp_once(&t.ext.name, Some(CLIENT), NODE, 30080).unwrap(),
            EP1,
        );
    }
    assert_eq!(
        agent.counter("xdp_pass_to_tc"),
        0,
        "everything handled at XDP"
    );
    drop(agent);

    // The default on a veth uplink is no XDP at all: TC ingress does the ingress work.
    let agent = t.start_agent(&["--xdp", "auto"]);
    assert!(
        agent.log_text().contains("XDP off (a veth"),
        "{}",
        agent.log_text()
    );
    assert_snat(
        &tcp_once(&t.ext.name, Some(CLIENT), NODE, 30080).unwrap(),
        EP1,
    );
    assert_snat(&tcp_once(&t.pod.name, None, "10.96.0.10", 80).unwrap(), EP1);
}

/// Removes what agents run with `--keep-on-exit` left pinned.
fn cleanup_pins(t: &Topology) {
    let _ = std::process::Command::new(extproxy_bin())
        .args(["cleanup", "--pin-dir"])
        .arg(t.pin_dir())
        .output();
}

/// Pins `name` in `dir` as a new, empty BPF hash map of the given layout, replacing what is
/// pinned there: the maps an older agent left (aya has no call that creates a map of any layout).
fn pin_hash_map(dir: &std::path::Path, name: &str, key_size: u32, value_size: u32, max: u32) {
    use std::os::unix::ffi::OsStrExt;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    // union bpf_attr, map creation: type, key size, value size, max entries, flags.
    let mut attr = [0u32; 32];
    attr[..5].copy_from_slice(&[
        BPF_MAP_TYPE_HASH,
        key_size,
        value_size,
        max,
        BPF_F_NO_PREALLOC,
    ]);
    let size = std::mem::size_of_val(&attr);
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), size) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // Object pinning: the path's address (64 bits), then the descriptor.
    let mut pin = [0u32; 32];
    let ptr = c_path.as_ptr() as u64;
    pin[0] = ptr as u32;
    pin[1] = (ptr >> 32) as u32;
    pin[2] = fd as u32;
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), size) };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(fd as i32) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN {}: {err}", path.display());
}

fn pinned_value_size(dir: &std::path::Path, name: &str) -> u32 {
    aya::maps::MapData::from_pin(dir.join(name))
        .and_then(|m| m.info())
        .map(|i| i.value_size())
        .unwrap()
}

/// An upgrade whose maps differ only where no flow lives: the previous main's Maglev tables
/// were 4 bytes smaller (M + 1 words), and a newer version may add a map. The new agent
/// creates those anew and adopts the rest: established connections continue.
#[test]
fn an_upgrade_that_changes_only_maps_without_flows_keeps_connections() {
    let t = Topology::new("upgrade");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080)]);
    t.write_manifest("svc.yaml", &service_yaml("sticky", "", &ready(EP1)));
    let agent = t.start_agent(&["--keep-on-exit", "--pod-ifaces", "pod0"]);
    let mut long =
        TcpClient::connect(&t.pod.name, None, "10.96.0.10", 80, Duration::from_secs(3)).unwrap();
    assert_eq!(long.exchange("before").unwrap().endpoint, ip(EP1));
    agent.kill();

    let old_maglev = ((proxy_common::MAGLEV_M + 1) * 4) as u32;
    pin_hash_map(
        &t.pin_dir(),
        proxy_common::MAP_MAGLEV,
        4,
        old_maglev,
        proxy_common::DEFAULT_MAX_MAGLEV,
    );
    std::fs::remove_file(t.pin_dir().join(proxy_common::MAP_EVENT_LIMIT)).unwrap();
    assert_eq!(
        pinned_value_size(&t.pin_dir(), proxy_common::MAP_MAGLEV),
        old_maglev
    );

    let agent = t.start_agent(&["--keep-on-exit", "--pod-ifaces", "pod0"]);
    let log = agent.log_text();
    assert!(log.contains("creating anew the maps"), "{log}");
    assert!(log.contains("MAGLEV has key/value sizes"), "{log}");
    assert!(log.contains("EVENT_LIMIT is not pinned"), "{log}");
    assert_eq!(
        long.exchange("after the upgrade").unwrap().endpoint,
        ip(EP1),
        "the connection survived"
    );
    assert_eq!(
        pinned_value_size(&t.pin_dir(), proxy_common::MAP_MAGLEV) as usize,
        std::mem::size_of::<proxy_common::MaglevTable>()
    );
    assert!(t.pin_dir().join(proxy_common::MAP_EVENT_LIMIT).exists());
    assert_eq!(pod_to_cluster_ip(&t), ip(EP1), "new connections too");
    drop(agent);
    cleanup_pins(&t);
}

/// The previous release's binary (`cargo xtask test` builds it from history), or None with the
/// reason printed.
fn previous_agent() -> Option<std::path::PathBuf> {
    match std::env::var_os("EXTPROXY_PREVIOUS_AGENT") {
        Some(p) if !p.is_empty() => Some(p.into()),
        _ => {
            eprintln!(
                "skipped: EXTPROXY_PREVIOUS_AGENT is not set (`cargo xtask test` builds the \
                 previous release from history and sets it; `cargo xtask previous-agent` prints it)"
            );
            None
        }
    }
}

/// The upgrade from the last release with ABI 2, whose conntrack and SNAT port entries are
/// smaller and which had no table for unfinished handshakes: every tracked flow must come over.
/// Before, the new agent refused the pins (or, told to replace them, dropped every flow).
#[test]
fn an_upgrade_from_abi_2_carries_live_flows_over() {
    let Some(previous) = previous_agent() else {
        return;
    };
    let t = Topology::new("abi2up");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP1, 5353)]);
    t.write_manifest("svc.yaml", &service_yaml("web", "", &ready(EP1)));
    let args = ["--keep-on-exit", "--pod-ifaces", "pod0"];
    let old = Agent::start_binary(&t, &previous, &args);
    let ct_v2 = pinned_value_size(&t.pin_dir(), proxy_common::MAP_CT);
    assert_ne!(
        ct_v2 as usize,
        std::mem::size_of::<proxy_common::CtValue>(),
        "the previous release's conntrack layout"
    );

    // Pods to the cluster IP, a client outside to the NodePort, a pod's UDP flow: what the
    // endpoint saw of each (its source address and port, the SNAT) must not change.
    let mut tcp: Vec<(TcpClient, Seen)> = Vec::new();
    for _ in 0..3 {
        let mut c = TcpClient::connect(&t.pod.name, None, "10.96.0.10", 80, Duration::from_secs(3))
            .unwrap();
        let seen = c.exchange("before").unwrap();
        tcp.push((c, seen));
    }
    let mut np = TcpClient::connect(
        &t.ext.name,
        Some(CLIENT),
        NODE,
        30080,
        Duration::from_secs(3),
    )
    .unwrap();
    let seen = np.exchange("before").unwrap();
    tcp.push((np, seen));
    let udp = in_netns(&t.pod.name, || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect("10.96.0.10:53").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock
    });
    let udp_exchange = || {
        let mut buf = [0u8; 512];
        udp.send(b"hello").unwrap();
        let n = udp.recv(&mut buf).expect("a UDP answer");
        parse_seen(&String::from_utf8_lossy(&buf[..n]))
    };
    let udp_before = udp_exchange();
    // A connection that closed under the previous release: its port's hold comes over too.
    assert_eq!(pod_to_cluster_ip(&t), ip(EP1));
    old.kill();

    // An upgrade that stops half-way: this start fails (its metrics address is not the node's)
    // after moving the previous tables aside, before its programs replace the previous ones.
    let mut failed = Agent::launch(
        &t,
        &[&args[..], &["--metrics-address", "192.0.2.99:9464"]].concat(),
        "failed.log",
    );
    let status = failed.wait_exit(Duration::from_secs(30)).expect("it fails");
    assert!(!status.success());
    let log = failed.log_text();
    assert!(log.contains("upgrading the maps pinned"), "{log}");
    assert!(log.contains("(ABI 2)"), "{log}");
    assert!(t.pin_dir().join("previous-CT").exists(), "{log}");
    let (first, before) = &mut tcp[0];
    assert_eq!(
        first.exchange("half-way").unwrap().peer_port,
        before.peer_port,
        "the previous programs still forward with the previous tables"
    );

    // Changing the flow tables again now would lose those flows: refused, saying what to do.
    let mut again = Agent::launch(
        &t,
        &[&args[..], &["--ct-max", "131072"]].concat(),
        "again.log",
    );
    let status = again
        .wait_exit(Duration::from_secs(30))
        .expect("it refuses");
    assert!(!status.success());
    let log = again.log_text();
    assert!(log.contains("stopped before copying them"), "{log}");
    assert!(t.pin_dir().join("previous-CT").exists(), "{log}");

    let new = t.start_agent(&args);
    let log = new.log_text();
    assert!(
        log.contains("an upgrade from ABI 2 stopped before its flows were copied"),
        "{log}"
    );
    let carried: usize = log
        .lines()
        .find_map(|l| {
            let rest = l.split("upgrade from ABI 2: ").nth(1)?;
            rest.split(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no count of flows carried over:\n{log}"));
    assert!(carried >= 5, "{carried} flows carried over:\n{log}");
    eprintln!(
        "{}",
        log.lines()
            .find(|l| l.contains("upgrade from ABI 2: "))
            .unwrap_or_default()
    );
    for (i, (client, before)) in tcp.iter_mut().enumerate() {
        let after = client.exchange("after the upgrade").unwrap();
        assert_eq!(
            (after.endpoint, after.peer_ip, after.peer_port),
            (before.endpoint, before.peer_ip, before.peer_port),
            "TCP connection {i}: the same endpoint saw the same source"
        );
    }
    let udp_after = udp_exchange();
    assert_eq!(
        (udp_after.peer_ip, udp_after.peer_port),
        (udp_before.peer_ip, udp_before.peer_port),
        "the UDP flow kept its SNAT port"
    );
    let dir = t.pin_dir();
    assert_eq!(
        pinned_value_size(&dir, proxy_common::MAP_CT) as usize,
        std::mem::size_of::<proxy_common::CtValue>()
    );
    assert!(dir.join(proxy_common::MAP_CT_NEW).exists());
    assert!(
        !dir.join("previous-CT").exists() && !dir.join("previous-REVNAT").exists(),
        "the previous tables' pins were let go"
    );
    assert_eq!(pod_to_cluster_ip(&t), ip(EP1), "new connections too");

    // A smaller --ct-max: the same version's tables, resized, with the flows copied over.
    new.kill();
    let resized = t.start_agent(&[&args[..], &["--ct-max", "65536"]].concat());
    let log = resized.log_text();
    assert!(log.contains("upgrading the maps pinned"), "{log}");
    assert!(
        log.contains("CT holds 262144 entries, configured for 65536"),
        "{log}"
    );
    for (i, (client, before)) in tcp.iter_mut().enumerate() {
        assert_eq!(
            client.exchange("after the resize").unwrap().peer_port,
            before.peer_port,
            "TCP connection {i} after the resize"
        );
    }
    drop(resized);
    cleanup_pins(&t);
}

#[test]
fn a_restarted_agent_keeps_established_connections() {
    let t = Topology::new("restart");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP2, 8080)]);
    t.write_manifest("svc.yaml", &service_yaml("sticky", "", &ready(EP1)));
    // The pod's packets go through the pod program, whose link is pinned too.
    let agent = t.start_agent(&["--keep-on-exit", "--pod-ifaces", "pod0"]);
    let mut long =
        TcpClient::connect(&t.pod.name, None, "10.96.0.10", 80, Duration::from_secs(3)).unwrap();
    assert_eq!(long.exchange("before").unwrap().endpoint, ip(EP1));

    // Killed hard: no cleanup runs. The pinned programs and maps keep forwarding.
    agent.kill();
    assert_eq!(long.exchange("while down").unwrap().endpoint, ip(EP1));
    // An endpoint added while no agent runs.
    t.write_manifest(
        "svc.yaml",
        &service_yaml("sticky", "", &(ready(EP1) + &ready(EP2))),
    );

    let agent = t.start_agent(&["--keep-on-exit", "--pod-ifaces", "pod0"]);
    let log = agent.log_text();
    assert!(log.contains("adopting the maps pinned"), "{log}");
    assert_eq!(
        pod_links(&t),
        ["tc-pod-pod0"],
        "the old pod link was replaced"
    );
    assert!(log.contains("took over the programs"), "{log}");
    assert_eq!(
        long.exchange("after").unwrap().endpoint,
        ip(EP1),
        "the connection survived"
    );
    let seen: std::collections::HashSet<_> = (0..24).map(|_| pod_to_cluster_ip(&t)).collect();
    assert!(
        seen.contains(&ip(EP2)),
        "the endpoint added while down is used"
    );
    let state_dir = agent.state_dir().to_owned();
    drop(agent);
    // --keep-on-exit left everything in place; cleanup removes it, an empty state folder too.
    assert!(t.pin_dir().join("CT").exists());
    assert!(state_dir.join("state.json").exists());
    let out = std::process::Command::new(extproxy_bin())
        .args(["cleanup", "--pin-dir"])
        .arg(t.pin_dir())
        .arg("--state-dir")
        .arg(&state_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!t.pin_dir().join("CT").exists());
    assert!(!state_dir.exists(), "cleanup left the state folder");
}

/// Two agents on one pin folder: the second adopted the maps and swapped the programs under the
/// first without a word, and whichever exited last left links of a dead agent attached.
#[test]
fn a_second_agent_waits_for_the_first_and_says_who_it_is() {
    let t = Topology::new("lock");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080)]);
    t.write_manifest("svc.yaml", &service_yaml("web", "", &ready(EP1)));
    let first = t.start_agent(&["--keep-on-exit"]);
    let holder = format!("pid {} on ", first.pid());

    // Started by hand beside it: told who holds the node's data path, and refused.
    let mut second = Agent::launch(&t, &["--lock-wait", "1"], "second.log");
    let status = second
        .wait_exit(Duration::from_secs(20))
        .expect("the second agent runs beside the first");
    assert!(!status.success());
    let log = second.log_text();
    for part in [
        holder.as_str(),
        "waiting up to 1 s",
        "stop the other one first",
    ] {
        assert!(log.contains(part), "{part:?} not in: {log}");
    }
    assert!(!log.contains("adopting"), "{log}");

    // A rolling update's successor: waits while its predecessor exits, then takes over.
    let successor = Agent::launch(&t, &["--lock-wait", "60"], "successor.log");
    successor.wait_for_log(&holder, Duration::from_secs(10));
    let mut long =
        TcpClient::connect(&t.pod.name, None, "10.96.0.10", 80, Duration::from_secs(3)).unwrap();
    assert_eq!(long.exchange("before").unwrap().endpoint, ip(EP1));
    assert!(!successor.log_text().contains("adopting"));
    first.stop();
    successor.wait_for_log("extproxy is running", Duration::from_secs(20));
    assert!(successor.log_text().contains("adopting the maps pinned"));
    assert_eq!(
        long.exchange("after").unwrap().endpoint,
        ip(EP1),
        "the connection survived the handover"
    );

    // Stopped without --keep-on-exit: nothing left behind, not even an empty state folder.
    let state_dir = successor.state_dir().to_owned();
    successor.stop();
    assert!(!t.pin_dir().exists());
    assert!(!state_dir.exists(), "an empty state folder was left");
}

/// `ip netns exec NS extproxy run` in the way of the issue: the process gets a mount namespace
/// of its own with a fresh /sys, the agent mounted a bpffs there and pinned into it, and the
/// pins went with it: the next agent started from empty maps (the issue lost 100 of 100 pod
/// flows at the restart), and `inspect` and `cleanup` run the same way found nothing without
/// saying why.
#[test]
fn pins_that_would_die_with_the_agent_are_refused_and_explained() {
    use std::ffi::OsStr;
    let t = Topology::new("privfs");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080)]);
    t.write_manifest("svc.yaml", &service_yaml("web", "", &ready(EP1)));
    let (pin_dir, state_dir, manifests) = (t.pin_dir(), t.dir.join("state"), t.manifests());
    let in_ip_netns_exec = |command: &str, args: &[&OsStr]| {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &t.node.name])
            .arg(extproxy_bin())
            .arg(command)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(args)
            .env("NO_COLOR", "1");
        output_within(cmd, Duration::from_secs(20))
    };
    let refused = |out: std::process::Output| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "it ran: {err}");
        err
    };

    let err = refused(in_ip_netns_exec(
        "run",
        &[
            "--iface".as_ref(),
            "up0".as_ref(),
            "--manifests".as_ref(),
            manifests.as_os_str(),
            "--keep-on-exit".as_ref(),
        ],
    ));
    for part in [
        "would not outlive this process",
        "is not the host's",
        "nsenter --net",
    ] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
    // Kubernetes mode keeps its pins by default: refused alike, before it reads a kubeconfig.
    let err = refused(in_ip_netns_exec(
        "run",
        &[
            "--iface".as_ref(),
            "up0".as_ref(),
            "--kubeconfig".as_ref(),
            "/nonexistent".as_ref(),
            "--node-name".as_ref(),
            "n1".as_ref(),
        ],
    ));
    assert!(err.contains("--detach-on-exit"), "{err}");

    // An agent in the host's mount namespace (the tests start it with nsenter --net) serves and
    // leaves its pins; inspect and cleanup run through `ip netns exec` do not see them, and say why.
    let agent = t.start_agent(&["--keep-on-exit"]);
    assert_snat(&tcp_once(&t.pod.name, None, "10.96.0.10", 80).unwrap(), EP1);
    let err = refused(in_ip_netns_exec("inspect", &[]));
    assert!(
        err.contains("is not on a bpffs in this mount namespace") && err.contains("nsenter"),
        "{err}"
    );
    agent.stop();
    let out = in_ip_netns_exec("cleanup", &[]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("nothing pinned") && said.contains("ip netns exec"),
        "{said}"
    );
    assert!(pin_dir.join("CT").exists(), "the host's pins are untouched");
}

#[test]
fn the_seed_articles_manifests_unchanged() {
    let t = Topology::new("seeds");
    let _servers = EchoServers::start(&t.ext.name, &[("10.240.0.129", 80)]);
    let seeds =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy-user/tests/fixtures/seeds");
    for f in [
        "000-proxy-service.yaml",
        "000-endpointslice.yaml",
        "001-myapp-proxy.yaml",
    ] {
        std::fs::copy(seeds.join(f), t.manifests().join(f)).unwrap();
    }
    let agent = t.start_agent(&[]);
    let log = agent.log_text();
    // Article 000 names its Service port "http" but not the endpoint port: kube-proxy gives it no
    // endpoints, and so does extproxy, saying why and how to fix it.
    assert!(
        log.contains("port \"http\" matches no endpoint port"),
        "{log}"
    );
    // Article 001's Endpoints has an invalid address, and its Ingress is not valid YAML: both
    // named with file and line, and the rest of the file still loads.
    assert!(
        log.contains("subsets[0].addresses[0].ip: \"2.3.4.5k\" is not an IP address"),
        "{log}"
    );
    assert!(
        log.contains("001-myapp-proxy.yaml:34: invalid YAML"),
        "{log}"
    );
    assert!(log.contains("serving Service default/myapp-proxy"), "{log}");
    // Everything else is served: proxy-service's ClusterIP refuses rather than hangs.
    let summary = log
        .lines()
        .find(|l| l.contains("serving") && l.contains("proxy-test/proxy-service"))
        .expect(&log);
    let cip = summary
        .split("ClusterIP ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    let err = TcpClient::connect(&t.pod.name, None, &cip, 80, Duration::from_secs(3))
        .err()
        .expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    // The fix the message suggests: name the endpoint port. Now the external service answers.
    let fixed = std::fs::read_to_string(seeds.join("000-endpointslice.yaml"))
        .unwrap()
        .replace("  - port: 80", "  - port: 80\n    name: http");
    t.write_manifest("000-endpointslice.yaml", &fixed);
    agent.wait_for_log("resolved:", SETTLE);
    let seen = tcp_once(&t.pod.name, None, &cip, 80).unwrap();
    assert_eq!(
        (seen.peer_ip, seen.endpoint),
        (ip(NODE), ip("10.240.0.129"))
    );
}

/// kube-proxy's nftables mode, as it sets up every node: new connections to ClusterIPs it does not
/// serve are dropped in the forward and output hooks.
const KUBE_PROXY_NFT: &str = "table ip kube-proxy {
  set cluster-ips { type ipv4_addr; elements = { 10.96.0.1 }; }
  chain cluster-ips-check { ip daddr @cluster-ips reject; ip daddr { 10.96.0.0/16 } drop; }
  chain filter-forward { type filter hook forward priority filter; policy accept; ct state new jump cluster-ips-check; }
  chain filter-output { type filter hook output priority filter; policy accept; ct state new jump cluster-ips-check; }
}";

fn pod_links(t: &Topology) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(t.pin_dir().join("links"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("tc-pod"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A pod's flow leaves through the pod program, past the node's forwarding and netfilter; its
/// replies come back the same way, straight to the pod's interface. Through the kernel instead,
/// netfilter saw only the replies: a CNI's policy judges those as new connections to the pod.
#[test]
fn a_pod_flows_replies_go_straight_back_to_the_pod() {
    let t = Topology::new("podreply");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP1, 5353)]);
    t.write_manifest("svc.yaml", &service_yaml("web", "", &ready(EP1)));
    // The node knows the pod's address, as once it sent the pod anything (or as Calico sets
    // it): a reply to a pod it never heard from goes to the kernel, which resolves it.
    let mac = t.pod.sh("cat /sys/class/net/eth0/address");
    t.node.sh(&format!(
        "ip neigh replace 10.244.0.5 lladdr {} dev pod0 nud permanent",
        mac.trim()
    ));
    t.node.sh("nft add table inet seen
         nft add chain inet seen pods '{ type filter hook forward priority 0; }'
         nft add rule inet seen pods ip daddr 10.244.0.5 counter
         nft add rule inet seen pods ip saddr 10.244.0.5 counter");
    let forwarded = |t: &Topology| -> Vec<u64> {
        let rules = t.node.sh("nft list chain inet seen pods");
        rules
            .split("packets ")
            .skip(1)
            .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
            .collect()
    };

    // Without the pod program the kernel forwards both ways: the counters count.
    let agent = t.start_agent(&["--pod-ifaces", "none"]);
    assert_snat(&tcp_once(&t.pod.name, None, "10.96.0.10", 80).unwrap(), EP1);
    let through_kernel = forwarded(&t);
    assert!(
        through_kernel.len() == 2 && through_kernel.iter().all(|n| *n > 0),
        "{through_kernel:?}"
    );
    drop(agent);

    let agent = t.start_agent(&["--pod-ifaces", "pod0"]);
    for _ in 0..5 {
        assert_snat(&tcp_once(&t.pod.name, None, "10.96.0.10", 80).unwrap(), EP1);
    }
    assert_snat(&udp_once(&t.pod.name, None, "10.96.0.10", 53).unwrap(), EP1);
    assert_eq!(
        forwarded(&t),
        through_kernel,
        "no packet of the pod's flows passed the node's forwarding, in either direction"
    );
    // The pod program's packets leave through the uplink, whose egress program must not parse
    // and look them up again: at least a SYN, an ACK with the request and a FIN for each of the
    // five connections, and the datagram.
    let (connections, datagrams) = (5, 1);
    let skipped = agent.counter("egress_already_translated");
    assert!(
        skipped >= connections * 3 + datagrams,
        "the uplink's egress program let {skipped} translated packets go at once"
    );
    drop(agent);
}

#[test]
fn pods_reach_services_beside_kube_proxy_in_nftables_mode() {
    let t = Topology::new("nftpod");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080), (EP1, 5353)]);
    t.write_manifest("svc.yaml", &service_yaml("beside", "", &ready(EP1)));
    let rules = t.dir.join("kube-proxy.nft");
    std::fs::write(&rules, KUBE_PROXY_NFT).unwrap();
    t.node.sh(&format!("nft -f {}", rules.display()));

    // Translating only on the uplink is too late: the forward hook drops the pod's packets first.
    let agent = t.start_agent(&["--pod-ifaces", "none"]);
    let err = TcpClient::connect(&t.pod.name, None, "10.96.0.10", 80, Duration::from_secs(2))
        .err()
        .expect("kube-proxy's rules drop it");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    drop(agent);

    let agent = t.start_agent(&["--pod-ifaces", "pod*"]);
    assert!(
        agent
            .log_text()
            .contains("pod interfaces (pod*): attached to 1 (pod0)"),
        "{}",
        agent.log_text()
    );
    assert_eq!(pod_links(&t), ["tc-pod-pod0"]);
    assert_snat(&tcp_once(&t.pod.name, None, "10.96.0.10", 80).unwrap(), EP1);
    assert_snat(&udp_once(&t.pod.name, None, "10.96.0.10", 53).unwrap(), EP1);
    // Outside clients still come in through the uplink programs.
    assert_snat(
        &tcp_once(&t.ext.name, Some(CLIENT), NODE, 30080).unwrap(),
        EP1,
    );

    // The pod is recreated: a new interface under the same name (and a new index), as Calico's
    // name-derived veths do. The agent follows without a restart.
    t.node.sh("ip link del pod0");
    agent.wait_for_log("pod interface pod0 went away: detached", SETTLE);
    assert!(pod_links(&t).is_empty(), "the dead link's pin is removed");
    sh(&format!(
        "ip link add pod0 netns {} type veth peer name eth0 netns {}",
        t.node.name, t.pod.name
    ));
    t.node.sh(
        "ip link set pod0 up; ip addr add 10.244.0.1/24 dev pod0; ethtool -K pod0 tx off >/dev/null",
    );
    t.pod.sh(
        "ip link set eth0 up; ip addr add 10.244.0.5/24 dev eth0; ip route add default via 10.244.0.1
         ethtool -K eth0 tx off >/dev/null",
    );
    agent.wait_for_log("pod interface pod0 appeared: attached", SETTLE);
    assert_eq!(pod_links(&t), ["tc-pod-pod0"]);
    assert_snat(&tcp_once(&t.pod.name, None, "10.96.0.10", 80).unwrap(), EP1);

    let log = agent.stop();
    assert!(log.contains("detached and cleaned up"), "{log}");
    assert!(pod_links(&t).is_empty());
}

/// 200 pods behind the node's one egress address call one endpoint that closes first, at 1,000
/// new connections a second, through a range of 2,000 SNAT ports: every port is reused within
/// seconds. The endpoint's kernel keeps each closed connection in TIME_WAIT for 60 s and refuses
/// about half of the SYNs that reuse its {address, port} from another client (their timestamps
/// are not newer): a connection refused so stalls for a second until the client resends its SYN.
/// None may fail or stall: a port goes back to the client that closed it, or waits out the
/// TIME_WAIT.
#[test]
fn many_clients_behind_one_egress_address_never_meet_the_endpoints_time_wait() {
    let t = Topology::new("manycli");
    let clients: Vec<std::net::IpAddr> = (1..=200)
        .map(|i| format!("10.244.1.{i}").parse().unwrap())
        .collect();
    let mut cmds = String::new();
    for c in &clients {
        cmds.push_str(&format!("ip addr add {c}/32 dev eth0\n"));
    }
    t.pod.sh(&cmds);
    t.node.sh("ip route add 10.244.1.0/24 dev pod0");
    let server = testbed::load::LoadServer::start(&t.ext.name, 8080, &[], 1).expect("load server");
    t.write_manifest("svc.yaml", &service_yaml("web", "", &ready(EP1)));
    let agent = t.start_agent(&["--snat-ports", "61000-62999", "--xdp", "off"]);
    let opts = testbed::load::ConnectOpts {
        workers: 32,
        threads: 2,
        sources: clients.clone(),
        rate: Some(1000.0),
    };
    let target: std::net::SocketAddr = "10.96.0.10:80".parse().unwrap();
    let stats = testbed::load::connections(&t.pod.name, &[target], &opts, Duration::from_secs(8))
        .expect("load");
    let stalled = stats.slower_than(Duration::from_millis(900));
    eprintln!(
        "{} connections, {} failed, {stalled} stalled, p50 {:?} us, p99 {:?} us; agent: {}",
        stats.ops,
        stats.errors,
        stats.latency_us(0.5),
        stats.latency_us(0.99),
        agent.inspect()["events"]
    );
    assert!(
        stats.ops > 6_000,
        "offered 1,000/s for 8 s, completed {}",
        stats.ops
    );
    assert_eq!(stats.errors, 0, "failed connections");
    assert_eq!(
        stats.slower_than(Duration::from_millis(900)),
        0,
        "connections that waited for a resent SYN"
    );
    // Every port was used several times, and only ever by the node's address.
    assert!(stats.ops > 3 * 2_000);
    let tally = server.tcp_tally();
    assert!(
        tally.by_source.keys().all(|peer| *peer == ip(NODE)),
        "{tally:?}"
    );
    assert_eq!(agent.counter("snat_ports_exhausted"), 0);
    assert!(agent.counter("snat_closed_port_reused") > 0);
    agent.stop();
}

/// Clients without TCP timestamps (Windows' default) cannot take a port the endpoint may still
/// hold in TIME_WAIT: with 100 ports and the endpoint closing first, the 101st connection within
/// a minute has no port. It is refused at once (a RST, no SYN left to time out), counted, and
/// logged naming the Service, the endpoint and the egress address.
#[test]
fn exhausted_snat_ports_refuse_at_once_and_say_where() {
    let t = Topology::new("exhaust");
    t.pod.sh("sysctl -qw net.ipv4.tcp_timestamps=0");
    let _server = testbed::load::LoadServer::start(&t.ext.name, 8080, &[], 1).expect("load server");
    t.write_manifest("svc.yaml", &service_yaml("web", "", &ready(EP1)));
    let agent = t.start_agent(&["--snat-ports", "61000-61099", "--xdp", "off"]);
    assert!(
        agent
            .log_text()
            .contains("sustain about 10 new connections/s"),
        "the start-up warning about a small range: {}",
        agent.log_text()
    );
    let opts = testbed::load::ConnectOpts {
        workers: 8,
        threads: 1,
        sources: Vec::new(),
        rate: Some(200.0),
    };
    let target: std::net::SocketAddr = "10.96.0.10:80".parse().unwrap();
    let stats = testbed::load::connections(&t.pod.name, &[target], &opts, Duration::from_secs(3))
        .expect("load");
    eprintln!("{} completed, {} refused", stats.ops, stats.errors);
    assert!(
        stats.ops >= 100 && stats.ops < 200,
        "completed {}",
        stats.ops
    );
    assert!(stats.errors > 300, "refused {}", stats.errors);
    // Refused at once: the paced attempts all ended, none waited for a resent SYN.
    assert!(stats.ops + stats.errors > 500);
    assert_eq!(stats.slower_than(Duration::from_millis(900)), 0);
    assert!(agent.counter("snat_ports_exhausted") >= stats.errors);
    agent.wait_for_log("are refused", Duration::from_secs(5));
    let log = agent.log_text();
    let line = log.lines().find(|l| l.contains("are refused")).unwrap();
    for part in ["demo/web", "203.0.113.7:8080", "10.0.0.1", "--snat-ports"] {
        assert!(line.contains(part), "{line}");
    }
    agent.stop();
}

/// The TCP `InCsumErrors` counter of a namespace's kernel.
fn tcp_csum_errors(ns: &testbed::netns::NamedNetns) -> u64 {
    let snmp = ns.sh("cat /proc/net/snmp");
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// As from a pod on a real NIC: the pod hands the node 64 KB segments (GSO/TSO) whose checksum
/// is left for the hardware (CHECKSUM_PARTIAL). The node translates them at TC egress; its uplink
/// then has no offloads, so the kernel segments and checksums them in software after the
/// translation, and the endpoint's kernel checks every checksum. Any error in how the
/// translation adjusted the partial checksum (its pseudo-header part) shows as InCsumErrors and
/// as a transfer that stalls.
#[test]
fn offloaded_segments_are_translated_with_their_checksums_right() {
    let t = Topology::new("gso");
    // Offloads back on between the pod and the node (testbed turns them off everywhere).
    t.pod.sh("ethtool -K eth0 tx on tso on gso on >/dev/null");
    t.node
        .sh("ethtool -K pod0 tx on tso on gso on gro on >/dev/null");
    let server = testbed::load::LoadServer::start(&t.ext.name, 8080, &[], 1).expect("load server");
    t.write_manifest("svc.yaml", &service_yaml("web", "", &ready(EP1)));
    let agent = t.start_agent(&["--xdp", "off"]);
    let errors_before = tcp_csum_errors(&t.ext);
    let target: std::net::SocketAddr = "10.96.0.10:80".parse().unwrap();
    let (bytes, elapsed) =
        testbed::load::tcp_stream(&t.pod.name, target, Duration::from_secs(2)).expect("stream");
    eprintln!(
        "{} MB in {:.1} s ({:.2} Gbit/s)",
        bytes >> 20,
        elapsed.as_secs_f64(),
        bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
    );
    assert!(bytes > 50 << 20, "{bytes} bytes");
    assert_eq!(
        tcp_csum_errors(&t.ext) - errors_before,
        0,
        "checksum errors at the endpoint"
    );
    let tally = server.tcp_tally();
    assert!(
        tally.by_source.keys().all(|peer| *peer == ip(NODE)),
        "{tally:?}"
    );
    // The segments really were large on their way through the translation.
    let stats = agent.inspect();
    let svc = stats["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"].as_str().unwrap().contains(":http/"))
        .unwrap();
    let (pkts, fwd_bytes) = (
        svc["fwd_packets"].as_u64().unwrap(),
        svc["fwd_bytes"].as_u64().unwrap(),
    );
    assert!(
        fwd_bytes / pkts.max(1) > 3000,
        "{fwd_bytes} bytes in {pkts} packets: no segmentation offload reached the node"
    );
    agent.stop();
}
