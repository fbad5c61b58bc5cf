//! The owner's cluster egress address on its uplink, through rtnetlink: added as a host address
//! (/32, /128) with a finite lifetime the owner keeps extending while it holds the Lease, removed
//! when it does not.
//!
//! **The lifetime is the dead man's switch.** An agent that is killed, or hangs, stops extending
//! it, and the kernel removes the address by itself before another node may take the Lease (see
//! `lease.rs`): a dead agent never leaves its node answering ARP for an address another node
//! owns.
//!
//! **Never a source for the node's own traffic.** IPv6: the address is added deprecated
//! (preferred lifetime 0), which source address selection avoids (RFC 6724 rule 3), without
//! duplicate address detection (`nodad`: another node had it a moment ago, and DAD would hold it
//! tentative, unusable, for a second or more) and without a prefix route. IPv4 has no
//! deprecation; a /32 is primary only for itself, and routes keep choosing the address of the
//! subnet they lead to.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_CACHEINFO: u16 = 6;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const IFA_F_NOPREFIXROUTE: u32 = 0x200;
const RT_SCOPE_UNIVERSE: u8 = 0;
const NLMSG_HDRLEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
/// `ifa_cacheinfo`'s "forever".
pub const INFINITY_LIFE_TIME: u32 = u32::MAX;

/// How long the address stays if nobody extends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    Forever,
    Secs(u32),
}

impl Lifetime {
    fn valid(self) -> u32 {
        match self {
            Lifetime::Forever => INFINITY_LIFE_TIME,
            Lifetime::Secs(s) => s.max(1),
        }
    }
}

/// One address of one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub index: u32,
    pub address: IpAddr,
    pub prefix_len: u8,
    /// Seconds left (None: forever).
    pub valid_secs: Option<u32>,
}

impl InterfaceAddress {
    /// The address's subnet holds `addr`.
    pub fn covers(&self, addr: IpAddr) -> bool {
        match (self.address, addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let bits = u32::from(self.prefix_len.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// The index of interface `name`.
pub fn index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name}"),
        )),
        i => Ok(i),
    }
}

fn socket() -> io::Result<OwnedFd> {
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // A kernel that never answers must not hang the agent.
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(fd)
}

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An RTM_NEWADDR / RTM_DELADDR request for a host address `addr` on interface `index`.
pub fn address_message(
    ty: u16,
    flags: u16,
    seq: u32,
    index: u32,
    addr: IpAddr,
    lifetime: Option<Lifetime>,
) -> Vec<u8> {
    let mut m = vec![0u8; NLMSG_HDRLEN];
    m.push(family(addr));
    m.push(if addr.is_ipv4() { 32 } else { 128 });
    // Flags that fit 8 bits go here too, for kernels that ignore IFA_FLAGS.
    m.push(if addr.is_ipv6() { IFA_F_NODAD as u8 } else { 0 });
    m.push(RT_SCOPE_UNIVERSE);
    m.extend_from_slice(&index.to_ne_bytes());
    let bytes = octets(addr);
    attr(&mut m, IFA_LOCAL, &bytes);
    attr(&mut m, IFA_ADDRESS, &bytes);
    if let Some(lifetime) = lifetime {
        let valid = lifetime.valid();
        // IPv6: deprecated at once, so the node's own sockets never pick it as their source.
        let preferred = if addr.is_ipv6() { 0 } else { valid };
        let mut info = Vec::with_capacity(16);
        for v in [preferred, valid, 0, 0] {
            info.extend_from_slice(&v.to_ne_bytes());
        }
        attr(&mut m, IFA_CACHEINFO, &info);
    }
    if addr.is_ipv6() {
        attr(
            &mut m,
            IFA_FLAGS,
            &(IFA_F_NODAD | IFA_F_NOPREFIXROUTE).to_ne_bytes(),
        );
    }
    finish(&mut m, ty, flags, seq);
    m
}

fn finish(m: &mut [u8], ty: u16, flags: u16, seq: u32) {
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&ty.to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Each message of a netlink datagram: (type, body).
fn messages(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap_or_default()) as usize;
        let ty = u16::from_ne_bytes(buf[4..6].try_into().unwrap_or_default());
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        out.push((ty, &buf[NLMSG_HDRLEN..len]));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

/// The errno of an NLMSG_ERROR body (0: an acknowledgement).
fn error_code(body: &[u8]) -> i32 {
    body.get(0..4)
        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
}

/// Sends `msg` and waits for its acknowledgement.
fn request(msg: &[u8]) -> io::Result<()> {
    let fd = socket()?;
    send(&fd, msg)?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = recv(&fd, &mut buf)?;
        for (ty, body) in messages(&buf[..n]) {
            if ty == NLMSG_ERROR {
                let code = error_code(body);
                return if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
        }
    }
}

/// Adds the host address `addr` to interface `index`, or sets the lifetime of the one there.
pub fn add(index: u32, addr: IpAddr, lifetime: Lifetime) -> io::Result<()> {
    request(&address_message(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        1,
        index,
        addr,
        Some(lifetime),
    ))
}

/// Removes the host address `addr` from interface `index`; false when it was not there.
pub fn remove(index: u32, addr: IpAddr) -> io::Result<bool> {
    match request(&address_message(
        RTM_DELADDR,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        index,
        addr,
        None,
    )) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::ENOENT)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every address of every interface.
pub fn list() -> io::Result<Vec<InterfaceAddress>> {
    let fd = socket()?;
    let mut m = vec![0u8; NLMSG_HDRLEN + IFADDRMSG_LEN];
    finish(&mut m, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1);
    send(&fd, &m)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(&fd, &mut buf)?;
        for (ty, body) in messages(&buf[..n]) {
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = error_code(body);
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                }
                RTM_NEWADDR => out.extend(parse_address(body)),
                _ => {}
            }
        }
    }
}

