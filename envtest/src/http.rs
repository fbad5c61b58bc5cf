//! Just enough blocking HTTP for probes and etcd's JSON gateway: one HTTP/1.0 request per
//! connection (the server closes it, so the body ends at EOF), over TCP or TLS. Blocking on
//! purpose: the harness has no runtime of its own, and xtask has none at all.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};

const TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Response {
    pub status: u16,
    pub body: String,
}

/// Trusts only the control plane's CA.
pub(crate) fn tls_config(ca_der: &[u8]) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

fn exchange(stream: &mut impl ReadWrite, request: &[u8]) -> std::io::Result<Response> {
    stream.write_all(request)?;
    stream.flush()?;
    let mut raw = Vec::new();
    // A TLS peer that closes without close_notify ends the read with an error after the data.
    if let Err(e) = stream.read_to_end(&mut raw)
        && raw.is_empty()
    {
        return Err(e);
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok(Response {
        status,
        body: body.to_owned(),
    })
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn request_bytes(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    req.into_bytes()
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Plain HTTP (etcd's client port).
pub(crate) fn plain(
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: &str,
) -> std::io::Result<Response> {
    let mut stream = connect(addr)?;
    exchange(&mut stream, &request_bytes(method, addr, path, None, body))
}

/// HTTPS with a bearer token (the API server).
pub(crate) fn tls_get(
    config: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    path: &str,
    token: &str,
) -> std::io::Result<Response> {
    let tcp = connect(addr)?;
    let name = ServerName::IpAddress(addr.ip().into());
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    exchange(
        &mut stream,
        &request_bytes("GET", addr, path, Some(token), ""),
    )
}
