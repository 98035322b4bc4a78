//! Shared harness of the integration tests: starts the real `conlogd` on a fresh temporary
//! directory (loopback, port 0), talks to it over its real sockets and reads its log files.
//!
//! Every test binary includes this module (`#[path = "../support/mod.rs"] mod support;`) and
//! uses only part of it. The tests of a binary share its process: nothing here touches the
//! process's environment, rlimits or current directory; what a daemon needs is set on its
//! command ([`Daemon::start_env`]).
#![allow(dead_code)]

mod console;
mod gateway;
mod migration;
mod pipes;
mod process;
mod slow;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use console::*;
#[allow(unused_imports)]
pub use gateway::*;
#[allow(unused_imports)]
pub use migration::*;
#[allow(unused_imports)]
pub use pipes::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use slow::*;

use conlog::proto::agent_client::AgentClient;
use conlog::proto::console_client::ConsoleClient;
use conlog::proto::Access;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;

/// How long anything the daemon does may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// A config without the time index, for tests whose arithmetic counts files of exactly
/// `max_size` log bytes: with it (the default) a log file and its index share `max_size`
/// (docs/design.md, "Time index"), so each file holds a little less.
pub const NO_TIME_INDEX: &str = "logs:\n  time_index: false\n";
/// Pause between two polls.
pub const POLL: Duration = Duration::from_millis(20);

/// Serializes the heavy tests of a binary (a gibibyte flood, thousands of guests, a soak, a
/// 250 MiB history, floods measured against a bound): they ran alone or in pairs when each
/// file was its own binary; sharing one process, two of them at once on a 2-CPU machine would
/// stretch the bounds they check. The light tests run beside them as before. Held for the
/// whole test (an async mutex: it is held across `.await`).
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Adds `authorization: Bearer <token>` to every call (nothing when `None`).
#[derive(Clone)]
pub struct Bearer(pub Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel to the Console service, with the caller's credentials.
pub type ConsoleChannel = InterceptedService<Channel, Bearer>;

/// `channel` with `token` on every call.
pub fn with_token(channel: Channel, token: &str) -> ConsoleChannel {
    let value = format!("Bearer {token}").parse().expect("tokens are ASCII");
    InterceptedService::new(channel, Bearer(Some(value)))
}

/// Anything a Console client can be made from: a bare channel (the local socket, or TCP
/// without credentials) or a [`ConsoleChannel`].
pub trait IntoConsole {
    fn console(self) -> ConsoleClient<ConsoleChannel>;
}

impl IntoConsole for Channel {
    fn console(self) -> ConsoleClient<ConsoleChannel> {
        ConsoleClient::new(InterceptedService::new(self, Bearer(None)))
    }
}

impl IntoConsole for ConsoleChannel {
    fn console(self) -> ConsoleClient<ConsoleChannel> {
        ConsoleClient::new(self)
    }
}

/// Path of the daemon binary built for these tests.
pub fn conlogd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_conlogd")
}

/// Path of the command-line binary built for these tests.
pub fn conlogctl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_conlogctl")
}

/// The repository root (for `proto/` and `tests/python/`).
pub fn repo_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A running (or stopped) `conlogd` on its own temporary directories.
pub struct Daemon {
    dir: TempDir,
    runtime_dir: PathBuf,
    data_dir: PathBuf,
    config: Option<PathBuf>,
    extra_args: Vec<String>,
    child: Option<Child>,
    stderr_path: PathBuf,
    starts: u32,
    /// RLIMIT_NOFILE (soft and hard) the daemon runs under, through `prlimit`, if set.
    nofile: Option<u64>,
    /// Environment variables set on the daemon's command (its restarts and successors too,
    /// until changed).
    pub env: Vec<(String, String)>,
    /// TCP address of the Console service of the current run.
    pub tcp: SocketAddr,
    /// Address of the metrics endpoint of the current run.
    pub metrics: SocketAddr,
}

impl Daemon {
    /// Starts a daemon on embedded defaults (plus fresh directories and port 0).
    pub async fn start() -> Self {
        Self::start_with(None, &[]).await
    }

    /// Starts a daemon with `config_yaml` as its `--config` file (if any) and extra flags.
    pub async fn start_with(config_yaml: Option<&str>, extra_args: &[&str]) -> Self {
        Self::start_limited(config_yaml, extra_args, None).await
    }

    /// Starts a daemon on embedded defaults with environment variables `env` (e.g.
    /// `CONLOG_FAULT_POINTS`), kept for its restarts until [`Daemon::env`] is changed. Tests
    /// share their binary's process, so none sets a variable there for the daemon to inherit.
    pub async fn start_env(env: &[(&str, &str)]) -> Self {
        Self::start_full(None, &[], None, env).await
    }

    /// The same, under RLIMIT_NOFILE `nofile` (soft and hard, set by `prlimit`) if given.
    pub async fn start_limited(
        config_yaml: Option<&str>,
        extra_args: &[&str],
        nofile: Option<u64>,
    ) -> Self {
        Self::start_full(config_yaml, extra_args, nofile, &[]).await
    }

