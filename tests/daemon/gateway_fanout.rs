//! Fan-out at the gateway (docs/gateway.md, "Fan-out"): read-only watchers of one console
//! through one `conlog-gateway` share one upstream stream, against real binaries on loopback.
//! The node must see one client however many watch; each watcher gets every byte in order or
//! is told exactly what it missed, exactly as a node's own watchers are.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes and offsets in tests are small numbers"
)]

use crate::support;

use conlog::proto::{self, attach::Mode, server_frame::Frame, Access, RemoveGuestRequest};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use support::*;
use tokio::time::Instant;
use tonic::Code;

/// The byte every test guest writes at `offset`: a watcher can check each byte it gets.
fn pattern(offset: u64) -> u8 {
    b'a' + (offset % 26) as u8
}

fn pattern_range(from: u64, to: u64) -> Vec<u8> {
    (from..to).map(pattern).collect()
}

/// `frames` checking every output byte against [`pattern`], keeping none.
fn checked(mut frames: Frames) -> Frames {
    frames.keep_output = false;
    frames.check_output = Some(Box::new(|offset, data| {
        for (i, byte) in data.iter().enumerate() {
            assert_eq!(
                *byte,
                pattern(offset + i as u64),
                "byte at {}",
                offset + i as u64
            );
        }
    }));
    frames
}

/// The fan-out settings of these tests: a short linger, small queues and ring.
const FANOUT: &str =
    "  fanout:\n    linger: 1s\n    watcher_queue: 128KiB\n    replay_bytes: 64KiB\n";

/// A guest writing [`pattern`] bytes, counting them.
struct Writer {
    guest: FakeGuest,
    written: u64,
}

impl Writer {
    async fn write(&mut self, len: u64) {
        let data = pattern_range(self.written, self.written + len);
        self.guest.write(&data).await;
        self.written += len;
    }
}

/// A read-only watch of `vm1` through `channel`: WatchConsole or AttachConsole.
async fn read_only(channel: ConsoleChannel, attach_call: bool, replay_bytes: u64) -> Frames {
    if attach_call {
        let mut request = attach("vm1", Mode::ReadOnly);
        request.replay_bytes = replay_bytes;
        let session = Session::attach(channel, request)
            .await
            .expect("a read-only AttachConsole through the gateway");
        session.into_frames()
    } else {
        let mut request = watch_request("vm1", Mode::ReadOnly);
        request.replay_bytes = replay_bytes;
        watch(channel, request)
            .await
            .expect("a read-only WatchConsole through the gateway")
    }
}

