//! Pinned maps left by an earlier agent: adopt them only when their layout is exactly ours.

use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData};
use proxy_common::{
    ABI_VERSION, ALL_MAPS, COUNTER_SLOTS, Config, DEFAULT_MAX_CLUSTER_EGRESS, DEFAULT_MAX_MAGLEV,
    DEFAULT_MAX_TUNNEL_PEERS, EVENT_LIMIT_SLOTS, EVENTS_BYTES, FE_FILTER_WORDS, MAP_CLUSTER_EGRESS,
    MAP_CONFIG, MAP_COUNTERS, MAP_EVENT_LIMIT, MAP_EVENTS, MAP_FE_FILTER, MAP_MAGLEV,
    MAP_TUNNEL_PEERS, user::map_layout,
};

use crate::loader::Limits;

#[derive(Debug, PartialEq, Eq)]
pub enum Pinned {
    /// Nothing pinned: a fresh start.
    Absent,
    /// Every map pinned with our layout and sizes: adopt (flows survive the restart).
    Compatible,
    /// Pinned, but not as we would create them; each line says what differs.
    Incompatible(Vec<String>),
}

pub fn check(dir: &Path, limits: &Limits) -> Pinned {
    let present: Vec<&str> = ALL_MAPS
        .iter()
        .copied()
        .filter(|n| dir.join(n).exists())
        .collect();
    if present.is_empty() {
        return Pinned::Absent;
    }
    let mut problems = Vec::new();
    let sizes: Vec<(&str, u32)> = limits
        .max_entries()
        .into_iter()
        .chain([
            (MAP_CONFIG, 1),
            (MAP_COUNTERS, COUNTER_SLOTS),
            (MAP_FE_FILTER, FE_FILTER_WORDS),
            (MAP_EVENTS, EVENTS_BYTES),
            (MAP_CLUSTER_EGRESS, DEFAULT_MAX_CLUSTER_EGRESS),
            (MAP_TUNNEL_PEERS, DEFAULT_MAX_TUNNEL_PEERS),
            (MAP_MAGLEV, DEFAULT_MAX_MAGLEV),
            (MAP_EVENT_LIMIT, EVENT_LIMIT_SLOTS),
        ])
        .collect();
    for name in ALL_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            problems.push(format!("{name} is not pinned"));
            continue;
        }
        let info = match MapData::from_pin(&path).and_then(|m| m.info()) {
            Ok(info) => info,
            Err(err) => {
                problems.push(format!("{name}: {err}"));
                continue;
            }
        };
        if let Some((key, value)) = map_layout(name)
            && (info.key_size() as usize, info.value_size() as usize) != (key, value)
        {
            problems.push(format!(
                "{name} has key/value sizes {}/{}, this version uses {key}/{value}",
                info.key_size(),
                info.value_size()
            ));
        }
        if let Some((_, want)) = sizes.iter().find(|(n, _)| *n == name)
            && info.max_entries() != *want
        {
            problems.push(format!(
                "{name} holds {} entries, configured for {want}",
                info.max_entries()
            ));
        }
    }
    if problems.is_empty() {
        match pinned_abi(dir) {
            Some(v) if v == ABI_VERSION => {}
            Some(v) => problems.push(format!(
                "maps were created by ABI version {v}, this is {ABI_VERSION}"
            )),
            None => problems.push("CONFIG cannot be read".to_owned()),
        }
    }
    if problems.is_empty() {
        Pinned::Compatible
    } else {
        Pinned::Incompatible(problems)
    }
}

fn pinned_abi(dir: &Path) -> Option<u32> {
    let data = MapData::from_pin(dir.join(MAP_CONFIG)).ok()?;
    let array: Array<MapData, Config> = Array::try_from(Map::Array(data)).ok()?;
    array.get(&0, 0).ok().map(|c| c.abi_version)
}

/// Removes every pin under `dir` (maps and links). Pins are the last references: removing them
/// frees the maps and detaches pinned links.
pub fn remove_all(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            removed.extend(remove_all(&path)?);
            std::fs::remove_dir(&path)?;
        } else {
            std::fs::remove_file(&path)?;
            removed.push(path);
        }
    }
    Ok(removed)
}
