//! Shared model for the kube-proxy rule generators ([`super::iptables`] and
//! [`super::nftables`]): the Services to program, the node settings kube-proxy
//! would run with, and kube-proxy's chain-name hashing.
//!
//! Everything here follows kube-proxy's own sources (kubernetes/kubernetes):
//!
//! * `pkg/proxy/iptables/proxier.go` (v1.32-v1.34 era: `nfacct` counters,
//!   `CategorizeEndpoints(.., nodeName, ..)`, contextual logging):
//!   `portProtoHash`, `servicePortPolicyClusterChain`,
//!   `servicePortEndpointChainName`, `computeProbability`.
//! * `pkg/proxy/nftables/proxier.go` (v1.33) and `proxier_test.go`
//!   (`TestOverallNFTablesRules`, v1.34+): `hashAndTruncate`,
//!   `servicePortChainNameBase`, `servicePortEndpointChainNameBase`.
//! * `pkg/proxy/servicechangetracker.go`/`types.go`: `ServicePortName.String()`
//!   is `namespace/name:port` (or `namespace/name` when the port is unnamed).
//! * `pkg/proxy/endpointslicecache.go`: endpoints of a service port are
//!   de-duplicated by `ip:port` and sorted by that string (`byEndpoint`).

use std::fmt;
use std::net::Ipv4Addr;

use super::sha256::{base32_prefix, sha256_concat};

/// L4 protocol of a Service port. kube-proxy lower-cases it for both the hash
/// input and the rule text (`strings.ToLower(string(svcPort.Protocol()))`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `tcp` / `udp`, as kube-proxy writes it into rules and hashes.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One port of a selector-less Service with its (external) endpoints, i.e. one
/// kube-proxy `ServicePort` plus its `EndpointSlice` addresses for that port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchService {
    pub namespace: String,
    pub name: String,
    /// `spec.ports[].name`; may be empty (single-port Services).
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// `spec.ports[].nodePort` (type NodePort/LoadBalancer); `None` for ClusterIP.
    pub node_port: Option<u16>,
    /// `(address, port)` from the EndpointSlice. Order does not matter: like
    /// kube-proxy we de-duplicate and sort by the `ip:port` string.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl BenchService {
    /// kube-proxy's `ServicePortName.String()`: `ns/name:port` or `ns/name`.
    pub fn service_port_name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// Endpoints in the order kube-proxy programs them (`byEndpoint` sort of the
    /// de-duplicated `ip:port` strings).
    pub fn ordered_endpoints(&self) -> Vec<Endpoint> {
        let mut eps: Vec<Endpoint> = self
            .endpoints
            .iter()
            .map(|&(ip, port)| Endpoint {
                ip,
                port,
                text: format!("{ip}:{port}"),
            })
            .collect();
        eps.sort_by(|a, b| a.text.cmp(&b.text));
        eps.dedup_by(|a, b| a.text == b.text);
        eps
    }

    /// Number of distinct endpoints (what kube-proxy counts for
    /// `largeClusterEndpointsThreshold`).
    pub fn endpoint_count(&self) -> usize {
        let mut eps = self.endpoints.clone();
        eps.sort_unstable();
        eps.dedup();
        eps.len()
    }
}

/// An endpoint as kube-proxy sees it; `text` is `BaseEndpointInfo.String()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub text: String,
}

/// An IPv4 prefix, printed like Go's `net.IPNet.String()` (`a.b.c.d/len`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// Host bits are cleared, as `net.ParseCIDR` does.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Self {
        assert!(prefix_len <= 32, "bad prefix length {prefix_len}");
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix_len))
        };
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len,
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        *self == Ipv4Cidr::new(ip, self.prefix_len)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Which traffic to a ClusterIP kube-proxy marks for masquerade.
///
/// For selector-less Services whose endpoints are *outside* the cluster, users
/// depend on the connection leaving the node with the node's IP (allow-listed
/// APIs). The two ways kube-proxy gives that:
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Masquerade {
    /// `--masquerade-all=true` (`masqueradeAll: true`): every KUBE-SVC /
    /// `service-*` chain starts with an unconditional jump to KUBE-MARK-MASQ /
    /// `mark-for-masquerade`, so pod -> ClusterIP -> external endpoint traffic
    /// is SNATed to the egress address by KUBE-POSTROUTING / `masquerading`
    /// (`MASQUERADE --random-fully` / `masquerade fully-random`). This is the
    /// benchmark default because it makes the external endpoint see the node IP
    /// purely through kube-proxy's rules, like extproxy's SNAT.
    All,
    /// `--detect-local-mode=ClusterCIDR --cluster-cidr=<cidr>` (the default
    /// local detector): only sources *outside* the CIDR are marked
    /// (`! -s <cidr>` / `ip saddr != <cidr>`). Pod traffic is then NOT
    /// masqueraded by kube-proxy; in a real cluster the CNI's own egress
    /// masquerade (not generated here) would SNAT it. Pick this variant only if
    /// the benchmark clients are outside `cidr` or if you add that CNI rule.
    ClusterCidr(Ipv4Cidr),
}

