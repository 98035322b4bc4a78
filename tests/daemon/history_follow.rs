//! `Console.ReadHistory` with `follow: true` against the real `conlogd`: live reading across
//! many rotations and truncations, exact gap reports when a reader falls behind a stream that
//! keeps one backup, and the end of a follow (RemoveGuest, the client leaving).
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::history_common;
use crate::support;

use conlog::proto::{read_history_request::Start, HistoryChunk, LogMode, ReadHistoryRequest};
use history_common::*;
use std::fs::File;
use std::io::Write;
use std::time::Duration;
use support::*;
use tokio::task::JoinHandle;
use tonic::{Code, Streaming};

const MAX_SIZE: u64 = 4096;

fn follow(guest: &str, stream: &str, start: Option<Start>) -> ReadHistoryRequest {
    ReadHistoryRequest {
        follow: true,
        ..request(guest, stream, start)
    }
}

/// Reads a followed reply until the position reaches `until`, checking every data chunk
/// against the test pattern at its offset (a torn or mixed chunk would not match). Every
/// `pause_every` chunks it sleeps `pause` (a slow reader). Returns what it saw; the call stays
/// open (it is dropped with the task).
fn follow_pattern(
    mut chunks: Streaming<HistoryChunk>,
    until: u64,
    chunk_size: usize,
    pause_every: u64,
    pause: Duration,
) -> JoinHandle<Received> {
    tokio::spawn(async move {
        let mut got = Received::discarding(chunk_size);
        while got.position.is_none_or(|p| p < until) {
            let chunk = next(&mut chunks)
                .await
                .unwrap_or_else(|s| panic!("follow ended with {s:?} at {:?}", got.position))
                .unwrap_or_else(|| panic!("follow ended at {:?} before {until}", got.position));
            let offset = chunk.offset;
            assert_pattern(offset, got.push(&chunk));
            if pause_every > 0 && got.chunks.is_multiple_of(pause_every) {
                tokio::time::sleep(pause).await;
            }
        }
        assert_eq!(got.position, Some(until), "read past the end written");
        got
    })
}

/// Writes `pattern(from, len)` into `pipe` from a blocking thread in [`ODD_CHUNKS`]-sized
/// writes, sleeping `pause` after each; returns the pipe (open).
fn write_pattern(pipe: File, from: u64, len: u64, pause: Duration) -> JoinHandle<File> {
    tokio::task::spawn_blocking(move || {
        let mut pipe = pipe;
        let mut offset = from;
        for &chunk in ODD_CHUNKS.iter().cycle() {
            if offset == from + len {
                break;
            }
            let n = (chunk as u64).min(from + len - offset);
            pipe.write_all(&pattern(offset, n as usize))
                .expect("write into the log pipe");
            offset += n;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        pipe
    })
}

/// A writer forcing 40 rotations (`max_size` 4096, 50 backups so nothing is rotated away)
/// while three followers read: from offset 0 (opened on the empty stream), from the default
/// start over TCP, and from an offset not yet written (it waits for it). Each gets every byte
/// from its start, in order, once, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_across_40_rotations_gets_every_byte() {
    const GUEST: &str = "vm-follow";
    let total = 40 * MAX_SIZE + 1000;
    let late = 100_001;
    let daemon = Daemon::start_with(Some(NO_TIME_INDEX), &[]).await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(MAX_SIZE, 50, LogMode::Rotate)),
    )
    .await;
    let mut local = local_console(&daemon).await;
    let mut tcp = tcp_console(&daemon, GUEST).await;
    let from_zero = open(
        &mut local,
        follow(GUEST, "qemu", Some(Start::FromOffset(0))),
    )
    .await
    .expect("follow from 0");
    let oldest = open(&mut tcp, follow(GUEST, "", None))
        .await
        .expect("follow from the oldest byte");
    let waiting = open(
        &mut local,
        follow(GUEST, "qemu", Some(Start::FromOffset(late))),
    )
    .await
    .expect("follow from an offset not yet written");
    let readers = [
        follow_pattern(from_zero, total, DEFAULT_CHUNK, 0, Duration::ZERO),
        follow_pattern(oldest, total, DEFAULT_CHUNK, 3, Duration::from_millis(1)),
        follow_pattern(waiting, total, DEFAULT_CHUNK, 0, Duration::ZERO),
    ];

    let pipe = write_pattern(pipe, 0, total, Duration::from_millis(1))
        .await
        .expect("writer");
    for (reader, start) in readers.into_iter().zip([0, 0, late]) {
        let got = reader.await.expect("reader task");
        assert_eq!(got.first, Some(start), "first offset");
        assert!(got.gaps.is_empty(), "gaps with 50 backups: {:?}", got.gaps);
        assert_eq!(got.bytes, total - start);
    }
    drop(pipe);
    let info = wait_closed(&mut agent, GUEST, "qemu", total).await;
    // Every write is cut at the room left (src/logfile.rs), so 40 × max_size + 1000 bytes make
    // exactly 40 rotations.
    assert_eq!(info.rotations, 40, "{info:?}");
    assert_eq!(info.first_offset, 0, "nothing rotated away");
}

