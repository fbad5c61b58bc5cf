//! SNAT source ports: which ones a node hands out (`--snat-ports`), and what they sustain.
//!
//! The default is every port from 1024 up that the node's own sockets never pick on their own:
//! the kernel chooses local ports for connect() and bind(0) from `net.ipv4.ip_local_port_range`
//! only, so a range outside it never collides with a host connection. The NodePort range is left
//! out too: an endpoint's reply to a SNAT port that is also a NodePort would look like a new
//! client of that NodePort. See DESIGN.md, "SNAT ports", for the analysis.

use std::fmt;
use std::ops::RangeInclusive;

use proxy_common::{PortRange, SNAT_RANGES};
use thiserror::Error;

/// The lowest SNAT port: below are the privileged ports, which servers bind explicitly.
pub const MIN_PORT: u16 = 1024;

/// How long a port stays held for its client after the endpoint closed the flow first, when
/// another client wants it: Linux's TIME_WAIT (TCP_TIMEWAIT_LEN).
pub const ENDPOINT_TIME_WAIT_SECS: u32 = 60;

/// The new connections per second to one endpoint a node should sustain by default; the agent
/// warns at start when its range cannot.
pub const TARGET_RATE: u32 = 1_000;

/// `--snat-ports`: `auto` or explicit ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnatPorts {
    Auto,
    Ranges(Vec<RangeInclusive<u16>>),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnatPortsError {
    #[error("{0:?}: expected FROM-TO (e.g. 1024-29999), a comma-separated list of them, or auto")]
    Syntax(String),
    #[error("{0}: need {MIN_PORT} <= FROM <= TO <= 65535")]
    Bounds(String),
    #[error("at most {SNAT_RANGES} ranges, got {0}")]
    TooMany(usize),
    #[error("{0} and {1} overlap")]
    Overlap(String, String),
}

impl std::str::FromStr for SnatPorts {
    type Err = SnatPortsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "auto" {
            return Ok(SnatPorts::Auto);
        }
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let parse = |v: &str| {
                v.trim()
                    .parse::<u16>()
                    .map_err(|_| SnatPortsError::Syntax(part.to_owned()))
            };
            let (a, b) = (parse(a)?, parse(b)?);
            if a < MIN_PORT || a > b {
                return Err(SnatPortsError::Bounds(part.to_owned()));
            }
            ranges.push(a..=b);
        }
        if ranges.is_empty() {
            return Err(SnatPortsError::Syntax(s.to_owned()));
        }
        if ranges.len() > SNAT_RANGES {
            return Err(SnatPortsError::TooMany(ranges.len()));
        }
        ranges.sort_by_key(|r| *r.start());
        for w in ranges.windows(2) {
            if w[1].start() <= w[0].end() {
                return Err(SnatPortsError::Overlap(show(&w[0]), show(&w[1])));
            }
        }
        Ok(SnatPorts::Ranges(ranges))
    }
}

fn show(r: &RangeInclusive<u16>) -> String {
    format!("{}-{}", r.start(), r.end())
}

/// The ports from `MIN_PORT` to 65535 without the node's ephemeral range and its NodePorts: at
/// most three ranges, in order.
pub fn auto_ranges(
    ephemeral: Option<RangeInclusive<u16>>,
    node_ports: &RangeInclusive<u16>,
) -> Vec<RangeInclusive<u16>> {
    let mut free = vec![MIN_PORT..=u16::MAX];
    for hole in ephemeral.iter().chain([node_ports]) {
        free = free.into_iter().flat_map(|r| subtract(&r, hole)).collect();
    }
    free
}

fn subtract(r: &RangeInclusive<u16>, hole: &RangeInclusive<u16>) -> Vec<RangeInclusive<u16>> {
    if hole.end() < r.start() || hole.start() > r.end() {
        return vec![r.clone()];
    }
    let mut out = Vec::new();
    if hole.start() > r.start() {
        out.push(*r.start()..=hole.start() - 1);
    }
    if hole.end() < r.end() {
        out.push(hole.end() + 1..=*r.end());
    }
    out
}

/// The node's `net.ipv4.ip_local_port_range` (IPv6 uses the same), if readable.
pub fn ephemeral_range() -> Option<RangeInclusive<u16>> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().filter_map(|p| p.parse::<u16>().ok());
    let (lo, hi) = (it.next()?, it.next()?);
    (lo <= hi).then_some(lo..=hi)
}

/// The ranges as the data path takes them.
pub fn port_ranges(ranges: &[RangeInclusive<u16>]) -> Vec<PortRange> {
    ranges
        .iter()
        .map(|r| PortRange {
            min: *r.start(),
            max: *r.end(),
        })
        .collect()
}

/// The egress pool size `--egress-ip` gives every Service (the smallest of its families; 1
/// without the flag): what the start-up figures multiply the ports by. A Service's own
/// `extproxy.io/egress-ip` pool is not known at start.
pub fn pool_size(egress_ips: &[std::net::IpAddr]) -> u32 {
    let v4 = egress_ips.iter().filter(|a| a.is_ipv4()).count() as u32;
    let v6 = egress_ips.len() as u32 - v4;
    match (v4, v6) {
        (0, 0) => 1,
        (0, n) | (n, 0) => n,
        (a, b) => a.min(b),
    }
}

/// What a range of `ports` from a pool of `addresses` egress addresses sustains towards one
/// endpoint, in new connections a second (see DESIGN.md, "SNAT ports"): SNAT ports are unique
/// per (egress address, endpoint), so the pairs are ports x addresses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Capacity {
    pub ports: u32,
    pub addresses: u32,
    /// Clients that keep calling: a port is free again for its own client once it closed; any
    /// client's port is free again `closing_secs` after a close in which the endpoint was not the
    /// first to close (no TIME_WAIT on its side). The conservative figure: every port held that
    /// long.
    pub steady: f64,
    /// Connections from client addresses never seen before, the endpoint closing first: each
    /// port waits out the endpoint's TIME_WAIT before another client may have it.
    pub new_clients: f64,
}

