//! The daemon-wide counters operators alert on continue across an in-place upgrade, a
//! takeover and a clean restart; after a crash the upgrade counters continue and the byte
//! counters start again from 0 (docs/operations.md, "Metrics to alert on"). `conlogd.lock`
//! names whichever process serves.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;
use crate::upgrade_common;

use std::net::SocketAddr;
use support::*;
use upgrade_common::*;

const COUNTERS: [&str; 4] = [
    "conlog_bytes_logged_total",
    "conlog_handoffs_total",
    "conlog_upgrades_total",
    "conlog_upgrade_failures_total",
];

/// The counters of [`COUNTERS`], scraped from `/metrics`.
async fn scrape(metrics: SocketAddr) -> [u64; 4] {
    let text = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics").1)
        .await
        .unwrap();
    COUNTERS
        .map(|name| metric(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}")) as u64)
}

fn lock_pid(daemon: &Daemon) -> u32 {
    std::fs::read_to_string(daemon.runtime_dir().join("conlogd.lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_continue_across_upgrade_takeover_and_restart() {
    let mut daemon = Daemon::start().await;
    let socket = daemon.socket();
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    let data = lines("vm1", 500);
    {
        use std::io::Write;
        (&pipe).write_all(&data).unwrap();
    }
    let logged = data.len() as u64;
    wait_list(&socket, "the bytes logged", |r| {
        get(r, "vm1", "qemu").offset == logged
    })
    .await;
    assert_eq!(scrape(daemon.metrics).await, [logged, 1, 0, 0]);
    assert_eq!(lock_pid(&daemon), daemon.pid());

    // In place: same pid, the upgrade counted, nothing else lost.
    daemon.signal(rustix::process::Signal::USR1);
    wait_ready_count("after SIGUSR1", 2, || daemon.stderr()).await;
    assert_eq!(
        scrape(daemon.metrics).await,
        [logged, 1, 1, 0],
        "after SIGUSR1"
    );

    // Takeover: a new process on the same ports continues the counts.
    let mut successor = Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    successor.wait_ready().await;
    assert_eq!(daemon.wait_exit().await.code(), Some(0));
    assert_eq!(
        scrape(daemon.metrics).await,
        [logged, 1, 2, 0],
        "after --takeover"
    );
    assert_eq!(
        lock_pid(&daemon),
        successor.pid(),
        "conlogd.lock names the successor"
    );

    // A clean stop saves every counter; the next start continues from them.
    assert!(successor.stop().await.success(), "{}", successor.stderr());
    drop(pipe);
    daemon.restart().await;
    assert_eq!(lock_pid(&daemon), daemon.pid());
    assert_eq!(
        scrape(daemon.metrics).await,
        [logged, 1, 2, 0],
        "after a clean restart:\n{}",
        daemon.all_stderr()
    );

    // A crash: the upgrade counters are exact on disk; the byte counters start from 0 (a value
    // older than the last scrape would read as a reset plus a false increase).
    daemon.kill().await;
    daemon.restart().await;
    assert_eq!(
        scrape(daemon.metrics).await,
        [0, 0, 2, 0],
        "after a crash and a restart"
    );
}
