//! Retention by time through the real daemon: `logs.max_age` (and the per-stream
//! `max_age_seconds`) deletes exactly the rotated files older than the age, never the current
//! file, and history shows the deleted range as a gap; `logs.removed_retention` deletes a
//! removed guest's logs after the time and not before, and never those of a guest created
//! again. File times are set by the test (a rotated file's mtime is the time of its newest
//! byte); the sweep runs every 100 ms through the debug-only `CONLOG_RETENTION_INTERVAL_MS`.

use crate::history_common::*;
use crate::support::*;
use conlog::proto::{self, LogMode, RemoveGuestRequest};
use std::path::Path;
use std::time::{Duration, SystemTime};
use tonic::Code;

const FAST_SWEEP: (&str, &str) = ("CONLOG_RETENTION_INTERVAL_MS", "100");
const HOUR: Duration = Duration::from_secs(3600);

/// Sets the mtime of `path` to `age` ago.
fn age_file(path: &Path, age: Duration) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .set_modified(SystemTime::now() - age)
        .unwrap();
}

fn backup(daemon: &Daemon, guest: &str, stream: &str, n: u32) -> std::path::PathBuf {
    let mut path = daemon.log_path(guest, stream).into_os_string();
    path.push(format!(".{n}"));
    path.into()
}

/// A daemon with `logs` settings `logs_yaml` (indented lines under `logs:`), the sweep every
/// 100 ms, and no time index: a log file then holds exactly `max_size` bytes, so the offsets
/// of each file are known (an index shares its file's `max_size`).
async fn start(logs_yaml: &str) -> Daemon {
    let config = format!("logs:\n  time_index: false\n{logs_yaml}");
    Daemon::start_full(Some(&config), &[], None, &[FAST_SWEEP]).await
}

