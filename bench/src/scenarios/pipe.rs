//! Scenario `pipe` (docs/performance.md, "Log pipe throughput" and scenario 1): log pipe throughput.
//!
//! conlogd: a fresh daemon per run; `CreateLogPipe` with rotation on, the write end claimed
//! through `fd.sock`, `--size` bytes written in `--chunk` writes, the descriptor closed. The
//! clock runs from the first write until `ListGuests` shows the stream closed with every byte
//! logged (polled every millisecond, and only once the last write has returned, so polling
//! costs the daemon nothing while it moves data).
//!
//! Baseline: `cat > FILE` in the same scratch directory (same file system), its stdin a pipe
//! with the kernel's default buffer, as a shell would give it; the same bytes written the same
//! way; the clock runs from the first write until `cat` has exited.
//!
//! With `--without-index-too` a third side runs conlogd with `logs.time_index: false`, so the
//! time index's cost is measured in the same run (docs/performance.md, "Time index").
//!
//! The sides alternate (conlogd first in odd runs, cat first in even ones, so slow drift of a
//! shared machine hits both alike); the medians are compared. Neither side syncs to disk: both
//! measure the path into the page cache, as a guest printing does.
//!
//! Every conlogd run is checked: offset = size, no byte dropped, total bytes on disk (time
//! indexes included) within `max_size × (max_backups + 1)` and at least what rotation must keep, and every byte still
//! on disk equal to what was written at that offset. The baseline's file is checked too.

use crate::common::{self, hang_up};
use crate::data::Pattern;
use crate::procfs::{self, CpuShares, Machine, MachineCpu, RssSampler};
use crate::report::{self, median, met, mib_per_s, size, Table, Verdict};
use crate::scenario::{alternate, Bench, Scenario};
use anyhow::{bail, Context};
use conlog::config::ByteSize;
use conlog::proto::agent_client::AgentClient;
use conlog::proto::StreamInfo;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const GUEST: &str = "bench";
const STREAM: &str = "qemu";
/// `ListGuests` poll interval once the writer is done.
const POLL: Duration = Duration::from_millis(1);
/// Resident memory sampling interval.
const SAMPLE: Duration = Duration::from_millis(20);
/// Most time the daemon may need to log the bytes already in its pipe.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Targets (docs/performance.md, "Log pipe throughput").
const TARGET_RATIO: f64 = 0.9;
const TARGET_RSS_GROWTH_KIB: u64 = 2048;
/// Below this idle share of the machine's CPU before the runs, warn that others are busy.
const BUSY_WARNING: f64 = 0.8;
/// Room a log file keeps for the time index entries of one write (docs/design.md, "Time
/// index").
const INDEX_WRITE_RESERVE: u64 = 224;
/// Free space required, as a multiple of `--size`.
const FREE_SPACE_FACTOR: u64 = 3;

/// Options of `conlog-bench pipe`.
#[derive(clap::Args)]
pub struct PipeArgs {
    /// Bytes written per run [default: 1GiB, or 64MiB with --quick].
    #[arg(long, value_parser = ByteSize::parse)]
    size: Option<ByteSize>,
    /// Bytes per write(2).
    #[arg(long, value_parser = ByteSize::parse, default_value = "128KiB")]
    chunk: ByteSize,
    /// Log file size at which conlogd rotates.
    #[arg(long, value_parser = ByteSize::parse, default_value = "2MiB")]
    max_size: ByteSize,
    /// Rotated files conlogd keeps.
    #[arg(long, default_value_t = 3)]
    max_backups: u32,
    /// Runs of each side [default: 3, or 1 with --quick].
    #[arg(long)]
    runs: Option<u32>,
    /// Pipe buffer of the baseline's stdin [default: the kernel's, as a shell gives cat]. For
    /// analysis only.
    #[arg(long, value_parser = ByteSize::parse)]
    cat_pipe_size: Option<ByteSize>,
    /// For analysis: a shell command run during every conlogd run, `{pid}` replaced by the
    /// daemon's pid (e.g. 'strace -c -f -p {pid}' or 'perf stat -p {pid}'); started before the
    /// first write, sent SIGINT once everything is logged. Its output goes to stderr. Figures
    /// taken with it attached are not the daemon's.
    #[arg(long, value_name = "COMMAND")]
    attach: Option<String>,
    /// Also run conlogd with `logs.time_index: false` (a third side, alternating with the
    /// others), to compare the cost of the time index in the same run.
    #[arg(long)]
    without_index_too: bool,
}

