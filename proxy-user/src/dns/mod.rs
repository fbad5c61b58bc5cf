//! DNS-name endpoints: EndpointSlices with `addressType: FQDN`, whose addresses are names.
//!
//! kube-proxy ignores such slices. extproxy looks each name up (A for the IPv4 ports of the
//! Services using it, AAAA for IPv6), and every address in the answer becomes an endpoint with
//! the slice's ports and conditions. The pieces:
//!
//! - [`cache`]: per name and family, the addresses served and draining, when to ask again,
//!   stale-if-error and NXDOMAIN rules (pure, tested with a made-up clock);
//! - [`lookup`]: the resolver (hickory-resolver), the node's /etc/resolv.conf or `--dns-server`;
//! - [`Dns`]: runs lookups as they fall due and hands the control loop a new [`Resolved`]
//!   whenever an answer changes what is served;
//! - the translator reads [`Resolved`] like any other input (`translate/fqdn.rs`): a dropped
//!   address is a draining endpoint (no new flows, established ones go on), so names whose
//!   answers rotate never reset healthy connections;
//! - [`report`]: metrics per name (never per address, so label sets stay bounded), the state file
//!   `extproxy inspect` reads, and the Event reasons;
//! - [`convert`]: `extproxy convert-externalname`, an ExternalName Service as a selector-less
//!   Service plus an FQDN EndpointSlice.

pub mod cache;
pub mod convert;
pub mod lookup;
pub mod report;
pub mod view;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub use cache::{Cache, Outcome, Restored, Timing};
pub use lookup::{Hickory, Lookup};
pub use view::{Condition, Failure, FamilyAnswer, NameAnswer, Resolved, Wanted, check_name};

use crate::metrics::Telemetry;
use crate::translate::IpFamily;

/// The state file is rewritten at most this often.
const STATE_WRITE_INTERVAL: Duration = Duration::from_secs(1);

type Delivery = (Arc<str>, IpFamily, Outcome);

/// Looks names up as they fall due and keeps what the translator reads.
pub struct Dns {
    cache: Cache,
    lookup: Arc<dyn Lookup>,
    tx: mpsc::UnboundedSender<Delivery>,
    rx: mpsc::UnboundedReceiver<Delivery>,
    resolved: Arc<Resolved>,
    telemetry: Option<Arc<Telemetry>>,
    state_dir: Option<PathBuf>,
    state_dirty: bool,
    last_write: Option<Instant>,
    /// What the previous agent served (its state file), for names not looked up yet.
    restored: BTreeMap<(Arc<str>, IpFamily), Restored>,
}

impl Dns {
    pub fn new(
        timing: Timing,
        lookup: Arc<dyn Lookup>,
        telemetry: Option<Arc<Telemetry>>,
        state_dir: Option<PathBuf>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let restored = state_dir
            .as_deref()
            .and_then(report::read)
            .map(|state| state.restored(Instant::now()))
            .unwrap_or_default();
        let dns = Dns {
            cache: Cache::new(timing),
            lookup,
            tx,
            rx,
            resolved: Arc::new(Resolved::default()),
            telemetry,
            state_dir,
            state_dirty: true,
            last_write: None,
            restored,
        };
        dns.publish_metrics();
        dns
    }

    /// Which resolver is asked, for the log.
    pub fn servers(&self) -> String {
        self.lookup.describe()
    }

    /// What the translator reads now.
    pub fn resolved(&self) -> Arc<Resolved> {
        self.resolved.clone()
    }

    /// The names and families to look up from now on (what the translator's FQDN slices need).
    pub fn want(&mut self, wanted: &Wanted) {
        let before: Vec<(Arc<str>, IpFamily)> =
            self.cache.records().map(|(k, _)| k.clone()).collect();
        self.cache.want(wanted, Instant::now());
        let after: Vec<(Arc<str>, IpFamily)> =
            self.cache.records().map(|(k, _)| k.clone()).collect();
        if before != after {
            for (name, family) in after.iter().filter(|k| !before.contains(k)) {
                let restored = self.restored.remove(&(name.clone(), *family));
                match restored {
                    Some(r) if !r.serving.is_empty() || !r.draining.is_empty() => {
                        self.cache.restore(name, *family, &r);
                        tracing::info!(
                            "DNS name {name}: looking up its {} records; serving the previous \
                             agent's answer ({}) meanwhile",
                            record_type(*family),
                            join(&r.serving)
                        );
                    }
                    _ => tracing::info!(
                        "DNS name {name}: looking up its {} records",
                        record_type(*family)
                    ),
                }
            }
            for (name, family) in before.iter().filter(|k| !after.contains(k)) {
                tracing::info!(
                    "DNS name {name}: no Service needs its {} records any more",
                    record_type(*family)
                );
            }
            self.refresh_view();
            self.spawn_due();
        }
    }

