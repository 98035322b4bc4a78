//! Crash recovery against the real binary: after `kill -9` and a fresh start, consoles are back
//! at the same socket paths (a fake guest reconnects by itself), offsets continue from the
//! files, pipes that died are reported broken until a new one is handed over; torn or foreign
//! state files are refused with a message naming them and do not keep the daemon (or the other
//! streams) from coming back.

use crate::support;
use crate::upgrade_common;

use conlog::proto::{attach::Mode, LogMode, StreamKind};
use std::io::Write;
use std::path::{Path, PathBuf};
use support::*;
use upgrade_common::*;

/// These tests cover recovery from the state directory alone, as without a keeper (a crash
/// then closes every pipe and console connection); tests/faults/crash_keeper.rs covers the keeper.
const NO_KEEPER: &str = "keeper: off\n";

/// `<data>/state/guests/<guest>/<stream>.<ext>`.
fn state_file(daemon: &Daemon, guest: &str, stream: &str, ext: &str) -> PathBuf {
    daemon
        .data_dir()
        .join(format!("state/guests/{guest}/{stream}.{ext}"))
}

/// Bytes that are neither JSON nor anything conlog writes.
fn garbage(len: usize) -> Vec<u8> {
    let mut bytes = pattern(12_345, len);
    bytes[0] = 0xff;
    bytes
}

/// Writes `data` into a new pipe of `guest/qemu` and closes it; waits until it is logged.
async fn logged_and_closed(daemon: &Daemon, guest: &str, data: &[u8]) {
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, guest, "qemu", None).await;
    write_and_close(pipe, data.to_vec()).await;
    wait_closed(&mut agent, guest, "qemu", data.len() as u64).await;
}

/// Creates a new pipe for `guest/qemu` after a restart: it must continue at `offset`; `more`
/// is written and the log must then hold `before` and `more`.
async fn new_pipe_continues(daemon: &Daemon, guest: &str, before: &[u8], more: &[u8]) {
    let mut agent = daemon.agent().await;
    let (reply, pipe) = open_pipe(&mut agent, guest, "qemu", None).await;
    assert_eq!(
        reply.offset,
        before.len() as u64,
        "{guest}: a new pipe continues at the old offset"
    );
    write_and_close(pipe, more.to_vec()).await;
    let total = (before.len() + more.len()) as u64;
    let info = wait_closed(&mut agent, guest, "qemu", total).await;
    assert!(
        !info.broken,
        "{guest}: a new pipe mends a broken stream: {info:?}"
    );
    assert_same(
        &format!("{guest}: log across the crash"),
        &read_log(&daemon.log_dir(), guest, "qemu"),
        &[before, more].concat(),
    );
}

