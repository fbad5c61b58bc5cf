//! `cargo xtask bench`: extproxy measured against the real kube-proxy (iptables and nftables
//! modes, programmed from a real API server) and against no proxy at all, in one run on one
//! machine. Writes bench-results/bench.json, SVG plots and BENCHMARKS.md.

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::{
    bench::{iptables, kubeproxy, nftables},
    workspace_root,
};

pub struct Opts {
    pub quick: bool,
    pub suites: Vec<String>,
}

const SUITES: [&str; 5] = [
    "per-packet",
    "control-plane",
    "traffic",
    "cluster-egress",
    "health",
];

pub fn main(args: &[String]) -> anyhow::Result<()> {
    let mut opts = Opts {
        quick: false,
        suites: SUITES.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--report" => {
                // Re-render BENCHMARKS.md from the last run's records.
                let path = workspace_root().join("bench-results/bench.json");
                let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
                let records: Vec<Value> = serde_json::from_slice(&bytes)?;
                crate::report::write(&records, opts.quick, Duration::ZERO)?;
                println!("BENCHMARKS.md re-rendered from {}", path.display());
                return Ok(());
            }
            "--only" => {
                let list = it.next().context("--only SUITE[,SUITE]")?;
                opts.suites = list.split(',').map(str::to_owned).collect();
                for s in &opts.suites {
                    ensure!(
                        SUITES.contains(&s.as_str()),
                        "unknown suite {s}; suites: {}",
                        SUITES.join(", ")
                    );
                }
            }
            other => {
                bail!("bench: unknown option {other:?} (use --quick, --only SUITES, --report)")
            }
        }
    }
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "bench needs root: run `sudo -E cargo xtask bench`"
    );
    let started = Instant::now();
    let bin = crate::build_agent(true)?;
    let mut records: Vec<Value> = Vec::new();
    let want = |s: &str| opts.suites.iter().any(|x| x == s);
    if want("per-packet") {
        records.extend(per_packet(&opts)?);
    }
    if want("control-plane") {
        records.extend(control_plane(&opts, &bin)?);
    }
    if want("traffic") {
        records.extend(traffic(&opts, &bin)?);
    }
    if want("cluster-egress") {
        records.extend(cluster_egress(&opts, &bin)?);
    }
    if want("health") {
        let rounds = if opts.quick { 1 } else { 3 };
        records.extend(crate::bench::health::run(rounds, &bin)?);
    }
    let elapsed = started.elapsed();
    let out = workspace_root().join("bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("bench.json"), serde_json::to_vec_pretty(&records)?)?;
    crate::report::write(&records, opts.quick, elapsed)?;
    println!(
        "bench done in {:.0} s: BENCHMARKS.md, docs/bench/*.svg, bench-results/bench.json",
        elapsed.as_secs_f64()
    );
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// Per-packet cost: BPF_PROG_TEST_RUN on the real programs (tests/benches/datapath.rs)
// -------------------------------------------------------------------------------------------------

fn per_packet(opts: &Opts) -> anyhow::Result<Vec<Value>> {
    let (runs, rounds) = if opts.quick {
        ("100000", "3")
    } else {
        ("200000", "5")
    };
    println!("== per-packet cost (BPF_PROG_TEST_RUN, {runs} runs x {rounds} rounds per figure)");
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "bench",
            "-q",
            "-p",
            "extproxy-tests",
            "--bench",
            "datapath",
            "--",
        ])
        .args([
            "--runs",
            runs,
            "--rounds",
            rounds,
            "--sizes",
            "1,1000,10000,100000",
        ])
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .context("cargo bench")?;
    let mut out = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            out.push(json!({
                "suite": "per-packet",
                "measure": v["metric"],
                "contender": "extproxy",
                "services": v["services"],
                "round": v["round"],
                "value": v["median_ns"],
                "unit": "ns",
                "mean": v["mean_ns"],
            }));
        }
    }
    ensure!(child.wait()?.success(), "the per-packet benchmark failed");
    Ok(out)
}

// -------------------------------------------------------------------------------------------------
// Control plane: cold start, change-to-map latency, memory and CPU; kube-proxy's apply times
// -------------------------------------------------------------------------------------------------

const ENDPOINTS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(203, 0, 113, 7),
    Ipv4Addr::new(203, 0, 113, 8),
    Ipv4Addr::new(203, 0, 113, 9),
    Ipv4Addr::new(203, 0, 113, 10),
];

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i as u32)
}

