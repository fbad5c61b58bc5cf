//! etcd and kube-apiserver, started, restarted and stopped for one test.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use crate::http::{self, Response};
use crate::pki::{Pki, random_token};
use crate::process::{Proc, in_netns, tail};
use crate::{AuditEvent, Binaries, Error, audit, io_err};

/// The static user every control plane has: group `system:masters`, allowed everything.
pub const ADMIN: &str = "admin";

/// A user authenticated by a static bearer token (kube-apiserver's `--token-auth-file`).
#[derive(Clone, Debug)]
pub struct StaticUser {
    pub name: String,
    pub groups: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Where kube-apiserver listens, and the address it advertises. Loopback by default; an
    /// address of a veth makes it reachable from the namespace at the other end (a node's
    /// agent or kube-proxy) while tests talk to it from here. etcd always listens on loopback.
    pub bind: IpAddr,
    /// Run both inside this network namespace (a path such as `/var/run/netns/NAME`); `bind`
    /// is then an address there, and only threads inside it can reach the server.
    pub netns: Option<PathBuf>,
    /// Static users besides [`ADMIN`]; their tokens come from [`ControlPlane::token`].
    pub users: Vec<StaticUser>,
    /// Keep an audit log of every request ([`ControlPlane::audit`]).
    pub audit: bool,
    /// More kube-apiserver flags (`--flag=value`).
    pub apiserver_args: Vec<String>,
    /// How long each process may take to become ready.
    pub ready_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            netns: None,
            users: Vec::new(),
            audit: false,
            apiserver_args: Vec::new(),
            // About 4 s on an idle 2-core VM; CI machines run other tests beside it.
            ready_timeout: Duration::from_secs(60),
        }
    }
}

/// How long start-up took: from spawning each process to its health endpoint answering ok.
#[derive(Clone, Copy, Debug)]
pub struct StartupTimes {
    pub etcd: Duration,
    pub apiserver: Duration,
}

impl StartupTimes {
    pub fn total(&self) -> Duration {
        self.etcd + self.apiserver
    }
}

/// What every API server of one control plane shares.
struct Shared {
    bins: Binaries,
    options: Options,
    dir: PathBuf,
    ca_pem: String,
    ca_der: Vec<u8>,
    tls: Arc<rustls::ClientConfig>,
    /// user -> token
    tokens: BTreeMap<String, String>,
    etcd_addr: SocketAddr,
    /// Names log files of successive API servers apart.
    generation: AtomicU32,
}

/// One kube-apiserver process. The control plane's own one is managed by [`ControlPlane`];
/// [`ControlPlane::side_apiserver`] hands out others on the same etcd.
pub struct ApiServer {
    proc: Proc,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl ApiServer {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// A client configuration for `token` (trusting the control plane's CA).
    pub fn config_with_token(&self, token: &str) -> kube::Config {
        client_config(&self.url(), &self.shared.ca_der, token)
    }

    /// An admin client. Needs a tokio runtime (kube's client spawns a task).
    pub fn client(&self) -> Result<kube::Client, Error> {
        Ok(kube::Client::try_from(
            self.config_with_token(&self.shared.tokens[ADMIN]),
        )?)
    }
}

/// etcd and kube-apiserver for one test; both are killed and everything is deleted on drop.
pub struct ControlPlane {
    shared: Arc<Shared>,
    etcd: Proc,
    api_addr: SocketAddr,
    apiserver: Option<ApiServer>,
    startup: StartupTimes,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))
}

fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    // The port is free now; the server binds it a moment later. A collision makes the server
    // exit, and start-up tries other ports.
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn client_config(url: &str, ca_der: &[u8], token: &str) -> kube::Config {
    let mut config = kube::Config::new(url.parse().expect("a valid URL"));
    config.root_cert = Some(vec![ca_der.to_vec()]);
    config.auth_info.token = Some(secrecy::SecretString::from(token.to_owned()));
    config
}

