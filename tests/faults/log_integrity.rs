//! Log integrity under faults, against the real binary: a kill -9 at every step of a rotation
//! (truncate mode, rotate with no backup, rotate with backups) never moves offsets back nor
//! gives an offset to two different bytes; neither does a log file shorter than its position
//! record (a power cut), nor a reboot that lost bytes already given offsets; a shrunk `max_size` holds as soon as the call returns; a rotation whose
//! new file cannot be opened (EMFILE, injected with strace) counts every byte it could not log,
//! and logging resumes.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::history_common;
use crate::support;

use conlog::proto::{read_history_request::Start, LogMode};
use history_common::*;
use std::os::unix::process::ExitStatusExt;
#[cfg(feature = "external-tools")]
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;
use support::*;

/// A conlogd run on a [`Daemon`]'s directories but outside its handle: with fault points armed
/// or under a wrapper (strace). Killed when dropped.
struct Run {
    child: Child,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Run {
    /// Starts `wrapper… conlogd <daemon's arguments>` with `CONLOG_FAULT_POINTS=faults`; waits
    /// until it is ready.
    async fn start(daemon: &Daemon, faults: &str, wrapper: &[&str]) -> Self {
        let base = daemon.command();
        let mut cmd = match wrapper.split_first() {
            None => Command::new(base.get_program()),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(base.get_program());
                cmd
            }
        };
        cmd.args(base.get_args());
        for (key, value) in base.get_envs() {
            if let Some(value) = value {
                cmd.env(key, value);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr");
        let file = std::fs::File::create(&stderr).unwrap();
        let child = cmd
            .env("CONLOG_FAULT_POINTS", faults)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("spawn {cmd:?} (a wrapper such as strace must be on PATH): {e}")
            });
        let mut run = Self {
            child,
            stderr,
            _dir: dir,
        };
        let deadline = Instant::now() + DEADLINE;
        while !run.text().contains("conlogd ready") {
            if let Some(status) = run.child.try_wait().unwrap() {
                panic!("conlogd exited ({status}):\n{}", run.text());
            }
            assert!(Instant::now() < deadline, "not ready:\n{}", run.text());
            tokio::time::sleep(POLL).await;
        }
        run
    }

    fn text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }

    /// Waits (bounded) until the fault point killed the daemon.
    async fn wait_killed(&mut self, what: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "{what}: {status}\n{}",
                    self.text()
                );
                assert!(self.text().contains("fault point"), "{}", self.text());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never killed\n{}",
                self.text()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(feature = "external-tools")]
