//! Mode `history --since-time` (docs/performance.md, "History by time"): how long a
//! `ReadHistory` with `since_time` takes to its first byte on a stream holding its full
//! default history, against the same call with `from_offset`, and how many reads the daemon
//! makes for it.
//!
//! Setup: a fresh daemon; a log pipe with the daemon's default limits (2 MiB files, 3 backups:
//! 8 MiB on disk), filled with numbered lines past its cap (so the oldest file has been
//! rotated away) by writes every 10 ms for `--duration`, so the time index gets an entry
//! every 100 ms as continuous output does (the densest the index gets while output flows).
//! Then, from one connection over the UNIX socket, alternating: `since_time` at a random
//! time between the oldest byte's and the newest's, and `from_offset` at a random offset on
//! disk, each with `limit_bytes` 1 (the clock runs from the call to its first chunk). Per call
//! the daemon's read system calls (`syscr` of `/proc/PID/io`: the request's socket reads, the
//! log and index `pread`s) are counted; the difference between the two kinds is what the time
//! lookup costs. A `since_time` answer is WRONG if its first byte's time is before the time
//! asked, or the byte before it was logged at or after it.

use crate::common::{self, wait_stream};
use crate::daemon::Daemon;
use crate::report::{median, percentile, size, Verdict};
use crate::scenario::Bench;
use anyhow::{bail, Context};
use conlog::proto::console_client::ConsoleClient;
use conlog::proto::{read_history_request::Start, HistoryChunk, ReadHistoryRequest};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const GUEST: &str = "bench";
const STREAM: &str = "qemu";
/// The daemon's defaults (`logs.max_size`, `logs.max_backups`).
const DEFAULT_HISTORY: u64 = 4 * (2 << 20);
/// Written past the cap, so the oldest file has gone.
const FILL: u64 = DEFAULT_HISTORY + (1 << 20);
const WRITE_EVERY: Duration = Duration::from_millis(10);

/// `read` system calls of `pid` so far.
fn read_calls(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .context("no syscr in /proc/PID/io")?
        .trim()
        .parse()
        .context("bad syscr")
}

fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: i32::try_from(ns.rem_euclid(1_000_000_000)).unwrap_or(0),
    }
}

