//! Active probes: one tokio task per (target, source, check), spread in time, reporting every
//! result over a channel so the control loop never waits for a probe.

use std::hash::{BuildHasher as _, Hash, Hasher as _};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

use super::config::{ActiveCheck, CheckKind};
use super::state::Cause;

/// What a probe task checks, and from where.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeKey {
    pub target: SocketAddr,
    /// The Service's egress address (what the far side allow-lists); None: the kernel's choice.
    pub source: Option<IpAddr>,
    pub check: ActiveCheck,
}

#[derive(Debug)]
pub struct ProbeResult {
    pub key: Arc<ProbeKey>,
    pub result: Result<(), Cause>,
    pub latency: Duration,
    /// The source address is not on this node: the probe left from the kernel's choice.
    pub source_fallback: bool,
}

/// Starts probing `key` until the task is aborted.
pub fn spawn(
    key: Arc<ProbeKey>,
    results: mpsc::UnboundedSender<ProbeResult>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let interval = key.check.interval;
        // Spread in time: agents started together (a DaemonSet rollout) and endpoints added in
        // one batch must not probe in lockstep.
        tokio::time::sleep(interval.mul_f64(random_unit(&key, 0))).await;
        let mut round = 1u64;
        loop {
            let started = Instant::now();
            let (result, source_fallback) =
                match tokio::time::timeout(key.check.timeout, probe_once(&key)).await {
                    Ok(outcome) => outcome,
                    Err(_) => (Err(Cause::Timeout), false),
                };
            let latency = started.elapsed();
            let sent = results.send(ProbeResult {
                key: key.clone(),
                result,
                latency,
                source_fallback,
            });
            if sent.is_err() {
                return;
            }
            // +-10% per round keeps them spread.
            let next = interval.mul_f64(0.9 + 0.2 * random_unit(&key, round));
            round += 1;
            tokio::time::sleep_until((started + next).into()).await;
        }
    })
}

/// A number in [0, 1) that differs per key, round and process.
fn random_unit(key: &ProbeKey, round: u64) -> f64 {
    static SEED: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut h = SEED
        .get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher();
    key.hash(&mut h);
    round.hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// One probe: the result, and whether the source address had to be left to the kernel.
async fn probe_once(key: &ProbeKey) -> (Result<(), Cause>, bool) {
    let (stream, fallback) = match connect(key).await {
        Ok(connected) => connected,
        Err(cause) => return (Err(cause), false),
    };
    let result = match key.check.kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Http => http_get(stream, key).await,
        CheckKind::Https => https_get(stream, key).await,
    };
    (result, fallback)
}

async fn connect(key: &ProbeKey) -> Result<(TcpStream, bool), Cause> {
    let new_socket = || {
        if key.target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| Cause::Other(format!("socket: {e}")))
    };
    let mut socket = new_socket()?;
    let mut fallback = false;
    if let Some(source) = key.source {
        match socket.bind(SocketAddr::new(source, 0)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
                fallback = true;
                socket = new_socket()?;
            }
            Err(e) => return Err(Cause::Other(format!("bind {source}: {e}"))),
        }
    }
    let stream = socket.connect(key.target).await.map_err(io_cause)?;
    Ok((stream, fallback))
}

fn io_cause(e: io::Error) -> Cause {
    match e.kind() {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => Cause::Refused,
        io::ErrorKind::TimedOut => Cause::Timeout,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Cause::Unreachable,
        _ => Cause::Other(e.to_string()),
    }
}

fn host_of(key: &ProbeKey) -> String {
    match (&key.check.host, key.target.ip()) {
        (Some(host), _) => host.clone(),
        (None, IpAddr::V4(ip)) => ip.to_string(),
        (None, IpAddr::V6(ip)) => format!("[{ip}]"),
    }
}

async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    key: &ProbeKey,
) -> Result<(), Cause> {
    let default_port = match key.check.kind {
        CheckKind::Https => 443,
        _ => 80,
    };
    let host = if key.target.port() == default_port || key.check.host.is_some() {
        host_of(key)
    } else {
        format!("{}:{}", host_of(key), key.target.port())
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: extproxy-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        key.check.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(io_cause)?;
    let mut buf = [0u8; 512];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await.map_err(io_cause)?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].contains(&b'\n') || len == buf.len() {
            break;
        }
    }
    let status = status_code(&buf[..len])
        .ok_or_else(|| Cause::Other("no HTTP status line in the answer".to_owned()))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(Cause::Http(status))
    }
}

