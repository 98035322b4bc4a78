//! The daemon's lifecycle against the real binary: restarts after SIGTERM and SIGKILL keep
//! files and continue offsets, SIGTERM flushes pipes, and one daemon per runtime directory.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;

use conlog::proto::LogMode;
use std::io::Write;
use support::*;

const GUEST: &str = "vm-restart";

/// The files, position record and diagnostics of a stream, for failure messages.
fn state_of(daemon: &Daemon, guest: &str, stream: &str) -> String {
    let position = daemon
        .data_dir()
        .join(format!("state/guests/{guest}/{stream}.pos"));
    format!(
        "files {:?}, {}: {:?}\n{}",
        log_sizes(&daemon.log_dir(), guest, stream),
        position.display(),
        std::fs::read_to_string(&position),
        daemon.all_stderr()
    )
}
const STREAM: &str = "qemu";

/// SIGTERM, then a restart on the same directories: the stream is listed (closed) with the
/// same offset, a new pipe continues at that offset, and the file holds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigterm_keeps_files_and_continues_offsets() {
    let mut daemon = Daemon::start_with(Some(NO_TIME_INDEX), &[]).await;
    let small = Some(limits(4096, 2, LogMode::Rotate));
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, GUEST, STREAM, small).await;
    // Enough to rotate, so the restart must recover the offset of the current file's start.
    let first = 10_000;
    write_and_close(pipe, pattern(0, first as usize)).await;
    let before = wait_closed(&mut agent, GUEST, STREAM, first).await;
    drop(agent);

    let status = daemon.stop().await;
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(!daemon.socket().exists(), "a clean stop removes its socket");

    daemon.restart().await;
    assert!(
        daemon.stderr().contains("restored_streams=1"),
        "{}",
        daemon.stderr()
    );
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, GUEST, STREAM)
        .await
        .expect("the stream is listed after a restart");
    let context = || state_of(&daemon, GUEST, STREAM);
    assert!(!info.open, "no pipe survives a restart: {info:?}");
    assert_eq!(
        info.offset,
        first,
        "offset survives the restart; {}",
        context()
    );
    assert_eq!(
        (info.first_offset, info.bytes_on_disk),
        (before.first_offset, before.bytes_on_disk),
        "first offset and bytes on disk survive the restart: before {before:?}, after {info:?}; {}",
        context()
    );
    assert_eq!(
        (info.max_size, info.max_backups),
        (4096, 2),
        "the stream keeps its limits"
    );

    let (reply, pipe) = open_pipe(&mut agent, GUEST, STREAM, None).await;
    assert_eq!(
        reply.offset, first,
        "a new pipe continues at the old offset"
    );
    let second = 3_000;
    write_and_close(pipe, pattern(first, second as usize)).await;
    let total = first + second;
    let info = wait_closed(&mut agent, GUEST, STREAM, total).await;

    let log = read_log(&daemon.log_dir(), GUEST, STREAM);
    let start = total - log.len() as u64;
    assert_eq!(
        info.first_offset,
        start,
        "first offset vs files on disk: {info:?}; {}",
        state_of(&daemon, GUEST, STREAM)
    );
    assert!(
        log == pattern(start, log.len()),
        "the files do not hold bytes {start}..{total} in order"
    );
    assert!(log.len() as u64 <= 4096 * 3);
}

