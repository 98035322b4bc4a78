//! `conlogctl` in a real terminal and across daemon restarts, against the real binaries.
//!
//! - tmux is the terminal: it answers queries (cursor position, device attributes, colour
//!   queries) on its input as any terminal emulator does. Replayed and historic output holding
//!   those queries must not make tmux type answers into the guest (or into a shell), while a
//!   query the guest prints live is answered.
//! - `history --follow` and `console` keep going across SIGUSR1 and a kill -9 plus restart,
//!   resuming by offset: every byte once, in order; input typed after the upgrade reaches the
//!   guest.

use crate::support;
use crate::upgrade_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the guest's shell printed before anyone attached: a prompt full of queries.
const QUERIES: &[u8] = b"login ok\r\n\x1b[6n\x1b[c\x1b[>c\x1b[=c\x1b[5n\x1b[?2004$p\
\x1bP$qm\x1b\\\x1b[>0q\x1b]10;?\x07\x1b]11;?\x1b\\\x1b[14t\x1b[18t\x1b[1;32mroot@vm\x1b[0m:~# \x1b[6n";

/// A tmux server of its own (its own socket), killed when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(dir: &Path, command: &str) -> Self {
        let tmux = Self {
            socket: dir.join("tmux.sock"),
        };
        let output = tmux.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "30",
            command,
        ]);
        assert!(output.status.success(), "tmux: {}", describe(&output));
        tmux
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(&self.socket).args(args);
        run_bounded(&mut cmd)
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p"]).stdout).into_owned()
    }

    async fn wait_screen(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let screen = self.screen();
            if screen.contains(needle) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tmux never showed {needle:?}; screen:\n{screen}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend_from_slice(keys);
        let output = self.run(&args);
        assert!(
            output.status.success(),
            "tmux send-keys: {}",
            describe(&output)
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

/// Waits (bounded) until the console's log holds `len` bytes.
async fn wait_logged(daemon: &Daemon, guest: &str, len: u64) {
    let mut agent = daemon.agent().await;
    wait_stream(&mut agent, guest, DEVICE, "all output logged", |s| {
        s.offset >= len
    })
    .await;
}

/// Whether `bytes` holds a cursor position report (`ESC [ row ; col R`).
fn has_cpr(bytes: &[u8]) -> bool {
    bytes.windows(2).enumerate().any(|(i, w)| {
        w == b"\x1b["
            && bytes[i + 2..]
                .iter()
                .position(|b| !(b.is_ascii_digit() || *b == b';'))
                .is_some_and(|end| end > 0 && bytes[i + 2 + end] == b'R')
    })
}

/// The replay at attach holds a dozen queries: tmux answers none of them into the guest, which
/// receives exactly the keys typed. A query the guest prints live is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_in_a_terminal_types_nothing_into_the_guest_but_live_queries_are_answered() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-tty").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    guest.write(QUERIES).await;
    wait_logged(&daemon, "vm-tty", QUERIES.len() as u64).await;

    let dir = tempfile::tempdir().unwrap();
    let command = format!(
        "{} --socket {} console vm-tty",
        conlogctl_bin(),
        daemon.socket().display()
    );
    let tmux = Tmux::start(dir.path(), &command);
    tmux.wait_screen("root@vm:~#").await;
    wait_clients(&mut agent, "vm-tty", DEVICE, 1).await;
    tmux.keys(&["-l", "typed"]);
    tmux.keys(&["Enter"]);
    guest.wait_for(b"typed\r").await;
    // Anything tmux answered would have been sent before the keys; take what else arrives.
    guest.read_some(Duration::from_millis(300)).await;
    assert_eq!(
        guest.received().escape_ascii().to_string(),
        "typed\\r",
        "the guest receives exactly what was typed"
    );

    // Live: the same query is answered, as on a serial line.
    guest.clear_received();
    guest.write(b"\x1b[6n").await;
    guest.wait_until("a cursor position report", has_cpr).await;
    drop(tmux);
}

/// The keys after Ctrl-] in a real terminal: `b` sends a serial BREAK (`Ctrl-A b` on a mux
/// console), also when it comes in a read of its own after a hint; Ctrl-A typed is escaped;
/// on a raw console `b` only shows why there is no break and the session goes on; any other key
/// after Ctrl-] leaves with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_bracket_b_sends_a_serial_break_where_the_console_carries_one() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let mux = agent
        .create_console(conlog::proto::CreateConsoleRequest {
            guest: "vm-brk".into(),
            protocol: conlog::proto::ConsoleProtocol::Mux as i32,
            ..Default::default()
        })
        .await
        .expect("CreateConsole mux")
        .into_inner();
    let raw = open_console(&mut agent, "vm-raw").await;
    let mut mux_guest = FakeGuest::connect(&mux.guest_socket).await;
    let mut raw_guest = FakeGuest::connect(&raw.guest_socket).await;
    let dir = tempfile::tempdir().unwrap();
    let command = format!(
        "{bin} --socket {socket} console vm-brk; echo MUX-EXIT-$?; \
         {bin} --socket {socket} console vm-raw; echo RAW-EXIT-$?; sleep 60",
        bin = conlogctl_bin(),
        socket = daemon.socket().display()
    );
    let tmux = Tmux::start(dir.path(), &command);
    tmux.wait_screen("Ctrl-] then b sends a serial BREAK").await;
    wait_clients(&mut agent, "vm-brk", DEVICE, 1).await;
    tmux.keys(&["-l", "ls"]);
    tmux.keys(&["C-a", "C-]", "b"]);
    tmux.keys(&["-l", "h"]);
    // Ctrl-] alone: a hint, then the b in a read of its own.
    tmux.keys(&["C-]"]);
    tmux.wait_screen("b: send a serial BREAK; any other key leaves")
        .await;
    tmux.keys(&["b"]);
    tmux.keys(&["-l", "s"]);
    let wire = b"ls\x01\x01\x01bh\x01bs";
    mux_guest.wait_len(wire.len()).await;
    mux_guest.read_some(Duration::from_millis(300)).await;
    assert_eq!(
        mux_guest.received().escape_ascii().to_string(),
        wire.escape_ascii().to_string()
    );
    tmux.keys(&["C-]", "q"]);
    tmux.wait_screen("MUX-EXIT-0").await;

    tmux.wait_screen("[conlog: attached to vm-raw/serial0")
        .await;
    wait_clients(&mut agent, "vm-raw", DEVICE, 1).await;
    tmux.keys(&["C-]", "b"]);
    tmux.wait_screen("cannot carry a serial BREAK").await;
    tmux.keys(&["-l", "ok"]);
    raw_guest.wait_for(b"ok").await;
    raw_guest.read_some(Duration::from_millis(300)).await;
    assert_eq!(
        raw_guest.received(),
        b"ok",
        "nothing but the keys reached the guest"
    );
    tmux.keys(&["C-]", "."]);
    tmux.wait_screen("RAW-EXIT-0").await;
    drop(tmux);
}