/// One manifest per Service (Service and EndpointSlice in a List), optionally with an externalIP.
fn service_manifest(i: usize, external_ip: Option<Ipv4Addr>) -> String {
    let ext = external_ip
        .map(|ip| format!(r#","externalIPs":["{ip}"]"#))
        .unwrap_or_default();
    let eps: Vec<String> = ENDPOINTS
        .iter()
        .map(|e| format!(r#"{{"addresses":["{e}"]}}"#))
        .collect();
    format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[
{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"svc-{i}","namespace":"bench"}},"spec":{{"clusterIP":"{}","ports":[{{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"}}]{ext}}}}},
{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{"name":"svc-{i}-1","namespace":"bench","labels":{{"kubernetes.io/service-name":"svc-{i}"}}}},"addressType":"IPv4","ports":[{{"name":"http","port":8080,"protocol":"TCP"}}],"endpoints":[{}]}}]}}
"#,
        cluster_ip(i),
        eps.join(",")
    )
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn control_plane(opts: &Opts, bin: &Path) -> anyhow::Result<Vec<Value>> {
    let sizes: &[usize] = if opts.quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let changes = if opts.quick { 100 } else { 400 };
    let mut out = Vec::new();
    for &n in sizes {
        println!("== control plane: {n} Services x 4 endpoints");
        out.extend(agent_control_plane(bin, n, changes)?);
        out.extend(kube_proxy_apply(n, opts.quick)?);
    }
    Ok(out)
}

fn record(
    suite: &str,
    measure: &str,
    contender: &str,
    services: usize,
    value: f64,
    unit: &str,
) -> Value {
    json!({"suite": suite, "measure": measure, "contender": contender, "services": services, "round": 0, "value": value, "unit": unit})
}

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// utime + stime in clock ticks; 0 once the process is gone.
fn proc_cpu_ticks(pid: u32) -> u64 {
    crate::bench::cpu::process_ticks(&pid.to_string()).unwrap_or(0)
}

fn ticks_per_sec() -> f64 {
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

fn agent_control_plane(bin: &Path, n: usize, changes: usize) -> anyhow::Result<Vec<Value>> {
    use testbed::topo::Topology;
    let topo = Topology::new("bcp");
    let manifests = topo.manifests();
    for i in 0..n {
        std::fs::write(
            manifests.join(format!("svc-{i}.json")),
            service_manifest(i, None),
        )?;
    }
    let pow2 = |v: usize| (v.next_power_of_two() as u32).max(1024);
    let log = topo.dir.join("agent.log");
    let start = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", topo.node.name))
        .arg(bin)
        .args(["run", "--iface", "up0", "--manifests"])
        .arg(&manifests)
        .arg("--pin-dir")
        .arg(topo.pin_dir())
        .arg("--state-dir")
        .arg(topo.dir.join("state"))
        .args([
            "--max-services",
            &pow2(n * 2).to_string(),
            "--max-frontends",
            &pow2(n * 4).to_string(),
        ])
        .args(["--max-backends", &pow2(n * 8).to_string()])
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::options().append(true).open(&log)?)
        .spawn()?;
    let pid = child.id();
    let result = (|| -> anyhow::Result<Vec<Value>> {
        let text = wait_log(&log, "extproxy is running", Duration::from_secs(300))?;
        let cold = start.elapsed().as_secs_f64() * 1e3;
        let programmed = text
            .lines()
            .find(|l| l.contains("programmed ") && l.contains(" service port(s)"))
            .and_then(|l| l.split(" in ").last())
            .and_then(|s| s.trim_end_matches(" ms").trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        std::thread::sleep(Duration::from_secs(2));
        let rss_idle = proc_rss_kib(pid) as f64 / 1024.0;
        let t0 = proc_cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(3));
        let cpu_idle = (proc_cpu_ticks(pid) - t0) as f64 / ticks_per_sec() / 3.0 * 100.0;

        // Change latency: a Service gains or loses an externalIP; time from the manifest rename
        // to the frontend appearing in (or leaving) the pinned FRONTENDS map.
        let frontends = open_frontends(&topo.pin_dir())?;
        let target = n / 2;
        let path = manifests.join(format!("svc-{target}.json"));
        let ext_ip = Ipv4Addr::new(192, 0, 2, 77);
        let key = proxy_common::FrontendKey {
            addr: proxy_common::Addr::from(ext_ip),
            port: 80u16.to_be(),
            proto: proxy_common::PROTO_TCP,
            pad: 0,
        };
        let mut latencies = Vec::with_capacity(changes);
        let mut peak_rss = rss_idle;
        let c0 = proc_cpu_ticks(pid);
        let churn_start = Instant::now();
        for i in 0..changes {
            let present = i % 2 == 0;
            let t = Instant::now();
            write_atomically(&path, &service_manifest(target, present.then_some(ext_ip)))?;
            loop {
                if frontends.get(&key, 0).is_ok() == present {
                    break;
                }
                ensure!(
                    t.elapsed() < Duration::from_secs(10),
                    "change {i} never reached the maps"
                );
                std::thread::sleep(Duration::from_micros(20));
            }
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
            peak_rss = peak_rss.max(proc_rss_kib(pid) as f64 / 1024.0);
            // A change every 10 ms: the rate kube-proxy's minSyncPeriod would batch a second of.
            std::thread::sleep(Duration::from_millis(10));
        }
        let churn_secs = churn_start.elapsed().as_secs_f64();
        let cpu_churn = (proc_cpu_ticks(pid) - c0) as f64 / ticks_per_sec() / churn_secs * 100.0;
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "  extproxy: cold start {cold:.0} ms (maps programmed in {programmed:.0} ms), RSS {rss_idle:.0} MiB idle / {peak_rss:.0} MiB churning, CPU {cpu_idle:.1}% idle / {cpu_churn:.1}% churning, change p50 {:.2} ms p99 {:.2} ms",
            pct(0.5),
            pct(0.99)
        );
        let c = "extproxy";
        let cp = "control-plane";
        Ok(vec![
            record(cp, "cold_start_ms", c, n, cold, "ms"),
            record(cp, "programming_ms", c, n, programmed, "ms"),
            record(cp, "change_p50_ms", c, n, pct(0.5), "ms"),
            record(cp, "change_p99_ms", c, n, pct(0.99), "ms"),
            record(cp, "rss_idle_mib", c, n, rss_idle, "MiB"),
            record(cp, "rss_churn_mib", c, n, peak_rss, "MiB"),
            record(cp, "cpu_idle_pct", c, n, cpu_idle, "%"),
            record(cp, "cpu_churn_pct", c, n, cpu_churn, "%"),
        ])
    })();
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let _ = child.wait();
    result
}

fn open_frontends(
    pin_dir: &Path,
) -> anyhow::Result<
    aya::maps::HashMap<aya::maps::MapData, proxy_common::FrontendKey, proxy_common::FrontendValue>,
> {
    let data = aya::maps::MapData::from_pin(pin_dir.join(proxy_common::MAP_FRONTENDS))?;
    Ok(aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?)
}

fn wait_log(log: &Path, needle: &str, timeout: Duration) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        ensure!(
            start.elapsed() < timeout,
            "agent did not get to {needle:?} in {timeout:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// kube-proxy's cost of programming the same Services: one full sync through
/// iptables-restore (legacy and nft backends) and `nft -f`, as it does at start.
fn kube_proxy_apply(n: usize, quick: bool) -> anyhow::Result<Vec<Value>> {
    let services = kubeproxy::synthetic_services(&kubeproxy::SyntheticSpec {
        count: n,
        namespace: "bench".into(),
        first_cluster_ip: cluster_ip(0),
        port: 80,
        port_name: "http".into(),
        protocol: kubeproxy::Protocol::Tcp,
        endpoints_per_service: 4,
        endpoint_pool: ENDPOINTS.iter().map(|e| (*e, 8080)).collect(),
        first_node_port: None,
    });
    let node = kubeproxy::NodeConfig::new(Ipv4Addr::new(10, 0, 0, 1));
    let mut out = Vec::new();
    // iptables-nft-restore of kube-proxy's 10k-Service ruleset took 13.5 minutes here and nft -f
    // 81 s: measured above 1k only in the full run (nft) or not at all (iptables-nft).
    for (name, backend) in [
        ("iptables-legacy", iptables::Backend::Legacy),
        ("iptables-nft", iptables::Backend::Nft),
    ] {
        if backend == iptables::Backend::Nft && n > 1_000 {
            continue;
        }
        let ns = testbed::netns::NamedNetns::new("xbapply");
        for cmd in iptables::setup_commands(&node) {
            let _ = ns.command(backend.iptables()).args(&cmd.args).output();
        }
        let input = iptables::iptables_restore(&services, &node);
        let mut cmd = ns.command(backend.restore());
        cmd.args(iptables::RESTORE_ARGS).stdout(Stdio::null());
        out.push(full_sync(
            cmd,
            &input,
            name,
            n,
            &format!("{name} restore failed"),
        )?);
    }
    if n <= 1_000 || !quick {
        let ns = testbed::netns::NamedNetns::new("xbapply");
        let script = nftables::nft_script(&services, &node);
        let mut cmd = ns.command("nft");
        cmd.args(["-f", "-"]);
        out.push(full_sync(cmd, &script, "nftables", n, "nft -f failed")?);
    }
    Ok(out)
}

/// Times one kube-proxy full sync: `cmd` fed `input` on its stdin.
fn full_sync(
    mut cmd: Command,
    input: &str,
    contender: &str,
    n: usize,
    failed: &str,
) -> anyhow::Result<Value> {
    let t = Instant::now();
    let mut child = cmd.stdin(Stdio::piped()).spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes())?;
    drop(child.stdin.take());
    ensure!(child.wait()?.success(), "{failed}");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    println!("  kube-proxy {contender}: full sync {ms:.0} ms");
    Ok(record(
        "control-plane",
        "kube_proxy_sync_ms",
        contender,
        n,
        ms,
        "ms",
    ))
}

// -------------------------------------------------------------------------------------------------
// Traffic through a Service: extproxy, iptables, nftables, direct
// -------------------------------------------------------------------------------------------------

fn traffic(opts: &Opts, bin: &Path) -> anyhow::Result<Vec<Value>> {
    use crate::bench::traffic::{self, TrafficOpts};
    // The real kube-proxy, etcd and kube-apiserver; without them the Kubernetes contenders are
    // reported as not run.
    let k8s = crate::k8s::binaries(&workspace_root())?;
    let mut topts = if opts.quick {
        TrafficOpts::quick(bin.to_owned(), k8s)
    } else {
        TrafficOpts::full(bin.to_owned(), k8s)
    };
    topts.apply_env()?;
    println!(
        "== traffic through a Service: extproxy, the real kube-proxy (iptables, nftables), direct"
    );
    let results = traffic::run(&topts)?;
    let mut out = Vec::new();
    for r in &results.records {
        let mut v = serde_json::to_value(r)?;
        v["suite"] = json!("traffic");
        out.push(v);
    }
    for f in &results.fills {
        let mut v = serde_json::to_value(f)?;
        v["suite"] = json!("traffic-setup");
        v["measure"] = json!("api_fill");
        out.push(v);
    }
    Ok(out)
}

// -------------------------------------------------------------------------------------------------
// Cluster egress: a flow through the gateway node vs the same Service served locally vs no proxy
// -------------------------------------------------------------------------------------------------

fn cluster_egress(opts: &Opts, bin: &Path) -> anyhow::Result<Vec<Value>> {
    use crate::bench::traffic::egress::{self, EgressOpts, Path as EgressPath};
    let mut eopts = if opts.quick {
        EgressOpts::quick(bin.to_owned())
    } else {
        EgressOpts::full(bin.to_owned())
    };
    eopts.apply_env()?;
    println!(
        "== cluster egress: pod -> Service through the gateway node, served locally, direct \
         ({} round(s))",
        eopts.rounds
    );
    let records = egress::run(&eopts)?;
    let mut out = Vec::new();
    for r in &records {
        let mut v = serde_json::to_value(r)?;
        v["suite"] = json!(egress::SUITE);
        out.push(v);
    }
    // The ratios the section is for, medians over rounds.
    let median = |path: EgressPath, measure: crate::bench::traffic::Measure| {
        let mut v: Vec<f64> = records
            .iter()
            .filter(|r| r.contender == path && r.measure == measure && r.value.is_finite())
            .map(|r| r.value)
            .collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    for measure in egress::MEASURES {
        let gateway = median(EgressPath::Gateway, measure);
        let ratio = |other: EgressPath| match (gateway, median(other, measure)) {
            (Some(g), Some(o)) if o > 0.0 => format!("{:.2}x", g / o),
            _ => "-".into(),
        };
        println!(
            "  {:<20} gateway/local {}  gateway/direct {}  ({})",
            measure.name(),
            ratio(EgressPath::Local),
            ratio(EgressPath::Direct),
            measure.unit()
        );
    }
    Ok(out)
}
