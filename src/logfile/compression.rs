//! Compression as one stream's log sees it (docs/design.md "Compressed backups"): rotated
//! files raw (`.N`) or compressed (`.N.zst`), the disk budget they share, the jobs handed to
//! the node's worker ([`crate::compress`]) and installing what it made.
//!
//! Owns the `compress` setting's meaning for one log, the listing of backups with their raw
//! and disk lengths (listed once, then kept in [`LogFile`] by every step that changes them),
//! the rotation size with compression, keeping rotated files by disk bytes (the writer removes
//! the oldest when a read or write would cross the budget), disk reservations of compressions
//! under way, and the install step (a rename and an unlink on the actor, no sync: the staged
//! file was synced by the worker). It never compresses or decompresses (the worker and
//! [`super::seekable`] do), never waits for the worker, and never removes the current file.

use super::seekable::{self, Header};
use super::{backup_path, files, LogFile, Segment};
use crate::compress::{Outcome, Pool};
use crate::config::{Compression, LogMode};
use crate::fault;
use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A rotated file of a stream, as found on disk (or as [`LogFile`] keeps it since).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Backup {
    pub n: u32,
    /// `.N`, or `.N.zst` when compressed.
    pub path: PathBuf,
    /// Raw bytes it holds; `None` for a compressed file whose header cannot be read (it is
    /// the last listed: the files older than it cannot be placed).
    pub raw_len: Option<u64>,
    /// Its bytes on disk (without its index).
    pub disk_len: u64,
    /// Bytes of its time index (0 without one).
    pub index_len: u64,
    pub inode: u64,
}

impl Backup {
    /// Whether it is compressed (by its name).
    pub(crate) fn compressed(&self) -> bool {
        is_compressed(&self.path)
    }

    /// Its disk bytes with its index.
    pub(crate) fn disk(&self) -> u64 {
        self.disk_len + self.index_len
    }
}

/// Backups `.1 ..= .max`, raw or compressed, newest first: up to the first missing number,
/// and up to (including) a compressed file whose header is unreadable. A raw `.N` is taken
/// over a `.N.zst` beside it (an install a crash interrupted: the raw file is still the one
/// counted until recovery).
pub(crate) fn backups(log: &Path, max: u32) -> Vec<Backup> {
    let mut found = Vec::new();
    for n in 1..=max {
        let raw = backup_path(log, n);
        let index_len = files::index_len(&raw);
        if let Ok(meta) = fs::metadata(&raw) {
            found.push(Backup {
                n,
                path: raw,
                raw_len: Some(meta.len()),
                disk_len: meta.len(),
                index_len,
                inode: meta.ino(),
            });
            continue;
        }
        let zst = seekable::zst_path(log, n);
        let Ok(file) = File::open(&zst) else {
            break;
        };
        let Ok(meta) = file.metadata() else {
            break;
        };
        let raw_len = seekable::read_header(&file).ok().map(|h| h.raw_len);
        found.push(Backup {
            n,
            path: zst,
            raw_len,
            disk_len: meta.len(),
            index_len,
            inode: meta.ino(),
        });
        if raw_len.is_none() {
            break;
        }
    }
    found
}

/// Whether `path` is a compressed log file (by its name).
pub(crate) fn is_compressed(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "zst")
}

/// The log file (`.N`) a possibly compressed path stands for: indexes are named after it.
pub(crate) fn raw_name(path: &Path) -> PathBuf {
    if is_compressed(path) {
        path.with_extension("")
    } else {
        path.to_owned()
    }
}

/// Size at which the current file rotates when rotated files are compressed: an eighth of the
/// disk budget, at least [`MIN_ROTATE_SIZE`] (and at most `max_size`), so that a raw file
/// (the current one, or a rotated one waiting for the worker) takes a small share of the budget
/// and the rest holds compressed history (docs/design.md "Compressed backups").
pub(crate) fn rotate_size(max_size: u64, budget: u64) -> u64 {
    (budget / 8).max(MIN_ROTATE_SIZE).min(max_size)
}

/// The smallest rotation size with compression: a frame of the default `compression.frame_size`.
pub(crate) const MIN_ROTATE_SIZE: u64 = 64 << 10;

