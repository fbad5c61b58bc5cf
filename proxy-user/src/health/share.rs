//! Kubernetes mode: bounding the probe load. Nodes labelled `extproxy.io/health-prober: "true"`
//! probe and publish their active verdicts in a Lease each (`extproxy-health-NODE` in the
//! agent's namespace); every other node follows the live probers' verdicts instead of probing.
//! A Lease per prober means no two nodes ever write one object; its renew time says whether the
//! prober is alive.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};

use super::Endpoints;
use crate::translate::{ObjectKey, Protocol};

pub const LEASE_PREFIX: &str = "extproxy-health-";
/// On every verdicts Lease, to watch them alone.
pub const VERDICTS_LABEL: &str = "extproxy.io/health-verdicts";
/// The verdicts: JSON, Service "namespace/name" -> ["address:port/PROTOCOL", ...].
pub const UNHEALTHY_ANNOTATION: &str = "extproxy.io/unhealthy";
/// A prober renews its Lease this often, and at once when its verdicts change.
pub const RENEW: Duration = Duration::from_secs(10);
/// A Lease not renewed for this long is a gone prober's.
pub const LEASE_SECONDS: i32 = 30;
/// The namespace when POD_NAMESPACE is not set (deploy/ sets it).
pub const DEFAULT_NAMESPACE: &str = "extproxy-system";

/// One prober's published verdicts.
#[derive(Clone, Debug, PartialEq)]
struct Published {
    node: String,
    renewed: Option<SystemTime>,
    duration: Duration,
    unhealthy: BTreeSet<(ObjectKey, SocketAddr, Protocol)>,
}

/// Publishing this node's verdicts and reading the others'.
pub struct Sharing {
    api: Api<Lease>,
    node: String,
    leases: Arc<Mutex<BTreeMap<String, Published>>>,
    last_published: Option<(Endpoints, std::time::Instant)>,
    publishing: bool,
}

impl Sharing {
    /// Starts watching the verdicts Leases in `namespace`.
    pub fn start(client: kube::Client, namespace: &str, node: &str) -> Self {
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let leases: Arc<Mutex<BTreeMap<String, Published>>> = Arc::default();
        let store = leases.clone();
        let config = watcher::Config::default().labels(&format!("{VERDICTS_LABEL}=true"));
        let stream = watcher(api.clone(), config).default_backoff();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut listing: Option<BTreeMap<String, Published>> = None;
            // Said once per run of failures (a missing Role would otherwise be silent).
            let mut failing = false;
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(event) => {
                        failing = false;
                        event
                    }
                    Err(err) => {
                        if !failing {
                            tracing::warn!(
                                "cannot read the health verdicts prober nodes publish \
                                 (Leases): {err}; this node probes by itself meanwhile"
                            );
                        }
                        failing = true;
                        continue;
                    }
                };
                let mut shared = store.lock().unwrap_or_else(|e| e.into_inner());
                match event {
                    watcher::Event::Init => listing = Some(BTreeMap::new()),
                    watcher::Event::InitApply(lease) => {
                        if let (Some(l), Some(p)) = (&mut listing, parse(&lease)) {
                            l.insert(p.node.clone(), p);
                        }
                    }
                    watcher::Event::InitDone => {
                        if let Some(l) = listing.take() {
                            *shared = l;
                        }
                    }
                    watcher::Event::Apply(lease) => {
                        if let Some(p) = parse(&lease) {
                            shared.insert(p.node.clone(), p);
                        }
                    }
                    watcher::Event::Delete(lease) => {
                        if let Some(p) = parse(&lease) {
                            shared.remove(&p.node);
                        }
                    }
                }
            }
        });
        Sharing {
            api,
            node: node.to_owned(),
            leases,
            last_published: None,
            publishing: false,
        }
    }

    /// What this node should follow: the verdicts of the live probers other than itself (an
    /// endpoint is unhealthy when more than half of them say so); None when this node is a
    /// prober or there is no live prober.
    pub fn to_follow(&self, prober: bool, now: SystemTime) -> Option<Arc<Endpoints>> {
        if prober {
            return None;
        }
        let leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        majority(leases.values(), &self.node, now).map(Arc::new)
    }

    /// A prober publishes `verdicts` when they changed, and renews its Lease every [`RENEW`];
    /// the write runs in the background.
    pub fn publish(&mut self, verdicts: Endpoints) {
        let now = std::time::Instant::now();
        let due = match &self.last_published {
            None => true,
            Some((last, at)) => *last != verdicts || now.duration_since(*at) >= RENEW,
        };
        if !due || self.publishing {
            return;
        }
        self.last_published = Some((verdicts.clone(), now));
        let lease = lease(&self.node, &verdicts);
        let api = self.api.clone();
        let name = format!("{LEASE_PREFIX}{}", self.node);
        tokio::spawn(async move {
            let params = PatchParams::apply("extproxy").force();
            if let Err(err) = api.patch(&name, &params, &Patch::Apply(&lease)).await {
                tracing::warn!("cannot publish health verdicts in Lease {name}: {err}");
            }
        });
    }
}

