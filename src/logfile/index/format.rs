//! The bytes of an index file: header, slots, events and where a torn tail ends.
//!
//! Owns encoding and decoding only (the layout is in the parent module's doc); it never opens,
//! writes or truncates a file. Decoding never panics on any input: a slot that does not check
//! is reported as such, never trusted.

use std::io;

/// `CLOGIDX1`.
pub(crate) const MAGIC: &[u8; 8] = b"CLOGIDX1";
pub(crate) const VERSION: u16 = 1;
/// Bytes of the header (4 slots).
pub(crate) const HEADER_BYTES: usize = 64;
/// The same as a file length.
pub(crate) const HEADER_LEN: u64 = HEADER_BYTES as u64;
/// Bytes of a slot.
pub(crate) const SLOT: u64 = 16;
/// Payload bytes carried by one continuation slot (bytes 0..13; 13 is the kind, 14..16 check).
pub(crate) const CONTINUATION_PAYLOAD: usize = 13;
/// Longest event detail (bytes); longer labels are cut on a character boundary.
pub(crate) const MAX_DETAIL: usize = 256;
/// Continuation slots of the longest event: `ceil((2 + 256) / 13)`.
pub(crate) const MAX_CONTINUATIONS: u64 = 20;
/// Largest offset a slot can hold relative to its file's base (u40): files up to 1 TiB.
pub(crate) const MAX_DELTA: u64 = (1 << 40) - 1;
/// Header flag: entries imported from another node (their times come from its clock).
#[allow(dead_code, reason = "reserved for importing history from another node")]
pub(crate) const FLAG_IMPORTED: u32 = 1;

/// Kind code of a plain time entry.
pub(crate) const KIND_TIME: u8 = 0;
/// Kind code of a clock record (payload: raw wall i64, monotonic u64).
pub(crate) const KIND_CLOCK: u8 = 1;
/// Kind code of a continuation slot.
pub(crate) const KIND_CONTINUATION: u8 = 127;
/// Bit 7 of the kind byte: the raw wall clock was behind the stored (clamped) time.
pub(crate) const CLAMPED: u8 = 0x80;

/// What happened at an offset of a stream, recorded in its index (kind codes 2–12 on disk).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventKind {
    GuestConnected = 2,
    GuestDisconnected = 3,
    WriterChanged = 4,
    PipeOpened = 5,
    PipeClosed = 6,
    DaemonStarted = 7,
    DaemonStopped = 8,
    BytesDropped = 9,
    ClockStepped = 10,
    MigratedIn = 11,
    MigratedOut = 12,
}

impl EventKind {
    /// Every kind, in code order.
    pub const ALL: [EventKind; 11] = [
        EventKind::GuestConnected,
        EventKind::GuestDisconnected,
        EventKind::WriterChanged,
        EventKind::PipeOpened,
        EventKind::PipeClosed,
        EventKind::DaemonStarted,
        EventKind::DaemonStopped,
        EventKind::BytesDropped,
        EventKind::ClockStepped,
        EventKind::MigratedIn,
        EventKind::MigratedOut,
    ];