/// What a stream holds on disk ([`LogFile::usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Disk bytes: current file, backups raw or compressed, their indexes, and compressions
    /// under way.
    pub disk: u64,
    /// Raw bytes of history those hold.
    pub raw: u64,
    /// The oldest offset on disk.
    pub first: u64,
    /// Rotated files kept.
    pub backups: u32,
    /// Raw bytes of rotated files waiting to be compressed.
    pub backlog: u64,
}

/// A rotated file to compress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct JobSpec {
    pub start: u64,
    pub inode: u64,
    pub raw_len: u64,
}

/// What a log remembers about compressions.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Disk bytes granted to compressions under way (their temporary and staged files).
    staging: u64,
    /// Inodes of raw files whose compression did not pay: left raw until the next start.
    not_worth: HashSet<u64>,
    /// Start offsets of files handed to the worker whose job has not ended.
    queued: BTreeSet<u64>,
    /// The node's worker, until the stream's actor takes it ([`LogFile::take_compressor`]).
    pool: Option<Arc<Pool>>,
}

impl LogFile {
    /// Gives the node's compression worker to whoever will own this log (its actor).
    pub(crate) fn set_compressor(&mut self, pool: Option<Arc<Pool>>) {
        self.compression.pool = pool;
    }

    /// Takes the worker given with [`Self::set_compressor`].
    pub(crate) fn take_compressor(&mut self) -> Option<Arc<Pool>> {
        self.compression.pool.take()
    }

    /// Whether rotated files are compressed and kept by disk bytes (rotate mode only:
    /// truncate mode keeps no rotated file).
    pub(crate) fn by_bytes(&self) -> bool {
        self.limits.compress == Compression::Zstd && self.limits.mode == LogMode::Rotate
    }

    /// How far backups are looked for: `max_backups` when counted, the scan bound when kept
    /// by bytes.
    pub(crate) fn backup_scan(&self) -> u32 {
        if self.by_bytes() {
            files::MAX_SCAN
        } else {
            self.limits.backups_kept()
        }
    }

    /// Backups with the absolute offset of their first byte, newest first, as
    /// [`Self::segments`] places them (a backup holding no byte is left out).
    pub(crate) fn placed_backups(&self) -> Vec<(Backup, u64)> {
        let segments = self.segments();
        let mut firsts: std::collections::HashMap<&Path, u64> = std::collections::HashMap::new();
        for s in &segments {
            firsts.entry(s.path.as_path()).or_insert(s.start);
        }
        self.backups
            .iter()
            .filter_map(|b| Some((b.clone(), *firsts.get(b.path.as_path())?)))
            .collect()
    }

    /// Disk bytes of the backups (with their indexes), as kept in [`LogFile`].
    pub(crate) fn backups_disk(&self) -> u64 {
        self.backups.iter().map(Backup::disk).sum()
    }

    /// Whether `bytes` more for compressions under way still leave the current pair room to
    /// grow to its rotation size with every rotated file removed: the writer can then always
    /// make room by removing rotated files alone ([`Self::fit_on_disk`]).
    fn writer_keeps_room(&self, bytes: u64) -> bool {
        let pair = (self.size + self.index.len()).max(self.rotate_size());
        pair + self.compression.staging + bytes <= self.limits.disk_cap()
    }

    /// Removes the oldest backups until `counted` bytes (the current pair as the caller counts
    /// it, and what it is about to add), the backups and compressions under way fit in the
    /// budget; the one starting at `spare` (being compressed) is never removed. Returns whether
    /// it fits. No system call unless a file goes: the backups are known ([`LogFile`]).
    pub(crate) fn make_disk_room(&mut self, counted: u64, spare: Option<u64>) -> io::Result<bool> {
        loop {
            let used = counted + self.backups_disk() + self.compression.staging;
            if used <= self.limits.disk_cap() {
                return Ok(true);
            }
            let Some(oldest) = self.backups.last().map(|b| b.n) else {
                return Ok(false);
            };
            if spare.is_some()
                && self
                    .placed_backups()
                    .last()
                    .is_some_and(|(b, start)| b.n == oldest && Some(*start) == spare)
            {
                return Ok(false);
            }
            self.remove_oldest_backup()?;
            // Tests kill the daemon right after a file went for room.
            fault::point("logfile.budget.shed");
        }
    }

