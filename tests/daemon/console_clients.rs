//! Console clients against the real `conlogd` with a fake guest: fan-out to 20 clients, the
//! writer lease over AttachConsole, and WatchConsole sessions with SendConsoleInput.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;

use conlog::proto::{self, attach::Mode, server_frame::Frame};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use support::*;
use tokio::time::Instant;
use tonic::Code;

/// Attaches READ_WRITE without force, retrying (bounded) while the lease is still held: a
/// client that went away releases it once the daemon has noticed.
async fn attach_when_lease_free(channel: ConsoleChannel, guest: &str) -> Session {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match Session::attach(channel.clone(), attach(guest, Mode::ReadWrite)).await {
            Ok(session) => return session,
            Err(status)
                if status.code() == Code::FailedPrecondition && Instant::now() < deadline =>
            {
                tokio::time::sleep(POLL).await
            }
            Err(status) => panic!("READ_WRITE attach to {guest}: {status:?}"),
        }
    }
}

fn revocations(frames: &Frames) -> usize {
    frames
        .events
        .iter()
        .filter(|(_, f)| matches!(f, Frame::WriterRevoked(_)))
        .count()
}

/// Twenty clients (AttachConsole and WatchConsole, over the local socket and TCP) receive the
/// same bytes in the same frames at the same offsets, equal to the log; the guest writes the
/// first part one byte per write like QEMU, then odd-sized chunks. The guest is paced by the
/// slowest client so that no client can legitimately lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_twenty_clients_gives_identical_bytes_and_offsets() {
    const CLIENTS: usize = 20;
    const WINDOW: u64 = 256 << 10;
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-f").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    guest.write(b"boot\n").await;
    wait_offset(&mut agent, "vm-f", "serial0", 5).await;
    let data = {
        let mut data = b"login: ".repeat(300);
        data.extend(pattern(0, 3 << 20));
        data
    };
    let end = 5 + data.len() as u64;

    let mut readers = Vec::new();
    let mut progress = Vec::new();
    for i in 0..CLIENTS {
        let channel = if i % 2 == 0 {
            local_channel(&daemon).await
        } else {
            daemon.tcp_channel("vm-f").await
        };
        let mode = if i == 0 {
            Mode::ReadWrite
        } else {
            Mode::ReadOnly
        };
        let (session, frames) = if i % 4 < 2 {
            let session = Session::attach(channel, attach("vm-f", mode))
                .await
                .unwrap();
            (Some(session), None)
        } else {
            (
                None,
                Some(watch(channel, watch_request("vm-f", mode)).await.unwrap()),
            )
        };
        let received = Arc::new(AtomicU64::new(5));
        progress.push(received.clone());
        let check =
            move |offset: u64, data: &[u8]| received.store(offset + data.len() as u64, Relaxed);
        readers.push(tokio::spawn(async move {
            let (mut session, mut frames) = (session, frames);
            let frames: &mut Frames = match (&mut session, &mut frames) {
                (Some(session), _) => session,
                (None, Some(frames)) => frames,
                (None, None) => unreachable!(),
            };
            frames.check_output = Some(Box::new(check));
            assert_eq!(frames.attached.offset, 5);
            frames.wait_offset(end).await;
            let frames: &Frames = frames;
            (
                frames.attached.clone(),
                frames.output.clone(),
                frames.chunks.clone(),
                frames.events.clone(),
            )
        }));
    }
    wait_clients(&mut agent, "vm-f", "serial0", CLIENTS as u32).await;

    // The banner one byte per write, then odd chunks, never more than WINDOW ahead of the
    // slowest client (so that every client's queue stays far below its 1 MiB bound).
    let slowest = || progress.iter().map(|p| p.load(Relaxed)).min().unwrap();
    let mut written = 5u64;
    let banner = 7 * 300;
    guest.write_bytewise(&data[..banner]).await;
    written += banner as u64;
    let deadline = Instant::now() + DEADLINE;
    for &size in ODD_CHUNKS.iter().cycle() {
        let done = (written - 5) as usize;
        if done == data.len() {
            break;
        }
        while written - slowest() > WINDOW {
            assert!(
                Instant::now() < deadline,
                "clients stuck at {} of {written}",
                slowest()
            );
            tokio::time::sleep(POLL / 4).await;
        }
        let size = size.min(data.len() - done);
        guest.write(&data[done..done + size]).await;
        written += size as u64;
    }

    let mut results = Vec::new();
    for reader in readers {
        results.push(bounded("client reader", reader).await.expect("reader task"));
    }
    let (_, first_output, first_chunks, _) = &results[0];
    assert_eq!(first_output, &data, "client 0 output");
    assert!(first_chunks.len() > 1, "{first_chunks:?}");
    for (i, (attached, output, chunks, events)) in results.iter().enumerate() {
        assert_eq!(attached.writer, i == 0, "client {i}: {attached:?}");
        assert!(attached.guest_connected, "client {i}: {attached:?}");
        assert!(events.is_empty(), "client {i} got events: {events:?}");
        assert!(output == &data, "client {i}: output differs");
        assert_eq!(
            chunks, first_chunks,
            "client {i}: frames differ from client 0's"
        );
    }
    let mut expected = b"boot\n".to_vec();
    expected.extend(&data);
    wait_offset(&mut agent, "vm-f", "serial0", end).await;
    assert!(
        read_log(&daemon.log_dir(), "vm-f", "serial0") == expected,
        "log differs"
    );
}

