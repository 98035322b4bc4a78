//! The index as the writer leaves it and readers see it: the entry rule under a fake clock,
//! lookups landing on continuation slots, torn tails, clock steps.
#![allow(
    clippy::cast_possible_truncation,
    reason = "test data of known, small sizes"
)]

use super::format::{entry, EventKind as K, HEADER_LEN, KIND_TIME};
use super::*;
use crate::clock::Now;
use std::fs::{self, File};
use std::path::Path;
use std::sync::Arc;

const MS: u64 = 1_000_000;
/// 2026-12-05T00:00:00Z.
const T0: i64 = 1_796_428_800_000_000_000;

fn at(ms: u64) -> Now {
    Now {
        wall_ns: T0 + i64::try_from(ms * MS).unwrap(),
        mono_ns: 1_000 * MS + ms * MS,
    }
}

/// A writer with the path of its log, as `LogFile` holds it.
struct W {
    w: Writer,
    log: std::path::PathBuf,
}

impl W {
    fn open(log: &Path, start: u64, enabled: bool) -> Self {
        Self {
            w: Writer::open(log, start, enabled),
            log: log.to_owned(),
        }
    }

    fn commit_at(&mut self, planned: Planned, now: Now, wrote: bool) {
        self.w.commit(&self.log, planned, now, wrote);
    }
}

impl std::ops::Deref for W {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.w
    }
}

fn writer(dir: &Path) -> W {
    W::open(&dir.join("s.log"), 0, true)
}

/// Writes at `offset` at time `now` as `LogFile` does; whether an entry was due.
fn write(w: &mut W, offset: u64, now: Now) -> bool {
    let planned = w.plan_write(offset, now);
    let due = planned.len() > 0;
    w.commit_at(planned, now, true);
    due
}

fn index(dir: &Path) -> IndexFile {
    let file = Arc::new(File::open(dir.join("s.log.idx")).unwrap());
    IndexFile::open(file).unwrap().unwrap()
}

fn entries(ix: &IndexFile, from: u64) -> Vec<IndexEntry> {
    let mut cursor = ix.cursor(from).unwrap();
    let mut out = Vec::new();
    while let Some(e) = cursor.next().unwrap() {
        out.push(e);
    }
    out
}

fn marks(ix: &IndexFile) -> Vec<(u64, i64)> {
    entries(ix, 0)
        .iter()
        .filter_map(|e| match e {
            IndexEntry::Time(m) => Some((m.offset, m.wall_ns)),
            IndexEntry::Event(_) => None,
        })
        .collect()
}