    /// Makes room in the budget for `more` bytes of the current pair (a write and its index
    /// entries), removing the oldest rotated files: the budget counts the current file at its
    /// actual size, so the write path is where it grows (docs/design.md "Compressed
    /// backups"). By the grant rule ([`Self::writer_keeps_room`]) the current pair at its
    /// rotation size and the compressions under way always fit, so removing backups suffices.
    pub(crate) fn fit_on_disk(&mut self, more: u64) -> io::Result<()> {
        if !self.by_bytes() {
            return Ok(());
        }
        let counted = self.size + self.index.len() + more;
        if self.make_disk_room(counted, None)? {
            Ok(())
        } else {
            Err(io::Error::other(
                "no room in the stream's disk budget for the write",
            ))
        }
    }

    /// Raw backups not yet handed to the worker, oldest first; they count as handed.
    pub(crate) fn compression_jobs(&mut self) -> Vec<JobSpec> {
        if !self.by_bytes() {
            return Vec::new();
        }
        let mut jobs: Vec<JobSpec> = self
            .placed_backups()
            .into_iter()
            .filter(|(b, start)| {
                !b.compressed()
                    && !self.compression.not_worth.contains(&b.inode)
                    && !self.compression.queued.contains(start)
            })
            .map(|(b, start)| JobSpec {
                start,
                inode: b.inode,
                raw_len: b.disk_len,
            })
            .collect();
        jobs.reverse();
        self.compression.queued.extend(jobs.iter().map(|j| j.start));
        jobs
    }

    /// A job could not be handed to the worker (queue full): it is offered again later.
    pub(crate) fn job_not_taken(&mut self, start: u64) {
        self.compression.queued.remove(&start);
    }

    /// Raw bytes of rotated files waiting to be compressed.
    pub(crate) fn compression_backlog(&self) -> u64 {
        if !self.by_bytes() {
            return 0;
        }
        self.backups
            .iter()
            .filter(|b| !b.compressed() && !self.compression.not_worth.contains(&b.inode))
            .map(|b| b.disk_len)
            .sum()
    }

    /// Opens the raw backup starting at `start` for the worker, if it is still the file with
    /// `inode`.
    pub(crate) fn open_for_compression(&self, start: u64, inode: u64) -> Option<(File, Header)> {
        let (backup, _) = self
            .placed_backups()
            .into_iter()
            .find(|(b, s)| *s == start && b.inode == inode && !b.compressed())?;
        let file = File::open(&backup.path).ok()?;
        (file.metadata().ok()?.ino() == inode).then_some((
            file,
            Header {
                first_offset: start,
                source_inode: inode,
                ..Header::default()
            },
        ))
    }

    /// Grants `bytes` of disk to the compression of the backup at `start`, removing older
    /// backups (never that one) if the budget needs it. The current pair counts at its actual
    /// size (bytes not yet written take no history away), and a grant never leaves the
    /// writer without room to grow it to its rotation size ([`Self::writer_keeps_room`]).
    pub(crate) fn reserve_disk(&mut self, start: u64, bytes: u64) -> bool {
        // A file removed meanwhile (for room, or a shrunk limit) gets no room: nothing older
        // is removed for a compression that cannot be installed.
        let raw_there = self
            .placed_backups()
            .iter()
            .any(|(b, s)| *s == start && !b.compressed());
        if !raw_there {
            return false;
        }
        if !self.writer_keeps_room(bytes) {
            return false;
        }
        match self.make_disk_room(self.size + self.index.len() + bytes, Some(start)) {
            Ok(true) => {
                self.compression.staging += bytes;
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a backup for room");
                false
            }
        }
    }