/// The resolved parameters of one invocation.
struct Settings {
    size: u64,
    chunk: usize,
    max_size: u64,
    max_backups: u32,
    runs: u32,
    cat_pipe_size: Option<usize>,
    attach: Option<String>,
    without_index_too: bool,
}

impl Settings {
    fn from_args(args: &PipeArgs, bench: &Bench) -> anyhow::Result<Self> {
        let settings = Self {
            size: bench.size(args.size.map(ByteSize::bytes), 64 << 20, 1 << 30),
            chunk: usize::try_from(args.chunk.bytes()).context("--chunk too large")?,
            max_size: args.max_size.bytes(),
            max_backups: args.max_backups,
            runs: bench.size(args.runs, 1, 3),
            cat_pipe_size: args
                .cat_pipe_size
                .map(|s| usize::try_from(s.bytes()))
                .transpose()
                .context("--cat-pipe-size too large")?,
            attach: args.attach.clone(),
            without_index_too: args.without_index_too,
        };
        if settings.size == 0 || settings.runs == 0 {
            bail!("--size and --runs must be at least 1");
        }
        if settings.chunk == 0 || settings.chunk > 64 << 20 {
            bail!("--chunk must be between 1B and 64MiB");
        }
        Ok(settings)
    }

    /// The most bytes the stream may keep on disk.
    fn disk_cap(&self) -> u64 {
        self.max_size * (u64::from(self.max_backups) + 1)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Conlogd,
    /// conlogd with `logs.time_index: false`.
    NoIndex,
    Cat,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Conlogd => "conlogd",
            Target::NoIndex => "no-index",
            Target::Cat => "cat",
        }
    }
}

/// One timed run.
struct Sample {
    target: Target,
    run: u32,
    /// First write until everything is logged (conlogd) or cat has exited.
    seconds: f64,
    /// Of that, after the last write returned.
    drain: Duration,
    /// CPU (user + system) of the daemon or of cat during the run.
    cpu: Duration,
    /// CPU of this process (the writer) during the run.
    writer_cpu: Duration,
    /// How the machine's CPUs spent the run.
    machine: CpuShares,
    pipe_size: usize,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    /// What the check found wrong; empty when the run is correct.
    problems: Vec<String>,
}

impl Sample {
    fn rss_growth_kib(&self) -> u64 {
        self.rss_peak_kib.saturating_sub(self.rss_before_kib)
    }
}

impl Scenario for PipeArgs {
    const NAME: &'static str = "pipe";

    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict> {
        run(bench, self)
    }
}

