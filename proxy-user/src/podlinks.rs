//! Pods' host-side interfaces (`--pod-ifaces`): which ones match, which exist, and a netlink
//! watch that reports new and deleted links as pods come and go.
//!
//! The pod program must sit on these interfaces where kube-proxy runs in nftables mode: its
//! forward-hook filter drops traffic to ClusterIPs it does not serve before the uplink's TC egress
//! program would see it.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// Interface name patterns: `veth*`, `cali*`, `lxc*`, or exact names. `*` matches any run of
/// characters anywhere in the pattern.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Patterns(Vec<String>);

/// Host-side pod interface prefixes of common CNIs (kindnet and bridge plugins, Calico, Cilium,
/// AWS VPC CNI, Azure CNI, GKE), for `--pod-ifaces auto`.
pub const AUTO: &[&str] = &["veth*", "cali*", "lxc*", "eni*", "azv*", "gke*"];

impl Patterns {
    pub fn parse(spec: &str) -> Self {
        let items: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .flat_map(|s| {
                if s == "auto" {
                    AUTO.iter().map(|a| a.to_string()).collect()
                } else {
                    vec![s.to_owned()]
                }
            })
            .collect();
        Patterns(items)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| glob(p.as_bytes(), name.as_bytes()))
    }
}

impl std::fmt::Display for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

/// Every interface of this network namespace: (index, name).
pub fn list() -> Vec<(u32, String)> {
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = head;
    loop {
        let entry = unsafe { &*cur };
        if entry.if_index == 0 || entry.if_name.is_null() {
            break;
        }
        let name = unsafe { std::ffi::CStr::from_ptr(entry.if_name) }.to_string_lossy().into_owned();
        out.push((entry.if_index, name));
        cur = unsafe { cur.add(1) };
    }
    unsafe { libc::if_freenameindex(head) };
    out
}

/// A link appearing or going away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    New { index: u32, name: String },
    Deleted { index: u32, name: String },
}

/// A netlink socket subscribed to link notifications (RTMGRP_LINK).
pub struct LinkWatch {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

impl LinkWatch {
    pub fn new() -> io::Result<Self> {
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_LINK;
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LinkWatch {
            fd: tokio::io::unix::AsyncFd::new(fd)?,
        })
    }

    /// The next batch of link events (cancellation safe: a message is read only when ready).
    pub async fn next(&self) -> io::Result<Vec<LinkEvent>> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            let n = unsafe {
                libc::recv(self.fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                return Err(err);
            }
            let events = parse(&buf[..n as usize]);
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }
}

/// Link events in a netlink datagram (other messages are skipped).
pub fn parse(mut buf: &[u8]) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap_or_default()) as usize;
        let ty = u16::from_ne_bytes(buf[4..6].try_into().unwrap_or_default());
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        let msg = &buf[NLMSG_HDRLEN..len];
        if (ty == RTM_NEWLINK || ty == RTM_DELLINK) && msg.len() >= IFINFOMSG_LEN {
            let index = i32::from_ne_bytes(msg[4..8].try_into().unwrap_or_default()) as u32;
            if let Some(name) = ifname(&msg[IFINFOMSG_LEN..]) {
                out.push(if ty == RTM_NEWLINK {
                    LinkEvent::New { index, name }
                } else {
                    LinkEvent::Deleted { index, name }
                });
            }
        }
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn ifname(mut attrs: &[u8]) -> Option<String> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == IFLA_IFNAME {
            let raw = &attrs[4..len];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            return Some(String::from_utf8_lossy(&raw[..end]).into_owned());
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_prefixes_and_auto_covers_common_cnis() {
        let p = Patterns::parse("veth*, pod0");
        assert!(p.matches("veth1a2b3c"));
        assert!(p.matches("pod0"));
        assert!(!p.matches("pod01") && !p.matches("eth0"));
        let auto = Patterns::parse("auto");
        for name in ["veth9f8e", "cali12ab", "lxc_health", "eni3a", "azv1", "gke55"] {
            assert!(auto.matches(name), "{name}");
        }
        assert!(!auto.matches("eth0") && !auto.matches("cni0") && !auto.matches("lo"));
        assert!(Patterns::parse(" , ").is_empty());
    }

    fn message(ty: u16, index: i32, name: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let name_len = name.len() + 1;
        attr.extend_from_slice(&((4 + name_len) as u16).to_ne_bytes());
        attr.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        attr.extend_from_slice(name.as_bytes());
        attr.push(0);
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        let mut ifi = vec![0u8; IFINFOMSG_LEN];
        ifi[4..8].copy_from_slice(&index.to_ne_bytes());
        let len = NLMSG_HDRLEN + ifi.len() + attr.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend(ifi);
        m.extend(attr);
        m
    }

    #[test]
    fn netlink_link_messages_are_parsed() {
        let mut buf = message(RTM_NEWLINK, 7, "veth0abc");
        buf.extend(message(RTM_DELLINK, 5, "cali1"));
        buf.extend(message(24, 9, "ignored")); // RTM_NEWROUTE
        assert_eq!(
            parse(&buf),
            vec![
                LinkEvent::New { index: 7, name: "veth0abc".into() },
                LinkEvent::Deleted { index: 5, name: "cali1".into() },
            ]
        );
        assert!(parse(&buf[..10]).is_empty());
    }
}
