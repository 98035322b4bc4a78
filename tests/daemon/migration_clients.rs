//! Clients that stay attached while their guest live-migrates (docs/operations.md, "When a
//! guest moves"; docs/gateway.md, "Following moves"): real conlogd nodes with TLS on loopback,
//! a real gateway, a fake guest printing numbered lines that moves at a random line (the
//! destination's agent creates the console with `migrate_from`, the source's agent calls
//! `RemoveGuest(moved_to)`, the source connection closes, a new fake guest continues the
//! numbering on the destination). Every client must see every line exactly once, in order.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes and offsets in tests are small numbers"
)]

use crate::support;

use conlog::proto::{self, attach::Mode, server_frame::Frame, Access, ServerFrame};
use std::process::Stdio;
use support::*;
use tokio::time::Instant;

const GUEST: &str = MIGRATING_GUEST;
/// Lines the guest prints in all.
const LINES: usize = 150;

/// Every line, in order: what each client must have seen.
fn all_lines() -> Vec<u8> {
    numbered_lines(LINES)
}

/// Reads `ServerFrame`s until every line arrived: offsets contiguous, no lag, every line once.
/// Returns the `attached` frames seen (one per node) and the bytes.
async fn read_frames(
    stream: &mut tonic::Streaming<ServerFrame>,
    who: &str,
) -> Vec<proto::Attached> {
    let want = all_lines();
    let mut got = Vec::new();
    let mut attached = Vec::new();
    let mut next: Option<u64> = None;
    // The longest wait between two output frames: the pause the move cost this client
    // (printed, never asserted: the machine is noisy).
    let (mut last_output, mut longest) = (None::<Instant>, std::time::Duration::ZERO);
    let deadline = Instant::now() + DEADLINE;
    while got.len() < want.len() {
        assert!(
            Instant::now() < deadline,
            "{who}: only {:?} after {DEADLINE:?}",
            String::from_utf8_lossy(&got)
        );
        let frame = bounded(who, stream.message())
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "{who}: the stream ended with {s:?} after {:?}",
                    String::from_utf8_lossy(&got)
                )
            })
            .unwrap_or_else(|| {
                panic!(
                    "{who}: the stream ended after {:?}",
                    String::from_utf8_lossy(&got)
                )
            });
        match frame.frame {
            Some(Frame::Attached(a)) => {
                next.get_or_insert(a.offset);
                attached.push(a);
            }
            Some(Frame::Output(out)) => {
                if let Some(at) = last_output {
                    longest = longest.max(at.elapsed());
                }
                last_output = Some(Instant::now());
                assert_eq!(
                    Some(out.offset),
                    next,
                    "{who}: output out of place after {:?}",
                    String::from_utf8_lossy(&got)
                );
                next = Some(out.offset + out.data.len() as u64);
                got.extend_from_slice(&out.data);
            }
            Some(Frame::Lagged(l)) => panic!("{who}: lagged {l:?}"),
            _ => {}
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want),
        "{who}: every line once, in order"
    );
    eprintln!("{who}: longest pause between output frames {longest:?}");
    attached
}

/// Reads a following `ReadHistory` until every line arrived, contiguous and once.
async fn read_chunks(stream: &mut tonic::Streaming<proto::HistoryChunk>, who: &str) {
    let want = all_lines();
    let mut got = Vec::new();
    while got.len() < want.len() {
        let chunk = bounded(who, stream.message())
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "{who}: the stream ended with {s:?} after {:?}",
                    String::from_utf8_lossy(&got)
                )
            })
            .unwrap_or_else(|| {
                panic!(
                    "{who}: the stream ended after {:?}",
                    String::from_utf8_lossy(&got)
                )
            });
        assert!(chunk.gap.is_none(), "{who}: a gap {chunk:?}");
        if chunk.data.is_empty() {
            continue; // an event
        }
        assert_eq!(
            chunk.offset,
            got.len() as u64,
            "{who}: chunks are contiguous"
        );
        got.extend_from_slice(&chunk.data);
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want),
        "{who}: every line once, in order"
    );
}

