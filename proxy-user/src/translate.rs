//! Inventory (Services, EndpointSlices) + node facts + settings -> what the maps should hold.
//!
//! Pure and deterministic: the same input gives the same [`Desired`] and the same diagnostics,
//! whatever order the objects arrived in. Semantics follow kube-proxy; where kube-proxy is silent,
//! they follow what a user of an external-endpoint proxy expects (fail closed, say why).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::SystemTime;

use crate::objects::{
    ServiceObject as Service, ServicePortObject as ServicePort, ServiceSpecObject as ServiceSpec,
    SliceObject as EndpointSlice,
};
use ipnet::IpNet;
use proxy_common::user::port_net;
use proxy_common::{Addr, FE_F_SOURCE_RANGES, FrontendKey, FrontendKind, PROTO_TCP, PROTO_UDP};

use crate::diag::{Diagnostic, ObjectRef, Origin, Severity, Site};
use crate::health::config::{self as health_config, HealthConfig};
use crate::names::{
    CLUSTER_EGRESS_IP_ANNOTATION, EGRESS_IP_ANNOTATION, HEALTH_CHECK_ALL_DOWN_ANNOTATION,
    HEALTH_CHECK_PORT_ANNOTATION, LEGACY_SOURCE_RANGES_ANNOTATION, PROXY_NAME,
    SERVICE_PROXY_NAME_LABEL,
};

mod alloc;
mod fqdn;
mod incremental;
#[cfg(test)]
mod tests;
mod vecmap;

pub use incremental::Incremental;
use incremental::{Allocation, Precedence, ServiceOut, SliceRef, World};
pub use vecmap::VecMap;

const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

// ---------------------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Shared, not copied: the translator files every key under several indexes.
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        ObjectKey {
            namespace: namespace.as_ref().into(),
            name: name.as_ref().into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An object and where it came from. The object is shared, not copied: the same parsed manifest
/// or reflector store entry serves the source, the inventory and the translator's cache.
#[derive(Debug)]
pub struct Sourced<T> {
    pub object: Arc<T>,
    pub origin: Origin,
    /// For slices made from legacy Endpoints: the Endpoints object, which diagnostics name.
    /// Shared with the source's own reference (Arc): kept with every translated object.
    pub mirrored_from: Option<Arc<ObjectRef>>,
    /// When the object came to be: of two Services wanting one frontend, neither serving it yet,
    /// the older keeps it.
    pub seniority: Seniority,
}

impl<T> Sourced<T> {
    pub fn new(object: impl Into<Arc<T>>, origin: Origin) -> Self {
        Sourced {
            object: object.into(),
            origin,
            mirrored_from: None,
            seniority: Seniority::default(),
        }
    }

    pub fn with_seniority(mut self, seniority: Seniority) -> Self {
        self.seniority = seniority;
        self
    }
}

impl<T> Clone for Sourced<T> {
    fn clone(&self) -> Self {
        Sourced {
            object: self.object.clone(),
            origin: self.origin.clone(),
            mirrored_from: self.mirrored_from.clone(),
            seniority: self.seniority.clone(),
        }
    }
}

/// How old an object is, for "who was first" when two Services want one frontend: stable
/// across restarts, so a cold start decides as the running agent did. Kubernetes mode: the
/// creationTimestamp, then the uid for Services created in the same second. Manifest mode: the
/// file's modification time (then its path and the Service's namespace/name decide).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Seniority {
    /// None (not known) counts as younger than any known time.
    pub since: Option<SystemTime>,
    pub uid: Option<Arc<str>>,
}

impl Seniority {
    /// Sorts older first.
    fn order(&self) -> (bool, Option<SystemTime>, Option<&str>) {
        (self.since.is_none(), self.since, self.uid.as_deref())
    }
}

#[derive(Clone, Debug, Default)]
pub struct Inventory {
    pub services: BTreeMap<ObjectKey, Sourced<Service>>,
    pub slices: BTreeMap<ObjectKey, Sourced<EndpointSlice>>,
}

/// Endpoints of one Service that health checking judged unhealthy: they get no new flows (their
/// established flows go on), like endpoints that are not ready. An input like the objects, so
/// the translation stays a function of its inputs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unhealthy {
    /// (address, port, protocol) of the endpoints.
    pub endpoints: BTreeSet<(IpAddr, u16, Protocol)>,
    /// When every endpoint of a port is unhealthy: refuse connections instead of using them all.
    pub refuse_when_all_down: bool,
}

/// Facts about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Addresses NodePorts are served on.
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimPolicy {
    /// Manifest mode: every Service without a selector.
    SelectorLess,
    /// Kube mode: Services labelled `service.kubernetes.io/service-proxy-name: extproxy`, plus
    /// every selector-less one without that label when `claim_all_selectorless` is set.
    Label { claim_all_selectorless: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The node's egress (SNAT) addresses per family (`--egress-ip`): the first is a Service's
    /// `egress`, the others the rest of its pool (see [`check_egress_addresses`]).
    pub egress_v4: Vec<Ipv4Addr>,
    pub egress_v6: Vec<Ipv6Addr>,
    /// The declared cluster egress addresses (see DESIGN.md, "Cluster egress").
    pub cluster_egress: ClusterEgressRules,
    /// Where missing cluster IPs are allocated from (the first range of each family).
    pub service_cidrs: Vec<IpNet>,
    pub node_port_range: RangeInclusive<u16>,
    /// Allocate missing clusterIPs and nodePorts (manifest mode; an API server does it otherwise).
    pub fill_missing: bool,
    pub claim: ClaimPolicy,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            egress_v4: Vec::new(),
            egress_v6: Vec::new(),
            cluster_egress: ClusterEgressRules::default(),
            service_cidrs: Vec::new(),
            node_port_range: 30_000..=32_767,
            fill_missing: false,
            claim: ClaimPolicy::SelectorLess,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    /// The spelling Kubernetes uses (`spec.ipFamilies`, `addressType`).
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }

    fn other(self) -> Self {
        match self {
            IpFamily::V4 => IpFamily::V6,
            IpFamily::V6 => IpFamily::V4,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// One service in the maps: one port of one Service, in one IP family (SNAT cannot cross
/// families, so a dual-stack Service port is two).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortKey {
    /// Shared, not copied: the translation, the translator's bookkeeping and the reconciler
    /// each keep every key, and at 10k Services the copies of these short strings added up.
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port_name: Arc<str>,
    pub protocol: Protocol,
    pub family: IpFamily,
}

impl ServicePortKey {
    /// The Service this port is of.
    pub fn service(&self) -> ObjectKey {
        ObjectKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

impl fmt::Display for ServicePortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Service {}/{} port {:?} {} {}",
            self.namespace,
            self.name,
            self.port_name,
            self.protocol.name(),
            self.family.name()
        )
    }
}

/// The cluster egress addresses a Service may use: only declared ones (a typo must not make a
/// node take some other team's address), each for the namespaces that may use it; and the one
/// each family's Services use without the annotation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterEgressRules {
    /// Declared addresses and the namespaces (exact names or `*` globs) that may use each.
    pub addresses: Vec<(IpAddr, Vec<String>)>,
    pub default_v4: Option<IpAddr>,
    pub default_v6: Option<IpAddr>,
}

impl ClusterEgressRules {
    /// Why `namespace` may not use `ip`, if it may not.
    pub fn check(&self, ip: IpAddr, namespace: &str) -> Result<(), String> {
        let Some((_, patterns)) = self.addresses.iter().find(|(a, _)| *a == ip) else {
            return Err(format!(
                "{ip} is not a declared cluster egress address (--cluster-egress-ip)"
            ));
        };
        if patterns
            .iter()
            .any(|p| crate::egress::config::glob(p.as_bytes(), namespace.as_bytes()))
        {
            Ok(())
        } else {
            Err(format!(
                "namespace {namespace} may not use cluster egress address {ip} (allowed: {})",
                patterns.join(",")
            ))
        }
    }

