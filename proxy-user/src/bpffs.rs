//! Whether pins outlive the agent. A pin lives as long as the bpffs instance it is in, and a bpffs
//! instance as long as some mount namespace has it mounted. `ip netns exec` runs its command in a
//! mount namespace of its own with a fresh /sys and no bpffs: the agent mounted one there, pinned
//! into it, and the pins (maps, links, every tracked flow) went with the namespace when the agent
//! exited. `nsenter --net` keeps the host's mount namespace, and with it the host's bpffs.
//!
//! Told apart by comparing mount tables: the bpffs holding the pin folder is the host's when PID
//! 1 (the host's init, if this process is in the initial PID namespace) has the same instance
//! (device number) mounted. In a container with a PID namespace of its own, PID 1 is the
//! container's: there, a mount shared with another namespace by propagation (a Kubernetes
//! hostPath with `mountPropagation`) outlives it, and one this process mounted itself does not.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// statfs(2) f_type of bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`, fixed since Linux 3.8): where
/// PID 1 is the host's init.
const INIT_PID_NS_INODE: u64 = 0xEFFF_FFFC;

/// What a pin folder's file system is, as far as pins outliving this process go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifetime {
    /// A bpffs the host's init has mounted: pins live until the host shuts down.
    Host,
    /// A bpffs this mount namespace shares with another by mount propagation (a container's
    /// hostPath volume with `mountPropagation`): pins live as long as that other namespace.
    Shared,
    /// Nothing tells: a container that has neither PID 1's view nor propagation, with a bpffs it
    /// did not mount itself (a hostPath without propagation). Assumed to outlive this process.
    Unknown,
    /// A bpffs that goes when this process's mount namespace goes; says why.
    Private(String),
    /// Not on a bpffs: no pins at all there (the file system type, or why it is unknown).
    NotBpffs(String),
}

impl Lifetime {
    /// What the pin folder is: its file system, whether this process mounted it just now.
    pub fn of(pin_dir: &Path, mounted_here: bool) -> Lifetime {
        let Some(dir) = existing_ancestor(pin_dir) else {
            return Lifetime::NotBpffs("no such directory".to_owned());
        };
        let dev = match std::fs::metadata(&dir) {
            Ok(meta) => dev_numbers(meta.dev()),
            Err(err) => return Lifetime::NotBpffs(format!("{}: {err}", dir.display())),
        };
        let own = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let host = in_initial_pid_namespace()
            .then(|| std::fs::read_to_string("/proc/1/mountinfo").ok())
            .flatten();
        decide(&Facts {
            dev,
            bpffs: is_bpffs(&dir),
            own: &own,
            host: host.as_deref(),
            mounted_here,
        })
    }

    /// Whether pins there are gone once this process and its mount namespace are.
    pub fn dies_with_process(&self) -> Option<&str> {
        match self {
            Lifetime::Private(why) => Some(why),
            _ => None,
        }
    }

    /// Why a pin folder with nothing in it may still be some agent's: `inspect` and `cleanup`
    /// run where the agent's bpffs is not. None when this is the bpffs agents pin into.
    pub fn why_nothing_is_seen(&self, pin_dir: &Path) -> Option<String> {
        let elsewhere = "an agent started in the host's mount namespace pinned into the host's \
                         bpffs, which is not visible here: run this command in the host's mount \
                         namespace (`nsenter --net=/var/run/netns/NAME` keeps it, `ip netns exec` \
                         does not)";
        match self {
            Lifetime::NotBpffs(fs) => Some(format!(
                "{} is not on a bpffs in this mount namespace ({fs}; `ip netns exec` gives a \
                 process a fresh /sys without one): {elsewhere}",
                pin_dir.display()
            )),
            Lifetime::Private(why) => Some(format!(
                "{} is on a bpffs of this mount namespace only ({why}): {elsewhere}",
                pin_dir.display()
            )),
            Lifetime::Host | Lifetime::Shared | Lifetime::Unknown => None,
        }
    }
}