/// `--nodeport-addresses`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// What kube-proxy does when the flag is unset: iptables mode accepts
    /// NodePorts on every local address (`-m addrtype --dst-type LOCAL`);
    /// nftables mode defaults to `primary`, i.e. only [`NodeConfig::node_ip`]
    /// (cmd/kube-proxy, KEP-3866).
    ModeDefault,
    /// Every local address (iptables `MatchAll`; nftables `fib daddr type local`).
    All,
    /// Only these addresses (`nodeport-ips` set / `-d <ip> -j KUBE-NODEPORTS`).
    Ips(Vec<Ipv4Addr>),
}

/// Node-level settings kube-proxy would run with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's primary IP (`--bind-address`/detected node IP).
    pub node_ip: Ipv4Addr,
    pub masquerade: Masquerade,
    /// `--iptables-masquerade-bit` / `masqueradeBit`; default 14 (`0x00004000`).
    pub masquerade_bit: u8,
    pub nodeport_addresses: NodePortAddresses,
    /// Service CIDRs (from the ServiceCIDR API); nftables mode drops traffic
    /// to unallocated IPs in them (`cluster-ips-check`). Empty = no such rule.
    pub service_cidrs: Vec<Ipv4Cidr>,
    /// iptables mode `--iptables-localhost-nodeports` (default true). Only has an
    /// effect when NodePorts are accepted on all addresses.
    pub localhost_nodeports: bool,
    /// Value of `net.netfilter.nf_conntrack_tcp_be_liberal` on the node; when
    /// set, iptables mode omits the `--ctstate INVALID -j DROP` rule.
    pub conntrack_tcp_be_liberal: bool,
    /// `iptables.HasRandomFully()`; true for any iptables >= 1.6.2 (1.8.9 here).
    pub iptables_random_fully: bool,
}

impl NodeConfig {
    /// kube-proxy defaults plus `masqueradeAll: true` and a 10.96.0.0/12
    /// ServiceCIDR (kubeadm's default).
    pub fn new(node_ip: Ipv4Addr) -> Self {
        NodeConfig {
            node_ip,
            masquerade: Masquerade::All,
            masquerade_bit: 14,
            nodeport_addresses: NodePortAddresses::ModeDefault,
            service_cidrs: vec![Ipv4Cidr::new(Ipv4Addr::new(10, 96, 0, 0), 12)],
            localhost_nodeports: true,
            conntrack_tcp_be_liberal: false,
            iptables_random_fully: true,
        }
    }

    /// `fmt.Sprintf("%#08x", 1<<masqueradeBit)`, e.g. `0x00004000` (Go pads the
    /// digits to the width, then prefixes `0x`; kube-proxy logs show this).
    pub fn masquerade_mark(&self) -> String {
        assert!(self.masquerade_bit < 32, "masquerade bit out of range");
        format!("0x{:08x}", 1u32 << self.masquerade_bit)
    }
}

impl NodeConfig {
    /// iptables mode's effective `localhostNodePorts`: kube-proxy forces it off
    /// unless the NodePort addresses include IPv4 loopback
    /// (`nodePortAddresses.ContainsIPv4Loopback()`).
    pub fn iptables_localhost_nodeports(&self) -> bool {
        let contains_loopback = match &self.nodeport_addresses {
            NodePortAddresses::ModeDefault | NodePortAddresses::All => true,
            NodePortAddresses::Ips(ips) => ips.iter().any(|ip| ip.is_loopback()),
        };
        self.localhost_nodeports && contains_loopback
    }
}

/// Which kube-proxy backend a helper is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Iptables,
    Nftables,
}