/// One backup (8 KiB on disk) and a reader that stops reading while 16 MiB are written (far
/// more than gRPC flow control buffers): when it reads on, it is told exactly which offsets
/// were rotated away, every byte it does get is the byte written at that offset, and it ends
/// with exactly what is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_follower_with_one_backup_gets_exact_gaps() {
    const GUEST: &str = "vm-stall";
    let first = 3000;
    let total = first + (16 << 20) + 1234;
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(MAX_SIZE, 1, LogMode::Rotate)),
    )
    .await;
    write_now(&mut pipe, &pattern(0, first as usize));
    wait_offset(&mut agent, GUEST, "qemu", first).await;
    let mut client = local_console(&daemon).await;
    let mut chunks = open(&mut client, follow(GUEST, "qemu", None))
        .await
        .expect("follow");
    let mut got = Received::discarding(DEFAULT_CHUNK);
    let chunk = next(&mut chunks).await.expect("first chunk").expect("open");
    assert_pattern(chunk.offset, got.push(&chunk));
    assert_eq!(got.first, Some(0));

    // The reader stalls while the rest is written.
    write_and_close(pipe, pattern(first, (total - first) as usize)).await;
    let info = wait_closed(&mut agent, GUEST, "qemu", total).await;
    let on_disk = read_log(&daemon.log_dir(), GUEST, "qemu");
    assert_eq!(info.first_offset + on_disk.len() as u64, total);

    let mut tail = Vec::new();
    while got.position.is_none_or(|p| p < total) {
        let chunk = next(&mut chunks)
            .await
            .expect("follow goes on")
            .expect("follow does not end");
        let gaps = got.gaps.len();
        assert_pattern(chunk.offset, got.push(&chunk));
        if got.gaps.len() > gaps {
            tail.clear();
        } else {
            tail.extend_from_slice(&chunk.data);
        }
    }
    assert_eq!(got.position, Some(total));
    assert!(
        !got.gaps.is_empty(),
        "16 MiB rotated past a stalled reader without a gap"
    );
    let missed: u64 = got.gaps.iter().map(|(from, to)| to - from).sum();
    assert_eq!(
        got.bytes + missed,
        total,
        "every offset is either data or in a gap"
    );
    let last = *got.gaps.last().unwrap();
    assert_eq!(
        last.1, info.first_offset,
        "the last gap ends at the oldest byte on disk"
    );
    assert!(
        tail == on_disk,
        "after the last gap the reader gets exactly what is on disk"
    );
    eprintln!(
        "stalled reader: {} bytes in {} chunks, gaps {:?}",
        got.bytes, got.chunks, got.gaps
    );
}

