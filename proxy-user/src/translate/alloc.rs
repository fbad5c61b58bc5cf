//! Deterministic allocation of cluster IPs and nodePorts for manifest mode.
//!
//! A Service's value depends only on its name and on what is already taken, never on file order
//! or on a per-process random seed, so restarting the agent gives every Service the same address.
//! What is taken is a predicate: the incremental translator answers it per Service (explicit
//! values, and what the Services before it filled in).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use ipnet::IpNet;

/// 64-bit FNV-1a: stable across runs and platforms, unlike std's randomized hasher.
pub fn fnv1a(text: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    text.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// A free address of `cidr` chosen by `seed`, probing upwards (wrapping) from there. The network
/// address, and for IPv4 the broadcast address, are never handed out. `taken_at_most` bounds how
/// many addresses `is_taken` accepts: the first free address is always within that many + 1
/// probes, so any bound gives the same answer.
pub fn cluster_ip(
    cidr: &IpNet,
    seed: u64,
    taken_at_most: usize,
    is_taken: impl Fn(&IpAddr) -> bool,
) -> Option<IpAddr> {
    let cidr = cidr.trunc();
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    // Offsets 1..=usable; huge IPv6 ranges are capped: 2^64 candidates are plenty.
    let span: u128 = 1u128 << host_bits.min(64);
    let usable = match cidr {
        IpNet::V4(_) => span.checked_sub(2)?,
        IpNet::V6(_) => span.checked_sub(1)?,
    };
    if usable == 0 {
        return None;
    }
    let base: u128 = match cidr.network() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let start = u128::from(seed) % usable;
    // Each taken address can push the probe one step, so this many probes always suffice.
    let probes = (taken_at_most as u128 + 1).min(usable);
    (0..probes).find_map(|i| {
        let offset = 1 + (start + i) % usable;
        let ip = match cidr {
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(base + offset).ok()?)),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(base + offset)),
        };
        (!is_taken(&ip)).then_some(ip)
    })
}

/// A free port of `range` chosen by `seed`, probing upwards (wrapping).
pub fn node_port(
    range: &RangeInclusive<u16>,
    seed: u64,
    is_taken: impl Fn(&u16) -> bool,
) -> Option<u16> {
    if range.is_empty() {
        return None;
    }
    let size = u64::from(*range.end()) - u64::from(*range.start()) + 1;
    let start = seed % size;
    (0..size).find_map(|i| {
        let port = u16::try_from(u64::from(*range.start()) + (start + i) % size).ok()?;
        (!is_taken(&port)).then_some(port)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn cluster_ip(cidr: &IpNet, seed: u64, taken: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        super::cluster_ip(cidr, seed, taken.len(), |ip| taken.contains(ip))
    }

    fn node_port(range: &RangeInclusive<u16>, seed: u64, taken: &BTreeSet<u16>) -> Option<u16> {
        super::node_port(range, seed, |port| taken.contains(port))
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn cluster_ip_skips_network_broadcast_and_taken() {
        let cidr: IpNet = "10.96.0.0/30".parse().unwrap();
        let mut taken = BTreeSet::new();
        // /30: only .1 and .2 are usable.
        let first = cluster_ip(&cidr, 0, &taken).unwrap();
        assert_eq!(first, "10.96.0.1".parse::<IpAddr>().unwrap());
        taken.insert(first);
        assert_eq!(
            cluster_ip(&cidr, 0, &taken),
            Some("10.96.0.2".parse().unwrap())
        );
        taken.insert("10.96.0.2".parse().unwrap());
        assert_eq!(cluster_ip(&cidr, 0, &taken), None);
        assert_eq!(
            cluster_ip(&"10.0.0.1/32".parse().unwrap(), 5, &BTreeSet::new()),
            None
        );
    }

    #[test]
    fn cluster_ip_wraps_around() {
        let cidr: IpNet = "10.0.0.0/29".parse().unwrap(); // usable .1 - .6
        let taken: BTreeSet<IpAddr> = ["10.0.0.6".parse().unwrap()].into();
        // seed 5 -> offset 6 (taken) -> wraps to .1
        assert_eq!(
            cluster_ip(&cidr, 5, &taken),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn cluster_ip_v6_uses_the_last_address_too() {
        let cidr: IpNet = "fd00::/126".parse().unwrap(); // ::1 - ::3
        assert_eq!(
            cluster_ip(&cidr, 2, &BTreeSet::new()),
            Some("fd00::3".parse().unwrap())
        );
        let big: IpNet = "fd00:10:96::/48".parse().unwrap();
        let ip = cluster_ip(&big, u64::MAX, &BTreeSet::new()).unwrap();
        assert!(big.contains(&ip));
    }

    #[test]
    fn node_port_probes_and_wraps() {
        let range = 30000..=30002;
        let taken: BTreeSet<u16> = [30002, 30000].into();
        assert_eq!(node_port(&range, 2, &taken), Some(30001));
        let all: BTreeSet<u16> = [30000, 30001, 30002].into();
        assert_eq!(node_port(&range, 2, &all), None);
        assert_eq!(
            node_port(&(65535..=65535), 7, &BTreeSet::new()),
            Some(65535)
        );
    }
}
