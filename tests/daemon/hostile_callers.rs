//! Hostile callers cannot exhaust the daemon (docs/operations.md "What a caller can cost";
//! SECURITY.md "Resource model"): bodies are not held before their token verifies, idle and
//! slow connections are closed, the local agent keeps its own budget, every remote cost is
//! counted per peer address and per guest, a history reader that stops reading costs a fixed
//! amount and one log file, and remote callers cannot take the descriptors the daemon needs to
//! rotate other guests' logs. Each attack runs against the real binary at a size that fits a
//! 2-CPU machine; memory is read from /proc, never timed.

use crate::support;

use conlog::proto::{self, Access, LogMode};
use prost::Message;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use support::*;
use tonic::Code;

const MIB: u64 = 1 << 20;

/// A Console channel to `daemon` from loopback address `from`, carrying `token`.
async fn channel_from(daemon: &Daemon, from: Ipv4Addr, token: &str) -> ConsoleChannel {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", daemon.tcp))
        .unwrap()
        .local_address(Some(IpAddr::V4(from)))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect from {from}: {e}"));
    with_token(channel, token)
}

fn expect_limit<T: std::fmt::Debug>(result: Result<T, tonic::Status>, limit: &str) {
    let message = expect_code(result, Code::ResourceExhausted, limit);
    assert!(message.contains(limit), "{limit}: {message}");
}

/// A guest `guest` with a closed pipe stream holding `bytes` of the test pattern.
async fn guest_with_history(daemon: &Daemon, guest: &str, bytes: usize, max_size: u64) {
    let mut agent = daemon.agent().await;
    let limits = Some(limits(max_size, 8, LogMode::Rotate));
    let (_, pipe) = open_pipe(&mut agent, guest, "qemu", limits).await;
    write_and_close(pipe, pattern(0, bytes)).await;
    wait_closed(&mut agent, guest, "qemu", bytes as u64).await;
}

