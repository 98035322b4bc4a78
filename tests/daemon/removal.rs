//! The end of a guest's and a log's life through the real daemon: `RemoveGuest` of one
//! device or stream while the guest's other streams go on, `delete_logs` while a history
//! reader follows, history of a removed guest (local and with a token, and which tokens may
//! read it), and `conlogctl remove`. Age retention and `logs.removed_retention` are in
//! `retention.rs`; crashes in the middle of a deletion in `tests/faults/removal_crash.rs`.

use crate::history_common::*;
use crate::support::*;
use conlog::proto::{
    self, attach::Mode, read_history_request::Start, Access, LogMode, RemoveGuestRequest,
    RemoveGuestResponse,
};
use tonic::Code;

async fn remove(
    daemon: &Daemon,
    guest: &str,
    stream: &str,
    delete_logs: bool,
) -> Result<RemoveGuestResponse, tonic::Status> {
    bounded(
        "RemoveGuest",
        daemon.agent().await.remove_guest(RemoveGuestRequest {
            guest: guest.into(),
            stream: stream.into(),
            delete_logs,
            ..Default::default()
        }),
    )
    .await
    .map(|r| r.into_inner())
}

/// Every chunk of a history read that must succeed, checked contiguous: (gaps, data by offset).
async fn history_of(
    client: &mut Console,
    guest: &str,
    stream: &str,
    start: Option<Start>,
) -> Received {
    let mut got = Received::new(DEFAULT_CHUNK);
    for chunk in read_ok(client, request(guest, stream, start)).await {
        got.push(&chunk);
    }
    got
}

/// Names of the files in `<log_dir>/<guest>`, sorted (none if the directory is gone), but the
/// time index's files (`.idx`: whether a log has one is the index's business).
fn files_of(daemon: &Daemon, guest: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(daemon.log_dir().join(guest)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".idx"))
        .collect();
    names.sort();
    names
}

/// Removing one console leaves the guest's other console and its watcher working; history of
/// the removed device still reads its log; removing the last stream removes the guest (with
/// `delete_logs`, every log in its directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_one_device_leaves_the_others_working() {
    const GUEST: &str = "vm-dev";
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let first = create_console(&mut agent, GUEST, "serial0", None)
        .await
        .unwrap();
    let second = create_console(&mut agent, GUEST, "serial1", None)
        .await
        .unwrap();
    let mut guest0 = FakeGuest::connect(&first.guest_socket).await;
    let mut guest1 = FakeGuest::connect(&second.guest_socket).await;
    guest0.write(b"serial0 before\n").await;
    guest1.write(b"serial1 before\n").await;
    wait_offset(&mut agent, GUEST, "serial0", 15).await;
    let mut watcher = watch(
        local_channel(&daemon).await,
        proto::WatchConsoleRequest {
            device: "serial1".into(),
            replay_bytes: 1024,
            ..watch_request(GUEST, Mode::ReadOnly)
        },
    )
    .await
    .unwrap();
    watcher.wait_output(b"serial1 before\n").await;

    // Bad input: the rule is named.
    let status = remove(&daemon, GUEST, "Serial-1", false).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("[a-z0-9]"), "{status:?}");
    let status = remove(&daemon, GUEST, "serial9", false).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let removed = remove(&daemon, GUEST, "serial0", false).await.unwrap();
    assert_eq!((removed.streams_removed, removed.logs_deleted), (1, 0));
    assert_eq!(
        guest0.wait_eof().await,
        b"",
        "serial0's guest connection is closed"
    );
    assert!(!std::path::Path::new(&first.guest_socket).exists());
    assert!(find_stream(&mut agent, GUEST, "serial0").await.is_none());

    // The other device goes on, for its watcher and its log.
    guest1.write(b"serial1 after\n").await;
    watcher.wait_output(b"serial1 after\n").await;
    let info = find_stream(&mut agent, GUEST, "serial1").await.unwrap();
    assert!(info.guest_connected);
    assert_eq!(
        read_log(&daemon.log_dir(), GUEST, "serial1"),
        b"serial1 before\nserial1 after\n"
    );
    // The removed device's log stays, and history reads it.
    let mut local = local_console(&daemon).await;
    let got = history_of(&mut local, GUEST, "serial0", None).await;
    assert_eq!(got.data, b"serial0 before\n");
    assert!(files_of(&daemon, GUEST).contains(&"serial0.removed".to_owned()));
    // A console created again under the name continues its offsets.
    let again = create_console(&mut agent, GUEST, "serial0", None)
        .await
        .unwrap();
    assert_eq!(again.offset, 15);
    assert!(!files_of(&daemon, GUEST).contains(&"serial0.removed".to_owned()));
    let removed = remove(&daemon, GUEST, "serial0", false).await.unwrap();
    assert_eq!(removed.streams_removed, 1);

    // The last stream: the guest goes, the watcher is told; with delete_logs every log in the
    // guest's directory goes, that of the device removed before included.
    let removed = remove(&daemon, GUEST, "serial1", true).await.unwrap();
    assert_eq!((removed.streams_removed, removed.logs_deleted), (1, 2));
    assert!(!daemon.log_dir().join(GUEST).exists());
    let status = watcher.wait_end().await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let listed = agent
        .list_guests(proto::ListGuestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.guests.iter().all(|g| g.name != GUEST));
    assert!(!daemon.runtime_dir().join("consoles").join(GUEST).exists());
    let status = remove(&daemon, GUEST, "", false).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