    /// Ends the compression of the backup at `start`: installs a staged file (rename over
    /// `.N.zst`, then unlink `.N`), or notes why the raw file stays. Gives back `reserved`.
    pub(crate) fn finish_compression(
        &mut self,
        start: u64,
        inode: u64,
        outcome: Outcome,
        reserved: u64,
    ) {
        self.compression.staging = self.compression.staging.saturating_sub(reserved);
        self.compression.queued.remove(&start);
        match outcome {
            Outcome::Staged { path, disk_len } => {
                if let Err(e) = self.install(start, inode, &path, disk_len) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot install a compressed file; the raw file stays");
                    let _ = files::remove_if_exists(&path);
                    self.relist();
                }
            }
            Outcome::NotWorth => {
                self.compression.not_worth.insert(inode);
            }
            Outcome::Refused | Outcome::Stopped | Outcome::Gone | Outcome::Failed(_) => {}
        }
    }

    fn install(&mut self, start: u64, inode: u64, staged: &Path, disk_len: u64) -> io::Result<()> {
        let found = self
            .placed_backups()
            .into_iter()
            .find(|(b, s)| *s == start && b.inode == inode && !b.compressed());
        let Some((backup, _)) = found else {
            // Removed for room (or rotated away) meanwhile.
            return files::remove_if_exists(staged);
        };
        let zst = seekable::zst_path(&self.path, backup.n);
        fs::rename(staged, &zst)?;
        fault::point("compress.installed");
        files::remove_if_exists(&backup.path)?;
        if let Some(kept) = self.backups.iter_mut().find(|b| b.n == backup.n) {
            kept.inode = fs::metadata(&zst).map_or(0, |m| m.ino());
            kept.path = zst;
            kept.disk_len = disk_len;
        }
        Ok(())
    }

    /// Bytes of this stream on disk by file (current pair, backups and their indexes,
    /// compressions under way), raw bytes of history held, and rotated files kept.
    pub(crate) fn disk_figures(&self, segments: &[Segment]) -> (u64, u64, u32) {
        let raw: u64 = segments.iter().map(|s| s.len).sum();
        let disk = self.size + self.index.len() + self.backups_disk() + self.compression.staging;
        (
            disk,
            raw,
            u32::try_from(self.backups.len()).unwrap_or(u32::MAX),
        )
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test data of known, small sizes"
)]
mod tests {
    use super::*;

    #[test]
    fn the_rotation_size_is_an_eighth_of_the_budget_within_bounds() {
        let mib = 1 << 20;
        // The default budget, 2 MiB × 4.
        assert_eq!(rotate_size(2 * mib, 8 * mib), mib);
        // Never above max_size (no backup), never below a frame unless max_size is.
        assert_eq!(rotate_size(2 * mib, 2 * mib), MIN_ROTATE_SIZE * 4);
        assert_eq!(rotate_size(mib, 2 * mib), 256 << 10);
        assert_eq!(rotate_size(16 << 10, 64 << 10), 16 << 10);
        assert_eq!(rotate_size(mib, 128 << 10), MIN_ROTATE_SIZE);
    }

    use crate::logfile::seekable::{Control, Settings, Staged};
    use crate::logfile::LogLimits;

    const MAX: u64 = 16 << 10;

    fn log(dir: &Path, compress: Compression) -> LogFile {
        let limits = LogLimits {
            max_size: MAX,
            max_backups: 3,
            mode: LogMode::Rotate,
            compress,
            max_age: 0,
        };
        LogFile::open(&dir.join("s.log"), &dir.join("s.pos"), limits).unwrap()
    }