/// Whether the server closed `socket` (EOF or reset) within `within`, reading and discarding
/// whatever it sent first.
fn closed_by_server(socket: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Everything the server sends on `socket` until it closes it or `within` passes.
fn read_answer(socket: &mut TcpStream, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&answer);
        if text.contains("grpc-status") && text.contains("\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The headers of an HTTP/1.1 gRPC-web `ReadHistory` whose body will be `length` bytes.
fn grpc_web_headers(length: usize, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    format!(
        "POST /conlog.v1.Console/ReadHistory HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n{auth}\
         content-length: {length}\r\n\r\n"
    )
}

/// Finding 1: a gRPC-web body is held in memory only after its token verifies, and then only
/// within `limits.web_body_bytes`; a body that does not arrive within `limits.body_timeout`
/// is answered and its connection given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_held_only_after_the_token_and_within_the_budget() {
    let config = "limits:\n  tcp_connections: 1000\n  connections_per_peer: 1000\n  \
                  idle_timeout: 60s\n  body_timeout: 3s\n  web_body_bytes: 4MiB\n";
    let daemon = Daemon::start_with(Some(config), &[]).await;
    guest_with_history(&daemon, "vm1", 1000, 64 << 10).await;
    let token = daemon.token("vm1", "", Access::Read, 600).await;
    let pid = daemon.pid();
    let (rss_before, fds_before) = (rss_bytes(pid), open_fds(pid));

    // 200 unauthenticated bodies of 1.3 MB of an announced 1.4 MB, then silence.
    let chunk = vec![0u8; 1_300_000];
    let address = daemon.tcp;
    let attackers: Vec<TcpStream> = tokio::task::spawn_blocking(move || {
        (0..200)
            .map(|_| {
                let mut s = TcpStream::connect(address).unwrap();
                s.write_all(grpc_web_headers(1_400_000, None).as_bytes())
                    .unwrap();
                s.write_all(&chunk).unwrap();
                s
            })
            .collect()
    })
    .await
    .unwrap();
    // Everything sent has been read by the daemon (its receive queues are empty) before
    // memory is measured: a daemon that kept the bytes would hold 260 MB now.
    wait_for("the daemon to read every body", || socket_queues_empty(pid)).await;
    let grown = rss_bytes(pid).saturating_sub(rss_before);
    eprintln!(
        "200 unauthenticated 1.3 MB bodies: RSS +{} KiB",
        grown >> 10
    );
    // Margin: 200 HTTP/1.1 connections' own buffers (hyper's 8-16 KiB read buffer each) and
    // allocator slack; 1.3 MB of one body alone would exceed it.
    assert!(
        grown < 24 * MIB,
        "unauthenticated bodies held {grown} bytes for 200 connections"
    );

    // A call of a service without tokens (reflection) may not carry a large body instead.
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(address).unwrap();
        let headers = grpc_web_headers(100_000, None).replace(
            "/conlog.v1.Console/ReadHistory",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        );
        s.write_all(headers.as_bytes()).unwrap();
        let _ = s.write_all(&[0u8; 100_000]);
        read_answer(&mut s, DEADLINE)
    })
    .await
    .unwrap();
    assert!(answer.contains("over%204096%20bytes"), "{answer}");

    // With a valid token, bodies are held, but only 4 MiB of them at once: the others are
    // refused naming the limit.
    let chunk = vec![0u8; 1_300_000];
    let token2 = token.clone();
    let mut holders: Vec<TcpStream> = tokio::task::spawn_blocking(move || {
        (0..20)
            .map(|_| {
                let mut s = TcpStream::connect(address).unwrap();
                s.write_all(grpc_web_headers(1_400_000, Some(&token2)).as_bytes())
                    .unwrap();
                s.write_all(&chunk).unwrap();
                s
            })
            .collect()
    })
    .await
    .unwrap();
    let answers: Vec<String> = tokio::task::spawn_blocking(move || {
        holders
            .iter_mut()
            .map(|s| read_answer(s, Duration::from_millis(500)))
            .collect()
    })
    .await
    .unwrap();
    let refused = answers
        .iter()
        .filter(|a| a.contains("limits.web_body_bytes"))
        .count();
    // 4 MiB holds three bodies of 1.3 MB: the other 17 are refused at once.
    assert!(refused >= 17, "{refused} of 20 refused: {answers:?}");
    let grown = rss_bytes(pid).saturating_sub(rss_before);
    eprintln!(
        "20 authenticated bodies, {refused} refused: RSS +{} KiB",
        grown >> 10
    );
    assert!(grown < 28 * MIB, "held bodies grew RSS by {grown} bytes");

    // After limits.body_timeout every unfinished body is answered and its place given back.
    wait_for("every attacking connection to be given back", || {
        open_fds(pid) <= fds_before + 2
    })
    .await;
    drop(attackers);
    // The daemon still serves.
    follower(with_token(daemon.plain_tcp_channel().await, &token), "vm1")
        .await
        .expect("a normal call after the attack");
}

/// Whether every TCP socket of `pid` has an empty receive queue (`/proc/PID/net/tcp`'s
/// rx_queue column, for the sockets the process holds).
fn socket_queues_empty(pid: u32) -> bool {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table.lines().skip(1).all(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(queues), Some(inode)) = (fields.get(4), fields.get(9)) else {
            return true;
        };
        !inodes.contains(*inode) || queues.split(':').nth(1).is_some_and(|rx| rx == "00000000")
    })
}

