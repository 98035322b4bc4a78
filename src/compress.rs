//! The node-wide compression worker: compresses rotated log files off every guest's path.
//!
//! Owns a few OS threads (`compression.threads`, each at `nice 19`), a bounded queue of jobs
//! (`compression.queue`), the pause an upgrade needs, and the node's compression backlog
//! (docs/design.md "Compressed backups"). A job names a rotated file by the absolute
//! offset of its first byte and its inode; everything about the stream goes through the job's
//! [`Owner`] (the stream's actor): opening the raw file, disk room, and installing the result.
//! The worker never renames or removes a log file itself, never holds a lock while it
//! compresses, and never waits on a guest: a full queue refuses the job (the raw file stays,
//! within the cap, and is found again at the next start), and falling behind only grows the
//! backlog.
//!
//! Pause (upgrade, takeover): [`Pool::pause`] makes every worker stop after its current frame
//! and unlink its temporary file; the job goes back to the front of the queue. A staged file
//! already durable stays for the next image's recovery. [`Pool::resume`] undoes a pause (a
//! failed upgrade).

use crate::logfile::seekable::{self, Control, Header, Settings, Staged};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The stream a job belongs to, as the worker sees it: calls from a worker thread that may
/// block briefly on the stream's actor.
pub(crate) trait Owner: Send + Sync {
    /// The stream's current log file (staged and temporary names derive from it).
    fn log_path(&self) -> &Path;
    /// Opens the rotated file holding offset `start` read-only, if it is still the raw file
    /// with inode `inode`; with the header fields the stream knows (offset, inode, times).
    fn open(&self, start: u64, inode: u64) -> Option<(File, Header)>;
    /// Grants `bytes` more disk room for the compression of the file at `start`, or refuses.
    fn reserve(&self, start: u64, bytes: u64) -> bool;
    /// Ends the job: installs a staged file, or gives its `reserved` room back.
    fn finish(&self, job: &Job, outcome: Outcome, reserved: u64);
}

/// How a job ended, as told to its [`Owner`].
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A complete, durable staged file of `disk_len` bytes to install.
    Staged { path: PathBuf, disk_len: u64 },
    /// Compression would not pay (random data): keep the raw file.
    NotWorth,
    /// No disk room: the raw file stays (and is the next to go).
    Refused,
    /// Paused between frames; the job is queued again.
    Stopped,
    /// The file was no longer there (rotated away) or no longer raw.
    Gone,
    /// An I/O error; the raw file stays.
    Failed(io::Error),
}

/// One rotated file to compress.
pub(crate) struct Job {
    pub owner: Arc<dyn Owner>,
    /// Absolute offset of the file's first byte.
    pub start: u64,
    pub inode: u64,
    /// Its raw length (backlog accounting).
    pub raw_len: u64,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("log", &self.owner.log_path())
            .field("start", &self.start)
            .field("inode", &self.inode)
            .field("raw_len", &self.raw_len)
            .finish()
    }
}

/// The worker's settings (`compression.*` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PoolConfig {
    pub threads: usize,
    pub level: i32,
    pub frame_size: u32,
    pub queue: usize,
}

/// The node's metrics the worker keeps up to date (`conlog_compression_backlog_bytes`,
/// `conlog_compressed_bytes_{in,out}_total`).
#[derive(Clone, Debug, Default)]
pub(crate) struct PoolMetrics {
    pub backlog: prometheus_client::metrics::gauge::Gauge,
    pub bytes_in: prometheus_client::metrics::counter::Counter,
    pub bytes_out: prometheus_client::metrics::counter::Counter,
}

/// Counters of the worker.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Raw bytes of the files compressed and installed.
    pub bytes_in: AtomicU64,
    /// Their compressed size.
    pub bytes_out: AtomicU64,
    /// Jobs refused by a full queue.
    pub queue_full: AtomicU64,
}

/// The pool of worker threads.
#[derive(Debug)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    /// Held for queue operations only, never while compressing.
    state: Mutex<State>,
    /// Signalled when the queue, the pause or `busy` change.
    changed: Condvar,
    /// `paused || stopping`, read between frames without the lock.
    halt: AtomicBool,
    /// Raw bytes queued or being compressed.
    backlog: AtomicU64,
    stats: Stats,
    config: PoolConfig,
    metrics: PoolMetrics,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Job>,
    paused: bool,
    stopping: bool,
    /// Workers in the middle of a job.
    busy: usize,
}

