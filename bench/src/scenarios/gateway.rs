//! Scenario `gateway` (docs/performance.md, "Gateway"): `conlog-gateway` in front of one node
//! against the same calls made directly to the node's TLS listener, in the same run.
//!
//! Setup: one conlogd with TLS (the `history` scenario's certificates: a CA, a server
//! certificate for `localhost` and `127.0.0.1`), its token key derived from a cluster key and
//! taken with SIGHUP, and a `conlog-gateway` in front of it calling it over TLS (the same
//! certificate as its client identity). A log pipe `bench/qemu` filled with `--size` bytes
//! (rotating at 64 MiB; read once by the daemon's writer, so in the page cache), and consoles
//! `echo-N/serial0` whose guest end is a thread of this process writing back every byte.
//!
//! Measured, direct to the node and through the gateway taking turns (reversed every other
//! run), every client a tonic client of this process with tonic's default settings:
//! - `ReadHistory` of the whole log from offset 0, without follow: MiB/s, and the user +
//!   system CPU (`/proc/PID/stat`) per GiB of the node, of the gateway and of the client
//!   (this process: TLS, HTTP/2 and decoding). The connection is made before the clock
//!   starts; every chunk must start where the previous ended, every 64th is checked against
//!   the bytes written.
//! - With `--pin`, the same two reads again in each run with the node and this process (the
//!   client, all its threads) pinned to CPU 0 and the gateway to CPU 1 (`taskset -a -p` on
//!   every thread of each process, undone afterwards): a gateway on a machine of its own, as
//!   deployed, rather than sharing the node's and the client's CPUs. Both ratios are reported.
//! - Console echo latency: an `AttachConsole` READ_WRITE client sends one byte, the echoing
//!   guest writes it back, and the clock stops when the `Output` frame holding it arrives;
//!   `--round-trips` after 50 of warm-up; p50 and p99.
//! - The gateway at rest and per active session: its VmRSS and CPU over `--settle` with no call
//!   in progress, then with `--sessions` attached sessions (each on its own console, typing one
//!   byte every 100 ms and reading its echo) plus as many `ReadHistory` follow streams of
//!   those consoles (each getting every echoed byte); RSS growth and CPU per session, where a
//!   session is one attach plus one follow.
//!
//! WRONG: a history read that misses, repeats or alters a byte, an echo that does not come
//! back as sent, a follow stream that falls behind its console's echoes.

use super::history::{fill, start_gateway, GatewayProcess, TlsFiles, GUEST, STREAM};
use crate::common::{self, hang_up, wait_stream, DEADLINE};
use crate::daemon::Daemon;
use crate::data::Pattern;
use crate::procfs;
use crate::report::{self, median, met, mib_per_s, percentile, size, Table, Verdict};
use crate::scenario::{alternate, Bench, Scenario};
use anyhow::{bail, Context};
use conlog::config::ByteSize;
use conlog::proto::console_client::ConsoleClient;
use conlog::proto::server_frame::Frame;
use conlog::proto::{
    attach::Mode, client_frame, read_history_request::Start, Access, Attach, ClientFrame, Input,
    ReadHistoryRequest,
};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// ReadHistory through the gateway against direct (docs/gateway.md).
const TARGET_RATIO: f64 = 0.7;
/// Echo round trips before the measured ones.
const WARM_UP: usize = 50;
/// How often each active session types a byte.
const TYPING: Duration = Duration::from_millis(100);

