//! What the agent needs to know about the node: interface addresses, sysctls, the clock.

use std::{
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
};

use proxy_common::Config;

/// Global unicast addresses of an interface, IPv4 first, in the kernel's order.
pub fn interface_addresses(iface: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null()
            || unsafe { CStr::from_ptr(ifa.ifa_name) }.to_bytes() != iface.as_bytes()
        {
            continue;
        }
        match unsafe { (*ifa.ifa_addr).sa_family } as i32 {
            libc::AF_INET => {
                let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))));
            }
            libc::AF_INET6 => {
                let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let a = Ipv6Addr::from(sa.sin6_addr.s6_addr);
                // Link-local addresses cannot be NodePort or egress addresses.
                if a.segments()[0] & 0xffc0 != 0xfe80 {
                    out.push(IpAddr::V6(a));
                }
            }
            _ => {}
        }
    }
    unsafe { libc::freeifaddrs(head) };
    out.sort_by_key(|a| a.is_ipv6());
    Ok(out)
}

/// The driver behind an interface (ETHTOOL_GDRVINFO), e.g. "veth", "mlx5_core", "virtio_net".
pub fn driver(iface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= ifr.ifr_name.len() {
        return None;
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = &mut info as *mut DrvInfo as *mut libc::c_char;
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return None;
    }
    let ret = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut ifr) };
    unsafe { libc::close(sock) };
    if ret != 0 {
        return None;
    }
    let end = info
        .driver
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Problems with the node's settings that would make the data path fail, each with its fix.
pub fn check_sysctls(v4: bool, v6: bool, snat: &[RangeInclusive<u16>]) -> Vec<String> {
    let mut warnings = Vec::new();
    // The FIB lookups the programs do refuse to route when forwarding is off.
    if v4 && read_sysctl("/proc/sys/net/ipv4/ip_forward").as_deref() == Some("0") {
        warnings.push(
            "net.ipv4.ip_forward is 0: the data path cannot forward to endpoints (fix: sysctl -w net.ipv4.ip_forward=1)".to_owned(),
        );
    }
    if v6 && read_sysctl("/proc/sys/net/ipv6/conf/all/forwarding").as_deref() == Some("0") {
        warnings.push(
            "net.ipv6.conf.all.forwarding is 0: IPv6 Services cannot be forwarded (fix: sysctl -w net.ipv6.conf.all.forwarding=1)".to_owned(),
        );
    }
    if let Some(ephemeral) = crate::snat::ephemeral_range() {
        let reserved =
            read_sysctl("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
        for range in snat {
            if ephemeral.start() <= range.end()
                && range.start() <= ephemeral.end()
                && !covers(&reserved, range)
            {
                warnings.push(format!(
                    "SNAT ports {}-{} overlap the node's ephemeral ports ({}-{}): a local socket \
                     could pick a port extproxy uses and lose its replies (fix: --snat-ports auto, \
                     or sysctl -w net.ipv4.ip_local_reserved_ports={}-{})",
                    range.start(),
                    range.end(),
                    ephemeral.start(),
                    ephemeral.end(),
                    range.start(),
                    range.end()
                ));
            }
        }
    }
    warnings
}

/// Whether `ip_local_reserved_ports` (e.g. "61000-65535,7000") reserves the whole range.
fn covers(reserved: &str, range: &RangeInclusive<u16>) -> bool {
    reserved.split(',').any(|part| {
        let mut it = part.trim().split('-').filter_map(|p| p.parse::<u16>().ok());
        match (it.next(), it.next()) {
            (Some(lo), Some(hi)) => lo <= *range.start() && *range.end() <= hi,
            (Some(p), None) => range.start() == range.end() && p == *range.start(),
            _ => false,
        }
    })
}

/// This host's name (its UTS namespace's: a hostNetwork pod's is the node's).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".to_owned())
}

/// An interface's MTU (1500 if it cannot be read).
pub fn mtu(iface: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1500)
}

/// Addresses for people: `separator` between them, `if_empty` when there are none.
pub fn join_addrs(addrs: &[IpAddr], separator: &str, if_empty: &str) -> String {
    if addrs.is_empty() {
        return if_empty.to_owned();
    }
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(separator)
}

/// Hands memory freed after a burst of work (the initial parse and translation) back to the
/// kernel: glibc keeps freed heap pages otherwise, and they count as the agent's RSS.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The kernel's tick length in ns: the resolution of CLOCK_MONOTONIC_COARSE (TICK_NSEC), which
/// advances once per tick like jiffies. None if implausible (HZ is 24..=1200 in every kernel
/// configuration).
fn tick_ns() -> Option<u64> {
    let mut res: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } != 0 {
        return None;
    }
    let tick_ns = res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64;
    (100_000..=50_000_000).contains(&tick_ns).then_some(tick_ns)
}

fn hz(tick_ns: u64) -> u64 {
    (1_000_000_000 + tick_ns / 2) / tick_ns
}

/// Factors for [`Config::clock_secs`], the data path's clock: (clock_mult, clock_offset), or
/// zeros (the data path then reads the coarse ktime helper) if the tick length is implausible.
///
/// The data path counts jiffies, which start at INITIAL_JIFFIES (-300 s worth of ticks, as a
/// u32) when the monotonic clock starts at zero: the two agree to within a second (the ticks
/// before timekeeping starts).
pub fn jiffies_clock() -> (u32, u32) {
    tick_ns().map_or((0, 0), jiffies_factors)
}

