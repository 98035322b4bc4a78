//! The registry against the real binary: no call waits behind another guest's actor, and a
//! guest being removed cannot be brought back half-way.
//!
//! Two fault points hold an actor round trip for [`HOLD_MS`] (both armed, through the daemon's
//! environment, for the daemons of these tests): `guests.remove.closing` holds a
//! `RemoveGuest` once its guest is marked closing, before its streams are closed;
//! `log_owner.set_limits` holds a stream's actor inside a change of its limits. While one is
//! held, the tests serve another guest and check that the held call has not finished yet: the
//! order of events, never a duration. With the registry locked across actor round trips the
//! other guest's lookup would wait for the held call; without the closing mark a `CreateConsole`
//! racing the removal would bind sockets that the removal then deletes, and its record would be
//! removed too.

use crate::support;

use conlog::proto::{self, attach::Mode, LogMode};
use std::io::Write;
use support::*;
use tonic::Code;

/// How long a fault point holds its call: far longer than serving another guest takes.
const HOLD_MS: u64 = 8000;

/// Both fault points, for the daemon's environment.
fn armed() -> String {
    format!("guests.remove.closing=sleep:{HOLD_MS},log_owner.set_limits=sleep:{HOLD_MS}")
}

/// Waits until the daemon's log says `point` was reached.
async fn wait_point(daemon: &Daemon, point: &str) {
    let line = format!("fault point {point} reached");
    bounded(&line.clone(), async {
        while !daemon.stderr().contains(&line) {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
}

/// Every byte of `guest/stream`'s history (no follow), or the call's status.
async fn history(daemon: &Daemon, guest: &str, stream: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut chunks = local_channel(daemon)
        .await
        .console()
        .read_history(proto::ReadHistoryRequest {
            guest: guest.into(),
            stream: stream.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = bounded("a history chunk", chunks.message()).await? {
        data.extend_from_slice(&chunk.data);
    }
    Ok(data)
}

/// A pipe stream `guest/qemu` holding `text` (once it is all logged).
async fn logged_pipe(daemon: &Daemon, guest: &str, text: &[u8], limits: Option<proto::LogLimits>) {
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, guest, "qemu", limits).await;
    pipe.write_all(text).unwrap();
    drop(pipe);
    bounded("the pipe's bytes logged", async {
        while history(daemon, guest, "qemu").await.unwrap() != text {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
}

/// The names of the guests `ListGuests` shows, with their streams.
async fn listed(daemon: &Daemon) -> Vec<(String, Vec<String>)> {
    let reply = daemon
        .agent()
        .await
        .list_guests(proto::ListGuestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    reply
        .guests
        .into_iter()
        .map(|g| (g.name, g.streams.into_iter().map(|s| s.name).collect()))
        .collect()
}

/// Index of the first line of the daemon's log containing every one of `parts`.
fn line_of(log: &str, parts: &[&str]) -> Option<usize> {
    log.lines()
        .position(|line| parts.iter().all(|part| line.contains(part)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_being_removed_is_not_resurrected_and_holds_up_no_other_guest() {
    let mut daemon = Daemon::start_env(&[("CONLOG_FAULT_POINTS", &armed())]).await;
    let mut agent = daemon.agent().await;
    open_console(&mut agent, "doomed").await;
    logged_pipe(&daemon, "doomed", b"old output\n", None).await;
    logged_pipe(&daemon, "bystander", b"bystander line\n", None).await;

    let remove = tokio::spawn({
        let mut agent = agent.clone();
        async move {
            agent
                .remove_guest(proto::RemoveGuestRequest {
                    guest: "doomed".into(),
                    ..Default::default()
                })
                .await
        }
    });
    wait_point(&daemon, "guests.remove.closing").await;

    // Held mid-removal: another guest is looked up and read, the closing one is gone.
    assert_eq!(
        history(&daemon, "bystander", "qemu").await.unwrap(),
        b"bystander line\n"
    );
    expect_code(
        history(&daemon, "doomed", "qemu").await,
        Code::NotFound,
        "ReadHistory of a guest being removed",
    );
    assert_eq!(
        listed(&daemon).await,
        [("bystander".to_owned(), vec!["qemu".to_owned()])]
    );
    assert!(
        !remove.is_finished(),
        "the other guest was served only after the removal ended"
    );

    // Creating under the closing name waits for the removal, then creates anew.
    let create = tokio::spawn({
        let mut agent = agent.clone();
        async move { create_console(&mut agent, "doomed", DEVICE, None).await }
    });
    let removed = bounded("RemoveGuest", remove).await.unwrap().unwrap();
    assert_eq!(removed.into_inner().streams_removed, 2);
    let created = bounded("CreateConsole", create).await.unwrap().unwrap();
    let log = daemon.stderr();
    let removal_done = line_of(&log, &["guest removed", "\"doomed\""]).expect("removal logged");
    let recreated = log
        .lines()
        .enumerate()
        .filter(|(_, line)| {
            line.contains("stream created")
                && line.contains("\"doomed\"")
                && line.contains("serial0")
        })
        .map(|(i, _)| i)
        .last()
        .expect("creation logged");
    assert!(
        removal_done < recreated,
        "the console was created again before its removal ended:\n{log}"
    );

    // The new console is whole: its sockets are in place and serve, and its record survives.
    assert_socket(&created.guest_socket);
    assert_socket(&created.client_socket);
    let mut guest = SocketPeer::connect(&created.guest_socket).await;
    guest.write(b"new output\n").await;
    bounded("the new console's output logged", async {
        while !history(&daemon, "doomed", DEVICE)
            .await
            .unwrap()
            .ends_with(b"new output\n")
        {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    drop(guest);
    // The console's events carry its guest and stream (the actor runs in their span).
    let log = daemon.stderr();
    assert!(
        line_of(
            &log,
            &["guest connected", "guest=\"doomed\"", "stream=\"serial0\""]
        )
        .is_some(),
        "no span on the console's events:\n{log}"
    );
    assert!(daemon.stop().await.success());
    daemon.restart().await;
    assert_eq!(
        listed(&daemon).await,
        [
            ("bystander".to_owned(), vec!["qemu".to_owned()]),
            ("doomed".to_owned(), vec![DEVICE.to_owned()]),
        ]
    );
    assert_socket(&created.guest_socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_actor_holds_up_no_other_guest() {
    let daemon = Daemon::start_env(&[("CONLOG_FAULT_POINTS", &armed())]).await;
    let mut agent = daemon.agent().await;
    logged_pipe(
        &daemon,
        "slow",
        b"slow line\n",
        Some(limits(1 << 20, 2, LogMode::Rotate)),
    )
    .await;
    logged_pipe(&daemon, "bystander", b"bystander line\n", None).await;
    open_console(&mut agent, "bystander").await;

    // New limits for `slow`: its actor holds the change.
    let change = tokio::spawn({
        let mut agent = agent.clone();
        async move {
            create_pipe(
                &mut agent,
                "slow",
                "qemu",
                Some(limits(2 << 20, 3, LogMode::Rotate)),
            )
            .await
        }
    });
    wait_point(&daemon, "log_owner.set_limits").await;

    // Meanwhile the other guest's history and console are served.
    assert_eq!(
        history(&daemon, "bystander", "qemu").await.unwrap(),
        b"bystander line\n"
    );
    let session = Session::attach(
        local_channel(&daemon).await,
        attach("bystander", Mode::ReadOnly),
    )
    .await
    .unwrap();
    assert!(
        !change.is_finished(),
        "the other guest was served only after the slow actor answered"
    );
    drop(session);

    bounded("CreateLogPipe with new limits", change)
        .await
        .unwrap()
        .unwrap();
    let info = daemon
        .agent()
        .await
        .list_guests(proto::ListGuestsRequest {
            guest: "slow".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let stream = &info.guests[0].streams[0];
    assert_eq!((stream.max_size, stream.max_backups), (2 << 20, 3));
}
