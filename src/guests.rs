//! The registry of guests and their streams, and its persistent record in `state/guests/`.
//!
//! Owns the map guest → stream → actor handle, the per-stream record files
//! (`state/guests/<guest>/<stream>.json`: kind and limits) and the limits on how many guests and
//! streams exist. It starts and stops stream actors ([`crate::pipe`], [`crate::console`]) but
//! never touches their data path: what every stream does (limits, figures, close) goes through
//! its [`LogHandle`], and only what one kind alone does (adding a pipe, attaching, freezing)
//! looks at the kind. The position records (`<stream>.pos`) beside the stream records belong to
//! [`crate::logfile`]; they are kept when a guest is removed (even when its logs are deleted),
//! so a guest created again with the same name continues its offsets. Removal is per guest or
//! per stream ([`Guests::remove`]); a removed stream's logs stay with a tombstone
//! ([`crate::tombstone`]) and are read through a read-only view ([`Guests::removed_stream`]),
//! or are deleted (at once with `delete_logs`, or later by [`crate::retention`] through
//! [`Guests::delete_removed`], under the same lock that creating a stream takes). A removal
//! with `moved_to` (live migration) keeps the redirect in the tombstones ([`Guests::moved`]);
//! a stream created by an import holds its guest's output from the start, and one restored
//! with an import under way (its marker, [`Guests::import_marker`]) is handed to the importer.
//!
//! Locking: the map sits under a `std::sync::Mutex` that is never held across an `.await`. A
//! call decides under it and takes the handles it needs, releases it, and only then waits for
//! actors (several at once with `join_all`), so a slow actor holds up nobody but its own
//! callers. Changes that write to disk (creating a stream, new limits, marking a guest closing)
//! are serialized by a second, async lock held only over their synchronous steps, so that a
//! slow disk holds up other changes but never a lookup. A guest being removed stays in the map
//! marked closing (a single stream being removed, in its guest's `closing_streams`) until its
//! streams are closed and its logs, records and sockets removed: lookups and `ListGuests` no
//! longer see it, and `CreateLogPipe`, `CreateConsole` or `RemoveGuest` in its name wait until
//! the removal is over and then act as if they came after it (docs/design.md, §3), so nothing
//! is created under a name whose files are being removed. This module must never await with
//! the lock held, nor serve a closing guest.
//!
//! Its public methods take names already parsed at the edge ([`GuestName`], [`StreamName`]),
//! and what it refuses or fails at is a [`RegistryError`]; it never names a status code
//! (`crate::error` maps them).

use crate::config::{Config, LogMode};
use crate::console::ConsoleError;
use crate::console::{ConsoleHandle, ConsolePaths, ConsoleSettings, Protocol};
use crate::log_owner::{ActorGone, Figures, LogError, LogHandle, Reserved};
use crate::logfile::index::StartKind;
use crate::logfile::{Compression, LogFile, LogLimits};
use crate::metrics::Metrics;
use crate::names::{self, GuestName, StreamName};
use crate::pipe::PipeHandle;
use crate::upgrade::{FrozenConsole, FrozenStream};
use futures::future::{join_all, BoxFuture};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use thiserror::Error;
use tokio::sync::watch;

/// What the registry refuses or fails at. The mapping to status codes is `crate::error`'s.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// No guest of that name (or it is being removed).
    #[error("No guest named {0:?}")]
    UnknownGuest(String),
    /// The guest has no stream of that name.
    #[error("Guest {guest:?} has no stream {stream:?}")]
    UnknownStream { guest: String, stream: String },
    /// The guest has no console of that name.
    #[error("Guest {guest:?} has no console {device:?}")]
    UnknownConsole { guest: String, device: String },
    /// The stream exists with the other kind (a pipe asked for as a console, or the reverse).
    #[error("{guest}/{stream} is a {}, not a {}", found.noun(), wanted.noun())]
    KindMismatch {
        guest: String,
        stream: String,
        found: StreamKind,
        wanted: StreamKind,
    },
    /// A console asked for with another protocol than the one it was created with.
    #[error(
        "Console {guest}/{device} speaks {} on its guest socket, not {}; remove the guest \
         to create it anew",
        found.name(), wanted.name()
    )]
    ProtocolMismatch {
        guest: String,
        device: String,
        found: Protocol,
        wanted: Protocol,
    },
    /// Requested limits below the smallest log size.
    #[error("limits.max_size must be at least {min} bytes (got {got})")]
    MaxSizeTooSmall { min: u64, got: u64 },
    /// Requested limits above the largest log size (the time index's offsets).
    #[error("limits.max_size must be at most {max} bytes (got {got})")]
    MaxSizeTooLarge { max: u64, got: u64 },
    /// Requested limits above the most backups.
    #[error("limits.max_backups must be at most {max} (got {got})")]
    TooManyBackups { max: u32, got: u32 },
    /// Requested limits with an age beyond the longest.
    #[error("limits.max_age_seconds must be at most {max} (ten years; 0 turns age retention off; got {got})")]
    MaxAgeTooLong { max: u64, got: u64 },
    /// A configured limit was hit; `limit` is its config key.
    #[error("Limit {limit} reached ({value})")]
    LimitReached { limit: &'static str, value: u64 },
    /// The console could not be started (its socket paths, its sockets).
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// The stream's actor stopped while it was being asked (a concurrent removal or shutdown).
    #[error(transparent)]
    Gone(#[from] ActorGone),
    /// A stream record cannot be used, and no log file is there to restore the stream from.
    #[error("refusing {} ({source}); no log file to restore from", path.display())]
    Unrestorable {
        path: PathBuf,
        #[source]
        source: RecordError,
    },
    /// The task removing a guest panicked.
    #[error("the removal failed")]
    Removal(#[source] tokio::task::JoinError),
    /// An operating-system call failed; `context` says what was being done (it may name a host
    /// path: never shown to a remote client).
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RegistryError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// What a failed command to a stream's log means: its actor is gone, or `context` failed.
    fn log(context: &str, error: LogError) -> Self {
        match error {
            LogError::Gone(gone) => Self::Gone(gone),
            LogError::Io(source) => Self::io(context, source),
        }
    }
}

/// What registry operations return.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Why a stream record on disk cannot be used.
#[derive(Debug, Error)]
pub enum RecordError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("more than {0} bytes is too large for a stream record")]
    TooLarge(u64),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// What feeds a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    Pipe,
    Console,
}

impl StreamKind {
    /// "log pipe" or "console", for messages.
    pub fn noun(self) -> &'static str {
        match self {
            StreamKind::Pipe => "log pipe",
            StreamKind::Console => "console",
        }
    }
}

/// A stream brought back by a start of the daemon: how it started, and the console the
/// previous image carried for it (if any).
struct Restored {
    start: StartKind,
    console: Option<FrozenConsole>,
}

/// A client's optional override of the default limits.
#[derive(Clone, Copy, Debug, Default)]
pub struct LimitsOverride {
    pub max_size: Option<u64>,
    pub max_backups: Option<u32>,
    pub mode: Option<LogMode>,
    pub compress: Option<Compression>,
    /// Seconds; 0 turns age retention off for the stream.
    pub max_age: Option<u64>,
}

impl LimitsOverride {
    /// True when the request changes nothing.
    pub fn is_empty(&self) -> bool {
        self.max_size.is_none()
            && self.max_backups.is_none()
            && self.mode.is_none()
            && self.compress.is_none()
            && self.max_age.is_none()
    }

