//! Helpers of the `ReadHistory` tests (`tests/history*.rs`): Console clients over the UNIX
//! socket and TCP, requests, reading a reply with deadlines, and checking that a sequence of
//! `HistoryChunk`s is contiguous, exact and well formed.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]
#![allow(dead_code)]

use crate::support::*;
use conlog::proto::{
    console_client::ConsoleClient, read_history_request::Start, HistoryChunk, LogMode,
    ReadHistoryRequest, StreamInfo,
};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use tonic::{Code, Status, Streaming};

/// The default `history.chunk_size`.
pub const DEFAULT_CHUNK: usize = 64 << 10;

/// A Console client over the local UNIX socket.
pub async fn local_console(daemon: &Daemon) -> Console {
    let channel = conlog::client::connect_local(&daemon.socket())
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", daemon.socket().display()));
    channel.console()
}

/// A Console client over TCP with a read-write token for `guest`.
pub async fn tcp_console(daemon: &Daemon, guest: &str) -> Console {
    daemon.tcp_channel(guest).await.console()
}

/// A Console client as the history tests use it.
pub type Console = ConsoleClient<ConsoleChannel>;

/// A request for `guest/stream` starting at `start`.
pub fn request(guest: &str, stream: &str, start: Option<Start>) -> ReadHistoryRequest {
    ReadHistoryRequest {
        guest: guest.into(),
        stream: stream.into(),
        start,
        ..Default::default()
    }
}

/// Starts a `ReadHistory` call (bounded).
pub async fn open(
    client: &mut Console,
    request: ReadHistoryRequest,
) -> Result<Streaming<HistoryChunk>, Status> {
    let what = format!("{request:?}");
    tokio::time::timeout(DEADLINE, client.read_history(request))
        .await
        .unwrap_or_else(|_| panic!("ReadHistory {what} did not answer within {DEADLINE:?}"))
        .map(|r| r.into_inner())
}

/// The next chunk of a reply (bounded): `Ok(None)` when the reply ended with OK.
pub async fn next(chunks: &mut Streaming<HistoryChunk>) -> Result<Option<HistoryChunk>, Status> {
    tokio::time::timeout(DEADLINE, chunks.message())
        .await
        .unwrap_or_else(|_| panic!("no HistoryChunk (nor end) within {DEADLINE:?}"))
}

/// Every chunk of a reply that ends by itself (no `follow`).
pub async fn read_all(
    client: &mut Console,
    request: ReadHistoryRequest,
) -> Result<Vec<HistoryChunk>, Status> {
    let mut chunks = open(client, request).await?;
    let mut out = Vec::new();
    while let Some(chunk) = next(&mut chunks).await? {
        out.push(chunk);
    }
    Ok(out)
}

/// Like [`read_all`], but the call must succeed.
pub async fn read_ok(client: &mut Console, request: ReadHistoryRequest) -> Vec<HistoryChunk> {
    let what = format!("{request:?}");
    read_all(client, request)
        .await
        .unwrap_or_else(|s| panic!("ReadHistory {what}: {s:?}"))
}

/// Asserts that a call fails with `code` (before or while streaming).
pub async fn expect_error(client: &mut Console, request: ReadHistoryRequest, code: Code) -> Status {
    let what = format!("{request:?}");
    match read_all(client, request).await {
        Ok(chunks) => panic!(
            "ReadHistory {what}: expected {code:?}, got {} chunks",
            chunks.len()
        ),
        Err(status) => {
            assert_eq!(status.code(), code, "ReadHistory {what}: {status:?}");
            assert!(
                !status.message().is_empty(),
                "{code:?} without a message for {what}"
            );
            status
        }
    }
}

/// What a reader has received so far, checked chunk by chunk: offsets contiguous (a gap frame
/// moves the position from exactly where it was to its `to_offset`), data chunks non-empty and
/// at most `chunk_size`, gap frames with no data.
#[derive(Debug)]
pub struct Received {
    /// Offset of the first chunk (for a gap frame: its `from_offset`).
    pub first: Option<u64>,
    /// The offset after the last byte received (or the last gap's `to_offset`).
    pub position: Option<u64>,
    /// Data bytes received, concatenated (only if kept).
    pub data: Vec<u8>,
    /// Data bytes received.
    pub bytes: u64,
    /// Gap frames: `(from, to)`.
    pub gaps: Vec<(u64, u64)>,
    /// Data chunks.
    pub chunks: u64,
    chunk_size: usize,
    keep: bool,
}

impl Received {
    /// A reader that keeps the data.
    pub fn new(chunk_size: usize) -> Self {
        Self {
            first: None,
            position: None,
            data: Vec::new(),
            bytes: 0,
            gaps: Vec::new(),
            chunks: 0,
            chunk_size,
            keep: true,
        }
    }

    /// A reader that only counts (for large replies).
    pub fn discarding(chunk_size: usize) -> Self {
        Self {
            keep: false,
            ..Self::new(chunk_size)
        }
    }

