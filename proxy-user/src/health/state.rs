//! One endpoint's health: the active check's thresholds, passive ejection with exponential
//! back-off, and the verdict that combines them. Pure: time comes in as an argument.

use std::fmt;
use std::time::{Duration, Instant};

use proxy_common::{BackendHealth, HF_REFUSED, HF_TIMEOUT, HF_UNREACHABLE};

use super::config::{ActiveCheck, show};

/// Consecutive failed new flows (no answer in between) that eject an endpoint passively.
/// HAProxy's `fall` and Envoy's consecutive-gateway-failure defaults are 3 and 5; 3 because a
/// refused or unanswered new connection is a strong signal (not an application error), and
/// because every one of them is a client connection that failed.
pub const PASSIVE_FAILURES: u32 = 3;
/// The first passive ejection lasts this long, each repeated one twice the last. Envoy uses 30
/// s: for pools of many interchangeable hosts. Here an endpoint is often one of two VMs, and a
/// VM that comes back should get traffic within seconds; a dead one costs one failed connection
/// per readmission (it is ejected again at its first failure), i.e. about 7 over 10 minutes.
pub const BASE_EJECTION: Duration = Duration::from_secs(5);
pub const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Healthy this long after an ejection: the next one starts at [`BASE_EJECTION`] again.
pub const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// At most this share of a Service port's endpoints is ejected passively (Envoy's
/// max_ejection_percent, 10% there). Services here have a handful of endpoints: 50% lets one of
/// a pair go, and a SYN flood or a load spike that makes every endpoint drop SYNs still leaves
/// half of them in use.
pub const MAX_EJECTED_PERCENT: usize = 50;

/// How many endpoints of `n` may be ejected passively at once: at least one once there are two
/// (so a pair works), none of a single endpoint (there is nowhere to move its traffic).
pub fn max_passive_ejections(n: usize) -> usize {
    if n < 2 {
        0
    } else {
        (n * MAX_EJECTED_PERCENT / 100).max(1)
    }
}

/// Why an endpoint's health changed (or why the last probe failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Connection refused (RST).
    Refused,
    /// No answer within the timeout.
    Timeout,
    /// ICMP unreachable (no route, host unreachable).
    Unreachable,
    /// An HTTP status outside 2xx/3xx.
    Http(u16),
    /// Anything else (TLS, a malformed answer): its text.
    Other(String),
    /// Passive: this many new flows failed in a row, the last one so.
    Passive { failures: u64, last_kind: u32 },
    /// Healthy again: the active check passed this many times in a row.
    Answered(u32),
    /// Healthy again: a passive ejection of this long is over (no active check).
    EjectionOver(Duration),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Refused => f.write_str("refused"),
            Cause::Timeout => f.write_str("timeout"),
            Cause::Unreachable => f.write_str("unreachable"),
            Cause::Http(code) => write!(f, "HTTP {code}"),
            Cause::Other(text) => f.write_str(text),
            Cause::Passive {
                failures,
                last_kind,
            } => {
                let what = match *last_kind {
                    HF_REFUSED => "RSTs",
                    HF_UNREACHABLE => "ICMP unreachables",
                    HF_TIMEOUT => "unanswered SYNs",
                    _ => "failed connections",
                };
                write!(f, "passive: {failures} {what}")
            }
            Cause::Answered(n) => write!(f, "check passed {n} time(s)"),
            Cause::EjectionOver(d) => write!(f, "passive ejection of {} over", show(*d)),
        }
    }
}

/// A change of verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub healthy: bool,
    pub cause: Cause,
}

/// What one look at the data path's counters did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PassiveStep {
    Nothing,
    Transition(Transition),
    /// The endpoint failed enough to be ejected, but the Service's share is used up.
    Capped,
    /// Ejected while already unhealthy (the active check saw it first).
    Ejected,
}

#[derive(Clone, Debug)]
struct Ejection {
    until: Instant,
    length: Duration,
    /// The active check failed during the ejection: it saw the outage, so its recovery can be
    /// trusted before the back-off ends.
    active_saw_failure: bool,
    /// Active successes since the ejection began.
    passes: u32,
}