#[test]
fn entries_follow_the_rule_for_bursts_continuous_and_sparse_output() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    // Fast continuous output: 5 KiB every 50 ms.
    const K: u64 = 5 << 10;
    assert!(write(&mut w, 0, at(0)), "the first write of a file");
    assert!(
        !write(&mut w, K, at(50)),
        "continuous, 50 ms after the entry"
    );
    assert!(
        write(&mut w, 2 * K, at(100)),
        "continuous, 100 ms and 10 KiB after the entry"
    );
    assert!(!write(&mut w, 3 * K, at(150)));
    assert!(!write(&mut w, 4 * K, at(199)));
    assert!(
        write(&mut w, 5 * K, at(250)),
        "writes < 100 ms apart, 150 ms after the entry"
    );
    // Sparse writes (≥ 100 ms apart, < 1 s): no entry until a second since the last one.
    assert!(!write(&mut w, 6 * K, at(500)));
    assert!(!write(&mut w, 7 * K, at(900)));
    assert!(
        write(&mut w, 8 * K, at(1250)),
        "a second since the last entry"
    );
    // A quiet second: the burst after it gets an exact entry.
    assert!(write(&mut w, 9 * K, at(2250)));
    assert!(!write(&mut w, 9 * K + 100, at(2260)));
    // Slow continuous output (100 bytes each 50 ms): under 2 KiB, entries only each second.
    let mut offset = 9 * K + 200;
    let mut entries = Vec::new();
    for i in 0..60u64 {
        if write(&mut w, offset, at(2300 + i * 50)) {
            entries.push(i);
        }
        offset += 100;
    }
    assert_eq!(
        entries,
        [19, 39, 59],
        "one a second (the first is 950 ms after 2260)"
    );
    let ix = index(dir.path());
    assert_eq!(ix.base_offset(), 0);
    assert_eq!(ix.first_time(), at(0).wall_ns);
    let ms = |m: u64| at(m).wall_ns;
    assert_eq!(
        marks(&ix)[..5],
        [
            (0, ms(0)),
            (2 * K, ms(100)),
            (5 * K, ms(250)),
            (8 * K, ms(1250)),
            (9 * K, ms(2250))
        ]
    );
    // Each byte's time is its mark's, and within the stated resolution of the true time.
    assert_eq!(ix.mark_at(0).unwrap().unwrap().wall_ns, ms(0));
    assert_eq!(ix.mark_at(2 * K - 1).unwrap().unwrap().offset, 0);
    assert_eq!(ix.mark_at(5 * K - 1).unwrap().unwrap().wall_ns, ms(100));
    assert_eq!(ix.mark_at(9 * K + 50).unwrap().unwrap().offset, 9 * K);
    assert_eq!(
        ix.mark_at(1 << 30).unwrap().unwrap().wall_ns,
        ms(2300 + 59 * 50)
    );
    assert_eq!(ix.last_time().unwrap(), Some(ms(2300 + 59 * 50)));
    // Cost: the header, one clock record (3 slots), seven time marks.
    assert_eq!(
        fs::metadata(dir.path().join("s.log.idx")).unwrap().len(),
        HEADER_LEN + 10 * 16
    );
}

#[test]
fn one_write_never_adds_more_than_the_room_kept_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    assert!(write(&mut w, 0, at(0)));
    // A new file (header), a clock stepped back as far as it can go (the longest detail) and
    // a clock record: the most a write adds.
    w.w.start_file(100);
    let back = Now {
        wall_ns: i64::MIN / 2,
        mono_ns: at(5000).mono_ns,
    };
    let planned = w.plan_write(100, back);
    assert!(
        planned.len() <= writer::WRITE_ENTRY_MAX,
        "{}",
        planned.len()
    );
    assert_eq!(writer::WRITE_ENTRY_MAX, 224, "docs/design.md states it");
    assert_eq!(w.write_reserve(), 224);
}

#[test]
fn events_are_rate_limited_except_the_daemons_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    let admitted = (0..100)
        .filter(|_| w.w.admit_event(K::WriterChanged, at(0)))
        .count();
    assert_eq!(admitted, 20, "the burst");
    assert!(w.w.admit_event(K::DaemonStopped, at(0)));
    assert!(!w.w.admit_event(K::GuestConnected, at(100)));
    // Five a second after that.
    let later = (0..100)
        .filter(|_| w.w.admit_event(K::WriterChanged, at(1000)))
        .count();
    assert_eq!(later, 5);
}

#[test]
fn no_index_is_written_when_turned_off_or_before_the_first_byte() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(dir.path());
    assert!(!dir.path().join("s.log.idx").exists());
    assert_eq!(w.len(), 0);
    let mut w = W::open(&dir.path().join("s.log"), 0, false);
    assert!(!w.enabled());
    assert!(!write(&mut w, 0, at(0)));
    w.commit_at(w.plan_event(0, at(1), K::GuestConnected, "x"), at(1), false);
    assert!(!dir.path().join("s.log.idx").exists());
}

