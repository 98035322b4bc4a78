//! Disk full: the guest keeps running, dropped bytes are counted and reported, the log file is
//! never corrupted nor over its cap, and logging resumes when space returns. The log directory
//! is a real, tiny tmpfs mounted for the test (CI runs as root).
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;

use conlog::proto::{self, LogMode};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

/// A tmpfs mounted for the duration of a test.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "this test mounts a small tmpfs to fill it and needs root with mount rights: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_counts_and_recovers() {
    let scratch = tempfile::Builder::new()
        .prefix("conlog-df-")
        .tempdir()
        .unwrap();
    let logs = scratch.path().join("logs");
    let _tmpfs = Tmpfs::mount(&logs, "256k");
    let mut daemon = Daemon::start_with(None, &["--log-dir", logs.to_str().unwrap()]).await;
    let mut agent = daemon.agent().await;
    // The stream's cap (2 × 16 KiB) is far below the tmpfs's 256 KiB, so that a log over its
    // cap shows after space returns, and above the space left free, so that the disk fills.
    const MAX_SIZE: u64 = 16 << 10;
    const CAP: u64 = MAX_SIZE * 2;
    let limits = proto::LogLimits {
        max_size: Some(MAX_SIZE),
        max_backups: Some(1),
        mode: LogMode::Rotate.into(),
        compress: None,
        max_age_seconds: None,
    };
    let (_, mut pipe) = open_pipe(&mut agent, "vm1", "qemu", Some(limits)).await;

    // Leave about 12 KiB free, then write 3 MiB, more than a pipe holds, so the daemon meets
    // the full disk on many reads: the writer must never block for long, and the episode is
    // one report however many writes fail.
    let filler = logs.join("filler");
    let free = 12 << 10;
    let fill = (256 << 10) - free - (8 << 10);
    std::fs::write(&filler, vec![0u8; fill]).unwrap();
    let first = pattern(0, 3 << 20);
    let written = first.clone();
    let writer = std::thread::spawn(move || {
        pipe.write_all(&written).unwrap();
        pipe
    });
    // Dropped bytes take their offsets too (a gap in history): the offset is every byte taken.
    let info = wait_stream(&mut agent, "vm1", "qemu", "done with the burst", |s| {
        s.offset == first.len() as u64
    })
    .await;
    let pipe = writer.join().expect("the writer never blocks for long");
    assert!(
        info.dropped_bytes > 0,
        "some bytes must have been dropped: {info:?}"
    );
    let on_disk = read_log(&logs, "vm1", "qemu");
    assert!(!on_disk.is_empty(), "what fit was logged: {info:?}");
    assert_eq!(on_disk.len() as u64 + info.dropped_bytes, info.offset);
    assert!(
        on_disk == first[..on_disk.len()],
        "the log holds exactly the bytes before the disk filled, uncorrupted"
    );
    let (_, metrics) = http_get(daemon.metrics, "/metrics");
    assert_eq!(
        metric(&metrics, "conlog_bytes_dropped_total"),
        Some(info.dropped_bytes as f64)
    );
    let reports = daemon.stderr().matches("dropping output").count();
    assert_eq!(
        reports,
        1,
        "the episode is reported once:\n{}",
        daemon.stderr()
    );

    // Space returns: logging resumes with the next bytes, offsets continue.
    std::fs::remove_file(&filler).unwrap();
    let before = info.offset;
    // Three times the cap: the stream rotates and removes its oldest file as it goes.
    let second = pattern(1 << 20, 3 * CAP as usize);
    let mut pipe = pipe;
    pipe.write_all(&second).unwrap();
    drop(pipe);
    let info = wait_closed(&mut agent, "vm1", "qemu", before + second.len() as u64).await;
    let on_disk = read_log(&logs, "vm1", "qemu");
    assert_eq!(on_disk.len() as u64, info.offset - info.first_offset);
    assert!(
        on_disk.len() as u64 > CAP - MAX_SIZE && second.ends_with(&on_disk),
        "logging resumed with exactly the new bytes ({} on disk)",
        on_disk.len()
    );
    assert!(info.bytes_on_disk <= CAP, "the cap holds: {info:?}");
    let files: u64 = log_sizes(&logs, "vm1", "qemu").iter().map(|f| f.1).sum();
    assert!(
        files <= CAP,
        "the cap holds on disk: {:?}",
        log_sizes(&logs, "vm1", "qemu")
    );
    assert_eq!(
        daemon.stderr().matches("logging again").count(),
        1,
        "{}",
        daemon.stderr()
    );
    assert_eq!(
        daemon.stderr().matches("dropping output").count(),
        1,
        "no second episode:\n{}",
        daemon.stderr()
    );
    daemon.stop().await;
}

