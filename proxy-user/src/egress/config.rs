//! What the operator declares: the cluster egress addresses, which namespaces may use each, the
//! default per IP family, and how the addresses are elected and announced.
//!
//! Only declared addresses exist. A Service naming another address in
//! `extproxy.io/cluster-egress-ip` gets an error, not an address: a typo must not make a node
//! add some other team's (or the router's) address to its uplink.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use thiserror::Error;

/// Lease names are `extproxy-egress-` and the address, every IPv6 group written out, so that a
/// name is a valid DNS label and tells its address back.
pub const LEASE_PREFIX: &str = "extproxy-egress-";

/// Namespace patterns: exact names or globs (`*` matches any run of characters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespacePatterns(Vec<String>);

impl NamespacePatterns {
    /// Every namespace.
    pub fn any() -> Self {
        NamespacePatterns(vec!["*".to_owned()])
    }

    pub fn matches(&self, namespace: &str) -> bool {
        self.0
            .iter()
            .any(|p| glob(p.as_bytes(), namespace.as_bytes()))
    }

    pub fn is_any(&self) -> bool {
        self.0.iter().any(|p| p == "*")
    }
}

impl fmt::Display for NamespacePatterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// `*` matches any run of characters (namespace allow-lists, here and in translation).
pub(crate) fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

/// One `--cluster-egress-ip ADDR[=NS,...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressSpec {
    pub address: IpAddr,
    pub namespaces: NamespacePatterns,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0}: not an IP address (expected ADDR or ADDR=NAMESPACE,...)")]
    BadAddress(String),
    #[error(
        "{0}: not usable as a cluster egress address (unspecified, loopback, multicast, \
         broadcast or link-local)"
    )]
    Unusable(IpAddr),
    #[error("{spec}: namespace pattern {pattern:?} is not a namespace name or glob")]
    BadNamespace { spec: String, pattern: String },
    #[error("--cluster-egress-ip {0} is given twice")]
    Duplicate(IpAddr),
    #[error(
        "--cluster-egress-default {0} is not declared: add --cluster-egress-ip {0}[=NAMESPACES]"
    )]
    UndeclaredDefault(IpAddr),
    #[error("--cluster-egress-default: more than one {0} address ({1} and {2})")]
    TwoDefaults(&'static str, IpAddr, IpAddr),
    #[error("{0}: expected ADDR=NODE_IP")]
    BadOwner(String),
    #[error("--cluster-egress-owner {0}: the owner's node address must be IPv4 (the tunnel's)")]
    OwnerNotV4(String),
    #[error("--cluster-egress-owner {0} is not declared: add --cluster-egress-ip {0}")]
    UndeclaredOwner(IpAddr),
    #[error("--cluster-egress-owner {0} is given twice")]
    TwoOwners(IpAddr),
    #[error(
        "--cluster-egress-lease-duration {0}s: at least 2 s (the holder renews every \
         --cluster-egress-renew-interval and gives the address up a third before the end)"
    )]
    LeaseTooShort(u32),
    #[error(
        "--cluster-egress-renew-interval {interval:?} must be under a third of the lease \
         ({lease:?}): the holder gives the address up when it has not renewed for two thirds"
    )]
    RenewTooSlow { interval: Duration, lease: Duration },
}

impl std::str::FromStr for AddressSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, namespaces) = match s.split_once('=') {
            Some((a, n)) => (a.trim(), Some(n)),
            None => (s.trim(), None),
        };
        let address: IpAddr = addr
            .parse()
            .map_err(|_| ConfigError::BadAddress(s.to_owned()))?;
        if !usable(address) {
            return Err(ConfigError::Unusable(address));
        }
        let namespaces = match namespaces {
            None => NamespacePatterns::any(),
            Some(list) => {
                let mut patterns = Vec::new();
                for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    if !namespace_pattern(p) {
                        return Err(ConfigError::BadNamespace {
                            spec: s.to_owned(),
                            pattern: p.to_owned(),
                        });
                    }
                    patterns.push(p.to_owned());
                }
                if patterns.is_empty() {
                    return Err(ConfigError::BadNamespace {
                        spec: s.to_owned(),
                        pattern: String::new(),
                    });
                }
                NamespacePatterns(patterns)
            }
        };
        Ok(AddressSpec {
            address,
            namespaces,
        })
    }
}

/// A namespace name (DNS label) in which `*` may stand for any run of characters.
fn namespace_pattern(p: &str) -> bool {
    p.len() <= 63
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*')
}

/// An address one node can own and announce on a LAN.
fn usable(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_link_local())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_unicast_link_local())
        }
    }
}

/// One `--cluster-egress-owner ADDR=NODE_IP` (manifest mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerSpec {
    pub address: IpAddr,
    pub node: std::net::Ipv4Addr,
}