#[test]
fn searches_by_time_land_on_heads_never_on_continuations() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    // Alternate marks and long events (20 continuation slots each), one a second.
    let label = "w".repeat(300);
    for i in 0..50u64 {
        let now = at(i * 1000);
        if i % 3 == 1 {
            w.commit_at(
                w.plan_event(i * 100, now, K::WriterChanged, &label),
                now,
                false,
            );
        }
        assert!(write(&mut w, i * 100, at(i * 1000 + 1)));
    }
    let ix = index(dir.path());
    for i in 0..50u64 {
        // Just after the event (if any) of second i: the mark of its write.
        let m = ix
            .first_at_or_after(at(i * 1000 + 1).wall_ns)
            .unwrap()
            .unwrap();
        assert_eq!(m.offset, i * 100, "second {i}");
        assert_eq!(m.wall_ns, at(i * 1000 + 1).wall_ns);
        // Exactly at the second: the event's slot when there is one (same offset).
        let m = ix.first_at_or_after(at(i * 1000).wall_ns).unwrap().unwrap();
        assert_eq!(m.offset, i * 100);
        assert_eq!(
            ix.mark_at(i * 100 + 50).unwrap().unwrap().wall_ns,
            at(i * 1000 + 1).wall_ns
        );
    }
    assert_eq!(ix.first_at_or_after(T0 - 1).unwrap().unwrap().offset, 0);
    assert_eq!(ix.first_at_or_after(at(60_000).wall_ns).unwrap(), None);
    // The events, whole, in order with the marks.
    let events: Vec<_> = entries(&ix, 0)
        .into_iter()
        .filter_map(|e| match e {
            IndexEntry::Event(e) => Some(e),
            IndexEntry::Time(_) => None,
        })
        .collect();
    assert_eq!(events.len(), 17);
    assert!(events
        .iter()
        .all(|e| e.kind == K::WriterChanged && e.detail.len() == 256));
    // A cursor from an offset starts at the first entry there.
    let from = entries(&ix, 1000);
    assert_eq!(from[0].offset(), 1000);
    assert!(from.windows(2).all(|p| p[0].offset() <= p[1].offset()));
}

#[test]
fn a_backwards_step_is_clamped_recorded_and_keeps_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    assert!(write(&mut w, 0, at(0)));
    assert!(write(&mut w, 10, at(2000)));
    // The wall clock steps back 5 s; monotonic time goes on.
    let back = |ms: u64| Now {
        wall_ns: at(ms).wall_ns - 5_000_000_000,
        mono_ns: at(ms).mono_ns,
    };
    assert!(write(&mut w, 20, back(4000)));
    assert!(write(&mut w, 30, back(6000)));
    // Caught up: exact again.
    assert!(write(&mut w, 40, back(9000)));
    let ix = index(dir.path());
    let all = entries(&ix, 0);
    let step = all
        .iter()
        .find_map(|e| match e {
            IndexEntry::Event(e) if e.kind == K::ClockStepped => Some(e.clone()),
            _ => None,
        })
        .expect("a clock stepped event");
    assert_eq!(step.offset, 20);
    assert!(step.detail.contains("3.000s"), "{}", step.detail);
    let times: Vec<_> = all
        .iter()
        .filter_map(|e| match e {
            IndexEntry::Time(m) => Some(*m),
            IndexEntry::Event(_) => None,
        })
        .collect();
    assert!(times.windows(2).all(|p| p[0].wall_ns <= p[1].wall_ns));
    let at20 = ix.mark_at(20).unwrap().unwrap();
    assert_eq!((at20.wall_ns, at20.approximate), (at(2000).wall_ns, true));
    assert!(ix.mark_at(30).unwrap().unwrap().approximate);
    let at40 = ix.mark_at(40).unwrap().unwrap();
    assert_eq!(
        (at40.wall_ns, at40.approximate),
        (back(9000).wall_ns, false)
    );
}

