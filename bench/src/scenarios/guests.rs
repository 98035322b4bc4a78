//! Scenario `guests` (docs/performance.md, scenarios 2 and 6): many guests on one daemon, and restarting it
//! with all of them registered.
//!
//! Many guests: a fresh daemon; for each of N guests `CreateLogPipe` (stream `qemu`, write end
//! claimed through `fd.sock`) and `CreateConsole` (device `serial0`, its guest socket connected
//! by the bench as QEMU would). `ListGuests` must then show every pipe open with one writer and
//! every console with its guest connected. After a rest, the daemon's resident memory is read
//! (`VmRSS`, split into anonymous and file-backed), against its value with no guest in the same
//! run: the difference divided by N is the memory per guest. Then `--writing-percent` of the
//! guests, spread evenly, write at once (one tokio task per stream, `--chunk` writes)
//! `--write-total` bytes split evenly over their pipes and consoles; the phase ends when every
//! log file holds every byte (stat, so polling costs the daemon nothing). Checked afterwards:
//! `ListGuests` offsets (writers exactly, the others 0, nothing dropped) and the content of
//! every written log file. `--write-runs` rounds, each with other guests, alternating with the
//! baseline; medians are reported.
//!
//! CPU baseline, same run: one `cat > FILE` per written stream, its stdin a pipe (for a log pipe)
//! or a UNIX socket pair (for a console), fed the same bytes the same way at once. A cat's CPU
//! is its time on a CPU (`/proc/PID/schedstat`, nanoseconds) from when it first sleeps (in its
//! first read, start-up done) until it has exited, read before it is reaped. The daemon's is its
//! user + system time (`/proc/PID/stat`, 10 ms ticks) over the write phase.
//!
//! Restart: with the N guests registered, SIGTERM then a new daemon on the same directories,
//! and SIGKILL then a new one (crash recovery), `--restarts` times each, interleaved with a
//! daemon started on empty directories (the baseline). Measured from spawn to the ready line on
//! stderr and to the first `ListGuests` that lists all N guests (polled every millisecond).
//!
//! Descriptors: the daemon holds about six per guest (pipe read end, two log files, the
//! console's two listeners and its guest connection) and this process two (pipe write end,
//! guest connection). Both raise RLIMIT_NOFILE to the hard limit, which an unprivileged process
//! cannot exceed; N is capped to what fits under it with a margin, and the cap is printed. The
//! per-guest figures extrapolate to the 10,000 guests of the issue.

use crate::common::{self, hang_up, Scratch, MAX_MESSAGE};
use crate::daemon::Daemon;
use crate::data::Pattern;
use crate::procfs::{self, Machine, RssSampler};
use crate::report::{self, median, met, mib, size, Table, Verdict};
use crate::scenario::{Bench, Scenario};
use anyhow::{bail, ensure, Context};
use conlog::config::ByteSize;
use conlog::proto::agent_client::AgentClient;
use conlog::proto::{GuestInfo, ListGuestsRequest, LogLimits, StreamKind};
use std::collections::HashMap;
use std::fs::{self, File};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

const STREAM: &str = "qemu";
const DEVICE: &str = "serial0";
/// The guest count of the targets, which per-guest figures are extrapolated to.
const ISSUE_GUESTS: usize = 10_000;
/// Targets of scenarios 2 and 6 (docs/performance.md, "Many guests and restart").
const TARGET_RSS_KIB_AT_ISSUE_GUESTS: f64 = 200.0 * 1024.0;
const TARGET_KIB_PER_GUEST: f64 = 20.0;
const VIRTLOGD_KIB: f64 = 17.0 * 1024.0;
const VIRTLOGD_GUESTS: usize = 100;
const TARGET_CPU_RATIO: f64 = 1.2;
const TARGET_RESTART: Duration = Duration::from_secs(2);
/// Descriptors per guest: the daemon's estimate (checked against the small run) and ours.
const DAEMON_FDS_PER_GUEST: f64 = 6.0;
const BENCH_FDS_PER_GUEST: f64 = 2.0;
/// Kept free under the hard limit: this share of it, plus a fixed number.
const FD_MARGIN_SHARE: f64 = 0.1;
const FD_MARGIN: f64 = 256.0;
/// Rest before resident memory is read.
const REST: Duration = Duration::from_secs(2);
/// Longest wait for bytes to be logged or a restarted daemon to list its guests.
const DEADLINE: Duration = Duration::from_secs(120);

/// Options of `conlog-bench guests`.
#[derive(clap::Args)]
pub struct GuestsArgs {
    /// Guests of the large run, capped to what RLIMIT_NOFILE allows [default: 10000, or 200
    /// with --quick].
    #[arg(long)]
    guests: Option<usize>,
    /// Guests of the small run, compared with virtlogd; 0 skips it [default: 100, or 20 with
    /// --quick].
    #[arg(long)]
    small: Option<usize>,
    /// Share of the guests that write at once in the write phase, percent.
    #[arg(long, default_value_t = 10)]
    writing_percent: usize,
    /// Bytes written in the write phase, split evenly over the writing guests' pipes and
    /// consoles [default: 512MiB, or 16MiB with --quick].
    #[arg(long, value_parser = ByteSize::parse)]
    write_total: Option<ByteSize>,
    /// Bytes per write(2).
    #[arg(long, value_parser = ByteSize::parse, default_value = "16KiB")]
    chunk: ByteSize,
    /// Restarts of each kind (SIGTERM, SIGKILL, empty baseline) per run [default: 3, or 1 with
    /// --quick].
    #[arg(long)]
    restarts: Option<usize>,
    /// Rounds of the write phase and its baseline, each with other guests [default: 3, or 1
    /// with --quick].
    #[arg(long)]
    write_runs: Option<usize>,
    /// Where the daemons' runtime directories (conlogd.sock, fd.sock and two sockets per
    /// console) go, through a symlink from the scratch directory; logs and state stay in the
    /// scratch directory [default: /dev/shm when it exists, as /run is a tmpfs on a production
    /// node; else the scratch directory].
    #[arg(long, value_name = "DIR")]
    runtime_parent: Option<PathBuf>,
}

