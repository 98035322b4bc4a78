//! Scenario `history` (issue 4's benchmark): streaming a large history to a client that
//! discards it.
//!
//! Setup: a fresh daemon, a log pipe with rotation at 64 MiB keeping 20 backups (so 1 GiB stays
//! on disk), `--size` bytes written through it and waited for until logged. The log files are
//! then read once with `cat > /dev/null` so every side starts from the page cache.
//!
//! Measured, alternating per run:
//! - `ReadHistory` from offset 0 over the local UNIX socket, the client counting bytes and
//!   checking every chunk starts where the previous one ended (no gap); every 64th chunk's
//!   bytes are also checked against what was written. The clock runs from the call until the
//!   stream ends.
//! - The same over the daemon's TCP listener (127.0.0.1).
//! - Baseline: `cat <the log files, oldest first> | socat -u STDIN TCP:127.0.0.1:PORT` to a
//!   reader thread of this process that reads into a 64 KiB buffer and discards; the clock runs
//!   from spawning the pipeline until the reader sees EOF.
//!
//! The daemon's VmRSS is sampled every 20 ms during its reads (and its VmHWM reset before);
//! growth is the peak minus the value before the read.

use crate::console::{version, wait_stream, Scratch};
use crate::daemon::Daemon;
use crate::data::Pattern;
use crate::procfs::{self, Machine, RssSampler};
use crate::report::{median, met, mib_per_s, size, Table, Verdict};
use crate::Common;
use anyhow::{bail, Context};
use conlog::config::ByteSize;
use conlog::proto::console_client::ConsoleClient;
use conlog::proto::{
    read_history_request::Start, Access, CreateLogPipeRequest, IssueTokenRequest, LogLimits,
    LogMode, ReadHistoryRequest,
};
use std::fs::{self, File};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

const GUEST: &str = "bench";
const STREAM: &str = "qemu";
const MAX_SIZE: u64 = 64 << 20;
const MAX_BACKUPS: u32 = 20;
const WRITE_CHUNK: usize = 128 << 10;
const SAMPLE: Duration = Duration::from_millis(20);
/// Targets of issue 4.
const TARGET_RATIO: f64 = 0.5;
const TARGET_RSS_GROWTH_KIB: u64 = 4096;

/// Options of `conlog-bench history`.
#[derive(clap::Args)]
pub struct HistoryArgs {
    /// History size [default: 1GiB, or 64MiB with --quick]; at most 21 × 64MiB stays on disk.
    #[arg(long, value_parser = ByteSize::parse)]
    size: Option<ByteSize>,
    /// Runs of each side [default: 2, or 1 with --quick].
    #[arg(long)]
    runs: Option<u32>,
    /// Seconds for CI: --size 64MiB --runs 1 unless given.
    #[arg(long)]
    quick: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Local,
    Tcp,
    Socat,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Local => "conlogd unix",
            Target::Tcp => "conlogd tcp",
            Target::Socat => "cat→socat tcp",
        }
    }
}

struct Sample {
    target: Target,
    seconds: f64,
    bytes: u64,
    chunks: u64,
    /// CPU of the daemon (or of cat + socat) during the read.
    cpu: Duration,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    problems: Vec<String>,
}