#[test]
fn the_writer_cuts_a_torn_tail_and_resumes_the_clamp() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    assert!(write(&mut w, 0, at(0)));
    assert!(write(&mut w, 10, at(5000)));
    let path = dir.path().join("s.log.idx");
    let good = fs::metadata(&path).unwrap().len();
    // Half a slot, then a whole event missing its last continuation.
    let mut torn = entry(
        at(6000).wall_ns,
        20,
        K::DaemonStopped.code(),
        false,
        &[b'x'; 30],
    );
    torn.truncate(torn.len() - 16);
    torn.extend_from_slice(&[7u8; 9]);
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend(&torn);
    fs::write(&path, &bytes).unwrap();
    // A reader ignores the torn tail.
    let ix = index(dir.path());
    assert_eq!(ix.last_time().unwrap(), Some(at(5000).wall_ns));
    assert_eq!(entries(&ix, 0).len(), 2);
    // The writer cuts it, and never stores a time below what is there.
    let mut w = W::open(&dir.path().join("s.log"), 0, true);
    assert_eq!(fs::metadata(&path).unwrap().len(), good);
    assert_eq!(w.len(), good);
    assert!(!w.ended_stopped());
    let early = Now {
        wall_ns: at(1000).wall_ns,
        mono_ns: 1,
    };
    assert!(write(&mut w, 30, early));
    let m = index(dir.path()).mark_at(30).unwrap().unwrap();
    assert_eq!((m.wall_ns, m.approximate), (at(5000).wall_ns, true));
}

#[test]
fn an_index_of_another_file_is_moved_to_its_backup_or_removed_and_orphans_go() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("s.log");
    let mut w = W::open(&log, 0, true);
    assert!(write(&mut w, 0, at(0)));
    // A crash after `.log` became `.log.1`, before its index followed.
    fs::write(dir.path().join("s.log.1"), b"x").unwrap();
    fs::write(dir.path().join("s.log.2.idx"), b"orphan").unwrap();
    fs::write(dir.path().join("s.log.3.idx"), b"orphan").unwrap();
    let w = W::open(&log, 100, true);
    remove_orphans(&log, 1).unwrap();
    assert_eq!(w.len(), 0);
    assert!(!dir.path().join("s.log.idx").exists());
    assert!(dir.path().join("s.log.1.idx").exists());
    assert!(!dir.path().join("s.log.2.idx").exists());
    assert!(!dir.path().join("s.log.3.idx").exists());
    // Without a backup to own it, it goes.
    let mut w = W::open(&log, 100, true);
    assert!(write(&mut w, 100, at(0)));
    drop(w);
    W::open(&log, 200, true);
    assert!(!dir.path().join("s.log.idx").exists());
    // A header that does not check: removed.
    fs::write(dir.path().join("s.log.idx"), [1u8; 80]).unwrap();
    W::open(&log, 200, true);
    assert!(!dir.path().join("s.log.idx").exists());
}

#[test]
fn a_clean_stop_is_recognised_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("s.log");
    let mut w = W::open(&log, 0, true);
    assert!(write(&mut w, 0, at(0)));
    w.commit_at(
        w.plan_event(5, at(10), K::DaemonStopped, "stop"),
        at(10),
        false,
    );
    assert!(W::open(&log, 0, true).ended_stopped());
    let mut w = W::open(&log, 0, true);
    w.commit_at(
        w.plan_event(5, at(20), K::DaemonStarted, "started"),
        at(20),
        false,
    );
    assert!(!W::open(&log, 0, true).ended_stopped());
    assert_eq!(
        start_detail(StartKind::Fresh, true).split(" (").next(),
        Some("restarted after a crash")
    );
}

