//! In-place upgrade: `execve` of the daemon's binary path with the carried descriptors.
//!
//! The snapshot travels in a memfd whose number is in `CONLOG_SNAPSHOT_FD`; the carried
//! descriptors keep their numbers (listed in the snapshot). Before exec the new binary is
//! started once with `--snapshot-format` and must answer with our format version, so a missing,
//! broken or incompatible binary is refused while the running image still holds everything.
//! The running binary's own file stays open (`CONLOG_FALLBACK_EXE_FD`): if the new image cannot
//! read the snapshot after all, it executes that file again, so the previous version restores
//! its own state.

use super::snapshot::{self, Envelope, SnapshotError, FORMAT_VERSION};
use super::{fds, FrozenDaemon};
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Names the memfd holding the snapshot.
pub(crate) const SNAPSHOT_ENV: &str = "CONLOG_SNAPSHOT_FD";
/// Names the descriptor of the previous image's binary.
pub(crate) const FALLBACK_ENV: &str = "CONLOG_FALLBACK_EXE_FD";
/// Set when the previous image is executed again as a fallback.
pub(crate) const FALLBACK_MARK_ENV: &str = "CONLOG_UPGRADE_FALLBACK";

/// What to execute for an upgrade, captured at start-up.
pub struct Image {
    /// The binary's path (replace the file there, then upgrade).
    pub path: PathBuf,
    /// The arguments, minus one-shot flags.
    pub args: Vec<OsString>,
    /// The running binary itself, kept open for the fallback.
    exe: Option<OwnedFd>,
}

impl Image {
    /// The running binary and its arguments.
    pub fn current() -> Self {
        let path = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        let args = std::env::args_os()
            .skip(1)
            .filter(|a| a != "--takeover")
            .collect();
        let exe = std::fs::File::open("/proc/self/exe")
            .ok()
            .map(OwnedFd::from);
        Self { path, args, exe }
    }
}

/// Why the binary at an image's path may not be executed for an upgrade.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// It ran but gave no answer in time.
    #[error("{} did not answer --snapshot-format within 10s", path.display())]
    Timeout { path: PathBuf },
    /// It could not be started at all.
    #[error("cannot run {}: {source}", path.display())]
    Run { path: PathBuf, source: io::Error },
    /// It refused the daemon's arguments or config, or reads another snapshot format.
    #[error(
        "{} does not start with this daemon's arguments or does not read snapshot format {FORMAT_VERSION} (answered {answer:?}, {status}; {stderr})",
        path.display()
    )]
    Incompatible {
        path: PathBuf,
        /// What it printed (trimmed).
        answer: String,
        status: std::process::ExitStatus,
        /// What it said on stderr (trimmed), such as the config key it refused.
        stderr: String,
    },
}

