//! Bytes the log cannot take, against the real binary on a tiny tmpfs filled for the test (CI
//! runs as root): live console viewers still see every byte; the bytes take their offsets, so
//! clients' offsets, the stream's `dropped_bytes` and the gaps `ReadHistory` reports agree; and
//! `dropped_bytes` survives an in-place upgrade (SIGUSR1), a takeover and a kill -9 with a
//! restart.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::history_common;
use crate::support;
use crate::upgrade_common;

use conlog::proto::{self, attach::Mode, read_history_request::Start, LogMode};
use history_common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use support::*;
use upgrade_common::Successor;

/// A tmpfs mounted for the duration of a test.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "this test mounts a small tmpfs to fill it and needs root with mount rights: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self(path.to_owned())
    }

    /// Fills what is left with a file; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
        let _ = file.write_all(&block[..1]);
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A daemon whose log directory is a fresh 256 KiB tmpfs.
async fn daemon_on_tmpfs() -> (Daemon, Tmpfs, tempfile::TempDir) {
    let scratch = tempfile::Builder::new()
        .prefix("conlog-drop-")
        .tempdir()
        .unwrap();
    let logs = scratch.path().join("logs");
    let tmpfs = Tmpfs::mount(&logs, "256k");
    let daemon = Daemon::start_with(None, &["--log-dir", logs.to_str().unwrap()]).await;
    (daemon, tmpfs, scratch)
}

/// Line `n` of a guest's numbered output.
fn numbered(from: u64, to: u64) -> Vec<u8> {
    (from..to)
        .flat_map(|n| format!("guest line {n:06} {}\n", "x".repeat((n % 17) as usize)).into_bytes())
        .collect()
}

/// `ReadHistory` of `guest/stream` from offset 0: its gaps and its data by offset, checked.
async fn history_of(daemon: &Daemon, guest: &str, stream: &str) -> Received {
    let mut console = local_console(daemon).await;
    let chunks = read_ok(
        &mut console,
        request(guest, stream, Some(Start::FromOffset(0))),
    )
    .await;
    Received::of(&chunks, DEFAULT_CHUNK)
}

/// Checks that history agrees with the bytes the guest sent (`sent[offset]`) and with
/// `dropped`: data at its offsets, gaps summing to exactly what was dropped.
fn assert_history_agrees(received: &Received, sent: &[u8], dropped: u64) {
    assert_eq!(received.first, Some(0));
    assert_eq!(received.position, Some(sent.len() as u64));
    let gap: u64 = received.gaps.iter().map(|(from, to)| to - from).sum();
    assert_eq!(gap, dropped, "history's gaps are the dropped bytes");
    // Data between the gaps is exactly what was sent at those offsets.
    let mut expected = Vec::new();
    let mut at = 0u64;
    for (from, to) in received
        .gaps
        .iter()
        .chain(std::iter::once(&(sent.len() as u64, sent.len() as u64)))
    {
        expected.extend_from_slice(&sent[at as usize..*from as usize]);
        at = *to;
    }
    assert!(received.data == expected, "history's bytes are the guest's");
}

/// A console guest prints numbered lines while the log's disk is full: a WatchConsole viewer
/// receives every line live, at the offsets the stream hands out; `dropped_bytes` equals the
/// gaps history reports, and logging resumes when space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_does_not_blind_live_viewers() {
    let (mut daemon, tmpfs, _scratch) = daemon_on_tmpfs().await;
    let mut agent = daemon.agent().await;
    let limits = limits(64 << 10, 1, LogMode::Rotate);
    let console = create_console(&mut agent, "vm", "", Some(limits))
        .await
        .expect("CreateConsole");
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    wait_guest_connected(&mut agent, "vm", "serial0", true).await;
    let mut viewer = watch(
        local_channel(&daemon).await,
        watch_request("vm", Mode::ReadOnly),
    )
    .await
    .expect("WatchConsole");

    let before = numbered(0, 100);
    guest.write(&before).await;
    viewer.wait_output_len(before.len() as u64).await;
    let filler = tmpfs.fill();
    let during = numbered(100, 3000);
    guest.write(&during).await;
    let sent = [before, during].concat();
    let seen = viewer.wait_output_len(sent.len() as u64).await;
    assert!(seen == sent.as_slice(), "the viewer saw every line live");
    let info = wait_offset(&mut agent, "vm", "serial0", sent.len() as u64).await;
    assert!(
        info.dropped_bytes > 0,
        "the disk was full, bytes were dropped: {info:?}"
    );
    assert!(info.dropped_bytes < sent.len() as u64);

    // Space returns: logging resumes; the viewer goes on at the same offsets.
    std::fs::remove_file(filler).unwrap();
    let after = numbered(3000, 3200);
    guest.write(&after).await;
    let sent = [sent, after].concat();
    let seen = viewer.wait_output_len(sent.len() as u64).await;
    assert!(seen == sent.as_slice());
    assert!(viewer.lagged().is_empty(), "{:?}", viewer.lagged());
    let info = wait_offset(&mut agent, "vm", "serial0", sent.len() as u64).await;
    let history = history_of(&daemon, "vm", "serial0").await;
    assert_history_agrees(&history, &sent, info.dropped_bytes);
    // A viewer attaching now with a replay gets the bytes after the last gap, at their
    // offsets, then live output right after them.
    let mut late = watch(
        local_channel(&daemon).await,
        proto::WatchConsoleRequest {
            replay_bytes: 1 << 20,
            ..watch_request("vm", Mode::ReadOnly)
        },
    )
    .await
    .expect("WatchConsole with replay");
    let replay_from = late.attached.offset;
    let (_, last_gap_end) = *history.gaps.last().expect("a gap");
    assert_eq!(replay_from, last_gap_end, "the replay starts after the gap");
    let more = numbered(3200, 3210);
    guest.write(&more).await;
    let sent = [sent, more].concat();
    let seen = late.wait_output_len(sent.len() as u64 - replay_from).await;
    assert!(
        seen == &sent[replay_from as usize..],
        "replay and live output follow each other"
    );
    let log = std::fs::read(&console.log_path).unwrap();
    assert!(
        log.ends_with(&numbered(3000, 3210)),
        "logging resumed: {info:?}, {:?}",
        String::from_utf8_lossy(&log[log.len().saturating_sub(300)..])
    );
    drop(viewer);
    drop(late);
    daemon.stop().await;
}

