//! `conlog-bench`: measures a real `conlogd` from outside, as its clients would, against a
//! baseline run on the same machine in the same invocation (these machines are shared and noisy,
//! so only ratios mean something). Figures go to `docs/performance.md`.
//!
//! One subcommand per scenario of issue 7 (and `hostile`, issue 14's); each lives in its own module and uses the shared
//! pieces: [`daemon`] (start, stop and observe a `conlogd`), [`procfs`] (memory, CPU, disk and
//! machine facts from `/proc`), [`data`] (the bytes written and their check) and [`report`]
//! (medians, tables in text and markdown).
//!
//! Not a test: it exits non-zero when a run is wrong (bytes lost, cap exceeded), never because a
//! target was missed.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

// The modules live in `src/bin/conlog-bench/` (a directory without `main.rs`, so Cargo does not
// take it for a second binary).
#[path = "conlog-bench/console.rs"]
mod console;
#[path = "conlog-bench/daemon.rs"]
mod daemon;
#[path = "conlog-bench/data.rs"]
mod data;
#[path = "conlog-bench/guests.rs"]
mod guests;
#[path = "conlog-bench/history.rs"]
mod history;
#[path = "conlog-bench/hostile.rs"]
mod hostile;
#[path = "conlog-bench/pipe.rs"]
mod pipe;
#[path = "conlog-bench/procfs.rs"]
mod procfs;
#[path = "conlog-bench/report.rs"]
mod report;
#[path = "conlog-bench/upgrade.rs"]
mod upgrade;

/// Benchmarks conlogd from outside against a baseline measured in the same run.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Options every scenario understands.
#[derive(clap::Args)]
pub struct Common {
    /// The conlogd binary (default: `conlogd` next to this executable).
    #[arg(long, global = true, value_name = "PATH")]
    conlogd: Option<PathBuf>,
    /// Where the scratch directory goes; the daemon's logs and the baseline's files are written
    /// there, so both land on the same file system (default: $TMPDIR or /tmp).
    #[arg(long, global = true, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

impl Common {
    /// The conlogd binary to run.
    pub fn conlogd(&self) -> anyhow::Result<PathBuf> {
        let path = match &self.conlogd {
            Some(path) => path.clone(),
            None => std::env::current_exe()?
                .parent()
                .map(|dir| dir.join("conlogd"))
                .unwrap_or_else(|| PathBuf::from("conlogd")),
        };
        if !path.is_file() {
            anyhow::bail!(
                "conlogd not found at {}: build it with `cargo build --release --bins` or pass --conlogd PATH",
                path.display()
            );
        }
        Ok(path)
    }

    /// The parent of the scratch directory.
    pub fn work_parent(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

#[derive(Subcommand)]
enum Scenario {
    /// Log pipe throughput (issue 2, issue 7 scenario 1): N bytes through one log pipe with
    /// rotation on, against `cat` from a pipe into a file.
    Pipe(pipe::PipeArgs),
    /// Console latency and throughput (issue 3): echo round trips against socat relaying two
    /// UNIX sockets; guest throughput with 0, 1, 10 and 100 attached clients.
    Console(console::ConsoleArgs),
    /// History streaming (issue 4): ReadHistory of a large rotated log to a client that
    /// discards it, against the same bytes over loopback TCP with socat.
    History(history::HistoryArgs),
    /// Many guests and restart (issue 7 scenarios 2 and 6): memory and CPU with N guests, each
    /// with a log pipe and a connected console, 10% writing; restart time with N registered.
    Guests(guests::GuestsArgs),
    /// Hostile callers (issue 14): each attack on the TCP listener at the daemon's default
    /// limits, then all at once: daemon RSS, descriptors and local ListGuests latency under
    /// attack against idle, and the memory ceiling.
    Hostile(hostile::HostileArgs),
    /// Upgrade pause (issue 5): how long logging stops during an in-place upgrade and during a
    /// takeover, with 1, 100 and 2,000 guests.
    Upgrade(upgrade::UpgradeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("conlog-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match &cli.scenario {
        Scenario::Pipe(args) => pipe::run(&runtime, &cli.common, args),
        Scenario::Console(args) => console::run(&runtime, &cli.common, args),
        Scenario::History(args) => history::run(&runtime, &cli.common, args),
        Scenario::Upgrade(args) => upgrade::run(&runtime, &cli.common, args),
        Scenario::Guests(args) => guests::run(&runtime, &cli.common, args),
        Scenario::Hostile(args) => hostile::run(&runtime, &cli.common, args),
    };
    match outcome {
        Ok(report::Verdict::Correct) => ExitCode::SUCCESS,
        Ok(report::Verdict::Wrong) => {
            eprintln!("conlog-bench: some runs were WRONG (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("conlog-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