/// Checks that the binary at the image's path starts and reads our snapshot format.
pub(crate) async fn preflight(image: &Image) -> Result<(), PreflightError> {
    // With the daemon's own arguments, so a config the new binary refuses is caught here too.
    let run = tokio::process::Command::new(&image.path)
        .args(&image.args)
        .arg("--snapshot-format")
        .env_remove(SNAPSHOT_ENV)
        .env_remove(FALLBACK_ENV)
        .kill_on_drop(true)
        .output();
    let path = || image.path.clone();
    let output = match tokio::time::timeout(PREFLIGHT_TIMEOUT, run).await {
        Err(_) => return Err(PreflightError::Timeout { path: path() }),
        Ok(Err(source)) => {
            return Err(PreflightError::Run {
                path: path(),
                source,
            })
        }
        Ok(Ok(output)) => output,
    };
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if output.status.success() && answer == FORMAT_VERSION.to_string() {
        Ok(())
    } else {
        Err(PreflightError::Incompatible {
            path: path(),
            answer,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// How long the new binary may take to answer `--snapshot-format` (named in
/// [`PreflightError::Timeout`]).
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// Replaces this process with the image, carrying `state`. Returns only on failure, with the
/// state intact so the caller can thaw it.
pub(crate) fn exec(image: &Image, state: FrozenDaemon) -> (FrozenDaemon, io::Error) {
    let (snapshot, carried) = state.index();
    let numbers = carried.iter().map(|fd| fd.as_raw_fd()).collect();
    let envelope = Envelope {
        snapshot,
        descriptors: carried.len(),
        inherited: Some(numbers),
    };
    let result: io::Result<()> = write_memfd(&snapshot::encode(&envelope)).and_then(|memfd| {
        for fd in carried.iter().chain([&memfd]).chain(image.exe.as_ref()) {
            fds::set_inheritable(fd, true)?;
        }
        let mut command = Command::new(&image.path);
        command
            .args(&image.args)
            .env(SNAPSHOT_ENV, memfd.as_raw_fd().to_string());
        match &image.exe {
            Some(exe) => command.env(FALLBACK_ENV, exe.as_raw_fd().to_string()),
            None => command.env_remove(FALLBACK_ENV),
        };
        command.env_remove(FALLBACK_MARK_ENV);
        // Signals that arrive between execve and the new image's handlers would take their
        // default action (SIGUSR1 and SIGTERM terminate). Keep them blocked across the exec: they
        // stay pending and the new image unblocks them once its handlers are in place
        // ([`unblock_signals`]). std resets the signal mask before exec, so block it last.
        block_signals_at_exec(&mut command);
        Err(command.exec())
    });
    let error = result.expect_err("exec returns only on failure");
    for fd in carried.iter().chain(image.exe.as_ref()) {
        let _ = fds::set_inheritable(fd, false);
    }
    let state =
        FrozenDaemon::resolve(envelope.snapshot, carried).expect("indexes we just made are valid");
    (state, error)
}

/// The signals the daemon handles (see `daemon::Signals`).
fn handled_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGUSR1,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(signal);
    }
    set
}

#[allow(unsafe_code)]
fn block_signals_at_exec(command: &mut Command) {
    // SAFETY: the closure runs between std's own preparations and execve, in this process
    // (exec does not fork), and only calls pthread_sigmask, which is async-signal-safe and
    // allocates nothing.
    unsafe {
        command.pre_exec(|| handled_signals().thread_block().map_err(io::Error::from));
    }
}

/// Blocks the signals the daemon handles in the calling thread (and the threads it starts
/// later), so that they stay pending until [`unblock_signals`]. Called first thing in `main`;
/// an upgraded image starts with them blocked already (see [`exec`]).
pub fn block_signals() {
    if let Err(e) = handled_signals().thread_block() {
        eprintln!("conlogd: cannot block signals during start-up: {e}");
    }
}

/// Once the signal handlers are installed: delivers the signals that arrived during start-up
/// or the exec, and lets new ones in.
pub(crate) fn unblock_signals() {
    if let Err(e) = handled_signals().thread_unblock() {
        tracing::warn!(error = %e, "cannot unblock signals");
    }
}

fn write_memfd(bytes: &[u8]) -> io::Result<OwnedFd> {
    let memfd = rustix::fs::memfd_create("conlog-snapshot", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(bytes)?;
    Ok(OwnedFd::from(file))
}

/// Why an upgraded image cannot use what the previous one carried (it starts from the state
/// directory instead).
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    /// The snapshot's environment variable names no descriptor.
    #[error("{SNAPSHOT_ENV} is not a descriptor number")]
    NotANumber,
    /// The snapshot's descriptor is not open.
    #[error("cannot adopt the snapshot: {0}")]
    AdoptSnapshot(#[source] io::Error),
    /// The snapshot could not be read.
    #[error(transparent)]
    Read(io::Error),
    /// The snapshot is damaged, or of another format.
    #[error(transparent)]
    Decode(SnapshotError),
    /// The snapshot lists a descriptor number twice: adopting it twice would give one
    /// descriptor two owners (closed twice, the second time maybe as another file).
    #[error("the snapshot lists descriptor {0} more than once")]
    DuplicateDescriptor(RawFd),
    /// The snapshot lists the descriptor that holds the snapshot itself.
    #[error("the snapshot lists descriptor {0}, which holds the snapshot itself")]
    SnapshotDescriptor(RawFd),
    /// The descriptors that were not carried could not be closed.
    #[error(transparent)]
    CloseStrays(io::Error),
    /// A carried descriptor is not open.
    #[error("cannot adopt carried descriptors: {0}")]
    AdoptCarried(#[source] io::Error),
    /// A carried descriptor could not be kept from the next exec.
    #[error(transparent)]
    CloseOnExec(io::Error),
    /// The snapshot's indexes do not match the descriptors.
    #[error(transparent)]
    Rebuild(SnapshotError),
}

/// Start-up of an upgraded image: the carried state, if this process was exec'd by an upgrade.
/// Must run before anything else opens descriptors. An unreadable snapshot first hands over to
/// the previous image (which wrote it); if that is not possible, the error is returned and the
/// daemon starts from the state directory instead.
pub fn inherited() -> Result<Option<FrozenDaemon>, InheritError> {
    let Some(raw) = std::env::var_os(SNAPSHOT_ENV) else {
        return Ok(None);
    };
    let fallback_mark = std::env::var_os(FALLBACK_MARK_ENV);
    let fallback =
        std::env::var_os(FALLBACK_ENV).and_then(|v| v.to_str().and_then(|s| s.parse::<i32>().ok()));
    // Not for our children (the next preflight) nor the next image: they get fresh values.
    // Still single-threaded here, so changing the environment is sound.
    for name in [SNAPSHOT_ENV, FALLBACK_ENV, FALLBACK_MARK_ENV] {
        std::env::remove_var(name);
    }
    let raw: RawFd = raw
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or(InheritError::NotANumber)?;
    let memfd = fds::adopt(raw).map_err(InheritError::AdoptSnapshot)?;
    let decoded = read_all(&memfd)
        .map_err(InheritError::Read)
        .and_then(|bytes| snapshot::decode(&bytes).map_err(InheritError::Decode))
        .and_then(|envelope| Ok((carried_numbers(&envelope, raw)?, envelope)));
    let (numbers, envelope) = match decoded {
        Ok(decoded) => decoded,
        Err(reason) => {
            if let (Some(exe), None) = (fallback, fallback_mark) {
                eprintln!("conlogd: cannot read the upgrade snapshot ({reason}); handing back to the previous binary");
                let error = Command::new(format!("/proc/self/fd/{exe}"))
                    .args(std::env::args_os().skip(1))
                    .env(SNAPSHOT_ENV, raw.to_string())
                    .env(FALLBACK_MARK_ENV, "1")
                    .exec();
                eprintln!("conlogd: cannot execute the previous binary: {error}");
            }
            let _ = fds::close_inherited_except(&[raw]);
            return Err(reason);
        }
    };
    let keep: Vec<RawFd> = numbers.iter().copied().chain([raw]).collect();
    fds::close_inherited_except(&keep).map_err(InheritError::CloseStrays)?;
    // Each number is adopted once: `carried_numbers` refused duplicates (the SAFETY argument
    // of `fds::adopt`).
    let carried = numbers
        .iter()
        .map(|raw| fds::adopt(*raw))
        .collect::<io::Result<Vec<_>>>()
        .map_err(InheritError::AdoptCarried)?;
    for fd in &carried {
        fds::set_inheritable(fd, false).map_err(InheritError::CloseOnExec)?;
    }
    FrozenDaemon::resolve(envelope.snapshot, carried)
        .map(Some)
        .map_err(InheritError::Rebuild)
}

/// The descriptor numbers an envelope says were carried across `execve`, each listed once
/// and none of them `snapshot_fd` (the memfd this process adopted already).
fn carried_numbers(envelope: &Envelope, snapshot_fd: RawFd) -> Result<Vec<RawFd>, InheritError> {
    let numbers = envelope.inherited.clone().unwrap_or_default();
    let mut seen = std::collections::HashSet::with_capacity(numbers.len());
    for &number in &numbers {
        if number == snapshot_fd {
            return Err(InheritError::SnapshotDescriptor(number));
        }
        if !seen.insert(number) {
            return Err(InheritError::DuplicateDescriptor(number));
        }
    }
    Ok(numbers)
}

fn read_all(fd: &impl AsFd) -> io::Result<Vec<u8>> {
    let file = std::fs::File::from(fd.as_fd().try_clone_to_owned()?);
    let mut header = vec![0u8; snapshot::HEADER_LEN];
    file.read_exact_at(&mut header, 0)?;
    let total = snapshot::announced_len(&header).map_err(io::Error::other)?;
    let mut bytes = vec![0u8; total];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::{snapshot::Snapshot, FrozenListeners};

    fn envelope(inherited: Option<Vec<RawFd>>) -> Envelope {
        Envelope {
            snapshot: Snapshot {
                from_pid: 1,
                listeners: FrozenListeners {
                    lock: 0,
                    local: 1,
                    fd_sock: 2,
                    handover: 3,
                    tcp: 4,
                    metrics: None,
                    health: None,
                },
                streams: vec![],
                handoffs: vec![],
                counters: None,
                verdicts: true,
            },
            descriptors: inherited.as_ref().map_or(0, Vec::len),
            inherited,
        }
    }

    /// `fds::adopt` may give each number one owner only: a snapshot that lists one twice (or
    /// lists the snapshot's own memfd) is refused before anything is adopted, naming it.
    #[test]
    fn carried_numbers_are_each_listed_once() {
        assert_eq!(
            carried_numbers(&envelope(Some(vec![5, 6, 7, 8, 9])), 4).unwrap(),
            vec![5, 6, 7, 8, 9]
        );
        assert!(carried_numbers(&envelope(None), 4).unwrap().is_empty());
        let twice = carried_numbers(&envelope(Some(vec![5, 6, 7, 6, 9])), 4).unwrap_err();
        assert!(
            matches!(twice, InheritError::DuplicateDescriptor(6)),
            "{twice:?}"
        );
        assert_eq!(
            twice.to_string(),
            "the snapshot lists descriptor 6 more than once"
        );
        let own = carried_numbers(&envelope(Some(vec![5, 4, 7, 8, 9])), 4).unwrap_err();
        assert!(
            matches!(own, InheritError::SnapshotDescriptor(4)),
            "{own:?}"
        );
    }

    #[test]
    fn preflight_refusals_read_as_before() {
        let path = PathBuf::from("/usr/local/bin/conlogd");
        assert_eq!(
            PreflightError::Timeout { path: path.clone() }.to_string(),
            "/usr/local/bin/conlogd did not answer --snapshot-format within 10s"
        );
        assert_eq!(
            PreflightError::Run {
                path,
                source: io::Error::from(io::ErrorKind::NotFound),
            }
            .to_string(),
            "cannot run /usr/local/bin/conlogd: entity not found"
        );
    }
}