/// At each switch a client of the destination takes the free writer lease there (so a client
/// that held the lease must take it back with force after the move): the hook, and the
/// holders' sessions.
type Holders = std::sync::Arc<tokio::sync::Mutex<Vec<Session>>>;

fn lease_holders(pki: &Pki, daemons: &[Daemon]) -> (SwitchHook, Holders) {
    let holders: Holders = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let endpoints: std::collections::HashMap<String, tonic::transport::Endpoint> = daemons
        .iter()
        .map(|d| (endpoint_of(d), pki.endpoint(d.tcp, false)))
        .collect();
    let hook: SwitchHook = {
        let holders = holders.clone();
        std::sync::Arc::new(move |to: MigrationNode| {
            let (holders, endpoint) = (holders.clone(), endpoints[&to.endpoint].clone());
            Box::pin(async move {
                let token = to
                    .agent
                    .clone()
                    .issue_token(proto::IssueTokenRequest {
                        guest: GUEST.into(),
                        device: String::new(),
                        access: Access::ReadWrite.into(),
                        ttl_seconds: 600,
                    })
                    .await
                    .expect("IssueToken at the destination")
                    .into_inner()
                    .token;
                let channel = with_token(endpoint.connect().await.expect("connect"), &token);
                let holder = Session::attach(channel, attach(GUEST, Mode::ReadWrite))
                    .await
                    .expect("attach at the destination");
                assert!(holder.attached.writer, "{:?}", holder.attached);
                holders.lock().await.push(holder);
            })
        })
    };
    (hook, holders)
}

