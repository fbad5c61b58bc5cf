//! The real control planes the Kubernetes contenders are programmed from: etcd and
//! kube-apiserver (extproxy-envtest) in a namespace of their own, linked to each run's fresh node
//! namespace by a veth.
//!
//! Two clusters, each with the same N Services: extproxy's are labelled
//! `service.kubernetes.io/service-proxy-name: extproxy` (kube-proxy skips those), kube-proxy's
//! are not. Separate API servers rather than two sets in one: extproxy lists every Service and
//! filters by the label itself, so one server holding both sets would make it read twice as
//! many objects as kube-proxy, which the API server filters for. Each cluster is filled once per
//! size (grown from the previous size), before any contender starts, and reused by every round;
//! between runs its API server idles.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use extproxy_envtest::{ApiConnection, ApiWrite, Binaries, ControlPlane, Options};
use serde_json::json;
use testbed::{netns::NamedNetns, topo::Topology};

use super::layout::{self, Layout, NAMESPACE, Shape};

/// The node's name in both clusters (kube-proxy's --hostname-override, extproxy's --node-name).
pub const NODE_NAME: &str = "bench-node";
/// The namespace both API servers run in.
const API_NETNS: &str = "xpbapi";
/// API servers' own addresses (on the namespace's loopback), one per cluster.
const EXTPROXY_API: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 1);
const KUBE_PROXY_API: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 2);
/// Writes in flight while filling a cluster.
const IN_FLIGHT: usize = 24;

/// Which set of Services a cluster holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Labelled for extproxy.
    Extproxy,
    /// Unlabelled: kube-proxy's.
    KubeProxy,
}

/// The namespace the API servers live in; deleted (with them) on drop.
pub struct ApiNetns {
    ns: NamedNetns,
}

impl ApiNetns {
    pub fn new() -> Result<Self> {
        let ns = NamedNetns::new(API_NETNS);
        ns.sh(&format!(
            "ip link set lo up; ip addr add {EXTPROXY_API}/32 dev lo; ip addr add {KUBE_PROXY_API}/32 dev lo"
        ));
        Ok(ApiNetns { ns })
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.ns.name))
    }

    /// A veth from the topology's node to the API servers (`api0` on the node, 10.255.0.2/30).
    /// It goes with the node's namespace.
    pub fn link(&self, topo: &Topology) {
        let (node, api) = (&topo.node.name, &self.ns.name);
        testbed::sh(&format!(
            "ip link add api0 netns {node} type veth peer name n0 netns {api}"
        ));
        self.ns
            .sh("ip addr add 10.255.0.1/30 dev n0; ip link set n0 up");
        topo.node
            .sh("ip addr add 10.255.0.2/30 dev api0; ip link set api0 up
             ip route add 10.255.255.0/24 via 10.255.0.1");
    }
}

/// One control plane and the Services in it.
pub struct Cluster {
    pub flavor: Flavor,
    cp: ControlPlane,
    /// The shape of every Service in the API server now, by index.
    present: Vec<Shape>,
    /// (Services, objects written, seconds) for every fill.
    pub fills: Vec<(usize, usize, f64)>,
    pub startup: Duration,
}

impl Cluster {
    /// Starts etcd and kube-apiserver in the API namespace and creates the namespace and Node.
    pub fn start(bins: &Binaries, netns: &ApiNetns, flavor: Flavor) -> Result<Self> {
        let bind = match flavor {
            Flavor::Extproxy => EXTPROXY_API,
            Flavor::KubeProxy => KUBE_PROXY_API,
        };
        let started = Instant::now();
        let cp = ControlPlane::start(
            bins,
            Options {
                bind: bind.into(),
                netns: Some(netns.path()),
                ..Options::default()
            },
        )
        .with_context(|| format!("starting the {flavor:?} cluster's etcd and kube-apiserver"))?;
        let startup = started.elapsed();
        cp.write_all(
            &[
                ApiWrite::create(
                    "/api/v1/namespaces",
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
                        .to_string(),
                ),
                ApiWrite::create(
                    "/api/v1/nodes",
                    json!({
                        "apiVersion": "v1",
                        "kind": "Node",
                        "metadata": {"name": NODE_NAME},
                        "status": {"addresses": [
                            {"type": "InternalIP", "address": testbed::topo::NODE},
                            {"type": "Hostname", "address": NODE_NAME},
                        ]},
                    })
                    .to_string(),
                ),
            ],
            1,
        )?;
        Ok(Cluster {
            flavor,
            cp,
            present: Vec::new(),
            fills: Vec::new(),
            startup,
        })
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.cp.kubeconfig()
    }

