//! BENCHMARKS.md and its charts, from the records of one `cargo xtask bench` run.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde_json::Value;

use crate::{
    plot::{Series, line_chart},
    workspace_root,
};

/// Median (and spread) over rounds of one (suite, measure, contender, services) cell, and what
/// kept rounds from giving a value.
#[derive(Clone, Debug, Default)]
pub struct Cell {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Rounds that gave a value.
    pub rounds: usize,
    /// Operations (samples, connections, ...) over those rounds.
    pub count: u64,
    /// Why the contender was not run at this size.
    pub not_run: Option<String>,
    /// Why rounds failed (one entry per failed round).
    pub failed: Vec<String>,
    /// Failed operations and stalled connections, summed over rounds.
    pub errors: u64,
    pub stalled: Option<u64>,
    pub offered: Option<f64>,
    pub note: Option<String>,
    pub detail: Option<String>,
    pub flags: Vec<String>,
}

impl Cell {
    fn has_value(&self) -> bool {
        self.rounds > 0 && self.median.is_finite()
    }
}

type Key = (String, String, String, u64);

fn str_of(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_owned()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn cells(records: &[Value]) -> BTreeMap<Key, Cell> {
    let mut groups: BTreeMap<Key, Vec<&Value>> = BTreeMap::new();
    for r in records {
        let key = (
            str_of(r, "suite"),
            str_of(r, "measure"),
            str_of(r, "contender"),
            r["services"].as_u64().unwrap_or(0),
        );
        groups.entry(key).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|(k, rs)| {
            let valid: Vec<&&Value> = rs
                .iter()
                .filter(|r| r["not_run"].is_null() && r["failed"].is_null())
                .filter(|r| r["value"].as_f64().is_some_and(f64::is_finite))
                .collect();
            let vals: Vec<f64> = valid.iter().filter_map(|r| r["value"].as_f64()).collect();
            let p50: Vec<f64> = valid.iter().filter_map(|r| r["p50_us"].as_f64()).collect();
            let p99: Vec<f64> = valid.iter().filter_map(|r| r["p99_us"].as_f64()).collect();
            let stalled: Vec<u64> = valid.iter().filter_map(|r| r["stalled"].as_u64()).collect();
            let first = |field: &str| rs.iter().find_map(|r| r[field].as_str().map(str::to_owned));
            let cell = Cell {
                median: median(vals.clone()),
                min: vals.iter().cloned().fold(f64::INFINITY, f64::min),
                max: vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                p50_us: (!p50.is_empty()).then(|| median(p50)),
                p99_us: (!p99.is_empty()).then(|| median(p99)),
                rounds: vals.len(),
                count: valid.iter().filter_map(|r| r["count"].as_u64()).sum(),
                not_run: first("not_run"),
                failed: rs
                    .iter()
                    .filter_map(|r| r["failed"].as_str().map(str::to_owned))
                    .collect(),
                errors: valid.iter().filter_map(|r| r["errors"].as_u64()).sum(),
                stalled: (!stalled.is_empty()).then(|| stalled.iter().sum()),
                offered: valid.iter().find_map(|r| r["offered"].as_f64()),
                note: valid
                    .iter()
                    .find_map(|r| r["note"].as_str().map(str::to_owned)),
                detail: valid
                    .iter()
                    .find_map(|r| r["detail"].as_str().map(str::to_owned)),
                flags: rs
                    .iter()
                    .find_map(|r| r["flags"].as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|f| f.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            (k, cell)
        })
        .collect()
}

fn get<'a>(
    c: &'a BTreeMap<Key, Cell>,
    suite: &str,
    measure: &str,
    contender: &str,
    n: u64,
) -> Option<&'a Cell> {
    c.get(&(
        suite.to_owned(),
        measure.to_owned(),
        contender.to_owned(),
        n,
    ))
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn with_spread(c: &Cell) -> String {
    if (c.max - c.min).abs() < f64::EPSILON || !c.min.is_finite() {
        num(c.median)
    } else {
        format!("{} ({}–{})", num(c.median), num(c.min), num(c.max))
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map(|kib| format!("{:.0} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| {
                l.trim_start_matches("PRETTY_NAME=")
                    .trim_matches('"')
                    .to_owned()
            })
        })
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {mem} memory; Linux {} ({os})",
        kernel.trim()
    )
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
    NotMeasured,
    /// Numbers asked for without a bar to clear.
    Reported,
}

struct Target {
    what: String,
    measured: String,
    verdict: Verdict,
}

impl Target {
    fn new(what: impl Into<String>, measured: impl Into<String>, met: Option<bool>) -> Self {
        Target {
            what: what.into(),
            measured: measured.into(),
            verdict: match met {
                Some(true) => Verdict::Met,
                Some(false) => Verdict::Missed,
                None => Verdict::NotMeasured,
            },
        }
    }
}

fn verdict(t: &Target) -> &'static str {
    match t.verdict {
        Verdict::Met => "met",
        Verdict::Missed => "**missed**",
        Verdict::NotMeasured => "not measured",
        Verdict::Reported => "reported",
    }
}

/// The traffic contenders in report order, with what each is.
const CONTENDERS: [(&str, &str); 11] = [
    (
        "extproxy",
        "the agent with its defaults, Kubernetes mode: `extproxy run --kubeconfig K --node-name N \
         --iface up0` on Services labelled `service.kubernetes.io/service-proxy-name: extproxy`",
    ),
    (
        "extproxy-tuned",
        "the same with the flags shown (a production node would reserve the port range)",
    ),
    (
        "extproxy-manifests",
        "the agent with its defaults in manifest mode (a folder of JSON files)",
    ),
    (
        "kube-proxy-iptables",
        "the real kube-proxy v1.36.2, `--proxy-mode iptables` (iptables-nft here), defaults: \
         pods' own traffic is not masqueraded, the endpoints see the pod's address",
    ),
    (
        "kube-proxy-nftables",
        "the real kube-proxy v1.36.2, `--proxy-mode nftables`, defaults",
    ),
    (
        "kube-proxy-iptables-masquerade-all",
        "kube-proxy iptables mode with `--masquerade-all`: the endpoints see the node's address, \
         as with extproxy",
    ),
    (
        "kube-proxy-nftables-masquerade-all",
        "kube-proxy nftables mode with `--masquerade-all`",
    ),
    (
        "iptables-legacy",
        "kube-proxy's iptables rules written by hand (masqueradeAll), iptables-legacy",
    ),
    ("iptables-nft", "the same rules through iptables-nft"),
    ("nftables", "kube-proxy's nftables rules written by hand"),
    (
        "direct",
        "no proxy: the pod calls the endpoints' own addresses, the node only routes",
    ),
];

const KUBE_PROXIES: [&str; 4] = [
    "kube-proxy-iptables",
    "kube-proxy-nftables",
    "kube-proxy-iptables-masquerade-all",
    "kube-proxy-nftables-masquerade-all",
];

/// Why contenders were not run or failed, numbered once for the whole traffic section and
/// cited in its cells.
#[derive(Default)]
struct Footnotes {
    notes: Vec<String>,
}

