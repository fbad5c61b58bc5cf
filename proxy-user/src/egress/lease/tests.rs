//! The elector against an in-memory Lease store with the API server's write semantics (a write
//! names the version it replaces), on tokio's paused clock: takeover times are exact, and a
//! partition is one flag.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;

const ADDR: &str = "10.0.0.50";

fn node_ip(id: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, id as u8 + 1)
}

fn identity(id: usize) -> String {
    format!("node-{}", (b'a' + id as u8) as char)
}

#[derive(Default)]
struct Inner {
    leases: HashMap<String, LeaseRecord>,
    version: u64,
    /// Clients cut off from the store: their requests fail and their watches hear nothing.
    down: Vec<usize>,
    watchers: Vec<(usize, String, watch::Sender<Watched>)>,
    /// Relists (reconnections), as the watch counts them.
    listing: u64,
    writes: u64,
    last_write: Option<Instant>,
}

/// The API server: one object per name, versions from one counter, as etcd's revision.
#[derive(Clone, Default)]
struct MemStore(Arc<Mutex<Inner>>);

impl MemStore {
    fn client(&self, id: usize) -> MemClient {
        MemClient {
            store: self.clone(),
            id,
        }
    }

    fn set_down(&self, id: usize, down: bool) {
        let mut inner = self.0.lock().unwrap();
        inner.down.retain(|d| *d != id);
        if down {
            inner.down.push(id);
        } else {
            // Reconnected: the watch relists.
            inner.listing += 1;
            let listing = inner.listing;
            let current: Vec<(String, Observation)> = inner
                .watchers
                .iter()
                .filter(|(c, _, _)| *c == id)
                .map(|(_, n, _)| (n.clone(), observation(&inner.leases, n)))
                .collect();
            for (name, o) in current {
                for (c, n, tx) in &inner.watchers {
                    if *c == id && *n == name {
                        let _ = tx.send(Watched {
                            observation: o.clone(),
                            listing,
                        });
                    }
                }
            }
        }
    }

    fn watch(&self, id: usize, name: &str) -> watch::Receiver<Watched> {
        let mut inner = self.0.lock().unwrap();
        let (tx, rx) = watch::channel(Watched {
            observation: observation(&inner.leases, name),
            listing: inner.listing,
        });
        inner.watchers.push((id, name.to_owned(), tx));
        rx
    }

    fn record(&self, name: &str) -> Option<LeaseRecord> {
        self.0.lock().unwrap().leases.get(name).cloned()
    }

    fn writes(&self) -> u64 {
        self.0.lock().unwrap().writes
    }

    fn last_write(&self) -> Instant {
        self.0.lock().unwrap().last_write.unwrap()
    }
}

fn observation(leases: &HashMap<String, LeaseRecord>, name: &str) -> Observation {
    leases
        .get(name)
        .map_or(Observation::Absent, |r| Observation::Present(r.clone()))
}

struct MemClient {
    store: MemStore,
    id: usize,
}

impl MemClient {
    fn store(&self, name: &str, write: &LeaseWrite) -> LeaseRecord {
        let mut inner = self.store.0.lock().unwrap();
        inner.version += 1;
        inner.writes += 1;
        inner.last_write = Some(Instant::now());
        let record = LeaseRecord {
            holder: write.holder.clone(),
            owner_address: write.owner_address,
            duration_secs: write.duration_secs,
            transitions: write.transitions,
            acquire_time: write.acquire_time,
            renew_time: write.renew_time,
            version: inner.version.to_string(),
        };
        inner.leases.insert(name.to_owned(), record.clone());
        let down = inner.down.clone();
        for (c, n, tx) in &inner.watchers {
            if n == name && !down.contains(c) {
                let _ = tx.send(Watched {
                    observation: Observation::Present(record.clone()),
                    listing: inner.listing,
                });
            }
        }
        record
    }

    async fn reachable(&self) -> Result<(), StoreError> {
        // A request's round trip.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if self.store.0.lock().unwrap().down.contains(&self.id) {
            return Err(StoreError::Other("connection timed out".into()));
        }
        Ok(())
    }
}

impl LeaseStore for MemClient {
    async fn get(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        self.reachable().await?;
        Ok(self.store.record(name))
    }

