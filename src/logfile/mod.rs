//! One stream's log on disk: append, rotate or truncate at `max_size`, and absolute offsets.
//!
//! Owns `<log_dir>/<guest>/<stream>.log`, its backups `.log.1` (newest) … `.log.N`, their time
//! indexes (`.log.idx`, `.log.N.idx`, renamed and removed with them), and the stream's position
//! record (`<stream>.pos` in the state directory). It never reads from a client or a guest and
//! never blocks on anything but the file system. One concern per file: this one appends,
//! rotates and maps files to offsets; `gaps` keeps the offsets without bytes; `record` the
//! record's format; `recover` where offsets resume at open; `files` the file-system steps;
//! `read` reads ranges back from segments (console replay); `index` the time index (format,
//! writer, reader), which never changes a byte of a log; `view` maps the files of a stream
//! nobody writes any more (a removed one) for history, read-only; `import` logs bytes, time
//! marks and events imported from another node at their source offsets (live migration). Age retention
//! ([`LogFile::expire`]) deletes the rotated files older than `max_age`, never the current one.
//!
//! Invariants (docs/operations.md, "Durability"):
//! - No file of a stream together with its time index is larger than `max_size` (limits that
//!   shrink apply at once), so its bytes on disk never exceed `max_size × (max_backups + 1)`.
//!   A file rotates when it has less room left than the entries of one write may take, so an
//!   entry always lands in the index of the file that received its byte.
//! - The absolute offset (`end`) only grows, across restarts, crashes and power cuts, and an
//!   offset is never given to two different bytes. Bytes that cannot be logged (disk full, a new
//!   file that cannot be opened) still take their offsets: they become a gap ([`Gaps`]) that
//!   history reports, and are counted in `dropped`, which the record keeps.
//! - A rotation is ordered so that a crash (or a power cut) at any step is recognised at the
//!   next open: the record saying "a rotation to `next_start` is under way" is synced before
//!   the file is renamed or unlinked, and when no backup is kept (the new file may get the
//!   unlinked file's inode: ext4 reuses it) the new file's directory entry and the record naming
//!   it are synced before a byte is written to it. So the record on disk is never older than
//!   the last rotation, an empty file with the old inode is the new one, and the recorded end is
//!   a floor for the offsets.
//! - A gap is recorded before the next byte after it is written, so the bytes a crash leaves in
//!   a file beyond what the record counted follow its end, and bytes a power cut took from the
//!   file's tail become a gap up to the recorded end.
//! - Offsets are reserved on stable storage a file's worth ahead of those handed out (the
//!   rotation's sync carries it); the record notes the boot, and after a reboot the offsets go
//!   on past the reservation, so a power cut never makes an offset a client saw mean other
//!   bytes.
//! - Truncate mode is a rotation that keeps no backup.
//! - A rotation comes before the read that needs it, not between a read and its write
//!   ([`LogFile::rotate_if_full`], reads cut at [`LogFile::room`]): a crash during its syncs
//!   loses nothing that was read (docs/operations.md, "Crash guarantees").

pub(crate) mod compression;
mod files;
mod gaps;
mod import;
pub mod index;
mod read;
mod record;
mod recover;
pub(crate) mod seekable;
#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test data of known, small sizes"
)]
mod tests;
mod view;

pub(crate) use crate::config::Compression;
pub(crate) use files::write_atomically;
pub use files::{backup_path, backups_of};
pub(crate) use files::{delete_stream_files, expire_unwritten};
pub(crate) use gaps::{Gaps, Piece};
pub(crate) use import::Mark;
pub(crate) use read::{read_tail, Body, SegmentError};
pub(crate) use record::Position;
#[cfg(test)]
use record::POSITION_RECORD_LEN;
pub(crate) use view::LogView;

use crate::clock;
use crate::config::LogMode;
use crate::fault;
use files::{creating_parent, open_log, remove_if_exists, rename_if_exists, MAX_SCAN};
use index::{EventKind, StartKind};
use recover::Resumed;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, ErrorKind, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Gaps remembered on disk at most: past this the oldest file goes (docs/operations.md), so the
/// record stays within one page (a few hundred bytes per gap at worst).
pub(crate) const MAX_GAPS: usize = 16;

