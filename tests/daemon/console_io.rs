//! Console input and output paths against the real `conlogd` with a fake guest: raw
//! `client.sock` connections (and a `socat`-like client), guest reconnects, and replay of recent
//! output.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;

use conlog::proto::{self, attach::Mode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// `client.sock`: the first raw connection takes the free writer lease (a gRPC writer is then
/// refused, naming client.sock), raw bytes flow both ways, a second raw connection only
/// watches and its input never reaches the guest; a client that behaves as `socat -` does
/// (write, read, half-close its sending side when its input ends, then leave) works as a raw
/// client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_client_socket_writes_if_lease_free_else_watches() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-raw").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;

    let mut raw1 = RawClient::connect(&reply.client_socket).await;
    wait_clients(&mut agent, "vm-raw", "serial0", 1).await;
    let status = Session::attach(
        local_channel(&daemon).await,
        attach("vm-raw", Mode::ReadWrite),
    )
    .await
    .expect_err("the raw client holds the lease");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("client.sock"), "{status:?}");
    let mut watcher = Session::attach(
        daemon.tcp_channel("vm-raw").await,
        attach("vm-raw", Mode::ReadOnly),
    )
    .await
    .unwrap();

    raw1.write(b"raw-in\n").await;
    guest.wait_for(b"raw-in\n").await;
    guest.write_bytewise(b"raw-out\n").await;
    assert_eq!(raw1.wait_len(8).await, b"raw-out\n");
    watcher.wait_output(b"raw-out\n").await;

    // A second raw connection is a watcher: it gets output, its input is dropped. Closing it
    // after writing is the barrier: the daemon detaches it only after queueing what it read.
    let mut raw2 = RawClient::connect(&reply.client_socket).await;
    wait_clients(&mut agent, "vm-raw", "serial0", 3).await;
    guest.write(b"to-all\n").await;
    raw2.wait_for(b"to-all\n").await;
    raw2.write(b"nope\n").await;
    drop(raw2);
    wait_clients(&mut agent, "vm-raw", "serial0", 2).await;
    raw1.write(b"yes\n").await;
    guest.wait_for(b"yes\n").await;
    assert_eq!(guest.received(), b"raw-in\nyes\n");
    assert_eq!(raw1.wait_len(15).await, b"raw-out\nto-all\n");

    // The raw writer leaves; a socat-like client becomes the writer.
    drop(raw1);
    wait_clients(&mut agent, "vm-raw", "serial0", 1).await;
    let socat = bounded(
        "connect like socat",
        tokio::net::UnixStream::connect(&reply.client_socket),
    )
    .await
    .expect("connect to client.sock");
    wait_clients(&mut agent, "vm-raw", "serial0", 2).await;
    let (mut stdout, mut stdin) = socat.into_split();
    bounded("write like socat", stdin.write_all(b"ping\n"))
        .await
        .unwrap();
    guest.wait_for(b"ping\n").await;
    guest.write_bytewise(b"pong\n").await;
    let mut got = Vec::new();
    let mut buffer = [0u8; 256];
    while !contains(&got, b"pong\n") {
        let n = bounded("read like socat", stdout.read(&mut buffer))
            .await
            .unwrap();
        assert!(n > 0, "the connection ended early; got {got:?}");
        got.extend_from_slice(&buffer[..n]);
    }
    assert_eq!(got, b"pong\n");
    // Its input ended: socat shuts down its sending side (which must succeed), then leaves.
    bounded("half-close like socat", stdin.shutdown())
        .await
        .expect("shut down the sending side");
    drop((stdin, stdout));
    wait_clients(&mut agent, "vm-raw", "serial0", 1).await;
    watcher.wait_output(b"pong\n").await;
    assert_eq!(
        String::from_utf8_lossy(guest.received()),
        "raw-in\nyes\nping\n"
    );
}

/// The writer's input reaches the guest byte for byte: 2 MiB in odd-sized AttachConsole input
/// frames (on TCP each at most 64 KiB of data, docs/operations.md "What a caller can cost"),
/// while the guest does not read at first (the daemon then holds input back instead of
/// dropping or reordering it), then 1 MiB more through SendConsoleInput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_input_reaches_the_guest_byte_for_byte() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-in").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm-in", "serial0", true).await;
    let total = 2 << 20;
    let data = pattern(0, total);

    let session = Session::attach(
        daemon.tcp_channel("vm-in").await,
        attach("vm-in", Mode::ReadWrite),
    )
    .await
    .unwrap();
    assert!(session.attached.writer);
    let sender = {
        let data = data.clone();
        let input = session.input();
        tokio::spawn(async move {
            let mut sent = 0;
            for &size in ODD_CHUNKS.iter().cycle() {
                if sent == data.len() {
                    break;
                }
                let size = size.min(64 << 10).min(data.len() - sent);
                input.send(&data[sent..sent + size]).await;
                sent += size;
            }
        })
    };
    assert!(
        guest.wait_len(total).await == data,
        "AttachConsole input differs"
    );
    bounded("input sender", sender).await.unwrap();

    // The same through a WatchConsole session once the AttachConsole writer is gone.
    drop(session);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let watcher = loop {
        match watch(
            local_channel(&daemon).await,
            watch_request("vm-in", Mode::ReadWrite),
        )
        .await
        {
            Ok(w) => break w,
            Err(s) if s.code() == Code::FailedPrecondition => {
                assert!(tokio::time::Instant::now() < deadline, "lease never freed");
                tokio::time::sleep(POLL).await;
            }
            Err(s) => panic!("WatchConsole: {s:?}"),
        }
    };
    // A guest that does not read holds SendConsoleInput back, so send from a task.
    let more = pattern(total as u64, 1 << 20);
    let sender = {
        let more = more.clone();
        let channel = daemon.tcp_channel("vm-in").await;
        let session_id = watcher.attached.session_id.clone();
        tokio::spawn(async move {
            // One call carries at most 64 KiB (the bound on input waiting for the guest).
            for chunk in more.chunks(64 << 10) {
                let accepted = send_input(channel.clone(), &session_id, chunk)
                    .await
                    .unwrap();
                assert_eq!(accepted, chunk.len() as u64);
            }
        })
    };
    assert!(
        guest.wait_len(total + more.len()).await[total..] == more[..],
        "SendConsoleInput input differs"
    );
    bounded("input sender", sender).await.unwrap();
}

