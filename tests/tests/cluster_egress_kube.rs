//! Cluster egress failover in Kubernetes mode (root): three nodes and an outside host on one L2
//! segment, a real etcd and kube-apiserver on the segment (in the bridge's namespace, reachable
//! from every node), the real `extproxy` binary on each node electing the owner of one cluster
//! egress address through its Lease. node2 and node3 are gateway candidates; a pod behind node1
//! keeps 100 connections open and opens new ones all along while the owner is killed and its link
//! taken down, and while it comes back. Skipped, saying so, without $EXTPROXY_K8S_BIN.

use extproxy_tests::ip;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use extproxy_envtest::{ControlPlane, Options, binaries_or_skip};
use extproxy_tests::agent::*;
use extproxy_tests::kube::meta;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::api::{Api, PostParams};
use testbed::cluster::{Cluster, EP1, EP2, NODE_IPS, OUTSIDE};

/// The cluster egress address: on the segment, so the outside host finds its owner by ARP.
const ADDR: &str = "10.0.0.100";
const LEASE: &str = "extproxy-egress-10-0-0-100";
const LEASE_NAMESPACE: &str = "extproxy-system";
const CLUSTER_IP: &str = "10.96.0.10";
/// The API server's address on the bridge, in the segment's own namespace: every node reaches
/// it on the segment, and a node whose link is down loses it, as a real node would.
const API_IP: &str = "10.0.0.250";
const NODE_NAMES: [&str; 3] = ["n1", "n2", "n3"];
const LONG_LIVED: usize = 100;
/// Generous: start-ups, elections and a takeover (a 5 s Lease) all fit many times over.
const WAIT: Duration = Duration::from_secs(60);
/// How long the returned node is watched for a flap: longer than a Lease.
const OBSERVE: Duration = Duration::from_secs(12);

/// API calls from a thread inside the segment's namespace, where the API server listens.
struct ClusterApi {
    ns: String,
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

impl ClusterApi {
    fn new(ns: &str, cp: &ControlPlane) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = in_netns(ns, || rt.block_on(async { cp.client().unwrap() }));
        ClusterApi {
            ns: ns.to_owned(),
            rt,
            client,
        }
    }

    fn run<T: Send, F: Future<Output = T> + Send>(
        &self,
        f: impl FnOnce(kube::Client) -> F + Send,
    ) -> T {
        let client = self.client.clone();
        in_netns(&self.ns, || self.rt.block_on(f(client)))
    }

    /// The address's Lease: (holder, transitions); None before anyone created it.
    fn lease(&self) -> Option<(Option<String>, i32)> {
        self.run(|client| async move {
            Api::<Lease>::namespaced(client, LEASE_NAMESPACE)
                .get_opt(LEASE)
                .await
                .unwrap()
        })
        .map(|lease| {
            let spec = lease.spec.unwrap_or_default();
            (
                spec.holder_identity.filter(|h| !h.is_empty()),
                spec.lease_transitions.unwrap_or(0),
            )
        })
    }

    fn holder(&self) -> Option<String> {
        self.lease().and_then(|(holder, _)| holder)
    }

