//! The election of one cluster egress address's owner: a Lease per address, taken and renewed as
//! client-go's leaderelection does, over any [`LeaseStore`] (the API server, or memory in tests).
//!
//! **Whose clock.** Nothing here compares a time written by another node with this node's clock.
//! A candidate notes, on its own monotonic clock, when it saw the Lease change (any write changes
//! its version); the Lease is expired for it once it has stayed unchanged for
//! `leaseDurationSeconds` since. renewTime and acquireTime are written for people to read.
//!
//! **Why the holder is never contradicted.** A write succeeds only against the version it read,
//! so a candidate takes over only the very renewal it watched age: at the earliest a lease
//! duration after the API server stored it, which is after the holder *sent* it. The holder
//! fences itself [`Timing::renew_deadline`] after sending its last successful renewal (two thirds
//! of the lease), so on the candidates' own clocks the address is gone a third of a lease before
//! anyone may take it. Only clock *rates* matter, and they differ by parts per million.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::config::{Fencing, Timing};

/// A Lease as the elector reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The holder's identity (its node name); None when released.
    pub holder: Option<String>,
    /// The holder's node address, where the other nodes tunnel the address's flows.
    pub owner_address: Option<Ipv4Addr>,
    pub duration_secs: u32,
    pub transitions: i32,
    pub acquire_time: Option<Timestamp>,
    pub renew_time: Option<Timestamp>,
    /// The store's version of the object (Kubernetes: resourceVersion): a write names the version
    /// it replaces and fails if another writer came first.
    pub version: String,
}

/// What is written: the record's fields but the version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseWrite {
    pub holder: Option<String>,
    pub owner_address: Option<Ipv4Addr>,
    pub duration_secs: u32,
    pub transitions: i32,
    pub acquire_time: Option<Timestamp>,
    pub renew_time: Option<Timestamp>,
}

/// What the watch says about one address's Lease.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Observation {
    /// The initial list has not arrived: nothing is known, nothing may be created.
    #[default]
    Unknown,
    Absent,
    Present(LeaseRecord),
}

/// What the watch hands an elector: the Lease, and which list of the watch it came with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watched {
    pub observation: Observation,
    /// Counts the watch's complete lists. A Lease listed again unchanged after the watch was
    /// broken has been unobserved meanwhile: the wait for its expiry starts over, so after an API
    /// server outage the holder (renewing again within a second) keeps its address instead of
    /// losing it to a candidate whose clock ran on through the outage.
    pub listing: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// Another writer came first (409: AlreadyExists on create, Conflict on update).
    #[error("another writer came first")]
    Conflict,
    #[error("{0}")]
    Other(String),
}

/// Where Leases live. `address` is passed for stores that label the object with it.
pub trait LeaseStore: Send + Sync + 'static {
    fn get(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<LeaseRecord>, StoreError>> + Send;
    fn create(
        &self,
        name: &str,
        address: IpAddr,
        write: &LeaseWrite,
    ) -> impl Future<Output = Result<LeaseRecord, StoreError>> + Send;
    fn replace(
        &self,
        name: &str,
        address: IpAddr,
        version: &str,
        write: &LeaseWrite,
    ) -> impl Future<Output = Result<LeaseRecord, StoreError>> + Send;
}

/// Whether this node may own addresses now, and where it can be reached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidacy {
    /// Kubernetes mode: the Node is labelled `extproxy.io/egress-gateway=true`.
    pub candidate: bool,
    /// This node's tunnel address; a node nobody can tunnel to cannot own an address.
    pub address: Option<Ipv4Addr>,
}

impl Candidacy {
    fn eligible(&self) -> Option<Ipv4Addr> {
        self.address.filter(|_| self.candidate)
    }
}

/// The owner of an address as a node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub node: String,
    pub address: Option<Ipv4Addr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Another node owns the address, or nobody.
    Follower,
    /// This node holds the Lease: the address is on its uplink.
    Owner,
    /// This node holds the Lease as far as it knows but could not renew it in time: the address
    /// is off its uplink; flows whose packets still reach it are served.
    Fenced,
}

/// How an address came to this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acquired {
    /// The holder before (None: nobody, a new or released Lease).
    pub previous: Option<String>,
    /// The previous holder stopped renewing (it did not release the Lease).
    pub expired: bool,
    pub transitions: i32,
}

