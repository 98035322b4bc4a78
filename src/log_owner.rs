//! What every stream actor is as the owner of one log, and the one handle through which the
//! rest of the daemon asks it about that log.
//!
//! A stream is fed by log pipes (`pipe`) or by a serial console (`console`); either way one
//! actor task owns it. Whatever feeds it, the actor answers the same [`LogCommand`]s: replace
//! the limits, take its figures, open its segments for a reader, delete what is older than its
//! `max_age`, close. [`LogHandle`] sends
//! them and reads the stream's counters ([`StreamStats`]) and end offset without a round trip.
//! The registry (`guests`) and history readers (`history`) hold only this handle, so they never
//! depend on what feeds a stream. [`LogOwner`] is the actor's side: the log, its counters and
//! offset publisher, the one place that answers those commands and counts what a write did.
//! A removed stream's files are read through the same handle ([`LogHandle::removed`]), answered
//! from a read-only [`LogView`] with no actor at all. A stream imported from another node (live
//! migration, docs/design.md) takes the import's [`ImportStep`]s through the same channel, and
//! its owner holds the guest's output back ([`Hold`]) until the import ends; a stream that moved
//! away is closed with [`LogHandle::close_moved`].
//!
//! This module never touches a stream's source (pipe or socket), never spawns a task, and never
//! blocks: the actors own their data path and their loop. A handle whose actor stopped answers
//! [`ActorGone`]; what the log itself failed at is [`LogError::Io`].

use crate::compress::{self, Outcome, Pool};
use crate::logfile::index::EventKind;
use crate::logfile::seekable::Header;
use crate::logfile::{LogFile, LogLimits, LogView, OpenSegment};
use crate::metrics::Metrics;
use futures::future::BoxFuture;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// The actor owning a stream has stopped (closed, frozen for an upgrade, or removed): it
/// answers nothing any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("The stream's actor has stopped")]
pub struct ActorGone;

/// What a command to a stream's log can fail at: its actor is gone, or the log's files refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Gone(#[from] ActorGone),
    /// A rotation, truncation or open the new limits or a reader needed failed.
    #[error(transparent)]
    Io(#[from] io::Error),
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
    pub removed: AtomicBool,
    /// Bytes are being dropped (the disk refuses writes); for one warning per episode.
    pub dropping: AtomicBool,
    /// Set before the actor stops if the stream moved to another node (the destination's
    /// endpoint): readers following it end with the moved status (docs/design.md, "Live
    /// migration").
    pub moved_to: std::sync::OnceLock<String>,
    /// The node an import is running from ("" if none), for `ListGuests`.
    pub migrating_from: std::sync::Mutex<String>,
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
    pub fn record_dropped(&self, path: &Path, dropped: u64, metrics: &Metrics) {
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
    pub fn record_logged(&self, path: &Path) {
        if self.dropping.swap(false, Relaxed) {
            tracing::info!(log = %path.display(), total_dropped = self.dropped.load(Relaxed), "logging again");
        }
    }
}

/// A client attached to a console, as `ListGuests` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// Who it is: the local peer's pid and uid, or the remote address and its token's access.
    pub label: String,
    /// It holds the writer lease.
    pub writer: bool,
}

/// A consistent view of a stream's figures, taken by its actor at one instant.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Bytes ever logged.
    pub end_offset: u64,
    /// Oldest byte still on disk.
    pub first_offset: u64,
    /// Current file plus backups (compressed or not), their indexes, compressions under way.
    pub bytes_on_disk: u64,
    /// Raw bytes of history those hold.
    pub raw_bytes: u64,
    /// Rotated files kept.
    pub backups: u32,
    /// Raw bytes of rotated files waiting to be compressed.
    pub compression_backlog: u64,
    /// Pipes feeding the stream (pipes), or 0.
    pub writers: u64,
    pub dropped: u64,
    pub rotations: u64,
    /// Attached clients (consoles) in attach order; none for pipes.
    pub attached: Vec<Attached>,
    /// QEMU connected (consoles).
    pub guest_connected: bool,
    /// The writer was lost when the daemon stopped; no new pipe since.
    pub broken: bool,
    /// The node an import is running from ("" if none).
    pub migrating_from: String,
}

