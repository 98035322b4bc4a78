//! Hostile clients of `handover.sock` against the real `conlogd`: garbage, wrong hellos, huge
//! lines, a hello followed by more or by nothing, slow and silent clients, and a "successor"
//! that leaves in the middle of the hand-over. None of them stops the daemon or leaves it
//! half handed over: it keeps logging and serving, and a real `conlogd --takeover` afterwards
//! (or meanwhile) still takes over with every stream and pending hand-off.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;
use crate::upgrade_common;

use conlog::proto::{self, attach::Mode};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::*;
use tonic::Code;
use upgrade_common::*;

const PIPE: &str = "vm-pipe";
const CONSOLE: &str = "vm-console";
const PENDING: &str = "vm-pending";
/// How long the daemon waits for a hello (`TIMEOUT` in src/upgrade/handover.rs).
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
const HELLO: &[u8] = b"CONLOG-TAKEOVER 1\n";

/// A daemon with a claimed log pipe, a console whose fake guest is connected and watched by
/// an AttachConsole client, and a pending (unclaimed) hand-off.
struct Scene {
    daemon: Daemon,
    pipe: File,
    written: Vec<u8>,
    guest: FakeGuest,
    printed: Vec<u8>,
    session: Session,
    pending: proto::CreateLogPipeResponse,
}

impl Scene {
    async fn start() -> Self {
        let daemon = Daemon::start().await;
        let mut agent = daemon.agent().await;
        let (_, pipe) = open_pipe(&mut agent, PIPE, "qemu", None).await;
        let console = open_console(&mut agent, CONSOLE).await;
        let guest = FakeGuest::connect(&console.guest_socket).await;
        wait_guest_connected(&mut agent, CONSOLE, DEVICE, true).await;
        let session = Session::attach(
            local_channel(&daemon).await,
            attach(CONSOLE, Mode::ReadOnly),
        )
        .await
        .expect("attach to the console");
        let pending = create_pipe(&mut agent, PENDING, "", None).await.unwrap();
        let mut scene = Self {
            daemon,
            pipe,
            written: Vec::new(),
            guest,
            printed: Vec::new(),
            session,
            pending,
        };
        scene.log(b"before\n").await;
        scene
    }

    fn handover_socket(&self) -> PathBuf {
        self.daemon.runtime_dir().join("handover.sock")
    }

    /// Writes `line` into the pipe and as guest output; waits until both are logged and
    /// checks both logs whole.
    async fn log(&mut self, line: &[u8]) {
        self.pipe.write_all(line).expect("write into the log pipe");
        self.written.extend_from_slice(line);
        self.guest.write(line).await;
        self.printed.extend_from_slice(line);
        let (written, printed) = (self.written.len() as u64, self.printed.len() as u64);
        wait_list(&self.daemon.socket(), "both lines logged", |r| {
            find(r, PIPE, "qemu").is_some_and(|s| s.open && s.writers == 1 && s.offset == written)
                && find(r, CONSOLE, DEVICE)
                    .is_some_and(|s| s.guest_connected && s.offset == printed)
        })
        .await;
        let log_dir = self.daemon.log_dir();
        assert_same("pipe log", &read_log(&log_dir, PIPE, "qemu"), &self.written);
        assert_same(
            "console log",
            &read_log(&log_dir, CONSOLE, DEVICE),
            &self.printed,
        );
    }

    /// Nothing was frozen: no takeover began, the console client was never ended and sees
    /// new output, and both streams log on.
    async fn assert_untouched(&mut self) {
        self.daemon.assert_running();
        let stderr = self.daemon.stderr();
        assert!(
            !stderr.contains("a successor is taking over"),
            "garbage started a takeover:\n{stderr}"
        );
        self.log(b"after the garbage\n").await;
        self.session.wait_output(b"after the garbage\n").await;
        assert!(self.session.ended.is_none(), "{:?}", self.session.ended);
    }

