//! The real `zstd` CLI (Debian's `zstd` package) on the compressed rotated files the real
//! `conlogd` writes: `zstd -d` restores each file's raw bytes, so operators read them without
//! conlog (docs/operations.md, "Compressed backups").
//!
//! When `zstd` is not on PATH the test fails and says so: it is never skipped.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes and offsets in tests are small numbers"
)]

use crate::support;

use conlog::proto::{self, LogMode};
use std::process::Command;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_d_restores_every_rotated_file() {
    if let Err(e) = Command::new("zstd").arg("--version").output() {
        panic!("zstd is required by this test and could not be run ({e}); `apt-get install zstd`");
    }
    let daemon = Daemon::start_with(Some("compression:\n  frame_size: 64KiB\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let limits = proto::LogLimits {
        compress: Some(proto::Compression::Zstd.into()),
        ..limits(256 << 10, 3, LogMode::Rotate)
    };
    let (_, pipe) = open_pipe(&mut agent, "vm1", "qemu", Some(limits)).await;
    let sample = std::fs::read(repo_dir().join("tests/data/console-sample.txt")).unwrap();
    let mut data = sample.clone();
    data.extend_from_slice(&sample);
    // A file at a time, as fast as the worker compresses (a burst faster than that keeps
    // rotated files raw, and the oldest go first).
    let mut pipe = pipe;
    for (i, piece) in data.chunks(256 << 10).enumerate() {
        std::io::Write::write_all(&mut pipe, piece).unwrap();
        let written = ((i + 1) * (256 << 10)).min(data.len()) as u64;
        wait_stream(&mut agent, "vm1", "qemu", "compressed", |s| {
            s.offset == written && s.compression_backlog_bytes == 0
        })
        .await;
    }
    drop(pipe);
    let info = wait_stream(&mut agent, "vm1", "qemu", "compressed", |s| {
        s.offset == data.len() as u64 && s.compression_backlog_bytes == 0 && !s.open
    })
    .await;
    // The files oldest first: each decompressed by the CLI, then the current file, are the
    // bytes from the oldest offset on.
    let dir = daemon.log_dir().join("vm1");
    let mut restored = Vec::new();
    let mut compressed = 0;
    for n in (1..=info.backups).rev() {
        let zst = dir.join(format!("qemu.log.{n}.zst"));
        let raw = dir.join(format!("qemu.log.{n}"));
        if zst.exists() {
            let output = Command::new("zstd")
                .args(["-d", "-c", "-q"])
                .arg(&zst)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "zstd -d {}: {}",
                zst.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            restored.extend_from_slice(&output.stdout);
            compressed += 1;
        } else {
            restored.extend_from_slice(&std::fs::read(&raw).unwrap());
        }
    }
    restored.extend_from_slice(&std::fs::read(dir.join("qemu.log")).unwrap());
    assert!(compressed >= 3, "{compressed} compressed files");
    assert_same(
        "zstd -d of the rotated files",
        &restored,
        &data[info.first_offset as usize..],
    );
}