/// A fast writer and a slow reader reading concurrently on a stream that keeps little on disk:
/// gaps may or may not happen (timing), but each one is exact, every chunk is the bytes written
/// at its offset (no torn or mixed chunk when a read races a rotation or truncation), and the
/// reader reaches the end.
async fn slow_follower(guest: &str, mode: LogMode) {
    let total = (8 << 20) + 4321;
    let daemon = Daemon::start_with(Some("history:\n  chunk_size: 1KiB\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, guest, "qemu", Some(limits(MAX_SIZE, 1, mode))).await;
    let mut client = local_console(&daemon).await;
    let chunks = open(
        &mut client,
        follow(guest, "qemu", Some(Start::FromOffset(0))),
    )
    .await
    .expect("follow");
    let reader = follow_pattern(chunks, total, 1024, 64, Duration::from_millis(1));
    let pipe = write_pattern(pipe, 0, total, Duration::ZERO)
        .await
        .expect("writer");
    let got = reader.await.expect("reader");
    let missed: u64 = got.gaps.iter().map(|(from, to)| to - from).sum();
    assert_eq!(got.first, Some(0));
    assert_eq!(got.bytes + missed, total);
    eprintln!(
        "slow reader ({mode:?}): {} bytes, {} gaps ({missed} bytes missed)",
        got.bytes,
        got.gaps.len()
    );
    drop(pipe);
}

/// [`slow_follower`] with one backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_follower_with_one_backup_never_gets_a_torn_chunk() {
    slow_follower("vm-slow", LogMode::Rotate).await;
}

/// [`slow_follower`] in truncate mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_follower_across_truncations_never_gets_a_torn_chunk() {
    slow_follower("vm-slow-trunc", LogMode::Truncate).await;
}

/// Writes `sizes` (cycled) into the pipe until `total`, each write waiting until the follower
/// has received everything written before it (lock step), and checks every chunk.
async fn lock_step(
    pipe: &mut File,
    chunks: &mut Streaming<HistoryChunk>,
    got: &mut Received,
    total: u64,
    sizes: &[u64],
) {
    let mut written = got.position.unwrap_or(0);
    for &size in sizes.iter().cycle() {
        if written >= total {
            break;
        }
        let n = size.min(total - written);
        write_now(pipe, &pattern(written, n as usize));
        written += n;
        while got.position.is_none_or(|p| p < written) {
            let chunk = next(chunks)
                .await
                .expect("follow goes on")
                .expect("follow does not end");
            assert_pattern(chunk.offset, got.push(&chunk));
        }
        assert_eq!(got.position, Some(written));
    }
}

/// Truncate mode (one file that restarts empty when full), followed live across 40
/// truncations by a reader that keeps up (each write waits until it has been read, and no
/// write crosses a truncation point): every byte, in order, no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_across_truncations_gets_every_byte() {
    const GUEST: &str = "vm-trunc";
    let total = 40 * MAX_SIZE + 100;
    let daemon = Daemon::start_with(Some(NO_TIME_INDEX), &[]).await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(
        &mut agent,
        GUEST,
        "serial-out",
        Some(limits(MAX_SIZE, 3, LogMode::Truncate)),
    )
    .await;
    let mut client = local_console(&daemon).await;
    let mut chunks = open(&mut client, follow(GUEST, "serial-out", None))
        .await
        .expect("follow");
    let mut got = Received::new(DEFAULT_CHUNK);
    // Sums to 4096: every file is filled exactly, then the next write truncates it.
    lock_step(
        &mut pipe,
        &mut chunks,
        &mut got,
        total,
        &[1, 7, 1000, 2000, 1088],
    )
    .await;
    assert!(got.gaps.is_empty(), "gaps: {:?}", got.gaps);
    assert!(got.data == pattern(0, total as usize));
    drop(pipe);
    let info = wait_closed(&mut agent, GUEST, "serial-out", total).await;
    assert_eq!(info.rotations, 40, "truncations");
    assert_eq!(
        log_file_names(&daemon.log_dir(), GUEST, "serial-out"),
        ["serial-out.log"]
    );
}

