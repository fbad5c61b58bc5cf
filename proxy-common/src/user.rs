//! Host-side conveniences for the ABI types (feature `user`).

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::*;

impl Addr {
    pub fn from_octets(octets: [u8; 16]) -> Self {
        let mut words = [0u32; 4];
        for (i, w) in words.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([
                octets[4 * i],
                octets[4 * i + 1],
                octets[4 * i + 2],
                octets[4 * i + 3],
            ]);
        }
        Addr { words }
    }

    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (i, w) in self.words.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        out
    }

    pub fn to_ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.octets());
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

impl From<IpAddr> for Addr {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => v4.into(),
            IpAddr::V6(v6) => v6.into(),
        }
    }
}

impl From<Ipv4Addr> for Addr {
    fn from(ip: Ipv4Addr) -> Self {
        Addr::from_octets(ip.to_ipv6_mapped().octets())
    }
}

impl From<Ipv6Addr> for Addr {
    fn from(ip: Ipv6Addr) -> Self {
        Addr::from_octets(ip.octets())
    }
}

impl From<Addr> for IpAddr {
    fn from(a: Addr) -> Self {
        a.to_ip()
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_ip().fmt(f)
    }
}

/// A port in network order as stored in the maps.
pub const fn port_net(port: u16) -> u16 {
    port.to_be()
}

/// A port from network order (as stored in the maps) to a number.
pub const fn port_host(port_net: u16) -> u16 {
    u16::from_be(port_net)
}

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        _ => "?",
    }
}

/// Expected (key size, value size) of each map, to check pinned maps before adopting them.
/// Per-CPU values are reported per CPU.
pub fn map_layout(name: &str) -> Option<(usize, usize)> {
    use core::mem::size_of;
    Some(match name {
        MAP_CONFIG => (4, size_of::<Config>()),
        MAP_FRONTENDS => (size_of::<FrontendKey>(), size_of::<FrontendValue>()),
        MAP_SERVICES => (4, size_of::<ServiceValue>()),
        MAP_SLOTS => (size_of::<SlotKey>(), 4),
        MAP_BACKENDS => (4, size_of::<BackendValue>()),
        MAP_CT | MAP_CT_NEW => (size_of::<CtKey>(), size_of::<CtValue>()),
        MAP_REVNAT => (size_of::<RevNatKey>(), size_of::<RevNatValue>()),
        MAP_AFFINITY => (size_of::<AffinityKey>(), size_of::<AffinityValue>()),
        // LPM keys carry a u32 prefix length in front of the data.
        MAP_SRC_RANGES => (4 + size_of::<SrcRangeKey>(), 1),
        MAP_FRAGS => (size_of::<FragKey>(), size_of::<FragValue>()),
        MAP_COUNTERS => (4, 8),
        MAP_SVC_STATS => (4, size_of::<ServiceStats>()),
        MAP_FE_FILTER => (4, 8),
        // A ring buffer has neither keys nor values.
        MAP_EVENTS => (0, 0),
        MAP_EVENT_LIMIT => (4, size_of::<EventLimit>()),
        MAP_BACKEND_HEALTH => (4, size_of::<BackendHealth>()),
        MAP_CLUSTER_EGRESS => (size_of::<Addr>(), size_of::<ClusterEgress>()),
        MAP_TUNNEL_PEERS => (size_of::<Addr>(), 4),
        MAP_MAGLEV => (4, size_of::<MaglevTable>()),
        MAP_EGRESS_POOLS => (4, size_of::<EgressPool>()),
        MAP_SNAT_CURSOR => (4, 8),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn v4_addresses_are_mapped_and_round_trip() {
        let ip: IpAddr = "10.240.0.129".parse().unwrap();
        let a = Addr::from(ip);
        assert!(a.is_v4());
        assert_eq!(a.v4_raw().to_ne_bytes(), [10, 240, 0, 129]);
        assert_eq!(a.to_ip(), ip);
        assert_eq!(a.to_string(), "10.240.0.129");
    }

    #[test]
    fn v6_addresses_round_trip() {
        let ip: IpAddr = "fd00::1:2".parse().unwrap();
        let a = Addr::from(ip);
        assert!(!a.is_v4());
        assert_eq!(a.to_ip(), ip);
        assert_eq!(Addr::from_octets(a.octets()), a);
    }

    #[test]
    fn frontend_filter_bits_spread_like_random_ones() {
        // 10k ClusterIPs on one port, and one node address with 2768 NodePorts: random bits would
        // leave ~1 - e^-(n/bits) of them sharing, i.e. 3.7% and 1.0%.
        let mut bits = std::collections::HashSet::new();
        for i in 0..10_000u32 {
            let ip = IpAddr::from([10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            bits.insert(frontend_filter_bit(
                &Addr::from(ip),
                80u16.to_be(),
                PROTO_TCP,
            ));
        }
        assert!(bits.len() > 9_500, "10k ClusterIPs on {} bits", bits.len());
        let node = Addr::from(IpAddr::from([192, 168, 1, 10]));
        let mut bits = std::collections::HashSet::new();
        for port in 30_000..32_768u16 {
            bits.insert(frontend_filter_bit(&node, port.to_be(), PROTO_TCP));
        }
        assert!(bits.len() > 2_700, "2768 NodePorts on {} bits", bits.len());
        assert!(bits.iter().all(|b| *b < FE_FILTER_BITS));
    }

    #[test]
    fn counters_have_unique_indices_and_names() {
        let mut seen = std::collections::HashSet::new();
        for c in Counter::ALL {
            assert!((*c as u32) < COUNTER_SLOTS);
            assert!(seen.insert(c.name()), "duplicate name {}", c.name());
            assert_eq!(Counter::from_u32(*c as u32), Some(*c));
        }
    }

    #[test]
    fn src_range_prefix_covers_service_id_and_mapping() {
        assert_eq!(src_range_prefix_len(true, 32), 160);
        assert_eq!(src_range_prefix_len(true, 0), 128);
        assert_eq!(src_range_prefix_len(false, 64), 96);
    }
}