/// 22 watchers (WatchConsole and AttachConsole, each on its own connection) of one console
/// through one gateway: the node serves one client; every watcher that reads gets every byte
/// in order, none is told of a gap; one that stops reading is skipped ahead and told exactly
/// what it missed, without delaying the others; late watchers get the ring's recent bytes by
/// `replay_bytes` (at most the ring, `attached.offset` saying where they start); the upstream
/// closes after the last watcher left, and a new one starts from the node's replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_share_one_upstream_and_each_gets_every_byte_or_its_gap() {
    let pki = Pki::new();
    let node = pki.node(false).await;
    let gateway = Gateway::start_with(&pki, "3s", FANOUT).await;
    let mut writer = Writer {
        guest: console_with_guest(&node, "vm1").await,
        written: 0,
    };
    writer.write(1000).await;
    let token = node.token("vm1", "", Access::Read, 600).await;
    let mut agent = node.agent().await;

    // The reference watcher, read in step with the guest's writes.
    let mut reference =
        checked(read_only(pki.client(gateway.address, &token).await, false, 1000).await);
    assert_eq!(reference.attached.offset, 0, "{:?}", reference.attached);
    assert!(reference.attached.guest_connected);
    reference.wait_offset(1000).await;
    // 20 more that read on their own, half of them AttachConsole.
    let end = Arc::new(AtomicU64::new(u64::MAX));
    let mut readers = Vec::new();
    for i in 0..20 {
        let frames =
            checked(read_only(pki.client(gateway.address, &token).await, i % 2 == 1, 0).await);
        let end = end.clone();
        readers.push(tokio::spawn(async move {
            let mut frames = frames;
            while frames.next_offset < end.load(Ordering::SeqCst) {
                frames.next().await.expect("a reading watcher's stream");
            }
            frames
        }));
    }
    // One that stops reading: a small HTTP/2 window, so the gateway's queue for it fills.
    let slow_channel = with_token(
        bounded(
            "connect",
            pki.endpoint(gateway.address, false)
                .initial_stream_window_size(16 << 10)
                .connect(),
        )
        .await
        .unwrap(),
        &token,
    );
    let slow = checked(read_only(slow_channel, false, 0).await);

    // The node sees one client: the gateway's shared stream.
    let info = wait_clients(&mut agent, "vm1", DEVICE, 1).await;
    assert_eq!(info.attached.len(), 1, "{:?}", info.attached);
    assert!(
        info.attached[0].contains("token read"),
        "{:?}",
        info.attached
    );

    // 2 MiB in steps of 64 KiB, each read by the reference watcher before the next: the
    // shared stream itself never falls behind the node.
    const STEP: u64 = 64 << 10;
    for _ in 0..32 {
        writer.write(STEP).await;
        reference.wait_offset(writer.written).await;
    }
    // The slow watcher reads again: its backlog, then the gap, then live bytes.
    let slow = tokio::spawn(async move {
        let mut slow = slow;
        let lagged = slow
            .wait_event("lagged", |f| matches!(f, Frame::Lagged(_)))
            .await;
        let Frame::Lagged(lagged) = lagged else {
            unreachable!()
        };
        slow.wait_offset(lagged.to_offset + 1).await;
        slow
    });
    let deadline = Instant::now() + DEADLINE;
    while !slow.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the slow watcher never caught up"
        );
        writer.write(STEP).await;
        reference.wait_offset(writer.written).await;
    }
    let mut slow = slow.await.expect("the slow watcher's task");
    end.store(writer.written + 100, Ordering::SeqCst);
    writer.write(100).await;
    reference.wait_offset(writer.written).await;
    slow.wait_offset(writer.written).await;
    assert!(!slow.lagged().is_empty());
    let (from, to) = slow.lagged()[0];
    assert!(from < to && to <= writer.written, "{from}..{to}");
    for reader in readers {
        let frames = reader.await.expect("a reading watcher");
        assert_eq!(frames.next_offset, writer.written);
        assert_eq!(frames.output_bytes, writer.written - frames.attached.offset);
        assert!(frames.lagged().is_empty(), "{:?}", frames.lagged());
    }
    assert!(reference.lagged().is_empty(), "{:?}", reference.lagged());
    assert_eq!(reference.output_bytes, writer.written);
    let info = wait_clients(&mut agent, "vm1", DEVICE, 1).await;
    assert_eq!(info.attached.len(), 1, "{:?}", info.attached);

    // A late watcher starts from the shared stream's recent bytes ...
    let mut late = read_only(pki.client(gateway.address, &token).await, false, 100).await;
    assert_eq!(late.attached.offset, writer.written - 100);
    late.wait_offset(writer.written).await;
    assert_eq!(
        late.output,
        pattern_range(writer.written - 100, writer.written)
    );
    // ... at most the ring (gateway.fanout.replay_bytes: 64KiB here), whose start it is told.
    let mut longer =
        checked(read_only(pki.client(gateway.address, &token).await, true, 1 << 20).await);
    assert_eq!(longer.attached.offset, writer.written - (64 << 10));
    longer.wait_offset(writer.written).await;
    assert_eq!(longer.output_bytes, 64 << 10);
    // Both live, on the same one upstream stream.
    writer.write(10).await;
    late.wait_offset(writer.written).await;
    longer.wait_offset(writer.written).await;
    assert_eq!(
        wait_clients(&mut agent, "vm1", DEVICE, 1)
            .await
            .attached
            .len(),
        1
    );

    // The upstream closes after the last watcher left (gateway.fanout.linger: 1s) ...
    drop((reference, slow, late, longer));
    wait_clients(&mut agent, "vm1", DEVICE, 0).await;
    assert!(
        gateway.log().contains("its last watcher left"),
        "{}",
        gateway.log()
    );
    // ... and the next watcher opens a new one, starting from the node's replay.
    let mut again = read_only(pki.client(gateway.address, &token).await, true, 50).await;
    assert_eq!(again.attached.offset, writer.written - 50);
    again.wait_offset(writer.written).await;
    assert_eq!(
        again.output,
        pattern_range(writer.written - 50, writer.written)
    );
    wait_clients(&mut agent, "vm1", DEVICE, 1).await;
}

