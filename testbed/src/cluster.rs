//! A cluster of three nodes and an outside host on one L2 segment, for cluster egress: one
//! address that a single gateway node owns at a time, the other nodes tunnelling their flows to
//! it.
//!
//! ```text
//!   {p}-pod 10.244.1.5 ── pod0 10.244.1.1 {p}-n1 up0 10.0.0.1 ─┐
//!                                         {p}-n2 up0 10.0.0.2 ─┤ br0 in {p}-lan
//!                                         {p}-n3 up0 10.0.0.3 ─┤
//!                                        {p}-ext ext0 10.0.0.254 ─┘
//!                                                lo: endpoints 203.0.113.7, 203.0.113.8
//! ```
//! The nodes route everything else (the endpoints, Service addresses) via the outside host,
//! which does not forward: a packet that leaks untranslated is dropped there, without an answer.
//! The outside host reaches the nodes' addresses, and a cluster egress address in 10.0.0.0/24,
//! by ARP on the segment: whoever answers for the address gets its replies.

use std::{path::PathBuf, sync::MutexGuard};

use crate::{
    netns::NamedNetns,
    require_root, sh,
    topo::{MachineLock, serial},
};

/// The nodes' uplink addresses, node1 first.
pub const NODE_IPS: [&str; 3] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
/// The nodes' subnet without the outside host: what `--tunnel-peer` allows.
pub const NODES_CIDR: &str = "10.0.0.0/29";
pub const OUTSIDE: &str = "10.0.0.254";
pub const POD: &str = "10.244.1.5";
pub const EP1: &str = "203.0.113.7";
pub const EP2: &str = "203.0.113.8";

pub struct Cluster {
    pub prefix: String,
    /// node1, node2, node3.
    pub nodes: Vec<NamedNetns>,
    /// A pod behind node1.
    pub pod: NamedNetns,
    pub ext: NamedNetns,
    /// The bridge joining the uplinks and the outside host.
    pub lan: NamedNetns,
    /// Per-test folder: one subfolder per node (state, log) and the shared manifests.
    pub dir: PathBuf,
    _machine: MachineLock,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Builds the cluster under namespace names `xp<name>-{n1,n2,n3,pod,ext,lan}`.
    pub fn new(name: &str) -> Self {
        require_root();
        let serial = serial();
        let machine = MachineLock::acquire();
        let prefix = format!("xp{name}");
        let lan = NamedNetns::new(&format!("{prefix}-lan"));
        let nodes: Vec<NamedNetns> = (1..=3)
            .map(|i| NamedNetns::new(&format!("{prefix}-n{i}")))
            .collect();
        let pod = NamedNetns::new(&format!("{prefix}-pod"));
        let ext = NamedNetns::new(&format!("{prefix}-ext"));
        let l = &lan.name;
        lan.sh("ip link set lo up; ip link add br0 type bridge; ip link set br0 up");
        for (i, node) in nodes.iter().enumerate() {
            let n = &node.name;
            sh(&format!(
                "ip link add up0 netns {n} type veth peer name p{i} netns {l}"
            ));
            lan.sh(&format!("ip link set p{i} master br0; ip link set p{i} up"));
            node.sh(&format!(
                "ip link set lo up; ip link set up0 up
                 ip addr add {}/24 dev up0
                 ip route add default via {OUTSIDE}
                 sysctl -qw net.ipv4.ip_forward=1
                 ethtool -K up0 tx off >/dev/null",
                NODE_IPS[i]
            ));
        }
        sh(&format!(
            "ip link add ext0 netns {} type veth peer name pe netns {l}",
            ext.name
        ));
        lan.sh("ip link set pe master br0; ip link set pe up");
        // Packets must carry complete checksums on the wire, as from a real NIC: with veth
        // checksum offload they carry only the pseudo-header part.
        for i in 0..3 {
            lan.sh(&format!("ethtool -K p{i} tx off >/dev/null"));
        }
        lan.sh("ethtool -K pe tx off >/dev/null");
        ext.sh(&format!(
            "ip link set lo up; ip link set ext0 up
             ip addr add {OUTSIDE}/24 dev ext0
             ip addr add {EP1}/32 dev lo; ip addr add {EP2}/32 dev lo
             sysctl -qw net.ipv4.ip_forward=0
             ethtool -K ext0 tx off >/dev/null"
        ));
        sh(&format!(
            "ip link add pod0 netns {} type veth peer name eth0 netns {}",
            nodes[0].name, pod.name
        ));
        nodes[0].sh("ip link set pod0 up; ip addr add 10.244.1.1/24 dev pod0
             ethtool -K pod0 tx off >/dev/null");
        pod.sh(&format!(
            "ip link set lo up; ip link set eth0 up
             ip addr add {POD}/24 dev eth0; ip route add default via 10.244.1.1
             ethtool -K eth0 tx off >/dev/null"
        ));
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        Cluster {
            prefix,
            nodes,
            pod,
            ext,
            lan,
            dir,
            _machine: machine,
            _serial: serial,
        }
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Writes (or replaces) a manifest file every node's agent reads.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.manifests().join(file)).unwrap();
    }

    /// The folder every node's pins go under (`node_pin_dir`).
    pub fn pin_root(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.prefix))
    }

    /// Where node `i`'s agent (0: node1) pins its maps.
    pub fn node_pin_dir(&self, i: usize) -> PathBuf {
        self.pin_root().join(format!("n{}", i + 1))
    }

    /// Node `i`'s folder: its agent's state folder and log.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        let d = self.dir.join(format!("n{}", i + 1));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Pins an agent left behind (killed, --keep-on-exit, a failed test): removing the last
        // reference detaches and frees them.
        let _ = std::fs::remove_dir_all(self.pin_root());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