impl Figures {
    /// The figures every stream has, from its log and counters.
    pub fn of(log: &LogFile, stats: &StreamStats) -> Self {
        let usage = log.usage();
        Self {
            end_offset: log.end_offset(),
            first_offset: usage.first,
            bytes_on_disk: usage.disk,
            raw_bytes: usage.raw,
            backups: usage.backups,
            compression_backlog: usage.backlog,
            writers: stats.writers.load(Relaxed),
            dropped: log.dropped(),
            rotations: stats.rotations.load(Relaxed),
            migrating_from: stats
                .migrating_from
                .lock()
                .map(|from| from.clone())
                .unwrap_or_default(),
            ..Self::default()
        }
    }
}

/// What every stream actor answers about its log. An actor's own command type wraps these
/// (`From<LogCommand>`), so both travel on its one bounded channel, in order.
pub enum LogCommand {
    /// Boxed, as [`Close`] is: a change of limits is rare, and every command is as large as
    /// the largest kind.
    SetLimits(Box<LogLimits>, oneshot::Sender<io::Result<()>>),
    Figures(oneshot::Sender<Figures>),
    OpenSegments(u64, oneshot::Sender<io::Result<Vec<OpenSegment>>>),
    /// From the compression worker (boxed: rare).
    Compression(Box<CompressionCommand>),
    /// Delete the rotated files older than the stream's `max_age` (age retention); answers
    /// how many went.
    Expire(oneshot::Sender<io::Result<u32>>),
    /// Stop: see [`Close`].
    Close(Close),
    /// A step of an import from another node (boxed: rare); answers the end offset after it,
    /// or [`ImportOver`] once the import has ended (docs/design.md, "Live migration").
    Import(Box<ImportStep>, oneshot::Sender<Result<u64, ImportOver>>),
}

/// What an import from another node hands the stream's actor, in the source's order.
#[derive(Debug)]
pub enum ImportStep {
    /// The source's bytes at their offset, with the source's time marks inside them.
    Data {
        offset: u64,
        data: bytes::Bytes,
        marks: Vec<crate::logfile::Mark>,
    },
    /// The source has nothing for offsets up to `to` (history's gap there).
    Gap { to: u64 },
    /// An event of the source's history, at the end offset, with its time.
    Event {
        kind: EventKind,
        unix_nanos: i64,
        detail: String,
    },
    /// The import is over: `detail` goes into the MIGRATED_IN event, and the guest's own
    /// output is logged from now on.
    End { detail: String },
}

/// The import has ended (the switchover timeout passed, or the stream closed): nothing more
/// is taken from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the import has ended")]
pub struct ImportOver;

/// A stream's import in progress: the guest's own output is held (not read) until it ends.
#[derive(Debug, Default)]
pub struct Hold {
    /// `migration.switchover_timeout`.
    pub switchover: std::time::Duration,
    /// The switchover deadline, once the destination's guest has output waiting: past it, the
    /// import ends and the guest's output is logged.
    pub deadline: Option<tokio::time::Instant>,
    /// The guest connected while held: its event is recorded after the imported bytes.
    pub connected_pending: bool,
}

/// What the node's compression worker asks of a stream's actor (docs/design.md "Compressed backups"): thin
/// wrappers over [`LogFile`]'s compression steps, answered between two writes.
pub enum CompressionCommand {
    /// Open the raw rotated file starting at `start`, if it is still the one with `inode`.
    Open {
        start: u64,
        inode: u64,
        reply: oneshot::Sender<Option<(File, Header)>>,
    },
    /// Grant `bytes` of disk to the compression of the file at `start` (or refuse).
    Reserve {
        start: u64,
        bytes: u64,
        reply: oneshot::Sender<bool>,
    },
    /// The compression of the file at `start` ended: install, or keep the raw file.
    Finish {
        start: u64,
        inode: u64,
        outcome: Outcome,
        reserved: u64,
    },
}

/// A stream as the compression worker reaches it: through its actor's channel, from a worker
/// thread. A weak sender, so that pending jobs never keep a stopped actor's channel open.
struct StreamCompression<C> {
    log_path: PathBuf,
    commands: mpsc::WeakSender<C>,
}