/// Each watcher's own token is checked at the gateway: a token for another guest opens
/// nothing; an expired token is refused for a new watch while the watch it opened goes on (as
/// on a node) and nobody else notices; replacing the cluster key ends every watcher with
/// `UNAUTHENTICATED`, and the shared stream with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_watcher_is_judged_by_its_own_token() {
    let pki = Pki::new();
    let node = pki.node(false).await;
    // A shared stream with no watcher would stay 10 minutes: only its own token's revocation
    // can end it within the test.
    let gateway =
        Gateway::start_with(&pki, "3s", &FANOUT.replace("linger: 1s", "linger: 10m")).await;
    let mut writer = Writer {
        guest: console_with_guest(&node, "vm1").await,
        written: 0,
    };
    let _vm2 = console_with_guest(&node, "vm2").await;
    writer.write(20).await;
    let mut agent = node.agent().await;

    // A token for vm2 watching vm1: refused, and no stream of vm1 was opened for it.
    let other = node.token("vm2", "", Access::Read, 600).await;
    for attach_call in [false, true] {
        let refused = if attach_call {
            Session::attach(
                pki.client(gateway.address, &other).await,
                attach("vm1", Mode::ReadOnly),
            )
            .await
            .map(Session::into_frames)
        } else {
            watch(
                pki.client(gateway.address, &other).await,
                watch_request("vm1", Mode::ReadOnly),
            )
            .await
        };
        let message = expect_code(refused, Code::PermissionDenied, "vm1 with vm2's token");
        assert!(message.contains("vm2"), "{message}");
    }
    assert!(
        !gateway.log().contains("shared stream opened"),
        "{}",
        gateway.log()
    );

    let short = node.token("vm1", "", Access::Read, 1).await;
    let long = node.token("vm1", "", Access::Read, 600).await;
    let mut short_watch = read_only(pki.client(gateway.address, &short).await, false, 20).await;
    let mut long_watch = read_only(pki.client(gateway.address, &long).await, true, 20).await;
    short_watch.wait_offset(20).await;
    long_watch.wait_offset(20).await;
    // Expired: a new watch with it is refused at the gateway ...
    let deadline = Instant::now() + DEADLINE;
    loop {
        let again = watch(
            pki.client(gateway.address, &short).await,
            watch_request("vm1", Mode::ReadOnly),
        )
        .await;
        if let Err(status) = again {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            assert!(status.message().contains("expired"), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "a 1s token never expired");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // ... the watch it opened, and the other, go on.
    writer.write(30).await;
    short_watch.wait_offset(50).await;
    long_watch.wait_offset(50).await;
    assert_eq!(short_watch.output, pattern_range(0, 50));
    assert_eq!(long_watch.output, pattern_range(0, 50));
    assert_eq!(
        wait_clients(&mut agent, "vm1", DEVICE, 1)
            .await
            .attached
            .len(),
        1
    );

    // A new cluster key: every token of the old one is revoked, each open watch ends for its
    // own token ...
    pki.write("cluster.key", &format!("{}\n", "a5".repeat(32)));
    for frames in [&mut short_watch, &mut long_watch] {
        let ended = frames.wait_end().await;
        assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
        assert!(
            ended.message().contains("Token refused")
                && ended
                    .message()
                    .contains("cluster key changed during the call"),
            "{ended:?}"
        );
    }
    // ... and the shared stream for its own, at once (not after its linger): the node sees no
    // client.
    wait_clients(&mut agent, "vm1", DEVICE, 0).await;
    assert!(
        gateway
            .log()
            .contains("own token of this console's shared stream is refused"),
        "{}",
        gateway.log()
    );
}

/// `gateway.fanout.watchers_per_stream` and `gateway.fanout.streams` refuse naming their key
/// (a read-write watch is forwarded as ever); the guest's removal ends every watcher with the
/// node's own status, over gRPC-web with the same frames and trailers as straight from the node;
/// and with `gateway.fanout.enabled: false` every watcher is the node's client again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_refuse_naming_their_key_and_removal_ends_watchers_as_on_the_node() {
    let pki = Pki::new();
    let node = pki.node(false).await;
    let gateway = Gateway::start_with(
        &pki,
        "3s",
        &format!("{FANOUT}    watchers_per_stream: 2\n    streams: 1\n"),
    )
    .await;
    let mut vm1 = console_with_guest(&node, "vm1").await;
    let _vm2 = console_with_guest(&node, "vm2").await;
    vm1.write(b"before removal\n").await;
    let token = node.token("vm1", "", Access::Read, 600).await;
    let token_vm2 = node.token("vm2", "", Access::ReadWrite, 600).await;
    let mut agent = node.agent().await;

    let first = read_only(pki.client(gateway.address, &token).await, false, 100).await;
    let mut second = read_only(pki.client(gateway.address, &token).await, true, 100).await;
    let third = watch(
        pki.client(gateway.address, &token).await,
        watch_request("vm1", Mode::ReadOnly),
    )
    .await;
    let message = expect_code(third, Code::ResourceExhausted, "a third watcher");
    assert!(
        message.contains("gateway.fanout.watchers_per_stream"),
        "{message}"
    );
    let refused = watch(
        pki.client(gateway.address, &token_vm2).await,
        watch_request("vm2", Mode::ReadOnly),
    )
    .await;
    let message = expect_code(refused, Code::ResourceExhausted, "a second shared stream");
    assert!(message.contains("gateway.fanout.streams"), "{message}");
    let forwarded = watch(
        pki.client(gateway.address, &token_vm2).await,
        watch_request("vm2", Mode::ReadWrite),
    )
    .await
    .expect("a read-write watch is forwarded");
    assert!(forwarded.attached.writer);
    drop(forwarded);

    // The guest's removal ends every watcher with the node's status. gRPC-web watches with
    // replay, one through the gateway (on a shared stream opened anew), one straight at the
    // node: the same frames (but each call's session id) and the same trailers.
    second.wait_output(b"before removal\n").await;
    drop((first, second));
    wait_clients(&mut agent, "vm1", DEVICE, 0).await;
    let mut native = read_only(pki.client(gateway.address, &token).await, false, 0).await;
    wait_clients(&mut agent, "vm1", DEVICE, 1).await;
    let web = |port: u16| {
        use prost::Message;
        let message = proto::WatchConsoleRequest {
            guest: "vm1".into(),
            mode: Mode::ReadOnly.into(),
            replay_bytes: 15,
            ..Default::default()
        }
        .encode_to_vec();
        let mut body = vec![0u8];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
        let mut request = format!(
            "POST /conlog.v1.Console/WatchConsole HTTP/1.1\r\nhost: localhost:{port}\r\n\
             origin: https://localhost:{port}\r\n\
             content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
             authorization: Bearer {token}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        request
    };
    let (to_gateway, to_node) = (web(gateway.address.port()), web(node.tcp.port()));
    let (via_gateway, via_node, ()) = tokio::join!(
        https_http1(&pki, gateway.address, &to_gateway),
        https_http1(&pki, node.tcp, &to_node),
        async {
            // The direct one attached (the gateway's shared stream is the other client); the
            // gateway's web watcher joins a stream that is open already.
            wait_clients(&mut agent, "vm1", DEVICE, 2).await;
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            bounded(
                "RemoveGuest",
                node.agent().await.remove_guest(RemoveGuestRequest {
                    guest: "vm1".into(),
                    ..Default::default()
                }),
            )
            .await
            .expect("RemoveGuest");
        }
    );
    let (gateway_frames, gateway_trailers) = grpc_web_frames(&via_gateway);
    let (node_frames, node_trailers) = grpc_web_frames(&via_node);
    assert!(node_trailers.contains("grpc-status:5"), "{node_trailers}");
    assert_eq!(gateway_trailers, node_trailers);
    assert_eq!(
        gateway_frames.len(),
        node_frames.len(),
        "{gateway_frames:?} {node_frames:?}"
    );
    for (g, n) in gateway_frames.iter().zip(&node_frames) {
        match (&g.frame, &n.frame) {
            (Some(Frame::Attached(g)), Some(Frame::Attached(n))) => {
                assert_eq!(
                    (g.offset, g.writer, g.guest_connected, g.serial_break),
                    (n.offset, n.writer, n.guest_connected, n.serial_break)
                );
                assert!(!g.session_id.is_empty());
            }
            _ => assert_eq!(g, n),
        }
    }
    assert!(gateway_frames
        .iter()
        .any(|f| matches!(&f.frame, Some(Frame::Output(o)) if &o.data[..] == b"before removal\n")));
    let ended = native.wait_end().await;
    assert_eq!(ended.code(), Code::NotFound, "{ended:?}");

    // Fan-out off: each watcher is a client of the node.
    let plain = Gateway::start_with(&pki, "3s", "  fanout:\n    enabled: false\n").await;
    let token_vm2_read = node.token("vm2", "", Access::Read, 600).await;
    let mut watchers = Vec::new();
    for _ in 0..3 {
        watchers.push(
            watch(
                pki.client(plain.address, &token_vm2_read).await,
                watch_request("vm2", Mode::ReadOnly),
            )
            .await
            .expect("a forwarded watch"),
        );
    }
    wait_clients(&mut agent, "vm2", DEVICE, 3).await;
}

/// The `ServerFrame`s and the trailer text of a gRPC-web (binary) response.
fn grpc_web_frames(response: &[u8]) -> (Vec<proto::ServerFrame>, String) {
    use prost::Message;
    let text = String::from_utf8_lossy(response);
    assert!(response.starts_with(b"HTTP/1.1 200"), "{text}");
    let mut body = dechunk(body_of(response));
    let mut frames = Vec::new();
    let mut trailers = String::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let payload = &body[5..5 + len];
        if body[0] & 0x80 != 0 {
            trailers = String::from_utf8_lossy(payload).into_owned();
        } else {
            frames.push(proto::ServerFrame::decode(payload).expect("a ServerFrame"));
        }
        body = body[5 + len..].to_vec();
    }
    (frames, trailers)
}