    fn default_for(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => self.default_v4,
            IpFamily::V6 => self.default_v6,
        }
    }
}

/// A frontend's [`proxy_common::FrontendValue`] without the service id (the reconciler owns ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendSpec {
    pub kind: FrontendKind,
    /// `FE_F_*` bits.
    pub flags: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendRole {
    /// Receives new flows.
    Active,
    /// Keeps its existing flows, gets no new ones (not ready, or terminating).
    Draining,
    /// Ready, but health checking judged it unhealthy: keeps its existing flows, gets no new
    /// ones.
    Unhealthy,
}

/// A Service's health annotations as read: what the health monitor runs with (an invalid one
/// leaves the monitor on the Service's previous setting).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HealthSetting {
    /// No health annotation: passive detection only, fail open.
    #[default]
    Default,
    Configured(Arc<HealthConfig>),
    /// An annotation is bad (a diagnostic says which).
    Invalid,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub frontends: VecMap<FrontendKey, FrontendSpec>,
    pub backends: VecMap<(IpAddr, u16), BackendRole>,
    /// sessionAffinity ClientIP timeout in seconds; 0 = none.
    pub affinity_timeout: u32,
    /// SNAT address; None programs the service to reject (no egress for this family).
    pub egress: Option<IpAddr>,
    /// The rest of the Service's egress pool, after `egress` (empty: one address). SNAT ports
    /// are unique per (egress address, endpoint), so each address adds a port range per
    /// endpoint. Never set for a cluster egress address.
    pub extra_egress: Vec<IpAddr>,
    /// `egress` is a cluster egress address: its owner serves the flows, endpoints are chosen by
    /// Maglev.
    pub cluster_egress: bool,
    /// loadBalancerSourceRanges of this family. Only consulted by frontends flagged
    /// `FE_F_SOURCE_RANGES`; empty with the flag means deny all.
    pub source_ranges: Vec<IpNet>,
    /// For display: the Service port, its cluster IP in this family and its nodePort.
    pub port: u16,
    pub cluster_ip: Option<IpAddr>,
    pub node_port: Option<u16>,
    /// The Service's health checking.
    pub health: HealthSetting,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<ServicePortKey, DesiredService>,
}

impl Desired {
    /// The Service each frontend is programmed for: what [`Incremental::set_incumbents`] takes.
    pub fn frontend_owners(&self) -> Vec<(FrontendKey, ObjectKey)> {
        let mut owners = Vec::new();
        for (key, service) in &self.services {
            let owner = key.service();
            owners.extend(service.frontends.keys().map(|f| (*f, owner.clone())));
        }
        owners
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimReason {
    /// The Service has no selector (manifest mode, or kube mode with claim_all_selectorless).
    SelectorLess,
    /// Labelled `service.kubernetes.io/service-proxy-name: extproxy`.
    Label,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub service: ObjectKey,
    pub reason: ClaimReason,
}

/// A value allocated in manifest mode because the manifest left it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filled {
    pub service: ObjectKey,
    /// `spec.clusterIPs[IPv4]`-style: the field and, for cluster IPs, the family.
    pub field: String,
    pub value: String,
}

#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub desired: Desired,
    pub diagnostics: Vec<Diagnostic>,
    pub claimed: Vec<Claimed>,
    pub filled: Vec<Filled>,
    /// What differs from the previous translation of the same [`Incremental`]; None when
    /// everything may have (the first translation, new node facts).
    pub changes: Option<Changes>,
}

/// What one incremental update changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Service ports added, removed or programmed differently.
    pub services: BTreeSet<ServicePortKey>,
    /// `diagnostics` differs.
    pub diagnostics: bool,
    /// `claimed` or `filled` differs.
    pub claims: bool,
}

// ---------------------------------------------------------------------------------------------
// Translation
// ---------------------------------------------------------------------------------------------

/// Translates a whole inventory at once (`extproxy validate`, tests); the agent keeps an
/// [`Incremental`] instead, which gives the same result after every change.
pub fn translate(inventory: &Inventory, node: &NodeInfo, settings: &Settings) -> Translation {
    translate_with(inventory, node, settings, Vec::new())
}

/// [`translate`] with the Service serving each frontend now (see [`Incremental::set_incumbents`]):
/// a frontend stays with its Service whoever else comes to want it.
pub fn translate_with(
    inventory: &Inventory,
    node: &NodeInfo,
    settings: &Settings,
    incumbents: Vec<(FrontendKey, ObjectKey)>,
) -> Translation {
    let mut t = Incremental::new(node.clone(), settings.clone());
    t.set_incumbents(incumbents);
    for (key, slice) in &inventory.slices {
        t.set_slice(key.clone(), Some(slice.clone()));
    }
    for (key, service) in &inventory.services {
        t.set_service(key.clone(), Some(service.clone()));
    }
    t.update();
    t.into_translation()
}

/// Translates one Service. What it cannot know alone, who keeps a contested frontend, which
/// values filling may hand out and which addresses are other Services' cluster IPs and
/// endpoints, it asks `world`, which answers as a single pass over the inventory would.
struct Translator<'a> {
    settings: &'a Settings,
    node: &'a NodeInfo,
    world: &'a World,
    slices: &'a incremental::Slices,
    key: &'a ObjectKey,
    out: ServiceOut,
    /// Values this Service filled in so far (its own earlier ports and families).
    own_ips: BTreeSet<IpAddr>,
    own_node_ports: BTreeSet<u16>,
    frontend_owners: HashMap<FrontendKey, ServicePortKey>,
    /// Endpoint addresses of this Service that nothing can be reached at through extproxy.
    unusable_endpoints: BTreeSet<IpAddr>,
    /// Endpoints health checking judged unhealthy.
    unhealthy: Option<&'a Unhealthy>,
}

/// A Service port, validated.
struct PortSpec {
    index: usize,
    name: String,
    protocol: Protocol,
    port: u16,
    node_port: Option<u16>,
}

/// Per-Service facts shared by all its ports.
struct ServiceFacts {
    families: Vec<IpFamily>,
    cluster_ips: Vec<IpAddr>,
    /// (address, field) of load balancer ingress IPs and external IPs.
    lb_ips: Vec<(IpAddr, String)>,
    external_ips: Vec<(IpAddr, String)>,
    /// Some when the Service restricts its load balancer sources: the valid ranges.
    source_ranges: Option<Vec<IpNet>>,
    affinity_timeout: u32,
    /// Egress addresses per family, the first one the Service's `egress`.
    egress_v4: Vec<IpAddr>,
    egress_v6: Vec<IpAddr>,
    /// Families whose egress is a cluster egress address.
    cluster_egress: Vec<IpFamily>,
    health: HealthSetting,
}

/// An EndpointSlice, validated once for all the Service ports that read it.
#[derive(Debug)]
struct SliceFacts {
    /// None for FQDN slices (their names resolve to both families) and unusable ones.
    family: Option<IpFamily>,
    /// (name, protocol, port) with the API defaults applied ("" and TCP).
    ports: Vec<(String, String, Option<u16>)>,
    /// (address, conditions, index in the slice's endpoints).
    endpoints: Vec<(IpAddr, Conditions, u32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Conditions {
    ready: bool,
    serving: bool,
    terminating: bool,
}

impl Conditions {
    /// An endpoint's conditions with the API's defaults: ready unless said otherwise, serving
    /// as ready, not terminating.
    fn of(endpoint: &crate::objects::EndpointObject) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        Conditions {
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        }
    }

    /// Ready endpoints take new flows; serving+terminating ones only when none is ready.
    fn rank(self) -> u8 {
        if self.ready {
            2
        } else if self.serving && self.terminating {
            1
        } else {
            0
        }
    }
}

fn spec_of(service: &Service) -> Option<&ServiceSpec> {
    service.spec.as_ref()
}

fn service_type(spec: Option<&ServiceSpec>) -> &str {
    spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP")
}

fn explicit_cluster_ips(spec: &ServiceSpec) -> Vec<(String, &str)> {
    match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        _ => spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty())
            .map(|ip| vec![("spec.clusterIP".to_owned(), ip)])
            .unwrap_or_default(),
    }
}