/// One writer at a time over AttachConsole: a second READ_WRITE without force is
/// FAILED_PRECONDITION saying the console has a writer; with force it becomes the writer, the
/// old writer gets writer_revoked and keeps watching; only the writer's input reaches the
/// guest; a writer that leaves frees the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_lease_force_and_watcher_input() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-w").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm-w", "serial0", true).await;

    let mut a = Session::attach(
        daemon.tcp_channel("vm-w").await,
        attach("vm-w", Mode::ReadWrite),
    )
    .await
    .unwrap();
    assert!(
        a.attached.writer && a.attached.guest_connected,
        "{:?}",
        a.attached
    );
    assert!(a.attached.session_id.is_empty(), "{:?}", a.attached);
    let status = Session::attach(
        local_channel(&daemon).await,
        attach("vm-w", Mode::ReadWrite),
    )
    .await
    .expect_err("second writer without force");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("has a writer"), "{status:?}");
    assert!(status.message().contains("vm-w/serial0"), "{status:?}");
    let mut c = Session::attach(local_channel(&daemon).await, attach("vm-w", Mode::ReadOnly))
        .await
        .unwrap();
    assert!(!c.attached.writer);
    // MODE_UNSPECIFIED means READ_ONLY.
    let mut d = Session::attach(
        local_channel(&daemon).await,
        attach("vm-w", Mode::Unspecified),
    )
    .await
    .unwrap();
    assert!(!d.attached.writer);

    a.send(b"from-a\n").await;
    guest.wait_for(b"from-a\n").await;
    c.send(b"from-watcher-c\n").await;
    d.send(b"from-watcher-d\n").await;

    let mut b = Session::attach(
        local_channel(&daemon).await,
        proto::Attach {
            force: true,
            ..attach("vm-w", Mode::ReadWrite)
        },
    )
    .await
    .expect("forced writer");
    assert!(b.attached.writer);
    let reason = a.wait_revoked().await;
    assert!(!reason.is_empty());
    a.send(b"from-revoked-a\n").await;
    b.send(b"from-b\n").await;
    guest.wait_for(b"from-b\n").await;

    // The revoked writer still watches, as do the others.
    guest.write(b"still there\n").await;
    for (name, frames) in [
        ("a", &mut *a),
        ("b", &mut *b),
        ("c", &mut *c),
        ("d", &mut *d),
    ] {
        frames.wait_output(b"still there\n").await;
        assert_eq!(frames.output, b"still there\n", "client {name}");
    }

    // The writer leaves; the lease is free again without force.
    drop(b);
    let mut e = attach_when_lease_free(daemon.tcp_channel("vm-w").await, "vm-w").await;
    assert!(e.attached.writer);
    e.send(b"from-e\n").await;
    guest.wait_for(b"from-e\n").await;
    assert_eq!(
        String::from_utf8_lossy(guest.received()),
        "from-a\nfrom-b\nfrom-e\n",
        "only writers' input reaches the guest"
    );
    guest.write(b"end\n").await;
    e.wait_output(b"end\n").await;
    for (name, frames) in [("a", &*a), ("c", &*c), ("d", &*d), ("e", &*e)] {
        let expected = usize::from(name == "a");
        assert_eq!(
            revocations(frames),
            expected,
            "writer_revoked frames of {name}: {:?}",
            frames.events
        );
    }
}