/// An HTTP/1.1 chunked body, joined.
fn dechunk(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            std::str::from_utf8(&rest[..line_end])
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .expect("a chunk size");
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        out.extend_from_slice(&rest[start..start + size]);
        rest = &rest[start + size + 2..];
    }
}

/// `gateway.fanout.*` have their defaults (`--print-config`), and a value out of range is
/// refused at start naming its key and the rule.
#[test]
fn fanout_settings_have_defaults_and_bad_values_are_refused_naming_the_key() {
    let pki = Pki::new();
    let print = |extra: &str| {
        let config = pki.write("fanout.yaml", &(pki.gateway_yaml("3s") + extra));
        std::process::Command::new(gateway_bin())
            .arg("--config")
            .arg(&config)
            .arg("--print-config")
            .output()
            .unwrap()
    };
    let output = print("");
    assert!(output.status.success(), "{output:?}");
    let printed: serde_yaml::Value = serde_yaml::from_slice(&output.stdout).unwrap();
    let fanout = &printed["gateway"]["fanout"];
    assert_eq!(fanout["enabled"], true);
    assert_eq!(fanout["streams"], 1024);
    assert_eq!(fanout["watchers_per_stream"], 1024);
    assert_eq!(fanout["replay_bytes"], "256KiB");
    assert_eq!(fanout["watcher_queue"], "1MiB");
    assert_eq!(fanout["linger"], "5s");
    for (extra, key, rule) in [
        ("    streams: 0\n", "gateway.fanout.streams", "at least 1"),
        (
            "    watchers_per_stream: 0\n",
            "gateway.fanout.watchers_per_stream",
            "at least 1",
        ),
        (
            "    watcher_queue: 64KiB\n",
            "gateway.fanout.watcher_queue",
            "128KiB",
        ),
        (
            "    replay_bytes: 65MiB\n",
            "gateway.fanout.replay_bytes",
            "at most 64MiB",
        ),
        ("    linger: 11m\n", "gateway.fanout.linger", "at most 10m"),
        ("    fan_in: true\n", "fan_in", "unknown field"),
    ] {
        let output = print(&format!("  fanout:\n{extra}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra}: accepted");
        assert!(
            stderr.contains(key) && stderr.contains(rule),
            "{extra}: {stderr}"
        );
    }
}

/// The node shutting down ends every watcher with the node's own status (as a direct watcher
/// gets it: `UNAVAILABLE`, resume by offset); a watch of a node that is down is `UNAVAILABLE`
/// naming the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_going_away_ends_watchers_with_its_status_and_a_dead_node_is_named() {
    let pki = Pki::new();
    let mut node = pki.node(false).await;
    let gateway = Gateway::start_with(&pki, "3s", FANOUT).await;
    let mut guest = console_with_guest(&node, "vm1").await;
    guest.write(b"hello\n").await;
    let token = node.token("vm1", "", Access::Read, 600).await;
    let mut through = read_only(pki.client(gateway.address, &token).await, false, 6).await;
    let mut direct = read_only(pki.client(node.tcp, &token).await, false, 6).await;
    through.wait_output(b"hello\n").await;
    direct.wait_output(b"hello\n").await;

    let endpoint = endpoint_of(&node);
    node.stop().await;
    let (from_gateway, from_node) = (through.wait_end().await, direct.wait_end().await);
    assert_eq!(from_node.code(), Code::Unavailable, "{from_node:?}");
    assert_eq!(
        (from_gateway.code(), from_gateway.message()),
        (from_node.code(), from_node.message())
    );

    let refused = watch(
        pki.client(gateway.address, &token).await,
        watch_request("vm1", Mode::ReadOnly),
    )
    .await;
    let message = expect_code(refused, Code::Unavailable, "a watch of a node that is down");
    assert!(
        message.contains(&format!("Node {endpoint} is unavailable")),
        "{message}"
    );
}

