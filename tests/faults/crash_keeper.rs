//! Crash guarantees with the keeper (`keeper: auto`), against the real binary: log pipes and a
//! console guest write numbered lines while `conlogd` is killed with SIGKILL at random moments
//! and started again. No writer ever sees EPIPE, QEMU's console connection is never closed
//! (the fake guest never reconnects: a closed connection would fail its writes), everything
//! waiting in kernel buffers is logged, and the only bytes lost are what a killed process had
//! read and not yet written: each loss is one contiguous range of at most one read.
//!
//! `CONLOG_CRASH_KILLS=100 cargo test --test faults crash_keeper:: -- --nocapture` measures the loss
//! over 100 kills (docs/operations.md, "Crash guarantees").
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::crash_common;
use crate::support;

use conlog::proto::LogMode;
use crash_common::*;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// Pipes in the test.
const PIPES: usize = 3;
/// The pid in `keeper.lock`.
fn keeper_pid(runtime_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(runtime_dir.join("keeper.lock"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: u32) -> bool {
    // A zombie (the keeper's parent may be this test's dead daemon) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Waits (bounded) until a live keeper other than `old` serves `runtime_dir`.
async fn wait_new_keeper(runtime_dir: &Path, old: Option<u32>) -> u32 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(pid) = keeper_pid(runtime_dir) {
            if Some(pid) != old && alive(pid) {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new keeper after {DEADLINE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_breaks_no_pipe_and_no_console_connection() {
    let kills: u32 = std::env::var("CONLOG_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}, {kills} kills");
    let mut random = Lcg(seed);
    let mut daemon = Daemon::start().await;
    let first_keeper = wait_new_keeper(daemon.runtime_dir(), None).await;
    let mut agent = daemon.agent().await;
    let roomy = limits(64 << 20, 8, LogMode::Rotate);

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for i in 0..PIPES {
        let guest = format!("vm-pipe{i}");
        let (_, pipe): (_, File) = open_pipe(&mut agent, &guest, "qemu", Some(roomy)).await;
        let stop = stop.clone();
        writers.push(std::thread::spawn(move || {
            write_lines(format!("pipe{i}"), pipe, stop)
        }));
    }
    let console = create_console(&mut agent, "vm-con", "", Some(roomy))
        .await
        .expect("CreateConsole");
    let guest = UnixStream::connect(&console.guest_socket).expect("connect the fake QEMU");
    wait_guest_connected(&mut agent, "vm-con", "serial0", true).await;
    let console_writer = {
        let guest = guest.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || write_lines("console".into(), guest, stop))
    };
    drop(agent);

    for kill in 0..kills {
        tokio::time::sleep(Duration::from_millis(20 + random.next(300))).await;
        if kill == kills / 2 {
            // The keeper dies while the daemon lives: the daemon starts a new one and
            // registers everything again before the next kill.
            let keeper = keeper_pid(daemon.runtime_dir()).expect("keeper pid");
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(keeper as i32).unwrap(),
                rustix::process::Signal::KILL,
            )
            .unwrap();
            let new_keeper = wait_new_keeper(daemon.runtime_dir(), Some(keeper)).await;
            assert_ne!(new_keeper, first_keeper);
            // CreateLogPipe answers once the keeper holds the new pipe, so once this
            // returns the new keeper has everything registered before it too.
            let mut agent = daemon.agent().await;
            let (reply, pipe) = open_pipe(&mut agent, "vm-probe", "qemu", None).await;
            write_and_close(pipe, b"probe\n".to_vec()).await;
            wait_closed(&mut agent, "vm-probe", "qemu", reply.offset + 6).await;
        }
        daemon.kill().await;
        daemon.restart().await;
    }

    stop.store(true, Ordering::Relaxed);
    let mut outcomes: Vec<Outcome> = Vec::new();
    for writer in writers {
        outcomes.push(
            tokio::task::spawn_blocking(move || writer.join().unwrap())
                .await
                .unwrap(),
        );
    }
    let console_outcome = tokio::task::spawn_blocking(move || console_writer.join().unwrap())
        .await
        .unwrap();
    for outcome in outcomes.iter().chain([&console_outcome]) {
        assert!(
            outcome.error.is_none(),
            "{}: a writer saw {:?} after {} lines; daemon:\n{}",
            outcome.who,
            outcome.error,
            outcome.lines,
            daemon.all_stderr()
        );
    }
    // The console connection is the one the guest opened: still open, still logged.
    let mut guest = guest;
    guest
        .write_all(b"the same connection\n")
        .expect("the console connection survived every kill");

    let mut agent = daemon.agent().await;
    let mut report = Vec::new();
    let mut total_lost = 0usize;
    for (i, outcome) in outcomes.iter().enumerate() {
        let guest = format!("vm-pipe{i}");
        let info = wait_stream(&mut agent, &guest, "qemu", "closed", |s| !s.open).await;
        assert!(!info.broken, "{guest}: {info:?}");
        let want = written(&outcome.who, outcome.lines);
        let log = read_log(&daemon.log_dir(), &guest, "qemu");
        assert_eq!(
            info.offset as usize,
            log.len(),
            "{guest}: offsets match the log"
        );
        let cuts = cuts(&guest, &log, &want);
        assert!(
            cuts.len() <= kills as usize && cuts.iter().all(|c| *c <= PIPE_READ),
            "{guest}: more lost than one read per kill: {cuts:?}"
        );
        total_lost += cuts.iter().sum::<usize>();
        report.push(format!("{guest}: {} bytes, lost {cuts:?}", want.len()));
    }
    let mut want = written(&console_outcome.who, console_outcome.lines);
    want.extend_from_slice(b"the same connection\n");
    let deadline = Instant::now() + DEADLINE;
    let log = loop {
        let log = read_log(&daemon.log_dir(), "vm-con", "serial0");
        if log.ends_with(b"the same connection\n") {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "vm-con: the last line never reached the log"
        );
        tokio::time::sleep(POLL).await;
    };
    let cuts = cuts("vm-con", &log, &want);
    assert!(
        cuts.len() <= kills as usize && cuts.iter().all(|c| *c <= CONSOLE_READ),
        "vm-con: more lost than one read per kill: {cuts:?}"
    );
    total_lost += cuts.iter().sum::<usize>();
    report.push(format!("vm-con: {} bytes, lost {cuts:?}", want.len()));
    let info = find_stream(&mut agent, "vm-con", "serial0").await.unwrap();
    assert!(info.guest_connected, "{info:?}");
    println!(
        "{kills} kills: {total_lost} bytes lost in all\n{}",
        report.join("\n")
    );
    assert_eq!(daemon.stop().await.code(), Some(0));
    // A clean stop lets go of everything: the keeper this daemon started exits.
    let keeper = keeper_pid(daemon.runtime_dir());
    let deadline = Instant::now() + DEADLINE;
    while keeper.is_some_and(alive) {
        assert!(
            Instant::now() < deadline,
            "the keeper outlived a clean stop"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Reconciliation after `kill -9`: held descriptors are matched to the registry by name. A pipe
/// whose writer finished while conlogd was down is read to its end and closed (not broken); a
/// console whose QEMU left meanwhile logs what it sent and shows no guest; a stream whose
/// record is gone (a stale entry) is closed, so its writer sees EPIPE; the others go on. The
/// daemon also starts with `--takeover` (as in the DaemonSet): with nobody holding
/// `conlogd.lock` it starts fresh and adopts what the keeper held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reconciles_held_descriptors_with_the_registry() {
    let mut daemon = Daemon::start_with(None, &["--takeover"]).await;
    let mut agent = daemon.agent().await;
    let (_, mut ended) = open_pipe(&mut agent, "vm-ended", "qemu", None).await;
    let (_, mut going) = open_pipe(&mut agent, "vm-going", "qemu", None).await;
    let (_, mut stale) = open_pipe(&mut agent, "vm-stale", "qemu", None).await;
    let console = open_console(&mut agent, "vm-con").await;
    let mut guest = UnixStream::connect(&console.guest_socket).unwrap();
    wait_guest_connected(&mut agent, "vm-con", "serial0", true).await;
    for pipe in [&mut ended, &mut going, &mut stale] {
        pipe.write_all(b"before\n").unwrap();
    }
    guest.write_all(b"before\n").unwrap();
    for guest in ["vm-ended", "vm-going", "vm-stale"] {
        wait_offset(&mut agent, guest, "qemu", 7).await;
    }
    wait_offset(&mut agent, "vm-con", "serial0", 7).await;
    drop(agent);

    daemon.kill().await;
    ended.write_all(b"while down\n").unwrap();
    drop(ended);
    guest.write_all(b"bye\n").unwrap();
    drop(guest);
    stale.write_all(b"while down\n").unwrap();
    std::fs::remove_dir_all(daemon.data_dir().join("state/guests/vm-stale")).unwrap();
    daemon.restart().await;
    assert!(
        daemon
            .stderr()
            .contains("no running daemon to take over from"),
        "{}",
        daemon.stderr()
    );

    let mut agent = daemon.agent().await;
    let info = wait_closed(&mut agent, "vm-ended", "qemu", 18).await;
    assert!(
        !info.broken,
        "a pipe that ended while down is not broken: {info:?}"
    );
    assert_same(
        "vm-ended",
        &read_log(&daemon.log_dir(), "vm-ended", "qemu"),
        b"before\nwhile down\n",
    );
    let info = wait_stream(&mut agent, "vm-con", "serial0", "left by its guest", |s| {
        !s.guest_connected && s.offset == 11
    })
    .await;
    assert!(!info.broken, "{info:?}");
    assert_same(
        "vm-con",
        &read_log(&daemon.log_dir(), "vm-con", "serial0"),
        b"before\nbye\n",
    );
    assert!(
        find_stream(&mut agent, "vm-stale", "qemu").await.is_none(),
        "a stream without a record is not restored"
    );
    let deadline = Instant::now() + DEADLINE;
    let error = loop {
        match stale.write_all(b"x") {
            Err(e) => break e,
            Ok(()) => {
                assert!(Instant::now() < deadline, "the stale pipe was never closed");
                tokio::time::sleep(POLL).await;
            }
        }
    };
    assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
    going.write_all(b"after\n").unwrap();
    drop(going);
    let info = wait_closed(&mut agent, "vm-going", "qemu", 13).await;
    assert!(!info.broken && info.writers == 0, "{info:?}");
    assert_same(
        "vm-going",
        &read_log(&daemon.log_dir(), "vm-going", "qemu"),
        b"before\nafter\n",
    );
    assert_eq!(daemon.stop().await.code(), Some(0));
}
