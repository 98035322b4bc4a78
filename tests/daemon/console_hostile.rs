//! Consoles against misbehaving peers: a second QEMU connecting while the first still has bytes
//! in flight, read-write token holders flooding input at a guest that does not read, and a
//! client that never sends its attach frame.
//!
//! - The replaced guest connection is drained: every byte its `write` calls accepted is logged,
//!   in order, before the new connection's bytes; nothing is counted as dropped.
//! - Console input is never queued: per console one piece of at most 64 KiB waits for the
//!   guest; other calls are refused at once (`RESOURCE_EXHAUSTED` naming the bound), so the
//!   daemon's memory stays flat under hundreds of concurrent 1 MiB calls.
//! - Input ends with its caller: a cancelled call, an ended stream, a closed raw connection, a
//!   writer whose lease is taken, an upgrade; none of that input reaches the guest once it
//!   reads, and the next writer's keystrokes arrive exactly and in order.
//! - `AttachConsole` without an attach frame ends after 10 s.

use crate::support;

use conlog::proto::attach::Mode;
use std::io::Write;
use std::os::unix::net::UnixStream as StdUnixStream;
use support::*;
use tokio::time::Instant;
use tonic::Code;

/// Most the daemon's resident memory may grow while the input attack is under way. Every
/// waiting call holding its 1 MiB (what the daemon did before) is 300 MiB.
const RSS_GROWTH: u64 = 64 << 20;
/// The daemon's bound on input waiting for a console's guest (and on one SendConsoleInput).
const PENDING_INPUT: usize = 64 << 10;

/// Numbered lines `first <n>\n` from `n` on, as one buffer of at least `len` bytes.
fn numbered(from: &mut u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        out.extend_from_slice(format!("first {:010}\n", *from).as_bytes());
        *from += 1;
    }
    out
}

/// QEMU reconnecting while its old connection still holds output in the kernel, three times:
/// each time the daemon is stopped (SIGSTOP) while the current connection writes numbered
/// lines until its socket buffer is full, a new connection arrives and writes, and the daemon
/// continues. Every byte the old connection's writes accepted is in the log, in order, before
/// the new one's bytes; the old connection is closed (its next write fails); nothing is counted
/// as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_guest_connection_drains_the_first_in_order() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-two").await;

    let mut current = StdUnixStream::connect(&reply.guest_socket).unwrap();
    wait_guest_connected(&mut agent, "vm-two", "serial0", true).await;
    let mut line = 0;
    let mut expected = numbered(&mut line, 10_000);
    current.write_all(&expected).unwrap();
    wait_offset(&mut agent, "vm-two", "serial0", expected.len() as u64).await;

    for round in 1..=3 {
        // With the daemon stopped, fill the current connection's socket buffer: exactly the
        // bytes its writes accept are recorded.
        daemon.signal(rustix::process::Signal::STOP);
        current.set_nonblocking(true).unwrap();
        let mut in_kernel = 0;
        loop {
            let chunk = numbered(&mut line, 4096);
            match current.write(&chunk) {
                Ok(n) => {
                    expected.extend_from_slice(&chunk[..n]);
                    in_kernel += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("guest write: {e}"),
            }
        }
        assert!(
            in_kernel >= 16 << 10,
            "only {in_kernel} bytes fit the socket"
        );
        let mut next = StdUnixStream::connect(&reply.guest_socket).unwrap();
        let hello = format!("connection {round}\n");
        next.write_all(hello.as_bytes()).unwrap();
        expected.extend_from_slice(hello.as_bytes());
        daemon.signal(rustix::process::Signal::CONT);

        let info = wait_offset(&mut agent, "vm-two", "serial0", expected.len() as u64).await;
        assert_eq!(info.dropped_bytes, 0);
        assert!(info.guest_connected);
        let log = read_log(&daemon.log_dir(), "vm-two", "serial0");
        assert!(
            log == expected,
            "round {round}: the log differs from what the old connection's writes accepted \
             followed by the new one's ({in_kernel} bytes were in the old one's socket buffer)"
        );
        // The old connection is closed: its writes fail now rather than being accepted and
        // lost.
        current.set_nonblocking(false).unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            match current.write(b"late\n") {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "old connection still accepts writes: {other:?}"
                    );
                    tokio::time::sleep(POLL).await;
                }
            }
        }
        current = next;
    }
    // And the last connection is the guest now.
    current.write_all(b"still here\n").unwrap();
    expected.extend_from_slice(b"still here\n");
    wait_offset(&mut agent, "vm-two", "serial0", expected.len() as u64).await;
    assert!(read_log(&daemon.log_dir(), "vm-two", "serial0") == expected);
}

