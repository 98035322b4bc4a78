//! Writing the index of a stream's current log file: when an entry is due, the clamp of a
//! wall clock that steps back, events, and recovery of the file at open.
//!
//! Owns [`Writer`], the state [`super::super::LogFile`] keeps for its index: a few numbers, no
//! path (the log's gives it) and no descriptor (each append is open + one `write` + close, docs/design.md "Time index"). It
//! never touches a log file and never fails a log write: an index write that fails is counted
//! ([`Writer::take_failures`]) and logged rate-limited, and the log goes on without it.

use super::format::{
    decode_slot, entry, good_slots, EventKind, Header, HEADER_LEN, KIND_CLOCK, KIND_TIME,
    MAX_CONTINUATIONS, SLOT,
};
use crate::clock::Now;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Quiet time after which the next write gets an entry, and longest time between entries.
const QUIET_NS: u64 = 1_000_000_000;
/// Spacing of entries while output is continuous (writes less than this apart).
const CONTINUOUS_NS: u64 = 100_000_000;
/// Bytes logged since the last entry before continuous output gets another one at
/// [`CONTINUOUS_NS`]: an entry (16 bytes) then covers at least 2 KiB, so continuous output at
/// any rate costs the index under 1% of its bytes (below 20 KiB/s entries come each second).
const CONTINUOUS_BYTES: u64 = 2048;
/// A wall clock this far behind the highest time stored is a step back (an event).
const STEP_NS: i64 = 1_000_000;
/// `wall - mono` moving this much since the last clock record writes a new one.
const DRIFT_NS: i64 = 10_000_000;
/// Events a stream may record at once, and per second after that: a client taking and
/// leaving the writer lease in a loop must not fill the index (and so shorten the history the
/// cap keeps) faster than this.
const EVENT_BURST: u64 = 20;
const EVENTS_PER_SECOND: u64 = 5;
/// How many indexes past the last backup are looked for as orphans at open (a crash leaves
/// at most the ones of the backups it was removing).
const ORPHAN_SCAN: u32 = 20;
/// Longest detail of a `clock stepped` event (bytes).
const STEP_DETAIL: usize = 64;
/// The most bytes one log write adds to the index: a header, a `clock stepped` event and a
/// clock record (which is then the write's entry).
pub(crate) const WRITE_ENTRY_MAX: u64 = HEADER_LEN
    + SLOT * (1 + (2 + STEP_DETAIL as u64).div_ceil(super::format::CONTINUATION_PAYLOAD as u64))
    + 3 * SLOT;

/// `<log>.idx` for a log file (current or backup) at `log`.
pub fn index_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".idx");
    PathBuf::from(name)
}

/// How the daemon came to (re)open a stream's log, for the `daemon started` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StartKind {
    /// A start of a new process (or the first start); becomes "restarted after a crash" when
    /// the index does not end with a `daemon stopped`.
    Fresh,
    /// An in-place upgrade (SIGUSR1).
    Upgraded,
    /// A takeover (`--takeover`).
    TakenOver,
    /// The same process again, after an upgrade or takeover it started failed.
    Resumed,
}

/// The index state of one stream's current log file.
#[derive(Debug)]
pub(crate) struct Writer {
    /// Whether entries are written (`logs.time_index`).
    enabled: bool,
    /// Absolute offset the current log file starts at (its index's `base_offset`).
    base: u64,
    /// Bytes in the current index file (0: it does not exist yet).
    len: u64,
    /// Highest wall-clock time stored: stored times never go below it.
    hw: i64,
    /// Monotonic time of the last entry in the current file (`None`: none yet).
    last_entry: Option<u64>,
    /// Offset of the last entry in the current file.
    last_entry_offset: u64,
    /// Monotonic time of the last log write.
    last_write: Option<u64>,
    /// `wall - mono` at the last clock record.
    clock_offset: Option<i64>,
    /// Inside the catch-up window after a backwards step (a `clock stepped` was written).
    stepped: bool,
    /// The current index ended with `daemon stopped` when it was opened.
    ended_stopped: bool,
    /// Events that may still be recorded now (see [`Writer::admit_event`]), and when the
    /// budget was last refilled (monotonic ns).
    event_budget: u64,
    budget_at: u64,
    /// Index writes that failed, not yet reported.
    failures: u64,
}

/// The bytes one index append writes, and the state it leaves.
#[derive(Debug, Default)]
pub(crate) struct Planned {
    pub bytes: Vec<u8>,
    /// Offset of the entry.
    offset: u64,
    hw: i64,
    clock_offset: Option<i64>,
    stepped: bool,
    entry: bool,
}

