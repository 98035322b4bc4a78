//! Scenario `history` (docs/performance.md, "History streaming"): streaming a large history to a client that
//! discards it.
//!
//! Setup: a fresh daemon, a log pipe with rotation at 64 MiB keeping 20 backups (so 1 GiB stays
//! on disk), `--size` bytes written through it and waited for until logged. That daemon is then
//! stopped, and the log files are read once with `cat > /dev/null` so every side starts from the
//! page cache. A CA and a server certificate for `localhost` and `127.0.0.1` are made with
//! `rcgen` in the scratch directory.
//!
//! One daemon serves its TCP port either in plaintext or with TLS, so the reads are served by
//! daemons started on the filled directories (never the one that wrote them): a plaintext one
//! for the UNIX socket and TCP targets, one with `tls:` in its config for the TLS target. They
//! take turns on the same data directory: the same files, the same page cache pages, the same
//! binary, each having restored the stream from its state at start. Before a read the running
//! daemon is stopped and the other started when the target needs the other kind; with the
//! order of the targets reversed every other run, that is one switch per run.
//!
//! Measured, alternating per run:
//! - `ReadHistory` from offset 0 over the local UNIX socket, the client counting bytes and
//!   checking every chunk starts where the previous one ended (no gap); every 64th chunk's
//!   bytes are also checked against what was written. The clock runs from the call until the
//!   stream ends (the connection is made before).
//! - The same over the daemon's TCP listener (127.0.0.1), in plaintext.
//! - The same over TLS (tonic client trusting the generated CA, `localhost` as server name);
//!   the handshake is part of the connection, made and timed before the clock starts.
//! - Baseline: `cat <the log files, oldest first> | socat -u STDIN TCP:127.0.0.1:PORT` to a
//!   reader thread of this process that reads into a 64 KiB buffer and discards; the clock runs
//!   from spawning the pipeline until the reader sees EOF.
//!
//! CPU: the daemon's (or cat's and socat's) user + system time during the read, and this
//! process's (the client: decoding, TLS decryption, or the baseline's reader thread). The
//! daemon's VmRSS is sampled every 20 ms during its reads (and its VmHWM reset before); growth
//! is the peak minus the value before the read.

use crate::common::{self, hang_up, wait_stream};
use crate::daemon::Daemon;
use crate::data::Pattern;
use crate::procfs::{self, CpuShares, Machine, MachineCpu, RssSampler};
use crate::report::{self, median, met, mib_per_s, size, Table, Verdict};
use crate::scenario::{alternate, Bench, Scenario};
use anyhow::{bail, Context};
use conlog::config::ByteSize;
use conlog::proto::console_client::ConsoleClient;
use conlog::proto::{read_history_request::Start, Access, ReadHistoryRequest};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::fs::{self, File};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub(super) const GUEST: &str = "bench";
pub(super) const STREAM: &str = "qemu";
const MAX_SIZE: u64 = 64 << 20;
const MAX_BACKUPS: u32 = 20;
pub(super) const WRITE_CHUNK: usize = 128 << 10;
const SAMPLE: Duration = Duration::from_millis(20);
/// Targets (docs/performance.md, "History streaming").
const TARGET_RATIO: f64 = 0.5;
const TARGET_RSS_GROWTH_KIB: u64 = 4096;
/// Through the gateway against direct TLS to the node (docs/gateway.md).
const GATEWAY_RATIO: f64 = 0.7;

/// Options of `conlog-bench history`.
#[derive(clap::Args)]
pub struct HistoryArgs {
    /// History size [default: 1GiB, or 64MiB with --quick]; at most 21 × 64MiB stays on disk.
    #[arg(long, value_parser = ByteSize::parse)]
    size: Option<ByteSize>,
    /// Runs of each side [default: 2, or 1 with --quick].
    #[arg(long)]
    runs: Option<u32>,
    /// Instead: time to the first byte of `since_time` reads on a stream holding its full
    /// default history (docs/performance.md, "History by time").
    #[arg(long)]
    since_time: bool,
    /// With --since-time: calls of each kind [default: 500, or 50 with --quick].
    #[arg(long, requires = "since_time")]
    calls: Option<u32>,
    /// With --since-time: how long the history is written over [default: 60s, or 10s with
    /// --quick].
    #[arg(long, requires = "since_time", value_parser = conlog::config::HumanDuration::parse)]
    duration: Option<conlog::config::HumanDuration>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Local,
    Tcp,
    Tls,
    /// Through a `conlog-gateway` (TLS to it, mutual TLS to the TLS daemon; docs/gateway.md).
    Gateway,
    Socat,
}