struct Settings {
    guests: usize,
    small: usize,
    writing_percent: usize,
    write_total: u64,
    chunk: usize,
    restarts: usize,
    write_runs: usize,
}

impl Settings {
    fn from_args(args: &GuestsArgs, bench: &Bench) -> anyhow::Result<Self> {
        let settings = Self {
            guests: bench.size(args.guests, 200, ISSUE_GUESTS),
            small: bench.size(args.small, 20, VIRTLOGD_GUESTS),
            writing_percent: args.writing_percent,
            write_total: bench.size(args.write_total.map(ByteSize::bytes), 16 << 20, 512 << 20),
            chunk: usize::try_from(args.chunk.bytes()).context("--chunk too large")?,
            restarts: bench.size(args.restarts, 1, 3),
            write_runs: bench.size(args.write_runs, 1, 3),
        };
        ensure!(settings.guests > 0, "--guests must be at least 1");
        ensure!(
            (1..=100).contains(&settings.writing_percent),
            "--writing-percent must be between 1 and 100"
        );
        ensure!(
            (1..=(4 << 20)).contains(&settings.chunk),
            "--chunk must be between 1B and 4MiB"
        );
        ensure!(settings.restarts > 0, "--restarts must be at least 1");
        ensure!(
            settings.write_runs > 0 && settings.write_runs * settings.writing_percent <= 100,
            "--write-runs must be at least 1 and, times --writing-percent, at most 100 (each round writes with other guests)"
        );
        Ok(settings)
    }

    /// How many guests write in a round, and the distance between them.
    fn spread(&self, guests: usize) -> (usize, usize) {
        let count = (guests * self.writing_percent).div_ceil(100).max(1);
        (count, guests / count)
    }

    /// The guests that write in `round` (from 0): every step-th one, starting at `round`, so
    /// each round writes with other guests.
    fn writers(&self, guests: usize, round: usize) -> Vec<usize> {
        let (count, step) = self.spread(guests);
        (0..count).map(|i| i * step + round % step).collect()
    }

    /// Bytes each written stream gets (two streams per writing guest).
    fn per_stream(&self, guests: usize) -> u64 {
        let streams = 2 * self.spread(guests).0 as u64;
        (self.write_total / streams).max(1)
    }

    /// The limits of every stream: one file holds all a stream gets, so nothing rotates.
    fn limits(&self, guests: usize) -> LogLimits {
        common::rotating((2 * self.per_stream(guests)).max(2 << 20), 1)
    }
}

/// What one process of the machine holds and uses, from `/proc`.
#[derive(Clone, Copy, Default)]
struct Footprint {
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    fds: usize,
    threads: u64,
}

impl Footprint {
    fn read(pid: u32) -> anyhow::Result<Self> {
        Ok(Self {
            rss_kib: procfs::rss_kib(pid)?,
            anon_kib: procfs::status_kib(pid, "RssAnon")?,
            file_kib: procfs::status_kib(pid, "RssFile")?,
            fds: procfs::open_fds(pid)?,
            threads: procfs::thread_count(pid)?,
        })
    }
}

/// The most guests that fit under `limit` descriptors for both processes, with the margin.
#[allow(
    clippy::cast_possible_truncation,
    reason = "a count estimated in floating point, at least 0"
)]
fn guests_that_fit(limit: u64, daemon_per_guest: f64, writing_percent: usize) -> usize {
    let usable = limit as f64 * (1.0 - FD_MARGIN_SHARE) - FD_MARGIN;
    // The baseline's cats add one stdin end per written stream to ours.
    let bench = BENCH_FDS_PER_GUEST + 2.0 * writing_percent as f64 / 100.0;
    (usable / daemon_per_guest.max(bench)).max(0.0) as usize
}

/// The bench's end of one guest: what QEMU would hold.
struct GuestEnds {
    name: String,
    pipe: OwnedFd,
    console: UnixStream,
    pipe_log: PathBuf,
    console_log: PathBuf,
}

/// One round of the write phase and its baseline.
struct WriteRound {
    writers: usize,
    daemon_seconds: f64,
    daemon_cpu: Duration,
    cat_seconds: f64,
    cat_cpu: Duration,
}

/// Figures of one guest count.
struct Run {
    guests: usize,
    per_stream: u64,
    setup: Duration,
    empty: Footprint,
    idle: Footprint,
    after_writes: Footprint,
    write_peak_kib: u64,
    idle_cpu: Duration,
    rounds: Vec<WriteRound>,
    restarted: Footprint,
    /// Spawn to ready line, spawn to full listing, for each kind of start.
    term: Vec<(Duration, Duration)>,
    kill: Vec<(Duration, Duration)>,
    empty_start: Vec<(Duration, Duration)>,
    /// SIGTERM until exit, with the guests and with none.
    stop: Vec<Duration>,
    empty_stop: Vec<Duration>,
    problems: Vec<String>,
}