#[test]
fn readers_refuse_headers_they_cannot_read_and_see_entries_as_they_come() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.log.idx");
    fs::write(&path, b"").unwrap();
    assert!(IndexFile::open(Arc::new(File::open(&path).unwrap()))
        .unwrap()
        .is_none());
    fs::write(&path, [0u8; 100]).unwrap();
    assert!(IndexFile::open(Arc::new(File::open(&path).unwrap()))
        .unwrap()
        .is_none());
    fs::remove_file(&path).unwrap();
    let mut w = writer(dir.path());
    assert!(write(&mut w, 0, at(0)));
    let ix = index(dir.path());
    let mut cursor = ix.cursor(0).unwrap();
    assert!(cursor.next().unwrap().is_some());
    assert!(cursor.peek().unwrap().is_none());
    assert!(write(&mut w, 7, at(3000)));
    assert_eq!(cursor.peek().unwrap().map(IndexEntry::offset), Some(7));
    assert_eq!(
        cursor.next().unwrap().map(|e| e.wall_ns()),
        Some(at(3000).wall_ns)
    );
    assert!(cursor.next().unwrap().is_none());
    // Garbage kinds of a newer version are skipped, not shown.
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend(entry(at(4000).wall_ns, 9, 50, false, b"future"));
    bytes.extend(entry(at(4000).wall_ns, 9, KIND_TIME, false, &[]));
    fs::write(&path, &bytes).unwrap();
    assert_eq!(cursor.next().unwrap().map(|e| e.offset()), Some(9));
}

mod with_the_log {
    use super::super::super::{backup_path, LogFile, LogLimits};
    use super::*;
    use crate::config::LogMode;

    fn dir_bytes(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    /// Random writes, rotations, restarts and events with the index on: the bytes are the
    /// model's, every file and its index together stay within `max_size`, the stream within
    /// its cap, and each index describes its own file.
    #[test]
    fn the_pair_rule_keeps_the_cap_and_every_index_matches_its_file() {
        for (mode, backups) in [(LogMode::Rotate, 3), (LogMode::Truncate, 0)] {
            let dir = tempfile::tempdir().unwrap();
            let logs = dir.path().join("g");
            let path = logs.join("s.log");
            let pos = dir.path().join("s.pos");
            let limits = LogLimits {
                max_size: 4096,
                max_backups: backups,
                mode,
                compress: crate::logfile::Compression::None,
                max_age: 0,
            };
            let open = || {
                let mut log = LogFile::open(&path, &pos, limits).unwrap();
                log.set_time_index(true);
                log
            };
            let mut log = open();
            let mut model: Vec<u8> = Vec::new();
            let mut seed = 11u64;
            for round in 0..300u32 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = usize::try_from((seed >> 33) % 2500).unwrap();
                let chunk: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                log.append(&chunk).unwrap();
                model.extend(&chunk);
                if round % 7 == 0 {
                    log.note_event(K::WriterChanged, &"label ".repeat(40));
                }
                if round % 53 == 0 {
                    drop(log);
                    log = open();
                    log.note_start(StartKind::Fresh);
                }
                // Every pair within max_size, the whole within the cap, as ListGuests says.
                let mut files = vec![path.clone()];
                files.extend((1..=backups).map(|n| backup_path(&path, n)));
                for f in &files {
                    let pair = fs::metadata(f).map_or(0, |m| m.len())
                        + fs::metadata(index_path(f)).map_or(0, |m| m.len());
                    assert!(pair <= 4096, "{} and its index: {pair} bytes", f.display());
                }
                assert!(dir_bytes(&logs) <= limits.disk_cap(), "cap exceeded");
                assert_eq!(log.disk_usage().0, dir_bytes(&logs));
            }
            // The bytes are the model's; each index's base is its file's first offset.
            let segments = log.open_segments(0).unwrap();
            let mut at = segments[0].start;
            for s in &segments {
                let mut data = vec![0u8; usize::try_from(s.len).unwrap()];
                std::os::unix::fs::FileExt::read_exact_at(&*s.file, &mut data, s.file_pos).unwrap();
                assert_eq!(
                    data,
                    model[usize::try_from(s.start).unwrap()..][..data.len()]
                );
                if s.len > 0 {
                    let ix = IndexFile::open(s.index.clone().expect("an index"))
                        .unwrap()
                        .unwrap();
                    assert_eq!(ix.base_offset(), s.start - s.file_pos);
                    let first = ix
                        .mark_at(s.start)
                        .unwrap()
                        .expect("a mark for the first byte");
                    assert!(first.offset <= s.start);
                }
                at = s.start + s.len;
            }
            assert_eq!(at, model.len() as u64);
        }
    }

