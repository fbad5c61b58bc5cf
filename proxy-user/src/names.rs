//! Well-known label and annotation names (and values) that extproxy reads or writes.
//!
//! They are facts about Kubernetes, not about any one step: the manifest reader, the object model
//! (which keeps only these labels and annotations) and the translator all use them, and take them
//! from here rather than from one another.

/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the proxy that owns a Service (kube-proxy skips Services that carry it).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The [`SERVICE_PROXY_NAME_LABEL`] value that hands a Service to extproxy.
pub const PROXY_NAME: &str = "extproxy";
/// Per-Service egress override: comma-separated, at most one address per family.
pub const EGRESS_IP_ANNOTATION: &str = "extproxy.io/egress-ip";
/// Per-Service cluster egress address (one per family, comma-separated): every node's flows of
/// the Service leave from it, through the node that owns it.
pub const CLUSTER_EGRESS_IP_ANNOTATION: &str = "extproxy.io/cluster-egress-ip";
/// Deprecated spelling of loadBalancerSourceRanges, still honoured by kube-proxy.
pub const LEGACY_SOURCE_RANGES_ANNOTATION: &str =
    "service.beta.kubernetes.io/load-balancer-source-ranges";

pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The value the control plane's mirroring controller puts in [`MANAGED_BY_LABEL`].
pub const MIRRORING_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";
/// Endpoints labelled `true` are not mirrored by the control plane, so not by us either.
pub const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";

/// Set by the EndpointSlice controller to when the change that produced the slice happened;
/// kube-proxy measures its network programming latency from it.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// kubectl's copy of the applied object: often the largest part of an object, never read.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Health checking of a Service's endpoints (see `health::config`).
pub const HEALTH_CHECK_ANNOTATION: &str = "extproxy.io/health-check";
pub const HEALTH_CHECK_PATH_ANNOTATION: &str = "extproxy.io/health-check-path";
pub const HEALTH_CHECK_HOST_ANNOTATION: &str = "extproxy.io/health-check-host";
pub const HEALTH_CHECK_PORT_ANNOTATION: &str = "extproxy.io/health-check-port";
pub const HEALTH_CHECK_INTERVAL_ANNOTATION: &str = "extproxy.io/health-check-interval";
pub const HEALTH_CHECK_TIMEOUT_ANNOTATION: &str = "extproxy.io/health-check-timeout";
pub const HEALTH_CHECK_UNHEALTHY_ANNOTATION: &str = "extproxy.io/health-check-unhealthy-threshold";
pub const HEALTH_CHECK_HEALTHY_ANNOTATION: &str = "extproxy.io/health-check-healthy-threshold";
pub const HEALTH_CHECK_VERIFY_ANNOTATION: &str = "extproxy.io/health-check-verify";
pub const HEALTH_CHECK_PASSIVE_ANNOTATION: &str = "extproxy.io/health-check-passive";
pub const HEALTH_CHECK_ALL_DOWN_ANNOTATION: &str = "extproxy.io/health-check-all-down";
/// Every health annotation: the object model keeps them.
pub const HEALTH_ANNOTATIONS: [&str; 11] = [
    HEALTH_CHECK_ANNOTATION,
    HEALTH_CHECK_PATH_ANNOTATION,
    HEALTH_CHECK_HOST_ANNOTATION,
    HEALTH_CHECK_PORT_ANNOTATION,
    HEALTH_CHECK_INTERVAL_ANNOTATION,
    HEALTH_CHECK_TIMEOUT_ANNOTATION,
    HEALTH_CHECK_UNHEALTHY_ANNOTATION,
    HEALTH_CHECK_HEALTHY_ANNOTATION,
    HEALTH_CHECK_VERIFY_ANNOTATION,
    HEALTH_CHECK_PASSIVE_ANNOTATION,
    HEALTH_CHECK_ALL_DOWN_ANNOTATION,
];
/// Nodes labelled `true` probe and publish their verdicts (Kubernetes mode, see docs).
pub const HEALTH_PROBER_LABEL: &str = "extproxy.io/health-prober";
