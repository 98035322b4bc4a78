//! The time index against the real binary (docs/design.md, "Time index"): index files go with
//! their logs at every rotation and the disk total never exceeds the cap; a kill -9 between a
//! log write and its index entry, and an index cut mid-slot, cost no byte and leave an index
//! readers trust; a wall clock stepped back (the test clock) keeps the marks ordered and is
//! recorded; events come in order across a console's life, an upgrade, a takeover and a crash;
//! and the log files stay byte-identical to what the guest wrote.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes and offsets in tests are small numbers"
)]

use crate::support;
use crate::upgrade_common;

use conlog::logfile::index::{index_path, EventKind, IndexEntry, IndexEvent, IndexFile};
use conlog::proto::{attach::Mode, LogMode};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use upgrade_common::Successor;

const GUEST: &str = "vm";

/// Every entry of every index of `guest/stream` on disk, oldest file first.
fn entries_on_disk(log_dir: &Path, guest: &str, stream: &str) -> Vec<IndexEntry> {
    let mut all = Vec::new();
    for log in log_files(log_dir, guest, stream) {
        let Ok(file) = File::open(index_path(&log)) else {
            continue;
        };
        let index = IndexFile::open(Arc::new(file))
            .expect("read the index")
            .unwrap_or_else(|| panic!("{}: not an index", index_path(&log).display()));
        let mut cursor = index.cursor(0).unwrap();
        while let Some(entry) = cursor.next().unwrap() {
            all.push(entry);
        }
    }
    all
}

fn events_on_disk(log_dir: &Path, guest: &str, stream: &str) -> Vec<IndexEvent> {
    entries_on_disk(log_dir, guest, stream)
        .into_iter()
        .filter_map(|e| match e {
            IndexEntry::Event(e) => Some(e),
            IndexEntry::Time(_) => None,
        })
        .collect()
}

/// Entries are ordered by offset and by time, and none is past `end`.
fn assert_ordered(entries: &[IndexEntry], end: u64) {
    assert!(!entries.is_empty(), "no index entry on disk");
    for pair in entries.windows(2) {
        assert!(
            pair[0].offset() <= pair[1].offset() && pair[0].wall_ns() <= pair[1].wall_ns(),
            "out of order: {pair:?}"
        );
    }
    assert!(entries.iter().all(|e| e.offset() <= end), "{entries:?}");
}

/// Bytes of every file in `dir` (apparent sizes, what the cap counts), 0 if it is gone.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// Lines of a guest's numbered output.
fn lines(from: u64, to: u64) -> Vec<u8> {
    (from..to)
        .flat_map(|n| format!("line {n:05} {}\n", "t".repeat((n % 40) as usize)).into_bytes())
        .collect()
}

