//! One agent per data path. A second agent on the same pin folder adopted the maps and swapped
//! the programs under the first without a word, and whichever exited last left links of a dead
//! agent attached. An agent holds two locks (flock(2), released by the kernel however the
//! process ends): the lock file in its state folder, which says who holds it (pid, host, pod),
//! and the pin folder itself (a directory on bpffs, which holds no regular files), which catches
//! an agent publishing to another state folder.
//!
//! A lock file is removed by its holder before it lets go (an empty state folder is not left
//! behind); whoever took a lock on a file that was removed meanwhile takes it anew on the file
//! the path names now.

use std::{
    fs::File,
    io::{self, Write as _},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

/// The lock file in the state folder.
pub const LOCK_FILE: &str = "agent.lock";

/// How often a waiting agent tries again.
const RETRY: Duration = Duration::from_millis(100);

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(LOCK_FILE)
}

/// Who holds the lock, as written into the lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub host: String,
    /// `$POD_NAME` (the DaemonSet sets it): pids of other pods mean nothing on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub pin_dir: PathBuf,
    /// When it took the lock, seconds since the Unix epoch.
    pub since: u64,
}

impl Owner {
    pub fn this_process(pin_dir: &Path) -> Owner {
        Owner {
            pid: std::process::id(),
            host: crate::host::hostname(),
            pod: std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()),
            pin_dir: pin_dir.to_owned(),
            since: unix_secs(),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {}", self.pid, self.host)?;
        if let Some(pod) = &self.pod {
            write!(f, ", pod {pod}")?;
        }
        write!(
            f,
            ", running for {} s",
            unix_secs().saturating_sub(self.since)
        )
    }
}

/// Who is in the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// The agent whose lock file this is (None: it has not written who it is yet).
    Agent {
        lock: PathBuf,
        owner: Option<Box<Owner>>,
    },
    /// An agent on the same pin folder with another state folder: only the kernel's lock
    /// table knows its pid, if it is in this PID namespace.
    PinDir { pin_dir: PathBuf, pid: Option<u32> },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Agent {
                lock,
                owner: Some(owner),
            } => write!(
                f,
                "another extproxy ({owner}) holds {} and the pins in {}",
                lock.display(),
                owner.pin_dir.display()
            ),
            Holder::Agent { lock, owner: None } => {
                write!(f, "another extproxy holds {}", lock.display())
            }
            Holder::PinDir { pin_dir, pid } => {
                write!(f, "another extproxy")?;
                if let Some(pid) = pid {
                    write!(f, " (pid {pid})")?;
                }
                write!(
                    f,
                    " holds the pins in {} (it publishes to another --state-dir)",
                    pin_dir.display()
                )
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{holder}; it did not let go within {} s", waited.as_secs())]
    Held { holder: Holder, waited: Duration },
}

/// Both locks of a running agent; [`AgentLock::release`] lets go of them.
#[derive(Debug)]
pub struct AgentLock {
    file: File,
    path: PathBuf,
    _pins: File,
}

impl AgentLock {
    /// Takes the locks of an agent on `pin_dir` publishing to `state_dir` (creating both
    /// folders), waiting up to `wait` for another agent to let go: a rolling update's successor
    /// starts while its predecessor is still exiting. `waiting` is told who is in the way, once.
    pub fn acquire(
        state_dir: &Path,
        pin_dir: &Path,
        wait: Duration,
        mut waiting: impl FnMut(&Holder),
    ) -> Result<AgentLock, LockError> {
        for dir in [state_dir, pin_dir] {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        }
        let start = Instant::now();
        let mut told = false;
        loop {
            let holder = match Self::try_acquire(state_dir, pin_dir)? {
                Ok(lock) => return Ok(lock),
                Err(holder) => holder,
            };
            let waited = start.elapsed();
            if waited >= wait {
                return Err(LockError::Held { holder, waited });
            }
            if !told {
                waiting(&holder);
                told = true;
            }
            std::thread::sleep(RETRY.min(wait - waited));
        }
    }

    fn try_acquire(
        state_dir: &Path,
        pin_dir: &Path,
    ) -> Result<Result<AgentLock, Holder>, LockError> {
        let path = path(state_dir);
        let Some(file) = lock(&path, false, true)? else {
            let owner = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            return Ok(Err(Holder::Agent { lock: path, owner }));
        };
        let Some(pins) = lock(pin_dir, true, true)? else {
            // Not ours to keep: the lock file goes while this process still holds it.
            let _ = std::fs::remove_file(&path);
            drop(file);
            let pid = flock_holder(pin_dir);
            return Ok(Err(Holder::PinDir {
                pin_dir: pin_dir.to_owned(),
                pid,
            }));
        };
        let mut lock = AgentLock {
            file,
            path,
            _pins: pins,
        };
        lock.write_owner(&Owner::this_process(pin_dir))
            .map_err(io_error(&lock.path))?;
        Ok(Ok(lock))
    }

    fn write_owner(&mut self, owner: &Owner) -> io::Result<()> {
        self.file.set_len(0)?;
        let mut text = serde_json::to_vec(owner)?;
        text.push(b'\n');
        std::io::Seek::rewind(&mut self.file)?;
        self.file.write_all(&text)
    }