    fn apply(&self, base: LogLimits) -> Result<LogLimits> {
        let limits = LogLimits {
            max_size: self.max_size.unwrap_or(base.max_size),
            max_backups: self.max_backups.unwrap_or(base.max_backups),
            mode: self.mode.unwrap_or(base.mode),
            compress: self.compress.unwrap_or(base.compress),
            max_age: self.max_age.unwrap_or(base.max_age),
        };
        if limits.max_age > crate::config::MAX_AGE_SECONDS {
            return Err(RegistryError::MaxAgeTooLong {
                max: crate::config::MAX_AGE_SECONDS,
                got: limits.max_age,
            });
        }
        if limits.max_size < crate::config::MIN_MAX_SIZE {
            return Err(RegistryError::MaxSizeTooSmall {
                min: crate::config::MIN_MAX_SIZE,
                got: limits.max_size,
            });
        }
        if limits.max_size > crate::config::MAX_MAX_SIZE {
            return Err(RegistryError::MaxSizeTooLarge {
                max: crate::config::MAX_MAX_SIZE,
                got: limits.max_size,
            });
        }
        if limits.max_backups > crate::config::MAX_BACKUPS {
            return Err(RegistryError::TooManyBackups {
                max: crate::config::MAX_BACKUPS,
                got: limits.max_backups,
            });
        }
        Ok(limits)
    }
}

/// What [`Guests::open_stream`] was asked for.
#[derive(Clone, Copy)]
struct Wanted {
    kind: StreamKind,
    limits: LimitsOverride,
    /// A console's protocol (`None`: raw for a new one, as it is for an existing one).
    protocol: Option<Protocol>,
}

/// The persisted description of a stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StreamRecord {
    kind: StreamKind,
    limits: LogLimits,
    log_path: PathBuf,
    /// A console's guest socket protocol (absent in records of older images: raw).
    #[serde(default, skip_serializing_if = "is_raw")]
    protocol: Protocol,
}

fn is_raw(protocol: &Protocol) -> bool {
    *protocol == Protocol::Raw
}

/// A point-in-time view of one stream, for `ListGuests`.
#[derive(Clone, Debug)]
pub struct StreamSnapshot {
    pub name: String,
    pub kind: StreamKind,
    pub log_path: PathBuf,
    pub limits: LogLimits,
    /// Taken by the stream's actor at one instant.
    pub figures: Figures,
}

/// The actor owning a stream: what only this kind of stream does (add a pipe; attach a client)
/// goes through its own handle, what every stream does through [`Actor::log`].
#[derive(Clone)]
pub enum Actor {
    Pipe(PipeHandle),
    Console(ConsoleHandle),
}

impl Actor {
    fn kind(&self) -> StreamKind {
        match self {
            Actor::Pipe(_) => StreamKind::Pipe,
            Actor::Console(_) => StreamKind::Console,
        }
    }

    /// The handle to the stream's log, whatever feeds it.
    pub fn log(&self) -> &LogHandle {
        match self {
            Actor::Pipe(h) => &h.log,
            Actor::Console(h) => &h.log,
        }
    }
}

#[derive(Clone)]
struct StreamEntry {
    log_path: PathBuf,
    limits: LogLimits,
    actor: Actor,
}

/// All guests of this daemon.
/// Streams whose figures `list` asks for at once.
const LIST_CONCURRENCY: usize = 64;
/// How long a hand-over waits for the compression worker to stop after its frame.
const COMPRESSION_PAUSE: std::time::Duration = std::time::Duration::from_secs(10);

/// Gives a restored pipe stream the read ends the previous image carried for it.
async fn adopt_pipes(actor: &Actor, pipes: Vec<OwnedFd>) -> Result<()> {
    if let Actor::Pipe(handle) = actor {
        for pipe in pipes {
            handle
                .add_pipe(pipe)
                .await
                .map_err(|e| RegistryError::log("cannot adopt a carried pipe", e))?;
        }
    }
    Ok(())
}

/// One guest's streams, and whether it is being removed.
struct GuestEntry {
    streams: BTreeMap<String, StreamEntry>,
    /// `Some` while [`Guests::remove_guest`] closes the streams (the guest is "closing"): it is
    /// gone for lookups, and a call that would create or remove in its name waits until this
    /// receiver's sender is dropped, which happens once the guest is forgotten.
    closing: Option<watch::Receiver<()>>,
    /// Streams being removed one by one ([`Guests::remove`] with a stream): gone from
    /// `streams`, and a call that would create one of them waits, as for a closing guest.
    closing_streams: BTreeMap<String, watch::Receiver<()>>,
}

impl GuestEntry {
    fn new() -> Self {
        Self {
            streams: BTreeMap::new(),
            closing: None,
            closing_streams: BTreeMap::new(),
        }
    }

    fn open(&self) -> bool {
        self.closing.is_none()
    }
}

/// What [`Guests::remove`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Streams closed and forgotten.
    pub streams: u32,
    /// Log files deleted (current and rotated files; indexes not counted).
    pub logs_deleted: u32,
}

/// Guest → its streams.
type Registry = BTreeMap<String, GuestEntry>;

/// The sum of every stream's disk cap (a closing guest's streams still hold theirs).
fn reserved_disk(guests: &Registry) -> u64 {
    guests
        .values()
        .flat_map(|guest| guest.streams.values())
        .map(|entry| entry.limits.disk_cap())
        .fold(0, u64::saturating_add)
}

/// Waits until the removal that `closing` belongs to is over.
async fn removal_over(mut closing: watch::Receiver<()>) {
    // Nothing is ever sent: the remover drops its sender when it is done.
    let _ = closing.changed().await;
}

/// What [`Guests::create`] made.
enum Created {
    Stream(Stream),
    /// The stream's record could not be written: its actor must be closed.
    Unrecorded(Actor, RegistryError),
}

/// What [`Guests::open_stream`] does next, decided under the registry lock.
enum Next {
    /// The stream, as asked for.
    Done(Stream),
    /// The guest is being removed: wait, then decide again.
    Wait(watch::Receiver<()>),
    /// A change is needed: take `changes`, then decide again.
    Change,
    /// Its limits change: reserve a place on its actor's channel, then decide again.
    Reserve(LogHandle),
    /// The change of limits was sent: record the entry, then wait for the actor's answer.
    Apply(
        BoxFuture<'static, std::result::Result<(), LogError>>,
        StreamEntry,
    ),
    /// Create the stream with these limits (checked).
    Create(LogLimits),
}

pub struct Guests {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// The gid of `consoles.socket_group`, resolved at start.
    console_group: Option<u32>,
    /// Guest → stream → entry. A `std::sync::Mutex`, not tokio's: it is held only to decide and
    /// to take or put handles (a few map operations, and the stream record written when a
    /// stream is created or its limits change), never across an `.await`; actor round trips are
    /// made after it is released, so one slow actor never holds up another guest's lookup
    /// (the reasoning of mini-redis's `Db`).
    guests: Mutex<Registry>,
    /// Serializes the changes of the registry that write to disk: creating a stream (opening
    /// its log, binding its sockets, syncing its record), changing limits (syncing the record),
    /// and marking a guest closing. Held only over synchronous work, never across an actor
    /// round trip; a tokio mutex so that a change waiting for another yields its thread, and
    /// lookups never take it (they see the registry lock only, held for a few instructions).
    changes: tokio::sync::Mutex<()>,
    /// True while the daemon is about to hand its streams over (an upgrade): readers that follow
    /// history end with `UNAVAILABLE` so the gRPC servers can drain before the freeze.
    going_away: tokio::sync::watch::Sender<bool>,
    /// The node's compression worker (docs/design.md "Compressed backups"), shared by every stream; `None` if
    /// its threads could not start (rotated files then stay raw).
    compression: Option<Arc<crate::compress::Pool>>,
    /// Streams restored with an import under way (its marker, [`Guests::import_marker`]): the
    /// importer resumes them ([`Guests::take_pending_imports`]).
    pending_imports: Mutex<Vec<(String, String, Actor)>>,
}

/// A stream that was asked for: its actor and log path.
pub struct Stream {
    pub actor: Actor,
    pub log_path: PathBuf,
}