impl Target {
    const ALL: [Target; 5] = [
        Target::Local,
        Target::Tcp,
        Target::Tls,
        Target::Gateway,
        Target::Socat,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Local => "conlogd unix",
            Target::Tcp => "conlogd tcp",
            Target::Tls => "conlogd tls",
            Target::Gateway => "gateway tls",
            Target::Socat => "cat→socat tcp",
        }
    }

    /// The kind of daemon that serves it (none for the baseline).
    fn mode(self) -> Option<Mode> {
        match self {
            Target::Local | Target::Tcp => Some(Mode::Plain),
            Target::Tls | Target::Gateway => Some(Mode::Tls),
            Target::Socat => None,
        }
    }
}

/// How a daemon serves its TCP port.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    Tls,
}

struct Sample {
    target: Target,
    seconds: f64,
    bytes: u64,
    chunks: u64,
    /// CPU of the daemon (or of cat + socat) during the read.
    cpu: Duration,
    /// CPU of this process during the read: the client (or the baseline's reader thread).
    client_cpu: Duration,
    /// Time to connect (TCP, TLS and HTTP/2 handshakes), outside the clock; none for socat.
    connect: Option<Duration>,
    /// CPUs kept busy by other processes during the read, on average.
    others: f64,
    /// Share of the machine's CPU time the hypervisor took during the read.
    steal: f64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    problems: Vec<String>,
}

/// The certificates of the TLS target, in the scratch directory.
pub(super) struct TlsFiles {
    /// The CA the client trusts (PEM).
    pub(super) ca_pem: String,
    /// The CA as DER, for the handshake probe.
    ca_der: rustls::pki_types::CertificateDer<'static>,
    /// The daemon's config file enabling TLS with the server certificate.
    pub(super) config: PathBuf,
    /// The gateway's config (its certificate and its client identity are the server's; the
    /// daemon asks for no client certificate) and the cluster key it names.
    pub(super) gateway_config: PathBuf,
    cluster_key: PathBuf,
}

impl TlsFiles {
    /// A CA and a server certificate for `localhost` and `127.0.0.1` signed by it (ECDSA
    /// P-256 keys, rcgen's default), written to `dir` with a config file naming them.
    pub(super) fn create(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // The config wants absolute paths; --work-dir may be relative.
        let dir = fs::canonicalize(dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "conlog-bench CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "conlog-bench server");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
        fs::write(dir.join("ca.pem"), ca.pem())?;
        fs::write(&cert_path, cert.pem())?;
        fs::write(&key_path, key.serialize_pem())?;
        let config = dir.join("conlogd-tls.yaml");
        fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:0\ntls:\n  cert: {}\n  key: {}\n",
                cert_path.display(),
                key_path.display()
            ),
        )?;
        let cluster_key = dir.join("cluster.key");
        fs::write(&cluster_key, format!("{}\n", "5a".repeat(32)))?;
        let gateway_config = dir.join("gateway.yaml");
        fs::write(
            &gateway_config,
            format!(
                "gateway:\n  listen: 127.0.0.1:0\n  tls:\n    cert: {cert}\n    key: {key}\n  \
                 upstream:\n    ca: {ca}\n    cert: {cert}\n    key: {key}\n  cluster_key: {cluster}\n",
                cert = cert_path.display(),
                key = key_path.display(),
                ca = dir.join("ca.pem").display(),
                cluster = cluster_key.display(),
            ),
        )?;
        Ok(Self {
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            config,
            gateway_config,
            cluster_key,
        })
    }
}

/// A daemon serving the filled directories, with what its clients need.
struct Serving {
    daemon: Daemon,
    mode: Mode,
    pid: u32,
    tcp: SocketAddr,
    /// A read token for the guest, issued by this daemon.
    token: String,
    /// The TLS daemon's gateway.
    gateway: Option<GatewayProcess>,
}

