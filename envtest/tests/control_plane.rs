//! The harness itself against the real binaries: start-up, clients, restarts on the same etcd,
//! side servers, compaction into 410 Gone, the audit log, a network namespace, and nothing left
//! behind. Skipped (with a message) without $EXTPROXY_K8S_BIN.

use std::path::Path;

use extproxy_envtest::{ControlPlane, Options, StaticUser, binaries_or_skip};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams, WatchEvent, WatchParams};

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        data: Some([("k".to_owned(), name.to_owned())].into()),
        ..Default::default()
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_side_servers_compaction_audit_and_cleanup() {
    let Some(bins) = binaries_or_skip("restarts_side_servers_compaction_audit_and_cleanup") else {
        return;
    };
    let mut cp = ControlPlane::start(
        &bins,
        Options {
            audit: true,
            users: vec![StaticUser {
                name: "reader".into(),
                groups: vec![],
            }],
            ..Options::default()
        },
    )
    .unwrap();
    let t = cp.startup_times();
    eprintln!(
        "start-up: etcd {:?}, kube-apiserver {:?}, total {:?}",
        t.etcd,
        t.apiserver,
        t.total()
    );
    let client = cp.client().unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, "v1.36.2");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let first = cms
        .create(&PostParams::default(), &config_map("first"))
        .await
        .unwrap();
    let first_rv = first.metadata.resource_version.clone().unwrap();

    // A kubeconfig file works like the in-memory configuration (the agent reads files).
    let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig_for("reader")).unwrap();
    let reader_config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let reader: Api<ConfigMap> =
        Api::namespaced(kube::Client::try_from(reader_config).unwrap(), "default");
    let denied = reader.get("first").await.unwrap_err();
    assert!(
        matches!(&denied, kube::Error::Api(s) if s.code == 403),
        "a user without RBAC is forbidden: {denied}"
    );

    // Down: requests fail. A side server on the same etcd sees and changes the same data.
    let pids = cp.pids();
    cp.stop_apiserver();
    assert!(!alive(pids[1]), "the API server was killed");
    assert!(cms.get("first").await.is_err());
    {
        let side = cp.side_apiserver().unwrap();
        let side_cms: Api<ConfigMap> = Api::namespaced(side.client().unwrap(), "default");
        assert_eq!(side_cms.get("first").await.unwrap().data, first.data);
        for i in 0..3 {
            side_cms
                .create(
                    &PostParams::default(),
                    &config_map(&format!("while-down-{i}")),
                )
                .await
                .unwrap();
        }
        let side_pid = side.pid();
        drop(side);
        assert!(!alive(side_pid));
    }
    cp.start_apiserver().unwrap();
    assert_eq!(cp.addr(), pids_addr(&cp), "same address after the restart");
    assert_eq!(cms.list(&Default::default()).await.unwrap().items.len(), 4);

    // Compacted past `first`: a watch from its version is answered 410 Gone.
    let revision = cp.compact_now().unwrap();
    assert!(revision > first_rv.parse::<u64>().unwrap());
    let mut stream = cms
        .watch(&WatchParams::default(), &first_rv)
        .await
        .unwrap()
        .boxed();
    match stream.next().await {
        Some(Ok(WatchEvent::Error(status))) => assert_eq!(status.code, 410, "{status:?}"),
        other => panic!("expected 410 Gone, got {other:?}"),
    }

    // The audit log has who asked what, and what was answered.
    let audit = cp.audit().unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.user.username == "reader" && e.verb == "get" && e.code() == 403),
        "{:#?}",
        audit.iter().map(|e| e.summary()).collect::<Vec<_>>()
    );
    assert!(
        audit
            .iter()
            .any(|e| e.user.username == "admin" && e.verb == "create" && e.code() == 201)
    );

    let dir = cp.dir().to_owned();
    let pids = cp.pids();
    assert_eq!(pids.len(), 2);
    drop(cp);
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the control plane");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

fn pids_addr(cp: &ControlPlane) -> std::net::SocketAddr {
    cp.url().strip_prefix("https://").unwrap().parse().unwrap()
}

/// Needs root: the control plane runs inside a named network namespace, reachable only there.
#[test]
fn runs_inside_a_network_namespace() {
    let Some(bins) = binaries_or_skip("runs_inside_a_network_namespace") else {
        return;
    };
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (it creates a network namespace)"
    );
    let name = format!("xpenvtest-{}", std::process::id());
    let netns = NetnsGuard::new(&name);
    let cp = ControlPlane::start(
        &bins,
        Options {
            netns: Some(format!("/var/run/netns/{name}").into()),
            ..Options::default()
        },
    )
    .unwrap();
    let in_ns = std::process::Command::new("ip")
        .args(["netns", "pids", &name])
        .output()
        .unwrap();
    let in_ns: Vec<u32> = String::from_utf8_lossy(&in_ns.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    for pid in cp.pids() {
        assert!(in_ns.contains(&pid), "{pid} is not in {name}: {in_ns:?}");
    }
    // Loopback here is not the namespace's loopback.
    assert!(std::net::TcpStream::connect(cp.addr()).is_err());
    drop(cp);
    drop(netns);
}

struct NetnsGuard(String);

impl NetnsGuard {
    fn new(name: &str) -> Self {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns add {name} && ip netns exec {name} ip link set lo up"
            ))
            .status()
            .unwrap();
        assert!(ok.success());
        NetnsGuard(name.to_owned())
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}
