//! The bounded crash soak (docs/operations.md, "Crash guarantees"), against the real binary with
//! the keeper on (`keeper: auto`). Log pipes (two rotating every few dozen KiB, one in truncate
//! mode) and console guests write numbered lines continuously while a seeded random schedule
//! kills conlogd with SIGKILL and starts it again, upgrades it in place (SIGUSR1) and has a
//! `--takeover` successor replace it; the keeper itself is killed once in the middle. A
//! `ReadHistory` follower reads every stream by offset (resuming with `from_offset` after each
//! interruption), an `AttachConsole` viewer watches one console live, and a sampler polls
//! `ListGuests` all along.
//!
//! At the end: no writer ever saw EPIPE; each console guest's connection is the one it opened
//! (never closed, still logged); offsets never went back (every `ListGuests` sample, every
//! follower chunk, every viewer attachment); every line is logged at most once and in order;
//! what is missing is exactly accounted: each loss is one range of at most one read, lies
//! where a kill happened (at most one per stream per kill), and none at an upgrade, a
//! takeover or the keeper's death; history gaps add up to `dropped_bytes` (rotated-away ranges
//! of the truncate-mode stream aside), and the live viewer saw exactly what history holds.
//!
//! Size: 15 kills, 4 upgrades and 4 takeovers by default; `CONLOG_SOAK=full` runs 100, 20 and
//! 20, `CONLOG_SOAK=K,U,T` any other; `CONLOG_SOAK_SEED=N` replays a schedule (the seed is
//! printed). Events stop being scheduled at the deadline (`CONLOG_SOAK_MINUTES`, 10 by default,
//! 60 for `full`); the checks run on what was done.
//!
//! `CONLOG_SOAK=full cargo test --test faults crash_soak:: -- --nocapture` gives the figures in
//! docs/operations.md.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::crash_common;
use crate::support;
use crate::upgrade_common;

use conlog::proto::{self, console_client::ConsoleClient, read_history_request::Start, LogMode};
use crash_common::{alive, keeper_pid, write_lines_paced, written, Lcg, Outcome};
use crash_common::{CONSOLE_READ, PIPE_READ};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use upgrade_common::{field, find, list_guests, wait_list, wait_ready_count, Successor};

/// What feeds a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pipe,
    Console,
}

/// A stream of the soak.
struct Spec {
    guest: &'static str,
    kind: Kind,
    max_size: u64,
    max_backups: u32,
    mode: LogMode,
}

impl Spec {
    fn stream(&self) -> &'static str {
        match self.kind {
            Kind::Pipe => "qemu",
            Kind::Console => DEVICE,
        }
    }

    /// Largest single read of the daemon on this stream: the most a kill may lose.
    fn read_size(&self) -> usize {
        match self.kind {
            Kind::Pipe => PIPE_READ,
            Kind::Console => CONSOLE_READ,
        }
    }

    fn limits(&self) -> proto::LogLimits {
        limits(self.max_size, self.max_backups, self.mode)
    }
}

/// The streams. Rotating ones keep about 1 MiB (several seconds of their writer) so that a
/// follower that resumes after an event finds its position still on disk: any gap it sees is
/// then an offset handed out without its bytes, which must be counted in `dropped_bytes`. The
/// truncate-mode stream keeps one file: a truncation right after a restart removes what its
/// follower had not read yet (a gap, not a loss).
const STREAMS: [Spec; 5] = [
    Spec {
        guest: "vm-rot0",
        kind: Kind::Pipe,
        max_size: 64 << 10,
        max_backups: 16,
        mode: LogMode::Rotate,
    },
    Spec {
        guest: "vm-rot1",
        kind: Kind::Pipe,
        max_size: 16 << 10,
        max_backups: 64,
        mode: LogMode::Rotate,
    },
    Spec {
        guest: "vm-trunc",
        kind: Kind::Pipe,
        max_size: 128 << 10,
        max_backups: 0,
        mode: LogMode::Truncate,
    },
    Spec {
        guest: "vm-con0",
        kind: Kind::Console,
        max_size: 64 << 10,
        max_backups: 16,
        mode: LogMode::Rotate,
    },
    Spec {
        guest: "vm-con1",
        kind: Kind::Console,
        max_size: 256 << 10,
        max_backups: 4,
        mode: LogMode::Rotate,
    },
];

