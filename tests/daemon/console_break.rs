//! Serial BREAK and the telnet guest socket (docs/consoles.md, "Serial BREAK"), against the real
//! binary with a fake QEMU that speaks telnet as QEMU's `telnet=on` chardev does: it opens each
//! connection with four option commands, prints guest output unescaped, and reads `IAC IAC` as
//! 0xFF and `IAC BREAK` as a break.
//!
//! The log must hold exactly what the guest printed (QEMU's opening commands stripped, however
//! the reads cut them; 0xFF bytes of the guest kept as they are), input reaches QEMU escaped, a
//! break is `IAC BREAK` and only the writer's goes through, a raw console refuses a break with a
//! reason, and the protocol survives an in-place upgrade (with the connection's state) and a
//! restart (from the stream record).

use crate::support::*;
use crate::upgrade_common::wait_ready_count;
use conlog::proto::{self, attach::Mode, client_frame};
use std::time::{Duration, Instant};
use tonic::Code;

/// What QEMU 7.2 (and current QEMU, chardev/char-socket.c `tcp_chr_telnet_init`) sends first
/// on every connection in telnet mode.
const QEMU_OPENING: [u8; 12] = [255, 251, 1, 255, 251, 3, 255, 251, 0, 255, 253, 0];
const BREAK: [u8; 2] = [255, 243];

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

/// Bytes written to `guest`'s socket that conlogd has not read yet (`SIOCOUTQ`: the socket's
/// send queue, which for a UNIX stream socket is what sits unread at the peer).
#[allow(unsafe_code, reason = "one ioctl whose output type the kernel defines")]
fn unread(guest: &FakeGuest) -> i32 {
    use rustix::ioctl::{ioctl, Getter, Opcode};
    const SIOCOUTQ: Opcode = 0x5411;
    let fd = rustix::fd::AsFd::as_fd(guest.stream());
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int, which is what the getter holds.
    unsafe { ioctl(fd, Getter::<SIOCOUTQ, std::ffi::c_int>::new()) }.expect("SIOCOUTQ")
}