impl Guests {
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        console_group: Option<u32>,
    ) -> Arc<Self> {
        let settings = &config.compression;
        let compression = crate::compress::Pool::start(crate::compress::PoolConfig {
            threads: settings.threads,
            level: settings.level,
            // At most 1 MiB (validated).
            frame_size: u32::try_from(settings.frame_size.bytes()).unwrap_or(1 << 20),
            queue: settings.queue,
        }, crate::compress::PoolMetrics {
            backlog: metrics.compression_backlog_bytes.clone(),
            bytes_in: metrics.compressed_bytes_in.clone(),
            bytes_out: metrics.compressed_bytes_out.clone(),
        })
        .map_err(|e| tracing::error!(error = %e, "cannot start the compression worker: rotated files stay raw"))
        .ok()
        .map(Arc::new);
        Arc::new(Self {
            config,
            metrics,
            console_group,
            guests: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
            going_away: tokio::sync::watch::Sender::new(false),
            compression,
            pending_imports: Mutex::new(Vec::new()),
        })
    }

    /// `state/guests/<guest>/<stream>.import`: the record of an import under way (what it
    /// imports from; [`crate::migration::import`] writes and removes it), so that a restart,
    /// upgrade or takeover resumes it.
    pub fn import_marker(&self, guest: &str, stream: &str) -> PathBuf {
        self.state_dir()
            .join(guest)
            .join(format!("{stream}.import"))
    }

    /// `state/guests/<guest>/<stream>.imported`: the node the stream was last imported from,
    /// kept while the stream exists ([`crate::migration::import`] writes it, a removal deletes
    /// it), so that the source's tokens for the guest are still checked there after a restart,
    /// upgrade or takeover (docs/design.md, "Live migration").
    pub fn imported_record(&self, guest: &str, stream: &str) -> PathBuf {
        self.state_dir()
            .join(guest)
            .join(format!("{stream}.imported"))
    }

    /// Every `(guest, node)` of the streams' `.imported` records ([`Self::imported_record`]).
    pub fn imported_records(&self) -> Vec<(String, String)> {
        let mut found = Vec::new();
        let Ok(guests) = std::fs::read_dir(self.state_dir()) else {
            return found;
        };
        for guest in guests.flatten() {
            let Ok(files) = std::fs::read_dir(guest.path()) else {
                continue;
            };
            let Some(name) = guest.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            for file in files.flatten() {
                if file.path().extension().is_some_and(|e| e == "imported") {
                    if let Ok(node) = std::fs::read_to_string(file.path()) {
                        found.push((name.clone(), node.trim().to_owned()));
                    }
                }
            }
        }
        found
    }

    /// The streams restored with an import under way, once.
    pub fn take_pending_imports(&self) -> Vec<(String, String, Actor)> {
        std::mem::take(
            &mut *self
                .pending_imports
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The registry, locked for a few instructions; never held across an `.await`. A panic
    /// under the lock leaves the map consistent (every change is one map operation), so a
    /// poisoned lock is used as it is.
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.guests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Announces (or, after a failed upgrade, withdraws) that the streams are about to go.
    pub fn set_going_away(&self, going: bool) {
        self.going_away.send_replace(going);
        // The compression worker stops between frames while the streams go (an upgrade
        // carries no job: the next image finds raw rotated files again), and resumes if they
        // stay (a failed upgrade).
        if let Some(pool) = &self.compression {
            if going {
                pool.pause();
            } else {
                pool.resume();
            }
        }
    }

    /// For readers: becomes true when the daemon is about to hand its streams over.
    pub fn going_away(&self) -> tokio::sync::watch::Receiver<bool> {
        self.going_away.subscribe()
    }

    /// Refuses a stream cap of `new_cap` when the other streams' caps (`reserved`) leave less
    /// than that of `limits.total_log_bytes`. Restored streams are never refused.
    fn check_disk_budget(&self, reserved: u64, new_cap: u64) -> Result<()> {
        let budget = self.config.limits.total_log_bytes.bytes();
        if reserved.saturating_add(new_cap) > budget {
            return Err(RegistryError::LimitReached {
                limit: "limits.total_log_bytes",
                value: budget,
            });
        }
        Ok(())
    }

    fn state_dir(&self) -> PathBuf {
        self.config.data_dir().join("state/guests")
    }

    fn record_path(&self, guest: &str, stream: &str) -> PathBuf {
        self.state_dir().join(guest).join(format!("{stream}.json"))
    }

    fn position_path(&self, guest: &str, stream: &str) -> PathBuf {
        self.state_dir().join(guest).join(format!("{stream}.pos"))
    }

    /// `<log_dir>/<guest>`: a guest's logs and its removed streams' tombstones.
    pub fn guest_log_dir(&self, guest: &str) -> PathBuf {
        self.config.log_dir().join(guest)
    }

    /// The log path of a stream: `<log_dir>/<guest>/<stream>.log`.
    pub fn log_path(&self, guest: &str, stream: &str) -> PathBuf {
        self.config
            .log_dir()
            .join(guest)
            .join(format!("{stream}.log"))
    }

    fn default_limits(&self) -> LogLimits {
        LogLimits {
            max_size: self.config.logs.max_size.bytes(),
            max_backups: self.config.logs.max_backups,
            mode: self.config.logs.mode,
            compress: self.config.logs.compress,
            max_age: self.config.logs.max_age.get().as_secs(),
        }
    }

    fn console_settings(&self) -> ConsoleSettings {
        ConsoleSettings {
            client_queue: self.config.consoles.client_queue.bytes_usize(),
            max_replay: self.config.consoles.max_replay.bytes(),
            max_clients: self.config.limits.max_clients_per_console(),
            input_rate: self.config.limits.input_rate.bytes(),
            socket_group: self.console_group,
            protocol: Protocol::Raw,
        }
    }

    /// Opens the log and starts the actor of the stream `record` describes; a `restored` one
    /// (after a start of the daemon) records how the daemon started in its time index and takes
    /// up what the previous image carried for its console.
    fn start_actor(
        &self,
        guest: &str,
        stream: &str,
        record: &StreamRecord,
        restored: Option<Restored>,
        import: Option<std::time::Duration>,
    ) -> Result<Actor> {
        let log_path = &record.log_path;
        // Check what can be refused before anything is created on disk.
        let paths = match record.kind {
            StreamKind::Console => {
                Some(ConsolePaths::new(self.config.runtime_dir(), guest, stream)?)
            }
            StreamKind::Pipe => None,
        };
        let mut log = LogFile::open(log_path, &self.position_path(guest, stream), record.limits)
            .map_err(|e| RegistryError::io(format!("cannot open {}", log_path.display()), e))?;
        log.set_time_index(self.config.logs.time_index);
        let carried_console = restored.and_then(|r| {
            log.note_start(r.start);
            r.console
        });
        log.set_compressor(self.compression.clone());
        // An import holds the guest's output back from the start (docs/design.md, "Live
        // migration"), at most this switchover timeout once the guest has output waiting.
        if let Some(switchover) = import {
            log.begin_import(switchover);
        }
        Ok(match paths {
            None => Actor::Pipe(PipeHandle::spawn(log, self.metrics.clone(), guest, stream)),
            Some(paths) => Actor::Console(ConsoleHandle::spawn(
                guest,
                stream,
                paths,
                log,
                ConsoleSettings {
                    protocol: record.protocol,
                    ..self.console_settings()
                },
                self.metrics.clone(),
                carried_console,
            )?),
        })
    }

    /// Brings back every stream recorded in the state directory: consoles listen again at the
    /// same paths, pipes come back closed.
    pub async fn restore(&self, inherited: Vec<FrozenStream>, start: StartKind) -> Result<usize> {
        let mut inherited: HashMap<(String, String), FrozenStream> = inherited
            .into_iter()
            .map(|fds| ((fds.guest.clone(), fds.stream.clone()), fds))
            .collect();
        let dir = self.state_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries.flatten().collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(RegistryError::io(
                    format!("cannot read {}", dir.display()),
                    e,
                ))
            }
        };
        // Every record to restore, with what the previous image carried for it.
        let mut work = Vec::new();
        for guest_dir in entries {
            let guest = guest_dir.file_name().to_string_lossy().into_owned();
            // Only what the naming rules allow is restored (anything else was not made here).
            if GuestName::parse(guest.as_str()).is_err() {
                continue;
            }
            let Ok(files) = std::fs::read_dir(guest_dir.path()) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                let Some(stream) = record_stream_name(&path) else {
                    continue;
                };
                let carried = inherited.remove(&(guest.clone(), stream.clone()));
                work.push((guest.clone(), stream, path, carried));
            }
        }
        // Opening logs and binding sockets is system calls only: spread it over the CPUs
        // (10,000 guests are 20,000 streams to bring back before serving again).
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_thread = work.len().div_ceil(threads).max(1);
        let runtime = tokio::runtime::Handle::current();
        let started: Vec<_> = tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let mut batches = Vec::new();
                let mut work = work;
                while !work.is_empty() {
                    let batch: Vec<_> = work.drain(..per_thread.min(work.len())).collect();
                    let runtime = &runtime;
                    batches.push(scope.spawn(move || {
                        let _entered = runtime.enter();
                        batch
                            .into_iter()
                            .map(|(guest, stream, path, carried)| {
                                let started =
                                    self.restore_stream(&guest, &stream, &path, carried, start);
                                (guest, stream, started)
                            })
                            .collect::<Vec<_>>()
                    }));
                }
                batches
                    .into_iter()
                    .flat_map(|batch| batch.join().expect("restore thread panicked"))
                    .collect()
            })
        });
        // The carried pipes are adopted by every actor at once, before the registry is locked.
        let adopted = join_all(
            started
                .into_iter()
                .map(|(guest, stream, started)| async move {
                    let adopted = match started {
                        Ok((entry, pipes)) => {
                            adopt_pipes(&entry.actor, pipes).await.map(|()| entry)
                        }
                        Err(e) => Err(e),
                    };
                    (guest, stream, adopted)
                }),
        )
        .await;
        let mut restored = 0;
        let mut guests = self.registry();
        for (guest, stream, adopted) in adopted {
            match adopted {
                Ok(entry) => {
                    guests
                        .entry(guest)
                        .or_insert_with(GuestEntry::new)
                        .streams
                        .insert(stream, entry);
                    restored += 1;
                }
                Err(e) => {
                    tracing::warn!(guest, stream, error = %with_causes(&e), "cannot restore stream")
                }
            }
        }
        for ((guest, stream), _) in inherited {
            tracing::warn!(
                guest,
                stream,
                "carried descriptors of an unrecorded stream dropped"
            );
        }
        self.update_gauges(&guests);
        Ok(restored)
    }

    /// Starts the actor of one recorded stream (blocking system calls; runs on a restore
    /// thread) and returns it with the carried pipe read ends it must adopt.
    fn restore_stream(
        &self,
        guest: &str,
        stream: &str,
        record_path: &Path,
        carried: Option<FrozenStream>,
        start: StartKind,
    ) -> Result<(StreamEntry, Vec<OwnedFd>)> {
        let mut repaired = false;
        let record = match read_record(record_path) {
            Ok(record) => record,
            Err(why) => {
                repaired = true;
                // A torn or foreign record must not cost the stream: its log and position
                // record are still there. It comes back as a closed pipe with default limits.
                let log_path = self.log_path(guest, stream);
                if !log_path.exists() {
                    return Err(RegistryError::Unrestorable {
                        path: record_path.to_owned(),
                        source: why,
                    });
                }
                tracing::error!(
                    file = %record_path.display(),
                    error = %why,
                    "refusing a torn or foreign stream record; restoring the stream from its log file"
                );
                // A console leaves its guest socket behind; that tells the kind.
                let console = ConsolePaths::new(self.config.runtime_dir(), guest, stream)
                    .is_ok_and(|paths| paths.guest_socket.exists());
                StreamRecord {
                    kind: if console {
                        StreamKind::Console
                    } else {
                        StreamKind::Pipe
                    },
                    limits: self.default_limits(),
                    log_path,
                    // A guessed raw console answers a break with a clear refusal; a guessed
                    // mux one would type Ctrl-A twice into a guest whose QEMU has no mux.
                    protocol: Protocol::Raw,
                }
            }
        };
        let (pipes, console) = carried.map_or((Vec::new(), None), |c| (c.pipes, c.console));
        // An import was under way: it resumes, and the guest's output is held again meanwhile.
        let importing = self.import_marker(guest, stream).exists();
        let actor = self.start_actor(
            guest,
            stream,
            &record,
            Some(Restored { start, console }),
            importing.then(|| self.config.migration.switchover_timeout.get()),
        )?;
        if importing {
            self.pending_imports
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((guest.to_owned(), stream.to_owned(), actor.clone()));
        }
        let entry = StreamEntry {
            log_path: record.log_path.clone(),
            limits: record.limits,
            actor: actor.clone(),
        };
        if repaired {
            self.write_record(guest, stream, &entry)?;
        }
        Ok((entry, pipes))
    }

    /// Ends every console client (before an upgrade, so the gRPC servers can drain while the
    /// streams still log).
    pub async fn end_console_clients(&self, reason: &str) {
        let consoles: Vec<ConsoleHandle> = self
            .registry()
            .values()
            .flat_map(|guest| guest.streams.values())
            .filter_map(|entry| match &entry.actor {
                Actor::Console(handle) => Some(handle.clone()),
                Actor::Pipe(_) => None,
            })
            .collect();
        join_all(consoles.iter().map(|console| console.end_clients(reason))).await;
    }

    /// Freezes every stream for an upgrade and forgets them: returns what each carries. A guest
    /// being removed is left to its remover (the upgrade gate lets a removal finish before a
    /// freeze, so there is none in practice).
    pub async fn freeze_all(&self) -> Vec<FrozenStream> {
        if let Some(pool) = self.compression.clone() {
            // Paused since `set_going_away`: wait for the frame under way (the actors answer
            // the worker until they freeze).
            pool.pause();
            let idle = tokio::task::spawn_blocking(move || pool.wait_idle(COMPRESSION_PAUSE))
                .await
                .unwrap_or(false);
            tracing::info!(idle, "compression paused for the hand-over");
        }
        let taken: Vec<(String, String, Actor)> = {
            let mut guests = self.registry();
            let mut taken = Vec::new();
            for (guest, entry) in std::mem::take(&mut *guests) {
                if !entry.open() {
                    guests.insert(guest, entry);
                    continue;
                }
                for (stream, stream_entry) in entry.streams {
                    taken.push((guest.clone(), stream, stream_entry.actor));
                }
            }
            self.update_gauges(&guests);
            taken
        };
        join_all(taken.into_iter().map(|(guest, stream, actor)| async move {
            let (pipes, console) = match &actor {
                Actor::Pipe(handle) => (handle.freeze().await, None),
                Actor::Console(handle) => (Vec::new(), handle.freeze().await),
            };
            FrozenStream {
                guest,
                stream,
                pipes,
                console,
            }
        }))
        .await
    }

    /// Returns the stream `guest/stream` of `kind`, creating it (and the guest) if needed.
    /// Limits given for an existing stream replace its current ones. A console is created with
    /// `protocol` (raw if `None`); an existing one with another protocol is refused. While the guest is being
    /// removed, waits until the removal is over and then creates it anew (its offsets continue).
    pub async fn open_stream(
        &self,
        guest: &GuestName,
        stream: &StreamName,
        kind: StreamKind,
        limits: LimitsOverride,
        protocol: Option<Protocol>,
        import: Option<std::time::Duration>,
    ) -> Result<Stream> {
        let (guest, stream) = (guest.as_str(), stream.as_str());
        let mut changing = None;
        let mut reserved = None;
        loop {
            let wanted = Wanted {
                kind,
                limits,
                protocol,
            };
            let next =
                self.decide_open(guest, stream, &wanted, changing.is_some(), &mut reserved)?;
            match next {
                Next::Done(stream) => return Ok(stream),
                Next::Wait(closing) => {
                    changing = None;
                    removal_over(closing).await;
                }
                Next::Change => changing = Some(self.changes.lock().await),
                Next::Reserve(log) => {
                    changing = None;
                    let place = log.reserve().await.map_err(RegistryError::Gone)?;
                    reserved = Some((log, place));
                }
                Next::Apply(answer, entry) => {
                    // Still under `changes`: records are written in the order the actor
                    // receives the changes.
                    self.write_record(guest, stream, &entry)?;
                    drop(changing);
                    answer
                        .await
                        .map_err(|e| RegistryError::log("cannot apply new limits", e))?;
                    return Ok(Stream {
                        actor: entry.actor,
                        log_path: entry.log_path,
                    });
                }
                Next::Create(limits) => {
                    let created = self.create(
                        guest,
                        stream,
                        kind,
                        limits,
                        protocol.unwrap_or_default(),
                        import,
                    );
                    drop(changing);
                    return match created? {
                        Created::Stream(stream) => Ok(stream),
                        Created::Unrecorded(actor, error) => {
                            actor.log().close("cannot record the stream", true).await;
                            Err(error)
                        }
                    };
                }
            }
        }
    }

    /// One step of [`Guests::open_stream`], under the registry lock. A change (a new stream,
    /// new limits) is decided only while the caller holds `changes` (`changing`); a change of
    /// limits is sent through a place reserved on the actor's channel beforehand (`reserved`),
    /// so that it goes out in the order the entry is updated and its record written.
    fn decide_open(
        &self,
        guest: &str,
        stream: &str,
        wanted: &Wanted,
        changing: bool,
        reserved: &mut Option<(LogHandle, Reserved)>,
    ) -> Result<Next> {
        let Wanted {
            kind,
            limits,
            protocol,
        } = *wanted;
        let mut guests = self.registry();
        if let Some(closing) = guests.get(guest).and_then(|g| {
            g.closing
                .clone()
                .or_else(|| g.closing_streams.get(stream).cloned())
        }) {
            return Ok(Next::Wait(closing));
        }
        let guest_count = guests.len();
        // The caps are summed (O(streams)) only when one may change: a new stream or new limits,
        // not for the common request that finds its stream as it is.
        let unchanged = limits.is_empty()
            && guests
                .get(guest)
                .is_some_and(|g| g.streams.contains_key(stream));
        let reserved_bytes = if unchanged { 0 } else { reserved_disk(&guests) };
        if let Some(entry) = guests
            .get_mut(guest)
            .and_then(|g| g.streams.get_mut(stream))
        {
            if entry.actor.kind() != kind {
                return Err(RegistryError::KindMismatch {
                    guest: guest.to_owned(),
                    stream: stream.to_owned(),
                    found: entry.actor.kind(),
                    wanted: kind,
                });
            }
            if let (Actor::Console(handle), Some(wanted)) = (&entry.actor, protocol) {
                if handle.protocol != wanted {
                    return Err(RegistryError::ProtocolMismatch {
                        guest: guest.to_owned(),
                        device: stream.to_owned(),
                        found: handle.protocol,
                        wanted,
                    });
                }
            }
            if limits.is_empty() {
                return Ok(Next::Done(Stream {
                    actor: entry.actor.clone(),
                    log_path: entry.log_path.clone(),
                }));
            }
            let new_limits = limits.apply(entry.limits)?;
            let old_cap = entry.limits.disk_cap();
            self.check_disk_budget(
                reserved_bytes.saturating_sub(old_cap),
                new_limits.disk_cap(),
            )?;
            // Reserved on this very actor (not one the stream had before a removal)?
            if !reserved
                .as_ref()
                .is_some_and(|(log, _)| log.same_actor(entry.actor.log()))
            {
                return Ok(Next::Reserve(entry.actor.log().clone()));
            }
            if !changing {
                return Ok(Next::Change);
            }
            let (_, place) = reserved.take().expect("checked above");
            // The log takes new limits even when enforcing them fails (a rotation error is
            // returned, and the next write retries), so the entry and its record follow at once.
            let answer = place.set_limits(new_limits);
            entry.limits = new_limits;
            return Ok(Next::Apply(answer, entry.clone()));
        }
        let limits = limits.apply(self.default_limits())?;
        if !guests.contains_key(guest) && guest_count >= self.config.limits.max_guests() {
            return Err(RegistryError::LimitReached {
                limit: "limits.guests",
                value: self.config.limits.guests.into(),
            });
        }
        let streams = guests.get(guest).map_or(0, |g| g.streams.len());
        if streams >= self.config.limits.max_streams_per_guest() {
            return Err(RegistryError::LimitReached {
                limit: "limits.streams_per_guest",
                value: self.config.limits.streams_per_guest.into(),
            });
        }
        self.check_disk_budget(reserved_bytes, limits.disk_cap())?;
        Ok(if changing {
            Next::Create(limits)
        } else {
            Next::Change
        })
    }

    /// Creates a stream decided by [`Guests::decide_open`]; the caller holds `changes`, so
    /// nothing else is created, changed or marked closing meanwhile. Opening the log, binding
    /// the sockets and syncing the record happen without the registry lock.
    fn create(
        &self,
        guest: &str,
        stream: &str,
        kind: StreamKind,
        limits: LogLimits,
        protocol: Protocol,
        import: Option<std::time::Duration>,
    ) -> Result<Created> {
        let log_path = self.log_path(guest, stream);
        let record = StreamRecord {
            kind,
            limits,
            log_path: log_path.clone(),
            protocol,
        };
        let actor = self.start_actor(guest, stream, &record, None, import)?;
        let entry = StreamEntry {
            log_path: log_path.clone(),
            limits,
            actor: actor.clone(),
        };
        if let Err(e) = self.write_record(guest, stream, &entry) {
            return Ok(Created::Unrecorded(actor, e));
        }
        // Created again: the logs are this stream's, not a removed one's (docs/operations.md,
        // "Retention").
        if let Err(e) = crate::tombstone::cancel(&self.guest_log_dir(guest), stream) {
            tracing::warn!(guest, stream, error = %e, "cannot cancel the tombstone of a removed stream");
        }
        let mut guests = self.registry();
        guests
            .entry(guest.to_owned())
            .or_insert_with(GuestEntry::new)
            .streams
            .insert(stream.to_owned(), entry);
        self.update_gauges(&guests);
        drop(guests);
        tracing::info!(guest, stream, kind = kind.noun(), log = %log_path.display(), "stream created");
        Ok(Created::Stream(Stream { actor, log_path }))
    }

    /// The stream `guest/name`; with no name, the guest's `serial0` console if it has one,
    /// else its `qemu` pipe. Returns the stream name chosen and the handle to its log.
    pub async fn stream(
        &self,
        guest: &GuestName,
        name: Option<&StreamName>,
    ) -> Result<(String, LogHandle)> {
        let guest = guest.as_str();
        let guests = self.registry();
        let streams = self.open_guest(&guests, guest)?;
        let name = match name {
            Some(name) => name.as_str(),
            None if streams.contains_key(names::DEFAULT_CONSOLE_DEVICE) => {
                names::DEFAULT_CONSOLE_DEVICE
            }
            None => names::DEFAULT_PIPE_STREAM,
        };
        streams
            .get(name)
            .map(|e| (name.to_owned(), e.actor.log().clone()))
            .ok_or_else(|| RegistryError::UnknownStream {
                guest: guest.to_owned(),
                stream: name.to_owned(),
            })
    }

    /// The streams of `guest`, unless it does not exist or is being removed.
    fn open_guest<'a>(
        &self,
        guests: &'a Registry,
        guest: &str,
    ) -> Result<&'a BTreeMap<String, StreamEntry>> {
        guests
            .get(guest)
            .filter(|g| g.open())
            .map(|g| &g.streams)
            .ok_or_else(|| RegistryError::UnknownGuest(guest.to_owned()))
    }

    /// How many streams exist (of guests not being removed).
    pub async fn count(&self) -> usize {
        self.registry()
            .values()
            .filter(|g| g.open())
            .map(|g| g.streams.len())
            .sum()
    }

    /// The console `guest/device`.
    pub async fn console(&self, guest: &GuestName, device: &StreamName) -> Result<ConsoleHandle> {
        let (guest, device) = (guest.as_str(), device.as_str());
        let guests = self.registry();
        let streams = self.open_guest(&guests, guest)?;
        match streams.get(device).map(|e| &e.actor) {
            Some(Actor::Console(handle)) => Ok(handle.clone()),
            Some(Actor::Pipe(_)) => Err(RegistryError::KindMismatch {
                guest: guest.to_owned(),
                stream: device.to_owned(),
                found: StreamKind::Pipe,
                wanted: StreamKind::Console,
            }),
            None => Err(RegistryError::UnknownConsole {
                guest: guest.to_owned(),
                device: device.to_owned(),
            }),
        }
    }

    fn write_record(&self, guest: &str, stream: &str, entry: &StreamEntry) -> Result<()> {
        let record = StreamRecord {
            kind: entry.actor.kind(),
            limits: entry.limits,
            log_path: entry.log_path.clone(),
            protocol: match &entry.actor {
                Actor::Console(handle) => handle.protocol,
                Actor::Pipe(_) => Protocol::Raw,
            },
        };
        let path = self.record_path(guest, stream);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| RegistryError::io(format!("cannot create {}", dir.display()), e))?;
        }
        let bytes = serde_json::to_vec_pretty(&record).expect("stream record serializes");
        crate::logfile::write_atomically(&path, &bytes)
            .map_err(|e| RegistryError::io(format!("cannot write {}", path.display()), e))
    }

    /// Closes every stream of `guest` (draining pipes, removing console sockets) and forgets
    /// it, or only its stream `stream` (the others keep working; removing the last one removes
    /// the guest). Logs stay on disk with a tombstone saying when they were removed, unless
    /// `delete_logs`: then they are deleted, oldest first, before the streams' records, so that a
    /// crash half-way leaves the stream recorded and a second call finishes the job. What is
    /// removed is marked closing first, under the lock: from then on lookups do not find it, and
    /// a call that would create it (or remove it again) waits until the removal is over, so
    /// nothing is created under a name whose files are being removed. The removal runs on its
    /// own task: a caller that goes away does not leave it half done.
    /// `moved_to`: the guest live-migrated to that node (its Console endpoint): its streams'
    /// histories record MIGRATED_OUT, their clients get the moved status and their tombstones
    /// keep the redirect (docs/design.md, "Live migration").
    pub async fn remove(
        self: &Arc<Self>,
        guest: &GuestName,
        stream: Option<&StreamName>,
        delete_logs: bool,
        moved_to: Option<String>,
    ) -> Result<Removed> {
        let guest = guest.as_str();
        let stream = stream.map(StreamName::as_str);
        let (done, streams, waits, whole) = loop {
            // Not while a stream is being created: it would land in a closing guest.
            let changing = self.changes.lock().await;
            let closing = {
                let mut guests = self.registry();
                let Some(entry) = guests.get_mut(guest) else {
                    drop(guests);
                    if !delete_logs {
                        return Err(RegistryError::UnknownGuest(guest.to_owned()));
                    }
                    // Removed before: what it left on disk goes (still under `changes`).
                    let result = self.delete_left_logs(guest, stream, &[]);
                    drop(changing);
                    return result;
                };
                let pending = match (&entry.closing, stream) {
                    (Some(closing), _) => Some(closing.clone()),
                    (None, Some(stream)) => entry.closing_streams.get(stream).cloned(),
                    (None, None) => None,
                };
                match pending {
                    Some(closing) => closing,
                    None => {
                        if let Some(stream) = stream {
                            if !entry.streams.contains_key(stream) {
                                if !delete_logs {
                                    return Err(RegistryError::UnknownStream {
                                        guest: guest.to_owned(),
                                        stream: stream.to_owned(),
                                    });
                                }
                                let live: Vec<String> = entry.streams.keys().cloned().collect();
                                drop(guests);
                                let result = self.delete_left_logs(guest, Some(stream), &live);
                                drop(changing);
                                return result;
                            }
                        }
                        let (done, closing) = watch::channel(());
                        // Removing the last stream (none other being removed) removes the guest.
                        let whole = stream.is_none()
                            || (entry.streams.len() == 1 && entry.closing_streams.is_empty());
                        let taken: Vec<(String, Actor)> = if whole {
                            entry.closing = Some(closing);
                            entry
                                .streams
                                .iter()
                                .map(|(name, e)| (name.clone(), e.actor.clone()))
                                .collect()
                        } else {
                            let name = stream.expect("a stream when not whole").to_owned();
                            let removed = entry.streams.remove(&name).expect("checked above");
                            entry.closing_streams.insert(name.clone(), closing);
                            vec![(name, removed.actor)]
                        };
                        // A whole removal finishes the single-stream removals under way first.
                        let waits: Vec<watch::Receiver<()>> = if whole {
                            entry.closing_streams.values().cloned().collect()
                        } else {
                            Vec::new()
                        };
                        self.update_gauges(&guests);
                        break (done, taken, waits, whole);
                    }
                }
            };
            drop(changing);
            // Removed by another call meanwhile: then it is not found (as if after it).
            removal_over(closing).await;
        };
        let removal = Removal {
            guests: self.clone(),
            guest: guest.to_owned(),
            stream: (!whole).then(|| streams[0].0.clone()),
            delete_logs,
            moved_to,
            _done: done,
        };
        tokio::spawn(removal.run(streams, waits))
            .await
            .map_err(RegistryError::Removal)?
    }

    /// Deletes the logs that removed streams of `guest` left on disk: those of `stream`, or of
    /// every stream with files in the guest's log directory but `live` (with their tombstones),
    /// then the directory if that empties it. The caller holds `changes` (nothing of the name
    /// is created meanwhile) and has checked that `stream` is not live. Unknown if there were
    /// no such logs.
    fn delete_left_logs(
        &self,
        guest: &str,
        stream: Option<&str>,
        live: &[String],
    ) -> Result<Removed> {
        let dir = self.guest_log_dir(guest);
        let streams = match stream {
            Some(stream) => vec![stream.to_owned()],
            None => streams_on_disk(&dir)
                .into_iter()
                .filter(|s| !live.contains(s))
                .collect(),
        };
        let mut removed = Removed::default();
        let mut found = false;
        for stream in &streams {
            let log_path = self.log_path(guest, stream);
            found |= crate::tombstone::path(&dir, stream).exists();
            let deleted = crate::logfile::delete_stream_files(&log_path).map_err(|e| {
                RegistryError::io(format!("cannot delete {}", log_path.display()), e)
            })?;
            found |= deleted > 0;
            removed.logs_deleted += deleted;
            crate::tombstone::remove(&dir, stream).map_err(|e| {
                RegistryError::io(format!("cannot remove a tombstone in {}", dir.display()), e)
            })?;
        }
        if !found {
            return Err(match stream {
                Some(stream) => RegistryError::UnknownStream {
                    guest: guest.to_owned(),
                    stream: stream.to_owned(),
                },
                None => RegistryError::UnknownGuest(guest.to_owned()),
            });
        }
        // Only if nothing else is left in it.
        let _ = std::fs::remove_dir(&dir);
        tracing::info!(
            guest,
            files = removed.logs_deleted,
            "deleted the logs of removed streams"
        );
        Ok(removed)
    }

    /// A read-only handle on the logs of `guest`'s stream `name` (default: `serial0` if it has
    /// logs, else `qemu`) when no live stream has that name: a removed guest or stream whose
    /// logs are still on disk. Returns the stream's name, the handle and its tombstone (none if
    /// the logs were left by something else than a removal, e.g. an older conlogd). Unknown
    /// (as [`Guests::stream`] says) when there are no such logs.
    pub fn removed_stream(
        &self,
        guest: &GuestName,
        name: Option<&StreamName>,
    ) -> Result<(String, LogHandle, Option<crate::tombstone::Tombstone>)> {
        let guest = guest.as_str();
        let dir = self.guest_log_dir(guest);
        // Being removed: gone for every lookup until the removal is over (docs/design.md §3).
        let removing = self.registry().get(guest).is_some_and(|g| {
            !g.open() || name.is_some_and(|n| g.closing_streams.contains_key(n.as_str()))
        });
        if removing {
            return Err(RegistryError::UnknownGuest(guest.to_owned()));
        }
        let name = match name {
            Some(name) => name.as_str(),
            None => {
                let console = self.log_path(guest, names::DEFAULT_CONSOLE_DEVICE);
                if console.exists() || crate::logfile::backup_path(&console, 1).exists() {
                    names::DEFAULT_CONSOLE_DEVICE
                } else {
                    names::DEFAULT_PIPE_STREAM
                }
            }
        };
        let unknown = || {
            if dir.is_dir() {
                RegistryError::UnknownStream {
                    guest: guest.to_owned(),
                    stream: name.to_owned(),
                }
            } else {
                RegistryError::UnknownGuest(guest.to_owned())
            }
        };
        let log_path = self.log_path(guest, name);
        let view = crate::logfile::LogView::open(&log_path, &self.position_path(guest, name))
            .map_err(|e| RegistryError::io(format!("cannot read {}", log_path.display()), e))?
            .ok_or_else(unknown)?;
        Ok((
            name.to_owned(),
            LogHandle::removed(view),
            crate::tombstone::read(&dir, name),
        ))
    }

    /// The disk cap of the live stream `guest/stream` (what its files keep at most).
    pub fn disk_cap(&self, guest: &GuestName, stream: &StreamName) -> Option<u64> {
        let guests = self.registry();
        let entry = guests.get(guest.as_str())?.streams.get(stream.as_str())?;
        Some(entry.limits.disk_cap())
    }

    /// Where `guest`'s stream `stream` moved to, if it was removed with `moved_to` and is not
    /// live again (its tombstone keeps the redirect, docs/design.md "Live migration").
    pub fn moved(&self, guest: &GuestName, stream: &StreamName) -> Option<crate::migration::Moved> {
        crate::tombstone::read(&self.guest_log_dir(guest.as_str()), stream.as_str())?.moved()
    }

    /// Deletes the logs of `guest`'s removed stream `stream` if it is still removed since
    /// `removed_unix` (its tombstone says so, nothing created it again, nothing is removing it),
    /// with its tombstone, and the guest's log directory if that leaves it empty. Runs under
    /// `changes`, so no stream of that name is created meanwhile. Returns the log files deleted.
    pub async fn delete_removed(
        &self,
        guest: &str,
        stream: &str,
        removed_unix: u64,
    ) -> Result<u32> {
        let _changing = self.changes.lock().await;
        {
            let guests = self.registry();
            if let Some(entry) = guests.get(guest) {
                if entry.closing.is_some()
                    || entry.streams.contains_key(stream)
                    || entry.closing_streams.contains_key(stream)
                {
                    return Ok(0);
                }
            }
        }
        let dir = self.guest_log_dir(guest);
        if crate::tombstone::read(&dir, stream).map(|t| t.removed_unix) != Some(removed_unix) {
            return Ok(0);
        }
        let log_path = self.log_path(guest, stream);
        let deleted = crate::logfile::delete_stream_files(&log_path)
            .map_err(|e| RegistryError::io(format!("cannot delete {}", log_path.display()), e))?;
        crate::tombstone::remove(&dir, stream).map_err(|e| {
            RegistryError::io(
                format!("cannot remove the tombstone in {}", dir.display()),
                e,
            )
        })?;
        // Only if nothing else is left in it.
        let _ = std::fs::remove_dir(&dir);
        tracing::info!(
            guest,
            stream,
            files = deleted,
            "deleted the logs of a removed stream (logs.removed_retention)"
        );
        Ok(deleted)
    }

    /// Deletes the files of `guest`'s stream `stream` older than `cutoff` if no stream of that
    /// name is live or being removed (a live stream's actor expires its own files, never its
    /// current one): a removed stream's logs, or logs left by something else, age like
    /// virtlogd's closed logs. When none is left, its tombstone and (if empty) the guest's log
    /// directory go too. Runs under `changes`, so the name is not created meanwhile. Returns
    /// the log files deleted.
    pub async fn expire_unwritten(
        &self,
        guest: &str,
        stream: &str,
        cutoff: std::time::SystemTime,
    ) -> Result<u32> {
        let live = |guests: &Registry| {
            guests.get(guest).is_some_and(|entry| {
                entry.closing.is_some()
                    || entry.streams.contains_key(stream)
                    || entry.closing_streams.contains_key(stream)
            })
        };
        // Most streams the sweep asks about are live: answered without waiting for `changes`.
        if live(&self.registry()) {
            return Ok(0);
        }
        let _changing = self.changes.lock().await;
        if live(&self.registry()) {
            return Ok(0);
        }
        let log_path = self.log_path(guest, stream);
        let (deleted, none_left) = crate::logfile::expire_unwritten(&log_path, cutoff)
            .map_err(|e| RegistryError::io(format!("cannot delete {}", log_path.display()), e))?;
        if none_left {
            let dir = self.guest_log_dir(guest);
            crate::tombstone::remove(&dir, stream).map_err(|e| {
                RegistryError::io(format!("cannot remove a tombstone in {}", dir.display()), e)
            })?;
            let _ = std::fs::remove_dir(&dir);
        }
        if deleted > 0 {
            tracing::info!(
                guest,
                stream,
                files = deleted,
                "deleted the files of a removed stream older than logs.max_age"
            );
        }
        Ok(deleted)
    }

    /// Asks every stream with a `max_age` to delete its rotated files older than that; returns
    /// how many files went. Streams are asked a few at a time, never under the lock.
    pub async fn expire_all(&self) -> u32 {
        let logs: Vec<LogHandle> = self
            .registry()
            .values()
            .filter(|g| g.open())
            .flat_map(|guest| guest.streams.values())
            .filter(|entry| entry.limits.max_age > 0)
            .map(|entry| entry.actor.log().clone())
            .collect();
        futures::stream::iter(logs)
            .map(|log| async move {
                match log.expire().await {
                    Ok(n) => n,
                    Err(LogError::Gone(_)) => 0,
                    Err(LogError::Io(e)) => {
                        tracing::warn!(error = %e, "cannot delete expired log files");
                        0
                    }
                }
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .fold(0, |total, n| async move { total + n })
            .await
    }

    /// Snapshots of every guest (or only `filter`), sorted by name.
    pub async fn list(
        &self,
        filter: Option<&GuestName>,
    ) -> Result<Vec<(String, Vec<StreamSnapshot>)>> {
        let filter = filter.map(GuestName::as_str);
        let entries: Vec<(String, Vec<(String, StreamEntry)>)> = {
            let guests = self.registry();
            if let Some(name) = filter {
                self.open_guest(&guests, name)?;
            }
            guests
                .iter()
                .filter(|(name, guest)| guest.open() && filter.is_none_or(|f| f == name.as_str()))
                .map(|(name, guest)| {
                    let streams = guest
                        .streams
                        .iter()
                        .map(|(s, e)| (s.clone(), e.clone()))
                        .collect();
                    (name.clone(), streams)
                })
                .collect()
        };
        // Up to LIST_CONCURRENCY actors are asked at once: one after another, 20,000 round trips
        // took a tenth of a second; all at once, the pending answers cost 1.4 KiB per guest of
        // memory that malloc keeps.
        let snapshot = |(name, entry): (String, StreamEntry)| async move {
            // An actor that stopped meanwhile (removed) still shows its last counters.
            let log = entry.actor.log();
            let figures = match log.figures().await {
                Ok(figures) => figures,
                Err(_) => Figures {
                    end_offset: log.stats.end_offset.load(Relaxed),
                    ..Figures::default()
                },
            };
            StreamSnapshot {
                name,
                kind: entry.actor.kind(),
                log_path: entry.log_path,
                limits: entry.limits,
                figures,
            }
        };
        let mut guests = Vec::with_capacity(entries.len());
        let mut streams = Vec::new();
        for (guest, entries) in entries {
            guests.push((guest, entries.len()));
            streams.extend(entries);
        }
        let mut snapshots = futures::stream::iter(streams)
            .map(snapshot)
            .buffered(LIST_CONCURRENCY);
        let mut out = Vec::with_capacity(guests.len());
        for (guest, count) in guests {
            let mut listed = Vec::with_capacity(count);
            for _ in 0..count {
                listed.push(snapshots.next().await.expect("one snapshot per stream"));
            }
            out.push((guest, listed));
        }
        Ok(out)
    }

    /// Drains and closes every stream (shutdown); consoles tell their clients `reason`.
    pub async fn close_all(&self, reason: &str) {
        let logs: Vec<LogHandle> = self
            .registry()
            .values()
            .flat_map(|guest| guest.streams.values())
            .map(|entry| entry.actor.log().clone())
            .collect();
        join_all(logs.iter().map(|log| log.close(reason, false))).await;
    }

    fn update_gauges(&self, guests: &Registry) {
        self.metrics
            .guests
            .set(crate::metrics::gauge_value(guests.len()));
        self.metrics.streams.set(
            guests
                .values()
                .map(|g| crate::metrics::gauge_value(g.streams.len()))
                .sum(),
        );
    }
}

/// A guest (or one stream of it) being removed: closes its streams, keeps or deletes their
/// logs, removes their records and sockets, then forgets them. Dropping it (done, or a panic)
/// forgets what it removed and then wakes the calls waiting for the removal, so nothing stays
/// closing.
struct Removal {
    guests: Arc<Guests>,
    guest: String,
    /// The one stream removed, or `None` for the whole guest.
    stream: Option<String>,
    delete_logs: bool,
    /// The guest moved to this node.
    moved_to: Option<String>,
    /// Dropped after the guest is forgotten: wakes the calls waiting for the removal.
    _done: watch::Sender<()>,
}

impl Removal {
    async fn run(
        self,
        streams: Vec<(String, Actor)>,
        waits: Vec<watch::Receiver<()>>,
    ) -> Result<Removed> {
        let guest = &self.guest;
        // Tests hold a removal here, its guest marked closing, to race other calls with it.
        crate::fault::point("guests.remove.closing");
        join_all(waits.into_iter().map(removal_over)).await;
        let reason = match &self.stream {
            None => format!("guest {guest} was removed"),
            Some(stream) => format!("{guest}/{stream} was removed"),
        };
        match &self.moved_to {
            None => {
                join_all(
                    streams
                        .iter()
                        .map(|(_, actor)| actor.log().close(&reason, true)),
                )
                .await;
            }
            Some(to) => {
                let reason = format!("guest {guest} moved to {to}");
                join_all(
                    streams
                        .iter()
                        .map(|(_, actor)| actor.log().close_moved(&reason, to)),
                )
                .await;
            }
        }
        let dir = self.guests.guest_log_dir(guest);
        let mut removed = Removed {
            streams: u32::try_from(streams.len()).unwrap_or(u32::MAX),
            logs_deleted: 0,
        };
        // A deletion that fails (the file system refuses) leaves that stream's logs with a
        // tombstone, as a removal without `delete_logs` would: the removal itself goes on, and
        // `delete_logs` again (or `logs.removed_retention`) deletes what is left.
        let mut failed = None;
        for (stream, _) in &streams {
            let deleted = if self.delete_logs {
                crate::fault::point("guests.remove.delete_logs");
                self.delete_logs_of(stream)
            } else {
                Ok(0)
            };
            match deleted {
                Ok(n) if self.delete_logs => removed.logs_deleted += n,
                result => {
                    if let Err(e) = result {
                        failed.get_or_insert(e);
                    }
                    let moved = self.moved_to.as_ref().and_then(|to| {
                        let (_, actor) = streams.iter().find(|(name, _)| name == stream)?;
                        Some(crate::migration::Moved {
                            to: to.clone(),
                            offset: actor.log().stats.end_offset.load(Relaxed),
                        })
                    });
                    if let Err(e) =
                        crate::tombstone::write(&dir, stream, self.stream.is_none(), moved.as_ref())
                    {
                        // The logs stay readable; only the retention and token checks lack
                        // the removal time.
                        tracing::warn!(guest, stream, error = %e, "cannot write the tombstone of a removed stream");
                    }
                }
            }
            let _ = std::fs::remove_file(self.guests.record_path(guest, stream));
            // An import under way ends with its stream (an aborted migration).
            let _ = std::fs::remove_file(self.guests.import_marker(guest, stream));
            let _ = std::fs::remove_file(self.guests.imported_record(guest, stream));
        }
        if self.delete_logs && self.stream.is_none() {
            // The guest's logs are every log in its directory: also those its streams removed
            // before left (the guest is closing: nothing is created there meanwhile).
            for stream in streams_on_disk(&dir) {
                match self.delete_logs_of(&stream) {
                    Ok(n) => removed.logs_deleted += n,
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        if self.delete_logs {
            // Only if nothing else is left in it (another stream's logs, a tombstone).
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(
            self.guests
                .config
                .runtime_dir()
                .join("consoles")
                .join(guest),
        );
        if let Some(e) = failed {
            return Err(e);
        }
        match &self.stream {
            None => tracing::info!(
                guest,
                streams = removed.streams,
                logs_deleted = removed.logs_deleted,
                "guest removed"
            ),
            Some(stream) => tracing::info!(
                guest,
                stream,
                logs_deleted = removed.logs_deleted,
                "stream removed"
            ),
        }
        Ok(removed)
    }
}

impl Removal {
    /// Deletes the log files of `stream` and its tombstone; how many log files went.
    fn delete_logs_of(&self, stream: &str) -> Result<u32> {
        let dir = self.guests.guest_log_dir(&self.guest);
        let log_path = self.guests.log_path(&self.guest, stream);
        let deleted = crate::logfile::delete_stream_files(&log_path)
            .map_err(|e| RegistryError::io(format!("cannot delete {}", log_path.display()), e))?;
        crate::tombstone::remove(&dir, stream).map_err(|e| {
            RegistryError::io(format!("cannot remove a tombstone in {}", dir.display()), e)
        })?;
        Ok(deleted)
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        let mut guests = self.guests.registry();
        match &self.stream {
            None => {
                if guests.get(&self.guest).is_some_and(|g| !g.open()) {
                    guests.remove(&self.guest);
                }
            }
            Some(stream) => {
                let forget = guests.get_mut(&self.guest).is_some_and(|g| {
                    g.closing_streams.remove(stream);
                    g.open() && g.streams.is_empty() && g.closing_streams.is_empty()
                });
                if forget {
                    guests.remove(&self.guest);
                }
            }
        }
        self.guests.update_gauges(&guests);
    }
}

/// The names of the streams with files (logs, their indexes, tombstones) in a guest's log
/// directory `dir`: `<stream>.log`, `<stream>.log.N`, `<stream>.log[.N].idx`,
/// `<stream>.removed`. Names that are not valid stream names are left out.
pub(crate) fn streams_on_disk(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut streams: Vec<String> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let stem = match name.strip_suffix(".removed") {
                Some(stem) => stem,
                None => name.split_once(".log").map(|(stem, _)| stem)?,
            };
            StreamName::parse(stem).ok().map(String::from)
        })
        .collect();
    streams.sort();
    streams.dedup();
    streams
}

/// "error: cause: its cause", for the operator's log (the registry does not depend on the
/// gRPC edge, whose `crate::error::error_chain` does the same for calls).
fn with_causes(error: &RegistryError) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Reads and parses a stream record; the error says what is wrong with it.
fn read_record(path: &Path) -> std::result::Result<StreamRecord, RecordError> {
    const MAX_RECORD: u64 = 64 << 10;
    // `take` rather than `fs::read`: no size query first (a restart reads thousands).
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::with_capacity(1024);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_RECORD + 1), &mut bytes)?;
    if bytes.len() as u64 > MAX_RECORD {
        return Err(RecordError::TooLarge(MAX_RECORD));
    }
    Ok(serde_json::from_slice(&bytes)?)
}

/// `<stream>.json` → `stream`, for valid stream names only.
fn record_stream_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?.strip_suffix(".json")?;
    StreamName::parse(name).ok().map(String::from)
}
