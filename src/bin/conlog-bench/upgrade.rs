//! Upgrade pause (issue 5): how long logging stops during an in-place upgrade (SIGUSR1) and
//! during a takeover by a successor process, with 1, 100 and 2,000 guests.
//!
//! One "probe" guest has a writer printing a 64-byte line every 100 µs into its log pipe; the
//! other guests hold open, idle pipes (each is carried across the upgrade like the probe). A
//! watcher thread stats the probe's log file in a tight loop and records when it grows. The
//! pause of one upgrade is the longest interval without growth between the signal and the next
//! upgrade: the time from the last byte logged by the old image to the first byte logged by the
//! new one (resolution ≈ the writer's 100 µs). The writer never stops, so every byte must still
//! be in the log at the end; a run that loses a byte is WRONG.

use crate::console::Scratch;
use crate::daemon::Daemon;
use crate::report::{self, Table, Verdict};
use crate::Common;
use anyhow::Context;
use conlog::proto::{
    agent_client::AgentClient, CreateLogPipeRequest, ListGuestsRequest, LogLimits, LogMode,
};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

/// Options of the `upgrade` scenario.
#[derive(clap::Args)]
pub struct UpgradeArgs {
    /// Guest counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,100,2000")]
    guests: Vec<usize>,
    /// Upgrades (and takeovers) per guest count.
    #[arg(long, default_value_t = 20)]
    upgrades: usize,
    /// CI smoke run: 1 and 10 guests, 3 upgrades each.
    #[arg(long)]
    quick: bool,
}

const LINE: usize = 64;
/// How long an upgrade may take before the run is abandoned.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);
const INTERVAL: Duration = Duration::from_micros(100);

/// Pauses measured for one guest count.
struct Pauses {
    guests: usize,
    in_place: Vec<Duration>,
    takeover: Vec<Duration>,
}

pub fn run(runtime: &Runtime, common: &Common, args: &UpgradeArgs) -> anyhow::Result<Verdict> {
    let binary = common.conlogd()?;
    raise_nofile();
    let (counts, upgrades) = if args.quick {
        (vec![1, 10], 3)
    } else {
        (args.guests.clone(), args.upgrades)
    };
    let mut results = Vec::new();
    let mut verdict = Verdict::Correct;
    for guests in counts {
        let scratch = Scratch::create(&common.work_parent(), &format!("upgrade-{guests}"))?;
        let (pauses, correct) = measure(runtime, &binary, &scratch.0, guests, upgrades)?;
        if !correct {
            verdict = Verdict::Wrong;
        }
        results.push(pauses);
    }
    let mut table = Table::new(&[
        "guests", "path", "upgrades", "p50 ms", "p99 ms", "max ms", "target", "verdict",
    ]);
    for p in &results {
        let target_ms = if p.guests <= 100 { 20.0 } else { 100.0 };
        for (path, samples) in [
            ("in place (SIGUSR1)", &p.in_place),
            ("takeover", &p.takeover),
        ] {
            let (p50, p99, max) = percentiles(samples);
            table.row(vec![
                p.guests.to_string(),
                path.into(),
                samples.len().to_string(),
                format!("{p50:.2}"),
                format!("{p99:.2}"),
                format!("{max:.2}"),
                format!("p99 < {target_ms} ms"),
                report::met(p99 < target_ms).into(),
            ]);
        }
    }
    println!("{}", table.text());
    println!("---- markdown ----\n{}---- end ----", table.markdown());
    Ok(verdict)
}

/// p50, p99 (nearest rank) and max in milliseconds.
fn percentiles(samples: &[Duration]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    (rank(0.5), rank(0.99), *ms.last().unwrap_or(&0.0))
}

