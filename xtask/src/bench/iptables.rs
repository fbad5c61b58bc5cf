//! kube-proxy **iptables mode**, reproduced rule for rule.
//!
//! Source followed: kubernetes/kubernetes `pkg/proxy/iptables/proxier.go`
//! (v1.32-v1.34; the layout has been stable since ~v1.28), functions
//! `syncProxyRules`, `writeServiceToEndpointRules`, `iptablesJumpChains`,
//! `iptablesKubeletJumpChains`, `CleanupLeftovers`, and
//! `pkg/util/iptables/iptables.go` (`restoreInternal`, wait flags).
//!
//! A kube-proxy *full* sync does two things, and so do we:
//! 1. [`setup_commands`]: `EnsureChain` + `EnsureRule(Prepend, ..)` for the
//!    jump rules from the built-in chains (PREROUTING/OUTPUT/POSTROUTING in
//!    `nat`, INPUT/FORWARD/OUTPUT in `filter`), which are deliberately *not*
//!    part of the restore input, plus the `KUBE-PROXY-CANARY` chains that
//!    `iptables.Monitor` creates.
//! 2. [`iptables_restore`]: one `iptables-restore -w 5 -W 100000 --noflush
//!    --counters` ([`RESTORE_ARGS`]) input with `*filter` and `*nat`.
//!
//! Deliberate omissions (none affects the ClusterIP/NodePort data path):
//! * The `-m nfacct` matches kube-proxy adds to the KUBE-FORWARD INVALID-drop
//!   rule and the localhost-NodePort rule when it managed to create nfacct
//!   counters (metrics only). We emit the non-nfacct form kube-proxy uses when
//!   nfacct is unavailable.
//! * ExternalIPs, LoadBalancer IPs/source ranges (KUBE-FW-*), health-check
//!   NodePorts, session affinity and `Local` traffic policies: selector-less
//!   Services with external endpoints in the benchmark use none of them.
//! * kubelet's own chains (KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT).
//!
//! Service order: kube-proxy iterates a Go map, so the KUBE-SERVICES order is
//! random per sync; we keep the input order (deterministic). KUBE-SERVICES is a
//! linear list, so a benchmark should spread its target Services over the list
//! (or report the position) to be fair to iptables.

use std::fmt::Write as _;

use super::kubeproxy::{
    BenchService, LARGE_CLUSTER_ENDPOINTS_THRESHOLD, Masquerade, NodeConfig, NodePortAddresses,
    iptables_ext_chain, iptables_sep_chain, iptables_svc_chain, probability,
};

/// Arguments kube-proxy passes to `iptables-restore` (`RestoreAll` with
/// `NoFlushTables` + `RestoreCounters`, plus the wait flags it uses for
/// iptables >= 1.6.2).
pub const RESTORE_ARGS: [&str; 6] = ["-w", "5", "-W", "100000", "--noflush", "--counters"];

/// Wait flags kube-proxy's runner puts in front of every `iptables` call.
pub const WAIT_ARGS: [&str; 4] = ["-w", "5", "-W", "100000"];

/// Which iptables binaries to drive. kube-proxy itself execs plain
/// `iptables`/`iptables-restore`, i.e. whatever backend the host's
/// alternatives/wrapper selects (the kube-proxy image's
/// `iptables-wrapper` picks the backend that already holds kubelet's rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft*`: xtables rules in nf_tables (`table ip nat` etc.).
    Nft,
    /// `iptables-legacy*`: the classic x_tables blob.
    Legacy,
}

impl Backend {
    pub fn iptables(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft",
            Backend::Legacy => "iptables-legacy",
        }
    }

    pub fn restore(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-restore",
            Backend::Legacy => "iptables-legacy-restore",
        }
    }

    pub fn save(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-save",
            Backend::Legacy => "iptables-legacy-save",
        }
    }
}

/// One `iptables` invocation (arguments after the binary name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptablesCommand {
    pub args: Vec<String>,
    /// `-N` of an existing chain and `-D` of a missing rule fail harmlessly;
    /// kube-proxy ignores those errors too.
    pub may_fail: bool,
}

impl IptablesCommand {
    fn new(may_fail: bool, args: &[&str]) -> Self {
        let mut v: Vec<String> = WAIT_ARGS.iter().map(|s| s.to_string()).collect();
        v.extend(args.iter().map(|s| s.to_string()));
        IptablesCommand { args: v, may_fail }
    }
}