/// Runs the scenario and prints its report.
pub fn run(runtime: &Runtime, common: &Common, args: &HistoryArgs) -> anyhow::Result<Verdict> {
    let total = args
        .size
        .map_or(if args.quick { 64 << 20 } else { 1 << 30 }, ByteSize::bytes);
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 2 }).max(1);
    if total == 0 {
        bail!("--size must be at least 1");
    }
    if total > MAX_SIZE * u64::from(MAX_BACKUPS) {
        bail!(
            "--size must be at most {} so everything stays on disk",
            size(MAX_SIZE * u64::from(MAX_BACKUPS))
        );
    }
    let conlogd = common.conlogd()?;
    let parent = common.work_parent();
    let free = procfs::free_bytes(&parent)?;
    if free < 2 * total {
        bail!(
            "not enough free space in {}: {} MiB free, {} MiB needed",
            parent.display(),
            free >> 20,
            (2 * total) >> 20
        );
    }
    let scratch = Scratch::create(&parent, "history")?;
    let machine = Machine::probe();
    println!(
        "conlog-bench history: {} of history (rotation at {} keeping {} backups), read from offset 0; {runs} run(s) each side, alternating",
        size(total),
        size(MAX_SIZE),
        MAX_BACKUPS
    );
    println!("machine: {machine}");
    println!(
        "scratch: {} on {}",
        scratch.0.display(),
        procfs::filesystem(&scratch.0)
    );
    println!("conlogd: {} ({})", conlogd.display(), version(&conlogd));

    let daemon = Daemon::start(&conlogd, &scratch.0.join("daemon"))?;
    let pid = daemon.pid();
    // The ready line reaches the kept tail just after the daemon is reported ready.
    let deadline = Instant::now() + Duration::from_secs(5);
    let tcp = loop {
        match tcp_address(&daemon.stderr_tail()) {
            Ok(tcp) => break tcp,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let pattern = Pattern::new(WRITE_CHUNK);
    let files = runtime.block_on(fill(&daemon, &pattern, total))?;
    // Warm the page cache for every side alike.
    let status = Command::new("cat")
        .args(&files)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("cat of the log files failed: {status}");
    }
    println!(
        "{} written and logged in {} files; daemon TCP {tcp}",
        size(total),
        files.len()
    );
    println!();

    let token = runtime.block_on(async {
        let mut agent = daemon.agent().await?;
        let token = agent
            .issue_token(IssueTokenRequest {
                guest: GUEST.into(),
                device: String::new(),
                access: Access::Read.into(),
                ttl_seconds: 3600,
            })
            .await
            .context("IssueToken")?
            .into_inner()
            .token;
        drop(agent);
        anyhow::Ok(Some(token))
    })?;

    let mut samples = Vec::new();
    for run in 1..=runs {
        let order = if run % 2 == 1 {
            [Target::Local, Target::Tcp, Target::Socat]
        } else {
            [Target::Socat, Target::Tcp, Target::Local]
        };
        for target in order {
            let sample = match target {
                Target::Socat => run_socat(&files, total)?,
                _ => runtime.block_on(run_conlogd(
                    &daemon,
                    pid,
                    target,
                    tcp,
                    token.as_deref(),
                    &pattern,
                    total,
                ))?,
            };
            println!(
                "run {run} {:<14} {:>8.1} MiB/s  {:.3} s  {} chunks  CPU {:.2} s  RSS {} → {} KiB  {}",
                target.name(),
                mib_per_s(sample.bytes, sample.seconds),
                sample.seconds,
                sample.chunks,
                sample.cpu.as_secs_f64(),
                sample.rss_before_kib,
                sample.rss_peak_kib,
                if sample.problems.is_empty() {
                    "ok".to_owned()
                } else {
                    format!("WRONG: {}", sample.problems.join("; "))
                }
            );
            samples.push(sample);
        }
    }
    daemon.stop()?;
    print_report(total, runs, &machine, &samples);
    Ok(if samples.iter().any(|s| !s.problems.is_empty()) {
        Verdict::Wrong
    } else {
        Verdict::Correct
    })
}

/// The daemon's TCP address from its ready line (`tcp=ADDR`).
fn tcp_address(stderr: &str) -> anyhow::Result<SocketAddr> {
    let line = stderr
        .lines()
        .find(|l| l.contains("conlogd ready"))
        .context("no ready line in the daemon's stderr")?;
    let start = line.find("tcp=").context("no tcp= in the ready line")? + 4;
    line[start..]
        .split_whitespace()
        .next()
        .context("empty tcp=")?
        .parse()
        .context("bad tcp= address")
}