fn jiffies_factors(tick_ns: u64) -> (u32, u32) {
    let mult = (((tick_ns as u128) << 32) + 500_000_000) / 1_000_000_000;
    let initial_jiffies = (1u64 << 32) - 300 * hz(tick_ns);
    let offset = ((initial_jiffies as u128 * mult) >> 32) as u32;
    (mult as u32, offset)
}

/// `config` with the data path's clock factors filled in, unless it has its own.
pub fn with_clock(config: &Config) -> Config {
    if config.clock_mult != 0 {
        return *config;
    }
    let (clock_mult, clock_offset) = jiffies_clock();
    let hz = match tick_ns() {
        Some(tick) if clock_mult != 0 => hz(tick) as u32,
        // The data path's fine clock is then milliseconds of ktime.
        _ => 1000,
    };
    Config {
        clock_mult,
        clock_offset,
        ..*config
    }
    .with_hz(hz)
}

/// Now, by the data path's clock: the seconds its conntrack, affinity and next-hop stamps use.
/// The agent ages flows with this, so both apply the same timeouts to the same stamps.
///
/// times(2) returns jiffies in USER_HZ units: computed from them with the same factors, the
/// agent's "now" and the data path's differ by at most a tick, however the factors round.
pub fn datapath_secs() -> u32 {
    let user_hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let mut tms: libc::tms = unsafe { std::mem::zeroed() };
    let ticks = unsafe { libc::times(&mut tms) };
    let Some(tick_ns) = tick_ns() else {
        return monotonic_secs();
    };
    if user_hz <= 0 || ticks == -1 as libc::clock_t {
        return monotonic_secs();
    }
    let jiffies = (ticks as u64 as u128 * hz(tick_ns) as u128 / user_hz as u128) as u64;
    let (clock_mult, clock_offset) = jiffies_factors(tick_ns);
    let cfg = Config {
        clock_mult,
        clock_offset,
        ..Config::DEFAULT
    };
    cfg.clock_secs(jiffies)
}

/// Now, by the data path's fine clock (`Config::hz` ticks a second; SNAT port holds): jiffies
/// (their low 32 bits) when `config` has the jiffies factors, else milliseconds of
/// CLOCK_MONOTONIC_COARSE, as the data path does.
pub fn datapath_ticks(config: &Config) -> u32 {
    let fallback = || {
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32
    };
    if config.clock_mult == 0 {
        return fallback();
    }
    let user_hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let mut tms: libc::tms = unsafe { std::mem::zeroed() };
    let ticks = unsafe { libc::times(&mut tms) };
    if user_hz <= 0 || ticks == -1 as libc::clock_t {
        return fallback();
    }
    (ticks as u64 as u128 * config.hz as u128 / user_hz as u128) as u32
}

/// Seconds of CLOCK_MONOTONIC_COARSE.
pub fn monotonic_secs() -> u32 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jiffies_seconds_track_the_monotonic_clock() {
        // (HZ, uptime in seconds): every common tick rate, early and after a long uptime.
        for hz in [100u64, 250, 300, 1000] {
            let tick_ns = (1_000_000_000 + hz / 2) / hz;
            let (clock_mult, clock_offset) = jiffies_factors(tick_ns);
            let cfg = Config {
                clock_mult,
                clock_offset,
                ..Config::DEFAULT
            };
            // Exact enough to be seconds (the agent computes "now" with the same rounding, see
            // datapath_secs): a second off after a day, 1e-6 relative after 400 days.
            for uptime in [1u64, 3_600, 86_400, 86_400 * 400] {
                let jiffies = (1u64 << 32) - 300 * hz + uptime * 1_000_000_000 / tick_ns;
                let secs = cfg.clock_secs(jiffies) as u64;
                assert!(
                    secs.abs_diff(uptime) <= 1 + uptime / 1_000_000,
                    "HZ {hz}, uptime {uptime}: data path says {secs}"
                );
            }
        }
    }

    #[test]
    fn this_kernel_has_a_plausible_tick_and_jiffies_seconds_agree_with_monotonic_ones() {
        let (mult, _) = jiffies_clock();
        assert_ne!(
            mult, 0,
            "CLOCK_MONOTONIC_COARSE resolution is not a tick length"
        );
        let (dp, mono) = (datapath_secs(), monotonic_secs());
        assert!(
            dp.abs_diff(mono) <= 2,
            "data path clock {dp} s, CLOCK_MONOTONIC {mono} s"
        );
    }

    #[test]
    fn reserved_port_lists_cover_ranges() {
        assert!(covers("61000-65535", &(61000..=65535)));
        assert!(covers("1000,61000-65535", &(62000..=63000)));
        assert!(!covers("61000-62000", &(61000..=65535)));
        assert!(!covers("", &(61000..=65535)));
    }

    #[test]
    fn loopback_driver_is_reported() {
        // lo has no ethtool driver info; the call must fail cleanly rather than panic.
        let _ = driver("lo");
        assert_eq!(driver("no-such-interface-xyz"), None);
    }

    #[test]
    fn loopback_has_addresses() {
        assert!(
            interface_addresses("lo")
                .unwrap()
                .contains(&"127.0.0.1".parse().unwrap())
        );
    }
}