/// The Lease a prober publishes.
fn lease(node: &str, verdicts: &Endpoints) -> Lease {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (service, endpoints) in verdicts {
        map.insert(
            format!("{}/{}", service.namespace, service.name),
            endpoints
                .iter()
                .map(|(ip, port, proto)| {
                    format!("{}/{}", SocketAddr::new(*ip, *port), proto.name())
                })
                .collect(),
        );
    }
    Lease {
        metadata: ObjectMeta {
            name: Some(format!("{LEASE_PREFIX}{node}")),
            labels: Some([(VERDICTS_LABEL.to_owned(), "true".to_owned())].into()),
            annotations: Some(
                [(
                    UNHEALTHY_ANNOTATION.to_owned(),
                    serde_json::to_string(&map).unwrap_or_default(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_owned()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        }),
    }
}

fn parse(lease: &Lease) -> Option<Published> {
    let spec = lease.spec.as_ref()?;
    let node = spec.holder_identity.clone()?;
    let renewed = spec.renew_time.as_ref().map(|t| SystemTime::from(t.0));
    let duration =
        Duration::from_secs(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS).max(1) as u64);
    let text = lease
        .metadata
        .annotations
        .as_ref()?
        .get(UNHEALTHY_ANNOTATION)?;
    let map: BTreeMap<String, Vec<String>> = serde_json::from_str(text).ok()?;
    let mut unhealthy = BTreeSet::new();
    for (service, endpoints) in map {
        let Some((namespace, name)) = service.split_once('/') else {
            continue;
        };
        for e in endpoints {
            let Some((addr, proto)) = e.rsplit_once('/') else {
                continue;
            };
            let proto = match proto {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => continue,
            };
            if let Ok(addr) = addr.parse::<SocketAddr>() {
                unhealthy.insert((ObjectKey::new(namespace, name), addr, proto));
            }
        }
    }
    Some(Published {
        node,
        renewed,
        duration,
        unhealthy,
    })
}

/// The endpoints more than half of the live probers (other than `me`) judge unhealthy; None
/// without a live prober.
fn majority<'a>(
    leases: impl Iterator<Item = &'a Published>,
    me: &str,
    now: SystemTime,
) -> Option<Endpoints> {
    let live: Vec<&Published> = leases
        .filter(|p| p.node != me)
        .filter(|p| p.renewed.is_some_and(|r| r + p.duration > now))
        .collect();
    if live.is_empty() {
        return None;
    }
    let mut votes: BTreeMap<&(ObjectKey, SocketAddr, Protocol), usize> = BTreeMap::new();
    for p in &live {
        for e in &p.unhealthy {
            *votes.entry(e).or_default() += 1;
        }
    }
    let mut out = Endpoints::new();
    for ((service, addr, proto), n) in votes {
        if n * 2 > live.len() {
            out.entry(service.clone())
                .or_default()
                .insert((addr.ip(), addr.port(), *proto));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(list: &[(&str, &str)]) -> Endpoints {
        let mut out = Endpoints::new();
        for (service, endpoint) in list {
            let (ns, name) = service.split_once('/').unwrap();
            let addr: SocketAddr = endpoint.parse().unwrap();
            out.entry(ObjectKey::new(ns, name)).or_default().insert((
                addr.ip(),
                addr.port(),
                Protocol::Tcp,
            ));
        }
        out
    }

    #[test]
    fn a_lease_round_trips() {
        let v = verdicts(&[
            ("shop/db", "203.0.113.7:5432"),
            ("shop/db", "[2001:db8::7]:5432"),
        ]);
        let lease = lease("node-a", &v);
        assert_eq!(
            lease.metadata.name.as_deref(),
            Some("extproxy-health-node-a")
        );
        let p = parse(&lease).unwrap();
        assert_eq!(p.node, "node-a");
        assert_eq!(p.duration, Duration::from_secs(30));
        let again: Endpoints = majority([&p].into_iter(), "node-b", SystemTime::now()).unwrap();
        assert_eq!(again, v);
    }

    #[test]
    fn followers_go_with_the_majority_of_live_probers() {
        let now = SystemTime::now();
        let published = |node: &str, age: u64, list: &[(&str, &str)]| {
            let mut p = parse(&lease(node, &verdicts(list))).unwrap();
            p.renewed = Some(now - Duration::from_secs(age));
            p
        };
        let a = published("a", 1, &[("s/x", "10.0.0.7:80"), ("s/x", "10.0.0.8:80")]);
        let b = published("b", 1, &[("s/x", "10.0.0.7:80")]);
        let c = published("c", 1, &[]);
        // Two of three say 10.0.0.7 is down; one says 10.0.0.8.
        assert_eq!(
            majority([&a, &b, &c].into_iter(), "me", now).unwrap(),
            verdicts(&[("s/x", "10.0.0.7:80")])
        );
        // A tie is not a majority.
        assert_eq!(
            majority([&a, &c].into_iter(), "me", now).unwrap(),
            Endpoints::new()
        );
        // A Lease not renewed within its duration is a gone prober's; none live: probe yourself.
        let stale = published("d", 31, &[("s/x", "10.0.0.9:80")]);
        assert_eq!(majority([&stale].into_iter(), "me", now), None);
        // A prober does not follow itself.
        assert_eq!(majority([&a].into_iter(), "a", now), None);
    }
}
