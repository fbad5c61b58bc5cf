//! Cluster egress elections against a real kube-apiserver v1.36.2 and etcd (extproxy-envtest):
//! three nodes' electors in this process (one not a candidate), the real kube client, Lease
//! watch and optimistic writes. Each test starts a control plane of its own. Skipped, saying so,
//! without $EXTPROXY_K8S_BIN (`cargo xtask test` sets it).

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use extproxy::egress::config::{Fencing, Timing, lease_name};
use extproxy::egress::kube::{self as egress_kube, ADDRESS_ANNOTATION, OWNER_ADDRESS_ANNOTATION};
use extproxy::egress::lease::{Candidacy, Role, Status};
use extproxy_envtest::{ControlPlane, Options, binaries_or_skip};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::PostParams;
use kube::{Api, Client};
use support::cluster::{apply_deploy, create_namespace, service_account_token};
use tokio::sync::watch;

const NAMESPACE: &str = "extproxy-system";
const V4: &str = "10.0.0.50";
const V6: &str = "fd00::50";
const WAIT: Duration = Duration::from_secs(30);

/// The elections' deadlines are seconds long: four control planes and their electors at once on
/// a 2-core CI box starve each other past them. One test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn start(test: &str) -> Option<ControlPlane> {
    let bins = binaries_or_skip(test)?;
    support::init_logs();
    Some(ControlPlane::start(&bins, Options::default()).expect("starting etcd and kube-apiserver"))
}

fn addresses() -> Vec<IpAddr> {
    vec![V4.parse().unwrap(), V6.parse().unwrap()]
}

/// Every status a node's electors sent, with when it arrived.
type History = Arc<Mutex<Vec<(Instant, Status)>>>;

/// One node's election, as its agent runs it.
struct Node {
    name: String,
    stop: watch::Sender<bool>,
    _candidacy: watch::Sender<Candidacy>,
    statuses: History,
    electors: Vec<tokio::task::JoinHandle<()>>,
    others: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    fn start(client: &Client, name: &str, candidate: bool, address: Ipv4Addr) -> Node {
        let (stop, stop_rx) = watch::channel(false);
        let (candidacy, candidacy_rx) = watch::channel(Candidacy {
            candidate,
            address: Some(address),
        });
        let mut election = egress_kube::elect(
            client,
            NAMESPACE,
            name,
            addresses(),
            Timing::default(),
            Fencing::Fence,
            candidacy_rx,
            stop_rx,
        );
        let statuses: History = Arc::default();
        let log = statuses.clone();
        let pump = tokio::spawn(async move {
            while let Some(mut s) = election.updates.recv().await {
                let handoff = s.handoff.take();
                log.lock().unwrap().push((Instant::now(), s));
                // As the controller does once the address is off the uplink: from here on the
                // Lease may be released.
                drop(handoff);
            }
        });
        Node {
            name: name.to_owned(),
            stop,
            _candidacy: candidacy,
            statuses,
            electors: election.electors,
            others: vec![election.watch, pump],
        }
    }

    fn history(&self) -> (String, History) {
        (self.name.clone(), self.statuses.clone())
    }

    fn last(&self, address: &str) -> Option<Status> {
        let a: IpAddr = address.parse().unwrap();
        self.statuses
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, s)| s.address == a)
            .map(|(_, s)| s.clone())
    }

    fn role(&self, address: &str) -> Option<Role> {
        self.last(address).map(|s| s.role)
    }

    fn holder(&self, address: &str) -> Option<String> {
        self.last(address)?.holder.map(|h| h.node)
    }

    fn ever(&self, address: &str, role: Role) -> bool {
        let a: IpAddr = address.parse().unwrap();
        self.statuses
            .lock()
            .unwrap()
            .iter()
            .any(|(_, s)| s.address == a && s.role == role)
    }

    /// The agent dies: no release.
    fn kill(self) {
        for t in self.electors.iter().chain(&self.others) {
            t.abort();
        }
    }

    /// A graceful stop: held Leases are released.
    async fn stop(self) {
        self.stop.send(true).unwrap();
        for e in self.electors {
            e.await.unwrap();
        }
        for t in self.others {
            t.abort();
        }
    }
}

