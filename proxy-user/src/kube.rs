//! Kubernetes mode: the API server is the source of desired state.
//!
//! kube-rs watchers fill one reflector store per resource ([`cluster`]); once every store holds a
//! complete list, each batch of changes is translated as a whole and handed to the same
//! [`Agent`] manifest mode uses, which programs only the difference. Nothing is programmed before
//! the first complete list: after a restart the adopted maps keep forwarding untouched until the
//! agent knows the whole cluster again.

use std::path::Path;

use thiserror::Error;

use proxy_common::FrontendKey;

use crate::agent::{Agent, Applied};
use crate::translate::{ObjectKey, ServicePortKey, Translation};

pub mod client;
pub mod cluster;
pub mod events;
pub mod node;
pub mod source;

#[cfg(test)]
mod tests;

pub use node::{NodeFacts, NodeOverrides};
pub use source::{Batch, KubeSource, SourceConfig};

/// What [`KubeSource::apply`] programs into: the [`Agent`], or an in-memory model in tests.
pub trait Programmer {
    /// Programs a translation as a diff.
    fn program(&mut self, translation: &Translation) -> Applied;
    /// The node facts the next translation was made with (for what the agent publishes).
    fn set_node(&mut self, node: &NodeFacts);
    /// Which Service port each programmed service id is.
    fn service_names(&self) -> Vec<(u32, ServicePortKey)>;
    /// The Service serving each frontend now, which keeps it (see
    /// [`crate::translate::Incremental::set_incumbents`]).
    fn incumbents(&self) -> Vec<(FrontendKey, ObjectKey)> {
        Vec::new()
    }
}

impl Programmer for Agent {
    fn program(&mut self, translation: &Translation) -> Applied {
        self.apply(translation)
    }

    fn set_node(&mut self, node: &NodeFacts) {
        self.set_node_facts(&node.egress, &node.node_ports);
    }

    fn service_names(&self) -> Vec<(u32, ServicePortKey)> {
        self.reconciler()
            .service_ids()
            .map(|(key, id)| (id, key.clone()))
            .collect()
    }

    fn incumbents(&self) -> Vec<(FrontendKey, ObjectKey)> {
        Agent::incumbents(self)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no --kubeconfig and not running in a pod ({0}): pass --kubeconfig PATH, or run as the DaemonSet in deploy/"
    )]
    InCluster(#[source] kube::config::InClusterError),
}

/// The client configuration: the kubeconfig at `path` (its current context), or the pod's
/// service account when there is none.
pub async fn load_config(path: Option<&Path>) -> Result<kube::Config, ConfigError> {
    match path {
        Some(path) => {
            let err = |source| ConfigError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(err)
        }
        None => kube::Config::incluster().map_err(ConfigError::InCluster),
    }
}
