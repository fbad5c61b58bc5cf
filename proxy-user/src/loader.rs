//! Loading the data path: the embedded eBPF object, map sizes, pinning, and attaching the
//! programs to the uplink.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId},
        xdp::{XdpLink, XdpLinkId},
    },
};
use proxy_common::*;

/// The eBPF object built by build.rs (empty when built with AYA_BUILD_SKIP=1).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/extproxy"));

/// A program that passes every packet, for the far ends of veth test topologies (see
/// proxy-ebpf/src/bin/xdp_pass.rs for why they need one).
pub static XDP_PASS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-pass"));

/// Where the agent pins its maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/extproxy";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this extproxy binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild it normally"
    )]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("{0}")]
    Map(#[from] aya::maps::MapError),
    #[error("pinning the {hook} link at {path}: {reason}")]
    PinLink {
        hook: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("mounting bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Map capacities. Conntrack and reverse NAT are sized together from `ct_max`: new flows get a
/// quarter of it ([`CT_NEW_DIVISOR`]), reverse NAT twice it ([`REVNAT_PER_CT`]: live flows and
/// the closed ones whose port is held for their client).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_services: u32,
    pub max_frontends: u32,
    pub max_backends: u32,
    pub max_slots: u32,
    pub ct_max: u32,
    pub affinity_max: u32,
    pub src_ranges_max: u32,
    pub frags_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_services: DEFAULT_MAX_SERVICES,
            max_frontends: DEFAULT_MAX_FRONTENDS,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_slots: DEFAULT_MAX_SLOTS,
            ct_max: DEFAULT_CT_MAX,
            affinity_max: DEFAULT_AFFINITY_MAX,
            src_ranges_max: DEFAULT_SRC_RANGES_MAX,
            frags_max: DEFAULT_FRAGS_MAX,
        }
    }
}

impl Limits {
    /// Flows that have not completed their handshake (CT_NEW).
    pub fn ct_new_max(&self) -> u32 {
        (self.ct_max / CT_NEW_DIVISOR).max(256)
    }

    /// Reverse NAT entries: live flows and held ports (REVNAT).
    pub fn revnat_max(&self) -> u32 {
        self.ct_max.saturating_mul(REVNAT_PER_CT)
    }