/// WatchConsole + SendConsoleInput: the session id from `attached` carries the writer lease;
/// input of a watcher's session or a revoked session is FAILED_PRECONDITION and never reaches
/// the guest (each reply comes after the daemon decided, so the check is exact); input without
/// a guest is refused; a session ends with its stream (NOT_FOUND afterwards). Sessions work
/// across transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sessions_take_input_only_as_writer() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-x").await;
    let local = local_channel(&daemon).await;
    let tcp = daemon.tcp_channel("vm-x").await;

    let mut w1 = watch(tcp.clone(), watch_request("vm-x", Mode::ReadWrite))
        .await
        .unwrap();
    assert!(w1.attached.writer);
    assert!(!w1.attached.guest_connected);
    let id1 = w1.attached.session_id.clone();
    let status = send_input(local.clone(), &id1, b"nobody\n")
        .await
        .expect_err("no guest");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("No guest"), "{status:?}");

    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    w1.wait_guest(true).await;
    assert_eq!(send_input(local.clone(), &id1, b"hello ").await.unwrap(), 6);

    let mut w2 = watch(local.clone(), watch_request("vm-x", Mode::ReadOnly))
        .await
        .unwrap();
    assert!(!w2.attached.writer);
    let id2 = w2.attached.session_id.clone();
    assert_ne!(id1, id2);
    let status = send_input(tcp.clone(), &id2, b"watcher\n")
        .await
        .expect_err("watcher input");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    let status = watch(tcp.clone(), watch_request("vm-x", Mode::ReadWrite))
        .await
        .expect_err("second writer without force");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("has a writer"), "{status:?}");

    let w3 = watch(
        tcp.clone(),
        proto::WatchConsoleRequest {
            force: true,
            ..watch_request("vm-x", Mode::ReadWrite)
        },
    )
    .await
    .unwrap();
    assert!(w3.attached.writer);
    let id3 = w3.attached.session_id.clone();
    w1.wait_revoked().await;
    let status = send_input(local.clone(), &id1, b"revoked\n")
        .await
        .expect_err("revoked input");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        send_input(local.clone(), &id3, b"world\n").await.unwrap(),
        6
    );

    guest.wait_len(12).await;
    assert_eq!(guest.received(), b"hello world\n");

    // Output reaches every session.
    guest.write(b"out\n").await;
    w1.wait_output(b"out\n").await;
    w2.wait_output(b"out\n").await;
    assert_eq!(w2.output, b"out\n");

    // A session lives as long as its stream. Until the daemon has noticed the stream is gone,
    // the session may still take input (as the writer) or refuse it (detached, not yet
    // forgotten); then it is NOT_FOUND.
    drop(w3);
    let deadline = Instant::now() + DEADLINE;
    let mut late = 0;
    loop {
        match send_input(local.clone(), &id3, b"late\n").await {
            Err(status) if status.code() == Code::NotFound => break,
            Err(status) if status.code() == Code::FailedPrecondition => {}
            Ok(5) => late += 1,
            other => panic!("SendConsoleInput after the stream was dropped: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "session still known after {DEADLINE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    wait_clients(&mut agent, "vm-x", "serial0", 2).await;
    // Its lease is free again.
    let w4 = watch(local.clone(), watch_request("vm-x", Mode::ReadWrite))
        .await
        .unwrap();
    assert!(w4.attached.writer);
    assert_eq!(
        send_input(tcp.clone(), &w4.attached.session_id, b"!")
            .await
            .unwrap(),
        1
    );
    let expected = format!("hello world\n{}!", "late\n".repeat(late));
    guest.wait_len(expected.len()).await;
    assert_eq!(String::from_utf8_lossy(guest.received()), expected);
}