/// Rides on the status of an address this node gives up on purpose (graceful stop, no longer a
/// candidate). The Lease is released only once every copy is dropped, which the controller does
/// once the address is off the uplink: the next owner, which may take it a moment after the
/// release, never finds it still here. Bounded by the renew interval, so a consumer that keeps
/// it delays the release but cannot prevent it.
#[derive(Clone, Debug)]
pub struct Handoff(#[allow(dead_code)] Arc<oneshot::Sender<()>>);

/// Any two are alike: a status is compared by what it says, not by who waits on it.
impl PartialEq for Handoff {
    fn eq(&self, _: &Handoff) -> bool {
        true
    }
}

impl Eq for Handoff {}

/// One address's state, sent to the controller whenever it changes and after every renewal (the
/// uplink address's lifetime follows the renewals).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub address: IpAddr,
    pub lease: String,
    pub holder: Option<Holder>,
    pub role: Role,
    /// Owner: by when the address must be off the network unless renewed again (the last
    /// successful renewal's send time plus the renew deadline).
    pub valid_until: Option<Instant>,
    /// Set on the status that follows an acquisition.
    pub acquired: Option<Acquired>,
    /// Set when this node is giving the address up: drop it once the address is off the uplink.
    pub handoff: Option<Handoff>,
}

/// What the elector of one address was told at start.
#[derive(Clone, Debug)]
pub struct ElectorConfig {
    pub address: IpAddr,
    /// This node's identity in the Lease (its node name).
    pub identity: String,
    pub timing: Timing,
    pub fencing: Fencing,
}

struct Observed {
    record: LeaseRecord,
    /// When this node first saw this version, on its own clock.
    seen_at: Instant,
}

/// The elector of one address.
pub struct Elector<S> {
    config: ElectorConfig,
    name: String,
    store: S,
    known: bool,
    observed: Option<Observed>,
    /// The watch's list the last observation came with.
    listing: u64,
    /// The last holder seen, kept through a release: an acquisition names where the address
    /// came from.
    last_holder: Option<String>,
    /// Leading: when the last successful write that made or kept this node the holder was sent.
    leading: Option<Instant>,
    fenced: bool,
    last_attempt: Option<Instant>,
    /// Errors since the last success (only the first is logged at warn).
    failures: u32,
    candidacy: Candidacy,
    last_status: Option<(Option<Holder>, Role)>,
    /// A renewal succeeded since the last status was sent (the uplink address's lifetime moves
    /// on with it).
    renewed: bool,
}

/// Versions are etcd revisions in practice; when both parse, an older one is a late echo.
fn older(a: &str, b: &str) -> bool {
    matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(a), Ok(b)) if a < b)
}

impl<S: LeaseStore> Elector<S> {
    pub fn new(config: ElectorConfig, store: S) -> Self {
        Elector {
            name: super::config::lease_name(config.address),
            config,
            store,
            known: false,
            observed: None,
            listing: 0,
            last_holder: None,
            leading: None,
            fenced: false,
            last_attempt: None,
            failures: 0,
            candidacy: Candidacy::default(),
            last_status: None,
            renewed: false,
        }
    }