    /// How history names it: "guest connected", ...
    pub fn name(self) -> &'static str {
        match self {
            EventKind::GuestConnected => "guest connected",
            EventKind::GuestDisconnected => "guest disconnected",
            EventKind::WriterChanged => "writer changed",
            EventKind::PipeOpened => "pipe opened",
            EventKind::PipeClosed => "pipe closed",
            EventKind::DaemonStarted => "daemon started",
            EventKind::DaemonStopped => "daemon stopped",
            EventKind::BytesDropped => "bytes dropped",
            EventKind::ClockStepped => "clock stepped",
            EventKind::MigratedIn => "migrated in",
            EventKind::MigratedOut => "migrated out",
        }
    }

    /// The on-disk kind code (also the proto's `HistoryEvent.Kind` number).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The kind of code `code`, if it is an event.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// The header of an index file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub flags: u32,
    /// Absolute offset the log file's range starts at.
    pub base_offset: u64,
    /// The stream's (clamped) wall-clock time when the file was created, ns UTC.
    pub hw_start: i64,
    /// CLOCK_MONOTONIC ns when the file was created.
    pub mono_start: u64,
    /// The kernel's boot id, binary.
    pub boot: [u8; 16],
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&16u16.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.base_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.hw_start.to_le_bytes());
        b[32..40].copy_from_slice(&self.mono_start.to_le_bytes());
        b[40..56].copy_from_slice(&self.boot);
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header in `b`, or `None` if it is not one this version reads.
    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; HEADER_BYTES] = b.get(..HEADER_BYTES)?.try_into().ok()?;
        let crc = u32::from_le_bytes(b[60..64].try_into().ok()?);
        if &b[0..8] != MAGIC
            || u16::from_le_bytes([b[8], b[9]]) != VERSION
            || u16::from_le_bytes([b[10], b[11]]) != 16
            || crc32fast::hash(&b[0..60]) != crc
        {
            return None;
        }
        Some(Self {
            flags: u32::from_le_bytes(b[12..16].try_into().ok()?),
            base_offset: u64::from_le_bytes(b[16..24].try_into().ok()?),
            hw_start: i64::from_le_bytes(b[24..32].try_into().ok()?),
            mono_start: u64::from_le_bytes(b[32..40].try_into().ok()?),
            boot: b[40..56].try_into().ok()?,
        })
    }
}

/// The binary form of a boot id as the kernel prints it (`xxxxxxxx-xxxx-…`): 16 bytes, zero
/// if it cannot be parsed.
pub(crate) fn boot_bytes(id: &str) -> [u8; 16] {
    let hex: Vec<u8> = id.bytes().filter(u8::is_ascii_hexdigit).collect();
    let mut out = [0u8; 16];
    if hex.len() != 32 {
        return out;
    }
    for (i, pair) in hex.chunks(2).enumerate() {
        let digit = |c: u8| char::from(c).to_digit(16).unwrap_or(0);
        // Two hex digits: at most 255.
        out[i] = u8::try_from(digit(pair[0]) * 16 + digit(pair[1])).unwrap_or(0);
    }
    out
}

/// One decoded slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    pub wall_ns: i64,
    /// Offset relative to the file's base.
    pub delta: u64,
    /// Kind code (bits 0–6).
    pub kind: u8,
    pub clamped: bool,
    /// The raw bytes 0..13 (a continuation's payload).
    pub raw: [u8; 16],
}

impl Slot {
    pub(crate) fn is_continuation(&self) -> bool {
        self.kind == KIND_CONTINUATION
    }
}

/// Low 16 bits of the CRC-32 of bytes 0..14.
fn check(b: &[u8]) -> u16 {
    // Truncation intended: the check is the low 16 bits.
    #[allow(clippy::cast_possible_truncation)]
    let low = crc32fast::hash(&b[0..14]) as u16;
    low
}

fn seal(mut b: [u8; 16]) -> [u8; 16] {
    let c = check(&b);
    b[14..16].copy_from_slice(&c.to_le_bytes());
    b
}

/// A head slot (time entry, clock record or event).
pub(crate) fn head_slot(wall_ns: i64, delta: u64, kind: u8, clamped: bool) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&wall_ns.to_le_bytes());
    b[8..13].copy_from_slice(&delta.min(MAX_DELTA).to_le_bytes()[0..5]);
    b[13] = (kind & 0x7f) | if clamped { CLAMPED } else { 0 };
    seal(b)
}

/// Decodes a slot; `None` if its check fails.
pub(crate) fn decode_slot(b: &[u8]) -> Option<Slot> {
    let b: [u8; 16] = b.get(..16)?.try_into().ok()?;
    if u16::from_le_bytes([b[14], b[15]]) != check(&b) {
        return None;
    }
    let mut delta = [0u8; 8];
    delta[0..5].copy_from_slice(&b[8..13]);
    Some(Slot {
        wall_ns: i64::from_le_bytes(b[0..8].try_into().ok()?),
        delta: u64::from_le_bytes(delta),
        kind: b[13] & 0x7f,
        clamped: b[13] & CLAMPED != 0,
        raw: b,
    })
}

