//! SIGUSR1 and SIGHUP that arrive while the daemon starts (here: while a successor restores
//! what it took over) wait, pending, and are acted on once it serves: the daemon survives,
//! reloads, then upgrades in place, and the stream it carries loses nothing.
#![allow(
    clippy::cast_possible_wrap,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;
use crate::upgrade_common;

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;
use support::*;
use upgrade_common::*;

/// The start-up window is held open this long by a fault point inside restore.
const HOLD_MS: u64 = 3000;

/// A `conlogd --takeover` of `daemon` with fault points armed.
struct Armed {
    child: Child,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Armed {
    fn spawn(daemon: &Daemon, faults: &str) -> Self {
        let base = daemon.command();
        let mut cmd = Command::new(base.get_program());
        let mut args = base.get_args();
        while let Some(arg) = args.next() {
            cmd.arg(arg);
            if arg == "--listen" || arg == "--metrics" {
                args.next().expect("a value follows");
                let address = if arg == "--listen" {
                    daemon.tcp
                } else {
                    daemon.metrics
                };
                cmd.arg(address.to_string());
            }
        }
        for (key, value) in base.get_envs() {
            if let Some(value) = value {
                cmd.env(key, value);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("stderr");
        let stderr = File::create(&stderr_path).unwrap();
        let child = cmd
            .arg("--takeover")
            .env("CONLOG_FAULT_POINTS", faults)
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().unwrap())
            .stderr(stderr)
            .spawn()
            .expect("spawn conlogd --takeover");
        Self {
            child,
            stderr_path,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    fn assert_alive(&mut self, when: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("conlogd {when}: exited ({status}):\n{}", self.stderr());
        }
    }

    /// Waits (bounded) until its diagnostics mention `needle` `count` times.
    async fn wait_mentions(&mut self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let text = self.stderr();
            if text.matches(needle).count() >= count {
                return text;
            }
            self.assert_alive(&format!("waiting for {count}× {needle:?}"));
            assert!(
                Instant::now() < deadline,
                "no {count}× {needle:?} within {DEADLINE:?}:\n{text}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process-wide pending signals (`ShdPnd`) of `pid`, as a bit mask (bit n-1: signal n).
fn pending_signals(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .expect("ShdPnd in /proc/PID/status");
    u64::from_str_radix(line.trim(), 16).unwrap()
}

/// A successor is held inside restore by a fault point; SIGHUP and SIGUSR1 are sent then (and
/// are seen pending, so the window was hit, not missed). It survives, becomes ready, reloads,
/// then upgrades in place (same pid, a second "ready", `conlog_upgrades_total` counts the
/// takeover and the upgrade); the pipe it took over keeps working and loses no byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_during_startup_wait_and_are_acted_on_once_serving() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    let writer = PipeWriter::start("vm1", pipe);
    let socket = daemon.socket();
    wait_list(&socket, "the pipe logging", |r| {
        find(r, "vm1", "qemu").is_some_and(|s| s.offset > 0)
    })
    .await;

    let faults = format!("start.restore=sleep:{HOLD_MS}");
    let mut successor = Armed::spawn(&daemon, &faults);
    let pid = successor.child.id();
    successor
        .wait_mentions("fault point start.restore reached", 1)
        .await;
    let hup = rustix::process::Signal::HUP;
    let usr1 = rustix::process::Signal::USR1;
    for signal in [hup, usr1] {
        rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), signal)
            .unwrap();
    }
    let pending = pending_signals(pid);
    successor.assert_alive("right after SIGHUP and SIGUSR1 during start-up");
    // SIGHUP is 1, SIGUSR1 is 10 on Linux.
    let both = 1 << (1 - 1) | 1 << (10 - 1);
    assert_eq!(
        pending & both,
        both,
        "SIGHUP and SIGUSR1 wait, pending, while the daemon starts (ShdPnd {pending:x}):\n{}",
        successor.stderr()
    );
    assert_eq!(
        daemon.wait_exit().await.code(),
        Some(0),
        "the old daemon handed over"
    );

    // Ready once after the takeover, once more after the upgrade it was asked for meanwhile.
    let text = successor.wait_mentions("conlogd ready", 2).await;
    successor.assert_alive("after the upgrade");
    let ready = ready_lines(&text);
    assert!(
        ready
            .iter()
            .all(|line| field::<u32>(line, "pid=") == Some(pid)),
        "same pid: {ready:?}"
    );
    let reload = text.find("SIGHUP: no TLS configured").expect(&text);
    let upgrade = text.find("upgrading in place").expect(&text);
    let first_ready = text.find("conlogd ready").unwrap();
    assert!(
        first_ready < reload && reload < upgrade,
        "reloaded once serving, then upgraded:\n{text}"
    );
    assert_eq!(
        std::fs::read_to_string(daemon.runtime_dir().join("conlogd.lock"))
            .unwrap()
            .trim(),
        pid.to_string(),
        "conlogd.lock names the successor"
    );
    let metrics_text = tokio::task::spawn_blocking({
        let metrics = daemon.metrics;
        move || http_get(metrics, "/metrics").1
    })
    .await
    .unwrap();
    assert_eq!(
        metric(&metrics_text, "conlog_upgrades_total"),
        Some(2.0),
        "{metrics_text}"
    );

    let before = get(&list_guests(&socket).await, "vm1", "qemu").offset;
    wait_list(&socket, "the pipe logging after the upgrade", |r| {
        get(r, "vm1", "qemu").offset > before
    })
    .await;
    let written = writer.finish().await;
    let log_dir = daemon.log_dir();
    wait_list(&socket, "everything written logged", |r| {
        get(r, "vm1", "qemu").offset == written.len() as u64
    })
    .await;
    assert_same(
        "log vs bytes written",
        &read_log(&log_dir, "vm1", "qemu"),
        &written,
    );
    successor.assert_alive("at the end");
}
