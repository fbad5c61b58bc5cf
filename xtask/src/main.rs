//! Developer tasks: `cargo xtask run`, `cargo xtask test`, `cargo xtask lint`, `cargo xtask bench`.

mod bench;
mod benchmark;
mod k8s;
mod plot;
mod previous;
mod report;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use testbed::topo::{CLIENT, EP1, EP2, EchoServers, Topology, in_netns};

const USAGE: &str = "\
usage: cargo xtask <task> [options]

  run                   build, create a demo network (pod, node, outside) in namespaces, run
                        extproxy on the node with examples/demo, print commands to try; Ctrl-C
                        stops it and removes everything
      --check           run the demo, make the requests it suggests, report, and exit
      --kubeconfig PATH run the agent on this host against a cluster instead
      --iface IFACE     with --kubeconfig: the uplink (default: the default route's interface)
      -- ARGS           extra arguments for `extproxy run`
  test                  build everything and run all tests (unit, BPF_PROG_TEST_RUN, namespaces,
                        a real API server: the binaries come from ../shared/k8s, unpacked once
                        into ~/.cache/extproxy, or from $EXTPROXY_K8S_BIN)
  lint                  rustfmt check and clippy -D warnings, the eBPF crate included
  bench [--quick]       benchmarks: extproxy with its defaults against the real kube-proxy
                        (iptables and nftables modes) and no proxy, programmed from a real API
                        server (the binaries as for `test`), cluster egress through a gateway
                        node, and health checking; quick ~16 min, full: hours
      --only SUITES     per-packet, control-plane, traffic, cluster-egress, health (comma-separated)
      --report          re-render BENCHMARKS.md from bench-results/bench.json
                        XP_TRAFFIC_* / XP_EGRESS_* narrow the traffic / cluster egress suites
                        (xtask/src/bench/TRAFFIC.md)
  kind                  Kubernetes-in-Docker tests (skipped with a message without docker/kind)
  previous-agent        build the previous release (ABI 2, from git history) for the upgrade
                        tests (once) and print its path, e.g. `export
                        EXTPROXY_PREVIOUS_AGENT=$(cargo xtask previous-agent)` before `cargo test`
  k8s-bin               unpack the Kubernetes binaries (once) and print their directory, e.g.
                        `export EXTPROXY_K8S_BIN=$(cargo xtask k8s-bin)` before `cargo test`
";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        print!("{USAGE}");
        return Ok(());
    };
    let rest = &args[1..];
    match task.as_str() {
        "run" => run(rest),
        "test" => test(rest),
        "lint" => lint(),
        "bench" => benchmark::main(rest),
        "kind" => kind(),
        "previous-agent" => {
            let bin = previous::agent(&workspace_root(), &target_dir())?
                .context("no previous agent: the history lacks its commit")?;
            // Its build left it where the current agent goes: put the current one back.
            build_agent(false)?;
            println!("{}", bin.display());
            Ok(())
        }
        "k8s-bin" => {
            let dir = k8s::binaries(&workspace_root())?
                .context("no Kubernetes binaries: ../shared/k8s does not exist")?;
            println!("{}", dir.display());
            Ok(())
        }
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task {other:?}\n{USAGE}"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_with_env(args, &[])
}

fn cargo_with_env(args: &[&str], env: &[(&str, &Path)]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cargo {}", args.join(" ")))?;
    ensure!(status.success(), "cargo {} failed", args.join(" "));
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "{what} needs root (eBPF programs, network namespaces): run `sudo -E cargo xtask {what}`"
    );
    Ok(())
}

/// Builds the agent (and with it the eBPF object) and returns its path.
fn build_agent(release: bool) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "-p", "proxy-user", "--bin", "extproxy"];
    if release {
        args.push("--release");
    }
    cargo(&args)?;
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir().join(profile).join("extproxy"))
}

