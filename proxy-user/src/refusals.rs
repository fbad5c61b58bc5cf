//! New flows the data path refused for want of room (no SNAT port left, reverse NAT table
//! full): read from its event ring buffer, logged once per problem and interval (naming the
//! Service, the egress address and the endpoint), counted for /metrics, and handed to Kubernetes
//! mode for an Event on the Service.
//!
//! The data path answers such a flow at once (TCP RST, ICMP unreachable) and counts it; its
//! events are rate-limited per CPU and backend (one a second, carrying the count of the ones it
//! stood for), so the totals here are exact while the ring stays small.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use proxy_common::user::{port_host, proto_name};
use proxy_common::{EV_NAT_TABLE_FULL, EV_SNAT_EXHAUSTED, Event};
use tokio::io::unix::AsyncFd;

use crate::translate::ServicePortKey;

/// A problem is logged at most this often (with the count since its last line).
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why the flows were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    SnatPortsExhausted,
    NatTableFull,
}

impl Reason {
    fn of(kind: u32) -> Option<Reason> {
        match kind {
            EV_SNAT_EXHAUSTED => Some(Reason::SnatPortsExhausted),
            EV_NAT_TABLE_FULL => Some(Reason::NatTableFull),
            _ => None,
        }
    }

    /// The metric label and the Kubernetes Event reason.
    pub fn name(self) -> &'static str {
        match self {
            Reason::SnatPortsExhausted => "SnatPortsExhausted",
            Reason::NatTableFull => "NatTableFull",
        }
    }

    fn advice(self) -> &'static str {
        match self {
            Reason::SnatPortsExhausted => {
                "every SNAT port to this endpoint is in use or held for a closed connection the \
                 endpoint may still keep in TIME_WAIT; widen --snat-ports or add egress addresses \
                 (extproxy.io/egress-ip)"
            }
            Reason::NatTableFull => {
                "the reverse NAT table is full; raise --ct-max (it holds twice as many entries)"
            }
        }
    }
}

/// One problem: a Service port's flows to one endpoint from one egress address (or pool).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RefusalKey {
    pub service: ServicePortKey,
    /// The egress address, the first of the pool when the Service has several.
    pub egress: IpAddr,
    /// The addresses the allocator tried: the pool's size (1: one address).
    pub egress_count: u32,
    pub endpoint: SocketAddr,
    pub protocol: u8,
    pub reason: Reason,
}

impl RefusalKey {
    /// The text of the log line and the Event, without the count: the same for every report of
    /// one problem.
    pub fn describe(&self) -> String {
        format!(
            "Service {}/{} port {} ({}): new connections to endpoint {} from egress {} are \
             refused: {}",
            self.service.namespace,
            self.service.name,
            if self.service.port_name.is_empty() {
                "(unnamed)"
            } else {
                &self.service.port_name
            },
            proto_name(self.protocol),
            self.endpoint,
            if self.egress_count > 1 {
                format!(
                    "pool {} and {} other address(es)",
                    self.egress,
                    self.egress_count - 1
                )
            } else {
                format!("address {}", self.egress)
            },
            self.reason.advice()
        )
    }
}

#[derive(Debug)]
struct Tally {
    total: u64,
    since_log: u64,
    logged: Option<Instant>,
}

/// What to say about a problem now.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub key: RefusalKey,
    /// Refused since the last report of this problem.
    pub refused: u64,
    /// The first report of the problem since the agent started.
    pub first: bool,
}

impl Report {
    pub fn log_line(&self) -> String {
        format!(
            "{} ({} refused {})",
            self.key.describe(),
            self.refused,
            if self.first {
                "so far".to_owned()
            } else {
                format!("in the last {} s or so", LOG_INTERVAL.as_secs())
            }
        )
    }
}

/// Refusals by problem: totals for /metrics, reports at most every [`LOG_INTERVAL`].
#[derive(Debug, Default)]
pub struct Refusals {
    by_key: BTreeMap<RefusalKey, Tally>,
    /// Events for service ids the agent has no name for (a Service removed meanwhile).
    pub unattributed: u64,
}

impl Refusals {
    /// Counts `events`; `name` turns a service id into its Service port.
    pub fn record(&mut self, events: &[Event], name: impl Fn(u32) -> Option<ServicePortKey>) {
        for e in events {
            let (Some(reason), Some(service)) = (Reason::of(e.kind), name(e.service_id)) else {
                self.unattributed += u64::from(e.count);
                continue;
            };
            let key = RefusalKey {
                service,
                egress: e.egress.to_ip(),
                egress_count: e.egress_count.max(1),
                endpoint: SocketAddr::new(e.backend.to_ip(), port_host(e.backend_port)),
                protocol: e.proto,
                reason,
            };
            let tally = self.by_key.entry(key).or_insert(Tally {
                total: 0,
                since_log: 0,
                logged: None,
            });
            tally.total += u64::from(e.count);
            tally.since_log += u64::from(e.count);
        }
    }