/// The console watched live by an `AttachConsole` viewer.
const VIEWED: usize = 3;
/// Pause between two 2,400-byte writes of a writer (about 200 KB/s each).
const PAUSE: Duration = Duration::from_millis(10);
/// Written last on each console connection, to show it is still the same, still logged.
const MARKER: &[u8] = b"the same connection\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Kill,
    Upgrade,
    Takeover,
    KeeperKill,
}

/// An event done, with every stream's offset just before it and once every stream logged
/// again after it: whatever it lost lies between the two.
struct Done {
    event: Event,
    before: Vec<u64>,
    after: Vec<u64>,
}

/// Size of the soak: kills, upgrades, takeovers, deadline, seed.
struct Size {
    kills: usize,
    upgrades: usize,
    takeovers: usize,
    deadline: Duration,
    seed: u64,
}

impl Size {
    fn from_env() -> Self {
        let (counts, minutes) = match std::env::var("CONLOG_SOAK").ok().as_deref() {
            None | Some("") => ((15, 4, 4), 10),
            Some("full") => ((100, 20, 20), 60),
            Some(other) => {
                let n: Vec<usize> = other
                    .split(',')
                    .map(|n| n.trim().parse().expect("CONLOG_SOAK: full or K,U,T"))
                    .collect();
                assert_eq!(n.len(), 3, "CONLOG_SOAK: full or K,U,T");
                ((n[0], n[1], n[2]), 60)
            }
        };
        let minutes = std::env::var("CONLOG_SOAK_MINUTES")
            .ok()
            .map_or(minutes, |m| m.parse().expect("CONLOG_SOAK_MINUTES"));
        let seed = std::env::var("CONLOG_SOAK_SEED").ok().map_or_else(
            || {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            },
            |s| s.parse().expect("CONLOG_SOAK_SEED"),
        );
        Self {
            kills: counts.0,
            upgrades: counts.1,
            takeovers: counts.2,
            deadline: Duration::from_secs(minutes * 60),
            seed,
        }
    }

    /// The events in a seeded random order, the keeper's death in the middle.
    fn schedule(&self, random: &mut Lcg) -> Vec<Event> {
        let mut events: Vec<Event> = std::iter::repeat_n(Event::Kill, self.kills)
            .chain(std::iter::repeat_n(Event::Upgrade, self.upgrades))
            .chain(std::iter::repeat_n(Event::Takeover, self.takeovers))
            .collect();
        for i in (1..events.len()).rev() {
            events.swap(i, random.next(i as u64 + 1) as usize);
        }
        events.insert(events.len() / 2, Event::KeeperKill);
        events
    }
}

/// The process serving now: the harness's own child (first start, and every restart after a
/// kill) or the last successor that took over.
enum Current {
    Harness,
    Successor(Successor),
}

struct Serving {
    current: Current,
    /// "conlogd ready" lines its diagnostics hold (one more after each in-place upgrade).
    ready: usize,
}

impl Serving {
    fn pid(&self, daemon: &Daemon) -> u32 {
        match &self.current {
            Current::Harness => daemon.pid(),
            Current::Successor(s) => s.pid(),
        }
    }

    fn stderr(&self, daemon: &Daemon) -> String {
        match &self.current {
            Current::Harness => daemon.stderr(),
            Current::Successor(s) => s.stderr(),
        }
    }

    fn signal(&self, daemon: &Daemon, signal: rustix::process::Signal) {
        match &self.current {
            Current::Harness => daemon.signal(signal),
            Current::Successor(s) => s.signal(signal),
        }
    }

    /// SIGKILL, then a new daemon on the same directories (it adopts what the keeper holds).
    async fn kill_and_restart(&mut self, daemon: &mut Daemon) {
        match &mut self.current {
            Current::Harness => daemon.kill().await,
            Current::Successor(s) => {
                s.signal(rustix::process::Signal::KILL);
                let status = s.wait_exit().await;
                assert!(
                    status.code().is_none(),
                    "killed daemon exited with {status}"
                );
            }
        }
        daemon.restart().await;
        self.current = Current::Harness;
        self.ready = 1;
    }

    /// SIGUSR1: the same process re-executes itself and serves again.
    async fn upgrade(&mut self, daemon: &Daemon) {
        let pid = self.pid(daemon);
        self.signal(daemon, rustix::process::Signal::USR1);
        self.ready += 1;
        let ready = wait_ready_count("upgrade", self.ready, || self.stderr(daemon)).await;
        assert_eq!(field::<u32>(&ready, "pid="), Some(pid), "{ready}");
    }

