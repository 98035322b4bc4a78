//! The takeover verdict (`upgrade::handover`, steps 5–7), against the real binary: a takeover
//! that fails never leaves the old daemon and the successor both writing one log, and a
//! successor whose predecessor dies before its verdict takes over.
//!
//! Both tests arm `takeover.commit=kill` in this process's environment, which the harness's
//! daemon inherits; successors get their own fault points.

use crate::support;
use crate::upgrade_common;

use std::path::Path;
use std::time::{Duration, Instant};
use support::*;
use upgrade_common::*;

/// The old daemon's deadline for the successor's `OK` is 30 s; the successor stalls longer.
const STALL_MS: u64 = 34_000;

/// A daemon that kills itself at its takeover commit (its successors inherit the fault point
/// unless they set their own).
async fn armed_daemon() -> Daemon {
    Daemon::start_env(&[("CONLOG_FAULT_POINTS", "takeover.commit=kill")]).await
}

/// True if process `pid` has `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    entries
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|target| target == path))
}

/// True once `pid` is a zombie or gone.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// A successor that received the state but confirms only after the old daemon's deadline is
/// told `NO` and exits without having opened a log or served, while the old daemon thawed and
/// serves on: at no moment do both write the log, and no byte is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_confirmed_too_late_leaves_one_writer() {
    let mut daemon = armed_daemon().await;
    let socket = daemon.socket();
    let mut agent = daemon.agent().await;
    let (reply, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    let log = std::fs::canonicalize(&reply.log_path).unwrap();
    let writer = PipeWriter::start("vm1", pipe);
    wait_list(&socket, "the pipe logging", |r| {
        get(r, "vm1", "qemu").offset > 0
    })
    .await;
    assert!(has_open(daemon.pid(), &log));

    let mut successor = Successor::spawn_with_faults(
        &daemon,
        daemon.tcp,
        daemon.metrics,
        Some(&format!("takeover.received=sleep:{STALL_MS}")),
    );
    let successor_pid = successor.pid();
    // Until the successor exits: never does it hold the log; the old daemon thaws and says so.
    let deadline = Instant::now() + Duration::from_millis(STALL_MS) + DEADLINE;
    let mut thawed = false;
    loop {
        assert!(
            !has_open(successor_pid, &log),
            "the successor opened the log:\n{}",
            successor.stderr()
        );
        daemon.assert_running();
        thawed = thawed || daemon.stderr().contains("takeover failed; serving on");
        if exited(successor_pid) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the successor still runs:\n{}",
            successor.stderr()
        );
        tokio::time::sleep(POLL).await;
    }
    let status = successor.wait_exit().await;
    let text = successor.stderr();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("refused the takeover"), "{text}");
    assert!(!text.contains("conlogd ready"), "{text}");
    assert!(
        thawed || daemon.stderr().contains("takeover failed; serving on"),
        "{}",
        daemon.stderr()
    );
    assert!(has_open(daemon.pid(), &log), "the old daemon logs on");

    // The old daemon kept every byte.
    let before = get(&list_guests(&socket).await, "vm1", "qemu").offset;
    wait_list(&socket, "logging after the failed takeover", |r| {
        get(r, "vm1", "qemu").offset > before
    })
    .await;
    let written = writer.finish().await;
    wait_list(&socket, "everything logged", |r| {
        get(r, "vm1", "qemu").offset == written.len() as u64
    })
    .await;
    assert_same(
        "log vs bytes written",
        &read_log(&daemon.log_dir(), "vm1", "qemu"),
        &written,
    );
    daemon.assert_running();
}

/// The old daemon is killed once it has the successor's `OK` and before its verdict: the
/// successor sees the connection end, finds the old process gone, and takes over; the pipe it
/// carried keeps working and loses no byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_takes_over_when_the_old_daemon_dies_before_its_verdict() {
    let mut daemon = armed_daemon().await;
    let socket = daemon.socket();
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    let writer = PipeWriter::start("vm1", pipe);
    wait_list(&socket, "the pipe logging", |r| {
        get(r, "vm1", "qemu").offset > 0
    })
    .await;

    let mut successor = Successor::spawn_with_faults(&daemon, daemon.tcp, daemon.metrics, Some(""));
    let status = daemon.wait_exit().await;
    assert_eq!(
        status.code(),
        None,
        "the old daemon was killed at its commit"
    );
    successor.wait_ready().await;
    let text = successor.stderr();
    assert!(text.contains("died before its verdict"), "{text}");

    let before = get(&list_guests(&socket).await, "vm1", "qemu").offset;
    wait_list(&socket, "logging after the takeover", |r| {
        get(r, "vm1", "qemu").offset > before
    })
    .await;
    let written = writer.finish().await;
    wait_list(&socket, "everything logged", |r| {
        get(r, "vm1", "qemu").offset == written.len() as u64
    })
    .await;
    assert_same(
        "log vs bytes written",
        &read_log(&daemon.log_dir(), "vm1", "qemu"),
        &written,
    );
    assert!(successor.stop().await.success());
}