impl Capacity {
    pub fn of(ports: u32, addresses: u32, closing_secs: u32, time_wait_secs: u32) -> Self {
        let pairs = ports as f64 * addresses.max(1) as f64;
        Capacity {
            ports,
            addresses: addresses.max(1),
            steady: pairs / closing_secs.max(1) as f64,
            new_clients: pairs / time_wait_secs.max(1) as f64,
        }
    }

    /// "33512 port(s) per egress address" or "4 port(s) x 2 egress addresses".
    fn pairs(&self) -> String {
        if self.addresses == 1 {
            format!("{} port(s) per egress address", self.ports)
        } else {
            format!(
                "{} port(s) x {} egress addresses",
                self.ports, self.addresses
            )
        }
    }

    /// A warning when the range cannot sustain [`TARGET_RATE`] from steady clients.
    pub fn warning(&self, ranges: &str) -> Option<String> {
        (self.steady < TARGET_RATE as f64).then(|| {
            format!(
                "SNAT ports {ranges}: {} and endpoint sustain about {:.0} new connections/s to \
                 one endpoint (each closed flow holds its port for a while), below \
                 {TARGET_RATE}/s: widen --snat-ports (default: auto, every port outside the \
                 ephemeral and NodePort ranges) or add egress addresses (--egress-ip, several \
                 per family make a pool)",
                self.pairs(),
                self.steady
            )
        })
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} and endpoint: about {:.0} new connections/s from clients that keep calling, \
             {:.0}/s from client addresses never seen within {} s",
            self.pairs(),
            self.steady,
            self.new_clients,
            ENDPOINT_TIME_WAIT_SECS
        )
    }
}

/// Ranges for people: `1024-29999,61000-65535`.
pub fn describe(ranges: &[RangeInclusive<u16>]) -> String {
    ranges.iter().map(show).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_leaves_out_the_ephemeral_and_node_port_ranges() {
        let r = auto_ranges(Some(32_768..=60_999), &(30_000..=32_767));
        assert_eq!(r, vec![1024..=29_999, 61_000..=65_535]);
        let ports: u32 = r.iter().map(|r| r.len() as u32).sum();
        assert_eq!(ports, 33_512);
        // A node that gives its sockets the whole upper half.
        let r = auto_ranges(Some(10_000..=65_535), &(30_000..=32_767));
        assert_eq!(r, vec![1024..=9_999]);
        // Unknown ephemeral range: only the NodePorts are left out.
        let r = auto_ranges(None, &(30_000..=32_767));
        assert_eq!(r, vec![1024..=29_999, 32_768..=65_535]);
    }

    #[test]
    fn explicit_ranges_parse_sorted_and_are_checked() {
        assert_eq!(
            "61000-65535, 1024-2047".parse(),
            Ok(SnatPorts::Ranges(vec![1024..=2047, 61_000..=65_535]))
        );
        assert_eq!("auto".parse(), Ok(SnatPorts::Auto));
        assert_eq!("5000".parse(), Ok(SnatPorts::Ranges(vec![5000..=5000])));
        assert!(matches!(
            "80-90".parse::<SnatPorts>(),
            Err(SnatPortsError::Bounds(_))
        ));
        assert!(matches!(
            "2000-3000,2500-4000".parse::<SnatPorts>(),
            Err(SnatPortsError::Overlap(_, _))
        ));
        assert!(matches!(
            "2000-2001,3000-3001,4000-4001,5000-5001,6000-6001".parse::<SnatPorts>(),
            Err(SnatPortsError::TooMany(5))
        ));
        assert!(matches!(
            "x-y".parse::<SnatPorts>(),
            Err(SnatPortsError::Syntax(_))
        ));
    }

    #[test]
    fn the_old_default_range_warns_and_the_new_one_does_not() {
        let old = Capacity::of(4_536, 1, 10, ENDPOINT_TIME_WAIT_SECS);
        assert!(old.warning("61000-65535").is_some());
        let new = Capacity::of(33_512, 1, 10, ENDPOINT_TIME_WAIT_SECS);
        assert!(new.warning("1024-29999,61000-65535").is_none());
        assert!((new.new_clients - 558.5).abs() < 1.0);
    }

    #[test]
    fn a_pool_multiplies_what_the_ports_sustain() {
        // 6,000 ports alone: 600/s, a warning; from three addresses: 1,800/s, none.
        let one = Capacity::of(6_000, 1, 10, ENDPOINT_TIME_WAIT_SECS);
        assert!(one.warning("1024-7023").is_some());
        let three = Capacity::of(6_000, 3, 10, ENDPOINT_TIME_WAIT_SECS);
        assert!(three.warning("1024-7023").is_none());
        assert!((three.steady - 1_800.0).abs() < 1.0);
        assert!(
            three
                .to_string()
                .starts_with("6000 port(s) x 3 egress addresses")
        );
        let ips = |list: &[&str]| -> Vec<std::net::IpAddr> {
            list.iter().map(|s| s.parse().unwrap()).collect()
        };
        assert_eq!(pool_size(&[]), 1);
        assert_eq!(pool_size(&ips(&["192.0.2.1", "192.0.2.2"])), 2);
        // Dual stack: the smaller family decides what every Service gets.
        assert_eq!(
            pool_size(&ips(&[
                "192.0.2.1",
                "192.0.2.2",
                "192.0.2.3",
                "2001:db8::1"
            ])),
            1
        );
    }
}