/// The same on a console: the guest's writes are never held up, what cannot be written is
/// counted as dropped and reported once, an attached client gets exactly the bytes logged (at
/// their offsets: dropped bytes take none), and logging resumes when space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_a_console_drops_counts_and_recovers() {
    use conlog::proto::attach::Mode;
    let scratch = tempfile::Builder::new()
        .prefix("conlog-df-")
        .tempdir()
        .unwrap();
    let logs = scratch.path().join("logs");
    let _tmpfs = Tmpfs::mount(&logs, "256k");
    // A client queue that holds the whole burst: the viewer must get every byte, so it may not
    // be skipped ahead for reading slower than the guest writes on a loaded machine.
    let daemon = Daemon::start_with(
        Some("consoles:\n  client_queue: 4MiB\n"),
        &["--log-dir", logs.to_str().unwrap()],
    )
    .await;
    let mut agent = daemon.agent().await;
    let limits = proto::LogLimits {
        max_size: Some(16 << 10),
        max_backups: Some(1),
        mode: LogMode::Rotate.into(),
        compress: None,
        max_age_seconds: None,
    };
    let reply = create_console(&mut agent, "vm1", "", Some(limits))
        .await
        .unwrap();
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm1", DEVICE, true).await;
    let mut client = Session::attach(local_channel(&daemon).await, attach("vm1", Mode::ReadOnly))
        .await
        .unwrap();

    let filler = logs.join("filler");
    std::fs::write(&filler, vec![0u8; (256 << 10) - (12 << 10) - (8 << 10)]).unwrap();
    // 1 MiB in 4 KiB writes: each completes (bounded), so the guest is never held up.
    let first = pattern(0, 1 << 20);
    for chunk in first.chunks(4096) {
        guest.write(chunk).await;
    }
    // Dropped bytes take their offsets too (a gap in history): the offset is every byte taken.
    let info = wait_stream(&mut agent, "vm1", DEVICE, "done with the burst", |s| {
        s.offset == first.len() as u64
    })
    .await;
    assert!(info.dropped_bytes > 0, "{info:?}");
    // What is on disk and what was dropped account for every byte the log still covers.
    let on_disk = read_log(&logs, "vm1", DEVICE);
    assert_eq!(
        on_disk.len() as u64 + info.dropped_bytes,
        info.offset - info.first_offset,
        "{info:?}"
    );
    // The live viewer was never blinded: it saw every byte, logged or not.
    let seen = client.wait_output_len(info.offset).await.to_vec();
    assert_same("the client's output", &seen, &first[..info.offset as usize]);
    assert_eq!(
        daemon.stderr().matches("dropping output").count(),
        1,
        "{}",
        daemon.stderr()
    );
    let (_, metrics) = http_get(daemon.metrics, "/metrics");
    assert_eq!(
        metric(&metrics, "conlog_bytes_dropped_total"),
        Some(info.dropped_bytes as f64)
    );

    std::fs::remove_file(&filler).unwrap();
    let second = pattern(1 << 30, 5000);
    guest.write(&second).await;
    let before = info.offset;
    wait_offset(&mut agent, "vm1", DEVICE, before + second.len() as u64).await;
    assert!(read_log(&logs, "vm1", DEVICE).ends_with(&second));
    let seen = client
        .wait_output_len(before + second.len() as u64)
        .await
        .to_vec();
    assert_same(
        "the client's output after space returned",
        &seen[before as usize..],
        &second,
    );
    assert_eq!(daemon.stderr().matches("logging again").count(), 1);
}