/// Options of `conlog-bench gateway`.
#[derive(clap::Args)]
pub struct GatewayArgs {
    /// History read per run [default: 512MiB, or 32MiB with --quick].
    #[arg(long, value_parser = ByteSize::parse)]
    size: Option<ByteSize>,
    /// Runs of each side [default: 3, or 1 with --quick].
    #[arg(long)]
    runs: Option<u32>,
    /// Echo round trips per side and run [default: 1000, or 100 with --quick].
    #[arg(long)]
    round_trips: Option<usize>,
    /// Active sessions (an attach and a follow each) [default: 50, or 5 with --quick].
    #[arg(long)]
    sessions: Option<usize>,
    /// How long the gateway is watched at rest and with the sessions [default: 10s, or 2s
    /// with --quick].
    #[arg(long, value_parser = conlog::config::HumanDuration::parse)]
    settle: Option<conlog::config::HumanDuration>,
    /// The gateway's `gateway.upstream.stream_window` [default: the gateway's default].
    #[arg(long, value_parser = ByteSize::parse)]
    stream_window: Option<ByteSize>,
    /// Also read with the node and the client pinned to CPU 0 and the gateway to CPU 1 (as
    /// if the gateway ran on a machine of its own), in the same runs as the unpinned reads.
    #[arg(long)]
    pin: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Direct,
    Gateway,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct tls",
            Path::Gateway => "gateway tls",
        }
    }
}

/// The processes and what a client needs.
struct Setup {
    daemon: Daemon,
    gateway: GatewayProcess,
    tls: TlsFiles,
    node: SocketAddr,
    read_token: String,
    /// The echo consoles' guests and read-write tokens.
    echo: Vec<(String, String)>,
}

impl Setup {
    fn address(&self, path: Path) -> SocketAddr {
        match path {
            Path::Direct => self.node,
            Path::Gateway => self.gateway.1,
        }
    }

    fn gateway_pid(&self) -> u32 {
        self.gateway.0.id()
    }

    async fn connect(&self, path: Path) -> anyhow::Result<Channel> {
        let address = self.address(path);
        Endpoint::from_shared(format!("https://{address}"))?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&self.tls.ca_pem))
                    .domain_name("localhost"),
            )?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {address}"))
    }
}

fn with_token<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// CPU time of the node, the gateway and this process.
#[derive(Clone, Copy)]
struct Cpu {
    node: Duration,
    gateway: Duration,
    client: Duration,
}

impl Cpu {
    fn read(setup: &Setup) -> anyhow::Result<Self> {
        Ok(Self {
            node: procfs::cpu_time(setup.daemon.pid())?,
            gateway: procfs::cpu_time(setup.gateway_pid())?,
            client: procfs::cpu_time(std::process::id())?,
        })
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            node: self.node.saturating_sub(earlier.node),
            gateway: self.gateway.saturating_sub(earlier.gateway),
            client: self.client.saturating_sub(earlier.client),
        }
    }
}

struct ReadSample {
    path: Path,
    /// Read with the node and the client on CPU 0 and the gateway on CPU 1.
    pinned: bool,
    seconds: f64,
    bytes: u64,
    cpu: Cpu,
    problems: Vec<String>,
}

impl Scenario for GatewayArgs {
    const NAME: &'static str = "gateway";

    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict> {
        run(bench, self)
    }
}

