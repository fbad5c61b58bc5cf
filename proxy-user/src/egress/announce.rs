//! Telling the network that a cluster egress address moved to this node.
//!
//! On a LAN the router (and any other neighbour) still maps the address to the previous owner's
//! MAC address: [`Neighbours`] overrides that with gratuitous ARP (IPv4: a broadcast ARP request
//! and reply whose sender and target are the address) or an unsolicited neighbour advertisement
//! to all nodes with the override flag (IPv6, RFC 4861 7.2.6), sent from the uplink through a
//! packet socket (CAP_NET_RAW).
//!
//! Clouds do not learn addresses from ARP: AKS, EKS and GKE move a secondary address between VMs
//! through their API (or advertise it over BGP). That is another [`Announcer`]: it is told when
//! this node gains and loses the address and does what the cloud needs; the Lease, readable by
//! anyone, can drive an external controller too (`--cluster-egress-announce none`).

use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// How a node makes the network send a cluster egress address's packets to it.
pub trait Announcer: Send + Sync {
    /// For the log.
    fn name(&self) -> &'static str;
    /// This node now owns `addr`, which is on interface `iface` (called again a few times over
    /// the next seconds: announcements get lost).
    fn announce(&self, iface: &str, addr: IpAddr) -> io::Result<()>;
    /// This node no longer owns `addr` (ARP/NA: the new owner's announcement does the work).
    fn withdraw(&self, iface: &str, addr: IpAddr) -> io::Result<()>;
}

/// Nothing to say: something else moves the address (BGP, a cloud controller).
pub struct Silent;

impl Announcer for Silent {
    fn name(&self) -> &'static str {
        "none"
    }

    fn announce(&self, _iface: &str, _addr: IpAddr) -> io::Result<()> {
        Ok(())
    }

    fn withdraw(&self, _iface: &str, _addr: IpAddr) -> io::Result<()> {
        Ok(())
    }
}

/// Gratuitous ARP and unsolicited neighbour advertisements, for LANs.
pub struct Neighbours;

impl Announcer for Neighbours {
    fn name(&self) -> &'static str {
        "gratuitous ARP / unsolicited NA"
    }

    fn announce(&self, iface: &str, addr: IpAddr) -> io::Result<()> {
        let index = super::uplink::index(iface)?;
        let mac = hardware_address(iface)?;
        match addr {
            IpAddr::V4(a) => {
                let sock = packet_socket(ETH_P_ARP)?;
                for op in [ARP_REQUEST, ARP_REPLY] {
                    send(
                        &sock,
                        index,
                        ETH_P_ARP,
                        BROADCAST,
                        &gratuitous_arp(mac, a.octets(), op),
                    )?;
                }
            }
            IpAddr::V6(a) => {
                let sock = packet_socket(ETH_P_IPV6)?;
                send(
                    &sock,
                    index,
                    ETH_P_IPV6,
                    ALL_NODES_MAC,
                    &unsolicited_na(mac, a),
                )?;
            }
        }
        Ok(())
    }

    fn withdraw(&self, _iface: &str, _addr: IpAddr) -> io::Result<()> {
        Ok(())
    }
}

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const BROADCAST: [u8; 6] = [0xff; 6];
/// ff02::1 on Ethernet.
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const NA_FLAG_OVERRIDE: u32 = 0x2000_0000;
const OPTION_TARGET_LINK_LAYER_ADDRESS: u8 = 2;

/// A gratuitous ARP packet (no Ethernet header): sender and target are both `addr`; a request
/// asks nobody, a reply answers everybody; either updates an existing entry in Linux, routers
/// and switches.
pub fn gratuitous_arp(mac: [u8; 6], addr: [u8; 4], op: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    p.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p.push(6);
    p.push(4);
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&mac);
    p.extend_from_slice(&addr);
    p.extend_from_slice(&if op == ARP_REPLY { mac } else { [0; 6] });
    p.extend_from_slice(&addr);
    p
}