/// With `logs.max_age: 1h`, the rotated files older than an hour go (and every older one with
/// them), the younger ones and the current file stay however old; a stream whose override
/// turns the age off keeps everything; history then starts with the deleted range as a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_retention_deletes_exactly_the_old_rotated_files() {
    const TOTAL: usize = 4 * 4096 + 100;
    let daemon = start("  max_age: 1h\n").await;
    let mut agent = daemon.agent().await;
    let data = pattern(0, TOTAL);
    // Files: .4 (0..4096) .3 .2 .1 (12288..16384), current (16384..16484).
    logged_stream(&daemon, "vm-age", "qemu", 4096, 5, LogMode::Rotate, &data).await;
    // Off for this stream (max_age_seconds 0), whatever the default.
    let (_, pipe) = open_pipe(
        &mut agent,
        "vm-age",
        "keep",
        Some(proto::LogLimits {
            max_age_seconds: Some(0),
            ..limits(4096, 5, LogMode::Rotate)
        }),
    )
    .await;
    write_and_close(pipe, data.clone()).await;
    wait_closed(&mut agent, "vm-age", "keep", TOTAL as u64).await;
    for stream in ["qemu", "keep"] {
        age_file(&daemon.log_path("vm-age", stream), 10 * HOUR);
        age_file(&backup(&daemon, "vm-age", stream, 1), HOUR / 2);
        age_file(&backup(&daemon, "vm-age", stream, 2), HOUR / 3);
        age_file(&backup(&daemon, "vm-age", stream, 3), 2 * HOUR);
        age_file(&backup(&daemon, "vm-age", stream, 4), 3 * HOUR);
    }
    std::fs::write(
        {
            let mut p = backup(&daemon, "vm-age", "qemu", 3).into_os_string();
            p.push(".idx");
            std::path::PathBuf::from(p)
        },
        b"index",
    )
    .unwrap();
    let info = wait_stream(&mut agent, "vm-age", "qemu", "expired", |s| {
        s.first_offset == 2 * 4096
    })
    .await;
    assert_eq!(info.offset, TOTAL as u64);
    assert_eq!(
        log_file_names(&daemon.log_dir(), "vm-age", "qemu"),
        ["qemu.log.2", "qemu.log.1", "qemu.log"]
    );
    assert!(!daemon.log_dir().join("vm-age/qemu.log.3.idx").exists());
    // The stream that turned the age off keeps its files.
    assert_eq!(
        find_stream(&mut agent, "vm-age", "keep")
            .await
            .unwrap()
            .first_offset,
        0
    );
    assert_eq!(log_file_names(&daemon.log_dir(), "vm-age", "keep").len(), 5);
    // History: the deleted range is a gap, the rest exact.
    let mut local = local_console(&daemon).await;
    let mut got = Received::new(DEFAULT_CHUNK);
    for chunk in read_ok(&mut local, request("vm-age", "qemu", None)).await {
        assert_pattern(chunk.offset, got.push(&chunk));
    }
    assert_eq!(got.first, Some(2 * 4096));
    // ... and every byte after it, to the end.
    assert_eq!(got.position, Some(TOTAL as u64));
    assert_eq!(got.bytes, (TOTAL - 2 * 4096) as u64);
    let chunks = read_ok(
        &mut local,
        request(
            "vm-age",
            "qemu",
            Some(proto::read_history_request::Start::FromOffset(100)),
        ),
    )
    .await;
    let gap = chunks[0].gap.clone().expect("a gap first");
    assert_eq!((gap.from_offset, gap.to_offset), (100, 2 * 4096));

    // The current file is never expired, however old; the next rotated file goes once old.
    age_file(&backup(&daemon, "vm-age", "qemu", 2), 5 * HOUR);
    wait_stream(&mut agent, "vm-age", "qemu", "expired again", |s| {
        s.first_offset == 3 * 4096
    })
    .await;
    age_file(&backup(&daemon, "vm-age", "qemu", 1), 5 * HOUR);
    wait_stream(&mut agent, "vm-age", "qemu", "only the current file", |s| {
        s.first_offset == 4 * 4096
    })
    .await;
    assert_eq!(
        log_file_names(&daemon.log_dir(), "vm-age", "qemu"),
        ["qemu.log"]
    );
    assert_eq!(
        read_log(&daemon.log_dir(), "vm-age", "qemu"),
        data[4 * 4096..]
    );

    // Bad input names the rule.
    let status = create_pipe(
        &mut agent,
        "vm-age",
        "bad",
        Some(proto::LogLimits {
            max_age_seconds: Some(u64::MAX),
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("limits.max_age_seconds"),
        "{status:?}"
    );
}

/// Rewrites the tombstones in `<log_dir>/<guest>` as if the removal was `age` ago.
fn backdate_tombstones(daemon: &Daemon, guest: &str, age: Duration) {
    let dir = daemon.log_dir().join(guest);
    let mut found = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "removed") {
            let text = std::fs::read_to_string(&path).unwrap();
            let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
            let at = value["removed_unix"].as_u64().unwrap() - age.as_secs();
            value["removed_unix"] = at.into();
            std::fs::write(&path, value.to_string()).unwrap();
            found += 1;
        }
    }
    assert!(found > 0, "no tombstone in {}", dir.display());
}