fn run(bench: &Bench, args: &GatewayArgs) -> anyhow::Result<Verdict> {
    let total = bench.size(args.size.map(ByteSize::bytes), 32 << 20, 512 << 20);
    let runs = bench.size(args.runs, 1, 3).max(1);
    let round_trips = bench.size(args.round_trips, 100, 1000).max(1);
    let sessions = bench.size(args.sessions, 5, 50).max(1);
    let settle = bench.size(
        args.settle.map(|d| d.get()),
        Duration::from_secs(2),
        Duration::from_secs(10),
    );
    if total == 0 || total > 20 * (64 << 20) {
        bail!("--size must be between 1B and 1280MiB (what stays on disk)");
    }
    bench.ensure_free(2 * total, "")?;
    let scratch = bench.scratch.path();
    println!(
        "conlog-bench gateway: ReadHistory of {} ({runs} run(s) each side), {round_trips} echo round trips, {sessions} active sessions; direct to the node and through conlog-gateway, alternating",
        size(total)
    );
    println!("machine: {}", bench.machine);
    println!("conlogd: {}", bench.conlogd_text());

    let setup = start(bench, scratch, total, sessions, args.stream_window)?;
    let pattern = Pattern::new(super::history::WRITE_CHUNK);
    let mut problems = Vec::new();

    // Rest first: nothing has been called through the gateway yet but the setup's checks.
    let rest = watch_gateway(&setup, settle)?;
    println!(
        "gateway at rest: RSS {} KiB, CPU {:.3} % over {:?}",
        rest.rss_kib,
        rest.cpu_share * 100.0,
        settle
    );

    let all_cpus = if args.pin {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if cpus < 2 {
            bail!("--pin needs two CPUs (this process may use {cpus})");
        }
        Some(format!("0-{}", cpus - 1))
    } else {
        None
    };
    let mut reads = Vec::new();
    for run in 1..=runs {
        let sides = if all_cpus.is_some() {
            &[false, true][..]
        } else {
            &[false][..]
        };
        for &pinned in sides {
            if pinned {
                pin(&setup, "0", "1")?;
            }
            for path in alternate(run, [Path::Direct, Path::Gateway]) {
                let mut sample = bench
                    .runtime
                    .block_on(read_history(&setup, path, &pattern, total))?;
                sample.pinned = pinned;
                let per_gib =
                    |cpu: Duration| cpu.as_secs_f64() * (1u64 << 30) as f64 / total as f64;
                println!(
                    "run {run} ReadHistory {:<12}{} {:>7.1} MiB/s  CPU s/GiB: node {:.2}, gateway {:.2}, client {:.2}  {}",
                    path.name(),
                    if pinned { " pinned" } else { "" },
                    mib_per_s(sample.bytes, sample.seconds),
                    per_gib(sample.cpu.node),
                    per_gib(sample.cpu.gateway),
                    per_gib(sample.cpu.client),
                    report::outcome(&sample.problems)
                );
                problems.extend(sample.problems.iter().cloned());
                reads.push(sample);
            }
            if let (true, Some(all)) = (pinned, &all_cpus) {
                pin(&setup, all, all)?;
            }
        }
    }

    let mut echoes: Vec<(Path, Vec<f64>)> = Vec::new();
    for run in 1..=runs {
        for path in alternate(run, [Path::Direct, Path::Gateway]) {
            let micros = bench
                .runtime
                .block_on(echo_latency(&setup, path, round_trips))?;
            println!(
                "run {run} echo {:<12} p50 {:.0} µs  p99 {:.0} µs",
                path.name(),
                percentile(&micros, 0.5),
                percentile(&micros, 0.99)
            );
            echoes.push((path, micros));
        }
    }

    let active = bench
        .runtime
        .block_on(active_sessions(&setup, settle, &mut problems))?;
    println!(
        "gateway with {sessions} sessions: RSS {} KiB, CPU {:.2} %",
        active.rss_kib,
        active.cpu_share * 100.0
    );
    let after = watch_gateway(&setup, settle)?;
    println!(
        "gateway at rest again: RSS {} KiB, CPU {:.3} %",
        after.rss_kib,
        after.cpu_share * 100.0
    );

    print_report(&Report {
        total,
        runs,
        reads: &reads,
        echoes: &echoes,
        rest,
        active,
        after,
        sessions,
        settle,
    });
    let Setup {
        daemon, gateway, ..
    } = setup;
    drop(gateway);
    daemon.stop()?;
    if !problems.is_empty() {
        println!("WRONG: {}", problems.join("; "));
    }
    Ok(Verdict::wrong_if(!problems.is_empty()))
}