/// Runs the scenario and prints its report.
fn run(bench: &Bench, args: &PipeArgs) -> anyhow::Result<Verdict> {
    let settings = Settings::from_args(args, bench)?;
    bench.ensure_free(
        FREE_SPACE_FACTOR * settings.size,
        &format!(" ({FREE_SPACE_FACTOR}× --size); pass --work-dir or a smaller --size"),
    )?;
    let scratch = bench.scratch.path();
    let pattern = Pattern::new(settings.chunk);

    let machine = &bench.machine;
    let filesystem = procfs::filesystem(scratch);
    println!(
        "conlog-bench pipe: {} in {} writes; conlogd rotates at {} keeping {} backups; {} run(s) each, alternating",
        size(settings.size),
        size(settings.chunk as u64),
        size(settings.max_size),
        settings.max_backups,
        settings.runs
    );
    println!("machine: {machine}");
    println!("scratch: {} on {filesystem}", scratch.display());
    println!("conlogd: {}", bench.conlogd_text());
    let before = MachineCpu::read();
    std::thread::sleep(Duration::from_millis(500));
    let quiet = MachineCpu::read().since(&before);
    if quiet.idle + quiet.iowait < BUSY_WARNING {
        println!(
            "WARNING: the machine is busy before the first run: {:.0}% of its CPU time is in use by others; figures will be noisy",
            (1.0 - quiet.idle - quiet.iowait) * 100.0
        );
    }
    println!();

    let mut samples = Vec::new();
    for run in 1..=settings.runs {
        for target in alternate(run, [Target::Conlogd, Target::NoIndex, Target::Cat]) {
            if target == Target::NoIndex && !settings.without_index_too {
                continue;
            }
            let dir = scratch.join(format!("{}-{run}", target.name()));
            let sample = match target {
                Target::Conlogd | Target::NoIndex => {
                    run_conlogd(bench, &dir, &settings, &pattern, run, target)
                }
                Target::Cat => run_cat(&dir, &settings, &pattern, run),
            };
            // 1 GiB per run: never keep a run's files around.
            let _ = fs::remove_dir_all(&dir);
            let sample = sample.with_context(|| format!("{} run {run}", target.name()))?;
            println!(
                "run {run} {:<7} {:>8.1} MiB/s  {:.3} s  CPU {:.2} s (writer {:.2} s)  idle {:.0}%  iowait {:.0}%  steal {:.0}%  RSS +{} KiB  {}",
                target.name(),
                mib_per_s(settings.size, sample.seconds),
                sample.seconds,
                sample.cpu.as_secs_f64(),
                sample.writer_cpu.as_secs_f64(),
                sample.machine.idle * 100.0,
                sample.machine.iowait * 100.0,
                sample.machine.steal * 100.0,
                sample.rss_growth_kib(),
                report::outcome(&sample.problems)
            );
            samples.push(sample);
        }
    }

    print_report(&settings, machine, &filesystem, &samples);
    Ok(Verdict::wrong_if(
        samples.iter().any(|s| !s.problems.is_empty()),
    ))
}

/// One conlogd run in a fresh daemon whose directories are under `dir`.
fn run_conlogd(
    bench: &Bench,
    dir: &Path,
    settings: &Settings,
    pattern: &Pattern,
    run: u32,
    target: Target,
) -> anyhow::Result<Sample> {
    let runtime = &bench.runtime;
    let daemon = if target == Target::NoIndex {
        fs::create_dir_all(dir)?;
        let config = dir.join("config.yaml");
        fs::write(&config, "logs:\n  time_index: false\n")?;
        bench.start_with(dir, &["--config", &config.to_string_lossy()])?
    } else {
        bench.start(dir)?
    };
    let pid = daemon.pid();
    let mut agent = runtime.block_on(daemon.agent())?;
    let limits = common::rotating(settings.max_size, settings.max_backups);
    let (fd, created) =
        runtime.block_on(common::create_pipe(&mut agent, GUEST, STREAM, Some(limits)))?;
    let pipe_size = rustix::pipe::fcntl_getpipe_size(fd.as_fd())?;
    let mut writer = File::from(fd);
    let observer = match &settings.attach {
        Some(command) => Some(Observer::start(command, pid)?),
        None => None,
    };

    procfs::reset_peak_rss(pid)?;
    let rss_before_kib = procfs::rss_kib(pid)?;
    let cpu_before = procfs::cpu_time(pid)?;
    let sampler = RssSampler::start(pid, SAMPLE);
    let machine_before = MachineCpu::read();
    let writer_before = procfs::cpu_time(std::process::id())?;

    let start = Instant::now();
    pattern
        .write(&mut writer, settings.size, settings.chunk)
        .context("writing to the log pipe failed")?;
    drop(writer);
    let written = Instant::now();
    let info = runtime.block_on(wait_logged(&mut agent, settings.size))?;
    let done = Instant::now();

    let machine = MachineCpu::read().since(&machine_before);
    let writer_cpu = procfs::cpu_time(std::process::id())?.saturating_sub(writer_before);
    let cpu = procfs::cpu_time(pid)?.saturating_sub(cpu_before);
    let sampled_peak = sampler.finish();
    let hwm = procfs::status_kib(pid, "VmHWM")?;
    if let Some(observer) = observer {
        observer.finish()?;
    }
    let problems = check_log(&info, Path::new(&created.log_path), settings, pattern)?;
    runtime.block_on(hang_up(agent));
    daemon.stop()?;
    Ok(Sample {
        target,
        run,
        seconds: (done - start).as_secs_f64(),
        drain: done - written,
        cpu,
        writer_cpu,
        machine,
        pipe_size,
        rss_before_kib,
        rss_peak_kib: sampled_peak.max(hwm),
        problems,
    })
}

