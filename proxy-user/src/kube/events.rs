//! Kubernetes Events on claimed Services for problems their owners must fix, in the same words
//! as the log line, so `kubectl describe service` shows what the agent's log says.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{self, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client, Resource};

use super::cluster::ClusterState;
use crate::diag::{Diagnostic, Severity};
use crate::metrics::Telemetry;
use crate::names::SERVICE_NAME_LABEL;
use crate::translate::{ObjectKey, Translation};

/// The Events API caps notes at 1 kB.
const MAX_NOTE: usize = 1024;
/// ... and actions at 128 characters.
const MAX_ACTION: usize = 128;

/// An Event to publish: one problem of one claimed Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProblemEvent {
    pub service: ObjectKey,
    /// The EndpointSlice the problem is in, when it is not in the Service itself.
    pub slice: Option<ObjectKey>,
    pub reason: &'static str,
    /// The diagnostic's field, which keeps different problems of one Service apart.
    pub field: Option<String>,
    /// The log line.
    pub note: String,
}

/// The Event reason for a diagnostic: the problems users hit most have their own, the rest
/// are named by the kind of object they are in.
pub fn reason(d: &Diagnostic) -> &'static str {
    let field = d.field.as_deref().unwrap_or("");
    let kind = d.object.as_ref().map_or("", |o| &*o.kind);
    if let Some(reason) = crate::dns::report::event_reason(&d.message) {
        reason
    } else if d.message.starts_with("no endpoints") {
        "NoEndpoints"
    } else if d.message.contains("every endpoint is unhealthy") {
        "AllEndpointsUnhealthy"
    } else if field.contains("extproxy.io/health-check") {
        "InvalidHealthCheck"
    } else if field.starts_with("spec.ports[") && d.message.contains("matches no endpoint port") {
        "PortNameMismatch"
    } else if field.contains("loadBalancerSourceRanges")
        || field.contains("load-balancer-source-ranges")
    {
        "BadSourceRange"
    } else if d.message.contains("egress IP") {
        "NoEgressIP"
    } else if kind == "Service" {
        "InvalidService"
    } else {
        "InvalidEndpoints"
    }
}

/// Decides which diagnostics become Events: errors and warnings about claimed Services (or
/// their slices), each once for as long as it stays open. Notes are kept as published
/// (truncated), which is how an Event is recognised later.
#[derive(Default)]
pub struct EventTracker {
    open: BTreeSet<String>,
}

impl EventTracker {
    pub fn plan(&mut self, translation: &Translation, cluster: &ClusterState) -> Vec<ProblemEvent> {
        let claimed: BTreeSet<&ObjectKey> =
            translation.claimed.iter().map(|c| &c.service).collect();
        let mut open = BTreeSet::new();
        let mut events = Vec::new();
        for d in &translation.diagnostics {
            if d.severity == Severity::Info {
                continue;
            }
            let Some(object) = &d.object else { continue };
            let key = ObjectKey::new(&object.namespace, &object.name);
            let (service, slice) = match &*object.kind {
                "Service" => (key, None),
                "EndpointSlice" => {
                    let Some(name) = cluster
                        .slice(&key)
                        .and_then(|s| s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL).cloned())
                    else {
                        continue;
                    };
                    (ObjectKey::new(&key.namespace, name), Some(key))
                }
                _ => continue,
            };
            if !claimed.contains(&service) {
                continue;
            }
            let note = truncate(&d.to_string(), MAX_NOTE);
            if !self.open.contains(&note) {
                events.push(ProblemEvent {
                    service,
                    slice,
                    reason: reason(d),
                    field: d.field.clone(),
                    note: note.clone(),
                });
            }
            open.insert(note);
        }
        self.open = open;
        events
    }

    /// The problem is still open (as of the last [`EventTracker::plan`]).
    pub fn is_open(&self, event: &ProblemEvent) -> bool {
        self.open.contains(&event.note)
    }
}

