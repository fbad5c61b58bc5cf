//! The resolver's memory: per name and IP family, the addresses of the last good answer, those
//! draining, when to ask again and what to do when asking fails. Pure: time comes in as an
//! argument and lookups happen elsewhere ([`super::Dns`]), so every rule here is tested with a
//! made-up clock.
//!
//! The rules:
//! - An answer replaces the served addresses as a diff: an address that stays is untouched (its
//!   flows go on), a new one serves, one that left drains (no new flows; established ones go
//!   on) for [`Timing::drain_for`], then goes.
//! - The next lookup is due when the answer's TTL ends, clamped to [`Timing::min_ttl`],
//!   [`Timing::max_ttl`]. Negative answers (NXDOMAIN, no data) are asked again after their SOA's
//!   negative TTL, the same way clamped, or [`NEGATIVE_TTL_WITHOUT_SOA`].
//! - A failed lookup (timeout, SERVFAIL, REFUSED, no server) keeps the last good answer serving
//!   (stale-if-error, RFC 8767) until [`Timing::stale_for`] after the answer's TTL ended; then its
//!   addresses drain. Failed lookups are retried after 1, 2, 4, ... seconds, at most
//!   [`FAILURE_RECHECK`] apart (RFC 8767's "failure recheck timer").
//! - NXDOMAIN is believed once a lookup [`Timing::nxdomain_for`] after the first NXDOMAIN still
//!   says so; until then the last good addresses keep serving. Then they drain. A name that never
//!   had an address is NXDOMAIN at once.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::view::{Condition, Failure, FamilyAnswer, NameAnswer, Resolved, Wanted};
use crate::translate::IpFamily;

/// Asked again this long after a negative answer without an SOA record (no negative TTL).
pub const NEGATIVE_TTL_WITHOUT_SOA: Duration = Duration::from_secs(30);
/// Failed lookups are retried at most this far apart (RFC 8767 suggests 30 s).
pub const FAILURE_RECHECK: Duration = Duration::from_secs(30);

/// The bounds the agent's flags set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// How long past its TTL a last good answer keeps serving while lookups fail.
    pub stale_for: Duration,
    /// How long an address that left the answer keeps its established flows.
    pub drain_for: Duration,
    /// How long NXDOMAIN must last before it is believed.
    pub nxdomain_for: Duration,
}

impl Timing {
    fn clamp(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min_ttl, self.max_ttl.max(self.min_ttl))
    }
}

/// What one lookup said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Addresses, and the smallest TTL of the records that led to them (CNAMEs included).
    Answer {
        addrs: Vec<IpAddr>,
        ttl: Duration,
    },
    /// The name exists, no record of this family.
    NoData {
        negative_ttl: Option<Duration>,
    },
    /// The name does not exist.
    NxDomain {
        negative_ttl: Option<Duration>,
    },
    Failed(Failure),
}

impl Outcome {
    /// The label of `extproxy_dns_lookups_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Outcome::Answer { .. } => "answer",
            Outcome::NoData { .. } => "nodata",
            Outcome::NxDomain { .. } => "nxdomain",
            Outcome::Failed(_) => "error",
        }
    }
}

pub const LOOKUP_RESULTS: [&str; 4] = ["answer", "nodata", "nxdomain", "error"];

/// One name in one family.
#[derive(Clone, Debug)]
pub struct Record {
    /// Address -> when it left the answer (None: serving).
    addrs: BTreeMap<IpAddr, Option<Instant>>,
    condition: Condition,
    next_query: Instant,
    in_flight: bool,
    /// The TTL of the last good answer, and when it ends.
    ttl: Option<Duration>,
    expires: Option<Instant>,
    /// Consecutive failed lookups, and since when.
    failures: u32,
    failing_since: Option<Instant>,
    /// The first NXDOMAIN of the current run of them.
    nx_since: Option<Instant>,
    /// When the last answer (of any kind but a failure) came.
    answered_at: Option<Instant>,
    /// Lookups by result ([`LOOKUP_RESULTS`] order).
    pub lookups: [u64; 4],
}

impl Record {
    fn new(now: Instant) -> Self {
        Record {
            addrs: BTreeMap::new(),
            condition: Condition::Pending,
            next_query: now,
            in_flight: false,
            ttl: None,
            expires: None,
            failures: 0,
            failing_since: None,
            nx_since: None,
            answered_at: None,
            lookups: [0; 4],
        }
    }