impl Translator<'_> {
    /// Whether extproxy owns this Service; if not, says why.
    fn claim(&mut self, service: &Service, site: &Site) -> Option<ClaimReason> {
        let spec = spec_of(service);
        let selector_less = spec
            .and_then(|s| s.selector.as_ref())
            .is_none_or(|s| s.empty);
        let proxy_label = service.metadata.labels.get(SERVICE_PROXY_NAME_LABEL);
        let reason = match (self.settings.claim, proxy_label) {
            (ClaimPolicy::Label { .. }, Some(name)) if name == PROXY_NAME => ClaimReason::Label,
            (ClaimPolicy::Label { .. }, Some(name)) => {
                self.out.diagnostics.push(site.info(
                    &format!("metadata.labels[{SERVICE_PROXY_NAME_LABEL}]"),
                    format!("service-proxy-name is {name:?}, not {PROXY_NAME}: left to that proxy"),
                ));
                return None;
            }
            (
                ClaimPolicy::Label {
                    claim_all_selectorless: false,
                },
                None,
            ) => {
                self.out.diagnostics.push(site.info(
                    "metadata.labels",
                    format!(
                        "not labelled {SERVICE_PROXY_NAME_LABEL}: {PROXY_NAME}: left to kube-proxy"
                    ),
                ));
                return None;
            }
            (_, _) if !selector_less => {
                self.out
                    .diagnostics
                    .push(site.info("spec.selector", "has a selector: belongs to kube-proxy"));
                return None;
            }
            (_, _) => ClaimReason::SelectorLess,
        };
        if service_type(spec) == "ExternalName" {
            self.out.diagnostics.push(site.info(
                "spec.type",
                "type ExternalName: nothing to proxy (DNS CNAME)",
            ));
            return None;
        }
        if spec.is_some_and(|s| explicit_cluster_ips(s).iter().any(|(_, ip)| *ip == "None")) {
            self.out.diagnostics.push(site.info(
                "spec.clusterIP",
                "headless (clusterIP: None): no virtual IP to proxy",
            ));
            return None;
        }
        Some(reason)
    }

    fn service(
        &mut self,
        key: &ObjectKey,
        service: &Service,
        site: &Site,
        slice_refs: &[SliceRef<'_>],
    ) {
        let default_spec = ServiceSpec::default();
        let spec = spec_of(service).unwrap_or(&default_spec);
        let type_ = match service_type(Some(spec)) {
            t @ ("ClusterIP" | "NodePort" | "LoadBalancer") => t,
            other => {
                self.out.diagnostics.push(site.error(
                    "spec.type",
                    format!("unknown type {other:?}: treated as ClusterIP"),
                ));
                "ClusterIP"
            }
        };
        if !self.cluster_ips_servable(spec, site) {
            return;
        }
        let slices: Vec<&SliceFacts> = slice_refs.iter().map(SliceRef::facts).collect();
        let slices = slices.as_slice();
        self.skip_unusable_endpoints(slice_refs);
        let ports = self.ports(key, spec, type_, site);
        if ports.is_empty() {
            self.out
                .diagnostics
                .push(site.warning("spec.ports", "no port to proxy: nothing is programmed"));
            return;
        }
        let facts = ServiceFacts {
            families: Vec::new(),
            cluster_ips: Vec::new(),
            lb_ips: if type_ == "LoadBalancer" {
                self.load_balancer_ips(service, spec, site)
            } else {
                Vec::new()
            },
            external_ips: self.parse_ips(
                spec.external_ips.iter().flatten(),
                "spec.externalIPs",
                site,
            ),
            source_ranges: if type_ == "LoadBalancer" {
                self.source_ranges(service, spec, site)
            } else {
                None
            },
            affinity_timeout: self.affinity(spec, site),
            egress_v4: self
                .settings
                .egress_v4
                .iter()
                .copied()
                .map(IpAddr::V4)
                .collect(),
            egress_v6: self
                .settings
                .egress_v6
                .iter()
                .copied()
                .map(IpAddr::V6)
                .collect(),
            cluster_egress: Vec::new(),
            health: self.health_setting(service, &ports, site),
        };
        let mut facts = self.egress_override(service, site, facts);
        (facts.families, facts.cluster_ips) = self.families_and_cluster_ips(key, spec, site);
        self.cluster_egress(service, &key.namespace, site, &mut facts);
        self.warn_other_family_addresses(&facts, site);
        facts.lb_ips = self.refuse_endpoint_addresses(std::mem::take(&mut facts.lb_ips), site);
        facts.external_ips =
            self.refuse_endpoint_addresses(std::mem::take(&mut facts.external_ips), site);
        if slices.is_empty() {
            self.out.diagnostics.push(site.diagnostic(
                Severity::Warning,
                None,
                "no endpoints: connections will be refused",
            ));
        }
        for family in facts.families.clone() {
            if family_egress(&facts, family).is_none() && !facts.cluster_egress.contains(&family) {
                self.out.diagnostics.push(site.diagnostic(
                    Severity::Error,
                    None,
                    format!(
                        "no {0} egress IP: pass --egress-ip with an {0} address or annotate {EGRESS_IP_ANNOTATION}; {0} connections will be refused",
                        family.name()
                    ),
                ));
            }
        }
        let namespace = key.namespace.clone();
        let name = key.name.clone();
        for port in &ports {
            self.check_port_matches(port, slices, site);
            for &family in &facts.families {
                let port_key = ServicePortKey {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    port_name: port.name.as_str().into(),
                    protocol: port.protocol,
                    family,
                };
                let desired = self.service_port(&port_key, port, type_, &facts, slices, site);
                self.out.ports.push((port_key, desired));
            }
        }
    }

    /// Whether the Service's explicit cluster IPs can be served. One that is not an address (or
    /// in manifest mode, outside the service CIDRs) makes the whole Service unservable, as the
    /// API server would refuse it: filling one in instead would serve an address nobody asked for.
    fn cluster_ips_servable(&mut self, spec: &ServiceSpec, site: &Site) -> bool {
        let cidrs = &self.settings.service_cidrs;
        let mut servable = true;
        for (field, text) in explicit_cluster_ips(spec) {
            let problem = match text.parse::<IpAddr>() {
                Err(_) => format!("{text:?} is not an IP address"),
                Ok(ip) => match special_address(&ip) {
                    Some(what) => format!("{ip} is {what}, which cannot be a cluster IP"),
                    None if self.settings.fill_missing
                        && !cidrs.is_empty()
                        && !cidrs.iter().any(|c| c.contains(&ip)) =>
                    {
                        let list: Vec<String> = cidrs.iter().map(IpNet::to_string).collect();
                        format!(
                            "{ip} is outside the service CIDRs ({}, --service-cidr)",
                            list.join(", ")
                        )
                    }
                    None => continue,
                },
            };
            let fix = if self.settings.fill_missing {
                " (or remove it to have one filled in)"
            } else {
                ""
            };
            self.out.diagnostics.push(site.error(
                &field,
                format!("{problem}: the Service is not served until this is fixed{fix}"),
            ));
            servable = false;
        }
        servable
    }

    /// Leaves out endpoint addresses that are this node's own, or a Service's cluster IP:
    /// connections to them would come back to the node or reach no host. The API server accepts
    /// both; an endpoint object cannot be refused in Kubernetes mode, so the endpoint is skipped
    /// and said so (an Event on the Service).
    fn skip_unusable_endpoints(&mut self, slices: &[SliceRef<'_>]) {
        let own = |ip: &IpAddr| {
            self.node.addresses.contains(ip)
                || match ip {
                    IpAddr::V4(v4) => self.settings.egress_v4.contains(v4),
                    IpAddr::V6(v6) => self.settings.egress_v6.contains(v6),
                }
        };
        for slice in slices {
            for (ip, _, index) in &slice.facts().endpoints {
                let what = if own(ip) {
                    "this node's own address: connections to it would come back to the node"
                        .to_owned()
                } else if let Some(owner) = self.world.cluster_ip_owner(ip) {
                    format!(
                        "the cluster IP of Service {owner}: a virtual address, which no host answers on"
                    )
                } else {
                    continue;
                };
                self.out.diagnostics.push(slice.site().error(
                    &format!("endpoints[{index}].addresses[0]"),
                    format!(
                        "{ip} is {what}; endpoint ignored (extproxy refuses it, though the API server accepts it)"
                    ),
                ));
                self.unusable_endpoints.insert(*ip);
            }
        }
    }

    /// Leaves out external and load balancer addresses that are some Service's endpoint: as a
    /// frontend, the address would capture the connections going to that endpoint. A node
    /// address is a legitimate frontend (k3s ServiceLB) and never a usable endpoint.
    fn refuse_endpoint_addresses(
        &mut self,
        ips: Vec<(IpAddr, String)>,
        site: &Site,
    ) -> Vec<(IpAddr, String)> {
        let mut kept = Vec::with_capacity(ips.len());
        for (ip, field) in ips {
            self.out.external_addrs.push(ip);
            if self.world.is_endpoint_address(&ip) && !self.node.addresses.contains(&ip) {
                let owner = incremental::endpoint_service(self.slices, &ip)
                    .map_or_else(String::new, |s| format!(" of Service {s}"));
                self.out.diagnostics.push(site.error(
                    &field,
                    format!(
                        "{ip} is an endpoint address{owner}: as a frontend it would capture the connections to that endpoint; ignored"
                    ),
                ));
                continue;
            }
            kept.push((ip, field));
        }
        kept
    }

    fn ports(
        &mut self,
        key: &ObjectKey,
        spec: &ServiceSpec,
        type_: &str,
        site: &Site,
    ) -> Vec<PortSpec> {
        let wants_node_port = type_ == "NodePort"
            || (type_ == "LoadBalancer" && spec.allocate_load_balancer_node_ports != Some(false));
        let mut ports: Vec<PortSpec> = Vec::new();
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            let field = format!("spec.ports[{i}]");
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => {
                    self.out.diagnostics.push(site.warning(
                        &format!("{field}.protocol"),
                        "SCTP is not proxied by extproxy; port skipped",
                    ));
                    continue;
                }
                other => {
                    self.out.diagnostics.push(site.error(
                        &format!("{field}.protocol"),
                        format!("unknown protocol {other:?}: use TCP or UDP; port skipped"),
                    ));
                    continue;
                }
            };
            let Some(number) = valid_port(port.port) else {
                self.out.diagnostics.push(site.error(
                    &format!("{field}.port"),
                    format!("port {} is out of range 1-65535; port skipped", port.port),
                ));
                continue;
            };
            let name = port.name.clone().unwrap_or_default();
            if let Some(other) = ports
                .iter()
                .find(|p| p.name == name && p.protocol == protocol)
            {
                self.out.diagnostics.push(site.error(
                    &format!("{field}.name"),
                    format!(
                        "port name {name:?} ({}) is also used by spec.ports[{}]: when a Service has several ports each needs a unique name (endpoints are matched by name); port skipped",
                        protocol.name(),
                        other.index
                    ),
                ));
                continue;
            }
            let node_port =
                self.node_port(key, port, &field, &name, protocol, wants_node_port, site);
            ports.push(PortSpec {
                index: i,
                name,
                protocol,
                port: number,
                node_port,
            });
        }
        ports
    }

    #[allow(clippy::too_many_arguments)]
    fn node_port(
        &mut self,
        key: &ObjectKey,
        port: &ServicePort,
        field: &str,
        name: &str,
        protocol: Protocol,
        wants_node_port: bool,
        site: &Site,
    ) -> Option<u16> {
        match port.node_port {
            Some(n) => {
                let valid = valid_port(n);
                if valid.is_none() {
                    self.out.diagnostics.push(site.error(
                        &format!("{field}.nodePort"),
                        format!("nodePort {n} is out of range 1-65535; no NodePort"),
                    ));
                }
                valid
            }
            None if wants_node_port && self.settings.fill_missing => {
                let seed = alloc::fnv1a(&format!(
                    "{}/{}/{name}/{}",
                    key.namespace,
                    key.name,
                    protocol.name()
                ));
                let allocated = self.world.node_port(
                    self.key,
                    &self.settings.node_port_range,
                    seed,
                    &self.own_node_ports,
                );
                self.out
                    .allocations
                    .push(Allocation::NodePort(seed, allocated));
                match allocated {
                    Some(n) => {
                        self.own_node_ports.insert(n);
                        self.out.filled.push(Filled {
                            service: key.clone(),
                            field: format!("{field}.nodePort"),
                            value: n.to_string(),
                        });
                        Some(n)
                    }
                    None => {
                        self.out.diagnostics.push(site.error(
                            &format!("{field}.nodePort"),
                            format!(
                                "no free nodePort left in {}-{}: set spec.ports[].nodePort or widen --node-port-range",
                                self.settings.node_port_range.start(),
                                self.settings.node_port_range.end()
                            ),
                        ));
                        None
                    }
                }
            }
            None => None,
        }
    }

    /// The families the Service is served in and its cluster IPs, filling missing ones in
    /// manifest mode. Like kube-proxy, a family is served when the Service has (or wants) a
    /// cluster IP of that family.
    fn families_and_cluster_ips(
        &mut self,
        key: &ObjectKey,
        spec: &ServiceSpec,
        site: &Site,
    ) -> (Vec<IpFamily>, Vec<IpAddr>) {
        let mut cluster_ips: Vec<IpAddr> = Vec::new();
        for (field, text) in explicit_cluster_ips(spec) {
            match text.parse::<IpAddr>() {
                Ok(ip)
                    if cluster_ips
                        .iter()
                        .any(|c| IpFamily::of(c) == IpFamily::of(&ip)) =>
                {
                    self.out.diagnostics.push(site.error(
                        &field,
                        format!(
                            "a second {} cluster IP ({ip}): at most one per family; ignored",
                            IpFamily::of(&ip).name()
                        ),
                    ));
                }
                Ok(ip) => cluster_ips.push(ip),
                Err(_) => self
                    .out
                    .diagnostics
                    .push(site.error(&field, format!("{text:?} is not an IP address; ignored"))),
            }
        }
        let mut requested: Vec<IpFamily> = Vec::new();
        for (i, family) in spec.ip_families.iter().flatten().enumerate() {
            match IpFamily::parse(family) {
                Some(f) if !requested.contains(&f) => requested.push(f),
                Some(_) => {}
                None => self.out.diagnostics.push(site.error(
                    &format!("spec.ipFamilies[{i}]"),
                    format!("unknown IP family {family:?}: use IPv4 or IPv6; ignored"),
                )),
            }
        }
        let policy = match spec.ip_family_policy.as_deref() {
            None | Some("SingleStack") => "SingleStack",
            Some(p @ ("PreferDualStack" | "RequireDualStack")) => p,
            Some(other) => {
                self.out.diagnostics.push(site.error(
                    "spec.ipFamilyPolicy",
                    format!("unknown ipFamilyPolicy {other:?}: treated as SingleStack"),
                ));
                "SingleStack"
            }
        };
        if !self.settings.fill_missing || (cluster_ips.len() == 2) {
            let mut families: Vec<IpFamily> = cluster_ips.iter().map(IpFamily::of).collect();
            if families.is_empty() {
                // Only without an API server in front: serve NodePorts / external IPs anyway.
                families = if requested.is_empty() {
                    vec![IpFamily::V4]
                } else {
                    requested
                };
            }
            return (families, cluster_ips);
        }

        let cidr_of = |family: IpFamily| {
            self.settings
                .service_cidrs
                .iter()
                .find(|c| {
                    matches!(
                        (c, family),
                        (IpNet::V4(_), IpFamily::V4) | (IpNet::V6(_), IpFamily::V6)
                    )
                })
                .copied()
        };
        let primary = requested
            .first()
            .copied()
            .or_else(|| cluster_ips.first().map(IpFamily::of))
            .unwrap_or_else(|| {
                if cidr_of(IpFamily::V4).is_none() && cidr_of(IpFamily::V6).is_some() {
                    IpFamily::V6
                } else {
                    IpFamily::V4
                }
            });
        // (family, required): a PreferDualStack secondary family is served only if it can be.
        let mut wanted = vec![(primary, true)];
        let secondary = requested.get(1).copied().unwrap_or(primary.other());
        match policy {
            "RequireDualStack" => wanted.push((secondary, true)),
            "PreferDualStack" => wanted.push((secondary, requested.len() > 1)),
            _ => {}
        }
        for ip in &cluster_ips {
            if !wanted.iter().any(|(f, _)| *f == IpFamily::of(ip)) {
                wanted.push((IpFamily::of(ip), true));
            }
        }

        let mut families = Vec::new();
        let mut final_ips = Vec::new();
        for (family, required) in wanted {
            if let Some(ip) = cluster_ips.iter().find(|ip| IpFamily::of(ip) == family) {
                families.push(family);
                final_ips.push(*ip);
                continue;
            }
            let Some(cidr) = cidr_of(family) else {
                if required {
                    self.out.diagnostics.push(site.error(
                        "spec.clusterIP",
                        format!(
                            "no {0} cluster IP and no {0} service CIDR to allocate one from: pass --service-cidr with an {0} range or set spec.clusterIP; served without a cluster IP",
                            family.name()
                        ),
                    ));
                    families.push(family);
                }
                continue;
            };
            let seed = alloc::fnv1a(&format!("{}/{}", key.namespace, key.name));
            let allocated = self.world.cluster_ip(self.key, &cidr, seed, &self.own_ips);
            self.out
                .allocations
                .push(Allocation::ClusterIp(cidr, seed, allocated));
            match allocated {
                Some(ip) => {
                    self.own_ips.insert(ip);
                    self.out.filled.push(Filled {
                        service: key.clone(),
                        field: format!("spec.clusterIPs[{}]", family.name()),
                        value: ip.to_string(),
                    });
                    families.push(family);
                    final_ips.push(ip);
                }
                None => {
                    self.out.diagnostics.push(site.error(
                        "spec.clusterIP",
                        format!("service CIDR {cidr} has no free address left: set spec.clusterIP or pass a larger --service-cidr"),
                    ));
                    families.push(family);
                }
            }
        }
        (families, final_ips)
    }

    fn parse_ips<'s>(
        &mut self,
        texts: impl Iterator<Item = &'s String>,
        field: &str,
        site: &Site,
    ) -> Vec<(IpAddr, String)> {
        let mut ips = Vec::new();
        for (i, text) in texts.enumerate() {
            let field = format!("{field}[{i}]");
            match text.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    if let Some(ip) = self.frontend_address(ip, &field, site) {
                        ips.push((ip, field));
                    }
                }
                Err(_) => self
                    .out
                    .diagnostics
                    .push(site.error(&field, format!("{text:?} is not an IP address; ignored"))),
            }
        }
        ips
    }

    /// `ip` if it can be a frontend; otherwise says why not.
    fn frontend_address(&mut self, ip: IpAddr, field: &str, site: &Site) -> Option<IpAddr> {
        let Some(what) = special_address(&ip) else {
            return Some(ip);
        };
        self.out.diagnostics.push(site.error(
            field,
            format!("{ip} is {what}, which cannot be a Service's frontend; ignored"),
        ));
        None
    }

    fn load_balancer_ips(
        &mut self,
        service: &Service,
        spec: &ServiceSpec,
        site: &Site,
    ) -> Vec<(IpAddr, String)> {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default();
        let mut ips = Vec::new();
        for (i, entry) in ingress.iter().enumerate() {
            let field = format!("status.loadBalancer.ingress[{i}]");
            let Some(text) = entry.ip.as_deref() else {
                if let Some(hostname) = &entry.hostname {
                    self.out.diagnostics.push(site.info(
                        &format!("{field}.hostname"),
                        format!("load balancer {hostname:?} has no IP: traffic reaches it outside extproxy; skipped"),
                    ));
                }
                continue;
            };
            let Ok(ip) = text.parse::<IpAddr>() else {
                self.out.diagnostics.push(site.error(
                    &format!("{field}.ip"),
                    format!("{text:?} is not an IP address; ignored"),
                ));
                continue;
            };
            let Some(ip) = self.frontend_address(ip, &format!("{field}.ip"), site) else {
                continue;
            };
            if entry.ip_mode.as_deref() == Some("Proxy") {
                self.out.diagnostics.push(site.info(
                    &format!("{field}.ipMode"),
                    format!("ipMode Proxy: traffic to {ip} must go through the real load balancer (kubernetes#97928), so it is not captured"),
                ));
                continue;
            }
            ips.push((ip, format!("{field}.ip")));
        }
        if ingress.is_empty()
            && let Some(text) = spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty())
        {
            match text.parse::<IpAddr>() {
                Ok(ip) => {
                    if self
                        .frontend_address(ip, "spec.loadBalancerIP", site)
                        .is_some()
                    {
                        self.out.diagnostics.push(site.info(
                            "spec.loadBalancerIP",
                            format!("no load balancer status: serving spec.loadBalancerIP {ip}"),
                        ));
                        ips.push((ip, "spec.loadBalancerIP".to_owned()));
                    }
                }
                Err(_) => self.out.diagnostics.push(site.error(
                    "spec.loadBalancerIP",
                    format!("{text:?} is not an IP address; ignored"),
                )),
            }
        }
        ips
    }

    /// None if the Service does not restrict sources. Invalid entries are left out, which can
    /// only narrow access: with none valid in a family, that family admits nobody.
    fn source_ranges(
        &mut self,
        service: &Service,
        spec: &ServiceSpec,
        site: &Site,
    ) -> Option<Vec<IpNet>> {
        let (entries, field): (Vec<&str>, String) = match &spec.load_balancer_source_ranges {
            Some(ranges) if !ranges.is_empty() => (
                ranges.iter().map(String::as_str).collect(),
                "spec.loadBalancerSourceRanges".to_owned(),
            ),
            _ => {
                let annotation = service
                    .metadata
                    .annotations
                    .get(LEGACY_SOURCE_RANGES_ANNOTATION)?;
                (
                    annotation
                        .split(',')
                        .filter(|s| !s.trim().is_empty())
                        .collect(),
                    format!("metadata.annotations[{LEGACY_SOURCE_RANGES_ANNOTATION}]"),
                )
            }
        };
        if entries.is_empty() {
            return None;
        }
        let mut ranges = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let field = format!("{field}[{i}]");
            let text = entry.trim();
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
            let Ok(net) = parsed else {
                self.out.diagnostics.push(site.error(
                    &field,
                    format!("{entry:?} is not a CIDR (like 1.2.3.0/24); left out, which admits fewer clients"),
                ));
                continue;
            };
            if net.trunc() != net {
                self.out.diagnostics.push(site.warning(
                    &field,
                    format!("{text} has host bits set; using {}", net.trunc()),
                ));
            }
            if !ranges.contains(&net.trunc()) {
                ranges.push(net.trunc());
            }
        }
        Some(ranges)
    }

    fn affinity(&mut self, spec: &ServiceSpec, site: &Site) -> u32 {
        match spec.session_affinity.as_deref() {
            None | Some("None") => 0,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                match timeout {
                    None => DEFAULT_AFFINITY_TIMEOUT,
                    Some(t) if (1..=MAX_AFFINITY_TIMEOUT as i32).contains(&t) => t as u32,
                    Some(t) => {
                        self.out.diagnostics.push(site.error(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!("{t} is out of range 1-{MAX_AFFINITY_TIMEOUT}; using the default {DEFAULT_AFFINITY_TIMEOUT}"),
                        ));
                        DEFAULT_AFFINITY_TIMEOUT
                    }
                }
            }
            Some(other) => {
                self.out.diagnostics.push(site.error(
                    "spec.sessionAffinity",
                    format!("unknown sessionAffinity {other:?}: use None or ClientIP; no affinity"),
                ));
                0
            }
        }
    }

    /// The health annotations, each bad value an error naming its annotation.
    fn health_setting(
        &mut self,
        service: &Service,
        ports: &[PortSpec],
        site: &Site,
    ) -> HealthSetting {
        let annotations = &service.metadata.annotations;
        let field = |name: &str| format!("metadata.annotations[{name}]");
        let config = match health_config::parse(|k| annotations.get(k)) {
            Ok(config) => config,
            Err(errors) => {
                for e in errors {
                    self.out.diagnostics.push(site.error(
                        &field(e.annotation),
                        format!(
                            "{}; health checking keeps its previous setting (at first sight: no active check)",
                            e.message
                        ),
                    ));
                }
                return HealthSetting::Invalid;
            }
        };
        if config == HealthConfig::default() {
            return HealthSetting::Default;
        }
        if let Some(check) = &config.active
            && check.port.is_none()
            && let Some(udp) = ports.iter().find(|p| p.protocol == Protocol::Udp)
        {
            self.out.diagnostics.push(site.error(
                &field(HEALTH_CHECK_PORT_ANNOTATION),
                format!(
                    "a {} check cannot probe UDP port {} (spec.ports[{}]): set {HEALTH_CHECK_PORT_ANNOTATION} to a TCP port of the endpoints; health checking keeps its previous setting (at first sight: no active check)",
                    check.kind.name(),
                    udp.port,
                    udp.index
                ),
            ));
            return HealthSetting::Invalid;
        }
        HealthSetting::Configured(Arc::new(config))
    }

    /// The Service's egress addresses from `extproxy.io/egress-ip`: a comma-separated list, each
    /// family's addresses (in order) its pool. A family the annotation names replaces the
    /// node's addresses of that family; an address that cannot be one is an error and left out.
    fn egress_override(
        &mut self,
        service: &Service,
        site: &Site,
        mut facts: ServiceFacts,
    ) -> ServiceFacts {
        let Some(annotation) = service.metadata.annotations.get(EGRESS_IP_ANNOTATION) else {
            return facts;
        };
        let field = format!("metadata.annotations[{EGRESS_IP_ANNOTATION}]");
        let mut v4: Vec<IpAddr> = Vec::new();
        let mut v6: Vec<IpAddr> = Vec::new();
        for text in annotation
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let Ok(ip) = text.parse::<IpAddr>() else {
                self.out
                    .diagnostics
                    .push(site.error(&field, format!("{text:?} is not an IP address; ignored")));
                continue;
            };
            let pool = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
            if let Err(why) = egress_address_problem(pool, &ip) {
                self.out
                    .diagnostics
                    .push(site.error(&field, format!("{why}; ignored")));
                continue;
            }
            pool.push(ip);
        }
        if !v4.is_empty() {
            facts.egress_v4 = v4;
        }
        if !v6.is_empty() {
            facts.egress_v6 = v6;
        }
        facts
    }

    /// The Service's cluster egress address per family: from `extproxy.io/cluster-egress-ip`,
    /// else the family's default when the namespace may use it. An address the namespace may
    /// not use is an error, and that family's connections are refused rather than sent from the
    /// node's own address, which the far side may not allow.
    fn cluster_egress(
        &mut self,
        service: &Service,
        namespace: &str,
        site: &Site,
        facts: &mut ServiceFacts,
    ) {
        let field = format!("metadata.annotations[{CLUSTER_EGRESS_IP_ANNOTATION}]");
        let rules = &self.settings.cluster_egress;
        let mut wanted: Vec<(IpFamily, IpAddr, bool)> = Vec::new();
        if let Some(annotation) = service
            .metadata
            .annotations
            .get(CLUSTER_EGRESS_IP_ANNOTATION)
        {
            for text in annotation
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                let Ok(ip) = text.parse::<IpAddr>() else {
                    self.out.diagnostics.push(
                        site.error(&field, format!("{text:?} is not an IP address; ignored")),
                    );
                    continue;
                };
                let family = IpFamily::of(&ip);
                if wanted.iter().any(|(f, _, _)| *f == family) {
                    self.out.diagnostics.push(site.error(
                        &field,
                        format!(
                            "more than one {} address: {ip} ignored, the first one is used (a \
                             cluster egress address is one address per family, owned by one \
                             node at a time; pools of addresses are for {EGRESS_IP_ANNOTATION})",
                            family.name()
                        ),
                    ));
                    continue;
                }
                wanted.push((family, ip, true));
            }
        }
        for family in [IpFamily::V4, IpFamily::V6] {
            if !wanted.iter().any(|(f, _, _)| *f == family)
                && let Some(ip) = rules.default_for(family)
                && rules.check(ip, namespace).is_ok()
            {
                wanted.push((family, ip, false));
            }
        }
        for (family, ip, annotated) in wanted {
            facts.cluster_egress.push(family);
            let egress = match family {
                IpFamily::V4 => &mut facts.egress_v4,
                IpFamily::V6 => &mut facts.egress_v6,
            };
            match rules.check(ip, namespace) {
                Ok(()) => *egress = vec![ip],
                Err(why) => {
                    egress.clear();
                    if annotated {
                        self.out.diagnostics.push(site.error(
                            &field,
                            format!("{why}; {} connections will be refused", family.name()),
                        ));
                    }
                }
            }
        }
    }

    fn warn_other_family_addresses(&mut self, facts: &ServiceFacts, site: &Site) {
        for (ip, field) in facts.lb_ips.iter().chain(&facts.external_ips) {
            let family = IpFamily::of(ip);
            if !facts.families.contains(&family) {
                self.out.diagnostics.push(site.warning(
                    field,
                    format!(
                        "{ip} is {} but the Service is not (spec.ipFamilies): ignored, like kube-proxy does",
                        family.name()
                    ),
                ));
            }
        }
    }

    /// kube-proxy gives a Service port only the endpoint ports of the same name and protocol.
    /// A mismatch is the most common mistake with hand-written endpoints: say exactly what to do.
    fn check_port_matches(&mut self, port: &PortSpec, slices: &[&SliceFacts], site: &Site) {
        let proto = port.protocol.name();
        let all_ports: Vec<&(String, String, Option<u16>)> =
            slices.iter().flat_map(|s| &s.ports).collect();
        if slices.is_empty()
            || all_ports
                .iter()
                .any(|(n, p, _)| *n == port.name && p == proto)
        {
            return;
        }
        let mut seen: Vec<String> = Vec::new();
        for (name, protocol, number) in &all_ports {
            let number = number.map_or_else(|| "no port".to_owned(), |n| n.to_string());
            let text = format!("{name:?} ({number}/{protocol})");
            if !seen.contains(&text) {
                seen.push(text);
            }
        }
        let have = if seen.is_empty() {
            "the endpoints have no ports".to_owned()
        } else {
            format!("the endpoints have ports: {}", seen.join(", "))
        };
        let same_name_other_protocol = all_ports.iter().any(|(n, _, _)| *n == port.name);
        let endpoint_names: BTreeSet<&str> = all_ports.iter().map(|(n, _, _)| n.as_str()).collect();
        let message = if same_name_other_protocol {
            format!(
                "port {:?} ({proto}) matches no endpoint port ({have}); kube-proxy matches by name and protocol: give the endpoint port {:?} protocol {proto}",
                port.name, port.name
            )
        } else if !port.name.is_empty() {
            format!(
                "port {:?} matches no endpoint port ({have}); kube-proxy matches by name: name the endpoint port {:?} or remove the name from the Service port",
                port.name, port.name
            )
        } else if let [only] = endpoint_names.iter().collect::<Vec<_>>().as_slice() {
            format!(
                "port {} has no name and matches no endpoint port ({have}); kube-proxy matches by name: name this Service port {only:?} or remove the name from the endpoint port",
                port.port
            )
        } else {
            format!(
                "port {} has no name and matches no endpoint port ({have}); kube-proxy matches by name: give this Service port the name of its endpoint port",
                port.port
            )
        };
        self.out.diagnostics.push(site.error(
            &format!("spec.ports[{}].name", port.index),
            format!("{message}; until then this port has no endpoints and refuses connections"),
        ));
    }

    fn service_port(
        &mut self,
        key: &ServicePortKey,
        port: &PortSpec,
        type_: &str,
        facts: &ServiceFacts,
        slices: &[&SliceFacts],
        site: &Site,
    ) -> DesiredService {
        let family = key.family;
        let in_family = |ip: &IpAddr| IpFamily::of(ip) == family;
        let cluster_ip = facts.cluster_ips.iter().copied().find(in_family);
        let (backends, all_down) = self.backends(port, family, slices);
        if let Some(refused) = all_down {
            let what = format!(
                "port {:?} ({} {}): every endpoint is unhealthy",
                port.name,
                port.protocol.name(),
                family.name()
            );
            self.out.diagnostics.push(if refused {
                site.error(
                    &format!("metadata.annotations[{HEALTH_CHECK_ALL_DOWN_ANNOTATION}]"),
                    format!("{what}: new connections are refused ({HEALTH_CHECK_ALL_DOWN_ANNOTATION}: refuse)"),
                )
            } else {
                site.diagnostic(
                    Severity::Warning,
                    None,
                    format!("{what}: using them all (fail open; {HEALTH_CHECK_ALL_DOWN_ANNOTATION}: refuse refuses connections instead)"),
                )
            });
        }
        let mut desired = DesiredService {
            frontends: VecMap::new(),
            backends,
            affinity_timeout: facts.affinity_timeout,
            egress: family_egress(facts, family),
            extra_egress: family_pool(facts, family).iter().skip(1).copied().collect(),
            cluster_egress: facts.cluster_egress.contains(&family),
            source_ranges: facts
                .source_ranges
                .iter()
                .flatten()
                .filter(|r| in_family(&r.addr()))
                .copied()
                .collect(),
            port: port.port,
            cluster_ip,
            node_port: port.node_port,
            health: facts.health.clone(),
        };
        let port_field = format!("spec.ports[{}]", port.index);
        let mut wanted: Vec<(IpAddr, u16, FrontendKind, u8, String)> = Vec::new();
        if let Some(ip) = cluster_ip {
            wanted.push((
                ip,
                port.port,
                FrontendKind::ClusterIp,
                0,
                "spec.clusterIP".to_owned(),
            ));
        }
        if let Some(node_port) = port.node_port {
            for ip in self.node.addresses.iter().filter(|ip| in_family(ip)) {
                wanted.push((
                    *ip,
                    node_port,
                    FrontendKind::NodePort,
                    0,
                    format!("{port_field}.nodePort"),
                ));
            }
        }
        if type_ == "LoadBalancer" {
            let flags = if facts.source_ranges.is_some() {
                FE_F_SOURCE_RANGES
            } else {
                0
            };
            for (ip, field) in facts.lb_ips.iter().filter(|(ip, _)| in_family(ip)) {
                wanted.push((
                    *ip,
                    port.port,
                    FrontendKind::LoadBalancer,
                    flags,
                    field.clone(),
                ));
            }
        }
        for (ip, field) in facts.external_ips.iter().filter(|(ip, _)| in_family(ip)) {
            wanted.push((*ip, port.port, FrontendKind::ExternalIp, 0, field.clone()));
        }
        // Pods that bypass the cluster IP (an Ingress controller or Gateway connecting to the
        // endpoints, a name resolving to one) leave from the cluster egress address too.
        if desired.cluster_egress && desired.egress.is_some() {
            for (ip, number) in desired.backends.iter().map(|(endpoint, _)| *endpoint) {
                wanted.push((
                    ip,
                    number,
                    FrontendKind::Endpoint,
                    0,
                    format!("endpoint {}", SocketAddr::new(ip, number)),
                ));
            }
        }
        let mut reported: BTreeSet<(String, ServicePortKey)> = BTreeSet::new();
        for (ip, number, kind, flags, field) in wanted {
            let frontend = FrontendKey {
                addr: Addr::from(ip),
                port: port_net(number),
                proto: key.protocol.number(),
                pad: 0,
            };
            self.out
                .wanted
                .push((frontend, self.out.ports.len() as u32));
            let other = self.world.owner_over(self.key, &frontend);
            let owner = match &other {
                Some((owner, _)) => Some(owner),
                None => self.frontend_owners.get(&frontend),
            };
            if let Some(owner) = owner {
                if reported.insert((field.clone(), owner.clone())) {
                    let what = format!("{ip}:{number}/{} ({})", key.protocol.name(), kind.name());
                    let message = if owner == key {
                        format!("{what} is already a frontend of this port; ignored")
                    } else {
                        let why = match other.as_ref().map(|(_, why)| *why) {
                            Some(Precedence::Serving) => "it serves it already",
                            Some(Precedence::OlderFile) => "its manifest file is older",
                            Some(Precedence::Older) => "it was created first",
                            Some(Precedence::File) => "its manifest file comes first by name",
                            Some(Precedence::Name) => "first by namespace/name",
                            None => "it comes first among the Service's ports",
                        };
                        format!(
                            "{what} is already used by Service {}/{} port {:?}, which keeps it ({why}); not programmed here",
                            owner.namespace, owner.name, owner.port_name
                        )
                    };
                    // Two Services with one endpoint: connections to it still work, they just
                    // take the first one's way.
                    let severity = if owner == key || kind == FrontendKind::Endpoint {
                        Severity::Warning
                    } else {
                        Severity::Error
                    };
                    self.out
                        .diagnostics
                        .push(site.diagnostic(severity, Some(&field), message));
                }
                continue;
            }
            self.frontend_owners.insert(frontend, key.clone());
            desired
                .frontends
                .insert(frontend, FrontendSpec { kind, flags });
        }
        if let (Some(ranges), true) = (&facts.source_ranges, desired.source_ranges.is_empty()) {
            let has_lb = desired
                .frontends
                .values()
                .any(|f| f.kind == FrontendKind::LoadBalancer);
            if has_lb && !ranges.is_empty() {
                self.out.diagnostics.push(site.warning(
                    "spec.loadBalancerSourceRanges",
                    format!(
                        "no {} range: {} load balancer traffic is denied",
                        family.name(),
                        family.name()
                    ),
                ));
            } else if has_lb {
                self.out.diagnostics.push(site.error(
                    "spec.loadBalancerSourceRanges",
                    format!(
                        "no valid range: all {} load balancer traffic is denied (fail closed)",
                        family.name()
                    ),
                ));
            }
        }
        desired.frontends.shrink_to_fit();
        desired
    }

    /// The endpoints of a port and their roles; with them, when health checking found every
    /// endpoint that would take new flows unhealthy, whether they are refused (else used all).
    fn backends(
        &self,
        port: &PortSpec,
        family: IpFamily,
        slices: &[&SliceFacts],
    ) -> (VecMap<(IpAddr, u16), BackendRole>, Option<bool>) {
        let proto = port.protocol.name();
        let mut merged: BTreeMap<(IpAddr, u16), Conditions> = BTreeMap::new();
        // By each address's family: an FQDN slice holds the answers of both.
        for slice in slices
            .iter()
            .filter(|s| s.family.is_none_or(|f| f == family))
        {
            let numbers = slice
                .ports
                .iter()
                .filter(|(n, p, _)| *n == port.name && p == proto)
                .filter_map(|(_, _, number)| *number);
            for number in numbers {
                let usable = slice.endpoints.iter().filter(|(ip, _, _)| {
                    IpFamily::of(ip) == family && !self.unusable_endpoints.contains(ip)
                });
                for (ip, conditions, _) in usable {
                    merged
                        .entry((*ip, number))
                        .and_modify(|c| {
                            if conditions.rank() > c.rank() {
                                *c = *conditions;
                            }
                        })
                        .or_insert(*conditions);
                }
            }
        }
        let best = merged.values().map(|c| c.rank()).max().unwrap_or(0);
        let candidate = |c: &Conditions| c.rank() == 2 || (best == 1 && c.rank() == 1);
        let unhealthy = |(ip, number): &(IpAddr, u16)| {
            self.unhealthy
                .is_some_and(|u| u.endpoints.contains(&(*ip, *number, port.protocol)))
        };
        let refuse = self.unhealthy.is_some_and(|u| u.refuse_when_all_down);
        let candidates = merged.values().filter(|c| candidate(c)).count();
        let healthy = merged
            .iter()
            .filter(|(e, c)| candidate(c) && !unhealthy(e))
            .count();
        let all_down = (candidates > 0 && healthy == 0).then_some(refuse);
        let fail_open = all_down == Some(false);
        let backends = merged
            .into_iter()
            .map(|(endpoint, c)| {
                let role = if !candidate(&c) {
                    BackendRole::Draining
                } else if unhealthy(&endpoint) && !fail_open {
                    BackendRole::Unhealthy
                } else {
                    BackendRole::Active
                };
                (endpoint, role)
            })
            .collect();
        (backends, all_down)
    }
}

