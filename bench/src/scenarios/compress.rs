//! Scenario `compress` (docs/performance.md, "Compressed history"): what compressed rotated
//! files (`compress: zstd`) buy and cost.
//!
//! 1. Depth per disk byte: a stream with the default budget (2 MiB × 4) fed 48 MiB of the
//!    committed console sample (`tests/data/console-sample.txt`, cycled), then 48 MiB of random
//!    bytes, each in 256 KiB pieces with the worker given time to catch up after each (a guest
//!    printing slower than the worker compresses; a burst larger than what the worker keeps up
//!    with pushes out compressed history for its raw bytes, docs/performance.md); then
//!    `raw_bytes` (history held) against
//!    `bytes_on_disk`, and the same text with compression off. Daemon CPU per GiB logged is
//!    the daemon's user + system time over the whole feed, compression included.
//! 2. `ReadHistory` from the oldest offset (deep in compressed history), `--read` bytes, to a
//!    client on the local socket that discards them, against the same read from a stream with
//!    compression off (raw files); runs alternate; every byte checked against what was written.
//! 3. Time to first byte from 200 random offsets (`from_offset`, `limit_bytes: 1`), compressed
//!    and raw.
//! 4. Pipe throughput: `--pipe` bytes of the sample (cycled) through a log pipe with
//!    compression off, on, and into `cat > FILE`, alternating in one run; the clock stops when
//!    every byte is logged (compression goes on after, off the guest's path).
//!
//! A run is WRONG if a byte read back differs from the byte written, a gap appears, or the
//! disk total exceeds the budget.

use crate::common;
use crate::procfs;
use crate::report::{median, mib_per_s, percentile, size, Verdict};
use crate::scenario::{alternate, Bench, Scenario};
use anyhow::{bail, Context};
use conlog::config::ByteSize;
use conlog::proto::agent_client::AgentClient;
use conlog::proto::console_client::ConsoleClient;
use conlog::proto::{read_history_request::Start, Compression, LogLimits, ReadHistoryRequest};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const GUEST: &str = "bench";
const STREAM: &str = "qemu";
const MAX_SIZE: u64 = 2 << 20;
const MAX_BACKUPS: u32 = 3;
const BUDGET: u64 = MAX_SIZE * (MAX_BACKUPS as u64 + 1);
const PIECE: usize = 256 << 10;
const WRITE: usize = 128 << 10;
const FIRST_BYTES: usize = 200;

/// Options of `conlog-bench compress`.
#[derive(clap::Args)]
pub struct CompressArgs {
    /// The console text [default: tests/data/console-sample.txt of the source tree].
    #[arg(long)]
    sample: Option<PathBuf>,
    /// Bytes through the pipe per throughput run [default: 256MiB, 32MiB with --quick].
    #[arg(long, value_parser = ByteSize::parse)]
    pipe: Option<ByteSize>,
    /// Bytes read per ReadHistory run.
    #[arg(long, value_parser = ByteSize::parse, default_value = "6MiB")]
    read: ByteSize,
    /// Runs of each side [default: 3, 1 with --quick].
    #[arg(long)]
    runs: Option<u32>,
}

impl Scenario for CompressArgs {
    const NAME: &'static str = "compress";

    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict> {
        run(bench, self)
    }
}

fn limits(compress: bool) -> LogLimits {
    LogLimits {
        compress: Some(
            if compress {
                Compression::Zstd
            } else {
                Compression::None
            }
            .into(),
        ),
        ..common::rotating(MAX_SIZE, MAX_BACKUPS)
    }
}