/// Rotation renames and removes each index with its log, and a sampler polling the guest's
/// directory the whole time never sees it above `max_size × (max_backups + 1)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_rotate_with_their_logs_and_the_disk_stays_within_the_cap() {
    const MAX_SIZE: u64 = 8192;
    const BACKUPS: u32 = 3;
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(MAX_SIZE, BACKUPS, LogMode::Rotate)),
    )
    .await;
    let dir = daemon.log_dir().join(GUEST);
    let cap = MAX_SIZE * (u64::from(BACKUPS) + 1);
    let stop = Arc::new(AtomicBool::new(false));
    let (samples, worst) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (dir, stop, samples, worst) =
            (dir.clone(), stop.clone(), samples.clone(), worst.clone());
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                worst.fetch_max(dir_bytes(&dir), Relaxed);
                samples.fetch_add(1, Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // Continuous output (writes 30 ms apart, an entry each 100 ms) with quiet pauses, and a
    // second writer coming and going (two events) at each write: indexes of hundreds of bytes
    // per file, over a dozen rotations.
    let data = lines(0, 3000);
    let mut written = 0;
    for (i, chunk) in data.chunks(1500).enumerate() {
        pipe.write_all(chunk).unwrap();
        written += chunk.len() as u64;
        wait_offset(&mut agent, GUEST, "qemu", written).await;
        let (_, other) = open_pipe(&mut agent, GUEST, "qemu", None).await;
        wait_stream(&mut agent, GUEST, "qemu", "fed twice", |s| s.writers == 2).await;
        drop(other);
        wait_stream(&mut agent, GUEST, "qemu", "fed once", |s| s.writers == 1).await;
        let pause = if i % 10 == 9 { 1100 } else { 30 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let info = wait_offset(&mut agent, GUEST, "qemu", written).await;
    stop.store(true, Relaxed);
    sampler.join().unwrap();
    assert!(
        samples.load(Relaxed) >= 100,
        "only {} samples",
        samples.load(Relaxed)
    );
    let worst = worst.load(Relaxed);
    assert!(worst <= cap, "{worst} bytes on disk > cap {cap}");
    assert!(info.rotations >= 10, "{info:?}");
    // Every log file has its index, no index outlives its log, and each pair fits.
    let logs = log_files(&daemon.log_dir(), GUEST, "qemu");
    assert_eq!(logs.len(), BACKUPS as usize + 1);
    let mut index_bytes = 0;
    for log in &logs {
        let pair = std::fs::metadata(log).unwrap().len();
        let index = std::fs::metadata(index_path(log))
            .unwrap_or_else(|e| panic!("{}: {e}", index_path(log).display()))
            .len();
        assert!(
            pair + index <= MAX_SIZE,
            "{}: {pair} + {index}",
            log.display()
        );
        index_bytes += index;
    }
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        2 * logs.len(),
        "only logs and their indexes: {names:?}"
    );
    // ListGuests counts the indexes too, and the bytes are the guest's, unchanged.
    assert_eq!(info.bytes_on_disk, dir_bytes(&dir), "{info:?}");
    assert!(index_bytes > 0);
    let on_disk = read_log(&daemon.log_dir(), GUEST, "qemu");
    assert_same("log files", &on_disk, &data[data.len() - on_disk.len()..]);
    // Each index describes its own file: its base is where the file's bytes start.
    let mut start = info.first_offset;
    for log in &logs {
        let index = IndexFile::open(Arc::new(File::open(index_path(log)).unwrap()))
            .unwrap()
            .unwrap();
        assert_eq!(index.base_offset(), start, "{}", log.display());
        assert_eq!(index.mark_at(start).unwrap().map(|m| m.offset), Some(start));
        start += std::fs::metadata(log).unwrap().len();
    }
    assert_ordered(&entries_on_disk(&daemon.log_dir(), GUEST, "qemu"), written);
    // Fewer backups: the removed files' indexes go with them, and the new cap holds at once.
    create_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(MAX_SIZE, 1, LogMode::Rotate)),
    )
    .await
    .expect("new limits");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "two logs and their indexes: {names:?}");
    assert!(dir_bytes(&dir) <= 2 * MAX_SIZE);
}

/// kill -9 between a log write and its index entry (`index.append`): after the restart every
/// byte is there, the index is whole up to the entry before, the bytes of the lost entry show
/// the previous one's time, and the restart is recorded as one after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_the_log_write_and_its_index_entry_loses_no_byte() {
    let mut daemon = Daemon::start_full(
        Some(NO_KEEPER),
        &[],
        None,
        &[("CONLOG_FAULT_POINTS", "index.append=kill@3")],
    )
    .await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    let first = lines(0, 10);
    let second = lines(10, 20);
    let third = lines(20, 30);
    // An entry (first write of the file), a write without one, and after a quiet second a
    // write whose entry is due: the daemon dies after logging it, before indexing it.
    pipe.write_all(&first).unwrap();
    wait_offset(&mut agent, GUEST, "qemu", first.len() as u64).await;
    pipe.write_all(&second).unwrap();
    let two = (first.len() + second.len()) as u64;
    wait_offset(&mut agent, GUEST, "qemu", two).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    pipe.write_all(&third).unwrap();
    daemon.wait_exit().await;
    assert!(daemon.stderr().contains("fault point index.append reached"));
    drop(pipe);
    daemon.env.clear();
    daemon.restart().await;
    let end = two + third.len() as u64;
    let log = std::fs::read(daemon.log_path(GUEST, "qemu")).unwrap();
    let want: Vec<u8> = [first.clone(), second, third].concat();
    assert_same("log after the crash", &log, &want);
    let entries = entries_on_disk(&daemon.log_dir(), GUEST, "qemu");
    assert_ordered(&entries, end);
    let path = index_path(&daemon.log_path(GUEST, "qemu"));
    let index = IndexFile::open(Arc::new(File::open(&path).unwrap()))
        .unwrap()
        .unwrap();
    // The third write's bytes carry the first write's time (its own entry was lost).
    let third_mark = index.mark_at(two).unwrap().unwrap();
    assert_eq!(third_mark.offset, 0, "{entries:?}");
    let crash = events_on_disk(&daemon.log_dir(), GUEST, "qemu");
    let last = crash.last().expect("an event");
    assert_eq!(last.kind, EventKind::DaemonStarted);
    assert!(
        last.detail.starts_with("restarted after a crash"),
        "{last:?}"
    );
    assert_eq!(last.offset, end);
    // Slots are whole.
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!((len - 64) % 16, 0);
    // The history is unchanged through ReadHistory too.
    daemon.stop().await;
}