/// Sends filler input (`F`) from `session` until the daemon says the guest has stopped taking
/// it (the socket towards the guest is full). Returns how many filler bytes the daemon
/// reported written.
async fn fill_guest_socket(channel: &ConsoleChannel, session: &str) -> u64 {
    let filler = vec![b'F'; 16 << 10];
    let mut written = 0;
    loop {
        match send_input(channel.clone(), session, &filler).await {
            Ok(n) => {
                assert_eq!(n, filler.len() as u64);
                written += n;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    status.message().contains("has not read its input"),
                    "{status:?}"
                );
                return written;
            }
            Err(status) => panic!("filler input: {status:?}"),
        }
        assert!(written < 64 << 20, "the guest socket never filled");
    }
}

/// Sends `data` from `session`, retrying while an earlier (cancelled) call of the session is
/// still being torn down by the daemon.
async fn send_when_free(channel: &ConsoleChannel, session: &str, data: &[u8]) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match send_input(channel.clone(), session, data).await {
            Ok(n) => return n,
            Err(status)
                if status.code() == Code::ResourceExhausted
                    && status.message().contains("in progress") =>
            {
                assert!(Instant::now() < deadline, "{status:?}");
                tokio::time::sleep(POLL).await;
            }
            Err(status) => panic!("input {:?}: {status:?}", String::from_utf8_lossy(data)),
        }
    }
}

