//! A small stand-in for kube-apiserver that serves the responses recorded from a real one
//! (tests/fixtures/k8s-api, copied from ../shared/k8s-api), plus the programming model the
//! Kubernetes source drives in these tests.
//!
//! It models what the agent relies on: lists at a resourceVersion, watches from a
//! resourceVersion that replay every later event and then stay open, streaming lists ending with
//! the `k8s.io/initial-events-end` bookmark, `410 Expired` for compacted versions, field
//! selectors on Nodes, Events being created, and outages (connections refused and cut).
#![allow(dead_code)] // each test binary uses a different part

pub mod cluster;
pub mod view;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use extproxy::agent::Applied;
use extproxy::kube::{KubeSource, NodeFacts, NodeOverrides, Programmer, SourceConfig};
use extproxy::metrics::Telemetry;
use extproxy::reconcile::{Limits, MapOp, MapState, MapWriter, Reconciler};
use extproxy::translate::{ServicePortKey, Translation};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/k8s-api");

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}"))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn rv_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

/// One API collection.
struct Collection {
    kind: &'static str,
    api_version: &'static str,
    /// Objects as of `rv`.
    items: BTreeMap<(String, String), Value>,
    rv: u64,
    /// Watch events in order; the first `released` are visible.
    events: Vec<Value>,
    released: usize,
    /// Watching from a version below this gets 410 Expired.
    compacted_below: u64,
    /// A recorded streaming list (watch lines ending with the initial-events-end bookmark).
    initial_events: Option<Vec<String>>,
    /// Lists wait while this is set (to see what the agent does before a list completes).
    hold_lists: bool,
}

impl Collection {
    fn from_list(list: &str, kind: &'static str, api_version: &'static str) -> Self {
        let list: Value = serde_json::from_str(list).unwrap();
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        Collection {
            kind,
            api_version,
            items: list["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| (key_of(o), o.clone()))
                .collect(),
            rv,
            events: Vec::new(),
            released: 0,
            compacted_below: 0,
            initial_events: None,
            hold_lists: false,
        }
    }

    fn with_events(mut self, jsonl: &str) -> Self {
        self.events = jsonl
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        self
    }

    fn event_rv(event: &Value) -> u64 {
        rv_of(&event["object"])
    }

    /// Makes events up to `rv` visible and applies them to the list.
    fn release_through(&mut self, rv: u64) {
        while let Some(event) = self.events.get(self.released) {
            if Self::event_rv(event) > rv {
                break;
            }
            let object = &event["object"];
            match event["type"].as_str() {
                Some("ADDED" | "MODIFIED") => {
                    self.items.insert(key_of(object), object.clone());
                }
                Some("DELETED") => {
                    self.items.remove(&key_of(object));
                }
                _ => {}
            }
            self.rv = self.rv.max(Self::event_rv(event));
            self.released += 1;
        }
    }

    fn list_body(&self) -> String {
        json!({
            "kind": format!("{}List", self.kind),
            "apiVersion": self.api_version,
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": self.items.values().collect::<Vec<_>>(),
        })
        .to_string()
    }
}

#[derive(Default)]
struct World {
    collections: BTreeMap<&'static str, Collection>,
    down: bool,
    /// Every request: method, path and query.
    requests: Vec<String>,
    /// Bodies of created Events.
    events_posted: Vec<Value>,
    /// Event creations asked for, including refused duplicates.
    event_attempts: usize,
}

/// Agent logs in the test output when EXTPROXY_TEST_LOG holds a filter (e.g. `info`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("EXTPROXY_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// The fake API server. Dropping it stops it.
pub struct FakeApi {
    addr: SocketAddr,
    world: Arc<Mutex<World>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query(uri: &hyper::Uri) -> BTreeMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    };
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
    .to_string()
}

impl FakeApi {
    /// Serves the recorded lists (resourceVersion 245) with the recorded watch events held back
    /// until released.
    pub async fn recorded() -> Self {
        init_logs();
        let mut collections = BTreeMap::new();
        collections.insert(
            "services",
            Collection::from_list(&fixture("list-services.json"), "Service", "v1")
                .with_events(&fixture("watch-services.jsonl")),
        );
        let mut slices = Collection::from_list(
            &fixture("list-endpointslices.json"),
            "EndpointSlice",
            "discovery.k8s.io/v1",
        )
        .with_events(&fixture("watch-endpointslices.jsonl"));
        slices.initial_events = Some(
            fixture("watch-endpointslices-initial-events.jsonl")
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect(),
        );
        collections.insert("endpointslices", slices);
        collections.insert(
            "nodes",
            Collection::from_list(&fixture("list-nodes-node-a.json"), "Node", "v1"),
        );
        let world = Arc::new(Mutex::new(World {
            collections,
            ..World::default()
        }));
        let changed = Arc::new(Notify::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, world.clone(), changed.clone()));
        FakeApi {
            addr,
            world,
            changed,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with_world<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        let out = f(&mut self.world.lock().unwrap());
        self.changed.notify_waiters();
        out
    }