    /// A real `conlogd --takeover`: returns it and how long it took to be ready. The old
    /// daemon exits 0; the successor has every stream and the pending hand-off.
    async fn take_over(&mut self) -> (Successor, Duration) {
        let begun = Instant::now();
        let mut successor = Successor::spawn(&self.daemon, self.daemon.tcp, self.daemon.metrics);
        successor.wait_ready().await;
        let took = begun.elapsed();
        let status = self.daemon.wait_exit().await;
        assert_eq!(status.code(), Some(0), "{}", self.daemon.stderr());
        successor.assert_took_over();
        self.log(b"after the takeover\n").await;
        let pipe = claim(&self.pending)
            .await
            .expect("the pending hand-off came along");
        write_and_close(File::from(pipe), b"pending\n".to_vec()).await;
        wait_list(&self.daemon.socket(), "the pending pipe logged", |r| {
            find(r, PENDING, "qemu").is_some_and(|s| !s.open && s.offset == 8)
        })
        .await;
        (successor, took)
    }
}

/// Every kind of bad request: what it is, its bytes, whether the client half-closes after.
fn handover_garbage() -> Vec<(&'static str, Vec<u8>, bool)> {
    let hello_and = |more: &[u8]| [HELLO, more].concat();
    vec![
        ("nothing, then close", b"".to_vec(), true),
        ("a wrong line", b"hello\n".to_vec(), false),
        ("a future version", b"CONLOG-TAKEOVER 2\n".to_vec(), false),
        ("lower case", b"conlog-takeover 1\n".to_vec(), false),
        ("NUL bytes", vec![0; 64], false),
        ("invalid UTF-8", b"\xc3\x28\xff\xfe\n".to_vec(), false),
        (
            "escape sequences",
            b"\x1b]0;title\x07\x1b[2J\x1bc".to_vec(),
            false,
        ),
        ("a 10 MiB line", vec![b'C'; 10 << 20], false),
        ("half the hello, then close", b"CONLOG-TAKE".to_vec(), true),
        (
            "the hello without its newline, then close",
            HELLO[..17].to_vec(),
            true,
        ),
        ("the hello, then close", HELLO.to_vec(), true),
        ("the hello and an early OK", hello_and(b"OK\n"), false),
        ("the hello and garbage", hello_and(b"\0\xff garbage"), false),
    ]
}

/// Each bad request is dropped at once (no answer, nothing frozen, logged once), and the
/// daemon serves on; then a real successor takes over with everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_freezes_nothing_and_a_real_takeover_follows() {
    let mut scene = Scene::start().await;
    let path = scene.handover_socket();
    let cases = handover_garbage();
    for (what, bytes, half_close) in handover_garbage() {
        let path = path.clone();
        let answer = tokio::task::spawn_blocking(move || raw_exchange(&path, &bytes, half_close))
            .await
            .unwrap();
        assert!(answer.is_empty(), "{what}: the daemon answered {answer:?}");
    }
    let ignored = |text: &str| text.matches("ignoring a bad takeover request").count();
    let deadline = Instant::now() + DEADLINE;
    while ignored(&scene.daemon.stderr()) < cases.len() && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(
        ignored(&scene.daemon.stderr()),
        cases.len(),
        "each bad request is refused once:\n{}",
        scene.daemon.stderr()
    );
    scene.assert_untouched().await;

    let (mut successor, _) = scene.take_over().await;
    assert!(successor.stop().await.success(), "{}", successor.stderr());
}

/// Silent clients, clients stalled in the middle of the hello and clients trickling it a
/// byte a second hold `handover.sock`: a real successor still takes over, well within half
/// the hello timeout, and the slow clients are dropped without a byte of the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_delay_a_takeover() {
    let mut scene = Scene::start().await;
    let slow = SlowClients::start(
        &scene.handover_socket(),
        10,
        b"CONLOG-",
        &HELLO[..17],
        Duration::from_secs(1),
    );
    slow.assert_all_waiting();
    let (mut successor, took) = scene.take_over().await;
    assert!(
        took < HELLO_TIMEOUT / 2,
        "the takeover took {took:?} beside {} slow clients",
        slow.len()
    );
    let answers = tokio::task::spawn_blocking(move || slow.answers())
        .await
        .unwrap();
    for (what, answer) in answers {
        assert!(answer.is_empty(), "a {what} client received {answer:?}");
    }
    assert!(successor.stop().await.success(), "{}", successor.stderr());
    eprintln!("takeover beside 30 slow clients ready after {took:.1?}");
}