/// A running `conlog-gateway` and its address; killed on drop.
pub(super) struct GatewayProcess(pub(super) std::process::Child, pub(super) SocketAddr);

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Gives the TLS daemon serving `dir` on `tcp` the token key derived from the cluster key for
/// its endpoint (docs/gateway.md, "Keys"), through its key file and SIGHUP, and starts a
/// `conlog-gateway` beside its binary in front of it; its process and address.
pub(super) fn start_gateway(
    bench: &Bench,
    daemon: &Daemon,
    dir: &Path,
    tcp: SocketAddr,
    tls: &TlsFiles,
) -> anyhow::Result<GatewayProcess> {
    use std::io::BufRead;
    let key =
        conlog::tokens::ClusterKey::load(&tls.cluster_key)?.node_key_file(&tcp.to_string())?;
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
            bail!(
                "the daemon did not take its provisioned key:\n{}",
                daemon.stderr_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let binary = bench.conlogd.with_file_name("conlog-gateway");
    let mut child = Command::new(&binary)
        .arg("--config")
        .arg(&tls.gateway_config)
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
        if let Some(at) = line.find(" tcp=") {
            if line.contains("conlog-gateway ready") {
                break line[at + 5..]
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .parse()?;
            }
        }
    };
    // Keep reading its diagnostics, so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(GatewayProcess(child, address))
}

impl Serving {
    /// Starts a daemon of `mode` on `dir` (the directories of the daemon that wrote the
    /// history), checks it restored the whole stream, and issues a token.
    fn start(
        bench: &Bench,
        dir: &Path,
        mode: Mode,
        tls: &TlsFiles,
        total: u64,
    ) -> anyhow::Result<Self> {
        let daemon = match mode {
            Mode::Plain => bench.start(dir)?,
            Mode::Tls => {
                let config = tls.config.to_string_lossy();
                bench.start_with(dir, &["--config", &config])?
            }
        };
        let tcp: SocketAddr = daemon
            .ready_field("tcp")?
            .parse()
            .context("bad tcp= address in the ready line")?;
        let tls_field = daemon.ready_field("tls")?;
        let expected = if mode == Mode::Tls { "on" } else { "off" };
        if tls_field != expected {
            bail!("a {mode:?} daemon reports tls={tls_field}");
        }
        bench.runtime.block_on(async {
            let mut agent = daemon.agent().await?;
            let info = wait_stream(
                &mut agent,
                GUEST,
                STREAM,
                Duration::from_millis(5),
                "restored with every byte",
                |s| s.offset >= total,
            )
            .await?;
            if info.offset != total || info.first_offset != 0 || info.dropped_bytes != 0 {
                bail!("after a restart the stream is {info:?}; expected all {total} bytes");
            }
            Ok(())
        })?;
        let gateway = match mode {
            Mode::Tls => Some(start_gateway(bench, &daemon, dir, tcp, tls)?),
            Mode::Plain => None,
        };
        // Issued after the key was provisioned: a token of the key the gateway derives.
        let token = bench.runtime.block_on(async {
            let mut agent = daemon.agent().await?;
            common::issue_token(&mut agent, GUEST, Access::Read).await
        })?;
        Ok(Self {
            pid: daemon.pid(),
            daemon,
            mode,
            tcp,
            token,
            gateway,
        })
    }
}

impl Scenario for HistoryArgs {
    const NAME: &'static str = "history";

    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict> {
        if self.since_time {
            let calls = bench.size(self.calls, 50, 500).max(1);
            let duration = bench.size(
                self.duration.map(|d| d.get()),
                Duration::from_secs(10),
                Duration::from_secs(60),
            );
            return super::history_since::run(bench, calls, duration);
        }
        run(bench, self)
    }
}

