//! What a running agent publishes for `extproxy inspect` and for people: which Service port each
//! service id is, and the open diagnostics. The maps hold numbers; this file holds the names.
//!
//! Written atomically (temp file + rename) after a change that touches it, at most once a second.

use std::{
    borrow::Cow,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";
pub const DEFAULT_STATE_DIR: &str = "/run/extproxy";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentState {
    pub pid: u32,
    /// "manifests:/path" or "kubernetes:<node>".
    pub source: String,
    pub interfaces: Vec<String>,
    pub egress: Vec<IpAddr>,
    pub node_addresses: Vec<IpAddr>,
    pub services: Vec<ServiceName>,
    pub diagnostics: Vec<String>,
    /// Health of the endpoints that take new flows (absent from older agents' files).
    #[serde(default)]
    pub health: Vec<crate::health::HealthRecord>,
}

/// The agent keeps one for each of its Service ports between writes of the state file: the
/// strings are shared with the reconciler's keys, or static, rather than copies.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceName {
    pub id: u32,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port_name: Arc<str>,
    pub protocol: Cow<'static, str>,
    pub family: Cow<'static, str>,
}

impl ServiceName {
    pub fn display(&self) -> String {
        let port = if self.port_name.is_empty() {
            "-"
        } else {
            &self.port_name
        };
        format!(
            "{}/{}:{}/{}/{}",
            self.namespace, self.name, port, self.protocol, self.family
        )
    }
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

pub fn write(dir: &Path, state: &AgentState) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, path(dir))
}

pub fn read(dir: &Path) -> std::io::Result<AgentState> {
    let bytes = std::fs::read(path(dir))?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}
