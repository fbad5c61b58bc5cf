//! The real Kubernetes binaries (etcd, kube-apiserver, kube-proxy) for the tests that start a
//! control plane (the `extproxy-envtest` crate): found in `../shared/k8s` next to the checkout,
//! checked against its SHA256SUMS and unpacked once into a cache directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail, ensure};

use crate::bench::sha256::sha256_concat;

/// What the tests read (extproxy_envtest::BIN_ENV).
pub const BIN_ENV: &str = "EXTPROXY_K8S_BIN";
/// Set (to 1) where the binaries must be there: CI (extproxy_envtest::REQUIRED_ENV).
pub const REQUIRED_ENV: &str = "EXTPROXY_K8S_REQUIRED";

/// Where the compressed binaries are: `../shared/k8s` beside the checkout, else /work/shared/k8s.
fn find_shared(workspace: &Path) -> Option<PathBuf> {
    [
        workspace.join("../shared/k8s"),
        PathBuf::from("/work/shared/k8s"),
    ]
    .into_iter()
    .find(|d| d.join("SHA256SUMS").is_file())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `$XDG_CACHE_HOME/extproxy` or `~/.cache/extproxy`.
pub fn cache_root() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("extproxy"),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/extproxy"),
    }
}

/// Verifies the .xz files of `shared` against its SHA256SUMS and unpacks them into a cache
/// directory named after the sums (new binaries get a new directory); the second call finds it
/// done. Returns the directory.
fn unpack(shared: &Path) -> anyhow::Result<PathBuf> {
    let sums_path = shared.join("SHA256SUMS");
    let sums = std::fs::read_to_string(&sums_path)
        .with_context(|| format!("reading {}", sums_path.display()))?;
    let dir = cache_root().join(format!(
        "k8s-{}",
        &hex(&sha256_concat(&[sums.as_bytes()]))[..16]
    ));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    println!(
        "unpacking the Kubernetes binaries from {} into {}",
        shared.display(),
        dir.display()
    );
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let Some((want, file)) = line.split_once(char::is_whitespace) else {
            bail!("{}: unreadable line {line:?}", sums_path.display());
        };
        let file = file.trim_start().trim_start_matches('*');
        let path = shared.join(file);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let got = hex(&sha256_concat(&[&data]));
        ensure!(
            got == want,
            "{}: SHA-256 {got}, but SHA256SUMS says {want}",
            path.display()
        );
        let name = file.strip_suffix(".xz").unwrap_or(file);
        let out_path = tmp.join(name);
        let out = std::fs::File::create(&out_path)
            .with_context(|| format!("creating {}", out_path.display()))?;
        let status = Command::new("xz")
            .arg("-dc")
            .arg(&path)
            .stdout(out)
            .stderr(Stdio::inherit())
            .status()
            .context("running xz (apt-get install xz-utils)")?;
        ensure!(status.success(), "xz -dc {} failed", path.display());
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&out_path, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::write(tmp.join(".complete"), &sums)?;
    if let Err(err) = std::fs::rename(&tmp, &dir) {
        // Another run finished first: use its copy.
        let _ = std::fs::remove_dir_all(&tmp);
        ensure!(
            dir.join(".complete").exists(),
            "moving {} to {}: {err}",
            tmp.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// The directory to give the tests in [`BIN_ENV`]: the caller's own setting if there is one,
/// else the unpacked shared binaries; None (the tests skip, saying why) when there are none,
/// which fails where [`REQUIRED_ENV`] is set.
pub fn binaries(workspace: &Path) -> anyhow::Result<Option<PathBuf>> {
    if let Some(dir) = std::env::var_os(BIN_ENV).filter(|d| !d.is_empty()) {
        return Ok(Some(dir.into()));
    }
    match find_shared(workspace) {
        Some(shared) => unpack(&shared).map(Some),
        None if std::env::var(REQUIRED_ENV).is_ok_and(|v| v == "1") => bail!(
            "{REQUIRED_ENV}=1 but there are no Kubernetes binaries: neither {} nor \
             /work/shared/k8s exists and {BIN_ENV} is not set",
            workspace.join("../shared/k8s").display()
        ),
        None => {
            println!(
                "no ../shared/k8s: the tests against a real API server will skip ({BIN_ENV} \
                 names a directory with etcd, kube-apiserver and kube-proxy)"
            );
            Ok(None)
        }
    }
}
