//! The actor that owns one log-pipe stream: its pipes' read ends, its [`LogFile`] and counters.
//!
//! One task per stream; the rest of the daemon talks to it through [`StreamHandle`] (a bounded
//! command channel) and reads its counters from [`StreamStats`] (atomics, never a lock). The
//! actor never waits on anything but its pipes and its own file: guest → log is lossless while
//! the disk accepts writes; when the disk refuses (or a rotation cannot open its new file),
//! bytes are read out of the pipe anyway (so the guest never blocks), take their offsets as a
//! gap that history reports, and are counted as dropped (the count survives restarts, crashes
//! and upgrades: the log's position record keeps it).
//!
//! Several pipes may feed one stream (each `CreateLogPipe` adds one; a writer may also duplicate
//! its descriptor). Each `splice` moves at most what the pipe holds, and pipe writes of up to
//! `PIPE_BUF` bytes are atomic, so lines of different writers are not torn.

use crate::logfile::{LogFile, LogLimits, Moved, OpenSegment};
use crate::metrics::Metrics;
use std::future::poll_fn;
use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use tokio::net::unix::pipe::Receiver;
use tokio::sync::{mpsc, oneshot, watch};

/// Bytes moved from one pipe before the actor looks at its commands and other pipes again.
const BUDGET_PER_WAKE: usize = 8 << 20;
/// Largest single splice.
const MOVE_MAX: usize = COPY_BUFFER_LEN;
/// Size of the copy buffer between pipe and file.
const COPY_BUFFER_LEN: usize = 128 << 10;

thread_local! {
    /// One copy buffer per runtime thread, not per stream: moves are synchronous inside a poll,
    /// so two actors never use it at once, and thousands of idle streams hold no buffer.
    static COPY_BUFFER: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; COPY_BUFFER_LEN].into_boxed_slice());
}

/// Moves bytes from `pipe` into `log` through this thread's copy buffer.
fn move_bytes(log: &mut LogFile, pipe: std::os::fd::BorrowedFd<'_>) -> io::Result<Moved> {
    COPY_BUFFER.with(|buffer| log.move_from_pipe(pipe, MOVE_MAX, &mut buffer.borrow_mut()))
}

/// Counters of one stream, readable without asking the actor.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Absolute offset of the next byte (bytes ever logged).
    pub end_offset: AtomicU64,
    /// Pipes (pending hand-offs included) feeding the stream.
    pub writers: AtomicU64,
    /// Bytes that could not be written, ever (they are gaps in the offsets).
    pub dropped: AtomicU64,
    /// Rotations since the daemon started.
    pub rotations: AtomicU64,
    /// Set before the actor stops if the stream was removed (rather than the daemon stopping),
    /// so readers following it can tell "ended" from "come back later".
    pub removed: std::sync::atomic::AtomicBool,
    /// Bytes are being dropped (the disk refuses writes); for one warning per episode.
    pub dropping: std::sync::atomic::AtomicBool,
}

impl StreamStats {
    /// Counters of a stream whose log is `log`: what it dropped before (recorded) carries on.
    pub fn for_log(log: &LogFile) -> Self {
        Self {
            end_offset: AtomicU64::new(log.end_offset()),
            dropped: AtomicU64::new(log.dropped()),
            ..Self::default()
        }
    }

    /// Counts bytes that could not be logged; warns once when dropping starts.
    pub fn record_dropped(&self, path: &std::path::Path, dropped: u64, metrics: &Metrics) {
        if dropped == 0 {
            return;
        }
        let total = self.dropped.fetch_add(dropped, Relaxed) + dropped;
        metrics.bytes_dropped.inc_by(dropped);
        if !self.dropping.swap(true, Relaxed) {
            tracing::warn!(log = %path.display(), total_dropped = total, "cannot write the log (disk full?): dropping output, the guest keeps running");
        }
    }

    /// Counts rotations done by the stream's log.
    pub fn record_rotations(&self, delta: u64, metrics: &Metrics) {
        if delta > 0 {
            self.rotations.fetch_add(delta, Relaxed);
            metrics.rotations.inc_by(delta);
        }
    }