/// 300 concurrent 1 MiB and 300 concurrent 64 KiB SendConsoleInput calls from the writer's
/// session at a guest that does not read: the 1 MiB calls are refused for their size, all but
/// one 64 KiB call are refused as concurrent, the daemon's RSS grows by less than 64 MiB. Once
/// the calls are cancelled and the guest reads, none of their bytes reaches it, and the
/// writer's keystrokes (200 calls) arrive exactly and in order after the filler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_flood_is_bounded_and_cancelled_input_never_reaches_the_guest() {
    // The per-identity call limits would refuse most of the 600 calls first (tests/
    // hostile_callers.rs); raised here so that the input bound itself is what refuses them.
    let daemon = Daemon::start_with(
        Some(
            "limits:\n  calls_per_guest: 1000\n  calls_per_peer: 1000\n  \
             remote_calls_total: 2000\n",
        ),
        &[],
    )
    .await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-in").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm-in", "serial0", true).await;

    let token = daemon
        .token("vm-in", "", conlog::proto::Access::ReadWrite, 3600)
        .await;
    let channel = with_token(daemon.plain_tcp_channel().await, &token);
    let watcher = watch(channel.clone(), watch_request("vm-in", Mode::ReadWrite))
        .await
        .unwrap();
    assert!(watcher.attached.writer);
    let session = watcher.attached.session_id.clone();

    let filler = fill_guest_socket(&channel, &session).await;
    assert!(filler > 0, "the guest socket took no input at all");

    // The attack: over four connections of their own, so that HTTP/2 does not serialise it.
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(with_token(daemon.plain_tcp_channel().await, &token));
    }
    let before = rss_bytes(daemon.pid());
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..600usize {
        let channel = channels[i % channels.len()].clone();
        let session = session.clone();
        let data = if i % 2 == 0 {
            // Under limits.message_size (1 MiB with the request's other fields).
            vec![b'X'; (1 << 20) - 1024]
        } else {
            vec![b'Y'; PENDING_INPUT]
        };
        calls.spawn(async move {
            let result = channel
                .console()
                .send_console_input(conlog::proto::SendConsoleInputRequest {
                    session_id: session,
                    data: data.into(),
                    ..Default::default()
                })
                .await;
            (i, result)
        });
    }
    let mut max_rss = before;
    let mut refused = 0;
    let deadline = Instant::now() + DEADLINE;
    // Every call but at most one (the piece waiting for the guest) is answered at once.
    while calls.len() > 1 {
        let joined =
            tokio::time::timeout(std::time::Duration::from_millis(50), calls.join_next()).await;
        max_rss = max_rss.max(rss_bytes(daemon.pid()));
        assert!(
            Instant::now() < deadline,
            "{} calls still waiting",
            calls.len()
        );
        let Ok(Some(joined)) = joined else { continue };
        let (i, result) = joined.unwrap();
        let status = result.expect_err("input accepted by a guest that does not read");
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "call {i}: {status:?}"
        );
        if i % 2 == 0 {
            assert!(status.message().contains("at most 65536"), "{status:?}");
        }
        refused += 1;
    }
    max_rss = max_rss.max(rss_bytes(daemon.pid()));
    assert!(refused >= 599, "only {refused} calls refused");
    let growth = max_rss.saturating_sub(before);
    assert!(
        growth < RSS_GROWTH,
        "daemon RSS grew by {} MiB under the input flood ({} -> {} MiB)",
        growth >> 20,
        before >> 20,
        max_rss >> 20
    );
    eprintln!(
        "RSS under 600 concurrent input calls: {} -> {} MiB",
        before >> 20,
        max_rss >> 20
    );

    // Cancel what still waits, and wait until the daemon has let go of it: the session takes
    // a (empty) call again only once the cancelled one has ended.
    calls.abort_all();
    while calls.join_next().await.is_some() {}
    assert_eq!(send_when_free(&channel, &session, b"").await, 0);

    // The guest reads now; the writer types.
    let keys: Vec<String> = (0..200).map(|i| format!("key {i}\n")).collect();
    let typist = {
        let channel = channel.clone();
        let session = session.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            for key in &keys {
                assert_eq!(
                    send_when_free(&channel, &session, key.as_bytes()).await,
                    key.len() as u64
                );
            }
        })
    };
    let typed = keys.concat();
    let received = guest
        .wait_until("every keystroke", |r| r.ends_with(typed.as_bytes()))
        .await
        .to_vec();
    bounded("typist", typist).await.unwrap();
    let stale = received.len() - typed.len();
    assert!(
        received[..stale].iter().all(|&b| b == b'F'),
        "input other than filler reached the guest before the keystrokes: {:?}",
        String::from_utf8_lossy(&received[..stale.min(200)])
    );
    assert!(
        stale as u64 >= filler,
        "filler the daemon reported written is missing ({stale} < {filler})"
    );
    // Nothing else arrives later.
    assert_eq!(
        guest.read_some(std::time::Duration::from_millis(200)).await,
        0
    );
    drop(watcher);
}

/// An `AttachConsole` call whose input frames the test sends itself, one at a time.
struct Writer {
    frames: Frames,
    input: tokio::sync::mpsc::Sender<conlog::proto::ClientFrame>,
}

impl Writer {
    async fn attach(channel: ConsoleChannel, attach: conlog::proto::Attach) -> Self {
        let (input, receiver) = tokio::sync::mpsc::channel(1);
        input.send(attach_frame(attach)).await.unwrap();
        let response = bounded(
            "AttachConsole",
            channel
                .console()
                .attach_console(tokio_stream::wrappers::ReceiverStream::new(receiver)),
        )
        .await
        .unwrap();
        let frames = Frames::start(response.into_inner()).await.unwrap();
        Self { frames, input }
    }