impl Footnotes {
    /// Every reason the traffic cells give, in report order.
    fn of_traffic(c: &BTreeMap<Key, Cell>) -> Self {
        let mut notes = Footnotes::default();
        for w in traffic_contenders(c) {
            for ((suite, _, who, _), cell) in c {
                if suite == "traffic" && who == w {
                    for why in cell.not_run.iter().chain(cell.failed.first()) {
                        let why = why.trim().to_owned();
                        if !notes.notes.contains(&why) {
                            notes.notes.push(why);
                        }
                    }
                }
            }
        }
        notes
    }

    fn cite(&self, text: &str) -> usize {
        self.notes
            .iter()
            .position(|n| n == text.trim())
            .map_or(0, |i| i + 1)
    }

    fn write(&self, md: &mut String) {
        for (i, n) in self.notes.iter().enumerate() {
            let _ = writeln!(md, "[{}] {}  ", i + 1, n.replace('\n', " "));
        }
        let _ = writeln!(md);
    }
}

/// A cell's text: its value, or why there is none.
fn cell_text(cell: Option<&Cell>, notes: &Footnotes, value: &dyn Fn(&Cell) -> String) -> String {
    match cell {
        None => "-".into(),
        Some(c) if c.has_value() => {
            let mut text = value(c);
            if !c.failed.is_empty() {
                let n = notes.cite(&c.failed[0]);
                let _ = write!(
                    text,
                    " ({} of {} rounds failed [{n}])",
                    c.failed.len(),
                    c.failed.len() + c.rounds
                );
            }
            text
        }
        Some(c) => {
            if let Some(why) = &c.not_run {
                format!("not run [{}]", notes.cite(why))
            } else if let Some(why) = c.failed.first() {
                format!("**failed** [{}]", notes.cite(why))
            } else {
                "-".into()
            }
        }
    }
}

/// The rows (contenders) the traffic records have, in report order.
fn traffic_contenders(c: &BTreeMap<Key, Cell>) -> Vec<&'static str> {
    CONTENDERS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| c.keys().any(|k| k.0 == "traffic" && k.2 == *name))
        .collect()
}

/// One table: a row per contender, a column per size.
fn contender_table(
    md: &mut String,
    c: &BTreeMap<Key, Cell>,
    measure: &str,
    sizes: &[u64],
    value: &dyn Fn(&Cell) -> String,
) -> bool {
    let notes = Footnotes::of_traffic(c);
    // Only the sizes the measure was taken (or skipped) at.
    let sizes: Vec<u64> = sizes
        .iter()
        .copied()
        .filter(|n| {
            c.keys()
                .any(|k| k.0 == "traffic" && k.1 == measure && k.3 == *n)
        })
        .collect();
    let sizes = &sizes[..];
    let rows: Vec<&str> = traffic_contenders(c)
        .into_iter()
        .filter(|w| {
            sizes
                .iter()
                .any(|n| get(c, "traffic", measure, w, *n).is_some())
        })
        .collect();
    if rows.is_empty() {
        return false;
    }
    let mut head = String::from("| |");
    let mut sep = String::from("|---|");
    for n in sizes {
        let _ = write!(head, " {n} Services |");
        sep.push_str("---|");
    }
    let _ = writeln!(md, "{head}\n{sep}");
    for w in rows {
        let mut line = format!("| {w} |");
        for n in sizes {
            let text = cell_text(get(c, "traffic", measure, w, *n), &notes, value);
            let _ = write!(line, " {text} |");
        }
        let _ = writeln!(md, "{line}");
    }
    let _ = writeln!(md);
    true
}

/// `extproxy ÷ X` for a higher-is-better measure, per size.
fn ratio_table(md: &mut String, c: &BTreeMap<Key, Cell>, measure: &str, sizes: &[u64]) {
    let value = |w: &str, n: u64| {
        get(c, "traffic", measure, w, n)
            .filter(|x| x.has_value())
            .map(|x| x.median)
    };
    let sizes: Vec<u64> = sizes
        .iter()
        .copied()
        .filter(|n| value("extproxy", *n).is_some())
        .collect();
    let sizes = &sizes[..];
    let others: Vec<&str> = std::iter::once("direct")
        .chain(KUBE_PROXIES)
        .filter(|w| sizes.iter().any(|n| value(w, *n).is_some()))
        .collect();
    if others.is_empty() || !sizes.iter().any(|n| value("extproxy", *n).is_some()) {
        return;
    }
    let mut head = String::from("| extproxy ÷ |");
    let mut sep = String::from("|---|");
    for n in sizes {
        let _ = write!(head, " {n} |");
        sep.push_str("---|");
    }
    let _ = writeln!(md, "{head}\n{sep}");
    for w in others {
        let mut line = format!("| {w} |");
        for n in sizes {
            match (value("extproxy", *n), value(w, *n)) {
                (Some(e), Some(o)) if o > 0.0 => {
                    let _ = write!(line, " {:.2}x |", e / o);
                }
                _ => line.push_str(" - |"),
            }
        }
        let _ = writeln!(md, "{line}");
    }
    let _ = writeln!(md);
}

/// Failed and stalled operations beside a rate, when there were any.
fn rate_with_trouble(x: &Cell) -> String {
    let mut s = with_spread(x);
    let mut trouble = Vec::new();
    if x.errors > 0 {
        trouble.push(format!("{} failed", x.errors));
    }
    if let Some(st) = x.stalled.filter(|s| *s > 0) {
        trouble.push(format!("{st} stalled"));
    }
    if !trouble.is_empty() {
        let _ = write!(s, " ({})", trouble.join(", "));
    }
    s
}

