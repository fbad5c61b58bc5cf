//! Loading the data path: the embedded eBPF object, map sizes, pinning, and attaching the
//! programs to the uplink.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
    },
};
use proxy_common::*;

/// The eBPF object built by build.rs (empty when built with AYA_BUILD_SKIP=1).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/extproxy"));

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
    #[error("mounting bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Map capacities. Conntrack and reverse NAT are sized together: every flow has one of each.
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
    /// max_entries per map name, as the loader applies them.
    pub fn max_entries(&self) -> [(&'static str, u32); 10] {
        [
            (MAP_FRONTENDS, self.max_frontends),
            (MAP_SERVICES, self.max_services),
            (MAP_SVC_STATS, self.max_services),
            (MAP_SLOTS, self.max_slots),
            (MAP_BACKENDS, self.max_backends),
            (MAP_CT, self.ct_max),
            (MAP_REVNAT, self.ct_max),
            (MAP_AFFINITY, self.affinity_max),
            (MAP_SRC_RANGES, self.src_ranges_max),
            (MAP_FRAGS, self.frags_max),
        ]
    }
}

/// Loads the object with the given map sizes. With `pin_dir`, every map is pinned there, and
/// maps already pinned there are reused (their contents survive an agent restart).
pub fn load(limits: &Limits, pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
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
    let mut ebpf = loader.load(OBJECT)?;
    for name in [PROG_XDP, PROG_PARSE_ONLY] {
        xdp_program(&mut ebpf, name)?
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    for name in [PROG_TC_INGRESS, PROG_TC_EGRESS] {
        tc_program(&mut ebpf, name)?
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(ebpf)
}

pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoadError> {
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

pub fn tc_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// Writes the node-wide settings the data path reads on every packet. Until this is written the
/// programs pass everything untouched.
pub fn write_config(ebpf: &mut Ebpf, cfg: &Config) -> Result<(), LoadError> {
    let map = ebpf
        .map_mut(MAP_CONFIG)
        .ok_or(LoadError::MissingMap(MAP_CONFIG))?;
    let mut array: aya::maps::Array<_, Config> = aya::maps::Array::try_from(map)?;
    array.set(0, *cfg, 0)?;
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

/// Links the agent created; dropping the `Ebpf` detaches them.
#[derive(Debug)]
pub struct Attached {
    pub iface: String,
    pub xdp: Option<(XdpLinkId, XdpMode)>,
    pub tc_ingress: SchedClassifierLinkId,
    pub tc_egress: SchedClassifierLinkId,
}

/// Attaches XDP (per `mode`) and both TC programs (tcx) to `iface`.
pub fn attach(ebpf: &mut Ebpf, iface: &str, mode: XdpAttach) -> Result<Attached, LoadError> {
    let xdp = match mode {
        XdpAttach::Off => None,
        XdpAttach::Driver => Some(attach_xdp(ebpf, iface, XdpMode::Driver)?),
        XdpAttach::Generic => Some(attach_xdp(ebpf, iface, XdpMode::Skb)?),
        XdpAttach::Auto => match attach_xdp(ebpf, iface, XdpMode::Driver) {
            Ok(a) => Some(a),
            Err(err) => {
                tracing::warn!(
                    "native XDP on {iface} failed ({err}); using generic XDP (slower, same behaviour)"
                );
                Some(attach_xdp(ebpf, iface, XdpMode::Skb)?)
            }
        },
    };
    let tc_ingress = tc_program(ebpf, PROG_TC_INGRESS)?
        .attach(iface, TcAttachType::Ingress)
        .map_err(|source| LoadError::Program {
            name: PROG_TC_INGRESS,
            source,
        })?;
    let tc_egress = tc_program(ebpf, PROG_TC_EGRESS)?
        .attach(iface, TcAttachType::Egress)
        .map_err(|source| LoadError::Program {
            name: PROG_TC_EGRESS,
            source,
        })?;
    Ok(Attached {
        iface: iface.to_owned(),
        xdp,
        tc_ingress,
        tc_egress,
    })
}

fn attach_xdp(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: XdpMode,
) -> Result<(XdpLinkId, XdpMode), LoadError> {
    let id = xdp_program(ebpf, PROG_XDP)?
        .attach(iface, mode)
        .map_err(|source| LoadError::Program {
            name: PROG_XDP,
            source,
        })?;
    Ok((id, mode))
}

/// Detaches what `attach` attached, in reverse order.
pub fn detach(ebpf: &mut Ebpf, attached: Attached) -> Result<(), LoadError> {
    tc_program(ebpf, PROG_TC_EGRESS)?
        .detach(attached.tc_egress)
        .map_err(|source| LoadError::Program {
            name: PROG_TC_EGRESS,
            source,
        })?;
    tc_program(ebpf, PROG_TC_INGRESS)?
        .detach(attached.tc_ingress)
        .map_err(|source| LoadError::Program {
            name: PROG_TC_INGRESS,
            source,
        })?;
    if let Some((id, _)) = attached.xdp {
        xdp_program(ebpf, PROG_XDP)?
            .detach(id)
            .map_err(|source| LoadError::Program {
                name: PROG_XDP,
                source,
            })?;
    }
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (some hosts do not mount it at boot).
pub fn ensure_bpffs() -> Result<(), LoadError> {
    let path = Path::new("/sys/fs/bpf");
    if is_bpffs(path) {
        return Ok(());
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
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}
