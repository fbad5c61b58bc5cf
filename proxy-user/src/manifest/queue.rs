//! Changed manifest files are read and parsed off the agent's control loop: a file that takes
//! long to parse (a large one, within the limits of [`super::MAX_FILE_BYTES`] and the others)
//! used to hold up every change behind it, in other files too. Each read runs on tokio's blocking
//! pool, a few at a time; what finishes is handed back in the order it finished. Every read of a
//! path gets a generation: a read that a newer read of the same path, or its removal, overtook is
//! dropped when it finishes, so an older parse never overwrites a newer one.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{Semaphore, mpsc},
    time::Instant,
};

use super::{FileRead, ManifestSet};

/// Reads at a time: parsing is CPU work, and the control loop needs a core too.
const WORKERS: usize = 2;

/// Finished reads are handed back together until none has finished for this long (a rescan's
/// hundred files make one translation, not a hundred)...
const GATHER: Duration = Duration::from_millis(10);

/// ...or the first of them has waited this long: a read still under way is not waited for.
const GATHER_AT_MOST: Duration = Duration::from_millis(100);

/// Called on the worker before each read, with the path: tests hold a read there.
pub type ReadHook = Arc<dyn Fn(&Path) + Send + Sync>;

type Done = (PathBuf, u64, FileRead);

pub struct ParseQueue {
    /// The newest generation asked for, per path being read.
    latest: HashMap<PathBuf, u64>,
    generation: u64,
    done_tx: mpsc::UnboundedSender<Done>,
    done: mpsc::UnboundedReceiver<Done>,
    workers: Arc<Semaphore>,
    /// Reads finished but not yet handed back, and when the first and the last of them
    /// finished. Kept here, not in the future: the agent's select! drops `next()` whenever
    /// another branch wins.
    ready: Vec<(PathBuf, FileRead)>,
    first_ready: Option<Instant>,
    last_ready: Instant,
    hook: Option<ReadHook>,
}

impl Default for ParseQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl ParseQueue {
    pub fn new() -> Self {
        let (done_tx, done) = mpsc::unbounded_channel();
        ParseQueue {
            latest: HashMap::new(),
            generation: 0,
            done_tx,
            done,
            workers: Arc::new(Semaphore::new(WORKERS)),
            ready: Vec::new(),
            first_ready: None,
            last_ready: Instant::now(),
            hook: None,
        }
    }

    /// Calls `hook` before each read, on the thread that reads.
    pub fn with_hook(hook: ReadHook) -> Self {
        ParseQueue {
            hook: Some(hook),
            ..Self::new()
        }
    }

    /// Reads `path` anew, on a worker. A read of it still under way is dropped when it finishes.
    pub fn read(&mut self, path: PathBuf) {
        let generation = self.next_generation(&path);
        let done = self.done_tx.clone();
        let workers = self.workers.clone();
        let hook = self.hook.clone();
        tokio::spawn(async move {
            let Ok(_worker) = workers.acquire_owned().await else {
                return;
            };
            let reading = path.clone();
            let read = tokio::task::spawn_blocking(move || {
                if let Some(hook) = hook {
                    hook(&reading);
                }
                ManifestSet::read_path(&reading)
            })
            .await
            .unwrap_or_else(|err| FileRead::failed(&path, &err.to_string()));
            let _ = done.send((path, generation, read));
        });
    }

    /// `path` is gone: handed back as such at once, and a read of it still under way dropped.
    pub fn remove(&mut self, path: PathBuf) {
        self.next_generation(&path);
        self.latest.remove(&path);
        self.push_ready(path, FileRead::gone());
    }

    /// Reads under way.
    pub fn pending(&self) -> usize {
        self.latest.len()
    }

    fn next_generation(&mut self, path: &Path) -> u64 {
        self.generation += 1;
        self.latest.insert(path.to_owned(), self.generation);
        self.generation
    }

    fn push_ready(&mut self, path: PathBuf, read: FileRead) {
        self.last_ready = Instant::now();
        self.first_ready.get_or_insert(self.last_ready);
        self.ready.push((path, read));
    }

    /// A finished read, kept if no newer read or removal of its path came after it.
    fn take_in(&mut self, (path, generation, read): Done) {
        if self.latest.get(&path) == Some(&generation) {
            self.latest.remove(&path);
            self.push_ready(path, read);
        }
    }