/// An unsolicited neighbour advertisement for `target` to all nodes (IPv6 header included): hop
/// limit 255 (receivers drop anything else), solicited flag clear, override flag set so
/// neighbours replace the MAC address they have, and our MAC address as the target link-layer
/// address option.
pub fn unsolicited_na(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(32);
    icmp.push(ICMPV6_NEIGHBOUR_ADVERTISEMENT);
    icmp.push(0);
    icmp.extend_from_slice(&[0, 0]);
    icmp.extend_from_slice(&NA_FLAG_OVERRIDE.to_be_bytes());
    icmp.extend_from_slice(&target.octets());
    icmp.push(OPTION_TARGET_LINK_LAYER_ADDRESS);
    icmp.push(1);
    icmp.extend_from_slice(&mac);
    let sum = icmpv6_checksum(&target, &ALL_NODES, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut p = Vec::with_capacity(40 + icmp.len());
    p.extend_from_slice(&0x6000_0000u32.to_be_bytes());
    p.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    p.push(58); // ICMPv6
    p.push(255);
    // Linux advertises its own addresses from themselves, too.
    p.extend_from_slice(&target.octets());
    p.extend_from_slice(&ALL_NODES.octets());
    p.extend_from_slice(&icmp);
    p
}

/// The ICMPv6 checksum of `message` (its checksum field zero) between `src` and `dst`.
pub fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, message: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for chunk in bytes.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(message.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The MAC address of `iface`, from the kernel of this network namespace (sysfs may show
/// another namespace's interfaces when the agent runs with `nsenter --net`).
pub fn hardware_address(iface: &str) -> io::Result<[u8; 6]> {
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if iface.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {iface} is too long"),
        ));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok(mac)
}

fn packet_socket(protocol: u16) -> io::Result<OwnedFd> {
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(protocol.to_be()),
        )
    };
    if raw < 0 {
        let err = io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EPERM) {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a packet socket needs CAP_NET_RAW (deploy/daemonset.yaml adds it)",
            )
        } else {
            err
        });
    }
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sends `payload` out of interface `index` to `dst`; the kernel writes the Ethernet header.
fn send(sock: &OwnedFd, index: u32, protocol: u16, dst: [u8; 6], payload: &[u8]) -> io::Result<()> {
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = index as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&dst);
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

    #[test]
    fn gratuitous_arp_names_the_address_as_sender_and_target() {
        let p = gratuitous_arp(MAC, [10, 0, 0, 50], ARP_REQUEST);
        assert_eq!(p.len(), 28);
        assert_eq!(&p[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &MAC, "sender MAC");
        assert_eq!(&p[14..18], &[10, 0, 0, 50], "sender IP");
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &[10, 0, 0, 50], "target IP");
        let r = gratuitous_arp(MAC, [10, 0, 0, 50], ARP_REPLY);
        assert_eq!(&r[6..8], &[0, 2]);
        assert_eq!(&r[18..24], &MAC);
    }

    #[test]
    fn unsolicited_na_is_a_valid_override_advertisement() {
        let target: Ipv6Addr = "fd00::50".parse().unwrap();
        let p = unsolicited_na(MAC, target);
        assert_eq!(p.len(), 40 + 32);
        assert_eq!(p[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 32, "payload length");
        assert_eq!(p[6], 58);
        assert_eq!(p[7], 255, "hop limit: receivers drop NAs with any other");
        assert_eq!(&p[8..24], &target.octets());
        assert_eq!(&p[24..40], &ALL_NODES.octets());
        let icmp = &p[40..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4], 0x20, "override set; solicited and router clear");
        assert_eq!(&icmp[8..24], &target.octets());
        assert_eq!(&icmp[24..26], &[2, 1]);
        assert_eq!(&icmp[26..32], &MAC);
        // With the checksum in place the one's complement sum over the pseudo-header and the
        // message is all ones: recomputing it over the filled-in message gives zero.
        assert_eq!(icmpv6_checksum(&target, &ALL_NODES, icmp), 0);
        // And it is not trivially so: another source gives another checksum.
        let other: Ipv6Addr = "fd00::51".parse().unwrap();
        assert_ne!(icmpv6_checksum(&other, &ALL_NODES, icmp), 0);
    }

    #[test]
    fn the_loopback_has_a_zero_hardware_address() {
        assert_eq!(hardware_address("lo").unwrap(), [0; 6]);
        assert!(hardware_address("no-such-if0").is_err());
    }
}