/// `detail` cut to [`MAX_DETAIL`] bytes on a character boundary.
pub(crate) fn cut_detail(detail: &str) -> &str {
    if detail.len() <= MAX_DETAIL {
        return detail;
    }
    let mut end = MAX_DETAIL;
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    &detail[..end]
}

/// Continuation slots carrying `payload` (`len u16` then the bytes), at most
/// [`MAX_CONTINUATIONS`].
pub(crate) fn continuation_slots(payload: &[u8]) -> Vec<[u8; 16]> {
    let payload = &payload[..payload.len().min(MAX_DETAIL)];
    let mut stream = Vec::with_capacity(2 + payload.len());
    // At most MAX_DETAIL (256) bytes.
    stream.extend_from_slice(&u16::try_from(payload.len()).unwrap_or(0).to_le_bytes());
    stream.extend_from_slice(payload);
    stream
        .chunks(CONTINUATION_PAYLOAD)
        .map(|chunk| {
            let mut b = [0u8; 16];
            b[..chunk.len()].copy_from_slice(chunk);
            b[13] = KIND_CONTINUATION;
            seal(b)
        })
        .collect()
}

/// Continuation slots an entry whose first continuation is `first` needs.
pub(crate) fn continuations_needed(first: &Slot) -> u64 {
    let len = u64::from(u16::from_le_bytes([first.raw[0], first.raw[1]]));
    (2 + len).div_ceil(CONTINUATION_PAYLOAD as u64)
}

/// The payload carried by `continuations` (as many as [`continuations_needed`] says).
pub(crate) fn payload_of(continuations: &[Slot]) -> Vec<u8> {
    let mut stream: Vec<u8> = continuations
        .iter()
        .flat_map(|s| s.raw[..CONTINUATION_PAYLOAD].iter().copied())
        .collect();
    let len = match stream.get(0..2) {
        Some(l) => usize::from(u16::from_le_bytes([l[0], l[1]])),
        None => 0,
    };
    stream.drain(..2.min(stream.len()));
    stream.truncate(len);
    stream
}

/// Whether entries of kind `kind` carry a payload (continuation slots).
pub(crate) fn has_payload(kind: u8) -> bool {
    kind != KIND_TIME
}

/// The bytes of a whole entry: its head slot and, for clock records and events, the payload's
/// continuation slots.
pub(crate) fn entry(wall_ns: i64, delta: u64, kind: u8, clamped: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = head_slot(wall_ns, delta, kind, clamped).to_vec();
    if has_payload(kind) {
        for slot in continuation_slots(payload) {
            out.extend_from_slice(&slot);
        }
    }
    out
}

