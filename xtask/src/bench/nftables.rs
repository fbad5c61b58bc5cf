//! kube-proxy **nftables mode**, reproduced as the `nft -f` transaction of its
//! first full sync.
//!
//! Sources followed (kubernetes/kubernetes):
//! * `pkg/proxy/nftables/proxier.go` v1.33: `setupNFTables`, `syncProxyRules`,
//!   `writeServiceToEndpointRules`, `ensureChain` (every chain is `add` +
//!   `flush`ed), `nftElementStorage.reset` (sets/maps flushed on a full sync),
//!   the one-time `add`+`delete` of base chains (`proxier.flushed`),
//!   `CleanupLeftovers` (`delete table`).
//! * `pkg/proxy/nftables/proxier_test.go` `TestOverallNFTablesRules` /
//!   `baseRules` (v1.34+, the newest layout in the index), which is where the
//!   current base chains come from: `filter-prerouting-pre-dnat` and
//!   `filter-output-pre-dnat` at priority -110 (dstnat-10), `filter-input`,
//!   `filter-forward`, `filter-output` at priority 0 (filter), `nat-*` at
//!   -100/100; and the ClusterIP masquerade rule `ip daddr <ip> ip saddr !=
//!   <cidr> jump mark-for-masquerade` (v1.33 still matched `tcp dport <port>`
//!   too; newer versions dropped it since the `service-ips` vmap already
//!   matched the port). For `masqueradeAll` we emit the same rule without the
//!   `ip saddr` term, i.e. `ip daddr <ip> jump mark-for-masquerade`.
//! * sigs.k8s.io/knftables `objects.go`: the exact text knftables writes for
//!   each object (`add chain ip kube-proxy x { type nat hook output priority
//!   -100 ; }`, `add element ip kube-proxy m { k . k : v }`, ...), and
//!   `nftables.go`: kube-proxy runs it as `nft -f -`.
//!
//! Omitted (unused by selector-less ClusterIP/NodePort Services): ExternalIPs,
//! LoadBalancer IPs and `firewall-*` chains (the `firewall-ips` map and
//! `firewall-check` chain *are* created, as kube-proxy always does), session
//! affinity sets, `Local` traffic policy chains.

use std::fmt::Write as _;

use super::kubeproxy::{
    BenchService, Masquerade, NodeConfig, NodePortAddresses, nft_endpoint_chain_base,
    nft_service_chain_base,
};

/// The table kube-proxy owns (IPv4 instance).
pub const NFT_TABLE: &str = "ip kube-proxy";

