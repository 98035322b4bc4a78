//! History by time: finding where `since_time` starts, and the times and events that go with
//! a reader's chunks (docs/design.md, "History by time").
//!
//! Owns the lookup of a time in a stream's index files ([`find`]: a binary search over the
//! files by their header time, then over one file's slots: O(log F + log E) `pread`s, never a
//! scan of the logs) and a reader's forward walk of the index of the file it reads ([`Times`]:
//! one [`IndexCursor`], i.e. one 4 KiB page, and the entry covering its position). It reads
//! indexes only through descriptors the stream's actor opened, like the logs, and never writes.

use super::{Event, Time};
use crate::logfile::index::{IndexCursor, IndexEntry, IndexFile, TimeMark};
use crate::logfile::OpenSegment;
use std::fs::File;
use std::io;
use std::sync::Arc;

/// The most marks one chunk carries: a chunk is cut before the next (so a reader holds at most
/// a page's worth besides its chunk).
pub(super) const MAX_MARKS: usize = 256;

/// Where a time falls in a stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// The first entry at or after the time is at this offset.
    At(u64),
    /// Before every file with an index: the oldest byte.
    Older,
    /// After every entry: nothing logged at or after it yet.
    Newer,
    /// The stream has bytes but none of its files has an index.
    Unindexed,
}

/// The first entry whose time is at or after `t` in the files of `segments` (offset order).
pub(super) fn find(segments: &[OpenSegment], t: i64) -> io::Result<Found> {
    // One index per file; the segments of one file (split by gaps) share it.
    let mut files: Vec<&Arc<File>> = Vec::new();
    for segment in segments {
        if let Some(index) = &segment.index {
            if files.last().is_none_or(|last| !Arc::ptr_eq(last, index)) {
                files.push(index);
            }
        }
    }
    if files.is_empty() {
        let logged = segments.iter().any(|s| s.len > 0);
        return Ok(if logged {
            Found::Unindexed
        } else {
            Found::Newer
        });
    }
    // The number of files created at or before `t`: times never go back, so a partition.
    // An unreadable header counts as old (it holds no time to find).
    let (mut lo, mut hi) = (0, files.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let created = IndexFile::open(files[mid].clone())?.map_or(i64::MIN, |i| i.first_time());
        if created <= t {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        return Ok(Found::Older);
    }
    // In the last file created at or before `t`, else the first entry of a later one.
    for index in &files[lo - 1..] {
        if let Some(index) = IndexFile::open((*index).clone())? {
            if let Some(mark) = index.first_at_or_after(t)? {
                return Ok(Found::At(mark.offset));
            }
        }
    }
    Ok(Found::Newer)
}

/// What the index says about a chunk about to be sent.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Where the chunk ends (at most the end it was given).
    pub end: u64,
    /// The time of its first byte.
    pub time: Option<Time>,
    /// The entry covering the first byte, then those inside (if marks were asked for).
    pub marks: Vec<Time>,
    /// The read ends with this chunk: what follows was logged after `until`.
    pub stop: bool,
}

/// A reader's walk of the index of the log file it reads.
#[derive(Default)]
pub(super) struct Times {
    /// The index file the cursor reads (the segment's), to notice a change of file.
    file: Option<Arc<File>>,
    cursor: Option<IndexCursor>,
    /// The last mark at or before the position: the time of the byte there.
    covering: Option<TimeMark>,
    /// The last event returned (offset, time): a file's index entered again (the actor gave
    /// the reader a new descriptor of it) does not repeat it.
    sent: Option<(u64, i64)>,
}

fn time(mark: &TimeMark) -> Time {
    Time {
        offset: mark.offset,
        unix_nanos: mark.wall_ns,
        approximate: mark.approximate,
    }
}

