//! Consoles through the real API: `CreateConsole` paths and idempotence, `ListGuests`, refused
//! requests, the clients-per-console limit, `RemoveGuest`, and `conlogctl create-console` /
//! `console`.
//!
//! The other console tests: `console_clients.rs` (fan-out, writer lease, WatchConsole
//! sessions), `console_io.rs` (raw `client.sock`, guest reconnect, replay),
//! `console_lifecycle.rs` (shutdown and restart), `console_flood.rs` (a stuck client during a
//! 100 MiB flood).

use crate::support;

use conlog::proto::{self, attach::Mode, StreamKind};
use std::path::Path;
use std::process::Command;
use support::*;
use tonic::Code;

/// `CreateConsole` returns `consoles/<guest>/<device>.{guest,client}.sock` and
/// `<log_dir>/<guest>/<device>.log`, the same again when repeated; `ListGuests` shows the
/// console with its kind, clients, guest connection and offset as they change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_console_returns_stable_paths_and_list_guests_shows_it() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let consoles = daemon.runtime_dir().join("consoles").join("vm-a");
    let path = |p: &Path| p.display().to_string();

    let reply = open_console(&mut agent, "vm-a").await;
    assert_eq!(
        reply.guest_socket,
        path(&consoles.join("serial0.guest.sock"))
    );
    assert_eq!(
        reply.client_socket,
        path(&consoles.join("serial0.client.sock"))
    );
    assert_eq!(reply.log_path, path(&daemon.log_path("vm-a", "serial0")));
    assert_eq!(reply.offset, 0);
    assert_socket(&reply.guest_socket);
    assert_socket(&reply.client_socket);
    assert_eq!(
        open_console(&mut agent, "vm-a").await,
        reply,
        "repeated CreateConsole"
    );
    let named = create_console(&mut agent, "vm-a", "serial0", None)
        .await
        .unwrap();
    assert_eq!(named, reply, "CreateConsole naming the default device");

    let other = create_console(&mut agent, "vm-a", "ttys1", None)
        .await
        .unwrap();
    assert_eq!(other.guest_socket, path(&consoles.join("ttys1.guest.sock")));
    assert_eq!(
        other.client_socket,
        path(&consoles.join("ttys1.client.sock"))
    );
    assert_eq!(other.log_path, path(&daemon.log_path("vm-a", "ttys1")));

    let info = find_stream(&mut agent, "vm-a", "serial0")
        .await
        .expect("listed");
    assert_eq!(info.kind, StreamKind::Console as i32, "{info:?}");
    assert_eq!(
        (info.clients, info.guest_connected, info.offset),
        (0, false, 0)
    );
    assert_eq!(info.log_path, reply.log_path);

    // QEMU connects and prints, one byte per write.
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm-a", "serial0", true).await;
    guest.write_bytewise(b"hello\n").await;
    let info = wait_offset(&mut agent, "vm-a", "serial0", 6).await;
    assert_eq!(info.kind, StreamKind::Console as i32);
    assert_eq!(read_log(&daemon.log_dir(), "vm-a", "serial0"), b"hello\n");

    // Clients are counted while attached.
    let session = Session::attach(local_channel(&daemon).await, attach("vm-a", Mode::ReadOnly))
        .await
        .expect("attach");
    assert_eq!(session.attached.offset, 6);
    assert!(session.attached.guest_connected);
    let watcher = watch(
        daemon.tcp_channel("vm-a").await,
        watch_request("vm-a", Mode::ReadOnly),
    )
    .await
    .expect("watch");
    wait_clients(&mut agent, "vm-a", "serial0", 2).await;
    drop(session);
    drop(watcher);
    wait_clients(&mut agent, "vm-a", "serial0", 0).await;

    drop(guest);
    let info = wait_guest_connected(&mut agent, "vm-a", "serial0", false).await;
    assert_eq!(info.offset, 6);
    // Repeating CreateConsole reports the current offset.
    assert_eq!(open_console(&mut agent, "vm-a").await.offset, 6);
    // The other device is untouched.
    let info = find_stream(&mut agent, "vm-a", "ttys1")
        .await
        .expect("listed");
    assert_eq!((info.offset, info.guest_connected), (0, false));
}