    /// The problems with refusals not reported yet, whose last report is [`LOG_INTERVAL`] old.
    pub fn due(&mut self, now: Instant) -> Vec<Report> {
        let mut out = Vec::new();
        for (key, tally) in &mut self.by_key {
            if tally.since_log == 0 {
                continue;
            }
            if tally
                .logged
                .is_some_and(|t| now.duration_since(t) < LOG_INTERVAL)
            {
                continue;
            }
            out.push(Report {
                key: key.clone(),
                refused: tally.since_log,
                first: tally.logged.is_none(),
            });
            tally.since_log = 0;
            tally.logged = Some(now);
        }
        out
    }

    /// Totals by problem, for /metrics.
    pub fn totals(&self) -> impl Iterator<Item = (&RefusalKey, u64)> {
        self.by_key.iter().map(|(k, t)| (k, t.total))
    }
}

/// The data path's event ring buffer, readable without blocking the control loop.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventStream {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the ring owns its file descriptor and keeps it open as long as it lives, and
        // the AsyncFd owns the ring: the fd stays valid while registered.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
        Ok(EventStream { ring })
    }

    /// The events waiting, once there are some.
    pub async fn next(&mut self) -> Vec<Event> {
        loop {
            let mut guard = match self.ring.readable_mut().await {
                Ok(guard) => guard,
                Err(err) => {
                    tracing::warn!("reading the data path's events: {err}");
                    // Never spin: the loop goes on without events.
                    std::future::pending::<()>().await;
                    unreachable!()
                }
            };
            let ring = guard.get_inner_mut();
            let mut out = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<Event>() {
                    // SAFETY: the data path writes whole `Event`s; read_unaligned copies one.
                    out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
                }
            }
            guard.clear_ready();
            if !out.is_empty() {
                return out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::{IpFamily, Protocol};
    use proxy_common::Addr;

    fn key() -> ServicePortKey {
        ServicePortKey {
            namespace: "shop".into(),
            name: "partner-api".into(),
            port_name: "https".into(),
            protocol: Protocol::Tcp,
            family: IpFamily::V4,
        }
    }

    fn event(count: u32) -> Event {
        Event {
            kind: EV_SNAT_EXHAUSTED,
            count,
            service_id: 7,
            backend_id: 3,
            egress: Addr::from("10.0.0.1".parse::<IpAddr>().unwrap()),
            backend: Addr::from("203.0.113.7".parse::<IpAddr>().unwrap()),
            backend_port: 443u16.to_be(),
            proto: proxy_common::PROTO_TCP,
            pad: 0,
            egress_count: 1,
        }
    }

    #[test]
    fn refusals_are_reported_at_once_then_summed_per_interval() {
        let mut r = Refusals::default();
        let names = |id| (id == 7).then(key);
        let t0 = Instant::now();
        r.record(&[event(1)], names);
        let first = r.due(t0);
        assert_eq!(first.len(), 1);
        assert!(first[0].first);
        let line = first[0].log_line();
        for part in [
            "shop/partner-api",
            "https",
            "203.0.113.7:443",
            "10.0.0.1",
            "--snat-ports",
        ] {
            assert!(line.contains(part), "{line}");
        }
        // More within the interval: counted, reported once it has passed.
        r.record(&[event(5), event(2)], names);
        assert!(r.due(t0 + Duration::from_secs(3)).is_empty());
        let later = r.due(t0 + LOG_INTERVAL);
        assert_eq!(
            (later.len(), later[0].refused, later[0].first),
            (1, 7, false)
        );
        assert!(r.due(t0 + 3 * LOG_INTERVAL).is_empty(), "nothing new");
        assert_eq!(r.totals().map(|(_, n)| n).sum::<u64>(), 8);
        // A Service the agent no longer knows.
        r.record(
            &[Event {
                service_id: 9,
                ..event(4)
            }],
            names,
        );
        assert_eq!(r.unattributed, 4);
    }

    #[test]
    fn a_pool_is_named_by_its_first_address_and_size() {
        let mut r = Refusals::default();
        r.record(
            &[Event {
                egress_count: 3,
                ..event(2)
            }],
            |id| (id == 7).then(key),
        );
        let due = r.due(Instant::now());
        let line = due[0].log_line();
        assert!(
            line.contains("from egress pool 10.0.0.1 and 2 other address(es)"),
            "{line}"
        );
    }
}