/// How one stream's log is capped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogLimits {
    pub max_size: u64,
    /// Rotated files kept; with compression, the budget `max_size × (max_backups + 1)` in
    /// disk bytes, as many rotated files kept as fit (docs/design.md "Compressed backups").
    pub max_backups: u32,
    pub mode: LogMode,
    /// Whether rotated files are compressed (records written before it existed: none).
    #[serde(default)]
    pub compress: Compression,
    /// Seconds: rotated files whose newest byte (their mtime) is older are deleted
    /// ([`LogFile::expire`]); 0 keeps them until the size cap pushes them out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_age: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl LogLimits {
    /// Backups kept on disk under these limits.
    pub(crate) fn backups_kept(&self) -> u32 {
        match self.mode {
            LogMode::Rotate => self.max_backups,
            LogMode::Truncate => 0,
        }
    }

    /// The most bytes this stream may ever occupy on disk.
    pub(crate) fn disk_cap(&self) -> u64 {
        self.max_size
            .saturating_mul(u64::from(self.backups_kept()) + 1)
    }
}

/// A run of bytes of one file of a stream: absolute offsets `start .. start + len` are the
/// file's bytes from `file_pos`. A file split by gaps is several segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub path: PathBuf,
    pub start: u64,
    pub len: u64,
    pub file_pos: u64,
    /// The current file's last run, which grows as bytes are logged.
    pub growable: bool,
}

/// A [`Segment`] with its file open (shared by the segments of one file), as of when it was
/// opened.
#[derive(Debug)]
pub(crate) struct OpenSegment {
    pub file: Arc<File>,
    /// How the file holds its bytes: raw, or compressed with its validated seek table (read
    /// them with [`OpenSegment::read_at`]).
    pub body: Body,
    /// The file's time index ([`index::IndexFile::open`] reads it), if it has one; opened
    /// right after `file`, so it covers at least what `file` held then.
    pub index: Option<Arc<File>>,
    pub start: u64,
    pub len: u64,
    pub file_pos: u64,
    pub growable: bool,
}

/// The outcome of moving bytes from a pipe into the log.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Moved {
    /// Bytes taken from the pipe: `logged` reached the file, `dropped` could not be written.
    Bytes { logged: usize, dropped: usize },
    /// The pipe has no writer left.
    Eof,
}

/// What became of bytes given to [`LogFile::log`]: each took its offset either way.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) struct Written {
    pub logged: usize,
    pub dropped: usize,
}

/// An open, capped log.
#[derive(Debug)]
pub(crate) struct LogFile {
    path: PathBuf,
    /// The position record, overwritten in place. Opened for each save rather than held: saves
    /// are rare (open, rotation, close, dropped bytes) and a descriptor per stream is what
    /// limits how many guests a node can serve.
    position_path: PathBuf,
    file: Option<File>,
    /// Inode of `file`; 0 while there is none.
    inode: u64,
    limits: LogLimits,
    /// Offset of the current file's range (its first byte, or the gap it starts with).
    start: u64,
    /// Bytes in the current file.
    size: u64,
    /// Offset of the next byte: `start + size` plus the gaps since `start`.
    end: u64,
    gaps: Gaps,
    /// Bytes that could not be logged, ever (persisted).
    dropped: u64,
    /// Offsets below this may be handed out: durable in the record before they are.
    reserved: u64,
    rotations: u64,
    /// Whether a writer feeds the stream, as persisted in the position record.
    open: bool,
    /// `open` as found in the record when this file was opened.
    was_open: bool,
    /// The record as last read or written: a save that would not change it is skipped.
    saved: Option<Position>,
    /// Length of the record file (a record is never written shorter).
    record_len: usize,
    /// The record's directory entry was made durable (once, at the first rotation).
    record_entry_synced: bool,
    /// The current file's time index (a log file and its index together are at most
    /// `max_size`).
    index: index::Writer,
    /// Compressions of rotated files: reservations, jobs handed out.
    compression: compression::State,
    /// An import is to run into this log: its owner holds the guest's output back, up to this
    /// switchover timeout once the guest is there ([`import`]).
    import_pending: Option<std::time::Duration>,
}