struct JumpChain {
    table: &'static str,
    dst: &'static str,
    src: &'static str,
    comment: &'static str,
    ctstate_new: bool,
}

/// `iptablesJumpChains` followed by `iptablesKubeletJumpChains`, in order.
const JUMP_CHAINS: [JumpChain; 14] = [
    JumpChain {
        table: "filter",
        dst: "KUBE-EXTERNAL-SERVICES",
        src: "INPUT",
        comment: "kubernetes externally-visible service portals",
        ctstate_new: true,
    },
    JumpChain {
        table: "filter",
        dst: "KUBE-EXTERNAL-SERVICES",
        src: "FORWARD",
        comment: "kubernetes externally-visible service portals",
        ctstate_new: true,
    },
    JumpChain {
        table: "filter",
        dst: "KUBE-NODEPORTS",
        src: "INPUT",
        comment: "kubernetes health check service ports",
        ctstate_new: false,
    },
    JumpChain {
        table: "filter",
        dst: "KUBE-SERVICES",
        src: "FORWARD",
        comment: "kubernetes service portals",
        ctstate_new: true,
    },
    JumpChain {
        table: "filter",
        dst: "KUBE-SERVICES",
        src: "OUTPUT",
        comment: "kubernetes service portals",
        ctstate_new: true,
    },
    JumpChain {
        table: "filter",
        dst: "KUBE-FORWARD",
        src: "FORWARD",
        comment: "kubernetes forwarding rules",
        ctstate_new: false,
    },
    JumpChain {
        table: "filter",
        dst: "KUBE-PROXY-FIREWALL",
        src: "INPUT",
        comment: "kubernetes load balancer firewall",
        ctstate_new: true,
    },
    JumpChain {
        table: "filter",
        dst: "KUBE-PROXY-FIREWALL",
        src: "OUTPUT",
        comment: "kubernetes load balancer firewall",
        ctstate_new: true,
    },
    JumpChain {
        table: "filter",
        dst: "KUBE-PROXY-FIREWALL",
        src: "FORWARD",
        comment: "kubernetes load balancer firewall",
        ctstate_new: true,
    },
    JumpChain {
        table: "nat",
        dst: "KUBE-SERVICES",
        src: "OUTPUT",
        comment: "kubernetes service portals",
        ctstate_new: false,
    },
    JumpChain {
        table: "nat",
        dst: "KUBE-SERVICES",
        src: "PREROUTING",
        comment: "kubernetes service portals",
        ctstate_new: false,
    },
    JumpChain {
        table: "nat",
        dst: "KUBE-POSTROUTING",
        src: "POSTROUTING",
        comment: "kubernetes postrouting rules",
        ctstate_new: false,
    },
    // iptablesKubeletJumpChains (no comment).
    JumpChain {
        table: "filter",
        dst: "KUBE-FIREWALL",
        src: "INPUT",
        comment: "",
        ctstate_new: false,
    },
    JumpChain {
        table: "filter",
        dst: "KUBE-FIREWALL",
        src: "OUTPUT",
        comment: "",
        ctstate_new: false,
    },
];

const CANARY_CHAIN: &str = "KUBE-PROXY-CANARY";
const CANARY_TABLES: [&str; 3] = ["mangle", "nat", "filter"];

fn jump_rule_args<'a>(j: &'a JumpChain, op: &'a str) -> Vec<&'a str> {
    let mut a = vec!["-t", j.table, op, j.src];
    if j.ctstate_new {
        a.extend(["-m", "conntrack", "--ctstate", "NEW"]);
    }
    if !j.comment.is_empty() {
        a.extend(["-m", "comment", "--comment", j.comment]);
    }
    a.extend(["-j", j.dst]);
    a
}

/// What kube-proxy runs with `iptables` before the first `iptables-restore`:
/// canary chains (`iptables.Monitor`), then for every jump chain
/// `EnsureChain` (`-N`, may already exist) and `EnsureRule(Prepend)` (`-I`;
/// kube-proxy first checks with `-C`, which on a fresh node always misses).
/// Run them in order, e.g. `ip netns exec NS iptables <args>`.
pub fn setup_commands(_node: &NodeConfig) -> Vec<IptablesCommand> {
    let mut cmds = Vec::new();
    for table in CANARY_TABLES {
        cmds.push(IptablesCommand::new(
            true,
            &["-t", table, "-N", CANARY_CHAIN],
        ));
    }
    for j in &JUMP_CHAINS {
        cmds.push(IptablesCommand::new(true, &["-t", j.table, "-N", j.dst]));
        cmds.push(IptablesCommand::new(false, &jump_rule_args(j, "-I")));
    }
    cmds
}

