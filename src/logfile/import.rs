//! Logging bytes imported from another node at the offsets they had there (docs/design.md,
//! "Live migration").
//!
//! Owns the log-side steps of an import: a stream that starts at the source's first imported
//! offset (its offsets below are history's leading gap, as if rotated away), bytes appended at
//! their source offsets (what this log already has is passed over, so an import that resumes
//! or a guest that migrates back imports only what is missing), ranges the source could not
//! give (a gap, counted as dropped), and the source's time marks and events, rebuilt in this
//! log's time index at the same offsets with the source's times (the index's clamp keeps them
//! in order). It never reads a socket and never decides when an import ends (the stream's
//! actor and [`crate::migration`] do).

use super::{index, LogFile};
use crate::clock::{self, Now};
use index::EventKind;
use std::io::{self, ErrorKind, Write};

/// A time the source's index gave an offset: (offset, ns since the Unix epoch).
pub(crate) type Mark = (u64, i64);

impl LogFile {
    /// Marks this log as the target of an import: its owner holds the guest's output back
    /// until the import ends, at most `switchover` once the guest is there.
    pub(crate) fn begin_import(&mut self, switchover: std::time::Duration) {
        self.import_pending = Some(switchover);
    }

    /// The switchover timeout of an import that is to run into this log (once).
    pub(crate) fn take_import(&mut self) -> Option<std::time::Duration> {
        self.import_pending.take()
    }

    /// The time `unix_nanos` from another node's clock, with this node's monotonic clock (the
    /// index spaces entries by it).
    fn imported_time(unix_nanos: i64) -> Now {
        Now {
            wall_ns: unix_nanos,
            mono_ns: clock::now().mono_ns,
        }
    }