/// Random bytes (they do not compress).
fn random(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// `input` cycled from absolute offset `at`, `len` bytes.
fn cycled(input: &[u8], at: u64, len: usize) -> Vec<u8> {
    let n = input.len() as u64;
    (0..len as u64)
        .map(|i| input[usize::try_from((at + i) % n).expect("within the input")])
        .collect()
}

/// A fed stream: its daemon, what was written, and what the daemon reported.
struct Fed {
    daemon: crate::daemon::Daemon,
    agent: AgentClient<Channel>,
    input: Vec<u8>,
    written: u64,
}

fn run(bench: &Bench, args: &CompressArgs) -> anyhow::Result<Verdict> {
    let runtime = &bench.runtime;
    let sample_path = args.sample.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/console-sample.txt")
    });
    let text = fs::read(&sample_path)
        .with_context(|| format!("cannot read the sample {}", sample_path.display()))?;
    let runs = bench.size(args.runs, 1, 3);
    let pipe = bench.size(args.pipe.map(ByteSize::bytes), 32 << 20, 256 << 20);
    let read = args.read.bytes();
    // Bytes fed to measure depth: well past what the budget holds compressed.
    let feed: u64 = bench.size(None, 16 << 20, 48 << 20);
    bench.ensure_free(
        4 * pipe + (256 << 20),
        " (the pipe runs and the fed streams)",
    )?;
    println!(
        "conlog-bench compress: budget {} (max_size {} × {}), sample {} ({})",
        size(BUDGET),
        size(MAX_SIZE),
        MAX_BACKUPS + 1,
        sample_path.display(),
        size(text.len() as u64)
    );
    println!("machine: {}", bench.machine);
    println!("conlogd: {}", bench.conlogd_text());
    let mut wrong = false;

    // 1. Depth.
    let mut fed = Vec::new();
    for (name, input, compress) in [
        ("console text, zstd", text.clone(), true),
        ("random bytes, zstd", random(1 << 20), true),
        ("console text, none", text.clone(), false),
    ] {
        let dir = bench.scratch.path().join(format!("depth-{}", fed.len()));
        let daemon = bench.start(&dir)?;
        let pid = daemon.pid();
        let mut agent = runtime.block_on(daemon.agent())?;
        let (fd, _) = runtime.block_on(common::create_pipe(
            &mut agent,
            GUEST,
            STREAM,
            Some(limits(compress)),
        ))?;
        let mut writer = File::from(fd);
        let cpu_before = procfs::cpu_time(pid)?;
        let started = Instant::now();
        let mut written = 0u64;
        let mut peak_disk = 0u64;
        while written < feed {
            writer.write_all(&cycled(&input, written, PIECE))?;
            written += PIECE as u64;
            let info = runtime.block_on(wait(&mut agent, |s| {
                s.offset == written && s.compression_backlog_bytes == 0
            }))?;
            peak_disk = peak_disk.max(info.bytes_on_disk);
        }
        drop(writer);
        let cpu = procfs::cpu_time(pid)?.saturating_sub(cpu_before);
        let info = runtime.block_on(wait(&mut agent, |s| !s.open))?;
        let gib = written as f64 / f64::from(1u32 << 30);
        println!(
            "depth {name:<20} history {:>9} in {:>9} on disk ({} rotated files): {:.2}× the raw budget, {:.2} raw bytes per disk byte; daemon CPU {:.1} s per GiB logged ({:.1} s for {})",
            size(info.raw_bytes),
            size(info.bytes_on_disk),
            info.backups,
            info.raw_bytes as f64 / BUDGET as f64,
            info.raw_bytes as f64 / info.bytes_on_disk as f64,
            cpu.as_secs_f64() / gib,
            started.elapsed().as_secs_f64(),
            size(written)
        );
        if peak_disk > BUDGET || info.bytes_on_disk > BUDGET {
            println!("WRONG: {peak_disk} bytes on disk, over the budget {BUDGET}");
            wrong = true;
        }
        fed.push(Fed {
            daemon,
            agent,
            input,
            written,
        });
    }

    // 2. ReadHistory from the oldest offset, compressed (text) against raw (text, none).
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=runs {
        for side in alternate(run, [0usize, 2]) {
            let stream = &mut fed[side];
            let (seconds, ok) = runtime.block_on(read_oldest(stream, read))?;
            wrong |= !ok;
            let rate = mib_per_s(read, seconds);
            println!(
                "run {run} ReadHistory {} {:>8.1} MiB/s {}",
                if side == 0 {
                    "compressed"
                } else {
                    "raw       "
                },
                rate,
                if ok { "" } else { "WRONG" }
            );
            rates[usize::from(side == 2)].push(rate);
        }
    }
    println!(
        "ReadHistory of {} from the oldest offset: compressed {:.1} MiB/s, raw {:.1} MiB/s (medians): {:.2}×",
        size(read),
        median(&rates[0]),
        median(&rates[1]),
        median(&rates[0]) / median(&rates[1])
    );

    // 3. First byte from random offsets.
    for side in [0usize, 2] {
        let times = runtime.block_on(first_bytes(&mut fed[side]))?;
        println!(
            "first byte from {FIRST_BYTES} random offsets, {}: median {:.2} ms, p99 {:.2} ms",
            if side == 0 { "compressed" } else { "raw" },
            median(&times) * 1e3,
            percentile(&times, 0.99) * 1e3
        );
    }
    for stream in fed {
        stream.daemon.stop()?;
    }

    // 4. Pipe throughput: off, on, cat.
    let mut pipe_rates: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for run in 1..=runs {
        for side in alternate(run, [0usize, 1, 2]) {
            let dir = bench.scratch.path().join(format!("pipe-{run}-{side}"));
            let seconds = match side {
                2 => pipe_cat(&dir, &text, pipe)?,
                _ => pipe_conlogd(bench, &dir, &text, pipe, side == 1)?,
            };
            let _ = fs::remove_dir_all(&dir);
            let rate = mib_per_s(pipe, seconds);
            println!(
                "run {run} pipe {:<13} {:>8.1} MiB/s",
                ["conlogd none", "conlogd zstd", "cat"][side],
                rate
            );
            pipe_rates[side].push(rate);
        }
    }
    let cat = median(&pipe_rates[2]);
    println!(
        "pipe {} of console text (medians): compression off {:.1} MiB/s ({:.2}× cat), on {:.1} MiB/s ({:.2}× cat), cat {:.1} MiB/s",
        size(pipe),
        median(&pipe_rates[0]),
        median(&pipe_rates[0]) / cat,
        median(&pipe_rates[1]),
        median(&pipe_rates[1]) / cat,
        cat
    );
    Ok(Verdict::wrong_if(wrong))
}