/// QEMU restarting (`reconnect=1`): clients stay attached and get guest {connected: false}
/// then {connected: true} at the right output positions; input while no guest is connected is
/// refused; offsets and the log continue across the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_reconnect_keeps_clients_and_continues_offsets() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-q").await;
    let mut a = Session::attach(
        daemon.tcp_channel("vm-q").await,
        attach("vm-q", Mode::ReadOnly),
    )
    .await
    .unwrap();
    let mut w = watch(
        local_channel(&daemon).await,
        watch_request("vm-q", Mode::ReadWrite),
    )
    .await
    .unwrap();
    assert!(!a.attached.guest_connected && !w.attached.guest_connected);

    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    guest.write_bytewise(b"first boot\n").await;
    a.wait_output(b"first boot\n").await;
    drop(guest);
    a.wait_guest(false).await;
    w.wait_guest(false).await;
    wait_guest_connected(&mut agent, "vm-q", "serial0", false).await;
    let status = send_input(
        local_channel(&daemon).await,
        &w.attached.session_id,
        b"lost\n",
    )
    .await
    .expect_err("input without a guest");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    a.wait_guest(true).await;
    w.wait_guest(true).await;
    guest.write_bytewise(b"second boot\n").await;
    for frames in [&mut *a, &mut w] {
        frames.wait_offset(23).await;
        assert_eq!(frames.output, b"first boot\nsecond boot\n");
        assert_eq!(frames.guest_frames(), [(0, true), (11, false), (11, true)]);
        assert!(frames.lagged().is_empty());
    }
    // The lease survived the reconnect.
    let accepted = send_input(
        local_channel(&daemon).await,
        &w.attached.session_id,
        b"after\n",
    )
    .await
    .unwrap();
    assert_eq!(accepted, 6);
    assert_eq!(guest.wait_len(6).await, b"after\n");

    let info = wait_offset(&mut agent, "vm-q", "serial0", 23).await;
    assert!(info.guest_connected);
    assert_eq!(info.clients, 2);
    assert_eq!(
        read_log(&daemon.log_dir(), "vm-q", "serial0"),
        b"first boot\nsecond boot\n"
    );
}

/// `replay_bytes` sends recent output before going live: exactly the last N bytes (across a
/// rotation), bounded by `consoles.max_replay`, and by what is still on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_recent_output_then_live() {
    let daemon = Daemon::start_with(Some("consoles:\n  max_replay: 64KiB\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let reply = create_console(
        &mut agent,
        "vm-p",
        "",
        Some(limits(48 << 10, 2, proto::LogMode::Rotate)),
    )
    .await
    .unwrap();
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    let total = 200_000u64;
    guest.write(&pattern(0, total as usize)).await;
    let info = wait_offset(&mut agent, "vm-p", "serial0", total).await;
    assert!(info.rotations > 0, "{info:?}");
    // Capped like a log pipe: at most max_backups + 1 files of at most max_size.
    let sizes = log_sizes(&daemon.log_dir(), "vm-p", "serial0");
    assert!(sizes.len() <= 3, "{sizes:?}");
    assert!(sizes.iter().all(|(_, size)| *size <= 48 << 10), "{sizes:?}");
    let on_disk = read_log(&daemon.log_dir(), "vm-p", "serial0");
    assert!(on_disk == pattern(info.first_offset, (total - info.first_offset) as usize));
    assert!(total - info.first_offset > 64 << 10, "{info:?}");

    let replay = |n: u64| proto::Attach {
        replay_bytes: n,
        ..attach("vm-p", Mode::ReadOnly)
    };
    let check = |frames: &Frames, start: u64| {
        assert_eq!(frames.attached.offset, start);
        assert!(
            frames.output == pattern(start, (total - start) as usize),
            "replayed bytes"
        );
    };
    // 30000 bytes span the rotated file and the current one.
    let mut a = Session::attach(local_channel(&daemon).await, replay(30_000))
        .await
        .unwrap();
    a.wait_offset(total).await;
    check(&a, total - 30_000);
    // More than max_replay: the last 64 KiB.
    let mut b = Session::attach(daemon.tcp_channel("vm-p").await, replay(10 << 20))
        .await
        .unwrap();
    b.wait_offset(total).await;
    check(&b, total - (64 << 10));
    let mut w = watch(
        local_channel(&daemon).await,
        proto::WatchConsoleRequest {
            replay_bytes: 1000,
            ..watch_request("vm-p", Mode::ReadOnly)
        },
    )
    .await
    .unwrap();
    w.wait_offset(total).await;
    check(&w, total - 1000);
    let mut none = Session::attach(local_channel(&daemon).await, replay(0))
        .await
        .unwrap();
    assert_eq!(none.attached.offset, total);

    // Then live, contiguous.
    guest.write(&pattern(total, 10)).await;
    for frames in [&mut *a, &mut *b, &mut w, &mut *none] {
        frames.wait_offset(total + 10).await;
        assert!(frames.output.ends_with(&pattern(total, 10)));
        assert!(frames.events.is_empty(), "{:?}", frames.events);
    }
    assert_eq!(none.output, pattern(total, 10));
}
