//! In-place upgrades that must not happen, against the real binary: the binary at the daemon's
//! path is broken, reads another snapshot format, or refuses the (changed) config file: the
//! upgrade is refused up front by the preflight and the daemon serves on.
#![allow(
    clippy::cast_possible_wrap,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;
use crate::upgrade_common;

use conlog::proto;
use rustix::process::Signal;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;
use support::*;
use tonic::Code;
use upgrade_common::*;

/// A `conlogd` started from a copy of the binary in its own directory, so that the test can
/// replace the file, as an operator upgrading the package does.
struct CopiedDaemon {
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
    stderr_path: PathBuf,
    config: PathBuf,
}

impl CopiedDaemon {
    async fn start(config_yaml: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("conlog-upgrade-")
            .tempdir()
            .expect("temporary directory");
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let bin = dir.path().join("bin/conlogd");
        std::fs::copy(conlogd_bin(), &bin).expect("copy conlogd");
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, config_yaml).unwrap();
        let stderr_path = dir.path().join("conlogd.stderr");
        let stderr = File::create(&stderr_path).unwrap();
        let child = Command::new(&bin)
            .arg("--runtime-dir")
            .arg(dir.path().join("run"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().unwrap())
            .stderr(stderr)
            .spawn()
            .expect("spawn the copied conlogd");
        let daemon = Self {
            dir,
            bin,
            child: Some(child),
            stderr_path,
            config,
        };
        daemon.wait_ready(1).await;
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/conlogd.sock")
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("data/logs")
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn signal(&self, signal: Signal) {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.pid() as i32).unwrap(),
            signal,
        )
        .expect("signal the copied conlogd");
    }

    fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    /// Waits for the `count`-th ready line (panics if the process exits); checks its pid.
    async fn wait_ready(&self, count: usize) {
        let pid = self.pid();
        let line = wait_ready_count("copied conlogd", count, || self.stderr()).await;
        assert_eq!(field::<u32>(&line, "pid="), Some(pid), "{line}");
    }

    /// Whether the process has exited (and its status).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Replaces the binary with `content` (mode 0755) the way package managers do: write a
    /// new file beside it, rename it over the old one.
    fn replace_binary(&self, content: &[u8]) {
        let new = self.bin.with_extension("new");
        std::fs::write(&new, content).unwrap();
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&new, &self.bin).unwrap();
    }

    fn restore_binary(&self) {
        let new = self.bin.with_extension("new");
        std::fs::copy(conlogd_bin(), &new).unwrap();
        std::fs::rename(&new, &self.bin).unwrap();
    }
}

