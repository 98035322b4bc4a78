//! A real `conlogd --takeover` that fails half-way (docs/operations.md, "Kubernetes": "A
//! takeover that fails ends the new process ... while the old daemon thaws and keeps
//! serving"). The successor is the real binary run under `strace`, which makes its `recvmsg`
//! of the carried descriptors fail: it must exit non-zero saying why, and the old daemon must
//! log "takeover failed; serving on" and serve on with every stream, the guest's connection
//! and every listener, so that the next successor takes over normally.

use crate::support;
use crate::upgrade_common;

use std::io::Write;
use std::process::{Command, Stdio};
use support::*;
use upgrade_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_fails_leaves_the_old_daemon_serving() {
    let mut daemon = Daemon::start().await;
    let socket = daemon.socket();
    let pid = daemon.pid();
    let mut setup = agent(&socket).await;
    let (_, mut pipe) = open_pipe(&mut setup, "vm1", "qemu", None).await;
    let console = open_console(&mut setup, "vm1").await;
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    wait_guest_connected(&mut setup, "vm1", DEVICE, true).await;
    drop(setup);
    pipe.write_all(b"before\n").unwrap();
    guest.write(b"before\n").await;
    let logged = |n: u64| {
        move |r: &conlog::proto::ListGuestsResponse| {
            find(r, "vm1", "qemu").is_some_and(|s| s.open && s.offset == n)
                && find(r, "vm1", DEVICE).is_some_and(|s| s.guest_connected && s.offset == n)
        }
    };
    wait_list(&socket, "the first lines", logged(7)).await;

    // The failing successor: the daemon's own flags, --takeover, every recvmsg failing.
    let base = daemon.command();
    let mut args: Vec<String> = Vec::new();
    let mut given = base.get_args().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = given.next() {
        let port_flag = arg == "--listen" || arg == "--metrics";
        args.push(arg.clone());
        if port_flag {
            given.next();
            args.push(
                if arg == "--listen" {
                    daemon.tcp
                } else {
                    daemon.metrics
                }
                .to_string(),
            );
        }
    }
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "inject=recvmsg:error=EIO",
    ])
    .arg(conlogd_bin())
    .args(&args)
    .arg("--takeover")
    .env("NO_COLOR", "1")
    .env("RUST_LOG", "info")
    .stdin(Stdio::null());
    let output = run_bounded(&mut cmd);
    assert!(
        !output.status.success(),
        "the failing successor exited 0: {}",
        describe(&output)
    );
    let said = strip_ansi(&String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "a start error: {said}");
    assert!(
        said.contains("Cannot take over from the running daemon"),
        "the successor says why it stops: {said}"
    );
    assert!(
        !said.contains("conlogd ready"),
        "the failing successor claimed to be ready: {said}"
    );

    // The old daemon thaws and serves on: same process, streams, guest connection, listeners.
    let deadline = std::time::Instant::now() + DEADLINE;
    while !daemon.stderr().contains("takeover failed; serving on") {
        daemon.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "no 'takeover failed; serving on':\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(POLL).await;
    }
    daemon.assert_running();
    assert_eq!(daemon.pid(), pid);
    pipe.write_all(b"after\n").unwrap();
    guest.write(b"after\n").await;
    wait_list(&socket, "logging after the failed takeover", logged(13)).await;
    let mut remote = daemon.tcp_channel("vm1").await.console();
    remote
        .read_history(conlog::proto::ReadHistoryRequest {
            guest: "vm1".into(),
            ..Default::default()
        })
        .await
        .expect("the TCP listener serves");

    // The next successor takes over normally.
    let mut successor = Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    successor.wait_ready().await;
    assert_eq!(daemon.wait_exit().await.code(), Some(0));
    successor.assert_took_over();
    pipe.write_all(b"taken over\n").unwrap();
    guest.write(b"taken over\n").await;
    wait_list(&socket, "logging after the takeover", logged(24)).await;
    drop(pipe);
    for stream in ["qemu", DEVICE] {
        assert_eq!(
            read_log(&daemon.log_dir(), "vm1", stream),
            b"before\nafter\ntaken over\n",
            "{stream}"
        );
    }
    assert!(successor.stop().await.success());
}
