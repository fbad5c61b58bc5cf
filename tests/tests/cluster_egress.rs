//! Cluster egress end to end (root): three nodes and an outside host on one L2 segment, each node
//! running the real `extproxy` binary in manifest mode on the same Service, annotated with one
//! cluster egress address that node2 owns. A pod behind node1 and processes on the nodes call the
//! Service; the outside server says which source address it saw. Each test builds and deletes
//! its own namespaces, pins and agents.

use extproxy_tests::ip;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use extproxy_tests::agent::*;
use extproxy_tests::packet::{Ip, SYN, TCP, tcp_seg};
use testbed::cluster::{Cluster, EP1, EP2, NODE_IPS, NODES_CIDR, OUTSIDE, POD};

/// The cluster egress address: on the segment, so the outside host finds its owner by ARP.
const ADDR: &str = "10.0.0.100";
const CLUSTER_IP: &str = "10.96.0.10";
/// Generous: agents start, controllers write the maps and addresses within a second or two.
const SETTLE: Duration = Duration::from_secs(20);

/// A selector-less Service on the cluster egress address, with two endpoints on the outside host
/// (so the owner's Maglev choice matters), TCP 80 -> 8080 and UDP 53 -> 5353.
fn service_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: partner
  namespace: demo
  annotations:
    extproxy.io/cluster-egress-ip: "{ADDR}"
spec:
  type: NodePort
  clusterIP: {CLUSTER_IP}
  ports:
    - {{name: http, port: 80, protocol: TCP, nodePort: 30080}}
    - {{name: dns, port: 53, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: partner-1
  namespace: demo
  labels: {{kubernetes.io/service-name: partner}}
addressType: IPv4
ports:
  - {{name: http, port: 8080, protocol: TCP}}
  - {{name: dns, port: 5353, protocol: UDP}}
endpoints:
  - addresses: ["{EP1}"]
  - addresses: ["{EP2}"]
"#
    )
}

fn site(c: &Cluster, i: usize) -> AgentSite {
    let dir = c.node_dir(i);
    AgentSite {
        node_ns: c.nodes[i].name.clone(),
        iface: "up0".into(),
        pin_dir: c.node_pin_dir(i),
        state_dir: dir.join("state"),
        log: dir.join("agent.log"),
    }
}

/// Starts node `i`'s agent (0: node1) with `owner` (0-based) as the static owner of ADDR;
/// node2 and node3 may own it, every node of the nodes' subnet may tunnel to it.
fn start_node(c: &Cluster, i: usize, owner: usize, extra: &[&str]) -> Agent {
    let owner_flag = format!("{ADDR}={}", NODE_IPS[owner]);
    let mut args = vec![
        "--cluster-egress-ip",
        ADDR,
        "--cluster-egress-owner",
        &owner_flag,
        "--tunnel-peer",
        NODES_CIDR,
    ];
    if i != 0 {
        args.push("--egress-gateway");
    } else {
        // The pod program: pods that connect to an endpoint directly are seen there.
        args.extend_from_slice(&["--pod-ifaces", "pod0"]);
    }
    args.extend_from_slice(extra);
    Agent::start_at(&site(c, i), &c.manifests(), &args)
}

