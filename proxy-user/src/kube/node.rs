//! Facts about this node: the addresses NodePorts are served on and the egress (SNAT) address,
//! from the Node object with flags and the uplink as overrides and fallbacks; and the uplink
//! itself when `--iface auto` asks for the interface of the default route.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use k8s_openapi::api::core::v1::Node;

use crate::host::join_addrs;

/// What the operator fixed on the command line, and what the uplink has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeOverrides {
    /// `--egress-ip`: wins over the Node's InternalIP of the same family.
    pub egress_ips: Vec<IpAddr>,
    /// `--node-ip`: replaces the Node's addresses for NodePorts.
    pub node_ips: Vec<IpAddr>,
    /// Addresses of the uplink(s): used only when the Node reports none.
    pub iface_addrs: Vec<IpAddr>,
}

/// The node facts a translation is made with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// IPv4 first: each family's `--egress-ip` addresses (several make a pool), else the
    /// Node's first InternalIP of the family.
    pub egress: Vec<IpAddr>,
    /// Addresses NodePorts listen on.
    pub node_ports: Vec<IpAddr>,
}

impl fmt::Display for NodeFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "egress (SNAT) {}; NodePorts on {}",
            join_addrs(&self.egress, ", ", "none"),
            join_addrs(&self.node_ports, ", ", "none")
        )
    }
}

/// The Node's addresses of one type ("InternalIP", "ExternalIP"), in the Node's order.
/// Hostnames and unparsable entries are skipped: they cannot be frontends.
fn node_addresses(node: &Node, kind: &str) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == kind)
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// Resolves egress and NodePort addresses. The Node is the source of truth in a cluster (it is
/// what kube-proxy and the kubelet use); flags override it; the uplink's addresses stand in only
/// when the Node is missing or reports no IP at all, so a wrong --node-name still forwards.
pub fn resolve(node: Option<&Node>, overrides: &NodeOverrides) -> NodeFacts {
    let internal = node
        .map(|n| node_addresses(n, "InternalIP"))
        .unwrap_or_default();
    let external = node
        .map(|n| node_addresses(n, "ExternalIP"))
        .unwrap_or_default();
    let from_node = !internal.is_empty() || !external.is_empty();

    let egress_candidates = if from_node {
        &internal
    } else {
        &overrides.iface_addrs
    };
    let mut egress = Vec::new();
    for v6 in [false, true] {
        let flagged: Vec<IpAddr> = overrides
            .egress_ips
            .iter()
            .filter(|a| a.is_ipv6() == v6)
            .copied()
            .collect();
        if !flagged.is_empty() {
            egress.extend(flagged);
        } else if let Some(a) = egress_candidates.iter().find(|a| a.is_ipv6() == v6) {
            egress.push(*a);
        }
    }

    let node_ports = if !overrides.node_ips.is_empty() {
        overrides.node_ips.clone()
    } else if from_node {
        let mut all = internal;
        for a in external {
            if !all.contains(&a) {
                all.push(a);
            }
        }
        all
    } else {
        overrides.iface_addrs.clone()
    };
    NodeFacts { egress, node_ports }
}

/// The interface(s) of the default route: the IPv4 one, then the IPv6 one if it differs. The
/// route with the lowest metric wins in each family.
pub fn default_route_interfaces() -> std::io::Result<Vec<String>> {
    let v4 = std::fs::read_to_string("/proc/net/route")?;
    // A kernel without IPv6 has no ipv6_route: that family simply has no default route.
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let mut out = Vec::new();
    for iface in [default_v4(&v4), default_v6(&v6)].into_iter().flatten() {
        if !out.contains(&iface) {
            out.push(iface);
        }
    }
    if out.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the node has no default route: name the uplink with --iface",
        ));
    }
    Ok(out)
}

const RTF_UP: u32 = 0x1;
const RTF_REJECT: u32 = 0x200;