/// Where cargo puts its output: `$CARGO_TARGET_DIR` when set (relative to the workspace root,
/// where [`cargo`] runs), `target/` otherwise.
fn target_dir() -> PathBuf {
    let root = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let (ours, extra) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let mut check = false;
    let mut kubeconfig = None;
    let mut iface = None;
    let mut it = ours.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--check" => check = true,
            "--kubeconfig" => kubeconfig = Some(it.next().context("--kubeconfig PATH")?.clone()),
            "--iface" => iface = Some(it.next().context("--iface IFACE")?.clone()),
            other => bail!("run: unknown option {other:?}\n{USAGE}"),
        }
    }
    require_root("run")?;
    let bin = build_agent(false)?;
    match kubeconfig {
        Some(kc) => run_cluster(&bin, &kc, iface, extra),
        None => run_demo(&bin, check, extra),
    }
}

/// The agent on this host, against a real cluster.
fn run_cluster(
    bin: &Path,
    kubeconfig: &str,
    iface: Option<String>,
    extra: &[String],
) -> anyhow::Result<()> {
    // `auto`: the agent picks the interface of the default route.
    let iface = iface.unwrap_or_else(|| "auto".into());
    let node = std::env::var("NODE_NAME").unwrap_or_else(|_| hostname());
    println!("running extproxy against {kubeconfig} as node {node} on {iface}");
    let status = Command::new(bin)
        .args([
            "run",
            "--kubeconfig",
            kubeconfig,
            "--node-name",
            &node,
            "--iface",
            &iface,
        ])
        .args(extra)
        .status()?;
    ensure!(status.success(), "extproxy exited with {status}");
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// The embedded default: a pod, a node and "the outside" in network namespaces, extproxy on
/// the node, examples/demo as its manifests.
fn run_demo(bin: &Path, check: bool, extra: &[String]) -> anyhow::Result<()> {
    let manifests = workspace_root().join("examples/demo");
    let topo = Topology::new("demo");
    let _servers = EchoServers::start(
        &topo.ext.name,
        &[(EP1, 8080), (EP2, 8080), ("203.0.113.9", 8080)],
    );
    let state_dir = topo.dir.join("state");
    let pin_dir = topo.pin_dir();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", topo.node.name))
        .arg(bin)
        .args(["run", "--iface", "up0", "--manifests"])
        .arg(&manifests)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--state-dir")
        .arg(&state_dir)
        .args(extra);
    if check {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let mut agent = cmd.spawn().context("starting extproxy")?;
    // Ctrl-C reaches the agent (same process group); we stay to clean up after it.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    wait_for(&state_dir.join("state.json"), Duration::from_secs(30))?;
    let (pod, ext) = (&topo.pod.name, &topo.ext.name);
    let inspect = format!(
        "sudo {} inspect --pin-dir {} --state-dir {}",
        bin.display(),
        pin_dir.display(),
        state_dir.display()
    );
    let tries = [
        (
            format!("sudo ip netns exec {pod} curl -s http://10.96.0.10/"),
            "a pod to the ClusterIP",
        ),
        (
            format!("sudo ip netns exec {ext} curl -s --interface {CLIENT} http://10.0.0.1:30080/"),
            "an outside client to the NodePort",
        ),
        (
            format!("sudo ip netns exec {ext} curl -s --interface {CLIENT} http://192.0.2.50/"),
            "an allowed client to the LoadBalancer IP",
        ),
    ];
    if check {
        let result = check_demo(&topo);
        unsafe { libc::kill(agent.id() as i32, libc::SIGINT) };
        let status = agent.wait()?;
        result?;
        ensure!(status.success(), "extproxy exited with {status}");
        println!("demo check passed: the external endpoints saw the node's address 10.0.0.1");
        return Ok(());
    }
    println!("\nextproxy is running on the demo node. In another terminal, try:");
    for (cmd, what) in &tries {
        println!(
            "  {cmd}\n      # {what}: the endpoint answers with the address it saw (10.0.0.1)"
        );
    }
    println!("  {inspect}\n      # services, frontends, flows, drops");
    println!(
        "Edit {} and watch the agent apply it. Ctrl-C stops everything.\n",
        manifests.display()
    );
    let status = agent.wait()?;
    println!("extproxy exited ({status}); removing the demo namespaces");
    Ok(())
}

fn wait_for(path: &Path, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while !path.exists() {
        ensure!(
            start.elapsed() < timeout,
            "extproxy did not start within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The state file is written after the first programming; attaching follows at once.
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// Makes the requests the demo suggests and checks what the endpoints saw.
fn check_demo(topo: &Topology) -> anyhow::Result<()> {
    for (ns, bind, dst, port) in [
        (&topo.pod.name, None, "10.96.0.10", 80),
        (&topo.ext.name, Some(CLIENT), "10.0.0.1", 30080),
        (&topo.ext.name, Some(CLIENT), "192.0.2.50", 80),
    ] {
        let answer = in_netns(ns, || http_get(bind, dst, port))
            .with_context(|| format!("GET http://{dst}:{port}/ from {ns}"))?;
        println!("GET http://{dst}:{port}/ from {ns}: {}", answer.trim());
        ensure!(
            answer.contains("peer=10.0.0.1:"),
            "the endpoint did not see the node's address: {answer}"
        );
    }
    Ok(())
}

fn http_get(bind: Option<&str>, dst: &str, port: u16) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let sa = std::net::SocketAddr::new(dst.parse()?, port);
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(sa),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(b) = bind {
        sock.bind(&std::net::SocketAddr::new(b.parse()?, 0).into())?;
    }
    sock.connect_timeout(&sa.into(), Duration::from_secs(3))?;
    let mut stream: std::net::TcpStream = sock.into();
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {dst}\r\n\r\n")?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out.rsplit("\r\n\r\n").next().unwrap_or_default().to_owned())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    require_root("test")?;
    // The upgrade tests start from the previous release, built from history. First: its build
    // shares the target directory, and the agent built next takes its place there again.
    let previous = previous::agent(&workspace_root(), &target_dir())?;
    // The namespace tests run the real binary: build it (and the eBPF object) first.
    build_agent(false)?;
    // The tests against a real API server find etcd and kube-apiserver through this.
    let k8s_bin = k8s::binaries(&workspace_root())?;
    let mut cargo_args = vec!["test", "--workspace"];
    cargo_args.extend(args.iter().map(String::as_str));
    let env: Vec<(&str, &Path)> = k8s_bin
        .iter()
        .map(|dir| (k8s::BIN_ENV, dir.as_path()))
        .chain(
            previous
                .iter()
                .map(|bin| (previous::BIN_ENV, bin.as_path())),
        )
        .collect();
    cargo_with_env(&cargo_args, &env)
}

fn lint() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The data path is only compiled for the BPF target; lint it there.
    let status: ExitStatus = Command::new("rustup")
        .args([
            "run",
            "nightly-2026-05-19",
            "cargo",
            "clippy",
            "-p",
            "proxy-ebpf",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--bins",
        ])
        .args(["--target-dir", "target/ebpf-lint", "--", "-D", "warnings"])
        // aya-ebpf-bindings picks its generated bindings by this cfg (aya-build sets it too).
        .env(
            "RUSTFLAGS",
            format!("--cfg bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .current_dir(workspace_root())
        .status()?;
    ensure!(status.success(), "clippy on the eBPF crate failed");
    Ok(())
}

fn kind() -> anyhow::Result<()> {
    let script = workspace_root().join("tests/kind/run.sh");
    ensure!(script.exists(), "{} is missing", script.display());
    let status = Command::new("bash")
        .arg(script)
        .current_dir(workspace_root())
        .status()?;
    ensure!(status.success(), "kind tests failed");
    Ok(())
}