/// The queue is full: the job was not taken.
#[derive(Debug)]
pub(crate) struct QueueFull(#[allow(dead_code, reason = "handed back to the caller")] pub Job);

impl Pool {
    /// Starts `config.threads` workers.
    pub(crate) fn start(config: PoolConfig, metrics: PoolMetrics) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            halt: AtomicBool::new(false),
            backlog: AtomicU64::new(0),
            stats: Stats::default(),
            config,
            metrics,
        });
        let mut threads = Vec::with_capacity(config.threads);
        for i in 0..config.threads {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("conlog-compress-{i}"))
                    .spawn(move || work(&shared))?,
            );
        }
        Ok(Self { shared, threads })
    }

    /// Queues `job`, or hands it back when the queue is full.
    pub(crate) fn submit(&self, job: Job) -> Result<(), QueueFull> {
        let mut state = self.shared.lock();
        if state.queue.len() >= self.shared.config.queue || state.stopping {
            self.shared.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            return Err(QueueFull(job));
        }
        self.shared.add_backlog(job.raw_len, true);
        state.queue.push_back(job);
        self.shared.changed.notify_one();
        Ok(())
    }

    /// Stops starting jobs and makes running ones stop after their current frame. Returns at
    /// once; [`Self::wait_idle`] waits for the running ones.
    pub(crate) fn pause(&self) {
        let mut state = self.shared.lock();
        state.paused = true;
        self.shared.halt.store(true, Ordering::Release);
        self.shared.changed.notify_all();
    }

    /// Waits until no worker is in the middle of a job, at most `timeout`; whether it is so.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while state.busy > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Undoes [`Self::pause`].
    pub(crate) fn resume(&self) {
        let mut state = self.shared.lock();
        state.paused = false;
        self.shared.halt.store(state.stopping, Ordering::Release);
        self.shared.changed.notify_all();
    }

    /// Raw bytes queued or being compressed on this node.
    #[cfg(test)]
    pub(crate) fn backlog_bytes(&self) -> u64 {
        self.shared.backlog.load(Ordering::Relaxed)
    }

    /// Jobs waiting.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.shared.lock().queue.len()
    }

    #[cfg(test)]
    pub(crate) fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.stopping = true;
            self.shared.halt.store(true, Ordering::Release);
            self.shared.changed.notify_all();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// Counts `bytes` into (`more`) or out of the backlog, and shows it.
    fn add_backlog(&self, bytes: u64, more: bool) {
        let now = if more {
            self.backlog.fetch_add(bytes, Ordering::Relaxed) + bytes
        } else {
            self.backlog.fetch_sub(bytes, Ordering::Relaxed) - bytes
        };
        self.metrics
            .backlog
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked left the queue consistent (it is only pushed and popped).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A worker thread: lowest priority, one compression context, jobs until the pool stops.
fn work(shared: &Shared) {
    // On Linux a priority applies to the calling thread only (setpriority(2), "BUGS"): the
    // runtime's threads keep theirs.
    if let Err(e) = rustix::process::setpriority_process(None, 19) {
        tracing::debug!(error = %e, "cannot lower the compression thread's priority");
    }
    let settings = Settings {
        level: shared.config.level,
        frame_size: shared.config.frame_size,
    };
    let mut compressor = match zstd::bulk::Compressor::new(settings.level) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot create a compression context");
            return;
        }
    };
    loop {
        let job = {
            let mut state = shared.lock();
            loop {
                if state.stopping {
                    return;
                }
                if !state.paused {
                    if let Some(job) = state.queue.pop_front() {
                        state.busy += 1;
                        break job;
                    }
                }
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let span = tracing::debug_span!("compress", log = %job.owner.log_path().display(), start = job.start);
        let (outcome, reserved) = span.in_scope(|| run(shared, &job, settings, &mut compressor));
        let stopped = matches!(outcome, Outcome::Stopped);
        let stats = &shared.stats;
        match &outcome {
            Outcome::Staged { disk_len, .. } => {
                stats.bytes_in.fetch_add(job.raw_len, Ordering::Relaxed);
                stats.bytes_out.fetch_add(*disk_len, Ordering::Relaxed);
                shared.metrics.bytes_in.inc_by(job.raw_len);
                shared.metrics.bytes_out.inc_by(*disk_len);
            }
            Outcome::Failed(e) => {
                tracing::warn!(log = %job.owner.log_path().display(), start = job.start, error = %e, "compression failed; the file stays raw");
            }
            Outcome::NotWorth | Outcome::Refused | Outcome::Stopped | Outcome::Gone => {}
        }
        job.owner.finish(&job, outcome, reserved);
        let mut state = shared.lock();
        state.busy -= 1;
        if stopped && !state.stopping {
            state.queue.push_front(job);
        } else {
            shared.add_backlog(job.raw_len, false);
        }
        shared.changed.notify_all();
    }
}

/// Grants and pause as the writer sees them.
struct JobControl<'a> {
    shared: &'a Shared,
    owner: &'a dyn Owner,
    start: u64,
    reserved: u64,
}

