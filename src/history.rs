//! Reading a stream's bytes back from its files on disk by absolute offset: `ReadHistory`.
//!
//! Owns start-position resolution (`from_offset`, `tail_bytes`, `tail_lines`, and `since_time`
//! through [`by_time`]), walking the rotated files that hold a run of offsets, UTF-8
//! boundaries, following a stream live, and, for a read by time, the times, index entries and
//! events that go with the bytes and where `until_time` ends a read (docs/design.md, "History
//! by time"). It knows a stream only through its [`LogHandle`] (never the registry, a pipe or a
//! console). It only reads; it never writes, renames or deletes a log file or an index, and it
//! never holds more than one chunk per reader in memory (plus, for a read by time, one 4 KiB
//! page of the index, and a small bounded queue towards the client). A read that asks for no
//! time never reads an index and gets exactly the chunks it got before the index existed. The
//! console's replay reads its own segments ([`crate::logfile::read_tail`]).
//!
//! Consistency under rotation: a reader never opens log files by path itself. It asks the
//! stream's actor for [`OpenSegment`]s, descriptors opened by the actor between two of its own
//! writes, each with the exact offset range it held then. Those descriptors stay valid through
//! any later rotation or truncation (a renamed or unlinked file keeps its data while open), so a
//! chunk is never torn or mixed. When a reader has read all it holds it asks again from its
//! position; if the oldest file offered starts after that position, the bytes in between were
//! rotated away meanwhile and the reader reports exactly that gap.
//!
//! Offsets the daemon handed out without logging their bytes (disk full, a rotation that could
//! not open its file, a power cut: see [`crate::logfile`]) are gaps too: the actor's segments
//! skip them, and the reader reports them like rotated-away ranges, so a client's offsets,
//! `dropped_bytes` and history agree (docs/operations.md, "Durability").

use crate::log_owner::{LogError, LogHandle};
use crate::logfile::{OpenSegment, SegmentError};
use by_time::{Found, Plan, Times};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use thiserror::Error;
use tokio::sync::mpsc;

mod by_time;

/// What a history read refuses or fails at. The mapping to status codes is `crate::error`'s.
#[derive(Debug, Error)]
pub enum HistoryError {
    /// A start offset past the end of a read that does not follow.
    #[error(
        "from_offset {offset} is beyond the end of the stream ({end}); use follow to wait for it"
    )]
    BeyondEnd { offset: u64, end: u64 },
    /// A `since_time` after everything logged, in a read that does not follow.
    #[error(
        "nothing was logged at or after since_time {since} (the newest byte is older); use \
         follow to wait for it"
    )]
    AfterNewest { since: String },
    /// A time asked of a stream whose files have no time index.
    #[error(
        "this stream has no time index (logs.time_index is off for it, or its bytes were logged \
         by a conlogd without one): read it by offset"
    )]
    NoTimeIndex,
    /// The stream's actor stopped while the daemon goes away (shutdown or upgrade): the client
    /// resumes from `position` later.
    #[error("conlogd is going away; resume with from_offset {position}")]
    GoingAway { position: u64 },
    /// The stream's actor could not open its files for the reader (or is gone).
    #[error("cannot open the stream's files")]
    Open(#[source] LogError),
    /// Reading an open log file failed; `context` says what was being done.
    #[error("{context}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What history reads return.
pub type Result<T, E = HistoryError> = std::result::Result<T, E>;

fn io_error(context: &'static str) -> impl FnOnce(io::Error) -> HistoryError {
    move |source| HistoryError::Io { context, source }
}

/// Where a history read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The oldest byte still on disk.
    Oldest,
    /// An exact absolute offset (resume).
    Offset(u64),
    /// The last N bytes.
    TailBytes(u64),
    /// The last N lines, counting `\n` (a final line without one counts too).
    TailLines(u64),
    /// The first byte logged at or after this time (ns since the Unix epoch, UTC), found in
    /// the time index (docs/design.md, "Time index").
    Time(i64),
}

/// A history read.
#[derive(Clone, Copy, Debug)]
pub struct HistoryRequest {
    pub start: Start,
    pub follow: bool,
    /// Stop after this many bytes.
    pub limit: Option<u64>,
    /// Largest chunk.
    pub chunk_size: usize,
    /// Cut chunks at UTF-8 character boundaries where possible (for text rendering).
    pub utf8_boundaries: bool,
    /// Stop before the first byte logged after this time (ns, UTC); a follow ends when the
    /// wall clock passes it.
    pub until: Option<i64>,
    /// One line per chunk (a line longer than a chunk: several).
    pub lines: bool,
    /// Index events as their own items, in order with the bytes.
    pub events: bool,
    /// Every index entry that gives a time to a chunk's bytes, with the chunk.
    pub marks: bool,
    /// The time of each chunk's first byte.
    pub times: bool,
}