    /// Runs until `stop` turns true (or its sender goes away): then releases the Lease if held.
    pub async fn run(
        mut self,
        mut observations: watch::Receiver<Watched>,
        mut candidacy: watch::Receiver<Candidacy>,
        mut stop: watch::Receiver<bool>,
        updates: mpsc::UnboundedSender<Status>,
    ) {
        self.candidacy = candidacy.borrow_and_update().clone();
        let first = observations.borrow_and_update().clone();
        self.observe(first.observation, first.listing, Instant::now());
        loop {
            if *stop.borrow() {
                break;
            }
            let wake = self.next_wake(Instant::now());
            tokio::select! {
                biased;
                changed = stop.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    continue;
                }
                changed = observations.changed() => {
                    if changed.is_ok() {
                        let w = observations.borrow_and_update().clone();
                        self.observe(w.observation, w.listing, Instant::now());
                    }
                }
                changed = candidacy.changed() => {
                    if changed.is_ok() {
                        self.candidacy = candidacy.borrow_and_update().clone();
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
            let acquired = self.act(&updates).await;
            self.publish(&updates, acquired, false);
        }
        if self.leading.is_some() {
            self.hand_off(&updates).await;
            self.release().await;
        }
        self.publish(&updates, None, true);
    }

    /// Takes in what the watch (or a read) says.
    fn observe(&mut self, observation: Observation, listing: u64, now: Instant) {
        let relisted = listing > self.listing;
        self.listing = self.listing.max(listing);
        match observation {
            Observation::Unknown => {}
            Observation::Absent => {
                self.known = true;
                self.observed = None;
                if self.leading.take().is_some() {
                    tracing::warn!(
                        "cluster egress {}: Lease {} was deleted; giving the address up",
                        self.config.address,
                        self.name
                    );
                }
            }
            Observation::Present(record) => {
                self.known = true;
                if let Some(o) = &mut self.observed {
                    if o.record.version == record.version {
                        if relisted {
                            o.seen_at = now;
                        }
                        return;
                    }
                    if older(&record.version, &o.record.version) {
                        return;
                    }
                }
                let mine = record.holder.as_deref() == Some(&self.config.identity);
                if self.leading.is_some() && !mine {
                    tracing::warn!(
                        "cluster egress {}: {} holds Lease {} now; this node no longer owns the \
                         address",
                        self.config.address,
                        record.holder.as_deref().unwrap_or("nobody"),
                        self.name
                    );
                    self.leading = None;
                    self.fenced = false;
                }
                if let Some(h) = record.holder.as_ref().filter(|h| !h.is_empty()) {
                    self.last_holder = Some(h.clone());
                }
                self.observed = Some(Observed {
                    record,
                    seen_at: now,
                });
            }
        }
    }

    fn expiry(&self, o: &Observed) -> Instant {
        let secs = if o.record.duration_secs == 0 {
            self.config.timing.lease.as_secs()
        } else {
            u64::from(o.record.duration_secs)
        };
        o.seen_at + Duration::from_secs(secs)
    }

    /// The Lease may be written by this node now: it is free, ours, or expired as seen here.
    fn takeable(&self, now: Instant) -> bool {
        match &self.observed {
            None => true,
            Some(o) => match o.record.holder.as_deref() {
                None | Some("") => true,
                Some(h) if h == self.config.identity => true,
                Some(_) => now >= self.expiry(o),
            },
        }
    }

    fn holds_record(&self) -> bool {
        self.observed
            .as_ref()
            .is_some_and(|o| o.record.holder.as_deref() == Some(&self.config.identity))
    }

    fn next_attempt(&self, now: Instant) -> Instant {
        self.last_attempt
            .map_or(now, |t| t + self.config.timing.renew_interval)
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let far = now + Duration::from_secs(3600);
        if let Some(sent) = self.leading {
            let mut wake = self.next_attempt(now);
            if !self.fenced && self.config.fencing == Fencing::Fence {
                wake = wake.min(sent + self.config.timing.renew_deadline);
            }
            return wake;
        }
        if !self.known {
            return far;
        }
        if self.candidacy.eligible().is_none() {
            // A holder that stopped being a candidate gives the Lease back.
            return if self.holds_record() {
                self.next_attempt(now)
            } else {
                far
            };
        }
        let attempt = self.next_attempt(now);
        match &self.observed {
            Some(o) if !self.takeable(now) => self.expiry(o).max(attempt),
            _ => attempt,
        }
    }

    /// Does whatever is due now. Returns how the address was acquired, if it was.
    async fn act(&mut self, updates: &mpsc::UnboundedSender<Status>) -> Option<Acquired> {
        let now = Instant::now();
        if let Some(sent) = self.leading
            && self.config.fencing == Fencing::Fence
            && !self.fenced
            && now >= sent + self.config.timing.renew_deadline
        {
            self.fenced = true;
            tracing::warn!(
                "cluster egress {}: Lease {} not renewed for {:.1} s; giving the address up \
                 before another node may take it (--cluster-egress-fencing fence)",
                self.config.address,
                self.name,
                (now - sent).as_secs_f64()
            );
        }
        if now < self.next_attempt(now) || !self.known {
            return None;
        }
        let Some(own_address) = self.candidacy.eligible() else {
            if self.holds_record() {
                self.last_attempt = Some(now);
                tracing::info!(
                    "cluster egress {}: this node is no longer a gateway candidate; releasing \
                     Lease {}",
                    self.config.address,
                    self.name
                );
                self.hand_off(updates).await;
                self.release().await;
            }
            return None;
        };
        if self.leading.is_none() && !self.takeable(now) {
            return None;
        }
        self.last_attempt = Some(now);
        self.write(now, own_address).await
    }

    /// Creates, takes or renews the Lease.
    async fn write(&mut self, sent: Instant, own_address: Ipv4Addr) -> Option<Acquired> {
        let wall = Timestamp::now();
        let previous = self.observed.as_ref().map(|o| &o.record);
        let previous_holder = previous
            .and_then(|r| r.holder.clone())
            .filter(|h| !h.is_empty());
        let renewing = self.leading.is_some()
            || previous_holder.as_deref() == Some(self.config.identity.as_str());
        let write = LeaseWrite {
            holder: Some(self.config.identity.clone()),
            owner_address: Some(own_address),
            duration_secs: self.config.timing.lease.as_secs() as u32,
            transitions: match previous {
                None => 0,
                Some(r) if renewing => r.transitions,
                Some(r) => r.transitions.saturating_add(1),
            },
            acquire_time: match previous {
                Some(r) if renewing => r.acquire_time.or(Some(wall)),
                _ => Some(wall),
            },
            renew_time: Some(wall),
        };
        // A renewal may take no longer than the time left before fencing. Any request may take
        // up to the renew deadline, not just the renew interval: one cut short is sent again from
        // scratch (a new connection and TLS handshake), so a slow API server (loaded, or just
        // restarted) answering in more than the interval would never be heard at all.
        let deadline = match self.leading {
            Some(leading) if self.config.fencing == Fencing::Fence && !self.fenced => {
                leading + self.config.timing.renew_deadline
            }
            _ => sent + self.config.timing.renew_deadline,
        };
        let address = self.config.address;
        let request = async {
            match previous {
                None => self.store.create(&self.name, address, &write).await,
                Some(r) => {
                    self.store
                        .replace(&self.name, address, &r.version, &write)
                        .await
                }
            }
        };
        let result = match tokio::time::timeout_at(deadline.max(sent), request).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Other(format!(
                "no answer within {:.1} s",
                (deadline.max(sent) - sent).as_secs_f64()
            ))),
        };
        match result {
            Ok(record) => {
                let was_leading = self.leading.is_some();
                let expired = previous_holder.is_some() && !renewing;
                if self.failures > 0 {
                    tracing::info!(
                        "cluster egress {}: Lease {} written again after {} failed attempt(s)",
                        address,
                        self.name,
                        self.failures
                    );
                }
                self.failures = 0;
                self.leading = Some(sent);
                self.renewed = true;
                if self.fenced {
                    tracing::info!(
                        "cluster egress {address}: Lease {} renewed; taking the address back",
                        self.name
                    );
                    self.fenced = false;
                }
                let transitions = record.transitions;
                self.observed = Some(Observed {
                    record,
                    seen_at: Instant::now(),
                });
                if was_leading || renewing {
                    if !was_leading {
                        tracing::info!(
                            "cluster egress {address}: this node holds Lease {} again",
                            self.name
                        );
                    }
                    return None;
                }
                // A released Lease names no holder: the one before is where it came from.
                let previous = previous_holder
                    .or_else(|| self.last_holder.clone())
                    .filter(|h| *h != self.config.identity);
                self.last_holder = Some(self.config.identity.clone());
                Some(Acquired {
                    previous,
                    expired,
                    transitions,
                })
            }
            Err(StoreError::Conflict) => {
                tracing::debug!(
                    "cluster egress {address}: Lease {} changed under this node's write; reading it",
                    self.name
                );
                self.refresh().await;
                None
            }
            Err(StoreError::Other(err)) => {
                self.failures += 1;
                if self.failures == 1 {
                    tracing::warn!(
                        "cluster egress {address}: writing Lease {}: {err}; retrying every {:.1} s",
                        self.name,
                        self.config.timing.renew_interval.as_secs_f64()
                    );
                } else {
                    tracing::debug!(
                        "cluster egress {address}: writing Lease {}: {err}",
                        self.name
                    );
                }
                None
            }
        }
    }

