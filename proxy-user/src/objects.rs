//! What extproxy reads of Services, EndpointSlices and Endpoints, and nothing else.
//!
//! A k8s-openapi Service with its ObjectMeta and ServiceSpec is about 2.5 KB on the heap; these
//! are a few hundred bytes, which is what lets ten thousand Services fit in a small agent. They
//! deserialize straight from manifests with k8s-openapi's rules and messages: the same type name
//! in "expected ...", null read as absent, missing required fields read as their default,
//! duplicate keys won by the last, unknown fields ignored. Fields extproxy does not keep are still
//! deserialized as their k8s-openapi type and dropped, so a malformed one is reported as before.
//! Kubernetes mode converts the API objects with the `From` impls.

use std::fmt;
use std::marker::PhantomData;

use k8s_openapi::api::core::v1::{EndpointSubset, ServiceStatus, SessionAffinityConfig};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointHints, EndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    ManagedFieldsEntry, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::names::{
    CLUSTER_EGRESS_IP_ANNOTATION, EGRESS_IP_ANNOTATION, HEALTH_ANNOTATIONS,
    LEGACY_SOURCE_RANGES_ANNOTATION, MANAGED_BY_LABEL, SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL, SKIP_MIRROR_LABEL,
};

/// Labels and annotations extproxy reads; every other one is dropped on reading.
const KEPT_KEYS: [&str; 7] = [
    SERVICE_PROXY_NAME_LABEL,
    SERVICE_NAME_LABEL,
    SKIP_MIRROR_LABEL,
    MANAGED_BY_LABEL,
    EGRESS_IP_ANNOTATION,
    CLUSTER_EGRESS_IP_ANNOTATION,
    LEGACY_SOURCE_RANGES_ANNOTATION,
];

/// The labels (or annotations) of an object that extproxy reads, in key order. Keys are the
/// static [`KEPT_KEYS`], not copies: nearly every EndpointSlice has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept(Vec<(&'static str, Box<str>)>);

impl Kept {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| &**v)
    }

    /// Sets `key` if extproxy reads it (and ignores it otherwise).
    pub fn insert(&mut self, key: &str, value: &str) {
        let Some(&key) = KEPT_KEYS
            .iter()
            .chain(&HEALTH_ANNOTATIONS)
            .find(|k| **k == key)
        else {
            return;
        };
        match self.0.binary_search_by(|(k, _)| (*k).cmp(key)) {
            Ok(at) => self.0[at].1 = value.into(),
            Err(at) => self.0.insert(at, (key, value.into())),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (*k, &**v))
    }
}

impl<'a, I: IntoIterator<Item = (&'a String, &'a String)>> From<I> for Kept {
    fn from(map: I) -> Self {
        let mut kept = Kept::default();
        for (k, v) in map {
            kept.insert(k, v);
        }
        kept.0.shrink_to_fit();
        kept
    }
}

/// Reads a string map as k8s-openapi's `BTreeMap<String, String>` does, keeping [`KEPT_KEYS`].
impl<'de> de::Deserialize<'de> for Kept {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut kept = Kept::default();
        visit_string_map(deserializer, |key, value| kept.insert(key, value))?;
        // Kept for the object's lifetime: growth slack would be most of it.
        kept.0.shrink_to_fit();
        Ok(kept)
    }
}

/// Reads a string map without copying its strings, handing each entry to `entry`.
fn visit_string_map<'de, D: Deserializer<'de>>(
    deserializer: D,
    entry: impl FnMut(&str, &str),
) -> Result<(), D::Error> {
    struct StringMap<F>(F);
    impl<'de, F: FnMut(&str, &str)> Visitor<'de> for StringMap<F> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<Text<'de>>()? {
                let value = map.next_value::<Text<'de>>()?;
                (self.0)(key.as_str(), value.as_str());
            }
            Ok(())
        }
    }
    deserializer.deserialize_map(StringMap(entry))
}

/// A string read without copying it when the input allows (a `String` to serde's eyes).
enum Text<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Text<'_> {
    fn as_str(&self) -> &str {
        match self {
            Text::Borrowed(s) => s,
            Text::Owned(s) => s,
        }
    }
}

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text::Owned(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text::Owned(v))
            }
        }
        deserializer.deserialize_string(TextVisitor)
    }
}

/// A map key matched against a struct's field names without copying it.
struct FieldSeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Option<&'static str>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed {
    type Value = Option<&'static str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field identifier")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().find(|name| **name == v).copied())
    }
}

/// Deserializes a value as `T` and drops it: a field extproxy never reads, checked as before.
struct Checked<T>(PhantomData<T>);

