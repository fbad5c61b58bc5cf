//! Watching the manifest directory. A file is re-read when inotify names it, or when a rescan
//! finds its metadata changed: event paths catch two writes within one mtime tick, rescans catch
//! editors that write via rename and ConfigMap mounts that swap a `..data` symlink.

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
            // Follow symlinks: a swapped ConfigMap `..data` link changes the target's stamp.
            if let Ok(meta) = std::fs::metadata(&path) {
                use std::os::unix::fs::MetadataExt;
                if meta.is_file() {
                    let stamp = Stamp {
                        modified: meta.modified().ok(),
                        len: meta.len(),
                        inode: meta.ino(),
                    };
                    out.insert(path, stamp);
                }
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
            let mut named = self.pending.take().unwrap_or_default();
            while let Ok(paths) = self.events.try_recv() {
                named.extend(paths);
            }
            let now = self.scan();
            let mut changes = Changes::default();
            for (path, stamp) in &now {
                if self.stamps.get(path) != Some(stamp) || named.contains(path) {
                    changes.updated.push(path.clone());
                }
            }
            for path in self.stamps.keys() {
                if !now.contains_key(path) {
                    changes.removed.push(path.clone());
                }
            }
            self.stamps = now;
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
}
