//! Hostile guest output against the real `conlogd`: every byte value, NUL, invalid UTF-8 and
//! terminal escape sequences are logged and relayed byte for byte, never interpreted,
//! through a log pipe (to its file and to a `ReadHistory` follower) and through a serial
//! console (to its file, AttachConsole and WatchConsole clients, a raw `client.sock` client
//! and a replay), and console input of the same bytes reaches the guest unchanged.

use crate::history_common;
use crate::support;

use conlog::proto::{self, attach::Mode, read_history_request::Start};
use history_common::*;
use support::*;

/// Output no terminal should be trusted with: every byte value (both ways round), NUL runs,
/// invalid UTF-8 (a bad continuation, overlong forms, a surrogate, bytes never valid), and
/// escape sequences that retitle, clear, reset or switch a terminal, ask it to answer, write
/// the clipboard, or (8-bit CSI) mean an escape only to some terminals; then line-discipline
/// bytes (^C, ^D, ^Z, XON/XOFF, DEL, BS) and an ssh escape.
fn hostile_output() -> Vec<u8> {
    let mut out: Vec<u8> = (0..=255u8).collect();
    out.extend((0..=255u8).rev());
    for piece in [
        &b"\0\0\0NUL\0"[..],
        b"\xc3\x28 \xa0\xa1 \xe2\x28\xa1 \xf0\x28\x8c\xbc \xc0\xaf \xed\xa0\x80 \xff\xfe\xfd",
        b"\x1b]0;title\x07",
        b"\x1b[2J",
        b"\x1bc",
        b"\x1b[6n",
        b"\x1b[?1049h",
        b"\x1bP+q544e\x1b\\",
        b"\x1b]52;c;aGVsbG8=\x07",
        b"\x9b31m",
        b"\x03\x04\x1a\x11\x13\x7f\x08",
        b"\r\n~.\r\n",
        // Half a UTF-8 character at the very end.
        b"\xe2\x82",
    ] {
        out.extend_from_slice(piece);
    }
    out
}

/// Through a log pipe: the file holds exactly the bytes written, a `ReadHistory` follower
/// started before the output receives exactly them, and so does a plain read asking for text
/// too (the text is a lossy extra; the data stays exact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_keeps_and_relays_every_byte() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let output = hostile_output();
    let (_, pipe) = open_pipe(&mut agent, "vm-bytes", "qemu", None).await;

    let mut console = local_console(&daemon).await;
    let follow = proto::ReadHistoryRequest {
        follow: true,
        ..request("vm-bytes", "qemu", Some(Start::FromOffset(0)))
    };
    let mut chunks = open(&mut console, follow)
        .await
        .expect("ReadHistory follow");
    let len = output.len() as u64;
    let follower = tokio::spawn(async move {
        let mut got = Received::new(DEFAULT_CHUNK);
        while got.position.is_none_or(|p| p < len) {
            let chunk = next(&mut chunks)
                .await
                .unwrap_or_else(|s| panic!("follow ended with {s:?}"))
                .expect("follow ended early");
            got.push(&chunk);
        }
        got.data
    });

    write_and_close(pipe, output.clone()).await;
    wait_closed(&mut agent, "vm-bytes", "qemu", len).await;
    assert_same(
        "log file",
        &read_log(&daemon.log_dir(), "vm-bytes", "qemu"),
        &output,
    );
    let followed = bounded("the follower", follower).await.unwrap();
    assert_same("ReadHistory follower", &followed, &output);
    let with_text = proto::ReadHistoryRequest {
        text: true,
        ..request("vm-bytes", "qemu", Some(Start::FromOffset(0)))
    };
    let read = Received::of(&read_ok(&mut console, with_text).await, DEFAULT_CHUNK);
    assert_same("ReadHistory with text", &read.data, &output);
    daemon.assert_running();
}

/// Through a serial console: the guest prints the output (half in one write, half a byte per
/// write, as QEMU does); the file, an AttachConsole client, a WatchConsole client and a raw
/// `client.sock` client each get exactly those bytes, and so does a client replaying them.
/// The same bytes typed by the writer reach the guest unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_keeps_and_relays_every_byte_both_ways() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let output = hostile_output();
    let len = output.len() as u64;
    let reply = open_console(&mut agent, "vm-esc").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm-esc", DEVICE, true).await;
    let mut writer = Session::attach(
        local_channel(&daemon).await,
        attach("vm-esc", Mode::ReadWrite),
    )
    .await
    .expect("AttachConsole");
    assert!(writer.attached.writer);
    let mut watcher = watch(
        local_channel(&daemon).await,
        watch_request("vm-esc", Mode::ReadOnly),
    )
    .await
    .expect("WatchConsole");
    let mut raw = RawClient::connect(&reply.client_socket).await;
    wait_clients(&mut agent, "vm-esc", DEVICE, 3).await;

    let half = output.len() / 2;
    guest.write(&output[..half]).await;
    guest.write_bytewise(&output[half..]).await;
    wait_offset(&mut agent, "vm-esc", DEVICE, len).await;
    assert_same(
        "log file",
        &read_log(&daemon.log_dir(), "vm-esc", DEVICE),
        &output,
    );
    writer.wait_offset(len).await;
    assert_same("AttachConsole client", &writer.output, &output);
    watcher.wait_offset(len).await;
    assert_same("WatchConsole client", &watcher.output, &output);
    assert_same("raw client", raw.wait_len(output.len()).await, &output);
    let mut replayed = Session::attach(
        local_channel(&daemon).await,
        proto::Attach {
            replay_bytes: len,
            ..attach("vm-esc", Mode::ReadOnly)
        },
    )
    .await
    .expect("AttachConsole with replay");
    assert_eq!(replayed.attached.offset, 0);
    replayed.wait_offset(len).await;
    assert_same("replay", &replayed.output, &output);

    // Console input: nothing is an escape for the daemon either.
    writer.send(&output).await;
    assert_same(
        "input at the guest",
        guest.wait_len(output.len()).await,
        &output,
    );
    daemon.assert_running();
}