impl Run {
    fn kib_per_guest(&self) -> f64 {
        (self.idle.rss_kib as f64 - self.empty.rss_kib as f64) / self.guests as f64
    }

    fn fds_per_guest(&self) -> f64 {
        (self.idle.fds as f64 - self.empty.fds as f64) / self.guests as f64
    }
}

impl Scenario for GuestsArgs {
    const NAME: &'static str = "guests";

    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict> {
        run(bench, self)
    }
}

/// Runs the scenario and prints its report.
fn run(bench: &Bench, args: &GuestsArgs) -> anyhow::Result<Verdict> {
    let settings = Settings::from_args(args, bench)?;
    // The daemon keeps every round's logs; one round of the baseline's files at a time.
    bench.ensure_free(
        (settings.write_runs as u64 + 2) * settings.write_total,
        " ((--write-runs + 2) × --write-total)",
    )?;
    let parent = &bench.parent;
    let limit = procfs::raise_nofile();
    let machine = &bench.machine;
    println!(
        "conlog-bench guests: {} and {} guests, {}% of them writing {} in all in {} writes; {} restart(s) of each kind",
        settings.guests,
        settings.small,
        settings.writing_percent,
        size(settings.write_total),
        size(settings.chunk as u64),
        settings.restarts
    );
    println!("machine: {machine}");
    println!("conlogd: {}", bench.conlogd_text());
    println!("RLIMIT_NOFILE hard limit: {limit} (this process and the daemon raise their soft limit to it)");
    let scratch = bench.scratch.path();
    println!(
        "scratch (logs, state): {} on {}",
        scratch.display(),
        procfs::filesystem(scratch)
    );
    let runtime_parent = args.runtime_parent.clone().or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        shm.is_dir().then_some(shm)
    });
    let runtime_scratch = match runtime_parent {
        Some(dir) if dir != *parent => Some(Scratch::create(&dir, "guests-run")?),
        _ => None,
    };
    let places = Places {
        scratch: scratch.to_owned(),
        runtime: runtime_scratch.as_ref().map(|s| s.path().to_owned()),
    };
    let sockets = places.runtime.as_ref().unwrap_or(&places.scratch);
    println!(
        "runtime directories (sockets): {} on {}",
        sockets.display(),
        procfs::filesystem(sockets)
    );

    let mut runs = Vec::new();
    let mut daemon_per_guest = DAEMON_FDS_PER_GUEST;
    if settings.small > 0 {
        let small = settings.small.min(guests_that_fit(
            limit,
            daemon_per_guest,
            settings.writing_percent,
        ));
        let run = measure(bench, &places, &settings, small)?;
        daemon_per_guest = daemon_per_guest.max(run.fds_per_guest());
        runs.push(run);
    }
    let fit = guests_that_fit(limit, daemon_per_guest, settings.writing_percent);
    let guests = if settings.guests > fit {
        println!(
            "\nCAPPED: {} guests need about {:.0} descriptors in the daemon ({daemon_per_guest:.1} per guest) \
             and the hard RLIMIT_NOFILE is {limit}, which an unprivileged process cannot raise; \
             running {fit} guests (limit − {:.0}% − {FD_MARGIN:.0} kept free) and extrapolating per guest.",
            settings.guests,
            settings.guests as f64 * daemon_per_guest,
            FD_MARGIN_SHARE * 100.0
        );
        fit
    } else {
        settings.guests
    };
    if guests != settings.small || settings.small == 0 {
        runs.push(measure(bench, &places, &settings, guests)?);
    }
    let placement = format!(
        "logs and state on {}, sockets on {}",
        procfs::filesystem(&places.scratch),
        procfs::filesystem(sockets)
    );
    print_report(&settings, machine, &placement, limit, &runs);
    Ok(Verdict::wrong_if(
        runs.iter().any(|r| !r.problems.is_empty()),
    ))
}

/// Where the daemons' directories go.
struct Places {
    scratch: PathBuf,
    /// Where their runtime directories go instead, if not in `scratch`.
    runtime: Option<PathBuf>,
}

impl Places {
    /// A new directory `name` for a daemon in the scratch directory, its `run` (the runtime
    /// directory) a symlink into the runtime parent when there is one.
    fn daemon_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.scratch.join(name);
        fs::create_dir_all(&dir)?;
        if let Some(parent) = &self.runtime {
            let target = parent.join(name);
            fs::create_dir_all(&target)?;
            std::os::unix::fs::symlink(&target, dir.join("run")).with_context(|| {
                format!("cannot link {} to {}", dir.display(), target.display())
            })?;
        }
        Ok(dir)
    }

    /// Removes what [`daemon_dir`](Self::daemon_dir) made.
    fn remove(&self, name: &str) {
        let _ = fs::remove_dir_all(self.scratch.join(name));
        if let Some(parent) = &self.runtime {
            let _ = fs::remove_dir_all(parent.join(name));
        }
    }
}