fn nanos(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(i64::MIN, |t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
}

/// A small deterministic generator (xorshift), so runs pick the same spread of targets.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Writes numbered lines into `pipe`, `FILL` bytes in writes every `WRITE_EVERY` over
/// `duration`.
fn fill(mut pipe: File, duration: Duration) -> anyhow::Result<()> {
    let writes = (duration.as_millis() / WRITE_EVERY.as_millis()).max(1);
    let per_write = usize::try_from(FILL / u64::try_from(writes)?)?.max(64);
    let mut line = 0u64;
    let mut written = 0u64;
    let started = Instant::now();
    let mut text = Vec::with_capacity(per_write + 64);
    for n in 0.. {
        if written >= FILL {
            break;
        }
        text.clear();
        while text.len() < per_write {
            writeln!(text, "line {line:08} of the history by time bench")?;
            line += 1;
        }
        pipe.write_all(&text)?;
        written += text.len() as u64;
        let due = started + WRITE_EVERY * (n + 1);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    Ok(())
}

/// One timed call: the first chunk, the time to it, and the daemon's reads for it.
async fn first_chunk(
    client: &mut ConsoleClient<tonic::transport::Channel>,
    pid: u32,
    start: Start,
) -> anyhow::Result<(Vec<HistoryChunk>, Duration, u64)> {
    let request = ReadHistoryRequest {
        guest: GUEST.into(),
        stream: STREAM.into(),
        start: Some(start),
        limit_bytes: 1,
        ..Default::default()
    };
    let reads = read_calls(pid)?;
    let begun = Instant::now();
    let mut chunks = client.read_history(request).await?.into_inner();
    let first = chunks.message().await?.context("no chunk")?;
    let took = begun.elapsed();
    let reads = read_calls(pid)? - reads;
    let mut all = vec![first];
    while let Some(chunk) = chunks.message().await? {
        all.push(chunk);
    }
    Ok((all, took, reads))
}

/// Runs the mode and prints its report.
pub fn run(bench: &Bench, calls: u32, duration: Duration) -> anyhow::Result<Verdict> {
    println!(
        "conlog-bench history --since-time: {} of numbered lines written in {duration:?} (a write every {WRITE_EVERY:?}) into a stream with the default limits; {calls} calls of each kind",
        size(FILL)
    );
    println!("machine: {}", bench.machine);
    println!("conlogd: {}", bench.conlogd_text());
    let dir = bench.scratch.path().join("daemon");
    let daemon = bench.start(&dir)?;
    bench.runtime.block_on(measure(&daemon, calls, duration))
}

async fn measure(daemon: &Daemon, calls: u32, duration: Duration) -> anyhow::Result<Verdict> {
    let mut agent = daemon.agent().await?;
    let (fd, created) = common::create_pipe(&mut agent, GUEST, STREAM, None).await?;
    let writer = std::thread::spawn(move || fill(File::from(fd), duration));
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
    let info = wait_stream(
        &mut agent,
        GUEST,
        STREAM,
        Duration::from_millis(5),
        "closed with every byte logged",
        |s| !s.open && s.offset >= FILL,
    )
    .await?;
    let (first, end) = (info.first_offset, info.offset);
    let log = Path::new(&created.log_path);
    let dir = log.parent().context("log path without a directory")?;
    let (mut files, mut index_bytes) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "idx") {
            files += 1;
            index_bytes += std::fs::metadata(&path)?.len();
        }
    }
    println!(
        "on disk: offsets {first}..{end} ({}), {files} index files, {index_bytes} index bytes (about {} entries)",
        size(end - first),
        index_bytes.saturating_sub(64 * files) / 16
    );
    let pid = daemon.pid();
    let channel = conlog::client::connect_local(&daemon.socket).await?;
    let mut client = ConsoleClient::new(channel);
    // The times of the oldest and the newest byte, from the daemon.
    let times = |chunks: &[HistoryChunk]| nanos(chunks[0].time.as_ref());
    let mut request = ReadHistoryRequest {
        guest: GUEST.into(),
        stream: STREAM.into(),
        start: Some(Start::TailBytes(1)),
        times: true,
        ..Default::default()
    };
    let newest = client
        .read_history(request.clone())
        .await?
        .into_inner()
        .message()
        .await?
        .context("no newest byte")?;
    request.start = Some(Start::FromOffset(first));
    let oldest_time = nanos(
        client
            .read_history(request)
            .await?
            .into_inner()
            .message()
            .await?
            .context("no oldest byte")?
            .time
            .as_ref(),
    );
    let newest_time = nanos(newest.time.as_ref());
    if oldest_time == i64::MIN || newest_time <= oldest_time {
        bail!("the stream has no usable times ({oldest_time}..{newest_time})");
    }
    let span = u64::try_from(newest_time - oldest_time)?;
    let mut random = Random(0x2545_F491_4F6C_DD1D);
    let (mut since, mut offset) = (Vec::new(), Vec::new());
    let (mut since_reads, mut offset_reads) = (Vec::new(), Vec::new());
    let mut problems = Vec::new();
    for _ in 0..calls {
        let t = oldest_time + i64::try_from(random.below(span))?;
        let (chunks, took, reads) =
            first_chunk(&mut client, pid, Start::SinceTime(timestamp(t))).await?;
        since.push(took.as_secs_f64() * 1e6);
        since_reads.push(reads as f64);
        let at = chunks[0].offset;
        if times(&chunks) < t {
            problems.push(format!("since {t}: first byte at {at} logged before it"));
        }
        if at > first {
            let before_time = nanos(
                client
                    .read_history(ReadHistoryRequest {
                        guest: GUEST.into(),
                        stream: STREAM.into(),
                        start: Some(Start::FromOffset(at - 1)),
                        limit_bytes: 1,
                        times: true,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .message()
                    .await?
                    .context("no byte before")?
                    .time
                    .as_ref(),
            );
            if before_time >= t {
                problems.push(format!(
                    "since {t}: the byte before {at} was logged after it"
                ));
            }
        }
        let o = first + random.below(end - first);
        let (_, took, reads) = first_chunk(&mut client, pid, Start::FromOffset(o)).await?;
        offset.push(took.as_secs_f64() * 1e6);
        offset_reads.push(reads as f64);
    }
    let row = |name: &str, v: &[f64], r: &[f64]| {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.1} |",
            median(v),
            percentile(v, 0.9),
            percentile(v, 0.99),
            r.iter().sum::<f64>() / r.len().max(1) as f64
        );
    };
    println!();
    println!("| start | first byte µs (median) | p90 | p99 | daemon read calls per call (mean) |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    row("since_time (random time)", &since, &since_reads);
    row("from_offset (random offset)", &offset, &offset_reads);
    println!(
        "{calls} since_time answers checked (first byte at or after the time, the byte before it earlier): {}",
        crate::report::outcome(&problems)
    );
    // Some problems shown, not all.
    for problem in problems.iter().take(5) {
        println!("  {problem}");
    }
    Ok(Verdict::wrong_if(!problems.is_empty()))
}
