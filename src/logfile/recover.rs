//! Where a stream's offsets resume when its log is opened: what the position record and the
//! current file say after a clean stop, a crash at any step of a rotation, or a power cut.
//!
//! Owns that decision only. It is pure (the record, the current file's inode and length, the
//! backups' total and the boot id in; offsets and gaps out) and never touches the file system.
//! The rules rely on the order in which [`super::LogFile`] writes and syncs (its module docs).

use super::gaps::Gaps;
use super::record::{boot_id, Position};

/// Where the offsets resume.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Resumed {
    /// Offset of the current file's range.
    pub start: u64,
    /// Offset of the next byte.
    pub end: u64,
    pub gaps: Gaps,
}

/// Resumes from `found` (the record, if any) and the current file (`inode`, `len` bytes);
/// `backups` sums the backups' sizes when there is no record (a stream from before records).
pub(crate) fn resume(
    found: Option<&Position>,
    inode: u64,
    len: u64,
    backups: impl FnOnce() -> u64,
) -> Resumed {
    resume_on(found, inode, len, backups, boot_id())
}

fn resume_on(
    found: Option<&Position>,
    inode: u64,
    len: u64,
    backups: impl FnOnce() -> u64,
    boot: &str,
) -> Resumed {
    let Some(r) = found else {
        let start = backups();
        return Resumed {
            start,
            end: start + len,
            gaps: Gaps::default(),
        };
    };
    let mut gaps = r.gaps.clone();
    // The record describes this file, unless a rotation was under way and the file is empty:
    // then it is the new file, even with the unlinked file's inode (nothing is written to a
    // new file before the record naming it is saved).
    let (start, mut end) = if r.inode == inode && (r.next_start.is_none() || len > 0) {
        let counted = r
            .end
            .saturating_sub(r.start)
            .saturating_sub(gaps.within(r.start, r.end));
        if len >= counted {
            // Bytes written after the save (a crash: the page cache kept them) follow its end.
            (r.start, r.end + (len - counted))
        } else {
            // A power cut took the file's tail: those offsets are a gap, never reused.
            let lost_from = gaps
                .pieces(r.end, counted - len)
                .and_then(|p| p.first().map(|p| p.start))
                .unwrap_or(r.start);
            gaps.insert(lost_from, r.end);
            (r.start, r.end)
        }
    } else {
        // A rotation's new file, or one made behind our back: it follows every offset recorded.
        let start = r.next_start.unwrap_or(0).max(r.start).max(r.end);
        (start, start + len)
    };
    if !r.boot.is_empty() && r.boot != boot && r.reserved > end {
        // The machine restarted: offsets up to the reservation may have been handed out for
        // bytes a power cut lost. They are a gap, never given again.
        gaps.insert(end, r.reserved);
        end = r.reserved;
    }
    Resumed { start, end, gaps }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "this boot";

    fn record(inode: u64, start: u64, next_start: Option<u64>, end: u64) -> Position {
        Position {
            inode,
            start,
            next_start,
            end,
            reserved: end + 4096,
            boot: BOOT.into(),
            ..Position::default()
        }
    }

    fn resumed(found: &Position, inode: u64, len: u64) -> (u64, u64, Vec<(u64, u64)>) {
        let r = resume_on(Some(found), inode, len, || panic!("no scan"), BOOT);
        (r.start, r.end, r.gaps.iter().map(|g| (g.0, g.1)).collect())
    }

    #[test]
    fn every_step_of_a_rotation_is_recognised() {
        // Before the record of the rotation: the full file, as recorded.
        assert_eq!(
            resumed(&record(7, 0, None, 4000), 7, 4096),
            (0, 4096, vec![])
        );
        // Recorded, not moved yet: still the old file.
        assert_eq!(
            resumed(&record(7, 0, Some(4096), 4096), 7, 4096),
            (0, 4096, vec![])
        );
        // Moved; the new file has another inode, or the unlinked file's one and no byte.
        assert_eq!(
            resumed(&record(7, 0, Some(4096), 4096), 9, 0),
            (4096, 4096, vec![])
        );
        assert_eq!(
            resumed(&record(7, 0, Some(4096), 4096), 7, 0),
            (4096, 4096, vec![])
        );
        // Created and recorded, bytes written after: they follow.
        assert_eq!(
            resumed(&record(9, 4096, None, 4096), 9, 10),
            (4096, 4106, vec![])
        );
    }

    #[test]
    fn a_power_cut_never_moves_offsets_back() {
        // The file lost its last 1000 bytes: a gap up to the recorded end.
        assert_eq!(
            resumed(&record(7, 0, None, 3000), 7, 2000),
            (0, 3000, vec![(2000, 3000)])
        );
        // Another boot: the offsets go on after the reservation.
        let mut found = record(7, 0, None, 3000);
        found.boot = "an earlier boot".into();
        assert_eq!(resumed(&found, 7, 3000), (0, 7096, vec![(3000, 7096)]));
        // A record from before reservations: no jump.
        found.reserved = 0;
        assert_eq!(resumed(&found, 7, 3000), (0, 3000, vec![]));
    }

    #[test]
    fn a_file_made_behind_our_back_follows_every_recorded_offset() {
        // Another inode and no rotation under way: someone replaced the file. Its bytes take
        // offsets after the recorded end, never the recorded ones.
        assert_eq!(
            resumed(&record(7, 0, None, 4000), 9, 10),
            (4000, 4010, vec![])
        );
        // A rotation was under way and the new file already holds bytes.
        assert_eq!(
            resumed(&record(7, 0, Some(4096), 4096), 9, 10),
            (4096, 4106, vec![])
        );
    }

    #[test]
    fn without_a_record_the_backups_tell_the_start() {
        let r = resume_on(None, 7, 10, || 8192, BOOT);
        assert_eq!((r.start, r.end), (8192, 8202));
    }
}