/// Writes `total` bytes through a new log pipe and waits until they are logged; the stream's
/// files, oldest first.
async fn fill(daemon: &Daemon, pattern: &Pattern, total: u64) -> anyhow::Result<Vec<PathBuf>> {
    let mut agent = daemon.agent().await?;
    let created = agent
        .create_log_pipe(CreateLogPipeRequest {
            guest: GUEST.into(),
            stream: STREAM.into(),
            limits: Some(LogLimits {
                max_size: Some(MAX_SIZE),
                max_backups: Some(MAX_BACKUPS),
                mode: LogMode::Rotate.into(),
            }),
        })
        .await
        .context("CreateLogPipe failed")?
        .into_inner();
    let fd = conlog::client::receive_pipe(Path::new(&created.fd_socket), &created.handoff_token)
        .context("cannot claim the pipe from fd.sock")?;
    let writer = std::thread::spawn({
        let mut file = File::from(fd);
        let pattern = Pattern::new(WRITE_CHUNK);
        move || pattern.write(&mut file, total, WRITE_CHUNK)
    });
    // The pipe is written on a thread; poll meanwhile (the calls are cheap next to 1 GiB).
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))?
        .context("writing to the log pipe failed")?;
    let info = wait_stream(
        &mut agent,
        GUEST,
        STREAM,
        Duration::from_millis(5),
        "closed with every byte logged",
        |s| !s.open && s.offset >= total,
    )
    .await?;
    if info.offset != total || info.first_offset != 0 || info.dropped_bytes != 0 {
        bail!("after writing {total} bytes the stream is {info:?}; expected all of it on disk");
    }
    let log = PathBuf::from(&created.log_path);
    let mut files: Vec<PathBuf> = conlog::logfile::backups_of(&log, MAX_BACKUPS + 10)
        .into_iter()
        .rev()
        .map(|(path, _)| path)
        .collect();
    files.push(log);
    let on_disk: u64 = files
        .iter()
        .map(|f| fs::metadata(f).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    if on_disk != total {
        bail!("{on_disk} bytes in the log files, {total} written");
    }
    // Spot-check the files against what was written.
    let mut first = vec![0u8; (1 << 20).min(total as usize)];
    File::open(&files[0])?.read_exact(&mut first)?;
    if let Err(at) = pattern.check(0, &first) {
        bail!("byte at offset {at} on disk differs from the byte written");
    }
    drop(agent);
    Ok(files)
}

#[allow(clippy::too_many_arguments)]
async fn run_conlogd(
    daemon: &Daemon,
    pid: u32,
    target: Target,
    tcp: SocketAddr,
    token: Option<&str>,
    pattern: &Pattern,
    total: u64,
) -> anyhow::Result<Sample> {
    let channel = match target {
        Target::Local => conlog::client::connect_local(&daemon.socket).await?,
        _ => Channel::from_shared(format!("http://{tcp}"))?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {tcp}"))?,
    };
    let mut client = ConsoleClient::new(channel).max_decoding_message_size(16 << 20);
    let mut request = tonic::Request::new(ReadHistoryRequest {
        guest: GUEST.into(),
        stream: STREAM.into(),
        start: Some(Start::FromOffset(0)),
        ..Default::default()
    });
    if let (Target::Tcp, Some(token)) = (target, token) {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    // Let the connection settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(50)).await;
    procfs::reset_peak_rss(pid)?;
    let rss_before_kib = procfs::rss_kib(pid)?;
    let cpu_before = procfs::cpu_time(pid)?;
    let sampler = RssSampler::start(pid, SAMPLE);
    let start = Instant::now();
    let mut chunks = client
        .read_history(request)
        .await
        .context("ReadHistory failed")?
        .into_inner();
    let mut problems = Vec::new();
    let mut next = 0u64;
    let mut count = 0u64;
    loop {
        let chunk = match chunks.message().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(status) => {
                problems.push(format!("stream failed at {next}: {status}"));
                break;
            }
        };
        if let Some(gap) = &chunk.gap {
            problems.push(format!("gap {}..{}", gap.from_offset, gap.to_offset));
            break;
        }
        if chunk.offset != next {
            problems.push(format!(
                "chunk at {} where {next} was expected",
                chunk.offset
            ));
            break;
        }
        if count.is_multiple_of(64) {
            if let Err(at) = pattern.check(chunk.offset, &chunk.data) {
                problems.push(format!("byte at offset {at} differs from the byte written"));
                break;
            }
        }
        next += chunk.data.len() as u64;
        count += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = procfs::cpu_time(pid)?.saturating_sub(cpu_before);
    let peak = sampler
        .finish()
        .max(procfs::status_kib(pid, "VmHWM").unwrap_or(0));
    if problems.is_empty() && next != total {
        problems.push(format!("{next} bytes received of {total}"));
    }
    drop(chunks);
    drop(client);
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(Sample {
        target,
        seconds,
        bytes: next,
        chunks: count,
        cpu,
        rss_before_kib,
        rss_peak_kib: peak,
        problems,
    })
}

/// `cat FILES | socat -u STDIN TCP:127.0.0.1:PORT` into a discarding reader of this process.
fn run_socat(files: &[PathBuf], total: u64) -> anyhow::Result<Sample> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, u64, Instant)> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; 64 << 10];
        let (mut bytes, mut reads) = (0u64, 0u64);
        loop {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                return Ok((bytes, reads, Instant::now()));
            }
            bytes += n as u64;
            reads += 1;
        }
    });
    let mut cat = Command::new("cat")
        .args(files)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cat")?;
    let cat_out = cat.stdout.take().expect("stdout is piped");
    let start = Instant::now();
    let mut socat = Command::new("socat")
        .args(["-u", "STDIN", &format!("TCP:127.0.0.1:{port}")])
        .stdin(cat_out)
        .spawn()
        .context("cannot start socat")?;
    let (cat_pid, socat_pid) = (cat.id(), socat.id());
    // CPU of both, read while they are still children not yet reaped (best effort).
    let mut cpu = Duration::ZERO;
    let outcome = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    for pid in [cat_pid, socat_pid] {
        // A zombie still has its CPU times in /proc until reaped.
        cpu += procfs::cpu_time(pid).unwrap_or_default();
    }
    let cat_status = cat.wait()?;
    let socat_status = socat.wait()?;
    let (bytes, reads, end) = outcome.context("the reader failed")?;
    let mut problems = Vec::new();
    if !cat_status.success() || !socat_status.success() {
        problems.push(format!("cat {cat_status}, socat {socat_status}"));
    }
    if bytes != total {
        problems.push(format!("{bytes} bytes received of {total}"));
    }
    Ok(Sample {
        target: Target::Socat,
        seconds: (end - start).as_secs_f64(),
        bytes,
        chunks: reads,
        cpu,
        rss_before_kib: 0,
        rss_peak_kib: 0,
        problems,
    })
}