fn kubeconfig_yaml(url: &str, ca_pem: &str, user: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
  - name: envtest
    cluster:
      server: {url}
      certificate-authority-data: {ca}
users:
  - name: {user}
    user:
      token: {token}
contexts:
  - name: envtest
    context:
      cluster: envtest
      user: {user}
current-context: envtest
"
    )
}

/// Polls `probe` until it says ready, failing early when `proc` exits.
fn wait_ready(
    proc: &mut Proc,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<(), String>,
) -> Result<Duration, Error> {
    let start = Instant::now();
    loop {
        let last = match probe() {
            Ok(()) => return Ok(start.elapsed()),
            Err(why) => why,
        };
        if let Some(status) = proc.exited() {
            return Err(Error::Exited {
                process: proc.name,
                status,
                log: proc.log.clone(),
                tail: proc.tail(30),
            });
        }
        if start.elapsed() > timeout {
            return Err(Error::NotReady {
                process: proc.name,
                waited: start.elapsed(),
                last,
                log: proc.log.clone(),
                tail: proc.tail(30),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn describe(r: std::io::Result<Response>) -> Result<Response, String> {
    r.map_err(|e| e.to_string())
}

/// Start-up attempts when a port picked as free was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

impl Shared {
    fn netns(&self) -> Option<&Path> {
        self.options.netns.as_deref()
    }

    fn admin_token(&self) -> &str {
        &self.tokens[ADMIN]
    }

    fn apiserver_args(&self, port: u16, audit_log: Option<&Path>) -> Vec<String> {
        let d = &self.dir;
        let bind = self.options.bind;
        let mut args = vec![
            format!("--etcd-servers=http://{}", self.etcd_addr),
            format!("--bind-address={bind}"),
            format!("--advertise-address={bind}"),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", d.join("apiserver.crt").display()),
            format!(
                "--tls-private-key-file={}",
                d.join("apiserver.key").display()
            ),
            format!("--token-auth-file={}", d.join("tokens.csv").display()),
            "--service-account-issuer=https://kubernetes.default.svc".to_owned(),
            format!("--service-account-key-file={}", d.join("sa.pub").display()),
            format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ),
            "--service-cluster-ip-range=10.96.0.0/12".to_owned(),
            "--authorization-mode=RBAC".to_owned(),
            // As kubeadm and every managed cluster set it: node agents need privileged pods.
            "--allow-privileged=true".to_owned(),
        ];
        if let Some(log) = audit_log {
            args.push(format!(
                "--audit-policy-file={}",
                d.join("audit-policy.yaml").display()
            ));
            args.push(format!("--audit-log-path={}", log.display()));
        }
        args.extend(self.options.apiserver_args.iter().cloned());
        args
    }

    /// Starts an API server on `port` (a free one when None) and waits until /readyz says ok.
    fn start_apiserver(
        self: &Arc<Self>,
        port: Option<u16>,
        audit_log: Option<&Path>,
    ) -> Result<(ApiServer, Duration), Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = match port {
                Some(p) => p,
                None => in_netns(self.netns(), || free_port(self.options.bind))?
                    .map_err(io_err("finding a free port for kube-apiserver"))?,
            };
            let addr = SocketAddr::new(self.options.bind, port);
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            let log = self.dir.join(format!("kube-apiserver.{generation}.log"));
            let mut proc = Proc::spawn(
                "kube-apiserver",
                &self.bins.kube_apiserver(),
                &self.apiserver_args(port, audit_log),
                &log,
                self.netns(),
            )?;
            let tls = self.tls.clone();
            let token = self.admin_token().to_owned();
            let timeout = self.options.ready_timeout;
            let ready = in_netns(self.netns(), || {
                wait_ready(&mut proc, timeout, || {
                    let r = describe(http::tls_get(&tls, addr, "/readyz", &token))?;
                    if r.status == 200 {
                        Ok(())
                    } else {
                        Err(format!("/readyz {}: {}", r.status, r.body.trim()))
                    }
                })
            })?;
            match ready {
                Ok(took) => {
                    return Ok((
                        ApiServer {
                            proc,
                            addr,
                            shared: self.clone(),
                        },
                        took,
                    ));
                }
                Err(Error::Exited { .. }) if attempt < PORT_ATTEMPTS && port_taken(&log) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn port_taken(log: &Path) -> bool {
    tail(log, 50).contains("address already in use")
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until the API server is ready.
    pub fn start(bins: &Binaries, options: Options) -> Result<ControlPlane, Error> {
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("extproxy-envtest-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        // From here on, a failure removes the directory with the processes (Drop of the parts).
        let cleanup = RemoveOnDrop(dir.clone());

        let mut addresses = vec![options.bind];
        if !options.bind.is_loopback() {
            addresses.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let pki = Pki::generate(&addresses)?;
        write(&dir.join("ca.crt"), &pki.ca_pem)?;
        write(&dir.join("apiserver.crt"), &pki.serving_cert_pem)?;
        write(&dir.join("apiserver.key"), &pki.serving_key_pem)?;
        write(&dir.join("sa.key"), &pki.sa_key_pem)?;
        write(&dir.join("sa.pub"), &pki.sa_pub_pem)?;
        write(&dir.join("audit-policy.yaml"), audit::POLICY)?;
        let mut tokens = BTreeMap::new();
        let mut csv = String::new();
        let admin = StaticUser {
            name: ADMIN.to_owned(),
            groups: vec!["system:masters".to_owned()],
        };
        for user in std::iter::once(&admin).chain(&options.users) {
            let token = random_token()?;
            csv.push_str(&format!(
                "{token},{},{},\"{}\"\n",
                user.name,
                user.name,
                user.groups.join(",")
            ));
            tokens.insert(user.name.clone(), token);
        }
        write(&dir.join("tokens.csv"), &csv)?;

        let (etcd, etcd_addr, etcd_took) = start_etcd(bins, &options, &dir)?;
        let shared = Arc::new(Shared {
            bins: bins.clone(),
            tls: http::tls_config(&pki.ca_der)?,
            ca_pem: pki.ca_pem,
            ca_der: pki.ca_der,
            options,
            dir: dir.clone(),
            tokens,
            etcd_addr,
            generation: AtomicU32::new(0),
        });
        let audit_log = shared.options.audit.then(|| dir.join("audit.log"));
        let (apiserver, api_took) = shared.start_apiserver(None, audit_log.as_deref())?;
        let cp = ControlPlane {
            api_addr: apiserver.addr,
            apiserver: Some(apiserver),
            etcd,
            startup: StartupTimes {
                etcd: etcd_took,
                apiserver: api_took,
            },
            shared,
        };
        for user in cp.shared.tokens.keys() {
            let path = cp.kubeconfig_for(user);
            let token = &cp.shared.tokens[user];
            write(
                &path,
                &kubeconfig_yaml(&cp.url(), &cp.shared.ca_pem, user, token),
            )?;
        }
        std::mem::forget(cleanup);
        Ok(cp)
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.api_addr)
    }

    /// The API server's address (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The directory holding certificates, tokens, kubeconfigs, logs and etcd's data.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The CA the serving certificate is signed by (PEM), for clients that verify it.
    pub fn ca_pem(&self) -> &str {
        &self.shared.ca_pem
    }

    pub fn startup_times(&self) -> StartupTimes {
        self.startup
    }

    /// The bearer token of a static user ([`ADMIN`] or one of [`Options::users`]).
    pub fn token(&self, user: &str) -> Option<&str> {
        self.shared.tokens.get(user).map(String::as_str)
    }

    /// The admin's kubeconfig file.
    pub fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig_for(ADMIN)
    }

    /// The kubeconfig file of a static user (written at start).
    pub fn kubeconfig_for(&self, user: &str) -> PathBuf {
        self.shared.dir.join(format!("{user}.kubeconfig"))
    }

    /// Writes a kubeconfig for any bearer token (a ServiceAccount's, say) and returns its path.
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf, Error> {
        let path = self.shared.dir.join(format!("{name}.kubeconfig"));
        write(
            &path,
            &kubeconfig_yaml(&self.url(), &self.shared.ca_pem, name, token),
        )?;
        Ok(path)
    }

    /// A client configuration for `token`.
    pub fn config_with_token(&self, token: &str) -> kube::Config {
        client_config(&self.url(), &self.shared.ca_der, token)
    }

    /// The admin's client configuration.
    pub fn config(&self) -> kube::Config {
        self.config_with_token(self.shared.admin_token())
    }

    /// An admin client. Needs a tokio runtime (kube's client spawns a task); with
    /// [`Options::netns`], use it from a thread inside that namespace.
    pub fn client(&self) -> Result<kube::Client, Error> {
        Ok(kube::Client::try_from(self.config())?)
    }

    /// A kept-alive admin connection to the API server, opened from the calling thread (which
    /// must be inside [`Options::netns`] when that is set: see [`ControlPlane::in_netns`]).
    pub fn connection(&self) -> Result<crate::ApiConnection, Error> {
        crate::ApiConnection::open(&self.shared.tls, self.api_addr, self.shared.admin_token())
    }

    /// Runs `f` on a thread inside the control plane's network namespace (here when it has none).
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        in_netns(self.shared.netns(), f)
    }

    /// Sends every write as the admin over `in_flight` kept-alive connections at once, each
    /// expected to succeed, and returns how long that took. Writes are taken in order: one that
    /// needs an earlier one (an object in a namespace created here) belongs in a later call.
    pub fn write_all(
        &self,
        writes: &[crate::ApiWrite],
        in_flight: usize,
    ) -> Result<Duration, Error> {
        crate::writer::write_all(
            &self.shared.tls,
            self.api_addr,
            self.shared.admin_token(),
            self.shared.netns(),
            writes,
            in_flight,
        )
    }

    /// Kills the API server (SIGKILL: an outage, not a graceful shutdown). etcd keeps running.
    pub fn stop_apiserver(&mut self) {
        self.apiserver = None;
    }

    pub fn apiserver_running(&self) -> bool {
        self.apiserver.is_some()
    }

    /// Process ids of etcd and, while it runs, the API server.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.etcd.pid())
            .chain(self.apiserver.as_ref().map(|a| a.proc.pid()))
            .collect()
    }

    /// Starts the API server again on the same address and etcd (a no-op when it runs) and
    /// waits until it is ready; returns how long that took.
    pub fn start_apiserver(&mut self) -> Result<Duration, Error> {
        if self.apiserver.is_some() {
            return Ok(Duration::ZERO);
        }
        let audit_log = self.shared.options.audit.then(|| self.audit_log_path());
        let (server, took) = self
            .shared
            .start_apiserver(Some(self.api_addr.port()), audit_log.as_deref())?;
        self.apiserver = Some(server);
        Ok(took)
    }

    /// Another API server on the same etcd, on a port of its own: to change objects while the
    /// main one is down, as other API server replicas would. Not audited. Killed on drop.
    pub fn side_apiserver(&self) -> Result<ApiServer, Error> {
        Ok(self.shared.start_apiserver(None, None)?.0)
    }

    fn etcd_post(&self, path: &str, body: &str) -> Result<Value, Error> {
        let addr = self.shared.etcd_addr;
        let response = in_netns(self.shared.netns(), || {
            http::plain("POST", addr, path, body)
        })?
        .map_err(io_err(format!("etcd {path}")))?;
        let value: Value = serde_json::from_str(&response.body).map_err(|e| Error::Etcd {
            what: "answer",
            detail: format!("{path}: {e}: {}", response.body),
        })?;
        if response.status != 200 {
            return Err(Error::Etcd {
                what: "request",
                detail: format!("{path}: {} {}", response.status, response.body),
            });
        }
        Ok(value)
    }

    /// etcd's current revision: the newest resourceVersion any object can have.
    pub fn etcd_revision(&self) -> Result<u64, Error> {
        // A range over a key that does not exist still reports the store's revision.
        let key = base64::engine::general_purpose::STANDARD.encode("/extproxy-envtest/none");
        let value = self.etcd_post("/v3/kv/range", &format!("{{\"key\":\"{key}\"}}"))?;
        value["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| Error::Etcd {
                what: "revision",
                detail: value.to_string(),
            })
    }

    /// Compacts etcd's history up to `revision` (through its JSON gateway): watches from an
    /// older resourceVersion that the API server cannot serve from its cache get 410 Gone.
    pub fn compact(&self, revision: u64) -> Result<(), Error> {
        self.etcd_post(
            "/v3/kv/compaction",
            &format!("{{\"revision\":\"{revision}\",\"physical\":true}}"),
        )?;
        Ok(())
    }

    /// Compacts everything up to now; returns the revision.
    pub fn compact_now(&self) -> Result<u64, Error> {
        let revision = self.etcd_revision()?;
        self.compact(revision)?;
        Ok(revision)
    }

    fn audit_log_path(&self) -> PathBuf {
        self.shared.dir.join("audit.log")
    }

    /// Every request the API server (and its restarts; not side servers) answered so far.
    /// Needs [`Options::audit`].
    pub fn audit(&self) -> Result<Vec<AuditEvent>, Error> {
        if !self.shared.options.audit {
            return Err(Error::Audit(
                "not enabled: start with Options { audit: true, .. }".to_owned(),
            ));
        }
        audit::read(&self.audit_log_path())
    }
}

fn start_etcd(
    bins: &Binaries,
    options: &Options,
    dir: &Path,
) -> Result<(Proc, SocketAddr, Duration), Error> {
    let data = dir.join("etcd");
    std::fs::create_dir_all(&data).map_err(io_err(format!("creating {}", data.display())))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        // etcd refuses a data directory others can read.
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod {}", data.display())))?;
    }
    let netns = options.netns.as_deref();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (client, peer) = in_netns(netns, || -> std::io::Result<(u16, u16)> {
            Ok((free_port(loopback)?, free_port(loopback)?))
        })?
        .map_err(io_err("finding free ports for etcd"))?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args = vec![
            "--name=default".to_owned(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            // A test's data need not survive a power cut; fsync would dominate every write.
            "--unsafe-no-fsync".to_owned(),
            "--log-level=warn".to_owned(),
        ];
        let log = dir.join("etcd.log");
        let mut proc = Proc::spawn("etcd", &bins.etcd(), &args, &log, netns)?;
        let addr = SocketAddr::new(loopback, client);
        let ready = in_netns(netns, || {
            wait_ready(&mut proc, options.ready_timeout, || {
                let r = describe(http::plain("GET", addr, "/health", ""))?;
                if r.status == 200 && r.body.contains("\"health\":\"true\"") {
                    Ok(())
                } else {
                    Err(format!("/health {}: {}", r.status, r.body.trim()))
                }
            })
        })?;
        match ready {
            Ok(took) => return Ok((proc, addr, took)),
            Err(Error::Exited { .. }) if attempt < PORT_ATTEMPTS && port_taken(&log) => {
                // A fresh data directory: the failed member may have written to it.
                let _ = std::fs::remove_dir_all(&data);
                std::fs::create_dir_all(&data)
                    .map_err(io_err(format!("creating {}", data.display())))?;
            }
            Err(e) => return Err(e),
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: what the servers said is often why.
            if let Some(api) = &self.apiserver {
                eprintln!(
                    "--- the end of {}:\n{}",
                    api.proc.log.display(),
                    api.proc.tail(20)
                );
            }
            eprintln!(
                "--- the end of {}:\n{}",
                self.etcd.log.display(),
                self.etcd.tail(20)
            );
        }
        self.apiserver = None;
        self.etcd.kill();
        let _ = std::fs::remove_dir_all(&self.shared.dir);
    }
}