/// `conlogctl history` on a terminal does not make the terminal answer into the shell that runs
/// it; to a pipe it stays byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_on_a_terminal_types_nothing_into_the_shell_and_a_pipe_is_exact() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-hist").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    guest.write(QUERIES).await;
    wait_logged(&daemon, "vm-hist", QUERIES.len() as u64).await;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("typed.txt");
    // The shell reads one line after history: anything tmux answered is in that line.
    let command = format!(
        "{} --socket {} history vm-hist; printf 'READY\\n'; head -n 1 > {}; printf 'SAVED\\n'; sleep 60",
        conlogctl_bin(),
        daemon.socket().display(),
        out.display()
    );
    let tmux = Tmux::start(dir.path(), &command);
    tmux.wait_screen("READY").await;
    tmux.keys(&["-l", "line"]);
    tmux.keys(&["Enter"]);
    tmux.wait_screen("SAVED").await;
    let typed = std::fs::read(&out).unwrap();
    assert_eq!(typed.escape_ascii().to_string(), "line\\n");
    drop(tmux);

    let mut cmd = Command::new(conlogctl_bin());
    cmd.arg("--socket")
        .arg(daemon.socket())
        .args(["history", "vm-hist"]);
    let output = run_bounded(&mut cmd);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(output.stdout, QUERIES, "history to a pipe is byte-exact");
}