    /// Sends 64 KiB frames of `byte` until the daemon stops reading them (the guest does not
    /// take its input, so flow control stops the stream), so that a piece of this writer's
    /// input is waiting for the guest when this returns.
    async fn send_until_stopped(&self, byte: u8) {
        let frame = input_frame(&vec![byte; 64 << 10]);
        let mut sent = 0;
        loop {
            match tokio::time::timeout(
                std::time::Duration::from_millis(500),
                self.input.send(frame.clone()),
            )
            .await
            {
                Ok(Ok(())) => sent += 1,
                Ok(Err(_)) => panic!("the AttachConsole stream ended"),
                Err(_) => break,
            }
            assert!(sent < 64, "the daemon keeps reading input nobody takes");
        }
    }
}

/// Input waiting for a guest that does not read ends with its caller: an `AttachConsole`
/// stream that ends, a `client.sock` connection that closes, and a writer whose lease is taken
/// with `force` each had a piece waiting; none of it reaches the guest once it reads, and the
/// new writer's input arrives exactly, right after the filler the guest's socket had taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_of_ended_streams_and_revoked_writers_never_reaches_the_guest() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-end").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm-end", "serial0", true).await;
    let channel = daemon.tcp_channel("vm-end").await;
    {
        let filler = watch(channel.clone(), watch_request("vm-end", Mode::ReadWrite))
            .await
            .unwrap();
        fill_guest_socket(&channel, &filler.attached.session_id).await;
    }
    wait_clients(&mut agent, "vm-end", "serial0", 0).await;

    // A stream that ends while its input waits. One frame, so that nothing stays in the
    // client's flow-control window and dropping the call resets the stream; the pause gives
    // the daemon time to take the frame (without it the test could only pass more easily).
    let w1 = Writer::attach(channel.clone(), attach("vm-end", Mode::ReadWrite)).await;
    assert!(w1.frames.attached.writer);
    w1.input.send(input_frame(&[b'A'; 60_000])).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(w1);
    wait_clients(&mut agent, "vm-end", "serial0", 0).await;

    // A raw connection that closes while its input waits: it is read only while the guest
    // takes its input, so its socket fills.
    let raw = StdUnixStream::connect(&reply.client_socket).unwrap();
    wait_clients(&mut agent, "vm-end", "serial0", 1).await;
    raw.set_nonblocking(true).unwrap();
    let chunk = vec![b'R'; 4096];
    let deadline = Instant::now() + DEADLINE;
    loop {
        match (&raw).write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("raw client write: {e}"),
        }
        assert!(Instant::now() < deadline, "the raw connection never filled");
        tokio::task::yield_now().await;
    }
    drop(raw);
    wait_clients(&mut agent, "vm-end", "serial0", 0).await;

    // A writer whose lease is taken while its input waits.
    let w2 = Writer::attach(channel.clone(), attach("vm-end", Mode::ReadWrite)).await;
    w2.send_until_stopped(b'B').await;
    let w3 = Writer::attach(
        channel.clone(),
        conlog::proto::Attach {
            force: true,
            ..attach("vm-end", Mode::ReadWrite)
        },
    )
    .await;
    assert!(w3.frames.attached.writer);

    // The guest reads; the new writer types.
    w3.input.send(input_frame(b"done\n")).await.unwrap();
    let received = guest
        .wait_until("the new writer's input", |r| r.ends_with(b"done\n"))
        .await
        .to_vec();
    let stale = &received[..received.len() - 5];
    assert!(
        stale.iter().all(|&b| b == b'F'),
        "input of an ended stream, a closed raw connection or a revoked writer reached the \
         guest: {} A, {} R, {} B bytes",
        stale.iter().filter(|&&b| b == b'A').count(),
        stale.iter().filter(|&&b| b == b'R').count(),
        stale.iter().filter(|&&b| b == b'B').count(),
    );
    assert_eq!(
        guest.read_some(std::time::Duration::from_millis(200)).await,
        0
    );
    drop(w2);
}

