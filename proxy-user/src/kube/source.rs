//! Kubernetes as the source of desired state: three watchers feed the reflector stores, and
//! every batch of changes updates one incremental translation once all stores are complete: the
//! Services and EndpointSlices named by the batch's events are translated again, the rest is
//! reused. A relist (the stores swapped wholesale) or new node facts translate everything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};

use super::Programmer;
use super::cluster::ClusterState;
use super::events::{EVENT_SETTLE, EventTracker, ProblemEvent, Publisher};
use super::node::{self, NodeFacts, NodeOverrides};
use crate::agent::Applied;
use crate::diag::Origin;
use crate::names::{
    LAST_APPLIED_ANNOTATION, PROXY_NAME, SERVICE_PROXY_NAME_LABEL, TRIGGER_TIME_ANNOTATION,
};
use crate::objects::SliceObject;
use crate::translate::{
    self, ClaimPolicy, ClaimReason, ClusterEgressRules, Incremental, NodeInfo, ObjectKey, Settings,
    Sourced, Translation,
};

/// Server-side watch timeout. The client gives up on a silent connection 5 s after it, so this
/// bounds how long a dead connection (no RST, e.g. a partition) goes unnoticed.
const WATCH_TIMEOUT_SECS: u32 = 120;

#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub node_name: String,
    /// Also claim unlabelled Services without a selector (clusters without kube-proxy).
    pub claim_all_selectorless: bool,
    pub overrides: NodeOverrides,
    /// Initial lists as watch streams (Kubernetes >= 1.27 with WatchList enabled).
    pub streaming_lists: bool,
    /// The declared cluster egress addresses (`--cluster-egress-ip`, `--cluster-egress-default`).
    pub cluster_egress: ClusterEgressRules,
}

/// A batch of changes, translated (the source keeps the translation) and ready to be programmed.
#[derive(Debug)]
pub struct Batch {
    /// The node facts the translation was made with.
    pub node: NodeFacts,
    /// The first translation of this process.
    pub initial: bool,
    /// When the changes in this batch happened (for the programming latency).
    triggers: Vec<SystemTime>,
    /// EndpointSlices changed: which Service a slice's problems belong to may have too.
    slices_changed: bool,
    /// The translator was built anew (first batch, relist): it learns from the maps which
    /// Service serves each frontend before it translates.
    fresh: bool,
    /// New DNS answers are in it.
    dns: bool,
    /// Health verdicts changed (the health monitor logs those itself).
    health: bool,
}

impl Batch {
    /// The translator was built anew (first batch, relist).
    pub fn fresh(&self) -> bool {
        self.fresh
    }
}

/// Boxed: the three differ a lot in size, and each is moved once.
enum Update {
    Service(Box<watcher::Result<watcher::Event<Service>>>),
    Slice(Box<watcher::Result<watcher::Event<EndpointSlice>>>),
    Node(Box<watcher::Result<watcher::Event<Node>>>),
}

pub struct KubeSource {
    config: SourceConfig,
    cluster: ClusterState,
    updates: SelectAll<BoxStream<'static, Update>>,
    telemetry: Arc<crate::metrics::Telemetry>,
    tracker: EventTracker,
    publisher: Publisher,
    /// The stores changed since the last translation.
    dirty: bool,
    triggers: Vec<SystemTime>,
    programmed: bool,
    node: Option<NodeFacts>,
    node_missing: bool,
    claimed: BTreeMap<ObjectKey, ClaimReason>,
    /// The translation, kept up to date batch by batch; None until the first batch and after
    /// a relist.
    translator: Option<Incremental>,
    /// Objects named by events since the last translation.
    changed_services: BTreeSet<ObjectKey>,
    changed_slices: BTreeSet<ObjectKey>,
    /// New problems waiting out [`EVENT_SETTLE`] before they become Events.
    pending_events: Vec<PendingEvent>,
    /// Resources being listed, or about to be after 410 Gone: their stores are not current.
    listing: BTreeSet<&'static str>,
    event_settle: Duration,
    /// The resolver's answers for FQDN slices, kept for translators built after a relist.
    resolved: Arc<crate::dns::Resolved>,
    dns_changed: bool,
    /// Endpoints health checking judges unhealthy, by Service: told to every translator,
    /// including one built anew after a relist.
    unhealthy: BTreeMap<ObjectKey, Arc<translate::Unhealthy>>,
    health_changed: bool,
}