impl HistoryRequest {
    /// Whether any time feature is asked for: only then is the index read (and only then do
    /// items carry times), so that other reads stay exactly what they were.
    pub fn timed(&self) -> bool {
        matches!(self.start, Start::Time(_))
            || self.until.is_some()
            || self.lines
            || self.events
            || self.marks
            || self.times
    }
}

/// The time of a byte, from the index entry covering it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Time {
    /// The offset of the entry (at or before the byte).
    pub offset: u64,
    /// Nanoseconds since the Unix epoch, UTC (clamped: never below an earlier entry's).
    pub unix_nanos: i64,
    /// Written while the wall clock was behind a time already recorded (a backwards step).
    pub approximate: bool,
}

/// Something the index recorded between two bytes of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The on-disk kind code (the same numbers as `HistoryEvent.Kind`).
    pub kind: u8,
    /// It happened before the byte at this offset was logged.
    pub offset: u64,
    pub unix_nanos: i64,
    pub detail: String,
}

/// One item of a history stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryItem {
    /// Offsets `from .. to` are no longer on disk; `reason` says why when it is not a
    /// rotation (or bytes never logged): empty otherwise.
    Gap { from: u64, to: u64, reason: String },
    /// Bytes at an absolute offset; with a timed request, the time of the first byte (when
    /// the index knows it) and, with `marks`, the entries giving times to the bytes: the one
    /// covering the first byte, then those inside.
    Data {
        offset: u64,
        data: Vec<u8>,
        time: Option<Time>,
        marks: Vec<Time>,
    },
    /// An index event (with `events`).
    Event(Event),
}

/// Chunks buffered towards a slow client before the reader waits. One: a reader that stops
/// reading costs a fixed amount (this chunk, the one it waits to send, the one being encoded),
/// and HTTP/2 flow control holds the rest back on disk, not in memory.
const QUEUE: usize = 1;

/// Starts a history read of the stream whose log `actor` owns. Errors about the start position
/// are returned here, before anything is streamed.
pub async fn read(
    actor: LogHandle,
    request: HistoryRequest,
    going_away: tokio::sync::watch::Receiver<bool>,
) -> Result<mpsc::Receiver<Result<HistoryItem>>> {
    let offsets = actor.offsets.clone();
    let dropped_seen = actor.stats.dropped.load(Relaxed);
    let segments = actor.open_segments(0).await.map_err(HistoryError::Open)?;
    // The published end may lie past the last byte on disk (bytes that could not be logged).
    let end = segments
        .last()
        .map_or(0, |s| s.start + s.len)
        .max(*offsets.borrow());
    let first = segments.first().map_or(end, |s| s.start);
    // A follow from a time nothing was logged at yet: from the end, once an entry reaches it.
    let mut since_pending = None;
    let position = match request.start {
        Start::Oldest => first,
        Start::Offset(offset) if offset > end && !request.follow => {
            return Err(HistoryError::BeyondEnd { offset, end })
        }
        Start::Offset(offset) => offset,
        Start::TailBytes(n) => end.saturating_sub(n).max(first),
        Start::TailLines(n) => {
            tail_lines_start(&segments, n).map_err(|e| HistoryError::Open(LogError::Io(e)))?
        }
        Start::Time(t) => {
            match by_time::find(&segments, t).map_err(io_error("cannot read a time index"))? {
                Found::At(offset) => offset.clamp(first, end),
                Found::Older => first,
                Found::Newer if request.follow => {
                    since_pending = Some(t);
                    end
                }
                Found::Newer => return Err(HistoryError::AfterNewest { since: rfc3339(t) }),
                Found::Unindexed => return Err(HistoryError::NoTimeIndex),
            }
        }
    };
    let until_passed = request
        .until
        .is_some_and(|until| until <= crate::clock::now().wall_ns);
    let (sender, receiver) = mpsc::channel(QUEUE);
    let reader = Reader {
        actor,
        offsets,
        segments: first_needed(segments, position, request.timed()),
        last: None,
        times: Times::default(),
        since: match request.start {
            Start::Time(t) => Some(t),
            _ => None,
        },
        since_pending,
        until_passed,
        dropped_seen,
        going_away,
        position,
        remaining: request.limit.unwrap_or(u64::MAX),
        request,
        sender,
    };
    tokio::spawn(reader.run());
    Ok(receiver)
}