impl Run {
    /// Stops the conlogd that the wrapper (strace) started with SIGTERM; waits for both.
    async fn stop_wrapped(&mut self) {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .expect("the wrapper's children");
        let daemon: i32 = children
            .split_whitespace()
            .next()
            .expect("conlogd runs under the wrapper")
            .parse()
            .unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(daemon).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let deadline = Instant::now() + DEADLINE;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "conlogd did not stop");
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every step of a rotation, in order (src/logfile).
const ROTATION_STEPS: [&str; 5] = [
    "logfile.rotate.begin",
    "logfile.rotate.recorded",
    "logfile.rotate.moved",
    "logfile.rotate.created",
    "logfile.rotate.done",
];

const MAX_SIZE: u64 = 4096;

/// Everything `ReadHistory` returns for `guest/qemu` from offset 0, checked contiguous.
async fn history(daemon: &Daemon, guest: &str) -> Received {
    let mut console = local_console(daemon).await;
    let chunks = read_ok(
        &mut console,
        request(guest, "qemu", Some(Start::FromOffset(0))),
    )
    .await;
    Received::of(&chunks, DEFAULT_CHUNK)
}

/// Data chunks of `guest/qemu`'s history as `(offset, bytes)`.
async fn history_data(daemon: &Daemon, guest: &str) -> Vec<(u64, Vec<u8>)> {
    let mut console = local_console(daemon).await;
    read_ok(&mut console, request(guest, "qemu", None))
        .await
        .into_iter()
        .filter(|c| c.gap.is_none())
        .map(|c| (c.offset, c.data.to_vec()))
        .collect()
}

/// kill -9 at each step of the first rotation, then a restart: the offset is at least what was
/// logged before (no offset goes back), the new bytes go after it, and every byte history
/// returns is the one first logged at its offset (no offset given twice). Nothing is lost: the
/// rotation comes before the read that needs it, and the keeper kept the pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_step_of_a_rotation_never_moves_offsets_back() {
    for (mode, backups) in [
        (LogMode::Truncate, 0),
        (LogMode::Rotate, 0),
        (LogMode::Rotate, 2),
    ] {
        for step in ROTATION_STEPS {
            let what = format!("{mode:?} with {backups} backups, kill at {step}");
            let mut daemon = Daemon::start().await;
            let mut agent = daemon.agent().await;
            let lim = limits(MAX_SIZE, backups, mode);
            let (_, pipe) = open_pipe(&mut agent, "vm", "qemu", Some(lim)).await;
            write_and_close(pipe, pattern(0, 3000)).await;
            wait_closed(&mut agent, "vm", "qemu", 3000).await;
            drop(agent);
            daemon.stop().await;

            // This run dies inside its first rotation.
            let mut run = Run::start(&daemon, &format!("{step}=kill@1"), &[]).await;
            let mut agent = daemon.agent().await;
            let (reply, pipe) = open_pipe(&mut agent, "vm", "qemu", None).await;
            assert_eq!(reply.offset, 3000, "{what}");
            // 1096 bytes fill the file; the next read rotates.
            write_and_close(pipe, pattern(3000, 2000)).await;
            run.wait_killed(&what).await;
            drop(run);
            drop(agent);

            daemon.restart().await;
            let mut agent = daemon.agent().await;
            // The keeper kept the pipe: the next daemon logs what it still held and closes it.
            let info = wait_stream(&mut agent, "vm", "qemu", "closed", |s| !s.open).await;
            assert!(
                info.offset >= MAX_SIZE,
                "{what}: offset went back to {} (logged up to {MAX_SIZE})",
                info.offset
            );
            // The rotation comes before the read that needs it: a crash inside it loses nothing.
            assert_eq!(info.offset, 5000, "{what}: bytes lost");
            let (reply, pipe) = open_pipe(&mut agent, "vm", "qemu", None).await;
            assert_eq!(reply.offset, info.offset, "{what}");
            let after = b"written after the crash\n".repeat(20);
            write_and_close(pipe, after.clone()).await;
            let end = info.offset + after.len() as u64;
            wait_closed(&mut agent, "vm", "qemu", end).await;

            let received = history(&daemon, "vm").await;
            assert_eq!(received.position, Some(end), "{what}");
            for (offset, data) in history_data(&daemon, "vm").await {
                for (i, byte) in data.iter().enumerate() {
                    let at = offset + i as u64;
                    let want = if at < 5000 {
                        pattern_byte(at)
                    } else if at >= info.offset {
                        after[(at - info.offset) as usize]
                    } else {
                        panic!("{what}: offset {at} holds a byte, but nothing was logged there")
                    };
                    assert_eq!(*byte, want, "{what}: offset {at} given to another byte");
                }
            }
            // What a crash-free rotation keeps is still there.
            if backups > 0 {
                assert_eq!(received.first, Some(0), "{what}: the backup was lost");
            }
            daemon.stop().await;
        }
    }
}

/// A power cut can leave a log file shorter than its position record says: the offsets go on
/// from the recorded end, and the lost range is a gap in history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_shorter_than_its_record_never_moves_offsets_back() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(
        &mut agent,
        "vm",
        "qemu",
        Some(limits(1 << 20, 1, LogMode::Rotate)),
    )
    .await;
    write_and_close(pipe, pattern(0, 30_000)).await;
    wait_closed(&mut agent, "vm", "qemu", 30_000).await;
    drop(agent);
    daemon.stop().await;
    // The record reached the disk, the file's last 20,000 bytes did not.
    std::fs::OpenOptions::new()
        .write(true)
        .open(daemon.log_path("vm", "qemu"))
        .unwrap()
        .set_len(10_000)
        .unwrap();
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let (reply, pipe) = open_pipe(&mut agent, "vm", "qemu", None).await;
    assert_eq!(reply.offset, 30_000, "offsets never go back");
    write_and_close(pipe, pattern(30_000, 5_000)).await;
    wait_closed(&mut agent, "vm", "qemu", 35_000).await;
    let received = history(&daemon, "vm").await;
    assert_eq!(received.gaps, vec![(10_000, 30_000)]);
    assert_eq!(
        received.data,
        [pattern(0, 10_000), pattern(30_000, 5_000)].concat()
    );
}