/// An RTM_NEWADDR body: the interface's address (IFA_LOCAL, else IFA_ADDRESS).
pub fn parse_address(body: &[u8]) -> Option<InterfaceAddress> {
    if body.len() < IFADDRMSG_LEN {
        return None;
    }
    let family = body[0];
    let prefix_len = body[1];
    let index = u32::from_ne_bytes(body[4..8].try_into().ok()?);
    let mut attrs = &body[IFADDRMSG_LEN..];
    let (mut local, mut address, mut valid_secs) = (None, None, None);
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        let payload = &attrs[4..len];
        let ip = match (family as i32, payload.len()) {
            (libc::AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(payload).ok()?)),
            (libc::AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(payload).ok()?)),
            _ => None,
        };
        match ty {
            IFA_LOCAL => local = ip,
            IFA_ADDRESS => address = ip,
            IFA_CACHEINFO if payload.len() >= 8 => {
                let valid = u32::from_ne_bytes(payload[4..8].try_into().ok()?);
                valid_secs = (valid != INFINITY_LIFE_TIME).then_some(valid);
            }
            _ => {}
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    Some(InterfaceAddress {
        index,
        address: local.or(address)?,
        prefix_len,
        valid_secs,
    })
}

/// Which of the uplinks `addr` belongs on: the first whose subnet holds it, else the first.
pub fn choose(uplinks: &[(String, u32)], addresses: &[InterfaceAddress], addr: IpAddr) -> usize {
    uplinks
        .iter()
        .position(|(_, index)| {
            addresses
                .iter()
                .any(|a| a.index == *index && a.prefix_len < host_len(addr) && a.covers(addr))
        })
        .unwrap_or(0)
}

fn host_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn add_messages_carry_a_host_address_with_its_lifetime() {
        let m = address_message(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            7,
            3,
            ip("fd00::50"),
            Some(Lifetime::Secs(3)),
        );
        let parsed = messages(&m);
        assert_eq!(parsed.len(), 1);
        let (ty, body) = parsed[0];
        assert_eq!(ty, RTM_NEWADDR);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 0x505);
        assert_eq!(body[0], libc::AF_INET6 as u8);
        assert_eq!(body[1], 128);
        let a = parse_address(body).unwrap();
        assert_eq!(
            a,
            InterfaceAddress {
                index: 3,
                address: ip("fd00::50"),
                prefix_len: 128,
                valid_secs: Some(3)
            }
        );
        // Preferred lifetime 0 (deprecated), valid 3 s; NODAD and NOPREFIXROUTE in IFA_FLAGS.
        let text: Vec<u8> = body.to_vec();
        let cacheinfo = [0u32, 3, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect::<Vec<u8>>();
        assert!(text.windows(16).any(|w| w == cacheinfo.as_slice()));
        assert!(
            text.windows(4)
                .any(|w| w == (IFA_F_NODAD | IFA_F_NOPREFIXROUTE).to_ne_bytes())
        );

        let v4 = address_message(
            RTM_DELADDR,
            NLM_F_REQUEST | NLM_F_ACK,
            1,
            2,
            ip("10.0.0.50"),
            None,
        );
        let (ty, body) = messages(&v4)[0];
        assert_eq!(ty, RTM_DELADDR);
        assert_eq!(
            parse_address(body).unwrap(),
            InterfaceAddress {
                index: 2,
                address: ip("10.0.0.50"),
                prefix_len: 32,
                valid_secs: None
            }
        );
    }

    #[test]
    fn the_uplink_whose_subnet_holds_the_address_is_chosen() {
        let addrs = vec![
            InterfaceAddress {
                index: 2,
                address: ip("192.168.1.5"),
                prefix_len: 24,
                valid_secs: None,
            },
            InterfaceAddress {
                index: 3,
                address: ip("10.0.0.1"),
                prefix_len: 24,
                valid_secs: None,
            },
            // A host address (a previous owner's) says nothing about the subnet.
            InterfaceAddress {
                index: 2,
                address: ip("10.0.0.50"),
                prefix_len: 32,
                valid_secs: Some(2),
            },
        ];
        let uplinks = vec![("eth0".to_owned(), 2), ("eth1".to_owned(), 3)];
        assert_eq!(choose(&uplinks, &addrs, ip("10.0.0.50")), 1);
        assert_eq!(choose(&uplinks, &addrs, ip("172.16.0.1")), 0);
        assert_eq!(choose(&uplinks, &addrs, ip("fd00::50")), 0);
    }
}