    /// All of the above: config file, extra flags, RLIMIT_NOFILE and environment.
    pub async fn start_full(
        config_yaml: Option<&str>,
        extra_args: &[&str],
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("conlog-test-")
            .tempdir()
            .expect("temporary directory");
        let config = config_yaml.map(|yaml| {
            let path = dir.path().join("config.yaml");
            std::fs::write(&path, yaml).expect("write config file");
            path
        });
        let mut daemon = Self {
            runtime_dir: dir.path().join("run"),
            data_dir: dir.path().join("data"),
            stderr_path: dir.path().join("conlogd.0.stderr"),
            dir,
            config,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            starts: 0,
            nofile,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tcp: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        daemon.spawn_and_wait_ready().await;
        daemon
    }

    /// A `conlogd` command on this daemon's directories and config (port 0), not started.
    pub fn command(&self) -> Command {
        let mut cmd = match self.nofile {
            None => Command::new(conlogd_bin()),
            Some(n) => {
                // prlimit execs the daemon: the child's pid is the daemon's.
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(conlogd_bin());
                cmd
            }
        };
        cmd.arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.args(&self.extra_args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    async fn spawn_and_wait_ready(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.starts += 1;
        self.stderr_path = self
            .dir
            .path()
            .join(format!("conlogd.{}.stderr", self.starts));
        let stderr = File::create(&self.stderr_path).expect("create stderr file");
        let stdout = stderr.try_clone().expect("dup stderr file");
        let child = self
            .command()
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn conlogd");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let text = self.stderr();
            if let Some(line) = text.lines().find(|l| l.contains("conlogd ready")) {
                self.tcp = field(line, "tcp=").unwrap_or_else(|| panic!("no tcp= in {line:?}"));
                self.metrics =
                    field(line, "metrics=").unwrap_or_else(|| panic!("no metrics= in {line:?}"));
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                self.child = None;
                panic!("conlogd exited before it was ready ({status}); stderr:\n{text}");
            }
            if Instant::now() > deadline {
                panic!("conlogd not ready after {DEADLINE:?}; stderr:\n{text}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runtime directory (sockets).
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// Data directory (state and logs).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The local gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("conlogd.sock")
    }

    /// The hand-off socket.
    pub fn fd_socket(&self) -> PathBuf {
        self.runtime_dir.join("fd.sock")
    }

    /// `<data_dir>/logs`.
    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }

    /// `<log_dir>/<guest>/<stream>.log`.
    pub fn log_path(&self, guest: &str, stream: &str) -> PathBuf {
        self.log_dir().join(guest).join(format!("{stream}.log"))
    }

    /// Process id of the current run.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Diagnostics (stderr and stdout) of the current run so far, without colour codes.
    pub fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    /// Diagnostics of every run of this daemon so far, oldest first, for failure messages.
    pub fn all_stderr(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                let path = self.dir.path().join(format!("conlogd.{n}.stderr"));
                let text = std::fs::read_to_string(path).unwrap_or_default();
                format!("--- conlogd run {n} ---\n{}", strip_ansi(&text))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// An `Agent` client over the local UNIX socket.
    pub async fn agent(&self) -> AgentClient<Channel> {
        let channel = conlog::client::connect_local(&self.socket())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.socket().display()));
        AgentClient::new(channel)
    }

    /// A plaintext channel to the TCP listener, without credentials.
    pub async fn plain_tcp_channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.tcp))
            .expect("valid URI")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.tcp))
    }

    /// A token from `Agent.IssueToken`.
    pub async fn token(
        &self,
        guest: &str,
        device: &str,
        access: Access,
        ttl_seconds: u64,
    ) -> String {
        self.agent()
            .await
            .issue_token(conlog::proto::IssueTokenRequest {
                guest: guest.into(),
                device: device.into(),
                access: access.into(),
                ttl_seconds,
            })
            .await
            .unwrap_or_else(|e| panic!("IssueToken for {guest}: {e}"))
            .into_inner()
            .token
    }

    /// A channel to the TCP listener carrying a read-write token for every device of `guest`.
    pub async fn tcp_channel(&self, guest: &str) -> ConsoleChannel {
        let token = self.token(guest, "", Access::ReadWrite, 3600).await;
        with_token(self.plain_tcp_channel().await, &token)
    }

    /// Panics (with its diagnostics) if the process has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("daemon started");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("conlogd exited ({status}); stderr:\n{}", self.stderr());
        }
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.wait_exit().await
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let child = self.child.as_ref().expect("daemon running");
        rustix::process::kill_process(rustix::process::Pid::from_child(child), signal)
            .expect("signal conlogd");
    }

    /// Waits (bounded) until the process has exited and returns its status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        let child = self.child.as_mut().expect("daemon running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "conlogd did not exit within {DEADLINE:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILL, as a crash would; waits for the process to be gone.
    pub async fn kill(&mut self) {
        self.signal(rustix::process::Signal::KILL);
        let status = self.wait_exit().await;
        assert!(
            status.code().is_none(),
            "killed daemon exited with {status}"
        );
    }

    /// Starts the daemon again on the same directories and config (after stop or kill).
    pub async fn restart(&mut self) {
        self.spawn_and_wait_ready().await;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `key=VALUE` of a tracing line, parsed.
fn field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