/// SIGKILL while a writer is open, then a restart: what the daemon had read is in the file and
/// the offset continues from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigkill_continues_offsets() {
    // Without a keeper: the pipe dies with the daemon (tests/faults/crash_keeper.rs: with one).
    let mut daemon = Daemon::start_with(Some("keeper: off\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(
        &mut agent,
        GUEST,
        STREAM,
        Some(limits(1 << 20, 3, LogMode::Rotate)),
    )
    .await;
    let first = 50_000u64;
    pipe.write_all(&pattern(0, first as usize)).unwrap();
    // The daemon has read (and written) every byte once the offset reaches `first`.
    let info = wait_offset(&mut agent, GUEST, STREAM, first).await;
    assert!(info.open, "the writer still holds the pipe");
    drop(agent);

    daemon.kill().await;
    drop(pipe);
    assert!(
        daemon.socket().exists(),
        "a killed daemon leaves its socket behind (stale)"
    );
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, GUEST, STREAM)
        .await
        .expect("the stream is listed after a crash");
    assert!(!info.open, "a pipe cannot survive a crash: {info:?}");
    assert!(
        info.broken,
        "a pipe lost in a crash is listed as broken: {info:?}"
    );
    assert_eq!(info.offset, first, "offset after the crash");
    let log = read_log(&daemon.log_dir(), GUEST, STREAM);
    assert_eq!(
        info.first_offset + log.len() as u64,
        info.offset,
        "offset == first offset on disk + bytes on disk"
    );
    assert!(
        log == pattern(0, first as usize),
        "the file lost or changed bytes"
    );

    let (reply, pipe) = open_pipe(&mut agent, GUEST, STREAM, None).await;
    assert_eq!(reply.offset, first);
    write_and_close(pipe, pattern(first, 1000)).await;
    let info = wait_closed(&mut agent, GUEST, STREAM, first + 1000).await;
    assert!(!info.broken, "a new pipe repairs the stream: {info:?}");
    let log = read_log(&daemon.log_dir(), GUEST, STREAM);
    assert!(log == pattern(0, first as usize + 1000));
    // A pipe that ended normally is not broken after a restart either.
    daemon.stop().await;
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, GUEST, STREAM)
        .await
        .expect("listed");
    assert!(!info.broken, "closed normally, so not broken: {info:?}");
}

/// SIGTERM while a writer still holds the pipe: the daemon exits 0 and the log has every byte
/// written before the signal (including what was still in the pipe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_every_pipe() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(
        &mut agent,
        GUEST,
        STREAM,
        Some(limits(4 << 20, 1, LogMode::Rotate)),
    )
    .await;
    drop(agent);
    let total = 1 << 20;
    // Write, keep the descriptor open, and signal as soon as write(2) has returned.
    let pipe = tokio::task::spawn_blocking(move || {
        let mut pipe = pipe;
        pipe.write_all(&pattern(0, total)).unwrap();
        pipe
    })
    .await
    .unwrap();
    let status = daemon.stop().await;
    assert!(
        status.success(),
        "SIGTERM exit: {status}; stderr:\n{}",
        daemon.stderr()
    );
    drop(pipe);
    let log = read_log(&daemon.log_dir(), GUEST, STREAM);
    assert_eq!(log.len(), total, "bytes in the log after SIGTERM");
    assert!(
        log == pattern(0, total),
        "the log differs from what was written"
    );

    // The recorded offset agrees after a restart.
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, GUEST, STREAM).await.unwrap();
    assert_eq!(info.offset, total as u64);
}

/// A second daemon on the same runtime directory refuses to start; a stale socket (daemon
/// killed) is replaced by the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_per_runtime_dir_and_stale_sockets_are_replaced() {
    let mut daemon = Daemon::start().await;

    let output = run_bounded_async(daemon.command()).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "second daemon started: {}",
        describe(&output)
    );
    assert!(
        stderr.contains("already serving"),
        "second daemon: {}",
        describe(&output)
    );
    assert!(
        stderr.contains(&daemon.pid().to_string()),
        "the message names the running daemon's pid: {stderr}"
    );
    // The first daemon was not disturbed.
    let mut agent = daemon.agent().await;
    let (reply, pipe) = open_pipe(&mut agent, "vm1", STREAM, None).await;
    write_and_close(pipe, b"ok\n".to_vec()).await;
    wait_closed(&mut agent, "vm1", STREAM, reply.offset + 3).await;
    drop(agent);

    daemon.kill().await;
    assert!(daemon.socket().exists(), "stale socket left by SIGKILL");
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, "vm1", STREAM).await.unwrap();
    assert_eq!(info.offset, 3);
    let (reply, pipe) = open_pipe(&mut agent, "vm1", STREAM, None).await;
    assert_eq!(reply.offset, 3);
    write_and_close(pipe, b"again\n".to_vec()).await;
    wait_closed(&mut agent, "vm1", STREAM, 9).await;
    assert_eq!(read_log(&daemon.log_dir(), "vm1", STREAM), b"ok\nagain\n");
}
