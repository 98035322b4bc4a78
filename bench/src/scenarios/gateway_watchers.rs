//! Scenario `gateway-watchers` (docs/performance.md, "Gateway fan-out"): N read-only watchers
//! of one console through one `conlog-gateway` (docs/gateway.md, "Fan-out").
//!
//! A TLS conlogd with one console, its token key derived from a cluster key, and a
//! `conlog-gateway` beside its binary in front of it (mutual TLS towards the node, limits raised
//! for one peer with `--watchers` calls). `--watchers` `WatchConsole` READ_ONLY calls, each on
//! its own TLS connection (as browsers would), attach through the gateway; then the bench plays
//! QEMU and writes `--size` bytes of console text at `--rate`. Every watcher checks each byte it
//! receives against what was written and counts the gaps it is told of (`lagged`).
//!
//! Measured: what the node serves (its `ListGuests` clients: one is right, anything else is
//! WRONG), how many watchers got every byte (a watcher told of a gap did not keep up: counted,
//! not failed; one that neither got every byte nor was told of a gap, or got a wrong byte, is
//! WRONG), the gateway's resident memory before the watchers attached (one watcher holding the
//! shared stream open) and with all of them attached, idle and after the output (peak),
//! and from those the memory per watcher; the gateway's and the node's CPU time.
//!
//! Baseline, same run (`--direct`, on by default): the same watchers straight at the node
//! (`limits.clients_per_console` raised), so the node's memory and CPU per watcher without
//! the gateway stand beside them.

use crate::common::{self, wait_stream};
use crate::data::Pattern;
use crate::procfs;
use crate::report::{self, size, Table, Verdict};
use crate::scenario::{Bench, Scenario};
use anyhow::{bail, Context};
use conlog::config::ByteSize;
use conlog::proto::console_client::ConsoleClient;
use conlog::proto::server_frame::Frame;
use conlog::proto::{attach::Mode, Access, WatchConsoleRequest};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::fs;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const GUEST: &str = "bench";
const DEVICE: &str = "serial0";
/// Guest write size.
const GUEST_WRITE: usize = 4096;
/// After the last byte is written, how long watchers get to take it.
const CATCH_UP: Duration = Duration::from_secs(60);

/// Options of `conlog-bench gateway-watchers`.
#[derive(clap::Args)]
pub struct GatewayWatchersArgs {
    /// Read-only watchers [default: 1000, or 100 with --quick].
    #[arg(long)]
    watchers: Option<usize>,
    /// Bytes the guest writes [default: 4MiB, or 512KiB with --quick].
    #[arg(long, value_parser = ByteSize::parse)]
    size: Option<ByteSize>,
    /// Bytes per second the guest writes [default: 128KiB].
    #[arg(long, value_parser = ByteSize::parse)]
    rate: Option<ByteSize>,
    /// Skip the baseline (the same watchers straight at the node).
    #[arg(long)]
    no_direct: bool,
}

impl Scenario for GatewayWatchersArgs {
    const NAME: &'static str = "gateway-watchers";

    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict> {
        run(bench, self)
    }
}

/// Where the watchers attach.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Gateway,
    Direct,
}

/// The certificates and configs of one run, in its directory.
struct Files {
    ca_pem: String,
    node_config: PathBuf,
    gateway_config: PathBuf,
    cluster_key: PathBuf,
}