/// Runs the scenario and prints its report.
fn run(bench: &Bench, args: &HistoryArgs) -> anyhow::Result<Verdict> {
    let runtime = &bench.runtime;
    let total = bench.size(args.size.map(ByteSize::bytes), 64 << 20, 1 << 30);
    let runs = bench.size(args.runs, 1, 2).max(1);
    if total == 0 {
        bail!("--size must be at least 1");
    }
    if total > MAX_SIZE * u64::from(MAX_BACKUPS) {
        bail!(
            "--size must be at most {} so everything stays on disk",
            size(MAX_SIZE * u64::from(MAX_BACKUPS))
        );
    }
    bench.ensure_free(2 * total, "")?;
    let scratch = bench.scratch.path();
    let machine = &bench.machine;
    println!(
        "conlog-bench history: {} of history (rotation at {} keeping {} backups), read from offset 0; {runs} run(s) each side, alternating",
        size(total),
        size(MAX_SIZE),
        MAX_BACKUPS
    );
    println!("machine: {machine}");
    println!(
        "scratch: {} on {}",
        scratch.display(),
        procfs::filesystem(scratch)
    );
    println!("conlogd: {}", bench.conlogd_text());

    let dir = scratch.join("daemon");
    let daemon = bench.start(&dir)?;
    let pattern = Pattern::new(WRITE_CHUNK);
    let files = runtime.block_on(fill(&daemon, &pattern, total))?;
    // The daemons that serve the reads are started on these directories afterwards.
    daemon.stop()?;
    // Warm the page cache for every side alike.
    let status = Command::new("cat")
        .args(&files)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("cat of the log files failed: {status}");
    }
    let tls = TlsFiles::create(&scratch.join("tls"))?;
    println!(
        "{} written and logged in {} files; read by daemons started on them: plaintext (unix, tcp) and TLS (tls), switched when the next target needs the other",
        size(total),
        files.len()
    );
    // Run 1 starts with the UNIX socket.
    let mut serving = Serving::start(bench, &dir, Mode::Plain, &tls, total)?;
    let mut starts = 1;
    let mut negotiated = None;
    println!();

    let mut samples = Vec::new();
    for run in 1..=runs {
        for target in alternate(run, Target::ALL) {
            if let Some(mode) = target.mode() {
                if serving.mode != mode {
                    serving.daemon.stop()?;
                    serving = Serving::start(bench, &dir, mode, &tls, total)?;
                    starts += 1;
                }
                if mode == Mode::Tls && negotiated.is_none() {
                    negotiated = Some(
                        runtime
                            .block_on(probe_tls(serving.tcp, &tls))
                            .unwrap_or_else(|e| format!("handshake probe failed: {e:#}")),
                    );
                }
            }
            let sample = match target {
                Target::Socat => run_socat(&files, total)?,
                _ => runtime.block_on(run_conlogd(&serving, target, &tls, &pattern, total))?,
            };
            println!(
                "run {run} {:<14} {:>8.1} MiB/s  {:.3} s  {} chunks  CPU {:.2} s, client {:.2} s  others {:.2} CPUs, steal {:.0}%  {}RSS {} → {} KiB  {}",
                target.name(),
                mib_per_s(sample.bytes, sample.seconds),
                sample.seconds,
                sample.chunks,
                sample.cpu.as_secs_f64(),
                sample.client_cpu.as_secs_f64(),
                sample.others,
                sample.steal * 100.0,
                sample
                    .connect
                    .map_or(String::new(), |c| format!("connect {:.1} ms  ", c.as_secs_f64() * 1e3)),
                sample.rss_before_kib,
                sample.rss_peak_kib,
                report::outcome(&sample.problems)
            );
            samples.push(sample);
        }
    }
    serving.daemon.stop()?;
    let tls_text = format!(
        "TLS {}, server key ECDSA P-256",
        negotiated.as_deref().unwrap_or("not probed")
    );
    println!("{starts} daemon start(s) on the filled directories; {tls_text}");
    print_report(total, runs, machine, &tls_text, &samples);
    Ok(Verdict::wrong_if(
        samples.iter().any(|s| !s.problems.is_empty()),
    ))
}

/// One TLS handshake with the daemon, with the client settings tonic uses (rustls, ring
/// provider, safe defaults, ALPN h2): what was negotiated.
async fn probe_tls(tcp: SocketAddr, tls: &TlsFiles) -> anyhow::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(tls.ca_der.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = tokio::net::TcpStream::connect(tcp).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let stream = connector.connect(name, stream).await?;
    let (_, connection) = stream.get_ref();
    Ok(format!(
        "{:?}, {:?}",
        connection
            .protocol_version()
            .context("no protocol version")?,
        connection
            .negotiated_cipher_suite()
            .context("no cipher suite")?
            .suite()
    ))
}

/// Writes `total` bytes through a new log pipe and waits until they are logged; the stream's
/// files, oldest first.
pub(super) async fn fill(
    daemon: &Daemon,
    pattern: &Pattern,
    total: u64,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut agent = daemon.agent().await?;
    let limits = common::rotating(MAX_SIZE, MAX_BACKUPS);
    let (fd, created) = common::create_pipe(&mut agent, GUEST, STREAM, Some(limits)).await?;
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
    let mut first = vec![0u8; usize::try_from(total).map_or(1 << 20, |total| total.min(1 << 20))];
    File::open(&files[0])?.read_exact(&mut first)?;
    if let Err(at) = pattern.check(0, &first) {
        bail!("byte at offset {at} on disk differs from the byte written");
    }
    drop(agent);
    Ok(files)
}

