//! `extproxy convert-externalname`: an `ExternalName` Service (a DNS CNAME: no cluster IP, no
//! proxy, no egress address, no health checks) as a selector-less Service that extproxy serves
//! plus an EndpointSlice with `addressType: FQDN` naming the same host.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize as _;
use thiserror::Error;

use super::view::check_name;
use crate::names::{
    EGRESS_IP_ANNOTATION, MANAGED_BY_LABEL, PROXY_NAME, SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
};

/// Who manages the EndpointSlice: not the EndpointSlice controller (which would delete a slice
/// of a selector-less Service it did not make), nobody automatic.
pub const MANAGED_BY: &str = "extproxy.io/convert-externalname";

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error("document {document}: {message}")]
    Document { document: usize, message: String },
    #[error("no ExternalName Service in the input")]
    Nothing,
}

#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    /// Annotate the Service with this source address (`extproxy.io/egress-ip`).
    pub egress_ips: Vec<IpAddr>,
}

#[derive(Debug, Default)]
pub struct Converted {
    /// The Services and EndpointSlices, as YAML documents.
    pub yaml: String,
    /// What the user should know (skipped documents, ports guessed).
    pub notes: Vec<String>,
}

/// Converts every `ExternalName` Service in `text` (YAML, one or more documents); other
/// documents are left out with a note.
pub fn convert(text: &str, options: &ConvertOptions) -> Result<Converted, ConvertError> {
    let mut out = Converted::default();
    let mut documents = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| ConvertError::Document {
            document: i,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != "Service" {
            out.notes.push(format!(
                "document {i}: a {} is not an ExternalName Service; left out",
                if kind.is_empty() {
                    "document without kind"
                } else {
                    kind
                }
            ));
            continue;
        }
        let service: Service =
            serde_yaml::from_value(value).map_err(|e| ConvertError::Document {
                document: i,
                message: format!("not a valid Service: {e}"),
            })?;
        let spec = service.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() != Some("ExternalName") {
            out.notes.push(format!(
                "document {i}: Service {} is of type {}, not ExternalName; left out",
                service.metadata.name.as_deref().unwrap_or("?"),
                spec.type_.as_deref().unwrap_or("ClusterIP")
            ));
            continue;
        }
        let (svc, slice) = convert_one(&service, options, &mut out.notes).map_err(|message| {
            ConvertError::Document {
                document: i,
                message,
            }
        })?;
        documents.push(serde_yaml::to_string(&svc).expect("a Service serializes"));
        documents.push(serde_yaml::to_string(&slice).expect("an EndpointSlice serializes"));
    }
    if documents.is_empty() {
        return Err(ConvertError::Nothing);
    }
    out.yaml = documents.join("---\n");
    Ok(out)
}