/// Base chains (name, type, hook, numeric priority as knftables prints it).
const BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-input", "filter", "input", 0),
    ("filter-forward", "filter", "forward", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// `nftablesJumpChains`: (dst, src, extra match).
const JUMP_CHAINS: [(&str, &str, &str); 11] = [
    ("nodeport-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-forward", "ct state new "),
    ("service-endpoints-check", "filter-output", "ct state new "),
    (
        "firewall-check",
        "filter-prerouting-pre-dnat",
        "ct state new ",
    ),
    ("firewall-check", "filter-output-pre-dnat", "ct state new "),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new "),
    ("cluster-ips-check", "filter-output", "ct state new "),
];

const T: &str = NFT_TABLE;

/// `ensureChain`: add + flush, once per chain.
fn ensure_chain(out: &mut String, created: &mut Vec<&'static str>, chain: &'static str) {
    if created.contains(&chain) {
        return;
    }
    created.push(chain);
    let _ = writeln!(out, "add chain {T} {chain}");
    let _ = writeln!(out, "flush chain {T} {chain}");
}

/// NodePort addresses for nftables mode: `None` means MatchAll.
fn nodeport_ips(node: &NodeConfig) -> Option<Vec<std::net::Ipv4Addr>> {
    match &node.nodeport_addresses {
        NodePortAddresses::All => None,
        NodePortAddresses::ModeDefault => Some(vec![node.node_ip]),
        NodePortAddresses::Ips(ips) => Some(ips.clone()),
    }
}

/// `setupNFTables` (full sync), as one block of `nft -f` commands.
fn setup(out: &mut String, node: &NodeConfig) {
    let mark = node.masquerade_mark();
    let np_ips = nodeport_ips(node);
    // Where NodePorts answer: the nodeport-ips set, or (MatchAll) any address but loopback,
    // local ones only in `services`.
    let (nodeport_daddr, nodeport_local_daddr) = match np_ips {
        Some(_) => ("ip daddr @nodeport-ips", "ip daddr @nodeport-ips"),
        None => (
            "ip daddr != 127.0.0.0/8",
            "fib daddr type local ip daddr != 127.0.0.0/8",
        ),
    };

    let _ = writeln!(
        out,
        "add table {T} {{ comment \"rules for kube-proxy\" ; }}"
    );

    // First sync only: add+delete so base chains get recreated with the
    // current hook/priority.
    for (name, ..) in BASE_CHAINS {
        let _ = writeln!(out, "add chain {T} {name}");
        let _ = writeln!(out, "delete chain {T} {name}");
    }
    for (name, ty, hook, prio) in BASE_CHAINS {
        let _ = writeln!(
            out,
            "add chain {T} {name} {{ type {ty} hook {hook} priority {prio} ; }}"
        );
        let _ = writeln!(out, "flush chain {T} {name}");
    }

    let mut created: Vec<&'static str> = Vec::new();
    for (dst, src, extra) in JUMP_CHAINS {
        ensure_chain(out, &mut created, dst);
        let _ = writeln!(out, "add rule {T} {src} {extra}jump {dst}");
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        ensure_chain(out, &mut created, chain);
    }

    let _ = writeln!(
        out,
        "add rule {T} mark-for-masquerade mark set mark or {mark}"
    );
    let _ = writeln!(out, "add rule {T} masquerading mark and {mark} == 0 return");
    let _ = writeln!(out, "add rule {T} masquerading mark set mark xor {mark}");
    let _ = writeln!(out, "add rule {T} masquerading masquerade fully-random");

    let _ = writeln!(
        out,
        "add set {T} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    if !node.service_cidrs.is_empty() {
        let cidrs: Vec<String> = node.service_cidrs.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(
            out,
            "add rule {T} cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
            cidrs.join(",")
        );
    }

    let _ = writeln!(
        out,
        "add set {T} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    match &np_ips {
        None => {
            let _ = writeln!(out, "delete set {T} nodeport-ips");
        }
        Some(ips) => {
            let _ = writeln!(out, "flush set {T} nodeport-ips");
            for ip in ips.iter().filter(|ip| !ip.is_loopback()) {
                let _ = writeln!(out, "add element {T} nodeport-ips {{ {ip} }}");
            }
        }
    }

    let _ = writeln!(
        out,
        "add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add chain {T} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    let _ = writeln!(out, "flush chain {T} reject-chain");
    let _ = writeln!(out, "add rule {T} reject-chain reject");
    let _ = writeln!(
        out,
        "add rule {T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    let _ = writeln!(
        out,
        "add rule {T} nodeport-endpoints-check {nodeport_daddr} meta l4proto . th dport vmap @no-endpoint-nodeports"
    );

    let _ = writeln!(
        out,
        "add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    ensure_chain(out, &mut created, "firewall-check");
    let _ = writeln!(
        out,
        "add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );

    let _ = writeln!(
        out,
        "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add rule {T} services {nodeport_local_daddr} meta l4proto . th dport vmap @service-nodeports"
    );

    // nftElementStorage.reset() for the six containers.
    let _ = writeln!(out, "flush set {T} cluster-ips");
    for m in [
        "service-ips",
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-nodeports",
    ] {
        let _ = writeln!(out, "flush map {T} {m}");
    }
}

/// The complete `nft -f` input of kube-proxy's first full sync for
/// `services`, creating and filling `table ip kube-proxy`. Apply with
/// `nft -f <file>` (kube-proxy pipes it to `nft -f -`); check with `nft -c -f`.
pub fn nft_script(services: &[BenchService], node: &NodeConfig) -> String {
    let mut out = String::with_capacity(services.len() * 2200 + 8192);
    setup(&mut out, node);

    for svc in services {
        let p = svc.protocol.as_str();
        let cip = svc.cluster_ip;
        let port = svc.port;
        let eps = svc.ordered_endpoints();
        let base = nft_service_chain_base(svc);
        let svc_chain = format!("service-{base}");
        let ext_chain = format!("external-{base}");

        if eps.is_empty() {
            // No endpoints: only the reject vmaps (hasEndpoints == false).
            let spn = svc.service_port_name();
            let _ = writeln!(out, "add element {T} cluster-ips {{ {cip} }}");
            let _ = writeln!(
                out,
                "add element {T} no-endpoint-services {{ {cip} . {p} . {port} comment \"{spn}\" : goto reject-chain }}"
            );
            if let Some(np) = svc.node_port {
                let _ = writeln!(
                    out,
                    "add element {T} no-endpoint-nodeports {{ {p} . {np} comment \"{spn}\" : goto reject-chain }}"
                );
            }
            continue;
        }

        let ep_chains: Vec<String> = eps
            .iter()
            .map(|ep| format!("endpoint-{}", nft_endpoint_chain_base(svc, ep)))
            .collect();

        // ensureChain: endpoint chains, cluster-policy chain, external chain.
        for c in ep_chains
            .iter()
            .chain(std::iter::once(&svc_chain))
            .chain(svc.node_port.iter().map(|_| &ext_chain))
        {
            let _ = writeln!(out, "add chain {T} {c}");
            let _ = writeln!(out, "flush chain {T} {c}");
        }

        let _ = writeln!(out, "add element {T} cluster-ips {{ {cip} }}");
        let _ = writeln!(
            out,
            "add element {T} service-ips {{ {cip} . {p} . {port} : goto {svc_chain} }}"
        );
        if let Some(np) = svc.node_port {
            let _ = writeln!(
                out,
                "add element {T} service-nodeports {{ {p} . {np} : goto {ext_chain} }}"
            );
        }

        // Internal traffic handling.
        match node.masquerade {
            Masquerade::All => {
                let _ = writeln!(
                    out,
                    "add rule {T} {svc_chain} ip daddr {cip} jump mark-for-masquerade"
                );
            }
            Masquerade::ClusterCidr(cidr) => {
                let _ = writeln!(
                    out,
                    "add rule {T} {svc_chain} ip daddr {cip} ip saddr != {cidr} jump mark-for-masquerade"
                );
            }
        }

        // External traffic handling (NodePort, externalTrafficPolicy=Cluster).
        if svc.node_port.is_some() {
            let _ = writeln!(out, "add rule {T} {ext_chain} jump mark-for-masquerade");
            let _ = writeln!(out, "add rule {T} {ext_chain} goto {svc_chain}");
        }

        // writeServiceToEndpointRules
        let _ = write!(
            out,
            "add rule {T} {svc_chain} numgen random mod {} vmap {{ ",
            eps.len()
        );
        for (i, c) in ep_chains.iter().enumerate() {
            if i > 0 {
                out.push_str(" , ");
            }
            let _ = write!(out, "{i} : goto {c}");
        }
        out.push_str(" }\n");

        for (ep, c) in eps.iter().zip(&ep_chains) {
            let _ = writeln!(
                out,
                "add rule {T} {c} ip saddr {} jump mark-for-masquerade",
                ep.ip
            );
            let _ = writeln!(out, "add rule {T} {c} meta l4proto {p} dnat to {}", ep.text);
        }
    }
    out
}

/// kube-proxy's `CleanupLeftovers` for the IPv4 instance.
pub fn nft_cleanup_script() -> String {
    format!("delete table {NFT_TABLE}\n")
}

/// Same as [`nft_cleanup_script`], as an argv for `nft`.
pub fn nft_cleanup_args() -> [&'static str; 4] {
    ["delete", "table", "ip", "kube-proxy"]
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::bench::kubeproxy::Ipv4Cidr;
    use crate::bench::testdata::{
        assert_10k_generation_fast, four_endpoint_service, upstream_service,
    };

    /// The service part of the script for one Service with four endpoints.
    #[test]
    fn snapshot_one_service_four_endpoints() {
        let node = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        let svc = four_endpoint_service();
        let got = nft_script(std::slice::from_ref(&svc), &node);
        let base = nft_service_chain_base(&svc);
        let eps = svc.ordered_endpoints();
        let e: Vec<String> = eps
            .iter()
            .map(|ep| format!("endpoint-{}", nft_endpoint_chain_base(&svc, ep)))
            .collect();
        assert!(base.ends_with("-bench/api/tcp/https"));
        assert!(e[0].ends_with("-bench/api/tcp/https__203.0.113.11/8443"));
        let s = format!("service-{base}");
        let want_tail = format!(
            "add chain ip kube-proxy {e0}
flush chain ip kube-proxy {e0}
add chain ip kube-proxy {e1}
flush chain ip kube-proxy {e1}
add chain ip kube-proxy {e2}
flush chain ip kube-proxy {e2}
add chain ip kube-proxy {e3}
flush chain ip kube-proxy {e3}
add chain ip kube-proxy {s}
flush chain ip kube-proxy {s}
add element ip kube-proxy cluster-ips {{ 10.96.0.10 }}
add element ip kube-proxy service-ips {{ 10.96.0.10 . tcp . 443 : goto {s} }}
add rule ip kube-proxy {s} ip daddr 10.96.0.10 jump mark-for-masquerade
add rule ip kube-proxy {s} numgen random mod 4 vmap {{ 0 : goto {e0} , 1 : goto {e1} , 2 : goto {e2} , 3 : goto {e3} }}
add rule ip kube-proxy {e0} ip saddr 203.0.113.11 jump mark-for-masquerade
add rule ip kube-proxy {e0} meta l4proto tcp dnat to 203.0.113.11:8443
add rule ip kube-proxy {e1} ip saddr 203.0.113.12 jump mark-for-masquerade
add rule ip kube-proxy {e1} meta l4proto tcp dnat to 203.0.113.12:8443
add rule ip kube-proxy {e2} ip saddr 203.0.113.13 jump mark-for-masquerade
add rule ip kube-proxy {e2} meta l4proto tcp dnat to 203.0.113.13:8443
add rule ip kube-proxy {e3} ip saddr 203.0.113.14 jump mark-for-masquerade
add rule ip kube-proxy {e3} meta l4proto tcp dnat to 203.0.113.14:8443
",
            e0 = e[0],
            e1 = e[1],
            e2 = e[2],
            e3 = e[3],
        );
        assert!(got.ends_with(&want_tail), "got:\n{got}");
    }

    /// Every non-flush/delete line must be one kube-proxy's own
    /// `TestOverallNFTablesRules` expects (knftables.Fake dump, which omits
    /// flushes), for the same inputs: pod CIDR 10.0.0.0/8, service CIDR
    /// 172.30.0.0/16, nodePortAddresses 192.168.0.2/32, mark "0x4000".
    #[test]
    fn matches_upstream_test_lines() {
        let mut node = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        node.masquerade = Masquerade::ClusterCidr(Ipv4Cidr::new(Ipv4Addr::new(10, 0, 0, 0), 8));
        node.service_cidrs = vec![Ipv4Cidr::new(Ipv4Addr::new(172, 30, 0, 0), 16)];
        node.nodeport_addresses = NodePortAddresses::Ips(vec![Ipv4Addr::new(192, 168, 0, 2)]);
        let services = [
            upstream_service("ns1", "svc1", [172, 30, 0, 41], None, &[[10, 180, 0, 1]]),
            upstream_service(
                "ns3",
                "svc3",
                [172, 30, 0, 43],
                Some(3003),
                &[[10, 180, 0, 3]],
            ),
            upstream_service("ns6", "svc6", [172, 30, 0, 46], None, &[]),
        ];
        let got = nft_script(&services, &node).replace("0x00004000", "0x4000");
        let upstream = r#"
add table ip kube-proxy { comment "rules for kube-proxy" ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add element ip kube-proxy nodeport-ips { 192.168.0.2 }
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }
add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 }
add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
add chain ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80
add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80
add element ip kube-proxy cluster-ips { 172.30.0.43 }
add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy cluster-ips { 172.30.0.46 }
add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
"#;
        let mut ours: Vec<&str> = got
            .lines()
            .filter(|l| !l.starts_with("flush ") && !l.starts_with("delete "))
            .collect();
        // knftables.Fake collapses the one-time add+delete of base chains.
        ours.retain(|l| {
            !BASE_CHAINS
                .iter()
                .any(|(n, ..)| *l == format!("add chain ip kube-proxy {n}"))
        });
        let mut theirs: Vec<&str> = upstream.lines().filter(|l| !l.is_empty()).collect();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn structure_and_variants() {
        let mut node = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        let mut svc = four_endpoint_service();
        svc.node_port = Some(30443);
        let got = nft_script(std::slice::from_ref(&svc), &node);
        assert!(
            got.starts_with("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n")
        );
        assert!(got.contains(
            "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n"
        ));
        assert!(
            got.contains(
                "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000\n"
            )
        );
        assert!(
            got.contains("add rule ip kube-proxy cluster-ips-check ip daddr { 10.96.0.0/12 } drop")
        );
        // Default nftables NodePort addresses: the primary node IP only.
        assert!(got.contains("add element ip kube-proxy nodeport-ips { 192.168.0.2 }\n"));
        let base = nft_service_chain_base(&svc);
        assert!(got.contains(&format!(
            "add element ip kube-proxy service-nodeports {{ tcp . 30443 : goto external-{base} }}\n"
        )));
        assert!(got.contains(&format!(
            "add rule ip kube-proxy external-{base} jump mark-for-masquerade\nadd rule ip kube-proxy external-{base} goto service-{base}\n"
        )));
        // Referenced objects are defined before use.
        let pos = |s: &str| got.find(s).unwrap_or_else(|| panic!("missing {s}"));
        assert!(pos("add map ip kube-proxy service-ips") < pos("vmap @service-ips"));
        assert!(pos("add set ip kube-proxy nodeport-ips") < pos("@nodeport-ips"));
        assert!(pos("add chain ip kube-proxy services\n") < pos("jump services"));

        node.nodeport_addresses = NodePortAddresses::All;
        let all = nft_script(std::slice::from_ref(&svc), &node);
        assert!(all.contains("delete set ip kube-proxy nodeport-ips\n"));
        assert!(all.contains("add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n"));
        assert!(!all.contains("@nodeport-ips"));

        assert_eq!(nft_cleanup_script(), "delete table ip kube-proxy\n");
    }

    #[test]
    fn generation_10k_is_fast() {
        assert_10k_generation_fast("nft", nft_script, " dnat to ");
    }
}
