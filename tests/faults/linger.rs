//! `--linger-after-handover`, which both Kubernetes manifests pass (deploy/README.md): after a
//! takeover the old process stays alive, idle, until SIGTERM, so that Kubernetes does not
//! restart it; it holds nothing of the guests any more, and its SIGTERM (the old pod's
//! deletion) changes nothing for the successor: no socket removed, no pipe drained or closed.

use crate::support;
use crate::upgrade_common;

use rustix::process::Signal;
use std::io::Write;
use support::*;
use upgrade_common::*;

/// Streams the old daemon carries to its successor.
const GUESTS: usize = 20;

fn guest(i: usize) -> String {
    format!("vm{i:02}")
}

/// Pipes of `GUESTS` guests and one console carried to a successor by a daemon started with
/// `--linger-after-handover`: the old process does not exit after the handover; it holds none
/// of the guests' descriptors; on SIGTERM it exits 0 without touching the sockets, pipes or
/// logs, and the successor serves on with every stream open and logging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_daemon_lingers_idle_until_sigterm_and_then_changes_nothing() {
    let mut daemon = Daemon::start_with(None, &["--linger-after-handover"]).await;
    let socket = daemon.socket();
    let mut agent = daemon.agent().await;
    let mut pipes = Vec::new();
    for i in 0..GUESTS {
        let (_, pipe) = open_pipe(&mut agent, &guest(i), "qemu", None).await;
        pipes.push(pipe);
    }
    let console = open_console(&mut agent, &guest(0)).await;
    let mut fake_guest = FakeGuest::connect(&console.guest_socket).await;
    let line = |i: usize, n: usize| format!("{} line {n}\n", guest(i)).into_bytes();
    for (i, pipe) in pipes.iter_mut().enumerate() {
        pipe.write_all(&line(i, 1)).unwrap();
    }
    fake_guest.write(&line(0, 1)).await;
    let logged = |n: usize| {
        move |r: &conlog::proto::ListGuestsResponse| {
            let want = |i| (1..=n).map(|k| line(i, k).len() as u64).sum::<u64>();
            (0..GUESTS)
                .all(|i| find(r, &guest(i), "qemu").is_some_and(|s| s.open && s.offset == want(i)))
                && find(r, &guest(0), DEVICE)
                    .is_some_and(|s| s.guest_connected && s.offset == want(0))
        }
    };
    wait_list(&socket, "the first lines logged", logged(1)).await;
    drop(agent);
    let sockets = ["conlogd.sock", "fd.sock", "handover.sock"].map(|name| {
        let path = daemon.runtime_dir().join(name);
        let ino = inode(&path);
        (path, ino)
    });

    let mut successor = Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    successor.wait_ready().await;
    let deadline = std::time::Instant::now() + DEADLINE;
    while !daemon.stderr().contains("idle until SIGTERM") {
        daemon.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "no 'idle until SIGTERM':\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(POLL).await;
    }
    successor.assert_took_over();
    // The successor serves: the second lines are logged by it.
    for (i, pipe) in pipes.iter_mut().enumerate() {
        pipe.write_all(&line(i, 2)).unwrap();
    }
    fake_guest.write(&line(0, 2)).await;
    wait_list(&socket, "the second lines logged", logged(2)).await;
    // Still there, and holding nothing of the guests: no log file, no console socket, none
    // of the pipes (a lingering process that kept them would keep them from closing).
    daemon.assert_running();
    let fds = describe_fds(daemon.pid());
    let log_dir = daemon.log_dir().to_string_lossy().into_owned();
    assert!(
        !fds.contains(&log_dir) && !fds.contains(".sock"),
        "the lingering daemon holds guests' files: {fds}"
    );
    assert!(
        open_fds(daemon.pid()) < GUESTS,
        "the lingering daemon holds {} descriptors (it had {GUESTS} pipes): {fds}",
        open_fds(daemon.pid())
    );

    // The old pod is deleted: SIGTERM. It exits 0 and leaves everything to the successor.
    let status = daemon.stop().await;
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    let old = daemon.stderr();
    assert!(
        !old.contains("shutting down") && !old.contains("every log flushed"),
        "the lingering daemon ran the shutdown of a serving one:\n{old}"
    );
    for (path, ino) in &sockets {
        assert_eq!(
            inode(path),
            *ino,
            "{} is still the same socket",
            path.display()
        );
    }
    for (i, pipe) in pipes.iter_mut().enumerate() {
        pipe.write_all(&line(i, 3)).unwrap();
    }
    fake_guest.write(&line(0, 3)).await;
    wait_list(&socket, "the third lines logged", logged(3)).await;
    for i in 0..GUESTS {
        assert_same(
            &format!("{}/qemu", guest(i)),
            &read_log(&daemon.log_dir(), &guest(i), "qemu"),
            &[line(i, 1), line(i, 2), line(i, 3)].concat(),
        );
    }
    assert_same(
        "console log",
        &read_log(&daemon.log_dir(), &guest(0), DEVICE),
        &[line(0, 1), line(0, 2), line(0, 3)].concat(),
    );
    // Closing the write ends still closes the streams: nothing else holds them.
    drop(pipes);
    wait_list(&socket, "every pipe closed", |r| {
        (0..GUESTS).all(|i| find(r, &guest(i), "qemu").is_some_and(|s| !s.open))
    })
    .await;
    let status = successor.stop().await;
    assert!(status.success(), "{status}\n{}", successor.stderr());
}

/// Without the flag the old daemon exits 0 right after the handover (what a systemd unit, which
/// would not restart it, wants); with it the process must be told to go. The flag is what makes
/// the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_the_old_daemon_exits_after_the_handover() {
    let mut daemon = Daemon::start().await;
    let mut successor = Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    successor.wait_ready().await;
    let status = daemon.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    assert!(!daemon.stderr().contains("idle until SIGTERM"));
    successor.signal(Signal::TERM);
    assert!(successor.wait_exit().await.success());
}