/// `delete_logs` while a reader follows the stream from its oldest byte: the reader gets only
/// the stream's own bytes at their offsets (from the files it holds) and then ends; the files
/// go, with the index files beside them; a guest created again right after under the same name
/// starts after every offset handed out, and the old reader never sees its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_logs_while_a_reader_follows() {
    const GUEST: &str = "vm-del";
    const TOTAL: u64 = 5 * 4096 + 1000;
    const LEN: usize = 5 * 4096 + 1000;
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(4096, 9, LogMode::Rotate)),
    )
    .await;
    write_now(&mut pipe, &pattern(0, LEN));
    wait_offset(&mut agent, GUEST, "qemu", TOTAL).await;
    // Index files beside the logs (as the time index writes them) go with them.
    let dir = daemon.log_dir().join(GUEST);
    std::fs::write(dir.join("qemu.log.idx"), b"index").unwrap();
    std::fs::write(dir.join("qemu.log.2.idx"), b"index").unwrap();
    let mut local = local_console(&daemon).await;
    let mut chunks = open(
        &mut local,
        proto::ReadHistoryRequest {
            follow: true,
            ..request(GUEST, "qemu", None)
        },
    )
    .await
    .unwrap();
    let mut got = Received::new(DEFAULT_CHUNK);
    let first = next(&mut chunks).await.unwrap().expect("a first chunk");
    assert_pattern(first.offset, got.push(&first));

    let removed = remove(&daemon, GUEST, "", true).await.unwrap();
    assert_eq!((removed.streams_removed, removed.logs_deleted), (1, 6));
    assert!(!dir.exists(), "left: {:?}", files_of(&daemon, GUEST));
    drop(pipe);
    // Created again at once: a new stream after the old offsets.
    let (reply, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    assert_eq!(reply.offset, TOTAL);
    write_now(&mut pipe, &[b'Z'; 3000]);
    wait_offset(&mut agent, GUEST, "qemu", TOTAL + 3000).await;
    // The old reader: the stream's own bytes at their offsets, then its end.
    while let Some(chunk) = next(&mut chunks).await.unwrap() {
        assert!(chunk.gap.is_none() || chunk.data.is_empty());
        assert_pattern(chunk.offset, got.push(&chunk));
        assert!(got.position.unwrap() <= TOTAL);
    }
    // The new stream: the deleted range is a gap, then only its own bytes.
    let now = history_of(&mut local, GUEST, "qemu", Some(Start::FromOffset(0))).await;
    assert_eq!(now.gaps, [(0, TOTAL)]);
    assert_eq!(now.data, [b'Z'; 3000]);
    drop(pipe);
}

