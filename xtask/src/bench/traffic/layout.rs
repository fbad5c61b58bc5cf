//! The N Services every contender is programmed with, in each contender's form: API objects
//! (extproxy in Kubernetes mode, kube-proxy), manifest files (extproxy in manifest mode) and
//! kube-proxy's rule model (the hand-written layouts).
//!
//! `svc-000000`.. in namespace `bench`, ClusterIPs from 10.96.0.10, port 80/TCP named `http`,
//! four endpoints 203.0.113.7-10:8080 each, except the two the client calls (ANCHORS.md: "the
//! last of N"): the last has ONE endpoint (203.0.113.7), the one before it four and also port
//! 80/UDP (named `udp`). At N = 1 the four-endpoint Service is a second Service of its own.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::super::kubeproxy::{BenchService, Protocol};

pub const NAMESPACE: &str = "bench";
/// The endpoints every Service but the one-endpoint target gets; the outside namespace answers
/// on all of them. testbed's topology has the first three; the fourth is added per run.
pub const ENDPOINTS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(203, 0, 113, 7),
    Ipv4Addr::new(203, 0, 113, 8),
    Ipv4Addr::new(203, 0, 113, 9),
    Ipv4Addr::new(203, 0, 113, 10),
];
/// The one-endpoint target's endpoint; the programming-latency measure moves it to
/// [`ALTERNATE_ENDPOINT`] and back.
pub const ONE_ENDPOINT: Ipv4Addr = ENDPOINTS[0];
pub const ALTERNATE_ENDPOINT: Ipv4Addr = ENDPOINTS[1];
/// The endpoints' port (TCP and UDP).
pub const ENDPOINT_PORT: u16 = 8080;
/// The Services' port (TCP and, on the four-endpoint target, UDP).
pub const SERVICE_PORT: u16 = 80;
/// ClusterIP of Service 0; Service `i` has `FIRST_CLUSTER_IP + i` (10k end at 10.96.39.25,
/// inside the default 10.96.0.0/12; 10.96.0.1 is the API server's own `kubernetes` Service).
pub const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The label that hands a Service to extproxy (and makes kube-proxy skip it).
pub const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// When the change an EndpointSlice carries happened: kube-proxy and extproxy both time their
/// programming from it in their own metrics.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// What a Service of the layout looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Port 80/TCP, the four endpoints.
    Filler,
    /// Port 80/TCP and 80/UDP, the four endpoints: the four-endpoint measures' target.
    FourEndpoints,
    /// Port 80/TCP, [`ONE_ENDPOINT`] alone: the one-endpoint measures' target, the last.
    OneEndpoint,
}

/// N Services as above.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// The N the benchmark reports.
    pub services: usize,
}

impl Layout {
    pub fn new(services: usize) -> Self {
        assert!(services >= 1, "a Service count must be at least 1");
        Layout { services }
    }

    /// Services that exist: N, or 2 at N = 1.
    pub fn count(&self) -> usize {
        self.services.max(2)
    }

    pub fn shape(&self, i: usize) -> Shape {
        let count = self.count();
        if i + 1 == count {
            Shape::OneEndpoint
        } else if i + 2 == count {
            Shape::FourEndpoints
        } else {
            Shape::Filler
        }
    }

    pub fn name(i: usize) -> String {
        format!("svc-{i:06}")
    }

    pub fn cluster_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(FIRST_CLUSTER_IP) + u32::try_from(i).expect("too many Services"))
    }

    /// The last Service's ClusterIP (one endpoint).
    pub fn one_target(&self) -> Ipv4Addr {
        Self::cluster_ip(self.count() - 1)
    }

    /// The four-endpoint Service's ClusterIP.
    pub fn four_target(&self) -> Ipv4Addr {
        Self::cluster_ip(self.count() - 2)
    }

    /// Index of the one-endpoint target.
    pub fn one_index(&self) -> usize {
        self.count() - 1
    }

    /// Every Service port, as kube-proxy's rule model has them (the UDP port right after its
    /// Service's TCP port).
    pub fn bench_services(&self) -> Vec<BenchService> {
        let mut out = Vec::with_capacity(self.count() + 1);
        for i in 0..self.count() {
            let shape = self.shape(i);
            let tcp = BenchService {
                namespace: NAMESPACE.into(),
                name: Self::name(i),
                port_name: "http".into(),
                protocol: Protocol::Tcp,
                cluster_ip: Self::cluster_ip(i),
                port: SERVICE_PORT,
                node_port: None,
                endpoints: endpoints(shape, ONE_ENDPOINT)
                    .into_iter()
                    .map(|ip| (ip, ENDPOINT_PORT))
                    .collect(),
            };
            if shape == Shape::FourEndpoints {
                let udp = BenchService {
                    port_name: "udp".into(),
                    protocol: Protocol::Udp,
                    ..tcp.clone()
                };
                out.push(tcp);
                out.push(udp);
            } else {
                out.push(tcp);
            }
        }
        out
    }

    /// Service `i` as an API object; `labelled`: handed to extproxy.
    pub fn service(&self, i: usize, labelled: bool) -> Value {
        let mut metadata = json!({"name": Self::name(i), "namespace": NAMESPACE});
        if labelled {
            metadata["labels"] = json!({PROXY_NAME_LABEL: "extproxy"});
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata,
            "spec": {
                "clusterIP": Self::cluster_ip(i).to_string(),
                "ports": service_ports(self.shape(i)),
            },
        })
    }

    /// Service `i`'s EndpointSlice. `labelled` copies the proxy label onto it, as the
    /// EndpointSlice controllers copy a Service's labels: kube-proxy then never receives it.
    pub fn slice(&self, i: usize, labelled: bool) -> Value {
        let mut labels = json!({"kubernetes.io/service-name": Self::name(i)});
        if labelled {
            labels[PROXY_NAME_LABEL] = json!("extproxy");
        }
        let shape = self.shape(i);
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": slice_name(i), "namespace": NAMESPACE, "labels": labels},
            "addressType": "IPv4",
            "ports": slice_ports(shape),
            "endpoints": slice_endpoints(&endpoints(shape, ONE_ENDPOINT)),
        })
    }

    /// Service `i` and its slice as one manifest file (a `List`) for manifest mode.
    pub fn manifest(&self, i: usize) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": [self.service(i, false), self.slice(i, false)],
        })
    }
}