/// Pipes and a console, then `kill -9` and a restart: the pipe whose writer was still open is
/// listed broken (its write end now fails with EPIPE) with its offset and limits, the pipe
/// closed before the crash is not; a new pipe mends the broken stream and continues its
/// offsets (across rotated files); the console is back at the same socket path, the fake guest
/// reconnects by itself and the log and ReadHistory continue from the old offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_recovery_after_kill_9() {
    let mut daemon = Daemon::start_with(Some(NO_KEEPER), &[]).await;
    let mut agent = daemon.agent().await;

    // vm-open rotates (8 KiB files, enough backups to keep everything).
    let small = limits(8 << 10, 1000, LogMode::Rotate);
    let (_, mut open) = open_pipe(&mut agent, "vm-open", "qemu", Some(small)).await;
    let open_before = lines("vm-open", 1000);
    open.write_all(&open_before).unwrap();
    let closed_before = lines("vm-closed", 100);
    logged_and_closed(&daemon, "vm-closed", &closed_before).await;
    let console = open_console(&mut agent, "vm-con").await;
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    let printed_before = lines("vm-con", 300);
    guest.write(&printed_before).await;
    wait_offset(&mut agent, "vm-open", "qemu", open_before.len() as u64).await;
    let info = wait_offset(&mut agent, "vm-con", DEVICE, printed_before.len() as u64).await;
    assert!(info.guest_connected);
    let mut watcher = Session::attach(
        local_channel(&daemon).await,
        attach("vm-con", Mode::ReadOnly),
    )
    .await
    .unwrap();
    drop(agent);

    daemon.kill().await;
    // Everything the daemon held died with it.
    let error = open
        .write_all(b"after the crash\n")
        .expect_err("the read end died with the daemon");
    assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
    guest.wait_eof().await;
    watcher.wait_end().await;

    daemon.restart().await;
    let reply = list_guests(&daemon.socket()).await;
    let open_info = get(&reply, "vm-open", "qemu");
    assert!(
        open_info.broken && !open_info.open,
        "the pipe lost in the crash is broken: {open_info:?}"
    );
    assert_eq!(open_info.offset, open_before.len() as u64, "{open_info:?}");
    assert_eq!(
        (open_info.max_size, open_info.max_backups),
        (8 << 10, 1000),
        "limits survive the crash"
    );
    assert!(
        open_info.rotations == 0 && open_info.first_offset == 0,
        "{open_info:?}"
    );
    let closed_info = get(&reply, "vm-closed", "qemu");
    assert!(
        !closed_info.broken && !closed_info.open,
        "a pipe closed before the crash is not broken: {closed_info:?}"
    );
    assert_eq!(closed_info.offset, closed_before.len() as u64);
    let con = get(&reply, "vm-con", DEVICE);
    assert_eq!(con.kind, StreamKind::Console as i32, "{con:?}");
    assert_eq!(con.offset, printed_before.len() as u64, "{con:?}");
    assert!(!con.broken, "{con:?}");

    // The console listens at the same paths again; QEMU (reconnect=1) comes back by itself.
    assert_socket(&console.guest_socket);
    assert_socket(&console.client_socket);
    let mut guest = guest.reconnect().await;
    let mut agent = daemon.agent().await;
    wait_guest_connected(&mut agent, "vm-con", DEVICE, true).await;
    let mut client = Session::attach(
        daemon.tcp_channel("vm-con").await,
        attach("vm-con", Mode::ReadWrite),
    )
    .await
    .unwrap();
    assert_eq!(client.attached.offset, printed_before.len() as u64);
    assert!(client.attached.guest_connected);
    let printed_after = lines("vm-con after", 50);
    guest.write(&printed_after).await;
    client
        .wait_offset((printed_before.len() + printed_after.len()) as u64)
        .await;
    assert_same(
        "console output after the crash",
        &client.output,
        &printed_after,
    );
    client.send(b"typed\n").await;
    assert_eq!(guest.wait_len(6).await, b"typed\n");
    let all_printed = [&printed_before[..], &printed_after].concat();
    assert_same(
        "console log across the crash",
        &read_log(&daemon.log_dir(), "vm-con", DEVICE),
        &all_printed,
    );
    let mut history = Vec::new();
    fill_gap(
        &daemon.socket(),
        "vm-con",
        DEVICE,
        &mut history,
        all_printed.len() as u64,
    )
    .await;
    assert_same("ReadHistory across the crash", &history, &all_printed);

    // New pipes: one mends the broken stream, one for a new guest.
    new_pipe_continues(
        &daemon,
        "vm-open",
        &open_before,
        &lines("vm-open again", 500),
    )
    .await;
    assert!(
        log_files(&daemon.log_dir(), "vm-open", "qemu").len() > 2,
        "vm-open rotated"
    );
    new_pipe_continues(&daemon, "vm-closed", &closed_before, b"more\n").await;
    new_pipe_continues(&daemon, "vm-new", b"", b"first line\n").await;

    let diagnostics = daemon.stderr();
    for bad in ["ERROR", "panicked", "cannot restore"] {
        assert!(
            !diagnostics.contains(bad),
            "{bad:?} after the restart:\n{diagnostics}"
        );
    }
}

/// A torn stream record (cut in half, as a crash in the middle of a non-atomic write would
/// leave it), a foreign one (random bytes) and a foreign position record: the daemon starts,
/// names each file in its diagnostics, brings back every other stream (the console with its
/// guest), and the streams whose records were damaged continue their offsets from their log
/// files when the agent hands over new pipes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_and_foreign_state_files_do_not_stop_the_daemon() {
    let mut daemon = Daemon::start_with(Some(NO_KEEPER), &[]).await;
    let data: Vec<(&str, Vec<u8>)> = ["vm-torn", "vm-foreign", "vm-badpos", "vm-ok"]
        .into_iter()
        .map(|g| (g, lines(g, 200)))
        .collect();
    for (guest, bytes) in &data {
        logged_and_closed(&daemon, guest, bytes).await;
    }
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, "vm-con").await;
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    let printed = lines("vm-con", 40);
    guest.write(&printed).await;
    wait_offset(&mut agent, "vm-con", DEVICE, printed.len() as u64).await;
    drop(agent);
    daemon.kill().await;

    let torn = state_file(&daemon, "vm-torn", "qemu", "json");
    let record = std::fs::read(&torn).unwrap();
    std::fs::write(&torn, &record[..record.len() / 2]).unwrap();
    let foreign = state_file(&daemon, "vm-foreign", "qemu", "json");
    std::fs::write(&foreign, garbage(777)).unwrap();
    let bad_position = state_file(&daemon, "vm-badpos", "qemu", "pos");
    std::fs::write(&bad_position, garbage(64)).unwrap();

    daemon.restart().await;
    let diagnostics = daemon.stderr();
    for path in [&torn, &foreign, &bad_position] {
        assert!(
            diagnostics.contains(&path.display().to_string()),
            "the diagnostics name {}:\n{diagnostics}",
            path.display()
        );
    }
    let reply = list_guests(&daemon.socket()).await;
    for (guest, bytes) in &data {
        let info = get(&reply, guest, "qemu");
        assert_eq!(
            info.offset,
            bytes.len() as u64,
            "{guest}: offset continues from the log file: {info:?}"
        );
        assert!(!info.open, "{info:?}");
    }
    let con = get(&reply, "vm-con", DEVICE);
    assert_eq!(con.kind, StreamKind::Console as i32, "{con:?}");
    let mut guest = guest.reconnect().await;
    let mut agent = daemon.agent().await;
    wait_guest_connected(&mut agent, "vm-con", DEVICE, true).await;
    guest.write(b"back\n").await;
    wait_offset(&mut agent, "vm-con", DEVICE, printed.len() as u64 + 5).await;
    for (guest, bytes) in &data {
        new_pipe_continues(&daemon, guest, bytes, format!("{guest} again\n").as_bytes()).await;
    }
    assert!(!daemon.stderr().contains("panicked"), "{}", daemon.stderr());
}