    /// max_entries per map name, as the loader applies them.
    pub fn max_entries(&self) -> [(&'static str, u32); 13] {
        // Cluster egress, tunnel peers and Maglev tables keep their compiled-in sizes.
        [
            (MAP_FRONTENDS, self.max_frontends),
            (MAP_SERVICES, self.max_services),
            (MAP_SVC_STATS, self.max_services),
            (MAP_EGRESS_POOLS, self.max_services),
            (MAP_SLOTS, self.max_slots),
            (MAP_BACKENDS, self.max_backends),
            (MAP_BACKEND_HEALTH, self.max_backends),
            (MAP_CT, self.ct_max),
            (MAP_CT_NEW, self.ct_new_max()),
            (MAP_REVNAT, self.revnat_max()),
            (MAP_AFFINITY, self.affinity_max),
            (MAP_SRC_RANGES, self.src_ranges_max),
            (MAP_FRAGS, self.frags_max),
        ]
    }
}

/// Loads the object with the given map sizes. With `pin_dir`, every map is pinned there, and
/// maps already pinned there are reused (their contents survive an agent restart).
pub fn load(limits: &Limits, pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    let mut ebpf = create_maps(limits, pin_dir)?;
    load_programs(&mut ebpf)?;
    Ok(ebpf)
}

/// The first half of [`load`]: the maps exist (and are pinned), the programs are not verified
/// yet. The maps can be programmed while [`load_programs`] runs: the programs only hold their
/// file descriptors.
pub fn create_maps(limits: &Limits, pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let mut loader = EbpfLoader::new();
    for (name, max) in limits.max_entries() {
        loader.map_max_entries(name, max);
    }
    let pins: Vec<(&'static str, PathBuf)> = match pin_dir {
        Some(dir) => ALL_MAPS
            .iter()
            .map(|name| (*name, dir.join(name)))
            .collect(),
        None => Vec::new(),
    };
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    Ok(loader.load(OBJECT)?)
}

/// The second half of [`load`]: the kernel verifies every program, which takes most of a load
/// (tenths of a second per program). Programs are independent, so they are verified on as many
/// threads as there are CPUs.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    // Cheapest first (popped from the end): verification times measured on 6.x kernels.
    const ALL: [&str; 5] = [
        PROG_PARSE_ONLY,
        PROG_TC_INGRESS,
        PROG_XDP,
        PROG_TC_POD,
        PROG_TC_EGRESS,
    ];
    let mut programs: Vec<(&'static str, &mut Program)> = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        if let Some(name) = ALL.iter().find(|n| **n == name) {
            programs.push((name, program));
        }
    }
    if let Some(missing) = ALL.iter().find(|n| !programs.iter().any(|(p, _)| p == *n)) {
        return Err(LoadError::MissingProgram(missing));
    }
    // The biggest first, each thread taking the next when done: the slowest program does not
    // end up queued behind another.
    programs.sort_by_key(|(name, _)| ALL.iter().position(|n| n == name));
    let queue = std::sync::Mutex::new(programs);
    let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.min(ALL.len()))
            .map(|_| {
                scope.spawn(|| {
                    while let Some(program) = next() {
                        load_one(program)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| match w.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    })
}

fn load_one((name, program): (&'static str, &mut Program)) -> Result<(), LoadError> {
    let err = program_error(name);
    match program {
        Program::Xdp(p) => p.load().map_err(err),
        Program::SchedClassifier(p) => p.load().map_err(err),
        _ => Err(err(ProgramError::UnexpectedProgramType)),
    }
}

/// `LoadError::Program` for the program `name`, as a `map_err` argument.
fn program_error(name: &'static str) -> impl Fn(ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}

/// The program `name` as its type (`Xdp`, `SchedClassifier`).
fn program_as<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))
}

pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoadError> {
    program_as(ebpf, name)
}

pub fn tc_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    program_as(ebpf, name)
}

/// Writes the node-wide settings the data path reads on every packet. Until this is written the
/// programs pass everything untouched.
pub fn write_config(ebpf: &mut Ebpf, cfg: &Config) -> Result<(), LoadError> {
    let map = ebpf
        .map_mut(MAP_CONFIG)
        .ok_or(LoadError::MissingMap(MAP_CONFIG))?;
    let mut array: aya::maps::Array<_, Config> = aya::maps::Array::try_from(map)?;
    array.set(0, crate::host::with_clock(cfg), 0)?;
    Ok(())
}

/// How XDP is attached: driver mode where the NIC supports it, else the kernel's generic XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpAttach {
    /// Driver mode, falling back to generic (skb) mode when the driver has no XDP support.
    #[default]
    Auto,
    Driver,
    Generic,
    /// No XDP: the TC ingress program does all ingress work.
    Off,
}

/// What the agent attached to one interface.
#[derive(Debug)]
pub struct Attached {
    pub iface: String,
    /// The XDP mode in effect, or None when XDP is off.
    pub xdp: Option<XdpMode>,
    /// True when links from an earlier agent were taken over rather than created.
    pub adopted: bool,
    xdp_link: Option<XdpLinkId>,
    tc_ingress: SchedClassifierLinkId,
    tc_egress: SchedClassifierLinkId,
    /// Pin files that keep the links attached beyond this process.
    pins: Vec<PathBuf>,
}

/// Creates the folder the links are pinned in.
fn links_dir(pin_dir: &Path) -> Result<(), LoadError> {
    let links = pin_dir.join("links");
    std::fs::create_dir_all(&links).map_err(|source| LoadError::Bpffs {
        path: links,
        source,
    })
}