    async fn create(
        &self,
        name: &str,
        _address: IpAddr,
        write: &LeaseWrite,
    ) -> Result<LeaseRecord, StoreError> {
        self.reachable().await?;
        if self.store.record(name).is_some() {
            return Err(StoreError::Conflict);
        }
        Ok(self.store(name, write))
    }

    async fn replace(
        &self,
        name: &str,
        _address: IpAddr,
        version: &str,
        write: &LeaseWrite,
    ) -> Result<LeaseRecord, StoreError> {
        self.reachable().await?;
        match self.store.record(name) {
            Some(r) if r.version == version => Ok(self.store(name, write)),
            _ => Err(StoreError::Conflict),
        }
    }
}

/// Every status every elector sent, with when, and (unless lenient) the invariant checked on
/// arrival: never two owners of the address at once.
#[derive(Clone, Default)]
struct Log(
    Arc<Mutex<Vec<(usize, Instant, Status)>>>,
    bool,
    /// Electors whose task was killed: they own nothing once their last deadline passed (the
    /// kernel drops the uplink address by its lifetime).
    Arc<Mutex<Vec<usize>>>,
);

impl Log {
    /// For keep mode, where two owners at once is the documented cost.
    fn lenient() -> Self {
        Log(Arc::default(), true, Arc::default())
    }

    fn killed(&self, id: usize) {
        self.2.lock().unwrap().push(id);
    }

    fn push(&self, id: usize, status: Status) {
        let mut log = self.0.lock().unwrap();
        log.push((id, Instant::now(), status));
        if self.1 {
            return;
        }
        let mut last: HashMap<usize, &Status> = HashMap::new();
        for (i, _, s) in log.iter() {
            last.insert(*i, s);
        }
        let dead = self.2.lock().unwrap().clone();
        let now = Instant::now();
        let owners: Vec<usize> = last
            .iter()
            .filter(|(i, s)| {
                s.role == Role::Owner
                    && (!dead.contains(i) || s.valid_until.is_some_and(|v| v > now))
            })
            .map(|(i, _)| *i)
            .collect();
        assert!(owners.len() <= 1, "two owners at once: {owners:?}");
    }

    fn role(&self, id: usize) -> Option<Role> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(i, _, _)| *i == id)
            .map(|(_, _, s)| s.role)
    }

    /// When `id` last reported `role` (first report of that run of statuses).
    fn became(&self, id: usize, role: Role) -> Option<Instant> {
        let log = self.0.lock().unwrap();
        let mut at = None;
        let mut previous = None;
        for (i, t, s) in log.iter().filter(|(i, _, _)| *i == id) {
            let _ = i;
            if s.role == role && previous != Some(role) {
                at = Some(*t);
            }
            previous = Some(s.role);
        }
        at
    }

    fn acquisitions(&self, id: usize) -> Vec<Acquired> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _, _)| *i == id)
            .filter_map(|(_, _, s)| s.acquired.clone())
            .collect()
    }

    fn last(&self, id: usize) -> Option<Status> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(i, _, _)| *i == id)
            .map(|(_, _, s)| s.clone())
    }
}

struct Running {
    stop: watch::Sender<bool>,
    candidacy: watch::Sender<Candidacy>,
    task: tokio::task::JoinHandle<()>,
}