    /// Releases every recorded watch event with resourceVersion <= `rv`, in all collections.
    pub fn release_through(&self, rv: u64) {
        self.with_world(|w| {
            for c in w.collections.values_mut() {
                c.release_through(rv);
            }
        })
    }

    /// Appends a watch event (made from a recorded object by the test) and releases it.
    pub fn push_event(&self, resource: &str, event_type: &str, object: Value) {
        self.with_world(|w| {
            let c = w.collections.get_mut(resource).unwrap();
            c.events.push(json!({"type": event_type, "object": object}));
            let rv = c.events.iter().map(Collection::event_rv).max().unwrap();
            c.release_through(rv);
        })
    }

    /// The current object `namespace/name` of `resource`.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Value {
        self.with_world(|w| {
            w.collections[resource].items[&(namespace.to_owned(), name.to_owned())].clone()
        })
    }

    /// Changes a collection behind the watches' back and compacts its history, as etcd does
    /// while a client is away: watches from before `rv` get 410 Expired and must relist.
    pub fn compact_with(
        &self,
        resource: &str,
        rv: u64,
        change: impl FnOnce(&mut BTreeMap<(String, String), Value>),
    ) {
        self.with_world(|w| {
            let c = w.collections.get_mut(resource).unwrap();
            change(&mut c.items);
            c.rv = rv;
            c.compacted_below = rv;
        })
    }

    pub fn compact(&self, resource: &str, rv: u64) {
        self.compact_with(resource, rv, |_| {});
    }

    pub fn hold_lists(&self, resource: &str, hold: bool) {
        self.with_world(|w| w.collections.get_mut(resource).unwrap().hold_lists = hold)
    }

    /// Down: open watches are cut and every request fails at the connection.
    pub fn set_down(&self, down: bool) {
        self.with_world(|w| w.down = down)
    }

    pub fn requests(&self) -> Vec<String> {
        self.world.lock().unwrap().requests.clone()
    }

    pub fn events_posted(&self) -> Vec<Value> {
        self.world.lock().unwrap().events_posted.clone()
    }

    pub fn event_attempts(&self) -> usize {
        self.world.lock().unwrap().event_attempts
    }
}