impl Times {
    /// Follows `segment`'s index from `position`: a new file's index is opened (its cursor at
    /// `position`, the entry covering it found by binary search); the same file's goes on.
    pub fn enter(&mut self, segment: &OpenSegment, position: u64) -> io::Result<()> {
        let same = match (&self.file, &segment.index) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return Ok(());
        }
        self.file = segment.index.clone();
        self.cursor = None;
        self.covering = None;
        let Some(index) = self
            .file
            .clone()
            .map(IndexFile::open)
            .transpose()?
            .flatten()
        else {
            return Ok(());
        };
        self.covering = index.mark_at(position)?;
        self.cursor = Some(index.cursor(position)?);
        Ok(())
    }

    /// Consumes the entries at or before `position` (the next chunk's first byte): the marks
    /// set the time there; an event exactly there is returned (the reader sends it before the
    /// byte) if `events` and it is not before `since`; earlier ones were passed over.
    pub fn before(
        &mut self,
        position: u64,
        events: bool,
        since: Option<i64>,
    ) -> io::Result<Option<Event>> {
        let Some(cursor) = self.cursor.as_mut() else {
            return Ok(None);
        };
        loop {
            let Some(entry) = cursor.peek()? else {
                return Ok(None);
            };
            if entry.offset() > position {
                return Ok(None);
            }
            match cursor.next()? {
                Some(IndexEntry::Time(mark)) => self.covering = Some(mark),
                Some(IndexEntry::Event(event))
                    if events
                        && event.offset == position
                        && since.is_none_or(|since| event.wall_ns >= since)
                        && self
                            .sent
                            .is_none_or(|sent| (event.offset, event.wall_ns) > sent) =>
                {
                    self.sent = Some((event.offset, event.wall_ns));
                    return Ok(Some(Event {
                        kind: event.kind as u8,
                        offset: event.offset,
                        unix_nanos: event.wall_ns,
                        detail: event.detail,
                    }));
                }
                _ => {}
            }
        }
    }

    /// Plans the chunk `[position, end)` (after [`Self::before`]): cut before the next event
    /// (with `events`), before the first entry logged after `until`, and before the mark that
    /// would be one too many; the marks inside are consumed (with `marks`, returned).
    pub fn plan(
        &mut self,
        position: u64,
        end: u64,
        until: Option<i64>,
        events: bool,
        marks: bool,
    ) -> io::Result<Plan> {
        let after_until = |wall_ns: i64| until.is_some_and(|until| wall_ns > until);
        let mut plan = Plan {
            end,
            time: self.covering.as_ref().map(time),
            marks: if marks {
                self.covering.iter().map(time).collect()
            } else {
                Vec::new()
            },
            stop: false,
        };
        if self.covering.is_some_and(|c| after_until(c.wall_ns)) {
            plan.end = position;
            plan.stop = true;
            return Ok(plan);
        }
        let Some(cursor) = self.cursor.as_mut() else {
            return Ok(plan);
        };
        while let Some(entry) = cursor.peek()? {
            if entry.offset() >= plan.end {
                break;
            }
            if after_until(entry.wall_ns()) {
                plan.end = entry.offset();
                plan.stop = true;
                break;
            }
            match entry {
                IndexEntry::Event(_) if events => {
                    plan.end = entry.offset();
                    break;
                }
                IndexEntry::Time(_) if marks && plan.marks.len() >= MAX_MARKS => {
                    plan.end = entry.offset();
                    break;
                }
                _ => {}
            }
            if let Some(IndexEntry::Time(mark)) = cursor.next()? {
                if marks {
                    plan.marks.push(time(&mark));
                }
                self.covering = Some(mark);
            }
        }
        // A mark at the very offset an event then cut the chunk at belongs to the next chunk
        // (it is its covering entry, kept above).
        if plan.marks.len() > 1 {
            let end = plan.end;
            let first = plan.marks.remove(0);
            plan.marks.retain(|m| m.offset < end);
            plan.marks.insert(0, first);
        }
        plan.end = plan.end.max(position);
        Ok(plan)
    }

    /// Skips entries to the first one at or after `since` (a follow from a future time):
    /// its offset, or `None` if the index has none yet (the bytes up to now were all logged
    /// before `since`).
    pub fn seek_time(&mut self, since: i64) -> io::Result<Option<u64>> {
        let Some(cursor) = self.cursor.as_mut() else {
            return Ok(None);
        };
        while let Some(entry) = cursor.peek()? {
            if entry.wall_ns() >= since {
                return Ok(Some(entry.offset()));
            }
            if let Some(IndexEntry::Time(mark)) = cursor.next()? {
                self.covering = Some(mark);
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Now;
    use crate::logfile::index::{index_path, Writer};

    const SECOND: i64 = 1_000_000_000;

    /// A day from now: later than the log files' mtimes, where the writer's clamp starts.
    fn t0() -> i64 {
        crate::clock::now().wall_ns + 86_400 * SECOND
    }

    /// Five log files of 1000 offsets each; file `i` was written at `t0 + 10 s × i + j s` at
    /// offsets `1000 i + 100 j` (j = 0, 1, 2): an entry each (a quiet second before each).
    /// File 2 has no index (logged with the index off).
    fn files(dir: &std::path::Path, t0: i64) -> Vec<OpenSegment> {
        (0..5u64)
            .map(|i| {
                let log = dir.join(format!("s.log.{i}"));
                std::fs::write(&log, vec![b'x'; 1000]).unwrap();
                let base = 1000 * i;
                let mut writer = Writer::open(&log, base, i != 2);
                writer.start_file(base);
                for j in 0..3 {
                    let seconds = 10 * i + j;
                    let now = Now {
                        wall_ns: t0 + i64::try_from(seconds).unwrap() * SECOND,
                        mono_ns: seconds * 1_000_000_000,
                    };
                    let planned = writer.plan_write(base + 100 * j, now);
                    writer.commit(&log, planned, now, true);
                }
                OpenSegment {
                    file: Arc::new(File::open(&log).unwrap()),
                    body: crate::logfile::Body::Raw,
                    start: base,
                    len: 1000,
                    file_pos: 0,
                    growable: i == 4,
                    index: File::open(index_path(&log)).ok().map(Arc::new),
                }
            })
            .collect()
    }

    #[test]
    fn a_time_is_found_in_its_file_or_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = t0();
        let segments = files(dir.path(), t0);
        assert!(segments[2].index.is_none() && segments[1].index.is_some());
        let at = |seconds: i64, nanos: i64| find(&segments, t0 + seconds * SECOND + nanos).unwrap();
        // Exactly at an entry, just after one, inside a quiet gap.
        assert_eq!(at(0, 0), Found::At(0));
        assert_eq!(at(1, 0), Found::At(100));
        assert_eq!(at(1, 1), Found::At(200));
        assert_eq!(at(12, 0), Found::At(1200));
        assert_eq!(at(30, 0), Found::At(3000));
        // After the last entry of a file: the next file's first (also across the file
        // without an index, which counts as older).
        assert_eq!(at(2, 1), Found::At(1000));
        assert_eq!(at(5, 0), Found::At(1000));
        assert_eq!(at(13, 0), Found::At(3000));
        assert_eq!(at(25, 0), Found::At(3000));
        assert_eq!(at(42, 0), Found::At(4200));
        // Before everything, after everything.
        assert_eq!(at(-1, 0), Found::Older);
        assert_eq!(at(0, -1), Found::Older);
        assert_eq!(at(42, 1), Found::Newer);
        // Only files without an index: nothing to find in the bytes.
        assert_eq!(find(&segments[2..3], t0).unwrap(), Found::Unindexed);
        assert_eq!(find(&[], t0).unwrap(), Found::Newer);
    }
}