/// Every phase for one guest count, on a fresh daemon in its own directory.
fn measure(
    bench: &Bench,
    places: &Places,
    settings: &Settings,
    guests: usize,
) -> anyhow::Result<Run> {
    let runtime = &bench.runtime;
    println!("\n== {guests} guests ==");
    let name = format!("guests-{guests}");
    let dir = places.daemon_dir(&name)?;
    let daemon = bench.start(&dir)?;
    let pid = daemon.pid();
    let mut agent = runtime
        .block_on(daemon.agent())?
        .max_decoding_message_size(MAX_MESSAGE);
    std::thread::sleep(REST);
    let empty = Footprint::read(pid)?;

    let started = Instant::now();
    let limits = settings.limits(guests);
    let mut ends = Vec::with_capacity(guests);
    for i in 0..guests {
        let end = runtime
            .block_on(create_guest(&mut agent, &format!("g{i:05}"), &limits))
            .with_context(|| {
                format!(
                    "setting up guest {i} of {guests}; conlogd's stderr:\n{}",
                    daemon.stderr_tail()
                )
            })?;
        ends.push(end);
    }
    let setup = started.elapsed();
    println!(
        "set up {guests} guests in {:.2} s ({:.0} guests/s)",
        setup.as_secs_f64(),
        guests as f64 / setup.as_secs_f64()
    );
    let mut problems = Vec::new();
    let listing = runtime.block_on(list(&mut agent))?;
    problems.extend(check_served(&ends, &listing));

    let cpu_before_rest = procfs::cpu_time(pid)?;
    std::thread::sleep(REST);
    let idle_cpu = procfs::cpu_time(pid)?.saturating_sub(cpu_before_rest);
    let idle = Footprint::read(pid)?;
    println!(
        "at rest: RSS {} KiB ({} with no guest): {:.1} KiB per guest; {} descriptors ({} with no guest); CPU {} ms in {} s",
        idle.rss_kib,
        empty.rss_kib,
        (idle.rss_kib as f64 - empty.rss_kib as f64) / guests as f64,
        idle.fds,
        empty.fds,
        idle_cpu.as_millis(),
        REST.as_secs()
    );

    // The write phase, `--write-runs` times with other guests each time, alternating with the
    // baseline (the daemon first in odd rounds, the cats first in even ones).
    let per_stream = settings.per_stream(guests);
    ensure!(
        settings.write_runs <= settings.spread(guests).1,
        "{guests} guests are too few for {} write rounds with other guests each",
        settings.write_runs
    );
    let pattern = Pattern::new(settings.chunk);
    let mut data = Vec::with_capacity(usize::try_from(per_stream).unwrap_or(0));
    pattern.write(&mut data, per_stream, settings.chunk)?;
    let data: Arc<[u8]> = data.into();
    let cat_dir = dir.join("cat");
    let mut written = Vec::new();
    let mut rounds = Vec::new();
    let mut write_peak_kib = 0;
    for round in 0..settings.write_runs {
        let writers = settings.writers(guests, round);
        let cats_first = round % 2 == 1;
        let mut cats = None;
        if cats_first {
            cats = Some(cat_write(
                runtime,
                &cat_dir,
                writers.len(),
                &data,
                settings.chunk,
            )?);
        }
        procfs::reset_peak_rss(pid)?;
        let sampler = RssSampler::start(pid, Duration::from_millis(20));
        let cpu_before = procfs::cpu_time(pid)?;
        let start = Instant::now();
        runtime.block_on(write_guests(&mut ends, &writers, &data, settings.chunk))?;
        let logs: Vec<&Path> = writers
            .iter()
            .flat_map(|&i| [ends[i].pipe_log.as_path(), ends[i].console_log.as_path()])
            .collect();
        wait_files(&logs, per_stream)?;
        let daemon_seconds = start.elapsed().as_secs_f64();
        let daemon_cpu = procfs::cpu_time(pid)?.saturating_sub(cpu_before);
        write_peak_kib = write_peak_kib
            .max(sampler.finish())
            .max(procfs::status_kib(pid, "VmHWM").unwrap_or(0));
        written.extend(&writers);
        written.sort_unstable();
        let listing = runtime.block_on(list(&mut agent))?;
        problems.extend(check_logged(&ends, &written, per_stream, &listing));
        problems.extend(check_files(&logs, &pattern, per_stream));
        let (cat_seconds, cat_cpu, outputs) = match cats {
            Some(cats) => cats,
            None => cat_write(runtime, &cat_dir, writers.len(), &data, settings.chunk)?,
        };
        let outputs: Vec<&Path> = outputs.iter().map(PathBuf::as_path).collect();
        problems.extend(check_files(&outputs, &pattern, per_stream));
        let _ = fs::remove_dir_all(&cat_dir);
        println!(
            "write round {}: {} guests × 2 streams × {} MiB: conlogd {daemon_seconds:.2} s, CPU {:.2} s; \
             {} cats {cat_seconds:.2} s, CPU {:.2} s (from each one's first read on)",
            round + 1,
            writers.len(),
            mib(per_stream >> 10),
            daemon_cpu.as_secs_f64(),
            2 * writers.len(),
            cat_cpu.as_secs_f64()
        );
        rounds.push(WriteRound {
            writers: writers.len(),
            daemon_seconds,
            daemon_cpu,
            cat_seconds,
            cat_cpu,
        });
    }
    std::thread::sleep(REST);
    let after_writes = Footprint::read(pid)?;

    // Restarts with every guest registered.
    runtime.block_on(hang_up(agent));
    let mut daemon = Some(daemon);
    let (mut term, mut kill, mut empty_start) = (vec![], vec![], vec![]);
    let (mut stop, mut empty_stop) = (vec![], vec![]);
    for round in 0..settings.restarts {
        let empty_name = format!("empty-{guests}-{round}");
        let empty_dir = places.daemon_dir(&empty_name)?;
        let (fresh, times) = timed_start(bench, &empty_dir, 0)?;
        let stopping = Instant::now();
        fresh.stop()?;
        empty_stop.push(stopping.elapsed());
        empty_start.push(times);
        places.remove(&empty_name);

        let stopping = Instant::now();
        daemon.take().context("no daemon")?.stop()?;
        stop.push(stopping.elapsed());
        let (restarted, times) = timed_start(bench, &dir, guests)?;
        term.push(times);
        // SIGKILL (the daemon's drop) and start again: crash recovery.
        drop(restarted);
        let (restarted, times) = timed_start(bench, &dir, guests)?;
        kill.push(times);
        daemon = Some(restarted);
    }
    let daemon = daemon.context("no daemon")?;
    std::thread::sleep(REST);
    let restarted = Footprint::read(daemon.pid())?;
    println!(
        "restart with {guests} guests: SIGTERM → serving {:.3} s, SIGKILL → serving {:.3} s, empty → serving {:.3} s (medians); RSS after restart {} KiB",
        median_seconds(term.iter().map(|t| t.1)),
        median_seconds(kill.iter().map(|t| t.1)),
        median_seconds(empty_start.iter().map(|t| t.1)),
        restarted.rss_kib
    );
    daemon.stop()?;
    drop(ends);
    places.remove(&name);
    for problem in &problems {
        println!("WRONG: {problem}");
    }
    Ok(Run {
        guests,
        per_stream,
        setup,
        empty,
        idle,
        after_writes,
        write_peak_kib,
        idle_cpu,
        rounds,
        restarted,
        term,
        kill,
        empty_start,
        empty_stop,
        stop,
        problems,
    })
}