/// Truncate mode with writes that cross the truncation point (the log fills the file, truncates
/// it and writes the rest), followed by a reader that has read everything written before each
/// write. A caught-up `tail -f` must not lose bytes to a truncation (docs/design.md, ReadHistory follow): the
/// daemon held the full file open when it truncated it, so the reader gets every byte, in
/// order, no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_up_follower_loses_nothing_when_a_write_crosses_a_truncation() {
    const GUEST: &str = "vm-cross";
    let total = 20 * MAX_SIZE + 100;
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(MAX_SIZE, 3, LogMode::Truncate)),
    )
    .await;
    let mut client = local_console(&daemon).await;
    let mut chunks = open(&mut client, follow(GUEST, "qemu", None))
        .await
        .expect("follow");
    let mut got = Received::new(DEFAULT_CHUNK);
    lock_step(&mut pipe, &mut chunks, &mut got, total, &[3000]).await;
    assert!(
        got.gaps.is_empty(),
        "a follower that had read everything lost {:?} at truncations",
        got.gaps
    );
    assert!(got.data == pattern(0, total as usize));
}

/// `RemoveGuest` ends every follower of the guest's streams with OK: one that is caught up,
/// one waiting for an offset not yet written, one over TCP; afterwards a follow of the removed
/// guest reads its logs and ends at their end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ends_cleanly_when_the_guest_is_removed() {
    const GUEST: &str = "vm-remove";
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(MAX_SIZE, 3, LogMode::Rotate)),
    )
    .await;
    write_now(&mut pipe, &pattern(0, 10_000));
    wait_offset(&mut agent, GUEST, "qemu", 10_000).await;
    let mut local = local_console(&daemon).await;
    let mut tcp = tcp_console(&daemon, GUEST).await;
    let mut followers = vec![
        (
            open(&mut local, follow(GUEST, "qemu", None)).await.unwrap(),
            10_000,
        ),
        (
            open(
                &mut local,
                follow(GUEST, "qemu", Some(Start::FromOffset(50_000))),
            )
            .await
            .unwrap(),
            0,
        ),
        (
            open(&mut tcp, follow(GUEST, "", Some(Start::TailBytes(100))))
                .await
                .unwrap(),
            100,
        ),
    ];
    let mut received = Vec::new();
    for (chunks, expect) in &mut followers {
        let mut got = Received::new(DEFAULT_CHUNK);
        while got.bytes < *expect {
            let chunk = next(chunks).await.unwrap().expect("follow goes on");
            assert_pattern(chunk.offset, got.push(&chunk));
        }
        received.push(got);
    }
    // The pipe's writer is still open: removal does not wait for it.
    agent
        .remove_guest(conlog::proto::RemoveGuestRequest {
            guest: GUEST.into(),
            ..Default::default()
        })
        .await
        .expect("RemoveGuest");
    for ((chunks, _), got) in followers.iter_mut().zip(&mut received) {
        // Whatever the pipe still held may come first; then the end, with OK.
        loop {
            match next(chunks).await {
                Ok(Some(chunk)) => {
                    assert_pattern(chunk.offset, got.push(&chunk));
                }
                Ok(None) => break,
                Err(status) => panic!("follow ended with {status:?}, not OK"),
            }
        }
    }
    // Its logs stay on disk: a follow of the removed guest reads them and ends at their end.
    let mut chunks = open(&mut local, follow(GUEST, "qemu", None)).await.unwrap();
    let mut got = Received::new(DEFAULT_CHUNK);
    while let Some(chunk) = next(&mut chunks).await.unwrap() {
        assert_pattern(chunk.offset, got.push(&chunk));
    }
    assert_eq!((got.first, got.position), (Some(0), Some(10_000)));
    drop(pipe);
}