    #[test]
    fn dropped_bytes_and_clean_stops_are_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.log");
        let limits = LogLimits {
            max_size: 1 << 20,
            max_backups: 1,
            mode: LogMode::Rotate,
            compress: crate::logfile::Compression::None,
            max_age: 0,
        };
        let mut log = LogFile::open(&path, &dir.path().join("s.pos"), limits).unwrap();
        log.set_time_index(true);
        log.note_start(StartKind::Fresh);
        log.append(b"hello\n").unwrap();
        log.skip(10);
        log.note_event(K::DaemonStopped, "stop");
        let events: Vec<_> = entries(&index(dir.path()), 0)
            .into_iter()
            .filter_map(|e| match e {
                IndexEntry::Event(e) => Some((e.kind, e.offset, e.detail)),
                IndexEntry::Time(_) => None,
            })
            .collect();
        assert_eq!(events[0].0, K::DaemonStarted);
        assert!(events[0].2.starts_with("started"), "{}", events[0].2);
        assert_eq!(events[1], (K::BytesDropped, 6, "10 bytes".into()));
        assert_eq!(events[2], (K::DaemonStopped, 16, "stop".into()));
        // A clean stop: the next start is not a crash; without one it is.
        drop(log);
        let mut log = LogFile::open(&path, &dir.path().join("s.pos"), limits).unwrap();
        log.set_time_index(true);
        log.note_start(StartKind::Fresh);
        drop(log);
        let mut log = LogFile::open(&path, &dir.path().join("s.pos"), limits).unwrap();
        log.set_time_index(true);
        log.note_start(StartKind::Upgraded);
        let details: Vec<_> = entries(&index(dir.path()), 0)
            .into_iter()
            .filter_map(|e| match e {
                IndexEntry::Event(e) if e.kind == K::DaemonStarted => Some(e.detail),
                _ => None,
            })
            .collect();
        assert!(details[1].starts_with("started"), "{details:?}");
        assert!(details[2].starts_with("upgraded"), "{details:?}");
        drop(log);
        let mut log = LogFile::open(&path, &dir.path().join("s.pos"), limits).unwrap();
        log.set_time_index(true);
        log.note_start(StartKind::Fresh);
        let last = entries(&index(dir.path()), 0).pop().unwrap();
        assert!(
            matches!(last, IndexEntry::Event(e) if e.detail.starts_with("restarted after a crash"))
        );
    }

    /// A read cut at `room()` (as pipes and consoles read) is written without a rotation in
    /// between, whatever entries its write adds: the crash guarantee of docs/operations.md.
    #[test]
    fn a_write_cut_at_the_room_left_never_rotates_before_it_lands() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_size: 4096,
            max_backups: 1,
            mode: LogMode::Rotate,
            compress: crate::logfile::Compression::None,
            max_age: 0,
        };
        let mut log =
            LogFile::open(&dir.path().join("s.log"), &dir.path().join("s.pos"), limits).unwrap();
        log.set_time_index(true);
        let mut seed = 3u64;
        for round in 0..400 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let want = usize::try_from((seed >> 33) % 3000).unwrap() + 1;
            let room = log.room();
            let before = log.rotations();
            let n = want.min(room);
            log.append(&vec![b'r'; n]).unwrap();
            if room != usize::MAX {
                assert_eq!(
                    log.rotations(),
                    before,
                    "round {round}: rotated inside a write of {n}"
                );
            }
            if round % 50 == 0 {
                // An entry is due at the next write.
                std::thread::sleep(std::time::Duration::from_millis(110));
            }
        }
        assert!(log.rotations() > 50);
    }
}