/// Polls `check` until it returns Ok (panics with `what` and the last error after SETTLE).
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if start.elapsed() > SETTLE => {
                panic!("{what}: not within {SETTLE:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The data path's view of ADDR on an agent's node: (owner's node address, served here).
fn egress_entry(agent: &Agent) -> Option<(Option<IpAddr>, bool)> {
    let report = agent.inspect();
    report["cluster_egress"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == ADDR)
        .map(|e| {
            (
                e["owner_address"].as_str().map(ip),
                e["local"].as_bool().unwrap(),
            )
        })
}

/// Waits until the agent's data path has ADDR owned by node `owner`, here or tunnelled.
fn wait_owner(agent: &Agent, owner: usize, local: bool) {
    let want = (Some(ip(NODE_IPS[owner])), local);
    wait_for(&format!("{} sees owner {owner}", agent.node_ns()), || {
        let got = egress_entry(agent);
        if got == Some(want) {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
}

/// Whether ADDR is on node `i`'s uplink.
fn on_uplink(c: &Cluster, i: usize) -> bool {
    c.nodes[i]
        .sh("ip -4 -o addr show dev up0")
        .contains(&format!(" {ADDR}/"))
}

fn wait_on_uplink(c: &Cluster, i: usize, want: bool) {
    wait_for(&format!("{ADDR} on node{}'s uplink: {want}", i + 1), || {
        if on_uplink(c, i) == want {
            Ok(())
        } else {
            Err(c.nodes[i].sh("ip -4 -o addr show dev up0"))
        }
    });
}

/// What the endpoint must see of a cluster egress flow: ADDR from an SNAT port, and one of the
/// Service's endpoints answering.
fn assert_cluster_egress(seen: &Seen, from: &str) {
    assert_eq!(
        seen.peer_ip,
        ip(ADDR),
        "{from}: the endpoint must see the cluster egress address, not a node's: {seen:?}"
    );
    assert!(
        (1024..=29_999).contains(&seen.peer_port) || (61_000..=65_535).contains(&seen.peer_port),
        "{from}: not an SNAT port: {seen:?}"
    );
    assert!(
        seen.endpoint == ip(EP1) || seen.endpoint == ip(EP2),
        "{from}: {seen:?}"
    );
}

fn event(agent: &Agent, name: &str) -> u64 {
    agent.inspect()["events"][name].as_u64().unwrap_or(0)
}

fn drop_count(agent: &Agent, name: &str) -> u64 {
    agent.inspect()["drops"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no drop counter {name}"))
}

/// The three agents with node2 as the owner, once every data path knows it and node2 has the
/// address on its uplink. The nodes in `keep` (0-based) start with --keep-on-exit.
fn start_cluster(c: &Cluster, keep: &[usize]) -> Vec<Agent> {
    c.write_manifest("svc.yaml", &service_yaml());
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let extra: &[&str] = if keep.contains(&i) {
                &["--keep-on-exit"]
            } else {
                &[]
            };
            start_node(c, i, 1, extra)
        })
        .collect();
    wait_owner(&agents[0], 1, false);
    wait_owner(&agents[1], 1, true);
    wait_owner(&agents[2], 1, false);
    wait_on_uplink(c, 1, true);
    agents
}

#[test]
fn pods_and_nodes_leave_from_the_cluster_address_through_its_owner() {
    let c = Cluster::new("ceflow");
    let _servers = EchoServers::start(
        &c.ext.name,
        &[(EP1, 8080), (EP1, 5353), (EP2, 8080), (EP2, 5353)],
    );
    let agents = start_cluster(&c, &[]);
    assert!(
        !on_uplink(&c, 0) && !on_uplink(&c, 2),
        "only the owner has the address"
    );

    // The pod behind node1 (not the owner): through the tunnel to node2 and back.
    assert_cluster_egress(
        &tcp_once(&c.pod.name, None, CLUSTER_IP, 80).unwrap(),
        "pod TCP",
    );
    assert_cluster_egress(
        &udp_once(&c.pod.name, None, CLUSTER_IP, 53).unwrap(),
        "pod UDP",
    );
    // A client outside the cluster on node1's NodePort: served by the owner, answered by node1.
    let seen = tcp_once(&c.ext.name, None, NODE_IPS[0], 30080).unwrap_or_else(|e| {
        panic!(
            "NodePort: {e}\nnode1 {:#}\nnode2 {:#}",
            agents[0].inspect()["events"],
            agents[1].inspect()["events"]
        )
    });
    assert_cluster_egress(&seen, "NodePort on node1 from outside");
    // Full-sized segments both ways: the SYN's and SYN-ACK's MSS leave room for the tunnel, so
    // nothing the endpoint sends needs fragmenting on the way back through it.
    let mut bulk =
        TcpClient::connect(&c.pod.name, None, CLUSTER_IP, 80, Duration::from_secs(5)).unwrap();
    let line = "x".repeat(256 << 10);
    assert_cluster_egress(&bulk.exchange(&line).unwrap(), "pod, 256 KiB each way");
    // The pod bypassing the cluster IP (as an Ingress controller connecting to the endpoints
    // does): the same way, from the same address.
    let direct = tcp_once(&c.pod.name, None, EP1, 8080).unwrap();
    assert_cluster_egress(&direct, "pod TCP straight to an endpoint");
    assert_eq!(direct.endpoint, ip(EP1), "the endpoint the pod chose");
    let direct = udp_once(&c.pod.name, None, EP2, 5353).unwrap();
    assert_cluster_egress(&direct, "pod UDP straight to an endpoint");
    assert_eq!(direct.endpoint, ip(EP2));
    // Processes on the owner itself (served there) and on the other gateway (tunnelled).
    assert_cluster_egress(
        &tcp_once(&c.nodes[1].name, None, CLUSTER_IP, 80).unwrap(),
        "node2 TCP",
    );
    assert_cluster_egress(
        &udp_once(&c.nodes[1].name, None, CLUSTER_IP, 53).unwrap(),
        "node2 UDP",
    );
    assert_cluster_egress(
        &tcp_once(&c.nodes[2].name, None, CLUSTER_IP, 80).unwrap(),
        "node3 TCP",
    );

    // The origins tunnelled and kept no state; the owner served the flows.
    let node1 = agents[0].inspect();
    assert!(
        node1["events"]["tunnel_sent"].as_u64().unwrap() >= 2,
        "{node1:#}"
    );
    assert!(
        node1["events"]["tunnel_received"].as_u64().unwrap() >= 2,
        "replies come back through the tunnel: {node1:#}"
    );
    assert_eq!(
        node1["conntrack"].as_array().unwrap().len(),
        0,
        "an origin keeps no flow state: {node1:#}"
    );
    let node2 = agents[1].inspect();
    assert!(
        node2["events"]["tunnel_received"].as_u64().unwrap() >= 3,
        "{node2:#}"
    );
    assert!(
        node2["events"]["tunnel_sent"].as_u64().unwrap() >= 3,
        "{node2:#}"
    );
    assert!(
        !node2["conntrack"].as_array().unwrap().is_empty(),
        "the owner tracks the flows: {node2:#}"
    );
    for agent in &agents {
        let drops = agent.inspect()["drops"].clone();
        let total: u64 = drops
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(total, 0, "{}: {drops:#}", agent.node_ns());
    }
    // What operators see.
    let text = agents[1].inspect_text();
    assert!(text.contains("CLUSTER EGRESS"), "{text}");
    let text = agents[0].inspect_text();
    assert!(text.contains("tunnelled"), "{text}");
}

#[test]
fn tunnelled_packets_from_strangers_are_dropped_and_counted() {
    let c = Cluster::new("cepeer");
    let _servers = EchoServers::start(&c.ext.name, &[(EP1, 8080), (EP2, 8080)]);
    let agents = start_cluster(&c, &[]);
    let owner = &agents[1];
    assert_cluster_egress(
        &tcp_once(&c.pod.name, None, CLUSTER_IP, 80).unwrap(),
        "before",
    );
    let received = event(owner, "tunnel_received");
    assert_eq!(drop_count(owner, "tunnel_unknown_peer"), 0);

    // The outside host (not in --tunnel-peer) sends what a node would: a pod's SYN to the
    // Service in the tunnel to the owner. Served, it would leave from the cluster address.
    const SENT: u64 = 3;
    let inner = Ip::new(POD, CLUSTER_IP, TCP).wrap(tcp_seg(40_000, 80, 1, 0, SYN, &[]), false);
    in_netns(&c.ext.name, || {
        let sock = std::net::UdpSocket::bind((ip(OUTSIDE), 0)).unwrap();
        for _ in 0..SENT {
            sock.send_to(&inner, (ip(NODE_IPS[1]), 6080)).unwrap();
        }
    });
    wait_for("tunnel_unknown_peer counted", || {
        match drop_count(owner, "tunnel_unknown_peer") {
            SENT => Ok(()),
            n => Err(format!("{n}")),
        }
    });
    assert_eq!(
        event(owner, "tunnel_received"),
        received,
        "nothing from the stranger was taken out of the tunnel"
    );

    // The nodes' tunnel still works.
    assert_cluster_egress(
        &tcp_once(&c.pod.name, None, CLUSTER_IP, 80).unwrap(),
        "after",
    );
    assert!(event(owner, "tunnel_received") > received);
}

#[test]
fn an_established_connection_survives_the_move_to_another_owner() {
    let c = Cluster::new("cemove");
    let _servers = EchoServers::start(&c.ext.name, &[(EP1, 8080), (EP2, 8080)]);
    // node1 and node3 restart below and adopt their maps, as in a rolling update; node2 goes
    // away with its data path (left in place, its flows could answer for the address while the
    // outside host still sent to node2's MAC, hiding a failed announcement).
    let mut agents = start_cluster(&c, &[0, 2]);
    let mut conn =
        TcpClient::connect(&c.pod.name, None, CLUSTER_IP, 80, Duration::from_secs(15)).unwrap();
    let before = conn.exchange("before").unwrap();
    assert_cluster_egress(&before, "before the move");

    // node2 goes away: its agent takes the address off its uplink.
    let node3 = agents.pop().unwrap();
    let node2 = agents.pop().unwrap();
    let node1 = agents.pop().unwrap();
    node2.stop();
    wait_on_uplink(&c, 1, false);
    // node3 becomes the owner, node1 learns it.
    node3.stop();
    let node3 = start_node(&c, 2, 2, &["--keep-on-exit"]);
    wait_owner(&node3, 2, true);
    wait_on_uplink(&c, 2, true);
    node1.stop();
    let node1 = start_node(&c, 0, 2, &["--keep-on-exit"]);
    wait_owner(&node1, 2, false);
    let midstream = event(&node3, "ct_miss_midstream");

    // The same connection: node3 rebuilds the translation from the client's next segment (the
    // same endpoint by Maglev, the same SNAT port by the first candidate).
    let after = conn.exchange("after").unwrap_or_else(|e| {
        panic!(
            "the connection did not survive the move: {e}\nnode1: {:#}\nnode3: {:#}",
            node1.inspect(),
            node3.inspect()
        )
    });
    assert_eq!(
        after, before,
        "the endpoint must see the same source address and port from the same endpoint"
    );
    assert!(event(&node3, "ct_miss_midstream") > midstream);
    assert_eq!(event(&node3, "snat_not_first_candidate"), 0);
    assert_eq!(conn.exchange("again").unwrap(), before);
    // The outside host sends to the new owner: node3's announcement replaced node2's MAC.
    let node3_mac = c.nodes[2].sh("cat /sys/class/net/up0/address");
    let neigh = c.ext.sh(&format!("ip neigh show {ADDR}"));
    assert!(
        neigh.contains(node3_mac.trim()),
        "{neigh} (node3: {node3_mac})"
    );
    // New connections go through node3 too.
    assert_cluster_egress(
        &tcp_once(&c.pod.name, None, CLUSTER_IP, 80).unwrap(),
        "a new connection after the move",
    );
}