fn convert_one(
    service: &Service,
    options: &ConvertOptions,
    notes: &mut Vec<String>,
) -> Result<(Service, EndpointSlice), String> {
    let name = service
        .metadata
        .name
        .clone()
        .ok_or("the Service has no metadata.name")?;
    let spec = service.spec.clone().unwrap_or_default();
    let host = spec
        .external_name
        .as_deref()
        .ok_or_else(|| format!("Service {name} has no spec.externalName"))?;
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    check_name(&host).map_err(|why| {
        format!("Service {name}: spec.externalName {host:?} cannot be an FQDN endpoint ({why})")
    })?;
    let ports = spec.ports.clone().unwrap_or_default();
    if ports.is_empty() {
        return Err(format!(
            "Service {name} has no ports: an ExternalName Service needs none, but a proxy must \
             know which ports to serve; add spec.ports (for example port: 443) and convert again"
        ));
    }
    let mut service_ports = Vec::new();
    let mut endpoint_ports = Vec::new();
    for p in &ports {
        // The endpoint listens on targetPort when it is a number, else on the port itself.
        let target = match &p.target_port {
            Some(IntOrString::Int(n)) => *n,
            Some(IntOrString::String(named)) => {
                notes.push(format!(
                    "Service {name} port {}: targetPort {named:?} is a name, which an external \
                     endpoint cannot have; the endpoint port is {}",
                    p.port, p.port
                ));
                p.port
            }
            None => p.port,
        };
        service_ports.push(ServicePort {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.clone(),
            app_protocol: p.app_protocol.clone(),
            ..ServicePort::default()
        });
        endpoint_ports.push(EndpointPort {
            name: Some(p.name.clone().unwrap_or_default()),
            port: Some(target),
            protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".to_owned())),
            app_protocol: p.app_protocol.clone(),
        });
    }

    let mut labels: BTreeMap<String, String> = service.metadata.labels.clone().unwrap_or_default();
    labels.insert(SERVICE_PROXY_NAME_LABEL.to_owned(), PROXY_NAME.to_owned());
    let mut annotations: BTreeMap<String, String> = service
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != "kubectl.kubernetes.io/last-applied-configuration")
        .collect();
    if !options.egress_ips.is_empty() {
        let list: Vec<String> = options.egress_ips.iter().map(IpAddr::to_string).collect();
        annotations.insert(EGRESS_IP_ANNOTATION.to_owned(), list.join(","));
    }
    let svc = Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: service.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            ports: Some(service_ports),
            session_affinity: spec.session_affinity.clone(),
            session_affinity_config: spec.session_affinity_config.clone(),
            ip_families: spec.ip_families.clone(),
            ip_family_policy: spec.ip_family_policy.clone(),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-fqdn")),
            namespace: service.metadata.namespace.clone(),
            labels: Some(
                [
                    (SERVICE_NAME_LABEL.to_owned(), name.clone()),
                    (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        address_type: "FQDN".to_owned(),
        endpoints: vec![Endpoint {
            addresses: vec![host],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                ..EndpointConditions::default()
            }),
            ..Endpoint::default()
        }],
        ports: Some(endpoint_ports),
    };
    Ok((svc, slice))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: partner-api
  namespace: shop
  labels: {team: payments}
spec:
  type: ExternalName
  externalName: API.Partner.example.
  ports:
  - name: https
    port: 443
    targetPort: 8443
---
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
"#;

    #[test]
    fn an_externalname_service_becomes_a_service_and_an_fqdn_slice() {
        let options = ConvertOptions {
            egress_ips: vec!["203.0.113.10".parse().unwrap()],
        };
        let out = convert(SEED, &options).unwrap();
        assert_eq!(
            out.notes,
            ["document 1: a ConfigMap is not an ExternalName Service; left out"]
        );
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&out.yaml)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        let svc: Service = serde_yaml::from_value(docs[0].clone()).unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.external_name, None);
        assert_eq!(spec.selector, None);
        let labels = svc.metadata.labels.unwrap();
        assert_eq!(labels[SERVICE_PROXY_NAME_LABEL], PROXY_NAME);
        assert_eq!(labels["team"], "payments");
        assert_eq!(
            svc.metadata.annotations.unwrap()[EGRESS_IP_ANNOTATION],
            "203.0.113.10"
        );
        let slice: EndpointSlice = serde_yaml::from_value(docs[1].clone()).unwrap();
        assert_eq!(slice.address_type, "FQDN");
        assert_eq!(slice.endpoints[0].addresses, ["api.partner.example"]);
        let port = &slice.ports.unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.port, port.protocol.as_deref()),
            (Some("https"), Some(8443), Some("TCP"))
        );
        assert_eq!(
            slice.metadata.labels.unwrap()[SERVICE_NAME_LABEL],
            "partner-api"
        );
        assert_eq!(slice.metadata.namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn what_cannot_be_converted_is_said() {
        let no_ports = "kind: Service\nmetadata: {name: a}\nspec: {type: ExternalName, externalName: db.example.com}\n";
        let err = convert(no_ports, &ConvertOptions::default()).unwrap_err();
        assert!(err.to_string().contains("has no ports"), "{err}");
        let single_label = "kind: Service\nmetadata: {name: a}\nspec: {type: ExternalName, externalName: db, ports: [{port: 5432}]}\n";
        let err = convert(single_label, &ConvertOptions::default()).unwrap_err();
        assert!(err.to_string().contains("one label only"), "{err}");
        let plain = "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n";
        assert!(matches!(
            convert(plain, &ConvertOptions::default()),
            Err(ConvertError::Nothing)
        ));
    }
}
