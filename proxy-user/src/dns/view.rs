//! What the translator reads of the resolver: for each name and IP family, the addresses to
//! serve, the addresses draining and the condition of the answer. Plain, comparable data: a
//! translation is a function of it, like of the Services and EndpointSlices.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::translate::IpFamily;

/// Why a lookup gave no answer. Coarse on purpose: a diagnostic (and so a Kubernetes Event)
/// names it, and a new text would be a new Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Failure {
    /// No server answered in time.
    Timeout,
    /// A server answered SERVFAIL.
    ServFail,
    /// A server refused the query (REFUSED), or answered with another error code.
    Refused,
    /// No server could be reached (network unreachable, connection refused).
    Unreachable,
    /// Anything else the resolver reported.
    Other,
}

impl Failure {
    pub fn describe(self) -> &'static str {
        match self {
            Failure::Timeout => "timed out",
            Failure::ServFail => "SERVFAIL",
            Failure::Refused => "refused",
            Failure::Unreachable => "no server reachable",
            Failure::Other => "resolver error",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Where a name's answer for one family stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    /// Not asked yet, or the first lookup is under way.
    Pending,
    /// The last lookup answered, within its TTL (or being asked again).
    Fresh,
    /// The name exists but has no record of this family (NOERROR, no data).
    NoData,
    /// Lookups fail; the last good answer is served past its TTL (stale-if-error, RFC 8767).
    Stale(Failure),
    /// Lookups have failed for longer than the stale bound: the last answer is no longer used.
    Expired(Failure),
    /// Lookups have failed from the start: there never was an answer.
    Failed(Failure),
    /// NXDOMAIN, not confirmed yet: the last good addresses are still served.
    NxDomainUnconfirmed,
    /// NXDOMAIN, confirmed: the name does not exist; its former addresses drain.
    NxDomain,
}

impl Condition {
    /// The short word `inspect` and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Condition::Pending => "pending",
            Condition::Fresh => "fresh",
            Condition::NoData => "nodata",
            Condition::Stale(_) => "stale",
            Condition::Expired(_) => "expired",
            Condition::Failed(_) => "failed",
            Condition::NxDomainUnconfirmed => "nxdomain-unconfirmed",
            Condition::NxDomain => "nxdomain",
        }
    }

    pub const ALL_NAMES: [&'static str; 8] = [
        "pending",
        "fresh",
        "nodata",
        "stale",
        "expired",
        "failed",
        "nxdomain-unconfirmed",
        "nxdomain",
    ];
}

/// A name's answer for one IP family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyAnswer {
    /// Addresses new flows may go to: the last good answer's.
    pub serving: Vec<IpAddr>,
    /// Addresses that left the answer (or whose answer is no longer used): their established
    /// flows continue, new flows go elsewhere, until the drain bound.
    pub draining: Vec<IpAddr>,
    pub condition: Condition,
}

/// A name's answers, for the families some Service wants it in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameAnswer {
    pub families: BTreeMap<IpFamily, FamilyAnswer>,
}

/// Every name's answers: an input of the translation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    names: BTreeMap<Arc<str>, Arc<NameAnswer>>,
}

impl Resolved {
    pub fn new(names: BTreeMap<Arc<str>, Arc<NameAnswer>>) -> Self {
        Resolved { names }
    }

    pub fn get(&self, name: &str) -> Option<&NameAnswer> {
        self.names.get(name).map(|a| &**a)
    }

    pub fn names(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<NameAnswer>)> {
        self.names.iter()
    }

    /// The names whose answers differ between `self` and `other` (either may lack a name).
    pub fn changed_names(&self, other: &Resolved) -> BTreeSet<Arc<str>> {
        let mut changed = BTreeSet::new();
        for (name, answer) in &self.names {
            if other.names.get(name) != Some(answer) {
                changed.insert(name.clone());
            }
        }
        for name in other.names.keys() {
            if !self.names.contains_key(name) {
                changed.insert(name.clone());
            }
        }
        changed
    }
}

/// The IP families to look each name up in: A for IPv4 Service ports, AAAA for IPv6.
pub type Wanted = BTreeMap<Arc<str>, BTreeSet<IpFamily>>;

/// Whether `name` is a name the API server accepts in an FQDN EndpointSlice: an RFC 1123
/// subdomain (lower case letters, digits, `-` and `.`, labels of 1-63 characters that start and
/// end with a letter or digit, 253 characters at most) with at least two labels. The reason when
/// it is not.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > 253 {
        return Err(format!("{} characters, at most 253", name.len()));
    }
    if name.ends_with('.') {
        return Err("ends with a dot (write the name without the root's dot)".into());
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err("one label only: an FQDN has at least two (name.domain)".into());
    }
    for label in labels {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("label {label:?} is not 1-63 characters"));
        }
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        if !label.chars().all(|c| ok(c) || c == '-') {
            return Err(format!(
                "label {label:?} has characters other than lower case letters, digits and '-'"
            ));
        }
        if !label.starts_with(ok) || !label.ends_with(ok) {
            return Err(format!(
                "label {label:?} does not start and end with a letter or digit"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_as_the_api_server_does() {
        for good in ["db.example.com", "a.b", "x-1.y2.z", "1.2.3.4.nip.io"] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "localhost",
            "DB.example.com",
            "db.example.com.",
            "-a.b",
            "a-.b",
            "a..b",
            "a_b.c",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_name(&format!("{}.com", "a".repeat(64))).is_err());
    }

    #[test]
    fn changed_names_compare_answers() {
        let answer = |ip: &str| {
            Arc::new(NameAnswer {
                families: [(
                    IpFamily::V4,
                    FamilyAnswer {
                        serving: vec![ip.parse().unwrap()],
                        draining: vec![],
                        condition: Condition::Fresh,
                    },
                )]
                .into(),
            })
        };
        let a = Resolved::new(
            [
                (Arc::from("a.test"), answer("192.0.2.1")),
                (Arc::from("b.test"), answer("192.0.2.2")),
            ]
            .into(),
        );
        let b = Resolved::new(
            [
                (Arc::from("a.test"), answer("192.0.2.1")),
                (Arc::from("b.test"), answer("192.0.2.3")),
                (Arc::from("c.test"), answer("192.0.2.4")),
            ]
            .into(),
        );
        let changed: Vec<String> = a.changed_names(&b).iter().map(|n| n.to_string()).collect();
        assert_eq!(changed, ["b.test", "c.test"]);
        assert!(a.changed_names(&a.clone()).is_empty());
    }
}
