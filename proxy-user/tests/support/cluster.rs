//! Objects for a real API server (extproxy-envtest): built from the k8s-openapi types and
//! created, changed and deleted through a client, as the control plane's users would.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use extproxy::kube::{KubeSource, SourceConfig};
use extproxy::metrics::Telemetry;
use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub const PROXY_LABEL: (&str, &str) = ("service.kubernetes.io/service-proxy-name", "extproxy");
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn meta(namespace: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        }),
        ..ObjectMeta::default()
    }
}

/// A Service port: (name, port, protocol).
pub type Port<'a> = (&'a str, i32, &'a str);

/// A Service without a selector; `labels` decide who proxies it.
pub fn service(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    type_: &str,
    ports: &[Port],
) -> Service {
    Service {
        metadata: meta(namespace, name, labels),
        spec: Some(ServiceSpec {
            type_: Some(type_.to_owned()),
            ports: Some(
                ports
                    .iter()
                    .map(|(port_name, port, protocol)| ServicePort {
                        name: Some((*port_name).to_owned()),
                        port: *port,
                        protocol: Some((*protocol).to_owned()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A Service handed to extproxy (labelled, no selector).
pub fn claimed_service(namespace: &str, name: &str, type_: &str, ports: &[Port]) -> Service {
    service(namespace, name, &[PROXY_LABEL], type_, ports)
}

/// An endpoint and its conditions.
#[derive(Clone, Copy, Debug)]
pub struct Ep<'a> {
    pub addr: &'a str,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

pub fn ready(addr: &str) -> Ep<'_> {
    Ep {
        addr,
        ready: true,
        serving: true,
        terminating: false,
    }
}

/// An IPv4 EndpointSlice of Service `service`; `ports` are (name, port, protocol).
pub fn slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[Port],
    endpoints: &[Ep],
) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(namespace, name, &[(SERVICE_NAME_LABEL, service)]),
        address_type: "IPv4".to_owned(),
        ports: Some(
            ports
                .iter()
                .map(|(port_name, port, protocol)| EndpointPort {
                    name: Some((*port_name).to_owned()),
                    port: Some(*port),
                    protocol: Some((*protocol).to_owned()),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
        endpoints: endpoints
            .iter()
            .map(|e| Endpoint {
                addresses: vec![e.addr.to_owned()],
                conditions: Some(EndpointConditions {
                    ready: Some(e.ready),
                    serving: Some(e.serving),
                    terminating: Some(e.terminating),
                }),
                ..Endpoint::default()
            })
            .collect(),
    }
}

/// Node addresses as (type, address): ("InternalIP", "10.0.0.1").
pub fn node_addresses(addresses: &[(&str, &str)]) -> Vec<NodeAddress> {
    addresses
        .iter()
        .map(|(type_, address)| NodeAddress {
            type_: (*type_).to_owned(),
            address: (*address).to_owned(),
        })
        .collect()
}

/// A Node as a kubelet registers it: with its addresses in the status.
pub fn node(name: &str, addresses: &[(&str, &str)]) -> Node {
    Node {
        metadata: meta("", name, &[]),
        status: Some(NodeStatus {
            addresses: Some(node_addresses(addresses)),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

/// Creates a namespaced object in its namespace; returns it as the server stored it.
pub async fn create<K>(client: &Client, object: &K) -> K
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let ns = object
        .meta()
        .namespace
        .clone()
        .expect("a namespaced object");
    Api::<K>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), object)
        .await
        .unwrap_or_else(|e| panic!("creating {:?}: {e}", object.meta().name))
}

/// Replaces a namespaced object with `object` (the current resourceVersion is fetched first).
pub async fn replace<K>(client: &Client, object: &K) -> K
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let ns = object.meta().namespace.clone().unwrap();
    let name = object.meta().name.clone().unwrap();
    let api = Api::<K>::namespaced(client.clone(), &ns);
    let current = api.get(&name).await.unwrap();
    let mut object = object.clone();
    object.meta_mut().resource_version = current.meta().resource_version.clone();
    api.replace(&name, &PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("replacing {ns}/{name}: {e}"))
}

pub async fn delete<K>(client: &Client, namespace: &str, name: &str)
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("deleting {namespace}/{name}: {e}"));
}

pub async fn create_namespace(client: &Client, name: &str) {
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta("", name, &[]),
                ..Namespace::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
}

pub async fn create_node(client: &Client, node: &Node) -> Node {
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), node)
        .await
        .unwrap_or_else(|e| panic!("creating Node {:?}: {e}", node.metadata.name))
}

/// Sets a Node's addresses, as its kubelet would (the status subresource).
pub async fn set_node_addresses(client: &Client, name: &str, addresses: &[(&str, &str)]) {
    let patch = serde_json::json!({"status": {"addresses": node_addresses(addresses)}});
    Api::<Node>::all(client.clone())
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("patching Node {name}'s status: {e}"));
}

/// A Kubernetes source configured from a kubeconfig file, the way `extproxy run --kubeconfig`
/// does it.
pub async fn source_from_kubeconfig(
    kubeconfig: &Path,
    telemetry: &Arc<Telemetry>,
    config: SourceConfig,
) -> KubeSource {
    let kube_config = extproxy::kube::load_config(Some(kubeconfig))
        .await
        .expect("the kubeconfig loads");
    let client = extproxy::kube::client::client(kube_config, telemetry.clone()).unwrap();
    KubeSource::new(client, config, telemetry.clone())
}

/// Creates what `kubectl apply -k deploy/` creates, from the files the kustomization lists (its
/// namespace filled in where a file has none; its labels and image names are left out): the
/// real server validates every object, and the RBAC is exactly what the DaemonSet gets.
pub async fn apply_deploy(client: &Client) {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let read = |name: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let kustomization = read("kustomization.yaml");
    let namespace = kustomization["namespace"].as_str().unwrap().to_owned();
    let pp = PostParams::default();
    for file in kustomization["resources"].as_array().unwrap() {
        let file = file.as_str().unwrap();
        let mut value = read(file);
        let kind = value["kind"].as_str().unwrap().to_owned();
        let cluster_scoped = matches!(
            kind.as_str(),
            "Namespace" | "ClusterRole" | "ClusterRoleBinding"
        );
        if !cluster_scoped && value["metadata"]["namespace"].is_null() {
            value["metadata"]["namespace"] = namespace.clone().into();
        }
        let ns = value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let c = client.clone();
        let result = match kind.as_str() {
            "Namespace" => Api::<Namespace>::all(c)
                .create(&pp, &parse(file, value))
                .await
                .map(drop),
            "ServiceAccount" => Api::<ServiceAccount>::namespaced(c, &ns)
                .create(&pp, &parse(file, value))
                .await
                .map(drop),
            "ClusterRole" => Api::<ClusterRole>::all(c)
                .create(&pp, &parse(file, value))
                .await
                .map(drop),
            "ClusterRoleBinding" => Api::<ClusterRoleBinding>::all(c)
                .create(&pp, &parse(file, value))
                .await
                .map(drop),
            "Role" => Api::<Role>::namespaced(c, &ns)
                .create(&pp, &parse(file, value))
                .await
                .map(drop),
            "RoleBinding" => Api::<RoleBinding>::namespaced(c, &ns)
                .create(&pp, &parse(file, value))
                .await
                .map(drop),
            "DaemonSet" => Api::<DaemonSet>::namespaced(c, &ns)
                .create(&pp, &parse(file, value))
                .await
                .map(drop),
            other => panic!("{file}: a {other} is not expected in deploy/"),
        };
        result.unwrap_or_else(|e| panic!("creating deploy/{file}: {e}"));
    }
}

fn parse<T: DeserializeOwned>(file: &str, value: serde_json::Value) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

/// A token of ServiceAccount `namespace/name` (TokenRequest, as the kubelet gets it for a pod).
pub async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for {namespace}/{name}: {e}"))
        .status
        .expect("the token request's status")
        .token
}