struct PendingEvent {
    due: Instant,
    event: ProblemEvent,
    /// Seen to begin while the agent watched (see [`Publisher::publish`]).
    live: bool,
}

/// Sleeps until `due`, or forever without one.
async fn until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => futures::future::pending().await,
    }
}

/// Drops what the agent never reads, so a big cluster's stores stay small.
fn strip<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(watcher::Result<watcher::Event<K>>) -> Update,
) -> BoxStream<'static, Update>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    with_backoff(watcher(api, config).boxed())
        .modify(strip::<K>)
        .map(wrap)
        .boxed()
}

/// kube-rs's back-off between failed attempts (0.8 s doubling to 30 s, jittered, reset by any
/// success), except after 410 Gone: the API server answered, and the watcher relists after the
/// first step of the back-off, not after the step an outage had worked it up to. With kube-rs's
/// own `default_backoff` the relist that follows an outage of a minute waited up to a minute
/// more, the agent stale all along.
fn with_backoff<K: Send + 'static>(
    stream: BoxStream<'static, watcher::Result<watcher::Event<K>>>,
) -> impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send {
    use kube::runtime::utils::Backoff as _;
    futures::stream::unfold(
        (stream, watcher::DefaultBackoff::default(), None::<Duration>),
        |(mut stream, mut backoff, pause)| async move {
            if let Some(pause) = pause {
                tokio::time::sleep(pause).await;
            }
            let item = stream.next().await?;
            let pause = match &item {
                Ok(_) => {
                    backoff.reset();
                    None
                }
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    backoff.reset();
                    backoff.next()
                }
                Err(_) => backoff.next(),
            };
            Some((item, (stream, backoff, pause)))
        },
    )
}

/// Keeps `listing` up to date: a list starts with `Init` and ends with `InitDone`.
fn track_listing<K>(
    listing: &mut BTreeSet<&'static str>,
    resource: &'static str,
    event: &watcher::Event<K>,
) {
    match event {
        watcher::Event::Init => {
            listing.insert(resource);
        }
        watcher::Event::InitDone => {
            listing.remove(resource);
        }
        _ => {}
    }
}

/// An event about one object (not part of a list).
fn live<K>(event: &watcher::Event<K>) -> bool {
    matches!(event, watcher::Event::Apply(_) | watcher::Event::Delete(_))
}

/// The change time an EndpointSlice carries, if any.
fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let text = slice.annotations().get(TRIGGER_TIME_ANNOTATION)?;
    text.parse::<Timestamp>().ok().map(SystemTime::from)
}

/// The settings Kubernetes mode translates with: the API server fills cluster IPs and node
/// ports, and only what kube-proxy is told to skip is claimed.
fn settings(config: &SourceConfig, node: &NodeFacts) -> Settings {
    Settings {
        egress_v4: node
            .egress
            .iter()
            .filter_map(|a| match a {
                std::net::IpAddr::V4(v) => Some(*v),
                _ => None,
            })
            .collect(),
        egress_v6: node
            .egress
            .iter()
            .filter_map(|a| match a {
                std::net::IpAddr::V6(v) => Some(*v),
                _ => None,
            })
            .collect(),
        fill_missing: false,
        claim: ClaimPolicy::Label {
            claim_all_selectorless: config.claim_all_selectorless,
        },
        cluster_egress: config.cluster_egress.clone(),
        ..Settings::default()
    }
}

