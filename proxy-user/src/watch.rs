//! Watching the manifest directory. A file is re-read when inotify names it: only the named
//! files are looked at, so a change costs the same with ten files or ten thousand. The whole
//! directory is rescanned (and files whose metadata changed re-read) only when events may have
//! been lost (queue overflow, errors), when the directory itself changed, or when a symlink or
//! directory entry changed: ConfigMap mounts swap a `..data` symlink and never name the files.
//!
//! A file being written is read once its writer closes it: `cp` of a large manifest writes it
//! in pieces, and reading it between two of them found half a document (an error that went
//! away a moment later). Renames, the usual way to replace a file, are complete at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode, MetadataKind, ModifyKind},
};
use tokio::{sync::mpsc, time::Instant};

use crate::manifest::{self, ManifestSet};

/// Events arriving within this window are handled together (an editor's save is several). Short:
/// every millisecond here is latency before a change reaches the maps.
const DEBOUNCE: Duration = Duration::from_millis(2);

/// A file written to but not closed is read anyway once its writer has been silent this long
/// (a writer that keeps it open, or whose close inotify could not tell).
const WRITE_QUIET: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// What an inotify event says about the paths it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    /// Created or written to: a writer may still be at it.
    Written,
    /// Anything else that may change what the path holds (closed after writing, renamed,
    /// removed, attributes changed): look now.
    Settled,
    /// Events may have been lost: look at everything.
    Lost,
}

pub struct DirWatcher {
    dir: PathBuf,
    _watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<(Seen, Vec<PathBuf>)>,
    stamps: BTreeMap<PathBuf, Stamp>,
    debounce: Duration,
    write_quiet: Duration,
    /// Paths to look at, and whether to look at everything. Kept here, not in the future: the
    /// agent's select! drops `next()` whenever another branch wins, and an event held only by
    /// the dropped future would be lost.
    named: BTreeSet<PathBuf>,
    rescan: bool,
    /// Manifest files being written, with when they last were: looked at once closed.
    writing: BTreeMap<PathBuf, Instant>,
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

fn classify(kind: &EventKind) -> Option<Seen> {
    match kind {
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
            Some(Seen::Written)
        }
        // Our own reads raise access events: waking on them would loop forever.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Seen::Settled),
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => None,
        _ => Some(Seen::Settled),
    }
}

