//! One stream's log on disk: append, rotate or truncate at `max_size`, and absolute offsets.
//!
//! Owns `<log_dir>/<guest>/<stream>.log`, its backups `.log.1` (newest) … `.log.N`, and the
//! stream's position record (`<stream>.pos` in the state directory), which remembers the absolute
//! offset of the current file's first byte. It never reads from a client or a guest and never
//! blocks on anything but the file system.
//!
//! Invariants:
//! - The current file never grows past `max_size`: every write is cut at the room left, so the
//!   bytes of a stream on disk never exceed `max_size × (max_backups + 1)`.
//! - The absolute offset (`start + size`) only grows. It survives restarts and crashes: before a
//!   rotation the record is written with `next_start`, after it with the new file's inode. On
//!   open, the current file's inode tells which of the two is true (see [`Position`]).
//! - Truncate mode replaces the file by a new empty one (unlink, create), so it is the same
//!   crash-safe procedure as a rotation with no backups.

use crate::config::LogMode;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How one stream's log is capped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLimits {
    pub max_size: u64,
    pub max_backups: u32,
    pub mode: LogMode,
}

impl LogLimits {
    /// Backups kept on disk under these limits.
    pub fn backups_kept(&self) -> u32 {
        match self.mode {
            LogMode::Rotate => self.max_backups,
            LogMode::Truncate => 0,
        }
    }

    /// The most bytes this stream may ever occupy on disk.
    pub fn disk_cap(&self) -> u64 {
        self.max_size
            .saturating_mul(u64::from(self.backups_kept()) + 1)
    }
}

/// The persisted position record of a stream.
///
/// `start` is the absolute offset of the first byte of the file with inode `inode`. While a
/// rotation is under way `next_start` holds the first offset of the file that replaces it: if
/// on open the current file is not `inode` (it was renamed away, or replaced), `next_start` is
/// its start. `end` is the last end offset known at a clean close, a floor for the next start
/// if the file was removed behind the daemon's back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub inode: u64,
    pub start: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start: Option<u64>,
    #[serde(default)]
    pub end: u64,
    /// A writer (pipe) was feeding the stream; still true after a stop means the writer was
    /// lost with the daemon (the stream is "broken" until a new pipe comes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open: bool,
}

/// One file of a stream on disk: it holds the absolute offsets `start .. start + len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    pub start: u64,
    pub len: u64,
}

/// An open file of a stream, holding offsets `start .. start + len` (as of when it was opened).
#[derive(Debug)]
pub struct OpenSegment {
    pub file: File,
    pub start: u64,
    pub len: u64,
}

/// The outcome of moving bytes from a pipe into the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Moved {
    /// Bytes taken from the pipe: `logged` reached the file, `dropped` could not be written.
    Bytes { logged: usize, dropped: usize },
    /// The pipe has no writer left.
    Eof,
}

/// An open, capped log.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    /// The position record, overwritten in place (see [`POSITION_RECORD_LEN`]). Opened for
    /// each save rather than held: saves are rare (open, rotation, close) and a descriptor per
    /// stream is what limits how many guests a node can serve.
    position_path: PathBuf,
    file: Option<File>,
    inode: u64,
    limits: LogLimits,
    start: u64,
    size: u64,
    rotations: u64,
    /// Whether a writer feeds the stream, as persisted in the position record.
    open: bool,
    /// `open` as found in the record when this file was opened.
    was_open: bool,
    /// The record as last read or written: a save that would not change it is skipped.
    saved: Option<Position>,
}