/// Through the gateway, across moves at random lines (`hops` moves, over `hops + 1` nodes):
/// an attached READ_WRITE client, a watcher and a history follower each see every line once
/// and in order; the writer keeps the lease and types on the last node.
async fn through_the_gateway(hops: usize) {
    let (pki, daemons, gateway) = migration_fleet(hops + 1).await;
    let mut nodes = Vec::new();
    for daemon in &daemons {
        nodes.push(MigrationNode::of(daemon).await);
    }
    let guest = first_migrating_guest(&nodes[0]).await;
    let token = daemons[0].token(GUEST, "", Access::ReadWrite, 600).await;
    let mut moves_at = Vec::new();
    for hop in 0..hops {
        let span = LINES / hops;
        moves_at.push(random_between(hop * span + 10, (hop + 1) * span - 10));
    }
    eprintln!("moving at lines {moves_at:?}");

    let (input_tx, input_rx) = tokio::sync::mpsc::channel(8);
    input_tx
        .send(attach_frame(attach(GUEST, Mode::ReadWrite)))
        .await
        .unwrap();
    let mut writer_stream = bounded(
        "AttachConsole",
        pki.client(gateway.address, &token)
            .await
            .console()
            .attach_console(tokio_stream::wrappers::ReceiverStream::new(input_rx)),
    )
    .await
    .expect("AttachConsole through the gateway")
    .into_inner();
    let mut watcher = bounded(
        "WatchConsole",
        pki.client(gateway.address, &token)
            .await
            .console()
            .watch_console(watch_request(GUEST, Mode::ReadOnly)),
    )
    .await
    .expect("WatchConsole through the gateway")
    .into_inner();
    let mut history = bounded(
        "ReadHistory",
        pki.client(gateway.address, &token)
            .await
            .console()
            .read_history(follow_request(GUEST)),
    )
    .await
    .expect("ReadHistory through the gateway")
    .into_inner();

    let (hook, holders) = lease_holders(&pki, &daemons);
    let driver = drive_guest(guest, nodes, moves_at, LINES, Some(hook));
    let (attached, watched, ()) = tokio::join!(
        read_frames(&mut writer_stream, "the attached writer"),
        read_frames(&mut watcher, "the watcher"),
        read_chunks(&mut history, "the history follower"),
    );
    let mut last = bounded("the guest driver", driver).await.expect("driver");
    assert_eq!(
        attached.len(),
        hops + 1,
        "one attached frame per node: {attached:?}"
    );
    assert!(
        attached.iter().all(|a| a.writer),
        "the lease followed: {attached:?}"
    );
    assert_eq!(watched.len(), hops + 1, "{watched:?}");
    assert!(
        watched.iter().all(|a| !a.writer),
        "a watcher stays one: {watched:?}"
    );
    for holder in holders.lock().await.iter_mut() {
        holder.wait_revoked().await;
    }
    input_tx
        .send(input_frame(b"typed on the last node\n"))
        .await
        .unwrap();
    last.wait_for(b"typed on the last node\n").await;
    let log = gateway.log();
    assert!(log.contains("following a moved stream"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_gateway_clients_see_every_line_once_across_a_move() {
    let _heavy = heavy().await;
    through_the_gateway(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_gateway_clients_follow_a_chain_of_moves() {
    let _heavy = heavy().await;
    through_the_gateway(2).await;
}

/// `conlogctl` with `--server` at the source: `args` (after the connection flags), stdout to a
/// file.
fn conlogctl(
    pki: &Pki,
    daemon: &Daemon,
    token: &str,
    out: &std::path::Path,
    args: &[&str],
) -> std::process::Child {
    std::process::Command::new(conlogctl_bin())
        .args(["--server", &format!("https://{}", endpoint_of(daemon))])
        .arg("--ca")
        .arg(pki.path("server-ca.pem"))
        .args(["--token", token])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(std::fs::File::create(out.with_extension("stderr")).unwrap())
        .spawn()
        .expect("spawn conlogctl")
}

/// Waits (bounded) until `path` holds every line; kills `child`; returns its stderr.
async fn wait_all_lines(
    child: &mut std::process::Child,
    path: &std::path::Path,
    who: &str,
) -> String {
    let stderr = wait_lines(child, path, who).await;
    let _ = child.kill();
    let _ = child.wait();
    stderr
}

/// Waits (bounded) until `path` holds every line (exactly); returns `child`'s stderr.
async fn wait_lines(child: &mut std::process::Child, path: &std::path::Path, who: &str) -> String {
    let want = all_lines();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = std::fs::read(path).unwrap_or_default();
        let stderr = std::fs::read_to_string(path.with_extension("stderr")).unwrap_or_default();
        if got.len() >= want.len() {
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "{who}: every line once, in order; stderr: {stderr}"
            );
            return stderr;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{who} exited ({status}) after {:?}; stderr: {stderr}",
                String::from_utf8_lossy(&got)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{who}: only {:?} after {DEADLINE:?}; stderr: {stderr}",
            String::from_utf8_lossy(&got)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Directly at the source: `conlogctl history --follow` and a watching `conlogctl console`
/// follow the redirect to the new node with the same token, every line once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conlogctl_follows_the_redirect_of_a_direct_source() {
    let _heavy = heavy().await;
    let (pki, daemons, _gateway) = migration_fleet(2).await;
    let nodes = vec![
        MigrationNode::of(&daemons[0]).await,
        MigrationNode::of(&daemons[1]).await,
    ];
    let guest = first_migrating_guest(&nodes[0]).await;
    let token = daemons[0].token(GUEST, "", Access::ReadWrite, 600).await;
    let dir = tempfile::tempdir().unwrap();
    let (history_out, console_out, writer_out) = (
        dir.path().join("history"),
        dir.path().join("console"),
        dir.path().join("writer"),
    );
    let mut history = conlogctl(
        &pki,
        &daemons[0],
        &token,
        &history_out,
        &["history", GUEST, "--follow"],
    );
    let mut console = conlogctl(
        &pki,
        &daemons[0],
        &token,
        &console_out,
        &["console", GUEST, "--read-only", "--replay", "0"],
    );
    let mut writer = conlogctl(
        &pki,
        &daemons[0],
        &token,
        &writer_out,
        &["console", GUEST, "--replay", "0"],
    );
    // All are connected before the guest prints (the consoles show what comes after it).
    wait_clients(&mut nodes[0].agent.clone(), GUEST, DEVICE, 2).await;
    let (hook, holders) = lease_holders(&pki, &daemons);
    let moves_at = vec![random_between(10, LINES - 10)];
    eprintln!("moving at line {moves_at:?}");
    let driver = drive_guest(guest, nodes.clone(), moves_at, LINES, Some(hook));
    let stderr = wait_all_lines(&mut history, &history_out, "conlogctl history --follow").await;
    assert!(
        stderr.contains(&format!("guest moved to {}; following", nodes[1].endpoint)),
        "{stderr}"
    );
    let stderr = wait_all_lines(&mut console, &console_out, "conlogctl console --read-only").await;
    assert!(
        stderr.contains(&format!("guest moved to {}; following", nodes[1].endpoint)),
        "{stderr}"
    );
    // The writer took its lease back on the destination and types there.
    let mut last = bounded("the guest driver", driver).await.expect("driver");
    wait_lines(&mut writer, &writer_out, "conlogctl console (writer)").await;
    for holder in holders.lock().await.iter_mut() {
        holder.wait_revoked().await;
    }
    use std::io::Write;
    writer
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"typed by conlogctl\n")
        .unwrap();
    last.wait_for(b"typed by conlogctl\n").await;
    let _ = writer.kill();
    let _ = writer.wait();
}

/// A loop (A names B, B names A, at the same offset) is an error naming both, for conlogctl
/// and through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_is_an_error_naming_both_nodes() {
    let _heavy = heavy().await;
    let (pki, daemons, gateway) = migration_fleet(2).await;
    let nodes = [
        MigrationNode::of(&daemons[0]).await,
        MigrationNode::of(&daemons[1]).await,
    ];
    let mut guest = first_migrating_guest(&nodes[0]).await;
    guest.write(b"before the loop\r\n").await;
    let token = daemons[0].token(GUEST, "", Access::ReadWrite, 600).await;
    migrate_guest(&nodes[0], &nodes[1]).await;
    drop(guest);
    crate::migration_common::wait_imported(&daemons[1], GUEST, DEVICE, 17).await;
    // B hands it back to A without a byte of its own: B names A at the offset A names B.
    bounded(
        "RemoveGuest moved_to back",
        nodes[1]
            .agent
            .clone()
            .remove_guest(proto::RemoveGuestRequest {
                guest: GUEST.into(),
                moved_to: nodes[0].endpoint.clone(),
                ..Default::default()
            }),
    )
    .await
    .expect("RemoveGuest moved_to at B");
    let (a, b) = (&nodes[0].endpoint, &nodes[1].endpoint);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("history");
    let mut child = conlogctl(
        &pki,
        &daemons[0],
        &token,
        &out,
        &["history", GUEST, "--follow", "--from", "17"],
    );
    let status = bounded("conlogctl ends", async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    let stderr = std::fs::read_to_string(out.with_extension("stderr")).unwrap();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("loop") && stderr.contains(a.as_str()) && stderr.contains(b.as_str()),
        "{stderr}"
    );

    let mut stream = pki
        .client(gateway.address, &token)
        .await
        .console()
        .read_history(follow_request(GUEST))
        .await
        .map(|r| r.into_inner());
    let status = match &mut stream {
        Err(status) => status.clone(),
        Ok(stream) => loop {
            match bounded("history through the gateway", stream.message()).await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the call ended without an error"),
                Err(status) => break status,
            }
        },
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("loop")
            && status.message().contains(a.as_str())
            && status.message().contains(b.as_str()),
        "{status:?}"
    );
}

/// Over the local socket (no --server: no TLS settings or token to take along) conlogctl does
/// not follow; it says where the guest went and how to continue there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conlogctl_over_the_local_socket_says_how_to_continue() {
    let _heavy = heavy().await;
    let (_pki, daemons, _gateway) = migration_fleet(2).await;
    let nodes = [
        MigrationNode::of(&daemons[0]).await,
        MigrationNode::of(&daemons[1]).await,
    ];
    let mut guest = first_migrating_guest(&nodes[0]).await;
    guest.write(b"before the move\r\n").await;
    migrate_guest(&nodes[0], &nodes[1]).await;
    drop(guest);
    let output = tokio::process::Command::new(conlogctl_bin())
        .arg("--socket")
        .arg(daemons[0].socket())
        .args(["history", GUEST, "--follow", "--from", "17"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = bounded("conlogctl ends", output)
        .await
        .expect("run conlogctl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let b = &nodes[1].endpoint;
    assert!(
        stderr.contains(&format!("guest moved to {b}"))
            && stderr.contains(&format!("--server https://{b}"))
            && stderr.contains("--from 17"),
        "{stderr}"
    );
}

/// Large output (messages the gateway passes on in pieces before a move, and collects whole
/// after it): a history follower and an attached client through the gateway get every byte
/// once across a move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_gateway_large_output_arrives_once_across_a_move() {
    let _heavy = heavy().await;
    let (pki, daemons, gateway) = migration_fleet(2).await;
    let nodes = [
        MigrationNode::of(&daemons[0]).await,
        MigrationNode::of(&daemons[1]).await,
    ];
    let mut guest = first_migrating_guest(&nodes[0]).await;
    let token = daemons[0].token(GUEST, "", Access::ReadWrite, 600).await;
    // Bytes that say where they are: a 7-digit position every 8 bytes.
    let blob = |from: usize, len: usize| -> Vec<u8> {
        (from / 8..(from + len) / 8)
            .flat_map(|i| format!("{:07}\n", i * 8).into_bytes())
            .collect()
    };
    const HALF: usize = 256 << 10;
    let (input_tx, input_rx) = tokio::sync::mpsc::channel(8);
    input_tx
        .send(attach_frame(attach(GUEST, Mode::ReadWrite)))
        .await
        .unwrap();
    let mut attached = bounded(
        "AttachConsole",
        pki.client(gateway.address, &token)
            .await
            .console()
            .attach_console(tokio_stream::wrappers::ReceiverStream::new(input_rx)),
    )
    .await
    .expect("AttachConsole through the gateway")
    .into_inner();
    guest.write(&blob(0, HALF)).await;
    wait_offset(&mut nodes[0].agent.clone(), GUEST, DEVICE, HALF as u64).await;
    let mut history = bounded(
        "ReadHistory",
        pki.client(gateway.address, &token)
            .await
            .console()
            .read_history(follow_request(GUEST)),
    )
    .await
    .expect("ReadHistory through the gateway")
    .into_inner();
    let socket = migrate_guest(&nodes[0], &nodes[1]).await;
    drop(guest);
    let mut guest = FakeGuest::connect(&socket).await;
    guest.write(&blob(HALF, HALF)).await;
    let want = blob(0, 2 * HALF);

    let history_bytes = async {
        let mut got = Vec::new();
        while got.len() < want.len() {
            let chunk = bounded("a history chunk", history.message())
                .await
                .expect("history through the gateway")
                .expect("the follow ended early");
            assert!(chunk.gap.is_none(), "{chunk:?}");
            if chunk.data.is_empty() {
                continue;
            }
            assert_eq!(chunk.offset, got.len() as u64, "chunks are contiguous");
            got.extend_from_slice(&chunk.data);
        }
        got
    };
    let attached_bytes = async {
        let mut got = Vec::new();
        let mut next = None;
        while got.len() < want.len() {
            let frame = bounded("a server frame", attached.message())
                .await
                .expect("attach through the gateway")
                .expect("the attach ended early");
            match frame.frame {
                Some(Frame::Attached(a)) => {
                    next.get_or_insert(a.offset);
                }
                Some(Frame::Output(out)) => {
                    assert_eq!(Some(out.offset), next, "output in place");
                    next = Some(out.offset + out.data.len() as u64);
                    got.extend_from_slice(&out.data);
                }
                Some(Frame::Lagged(l)) => panic!("lagged {l:?}"),
                _ => {}
            }
        }
        got
    };
    let (history_bytes, attached_bytes) = tokio::join!(history_bytes, attached_bytes);
    assert!(history_bytes == want, "history: not every byte once");
    assert!(attached_bytes == want, "attach: not every byte once");
}