    /// Notes that a write succeeded; reports the end of a dropping episode.
    pub fn record_logged(&self, path: &std::path::Path) {
        if self.dropping.swap(false, Relaxed) {
            tracing::info!(log = %path.display(), total_dropped = self.dropped.load(Relaxed), "logging again");
        }
    }
}

/// A consistent view of a stream's figures, taken by its actor at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    /// Bytes ever logged.
    pub end_offset: u64,
    /// Oldest byte still on disk.
    pub first_offset: u64,
    /// Current file plus backups.
    pub bytes_on_disk: u64,
    /// Pipes feeding the stream (pipes), or 0.
    pub writers: u64,
    pub dropped: u64,
    pub rotations: u64,
    /// Attached clients (consoles), or 0.
    pub clients: u64,
    /// QEMU connected (consoles).
    pub guest_connected: bool,
    /// The writer was lost when the daemon stopped; no new pipe since.
    pub broken: bool,
}

impl Figures {
    /// The figures every stream has, from its log and counters.
    pub fn of(log: &LogFile, stats: &StreamStats) -> Self {
        let (bytes_on_disk, first_offset) = log.disk_usage();
        Self {
            end_offset: log.end_offset(),
            first_offset,
            bytes_on_disk,
            writers: stats.writers.load(Relaxed),
            dropped: log.dropped(),
            rotations: stats.rotations.load(Relaxed),
            ..Self::default()
        }
    }
}

/// What the actor is asked to do.
enum Command {
    AddPipe(OwnedFd, oneshot::Sender<io::Result<u64>>),
    SetLimits(LogLimits, oneshot::Sender<io::Result<()>>),
    Figures(oneshot::Sender<Figures>),
    OpenSegments(u64, oneshot::Sender<io::Result<Vec<OpenSegment>>>),
    /// Drain what the pipes hold, sync, and stop.
    Close(oneshot::Sender<()>),
    /// Stop reading (unread bytes stay in the pipes), sync, and hand the pipes back.
    Freeze(oneshot::Sender<Vec<OwnedFd>>),
}

/// A cheap, cloneable handle to a stream actor.
#[derive(Clone)]
pub struct StreamHandle {
    commands: mpsc::Sender<Command>,
    /// The stream's counters.
    pub stats: Arc<StreamStats>,
    /// The end offset, for readers that follow; closed when the actor stops.
    pub offsets: watch::Receiver<u64>,
}

/// Publishes a stream's end offset: to the counters, and to readers following it.
pub struct OffsetPublisher {
    stats: Arc<StreamStats>,
    sender: watch::Sender<u64>,
}

impl OffsetPublisher {
    /// A publisher starting at `end`, and the receiver template for handles.
    pub fn new(stats: Arc<StreamStats>, end: u64) -> (Self, watch::Receiver<u64>) {
        stats.end_offset.store(end, Relaxed);
        let (sender, receiver) = watch::channel(end);
        (Self { stats, sender }, receiver)
    }

    /// Announces a new end offset.
    pub fn publish(&self, end: u64) {
        self.stats.end_offset.store(end, Relaxed);
        self.sender.send_replace(end);
    }
}

fn gone() -> io::Error {
    io::Error::new(ErrorKind::BrokenPipe, "stream actor has stopped")
}

impl StreamHandle {
    /// Starts the actor that owns `log`; its pipes are held by the keeper under names starting
    /// with `held_as` ([`crate::keeper::names::pipe_prefix`]).
    pub fn spawn(log: LogFile, metrics: Arc<Metrics>, held_as: String) -> Self {
        let stats = Arc::new(StreamStats::for_log(&log));
        let (publisher, offsets) = OffsetPublisher::new(stats.clone(), log.end_offset());
        let (commands, receiver) = mpsc::channel(16);
        let actor = StreamActor {
            broken: log.was_open(),
            log,
            pipes: Vec::new(),
            held_as,
            held: Vec::new(),
            stats: stats.clone(),
            publisher,
            metrics,
        };
        tokio::spawn(actor.run(receiver));
        Self {
            commands,
            stats,
            offsets,
        }
    }