/// Polls `done` (bounded by the suite's deadline).
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Finding 2: connections that send nothing, trickle a header, or open HTTP/2 and no stream
/// are closed after `limits.idle_timeout`, so they cannot keep remote consoles out; a
/// connection with a call in progress is never idle, however quiet the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed_and_busy_ones_are_not() {
    let config = "limits:\n  tcp_connections: 30\n  idle_timeout: 2s\n";
    let daemon = Daemon::start_with(Some(config), &[]).await;
    guest_with_history(&daemon, "vm1", 100, 64 << 10).await;
    let token = daemon.token("vm1", "", Access::Read, 600).await;

    // A follower on a stream that stays quiet: its connection has a call, it is not idle.
    let mut quiet = follower(with_token(daemon.plain_tcp_channel().await, &token), "vm1")
        .await
        .unwrap();

    let address = daemon.tcp;
    let closed = tokio::task::spawn_blocking(move || {
        let mut sockets: Vec<(&str, TcpStream)> = Vec::new();
        for _ in 0..25 {
            sockets.push(("silent", TcpStream::connect(address).unwrap()));
        }
        let mut h2 = TcpStream::connect(address).unwrap();
        h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .unwrap();
        sockets.push(("HTTP/2 without a stream", h2));
        // Every place is taken: a console client now cannot get in.
        let mut slow = TcpStream::connect(address).unwrap();
        slow.write_all(b"POST /conlog.v1.Console/ReadHistory HTTP/1.1\r\nx-a: ")
            .unwrap();
        let start = Instant::now();
        // Slow-loris: a header byte every 200 ms, until the daemon closes it.
        let mut slow_closed = false;
        while start.elapsed() < DEADLINE {
            if slow.write_all(b"a").is_err() || closed_by_server(&mut slow, POLL * 10) {
                slow_closed = true;
                break;
            }
        }
        let all_closed: Vec<(&str, bool)> = sockets
            .iter_mut()
            .map(|(what, s)| (*what, closed_by_server(s, DEADLINE)))
            .collect();
        (slow_closed, all_closed)
    })
    .await
    .unwrap();
    assert!(closed.0, "a slow-loris header kept its connection");
    for (what, was_closed) in closed.1 {
        assert!(was_closed, "a {what} connection was never closed");
    }
    // The places are free again: a console client gets in.
    let mut again = follower(with_token(daemon.plain_tcp_channel().await, &token), "vm1")
        .await
        .expect("a console call after idle connections were closed");
    // The quiet follower outlived several idle timeouts and still gets new bytes.
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    write_and_close(pipe, b"after the quiet\n".to_vec()).await;
    for stream in [&mut quiet, &mut again] {
        let chunk = bounded("new bytes on a quiet follower", stream.message())
            .await
            .expect("the quiet follower's call is still open")
            .expect("a chunk");
        assert!(
            String::from_utf8_lossy(&chunk.data).contains("after the quiet"),
            "{chunk:?}"
        );
    }
}