impl<'de, T: de::Deserialize<'de>> de::Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Option::<T>::deserialize(deserializer)?;
        Ok(Checked(PhantomData))
    }
}

/// Declares a compact object and its deserialization the way k8s-openapi generates them.
/// `opt` fields keep `Option<T>` (null is None); `req` fields are `T`, absent or null reading as
/// `T::default()`; `check` fields are read as their type and dropped.
macro_rules! object {
    (
        $(#[$meta:meta])*
        pub struct $name:ident as $k8s:literal {
            $( $json:literal => $field:ident : $ty:ty [$how:ident], )*
        }
        check { $( $cjson:literal : $cty:ty, )* }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct $name {
            $( pub $field: $ty, )*
        }

        impl<'de> de::Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                const FIELDS: &[&str] = &[$($json,)* $($cjson,)*];
                struct ObjectVisitor;
                impl<'de> Visitor<'de> for ObjectVisitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($k8s)
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<$name, A::Error> {
                        $( let mut $field: Option<$ty> = None; )*
                        while let Some(key) = map.next_key_seed(FieldSeed(FIELDS))? {
                            match key {
                                $( Some($json) => {
                                    $field = object!(@read $how map $ty);
                                } )*
                                $( Some($cjson) => {
                                    map.next_value::<Checked<$cty>>()?;
                                } )*
                                _ => {
                                    map.next_value::<IgnoredAny>()?;
                                }
                            }
                        }
                        Ok($name {
                            $( $field: $field.unwrap_or_default(), )*
                        })
                    }
                }
                deserializer.deserialize_struct($k8s, FIELDS, ObjectVisitor)
            }
        }
    };
    (@read opt $map:ident $ty:ty) => { Some($map.next_value::<$ty>()?) };
    (@read req $map:ident $ty:ty) => { $map.next_value::<Option<$ty>>()? };
}

object! {
    /// ObjectMeta: the labels and annotations extproxy reads (name and namespace are read before).
    pub struct Meta as "ObjectMeta" {
        "annotations" => annotations: Kept [req],
        "labels" => labels: Kept [req],
    }
    check {
        "creationTimestamp": Time,
        "deletionGracePeriodSeconds": i64,
        "deletionTimestamp": Time,
        "finalizers": Vec<String>,
        "generateName": String,
        "generation": i64,
        "managedFields": Vec<ManagedFieldsEntry>,
        "name": String,
        "namespace": String,
        "ownerReferences": Vec<OwnerReference>,
        "resourceVersion": String,
        "selfLink": String,
        "uid": String,
    }
}

impl From<&ObjectMeta> for Meta {
    fn from(meta: &ObjectMeta) -> Self {
        Meta {
            annotations: meta.annotations.iter().flatten().into(),
            labels: meta.labels.iter().flatten().into(),
        }
    }
}

object! {
    /// A Service as extproxy reads it.
    pub struct ServiceObject as "Service" {
        "metadata" => metadata: Meta [req],
        "spec" => spec: Option<ServiceSpecObject> [opt],
        // Boxed: few Services have a status, and every parsed Service is kept.
        "status" => status: Option<Box<ServiceStatus>> [opt],
    }
    check {}
}

object! {
    pub struct ServiceSpecObject as "ServiceSpec" {
        "allocateLoadBalancerNodePorts" => allocate_load_balancer_node_ports: Option<bool> [opt],
        "clusterIP" => cluster_ip: Option<String> [opt],
        "clusterIPs" => cluster_ips: Option<Vec<String>> [opt],
        "externalIPs" => external_ips: Option<Vec<String>> [opt],
        "ipFamilies" => ip_families: Option<Vec<String>> [opt],
        "ipFamilyPolicy" => ip_family_policy: Option<String> [opt],
        "loadBalancerIP" => load_balancer_ip: Option<String> [opt],
        "loadBalancerSourceRanges" => load_balancer_source_ranges: Option<Vec<String>> [opt],
        "ports" => ports: Option<Vec<ServicePortObject>> [opt],
        "selector" => selector: Option<Selector> [opt],
        "sessionAffinity" => session_affinity: Option<String> [opt],
        "sessionAffinityConfig" => session_affinity_config: Option<SessionAffinityConfig> [opt],
        "type" => type_: Option<String> [opt],
    }
    check {
        "externalName": String,
        "externalTrafficPolicy": String,
        "healthCheckNodePort": i32,
        "internalTrafficPolicy": String,
        "loadBalancerClass": String,
        "publishNotReadyAddresses": bool,
        "trafficDistribution": String,
    }
}

