//! Live migration (docs/design.md "Live migration"; docs/performance.md "Live migration"): two
//! daemons on loopback with TLS (certificates made with `rcgen` in the scratch directory).
//!
//! - Import throughput: a log pipe stream of `--size` bytes on node A; node B creates the same
//!   stream with `migrate_from` A and imports it (ReadHistory over TLS, written at the same
//!   offsets); the time from `CreateLogPipe` to B's offset reaching A's end, against a client
//!   reading the same history from A over TLS and discarding it (the baseline), alternately.
//! - Switchover pause: `--switches` times, a console on A with its guest connected, B importing
//!   it with its own guest connected and a watcher attached to B; A's guest writes its last byte
//!   and leaves, B's guest writes one byte at once (held), A's agent says the guest moved; the
//!   pause is from A's last byte to B's watcher receiving B's byte.
//!
//! WRONG when B does not hold exactly A's offsets once the import is over (the bytes
//! themselves are checked by tests/daemon/migration.rs), or B's watcher gets anything else than
//! A's last byte followed by B's.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes below 1 MiB and remainders of 37"
)]

use crate::common::{self, rotating};
use crate::daemon::Daemon;
use crate::report::{self, median, mib_per_s, percentile, size, Table, Verdict};
use crate::scenario::{alternate, Bench, Scenario};
use anyhow::{bail, Context};
use conlog::config::ByteSize;
use conlog::proto::{
    console_client::ConsoleClient, read_history_request::Start, server_frame::Frame, Access,
    CreateConsoleRequest, CreateLogPipeRequest, MigrateFrom, ReadHistoryRequest,
    RemoveGuestRequest, WatchConsoleRequest,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How often `ListGuests` is polled while waiting: the import's time is known to this much.
const POLL: Duration = Duration::from_millis(5);

/// Options of `conlog-bench migration`.
#[derive(clap::Args)]
pub struct MigrationArgs {
    /// History imported [default: 256MiB, or 16MiB with --quick].
    #[arg(long, value_parser = ByteSize::parse)]
    size: Option<ByteSize>,
    /// Runs of each side of the throughput comparison [default: 2, or 1 with --quick].
    #[arg(long)]
    runs: Option<u32>,
    /// Switchovers measured [default: 20, or 5 with --quick].
    #[arg(long)]
    switches: Option<u32>,
}

impl Scenario for MigrationArgs {
    const NAME: &'static str = "migration";

    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict> {
        let total = bench.size(self.size.map(ByteSize::bytes), 16 << 20, 256 << 20);
        let runs = bench.size(self.runs, 1, 2).max(1);
        let switches = bench.size(self.switches, 5, 20).max(1);
        bench.ensure_free(total * 3, " (the history on both nodes)")?;
        let tls = Tls::create(&bench.scratch.path().join("tls"))?;
        let mut problems = Vec::new();
        println!("conlog-bench migration: {}", bench.conlogd_text());
        println!(
            "history {}; {runs} runs of each side; {switches} switchovers",
            size(total)
        );
        let (mut reads, mut imports) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            let dir = bench.scratch.path().join(format!("run{run}"));
            let a = Node::start(bench, &tls, &dir.join("a"))?;
            let b = Node::start(bench, &tls, &dir.join("b"))?;
            bench.runtime.block_on(fill(&a, total))?;
            for side in alternate(run, [Side::Read, Side::Import]) {
                match side {
                    Side::Read => reads.push(bench.runtime.block_on(read_all(&a, &tls, total))?),
                    Side::Import => {
                        let (seconds, wrong) = bench.runtime.block_on(import(&a, &b, total))?;
                        problems.extend(wrong);
                        imports.push(seconds);
                    }
                }
            }
        }
        let dir = bench.scratch.path().join("switch");
        let a = Node::start(bench, &tls, &dir.join("a"))?;
        let b = Node::start(bench, &tls, &dir.join("b"))?;
        let mut pauses = Vec::new();
        for n in 0..switches {
            let (pause, wrong) = bench.runtime.block_on(switchover(&a, &b, n))?;
            problems.extend(wrong);
            pauses.push(pause * 1000.0);
        }
        let mut throughput = Table::new(&["", "median s", "MiB/s"]);
        for (name, samples) in [
            ("ReadHistory (TLS, discarded)", &reads),
            ("import", &imports),
        ] {
            let m = median(samples);
            throughput.row(vec![
                name.into(),
                format!("{m:.2}"),
                format!("{:.0}", mib_per_s(total, m)),
            ]);
        }
        let mut pause = Table::new(&["switchover pause", "median ms", "p90 ms", "max ms"]);
        pause.row(vec![
            format!("{switches} switchovers"),
            format!("{:.1}", median(&pauses)),
            format!("{:.1}", percentile(&pauses, 0.9)),
            format!("{:.1}", percentile(&pauses, 1.0)),
        ]);
        println!("{}", throughput.text());
        println!("{}", pause.text());
        println!(
            "import / ReadHistory throughput: {:.2}",
            median(&reads) / median(&imports)
        );
        report::print_markdown(Some("Live migration"), &[&throughput, &pause]);
        println!("{}", report::outcome(&problems));
        Ok(Verdict::wrong_if(!problems.is_empty()))
    }
}

