//! Many API writes, fast and blocking: keep-alive HTTP/1.1 connections over TLS, one per thread,
//! inside the control plane's network namespace. For benchmarks that fill a server with tens of
//! thousands of objects and time single writes to the millisecond (no handshake in the timing).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use crate::{Error, io_err};

/// One request to the API server.
#[derive(Clone, Debug)]
pub struct ApiWrite {
    /// `POST`, `PUT`, `PATCH`, `DELETE` (or `GET`).
    pub method: &'static str,
    /// e.g. `/api/v1/namespaces/bench/services`.
    pub path: String,
    /// `application/json`, or `application/merge-patch+json` for a merge patch.
    pub content_type: &'static str,
    pub body: String,
}

impl ApiWrite {
    /// POST `body` (JSON) to `path`.
    pub fn create(path: impl Into<String>, body: impl Into<String>) -> Self {
        ApiWrite {
            method: "POST",
            path: path.into(),
            content_type: "application/json",
            body: body.into(),
        }
    }

    /// A JSON merge patch of the object at `path`.
    pub fn merge_patch(path: impl Into<String>, body: impl Into<String>) -> Self {
        ApiWrite {
            method: "PATCH",
            path: path.into(),
            content_type: "application/merge-patch+json",
            body: body.into(),
        }
    }
}

/// The API server's answer.
#[derive(Clone, Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

/// One kept-alive connection to the API server. Must be used from the thread that opened it
/// when the control plane runs in a network namespace (the socket lives there anyway; only
/// reconnecting needs the namespace).
pub struct ApiConnection {
    stream: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
    addr: SocketAddr,
    token: String,
}

const TIMEOUT: Duration = Duration::from_secs(60);

impl ApiConnection {
    pub(crate) fn open(
        tls: &Arc<rustls::ClientConfig>,
        addr: SocketAddr,
        token: &str,
    ) -> Result<Self, Error> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(io_err(format!("connecting to the API server at {addr}")))?;
        tcp.set_read_timeout(Some(TIMEOUT))
            .map_err(io_err("socket timeout"))?;
        tcp.set_write_timeout(Some(TIMEOUT))
            .map_err(io_err("socket timeout"))?;
        tcp.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
        let name = ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(tls.clone(), name)?;
        Ok(ApiConnection {
            stream: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
            addr,
            token: token.to_owned(),
        })
    }

    /// Sends `write` and reads the answer (whatever its status).
    pub fn send(&mut self, write: &ApiWrite) -> Result<ApiResponse, Error> {
        let what = || format!("{} {}", write.method, write.path);
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\n",
            write.method, write.path, self.addr, self.token
        );
        if !write.body.is_empty() || write.method != "GET" {
            head.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                write.content_type,
                write.body.len()
            ));
        }
        head.push_str("\r\n");
        let stream = self.stream.get_mut();
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(write.body.as_bytes()))
            .and_then(|()| stream.flush())
            .map_err(io_err(what()))?;
        read_response(&mut self.stream).map_err(io_err(what()))
    }

    /// Sends `write` and fails unless the answer is a success (2xx).
    pub fn send_ok(&mut self, write: &ApiWrite) -> Result<ApiResponse, Error> {
        let response = self.send(write)?;
        if (200..300).contains(&response.status) {
            Ok(response)
        } else {
            Err(Error::Api {
                request: format!("{} {}", write.method, write.path),
                status: response.status,
                body: response.body,
            })
        }
    }
}

/// An HTTP/1.1 response: status line, headers, then a body of Content-Length bytes or chunks.
fn read_response(r: &mut impl BufRead) -> std::io::Result<ApiResponse> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the API server closed the connection",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP status line: {line:?}")))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    line.clear();
                    r.read_line(&mut line)?;
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    }
    Ok(ApiResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends every write, `in_flight` connections at a time (threads inside `netns` when given),
/// each write expected to succeed; returns how long it took. Writes are taken in order, so one
/// that depends on an earlier one must come at least `in_flight` places later (or in a later
/// call).
pub(crate) fn write_all(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    token: &str,
    netns: Option<&Path>,
    writes: &[ApiWrite],
    in_flight: usize,
) -> Result<Duration, Error> {
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let threads = in_flight.clamp(1, writes.len().max(1));
    let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let next = &next;
                s.spawn(move || -> Result<(), Error> {
                    crate::process::enter_netns(netns)?;
                    let mut conn = ApiConnection::open(tls, addr, token)?;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(write) = writes.get(i) else {
                            return Ok(());
                        };
                        conn.send_ok(write)?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("an API writer thread panicked"))
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_read_by_length_or_chunks_and_the_next_one_follows() {
        let wire = "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n\
                    {\"a\":1}\
                    HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4\r\n{\"b\"\r\n3;x=y\r\n:2}\r\n0\r\n\r\n\
                    HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut r = BufReader::new(wire.as_bytes());
        let first = read_response(&mut r).unwrap();
        assert_eq!((first.status, first.body.as_str()), (201, "{\"a\":1}"));
        let second = read_response(&mut r).unwrap();
        assert_eq!((second.status, second.body.as_str()), (409, "{\"b\":2}"));
        let third = read_response(&mut r).unwrap();
        assert_eq!((third.status, third.body.as_str()), (200, ""));
        let end = read_response(&mut r).unwrap_err();
        assert_eq!(end.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
