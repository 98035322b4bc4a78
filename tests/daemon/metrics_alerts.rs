//! The metrics docs/operations.md ("Metrics to alert on") tells operators to alert on, each
//! driven to a known value by real events: guests, streams, pipe writers (and their drop after
//! a crash while the guests stay), console clients, rotations, upgrades and takeovers (which
//! must count in the image that serves afterwards, or the alert never fires), bytes logged.
//! Bytes dropped, hand-offs and lagged clients are checked where those events are made
//! (disk_full.rs, services.rs, hostile_handoff.rs, console_flood.rs).

use crate::support;
use crate::upgrade_common;

use conlog::proto::{self, attach::Mode, LogMode};
use rustix::process::Signal;
use std::net::SocketAddr;
use support::*;
use upgrade_common::*;

/// The value of the unlabelled sample `name` at `address` (0 when absent).
async fn sample(address: SocketAddr, name: &'static str) -> f64 {
    let (_, body) = tokio::task::spawn_blocking(move || http_get(address, "/metrics"))
        .await
        .unwrap();
    metric(&body, name).unwrap_or(0.0)
}

/// Waits (bounded) until every `(name, value)` holds at `address`.
async fn wait_metrics(address: SocketAddr, what: &str, want: &[(&'static str, f64)]) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let mut got = Vec::new();
        for (name, _) in want {
            got.push((*name, sample(address, name).await));
        }
        if got.iter().zip(want).all(|(g, w)| g.1 == w.1) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: metrics {got:?}, expected {want:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerting_metrics_follow_what_happens() {
    let mut daemon = Daemon::start().await;
    let socket = daemon.socket();
    let mut agent = daemon.agent().await;
    wait_metrics(
        daemon.metrics,
        "a fresh daemon",
        &[
            ("conlog_guests", 0.0),
            ("conlog_streams", 0.0),
            ("conlog_pipe_writers", 0.0),
            ("conlog_clients", 0.0),
            ("conlog_rotations_total", 0.0),
            ("conlog_upgrades_total", 0.0),
        ],
    )
    .await;

    // Two guests, three streams, two pipes with their writers; 10 KiB in 4 KiB files: two
    // rotations.
    let (_, pipe1) = open_pipe(
        &mut agent,
        "vm1",
        "qemu",
        Some(limits(4 << 10, 3, LogMode::Rotate)),
    )
    .await;
    let (_, pipe2) = open_pipe(&mut agent, "vm2", "qemu", None).await;
    let console = open_console(&mut agent, "vm1").await;
    let _guest = FakeGuest::connect(&console.guest_socket).await;
    // Kept open to the end: a writer.
    let mut pipe1 = pipe1;
    std::io::Write::write_all(&mut pipe1, &pattern(0, 10 << 10)).unwrap();
    wait_offset(&mut agent, "vm1", "qemu", 10 << 10).await;
    let first = local_channel(&daemon).await;
    let a = Session::attach(first.clone(), attach("vm1", Mode::ReadOnly))
        .await
        .unwrap();
    let b = Session::attach(first.clone(), attach("vm1", Mode::ReadOnly))
        .await
        .unwrap();
    wait_metrics(
        daemon.metrics,
        "two guests, three streams, two writers, two clients",
        &[
            ("conlog_guests", 2.0),
            ("conlog_streams", 3.0),
            ("conlog_pipe_writers", 2.0),
            ("conlog_clients", 2.0),
            ("conlog_rotations_total", 2.0),
            ("conlog_bytes_logged_total", (10 << 10) as f64),
        ],
    )
    .await;
    drop(a);
    drop(pipe2);
    wait_closed(&mut agent, "vm2", "qemu", 0).await;
    wait_metrics(
        daemon.metrics,
        "a client and a writer gone",
        &[("conlog_clients", 1.0), ("conlog_pipe_writers", 1.0)],
    )
    .await;
    drop(b);

    // An in-place upgrade counts in the image that serves afterwards; the gauges are those of
    // the carried state.
    drop(agent);
    daemon.signal(Signal::USR1);
    wait_ready_count("the upgrade", 2, || daemon.stderr()).await;
    wait_metrics(
        daemon.metrics,
        "after an upgrade",
        &[
            ("conlog_guests", 2.0),
            ("conlog_streams", 3.0),
            ("conlog_pipe_writers", 1.0),
            ("conlog_clients", 0.0),
        ],
    )
    .await;

    // Sampled once the image serves (checked at the end, so that a failure here does not
    // hide the checks that follow).
    let after_upgrade = sample(daemon.metrics, "conlog_upgrades_total").await;

    // A takeover counts too, in the successor.
    let mut successor = Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    successor.wait_ready().await;
    assert_eq!(daemon.wait_exit().await.code(), Some(0));
    wait_metrics(
        daemon.metrics,
        "after a takeover",
        &[
            ("conlog_guests", 2.0),
            ("conlog_streams", 3.0),
            ("conlog_pipe_writers", 1.0),
        ],
    )
    .await;

    let after_takeover = sample(daemon.metrics, "conlog_upgrades_total").await;

    // Removing a guest removes its streams.
    agent_remove(&socket, "vm2").await;
    wait_metrics(
        daemon.metrics,
        "vm2 removed",
        &[("conlog_guests", 1.0), ("conlog_streams", 2.0)],
    )
    .await;

    // A crash: the guests come back, and so does the open pipe (the descriptor keeper held
    // its read end through the crash: docs/operations.md, "Crash guarantees").
    successor.signal(Signal::KILL);
    successor.wait_exit().await;
    daemon.restart().await;
    wait_metrics(
        daemon.metrics,
        "after a crash",
        &[
            ("conlog_guests", 1.0),
            ("conlog_streams", 2.0),
            ("conlog_pipe_writers", 1.0),
        ],
    )
    .await;
    drop(pipe1);
    assert_eq!(
        (after_upgrade, after_takeover),
        (1.0, 2.0),
        "conlog_upgrades_total in the serving image after an upgrade and then a takeover: an \
         alert on its increase fires only if the image serving afterwards has counted it, on \
         top of what the previous image counted (a fresh count of 1 after an earlier 1 looks \
         like no change to Prometheus)"
    );
}

async fn agent_remove(socket: &std::path::Path, guest: &str) {
    agent(socket)
        .await
        .remove_guest(proto::RemoveGuestRequest {
            guest: guest.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("RemoveGuest {guest}: {s:?}"));
}