fn sizes_of(c: &BTreeMap<Key, Cell>, suite: &str) -> Vec<u64> {
    let mut v: Vec<u64> = c.keys().filter(|k| k.0 == suite).map(|k| k.3).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The value of a traffic cell that has one.
fn tr(c: &BTreeMap<Key, Cell>, measure: &str, who: &str, n: u64) -> Option<f64> {
    get(c, "traffic", measure, who, n)
        .filter(|x| x.has_value())
        .map(|x| x.median)
}

/// Issue 9's bar for a connection rate: at least 0.9x no proxy and above every kube-proxy mode
/// that ran, at every size.
fn rate_target(
    c: &BTreeMap<Key, Cell>,
    measure: &str,
    what: &str,
    sizes: &[u64],
) -> Option<Target> {
    let mut parts = Vec::new();
    let mut met = true;
    let mut any = false;
    for &n in sizes {
        let Some(e) = tr(c, measure, "extproxy", n) else {
            continue;
        };
        any = true;
        let mut part = format!("{n}: {}", num(e));
        if let Some(d) = tr(c, measure, "direct", n) {
            let _ = write!(part, " = {:.2}x direct", e / d);
            met &= e >= 0.9 * d;
        }
        for kp in ["kube-proxy-iptables", "kube-proxy-nftables"] {
            match tr(c, measure, kp, n) {
                Some(v) => {
                    let _ = write!(part, ", {:.2}x {kp}", e / v);
                    met &= e > v;
                }
                None => {
                    let why = match get(c, "traffic", measure, kp, n) {
                        Some(x) if !x.failed.is_empty() => "failed",
                        Some(x) if x.not_run.is_some() => "not run",
                        _ => "not measured",
                    };
                    let _ = write!(part, ", {kp} {why}");
                }
            }
        }
        parts.push(part);
    }
    any.then(|| Target::new(what, parts.join("; "), Some(met)))
}

pub fn write(records: &[Value], quick: bool, elapsed: Duration) -> anyhow::Result<()> {
    let docs = workspace_root().join("docs/bench");
    let md = render(records, quick, elapsed, &docs)?;
    std::fs::write(workspace_root().join("BENCHMARKS.md"), md + ANALYSIS)?;
    Ok(())
}

/// BENCHMARKS.md's generated part; the charts go to `docs`.
fn render(
    records: &[Value],
    quick: bool,
    elapsed: Duration,
    docs: &std::path::Path,
) -> anyhow::Result<String> {
    let c = cells(records);
    std::fs::create_dir_all(docs)?;
    let mut md = String::new();
    let cmd = if quick {
        "sudo -E cargo xtask bench --quick"
    } else {
        "sudo -E cargo xtask bench"
    };
    let _ = writeln!(md, "# Benchmarks\n");
    // `--report` re-renders an earlier run: its duration is not known then.
    let took = if elapsed.is_zero() {
        String::new()
    } else {
        format!(" in {:.0} s", elapsed.as_secs_f64())
    };
    let _ = writeln!(
        md,
        "Generated by `{cmd}` (commit {}){took}. Everything below comes from that one run; \
         the raw records are in `bench-results/bench.json`.\n",
        commit(),
    );
    let _ = writeln!(md, "**Machine:** {}.\n", machine());
    let _ = writeln!(
        md,
        "Every contender runs on this one VM: client, node and endpoints are network namespaces \
         joined by veths and share its cores, so absolute rates are those of a small VM, not of a \
         NIC; the ratios between contenders measured in the same run are the result. The machine's \
         run-to-run noise is about ±15 %.\n"
    );
    let t_sizes = sizes_of(&c, "traffic");
    if let Some(h) = headline(&c, &t_sizes) {
        let _ = writeln!(md, "## Headline\n\n{h}\n");
    }

    // ---------------------------------------------------------------------------------------------
    let pp = |m: &str, n: u64| get(&c, "per-packet", m, "extproxy", n).map(|x| x.median);
    let mut targets = Vec::new();
    if let (Some(a), Some(b)) = (pp("xdp_established", 100_000), pp("xdp_established", 1)) {
        targets.push(Target::new(
            "Per-packet cost at 100k Services within 1.2x of 1 Service (established flow, XDP)",
            format!("{} / {} ns = {:.2}x", num(a), num(b), a / b),
            Some(a / b <= 1.2),
        ));
    }
    if let (Some(a), Some(b)) = (pp("xdp_established", 1), pp("parse_only", 1)) {
        let e = pp("empty_xdp_program", 1).unwrap_or(0.0);
        targets.push(Target::new(
            "Established-flow cost within 2x of the parse-only floor",
            format!(
                "{} / {} ns = {:.1}x ({:.1}x net of the {} ns an empty program costs in the harness)",
                num(a),
                num(b),
                a / b,
                (a - e) / (b - e),
                num(e)
            ),
            Some(a / b <= 2.0),
        ));
    }
    targets.extend(rate_target(
        &c,
        "new_connections_one_endpoint",
        "New TCP connections/s through a Service with one endpoint, sustained: >= 0.9x no proxy \
         and above both kube-proxy modes, at every N",
        &t_sizes,
    ));
    targets.extend(rate_target(
        &c,
        "new_connections",
        "The same with 4 endpoints",
        &t_sizes,
    ));
    {
        let mut parts = Vec::new();
        let mut clean = true;
        for &n in &t_sizes {
            if let Some(x) =
                get(&c, "traffic", "many_clients", "extproxy", n).filter(|x| x.has_value())
            {
                let stalled = x.stalled.unwrap_or(0);
                let offered = x.offered.unwrap_or(f64::NAN);
                clean &= x.errors == 0 && stalled == 0 && x.median >= 0.99 * offered;
                let max = tr(&c, "many_clients_max", "extproxy", n)
                    .map(|v| format!(", as fast as they go {}", num(v)))
                    .unwrap_or_default();
                let one = tr(&c, "new_connections_one_endpoint", "extproxy", n)
                    .map(|v| format!(", one client {}", num(v)))
                    .unwrap_or_default();
                parts.push(format!(
                    "{n}: {} of {} conn/s offered, {} failed, {stalled} stalled{max}{one}",
                    num(x.median),
                    num(offered),
                    x.errors
                ));
            }
        }
        if !parts.is_empty() {
            targets.push(Target::new(
                "200 client addresses behind one egress address calling one endpoint that closes \
                 first, >= 1,000 conn/s offered: no connection fails or stalls (sustainable rates \
                 for many clients and one client beside it)",
                parts.join("; "),
                Some(clean),
            ));
        }
    }
    if let (Some(e), Some(d)) = (
        tr(
            &c,
            "tcp_throughput_offload",
            "extproxy",
            t_sizes.first().copied().unwrap_or(1),
        ),
        tr(
            &c,
            "tcp_throughput_offload",
            "direct",
            t_sizes.first().copied().unwrap_or(1),
        ),
    ) {
        targets.push(Target::new(
            "Single-stream throughput within 10% of no proxy with NIC offloads (TSO/GSO, GRO, \
             partial checksums), no checksum errors after software segmentation",
            format!(
                "{} vs {} Gbit/s direct ({:.0}%), no checksum errors (a run with any fails)",
                num(e),
                num(d),
                e / d * 100.0
            ),
            Some(e >= 0.9 * d),
        ));
    }
    {
        let parts: Vec<String> = t_sizes
            .iter()
            .filter_map(|n| {
                tr(&c, "first_answer", "extproxy", *n).map(|v| format!("{n}: {} ms", num(v)))
            })
            .collect();
        if !parts.is_empty() {
            let met = t_sizes
                .iter()
                .filter_map(|n| tr(&c, "first_answer", "extproxy", *n))
                .all(|v| v <= 1_000.0);
            targets.push(Target::new(
                "First answer within 1 s of start (ANCHORS.md's bar), Kubernetes mode",
                parts.join("; "),
                Some(met),
            ));
        }
    }
    {
        let mut parts = Vec::new();
        for &n in &t_sizes {
            let mut who = Vec::new();
            for w in ["extproxy", "kube-proxy-iptables", "kube-proxy-nftables"] {
                if let Some(x) =
                    get(&c, "traffic", "programming_latency", w, n).filter(|x| x.has_value())
                {
                    who.push(format!(
                        "{w} {} / {} ms",
                        num(x.p50_us.unwrap_or(f64::NAN) / 1e3),
                        num(x.p99_us.unwrap_or(f64::NAN) / 1e3)
                    ));
                }
            }
            if !who.is_empty() {
                parts.push(format!("{n}: {}", who.join(", ")));
            }
        }
        if !parts.is_empty() {
            targets.push(Target {
                what: "Programming latency from an API write to traffic on the new endpoint, \
                       p50 / p99 (issue 13)"
                    .into(),
                measured: parts.join("; "),
                verdict: Verdict::Reported,
            });
        }
    }
    if let (Some(e), Some(d)) = (
        tr(&c, "udp_packets", "extproxy", 1),
        tr(&c, "udp_packets", "direct", 1),
    ) {
        targets.push(Target::new(
            "UDP small-packet rate within 10% of direct (not a stated target; shown for reference)",
            format!("{} vs {} direct ({:.0}%)", num(e), num(d), e / d * 100.0),
            None,
        ));
    }
    // The path's own latency is measured with one request in flight (TRAFFIC.md); with 16 in
    // flight and the CPUs saturated, p99 is queueing on 2 shared cores, shown beside it.
    let worst = t_sizes
        .iter()
        .filter_map(|n| {
            Some((
                *n,
                tr(&c, "request_latency", "extproxy", *n)?,
                tr(&c, "request_latency", "direct", *n)?,
            ))
        })
        .max_by(|a, b| (a.1 / a.2).total_cmp(&(b.1 / b.2)));
    if let Some((n, e, d)) = worst {
        targets.push(Target::new(
            "p99 request latency through a Service within 10% of direct",
            format!(
                "one request in flight, worst size ({n} Services): {} µs vs {} µs direct ({:+.0}%)",
                num(e),
                num(d),
                (e / d - 1.0) * 100.0
            ),
            Some(e <= 1.1 * d),
        ));
    }
    let cp = |m: &str| get(&c, "control-plane", m, "extproxy", 10_000).map(|x| x.median);
    if let Some(v) = cp("cold_start_ms") {
        targets.push(Target::new(
            "10k Services x 4 endpoints programmed from cold in under 1 s (manifest mode)",
            format!(
                "{} ms from process start to serving (maps written in {} ms)",
                num(v),
                num(cp("programming_ms").unwrap_or(f64::NAN))
            ),
            Some(v < 1000.0),
        ));
    }
    if let Some(v) = cp("change_p99_ms") {
        targets.push(Target::new(
            "A manifest change reaches the maps in under 10 ms p99 (10k Services)",
            format!(
                "p50 {} ms, p99 {} ms",
                num(cp("change_p50_ms").unwrap_or(f64::NAN)),
                num(v)
            ),
            Some(v < 10.0),
        ));
    }
    if let Some(v) = cp("rss_idle_mib") {
        targets.push(Target::new(
            "Agent RSS under 64 MiB at 10k Services",
            format!(
                "{} MiB idle, {} MiB churning",
                num(v),
                num(cp("rss_churn_mib").unwrap_or(f64::NAN))
            ),
            Some(v < 64.0),
        ));
    }
    targets.extend(egress_target(&c));
    for (what, measured, met) in crate::bench::health::targets(&c) {
        targets.push(Target::new(what, measured, met));
    }
    let _ = writeln!(md, "## Targets\n\n| target | measured | |\n|---|---|---|");
    for t in &targets {
        let _ = writeln!(md, "| {} | {} | {} |", t.what, t.measured, verdict(t));
    }
    let _ = writeln!(md);

    // ---------------------------------------------------------------------------------------------
    let sizes_of = |suite: &str| sizes_of(&c, suite);
    let pp_sizes = sizes_of("per-packet");
    if !pp_sizes.is_empty() {
        let _ = writeln!(
            md,
            "## Per-packet cost\n\nThe real programs in the kernel (BPF_PROG_TEST_RUN), median ns per \
             packet over the samples of each round; the median of the rounds, with their range. Every \
             sample is one run on a fresh copy of the packet (the kernel reuses one buffer across \
             `repeat` iterations, which would turn a translated packet into someone else's), so each \
             figure includes the harness: the empty XDP program row is that cost alone.\n"
        );
        let metrics = [
            ("empty_xdp_program", "empty XDP program (harness)"),
            ("parse_only", "parse only (the floor)"),
            ("xdp_established", "established flow, XDP"),
            ("xdp_reply", "endpoint reply, XDP"),
            ("xdp_first_packet", "first packet of a flow, XDP"),
            (
                "tc_egress_established",
                "established flow, TC egress (pod to ClusterIP)",
            ),
        ];
        table_by_size(
            &mut md,
            &c,
            "per-packet",
            &pp_sizes,
            &metrics.map(|(m, l)| (m, "extproxy", l)),
        );
        let series: Vec<Series> = metrics[1..]
            .iter()
            .map(|(m, l)| Series {
                name: (*l).split(',').next().unwrap_or(l).to_owned(),
                points: pp_sizes
                    .iter()
                    .filter_map(|n| pp(m, *n).map(|v| (*n as f64, v)))
                    .collect(),
            })
            .collect();
        std::fs::write(
            docs.join("per-packet.svg"),
            line_chart(
                "Per-packet cost vs Services",
                "Services",
                "ns per packet",
                &series,
            ),
        )?;
        let _ = writeln!(md, "![per-packet cost](docs/bench/per-packet.svg)\n");
    }

    // ---------------------------------------------------------------------------------------------
    if !t_sizes.is_empty() {
        traffic_section(&mut md, &c, &t_sizes, records, docs)?;
    }

    // ---------------------------------------------------------------------------------------------
    egress_section(&mut md, &c, records);

    // ---------------------------------------------------------------------------------------------
    let cp_sizes = sizes_of("control-plane");
    if !cp_sizes.is_empty() {
        let _ = writeln!(
            md,
            "## Control plane\n\nThe agent in manifest mode on N Services x 4 endpoints (one JSON \
             file per Service): cold start from process start to serving; a change is one Service \
             gaining or losing an externalIP, timed from the manifest's rename to the frontend \
             appearing in (or leaving) the pinned map, one change every 10 ms. kube-proxy's row is \
             one full sync of the same Services in its layout (what it runs at start and, in \
             iptables mode, on every resync).\n"
        );
        let rows = [
            ("cold_start_ms", "extproxy", "extproxy cold start (ms)"),
            (
                "programming_ms",
                "extproxy",
                "extproxy map programming (ms)",
            ),
            (
                "change_p50_ms",
                "extproxy",
                "extproxy change to map, p50 (ms)",
            ),
            (
                "change_p99_ms",
                "extproxy",
                "extproxy change to map, p99 (ms)",
            ),
            ("rss_idle_mib", "extproxy", "extproxy RSS idle (MiB)"),
            ("rss_churn_mib", "extproxy", "extproxy RSS churning (MiB)"),
            (
                "cpu_idle_pct",
                "extproxy",
                "extproxy CPU idle (% of a core)",
            ),
            (
                "cpu_churn_pct",
                "extproxy",
                "extproxy CPU churning (% of a core)",
            ),
            (
                "kube_proxy_sync_ms",
                "iptables-legacy",
                "kube-proxy iptables-legacy-restore (ms)",
            ),
            (
                "kube_proxy_sync_ms",
                "iptables-nft",
                "kube-proxy iptables-nft-restore (ms)",
            ),
            ("kube_proxy_sync_ms", "nftables", "kube-proxy nft -f (ms)"),
        ];
        table_by_size(&mut md, &c, "control-plane", &cp_sizes, &rows);
    }

    // ---------------------------------------------------------------------------------------------
    if let Some(section) = crate::bench::health::section(&c) {
        md.push_str(&section);
    }
    Ok(md)
}

/// README's headline, from this run's numbers (only those it has).
fn headline(c: &BTreeMap<Key, Cell>, sizes: &[u64]) -> Option<String> {
    let top = *sizes
        .iter()
        .rev()
        .find(|n| tr(c, "new_connections_one_endpoint", "extproxy", **n).is_some())?;
    let mut s = format!(
        "extproxy with its defaults, in Kubernetes mode against a real API server, beside the \
         real kube-proxy v1.36.2 on the same 2-core VM: at {top} Services, {} new TCP \
         connections/s through a ClusterIP with one endpoint, sustained",
        num(tr(c, "new_connections_one_endpoint", "extproxy", top)?)
    );
    if let Some(d) = tr(c, "new_connections_one_endpoint", "direct", top) {
        let _ = write!(
            s,
            " ({:.0}% of no proxy)",
            tr(c, "new_connections_one_endpoint", "extproxy", top)? / d * 100.0
        );
    }
    let kp: Vec<String> = ["kube-proxy-iptables", "kube-proxy-nftables"]
        .iter()
        .map(|w| match tr(c, "new_connections_one_endpoint", w, top) {
            Some(v) => format!("{w} {}", num(v)),
            None => format!("{w} not run at {top}"),
        })
        .collect();
    let _ = write!(s, " ({})", kp.join(", "));
    if let Some(v) = tr(c, "first_answer", "extproxy", top) {
        let _ = write!(s, "; the first answer {} ms after start", num(v));
        for w in ["kube-proxy-iptables", "kube-proxy-nftables"] {
            if let Some(k) = tr(c, "first_answer", w, top) {
                let _ = write!(s, " ({w}: {} ms)", num(k));
            }
        }
    }
    if let Some(x) =
        get(c, "traffic", "programming_latency", "extproxy", top).filter(|x| x.has_value())
    {
        let _ = write!(
            s,
            "; an endpoint change through the API in effect after {} ms p50, {} ms p99",
            num(x.p50_us.unwrap_or(f64::NAN) / 1e3),
            num(x.p99_us.unwrap_or(f64::NAN) / 1e3)
        );
        let kp: Vec<String> = ["kube-proxy-iptables", "kube-proxy-nftables"]
            .iter()
            .filter_map(|w| {
                let (n, x) = sizes.iter().rev().find_map(|n| {
                    Some((
                        *n,
                        get(c, "traffic", "programming_latency", w, *n)
                            .filter(|x| x.has_value())?,
                    ))
                })?;
                Some(format!(
                    "{w} {} / {} ms at {n}",
                    num(x.p50_us.unwrap_or(f64::NAN) / 1e3),
                    num(x.p99_us.unwrap_or(f64::NAN) / 1e3)
                ))
            })
            .collect();
        if !kp.is_empty() {
            let _ = write!(s, " ({})", kp.join(", "));
        }
    }
    if let Some(x) = get(c, "traffic", "many_clients", "extproxy", top).filter(|x| x.has_value()) {
        let _ = write!(
            s,
            "; 200 pods behind the node's address at {} conn/s offered: {} failed, {} stalled",
            num(x.offered.unwrap_or(f64::NAN)),
            x.errors,
            x.stalled.unwrap_or(0)
        );
    }
    let first = sizes.first().copied().unwrap_or(1);
    if let (Some(e), Some(d)) = (
        tr(c, "tcp_throughput_offload", "extproxy", first),
        tr(c, "tcp_throughput_offload", "direct", first),
    ) {
        let _ = write!(
            s,
            "; one TCP stream with NIC offloads at {:.0}% of no proxy, checksums verified after \
             software segmentation",
            e / d * 100.0
        );
    }
    s.push('.');
    Some(s)
}

fn traffic_section(
    md: &mut String,
    c: &BTreeMap<Key, Cell>,
    sizes: &[u64],
    records: &[Value],
    docs: &std::path::Path,
) -> anyhow::Result<()> {
    let _ = writeln!(
        md,
        "## Traffic through a Service\n\nA pod talks to the ClusterIP of the last of N \
         selector-less Services (it has ONE endpoint; the Service before it has four) in the outside \
         namespace; `direct` talks to the endpoints' own addresses. Every run is a fresh topology; \
         the Kubernetes contenders read the same N Services from a real etcd and kube-apiserver. \
         Interleaved contenders, median of rounds (range). A contender that was not run says why. \
         Methodology: [xtask/src/bench/TRAFFIC.md](xtask/src/bench/TRAFFIC.md).\n"
    );
    let _ = writeln!(
        md,
        "| contender | what | flags beyond its defaults |\n|---|---|---|"
    );
    for w in traffic_contenders(c) {
        let what = CONTENDERS
            .iter()
            .find(|(n, _)| *n == w)
            .map(|(_, d)| *d)
            .unwrap_or_default();
        let flags = c
            .iter()
            .find(|(k, _)| k.0 == "traffic" && k.2 == w)
            .map(|(_, x)| x.flags.join(" "))
            .unwrap_or_default();
        let flags = if flags.is_empty() {
            "none".into()
        } else {
            format!("`{flags}`")
        };
        let _ = writeln!(md, "| {w} | {what} | {flags} |");
    }
    let _ = writeln!(md);
    let notes = Footnotes::of_traffic(c);
    if !notes.notes.is_empty() {
        let _ = writeln!(
            md,
            "Not run or failed (the tables below cite these by number):\n"
        );
        notes.write(md);
    }
    let fills: Vec<String> = records
        .iter()
        .filter(|r| r["suite"] == "traffic-setup")
        .map(|r| {
            format!(
                "{}'s API server to {} Services: {} objects in {:.1} s{}",
                r["cluster"].as_str().unwrap_or("?"),
                r["services"],
                r["objects"],
                r["seconds"].as_f64().unwrap_or(f64::NAN),
                r["startup_seconds"]
                    .as_f64()
                    .map(|s| format!(" (etcd and kube-apiserver started in {s:.1} s)"))
                    .unwrap_or_default()
            )
        })
        .collect();
    if !fills.is_empty() {
        let _ = writeln!(
            md,
            "Filling the API servers (24 writes in flight, before any contender starts): {}.\n",
            fills.join("; ")
        );
    }

    let plain = |x: &Cell| with_spread(x);
    let ms = |x: &Cell| with_spread(x);
    let seconds = |m: &str| {
        records
            .iter()
            .find(|r| r["suite"] == "traffic" && r["measure"] == m && r["value"].is_number())
            .and_then(|r| r["seconds"].as_f64())
            .map(|s| format!("{s:.0} s"))
            .unwrap_or_else(|| "-".into())
    };

    let _ = writeln!(
        md,
        "### First answer after start (ms, lower is better)\n\nFrom spawning the proxy to the \
         first connection answered through the one-endpoint Service (probed every 2 ms).\n"
    );
    contender_table(md, c, "first_answer", sizes, &ms);

    let _ = writeln!(
        md,
        "### New TCP connections through the one-endpoint Service (conn/s, {})\n\n16 at a time \
         from the pod's one address, the server closes first; failed and stalled (> 0.9 s: a \
         resent SYN) connections beside the rate. One client's sustainable rate.\n",
        seconds("new_connections_one_endpoint")
    );
    contender_table(
        md,
        c,
        "new_connections_one_endpoint",
        sizes,
        &rate_with_trouble,
    );
    ratio_table(md, c, "new_connections_one_endpoint", sizes);

    let _ = writeln!(
        md,
        "### New TCP connections through the four-endpoint Service (conn/s, {})\n",
        seconds("new_connections")
    );
    contender_table(md, c, "new_connections", sizes, &rate_with_trouble);
    ratio_table(md, c, "new_connections", sizes);
    latency_table(md, c, "new_connections", sizes);
    charts(
        md,
        c,
        "new_connections",
        "New TCP connections",
        "conn/s",
        sizes,
        docs,
    )?;

    let _ = writeln!(
        md,
        "### Many clients behind one egress address\n\n200 client addresses in the pod call the \
         one-endpoint Service, whose endpoint closes first (so it holds the TIME_WAIT), at the \
         offered rate, for {}: completed conn/s of offered, failed, stalled (> 0.9 s). Through \
         extproxy and the masquerading kube-proxy rows they all share the node's address; \
         kube-proxy's defaults keep the pods' own addresses.\n",
        seconds("many_clients")
    );
    let many = |x: &Cell| {
        format!(
            "{} of {}: {} failed, {} stalled",
            with_spread(x),
            num(x.offered.unwrap_or(f64::NAN)),
            x.errors,
            x.stalled.unwrap_or(0)
        )
    };
    contender_table(md, c, "many_clients", sizes, &many);
    let _ = writeln!(
        md,
        "As fast as they go (many clients' sustainable rate, conn/s, {}):\n",
        seconds("many_clients_max")
    );
    contender_table(md, c, "many_clients_max", sizes, &rate_with_trouble);
    ratio_table(md, c, "many_clients_max", sizes);

    let _ = writeln!(
        md,
        "### Programming latency (ms, p50 / p99)\n\nFrom an API write (the one-endpoint \
         Service's EndpointSlice moved to another endpoint, with its trigger-time annotation) to \
         the SYN of the first connection the new endpoint answered, the pod opening one every \
         millisecond; changes 1-2 s apart (kube-proxy's minSyncPeriod is 1 s). Connections that \
         failed while a change was under way are counted beside it (extproxy resets TCP flows to \
         a removed endpoint by design).\n"
    );
    let prog = |x: &Cell| {
        let mut s = format!(
            "{} / {} ({} samples",
            num(x.p50_us.unwrap_or(f64::NAN) / 1e3),
            num(x.p99_us.unwrap_or(f64::NAN) / 1e3),
            x.count
        );
        if x.errors > 0 {
            let how = x
                .detail
                .as_deref()
                .and_then(|d| d.split_once("failed during the switches: "))
                .map(|(_, how)| format!(": {how}"))
                .unwrap_or_default();
            let plural = if x.errors == 1 { "" } else { "s" };
            let _ = write!(s, "; {} connection{plural} failed{how}", x.errors);
        }
        s.push(')');
        s
    };
    contender_table(md, c, "programming_latency", sizes, &prog);
    let own: Vec<String> = c
        .iter()
        .filter(|(k, _)| k.0 == "traffic" && k.1 == "programming_latency")
        .filter_map(|(k, x)| Some(format!("{} at {}: {}", k.2, k.3, x.note.as_ref()?)))
        .collect();
    if !own.is_empty() {
        let _ = writeln!(
            md,
            "Side note, the proxies' own metrics (timed from the trigger-time annotation; \
             kube-proxy's buckets are 0.25 s wide, so these only bound the figures above):\n"
        );
        for o in own {
            let _ = writeln!(md, "- {o}");
        }
        let _ = writeln!(md);
    }

    let _ = writeln!(md, "### Requests on kept-alive connections (req/s)\n");
    contender_table(md, c, "requests", sizes, &plain);
    ratio_table(md, c, "requests", sizes);
    latency_table(md, c, "requests", sizes);
    charts(
        md,
        c,
        "requests",
        "Requests on kept-alive connections",
        "req/s",
        sizes,
        docs,
    )?;

    let _ = writeln!(
        md,
        "### One TCP stream with NIC offloads (Gbit/s)\n\nThe node's veths keep TSO/GSO, GRO and \
         partial checksums; a bridge hop after the node segments and checksums in software, and \
         the endpoints and the pod verify every checksum (any error fails the run).\n"
    );
    let with_note = |x: &Cell| with_spread(x);
    if contender_table(md, c, "tcp_throughput_offload", sizes, &with_note) {
        ratio_table(md, c, "tcp_throughput_offload", sizes);
        for (k, x) in c
            .iter()
            .filter(|(k, _)| k.0 == "traffic" && k.1 == "tcp_throughput_offload")
        {
            if let Some(note) = &x.note {
                let _ = writeln!(md, "- {} at {}: {note}", k.2, k.3);
            }
        }
        let _ = writeln!(md);
    }

    let _ = writeln!(
        md,
        "### One TCP stream without offloads (Gbit/s)\n\nEvery veth with full checksums and no \
         TSO: every 1500-byte segment is translated on its own.\n"
    );
    contender_table(md, c, "tcp_throughput", sizes, &plain);
    ratio_table(md, c, "tcp_throughput", sizes);

    let _ = writeln!(
        md,
        "### One UDP flow of small datagrams (packets/s received)\n"
    );
    contender_table(md, c, "udp_packets", sizes, &plain);
    ratio_table(md, c, "udp_packets", sizes);

    let _ = writeln!(
        md,
        "### One new connection at a time (p99 µs, lower is better)\n"
    );
    contender_table(md, c, "connection_latency", sizes, &plain);
    let _ = writeln!(
        md,
        "### One request at a time on a kept-alive connection (p99 µs, lower is better)\n"
    );
    contender_table(md, c, "request_latency", sizes, &plain);
    Ok(())
}

/// The cluster egress suite's records (`bench::traffic::egress`).
const EGRESS: &str = "cluster-egress";

/// Its contenders in report order, with what each is.
const EGRESS_PATHS: [(&str, &str); 3] = [
    (
        "gateway",
        "pod -> ClusterIP of a Service annotated `extproxy.io/cluster-egress-ip`: node1 tunnels \
         the flow (GUE) to node2, the address's owner, which translates it; the endpoints see \
         the cluster egress address",
    ),
    (
        "local",
        "the same agents and Service without the annotation: node1 translates, the endpoints see \
         node1's address (what a Service gets on one node)",
    ),
    (
        "direct",
        "no Service, no agent: the pod calls the endpoints' own addresses, node1 only routes",
    ),
];

/// A cluster egress cell that has a value.
fn egress_value<'a>(c: &'a BTreeMap<Key, Cell>, measure: &str, who: &str) -> Option<&'a Cell> {
    get(c, EGRESS, measure, who, 1).filter(|x| x.has_value())
}