/// Finding 3: remote callers at every limit take nothing from the local socket; calls are
/// counted per peer address and per guest, so one tenant cannot use the node's whole budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_calls_are_counted_per_peer_and_per_guest_and_never_starve_the_agent() {
    let config = "limits:\n  remote_calls_total: 12\n  calls_per_peer: 5\n  \
                  calls_per_guest: 8\n  calls_total: 64\n";
    let daemon = Daemon::start_with(Some(config), &[]).await;
    for guest in ["vm1", "vm2", "vm3"] {
        guest_with_history(&daemon, guest, 100, 64 << 10).await;
    }
    let read = |g: &'static str| daemon.token(g, "", Access::Read, 600);
    let (vm1, vm2, vm3) = (read("vm1").await, read("vm2").await, read("vm3").await);
    let a = Ipv4Addr::new(127, 0, 0, 2);
    let b = Ipv4Addr::new(127, 0, 0, 3);
    let c = Ipv4Addr::new(127, 0, 0, 4);

    // Per peer: 5 calls from a (vm1 and vm2 tokens alike), the 6th refused; b is not charged.
    let mut held = Vec::new();
    for (token, guest) in [
        (&vm1, "vm1"),
        (&vm1, "vm1"),
        (&vm1, "vm1"),
        (&vm2, "vm2"),
        (&vm2, "vm2"),
    ] {
        held.push(
            follower(channel_from(&daemon, a, token).await, guest)
                .await
                .unwrap_or_else(|s| panic!("{guest}: {s:?}")),
        );
    }
    expect_limit(
        follower(channel_from(&daemon, a, &vm2).await, "vm2").await,
        "limits.calls_per_peer",
    );
    // Per guest: vm1 holds 3 (from a); 5 more from b reach 8, the 9th from c is refused;
    // another guest's token from the same c is not.
    for _ in 0..5 {
        held.push(
            follower(channel_from(&daemon, b, &vm1).await, "vm1")
                .await
                .unwrap(),
        );
    }
    expect_limit(
        follower(channel_from(&daemon, c, &vm1).await, "vm1").await,
        "limits.calls_per_guest",
    );
    for _ in 0..2 {
        held.push(
            follower(channel_from(&daemon, c, &vm3).await, "vm3")
                .await
                .unwrap(),
        );
    }
    // TCP is full now (12); the next is refused naming the total.
    expect_limit(
        follower(channel_from(&daemon, c, &vm3).await, "vm3").await,
        "limits.remote_calls_total",
    );

    // The agent is served as usual, and so are local console calls.
    let mut agent = daemon.agent().await;
    agent
        .list_guests(proto::ListGuestsRequest::default())
        .await
        .expect("ListGuests with TCP at its limits");
    let (_, pipe) = open_pipe(&mut agent, "vm4", "qemu", None).await;
    write_and_close(pipe, b"the agent is served\n".to_vec()).await;
    let _local = follower(local_channel(&daemon).await, "vm4")
        .await
        .expect("a local follower with TCP at its limits");
    open_console(&mut agent, "vm4").await;

    // Places come back when calls end.
    held.truncate(4);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match follower(channel_from(&daemon, c, &vm1).await, "vm1").await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(Instant::now() < deadline, "places never came back: {s:?}");
                tokio::time::sleep(POLL).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
}

/// A raw HTTP/2 client that opens `streams` calls of `path` with `token` and the encoded
/// request `message`, advertising a stream window of `window` bytes, and then never reads its
/// socket. With `cut`, each request's last `cut` bytes are never sent (nor its end).
fn raw_h2_calls(
    address: SocketAddr,
    token: &str,
    path: &str,
    message: &[u8],
    streams: u32,
    window: u32,
    cut: usize,
) -> TcpStream {
    let mut socket = TcpStream::connect(address).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let frame = |out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = u32::try_from(payload.len()).unwrap();
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    };
    // SETTINGS: INITIAL_WINDOW_SIZE; then the connection window to the maximum.
    let mut settings = vec![0, 4];
    settings.extend_from_slice(&window.to_be_bytes());
    frame(&mut out, 4, 0, 0, &settings);
    frame(&mut out, 4, 1, 0, &[]); // ACK of the server's SETTINGS, read or not
    frame(&mut out, 8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes());
    let mut grpc = vec![0u8];
    grpc.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    grpc.extend_from_slice(message);
    grpc.truncate(grpc.len() - cut);
    let end_stream = if cut == 0 { 1 } else { 0 };
    let authorization = format!("Bearer {token}");
    let mut encoder = loona_hpack::Encoder::new();
    for i in 0..streams {
        let id = 1 + 2 * i;
        let headers = encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", b"127.0.0.1"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"authorization", authorization.as_bytes()),
        ]);
        frame(&mut out, 1, 4, id, &headers);
        frame(&mut out, 0, end_stream, id, &grpc);
    }
    socket.write_all(&out).unwrap();
    socket
}

/// `streams` following `ReadHistory` calls of `guest` that never read, advertising the
/// largest windows: the most a reader can make the daemon hold.
fn stalled_h2_readers(address: SocketAddr, token: &str, guest: &str, streams: u32) -> TcpStream {
    let request = proto::ReadHistoryRequest {
        guest: guest.into(),
        follow: true,
        ..Default::default()
    }
    .encode_to_vec();
    let path = "/conlog.v1.Console/ReadHistory";
    raw_h2_calls(address, token, path, &request, streams, 0x7fff_ffff, 0)
}

