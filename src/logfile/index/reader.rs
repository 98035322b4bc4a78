//! Reading an index file: time lookups by binary search and entries in order.
//!
//! Owns [`IndexFile`] and [`IndexCursor`]. It reads with `pread` on a descriptor the stream's
//! actor opened (never by path, so rotation never tears its view) and never writes. It is
//! tolerant: an invalid header means "no index", a torn tail or garbage past the last good slot
//! is ignored, never a panic. Memory is bounded: a lookup holds a few slots, a cursor one 4 KiB
//! page and one pending entry.

use super::format::{
    continuations_needed, decode_slot, good_slots, payload_of, EventKind, Header, Slot,
    HEADER_BYTES, HEADER_LEN, KIND_CLOCK, KIND_TIME, MAX_CONTINUATIONS, SLOT,
};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// The time of the byte at `offset` (and of every byte after it up to the next mark).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeMark {
    /// Absolute offset.
    pub offset: u64,
    /// Clamped wall-clock time, ns since the Unix epoch (UTC): never below an earlier mark's.
    pub wall_ns: i64,
    /// The wall clock had stepped back: the true time was earlier than `wall_ns`
    /// (docs/design.md, "Time index").
    pub approximate: bool,
}

/// Something that happened before the byte at `offset` (`offset` = the stream's end then).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEvent {
    pub kind: EventKind,
    pub offset: u64,
    pub wall_ns: i64,
    /// What the event says ("restarted after a crash", a writer's label, a byte count, ...).
    pub detail: String,
}

/// One entry of an index, in offset order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexEntry {
    Time(TimeMark),
    Event(IndexEvent),
}

impl IndexEntry {
    /// Absolute offset the entry is at.
    pub fn offset(&self) -> u64 {
        match self {
            IndexEntry::Time(m) => m.offset,
            IndexEntry::Event(e) => e.offset,
        }
    }

    /// Its (clamped) wall-clock time.
    pub fn wall_ns(&self) -> i64 {
        match self {
            IndexEntry::Time(m) => m.wall_ns,
            IndexEntry::Event(e) => e.wall_ns,
        }
    }
}

/// A read-only view of one log file's index.
#[derive(Clone, Debug)]
pub struct IndexFile {
    file: Arc<File>,
    header: Header,
}

impl IndexFile {
    /// `None` if the file is empty or its header is invalid.
    pub fn open(file: Arc<File>) -> io::Result<Option<IndexFile>> {
        let mut b = [0u8; HEADER_BYTES];
        match read_exact_or_short(&file, HEADER_BYTES, 0, &mut b)? {
            n if n < HEADER_BYTES => Ok(None),
            _ => Ok(Header::decode(&b).map(|header| IndexFile { file, header })),
        }
    }

    /// Absolute offset of the log file's first byte.
    pub fn base_offset(&self) -> u64 {
        self.header.base_offset
    }

    /// The stream's (clamped) time when the file was created, ns UTC.
    pub fn first_time(&self) -> i64 {
        self.header.hw_start
    }

    /// The newest slot's time.
    pub fn last_time(&self) -> io::Result<Option<i64>> {
        let n = self.slots()?;
        if n == 0 {
            return Ok(None);
        }
        Ok(self.head_at_or_before(n - 1, n)?.map(|(_, s)| s.wall_ns))
    }

    /// First time mark whose time is `>= wall_ns` (binary search, O(log n) preads).
    pub fn first_at_or_after(&self, wall_ns: i64) -> io::Result<Option<TimeMark>> {
        let n = self.slots()?;
        let at = self.partition(n, |s| s.wall_ns >= wall_ns)?;
        Ok(self.head_from(at, n)?.map(|(_, s)| self.mark(&s)))
    }

    /// The time of the byte at `offset`: the last time mark with `mark.offset <= offset`.
    pub fn mark_at(&self, offset: u64) -> io::Result<Option<TimeMark>> {
        let n = self.slots()?;
        let Some(delta) = offset.checked_sub(self.base_offset()) else {
            return Ok(None);
        };
        let after = self.partition(n, |s| s.delta > delta)?;
        if after == 0 {
            return Ok(None);
        }
        Ok(self
            .head_at_or_before(after - 1, n)?
            .map(|(_, s)| self.mark(&s)))
    }

    /// Entries (marks and events) in order with `offset >= from`, read forward in 4 KiB
    /// pages. Entries appended later (the current file's index grows) are seen as they come.
    pub fn cursor(&self, from: u64) -> io::Result<IndexCursor> {
        let n = self.slots()?;
        let delta = from.saturating_sub(self.base_offset());
        let at = self.partition(n, |s| s.delta >= delta)?;
        Ok(IndexCursor {
            index: self.clone(),
            next_slot: at,
            page: Vec::new(),
            page_first: at,
            pending: None,
        })
    }

    fn mark(&self, s: &Slot) -> TimeMark {
        TimeMark {
            offset: self.base_offset() + s.delta,
            wall_ns: s.wall_ns,
            approximate: s.clamped,
        }
    }

    /// Good slots after the header now.
    fn slots(&self) -> io::Result<u64> {
        let len = self.file.metadata()?.len();
        let slots = len.saturating_sub(HEADER_LEN) / SLOT;
        good_slots(slots, &mut |pos, buf| {
            self.file.read_exact_at(buf, HEADER_LEN + pos)
        })
    }

    fn slot(&self, i: u64) -> io::Result<Option<Slot>> {
        let mut b = [0u8; 16];
        self.file.read_exact_at(&mut b, HEADER_LEN + i * SLOT)?;
        Ok(decode_slot(&b))
    }