struct Reader {
    actor: LogHandle,
    offsets: tokio::sync::watch::Receiver<u64>,
    segments: VecDeque<OpenSegment>,
    /// The last file read to its end, kept open in case it grows.
    last: Option<OpenSegment>,
    /// The index of the file being read (timed requests only).
    times: Times,
    /// The request's `since_time`: events before it are not sent.
    since: Option<i64>,
    /// A follow from a time nothing had been logged at: bytes are passed over until the
    /// index reaches it.
    since_pending: Option<i64>,
    /// The wall clock passed `until`: a follow ends at the end of what is logged.
    until_passed: bool,
    /// The stream's dropped count when the segments were asked for: if it changed, a gap may
    /// follow them, and growth of `last` is not contiguous.
    dropped_seen: u64,
    /// Set when the daemon is about to hand over (upgrade): end with "come back".
    going_away: tokio::sync::watch::Receiver<bool>,
    position: u64,
    remaining: u64,
    request: HistoryRequest,
    sender: mpsc::Sender<Result<HistoryItem>>,
}

/// What [`Reader::send_event_at`] did.
enum Sent {
    Nothing,
    Event,
    ClientGone,
}

impl Reader {
    async fn run(mut self) {
        if let Err(e) = self.pump().await {
            let _ = self.sender.send(Err(e)).await;
        }
    }

    /// Sends the next event the index holds at `position`, if any (the `events` option decides
    /// which are sent, `since` passes over older ones). Takes the fields it needs, not `self`:
    /// the caller holds the current segment.
    async fn send_event_at(
        times: &mut Times,
        sender: &mpsc::Sender<Result<HistoryItem>>,
        position: u64,
        request: &HistoryRequest,
        since: Option<i64>,
    ) -> Result<Sent> {
        let event = times
            .before(position, request.events, since)
            .map_err(io_error("cannot read a time index"))?;
        let Some(event) = event else {
            return Ok(Sent::Nothing);
        };
        if sender.send(Ok(HistoryItem::Event(event))).await.is_err() {
            return Ok(Sent::ClientGone);
        }
        Ok(Sent::Event)
    }

