//! Hostile clients of `fd.sock` against the real `conlogd`: garbage, partial and huge lines,
//! NUL bytes and invalid UTF-8, clients that send nothing, trickle, or leave mid-way, and many
//! of them at once. None of them gets a pipe, delays a good client, stops the daemon, burns a
//! real token or leaks a descriptor.

use crate::support;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::*;

/// A hostile line: what it is, its bytes, whether the client half-closes after sending it,
/// and what the daemon's `error: ` answer must say.
struct Garbage {
    what: &'static str,
    bytes: Vec<u8>,
    half_close: bool,
    answer: &'static str,
}

/// What trickling clients send, a byte at a time: token bytes, fewer than a line's worth.
const TRICKLE: [u8; 100] = [b'a'; 100];

fn garbage(what: &'static str, bytes: &[u8], half_close: bool, answer: &'static str) -> Garbage {
    Garbage {
        what,
        bytes: bytes.to_vec(),
        half_close,
        answer,
    }
}

/// Every kind of bad line. Lines with a bad byte and no newline are answered at once (a
/// client waiting for the read timeout would be told "timed out" instead).
fn all_garbage() -> Vec<Garbage> {
    let unknown = "unknown or already used";
    let closed = "closed before the token line ended";
    let mut huge = vec![b'a'; 10 << 20];
    huge.push(b'\n');
    vec![
        garbage(
            "unknown token",
            b"0123456789abcdef0123456789abcdef\n",
            false,
            unknown,
        ),
        garbage(
            "unknown token, CRLF",
            b"0123456789abcdef\r\n",
            false,
            unknown,
        ),
        garbage("nothing, then close", b"", true, closed),
        garbage("no newline, then close", b"0123456789abcdef", true, closed),
        garbage("NUL in a token", b"0123\x00abcd\n", false, "0x00"),
        garbage("a lone NUL", b"\x00", false, "0x00"),
        garbage("invalid UTF-8", b"\xc3\x28\n", false, "0xc3"),
        garbage("a continuation byte", b"abc\x80", false, "0x80"),
        garbage("0xff", b"\xff\xfe\n", false, "0xff"),
        garbage(
            "escape sequences",
            b"\x1b]0;title\x07\x1b[2J\n",
            false,
            "0x1b",
        ),
        garbage("an empty line", b"\n", false, "empty"),
        garbage("spaces", b"   \n", false, "0x20"),
        garbage("CR inside", b"ab\rcd\n", false, "0x0d"),
        garbage("129 bytes, no newline", &[b'a'; 129], false, "longer than"),
        garbage("a 10 MiB line", &huge, false, "longer than"),
        garbage("10 MiB of NULs", &vec![0; 10 << 20], false, "0x00"),
    ]
}

/// Sends `g` on a new connection (off the async threads) and checks the one-line answer.
async fn refused(fd_socket: PathBuf, g: Garbage) {
    let (bytes, half_close) = (g.bytes, g.half_close);
    let answer =
        tokio::task::spawn_blocking(move || fd_sock_exchange(&fd_socket, &bytes, half_close))
            .await
            .expect("fd.sock client thread");
    assert!(
        answer.starts_with("error: ")
            && answer.contains(g.answer)
            && answer.ends_with('\n')
            && answer.lines().count() == 1,
        "{}: expected one `error: …{}…` line, got {answer:?}",
        g.what,
        g.answer
    );
}

/// Every kind of garbage gets exactly one `error: ` line saying what was wrong, and the
/// daemon serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_with_one_error_line() {
    let mut daemon = Daemon::start().await;
    for g in all_garbage() {
        refused(daemon.fd_socket(), g).await;
    }
    daemon.assert_running();
    assert_still_serves(&daemon, "vm-after-garbage").await;
}