    /// Checks and records one chunk; returns its data.
    pub fn push<'a>(&mut self, chunk: &'a HistoryChunk) -> &'a [u8] {
        if let Some(gap) = &chunk.gap {
            assert!(
                chunk.data.is_empty() && chunk.text.is_empty(),
                "a gap frame carries data: {chunk:?}"
            );
            assert!(
                gap.from_offset < gap.to_offset,
                "empty or inverted gap: {gap:?}"
            );
            assert_eq!(
                chunk.offset, gap.to_offset,
                "a gap frame's offset is its first available byte: {gap:?}"
            );
            if let Some(position) = self.position {
                assert_eq!(
                    gap.from_offset, position,
                    "the gap does not start where the data stopped"
                );
            }
            self.first.get_or_insert(gap.from_offset);
            self.gaps.push((gap.from_offset, gap.to_offset));
            self.position = Some(gap.to_offset);
            return &[];
        }
        assert!(
            !chunk.data.is_empty(),
            "an empty data chunk at offset {}",
            chunk.offset
        );
        assert!(
            chunk.data.len() <= self.chunk_size,
            "a chunk of {} bytes > chunk_size {} at offset {}",
            chunk.data.len(),
            self.chunk_size,
            chunk.offset
        );
        if let Some(position) = self.position {
            assert_eq!(
                chunk.offset, position,
                "offsets not contiguous: chunk at {} after data up to {position}",
                chunk.offset
            );
        }
        self.first.get_or_insert(chunk.offset);
        self.position = Some(chunk.offset + chunk.data.len() as u64);
        self.bytes += chunk.data.len() as u64;
        self.chunks += 1;
        if self.keep {
            self.data.extend_from_slice(&chunk.data);
        }
        &chunk.data
    }

    /// Checks and records every chunk of a finished reply.
    pub fn of(chunks: &[HistoryChunk], chunk_size: usize) -> Self {
        let mut received = Self::new(chunk_size);
        for chunk in chunks {
            received.push(chunk);
        }
        received
    }
}

/// Asserts that `data` are the bytes of the test pattern at `offset`.
pub fn assert_pattern(offset: u64, data: &[u8]) {
    if data != pattern(offset, data.len()).as_slice() {
        let expected = pattern(offset, data.len());
        let at = data
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!(
            "chunk at {offset} ({} bytes) differs from the written bytes at offset {}",
            data.len(),
            offset + at as u64
        );
    }
}

/// Writes all of `data` into `pipe` and keeps it open (blocking; for small amounts).
pub fn write_now(pipe: &mut File, data: &[u8]) {
    pipe.write_all(data).expect("write into the log pipe");
}

/// Creates `guest/stream` with `limits(max_size, max_backups, mode)`, writes `data` through its
/// pipe, closes it and waits until it is all logged. Checks that the files on disk are the tail
/// of `data` and returns the stream as listed.
pub async fn logged_stream(
    daemon: &Daemon,
    guest: &str,
    stream: &str,
    max_size: u64,
    max_backups: u32,
    mode: LogMode,
    data: &[u8],
) -> StreamInfo {
    let mut agent = daemon.agent().await;
    let (reply, pipe) = open_pipe(
        &mut agent,
        guest,
        stream,
        Some(limits(max_size, max_backups, mode)),
    )
    .await;
    assert_eq!(reply.offset, 0, "{guest}/{stream} is a new stream");
    write_and_close(pipe, data.to_vec()).await;
    let info = wait_closed(&mut agent, guest, stream, data.len() as u64).await;
    let on_disk = read_log(&daemon.log_dir(), guest, stream);
    assert_eq!(info.first_offset + on_disk.len() as u64, data.len() as u64);
    assert!(
        on_disk == data[info.first_offset as usize..],
        "{guest}/{stream}: the files on disk are not the tail of the bytes written"
    );
    info
}

/// Descriptors the daemon holds on files under `dir` (links of `/proc/PID/fd`, including
/// deleted files).
pub fn fds_under(pid: u32, dir: &Path) -> usize {
    let prefix = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with(&prefix))
        .count()
}

/// Polls (bounded) until `done` holds; panics with `what` otherwise.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while !done() {
        if std::time::Instant::now() > deadline {
            panic!("{what}: not within {DEADLINE:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Where the last `n` lines of `data` start (a final line without `\n` counts as a line), or
/// `oldest` if they start before it.
pub fn model_tail_lines(data: &[u8], oldest: usize, n: usize) -> usize {
    let mut starts: Vec<usize> = std::iter::once(0)
        .chain(
            data.iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    if starts.last() == Some(&data.len()) {
        starts.pop(); // no line after a final newline
    }
    if n == 0 {
        return data.len();
    }
    let start = if n > starts.len() {
        0
    } else {
        starts[starts.len() - n]
    };
    start.max(oldest)
}

/// The wall clock now, in nanoseconds since the Unix epoch (what the time index stores).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// `ns` (since the Unix epoch) as the proto's timestamp.
pub fn ts(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// A proto timestamp in nanoseconds since the Unix epoch.
pub fn ns_of(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1_000_000_000 + i64::from(t.nanos)
}
