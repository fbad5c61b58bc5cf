//! Asking a DNS server: hickory-resolver, configured from the node's /etc/resolv.conf or from
//! `--dns-server`. Its own response cache is off: [`super::cache`] decides when to ask again, and
//! a cached answer would hide a change until the record's full TTL ran out even where
//! `--dns-max-ttl` asks sooner.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use thiserror::Error;

use super::cache::Outcome;
use super::view::Failure;
use crate::translate::IpFamily;

/// How long one server gets to answer one try, and how many tries a lookup makes per server.
/// A lookup that fails takes about this times the tries and servers; the cache keeps serving
/// meanwhile.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
pub const QUERY_ATTEMPTS: usize = 2;
/// A bound on a whole lookup, whatever the resolver's own timers do.
pub const LOOKUP_BOUND: Duration = Duration::from_secs(15);

pub type LookupFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Something that looks names up: hickory in the agent, a script in tests.
pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self, name: Arc<str>, family: IpFamily) -> LookupFuture;
    /// Which servers it asks, for the log.
    fn describe(&self) -> String;
}

#[derive(Debug, Error)]
pub enum ResolverError {
    #[error("reading the system's resolver configuration (/etc/resolv.conf): {0}")]
    System(#[source] NetError),
    #[error("building the resolver: {0}")]
    Build(#[source] NetError),
}

pub struct Hickory {
    resolver: TokioResolver,
    servers: String,
}

impl Hickory {
    /// The resolver of `servers` (port 53 unless given), or the node's /etc/resolv.conf when
    /// there are none.
    pub fn new(servers: &[SocketAddr]) -> Result<Self, ResolverError> {
        let (config, mut opts) = if servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf().map_err(ResolverError::System)?
        } else {
            let name_servers = servers
                .iter()
                .map(|s| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = s.port();
                    NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                })
                .collect();
            (
                ResolverConfig::from_name_servers(name_servers),
                ResolverOpts::default(),
            )
        };
        let listed: Vec<String> = config
            .name_servers()
            .iter()
            .map(|ns| {
                let port = ns.connections.first().map_or(53, |c| c.port);
                SocketAddr::new(ns.ip, port).to_string()
            })
            .collect();
        let described = if servers.is_empty() {
            format!("{} (/etc/resolv.conf)", listed.join(", "))
        } else {
            format!("{} (--dns-server)", listed.join(", "))
        };
        tune(&mut opts, !servers.is_empty());
        let resolver = Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(ResolverError::Build)?;
        Ok(Hickory {
            resolver,
            servers: described,
        })
    }
}

fn tune(opts: &mut ResolverOpts, explicit_servers: bool) {
    // The cache in dns/cache.rs decides when to ask again; hickory's would answer from memory.
    opts.cache_size = 0;
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = QUERY_ATTEMPTS;
    // Source ports from the kernel's ip_local_port_range: `--snat-ports auto` leaves that range
    // out, so a query's port never collides with a SNAT port (hickory's own random pick spans
    // 1024-65535).
    opts.os_port_selection = true;
    if explicit_servers {
        opts.use_hosts_file = ResolveHosts::Never;
    }
}

impl Lookup for Hickory {
    fn lookup(&self, name: Arc<str>, family: IpFamily) -> LookupFuture {
        let resolver = self.resolver.clone();
        Box::pin(async move {
            let record_type = match family {
                IpFamily::V4 => RecordType::A,
                IpFamily::V6 => RecordType::AAAA,
            };
            // The trailing dot makes it absolute: an FQDN endpoint is never a relative name.
            let absolute = format!("{name}.");
            match tokio::time::timeout(LOOKUP_BOUND, resolver.lookup(absolute, record_type)).await {
                Err(_) => Outcome::Failed(Failure::Timeout),
                Ok(Ok(lookup)) => {
                    let mut addrs: Vec<IpAddr> = lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match (&r.data, family) {
                            (RData::A(a), IpFamily::V4) => Some(IpAddr::V4(a.0)),
                            (RData::AAAA(a), IpFamily::V6) => Some(IpAddr::V6(a.0)),
                            _ => None,
                        })
                        .collect();
                    addrs.sort();
                    addrs.dedup();
                    // The smallest TTL along the way (a CNAME's too): the answer is only as
                    // good as its shortest-lived part.
                    let ttl = lookup.answers().iter().map(|r| r.ttl).min().unwrap_or(0);
                    if addrs.is_empty() {
                        Outcome::NoData {
                            negative_ttl: Some(Duration::from_secs(ttl.into())),
                        }
                    } else {
                        Outcome::Answer {
                            addrs,
                            ttl: Duration::from_secs(ttl.into()),
                        }
                    }
                }
                Ok(Err(err)) => outcome_of_error(&err),
            }
        })
    }

    fn describe(&self) -> String {
        self.servers.clone()
    }
}

/// An authoritative "no" is an answer (NXDOMAIN, NODATA); the rest is a failure.
fn outcome_of_error(err: &NetError) -> Outcome {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(no)) => {
            let negative_ttl = no.negative_ttl.map(|t| Duration::from_secs(t.into()));
            if no.response_code == ResponseCode::NXDomain {
                Outcome::NxDomain { negative_ttl }
            } else {
                Outcome::NoData { negative_ttl }
            }
        }
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => {
            Outcome::Failed(Failure::ServFail)
        }
        NetError::Dns(DnsError::ResponseCode(_)) => Outcome::Failed(Failure::Refused),
        NetError::Timeout => Outcome::Failed(Failure::Timeout),
        NetError::Io(_) | NetError::NoConnections => Outcome::Failed(Failure::Unreachable),
        other => {
            let text = other.to_string();
            if text.contains("timed out") || text.contains("timeout") {
                Outcome::Failed(Failure::Timeout)
            } else {
                tracing::debug!("DNS lookup failed: {text}");
                Outcome::Failed(Failure::Other)
            }
        }
    }
}