fn start(store: &MemStore, log: &Log, id: usize, candidate: bool, fencing: Fencing) -> Running {
    let address: IpAddr = ADDR.parse().unwrap();
    let name = super::super::config::lease_name(address);
    let elector = Elector::new(
        ElectorConfig {
            address,
            identity: identity(id),
            timing: Timing::default(),
            fencing,
        },
        store.client(id),
    );
    let (stop, stop_rx) = watch::channel(false);
    let (candidacy, candidacy_rx) = watch::channel(Candidacy {
        candidate,
        address: Some(node_ip(id)),
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<Status>();
    let observations = store.watch(id, &name);
    let log2 = log.clone();
    tokio::spawn(async move {
        while let Some(mut status) = rx.recv().await {
            let handoff = status.handoff.take();
            log2.push(id, status);
            // As the controller does once the address is off the uplink.
            drop(handoff);
        }
    });
    let task = tokio::spawn(elector.run(observations, candidacy_rx, stop_rx, tx));
    Running {
        stop,
        candidacy,
        task,
    }
}

fn lease() -> String {
    super::super::config::lease_name(ADDR.parse().unwrap())
}

async fn settle(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

#[tokio::test(start_paused = true)]
async fn the_first_candidate_takes_a_free_address_and_keeps_renewing() {
    let store = MemStore::default();
    let log = Log::default();
    let _a = start(&store, &log, 0, true, Fencing::Fence);
    let _follower = start(&store, &log, 2, false, Fencing::Fence);
    settle(1).await;
    assert_eq!(log.role(0), Some(Role::Owner));
    assert_eq!(
        log.acquisitions(0),
        vec![Acquired {
            previous: None,
            expired: false,
            transitions: 0
        }]
    );
    let record = store.record(&lease()).unwrap();
    assert_eq!(record.holder.as_deref(), Some("node-a"));
    assert_eq!(record.owner_address, Some(node_ip(0)));
    assert_eq!(record.duration_secs, 5);
    // The non-candidate knows the owner and its tunnel address, and never writes.
    let seen = log.last(2).unwrap();
    assert_eq!(seen.role, Role::Follower);
    assert_eq!(
        seen.holder,
        Some(Holder {
            node: "node-a".into(),
            address: Some(node_ip(0))
        })
    );
    let writes = store.writes();
    settle(30).await;
    assert_eq!(log.role(0), Some(Role::Owner));
    let renewals = store.writes() - writes;
    assert!(
        (29..=31).contains(&renewals),
        "one renewal a second: {renewals} in 30 s"
    );
    // Every renewal moves the owner's deadline on, so the uplink address's lifetime does too.
    let status = log.last(0).unwrap();
    let valid_until = status.valid_until.unwrap();
    assert!(valid_until > Instant::now() + Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_dead_owner_is_replaced_one_lease_after_its_last_renewal() {
    let store = MemStore::default();
    let log = Log::default();
    let a = start(&store, &log, 0, true, Fencing::Fence);
    settle(1).await;
    let _b = start(&store, &log, 1, true, Fencing::Fence);
    settle(10).await;
    assert_eq!(log.role(0), Some(Role::Owner));
    assert_eq!(log.role(1), Some(Role::Follower));
    // The agent dies: no release, no more renewals.
    a.task.abort();
    log.killed(0);
    let last_renewal = store.last_write();
    settle(10).await;
    let took = log.became(1, Role::Owner).expect("B took over");
    let after = took - last_renewal;
    // B saw the last renewal at most a round trip after it was written, and looks once a second.
    assert!(
        after >= Duration::from_secs(5) && after <= Duration::from_millis(6100),
        "took over {after:?} after the last renewal"
    );
    assert_eq!(
        log.acquisitions(1),
        vec![Acquired {
            previous: Some("node-a".into()),
            expired: true,
            transitions: 1
        }]
    );
    assert_eq!(
        store.record(&lease()).unwrap().owner_address,
        Some(node_ip(1))
    );
}

#[tokio::test(start_paused = true)]
async fn a_released_address_moves_at_once_and_its_old_owner_does_not_take_it_back() {
    let store = MemStore::default();
    let log = Log::default();
    let a = start(&store, &log, 0, true, Fencing::Fence);
    settle(1).await;
    let _b = start(&store, &log, 1, true, Fencing::Fence);
    settle(3).await;
    let stopping = Instant::now();
    a.stop.send(true).unwrap();
    a.task.await.unwrap();
    assert_eq!(log.role(0), Some(Role::Follower), "stopping gives it up");
    settle(3).await;
    let took = log.became(1, Role::Owner).unwrap();
    assert!(
        took - stopping <= Duration::from_millis(1100),
        "a released Lease is taken at the next look: {:?}",
        took - stopping
    );
    assert_eq!(
        log.acquisitions(1),
        vec![Acquired {
            previous: Some("node-a".into()),
            expired: false,
            transitions: 1
        }],
        "released, not lost; and it came from A"
    );
    // A comes back: B keeps the address (no preemption, no flapping).
    let transitions = store.record(&lease()).unwrap().transitions;
    let _a = start(&store, &log, 0, true, Fencing::Fence);
    settle(60).await;
    assert_eq!(log.role(1), Some(Role::Owner));
    assert_eq!(log.role(0), Some(Role::Follower));
    assert_eq!(store.record(&lease()).unwrap().transitions, transitions);
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_owner_fences_itself_before_another_node_takes_over() {
    let store = MemStore::default();
    let log = Log::default();
    let _a = start(&store, &log, 0, true, Fencing::Fence);
    settle(1).await;
    let _b = start(&store, &log, 1, true, Fencing::Fence);
    settle(5).await;
    store.set_down(0, true);
    let cut = Instant::now();
    settle(10).await;
    let fenced = log.became(0, Role::Fenced).expect("A fenced itself");
    let took = log.became(1, Role::Owner).expect("B took over");
    assert!(fenced < took);
    let margin = took - fenced;
    assert!(
        margin >= Duration::from_millis(1500),
        "the address was off A for {margin:?} before B could take it"
    );
    assert!(fenced - cut <= Timing::default().renew_deadline);
    // The partition heals: A sees B's Lease and stays a follower.
    store.set_down(0, false);
    settle(5).await;
    assert_eq!(log.role(0), Some(Role::Follower));
    assert_eq!(log.role(1), Some(Role::Owner));
}

#[tokio::test(start_paused = true)]
async fn an_api_outage_for_everyone_fences_the_owner_which_takes_the_address_back_after() {
    let store = MemStore::default();
    let log = Log::default();
    let _a = start(&store, &log, 0, true, Fencing::Fence);
    settle(1).await;
    let _b = start(&store, &log, 1, true, Fencing::Fence);
    settle(5).await;
    store.set_down(0, true);
    store.set_down(1, true);
    settle(20).await;
    assert_eq!(log.role(0), Some(Role::Fenced));
    assert_eq!(log.role(1), Some(Role::Follower), "nobody can take it");
    // The watches relist: B waits a whole lease from then, A renews within a second and
    // takes the address back; it never moves.
    store.set_down(0, false);
    store.set_down(1, false);
    settle(10).await;
    assert_eq!(log.role(0), Some(Role::Owner));
    assert_eq!(log.role(1), Some(Role::Follower));
    assert!(log.acquisitions(1).is_empty());
    assert_eq!(store.record(&lease()).unwrap().transitions, 0);
}

#[tokio::test(start_paused = true)]
async fn keep_mode_holds_the_address_through_an_outage_until_another_node_has_it() {
    let store = MemStore::default();
    let log = Log::lenient();
    let _a = start(&store, &log, 0, true, Fencing::Keep);
    settle(1).await;
    let _c = start(&store, &log, 2, false, Fencing::Keep);
    settle(2).await;
    store.set_down(0, true);
    settle(30).await;
    assert_eq!(log.role(0), Some(Role::Owner), "never fenced");
    store.set_down(0, false);
    settle(3).await;
    assert_eq!(log.role(0), Some(Role::Owner), "renewed its own Lease");
    assert_eq!(log.acquisitions(0).len(), 1, "no move");
    // A partition of the owner alone: another candidate takes the address and the cut-off owner
    // keeps it too until it hears (keep mode's cost), then follows.
    let _b = start(&store, &log, 1, true, Fencing::Keep);
    settle(2).await;
    store.set_down(0, true);
    settle(10).await;
    assert_eq!(log.role(1), Some(Role::Owner));
    assert_eq!(
        log.role(0),
        Some(Role::Owner),
        "both own it during the partition"
    );
    store.set_down(0, false);
    settle(1).await;
    assert_eq!(log.role(0), Some(Role::Follower));
    assert_eq!(log.role(1), Some(Role::Owner));
}

#[tokio::test(start_paused = true)]
async fn candidates_starting_together_elect_one() {
    let store = MemStore::default();
    let log = Log::default();
    let _all: Vec<Running> = (0..3)
        .map(|id| start(&store, &log, id, true, Fencing::Fence))
        .collect();
    settle(10).await;
    let owners: Vec<usize> = (0..3)
        .filter(|id| log.role(*id) == Some(Role::Owner))
        .collect();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(store.record(&lease()).unwrap().transitions, 0);
}

#[tokio::test(start_paused = true)]
async fn an_owner_that_stops_being_a_candidate_releases_and_a_follower_cannot_take_it() {
    let store = MemStore::default();
    let log = Log::default();
    let a = start(&store, &log, 0, true, Fencing::Fence);
    settle(1).await;
    let b = start(&store, &log, 1, false, Fencing::Fence);
    settle(2).await;
    a.candidacy
        .send(Candidacy {
            candidate: false,
            address: Some(node_ip(0)),
        })
        .unwrap();
    settle(10).await;
    assert_eq!(log.role(0), Some(Role::Follower));
    assert_eq!(store.record(&lease()).unwrap().holder, None, "released");
    assert_eq!(log.role(1), Some(Role::Follower), "B is no candidate");
    assert_eq!(log.last(1).unwrap().holder, None, "nobody owns it");
    b.candidacy
        .send(Candidacy {
            candidate: true,
            address: Some(node_ip(1)),
        })
        .unwrap();
    settle(2).await;
    assert_eq!(log.role(1), Some(Role::Owner));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_owner_takes_its_own_lease_back_at_once() {
    let store = MemStore::default();
    let log = Log::default();
    let a = start(&store, &log, 0, true, Fencing::Fence);
    let _b = start(&store, &log, 1, true, Fencing::Fence);
    settle(3).await;
    let owner = (0..2).find(|i| log.role(*i) == Some(Role::Owner)).unwrap();
    let (restarted, _keep) = if owner == 0 { (a, _b) } else { (_b, a) };
    restarted.task.abort();
    log.killed(owner);
    settle(1).await;
    let log2 = Log::default();
    let again = start(&store, &log2, owner, true, Fencing::Fence);
    settle(1).await;
    assert_eq!(log2.role(owner), Some(Role::Owner));
    assert_eq!(
        log2.acquisitions(owner),
        Vec::<Acquired>::new(),
        "a renewal, not a move"
    );
    assert_eq!(store.record(&lease()).unwrap().transitions, 0);
    drop(again);
}

/// Stops an owner whose statuses' consumer keeps the handoff for `hold`; returns how long after
/// the handoff the Lease was released.
async fn release_after_handoff_held_for(hold: Duration) -> Duration {
    let store = MemStore::default();
    let elector = Elector::new(
        ElectorConfig {
            address: ADDR.parse().unwrap(),
            identity: identity(0),
            timing: Timing::default(),
            fencing: Fencing::Fence,
        },
        store.client(0),
    );
    let (stop, stop_rx) = watch::channel(false);
    let (_candidacy, candidacy_rx) = watch::channel(Candidacy {
        candidate: true,
        address: Some(node_ip(0)),
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(elector.run(store.watch(0, &lease()), candidacy_rx, stop_rx, tx));
    settle(2).await;
    let mut last = None;
    while let Ok(s) = rx.try_recv() {
        last = Some(s);
    }
    assert_eq!(last.map(|s| s.role), Some(Role::Owner));
    stop.send(true).unwrap();
    let handing_off = rx.recv().await.unwrap();
    let handed_off_at = Instant::now();
    assert_eq!(handing_off.role, Role::Fenced, "off the uplink first");
    assert!(handing_off.handoff.is_some());
    assert_eq!(
        store.record(&lease()).unwrap().holder.as_deref(),
        Some("node-a"),
        "not released while the address may still be on the uplink"
    );
    let consumer = tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        drop(handing_off);
    });
    let last = rx.recv().await.unwrap();
    assert_eq!((last.role, last.holder), (Role::Follower, None));
    assert_eq!(store.record(&lease()).unwrap().holder, None, "released");
    task.await.unwrap();
    consumer.abort();
    store.last_write() - handed_off_at
}

/// The next owner may take a released Lease at once: the address must be off this node's uplink
/// before the release, not after.
#[tokio::test(start_paused = true)]
async fn a_stopping_owner_releases_only_once_the_address_is_off_the_uplink() {
    let round_trip = Duration::from_millis(5);
    let hold = Duration::from_millis(300);
    assert_eq!(
        release_after_handoff_held_for(hold).await,
        hold + round_trip,
        "released as soon as the controller dropped the handoff"
    );
    let renew_interval = Timing::default().renew_interval;
    assert_eq!(
        release_after_handoff_held_for(Duration::from_secs(60)).await,
        renew_interval + round_trip,
        "a consumer that keeps the handoff delays the release by the renew interval at most"
    );
}