/// Validates an EndpointSlice once for all the Service ports that read it; problems go to
/// `diagnostics`.
fn slice_facts(
    slice: &EndpointSlice,
    site: &Site,
    diagnostics: &mut Vec<Diagnostic>,
    resolved: &crate::dns::Resolved,
) -> SliceFacts {
    let fqdn = slice.address_type == "FQDN";
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(IpFamily::V4),
        "IPv6" => Some(IpFamily::V6),
        "FQDN" => None,
        other => {
            diagnostics.push(site.error(
                "addressType",
                format!("unknown addressType {other:?}: use IPv4, IPv6 or FQDN; slice ignored"),
            ));
            None
        }
    };
    let mut ports = Vec::with_capacity(slice.ports.as_ref().map_or(0, Vec::len));
    for (j, port) in slice.ports.iter().flatten().enumerate() {
        let number = match port.port {
            Some(n) => match u16::try_from(n) {
                Ok(n) if n != 0 => Some(n),
                _ => {
                    diagnostics.push(site.error(
                        &format!("ports[{j}].port"),
                        format!("port {n} is out of range 1-65535; port ignored"),
                    ));
                    None
                }
            },
            None => None,
        };
        ports.push((
            port.name.clone().unwrap_or_default(),
            port.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
            number,
        ));
    }
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    if fqdn {
        endpoints = fqdn::endpoints(slice, site, diagnostics, resolved);
    }
    if let Some(family) = family {
        for (k, endpoint) in slice.endpoints.iter().enumerate() {
            // kube-proxy uses the first address only; the API says they are all the same.
            let Some(address) = endpoint.addresses.first() else {
                diagnostics.push(site.error(
                    &format!("endpoints[{k}].addresses"),
                    "endpoint has no address; ignored",
                ));
                continue;
            };
            let field = format!("endpoints[{k}].addresses[0]");
            let ip: IpAddr = match address.parse() {
                Ok(ip) => ip,
                Err(_) => {
                    diagnostics.push(site.error(
                        &field,
                        format!("{address:?} is not an IP address; endpoint ignored"),
                    ));
                    continue;
                }
            };
            if IpFamily::of(&ip) != family {
                diagnostics.push(site.error(
                    &field,
                    format!(
                        "{ip} is {} but the slice's addressType is {}; endpoint ignored",
                        IpFamily::of(&ip).name(),
                        family.name()
                    ),
                ));
                continue;
            }
            if let Some(what) = special_address(&ip) {
                let api = if api_server_refuses(&ip) {
                    "the API server refuses it too"
                } else {
                    "extproxy refuses it, though the API server accepts it"
                };
                diagnostics.push(site.error(
                    &field,
                    format!("{ip} is {what}, which no endpoint can be reached at; endpoint ignored ({api})"),
                ));
                continue;
            }
            endpoints.push((ip, Conditions::of(endpoint), k as u32));
        }
    }
    // Facts live as long as the slice: drop the growth slack.
    ports.shrink_to_fit();
    endpoints.shrink_to_fit();
    SliceFacts {
        family,
        ports,
        endpoints,
    }
}