async fn remove(daemon: &Daemon, guest: &str) {
    daemon
        .agent()
        .await
        .remove_guest(RemoveGuestRequest {
            guest: guest.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("RemoveGuest {guest}: {s:?}"));
}

/// With `logs.removed_retention: 1h`: a guest removed over an hour ago loses its logs (and
/// its directory); one removed just now keeps them; one created again after its removal keeps
/// them whatever its old tombstone said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_retention_deletes_after_the_time_and_not_before() {
    let daemon = start("  removed_retention: 1h\n").await;
    let mut agent = daemon.agent().await;
    for guest in ["vm-old", "vm-new", "vm-back", "vm-marker"] {
        logged_stream(
            &daemon,
            guest,
            "qemu",
            4096,
            2,
            LogMode::Rotate,
            &pattern(0, 9000),
        )
        .await;
        remove(&daemon, guest).await;
    }
    // Created again: the tombstone goes with the creation.
    let (_, pipe) = open_pipe(&mut agent, "vm-back", "qemu", None).await;
    drop(pipe);
    assert!(!daemon.log_dir().join("vm-back/qemu.removed").exists());
    backdate_tombstones(&daemon, "vm-old", 2 * HOUR);
    let old = daemon.log_dir().join("vm-old");
    wait_until("the old guest's logs deleted", || !old.exists()).await;
    // A sweep after the one that deleted them: it has seen every other guest too.
    backdate_tombstones(&daemon, "vm-marker", 2 * HOUR);
    let marker = daemon.log_dir().join("vm-marker");
    wait_until("the marker's logs deleted", || !marker.exists()).await;
    assert_eq!(read_log(&daemon.log_dir(), "vm-new", "qemu").len(), 9000);
    assert!(daemon.log_dir().join("vm-new/qemu.removed").exists());
    assert!(!read_log(&daemon.log_dir(), "vm-back", "qemu").is_empty());
    // The history of the deleted guest: NOT_FOUND, as for one that never existed.
    let mut local = local_console(&daemon).await;
    expect_error(&mut local, request("vm-old", "", None), Code::NotFound).await;
    // Created again after its logs went: its offsets go on after the old ones.
    let (reply, pipe) = open_pipe(&mut agent, "vm-old", "qemu", None).await;
    assert_eq!(reply.offset, 9000);
    drop(pipe);
}

/// With `logs.max_age: 1h`, the files of a removed guest age too, its newest included (nobody
/// writes it any more), as virtlogd's `max_age_days` deletes the logs of guests that are not
/// running: a removed guest whose every file is old goes entirely (tombstone and directory); one
/// whose oldest file alone is old loses that file, and its history then starts with a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_retention_deletes_the_old_files_of_removed_guests() {
    let daemon = start("  max_age: 1h\n").await;
    let data = pattern(0, 9000);
    // Files: .2 (0..4096), .1 (4096..8192), current (8192..9000).
    for guest in ["vm-all-old", "vm-part-old"] {
        logged_stream(&daemon, guest, "qemu", 4096, 2, LogMode::Rotate, &data).await;
        remove(&daemon, guest).await;
    }
    for n in 1..=2 {
        age_file(&backup(&daemon, "vm-all-old", "qemu", n), 3 * HOUR);
    }
    age_file(&daemon.log_path("vm-all-old", "qemu"), 2 * HOUR);
    age_file(&backup(&daemon, "vm-part-old", "qemu", 2), 2 * HOUR);
    let all_old = daemon.log_dir().join("vm-all-old");
    wait_until("the old removed guest's logs deleted", || !all_old.exists()).await;
    let oldest = backup(&daemon, "vm-part-old", "qemu", 2);
    wait_until("the old file of the removed guest deleted", || {
        !oldest.exists()
    })
    .await;
    assert_eq!(
        log_file_names(&daemon.log_dir(), "vm-part-old", "qemu"),
        ["qemu.log.1", "qemu.log"]
    );
    assert!(daemon.log_dir().join("vm-part-old/qemu.removed").exists());
    let mut local = local_console(&daemon).await;
    let chunks = read_ok(
        &mut local,
        request(
            "vm-part-old",
            "qemu",
            Some(proto::read_history_request::Start::FromOffset(0)),
        ),
    )
    .await;
    let gap = chunks[0].gap.clone().expect("a gap first");
    assert_eq!((gap.from_offset, gap.to_offset), (0, 4096));
    let mut got = Received::new(DEFAULT_CHUNK);
    for chunk in &chunks {
        assert_pattern(chunk.offset, got.push(chunk));
    }
    assert_eq!(got.position, Some(9000));
    expect_error(&mut local, request("vm-all-old", "", None), Code::NotFound).await;
}