impl LogFile {
    /// Opens (or creates) the log at `path`, continuing the offsets recorded at `position_path`.
    pub(crate) fn open(path: &Path, position_path: &Path, limits: LogLimits) -> io::Result<Self> {
        // A restart opens thousands of these: a few system calls each, directories created
        // only when missing (docs/performance.md, "Where the restart time goes").
        let position_file = creating_parent(position_path, record::open)?;
        let (found, record_len) = record::read(&position_file, position_path)?;
        let file = creating_parent(path, open_log)?;
        // Before the backups are listed: what a crash left of a compression is put in order
        // (one copy of each rotated file counts).
        if let Err(e) = seekable::recover(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot recover interrupted compressions");
        }
        let meta = file.metadata()?;
        let len = meta.len();
        let Resumed { start, end, gaps } = recover::resume(found.as_ref(), meta.ino(), len, || {
            backups_of(path, MAX_SCAN)
                .iter()
                .map(|(_, size)| size)
                .sum()
        });
        let reserved = found.as_ref().map_or(0, |r| r.reserved);
        let mut log = Self {
            path: path.to_owned(),
            position_path: position_path.to_owned(),
            file: Some(file),
            inode: meta.ino(),
            limits,
            start,
            size: len,
            end,
            gaps,
            dropped: found.as_ref().map_or(0, |r| r.dropped),
            reserved,
            rotations: 0,
            open: found.as_ref().is_some_and(|r| r.open),
            was_open: found.as_ref().is_some_and(|r| r.open),
            saved: found,
            record_len,
            record_entry_synced: false,
            // Off until the owner turns it on (`logs.time_index`, [`Self::set_time_index`]).
            index: index::Writer::open(path, start, false),
            compression: compression::State::default(),
            import_pending: None,
        };
        log.forget_old_gaps();
        if let Some(record) = log.changed_position(None) {
            log.write_position(&position_file, record)?;
        }
        drop(position_file);
        // Limits do not change across a restart (a stream's record keeps them): under them
        // every pair was within `max_size` when written, so only the log files are measured.
        log.enforce_limits(false)?;
        // Age retention is checked at start, then by the daemon's periodic sweep.
        if let Err(e) = log.expire(std::time::SystemTime::now()) {
            tracing::warn!(path = %log.path.display(), error = %e, "cannot delete expired log files");
        }
        Ok(log)
    }

    /// Absolute offset of the next byte (logged or dropped).
    pub(crate) fn end_offset(&self) -> u64 {
        self.end
    }

    /// Absolute offset where the current file's range starts.
    #[cfg(test)]
    pub(crate) fn current_start(&self) -> u64 {
        self.start
    }

    /// Bytes that could not be logged, ever (they are gaps in the offsets).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Path of the current file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The limits in force.
    #[cfg(test)]
    pub(crate) fn limits(&self) -> LogLimits {
        self.limits
    }

    /// Records whether a writer feeds the stream (persisted, so a crash leaves a trace).
    pub(crate) fn set_open(&mut self, open: bool) -> io::Result<()> {
        if self.open == open {
            return Ok(());
        }
        self.open = open;
        self.save_position(None)
    }

    /// Whether the record said a writer was feeding the stream when this file was opened.
    pub(crate) fn was_open(&self) -> bool {
        self.was_open
    }

    /// Rotations done since this file was opened.
    pub(crate) fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Changes the limits. When it returns, the new cap holds: an oversized current file is
    /// rotated away, and backups beyond the new count or larger than the new `max_size` (or
    /// older than the new `max_age`) are removed with every older one (their offsets become
    /// history's leading gap).
    pub(crate) fn set_limits(&mut self, limits: LogLimits) -> io::Result<()> {
        self.limits = limits;
        self.enforce_limits(true)?;
        // A new `max_age` holds at once too.
        self.expire(std::time::SystemTime::now()).map(|_| ())
    }

    /// Bytes of this stream on disk (current file and backups, with their indexes) and the
    /// first offset still there.
    #[cfg(test)]
    pub(crate) fn disk_usage(&self) -> (u64, u64) {
        let usage = self.usage();
        (usage.disk, usage.first)
    }

    /// What this stream holds on disk: disk bytes (current file, backups raw or compressed,
    /// their indexes, compressions under way), the raw bytes of history they hold, the first
    /// offset, rotated files kept, and raw bytes waiting to be compressed.
    pub(crate) fn usage(&self) -> compression::Usage {
        let segments = self.segments();
        let (disk, raw, backups) = self.disk_figures(&segments);
        compression::Usage {
            disk,
            raw,
            first: segments.first().map_or(self.end, |s| s.start),
            backups,
            backlog: self.compression_backlog(),
        }
    }