#[derive(Clone, Copy)]
enum Side {
    Read,
    Import,
}

/// The fleet's certificates and the config naming them.
struct Tls {
    ca_pem: String,
    config: PathBuf,
}

impl Tls {
    fn create(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
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
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let (ca_path, cert_path, key_path) = (
            dir.join("ca.pem"),
            dir.join("server.pem"),
            dir.join("server.key"),
        );
        fs::write(&ca_path, ca.pem())?;
        fs::write(&cert_path, cert.pem())?;
        fs::write(&key_path, key.serialize_pem())?;
        let config = dir.join("conlogd.yaml");
        fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:0\ntls:\n  cert: {}\n  key: {}\nmigration:\n  ca: {}\n",
                cert_path.display(),
                key_path.display(),
                ca_path.display()
            ),
        )?;
        Ok(Self {
            ca_pem: ca.pem(),
            config,
        })
    }

    async fn channel(&self, address: &str) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        Ok(Endpoint::from_shared(format!("https://{address}"))?
            .tls_config(tls)?
            .connect()
            .await?)
    }
}

/// A node and its Console endpoint.
struct Node {
    daemon: Daemon,
    tcp: String,
}

impl Node {
    fn start(bench: &Bench, tls: &Tls, dir: &Path) -> anyhow::Result<Self> {
        let config = tls.config.display().to_string();
        let daemon = bench.start_with(dir, &["--config", &config])?;
        let tcp = daemon.ready_field("tcp")?;
        Ok(Self { daemon, tcp })
    }
}

/// Limits that keep `total` bytes: 16 files of a sixteenth each (at least 1 MiB).
fn keeping(total: u64) -> conlog::proto::LogLimits {
    rotating((total / 16).max(1 << 20), 17)
}

/// The byte at offset `i` of the filled history.
fn byte(i: u64) -> u8 {
    b"0123456789abcdefghijklmnopqrstuvwxyz\n"[(i % 37) as usize]
}

/// Writes `total` bytes into A's pipe stream `vm/qemu` and waits until they are logged.
async fn fill(a: &Node, total: u64) -> anyhow::Result<()> {
    let mut agent = a.daemon.agent().await?;
    let (fd, _) = common::create_pipe(&mut agent, "vm", "qemu", Some(keeping(total))).await?;
    let mut pipe = fs::File::from(fd);
    let block: Vec<u8> = (0..(1u64 << 20)).map(byte).collect();
    let mut written = 0;
    while written < total {
        let n = (total - written).min(block.len() as u64) as usize;
        // 1 MiB is a multiple of nothing in 37: each block starts where the last ended.
        let start = (written % 37) as usize;
        let data: Vec<u8> = block.iter().cycle().skip(start).take(n).copied().collect();
        pipe.write_all(&data)?;
        written += n as u64;
    }
    drop(pipe);
    common::wait_stream(&mut agent, "vm", "qemu", POLL, "filled", |s| {
        s.offset == total && !s.open
    })
    .await?;
    Ok(())
}