/// A follower that leaves: its call ends on the daemon (the descriptors it held on rotated
/// files are closed), and the daemon keeps logging and serving history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ends_when_the_client_leaves() {
    const GUEST: &str = "vm-leave";
    const MIB: u64 = 1 << 20;
    let total = 8 * MIB;
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(MIB, 10, LogMode::Rotate)),
    )
    .await;
    let pipe = write_pattern(pipe, 0, total, Duration::ZERO)
        .await
        .expect("writer");
    wait_offset(&mut agent, GUEST, "qemu", total).await;
    let guest_dir = daemon.log_dir().join(GUEST);
    // The stream's own descriptor on its current file.
    assert_eq!(fds_under(daemon.pid(), &guest_dir), 1);

    // A follower that reads one chunk and stops: more than flow control lets through is
    // waiting, so the daemon's reader holds descriptors on the stream's files.
    let mut client = local_console(&daemon).await;
    let mut stalled = open(&mut client, follow(GUEST, "qemu", None))
        .await
        .unwrap();
    let chunk = next(&mut stalled).await.unwrap().unwrap();
    assert_eq!(chunk.offset, 0);
    // A caught-up follower, waiting for new data.
    let mut idle = open(
        &mut client,
        follow(GUEST, "qemu", Some(Start::TailBytes(0))),
    )
    .await
    .unwrap();
    let pid = daemon.pid();
    wait_until("the stalled reader holds the stream's files", || {
        fds_under(pid, &guest_dir) > 1
    })
    .await;
    drop(stalled);
    drop(idle_check(&mut idle).await);
    drop(idle);
    drop(client);
    wait_until(
        "the readers of the departed client close their files",
        || fds_under(pid, &guest_dir) == 1,
    )
    .await;

    // The daemon goes on: more output is logged and a new reader gets it all.
    let pipe = write_pattern(pipe, total, 5000, Duration::ZERO)
        .await
        .expect("writer");
    drop(pipe);
    wait_closed(&mut agent, GUEST, "qemu", total + 5000).await;
    let mut client = local_console(&daemon).await;
    let got = Received::of(
        &read_all(
            &mut client,
            request(GUEST, "qemu", Some(Start::TailBytes(MIB))),
        )
        .await
        .unwrap(),
        DEFAULT_CHUNK,
    );
    assert!(got.data == pattern(total + 5000 - MIB, MIB as usize));
}

/// Checks that a caught-up follower has nothing to say yet (returns it for dropping).
async fn idle_check(idle: &mut Streaming<HistoryChunk>) -> Option<HistoryChunk> {
    match tokio::time::timeout(Duration::from_millis(200), idle.message()).await {
        Err(_) => None,
        Ok(result) => panic!("a caught-up follower got {result:?}"),
    }
}

/// A follower over TCP across a daemon shutdown (SIGTERM): the daemon does not wait for the
/// follower to go away (no "gRPC calls still running" drain timeout in its log), and the call
/// ends with OK or UNAVAILABLE (resume by offset), not with a broken connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ends_when_the_daemon_stops() {
    let mut daemon = Daemon::start().await;
    logged_stream(
        &daemon,
        "vm1",
        "qemu",
        MAX_SIZE,
        3,
        LogMode::Rotate,
        &pattern(0, 500),
    )
    .await;
    let mut client = tcp_console(&daemon, "vm1").await;
    let mut chunks = open(&mut client, follow("vm1", "qemu", None))
        .await
        .unwrap();
    let chunk = next(&mut chunks).await.unwrap().unwrap();
    assert_eq!(chunk.data, pattern(0, 500));
    let status = daemon.stop().await;
    assert!(status.success(), "conlogd exited with {status}");
    let stderr = daemon.stderr();
    assert!(
        !stderr.contains("still running"),
        "the follower held up the shutdown until the drain timeout:\n{stderr}"
    );
    // The client is told to come back and resume at its offset, not that the stream ended.
    match next(&mut chunks).await {
        Err(s) if s.code() == Code::Unavailable && s.message().contains("from_offset 500") => {}
        other => panic!("follow after shutdown: {other:?}\n{stderr}"),
    }
}
