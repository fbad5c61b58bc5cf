//! Pods' host-side interfaces (`--pod-ifaces`): which ones match, which exist, and a netlink
//! watch that reports new and deleted links as pods come and go.
//!
//! The pod program must sit on these interfaces where kube-proxy runs in nftables mode: its
//! forward-hook filter drops traffic to ClusterIPs it does not serve before the uplink's TC egress
//! program would see it.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::Ebpf;

use crate::loader::{self, PodAttached};

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
        let name = unsafe { std::ffi::CStr::from_ptr(entry.if_name) }
            .to_string_lossy()
            .into_owned();
        out.push((entry.if_index, name));
        cur = unsafe { cur.add(1) };
    }
    unsafe { libc::if_freenameindex(head) };
    out
}

/// The pod program on every matching interface, kept so as pods come and go.
pub struct PodLinks {
    patterns: Patterns,
    /// The uplinks: they carry the uplink programs and never the pod one, whatever the patterns.
    uplinks: Vec<String>,
    pin_dir: Option<PathBuf>,
    watch: Option<LinkWatch>,
    attached: HashMap<String, (u32, PodAttached)>,
}

impl PodLinks {
    /// Nothing attached, nothing watched (no `--pod-ifaces`).
    pub fn disabled() -> Self {
        PodLinks {
            patterns: Patterns::default(),
            uplinks: Vec::new(),
            pin_dir: None,
            watch: None,
            attached: HashMap::new(),
        }
    }

    /// Subscribes to link notifications first, so no pod created meanwhile is missed, then attaches
    /// to every matching interface that exists.
    pub fn start(
        ebpf: &mut Ebpf,
        patterns: Patterns,
        uplinks: &[String],
        pin_dir: Option<&Path>,
    ) -> io::Result<Self> {
        if patterns.is_empty() {
            return Ok(Self::disabled());
        }
        let mut links = PodLinks {
            patterns,
            uplinks: uplinks.to_vec(),
            pin_dir: pin_dir.map(Path::to_owned),
            watch: Some(LinkWatch::new()?),
            attached: HashMap::new(),
        };
        links.resync(ebpf);
        Ok(links)
    }

    /// How many interfaces carry the pod program; None when `--pod-ifaces` is off.
    pub fn count(&self) -> Option<usize> {
        self.watch.as_ref().map(|_| self.attached.len())
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.attached.keys().cloned().collect();
        names.sort();
        names
    }

    /// The next link events; never resolves when disabled.
    pub async fn next(&self) -> Vec<LinkEvent> {
        let Some(watch) = &self.watch else {
            return std::future::pending().await;
        };
        match watch.next().await {
            Ok(events) => events,
            Err(err) => {
                tracing::warn!("reading link notifications: {err}; listing links again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                vec![LinkEvent::Overrun]
            }
        }
    }

    pub fn handle(&mut self, ebpf: &mut Ebpf, events: Vec<LinkEvent>) {
        for event in events {
            match event {
                LinkEvent::New { index, name } => {
                    if self.link_up(ebpf, index, &name) {
                        tracing::info!("pod interface {name} appeared: attached");
                    }
                }
                LinkEvent::Deleted { index, name } => {
                    if self.attached.get(&name).is_some_and(|(i, _)| *i == index) {
                        self.release(ebpf, &name, "went away");
                        tracing::info!("pod interface {name} went away: detached");
                    }
                }
                LinkEvent::Overrun => {
                    tracing::info!("link notifications were lost; listing links again");
                    self.resync(ebpf)
                }
            }
        }
    }

    /// Makes the attached set match the interfaces that exist now.
    pub fn resync(&mut self, ebpf: &mut Ebpf) {
        let now = list();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, (index, _))| !now.iter().any(|(i, n)| i == index && n == *name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.release(ebpf, &name, "went away");
        }
        for (index, name) in &now {
            self.link_up(ebpf, *index, name);
        }
        if let Some(dir) = &self.pin_dir {
            let removed = loader::prune_pod_pins(dir, &|iface| self.attached.contains_key(iface));
            if removed > 0 {
                tracing::info!("removed {removed} pin(s) of pod interfaces that no longer exist");
            }
        }
    }

    /// Attaches to `name` if it matches and is not attached yet; true when it attached now.
    fn link_up(&mut self, ebpf: &mut Ebpf, index: u32, name: &str) -> bool {
        // A rename keeps the index: the old name's entry is stale.
        let renamed: Vec<String> = self
            .attached
            .iter()
            .filter(|(n, (i, _))| *i == index && n.as_str() != name)
            .map(|(n, _)| n.clone())
            .collect();
        for old in renamed {
            self.release(ebpf, &old, "was renamed");
        }
        if !self.patterns.matches(name) || self.uplinks.iter().any(|u| u == name) {
            return false;
        }
        match self.attached.get(name) {
            Some((i, _)) if *i == index => return false,
            Some(_) => self.release(ebpf, name, "was replaced"),
            None => {}
        }
        match loader::attach_pod(ebpf, name, self.pin_dir.as_deref()) {
            Ok(a) => {
                tracing::debug!(
                    "pod interface {name}: {}",
                    if a.replaced {
                        "replaced the previous agent's program"
                    } else {
                        "attached"
                    }
                );
                self.attached.insert(name.to_owned(), (index, a));
                true
            }
            // Pods come and go quickly; one that vanished before we got to it is no error.
            Err(err) if !interface_exists(name) => {
                tracing::debug!("pod interface {name} went away before attaching: {err}");
                false
            }
            Err(err) => {
                tracing::warn!(
                    "pod interface {name}: attaching failed: {err}; its packets to frontends are \
                     translated on the uplink instead, where kube-proxy's nftables mode may drop \
                     them"
                );
                false
            }
        }
    }

    fn release(&mut self, ebpf: &mut Ebpf, name: &str, why: &str) {
        let Some((_, a)) = self.attached.remove(name) else {
            return;
        };
        // The kernel already unhooked a deleted interface's link; only the pin needs removing.
        if let Err(err) = loader::detach_pod(ebpf, a) {
            tracing::debug!("pod interface {name} {why}; detaching: {err}");
        } else {
            tracing::debug!("pod interface {name} {why}; detached");
        }
    }

    /// Detaches from every pod interface (and removes the pins).
    pub fn detach_all(mut self, ebpf: &mut Ebpf) {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for name in names {
            self.release(ebpf, &name, "is being left");
        }
    }
}

fn interface_exists(name: &str) -> bool {
    std::ffi::CString::new(name).is_ok_and(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
}

/// A link appearing or going away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    New {
        index: u32,
        name: String,
    },
    Deleted {
        index: u32,
        name: String,
    },
    /// The kernel dropped notifications (socket buffer overrun): list the links again.
    Overrun,
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
        // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(LinkWatch { fd })
    }

    /// The next batch of link events (cancellation safe: a message is read only when ready).
    pub async fn next(&self) -> io::Result<Vec<LinkEvent>> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            let n = unsafe {
                libc::recv(
                    self.fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                if err.raw_os_error() == Some(libc::ENOBUFS) {
                    return Ok(vec![LinkEvent::Overrun]);
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
        for name in [
            "veth9f8e",
            "cali12ab",
            "lxc_health",
            "eni3a",
            "azv1",
            "gke55",
        ] {
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
                LinkEvent::New {
                    index: 7,
                    name: "veth0abc".into()
                },
                LinkEvent::Deleted {
                    index: 5,
                    name: "cali1".into()
                },
            ]
        );
        assert!(parse(&buf[..10]).is_empty());
    }
}