/// Per-network-namespace sysctls kube-proxy writes at startup with its default
/// configuration, to apply in the "node" namespace for a like-for-like run:
/// conntrack timeouts (`conntrack.tcpEstablishedTimeout: 24h`,
/// `tcpCloseWaitTimeout: 1h`, pkg/proxy/apis/config/v1alpha1 defaults, applied
/// by cmd/kube-proxy/app/conntrack.go) and, in iptables mode with localhost
/// NodePorts, `route_localnet=1` (pkg/proxy/iptables/proxier.go `NewProxier`).
/// Not included: `nf_conntrack_max` = max(32768 * nCPU, 131072) (plus the
/// `hashsize` module parameter), which kube-proxy also sets but which is
/// global (writable only from the initial namespace); and `ip_forward`, which
/// kube-proxy does not set but a node needs.
pub fn kube_proxy_sysctls(node: &NodeConfig, mode: ProxyMode) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        (
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            "86400",
        ),
        ("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "3600"),
    ];
    if mode == ProxyMode::Iptables && node.iptables_localhost_nodeports() {
        v.push(("net.ipv4.conf.all.route_localnet", "1"));
    }
    v
}

/// kube-proxy's `largeClusterEndpointsThreshold` (iptables mode): above this
/// many endpoints in total, per-endpoint `-m comment` matches are omitted.
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// `portProtoHash`: base32(sha256(servicePortName + protocol))[:16].
pub fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    let sum = sha256_concat(&[service_port_name.as_bytes(), protocol.as_bytes()]);
    base32_prefix(&sum, 16)
}

/// `KUBE-SVC-<hash>` (`servicePortPolicyClusterChain`).
pub fn iptables_svc_chain(service_port_name: &str, protocol: &str) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(service_port_name, protocol))
}

/// `KUBE-EXT-<hash>` (`serviceExternalChainName`).
pub fn iptables_ext_chain(service_port_name: &str, protocol: &str) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(service_port_name, protocol))
}

/// `KUBE-SEP-<hash>` (`servicePortEndpointChainName`):
/// base32(sha256(servicePortName + protocol + "ip:port"))[:16].
pub fn iptables_sep_chain(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    let sum = sha256_concat(&[
        service_port_name.as_bytes(),
        protocol.as_bytes(),
        endpoint.as_bytes(),
    ]);
    format!("KUBE-SEP-{}", base32_prefix(&sum, 16))
}

/// knftables `NameLengthMax` minus kube-proxy's `chainNamePrefixLengthMax`.
const NFT_CHAIN_NAME_BASE_LENGTH_MAX: usize = 256 - 16;

/// `hashAndTruncate`: `HASH8-name`, truncated to 240 chars with `...`.
pub fn nft_hash_and_truncate(name: &str) -> String {
    let sum = sha256_concat(&[name.as_bytes()]);
    let mut out = base32_prefix(&sum, 8);
    out.push('-');
    out.push_str(name);
    if out.len() > NFT_CHAIN_NAME_BASE_LENGTH_MAX {
        out.truncate(NFT_CHAIN_NAME_BASE_LENGTH_MAX - 3);
        out.push_str("...");
    }
    out
}

/// `servicePortChainNameBase`: `HASH-ns/name/proto/port`.
pub fn nft_service_chain_base(svc: &BenchService) -> String {
    nft_hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        svc.protocol.as_str(),
        svc.port_name
    ))
}

/// `servicePortEndpointChainNameBase`: `HASH-ns/name/proto/port__ip/epport`.
pub fn nft_endpoint_chain_base(svc: &BenchService, ep: &Endpoint) -> String {
    nft_hash_and_truncate(&format!(
        "{}/{}/{}/{}__{}/{}",
        svc.namespace,
        svc.name,
        svc.protocol.as_str(),
        svc.port_name,
        ep.ip,
        ep.port
    ))
}

/// `computeProbability(n)`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Parameters for [`synthetic_services`].
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    pub count: usize,
    pub namespace: String,
    /// ClusterIP of service 0; service `i` gets `first_cluster_ip + i`.
    pub first_cluster_ip: Ipv4Addr,
    pub port: u16,
    pub port_name: String,
    pub protocol: Protocol,
    pub endpoints_per_service: usize,
    /// Service `i` uses `pool[(i * endpoints_per_service + j) % pool.len()]`
    /// for `j in 0..endpoints_per_service` (the pool must hold at least
    /// `endpoints_per_service` distinct entries).
    pub endpoint_pool: Vec<(Ipv4Addr, u16)>,
    /// NodePort of service 0 (`+ i` for service `i`), or `None` for ClusterIP.
    pub first_node_port: Option<u16>,
}