impl LogFile {
    /// Opens (or creates) the log at `path`, continuing the offsets recorded at `position_path`.
    pub fn open(path: &Path, position_path: &Path, limits: LogLimits) -> io::Result<Self> {
        // A restart opens thousands of these: a few system calls each, directories created
        // only when missing (docs/performance.md, "Where the restart time goes").
        let position_file = creating_parent(position_path, open_position)?;
        let record = read_position(&position_file, position_path)?;
        let file = creating_parent(path, open_log)?;
        let meta = file.metadata()?;
        let start = match &record {
            Some(r) if r.inode == meta.ino() => r.start,
            Some(r) => r.next_start.unwrap_or(r.start.max(r.end)),
            None => backups_of(path, MAX_SCAN)
                .iter()
                .map(|(_, size)| size)
                .sum(),
        };
        let mut log = Self {
            path: path.to_owned(),
            position_path: position_path.to_owned(),
            file: Some(file),
            inode: meta.ino(),
            limits,
            start,
            size: meta.len(),
            rotations: 0,
            open: record.as_ref().is_some_and(|r| r.open),
            was_open: record.as_ref().is_some_and(|r| r.open),
            saved: record,
        };
        if let Some(record) = log.changed_position(None) {
            log.write_position(&position_file, record)?;
        }
        drop(position_file);
        log.enforce_limits()?;
        Ok(log)
    }

    /// Absolute offset of the next byte to be logged.
    pub fn end_offset(&self) -> u64 {
        self.start + self.size
    }

    /// Absolute offset of the current file's first byte.
    pub fn current_start(&self) -> u64 {
        self.start
    }

    /// Path of the current file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits in force.
    pub fn limits(&self) -> LogLimits {
        self.limits
    }

    /// Records whether a writer feeds the stream (persisted, so a crash leaves a trace).
    pub fn set_open(&mut self, open: bool) -> io::Result<()> {
        if self.open == open {
            return Ok(());
        }
        self.open = open;
        self.save_position(None)
    }

    /// Whether the record said a writer was feeding the stream when this file was opened.
    pub fn was_open(&self) -> bool {
        self.was_open
    }

    /// Rotations done since this file was opened.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Changes the limits; backups beyond the new count are removed and an oversized current
    /// file is rotated at once, so the new cap holds immediately.
    pub fn set_limits(&mut self, limits: LogLimits) -> io::Result<()> {
        self.limits = limits;
        self.enforce_limits()
    }

    /// Bytes of this stream on disk (current file and backups) and the first offset still there.
    pub fn disk_usage(&self) -> (u64, u64) {
        let segments = self.segments();
        let bytes = segments.iter().map(|s| s.len).sum();
        (bytes, segments.first().map_or(self.start, |s| s.start))
    }

    /// The files of this stream on disk, oldest first, with the absolute offsets they hold.
    pub fn segments(&self) -> Vec<Segment> {
        let mut start = self.start;
        let mut segments: Vec<Segment> = backups_of(&self.path, self.limits.backups_kept())
            .into_iter()
            .map_while(|(path, len)| {
                start = start.checked_sub(len)?;
                Some(Segment { path, start, len })
            })
            .collect();
        segments.reverse();
        segments.push(Segment {
            path: self.path.clone(),
            start: self.start,
            len: self.size,
        });
        segments
    }

    /// Opens (read-only) every file holding offsets at or after `from`, oldest first. The
    /// descriptors stay valid whatever rotations happen later, so a reader outside the owning
    /// actor reads a consistent snapshot: never a torn or mixed chunk.
    pub fn open_segments(&self, from: u64) -> io::Result<Vec<OpenSegment>> {
        let mut open = Vec::new();
        for segment in self.segments() {
            if segment.start + segment.len <= from && segment.len > 0 {
                continue;
            }
            match File::open(&segment.path) {
                Ok(file) => open.push(OpenSegment {
                    file,
                    start: segment.start,
                    len: segment.len,
                }),
                // A backup removed behind our back: its bytes are gone, the reader reports a gap.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(open)
    }

    /// Appends `data`, rotating whenever the current file is full.
    pub fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = self.make_room()?;
            let n = room.min(data.len() as u64) as usize;
            let file = self.file.as_mut().expect("make_room opened the file");
            let written = file.write(&data[..n])?;
            if written == 0 {
                return Err(io::Error::new(
                    ErrorKind::WriteZero,
                    "log file accepted no bytes",
                ));
            }
            self.size += written as u64;
            data = &data[written..];
        }
        Ok(())
    }

