//! A read-only view of a stream's log files with no writer: the logs of a removed guest or
//! stream, read by history while they are on disk.
//!
//! Owns nothing but the mapping of the files to offsets at the moment the view is opened: the
//! position record and the current file say where the offsets resume exactly as they do for
//! the writer ([`super::recover`]), and the files are mapped the same way
//! ([`super::segments_of`]), so offsets, gaps and the leading gap of rotated-away bytes are
//! those a live reader saw. It never creates, writes, renames or deletes a file (not even the
//! position record), and its segments never grow: a stream created again under the same name
//! is read through its own writer, not through a view.

use super::compression::{self, raw_name};
use super::files::MAX_SCAN;
use super::recover::{self, Resumed};
use super::{record, segments_of, Body, OpenSegment, Segment};
use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Attempts at a consistent snapshot of the files before giving up (files change only if a
/// stream of the same name is created again and rotates at that very moment).
const SNAPSHOT_ATTEMPTS: usize = 5;

/// A log file the view opened, with its time index if it has one and its body (raw or
/// compressed); `None` for a file that is no longer the one mapped.
type Opened = (Arc<File>, Option<Arc<File>>, Body);

/// The files of a stream nobody writes, mapped to offsets as they were when the view opened.
#[derive(Debug)]
pub(crate) struct LogView {
    /// Each run of bytes with the inode of its file: a file found under that path later with
    /// another inode (renamed by a writer of a stream created again) is not read.
    segments: Vec<(Segment, u64)>,
    end: u64,
    dropped: u64,
}

/// The current file and its backups, newest first: (path, inode, raw length); the current file
/// is first, with inode 0 if missing. Backups are listed as the writer lists them (raw `.N` or
/// compressed `.N.zst`, [`compression::backups`]), up to the first that cannot be placed.
type Listing = Vec<(PathBuf, u64, u64)>;

fn list(path: &Path) -> io::Result<Listing> {
    let mut found = Vec::new();
    match std::fs::metadata(path) {
        Ok(meta) => found.push((path.to_owned(), meta.ino(), meta.len())),
        Err(e) if e.kind() == ErrorKind::NotFound => found.push((path.to_owned(), 0, 0)),
        Err(e) => return Err(e),
    }
    found.extend(
        compression::backups(path, MAX_SCAN)
            .into_iter()
            .map_while(|b| Some((b.path, b.inode, b.raw_len?))),
    );
    Ok(found)
}

impl LogView {
    /// The view of the stream whose current file is `path` and position record
    /// `position_path`; `None` when no log file of it is on disk (never created, or deleted).
    pub(crate) fn open(path: &Path, position_path: &Path) -> io::Result<Option<Self>> {
        for _ in 0..SNAPSHOT_ATTEMPTS {
            let before = list(path)?;
            if before.len() == 1 && before[0].1 == 0 {
                return Ok(None);
            }
            let found = match File::open(position_path) {
                Ok(file) => record::read(&file, position_path)?.0,
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            if list(path)? != before {
                continue;
            }
            let (_, inode, size) = before[0];
            let backups: Vec<(PathBuf, u64)> = before[1..]
                .iter()
                .map(|(path, _, len)| (path.clone(), *len))
                .collect();
            let backups_total = backups.iter().map(|(_, len)| len).sum();
            let Resumed { start, end, gaps } =
                recover::resume(found.as_ref(), inode, size, || backups_total);
            let inodes: std::collections::HashMap<PathBuf, u64> = before
                .iter()
                .map(|(path, inode, _)| (path.clone(), *inode))
                .collect();
            let segments = segments_of(path, backups, &gaps, (start, size, end))
                .into_iter()
                .map(|mut segment| {
                    segment.growable = false;
                    let inode = inodes.get(&segment.path).copied().unwrap_or(0);
                    (segment, inode)
                })
                .collect();
            return Ok(Some(Self {
                segments,
                end,
                dropped: found.map_or(0, |r| r.dropped),
            }));
        }
        Err(io::Error::other(
            "the log files kept changing while being read",
        ))
    }

    /// Offset after the stream's last byte.
    pub(crate) fn end_offset(&self) -> u64 {
        self.end
    }

    /// Bytes that could not be logged, ever (as the record says).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Opens the files holding offsets at or after `from`, oldest first, as
    /// [`super::LogFile::open_segments`] does; none of them grows, and a file that is no longer
    /// the one the view mapped (deleted, or another file under its name) is left out: its
    /// offsets are a gap to the reader, never other bytes.
    pub(crate) fn open_segments(&self, from: u64) -> io::Result<Vec<OpenSegment>> {
        let mut open = Vec::new();
        let mut last: Option<(&Path, Option<Opened>)> = None;
        for (s, inode) in &self.segments {
            if s.start + s.len <= from || s.len == 0 {
                continue;
            }
            let file = match &last {
                Some((path, file)) if *path == s.path.as_path() => file.clone(),
                _ => {
                    let file = match File::open(&s.path) {
                        Ok(file) if file.metadata()?.ino() == *inode => {
                            // After the log, as the actor opens them; `.N.zst` keeps `.N`'s.
                            let index_path = super::index::index_path(&raw_name(&s.path));
                            let index = match File::open(index_path) {
                                Ok(index) => Some(Arc::new(index)),
                                Err(e) if e.kind() == ErrorKind::NotFound => None,
                                Err(e) => return Err(e),
                            };
                            let body = Body::of(&file, &s.path);
                            Some((Arc::new(file), index, body))
                        }
                        Ok(_) => None,
                        Err(e) if e.kind() == ErrorKind::NotFound => None,
                        Err(e) => return Err(e),
                    };
                    last = Some((s.path.as_path(), file.clone()));
                    file
                }
            };
            let Some((file, index, body)) = file else {
                continue;
            };
            open.push(OpenSegment {
                file,
                body,
                index,
                start: s.start,
                len: s.len,
                file_pos: s.file_pos,
                growable: false,
            });
        }
        Ok(open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogMode;
    use crate::logfile::{LogFile, LogLimits};

    #[test]
    fn a_view_maps_the_files_as_their_writer_did() {
        let dir = tempfile::tempdir().unwrap();
        let (path, pos) = (dir.path().join("s.log"), dir.path().join("s.pos"));
        assert!(LogView::open(&path, &pos).unwrap().is_none());
        let limits = LogLimits {
            max_size: 4096,
            max_backups: 2,
            mode: LogMode::Rotate,
            max_age: 0,
            compress: crate::logfile::Compression::None,
        };
        let mut log = LogFile::open(&path, &pos, limits).unwrap();
        log.append(&[b'a'; 5000]).unwrap();
        log.skip(10);
        log.append(&[b'b'; 9000]).unwrap();
        let spans = |segments: Vec<OpenSegment>| -> Vec<(u64, u64, u64)> {
            segments
                .iter()
                .map(|s| (s.start, s.len, s.file_pos))
                .collect()
        };
        let written = spans(log.open_segments(0).unwrap());
        let end = log.end_offset();
        drop(log);
        let record_before = std::fs::read(&pos).unwrap();
        let view = LogView::open(&path, &pos).unwrap().unwrap();
        assert_eq!(view.end_offset(), end);
        assert_eq!(view.dropped(), 10);
        let viewed = spans(view.open_segments(0).unwrap());
        // The writer's last, growable, run may be empty; the view leaves empty runs out.
        let mut expected = written;
        expected.retain(|s| s.1 > 0);
        assert_eq!(viewed, expected);
        assert!(view.open_segments(0).unwrap().iter().all(|s| !s.growable));
        // Nothing was written.
        assert_eq!(std::fs::read(&pos).unwrap(), record_before);
        // Another file under the current file's name (a stream created again that rotated):
        // its offsets are left out, never read as the old ones.
        std::fs::rename(&path, dir.path().join("elsewhere")).unwrap();
        std::fs::write(&path, [b'z'; 100]).unwrap();
        let now = spans(view.open_segments(0).unwrap());
        assert_eq!(now, expected[..expected.len() - 1]);
    }
}
