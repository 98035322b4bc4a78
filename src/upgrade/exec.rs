//! In-place upgrade: `execve` of the daemon's binary path with the carried descriptors.
//!
//! The snapshot travels in a memfd whose number is in `CONLOG_SNAPSHOT_FD`; the carried
//! descriptors keep their numbers (listed in the snapshot). Before exec the new binary is
//! started once with `--snapshot-format` and must answer with our format version, so a missing,
//! broken or incompatible binary is refused while the running image still holds everything.
//! The running binary's own file stays open (`CONLOG_FALLBACK_EXE_FD`): if the new image cannot
//! read the snapshot after all, it executes that file again, so the previous version restores
//! its own state.

use super::snapshot::{self, Envelope, FORMAT_VERSION};
use super::{fds, State};
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Names the memfd holding the snapshot.
pub const SNAPSHOT_ENV: &str = "CONLOG_SNAPSHOT_FD";
/// Names the descriptor of the previous image's binary.
pub const FALLBACK_ENV: &str = "CONLOG_FALLBACK_EXE_FD";
/// Set when the previous image is executed again as a fallback.
pub const FALLBACK_MARK_ENV: &str = "CONLOG_UPGRADE_FALLBACK";

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

/// Checks that the binary at the image's path starts and reads our snapshot format.
pub async fn preflight(image: &Image) -> Result<(), String> {
    // With the daemon's own arguments, so a config the new binary refuses is caught here too.
    let run = tokio::process::Command::new(&image.path)
        .args(&image.args)
        .arg("--snapshot-format")
        .env_remove(SNAPSHOT_ENV)
        .env_remove(FALLBACK_ENV)
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(10), run).await {
        Err(_) => {
            return Err(format!(
                "{} did not answer --snapshot-format within 10s",
                image.path.display()
            ))
        }
        Ok(Err(e)) => return Err(format!("cannot run {}: {e}", image.path.display())),
        Ok(Ok(output)) => output,
    };
    let answer = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && answer.trim() == FORMAT_VERSION.to_string() {
        Ok(())
    } else {
        Err(format!(
            "{} does not start with this daemon's arguments or does not read snapshot format {FORMAT_VERSION} (answered {:?}, {}; {})",
            image.path.display(),
            answer.trim(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Replaces this process with the image, carrying `state`. Returns only on failure, with the
/// state intact so the caller can thaw it.
pub fn exec(image: &Image, state: State) -> (State, io::Error) {
    let (snapshot, carried) = state.into_parts();
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
        State::from_parts(envelope.snapshot, carried).expect("indexes we just made are valid");
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
pub fn unblock_signals() {
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

/// Start-up of an upgraded image: the carried state, if this process was exec'd by an upgrade.
/// Must run before anything else opens descriptors. An unreadable snapshot first hands over to
/// the previous image (which wrote it); if that is not possible, the error is returned and the
/// daemon starts from the state directory instead.
pub fn inherited() -> Result<Option<State>, String> {
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
    let raw: i32 = raw
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{SNAPSHOT_ENV} is not a descriptor number"))?;
    let memfd = fds::adopt(raw).map_err(|e| format!("cannot adopt the snapshot: {e}"))?;
    let decoded = read_all(&memfd)
        .map_err(|e| e.to_string())
        .and_then(|bytes| snapshot::decode(&bytes).map_err(|e| e.to_string()));
    let envelope = match decoded {
        Ok(envelope) => envelope,
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
    let numbers = envelope.inherited.clone().unwrap_or_default();
    let keep: Vec<i32> = numbers.iter().copied().chain([raw]).collect();
    fds::close_inherited_except(&keep).map_err(|e| e.to_string())?;
    let carried = numbers
        .iter()
        .map(|raw| fds::adopt(*raw))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| format!("cannot adopt carried descriptors: {e}"))?;
    for fd in &carried {
        fds::set_inheritable(fd, false).map_err(|e| e.to_string())?;
    }
    State::from_parts(envelope.snapshot, carried)
        .map(Some)
        .map_err(|e| e.to_string())
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