/// An index cut in the middle of a slot (a torn tail) is cut back to its last whole entry at
/// the next start, and what is appended after it reads back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_cut_mid_slot_is_cut_back_at_open() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    let data = lines(0, 50);
    pipe.write_all(&data).unwrap();
    drop(pipe);
    wait_closed(&mut agent, GUEST, "qemu", data.len() as u64).await;
    daemon.stop().await;
    let path = index_path(&daemon.log_path(GUEST, "qemu"));
    let before = events_on_disk(&daemon.log_dir(), GUEST, "qemu");
    assert_eq!(
        before.last().map(|e| e.kind),
        Some(EventKind::DaemonStopped)
    );
    // Cut 7 bytes: the last slot of `daemon stopped` is torn.
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 7).unwrap();
    drop(file);
    let reader = IndexFile::open(Arc::new(File::open(&path).unwrap()))
        .unwrap()
        .unwrap();
    let mut cursor = reader.cursor(0).unwrap();
    let mut seen = 0;
    while cursor.next().unwrap().is_some() {
        seen += 1;
    }
    assert!(seen > 0);
    daemon.restart().await;
    let after = std::fs::metadata(&path).unwrap().len();
    assert_eq!((after - 64) % 16, 0, "whole slots after the start");
    let events = events_on_disk(&daemon.log_dir(), GUEST, "qemu");
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    // The torn `daemon stopped` is gone, so the start reads as one after a crash.
    assert_eq!(
        &kinds[..kinds.len() - 1],
        &before.iter().map(|e| e.kind).collect::<Vec<_>>()[..before.len() - 1]
    );
    let last = events.last().unwrap();
    assert_eq!(last.kind, EventKind::DaemonStarted);
    assert!(
        last.detail.starts_with("restarted after a crash"),
        "{last:?}"
    );
    assert_ordered(
        &entries_on_disk(&daemon.log_dir(), GUEST, "qemu"),
        data.len() as u64,
    );
    assert_eq!(std::fs::read(daemon.log_path(GUEST, "qemu")).unwrap(), data);
    daemon.stop().await;
}

/// The wall clock steps back 5 s (the daemon's test clock): the index stays ordered, the
/// step is a `clock stepped` event at the next write, and the marks in the catch-up window
/// are approximate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_back_keeps_the_marks_ordered_and_is_recorded() {
    let scratch = tempfile::tempdir().unwrap();
    let clock = scratch.path().join("clock");
    std::fs::write(&clock, "0").unwrap();
    let daemon = Daemon::start_env(&[("CONLOG_TEST_CLOCK", clock.to_str().unwrap())]).await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    let before = lines(0, 5);
    pipe.write_all(&before).unwrap();
    wait_offset(&mut agent, GUEST, "qemu", before.len() as u64).await;
    std::fs::write(&clock, "-5000000000").unwrap();
    // A quiet second (the next write gets an entry), longer than the clock file's re-read.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = lines(5, 10);
    pipe.write_all(&after).unwrap();
    let end = (before.len() + after.len()) as u64;
    wait_offset(&mut agent, GUEST, "qemu", end).await;
    let entries = entries_on_disk(&daemon.log_dir(), GUEST, "qemu");
    assert_ordered(&entries, end);
    let step = events_on_disk(&daemon.log_dir(), GUEST, "qemu")
        .into_iter()
        .find(|e| e.kind == EventKind::ClockStepped)
        .unwrap_or_else(|| panic!("no clock stepped event: {entries:?}"));
    assert_eq!(step.offset, before.len() as u64);
    assert!(step.detail.contains("stepped back"), "{step:?}");
    let path = index_path(&daemon.log_path(GUEST, "qemu"));
    let index = IndexFile::open(Arc::new(File::open(&path).unwrap()))
        .unwrap()
        .unwrap();
    let mark = index.mark_at(before.len() as u64).unwrap().unwrap();
    assert!(mark.approximate, "{mark:?}");
    let first = index.mark_at(0).unwrap().unwrap();
    assert!(!first.approximate);
    assert!(mark.wall_ns >= first.wall_ns);
    assert_eq!(
        read_log(&daemon.log_dir(), GUEST, "qemu"),
        [before, after].concat()
    );
}