fn measure(
    runtime: &Runtime,
    binary: &Path,
    dir: &Path,
    guests: usize,
    upgrades: usize,
) -> anyhow::Result<(Pauses, bool)> {
    let mut daemon = Daemon::start(binary, dir)?;
    let socket = daemon.socket.clone();
    let mut agent = runtime.block_on(daemon.agent())?;
    let mut idle = Vec::new();
    for i in 1..guests {
        idle.push(claim(runtime, &mut agent, &format!("idle-{i}"))?);
    }
    let probe = claim(runtime, &mut agent, "probe")?;
    let log = dir.join("data/logs/probe/qemu.log");

    // The writer: one numbered line every INTERVAL, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut probe = probe;
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut n = 0u64;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let line = format!("{n:0>width$}\n", width = LINE - 1);
                probe.write_all(line.as_bytes())?;
                n += 1;
                next += INTERVAL;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            Ok(n)
        })
    };
    // The watcher: when the probe's log grew.
    let growth: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let watcher = {
        let (stop, growth, log) = (stop.clone(), growth.clone(), log.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(meta) = std::fs::metadata(&log) {
                    if meta.len() != last {
                        last = meta.len();
                        growth.lock().expect("growth poisoned").push(Instant::now());
                    }
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        })
    };

    let mut signals = Vec::new();
    std::thread::sleep(Duration::from_millis(200));
    for n in 0..upgrades {
        signals.push(Instant::now());
        let pid = rustix::process::Pid::from_raw(daemon.pid() as i32).context("daemon pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::USR1)?;
        // The signal must have caused an upgrade (a new image's ready line), or the pause
        // measured would be that of a refused or ignored signal: none at all.
        daemon
            .wait_ready_lines(n + 2, UPGRADE_TIMEOUT)
            .context("SIGUSR1 did not cause an in-place upgrade")?;
        wait_serving(runtime, &socket, guests).with_context(|| {
            format!(
                "after an in-place upgrade; conlogd's stderr:\n{}",
                daemon.stderr_tail()
            )
        })?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut takeover_signals = Vec::new();
    let mut successors = Vec::new();
    for _ in 0..upgrades {
        takeover_signals.push(Instant::now());
        let successor = Daemon::start_with(binary, dir, &["--takeover"])?;
        // The predecessor must have handed over and exited 0, or the pause measured would be
        // that of a takeover that did not happen.
        successors
            .last_mut()
            .unwrap_or(&mut daemon)
            .wait_exited(UPGRADE_TIMEOUT)
            .context("the predecessor did not hand over to the successor")?;
        wait_serving(runtime, &socket, guests).with_context(|| {
            format!(
                "after a takeover; the successor's stderr:\n{}",
                successor.stderr_tail()
            )
        })?;
        successors.push(successor);
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let lines = writer.join().expect("writer thread")?;
    watcher.join().expect("watcher thread");
    drop(idle);

    // Everything the writer wrote must be logged, exactly once, in order.
    let expected = lines * LINE as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&log)?.len() < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let content = std::fs::read(&log)?;
    let correct = content.len() as u64 == expected
        && content
            .chunks(LINE)
            .enumerate()
            .all(|(i, line)| line == format!("{i:0>width$}\n", width = LINE - 1).as_bytes());
    if !correct {
        eprintln!(
            "WRONG: {guests} guests: {} bytes logged, {expected} written (or out of order)",
            content.len()
        );
    }
    let growth = growth.lock().expect("growth poisoned").clone();
    let windows = |starts: &[Instant], end: Instant| -> Vec<Duration> {
        starts
            .iter()
            .enumerate()
            .map(|(i, start)| {
                let stop = starts.get(i + 1).copied().unwrap_or(end);
                longest_gap(&growth, *start, stop)
            })
            .collect()
    };
    let in_place = windows(
        &signals,
        takeover_signals
            .first()
            .copied()
            .unwrap_or_else(Instant::now),
    );
    let takeover = windows(&takeover_signals, Instant::now());
    // Every daemon but the last successor has handed over and exited 0.
    let last = successors.pop();
    drop(daemon);
    drop(successors);
    if let Some(last) = last {
        last.stop()?;
    }
    Ok((
        Pauses {
            guests,
            in_place,
            takeover,
        },
        correct,
    ))
}

/// The longest interval without growth that overlaps `[start, stop)`: from the last growth
/// before it began to the first growth after it ended.
fn longest_gap(growth: &[Instant], start: Instant, stop: Instant) -> Duration {
    let first = growth.partition_point(|t| *t < start).saturating_sub(1);
    let last = growth
        .partition_point(|t| *t < stop)
        .min(growth.len().saturating_sub(1));
    growth[first..=last]
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// Waits until the daemon answers on its local socket with every guest listed.
fn wait_serving(runtime: &Runtime, socket: &Path, guests: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = runtime.block_on(async {
            let channel = conlog::client::connect_local(socket).await.ok()?;
            let reply = AgentClient::new(channel)
                .list_guests(ListGuestsRequest::default())
                .await
                .ok()?;
            Some(reply.into_inner().guests.len())
        });
        if listed == Some(guests) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the daemon did not serve again within 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A claimed log pipe of `guest` (no rotation: the probe's log stays one file).
fn claim(runtime: &Runtime, agent: &mut AgentClient<Channel>, guest: &str) -> anyhow::Result<File> {
    let request = CreateLogPipeRequest {
        guest: guest.into(),
        stream: "qemu".into(),
        limits: Some(LogLimits {
            max_size: Some(1 << 30),
            max_backups: Some(0),
            mode: LogMode::Rotate.into(),
        }),
    };
    let created = runtime
        .block_on(agent.create_log_pipe(request))?
        .into_inner();
    let fd =
        conlog::client::receive_pipe(&PathBuf::from(&created.fd_socket), &created.handoff_token)?;
    Ok(File::from(fd))
}

/// 2,000 guests hold more descriptors than the default soft limit.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}