/// A removed guest's logs are read as they were (same offsets, gaps and limits), locally, by
/// conlogctl, and with a token issued before the removal; a token issued after it is refused;
/// a guest that never existed is `NOT_FOUND` as before; a follow ends at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_of_a_removed_guest() {
    const GUEST: &str = "vm-gone";
    const TOTAL: usize = 3 * 4096 + 500;
    let daemon = Daemon::start().await;
    let data = pattern(0, TOTAL);
    let info = logged_stream(&daemon, GUEST, "qemu", 4096, 1, LogMode::Rotate, &data).await;
    let oldest = usize::try_from(info.first_offset).unwrap();
    assert!(oldest > 0, "rotated away at the cap");
    let mut local = local_console(&daemon).await;
    let before = history_of(&mut local, GUEST, "qemu", Some(Start::FromOffset(0))).await;
    assert_eq!(before.gaps, [(0, oldest as u64)]);
    let tail = history_of(&mut local, GUEST, "", Some(Start::TailBytes(100))).await;
    let read_token = daemon.token(GUEST, "", Access::Read, 600).await;
    let other_token = daemon.token("vm-other", "", Access::Read, 600).await;

    remove(&daemon, GUEST, "", false).await.unwrap();
    let tombstone = daemon.log_dir().join(GUEST).join("qemu.removed");
    assert!(tombstone.exists());

    // Locally: the same chunks as before the removal.
    let after = history_of(&mut local, GUEST, "qemu", Some(Start::FromOffset(0))).await;
    assert_eq!(
        (after.gaps.clone(), after.position),
        (before.gaps, before.position)
    );
    assert!(after.data == before.data);
    let again = history_of(&mut local, GUEST, "", Some(Start::TailBytes(100))).await;
    assert_eq!((again.first, again.data), (tail.first, tail.data));
    let mut limited = request(GUEST, "qemu", Some(Start::FromOffset(9000)));
    limited.limit_bytes = 10;
    let chunks = read_ok(&mut local, limited).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].data, data[9000..9010]);
    expect_error(
        &mut local,
        request(GUEST, "qemu", Some(Start::FromOffset(TOTAL as u64 + 1))),
        Code::OutOfRange,
    )
    .await;
    // A follow ends at the end.
    let mut follow = open(
        &mut local,
        proto::ReadHistoryRequest {
            follow: true,
            ..request(GUEST, "qemu", Some(Start::TailBytes(10)))
        },
    )
    .await
    .unwrap();
    let mut followed = Received::new(DEFAULT_CHUNK);
    while let Some(chunk) = next(&mut follow).await.unwrap() {
        followed.push(&chunk);
    }
    assert_eq!(followed.position, Some(TOTAL as u64));
    // conlogctl, locally.
    let mut cmd = std::process::Command::new(conlogctl_bin());
    cmd.arg("--socket").arg(daemon.socket()).args([
        "history",
        GUEST,
        "--stream",
        "qemu",
        "--tail-bytes",
        "50",
    ]);
    let output = run_bounded_async(cmd).await;
    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout == data[TOTAL - 50..]);

    // conlogctl over TCP, with a token issued before the removal.
    let mut cmd = std::process::Command::new(conlogctl_bin());
    cmd.args([
        "--server",
        &format!("http://{}", daemon.tcp),
        "--token",
        &read_token,
    ])
    .args(["history", GUEST, "--tail-bytes", "60"]);
    let output = run_bounded_async(cmd).await;
    assert!(output.status.success(), "{}", describe(&output));
    assert!(output.stdout == data[TOTAL - 60..]);
    // With a token issued before the removal.
    let mut remote = with_token(daemon.plain_tcp_channel().await, &read_token).console();
    let got = history_of(&mut remote, GUEST, "qemu", None).await;
    assert!(got.data == data[oldest..]);
    // A token for another guest learns nothing.
    let mut other = with_token(daemon.plain_tcp_channel().await, &other_token).console();
    expect_error(
        &mut other,
        request(GUEST, "qemu", None),
        Code::PermissionDenied,
    )
    .await;
    // A token issued after the removal (the name may be another tenant's by then) is refused.
    let removed_at: u64 = {
        let text = std::fs::read_to_string(&tombstone).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["removed_unix"].as_u64().unwrap()
    };
    wait_until("the second after the removal", || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            > removed_at
    })
    .await;
    let late_token = daemon.token(GUEST, "", Access::Read, 600).await;
    let mut late = with_token(daemon.plain_tcp_channel().await, &late_token).console();
    let status = expect_error(
        &mut late,
        request(GUEST, "qemu", None),
        Code::PermissionDenied,
    )
    .await;
    assert!(
        status.message().contains("issued before its removal"),
        "{status:?}"
    );
    let mut cmd = std::process::Command::new(conlogctl_bin());
    cmd.args([
        "--server",
        &format!("http://{}", daemon.tcp),
        "--token",
        &late_token,
    ])
    .args(["history", GUEST]);
    let output = run_bounded_async(cmd).await;
    // 3: refused (conlogctl --help, "Exit status").
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    assert!(output.stdout.is_empty());

    // Never existed: as before.
    expect_error(&mut local, request("vm-never", "", None), Code::NotFound).await;
    expect_error(&mut local, request(GUEST, "serial0", None), Code::NotFound).await;

    // Created again: the live stream serves, after the old offsets, and the tombstone goes.
    let mut agent = daemon.agent().await;
    let (reply, pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    assert_eq!(reply.offset, TOTAL as u64);
    assert!(!tombstone.exists());
    drop(pipe);
}