/// `count` selector-less Services named `svc-000000`.. with the same shape.
pub fn synthetic_services(spec: &SyntheticSpec) -> Vec<BenchService> {
    assert!(
        spec.endpoint_pool.len() >= spec.endpoints_per_service,
        "endpoint pool smaller than endpoints_per_service"
    );
    let base = u32::from(spec.first_cluster_ip);
    (0..spec.count)
        .map(|i| {
            let endpoints = (0..spec.endpoints_per_service)
                .map(|j| {
                    spec.endpoint_pool
                        [(i * spec.endpoints_per_service + j) % spec.endpoint_pool.len()]
                })
                .collect();
            BenchService {
                namespace: spec.namespace.clone(),
                name: format!("svc-{i:06}"),
                port_name: spec.port_name.clone(),
                protocol: spec.protocol,
                cluster_ip: Ipv4Addr::from(base + u32::try_from(i).expect("too many services")),
                port: spec.port,
                node_port: spec
                    .first_node_port
                    .map(|p| u16::try_from(usize::from(p) + i).expect("NodePort range exhausted")),
                endpoints,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected names come from kube-proxy's own unit tests
    /// (pkg/proxy/iptables/proxier_test.go `TestOverallIPTablesRules` and
    /// `TestParseIPTablesData`, pkg/util/iptables/testing data) where the hash
    /// input is `ServicePortName.String() + lower(protocol) [+ "ip:port"]`.
    #[test]
    fn iptables_chain_names_match_kube_proxy() {
        assert_eq!(
            iptables_svc_chain("ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            iptables_sep_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            iptables_ext_chain("ns2/svc2:p80", "tcp"),
            "KUBE-EXT-GNZBNJ2PO5MGZ6GT"
        );
        assert_eq!(
            iptables_sep_chain("ns2/svc2:p80", "tcp", "10.180.0.2:80"),
            "KUBE-SEP-RS4RBKLTHTF2IUXJ"
        );
        assert_eq!(
            iptables_svc_chain("ns4/svc4:p80", "tcp"),
            "KUBE-SVC-4SW47YFZTEDKD3PK"
        );
        assert_eq!(
            iptables_sep_chain("ns4/svc4:p80", "tcp", "10.180.0.4:80"),
            "KUBE-SEP-UKSFD7AGPMPPLUHC"
        );
        assert_eq!(
            iptables_sep_chain("ns4/svc4:p80", "tcp", "10.180.0.5:80"),
            "KUBE-SEP-C6EBXVWJJZMIWKLZ"
        );
        // Real-cluster names seen in iptables-save dumps.
        assert_eq!(
            iptables_svc_chain("default/kubernetes:https", "tcp"),
            "KUBE-SVC-NPX46M4PTMTKRN6Y"
        );
        assert_eq!(
            iptables_sep_chain("default/kubernetes:https", "tcp", "172.18.0.2:6443"),
            "KUBE-SEP-V2PECCYPB6X2GSCW"
        );
        assert_eq!(
            iptables_svc_chain("kube-system/kube-dns:dns", "udp"),
            "KUBE-SVC-TCOU7JCQXEZGVUNU"
        );
        assert_eq!(
            iptables_sep_chain("kube-system/kube-dns:dns", "udp", "10.244.0.10:53"),
            "KUBE-SEP-R7EMXN5TTQQVP4UW"
        );
    }

    fn svc(ns: &str, name: &str, eps: &[(Ipv4Addr, u16)]) -> BenchService {
        BenchService {
            namespace: ns.into(),
            name: name.into(),
            port_name: "p80".into(),
            protocol: Protocol::Tcp,
            cluster_ip: Ipv4Addr::new(172, 30, 0, 41),
            port: 80,
            node_port: None,
            endpoints: eps.to_vec(),
        }
    }

    /// From pkg/proxy/nftables/proxier_test.go (`TestOverallNFTablesRules`)
    /// and the doc comments of `servicePortChainNameBase`.
    #[test]
    fn nft_chain_names_match_kube_proxy() {
        let s1 = svc("ns1", "svc1", &[(Ipv4Addr::new(10, 180, 0, 1), 80)]);
        assert_eq!(nft_service_chain_base(&s1), "ULMVA6XW-ns1/svc1/tcp/p80");
        let ep = &s1.ordered_endpoints()[0];
        assert_eq!(
            nft_endpoint_chain_base(&s1, ep),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let s4 = svc(
            "ns4",
            "svc4",
            &[
                (Ipv4Addr::new(10, 180, 0, 5), 80),
                (Ipv4Addr::new(10, 180, 0, 4), 80),
            ],
        );
        assert_eq!(nft_service_chain_base(&s4), "LAUZTJTB-ns4/svc4/tcp/p80");
        let eps = s4.ordered_endpoints();
        assert_eq!(
            nft_endpoint_chain_base(&s4, &eps[0]),
            "UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80"
        );
        assert_eq!(
            nft_endpoint_chain_base(&s4, &eps[1]),
            "5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80"
        );
        let s2 = svc("ns2", "svc2", &[]);
        assert_eq!(nft_service_chain_base(&s2), "42NFTM6N-ns2/svc2/tcp/p80");
    }

    #[test]
    fn service_port_name_format() {
        let mut s = svc("ns1", "svc1", &[]);
        assert_eq!(s.service_port_name(), "ns1/svc1:p80");
        s.port_name.clear();
        assert_eq!(s.service_port_name(), "ns1/svc1");
    }

    #[test]
    fn endpoints_sorted_by_string_and_deduplicated() {
        let s = svc(
            "ns",
            "s",
            &[
                (Ipv4Addr::new(10, 0, 0, 9), 80),
                (Ipv4Addr::new(10, 0, 0, 10), 80),
                (Ipv4Addr::new(10, 0, 0, 9), 80),
                (Ipv4Addr::new(10, 0, 0, 9), 443),
            ],
        );
        let texts: Vec<_> = s.ordered_endpoints().into_iter().map(|e| e.text).collect();
        // Lexicographic like Go's byEndpoint, not numeric.
        assert_eq!(texts, ["10.0.0.10:80", "10.0.0.9:443", "10.0.0.9:80"]);
        assert_eq!(s.endpoint_count(), 3);
    }

    /// kube-proxy prints probabilities with `%0.10f`: 10 decimals, rounded.
    #[test]
    fn probabilities_like_kube_proxy() {
        assert_eq!(probability(4), "0.2500000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(6), "0.1666666667");
        assert_eq!(probability(7), "0.1428571429");
    }

    #[test]
    fn masquerade_mark_like_go_sharp_08x() {
        let mut n = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        assert_eq!(n.masquerade_mark(), "0x00004000");
        n.masquerade_bit = 0;
        assert_eq!(n.masquerade_mark(), "0x00000001");
    }

    #[test]
    fn sysctls_per_mode() {
        let mut n = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        let ipt = kube_proxy_sysctls(&n, ProxyMode::Iptables);
        assert!(ipt.contains(&("net.ipv4.conf.all.route_localnet", "1")));
        assert!(ipt.contains(&(
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            "86400"
        )));
        let nft = kube_proxy_sysctls(&n, ProxyMode::Nftables);
        assert_eq!(nft.len(), 2);
        n.nodeport_addresses = NodePortAddresses::Ips(vec![n.node_ip]);
        assert!(!n.iptables_localhost_nodeports());
        assert_eq!(kube_proxy_sysctls(&n, ProxyMode::Iptables).len(), 2);
    }

    #[test]
    fn cidr_masks_host_bits() {
        let c = Ipv4Cidr::new(Ipv4Addr::new(10, 244, 3, 7), 16);
        assert_eq!(c.to_string(), "10.244.0.0/16");
        assert!(c.contains(Ipv4Addr::new(10, 244, 200, 1)));
        assert!(!c.contains(Ipv4Addr::new(10, 245, 0, 1)));
    }

    #[test]
    fn synthetic_services_shape() {
        let spec = SyntheticSpec {
            count: 3,
            namespace: "bench".into(),
            first_cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 443,
            port_name: "https".into(),
            protocol: Protocol::Tcp,
            endpoints_per_service: 2,
            endpoint_pool: vec![
                (Ipv4Addr::new(203, 0, 113, 1), 8443),
                (Ipv4Addr::new(203, 0, 113, 2), 8443),
                (Ipv4Addr::new(203, 0, 113, 3), 8443),
            ],
            first_node_port: Some(30000),
        };
        let v = synthetic_services(&spec);
        assert_eq!(v.len(), 3);
        assert_eq!(v[2].name, "svc-000002");
        assert_eq!(v[2].cluster_ip, Ipv4Addr::new(10, 96, 0, 12));
        assert_eq!(v[2].node_port, Some(30002));
        assert_eq!(
            v[1].endpoints,
            vec![
                (Ipv4Addr::new(203, 0, 113, 3), 8443),
                (Ipv4Addr::new(203, 0, 113, 1), 8443)
            ]
        );
    }
}