impl Planned {
    pub(crate) fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
}

impl Writer {
    /// The index of the current log file `log` (starting at offset `start`), recovered: a torn
    /// tail is cut, an index left by a crash mid-rotation is moved to `.1.idx` or removed,
    /// and the clamp resumes from the newest time stored. Indexes of removed backups are
    /// [`remove_orphans`]' to remove.
    pub(crate) fn open(log: &Path, start: u64, enabled: bool) -> Self {
        let mut writer = Self {
            enabled,
            base: start,
            len: 0,
            hw: i64::MIN,
            last_entry: None,
            last_entry_offset: 0,
            last_write: None,
            clock_offset: None,
            stepped: false,
            ended_stopped: false,
            event_budget: EVENT_BURST,
            budget_at: 0,
            failures: 0,
        };
        if let Err(e) = writer.recover(log) {
            writer.failed(log, "cannot recover the time index", &e);
        }
        writer
    }

    fn recover(&mut self, log: &Path) -> io::Result<()> {
        let path = index_path(log);
        if let Some(tail) = self.open_tail(&path)? {
            if tail.header.base_offset != self.base {
                // Left by a crash between moving `.log` to `.log.1` and moving its index.
                let one = index_path(&super::super::backup_path(log, 1));
                if tail.header.base_offset < self.base
                    && !one.exists()
                    && super::super::backup_path(log, 1).exists()
                {
                    fs::rename(&path, &one)?;
                } else {
                    fs::remove_file(&path)?;
                }
                self.len = 0;
            } else {
                self.len = tail.len;
                self.ended_stopped = tail.last_event == Some(EventKind::DaemonStopped);
                self.hw = tail.last_time.unwrap_or(tail.header.hw_start);
                return Ok(());
            }
        }
        // No current index: the newest backup's, else the log file's mtime.
        let one = index_path(&super::super::backup_path(log, 1));
        if let Ok(Some(tail)) = read_tail(&one) {
            self.hw = tail.last_time.unwrap_or(tail.header.hw_start);
            return Ok(());
        }
        if let Ok(meta) = fs::metadata(log) {
            if meta.len() > 0 {
                self.hw = meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec();
            }
        }
        Ok(())
    }