/// Where the good slots of an index file end: the number of slots (after the header) that a
/// reader may trust. `read` preads `len` bytes at a position (relative to the first slot).
///
/// Walks back from the end over slots whose check fails, head slots whose time is 0, an entry
/// whose continuation slots are missing or too many, and a head whose offset or time is below
/// the previous head's. Only a tail can be bad: entries are only ever appended.
pub(crate) fn good_slots(
    slots: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<u64> {
    // The tail window is read in one go; what lies before it only if the walk goes that far.
    const WINDOW: u64 = 64;
    let window_start = slots.saturating_sub(WINDOW);
    let mut window = vec![0u8; usize::try_from((slots - window_start) * SLOT).unwrap_or(0)];
    read(window_start * SLOT, &mut window)?;
    let mut slot_at = |i: u64| -> io::Result<Option<Slot>> {
        if i >= window_start {
            let at = usize::try_from((i - window_start) * SLOT).unwrap_or(0);
            return Ok(decode_slot(&window[at..at + 16]));
        }
        let mut b = [0u8; 16];
        read(i * SLOT, &mut b)?;
        Ok(decode_slot(&b))
    };
    let mut n = slots;
    while n > 0 {
        let Some(last) = slot_at(n - 1)? else {
            n -= 1;
            continue;
        };
        // The head of the entry `last` belongs to.
        let mut head = n - 1;
        let mut head_slot = last;
        while head_slot.is_continuation() && head > 0 && n - 1 - head < MAX_CONTINUATIONS {
            head -= 1;
            match slot_at(head)? {
                Some(s) => head_slot = s,
                None => break,
            }
        }
        if head_slot.is_continuation() || head_slot.wall_ns == 0 {
            n -= 1;
            continue;
        }
        let needed = if has_payload(head_slot.kind) {
            if head + 1 >= n {
                n = head;
                continue;
            }
            match slot_at(head + 1)? {
                Some(first) if first.is_continuation() => 1 + continuations_needed(&first),
                _ => {
                    n = head;
                    continue;
                }
            }
        } else {
            1
        };
        if head + needed > n {
            // Incomplete: its last slots never reached the file.
            n = head;
            continue;
        }
        if head + needed < n {
            // Stray slots after a whole entry.
            n = head + needed;
            continue;
        }
        if head > 0 {
            if let Some(prev) = head_before(head, &mut slot_at)? {
                if prev.delta > head_slot.delta || prev.wall_ns > head_slot.wall_ns {
                    n = head;
                    continue;
                }
            }
        }
        break;
    }
    Ok(n)
}

/// The head slot of the entry ending just before slot `at`.
fn head_before(
    at: u64,
    slot_at: &mut dyn FnMut(u64) -> io::Result<Option<Slot>>,
) -> io::Result<Option<Slot>> {
    let mut i = at;
    while i > 0 && at - i <= MAX_CONTINUATIONS {
        i -= 1;
        match slot_at(i)? {
            Some(s) if !s.is_continuation() => return Ok(Some(s)),
            Some(_) => {}
            None => return Ok(None),
        }
    }
    Ok(None)
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test data of known, small sizes"
)]
mod tests {
    use super::*;

    fn slots_of(bytes: &[u8]) -> u64 {
        let mut read = |pos: u64, buf: &mut [u8]| -> io::Result<()> {
            let pos = usize::try_from(pos).unwrap();
            buf.copy_from_slice(&bytes[pos..pos + buf.len()]);
            Ok(())
        };
        good_slots(bytes.len() as u64 / SLOT, &mut read).unwrap()
    }