    pub fn condition(&self) -> Condition {
        self.condition
    }

    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    pub fn next_query(&self) -> Instant {
        self.next_query
    }

    pub fn answered_at(&self) -> Option<Instant> {
        self.answered_at
    }

    pub fn failing_since(&self) -> Option<Instant> {
        self.failing_since
    }

    /// Serving addresses.
    pub fn serving(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addrs
            .iter()
            .filter(|(_, dropped)| dropped.is_none())
            .map(|(a, _)| *a)
    }

    /// Draining addresses and when each left the answer.
    pub fn draining(&self) -> impl Iterator<Item = (IpAddr, Instant)> + '_ {
        self.addrs.iter().filter_map(|(a, d)| Some((*a, (*d)?)))
    }

    fn answer(&self) -> FamilyAnswer {
        FamilyAnswer {
            serving: self.serving().collect(),
            draining: self.draining().map(|(a, _)| a).collect(),
            condition: self.condition,
        }
    }

    /// Every serving address starts draining now.
    fn drain_all(&mut self, now: Instant) {
        for dropped in self.addrs.values_mut() {
            dropped.get_or_insert(now);
        }
    }

    fn has_serving(&self) -> bool {
        self.addrs.values().any(Option::is_none)
    }

    fn record(&mut self, outcome: &Outcome, now: Instant, timing: &Timing) {
        self.in_flight = false;
        self.lookups[LOOKUP_RESULTS
            .iter()
            .position(|r| *r == outcome.result())
            .unwrap_or(3)] += 1;
        let negative =
            |ttl: &Option<Duration>| timing.clamp(ttl.unwrap_or(NEGATIVE_TTL_WITHOUT_SOA));
        if !matches!(outcome, Outcome::Failed(_)) {
            self.failures = 0;
            self.failing_since = None;
            self.answered_at = Some(now);
        }
        if !matches!(outcome, Outcome::NxDomain { .. }) {
            self.nx_since = None;
        }
        match outcome {
            Outcome::Answer { addrs, ttl } => {
                for dropped in self.addrs.values_mut() {
                    dropped.get_or_insert(now);
                }
                for a in addrs {
                    self.addrs.insert(*a, None);
                }
                self.condition = Condition::Fresh;
                self.ttl = Some(*ttl);
                self.expires = Some(now + *ttl);
                self.next_query = now + timing.clamp(*ttl);
            }
            Outcome::NoData { negative_ttl } => {
                self.drain_all(now);
                self.condition = Condition::NoData;
                self.ttl = *negative_ttl;
                self.expires = Some(now + negative(negative_ttl));
                self.next_query = now + negative(negative_ttl);
            }
            Outcome::NxDomain { negative_ttl } => {
                let since = *self.nx_since.get_or_insert(now);
                let confirm_at = since + timing.nxdomain_for;
                if !self.has_serving() || now >= confirm_at {
                    self.drain_all(now);
                    self.condition = Condition::NxDomain;
                    self.ttl = *negative_ttl;
                    self.expires = Some(now + negative(negative_ttl));
                    self.next_query = now + negative(negative_ttl);
                } else {
                    // Kept serving until a second lookup at the end of the window says so too.
                    self.condition = Condition::NxDomainUnconfirmed;
                    self.next_query = confirm_at.max(now + timing.min_ttl);
                }
            }
            Outcome::Failed(failure) => {
                self.failures = self.failures.saturating_add(1);
                self.failing_since.get_or_insert(now);
                let backoff = Duration::from_secs(1u64 << (self.failures - 1).min(5));
                self.next_query = now + backoff.min(FAILURE_RECHECK);
                self.condition = match self.condition {
                    Condition::Pending | Condition::Failed(_) => Condition::Failed(*failure),
                    Condition::Expired(_) => Condition::Expired(*failure),
                    _ => Condition::Stale(*failure),
                };
                self.expire_stale(now, timing);
            }
        }
    }

    /// A stale answer past its bound stops serving.
    fn expire_stale(&mut self, now: Instant, timing: &Timing) {
        let Condition::Stale(failure) = self.condition else {
            return;
        };
        let since = self.expires.or(self.failing_since).unwrap_or(now);
        if now >= since + timing.stale_for {
            self.drain_all(now);
            self.condition = Condition::Expired(failure);
        }
    }

    /// Time-driven changes: stale answers expiring, drained addresses going.
    fn tick(&mut self, now: Instant, timing: &Timing) {
        self.expire_stale(now, timing);
        self.addrs
            .retain(|_, dropped| dropped.is_none_or(|d| now < d + timing.drain_for));
    }

    fn deadline(&self, timing: &Timing) -> Option<Instant> {
        let mut next = (!self.in_flight).then_some(self.next_query);
        let mut earliest = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Condition::Stale(_) = self.condition {
            earliest(
                self.expires
                    .or(self.failing_since)
                    .unwrap_or(self.next_query)
                    + timing.stale_for,
            );
        }
        for (_, dropped) in self.draining() {
            earliest(dropped + timing.drain_for);
        }
        next
    }
}