/// Finding 4: a history reader that stops reading costs a fixed amount of memory and at most
/// one log file, however much history there is and however large a window the client
/// advertises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_history_readers_cost_a_fixed_amount_and_one_file() {
    let config = "limits:\n  calls_per_guest: 1000\n  calls_per_peer: 1000\n";
    let daemon = Daemon::start_with(Some(config), &[]).await;
    // 8 MiB of history in 9 files of 1 MiB.
    guest_with_history(&daemon, "vm1", 8 << 20, MIB).await;
    let token = daemon.token("vm1", "", Access::Read, 600).await;
    let pid = daemon.pid();
    let (rss_before, fds_before) = (rss_bytes(pid), open_fds(pid));

    const CONNECTIONS: u32 = 10;
    const PER_CONNECTION: u32 = 20;
    let readers = CONNECTIONS * PER_CONNECTION;
    let address = daemon.tcp;
    let sockets: Vec<TcpStream> = {
        let token = token.clone();
        tokio::task::spawn_blocking(move || {
            (0..CONNECTIONS)
                .map(|_| stalled_h2_readers(address, &token, "vm1", PER_CONNECTION))
                .collect()
        })
        .await
        .unwrap()
    };
    // Every reader started (each holds its call) and stalled: the daemon's figures stop moving.
    let metrics = daemon.metrics;
    wait_for("every reader to be admitted", || {
        let (_, text) = http_get(metrics, "/metrics");
        metric(&text, "conlog_remote_calls_in_progress").unwrap_or(0.0) >= f64::from(readers)
    })
    .await;
    let mut last = (0, 0);
    let deadline = Instant::now() + DEADLINE;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = (rss_bytes(pid), open_fds(pid));
        if now == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon's figures never settled"
        );
        last = now;
    }
    let (rss, fds) = last;
    let per_reader = rss.saturating_sub(rss_before) / u64::from(readers);
    eprintln!(
        "{readers} stalled readers: {} KiB each, {} more descriptors",
        per_reader >> 10,
        fds.saturating_sub(fds_before)
    );
    // docs/operations.md: a stalled reader holds ≤ 4 chunks of history.chunk_size (64 KiB):
    // the one being read, the one queued, the one being encoded, the one HTTP/2 holds.
    assert!(
        per_reader <= 320 << 10,
        "a stalled reader costs {per_reader} bytes (RSS {rss_before} → {rss})"
    );
    // One log file and its time index per reader, one socket per connection.
    let extra = fds.saturating_sub(fds_before);
    assert!(
        extra <= (2 * readers + CONNECTIONS) as usize + 4,
        "{readers} readers on {CONNECTIONS} connections hold {extra} more descriptors:\n{}",
        describe_fds(pid)
    );
    drop(sockets);
    wait_for("descriptors back to the baseline", || {
        open_fds(pid) <= fds_before + 2
    })
    .await;
}