impl<C: From<LogCommand> + Send + 'static> StreamCompression<C> {
    /// Sends a command and waits for the answer, blocking the worker thread (never a
    /// runtime thread); `None` if the actor has stopped.
    fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> CompressionCommand) -> Option<T> {
        let sender = self.commands.upgrade()?;
        let (reply, answer) = oneshot::channel();
        futures::executor::block_on(async move {
            let command = LogCommand::Compression(Box::new(command(reply)));
            sender.send(command.into()).await.ok()?;
            answer.await.ok()
        })
    }
}

impl<C: From<LogCommand> + Send + 'static> compress::Owner for StreamCompression<C> {
    fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn open(&self, start: u64, inode: u64) -> Option<(File, Header)> {
        self.ask(|reply| CompressionCommand::Open {
            start,
            inode,
            reply,
        })
        .flatten()
    }

    fn reserve(&self, start: u64, bytes: u64) -> bool {
        self.ask(|reply| CompressionCommand::Reserve {
            start,
            bytes,
            reply,
        })
        .unwrap_or(false)
    }

    fn finish(&self, job: &compress::Job, outcome: Outcome, reserved: u64) {
        // An actor gone leaves a staged file to the next open's recovery.
        if let Some(sender) = self.commands.upgrade() {
            let command = LogCommand::Compression(Box::new(CompressionCommand::Finish {
                start: job.start,
                inode: job.inode,
                outcome,
                reserved,
            }));
            let _ = futures::executor::block_on(sender.send(command.into()));
        }
    }
}

/// A stream's link to the node's compression worker.
struct Compressing {
    pool: Arc<Pool>,
    owner: Arc<dyn compress::Owner>,
}

/// A request to close a stream, handed back to its actor's loop by [`LogOwner::answer`]: the
/// actor drains what its source still holds, tells its clients `reason`, syncs the log, stops,
/// and then calls [`Close::done`].
pub struct Close {
    /// Boxed: a close is rare, and every command on an actor's channel is as large as its
    /// largest kind (the channel allocates room for 32 of them per stream at creation).
    why: Box<Why>,
    done: oneshot::Sender<()>,
}

struct Why {
    reason: String,
    removed: bool,
    /// The stream moved to this node (a removal with `moved_to`).
    moved_to: Option<String>,
}

impl Close {
    /// Why, for the clients of a console.
    pub fn reason(&self) -> &str {
        &self.why.reason
    }

    /// The stream will not come back (its guest was removed).
    pub fn removed(&self) -> bool {
        self.why.removed
    }

    /// Where the stream moved to, if it did.
    pub fn moved_to(&self) -> Option<&str> {
        self.why.moved_to.as_deref()
    }

    /// Tells the closer that the actor has stopped.
    pub fn done(self) {
        let _ = self.done.send(());
    }
}

/// The part of an actor's command channel a [`LogHandle`] sees: it can post log commands, and
/// knows nothing else of the actor's command type.
trait Mailbox: Send + Sync {
    fn post(&self, command: LogCommand) -> BoxFuture<'_, Result<(), ActorGone>>;
    fn reserve(&self) -> BoxFuture<'_, Result<Reserved, ActorGone>>;
}

impl<C: From<LogCommand> + Send + 'static> Mailbox for mpsc::Sender<C> {
    fn post(&self, command: LogCommand) -> BoxFuture<'_, Result<(), ActorGone>> {
        Box::pin(async move { self.send(command.into()).await.map_err(|_| ActorGone) })
    }

    fn reserve(&self) -> BoxFuture<'_, Result<Reserved, ActorGone>> {
        Box::pin(async move {
            let place = self.clone().reserve_owned().await.map_err(|_| ActorGone)?;
            Ok(Reserved(Box::new(move |command: LogCommand| {
                place.send(command.into());
            })))
        })
    }
}

/// The "actor" of a removed stream: its files' view, answering at once.
struct Removed(LogView);

