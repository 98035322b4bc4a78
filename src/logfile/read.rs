//! Reading offsets back from a stream's files, raw or compressed: [`OpenSegment::read_at`]
//! for history readers, and pure functions of [`Segment`]s for the console's replay.
//!
//! Owns turning "the last N bytes" and "offsets `from .. to`" into bytes read from the files
//! that held them when the segments were taken, and telling a raw file from a compressed one
//! ([`Body`]). It only opens and reads files; it never writes, renames or deletes one, never
//! asks an actor anything, and reads at most the range asked for (a compressed file: at most
//! one frame decompressed before the first byte returned).

use super::compression::is_compressed;
use super::seekable::{self, SeekTable};
use super::{OpenSegment, Segment};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// How a log file holds its bytes.
#[derive(Clone, Debug)]
pub(crate) enum Body {
    /// As logged.
    Raw,
    /// Compressed, with its validated seek table and its file name (for reasons).
    Zstd(Arc<SeekTable>, Arc<str>),
    /// Compressed, but its table is unreadable: every offset it held is lost, for this reason.
    Unreadable(Arc<str>),
}

impl Body {
    /// The body of the file at `path`, open as `file`: a `.zst` file's table is validated.
    pub(crate) fn of(file: &File, path: &Path) -> Self {
        if !is_compressed(path) {
            return Body::Raw;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        match SeekTable::read(file) {
            Ok(table) => Body::Zstd(Arc::new(table), name.into()),
            Err(e) => Body::Unreadable(format!("unreadable compressed file {name}: {e}").into()),
        }
    }
}

/// What reading a segment can fail at.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SegmentError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// Offsets `from .. to` cannot be read back (a corrupted compressed frame): a gap with
    /// this reason; the rest of the file reads on.
    #[error("{reason}")]
    Lost { from: u64, to: u64, reason: String },
}

impl OpenSegment {
    /// Reads up to `len` bytes at absolute offset `offset` (inside this segment). Fewer when
    /// the file turns out shorter (cut behind our back: nothing at all then), and, compressed,
    /// never past the end of the frame holding `offset`, so that a sequential reader
    /// decompresses every frame once.
    pub(crate) fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, SegmentError> {
        let end = self.start + self.len;
        // At most `len`, a usize.
        let len = usize::try_from(end.saturating_sub(offset)).map_or(len, |left| left.min(len));
        let pos = self.file_pos + offset.saturating_sub(self.start);
        match &self.body {
            Body::Raw => {
                let mut buffer = vec![0u8; len];
                let read = self.file.read_at(&mut buffer, pos)?;
                buffer.truncate(read);
                Ok(buffer)
            }
            Body::Zstd(table, name) => {
                seekable::read_at(&self.file, table, pos, len).map_err(|e| self.lost(e, name))
            }
            Body::Unreadable(reason) => Err(SegmentError::Lost {
                from: self.start,
                to: end,
                reason: reason.to_string(),
            }),
        }
    }

    /// A frame that cannot be read, as the offsets of this segment it held.
    fn lost(&self, e: seekable::ReadError, name: &str) -> SegmentError {
        match e {
            seekable::ReadError::Io(e) => SegmentError::Io(e),
            seekable::ReadError::Beyond(_) => SegmentError::Io(io::ErrorKind::UnexpectedEof.into()),
            seekable::ReadError::Corrupt {
                frame,
                from,
                to,
                reason,
            } => {
                let at = |raw: u64| {
                    (self.start + raw.saturating_sub(self.file_pos))
                        .clamp(self.start, self.start + self.len)
                };
                SegmentError::Lost {
                    from: at(from),
                    to: at(to),
                    reason: format!(
                        "corrupted compressed frame in {name} (frame {frame}): {reason}"
                    ),
                }
            }
        }
    }
}

/// Reads the last `n` bytes held by `segments` (oldest first). Returns the offset of the first
/// byte returned and the bytes; fewer than `n` if less is on disk. The bytes are contiguous:
/// the tail stops at the last gap (a replay is a run of offsets that follow each other).
pub(crate) fn read_tail(segments: &[Segment], n: u64) -> io::Result<(u64, Vec<u8>)> {
    let end = segments.last().map_or(0, |s| s.start + s.len);
    let mut first = segments.last().map_or(end, |s| s.start);
    for pair in segments.windows(2).rev() {
        if pair[0].start + pair[0].len != pair[1].start {
            break;
        }
        first = pair[0].start;
    }
    let from = end.saturating_sub(n).max(first);
    Ok((from, read_range(segments, from, end)?))
}

