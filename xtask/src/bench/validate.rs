//! Root-only checks that the generated rules really load into the kernel and
//! really DNAT + masquerade. Ignored by default; run with
//! `cargo test -p xtask -- --ignored --nocapture --test-threads=1`.
//!
//! Every test works in throw-away network namespaces `xk-test-<pid>-<tag>`,
//! deleted by [`Netns`]'s `Drop` even when an assertion fails.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

use super::iptables::{self, Backend};
use super::kubeproxy::{
    BenchService, Ipv4Cidr, Masquerade, NodeConfig, NodePortAddresses, ProxyMode,
    kube_proxy_sysctls, nft_service_chain_base,
};
use super::netns::Netns;
use super::nftables;
use super::testdata::https_services;

fn ns_name(tag: &str) -> String {
    format!("xk-test-{}-{tag}", std::process::id())
}

fn have(binary: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(binary).exists())
}

/// `count` services, 4 endpoints each, from 203.0.113.11..=203.0.113.14.
fn services(count: usize) -> Vec<BenchService> {
    services_np(count, false)
}

/// Like [`services`], optionally with NodePorts 30000.. (count <= 35535).
fn services_np(count: usize, node_ports: bool) -> Vec<BenchService> {
    https_services(count, 11..=14, node_ports.then_some(30000))
}

/// The node config a load test uses for `n` services: the alternative
/// variants (cluster-CIDR masquerade, explicit NodePort addresses) for the
/// single-service run, the defaults otherwise, so both load.
fn node_for(n: usize) -> NodeConfig {
    let mut node = node();
    if n == 1 {
        node.masquerade = Masquerade::ClusterCidr(Ipv4Cidr::new(Ipv4Addr::new(10, 244, 0, 0), 16));
        node.nodeport_addresses = NodePortAddresses::Ips(vec![node.node_ip]);
    }
    node
}

fn node() -> NodeConfig {
    NodeConfig::new(Ipv4Addr::new(192, 168, 50, 1))
}

/// Setup commands + restore, as kube-proxy does on its first sync.
fn apply_iptables(
    ns: &Netns,
    backend: Backend,
    svcs: &[BenchService],
    node: &NodeConfig,
) -> Result<Duration> {
    for c in iptables::setup_commands(node) {
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        if c.may_fail {
            let _ = ns.run_unchecked(backend.iptables(), &args)?;
        } else {
            ns.run(backend.iptables(), &args)?;
        }
    }
    let input = iptables::iptables_restore(svcs, node);
    let t = Instant::now();
    ns.run_stdin(
        backend.restore(),
        &iptables::RESTORE_ARGS,
        Some(input.as_bytes()),
    )?;
    Ok(t.elapsed())
}

fn cleanup_iptables(
    ns: &Netns,
    backend: Backend,
    svcs: &[BenchService],
    node: &NodeConfig,
) -> Result<()> {
    for c in iptables::cleanup_commands(node) {
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let out = ns.run_unchecked(backend.iptables(), &args)?;
        ensure!(
            c.may_fail || out.status.success(),
            "cleanup command failed: {args:?}"
        );
    }
    let input = iptables::cleanup_restore(svcs, node);
    ns.run_stdin(
        backend.restore(),
        &["-w", "5", "-W", "100000", "--noflush"],
        Some(input.as_bytes()),
    )?;
    Ok(())
}

