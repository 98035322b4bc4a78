//! Node protection limits: each refusal is `RESOURCE_EXHAUSTED` naming its config key, nothing
//! already logged is touched, and the limit frees up again when the load goes away.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;

use conlog::proto::{self, attach::Mode, LogMode};
use std::time::{Duration, Instant};
use support::*;
use tonic::Code;

/// Asserts `result` is `RESOURCE_EXHAUSTED` naming `limit`.
fn expect_limit<T: std::fmt::Debug>(result: Result<T, tonic::Status>, limit: &str) {
    let message = expect_code(result, Code::ResourceExhausted, limit);
    assert!(message.contains(limit), "{limit}: {message}");
}

/// `limits.calls_per_connection`, `limits.remote_calls_total` and `limits.calls_total`: the
/// call over a limit is refused, other connections (per-connection limit) and health checks are
/// not, the local socket's budget is its own (TCP at its limit takes nothing from it, nor the
/// other way round), and a finished call frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_limited_per_connection_and_in_total() {
    let daemon = Daemon::start_with(
        Some("limits:\n  calls_per_connection: 3\n  calls_total: 5\n  remote_calls_total: 4\n"),
        &[],
    )
    .await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    write_and_close(pipe, b"hello\n".to_vec()).await;
    wait_closed(&mut agent, "vm1", "qemu", 6).await;
    drop(agent);

    // Channels (and their tokens: IssueToken is a call too) are made before the limits bite.
    let one = daemon.tcp_channel("vm1").await;
    let three = daemon.tcp_channel("vm1").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            follower(one.clone(), "vm1")
                .await
                .expect("within the limit"),
        );
    }
    expect_limit(
        follower(one.clone(), "vm1").await,
        "limits.calls_per_connection",
    );
    // Another TCP connection may open calls until TCP's total is reached: 3 + 1 = 4.
    held.push(follower(three.clone(), "vm1").await.unwrap());
    expect_limit(
        three
            .clone()
            .console()
            .read_history(follow_request("vm1"))
            .await,
        "limits.remote_calls_total",
    );

    // The local socket is not charged for any of them: 5 calls of its own, then its limit.
    let two = local_channel(&daemon).await;
    let four = local_channel(&daemon).await;
    let mut local = Vec::new();
    for channel in [&two, &two, &two, &four, &four] {
        local.push(
            follower(channel.clone(), "vm1")
                .await
                .expect("the local budget is untouched by TCP's calls"),
        );
    }
    expect_limit(follower(four.clone(), "vm1").await, "limits.calls_total");
    // And a full local budget takes nothing from TCP: a TCP place freed is TCP's again.
    held.pop();
    let deadline = Instant::now() + DEADLINE;
    loop {
        match follower(three.clone(), "vm1").await {
            Ok(stream) => {
                held.push(stream);
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    status.message().contains("limits.remote_calls_total"),
                    "{status:?}"
                );
                assert!(
                    Instant::now() < deadline,
                    "TCP place never freed: {status:?}"
                );
                tokio::time::sleep(POLL).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    // Health checks are never counted or refused: with both limits reached, a check on the
    // connection at its own limit and one on a new connection are answered, and a health
    // `Watch` held open takes no place (below, a freed place is enough for a new call).
    let health_check = |channel| async move {
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
    };
    health_check(one.clone())
        .await
        .expect("health check on a connection at limits.calls_per_connection");
    health_check(tonic::service::interceptor::InterceptedService::new(
        daemon.plain_tcp_channel().await,
        Bearer(None),
    ))
    .await
    .expect("health check at limits.remote_calls_total");
    let mut health_watch =
        tonic_health::pb::health_client::HealthClient::new(daemon.plain_tcp_channel().await)
            .watch(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health Watch at limits.remote_calls_total")
            .into_inner();
    bounded("the first health Watch answer", health_watch.message())
        .await
        .expect("health Watch answers");

    // A finished call frees its place (the count drops when its stream is gone): one place
    // freed on connection `one`, which is then at 2 of 3 and TCP's total at 3 of 4.
    held.remove(0);
    let deadline = Instant::now() + DEADLINE;
    let again = loop {
        match follower(one.clone(), "vm1").await {
            Ok(stream) => break stream,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(Instant::now() < deadline, "places never freed: {status:?}");
                tokio::time::sleep(POLL).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    // That took the last place again (the held health Watch did not count).
    expect_limit(follower(two.clone(), "vm1").await, "limits.calls_total");
    drop(health_watch);
    drop(again);
}

/// `limits.message_size`: a message over it is `RESOURCE_EXHAUSTED` naming it, for a unary
/// call and inside an `AttachConsole` stream; one at the limit's edge passes; the guest gets
/// exactly the accepted bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_size_limit_are_refused() {
    let daemon = Daemon::start_with(Some("limits:\n  message_size: 4KiB\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm1").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm1", "serial0", true).await;

    let mut request = watch_request("vm1", Mode::ReadWrite);
    request.force = true;
    let session = watch(daemon.tcp_channel("vm1").await, request)
        .await
        .unwrap();
    let id = session.attached.session_id.clone();
    // The request's other fields and protobuf framing take a few bytes of the 4 KiB.
    let fits = pattern(0, 4000);
    assert_eq!(
        send_input(daemon.tcp_channel("vm1").await, &id, &fits)
            .await
            .unwrap(),
        4000
    );
    expect_limit(
        send_input(daemon.tcp_channel("vm1").await, &id, &pattern(0, 5000)).await,
        "limits.message_size",
    );
    // The same over the local socket.
    expect_limit(
        send_input(local_channel(&daemon).await, &id, &pattern(0, 5000)).await,
        "limits.message_size",
    );
    drop(session);
    wait_clients(&mut agent, "vm1", "serial0", 0).await;

    // Inside a stream: the call ends with the status; nothing of the big frame is typed.
    let mut attach_request = attach("vm1", Mode::ReadWrite);
    attach_request.force = true;
    let mut writer = Session::attach(daemon.tcp_channel("vm1").await, attach_request)
        .await
        .unwrap();
    writer.send(b"small").await;
    writer.send(&pattern(0, 8000)).await;
    let status = writer.wait_end().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limits.message_size"),
        "{status:?}"
    );
    let mut expected = fits.clone();
    expected.extend_from_slice(b"small");
    // Nothing of the refused frame arrives: input is typed in order, so whatever of it the
    // daemon passed on would reach the guest before a marker typed by the next writer.
    let mut next_request = attach("vm1", Mode::ReadWrite);
    next_request.force = true;
    let next = Session::attach(daemon.tcp_channel("vm1").await, next_request)
        .await
        .unwrap();
    next.send(b"<marker>").await;
    expected.extend_from_slice(b"<marker>");
    let received = guest
        .wait_until("the marker", |r| contains(r, b"<marker>"))
        .await;
    assert_same("the guest's input", received, &expected);
}

/// `limits.total_log_bytes`: streams whose caps would exceed it are refused; existing ones log
/// on; removing a guest frees its share; a restart restores everything even over the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sum_of_log_caps_is_bounded() {
    // Each stream: 256 KiB × (1 + 1 backup) = 512 KiB; the budget holds two.
    let mut daemon = Daemon::start_with(
        Some("logs:\n  max_size: 256KiB\n  max_backups: 1\nlimits:\n  total_log_bytes: 1MiB\n"),
        &[],
    )
    .await;
    let mut agent = daemon.agent().await;
    let (_, first) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    open_console(&mut agent, "vm2").await;
    expect_limit(
        create_pipe(&mut agent, "vm3", "qemu", None).await,
        "limits.total_log_bytes",
    );
    expect_limit(
        create_console(&mut agent, "vm1", "serial0", None).await,
        "limits.total_log_bytes",
    );
    // A smaller cap that fits is fine... no: the budget is full, even 4 KiB is over it.
    expect_limit(
        create_pipe(
            &mut agent,
            "vm3",
            "qemu",
            Some(limits(4096, 0, LogMode::Truncate)),
        )
        .await,
        "limits.total_log_bytes",
    );
    // Raising an existing stream's cap is refused too; lowering it frees room.
    expect_limit(
        create_pipe(
            &mut agent,
            "vm1",
            "qemu",
            Some(limits(1 << 20, 1, LogMode::Rotate)),
        )
        .await,
        "limits.total_log_bytes",
    );
    create_pipe(
        &mut agent,
        "vm1",
        "qemu",
        Some(limits(128 << 10, 1, LogMode::Rotate)),
    )
    .await
    .expect("lowering a cap");
    create_pipe(
        &mut agent,
        "vm3",
        "qemu",
        Some(limits(256 << 10, 0, LogMode::Truncate)),
    )
    .await
    .expect("fits in the room freed");

    // The first stream still logs.
    // (The stream keeps a writer: the pipes of the two CreateLogPipe calls above wait for
    // their hand-off.)
    write_and_close(first, b"still logging\n".to_vec()).await;
    wait_offset(&mut agent, "vm1", "qemu", 14).await;
    assert_eq!(
        read_log(&daemon.log_dir(), "vm1", "qemu"),
        b"still logging\n"
    );

    // Removing vm2 frees its 512 KiB.
    agent
        .remove_guest(proto::RemoveGuestRequest {
            guest: "vm2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    open_console(&mut agent, "vm4").await;

    // A restart with a smaller budget restores every stream, and refuses new ones.
    daemon.stop().await;
    let config = daemon.data_dir().parent().unwrap().join("config.yaml");
    std::fs::write(
        &config,
        "logs:\n  max_size: 256KiB\n  max_backups: 1\nlimits:\n  total_log_bytes: 64KiB\n",
    )
    .unwrap();
    daemon.restart().await;
    let mut agent = daemon.agent().await;
    let listed = agent
        .list_guests(proto::ListGuestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.guests.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["vm1", "vm3", "vm4"]);
    expect_limit(
        create_pipe(&mut agent, "vm5", "qemu", None).await,
        "limits.total_log_bytes",
    );
}

/// `limits.guests`, `limits.streams_per_guest` and `limits.pending_handoffs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_streams_and_handoffs_are_limited() {
    let daemon = Daemon::start_with(
        Some("limits:\n  guests: 2\n  streams_per_guest: 2\n  pending_handoffs: 3\n"),
        &[],
    )
    .await;
    let mut agent = daemon.agent().await;
    let first = create_pipe(&mut agent, "vm1", "qemu", None).await.unwrap();
    create_pipe(&mut agent, "vm1", "other", None).await.unwrap();
    expect_limit(
        create_pipe(&mut agent, "vm1", "third", None).await,
        "limits.streams_per_guest",
    );
    create_pipe(&mut agent, "vm2", "qemu", None).await.unwrap();
    expect_limit(
        create_pipe(&mut agent, "vm3", "qemu", None).await,
        "limits.guests",
    );
    // Three hand-offs are pending (none was claimed): another pipe, even on an existing
    // stream, is refused until one is claimed.
    expect_limit(
        create_pipe(&mut agent, "vm2", "qemu", None).await,
        "limits.pending_handoffs",
    );
    let pipe = claim(&first).await.expect("claim a pending hand-off");
    create_pipe(&mut agent, "vm2", "qemu", None)
        .await
        .expect("a hand-off place was freed");
    drop(pipe);
    let listed = agent
        .list_guests(proto::ListGuestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.guests.len(), 2);
}

/// `limits.input_rate`: a writer typing faster is paced, never dropped. The guest never
/// receives more than the one-second burst plus the rate times the time elapsed (an upper
/// bound, which a slow machine can only make easier to meet), and in the end it has every byte
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_is_paced_to_the_rate_without_loss() {
    const RATE: usize = 16 << 10;
    let daemon = Daemon::start_with(Some("limits:\n  input_rate: 16KiB\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm1").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm1", "serial0", true).await;
    let writer = Session::attach(
        daemon.tcp_channel("vm1").await,
        attach("vm1", Mode::ReadWrite),
    )
    .await
    .unwrap();
    let data = pattern(0, 3 * RATE);
    let start = Instant::now();
    let sender = {
        let input = writer.input();
        let data = data.clone();
        tokio::spawn(async move {
            for chunk in data.chunks(1024) {
                input.send(chunk).await;
            }
        })
    };
    let mut samples = 0;
    while guest.received().len() < data.len() {
        guest.read_some(Duration::from_millis(100)).await;
        let allowed = RATE + (RATE as f64 * start.elapsed().as_secs_f64()) as usize + 1024;
        assert!(
            guest.received().len() <= allowed,
            "{} bytes after {:?}: faster than the rate allows ({allowed})",
            guest.received().len(),
            start.elapsed()
        );
        samples += 1;
        assert!(start.elapsed() < DEADLINE, "input never arrived");
    }
    assert!(samples > 3, "too few samples to see pacing");
    assert!(guest.received() == data.as_slice(), "input bytes differ");
    sender.await.unwrap();
    drop(writer);
}

/// A token signed by the daemon's own key (`<data_dir>/state/token.key`, hex), whose payload
/// is `payload_json`: lets a test make tokens the daemon would accept but for one property.
fn sign_token(daemon: &Daemon, payload_json: &[u8]) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let hex = std::fs::read_to_string(daemon.data_dir().join("state/token.key")).unwrap();
    let hex = hex.trim();
    let key: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let signed = format!("conlog1.{}", URL_SAFE_NO_PAD.encode(payload_json));
    let mac = ring::hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
}

/// The JSON payload of a token issued by the daemon.
fn payload_of(token: &str) -> Vec<u8> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("conlog1.<payload>.<mac>");
    URL_SAFE_NO_PAD.decode(payload).unwrap()
}

/// A following `ReadHistory` of `vm1` over a new TCP connection with `token`: its first reply
/// or the status that ended it.
async fn follow_with(daemon: &Daemon, token: &str) -> Result<(), tonic::Status> {
    let mut client = with_token(daemon.plain_tcp_channel().await, token).console();
    let mut stream = client
        .read_history(follow_request("vm1"))
        .await?
        .into_inner();
    stream.message().await.map(drop)
}

/// Oversized credentials are refused without harm: a token longer than 1 KiB is refused even
/// when its signature is valid (its JSON is padded with blanks, which the grant's parser would
/// accept), a header list over 16 KiB is refused even when it carries a valid token, and the
/// daemon serves the next call. Just under each bound, the same credentials are accepted, so
/// what is refused is the size and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_tokens_are_refused() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    write_and_close(pipe, b"hello\n".to_vec()).await;
    wait_closed(&mut agent, "vm1", "qemu", 6).await;

    let issued = daemon
        .token("vm1", "", proto::Access::ReadWrite, 3600)
        .await;
    let payload = payload_of(&issued);
    assert_eq!(
        sign_token(&daemon, &payload),
        issued,
        "the test signs as the daemon does"
    );
    let padded = |len: usize| {
        let mut json = payload.clone();
        let mut token = sign_token(&daemon, &json);
        while token.len() < len {
            json.push(b' ');
            token = sign_token(&daemon, &json);
        }
        token
    };
    let fits = padded(1024);
    assert_eq!(fits.len(), 1024, "base64 grows by whole characters");
    follow_with(&daemon, &fits)
        .await
        .expect("a valid 1024-byte token");
    let over = padded(1025);
    let status = follow_with(&daemon, &over)
        .await
        .expect_err("a valid token of 1025 bytes");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("1024"), "{status:?}");

    // A valid token beside other headers: 15 KiB of them pass, 17 KiB are refused (HTTP/2
    // answers 431 before gRPC sees the call, which tonic reports as UNKNOWN).
    let with_header = |size: usize| {
        let daemon = &daemon;
        let issued = issued.clone();
        async move {
            let mut request = tonic::Request::new(follow_request("vm1"));
            request
                .metadata_mut()
                .insert("x-padding", "x".repeat(size).parse().unwrap());
            let mut client = with_token(daemon.plain_tcp_channel().await, &issued).console();
            let mut stream = client.read_history(request).await?.into_inner();
            stream.message().await.map(drop)
        }
    };
    with_header(15 << 10)
        .await
        .expect("a valid token beside 15 KiB of headers");
    let status = with_header(17 << 10)
        .await
        .expect_err("a valid token beside 17 KiB of headers");
    assert!(
        status.code() == Code::Unknown && status.message().contains("431"),
        "{status:?}"
    );
    follower(daemon.tcp_channel("vm1").await, "vm1")
        .await
        .expect("served after the oversized calls");
}

/// `limits.tcp_connections`: connections over it are closed at once (idle ones count, as a
/// TLS handshake that never finishes would); a closed connection gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_limited() {
    let daemon = Daemon::start_with(Some("limits:\n  tcp_connections: 2\n"), &[]).await;
    let health = |channel| async move {
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
    };
    let first = tokio::net::TcpStream::connect(daemon.tcp).await.unwrap();
    let second = tokio::net::TcpStream::connect(daemon.tcp).await.unwrap();
    // The third is accepted by the kernel and closed by the daemon.
    let result = async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", daemon.tcp))
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        health(channel).await
    }
    .await;
    assert!(result.is_err(), "a third connection was served: {result:?}");
    let deadline = Instant::now() + DEADLINE;
    while !daemon.stderr().contains("limits.tcp_connections reached") {
        assert!(
            Instant::now() < deadline,
            "no warning:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(POLL).await;
    }

    drop(first);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match health(daemon.plain_tcp_channel().await).await {
            Ok(_) => break,
            Err(status) => {
                assert!(Instant::now() < deadline, "place never freed: {status:?}");
                tokio::time::sleep(POLL).await;
            }
        }
    }
    drop(second);
}