/// Writes `data` and waits until conlogd has read all of it: the next write is then read
/// apart from it, whatever it holds (a telnet command cut at a read boundary).
async fn write_read(guest: &mut FakeGuest, data: &[u8]) {
    guest.write(data).await;
    let until = Instant::now() + DEADLINE;
    while unread(guest) > 0 {
        assert!(Instant::now() < until, "conlogd did not read {data:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `guest`'s log file holds `expected` exactly (and no more after a pause).
async fn wait_log(daemon: &Daemon, guest: &str, expected: &[u8]) {
    let path = daemon.log_path(guest, DEVICE);
    let until = Instant::now() + DEADLINE;
    loop {
        let log = std::fs::read(&path).unwrap_or_default();
        if log.len() >= expected.len() {
            assert_eq!(
                log,
                expected,
                "the log of {guest} differs from what the guest printed\n{}",
                daemon.all_stderr()
            );
            return;
        }
        assert!(
            Instant::now() < until,
            "the log of {guest} holds {log:?}, expected {expected:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// QEMU's opening cut everywhere a read can cut it, then guest output whose 0xFF bytes look
/// like telnet (`IAC IAC`, `IAC WILL`, `IAC BREAK`): the log and an attached client get exactly
/// the guest's bytes; a second connection opens again and is stripped again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_holds_exactly_what_the_guest_printed() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = create(&mut agent, "tn1", proto::ConsoleProtocol::Telnet)
        .await
        .expect("CreateConsole telnet");
    assert_eq!(console.protocol, proto::ConsoleProtocol::Telnet as i32);
    let channel = local_channel(&daemon).await;
    let mut watcher = Session::attach(channel.clone(), attach("tn1", Mode::ReadOnly))
        .await
        .expect("attach");
    assert!(watcher.attached.serial_break, "{:?}", watcher.attached);

    let first: &[u8] = b"\xff\xff\xfb\x01 login: \xff\xf3\xff";
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    // Cut inside the first command, between commands, after a command's IAC.
    write_read(&mut guest, &QEMU_OPENING[..1]).await;
    write_read(&mut guest, &QEMU_OPENING[1..5]).await;
    write_read(&mut guest, &QEMU_OPENING[5..9]).await;
    write_read(&mut guest, &QEMU_OPENING[9..11]).await;
    // The last option byte arrives with the guest's first bytes.
    let mut rest = QEMU_OPENING[11..].to_vec();
    rest.extend_from_slice(&first[..3]);
    write_read(&mut guest, &rest).await;
    // An IAC of the guest at the end of a read.
    write_read(&mut guest, &first[3..first.len() - 1]).await;
    write_read(&mut guest, &first[first.len() - 1..]).await;
    wait_log(&daemon, "tn1", first).await;
    watcher.wait_output_len(first.len() as u64).await;
    assert_eq!(watcher.output, first);

    // A new connection (QEMU reconnecting) opens with the same commands, in one write.
    drop(guest);
    watcher.wait_guest(false).await;
    let second: &[u8] = b"\xff\xfb\x01again\r\n";
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    watcher.wait_guest(true).await;
    guest.write(&[&QEMU_OPENING[..], second].concat()).await;
    let both = [first, second].concat();
    wait_log(&daemon, "tn1", &both).await;
    watcher.wait_output_len(both.len() as u64).await;
    assert_eq!(watcher.output, both);
    let history = read_all_history(&daemon, "tn1").await;
    assert_eq!(history, both);
}

/// Everything `ReadHistory` returns for `guest`'s console.
async fn read_all_history(daemon: &Daemon, guest: &str) -> Vec<u8> {
    let mut stream = local_channel(daemon)
        .await
        .console()
        .read_history(proto::ReadHistoryRequest {
            guest: guest.into(),
            stream: DEVICE.into(),
            ..Default::default()
        })
        .await
        .expect("ReadHistory")
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = bounded("history", stream.message())
        .await
        .expect("history chunk")
    {
        data.extend_from_slice(&chunk.data);
    }
    data
}

/// Input reaches QEMU with 0xFF doubled; a break is `IAC BREAK`, in order with the input, from
/// `AttachConsole` and from `SendConsoleInput`; a watcher's break never reaches QEMU (dropped on
/// a stream, FAILED_PRECONDITION on a call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_is_escaped_and_only_the_writer_sends_a_break() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = create(&mut agent, "tn2", proto::ConsoleProtocol::Telnet)
        .await
        .expect("CreateConsole telnet");
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    guest.write(&QEMU_OPENING).await;
    let channel = local_channel(&daemon).await;
    let mut writer = Session::attach(channel.clone(), attach("tn2", Mode::ReadWrite))
        .await
        .expect("attach writer");
    if !writer.attached.guest_connected {
        writer.wait_guest(true).await;
    }
    let watcher = Session::attach(channel.clone(), attach("tn2", Mode::ReadOnly))
        .await
        .expect("attach watcher");

    watcher.send_frame(break_frame()).await;
    watcher.send(b"watcher").await;
    writer.send(b"a\xffb").await;
    writer.send_frame(break_frame()).await;
    writer.send(b"h").await;
    let expected: &[u8] = b"a\xff\xffb\xff\xf3h";
    guest.wait_len(expected.len()).await;
    // Anything of the watcher would have come before the writer's last frame was read.
    guest.read_some(Duration::from_millis(200)).await;
    assert_eq!(guest.received(), expected);

    // WatchConsole + SendConsoleInput: the break goes after the call's data.
    drop(writer);
    guest.clear_received();
    let take = proto::WatchConsoleRequest {
        force: true,
        ..watch_request("tn2", Mode::ReadWrite)
    };
    let session = watch(channel.clone(), take)
        .await
        .expect("watch");
    assert!(session.attached.writer && session.attached.serial_break);
    let reply = channel.clone()
        .console()
        .send_console_input(proto::SendConsoleInputRequest {
            session_id: session.attached.session_id.clone(),
            data: b"x\xff".to_vec().into(),
            serial_break: true,
        })
        .await
        .expect("SendConsoleInput with a break")
        .into_inner();
    assert_eq!(reply.accepted_bytes, 2, "the caller's bytes are counted");
    let only_break = channel.clone()
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
    let expected = [&b"x\xff\xff"[..], &BREAK, &BREAK].concat();
    guest.wait_len(expected.len()).await;
    assert_eq!(guest.received(), expected);

    let watching = watch(channel.clone(), watch_request("tn2", Mode::ReadOnly))
        .await
        .expect("watch read-only");
    let refused = channel.clone()
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
    assert_eq!(guest.received(), expected, "the watcher's break reached QEMU");
    drop((session, watching, watcher));
}

/// A raw console cannot carry a break: the attached reply says so, `SendConsoleInput` and
/// `AttachConsole` answer FAILED_PRECONDITION saying why and how, QEMU receives nothing, and the
/// guest's 0xFF bytes are logged as with any raw console. A console keeps its protocol: asking
/// again with the other one is refused, asking with none returns it, an unknown one is
/// INVALID_ARGUMENT.
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
    let refused = channel.clone()
        .console()
        .send_console_input(proto::SendConsoleInputRequest {
            session_id: session.attached.session_id.clone(),
            serial_break: true,
            ..Default::default()
        })
        .await;
    let message = expect_code(refused, Code::FailedPrecondition, "a break on a raw console");
    for needle in ["raw", "telnet=on", "--telnet"] {
        assert!(message.contains(needle), "{needle:?} missing: {message}");
    }
    drop(session);

    let take = proto::Attach {
        force: true,
        ..attach("raw1", Mode::ReadWrite)
    };
    let mut writer = Session::attach(channel.clone(), take)
        .await
        .expect("attach");
    writer.send(b"\xffraw").await;
    writer.send_frame(break_frame()).await;
    let status = writer.wait_end().await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("raw"), "{status:?}");
    guest.wait_len(4).await;
    guest.read_some(Duration::from_millis(200)).await;
    assert_eq!(guest.received(), b"\xffraw", "raw input is not escaped");
    guest.write(&QEMU_OPENING).await;
    wait_log(&daemon, "raw1", &QEMU_OPENING).await;

    let other = create(&mut agent, "raw1", proto::ConsoleProtocol::Telnet).await;
    let message = expect_code(other, Code::FailedPrecondition, "another protocol");
    assert!(message.contains("raw") && message.contains("telnet"), "{message}");
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

/// Garbage from the peer of a telnet socket (a command cut by the end of the connection, IACs
/// everywhere, a peer that is not QEMU) never stops the console: the next connection is served
/// and logged exactly, the daemon lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_telnet_socket_is_harmless() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = create(&mut agent, "tn3", proto::ConsoleProtocol::Telnet)
        .await
        .expect("CreateConsole telnet");
    let mut expected = Vec::new();
    for garbage in [
        &[255u8][..],
        &[255, 251],
        &[255, 250, 255, 240, 255],
        &[255, 255, 255, 255, 255, 255, 255],
        b"no telnet at all \xff",
    ] {
        let mut guest = FakeGuest::connect(&console.guest_socket).await;
        guest.write(garbage).await;
        drop(guest);
        // A command cut by the end of its connection is not the guest's; from a byte that
        // cannot continue an option command on, everything is.
        if garbage.len() > 2 {
            expected.extend_from_slice(garbage);
        }
    }
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    guest.write(&[&QEMU_OPENING[..], b"alive"].concat()).await;
    expected.extend_from_slice(b"alive");
    wait_log(&daemon, "tn3", &expected).await;
    assert!(daemon.all_stderr().matches("panicked").next().is_none());
}

/// The protocol is in the stream record and the connection's place in QEMU's opening is carried
/// by an upgrade: after SIGUSR1 the carried connection's output is not stripped again (it
/// begins with what looks like an option command), a break still goes through; after a restart
/// the console is still telnet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_survives_an_upgrade_and_a_restart() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = create(&mut agent, "tn4", proto::ConsoleProtocol::Telnet)
        .await
        .expect("CreateConsole telnet");
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    let before: &[u8] = b"before\r\n";
    guest.write(&[&QEMU_OPENING[..], before].concat()).await;
    wait_log(&daemon, "tn4", before).await;

    daemon.signal(rustix::process::Signal::USR1);
    wait_ready_count("after SIGUSR1", 2, || daemon.stderr()).await;
    let after: &[u8] = b"\xff\xfb\x01after upgrade";
    guest.write(after).await;
    let logged = [before, after].concat();
    wait_log(&daemon, "tn4", &logged).await;
    let channel = local_channel(&daemon).await;
    let writer = Session::attach(channel, attach("tn4", Mode::ReadWrite))
        .await
        .expect("attach after the upgrade");
    assert!(writer.attached.serial_break, "{:?}", writer.attached);
    writer.send_frame(break_frame()).await;
    guest.wait_len(2).await;
    assert_eq!(guest.received(), BREAK);
    drop(writer);

    daemon.stop().await;
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let again = create(&mut agent, "tn4", proto::ConsoleProtocol::Unspecified)
        .await
        .expect("CreateConsole after a restart");
    assert_eq!(again.protocol, proto::ConsoleProtocol::Telnet as i32);
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    guest.write(&[&QEMU_OPENING[..], b"restarted"].concat()).await;
    wait_log(&daemon, "tn4", &[&logged[..], b"restarted"].concat()).await;
}