/// Reads a watcher's frames until it has `want` (offsets contiguous from its first
/// `attached`, no gap); the `attached` frames it saw.
async fn every_line_once(
    mut stream: tonic::Streaming<proto::ServerFrame>,
    want: &[u8],
    who: &str,
) -> (Vec<proto::Attached>, tonic::Streaming<proto::ServerFrame>) {
    let (mut got, mut attached, mut next) = (Vec::new(), Vec::new(), None::<u64>);
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while got.len() < want.len() {
        assert!(Instant::now() < deadline, "{who}: only {} bytes", got.len());
        let frame = bounded(who, stream.message())
            .await
            .unwrap_or_else(|s| panic!("{who}: ended with {s:?} after {} bytes", got.len()))
            .unwrap_or_else(|| panic!("{who}: ended after {} bytes", got.len()));
        match frame.frame {
            Some(Frame::Attached(a)) => {
                next.get_or_insert(a.offset);
                attached.push(a);
            }
            Some(Frame::Output(out)) => {
                assert_eq!(Some(out.offset), next, "{who}: output out of place");
                next = Some(out.offset + out.data.len() as u64);
                got.extend_from_slice(&out.data);
            }
            Some(Frame::Lagged(l)) => panic!("{who}: lagged {l:?}"),
            _ => {}
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(want),
        "{who}: every line once, in order"
    );
    (attached, stream)
}

/// Several watchers share one stream across a live migration (docs/gateway.md, "Fan-out"):
/// the shared stream follows the move, each watcher sees every line once and a second
/// `attached` (the new node's), the new node serves one client, and a watcher arriving after
/// the move (its token names the old node) joins the followed stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_sharing_a_stream_follow_a_move_together() {
    let _heavy = heavy().await;
    watchers_follow(1).await;
}

