//! The log as a log pipeline or `kubectl logs` reads it: stdout is not a terminal there. The
//! real binary, on `extproxy validate`, which logs what it would serve (no root, no kernel).

use std::path::PathBuf;
use std::process::{Command, Output};

/// A folder with one Service and its endpoints, nothing to complain about.
fn manifests(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("extproxy-logs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("web.yaml"),
        "apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints: [{addresses: [203.0.113.7]}]
",
    )
    .unwrap();
    dir
}

/// `extproxy [args] validate` with stdout a pipe and no colour preference in the environment.
fn validate(name: &str, args: &[&str]) -> (Output, String) {
    let dir = manifests(name);
    let out = Command::new(env!("CARGO_BIN_EXE_extproxy"))
        .args(args)
        .arg("validate")
        .arg("--manifests")
        .arg(&dir)
        .env_remove("NO_COLOR")
        .env_remove("EXTPROXY_LOG")
        .env_remove("EXTPROXY_LOG_FORMAT")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    (out, stdout)
}

/// A DaemonSet's `kubectl logs` showed `\x1b[2m...\x1b[32m INFO\x1b[0m`.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let (_, stdout) = validate("text", &[]);
    assert!(stdout.contains("INFO"), "{stdout}");
    assert!(stdout.contains("serving Service demo/web"), "{stdout}");
    assert!(!stdout.contains('\u{1b}'), "colour codes: {stdout:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let (_, stdout) = validate("json", &["--log-format", "json"]);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(line["timestamp"].is_string(), "{line}");
        assert!(line["level"].is_string(), "{line}");
        assert!(line["message"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l["level"] == "INFO"
            && l["message"]
                .as_str()
                .unwrap()
                .starts_with("serving Service demo/web")),
        "{stdout}"
    );
}