    /// A `--takeover` successor on the same ports; the old process exits 0 once it confirmed.
    async fn take_over(&mut self, daemon: &mut Daemon) {
        let (tcp, metrics) = (daemon.tcp, daemon.metrics);
        let old_pid = self.pid(daemon);
        let mut successor = Successor::spawn(daemon, tcp, metrics);
        successor.wait_ready().await;
        assert_ne!(successor.pid(), old_pid);
        let (status, old_stderr) = match &mut self.current {
            Current::Harness => (daemon.wait_exit().await, daemon.stderr()),
            Current::Successor(old) => (old.wait_exit().await, old.stderr()),
        };
        assert_eq!(
            status.code(),
            Some(0),
            "the old daemon exits 0 after a takeover:\n{old_stderr}"
        );
        successor.assert_took_over();
        self.current = Current::Successor(successor);
        self.ready = 1;
    }

    /// SIGTERM: a clean stop.
    async fn stop(self, daemon: &mut Daemon) {
        let status = match self.current {
            Current::Harness => daemon.stop().await,
            Current::Successor(mut s) => s.stop().await,
        };
        assert_eq!(status.code(), Some(0), "a clean stop exits 0");
    }
}

/// Kills a keeper left behind by a failed run (the test started it, through its daemon).
struct KeeperGuard(PathBuf);

impl Drop for KeeperGuard {
    fn drop(&mut self) {
        if let Some(pid) = keeper_pid(&self.0).filter(|pid| alive(*pid)) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if contains(&cmdline, b"keeper") {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid as i32).unwrap(),
                    rustix::process::Signal::KILL,
                );
            }
        }
    }
}