    /// Reads the Lease after a conflict: the watch may not have delivered the winner's write yet.
    async fn refresh(&mut self) {
        let deadline = Instant::now() + self.config.timing.renew_interval;
        match tokio::time::timeout_at(deadline, self.store.get(&self.name)).await {
            Ok(Ok(Some(record))) => {
                self.observe(Observation::Present(record), self.listing, Instant::now())
            }
            Ok(Ok(None)) => self.observe(Observation::Absent, self.listing, Instant::now()),
            Ok(Err(err)) => tracing::debug!("reading Lease {}: {err}", self.name),
            Err(_) => tracing::debug!("reading Lease {}: no answer", self.name),
        }
    }

    /// Before a release: the address leaves the uplink first (the status turns Fenced, which the
    /// controller acts on), then the Lease may go to the next candidate.
    async fn hand_off(&mut self, updates: &mpsc::UnboundedSender<Status>) {
        if self.leading.is_none() || self.fenced {
            // Not on the uplink: nothing to wait for.
            return;
        }
        self.fenced = true;
        let (done, taken_off) = oneshot::channel();
        self.send(updates, None, false, Some(Handoff(Arc::new(done))));
        // Resolves (as an error) when the last copy of the handoff is dropped.
        let _ = tokio::time::timeout(self.config.timing.renew_interval, taken_off).await;
    }