    /// Moves the end to `offset` (not below it): a new, empty stream starts there (what lies
    /// below is history's leading gap); a stream with bytes gets a gap, counted as dropped.
    /// Returns the offsets given to the gap.
    pub(crate) fn import_skip_to(&mut self, offset: u64) -> u64 {
        if offset <= self.end {
            return 0;
        }
        let empty = self.size == 0
            && self.index.len() == 0
            && self.segments().iter().all(|s| s.len == 0)
            && self.gaps.is_empty();
        if empty {
            if let Err(e) = self.reserve(offset) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot reserve offsets");
            }
            self.start = offset;
            self.end = offset;
            self.index.start_file(offset);
            if let Err(e) = self.save_position(None) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot record the imported start");
            }
            return 0;
        }
        let n = offset - self.end;
        self.skip(n);
        n
    }

    /// Logs the source's bytes `data` at its offset `offset`, with the times `marks` of the
    /// source's index inside them. What this log already has is passed over; a start past the
    /// end is a gap first ([`Self::import_skip_to`]). Returns (bytes logged, bytes dropped):
    /// what the file system refuses takes its offsets as a gap, as for any write.
    pub(crate) fn import_data(
        &mut self,
        offset: u64,
        data: &[u8],
        marks: &[Mark],
    ) -> (usize, usize) {
        let mut dropped = usize::try_from(self.import_skip_to(offset)).unwrap_or(usize::MAX);
        let skip = usize::try_from(self.end.saturating_sub(offset)).unwrap_or(usize::MAX);
        if skip >= data.len() {
            return (0, dropped);
        }
        let mut at = offset + skip as u64;
        let mut rest = &data[skip..];
        let mut logged = 0;
        let (first, last) = (at, at + rest.len() as u64);
        let mut marks = marks
            .iter()
            .filter(|(m, _)| *m >= first && *m < last)
            .peekable();
        while !rest.is_empty() {
            // The mark at this very offset goes into the index before the byte.
            while let Some(&(_, ns)) = marks.next_if(|(m, _)| *m <= at) {
                self.import_mark(ns);
            }
            let until = marks.peek().map_or(rest.len(), |(m, _)| {
                usize::try_from(m - at).unwrap_or(rest.len())
            });
            let piece = &rest[..until];
            let mut wrote = 0;
            if let Err(e) = self.append_imported(piece, &mut wrote) {
                tracing::debug!(path = %self.path.display(), error = %e, "imported write failed");
                let lost = piece.len() - wrote;
                self.skip(lost as u64);
                dropped += lost;
            }
            logged += wrote;
            at += piece.len() as u64;
            rest = &rest[until..];
        }
        (logged, dropped)
    }

    /// Appends `data` with no index entry of this node's clock (the source's marks give the
    /// times), rotating whenever the current file is full; adds to `logged` what was written.
    fn append_imported(&mut self, mut data: &[u8], logged: &mut usize) -> io::Result<()> {
        while !data.is_empty() {
            let room = self.make_room()?;
            let reserve = self.index.write_reserve();
            let room = room.saturating_sub(reserve).max(1);
            let n = usize::try_from(room).map_or(data.len(), |room| room.min(data.len()));
            self.reserve(self.end + n as u64)?;
            let file = self.file.as_mut().expect("make_room opened the file");
            let written = file.write(&data[..n])?;
            if written == 0 {
                return Err(io::Error::new(
                    ErrorKind::WriteZero,
                    "log file accepted no bytes",
                ));
            }
            self.size += written as u64;
            self.end += written as u64;
            *logged += written;
            data = &data[written..];
        }
        Ok(())
    }

    /// An index entry at the end offset with the source's time `unix_nanos`.
    fn import_mark(&mut self, unix_nanos: i64) {
        let now = Self::imported_time(unix_nanos);
        let planned = self.index.plan_mark(self.end, now);
        if planned.len() > self.pair_room() {
            self.index
                .skipped(&self.path, "no room left for an imported time mark");
            return;
        }
        self.index.commit(&self.path, planned, now, false);
    }

    /// The source's event `kind` at the end offset, with its time and detail.
    pub(crate) fn import_event(&mut self, kind: EventKind, unix_nanos: i64, detail: &str) {
        let now = Self::imported_time(unix_nanos);
        let planned = self.index.plan_event(self.end, now, kind, detail);
        if planned.len() > self.pair_room() {
            self.index
                .skipped(&self.path, "no room left for an imported event");
            return;
        }
        self.index.commit(&self.path, planned, now, false);
    }

    /// This node's own event about the import (MIGRATED_IN), always recorded when there is
    /// room (not subject to the event rate: one per import).
    pub(crate) fn note_import_event(&mut self, kind: EventKind, detail: &str) {
        let now = clock::now();
        let planned = self.index.plan_event(self.end, now, kind, detail);
        if planned.len() > self.pair_room() {
            self.index
                .skipped(&self.path, "no room left for the migration event");
            return;
        }
        self.index.commit(&self.path, planned, now, false);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{LogFile, LogLimits};
    use crate::config::LogMode;

    fn log_in(dir: &std::path::Path) -> LogFile {
        let limits = LogLimits {
            max_size: 64 << 10,
            max_backups: 2,
            mode: LogMode::Rotate,
            compress: crate::logfile::Compression::None,
            max_age: 0,
        };
        let mut log = LogFile::open(&dir.join("s.log"), &dir.join("s.pos"), limits).unwrap();
        log.set_time_index(true);
        log
    }

    fn bytes_of(log: &LogFile) -> Vec<(u64, Vec<u8>)> {
        log.segments()
            .into_iter()
            .filter(|s| s.len > 0)
            .map(|s| {
                let all = std::fs::read(&s.path).unwrap();
                let from = usize::try_from(s.file_pos).unwrap();
                let len = usize::try_from(s.len).unwrap();
                (s.start, all[from..from + len].to_vec())
            })
            .collect()
    }

    #[test]
    fn an_import_starts_at_the_sources_offset_and_passes_over_what_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_in(dir.path());
        assert_eq!(
            log.import_data(1000, b"abcdef", &[(1000, 5), (1003, 7)]),
            (6, 0)
        );
        assert_eq!(log.end_offset(), 1006);
        // Again from before the end (a resumed import): only what is new is logged.
        assert_eq!(log.import_data(1004, b"efgh", &[]), (2, 0));
        assert_eq!(log.import_data(1000, b"ab", &[]), (0, 0));
        assert_eq!(bytes_of(&log), [(1000, b"abcdefgh".to_vec())]);
        assert_eq!(log.dropped(), 0, "the leading offsets are no drop");
        // A range the source could not give is a gap.
        assert_eq!(log.import_data(1010, b"xy", &[]), (2, 2));
        assert_eq!(log.end_offset(), 1012);
        assert_eq!(log.dropped(), 2);
        let segments = bytes_of(&log);
        assert_eq!(segments.last().unwrap(), &(1010, b"xy".to_vec()));
        // Reopened: the offsets are where the import left them.
        drop(log);
        let log = log_in(dir.path());
        assert_eq!(log.end_offset(), 1012);
    }
}
