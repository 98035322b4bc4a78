//! Scenario `console` (docs/performance.md, "Console latency and fan-out throughput"): interactive console latency and guest throughput
//! with attached clients.
//!
//! Latency: the bench plays QEMU on the console's guest socket with an echoing guest (a thread
//! doing blocking `read` / `write_all`), and one `AttachConsole` READ_WRITE client over the
//! local UNIX socket sends one byte of input and waits for it to come back in an output frame:
//! client → daemon → guest → daemon → client. `--round-trips` of them after `--warm-up`.
//! Baseline, same run, same echoing guest thread: `socat UNIX-LISTEN:B UNIX-CONNECT:A` relays
//! between the guest listening on A and a client connected to B that writes one byte and reads
//! it back. The two alternate (conlogd first in odd runs).
//!
//! Throughput: for 0, 1, 10 and 100 attached READ_ONLY clients (tokio tasks of this process,
//! spread over a few HTTP/2 connections), a fresh daemon and a guest thread writing `--size`
//! bytes in 64 KiB writes as fast as the socket takes them; the clock runs from the first write
//! until `ListGuests` shows every byte logged. Every client checks that its output frames are
//! contiguous (or skipped exactly as a `lagged` frame says) and every byte it received against
//! what was written (a slice comparison, cheap beside the frame's decoding), so "complete"
//! means every byte, exactly. Clients that lagged are counted, not failed.
//!
//! Everything (daemon, guest thread, 100 clients) shares the machine: on 2 CPUs the clients'
//! work is taken from the daemon's.

use crate::common::{self, hang_up, wait_stream, DEADLINE};
use crate::data::Pattern;
use crate::procfs::{self, Machine};
use crate::report::{self, median, met, mib_per_s, percentile, size, Table, Verdict};
use crate::scenario::{alternate, Bench, Scenario};
use anyhow::{bail, Context};
use conlog::config::ByteSize;
use conlog::proto::agent_client::AgentClient;
use conlog::proto::console_client::ConsoleClient;
use conlog::proto::server_frame::Frame;
use conlog::proto::{attach::Mode, client_frame, Attach, ClientFrame, Input};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Streaming;

const GUEST: &str = "bench";
const DEVICE: &str = "serial0";
/// Guest write size in the throughput runs.
const GUEST_WRITE: usize = 64 << 10;
/// Clients attached in the throughput runs.
const CLIENT_COUNTS: [usize; 5] = [0, 1, 10, 100, 1000];
/// The client count the throughput target applies to.
const TARGET_CLIENTS: usize = 100;
/// HTTP/2 connections the clients are spread over (each under `limits.calls_per_connection`).
const CHANNELS: usize = 8;
/// After every byte is logged, how long clients get to catch up.
const CATCH_UP: Duration = Duration::from_secs(20);
/// Targets (docs/performance.md, "Console latency and fan-out throughput").
const TARGET_P99_RATIO: f64 = 1.5;
const TARGET_THROUGHPUT_RATIO: f64 = 0.8;

/// Options of `conlog-bench console`.
#[derive(clap::Args)]
pub struct ConsoleArgs {
    /// Echo round trips measured per run [default: 2000, or 200 with --quick].
    #[arg(long)]
    round_trips: Option<usize>,
    /// Round trips before measuring [default: 200, or 20 with --quick].
    #[arg(long)]
    warm_up: Option<usize>,
    /// Bytes the guest writes per throughput run [default: 1GiB, or 64MiB with --quick].
    #[arg(long, value_parser = ByteSize::parse)]
    size: Option<ByteSize>,
    /// Runs of each measurement [default: 1].
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Only the latency part.
    #[arg(long, conflicts_with = "throughput_only")]
    latency_only: bool,
    /// Only the throughput part.
    #[arg(long)]
    throughput_only: bool,
    /// Bytes per second the guest writes in the throughput runs [default: as fast as it can].
    /// At a rate clients can follow, the report shows whether every one got every byte.
    #[arg(long, value_parser = ByteSize::parse)]
    rate: Option<ByteSize>,
}

struct Settings {
    round_trips: usize,
    warm_up: usize,
    size: u64,
    runs: u32,
    latency: bool,
    throughput: bool,
    rate: Option<u64>,
}