    /// Adds a pipe read end (made non-blocking by the caller); returns the offset its first
    /// byte will get.
    pub async fn add_pipe(&self, read_end: OwnedFd) -> io::Result<u64> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::AddPipe(read_end, reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Replaces the stream's limits.
    pub async fn set_limits(&self, limits: LogLimits) -> io::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::SetLimits(limits, reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// The stream's figures at one instant.
    pub async fn figures(&self) -> io::Result<Figures> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Figures(reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }

    /// Opens the files holding offsets from `from` on (see [`LogFile::open_segments`]).
    pub async fn open_segments(&self, from: u64) -> io::Result<Vec<OpenSegment>> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::OpenSegments(from, reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Stops the actor without reading further and returns its pipes' read ends (for an
    /// upgrade). The log is synced; the position record keeps saying a writer is attached.
    pub async fn freeze(&self) -> Vec<OwnedFd> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Freeze(reply)).await.is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Drains the pipes, syncs the log and stops the actor.
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Close(reply)).await.is_ok() {
            let _ = answer.await;
        }
    }
}

struct StreamActor {
    log: LogFile,
    /// The pipe was lost when the daemon last stopped, and no new one came since.
    broken: bool,
    pipes: Vec<Receiver>,
    /// Prefix of the names the keeper holds the pipes under ([`crate::keeper`]).
    held_as: String,
    /// The keeper's name of each pipe, index for index.
    held: Vec<Option<String>>,
    stats: Arc<StreamStats>,
    publisher: OffsetPublisher,
    metrics: Arc<Metrics>,
}

/// What woke the actor on the pipe side.
enum PipeEvent {
    /// Bytes were moved; look at commands, then continue.
    Progress,
    /// Pipe `index` has no writer left (or failed).
    Finished(usize),
}