/// Malformed names, a first frame that is not attach, unknown guests and devices, a log pipe
/// used as a console and unknown sessions each get their precise code; the console keeps
/// working afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_codes() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-b").await;
    open_pipe(&mut agent, "vm-b", "qemu", None).await;

    for (guest, device) in [
        ("../evil", ""),
        ("", ""),
        ("vm-b", "Serial0"),
        ("vm-b", "a/b"),
    ] {
        let result = create_console(&mut agent, guest, device, None).await;
        let message = expect_code(
            result,
            Code::InvalidArgument,
            &format!("CreateConsole {guest:?}/{device:?}"),
        );
        assert!(message.starts_with("Invalid"), "{message}");
    }
    // A socket path longer than sun_path is refused, naming the limit.
    let long_guest = "g".repeat(64);
    let message = expect_code(
        create_console(&mut agent, &long_guest, "", None).await,
        Code::InvalidArgument,
        "CreateConsole with a 64-character guest",
    );
    assert!(message.contains("107"), "{message}");
    assert!(find_stream(&mut agent, &long_guest, "serial0")
        .await
        .is_none());
    // A pipe is not a console, and a console is not a pipe.
    let message = expect_code(
        create_console(&mut agent, "vm-b", "qemu", None).await,
        Code::FailedPrecondition,
        "CreateConsole over a log pipe",
    );
    assert!(message.contains("log pipe"), "{message}");
    expect_code(
        create_pipe(&mut agent, "vm-b", "serial0", None).await,
        Code::FailedPrecondition,
        "CreateLogPipe over a console",
    );

    for (channel, tcp) in [
        (local_channel(&daemon).await, false),
        (daemon.tcp_channel("vm-b").await, true),
    ] {
        let open = |first| Session::open(channel.clone(), first);
        expect_code(
            open(Some(input_frame(b"x"))).await,
            Code::InvalidArgument,
            "input first",
        );
        expect_code(open(None).await, Code::InvalidArgument, "no frame at all");
        let cases = [
            (
                attach("../evil", Mode::ReadWrite),
                Code::InvalidArgument,
                "bad guest",
            ),
            (
                proto::Attach {
                    device: "Bad".into(),
                    ..attach("vm-b", Mode::ReadOnly)
                },
                Code::InvalidArgument,
                "bad device",
            ),
            (
                proto::Attach {
                    mode: 7,
                    ..attach("vm-b", Mode::ReadOnly)
                },
                Code::InvalidArgument,
                "unknown mode",
            ),
            (
                attach("vm-none", Mode::ReadWrite),
                // A token for vm-b learns nothing about other guests.
                if tcp {
                    Code::PermissionDenied
                } else {
                    Code::NotFound
                },
                "unknown guest",
            ),
            (
                proto::Attach {
                    device: "ttys9".into(),
                    ..attach("vm-b", Mode::ReadOnly)
                },
                Code::NotFound,
                "unknown device",
            ),
            (
                proto::Attach {
                    device: "qemu".into(),
                    ..attach("vm-b", Mode::ReadOnly)
                },
                Code::FailedPrecondition,
                "a log pipe",
            ),
        ];
        for (request, code, what) in cases {
            expect_code(open(Some(attach_frame(request))).await, code, what);
        }
        expect_code(
            watch(channel.clone(), watch_request("../evil", Mode::ReadOnly)).await,
            Code::InvalidArgument,
            "WatchConsole bad guest",
        );
        expect_code(
            watch(channel.clone(), watch_request("vm-none", Mode::ReadOnly)).await,
            if tcp {
                Code::PermissionDenied
            } else {
                Code::NotFound
            },
            "WatchConsole unknown guest",
        );
        for session in ["", "no-such-session"] {
            expect_code(
                send_input(channel.clone(), session, b"x").await,
                Code::NotFound,
                &format!("SendConsoleInput {session:?}"),
            );
        }
    }

    // Nothing of that attached anything, and the console still works.
    let info = find_stream(&mut agent, "vm-b", "serial0").await.unwrap();
    assert_eq!(info.clients, 0, "{info:?}");
    let mut session = Session::attach(
        daemon.tcp_channel("vm-b").await,
        attach("vm-b", Mode::ReadWrite),
    )
    .await
    .expect("attach after refused requests");
    assert!(session.attached.writer);
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    session.wait_guest(true).await;
    guest.write(b"ok").await;
    session.wait_output(b"ok").await;
}

/// `limits.clients_per_console: 3`: a fourth AttachConsole, WatchConsole or raw connection is
/// refused with RESOURCE_EXHAUSTED naming the limit; a freed place can be taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_per_console_limit_is_resource_exhausted() {
    let daemon = Daemon::start_with(Some("limits:\n  clients_per_console: 3\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-l").await;

    let first = Session::attach(
        local_channel(&daemon).await,
        attach("vm-l", Mode::ReadWrite),
    )
    .await
    .expect("first client");
    let second = watch(
        daemon.tcp_channel("vm-l").await,
        watch_request("vm-l", Mode::ReadOnly),
    )
    .await
    .expect("second client");
    let _raw = RawClient::connect(&reply.client_socket).await;
    wait_clients(&mut agent, "vm-l", "serial0", 3).await;

    let message = expect_code(
        Session::attach(local_channel(&daemon).await, attach("vm-l", Mode::ReadOnly)).await,
        Code::ResourceExhausted,
        "fourth AttachConsole",
    );
    assert!(message.contains("limits.clients_per_console"), "{message}");
    let message = expect_code(
        watch(
            daemon.tcp_channel("vm-l").await,
            watch_request("vm-l", Mode::ReadOnly),
        )
        .await,
        Code::ResourceExhausted,
        "fourth WatchConsole",
    );
    assert!(message.contains("limits.clients_per_console"), "{message}");
    // A raw connection over the limit is told why and closed.
    let mut refused = RawClient::connect(&reply.client_socket).await;
    let text = String::from_utf8_lossy(refused.wait_eof().await).into_owned();
    assert!(text.contains("limits.clients_per_console"), "{text:?}");
    let info = wait_clients(&mut agent, "vm-l", "serial0", 3).await;
    assert_eq!(info.clients, 3);

    drop(second);
    wait_clients(&mut agent, "vm-l", "serial0", 2).await;
    let again = Session::attach(local_channel(&daemon).await, attach("vm-l", Mode::ReadOnly))
        .await
        .expect("attach after a client left");
    assert!(!again.attached.writer);
    drop(first);
}

