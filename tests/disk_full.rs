//! Disk full: the guest keeps running, dropped bytes are counted and reported, the log file is
//! never corrupted nor over its cap, and logging resumes when space returns. The log directory
//! is a real, tiny tmpfs mounted for the test (CI runs as root).

mod support;

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
    let limits = proto::LogLimits {
        max_size: Some(64 << 10),
        max_backups: Some(3),
        mode: LogMode::Rotate.into(),
    };
    let (_, mut pipe) = open_pipe(&mut agent, "vm1", "qemu", Some(limits)).await;

    // Leave about 24 KiB free, then write 100 KiB: the writer must never block.
    let filler = logs.join("filler");
    let free = 24 << 10;
    let fill = (256 << 10) - free - (8 << 10);
    std::fs::write(&filler, vec![0u8; fill]).unwrap();
    let first = pattern(0, 100 << 10);
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
    assert!(
        daemon.stderr().contains("dropping output"),
        "the episode is reported once"
    );

    // Space returns: logging resumes with the next bytes, offsets continue.
    std::fs::remove_file(&filler).unwrap();
    let before = info.offset;
    let second = pattern(1 << 20, 10_000);
    let mut pipe = pipe;
    pipe.write_all(&second).unwrap();
    drop(pipe);
    let info = wait_closed(&mut agent, "vm1", "qemu", before + second.len() as u64).await;
    let on_disk = read_log(&logs, "vm1", "qemu");
    assert!(
        on_disk.ends_with(&second),
        "logging resumed with exactly the new bytes"
    );
    assert!(
        info.bytes_on_disk <= (64 << 10) * 4,
        "the cap holds: {info:?}"
    );
    assert!(daemon.stderr().contains("logging again"));
    daemon.stop().await;
}