/// The TLS daemon with the history and the echo consoles, and the gateway in front of it.
fn start(
    bench: &Bench,
    scratch: &std::path::Path,
    total: u64,
    sessions: usize,
    stream_window: Option<ByteSize>,
) -> anyhow::Result<Setup> {
    let tls = TlsFiles::create(&scratch.join("tls"))?;
    if let Some(window) = stream_window {
        let text = std::fs::read_to_string(&tls.gateway_config)?;
        std::fs::write(
            &tls.gateway_config,
            text.replacen(
                "  upstream:\n",
                &format!("  upstream:\n    stream_window: {window}\n"),
                1,
            ),
        )?;
    }
    let dir = scratch.join("daemon");
    let config = tls.config.to_string_lossy().into_owned();
    let daemon = bench.start_with(&dir, &["--config", &config])?;
    let node: SocketAddr = daemon
        .ready_field("tcp")?
        .parse()
        .context("bad tcp= address in the ready line")?;
    let pattern = Pattern::new(super::history::WRITE_CHUNK);
    bench.runtime.block_on(fill(&daemon, &pattern, total))?;
    let gateway = start_gateway(bench, &daemon, &dir, node, &tls)?;
    let (read_token, echo) = bench.runtime.block_on(async {
        let mut agent = daemon.agent().await?;
        let read_token = common::issue_token(&mut agent, GUEST, Access::Read).await?;
        let mut echo = Vec::new();
        // One console for the latency runs, one per active session.
        for n in 0..=sessions {
            let guest = format!("echo-{n}");
            let limits = common::rotating(16 << 20, 1);
            let (end, _) = common::create_console(&mut agent, &guest, "", Some(limits)).await?;
            spawn_echo(end);
            wait_stream(
                &mut agent,
                &guest,
                "serial0",
                Duration::from_millis(5),
                "guest connected",
                |s| s.guest_connected,
            )
            .await?;
            let token = common::issue_token(&mut agent, &guest, Access::ReadWrite).await?;
            echo.push((guest, token));
        }
        hang_up(agent).await;
        anyhow::Ok((read_token, echo))
    })?;
    Ok(Setup {
        daemon,
        gateway,
        tls,
        node,
        read_token,
        echo,
    })
}

/// Sets the CPU affinity of every thread of the node and of this process (the client) to
/// `node_and_client`, and of the gateway to `gateway` (`taskset` CPU lists).
fn pin(setup: &Setup, node_and_client: &str, gateway: &str) -> anyhow::Result<()> {
    for (pid, cpus) in [
        (setup.daemon.pid(), node_and_client),
        (std::process::id(), node_and_client),
        (setup.gateway_pid(), gateway),
    ] {
        let output = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .output()
            .context("cannot run taskset (util-linux) for --pin")?;
        if !output.status.success() {
            bail!(
                "taskset -a -p -c {cpus} {pid}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    Ok(())
}

/// A guest that writes back everything it reads, on its own thread, until EOF.
fn spawn_echo(mut stream: UnixStream) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buffer) {
            if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
    });
}

async fn read_history(
    setup: &Setup,
    path: Path,
    pattern: &Pattern,
    total: u64,
) -> anyhow::Result<ReadSample> {
    let channel = setup.connect(path).await?;
    let mut client = ConsoleClient::new(channel).max_decoding_message_size(16 << 20);
    let request = with_token(
        ReadHistoryRequest {
            guest: GUEST.into(),
            stream: STREAM.into(),
            start: Some(Start::FromOffset(0)),
            ..Default::default()
        },
        &setup.read_token,
    )?;
    // Let the connection settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = Cpu::read(setup)?;
    let start = Instant::now();
    let mut chunks = client
        .read_history(request)
        .await
        .context("ReadHistory failed")?
        .into_inner();
    let mut problems = Vec::new();
    let (mut next, mut count) = (0u64, 0u64);
    loop {
        let chunk = match chunks.message().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(status) => {
                problems.push(format!("{} stream failed at {next}: {status}", path.name()));
                break;
            }
        };
        if chunk.gap.is_some() || chunk.offset != next {
            problems.push(format!(
                "{}: chunk at {} ({:?}) where {next} was expected",
                path.name(),
                chunk.offset,
                chunk.gap
            ));
            break;
        }
        if count.is_multiple_of(64) {
            if let Err(at) = pattern.check(chunk.offset, &chunk.data) {
                problems.push(format!("{}: byte {at} differs", path.name()));
                break;
            }
        }
        next += chunk.data.len() as u64;
        count += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = Cpu::read(setup)?.since(before);
    if problems.is_empty() && next != total {
        problems.push(format!("{}: {next} bytes of {total}", path.name()));
    }
    drop(chunks);
    hang_up(client).await;
    Ok(ReadSample {
        path,
        pinned: false,
        seconds,
        bytes: next,
        cpu,
        problems,
    })
}

