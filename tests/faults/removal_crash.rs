//! Deleting a removed guest's logs under crashes and races: a `kill -9` in the middle of
//! `RemoveGuest` with `delete_logs`, or of `logs.removed_retention`'s deletion, leaves the
//! files a consistent prefix (oldest gone first) that the next call or sweep finishes, with no
//! offset given to other bytes; a guest created again while its logs are being deleted waits
//! for the deletion and keeps its own logs.

use crate::history_common::*;
use crate::support::*;
use conlog::proto::{read_history_request::Start, LogMode, RemoveGuestRequest};

const TOTAL: usize = 4 * 4096 + 100;

async fn wait_point(daemon: &Daemon, point: &str) {
    let line = format!("fault point {point} reached");
    bounded(&line.clone(), async {
        while !daemon.stderr().contains(&line) {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
}

fn remove_request(guest: &str, delete_logs: bool) -> RemoveGuestRequest {
    RemoveGuestRequest {
        guest: guest.into(),
        delete_logs,
        ..Default::default()
    }
}

/// Files: `.4` (0..4096) `.3` `.2` `.1`, current (16384..16484).
async fn five_files(daemon: &Daemon, guest: &str) -> Vec<u8> {
    let data = pattern(0, TOTAL);
    logged_stream(daemon, guest, "qemu", 4096, 5, LogMode::Rotate, &data).await;
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_the_middle_of_delete_logs_is_finished_by_a_second_call() {
    const GUEST: &str = "vm-crash";
    let mut daemon =
        Daemon::start_env(&[("CONLOG_FAULT_POINTS", "logfile.delete.file=kill@2")]).await;
    let data = five_files(&daemon, GUEST).await;
    let mut agent = daemon.agent().await;
    let result = bounded(
        "RemoveGuest",
        agent.remove_guest(remove_request(GUEST, true)),
    )
    .await;
    assert!(result.is_err(), "the daemon was killed: {result:?}");
    let status = daemon.wait_exit().await;
    assert!(status.code().is_none(), "killed, not {status}");
    // The two oldest went, in that order: no hole.
    assert_eq!(
        log_file_names(&daemon.log_dir(), GUEST, "qemu"),
        ["qemu.log.2", "qemu.log.1", "qemu.log"]
    );
    // What is left holds the newest bytes (a file and its time index share max_size, so the
    // files' sizes say where they start).
    let left: u64 = log_files(&daemon.log_dir(), GUEST, "qemu")
        .iter()
        .map(|path| std::fs::metadata(path).unwrap().len())
        .sum();
    let first = TOTAL - usize::try_from(left).unwrap();
    daemon.env.clear();
    daemon.restart().await;
    // Still recorded (the records go after the files): restored with what is left, exact.
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, GUEST, "qemu")
        .await
        .expect("restored");
    assert_eq!(
        (info.first_offset, info.offset),
        (first as u64, TOTAL as u64)
    );
    let mut local = local_console(&daemon).await;
    let chunks = read_ok(
        &mut local,
        request(GUEST, "qemu", Some(Start::FromOffset(0))),
    )
    .await;
    let mut got = Received::new(DEFAULT_CHUNK);
    for chunk in &chunks {
        assert_pattern(chunk.offset, got.push(chunk));
    }
    assert_eq!(got.gaps, [(0, first as u64)]);
    assert!(got.data == data[first..]);
    // The call again finishes the job.
    let removed = agent
        .remove_guest(remove_request(GUEST, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((removed.streams_removed, removed.logs_deleted), (1, 3));
    assert!(!daemon.log_dir().join(GUEST).exists());
    let (reply, pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    assert_eq!(reply.offset, TOTAL as u64, "offsets are never given again");
    drop(pipe);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_removed_retention_deletes_is_finished_at_the_next_start() {
    const GUEST: &str = "vm-expired";
    let mut daemon = Daemon::start_full(
        Some("logs:\n  removed_retention: 1h\n"),
        &[],
        None,
        &[
            ("CONLOG_RETENTION_INTERVAL_MS", "100"),
            ("CONLOG_FAULT_POINTS", "logfile.delete.file=kill@1"),
        ],
    )
    .await;
    five_files(&daemon, GUEST).await;
    daemon
        .agent()
        .await
        .remove_guest(remove_request(GUEST, false))
        .await
        .unwrap();
    let tombstone = daemon.log_dir().join(GUEST).join("qemu.removed");
    let text = std::fs::read_to_string(&tombstone).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["removed_unix"] = (value["removed_unix"].as_u64().unwrap() - 7200).into();
    std::fs::write(&tombstone, value.to_string()).unwrap();
    let status = daemon.wait_exit().await;
    assert!(status.code().is_none(), "killed, not {status}");
    assert_eq!(
        log_file_names(&daemon.log_dir(), GUEST, "qemu"),
        ["qemu.log.3", "qemu.log.2", "qemu.log.1", "qemu.log"]
    );
    assert!(tombstone.exists(), "the tombstone goes last");
    daemon.env.retain(|(k, _)| k != "CONLOG_FAULT_POINTS");
    daemon.restart().await;
    let dir = daemon.log_dir().join(GUEST);
    wait_until("the removed guest's logs deleted", || !dir.exists()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_created_again_during_the_deletion_waits_and_keeps_its_logs() {
    created_again_during_the_deletion("vm-again", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_again_during_its_deletion_waits_and_keeps_its_logs() {
    created_again_during_the_deletion("vm-again-one", true).await;
}

/// Removes `guest` (or only its `qemu` stream, the guest keeping another) with `delete_logs`,
/// held in the middle of the deletion, and creates `qemu` again meanwhile.
async fn created_again_during_the_deletion(guest: &str, one_stream: bool) {
    let daemon = Daemon::start_env(&[(
        "CONLOG_FAULT_POINTS",
        "guests.remove.delete_logs=sleep:1000",
    )])
    .await;
    five_files(&daemon, guest).await;
    let mut agent = daemon.agent().await;
    if one_stream {
        let (_, pipe) = open_pipe(&mut agent, guest, "other", None).await;
        drop(pipe);
    }
    let remove = tokio::spawn({
        let mut agent = daemon.agent().await;
        let request = RemoveGuestRequest {
            stream: if one_stream {
                "qemu".into()
            } else {
                String::new()
            },
            ..remove_request(guest, true)
        };
        async move { agent.remove_guest(request).await }
    });
    wait_point(&daemon, "guests.remove.delete_logs").await;
    // Created again while the old logs are being deleted: it waits for the removal.
    let (reply, mut pipe) = open_pipe(&mut agent, guest, "qemu", None).await;
    let removed = bounded("RemoveGuest", remove).await.unwrap().unwrap();
    assert_eq!(removed.into_inner().logs_deleted, 5);
    assert_eq!(reply.offset, TOTAL as u64, "after every offset handed out");
    write_now(&mut pipe, b"the new guest\n");
    wait_offset(&mut agent, guest, "qemu", TOTAL as u64 + 14).await;
    assert_eq!(
        read_log(&daemon.log_dir(), guest, "qemu"),
        b"the new guest\n"
    );
    let mut local = local_console(&daemon).await;
    let chunks = read_ok(
        &mut local,
        request(guest, "qemu", Some(Start::FromOffset(0))),
    )
    .await;
    let gap = chunks[0].gap.clone().expect("the deleted range is a gap");
    assert_eq!((gap.from_offset, gap.to_offset), (0, TOTAL as u64));
    assert_eq!(chunks[1].data, b"the new guest\n".as_slice());
    if one_stream {
        assert!(find_stream(&mut agent, guest, "other").await.is_some());
    }
    drop(pipe);
}
