//! A large history (250 MiB: 25 rotated files of 10 MiB and the current one) streamed whole
//! with `ReadHistory`, checked chunk by chunk, while the daemon's resident memory is sampled:
//! it must stay flat, i.e. the history is streamed from disk, never held in memory.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::history_common;
use crate::support;

use conlog::proto::LogMode;
use history_common::*;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;

const MIB: u64 = 1 << 20;

/// `VmRSS` of process `pid`, in bytes.
fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

/// Samples `VmRSS` of `pid` until `stop`; the largest value seen is in `max`.
fn sample_rss(
    pid: u32,
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut samples = 0;
        while !stop.load(Ordering::Relaxed) {
            max.fetch_max(vm_rss(pid), Ordering::Relaxed);
            samples += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        samples
    })
}

/// 250 MiB of history on disk (25 backups of 10 MiB), streamed whole over the UNIX socket and
/// then over TCP to clients that check and discard each chunk: every byte arrives, in order,
/// and the daemon's `VmRSS` grows by less than 8 MiB over its level before the reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_250_mib_history_streams_with_flat_daemon_memory() {
    let _heavy = heavy().await; // one heavy test at a time: support::heavy
    const GUEST: &str = "vm-large";
    const MAX_SIZE: u64 = 10 * MIB;
    const BACKUPS: u32 = 25;
    // A few 64 KiB chunks in flight, hyper's HTTP/2 send buffer (400 KiB) and allocator
    // arenas of the worker threads (1.7 MiB growth measured): below one rotated file
    // (10 MiB), so a reader that loads a whole file, let alone the history, exceeds it.
    const GROWTH: u64 = 8 * MIB;
    let total = 250 * MIB + 12_345;

    let daemon = Daemon::start_with(Some(NO_TIME_INDEX), &[]).await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(MAX_SIZE, BACKUPS, LogMode::Rotate)),
    )
    .await;
    tokio::task::spawn_blocking(move || {
        let mut pipe = pipe;
        let mut offset = 0;
        while offset < total {
            let n = MIB.min(total - offset);
            pipe.write_all(&pattern(offset, n as usize))
                .expect("write into the log pipe");
            offset += n;
        }
    })
    .await
    .expect("writer");
    let info = wait_closed(&mut agent, GUEST, "qemu", total).await;
    assert_eq!(info.first_offset, 0, "nothing rotated away");
    assert_eq!(info.bytes_on_disk, total);
    let backups = log_file_names(&daemon.log_dir(), GUEST, "qemu").len() - 1;
    assert_eq!(backups, BACKUPS as usize);

    let pid = daemon.pid();
    let before = vm_rss(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let max = Arc::new(AtomicU64::new(before));
    let sampler = sample_rss(pid, stop.clone(), max.clone());

    let mut clients = [
        local_console(&daemon).await,
        tcp_console(&daemon, GUEST).await,
    ];
    for client in &mut clients {
        let mut chunks = open(client, request(GUEST, "qemu", None))
            .await
            .expect("ReadHistory");
        let mut got = Received::discarding(DEFAULT_CHUNK);
        while let Some(chunk) = next(&mut chunks).await.expect("chunk") {
            assert_pattern(chunk.offset, got.push(&chunk));
        }
        assert!(got.gaps.is_empty(), "gaps: {:?}", got.gaps);
        assert_eq!(got.first, Some(0));
        assert_eq!(got.position, Some(total));
        assert_eq!(got.bytes, total);
        assert!(
            got.chunks >= total / DEFAULT_CHUNK as u64,
            "{} chunks for {total} bytes",
            got.chunks
        );
    }
    max.fetch_max(vm_rss(pid), Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("sampler");
    let max = max.load(Ordering::Relaxed);
    eprintln!(
        "conlogd VmRSS: {} KiB before, {} KiB at most during the reads ({samples} samples)",
        before / 1024,
        max / 1024
    );
    assert!(samples >= 10, "only {samples} memory samples");
    assert!(
        max < before + GROWTH,
        "conlogd's VmRSS grew from {} KiB to {} KiB while streaming {} MiB of history",
        before / 1024,
        max / 1024,
        total / MIB
    );
}
