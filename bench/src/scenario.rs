//! The skeleton every scenario runs in: the options they share, the [`Scenario`] trait, and the
//! [`Bench`] a scenario is handed: the async runtime, the `conlogd` binary and how to start it,
//! the scratch directory, the machine, and the choice between `--quick` and full sizes.
//!
//! It also says how the sides of a comparison take turns ([`alternate`]). It owns nothing a
//! scenario measures and prints nothing: each scenario prints its own header
//! and report (with [`crate::report`]), so the figures in docs/performance.md keep their form.

use crate::common::{self, Scratch};
use crate::daemon::Daemon;
use crate::procfs::{self, Machine};
use crate::report::Verdict;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use tokio::runtime::Runtime;

/// Options every scenario understands.
#[derive(clap::Args)]
pub struct Options {
    /// The conlogd binary (default: `conlogd` next to this executable).
    #[arg(long, global = true, value_name = "PATH")]
    conlogd: Option<PathBuf>,
    /// Where the scratch directory goes; the daemon's logs and the baseline's files are written
    /// there, so both land on the same file system (default: $TMPDIR or /tmp).
    #[arg(long, global = true, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// A run of seconds for CI: every size not given takes its --quick default (each option's
    /// help names it; `hostile` also skips waiting for the daemon to close idle connections).
    #[arg(long, global = true)]
    quick: bool,
}

impl Options {
    /// The conlogd binary to run.
    fn conlogd(&self) -> anyhow::Result<PathBuf> {
        let path = match &self.conlogd {
            Some(path) => path.clone(),
            None => std::env::current_exe()?
                .parent()
                .map(|dir| dir.join("conlogd"))
                .unwrap_or_else(|| PathBuf::from("conlogd")),
        };
        if !path.is_file() {
            bail!(
                "conlogd not found at {}: build it with `cargo build --release --workspace --bins` or pass --conlogd PATH",
                path.display()
            );
        }
        Ok(path)
    }
}

/// One benchmark: its options (a clap subcommand) and how it runs in a [`Bench`].
pub trait Scenario {
    /// Names the scratch directory, `conlog-bench-NAME.PID`.
    const NAME: &'static str;

    /// Measures, prints the report, and says whether every run was correct.
    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict>;
}

/// What the skeleton hands a scenario.
pub struct Bench {
    /// A current-thread runtime for the scenario's clients.
    pub runtime: Runtime,
    /// The binary daemons are started from.
    pub conlogd: PathBuf,
    /// The parent of the scratch directory (`--work-dir`).
    pub parent: PathBuf,
    /// The scenario's scratch directory, removed at the end.
    pub scratch: Scratch,
    pub machine: Machine,
    quick: bool,
}

impl Bench {
    /// Whether this is a `--quick` run.
    pub fn quick(&self) -> bool {
        self.quick
    }

    /// `given` if the option was given, else its `--quick` or its full default.
    pub fn size<T>(&self, given: Option<T>, quick: T, full: T) -> T {
        given.unwrap_or(if self.quick { quick } else { full })
    }

    /// A daemon on `dir` (created), ready.
    pub fn start(&self, dir: &Path) -> anyhow::Result<Daemon> {
        Daemon::start(&self.conlogd, dir)
    }

    /// A daemon on `dir` with extra flags (`--config FILE`, `--takeover`).
    pub fn start_with(&self, dir: &Path, extra: &[&str]) -> anyhow::Result<Daemon> {
        Daemon::start_with(&self.conlogd, dir, extra)
    }

    /// `PATH (conlogd VERSION)`, for the header.
    pub fn conlogd_text(&self) -> String {
        format!(
            "{} ({})",
            self.conlogd.display(),
            common::version(&self.conlogd)
        )
    }

    /// An error unless the scratch directory's file system has `needed` bytes free (`why`
    /// says how that was computed).
    pub fn ensure_free(&self, needed: u64, why: &str) -> anyhow::Result<()> {
        let free = procfs::free_bytes(&self.parent)?;
        if free < needed {
            bail!(
                "not enough free space in {}: {} MiB free, {} MiB needed{why}",
                self.parent.display(),
                free >> 20,
                needed >> 20
            );
        }
        Ok(())
    }
}

/// The sides of a comparison in the order run `run` (from 1) measures them: as given in odd
/// runs, reversed in even ones, so that slow drift of a shared machine hits every side alike.
pub fn alternate<T, const N: usize>(run: u32, mut sides: [T; N]) -> [T; N] {
    if run.is_multiple_of(2) {
        sides.reverse();
    }
    sides
}

/// Runs `scenario` in a fresh [`Bench`].
pub fn run<S: Scenario>(scenario: &S, options: &Options) -> anyhow::Result<Verdict> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let conlogd = options.conlogd()?;
    let parent = options.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = Scratch::create(&parent, S::NAME)?;
    let bench = Bench {
        runtime,
        conlogd,
        parent,
        scratch,
        machine: Machine::probe(),
        quick: options.quick,
    };
    scenario.run(&bench)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_take_turns() {
        assert_eq!(alternate(1, ['a', 'b', 'c']), ['a', 'b', 'c']);
        assert_eq!(alternate(2, ['a', 'b', 'c']), ['c', 'b', 'a']);
        assert_eq!(alternate(3, [true, false]), [true, false]);
    }
}
