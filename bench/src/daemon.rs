//! A real `conlogd` started for one measurement: its own directories under the scratch
//! directory, ephemeral TCP ports, and nothing shared with any other daemon on the machine.
//!
//! Started with `--runtime-dir`, `--data-dir`, `--listen 127.0.0.1:0 --metrics 127.0.0.1:0`, it is
//! ready when it prints `conlogd ready` on stderr. Its stderr is drained on a thread for its
//! whole life (a full stderr pipe would block it) and the last lines are kept for error
//! messages. Stopped with SIGTERM (it drains and syncs every log); killed if it does not exit.

use anyhow::{bail, Context};
use conlog::proto::agent_client::AgentClient;
use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// How long the daemon may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of stderr kept for error messages.
const STDERR_LINES: usize = 40;

/// A running conlogd.
pub struct Daemon {
    child: Option<Child>,
    /// `conlogd.sock`.
    pub socket: PathBuf,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// "conlogd ready" lines printed so far: one per start, one more per in-place upgrade.
    ready_lines: Arc<AtomicUsize>,
}

impl Daemon {
    /// Starts `binary` with its directories under `dir` (created; removing it is the caller's
    /// business) and waits until it is ready.
    pub fn start(binary: &Path, dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(binary, dir, &[])
    }

    /// Like [`start`](Self::start), with extra flags (e.g. `--takeover`: the new process takes
    /// over from the daemon serving `dir`, which then exits).
    pub fn start_with(binary: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let runtime_dir = dir.join("run");
        let data_dir = dir.join("data");
        for d in [&runtime_dir, &data_dir] {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let mut child = Command::new(binary)
            .arg("--runtime-dir")
            .arg(&runtime_dir)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .args(extra)
            .env("NO_COLOR", "1")
            // The ready line is logged at info; a RUST_LOG of the caller could hide it.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_LINES)));
        let (ready_tx, ready_rx) = mpsc::channel();
        let ready_lines = Arc::new(AtomicUsize::new(0));
        {
            let tail = stderr_tail.clone();
            let ready_lines = ready_lines.clone();
            thread::spawn(move || {
                let mut ready = Some(ready_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("conlogd ready") {
                        ready_lines.fetch_add(1, Ordering::SeqCst);
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                    }
                    let mut tail = tail.lock().expect("stderr tail poisoned");
                    if tail.len() == STDERR_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        }
        let mut daemon = Self {
            child: Some(child),
            socket: runtime_dir.join("conlogd.sock"),
            stderr_tail,
            ready_lines,
        };
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(()) => Ok(daemon),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                daemon.kill();
                bail!(
                    "conlogd did not print \"conlogd ready\" within {READY_TIMEOUT:?}; its stderr:\n{}",
                    daemon.stderr_tail()
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = daemon.kill();
                bail!(
                    "conlogd exited before it was ready ({status}); its stderr:\n{}",
                    daemon.stderr_tail()
                )
            }
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A client of its `Agent` service over the local socket.
    pub async fn agent(&self) -> anyhow::Result<AgentClient<Channel>> {
        let channel = conlog::client::connect_local(&self.socket)
            .await
            .with_context(|| format!("cannot connect to {}", self.socket.display()))?;
        Ok(AgentClient::new(channel))
    }

    /// The value of `name=` in its ready line (`tcp`, `metrics`, `tls`, ...).
    pub fn ready_field(&self, name: &str) -> anyhow::Result<String> {
        // The ready line reaches the kept tail just after the daemon is reported ready.
        let deadline = Instant::now() + Duration::from_secs(5);
        let key = format!(" {name}=");
        loop {
            let tail = self.stderr_tail();
            let value = tail
                .lines()
                .find(|line| line.contains("conlogd ready"))
                .and_then(|line| {
                    let start = line.find(&key)? + key.len();
                    line[start..].split_whitespace().next().map(str::to_owned)
                });
            match value {
                Some(value) => return Ok(value),
                None if Instant::now() > deadline => {
                    bail!("no {name}= in the daemon's ready line; its stderr:\n{tail}")
                }
                None => thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Waits until it has printed its `n`-th "conlogd ready" line (the first is its start's,
    /// each in-place upgrade adds one); an error after `timeout`, or if it exits.
    pub fn wait_ready_lines(&mut self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.ready_lines.load(Ordering::SeqCst) < n {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "conlogd exited ({status}) before its ready line {n}; its stderr:\n{}",
                        self.stderr_tail()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "conlogd printed {} ready lines, not {n}, within {timeout:?}; its stderr:\n{}",
                    self.ready_lines.load(Ordering::SeqCst),
                    self.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Waits until it has exited by itself (after handing over to a successor); an error if it
    /// exits with a failure or is still running after `timeout`.
    pub fn wait_exited(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("conlogd was not running");
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "conlogd exited with {status}; its stderr:\n{}",
                    self.stderr_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "conlogd still running after {timeout:?}; its stderr:\n{}",
                    self.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// The last lines it printed on stderr.
    pub fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().expect("stderr tail poisoned");
        tail.iter().map(|line| format!("  | {line}\n")).collect()
    }

    /// Stops it with SIGTERM and waits; an error if it exits badly or has to be killed.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "conlogd exited with {status} after SIGTERM; its stderr:\n{}",
                    self.stderr_tail()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "conlogd did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed. Its stderr:\n{}",
                    self.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills it at once; how it ended.
    fn kill(&mut self) -> String {
        match self.child.take() {
            Some(mut child) => {
                let _ = child.kill();
                child
                    .wait()
                    .map_or_else(|e| e.to_string(), |status| status.to_string())
            }
            None => "not running".to_owned(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
