//! What the DNS side tells people: the words of its diagnostics (which become log lines and
//! Kubernetes Events), Prometheus metrics per name, and the state file `extproxy inspect` reads.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::cache::{Cache, LOOKUP_RESULTS};
use super::record_type;
use super::view::{Condition, FamilyAnswer};
use crate::diag::Severity;
use crate::translate::IpFamily;

pub const STATE_FILE: &str = "dns.json";

/// Every DNS diagnostic starts so: [`event_reason`] recognises them by it.
const PREFIX: &str = "DNS name";

/// What is wrong with a name's answer for one family, if anything. The text only changes when
/// the situation does (no times, no counts): a new text is a new log line and a new Event.
pub fn problem(name: &str, family: IpFamily, answer: &FamilyAnswer) -> Option<(Severity, String)> {
    let rtype = record_type(family);
    let fam = family.name();
    let addrs = |list: &[IpAddr]| {
        list.iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let draining = if answer.draining.is_empty() {
        String::new()
    } else {
        format!(
            "; {} drain (established flows go on, no new ones)",
            addrs(&answer.draining)
        )
    };
    Some(match answer.condition {
        Condition::Pending | Condition::Fresh => return None,
        Condition::NoData => (
            Severity::Warning,
            format!("{PREFIX} {name} has no {rtype} record: no {fam} endpoints from it{draining}"),
        ),
        Condition::Stale(failure) => (
            Severity::Warning,
            format!(
                "{PREFIX} {name} ({rtype}): the resolver does not answer ({failure}); its last \
                 answer ({}) is served past its TTL (stale-if-error, up to --dns-stale-for)",
                addrs(&answer.serving)
            ),
        ),
        Condition::Expired(failure) => (
            Severity::Error,
            format!(
                "{PREFIX} {name} ({rtype}): the resolver has not answered for longer than \
                 --dns-stale-for ({failure}): no {fam} endpoints from it{draining}"
            ),
        ),
        Condition::Failed(failure) => (
            Severity::Error,
            format!(
                "{PREFIX} {name} ({rtype}): the resolver does not answer ({failure}) and never \
                 has: no {fam} endpoints from it yet"
            ),
        ),
        Condition::NxDomainUnconfirmed => (
            Severity::Warning,
            format!(
                "{PREFIX} {name}: NXDOMAIN (the name does not exist); its addresses ({}) are \
                 served until a lookup --dns-nxdomain-for later says so too",
                addrs(&answer.serving)
            ),
        ),
        Condition::NxDomain => (
            Severity::Error,
            format!(
                "{PREFIX} {name}: NXDOMAIN (the name does not exist): no {fam} endpoints from \
                 it{draining}"
            ),
        ),
    })
}

/// The Kubernetes Event reason of a DNS diagnostic, None for other diagnostics.
pub fn event_reason(message: &str) -> Option<&'static str> {
    if !message.starts_with(PREFIX) {
        return None;
    }
    Some(if message.contains("NXDOMAIN") {
        "DNSNameNotFound"
    } else if message.contains("stale-if-error") {
        "DNSStaleAnswer"
    } else if message.contains("resolver") {
        "DNSResolutionFailed"
    } else {
        "DNSNoAddresses"
    })
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The Prometheus text of every name: labelled by name and family (and a fixed set of results
/// or conditions), never by address, so rotating answers add no series.
pub fn metrics(cache: &Cache, now: Instant) -> String {
    let mut out = String::new();
    let labels = |name: &str, family: IpFamily| {
        format!("name=\"{}\",family=\"{}\"", escape(name), family.name())
    };
    family_header(
        &mut out,
        "extproxy_dns_lookups_total",
        "counter",
        "DNS lookups of FQDN endpoints by name, family and result (answer, nodata, nxdomain, error).",
    );
    for ((name, family), r) in cache.records() {
        for (i, result) in LOOKUP_RESULTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "extproxy_dns_lookups_total{{{},result=\"{result}\"}} {}",
                labels(name, *family),
                r.lookups[i]
            );
        }
    }
    family_header(
        &mut out,
        "extproxy_dns_addresses",
        "gauge",
        "Addresses of a name served (state=serving) and draining (state=draining: left the \
         answer, established flows kept).",
    );
    for ((name, family), r) in cache.records() {
        let l = labels(name, *family);
        let _ = writeln!(
            out,
            "extproxy_dns_addresses{{{l},state=\"serving\"}} {}",
            r.serving().count()
        );
        let _ = writeln!(
            out,
            "extproxy_dns_addresses{{{l},state=\"draining\"}} {}",
            r.draining().count()
        );
    }
    family_header(
        &mut out,
        "extproxy_dns_condition",
        "gauge",
        "1 for the condition of a name's answer: pending, fresh, nodata, stale (served past its \
         TTL because lookups fail), expired, failed, nxdomain-unconfirmed, nxdomain.",
    );
    for ((name, family), r) in cache.records() {
        let l = labels(name, *family);
        for condition in Condition::ALL_NAMES {
            let _ = writeln!(
                out,
                "extproxy_dns_condition{{{l},condition=\"{condition}\"}} {}",
                u8::from(r.condition().name() == condition)
            );
        }
    }
    family_header(
        &mut out,
        "extproxy_dns_ttl_seconds",
        "gauge",
        "The TTL of a name's last answer (before --dns-min-ttl/--dns-max-ttl clamp it).",
    );
    for ((name, family), r) in cache.records() {
        if let Some(ttl) = r.ttl() {
            let _ = writeln!(
                out,
                "extproxy_dns_ttl_seconds{{{}}} {}",
                labels(name, *family),
                ttl.as_secs()
            );
        }
    }
    family_header(
        &mut out,
        "extproxy_dns_failing_seconds",
        "gauge",
        "How long lookups of a name have been failing (0 while it answers).",
    );
    for ((name, family), r) in cache.records() {
        let failing = r
            .failing_since()
            .map_or(0, |t| now.saturating_duration_since(t).as_secs());
        let _ = writeln!(
            out,
            "extproxy_dns_failing_seconds{{{}}} {failing}",
            labels(name, *family)
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The state file
// ---------------------------------------------------------------------------------------------

/// What `extproxy inspect` shows of the names.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsState {
    /// Which servers are asked.
    pub servers: String,
    /// When this was written (seconds since the epoch): the durations below are as of then.
    pub written_at: u64,
    pub names: Vec<NameState>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NameState {
    pub name: String,
    pub family: String,
    pub condition: Condition,
    pub serving: Vec<IpAddr>,
    /// Draining addresses, with how long each has drained.
    pub draining: Vec<(IpAddr, u64)>,
    pub ttl_secs: Option<u64>,
    pub next_lookup_in_secs: u64,
    pub answered_secs_ago: Option<u64>,
    pub failing_for_secs: Option<u64>,
    /// Lookups by result: answer, nodata, nxdomain, error.
    pub lookups: [u64; 4],
}

impl DnsState {
    pub fn of(cache: &Cache, servers: &str, now: Instant) -> Self {
        let ago = |t: Instant| now.saturating_duration_since(t).as_secs();
        DnsState {
            servers: servers.to_owned(),
            written_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            names: cache
                .records()
                .map(|((name, family), r)| NameState {
                    name: name.to_string(),
                    family: family.name().to_owned(),
                    condition: r.condition(),
                    serving: r.serving().collect(),
                    draining: r.draining().map(|(a, since)| (a, ago(since))).collect(),
                    ttl_secs: r.ttl().map(|t| t.as_secs()),
                    next_lookup_in_secs: r.next_query().saturating_duration_since(now).as_secs(),
                    answered_secs_ago: r.answered_at().map(ago),
                    failing_for_secs: r.failing_since().map(ago),
                    lookups: r.lookups,
                })
                .collect(),
        }
    }

    /// What the agent that wrote this served, as of `now` (for a restarted agent).
    pub fn restored(
        &self,
        now: Instant,
    ) -> std::collections::BTreeMap<(std::sync::Arc<str>, IpFamily), super::Restored> {
        let unix_now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // How long ago the file was written; the durations in it are as of then.
        let age = unix_now.saturating_sub(self.written_at);
        let ago = |secs: u64| now.checked_sub(Duration::from_secs(secs + age));
        self.names
            .iter()
            .filter_map(|n| {
                let family = match n.family.as_str() {
                    "IPv4" => IpFamily::V4,
                    "IPv6" => IpFamily::V6,
                    _ => return None,
                };
                let answered_at = n.answered_secs_ago.and_then(ago);
                let ttl = n.ttl_secs.map(Duration::from_secs);
                let restored = super::Restored {
                    serving: n.serving.clone(),
                    draining: n
                        .draining
                        .iter()
                        .filter_map(|(a, secs)| Some((*a, ago(*secs)?)))
                        .collect(),
                    ttl,
                    answered_at,
                    expires: answered_at.zip(ttl).map(|(at, ttl)| at + ttl),
                };
                Some(((std::sync::Arc::from(n.name.as_str()), family), restored))
            })
            .collect()
    }

    /// The heading of `extproxy inspect`'s table: which resolver, as of when.
    pub fn title(&self) -> String {
        let age = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .saturating_sub(self.written_at);
        format!(
            "resolver {}; as of {}",
            self.servers,
            human(Duration::from_secs(age), "ago")
        )
    }

    /// The rows of `extproxy inspect`'s table: name, record type, state (and for how long
    /// lookups have failed), TTL, next lookup, addresses (draining ones marked).
    pub fn rows(&self) -> Vec<Vec<String>> {
        self.names
            .iter()
            .map(|n| {
                let rtype = if n.family == "IPv6" { "AAAA" } else { "A" };
                let mut state = n.condition.name().to_owned();
                if let Some(f) = n.failing_for_secs {
                    state = format!("{state} (failing {})", human(Duration::from_secs(f), ""));
                }
                let mut addrs: Vec<String> = n.serving.iter().map(IpAddr::to_string).collect();
                addrs.extend(n.draining.iter().map(|(a, secs)| {
                    format!("{a} (draining {})", human(Duration::from_secs(*secs), ""))
                }));
                vec![
                    n.name.clone(),
                    rtype.to_owned(),
                    state,
                    n.ttl_secs
                        .map_or_else(|| "-".to_owned(), |t| format!("{t}s")),
                    format!("{}s", n.next_lookup_in_secs),
                    if addrs.is_empty() {
                        "-".to_owned()
                    } else {
                        addrs.join(" ")
                    },
                ]
            })
            .collect()
    }
}

fn human(d: Duration, suffix: &str) -> String {
    let s = d.as_secs();
    let text = if s < 120 {
        format!("{s}s")
    } else if s < 7200 {
        format!("{}m", s / 60)
    } else {
        format!("{}h", s / 3600)
    };
    if suffix.is_empty() {
        text
    } else {
        format!("{text} {suffix}")
    }
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

pub fn write(dir: &Path, state: &DnsState) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, path(dir))
}

/// The state file of a running agent; None when it has no FQDN endpoints (or none is running).
pub fn read(dir: &Path) -> Option<DnsState> {
    let bytes = std::fs::read(path(dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::view::Failure;

    fn answer(condition: Condition, serving: &[&str], draining: &[&str]) -> FamilyAnswer {
        FamilyAnswer {
            serving: serving.iter().map(|s| s.parse().unwrap()).collect(),
            draining: draining.iter().map(|s| s.parse().unwrap()).collect(),
            condition,
        }
    }

    #[test]
    fn problems_are_said_once_per_situation_with_their_event_reason() {
        let name = "db.example.com";
        assert_eq!(
            problem(
                name,
                IpFamily::V4,
                &answer(Condition::Fresh, &["192.0.2.1"], &[])
            ),
            None
        );
        let cases = [
            (
                answer(Condition::Stale(Failure::Timeout), &["192.0.2.1"], &[]),
                Severity::Warning,
                "DNSStaleAnswer",
                "DNS name db.example.com (A): the resolver does not answer (timed out); its last answer (192.0.2.1) is served past its TTL (stale-if-error, up to --dns-stale-for)",
            ),
            (
                answer(Condition::NxDomain, &[], &["192.0.2.1"]),
                Severity::Error,
                "DNSNameNotFound",
                "DNS name db.example.com: NXDOMAIN (the name does not exist): no IPv4 endpoints from it; 192.0.2.1 drain (established flows go on, no new ones)",
            ),
            (
                answer(Condition::Expired(Failure::ServFail), &[], &[]),
                Severity::Error,
                "DNSResolutionFailed",
                "DNS name db.example.com (A): the resolver has not answered for longer than --dns-stale-for (SERVFAIL): no IPv4 endpoints from it",
            ),
            (
                answer(Condition::NoData, &[], &[]),
                Severity::Warning,
                "DNSNoAddresses",
                "DNS name db.example.com has no A record: no IPv4 endpoints from it",
            ),
        ];
        for (a, severity, reason, text) in cases {
            let (s, t) = problem(name, IpFamily::V4, &a).unwrap();
            assert_eq!((s, t.as_str()), (severity, text));
            assert_eq!(event_reason(&t), Some(reason));
        }
        assert_eq!(
            event_reason("no endpoints: connections will be refused"),
            None
        );
    }
}