/// What a previous agent served for a name and family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub serving: Vec<IpAddr>,
    /// Draining addresses and since when.
    pub draining: Vec<(IpAddr, Instant)>,
    pub ttl: Option<Duration>,
    pub answered_at: Option<Instant>,
    /// When its answer's TTL ended (or ends).
    pub expires: Option<Instant>,
}

/// Every name and family some Service wants.
#[derive(Debug)]
pub struct Cache {
    timing: Timing,
    records: BTreeMap<(Arc<str>, IpFamily), Record>,
}

impl Cache {
    pub fn new(timing: Timing) -> Self {
        Cache {
            timing,
            records: BTreeMap::new(),
        }
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// Looks up `wanted` from now on: new names and families are due at once; names no Service
    /// wants any more are forgotten (their Services are gone, and so are their endpoints).
    pub fn want(&mut self, wanted: &Wanted, now: Instant) {
        self.records
            .retain(|(name, family), _| wanted.get(name).is_some_and(|f| f.contains(family)));
        for (name, families) in wanted {
            for family in families {
                self.records
                    .entry((name.clone(), *family))
                    .or_insert_with(|| Record::new(now));
            }
        }
    }

    /// Seeds a record just wanted with what a previous agent served (its state file), so that a
    /// restart while the resolver is down serves the names as before instead of emptying their
    /// Services. The record's first lookup is still due at once; until it answers, the restored
    /// answer counts as the last good one (stale-if-error from its TTL's end).
    pub fn restore(&mut self, name: &str, family: IpFamily, restored: &Restored) {
        let Some(record) = self.records.get_mut(&(Arc::from(name), family)) else {
            return;
        };
        if record.condition != Condition::Pending {
            return;
        }
        for a in &restored.serving {
            record.addrs.insert(*a, None);
        }
        for (a, since) in &restored.draining {
            record.addrs.entry(*a).or_insert(Some(*since));
        }
        record.condition = Condition::Fresh;
        record.ttl = restored.ttl;
        record.expires = restored.expires;
        record.answered_at = restored.answered_at;
    }

    /// The lookups due at `now`, marked as under way.
    pub fn due(&mut self, now: Instant) -> Vec<(Arc<str>, IpFamily)> {
        let mut due = Vec::new();
        for ((name, family), record) in &mut self.records {
            if !record.in_flight && record.next_query <= now {
                record.in_flight = true;
                due.push((name.clone(), *family));
            }
        }
        due
    }

    /// A lookup's outcome. Outcomes for names no longer wanted are dropped.
    pub fn record(&mut self, name: &str, family: IpFamily, outcome: &Outcome, now: Instant) {
        if let Some(record) = self.records.get_mut(&(Arc::from(name), family)) {
            record.record(outcome, now, &self.timing);
            record.tick(now, &self.timing);
        }
    }

    /// Applies what time alone changes: stale answers expiring, drained addresses going.
    pub fn tick(&mut self, now: Instant) {
        for record in self.records.values_mut() {
            record.tick(now, &self.timing);
        }
    }

    /// When something is next due: a lookup, an expiry or the end of a drain.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.records
            .values()
            .filter_map(|r| r.deadline(&self.timing))
            .min()
    }

    /// Every wanted record has had its first outcome.
    pub fn settled(&self) -> bool {
        self.records
            .values()
            .all(|r| r.condition != Condition::Pending)
    }