async fn run_conlogd(
    serving: &Serving,
    target: Target,
    tls: &TlsFiles,
    pattern: &Pattern,
    total: u64,
) -> anyhow::Result<Sample> {
    let (pid, mut tcp) = (serving.pid, serving.tcp);
    // Through the gateway, the CPU figures are the daemon's and the gateway's together.
    let gateway_pid = match (target, &serving.gateway) {
        (Target::Gateway, Some(GatewayProcess(child, address))) => {
            tcp = *address;
            Some(child.id())
        }
        (Target::Gateway, None) => bail!("no gateway runs"),
        _ => None,
    };
    let cpu_of = move || -> anyhow::Result<Duration> {
        let mut cpu = procfs::cpu_time(pid)?;
        if let Some(gateway) = gateway_pid {
            cpu += procfs::cpu_time(gateway)?;
        }
        Ok(cpu)
    };
    let connecting = Instant::now();
    let channel = match target {
        Target::Local => conlog::client::connect_local(&serving.daemon.socket).await?,
        Target::Tls | Target::Gateway => Endpoint::from_shared(format!("https://{tcp}"))?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                    .domain_name("localhost"),
            )?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {tcp} with TLS"))?,
        _ => Channel::from_shared(format!("http://{tcp}"))?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {tcp}"))?,
    };
    let connect = connecting.elapsed();
    let mut client = ConsoleClient::new(channel).max_decoding_message_size(16 << 20);
    let mut request = tonic::Request::new(ReadHistoryRequest {
        guest: GUEST.into(),
        stream: STREAM.into(),
        start: Some(Start::FromOffset(0)),
        ..Default::default()
    });
    if target != Target::Local {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", serving.token).parse()?,
        );
    }
    // Let the connection settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(50)).await;
    procfs::reset_peak_rss(pid)?;
    let rss_before_kib = procfs::rss_kib(pid)?;
    let cpu_before = cpu_of()?;
    let client_cpu_before = procfs::cpu_time(std::process::id())?;
    let sampler = RssSampler::start(pid, SAMPLE);
    let machine_before = MachineCpu::read();
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
    let machine = MachineCpu::read().since(&machine_before);
    let cpu = cpu_of()?.saturating_sub(cpu_before);
    let client_cpu = procfs::cpu_time(std::process::id())?.saturating_sub(client_cpu_before);
    let peak = sampler
        .finish()
        .max(procfs::status_kib(pid, "VmHWM").unwrap_or(0));
    if problems.is_empty() && next != total {
        problems.push(format!("{next} bytes received of {total}"));
    }
    drop(chunks);
    hang_up(client).await;
    Ok(Sample {
        target,
        seconds,
        bytes: next,
        chunks: count,
        cpu,
        client_cpu,
        connect: (target != Target::Local).then_some(connect),
        others: others(machine, seconds, cpu + client_cpu),
        steal: machine.steal,
        rss_before_kib,
        rss_peak_kib: peak,
        problems,
    })
}

/// `cat FILES | socat -u STDIN TCP:127.0.0.1:PORT` into a discarding reader of this process.
fn run_socat(files: &[PathBuf], total: u64) -> anyhow::Result<Sample> {
    let client_cpu_before = procfs::cpu_time(std::process::id())?;
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
    let machine_before = MachineCpu::read();
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
    let machine = MachineCpu::read().since(&machine_before);
    // This process is the reader thread meanwhile (the main thread waits in `join`).
    let client_cpu = procfs::cpu_time(std::process::id())?.saturating_sub(client_cpu_before);
    for pid in [cat_pid, socat_pid] {
        // A zombie still has its CPU times in /proc until reaped.
        cpu += procfs::cpu_time(pid).unwrap_or_default();
    }
    let cat_status = cat.wait()?;
    let socat_status = socat.wait()?;
    let (bytes, reads, end) = outcome.context("the reader failed")?;
    let seconds = (end - start).as_secs_f64();
    let mut problems = Vec::new();
    if !cat_status.success() || !socat_status.success() {
        problems.push(format!("cat {cat_status}, socat {socat_status}"));
    }
    if bytes != total {
        problems.push(format!("{bytes} bytes received of {total}"));
    }
    Ok(Sample {
        target: Target::Socat,
        seconds,
        bytes,
        chunks: reads,
        cpu,
        client_cpu,
        connect: None,
        others: others(machine, seconds, cpu + client_cpu),
        steal: machine.steal,
        rss_before_kib: 0,
        rss_peak_kib: 0,
        problems,
    })
}