/// Finding 4, the descriptor half: with RLIMIT_NOFILE at 512, one READ token holder opening
/// readers until refused cannot make another guest's rotation fail: remote callers hold at most
/// a quarter of the descriptors, and the refusal names that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_callers_cannot_take_the_descriptors_rotations_need() {
    let config = "limits:\n  calls_per_guest: 1000\n  calls_per_peer: 1000\n  \
                  connections_per_peer: 1000\n";
    let daemon = Daemon::start_limited(Some(config), &[], Some(512)).await;
    guest_with_history(&daemon, "vm1", 64 << 10, 4096).await;
    let token = daemon.token("vm1", "", Access::Read, 600).await;
    let mut agent = daemon.agent().await;
    // vm2 logs 4 MiB through 4 KiB files during the attack: a thousand rotations.
    let small = Some(limits(4096, 3, LogMode::Rotate));
    let (_, pipe) = open_pipe(&mut agent, "vm2", "qemu", small).await;
    let total = 4usize << 20;
    let writer = tokio::spawn(write_and_close(pipe, pattern(0, total)));

    // The attack: readers on connections of 16 until the daemon refuses.
    let mut held = Vec::new();
    let mut refusal = None;
    'attack: for _ in 0..40 {
        let channel = with_token(daemon.plain_tcp_channel().await, &token);
        for _ in 0..16 {
            match follower(channel.clone(), "vm1").await {
                Ok(stream) => held.push(stream),
                Err(status) => {
                    refusal = Some(status);
                    break 'attack;
                }
            }
        }
    }
    let refusal = refusal.expect("the attack was never refused");
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains("RLIMIT_NOFILE"), "{refusal:?}");
    assert!(held.len() <= 128, "{} readers admitted", held.len());

    // Meanwhile: vm2's log is exact, nothing dropped; the agent can still create consoles.
    writer.await.unwrap();
    let info = wait_closed(&mut agent, "vm2", "qemu", total as u64).await;
    assert_eq!(info.dropped_bytes, 0, "{info:?}");
    let kept = read_log(&daemon.log_dir(), "vm2", "qemu");
    let from = total - kept.len();
    assert_same(
        "vm2's log during the attack",
        &kept,
        &pattern(from as u64, kept.len()),
    );
    assert!(!kept.is_empty());
    open_console(&mut agent, "vm3").await;
    drop(held);
}

/// One token holder cannot fill a console with watchers: remote clients take at most three
/// quarters of `limits.clients_per_console`, the rest stays for local clients; and a unary
/// request body is bounded before its handler runs, whatever `limits.message_size` allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_watchers_leave_places_for_local_clients_and_small_calls_stay_small() {
    let daemon = Daemon::start_with(Some("limits:\n  clients_per_console: 4\n"), &[]).await;
    let mut agent = daemon.agent().await;
    open_console(&mut agent, "vm1").await;
    let token = daemon.token("vm1", "", Access::Read, 600).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let channel = with_token(daemon.plain_tcp_channel().await, &token);
        held.push(
            watch(channel, watch_request("vm1", proto::attach::Mode::ReadOnly))
                .await
                .expect("a remote watcher within the share"),
        );
    }
    let channel = with_token(daemon.plain_tcp_channel().await, &token);
    expect_limit(
        watch(channel, watch_request("vm1", proto::attach::Mode::ReadOnly)).await,
        "remote clients' share",
    );
    held.push(
        watch(
            local_channel(&daemon).await,
            watch_request("vm1", proto::attach::Mode::ReadOnly),
        )
        .await
        .expect("the local place kept free"),
    );
    // A ReadHistory request of 5 KiB is refused for its size before its fields are looked at.
    let mut big = follow_request("vm1");
    big.guest = "v".repeat(5000);
    let channel = with_token(daemon.plain_tcp_channel().await, &token);
    let refused = channel.console().read_history(big).await;
    let message = expect_code(refused, Code::ResourceExhausted, "a 5 KiB ReadHistory");
    assert!(message.contains("over 4096 bytes"), "{message}");
}

/// `conlog_remote_calls_in_progress` of `daemon`.
fn remote_calls(daemon: &Daemon) -> f64 {
    let (_, text) = http_get(daemon.metrics, "/metrics");
    metric(&text, "conlog_remote_calls_in_progress").unwrap_or(0.0)
}