    /// Process ids of etcd and the API server (their CPU is not the contender's).
    pub fn pids(&self) -> Vec<u32> {
        self.cp.pids()
    }

    fn labelled(&self) -> bool {
        self.flavor == Flavor::Extproxy
    }

    /// Makes the cluster hold `layout`: the earlier targets become ordinary Services, the
    /// missing ones are created (Services, then their slices). Returns the objects written and
    /// how long it took.
    pub fn fill(&mut self, layout: &Layout) -> Result<(usize, Duration)> {
        let count = layout.count();
        anyhow::ensure!(
            count >= self.present.len(),
            "a cluster only grows ({} Services present, {count} wanted)",
            self.present.len()
        );
        let labelled = self.labelled();
        let mut patches = Vec::new();
        for (i, shape) in self.present.iter().enumerate() {
            let want = layout.shape(i);
            if *shape != want {
                patches.push(ApiWrite::merge_patch(
                    service_path(&Layout::name(i)),
                    layout::service_patch(want).to_string(),
                ));
                patches.push(ApiWrite::merge_patch(
                    slice_path(&layout::slice_name(i)),
                    layout::slice_patch(want, layout::ONE_ENDPOINT, None).to_string(),
                ));
            }
        }
        let new = self.present.len()..count;
        let services: Vec<ApiWrite> = new
            .clone()
            .map(|i| {
                ApiWrite::create(
                    format!("/api/v1/namespaces/{NAMESPACE}/services"),
                    layout.service(i, labelled).to_string(),
                )
            })
            .collect();
        let slices: Vec<ApiWrite> = new
            .clone()
            .map(|i| {
                ApiWrite::create(
                    format!("/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"),
                    layout.slice(i, labelled).to_string(),
                )
            })
            .collect();
        let mut took = Duration::ZERO;
        let mut written = 0;
        for writes in [patches, services, slices] {
            took += self
                .cp
                .write_all(&writes, IN_FLIGHT)
                .with_context(|| format!("filling the {:?} cluster", self.flavor))?;
            written += writes.len();
        }
        self.present = (0..count).map(|i| layout.shape(i)).collect();
        self.fills
            .push((layout.services, written, took.as_secs_f64()));
        Ok((written, took))
    }

    /// Puts the one-endpoint target back on its own endpoint (a run that ended early may have
    /// left it on the other).
    pub fn reset_target(&self, layout: &Layout) -> Result<()> {
        let i = layout.one_index();
        self.cp.write_all(
            &[ApiWrite::merge_patch(
                slice_path(&layout::slice_name(i)),
                layout::slice_patch(Shape::OneEndpoint, layout::ONE_ENDPOINT, None).to_string(),
            )],
            1,
        )?;
        Ok(())
    }

    /// Runs `f` with a kept-alive admin connection, on a thread in the API namespace.
    pub fn with_connection<T: Send>(
        &self,
        f: impl FnOnce(&mut ApiConnection) -> Result<T> + Send,
    ) -> Result<T> {
        self.cp.in_netns(|| {
            let mut conn = self.cp.connection()?;
            f(&mut conn)
        })?
    }
}

fn service_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/services/{name}")
}

fn slice_path(name: &str) -> String {
    format!("/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices/{name}")
}

/// Moves the one-endpoint target to `to` over `conn`, with the write's time as the slice's
/// trigger time. Returns when the write was sent (the start of the programming latency).
pub fn move_target(conn: &mut ApiConnection, layout: &Layout, to: Ipv4Addr) -> Result<Instant> {
    let patch = layout::slice_patch(
        Shape::OneEndpoint,
        to,
        Some(&layout::rfc3339(SystemTime::now())),
    );
    let write = ApiWrite::merge_patch(
        slice_path(&layout::slice_name(layout.one_index())),
        patch.to_string(),
    );
    let sent = Instant::now();
    conn.send_ok(&write)?;
    Ok(sent)
}
