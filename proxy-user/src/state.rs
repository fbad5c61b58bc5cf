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

/// Removes the state folder if nothing is left in it: an agent that exits without leaving its
/// data path to the next one (and `extproxy cleanup`) leaves no empty folder behind.
pub fn remove_dir_if_empty(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}

/// What `extproxy cleanup` removes: the state file, a temporary file an agent died writing, the
/// lock file of an agent no longer running (`lock_file`), and then the folder if that was all.
pub fn remove_all(dir: &Path, lock_file: bool) {
    let _ = std::fs::remove_file(path(dir));
    let _ = std::fs::remove_file(dir.join(format!(".{STATE_FILE}.tmp")));
    if lock_file {
        let _ = std::fs::remove_file(crate::lock::path(dir));
    }
    remove_dir_if_empty(dir);
}

pub fn read(dir: &Path) -> std::io::Result<AgentState> {
    let bytes = std::fs::read(path(dir))?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty state folder was left after exit and after `extproxy cleanup`.
    #[test]
    fn cleanup_leaves_no_empty_state_folder_and_nothing_it_does_not_know() {
        let dir = std::env::temp_dir().join(format!("extproxy-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write(&dir, &AgentState::default()).unwrap();
        std::fs::write(crate::lock::path(&dir), "{}").unwrap();
        // A running agent's lock file stays, and the folder with it.
        remove_all(&dir, false);
        assert!(!path(&dir).exists());
        assert!(crate::lock::path(&dir).exists());
        remove_all(&dir, true);
        assert!(!dir.exists(), "an empty state folder was left");

        // Someone else's file: the folder stays.
        write(&dir, &AgentState::default()).unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        remove_all(&dir, true);
        assert!(dir.join("notes.txt").exists() && !path(&dir).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
