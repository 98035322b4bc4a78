//! Reading a stream's bytes back from its files on disk by absolute offset.
//!
//! Owns the mapping from absolute offsets to the rotated files that hold them (via
//! [`Segment`]s described by the log's owner). It only reads; it never writes, renames or
//! deletes a log file, and it never holds more than the range it was asked for.

use crate::logfile::Segment;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

/// Reads the last `n` bytes held by `segments` (oldest first). Returns the offset of the first
/// byte returned and the bytes; fewer than `n` if less is on disk.
pub fn read_tail(segments: &[Segment], n: u64) -> io::Result<(u64, Vec<u8>)> {
    let end = segments.last().map_or(0, |s| s.start + s.len);
    let first = segments.first().map_or(end, |s| s.start);
    let from = end.saturating_sub(n).max(first);
    Ok((from, read_range(segments, from, end)?))
}

/// Reads the bytes of offsets `from .. to` from `segments`. A segment that turns out shorter
/// than described (truncated behind our back) ends the read early.
pub fn read_range(segments: &[Segment], from: u64, to: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(to.saturating_sub(from) as usize);
    for segment in segments {
        let seg_end = segment.start + segment.len;
        if seg_end <= from || segment.start >= to {
            continue;
        }
        let start = from.max(segment.start);
        let stop = to.min(seg_end);
        let mut file = File::open(&segment.path)?;
        file.seek(SeekFrom::Start(start - segment.start))?;
        let wanted = (stop - start) as usize;
        let before = out.len();
        file.take(wanted as u64).read_to_end(&mut out)?;
        if out.len() - before < wanted {
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

    #[test]
    fn tail_spans_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_size: 4096,
            max_backups: 3,
            mode: LogMode::Rotate,
        };
        let mut log =
            LogFile::open(&dir.path().join("s.log"), &dir.path().join("s.pos"), limits).unwrap();
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
        assert_eq!(all, &data[from as usize..]);
        assert_eq!(
            read_range(&segments, 12_000, 12_100).unwrap(),
            &data[12_000..12_100]
        );
    }
}
