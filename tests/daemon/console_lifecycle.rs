//! Consoles across the daemon's life: SIGTERM ends client streams with UNAVAILABLE, and a
//! restart brings every console back at the same socket paths with its limits and offsets.

use crate::support;

use conlog::proto::{self, attach::Mode, StreamKind};
use support::*;
use tonic::Code;

/// SIGTERM ends the client streams of AttachConsole (TCP) and WatchConsole (local socket)
/// with UNAVAILABLE ("reconnect and resume by offset"), closes the guest connection, and the
/// daemon exits cleanly with the log complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_client_streams_with_unavailable() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-s").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    let mut session = Session::attach(
        daemon.tcp_channel("vm-s").await,
        attach("vm-s", Mode::ReadWrite),
    )
    .await
    .unwrap();
    let mut watcher = watch(
        local_channel(&daemon).await,
        watch_request("vm-s", Mode::ReadOnly),
    )
    .await
    .unwrap();
    guest.write_bytewise(b"before\n").await;
    session.wait_output(b"before\n").await;
    watcher.wait_output(b"before\n").await;

    daemon.signal(rustix::process::Signal::TERM);
    let attach_end = session.wait_end().await;
    let watch_end = watcher.wait_end().await;
    guest.wait_eof().await;
    let exit = daemon.wait_exit().await;
    assert!(exit.success(), "{exit}\n{}", daemon.stderr());
    assert_eq!(read_log(&daemon.log_dir(), "vm-s", "serial0"), b"before\n");
    assert_eq!(
        attach_end.code(),
        Code::Unavailable,
        "AttachConsole: {attach_end:?}"
    );
    assert_eq!(
        watch_end.code(),
        Code::Unavailable,
        "WatchConsole: {watch_end:?}"
    );
}

/// An interactive AttachConsole client keeps its request stream open (it may type at any
/// time). On SIGTERM its call must still end at once with UNAVAILABLE, so that the gRPC
/// servers drain without falling back to their drain timeout (which the daemon reports as
/// "gRPC calls still running after …; closing them").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_an_interactive_client_drains_without_the_timeout() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    open_console(&mut agent, "vm-d").await;
    let mut session = Session::attach(
        local_channel(&daemon).await,
        attach("vm-d", Mode::ReadWrite),
    )
    .await
    .unwrap();
    daemon.signal(rustix::process::Signal::TERM);
    let status = session.wait_end().await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let exit = daemon.wait_exit().await;
    assert!(exit.success(), "{exit}");
    let stderr = daemon.stderr();
    assert!(stderr.contains("bye"), "{stderr}");
    assert!(
        !stderr.contains("still running"),
        "shutdown waited for the open AttachConsole call:\n{stderr}"
    );
}

/// After SIGTERM and a restart on the same directories the console listens at the same paths
/// with its limits, QEMU can connect again, a writer's input reaches it, and offsets and the log
/// continue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_the_console_at_the_same_paths() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = create_console(
        &mut agent,
        "vm-t",
        "",
        Some(limits(1 << 20, 2, proto::LogMode::Rotate)),
    )
    .await
    .unwrap();
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    let mut session = Session::attach(local_channel(&daemon).await, attach("vm-t", Mode::ReadOnly))
        .await
        .unwrap();
    guest.write_bytewise(b"before\n").await;
    session.wait_output(b"before\n").await;
    daemon.stop().await;
    drop(session);
    guest.wait_eof().await;
    assert_eq!(read_log(&daemon.log_dir(), "vm-t", "serial0"), b"before\n");

    daemon.restart().await;
    let mut agent = daemon.agent().await;
    assert_socket(&reply.guest_socket);
    assert_socket(&reply.client_socket);
    let info = find_stream(&mut agent, "vm-t", "serial0")
        .await
        .expect("restored");
    assert_eq!(info.kind, StreamKind::Console as i32);
    assert_eq!(
        (info.offset, info.max_size, info.max_backups),
        (7, 1 << 20, 2),
        "{info:?}"
    );

    let mut session = Session::attach(
        daemon.tcp_channel("vm-t").await,
        attach("vm-t", Mode::ReadWrite),
    )
    .await
    .unwrap();
    assert_eq!(session.attached.offset, 7);
    assert!(session.attached.writer);
    let mut guest = guest.reconnect().await;
    session.wait_guest(true).await;
    guest.write_bytewise(b"after\n").await;
    session.wait_output(b"after\n").await;
    assert_eq!(session.chunks.first().map(|c| c.0), Some(7));
    session.send(b"typed\n").await;
    guest.wait_for(b"typed\n").await;

    wait_offset(&mut agent, "vm-t", "serial0", 13).await;
    assert_eq!(
        read_log(&daemon.log_dir(), "vm-t", "serial0"),
        b"before\nafter\n"
    );
    let again = open_console(&mut agent, "vm-t").await;
    assert_eq!(
        (
            again.guest_socket,
            again.client_socket,
            again.log_path,
            again.offset
        ),
        (reply.guest_socket, reply.client_socket, reply.log_path, 13)
    );
}