/// Translates the cluster as the stores show it.
pub fn translate_cluster(
    cluster: &ClusterState,
    config: &SourceConfig,
    node: &NodeFacts,
) -> Translation {
    translate::translate(
        &cluster.inventory(),
        &NodeInfo {
            addresses: node.node_ports.clone(),
        },
        &settings(config, node),
    )
}

impl KubeSource {
    /// Starts the watchers (they connect when [`KubeSource::next`] is first polled).
    pub fn new(
        client: Client,
        config: SourceConfig,
        telemetry: Arc<crate::metrics::Telemetry>,
    ) -> Self {
        telemetry.track_api(&crate::metrics::API_RESOURCES);
        telemetry.set_waiting(Some(format!(
            "waiting for the initial list of {}",
            crate::metrics::API_RESOURCES.join(", ")
        )));
        let base = || {
            let c = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
            if config.streaming_lists {
                c.streaming_lists()
            } else {
                c
            }
        };
        let mut updates = SelectAll::new();
        updates.push(watch(Api::<Service>::all(client.clone()), base(), |r| {
            Update::Service(Box::new(r))
        }));
        updates.push(watch(
            Api::<EndpointSlice>::all(client.clone()),
            base(),
            |r| Update::Slice(Box::new(r)),
        ));
        updates.push(watch(
            Api::<Node>::all(client.clone()),
            base().fields(&format!("metadata.name={}", config.node_name)),
            |r| Update::Node(Box::new(r)),
        ));
        KubeSource {
            cluster: ClusterState::new(&config.node_name),
            publisher: Publisher::new(client, &config.node_name, telemetry.clone()),
            config,
            updates,
            telemetry,
            tracker: EventTracker::default(),
            dirty: false,
            triggers: Vec::new(),
            programmed: false,
            node: None,
            node_missing: false,
            claimed: BTreeMap::new(),
            translator: None,
            changed_services: BTreeSet::new(),
            changed_slices: BTreeSet::new(),
            pending_events: Vec::new(),
            listing: BTreeSet::new(),
            event_settle: EVENT_SETTLE,
            resolved: Arc::default(),
            dns_changed: false,
            unhealthy: BTreeMap::new(),
            health_changed: false,
        }
    }

    /// The names the FQDN slices of claimed Services need looked up (as of the last batch).
    pub fn dns_wanted(&self) -> crate::dns::Wanted {
        self.translator
            .as_ref()
            .map(Incremental::dns_wanted)
            .unwrap_or_default()
    }

    /// The resolver's answers: the next translation uses them.
    pub fn set_resolved(&mut self, resolved: Arc<crate::dns::Resolved>) {
        if let Some(translator) = &mut self.translator {
            translator.set_resolved(resolved.clone());
        }
        self.resolved = resolved;
    }

    /// The answers changed: [`KubeSource::next`] returns a batch that programs them.
    pub fn dns_changed(&mut self) {
        self.dirty = true;
        self.dns_changed = true;
    }