/// When a node had `address` on its uplink: from an Owner status until its next other status,
/// and never past the deadline of its last renewal (a killed agent's address leaves the uplink by
/// its lifetime).
fn ownership(history: &History, address: IpAddr) -> Vec<(Instant, Instant)> {
    let mut spans = Vec::new();
    let mut open: Option<(Instant, Instant)> = None;
    for (at, s) in history.lock().unwrap().iter() {
        if s.address != address {
            continue;
        }
        if s.role == Role::Owner {
            let deadline = s
                .valid_until
                .expect("with fencing an owner has a deadline")
                .into_std();
            open = Some((open.map_or(*at, |(since, _)| since), deadline));
        } else if let Some((since, deadline)) = open.take() {
            spans.push((since, (*at).min(deadline)));
        }
    }
    spans.extend(open);
    spans
}

/// The safety property: no two nodes ever had an address on their uplinks at once.
fn assert_one_owner_at_a_time(histories: &[(String, History)]) {
    for address in addresses() {
        let mut spans: Vec<(Instant, Instant, &str)> = histories
            .iter()
            .flat_map(|(node, h)| {
                ownership(h, address)
                    .into_iter()
                    .map(move |(since, until)| (since, until, node.as_str()))
            })
            .collect();
        spans.sort();
        assert!(!spans.is_empty(), "{address} was never owned");
        for pair in spans.windows(2) {
            let (_, until, first) = pair[0];
            let (since, _, second) = pair[1];
            assert!(
                until <= since,
                "{address}: {second} took it {:?} before {first} gave it up",
                until - since
            );
        }
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

async fn lease(client: &Client, address: &str) -> Lease {
    Api::<Lease>::namespaced(client.clone(), NAMESPACE)
        .get(&lease_name(address.parse().unwrap()))
        .await
        .unwrap()
}

fn holder_of(lease: &Lease) -> Option<String> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .clone()
        .filter(|h| !h.is_empty())
}

fn transitions(lease: &Lease) -> i32 {
    lease.spec.as_ref().unwrap().lease_transitions.unwrap_or(0)
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

/// One candidate owns each address; the non-candidate follows it; when the owner dies the other
/// candidate takes over once the Lease expires; when the dead one comes back nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_per_address_takeover_after_expiry_and_no_flapping() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = start("one_owner_per_address_takeover_after_expiry_and_no_flapping") else {
        return;
    };
    let admin = cp.client().unwrap();
    create_namespace(&admin, NAMESPACE).await;
    let a = Node::start(&admin, "node-a", false, ip(1));
    let b = Node::start(&admin, "node-b", true, ip(2));
    let c = Node::start(&admin, "node-c", true, ip(3));
    for address in [V4, V6] {
        wait_until("an owner", || {
            [&b, &c]
                .iter()
                .filter(|n| n.role(address) == Some(Role::Owner))
                .count()
                == 1
                // Every node has seen the Lease (one's watch may lag another's).
                && a.holder(address).is_some()
                && [&b, &c].iter().all(|n| n.holder(address) == a.holder(address))
        })
        .await;
    }
    let owner_name = b.holder(V4).expect("B knows the owner of the IPv4 address");
    for address in [V4, V6] {
        let l = lease(&admin, address).await;
        let holder = holder_of(&l).unwrap();
        assert_eq!(a.holder(address).as_deref(), Some(holder.as_str()));
        let spec = l.spec.as_ref().unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(5));
        assert!(spec.renew_time.is_some() && spec.acquire_time.is_some());
        let annotations = l.metadata.annotations.clone().unwrap();
        assert_eq!(annotations[ADDRESS_ANNOTATION], address);
        let owner_ip = if holder == "node-b" { ip(2) } else { ip(3) };
        assert_eq!(annotations[OWNER_ADDRESS_ANNOTATION], owner_ip.to_string());
        assert_eq!(
            a.last(address).unwrap().holder.unwrap().address,
            Some(owner_ip),
            "followers learn where to tunnel from the Lease"
        );
        assert!(!a.ever(address, Role::Owner), "a non-candidate never owns");
    }

    // The owner of the IPv4 address dies (its agent is killed: no release).
    let mut histories = vec![a.history(), b.history(), c.history()];
    let (dead, survivor) = if owner_name == "node-b" {
        (b, c)
    } else {
        (c, b)
    };
    let owned: Vec<&str> = [V4, V6]
        .into_iter()
        .filter(|a| dead.role(a) == Some(Role::Owner))
        .collect();
    let before = lease(&admin, V4).await;
    let dead_name = dead.name.clone();
    dead.kill();
    let killed = Instant::now();
    for address in &owned {
        wait_until("the survivor to take over", || {
            survivor.role(address) == Some(Role::Owner)
        })
        .await;
    }
    let took = killed.elapsed();
    eprintln!(
        "takeover: {:.2} s after the owner was killed (lease 5 s, renewed every 1 s)",
        took.as_secs_f64()
    );
    for address in &owned {
        let acquired = survivor
            .statuses
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.address.to_string() == *address)
            .find_map(|(_, s)| s.acquired.clone())
            .expect("the survivor acquired it");
        assert_eq!(acquired.previous.as_deref(), Some(dead_name.as_str()));
        assert!(acquired.expired, "the dead owner did not release it");
    }
    let after = lease(&admin, V4).await;
    assert_eq!(holder_of(&after).as_deref(), Some(survivor.name.as_str()));
    assert_eq!(transitions(&after), transitions(&before) + 1);
    wait_until("the follower to see the new owner", || {
        a.holder(V4).as_deref() == Some(survivor.name.as_str())
    })
    .await;

    // The dead node's agent comes back: it follows; the address does not move back.
    let back = Node::start(
        &admin,
        &dead_name,
        true,
        if dead_name == "node-b" { ip(2) } else { ip(3) },
    );
    wait_until("the returning node to see the owner", || {
        back.holder(V4).as_deref() == Some(survivor.name.as_str())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    for address in [V4, V6] {
        assert!(
            !back.ever(address, Role::Owner),
            "{address} flapped back to {dead_name}"
        );
        assert_eq!(survivor.role(address), Some(Role::Owner));
    }
    assert_eq!(transitions(&lease(&admin, V4).await), transitions(&after));
    histories.push(back.history());
    back.stop().await;
    survivor.stop().await;
    a.stop().await;
    assert_one_owner_at_a_time(&histories);
}

/// A graceful stop releases: the next candidate takes the address at its next look, and the
/// Event says it was released, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_owner_releases_and_the_next_candidate_takes_over_at_once() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = start("a_stopping_owner_releases_and_the_next_candidate_takes_over_at_once")
    else {
        return;
    };
    let admin = cp.client().unwrap();
    create_namespace(&admin, NAMESPACE).await;
    let b = Node::start(&admin, "node-b", true, ip(2));
    wait_until("B to own both", || {
        b.role(V4) == Some(Role::Owner) && b.role(V6) == Some(Role::Owner)
    })
    .await;
    let c = Node::start(&admin, "node-c", true, ip(3));
    wait_until("C to follow", || c.holder(V4).as_deref() == Some("node-b")).await;
    let histories = [b.history(), c.history()];
    let stopping = Instant::now();
    b.stop().await;
    let released = lease(&admin, V4).await;
    // Either C was quicker than this read, or the Lease is holderless.
    assert_ne!(holder_of(&released).as_deref(), Some("node-b"));
    for address in [V4, V6] {
        wait_until("C to take over", || c.role(address) == Some(Role::Owner)).await;
    }
    eprintln!(
        "takeover after a release: {:.2} s",
        stopping.elapsed().as_secs_f64()
    );
    let acquired = c
        .statuses
        .lock()
        .unwrap()
        .iter()
        .find_map(|(_, s)| s.acquired.clone())
        .unwrap();
    assert_eq!(acquired.previous.as_deref(), Some("node-b"));
    assert!(!acquired.expired);
    // The Event a new owner publishes, as the agent does on a move.
    let event = egress_kube::move_event(NAMESPACE, "node-c", &c.last(V4).unwrap(), &acquired);
    Api::<K8sEvent>::namespaced(admin.clone(), NAMESPACE)
        .create(&PostParams::default(), &event)
        .await
        .expect("the API server accepts the move's Event");
    c.stop().await;
    assert_one_owner_at_a_time(&histories);
}