/// SIGTERM is handled at once while silent and stalled clients hold `handover.sock` (their
/// hellos are read off the daemon's own loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_delay_a_shutdown() {
    let mut daemon = Daemon::start().await;
    let slow = SlowClients::start(
        &daemon.runtime_dir().join("handover.sock"),
        5,
        b"CONLOG-",
        &HELLO[..17],
        Duration::from_secs(1),
    );
    // A round trip to the daemon, so its accept loop has had time to take the connections.
    assert_still_serves(&daemon, "vm-before-stop").await;
    slow.assert_all_waiting();
    let begun = Instant::now();
    let status = daemon.stop().await;
    let took = begun.elapsed();
    assert!(status.success(), "{status}\n{}", daemon.stderr());
    assert!(
        took < HELLO_TIMEOUT / 2,
        "SIGTERM took {took:?} to act beside slow handover.sock clients"
    );
}

/// A "successor" that says the right hello, reads the start of the state and leaves: the
/// daemon thaws and serves on (console clients, told to come back by the freeze, come back
/// and the guest is still connected; the pending hand-off is still there), and a real
/// successor takes over afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_leaving_mid_handover_leaves_the_daemon_serving() {
    let mut scene = Scene::start().await;
    let path = scene.handover_socket();
    let header = tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(&path).expect("connect to handover.sock");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.write_all(HELLO).unwrap();
        let mut header = [0u8; 24];
        stream.read_exact(&mut header).expect("the snapshot header");
        header
    })
    .await
    .unwrap();
    assert_eq!(&header[..8], b"CONLOGSN", "the daemon began to hand over");

    wait_ready_count("serving again after the failed takeover", 2, || {
        scene.daemon.stderr()
    })
    .await;
    scene.daemon.assert_running();
    assert!(
        scene
            .daemon
            .stderr()
            .contains("takeover failed; serving on"),
        "{}",
        scene.daemon.stderr()
    );
    let status = scene.session.wait_end().await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    scene.session = Session::attach(
        local_channel(&scene.daemon).await,
        attach(CONSOLE, Mode::ReadOnly),
    )
    .await
    .expect("attach again after the thaw");
    assert!(scene.session.attached.guest_connected);
    scene.log(b"after the thaw\n").await;
    scene.session.wait_output(b"after the thaw\n").await;

    let (mut successor, _) = scene.take_over().await;
    assert!(successor.stop().await.success(), "{}", successor.stderr());
}

/// A flood of bad takeover requests (any local peer can send them at will) is logged at a
/// bounded rate (src/ratelimit.rs): at most a burst of lines per second, and a later line
/// says how many were left out (`suppressed=N`), so every request is accounted for; the daemon
/// serves on and a real successor still takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_requests_is_logged_at_a_bounded_rate() {
    const FLOOD: usize = 500;
    let mut scene = Scene::start().await;
    let path = scene.handover_socket();
    let send = |count: usize| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            for _ in 0..count {
                let answer = raw_exchange(&path, b"hello\n", false);
                assert!(answer.is_empty(), "the daemon answered {answer:?}");
            }
        })
    };
    send(FLOOD).await.unwrap();
    let mut sent = FLOOD;
    // (lines logged, requests they say were left out)
    let accounted = |text: &str| {
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("ignoring a bad takeover request"))
            .collect();
        let left_out: u64 = lines
            .iter()
            .map(|line| field::<u64>(line, "suppressed=").unwrap_or(0))
            .sum();
        (lines.len(), left_out as usize)
    };
    // What was left out is told by the next line logged: keep sending one bad request now
    // and then until every request is accounted for.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (lines, left_out) = accounted(&scene.daemon.stderr());
        if lines + left_out >= sent {
            assert_eq!(lines + left_out, sent, "{}", scene.daemon.stderr());
            assert!(
                left_out > 0 && lines < FLOOD / 2,
                "a flood of {FLOOD} bad requests made {lines} log lines ({left_out} left out)"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{lines} lines and {left_out} left out of {sent} bad requests:\n{}",
            scene.daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(1).await.unwrap();
        sent += 1;
    }
    scene.assert_untouched().await;
    let (mut successor, _) = scene.take_over().await;
    assert!(successor.stop().await.success(), "{}", successor.stderr());
}
