//! The time index of a stream: beside each log file, when its bytes were logged and what
//! happened around them (guest connected, writer changed, daemon restarted, ...), without a
//! byte of the log changing (docs/design.md, "Time index").
//!
//! Owns the index files `<stream>.log.idx` (the current file's) and `<stream>.log.N.idx`
//! (backup N's): their format ([`format`]), writing the current one ([`writer`], driven by
//! [`super::LogFile`], which renames and removes them with their logs), and reading any of
//! them ([`reader`]). It never writes a log file; an index that cannot be written costs the
//! stream its times, never a byte.
//!
//! # Format (version 1), all little-endian
//!
//! A 64-byte header:
//!
//! | off | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `CLOGIDX1` |
//! | 8 | 2 | version (1) |
//! | 10 | 2 | slot size (16) |
//! | 12 | 4 | flags (bit 0: entries imported from another node) |
//! | 16 | 8 | `base_offset`: absolute offset the log file's range starts at |
//! | 24 | 8 | `hw_start`: the stream's clamped wall-clock time at creation (ns, UTC) |
//! | 32 | 8 | `mono_start`: CLOCK_MONOTONIC ns at creation |
//! | 40 | 16 | the kernel's boot id (binary) |
//! | 56 | 4 | reserved (0) |
//! | 60 | 4 | CRC-32 of bytes 0..60 |
//!
//! then 16-byte slots (a slot never straddles a 512-byte sector):
//!
//! | off | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | `wall_ns` (i64): clamped UTC time, never below an earlier slot's |
//! | 8 | 5 | `offset - base_offset` (u40: files up to 1 TiB) |
//! | 13 | 1 | kind (bits 0–6); bit 7 `clamped`: the raw wall clock was behind `wall_ns` |
//! | 14 | 2 | low 16 bits of the CRC-32 of bytes 0..14 |
//!
//! Kinds: 0 time mark; 1 clock record (payload: raw wall ns i64, monotonic ns u64); 2–12 the
//! events of [`EventKind`] (payload: the detail, UTF-8 text, at most 256 bytes); 127
//! continuation. An entry with a payload is its head slot followed by
//! `ceil((2 + len) / 13)` continuation slots whose bytes 0..13 carry `len` (u16) then the
//! payload (byte 13 is the continuation kind, 14..16 its check). An entry is appended with one
//! `write`, so a process crash cannot tear it; a torn tail (power cut, or a crash between the
//! log write and the index write) is found by walking back over slots whose check fails, heads
//! with time 0, entries missing continuation slots, and heads whose offset or time is below
//! the previous head's: the writer cuts it at open, readers ignore it.
//!
//! # When entries are written
//!
//! At a log write if it is the first write into this log file, or at least 1 s (monotonic)
//! passed since the previous write (a burst after quiet) or since the last entry, or at least
//! 100 ms passed since the last entry while writes come less than 100 ms apart and 2 KiB were
//! logged since it. So a byte's time lies in `[t, t + 100 ms)` of the mark covering it while
//! output is continuous at 20 KiB/s or more, `[t, t + 1 s)` otherwise, and is exact for the
//! first byte after a quiet second; continuous output costs the index under 1% of its bytes
//! at any rate. Events are entries too. A clock record is written with a file's first entry and whenever
//! `wall - monotonic` moved more than 10 ms since the last one; it serves as the time mark of
//! its write. A wall clock more than 1 ms behind the highest stored time writes a
//! `clock stepped` event; stored times stay at that highest time (with the `clamped` bit) until
//! the clock catches up, so an index is ordered by offset and by time.

mod format;
mod reader;
pub(crate) mod writer;

pub use format::EventKind;
pub use reader::{IndexCursor, IndexEntry, IndexEvent, IndexFile, TimeMark};
pub use writer::index_path;
pub(crate) use writer::{remove_orphans, start_detail, Planned, StartKind, Writer};

#[cfg(test)]
mod tests;