    /// Gives the Lease back (graceful stop, or no longer a candidate): the next candidate takes it
    /// at once instead of waiting for it to expire.
    async fn release(&mut self) {
        self.leading = None;
        self.fenced = false;
        let Some(record) = self.observed.as_ref().map(|o| o.record.clone()) else {
            return;
        };
        if record.holder.as_deref() != Some(&self.config.identity) {
            return;
        }
        let write = LeaseWrite {
            holder: None,
            owner_address: None,
            // As client-go releases: a short lease, in case a reader honours it.
            duration_secs: 1,
            transitions: record.transitions,
            acquire_time: record.acquire_time,
            renew_time: Some(Timestamp::now()),
        };
        let deadline = Instant::now() + self.config.timing.renew_interval;
        let request = self
            .store
            .replace(&self.name, self.config.address, &record.version, &write);
        match tokio::time::timeout_at(deadline, request).await {
            Ok(Ok(record)) => {
                tracing::info!(
                    "cluster egress {}: released Lease {}",
                    self.config.address,
                    self.name
                );
                self.observed = Some(Observed {
                    record,
                    seen_at: Instant::now(),
                });
            }
            Ok(Err(err)) => tracing::warn!(
                "cluster egress {}: releasing Lease {}: {err}; it expires by itself",
                self.config.address,
                self.name
            ),
            Err(_) => tracing::warn!(
                "cluster egress {}: releasing Lease {}: no answer; it expires by itself",
                self.config.address,
                self.name
            ),
        }
    }

    fn role(&self) -> Role {
        match (self.leading, self.fenced) {
            (None, _) => Role::Follower,
            (Some(_), false) => Role::Owner,
            (Some(_), true) => Role::Fenced,
        }
    }

    fn holder(&self) -> Option<Holder> {
        let record = &self.observed.as_ref()?.record;
        let node = record.holder.clone().filter(|h| !h.is_empty())?;
        Some(Holder {
            node,
            address: record.owner_address,
        })
    }

    /// Sends the status if it changed, after every renewal while owning, and when stopping.
    fn publish(
        &mut self,
        updates: &mpsc::UnboundedSender<Status>,
        acquired: Option<Acquired>,
        last: bool,
    ) {
        self.send(updates, acquired, last, None);
    }

    fn send(
        &mut self,
        updates: &mpsc::UnboundedSender<Status>,
        acquired: Option<Acquired>,
        last: bool,
        handoff: Option<Handoff>,
    ) {
        let holder = self.holder();
        let role = if last { Role::Follower } else { self.role() };
        let current = (holder.clone(), role);
        let renewed = std::mem::take(&mut self.renewed) && role == Role::Owner;
        if !last
            && acquired.is_none()
            && !renewed
            && handoff.is_none()
            && self.last_status.as_ref() == Some(&current)
        {
            return;
        }
        self.last_status = Some(current);
        // Keep mode has no deadline: the controller extends the address's lifetime itself.
        let valid_until = match (role, self.leading, self.config.fencing) {
            (Role::Owner, Some(sent), Fencing::Fence) => {
                Some(sent + self.config.timing.renew_deadline)
            }
            _ => None,
        };
        let _ = updates.send(Status {
            address: self.config.address,
            lease: self.name.clone(),
            holder,
            role,
            valid_until,
            acquired,
            handoff,
        });
    }
}

#[cfg(test)]
mod tests;
