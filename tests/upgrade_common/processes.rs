//! Daemon processes: a successor (`--takeover`), ready lines, log timestamps.

use crate::support::*;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

// Processes

/// Every "conlogd ready" line of a diagnostics text.
pub fn ready_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains("conlogd ready"))
        .map(str::to_owned)
        .collect()
}

/// `key=VALUE` of a tracing line.
pub fn field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

/// Waits (bounded) until `text()` holds `count` "conlogd ready" lines; returns the last.
pub async fn wait_ready_count(what: &str, count: usize, text: impl Fn() -> String) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let all = text();
        let ready = ready_lines(&all);
        if ready.len() >= count {
            assert_eq!(ready.len(), count, "more ready lines than expected:\n{all}");
            return ready.last().unwrap().clone();
        }
        if Instant::now() > deadline {
            panic!("{what}: {count} ready lines not seen after {DEADLINE:?}; diagnostics:\n{all}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The inode of a file (to show a socket is the same one).
pub fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// A `conlogd --takeover` started on the directories, config and ports of `daemon`.
pub struct Successor {
    child: Option<Child>,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Successor {
    /// Spawns `conlogd --takeover` with the running daemon's flags, the port-0 flags replaced
    /// by the ports it actually serves (`tcp`, `metrics`).
    pub fn spawn(daemon: &Daemon, tcp: SocketAddr, metrics: SocketAddr) -> Self {
        Self::spawn_with_faults(daemon, tcp, metrics, None)
    }

    /// [`Successor::spawn`] with `CONLOG_FAULT_POINTS` set to `faults` (if given) instead of
    /// what the daemon's command says (`Daemon::env`).
    pub fn spawn_with_faults(
        daemon: &Daemon,
        tcp: SocketAddr,
        metrics: SocketAddr,
        faults: Option<&str>,
    ) -> Self {
        let base = daemon.command();
        let mut cmd = Command::new(base.get_program());
        let mut args = base.get_args();
        while let Some(arg) = args.next() {
            cmd.arg(arg);
            if arg == "--listen" || arg == "--metrics" {
                args.next().expect("a value follows");
                cmd.arg(if arg == "--listen" { tcp } else { metrics }.to_string());
            }
        }
        cmd.arg("--takeover");
        for (key, value) in base.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        if let Some(faults) = faults {
            cmd.env("CONLOG_FAULT_POINTS", faults);
        }
        let dir = tempfile::Builder::new()
            .prefix("conlog-successor-")
            .tempdir()
            .expect("temporary directory");
        let stderr_path = dir.path().join("stderr");
        let stderr = File::create(&stderr_path).expect("successor stderr file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().unwrap())
            .stderr(stderr)
            .spawn()
            .expect("spawn conlogd --takeover");
        Self {
            child: Some(child),
            stderr_path,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("successor running").id()
    }

    /// Its diagnostics so far.
    pub fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    /// Waits (bounded) for its "conlogd ready" line; returns it. Panics if it exits first.
    pub async fn wait_ready(&mut self) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(line) = ready_lines(&self.stderr()).pop() {
                return line;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "conlogd --takeover exited ({status}) before it was ready:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "conlogd --takeover not ready after {DEADLINE:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Panics unless it logged that it took over from the previous daemon.
    pub fn assert_took_over(&self) {
        let stderr = self.stderr();
        assert!(
            stderr.contains("took over from the previous daemon"),
            "{stderr}"
        );
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        let child = self.child.as_ref().expect("successor running");
        rustix::process::kill_process(rustix::process::Pid::from_child(child), signal)
            .expect("signal the successor");
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.wait_exit().await
    }

    /// Waits (bounded) for the process to exit (taken over in turn, or stopped).
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "conlogd (pid {}) did not exit within {DEADLINE:?}:\n{}",
                self.pid(),
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Seconds since midnight (UTC) of a tracing line's timestamp (`2026-01-01T12:34:56.789Z`).
pub fn log_time(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let time = time.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Time from a line containing `from` to the next line containing `to`, for each `from`, in
/// the daemon's own timestamps (for reports, never for assertions).
pub fn intervals(text: &str, from: &str, to: &str) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut start = None;
    for line in text.lines() {
        if line.contains(from) {
            start = log_time(line);
        } else if line.contains(to) {
            if let (Some(a), Some(b)) = (start.take(), log_time(line)) {
                let seconds = if b >= a { b - a } else { b + 86_400.0 - a };
                out.push(Duration::from_secs_f64(seconds));
            }
        }
    }
    out
}

/// "p50 X, max Y" of some durations.
pub fn summary(durations: &[Duration]) -> String {
    let mut sorted = durations.to_vec();
    sorted.sort();
    match sorted.as_slice() {
        [] => "none".into(),
        s => format!("p50 {:.1?}, max {:.1?}", s[s.len() / 2], s[s.len() - 1]),
    }
}
