//! Pinned maps left by an earlier agent: adopt them only when their layout is exactly ours.

use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData};
use proxy_common::{
    ABI_VERSION, ALL_MAPS, COUNTER_SLOTS, Config, DEFAULT_MAX_CLUSTER_EGRESS, DEFAULT_MAX_MAGLEV,
    DEFAULT_MAX_TUNNEL_PEERS, EVENT_LIMIT_SLOTS, EVENTS_BYTES, FE_FILTER_WORDS, MAP_BACKEND_HEALTH,
    MAP_CLUSTER_EGRESS, MAP_CONFIG, MAP_COUNTERS, MAP_EGRESS_POOLS, MAP_EVENT_LIMIT, MAP_EVENTS,
    MAP_FE_FILTER, MAP_FRAGS, MAP_MAGLEV, MAP_SVC_STATS, MAP_TUNNEL_PEERS, user::map_layout,
};

use crate::loader::Limits;

#[derive(Debug, PartialEq, Eq)]
pub enum Pinned {
    /// Nothing pinned: a fresh start.
    Absent,
    /// Every map pinned with our layout and sizes: adopt (flows survive the restart).
    Compatible,
    /// Adoptable once these maps, which hold no flow state, are created anew (their pins
    /// removed; the agent fills them again before the programs use them): an upgrade that
    /// changed only such maps, or added one, keeps every tracked flow. Each with what differs.
    Rebuild(Vec<(&'static str, String)>),
    /// Pinned, but not as we would create them; each line says what differs.
    Incompatible(Vec<String>),
}

/// Maps an agent can create empty under live flows: what is in them is derived from the desired
/// state and rewritten in full at start (the Maglev tables, the frontend filter, the cluster
/// egress owners and tunnel peers, the configuration), transient (the event ring and its rate
/// limits, fragments in flight), or statistics whose reset costs a counter reset (counters,
/// per-Service stats, passive health signals, which start over). Never the flows (CT, CT_NEW,
/// REVNAT), nor what their entries refer to by id (SERVICES, BACKENDS, SLOTS, FRONTENDS,
/// SRC_RANGES), nor session affinity (clients would move between endpoints).
pub const REBUILDABLE_MAPS: [&str; 12] = [
    MAP_CONFIG,
    MAP_MAGLEV,
    MAP_EGRESS_POOLS,
    MAP_FE_FILTER,
    MAP_CLUSTER_EGRESS,
    MAP_TUNNEL_PEERS,
    MAP_EVENTS,
    MAP_EVENT_LIMIT,
    MAP_FRAGS,
    MAP_COUNTERS,
    MAP_SVC_STATS,
    MAP_BACKEND_HEALTH,
];

pub fn check(dir: &Path, limits: &Limits) -> Pinned {
    let present: Vec<&str> = ALL_MAPS
        .iter()
        .copied()
        .filter(|n| dir.join(n).exists())
        .collect();
    if present.is_empty() {
        return Pinned::Absent;
    }
    let mut problems: Vec<(&'static str, String)> = Vec::new();
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
            problems.push((name, format!("{name} is not pinned")));
            continue;
        }
        let info = match MapData::from_pin(&path).and_then(|m| m.info()) {
            Ok(info) => info,
            Err(err) => {
                problems.push((name, format!("{name}: {err}")));
                continue;
            }
        };
        if let Some((key, value)) = map_layout(name)
            && (info.key_size() as usize, info.value_size() as usize) != (key, value)
        {
            problems.push((
                name,
                format!(
                    "{name} has key/value sizes {}/{}, this version uses {key}/{value}",
                    info.key_size(),
                    info.value_size()
                ),
            ));
        }
        if let Some((_, want)) = sizes.iter().find(|(n, _)| *n == name)
            && info.max_entries() != *want
        {
            problems.push((
                name,
                format!(
                    "{name} holds {} entries, configured for {want}",
                    info.max_entries()
                ),
            ));
        }
    }
    // The version says whether the flows' meaning changed; a CONFIG of another layout cannot
    // say, and then the layouts of the others decide.
    if !problems.iter().any(|(n, _)| *n == MAP_CONFIG) {
        match pinned_abi(dir) {
            Some(v) if v == ABI_VERSION => {}
            Some(v) => problems.push((
                "",
                format!("maps were created by ABI version {v}, this is {ABI_VERSION}"),
            )),
            None => problems.push(("", "CONFIG cannot be read".to_owned())),
        }
    }
    classify(problems)
}

/// Compatible when nothing differs; a rebuild when only [`REBUILDABLE_MAPS`] differ.
fn classify(problems: Vec<(&'static str, String)>) -> Pinned {
    if problems.is_empty() {
        Pinned::Compatible
    } else if problems.iter().all(|(n, _)| REBUILDABLE_MAPS.contains(n)) {
        Pinned::Rebuild(problems)
    } else {
        Pinned::Incompatible(problems.into_iter().map(|(_, why)| why).collect())
    }
}

/// Removes the pins of the maps a [`Pinned::Rebuild`] names, so that loading creates them anew.
pub fn unpin(dir: &Path, maps: &[(&'static str, String)]) -> std::io::Result<()> {
    for (name, _) in maps {
        match std::fs::remove_file(dir.join(name)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{MAP_AFFINITY, MAP_CT, MAP_REVNAT, MAP_SERVICES};

    fn problem(name: &'static str) -> (&'static str, String) {
        (name, format!("{name} differs"))
    }

    /// The upgrade from the previous main: only the Maglev tables' value grew (M + 1 words to a
    /// power of two). Flows must survive it.
    #[test]
    fn maps_without_flow_state_are_rebuilt_under_live_flows() {
        assert_eq!(classify(Vec::new()), Pinned::Compatible);
        let maglev = vec![problem(MAP_MAGLEV)];
        assert_eq!(classify(maglev.clone()), Pinned::Rebuild(maglev));
        let several = vec![
            problem(MAP_CONFIG),
            problem(MAP_FE_FILTER),
            problem(MAP_EVENTS),
        ];
        assert_eq!(classify(several.clone()), Pinned::Rebuild(several));
    }

    #[test]
    fn flows_what_they_refer_to_and_versions_are_never_rebuilt() {
        for map in [MAP_CT, MAP_REVNAT, MAP_SERVICES, MAP_AFFINITY] {
            assert_eq!(
                classify(vec![problem(MAP_MAGLEV), problem(map)]),
                Pinned::Incompatible(vec![
                    format!("{MAP_MAGLEV} differs"),
                    format!("{map} differs")
                ]),
                "{map}"
            );
        }
        assert!(matches!(
            classify(vec![(
                "",
                "maps were created by ABI version 2, this is 3".into()
            )]),
            Pinned::Incompatible(_)
        ));
    }
}