/// A power cut and a reboot: the log lost bytes that a reader had already been given offsets
/// for, and the position record is the one of the last sync. The offsets go on after every
/// offset that may have been handed out (the record's reservation), never at the file's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reboot_offsets_go_on_past_what_may_have_been_handed_out() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let lim = limits(1 << 20, 1, LogMode::Rotate);
    let (_, pipe) = open_pipe(&mut agent, "vm", "qemu", Some(lim)).await;
    write_and_close(pipe, pattern(0, 30_000)).await;
    wait_closed(&mut agent, "vm", "qemu", 30_000).await;
    drop(agent);
    daemon.stop().await;
    // What the disk holds after the power cut: the record as synced (another boot), a third of
    // the bytes.
    let record = daemon.data_dir().join("state/guests/vm/qemu.pos");
    let mut json: serde_json::Value =
        serde_json::from_slice(std::fs::read(&record).unwrap().trim_ascii_end()).unwrap();
    let reserved = json["reserved"].as_u64().expect("a reservation");
    assert!(reserved >= 30_000, "{json}");
    json["boot"] = "00000000-0000-0000-0000-000000000000".into();
    let mut bytes = serde_json::to_vec(&json).unwrap();
    bytes.resize(256, b' ');
    std::fs::write(&record, bytes).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(daemon.log_path("vm", "qemu"))
        .unwrap()
        .set_len(10_000)
        .unwrap();

    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let (reply, pipe) = open_pipe(&mut agent, "vm", "qemu", None).await;
    assert_eq!(
        reply.offset, reserved,
        "offsets go on after the reservation"
    );
    write_and_close(pipe, pattern(reserved, 5_000)).await;
    wait_closed(&mut agent, "vm", "qemu", reserved + 5_000).await;
    let received = history(&daemon, "vm").await;
    assert_eq!(received.gaps, vec![(10_000, reserved)]);
    assert_eq!(
        received.data,
        [pattern(0, 10_000), pattern(reserved, 5_000)].concat()
    );
}

/// Bytes of all of a stream's files on disk, their time indexes included.
fn bytes_on_disk(daemon: &Daemon, guest: &str) -> u64 {
    log_files(&daemon.log_dir(), guest, "qemu")
        .iter()
        .flat_map(|log| [log.clone(), conlog::logfile::index::index_path(log)])
        .filter_map(|path| std::fs::metadata(path).ok())
        .map(|m| m.len())
        .sum()
}

/// Shrinking a live stream from 1 MiB × 4 backups to 4 KiB: the new cap holds when
/// `CreateLogPipe` returns, offsets stay absolute, and history reports the removed range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrunk_max_size_holds_when_the_call_returns() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let big = limits(1 << 20, 4, LogMode::Rotate);
    let (_, mut pipe) = open_pipe(&mut agent, "vm", "qemu", Some(big)).await;
    let total = (4 << 20) + 300_000;
    let data = pattern(0, total);
    let writer = std::thread::spawn(move || {
        std::io::Write::write_all(&mut pipe, &data).unwrap();
        pipe
    });
    wait_offset(&mut agent, "vm", "qemu", total as u64).await;
    let pipe = writer.join().unwrap();
    assert!(bytes_on_disk(&daemon, "vm") > 4 << 20);

    let small = limits(MAX_SIZE, 4, LogMode::Rotate);
    let cap = MAX_SIZE * 5;
    create_pipe(&mut agent, "vm", "qemu", Some(small))
        .await
        .expect("new limits");
    let on_disk = bytes_on_disk(&daemon, "vm");
    assert!(
        on_disk <= cap,
        "{on_disk} bytes on disk against a cap of {cap}"
    );
    let info = find_stream(&mut agent, "vm", "qemu").await.unwrap();
    assert_eq!(info.offset, total as u64, "offsets stay absolute");
    assert_eq!(info.bytes_on_disk, on_disk);

    let received = history(&daemon, "vm").await;
    assert_eq!(received.first, Some(0));
    assert_eq!(
        received.gaps,
        vec![(0, info.first_offset)],
        "the removed range is a gap"
    );
    assert_eq!(
        received.data,
        pattern(
            info.first_offset,
            (total as u64 - info.first_offset) as usize
        )
    );

    // Logging goes on under the new cap.
    write_and_close(pipe, pattern(total as u64, 50_000)).await;
    wait_offset(&mut agent, "vm", "qemu", total as u64 + 50_000).await;
    assert!(bytes_on_disk(&daemon, "vm") <= cap);
}