impl std::str::FromStr for OwnerSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, n) = s
            .split_once('=')
            .ok_or_else(|| ConfigError::BadOwner(s.to_owned()))?;
        let address = a
            .trim()
            .parse()
            .map_err(|_| ConfigError::BadOwner(s.to_owned()))?;
        let node: IpAddr = n
            .trim()
            .parse()
            .map_err(|_| ConfigError::BadOwner(s.to_owned()))?;
        let IpAddr::V4(node) = node else {
            return Err(ConfigError::OwnerNotV4(s.to_owned()));
        };
        Ok(OwnerSpec { address, node })
    }
}

/// The cluster egress addresses and who may use them: what translation asks when a Service
/// names one, or has none and a default applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterEgressConfig {
    pub default_v4: Option<IpAddr>,
    pub default_v6: Option<IpAddr>,
    /// Every declared address and the namespaces whose Services may use it.
    pub allowed: BTreeMap<IpAddr, NamespacePatterns>,
}

impl ClusterEgressConfig {
    /// From `--cluster-egress-ip` and `--cluster-egress-default`.
    pub fn new(specs: &[AddressSpec], defaults: &[IpAddr]) -> Result<Self, ConfigError> {
        let mut allowed = BTreeMap::new();
        for spec in specs {
            if allowed
                .insert(spec.address, spec.namespaces.clone())
                .is_some()
            {
                return Err(ConfigError::Duplicate(spec.address));
            }
        }
        let mut config = ClusterEgressConfig {
            allowed,
            ..Default::default()
        };
        for d in defaults {
            if !config.allowed.contains_key(d) {
                return Err(ConfigError::UndeclaredDefault(*d));
            }
            let (slot, family) = if d.is_ipv4() {
                (&mut config.default_v4, "IPv4")
            } else {
                (&mut config.default_v6, "IPv6")
            };
            if let Some(previous) = slot.replace(*d)
                && previous != *d
            {
                return Err(ConfigError::TwoDefaults(family, previous, *d));
            }
        }
        Ok(config)
    }

    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }

    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.allowed.keys().copied()
    }

    /// Whether Services of `namespace` may use `addr` (from their `extproxy.io/cluster-egress-ip`
    /// annotation); the error is the diagnostic's text.
    pub fn allowed(&self, addr: IpAddr, namespace: &str) -> Result<(), String> {
        let Some(patterns) = self.allowed.get(&addr) else {
            let declared: Vec<String> = self.allowed.keys().map(IpAddr::to_string).collect();
            return Err(if declared.is_empty() {
                format!(
                    "{addr} is not a cluster egress address: none is declared (extproxy's \
                     --cluster-egress-ip)"
                )
            } else {
                format!(
                    "{addr} is not a cluster egress address (declared: {}); a typo? Declaring \
                     one takes --cluster-egress-ip on extproxy",
                    declared.join(", ")
                )
            });
        };
        if patterns.matches(namespace) {
            Ok(())
        } else {
            Err(format!(
                "namespace {namespace} may not use cluster egress address {addr} (allowed: \
                 {patterns})"
            ))
        }
    }

    /// What translation needs: which Services may use which address, and the defaults.
    pub fn rules(&self) -> crate::translate::ClusterEgressRules {
        crate::translate::ClusterEgressRules {
            addresses: self
                .allowed
                .iter()
                .map(|(addr, patterns)| (*addr, patterns.0.clone()))
                .collect(),
            default_v4: self.default_v4,
            default_v6: self.default_v6,
        }
    }

    /// The cluster egress address of `family` that Services of `namespace` without an egress
    /// annotation use, if the default of that family admits the namespace.
    pub fn default_for(&self, ipv6: bool, namespace: &str) -> Option<IpAddr> {
        let d = if ipv6 {
            self.default_v6
        } else {
            self.default_v4
        }?;
        self.allowed
            .get(&d)
            .is_some_and(|p| p.matches(namespace))
            .then_some(d)
    }
}

/// What the holder does when it cannot renew its Lease (see DESIGN.md, "Cluster egress").
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fencing {
    /// Give the address up (remove it, stop announcing) before another node could take the
    /// Lease: never two nodes announcing it, but an API server outage longer than two thirds of
    /// the Lease takes the address off the network until the API server is back.
    Fence,
    /// Keep the address through API server outages: forwarding goes on, but a holder cut off
    /// from the API server alone keeps answering for the address after another node took it
    /// (both answer ARP until the partition heals).
    Keep,
}

/// How the owner makes the network send the address's packets to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AnnounceMode {
    /// Add the address to the uplink and send gratuitous ARP (IPv4) or an unsolicited neighbour
    /// advertisement with the override flag (IPv6): a LAN.
    Arp,
    /// Add the address to the uplink, announce nothing: something else (a BGP speaker, a cloud
    /// controller reading the Lease) moves the address.
    None,
}

