//! Hand-offs racing upgrades and takeovers, against the real binary: a `CreateLogPipe` or an
//! `fd.sock` claim is held by a fault point at the moment an in-place upgrade (SIGUSR1), a
//! takeover, or a takeover whose successor dies is asked for, over and over. Every call admitted
//! before the freeze finishes and is carried (the pipe it returned is claimable in the next
//! image; the claim in progress delivers its write end), every byte written through every
//! handed-out pipe reaches its log, and no writer ever gets EPIPE.
//!
//! The fault points (armed for every image: this binary has one test, so the environment is its
//! own): every `handoff.register` and `handoff.claim` holds its call for [`HOLD_MS`], and every
//! freeze holds, once the table is taken, for [`FROZEN_MS`] before it execs or sends the state:
//! without the gate, a held call resumes after the table was carried, and its hand-off is lost.
//! Each round also checks, from the daemon's own log, that the event began while the call was
//! held (the window was hit, not missed because the machine was slow).
#![allow(
    clippy::cast_possible_wrap,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;
use crate::upgrade_common;

use conlog::proto::{self, LogMode};
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use upgrade_common::*;

const HOLD_MS: u64 = 5000;
const FROZEN_MS: u64 = 2500;

/// A process serving the runtime directory: the harness's daemon, or a successor.
enum Serving {
    Harness,
    Successor(Proc),
}