impl Control for JobControl<'_> {
    fn reserve(&mut self, bytes: u64) -> bool {
        let granted = self.owner.reserve(self.start, bytes);
        if granted {
            self.reserved += bytes;
        }
        granted
    }

    fn keep_going(&self) -> bool {
        !self.shared.halt.load(Ordering::Acquire)
    }
}

/// Compresses one file; returns how it ended and the room reserved for it.
fn run(
    shared: &Shared,
    job: &Job,
    settings: Settings,
    compressor: &mut zstd::bulk::Compressor<'_>,
) -> (Outcome, u64) {
    let Some((source, header)) = job.owner.open(job.start, job.inode) else {
        return (Outcome::Gone, 0);
    };
    let mut control = JobControl {
        shared,
        owner: job.owner.as_ref(),
        start: job.start,
        reserved: 0,
    };
    let result = seekable::stage(
        &source,
        job.owner.log_path(),
        header,
        settings,
        compressor,
        &mut control,
    );
    let outcome = match result {
        Ok(Staged::Done { path, disk_len }) => Outcome::Staged { path, disk_len },
        Ok(Staged::NotWorth) => Outcome::NotWorth,
        Ok(Staged::Refused) => Outcome::Refused,
        Ok(Staged::Stopped) => Outcome::Stopped,
        Err(e) => Outcome::Failed(e),
    };
    (outcome, control.reserved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logfile::{backup_path, seekable::SeekTable};
    use std::os::unix::fs::MetadataExt;
    use std::sync::mpsc;

    /// A stream that installs as the actor does, optionally holding each reservation until
    /// the test lets it through.
    struct TestOwner {
        log: PathBuf,
        gate: Option<Mutex<mpsc::Receiver<()>>>,
        granted: AtomicU64,
        limit: u64,
        ended: Mutex<Vec<String>>,
        done: Condvar,
    }

    impl TestOwner {
        fn new(log: PathBuf, gate: Option<mpsc::Receiver<()>>, limit: u64) -> Arc<Self> {
            Arc::new(Self {
                log,
                gate: gate.map(Mutex::new),
                granted: AtomicU64::new(0),
                limit,
                ended: Mutex::new(Vec::new()),
                done: Condvar::new(),
            })
        }

        fn wait_for(&self, n: usize) -> Vec<String> {
            let ended = self.ended.lock().unwrap();
            let (ended, timeout) = self
                .done
                .wait_timeout_while(ended, Duration::from_secs(60), |e| e.len() < n)
                .unwrap();
            assert!(!timeout.timed_out(), "jobs did not end: {:?}", *ended);
            ended.clone()
        }
    }

    impl Owner for TestOwner {
        fn log_path(&self) -> &Path {
            &self.log
        }
        fn open(&self, start: u64, inode: u64) -> Option<(File, Header)> {
            let file = File::open(backup_path(&self.log, 1)).ok()?;
            (file.metadata().ok()?.ino() == inode).then_some((
                file,
                Header {
                    first_offset: start,
                    source_inode: inode,
                    ..Header::default()
                },
            ))
        }
        fn reserve(&self, _start: u64, bytes: u64) -> bool {
            if let Some(gate) = &self.gate {
                gate.lock().unwrap().recv().unwrap();
            }
            let before = self.granted.fetch_add(bytes, Ordering::SeqCst);
            if before + bytes > self.limit {
                self.granted.fetch_sub(bytes, Ordering::SeqCst);
                return false;
            }
            true
        }
        fn finish(&self, _job: &Job, outcome: Outcome, reserved: u64) {
            let name = match outcome {
                Outcome::Staged { path, .. } => {
                    std::fs::rename(path, seekable::zst_path(&self.log, 1)).unwrap();
                    std::fs::remove_file(backup_path(&self.log, 1)).unwrap();
                    "staged".to_owned()
                }
                other => format!("{other:?}"),
            };
            self.granted.fetch_sub(reserved, Ordering::SeqCst);
            self.ended.lock().unwrap().push(name);
            self.done.notify_all();
        }
    }

    fn config(queue: usize) -> PoolConfig {
        PoolConfig {
            threads: 1,
            level: 3,
            frame_size: 4096,
            queue,
        }
    }

    fn text(len: usize) -> Vec<u8> {
        (0..)
            .flat_map(|i: u32| format!("line {i} of some console output {}\n", i % 13).into_bytes())
            .take(len)
            .collect()
    }

    fn job(owner: &Arc<TestOwner>) -> Job {
        let meta = std::fs::metadata(backup_path(&owner.log, 1)).unwrap();
        Job {
            owner: owner.clone(),
            start: 1000,
            inode: meta.ino(),
            raw_len: meta.len(),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_job_is_compressed_and_installed_by_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("s.log");
        let raw = text(100_000);
        std::fs::write(backup_path(&log, 1), &raw).unwrap();
        let owner = TestOwner::new(log.clone(), None, u64::MAX);
        let pool = Pool::start(config(4), PoolMetrics::default()).unwrap();
        pool.submit(job(&owner)).unwrap();
        assert_eq!(owner.wait_for(1), vec!["staged"]);
        assert_eq!(names(dir.path()), vec!["s.log.1.zst"]);
        let file = File::open(seekable::zst_path(&log, 1)).unwrap();
        let table = SeekTable::read(&file).unwrap();
        assert_eq!(table.header.first_offset, 1000);
        assert_eq!(zstd::stream::decode_all(&file).unwrap(), raw);
        assert!(pool.wait_idle(Duration::from_secs(10)));
        assert_eq!(pool.backlog_bytes(), 0);
        assert_eq!(
            owner.granted.load(Ordering::SeqCst),
            0,
            "reservation settled"
        );
        assert_eq!(
            pool.stats().bytes_in.load(Ordering::Relaxed),
            raw.len() as u64
        );
        // A second job for the same file finds it no longer raw.
        let gone = Job {
            owner: owner.clone(),
            start: 1000,
            inode: 1,
            raw_len: 5,
        };
        pool.submit(gone).unwrap();
        assert_eq!(owner.wait_for(2)[1], "Gone");
    }

    #[test]
    fn refused_room_leaves_the_raw_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("s.log");
        std::fs::write(backup_path(&log, 1), text(100_000)).unwrap();
        let owner = TestOwner::new(log.clone(), None, 0);
        let pool = Pool::start(config(4), PoolMetrics::default()).unwrap();
        pool.submit(job(&owner)).unwrap();
        assert_eq!(owner.wait_for(1), vec!["Refused"]);
        assert_eq!(names(dir.path()), vec!["s.log.1"]);
    }

    #[test]
    fn a_full_queue_refuses_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("s.log");
        std::fs::write(backup_path(&log, 1), text(10_000)).unwrap();
        let owner = TestOwner::new(log, None, u64::MAX);
        let pool = Pool::start(config(2), PoolMetrics::default()).unwrap();
        pool.pause();
        pool.submit(job(&owner)).unwrap();
        pool.submit(job(&owner)).unwrap();
        assert!(pool.submit(job(&owner)).is_err());
        assert_eq!(pool.stats().queue_full.load(Ordering::Relaxed), 1);
        assert_eq!(pool.backlog_bytes(), 20_000);
    }

    /// A pause stops a running job after its current frame: its temporary file goes, the raw
    /// file stays, and the job runs again after a resume.
    #[test]
    fn a_pause_stops_between_frames_and_resume_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("s.log");
        let raw = text(2_000_000);
        std::fs::write(backup_path(&log, 1), &raw).unwrap();
        let (open_gate, gate) = mpsc::channel();
        let owner = TestOwner::new(log.clone(), Some(gate), u64::MAX);
        let pool = Pool::start(config(4), PoolMetrics::default()).unwrap();
        pool.submit(job(&owner)).unwrap();
        // The worker is inside the job, waiting for its first reservation.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !names(dir.path()).iter().any(|n| n.ends_with(".tmp")) {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        pool.pause();
        for _ in 0..100 {
            open_gate.send(()).unwrap();
        }
        assert!(pool.wait_idle(Duration::from_secs(60)));
        assert_eq!(owner.wait_for(1), vec!["Stopped"]);
        assert_eq!(names(dir.path()), vec!["s.log.1"]);
        assert_eq!(pool.queued(), 1, "queued again");
        assert_eq!(pool.backlog_bytes(), raw.len() as u64);
        pool.resume();
        for _ in 0..1000 {
            open_gate.send(()).unwrap();
        }
        assert_eq!(owner.wait_for(2), vec!["Stopped", "staged"]);
        let file = File::open(seekable::zst_path(&log, 1)).unwrap();
        assert_eq!(zstd::stream::decode_all(&file).unwrap(), raw);
    }
}