    /// The head slot of the entry slot `i` belongs to (stepping back over continuations).
    fn head_at_or_before(&self, i: u64, n: u64) -> io::Result<Option<(u64, Slot)>> {
        let mut j = i.min(n.saturating_sub(1));
        loop {
            match self.slot(j)? {
                Some(s) if !s.is_continuation() => return Ok(Some((j, s))),
                _ if j == 0 || i - j > MAX_CONTINUATIONS => return Ok(None),
                _ => j -= 1,
            }
        }
    }

    /// The first head slot at or after slot `i` (below `n`).
    fn head_from(&self, i: u64, n: u64) -> io::Result<Option<(u64, Slot)>> {
        for j in i..n.min(i + MAX_CONTINUATIONS + 1) {
            if let Some(s) = self.slot(j)? {
                if !s.is_continuation() {
                    return Ok(Some((j, s)));
                }
            }
        }
        Ok(None)
    }

    /// The first slot index `i` such that every head slot at or after `i` satisfies `pred`
    /// and none before does (`pred` is monotone over heads: times and offsets never go back).
    fn partition(&self, n: u64, pred: impl Fn(&Slot) -> bool) -> io::Result<u64> {
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.head_at_or_before(mid, n)? {
                Some((h, s)) if pred(&s) => hi = h.max(lo),
                _ => lo = mid + 1,
            }
        }
        Ok(lo)
    }
}

/// Reads entries forward from a position; see [`IndexFile::cursor`].
#[derive(Debug)]
pub struct IndexCursor {
    index: IndexFile,
    /// The next slot to decode.
    next_slot: u64,
    /// Slots read ahead (raw), starting at slot `page_first`.
    page: Vec<u8>,
    page_first: u64,
    pending: Option<IndexEntry>,
}

/// Slots per page read.
const PAGE_SLOTS: u64 = 256;

impl IndexCursor {
    /// The next entry without consuming it.
    pub fn peek(&mut self) -> io::Result<Option<&IndexEntry>> {
        if self.pending.is_none() {
            self.pending = self.decode_next()?;
        }
        Ok(self.pending.as_ref())
    }

    /// The next entry; `None` at the (current) end of the index.
    #[allow(
        clippy::should_implement_trait,
        reason = "fallible, and it may return Some again after None as the index grows"
    )]
    pub fn next(&mut self) -> io::Result<Option<IndexEntry>> {
        match self.pending.take() {
            Some(e) => Ok(Some(e)),
            None => self.decode_next(),
        }
    }

    /// The slot at `i`, reading a page if needed; `None` past what the file holds now.
    fn slot(&mut self, i: u64) -> io::Result<Option<Option<Slot>>> {
        let in_page = i >= self.page_first && (i - self.page_first) * SLOT < self.page.len() as u64;
        if !in_page {
            self.page
                .resize(usize::try_from(PAGE_SLOTS * SLOT).unwrap_or(4096), 0);
            let n = read_exact_or_short(
                &self.index.file,
                self.page.len(),
                HEADER_LEN + i * SLOT,
                &mut self.page,
            )?;
            self.page.truncate(n - n % 16);
            self.page_first = i;
            if self.page.is_empty() {
                return Ok(None);
            }
        }
        let at = usize::try_from((i - self.page_first) * SLOT).unwrap_or(0);
        Ok(Some(decode_slot(&self.page[at..at + 16])))
    }

    fn decode_next(&mut self) -> io::Result<Option<IndexEntry>> {
        loop {
            let i = self.next_slot;
            let Some(slot) = self.slot(i)? else {
                return Ok(None);
            };
            // A slot that does not check or a stray continuation: torn or damaged, skipped.
            let Some(head) = slot.filter(|s| !s.is_continuation() && s.wall_ns != 0) else {
                self.next_slot += 1;
                continue;
            };
            let offset = self.index.base_offset() + head.delta;
            if head.kind == KIND_TIME {
                self.next_slot += 1;
                return Ok(Some(IndexEntry::Time(TimeMark {
                    offset,
                    wall_ns: head.wall_ns,
                    approximate: head.clamped,
                })));
            }
            // An entry with a payload: all its continuation slots, or wait for them (the
            // writer appends an entry in one write; a reader may see it before it is whole).
            let Some(first) = self.slot(i + 1)? else {
                return Ok(None);
            };
            let Some(first) = first.filter(Slot::is_continuation) else {
                self.next_slot += 1;
                continue;
            };
            let needed = continuations_needed(&first);
            let mut continuations = vec![first];
            for k in 1..needed {
                match self.slot(i + 1 + k)? {
                    None => return Ok(None),
                    Some(Some(s)) if s.is_continuation() => continuations.push(s),
                    Some(_) => break,
                }
            }
            if (continuations.len() as u64) < needed {
                self.next_slot += 1;
                continue;
            }
            self.next_slot = i + 1 + needed;
            let Some(kind) = EventKind::from_code(head.kind) else {
                // Clock records (and kinds of a newer version) are not shown; a clock record
                // still tells the time of its offset.
                if head.kind == KIND_CLOCK {
                    return Ok(Some(IndexEntry::Time(TimeMark {
                        offset,
                        wall_ns: head.wall_ns,
                        approximate: head.clamped,
                    })));
                }
                continue;
            };
            let detail = String::from_utf8_lossy(&payload_of(&continuations)).into_owned();
            return Ok(Some(IndexEntry::Event(IndexEvent {
                kind,
                offset,
                wall_ns: head.wall_ns,
                detail,
            })));
        }
    }
}

/// `pread` of up to `len` bytes at `pos`: how many were read (short only at the end).
fn read_exact_or_short(file: &File, len: usize, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..len], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