/// A real token survives malformed and unfinished attempts to use it, and a client that
/// cannot take the pipe (its receiving side is shut) does not burn it; a line sent one byte
/// per write (partial writes) is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_token_survives_bad_attempts_and_partial_writes_work() {
    let mut daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let fd_socket = daemon.fd_socket();
    let reply = create_pipe(&mut agent, "vm-partial", "", None)
        .await
        .unwrap();
    let token = reply.handoff_token.clone();

    let mut with_nul = token.clone().into_bytes();
    with_nul.insert(5, 0);
    with_nul.push(b'\n');
    for g in [
        garbage(
            "a space first",
            format!(" {token}\n").as_bytes(),
            false,
            "0x20",
        ),
        garbage("a NUL inside", &with_nul, false, "0x00"),
        garbage(
            "half the token, then close",
            &token.as_bytes()[..16],
            true,
            "closed before",
        ),
        garbage(
            "the token and more",
            format!("{token}0\n").as_bytes(),
            false,
            "unknown",
        ),
    ] {
        refused(fd_socket.clone(), g).await;
    }

    // The receiving side shut first: the daemon cannot send the descriptor, so the token
    // stays valid. The daemon says so once it has tried, which is what is waited for.
    let path = fd_socket.clone();
    let line = format!("{token}\n");
    let _deaf = tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(&path).expect("connect to fd.sock");
        stream.shutdown(std::net::Shutdown::Read).unwrap();
        stream.write_all(line.as_bytes()).unwrap();
        stream
    })
    .await
    .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !daemon.stderr().contains("the token stays valid") {
        assert!(
            Instant::now() < deadline,
            "no failed send logged:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(POLL).await;
    }

    // One byte per write, as a slow agent might send it.
    let path = fd_socket.clone();
    let line = format!("{token}\n");
    let pipe = tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(&path).expect("connect to fd.sock");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        for byte in line.as_bytes() {
            stream.write_all(std::slice::from_ref(byte)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        conlog::client::receive_handoff_answer(&stream)
    })
    .await
    .unwrap()
    .expect("the token is still valid and a line in pieces is accepted");
    write_and_close(std::fs::File::from(pipe), b"in pieces\n".to_vec()).await;
    wait_closed(&mut agent, "vm-partial", "qemu", 10).await;
    assert_eq!(
        read_log(&daemon.log_dir(), "vm-partial", "qemu"),
        b"in pieces\n"
    );
    daemon.assert_running();
}

/// With `handoff.read_timeout: 20s`, 60 slow clients (silent, stalled after half a token,
/// or trickling a byte a second) hold connections while good clients create, claim and use
/// pipes: each good client is served while every slow client is still waiting (so nobody
/// waited for a slow client to time out) and well within half the read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_clients_do_not_delay_good_clients() {
    const READ_TIMEOUT: Duration = Duration::from_secs(20);
    let mut daemon = Daemon::start_with(Some("handoff:\n  read_timeout: 20s\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let slow = SlowClients::start(
        &daemon.fd_socket(),
        20,
        b"0123456789abcdef",
        &TRICKLE,
        Duration::from_secs(1),
    );

    let mut took = Vec::new();
    for i in 0..5 {
        let guest = format!("vm-good-{i}");
        let begun = Instant::now();
        let (_, pipe) = open_pipe(&mut agent, &guest, "qemu", None).await;
        took.push(begun.elapsed());
        slow.assert_all_waiting();
        write_and_close(pipe, b"served\n".to_vec()).await;
        wait_closed(&mut agent, &guest, "qemu", 7).await;
    }
    let slowest = *took.iter().max().unwrap();
    assert!(
        slowest < READ_TIMEOUT / 2,
        "a good client took {slowest:?} beside slow clients: {took:?}"
    );
    slow.assert_all_waiting();
    drop(slow);
    daemon.assert_running();
    assert_still_serves(&daemon, "vm-after-slow").await;
    eprintln!("good hand-offs beside 60 slow clients took {took:.1?}");
}

/// With `handoff.read_timeout: 1s`, silent clients, clients stalled after half a token and
/// clients that trickle a byte every 200 ms (each read well within the timeout, the line
/// never done) are all cut off with "timed out": the timeout is for the whole line, not per
/// read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_clients_are_cut_off_at_the_read_timeout() {
    let mut daemon = Daemon::start_with(Some("handoff:\n  read_timeout: 1s\n"), &[]).await;
    let slow = SlowClients::start(
        &daemon.fd_socket(),
        2,
        b"0123456789abcdef",
        &TRICKLE,
        Duration::from_millis(200),
    );
    let answers = tokio::task::spawn_blocking(move || slow.answers())
        .await
        .unwrap();
    for (what, answer) in answers {
        assert_eq!(
            String::from_utf8_lossy(&answer),
            "error: timed out waiting for the token line\n",
            "a {what} client"
        );
    }
    daemon.assert_running();
    assert_still_serves(&daemon, "vm-after-timeouts").await;
}

/// 150 bad clients at once, of every kind (garbage, long lines, silence until close) while
/// ten good clients claim pipes: every bad one is refused, every good one served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_bad_clients_beside_good_ones() {
    let mut daemon = Daemon::start().await;
    let mut kinds: Vec<Garbage> = all_garbage()
        .into_iter()
        .filter(|g| g.bytes.len() < 1 << 20)
        .collect();
    kinds.push(garbage(
        "a 1 MiB line",
        &[b'b'; 1 << 20],
        false,
        "longer than",
    ));
    let mut bad = Vec::new();
    for i in 0..150 {
        let g = &kinds[i % kinds.len()];
        let g = garbage(g.what, &g.bytes, g.half_close, g.answer);
        bad.push(tokio::spawn(refused(daemon.fd_socket(), g)));
    }
    let mut good = Vec::new();
    for i in 0..10 {
        let mut agent = daemon.agent().await;
        good.push(tokio::spawn(async move {
            let guest = format!("vm-busy-{i}");
            let (_, pipe) = open_pipe(&mut agent, &guest, "qemu", None).await;
            write_and_close(pipe, b"served\n".to_vec()).await;
            wait_closed(&mut agent, &guest, "qemu", 7).await;
        }));
    }
    for task in bad.into_iter().chain(good) {
        bounded("a client", task).await.expect("client task");
    }
    daemon.assert_running();
    assert_still_serves(&daemon, "vm-after-crowd").await;
}

