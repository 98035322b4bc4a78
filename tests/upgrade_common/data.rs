//! Test data and the writers that push it (log pipes, a fake guest).

use crate::support::*;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

// Data

/// Line `n` of writer `tag`: numbered, of varying length, so that a byte lost, duplicated or
/// moved shows up as a mismatch (and the first difference is readable).
pub fn line(tag: &str, n: u64) -> Vec<u8> {
    let fill = (n.wrapping_mul(7919) % 53) as usize;
    format!(
        "{tag} {n:08} {}\n",
        "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRST"[..fill].to_owned()
    )
    .into_bytes()
}

/// Lines `0..count` of writer `tag`, concatenated.
pub fn lines(tag: &str, count: u64) -> Vec<u8> {
    (0..count).flat_map(|n| line(tag, n)).collect()
}

// Writers

/// Lines per write of the writers.
pub(crate) const BATCH: u64 = 32;
/// Pause between two writes: enough data to matter, not enough to fill the disk.
pub(crate) const PACE: Duration = Duration::from_millis(1);

/// A thread pushing numbered lines into a log pipe until told to stop. While the daemon does
/// not read (frozen for an upgrade), the pipe fills and the writes block, as QEMU's would.
pub struct PipeWriter {
    tag: String,
    stop: Arc<AtomicBool>,
    lines: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl PipeWriter {
    pub fn start(tag: &str, mut pipe: File) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (tag, stop, lines) = (tag.to_owned(), stop.clone(), lines.clone());
            move || {
                let mut n = 0;
                while !stop.load(SeqCst) {
                    let batch: Vec<u8> = (n..n + BATCH).flat_map(|i| line(&tag, i)).collect();
                    pipe.write_all(&batch)
                        .map_err(|e| format!("writer {tag}: write after {n} lines: {e}"))?;
                    n += BATCH;
                    lines.store(n, SeqCst);
                    std::thread::sleep(PACE);
                }
                Ok(())
            }
        });
        Self {
            tag: tag.to_owned(),
            stop,
            lines,
            thread: Some(thread),
        }
    }

    /// Lines written so far.
    pub fn lines_written(&self) -> u64 {
        self.lines.load(SeqCst)
    }

    /// Stops the writer, closes its pipe and returns everything it wrote.
    pub async fn finish(mut self) -> Vec<u8> {
        self.stop.store(true, SeqCst);
        let thread = self.thread.take().expect("finished once");
        let deadline = Instant::now() + DEADLINE;
        while !thread.is_finished() {
            assert!(
                Instant::now() < deadline,
                "writer {} still blocked in write() after {DEADLINE:?}: the daemon stopped reading",
                self.tag
            );
            tokio::time::sleep(POLL).await;
        }
        thread
            .join()
            .expect("writer thread panicked")
            .unwrap_or_else(|e| panic!("{e}"));
        lines(&self.tag, self.lines_written())
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// A fake guest (QEMU's side of a console socket) printing numbered lines until told to stop.
pub struct GuestPrinter {
    tag: String,
    stop: Arc<AtomicBool>,
    lines: Arc<AtomicU64>,
    task: JoinHandle<FakeGuest>,
}

impl GuestPrinter {
    pub fn start(tag: &str, mut guest: FakeGuest) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (tag, stop, lines) = (tag.to_owned(), stop.clone(), lines.clone());
            async move {
                let mut n = 0;
                while !stop.load(SeqCst) {
                    let batch: Vec<u8> = (n..n + BATCH).flat_map(|i| line(&tag, i)).collect();
                    guest.write(&batch).await;
                    n += BATCH;
                    lines.store(n, SeqCst);
                    tokio::time::sleep(PACE).await;
                }
                guest
            }
        });
        Self {
            tag: tag.to_owned(),
            stop,
            lines,
            task,
        }
    }

    /// Stops printing; returns the guest (still connected) and everything it printed.
    pub async fn finish(self) -> (FakeGuest, Vec<u8>) {
        self.stop.store(true, SeqCst);
        let guest = bounded("the fake guest to stop", self.task)
            .await
            .expect("fake guest task panicked");
        (guest, lines(&self.tag, self.lines.load(SeqCst)))
    }
}