/// Election timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease stays valid after its last renewal, as the other candidates measure it
    /// (from when they saw the renewal, on their own clock).
    pub lease: Duration,
    /// How often the holder renews, and how often candidates look for an expired Lease.
    pub renew_interval: Duration,
    /// The holder gives the address up this long after sending its last successful renewal:
    /// before any other candidate could take the Lease.
    pub renew_deadline: Duration,
}

impl Timing {
    pub const DEFAULT_LEASE_SECS: u32 = 5;
    pub const DEFAULT_RENEW_INTERVAL: Duration = Duration::from_secs(1);

    /// `lease_secs` whole seconds (Leases count in seconds); the deadline is two thirds of it.
    pub fn new(lease_secs: u32, renew_interval: Duration) -> Result<Self, ConfigError> {
        if lease_secs < 2 {
            return Err(ConfigError::LeaseTooShort(lease_secs));
        }
        let lease = Duration::from_secs(u64::from(lease_secs));
        if renew_interval.is_zero() || renew_interval * 3 > lease {
            return Err(ConfigError::RenewTooSlow {
                interval: renew_interval,
                lease,
            });
        }
        Ok(Timing {
            lease,
            renew_interval,
            renew_deadline: lease * 2 / 3,
        })
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing::new(Self::DEFAULT_LEASE_SECS, Self::DEFAULT_RENEW_INTERVAL)
            .expect("the defaults are valid")
    }
}

/// The Lease of `addr`: `extproxy-egress-10-0-0-50`, `extproxy-egress-fd00-0-0-0-0-0-0-50`.
/// Every IPv6 group is written (no `::`), so the name never ends in `-` or holds `--`, and it is
/// one per address.
pub fn lease_name(addr: IpAddr) -> String {
    let body = match addr {
        IpAddr::V4(a) => a
            .octets()
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join("-"),
        IpAddr::V6(a) => a
            .segments()
            .iter()
            .map(|s| format!("{s:x}"))
            .collect::<Vec<_>>()
            .join("-"),
    };
    format!("{LEASE_PREFIX}{body}")
}