impl Mailbox for Removed {
    fn post(&self, command: LogCommand) -> BoxFuture<'_, Result<(), ActorGone>> {
        match command {
            LogCommand::OpenSegments(from, reply) => {
                let _ = reply.send(self.0.open_segments(from));
            }
            LogCommand::Figures(reply) => {
                let segments = self.0.open_segments(0).unwrap_or_default();
                let _ = reply.send(Figures {
                    end_offset: self.0.end_offset(),
                    first_offset: segments.first().map_or(self.0.end_offset(), |s| s.start),
                    bytes_on_disk: segments.iter().map(|s| s.len).sum(),
                    raw_bytes: segments.iter().map(|s| s.len).sum(),
                    dropped: self.0.dropped(),
                    ..Figures::default()
                });
            }
            LogCommand::SetLimits(_, reply) => {
                let _ = reply.send(Err(io::Error::other("the stream was removed")));
            }
            LogCommand::Expire(reply) => {
                let _ = reply.send(Ok(0));
            }
            // Nothing is written to a removed stream, nor compressed (a dropped reply is "no").
            LogCommand::Compression(_) => {}
            LogCommand::Close(close) => close.done(),
            LogCommand::Import(_, reply) => {
                let _ = reply.send(Err(ImportOver));
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn reserve(&self) -> BoxFuture<'_, Result<Reserved, ActorGone>> {
        Box::pin(std::future::ready(Err(ActorGone)))
    }
}

/// A place reserved on an actor's channel ([`LogHandle::reserve`]). A command sent through it
/// does not wait, so it may be sent under a (synchronous) lock: commands sent under one lock
/// reach the actor in the order the lock was taken, and the actor applies them in that order.
pub struct Reserved(Box<dyn FnOnce(LogCommand) + Send>);

impl Reserved {
    /// Sends a change of limits now; the returned future answers once the actor applied it.
    /// Dropping the future does not withdraw the change.
    pub fn set_limits(self, limits: LogLimits) -> BoxFuture<'static, Result<(), LogError>> {
        let (reply, answer) = oneshot::channel();
        (self.0)(LogCommand::SetLimits(Box::new(limits), reply));
        Box::pin(async move { Ok(answer.await.map_err(|_| ActorGone)??) })
    }
}

/// A cheap, cloneable handle to the actor owning a stream's log, whatever feeds the stream.
#[derive(Clone)]
pub struct LogHandle {
    commands: Arc<dyn Mailbox>,
    /// The stream's counters.
    pub stats: Arc<StreamStats>,
    /// The end offset, for readers that follow; closed when the actor stops.
    pub offsets: watch::Receiver<u64>,
}