/// A `conlogd --takeover` (with `faults` replacing the inherited fault points, if given).
struct Proc {
    child: Option<Child>,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    fn spawn(daemon: &Daemon, faults: Option<&str>) -> Self {
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
        if let Some(faults) = faults {
            cmd.env("CONLOG_FAULT_POINTS", faults);
        }
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("stderr");
        let stderr = File::create(&stderr_path).unwrap();
        let child = cmd
            .arg("--takeover")
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

    fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "no exit:\n{}", self.stderr());
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (bounded) until `text()` mentions `needle` more than `seen` times; returns the count.
async fn wait_more(what: &str, needle: &str, seen: usize, text: impl Fn() -> String) -> usize {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let all = text();
        let count = all.matches(needle).count();
        if count > seen {
            return count;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no new {needle:?} after {DEADLINE:?}:\n{all}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Panics unless, in `text`, the event (`event` line) began after the `seen`-th (0-based)
/// `needle` (the call held) and before the held call finished (any of `done`).
fn assert_window_hit(
    round: usize,
    text: &str,
    needle: &str,
    seen: usize,
    event: &str,
    done: &[&str],
) {
    let (held_at, _) = text
        .match_indices(needle)
        .nth(seen)
        .unwrap_or_else(|| panic!("round {round}: no held call:\n{text}"));
    let rest = &text[held_at..];
    let event_at = rest
        .find(event)
        .unwrap_or_else(|| panic!("round {round}: no {event:?} after the held call:\n{rest}"));
    let done_at = done.iter().filter_map(|d| rest.find(d)).min();
    assert!(
        done_at.is_none_or(|done_at| event_at < done_at),
        "round {round}: the event began only once the held call had finished (window missed):\n{rest}"
    );
}

/// A thread writing numbered lines into a handed-out pipe until stopped; it records the first
/// write error (EPIPE would mean the pipe's read end was lost).
struct Writer {
    tag: String,
    stop: Arc<AtomicBool>,
    lines: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Writer {
    fn start(tag: &str, fd: OwnedFd) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (tag, stop, lines) = (tag.to_owned(), stop.clone(), lines.clone());
            let mut pipe = File::from(fd);
            move || {
                let mut n = 0;
                while !stop.load(SeqCst) {
                    pipe.write_all(&line(&tag, n))
                        .map_err(|e| format!("writer {tag}: write of line {n}: {e}"))?;
                    n += 1;
                    lines.store(n, SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(())
            }
        });
        Self {
            tag: tag.to_owned(),
            stop,
            lines,
            thread: Some(thread),
        }
    }

    /// Stops the writer; everything it wrote, or its write error.
    async fn finish(mut self) -> Result<Vec<u8>, String> {
        self.stop.store(true, SeqCst);
        let thread = self.thread.take().unwrap();
        let deadline = Instant::now() + DEADLINE;
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "writer {} blocked", self.tag);
            tokio::time::sleep(POLL).await;
        }
        thread.join().unwrap()?;
        Ok(lines(&self.tag, self.lines.load(SeqCst)))
    }
}

/// Claims a token; retries only what the protocol says to retry (the daemon is upgrading, or
/// the connection ended with its image), never a refused token.
async fn claim_retrying(fd_socket: &Path, token: &str) -> OwnedFd {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match claim_token(fd_socket, token).await {
            Ok(fd) => return fd,
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("upgrading") || text.contains("without an answer"),
                    "a carried token was refused: {text}"
                );
                assert!(Instant::now() < deadline, "claim still refused: {text}");
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Upgrade,
    Takeover,
    FailedTakeover,
}

#[derive(Clone, Copy, Debug)]
enum Held {
    Create,
    Claim,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handoffs_racing_upgrades_and_takeovers_are_carried_or_refused() {
    let faults = format!(
        "handoff.register=sleep:{HOLD_MS},handoff.claim=sleep:{HOLD_MS},upgrade.frozen=sleep:{FROZEN_MS}"
    );
    // The daemon and its successors (which copy its command's environment) run with these.
    let mut daemon = Daemon::start_env(&[("CONLOG_FAULT_POINTS", &faults)]).await;
    let socket = daemon.socket();
    let fd_socket = daemon.fd_socket();
    let log_dir = daemon.log_dir();
    let mut serving = Serving::Harness;
    let text_of = |serving: &Serving, daemon: &Daemon| match serving {
        Serving::Harness => daemon.stderr(),
        Serving::Successor(p) => p.stderr(),
    };

    let rounds = [
        (Event::Upgrade, Held::Create),
        (Event::Upgrade, Held::Claim),
        (Event::Takeover, Held::Create),
        (Event::Takeover, Held::Claim),
        (Event::FailedTakeover, Held::Create),
        (Event::FailedTakeover, Held::Claim),
        (Event::Upgrade, Held::Create),
        (Event::Takeover, Held::Claim),
    ];
    let mut writers = Vec::new();
    let mut successors_failed = 0;
    for (n, (event, held)) in rounds.into_iter().enumerate() {
        let guest = format!("race{n}");
        let limits = Some(limits(HUGE, 1, LogMode::Rotate));
        // A pipe to claim during the event, or the call held during it.
        let mut agent = agent(&socket).await;
        let pending: Option<proto::CreateLogPipeResponse> = match held {
            Held::Claim => Some(
                create_pipe(&mut agent, &guest, "qemu", limits)
                    .await
                    .expect("CreateLogPipe"),
            ),
            Held::Create => None,
        };
        let needle = match held {
            Held::Create => "fault point handoff.register reached",
            Held::Claim => "fault point handoff.claim reached",
        };
        let seen = text_of(&serving, &daemon).matches(needle).count();
        let call = {
            let (guest, fd_socket) = (guest.clone(), fd_socket.clone());
            tokio::spawn(async move {
                match pending {
                    Some(reply) => claim_token(&fd_socket, &reply.handoff_token)
                        .await
                        .map_err(|e| format!("the claim in progress during the event: {e}")),
                    None => {
                        let reply = create_pipe(&mut agent, &guest, "qemu", limits)
                            .await
                            .map_err(|s| {
                                format!("the CreateLogPipe in progress during the event: {s:?}")
                            })?;
                        Ok(claim_retrying(&fd_socket, &reply.handoff_token).await)
                    }
                }
            })
        };
        wait_more(&format!("round {n}"), needle, seen, || {
            text_of(&serving, &daemon)
        })
        .await;

        // The call is held inside the daemon now: ask for the event.
        let event_line = match event {
            Event::Upgrade => "upgrading in place",
            Event::Takeover | Event::FailedTakeover => "a successor is taking over",
        };
        let done: &[&str] = match held {
            Held::Create => &["log pipe created"],
            Held::Claim => &["log pipe handed over", "hand-off refused"],
        };
        let held_by: String;
        let ready_before = ready_lines(&text_of(&serving, &daemon)).len();
        match event {
            Event::Upgrade => {
                match &serving {
                    Serving::Harness => daemon.signal(rustix::process::Signal::USR1),
                    Serving::Successor(p) => rustix::process::kill_process(
                        rustix::process::Pid::from_raw(p.pid() as i32).unwrap(),
                        rustix::process::Signal::USR1,
                    )
                    .unwrap(),
                }
                wait_ready_count(&format!("round {n}: upgrade"), ready_before + 1, || {
                    text_of(&serving, &daemon)
                })
                .await;
                held_by = text_of(&serving, &daemon);
            }
            Event::Takeover => {
                let successor = Proc::spawn(&daemon, None);
                wait_ready_count(&format!("round {n}: takeover"), 1, || successor.stderr()).await;
                let status = match &mut serving {
                    Serving::Harness => daemon.wait_exit().await,
                    Serving::Successor(old) => old.wait_exit().await,
                };
                assert_eq!(status.code(), Some(0), "round {n}: the old daemon exits 0");
                held_by = text_of(&serving, &daemon);
                serving = Serving::Successor(successor);
            }
            Event::FailedTakeover => {
                // Inherits every fault point above, and dies once it has the state.
                let mut successor =
                    Proc::spawn(&daemon, Some(&format!("{faults},takeover.received=kill")));
                let status = successor.wait_exit().await;
                assert_eq!(status.code(), None, "round {n}: the successor was killed");
                assert!(
                    !successor.stderr().contains("conlogd ready"),
                    "{}",
                    successor.stderr()
                );
                successors_failed += 1;
                wait_ready_count(&format!("round {n}: thawed"), ready_before + 1, || {
                    text_of(&serving, &daemon)
                })
                .await;
                held_by = text_of(&serving, &daemon);
                assert!(held_by.contains("takeover failed; serving on"));
            }
        }
        let fd = call
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("round {n} ({event:?}, {held:?}): {e}"));
        assert_window_hit(n, &held_by, needle, seen, event_line, done);
        writers.push((guest, Writer::start(&format!("race{n}"), fd)));
    }

    // Every pipe handed out logs every byte written into it; no writer saw an error.
    let mut written = Vec::new();
    for (guest, writer) in writers {
        let bytes = writer
            .finish()
            .await
            .unwrap_or_else(|e| panic!("{guest}: {e}"));
        written.push((guest, bytes));
    }
    wait_list(&socket, "every byte written logged", |r| {
        written
            .iter()
            .all(|(guest, bytes)| get(r, guest, "qemu").offset == bytes.len() as u64)
    })
    .await;
    for (guest, bytes) in &written {
        assert_same(
            &format!("{guest}: log vs bytes written"),
            &read_log(&log_dir, guest, "qemu"),
            bytes,
        );
    }
    assert_eq!(successors_failed, 2);
    eprintln!(
        "{} hand-offs raced {} events; {:?} bytes logged",
        written.len(),
        rounds.len(),
        written.iter().map(|(_, b)| b.len()).collect::<Vec<_>>()
    );
}