/// `conlogctl remove G --stream S --delete-logs` removes one stream and deletes its logs, the
/// guest's other device going on; `--device D` removes the last one (the guest goes, the log
/// stays); `remove G --delete-logs` then deletes the logs the removed guest left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conlogctl_removes_a_device_and_deletes_its_logs() {
    const GUEST: &str = "vm-ctl";
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    create_console(&mut agent, GUEST, "serial0", None)
        .await
        .unwrap();
    logged_stream(
        &daemon,
        GUEST,
        "qemu",
        4096,
        2,
        LogMode::Rotate,
        &pattern(0, 5000),
    )
    .await;
    let ctl = |args: &[&str]| {
        let mut cmd = std::process::Command::new(conlogctl_bin());
        cmd.arg("--socket").arg(daemon.socket()).args(args);
        run_bounded(&mut cmd)
    };
    let output = ctl(&["remove", GUEST, "--stream", "qemu", "--delete-logs"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("removed vm-ctl/qemu; 2 log files deleted"),
        "{stdout}"
    );
    assert_eq!(files_of(&daemon, GUEST), ["serial0.log"]);
    assert!(find_stream(&mut agent, GUEST, "serial0").await.is_some());
    let output = ctl(&["remove", GUEST, "--device", "serial0"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("its logs stay on disk"), "{stdout}");
    assert!(find_stream(&mut agent, GUEST, "serial0").await.is_none());
    assert_eq!(files_of(&daemon, GUEST), ["serial0.log", "serial0.removed"]);
    // Removed already: --delete-logs deletes what it left, then it is not found.
    let output = ctl(&["remove", GUEST, "--delete-logs"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("1 log files deleted"), "{stdout}");
    assert!(!daemon.log_dir().join(GUEST).exists());
    let output = ctl(&["remove", GUEST, "--delete-logs"]);
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("NotFound"),
        "{}",
        describe(&output)
    );
}

/// A deletion the file system refuses (here a directory where a rotated file should be) is
/// `INTERNAL`, and the removal still happens: the guest is gone (also after a restart), its
/// logs stay with a tombstone, and `delete_logs` again, once the obstacle is gone, deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_deletion_still_removes_the_guest_and_can_be_finished() {
    const GUEST: &str = "vm-refused";
    let mut daemon = Daemon::start().await;
    logged_stream(
        &daemon,
        GUEST,
        "qemu",
        4096,
        5,
        LogMode::Rotate,
        &pattern(0, 9000),
    )
    .await;
    let obstacle = daemon.log_dir().join(GUEST).join("qemu.log.3");
    std::fs::create_dir(&obstacle).unwrap();
    std::fs::write(obstacle.join("inside"), b"x").unwrap();
    let status = remove(&daemon, GUEST, "", true).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let mut agent = daemon.agent().await;
    assert!(find_stream(&mut agent, GUEST, "qemu").await.is_none());
    assert!(daemon.log_dir().join(GUEST).join("qemu.removed").exists());
    assert!(daemon.stop().await.success());
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    assert!(
        find_stream(&mut agent, GUEST, "qemu").await.is_none(),
        "not restored"
    );
    std::fs::remove_dir_all(&obstacle).unwrap();
    let removed = remove(&daemon, GUEST, "", true).await.unwrap();
    assert_eq!((removed.streams_removed, removed.logs_deleted), (0, 3));
    assert!(!daemon.log_dir().join(GUEST).exists());
}