impl LogHandle {
    /// Sends a command and waits for its answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> LogCommand,
    ) -> Result<T, ActorGone> {
        let (reply, answer) = oneshot::channel();
        self.commands.post(command(reply)).await?;
        answer.await.map_err(|_| ActorGone)
    }

    /// Replaces the stream's limits.
    #[cfg(test)]
    pub async fn set_limits(&self, limits: LogLimits) -> Result<(), LogError> {
        self.reserve().await?.set_limits(limits).await
    }

    /// Reserves a place on the actor's channel (waiting while it is full), for a command to be
    /// sent later without waiting.
    pub async fn reserve(&self) -> Result<Reserved, ActorGone> {
        self.commands.reserve().await
    }

    /// A handle on the files of a stream nobody writes any more (a removed guest or stream),
    /// for history: it answers segments and figures from `view`, its end never moves, and a
    /// reader that follows it ends at its end (the stream counts as removed). It changes
    /// nothing on disk; limits and age retention are refused or do nothing.
    pub fn removed(view: LogView) -> Self {
        let stats = Arc::new(StreamStats {
            end_offset: AtomicU64::new(view.end_offset()),
            dropped: AtomicU64::new(view.dropped()),
            removed: AtomicBool::new(true),
            ..StreamStats::default()
        });
        // The sender goes at once: followers see the stream closed.
        let (_, offsets) = watch::channel(view.end_offset());
        Self {
            commands: Arc::new(Removed(view)),
            stats,
            offsets,
        }
    }

    /// Deletes the stream's rotated files older than its `max_age`; how many went.
    pub async fn expire(&self) -> Result<u32, LogError> {
        Ok(self.ask(LogCommand::Expire).await??)
    }

    /// Whether `other` reaches the same actor (not another one started under the same name).
    pub fn same_actor(&self, other: &LogHandle) -> bool {
        Arc::ptr_eq(&self.stats, &other.stats)
    }

    /// The stream's figures at one instant.
    pub async fn figures(&self) -> Result<Figures, ActorGone> {
        self.ask(LogCommand::Figures).await
    }

    /// Opens the files holding offsets from `from` on (see [`LogFile::open_segments`]).
    pub async fn open_segments(&self, from: u64) -> Result<Vec<OpenSegment>, LogError> {
        Ok(self
            .ask(|reply| LogCommand::OpenSegments(from, reply))
            .await??)
    }

    /// Drains the stream's source, tells its clients `reason`, syncs the log and stops the
    /// actor; `removed` says the stream will not come back (readers following it end). Returns
    /// at once if the actor has stopped already.
    pub async fn close(&self, reason: &str, removed: bool) {
        self.close_why(reason, removed, None).await;
    }

    /// [`Self::close`] of a stream that moved to the node `to` (a removal with `moved_to`):
    /// its history records MIGRATED_OUT, and its clients get the moved status.
    pub async fn close_moved(&self, reason: &str, to: &str) {
        let _ = self.stats.moved_to.set(to.to_owned());
        self.close_why(reason, true, Some(to.to_owned())).await;
    }

    async fn close_why(&self, reason: &str, removed: bool, moved_to: Option<String>) {
        self.stats.removed.store(removed, Relaxed);
        let _ = self
            .ask(|done| {
                LogCommand::Close(Close {
                    why: Box::new(Why {
                        reason: reason.to_owned(),
                        removed,
                        moved_to,
                    }),
                    done,
                })
            })
            .await;
    }

    /// Hands a step of an import to the actor; the end offset after it, or [`ImportOver`]
    /// once the import has ended or the actor is gone.
    pub async fn import(&self, step: ImportStep) -> Result<u64, ImportOver> {
        self.ask(|reply| LogCommand::Import(Box::new(step), reply))
            .await
            .map_err(|_| ImportOver)?
    }
}

/// The actor's side of its log: the log file, its counters and offset publisher. Answers the
/// [`LogCommand`]s and counts what each write did, the same way for every kind of stream.
pub struct LogOwner {
    pub log: LogFile,
    pub stats: Arc<StreamStats>,
    publisher: watch::Sender<u64>,
    pub metrics: Arc<Metrics>,
    /// The worker that compresses this stream's rotated files, if the node has one.
    compressing: Option<Compressing>,
    /// An import in progress: the guest's own output waits (docs/design.md, "Live migration").
    pub hold: Option<Hold>,
}