/// How long a problem must stay open before it becomes an Event. The watches are independent
/// streams: a Service created just before its EndpointSlice, or the Services relisted a moment
/// before the EndpointSlices after an outage, show "no endpoints" for a moment, and such a
/// passing state must not leave a Warning on the Service for an hour.
pub const EVENT_SETTLE: Duration = Duration::from_secs(5);

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// FNV-1a: a hash every agent version computes alike, so every node names an Event the same.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The Event's name: the Service and a hash of the problem. Every node sees the same problems,
/// and a restarted agent sees them again; with one name per problem only the first create
/// succeeds (the rest get 409 AlreadyExists), so a Service gets one Event per problem, not one
/// per node and restart. kube-rs's `Recorder` names Events by time and dedupes only within
/// one process, which on a DaemonSet means N copies. Repeated episodes of the problem are
/// counted in that Event's `series` (see [`Publisher::publish`]).
pub fn event_name(service_name: &str, uid: &str, event: &ProblemEvent) -> String {
    let field = event.field.as_deref().unwrap_or("");
    let hash = fnv1a(&[uid, event.reason, field, &event.note]);
    format!("{service_name}.extproxy-{hash:016x}")
}

/// Reports of one problem closer together than this are one episode. Every node sees a
/// problem begin within moments of the others (they watch the same API server), so the first
/// report creates or counts the Event and the others find it fresh and leave it. It also
/// bounds how often a flapping problem updates its Event: at most once per gap, cluster-wide.
pub const EPISODE_GAP: Duration = Duration::from_secs(60);

/// When an Event was last seen to happen: its series' last observation, else its creation.
fn last_observed(event: &K8sEvent) -> Option<Timestamp> {
    event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or(event.event_time.as_ref().map(|t| t.0))
}

/// The existing Event counting one more episode seen at `now`, or None when it was observed
/// less than `gap` ago (the same episode, reported by another node first).
fn next_episode(existing: &K8sEvent, now: Timestamp, gap: Duration) -> Option<K8sEvent> {
    let gap = jiff::SignedDuration::try_from(gap).unwrap_or(jiff::SignedDuration::MAX);
    if let Some(last) = last_observed(existing)
        && now.duration_since(last) < gap
    {
        return None;
    }
    let mut updated = existing.clone();
    updated.series = Some(EventSeries {
        // The first occurrence is the Event itself; a series starts at 2.
        count: existing.series.as_ref().map_or(1, |s| s.count) + 1,
        last_observed_time: MicroTime(now),
    });
    Some(updated)
}

/// What became of one report.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    Created,
    /// An existing Event counts this episode: its series count now.
    Counted(i32),
    /// Already reported: by another node for this episode, or before this agent started.
    AlreadyThere,
}

/// Creates the Event, or when it exists and `count_episode`, counts a new episode in it.
/// Concurrent reporters are ordered by the API server: a create loses with 409 AlreadyExists,
/// an update of a stale copy with 409 Conflict; the loser looks again and finds the episode
/// counted.
async fn deliver(
    api: &Api<K8sEvent>,
    event: &K8sEvent,
    count_episode: bool,
    gap: Duration,
) -> Result<Delivery, kube::Error> {
    let name = event.metadata.name.as_deref().unwrap_or_default();
    // Each round ends in a decision unless another writer got in between; three rounds cover
    // a create and an update racing this one.
    for _ in 0..3 {
        match api.create(&PostParams::default(), event).await {
            Ok(_) => return Ok(Delivery::Created),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => return Err(err),
        }
        if !count_episode {
            return Ok(Delivery::AlreadyThere);
        }
        // Expired (--event-ttl) since the create: create it again.
        let Some(existing) = api.get_opt(name).await? else {
            continue;
        };
        let Some(updated) = next_episode(&existing, Timestamp::now(), gap) else {
            return Ok(Delivery::AlreadyThere);
        };
        let count = updated.series.as_ref().map_or(0, |s| s.count);
        match api.replace(name, &PostParams::default(), &updated).await {
            Ok(_) => return Ok(Delivery::Counted(count)),
            Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(Delivery::AlreadyThere)
}

/// Delays between attempts to deliver one Event: about 30 s in all, enough for an API server
/// restart or RBAC rules applied in the same rollout as the DaemonSet to take effect.
const DELIVERY_BACKOFF: [Duration; 6] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(8),
    Duration::from_secs(16),
];

/// Whether a failed delivery may succeed if tried again: transport errors, overload, server
/// errors, and refusals, because an API server's authorizer learns new (Cluster)RoleBindings
/// from a watch and refuses for a moment after they are created. Invalid Events are not retried.
fn transient(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => matches!(status.code, 401 | 403 | 429) || status.code >= 500,
        _ => true,
    }
}