    /// Opens the current index for writing, cuts its torn tail (or removes it if its header
    /// is unreadable) and returns what it ends with.
    fn open_tail(&mut self, path: &Path) -> io::Result<Option<Tail>> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(tail) = tail_of(&file)? else {
            drop(file);
            fs::remove_file(path)?;
            return Ok(None);
        };
        if file.metadata()?.len() != tail.len {
            file.set_len(tail.len)?;
        }
        Ok(Some(tail))
    }

    /// Bytes of the current index file.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Room a log file keeps for the entries of its next write (nothing when off): a read
    /// cut at the room left is then never followed by a rotation before its write.
    pub(crate) fn write_reserve(&self) -> u64 {
        if self.enabled {
            WRITE_ENTRY_MAX
        } else {
            0
        }
    }

    /// Whether entries are written.
    #[cfg(test)]
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns writing entries on or off (`logs.time_index`).
    pub(crate) fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// The current index ended with `daemon stopped` when it was opened.
    pub(crate) fn ended_stopped(&self) -> bool {
        self.ended_stopped
    }

    /// A new current log file starting at `base` (after a rotation): its index is created
    /// at its first entry, and its first write gets one.
    pub(crate) fn start_file(&mut self, base: u64) {
        self.base = base;
        self.len = 0;
        self.last_entry = None;
        self.clock_offset = None;
    }

    /// Failures not yet reported; resets the count.
    pub(crate) fn take_failures(&mut self) -> u64 {
        std::mem::take(&mut self.failures)
    }

    /// What a log write at `offset` now adds to the index (nothing, most of the time):
    /// docs/design.md "Time index" for the rule.
    pub(crate) fn plan_write(&self, offset: u64, now: Now) -> Planned {
        if !self.enabled {
            return Planned::default();
        }
        let since = |t: Option<u64>| t.map_or(u64::MAX, |t| now.mono_ns.saturating_sub(t));
        let due = self.last_entry.is_none()
            || since(self.last_write) >= QUIET_NS
            || since(self.last_entry) >= QUIET_NS
            || (since(self.last_entry) >= CONTINUOUS_NS
                && since(self.last_write) < CONTINUOUS_NS
                && offset.saturating_sub(self.last_entry_offset) >= CONTINUOUS_BYTES);
        if !due {
            // No entry: `commit` reads nothing else of it.
            return Planned::default();
        }
        self.plan(offset, now, None)
    }

    /// An entry at `offset` with the time `now` whether or not one is due: a time mark
    /// imported from another node's index (docs/design.md, "Live migration").
    pub(crate) fn plan_mark(&self, offset: u64, now: Now) -> Planned {
        if !self.enabled {
            return Planned::default();
        }
        self.plan(offset, now, None)
    }

    /// Whether an event of `kind` may be recorded now: at most [`EVENT_BURST`] at once and
    /// [`EVENTS_PER_SECOND`] after that, so what clients can trigger cannot fill the index. The
    /// daemon's own starts and stops are always recorded (they are rare, and tell a restart
    /// after a crash from one after a stop).
    pub(crate) fn admit_event(&mut self, kind: EventKind, now: Now) -> bool {
        if matches!(kind, EventKind::DaemonStarted | EventKind::DaemonStopped) {
            return true;
        }
        let earned = now.mono_ns.saturating_sub(self.budget_at) * EVENTS_PER_SECOND / 1_000_000_000;
        if earned > 0 {
            self.event_budget = (self.event_budget + earned).min(EVENT_BURST);
            self.budget_at = now.mono_ns;
        }
        if self.event_budget == 0 {
            return false;
        }
        self.event_budget -= 1;
        true
    }

    /// What recording `kind` at `offset` now adds to the index.
    pub(crate) fn plan_event(
        &self,
        offset: u64,
        now: Now,
        kind: EventKind,
        detail: &str,
    ) -> Planned {
        if !self.enabled {
            return Planned::default();
        }
        self.plan(offset, now, Some((kind, detail)))
    }

    /// The header if the file is new, a clock record or step event if due, then the entry.
    fn plan(&self, offset: u64, now: Now, event: Option<(EventKind, &str)>) -> Planned {
        let mut bytes = Vec::new();
        let hw = self.hw.max(now.wall_ns);
        let clamped = now.wall_ns < hw;
        let delta = offset.saturating_sub(self.base);
        if self.len == 0 {
            bytes.extend_from_slice(
                &Header {
                    flags: 0,
                    base_offset: self.base,
                    hw_start: hw,
                    mono_start: now.mono_ns,
                    boot: super::format::boot_bytes(super::super::record::boot_id()),
                }
                .encode(),
            );
        }
        let mut stepped = self.stepped && clamped;
        if !self.stepped && now.wall_ns < hw - STEP_NS {
            let mut detail = format!(
                "wall clock stepped back {} (to {})",
                seconds(hw - now.wall_ns),
                now.wall_ns
            );
            // ASCII: any cut is on a character boundary.
            detail.truncate(STEP_DETAIL);
            bytes.extend(entry(
                hw,
                delta,
                EventKind::ClockStepped.code(),
                true,
                detail.as_bytes(),
            ));
            stepped = true;
        }
        let offset_now = now.wall_ns.saturating_sub_unsigned(now.mono_ns);
        let clock_due = self.len == 0
            || self
                .clock_offset
                .is_none_or(|c| (offset_now - c).abs() > DRIFT_NS)
            || stepped != self.stepped;
        let mut clock_offset = self.clock_offset;
        if clock_due {
            let mut payload = [0u8; 16];
            payload[0..8].copy_from_slice(&now.wall_ns.to_le_bytes());
            payload[8..16].copy_from_slice(&now.mono_ns.to_le_bytes());
            bytes.extend(entry(hw, delta, KIND_CLOCK, clamped, &payload));
            clock_offset = Some(offset_now);
        }
        match event {
            Some((kind, detail)) => bytes.extend(entry(
                hw,
                delta,
                kind.code(),
                clamped,
                super::format::cut_detail(detail).as_bytes(),
            )),
            // A clock record is an entry of its own.
            None if !clock_due => bytes.extend(entry(hw, delta, KIND_TIME, clamped, &[])),
            None => {}
        }
        Planned {
            bytes,
            offset,
            hw,
            clock_offset,
            stepped,
            entry: true,
        }
    }

    /// Appends what `plan` holds (one `write`), after the log write it was planned for (if
    /// `wrote`), and takes the state it leaves. A failure is counted, never returned.
    pub(crate) fn commit(&mut self, log: &Path, planned: Planned, now: Now, wrote: bool) {
        if wrote {
            self.last_write = Some(now.mono_ns);
        }
        if !planned.entry {
            return;
        }
        self.hw = planned.hw;
        self.stepped = planned.stepped;
        self.clock_offset = planned.clock_offset;
        self.last_entry = Some(now.mono_ns);
        self.last_entry_offset = planned.offset;
        if planned.bytes.is_empty() {
            return;
        }
        let path = index_path(log);
        match self.append(&path, &planned.bytes) {
            Ok(()) => self.len += planned.len(),
            Err(e) => {
                self.failed(log, "cannot write the time index", &e);
                // The next entry starts the file again (or after what is there).
                // Only a regular file is an index (a directory in its place is not).
                self.len = super::super::files::index_len(log);
                if self.len > 0
                    && (self.len < HEADER_LEN || !(self.len - HEADER_LEN).is_multiple_of(SLOT))
                {
                    let cut = if self.len < HEADER_LEN {
                        0
                    } else {
                        self.len - (self.len - HEADER_LEN) % SLOT
                    };
                    if OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(cut))
                        .is_ok()
                    {
                        self.len = cut;
                    }
                }
                if self.len == 0 {
                    let _ = fs::remove_file(&path);
                    self.clock_offset = None;
                }
            }
        }
    }

    fn append(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut options = OpenOptions::new();
        if self.len == 0 {
            // A new index; anything left at its path (by a failed write) is not this file's.
            options.write(true).truncate(true);
        } else {
            options.append(true);
        }
        let mut file = options
            .create(true)
            .mode(0o640)
            .custom_flags(rustix::fs::OFlags::CLOEXEC.bits().cast_signed())
            .open(path)?;
        file.write_all(bytes)
    }

    /// Counts an entry left out (no room in the pair), logged rate-limited.
    pub(crate) fn skipped(&mut self, log: &Path, why: &str) {
        self.failures += 1;
        crate::limited!(debug, log = %log.display(), "time index entry left out: {why}");
    }

    fn failed(&mut self, log: &Path, what: &str, e: &io::Error) {
        self.failures += 1;
        crate::limited!(warn, index = %index_path(log).display(), error = %e, "{what}");
    }
}