impl ServiceObject {
    /// Drops the slack serde leaves in lists (it grows them without a length hint): a parsed
    /// object lives as long as its manifest, so at 10k Services the slack adds up.
    pub fn shrink_to_fit(&mut self) {
        let Some(spec) = &mut self.spec else { return };
        let lists = [
            &mut spec.cluster_ips,
            &mut spec.external_ips,
            &mut spec.ip_families,
            &mut spec.load_balancer_source_ranges,
        ];
        for list in lists.into_iter().flatten() {
            list.shrink_to_fit();
        }
        if let Some(ports) = &mut spec.ports {
            ports.shrink_to_fit();
        }
    }
}

/// Whether a Service's selector selects anything: all extproxy needs to know of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub empty: bool,
}

impl<'de> de::Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut empty = true;
        visit_string_map(deserializer, |_, _| empty = false)?;
        Ok(Selector { empty })
    }
}

object! {
    pub struct ServicePortObject as "ServicePort" {
        "name" => name: Option<String> [opt],
        "nodePort" => node_port: Option<i32> [opt],
        "port" => port: i32 [req],
        "protocol" => protocol: Option<String> [opt],
    }
    check {
        "appProtocol": String,
        "targetPort": IntOrString,
    }
}

impl From<&k8s_openapi::api::core::v1::Service> for ServiceObject {
    fn from(service: &k8s_openapi::api::core::v1::Service) -> Self {
        ServiceObject {
            metadata: Meta::from(&service.metadata),
            spec: service.spec.as_ref().map(|spec| ServiceSpecObject {
                allocate_load_balancer_node_ports: spec.allocate_load_balancer_node_ports,
                cluster_ip: spec.cluster_ip.clone(),
                cluster_ips: spec.cluster_ips.clone(),
                external_ips: spec.external_ips.clone(),
                ip_families: spec.ip_families.clone(),
                ip_family_policy: spec.ip_family_policy.clone(),
                load_balancer_ip: spec.load_balancer_ip.clone(),
                load_balancer_source_ranges: spec.load_balancer_source_ranges.clone(),
                ports: spec.ports.as_ref().map(|ports| {
                    ports
                        .iter()
                        .map(|p| ServicePortObject {
                            name: p.name.clone(),
                            node_port: p.node_port,
                            port: p.port,
                            protocol: p.protocol.clone(),
                        })
                        .collect()
                }),
                selector: spec.selector.as_ref().map(|s| Selector {
                    empty: s.is_empty(),
                }),
                session_affinity: spec.session_affinity.clone(),
                session_affinity_config: spec.session_affinity_config.clone(),
                type_: spec.type_.clone(),
            }),
            // Conditions are never read.
            status: service.status.as_ref().map(|status| {
                Box::new(ServiceStatus {
                    conditions: None,
                    load_balancer: status.load_balancer.clone(),
                })
            }),
        }
    }
}

object! {
    /// An EndpointSlice as extproxy reads it.
    pub struct SliceObject as "EndpointSlice" {
        "addressType" => address_type: String [req],
        "endpoints" => endpoints: Vec<EndpointObject> [req],
        "metadata" => metadata: Meta [req],
        "ports" => ports: Option<Vec<EndpointPort>> [opt],
    }
    check {}
}

object! {
    pub struct EndpointObject as "Endpoint" {
        "addresses" => addresses: Vec<String> [req],
        "conditions" => conditions: Option<EndpointConditions> [opt],
    }
    check {
        "deprecatedTopology": std::collections::BTreeMap<String, String>,
        "hints": EndpointHints,
        "hostname": String,
        "nodeName": String,
        "targetRef": k8s_openapi::api::core::v1::ObjectReference,
        "zone": String,
    }
}

impl SliceObject {
    /// As [`ServiceObject::shrink_to_fit`].
    pub fn shrink_to_fit(&mut self) {
        self.endpoints.shrink_to_fit();
        for endpoint in &mut self.endpoints {
            endpoint.addresses.shrink_to_fit();
        }
        if let Some(ports) = &mut self.ports {
            ports.shrink_to_fit();
        }
    }
}

impl From<&k8s_openapi::api::discovery::v1::EndpointSlice> for SliceObject {
    fn from(slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Self {
        SliceObject {
            address_type: slice.address_type.clone(),
            endpoints: slice
                .endpoints
                .iter()
                .map(|e| EndpointObject {
                    addresses: e.addresses.clone(),
                    conditions: e.conditions.clone(),
                })
                .collect(),
            metadata: Meta::from(&slice.metadata),
            ports: slice.ports.clone(),
        }
    }
}

object! {
    /// Legacy Endpoints, read only to be mirrored to EndpointSlices.
    pub struct EndpointsObject as "Endpoints" {
        "metadata" => metadata: Meta [req],
        "subsets" => subsets: Option<Vec<EndpointSubset>> [opt],
    }
    check {}
}
