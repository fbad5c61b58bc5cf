//! Kubernetes Events on claimed Services for problems their owners must fix, in the same words
//! as the log line, so `kubectl describe service` shows what the agent's log says.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::cluster::ClusterState;
use crate::diag::{Diagnostic, Severity};
use crate::metrics::Telemetry;
use crate::translate::{ObjectKey, SERVICE_NAME_LABEL, Translation};

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

/// The Event reason for a diagnostic: the three problems users hit most have their own, the rest
/// are named by the kind of object they are in.
pub fn reason(d: &Diagnostic) -> &'static str {
    let field = d.field.as_deref().unwrap_or("");
    let kind = d.object.as_ref().map_or("", |o| o.kind.as_str());
    if d.message.starts_with("no endpoints") {
        "NoEndpoints"
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
/// their slices), each once for as long as it stays open.
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
            let (service, slice) = match object.kind.as_str() {
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
            let note = d.to_string();
            if !self.open.contains(&note) {
                events.push(ProblemEvent {
                    service,
                    slice,
                    reason: reason(d),
                    field: d.field.clone(),
                    note: truncate(&note, MAX_NOTE),
                });
            }
            open.insert(note);
        }
        self.open = open;
        events
    }
}

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

/// Publishes Events through kube-rs's [`Recorder`] (events.k8s.io/v1), off the control loop.
pub struct Publisher {
    recorder: Recorder,
    telemetry: Arc<Telemetry>,
}

impl Publisher {
    pub fn new(client: Client, node_name: &str, telemetry: Arc<Telemetry>) -> Self {
        let reporter = Reporter {
            controller: "extproxy".to_owned(),
            instance: Some(format!("extproxy-{node_name}")),
        };
        Publisher {
            recorder: Recorder::new(client, reporter),
            telemetry,
        }
    }

    /// Sends `event` in the background; a failure is logged and counted, never retried (the
    /// log line already said it).
    pub fn publish(&self, event: ProblemEvent, cluster: &ClusterState) {
        let Some(service) = cluster.service(&event.service) else {
            return;
        };
        let regarding: ObjectReference = service.object_ref(&());
        let secondary = event
            .slice
            .as_ref()
            .and_then(|k| cluster.slice(k))
            .map(|s| s.object_ref(&()));
        // The recorder folds Events with the same reason and action into one series: the field
        // in the action keeps two problems of one Service apart.
        let action = match &event.field {
            Some(field) => truncate(&format!("Program {field}"), MAX_ACTION),
            None => "Program".to_owned(),
        };
        let recorder = self.recorder.clone();
        let telemetry = self.telemetry.clone();
        tokio::spawn(async move {
            let published = recorder
                .publish(
                    &Event {
                        // Only errors and warnings become Events.
                        type_: EventType::Warning,
                        reason: event.reason.to_owned(),
                        note: Some(event.note),
                        action,
                        secondary,
                    },
                    &regarding,
                )
                .await;
            if let Err(err) = &published {
                tracing::warn!(
                    "cannot publish the {} Event on Service {}: {err}",
                    event.reason,
                    event.service
                );
            }
            telemetry.record_event(event.reason, published.is_ok());
        });
    }
}
