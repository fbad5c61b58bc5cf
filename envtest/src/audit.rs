//! The API server's audit log: every request with who made it and what it was answered, which is
//! how a test sees that nothing was forbidden or that a client listed again.

use std::path::Path;

use serde::Deserialize;

use crate::Error;

/// Metadata for every request; the stage a request was received at is left out (each request
/// then shows once, or twice for a watch: when it started streaming and when it ended).
pub(crate) const POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
";

#[derive(Clone, Debug, Deserialize)]
pub struct AuditUser {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditObject {
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub subresource: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub api_group: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct ResponseStatus {
    #[serde(default)]
    code: u16,
}

/// One line of the audit log.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// `ResponseStarted` (a watch began streaming) or `ResponseComplete`.
    pub stage: String,
    /// get, list, watch, create, update, patch, delete, ...
    pub verb: String,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    pub user: AuditUser,
    #[serde(default)]
    pub user_agent: String,
    #[serde(default)]
    pub object_ref: Option<AuditObject>,
    #[serde(default)]
    response_status: Option<ResponseStatus>,
}

impl AuditEvent {
    /// The HTTP status the request was answered with (0 when the log has none).
    pub fn code(&self) -> u16 {
        self.response_status.as_ref().map_or(0, |s| s.code)
    }

    /// The resource asked for (`services`, `endpointslices`, `events`, ...), or "".
    pub fn resource(&self) -> &str {
        self.object_ref.as_ref().map_or("", |o| &o.resource)
    }

    /// `verb resource code`, for messages.
    pub fn summary(&self) -> String {
        format!(
            "{} {} -> {} ({})",
            self.verb,
            self.request_uri,
            self.code(),
            self.user.username
        )
    }
}

pub(crate) fn read(path: &Path) -> Result<Vec<AuditEvent>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Audit(format!("{}: {e}", path.display())))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut events = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<AuditEvent>(line) {
            Ok(event) => events.push(event),
            // The last line may be half written while the server runs.
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => {
                return Err(Error::Audit(format!(
                    "{} line {}: {e}",
                    path.display(),
                    i + 1
                )));
            }
        }
    }
    Ok(events)
}
