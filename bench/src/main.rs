//! `conlog-bench`: measures a real `conlogd` from outside, as its clients would, against a
//! baseline run on the same machine in the same invocation (these machines are shared and noisy,
//! so only ratios mean something). Figures go to `docs/performance.md`.
//!
//! One subcommand per scenario, each in its own module under [`scenarios`], each implementing
//! the one skeleton, [`scenario::Scenario`]: the skeleton resolves the `conlogd` binary, makes the
//! scratch directory, probes the machine, starts daemons and picks the `--quick` or full size of
//! every option; the scenario measures and prints its report. The shared pieces: [`daemon`]
//! (start, stop and observe a `conlogd`), [`common`] (what scenarios ask a daemon: pipes,
//! listings, waits), [`procfs`] (memory, CPU, descriptors, disk and machine facts from `/proc`),
//! [`data`] (the bytes written and their check) and [`report`] (medians, percentiles, tables in
//! text and markdown, the verdict).
//!
//! Not a test: it exits non-zero when a run is wrong (bytes lost, cap exceeded), never because a
//! target was missed.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod common;
mod daemon;
mod data;
mod procfs;
mod report;
mod scenario;
mod scenarios;

use scenarios::{
    compress, console, gateway, gateway_watchers, guests, history, hostile, migration, pipe,
    upgrade,
};

/// Benchmarks conlogd from outside against a baseline measured in the same run.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: scenario::Options,
    #[command(subcommand)]
    scenario: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Log pipe throughput (scenario 1): N bytes through one log pipe with
    /// rotation on, against `cat` from a pipe into a file.
    Pipe(pipe::PipeArgs),
    /// Console latency and throughput: echo round trips against socat relaying two
    /// UNIX sockets; guest throughput with 0, 1, 10 and 100 attached clients.
    Console(console::ConsoleArgs),
    /// History streaming: ReadHistory of a large rotated log to a client that
    /// discards it, against the same bytes over loopback TCP with socat.
    History(history::HistoryArgs),
    /// Many guests and restart (scenarios 2 and 6): memory and CPU with N guests, each
    /// with a log pipe and a connected console, 10% writing; restart time with N registered.
    Guests(guests::GuestsArgs),
    /// Live migration: import throughput against ReadHistory over TLS, and the
    /// switchover pause (the source's last byte to the destination's first byte on a watcher).
    Migration(migration::MigrationArgs),
    /// Hostile callers: each attack on the TCP listener at the daemon's default
    /// limits, then all at once: daemon RSS, descriptors and local ListGuests latency under
    /// attack against idle, and the memory ceiling.
    Hostile(hostile::HostileArgs),
    /// Compressed history: depth per disk byte on console text and random bytes, daemon
    /// CPU per GiB, ReadHistory deep in compressed against raw history, time to first byte,
    /// pipe throughput with compression off, on, and cat.
    Compress(compress::CompressArgs),
    /// Gateway fan-out: N read-only watchers of one console through one conlog-gateway: what
    /// the node serves, who got every byte, gateway memory per watcher; the same watchers
    /// straight at the node as the baseline.
    GatewayWatchers(gateway_watchers::GatewayWatchersArgs),
    /// conlog-gateway against direct calls to the node, same run: ReadHistory throughput
    /// and CPU per GiB of node, gateway and client; console echo latency p50/p99; the
    /// gateway's memory and CPU at rest and per active session.
    Gateway(gateway::GatewayArgs),
    /// Upgrade pause: how long logging stops during an in-place upgrade and during a
    /// takeover, with 1, 100 and 2,000 guests.
    Upgrade(upgrade::UpgradeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = &cli.common;
    let outcome = match &cli.scenario {
        Command::Pipe(args) => scenario::run(args, options),
        Command::Console(args) => scenario::run(args, options),
        Command::History(args) => scenario::run(args, options),
        Command::Upgrade(args) => scenario::run(args, options),
        Command::Guests(args) => scenario::run(args, options),
        Command::Hostile(args) => scenario::run(args, options),
        Command::Migration(args) => scenario::run(args, options),
        Command::Compress(args) => scenario::run(args, options),
        Command::GatewayWatchers(args) => scenario::run(args, options),
        Command::Gateway(args) => scenario::run(args, options),
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
