//! EndpointSlices with `addressType: FQDN`: each endpoint's address is a DNS name, and the
//! resolver's answers ([`Resolved`], an input like the objects) give its addresses. Every address
//! a name serves is an endpoint with the slice's ports and the endpoint's conditions; an address
//! that left the answer is a draining one (not ready, not serving, terminating: established
//! flows go on, new ones go elsewhere), so a name whose answers rotate resets no connection.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::{
    Conditions, EndpointSlice, IpFamily, IpNet, Service, ServiceSpec, Settings,
    explicit_cluster_ips, spec_of, special_address,
};
use crate::diag::{Diagnostic, Site};
use crate::dns::{Resolved, Wanted, check_name, report};
use crate::names::{PROXY_NAME, SERVICE_PROXY_NAME_LABEL};

/// An address that left its name's answer.
const DRAINING: Conditions = Conditions {
    ready: false,
    serving: false,
    terminating: true,
};

/// The endpoints of an FQDN slice as `resolved` has its names, with the names' problems.
pub(super) fn endpoints(
    slice: &EndpointSlice,
    site: &Site,
    diagnostics: &mut Vec<Diagnostic>,
    resolved: &Resolved,
) -> Vec<(IpAddr, Conditions, u32)> {
    let mut out = Vec::new();
    for (k, endpoint) in slice.endpoints.iter().enumerate() {
        let field = format!("endpoints[{k}].addresses[0]");
        let Some(name) = endpoint.addresses.first() else {
            diagnostics.push(site.error(
                &format!("endpoints[{k}].addresses"),
                "endpoint has no address; ignored",
            ));
            continue;
        };
        if let Err(why) = check_name(name) {
            diagnostics.push(site.error(
                &field,
                format!(
                    "{name:?} is not a DNS name an FQDN EndpointSlice may hold ({why}); endpoint ignored"
                ),
            ));
            continue;
        }
        // Not looked up (yet): no Service needs it, or its first answer is on its way.
        let Some(answer) = resolved.get(name) else {
            continue;
        };
        let conditions = Conditions::of(endpoint);
        for (family, family_answer) in &answer.families {
            if let Some((severity, text)) = report::problem(name, *family, family_answer) {
                diagnostics.push(site.diagnostic(severity, Some(&field), text));
            }
            let addrs = family_answer
                .serving
                .iter()
                .map(|a| (a, conditions))
                .chain(family_answer.draining.iter().map(|a| (a, DRAINING)));
            for (ip, conditions) in addrs {
                if let Some(what) = special_address(ip) {
                    diagnostics.push(site.error(
                        &field,
                        format!(
                            "DNS name {name} resolves to {ip}, {what}, which no endpoint can be \
                             reached at; address ignored"
                        ),
                    ));
                    continue;
                }
                out.push((*ip, conditions, k as u32));
            }
        }
    }
    out
}

/// Adds the names of an FQDN slice to `wanted`, in the families of `service` (the Service its
/// label names), when extproxy serves that Service.
pub(super) fn want(
    slice: &EndpointSlice,
    service: Option<&Service>,
    settings: &Settings,
    wanted: &mut Wanted,
) {
    let Some(service) = service.filter(|s| served(s, settings)) else {
        return;
    };
    let families = families(spec_of(service), settings);
    for endpoint in &slice.endpoints {
        let Some(name) = endpoint.addresses.first() else {
            continue;
        };
        if check_name(name).is_ok() {
            wanted
                .entry(name.as_str().into())
                .or_default()
                .extend(families.iter().copied());
        }
    }
}

/// Whether the translator would claim `service` (its `claim` without the diagnostics): the
/// names of Services left to another proxy are not looked up.
fn served(service: &Service, settings: &Settings) -> bool {
    let spec = spec_of(service);
    let selector_less = spec
        .and_then(|s| s.selector.as_ref())
        .is_none_or(|s| s.empty);
    let label = service.metadata.labels.get(SERVICE_PROXY_NAME_LABEL);
    let claimed = match (settings.claim, label) {
        (super::ClaimPolicy::Label { .. }, Some(name)) => name == PROXY_NAME,
        (
            super::ClaimPolicy::Label {
                claim_all_selectorless: false,
            },
            None,
        ) => false,
        (_, _) => selector_less,
    };
    let external_name = spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName");
    let headless =
        spec.is_some_and(|s| explicit_cluster_ips(s).iter().any(|(_, ip)| *ip == "None"));
    claimed && !external_name && !headless
}