/// Collects a child's stream (stdout or stderr) into a shared buffer.
fn collect(mut stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = buffer.clone();
    tokio::spawn(async move {
        let mut chunk = vec![0u8; 64 << 10];
        while let Ok(n) = stream.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buffer
}

async fn wait_buffer(buffer: &Arc<Mutex<Vec<u8>>>, what: &str, done: impl Fn(&[u8]) -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if done(&buffer.lock().unwrap()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {what}; have {}",
            buffer.lock().unwrap().escape_ascii()
        );
        tokio::time::sleep(POLL).await;
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// How a round of the reconnect test replaces the daemon.
#[derive(Clone, Copy, Debug)]
enum Replace {
    /// SIGUSR1: an in-place upgrade (same pid).
    Upgrade,
    /// kill -9, then a new daemon on the same directories.
    Restart,
    /// A `conlogd --takeover` successor; the old process exits 0.
    Takeover,
}

/// `history --follow` and `console` across SIGUSR1, a kill -9 plus restart and a `--takeover`:
/// the follower prints the stream's bytes exactly once, in order; the console keeps running,
/// says so on stderr, re-takes the writer lease, and input after each reconnect reaches the
/// guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_follow_and_console_resume_by_offset_across_upgrade_and_restart() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-up").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    let mut expected = b"before\r\n".to_vec();
    guest.write(b"before\r\n").await;
    wait_logged(&daemon, "vm-up", expected.len() as u64).await;

    let mut follow = tokio::process::Command::new(conlogctl_bin());
    follow
        .arg("--socket")
        .arg(daemon.socket())
        .args(["history", "vm-up", "--from", "0", "-f"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut follow = follow.spawn().unwrap();
    let follow_out = collect(follow.stdout.take().unwrap());
    let follow_err = collect(follow.stderr.take().unwrap());

    let mut console = tokio::process::Command::new(conlogctl_bin());
    console
        .arg("--socket")
        .arg(daemon.socket())
        .args(["console", "vm-up", "--replay", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut console = console.spawn().unwrap();
    let mut console_in = console.stdin.take().unwrap();
    let console_out = collect(console.stdout.take().unwrap());
    let console_err = collect(console.stderr.take().unwrap());
    wait_clients(&mut agent, "vm-up", DEVICE, 1).await;
    wait_buffer(&follow_out, "the history so far", |b| b == expected).await;
    console_in.write_all(b"in-0\n").await.unwrap();
    guest.wait_for(b"in-0\n").await;

    let mut successor = None;
    for (round, how) in [
        (1, Replace::Upgrade),
        (2, Replace::Restart),
        (3, Replace::Takeover),
    ] {
        match how {
            Replace::Upgrade => daemon.signal(rustix::process::Signal::USR1),
            Replace::Restart => {
                daemon.kill().await;
                daemon.restart().await;
                guest = guest.reconnect().await;
            }
            Replace::Takeover => {
                let mut next =
                    upgrade_common::Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
                next.wait_ready().await;
                let status = daemon.wait_exit().await;
                assert_eq!(
                    status.code(),
                    Some(0),
                    "the old daemon hands over and exits"
                );
                next.assert_took_over();
                // The guest's connection is carried: it does not reconnect.
                successor = Some(next);
            }
        }
        let line = format!("after-{round}\r\n");
        guest.write(line.as_bytes()).await;
        expected.extend_from_slice(line.as_bytes());
        wait_buffer(&console_err, "the console's reconnect notice", |b| {
            count(b, b"reconnected at offset") == round
        })
        .await;
        wait_buffer(&follow_out, "the follower's output", |b| {
            b.len() >= expected.len()
        })
        .await;
        let input = format!("in-{round}\n");
        console_in.write_all(input.as_bytes()).await.unwrap();
        guest.wait_for(input.as_bytes()).await;
        wait_buffer(&console_out, "the console's output", |b| {
            b.ends_with(line.as_bytes())
        })
        .await;
    }
    assert_eq!(
        follow_out.lock().unwrap().escape_ascii().to_string(),
        expected.escape_ascii().to_string(),
        "history -f shows every byte once, in order"
    );
    assert_eq!(
        console_out.lock().unwrap().escape_ascii().to_string(),
        expected[b"before\r\n".len()..].escape_ascii().to_string(),
        "the console shows every byte after its attach once, in order"
    );
    let notices = String::from_utf8_lossy(&follow_err.lock().unwrap()).into_owned();
    assert_eq!(count(notices.as_bytes(), b"reconnecting"), 3, "{notices}");
    assert!(
        follow.try_wait().unwrap().is_none(),
        "history -f still runs"
    );
    assert!(console.try_wait().unwrap().is_none(), "console still runs");

    // Leaving: end of piped input, then the drain: status 0.
    drop(console_in);
    let status = bounded("console exits", console.wait()).await.unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "console exits 0 when its input ends"
    );
    drop(successor);
}

/// Exit statuses: a refused attach or history (unknown guest) is 3 with one clear line; the
/// statuses are listed in `--help`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_exit_3_with_one_line_and_help_lists_the_statuses() {
    let daemon = Daemon::start().await;
    for args in [
        &["console", "no-such-vm"][..],
        &["history", "no-such-vm"][..],
    ] {
        let mut cmd = Command::new(conlogctl_bin());
        cmd.arg("--socket")
            .arg(daemon.socket())
            .args(args)
            .stdin(Stdio::null());
        let output = run_bounded(&mut cmd);
        assert_eq!(
            output.status.code(),
            Some(3),
            "{args:?}: {}",
            describe(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("no-such-vm"), "{args:?}: {stderr}");
    }
    let mut cmd = Command::new(conlogctl_bin());
    cmd.arg("--help");
    let output = run_bounded(&mut cmd);
    let help = String::from_utf8_lossy(&output.stdout);
    for line in ["3  refused", "4  lost", "5  revoked", "Usage: conlogctl"] {
        assert!(help.contains(line), "--help lacks {line:?}:\n{help}");
    }
}