    /// Waits for reads to finish and hands them back in the order they finished (with the path
    /// they were of), those finishing close together at once ([`GATHER`]). Cancel safe.
    pub async fn next(&mut self) -> Vec<(PathBuf, FileRead)> {
        loop {
            while let Ok(done) = self.done.try_recv() {
                self.take_in(done);
            }
            let Some(first) = self.first_ready else {
                // This queue holds a sender: the channel never closes.
                if let Some(done) = self.done.recv().await {
                    self.take_in(done);
                }
                continue;
            };
            let until = (self.last_ready + GATHER).min(first + GATHER_AT_MOST);
            if self.latest.is_empty() || Instant::now() >= until {
                self.first_ready = None;
                return std::mem::take(&mut self.ready);
            }
            tokio::select! {
                done = self.done.recv() => {
                    if let Some(done) = done {
                        self.take_in(done);
                    }
                }
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc::{Receiver, Sender, channel};

    use super::*;
    use crate::translate::{ClaimPolicy, Incremental, NodeInfo, Settings};

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: d}}\nspec:\n  \
             clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
        )
    }

    /// A hook that holds the reads numbered in `held` (the first read is 1) until the test
    /// releases them, one per `release` message, and reports every read as it starts. Held with
    /// a bound, so that a loop waiting for a held read cannot hang the test.
    fn hold(held: &'static [usize]) -> (ReadHook, Sender<()>, Receiver<PathBuf>) {
        let (release, released) = channel::<()>();
        let (started, reads) = channel::<PathBuf>();
        let state = Mutex::new((0, started));
        let released = Mutex::new(released);
        let hook: ReadHook = Arc::new(move |path: &Path| {
            let number = {
                let mut state = state.lock().unwrap();
                state.0 += 1;
                let _ = state.1.send(path.to_owned());
                state.0
            };
            if held.contains(&number) {
                let _ = released
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(10));
            }
        });
        (hook, release, reads)
    }

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("extproxy-queue-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(reads: &[(PathBuf, FileRead)]) -> Vec<String> {
        reads
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// A file that takes long to parse held up every change queued behind it, in other files
    /// too (200,000 nested brackets: 72 s). Here the slow file's read is held until the change
    /// of another file has gone all the way into a translation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_file_does_not_hold_up_a_change_in_another() {
        let dir = dir("slow");
        let (slow, fast) = (dir.join("big.yaml"), dir.join("web.yaml"));
        std::fs::write(&slow, service("big", "10.96.0.9")).unwrap();
        std::fs::write(&fast, service("web", "10.96.0.10")).unwrap();
        let (hook, release, started) = hold(&[1]);
        let mut queue = ParseQueue::with_hook(hook);
        queue.read(slow.clone());
        assert_eq!(started.recv().unwrap(), slow, "the slow read is under way");
        queue.read(fast.clone());

        let reads = tokio::time::timeout(Duration::from_secs(5), queue.next())
            .await
            .expect("the other file's change waited for the slow one");
        assert_eq!(names(&reads), ["web.yaml"]);
        assert_eq!(queue.pending(), 1, "the slow file is still being read");
        let mut set = ManifestSet::default();
        let mut translator = Incremental::new(
            NodeInfo::default(),
            Settings {
                claim: ClaimPolicy::SelectorLess,
                ..Settings::default()
            },
        );
        for (path, read) in reads {
            set.apply_read(&path, read);
        }
        set.feed(&mut translator);
        let served: Vec<String> = translator
            .update()
            .desired
            .services
            .keys()
            .map(|k| k.name.to_string())
            .collect();
        assert_eq!(served, ["web"]);

        release.send(()).unwrap();
        let reads = tokio::time::timeout(Duration::from_secs(5), queue.next())
            .await
            .unwrap();
        assert_eq!(names(&reads), ["big.yaml"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two changes of one file, the first one's read slower: the first must not overwrite the
    /// second when it finishes; nor may a read finishing after its file was removed bring it back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_read_never_overwrites_a_newer_one() {
        let dir = dir("order");
        let path = dir.join("web.yaml");
        std::fs::write(&path, service("web", "10.96.0.10")).unwrap();
        let (hook, release, started) = hold(&[1, 3]);
        let mut queue = ParseQueue::with_hook(hook);
        queue.read(path.clone());
        started.recv().unwrap();
        // A second change: its read starts after the first one's and finishes before it.
        queue.read(path.clone());
        started.recv().unwrap();
        let reads = tokio::time::timeout(Duration::from_secs(5), queue.next())
            .await
            .unwrap();
        assert_eq!(names(&reads), ["web.yaml"]);
        assert_eq!(queue.pending(), 0, "nothing newer is under way");
        // The first finishes now: dropped, not handed back over the newer one.
        release.send(()).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), queue.next())
                .await
                .is_err(),
            "the overtaken read was handed back"
        );

        // A read under way when its file is removed: the removal stands.
        let mut set = ManifestSet::default();
        set.update_file(&path);
        queue.read(path.clone());
        started.recv().unwrap();
        queue.remove(path.clone());
        for (p, read) in queue.next().await {
            set.apply_read(&p, read);
        }
        assert_eq!(set.files().count(), 0, "the file was removed");
        release.send(()).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), queue.next())
                .await
                .is_err(),
            "the read overtaken by the removal was handed back"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
