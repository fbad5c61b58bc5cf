//! SNAT address pools in network namespaces: several egress addresses per family, from
//! `--egress-ip` and from the `extproxy.io/egress-ip` annotation, seen by the far side once one
//! address's SNAT ports to an endpoint are all in use. Needs root; each test builds and deletes
//! its own namespaces.

use extproxy_tests::ip;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use extproxy_tests::agent::*;

/// The node's second egress address. The outside network routes 192.0.2.0/24 to the node
/// (testbed::topo), so the endpoint's replies to it come back through the uplink, where the
/// data path translates them before the node's stack would look for the address.
const POOL_2: &str = "192.0.2.71";
/// The annotated Service's pool, routed back the same way.
const ANNOTATED: [&str; 2] = ["192.0.2.72", "192.0.2.73"];

/// A selector-less TCP Service `name` at `cluster_ip`:80 with endpoint EP1:8080.
fn service_yaml(name: &str, cluster_ip: &str, annotations: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: demo
  annotations: {{{annotations}}}
spec:
  clusterIP: {cluster_ip}
  ports:
    - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
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
endpoints:
  - addresses: ["{EP1}"]
"#
    )
}

/// Opens `n` connections from the pod to `cluster_ip`:80 and keeps them open; each with the
/// source the endpoint saw.
fn hold(t: &Topology, cluster_ip: &str, n: usize) -> (Vec<TcpClient>, Vec<(IpAddr, u16)>) {
    let mut clients = Vec::new();
    let mut seen = Vec::new();
    for i in 0..n {
        let mut c = TcpClient::connect(&t.pod.name, None, cluster_ip, 80, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connection {i} to {cluster_ip}: {e}"));
        let s = c.exchange("hello").unwrap();
        assert_eq!(s.endpoint, ip(EP1));
        seen.push((s.peer_ip, s.peer_port));
        clients.push(c);
    }
    (clients, seen)
}

fn by_address(seen: &[(IpAddr, u16)]) -> BTreeMap<IpAddr, BTreeSet<u16>> {
    let mut out: BTreeMap<IpAddr, BTreeSet<u16>> = BTreeMap::new();
    for (a, p) in seen {
        out.entry(*a).or_default().insert(*p);
    }
    out
}

/// With 4 SNAT ports and the pool `--egress-ip 10.0.0.1,192.0.2.71`, 8 connections to one
/// endpoint are open at once: the endpoint sees both addresses, each on all 4 ports; the 9th is
/// refused at once (RST), counted and logged naming the pool. A Service annotated with its own
/// pool leaves from that pool's addresses only. `extproxy inspect` shows both pools, and the
/// start-up figures count the node's pool.
#[test]
fn a_pool_carries_more_connections_per_endpoint_than_one_address() {
    let t = Topology::new("pool");
    let _servers = EchoServers::start(&t.ext.name, &[(EP1, 8080)]);
    let annotation = format!("extproxy.io/egress-ip: '{}'", ANNOTATED.join(", "));
    t.write_manifest(
        "svc.yaml",
        &[
            service_yaml("web", "10.96.0.10", ""),
            service_yaml("partner", "10.96.0.11", &annotation),
        ]
        .join("---\n"),
    );
    let pool = format!("{NODE},{POOL_2}");
    let agent = t.start_agent(&[
        "--snat-ports",
        "61000-61003",
        "--egress-ip",
        &pool,
        "--xdp",
        "off",
    ]);
    let log = agent.log_text();
    assert!(
        log.contains("4 port(s) x 2 egress addresses and endpoint"),
        "the start-up figures count the pool: {log}"
    );

    let (_web, seen) = hold(&t, "10.96.0.10", 8);
    let web = by_address(&seen);
    eprintln!("web: the endpoint saw {web:?}");
    let ports: BTreeSet<u16> = (61_000..=61_003).collect();
    assert_eq!(
        web,
        [(ip(NODE), ports.clone()), (ip(POOL_2), ports.clone())]
            .into_iter()
            .collect(),
        "8 connections over 4 ports x 2 addresses"
    );
    let ninth = TcpClient::connect(&t.pod.name, None, "10.96.0.10", 80, Duration::from_secs(3));
    match ninth {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("a 9th connection got a pair, but all 8 are in use"),
    }
    assert!(agent.counter("snat_ports_exhausted") >= 1);
    agent.wait_for_log("are refused", Duration::from_secs(5));
    let log = agent.log_text();
    let line = log.lines().find(|l| l.contains("are refused")).unwrap();
    for part in [
        "demo/web",
        "203.0.113.7:8080",
        "from egress pool 10.0.0.1 and 1 other address(es)",
    ] {
        assert!(line.contains(part), "{line}");
    }

    // The annotated Service's own pool: its pairs to the same endpoint are its own addresses'.
    let (_partner, seen) = hold(&t, "10.96.0.11", 6);
    let partner = by_address(&seen);
    eprintln!("partner: the endpoint saw {partner:?}");
    assert_eq!(
        partner.keys().copied().collect::<Vec<_>>(),
        ANNOTATED.iter().map(|a| ip(a)).collect::<Vec<_>>(),
        "6 connections need both annotated addresses, and only those"
    );
    assert_eq!(partner.values().map(BTreeSet::len).sum::<usize>(), 6);

    let report = agent.inspect();
    let pools: BTreeSet<String> = report["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["egress_pool"].to_string())
        .collect();
    assert_eq!(
        pools,
        [
            format!("[\"{NODE}\",\"{POOL_2}\"]"),
            format!("[\"{}\",\"{}\"]", ANNOTATED[0], ANNOTATED[1]),
        ]
        .into_iter()
        .collect(),
        "{report}"
    );
    let text = agent.inspect_text();
    assert!(text.contains(&format!("{NODE},{POOL_2}")), "{text}");
    agent.stop();
}

/// Egress addresses that cannot be one are refused before anything is loaded, each named.
#[test]
fn bad_egress_addresses_are_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("xp-pool-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(extproxy_bin())
        .args(["run", "--manifests"])
        .arg(&dir)
        .args([
            "--iface",
            "lo",
            "--egress-ip",
            "192.0.2.1,192.0.2.1",
            "--egress-ip",
            "224.0.0.1",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}{stderr}");
    let text = format!("{stdout}{stderr}");
    for part in [
        "--egress-ip",
        "192.0.2.1 is listed twice",
        "224.0.0.1 is a multicast address, which cannot be an egress address",
    ] {
        assert!(text.contains(part), "{text}");
    }
}
