//! Serial BREAK on a mux console (docs/consoles.md, "Serial BREAK"), against the real binary
//! with a fake QEMU whose chardev has `mux=on`: of what it reads, Ctrl-A starts a command
//! (`Ctrl-A b` a break, `Ctrl-A Ctrl-A` one Ctrl-A for the guest, `Ctrl-A x` quits QEMU, ...).
//!
//! Input reaches QEMU with every Ctrl-A doubled, so no keystroke runs a QEMU command; a break is
//! `Ctrl-A b` and only the writer's goes through; a sequence is never left half written when
//! input is discarded; the log holds exactly what the guest printed; a raw console refuses a
//! break and says why; the protocol survives an in-place upgrade and a restart.

use crate::support::*;
use crate::upgrade_common::wait_ready_count;
use conlog::proto::{self, attach::Mode, client_frame};
use std::time::{Duration, Instant};
use tonic::Code;

const BREAK: [u8; 2] = [1, b'b'];

async fn create(
    agent: &mut proto::agent_client::AgentClient<tonic::transport::Channel>,
    guest: &str,
    protocol: proto::ConsoleProtocol,
) -> Result<proto::CreateConsoleResponse, tonic::Status> {
    agent
        .create_console(proto::CreateConsoleRequest {
            guest: guest.into(),
            protocol: protocol as i32,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn break_frame() -> proto::ClientFrame {
    proto::ClientFrame {
        frame: Some(client_frame::Frame::SerialBreak(proto::SerialBreak {})),
    }
}

/// What QEMU's mux (chardev/char-mux.c `mux_proc_byte`) makes of `input`: the guest's bytes and
/// the number of breaks, or the command other than a break that would have run.
fn qemu_mux_reads(input: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let (mut guest, mut breaks, mut escaped) = (Vec::new(), 0, false);
    for (at, &byte) in input.iter().enumerate() {
        if std::mem::take(&mut escaped) {
            match byte {
                1 => guest.push(1),
                b'b' => breaks += 1,
                other => return Err(format!("QEMU command Ctrl-A {other:#04x} at byte {at}")),
            }
        } else if byte == 1 {
            escaped = true;
        } else {
            guest.push(byte);
        }
    }
    Ok((guest, breaks))
}

fn take_lease(guest: &str) -> proto::Attach {
    proto::Attach {
        force: true,
        ..attach(guest, Mode::ReadWrite)
    }
}

/// Waits until `guest`'s log file holds `expected` exactly.
async fn wait_log(daemon: &Daemon, guest: &str, expected: &[u8]) {
    let path = daemon.log_path(guest, DEVICE);
    let until = Instant::now() + DEADLINE;
    loop {
        let log = std::fs::read(&path).unwrap_or_default();
        if log.len() >= expected.len() {
            assert_eq!(
                log, expected,
                "the log of {guest} differs from the guest's output"
            );
            return;
        }
        assert!(Instant::now() < until, "the log of {guest} holds {log:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// Input with Ctrl-A (alone, doubled, before `x` and `b`) reaches the guest unchanged through
/// QEMU's mux, with exactly the breaks asked for, in order, from `AttachConsole` and from
/// `SendConsoleInput`; a watcher's break never reaches QEMU (dropped on a stream,
/// FAILED_PRECONDITION on a call). The guest's output, Ctrl-A included, is logged as printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_is_escaped_and_only_the_writer_sends_a_break() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = create(&mut agent, "mx1", proto::ConsoleProtocol::Mux)
        .await
        .expect("CreateConsole mux");
    assert_eq!(console.protocol, proto::ConsoleProtocol::Mux as i32);
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    let channel = local_channel(&daemon).await;
    let mut writer = Session::attach(channel.clone(), attach("mx1", Mode::ReadWrite))
        .await
        .expect("attach writer");
    assert!(writer.attached.serial_break, "{:?}", writer.attached);
    if !writer.attached.guest_connected {
        writer.wait_guest(true).await;
    }
    let watcher = Session::attach(channel.clone(), attach("mx1", Mode::ReadOnly))
        .await
        .expect("attach watcher");
    assert!(watcher.attached.serial_break && !watcher.attached.writer);

    let printed: &[u8] = b"\x01x\x01b\x01\x01\xff login: ";
    guest.write(printed).await;
    wait_log(&daemon, "mx1", printed).await;

    watcher.send_frame(break_frame()).await;
    watcher.send(b"watcher").await;
    let typed: &[u8] = b"a\x01x\x01\x01b\x01";
    writer.send(typed).await;
    writer.send_frame(break_frame()).await;
    writer.send(b"h").await;
    let wire = [&b"a\x01\x01x\x01\x01\x01\x01b\x01\x01"[..], &BREAK, b"h"].concat();
    guest.wait_len(wire.len()).await;
    // The watcher's frames went first: anything of them would be here by now.
    guest.read_some(Duration::from_millis(200)).await;
    assert_eq!(guest.received(), wire);
    assert_eq!(
        qemu_mux_reads(guest.received()),
        Ok(([typed, b"h"].concat(), 1))
    );

    // WatchConsole + SendConsoleInput: the break goes after the call's data.
    drop(writer);
    guest.clear_received();
    let session = watch(
        channel.clone(),
        proto::WatchConsoleRequest {
            force: true,
            ..watch_request("mx1", Mode::ReadWrite)
        },
    )
    .await
    .expect("watch");
    assert!(session.attached.writer && session.attached.serial_break);
    let reply = channel
        .clone()
        .console()
        .send_console_input(proto::SendConsoleInputRequest {
            session_id: session.attached.session_id.clone(),
            data: b"y\x01".to_vec().into(),
            serial_break: true,
        })
        .await
        .expect("SendConsoleInput with a break")
        .into_inner();
    assert_eq!(reply.accepted_bytes, 2, "the caller's bytes are counted");
    let only_break = channel
        .clone()
        .console()
        .send_console_input(proto::SendConsoleInputRequest {
            session_id: session.attached.session_id.clone(),
            serial_break: true,
            ..Default::default()
        })
        .await
        .expect("SendConsoleInput, a break alone")
        .into_inner();
    assert_eq!(only_break.accepted_bytes, 0);
    let expected = [&b"y\x01\x01"[..], &BREAK, &BREAK].concat();
    guest.wait_len(expected.len()).await;
    assert_eq!(guest.received(), expected);

    let watching = watch(channel.clone(), watch_request("mx1", Mode::ReadOnly))
        .await
        .expect("watch read-only");
    let refused = channel
        .clone()
        .console()
        .send_console_input(proto::SendConsoleInputRequest {
            session_id: watching.attached.session_id.clone(),
            serial_break: true,
            ..Default::default()
        })
        .await;
    let message = expect_code(refused, Code::FailedPrecondition, "a watcher's break");
    assert!(message.contains("writer lease"), "{message}");
    guest.read_some(Duration::from_millis(200)).await;
    assert_eq!(
        guest.received(),
        expected,
        "the watcher's break reached QEMU"
    );

    // The log is still exactly the guest's output (input is never logged).
    wait_log(&daemon, "mx1", printed).await;
    drop((session, watching, watcher));
}

/// Bytes waiting unread in `guest`'s socket.
fn queued(guest: &FakeGuest) -> u64 {
    rustix::io::ioctl_fionread(guest.stream()).expect("FIONREAD")
}

/// Input discarded while QEMU does not read (the writer leaves with its input half written,
/// the socket full) never leaves QEMU inside a Ctrl-A sequence: whatever the cut, the next
/// writer's keys (typed while the socket is still full, so they queue behind the rest of the
/// cut pair) reach the guest and run no QEMU command. Each round cuts a flood of Ctrl-A at a
/// different place (the kernel decides where a write stops; each round moves the pairs, so that
/// many rounds cut inside a pair: an implementation that left the pair cut
/// is caught with near certainty, and a correct one passes whatever the cuts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_input_never_leaves_a_sequence_half_written() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = create(&mut agent, "mx2", proto::ConsoleProtocol::Mux)
        .await
        .expect("CreateConsole mux");
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    let channel = local_channel(&daemon).await;
    for round in 0..24usize {
        let writer = Session::attach(channel.clone(), take_lease("mx2"))
            .await
            .expect("attach writer");
        let input = writer.input();
        // Frames of one piece each (escaped, under 64 KiB), more than the socket holds: a piece
        // is in flight when the queue stops growing. The kernel takes a piece in chunks of a
        // fixed size; pieces of another size each round, with one or two plain bytes at the
        // front, move where the cut falls in the Ctrl-A pairs. The plain bytes also follow a
        // cut, where a dangling Ctrl-A would make them a QEMU command.
        let flood = [vec![b'p'; round % 2 + 1], vec![1u8; 20_000 + 997 * round]].concat();
        let sender = tokio::spawn(async move {
            for _ in 0..12 {
                input.send(&flood).await;
            }
        });
        let mut last = 0;
        let mut steady = 0;
        let until = Instant::now() + DEADLINE;
        while steady < 10 {
            assert!(Instant::now() < until, "the socket never filled");
            tokio::time::sleep(POLL).await;
            let now = queued(&guest);
            // Full: at least half the default socket buffer (net.core.wmem_default, 208 KiB)
            // queued, and no more coming.
            steady = if now == last && now > 100_000 {
                steady + 1
            } else {
                0
            };
            last = now;
        }
        // The writer leaves: what is not written is discarded. The next one types at once,
        // while the socket is still full: its key goes after the rest of a cut pair.
        sender.abort();
        drop(writer);
        let typist = Session::attach(channel.clone(), take_lease("mx2"))
            .await
            .expect("attach the typist");
        typist.send(b"k").await;
        // QEMU reads everything now.
        while guest.read_some(Duration::from_millis(300)).await > 0 {}
        drop(typist);
    }
    let writer = Session::attach(channel.clone(), take_lease("mx2"))
        .await
        .expect("attach the last writer");
    writer.send(b"Zx").await;
    writer.send_frame(break_frame()).await;
    guest
        .wait_until("the last writer's keys and break", |r| {
            r.ends_with(&[&b"Zx"[..], &BREAK].concat())
        })
        .await;
    let (keys, breaks) = qemu_mux_reads(guest.received()).unwrap_or_else(|command| {
        panic!("a half-written sequence made QEMU run a command: {command}")
    });
    assert!(keys.ends_with(b"Zx"), "the last keys reached the guest");
    assert_eq!(breaks, 1);
    assert_eq!(
        keys.iter().filter(|&&k| k == b'k').count(),
        24,
        "every typist's key reached the guest"
    );
}

/// A raw console cannot carry a break: the attached reply says so, `SendConsoleInput` and
/// `AttachConsole` answer FAILED_PRECONDITION saying why and what to do, QEMU receives nothing
/// and raw input is not escaped. A console keeps its protocol: asking again with the other one
/// is refused, asking with none returns it; an unknown protocol is INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_console_refuses_a_break_and_says_why() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = create(&mut agent, "raw1", proto::ConsoleProtocol::Unspecified)
        .await
        .expect("CreateConsole");
    assert_eq!(console.protocol, proto::ConsoleProtocol::Raw as i32);
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    let channel = local_channel(&daemon).await;
    let session = watch(channel.clone(), watch_request("raw1", Mode::ReadWrite))
        .await
        .expect("watch");
    assert!(session.attached.writer && !session.attached.serial_break);
    let refused = channel
        .clone()
        .console()
        .send_console_input(proto::SendConsoleInputRequest {
            session_id: session.attached.session_id.clone(),
            serial_break: true,
            ..Default::default()
        })
        .await;
    let message = expect_code(
        refused,
        Code::FailedPrecondition,
        "a break on a raw console",
    );
    for needle in ["raw", "mux=on", "--mux"] {
        assert!(message.contains(needle), "{needle:?} missing: {message}");
    }
    drop(session);

    let mut writer = Session::attach(channel.clone(), take_lease("raw1"))
        .await
        .expect("attach");
    writer.send(b"\x01raw").await;
    writer.send_frame(break_frame()).await;
    let status = writer.wait_end().await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("raw"), "{status:?}");
    guest.wait_len(4).await;
    guest.read_some(Duration::from_millis(200)).await;
    assert_eq!(guest.received(), b"\x01raw", "raw input is not escaped");

    let other = create(&mut agent, "raw1", proto::ConsoleProtocol::Mux).await;
    let message = expect_code(other, Code::FailedPrecondition, "another protocol");
    assert!(
        message.contains("raw") && message.contains("mux"),
        "{message}"
    );
    let again = create(&mut agent, "raw1", proto::ConsoleProtocol::Raw)
        .await
        .expect("the same protocol again");
    assert_eq!(again.guest_socket, console.guest_socket);
    let bad = agent
        .create_console(proto::CreateConsoleRequest {
            guest: "raw2".into(),
            protocol: 7,
            ..Default::default()
        })
        .await;
    let message = expect_code(bad, Code::InvalidArgument, "protocol 7");
    assert!(message.contains("ConsoleProtocol"), "{message}");
}

/// The protocol is in the stream record and carried by an upgrade: after SIGUSR1 (QEMU's
/// connection carried) Ctrl-A is still escaped and a break goes through; after a restart the
/// console is still a mux console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_survives_an_upgrade_and_a_restart() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = create(&mut agent, "mx4", proto::ConsoleProtocol::Mux)
        .await
        .expect("CreateConsole mux");
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    guest.write(b"before\r\n").await;
    wait_log(&daemon, "mx4", b"before\r\n").await;

    daemon.signal(rustix::process::Signal::USR1);
    wait_ready_count("after SIGUSR1", 2, || daemon.stderr()).await;
    let channel = local_channel(&daemon).await;
    let writer = Session::attach(channel, attach("mx4", Mode::ReadWrite))
        .await
        .expect("attach after the upgrade");
    assert!(writer.attached.serial_break, "{:?}", writer.attached);
    writer.send(b"\x01").await;
    writer.send_frame(break_frame()).await;
    let expected = [&[1u8, 1][..], &BREAK].concat();
    guest.wait_len(expected.len()).await;
    assert_eq!(guest.received(), expected);
    drop(writer);

    daemon.stop().await;
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let again = create(&mut agent, "mx4", proto::ConsoleProtocol::Unspecified)
        .await
        .expect("CreateConsole after a restart");
    assert_eq!(again.protocol, proto::ConsoleProtocol::Mux as i32);
}