    /// Grants room from the log, as the actor does for the worker.
    struct Granting<'a> {
        log: &'a mut LogFile,
        start: u64,
        reserved: u64,
    }

    impl Control for Granting<'_> {
        fn reserve(&mut self, bytes: u64) -> bool {
            let granted = self.log.reserve_disk(self.start, bytes);
            if granted {
                self.reserved += bytes;
            }
            granted
        }
        fn keep_going(&self) -> bool {
            true
        }
    }

    /// Runs every compression job of `log` now, as the worker would.
    fn compress_all(log: &mut LogFile) -> usize {
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        let jobs = log.compression_jobs();
        for job in &jobs {
            let (file, header) = log.open_for_compression(job.start, job.inode).unwrap();
            let path = log.path().to_owned();
            let mut control = Granting {
                log: &mut *log,
                start: job.start,
                reserved: 0,
            };
            let settings = Settings {
                level: 3,
                frame_size: 4096,
            };
            let staged =
                seekable::stage(&file, &path, header, settings, &mut c, &mut control).unwrap();
            let reserved = control.reserved;
            let outcome = match staged {
                Staged::Done { path, disk_len } => Outcome::Staged { path, disk_len },
                Staged::NotWorth => Outcome::NotWorth,
                Staged::Refused => Outcome::Refused,
                Staged::Stopped => Outcome::Stopped,
            };
            log.finish_compression(job.start, job.inode, outcome, reserved);
        }
        jobs.len()
    }

    fn read_all(log: &LogFile) -> (u64, Vec<u8>) {
        read_segments(&log.open_segments(0).unwrap())
    }

    /// Every byte of `segments` (which must follow each other), and the offset of the first.
    fn read_segments(segments: &[crate::logfile::OpenSegment]) -> (u64, Vec<u8>) {
        let first = segments.first().map_or(0, |s| s.start);
        let mut out = Vec::new();
        let mut at = first;
        for s in segments {
            assert_eq!(s.start, at, "no gap");
            while at < s.start + s.len {
                let bytes = s.read_at(at, 5000).unwrap();
                assert!(!bytes.is_empty());
                at += bytes.len() as u64;
                out.extend_from_slice(&bytes);
            }
        }
        (first, out)
    }

    fn text(from: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = from;
        while out.len() < len {
            out.extend_from_slice(
                format!("line {i} of the console, value {}\n", i % 97).as_bytes(),
            );
            i += 1;
        }
        out.truncate(len);
        out
    }

    /// Text across many rotations, compressed after each: every byte reads back exactly,
    /// the disk total never exceeds the budget, and more rotated files are kept than
    /// `max_backups` (the budget is in disk bytes).
    #[test]
    fn compressed_rotations_keep_every_byte_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log(dir.path(), Compression::Zstd);
        let mut data = Vec::new();
        for round in 0..60u64 {
            let piece = if round % 10 == 7 {
                // Random bytes: not worth compressing, kept raw.
                (0..5000u64)
                    .map(|i| {
                        (i.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(round) >> 56) as u8
                    })
                    .collect()
            } else {
                text(round * 1000, 7000)
            };
            log.append(&piece).unwrap();
            data.extend_from_slice(&piece);
            compress_all(&mut log);
            let usage = log.usage();
            assert!(
                usage.disk <= log.limits.disk_cap(),
                "round {round}: {usage:?}"
            );
            let on_disk: u64 = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.file_name().to_string_lossy().starts_with("s.log"))
                .map(|e| e.metadata().unwrap().len())
                .sum();
            assert!(
                on_disk <= log.limits.disk_cap(),
                "round {round}: {on_disk} on disk"
            );
            let (first, bytes) = read_all(&log);
            assert!(
                bytes == data[first as usize..],
                "round {round}: bytes differ"
            );
            assert_eq!(usage.raw, bytes.len() as u64);
        }
        let usage = log.usage();
        assert!(usage.backups > 3, "{usage:?}");
        assert!(usage.raw > log.limits.disk_cap(), "{usage:?}");
        assert_eq!(usage.backlog, 0, "{usage:?}");
        // A restart finds the same files and offsets.
        drop(log);
        let log = self::log(dir.path(), Compression::Zstd);
        let (first, bytes) = read_all(&log);
        assert!(bytes == data[first as usize..]);
    }

    /// Room is granted only for a raw rotated file still there, and a grant that does not fit
    /// removes the oldest files but never the one being compressed.
    /// The files a removed stream left (no writer: a read-only view) read back exactly as their
    /// writer read them, compressed backups included.
    #[test]
    fn a_view_of_compressed_files_reads_what_the_writer_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log(dir.path(), Compression::Zstd);
        for round in 0..12u64 {
            log.append(&text(round * 1000, 7000)).unwrap();
            compress_all(&mut log);
        }
        let compressed = backups(log.path(), files::MAX_SCAN)
            .iter()
            .filter(|b| b.compressed())
            .count();
        assert!(compressed >= 2, "{compressed} compressed backups");
        let written = read_all(&log);
        let path = log.path().to_owned();
        drop(log);
        let view = super::super::view::LogView::open(&path, &dir.path().join("s.pos"))
            .unwrap()
            .unwrap();
        let (first, viewed) = read_segments(&view.open_segments(0).unwrap());
        assert_eq!(
            first, written.0,
            "the view starts where the writer's history does"
        );
        assert!(
            viewed == written.1,
            "the view's bytes differ from the writer's"
        );
    }

    #[test]
    fn reservations_remove_the_oldest_but_never_their_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log(dir.path(), Compression::Zstd);
        log.append(&text(0, 4 * MAX as usize)).unwrap();
        let placed = log.placed_backups();
        assert_eq!(placed.len(), 3);
        let (newest, oldest) = (placed[0].1, placed[2].1);
        // A file that is not there (removed meanwhile): no room, nothing removed.
        assert!(!log.reserve_disk(newest + 1, 1));
        assert_eq!(log.placed_backups().len(), 3);
        // The budget is full (3 raw backups + the current file at max_size): the oldest goes.
        assert!(log.reserve_disk(newest, 4096));
        assert_eq!(log.placed_backups().len(), 2);
        // For the oldest itself, nothing older can go: refused, and it stays.
        let dir = tempfile::tempdir().unwrap();
        let mut log = self::log(dir.path(), Compression::Zstd);
        log.append(&text(0, 4 * MAX as usize)).unwrap();
        assert!(!log.reserve_disk(oldest, 4096));
        assert_eq!(log.placed_backups().len(), 3);
    }

    /// The model: random text and random bytes, drops (gaps), compressions at random moments
    /// (some files stay raw a while), reopenings: every byte on disk reads back as written at
    /// its offset, offsets hold across reopenings, and the disk never exceeds the budget.
    #[test]
    fn model_with_compressions_interleaved_matches_plain_log() {
        let dir = tempfile::tempdir().unwrap();
        let (path, pos) = (dir.path().join("s.log"), dir.path().join("s.pos"));
        let mut log = log(dir.path(), Compression::Zstd);
        // None: the offset was dropped (a gap).
        let mut model: Vec<Option<u8>> = Vec::new();
        let mut x = 99u64;
        let mut next = |below: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % below
        };
        for round in 0..300u64 {
            match next(10) {
                0 => {
                    let n = 1 + next(200);
                    log.skip(n);
                    model.extend(std::iter::repeat_n(None, n as usize));
                }
                1 => {
                    let piece: Vec<u8> = (0..next(9000)).map(|_| next(256) as u8).collect();
                    log.append(&piece).unwrap();
                    model.extend(piece.iter().map(|b| Some(*b)));
                }
                2 | 3 => {
                    compress_all(&mut log);
                }
                4 if round % 7 == 0 => {
                    drop(log);
                    log = LogFile::open(&path, &pos, limits_zstd()).unwrap();
                }
                _ => {
                    let piece = text(round * 777, next(12_000) as usize);
                    log.append(&piece).unwrap();
                    model.extend(piece.iter().map(|b| Some(*b)));
                }
            }
            assert_eq!(log.end_offset(), model.len() as u64, "round {round}");
            let on_disk: u64 = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.file_name().to_string_lossy().starts_with("s.log"))
                .map(|e| e.metadata().unwrap().len())
                .sum();
            assert!(
                on_disk <= log.limits.disk_cap(),
                "round {round}: {on_disk} on disk"
            );
            for s in log.open_segments(0).unwrap() {
                let mut at = s.start;
                while at < s.start + s.len {
                    let bytes = s.read_at(at, 5000).unwrap();
                    assert!(!bytes.is_empty(), "round {round}: short at {at}");
                    for (i, b) in bytes.iter().enumerate() {
                        assert_eq!(
                            Some(*b),
                            model[at as usize + i],
                            "round {round}: byte {}",
                            at as usize + i
                        );
                    }
                    at += bytes.len() as u64;
                }
            }
        }
        assert!(log.usage().backups > 3, "{:?}", log.usage());
    }

    fn limits_zstd() -> LogLimits {
        LogLimits {
            max_size: MAX,
            max_backups: 3,
            mode: LogMode::Rotate,
            compress: Compression::Zstd,
            max_age: 0,
        }
    }

    /// Compression off: nothing is compressed, the count of backups holds.
    #[test]
    fn without_compression_nothing_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log(dir.path(), Compression::None);
        log.append(&text(0, 100_000)).unwrap();
        assert_eq!(compress_all(&mut log), 0);
        assert_eq!(log.usage().backups, 3);
    }

    #[test]
    fn names() {
        let p = Path::new("/d/s.log.3.zst");
        assert!(is_compressed(p));
        assert_eq!(raw_name(p), Path::new("/d/s.log.3"));
        assert_eq!(raw_name(Path::new("/d/s.log.3")), Path::new("/d/s.log.3"));
        assert!(!is_compressed(Path::new("/d/s.log")));
    }
}