/// CPUs kept busy by others during a read of `seconds`: the machine's busy time (not idle,
/// iowait or stolen) less `ours`, per second. Ticks are 10 ms, so short reads are rough.
fn others(machine: CpuShares, seconds: f64, ours: Duration) -> f64 {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let busy = (1.0 - machine.idle - machine.iowait - machine.steal) * cpus * seconds;
    ((busy - ours.as_secs_f64()) / seconds.max(1e-9)).max(0.0)
}

fn print_report(total: u64, runs: u32, machine: &Machine, tls: &str, samples: &[Sample]) {
    let of = |target: Target| samples.iter().filter(move |s| s.target == target);
    let rates = |target: Target| -> Vec<f64> {
        of(target).map(|s| mib_per_s(s.bytes, s.seconds)).collect()
    };
    let mib = |target: Target| median(&rates(target));
    // CPU seconds per GiB moved, so that --quick figures compare with 1 GiB ones.
    let per_gib =
        |cpu: Duration, bytes: u64| cpu.as_secs_f64() * (1u64 << 30) as f64 / bytes.max(1) as f64;
    let cpu = |target: Target| {
        let values: Vec<f64> = of(target).map(|s| per_gib(s.cpu, s.bytes)).collect();
        median(&values)
    };
    let client_cpu = |target: Target| {
        let values: Vec<f64> = of(target).map(|s| per_gib(s.client_cpu, s.bytes)).collect();
        median(&values)
    };
    let growth = |target: Target| {
        of(target)
            .map(|s| s.rss_peak_kib.saturating_sub(s.rss_before_kib))
            .max()
            .unwrap_or(0)
    };
    let base = mib(Target::Socat);
    let plain = mib(Target::Tcp);
    let mut summary = Table::new(&[
        "measure",
        "MiB/s",
        "runs",
        "CPU s/GiB",
        "client CPU s/GiB",
        "vs cat→socat",
        "vs conlogd tcp",
        "target",
        "verdict",
        "daemon RSS growth KiB",
    ]);
    for target in Target::ALL {
        let value = mib(target);
        let conlog = target != Target::Socat;
        summary.row(vec![
            format!("{} (median of {runs})", target.name()),
            format!("{value:.0}"),
            rates(target)
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            format!("{:.2}", cpu(target)),
            format!("{:.2}", client_cpu(target)),
            format!("{:.2}×", value / base),
            if matches!(target, Target::Tcp | Target::Tls | Target::Gateway) {
                format!("{:.2}×", value / plain)
            } else {
                String::new()
            },
            match target {
                Target::Local => format!("≥ {TARGET_RATIO}×, RSS flat"),
                Target::Gateway => format!("≥ {GATEWAY_RATIO}× conlogd tls"),
                _ => String::new(),
            },
            match target {
                Target::Local => {
                    met(value / base >= TARGET_RATIO
                        && growth(Target::Local) <= TARGET_RSS_GROWTH_KIB)
                    .into()
                }
                Target::Gateway => met(value / mib(Target::Tls) >= GATEWAY_RATIO).into(),
                _ => String::new(),
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
    println!("CPU: the daemon's (cat + socat for the baseline; the daemon's and the gateway's through the gateway); client: this process (the baseline's reader thread).");
    let busiest = samples.iter().map(|s| s.others).fold(0.0, f64::max);
    println!(
        "Other processes kept up to {busiest:.2} CPUs busy during a read (see the runs above)."
    );
    let caption = format!(
        "{} of history in {} rotated files read from offset 0, {runs} run(s) each side, alternating; page cache warm; {tls}; other processes kept up to {busiest:.2} CPUs busy during a read. Machine: {machine}.",
        size(total),
        total.div_ceil(MAX_SIZE)
    );
    report::print_markdown(Some(&caption), &[&summary]);
}