    /// Whether this node is labelled to probe for the others (`extproxy.io/health-prober`).
    pub fn is_health_prober(&self) -> bool {
        self.cluster.node().is_some_and(|n| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(crate::names::HEALTH_PROBER_LABEL))
                .is_some_and(|v| v == "true")
        })
    }

    /// Health checking's verdict on Service `key` changed: the next batch translates it again.
    pub fn set_unhealthy(&mut self, key: ObjectKey, unhealthy: Option<Arc<translate::Unhealthy>>) {
        match &unhealthy {
            Some(u) => self.unhealthy.insert(key.clone(), u.clone()),
            None => self.unhealthy.remove(&key),
        };
        if let Some(translator) = &mut self.translator {
            translator.set_unhealthy(key, unhealthy);
        }
        self.health_changed = true;
        self.dirty = true;
    }

    /// An Event on the Service for an endpoint's health transition: Warning when it became
    /// unhealthy, Normal when it recovered.
    pub fn report_health(&self, report: &crate::health::Report) {
        let healthy = report.transition.healthy;
        let event = ProblemEvent {
            service: report.service(),
            slice: None,
            reason: if healthy {
                "EndpointHealthy"
            } else {
                "EndpointUnhealthy"
            },
            field: Some(format!("endpoint {}", report.endpoint)),
            note: report.describe(),
        };
        let type_ = if healthy { "Normal" } else { "Warning" };
        self.publisher.publish_as(event, &self.cluster, true, type_);
    }

    /// An Event on a claimed Service for a problem the data path found (not from translation):
    /// published at once, counted as an episode of the same Event when it repeats after
    /// [`super::events::EPISODE_GAP`]. `field` keeps different problems of one Service apart.
    pub fn report_problem(
        &self,
        service: ObjectKey,
        reason: &'static str,
        field: String,
        note: String,
    ) {
        let event = ProblemEvent {
            service,
            slice: None,
            reason,
            field: Some(field),
            note,
        };
        self.publisher.publish(event, &self.cluster, true);
    }

    /// How far apart two reports of one problem must be to count as two episodes in its Event
    /// (default [`super::events::EPISODE_GAP`]; tests shorten it).
    pub fn set_event_episode_gap(&mut self, gap: Duration) {
        self.publisher.set_episode_gap(gap);
    }

    /// How long a problem must last to become an Event (default [`EVENT_SETTLE`]; tests
    /// shorten it).
    pub fn set_event_settle(&mut self, settle: Duration) {
        self.event_settle = settle;
    }

    /// The translation of the last batch.
    pub fn translation(&self) -> Option<&Translation> {
        self.translator.as_ref().map(Incremental::translation)
    }

    /// Waits for changes and returns the next translation to program. Cancel-safe: everything
    /// received is kept in the stores, so dropping this future loses nothing.
    pub async fn next(&mut self) -> Batch {
        loop {
            if let Some(batch) = self.take_batch() {
                return batch;
            }
            let due = self.pending_events.iter().map(|p| p.due).min();
            let update = tokio::select! {
                update = self.updates.next() => update,
                () = until(due) => {
                    self.publish_due_events();
                    continue;
                }
            };
            let Some(update) = update else {
                // Watchers never end; if they did, there is nothing more to wait for.
                futures::future::pending::<()>().await;
                continue;
            };
            self.handle(update);
            // Everything that has already arrived goes into the same translation: under a burst
            // the agent programs fewer, bigger diffs instead of falling behind.
            while let Some(Some(update)) = self.updates.next().now_or_never() {
                self.handle(update);
            }
        }
    }

    /// Publishes the problems that stayed open for [`EVENT_SETTLE`]. While a watch is down,
    /// reconnecting or relisting, the stores may be half old, half new: wait for all of them.
    fn publish_due_events(&mut self) {
        let now = Instant::now();
        if !self.listing.is_empty() || !self.telemetry.api_connected() {
            for p in &mut self.pending_events {
                p.due = p.due.max(now + self.event_settle);
            }
            return;
        }
        let (due, waiting) = std::mem::take(&mut self.pending_events)
            .into_iter()
            .partition(|p| p.due <= now);
        self.pending_events = waiting;
        for p in due {
            if self.tracker.is_open(&p.event) {
                self.publisher.publish(p.event, &self.cluster, p.live);
            }
        }
    }

    fn handle(&mut self, update: Update) {
        let now = SystemTime::now();
        // Changes during a relist have no known time; only live events are measured.
        let measure = self.programmed;
        let (changed, trigger) = match update {
            Update::Service(result) => match *result {
                Ok(e) => {
                    track_listing(&mut self.listing, "services", &e);
                    match &e {
                        watcher::Event::Apply(s) | watcher::Event::Delete(s) => {
                            self.changed_services.insert(key_of(s));
                        }
                        // The store was swapped whole: translate it whole.
                        watcher::Event::InitDone => self.translator = None,
                        _ => {}
                    }
                    (self.cluster.apply_service(&e), live(&e).then_some(now))
                }
                Err(e) => return self.watch_error("services", e),
            },
            Update::Slice(result) => match *result {
                Ok(e) => {
                    track_listing(&mut self.listing, "endpointslices", &e);
                    match &e {
                        watcher::Event::Apply(s) | watcher::Event::Delete(s) => {
                            self.changed_slices.insert(key_of(s));
                        }
                        watcher::Event::InitDone => self.translator = None,
                        _ => {}
                    }
                    let trigger = match &e {
                        watcher::Event::Apply(slice) => trigger_time(slice).or(Some(now)),
                        other => live(other).then_some(now),
                    };
                    (self.cluster.apply_slice(&e), trigger)
                }
                Err(e) => return self.watch_error("endpointslices", e),
            },
            Update::Node(result) => match *result {
                Ok(e) => {
                    track_listing(&mut self.listing, "nodes", &e);
                    let changed = self.cluster.apply_node(&e);
                    // The kubelet rewrites its Node's status every few minutes; only a change
                    // of the addresses extproxy uses is worth a translation.
                    let facts =
                        node::resolve(self.cluster.node().as_deref(), &self.config.overrides);
                    let relevant = self.node.as_ref() != Some(&facts)
                        || self.node_missing == self.cluster.node().is_some();
                    (changed && relevant, live(&e).then_some(now))
                }
                Err(e) => return self.watch_error("nodes", e),
            },
        };
        if measure && changed {
            self.triggers.extend(trigger);
        }
        self.dirty |= changed;
    }

    fn watch_error(&mut self, resource: &'static str, error: watcher::Error) {
        match &error {
            // The resourceVersion was compacted away: the watcher relists, which is routine.
            watcher::Error::WatchError(status) if status.code == 410 => {
                tracing::info!("{resource}: {}; relisting", status.message);
                self.listing.insert(resource);
            }
            _ => self.telemetry.api_failed(resource, error_chain(&error)),
        }
    }

    fn take_batch(&mut self) -> Option<Batch> {
        if !self.dirty {
            return None;
        }
        let waiting = self.cluster.waiting_for();
        if !waiting.is_empty() {
            self.telemetry.set_waiting(Some(format!(
                "waiting for the initial list of {}",
                waiting.join(", ")
            )));
            return None;
        }
        self.dirty = false;
        let node_object = self.cluster.node();
        let facts = node::resolve(node_object.as_deref(), &self.config.overrides);
        self.note_node(node_object.is_some(), &facts);
        for (kind, tracked) in [
            ("Service", self.cluster.services.len()),
            ("EndpointSlice", self.cluster.slices.len()),
            ("Node", self.cluster.nodes.len()),
        ] {
            self.telemetry.set_objects(kind, tracked);
        }
        let node = NodeInfo {
            addresses: facts.node_ports.clone(),
        };
        let settings = settings(&self.config, &facts);
        let services = std::mem::take(&mut self.changed_services);
        let slices = std::mem::take(&mut self.changed_slices);
        let slices_changed = !slices.is_empty();
        let fresh = self.translator.is_none();
        match &mut self.translator {
            Some(translator) => {
                translator.reconfigure(&node, &settings);
                for key in services {
                    let service = self.cluster.service(&key);
                    translator
                        .set_service(key, service.map(|s| super::cluster::sourced_service(&s)));
                }
                for key in slices {
                    let slice = self.cluster.slice(&key);
                    translator.set_slice(
                        key,
                        slice.map(|s| Sourced::new(SliceObject::from(&*s), Origin::Cluster)),
                    );
                }
            }
            None => {
                let mut translator = Incremental::new(node, settings);
                translator.set_resolved(self.resolved.clone());
                let inventory = self.cluster.inventory();
                for (key, slice) in inventory.slices {
                    translator.set_slice(key, Some(slice));
                }
                for (key, service) in inventory.services {
                    translator.set_service(key, Some(service));
                }
                for (key, unhealthy) in &self.unhealthy {
                    translator.set_unhealthy(key.clone(), Some(unhealthy.clone()));
                }
                self.translator = Some(translator);
            }
        }
        Some(Batch {
            node: facts,
            initial: !self.programmed,
            triggers: std::mem::take(&mut self.triggers),
            slices_changed,
            fresh,
            dns: std::mem::take(&mut self.dns_changed),
            health: std::mem::take(&mut self.health_changed),
        })
    }

    fn note_node(&mut self, found: bool, facts: &NodeFacts) {
        let name = &self.config.node_name;
        if !found && !self.node_missing {
            tracing::warn!(
                "Node {name} does not exist: check --node-name (NODE_NAME); until it appears, \
                 NodePorts and egress use the uplink's addresses"
            );
        } else if found && self.node_missing {
            tracing::info!("Node {name} appeared");
        }
        self.node_missing = !found;
        self.telemetry.set_waiting((!found).then(|| {
            format!("Node {name} does not exist (check --node-name); serving with the uplink's addresses")
        }));
        match &self.node {
            None => tracing::info!("Node {name}: {facts}"),
            Some(old) if old != facts => {
                tracing::info!("Node {name} changed: {facts} (was: {old})")
            }
            Some(_) => {}
        }
        self.node = Some(facts.clone());
    }

    /// Translates `batch`, programs it through `target`, then records latency and metrics and
    /// publishes Events for new problems.
    pub fn apply(&mut self, batch: Batch, target: &mut impl Programmer) -> Applied {
        let Some(translator) = self.translator.as_mut() else {
            return Applied::default();
        };
        if batch.fresh {
            translator.set_incumbents(target.incumbents());
        }
        let translation = translator.update();
        let changes = translation.changes.as_ref();
        let claims_changed = changes.is_none_or(|c| c.claims);
        let problems_changed =
            batch.slices_changed || changes.is_none_or(|c| c.claims || c.diagnostics);
        if claims_changed {
            log_claims(&mut self.claimed, translation);
        }
        target.set_node(&batch.node);
        let applied = target.program(translation);
        let done = SystemTime::now();
        for trigger in &batch.triggers {
            self.telemetry
                .observe_programming(done.duration_since(*trigger).unwrap_or_default());
        }
        self.telemetry.record_apply(
            translation,
            &applied,
            applied.names_changed.then(|| target.service_names()),
        );
        let ms = applied.elapsed.as_secs_f64() * 1e3;
        if batch.initial {
            tracing::info!(
                "initial sync: {} Services ({} claimed), {} EndpointSlices: programmed {} service \
                 port(s) with {} map updates in {ms:.1} ms",
                self.cluster.services.len(),
                translation.claimed.len(),
                self.cluster.slices.len(),
                applied.services,
                applied.ops,
            );
        } else if batch.dns && batch.triggers.is_empty() {
            if applied.ops > 0 {
                tracing::info!(
                    "DNS answers changed: {} map updates in {ms:.2} ms",
                    applied.ops
                );
            }
        } else if batch.health && batch.triggers.is_empty() {
            tracing::debug!("health verdicts: {} map updates in {ms:.2} ms", applied.ops);
        } else if applied.ops > 0 && batch.triggers.is_empty() {
            tracing::info!(
                "converged after a relist: {} map updates in {ms:.2} ms",
                applied.ops
            );
        } else if applied.ops > 0 {
            tracing::info!(
                "{} change(s) from the API server: {} map updates in {ms:.2} ms",
                batch.triggers.len(),
                applied.ops
            );
        } else {
            tracing::debug!("resync: the maps already match ({ms:.2} ms)");
        }
        if problems_changed {
            let due = Instant::now() + self.event_settle;
            for event in self.tracker.plan(translation, &self.cluster) {
                // A problem that closed and opened again while waiting is still one.
                if !self.pending_events.iter().any(|p| p.event == event) {
                    self.pending_events.push(PendingEvent {
                        due,
                        event,
                        live: !batch.initial,
                    });
                }
            }
        }
        self.programmed = true;
        applied
    }
}