/// A regular file's stamp, following symlinks: a swapped ConfigMap `..data` link changes the
/// target's stamp. A symlink loop gets the link's own stamp, so that reading it reports it.
/// None if there is no such file.
fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => meta,
        Ok(_) => return None,
        Err(_) if manifest::is_symlink_loop(path) => std::fs::symlink_metadata(path).ok()?,
        Err(_) => return None,
    };
    Some(Stamp {
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
                let note = match res {
                    Ok(event) if event.need_rescan() => (Seen::Lost, Vec::new()),
                    Ok(event) => match classify(&event.kind) {
                        Some(seen) => (seen, event.paths),
                        None => return,
                    },
                    // An error (e.g. queue overflow) still means "look again".
                    Err(_) => (Seen::Lost, Vec::new()),
                };
                let _ = tx.send(note);
            })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        let mut w = DirWatcher {
            dir: dir.to_owned(),
            _watcher: watcher,
            events,
            stamps: BTreeMap::new(),
            debounce,
            write_quiet: WRITE_QUIET,
            named: BTreeSet::new(),
            rescan: false,
            writing: BTreeMap::new(),
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

    /// Takes in one event.
    fn note(&mut self, seen: Seen, paths: Vec<PathBuf>) {
        match seen {
            Seen::Lost => self.rescan = true,
            Seen::Settled => {
                for path in paths {
                    self.writing.remove(&path);
                    self.named.insert(path);
                }
            }
            Seen::Written => {
                for path in paths {
                    // Only regular manifest files have writers to wait for; a new symlink or
                    // directory is complete as it appears.
                    let regular = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
                    if regular && ManifestSet::is_manifest_path(&path) && !self.needs_rescan(&path)
                    {
                        self.writing.insert(path, Instant::now());
                    } else {
                        self.named.insert(path);
                    }
                }
            }
        }
    }

    /// Takes in every event already received.
    fn drain(&mut self) {
        while let Ok((seen, paths)) = self.events.try_recv() {
            self.note(seen, paths);
        }
    }

    /// Files whose writer has been silent too long are looked at as if closed.
    fn expire_writers(&mut self) {
        let now = Instant::now();
        let quiet: Vec<PathBuf> = self
            .writing
            .iter()
            .filter(|(_, last)| now.duration_since(**last) >= self.write_quiet)
            .map(|(path, _)| path.clone())
            .collect();
        for path in quiet {
            self.writing.remove(&path);
            self.named.insert(path);
        }
    }

    /// The named manifest files: re-read those that exist, drop those that are gone.
    fn look_at(&mut self, named: BTreeSet<PathBuf>) -> Changes {
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

    /// Every file whose stamp changed, except those still being written.
    fn rescan(&mut self) -> Changes {
        let mut now = self.scan();
        for path in self.writing.keys() {
            match self.stamps.get(path) {
                Some(old) => now.insert(path.clone(), *old),
                None => now.remove(path),
            };
        }
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

    /// The changes seen so far, without the files still being written.
    fn take_changes(&mut self) -> Changes {
        let named = std::mem::take(&mut self.named);
        let rescan = std::mem::take(&mut self.rescan) || named.iter().any(|p| self.needs_rescan(p));
        if rescan {
            self.rescan()
        } else {
            self.look_at(named)
        }
    }

    /// Waits until the directory changed and returns which manifest files did. Cancellation
    /// safe: every event is taken into `self` before the next await.
    pub async fn next(&mut self) -> Changes {
        loop {
            self.drain();
            self.expire_writers();
            if !self.named.is_empty() || self.rescan {
                // The rest of a burst (an editor's save is several events) comes along.
                tokio::time::sleep(self.debounce).await;
                self.drain();
                let changes = self.take_changes();
                if !changes.is_empty() {
                    return changes;
                }
                continue;
            }
            let quiet_until = self
                .writing
                .values()
                .min()
                .map(|last| *last + self.write_quiet);
            let event = match quiet_until {
                Some(at) => tokio::select! {
                    event = self.events.recv() => event,
                    () = tokio::time::sleep_until(at) => continue,
                },
                None => self.events.recv().await,
            };
            match event {
                Some((seen, paths)) => self.note(seen, paths),
                // The watcher is gone; never wake again.
                None => return std::future::pending().await,
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

    /// `cp` writes a large file in pieces: reading it between two of them found half a
    /// document, reported an error, and "resolved" it a moment later.
    #[tokio::test]
    async fn a_file_being_written_is_read_once_its_writer_closes_it() {
        use std::io::Write as _;
        let dir = std::env::temp_dir().join(format!("extproxy-write-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = DirWatcher::with_debounce(&dir, Duration::from_millis(2)).unwrap();
        let path = dir.join("svc.yaml");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(b"apiVersion: v1\nkind: Serv").unwrap();
        file.flush().unwrap();
        // The writer pauses between two pieces (shorter than WRITE_QUIET).
        let early = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
        assert!(
            early.is_err(),
            "a half-written file was reported: {early:?}"
        );
        file.write_all(b"ice\nmetadata: {name: a}\n").unwrap();
        drop(file);
        let changes = tokio::time::timeout(Duration::from_secs(1), w.next())
            .await
            .expect("the closed file was missed");
        assert_eq!(changes.updated, vec![path.clone()]);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .ends_with("{name: a}\n")
        );

        // A writer that never closes is read once it has been silent for WRITE_QUIET.
        w.write_quiet = Duration::from_millis(50);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"# more\n").unwrap();
        let changes = tokio::time::timeout(Duration::from_secs(1), w.next())
            .await
            .expect("a silent writer's file was never read");
        assert_eq!(changes.updated, vec![path]);
        drop(file);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A symlink loop cannot be read, but it is there: it is handed on to be reported.
    #[tokio::test]
    async fn a_symlink_loop_is_reported_as_a_change() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("extproxy-loop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = DirWatcher::with_debounce(&dir, Duration::from_millis(20)).unwrap();
        symlink("b.yaml", dir.join("a.yaml")).unwrap();
        symlink("a.yaml", dir.join("b.yaml")).unwrap();
        let changes = tokio::time::timeout(Duration::from_secs(1), w.next())
            .await
            .expect("the loop was ignored");
        assert_eq!(
            changes.updated,
            vec![dir.join("a.yaml"), dir.join("b.yaml")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