/// A log pipe (claimed) and a console (its guest socket connected) for `guest`.
async fn create_guest(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    limits: &LogLimits,
) -> anyhow::Result<GuestEnds> {
    let (fd, pipe) = common::create_pipe(agent, guest, STREAM, Some(*limits)).await?;
    let (connection, console) = common::create_console(agent, guest, DEVICE, Some(*limits)).await?;
    Ok(GuestEnds {
        name: guest.into(),
        pipe: fd,
        console: connection,
        pipe_log: pipe.log_path.into(),
        console_log: console.log_path.into(),
    })
}

/// Every guest as `ListGuests` shows it.
async fn list(agent: &mut AgentClient<Channel>) -> anyhow::Result<HashMap<String, GuestInfo>> {
    let reply = agent
        .list_guests(ListGuestsRequest::default())
        .await
        .context("ListGuests failed")?
        .into_inner();
    Ok(reply
        .guests
        .into_iter()
        .map(|guest| (guest.name.clone(), guest))
        .collect())
}

/// What is wrong with the guests being served: every pipe open with its writer, every console
/// with its guest connected.
fn check_served(ends: &[GuestEnds], listing: &HashMap<String, GuestInfo>) -> Vec<String> {
    let mut bad = Vec::new();
    for end in ends {
        let streams = listing.get(&end.name).map_or(&[][..], |g| &g.streams[..]);
        let pipe_ok = streams
            .iter()
            .any(|s| s.name == STREAM && s.kind() == StreamKind::Pipe && s.open && s.writers == 1);
        let console_ok = streams
            .iter()
            .any(|s| s.name == DEVICE && s.kind() == StreamKind::Console && s.guest_connected);
        if !(pipe_ok && console_ok) {
            bad.push(end.name.as_str());
        }
    }
    if bad.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "{} of {} guests not fully served (pipe open with a writer, console guest connected), first {:?}",
        bad.len(),
        ends.len(),
        &bad[..bad.len().min(5)]
    )]
}

/// What is wrong with the offsets after the write phase.
fn check_logged(
    ends: &[GuestEnds],
    writers: &[usize],
    per_stream: u64,
    listing: &HashMap<String, GuestInfo>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, end) in ends.iter().enumerate() {
        let expected = if writers.binary_search(&i).is_ok() {
            per_stream
        } else {
            0
        };
        let streams = listing.get(&end.name).map_or(&[][..], |g| &g.streams[..]);
        for name in [STREAM, DEVICE] {
            match streams.iter().find(|s| s.name == name) {
                Some(s) if s.offset == expected && s.dropped_bytes == 0 => {}
                Some(s) => problems.push(format!(
                    "{}/{name}: offset {} (expected {expected}), {} dropped",
                    end.name, s.offset, s.dropped_bytes
                )),
                None => problems.push(format!("{}/{name} missing from ListGuests", end.name)),
            }
        }
    }
    problems.truncate(10);
    problems
}

/// What is wrong with the files: each must hold exactly the first `len` bytes of the pattern.
fn check_files(files: &[&Path], pattern: &Pattern, len: u64) -> Vec<String> {
    let mut problems = Vec::new();
    for file in files {
        match fs::read(file) {
            Ok(data) if data.len() as u64 != len => problems.push(format!(
                "{}: {} bytes, {len} written",
                file.display(),
                data.len()
            )),
            Ok(data) => {
                if let Err(at) = pattern.check(0, &data) {
                    problems.push(format!(
                        "{}: byte at offset {at} differs from the byte written",
                        file.display()
                    ));
                }
            }
            Err(e) => problems.push(format!("cannot read {}: {e}", file.display())),
        }
    }
    problems.truncate(10);
    problems
}

/// `data` into `out` in `chunk` writes.
async fn feed(
    mut out: impl AsyncWrite + Unpin,
    data: Arc<[u8]>,
    chunk: usize,
) -> std::io::Result<()> {
    for piece in data.chunks(chunk) {
        out.write_all(piece).await?;
    }
    Ok(())
}

