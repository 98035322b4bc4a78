//! In-place upgrades against the real binary: twenty re-execs in a row (SIGUSR1,
//! `Agent.Upgrade`, `conlogctl upgrade`) while writers push into log pipes and a guest prints
//! on a console lose no byte and leak no descriptor, and readers resume by offset without a
//! gap. Upgrades that must not happen are in `upgrade_failures.rs`.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;
use crate::upgrade_common;

use conlog::proto::{self, LogMode};
use rustix::process::Signal;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use support::*;
use tonic::Code;
use upgrade_common::*;

const UPGRADES: usize = 20;
/// Descriptors the daemon may hold more or fewer at two quiet moments (client connections
/// being set up or torn down).
const FD_SLACK: usize = 4;

/// How an upgrade is asked for.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    Signal,
    Rpc,
    Conlogctl,
}

/// Asks `daemon` (pid `pid`, local socket `socket`) to upgrade in place.
async fn trigger(trigger: Trigger, pid: u32, socket: &Path) {
    match trigger {
        Trigger::Signal => rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).expect("a valid pid"),
            Signal::USR1,
        )
        .expect("send SIGUSR1"),
        Trigger::Rpc => {
            let reply = agent(socket)
                .await
                .upgrade(proto::UpgradeRequest {})
                .await
                .unwrap_or_else(|s| panic!("Agent.Upgrade: {s:?}"))
                .into_inner();
            assert_eq!(reply.pid, pid, "Agent.Upgrade answers the daemon's pid");
        }
        Trigger::Conlogctl => {
            let mut cmd = Command::new(conlogctl_bin());
            cmd.arg("--socket").arg(socket).arg("upgrade");
            let output = run_bounded_async(cmd).await;
            assert!(output.status.success(), "{}", describe(&output));
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                stdout.contains(&format!("pid {pid}")),
                "conlogctl upgrade: {stdout}"
            );
        }
    }
}

/// vm-c rotates often, with enough backups that nothing is rotated away.
const SMALL: u64 = 64 << 10;