/// Reads the bytes of offsets `from .. to` from `segments`. A segment that turns out shorter
/// than described (truncated behind our back) ends the read early.
pub(crate) fn read_range(segments: &[Segment], from: u64, to: u64) -> io::Result<Vec<u8>> {
    // Only a capacity hint.
    let mut out = Vec::with_capacity(usize::try_from(to.saturating_sub(from)).unwrap_or(0));
    for segment in segments {
        let seg_end = segment.start + segment.len;
        if seg_end <= from || segment.start >= to {
            continue;
        }
        let start = from.max(segment.start);
        let stop = to.min(seg_end);
        let wanted = stop - start;
        let before = out.len();
        // The same reading as history's ([`OpenSegment::read_at`]): a corrupted frame ends
        // the read like a cut file, so what is returned is always a run of offsets that
        // follow each other.
        let file = File::open(&segment.path)?;
        let open = OpenSegment {
            body: Body::of(&file, &segment.path),
            file: Arc::new(file),
            index: None,
            start: segment.start,
            len: segment.len,
            file_pos: segment.file_pos,
            growable: false,
        };
        let mut at = start;
        while at < stop {
            // At most `wanted`, a capacity hint's size.
            let left = usize::try_from(stop - at).unwrap_or(usize::MAX);
            match open.read_at(at, left) {
                Ok(bytes) if !bytes.is_empty() => {
                    at += bytes.len() as u64;
                    out.extend_from_slice(&bytes);
                }
                Ok(_) | Err(SegmentError::Lost { .. }) => break,
                Err(SegmentError::Io(e)) => return Err(e),
            }
        }
        if u64::try_from(out.len() - before).is_ok_and(|read| read < wanted) {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogMode;
    use crate::logfile::{LogFile, LogLimits};

    fn small_log(dir: &std::path::Path) -> LogFile {
        let limits = LogLimits {
            max_size: 4096,
            max_backups: 3,
            mode: LogMode::Rotate,
            compress: crate::logfile::Compression::None,
            max_age: 0,
        };
        LogFile::open(&dir.join("s.log"), &dir.join("s.pos"), limits).unwrap()
    }

    /// Truncates a log file behind the log's back.
    fn cut(path: &std::path::Path, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    #[test]
    fn tail_spans_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small_log(dir.path());
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        log.append(&data).unwrap();
        let segments = log.segments();
        assert_eq!(segments.len(), 4);
        let (from, tail) = read_tail(&segments, 5000).unwrap();
        assert_eq!(from, 15_000);
        assert_eq!(tail, &data[15_000..]);
        // More than is on disk: everything from the oldest byte.
        let (from, all) = read_tail(&segments, 1 << 20).unwrap();
        assert_eq!(from, segments[0].start);
        assert_eq!(all, &data[usize::try_from(from).unwrap()..]);
        assert_eq!(
            read_range(&segments, 12_000, 12_100).unwrap(),
            &data[12_000..12_100]
        );
    }

    #[test]
    fn tail_stops_at_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small_log(dir.path());
        log.append(&[b'a'; 5000]).unwrap();
        log.skip(100);
        log.append(b"after the gap").unwrap();
        let (from, tail) = read_tail(&log.segments(), 1000).unwrap();
        assert_eq!(from, 5100);
        assert_eq!(tail, b"after the gap");
        // Only a gap at the end: nothing to replay, from the end on.
        log.skip(10);
        let (from, tail) = read_tail(&log.segments(), 1000).unwrap();
        assert_eq!((from, tail.len()), (log.end_offset(), 0));
    }

    #[test]
    fn a_range_cut_behind_our_back_ends_early() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small_log(dir.path());
        log.append(&[b'x'; 3000]).unwrap();
        let segments = log.segments();
        // The file is truncated after the segments were taken: the read stops at its end.
        cut(&segments[0].path, 1000);
        assert_eq!(read_range(&segments, 500, 3000).unwrap(), vec![b'x'; 500]);
        // A range outside every segment reads nothing.
        assert!(read_range(&segments, 5000, 6000).unwrap().is_empty());
    }

    /// A cut file ends the read even when a later file holds the rest of the range: what is
    /// returned is always a run of offsets that follow each other.
    #[test]
    fn a_cut_file_is_not_followed_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small_log(dir.path());
        log.append(&[b'x'; 4096]).unwrap();
        log.append(&[b'y'; 1000]).unwrap();
        let segments = log.segments();
        assert_eq!(segments.len(), 2);
        cut(&segments[0].path, 1000);
        assert_eq!(read_range(&segments, 500, 5096).unwrap(), vec![b'x'; 500]);
        // A range that starts past the cut reads nothing, not the next file's bytes; one that
        // starts in the next file reads it.
        let past_the_cut = read_range(&segments, 4000, 4200).unwrap();
        assert_eq!(
            past_the_cut.len(),
            0,
            "offsets 1000.. of the cut file are gone"
        );
        assert_eq!(read_range(&segments, 4096, 4200).unwrap(), vec![b'y'; 104]);
    }

    /// The same when the cut file is not the first one read.
    #[test]
    fn a_cut_middle_file_ends_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small_log(dir.path());
        log.append(&[b'x'; 4096]).unwrap();
        log.append(&[b'y'; 4096]).unwrap();
        log.append(&[b'z'; 500]).unwrap();
        let segments = log.segments();
        assert_eq!(segments.len(), 3);
        cut(&segments[1].path, 1000);
        let mut expected = vec![b'x'; 4096];
        expected.extend_from_slice(&[b'y'; 1000]);
        assert_eq!(read_range(&segments, 0, 8692).unwrap(), expected);
    }
}