/// The address a Lease name stands for (the inverse of [`lease_name`]).
pub fn lease_address(name: &str) -> Option<IpAddr> {
    let body = name.strip_prefix(LEASE_PREFIX)?;
    let parts: Vec<&str> = body.split('-').collect();
    match parts.len() {
        4 => {
            let mut octets = [0u8; 4];
            for (o, p) in octets.iter_mut().zip(&parts) {
                *o = p.parse().ok()?;
            }
            Some(IpAddr::from(octets))
        }
        8 => {
            let mut segments = [0u16; 8];
            for (s, p) in segments.iter_mut().zip(&parts) {
                *s = u16::from_str_radix(p, 16).ok()?;
            }
            Some(IpAddr::from(segments))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn spec(s: &str) -> AddressSpec {
        s.parse().unwrap()
    }

    #[test]
    fn address_specs_name_namespaces_or_default_to_all() {
        let open = spec("10.0.0.50");
        assert_eq!(open.address, ip("10.0.0.50"));
        assert!(open.namespaces.is_any() && open.namespaces.matches("anything"));
        let closed = spec("fd00::50=shop, pay-*");
        assert!(closed.namespaces.matches("shop"));
        assert!(closed.namespaces.matches("pay-eu"));
        assert!(!closed.namespaces.matches("shop2"));
        assert!(!closed.namespaces.matches("default"));
        assert_eq!(closed.namespaces.to_string(), "shop,pay-*");
        assert_eq!(
            "10.0.0.5x".parse::<AddressSpec>(),
            Err(ConfigError::BadAddress("10.0.0.5x".into()))
        );
        assert_eq!(
            "127.0.0.1".parse::<AddressSpec>(),
            Err(ConfigError::Unusable(ip("127.0.0.1")))
        );
        assert_eq!(
            "fe80::1".parse::<AddressSpec>(),
            Err(ConfigError::Unusable(ip("fe80::1")))
        );
        assert!(matches!(
            "10.0.0.50=Shop".parse::<AddressSpec>(),
            Err(ConfigError::BadNamespace { .. })
        ));
        assert!(matches!(
            "10.0.0.50=".parse::<AddressSpec>(),
            Err(ConfigError::BadNamespace { .. })
        ));
    }

    #[test]
    fn only_declared_addresses_in_allowed_namespaces_are_usable() {
        let config = ClusterEgressConfig::new(
            &[spec("10.0.0.50=shop,pay-*"), spec("10.0.0.60")],
            &[ip("10.0.0.50")],
        )
        .unwrap();
        assert_eq!(config.allowed(ip("10.0.0.50"), "shop"), Ok(()));
        assert_eq!(config.allowed(ip("10.0.0.60"), "kube-system"), Ok(()));
        let typo = config.allowed(ip("10.0.0.51"), "shop").unwrap_err();
        assert!(
            typo.starts_with(
                "10.0.0.51 is not a cluster egress address (declared: 10.0.0.50, 10.0.0.60)"
            ),
            "{typo}"
        );
        let other = config.allowed(ip("10.0.0.50"), "default").unwrap_err();
        assert_eq!(
            other,
            "namespace default may not use cluster egress address 10.0.0.50 (allowed: shop,pay-*)"
        );
        assert_eq!(config.default_for(false, "pay-us"), Some(ip("10.0.0.50")));
        assert_eq!(config.default_for(false, "default"), None, "not allowed");
        assert_eq!(config.default_for(true, "shop"), None, "no IPv6 default");
        assert_eq!(
            config.addresses().collect::<Vec<_>>(),
            vec![ip("10.0.0.50"), ip("10.0.0.60")]
        );
        let none = ClusterEgressConfig::default();
        assert!(none.is_empty());
        assert!(
            none.allowed(ip("10.0.0.50"), "shop")
                .unwrap_err()
                .contains("none is declared")
        );
    }

    #[test]
    fn defaults_must_be_declared_and_one_per_family() {
        assert_eq!(
            ClusterEgressConfig::new(&[spec("10.0.0.50")], &[ip("10.0.0.51")]),
            Err(ConfigError::UndeclaredDefault(ip("10.0.0.51")))
        );
        assert_eq!(
            ClusterEgressConfig::new(
                &[spec("10.0.0.50"), spec("10.0.0.60")],
                &[ip("10.0.0.50"), ip("10.0.0.60")]
            ),
            Err(ConfigError::TwoDefaults(
                "IPv4",
                ip("10.0.0.50"),
                ip("10.0.0.60")
            ))
        );
        assert_eq!(
            ClusterEgressConfig::new(&[spec("10.0.0.50"), spec("10.0.0.50=x")], &[]),
            Err(ConfigError::Duplicate(ip("10.0.0.50")))
        );
        let dual = ClusterEgressConfig::new(
            &[spec("10.0.0.50"), spec("fd00::50")],
            &[ip("10.0.0.50"), ip("fd00::50")],
        )
        .unwrap();
        assert_eq!(dual.default_for(true, "x"), Some(ip("fd00::50")));
    }

    #[test]
    fn lease_names_fit_a_dns_label_and_give_the_address_back() {
        for (addr, name) in [
            ("10.0.0.50", "extproxy-egress-10-0-0-50"),
            ("fd00::50", "extproxy-egress-fd00-0-0-0-0-0-0-50"),
            ("::ffff:1.2.3.4", "extproxy-egress-0-0-0-0-0-ffff-102-304"),
            (
                "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
                "extproxy-egress-2001-db8-ffff-ffff-ffff-ffff-ffff-ffff",
            ),
        ] {
            assert_eq!(lease_name(ip(addr)), name);
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            );
            assert!(!name.ends_with('-') && !name.contains("--"));
            assert_eq!(lease_address(name), Some(ip(addr)));
        }
        assert_eq!(lease_address("extproxy-egress-1-2-3"), None);
        assert_eq!(lease_address("other-10-0-0-50"), None);
        assert_eq!(lease_address("extproxy-egress-300-0-0-1"), None);
    }

    #[test]
    fn owners_name_an_ipv4_node() {
        let o: OwnerSpec = "fd00::50=10.0.0.2".parse().unwrap();
        assert_eq!(o.address, ip("fd00::50"));
        assert_eq!(o.node, "10.0.0.2".parse::<std::net::Ipv4Addr>().unwrap());
        assert!(matches!(
            "10.0.0.50=fd00::2".parse::<OwnerSpec>(),
            Err(ConfigError::OwnerNotV4(_))
        ));
        assert!(matches!(
            "10.0.0.50".parse::<OwnerSpec>(),
            Err(ConfigError::BadOwner(_))
        ));
    }

    #[test]
    fn timing_keeps_the_deadline_before_the_lease_ends() {
        let t = Timing::default();
        assert_eq!(t.lease, Duration::from_secs(5));
        assert_eq!(t.renew_interval, Duration::from_secs(1));
        assert!(t.renew_deadline < t.lease && t.renew_deadline > t.renew_interval * 2);
        assert_eq!(
            Timing::new(1, Duration::from_millis(200)),
            Err(ConfigError::LeaseTooShort(1))
        );
        assert!(matches!(
            Timing::new(3, Duration::from_millis(1500)),
            Err(ConfigError::RenewTooSlow { .. })
        ));
    }
}