    /// Streams until the limit, the end (without follow), the client leaving, or the stream
    /// going away.
    async fn pump(&mut self) -> Result<()> {
        while self.remaining > 0 {
            if *self.going_away.borrow() {
                return self.stream_stopped().map(|_| ());
            }
            let Some(segment) = self.segments.front() else {
                if !self.refill().await? {
                    return Ok(());
                }
                continue;
            };
            let seg_end = segment.start + segment.len;
            let timed = self.request.timed();
            if timed && self.position >= segment.start {
                self.times
                    .enter(segment, self.position)
                    .map_err(io_error("cannot read a time index"))?;
                if let Some(since) = self.since_pending.filter(|_| self.position < seg_end) {
                    if segment.index.is_none() {
                        // Bytes without times cannot be placed after `since`.
                        return Err(HistoryError::NoTimeIndex);
                    }
                    match self
                        .times
                        .seek_time(since)
                        .map_err(io_error("cannot read a time index"))?
                    {
                        Some(offset) => {
                            self.since_pending = None;
                            self.position = self.position.max(offset);
                        }
                        // Logged before `since`, all of it: passed over.
                        None => self.position = seg_end,
                    }
                    continue;
                }
                match Self::send_event_at(
                    &mut self.times,
                    &self.sender,
                    self.position,
                    &self.request,
                    self.since,
                )
                .await?
                {
                    Sent::Nothing => {}
                    Sent::Event => continue,
                    Sent::ClientGone => return Ok(()),
                }
            }
            if self.position >= seg_end {
                // Keep the file open: it may still grow (it was the current one), and then the
                // next bytes come from it without asking the actor.
                self.last = self.segments.pop_front();
                continue;
            }
            if self.position < segment.start {
                // Events recorded at our position before the gap are in the index of the
                // file read so far (still followed): they come before it.
                if timed {
                    match Self::send_event_at(
                        &mut self.times,
                        &self.sender,
                        self.position,
                        &self.request,
                        self.since,
                    )
                    .await?
                    {
                        Sent::Nothing => {}
                        Sent::Event => continue,
                        Sent::ClientGone => return Ok(()),
                    }
                }
                // Our position was rotated away between two snapshots.
                let gap = HistoryItem::Gap {
                    from: self.position,
                    to: segment.start,
                    reason: String::new(),
                };
                self.position = segment.start;
                if self.sender.send(Ok(gap)).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            // At most `chunk_size`, a usize.
            let want = usize::try_from((seg_end - self.position).min(self.remaining))
                .map_or(self.request.chunk_size, |n| n.min(self.request.chunk_size));
            // A buffer per chunk, sent as it is: nothing is kept between chunks. A compressed
            // file gives at most the rest of one frame.
            let mut buffer = match segment.read_at(self.position, want) {
                Ok(buffer) => buffer,
                Err(SegmentError::Lost { from, to, reason }) => {
                    // A corrupted compressed frame: its offsets are a gap with the reason,
                    // and the read goes on after it.
                    crate::limited!(warn, reason = %reason, "history met a corrupted compressed frame: reported as a gap");
                    let to = to.max(self.position + 1).min(seg_end);
                    let gap = HistoryItem::Gap {
                        from: self.position.max(from),
                        to,
                        reason,
                    };
                    self.position = to;
                    if self.sender.send(Ok(gap)).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                Err(SegmentError::Io(e)) => return Err(io_error("cannot read a log file")(e)),
            };
            let read = buffer.len();
            if read == 0 {
                // Shorter than the actor said: cut behind our back. Ask again.
                self.segments.pop_front();
                continue;
            }
            let cut_at_file_end = self.position + read as u64 == seg_end
                && self.segments.len() == 1
                && incomplete_tail(&buffer[..read]).is_some();
            if self.request.utf8_boundaries && cut_at_file_end {
                // The character goes on in the next file: open it now (it is read next
                // anyway), so that it can be completed.
                if let Ok(next) = self.actor.open_segments(seg_end).await {
                    self.segments.extend(
                        next.into_iter()
                            .find(|s| s.start == seg_end)
                            .map(|s| without_index(s, timed)),
                    );
                }
            }
            let take = if self.request.utf8_boundaries {
                self.whole_characters(&mut buffer, seg_end)
            } else {
                read
            };
            let mut end = self.position + take as u64;
            if self.request.lines {
                if let Some(newline) = buffer[..take].iter().position(|b| *b == b'\n') {
                    end = self.position + newline as u64 + 1;
                }
            }
            let plan = if timed {
                self.times
                    .plan(
                        self.position,
                        end,
                        self.request.until,
                        self.request.events,
                        self.request.marks,
                    )
                    .map_err(io_error("cannot read a time index"))?
            } else {
                Plan {
                    end,
                    ..Plan::default()
                }
            };
            // At most `take`.
            let take = usize::try_from(plan.end - self.position).unwrap_or(take);
            if take == 0 {
                if plan.stop {
                    return Ok(());
                }
                continue;
            }
            buffer.truncate(take);
            let item = HistoryItem::Data {
                offset: self.position,
                data: buffer,
                time: plan.time,
                marks: plan.marks,
            };
            self.position += take as u64;
            self.remaining = self.remaining.saturating_sub(take as u64);
            if self.sender.send(Ok(item)).await.is_err() || plan.stop {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Adjusts a chunk of `read` bytes at our position so it ends on a character boundary: an
    /// incomplete character at the end of a file is completed from the next file (a log file
    /// can end mid-character), one in the middle of a file is left for the next chunk.
    fn whole_characters(&self, buffer: &mut Vec<u8>, seg_end: u64) -> usize {
        let read = buffer.len();
        let Some((have, missing)) = incomplete_tail(buffer) else {
            return read;
        };
        if self.position + read as u64 == seg_end {
            let next = self
                .segments
                .get(1)
                .filter(|next| next.start == seg_end && next.len >= missing as u64);
            match next {
                // Room left in this chunk: complete the character from the next file (if it
                // reads: a frame it cannot decompress leaves the character as it is).
                Some(next) if read + missing <= self.request.chunk_size => {
                    if let Ok(rest) = next.read_at(next.start, missing) {
                        if rest.len() == missing {
                            buffer.extend_from_slice(&rest);
                            return read + missing;
                        }
                    }
                    return read;
                }
                // No room: the next chunk starts with this character and completes it.
                Some(_) if read > have => return read - have,
                // The rest of the character is not written yet (or never will be).
                _ => return read,
            }
        }
        if read > have {
            read - have
        } else {
            read
        }
    }

    /// The stream's actor stopped: a removed stream ends the read; a daemon going away (shutdown
    /// or upgrade) is `UNAVAILABLE`, so the client resumes from its offset later.
    fn stream_stopped(&self) -> Result<bool> {
        if self.actor.stats.removed.load(Relaxed) {
            return Ok(false);
        }
        Err(HistoryError::GoingAway {
            position: self.position,
        })
    }

    /// The stream's end did not move, but the actor announced it: an event was noted at the
    /// live end (a guest disconnected). Sent now rather than with the next byte, from the index
    /// of the current file (asked of the actor: it may have been created by this very event).
    /// False when the client left.
    async fn events_at_the_end(&mut self) -> Result<bool> {
        let Ok(segments) = self.actor.open_segments(self.position).await else {
            // The actor stopped: the next wait says how.
            return Ok(true);
        };
        let Some(current) = segments
            .into_iter()
            .rev()
            .find(|s| s.start <= self.position && s.index.is_some())
        else {
            return Ok(true);
        };
        self.times
            .enter(&current, self.position)
            .map_err(io_error("cannot read a time index"))?;
        loop {
            match Self::send_event_at(
                &mut self.times,
                &self.sender,
                self.position,
                &self.request,
                self.since,
            )
            .await?
            {
                Sent::Nothing => return Ok(true),
                Sent::Event => {}
                Sent::ClientGone => return Ok(false),
            }
        }
    }

    /// If the file we finished has grown past our position, reads on from it: log files are
    /// append-only and a rotated or truncated-away file keeps its bytes while we hold it, so
    /// whatever the current file's last run holds beyond the length we were told is exactly the
    /// stream's next bytes, unless bytes were dropped since (then a gap may come first, and
    /// the actor is asked).
    fn grow_last(&mut self) -> Result<bool> {
        let Some(last) = self.last.as_mut().filter(|l| l.growable) else {
            return Ok(false);
        };
        // A file's index is created at its first entry: ask the actor for it.
        if self.request.timed() && last.index.is_none() {
            return Ok(false);
        }
        let len = last
            .file
            .metadata()
            .map_err(io_error("cannot stat a log file"))?
            .len()
            .saturating_sub(last.file_pos);
        // Read after the size: bytes seen above were written after any drop counted here.
        if self.actor.stats.dropped.load(Relaxed) != self.dropped_seen {
            return Ok(false);
        }
        if last.start + len <= self.position {
            return Ok(false);
        }
        last.len = len;
        self.segments
            .push_front(self.last.take().expect("checked above"));
        Ok(true)
    }

    /// Gets the files holding data from our position, waiting for new data when following.
    /// False when the read is over.
    async fn refill(&mut self) -> Result<bool> {
        loop {
            let end = *self.offsets.borrow_and_update();
            if self.position < end {
                if self.grow_last()? {
                    return Ok(true);
                }
                self.dropped_seen = self.actor.stats.dropped.load(Relaxed);
                match self.actor.open_segments(self.position).await {
                    // Something at or after our position (bytes, or the start of the current
                    // run past a gap).
                    Ok(segments) => {
                        let needed = first_needed(segments, self.position, self.request.timed());
                        if !needed.is_empty() {
                            self.segments = needed;
                            // The finished file is not needed once a newer one is open.
                            self.last = None;
                            return Ok(true);
                        }
                    }
                    Err(_) => return self.stream_stopped(),
                }
            }
            if !self.request.follow || self.until_passed {
                if self.position < end {
                    // Offsets handed out with nothing on disk yet (the log cannot be written).
                    let gap = HistoryItem::Gap {
                        from: self.position,
                        to: end,
                        reason: String::new(),
                    };
                    self.position = end;
                    let _ = self.sender.send(Ok(gap)).await;
                }
                return Ok(false);
            }
            enum Woke {
                Data,
                Stopped,
                ClientGone,
                UntilPassed,
            }
            // The wall clock passes `until` (a clock step moves it; the next wake-up checks).
            let until = self.request.until.map(|until| {
                let left = until.saturating_sub(crate::clock::now().wall_ns);
                std::time::Duration::from_nanos(u64::try_from(left).unwrap_or(0))
            });
            let woke = tokio::select! {
                changed = self.offsets.changed() => if changed.is_ok() { Woke::Data } else { Woke::Stopped },
                _ = self.sender.closed() => Woke::ClientGone,
                _ = self.going_away.wait_for(|going| *going) => Woke::Stopped,
                _ = tokio::time::sleep(until.unwrap_or_default()), if until.is_some() => Woke::UntilPassed,
            };
            match woke {
                Woke::Data => {
                    if self.request.events
                        && self.position >= *self.offsets.borrow()
                        && !self.events_at_the_end().await?
                    {
                        return Ok(false);
                    }
                }
                Woke::UntilPassed => self.until_passed = true,
                Woke::Stopped => return self.stream_stopped(),
                Woke::ClientGone => return Ok(false),
            }
        }
    }
}

/// Of the files the actor opened, the one holding `position` (or the first after it, when
/// `position` was rotated away): a reader holds one log file open at a time and asks again
/// for the next when it is done, so its descriptors do not grow with `max_backups`. A timed
/// reader also holds that file's index (two descriptors, counted as such for remote callers);
/// another lets it go.
fn first_needed(segments: Vec<OpenSegment>, position: u64, timed: bool) -> VecDeque<OpenSegment> {
    segments
        .into_iter()
        // Also true of a file that starts after `position` (rotated away).
        .find(|s| s.start + s.len > position)
        .map(|s| without_index(s, timed))
        .into_iter()
        .collect()
}

/// `segment`, holding its index only if the read is timed.
fn without_index(mut segment: OpenSegment, timed: bool) -> OpenSegment {
    if !timed {
        segment.index = None;
    }
    segment
}

/// `2026-12-05T03:12:07.123456789Z`, for messages.
fn rfc3339(unix_nanos: i64) -> String {
    ::time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_nanos))
        .ok()
        .and_then(|t| {
            t.format(&::time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix_nanos} ns"))
}

/// The offset just after the `n`-th `\n` counted back from the end (a trailing `\n` ends the
/// last line and is not counted), or the oldest offset if there are fewer lines.
fn tail_lines_start(segments: &[OpenSegment], n: u64) -> io::Result<u64> {
    let end = segments.last().map_or(0, |s| s.start + s.len);
    let first = segments.first().map_or(end, |s| s.start);
    if n == 0 {
        return Ok(end);
    }
    let mut found = 0;
    let mut skip_final_newline = true;
    let block = 64 << 10;
    for segment in segments.iter().rev() {
        let mut stop = segment.len;
        while stop > 0 {
            let start = stop.saturating_sub(block as u64);
            // A compressed file reads a frame at a time: the block is read in pieces.
            let mut bytes = Vec::with_capacity(block);
            let mut at = start;
            while at < stop {
                // At most `block`, a usize.
                let left = usize::try_from(stop - at).unwrap_or(block);
                match segment.read_at(segment.start + at, left) {
                    Ok(piece) if !piece.is_empty() => {
                        at += piece.len() as u64;
                        bytes.extend_from_slice(&piece);
                    }
                    Ok(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    // A lost frame holds no line end anyone can read: counted as none.
                    Err(SegmentError::Lost { to, .. }) => {
                        let to = (to - segment.start).clamp(at + 1, stop);
                        bytes.resize(bytes.len() + usize::try_from(to - at).unwrap_or(0), 0);
                        at = to;
                    }
                    Err(SegmentError::Io(e)) => return Err(e),
                }
            }
            for (i, byte) in bytes.iter().enumerate().rev() {
                if *byte != b'\n' {
                    skip_final_newline = false;
                    continue;
                }
                if skip_final_newline {
                    skip_final_newline = false;
                    continue;
                }
                found += 1;
                if found == n {
                    return Ok(segment.start + start + i as u64 + 1);
                }
            }
            stop = start;
        }
    }
    Ok(first)
}

/// If `data` ends inside a UTF-8 character: how many of its bytes are there and how many are
/// missing. Invalid bytes are not "incomplete": they stay as they are.
fn incomplete_tail(data: &[u8]) -> Option<(usize, usize)> {
    for have in 1..=3.min(data.len()) {
        let byte = data[data.len() - have];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: look further back for the lead byte
        }
        let needed = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return None,
        };
        return (needed > have).then_some((have, needed - have));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_characters_at_the_end() {
        assert_eq!(incomplete_tail(b"abc"), None);
        assert_eq!(incomplete_tail("aé".as_bytes()), None);
        assert_eq!(incomplete_tail(&"aé".as_bytes()[..2]), Some((1, 1)));
        assert_eq!(incomplete_tail(&"a€".as_bytes()[..3]), Some((2, 1)));
        assert_eq!(incomplete_tail(&"😀".as_bytes()[..1]), Some((1, 3)));
        assert_eq!(incomplete_tail(&[b'a', 0xFF]), None);
    }

    #[test]
    fn tail_lines_counts_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_size: 4096,
            max_backups: 3,
            mode: LogMode::Rotate,
            compress: crate::logfile::Compression::None,
            max_age: 0,
        };
        let mut log =
            LogFile::open(&dir.path().join("s.log"), &dir.path().join("s.pos"), limits).unwrap();
        let text: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        log.append(text.as_bytes()).unwrap();
        let segments = log.open_segments(0).unwrap();
        let start = usize::try_from(tail_lines_start(&segments, 3).unwrap()).unwrap();
        assert_eq!(&text[start..], "line 1997\nline 1998\nline 1999\n");
        log.append(b"partial").unwrap();
        let segments = log.open_segments(0).unwrap();
        let start = usize::try_from(tail_lines_start(&segments, 2).unwrap()).unwrap();
        let all = format!("{text}partial");
        assert_eq!(&all[start..], "line 1999\npartial");
        assert_eq!(tail_lines_start(&segments, 0).unwrap(), all.len() as u64);
        // More lines than on disk: the oldest byte.
        assert_eq!(
            tail_lines_start(&segments, 1_000_000).unwrap(),
            segments[0].start
        );
    }

    /// A log of `max_size` files in `dir` (rotating, 3 backups).
    fn log_in(dir: &std::path::Path, max_size: u64) -> LogFile {
        let limits = LogLimits {
            max_size,
            max_backups: 3,
            mode: LogMode::Rotate,
            compress: crate::logfile::Compression::None,
            max_age: 0,
        };
        LogFile::open(&dir.join("s.log"), &dir.join("s.pos"), limits).unwrap()
    }

    /// (start, len, file_pos) of what `first_needed` keeps for `position`.
    fn kept(log: &LogFile, position: u64) -> Vec<(u64, u64, u64)> {
        first_needed(log.open_segments(0).unwrap(), position, false)
            .iter()
            .map(|s| (s.start, s.len, s.file_pos))
            .collect()
    }

    #[test]
    fn a_reader_holds_the_file_of_its_position_or_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_in(dir.path(), 4096);
        log.append(&[b'x'; 10_000]).unwrap();
        // Files: 0..4096, 4096..8192, 8192..10000.
        assert_eq!(kept(&log, 0), [(0, 4096, 0)]);
        assert_eq!(kept(&log, 4095), [(0, 4096, 0)]);
        assert_eq!(kept(&log, 4096), [(4096, 4096, 0)]);
        assert_eq!(kept(&log, 9999), [(8192, 1808, 0)]);
        // At the end: nothing to read yet.
        assert_eq!(kept(&log, 10_000), []);
        // Rotated away (three backups keep 4 files of 4 KiB): the oldest file still on disk.
        log.append(&[b'y'; 8000]).unwrap();
        let oldest = log.open_segments(0).unwrap()[0].start;
        assert_eq!(oldest, 4096);
        assert_eq!(kept(&log, 100), [(4096, 4096, 0)]);
        // A position inside a gap: the segment after the gap, which starts inside its file.
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_in(dir.path(), 4096);
        log.append(&[b'a'; 100]).unwrap();
        log.skip(50);
        log.append(&[b'b'; 100]).unwrap();
        assert_eq!(kept(&log, 99), [(0, 100, 0)]);
        assert_eq!(kept(&log, 120), [(150, 100, 100)]);
        assert_eq!(kept(&log, 150), [(150, 100, 100)]);
    }

    /// Counted back across 64 KiB read blocks, and in a segment that starts inside its file
    /// (after a gap): the offset is exact.
    #[test]
    fn tail_lines_reads_back_across_blocks_and_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_in(dir.path(), 1 << 20);
        let head = "h".repeat(1000) + "\n";
        log.append(head.as_bytes()).unwrap();
        log.skip(7);
        let text: String = (0..30_000).map(|i| format!("line {i:05}\n")).collect();
        log.append(text.as_bytes()).unwrap();
        let segments = log.open_segments(0).unwrap();
        let after_gap = head.len() as u64 + 7;
        assert_eq!(segments.len(), 2);
        assert_eq!(
            (segments[1].start, segments[1].file_pos),
            (after_gap, head.len() as u64)
        );
        // 11 bytes a line: 12,000 lines are 132,000 bytes back, past two 64 KiB blocks.
        for n in [1, 5_000, 6_000, 12_000, 29_999] {
            let start = tail_lines_start(&segments, n).unwrap();
            let line = 30_000 - n;
            let expected = after_gap + 11 * line;
            assert_eq!(start, expected, "{n} lines");
            let at = usize::try_from(start - after_gap).unwrap();
            assert_eq!(&text[at..at + 11], format!("line {line:05}\n"), "{n} lines");
        }
        // The text's first line starts just after the head's newline: in the gap, which the
        // reader then reports as such.
        assert_eq!(
            tail_lines_start(&segments, 30_000).unwrap(),
            head.len() as u64
        );
        // One more: the head's line, in the segment before the gap.
        assert_eq!(tail_lines_start(&segments, 30_001).unwrap(), 0);
    }
    use crate::config::LogMode;
    use crate::logfile::{LogFile, LogLimits};

    /// The test actor's commands: the log's, and a change made to the log by the test.
    enum Own {
        Log(crate::log_owner::LogCommand),
        Change(Box<dyn FnOnce(&mut crate::log_owner::LogOwner) + Send>),
    }

    impl From<crate::log_owner::LogCommand> for Own {
        fn from(command: crate::log_owner::LogCommand) -> Self {
            Own::Log(command)
        }
    }

    /// A stream actor in this process: answers log commands and applies changes.
    fn actor(log: LogFile) -> (LogHandle, mpsc::Sender<Own>) {
        let (sender, mut commands) = mpsc::channel::<Own>(4);
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
        let (mut owner, handle) = crate::log_owner::LogOwner::new(log, metrics, sender.clone());
        tokio::spawn(async move {
            while let Some(command) = commands.recv().await {
                match command {
                    Own::Log(command) => {
                        if let Some(close) = owner.answer(command, |f| f) {
                            close.done();
                            return;
                        }
                    }
                    Own::Change(change) => {
                        change(&mut owner);
                        owner.publish();
                    }
                }
            }
        });
        (handle, sender)
    }

    /// A follower by time waiting at the end of the current file: the guest disconnects
    /// there, then bytes are dropped (a gap) and more logged. The follower gets the
    /// disconnect and the drop (recorded in the index of the file it was reading) before the
    /// gap, once each, then the bytes after it.
    #[tokio::test]
    async fn events_at_a_gap_come_before_it_once() {
        use crate::logfile::index::EventKind;
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_in(dir.path(), 1 << 20);
        log.set_time_index(true);
        log.append(b"abc\n").unwrap();
        let (handle, changes) = actor(log);
        let (_going, going_away) = tokio::sync::watch::channel(false);
        let request = HistoryRequest {
            start: Start::Oldest,
            follow: true,
            limit: None,
            chunk_size: 1024,
            utf8_boundaries: false,
            until: None,
            lines: false,
            events: true,
            marks: false,
            times: false,
        };
        let mut items = read(handle, request, going_away).await.unwrap();
        let next = |items: &mut mpsc::Receiver<Result<HistoryItem>>| {
            let item = items.try_recv();
            item.map(|i| i.unwrap())
        };
        let first = items.recv().await.unwrap().unwrap();
        assert!(
            matches!(first, HistoryItem::Data { offset: 0, .. }),
            "{first:?}"
        );
        // The reader waits at offset 4 now.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let change: Box<dyn FnOnce(&mut crate::log_owner::LogOwner) + Send> = Box::new(|owner| {
            owner.log.note_event(EventKind::GuestDisconnected, "gone");
            owner.log.skip(5);
            owner.count_moved(0, 5);
            owner.log.append(b"def\n").unwrap();
            owner.count_moved(4, 0);
        });
        assert!(changes.send(Own::Change(change)).await.is_ok());
        let mut got = Vec::new();
        while got.len() < 4 {
            let item = tokio::time::timeout(std::time::Duration::from_secs(10), items.recv())
                .await
                .unwrap_or_else(|_| panic!("the follower stopped after {got:?}"))
                .unwrap()
                .unwrap();
            got.push(item);
        }
        let kinds: Vec<String> = got
            .iter()
            .map(|i| match i {
                HistoryItem::Event(e) => format!("event {} at {}", e.kind, e.offset),
                HistoryItem::Gap { from, to, .. } => format!("gap {from}..{to}"),
                HistoryItem::Data { offset, data, .. } => {
                    format!("data {offset} {}", String::from_utf8_lossy(data))
                }
            })
            .collect();
        assert_eq!(
            kinds,
            [
                format!("event {} at 4", EventKind::GuestDisconnected as u8),
                format!("event {} at 4", EventKind::BytesDropped as u8),
                "gap 4..9".to_owned(),
                "data 9 def\n".to_owned(),
            ]
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(next(&mut items).is_err(), "nothing more, nothing twice");

        // The same file given again (new descriptors, after bytes and a drop at its end): an
        // event already sent at the position it is entered again at is not sent twice.
        let change: Box<dyn FnOnce(&mut crate::log_owner::LogOwner) + Send> = Box::new(|owner| {
            owner.log.append(b"ghi\n").unwrap();
            owner.log.note_event(EventKind::GuestConnected, "back");
            owner.count_moved(4, 0);
        });
        assert!(changes.send(Own::Change(change)).await.is_ok());
        // The reader reads 13..17 and sends `guest connected` at 17 (it waits there then).
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let change: Box<dyn FnOnce(&mut crate::log_owner::LogOwner) + Send> = Box::new(|owner| {
            owner.log.append(b"jkl\n").unwrap();
            owner.log.skip(2);
            owner.count_moved(4, 2);
        });
        // A drop: the reader asks the actor again, and gets the file again from 17.
        assert!(changes.send(Own::Change(change)).await.is_ok());
        let mut got = Vec::new();
        while got.len() < 4 {
            let item = tokio::time::timeout(std::time::Duration::from_secs(10), items.recv())
                .await
                .unwrap_or_else(|_| panic!("the follower stopped after {got:?}"))
                .unwrap()
                .unwrap();
            got.push(item);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        while let Ok(item) = next(&mut items) {
            got.push(item);
        }
        let connected = got
            .iter()
            .filter(
                |i| matches!(i, HistoryItem::Event(e) if e.kind == EventKind::GuestConnected as u8),
            )
            .count();
        assert_eq!(connected, 1, "{got:?}");
    }
}