/// A console whose stream record is foreign after a crash: the daemon cannot know from the
/// record that it was a console, but the agent, which knows, asks for it again with
/// `CreateConsole`. Expected: the console comes back at the same socket path (the fake guest
/// reconnects) and its offsets continue from its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_with_a_foreign_record_can_be_created_again() {
    let mut daemon = Daemon::start_with(Some(NO_KEEPER), &[]).await;
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, "vm-c2").await;
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    let printed = lines("vm-c2", 40);
    guest.write(&printed).await;
    wait_offset(&mut agent, "vm-c2", DEVICE, printed.len() as u64).await;
    drop(agent);
    daemon.kill().await;
    let record = state_file(&daemon, "vm-c2", DEVICE, "json");
    std::fs::write(&record, garbage(300)).unwrap();

    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let again = match create_console(&mut agent, "vm-c2", "", None).await {
        Ok(again) => again,
        Err(status) => {
            let listed = list_guests(&daemon.socket()).await;
            panic!(
                "CreateConsole after the restart: {status:?}\nListGuests shows {:?}\n{}",
                find(&listed, "vm-c2", DEVICE),
                daemon.stderr()
            )
        }
    };
    assert_eq!(again.guest_socket, console.guest_socket, "same socket path");
    let mut guest = guest.reconnect().await;
    wait_guest_connected(&mut agent, "vm-c2", DEVICE, true).await;
    guest.write(b"back\n").await;
    wait_offset(&mut agent, "vm-c2", DEVICE, printed.len() as u64 + 5).await;
    assert_same(
        "console log across the crash",
        &read_log(&daemon.log_dir(), "vm-c2", DEVICE),
        &[&printed[..], b"back\n"].concat(),
    );
}

/// After a crash, the next daemon is started with `--takeover` (how a DaemonSet's new pod
/// starts): with nobody answering on handover.sock it starts from the state directory, and
/// everything is back as after a plain restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_after_a_crash_starts_from_the_state_directory() {
    let mut daemon = Daemon::start_with(Some(NO_KEEPER), &[]).await;
    let bytes = lines("vm-t", 100);
    logged_and_closed(&daemon, "vm-t", &bytes).await;
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, "vm-tc").await;
    drop(agent);
    let (tcp, metrics) = (daemon.tcp, daemon.metrics);
    daemon.kill().await;
    assert!(Path::new(&daemon.runtime_dir().join("handover.sock")).exists());

    let mut successor = Successor::spawn(&daemon, tcp, metrics);
    let ready = successor.wait_ready().await;
    assert_eq!(field(&ready, "tcp="), Some(tcp), "{ready}");
    assert!(
        successor
            .stderr()
            .contains("no running daemon to take over from"),
        "{}",
        successor.stderr()
    );
    let reply = list_guests(&daemon.socket()).await;
    assert_eq!(get(&reply, "vm-t", "qemu").offset, bytes.len() as u64);
    let guest = FakeGuest::connect(&console.guest_socket).await;
    wait_list(&daemon.socket(), "the guest reconnected", |r| {
        find(r, "vm-tc", DEVICE).is_some_and(|s| s.guest_connected)
    })
    .await;
    drop(guest);
    new_pipe_continues(&daemon, "vm-t", &bytes, b"more\n").await;
    let status = successor.stop().await;
    assert!(status.success(), "{status}\n{}", successor.stderr());
}