/// [`deliver`], tried again with backoff while the failure is [`transient`].
async fn deliver_retrying(
    api: &Api<K8sEvent>,
    event: &K8sEvent,
    count_episode: bool,
    gap: Duration,
) -> Result<Delivery, kube::Error> {
    let mut delays = DELIVERY_BACKOFF.iter();
    loop {
        match deliver(api, event, count_episode, gap).await {
            Err(err) if transient(&err) => {
                let Some(delay) = delays.next() else {
                    return Err(err);
                };
                tracing::debug!("cannot publish an Event yet ({err}); trying again in {delay:?}");
                tokio::time::sleep(*delay).await;
            }
            done => return done,
        }
    }
}

/// Publishes Events (events.k8s.io/v1) off the control loop.
pub struct Publisher {
    client: Client,
    instance: String,
    telemetry: Arc<Telemetry>,
    episode_gap: Duration,
}

impl Publisher {
    pub fn new(client: Client, node_name: &str, telemetry: Arc<Telemetry>) -> Self {
        Publisher {
            client,
            instance: format!("extproxy-{node_name}"),
            telemetry,
            episode_gap: EPISODE_GAP,
        }
    }

    /// Replaces [`EPISODE_GAP`] (tests).
    pub fn set_episode_gap(&mut self, gap: Duration) {
        self.episode_gap = gap;
    }

    /// Sends `event` in the background, trying transient failures again for about 30 s; a
    /// failure after that is logged and counted.
    ///
    /// `live`: the problem began while this agent watched (not at its start). Then an existing
    /// Event of the same name is an earlier episode (or this one, reported by another node
    /// first): if it was last observed more than [`EPISODE_GAP`] ago, its `series` counts one
    /// more episode. At start-up an agent only creates what is missing: it cannot tell an
    /// episode it did not see begin from one already counted.
    pub fn publish(&self, event: ProblemEvent, cluster: &ClusterState, live: bool) {
        // Only errors and warnings become Events.
        self.publish_as(event, cluster, live, "Warning");
    }