/// The same across a chain of moves (A to B to C): the shared stream's token is signed for
/// each node it reaches, so no node needs to check another's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_sharing_a_stream_follow_a_chain_of_moves() {
    let _heavy = heavy().await;
    watchers_follow(2).await;
}

async fn watchers_follow(hops: usize) {
    const LINES: usize = 120;
    const WATCHERS: usize = 5;
    let (pki, daemons, gateway) = migration_fleet(hops + 1).await;
    let mut nodes = Vec::new();
    for daemon in &daemons {
        nodes.push(MigrationNode::of(daemon).await);
    }
    let guest = first_migrating_guest(&nodes[0]).await;
    let token = daemons[0]
        .token(MIGRATING_GUEST, "", Access::Read, 600)
        .await;
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let stream = bounded(
            "WatchConsole",
            pki.client(gateway.address, &token)
                .await
                .console()
                .watch_console(watch_request(MIGRATING_GUEST, Mode::ReadOnly)),
        )
        .await
        .expect("WatchConsole through the gateway")
        .into_inner();
        watchers.push(stream);
    }
    let mut agent_a = nodes[0].agent.clone();
    wait_clients(&mut agent_a, MIGRATING_GUEST, DEVICE, 1).await;

    let span = LINES / hops;
    let moves_at: Vec<usize> = (0..hops)
        .map(|hop| random_between(hop * span + 10, (hop + 1) * span - 10))
        .collect();
    eprintln!("moving at lines {moves_at:?}");
    let driver = drive_guest(guest, nodes.clone(), moves_at, LINES, None);
    let want = numbered_lines(LINES);
    let reads = watchers
        .into_iter()
        .enumerate()
        .map(|(n, stream)| {
            let want = want.clone();
            tokio::spawn(
                async move { every_line_once(stream, &want, &format!("watcher {n}")).await },
            )
        })
        .collect::<Vec<_>>();
    let mut open = Vec::new();
    for read in reads {
        let (attached, stream) = read.await.expect("a watcher's reader");
        assert_eq!(
            attached.len(),
            hops + 1,
            "one attached per node: {attached:?}"
        );
        assert!(attached.iter().all(|a| !a.writer), "{attached:?}");
        assert_ne!(
            attached[0].session_id, attached[1].session_id,
            "the second attached carries the new node's session"
        );
        open.push(stream);
    }
    let _guest = bounded("the guest driver", driver).await.expect("driver");
    let mut agent_b = nodes[hops].agent.clone();
    let info = wait_clients(&mut agent_b, MIGRATING_GUEST, DEVICE, 1).await;
    assert_eq!(info.clients, 1, "the new node serves one stream: {info:?}");

    // A late watcher with the old node's token joins the followed stream: its replay ends
    // at the new node's end, and the new node still serves one client.
    let mut late_request = watch_request(MIGRATING_GUEST, Mode::ReadOnly);
    late_request.replay_bytes = 64;
    let mut late = bounded(
        "a late WatchConsole",
        pki.client(gateway.address, &token)
            .await
            .console()
            .watch_console(late_request),
    )
    .await
    .expect("a late WatchConsole through the gateway")
    .into_inner();
    let Some(Frame::Attached(attached)) = bounded("attached", late.message())
        .await
        .expect("attached")
        .expect("a frame")
        .frame
    else {
        panic!("the late watcher's first frame is not attached");
    };
    assert_eq!(attached.offset, want.len() as u64 - 64, "{attached:?}");
    let mut replay = Vec::new();
    while replay.len() < 64 {
        match bounded("replay", late.message())
            .await
            .expect("replay")
            .expect("a frame")
            .frame
        {
            Some(Frame::Output(out)) => replay.extend_from_slice(&out.data),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(replay, want[want.len() - 64..]);
    let info = wait_clients(&mut agent_b, MIGRATING_GUEST, DEVICE, 1).await;
    assert_eq!(info.clients, 1, "{info:?}");
    let log = gateway.log();
    assert_eq!(
        log.matches("shared stream following a move").count(),
        hops,
        "one shared stream followed: {log}"
    );

    // Every watcher gone, the stream closes; a new one, opened at the old node the token
    // names, is answered with the moved status at once and follows it too.
    drop((open, late));
    wait_clients(&mut agent_b, MIGRATING_GUEST, DEVICE, 0).await;
    let mut again = watch_request(MIGRATING_GUEST, Mode::ReadOnly);
    again.replay_bytes = u64::MAX;
    let reopened = bounded(
        "a WatchConsole after the move",
        pki.client(gateway.address, &token)
            .await
            .console()
            .watch_console(again),
    )
    .await
    .expect("a WatchConsole after the move through the gateway")
    .into_inner();
    let from_move = &want[..];
    let (attached, _reopened) = every_line_once(reopened, from_move, "a new watcher").await;
    assert_eq!(attached.len(), 1, "{attached:?}");
    let info = wait_clients(&mut agent_b, MIGRATING_GUEST, DEVICE, 1).await;
    assert_eq!(info.clients, 1, "{info:?}");
}

/// A forwarded call (not fanned out) is judged as a watcher is when the cluster key file
/// changes: only the key and signature are checked again, so an expired token's follow in
/// progress goes on when the file is merely rewritten with the same key (as on a node, where
/// expiry is checked when a call starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_rewrite_does_not_end_a_forwarded_call_whose_token_expired() {
    let pki = Pki::new();
    let node = pki.node(false).await;
    let gateway = Gateway::start(&pki, "3s").await;
    let mut guest = console_with_guest(&node, "vm1").await;
    guest.write(b"hello\n").await;
    let short = node.token("vm1", "", Access::Read, 1).await;
    let mut follow = bounded(
        "ReadHistory",
        pki.client(gateway.address, &short)
            .await
            .console()
            .read_history(proto::ReadHistoryRequest {
                guest: "vm1".into(),
                start: Some(proto::read_history_request::Start::FromOffset(0)),
                follow: true,
                ..Default::default()
            }),
    )
    .await
    .expect("a follow through the gateway")
    .into_inner();
    let mut got = Vec::new();
    let mut read_until = async |follow: &mut tonic::Streaming<proto::HistoryChunk>, want: &[u8]| {
        while !got.ends_with(want) {
            let chunk = bounded("a history chunk", follow.message())
                .await
                .unwrap_or_else(|s| panic!("the follow ended with {s:?} after {got:?}"))
                .expect("the follow ended without a status");
            got.extend_from_slice(&chunk.data);
        }
    };
    read_until(&mut follow, b"hello\n").await;
    // Expired: a new call with it is refused at the gateway.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let again = watch(
            pki.client(gateway.address, &short).await,
            watch_request("vm1", Mode::ReadOnly),
        )
        .await;
        if let Err(status) = again {
            assert!(status.message().contains("expired"), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "a 1s token never expired");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The same key written again: the gateway sees a change of the file.
    let key = std::fs::read_to_string(pki.path("cluster.key")).unwrap();
    let seen = gateway.log().matches("cluster key changed").count();
    pki.write("cluster.key", &key);
    let deadline = Instant::now() + DEADLINE;
    while gateway.log().matches("cluster key changed").count() == seen {
        assert!(
            Instant::now() < deadline,
            "the gateway never saw the key file change"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The follow goes on: the change was signalled before these bytes were written.
    guest.write(b"more\n").await;
    read_until(&mut follow, b"more\n").await;
    guest.write(b"again\n").await;
    read_until(&mut follow, b"again\n").await;
}