/// At most this many Services are named one per line when their claims change in one
/// translation; more (a start at 10k Services) make one summary line, and the rest go to debug.
const CLAIMS_LOGGED_EACH: usize = 10;

/// Logs Services that became claimed or stopped being claimed (the reasons for leaving one alone
/// are diagnostics, logged by the agent).
fn log_claims(claimed: &mut BTreeMap<ObjectKey, ClaimReason>, translation: &Translation) {
    let now: BTreeMap<ObjectKey, ClaimReason> = translation
        .claimed
        .iter()
        .map(|c| (c.service.clone(), c.reason))
        .collect();
    let why = |reason: &ClaimReason| match reason {
        ClaimReason::Label => format!("labelled {SERVICE_PROXY_NAME_LABEL}={PROXY_NAME}"),
        ClaimReason::SelectorLess => "no selector, and --claim-all-selectorless".to_owned(),
    };
    let gained: Vec<(&ObjectKey, &ClaimReason)> = now
        .iter()
        .filter(|(key, reason)| claimed.get(*key) != Some(*reason))
        .collect();
    let lost: Vec<&ObjectKey> = claimed.keys().filter(|k| !now.contains_key(*k)).collect();
    let each = gained.len() + lost.len() <= CLAIMS_LOGGED_EACH;
    let say = |line: String| {
        if each {
            tracing::info!("{line}");
        } else {
            tracing::debug!("{line}");
        }
    };
    for (key, reason) in &gained {
        say(format!("claiming Service {key}: {}", why(reason)));
    }
    for key in &lost {
        say(format!(
            "no longer claiming Service {key}: deleted or no longer labelled"
        ));
    }
    if !each {
        let labelled = gained
            .iter()
            .filter(|(_, r)| **r == ClaimReason::Label)
            .count();
        tracing::info!(
            "claiming {} more Service(s) ({labelled} labelled {SERVICE_PROXY_NAME_LABEL}=\
             {PROXY_NAME}, {} without a selector under --claim-all-selectorless), no longer \
             claiming {} (deleted or no longer labelled); {} claimed in all (each named at debug \
             level)",
            gained.len(),
            gained.len() - labelled,
            lost.len(),
            now.len()
        );
    }
    *claimed = now;
}

