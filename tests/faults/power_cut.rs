//! A power cut loses what the kernel had not yet written back (docs/operations.md,
//! "Durability"): a log file can come back shorter than its position record says it was. The
//! promise is that offsets survive it: "the position records are checked against the files on
//! the next start, and an absolute offset never goes back". Simulated by truncating the log
//! file of a stopped daemon (its record says 1000 bytes, the file holds 600).
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;

use conlog::proto::{self, read_history_request::Start};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_shorter_than_its_record_never_reuses_offsets() {
    const WRITTEN: u64 = 1000;
    const SURVIVED: u64 = 600;
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let first = pattern(0, WRITTEN as usize);
    let (_, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    write_and_close(pipe, first.clone()).await;
    wait_closed(&mut agent, "vm1", "qemu", WRITTEN).await;
    drop(agent);
    daemon.stop().await;

    // The power cut: the last 400 bytes never reached the disk.
    let log = daemon.log_path("vm1", "qemu");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(SURVIVED)
        .unwrap();
    daemon.restart().await;

    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, "vm1", "qemu")
        .await
        .expect("the stream is restored");
    assert!(
        info.offset >= WRITTEN,
        "the offset went back from {WRITTEN} to {} after the power cut: {info:?}",
        info.offset
    );
    let (reply, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    assert!(
        reply.offset >= WRITTEN,
        "new bytes would get offsets already given out: {reply:?}"
    );
    let start = reply.offset;
    let after = pattern(1 << 20, 300);
    write_and_close(pipe, after.clone()).await;
    let info = wait_closed(&mut agent, "vm1", "qemu", start + after.len() as u64).await;
    assert_eq!(info.offset, start + after.len() as u64, "{info:?}");

    // What survived is still there, and the new bytes are read at their own offsets.
    let on_disk = read_log(&daemon.log_dir(), "vm1", "qemu");
    assert!(
        on_disk.starts_with(&first[..SURVIVED as usize]) && on_disk.ends_with(&after),
        "{}",
        first_difference(
            &on_disk,
            &[&first[..SURVIVED as usize], &after[..]].concat()
        )
    );
    let mut history = local_channel(&daemon)
        .await
        .console()
        .read_history(proto::ReadHistoryRequest {
            guest: "vm1".into(),
            stream: "qemu".into(),
            start: Some(Start::FromOffset(start)),
            ..Default::default()
        })
        .await
        .expect("ReadHistory")
        .into_inner();
    let mut read = Vec::new();
    while let Some(chunk) = bounded("ReadHistory", history.message())
        .await
        .expect("a chunk")
    {
        if !chunk.data.is_empty() {
            assert_eq!(chunk.offset, start + read.len() as u64, "{chunk:?}");
        }
        read.extend_from_slice(&chunk.data);
    }
    assert_same("history from the first new offset", &read, &after);
}