    /// Removes the lock file, then lets go of both locks.
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Who, if anyone, holds the locks of an agent on `pin_dir` with `state_dir`, without creating
/// either (for `extproxy cleanup`).
pub fn holder(state_dir: &Path, pin_dir: &Path) -> Result<Option<Holder>, LockError> {
    let path = path(state_dir);
    if path.exists() && lock(&path, false, false)?.is_none() {
        let owner = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        return Ok(Some(Holder::Agent { lock: path, owner }));
    }
    if pin_dir.is_dir() && lock(pin_dir, true, false)?.is_none() {
        return Ok(Some(Holder::PinDir {
            pin_dir: pin_dir.to_owned(),
            pid: flock_holder(pin_dir),
        }));
    }
    Ok(None)
}

/// An exclusive flock on `path` (a directory if `dir`, else a file), or None when another
/// holds one. With `create`, what is missing is created, and a lock taken on what its holder
/// removed meanwhile is taken anew on what the path names now.
fn lock(path: &Path, dir: bool, create: bool) -> Result<Option<File>, LockError> {
    loop {
        let opened = if dir {
            File::open(path)
        } else {
            File::options()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(path)
        };
        let f = opened.map_err(io_error(path))?;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(io_error(path)(err));
        }
        if !create {
            return Ok(Some(f));
        }
        let held = f.metadata().map_err(io_error(path))?;
        match std::fs::metadata(path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => return Ok(Some(f)),
            // Replaced by the holder we waited for: lock what is there now.
            Ok(_) => {}
            // Removed by it (an agent removes its pin folder when it detaches).
            Err(err) if err.kind() == io::ErrorKind::NotFound && dir => {
                std::fs::create_dir_all(path).map_err(io_error(path))?;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error(path)(err)),
        }
    }
}

/// The pid holding a flock on `path`, from /proc/locks (`1: FLOCK ADVISORY WRITE 4242
/// 00:28:8662930 0 EOF`: device in hex major:minor, inode); shown only for processes in this
/// PID namespace.
fn flock_holder(path: &Path) -> Option<u32> {
    let meta = std::fs::metadata(path).ok()?;
    let (major, minor) = crate::bpffs::dev_numbers(meta.dev());
    let wanted = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields.iter().position(|f| *f == "FLOCK")?;
        let pid: i64 = fields.get(at + 3)?.parse().ok()?;
        (fields.get(at + 4) == Some(&wanted.as_str()) && pid > 0).then_some(pid as u32)
    })
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LockError + '_ {
    move |source| LockError::Io {
        path: path.to_owned(),
        source,
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let root =
            std::env::temp_dir().join(format!("extproxy-lock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        (root.join("state"), root.join("pins"), root)
    }

    /// A second agent adopted the maps and swapped the programs under the first, saying
    /// nothing. Locks are per open file, so two in one process stand for two agents.
    #[test]
    fn a_second_agent_is_told_who_holds_the_lock_and_waits_for_it() {
        let (state, pins, root) = dirs("second");
        let first = AgentLock::acquire(&state, &pins, Duration::ZERO, |_| {}).unwrap();
        let written: Owner = serde_json::from_slice(&std::fs::read(path(&state)).unwrap()).unwrap();
        assert_eq!(written.pid, std::process::id());
        assert_eq!(written.pin_dir, pins);

        // A manual second start: refused, naming the holder.
        let mut told = Vec::new();
        let err = AgentLock::acquire(&state, &pins, Duration::from_millis(300), |h| {
            told.push(h.clone())
        })
        .unwrap_err();
        let LockError::Held { holder: held, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(
            held,
            &Holder::Agent {
                lock: path(&state),
                owner: Some(Box::new(written.clone()))
            }
        );
        assert_eq!(
            told,
            std::slice::from_ref(held),
            "told once, at the start of the wait"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("pid {} on ", std::process::id())),
            "{message}"
        );
        assert_eq!(holder(&state, &pins).unwrap(), Some(held.clone()));

        // A successor: waits until the first lets go, then holds the lock itself.
        let successor = std::thread::spawn({
            let (state, pins) = (state.clone(), pins.clone());
            move || AgentLock::acquire(&state, &pins, Duration::from_secs(30), |_| {})
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!successor.is_finished(), "it did not wait");
        first.release();
        let second = successor.join().unwrap().expect("the successor took over");
        assert!(path(&state).exists(), "the successor's lock file");
        assert!(holder(&state, &pins).unwrap().is_some());
        second.release();
        assert!(!path(&state).exists());
        assert_eq!(holder(&state, &pins).unwrap(), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Another state folder does not make another data path: the pin folder is locked too.
    #[test]
    fn the_pin_folder_is_locked_whatever_the_state_folder() {
        let (state, pins, root) = dirs("pins");
        let first = AgentLock::acquire(&state, &pins, Duration::ZERO, |_| {}).unwrap();
        let other_state = root.join("other-state");
        let err = AgentLock::acquire(&other_state, &pins, Duration::ZERO, |_| {}).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("holds the pins in") && message.contains("another --state-dir"),
            "{message}"
        );
        // Not held twice: the other state folder's lock was let go.
        first.release();
        AgentLock::acquire(&other_state, &pins, Duration::ZERO, |_| {})
            .unwrap()
            .release();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