fn key_of<K: Resource>(object: &K) -> ObjectKey {
    let meta = object.meta();
    ObjectKey::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// An error with its causes: kube's errors say "failed to perform initial object list" and keep
/// the interesting part (connection refused, 403) in their sources.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn trigger_time_is_read_from_the_annotation() {
        let mut slice = EndpointSlice {
            metadata: ObjectMeta {
                annotations: Some(
                    [(
                        TRIGGER_TIME_ANNOTATION.to_owned(),
                        "2026-11-22T06:01:58Z".to_owned(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let t = trigger_time(&slice).expect("parsed");
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_795_327_318
        );
        slice.metadata.annotations = None;
        assert_eq!(trigger_time(&slice), None);
    }

    #[test]
    fn strip_drops_managed_fields_and_last_applied() {
        let mut svc = Service {
            metadata: ObjectMeta {
                managed_fields: Some(vec![Default::default()]),
                annotations: Some(
                    [
                        (LAST_APPLIED_ANNOTATION.to_owned(), "{}".to_owned()),
                        ("keep".to_owned(), "me".to_owned()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        strip(&mut svc);
        assert_eq!(svc.metadata.managed_fields, None);
        assert_eq!(
            svc.metadata.annotations.unwrap().keys().collect::<Vec<_>>(),
            vec!["keep"]
        );
    }

    #[test]
    fn error_chains_keep_the_cause() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("failed to perform initial object list")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(
            error_chain(&e),
            "failed to perform initial object list: connection refused"
        );
    }
}