#[derive(Clone, Debug)]
pub struct EndpointHealth {
    // Active check.
    active_healthy: bool,
    pass_run: u32,
    fail_run: u32,
    last_failure: Option<Cause>,
    // Passive.
    ejection: Option<Ejection>,
    ejection_cause: Option<Cause>,
    /// Ejections in a row: the next lasts BASE_EJECTION * 2^level.
    level: u32,
    last_ejection_end: Option<Instant>,
    /// Readmitted after an ejection and not answered since: one failure ejects it again.
    probation: bool,
    /// The counters as last read, and as they were at the last readmission.
    seen: BackendHealth,
    failed_at_readmit: u64,
    answered_at_readmit: u64,
    // Verdict.
    healthy: bool,
    since: Instant,
    cause: Option<Cause>,
}

impl EndpointHealth {
    /// A new endpoint is healthy until a check says otherwise: an agent restart or a new
    /// endpoint must not refuse traffic before the first probe.
    pub fn new(now: Instant) -> Self {
        EndpointHealth {
            active_healthy: true,
            pass_run: 0,
            fail_run: 0,
            last_failure: None,
            ejection: None,
            ejection_cause: None,
            level: 0,
            last_ejection_end: None,
            probation: false,
            seen: BackendHealth::default(),
            failed_at_readmit: 0,
            answered_at_readmit: 0,
            healthy: true,
            since: now,
            cause: None,
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Why the endpoint is as it is, if it ever changed.
    pub fn cause(&self) -> Option<&Cause> {
        self.cause.as_ref()
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    /// Passively ejected now.
    pub fn ejected(&self) -> bool {
        self.ejection.is_some()
    }

    /// The data path's counters as last read.
    pub fn counters(&self) -> &BackendHealth {
        &self.seen
    }

    /// The check changed (or went away): its earlier results say nothing about the new one.
    pub fn reset_active(
        &mut self,
        check: Option<&ActiveCheck>,
        now: Instant,
    ) -> Option<Transition> {
        self.active_healthy = true;
        self.pass_run = 0;
        self.fail_run = 0;
        self.last_failure = None;
        self.settle(check, now)
    }

    /// Passive detection was turned off: any ejection ends.
    pub fn reset_passive(
        &mut self,
        check: Option<&ActiveCheck>,
        now: Instant,
    ) -> Option<Transition> {
        self.ejection = None;
        self.probation = false;
        self.settle(check, now)
    }

    /// This node's own active verdict (what a prober publishes).
    pub fn active_healthy(&self) -> bool {
        self.active_healthy
    }

    /// The probers' verdict replaces this node's own active check (Kubernetes mode, a node that
    /// follows published verdicts). Passive ejections then end by their back-off alone.
    pub fn follow(&mut self, healthy: bool, now: Instant) -> Option<Transition> {
        if self.active_healthy != healthy {
            self.active_healthy = healthy;
            self.pass_run = 0;
            self.fail_run = 0;
            self.last_failure = (!healthy).then(|| Cause::Other("probers say so".to_owned()));
        }
        let t = self.settle(None, now)?;
        // Say whose verdict it is.
        let cause = if t.healthy {
            Cause::Other("probers say so".to_owned())
        } else {
            t.cause
        };
        self.cause = Some(cause.clone());
        Some(Transition {
            healthy: t.healthy,
            cause,
        })
    }

    /// One probe's result.
    pub fn on_probe(
        &mut self,
        result: Result<(), Cause>,
        check: &ActiveCheck,
        now: Instant,
    ) -> Option<Transition> {
        match result {
            Ok(()) => {
                self.pass_run = self.pass_run.saturating_add(1);
                self.fail_run = 0;
                if let Some(e) = &mut self.ejection {
                    e.passes = e.passes.saturating_add(1);
                }
            }
            Err(cause) => {
                self.fail_run = self.fail_run.saturating_add(1);
                self.pass_run = 0;
                self.last_failure = Some(cause);
                if let Some(e) = &mut self.ejection {
                    e.passes = 0;
                    e.active_saw_failure = true;
                }
            }
        }
        if self.active_healthy && self.fail_run >= check.unhealthy_threshold {
            self.active_healthy = false;
        } else if !self.active_healthy && self.pass_run >= check.healthy_threshold {
            self.active_healthy = true;
        }
        self.settle(Some(check), now)
    }

    /// What the data path saw of new flows to this endpoint. `may_eject`: the Service port's
    /// share of passive ejections is not used up.
    pub fn on_passive(
        &mut self,
        counters: BackendHealth,
        may_eject: bool,
        check: Option<&ActiveCheck>,
        now: Instant,
    ) -> PassiveStep {
        if counters.failed < self.seen.failed || counters.answered < self.seen.answered {
            // Zeroed: the backend id was given to this endpoint anew.
            self.failed_at_readmit = 0;
            self.answered_at_readmit = 0;
        }
        self.seen = counters;
        if self.ejection.is_some() {
            return PassiveStep::Nothing;
        }
        if counters.answered > self.answered_at_readmit {
            self.probation = false;
        }
        let since_readmit = counters.failed.saturating_sub(self.failed_at_readmit);
        let run = (counters.consecutive as u64).min(since_readmit);
        let needed = if self.probation {
            1
        } else {
            PASSIVE_FAILURES as u64
        };
        if run < needed {
            return PassiveStep::Nothing;
        }
        if !may_eject {
            return PassiveStep::Capped;
        }
        if self
            .last_ejection_end
            .is_some_and(|end| now.duration_since(end) >= BACKOFF_RESET)
        {
            self.level = 0;
        }
        let length = BASE_EJECTION
            .saturating_mul(1u32 << self.level.min(16))
            .min(MAX_EJECTION);
        self.level = self.level.saturating_add(1);
        self.ejection = Some(Ejection {
            until: now + length,
            length,
            active_saw_failure: !self.active_healthy,
            passes: 0,
        });
        self.ejection_cause = Some(Cause::Passive {
            failures: run,
            last_kind: counters.last_kind,
        });
        match self.settle(check, now) {
            Some(t) => PassiveStep::Transition(t),
            None => PassiveStep::Ejected,
        }
    }

    /// Ends a passive ejection that is over; call it now and then.
    pub fn tick(&mut self, check: Option<&ActiveCheck>, now: Instant) -> Option<Transition> {
        self.settle(check, now)
    }

    /// Readmits a passively ejected endpoint when its time has come, and works out the verdict.
    /// Without an active check the back-off decides. With one, its recovery readmits at once
    /// if it saw the outage too; if it never failed (it checks something the flows do not
    /// reach), the back-off must also be over.
    fn settle(&mut self, check: Option<&ActiveCheck>, now: Instant) -> Option<Transition> {
        if let Some(e) = &self.ejection {
            let over = now >= e.until;
            let readmit = match check {
                None => over,
                Some(c) => e.passes >= c.healthy_threshold && (over || e.active_saw_failure),
            };
            if readmit {
                let length = e.length;
                self.ejection = None;
                self.last_ejection_end = Some(now);
                self.probation = true;
                self.failed_at_readmit = self.seen.failed;
                self.answered_at_readmit = self.seen.answered;
                if check.is_none() {
                    self.ejection_cause = Some(Cause::EjectionOver(length));
                }
            }
        }
        let healthy = self.active_healthy && self.ejection.is_none();
        if healthy == self.healthy {
            return None;
        }
        let cause = if healthy {
            match (check, &self.ejection_cause) {
                (Some(_), _) => Cause::Answered(self.pass_run),
                (None, Some(c)) => c.clone(),
                (None, None) => Cause::Answered(0),
            }
        } else if !self.active_healthy {
            self.last_failure.clone().unwrap_or(Cause::Timeout)
        } else {
            self.ejection_cause.clone().unwrap_or(Cause::Timeout)
        };
        self.healthy = healthy;
        self.since = now;
        self.cause = Some(cause.clone());
        Some(Transition { healthy, cause })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::config::CheckKind;

    fn check(unhealthy: u32, healthy: u32) -> ActiveCheck {
        ActiveCheck {
            kind: CheckKind::Tcp,
            path: "/".into(),
            host: None,
            port: None,
            verify: false,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
        }
    }

    fn counters(answered: u64, failed: u64, consecutive: u32, kind: u32) -> BackendHealth {
        BackendHealth {
            answered,
            failed,
            consecutive,
            last_kind: kind,
            last_at: 0,
            reserved: 0,
        }
    }

    fn secs(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    #[test]
    fn active_thresholds_decide_both_ways() {
        let t0 = Instant::now();
        let c = check(2, 2);
        let mut h = EndpointHealth::new(t0);
        assert!(h.healthy(), "healthy until a check says otherwise");
        assert_eq!(h.on_probe(Err(Cause::Refused), &c, secs(t0, 1.0)), None);
        // A pass in between starts the count again.
        assert_eq!(h.on_probe(Ok(()), &c, secs(t0, 2.0)), None);
        assert_eq!(h.on_probe(Err(Cause::Refused), &c, secs(t0, 3.0)), None);
        let t = h
            .on_probe(Err(Cause::Http(503)), &c, secs(t0, 4.0))
            .unwrap();
        assert_eq!(
            t,
            Transition {
                healthy: false,
                cause: Cause::Http(503)
            }
        );
        assert_eq!(t.cause.to_string(), "HTTP 503");
        assert!(!h.healthy());
        assert_eq!(h.on_probe(Ok(()), &c, secs(t0, 5.0)), None);
        let t = h.on_probe(Ok(()), &c, secs(t0, 6.0)).unwrap();
        assert!(t.healthy);
        assert_eq!(t.cause, Cause::Answered(2));
        assert_eq!(h.since(), secs(t0, 6.0));
    }

    #[test]
    fn passive_ejects_after_three_failures_in_a_row_then_backs_off() {
        let t0 = Instant::now();
        let mut h = EndpointHealth::new(t0);
        assert_eq!(
            h.on_passive(counters(10, 2, 2, HF_REFUSED), true, None, t0),
            PassiveStep::Nothing
        );
        // An answer in between: the data path's run starts over.
        assert_eq!(
            h.on_passive(counters(11, 3, 1, HF_REFUSED), true, None, t0),
            PassiveStep::Nothing
        );
        let step = h.on_passive(counters(11, 5, 3, HF_REFUSED), true, None, secs(t0, 1.0));
        let PassiveStep::Transition(t) = step else {
            panic!("{step:?}")
        };
        assert!(!t.healthy);
        assert_eq!(t.cause.to_string(), "passive: 3 RSTs");
        // Ejected for 5 s.
        assert_eq!(h.tick(None, secs(t0, 5.9)), None);
        let t = h.tick(None, secs(t0, 6.0)).unwrap();
        assert!(t.healthy);
        assert_eq!(t.cause.to_string(), "passive ejection of 5s over");
        // On probation: the next failure ejects it again, for twice as long.
        let step = h.on_passive(counters(11, 6, 4, HF_TIMEOUT), true, None, secs(t0, 7.0));
        let PassiveStep::Transition(t) = step else {
            panic!("{step:?}")
        };
        assert_eq!(t.cause.to_string(), "passive: 1 unanswered SYNs");
        assert_eq!(h.tick(None, secs(t0, 16.9)), None);
        assert!(h.tick(None, secs(t0, 17.0)).unwrap().healthy);
        // It answers: off probation; three more failures are needed.
        assert_eq!(
            h.on_passive(counters(12, 8, 2, HF_REFUSED), true, None, secs(t0, 18.0)),
            PassiveStep::Nothing
        );
        // Third ejection: 20 s.
        assert!(matches!(
            h.on_passive(counters(12, 9, 3, HF_REFUSED), true, None, secs(t0, 19.0)),
            PassiveStep::Transition(_)
        ));
        assert_eq!(h.tick(None, secs(t0, 38.9)), None);
        assert!(h.tick(None, secs(t0, 39.0)).is_some());
        // Healthy for a minute: the next ejection is short again.
        h.on_passive(counters(20, 9, 0, HF_REFUSED), true, None, secs(t0, 40.0));
        assert!(matches!(
            h.on_passive(counters(20, 12, 3, HF_REFUSED), true, None, secs(t0, 100.0)),
            PassiveStep::Transition(_)
        ));
        assert!(h.tick(None, secs(t0, 105.0)).is_some());
    }

    #[test]
    fn the_back_off_is_bounded() {
        let t0 = Instant::now();
        let mut h = EndpointHealth::new(t0);
        let mut now = t0;
        let mut failed = 0;
        let mut lengths = Vec::new();
        for _ in 0..10 {
            failed += 3;
            assert!(matches!(
                h.on_passive(
                    counters(0, failed, failed as u32, HF_TIMEOUT),
                    true,
                    None,
                    now
                ),
                PassiveStep::Transition(_)
            ));
            let start = now;
            while h.tick(None, now).is_none() {
                now += Duration::from_secs(1);
            }
            lengths.push((now - start).as_secs());
        }
        assert_eq!(lengths, [5, 10, 20, 40, 80, 160, 300, 300, 300, 300]);
    }

    #[test]
    fn a_capped_ejection_leaves_the_endpoint_in_use() {
        let t0 = Instant::now();
        let mut h = EndpointHealth::new(t0);
        assert_eq!(
            h.on_passive(counters(0, 5, 5, HF_TIMEOUT), false, None, t0),
            PassiveStep::Capped
        );
        assert!(h.healthy());
        assert!(matches!(
            h.on_passive(counters(0, 6, 6, HF_TIMEOUT), true, None, t0),
            PassiveStep::Transition(_)
        ));
        assert_eq!(max_passive_ejections(1), 0);
        assert_eq!(max_passive_ejections(2), 1);
        assert_eq!(max_passive_ejections(3), 1);
        assert_eq!(max_passive_ejections(4), 2);
        assert_eq!(max_passive_ejections(10), 5);
    }

    #[test]
    fn with_an_active_check_its_recovery_readmits() {
        let t0 = Instant::now();
        let c = check(2, 2);
        let mut h = EndpointHealth::new(t0);
        // Passive first (a closed port resets the clients at once).
        assert!(matches!(
            h.on_passive(counters(5, 3, 3, HF_REFUSED), true, Some(&c), t0),
            PassiveStep::Transition(_)
        ));
        // The check sees it too, then sees it come back: readmitted before the 5 s are over.
        assert_eq!(h.on_probe(Err(Cause::Refused), &c, secs(t0, 0.5)), None);
        assert_eq!(h.on_probe(Ok(()), &c, secs(t0, 1.5)), None);
        let t = h.on_probe(Ok(()), &c, secs(t0, 2.5)).unwrap();
        assert!(t.healthy);
        assert_eq!(t.cause, Cause::Answered(2));

        // A check that never fails (it probes another port) does not cut the back-off short:
        // on probation, one more failure ejected it again (10 s).
        assert!(matches!(
            h.on_passive(counters(5, 4, 4, HF_REFUSED), true, Some(&c), secs(t0, 3.0)),
            PassiveStep::Transition(_)
        ));
        assert_eq!(h.on_probe(Ok(()), &c, secs(t0, 4.0)), None);
        assert_eq!(h.on_probe(Ok(()), &c, secs(t0, 5.0)), None);
        assert_eq!(h.tick(Some(&c), secs(t0, 12.9)), None);
        assert!(h.tick(Some(&c), secs(t0, 13.0)).unwrap().healthy);
    }

    #[test]
    fn ejected_while_the_check_already_failed_is_no_new_transition() {
        let t0 = Instant::now();
        let c = check(1, 1);
        let mut h = EndpointHealth::new(t0);
        assert!(h.on_probe(Err(Cause::Timeout), &c, t0).is_some());
        assert_eq!(
            h.on_passive(counters(0, 3, 3, HF_TIMEOUT), true, Some(&c), t0),
            PassiveStep::Ejected
        );
        // One pass: the check saw the outage, so its recovery readmits at once.
        let t = h.on_probe(Ok(()), &c, secs(t0, 1.0)).unwrap();
        assert!(t.healthy);
    }

    #[test]
    fn a_follower_takes_the_probers_verdict() {
        let t0 = Instant::now();
        let mut h = EndpointHealth::new(t0);
        let t = h.follow(false, t0).unwrap();
        assert!(!t.healthy);
        assert_eq!(t.cause.to_string(), "probers say so");
        assert_eq!(h.follow(false, t0), None);
        assert!(h.follow(true, secs(t0, 1.0)).unwrap().healthy);
        assert!(h.active_healthy());
    }

    #[test]
    fn zeroed_counters_start_a_new_record() {
        let t0 = Instant::now();
        let mut h = EndpointHealth::new(t0);
        assert!(matches!(
            h.on_passive(counters(0, 3, 3, HF_REFUSED), true, None, t0),
            PassiveStep::Transition(_)
        ));
        assert!(h.tick(None, secs(t0, 5.0)).is_some());
        // The backend id went to this endpoint anew: counters start from zero, and the
        // probation's single failure is counted against the new record.
        assert!(matches!(
            h.on_passive(counters(0, 1, 1, HF_REFUSED), true, None, secs(t0, 6.0)),
            PassiveStep::Transition(_)
        ));
    }
}