/// `a ÷ b`, or `-`.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// Issue 12's numbers: what the gateway costs beside a locally served Service and no proxy.
fn egress_target(c: &BTreeMap<Key, Cell>) -> Option<Target> {
    let gateway = egress_value(c, "new_connections", "gateway")?;
    let median = |m: &str, w: &str| egress_value(c, m, w).map(|x| x.median);
    let p99 = |m: &str, w: &str| egress_value(c, m, w).and_then(|x| x.p99_us);
    let mut parts = vec![format!(
        "{} new conn/s through the gateway = {} local, {} direct",
        num(gateway.median),
        ratio(Some(gateway.median), median("new_connections", "local")),
        ratio(Some(gateway.median), median("new_connections", "direct")),
    )];
    if let Some(g) = p99("connection_latency", "gateway") {
        parts.push(format!(
            "one connection p99 {} µs = {} local, {} direct",
            num(g),
            ratio(Some(g), p99("connection_latency", "local")),
            ratio(Some(g), p99("connection_latency", "direct")),
        ));
    }
    if let Some(g) = median("tcp_throughput", "gateway") {
        parts.push(format!(
            "one stream {} Gbit/s = {} local, {} direct",
            num(g),
            ratio(Some(g), median("tcp_throughput", "local")),
            ratio(Some(g), median("tcp_throughput", "direct")),
        ));
    }
    Some(Target {
        what: "Cluster egress: the extra cost of a flow through the gateway node (issue 12)".into(),
        measured: parts.join("; "),
        verdict: Verdict::Reported,
    })
}