pub fn slice_name(i: usize) -> String {
    format!("{}-1", Layout::name(i))
}

/// A merge patch turning Service `i` into `shape` (ports).
pub fn service_patch(shape: Shape) -> Value {
    json!({"spec": {"ports": service_ports(shape)}})
}

/// A merge patch turning Service `i`'s slice into `shape`, the one-endpoint Service's endpoint
/// being `one`; with `trigger`, the change time the proxies time their programming from.
pub fn slice_patch(shape: Shape, one: Ipv4Addr, trigger: Option<&str>) -> Value {
    let mut patch = json!({
        "ports": slice_ports(shape),
        "endpoints": slice_endpoints(&endpoints(shape, one)),
    });
    if let Some(t) = trigger {
        patch["metadata"] = json!({"annotations": {TRIGGER_TIME_ANNOTATION: t}});
    }
    patch
}

fn endpoints(shape: Shape, one: Ipv4Addr) -> Vec<Ipv4Addr> {
    match shape {
        Shape::OneEndpoint => vec![one],
        Shape::Filler | Shape::FourEndpoints => ENDPOINTS.to_vec(),
    }
}

fn service_ports(shape: Shape) -> Vec<Value> {
    let mut ports = vec![json!({
        "name": "http", "protocol": "TCP", "port": SERVICE_PORT, "targetPort": ENDPOINT_PORT,
    })];
    if shape == Shape::FourEndpoints {
        ports.push(json!({
            "name": "udp", "protocol": "UDP", "port": SERVICE_PORT, "targetPort": ENDPOINT_PORT,
        }));
    }
    ports
}

fn slice_ports(shape: Shape) -> Vec<Value> {
    let mut ports = vec![json!({"name": "http", "protocol": "TCP", "port": ENDPOINT_PORT})];
    if shape == Shape::FourEndpoints {
        ports.push(json!({"name": "udp", "protocol": "UDP", "port": ENDPOINT_PORT}));
    }
    ports
}

fn slice_endpoints(ips: &[Ipv4Addr]) -> Vec<Value> {
    ips.iter()
        .map(|ip| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
            })
        })
        .collect()
}

/// `t` as RFC 3339 in UTC with nanoseconds (Go's time.RFC3339Nano, what both proxies parse).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a time after 1970");
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_last_two() {
        let l = Layout::new(1_000);
        assert_eq!(l.count(), 1_000);
        assert_eq!(l.shape(999), Shape::OneEndpoint);
        assert_eq!(l.shape(998), Shape::FourEndpoints);
        assert_eq!(l.shape(0), Shape::Filler);
        assert_eq!(l.one_target(), Ipv4Addr::new(10, 96, 3, 241));
        let one = Layout::new(1);
        assert_eq!(one.count(), 2);
        assert_eq!(one.shape(0), Shape::FourEndpoints);
        assert_eq!(one.shape(1), Shape::OneEndpoint);
        assert_eq!(
            Layout::new(10_000).one_target(),
            Ipv4Addr::new(10, 96, 39, 25)
        );
    }

    #[test]
    fn every_form_carries_the_same_ports() {
        let l = Layout::new(3);
        let ports = l.bench_services();
        // 3 TCP ports and the four-endpoint Service's UDP port.
        assert_eq!(ports.len(), 4);
        assert_eq!(ports[1].name, "svc-000001");
        assert_eq!(ports[2].protocol, Protocol::Udp);
        assert_eq!(ports[3].endpoints, vec![(ONE_ENDPOINT, ENDPOINT_PORT)]);
        let svc = l.service(1, true);
        assert!(svc["spec"].get("selector").is_none());
        assert_eq!(svc["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(svc["metadata"]["labels"][PROXY_NAME_LABEL], "extproxy");
        assert!(l.service(1, false)["metadata"].get("labels").is_none());
        let slice = l.slice(2, false);
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "svc-000002"
        );
        assert_eq!(slice["endpoints"].as_array().unwrap().len(), 1);
        assert_eq!(
            l.manifest(0)["items"][1]["endpoints"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn trigger_times_are_rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_779_184_800, 5);
        assert_eq!(rfc3339(t), "2026-05-19T10:00:00.000000005Z");
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000000Z");
    }
}