/// 1,000 failed hand-offs (unknown, expired and garbage tokens, over-long lines, clients that
/// leave mid-line) leave the daemon with exactly the descriptors it had before, and each is
/// counted as a failure.
///
/// The baseline is taken once the expired tokens' streams are closed; from then on nothing
/// but the failed hand-offs touches the daemon (the agent connection stays open throughout),
/// so no slack is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_failed_handoffs_leak_no_descriptor() {
    const FAILURES: usize = 1000;
    const THREADS: usize = 4;
    let mut daemon = Daemon::start_with(Some("handoff:\n  token_ttl: 1s\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let mut expired = Vec::new();
    for i in 0..10 {
        let reply = create_pipe(&mut agent, &format!("vm-expired-{i}"), "", None)
            .await
            .unwrap();
        expired.push(reply.handoff_token);
    }
    for i in 0..10 {
        // The sweep closes an expired token's write end, which closes its stream.
        wait_stream(
            &mut agent,
            &format!("vm-expired-{i}"),
            "qemu",
            "closed",
            |s| !s.open,
        )
        .await;
    }
    let pid = daemon.pid();
    let failures_before = handoff_failures(&daemon);
    let baseline = settled_fds(pid).await;
    let baseline_text = describe_fds(pid);

    let fd_socket = daemon.fd_socket();
    let mut threads = Vec::new();
    for t in 0..THREADS {
        let fd_socket = fd_socket.clone();
        let expired = expired.clone();
        threads.push(std::thread::spawn(move || {
            for i in (t..FAILURES).step_by(THREADS) {
                let (line, half_close, answer) = match i % 6 {
                    0 => (
                        format!("{:032x}\n", i * 7919).into_bytes(),
                        false,
                        "unknown",
                    ),
                    1 => (
                        format!("{}\n", expired[i % 10]).into_bytes(),
                        false,
                        "expired",
                    ),
                    2 => (b"\x00\xff\x1b[2J\n".to_vec(), false, "0x00"),
                    3 => (vec![b'z'; 300], false, "longer than"),
                    4 => (
                        expired[i % 10].as_bytes()[..20].to_vec(),
                        true,
                        "closed before",
                    ),
                    _ => (b"\xc3\x28\n".to_vec(), false, "0xc3"),
                };
                let got = fd_sock_exchange(&fd_socket, &line, half_close);
                assert!(
                    got.starts_with("error: ") && got.contains(answer),
                    "attempt {i}: expected {answer:?}, got {got:?}"
                );
            }
        }));
    }
    let started = Instant::now();
    for thread in threads {
        thread.join().expect("a client thread panicked");
    }
    let took = started.elapsed();

    // The daemon closes each connection right after answering; wait (bounded) for the last.
    let deadline = Instant::now() + DEADLINE;
    let mut now = open_fds(pid);
    while now != baseline && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
        now = open_fds(pid);
    }
    assert_eq!(
        now,
        baseline,
        "descriptors before: {baseline_text}\nafter: {}",
        describe_fds(pid)
    );
    assert_eq!(
        handoff_failures(&daemon) - failures_before,
        FAILURES as f64,
        "every attempt is counted as a failed hand-off"
    );
    daemon.assert_running();
    assert_still_serves(&daemon, "vm-after-leak-check").await;
    eprintln!("{FAILURES} failed hand-offs in {took:.1?}; {baseline} descriptors before and after");
}

/// The descriptor count of `pid` once it has not changed for 25 polls in a row (a stream that
/// just closed may still be closing its files; the metrics connection may still be open).
async fn settled_fds(pid: u32) -> usize {
    let deadline = Instant::now() + DEADLINE;
    let (mut count, mut same) = (open_fds(pid), 0);
    while same < 25 {
        assert!(
            Instant::now() < deadline,
            "descriptors of {pid} never settle"
        );
        tokio::time::sleep(POLL).await;
        let now = open_fds(pid);
        same = if now == count { same + 1 } else { 0 };
        count = now;
    }
    count
}

/// `conlog_handoff_failures_total` from the metrics endpoint.
fn handoff_failures(daemon: &Daemon) -> f64 {
    let (status, body) = http_get(daemon.metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    metric(&body, "conlog_handoff_failures_total").unwrap_or(0.0)
}