/// A row per measure, a column per path, and the gateway's ratios to the other two.
fn egress_section(md: &mut String, c: &BTreeMap<Key, Cell>, records: &[Value]) {
    let paths: Vec<&str> = EGRESS_PATHS
        .iter()
        .map(|(name, _)| *name)
        .filter(|w| c.keys().any(|k| k.0 == EGRESS && k.2 == *w))
        .collect();
    if paths.is_empty() {
        return;
    }
    let seconds = |m: &str| {
        records
            .iter()
            .find(|r| r["suite"] == EGRESS && r["measure"] == m && r["value"].is_number())
            .and_then(|r| r["seconds"].as_f64())
            .map(|s| format!("{s:.1} s"))
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        md,
        "## Cluster egress: the gateway's cost\n\nThree nodes and the outside host on one LAN \
         (`testbed::cluster`, veths with full checksums through a bridge), a pod behind node1, \
         every node running the release agent in manifest mode with the cluster egress setup \
         below (node2 the static owner of 10.0.0.100, node2 and node3 `--egress-gateway`, \
         `--tunnel-peer 10.0.0.0/29`) and otherwise its defaults. One Service, two endpoints on \
         the outside host. A fresh cluster per run, the paths interleaved, median of rounds \
         (range). Methodology: [xtask/src/bench/TRAFFIC.md](xtask/src/bench/TRAFFIC.md), \
         \"Cluster egress\".\n"
    );
    let _ = writeln!(
        md,
        "| path | what | node1's flags beyond its defaults |\n|---|---|---|"
    );
    for w in &paths {
        let what = EGRESS_PATHS
            .iter()
            .find(|(n, _)| n == w)
            .map(|(_, d)| *d)
            .unwrap_or_default();
        let flags = c
            .iter()
            .find(|(k, _)| k.0 == EGRESS && k.2 == *w)
            .map(|(_, x)| x.flags.join(" "))
            .unwrap_or_default();
        let flags = if flags.is_empty() {
            "none".into()
        } else {
            format!("`{flags}`")
        };
        let _ = writeln!(md, "| {w} | {what} | {flags} |");
    }
    let _ = writeln!(md);
    let mut notes = Footnotes::default();
    for ((suite, _, _, _), cell) in c {
        if suite == EGRESS {
            for why in cell.not_run.iter().chain(cell.failed.first()) {
                let why = why.trim().to_owned();
                if !notes.notes.contains(&why) {
                    notes.notes.push(why);
                }
            }
        }
    }
    let pair = |x: &Cell| {
        format!(
            "{} / {}",
            num(x.p50_us.unwrap_or(f64::NAN)),
            num(x.p99_us.unwrap_or(f64::NAN))
        )
    };
    let pair_ratio = |m: &str, other: &str| {
        let p = |w: &str, q: fn(&Cell) -> Option<f64>| egress_value(c, m, w).and_then(q);
        format!(
            "{} / {}",
            ratio(p("gateway", |x| x.p50_us), p(other, |x| x.p50_us)),
            ratio(p("gateway", |x| x.p99_us), p(other, |x| x.p99_us))
        )
    };
    let median_ratio = |m: &str, other: &str| {
        ratio(
            egress_value(c, m, "gateway").map(|x| x.median),
            egress_value(c, m, other).map(|x| x.median),
        )
    };
    type Text<'a> = Box<dyn Fn(&Cell) -> String + 'a>;
    type Ratio<'a> = Box<dyn Fn(&str) -> String + 'a>;
    let rows: Vec<(String, &str, Text<'_>, Ratio<'_>)> = vec![
        (
            format!(
                "New TCP connections/s, 16 at a time ({}), failed and stalled beside",
                seconds("new_connections")
            ),
            "new_connections",
            Box::new(rate_with_trouble),
            Box::new(|o| median_ratio("new_connections", o)),
        ),
        (
            "their latency, connect to the server's close, p50 / p99 (µs)".into(),
            "new_connections",
            Box::new(pair),
            Box::new(|o| pair_ratio("new_connections", o)),
        ),
        (
            format!(
                "One connection at a time ({}), p50 / p99 (µs): the path's own latency",
                seconds("connection_latency")
            ),
            "connection_latency",
            Box::new(pair),
            Box::new(|o| pair_ratio("connection_latency", o)),
        ),
        (
            format!("One TCP stream ({}), Gbit/s", seconds("tcp_throughput")),
            "tcp_throughput",
            Box::new(with_spread),
            Box::new(|o| median_ratio("tcp_throughput", o)),
        ),
    ];
    let mut head = String::from("| |");
    let mut sep = String::from("|---|");
    for w in &paths {
        let _ = write!(head, " {w} |");
        sep.push_str("---|");
    }
    let others: Vec<&str> = ["local", "direct"]
        .into_iter()
        .filter(|o| paths.contains(o) && paths.contains(&"gateway"))
        .collect();
    for o in &others {
        let _ = write!(head, " gateway ÷ {o} |");
        sep.push_str("---|");
    }
    let _ = writeln!(md, "{head}\n{sep}");
    for (label, measure, text, ratio_of) in &rows {
        let mut line = format!("| {label} |");
        for w in &paths {
            let cell = get(c, EGRESS, measure, w, 1);
            let _ = write!(line, " {} |", cell_text(cell, &notes, text.as_ref()));
        }
        for o in &others {
            let _ = write!(line, " {} |", ratio_of(o));
        }
        let _ = writeln!(md, "{line}");
    }
    let _ = writeln!(md);
    if !notes.notes.is_empty() {
        let _ = writeln!(md, "Not run or failed:\n");
        notes.write(md);
    }
}