    /// Waits until every wanted name has had its first outcome, at most `bound`: the first
    /// programming after a start must not remove what an adopted map serves for want of an
    /// answer.
    pub async fn settle(&mut self, bound: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        while !self.cache.settled() {
            self.spawn_due();
            tokio::select! {
                delivery = self.rx.recv() => {
                    if let Some(d) = delivery {
                        self.deliver(d);
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.refresh_view();
        self.cache.settled()
    }

    /// Waits until what is served changes and returns it. Cancel-safe: outcomes wait in the
    /// channel, and time-driven changes are computed from the clock when next polled.
    pub async fn next(&mut self) -> Arc<Resolved> {
        loop {
            self.spawn_due();
            let mut deadline = self.cache.next_deadline();
            if self.state_dirty {
                let flush = self
                    .last_write
                    .map_or_else(Instant::now, |t| t + STATE_WRITE_INTERVAL);
                deadline = Some(deadline.map_or(flush, |d| d.min(flush)));
            }
            tokio::select! {
                delivery = self.rx.recv() => {
                    if let Some(d) = delivery {
                        self.deliver(d);
                    }
                    while let Ok(d) = self.rx.try_recv() {
                        self.deliver(d);
                    }
                }
                () = until(deadline) => self.cache.tick(Instant::now()),
            }
            self.publish_metrics();
            self.flush_state(false);
            if self.refresh_view() {
                return self.resolved.clone();
            }
        }
    }

    /// Drops draining addresses no established flow uses any more (`busy`: whether one does);
    /// returns the new view when that changed what is served.
    pub fn forget_idle_drained(&mut self, busy: impl Fn(&IpAddr) -> bool) -> Option<Arc<Resolved>> {
        if !self.cache.forget_idle_drained(busy) {
            return None;
        }
        self.refresh_view().then(|| self.resolved.clone())
    }

    /// Whether any name is looked up.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Writes the state file now (before exiting).
    pub fn flush_state_now(&mut self) {
        self.flush_state(true);
    }

    fn spawn_due(&mut self) {
        for (name, family) in self.cache.due(Instant::now()) {
            let lookup = self.lookup.lookup(name.clone(), family);
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let outcome = lookup.await;
                // The receiver lives as long as the agent.
                let _ = tx.send((name, family, outcome));
            });
        }
    }

    fn deliver(&mut self, (name, family, outcome): Delivery) {
        let now = Instant::now();
        let before = self.serving(&name, family);
        self.cache.record(&name, family, &outcome, now);
        let after = self.serving(&name, family);
        let rtype = record_type(family);
        match &outcome {
            Outcome::Answer { addrs, ttl } if before != after => tracing::info!(
                "DNS name {name} {rtype}: {} (TTL {} s){}",
                join(addrs),
                ttl.as_secs(),
                self.draining_note(&name, family)
            ),
            Outcome::Answer { .. } => {}
            Outcome::Failed(failure) => tracing::debug!("DNS name {name} {rtype}: {failure}"),
            other => tracing::debug!("DNS name {name} {rtype}: {}", other.result()),
        }
        self.state_dirty = true;
    }

    fn serving(&self, name: &Arc<str>, family: IpFamily) -> Option<Vec<IpAddr>> {
        self.cache
            .records()
            .find(|((n, f), _)| n == name && *f == family)
            .map(|(_, r)| r.serving().collect())
    }

    fn draining_note(&self, name: &Arc<str>, family: IpFamily) -> String {
        let draining: Vec<IpAddr> = self
            .cache
            .records()
            .find(|((n, f), _)| n == name && *f == family)
            .map(|(_, r)| r.draining().map(|(a, _)| a).collect())
            .unwrap_or_default();
        if draining.is_empty() {
            String::new()
        } else {
            format!("; draining (no new flows): {}", join(&draining))
        }
    }

    /// Recomputes the view; true when it changed.
    fn refresh_view(&mut self) -> bool {
        let view = self.cache.view();
        if view == *self.resolved {
            return false;
        }
        self.resolved = Arc::new(view);
        self.state_dirty = true;
        true
    }

    fn publish_metrics(&self) {
        if let Some(t) = &self.telemetry {
            t.set_dns_metrics(report::metrics(&self.cache, Instant::now()));
        }
    }

    fn flush_state(&mut self, force: bool) {
        let Some(dir) = &self.state_dir else {
            // Nowhere to write: nothing to wait for either.
            self.state_dirty = false;
            return;
        };
        let recent = self
            .last_write
            .is_some_and(|t| t.elapsed() < STATE_WRITE_INTERVAL);
        if !self.state_dirty || (recent && !force) {
            return;
        }
        self.state_dirty = false;
        self.last_write = Some(Instant::now());
        let state = report::DnsState::of(&self.cache, &self.lookup.describe(), Instant::now());
        if let Err(err) = report::write(dir, &state) {
            tracing::warn!(
                "cannot write {}: {err} (extproxy inspect will not show DNS names)",
                report::path(dir).display()
            );
        }
    }
}

/// The record type of a family.
pub fn record_type(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "A",
        IpFamily::V6 => "AAAA",
    }
}

fn join(addrs: &[IpAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => futures::future::pending().await,
    }
}

/// `--dns-server ADDR[:PORT]`.
pub fn parse_server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s}: expected an IP address, IP:PORT or [IPv6]:PORT"))
}

/// A duration flag: seconds, or a number with s, m, h or d (`90`, `90s`, `5m`, `1h`, `1d`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => s.split_at(at),
        None => (s, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s}: expected a number of seconds, or a number with s, m, h or d"))?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("{s}: unknown unit {other:?} (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(factor)))
}

/// For the summary at start: how many names, families.
pub fn describe_wanted(wanted: &Wanted) -> String {
    let mut families: BTreeMap<&str, usize> = BTreeMap::new();
    for f in wanted.values().flatten() {
        *families.entry(record_type(*f)).or_default() += 1;
    }
    let parts: Vec<String> = families.iter().map(|(t, n)| format!("{n} {t}")).collect();
    format!("{} name(s) ({})", wanted.len(), parts.join(", "))
}

#[cfg(test)]
mod tests;
