//! A guest flooding its log pipe does not slow another guest's logging (one task per stream,
//! design "one task owns each guest stream ... no lock shared across guests"; SECURITY.md: every
//! tenant is a potential attacker). Measured without a clock: while the flooder writes 1 GiB as
//! fast as the daemon takes it, a quiet guest writes one line at a time and waits until it is
//! in its log file; no line may wait while more than an eighth of the flood goes by. A daemon
//! that served the flooder until its pipe ran dry, or one pipe after another, would make a line
//! wait for the whole rest of the flood.

use crate::support;

use conlog::proto::LogMode;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use support::*;

/// Bytes the flooder writes.
const FLOOD: u64 = 1 << 30;
/// Most of the flood that may go by while one quiet line waits. The quiet stream's task waits
/// at most for the flooder's turn in progress (a task moves at most 8 MiB per wake,
/// `BUDGET_PER_WAKE` in src/pipe.rs) and the test sees the line by polling the file from a
/// thread of a shared 2-CPU machine (up to 33 MiB measured); a starved stream waits for what
/// is left of the whole gibibyte.
const MAX_WAIT: u64 = FLOOD / 8;
/// Lines the quiet guest writes, each waited for.
const LINES: usize = 40;

/// With one runtime worker thread (`TOKIO_WORKER_THREADS=1`: fairness rests on each stream's
/// task yielding, not on a second thread) and with the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_guest_does_not_delay_another_guests_lines() {
    let _heavy = heavy().await; // one heavy test at a time: support::heavy
    for workers in [Some("1"), None] {
        // Set on the daemon's command only: the tests share this process.
        let env: Vec<_> = workers
            .map(|n| ("TOKIO_WORKER_THREADS", n))
            .into_iter()
            .collect();
        flood_beside_a_quiet_guest(workers.unwrap_or("default"), &env).await;
    }
}

async fn flood_beside_a_quiet_guest(workers: &str, env: &[(&str, &str)]) {
    let daemon = Daemon::start_env(env).await;
    let mut agent = daemon.agent().await;
    // Small files, so the flood rotates instead of filling the disk.
    let small = limits(1 << 20, 1, LogMode::Rotate);
    let (_, mut quiet_pipe) = bounded(
        "the quiet guest's pipe",
        open_pipe(&mut agent, "quiet", "qemu", None),
    )
    .await;
    let (_, flood_pipe) = bounded(
        "the flooder's pipe",
        open_pipe(&mut agent, "flooder", "qemu", Some(small)),
    )
    .await;
    // Bytes the flooder got into its pipe: what the daemon took, give or take the pipe's
    // buffer (256 KiB).
    let flooded = Arc::new(AtomicU64::new(0));
    let flooder = std::thread::spawn({
        let flooded = flooded.clone();
        move || {
            let mut pipe = flood_pipe;
            let chunk = pattern(0, 1 << 20);
            for _ in 0..FLOOD >> 20 {
                pipe.write_all(&chunk).expect("flood");
                flooded.fetch_add(chunk.len() as u64, SeqCst);
            }
        }
    });
    let deadline = std::time::Instant::now() + DEADLINE;
    while flooded.load(SeqCst) < 4 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood never started"
        );
        tokio::time::sleep(POLL).await;
    }

    let quiet_log = daemon.log_path("quiet", "qemu");
    let mut waits = Vec::new();
    let mut quiet_written = 0u64;
    let mut during_flood = 0;
    for n in 0..LINES {
        let line = format!("quiet line {n}\n").into_bytes();
        let before = flooded.load(SeqCst);
        quiet_pipe.write_all(&line).unwrap();
        quiet_written += line.len() as u64;
        let deadline = std::time::Instant::now() + DEADLINE;
        while std::fs::metadata(&quiet_log).map_or(0, |m| m.len()) < quiet_written {
            assert!(
                std::time::Instant::now() < deadline,
                "{workers} worker threads: quiet line {n} not logged after {DEADLINE:?}"
            );
            std::thread::yield_now();
        }
        let after = flooded.load(SeqCst);
        waits.push(after - before);
        if after < FLOOD {
            during_flood += 1;
        }
    }
    let deadline = std::time::Instant::now() + DEADLINE;
    while !flooder.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "{workers} worker threads: the flood is not taken"
        );
        tokio::time::sleep(POLL).await;
    }
    flooder.join().expect("flooder");
    drop(quiet_pipe);
    assert_eq!(
        read_log(&daemon.log_dir(), "quiet", "qemu").len() as u64,
        quiet_written
    );
    let mut sorted = waits.clone();
    sorted.sort();
    eprintln!(
        "{workers} worker threads: flood bytes written while a quiet line waited: max {} KiB, \
         median {} KiB; {during_flood} of {LINES} lines during the flood",
        sorted[LINES - 1] >> 10,
        sorted[LINES / 2] >> 10
    );
    assert!(
        sorted[LINES - 1] <= MAX_WAIT,
        "{workers} worker threads: a quiet line waited while {} MiB of the flood went by: \
         {waits:?}",
        sorted[LINES - 1] >> 20
    );
    assert!(
        during_flood == LINES,
        "the flood was over before the quiet guest was done: {during_flood} of {LINES} lines \
         during the flood"
    );
}