fn check_iptables_backend(backend: Backend, tag: &str) -> Result<()> {
    for n in [1usize, 1000] {
        let node = node_for(n);
        let ns = Netns::create(&ns_name(&format!("{tag}{n}")))?;
        let svcs = services_np(n, true);
        // `--test` parses and checks the input without committing it.
        let input = iptables::iptables_restore(&svcs, &node);
        ns.run_stdin(
            backend.restore(),
            &["--test", "--noflush"],
            Some(input.as_bytes()),
        )
        .context("iptables-restore --test")?;

        let dt = apply_iptables(&ns, backend, &svcs, &node)?;
        let save = ns.run(backend.save(), &[])?;
        let dnat = save.lines().filter(|l| l.contains("-j DNAT")).count();
        ensure!(
            dnat == 4 * n,
            "{tag}: expected {} DNAT rules, got {dnat}",
            4 * n
        );
        ensure!(save.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        ensure!(save.contains(
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        ensure!(save.contains("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"));
        ensure!(save.contains("-j MASQUERADE --random-fully"));
        ensure!(save.contains("-A KUBE-NODEPORTS"));
        ensure!(
            save.contains("--probability 0.25000000000"),
            "iptables-save prints 11 decimals"
        );
        println!(
            "{tag}: {} restore of {n} services ({} bytes) took {dt:?}",
            backend.restore(),
            input.len()
        );

        cleanup_iptables(&ns, backend, &svcs, &node)?;
        let save = ns.run(backend.save(), &[])?;
        ensure!(
            !save.contains("KUBE-"),
            "{tag}: leftovers after cleanup:\n{save}"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root, iptables-nft; creates network namespaces"]
fn iptables_nft_rules_load() -> Result<()> {
    check_iptables_backend(Backend::Nft, "iptnft")
}

#[test]
#[ignore = "needs root, iptables-legacy; creates network namespaces"]
fn iptables_legacy_rules_load() -> Result<()> {
    if !have("iptables-legacy-restore") {
        println!("iptables-legacy-restore not installed; skipping");
        return Ok(());
    }
    check_iptables_backend(Backend::Legacy, "iptleg")
}

#[test]
#[ignore = "needs root, nft; creates network namespaces"]
fn nft_rules_load() -> Result<()> {
    for n in [1usize, 1000] {
        let node = node_for(n);
        let ns = Netns::create(&ns_name(&format!("nft{n}")))?;
        let svcs = services_np(n, true);
        let script = nftables::nft_script(&svcs, &node);
        ns.run_stdin("nft", &["-c", "-f", "-"], Some(script.as_bytes()))
            .context("nft -c -f")?;
        let t = Instant::now();
        ns.run_stdin("nft", &["-f", "-"], Some(script.as_bytes()))
            .context("nft -f")?;
        let dt = t.elapsed();
        println!(
            "nft -f of {n} services ({} bytes) took {dt:?}",
            script.len()
        );

        let listing = ns.run("nft", &["list", "table", "ip", "kube-proxy"])?;
        let chains = listing
            .lines()
            .filter(|l| l.trim_start().starts_with("chain service-") && l.contains('/'))
            .count();
        ensure!(chains == n, "expected {n} service chains, got {chains}");
        let first = nft_service_chain_base(&svcs[0]);
        ensure!(listing.contains(&format!("chain service-{first} {{")));
        ensure!(listing.contains("numgen random mod 4 vmap"));
        ensure!(listing.contains("type nat hook prerouting priority dstnat; policy accept;"));
        ensure!(listing.contains("masquerade fully-random"));
        ensure!(listing.contains("chain external-"));

        ns.run("nft", &nftables::nft_cleanup_args())?;
        let tables = ns.run("nft", &["list", "tables"])?;
        ensure!(
            !tables.contains("kube-proxy"),
            "table left behind: {tables}"
        );
    }
    Ok(())
}

/// pod netns -> node netns (rules) -> ext netns (the "external" endpoints).
/// ext has no route back to the pod CIDR, so a reply only arrives if the
/// node masqueraded the connection to its egress IP 192.168.50.1.
struct Topology {
    pod: Netns,
    node: Netns,
    ext: Netns,
}

fn topology(tag: &str) -> Result<Topology> {
    let pod = Netns::create(&ns_name(&format!("{tag}-pod")))?;
    let node = Netns::create(&ns_name(&format!("{tag}-node")))?;
    let mut ext = Netns::create(&ns_name(&format!("{tag}-ext")))?;
    node.ip(&[
        "link",
        "add",
        "n0",
        "type",
        "veth",
        "peer",
        "name",
        "p0",
        "netns",
        pod.name(),
    ])?;
    node.ip(&[
        "link",
        "add",
        "n1",
        "type",
        "veth",
        "peer",
        "name",
        "e1",
        "netns",
        ext.name(),
    ])?;
    pod.ip(&["addr", "add", "10.244.1.2/24", "dev", "p0"])?;
    pod.ip(&["link", "set", "p0", "up"])?;
    pod.ip(&["route", "add", "default", "via", "10.244.1.1"])?;
    node.ip(&["addr", "add", "10.244.1.1/24", "dev", "n0"])?;
    node.ip(&["addr", "add", "192.168.50.1/24", "dev", "n1"])?;
    node.ip(&["link", "set", "n0", "up"])?;
    node.ip(&["link", "set", "n1", "up"])?;
    node.ip(&["route", "add", "203.0.113.0/24", "via", "192.168.50.2"])?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    ext.ip(&["addr", "add", "192.168.50.2/24", "dev", "e1"])?;
    ext.ip(&["link", "set", "e1", "up"])?;
    for i in 11..=14 {
        ext.ip(&["addr", "add", &format!("203.0.113.{i}/32"), "dev", "lo"])?;
    }
    ext.spawn(
        "socat",
        &[
            "TCP-LISTEN:8443,fork,reuseaddr",
            "SYSTEM:echo $SOCAT_SOCKADDR $SOCAT_PEERADDR",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(Topology { pod, node, ext })
}

/// Connects `tries` times from the pod to 10.96.0.10:443 and returns
/// `(endpoint that answered, source address the endpoint saw)` pairs.
fn probe(t: &Topology, tries: usize) -> Result<Vec<(String, String)>> {
    let mut seen = Vec::new();
    for _ in 0..tries {
        let out = t.pod.run(
            "socat",
            &[
                "-T",
                "3",
                "-u",
                "TCP:10.96.0.10:443,connect-timeout=3",
                "STDOUT",
            ],
        )?;
        let mut it = out.split_whitespace();
        let (Some(local), Some(peer)) = (it.next(), it.next()) else {
            anyhow::bail!("unexpected answer {out:?}");
        };
        seen.push((local.to_string(), peer.to_string()));
    }
    Ok(seen)
}

fn check_datapath(t: &Topology) -> Result<()> {
    let seen = probe(t, 24)?;
    for (local, peer) in &seen {
        ensure!(
            local.starts_with("203.0.113.1"),
            "not DNATed to an endpoint: {local}"
        );
        ensure!(
            peer == "192.168.50.1",
            "not masqueraded to the node IP: {peer}"
        );
    }
    let mut distinct: Vec<&String> = seen.iter().map(|(l, _)| l).collect();
    distinct.sort();
    distinct.dedup();
    ensure!(distinct.len() >= 2, "no load balancing: {distinct:?}");
    println!("endpoints hit: {distinct:?}, source seen by endpoint: 192.168.50.1");
    Ok(())
}

#[test]
#[ignore = "needs root, iptables-nft, socat; creates network namespaces"]
fn iptables_datapath_dnat_and_masquerade() -> Result<()> {
    let t = topology("ipt")?;
    let node = node();
    // 1000 services so the target is one of many (and large-cluster mode is on).
    let svcs = services(1000);
    for (k, v) in kube_proxy_sysctls(&node, ProxyMode::Iptables) {
        t.node.sysctl(k, v)?;
    }
    apply_iptables(&t.node, Backend::Nft, &svcs, &node)?;
    check_datapath(&t)
}

#[test]
#[ignore = "needs root, nft, socat; creates network namespaces"]
fn nft_datapath_dnat_and_masquerade() -> Result<()> {
    let t = topology("nft")?;
    let node = node();
    let svcs = services(1000);
    let script = nftables::nft_script(&svcs, &node);
    t.node
        .run_stdin("nft", &["-f", "-"], Some(script.as_bytes()))?;
    check_datapath(&t)
}

fn env_list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Timings for the report. Knobs (comma-separated):
/// `XK_GEN_SIZES` (default `10000,100000`), `XK_APPLY_SIZES` (default `1000`),
/// `XK_APPLY_MODES` (default `iptables-legacy,iptables-nft,nft`).
/// Beware: iptables-nft-restore of 10k services takes many minutes here.
#[test]
#[ignore = "needs root; slow; prints timings"]
fn timings() -> Result<()> {
    let node = node();
    for n in env_list("XK_GEN_SIZES", "10000,100000") {
        let n: usize = n.parse()?;
        let svcs = services(n);
        let t = Instant::now();
        let ipt = iptables::iptables_restore(&svcs, &node);
        let d_ipt = t.elapsed();
        let t = Instant::now();
        let nft = nftables::nft_script(&svcs, &node);
        let d_nft = t.elapsed();
        println!(
            "generate {n}: iptables {d_ipt:?} ({} MB), nft {d_nft:?} ({} MB)",
            ipt.len() >> 20,
            nft.len() >> 20
        );
    }
    for n in env_list("XK_APPLY_SIZES", "1000") {
        let n: usize = n.parse()?;
        let svcs = services(n);
        for mode in env_list("XK_APPLY_MODES", "iptables-legacy,iptables-nft,nft") {
            let ns = Netns::create(&ns_name(&format!("t{n}{mode}")))?;
            let dt = match mode.as_str() {
                "iptables-nft" => apply_iptables(&ns, Backend::Nft, &svcs, &node)?,
                "iptables-legacy" => apply_iptables(&ns, Backend::Legacy, &svcs, &node)?,
                "nft" => {
                    let script = nftables::nft_script(&svcs, &node);
                    let t = Instant::now();
                    ns.run_stdin("nft", &["-f", "-"], Some(script.as_bytes()))?;
                    t.elapsed()
                }
                other => anyhow::bail!("unknown mode {other}"),
            };
            println!("apply {n} services: {mode} {dt:?}");
        }
    }
    Ok(())
}

/// Writes the generated inputs for `XK_DUMP_SIZE` (default 1000) services to
/// `XK_DUMP_DIR` (default /tmp): `kube-proxy-<n>.iptables-setup.sh`,
/// `kube-proxy-<n>.iptables-restore` and `kube-proxy-<n>.nft`, for manual
/// experiments (`iptables-restore -w 5 -W 100000 --noflush --counters < ..`).
#[test]
#[ignore = "writes files; manual helper"]
fn dump_inputs() -> Result<()> {
    let n: usize = std::env::var("XK_DUMP_SIZE")
        .unwrap_or_else(|_| "1000".into())
        .parse()?;
    let dir = std::env::var("XK_DUMP_DIR").unwrap_or_else(|_| "/tmp".into());
    let node = node();
    let svcs = services(n);
    let setup: String = iptables::setup_commands(&node)
        .iter()
        .map(|c| {
            let quoted: Vec<String> = c
                .args
                .iter()
                .map(|a| {
                    if a.contains(' ') {
                        format!("'{a}'")
                    } else {
                        a.clone()
                    }
                })
                .collect();
            format!(
                "iptables {}{}\n",
                quoted.join(" "),
                if c.may_fail { " || true" } else { "" }
            )
        })
        .collect();
    let base = Path::new(&dir).join(format!("kube-proxy-{n}"));
    std::fs::write(base.with_extension("iptables-setup.sh"), setup)?;
    std::fs::write(
        base.with_extension("iptables-restore"),
        iptables::iptables_restore(&svcs, &node),
    )?;
    std::fs::write(
        base.with_extension("nft"),
        nftables::nft_script(&svcs, &node),
    )?;
    println!("wrote {}.*", base.display());
    Ok(())
}
