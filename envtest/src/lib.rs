//! A real Kubernetes control plane for tests and benchmarks: etcd and kube-apiserver started from
//! the binaries in `$EXTPROXY_K8S_BIN`, on free ports of an address the caller picks (loopback
//! by default), the way controller-runtime's envtest runs them. No kubelet, no
//! controller-manager: tests create the objects (Nodes, EndpointSlices) themselves.
//!
//! ```no_run
//! # async fn t() {
//! let Some(bins) = extproxy_envtest::binaries_or_skip("my_test") else { return };
//! let cp = extproxy_envtest::ControlPlane::start(&bins, Default::default()).unwrap();
//! let client = cp.client().unwrap(); // admin (system:masters)
//! // ... cp.kubeconfig() for a process, cp.stop_apiserver() / cp.start_apiserver() for outages,
//! // cp.compact() for 410 Gone; dropping `cp` kills both and deletes its directory.
//! // Benchmarks fill a server with cp.write_all(&writes, 24) (kept-alive HTTP/1.1, no tokio)
//! // and time single writes over cp.connection().
//! # }
//! ```
//!
//! **Lifetime.** Every process runs in a process group of its own and gets SIGKILL when the
//! process that started it dies (`PR_SET_PDEATHSIG`), so nothing outlives a test binary that
//! panics, is killed or times out. Dropping a [`ControlPlane`] kills both processes and removes
//! its directory (certificates, tokens, etcd data, logs); dropped during a panic it first prints
//! the end of both logs.
//!
//! **Cost, measured** (2-core VM at load 5, the v1.36.2 binaries, 5 runs): etcd answers /health
//! 0.1-1.0 s after it is spawned and kube-apiserver /readyz 2.5-2.8 s after that, 2.8-3.6 s in
//! all, about 330 MB resident; teardown takes 75 ms. A namespace in a running server takes 7 ms.
//! Tests here still take a fresh control plane each rather than sharing one per test binary
//! with a namespace per test: extproxy watches Services and EndpointSlices of every namespace
//! (and Nodes, which have none), so a shared server would show each test the others' objects,
//! and the outage and compaction tests need a server of their own anyway. The API server tests
//! run two at a time (the test harness's threads), so the start-ups overlap.
//!
//! **Binaries.** `$EXTPROXY_K8S_BIN` ([`BIN_ENV`]) names a directory holding `etcd`,
//! `kube-apiserver` and `kube-proxy`; `cargo xtask test` unpacks them there from
//! `../shared/k8s`. Without it, [`binaries_or_skip`] prints why and the test returns; with
//! `EXTPROXY_K8S_REQUIRED=1` ([`REQUIRED_ENV`], set by CI) it fails instead.

mod audit;
mod control_plane;
mod http;
mod pki;
mod process;
mod writer;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use audit::{AuditEvent, AuditObject, AuditUser};
pub use control_plane::{ADMIN, ApiServer, ControlPlane, Options, StartupTimes, StaticUser};
pub use writer::{ApiConnection, ApiResponse, ApiWrite};

/// The directory holding `etcd`, `kube-apiserver` and `kube-proxy`.
pub const BIN_ENV: &str = "EXTPROXY_K8S_BIN";
/// Set to `1` where the binaries must be there (CI): a missing [`BIN_ENV`] fails instead of
/// skipping.
pub const REQUIRED_ENV: &str = "EXTPROXY_K8S_REQUIRED";

#[derive(Debug, Error)]
pub enum Error {
    #[error("{BIN_ENV}={}: {name} is missing or not executable", dir.display())]
    MissingBinary { dir: PathBuf, name: &'static str },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating the test certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{process} exited during start-up ({status}); the end of {}:\n{tail}", log.display())]
    Exited {
        process: &'static str,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("{process} was not ready after {waited:?} ({last}); the end of {}:\n{tail}", log.display())]
    NotReady {
        process: &'static str,
        waited: std::time::Duration,
        last: String,
        log: PathBuf,
        tail: String,
    },
    #[error("etcd {what}: {detail}")]
    Etcd { what: &'static str, detail: String },
    #[error("the audit log: {0}")]
    Audit(String),
    #[error("kube client: {0}")]
    Kube(#[from] kube::Error),
    #[error("{request}: {status} {body}")]
    Api {
        request: String,
        status: u16,
        body: String,
    },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The control-plane binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`; each must exist and be executable.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        for name in ["etcd", "kube-apiserver", "kube-proxy"] {
            if !is_executable(&dir.join(name)) {
                return Err(Error::MissingBinary { dir, name });
            }
        }
        Ok(Binaries { dir })
    }

    /// From [`BIN_ENV`]; `Ok(None)` when it is unset or empty.
    pub fn from_env() -> Result<Option<Self>, Error> {
        match std::env::var_os(BIN_ENV) {
            Some(dir) if !dir.is_empty() => Self::in_dir(PathBuf::from(dir)).map(Some),
            _ => Ok(None),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn etcd(&self) -> PathBuf {
        self.dir.join("etcd")
    }

    pub fn kube_apiserver(&self) -> PathBuf {
        self.dir.join("kube-apiserver")
    }

    pub fn kube_proxy(&self) -> PathBuf {
        self.dir.join("kube-proxy")
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The binaries for `test`, or `None` after printing that the test skips and why. Panics when
/// [`BIN_ENV`] names a directory without them, or is unset where [`REQUIRED_ENV`] says they must
/// be there: a skip must never hide a broken set-up.
pub fn binaries_or_skip(test: &str) -> Option<Binaries> {
    match Binaries::from_env() {
        Ok(Some(bins)) => Some(bins),
        Ok(None) => {
            let required = std::env::var(REQUIRED_ENV).is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{test}: {REQUIRED_ENV}=1 but {BIN_ENV} is not set: run the tests with \
                 `cargo xtask test`, which unpacks the binaries from ../shared/k8s"
            );
            // Straight to stderr: the test harness captures eprintln! of passing tests, and a
            // skip must be seen.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP {test}: no Kubernetes binaries ({BIN_ENV} is not set; `cargo xtask test` \
                 sets it when ../shared/k8s exists, or point it at a directory with etcd and \
                 kube-apiserver)"
            );
            None
        }
        Err(err) => panic!("{test}: {err}"),
    }
}