/// The API server goes away: the owner gives the address up before anyone could take it, and
/// gets it back when the API server returns (the other candidate's watch relists and waits a
/// whole lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_fences_the_owner_which_keeps_the_address_after() {
    let _serial = SERIAL.lock().await;
    let Some(mut cp) = start("an_api_server_outage_fences_the_owner_which_keeps_the_address_after")
    else {
        return;
    };
    let admin = cp.client().unwrap();
    create_namespace(&admin, NAMESPACE).await;
    let b = Node::start(&admin, "node-b", true, ip(2));
    wait_until("B to own", || b.role(V4) == Some(Role::Owner)).await;
    let c = Node::start(&admin, "node-c", true, ip(3));
    wait_until("C to follow", || c.holder(V4).as_deref() == Some("node-b")).await;
    let histories = [b.history(), c.history()];
    let before = transitions(&lease(&admin, V4).await);
    cp.stop_apiserver();
    let fenced = wait_until("B to fence itself", || b.role(V4) == Some(Role::Fenced)).await;
    eprintln!(
        "fenced {:.2} s into the outage (deadline: two thirds of the 5 s lease after the last \
         renewal)",
        fenced.as_secs_f64()
    );
    assert!(!c.ever(V4, Role::Owner), "nobody can take it meanwhile");
    cp.start_apiserver().unwrap();
    wait_until("B to renew and take it back", || {
        b.role(V4) == Some(Role::Owner) && b.role(V6) == Some(Role::Owner)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(!c.ever(V4, Role::Owner) && !c.ever(V6, Role::Owner));
    assert_eq!(b.role(V4), Some(Role::Owner));
    let admin = cp.client().unwrap();
    assert_eq!(
        transitions(&lease(&admin, V4).await),
        before,
        "it never moved"
    );
    b.stop().await;
    c.stop().await;
    assert_one_owner_at_a_time(&histories);
}

/// deploy/'s ServiceAccount may elect in extproxy's namespace (Role), read Nodes, write the
/// move's Event there, and may not touch Leases anywhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_service_account_elects_in_its_namespace_only() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = start("the_deployed_service_account_elects_in_its_namespace_only") else {
        return;
    };
    let admin = cp.client().unwrap();
    apply_deploy(&admin).await;
    let token = service_account_token(&admin, NAMESPACE, "extproxy").await;
    let agent = Client::try_from(cp.config_with_token(&token)).unwrap();
    let b = Node::start(&agent, "node-b", true, ip(2));
    wait_until("B to own both with the ServiceAccount's rights", || {
        b.role(V4) == Some(Role::Owner) && b.role(V6) == Some(Role::Owner)
    })
    .await;
    let status = b.last(V4).unwrap();
    let acquired = b
        .statuses
        .lock()
        .unwrap()
        .iter()
        .find_map(|(_, s)| s.acquired.clone())
        .unwrap();
    let event = egress_kube::move_event(NAMESPACE, "node-b", &status, &acquired);
    Api::<K8sEvent>::namespaced(agent.clone(), NAMESPACE)
        .create(&PostParams::default(), &event)
        .await
        .expect("events in extproxy's namespace are allowed");
    // The Node watch (every Node) is allowed by the ClusterRole.
    Api::<k8s_openapi::api::core::v1::Node>::all(agent.clone())
        .list(&Default::default())
        .await
        .expect("nodes: list");
    // Leases elsewhere are not.
    let elsewhere = Api::<Lease>::namespaced(agent.clone(), "default");
    let denied = elsewhere
        .create(
            &PostParams::default(),
            &egress_kube::lease_object(
                "extproxy-egress-10-0-0-50",
                "default",
                V4.parse().unwrap(),
                None,
                &extproxy::egress::lease::LeaseWrite {
                    holder: Some("node-b".into()),
                    owner_address: None,
                    duration_secs: 5,
                    transitions: 0,
                    acquire_time: None,
                    renew_time: None,
                },
            ),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&denied, kube::Error::Api(s) if s.code == 403),
        "{denied}"
    );
    let delete = Api::<Lease>::namespaced(agent.clone(), NAMESPACE)
        .delete(&lease_name(V4.parse().unwrap()), &Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&delete, kube::Error::Api(s) if s.code == 403),
        "Leases are never deleted: {delete}"
    );
    b.stop().await;
}
