//! Upgrades that change the flow tables' layout or size: the new agent copies every tracked flow
//! from the tables the previous agent pinned into tables of its own before its programs take
//! over, so that connections survive an upgrade across an ABI change (or a new `--ct-max`).
//!
//! The copy runs twice: once just before the programs are swapped (the old programs still
//! forward and create flows meanwhile), and once right after, for the flows created in between;
//! the second pass never overwrites what the new programs have written since.

mod abi2;

use std::{
    collections::HashMap as StdHashMap,
    io,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use proxy_common::{
    ABI_VERSION, Config, CtKey, CtValue, MAP_CONFIG, MAP_CT, MAP_CT_NEW, MAP_REVNAT, RevNatKey,
    RevNatValue, user::map_layout,
};

/// The tables that hold flows: what an upgrade copies (all three, whichever differs).
pub const FLOW_MAPS: [&str; 3] = [MAP_CT, MAP_CT_NEW, MAP_REVNAT];

/// The ABI versions whose flows this agent can carry over, oldest first.
pub const MIGRATABLE_ABIS: [u32; 2] = [2, ABI_VERSION];

/// Which of this version's flow tables a flow goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// CT: the flow's endpoint has answered.
    Established,
    /// CT_NEW: still waiting for its first answer.
    New,
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("opening the pinned {}", path.display())]
    Open { path: PathBuf, source: MapError },
    #[error("moving the pin {} aside", path.display())]
    MoveAside { path: PathBuf, source: MoveError },
    #[error("reading the previous {name}")]
    Read {
        name: &'static str,
        source: MapError,
    },
    #[error(
        "{} holds the flows of an earlier upgrade that stopped before copying them, and these \
         settings change the flow tables again: start once with that upgrade's settings (its \
         --ct-max) to finish it, or run `extproxy cleanup` (drops tracked connections)",
        path.display()
    )]
    Unfinished { path: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error(transparent)]
    Pin(#[from] aya::pin::PinError),
    #[error(transparent)]
    Unlink(#[from] io::Error),
}

/// The ABI version of the maps pinned in `dir`, whatever the layout of their CONFIG (every
/// version keeps the ABI version as its first word).
pub fn pinned_abi(dir: &Path) -> Option<u32> {
    let data = MapData::from_pin(dir.join(MAP_CONFIG)).ok()?;
    let value_size = data.info().ok()?.value_size() as usize;
    let map = Map::Array(data);
    if value_size == std::mem::size_of::<Config>() {
        let array: Array<&MapData, Config> = Array::try_from(&map).ok()?;
        return array.get(&0, 0).ok().map(|c| c.abi_version);
    }
    if value_size == std::mem::size_of::<abi2::Config>() {
        let array: Array<&MapData, abi2::Config> = Array::try_from(&map).ok()?;
        return array.get(&0, 0).ok().map(|c| c.abi_version);
    }
    None
}

/// The key and value sizes flow table `name` had under `abi`: None when this agent cannot read
/// that version's flows, Some(None) when the table did not exist then.
pub fn flow_layout(abi: u32, name: &str) -> Option<Option<(usize, usize)>> {
    if abi == ABI_VERSION {
        return Some(map_layout(name));
    }
    if abi != 2 {
        return None;
    }
    let key = std::mem::size_of::<CtKey>();
    Some(match name {
        MAP_CT => Some((key, std::mem::size_of::<abi2::CtValueV2>())),
        MAP_REVNAT => Some((key, std::mem::size_of::<abi2::RevNatValueV2>())),
        _ => None,
    })
}

/// What the passes copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Flows written into CT or CT_NEW.
    pub flows: usize,
    /// SNAT port entries written into REVNAT.
    pub ports: usize,
    /// Entries that could not be written (a table full): those flows are lost.
    pub lost: usize,
}