/// `RemoveGuest` ends every client stream with NOT_FOUND, closes raw clients and the guest
/// connection, removes the sockets and keeps the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_guest_ends_clients_with_not_found_and_keeps_the_log() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-r").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    let mut session = Session::attach(
        local_channel(&daemon).await,
        attach("vm-r", Mode::ReadWrite),
    )
    .await
    .unwrap();
    let mut watcher = watch(
        daemon.tcp_channel("vm-r").await,
        watch_request("vm-r", Mode::ReadOnly),
    )
    .await
    .unwrap();
    let mut raw = RawClient::connect(&reply.client_socket).await;
    wait_clients(&mut agent, "vm-r", "serial0", 3).await;
    wait_guest_connected(&mut agent, "vm-r", "serial0", true).await;

    guest.write(b"last words\n").await;
    session.wait_output(b"last words\n").await;
    watcher.wait_output(b"last words\n").await;
    raw.wait_for(b"last words\n").await;

    let removed = agent
        .remove_guest(proto::RemoveGuestRequest {
            guest: "vm-r".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.streams_removed, 1);

    let status = session.wait_end().await;
    assert_eq!(status.code(), Code::NotFound, "AttachConsole: {status:?}");
    let status = watcher.wait_end().await;
    assert_eq!(status.code(), Code::NotFound, "WatchConsole: {status:?}");
    assert_eq!(raw.wait_eof().await, b"last words\n");
    assert_eq!(guest.wait_eof().await, b"", "the guest got no input");

    for path in [&reply.guest_socket, &reply.client_socket] {
        assert!(!Path::new(path).exists(), "{path} still exists");
    }
    assert!(!daemon.runtime_dir().join("consoles").join("vm-r").exists());
    assert_eq!(
        read_log(&daemon.log_dir(), "vm-r", "serial0"),
        b"last words\n"
    );
    assert!(find_stream(&mut agent, "vm-r", "serial0").await.is_none());
    expect_code(
        Session::attach(local_channel(&daemon).await, attach("vm-r", Mode::ReadOnly)).await,
        Code::NotFound,
        "attach after RemoveGuest",
    );
}

fn conlogctl(daemon: &Daemon, args: &[&str]) -> Command {
    let mut cmd = Command::new(conlogctl_bin());
    cmd.arg("--socket").arg(daemon.socket()).args(args);
    cmd
}

/// `conlogctl create-console` prints the guest socket path; `conlogctl console` with a pipe on
/// stdin sends the piped bytes to the guest and prints the output (replay, then the guest's
/// echo) until the drain ends; `conlogctl guests` shows the console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conlogctl_create_console_and_piped_console() {
    let daemon = Daemon::start().await;
    let output = run_bounded_async(conlogctl(&daemon, &["create-console", "vm-ctl"])).await;
    assert!(output.status.success(), "{}", describe(&output));
    let guest_socket = String::from_utf8(output.stdout.clone()).unwrap();
    let guest_socket = guest_socket
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{}", describe(&output)));
    let expected = daemon
        .runtime_dir()
        .join("consoles/vm-ctl/serial0.guest.sock");
    assert_eq!(Path::new(guest_socket), expected);
    assert_socket(guest_socket);

    let mut guest = FakeGuest::connect(guest_socket).await;
    guest.write(b"login: ").await;
    let mut agent = daemon.agent().await;
    wait_offset(&mut agent, "vm-ctl", "serial0", 7).await;
    let _echo = guest.echo();

    // The drain only has to outlast one echo round trip; it is generous so that a loaded
    // machine cannot make the test flaky.
    let script = format!(
        "printf 'cmd\\n' | '{}' --socket '{}' console vm-ctl --drain 2s",
        conlogctl_bin(),
        daemon.socket().display()
    );
    let output = run_bounded_async({
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        cmd
    })
    .await;
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "login: cmd\n",
        "{}",
        describe(&output)
    );
    wait_offset(&mut agent, "vm-ctl", "serial0", 11).await;
    assert_eq!(
        read_log(&daemon.log_dir(), "vm-ctl", "serial0"),
        b"login: cmd\n"
    );

    let output = run_bounded_async(conlogctl(&daemon, &["guests"])).await;
    assert!(output.status.success(), "{}", describe(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("vm-ctl "))
        .unwrap_or_else(|| panic!("no vm-ctl row in:\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cols[..4],
        ["vm-ctl", "serial0", "console", "guest-up"],
        "{row}"
    );

    let output = run_bounded_async(conlogctl(&daemon, &["console", "vm-none"])).await;
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("NotFound"),
        "{}",
        describe(&output)
    );
}