/// What `ip` is when it is an address no single remote host is reached at, so neither a
/// frontend nor an endpoint.
fn special_address(ip: &IpAddr) -> Option<&'static str> {
    match ip {
        ip if ip.is_unspecified() => Some("the unspecified address"),
        ip if ip.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        ip if ip.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        _ => None,
    }
}

/// The special addresses the API server refuses as endpoints (ValidateNonSpecialIP):
/// unspecified, loopback, link-local and link-local multicast.
fn api_server_refuses(ip: &IpAddr) -> bool {
    let link_local_multicast = match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [224, 0, 0],
        IpAddr::V6(v6) => v6.segments()[0] & 0xff0f == 0xff02,
    };
    ip.is_unspecified()
        || ip.is_loopback()
        || link_local_multicast
        || matches!(ip, IpAddr::V4(v4) if v4.is_link_local())
        || matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

fn family_egress(facts: &ServiceFacts, family: IpFamily) -> Option<IpAddr> {
    family_pool(facts, family).first().copied()
}

fn family_pool(facts: &ServiceFacts, family: IpFamily) -> &[IpAddr] {
    match family {
        IpFamily::V4 => &facts.egress_v4,
        IpFamily::V6 => &facts.egress_v6,
    }
}

/// Why `ip` cannot join the egress pool `pool` (addresses of its family so far): it must be a
/// unicast address a remote host can answer (the endpoints' replies come back to it), listed
/// once, and the pool holds at most [`proxy_common::EGRESS_POOL_MAX`] addresses.
fn egress_address_problem(pool: &[IpAddr], ip: &IpAddr) -> Result<(), String> {
    if let Some(what) = special_address(ip) {
        return Err(format!("{ip} is {what}, which cannot be an egress address"));
    }
    if pool.contains(ip) {
        return Err(format!("{ip} is listed twice"));
    }
    if pool.len() >= proxy_common::EGRESS_POOL_MAX {
        return Err(format!(
            "more than {} {} egress addresses: {ip}",
            proxy_common::EGRESS_POOL_MAX,
            IpFamily::of(ip).name()
        ));
    }
    Ok(())
}

/// Checks the node's egress addresses (`--egress-ip`, several per family make a pool): every
/// problem, one line each (an address that cannot be one, a duplicate, too many of a family).
pub fn check_egress_addresses(addrs: &[IpAddr]) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let mut seen: Vec<IpAddr> = Vec::new();
    for ip in addrs {
        let family: Vec<IpAddr> = seen
            .iter()
            .filter(|a| a.is_ipv4() == ip.is_ipv4())
            .copied()
            .collect();
        match egress_address_problem(&family, ip) {
            Ok(()) => seen.push(*ip),
            Err(why) => problems.push(why),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|n| *n != 0)
}
