//! Pinned maps left by an earlier agent: adopt them only when their layout is exactly ours.

use std::path::{Path, PathBuf};

use aya::maps::MapData;
use proxy_common::{
    ABI_VERSION, ALL_MAPS, COUNTER_SLOTS, DEFAULT_MAX_CLUSTER_EGRESS, DEFAULT_MAX_MAGLEV,
    DEFAULT_MAX_TUNNEL_PEERS, EVENT_LIMIT_SLOTS, EVENTS_BYTES, FE_FILTER_WORDS, MAP_BACKEND_HEALTH,
    MAP_CLUSTER_EGRESS, MAP_CONFIG, MAP_COUNTERS, MAP_EGRESS_POOLS, MAP_EVENT_LIMIT, MAP_EVENTS,
    MAP_FE_FILTER, MAP_FRAGS, MAP_MAGLEV, MAP_SNAT_CURSOR, MAP_SVC_STATS, MAP_TUNNEL_PEERS,
    user::map_layout,
};

use crate::{loader::Limits, upgrade};

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
    /// Adoptable once the flow tables (CT, CT_NEW, REVNAT), which another version created or
    /// sized differently, are replaced by ours with every flow copied over
    /// ([`crate::upgrade::FlowMigration`]), and the `rebuild` maps are created anew. `why`: each
    /// difference found.
    Migrate {
        from_abi: u32,
        rebuild: Vec<(&'static str, String)>,
        why: Vec<String>,
    },
    /// Pinned, but not as we would create them; each line says what differs.
    Incompatible(Vec<String>),
}

/// Maps an agent can create empty under live flows: what is in them is derived from the desired
/// state and rewritten in full at start (the Maglev tables, the frontend filter, the cluster
/// egress owners and tunnel peers, the configuration), transient (the event ring and its rate
/// limits, fragments in flight, the SNAT sequence's position), or statistics whose reset costs
/// a counter reset (counters, per-Service stats, passive health signals, which start over).
/// Never the flows (CT, CT_NEW, REVNAT), nor what their entries refer to by id (SERVICES,
/// BACKENDS, SLOTS, FRONTENDS, SRC_RANGES), nor session affinity (clients would move between
/// endpoints).
pub const REBUILDABLE_MAPS: [&str; 13] = [
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
    MAP_SNAT_CURSOR,
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
            (MAP_SNAT_CURSOR, 1),
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
    // The version says whether the flows' meaning changed.
    let abi = upgrade::pinned_abi(dir);
    match abi {
        Some(v) if v == ABI_VERSION => {}
        Some(v) => problems.push((
            "",
            format!("maps were created by ABI version {v}, this is {ABI_VERSION}"),
        )),
        // A CONFIG of a layout no version we know had cannot say: the others' layouts decide.
        None if problems.iter().any(|(n, _)| *n == MAP_CONFIG) => {}
        None => problems.push(("", "CONFIG cannot be read".to_owned())),
    }
    let flows_from = abi.filter(|&v| flows_readable(dir, v));
    classify(problems, flows_from)
}

/// Whether this agent can read the flow tables pinned in `dir` as ABI `abi` created them.
fn flows_readable(dir: &Path, abi: u32) -> bool {
    upgrade::FLOW_MAPS.iter().all(|name| {
        let Some(expected) = upgrade::flow_layout(abi, name) else {
            return false;
        };
        let path = dir.join(name);
        match (expected, MapData::from_pin(&path).and_then(|m| m.info())) {
            (Some((key, value)), Ok(info)) => {
                (info.key_size() as usize, info.value_size() as usize) == (key, value)
            }
            // Not there: nothing to copy.
            (_, Err(_)) => !path.exists(),
            (None, Ok(_)) => false,
        }
    })
}