impl LogOwner {
    /// The owner of `log`, and the handle that reaches it through `commands`, the channel
    /// whose receiver the actor reads.
    pub fn new<C: From<LogCommand> + Send + 'static>(
        mut log: LogFile,
        metrics: Arc<Metrics>,
        commands: mpsc::Sender<C>,
    ) -> (Self, LogHandle) {
        let compressing = log.take_compressor().map(|pool| Compressing {
            pool,
            owner: Arc::new(StreamCompression {
                log_path: log.path().to_owned(),
                commands: commands.downgrade(),
            }),
        });
        let stats = Arc::new(StreamStats::for_log(&log));
        let hold = log.take_import().map(|switchover| Hold {
            switchover,
            ..Hold::default()
        });
        let (publisher, offsets) = watch::channel(log.end_offset());
        let handle = LogHandle {
            commands: Arc::new(commands),
            stats: stats.clone(),
            offsets,
        };
        let mut owner = Self {
            log,
            stats,
            publisher,
            metrics,
            compressing,
            hold,
        };
        // Raw rotated files of a compressed stream, left by a restart, upgrade or a full queue.
        owner.submit_compressions();
        (owner, handle)
    }

    /// Answers `command`; `figures` adds what only this kind of actor knows (clients, a lost
    /// writer). A [`Close`] is not answered: it is handed back, and the actor must stop.
    pub fn answer(
        &mut self,
        command: LogCommand,
        figures: impl FnOnce(Figures) -> Figures,
    ) -> Option<Close> {
        match command {
            LogCommand::SetLimits(limits, reply) => {
                let limits = *limits;
                // Tests hold one actor here to show that nobody else waits for it.
                crate::fault::point("log_owner.set_limits");
                let result = self.counting_rotations(|log| log.set_limits(limits));
                // Compression may have been turned on.
                self.submit_compressions();
                let _ = reply.send(result);
            }
            LogCommand::Figures(reply) => {
                let _ = reply.send(figures(Figures::of(&self.log, &self.stats)));
            }
            LogCommand::OpenSegments(from, reply) => {
                let _ = reply.send(self.log.open_segments(from));
            }
            LogCommand::Compression(command) => match *command {
                CompressionCommand::Open {
                    start,
                    inode,
                    reply,
                } => {
                    let _ = reply.send(self.log.open_for_compression(start, inode));
                }
                CompressionCommand::Reserve {
                    start,
                    bytes,
                    reply,
                } => {
                    let _ = reply.send(self.log.reserve_disk(start, bytes));
                }
                CompressionCommand::Finish {
                    start,
                    inode,
                    outcome,
                    reserved,
                } => self.log.finish_compression(start, inode, outcome, reserved),
            },
            LogCommand::Expire(reply) => {
                let result = self.log.expire(std::time::SystemTime::now());
                if let Ok(n @ 1..) = result {
                    tracing::info!(log = %self.log.path().display(), files = n, "deleted rotated files older than max_age");
                }
                let _ = reply.send(result);
            }
            LogCommand::Close(close) => return Some(close),
            // An actor that imports handles these before `answer` ([`Self::import`]).
            LogCommand::Import(_, reply) => {
                let _ = reply.send(Err(ImportOver));
            }
        }
        None
    }

    /// Whether the guest's own output is held back for an import.
    pub fn holding(&self) -> bool {
        self.hold.is_some()
    }

    /// The switchover deadline of the import, if the guest is there.
    pub fn hold_deadline(&self) -> Option<tokio::time::Instant> {
        self.hold.as_ref().and_then(|h| h.deadline)
    }

    /// The guest connected (or a pipe was handed over) while an import holds its output:
    /// its event is recorded after the imported bytes. Returns whether the output is held.
    pub fn guest_arrived(&mut self) -> bool {
        let Some(hold) = self.hold.as_mut() else {
            return false;
        };
        hold.connected_pending = true;
        true
    }

    /// Whether the actor should watch for held output: an import holds it and its switchover
    /// deadline has not started.
    pub fn awaiting_output(&self) -> bool {
        self.hold.as_ref().is_some_and(|h| h.deadline.is_none())
    }

    /// The guest's first output is waiting while the import holds it: the switchover deadline
    /// starts now (once), so the guest waits at most `migration.switchover_timeout`.
    pub fn output_waiting(&mut self) {
        if let Some(hold) = self.hold.as_mut() {
            if hold.deadline.is_none() {
                hold.deadline = Some(tokio::time::Instant::now() + hold.switchover);
                tracing::info!(log = %self.log.path().display(), "guest output waits for the import's switchover");
            }
        }
    }

    /// Applies one import step. `Ok(Some(..))`: the offset and bytes newly logged (for live
    /// clients); `Ok(None)` for any other step. An `End` step ends the hold.
    pub fn import(&mut self, step: ImportStep) -> Result<Option<(u64, bytes::Bytes)>, ImportOver> {
        if self.hold.is_none() {
            return Err(ImportOver);
        }
        let shown = match step {
            ImportStep::Data {
                offset,
                data,
                marks,
            } => {
                let before = self.log.end_offset();
                let (logged, dropped) =
                    self.counting_rotations(|log| log.import_data(offset, &data, &marks));
                self.count_moved(logged, dropped);
                // What clients have not seen: the bytes past the end before this step.
                let skip = usize::try_from(before.saturating_sub(offset)).unwrap_or(usize::MAX);
                (skip < data.len()).then(|| (offset.max(before), data.slice(skip..)))
            }
            ImportStep::Gap { to } => {
                let dropped = self.log.import_skip_to(to);
                self.count_moved(0, usize::try_from(dropped).unwrap_or(usize::MAX));
                self.publish();
                None
            }
            ImportStep::Event {
                kind,
                unix_nanos,
                detail,
            } => {
                self.log.import_event(kind, unix_nanos, &detail);
                self.count_index_failures();
                None
            }
            ImportStep::End { detail } => {
                self.end_import(&detail);
                None
            }
        };
        Ok(shown)
    }

    /// Ends the import: MIGRATED_IN with `detail` at the first offset of this node's own
    /// output, and the guest's output is no longer held. Returns whether the guest connected
    /// while held (its event is recorded now, after the imported bytes).
    pub fn end_import(&mut self, detail: &str) -> bool {
        let Some(hold) = self.hold.take() else {
            return false;
        };
        self.log.note_import_event(EventKind::MigratedIn, detail);
        self.count_index_failures();
        if let Ok(mut from) = self.stats.migrating_from.lock() {
            from.clear();
        }
        tracing::info!(log = %self.log.path().display(), offset = self.log.end_offset(), detail, "import ended");
        hold.connected_pending
    }

    /// Hands the raw rotated files of a compressed stream to the worker, oldest first; a full
    /// queue leaves them raw (within the cap) until the next rotation offers them again.
    pub fn submit_compressions(&mut self) {
        let Some(compressing) = &self.compressing else {
            return;
        };
        for spec in self.log.compression_jobs() {
            let job = compress::Job {
                owner: compressing.owner.clone(),
                start: spec.start,
                inode: spec.inode,
                raw_len: spec.raw_len,
            };
            if let Err(compress::QueueFull(job)) = compressing.pool.submit(job) {
                crate::limited!(warn, log = %self.log.path().display(), "compression queue full: rotated files stay raw for now");
                self.log.job_not_taken(job.start);
            }
        }
    }

    /// Records `kind` in the log's time index, counting a failure to write it, and wakes the
    /// readers following the stream: an event at the live end is sent at once, not with the
    /// next byte (docs/design.md, "Live migration": an import ends on the source guest's
    /// disconnect).
    pub fn note_event(&mut self, kind: EventKind, detail: &str) {
        self.log.note_event(kind, detail);
        self.count_index_failures();
        self.publish();
    }

    /// Adds the index writes the log failed at to the metric.
    pub fn count_index_failures(&mut self) {
        let failed = self.log.take_index_failures();
        if failed > 0 {
            self.metrics.index_write_failures.inc_by(failed);
        }
    }

    /// Runs `step` on the log and counts the rotations it did.
    pub fn counting_rotations<R>(&mut self, step: impl FnOnce(&mut LogFile) -> R) -> R {
        let before = self.log.rotations();
        let result = step(&mut self.log);
        let rotated = self.log.rotations() - before;
        self.stats.record_rotations(rotated, &self.metrics);
        if rotated > 0 {
            self.submit_compressions();
        }
        result
    }

    /// Publishes what one move or write did, for pipes and consoles alike: new end offset
    /// (dropped bytes take offsets too), logged and dropped bytes, the start and end of a
    /// disk-full episode.
    pub fn count_moved(&mut self, logged: usize, dropped: usize) {
        self.count_index_failures();
        let path = self.log.path();
        self.stats
            .record_dropped(path, dropped as u64, &self.metrics);
        if logged > 0 {
            self.metrics.bytes_logged.inc_by(logged as u64);
        }
        // A write that dropped part of its bytes is still the episode, not its end.
        if logged > 0 && dropped == 0 {
            self.stats.record_logged(path);
        }
        if logged + dropped > 0 {
            self.publish();
        }
    }

    /// Announces the log's end offset to the counters and to readers following the stream.
    pub fn publish(&self) {
        let end = self.log.end_offset();
        self.stats.end_offset.store(end, Relaxed);
        self.publisher.send_replace(end);
    }

    /// Records the log's position (at a close), warning if it cannot.
    pub fn checkpoint(&mut self) {
        if let Err(e) = self.log.checkpoint() {
            tracing::warn!(path = %self.log.path().display(), error = %e, "cannot record the log position");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogMode;

    /// An actor's own command type, as pipe and console have.
    enum Own {
        Log(LogCommand),
    }

    impl From<LogCommand> for Own {
        fn from(command: LogCommand) -> Self {
            Own::Log(command)
        }
    }

    fn owner(dir: &Path) -> (LogOwner, LogHandle, mpsc::Receiver<Own>) {
        let limits = LogLimits {
            max_size: 4096,
            max_backups: 2,
            mode: LogMode::Rotate,
            compress: crate::logfile::Compression::None,
            max_age: 0,
        };
        let log = LogFile::open(&dir.join("s.log"), &dir.join("s.pos"), limits).unwrap();
        let (sender, receiver) = mpsc::channel(4);
        let (owner, handle) = LogOwner::new(log, Arc::new(Metrics::default()), sender);
        (owner, handle, receiver)
    }

    /// A minimal actor: answers log commands until closed.
    async fn serve(mut owner: LogOwner, mut commands: mpsc::Receiver<Own>) {
        while let Some(Own::Log(command)) = commands.recv().await {
            if let Some(close) = owner.answer(command, |f| Figures {
                attached: vec![Attached {
                    label: "a client".into(),
                    writer: true,
                }],
                ..f
            }) {
                owner.checkpoint();
                close.done();
                return;
            }
        }
    }

    #[tokio::test]
    async fn reserved_places_deliver_in_the_order_commands_are_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (_owner, handle, mut commands) = owner(dir.path());
        let limits = |max_backups| LogLimits {
            max_size: 4096,
            max_backups,
            mode: LogMode::Rotate,
            compress: crate::logfile::Compression::None,
            max_age: 0,
        };
        let first = handle.reserve().await.unwrap();
        let second = handle.reserve().await.unwrap();
        // Sent in the other order than reserved: the actor sees them as sent.
        let answers = [second.set_limits(limits(1)), first.set_limits(limits(2))];
        let mut seen = Vec::new();
        for _ in 0..2 {
            let Some(Own::Log(LogCommand::SetLimits(limits, reply))) = commands.recv().await else {
                panic!("expected a change of limits");
            };
            seen.push(limits.max_backups);
            reply.send(Ok(())).unwrap();
        }
        assert_eq!(seen, [1, 2]);
        for answer in answers {
            answer.await.unwrap();
        }
        // A place reserved on a stopped actor cannot be had.
        drop(commands);
        assert_eq!(handle.reserve().await.err(), Some(ActorGone));
    }

    #[tokio::test]
    async fn one_handle_answers_for_any_actor_and_reports_it_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut owner, handle, commands) = owner(dir.path());
        let wrote = owner.log.log(&[b'a'; 10_000]);
        owner.count_moved(wrote.logged, wrote.dropped);
        assert_eq!(*handle.offsets.borrow(), 10_000);
        assert_eq!(handle.stats.end_offset.load(Relaxed), 10_000);
        let actor = tokio::spawn(serve(owner, commands));
        let figures = handle.figures().await.unwrap();
        assert_eq!(figures.end_offset, 10_000);
        assert_eq!(
            figures.attached,
            [Attached {
                label: "a client".into(),
                writer: true
            }]
        );
        let segments = handle.open_segments(0).await.unwrap();
        assert_eq!(segments.last().map(|s| s.start + s.len), Some(10_000));
        handle
            .set_limits(LogLimits {
                max_size: 4096,
                max_backups: 0,
                mode: LogMode::Rotate,
                compress: crate::logfile::Compression::None,
                max_age: 0,
            })
            .await
            .unwrap();
        assert!(handle.figures().await.unwrap().bytes_on_disk <= 4096);
        handle.close("test over", true).await;
        actor.await.unwrap();
        assert!(handle.stats.removed.load(Relaxed));
        assert_eq!(handle.figures().await.unwrap_err(), ActorGone);
        assert!(matches!(
            handle.open_segments(0).await,
            Err(LogError::Gone(ActorGone))
        ));
        // Closing a stopped actor returns at once.
        handle.close("again", false).await;
    }
}