    pub fn records(&self) -> impl Iterator<Item = (&(Arc<str>, IpFamily), &Record)> {
        self.records.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// What the translator reads.
    pub fn view(&self) -> Resolved {
        let mut names: BTreeMap<Arc<str>, NameAnswer> = BTreeMap::new();
        for ((name, family), record) in &self.records {
            names
                .entry(name.clone())
                .or_default()
                .families
                .insert(*family, record.answer());
        }
        Resolved::new(names.into_iter().map(|(n, a)| (n, Arc::new(a))).collect())
    }

    /// Drops draining addresses that no established flow uses any more, ahead of their bound
    /// (`busy`: whether some flow goes to the address). Returns whether any went.
    pub fn forget_idle_drained(&mut self, busy: impl Fn(&IpAddr) -> bool) -> bool {
        let mut changed = false;
        for record in self.records.values_mut() {
            let before = record.addrs.len();
            record
                .addrs
                .retain(|addr, dropped| dropped.is_none() || busy(addr));
            changed |= record.addrs.len() != before;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn timing() -> Timing {
        Timing {
            min_ttl: S,
            max_ttl: 300 * S,
            stale_for: 600 * S,
            drain_for: 3600 * S,
            nxdomain_for: 10 * S,
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn answer(list: &[&str], ttl: u64) -> Outcome {
        Outcome::Answer {
            addrs: ips(list),
            ttl: Duration::from_secs(ttl),
        }
    }

    struct Fixture {
        cache: Cache,
        t0: Instant,
    }

    const NAME: &str = "db.example.com";

    impl Fixture {
        fn new(timing: Timing) -> Self {
            let t0 = Instant::now();
            let mut cache = Cache::new(timing);
            let wanted: Wanted = [(Arc::from(NAME), [IpFamily::V4].into())].into();
            cache.want(&wanted, t0);
            Fixture { cache, t0 }
        }

        fn at(&self, secs: u64) -> Instant {
            self.t0 + Duration::from_secs(secs)
        }

        /// Runs the lookup due at `secs` (asserting one is due) with `outcome`.
        fn lookup(&mut self, secs: u64, outcome: Outcome) {
            let now = self.at(secs);
            self.cache.tick(now);
            let due = self.cache.due(now);
            assert_eq!(due.len(), 1, "a lookup is due at {secs} s");
            self.cache.record(NAME, IpFamily::V4, &outcome, now);
        }

        fn answer(&self) -> FamilyAnswer {
            self.cache.view().get(NAME).unwrap().families[&IpFamily::V4].clone()
        }

        fn next_in(&self, secs: u64) -> Duration {
            self.cache.next_deadline().unwrap() - self.at(secs)
        }
    }

    #[test]
    fn a_new_name_is_due_at_once_and_pending_until_answered() {
        let mut f = Fixture::new(timing());
        assert!(!f.cache.settled());
        assert_eq!(f.answer().condition, Condition::Pending);
        f.lookup(0, answer(&["192.0.2.1"], 30));
        assert!(f.cache.settled());
        assert_eq!(f.answer().serving, ips(&["192.0.2.1"]));
        assert_eq!(f.answer().condition, Condition::Fresh);
        assert!(
            f.cache.due(f.at(29)).is_empty(),
            "not asked again within the TTL"
        );
        assert_eq!(f.next_in(0), 30 * S);
    }

    #[test]
    fn the_ttl_is_clamped() {
        let mut f = Fixture::new(timing());
        f.lookup(0, answer(&["192.0.2.1"], 0));
        assert_eq!(
            f.next_in(0),
            S,
            "a zero TTL is asked again after --dns-min-ttl"
        );
        f.lookup(1, answer(&["192.0.2.1"], 86_400));
        assert_eq!(f.next_in(1), 300 * S, "a day's TTL after --dns-max-ttl");
    }

    #[test]
    fn answers_apply_as_a_diff_and_left_addresses_drain_then_go() {
        let mut f = Fixture::new(timing());
        f.lookup(0, answer(&["192.0.2.1", "192.0.2.2"], 60));
        f.lookup(60, answer(&["192.0.2.2", "192.0.2.3"], 60));
        let a = f.answer();
        assert_eq!(a.serving, ips(&["192.0.2.2", "192.0.2.3"]));
        assert_eq!(a.draining, ips(&["192.0.2.1"]));
        // Back in the answer before its drain ended: serving again.
        f.lookup(120, answer(&["192.0.2.1", "192.0.2.2"], 60));
        let a = f.answer();
        assert_eq!(a.serving, ips(&["192.0.2.1", "192.0.2.2"]));
        assert_eq!(a.draining, ips(&["192.0.2.3"]));
        // The drain bound: gone.
        f.cache.tick(f.at(120 + 3599));
        assert_eq!(f.answer().draining, ips(&["192.0.2.3"]));
        f.cache.tick(f.at(120 + 3600));
        assert!(f.answer().draining.is_empty());
    }

    #[test]
    fn drained_addresses_without_flows_go_early() {
        let mut f = Fixture::new(timing());
        f.lookup(0, answer(&["192.0.2.1", "192.0.2.2"], 60));
        f.lookup(60, answer(&["192.0.2.3"], 60));
        let busy: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(f.cache.forget_idle_drained(|a| *a == busy));
        let a = f.answer();
        assert_eq!(a.serving, ips(&["192.0.2.3"]), "serving addresses stay");
        assert_eq!(a.draining, ips(&["192.0.2.2"]));
        assert!(!f.cache.forget_idle_drained(|a| *a == busy));
    }

    #[test]
    fn failures_serve_the_last_answer_until_the_stale_bound() {
        let mut f = Fixture::new(timing());
        f.lookup(0, answer(&["192.0.2.1"], 60));
        f.lookup(60, Outcome::Failed(Failure::Timeout));
        let a = f.answer();
        assert_eq!(a.condition, Condition::Stale(Failure::Timeout));
        assert_eq!(
            a.serving,
            ips(&["192.0.2.1"]),
            "never empty because one lookup failed"
        );
        // Retried after 1, 2, 4, ... s, at most 30 s apart.
        assert_eq!(f.next_in(60), S);
        f.lookup(61, Outcome::Failed(Failure::ServFail));
        assert_eq!(f.next_in(61), 2 * S);
        let mut t = 63;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            f.lookup(t, Outcome::Failed(Failure::Timeout));
            gaps.push(f.next_in(t).as_secs());
            t += f.next_in(t).as_secs();
        }
        assert_eq!(gaps, [4, 8, 16, 30, 30, 30, 30, 30]);
        // The answer expired at 60 s: it serves until 60 + 600 s.
        f.cache.tick(f.at(659));
        assert_eq!(f.answer().serving, ips(&["192.0.2.1"]));
        f.cache.tick(f.at(660));
        let a = f.answer();
        assert_eq!(a.condition, Condition::Expired(Failure::Timeout));
        assert!(a.serving.is_empty());
        assert_eq!(a.draining, ips(&["192.0.2.1"]), "drains, not cut off");
        // An answer brings it back.
        let due = f.cache.due(f.at(700));
        assert_eq!(due.len(), 1);
        f.cache
            .record(NAME, IpFamily::V4, &answer(&["192.0.2.1"], 60), f.at(700));
        assert_eq!(f.answer().serving, ips(&["192.0.2.1"]));
        assert_eq!(f.answer().condition, Condition::Fresh);
    }

    #[test]
    fn a_name_that_never_answered_has_no_addresses() {
        let mut f = Fixture::new(timing());
        f.lookup(0, Outcome::Failed(Failure::Unreachable));
        let a = f.answer();
        assert_eq!(a.condition, Condition::Failed(Failure::Unreachable));
        assert!(a.serving.is_empty() && a.draining.is_empty());
        assert!(f.cache.settled(), "an outcome, though not an answer");
    }

    #[test]
    fn nxdomain_is_believed_once_confirmed() {
        let mut f = Fixture::new(timing());
        f.lookup(0, answer(&["192.0.2.1"], 5));
        f.lookup(
            5,
            Outcome::NxDomain {
                negative_ttl: Some(60 * S),
            },
        );
        let a = f.answer();
        assert_eq!(a.condition, Condition::NxDomainUnconfirmed);
        assert_eq!(a.serving, ips(&["192.0.2.1"]), "kept until confirmed");
        assert_eq!(
            f.next_in(5),
            10 * S,
            "asked again at the end of --dns-nxdomain-for"
        );
        f.lookup(
            15,
            Outcome::NxDomain {
                negative_ttl: Some(60 * S),
            },
        );
        let a = f.answer();
        assert_eq!(a.condition, Condition::NxDomain);
        assert!(a.serving.is_empty());
        assert_eq!(a.draining, ips(&["192.0.2.1"]));
        assert_eq!(f.next_in(15), 60 * S, "then after the negative TTL");
    }

    #[test]
    fn an_answer_in_between_ends_an_nxdomain_run() {
        let mut f = Fixture::new(timing());
        f.lookup(0, answer(&["192.0.2.1"], 5));
        f.lookup(5, Outcome::NxDomain { negative_ttl: None });
        f.lookup(15, answer(&["192.0.2.1"], 5));
        f.lookup(20, Outcome::NxDomain { negative_ttl: None });
        assert_eq!(
            f.answer().condition,
            Condition::NxDomainUnconfirmed,
            "a new run starts: not confirmed by the old one"
        );
    }

    #[test]
    fn nxdomain_for_a_name_without_addresses_is_at_once() {
        let mut f = Fixture::new(timing());
        f.lookup(0, Outcome::NxDomain { negative_ttl: None });
        assert_eq!(f.answer().condition, Condition::NxDomain);
        assert_eq!(f.next_in(0), NEGATIVE_TTL_WITHOUT_SOA);
    }

    #[test]
    fn nodata_drains() {
        let mut f = Fixture::new(timing());
        f.lookup(0, answer(&["192.0.2.1"], 5));
        f.lookup(
            5,
            Outcome::NoData {
                negative_ttl: Some(2 * S),
            },
        );
        let a = f.answer();
        assert_eq!(a.condition, Condition::NoData);
        assert_eq!(a.draining, ips(&["192.0.2.1"]));
        assert_eq!(f.next_in(5), 2 * S);
    }

    #[test]
    fn names_no_longer_wanted_are_forgotten_and_late_outcomes_dropped() {
        let mut f = Fixture::new(timing());
        assert_eq!(f.cache.due(f.t0).len(), 1);
        f.cache.want(&Wanted::new(), f.t0);
        f.cache
            .record(NAME, IpFamily::V4, &answer(&["192.0.2.1"], 5), f.t0);
        assert!(f.cache.is_empty());
        assert!(f.cache.view().get(NAME).is_none());
    }

    #[test]
    fn a_restored_answer_serves_until_a_lookup_says_otherwise() {
        let mut f = Fixture::new(timing());
        let restored = Restored {
            serving: ips(&["192.0.2.1"]),
            draining: vec![("192.0.2.9".parse().unwrap(), f.t0)],
            ttl: Some(60 * S),
            answered_at: Some(f.t0),
            expires: Some(f.t0 + 60 * S),
        };
        f.cache.restore(NAME, IpFamily::V4, &restored);
        assert!(f.cache.settled(), "the first programming need not wait");
        let a = f.answer();
        assert_eq!(
            (a.serving, a.draining),
            (ips(&["192.0.2.1"]), ips(&["192.0.2.9"]))
        );
        // Still asked at once; a failure serves it stale, an answer replaces it as a diff.
        f.lookup(0, Outcome::Failed(Failure::Timeout));
        assert_eq!(f.answer().condition, Condition::Stale(Failure::Timeout));
        assert_eq!(f.answer().serving, ips(&["192.0.2.1"]));
        f.lookup(1, answer(&["192.0.2.2"], 60));
        let a = f.answer();
        assert_eq!(a.serving, ips(&["192.0.2.2"]));
        assert_eq!(a.draining, ips(&["192.0.2.1", "192.0.2.9"]));
        // Only a record that has not answered yet is seeded.
        f.cache.restore(NAME, IpFamily::V4, &restored);
        assert_eq!(f.answer().serving, ips(&["192.0.2.2"]));
    }

    #[test]
    fn a_lookup_under_way_is_not_started_twice() {
        let mut f = Fixture::new(timing());
        assert_eq!(f.cache.due(f.t0).len(), 1);
        assert!(f.cache.due(f.at(100)).is_empty());
        assert_eq!(f.cache.next_deadline(), None, "nothing due while it runs");
    }
}