/// The previous agent's flow tables, held open (their pins moved aside) while this agent's
/// tables replace them.
pub struct FlowMigration {
    pub from_abi: u32,
    old: Vec<(&'static str, Map)>,
    aside: Vec<PathBuf>,
    /// What the passes so far copied.
    copied: Copied,
}

/// Entries converted to this version's layout, by table.
#[derive(Default)]
struct Converted {
    ct: Vec<(CtKey, CtValue)>,
    ct_new: Vec<(CtKey, CtValue)>,
    revnat: Vec<(RevNatKey, RevNatValue)>,
}

impl FlowMigration {
    /// Opens the flow tables pinned in `dir` (created under ABI `from_abi`) and moves their pins
    /// aside, so that loading creates this version's tables in their place. The previous
    /// programs keep forwarding with the old tables until they are replaced.
    pub fn detach(dir: &Path, from_abi: u32) -> Result<FlowMigration, UpgradeError> {
        // An upgrade that stopped half-way, whose flows this one would lose.
        if let Some(path) = FLOW_MAPS
            .iter()
            .map(|name| aside_path(dir, name))
            .find(|path| path.exists())
        {
            return Err(UpgradeError::Unfinished { path });
        }
        let mut old = Vec::new();
        let mut aside = Vec::new();
        for name in FLOW_MAPS {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let data = MapData::from_pin(&path).map_err(|source| UpgradeError::Open {
                path: path.clone(),
                source,
            })?;
            let moved = aside_path(dir, name);
            // Pinned a second time, then unpinned where loading will pin
            // ours (the previous programs hold the tables meanwhile).
            data.pin(&moved)
                .map_err(MoveError::from)
                .and_then(|()| std::fs::remove_file(&path).map_err(MoveError::from))
                .map_err(|source| UpgradeError::MoveAside {
                    path: path.clone(),
                    source,
                })?;
            let map = Map::from_map_data(data).map_err(|source| UpgradeError::Open {
                path: path.clone(),
                source,
            })?;
            old.push((name, map));
            aside.push(moved);
        }
        Ok(FlowMigration {
            from_abi,
            old,
            aside,
            copied: Copied::default(),
        })
    }

    /// The tables of an upgrade that stopped half-way (the agent died between moving the previous
    /// tables' pins aside and letting them go): their flows are still to be copied. None when
    /// there are none, or when their layout is no version this agent can read.
    pub fn interrupted(dir: &Path) -> Option<FlowMigration> {
        let mut aside = Vec::new();
        for name in FLOW_MAPS {
            let path = aside_path(dir, name);
            if path.exists() {
                let data = MapData::from_pin(&path).ok()?;
                let info = data.info().ok()?;
                let layout = (info.key_size() as usize, info.value_size() as usize);
                aside.push((name, path, data, layout));
            }
        }
        if aside.is_empty() {
            return None;
        }
        let from_abi = MIGRATABLE_ABIS.into_iter().find(|&abi| {
            aside
                .iter()
                .all(|(name, _, _, layout)| flow_layout(abi, name).flatten() == Some(*layout))
        })?;
        let mut migration = FlowMigration {
            from_abi,
            old: Vec::new(),
            aside: Vec::new(),
            copied: Copied::default(),
        };
        for (name, path, data, _) in aside {
            migration.old.push((name, Map::from_map_data(data).ok()?));
            migration.aside.push(path);
        }
        Some(migration)
    }

    /// Copies into the tables pinned in `dir` every flow they lack. `clock`: this version's
    /// configuration, whose fine clock stamps the ports of flows that closed before.
    pub fn copy(&mut self, dir: &Path, clock: &Config) -> Result<(), UpgradeError> {
        let converted = self.read(crate::host::datapath_ticks(clock))?;
        let copied = &mut self.copied;
        write(dir, MAP_REVNAT, &converted.revnat, copied, |c| &mut c.ports);
        write(dir, MAP_CT, &converted.ct, copied, |c| &mut c.flows);
        write(dir, MAP_CT_NEW, &converted.ct_new, copied, |c| &mut c.flows);
        Ok(())
    }

    /// The last pass, once this version's programs forward: then the previous tables are let go.
    /// What every pass copied together.
    pub fn finish(mut self, dir: &Path, clock: &Config) -> Result<Copied, UpgradeError> {
        self.copy(dir, clock)?;
        for path in &self.aside {
            let _ = std::fs::remove_file(path);
        }
        Ok(self.copied)
    }