/// p50 / p99 per contender and size.
fn latency_table(md: &mut String, c: &BTreeMap<Key, Cell>, measure: &str, sizes: &[u64]) {
    let _ = writeln!(md, "Latency p50 / p99 (µs):\n");
    let both = |x: &Cell| {
        format!(
            "{} / {}",
            num(x.p50_us.unwrap_or(f64::NAN)),
            num(x.p99_us.unwrap_or(f64::NAN))
        )
    };
    contender_table(md, c, measure, sizes, &both);
}

fn charts(
    md: &mut String,
    c: &BTreeMap<Key, Cell>,
    measure: &str,
    title: &str,
    unit: &str,
    sizes: &[u64],
    docs: &std::path::Path,
) -> anyhow::Result<()> {
    let chart = |value: &dyn Fn(&Cell) -> Option<f64>| -> Vec<Series> {
        traffic_contenders(c)
            .iter()
            .map(|w| Series {
                name: (*w).to_owned(),
                points: sizes
                    .iter()
                    .filter_map(|n| {
                        get(c, "traffic", measure, w, *n)
                            .filter(|x| x.has_value())
                            .and_then(|x| value(x).map(|v| (*n as f64, v)))
                    })
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let rate = chart(&|x: &Cell| Some(x.median));
    let p99s = chart(&|x: &Cell| x.p99_us);
    if rate.is_empty() {
        return Ok(());
    }
    std::fs::write(
        docs.join(format!("{measure}.svg")),
        line_chart(title, "Services", unit, &rate),
    )?;
    std::fs::write(
        docs.join(format!("{measure}-p99.svg")),
        line_chart(&format!("{title}: p99 latency"), "Services", "µs", &p99s),
    )?;
    let _ = writeln!(
        md,
        "![{title}](docs/bench/{measure}.svg) ![{title} p99](docs/bench/{measure}-p99.svg)\n"
    );
    Ok(())
}

fn table_by_size(
    md: &mut String,
    c: &BTreeMap<Key, Cell>,
    suite: &str,
    sizes: &[u64],
    rows: &[(&str, &str, &str)],
) {
    let mut head = String::from("| |");
    let mut sep = String::from("|---|");
    for n in sizes {
        let _ = write!(head, " {n} Services |");
        sep.push_str("---|");
    }
    let _ = writeln!(md, "{head}\n{sep}");
    for (measure, who, label) in rows {
        let mut line = format!("| {label} |");
        let mut any = false;
        for n in sizes {
            match get(c, suite, measure, who, *n) {
                Some(x) if x.has_value() => {
                    any = true;
                    let _ = write!(line, " {} |", with_spread(x));
                }
                _ => line.push_str(" - |"),
            }
        }
        if any {
            let _ = writeln!(md, "{line}");
        }
    }
    let _ = writeln!(md);
}

/// What the numbers mean and why the missed targets are missed. Kept with the generator so a
/// new run never loses it; the figures it quotes are the tables above.
const ANALYSIS: &str = include_str!("../bench-analysis.md");

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rec(measure: &str, contender: &str, n: u64, value: Option<f64>) -> Value {
        json!({
            "suite": "traffic", "measure": measure, "contender": contender, "services": n,
            "round": 0, "value": value, "count": 10, "errors": 0, "stalled": 0, "flags": [],
        })
    }

    fn egress(measure: &str, path: &str, value: f64, p50: f64, p99: f64) -> Value {
        json!({
            "suite": "cluster-egress", "measure": measure, "contender": path, "services": 1,
            "round": 0, "value": value, "p50_us": p50, "p99_us": p99, "count": 10, "errors": 0,
            "stalled": 0, "flags": if path == "direct" { json!([]) } else { json!(["--pod-ifaces", "pod0"]) },
        })
    }

    #[test]
    fn the_cluster_egress_section_gives_the_gateways_ratios() {
        let mut records = vec![
            egress("new_connections", "gateway", 6_000.0, 2_000.0, 8_000.0),
            egress("new_connections", "local", 8_000.0, 1_000.0, 4_000.0),
            egress("new_connections", "direct", 12_000.0, 1_000.0, 2_000.0),
            egress("connection_latency", "gateway", 300.0, 150.0, 300.0),
            egress("connection_latency", "local", 200.0, 100.0, 200.0),
            egress("tcp_throughput", "gateway", 2.0, f64::NAN, f64::NAN),
            egress("tcp_throughput", "local", 4.0, f64::NAN, f64::NAN),
            egress("tcp_throughput", "direct", 5.0, f64::NAN, f64::NAN),
        ];
        let mut failed = egress("connection_latency", "direct", f64::NAN, f64::NAN, f64::NAN);
        failed["failed"] = json!("not one connection completed");
        records.push(failed);
        let docs = std::env::temp_dir().join(format!("xp-report-egress-{}", std::process::id()));
        let md = render(&records, true, Duration::ZERO, &docs).unwrap();
        let _ = std::fs::remove_dir_all(&docs);
        assert!(md.contains("## Cluster egress: the gateway's cost"), "{md}");
        assert!(
            md.contains("| path | what | node1's flags beyond its defaults |"),
            "{md}"
        );
        assert!(md.contains("| direct | no Service, no agent"), "{md}");
        let row = |label: &str| {
            md.lines()
                .find(|l| l.starts_with(&format!("| {label}")))
                .unwrap_or_else(|| panic!("no row {label}: {md}"))
                .to_owned()
        };
        assert_eq!(
            row("New TCP connections/s"),
            "| New TCP connections/s, 16 at a time (-), failed and stalled beside | 6000 | \
             8000 | 12000 | 0.75x | 0.50x |"
        );
        assert!(
            row("their latency").ends_with("| 2.00x / 2.00x | 2.00x / 4.00x |"),
            "{}",
            row("their latency")
        );
        let one = row("One connection at a time");
        assert!(one.contains("| **failed** [1] |"), "{one}");
        assert!(one.ends_with("| 1.50x / 1.50x | - / - |"), "{one}");
        assert!(row("One TCP stream").ends_with("| 0.50x | 0.40x |"));
        assert!(md.contains("[1] not one connection completed"), "{md}");
        let target = row("Cluster egress: the extra cost");
        assert!(
            target.contains("6000 new conn/s through the gateway = 0.75x local, 0.50x direct"),
            "{target}"
        );
        assert!(target.ends_with("| reported |"), "{target}");
    }

    #[test]
    fn contenders_not_run_or_failed_say_why_and_targets_follow_the_issue() {
        let mut records = vec![
            rec(
                "new_connections_one_endpoint",
                "extproxy",
                1,
                Some(15_000.0),
            ),
            rec("new_connections_one_endpoint", "direct", 1, Some(16_000.0)),
            rec(
                "new_connections_one_endpoint",
                "kube-proxy-iptables",
                1,
                Some(12_000.0),
            ),
            rec(
                "new_connections_one_endpoint",
                "kube-proxy-nftables",
                1,
                Some(13_000.0),
            ),
            rec(
                "new_connections_one_endpoint",
                "extproxy",
                10_000,
                Some(14_000.0),
            ),
            rec(
                "new_connections_one_endpoint",
                "direct",
                10_000,
                Some(16_000.0),
            ),
        ];
        let mut not_run = rec(
            "new_connections_one_endpoint",
            "kube-proxy-iptables",
            10_000,
            None,
        );
        not_run["not_run"] = json!("not run in quick mode: takes minutes");
        records.push(not_run);
        let mut failed = rec(
            "new_connections_one_endpoint",
            "kube-proxy-nftables",
            10_000,
            None,
        );
        failed["failed"] = json!("connection timed out");
        records.push(failed);
        let docs = std::env::temp_dir().join(format!("xp-report-{}", std::process::id()));
        let md = render(&records, true, Duration::ZERO, &docs).unwrap();
        let _ = std::fs::remove_dir_all(&docs);
        assert!(
            md.contains("| kube-proxy-iptables | 12000 | not run [1] |"),
            "{md}"
        );
        assert!(
            md.contains("[1] not run in quick mode: takes minutes"),
            "{md}"
        );
        assert!(
            md.contains("| kube-proxy-nftables | 13000 | **failed** [2] |"),
            "{md}"
        );
        assert!(md.contains("[2] connection timed out"), "{md}");
        // 14000 < 0.9 x 16000 at 10k: missed, and the kube-proxy rows that did not run are named.
        let target = md
            .lines()
            .find(|l| l.starts_with("| New TCP connections/s through a Service with one endpoint"))
            .unwrap();
        assert!(target.ends_with("| **missed** |"), "{target}");
        assert!(
            target.contains("10000: 14000 = 0.88x direct, kube-proxy-iptables not run"),
            "{target}"
        );
        assert!(md.contains("| direct | 0.94x | 0.88x |"), "{md}");
        assert!(md.contains("## Headline"), "{md}");
    }
}