fn input_frame(data: &[u8]) -> ClientFrame {
    ClientFrame {
        frame: Some(client_frame::Frame::Input(Input {
            data: data.to_vec().into(),
        })),
    }
}

/// `AttachConsole` READ_WRITE (forced) of `guest` with `token` on `channel`: the input sender,
/// the frames after `attached`, and the offset output continues from.
async fn attach(
    channel: Channel,
    guest: &str,
    token: &str,
) -> anyhow::Result<(
    mpsc::Sender<ClientFrame>,
    tonic::Streaming<conlog::proto::ServerFrame>,
    u64,
)> {
    let (sender, receiver) = mpsc::channel(16);
    sender
        .send(ClientFrame {
            frame: Some(client_frame::Frame::Attach(Attach {
                guest: guest.into(),
                mode: Mode::ReadWrite.into(),
                force: true,
                ..Default::default()
            })),
        })
        .await
        .context("request stream closed")?;
    let mut frames = ConsoleClient::new(channel)
        .attach_console(with_token(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
            token,
        )?)
        .await
        .context("AttachConsole failed")?
        .into_inner();
    loop {
        match frames.message().await?.and_then(|f| f.frame) {
            Some(Frame::Attached(attached)) => return Ok((sender, frames, attached.offset)),
            Some(Frame::Guest(_)) => {}
            other => bail!("first ServerFrame is not attached: {other:?}"),
        }
    }
}

/// Waits for the output frame holding `byte` at `next`.
async fn echoed(
    frames: &mut tonic::Streaming<conlog::proto::ServerFrame>,
    byte: u8,
    next: u64,
) -> anyhow::Result<()> {
    loop {
        let frame = tokio::time::timeout(DEADLINE, frames.message())
            .await
            .context("no echo")??
            .and_then(|f| f.frame);
        match frame {
            Some(Frame::Output(out)) => {
                if out.offset != next || out.data[..] != [byte] {
                    bail!(
                        "echo: got {:?} at {}, expected {:?} at {next}",
                        out.data,
                        out.offset,
                        [byte]
                    );
                }
                return Ok(());
            }
            Some(Frame::Guest(_)) => {}
            other => bail!("echo: unexpected frame {other:?}"),
        }
    }
}