/// Polls `ListGuests` every 2 ms until `done` holds (at most 5 minutes).
async fn wait(
    agent: &mut AgentClient<Channel>,
    done: impl Fn(&conlog::proto::StreamInfo) -> bool,
) -> anyhow::Result<conlog::proto::StreamInfo> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let info = common::stream_info(agent, GUEST, STREAM).await?;
        if done(&info) {
            return Ok(info);
        }
        if Instant::now() > deadline {
            bail!("stream not as expected after 5 minutes: {info:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn console(stream: &Fed) -> anyhow::Result<ConsoleClient<Channel>> {
    let channel = conlog::client::connect_local(&stream.daemon.socket).await?;
    Ok(ConsoleClient::new(channel).max_decoding_message_size(16 << 20))
}

/// Reads `len` bytes from the oldest offset; seconds, and whether every byte was right.
async fn read_oldest(stream: &mut Fed, len: u64) -> anyhow::Result<(f64, bool)> {
    let info = common::stream_info(&mut stream.agent, GUEST, STREAM).await?;
    let mut client = console(stream).await?;
    let start = Instant::now();
    let mut chunks = client
        .read_history(ReadHistoryRequest {
            guest: GUEST.into(),
            stream: STREAM.into(),
            start: Some(Start::FromOffset(info.first_offset)),
            limit_bytes: len,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut at = info.first_offset;
    let mut ok = true;
    while let Some(chunk) = chunks.message().await? {
        if chunk.gap.is_some() || chunk.offset != at {
            ok = false;
            break;
        }
        if chunk.data != cycled(&stream.input, at, chunk.data.len()) {
            ok = false;
        }
        at += chunk.data.len() as u64;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok((
        seconds,
        ok && at == (info.first_offset + len).min(stream.written),
    ))
}

/// Seconds to the first chunk of reads of one byte from random offsets.
async fn first_bytes(stream: &mut Fed) -> anyhow::Result<Vec<f64>> {
    let info = common::stream_info(&mut stream.agent, GUEST, STREAM).await?;
    let mut client = console(stream).await?;
    let mut x = 12_345u64;
    let mut times = Vec::new();
    for _ in 0..FIRST_BYTES {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let offset = info.first_offset + (x >> 33) % (info.offset - info.first_offset);
        let start = Instant::now();
        let mut chunks = client
            .read_history(ReadHistoryRequest {
                guest: GUEST.into(),
                stream: STREAM.into(),
                start: Some(Start::FromOffset(offset)),
                limit_bytes: 1,
                ..Default::default()
            })
            .await?
            .into_inner();
        let chunk = chunks.message().await?.context("no chunk")?;
        times.push(start.elapsed().as_secs_f64());
        if chunk.data != cycled(&stream.input, offset, 1) {
            bail!("the byte at {offset} differs from the byte written");
        }
    }
    Ok(times)
}

/// Seconds from the first write of `len` bytes of `text` (cycled) until all are logged.
fn pipe_conlogd(
    bench: &Bench,
    dir: &Path,
    text: &[u8],
    len: u64,
    compress: bool,
) -> anyhow::Result<f64> {
    let runtime = &bench.runtime;
    let daemon = bench.start(dir)?;
    let mut agent = runtime.block_on(daemon.agent())?;
    let (fd, _) = runtime.block_on(common::create_pipe(
        &mut agent,
        GUEST,
        STREAM,
        Some(limits(compress)),
    ))?;
    let mut writer = File::from(fd);
    let data = cycled(text, 0, WRITE * 64);
    let start = Instant::now();
    let mut written = 0u64;
    while written < len {
        let n = usize::try_from((len - written).min(data.len() as u64))?;
        writer.write_all(&data[..n])?;
        written += n as u64;
    }
    drop(writer);
    runtime.block_on(wait(&mut agent, |s| s.offset == len))?;
    let seconds = start.elapsed().as_secs_f64();
    daemon.stop()?;
    Ok(seconds)
}

/// The same into `cat > FILE`.
fn pipe_cat(dir: &Path, text: &[u8], len: u64) -> anyhow::Result<f64> {
    fs::create_dir_all(dir)?;
    let out = File::create(dir.join("cat.log"))?;
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("cannot run cat")?;
    let mut stdin = cat.stdin.take().context("cat's stdin")?;
    let data = cycled(text, 0, WRITE * 64);
    let start = Instant::now();
    let mut written = 0u64;
    while written < len {
        let n = usize::try_from((len - written).min(data.len() as u64))?;
        stdin.write_all(&data[..n])?;
        written += n as u64;
    }
    drop(stdin);
    cat.wait()?;
    Ok(start.elapsed().as_secs_f64())
}