/// Watchers that ask for a replay and never read hold it only within
/// `limits.remote_replay_bytes`: past it, a remote attach gets no replay (its attached frame
/// says where it starts), a local one is not charged, and the budget comes back when the
/// watchers go. An `AttachConsole` message over 68 KiB is refused at its header, and a unary
/// request that never completes is ended after `limits.body_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_incomplete_messages_and_large_frames_are_bounded() {
    let config = "limits:\n  remote_replay_bytes: 256KiB\n  body_timeout: 1s\n  \
                  idle_timeout: 60s\nconsoles:\n  max_replay: 128KiB\n";
    let daemon = Daemon::start_with(Some(config), &[]).await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm1").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm1", "serial0", true).await;
    let printed = pattern(0, 1 << 20);
    guest.write(&printed).await;
    wait_offset(&mut agent, "vm1", "serial0", printed.len() as u64).await;
    let token = daemon.token("vm1", "", Access::Read, 600).await;
    let end = printed.len() as u64;
    let replay_request = |replay_bytes: u64| proto::WatchConsoleRequest {
        guest: "vm1".into(),
        mode: proto::attach::Mode::ReadOnly.into(),
        replay_bytes,
        ..Default::default()
    };

    // Two watchers with a window of 0 take 128 KiB of replay each and never take it.
    let holders = {
        let (address, token) = (daemon.tcp, token.clone());
        let message = replay_request(128 << 10).encode_to_vec();
        tokio::task::spawn_blocking(move || {
            let path = "/conlog.v1.Console/WatchConsole";
            raw_h2_calls(address, &token, path, &message, 2, 0, 0)
        })
        .await
        .unwrap()
    };
    wait_for("the holders to be admitted", || {
        remote_calls(&daemon) == 2.0
    })
    .await;
    // A remote watcher then gets no replay: it starts live, at the end.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let channel = with_token(daemon.plain_tcp_channel().await, &token);
        let frames = watch(channel, replay_request(128 << 10)).await.unwrap();
        if frames.attached.offset == end {
            break;
        }
        assert_eq!(frames.attached.offset, end - (128 << 10));
        assert!(
            Instant::now() < deadline,
            "the replay budget was never used up"
        );
        tokio::time::sleep(POLL).await;
    }
    // A local watcher is not charged.
    let local = watch(local_channel(&daemon).await, replay_request(128 << 10))
        .await
        .unwrap();
    assert_eq!(local.attached.offset, end - (128 << 10));
    // The budget comes back when the holders go.
    drop(holders);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let channel = with_token(daemon.plain_tcp_channel().await, &token);
        let frames = watch(channel, replay_request(128 << 10)).await.unwrap();
        if frames.attached.offset == end - (128 << 10) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replay budget never came back"
        );
        tokio::time::sleep(POLL).await;
    }

    // An AttachConsole input frame of 100 KiB (a READ_WRITE token) is refused for its size.
    let writer = daemon.token("vm1", "", Access::ReadWrite, 600).await;
    let channel = with_token(daemon.plain_tcp_channel().await, &writer);
    let mut session = Session::attach(channel, attach("vm1", proto::attach::Mode::ReadWrite))
        .await
        .unwrap();
    session.send(&vec![b'x'; 100 << 10]).await;
    let status = session.wait_end().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("AttachConsole message"),
        "{status:?}"
    );
    assert!(
        !guest.received().contains(&b'x'),
        "no byte of the refused frame reached the guest"
    );

    // ReadHistory requests that announce 100 bytes and send 95 are ended after body_timeout.
    wait_for("no remote call in progress", || {
        remote_calls(&daemon) == 0.0
    })
    .await;
    let partial = {
        let (address, token) = (daemon.tcp, token.clone());
        let message = vec![0u8; 100];
        tokio::task::spawn_blocking(move || {
            let path = "/conlog.v1.Console/ReadHistory";
            raw_h2_calls(address, &token, path, &message, 4, 0x7fff_ffff, 5)
        })
        .await
        .unwrap()
    };
    wait_for("the partial requests to be admitted", || {
        remote_calls(&daemon) == 4.0
    })
    .await;
    wait_for("the partial requests to be ended", || {
        remote_calls(&daemon) == 0.0
    })
    .await;
    drop(partial);
}