async fn echo_latency(setup: &Setup, path: Path, round_trips: usize) -> anyhow::Result<Vec<f64>> {
    let (guest, token) = &setup.echo[0];
    let channel = setup.connect(path).await?;
    let (input, mut frames, mut next) = attach(channel, guest, token).await?;
    let mut micros = Vec::with_capacity(round_trips);
    for i in 0..WARM_UP + round_trips {
        let byte = b"abcdefghijklmnopqrstuvwxyz"[i % 26];
        let start = Instant::now();
        input
            .send(input_frame(&[byte]))
            .await
            .context("input stream closed")?;
        echoed(&mut frames, byte, next)
            .await
            .with_context(|| format!("{} echo {i}", path.name()))?;
        next += 1;
        if i >= WARM_UP {
            micros.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(micros)
}

/// The gateway's resident memory at the end and its CPU share over a watch.
#[derive(Clone, Copy)]
struct Watch {
    rss_kib: u64,
    cpu_share: f64,
}

fn watch_gateway(setup: &Setup, settle: Duration) -> anyhow::Result<Watch> {
    let pid = setup.gateway_pid();
    let before = procfs::cpu_time(pid)?;
    std::thread::sleep(settle);
    let cpu = procfs::cpu_time(pid)?.saturating_sub(before);
    Ok(Watch {
        rss_kib: procfs::rss_kib(pid)?,
        cpu_share: cpu.as_secs_f64() / settle.as_secs_f64(),
    })
}

/// `--sessions` sessions through the gateway, each an attach typing one byte every
/// [`TYPING`] and a follow of the same console checking it sees every echoed byte; the
/// gateway watched over `settle` once all are under way.
async fn active_sessions(
    setup: &Setup,
    settle: Duration,
    problems: &mut Vec<String>,
) -> anyhow::Result<Watch> {
    let pid = setup.gateway_pid();
    let stop = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (guest, token) in &setup.echo[1..] {
        // Attach and follow share one connection, as a page or a client would.
        let channel = setup.connect(Path::Gateway).await?;
        let (input, mut frames, start) = attach(channel.clone(), guest, token).await?;
        let mut follow = ConsoleClient::new(channel)
            .read_history(with_token(
                ReadHistoryRequest {
                    guest: guest.clone(),
                    start: Some(Start::FromOffset(start)),
                    follow: true,
                    ..Default::default()
                },
                token,
            )?)
            .await
            .context("ReadHistory follow through the gateway")?
            .into_inner();
        let mut stopped = stop.1.clone();
        let guest = guest.clone();
        tasks.spawn(async move {
            let mut next = start;
            let mut followed = start;
            let mut every = tokio::time::interval(TYPING);
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = every.tick() => {}
                }
                let byte = b"0123456789"[(next % 10) as usize];
                input.send(input_frame(&[byte])).await?;
                echoed(&mut frames, byte, next).await?;
                next += 1;
                // The follow stream has every echoed byte, in order.
                while followed < next {
                    let chunk = tokio::time::timeout(DEADLINE, follow.message())
                        .await
                        .context("follow stalled")??
                        .context("follow ended")?;
                    if chunk.offset != followed || chunk.gap.is_some() {
                        bail!(
                            "{guest}: follow chunk at {} where {followed} was expected",
                            chunk.offset
                        );
                    }
                    followed += chunk.data.len() as u64;
                }
            }
            anyhow::Ok(())
        });
    }
    // Every session typed at least once before the watch starts.
    tokio::time::sleep(TYPING * 3).await;
    let before = procfs::cpu_time(pid)?;
    tokio::time::sleep(settle).await;
    let cpu = procfs::cpu_time(pid)?.saturating_sub(before);
    let rss_kib = procfs::rss_kib(pid)?;
    let _ = stop.0.send(true);
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.context("session task panicked")? {
            problems.push(format!("active session: {e:#}"));
        }
    }
    Ok(Watch {
        rss_kib,
        cpu_share: cpu.as_secs_f64() / settle.as_secs_f64(),
    })
}

struct Report<'a> {
    total: u64,
    runs: u32,
    reads: &'a [ReadSample],
    echoes: &'a [(Path, Vec<f64>)],
    rest: Watch,
    active: Watch,
    after: Watch,
    sessions: usize,
    settle: Duration,
}

