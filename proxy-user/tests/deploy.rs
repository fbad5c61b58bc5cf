//! deploy/ without a cluster: every manifest is a valid object of its kind (nothing lost in a
//! round trip through the Kubernetes API types, so no misspelt field), the kustomization lists
//! them all, the RBAC rules cover exactly what the agent requests, and the DaemonSet's arguments
//! are accepted by this extproxy.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(name: &str) -> Value {
    let text = std::fs::read_to_string(deploy_dir().join(name)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Parses `value` as `T` and checks that serializing it gives the same document back.
fn round_trip<T: DeserializeOwned + Serialize>(name: &str, value: &Value) -> T {
    let object: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let back = serde_json::to_value(&object).unwrap();
    assert_eq!(
        &back, value,
        "{name}: fields were lost or changed (misspelt?)"
    );
    object
}

#[test]
fn manifests_are_valid_objects_listed_in_the_kustomization() {
    let kustomization = read("kustomization.yaml");
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let mut on_disk: Vec<String> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = resources.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(
        listed, on_disk,
        "every manifest is applied by kubectl apply -k"
    );

    for name in resources {
        let value = read(name);
        match value["kind"].as_str().unwrap() {
            "Namespace" => drop(round_trip::<Namespace>(name, &value)),
            "ServiceAccount" => drop(round_trip::<ServiceAccount>(name, &value)),
            "ClusterRole" => drop(round_trip::<ClusterRole>(name, &value)),
            "ClusterRoleBinding" => drop(round_trip::<ClusterRoleBinding>(name, &value)),
            "Role" => drop(round_trip::<Role>(name, &value)),
            "RoleBinding" => drop(round_trip::<RoleBinding>(name, &value)),
            "DaemonSet" => drop(round_trip::<DaemonSet>(name, &value)),
            other => panic!("{name}: unexpected kind {other}"),
        }
    }
}

/// `group/resource:verb` for every grant of `rules`, sorted.
fn grants(rules: Vec<PolicyRule>) -> Vec<String> {
    let mut grants: Vec<String> = rules
        .iter()
        .flat_map(|rule| {
            let group = rule.api_groups.clone().unwrap().join(",");
            let resources = rule.resources.clone().unwrap();
            let verbs = rule.verbs.clone();
            resources.into_iter().flat_map(move |r| {
                let group = group.clone();
                verbs
                    .clone()
                    .into_iter()
                    .map(move |v| format!("{group}/{r}:{v}"))
            })
        })
        .collect();
    grants.sort();
    grants
}

#[test]
fn rbac_grants_what_the_agent_requests_and_no_more() {
    let role: ClusterRole = round_trip("clusterrole.yaml", &read("clusterrole.yaml"));
    assert_eq!(
        grants(role.rules.unwrap()),
        vec![
            "/nodes:list",
            "/nodes:watch",
            "/services:list",
            "/services:watch",
            "discovery.k8s.io/endpointslices:list",
            "discovery.k8s.io/endpointslices:watch",
            "events.k8s.io/events:create",
            "events.k8s.io/events:get",
            "events.k8s.io/events:update",
        ]
    );
}

/// Leases (health verdicts prober nodes share, cluster egress elections): in extproxy's own
/// namespace only, and never deleted.
#[test]
fn leases_are_granted_in_extproxys_namespace_only() {
    let namespace = read("kustomization.yaml")["namespace"]
        .as_str()
        .unwrap()
        .to_owned();
    let role: Role = round_trip("role.yaml", &read("role.yaml"));
    assert_eq!(role.metadata.namespace.as_deref(), Some(namespace.as_str()));
    assert_eq!(
        grants(role.rules.unwrap()),
        vec![
            "coordination.k8s.io/leases:create",
            "coordination.k8s.io/leases:get",
            "coordination.k8s.io/leases:list",
            "coordination.k8s.io/leases:patch",
            "coordination.k8s.io/leases:update",
            "coordination.k8s.io/leases:watch",
        ]
    );
    let binding: RoleBinding = round_trip("rolebinding.yaml", &read("rolebinding.yaml"));
    assert_eq!(
        binding.metadata.namespace.as_deref(),
        Some(namespace.as_str())
    );
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "extproxy");
    assert_eq!(subjects[0].namespace.as_deref(), Some(namespace.as_str()));
}

#[test]
fn the_daemonset_runs_kube_mode_with_least_privilege() {
    let ds: DaemonSet = round_trip("daemonset.yaml", &read("daemonset.yaml"));
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let agent = &pod.containers[0];
    let sc = agent.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(
        caps.add,
        Some(vec![
            "BPF".to_owned(),
            "PERFMON".to_owned(),
            "NET_ADMIN".to_owned(),
            // Gratuitous ARP / neighbour advertisements of a cluster egress owner.
            "NET_RAW".to_owned(),
        ])
    );
    let env = agent.env.clone().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    // The cluster egress Leases' namespace is the pod's own.
    let pod_namespace = env.iter().find(|e| e.name == "POD_NAMESPACE").unwrap();
    assert_eq!(
        pod_namespace
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.namespace"
    );

    // The arguments are accepted by this binary (clap checks them all before --help answers).
    let mut args = agent.args.clone().unwrap();
    args.push("--help".to_owned());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_extproxy"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "extproxy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