/// `/proc/net/route`: Iface Destination Gateway Flags RefCnt Use Metric Mask ...
fn default_v4(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let metric: u32 = f.get(6)?.parse().ok()?;
            let default = *f.get(1)? == "00000000" && *f.get(7)? == "00000000";
            (default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0)
                .then(|| (metric, f[0].to_owned()))
        })
        .min()
        .map(|(_, iface)| iface)
}

/// `/proc/net/ipv6_route`: dest plen src plen nexthop metric refcnt use flags iface. The kernel
/// lists an unreachable default on `lo`; that is not an uplink.
fn default_v6(table: &str) -> Option<String> {
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let dest = u128::from_str_radix(f.first()?, 16).ok()?;
            let plen = u8::from_str_radix(f.get(1)?, 16).ok()?;
            let metric = u32::from_str_radix(f.get(5)?, 16).ok()?;
            let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
            let iface = *f.get(9)?;
            let default = Ipv6Addr::from(dest).is_unspecified() && plen == 0;
            (default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0 && iface != "lo")
                .then(|| (metric, iface.to_owned()))
        })
        .min()
        .map(|(_, iface)| iface)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn node(addresses: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: (*t).to_owned(),
                            address: (*a).to_owned(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn node_addresses_give_egress_and_node_ports() {
        let n = node(&[
            ("InternalIP", "10.240.0.10"),
            ("ExternalIP", "198.51.100.10"),
            ("Hostname", "node-a"),
            ("InternalIP", "fd00::10"),
        ]);
        let facts = resolve(
            Some(&n),
            &NodeOverrides {
                iface_addrs: ips(&["192.168.1.5"]),
                ..Default::default()
            },
        );
        assert_eq!(facts.egress, ips(&["10.240.0.10", "fd00::10"]));
        assert_eq!(
            facts.node_ports,
            ips(&["10.240.0.10", "fd00::10", "198.51.100.10"])
        );
    }

    #[test]
    fn flags_override_the_node_per_family() {
        let n = node(&[("InternalIP", "10.240.0.10"), ("InternalIP", "fd00::10")]);
        let facts = resolve(
            Some(&n),
            &NodeOverrides {
                egress_ips: ips(&["203.0.113.1"]),
                node_ips: ips(&["10.0.0.1"]),
                iface_addrs: Vec::new(),
            },
        );
        assert_eq!(facts.egress, ips(&["203.0.113.1", "fd00::10"]));
        assert_eq!(facts.node_ports, ips(&["10.0.0.1"]));
    }

    #[test]
    fn several_flag_addresses_of_a_family_are_its_pool() {
        let n = node(&[("InternalIP", "10.240.0.10"), ("InternalIP", "fd00::10")]);
        let facts = resolve(
            Some(&n),
            &NodeOverrides {
                egress_ips: ips(&["203.0.113.1", "203.0.113.2"]),
                ..Default::default()
            },
        );
        assert_eq!(
            facts.egress,
            ips(&["203.0.113.1", "203.0.113.2", "fd00::10"])
        );
    }

    #[test]
    fn a_node_without_addresses_falls_back_to_the_uplink() {
        let overrides = NodeOverrides {
            iface_addrs: ips(&["192.168.1.5", "2001:db8::5"]),
            ..Default::default()
        };
        for n in [None, Some(node(&[("Hostname", "node-a")]))] {
            let facts = resolve(n.as_ref(), &overrides);
            assert_eq!(facts.egress, ips(&["192.168.1.5", "2001:db8::5"]));
            assert_eq!(facts.node_ports, overrides.iface_addrs);
        }
    }

    #[test]
    fn default_routes_are_found_in_proc_tables() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  wlan0\t00000000\t010200C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
                  eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                  eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_v4(v4).as_deref(), Some("eth0"));
        let v6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth1\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        assert_eq!(default_v6(v6).as_deref(), Some("eth1"));
        assert_eq!(default_v6("").as_deref(), None);
        assert_eq!(
            default_v4("Iface\tDestination\n")
                .as_deref()
                .or(default_v6("").as_deref()),
            None
        );
    }
}