    /// Nodes n1..n3 (n2 and n3 gateway candidates), extproxy's namespace, and a selector-less
    /// Service on the cluster egress address with two endpoints outside.
    fn create_cluster_objects(&self) {
        self.run(|client| async move {
            let pp = PostParams::default();
            for ns in ["demo", LEASE_NAMESPACE] {
                Api::<Namespace>::all(client.clone())
                    .create(
                        &pp,
                        &Namespace {
                            metadata: meta("", ns, &[]),
                            ..Namespace::default()
                        },
                    )
                    .await
                    .unwrap();
            }
            for (i, name) in NODE_NAMES.iter().enumerate() {
                let labels: &[(&str, &str)] = if i == 0 {
                    &[]
                } else {
                    &[("extproxy.io/egress-gateway", "true")]
                };
                Api::<Node>::all(client.clone())
                    .create(
                        &pp,
                        &Node {
                            metadata: meta("", name, labels),
                            status: Some(NodeStatus {
                                addresses: Some(vec![NodeAddress {
                                    type_: "InternalIP".into(),
                                    address: NODE_IPS[i].into(),
                                }]),
                                ..NodeStatus::default()
                            }),
                            ..Node::default()
                        },
                    )
                    .await
                    .unwrap();
            }
            let mut service_meta = meta(
                "demo",
                "partner",
                &[("service.kubernetes.io/service-proxy-name", "extproxy")],
            );
            service_meta.annotations = Some(
                [("extproxy.io/cluster-egress-ip".to_owned(), ADDR.to_owned())]
                    .into_iter()
                    .collect(),
            );
            Api::<Service>::namespaced(client.clone(), "demo")
                .create(
                    &pp,
                    &Service {
                        metadata: service_meta,
                        spec: Some(ServiceSpec {
                            cluster_ip: Some(CLUSTER_IP.into()),
                            ports: Some(vec![ServicePort {
                                name: Some("http".into()),
                                port: 80,
                                ..ServicePort::default()
                            }]),
                            ..ServiceSpec::default()
                        }),
                        ..Service::default()
                    },
                )
                .await
                .unwrap();
            Api::<EndpointSlice>::namespaced(client, "demo")
                .create(
                    &pp,
                    &EndpointSlice {
                        metadata: meta(
                            "demo",
                            "partner-1",
                            &[("kubernetes.io/service-name", "partner")],
                        ),
                        address_type: "IPv4".into(),
                        ports: Some(vec![EndpointPort {
                            name: Some("http".into()),
                            port: Some(8080),
                            protocol: Some("TCP".into()),
                            ..EndpointPort::default()
                        }]),
                        endpoints: [EP1, EP2]
                            .iter()
                            .map(|a| Endpoint {
                                addresses: vec![(*a).into()],
                                conditions: Some(EndpointConditions {
                                    ready: Some(true),
                                    serving: Some(true),
                                    terminating: Some(false),
                                }),
                                ..Endpoint::default()
                            })
                            .collect(),
                    },
                )
                .await
                .unwrap();
        });
    }
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

/// Node `i`'s agent (0: n1) in Kubernetes mode.
fn start_node(c: &Cluster, cp: &ControlPlane, i: usize) -> Agent {
    Agent::start_kube_at(
        &site(c, i),
        &cp.kubeconfig(),
        NODE_NAMES[i],
        &[
            "--cluster-egress-ip",
            ADDR,
            // The pod's packets are translated as they leave node1's uplink, as in manifest mode.
            "--pod-ifaces",
            "none",
            // Kubernetes mode keeps the data path on exit by default; the test cleans up.
            "--detach-on-exit",
        ],
    )
}

/// Polls `check` until it returns Ok (panics with `what` and the last error after WAIT).
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if start.elapsed() > WAIT => {
                panic!("{what}: not within {WAIT:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
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

/// Polls `check` every 10 ms until it holds: how long after `since` it first did.
fn poll_since(since: Instant, what: &str, check: impl Fn() -> bool) -> Duration {
    loop {
        if check() {
            return since.elapsed();
        }
        assert!(since.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sees_owner(agent: &Agent, owner: usize, local: bool) -> Result<(), String> {
    let got = egress_entry(agent);
    if got == Some((Some(ip(NODE_IPS[owner])), local)) {
        Ok(())
    } else {
        Err(format!("{}: {got:?}", agent.node_ns()))
    }
}

/// Whether ADDR is on node `i`'s uplink.
fn on_uplink(c: &Cluster, i: usize) -> bool {
    c.nodes[i]
        .sh("ip -4 -o addr show dev up0")
        .contains(&format!(" {ADDR}/"))
}

/// Whether the outside host sends ADDR's packets to node `i`'s MAC.
fn outside_sends_to(c: &Cluster, i: usize) -> bool {
    let mac = c.nodes[i].sh("cat /sys/class/net/up0/address");
    c.ext
        .sh(&format!("ip neigh show {ADDR}"))
        .contains(mac.trim())
}

fn agent(agents: &[Option<Agent>], i: usize) -> &Agent {
    agents[i].as_ref().expect("a running agent")
}

fn event(agent: &Agent, name: &str) -> u64 {
    agent.inspect()["events"][name].as_u64().unwrap_or(0)
}

/// A connection from the pod to the Service that stays open, with what the endpoint saw when it
/// opened.
struct LongLived {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    opened: Seen,
}

fn read_seen(reader: &mut BufReader<TcpStream>) -> std::io::Result<Seen> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(parse_seen(&line))
}

fn open_long_lived(pod_ns: &str, n: usize) -> Vec<LongLived> {
    let target = SocketAddr::new(ip(CLUSTER_IP), 80);
    in_netns(pod_ns, || {
        (0..n)
            .map(|i| {
                let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("long-lived connection {i}: {e}"));
                // Long enough for a retransmission after the move (the first comes at the RTO,
                // 200 ms and up), short enough to finish.
                stream
                    .set_read_timeout(Some(Duration::from_secs(15)))
                    .unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                writeln!(stream, "open {i}").unwrap();
                let opened = read_seen(&mut reader)
                    .unwrap_or_else(|e| panic!("long-lived connection {i}: {e}"));
                LongLived {
                    stream,
                    reader,
                    opened,
                }
            })
            .collect()
    })
}

/// Sends a line on every connection, then reads every answer: the connections that did not
/// answer, or answered for another source address or port than when they opened, are described
/// and closed.
fn broken(conns: &mut Vec<LongLived>, round: &str) -> Vec<String> {
    let sent: Vec<std::io::Result<()>> = conns
        .iter_mut()
        .enumerate()
        .map(|(i, c)| writeln!(c.stream, "{round} {i}"))
        .collect();
    let verdicts: Vec<Option<String>> = conns
        .iter_mut()
        .zip(sent)
        .enumerate()
        .map(|(i, (c, sent))| {
            let answer = sent.and_then(|()| read_seen(&mut c.reader));
            match answer {
                Ok(seen) if seen == c.opened => None,
                Ok(seen) => Some(format!("#{i}: opened as {:?}, now {seen:?}", c.opened)),
                Err(e) => Some(format!("#{i} ({:?}): {e}", c.opened)),
            }
        })
        .collect();
    let mut verdict = verdicts.iter();
    conns.retain(|_| verdict.next().unwrap().is_none());
    verdicts.into_iter().flatten().collect()
}

/// One new connection of the stream: when it started (since the stream began) and whether it
/// reached an endpoint from ADDR.
#[derive(Clone, Debug)]
struct Attempt {
    started: Duration,
    outcome: Result<(), String>,
}

/// New connections from the pod, one every 20 ms (each on a thread of its own, so a connection
/// hanging on a lost SYN does not delay the next), until dropped.
struct NewConnections {
    began: Instant,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NewConnections {
    fn start(pod_ns: &str) -> Self {
        let began = Instant::now();
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, log, halt) = (pod_ns.to_owned(), attempts.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Threads spawned in there start in the pod's namespace too.
            in_netns(&ns, || {
                let mut running = Vec::new();
                while !halt.load(Ordering::SeqCst) {
                    let log = log.clone();
                    running.push(std::thread::spawn(move || {
                        let started = began.elapsed();
                        let outcome = one_connection();
                        log.lock().unwrap().push(Attempt { started, outcome });
                    }));
                    running.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
                    std::thread::sleep(Duration::from_millis(20));
                }
                for t in running {
                    let _ = t.join();
                }
            })
        });
        NewConnections {
            began,
            attempts,
            stop,
            thread: Some(thread),
        }
    }

    /// The finished attempts, in the order they started.
    fn attempts(&self) -> Vec<Attempt> {
        let mut all = self.attempts.lock().unwrap().clone();
        all.sort_by_key(|a| a.started);
        all
    }

    fn since(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.began)
    }
}

impl Drop for NewConnections {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn one_connection() -> Result<(), String> {
    let target = SocketAddr::new(ip(CLUSTER_IP), 80);
    let mut stream =
        TcpStream::connect_timeout(&target, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    writeln!(stream, "new").map_err(|e| e.to_string())?;
    let seen = read_seen(&mut BufReader::new(stream)).map_err(|e| e.to_string())?;
    if seen.peer_ip == ip(ADDR) {
        Ok(())
    } else {
        Err(format!("left from {}", seen.peer_ip))
    }
}

/// Needs root and the Kubernetes binaries. The owner's agent is killed and its link goes down:
/// the other candidate takes the Lease and the address, new connections from the pod resume, and
/// the pod's 100 established connections all continue with the same source address and port at
/// the endpoint. The old owner comes back: the owner keeps its Lease, nothing breaks.
#[test]
fn the_other_gateway_takes_over_a_killed_owner_without_breaking_connections() {
    let Some(bins) = binaries_or_skip(
        "the_other_gateway_takes_over_a_killed_owner_without_breaking_connections",
    ) else {
        return;
    };
    let c = Cluster::new("kfail");
    c.lan.sh(&format!("ip addr add {API_IP}/24 dev br0"));
    let _servers = EchoServers::start(&c.ext.name, &[(EP1, 8080), (EP2, 8080)]);
    // Declared after the cluster: stopped before its namespaces are deleted.
    let cp = ControlPlane::start(
        &bins,
        Options {
            bind: ip(API_IP),
            netns: Some(format!("/var/run/netns/{}", c.lan.name).into()),
            ..Options::default()
        },
    )
    .expect("etcd and kube-apiserver on the segment");
    let api = ClusterApi::new(&c.lan.name, &cp);
    api.create_cluster_objects();
    let mut agents: Vec<Option<Agent>> = (0..3).map(|i| Some(start_node(&c, &cp, i))).collect();

    // 1. An owner is elected; every data path knows it.
    let owner = wait_for("an elected owner", || match api.holder().as_deref() {
        Some("n2") => Ok(1),
        Some("n3") => Ok(2),
        other => Err(format!("holder {other:?}")),
    });
    let other = 3 - owner;
    wait_for("every node sees the owner", || {
        sees_owner(agent(&agents, 0), owner, false)?;
        sees_owner(agent(&agents, owner), owner, true)?;
        sees_owner(agent(&agents, other), owner, false)?;
        if on_uplink(&c, owner) && !on_uplink(&c, other) {
            Ok(())
        } else {
            Err("the address is not (only) on the owner's uplink".into())
        }
    });
    eprintln!("owner: {}", NODE_NAMES[owner]);
    let mut conns = open_long_lived(&c.pod.name, LONG_LIVED);
    for (i, conn) in conns.iter().enumerate() {
        assert_eq!(
            conn.opened.peer_ip,
            ip(ADDR),
            "long-lived #{i} must leave from the cluster egress address"
        );
    }
    // Connections whose first candidate port another one already had (two of n connections to
    // one endpoint share it with probability about n^2 / (2 * 33,512): here about one run in
    // 14): a new owner, which knows only the first candidate, cannot keep them.
    let not_failover_safe = event(agent(&agents, owner), "snat_not_first_candidate");
    let stream = NewConnections::start(&c.pod.name);
    wait_for("new connections flowing", || {
        let ok = stream
            .attempts()
            .iter()
            .filter(|a| a.outcome.is_ok())
            .count();
        if ok >= 25 {
            Ok(())
        } else {
            Err(format!("{ok} so far: {:?}", stream.attempts().last()))
        }
    });
    let before_kill = stream.attempts();
    assert!(
        before_kill.iter().all(|a| a.outcome.is_ok()),
        "new connections fail before the failover: {:?}",
        before_kill.iter().find(|a| a.outcome.is_err())
    );

    // 2. The owner dies with its link. Each sign of the takeover is watched by a thread of its
    // own (one poll of each can take a few hundred ms); the long-lived connections are tried as
    // soon as the origin tunnels to the new owner.
    let not_first_before = event(agent(&agents, other), "snat_not_first_candidate");
    let killed = Instant::now();
    agents[owner].take().unwrap().kill();
    c.nodes[owner].sh("ip link set up0 down");
    let (lease_at, uplink_at, origin_at, neigh_at, broken_by_failover) = std::thread::scope(|s| {
        let lease = s.spawn(|| {
            poll_since(killed, "the Lease names the other candidate", || {
                api.holder().as_deref() == Some(NODE_NAMES[other])
            })
        });
        let uplink = s.spawn(|| {
            poll_since(killed, "the address on the other's uplink", || {
                on_uplink(&c, other)
            })
        });
        let neigh = s.spawn(|| {
            poll_since(killed, "the outside host sends to the other", || {
                outside_sends_to(&c, other)
            })
        });
        let origin_at = poll_since(killed, "node1 tunnels to the other", || {
            sees_owner(agent(&agents, 0), other, false).is_ok()
        });
        let broken = broken(&mut conns, "after");
        (
            lease.join().unwrap(),
            uplink.join().unwrap(),
            origin_at,
            neigh.join().unwrap(),
            broken,
        )
    });
    let new_owner = agent(&agents, other);
    sees_owner(new_owner, other, true).unwrap();
    // New connections resume: 50 in a row succeed after the last failure.
    let resumed = wait_for("new connections resume", || {
        let all = stream.attempts();
        let after_kill: Vec<&Attempt> = all
            .iter()
            .filter(|a| a.started >= stream.since(killed))
            .collect();
        let last_failure = after_kill.iter().rposition(|a| a.outcome.is_err());
        let first_ok = last_failure.map_or(0, |i| i + 1);
        let ok_since = after_kill.len() - first_ok;
        if ok_since >= 50 {
            Ok(after_kill[first_ok].started - stream.since(killed))
        } else {
            Err(format!(
                "{ok_since} in a row; last: {:?}",
                after_kill.last().map(|a| &a.outcome)
            ))
        }
    });
    let failed = stream
        .attempts()
        .iter()
        .filter(|a| a.started >= stream.since(killed) && a.outcome.is_err())
        .count();
    let not_first = event(new_owner, "snat_not_first_candidate") - not_first_before;
    eprintln!(
        "failover from {} to {} (times since the kill): Lease taken {lease_at:?}, address on \
         its uplink {uplink_at:?}, origin tunnels there {origin_at:?}, outside host sends there \
         {neigh_at:?}, new connections resumed {resumed:?} ({failed} failed meanwhile); \
         long-lived connections broken: {} of {LONG_LIVED} (target 0; snat_not_first_candidate \
         on the old owner {not_failover_safe}, on the new one {not_first})",
        NODE_NAMES[owner],
        NODE_NAMES[other],
        broken_by_failover.len(),
    );
    // A connection survives when the new owner finds its first candidate port free. Those that
    // did not have it on the old owner cannot (above); and new connections reaching the new owner
    // before a long-lived connection's next packet can take that port first (DESIGN.md
    // "Failover without dropping connections"): each new flow to the same endpoint with
    // probability (long-lived flows there) / 33,512, so with about ten new flows between the
    // switch and this exchange one run in about 70 loses one connection. Either shows as a
    // not-first candidate; anything else is a bug.
    let explained = not_failover_safe + not_first;
    assert!(
        broken_by_failover.len() as u64 <= explained && broken_by_failover.len() <= 3,
        "long-lived connections broken by the failover, beyond port collisions \
         ({not_failover_safe} not-first candidates on the old owner, {not_first} on the new \
         one):\n{}",
        broken_by_failover.join("\n"),
    );
    assert!(
        event(new_owner, "ct_miss_midstream") >= LONG_LIVED as u64,
        "the new owner rebuilt the long-lived connections' translations from mid-flow packets"
    );

    // 3. The old owner comes back: link first (its address's lifetime ran out meanwhile), then
    // its agent, which adopts the data path it left pinned.
    let (_, transitions) = api.lease().unwrap();
    c.nodes[owner].sh(&format!(
        "ip link set up0 up; ip route replace default via {OUTSIDE}"
    ));
    assert!(
        !on_uplink(&c, owner),
        "the killed owner's address outlived its lifetime: {}",
        c.nodes[owner].sh("ip -4 -o addr show dev up0")
    );
    let back = Instant::now();
    let returned_from = stream.since(back);
    agents[owner] = Some(start_node(&c, &cp, owner));
    wait_for("the returned node sees the new owner", || {
        sees_owner(agent(&agents, owner), other, false)
    });
    while back.elapsed() < OBSERVE {
        let lease = api.lease();
        assert_eq!(
            lease,
            Some((Some(NODE_NAMES[other].to_owned()), transitions)),
            "the Lease moved after the old owner came back"
        );
        assert!(
            !on_uplink(&c, owner) && on_uplink(&c, other),
            "the address moved after the old owner came back"
        );
        assert!(outside_sends_to(&c, other));
        std::thread::sleep(Duration::from_millis(200));
    }
    sees_owner(agent(&agents, 0), other, false).unwrap();
    sees_owner(agent(&agents, other), other, true).unwrap();
    let after_return: Vec<Attempt> = stream
        .attempts()
        .into_iter()
        .filter(|a| a.started >= returned_from)
        .collect();
    drop(stream);
    let failed_after_return: Vec<&Attempt> =
        after_return.iter().filter(|a| a.outcome.is_err()).collect();
    eprintln!(
        "the old owner back for {OBSERVE:?}: {} new connections, {} failed",
        after_return.len(),
        failed_after_return.len()
    );
    assert!(
        after_return.len() > 100,
        "the stream ran while the node came back"
    );
    assert!(
        failed_after_return.is_empty(),
        "new connections failed while the old owner came back: {failed_after_return:?}"
    );
    let broken_after_return = broken(&mut conns, "back");
    assert!(
        broken_after_return.is_empty(),
        "long-lived connections broken after the old owner came back:\n{}",
        broken_after_return.join("\n")
    );
    drop(conns);
    drop(agents);
    drop(cp);
}