/// What [`decide`] looks at: gathered by [`Lifetime::of`], written out in tests.
#[derive(Debug)]
struct Facts<'a> {
    /// major, minor of the pin folder's file system.
    dev: (u32, u32),
    bpffs: bool,
    /// This process's /proc/self/mountinfo.
    own: &'a str,
    /// The host's init's mountinfo: only when this process is in the initial PID namespace
    /// (elsewhere PID 1 is a container's) and may read it.
    host: Option<&'a str>,
    /// This process mounted the bpffs just now (there was none).
    mounted_here: bool,
}

fn decide(facts: &Facts<'_>) -> Lifetime {
    let mounts = parse_mountinfo(facts.own);
    let mount = mounts.iter().rev().find(|m| m.dev == facts.dev);
    if !facts.bpffs {
        return Lifetime::NotBpffs(
            mount.map_or_else(|| "unknown".to_owned(), |m| m.fstype.clone()),
        );
    }
    let at = mount.map_or_else(
        || "the bpffs".to_owned(),
        |m| format!("the bpffs at {}", m.mount_point.display()),
    );
    if let Some(host) = facts.host {
        return if parse_mountinfo(host).iter().any(|m| m.dev == facts.dev) {
            Lifetime::Host
        } else {
            Lifetime::Private(format!(
                "{at} is not the host's: the host's init does not have it mounted; it lives only \
                 in a mount namespace like the one `ip netns exec` gives a process"
            ))
        };
    }
    if mount.is_some_and(|m| m.shared_with_another()) {
        return Lifetime::Shared;
    }
    if facts.mounted_here {
        return Lifetime::Private(format!(
            "this process mounted {at} in a mount namespace no other shares"
        ));
    }
    Lifetime::Unknown
}

/// The fields of one /proc/PID/mountinfo line that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    dev: (u32, u32),
    mount_point: PathBuf,
    /// Propagation: `shared:N`, `master:N`, `propagate_from:N`, `unbindable`.
    optional: Vec<String>,
    fstype: String,
}