/// Compatible when nothing differs; a rebuild when only [`REBUILDABLE_MAPS`] differ; a
/// migration when, beside those, only the flow tables (or the version) differ and the flow tables
/// are readable as ABI `flows_from` created them.
fn classify(problems: Vec<(&'static str, String)>, flows_from: Option<u32>) -> Pinned {
    if problems.is_empty() {
        return Pinned::Compatible;
    }
    if problems.iter().all(|(n, _)| REBUILDABLE_MAPS.contains(n)) {
        return Pinned::Rebuild(problems);
    }
    let migratable =
        |n: &&str| REBUILDABLE_MAPS.contains(n) || upgrade::FLOW_MAPS.contains(n) || n.is_empty();
    match flows_from {
        Some(from_abi) if problems.iter().all(|(n, _)| migratable(n)) => Pinned::Migrate {
            from_abi,
            why: problems.iter().map(|(_, why)| why.clone()).collect(),
            rebuild: problems
                .into_iter()
                .filter(|(n, _)| REBUILDABLE_MAPS.contains(n))
                .collect(),
        },
        _ => Pinned::Incompatible(problems.into_iter().map(|(_, why)| why).collect()),
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
    use proxy_common::{MAP_AFFINITY, MAP_CT, MAP_CT_NEW, MAP_EVENTS, MAP_REVNAT, MAP_SERVICES};

    fn problem(name: &'static str) -> (&'static str, String) {
        (name, format!("{name} differs"))
    }

    /// The upgrade from the previous main: only the Maglev tables' value grew (M + 1 words to a
    /// power of two). Flows must survive it.
    #[test]
    fn maps_without_flow_state_are_rebuilt_under_live_flows() {
        assert_eq!(classify(Vec::new(), Some(ABI_VERSION)), Pinned::Compatible);
        let maglev = vec![problem(MAP_MAGLEV)];
        assert_eq!(
            classify(maglev.clone(), Some(ABI_VERSION)),
            Pinned::Rebuild(maglev)
        );
        let several = vec![
            problem(MAP_CONFIG),
            problem(MAP_FE_FILTER),
            problem(MAP_EVENTS),
        ];
        assert_eq!(
            classify(several.clone(), Some(ABI_VERSION)),
            Pinned::Rebuild(several)
        );
    }

    /// The upgrade from ABI 2: CONFIG, the flow tables and the version differ, and new maps
    /// appeared. The flows are copied, the rest created anew.
    #[test]
    fn flow_tables_of_a_readable_version_are_migrated() {
        let version = (
            "",
            "maps were created by ABI version 2, this is 3".to_owned(),
        );
        let problems = vec![
            problem(MAP_CONFIG),
            problem(MAP_CT),
            problem(MAP_CT_NEW),
            problem(MAP_REVNAT),
            problem(MAP_EVENTS),
            version.clone(),
        ];
        let Pinned::Migrate {
            from_abi,
            rebuild,
            why,
        } = classify(problems.clone(), Some(2))
        else {
            panic!("not a migration");
        };
        assert_eq!(from_abi, 2);
        assert_eq!(rebuild, vec![problem(MAP_CONFIG), problem(MAP_EVENTS)]);
        assert_eq!(why.len(), problems.len());
        // Only a new --ct-max: the same version's tables, resized.
        assert!(matches!(
            classify(
                vec![problem(MAP_CT), problem(MAP_REVNAT)],
                Some(ABI_VERSION)
            ),
            Pinned::Migrate {
                from_abi: ABI_VERSION,
                ..
            }
        ));
        // Flow tables this agent cannot read.
        assert!(matches!(classify(problems, None), Pinned::Incompatible(_)));
    }

    #[test]
    fn flows_what_they_refer_to_and_versions_are_never_rebuilt() {
        // What flows refer to by id is never migrated either.
        for map in [MAP_SERVICES, MAP_AFFINITY] {
            assert!(
                matches!(
                    classify(vec![problem(MAP_CT), problem(map)], Some(2)),
                    Pinned::Incompatible(_)
                ),
                "{map}"
            );
        }
        for map in [MAP_CT, MAP_REVNAT, MAP_SERVICES, MAP_AFFINITY] {
            assert_eq!(
                classify(vec![problem(MAP_MAGLEV), problem(map)], None),
                Pinned::Incompatible(vec![
                    format!("{MAP_MAGLEV} differs"),
                    format!("{map} differs")
                ]),
                "{map}"
            );
        }
        assert!(matches!(
            classify(
                vec![("", "maps were created by ABI version 1, this is 3".into())],
                None
            ),
            Pinned::Incompatible(_)
        ));
    }
}