    /// Turns the time index on or off (`logs.time_index`); off, no index is written (those
    /// on disk stay with their logs).
    pub(crate) fn set_time_index(&mut self, enabled: bool) {
        self.index.set_enabled(enabled);
    }

    /// Records `kind` in the index before the byte at the end offset. An event that does not
    /// fit in the current file's pair (log and index at most `max_size`), or that comes over
    /// the stream's event rate (docs/design.md, "Time index"), is left out and counted as an
    /// index failure: the log's bytes come first.
    pub fn note_event(&mut self, kind: EventKind, detail: &str) {
        let now = clock::now();
        if !self.index.admit_event(kind, now) {
            self.index
                .skipped(&self.path, "too many events: over the stream's event rate");
            return;
        }
        let planned = self.index.plan_event(self.end, now, kind, detail);
        if planned.len() > self.pair_room() {
            self.index.skipped(
                &self.path,
                "no room left for the event in the current log file",
            );
            return;
        }
        self.index.commit(&self.path, planned, now, false);
    }

    /// Records that the daemon (re)opened this log: `daemon started` with how (a fresh start
    /// whose index did not end with `daemon stopped` is a restart after a crash).
    pub(crate) fn note_start(&mut self, kind: StartKind) {
        let crashed =
            kind == StartKind::Fresh && self.index.len() > 0 && !self.index.ended_stopped();
        self.note_event(
            EventKind::DaemonStarted,
            &index::start_detail(kind, crashed),
        );
    }

    /// Index writes that failed since the last call.
    pub(crate) fn take_index_failures(&mut self) -> u64 {
        self.index.take_failures()
    }

    /// The runs of bytes of this stream on disk, oldest first, with their absolute offsets. The
    /// last one is the current file's growing end (empty if the file is, or ends in a gap).
    pub(crate) fn segments(&self) -> Vec<Segment> {
        segments_of(
            &self.path,
            backups_of(&self.path, self.backup_scan()),
            &self.gaps,
            (self.start, self.size, self.end),
        )
    }

    /// Opens (read-only) every file holding offsets at or after `from`, oldest first. The
    /// descriptors stay valid whatever rotations happen later, so a reader outside the owning
    /// actor reads a consistent snapshot: never a torn or mixed chunk.
    /// A compressed file's seek table is read and validated here, once per file: one that
    /// fails is served as a gap with the reason ([`Body::Unreadable`]).
    pub(crate) fn open_segments(&self, from: u64) -> io::Result<Vec<OpenSegment>> {
        open_segments_of(self.segments(), from)
    }