/// Pins `link` at `path`, keeping its type: the caller gives it back to its program.
fn pin_link<L>(link: L, hook: &'static str, path: &Path) -> Result<L, LoadError>
where
    FdLink: TryFrom<L, Error: std::fmt::Display>,
    L: TryFrom<FdLink, Error: std::fmt::Display>,
{
    let pin_err = |reason: String| LoadError::PinLink {
        hook,
        path: path.to_owned(),
        reason,
    };
    let pinned = FdLink::try_from(link)
        .map_err(|e| pin_err(e.to_string()))?
        .pin(path)
        .map_err(|e| pin_err(e.to_string()))?;
    L::try_from(FdLink::from(pinned)).map_err(|e| pin_err(e.to_string()))
}

fn link_pin(dir: &Path, hook: &str, iface: &str) -> PathBuf {
    dir.join("links")
        .join(format!("{hook}-{}", pin_name(iface)))
}

/// bpffs refuses names with a dot, which interface names may have (VLANs: `eth0.100`), so dots are
/// escaped (and the escape character itself, to keep the mapping reversible).
fn pin_name(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2e")
}

fn iface_of_pin(name: &str) -> String {
    name.replace("%2e", ".").replace("%25", "%")
}

fn pinned_fd_link(path: &Path) -> Option<FdLink> {
    PinnedLink::from_pin(path).ok().map(FdLink::from)
}

/// Attaches XDP (per `mode`) and both TC programs (tcx) to `iface`.
///
/// With `pin_dir`, every link is pinned as soon as it exists, so the data path keeps forwarding
/// if the agent dies; links pinned by an earlier agent are taken over with `bpf_link_update`,
/// which swaps the program without a moment in which the interface has none.
pub fn attach(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: XdpAttach,
    pin_dir: Option<&Path>,
) -> Result<Attached, LoadError> {
    let pins: Vec<PathBuf> = match pin_dir {
        Some(dir) => {
            links_dir(dir)?;
            ["xdp", "tc-ingress", "tc-egress"]
                .iter()
                .map(|h| link_pin(dir, h, iface))
                .collect()
        }
        None => Vec::new(),
    };
    let pin = |i: usize| pins.get(i).map(PathBuf::as_path);
    let mut adopted = false;

    let (xdp_link, xdp_mode) = if mode == XdpAttach::Off {
        if let Some(p) = pin(0) {
            // A previous agent ran with XDP: drop its link so XDP is really off.
            let _ = std::fs::remove_file(p);
        }
        (None, None)
    } else {
        let prog = xdp_program(ebpf, PROG_XDP)?;
        let taken = pin(0)
            .and_then(pinned_fd_link)
            .and_then(|l| XdpLink::try_from(l).ok());
        match taken.map(|l| prog.attach_to_link(l)) {
            Some(Ok(id)) => {
                adopted = true;
                (Some(id), Some(XdpMode::Default))
            }
            other => {
                if let (Some(Err(err)), Some(p)) = (other, pin(0)) {
                    tracing::warn!(
                        "cannot take over the pinned XDP link on {iface} ({err}); attaching anew"
                    );
                    let _ = std::fs::remove_file(p);
                }
                let (id, used) = attach_xdp_mode(prog, iface, mode)?;
                let id = match pin(0) {
                    Some(p) => repin(prog, id, p)?,
                    None => id,
                };
                (Some(id), Some(used))
            }
        }
    };
    let (tc_ingress, taken) =
        attach_tc(ebpf, PROG_TC_INGRESS, iface, TcAttachType::Ingress, pin(1))?;
    adopted |= taken;
    let (tc_egress, taken) = attach_tc(ebpf, PROG_TC_EGRESS, iface, TcAttachType::Egress, pin(2))?;
    adopted |= taken;
    Ok(Attached {
        iface: iface.to_owned(),
        xdp: xdp_mode,
        adopted,
        xdp_link,
        tc_ingress,
        tc_egress,
        pins,
    })
}

/// Attaches one TC program with tcx, pinning the link at `path` when given. A link pinned there by
/// an earlier agent is taken over instead (returned flag true), swapping the program in place.
fn attach_tc(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    kind: TcAttachType,
    path: Option<&Path>,
) -> Result<(SchedClassifierLinkId, bool), LoadError> {
    let prog = tc_program(ebpf, name)?;
    let taken = path
        .and_then(pinned_fd_link)
        .and_then(|l| SchedClassifierLink::try_from(l).ok());
    if let Some(link) = taken {
        match prog.attach_to_link(link) {
            Ok(id) => return Ok((id, true)),
            Err(e) => {
                tracing::warn!(
                    "cannot take over the pinned {name} link on {iface} ({e}); attaching anew"
                );
                if let Some(p) = path {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
    let id = prog.attach(iface, kind).map_err(program_error(name))?;
    match path {
        Some(p) => Ok((pin_tc(prog, name, id, p)?, false)),
        None => Ok((id, false)),
    }
}

/// Pins a TC link at `path` and hands it back to the program's ownership.
fn pin_tc(
    prog: &mut SchedClassifier,
    name: &'static str,
    id: SchedClassifierLinkId,
    path: &Path,
) -> Result<SchedClassifierLinkId, LoadError> {
    let link = prog.take_link(id).map_err(program_error(name))?;
    let link = pin_link(link, name, path)?;
    prog.attach_to_link(link).map_err(program_error(name))
}

/// Where a fresh pod link is pinned before it replaces the old pin (not "tc-pod-", so that it never
/// reads as an interface name; bpffs allows no dot).
const POD_PIN_STAGING: &str = "tc-pod+new";

/// The pod-side program attached to one pod's host-side veth.
#[derive(Debug)]
pub struct PodAttached {
    pub iface: String,
    /// True when a link pinned by an earlier agent was replaced.
    pub replaced: bool,
    link: SchedClassifierLinkId,
    pin: Option<PathBuf>,
}

/// Attaches `extproxy_tc_pod` to the ingress of a pod's host-side veth, so the pod's packets to a
/// frontend are translated before netfilter sees them (kube-proxy's nftables mode drops packets
/// to ClusterIPs it does not serve).
pub fn attach_pod(
    ebpf: &mut Ebpf,
    iface: &str,
    pin_dir: Option<&Path>,
) -> Result<PodAttached, LoadError> {
    // Pod links are never taken over: a veth name can come back with a new ifindex (Calico
    // derives names from the pod's name), and a pinned link of the old one would take the update
    // yet filter nothing. A fresh link goes in first and the old pin goes after, so the pod is never
    // without a program; for that moment tcx runs the old one, which ends the chain.
    let (link, _) = attach_tc(ebpf, PROG_TC_POD, iface, TcAttachType::Ingress, None)?;
    let Some(dir) = pin_dir else {
        return Ok(PodAttached {
            iface: iface.to_owned(),
            replaced: false,
            link,
            pin: None,
        });
    };
    links_dir(dir)?;
    let path = link_pin(dir, "tc-pod", iface);
    let fresh = link_pin(dir, POD_PIN_STAGING, iface);
    let _ = std::fs::remove_file(&fresh);
    let prog = tc_program(ebpf, PROG_TC_POD)?;
    let link = pin_tc(prog, PROG_TC_POD, link, &fresh)?;
    let replaced = std::fs::remove_file(&path).is_ok();
    std::fs::rename(&fresh, &path).map_err(|e| LoadError::PinLink {
        hook: PROG_TC_POD,
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(PodAttached {
        iface: iface.to_owned(),
        replaced,
        link,
        pin: Some(path),
    })
}

/// Detaches a pod link. When the interface is already gone the kernel has released the link and
/// only the pin is left to remove.
pub fn detach_pod(ebpf: &mut Ebpf, attached: PodAttached) -> Result<(), LoadError> {
    if let Some(p) = &attached.pin {
        let _ = std::fs::remove_file(p);
    }
    tc_program(ebpf, PROG_TC_POD)?
        .detach(attached.link)
        .map_err(program_error(PROG_TC_POD))
}

/// Removes pins of pod links whose interface no longer exists (the pod went away while no agent
/// was running); the link itself died with the interface.
pub fn prune_pod_pins(pin_dir: &Path, alive: &dyn Fn(&str) -> bool) -> usize {
    let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_str().unwrap_or_default();
        if name.starts_with(POD_PIN_STAGING) {
            // Left by an agent that died between pinning and renaming.
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        let Some(iface) = name.strip_prefix("tc-pod-") else {
            continue;
        };
        if !alive(&iface_of_pin(iface)) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn attach_xdp_mode(
    prog: &mut Xdp,
    iface: &str,
    mode: XdpAttach,
) -> Result<(XdpLinkId, XdpMode), LoadError> {
    let try_mode = |prog: &mut Xdp, m: XdpMode| {
        prog.attach(iface, m)
            .map(|id| (id, m))
            .map_err(program_error(PROG_XDP))
    };
    match mode {
        XdpAttach::Driver => try_mode(prog, XdpMode::Driver),
        XdpAttach::Generic => try_mode(prog, XdpMode::Skb),
        XdpAttach::Auto | XdpAttach::Off => match try_mode(prog, XdpMode::Driver) {
            Ok(a) => Ok(a),
            Err(err) => {
                tracing::warn!(
                    "native XDP on {iface} failed ({err}); using generic XDP (slower, same behaviour)"
                );
                try_mode(prog, XdpMode::Skb)
            }
        },
    }
}

/// Pins an XDP link and hands it back to the program's ownership.
fn repin(prog: &mut Xdp, id: XdpLinkId, path: &Path) -> Result<XdpLinkId, LoadError> {
    let link = prog.take_link(id).map_err(program_error(PROG_XDP))?;
    let link = pin_link(link, PROG_XDP, path)?;
    prog.attach_to_link(link).map_err(program_error(PROG_XDP))
}

/// Detaches what `attach` attached (removing the pins that kept the links alive).
pub fn detach(ebpf: &mut Ebpf, attached: Attached) -> Result<(), LoadError> {
    for path in &attached.pins {
        let _ = std::fs::remove_file(path);
    }
    tc_program(ebpf, PROG_TC_EGRESS)?
        .detach(attached.tc_egress)
        .map_err(program_error(PROG_TC_EGRESS))?;
    tc_program(ebpf, PROG_TC_INGRESS)?
        .detach(attached.tc_ingress)
        .map_err(program_error(PROG_TC_INGRESS))?;
    if let Some(id) = attached.xdp_link {
        xdp_program(ebpf, PROG_XDP)?
            .detach(id)
            .map_err(program_error(PROG_XDP))?;
    }
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (some hosts do not mount it at boot).
/// Returns whether it did: a bpffs mounted in a mount namespace of the process's own goes with it
/// (see [`crate::bpffs::Lifetime`]).
pub fn ensure_bpffs() -> Result<bool, LoadError> {
    let path = Path::new("/sys/fs/bpf");
    if crate::bpffs::is_bpffs(path) {
        return Ok(false);
    }
    let err = |source| LoadError::Bpffs {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(true)
}

/// Attaches the XDP pass program to `iface` (in the calling thread's network namespace) and pins
/// the link at `pin`, so it stays attached after the caller exits; remove the pin to detach.
/// For test and demo topologies built from veths.
pub fn attach_xdp_pass(iface: &str, pin: &Path) -> Result<(), LoadError> {
    if XDP_PASS_OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let mut ebpf = Ebpf::load(XDP_PASS_OBJECT)?;
    let prog = xdp_program(&mut ebpf, "xdp_pass")?;
    let err = program_error("xdp_pass");
    prog.load().map_err(&err)?;
    let id = prog.attach(iface, XdpMode::Driver).map_err(&err)?;
    // Taken from the program, the link outlives it through the pin alone.
    let link = prog.take_link(id).map_err(&err)?;
    let _ = std::fs::remove_file(pin);
    pin_link(link, "xdp_pass", pin)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_escape_dots_reversibly() {
        for iface in ["eth0", "eth0.100", "a%2eb", "x.%y"] {
            let name = pin_name(iface);
            assert!(!name.contains('.'), "{name}");
            assert_eq!(iface_of_pin(&name), iface);
        }
        assert_eq!(
            link_pin(Path::new("/p"), "tc-pod", "eth0.100"),
            Path::new("/p/links/tc-pod-eth0%2e100")
        );
    }
}