/// The IP families a Service is served in, as far as they can be told from its object: its
/// `ipFamilies` (the API server always sets them), else its cluster IPs' families, else (manifest
/// mode) what its `ipFamilyPolicy` asks of the service CIDRs there are.
fn families(spec: Option<&ServiceSpec>, settings: &Settings) -> BTreeSet<IpFamily> {
    let mut families: BTreeSet<IpFamily> = BTreeSet::new();
    let Some(spec) = spec else {
        return [IpFamily::V4].into();
    };
    families.extend(
        spec.ip_families
            .iter()
            .flatten()
            .filter_map(|f| IpFamily::parse(f)),
    );
    families.extend(
        explicit_cluster_ips(spec)
            .iter()
            .filter_map(|(_, ip)| ip.parse::<IpAddr>().ok())
            .map(|ip| IpFamily::of(&ip)),
    );
    if !families.is_empty() {
        return families;
    }
    let has_cidr = |family: IpFamily| {
        settings.service_cidrs.iter().any(|c| {
            matches!(
                (c, family),
                (IpNet::V4(_), IpFamily::V4) | (IpNet::V6(_), IpFamily::V6)
            )
        })
    };
    let primary = if !has_cidr(IpFamily::V4) && has_cidr(IpFamily::V6) {
        IpFamily::V6
    } else {
        IpFamily::V4
    };
    families.insert(primary);
    let dual = matches!(
        spec.ip_family_policy.as_deref(),
        Some("PreferDualStack" | "RequireDualStack")
    );
    if dual && settings.fill_missing && has_cidr(primary.other()) {
        families.insert(primary.other());
    }
    families
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;

    use super::super::{BackendRole, Incremental, NodeInfo, ServicePortKey, Translation};
    use super::*;
    use crate::dns::{Condition, FamilyAnswer, NameAnswer};
    use crate::manifest::ManifestSet;

    const YAML: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIPs: [10.96.0.20, 'fd00:96::20']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-fqdn
  namespace: shop
  labels: {kubernetes.io/service-name: db}
addressType: FQDN
ports: [{name: pg, port: 6432}]
endpoints:
- addresses: [primary.db.example]
- addresses: [replica.db.example]
  conditions: {ready: false}
- addresses: [Not_A_Name]
"#;

    fn settings() -> Settings {
        Settings {
            egress_v4: vec!["192.0.2.100".parse().unwrap()],
            egress_v6: vec!["2001:db8::100".parse().unwrap()],
            service_cidrs: vec![
                "10.96.0.0/16".parse().unwrap(),
                "fd00:96::/112".parse().unwrap(),
            ],
            fill_missing: true,
            ..Settings::default()
        }
    }

    fn translator(yaml: &str) -> Incremental {
        let mut set = ManifestSet::default();
        set.update_file_text(Path::new("m.yaml"), yaml);
        let mut t = Incremental::new(NodeInfo::default(), settings());
        set.feed(&mut t);
        t
    }

    fn family(condition: Condition, serving: &[&str], draining: &[&str]) -> FamilyAnswer {
        FamilyAnswer {
            serving: serving.iter().map(|s| s.parse().unwrap()).collect(),
            draining: draining.iter().map(|s| s.parse().unwrap()).collect(),
            condition,
        }
    }

    fn resolved(names: &[(&str, IpFamily, FamilyAnswer)]) -> Arc<Resolved> {
        let mut map: BTreeMap<Arc<str>, NameAnswer> = BTreeMap::new();
        for (name, f, answer) in names {
            map.entry(Arc::from(*name))
                .or_default()
                .families
                .insert(*f, answer.clone());
        }
        Arc::new(Resolved::new(
            map.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        ))
    }

    fn key(family: IpFamily) -> ServicePortKey {
        ServicePortKey {
            namespace: "shop".into(),
            name: "db".into(),
            port_name: "pg".into(),
            protocol: super::super::Protocol::Tcp,
            family,
        }
    }

    fn backends(t: &Translation, family: IpFamily) -> Vec<(String, BackendRole)> {
        t.desired.services[&key(family)]
            .backends
            .iter()
            .map(|((ip, port), role)| (std::net::SocketAddr::new(*ip, *port).to_string(), *role))
            .collect()
    }

    fn messages(t: &Translation) -> Vec<String> {
        t.diagnostics
            .iter()
            .map(|d| format!("{}: {d}", d.severity))
            .collect()
    }

    #[test]
    fn names_are_wanted_in_the_families_of_their_service() {
        let t = translator(YAML);
        let wanted = t.dns_wanted();
        let both: BTreeSet<IpFamily> = [IpFamily::V4, IpFamily::V6].into();
        assert_eq!(
            wanted,
            [
                (Arc::from("primary.db.example"), both.clone()),
                (Arc::from("replica.db.example"), both),
            ]
            .into()
        );
        // A single-stack Service in manifest mode without ipFamilies: the primary family only.
        let single = YAML
            .replace("  clusterIPs: [10.96.0.20, 'fd00:96::20']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n", "");
        let wanted = translator(&single).dns_wanted();
        let v4: BTreeSet<IpFamily> = [IpFamily::V4].into();
        assert_eq!(wanted.get("primary.db.example"), Some(&v4));
        // A Service with a selector belongs to kube-proxy: nothing is looked up.
        let selected = YAML.replace(
            "  ipFamilyPolicy",
            "  selector: {app: db}\n  ipFamilyPolicy",
        );
        assert!(translator(&selected).dns_wanted().is_empty());
    }

    #[test]
    fn every_address_of_every_name_is_an_endpoint_and_left_addresses_drain() {
        let mut t = translator(YAML);
        t.set_resolved(resolved(&[
            (
                "primary.db.example",
                IpFamily::V4,
                family(
                    Condition::Fresh,
                    &["198.51.100.1", "198.51.100.2"],
                    &["198.51.100.9"],
                ),
            ),
            (
                "primary.db.example",
                IpFamily::V6,
                family(Condition::Fresh, &["2001:db8:5::1"], &[]),
            ),
            (
                "replica.db.example",
                IpFamily::V4,
                family(Condition::Fresh, &["198.51.100.3"], &[]),
            ),
            (
                "replica.db.example",
                IpFamily::V6,
                family(Condition::NoData, &[], &[]),
            ),
        ]));
        let tr = t.update();
        assert_eq!(
            backends(tr, IpFamily::V4),
            [
                ("198.51.100.1:6432".to_owned(), BackendRole::Active),
                ("198.51.100.2:6432".to_owned(), BackendRole::Active),
                // The replica is not ready: its addresses take no new flows.
                ("198.51.100.3:6432".to_owned(), BackendRole::Draining),
                // Left the answer: established flows go on, no new ones.
                ("198.51.100.9:6432".to_owned(), BackendRole::Draining),
            ]
        );
        assert_eq!(
            backends(tr, IpFamily::V6),
            [("[2001:db8:5::1]:6432".to_owned(), BackendRole::Active)]
        );
        assert_eq!(
            messages(tr),
            [
                "warning: m.yaml:11: EndpointSlice shop/db-fqdn: endpoints[1].addresses[0]: DNS name replica.db.example has no AAAA record: no IPv6 endpoints from it",
                "error: m.yaml:11: EndpointSlice shop/db-fqdn: endpoints[2].addresses[0]: \"Not_A_Name\" is not a DNS name an FQDN EndpointSlice may hold (one label only: an FQDN has at least two (name.domain)); endpoint ignored",
            ]
        );
    }

    #[test]
    fn a_changed_answer_changes_only_its_service_and_the_same_answer_nothing() {
        let mut t = translator(YAML);
        let first = resolved(&[(
            "primary.db.example",
            IpFamily::V4,
            family(Condition::Fresh, &["198.51.100.1"], &[]),
        )]);
        t.set_resolved(first.clone());
        t.update();
        // The same answers again: nothing to translate.
        t.set_resolved(Arc::new((*first).clone()));
        assert!(t.update().changes.as_ref().unwrap().services.is_empty());
        // A rotation: the new address serves, the old one drains.
        t.set_resolved(resolved(&[(
            "primary.db.example",
            IpFamily::V4,
            family(Condition::Fresh, &["198.51.100.2"], &["198.51.100.1"]),
        )]));
        let tr = t.update();
        assert_eq!(
            tr.changes.as_ref().unwrap().services,
            [key(IpFamily::V4)].into()
        );
        assert_eq!(
            backends(tr, IpFamily::V4),
            [
                ("198.51.100.1:6432".to_owned(), BackendRole::Draining),
                ("198.51.100.2:6432".to_owned(), BackendRole::Active),
            ]
        );
    }

    #[test]
    fn nxdomain_and_unusable_answers_are_said() {
        let mut t = translator(YAML);
        t.set_resolved(resolved(&[
            (
                "primary.db.example",
                IpFamily::V4,
                family(Condition::NxDomain, &[], &["198.51.100.1"]),
            ),
            (
                "replica.db.example",
                IpFamily::V4,
                family(Condition::Fresh, &["127.0.0.1"], &[]),
            ),
        ]));
        let tr = t.update();
        assert_eq!(
            backends(tr, IpFamily::V4),
            [("198.51.100.1:6432".to_owned(), BackendRole::Draining)]
        );
        let m = messages(tr);
        assert_eq!(
            m[..2],
            [
                "error: m.yaml:11: EndpointSlice shop/db-fqdn: endpoints[0].addresses[0]: DNS name primary.db.example: NXDOMAIN (the name does not exist): no IPv4 endpoints from it; 198.51.100.1 drain (established flows go on, no new ones)",
                "error: m.yaml:11: EndpointSlice shop/db-fqdn: endpoints[1].addresses[0]: DNS name replica.db.example resolves to 127.0.0.1, a loopback address, which no endpoint can be reached at; address ignored",
            ]
        );
    }
}