impl Mount {
    /// A peer group or master means the file system is mounted in another namespace too.
    fn shared_with_another(&self) -> bool {
        self.optional
            .iter()
            .any(|o| o.starts_with("shared:") || o.starts_with("master:"))
    }
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: ID, parent ID, major:minor,
/// root, mount point, options, optional fields, `-`, type, source, super options.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (major, minor) = fields.nth(2)?.split_once(':')?;
            let dev = (major.parse().ok()?, minor.parse().ok()?);
            let mount_point = PathBuf::from(unescape(fields.nth(1)?));
            let _options = fields.next()?;
            let optional: Vec<String> = fields
                .by_ref()
                .take_while(|f| *f != "-")
                .map(str::to_owned)
                .collect();
            let fstype = fields.next()?.to_owned();
            Some(Mount {
                dev,
                mount_point,
                optional,
                fstype,
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Linux's `dev_t` split into major and minor (glibc's `gnu_dev_major`/`minor`).
pub(crate) fn dev_numbers(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// `path` or the nearest of its ancestors that exists: a pin folder not yet created is on the
/// file system of the folder it will be created in.
fn existing_ancestor(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        // A relative path's last ancestor is "": the working directory.
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .find(|p| p.exists())
        .map(Path::to_owned)
}

fn in_initial_pid_namespace() -> bool {
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == INIT_PID_NS_INODE)
}

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This VM's host: bpffs at /sys/fs/bpf, private mounts (no propagation tags).
    const HOST: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
45 23 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    /// `ip netns exec NS extproxy run`: a fresh sysfs, and the bpffs the agent mounted on it.
    const IP_NETNS_EXEC: &str = "\
27 1 254:0 / / rw,relatime master:1 - ext4 /dev/vda rw
64 56 0:43 / /sys rw,relatime - sysfs xpnode rw
65 64 0:77 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    /// The DaemonSet's container: /sys/fs/bpf a hostPath with HostToContainer propagation.
    const DAEMONSET: &str = "\
812 700 0:95 / / ro,relatime - overlay overlay rw
830 812 0:40 / /sys/fs/bpf rw,relatime master:12 - bpf bpf rw
";

    /// The same without `mountPropagation`: a private bind of the host's bpffs.
    const HOSTPATH_PRIVATE: &str = "\
812 700 0:95 / / ro,relatime - overlay overlay rw
830 812 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    fn facts<'a>(dev: (u32, u32), own: &'a str, host: Option<&'a str>, here: bool) -> Facts<'a> {
        Facts {
            dev,
            bpffs: true,
            own,
            host,
            mounted_here: here,
        }
    }

    /// `ip netns exec` gave the agent a bpffs of its own: every pin, and every tracked flow,
    /// went with it (100/100 pod flows lost across a `--keep-on-exit` restart).
    #[test]
    fn a_bpffs_the_host_does_not_have_dies_with_the_process() {
        let verdict = decide(&facts((0, 77), IP_NETNS_EXEC, Some(HOST), true));
        let why = verdict.dies_with_process().expect("not seen as private");
        assert!(why.contains("/sys/fs/bpf is not the host's"), "{why}");
        // Started twice in one `ip netns exec` shell: the first agent mounted it.
        assert!(
            decide(&facts((0, 77), IP_NETNS_EXEC, Some(HOST), false))
                .dies_with_process()
                .is_some()
        );
        // `nsenter --net` (the tests' way), or a host without ip netns: the host's bpffs.
        assert_eq!(
            decide(&facts((0, 40), HOST, Some(HOST), false)),
            Lifetime::Host
        );
        // The host had none at boot and the agent mounted it there: the host's too.
        assert_eq!(
            decide(&facts((0, 40), HOST, Some(HOST), true)),
            Lifetime::Host
        );
    }

    /// A container with a PID namespace of its own cannot see the host's mounts.
    #[test]
    fn in_a_container_propagation_and_who_mounted_it_decide() {
        assert_eq!(
            decide(&facts((0, 40), DAEMONSET, None, false)),
            Lifetime::Shared
        );
        assert_eq!(
            decide(&facts((0, 40), HOSTPATH_PRIVATE, None, false)),
            Lifetime::Unknown
        );
        // A privileged container without the volume: its own bpffs, gone with the pod.
        assert!(
            decide(&facts((0, 40), HOSTPATH_PRIVATE, None, true))
                .dies_with_process()
                .is_some()
        );
    }

    #[test]
    fn not_a_bpffs_is_named_with_its_type() {
        let sysfs = Facts {
            bpffs: false,
            ..facts((0, 43), IP_NETNS_EXEC, Some(HOST), false)
        };
        let verdict = decide(&sysfs);
        assert_eq!(verdict, Lifetime::NotBpffs("sysfs".to_owned()));
        let why = verdict
            .why_nothing_is_seen(Path::new("/sys/fs/bpf/extproxy"))
            .unwrap();
        assert!(why.contains("ip netns exec"), "{why}");
    }

    #[test]
    fn mountinfo_fields_and_escapes() {
        let mounts = parse_mountinfo(
            "36 35 98:0 /mnt1 /mnt\\0402 rw,noatime master:1 shared:3 - ext3 /dev/root rw\n",
        );
        assert_eq!(
            mounts,
            [Mount {
                dev: (98, 0),
                mount_point: PathBuf::from("/mnt 2"),
                optional: vec!["master:1".to_owned(), "shared:3".to_owned()],
                fstype: "ext3".to_owned(),
            }]
        );
        // A relative pin folder not created yet is on the working directory's file system.
        assert_eq!(
            existing_ancestor(Path::new("no-such-folder/pins")),
            Some(PathBuf::from("."))
        );
        // glibc's makedev(0x123, 0x45678).
        assert_eq!(dev_numbers(0x4561_2378), (0x123, 0x45678));
    }
}