/// An `AttachConsole` call that never sends its attach frame ends with `INVALID_ARGUMENT`
/// instead of holding its call place forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_console_without_an_attach_frame_is_ended() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    open_console(&mut agent, "vm-silent").await;
    let (_input, receiver) = tokio::sync::mpsc::channel::<conlog::proto::ClientFrame>(1);
    let status = bounded(
        "AttachConsole without frames",
        daemon
            .tcp_channel("vm-silent")
            .await
            .console()
            .attach_console(tokio_stream::wrappers::ReceiverStream::new(receiver)),
    )
    .await
    .expect_err("an AttachConsole call without frames was served");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("within 10s"), "{status:?}");
}

/// An upgrade ends the input calls in progress, and their input with them: a `SendConsoleInput`
/// waiting for a guest that does not read fails at the upgrade, and once the upgraded daemon
/// serves again and the guest reads, none of its bytes reaches the guest; the next writer's
/// input arrives right after the filler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_waiting_at_an_upgrade_is_discarded_with_its_call() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-up").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm-up", "serial0", true).await;
    let channel = daemon.tcp_channel("vm-up").await;
    let writer = watch(channel.clone(), watch_request("vm-up", Mode::ReadWrite))
        .await
        .unwrap();
    let session = writer.attached.session_id.clone();
    fill_guest_socket(&channel, &session).await;
    // The filler's last call (timed out) may still hold the session for a moment: wait until
    // an empty call goes through, so the waiting call below is not refused as concurrent.
    send_when_free(&channel, &session, b"").await;

    let start_waiting = || {
        let channel = channel.clone();
        let session = session.clone();
        tokio::spawn(async move { send_input(channel, &session, &[b'X'; PENDING_INPUT]).await })
    };
    let mut waiting = start_waiting();
    // The call holds its session (so it reached its handler); the pause lets it reach the
    // console (without it the test could only pass more easily). A probe that reaches the
    // session first makes the waiting call itself the one refused as concurrent: then it is
    // sent again, so the race between the two calls decides nothing.
    let deadline = Instant::now() + DEADLINE;
    loop {
        if waiting.is_finished() {
            match (&mut waiting).await.unwrap() {
                Err(s) if s.message().contains("in progress") => waiting = start_waiting(),
                other => panic!("the waiting call ended before the upgrade: {other:?}"),
            }
        }
        match send_input(channel.clone(), &session, b"").await {
            Err(s) if s.message().contains("in progress") => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the waiting call never started: {other:?}"
                );
                tokio::time::sleep(POLL).await;
            }
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    daemon.signal(rustix::process::Signal::USR1);
    let ended = bounded("the waiting call", waiting).await.unwrap();
    assert!(
        ended.is_err(),
        "input accepted by a guest that does not read: {ended:?}"
    );
    drop(writer);

    // The upgraded daemon ("conlogd ready" a second time) serves the same guest connection.
    let deadline = Instant::now() + DEADLINE;
    while daemon.stderr().matches("conlogd ready").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no second ready line:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(POLL).await;
    }
    let mut agent = daemon.agent().await;
    wait_guest_connected(&mut agent, "vm-up", "serial0", true).await;
    let channel = daemon.tcp_channel("vm-up").await;
    let next = watch(channel.clone(), watch_request("vm-up", Mode::ReadWrite))
        .await
        .unwrap();
    assert!(next.attached.writer);
    let typist = {
        let session = next.attached.session_id.clone();
        tokio::spawn(async move { send_when_free(&channel, &session, b"after\n").await })
    };
    let received = guest
        .wait_until("the next writer's input", |r| r.ends_with(b"after\n"))
        .await
        .to_vec();
    assert_eq!(bounded("typist", typist).await.unwrap(), 6);
    let stale = &received[..received.len() - 6];
    assert!(
        stale.iter().all(|&b| b == b'F'),
        "{} bytes of the call ended by the upgrade reached the guest",
        stale.iter().filter(|&&b| b == b'X').count()
    );
}