/// Twenty upgrades in a row while three writers push numbered lines into log pipes and a fake
/// guest prints on a console: every log holds exactly what was written, in order; the console
/// keeps its guest connection; an AttachConsole client and a ReadHistory follower, ended with
/// UNAVAILABLE at each upgrade, resume by offset and end up with exactly the logs; the pid
/// stays; the daemon holds as many descriptors after the upgrades as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_upgrades_lose_no_byte() {
    let _heavy = heavy().await; // one heavy test at a time: support::heavy
    let started = Instant::now();
    let daemon = Daemon::start().await;
    let socket = daemon.socket();
    let pid = daemon.pid();

    // vm-a and vm-b never rotate, vm-c often. Both readers start at offset 0: the console
    // client attaches before the guest connects, the follower (of vm-a) reads from offset 0.
    let unrotated = limits(HUGE, 1, LogMode::Rotate);
    let pipe_limits = [unrotated, unrotated, limits(SMALL, 1000, LogMode::Rotate)];
    let Workload {
        writers,
        console_reader,
        history_reader,
        ..
    } = Workload::start(&daemon, pipe_limits, PIPES[0]).await;

    // Everything flows before the first upgrade.
    let everything_advanced = |before: &proto::ListGuestsResponse| {
        let before = before.clone();
        move |now: &proto::ListGuestsResponse| {
            PIPES.iter().all(|g| {
                let s = get(now, g, "qemu");
                s.open && s.writers == 1 && !s.broken && s.offset > get(&before, g, "qemu").offset
            }) && {
                let c = get(now, CONSOLE, DEVICE);
                c.guest_connected && c.offset > get(&before, CONSOLE, DEVICE).offset
            }
        }
    };
    let mut before = wait_list(&socket, "every stream listed", |r| {
        PIPES.iter().all(|g| find(r, g, "qemu").is_some()) && find(r, CONSOLE, DEVICE).is_some()
    })
    .await;
    before = wait_list(
        &socket,
        "every stream logging",
        everything_advanced(&before),
    )
    .await;
    let fds_before = open_fds(pid);
    let fds_before_text = describe_fds(pid);
    let mut fd_counts = vec![fds_before];
    // Meanwhile, connections to every listening socket are never refused.
    let connect_probe = ConnectProbe::start(vec![
        Target::Unix(socket.clone()),
        Target::Unix(daemon.fd_socket()),
        Target::Tcp(daemon.tcp),
        Target::Tcp(daemon.metrics),
    ]);
    let call_probe = CallProbe::start(&socket, daemon.tcp);

    let triggers = [Trigger::Signal, Trigger::Rpc, Trigger::Conlogctl];
    let upgrades_started = Instant::now();
    for n in 1..=UPGRADES {
        let how = triggers[(n - 1) % triggers.len()];
        trigger(how, pid, &socket).await;
        let ready =
            wait_ready_count(&format!("upgrade {n} ({how:?})"), n + 1, || daemon.stderr()).await;
        assert_eq!(
            field::<u32>(&ready, "pid="),
            Some(pid),
            "upgrade {n}: the pid changed: {ready}"
        );
        // Calls on new connections (with a token issued before the first upgrade) are served
        // again at once.
        call_probe
            .wait_served(&format!("after upgrade {n} ({how:?})"))
            .await;
        // Both readers were ended and came back; every stream logs again, the console still
        // has its guest.
        console_reader.wait_attaches(n as u32 + 1).await;
        history_reader.wait_attaches(n as u32 + 1).await;
        before = wait_list(
            &socket,
            &format!("every stream logging after upgrade {n}"),
            everything_advanced(&before),
        )
        .await;
        fd_counts.push(open_fds(pid));
    }
    let upgrades_took = upgrades_started.elapsed();
    let (connects, refused) = connect_probe.finish().await;
    let calls = call_probe.finish().await;
    assert!(
        refused.is_empty(),
        "connections refused during the upgrades ({connects} succeeded): {refused:#?}"
    );
    assert!(
        calls.unexpected().is_empty() && calls.served > 0,
        "calls during the upgrades failed otherwise than by landing on the leaving image \
         (refused, the pre-upgrade token refused, another status): {:#?}",
        calls.unexpected()
    );
    // Descriptors of connections that just ended may take a moment to close; descriptors
    // leaked by the upgrades never do.
    let deadline = Instant::now() + DEADLINE;
    while open_fds(pid) > fds_before + FD_SLACK && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
    let fds_after = open_fds(pid);
    let fds_after_text = describe_fds(pid);

    // Stop every writer and the guest; wait until the daemon logged all they wrote.
    let Written {
        pipes: written,
        guest: _guest,
        printed,
        listing: last,
    } = writers.stop(&socket).await;

    let log_dir = daemon.log_dir();
    for (guest, wrote) in PIPES.iter().zip(&written) {
        let info = get(&last, guest, "qemu");
        assert_eq!(
            info.first_offset, 0,
            "{guest}: nothing rotated away: {info:?}"
        );
        assert_same(
            &format!("{guest}: concatenated log files vs bytes written"),
            &read_log(&log_dir, guest, "qemu"),
            wrote,
        );
    }
    let info = get(&last, PIPES[2], "qemu");
    assert_eq!(
        (info.max_size, info.max_backups),
        (SMALL, 1000),
        "rotation settings survive the upgrades"
    );
    let files_c = log_files(&log_dir, PIPES[2], "qemu").len();
    assert!(
        files_c > 2,
        "{} rotated across upgrades: {files_c} files",
        PIPES[2]
    );
    let console_log = read_log(&log_dir, CONSOLE, DEVICE);
    assert_same("console log vs guest output", &console_log, &printed);

    let (seen, story) = console_reader.finish(printed.len() as u64).await;
    assert_same(
        "AttachConsole client (resumed by offset) vs console log",
        &seen,
        &console_log,
    );
    let (followed, follow_story) = history_reader.finish(written[0].len() as u64).await;
    assert_same(
        "ReadHistory follower (resumed by offset) vs log",
        &followed,
        &written[0],
    );
    for (what, story) in [
        ("AttachConsole client", &story),
        ("ReadHistory follower", &follow_story),
    ] {
        assert!(
            story.unexpected_failures().is_empty(),
            "{what}: reconnection attempts failed otherwise than by landing on the leaving \
             image: {:#?}",
            story.unexpected_failures()
        );
        // At least one "come back" per upgrade; a client that returns while the old image is
        // still draining is told again (its bytes are checked exactly above).
        assert!(
            story.ends.len() >= UPGRADES,
            "{what}: at least one end per upgrade: {story:?}"
        );
        assert!(
            story
                .ends
                .iter()
                .all(|(code, _)| *code == Code::Unavailable),
            "{what}: every upgrade ends the call with UNAVAILABLE: {:?}",
            story.ends
        );
    }
    // The client attached before the guest connected, then saw it connect once; every
    // reattachment finds the guest still connected (its connection was carried).
    assert!(!story.guest_connected[0], "{story:?}");
    assert!(
        story.guest_connected[1..].iter().all(|c| *c),
        "the guest connection survives every upgrade: {story:?}"
    );
    assert_eq!(
        story.events,
        ["Guest(GuestState { connected: true })"],
        "no other guest (dis)connected frame, nor any lagged frame"
    );

    let diagnostics = daemon.stderr();
    assert_eq!(
        diagnostics.matches("upgrading in place").count(),
        UPGRADES,
        "{diagnostics}"
    );
    for bad in [
        "cannot execute",
        "upgrade refused",
        "unusable",
        "cannot restore",
        "panicked",
    ] {
        assert!(
            !diagnostics.contains(bad),
            "{bad:?} in diagnostics:\n{diagnostics}"
        );
    }
    assert!(
        fds_after <= fds_before + FD_SLACK,
        "descriptors before the upgrades: {fds_before} {fds_before_text}\nafter: {fds_after} {fds_after_text}\nafter each: {fd_counts:?}"
    );
    assert!(
        fds_after + FD_SLACK >= fds_before,
        "descriptors lost: before {fds_before} {fds_before_text}, after {fds_after} {fds_after_text}"
    );
    let pauses = intervals(&diagnostics, "upgrading in place", "conlogd ready");
    eprintln!(
        "{UPGRADES} upgrades in {upgrades_took:.1?} ({:.0?} each; frozen to ready: {}); logged {:?} bytes in pipes, \
         {} on the console; {} gap fills by the console client; descriptors {fd_counts:?}; \
         {connects} connects and {} calls served meanwhile, {} calls failed and were retried \
         {:?}; \
         test {:.1?}",
        upgrades_took / UPGRADES as u32,
        summary(&pauses),
        written.iter().map(Vec::len).collect::<Vec<_>>(),
        printed.len(),
        story.gap_fills.len(),
        calls.served,
        calls.failed.len(),
        calls.failed.first(),
        started.elapsed()
    );
}