/// A writer that keeps to `rate` bytes per second (sleeping before a write that would be
/// early), for a guest printing at a given speed.
struct Paced<W> {
    inner: W,
    rate: u64,
    start: Instant,
    written: u64,
}

impl<W: Write> Write for Paced<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let due = Duration::from_secs_f64(self.written as f64 / self.rate as f64);
        if let Some(early) = due.checked_sub(self.start.elapsed()) {
            thread::sleep(early);
        }
        let n = self.inner.write(data)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `limits.clients_per_console` for the runs (the default, 64, is below 100 clients).
const CLIENT_LIMIT: u32 = 1024;

/// A config file in `dir` raising the client limit, for `--config`.
fn with_client_limit(dir: &Path) -> anyhow::Result<String> {
    let config = dir.join("conlogd.yaml");
    fs::write(
        &config,
        format!("limits:\n  clients_per_console: {CLIENT_LIMIT}\n"),
    )?;
    Ok(config.to_string_lossy().into_owned())
}

/// A daemon on `dir` with the config of [`with_client_limit`].
fn start(bench: &Bench, config: &str, dir: &Path) -> anyhow::Result<crate::daemon::Daemon> {
    bench.start_with(dir, &["--config", config])
}

/// A guest that writes back everything it reads, on its own thread, until EOF.
fn spawn_echo(mut stream: UnixStream) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// Round-trip times of one latency run, microseconds.
struct Latencies {
    target: &'static str,
    micros: Vec<f64>,
}

impl Latencies {
    fn percentile(&self, q: f64) -> f64 {
        percentile(&self.micros, q)
    }
}

/// One throughput run.
struct Throughput {
    clients: usize,
    seconds: f64,
    daemon_cpu: Duration,
    /// Clients that saw every byte.
    complete: usize,
    /// Clients that got at least one `lagged` frame.
    lagged: usize,
    /// Bytes skipped over all clients.
    lagged_bytes: u64,
    /// Clients neither complete nor told they lagged when the run ended.
    incomplete: usize,
    /// Time from the first write until the last client had everything (complete clients only).
    clients_seconds: f64,
    problems: Vec<String>,
}

impl Scenario for ConsoleArgs {
    const NAME: &'static str = "console";

    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict> {
        run(bench, self)
    }
}

/// Runs the scenario and prints its report.
fn run(bench: &Bench, args: &ConsoleArgs) -> anyhow::Result<Verdict> {
    let runtime = &bench.runtime;
    let settings = Settings {
        round_trips: bench.size(args.round_trips, 200, 2000),
        warm_up: bench.size(args.warm_up, 20, 200),
        size: bench.size(args.size.map(ByteSize::bytes), 64 << 20, 1 << 30),
        runs: args.runs.max(1),
        latency: !args.throughput_only,
        throughput: !args.latency_only,
        rate: args.rate.map(ByteSize::bytes),
    };
    if settings.round_trips == 0 || settings.size == 0 {
        bail!("--round-trips and --size must be at least 1");
    }
    let scratch = bench.scratch.path();
    let config = with_client_limit(scratch)?;
    let machine = &bench.machine;
    println!(
        "conlog-bench console: latency {} round trips (+{} warm-up) vs socat; throughput {} in {} guest writes with {:?} clients; {} run(s)",
        settings.round_trips,
        settings.warm_up,
        size(settings.size),
        size(GUEST_WRITE as u64),
        CLIENT_COUNTS,
        settings.runs
    );
    println!("machine: {machine} (daemon, guest, clients and socat all share it)");
    println!(
        "conlogd: {} with limits.clients_per_console {CLIENT_LIMIT}",
        bench.conlogd_text()
    );
    println!();

    let mut latencies = Vec::new();
    let mut throughputs = Vec::new();
    for run in 1..=settings.runs {
        if settings.latency {
            for conlog_side in alternate(run, [true, false]) {
                let dir = scratch.join(format!("latency-{run}-{conlog_side}"));
                let sample = if conlog_side {
                    latency_conlogd(bench, &config, &dir, &settings)
                } else {
                    latency_socat(runtime, &dir, &settings)
                };
                let _ = fs::remove_dir_all(&dir);
                let sample = sample?;
                println!(
                    "run {run} latency {:<7} p50 {:>7.1} µs  p99 {:>7.1} µs  max {:>8.1} µs",
                    sample.target,
                    sample.percentile(0.5),
                    sample.percentile(0.99),
                    sample.percentile(1.0)
                );
                latencies.push(sample);
            }
        }
        if settings.throughput {
            for clients in CLIENT_COUNTS {
                let dir = scratch.join(format!("throughput-{run}-{clients}"));
                let sample = throughput_run(bench, &config, &dir, &settings, clients);
                let _ = fs::remove_dir_all(&dir);
                let sample = sample?;
                println!(
                    "run {run} throughput {:>3} clients {:>8.1} MiB/s  {:.3} s  daemon CPU {:.2} s  complete {}  lagged {} ({} skipped)  incomplete {}  all clients done {:.3} s  {}",
                    sample.clients,
                    mib_per_s(settings.size, sample.seconds),
                    sample.seconds,
                    sample.daemon_cpu.as_secs_f64(),
                    sample.complete,
                    sample.lagged,
                    size(sample.lagged_bytes),
                    sample.incomplete,
                    sample.clients_seconds,
                    report::outcome(&sample.problems)
                );
                throughputs.push(sample);
            }
        }
    }
    print_report(&settings, machine, &latencies, &throughputs);
    Ok(Verdict::wrong_if(
        throughputs.iter().any(|s| !s.problems.is_empty()),
    ))
}

