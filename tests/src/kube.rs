//! What the Kubernetes-mode network-namespace tests share: API calls made from inside a
//! namespace (where their API server listens) and object metadata.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use testbed::topo::in_netns;

/// Runs API calls from a thread inside namespace `ns`: a current-thread runtime makes every
/// socket there.
pub struct NodeApi {
    pub ns: String,
    pub rt: tokio::runtime::Runtime,
}

impl NodeApi {
    pub fn new(ns: &str) -> Self {
        NodeApi {
            ns: ns.to_owned(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    pub fn run<T: Send, F: Future<Output = T> + Send>(&self, f: impl FnOnce() -> F + Send) -> T {
        in_netns(&self.ns, || self.rt.block_on(f()))
    }
}

/// Metadata with a name, a namespace (none when empty) and labels.
pub fn meta(namespace: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: (!namespace.is_empty()).then(|| namespace.into()),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        ),
        ..ObjectMeta::default()
    }
}