    #[test]
    fn headers_round_trip_and_refuse_damage() {
        let h = Header {
            flags: 0,
            base_offset: 123_456,
            hw_start: 1_700_000_000_000_000_000,
            mono_start: 42,
            boot: boot_bytes("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
        };
        let b = h.encode();
        assert_eq!(&b[0..8], b"CLOGIDX1");
        assert_eq!(Header::decode(&b), Some(h));
        assert_eq!(h.boot[0], 0x0f);
        assert_eq!(h.boot[15], 0xf0);
        for i in [0, 9, 17, 59, 62] {
            let mut bad = b;
            bad[i] ^= 1;
            assert_eq!(Header::decode(&bad), None, "byte {i}");
        }
        assert_eq!(Header::decode(&b[..63]), None);
    }

    #[test]
    fn slots_round_trip_and_any_flipped_bit_is_caught() {
        let b = head_slot(-5, MAX_DELTA, EventKind::WriterChanged.code(), true);
        let s = decode_slot(&b).unwrap();
        assert_eq!(
            (s.wall_ns, s.delta, s.kind, s.clamped),
            (-5, MAX_DELTA, 4, true)
        );
        for byte in 0..16 {
            for bit in 0..8 {
                let mut bad = b;
                bad[byte] ^= 1 << bit;
                assert_eq!(decode_slot(&bad), None, "byte {byte} bit {bit}");
            }
        }
        // Offsets beyond 40 bits are clamped, never wrapped into another file's range.
        let s = decode_slot(&head_slot(1, 1 << 41, 0, false)).unwrap();
        assert_eq!(s.delta, MAX_DELTA);
    }

    #[test]
    fn event_payloads_round_trip_at_every_length() {
        for len in [0, 1, 11, 12, 13, 24, 25, 255, 256, 300] {
            let detail: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let bytes = entry(7, 9, EventKind::DaemonStarted.code(), false, &detail);
            let slots: Vec<Slot> = bytes.chunks(16).map(|c| decode_slot(c).unwrap()).collect();
            let kept = len.min(MAX_DETAIL);
            assert_eq!(continuations_needed(&slots[1]), slots.len() as u64 - 1);
            assert!(slots.len() as u64 - 1 <= MAX_CONTINUATIONS);
            assert_eq!(payload_of(&slots[1..]), &detail[..kept]);
            assert_eq!(slots_of(&bytes), slots.len() as u64);
        }
    }

    #[test]
    fn labels_are_cut_on_a_character_boundary() {
        let label = "é".repeat(200);
        let cut = cut_detail(&label);
        assert!(cut.len() <= MAX_DETAIL && cut.len() >= MAX_DETAIL - 1);
        assert!(label.starts_with(cut));
    }

    #[test]
    fn torn_tails_are_cut_at_the_last_whole_entry() {
        let mut bytes = entry(10, 0, KIND_TIME, false, &[]);
        bytes.extend(entry(20, 5, EventKind::GuestConnected.code(), false, b"x"));
        bytes.extend(entry(
            30,
            9,
            EventKind::WriterChanged.code(),
            false,
            &[b'l'; 40],
        ));
        let whole = slots_of(&bytes);
        assert_eq!(whole, bytes.len() as u64 / 16);
        // Each continuation of the last event lost in turn: the event goes whole.
        for cut in 1..=4 {
            let torn = &bytes[..bytes.len() - 16 * cut];
            assert_eq!(slots_of(torn), 3, "{cut} slots cut");
        }
        // A zeroed tail (a power cut's unwritten blocks) is not an entry.
        let mut zeroed = bytes.clone();
        zeroed.extend([0u8; 64]);
        assert_eq!(slots_of(&zeroed), whole);
        // A slot with a bad check, and a head going back in offset or time.
        let mut bad = bytes.clone();
        bad.extend(entry(40, 20, KIND_TIME, false, &[]));
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert_eq!(slots_of(&bad), whole);
        let mut back = bytes.clone();
        back.extend(entry(40, 8, KIND_TIME, false, &[]));
        assert_eq!(slots_of(&back), whole);
        let mut earlier = bytes.clone();
        earlier.extend(entry(29, 10, KIND_TIME, false, &[]));
        assert_eq!(slots_of(&earlier), whole);
        let mut fine = bytes.clone();
        fine.extend(entry(30, 9, KIND_TIME, false, &[]));
        assert_eq!(slots_of(&fine), whole + 1);
        // A lone continuation, and an event head without its continuations.
        let mut lone = bytes.clone();
        lone.extend(continuation_slots(b"zz").concat());
        assert_eq!(slots_of(&lone), whole);
        let mut headless = bytes.clone();
        headless.extend(head_slot(50, 30, EventKind::PipeClosed.code(), false));
        assert_eq!(slots_of(&headless), whole);
        assert_eq!(slots_of(&[]), 0);
    }

    #[test]
    fn event_kinds_have_their_codes_and_names() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_code(kind.code()), Some(kind));
            assert!(!kind.name().is_empty());
        }
        assert_eq!(EventKind::from_code(KIND_TIME), None);
        assert_eq!(EventKind::from_code(KIND_CONTINUATION), None);
        assert_eq!(EventKind::DaemonStarted.name(), "daemon started");
    }
}