impl StreamActor {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(Command::Close(reply)) => {
                        self.shutdown();
                        let _ = reply.send(());
                        return;
                    }
                    Some(Command::Freeze(reply)) => {
                        let _ = reply.send(self.freeze());
                        return;
                    }
                    Some(command) => self.handle(command),
                    None => {
                        self.shutdown();
                        return;
                    }
                },
                event = self.pump() => {
                    if let PipeEvent::Finished(index) = event {
                        self.pipes.swap_remove(index);
                        if let Some(name) = self.held.swap_remove(index) {
                            crate::keeper::release(&name);
                        }
                        self.stats.writers.fetch_sub(1, Relaxed);
                        self.metrics.pipe_writers.dec();
                        if self.pipes.is_empty() {
                            if let Err(e) = self.log.set_open(false) {
                                tracing::warn!(path = %self.log.path().display(), error = %e, "cannot record the closed pipe");
                            }
                        }
                    }
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::AddPipe(fd, reply) => {
                self.broken = false;
                if let Err(e) = self.log.set_open(true) {
                    tracing::warn!(path = %self.log.path().display(), error = %e, "cannot record the open pipe");
                }
                let held_as = crate::keeper::names::pipe(&self.held_as, &fd);
                let result = Receiver::from_owned_fd(fd).map(|fd| {
                    if let Some(name) = &held_as {
                        crate::keeper::hold(name, fd.as_fd());
                    }
                    self.held.push(held_as);
                    self.pipes.push(fd);
                    self.stats.writers.fetch_add(1, Relaxed);
                    self.metrics.pipe_writers.inc();
                    self.log.end_offset()
                });
                let _ = reply.send(result);
            }
            Command::SetLimits(limits, reply) => {
                let rotations = self.log.rotations();
                let result = self.log.set_limits(limits);
                self.account_rotations(rotations);
                let _ = reply.send(result);
            }
            Command::Figures(reply) => {
                let _ = reply.send(Figures {
                    broken: self.broken,
                    ..Figures::of(&self.log, &self.stats)
                });
            }
            Command::OpenSegments(from, reply) => {
                let _ = reply.send(self.log.open_segments(from));
            }
            Command::Close(_) | Command::Freeze(_) => unreachable!("handled by run"),
        }
    }

    /// Waits until some pipe is readable and moves its bytes into the log.
    async fn pump(&mut self) -> PipeEvent {
        let Self {
            log,
            pipes,
            stats,
            publisher,
            metrics,
            ..
        } = self;
        if pipes.is_empty() {
            return std::future::pending().await;
        }
        poll_fn(|cx| {
            for (index, pipe) in pipes.iter().enumerate() {
                let mut moved = 0usize;
                loop {
                    match pipe.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => return Poll::Ready(PipeEvent::Finished(index)),
                        Poll::Pending => break,
                    }
                    let rotations = log.rotations();
                    let result = pipe.try_io(|| move_bytes(log, pipe.as_fd()));
                    stats.record_rotations(log.rotations() - rotations, metrics);
                    match result {
                        // Readiness was cleared; poll again to register the waker.
                        Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                        Ok(Moved::Bytes { logged, dropped }) => {
                            moved += logged + dropped;
                            count_moved(log, stats, publisher, metrics, logged, dropped);
                        }
                        Ok(Moved::Eof) => return Poll::Ready(PipeEvent::Finished(index)),
                        Err(e) => {
                            tracing::warn!(path = %log.path().display(), error = %e, "pipe read failed");
                            return Poll::Ready(PipeEvent::Finished(index));
                        }
                    }
                    if moved >= BUDGET_PER_WAKE {
                        return Poll::Ready(PipeEvent::Progress);
                    }
                }
            }
            Poll::Pending
        })
        .await
    }

    fn account_rotations(&self, before: u64) {
        self.stats
            .record_rotations(self.log.rotations() - before, &self.metrics);
    }

    /// Hands the pipes back without reading them.
    fn freeze(&mut self) -> Vec<OwnedFd> {
        let pipes: Vec<OwnedFd> = self
            .pipes
            .drain(..)
            .filter_map(|pipe| pipe.into_nonblocking_fd().ok())
            .collect();
        self.metrics.pipe_writers.dec_by(pipes.len() as i64);
        self.stats.writers.store(0, Relaxed);
        // Carried to the next image under the same names: the keeper keeps holding them.
        self.held.clear();
        // No fsync: the next image runs on this host and shares the page cache; the position
        // record is saved when the log is dropped.
        pipes
    }

    /// Moves whatever the pipes still hold into the log, then syncs it.
    fn shutdown(&mut self) {
        for pipe in &self.pipes {
            loop {
                let rotations = self.log.rotations();
                let moved = move_bytes(&mut self.log, pipe.as_fd());
                self.account_rotations(rotations);
                match moved {
                    Ok(Moved::Bytes { logged, dropped }) => count_moved(
                        &self.log,
                        &self.stats,
                        &self.publisher,
                        &self.metrics,
                        logged,
                        dropped,
                    ),
                    _ => break,
                }
            }
        }
        self.publisher.publish(self.log.end_offset());
        self.metrics.pipe_writers.dec_by(self.pipes.len() as i64);
        self.stats.writers.store(0, Relaxed);
        self.pipes.clear();
        for name in self.held.drain(..).flatten() {
            crate::keeper::release(&name);
        }
        if let Err(e) = self.log.checkpoint() {
            tracing::warn!(path = %self.log.path().display(), error = %e, "cannot record the log position");
        }
    }
}

/// Publishes what one move or write did, for pipes and consoles alike: new end offset (dropped
/// bytes take offsets too), logged and dropped bytes, the start and end of a disk-full episode.
pub(crate) fn count_moved(
    log: &LogFile,
    stats: &StreamStats,
    publisher: &OffsetPublisher,
    metrics: &Metrics,
    logged: usize,
    dropped: usize,
) {
    stats.record_dropped(log.path(), dropped as u64, metrics);
    if logged > 0 {
        metrics.bytes_logged.inc_by(logged as u64);
    }
    // A write that dropped part of its bytes is still the episode, not its end.
    if logged > 0 && dropped == 0 {
        stats.record_logged(log.path());
    }
    if logged + dropped > 0 {
        publisher.publish(log.end_offset());
    }
}