/// A console's life as the index records it, in order with the bytes: guest connected,
/// writers (with their labels, a forced take-over), guest disconnected, an upgrade, a takeover
/// and a crash with its restart; a pipe's writers coming and going. The log holds exactly what
/// the guest printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_come_in_order_across_a_console_life_upgrades_takeovers_and_crashes() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, GUEST).await;
    let mut printed: Vec<u8> = Vec::new();
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    wait_guest_connected(&mut agent, GUEST, "serial0", true).await;
    let boot = lines(0, 20);
    guest.write(&boot).await;
    printed.extend(&boot);
    wait_offset(&mut agent, GUEST, "serial0", printed.len() as u64).await;
    let first = Session::attach(local_channel(&daemon).await, attach(GUEST, Mode::ReadWrite))
        .await
        .expect("first writer");
    let second = Session::attach(local_channel(&daemon).await, proto_attach_forced(GUEST))
        .await
        .expect("forced writer");
    wait_clients(&mut agent, GUEST, "serial0", 2).await;
    drop(second);
    drop(first);
    wait_clients(&mut agent, GUEST, "serial0", 0).await;
    let more = lines(20, 30);
    guest.write(&more).await;
    printed.extend(&more);
    wait_offset(&mut agent, GUEST, "serial0", printed.len() as u64).await;
    drop(guest);
    wait_guest_connected(&mut agent, GUEST, "serial0", false).await;
    // A pipe of the same guest: its writers come and go.
    let (_, pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    wait_stream(&mut agent, GUEST, "qemu", "open", |s| s.writers == 1).await;
    drop(pipe);
    wait_stream(&mut agent, GUEST, "qemu", "closed", |s| s.writers == 0).await;
    drop(agent);
    // An in-place upgrade, a takeover, a crash of the successor and a restart.
    daemon.signal(rustix::process::Signal::USR1);
    wait_ready_lines(&daemon, 2).await;
    let mut successor = Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    successor.wait_ready().await;
    daemon.wait_exit().await;
    successor.assert_took_over();
    successor.signal(rustix::process::Signal::KILL);
    successor.wait_exit().await;
    daemon.restart().await;

    use EventKind::*;
    let events = events_on_disk(&daemon.log_dir(), GUEST, "serial0");
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            GuestConnected,
            WriterChanged,
            WriterChanged,
            WriterChanged,
            GuestDisconnected,
            DaemonStopped,
            DaemonStarted,
            DaemonStopped,
            DaemonStarted,
            DaemonStarted,
        ],
        "{events:#?}"
    );
    let detail = |i: usize| events[i].detail.as_str();
    assert!(
        detail(1).contains(" uid "),
        "the local peer's label: {}",
        detail(1)
    );
    assert!(detail(2).ends_with("(forced)"), "{}", detail(2));
    assert_eq!(detail(3), "", "nobody holds the lease");
    assert!(detail(6).starts_with("upgraded"), "{}", detail(6));
    assert!(detail(8).starts_with("taken over"), "{}", detail(8));
    assert!(
        detail(9).starts_with("restarted after a crash"),
        "{}",
        detail(9)
    );
    // In order with the bytes: the guest connected before its first byte, the writers came
    // after the boot output, the disconnect after everything.
    assert_eq!(events[0].offset, 0);
    assert_eq!(events[1].offset, boot.len() as u64);
    assert_eq!(events[4].offset, printed.len() as u64);
    assert_ordered(
        &entries_on_disk(&daemon.log_dir(), GUEST, "serial0"),
        printed.len() as u64,
    );
    let pipe_kinds: Vec<EventKind> = events_on_disk(&daemon.log_dir(), GUEST, "qemu")
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(&pipe_kinds[..2], [PipeOpened, PipeClosed], "{pipe_kinds:?}");
    assert_eq!(read_log(&daemon.log_dir(), GUEST, "serial0"), printed);
    daemon.stop().await;
}

/// `logs.time_index: false`: no index file is written, the log is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_index_off_no_index_file_is_written() {
    let mut daemon = Daemon::start_with(Some(NO_TIME_INDEX), &[]).await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    let data = lines(0, 100);
    pipe.write_all(&data).unwrap();
    drop(pipe);
    wait_closed(&mut agent, GUEST, "qemu", data.len() as u64).await;
    daemon.stop().await;
    let names: Vec<PathBuf> = std::fs::read_dir(daemon.log_dir().join(GUEST))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(names, [daemon.log_path(GUEST, "qemu")]);
    assert_eq!(read_log(&daemon.log_dir(), GUEST, "qemu"), data);
}