/// ReadHistory of A's whole stream over TLS, discarded; seconds.
async fn read_all(a: &Node, tls: &Tls, total: u64) -> anyhow::Result<f64> {
    let token = common::issue_token(&mut a.daemon.agent().await?, "vm", Access::Read).await?;
    let channel = tls.channel(&a.tcp).await?;
    let mut client = ConsoleClient::new(channel).max_decoding_message_size(8 << 20);
    let started = Instant::now();
    let mut request = tonic::Request::new(ReadHistoryRequest {
        guest: "vm".into(),
        stream: "qemu".into(),
        start: Some(Start::FromOffset(0)),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let mut stream = client.read_history(request).await?.into_inner();
    let mut got = 0;
    while let Some(chunk) = stream.message().await? {
        got += chunk.data.len() as u64;
    }
    if got != total {
        bail!("ReadHistory returned {got} bytes of {total}");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// B imports A's stream `vm/qemu`; seconds from `CreateLogPipe` to B holding all of it, and
/// what was wrong.
async fn import(a: &Node, b: &Node, total: u64) -> anyhow::Result<(f64, Vec<String>)> {
    let token = common::issue_token(&mut a.daemon.agent().await?, "vm", Access::Read).await?;
    let mut agent = b.daemon.agent().await?;
    let started = Instant::now();
    agent
        .create_log_pipe(CreateLogPipeRequest {
            guest: "vm".into(),
            stream: "qemu".into(),
            limits: Some(keeping(total)),
            migrate_from: Some(MigrateFrom {
                node: a.tcp.clone(),
                token,
                offset: 0,
            }),
        })
        .await
        .context("CreateLogPipe with migrate_from")?;
    common::wait_stream(&mut agent, "vm", "qemu", POLL, "imported", |s| {
        s.offset >= total
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let mut wrong = Vec::new();
    let info = common::stream_info(&mut agent, "vm", "qemu").await?;
    if info.first_offset != 0 || info.offset != total {
        wrong.push(format!(
            "B holds offsets {}..{}, not 0..{total}",
            info.first_offset, info.offset
        ));
    }
    // Done with it: the import stops, B forgets the stream.
    agent
        .remove_guest(RemoveGuestRequest {
            guest: "vm".into(),
            delete_logs: true,
            ..Default::default()
        })
        .await?;
    Ok((seconds, wrong))
}

/// One switchover of a console `sw-N` from A to B; the pause in seconds, and what was wrong.
async fn switchover(a: &Node, b: &Node, n: u32) -> anyhow::Result<(f64, Vec<String>)> {
    use std::os::unix::net::UnixStream;
    let guest = format!("sw-{n}");
    let mut agent_a = a.daemon.agent().await?;
    let (mut g1, _) = common::create_console(&mut agent_a, &guest, "", None).await?;
    g1.write_all(b"hello from A\n")?;
    let token = common::issue_token(&mut agent_a, &guest, Access::Read).await?;
    let mut agent_b = b.daemon.agent().await?;
    let on_b = agent_b
        .create_console(CreateConsoleRequest {
            guest: guest.clone(),
            migrate_from: Some(MigrateFrom {
                node: a.tcp.clone(),
                token,
                offset: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut g2 = UnixStream::connect(&on_b.guest_socket)?;
    // B has imported A's first line (its offset is A's end).
    common::wait_stream(&mut agent_b, &guest, "serial0", POLL, "at A's end", |s| {
        s.offset == 13
    })
    .await?;
    // Attached once B has A's first line: it sees A's last byte and B's first, nothing else.
    let local = conlog::client::connect_local(&b.daemon.socket).await?;
    let mut watch = ConsoleClient::new(local)
        .watch_console(WatchConsoleRequest {
            guest: guest.clone(),
            replay_bytes: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    let started = Instant::now();
    g1.write_all(b"A")?;
    drop(g1);
    g2.write_all(b"B")?;
    agent_a
        .remove_guest(RemoveGuestRequest {
            guest: guest.clone(),
            moved_to: b.tcp.clone(),
            ..Default::default()
        })
        .await?;
    let mut seen = Vec::new();
    let pause = loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .context("no output on B within 30s")??
            .context("the watch on B ended")?;
        if let Some(Frame::Output(output)) = frame.frame {
            seen.extend_from_slice(&output.data);
            if seen.ends_with(b"B") {
                break started.elapsed().as_secs_f64();
            }
        }
    };
    let mut wrong = Vec::new();
    if seen != b"AB" {
        wrong.push(format!(
            "B's watcher saw {:?}, not \"AB\"",
            String::from_utf8_lossy(&seen)
        ));
    }
    agent_b
        .remove_guest(RemoveGuestRequest {
            guest,
            delete_logs: true,
            ..Default::default()
        })
        .await?;
    Ok((pause, wrong))
}