/// Counts the "conlogd ready" lines of the current run's diagnostics.
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

/// A stream's `dropped_bytes` is the same after an in-place upgrade, a takeover, and a kill -9
/// and a restart; history's gaps still equal it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_bytes_survive_upgrades_and_crashes() {
    let (mut daemon, tmpfs, _scratch) = daemon_on_tmpfs().await;
    let mut agent = daemon.agent().await;
    let limits = limits(64 << 10, 1, LogMode::Rotate);
    let (_, mut pipe) = open_pipe(&mut agent, "vm", "qemu", Some(limits)).await;
    let sent = pattern(0, 60_000);
    pipe.write_all(&sent[..1000]).unwrap();
    wait_offset(&mut agent, "vm", "qemu", 1000).await;
    // A reader following the stream live from the start.
    let mut console = local_console(&daemon).await;
    let mut follower = open(
        &mut console,
        conlog::proto::ReadHistoryRequest {
            follow: true,
            ..request("vm", "qemu", Some(Start::FromOffset(0)))
        },
    )
    .await
    .expect("ReadHistory follow");
    let mut followed = Received::new(DEFAULT_CHUNK);
    while followed.position != Some(1000) {
        let chunk = next(&mut follower).await.unwrap().expect("following");
        followed.push(&chunk);
    }
    let filler = tmpfs.fill();
    pipe.write_all(&sent[1000..50_000]).unwrap();
    let info = wait_offset(&mut agent, "vm", "qemu", 50_000).await;
    let dropped = info.dropped_bytes;
    assert!(dropped > 0, "{info:?}");
    std::fs::remove_file(filler).unwrap();
    pipe.write_all(&sent[50_000..]).unwrap();
    let info = wait_offset(&mut agent, "vm", "qemu", 60_000).await;
    assert_eq!(
        info.dropped_bytes, dropped,
        "nothing dropped with space back"
    );
    // The follower saw the same: the dropped range as a gap, the rest at its offsets.
    while followed.position != Some(60_000) {
        let chunk = next(&mut follower).await.unwrap().expect("following");
        followed.push(&chunk);
    }
    assert_history_agrees(&followed, &sent, dropped);
    drop(follower);

    // In-place upgrade: the pipe is carried, and so is the count.
    daemon.signal(rustix::process::Signal::USR1);
    wait_ready_lines(&daemon, 2).await;
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, "vm", "qemu").await.unwrap();
    assert_eq!(info.dropped_bytes, dropped, "after the upgrade: {info:?}");
    assert_eq!(info.offset, 60_000);

    // A takeover by a successor (`--takeover`), which then dies with kill -9; a restart.
    let mut successor = Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    successor.wait_ready().await;
    daemon.wait_exit().await;
    successor.assert_took_over();
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, "vm", "qemu").await.unwrap();
    assert_eq!(info.dropped_bytes, dropped, "after the takeover: {info:?}");
    drop(pipe);
    wait_closed(&mut agent, "vm", "qemu", 60_000).await;
    drop(agent);
    successor.signal(rustix::process::Signal::KILL);
    successor.wait_exit().await;
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, "vm", "qemu").await.unwrap();
    assert_eq!(info.dropped_bytes, dropped, "after kill -9: {info:?}");
    assert_eq!(info.offset, 60_000);
    assert_history_agrees(&history_of(&daemon, "vm", "qemu").await, &sent, dropped);
    daemon.stop().await;
}