    /// Moves up to `max` bytes from a non-blocking pipe into the log through `buffer`, cut at
    /// the room left in the current file. Returns `WouldBlock` when the pipe is empty.
    ///
    /// `read` + `write`, not `splice(2)`: splicing into a file holds the pipe's lock while the
    /// page cache is written, so the guest's next write waits for it; copying lets both run at
    /// once, and measured faster (docs/performance.md).
    pub fn move_from_pipe(
        &mut self,
        pipe: BorrowedFd<'_>,
        max: usize,
        buffer: &mut [u8],
    ) -> io::Result<Moved> {
        // A full (or lost) file is only rotated once there is data for the next one (the read
        // comes first, then the append rotates): rotating on speculation would empty a
        // truncate-mode file that readers still want.
        let room = match &self.file {
            Some(_) if self.size < self.limits.max_size => {
                (self.limits.max_size - self.size) as usize
            }
            _ => max,
        };
        self.copy_from_pipe(pipe, max.min(room), buffer)
    }

    /// Reads up to `max` bytes from the pipe into `buffer` and appends them (rotating as needed).
    fn copy_from_pipe(
        &mut self,
        pipe: BorrowedFd<'_>,
        max: usize,
        buffer: &mut [u8],
    ) -> io::Result<Moved> {
        let len = max.min(buffer.len());
        match rustix::io::read(pipe, &mut buffer[..len]) {
            Ok(0) => Ok(Moved::Eof),
            Ok(n) => {
                let before = self.end_offset();
                // What did reach the file counts as logged; the rest is dropped.
                let result = self.append(&buffer[..n]);
                let logged = (self.end_offset() - before) as usize;
                if let Err(e) = result {
                    tracing::debug!(path = %self.path.display(), error = %e, "log write failed");
                }
                Ok(Moved::Bytes {
                    logged,
                    dropped: n - logged,
                })
            }
            Err(rustix::io::Errno::AGAIN) => Err(ErrorKind::WouldBlock.into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records the end offset (when a stream closes), if it changed since the last save. It
    /// does not flush the file to stable storage: a restarted daemon reads the same page cache,
    /// and a power cut loses what the kernel had not yet written back whether the daemon was
    /// running or not (docs/operations.md, "Durability").
    pub fn checkpoint(&mut self) -> io::Result<()> {
        self.save_position(None)
    }

    /// Room left in the current file, rotating first if it is full; reopens a file lost to an
    /// earlier failure.
    fn make_room(&mut self) -> io::Result<u64> {
        if self.file.is_none() {
            self.create_current()?;
        }
        if self.size >= self.limits.max_size {
            self.rotate()?;
        }
        Ok(self.limits.max_size - self.size)
    }

    fn enforce_limits(&mut self) -> io::Result<()> {
        remove_backups_beyond(&self.path, self.limits.backups_kept());
        // Only a file over the cap (limits shrank) is rotated now; a full one waits for data.
        if self.size > self.limits.max_size {
            self.rotate()?;
        }
        Ok(())
    }

    /// Shifts `.log` → `.log.1` → … (or drops the file in truncate mode) and starts a new file.
    fn rotate(&mut self) -> io::Result<()> {
        let next_start = self.start + self.size;
        self.save_position(Some(next_start))?;
        self.file = None;
        let keep = self.limits.backups_kept();
        if keep == 0 {
            remove_if_exists(&self.path)?;
        } else {
            remove_if_exists(&backup_path(&self.path, keep))?;
            for k in (1..keep).rev() {
                rename_if_exists(&backup_path(&self.path, k), &backup_path(&self.path, k + 1))?;
            }
            rename_if_exists(&self.path, &backup_path(&self.path, 1))?;
        }
        self.start = next_start;
        self.size = 0;
        self.rotations += 1;
        self.create_current()
    }

    fn create_current(&mut self) -> io::Result<()> {
        let file = open_log(&self.path)?;
        let meta = file.metadata()?;
        self.inode = meta.ino();
        // A file recreated behind our back may hold bytes; they count as logged after `start`.
        self.size = meta.len();
        self.file = Some(file);
        self.save_position(None)
    }

    fn save_position(&mut self, next_start: Option<u64>) -> io::Result<()> {
        match self.changed_position(next_start) {
            Some(record) => self.write_position(&open_position(&self.position_path)?, record),
            None => Ok(()),
        }
    }

    /// The record to write, or `None` when it would say what was last read or written.
    fn changed_position(&self, next_start: Option<u64>) -> Option<Position> {
        let record = self.position(next_start);
        (self.saved.as_ref() != Some(&record)).then_some(record)
    }

    /// Writes `record` into the open position record `file`.
    fn write_position(&mut self, file: &File, record: Position) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(&record)?;
        bytes.resize(POSITION_RECORD_LEN - 1, b' ');
        bytes.push(b'\n');
        // One pwrite of a fixed-size record at offset 0: no temporary file, no rename, no block
        // freed and discarded per rotation; a process crash cannot tear a single write.
        use std::os::unix::fs::FileExt;
        file.write_all_at(&bytes, 0)?;
        self.saved = Some(record);
        Ok(())
    }

    fn position(&self, next_start: Option<u64>) -> Position {
        Position {
            inode: self.inode,
            start: self.start,
            next_start,
            end: self.start + self.size,
            open: self.open,
        }
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        let _ = self.save_position(None);
    }
}

/// Size of the position record file: the JSON, padded with spaces.
pub const POSITION_RECORD_LEN: usize = 256;

/// Opens (creating) the position record for in-place updates.
fn open_position(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .custom_flags(rustix::fs::OFlags::CLOEXEC.bits() as i32)
        .open(path)
}

/// How far past `max_backups` stale backups are looked for.
const MAX_SCAN: u32 = 1000;

/// `<log>.N`.
pub fn backup_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Existing backups `.1 ..= .max` with their sizes, newest first, stopping at the first gap.
pub fn backups_of(path: &Path, max: u32) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    for n in 1..=max {
        let backup = backup_path(path, n);
        match fs::metadata(&backup) {
            Ok(meta) => found.push((backup, meta.len())),
            Err(_) => break,
        }
    }
    found
}

fn remove_backups_beyond(path: &Path, keep: u32) {
    for n in keep + 1..=MAX_SCAN {
        match fs::remove_file(backup_path(path, n)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => break,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove old backup")
            }
        }
    }
}

