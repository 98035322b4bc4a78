//! Ranges of a stream's absolute offsets that hold no bytes, and where a file's bytes sit among
//! them.
//!
//! Owns [`Gaps`]: a sorted list of disjoint offset ranges that were handed out but never
//! written (the disk refused the bytes, a rotation could not open its new file, or a power cut
//! lost bytes the position record had counted). A file's bytes fill the offsets between the
//! gaps, so mapping a file to offsets only needs where its range ends, its length and the gaps
//! ([`Gaps::pieces`]). Pure bookkeeping: it never touches the file system.

use serde::{Deserialize, Serialize};

/// A gap: offsets `.0` (inclusive) to `.1` (exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Gap(pub u64, pub u64);

/// A contiguous run of a file's bytes: absolute offsets `start .. start + len` are the file's
/// bytes `file_pos .. file_pos + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub start: u64,
    pub file_pos: u64,
    pub len: u64,
}

/// Sorted, disjoint, non-adjacent gaps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Gaps(Vec<Gap>);

impl Gaps {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The gaps, oldest first.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Gap> {
        self.0.iter()
    }

    /// Marks `from .. to` as a gap, merging it with the gaps it touches.
    pub(crate) fn insert(&mut self, from: u64, to: u64) {
        if from >= to {
            return;
        }
        self.0.push(Gap(from, to));
        self.0.sort_by_key(|g| g.0);
        let mut merged: Vec<Gap> = Vec::with_capacity(self.0.len());
        for gap in self.0.drain(..) {
            match merged.last_mut() {
                Some(last) if gap.0 <= last.1 => last.1 = last.1.max(gap.1),
                _ => merged.push(gap),
            }
        }
        self.0 = merged;
    }

    /// Offsets of gaps inside `from .. to`.
    pub(crate) fn within(&self, from: u64, to: u64) -> u64 {
        self.0
            .iter()
            .map(|g| g.1.min(to).saturating_sub(g.0.max(from)))
            .sum()
    }

    /// Forgets the gaps that end at or before `offset` (nothing on disk is older than them).
    pub(crate) fn forget_before(&mut self, offset: u64) {
        self.0.retain(|g| g.1 > offset);
    }

    /// Where the `len` bytes of a file whose range ends at `end` sit, oldest first: walking
    /// back from `end`, the gaps are skipped. `None` if that would go below offset 0 (a file
    /// larger than the offsets before it: a state no crash of this code leaves).
    pub(crate) fn pieces(&self, end: u64, len: u64) -> Option<Vec<Piece>> {
        let mut pieces = Vec::new();
        let mut cursor = end;
        let mut remaining = len;
        for gap in self.0.iter().rev() {
            if remaining == 0 {
                break;
            }
            if gap.0 >= cursor {
                continue;
            }
            let data_from = gap.1.min(cursor);
            let data = cursor - data_from;
            if data >= remaining {
                break;
            }
            if data > 0 {
                pieces.push((data_from, data));
                remaining -= data;
            }
            cursor = gap.0;
        }
        if remaining > 0 {
            pieces.push((cursor.checked_sub(remaining)?, remaining));
        }
        pieces.reverse();
        let mut file_pos = 0;
        Some(
            pieces
                .into_iter()
                .map(|(start, len)| {
                    let piece = Piece {
                        start,
                        file_pos,
                        len,
                    };
                    file_pos += len;
                    piece
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(start: u64, file_pos: u64, len: u64) -> Piece {
        Piece {
            start,
            file_pos,
            len,
        }
    }

    #[test]
    fn inserted_gaps_merge() {
        let mut gaps = Gaps::default();
        gaps.insert(10, 20);
        gaps.insert(30, 40);
        gaps.insert(20, 25);
        assert_eq!(gaps.0, vec![Gap(10, 25), Gap(30, 40)]);
        gaps.insert(24, 31);
        assert_eq!(gaps.0, vec![Gap(10, 40)]);
        gaps.insert(5, 5);
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps.within(0, 100), 30);
        assert_eq!(gaps.within(15, 35), 20);
        gaps.forget_before(40);
        assert!(gaps.is_empty());
    }

    #[test]
    fn forgetting_keeps_the_gaps_that_end_after_the_offset() {
        let mut gaps = Gaps::default();
        gaps.insert(10, 20);
        gaps.insert(30, 40);
        gaps.forget_before(20);
        assert_eq!(gaps.0, vec![Gap(30, 40)], "a gap ending at the offset goes");
        gaps.forget_before(39);
        assert_eq!(gaps.0, vec![Gap(30, 40)], "a gap ending after it stays");
    }

    #[test]
    fn pieces_skip_gaps() {
        let mut gaps = Gaps::default();
        assert_eq!(gaps.pieces(100, 10), Some(vec![piece(90, 0, 10)]));
        assert_eq!(gaps.pieces(100, 0), Some(vec![]));
        assert_eq!(gaps.pieces(5, 10), None);
        // A file holding offsets 60..70, 75..90 and 95..100 (gaps 70..75 and 90..95).
        gaps.insert(70, 75);
        gaps.insert(90, 95);
        assert_eq!(
            gaps.pieces(100, 30),
            Some(vec![piece(60, 0, 10), piece(75, 10, 15), piece(95, 25, 5)])
        );
        // The file before it ends at 60: the gaps are younger and do not touch it.
        assert_eq!(gaps.pieces(60, 10), Some(vec![piece(50, 0, 10)]));
        // A file whose range ends inside the trailing gap of the older one.
        assert_eq!(gaps.pieces(93, 5), Some(vec![piece(85, 0, 5)]));
        // Exactly the bytes after a gap.
        assert_eq!(gaps.pieces(100, 5), Some(vec![piece(95, 0, 5)]));
    }
}