/// The chosen guests write `data` through their pipe and their console at once; their ends are
/// kept open afterwards (the guests stay).
async fn write_guests(
    ends: &mut [GuestEnds],
    writers: &[usize],
    data: &Arc<[u8]>,
    chunk: usize,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for &i in writers {
        let pipe = ends[i].pipe.try_clone()?;
        let console = ends[i].console.try_clone()?;
        console.set_nonblocking(true)?;
        let pipe = tokio::net::unix::pipe::Sender::from_owned_fd(pipe)?;
        let console = tokio::net::UnixStream::from_std(console)?;
        tasks.push(tokio::spawn(feed(pipe, data.clone(), chunk)));
        tasks.push(tokio::spawn(feed(console, data.clone(), chunk)));
    }
    for task in tasks {
        task.await?.context("writing as a guest failed")?;
    }
    Ok(())
}

/// Waits until every file is `len` bytes long.
fn wait_files(files: &[&Path], len: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    let mut pending: Vec<&Path> = files.to_vec();
    while !pending.is_empty() {
        pending.retain(|file| fs::metadata(file).map_or(true, |m| m.len() < len));
        if Instant::now() > deadline {
            bail!(
                "{} of {} log files still short of {len} bytes after {DEADLINE:?}, e.g. {}",
                pending.len(),
                files.len(),
                pending[0].display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// One baseline round in `dir` (removed by the caller): what [`run_cats`] returns.
fn cat_write(
    runtime: &Runtime,
    dir: &Path,
    count: usize,
    data: &Arc<[u8]>,
    chunk: usize,
) -> anyhow::Result<(f64, Duration, Vec<PathBuf>)> {
    fs::create_dir_all(dir)?;
    runtime.block_on(run_cats(dir, count, data, chunk))
}

/// `2 × count` cats, half reading a pipe and half a UNIX socket pair, each fed `data` at once;
/// the wall time from the first write until all have exited, their CPU from the moment each
/// sleeps in its first read (start-up excluded) until it exits, and their output files.
async fn run_cats(
    dir: &Path,
    count: usize,
    data: &Arc<[u8]>,
    chunk: usize,
) -> anyhow::Result<(f64, Duration, Vec<PathBuf>)> {
    let mut children: Vec<Child> = Vec::with_capacity(2 * count);
    let mut outputs = Vec::with_capacity(2 * count);
    let mut pipes = Vec::with_capacity(count);
    let mut sockets = Vec::with_capacity(count);
    for i in 0..2 * count {
        let output = dir.join(format!("cat-{i}.out"));
        let stdin: OwnedFd = if i % 2 == 0 {
            let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            pipes.push(write);
            read
        } else {
            let (ours, theirs) = UnixStream::pair()?;
            sockets.push(ours);
            theirs.into()
        };
        children.push(
            Command::new("cat")
                .stdin(Stdio::from(stdin))
                .stdout(File::create(&output)?)
                .spawn()
                .context("cannot start cat")?,
        );
        outputs.push(output);
    }
    // Once exec'd and loaded, a cat's first sleep is its first read of stdin.
    let (mut cpu_before, mut cpu_after) = (Duration::ZERO, Duration::ZERO);
    for child in &children {
        let pid = child.id();
        let deadline = Instant::now() + DEADLINE;
        while !(procfs::command_name(pid).is_ok_and(|name| name == "cat")
            && procfs::state(pid) == Some('S'))
        {
            ensure!(
                Instant::now() < deadline,
                "cat {pid} never waited for input"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        cpu_before += procfs::on_cpu(pid)?;
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for pipe in pipes {
        let pipe = tokio::net::unix::pipe::Sender::from_owned_fd(pipe)?;
        tasks.push(tokio::spawn(feed(pipe, data.clone(), chunk)));
    }
    for socket in sockets {
        socket.set_nonblocking(true)?;
        let socket = tokio::net::UnixStream::from_std(socket)?;
        tasks.push(tokio::spawn(feed(socket, data.clone(), chunk)));
    }
    for task in tasks {
        task.await?.context("writing to cat failed")?;
    }
    for mut child in children {
        // Wait without reaping, so its CPU time is still readable.
        procfs::wait_exited_unreaped(child.id())?;
        cpu_after += procfs::on_cpu(child.id())?;
        let status = child.wait()?;
        ensure!(status.success(), "cat exited with {status}");
    }
    Ok((
        start.elapsed().as_secs_f64(),
        cpu_after.saturating_sub(cpu_before),
        outputs,
    ))
}

/// Starts a daemon on `dir` and waits until it lists `guests` guests; the daemon, the time from
/// spawn to its ready line and to that listing.
fn timed_start(
    bench: &Bench,
    dir: &Path,
    guests: usize,
) -> anyhow::Result<(Daemon, (Duration, Duration))> {
    let spawned = Instant::now();
    let daemon = bench.start(dir)?;
    let ready = spawned.elapsed();
    let poll = Duration::from_millis(1);
    let listed = bench.runtime.block_on(async {
        let agent = common::wait_listed(&daemon.socket, guests, poll, spawned + DEADLINE)
            .await
            .with_context(|| format!("the restarted daemon, within {DEADLINE:?}"))?;
        let listed = spawned.elapsed();
        hang_up(agent).await;
        anyhow::Ok(listed)
    })?;
    Ok((daemon, (ready, listed)))
}

fn median_seconds(values: impl Iterator<Item = Duration>) -> f64 {
    median(&values.map(|d| d.as_secs_f64()).collect::<Vec<_>>())
}

fn seconds(value: f64) -> String {
    format!("{value:.3}")
}

/// Per-run table, the targets, and both again as markdown.
fn print_report(settings: &Settings, machine: &Machine, placement: &str, limit: u64, runs: &[Run]) {
    let mut memory = Table::new(&[
        "guests",
        "set-up s",
        "daemon fds/guest",
        "RSS no guest MiB",
        "RSS at rest MiB",
        "anon/file MiB",
        "KiB/guest",
        "RSS after writes MiB",
        "peak in writes MiB",
        "RSS after restart MiB",
        "threads",
        "idle CPU ms/s",
    ]);
    for r in runs {
        memory.row(vec![
            r.guests.to_string(),
            format!("{:.2}", r.setup.as_secs_f64()),
            format!("{:.2}", r.fds_per_guest()),
            mib(r.empty.rss_kib),
            mib(r.idle.rss_kib),
            format!("{}/{}", mib(r.idle.anon_kib), mib(r.idle.file_kib)),
            format!("{:.1}", r.kib_per_guest()),
            mib(r.after_writes.rss_kib),
            mib(r.write_peak_kib),
            mib(r.restarted.rss_kib),
            r.idle.threads.to_string(),
            format!(
                "{:.1}",
                r.idle_cpu.as_secs_f64() * 1000.0 / REST.as_secs_f64()
            ),
        ]);
    }

    let mut targets = Table::new(&[
        "measure", "guests", "conlogd", "baseline", "ratio", "target", "verdict",
    ]);
    let largest = runs.iter().map(|r| r.guests).max().unwrap_or(0);
    for r in runs {
        let n = r.guests;
        targets.row(vec![
            "served (pipe open, console connected) and every byte logged".into(),
            n.to_string(),
            if r.problems.is_empty() {
                "all"
            } else {
                "WRONG"
            }
            .into(),
            String::new(),
            String::new(),
            "all".into(),
            met(r.problems.is_empty()).into(),
        ]);
        let per_guest = r.kib_per_guest();
        targets.row(vec![
            "daemon RSS per guest at rest, KiB".into(),
            n.to_string(),
            format!("{per_guest:.1}"),
            String::new(),
            String::new(),
            format!("≤ {TARGET_KIB_PER_GUEST:.0}"),
            met(per_guest <= TARGET_KIB_PER_GUEST).into(),
        ]);
        // Extrapolated to the issue's 10,000 guests from the largest run only: linear in the
        // guests beyond the daemon with none.
        let scale = ISSUE_GUESTS as f64 / n as f64;
        if n == largest {
            let at_issue = r.empty.rss_kib as f64 + per_guest * ISSUE_GUESTS as f64;
            targets.row(vec![
                format!("daemon RSS at rest, MiB ({n} measured → {ISSUE_GUESTS} extrapolated)"),
                n.to_string(),
                format!("{} → {:.0}", mib(r.idle.rss_kib), at_issue / 1024.0),
                String::new(),
                String::new(),
                format!(
                    "≤ {:.0} at {ISSUE_GUESTS}",
                    TARGET_RSS_KIB_AT_ISSUE_GUESTS / 1024.0
                ),
                verdict_at_issue(at_issue <= TARGET_RSS_KIB_AT_ISSUE_GUESTS, n),
            ]);
        }
        if n <= VIRTLOGD_GUESTS {
            let rss = r.idle.rss_kib as f64;
            targets.row(vec![
                "daemon RSS at rest vs virtlogd (17 MiB), MiB".into(),
                n.to_string(),
                mib(r.idle.rss_kib),
                "17.0".into(),
                format!("{:.2}×", rss / VIRTLOGD_KIB),
                "≤ 1×".into(),
                met(rss <= VIRTLOGD_KIB).into(),
            ]);
        }
        let rounds = &r.rounds;
        let daemon_cpu = median_seconds(rounds.iter().map(|w| w.daemon_cpu));
        let cat_cpu = median_seconds(rounds.iter().map(|w| w.cat_cpu));
        let ratios: Vec<f64> = rounds
            .iter()
            .map(|w| w.daemon_cpu.as_secs_f64() / w.cat_cpu.as_secs_f64())
            .collect();
        let cpu_ratio = median(&ratios);
        // Below a few clock ticks (a --quick run) the ratio means nothing.
        let measurable = cat_cpu >= 0.05 && daemon_cpu >= 0.05;
        let per_round: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
        targets.row(vec![
            format!(
                "write phase CPU, s ({} guests × 2 streams × {} MiB; median of {}), vs cats; ratio per round {}",
                rounds.first().map_or(0, |w| w.writers),
                mib(r.per_stream >> 10),
                rounds.len(),
                per_round.join(" / ")
            ),
            n.to_string(),
            format!("{daemon_cpu:.2}"),
            format!("{cat_cpu:.2}"),
            if measurable {
                format!("{cpu_ratio:.2}×")
            } else {
                "-".into()
            },
            format!("≤ {TARGET_CPU_RATIO}×"),
            if measurable {
                met(cpu_ratio <= TARGET_CPU_RATIO)
            } else {
                "too few bytes"
            }
            .into(),
        ]);
        let daemon_wall = median(&rounds.iter().map(|w| w.daemon_seconds).collect::<Vec<_>>());
        let cat_wall = median(&rounds.iter().map(|w| w.cat_seconds).collect::<Vec<_>>());
        targets.row(vec![
            "write phase wall time, s (median), vs cats".into(),
            n.to_string(),
            seconds(daemon_wall),
            seconds(cat_wall),
            format!("{:.2}×", daemon_wall / cat_wall),
            String::new(),
            String::new(),
        ]);
        let empty_ready = median_seconds(r.empty_start.iter().map(|t| t.0));
        let empty_listed = median_seconds(r.empty_start.iter().map(|t| t.1));
        for (what, times) in [("SIGTERM", &r.term), ("SIGKILL", &r.kill)] {
            let ready = median_seconds(times.iter().map(|t| t.0));
            let listed = median_seconds(times.iter().map(|t| t.1));
            targets.row(vec![
                format!(
                    "{what}, restart: spawn → ready line, s (median of {}), vs no guest",
                    times.len()
                ),
                n.to_string(),
                seconds(ready),
                seconds(empty_ready),
                format!("{:.1}×", ready / empty_ready),
                String::new(),
                String::new(),
            ]);
            let mut row = vec![
                format!("{what}, restart: spawn → all guests listed, s"),
                n.to_string(),
                seconds(listed),
                seconds(empty_listed),
                format!("{:.1}×", listed / empty_listed),
                String::new(),
                String::new(),
            ];
            if n == largest {
                let at_issue = empty_listed + (listed - empty_listed) * scale;
                row[0] = format!(
                    "{what}, restart: spawn → all guests listed, s ({n} measured → {ISSUE_GUESTS} extrapolated)"
                );
                row[2] = format!("{} → {}", seconds(listed), seconds(at_issue));
                row[5] = format!("< {} s", TARGET_RESTART.as_secs());
                row[6] = verdict_at_issue(at_issue < TARGET_RESTART.as_secs_f64(), n);
            }
            targets.row(row);
        }
        targets.row(vec![
            "SIGTERM until exit, s (median)".into(),
            n.to_string(),
            seconds(median_seconds(r.stop.iter().copied())),
            seconds(median_seconds(r.empty_stop.iter().copied())),
            String::new(),
            String::new(),
            String::new(),
        ]);
        // A restart by a supervisor (systemctl restart): the old daemon's stop, then the new
        // one's start, until every guest is listed again.
        let down = median_seconds(r.stop.iter().zip(&r.term).map(|(s, t)| *s + t.1));
        let empty_down = median_seconds(
            r.empty_stop
                .iter()
                .zip(&r.empty_start)
                .map(|(s, t)| *s + t.1),
        );
        let mut row = vec![
            "SIGTERM + start: SIGTERM → all guests listed by the new daemon, s".to_owned(),
            n.to_string(),
            seconds(down),
            seconds(empty_down),
            format!("{:.1}×", down / empty_down),
            String::new(),
            String::new(),
        ];
        if n == largest {
            let at_issue = empty_down + (down - empty_down) * scale;
            row[0] = format!("{} ({n} measured → {ISSUE_GUESTS} extrapolated)", row[0]);
            row[2] = format!("{} → {}", seconds(down), seconds(at_issue));
            row[5] = format!("< {} s", TARGET_RESTART.as_secs());
            row[6] = verdict_at_issue(at_issue < TARGET_RESTART.as_secs_f64(), n);
        }
        targets.row(row);
    }

    println!();
    print!("{}", memory.text());
    println!();
    print!("{}", targets.text());
    println!();
    let sizes: Vec<String> = runs.iter().map(|r| r.guests.to_string()).collect();
    let caption = format!(
        "{} guests asked, {} run (RLIMIT_NOFILE hard limit {limit}); {}% writing {} in all in {} writes; \
         {} restart(s) of each kind. Machine: {machine}; {placement}.",
        settings.guests,
        sizes.join(" and "),
        settings.writing_percent,
        size(settings.write_total),
        size(settings.chunk as u64),
        settings.restarts
    );
    report::print_markdown(Some(&caption), &[&memory, &targets]);
}

/// The verdict on a target set at the issue's guest count, measured with `measured` guests: a
/// figure extrapolated from fewer guests says so (docs/performance.md labels it the same way).
fn verdict_at_issue(ok: bool, measured: usize) -> String {
    if measured >= ISSUE_GUESTS {
        met(ok).into()
    } else {
        format!("{} (extrapolated)", met(ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_are_spread_and_counted() {
        let settings = Settings {
            guests: 0,
            small: 0,
            writing_percent: 10,
            write_total: 1000,
            chunk: 16,
            restarts: 1,
            write_runs: 3,
        };
        assert_eq!(
            settings.writers(100, 0),
            (0..10).map(|i| i * 10).collect::<Vec<_>>()
        );
        assert_eq!(
            settings.writers(100, 2),
            (0..10).map(|i| i * 10 + 2).collect::<Vec<_>>()
        );
        assert_eq!(settings.writers(5, 0), vec![0]);
        assert_eq!(settings.writers(205, 0).len(), 21);
        assert_eq!(settings.spread(205), (21, 9));
        assert_eq!(settings.per_stream(100), 50);
    }

    #[test]
    fn descriptor_cap() {
        // 20,000 descriptors, 10 % and 256 kept: 17,744 usable at 6 per guest.
        assert_eq!(guests_that_fit(20_000, 6.0, 10), 2957);
        // The bench's share binds when the daemon needs less than it.
        assert_eq!(guests_that_fit(20_000, 1.0, 10), 8065);
    }
}