/// `1.5s`, for event details.
fn seconds(ns: i64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

/// What an index file holds at its end.
#[derive(Debug)]
struct Tail {
    header: Header,
    /// Length of its good part (header and whole entries).
    len: u64,
    last_time: Option<i64>,
    last_event: Option<EventKind>,
}

fn read_tail(path: &Path) -> io::Result<Option<Tail>> {
    match File::open(path) {
        Ok(file) => tail_of(&file),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The header and the last whole entry of `file`; `None` if the header is unreadable.
fn tail_of(file: &File) -> io::Result<Option<Tail>> {
    let len = file.metadata()?.len();
    let mut b = [0u8; super::format::HEADER_BYTES];
    if len < HEADER_LEN {
        return Ok(None);
    }
    file.read_exact_at(&mut b, 0)?;
    let Some(header) = Header::decode(&b) else {
        return Ok(None);
    };
    let slots = (len - HEADER_LEN) / SLOT;
    let good = good_slots(slots, &mut |pos, buf| {
        file.read_exact_at(buf, HEADER_LEN + pos)
    })?;
    let mut tail = Tail {
        header,
        len: HEADER_LEN + good * SLOT,
        last_time: None,
        last_event: None,
    };
    // The last entry: its head is at most MAX_CONTINUATIONS slots back.
    let from = good.saturating_sub(MAX_CONTINUATIONS + 1);
    let mut buf = vec![0u8; usize::try_from((good - from) * SLOT).unwrap_or(0)];
    file.read_exact_at(&mut buf, HEADER_LEN + from * SLOT)?;
    let slots: Vec<_> = buf.chunks(16).filter_map(decode_slot).collect();
    if let Some(head) = slots.iter().rposition(|s| !s.is_continuation()) {
        tail.last_time = Some(slots[head].wall_ns);
        tail.last_event = EventKind::from_code(slots[head].kind);
    }
    Ok(Some(tail))
}

/// Removes the indexes of backups past the last one (`backups` of them are left): a crash
/// between removing the oldest backups and their indexes leaves them.
pub(crate) fn remove_orphans(log: &Path, backups: u32) -> io::Result<()> {
    for n in backups + 1..=backups + ORPHAN_SCAN {
        match fs::remove_file(index_path(&super::super::backup_path(log, n))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `DaemonStarted`'s detail for a start of kind `kind` (`crashed`: the index did not end with
/// a clean stop).
pub(crate) fn start_detail(kind: StartKind, crashed: bool) -> String {
    let what = match kind {
        StartKind::Fresh if crashed => "restarted after a crash",
        StartKind::Fresh => "started",
        StartKind::Upgraded => "upgraded",
        StartKind::TakenOver => "taken over",
        StartKind::Resumed => "resumed after a failed hand-over",
    };
    format!("{what} (conlogd {})", env!("CARGO_PKG_VERSION"))
}