impl Drop for CopiedDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (bounded) until `text()` mentions `needle` `count` times.
async fn wait_mentions(needle: &str, count: usize, text: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let all = text();
        if all.matches(needle).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged {count} times after {DEADLINE:?}:\n{all}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// `Agent.Upgrade` on `socket`.
async fn upgrade_rpc(socket: &Path) -> Result<u32, tonic::Status> {
    agent(socket)
        .await
        .upgrade(proto::UpgradeRequest {})
        .await
        .map(|r| r.into_inner().pid)
}

/// Waits until `guest/qemu` logged more than `after` bytes and is open; returns its offset.
async fn wait_logging(socket: &Path, guest: &str, after: u64) -> u64 {
    let reply = wait_list(socket, &format!("{guest} logging past {after}"), |r| {
        find(r, guest, "qemu").is_some_and(|s| s.open && s.offset > after)
    })
    .await;
    get(&reply, guest, "qemu").offset
}

/// The binary at the daemon's path is replaced by one that fails (`exit 1`), then by one that
/// reads another snapshot format: `Agent.Upgrade` is refused with FAILED_PRECONDITION naming
/// the snapshot format, SIGUSR1 is refused with an error in the log, and the daemon (same
/// process, same image) keeps serving and logging without a gap. With the real binary back,
/// the upgrade goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_a_broken_binary_keeps_serving() {
    let daemon = CopiedDaemon::start("log_level: info\n").await;
    let socket = daemon.socket();
    let pid = daemon.pid();
    let mut agent = agent(&socket).await;
    let (_, pipe) = open_pipe(&mut agent, "vm-w", "qemu", None).await;
    let writer = PipeWriter::start("vm-w", pipe);
    let mut offset = wait_logging(&socket, "vm-w", 0).await;

    daemon.replace_binary(b"#!/bin/sh\nexit 1\n");
    let status = upgrade_rpc(&socket).await.expect_err("a failing binary");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("snapshot format"),
        "the refusal says why: {status:?}"
    );
    offset = wait_logging(&socket, "vm-w", offset).await;

    daemon.signal(Signal::USR1);
    wait_mentions("upgrade refused", 2, || daemon.stderr()).await;
    offset = wait_logging(&socket, "vm-w", offset).await;

    daemon.replace_binary(b"#!/bin/sh\necho 2\n");
    let status = upgrade_rpc(&socket)
        .await
        .expect_err("another snapshot format");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("snapshot format 1") && status.message().contains("\"2\""),
        "the refusal names both formats: {status:?}"
    );
    offset = wait_logging(&socket, "vm-w", offset).await;
    assert_eq!(
        ready_lines(&daemon.stderr()).len(),
        1,
        "no upgrade happened:\n{}",
        daemon.stderr()
    );
    assert!(
        !daemon.stderr().contains("upgrading in place"),
        "nothing was frozen:\n{}",
        daemon.stderr()
    );

    daemon.restore_binary();
    assert_eq!(upgrade_rpc(&socket).await.expect("upgrade"), pid);
    daemon.wait_ready(2).await;
    wait_logging(&socket, "vm-w", offset).await;

    let written = writer.finish().await;
    wait_list(&socket, "every byte logged", |r| {
        find(r, "vm-w", "qemu").is_some_and(|s| !s.open && s.offset == written.len() as u64)
    })
    .await;
    assert_same(
        "log vs bytes written",
        &read_log(&daemon.log_dir(), "vm-w", "qemu"),
        &written,
    );
    let diagnostics = daemon.stderr();
    assert_eq!(
        diagnostics.matches("upgrade refused").count(),
        3,
        "{diagnostics}"
    );
}

/// The config file was changed into one the binary refuses (an operator broke the file, or
/// the new version rejects a setting): the preflight runs the binary with the daemon's own
/// arguments, so the upgrade is refused up front (docs/operations.md, "systemd: in place"):
/// "upgrade refused" is logged, nothing is frozen, no new image starts, and the daemon (same
/// process, same image) serves on with the log pipe and its writer intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_a_config_the_binary_refuses_is_refused_up_front() {
    let mut daemon = CopiedDaemon::start("log_level: info\n").await;
    let socket = daemon.socket();
    let mut agent = agent(&socket).await;
    let (_, pipe) = open_pipe(&mut agent, "vm-cfg", "qemu", None).await;
    let writer = PipeWriter::start("vm-cfg", pipe);
    let offset = wait_logging(&socket, "vm-cfg", 0).await;

    std::fs::write(&daemon.config, "logs:\n  max_sise: 3\n").unwrap();
    let status = upgrade_rpc(&socket)
        .await
        .expect_err("a config the binary refuses");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("max_sise"),
        "the refusal says why: {status:?}"
    );
    daemon.signal(Signal::USR1);
    wait_mentions("upgrade refused", 2, || daemon.stderr()).await;
    if let Some(status) = daemon.exited() {
        panic!("the daemon is gone ({status}):\n{}", daemon.stderr());
    }
    let text = daemon.stderr();
    assert_eq!(ready_lines(&text).len(), 1, "no new image started:\n{text}");
    assert!(
        !text.contains("upgrading in place"),
        "nothing was frozen:\n{text}"
    );
    wait_logging(&socket, "vm-cfg", offset).await;
    let written = writer.finish().await;
    wait_list(&socket, "every byte logged", |r| {
        find(r, "vm-cfg", "qemu").is_some_and(|s| !s.open && s.offset == written.len() as u64)
    })
    .await;
    assert_same(
        "log vs bytes written",
        &read_log(&daemon.log_dir(), "vm-cfg", "qemu"),
        &written,
    );
}