    /// [`Publisher::publish`] with the Event's type (`Warning`, `Normal`).
    pub fn publish_as(
        &self,
        event: ProblemEvent,
        cluster: &ClusterState,
        live: bool,
        type_: &'static str,
    ) {
        let Some(service) = cluster.service(&event.service) else {
            return;
        };
        let regarding: ObjectReference = service.object_ref(&());
        let related = event
            .slice
            .as_ref()
            .and_then(|k| cluster.slice(k))
            .map(|s| s.object_ref(&()));
        let name = event_name(
            &event.service.name,
            regarding.uid.as_deref().unwrap_or(""),
            &event,
        );
        let object = K8sEvent {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(event.service.namespace.to_string()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(Timestamp::now())),
            type_: Some(type_.to_owned()),
            reason: Some(event.reason.to_owned()),
            action: Some(match &event.field {
                Some(field) => truncate(&format!("Program {field}"), MAX_ACTION),
                None => "Program".to_owned(),
            }),
            note: Some(event.note.clone()),
            regarding: Some(regarding),
            related,
            reporting_controller: Some("extproxy".to_owned()),
            reporting_instance: Some(self.instance.clone()),
            ..K8sEvent::default()
        };
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &event.service.namespace);
        let telemetry = self.telemetry.clone();
        let gap = self.episode_gap;
        tokio::spawn(async move {
            match deliver_retrying(&api, &object, live, gap).await {
                Ok(Delivery::Created) => telemetry.record_event(event.reason, true),
                Ok(Delivery::Counted(count)) => {
                    tracing::debug!(
                        "the {} Event on Service {} counts episode {count}",
                        event.reason,
                        event.service
                    );
                    telemetry.record_event(event.reason, true);
                }
                Ok(Delivery::AlreadyThere) => {
                    tracing::debug!(
                        "the {} Event on Service {} is already there (another node or an earlier run)",
                        event.reason,
                        event.service
                    );
                }
                Err(err) => {
                    tracing::warn!(
                        "cannot publish the {} Event on Service {}: {err}",
                        event.reason,
                        event.service
                    );
                    telemetry.record_event(event.reason, false);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_stable_and_distinct() {
        let event = ProblemEvent {
            service: ObjectKey::new("shop", "db"),
            slice: None,
            reason: "PortNameMismatch",
            field: Some("spec.ports[0].name".into()),
            note: "Service shop/db: spec.ports[0].name: port \"pg\" matches no endpoint port"
                .into(),
        };
        let name = event_name("db", "uid-1", &event);
        // Fixed: every node and every agent version must compute the same name.
        assert_eq!(
            name,
            format!(
                "db.extproxy-{:016x}",
                fnv1a(&[
                    "uid-1",
                    "PortNameMismatch",
                    "spec.ports[0].name",
                    &event.note
                ])
            )
        );
        assert_eq!(fnv1a(&["a"]), 0x089b_e207_b544_f1e4);
        assert_ne!(
            name,
            event_name("db", "uid-2", &event),
            "a re-created Service is new"
        );
        let other = ProblemEvent {
            field: Some("spec.ports[1].name".into()),
            ..event.clone()
        };
        assert_ne!(name, event_name("db", "uid-1", &other));
    }

    #[test]
    fn refusals_and_outages_are_tried_again_invalid_events_are_not() {
        let api = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..kube::core::Status::default()
            }))
        };
        for code in [401, 403, 429, 500, 503, 504] {
            assert!(transient(&api(code)), "{code}");
        }
        for code in [400, 404, 409, 422] {
            assert!(!transient(&api(code)), "{code}");
        }
        assert!(transient(&kube::Error::LinesCodecMaxLineLengthExceeded));
        let total: Duration = DELIVERY_BACKOFF.iter().sum();
        assert!(total >= Duration::from_secs(20), "{total:?}");
    }

    #[test]
    fn episodes_count_in_the_series_once_per_gap() {
        let t0: Timestamp = "2026-12-07T10:00:00Z".parse().unwrap();
        let at = |secs: i64| t0 + jiff::SignedDuration::from_secs(secs);
        let gap = Duration::from_secs(60);
        let created = K8sEvent {
            event_time: Some(MicroTime(t0)),
            note: Some("the note".into()),
            ..K8sEvent::default()
        };
        assert_eq!(
            next_episode(&created, at(5), gap),
            None,
            "another node reporting the same episode"
        );
        let second = next_episode(&created, at(90), gap).expect("a new episode");
        let series = second.series.clone().unwrap();
        assert_eq!(series.count, 2, "the Event itself was the first");
        assert_eq!(series.last_observed_time.0, at(90));
        assert_eq!(second.note, created.note, "only the series changes");
        assert_eq!(second.event_time, created.event_time);
        assert_eq!(
            next_episode(&second, at(120), gap),
            None,
            "measured from the last observation, not the first"
        );
        let third = next_episode(&second, at(151), gap).unwrap();
        assert_eq!(third.series.unwrap().count, 3);
    }
}