    fn old(&self, name: &'static str) -> Option<&Map> {
        self.old.iter().find(|(n, _)| *n == name).map(|(_, m)| m)
    }

    fn read(&self, now: u32) -> Result<Converted, UpgradeError> {
        if self.from_abi == 2 {
            return self.read_abi2(now);
        }
        let mut out = Converted::default();
        if let Some(map) = self.old(MAP_CT) {
            out.ct = entries::<CtKey, CtValue>(MAP_CT, map)?;
        }
        if let Some(map) = self.old(MAP_CT_NEW) {
            out.ct_new = entries::<CtKey, CtValue>(MAP_CT_NEW, map)?;
        }
        if let Some(map) = self.old(MAP_REVNAT) {
            out.revnat = entries::<RevNatKey, RevNatValue>(MAP_REVNAT, map)?;
        }
        Ok(out)
    }

    fn read_abi2(&self, now: u32) -> Result<Converted, UpgradeError> {
        let mut out = Converted::default();
        let flows = match self.old(MAP_CT) {
            Some(map) => entries::<CtKey, abi2::CtValueV2>(MAP_CT, map)?,
            None => Vec::new(),
        };
        let flags: StdHashMap<CtKey, u8> = flows.iter().map(|(k, v)| (*k, v.flags)).collect();
        for (key, old) in &flows {
            match abi2::ct(old) {
                (value, Table::Established) => out.ct.push((*key, value)),
                (value, Table::New) => out.ct_new.push((*key, value)),
            }
        }
        if let Some(map) = self.old(MAP_REVNAT) {
            for (key, old) in entries::<RevNatKey, abi2::RevNatValueV2>(MAP_REVNAT, map)? {
                let flow = flags.get(&revnat_flow_key(&old, key.proto)).copied();
                if let Some(value) = abi2::revnat(&old, key.proto, flow, now) {
                    out.revnat.push((key, value));
                }
            }
        }
        Ok(out)
    }
}

/// Where a previous flow table's pin waits while its flows are copied.
fn aside_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("previous-{name}"))
}

/// The conntrack key of the flow an ABI 2 SNAT port entry belongs to.
fn revnat_flow_key(rn: &abi2::RevNatValueV2, proto: u8) -> CtKey {
    RevNatValue {
        client: rn.client,
        frontend: rn.frontend,
        client_port: rn.client_port,
        frontend_port: rn.frontend_port,
        ..RevNatValue::default()
    }
    .ct_key(proto)
}

fn entries<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    name: &'static str,
    map: &Map,
) -> Result<Vec<(K, V)>, UpgradeError> {
    let table: HashMap<&MapData, K, V> =
        HashMap::try_from(map).map_err(|source| UpgradeError::Read { name, source })?;
    // Entries that vanish while being iterated (the old programs still run) are skipped: the
    // flow ended.
    Ok(table.iter().filter_map(Result::ok).collect())
}

/// Writes `entries` into the table `name` pinned in `dir` where it has none for their keys.
fn write<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
    entries: &[(K, V)],
    copied: &mut Copied,
    count: impl Fn(&mut Copied) -> &mut usize,
) {
    if entries.is_empty() {
        return;
    }
    let map = match MapData::from_pin(dir.join(name)).and_then(Map::from_map_data) {
        Ok(map) => map,
        Err(err) => {
            tracing::warn!("upgrade: the new {name} cannot be opened ({err}); its flows are lost");
            copied.lost += entries.len();
            return;
        }
    };
    let Ok(mut table) = HashMap::<MapData, K, V>::try_from(map) else {
        copied.lost += entries.len();
        return;
    };
    const BPF_NOEXIST: u64 = 1;
    for (key, value) in entries {
        match table.insert(key, value, BPF_NOEXIST) {
            Ok(()) => *count(copied) += 1,
            // An earlier pass's, or written by this version's programs since.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(_) => copied.lost += 1,
        }
    }
}

#[cfg(test)]
mod tests;