fn print_report(total: u64, runs: u32, machine: &Machine, samples: &[Sample]) {
    let of = |target: Target| samples.iter().filter(move |s| s.target == target);
    let mib = |target: Target| {
        let values: Vec<f64> = of(target).map(|s| mib_per_s(s.bytes, s.seconds)).collect();
        median(&values)
    };
    let cpu = |target: Target| {
        let values: Vec<f64> = of(target).map(|s| s.cpu.as_secs_f64()).collect();
        median(&values)
    };
    let growth = |target: Target| {
        of(target)
            .map(|s| s.rss_peak_kib.saturating_sub(s.rss_before_kib))
            .max()
            .unwrap_or(0)
    };
    let base = mib(Target::Socat);
    let mut summary = Table::new(&[
        "measure",
        "MiB/s",
        "CPU s",
        "vs cat→socat",
        "target",
        "verdict",
        "daemon RSS growth KiB",
    ]);
    for target in [Target::Local, Target::Tcp, Target::Socat] {
        let value = mib(target);
        let conlog = target != Target::Socat;
        summary.row(vec![
            format!("{} (median of {runs})", target.name()),
            format!("{value:.0}"),
            format!("{:.2}", cpu(target)),
            format!("{:.2}×", value / base),
            if target == Target::Local {
                format!("≥ {TARGET_RATIO}×, RSS flat")
            } else {
                String::new()
            },
            if target == Target::Local {
                met(value / base >= TARGET_RATIO && growth(Target::Local) <= TARGET_RSS_GROWTH_KIB)
                    .into()
            } else {
                String::new()
            },
            if conlog {
                growth(target).to_string()
            } else {
                "-".into()
            },
        ]);
    }
    println!();
    print!("{}", summary.text());
    println!();
    println!("---- markdown ----");
    println!(
        "{} of history in {} rotated files read from offset 0, {runs} run(s) each side, alternating; page cache warm. Machine: {machine}.",
        size(total),
        total.div_ceil(MAX_SIZE)
    );
    println!();
    print!("{}", summary.markdown());
    println!("---- end ----");
}