fn print_report(r: &Report<'_>) {
    let per_gib =
        |cpu: Duration, bytes: u64| cpu.as_secs_f64() * (1u64 << 30) as f64 / bytes.max(1) as f64;
    let of = |path: Path, pinned: bool| {
        r.reads
            .iter()
            .filter(move |s| s.path == path && s.pinned == pinned)
    };
    let rate = |path: Path, pinned: bool| {
        median(
            &of(path, pinned)
                .map(|s| mib_per_s(s.bytes, s.seconds))
                .collect::<Vec<_>>(),
        )
    };
    let cpu = |path: Path, pinned: bool, pick: fn(&Cpu) -> Duration| {
        median(
            &of(path, pinned)
                .map(|s| per_gib(pick(&s.cpu), s.bytes))
                .collect::<Vec<_>>(),
        )
    };
    let mut reads = Table::new(&[
        "path",
        "MiB/s (median)",
        "runs",
        "node CPU s/GiB",
        "gateway CPU s/GiB",
        "client CPU s/GiB",
        "all CPU s/GiB",
        "vs direct",
    ]);
    let sides = if r.reads.iter().any(|s| s.pinned) {
        &[false, true][..]
    } else {
        &[false][..]
    };
    for (&pinned, path) in sides
        .iter()
        .flat_map(|p| [(p, Path::Direct), (p, Path::Gateway)])
    {
        let direct = rate(Path::Direct, pinned);
        let (node, gateway, client) = (
            cpu(path, pinned, |c| c.node),
            cpu(path, pinned, |c| c.gateway),
            cpu(path, pinned, |c| c.client),
        );
        let runs: Vec<String> = of(path, pinned)
            .map(|s| format!("{:.0}", mib_per_s(s.bytes, s.seconds)))
            .collect();
        let ratio = rate(path, pinned) / direct.max(1e-9);
        reads.row(vec![
            if pinned {
                format!(
                    "{}, pinned (node + client CPU 0, gateway CPU 1)",
                    path.name()
                )
            } else {
                format!("{}, shared CPUs", path.name())
            },
            format!("{:.0}", rate(path, pinned)),
            runs.join(" / "),
            format!("{node:.2}"),
            format!("{gateway:.2}"),
            format!("{client:.2}"),
            format!("{:.2}", node + gateway + client),
            match path {
                Path::Direct => "1.00×".into(),
                Path::Gateway => format!(
                    "{ratio:.2}× ({} ≥ {TARGET_RATIO}×)",
                    met(ratio >= TARGET_RATIO)
                ),
            },
        ]);
    }
    let mut echo = Table::new(&["path", "round trips", "p50 µs", "p99 µs", "p50 vs direct"]);
    let micros = |path: Path| -> Vec<f64> {
        r.echoes
            .iter()
            .filter(|(p, _)| *p == path)
            .flat_map(|(_, m)| m.iter().copied())
            .collect()
    };
    let direct_p50 = percentile(&micros(Path::Direct), 0.5);
    for path in [Path::Direct, Path::Gateway] {
        let all = micros(path);
        echo.row(vec![
            path.name().into(),
            all.len().to_string(),
            format!("{:.0}", percentile(&all, 0.5)),
            format!("{:.0}", percentile(&all, 0.99)),
            format!("{:.2}×", percentile(&all, 0.5) / direct_p50.max(1e-9)),
        ]);
    }
    let mut gateway = Table::new(&["gateway", "RSS KiB", "CPU %", "per session"]);
    let per = |kib: u64| kib.saturating_sub(r.rest.rss_kib) as f64 / r.sessions as f64;
    gateway.row(vec![
        "at rest".into(),
        r.rest.rss_kib.to_string(),
        format!("{:.3}", r.rest.cpu_share * 100.0),
        String::new(),
    ]);
    gateway.row(vec![
        format!(
            "{} sessions (attach typing every {} ms + follow)",
            r.sessions,
            TYPING.as_millis()
        ),
        r.active.rss_kib.to_string(),
        format!("{:.2}", r.active.cpu_share * 100.0),
        format!(
            "{:.0} KiB, {:.3} % CPU",
            per(r.active.rss_kib),
            (r.active.cpu_share - r.rest.cpu_share) * 100.0 / r.sessions as f64
        ),
    ]);
    gateway.row(vec![
        "at rest after".into(),
        r.after.rss_kib.to_string(),
        format!("{:.3}", r.after.cpu_share * 100.0),
        String::new(),
    ]);
    println!();
    println!(
        "ReadHistory of {} from offset 0, {} run(s) each side:",
        size(r.total),
        r.runs
    );
    print!("{}", reads.text());
    println!("\nConsole echo latency (one byte, AttachConsole READ_WRITE):");
    print!("{}", echo.text());
    println!(
        "\nThe gateway's memory and CPU (each watched {:?}):",
        r.settle
    );
    print!("{}", gateway.text());
    report::print_markdown(None, &[&reads, &echo, &gateway]);
}