impl Files {
    /// A CA, a server certificate for `localhost` and `127.0.0.1` (the node's and the
    /// gateway's; also the gateway's client identity, which the node does not ask for), a
    /// cluster key and both configs, limits raised for `watchers` calls from one peer.
    fn create(dir: &Path, watchers: usize) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let dir = fs::canonicalize(dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "conlog-bench CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "conlog-bench server");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let (cert_path, key_path, ca_path) = (
            dir.join("server.pem"),
            dir.join("server.key"),
            dir.join("ca.pem"),
        );
        fs::write(&ca_path, ca.pem())?;
        fs::write(&cert_path, cert.pem())?;
        fs::write(&key_path, key.serialize_pem())?;
        let calls = watchers + 64;
        let node_config = dir.join("conlogd.yaml");
        fs::write(
            &node_config,
            format!(
                "listen: 127.0.0.1:0\ntls:\n  cert: {cert}\n  key: {key}\nlimits:\n  \
                 clients_per_console: {clients}\n  tcp_connections: {calls}\n  \
                 connections_per_peer: {calls}\n  remote_calls_total: {calls}\n  \
                 calls_per_peer: {calls}\n  calls_per_guest: {calls}\n",
                cert = cert_path.display(),
                key = key_path.display(),
                // Remote clients get three quarters of the console's places.
                clients = calls * 4 / 3 + 8,
            ),
        )?;
        let cluster_key = dir.join("cluster.key");
        fs::write(&cluster_key, format!("{}\n", "5a".repeat(32)))?;
        let gateway_config = dir.join("gateway.yaml");
        fs::write(
            &gateway_config,
            format!(
                "gateway:\n  listen: 127.0.0.1:0\n  tls:\n    cert: {cert}\n    key: {key}\n  \
                 upstream:\n    ca: {ca}\n    cert: {cert}\n    key: {key}\n  \
                 cluster_key: {cluster}\n  limits:\n    tcp_connections: {calls}\n    \
                 connections_per_peer: {calls}\n    calls_total: {calls}\n    \
                 calls_per_peer: {calls}\n    calls_per_guest: {calls}\n  fanout:\n    \
                 watchers_per_stream: {calls}\n",
                cert = cert_path.display(),
                key = key_path.display(),
                ca = ca_path.display(),
                cluster = cluster_key.display(),
            ),
        )?;
        Ok(Self {
            ca_pem: ca.pem(),
            node_config,
            gateway_config,
            cluster_key,
        })
    }
}