/// Waits (bounded) until a live keeper other than `old` serves `runtime_dir`.
async fn wait_new_keeper(runtime_dir: &Path, old: u32) -> u32 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(pid) = keeper_pid(runtime_dir) {
            if pid != old && alive(pid) {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new keeper after {DEADLINE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Every stream's `(offset, dropped_bytes)` in a `ListGuests` reply (`None`: not listed).
fn figures(reply: &proto::ListGuestsResponse) -> Vec<Option<(u64, u64)>> {
    STREAMS
        .iter()
        .map(|s| find(reply, s.guest, s.stream()).map(|i| (i.offset, i.dropped_bytes)))
        .collect()
}

/// Polls `ListGuests` all along (whichever daemon answers) and notes every time a stream's
/// offset or `dropped_bytes` went back.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(usize, Vec<String>)>,
}

impl Sampler {
    fn start(socket: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut last: Vec<Option<(u64, u64)>> = vec![None; STREAMS.len()];
                let (mut samples, mut back) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let reply = async {
                        let channel = conlog::client::connect_local(&socket).await.ok()?;
                        let mut agent = proto::agent_client::AgentClient::new(channel);
                        let call = agent.list_guests(proto::ListGuestsRequest::default());
                        tokio::time::timeout(DEADLINE, call).await.ok()?.ok()
                    }
                    .await;
                    if let Some(reply) = reply {
                        samples += 1;
                        for (i, now) in figures(&reply.into_inner()).into_iter().enumerate() {
                            if let (Some(was), Some(now)) = (last[i], now) {
                                if now.0 < was.0 || now.1 < was.1 {
                                    back.push(format!(
                                        "{}: (offset, dropped) {was:?} then {now:?}",
                                        STREAMS[i].guest
                                    ));
                                }
                            }
                            last[i] = now.or(last[i]);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                (samples, back)
            }
        });
        Self { stop, task }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        bounded("the ListGuests sampler", self.task)
            .await
            .expect("sampler task")
    }
}

/// What a [`Follower`] read: runs of bytes at their offsets (a new run after each gap) and the
/// gaps history reported.
#[derive(Default)]
struct Followed {
    runs: Vec<(u64, Vec<u8>)>,
    gaps: Vec<(u64, u64)>,
    /// ReadHistory calls that started.
    calls: u32,
    /// How calls ended (code), for the report.
    ends: Vec<String>,
}

impl Followed {
    fn end(&self) -> u64 {
        self.runs
            .last()
            .map_or(0, |(at, bytes)| at + bytes.len() as u64)
            .max(self.gaps.last().map_or(0, |g| g.1))
    }
}

/// A `ReadHistory` follower of a stream from offset 0, resuming with `from_offset` after every
/// end of its call. Every chunk must start where the previous one ended (offsets never go back
/// and nothing is given twice), every gap too.
struct Follower {
    target: watch::Sender<Option<u64>>,
    task: JoinHandle<Followed>,
}

impl Follower {
    fn start(socket: PathBuf, guest: &'static str, stream: &'static str) -> Self {
        let (target, mut target_rx) = watch::channel(None::<u64>);
        let task = tokio::spawn(async move {
            let mut got = Followed::default();
            let mut position = 0u64;
            let mut failing_since: Option<Instant> = None;
            let reached = |rx: &watch::Receiver<Option<u64>>, at: u64| {
                rx.borrow().is_some_and(|end| at >= end)
            };
            loop {
                if reached(&target_rx, position) {
                    return got;
                }
                if let Some(since) = failing_since {
                    assert!(
                        since.elapsed() < DEADLINE,
                        "follower of {guest}: no ReadHistory call for {DEADLINE:?}"
                    );
                }
                let request = proto::ReadHistoryRequest {
                    guest: guest.into(),
                    stream: stream.into(),
                    start: Some(Start::FromOffset(position)),
                    follow: true,
                    ..Default::default()
                };
                let call = async {
                    let channel = conlog::client::connect_local(&socket).await.ok()?;
                    let mut client = ConsoleClient::new(channel);
                    let call = client.read_history(request);
                    tokio::time::timeout(DEADLINE, call).await.ok()?.ok()
                };
                let Some(reply) = call.await else {
                    failing_since.get_or_insert_with(Instant::now);
                    tokio::time::sleep(POLL).await;
                    continue;
                };
                failing_since = None;
                got.calls += 1;
                let mut chunks = reply.into_inner();
                loop {
                    if reached(&target_rx, position) {
                        return got;
                    }
                    let chunk = tokio::select! {
                        chunk = tokio::time::timeout(DEADLINE, chunks.message()) => chunk,
                        _ = target_rx.changed() => continue,
                    };
                    match chunk {
                        Err(_) => {
                            panic!("follower of {guest}: nothing for {DEADLINE:?} at {position}")
                        }
                        Ok(Ok(Some(chunk))) => {
                            if let Some(gap) = chunk.gap {
                                assert_eq!(
                                    gap.from_offset, position,
                                    "follower of {guest}: gap out of place"
                                );
                                assert!(gap.to_offset > position, "{guest}: empty gap {gap:?}");
                                got.gaps.push((gap.from_offset, gap.to_offset));
                                position = gap.to_offset;
                                continue;
                            }
                            assert_eq!(
                                chunk.offset, position,
                                "follower of {guest}: chunk out of place (offsets went back or skipped)"
                            );
                            position += chunk.data.len() as u64;
                            match got.runs.last_mut() {
                                Some((at, run)) if *at + run.len() as u64 == chunk.offset => {
                                    run.extend_from_slice(&chunk.data)
                                }
                                _ => got.runs.push((chunk.offset, chunk.data.to_vec())),
                            }
                        }
                        Ok(Ok(None)) => {
                            got.ends.push("end of stream".into());
                            break;
                        }
                        Ok(Err(status)) => {
                            got.ends.push(format!("{:?}", status.code()));
                            break;
                        }
                    }
                }
            }
        });
        Self { target, task }
    }

    /// Reads (bounded) up to offset `end`, and returns what was read.
    async fn finish(self, end: u64) -> Followed {
        self.target.send_replace(Some(end));
        bounded("a follower", self.task)
            .await
            .expect("follower task panicked")
    }
}

/// A range of written bytes that never reached the log, placed between offsets `lo..=hi` of
/// the stream (a range when it lies in a gap of what the follower read, or when the bytes
/// around the cut could belong to either side of it).
#[derive(Debug)]
struct Loss {
    lo: u64,
    hi: u64,
    len: usize,
}

/// Where `key` occurs in `want` at or after `from`.
fn find_from(want: &[u8], from: usize, key: &[u8]) -> Option<usize> {
    want[from..]
        .windows(key.len())
        .position(|w| w == key)
        .map(|p| from + p)
}

/// Checks that what was read (`followed`) is `want` in order, each byte at most once, with
/// only whole ranges missing, and returns those ranges. A gap of history stands for exactly its
/// length of written bytes: more missing there is a loss too.
fn losses(what: &str, followed: &Followed, want: &[u8]) -> Vec<Loss> {
    const KEY: usize = 96;
    let mut out = Vec::new();
    let mut at_want = 0usize;
    let mut prev_end = 0u64;
    for (offset, bytes) in &followed.runs {
        let gap = offset - prev_end;
        if gap > 0 {
            let key = &bytes[..KEY.min(bytes.len())];
            let resumed = find_from(want, at_want, key).unwrap_or_else(|| {
                panic!(
                    "{what}: bytes at offset {offset} (after a gap of {gap}) were never written after byte {at_want}: {:?}",
                    String::from_utf8_lossy(key)
                )
            });
            let skipped = (resumed - at_want) as u64;
            assert!(
                skipped >= gap,
                "{what}: a gap of {gap} offsets ({prev_end}..{offset}) stands for only {skipped} written bytes: offsets were handed out twice"
            );
            if skipped > gap {
                out.push(Loss {
                    lo: prev_end,
                    hi: *offset,
                    len: (skipped - gap) as usize,
                });
            }
            at_want = resumed;
        }
        let mut i = 0;
        loop {
            let same = bytes[i..]
                .iter()
                .zip(&want[at_want..])
                .take_while(|(a, b)| a == b)
                .count();
            i += same;
            at_want += same;
            if i == bytes.len() {
                break;
            }
            let key = &bytes[i..(i + KEY).min(bytes.len())];
            let resumed = find_from(want, at_want, key).unwrap_or_else(|| {
                panic!(
                    "{what}: bytes at offset {} were never written after byte {at_want} (duplicated or out of order): {:?}",
                    *offset + i as u64,
                    String::from_utf8_lossy(key)
                )
            });
            // Lines differ only in their numbers: the bytes just before the mismatch may
            // belong to either side of the cut. The cut lies within those `ambiguous` bytes.
            let ambiguous = bytes[..i]
                .iter()
                .rev()
                .zip(want[..resumed].iter().rev())
                .take_while(|(a, b)| a == b)
                .count()
                .min(i);
            let at = *offset + i as u64;
            out.push(Loss {
                lo: at - ambiguous as u64,
                hi: at,
                len: resumed - at_want,
            });
            at_want = resumed;
        }
        prev_end = offset + bytes.len() as u64;
    }
    // A gap at the very end (a truncation the follower did not see the bytes of).
    let gap = followed.end() - prev_end;
    let left = (want.len() - at_want) as u64;
    assert!(
        left >= gap,
        "{what}: a final gap of {gap} offsets stands for only {left} written bytes"
    );
    if left > gap {
        if gap == 0 {
            panic!("{what}: the last {left} written bytes never reached the log");
        }
        out.push(Loss {
            lo: prev_end,
            hi: followed.end(),
            len: (left - gap) as usize,
        });
    }
    out
}

/// What history holds now of `guest/stream` from `from` to its end (no follow): `(offset,
/// bytes)` chunks; gaps are skipped.
async fn history_now(socket: &Path, guest: &str, stream: &str, from: u64) -> Vec<(u64, Vec<u8>)> {
    let channel = bounded("connect", conlog::client::connect_local(socket))
        .await
        .expect("connect to the local socket");
    let request = proto::ReadHistoryRequest {
        guest: guest.into(),
        stream: stream.into(),
        start: Some(Start::FromOffset(from)),
        ..Default::default()
    };
    let mut chunks = bounded(
        "ReadHistory",
        ConsoleClient::new(channel).read_history(request),
    )
    .await
    .unwrap_or_else(|s| panic!("ReadHistory {guest}: {s:?}"))
    .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = bounded("a history chunk", chunks.message())
        .await
        .unwrap_or_else(|s| panic!("ReadHistory {guest}: {s:?}"))
    {
        if chunk.gap.is_none() {
            out.push((chunk.offset, chunk.data.to_vec()));
        }
    }
    out
}

/// Checks that what history holds now at each offset is what the follower read there earlier:
/// no offset was given to two different bytes.
fn assert_same_offsets(what: &str, followed: &Followed, now: &[(u64, Vec<u8>)]) {
    for (offset, bytes) in now {
        let end = offset + bytes.len() as u64;
        let run = followed
            .runs
            .iter()
            .find(|(at, run)| at <= offset && end <= at + run.len() as u64)
            .unwrap_or_else(|| {
                panic!("{what}: history holds {offset}..{end}, which the follower never read")
            });
        let from = (offset - run.0) as usize;
        assert_same(
            &format!("{what}: history at {offset} against the follower"),
            bytes,
            &run.1[from..from + bytes.len()],
        );
    }
}

/// Per event kind: events done, bytes lost, losses.
#[derive(Default, Clone, Copy)]
struct Tally {
    events: usize,
    lost: usize,
    cuts: usize,
    max_cut: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_of_kills_upgrades_and_takeovers_loses_only_what_was_in_flight() {
    let _heavy = heavy().await; // one heavy test at a time: support::heavy
    let size = Size::from_env();
    let mut random = Lcg(size.seed);
    let schedule = size.schedule(&mut random);
    println!(
        "seed {} (CONLOG_SOAK_SEED={} replays the schedule): {} kills, {} upgrades, {} takeovers, 1 keeper kill",
        size.seed, size.seed, size.kills, size.upgrades, size.takeovers
    );
    let started = Instant::now();
    let mut daemon = Daemon::start().await;
    let _keeper_guard = KeeperGuard(daemon.runtime_dir().to_owned());
    let socket = daemon.socket();
    let mut serving = Serving {
        current: Current::Harness,
        ready: 1,
    };

    let stop = Arc::new(AtomicBool::new(false));
    // Writers that saw an error (EPIPE: the pipe or the console connection was closed).
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    let mut guests = Vec::new();
    let mut followers = Vec::new();
    let mut agent = daemon.agent().await;
    for spec in &STREAMS {
        let sink: Box<dyn Write + Send> = match spec.kind {
            Kind::Pipe => {
                let (_, pipe): (_, File) =
                    open_pipe(&mut agent, spec.guest, "qemu", Some(spec.limits())).await;
                Box::new(pipe)
            }
            Kind::Console => {
                let console = create_console(&mut agent, spec.guest, "", Some(spec.limits()))
                    .await
                    .expect("CreateConsole");
                let guest = UnixStream::connect(&console.guest_socket).expect("connect the guest");
                wait_guest_connected(&mut agent, spec.guest, DEVICE, true).await;
                let writer = guest.try_clone().unwrap();
                guests.push((spec.guest, guest));
                Box::new(writer)
            }
        };
        followers.push(Follower::start(socket.clone(), spec.guest, spec.stream()));
        let (stop, who, failed) = (stop.clone(), spec.guest.to_owned(), failed.clone());
        writers.push(std::thread::spawn(move || {
            let outcome = write_lines_paced(who, sink, stop, PAUSE);
            if let Some(error) = &outcome.error {
                failed.lock().unwrap().push(format!(
                    "{}: write failed after {} lines: {error}",
                    outcome.who, outcome.lines
                ));
            }
            outcome
        }));
    }
    drop(agent);
    let viewer = upgrade_common::Reader::start(
        &socket,
        upgrade_common::Source::Console {
            guest: STREAMS[VIEWED].guest.into(),
        },
    );
    let sampler = Sampler::start(socket.clone());

    // Every stream logs, and a console's guest is connected, before an event and after it.
    let logging = |before: Vec<u64>| {
        let failed = failed.clone();
        move |reply: &proto::ListGuestsResponse| {
            let failed = failed.lock().unwrap();
            assert!(failed.is_empty(), "a writer failed: {failed:?}");
            STREAMS.iter().zip(&before).all(|(spec, before)| {
                find(reply, spec.guest, spec.stream()).is_some_and(|s| {
                    s.offset > *before
                        && !s.broken
                        && match spec.kind {
                            Kind::Pipe => s.open && s.writers == 1,
                            Kind::Console => s.guest_connected,
                        }
                })
            })
        }
    };
    let offsets = |reply: &proto::ListGuestsResponse| -> Vec<u64> {
        figures(reply)
            .into_iter()
            .map(|f| f.expect("every stream listed").0)
            .collect()
    };
    let mut last = offsets(
        &wait_list(
            &socket,
            "every stream logging",
            logging(vec![0; STREAMS.len()]),
        )
        .await,
    );

    let mut done: Vec<Done> = Vec::new();
    for (n, &event) in schedule.iter().enumerate() {
        if started.elapsed() > size.deadline {
            println!(
                "deadline of {:?} reached after {n} of {} events",
                size.deadline,
                schedule.len()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20 + random.next(300))).await;
        let before = offsets(&list_guests(&socket).await);
        for (i, (was, now)) in last.iter().zip(&before).enumerate() {
            assert!(
                now >= was,
                "{}: offset went back {was} -> {now}",
                STREAMS[i].guest
            );
        }
        match event {
            Event::Kill => serving.kill_and_restart(&mut daemon).await,
            Event::Upgrade => serving.upgrade(&daemon).await,
            Event::Takeover => serving.take_over(&mut daemon).await,
            Event::KeeperKill => {
                // The keeper dies while the daemon lives: the daemon starts a new one and
                // registers everything again.
                let keeper = keeper_pid(daemon.runtime_dir()).expect("keeper pid");
                rustix::process::kill_process(
                    rustix::process::Pid::from_raw(keeper as i32).unwrap(),
                    rustix::process::Signal::KILL,
                )
                .unwrap();
                wait_new_keeper(daemon.runtime_dir(), keeper).await;
                // CreateLogPipe answers once the keeper holds the new pipe: everything
                // registered before it is held too.
                let mut agent = upgrade_common::agent(&socket).await;
                let (reply, pipe) = open_pipe(&mut agent, "vm-probe", "qemu", None).await;
                write_and_close(pipe, b"probe\n".to_vec()).await;
                wait_closed(&mut agent, "vm-probe", "qemu", reply.offset + 6).await;
            }
        }
        let what = format!("every stream logging after event {n} ({event:?})");
        let after = offsets(&wait_list(&socket, &what, logging(before.clone())).await);
        last = after.clone();
        done.push(Done {
            event,
            before,
            after,
        });
    }
    let elapsed_events = started.elapsed();

    // Stop writing: pipes close, console guests stay connected and say a last line.
    stop.store(true, Ordering::Relaxed);
    let mut outcomes: Vec<Outcome> = Vec::new();
    for writer in writers {
        outcomes.push(
            tokio::task::spawn_blocking(move || writer.join().unwrap())
                .await
                .unwrap(),
        );
    }
    for outcome in &outcomes {
        assert!(
            outcome.error.is_none(),
            "{}: the writer saw {:?} after {} lines; daemon:\n{}",
            outcome.who,
            outcome.error,
            outcome.lines,
            serving.stderr(&daemon)
        );
    }
    for (guest, connection) in &mut guests {
        connection
            .write_all(MARKER)
            .unwrap_or_else(|e| panic!("{guest}: the console connection was closed: {e}"));
        // Never closed by the daemon: nothing to read, no end of file.
        connection.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        match connection.read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{guest}: the daemon's end of the console connection: {other:?}"),
        }
    }
    let log_dir = daemon.log_dir();
    // The snapshot a condition was judged on may predate the file read beside it (the marker
    // may be in the file but not in that snapshot): judge, then take a fresh snapshot, which
    // the actors answer after every write the file already shows.
    wait_list(&socket, "every pipe closed, every marker logged", |reply| {
        STREAMS.iter().all(|spec| {
            find(reply, spec.guest, spec.stream()).is_some_and(|s| match spec.kind {
                Kind::Pipe => !s.open,
                Kind::Console => {
                    s.guest_connected && read_log(&log_dir, spec.guest, DEVICE).ends_with(MARKER)
                }
            })
        })
    })
    .await;
    let finished = list_guests(&socket).await;
    let (samples, went_back) = sampler.finish().await;
    assert!(
        went_back.is_empty(),
        "ListGuests offsets went back: {went_back:?}"
    );

    // Every byte, stream by stream.
    let mut tallies = [Tally::default(); 4];
    let kind_index = |e: Event| match e {
        Event::Kill => 0,
        Event::Upgrade => 1,
        Event::Takeover => 2,
        Event::KeeperKill => 3,
    };
    for d in &done {
        tallies[kind_index(d.event)].events += 1;
    }
    let (mut total_written, mut total_lost) = (0usize, 0usize);
    let mut report = Vec::new();
    let mut viewed_history = Vec::new();
    for (i, (spec, follower)) in STREAMS.iter().zip(followers).enumerate() {
        let info = find(&finished, spec.guest, spec.stream()).unwrap().clone();
        assert!(!info.broken, "{}: {info:?}", spec.guest);
        let followed = follower.finish(info.offset).await;
        assert_eq!(
            followed.end(),
            info.offset,
            "{}: the follower ends where ListGuests says",
            spec.guest
        );
        let now = history_now(&socket, spec.guest, spec.stream(), info.first_offset).await;
        assert_eq!(
            now.last().map(|(at, b)| at + b.len() as u64),
            Some(info.offset),
            "{}: history ends where ListGuests says",
            spec.guest
        );
        assert_same_offsets(spec.guest, &followed, &now);
        let mut want = written(&outcomes[i].who, outcomes[i].lines);
        if spec.kind == Kind::Console {
            want.extend_from_slice(MARKER);
        }
        let losses = losses(spec.guest, &followed, &want);
        let gap_bytes: u64 = followed.gaps.iter().map(|(a, b)| b - a).sum();
        if spec.mode == LogMode::Truncate {
            // Gaps here are what a truncation removed before the follower came back.
            assert_eq!(info.dropped_bytes, 0, "{}: {info:?}", spec.guest);
        } else {
            assert_eq!(
                gap_bytes, info.dropped_bytes,
                "{}: history gaps {:?} against dropped_bytes (a rotating stream keeps enough that its follower never falls behind)",
                spec.guest, followed.gaps
            );
        }
        let mut per_event = vec![0usize; done.len()];
        for loss in &losses {
            let at = done
                .iter()
                .position(|d| d.before[i] <= loss.hi && loss.lo <= d.after[i]);
            let Some(at) = at.filter(|&at| done[at].event == Event::Kill) else {
                panic!(
                    "{}: {loss:?} lost, not at a kill but at {:?}; events: {:?}",
                    spec.guest,
                    at.map(|at| done[at].event),
                    done.iter()
                        .map(|d| (d.event, d.before[i], d.after[i]))
                        .collect::<Vec<_>>()
                );
            };
            per_event[at] += 1;
            assert!(
                per_event[at] == 1 && loss.len <= spec.read_size(),
                "{}: more than one read lost at kill {at}: {losses:?}",
                spec.guest
            );
            let tally = &mut tallies[kind_index(done[at].event)];
            tally.lost += loss.len;
            tally.cuts += 1;
            tally.max_cut = tally.max_cut.max(loss.len);
        }
        let lost: usize = losses.iter().map(|l| l.len).sum();
        total_written += want.len();
        total_lost += lost;
        report.push(format!(
            "{:>8} ({:?}, {:?} {} KiB x {}): {} bytes written, {} ReadHistory calls, {} gap bytes, lost (bytes at offset, where in its file) {:?}",
            spec.guest,
            spec.kind,
            spec.mode,
            spec.max_size >> 10,
            spec.max_backups + 1,
            want.len(),
            followed.calls,
            gap_bytes,
            losses
                .iter()
                .map(|l| format!("{} at {} (+{})", l.len, l.lo, l.lo % spec.max_size))
                .collect::<Vec<_>>()
        ));
        if i == VIEWED {
            assert!(
                followed.gaps.is_empty(),
                "{}: {:?}",
                spec.guest,
                followed.gaps
            );
            viewed_history = followed.runs.into_iter().flat_map(|(_, r)| r).collect();
        }
    }
    // The live viewer saw exactly what history holds, and its guest was connected at every
    // attachment.
    let (seen, progress) = viewer.finish(viewed_history.len() as u64).await;
    assert_same("live viewer vs history", &seen, &viewed_history);
    assert!(
        progress.guest_connected.iter().all(|c| *c),
        "the viewer saw the guest gone: {progress:?}"
    );

    // Strictly capped: no file over max_size, no more files than max_backups + 1.
    for spec in &STREAMS {
        let sizes = log_sizes(&log_dir, spec.guest, spec.stream());
        assert!(
            sizes.len() <= spec.max_backups as usize + 1
                && sizes.iter().all(|(_, size)| *size <= spec.max_size),
            "{}: files over the caps: {sizes:?}",
            spec.guest
        );
    }
    serving.stop(&mut daemon).await;
    let keeper = keeper_pid(daemon.runtime_dir());
    let deadline = Instant::now() + DEADLINE;
    while keeper.is_some_and(alive) {
        assert!(
            Instant::now() < deadline,
            "the keeper outlived a clean stop"
        );
        tokio::time::sleep(POLL).await;
    }

    let names = ["kill -9", "upgrade", "takeover", "keeper kill"];
    println!(
        "soak: {} events in {elapsed_events:.0?}, {samples} ListGuests samples, {} attachments of the live viewer; {total_written} bytes written, {total_lost} lost",
        done.len(),
        progress.attaches
    );
    for (name, t) in names.iter().zip(tallies) {
        println!(
            "  {name}: {} events, {} bytes lost in {} cuts (largest {})",
            t.events, t.lost, t.cuts, t.max_cut
        );
    }
    println!("{}", report.join("\n"));
}
