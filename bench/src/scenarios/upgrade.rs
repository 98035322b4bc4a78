//! Upgrade pause (docs/performance.md, "Upgrade pause"): how long logging stops during an in-place upgrade (SIGUSR1) and
//! during a takeover by a successor process, with 1, 100 and 2,000 guests.
//!
//! One "probe" guest has a writer printing a 64-byte line every 100 µs into its log pipe; the
//! other guests hold open, idle pipes (each is carried across the upgrade like the probe). A
//! watcher thread stats the probe's log file in a tight loop and records when it grows. The
//! pause of one upgrade is the longest interval without growth between the signal and the next
//! upgrade: the time from the last byte logged by the old image to the first byte logged by the
//! new one (resolution ≈ the writer's 100 µs). The writer never stops, so every byte must still
//! be in the log at the end; a run that loses a byte is WRONG.

use crate::common;
use crate::procfs;
use crate::report::{self, percentile, Table, Verdict};
use crate::scenario::{Bench, Scenario};
use anyhow::Context;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Options of the `upgrade` scenario.
#[derive(clap::Args)]
pub struct UpgradeArgs {
    /// Guest counts to measure [default: 1,100,2000, or 1,10 with --quick].
    #[arg(long, value_delimiter = ',')]
    guests: Option<Vec<usize>>,
    /// Upgrades (and takeovers) per guest count [default: 20, or 3 with --quick].
    #[arg(long)]
    upgrades: Option<usize>,
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

impl Scenario for UpgradeArgs {
    const NAME: &'static str = "upgrade";

    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict> {
        run(bench, self)
    }
}

fn run(bench: &Bench, args: &UpgradeArgs) -> anyhow::Result<Verdict> {
    procfs::raise_nofile();
    let counts = bench.size(args.guests.clone(), vec![1, 10], vec![1, 100, 2000]);
    let upgrades = bench.size(args.upgrades, 3, 20);
    anyhow::ensure!(upgrades > 0, "--upgrades must be at least 1");
    let mut results = Vec::new();
    let mut verdict = Verdict::Correct;
    for guests in counts {
        // A daemon of its own per guest count, its directories removed afterwards.
        let dir = bench.scratch.path().join(guests.to_string());
        let measured = measure(bench, &dir, guests, upgrades);
        let _ = std::fs::remove_dir_all(&dir);
        let (pauses, correct) = measured?;
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
    report::print_markdown(None, &[&table]);
    Ok(verdict)
}

/// p50, p99 (nearest rank) and max in milliseconds.
fn percentiles(samples: &[Duration]) -> (f64, f64, f64) {
    let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    (
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        percentile(&ms, 1.0),
    )
}

fn measure(
    bench: &Bench,
    dir: &Path,
    guests: usize,
    upgrades: usize,
) -> anyhow::Result<(Pauses, bool)> {
    let runtime = &bench.runtime;
    let mut daemon = bench.start(dir)?;
    let socket = daemon.socket.clone();
    let mut agent = runtime.block_on(daemon.agent())?;
    // Claimed log pipes without rotation: the probe's log stays one file.
    let mut claim = |guest: &str| -> anyhow::Result<File> {
        let limits = common::rotating(1 << 30, 0);
        let (fd, _) =
            runtime.block_on(common::create_pipe(&mut agent, guest, "qemu", Some(limits)))?;
        Ok(File::from(fd))
    };
    let mut idle = Vec::new();
    for i in 1..guests {
        idle.push(claim(&format!("idle-{i}"))?);
    }
    let probe = claim("probe")?;
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
        let pid = i32::try_from(daemon.pid())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("daemon pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::USR1)?;
        // The signal must have caused an upgrade (a new image's ready line), or the pause
        // measured would be that of a refused or ignored signal: none at all.
        daemon
            .wait_ready_lines(n + 2, UPGRADE_TIMEOUT)
            .context("SIGUSR1 did not cause an in-place upgrade")?;
        wait_serving(bench, &socket, guests).with_context(|| {
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
        let successor = bench.start_with(dir, &["--takeover"])?;
        // The predecessor must have handed over and exited 0, or the pause measured would be
        // that of a takeover that did not happen.
        successors
            .last_mut()
            .unwrap_or(&mut daemon)
            .wait_exited(UPGRADE_TIMEOUT)
            .context("the predecessor did not hand over to the successor")?;
        wait_serving(bench, &socket, guests).with_context(|| {
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
fn wait_serving(bench: &Bench, socket: &Path, guests: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let poll = Duration::from_millis(2);
    bench
        .runtime
        .block_on(common::wait_listed(socket, guests, poll, deadline))
        .context("the daemon did not serve again within 60 s")?;
    Ok(())
}