/// A profiler or tracer attached to the daemon (`--attach`).
struct Observer(std::process::Child);

impl Observer {
    /// How long a tracer gets to attach before the first write.
    const SETTLE: Duration = Duration::from_millis(500);

    fn start(command: &str, pid: u32) -> anyhow::Result<Self> {
        let command = command.replace("{pid}", &pid.to_string());
        eprintln!("attaching: {command}");
        let child = Command::new("sh")
            .args(["-c", &format!("exec {command}")])
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot run {command:?}"))?;
        std::thread::sleep(Self::SETTLE);
        Ok(Self(child))
    }

    /// Interrupts it (tracers print their summary on SIGINT) and waits for it.
    fn finish(mut self) -> anyhow::Result<()> {
        if let Some(pid) = i32::try_from(self.0.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        self.0.wait()?;
        Ok(())
    }
}

/// Polls `ListGuests` until the stream is closed with every byte logged; its last state.
async fn wait_logged(agent: &mut AgentClient<Channel>, size: u64) -> anyhow::Result<StreamInfo> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    // Closed short of `size` is wrong, but give late bytes a moment before reporting it.
    let mut closed_short_since = None;
    loop {
        let info = common::stream_info(agent, GUEST, STREAM).await?;
        if !info.open && info.offset >= size {
            return Ok(info);
        }
        if !info.open {
            let since = *closed_short_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                return Ok(info);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "after {DRAIN_TIMEOUT:?} the daemon has logged {} of {size} bytes (open: {})",
                info.offset,
                info.open
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What is wrong with the stream after a run: its counters and every file it keeps.
fn check_log(
    info: &StreamInfo,
    log_path: &Path,
    settings: &Settings,
    pattern: &Pattern,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    if info.offset != settings.size {
        problems.push(format!(
            "offset {} after writing {} bytes",
            info.offset, settings.size
        ));
    }
    if info.dropped_bytes != 0 {
        problems.push(format!("{} bytes dropped", info.dropped_bytes));
    }
    // Every file of the stream in its directory, whatever its name.
    let dir = log_path.parent().context("log path has no directory")?;
    let file_name = log_path
        .file_name()
        .context("log path has no file name")?
        .to_string_lossy()
        .into_owned();
    let (mut in_dir, mut indexes) = (0u64, 0u64);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&file_name) {
            in_dir += entry.metadata()?.len();
            if name.ends_with(".idx") {
                indexes += entry.metadata()?.len();
            }
        }
    }
    if in_dir > settings.disk_cap() {
        problems.push(format!(
            "{in_dir} bytes on disk, over the cap of {}",
            settings.disk_cap()
        ));
    }
    // Oldest first: .N … .1, then the current file.
    let backups = conlog::logfile::backups_of(log_path, settings.max_backups + 100);
    if backups.len() > settings.max_backups as usize {
        problems.push(format!(
            "{} backups kept, {} allowed",
            backups.len(),
            settings.max_backups
        ));
    }
    let mut data = Vec::new();
    for (path, _) in backups.iter().rev() {
        data.extend(fs::read(path)?);
    }
    data.extend(fs::read(log_path)?);
    let on_disk = data.len() as u64;
    if on_disk + indexes != in_dir {
        problems.push(format!(
            "{in_dir} bytes in the stream's files, {on_disk} in .log and its numbered backups \
             and {indexes} in their time indexes"
        ));
    }
    // Full backups plus the current file: at least max_backups × max_size once rotated, less
    // what the time indexes take of each file (and the room each keeps for one write's
    // entries, docs/design.md "Time index").
    let kept_for_entries = if indexes > 0 {
        INDEX_WRITE_RESERVE * (u64::from(settings.max_backups) + 1)
    } else {
        0
    };
    let must_keep = settings
        .size
        .min(settings.max_size * u64::from(settings.max_backups))
        .saturating_sub(indexes + kept_for_entries);
    if on_disk < must_keep {
        problems.push(format!(
            "only {on_disk} bytes kept on disk, rotation should keep at least {must_keep}"
        ));
    }
    let first = info.offset.saturating_sub(on_disk);
    if info.first_offset != first {
        problems.push(format!(
            "ListGuests says the oldest byte on disk is {}, the files say {first}",
            info.first_offset
        ));
    }
    if let Err(at) = pattern.check(first, &data) {
        problems.push(format!(
            "byte at offset {at} on disk differs from the byte written there"
        ));
    }
    Ok(problems)
}

/// One baseline run: `cat > dir/cat.out`.
fn run_cat(dir: &Path, settings: &Settings, pattern: &Pattern, run: u32) -> anyhow::Result<Sample> {
    fs::create_dir_all(dir)?;
    let out_path = dir.join("cat.out");
    let out = File::create(&out_path)?;
    let mut child = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("cannot start cat")?;
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin is piped");
    if let Some(bytes) = settings.cat_pipe_size {
        rustix::pipe::fcntl_setpipe_size(&stdin, bytes)?;
    }
    let pipe_size = rustix::pipe::fcntl_getpipe_size(&stdin)?;
    // Start the clock once cat runs, not while it is still being exec'd.
    let exec_deadline = Instant::now() + Duration::from_secs(2);
    while procfs::command_name(pid).is_ok_and(|name| name != "cat")
        && Instant::now() < exec_deadline
    {
        std::thread::sleep(Duration::from_micros(100));
    }
    let rss_before_kib = procfs::rss_kib(pid).unwrap_or(0);
    let cpu_before = procfs::cpu_time(pid)?;
    let sampler = RssSampler::start(pid, SAMPLE);
    let machine_before = MachineCpu::read();
    let writer_before = procfs::cpu_time(std::process::id())?;

    let start = Instant::now();
    pattern
        .write(&mut stdin, settings.size, settings.chunk)
        .context("writing to cat failed")?;
    drop(stdin);
    let written = Instant::now();
    // Wait without reaping, so cat's CPU time is still readable.
    procfs::wait_exited_unreaped(pid)?;
    let done = Instant::now();
    let machine = MachineCpu::read().since(&machine_before);
    let writer_cpu = procfs::cpu_time(std::process::id())?.saturating_sub(writer_before);
    let cpu = procfs::cpu_time(pid)?.saturating_sub(cpu_before);
    let rss_peak_kib = sampler.finish();
    let status = child.wait()?;

    let mut problems = Vec::new();
    if !status.success() {
        problems.push(format!("cat exited with {status}"));
    }
    let mut file = File::open(&out_path)?;
    let len = file.metadata()?.len();
    if len != settings.size {
        problems.push(format!(
            "{len} bytes in the file after writing {}",
            settings.size
        ));
    }
    let tail = len.min(1 << 20);
    file.seek(SeekFrom::Start(len - tail))?;
    let mut data = Vec::with_capacity(tail as usize);
    file.read_to_end(&mut data)?;
    if let Err(at) = pattern.check(len - tail, &data) {
        problems.push(format!("byte at offset {at} differs from the byte written"));
    }
    Ok(Sample {
        target: Target::Cat,
        run,
        seconds: (done - start).as_secs_f64(),
        drain: done - written,
        cpu,
        writer_cpu,
        machine,
        pipe_size,
        rss_before_kib,
        rss_peak_kib,
        problems,
    })
}

/// Per-run table, summary against the targets, and the summary again as markdown.
fn print_report(settings: &Settings, machine: &Machine, filesystem: &str, samples: &[Sample]) {
    let mut runs = Table::new(&[
        "run",
        "target",
        "MiB/s",
        "seconds",
        "drain ms",
        "CPU s",
        "writer CPU s",
        "idle %",
        "iowait %",
        "steal %",
        "pipe buffer",
        "RSS before KiB",
        "RSS peak KiB",
        "growth KiB",
        "check",
    ]);
    for s in samples {
        runs.row(vec![
            s.run.to_string(),
            s.target.name().to_owned(),
            format!("{:.1}", mib_per_s(settings.size, s.seconds)),
            format!("{:.3}", s.seconds),
            format!("{:.1}", s.drain.as_secs_f64() * 1000.0),
            format!("{:.2}", s.cpu.as_secs_f64()),
            format!("{:.2}", s.writer_cpu.as_secs_f64()),
            format!("{:.0}", s.machine.idle * 100.0),
            format!("{:.0}", s.machine.iowait * 100.0),
            format!("{:.0}", s.machine.steal * 100.0),
            size(s.pipe_size as u64),
            s.rss_before_kib.to_string(),
            s.rss_peak_kib.to_string(),
            s.rss_growth_kib().to_string(),
            if s.problems.is_empty() { "ok" } else { "WRONG" }.to_owned(),
        ]);
    }
    println!();
    print!("{}", runs.text());

    let of = |target: Target| samples.iter().filter(move |s| s.target == target);
    let throughput = |target: Target| {
        let values: Vec<f64> = of(target)
            .map(|s| mib_per_s(settings.size, s.seconds))
            .collect();
        let (lo, hi) = values.iter().fold((f64::INFINITY, 0f64), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
        (median(&values), lo, hi)
    };
    let cpu_per_gib = |target: Target| {
        let values: Vec<f64> = of(target)
            .map(|s| s.cpu.as_secs_f64() * (1u64 << 30) as f64 / settings.size as f64)
            .collect();
        median(&values)
    };
    let (daemon_mib, daemon_lo, daemon_hi) = throughput(Target::Conlogd);
    let (cat_mib, cat_lo, cat_hi) = throughput(Target::Cat);
    let ratio = daemon_mib / cat_mib;
    let daemon_cpu = cpu_per_gib(Target::Conlogd);
    let cat_cpu = cpu_per_gib(Target::Cat);
    let growth = of(Target::Conlogd)
        .map(Sample::rss_growth_kib)
        .max()
        .unwrap_or(0);
    let pipe_of = |target: Target| of(target).next().map_or(0, |s| s.pipe_size as u64);

    let mut summary = Table::new(&[
        "measure",
        "conlogd",
        "cat",
        "conlogd / cat",
        "target",
        "verdict",
    ]);
    summary.row(vec![
        format!("throughput, MiB/s (median of {})", settings.runs),
        format!("{daemon_mib:.0}"),
        format!("{cat_mib:.0}"),
        format!("{ratio:.2}×"),
        format!("≥ {TARGET_RATIO:.1}×"),
        met(ratio >= TARGET_RATIO).to_owned(),
    ]);
    if of(Target::NoIndex).next().is_some() {
        let (off_mib, off_lo, off_hi) = throughput(Target::NoIndex);
        summary.row(vec![
            format!("throughput without the time index, MiB/s (median; {off_lo:.0}–{off_hi:.0})"),
            format!("{off_mib:.0}"),
            format!("{cat_mib:.0}"),
            format!("{:.2}×", off_mib / cat_mib),
            String::new(),
            String::new(),
        ]);
        summary.row(vec![
            "time index on / off, throughput".to_owned(),
            format!("{:.2}×", daemon_mib / off_mib),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        summary.row(vec![
            "CPU per GiB without the time index, s (median)".to_owned(),
            format!("{:.2}", cpu_per_gib(Target::NoIndex)),
            format!("{cat_cpu:.2}"),
            format!("{:.2}×", cpu_per_gib(Target::NoIndex) / cat_cpu),
            String::new(),
            String::new(),
        ]);
    }
    summary.row(vec![
        "throughput range, MiB/s".to_owned(),
        format!("{daemon_lo:.0}–{daemon_hi:.0}"),
        format!("{cat_lo:.0}–{cat_hi:.0}"),
        String::new(),
        String::new(),
        String::new(),
    ]);
    summary.row(vec![
        "CPU per GiB, s (median)".to_owned(),
        format!("{daemon_cpu:.2}"),
        format!("{cat_cpu:.2}"),
        format!("{:.2}×", daemon_cpu / cat_cpu),
        String::new(),
        String::new(),
    ]);
    summary.row(vec![
        format!("daemon RSS growth, KiB (max of {})", settings.runs),
        growth.to_string(),
        "-".to_owned(),
        String::new(),
        format!("≤ {TARGET_RSS_GROWTH_KIB}"),
        met(growth <= TARGET_RSS_GROWTH_KIB).to_owned(),
    ]);
    summary.row(vec![
        "pipe buffer".to_owned(),
        size(pipe_of(Target::Conlogd)),
        size(pipe_of(Target::Cat)),
        String::new(),
        String::new(),
        String::new(),
    ]);
    println!();
    print!("{}", summary.text());

    println!();
    let caption = format!(
        "{} through one log pipe in {} writes, rotation at {} with {} backups, {} run(s) each side, alternating. \
         Machine: {machine}; scratch on {filesystem}.",
        size(settings.size),
        size(settings.chunk as u64),
        size(settings.max_size),
        settings.max_backups,
        settings.runs
    );
    report::print_markdown(Some(&caption), &[&summary]);
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, reason = "test sizes of a few MiB")]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn settings(size: u64) -> Settings {
        Settings {
            size,
            chunk: 4096,
            max_size: 10_000,
            max_backups: 2,
            runs: 1,
            cat_pipe_size: None,
            attach: None,
            without_index_too: false,
        }
    }

    fn info(offset: u64, first_offset: u64) -> StreamInfo {
        StreamInfo {
            name: STREAM.into(),
            offset,
            first_offset,
            ..Default::default()
        }
    }

    /// Lays out a rotated log of `size` bytes as conlogd would: full backups, then the rest.
    fn rotated_log(dir: &Path, pattern: &Pattern, settings: &Settings) -> PathBuf {
        let mut all = Vec::new();
        pattern.write(&mut all, settings.size, 4096).unwrap();
        let current = (settings.size % settings.max_size) as usize;
        let log = dir.join("qemu.log");
        fs::write(&log, &all[all.len() - current..]).unwrap();
        let mut end = all.len() - current;
        for n in 1..=settings.max_backups {
            let backup = conlog::logfile::backup_path(&log, n);
            fs::write(&backup, &all[end - settings.max_size as usize..end]).unwrap();
            end -= settings.max_size as usize;
        }
        log
    }

    #[test]
    fn check_log_accepts_a_correct_log_and_finds_faults() {
        let dir = tempfile::tempdir().unwrap();
        let pattern = Pattern::new(4096);
        let settings = settings(123_456);
        let log = rotated_log(dir.path(), &pattern, &settings);
        let first = 123_456 - 3_456 - 20_000;
        let good = check_log(&info(123_456, first), &log, &settings, &pattern).unwrap();
        assert!(good.is_empty(), "{good:?}");

        let short = check_log(&info(123_000, first), &log, &settings, &pattern).unwrap();
        assert!(
            short.iter().any(|p| p.starts_with("offset 123000")),
            "{short:?}"
        );

        let backup = conlog::logfile::backup_path(&log, 2);
        let mut bytes = fs::read(&backup).unwrap();
        bytes[5] ^= 0xff;
        fs::write(&backup, bytes).unwrap();
        let corrupt = check_log(&info(123_456, first), &log, &settings, &pattern).unwrap();
        assert!(
            corrupt
                .iter()
                .any(|p| p.contains(&format!("offset {}", first + 5))),
            "{corrupt:?}"
        );

        fs::write(conlog::logfile::backup_path(&log, 3), [0u8; 10_000]).unwrap();
        let over = check_log(&info(123_456, first), &log, &settings, &pattern).unwrap();
        assert!(over.iter().any(|p| p.contains("over the cap")), "{over:?}");
        assert!(
            over.iter().any(|p| p.contains("3 backups kept")),
            "{over:?}"
        );
    }
}