/// kill -9 after a rotation moved the log to `.log.1` and before its index followed: at the
/// next start the index is moved after it (it describes `.log.1`, not the new file), so every
/// index still describes its own file, and no byte is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_moving_a_log_and_its_index_is_repaired_at_start() {
    let mut daemon = Daemon::start_full(
        Some(NO_KEEPER),
        &[],
        None,
        &[("CONLOG_FAULT_POINTS", "logfile.rotate.index=kill@2")],
    )
    .await;
    let mut agent = daemon.agent().await;
    let lim = limits(4096, 2, LogMode::Rotate);
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", Some(lim)).await;
    let data = lines(0, 400);
    let mut sent = 0;
    for chunk in data.chunks(700) {
        if pipe.write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if daemon
            .stderr()
            .contains("fault point logfile.rotate.index reached")
        {
            break;
        }
    }
    daemon.wait_exit().await;
    assert!(sent > 0);
    drop(pipe);
    let log = daemon.log_path(GUEST, "qemu");
    // The crash left the moved file's index as the current one.
    let stale = IndexFile::open(Arc::new(File::open(index_path(&log)).unwrap()))
        .unwrap()
        .unwrap();
    let one = log.with_extension("log.1");
    assert!(!index_path(&one).exists());
    daemon.env.clear();
    daemon.restart().await;
    let moved = IndexFile::open(Arc::new(File::open(index_path(&one)).unwrap()))
        .unwrap()
        .unwrap();
    assert_eq!(moved.base_offset(), stale.base_offset());
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, GUEST, "qemu").await.unwrap();
    // Each index's base is its file's first offset.
    let mut start = info.first_offset;
    let mut checked = 0;
    for file in log_files(&daemon.log_dir(), GUEST, "qemu") {
        if let Ok(index) = File::open(index_path(&file)) {
            let index = IndexFile::open(Arc::new(index)).unwrap().unwrap();
            assert_eq!(index.base_offset(), start, "{}", file.display());
            checked += 1;
        }
        start += std::fs::metadata(&file).unwrap().len();
    }
    assert!(checked > 0, "no index beside the log files");
    assert_eq!(start, info.offset);
    let on_disk = read_log(&daemon.log_dir(), GUEST, "qemu");
    assert_same(
        "log files",
        &on_disk,
        &data[info.first_offset as usize..info.offset as usize],
    );
    assert_ordered(
        &entries_on_disk(&daemon.log_dir(), GUEST, "qemu"),
        info.offset,
    );
    daemon.stop().await;
}

/// An index that cannot be written (a directory stands where it should be) costs the stream
/// its times, never a byte: the failures are counted in `conlog_index_write_failures_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_write_failures_are_counted_and_cost_no_byte() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    let log = daemon.log_path(GUEST, "qemu");
    // The pipe's opening was recorded: that index goes, a directory takes its place.
    std::fs::remove_file(index_path(&log)).unwrap();
    std::fs::create_dir(index_path(&log)).unwrap();
    // Three bursts after quiet seconds: each is due an entry that cannot be written.
    let data = lines(0, 300);
    for chunk in data.chunks(3500) {
        pipe.write_all(chunk).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    drop(pipe);
    let info = wait_closed(&mut agent, GUEST, "qemu", data.len() as u64).await;
    assert_eq!(info.dropped_bytes, 0);
    let text = tokio::task::spawn_blocking({
        let metrics = daemon.metrics;
        move || http_get(metrics, "/metrics").1
    })
    .await
    .unwrap();
    let failures = metric(&text, "conlog_index_write_failures_total").expect("the metric");
    assert!(failures >= 3.0, "{failures}");
    assert_eq!(std::fs::read(&log).unwrap(), data);
    assert!(daemon.stderr().contains("cannot write the time index"));
}

/// A stream's `max_size` above 1 TiB (the index's 40-bit offsets) is refused with
/// `INVALID_ARGUMENT` naming the rule, and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_size_above_one_tebibyte_is_refused() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let status = create_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits((1 << 40) + 1, 1, LogMode::Rotate)),
    )
    .await
    .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("limits.max_size must be at most"),
        "{status:?}"
    );
    assert!(find_stream(&mut agent, GUEST, "qemu").await.is_none());
}

/// Attach fields taking the writer lease from whoever holds it.
fn proto_attach_forced(guest: &str) -> conlog::proto::Attach {
    conlog::proto::Attach {
        force: true,
        ..attach(guest, Mode::ReadWrite)
    }
}

/// Config without the keeper: a kill -9 closes the pipes, nothing is adopted.
const NO_KEEPER: &str = "keeper: off\n";

/// Waits for `count` "conlogd ready" lines of the current run.
async fn wait_ready_lines(daemon: &Daemon, count: usize) {
    let deadline = Instant::now() + DEADLINE;
    while daemon.stderr().matches("conlogd ready").count() < count {
        assert!(
            Instant::now() < deadline,
            "not ready {count} times:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(POLL).await;
    }
}