/// A running `conlog-gateway`; killed on drop.
struct GatewayProcess {
    child: Child,
    address: SocketAddr,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Provisions the node on `tcp` (serving `dir`) with the token key derived from the cluster
/// key, and starts `conlog-gateway` beside the conlogd binary.
fn start_gateway(
    bench: &Bench,
    daemon: &crate::daemon::Daemon,
    dir: &Path,
    tcp: SocketAddr,
    files: &Files,
) -> anyhow::Result<GatewayProcess> {
    let key =
        conlog::tokens::ClusterKey::load(&files.cluster_key)?.node_key_file(&tcp.to_string())?;
    let state = dir.join("data/state");
    fs::write(state.join("token.key.provisioned"), key)?;
    fs::rename(state.join("token.key.provisioned"), state.join("token.key"))?;
    let hup = Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()?;
    if !hup.success() {
        bail!("kill -HUP failed: {hup}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.stderr_tail().contains("token key replaced") {
        if Instant::now() > deadline {
            bail!("the daemon did not take its provisioned key");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let binary = bench.conlogd.with_file_name("conlog-gateway");
    let mut child = Command::new(&binary)
        .arg("--config")
        .arg(&files.gateway_config)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("piped")).lines();
    let address: SocketAddr = loop {
        let Some(line) = lines.next() else {
            bail!("conlog-gateway exited before it was ready");
        };
        let line = line?;
        if let (true, Some(at)) = (line.contains("conlog-gateway ready"), line.find(" tcp=")) {
            break line[at + 5..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .parse()?;
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok(GatewayProcess { child, address })
}

/// A writer that keeps to `rate` bytes per second (sleeping before a write that would be
/// early): a guest printing at a given speed.
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
            std::thread::sleep(early);
        }
        let n = self.inner.write(data)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// What one watcher saw.
#[derive(Default)]
struct Seen {
    /// Every byte from its attach to the end.
    complete: bool,
    lagged: bool,
    /// A wrong byte, a frame out of order, or the stream ended early.
    problem: Option<String>,
}

/// Reads one watcher's frames until it has everything up to `total` (or a gap is reported,
/// or the stream ends), checking every byte.
async fn watch_all(
    mut frames: tonic::Streaming<conlog::proto::ServerFrame>,
    pattern: Arc<Pattern>,
    total: u64,
) -> Seen {
    let mut seen = Seen::default();
    let mut next = match frames.message().await {
        Ok(Some(conlog::proto::ServerFrame {
            frame: Some(Frame::Attached(a)),
        })) => a.offset,
        other => {
            seen.problem = Some(format!("first frame: {other:?}"));
            return seen;
        }
    };
    while next < total {
        match frames.message().await {
            Ok(Some(frame)) => match frame.frame {
                Some(Frame::Output(out)) => {
                    if out.offset != next {
                        seen.problem =
                            Some(format!("output at {} where {next} was due", out.offset));
                        return seen;
                    }
                    if let Err(at) = pattern.check(out.offset, &out.data) {
                        seen.problem = Some(format!("wrong byte at {at}"));
                        return seen;
                    }
                    next += out.data.len() as u64;
                }
                Some(Frame::Lagged(l)) => {
                    seen.lagged = true;
                    next = l.to_offset;
                }
                _ => {}
            },
            Ok(None) => {
                seen.problem = Some(format!("the stream ended at {next}"));
                return seen;
            }
            Err(status) => {
                seen.problem = Some(format!("the stream ended at {next}: {status}"));
                return seen;
            }
        }
    }
    seen.complete = !seen.lagged;
    seen
}

/// One run's figures.
struct Figures {
    target: Target,
    watchers: usize,
    node_clients: u32,
    complete: usize,
    lagged: usize,
    seconds: f64,
    /// Resident memory (KiB) of the process the watchers talk to: with one watcher, with all
    /// attached (idle), and at its peak after the output.
    rss_one: u64,
    rss_attached: u64,
    rss_peak: u64,
    server_cpu: Duration,
    node_cpu: Duration,
    problems: Vec<String>,
}

fn run(bench: &Bench, args: &GatewayWatchersArgs) -> anyhow::Result<Verdict> {
    let watchers = bench.size(args.watchers, 100, 1000).max(1);
    let total = bench.size(args.size.map(ByteSize::bytes), 512 << 10, 4 << 20);
    let rate = args.rate.map_or(128 << 10, ByteSize::bytes).max(1);
    let nofile = procfs::raise_nofile();
    if nofile < (watchers as u64) * 3 + 256 {
        bail!(
            "RLIMIT_NOFILE is {nofile}: {watchers} watchers over TLS need about {}",
            watchers * 3 + 256
        );
    }
    println!(
        "conlog-bench gateway-watchers: {watchers} read-only WatchConsole watchers, one TLS connection each; the guest writes {} at {}/s",
        size(total),
        size(rate)
    );
    println!(
        "machine: {} (node, gateway, guest and watchers all share it)",
        bench.machine
    );
    println!("conlogd: {}", bench.conlogd_text());
    println!();
    // Watchers decode on two threads, apart from the skeleton's runtime.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut figures = vec![measure(
        bench,
        &runtime,
        Target::Gateway,
        watchers,
        total,
        rate,
    )?];
    if !args.no_direct {
        figures.push(measure(
            bench,
            &runtime,
            Target::Direct,
            watchers,
            total,
            rate,
        )?);
    }
    let mut table = Table::new(&[
        "target",
        "watchers",
        "node clients",
        "got every byte",
        "lagged",
        "RSS, 1 watcher (MiB)",
        "RSS, all attached (MiB)",
        "RSS peak (MiB)",
        "per watcher",
        "server CPU",
        "node CPU",
        "outcome",
    ]);
    let mut wrong = false;
    for f in &figures {
        wrong |= !f.problems.is_empty();
        let per_watcher = f.rss_peak.saturating_sub(f.rss_one) as f64 / f.watchers as f64;
        table.row(vec![
            match f.target {
                Target::Gateway => "gateway".into(),
                Target::Direct => "node direct".into(),
            },
            f.watchers.to_string(),
            f.node_clients.to_string(),
            f.complete.to_string(),
            f.lagged.to_string(),
            report::mib(f.rss_one),
            report::mib(f.rss_attached),
            report::mib(f.rss_peak),
            format!("{per_watcher:.1} KiB"),
            format!("{:.2} s", f.server_cpu.as_secs_f64()),
            format!("{:.2} s", f.node_cpu.as_secs_f64()),
            report::outcome(&f.problems),
        ]);
        println!(
            "{}: {:.1} s from the first write until every watcher had its last byte",
            match f.target {
                Target::Gateway => "gateway",
                Target::Direct => "node direct",
            },
            f.seconds
        );
    }
    println!();
    println!("{}", table.text());
    println!("RSS: of the gateway (target gateway) or the node (node direct); per watcher: (peak - with 1 watcher) / watchers. server CPU: the gateway's or the node's over the run.");
    report::print_markdown(None, &[&table]);
    Ok(Verdict::wrong_if(wrong))
}

/// One run: a node (and a gateway), `watchers` watchers, the output, the figures.
fn measure(
    bench: &Bench,
    runtime: &tokio::runtime::Runtime,
    target: Target,
    watchers: usize,
    total: u64,
    rate: u64,
) -> anyhow::Result<Figures> {
    let dir = bench.scratch.path().join(match target {
        Target::Gateway => "gateway",
        Target::Direct => "direct",
    });
    let files = Files::create(&dir.join("tls"), watchers)?;
    let config = files.node_config.to_string_lossy().into_owned();
    let node = bench.start_with(&dir, &["--config", &config])?;
    let tcp: SocketAddr = node.ready_field("tcp")?.parse()?;
    let gateway = match target {
        Target::Gateway => Some(start_gateway(bench, &node, &dir, tcp, &files)?),
        Target::Direct => None,
    };
    let (address, server_pid) = match &gateway {
        Some(g) => (g.address, g.child.id()),
        None => (tcp, node.pid()),
    };
    let pattern = Arc::new(Pattern::new(GUEST_WRITE));
    let mut problems = Vec::new();
    let (guest, token) = runtime.block_on(async {
        let mut agent = node.agent().await?;
        let (guest, _) = common::create_console(&mut agent, GUEST, DEVICE, None).await?;
        let token = common::issue_token(&mut agent, GUEST, Access::Read).await?;
        anyhow::Ok((guest, token))
    })?;
    let endpoint = Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&files.ca_pem))
                .domain_name("localhost"),
        )?
        .connect_timeout(Duration::from_secs(10));
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    let open = |endpoint: Endpoint| {
        let bearer = bearer.clone();
        async move {
            let channel = endpoint.connect().await?;
            let mut request = tonic::Request::new(WatchConsoleRequest {
                guest: GUEST.into(),
                mode: Mode::ReadOnly.into(),
                ..Default::default()
            });
            request.metadata_mut().insert("authorization", bearer);
            let frames = ConsoleClient::new(channel)
                .watch_console(request)
                .await?
                .into_inner();
            anyhow::Ok(frames)
        }
    };
    // One watcher first: with the gateway, it holds the shared stream (and its ring) open.
    let first = runtime.block_on(open(endpoint.clone()))?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_one = procfs::rss_kib(server_pid)?;
    let mut streams = vec![first];
    for _ in 1..watchers {
        streams.push(runtime.block_on(open(endpoint.clone()))?);
    }
    let node_clients = runtime.block_on(async {
        let mut agent = node.agent().await?;
        let info = wait_stream(
            &mut agent,
            GUEST,
            DEVICE,
            Duration::from_millis(50),
            "attached",
            |s| target == Target::Gateway || s.clients as usize == watchers,
        )
        .await?;
        anyhow::Ok(info.clients)
    })?;
    if target == Target::Gateway && node_clients != 1 {
        problems.push(format!("the node serves {node_clients} clients, not one"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_attached = procfs::rss_kib(server_pid)?;
    let (server_cpu0, node_cpu0) = (procfs::cpu_time(server_pid)?, procfs::cpu_time(node.pid())?);
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|frames| runtime.spawn(watch_all(frames, pattern.clone(), total)))
        .collect();
    let start = Instant::now();
    let writer = {
        let pattern = pattern.clone();
        std::thread::spawn(move || {
            let mut paced = Paced {
                inner: guest,
                rate,
                start: Instant::now(),
                written: 0,
            };
            pattern.write(&mut paced, total, GUEST_WRITE)
        })
    };
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the guest thread panicked"))??;
    let seen = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        let mut seen = Vec::new();
        for task in tasks {
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(s)) => seen.push(s),
                Ok(Err(e)) => seen.push(Seen {
                    problem: Some(format!("watcher task: {e}")),
                    ..Seen::default()
                }),
                Err(_) => seen.push(Seen {
                    problem: Some("did not get every byte in time".into()),
                    ..Seen::default()
                }),
            }
        }
        seen
    });
    let seconds = start.elapsed().as_secs_f64();
    let rss_peak = procfs::status_kib(server_pid, "VmHWM")?.max(procfs::rss_kib(server_pid)?);
    let server_cpu = procfs::cpu_time(server_pid)?.saturating_sub(server_cpu0);
    let node_cpu = procfs::cpu_time(node.pid())?.saturating_sub(node_cpu0);
    let complete = seen.iter().filter(|s| s.complete).count();
    let lagged = seen.iter().filter(|s| s.lagged).count();
    let mut wrong: Vec<_> = seen.iter().filter_map(|s| s.problem.clone()).collect();
    if !wrong.is_empty() {
        let count = wrong.len();
        wrong.truncate(3);
        problems.push(format!("{count} watchers: {}", wrong.join("; ")));
    }
    drop(gateway);
    node.stop()?;
    Ok(Figures {
        target,
        watchers,
        node_clients,
        complete,
        lagged,
        seconds,
        rss_one,
        rss_attached,
        rss_peak,
        server_cpu,
        node_cpu,
        problems,
    })
}
