//! Watching the manifest directory. A file is re-read when inotify names it: only the named
//! files are looked at, so a change costs the same with ten files or ten thousand. The whole
//! directory is rescanned (and files whose metadata changed re-read) only when events may have
//! been lost (queue overflow, errors), when the directory itself changed, or when a symlink or
//! directory entry changed: ConfigMap mounts swap a `..data` symlink and never name the files.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode, MetadataKind, ModifyKind},
};
use tokio::sync::mpsc;

use crate::manifest::ManifestSet;

/// Events arriving within this window are handled together (an editor's save is several). Short:
/// every millisecond here is latency before a change reaches the maps.
const DEBOUNCE: Duration = Duration::from_millis(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

pub struct DirWatcher {
    dir: PathBuf,
    _watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<Vec<PathBuf>>,
    stamps: BTreeMap<PathBuf, Stamp>,
    debounce: Duration,
    /// Events received but not yet handled. Kept here, not in the future: the agent's select!
    /// drops `next()` whenever another branch wins, and an event held only by the dropped
    /// future would be lost.
    pending: Option<Vec<PathBuf>>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub updated: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.updated.is_empty() && self.removed.is_empty()
    }
}

fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        _ => true,
    }
}

/// A regular file's stamp, following symlinks: a swapped ConfigMap `..data` link changes the
/// target's stamp. None if there is no such file.
fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    meta.is_file().then(|| Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

impl DirWatcher {
    pub fn new(dir: &Path) -> notify::Result<Self> {
        Self::with_debounce(dir, DEBOUNCE)
    }

    pub fn with_debounce(dir: &Path, debounce: Duration) -> notify::Result<Self> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                match res {
                    // Our own reads raise access events: waking on them would loop forever.
                    Ok(event) if !changes_content(&event.kind) => {}
                    Ok(event) => {
                        let _ = tx.send(event.paths);
                    }
                    // An error (e.g. queue overflow) still means "look again": send no paths.
                    Err(_) => {
                        let _ = tx.send(Vec::new());
                    }
                }
            })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        let mut w = DirWatcher {
            dir: dir.to_owned(),
            _watcher: watcher,
            events,
            stamps: BTreeMap::new(),
            debounce,
            pending: None,
        };
        w.stamps = w.scan();
        Ok(w)
    }

    /// Whether an event about `path` can mean changes inotify does not name.
    fn needs_rescan(&self, path: &Path) -> bool {
        if path == self.dir || path.parent() != Some(&self.dir) {
            return true;
        }
        if ManifestSet::is_manifest_path(path) {
            return false;
        }
        // `..data`, `..2024_01_01_...`: a ConfigMap mount swapping its contents.
        let dotdot = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".."));
        let link_or_dir =
            std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink() || m.is_dir());
        dotdot || link_or_dir
    }

    /// The named manifest files: re-read those that exist, drop those that are gone.
    fn look_at(&mut self, mut named: Vec<PathBuf>) -> Changes {
        named.sort();
        named.dedup();
        let mut changes = Changes::default();
        for path in named {
            if !ManifestSet::is_manifest_path(&path) {
                continue;
            }
            match stamp(&path) {
                Some(stamp) => {
                    self.stamps.insert(path.clone(), stamp);
                    changes.updated.push(path);
                }
                None => {
                    if self.stamps.remove(&path).is_some() {
                        changes.removed.push(path);
                    }
                }
            }
        }
        changes
    }

    fn rescan(&mut self) -> Changes {
        let now = self.scan();
        let mut changes = Changes::default();
        for (path, stamp) in &now {
            if self.stamps.get(path) != Some(stamp) {
                changes.updated.push(path.clone());
            }
        }
        for path in self.stamps.keys() {
            if !now.contains_key(path) {
                changes.removed.push(path.clone());
            }
        }
        self.stamps = now;
        changes
    }

    fn scan(&self) -> BTreeMap<PathBuf, Stamp> {
        let mut out = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !ManifestSet::is_manifest_path(&path) {
                continue;
            }
            if let Some(stamp) = stamp(&path) {
                out.insert(path, stamp);
            }
        }
        out
    }

    /// Waits until the directory changed and returns which manifest files did. Cancellation
    /// safe: every await happens before any state is taken out of `self`.
    pub async fn next(&mut self) -> Changes {
        loop {
            if self.pending.is_none() {
                let Some(named) = self.events.recv().await else {
                    // The watcher is gone; never wake again.
                    return std::future::pending().await;
                };
                self.pending = Some(named);
            }
            tokio::time::sleep(self.debounce).await;
            // An event without paths (an error, an overflow) means "look at everything".
            let mut named = self.pending.take().filter(|p| !p.is_empty());
            while let Ok(paths) = self.events.try_recv() {
                match (&mut named, paths.is_empty()) {
                    (Some(named), false) => named.extend(paths),
                    _ => named = None,
                }
            }
            let changes = match named {
                Some(named) if !named.iter().any(|p| self.needs_rescan(p)) => self.look_at(named),
                _ => self.rescan(),
            };
            if !changes.is_empty() {
                return changes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_survives_a_cancelled_wait() {
        let dir = std::env::temp_dir().join(format!("extproxy-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A debounce wide enough that the 5 ms timeout below lands inside it.
        let mut w = DirWatcher::with_debounce(&dir, Duration::from_millis(50)).unwrap();
        std::fs::write(dir.join("svc.yaml"), "kind: Service\n").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Cancelled inside the debounce, after the event was taken from the channel, as the
        // agent's select! does when its GC tick fires.
        let cancelled = tokio::time::timeout(Duration::from_millis(5), w.next()).await;
        assert!(cancelled.is_err());
        let changes = tokio::time::timeout(Duration::from_secs(1), w.next())
            .await
            .expect("the change was lost");
        assert_eq!(changes.updated, vec![dir.join("svc.yaml")]);
        // Reading the file (as the agent does) must not wake the watcher again.
        let _ = std::fs::read_to_string(dir.join("svc.yaml")).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), w.next())
                .await
                .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A ConfigMap mount: the files are symlinks through `..data`, which is swapped to a new
    /// directory; inotify names only `..data` and the directories, never the files.
    #[tokio::test]
    async fn a_configmap_swap_is_found_by_a_rescan() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("extproxy-cm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/svc.yaml"), "kind: Service\n").unwrap();
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/svc.yaml", dir.join("svc.yaml")).unwrap();
        let mut w = DirWatcher::with_debounce(&dir, Duration::from_millis(20)).unwrap();
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v2/svc.yaml"), "kind: Service\nmetadata: {}\n").unwrap();
        symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        let changes = tokio::time::timeout(Duration::from_secs(1), w.next())
            .await
            .expect("the swap was missed");
        assert_eq!(changes.updated, vec![dir.join("svc.yaml")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