/// Length and bytes of the file at `log`.
#[cfg(feature = "external-tools")]
fn data_of(log: &Path) -> (u64, Vec<u8>) {
    (
        std::fs::metadata(log).map_or(0, |m| m.len()),
        std::fs::read(log).unwrap_or_default(),
    )
}

/// The rotation's new file cannot be opened (EMFILE, three times, injected by strace): the
/// bytes read meanwhile are counted as dropped exactly (they are a gap in history), the open is
/// retried, and logging resumes. The log's bytes plus `dropped_bytes` are every byte written.
#[cfg(feature = "external-tools")] // strace: docs/testing.md "Test tiers"
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_that_cannot_open_its_file_counts_every_byte() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let lim = limits(MAX_SIZE, 20, LogMode::Rotate);
    let (_, pipe) = open_pipe(&mut agent, "vm", "qemu", Some(lim)).await;
    write_and_close(pipe, pattern(0, 100)).await;
    wait_closed(&mut agent, "vm", "qemu", 100).await;
    drop(agent);
    daemon.stop().await;

    // openat of the log path: 1 at start-up, 2..=4 the rotation's tries (refused), 5 succeeds.
    let log = daemon.log_path("vm", "qemu");
    let log_arg = log.to_str().unwrap().to_owned();
    let wrapper = [
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-P",
        &log_arg,
        "-e",
        "trace=openat",
        "-e",
        "inject=openat:error=EMFILE:when=2..4",
    ];
    let mut run = Run::start(&daemon, "", &wrapper).await;
    let mut agent = daemon.agent().await;
    let (reply, mut pipe) = open_pipe(&mut agent, "vm", "qemu", None).await;
    assert_eq!(reply.offset, 100);
    let mut written = 100u64;
    // Fill the file, then write in steps, each waiting until the daemon has taken it (logged or
    // dropped: either way it took its offsets), so each step is one try to open the new file.
    // strace counts per thread, so how many tries fail depends on which runtime thread runs the
    // stream: steps go on until three in a row were logged.
    let mut dropped = 0;
    let mut logged_steps = 0;
    for step in 0.. {
        let len = if step == 0 { MAX_SIZE - 100 } else { 700 };
        let data = pattern(written, len as usize);
        std::io::Write::write_all(&mut pipe, &data).unwrap();
        written += len;
        let info = wait_offset(&mut agent, "vm", "qemu", written).await;
        logged_steps = if info.dropped_bytes == dropped && dropped > 0 {
            logged_steps + 1
        } else {
            0
        };
        dropped = info.dropped_bytes;
        if logged_steps == 3 {
            break;
        }
        assert!(step < 100, "logging never resumed: {info:?}");
    }
    drop(pipe);
    let info = wait_closed(&mut agent, "vm", "qemu", written).await;
    assert!(info.dropped_bytes > 0, "no open was refused: {info:?}");
    let on_disk: u64 = bytes_on_disk_at(&log, 20);
    assert_eq!(
        on_disk + info.dropped_bytes,
        written,
        "every byte accounted"
    );
    // History is read from a daemon without strace (its reads open the file too); the count
    // is the same after the restart.
    drop(agent);
    run.stop_wrapped().await;
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let after = find_stream(&mut agent, "vm", "qemu").await.unwrap();
    assert_eq!(after.dropped_bytes, info.dropped_bytes);
    assert_eq!(after.offset, written);

    let received = history(&daemon, "vm").await;
    let gap: u64 = received.gaps.iter().map(|(from, to)| to - from).sum();
    assert_eq!(gap, info.dropped_bytes, "history's gap is what was dropped");
    for (offset, data) in history_data(&daemon, "vm").await {
        assert_pattern(offset, &data);
    }
    assert_eq!(received.position, Some(written));
    let (len, last) = data_of(&log);
    assert!(len >= 2100, "logging resumed");
    assert_eq!(last, pattern(written - len, len as usize));
}

/// Bytes of `log` and its backups `.1 ..= .max`.
#[cfg(feature = "external-tools")]
fn bytes_on_disk_at(log: &Path, max: u32) -> u64 {
    let mut total = std::fs::metadata(log).map_or(0, |m| m.len());
    for n in 1..=max {
        let mut name = log.as_os_str().to_owned();
        name.push(format!(".{n}"));
        total += std::fs::metadata(PathBuf::from(name)).map_or(0, |m| m.len());
    }
    total
}