/// The status code of an HTTP/1.x status line.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_ascii_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

async fn https_get(stream: TcpStream, key: &ProbeKey) -> Result<(), Cause> {
    let config = tls_config(key.check.verify).map_err(Cause::Other)?;
    let name = match &key.check.host {
        Some(host) => ServerName::try_from(host.clone())
            .map_err(|e| Cause::Other(format!("TLS server name {host:?}: {e}")))?,
        None => ServerName::IpAddress(key.target.ip().into()),
    };
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| Cause::Other(format!("TLS: {e}")))?;
    http_get(tls, key).await
}

/// The TLS client configurations, built once: with certificate verification against the
/// system's roots, or without (the default: endpoints are addressed by IP, often with
/// self-signed certificates, and the check asks "does it answer", not "is it who it says").
fn tls_config(verify: bool) -> Result<Arc<ClientConfig>, String> {
    static VERIFYING: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    static TRUSTING: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    let provider = || Arc::new(rustls::crypto::ring::default_provider());
    let cell = if verify { &VERIFYING } else { &TRUSTING };
    cell.get_or_init(|| {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = if verify {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("no trusted root certificates found on this host".to_owned());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
                .with_no_client_auth()
        };
        Ok(Arc::new(config))
    })
    .clone()
}

/// Accepts any certificate (the handshake's signatures are still checked).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn key(target: SocketAddr, kind: CheckKind, path: &str) -> ProbeKey {
        ProbeKey {
            target,
            source: Some("127.0.0.1".parse().unwrap()),
            check: ActiveCheck {
                kind,
                path: path.into(),
                host: None,
                port: None,
                verify: false,
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(2),
                unhealthy_threshold: 1,
                healthy_threshold: 1,
            },
        }
    }

    /// An HTTP server on loopback answering every request with `status`, recording requests.
    async fn http_server(status: &'static str) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn tcp_probes_tell_open_from_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        assert_eq!(
            probe_once(&key(open, CheckKind::Tcp, "/")).await,
            (Ok(()), false)
        );
        drop(listener);
        assert_eq!(
            probe_once(&key(open, CheckKind::Tcp, "/")).await.0,
            Err(Cause::Refused)
        );
    }

    #[tokio::test]
    async fn http_probes_judge_the_status_and_send_path_and_host() {
        let (ok, mut requests) = http_server("204 No Content").await;
        let mut k = key(ok, CheckKind::Http, "/healthz");
        k.check.host = Some("api.example.com".into());
        assert_eq!(probe_once(&k).await.0, Ok(()));
        let request = requests.recv().await.unwrap();
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("\r\nHost: api.example.com\r\n"),
            "{request}"
        );
        let (redirect, _r) = http_server("302 Found").await;
        assert_eq!(
            probe_once(&key(redirect, CheckKind::Http, "/")).await.0,
            Ok(())
        );
        let (failing, _f) = http_server("503 Service Unavailable").await;
        assert_eq!(
            probe_once(&key(failing, CheckKind::Http, "/")).await.0,
            Err(Cause::Http(503))
        );
    }

    #[tokio::test]
    async fn a_source_address_not_on_the_node_falls_back_to_the_default() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut k = key(listener.local_addr().unwrap(), CheckKind::Tcp, "/");
        // TEST-NET-3: on no interface of this machine.
        k.source = Some("203.0.113.77".parse().unwrap());
        assert_eq!(probe_once(&k).await, (Ok(()), true));
    }

    #[tokio::test]
    async fn https_to_a_plain_server_fails_with_a_tls_error() {
        let (plain, _r) = http_server("200 OK").await;
        let result = probe_once(&key(plain, CheckKind::Https, "/")).await.0;
        assert!(
            matches!(&result, Err(Cause::Other(text)) if text.starts_with("TLS")),
            "{result:?}"
        );
    }

    #[test]
    fn status_lines_are_parsed() {
        assert_eq!(
            status_code(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
    }

    #[test]
    fn jitter_spreads_keys() {
        let a = key("10.0.0.1:80".parse().unwrap(), CheckKind::Tcp, "/");
        let b = key("10.0.0.2:80".parse().unwrap(), CheckKind::Tcp, "/");
        let (x, y) = (random_unit(&a, 0), random_unit(&b, 0));
        assert!((0.0..1.0).contains(&x) && (0.0..1.0).contains(&y));
        assert_ne!(x, y);
        assert_ne!(random_unit(&a, 0), random_unit(&a, 1));
    }
}