    /// Deletes the rotated files whose newest byte is older than `limits.max_age` seconds
    /// before `now` (a rotated file is renamed, never rewritten, so its mtime is the time of its
    /// newest byte), never the current file. A backup older than the age goes with every older
    /// one (`.k ..= .N`), so the backups never have a hole, and the offsets they held become
    /// history's leading gap, as after a rotation. Returns how many files went.
    pub(crate) fn expire(&mut self, now: std::time::SystemTime) -> io::Result<u32> {
        if self.limits.max_age == 0 {
            return Ok(0);
        }
        let Some(cutoff) = now.checked_sub(std::time::Duration::from_secs(self.limits.max_age))
        else {
            return Ok(0);
        };
        let backups = backups_of(&self.path, MAX_SCAN);
        let expired = backups.iter().position(|(path, _)| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified < cutoff)
        });
        let Some(first) = expired else {
            return Ok(0);
        };
        // Both at most MAX_SCAN (a u32).
        let count = |n: usize| u32::try_from(n).unwrap_or(MAX_SCAN);
        fault::point("logfile.expire.begin");
        // Oldest first (no hole if a step fails), each with its index.
        for (backup, _) in backups[first..].iter().rev() {
            files::remove_log_file(backup)?;
        }
        self.forget_old_gaps();
        self.save_position(None)?;
        Ok(count(backups.len() - first))
    }

    /// Appends `data`, rotating whenever the current file is full. On an error, what was
    /// written before it stays logged; the rest is not accounted (see [`Self::log`]).
    #[cfg(test)]
    pub(crate) fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.append_counting(data, &mut 0)
    }

    /// [`Self::append`], adding to `logged` the bytes of `data` written. Not the growth of
    /// `end`: a file recreated behind our back brings bytes that take offsets too.
    fn append_counting(&mut self, mut data: &[u8], logged: &mut usize) -> io::Result<()> {
        while !data.is_empty() {
            let now = clock::now();
            let room = self.make_room()?;
            // The entry goes into the index of the file that receives the byte. `make_room`
            // leaves at least the write reserve (more than one write's entries) in the pair, so
            // the entry and a byte fit; only a pair smaller than that (a `max_size` config and
            // limits refuse) leaves the entry out rather than the byte.
            let mut planned = self.index.plan_write(self.end, now);
            if planned.len() >= room {
                planned = index::Planned::default();
            }
            let n = usize::try_from(room - planned.len())
                .map_or(data.len(), |room| room.min(data.len()));
            self.reserve(self.end + n as u64)?;
            let file = self.file.as_mut().expect("make_room opened the file");
            let written = file.write(&data[..n])?;
            if written == 0 {
                return Err(io::Error::new(
                    ErrorKind::WriteZero,
                    "log file accepted no bytes",
                ));
            }
            // Tests kill the daemon between the log write and its index entry.
            fault::point("index.append");
            self.index.commit(&self.path, planned, now, true);
            self.size += written as u64;
            self.end += written as u64;
            *logged += written;
            data = &data[written..];
        }
        Ok(())
    }

    /// Logs `data`: what the file system refuses still takes its offsets, as a gap counted in
    /// `dropped` (never a silent loss). The next call tries the file (or opens it) again.
    pub(crate) fn log(&mut self, data: &[u8]) -> Written {
        let mut logged = 0;
        let result = self.append_counting(data, &mut logged);
        let dropped = data.len() - logged;
        if let Err(e) = result {
            tracing::debug!(path = %self.path.display(), error = %e, dropped, "log write failed");
            self.skip(dropped as u64);
        }
        Written { logged, dropped }
    }

    /// Gives the next `n` offsets to bytes that were not logged: a gap, recorded at once (so a
    /// crash cannot hand those offsets out again), and counted as dropped.
    pub(crate) fn skip(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        if let Err(e) = self.reserve(self.end + n) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot reserve offsets");
        }
        self.note_event(EventKind::BytesDropped, &format!("{n} bytes"));
        self.gaps.insert(self.end, self.end + n);
        self.end += n;
        self.dropped += n;
        if self.gaps.len() > MAX_GAPS {
            if let Err(e) = self.shed_gaps() {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the oldest log file");
            }
        }
        if let Err(e) = self.save_position(None) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot record dropped bytes");
        }
    }

    /// Moves up to `max` bytes from a non-blocking pipe into the log through `buffer`, cut at
    /// the room left in the current file. Returns `WouldBlock` when the pipe is empty.
    ///
    /// `read` + `write`, not `splice(2)`: splicing into a file holds the pipe's lock while the
    /// page cache is written, so the guest's next write waits for it; copying lets both run at
    /// once, and measured faster (docs/performance.md).
    pub(crate) fn move_from_pipe(
        &mut self,
        pipe: BorrowedFd<'_>,
        max: usize,
        buffer: &mut [u8],
    ) -> io::Result<Moved> {
        // A full (or lost) file is only rotated once there is data for the next one: rotating on
        // speculation would empty a truncate-mode file that readers still want.
        self.rotate_if_full(pipe);
        let len = max.min(self.room()).min(buffer.len());
        match rustix::io::read(pipe, &mut buffer[..len]) {
            Ok(0) => Ok(Moved::Eof),
            Ok(n) => {
                let Written { logged, dropped } = self.log(&buffer[..n]);
                Ok(Moved::Bytes { logged, dropped })
            }
            Err(rustix::io::Errno::AGAIN) => Err(ErrorKind::WouldBlock.into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Rotates a full (or lost) file now if `source` (a pipe or socket) holds bytes to read,
    /// so that the rotation, whose syncs are the slowest step of a write, lies before the read
    /// rather than between the read and the write: a crash during it loses nothing
    /// (docs/operations.md, "Crash guarantees"). Without bytes waiting it does nothing: the
    /// next append rotates. A failure leaves the file as it was, and the next append tries
    /// again and counts what it cannot log.
    pub(crate) fn rotate_if_full(&mut self, source: BorrowedFd<'_>) {
        let full = self.file.is_none() || self.pair_full();
        if full && rustix::io::ioctl_fionread(source).is_ok_and(|n| n > 0) {
            if let Err(e) = self.make_room() {
                tracing::debug!(path = %self.path.display(), error = %e, "rotation failed");
            }
        }
    }

    /// Bytes the current file takes before the next rotation; `usize::MAX` when the next
    /// append rotates first (the file is full or lost).
    pub(crate) fn room(&self) -> usize {
        match &self.file {
            Some(_) if !self.pair_full() => {
                usize::try_from(self.pair_room() - self.index.write_reserve()).unwrap_or(usize::MAX)
            }
            _ => usize::MAX,
        }
    }

    /// The current file and its index hold `max_size` bytes (or more: limits shrank), less the
    /// room kept for the index entries of a write ([`index::Writer::write_reserve`]).
    fn pair_full(&self) -> bool {
        self.size + self.index.len() + self.index.write_reserve() >= self.limits.max_size
    }

    /// Bytes the current file and its index may still take.
    fn pair_room(&self) -> u64 {
        self.limits
            .max_size
            .saturating_sub(self.size + self.index.len())
    }

    /// Records the end offset (when a stream closes), if it changed since the last save. It
    /// does not flush the file to stable storage: a restarted daemon reads the same page cache,
    /// and a power cut loses what the kernel had not yet written back whether the daemon was
    /// running or not (docs/operations.md, "Durability").
    pub(crate) fn checkpoint(&mut self) -> io::Result<()> {
        self.save_position(None)
    }

    /// Room left in the current file, rotating first if it is full; reopens a file lost to an
    /// earlier failure.
    fn make_room(&mut self) -> io::Result<u64> {
        if self.file.is_none() {
            self.create_current(self.limits.backups_kept() == 0)?;
        }
        if self.pair_full() {
            self.rotate(self.limits.backups_kept())?;
        }
        Ok(self.pair_room())
    }

    /// Applies the limits to the files on disk; `indexes`: measure each backup with its index
    /// (the limits changed), not only its log.
    fn enforce_limits(&mut self, indexes: bool) -> io::Result<()> {
        let keep = self.limits.backups_kept();
        // Only a file over the cap (limits shrank) is rotated now; a full one waits for data.
        if self.size + self.index.len() > self.limits.max_size {
            self.rotate(keep)?;
        }
        let backups = backups_of(&self.path, MAX_SCAN);
        // At most MAX_SCAN (a u32).
        let count = |n: usize| u32::try_from(n).unwrap_or(MAX_SCAN);
        index::remove_orphans(&self.path, count(backups.len()))?;
        let cut = backups
            .iter()
            .position(|(path, len)| {
                let index = if indexes { files::index_len(path) } else { 0 };
                *len + index > self.limits.max_size
            })
            .unwrap_or(backups.len())
            // Kept by bytes (below), not counted, when compressed.
            .min(if self.by_bytes() {
                backups.len()
            } else {
                keep as usize
            });
        if cut < backups.len() {
            files::remove_backups(&self.path, count(cut) + 1, count(backups.len()))?;
        }
        if self.by_bytes() {
            self.make_disk_room(0, None)?;
        }
        self.forget_old_gaps();
        self.save_position(None)
    }

    /// Removes the oldest file until at most [`MAX_GAPS`] gaps are left to remember.
    fn shed_gaps(&mut self) -> io::Result<()> {
        while self.gaps.len() > MAX_GAPS {
            // At most MAX_SCAN (a u32).
            let backups = u32::try_from(backups_of(&self.path, MAX_SCAN).len()).unwrap_or(MAX_SCAN);
            if backups > 0 {
                files::remove_backups(&self.path, backups, backups)?;
            } else {
                // All in the current file: it goes, as in a truncation.
                self.rotate(0)?;
            }
            let before = self.gaps.len();
            self.forget_old_gaps();
            if backups == 0 && self.gaps.len() == before {
                break;
            }
        }
        Ok(())
    }

    /// Forgets gaps older than anything on disk.
    fn forget_old_gaps(&mut self) {
        if self.gaps.is_empty() {
            return;
        }
        let first = self.segments().first().map_or(self.start, |s| s.start);
        self.gaps.forget_before(first.min(self.start));
    }

    /// Shifts `.log` → `.log.1` → … (or drops the file when `keep` is 0) and starts a new file.
    /// The order of the steps is what makes a crash at any of them recognisable (module docs).
    fn rotate(&mut self, keep: u32) -> io::Result<()> {
        let next_start = self.end;
        fault::point("logfile.rotate.begin");
        // The new file's offsets are reserved with the same sync.
        self.reserved = self.reserved.max(next_start + self.limits.max_size);
        // On disk before the move is: after a power cut this record recognises the moved (or
        // unlinked) file, and its `end` is the floor of the offsets.
        self.save_position_durably(Some(next_start))?;
        fault::point("logfile.rotate.recorded");
        // The old file stays open until it is moved: if a step fails, nothing changed and the
        // next write tries the rotation again.
        let index = index::index_path(&self.path);
        if keep == 0 {
            remove_if_exists(&self.path)?;
            remove_if_exists(&index)?;
        } else {
            if self.by_bytes() {
                // As many as fit in the budget beside the file rotated now (docs/design.md "Compressed backups").
                self.shift_by_bytes(self.size + self.index.len())?;
            } else {
                files::remove_backups(&self.path, keep, keep)?;
                for k in (1..keep).rev() {
                    files::shift_backup(&self.path, k)?;
                }
            }
            rename_if_exists(&self.path, &backup_path(&self.path, 1))?;
            fault::point("logfile.rotate.index");
            rename_if_exists(&index, &index::index_path(&backup_path(&self.path, 1)))?;
        }
        fault::point("logfile.rotate.moved");
        self.file = None;
        self.inode = 0;
        self.start = next_start;
        self.size = 0;
        self.rotations += 1;
        self.create_current(keep == 0)
    }

    /// Opens (creating) the current file; it starts after every offset handed out.
    ///
    /// When the old file was unlinked (`durable`) the new one may get its inode, so nothing is
    /// written to it before its directory entry and the record naming it are durable: after a
    /// power cut, a non-empty file with the recorded inode is then always the recorded file.
    /// With backups the old inode lives on as `.1`, and the record written before the move
    /// suffices.
    fn create_current(&mut self, durable: bool) -> io::Result<()> {
        let file = open_log(&self.path)?;
        fault::point("logfile.rotate.created");
        let meta = file.metadata()?;
        if durable {
            files::sync_parent(&self.path)?;
        }
        let previous = (self.start, self.size, self.end);
        // A file recreated behind our back may hold bytes: they follow every offset handed out.
        self.start = self.end;
        self.size = meta.len();
        self.end += meta.len();
        self.inode = meta.ino();
        let saved = if durable {
            self.save_position_durably(None)
        } else {
            self.save_position(None)
        };
        if let Err(e) = saved {
            (self.start, self.size, self.end) = previous;
            self.inode = 0;
            return Err(e);
        }
        self.file = Some(file);
        self.index.start_file(self.start);
        fault::point("logfile.rotate.done");
        Ok(())
    }

    fn save_position(&mut self, next_start: Option<u64>) -> io::Result<()> {
        match self.changed_position(next_start) {
            Some(record) => self.write_position(&record::open(&self.position_path)?, record),
            None => Ok(()),
        }
    }

    /// Makes sure offsets below `upto` are reserved (see [`Position::reserved`]): if not, reserves
    /// a file's worth more, durably. One sync per `max_size` offsets at most, none in the common
    /// case (a rotation reserves its new file's offsets with its own sync).
    fn reserve(&mut self, upto: u64) -> io::Result<()> {
        if upto <= self.reserved {
            return Ok(());
        }
        let before = self.reserved;
        self.reserved = upto.max(self.end + self.limits.max_size);
        let result = self.save_position_durably(None);
        if result.is_err() {
            self.reserved = before;
        }
        result
    }

    /// Saves the record and waits until it is on stable storage (rotations, reservations).
    fn save_position_durably(&mut self, next_start: Option<u64>) -> io::Result<()> {
        let file = record::open(&self.position_path)?;
        if let Some(record) = self.changed_position(next_start) {
            self.write_position(&file, record)?;
        }
        file.sync_data()?;
        if !self.record_entry_synced {
            files::sync_parent(&self.position_path)?;
            self.record_entry_synced = true;
        }
        Ok(())
    }

    /// The record to write, or `None` when it would say what was last read or written.
    fn changed_position(&self, next_start: Option<u64>) -> Option<Position> {
        let record = self.position(next_start);
        (self.saved.as_ref() != Some(&record)).then_some(record)
    }

    /// Writes `record` into the open position record `file`.
    fn write_position(&mut self, file: &File, record: Position) -> io::Result<()> {
        self.record_len = record::write(file, &record, self.record_len)?;
        self.saved = Some(record);
        Ok(())
    }

    fn position(&self, next_start: Option<u64>) -> Position {
        Position {
            inode: self.inode,
            start: self.start,
            next_start,
            end: self.end,
            open: self.open,
            dropped: self.dropped,
            gaps: self.gaps.clone(),
            reserved: self.reserved,
            boot: record::boot_id().to_owned(),
        }
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        let _ = self.save_position(None);
    }
}

/// The runs of bytes of a stream on disk, oldest first: the current file at `path` holds
/// `size` bytes of the offsets `start .. end` (the rest are `gaps`), its `backups` (path and
/// length, newest first) the offsets before. Shared by the writer ([`LogFile`]) and the
/// read-only [`LogView`].
fn segments_of(
    path: &Path,
    backups: Vec<(PathBuf, u64)>,
    gaps: &Gaps,
    (start, size, end): (u64, u64, u64),
) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut newer_start = start;
    for (backup, len) in backups {
        let Some(pieces) = gaps.pieces(newer_start, len) else {
            break;
        };
        let Some(first) = pieces.first() else {
            continue;
        };
        newer_start = first.start;
        segments.extend(pieces.iter().rev().map(|p| segment(&backup, p, false)));
    }
    segments.reverse();
    let pieces = gaps.pieces(end, size).unwrap_or_default();
    let ends_at_end = pieces.last().is_some_and(|p| p.start + p.len == end);
    let last = pieces.len().saturating_sub(1);
    for (i, piece) in pieces.iter().enumerate() {
        segments.push(segment(path, piece, ends_at_end && i == last));
    }
    if !ends_at_end {
        segments.push(Segment {
            path: path.to_owned(),
            start: end,
            len: 0,
            file_pos: size,
            growable: true,
        });
    }
    segments
}

/// Opens (read-only) the files of `segments` holding offsets at or after `from`.
fn open_segments_of(segments: Vec<Segment>, from: u64) -> io::Result<Vec<OpenSegment>> {
    let mut open = Vec::new();
    // The file last opened (segments of one file share it): path, log, index, body.
    type Opened = (PathBuf, Arc<File>, Option<Arc<File>>, Body);
    let mut last: Option<Opened> = None;
    for s in segments {
        if s.start + s.len <= from && !s.growable {
            continue;
        }
        let (file, index, body) = match &last {
            Some((path, file, index, body)) if *path == s.path => {
                (file.clone(), index.clone(), body.clone())
            }
            _ => match File::open(&s.path) {
                Ok(file) => {
                    // After the log: whatever the log held then, its index covers. A
                    // compressed `.N.zst` keeps the index of `.N`.
                    let index_path = index::index_path(&compression::raw_name(&s.path));
                    let index = match File::open(index_path) {
                        Ok(index) => Some(Arc::new(index)),
                        Err(e) if e.kind() == ErrorKind::NotFound => None,
                        Err(e) => return Err(e),
                    };
                    // A compressed file's table is read and validated here, once per file.
                    let body = Body::of(&file, &s.path);
                    (Arc::new(file), index, body)
                }
                // A file removed behind our back: its bytes are gone, the reader reports a gap.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            },
        };
        last = Some((s.path, file.clone(), index.clone(), body.clone()));
        open.push(OpenSegment {
            file,
            body,
            index,
            start: s.start,
            len: s.len,
            file_pos: s.file_pos,
            growable: s.growable,
        });
    }
    Ok(open)
}

fn segment(path: &Path, piece: &Piece, growable: bool) -> Segment {
    Segment {
        path: path.to_owned(),
        start: piece.start,
        len: piece.len,
        file_pos: piece.file_pos,
        growable,
    }
}