async fn serve(listener: TcpListener, world: Arc<Mutex<World>>, changed: Arc<Notify>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if world.lock().unwrap().down {
            // Refused, as far as the client can tell: closed before any response.
            drop(stream);
            continue;
        }
        let world = world.clone();
        let changed = changed.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| handle(req, world.clone(), changed.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    world: Arc<Mutex<World>>,
    changed: Arc<Notify>,
) -> Result<Response<Body>, std::io::Error> {
    let path = req.uri().path().to_owned();
    let q = query(req.uri());
    {
        let mut w = world.lock().unwrap();
        if w.down {
            // An error from the service makes hyper drop the connection without answering.
            return Err(std::io::Error::other("API server down"));
        }
        w.requests.push(format!(
            "{} {}{}",
            req.method(),
            path,
            req.uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        ));
    }
    if path == "/version" {
        return Ok(full(StatusCode::OK, fixture("version.json")));
    }
    if req.method() == hyper::Method::POST && path.ends_with("/events") {
        let body = req
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?;
        let event: Value = serde_json::from_slice(&body.to_bytes()).unwrap();
        let mut w = world.lock().unwrap();
        w.event_attempts += 1;
        let name = &event["metadata"]["name"];
        if w.events_posted
            .iter()
            .any(|e| &e["metadata"]["name"] == name)
        {
            return Ok(full(
                StatusCode::CONFLICT,
                status(
                    409,
                    "AlreadyExists",
                    &format!("events.events.k8s.io {name} already exists"),
                ),
            ));
        }
        w.events_posted.push(event.clone());
        return Ok(full(StatusCode::CREATED, event.to_string()));
    }
    let resource = match path.as_str() {
        "/api/v1/services" => "services",
        "/apis/discovery.k8s.io/v1/endpointslices" => "endpointslices",
        "/api/v1/nodes" => "nodes",
        _ => {
            return Ok(full(
                StatusCode::NOT_FOUND,
                status(404, "NotFound", &format!("{path} is not served here")),
            ));
        }
    };
    // Nodes are only ever asked for by name; anything else matches nothing.
    let field_selector = q.get("fieldSelector").cloned();
    let selected = move |object: &Value| match &field_selector {
        Some(selector) => {
            selector.strip_prefix("metadata.name=") == object["metadata"]["name"].as_str()
        }
        None => true,
    };
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        loop {
            let notified = changed.notified();
            {
                let w = world.lock().unwrap();
                let c = &w.collections[resource];
                if !c.hold_lists {
                    let mut list: Value = serde_json::from_str(&c.list_body()).unwrap();
                    let items = list["items"].as_array_mut().unwrap();
                    items.retain(selected);
                    return Ok(full(StatusCode::OK, list.to_string()));
                }
            }
            notified.await;
        }
    }

    // A watch: the lines to send first, then follow released events.
    let (first, mut from_rv, mut next_event) = {
        let w = world.lock().unwrap();
        let c = &w.collections[resource];
        if q.get("sendInitialEvents").map(String::as_str) == Some("true") {
            let lines: Vec<String> = match &c.initial_events {
                Some(lines) => lines.clone(),
                None => c
                    .items
                    .values()
                    .filter(|o| selected(o))
                    .map(|o| json!({"type": "ADDED", "object": o}).to_string())
                    .chain(std::iter::once(
                        json!({"type": "BOOKMARK", "object": {
                            "kind": c.kind, "apiVersion": c.api_version,
                            "metadata": {"resourceVersion": c.rv.to_string(),
                                         "annotations": {"k8s.io/initial-events-end": "true"}}}})
                        .to_string(),
                    ))
                    .collect(),
            };
            let end_rv = lines
                .last()
                .map(|l| rv_of(&serde_json::from_str::<Value>(l).unwrap()["object"]))
                .unwrap();
            (lines, end_rv, c.released)
        } else {
            let from: u64 = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if from < c.compacted_below {
                let expired = json!({"type": "ERROR", "object": serde_json::from_str::<Value>(
                    &status(410, "Expired", &format!("too old resource version: {from} ({})", c.compacted_below))
                ).unwrap()});
                // The real server answers 200 and sends the error as the only event.
                return Ok(full(StatusCode::OK, format!("{expired}\n")));
            }
            (Vec::new(), from, 0)
        }
    };
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, std::io::Error>>();
    for line in first {
        let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(format!("{line}\n")))));
    }
    tokio::spawn(async move {
        loop {
            let notified = changed.notified();
            let (lines, down) = {
                let w = world.lock().unwrap();
                let c = &w.collections[resource];
                let mut lines = Vec::new();
                while next_event < c.released {
                    let event = &c.events[next_event];
                    next_event += 1;
                    let rv = Collection::event_rv(event);
                    if rv > from_rv && (event["type"] == "BOOKMARK" || selected(&event["object"])) {
                        lines.push(event.to_string());
                        from_rv = from_rv.max(rv);
                    }
                }
                (lines, w.down)
            };
            if down {
                // Cut the stream mid-body, as a dying server or a broken network does.
                let _ = tx.unbounded_send(Err(std::io::Error::other("connection reset")));
                return;
            }
            for line in lines {
                if tx
                    .unbounded_send(Ok(Frame::data(Bytes::from(format!("{line}\n")))))
                    .is_err()
                {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
            // Wake up now and then to notice a client that went away.
            let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
        }
    });
    let mut response = Response::new(StreamBody::new(rx).boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// The programming side
// ---------------------------------------------------------------------------------------------

/// The reconciler writing through `W` (the in-memory model, or the kernel maps), recording the
/// ops of every round.
pub struct Model<W: MapWriter> {
    pub reconciler: Reconciler,
    pub writer: W,
    pub rounds: Vec<Vec<MapOp>>,
    pub node: Option<NodeFacts>,
    pub last: Option<Translation>,
}

pub const LIMITS: Limits = Limits {
    max_services: 256,
    max_backends: 1024,
};

impl Model<MapState> {
    pub fn new() -> Self {
        Model::with_writer(Reconciler::new(LIMITS), MapState::default())
    }
}

impl<W: MapWriter> Model<W> {
    pub fn with_writer(reconciler: Reconciler, writer: W) -> Self {
        Model {
            reconciler,
            writer,
            rounds: Vec::new(),
            node: None,
            last: None,
        }
    }

    /// What the reconciler knows the maps hold.
    pub fn state(&self) -> &MapState {
        self.reconciler.state()
    }
}

impl<W: MapWriter> Programmer for Model<W> {
    fn program(&mut self, translation: &Translation) -> Applied {
        let start = Instant::now();
        let plan = self.reconciler.plan(&translation.desired);
        let ops = plan.map_ops();
        let report = self.reconciler.apply(plan, &mut self.writer);
        self.rounds.push(ops);
        self.last = Some(translation.clone());
        Applied {
            services: translation.desired.services.len(),
            ops: report.applied,
            errors: report.failures.len(),
            elapsed: start.elapsed(),
            names_changed: true,
        }
    }

    fn set_node(&mut self, node: &NodeFacts) {
        self.node = Some(node.clone());
    }

    fn service_names(&self) -> Vec<(u32, ServicePortKey)> {
        self.reconciler
            .service_ids()
            .map(|(k, id)| (id, k.clone()))
            .collect()
    }
}

/// How long a test waits for the source to do something.
pub const WAIT: Duration = Duration::from_secs(30);

/// The agent of node `node-a`, without overrides or streaming lists.
pub fn node_a() -> SourceConfig {
    SourceConfig {
        node_name: "node-a".into(),
        claim_all_selectorless: false,
        overrides: NodeOverrides::default(),
        streaming_lists: false,
        cluster_egress: Default::default(),
    }
}

/// A Kubernetes source talking to `api`.
pub fn start_source(api: &FakeApi, telemetry: &Arc<Telemetry>, config: SourceConfig) -> KubeSource {
    let kube_config = kube::Config::new(api.url().parse().unwrap());
    let client = extproxy::kube::client::client(kube_config, telemetry.clone()).unwrap();
    KubeSource::new(client, config, telemetry.clone())
}

/// Drives the source (receive, translate, program) until `done` holds, or panics after
/// [`WAIT`] with `what`.
pub async fn drive_until<W: MapWriter>(
    source: &mut KubeSource,
    model: &mut Model<W>,
    telemetry: &Telemetry,
    what: &str,
    mut done: impl FnMut(&Model<W>, &Telemetry) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !done(model, telemetry) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out after {WAIT:?} waiting for {what}; readiness: {:?}",
            telemetry.readiness()
        );
        tokio::select! {
            batch = source.next() => {
                source.apply(batch, model);
            }
            // Readiness and metrics change without a sync (errors, reconnects): look again.
            _ = tokio::time::sleep(Duration::from_millis(50).min(left)) => {}
        }
    }
}

/// Drives the source until it has programmed once (`what`: which sync that is).
pub async fn drive_until_programmed<W: MapWriter>(
    source: &mut KubeSource,
    model: &mut Model<W>,
    telemetry: &Telemetry,
    what: &str,
) {
    drive_until(source, model, telemetry, what, |m, _| !m.rounds.is_empty()).await;
}

/// Runs the source for `period` and returns how many syncs it produced.
pub async fn drive_for<W: MapWriter>(
    source: &mut KubeSource,
    model: &mut Model<W>,
    period: Duration,
) -> usize {
    let deadline = tokio::time::Instant::now() + period;
    let mut syncs = 0;
    loop {
        tokio::select! {
            batch = source.next() => {
                source.apply(batch, model);
                syncs += 1;
            }
            _ = tokio::time::sleep_until(deadline) => return syncs,
        }
    }
}

/// Lines of the Prometheus text that start with `prefix`.
pub fn metric_lines(telemetry: &Telemetry, prefix: &str) -> Vec<String> {
    telemetry
        .render(None)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// A Kubernetes source driving its own model in a task of its own, as a second agent on
/// another node does. Stopped on drop.
pub struct Background {
    task: tokio::task::JoinHandle<()>,
    pub telemetry: Arc<Telemetry>,
    pub model: Arc<Mutex<Model<MapState>>>,
}

impl Background {
    pub fn start(mut source: KubeSource, telemetry: Arc<Telemetry>) -> Self {
        let model = Arc::new(Mutex::new(Model::new()));
        let m = model.clone();
        let task = tokio::spawn(async move {
            loop {
                let batch = source.next().await;
                source.apply(batch, &mut *m.lock().unwrap());
            }
        });
        Background {
            task,
            telemetry,
            model,
        }
    }

    /// Waits until `done` holds for the model and telemetry, or panics after [`WAIT`].
    pub async fn wait_for(
        &self,
        what: &str,
        mut done: impl FnMut(&Model<MapState>, &Telemetry) -> bool,
    ) {
        let deadline = Instant::now() + WAIT;
        while !done(&self.model.lock().unwrap(), &self.telemetry) {
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for {what}; readiness: {:?}",
                self.telemetry.readiness()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.task.abort();
    }
}