fn open_log(path: &Path) -> io::Result<File> {
    // Not O_APPEND: splice(2) refuses append-mode files. We are the only writer and keep the
    // file position at the end ourselves.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .custom_flags(rustix::fs::OFlags::CLOEXEC.bits() as i32)
        .open(path)?;
    io::Seek::seek(&mut file, io::SeekFrom::End(0))?;
    Ok(file)
}

/// Reads the open position record at `path` (empty or unreadable: none).
fn read_position(file: &File, path: &Path) -> io::Result<Option<Position>> {
    // Not `read_to_end` on the file itself: that asks for the size first (one more system
    // call per stream at a restart) for a record of 256 bytes.
    let mut bytes = Vec::with_capacity(POSITION_RECORD_LEN + 1);
    io::Read::read_to_end(&mut io::Read::take(file, 64 << 10), &mut bytes)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice(bytes.trim_ascii_end()) {
        Ok(record) => Ok(Some(record)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable position record");
            Ok(None)
        }
    }
}

/// Opens `path` with `open`, creating its parent directories only if they are missing.
fn creating_parent(path: &Path, open: fn(&Path) -> io::Result<File>) -> io::Result<File> {
    match open(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            open(path)
        }
        result => result,
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash leaves either
/// the old or the new content, never a torn one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_size: u64, max_backups: u32, mode: LogMode) -> LogLimits {
        LogLimits {
            max_size,
            max_backups,
            mode,
        }
    }

    /// Everything still on disk, oldest first, with the offset of its first byte.
    fn on_disk(log: &LogFile) -> (u64, Vec<u8>) {
        let mut data = Vec::new();
        for (path, _) in backups_of(log.path(), log.limits().backups_kept())
            .iter()
            .rev()
        {
            data.extend(fs::read(path).unwrap());
        }
        data.extend(fs::read(log.path()).unwrap());
        (log.end_offset() - data.len() as u64, data)
    }

    /// A tiny deterministic generator, so the model test needs no extra crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn model_random_writes_match_plain_log() {
        for (mode, backups) in [
            (LogMode::Rotate, 3),
            (LogMode::Rotate, 0),
            (LogMode::Truncate, 5),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("g/s.log");
            let pos = dir.path().join("state/s.pos");
            let lim = limits(4096, backups, mode);
            let mut log = LogFile::open(&path, &pos, lim).unwrap();
            let mut model: Vec<u8> = Vec::new();
            let mut rng = Lcg(7);
            for round in 0..400 {
                let len = (rng.next() % 3000) as usize;
                let chunk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                log.append(&chunk).unwrap();
                model.extend(&chunk);
                if round % 97 == 0 {
                    // Reopen as after a restart: offsets continue.
                    drop(log);
                    log = LogFile::open(&path, &pos, lim).unwrap();
                }
                assert_eq!(log.end_offset(), model.len() as u64);
                let (first, data) = on_disk(&log);
                assert!(data.len() as u64 <= lim.disk_cap(), "cap exceeded");
                assert_eq!(
                    &model[first as usize..],
                    &data[..],
                    "disk differs from model"
                );
                assert_eq!(log.disk_usage(), (data.len() as u64, first));
            }
        }
    }

    #[test]
    fn crash_during_rotation_keeps_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.log");
        let pos = dir.path().join("s.pos");
        let lim = limits(4096, 2, LogMode::Rotate);
        let mut log = LogFile::open(&path, &pos, lim).unwrap();
        log.append(&[b'a'; 4096]).unwrap();
        // Simulate a crash right after the rename: record says "rotation to 4096 under way",
        // the current file is gone.
        log.save_position(Some(4096)).unwrap();
        fs::rename(&path, backup_path(&path, 1)).unwrap();
        std::mem::forget(log);
        let log = LogFile::open(&path, &pos, lim).unwrap();
        assert_eq!(log.end_offset(), 4096);
        assert_eq!(log.current_start(), 4096);
    }

    #[test]
    fn shrinking_limits_enforce_the_new_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.log");
        let mut log = LogFile::open(
            &path,
            &dir.path().join("p"),
            limits(4096, 5, LogMode::Rotate),
        )
        .unwrap();
        log.append(&vec![1u8; 4096 * 6]).unwrap();
        assert_eq!(backups_of(&path, 10).len(), 5);
        log.set_limits(limits(4096, 1, LogMode::Rotate)).unwrap();
        assert_eq!(backups_of(&path, 10).len(), 1);
        assert_eq!(log.end_offset(), 4096 * 6);
    }

    #[test]
    fn position_record_is_written_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g/s.log");
        let pos = dir.path().join("state/g/s.pos");
        let lim = limits(4096, 1, LogMode::Rotate);
        let mut log = LogFile::open(&path, &pos, lim).unwrap();
        log.append(b"hello").unwrap();
        drop(log);
        let written = fs::read(&pos).unwrap();
        assert_eq!(written.len(), POSITION_RECORD_LEN);
        // Mark the record: a later save that rewrote it would change the modification time.
        let long_ago = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
        let mark = |t| {
            File::options()
                .write(true)
                .open(&pos)
                .unwrap()
                .set_modified(t)
                .unwrap()
        };
        let modified = || fs::metadata(&pos).unwrap().modified().unwrap();
        mark(long_ago);
        // A restart and a stop with nothing logged in between write nothing.
        let mut log = LogFile::open(&path, &pos, lim).unwrap();
        log.checkpoint().unwrap();
        drop(log);
        assert_eq!(modified(), long_ago);
        assert_eq!(fs::read(&pos).unwrap(), written);
        // New bytes change the end: the next checkpoint records them, and offsets continue.
        let mut log = LogFile::open(&path, &pos, lim).unwrap();
        log.append(b" world").unwrap();
        log.checkpoint().unwrap();
        assert_ne!(modified(), long_ago);
        drop(log);
        let log = LogFile::open(&path, &pos, lim).unwrap();
        assert_eq!(log.end_offset(), 11);
    }
}