fn input_frame(data: &[u8]) -> ClientFrame {
    ClientFrame {
        frame: Some(client_frame::Frame::Input(Input {
            data: data.to_vec().into(),
        })),
    }
}

fn attach_frame(mode: Mode) -> ClientFrame {
    ClientFrame {
        frame: Some(client_frame::Frame::Attach(Attach {
            guest: GUEST.into(),
            device: DEVICE.into(),
            mode: mode.into(),
            ..Default::default()
        })),
    }
}

/// `AttachConsole` on `channel`: the input sender and the server frames after `attached`, with
/// the attach offset.
async fn attach(
    channel: Channel,
    mode: Mode,
) -> anyhow::Result<(
    mpsc::Sender<ClientFrame>,
    Streaming<conlog::proto::ServerFrame>,
    u64,
)> {
    let (sender, receiver) = mpsc::channel(16);
    sender
        .send(attach_frame(mode))
        .await
        .context("request stream closed")?;
    let mut frames = ConsoleClient::new(channel)
        .attach_console(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .context("AttachConsole failed")?
        .into_inner();
    match frames.message().await?.and_then(|f| f.frame) {
        Some(Frame::Attached(attached)) => Ok((sender, frames, attached.offset)),
        other => bail!("first ServerFrame is not attached: {other:?}"),
    }
}

/// Creates the console `bench/serial0` with a bounded log; the guest's end of it.
async fn create_console(agent: &mut AgentClient<Channel>) -> anyhow::Result<UnixStream> {
    let limits = common::rotating(64 << 20, 1);
    let (guest, _) = common::create_console(agent, GUEST, DEVICE, Some(limits)).await?;
    Ok(guest)
}

fn latency_conlogd(
    bench: &Bench,
    config: &str,
    dir: &Path,
    settings: &Settings,
) -> anyhow::Result<Latencies> {
    let daemon = start(bench, config, dir)?;
    let micros = bench.runtime.block_on(async {
        let mut agent = daemon.agent().await?;
        let guest = create_console(&mut agent).await?;
        let echo = spawn_echo(guest.try_clone()?);
        wait_stream(
            &mut agent,
            GUEST,
            DEVICE,
            Duration::from_millis(5),
            "guest connected",
            |s| s.guest_connected,
        )
        .await?;
        let channel = conlog::client::connect_local(&daemon.socket).await?;
        let (input, mut frames, mut next) = attach(channel, Mode::ReadWrite).await?;
        let mut micros = Vec::with_capacity(settings.round_trips);
        for i in 0..settings.warm_up + settings.round_trips {
            let byte = b"abcdefghijklmnopqrstuvwxyz"[i % 26];
            let start = Instant::now();
            input
                .send(input_frame(&[byte]))
                .await
                .context("input stream closed")?;
            loop {
                let frame = tokio::time::timeout(DEADLINE, frames.message())
                    .await
                    .context("no echo")??
                    .and_then(|f| f.frame);
                match frame {
                    Some(Frame::Output(out)) => {
                        if out.offset != next || out.data[..] != [byte] {
                            bail!(
                                "echo {i}: got {:?} at {}, expected {:?} at {next}",
                                out.data,
                                out.offset,
                                [byte]
                            );
                        }
                        next += 1;
                        break;
                    }
                    Some(Frame::Guest(_)) => {}
                    other => bail!("echo {i}: unexpected frame {other:?}"),
                }
            }
            if i >= settings.warm_up {
                micros.push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
        drop(input);
        drop(frames);
        let _ = guest.shutdown(std::net::Shutdown::Both);
        let _ = echo.join();
        hang_up(agent).await;
        anyhow::Ok(micros)
    })?;
    daemon.stop()?;
    Ok(Latencies {
        target: "conlogd",
        micros,
    })
}

/// socat relaying UNIX-LISTEN:B ↔ UNIX-CONNECT:A, killed when dropped.
struct Socat(Child);

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn latency_socat(runtime: &Runtime, dir: &Path, settings: &Settings) -> anyhow::Result<Latencies> {
    fs::create_dir_all(dir)?;
    let guest_path = dir.join("guest.sock");
    let client_path = dir.join("client.sock");
    let listener = UnixListener::bind(&guest_path)?;
    let socat = Socat(
        Command::new("socat")
            .arg(format!("UNIX-LISTEN:{}", client_path.display()))
            .arg(format!("UNIX-CONNECT:{}", guest_path.display()))
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start socat (is it installed?)")?,
    );
    let micros = runtime.block_on(async {
        let mut client = {
            let deadline = Instant::now() + DEADLINE;
            loop {
                match tokio::net::UnixStream::connect(&client_path).await {
                    Ok(stream) => break stream,
                    Err(e) if Instant::now() > deadline => bail!("cannot connect to socat: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        };
        // socat connects to A once a client connected to B.
        let (guest, _) = listener.accept()?;
        let echo = spawn_echo(guest);
        let mut micros = Vec::with_capacity(settings.round_trips);
        let mut buffer = [0u8; 1];
        for i in 0..settings.warm_up + settings.round_trips {
            let byte = b"abcdefghijklmnopqrstuvwxyz"[i % 26];
            let start = Instant::now();
            client.write_all(&[byte]).await?;
            client.read_exact(&mut buffer).await?;
            if buffer[0] != byte {
                bail!("socat echo {i}: got {:?}, expected {byte:?}", buffer[0]);
            }
            if i >= settings.warm_up {
                micros.push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
        drop(client);
        let _ = echo.join();
        anyhow::Ok(micros)
    })?;
    drop(socat);
    Ok(Latencies {
        target: "socat",
        micros,
    })
}

/// What one throughput client saw.
#[derive(Default)]
struct ClientResult {
    bytes: u64,
    lagged_frames: u64,
    lagged_bytes: u64,
    complete: bool,
    done_at: Option<Instant>,
    problems: Vec<String>,
}

/// Reads every frame until offset `total` is reached (or the run is stopped).
async fn read_client(
    mut frames: Streaming<conlog::proto::ServerFrame>,
    mut next: u64,
    total: u64,
    pattern: Arc<Pattern>,
    stop: Arc<AtomicBool>,
) -> ClientResult {
    let mut result = ClientResult::default();
    while next < total {
        let message = tokio::select! {
            message = frames.message() => message,
            () = async {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            } => break,
        };
        let frame = match message {
            Ok(Some(frame)) => frame.frame,
            Ok(None) => {
                result.problems.push(format!("stream ended at {next}"));
                break;
            }
            Err(status) => {
                result
                    .problems
                    .push(format!("stream failed at {next}: {status}"));
                break;
            }
        };
        match frame {
            Some(Frame::Output(out)) => {
                if out.offset != next {
                    result.problems.push(format!(
                        "output frame at {} where {next} was expected",
                        out.offset
                    ));
                    break;
                }
                // Only the bytes below `total` are the pattern's (then the guest's trailer).
                let len = out.data.len() as u64;
                let ours =
                    usize::try_from((total - next).min(len)).expect("at most the chunk's length");
                if let Err(at) = pattern.check(out.offset, &out.data[..ours]) {
                    result
                        .problems
                        .push(format!("byte at offset {at} differs from the byte written"));
                    break;
                }
                next += len;
                result.bytes += ours as u64;
            }
            Some(Frame::Lagged(lagged)) => {
                if lagged.from_offset != next || lagged.to_offset < next {
                    result.problems.push(format!(
                        "lagged {}..{} where output stopped at {next}",
                        lagged.from_offset, lagged.to_offset
                    ));
                    break;
                }
                result.lagged_frames += 1;
                result.lagged_bytes += lagged.to_offset - lagged.from_offset;
                next = lagged.to_offset;
            }
            Some(Frame::Guest(_)) => {}
            other => {
                result.problems.push(format!("unexpected frame {other:?}"));
                break;
            }
        }
    }
    if next >= total {
        result.complete = result.lagged_frames == 0;
        result.done_at = Some(Instant::now());
    }
    result
}

fn throughput_run(
    bench: &Bench,
    config: &str,
    dir: &Path,
    settings: &Settings,
    clients: usize,
) -> anyhow::Result<Throughput> {
    let daemon = start(bench, config, dir)?;
    let pid = daemon.pid();
    let pattern = Arc::new(Pattern::new(GUEST_WRITE));
    let total = settings.size;
    let sample = bench.runtime.block_on(async {
        let mut agent = daemon.agent().await?;
        let guest = create_console(&mut agent).await?;
        wait_stream(
            &mut agent,
            GUEST,
            DEVICE,
            Duration::from_millis(5),
            "guest connected",
            |s| s.guest_connected,
        )
        .await?;
        let mut channels = Vec::new();
        for _ in 0..CHANNELS.min(clients) {
            channels.push(conlog::client::connect_local(&daemon.socket).await?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut senders = Vec::new();
        for i in 0..clients {
            let (sender, frames, offset) =
                attach(channels[i % channels.len()].clone(), Mode::ReadOnly).await?;
            if offset != 0 {
                bail!("client {i} attached at offset {offset}, expected 0");
            }
            senders.push(sender);
            tasks.push(tokio::spawn(read_client(
                frames,
                offset,
                total,
                pattern.clone(),
                stop.clone(),
            )));
        }
        wait_stream(
            &mut agent,
            GUEST,
            DEVICE,
            Duration::from_millis(5),
            "with every client attached",
            |s| s.clients as usize == clients,
        )
        .await?;

        // The guest: the bytes in 64 KiB writes, then a newline every 50 ms until stopped, so
        // a client that lagged at the very end is told so.
        let written = Arc::new(AtomicBool::new(false));
        let stop_guest = Arc::new(AtomicBool::new(false));
        let cpu_before = procfs::cpu_time(pid)?;
        let start = Instant::now();
        let rate = settings.rate;
        let writer = {
            let (pattern, written, stop_guest) =
                (pattern.clone(), written.clone(), stop_guest.clone());
            let mut guest = guest;
            thread::spawn(move || -> std::io::Result<()> {
                match rate {
                    None => pattern.write(&mut guest, total, GUEST_WRITE)?,
                    // Writes of a hundredth of a second's worth: a steady stream.
                    Some(rate) => {
                        let chunk = ((rate / 100) as usize).clamp(1, GUEST_WRITE);
                        let mut paced = Paced {
                            inner: &mut guest,
                            rate,
                            start: Instant::now(),
                            written: 0,
                        };
                        pattern.write(&mut paced, total, chunk)?
                    }
                }
                written.store(true, Ordering::Release);
                while !stop_guest.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(50));
                    guest.write_all(b"\n")?;
                }
                Ok(())
            })
        };
        while !written.load(Ordering::Acquire) {
            if start.elapsed() > DEADLINE {
                bail!("the guest could not write {total} bytes within {DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        wait_stream(
            &mut agent,
            GUEST,
            DEVICE,
            Duration::from_millis(1),
            "fully logged",
            |s| s.offset >= total,
        )
        .await?;
        let seconds = start.elapsed().as_secs_f64();
        let daemon_cpu = procfs::cpu_time(pid)?.saturating_sub(cpu_before);

        let catch_up = Instant::now() + CATCH_UP;
        while !tasks.iter().all(|t| t.is_finished()) && Instant::now() < catch_up {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await?);
        }
        stop_guest.store(true, Ordering::Relaxed);
        match writer.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("guest write failed: {e}"),
            Err(_) => bail!("guest thread panicked"),
        }
        drop(senders);
        drop(channels);
        hang_up(agent).await;

        let mut problems = Vec::new();
        for (i, r) in results.iter().enumerate() {
            for p in &r.problems {
                problems.push(format!("client {i}: {p}"));
            }
            if r.complete && r.bytes != total {
                problems.push(format!("client {i}: {} bytes of {total}", r.bytes));
            }
        }
        let clients_seconds = results
            .iter()
            .filter_map(|r| r.done_at)
            .max()
            .map_or(0.0, |t| (t - start).as_secs_f64());
        anyhow::Ok(Throughput {
            clients,
            seconds,
            daemon_cpu,
            complete: results.iter().filter(|r| r.complete).count(),
            lagged: results.iter().filter(|r| r.lagged_frames > 0).count(),
            lagged_bytes: results.iter().map(|r| r.lagged_bytes).sum(),
            incomplete: results
                .iter()
                .filter(|r| r.done_at.is_none() && r.lagged_frames == 0)
                .count(),
            clients_seconds,
            problems,
        })
    })?;
    daemon.stop()?;
    Ok(sample)
}

fn print_report(
    settings: &Settings,
    machine: &Machine,
    latencies: &[Latencies],
    throughputs: &[Throughput],
) {
    let mut summary = Table::new(&["measure", "value", "baseline", "ratio", "target", "verdict"]);
    if !latencies.is_empty() {
        let pooled = |target: &str| -> Vec<f64> {
            latencies
                .iter()
                .filter(|l| l.target == target)
                .flat_map(|l| l.micros.iter().copied())
                .collect()
        };
        let (c, s) = (pooled("conlogd"), pooled("socat"));
        let (c50, c99) = (percentile(&c, 0.5), percentile(&c, 0.99));
        let (s50, s99) = (percentile(&s, 0.5), percentile(&s, 0.99));
        summary.row(vec![
            "echo latency p50, µs (conlogd vs socat)".into(),
            format!("{c50:.1}"),
            format!("{s50:.1}"),
            format!("{:.2}×", c50 / s50),
            String::new(),
            String::new(),
        ]);
        summary.row(vec![
            "echo latency p99, µs (conlogd vs socat)".into(),
            format!("{c99:.1}"),
            format!("{s99:.1}"),
            format!("{:.2}×", c99 / s99),
            format!("≤ {TARGET_P99_RATIO}×"),
            met(c99 / s99 <= TARGET_P99_RATIO).into(),
        ]);
    }
    if !throughputs.is_empty() {
        let mib = |clients: usize| {
            let values: Vec<f64> = throughputs
                .iter()
                .filter(|t| t.clients == clients)
                .map(|t| mib_per_s(settings.size, t.seconds))
                .collect();
            median(&values)
        };
        let base = mib(0);
        for clients in CLIENT_COUNTS {
            let value = mib(clients);
            let lagged: usize = throughputs
                .iter()
                .filter(|t| t.clients == clients)
                .map(|t| t.lagged + t.incomplete)
                .max()
                .unwrap_or(0);
            // The target is set at 100 clients; 1,000 is reported as it comes.
            let targeted = clients == TARGET_CLIENTS;
            summary.row(vec![
                format!("guest throughput, MiB/s, {clients} clients ({lagged} lagged)"),
                format!("{value:.0}"),
                format!("{base:.0}"),
                format!("{:.2}×", value / base),
                if targeted {
                    format!("≥ {TARGET_THROUGHPUT_RATIO}×")
                } else {
                    String::new()
                },
                if targeted {
                    met(value / base >= TARGET_THROUGHPUT_RATIO).into()
                } else {
                    String::new()
                },
            ]);
        }
    }
    println!();
    print!("{}", summary.text());
    println!();
    let caption = format!(
        "Latency: {} echo round trips (after {} warm-up) per run, pooled over {} run(s); throughput: {} per run in {} guest writes, median of {} run(s). Machine: {machine}.",
        settings.round_trips,
        settings.warm_up,
        settings.runs,
        size(settings.size),
        size(GUEST_WRITE as u64),
        settings.runs
    );
    report::print_markdown(Some(&caption), &[&summary]);
}