/// `-D` of every jump rule [`setup_commands`] inserted (may fail if absent).
/// Run these, then feed [`cleanup_restore`] to `iptables-restore --noflush`.
pub fn cleanup_commands(_node: &NodeConfig) -> Vec<IptablesCommand> {
    JUMP_CHAINS
        .iter()
        .map(|j| IptablesCommand::new(true, &jump_rule_args(j, "-D")))
        .collect()
}

/// Flushes and deletes every chain that [`setup_commands`] and
/// [`iptables_restore`] created (a superset of kube-proxy's
/// `CleanupLeftovers`, which keeps KUBE-MARK-MASQ, KUBE-FIREWALL and the
/// canaries). Needs the jump rules removed first ([`cleanup_commands`]).
pub fn cleanup_restore(services: &[BenchService], _node: &NodeConfig) -> String {
    let mut nat_chains: Vec<String> = [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        CANARY_CHAIN,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for svc in services {
        let eps = svc.ordered_endpoints();
        if eps.is_empty() {
            continue;
        }
        let spn = svc.service_port_name();
        let proto = svc.protocol.as_str();
        if svc.node_port.is_some() {
            nat_chains.push(iptables_ext_chain(&spn, proto));
        }
        nat_chains.push(iptables_svc_chain(&spn, proto));
        for ep in &eps {
            nat_chains.push(iptables_sep_chain(&spn, proto, &ep.text));
        }
    }
    let filter_chains = [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
        CANARY_CHAIN,
    ];
    let mut out = String::with_capacity(64 * nat_chains.len() + 1024);
    flush_and_delete(&mut out, "filter", &filter_chains);
    let nat: Vec<&str> = nat_chains.iter().map(String::as_str).collect();
    flush_and_delete(&mut out, "nat", &nat);
    flush_and_delete(&mut out, "mangle", &[CANARY_CHAIN]);
    out
}

/// `*table`, a `:CHAIN` line per chain (creates-or-flushes it), `-X` each.
fn flush_and_delete(out: &mut String, table: &str, chains: &[&str]) {
    let _ = writeln!(out, "*{table}");
    for c in chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in chains {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
}

/// The complete `iptables-restore` input of kube-proxy's first full sync
/// (`*filter` then `*nat`, each ending in `COMMIT`). Feed it to
/// `iptables-restore` with [`RESTORE_ARGS`] after running [`setup_commands`].
pub fn iptables_restore(services: &[BenchService], node: &NodeConfig) -> String {
    let mark = node.masquerade_mark();
    let total_endpoints: usize = services.iter().map(BenchService::endpoint_count).sum();
    // proxier.largeClusterMode: drop per-endpoint comments above 1000 endpoints.
    let large_cluster = total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
    let localhost_np = node.iptables_localhost_nodeports();

    // Rough sizing: ~1.3 KiB of nat text per 4-endpoint service.
    let mut filter_chains = String::with_capacity(512);
    let mut filter_rules = String::with_capacity(1024);
    let mut nat_chains = String::with_capacity(services.len() * 200 + 512);
    let mut nat_rules = String::with_capacity(services.len() * 1400 + 1024);

    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(filter_chains, ":{c} - [0:0]");
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(nat_chains, ":{c} - [0:0]");
    }

    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN"
    );
    let _ = writeln!(nat_rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {mark}");
    nat_rules.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE",
    );
    if node.iptables_random_fully {
        nat_rules.push_str(" --random-fully");
    }
    nat_rules.push('\n');
    let _ = writeln!(nat_rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {mark}");

    if localhost_np {
        filter_chains.push_str(":KUBE-FIREWALL - [0:0]\n");
        filter_rules.push_str(
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
        );
    }

    // precomputedProbabilities
    let mut probs: Vec<String> = vec![String::new()];

    for svc in services {
        let spn = svc.service_port_name();
        let p = svc.protocol.as_str();
        let cip = svc.cluster_ip;
        let port = svc.port;
        let eps = svc.ordered_endpoints();
        let has_endpoints = !eps.is_empty();
        let svc_chain = iptables_svc_chain(&spn, p);

        // Capture the clusterIP.
        if has_endpoints {
            let _ = writeln!(
                nat_rules,
                "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" -m {p} -p {p} -d {cip} --dport {port} -j {svc_chain}"
            );
        } else {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -m comment --comment \"{spn} has no endpoints\" -m {p} -p {p} -d {cip} --dport {port} -j REJECT"
            );
        }

        // Capture nodeports.
        let ext_chain = svc.node_port.map(|_| iptables_ext_chain(&spn, p));
        if let (Some(np), Some(ext)) = (svc.node_port, ext_chain.as_deref()) {
            if has_endpoints {
                let _ = writeln!(
                    nat_rules,
                    "-A KUBE-NODEPORTS -m comment --comment {spn} -m {p} -p {p} --dport {np} -j {ext}"
                );
            } else {
                let _ = writeln!(
                    filter_rules,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} has no endpoints\" -m addrtype --dst-type LOCAL -m {p} -p {p} --dport {np} -j REJECT"
                );
            }
        }

        if !has_endpoints {
            continue;
        }

        // Internal traffic: masquerade rule at the top of KUBE-SVC-*.
        let _ = write!(
            nat_rules,
            "-A {svc_chain} -m comment --comment \"{spn} cluster IP\" -m {p} -p {p} -d {cip} --dport {port}"
        );
        match node.masquerade {
            Masquerade::All => {}
            Masquerade::ClusterCidr(cidr) => {
                let _ = write!(nat_rules, " ! -s {cidr}");
            }
        }
        nat_rules.push_str(" -j KUBE-MARK-MASQ\n");

        // External traffic (NodePort), externalTrafficPolicy=Cluster.
        if let Some(ext) = ext_chain.as_deref() {
            let _ = writeln!(nat_chains, ":{ext} - [0:0]");
            let _ = writeln!(
                nat_rules,
                "-A {ext} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(nat_rules, "-A {ext} -j {svc_chain}");
        }

        // Cluster policy chain: writeServiceToEndpointRules.
        let _ = writeln!(nat_chains, ":{svc_chain} - [0:0]");
        let sep_chains: Vec<String> = eps
            .iter()
            .map(|ep| iptables_sep_chain(&spn, p, &ep.text))
            .collect();
        let n = eps.len();
        for (i, (ep, sep)) in eps.iter().zip(&sep_chains).enumerate() {
            let _ = write!(nat_rules, "-A {svc_chain}");
            if !large_cluster {
                let _ = write!(nat_rules, " -m comment --comment \"{spn} -> {}\"", ep.text);
            }
            if i < n - 1 {
                let k = n - i;
                while probs.len() <= k {
                    probs.push(probability(probs.len()));
                }
                let _ = write!(
                    nat_rules,
                    " -m statistic --mode random --probability {}",
                    probs[k]
                );
            }
            let _ = writeln!(nat_rules, " -j {sep}");
        }

        // Per-endpoint chains.
        for (ep, sep) in eps.iter().zip(&sep_chains) {
            let _ = writeln!(nat_chains, ":{sep} - [0:0]");
            let comment = if large_cluster {
                String::new()
            } else {
                format!(" -m comment --comment {spn}")
            };
            let _ = writeln!(
                nat_rules,
                "-A {sep}{comment} -s {} -j KUBE-MARK-MASQ",
                ep.ip
            );
            let _ = writeln!(
                nat_rules,
                "-A {sep}{comment} -m {p} -p {p} -j DNAT --to-destination {}",
                ep.text
            );
        }
    }

    // Tail-call to KUBE-NODEPORTS (must be the last rule of KUBE-SERVICES).
    const NODEPORTS_COMMENT: &str = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    match &node.nodeport_addresses {
        NodePortAddresses::ModeDefault | NodePortAddresses::All => {
            let _ = write!(
                nat_rules,
                "-A KUBE-SERVICES {NODEPORTS_COMMENT} -m addrtype --dst-type LOCAL"
            );
            if !localhost_np {
                nat_rules.push_str(" ! -d 127.0.0.0/8");
            }
            nat_rules.push_str(" -j KUBE-NODEPORTS\n");
        }
        NodePortAddresses::Ips(ips) => {
            for ip in ips {
                if ip.is_loopback() && !localhost_np {
                    continue;
                }
                let _ = writeln!(
                    nat_rules,
                    "-A KUBE-SERVICES {NODEPORTS_COMMENT} -d {ip} -j KUBE-NODEPORTS"
                );
            }
        }
    }

    if !node.conntrack_tcp_be_liberal {
        filter_rules.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    }
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    );
    filter_rules.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );

    let mut out = String::with_capacity(
        filter_chains.len() + filter_rules.len() + nat_chains.len() + nat_rules.len() + 32,
    );
    out.push_str("*filter\n");
    out.push_str(&filter_chains);
    out.push_str(&filter_rules);
    out.push_str("COMMIT\n*nat\n");
    out.push_str(&nat_chains);
    out.push_str(&nat_rules);
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::bench::kubeproxy::Ipv4Cidr;
    use crate::bench::testdata::{
        assert_10k_generation_fast, four_endpoint_service, https_services, upstream_service,
    };

    fn sep(ep: &str) -> String {
        iptables_sep_chain("bench/api:https", "tcp", ep)
    }

    /// Full snapshot: one Service, four external endpoints, masqueradeAll.
    #[test]
    fn snapshot_one_service_four_endpoints() {
        let node = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        let got = iptables_restore(&[four_endpoint_service()], &node);
        let svc = iptables_svc_chain("bench/api:https", "tcp");
        let (s1, s2, s3, s4) = (
            sep("203.0.113.11:8443"),
            sep("203.0.113.12:8443"),
            sep("203.0.113.13:8443"),
            sep("203.0.113.14:8443"),
        );
        let want = format!(
            r#"*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x00004000/0x00004000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:{svc} - [0:0]
:{s1} - [0:0]
:{s2} - [0:0]
:{s3} - [0:0]
:{s4} - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
-A KUBE-SERVICES -m comment --comment "bench/api:https cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 443 -j {svc}
-A {svc} -m comment --comment "bench/api:https cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 443 -j KUBE-MARK-MASQ
-A {svc} -m comment --comment "bench/api:https -> 203.0.113.11:8443" -m statistic --mode random --probability 0.2500000000 -j {s1}
-A {svc} -m comment --comment "bench/api:https -> 203.0.113.12:8443" -m statistic --mode random --probability 0.3333333333 -j {s2}
-A {svc} -m comment --comment "bench/api:https -> 203.0.113.13:8443" -m statistic --mode random --probability 0.5000000000 -j {s3}
-A {svc} -m comment --comment "bench/api:https -> 203.0.113.14:8443" -j {s4}
-A {s1} -m comment --comment bench/api:https -s 203.0.113.11 -j KUBE-MARK-MASQ
-A {s1} -m comment --comment bench/api:https -m tcp -p tcp -j DNAT --to-destination 203.0.113.11:8443
-A {s2} -m comment --comment bench/api:https -s 203.0.113.12 -j KUBE-MARK-MASQ
-A {s2} -m comment --comment bench/api:https -m tcp -p tcp -j DNAT --to-destination 203.0.113.12:8443
-A {s3} -m comment --comment bench/api:https -s 203.0.113.13 -j KUBE-MARK-MASQ
-A {s3} -m comment --comment bench/api:https -m tcp -p tcp -j DNAT --to-destination 203.0.113.13:8443
-A {s4} -m comment --comment bench/api:https -s 203.0.113.14 -j KUBE-MARK-MASQ
-A {s4} -m comment --comment bench/api:https -m tcp -p tcp -j DNAT --to-destination 203.0.113.14:8443
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"#
        );
        assert_eq!(got, want);
    }

    /// Lines from kube-proxy's TestOverallIPTablesRules expected output (nat
    /// table; cluster-CIDR local detector 10.0.0.0/8, mark "0x4000", fake
    /// iptables without --random-fully) must appear verbatim in our output.
    #[test]
    fn matches_upstream_test_lines() {
        let mut node = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        node.masquerade = Masquerade::ClusterCidr(Ipv4Cidr::new(Ipv4Addr::new(10, 0, 0, 0), 8));
        node.iptables_random_fully = false;
        let services = [
            upstream_service("ns1", "svc1", [172, 30, 0, 41], None, &[[10, 180, 0, 1]]),
            upstream_service(
                "ns3",
                "svc3",
                [172, 30, 0, 43],
                Some(3003),
                &[[10, 180, 0, 3]],
            ),
            upstream_service(
                "ns4",
                "svc4",
                [172, 30, 0, 44],
                None,
                &[[10, 180, 0, 5], [10, 180, 0, 4]],
            ),
        ];
        let got = iptables_restore(&services, &node).replace("0x00004000", "0x4000");
        let upstream = r#"
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
"#;
        let nat = got.split("*nat\n").nth(1).unwrap();
        let mut ours: Vec<&str> = nat.lines().filter(|l| l.starts_with("-A ")).collect();
        let mut theirs: Vec<&str> = upstream.lines().filter(|l| !l.is_empty()).collect();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn nodeport_no_endpoints_and_cluster_cidr() {
        let mut node = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        node.nodeport_addresses = NodePortAddresses::Ips(vec![Ipv4Addr::new(192, 168, 0, 2)]);
        node.conntrack_tcp_be_liberal = true;
        let mut s = four_endpoint_service();
        s.endpoints.clear();
        s.node_port = Some(30443);
        let got = iptables_restore(&[s], &node);
        assert!(got.contains("-A KUBE-SERVICES -m comment --comment \"bench/api:https has no endpoints\" -m tcp -p tcp -d 10.96.0.10 --dport 443 -j REJECT\n"));
        assert!(got.contains("-A KUBE-EXTERNAL-SERVICES -m comment --comment \"bench/api:https has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30443 -j REJECT\n"));
        assert!(got.contains("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 192.168.0.2 -j KUBE-NODEPORTS\n"));
        // Loopback not among the NodePort addresses: localhostNodePorts is off.
        assert!(!got.contains("KUBE-FIREWALL"));
        assert!(!got.contains("INVALID"));
        assert!(!got.contains("KUBE-SVC-"));
    }

    #[test]
    fn large_cluster_mode_drops_endpoint_comments() {
        let services = https_services(251, 1..=8, None); // 1004 endpoints > 1000
        let node = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        let got = iptables_restore(&services, &node);
        assert!(!got.contains("-> 203.0.113."));
        assert!(got.contains(" -s 203.0.113.1 -j KUBE-MARK-MASQ\n"));
        let sep_comment = got
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SEP-") && l.contains("--comment"))
            .count();
        assert_eq!(sep_comment, 0);
        // KUBE-SERVICES and the masquerade rule keep their comments.
        assert!(got.contains("\"bench/svc-000250:https cluster IP\""));
        let got_small = iptables_restore(&services[..250], &node);
        assert!(got_small.contains("-> 203.0.113."));
    }

    #[test]
    fn setup_and_cleanup_commands() {
        let node = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        let setup = setup_commands(&node);
        let shell: Vec<String> = setup.iter().map(|c| c.args.join(" ")).collect();
        assert!(shell.contains(
            &"-w 5 -W 100000 -t nat -I PREROUTING -m comment --comment kubernetes service portals -j KUBE-SERVICES".to_string()
        ));
        assert!(shell.contains(
            &"-w 5 -W 100000 -t filter -I FORWARD -m conntrack --ctstate NEW -m comment --comment kubernetes service portals -j KUBE-SERVICES".to_string()
        ));
        assert!(shell.contains(&"-w 5 -W 100000 -t filter -I INPUT -j KUBE-FIREWALL".to_string()));
        assert_eq!(setup.len(), 3 + 2 * JUMP_CHAINS.len());
        let cleanup = cleanup_commands(&node);
        assert!(cleanup.iter().all(|c| c.args.contains(&"-D".to_string())));
        let restore = cleanup_restore(&[four_endpoint_service()], &node);
        assert!(restore.contains(&format!(
            "-X {}\n",
            iptables_svc_chain("bench/api:https", "tcp")
        )));
        assert!(restore.starts_with("*filter\n"));
        assert!(
            restore
                .ends_with("*mangle\n:KUBE-PROXY-CANARY - [0:0]\n-X KUBE-PROXY-CANARY\nCOMMIT\n")
        );
    }

    /// 10k services must generate well under a second (release build).
    #[test]
    fn generation_10k_is_fast() {
        assert_10k_generation_fast("iptables", iptables_restore, "-j DNAT");
    }
}
