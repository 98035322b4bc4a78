//! `conlog-gateway` against real binaries on loopback (docs/gateway.md): conlogd nodes on
//! their own ports with TLS, gateway replicas in front of them, tonic clients through a
//! gateway.
//!
//! Every node's token key is derived from one cluster key (`conlog-gateway node-key`, then
//! SIGHUP, as an operator's provisioning does); certificates are made here with `rcgen`: one CA
//! for the servers (nodes and gateways, `localhost` and `127.0.0.1`), one for the gateway's
//! client certificate.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes and offsets in tests are small numbers"
)]

use crate::support;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use conlog::proto::{
    attach::Mode, console_client::ConsoleClient, read_history_request::Start, Access,
    ReadHistoryRequest,
};
use conlog::tokens::{Grant, TokenKey};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use support::*;
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic::Code;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token signed with `key_file`'s key (a copy is read, the node's file is left alone) for
/// `grant`.
fn signed_with(key_file: &Path, grant: Grant) -> String {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("token.key");
    std::fs::copy(key_file, &copy).unwrap();
    TokenKey::load_or_create(&copy).unwrap().issue(grant)
}

fn grant(guest: &str, node: Option<String>, expires_unix: u64) -> Grant {
    Grant {
        guest: guest.into(),
        device: None,
        access: conlog::tokens::Access::ReadWrite,
        expires_unix,
        key_id: String::new(),
        node,
        issued_unix: None,
    }
}

/// `token` with its node claim replaced (the signature kept).
fn with_node_claim(token: &str, node: &str) -> String {
    let mut parts = token.split('.');
    let (prefix, payload, mac) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let mut json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    json["n"] = node.into();
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json).unwrap());
    format!("{prefix}.{payload}.{mac}")
}

/// `ReadHistory` of `guest` through `channel` from `from`, following, until `len` bytes
/// arrived; the bytes.
async fn read_history(
    channel: ConsoleChannel,
    guest: &str,
    from: u64,
    len: usize,
) -> Result<(Vec<u8>, tonic::Streaming<conlog::proto::HistoryChunk>), tonic::Status> {
    let mut stream = bounded(
        "ReadHistory",
        ConsoleClient::new(channel).read_history(ReadHistoryRequest {
            guest: guest.into(),
            start: Some(Start::FromOffset(from)),
            follow: true,
            ..Default::default()
        }),
    )
    .await?
    .into_inner();
    let mut data = Vec::new();
    let mut next = from;
    while data.len() < len {
        let chunk = bounded("a history chunk", stream.message())
            .await?
            .expect("the follow ended early");
        assert!(chunk.gap.is_none(), "a gap: {chunk:?}");
        assert_eq!(chunk.offset, next, "chunks are contiguous");
        next += chunk.data.len() as u64;
        data.extend_from_slice(&chunk.data);
    }
    Ok((data, stream))
}

/// Three nodes with a guest `vm1` each (and `vm2` on node A), two gateways: each node's token
/// reaches its own node's guest through either gateway — WatchConsole with replay and
/// SendConsoleInput, AttachConsole typing, ReadHistory following — and nothing else: not the
/// other guest of its node, not the same-named guest of the other node, not with its node
/// claim changed, not signed by one node's key for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_reaches_its_own_nodes_guest_through_any_gateway_and_nothing_else() {
    let pki = Pki::new();
    let (a, b, c) = (
        pki.node(false).await,
        pki.node(false).await,
        pki.node(false).await,
    );
    let (g1, g2) = (
        Gateway::start(&pki, "3s").await,
        Gateway::start(&pki, "3s").await,
    );
    let mut a_vm1 = console_with_guest(&a, "vm1").await;
    let mut a_vm2 = console_with_guest(&a, "vm2").await;
    let mut b_vm1 = console_with_guest(&b, "vm1").await;
    let mut c_vm1 = console_with_guest(&c, "vm1").await;
    a_vm1.write(b"from node A\n").await;
    b_vm1.write(b"from node B\n").await;
    c_vm1.write(b"from node C\n").await;
    a_vm2.write(b"the other guest of A\n").await;

    let token_a = a.token("vm1", "", Access::ReadWrite, 600).await;
    let token_b = b.token("vm1", "", Access::ReadWrite, 600).await;

    // WatchConsole with replay through gateway 1, input through gateway 2's SendConsoleInput.
    let mut request = watch_request("vm1", Mode::ReadWrite);
    request.replay_bytes = 4096;
    let mut watched = watch(pki.client(g1.address, &token_a).await, request)
        .await
        .expect("WatchConsole through the gateway");
    watched.wait_output(b"from node A\n").await;
    assert!(!contains(&watched.output, b"node B"));
    let session = watched.attached.session_id.clone();
    let accepted = send_input(
        pki.client(g2.address, &token_a).await,
        &session,
        b"typed at A\n",
    )
    .await
    .expect("SendConsoleInput through the other gateway");
    assert_eq!(accepted, 11);
    a_vm1.wait_for(b"typed at A\n").await;
    drop(watched);

    // AttachConsole through gateway 2: typing reaches A's vm1, output comes back.
    let mut attach_request = attach("vm1", Mode::ReadWrite);
    attach_request.force = true;
    let mut session = Session::attach(pki.client(g2.address, &token_a).await, attach_request)
        .await
        .expect("AttachConsole through the gateway");
    assert!(session.attached.writer);
    session.send(b"attached typing\n").await;
    a_vm1.wait_for(b"attached typing\n").await;
    a_vm1.write(b"echo back\n").await;
    session.wait_output(b"echo back\n").await;
    drop(session);

    // ReadHistory following through gateway 1: A's log only, live bytes too.
    let (data, mut stream) = read_history(pki.client(g1.address, &token_a).await, "vm1", 0, 22)
        .await
        .expect("ReadHistory through the gateway");
    assert_eq!(&data, b"from node A\necho back\n");
    a_vm1.write(b"live\n").await;
    let live = bounded("a live chunk", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((live.offset, &live.data[..]), (22, &b"live\n"[..]));
    drop(stream);

    // B's token reaches B's vm1, C's C's, through either gateway.
    let (data, _) = read_history(pki.client(g2.address, &token_b).await, "vm1", 0, 12)
        .await
        .expect("node B's history");
    assert_eq!(&data, b"from node B\n");
    let token_c = c.token("vm1", "", Access::Read, 600).await;
    for gateway in [&g1, &g2] {
        let (data, _) = read_history(pki.client(gateway.address, &token_c).await, "vm1", 0, 12)
            .await
            .expect("node C's history");
        assert_eq!(&data, b"from node C\n");
    }

    // Not the other guest of A (the node re-checks the token's guest).
    let refused = read_history(pki.client(g1.address, &token_a).await, "vm2", 0, 1).await;
    expect_code(refused, Code::PermissionDenied, "the other guest of A");
    let refused = watch(
        pki.client(g1.address, &token_a).await,
        watch_request("vm2", Mode::ReadWrite),
    )
    .await;
    expect_code(
        refused,
        Code::PermissionDenied,
        "a watch of the other guest of A",
    );

    // Not B's guest: A's token with its claim changed to B, or a token signed with A's key
    // that claims B, is refused at the gateway.
    // The same claiming an endpoint where nothing listens: had the gateway opened anything
    // upstream before verifying, these would be UNAVAILABLE.
    let forged = with_node_claim(&token_a, &endpoint_of(&b));
    let a_key = a.data_dir().join("state/token.key");
    let cross_signed = signed_with(&a_key, grant("vm1", Some(endpoint_of(&b)), now() + 600));
    let nowhere = "127.0.0.1:1";
    let forged_nowhere = with_node_claim(&token_a, nowhere);
    let cross_nowhere = signed_with(&a_key, grant("vm1", Some(nowhere.into()), now() + 600));
    let unclaimed = signed_with(&a_key, grant("vm1", None, now() + 600));
    for (token, what, expected) in [
        (&forged, "a changed node claim", "signature"),
        (&cross_signed, "A's key claiming B", "signature"),
        (&forged_nowhere, "a claim changed to nowhere", "signature"),
        (&cross_nowhere, "A's key claiming nowhere", "signature"),
        (&unclaimed, "no node claim", "names no node"),
    ] {
        let refused = read_history(pki.client(g1.address, token).await, "vm1", 0, 1).await;
        let message = expect_code(refused, Code::Unauthenticated, what);
        assert!(message.contains(expected), "{what}: {message}");
        let session = Session::attach(
            pki.client(g2.address, token).await,
            attach("vm1", Mode::ReadWrite),
        )
        .await;
        assert_eq!(
            session.err().map(|s| s.code()),
            Some(Code::Unauthenticated),
            "{what}"
        );
    }
    // Nothing of it reached B's guest or A's other guest.
    b_vm1.read_some(std::time::Duration::from_millis(200)).await;
    assert!(b_vm1.received().is_empty(), "{:?}", b_vm1.received());
    a_vm2.read_some(std::time::Duration::from_millis(200)).await;
    assert!(a_vm2.received().is_empty());
}

/// Expired tokens, and every token once the cluster key is replaced, are refused at the
/// gateway (the node, still on its old key, would have served them: the refusal is the
/// gateway's); a call in progress ends when the new key no longer verifies its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_and_a_rotated_cluster_key_are_refused_at_the_gateway() {
    let pki = Pki::new();
    let node = pki.node(false).await;
    let gateway = Gateway::start(&pki, "3s").await;
    let mut guest = console_with_guest(&node, "vm1").await;
    guest.write(b"hello\n").await;
    let key = node.data_dir().join("state/token.key");

    // Expired, for this node and for an endpoint where nothing listens (had the gateway gone
    // upstream with it, that one would be UNAVAILABLE).
    let nowhere = "127.0.0.1:1";
    let nowhere_key = pki.write("nowhere.key", &pki.node_key(nowhere));
    for expired in [
        signed_with(&key, grant("vm1", Some(endpoint_of(&node)), now() - 10)),
        signed_with(&nowhere_key, grant("vm1", Some(nowhere.into()), now() - 10)),
    ] {
        let refused = read_history(pki.client(gateway.address, &expired).await, "vm1", 0, 1).await;
        let message = expect_code(refused, Code::Unauthenticated, "an expired token");
        assert!(message.contains("expired"), "{message}");
    }

    let token = node.token("vm1", "", Access::Read, 600).await;
    let (_, mut follow) = read_history(pki.client(gateway.address, &token).await, "vm1", 0, 6)
        .await
        .expect("a valid token is served");

    pki.write("cluster.key", &format!("{}\n", "a7".repeat(32)));
    // The follow in progress ends, with no new call to the gateway.
    let ended = bounded("the follow ends", async {
        loop {
            match follow.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the follow ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("cluster key changed"), "{ended:?}");
    let refused = read_history(pki.client(gateway.address, &token).await, "vm1", 0, 1).await;
    let message = expect_code(
        refused,
        Code::Unauthenticated,
        "a token of the old cluster key",
    );
    assert!(message.contains("signature"), "{message}");
    // The node itself still takes it directly: the gateway refused it.
    let direct = read_history(pki.client(node.tcp, &token).await, "vm1", 0, 6).await;
    assert!(direct.is_ok(), "{direct:?}");
}

/// A node that is down, or an address that does not answer, is `UNAVAILABLE` naming the node,
/// within the connect timeout, for new calls and for streams in progress; the other nodes are
/// served meanwhile; once the node is back, the same token resumes by offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_down_is_unavailable_naming_it() {
    let pki = Pki::new();
    let (mut down, up) = (pki.node(false).await, pki.node(false).await);
    let gateway = Gateway::start(&pki, "1s").await;
    let mut guest = console_with_guest(&up, "vm1").await;
    guest.write(b"still here\n").await;
    let mut dying = console_with_guest(&down, "vm1").await;
    dying.write(b"last words\n").await;
    let token_down = down.token("vm1", "", Access::Read, 600).await;
    let token_up = up.token("vm1", "", Access::Read, 600).await;
    let name = endpoint_of(&down);
    let (_, mut follow) =
        read_history(pki.client(gateway.address, &token_down).await, "vm1", 0, 11)
            .await
            .expect("a follow through the gateway");
    down.kill().await;

    // The follow in progress ends with UNAVAILABLE naming the node, not a reset.
    let ended = bounded("the follow ends", async {
        loop {
            match follow.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("a follow on a dead node ended cleanly"),
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(
        ended
            .message()
            .contains(&format!("Node {name} ended the stream")),
        "{ended:?}"
    );

    let refused = read_history(pki.client(gateway.address, &token_down).await, "vm1", 0, 1).await;
    let message = expect_code(refused, Code::Unavailable, "a call to a dead node");
    assert!(
        message.contains(&format!("Node {name} is unavailable")),
        "{message}"
    );

    // An address where nothing answers (TEST-NET-1, RFC 5737): the connect timeout decides.
    let silent = "192.0.2.1:7770";
    let key_file = pki.write("silent.key", &pki.node_key(silent));
    let token_silent = signed_with(&key_file, grant("vm1", Some(silent.into()), now() + 600));
    let refused = tokio::time::timeout(
        DEADLINE / 2,
        read_history(
            pki.client(gateway.address, &token_silent).await,
            "vm1",
            0,
            1,
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer; the gateway's log:\n{}", gateway.log()));
    let message = expect_code(refused, Code::Unavailable, "a call to nobody");
    assert!(
        message.contains("Node 192.0.2.1:7770 is unavailable"),
        "{message}"
    );

    let (data, _) = read_history(pki.client(gateway.address, &token_up).await, "vm1", 0, 11)
        .await
        .expect("the node that is up is served");
    assert_eq!(&data, b"still here\n");

    // The node restarts (its keeper kept its listener, so its endpoint is the same): the same
    // token resumes through the gateway from the offset it had, the guest's console kept.
    down.restart().await;
    assert_eq!(endpoint_of(&down), name, "the restarted node kept its port");
    dying.write(b"back\n").await;
    let (data, _) = read_history(pki.client(gateway.address, &token_down).await, "vm1", 11, 5)
        .await
        .expect("the restarted node is served again");
    assert_eq!(&data, b"back\n");
}

/// With `console.require_gateway` a node refuses a direct caller without the gateway's client
/// certificate (whatever its token), serves the gateway, and refuses to start without
/// `tls.client_ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_gateway_refuses_direct_callers_without_the_gateway_certificate() {
    let pki = Pki::new();
    let node = pki.node(true).await;
    let gateway = Gateway::start(&pki, "3s").await;
    let mut guest = console_with_guest(&node, "vm1").await;
    guest.write(b"private\n").await;
    let token = node.token("vm1", "", Access::Read, 600).await;

    let (data, _) = read_history(pki.client(gateway.address, &token).await, "vm1", 0, 8)
        .await
        .expect("served through the gateway");
    assert_eq!(&data, b"private\n");

    // Directly, with the token but no client certificate: the TLS handshake fails.
    let direct = async {
        let channel = pki.endpoint(node.tcp, false).connect().await?;
        let result = read_history(with_token(channel, &token), "vm1", 0, 1).await;
        Ok::<_, tonic::transport::Error>(result.map(|_| ()))
    };
    if let Ok(Ok(())) = bounded("a direct call", direct).await {
        panic!("a direct call without the gateway's certificate was served");
    }
    // With the gateway's certificate (as the gateway itself) it is served.
    let channel = bounded(
        "connect as the gateway",
        pki.endpoint(node.tcp, true).connect(),
    )
    .await
    .expect("the gateway's certificate is accepted");
    read_history(with_token(channel, &token), "vm1", 0, 8)
        .await
        .expect("served with the gateway's certificate");

    // The node checks the node claim itself: a token of its own key naming another node is
    // refused even with the gateway's certificate.
    let elsewhere = signed_with(
        &node.data_dir().join("state/token.key"),
        grant("vm1", Some("127.0.0.1:1".into()), now() + 600),
    );
    let channel = bounded(
        "connect as the gateway",
        pki.endpoint(node.tcp, true).connect(),
    )
    .await
    .unwrap();
    let refused = read_history(with_token(channel, &elsewhere), "vm1", 0, 1).await;
    let message = expect_code(refused, Code::Unauthenticated, "a token for another node");
    assert!(message.contains("not this one"), "{message}");

    // Without tls.client_ca the setting is refused at start.
    let config = pki.write(
        "no-client-ca.yaml",
        &format!(
            "{}console:\n  require_gateway: true\n",
            pki.node_yaml(false)
        ),
    );
    let output = Command::new(conlogd_bin())
        .arg("--config")
        .arg(&config)
        .arg("--print-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("console.require_gateway") && stderr.contains("tls.client_ca"),
        "{stderr}"
    );
}

/// A gateway replica killed in the middle of a following ReadHistory and an AttachConsole
/// costs the client a reconnect to the other replica and nothing else: resumed by offset,
/// every byte arrives once, and the writer lease is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_replica_costs_a_reconnect_and_nothing_else() {
    let pki = Pki::new();
    let node = pki.node(false).await;
    let mut g1 = Gateway::start(&pki, "3s").await;
    let g2 = Gateway::start(&pki, "3s").await;
    let mut guest = console_with_guest(&node, "vm1").await;
    let token = node.token("vm1", "", Access::ReadWrite, 600).await;
    let first: Vec<u8> = (0..4000u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    guest.write(&first).await;

    // A follower and a writer, both through gateway 1.
    let (mut followed, follow) =
        read_history(pki.client(g1.address, &token).await, "vm1", 0, first.len())
            .await
            .expect("follow through gateway 1");
    let mut session = Session::attach(
        pki.client(g1.address, &token).await,
        attach("vm1", Mode::ReadWrite),
    )
    .await
    .expect("attach through gateway 1");
    assert!(session.attached.writer);
    session.send(b"before\n").await;
    guest.wait_for(b"before\n").await;
    let attached_end = session.next_offset;

    g1.kill();
    // Output the client misses while it reconnects.
    let second: Vec<u8> = (0..3000u32)
        .flat_map(|i| format!("more {i}\n").into_bytes())
        .collect();
    guest.write(&second).await;

    // Both calls end with an error (the connection to gateway 1 is gone), never a clean end.
    let mut follow = follow;
    let ended = bounded("the follow ends", async {
        loop {
            match follow.message().await {
                Ok(Some(chunk)) => followed.extend_from_slice(&chunk.data),
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await;
    assert!(
        ended.is_some(),
        "a follow through a dead gateway ended cleanly"
    );
    let status = session.wait_end().await;
    assert_ne!(status.code(), Code::Ok);

    // Resume through gateway 2 from the offset reached.
    let resume_at = followed.len() as u64;
    let total = first.len() + second.len();
    let (rest, _) = read_history(
        pki.client(g2.address, &token).await,
        "vm1",
        resume_at,
        total - followed.len(),
    )
    .await
    .expect("resume through gateway 2");
    followed.extend_from_slice(&rest);
    let mut expected = first.clone();
    expected.extend_from_slice(&second);
    assert_eq!(followed.len(), expected.len());
    assert!(
        followed == expected,
        "the followed bytes differ from the guest's output"
    );

    // The writer re-attaches with a replay and takes what it missed from its offset.
    let mut again = attach("vm1", Mode::ReadWrite);
    again.force = true;
    again.replay_bytes = 1 << 20;
    let mut session = Session::attach(pki.client(g2.address, &token).await, again)
        .await
        .expect("re-attach through gateway 2");
    assert!(session.attached.writer, "the writer lease is taken again");
    assert!(
        session.attached.offset <= attached_end,
        "the replay starts at {} after the old session's end {attached_end}",
        session.attached.offset
    );
    session.wait_offset(total as u64).await;
    let skip = (attached_end - session.attached.offset) as usize;
    assert!(session.output[skip..] == expected[attached_end as usize..]);
    session.send(b"after\n").await;
    guest.wait_for(b"after\n").await;
}

/// A gRPC-web (binary, HTTP/1.1) `ReadHistory` of `vm1` from offset 0, with `token` if any, as
/// the page served by `page_port` on localhost sends it (with its `Origin`).
fn grpc_web_read_history(token: Option<&str>, page_port: u16) -> Vec<u8> {
    use prost::Message;
    let message = ReadHistoryRequest {
        guest: "vm1".into(),
        start: Some(Start::FromOffset(0)),
        limit_bytes: 64,
        ..Default::default()
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let mut request = format!(
        "POST /conlog.v1.Console/ReadHistory HTTP/1.1\r\nhost: localhost:{page_port}\r\n\
         origin: https://localhost:{page_port}\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n{auth}\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request
}

/// A gateway serves what a node serves to a browser: the same `/console/` page, and gRPC-web
/// over HTTP/1.1 forwarded like native gRPC (a token needed, the node's bytes returned); and
/// `conlogctl --server` works against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_and_grpc_web_are_served_through_the_gateway() {
    let pki = Pki::new();
    let node = pki.node(false).await;
    let gateway = Gateway::start(&pki, "3s").await;
    let mut guest = console_with_guest(&node, "vm1").await;
    guest.write(b"seen from a browser\n").await;
    let token = node.token("vm1", "", Access::Read, 600).await;
    // Logged before the gRPC-web read, which does not follow.
    read_history(pki.client(node.tcp, &token).await, "vm1", 0, 20)
        .await
        .unwrap();

    let page = b"GET /console/ HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
    let from_node = https_http1(&pki, node.tcp, page).await;
    let from_gateway = https_http1(&pki, gateway.address, page).await;
    assert!(
        from_gateway.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&from_gateway)
    );
    assert!(!body_of(&from_gateway).is_empty());
    assert!(
        body_of(&from_gateway) == body_of(&from_node),
        "not the node's page"
    );

    let served = https_http1(
        &pki,
        gateway.address,
        &grpc_web_read_history(Some(&token), gateway.address.port()),
    )
    .await;
    let text = String::from_utf8_lossy(&served);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(contains(&served, b"seen from a browser\n"), "{text}");
    assert!(text.contains("grpc-status:0"), "{text}");

    // conlogctl --server works against a gateway as against a node.
    let output = tokio::task::spawn_blocking({
        let (ca, server) = (
            pki.path("server-ca.pem"),
            format!("https://localhost:{}", gateway.address.port()),
        );
        let token = token.clone();
        move || {
            Command::new(conlogctl_bin())
                .args([
                    "history", "vm1", "--limit", "20", "--server", &server, "--token", &token,
                ])
                .arg("--ca")
                .arg(ca)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, b"seen from a browser\n");

    let refused = https_http1(
        &pki,
        gateway.address,
        &grpc_web_read_history(None, gateway.address.port()),
    )
    .await;
    let text = String::from_utf8_lossy(&refused);
    assert!(
        text.contains("grpc-status: 16") || text.contains("grpc-status:16"),
        "{text}"
    );
    assert!(!contains(&refused, b"seen from a browser"), "{text}");
}

/// The gateway's own limits, like a node's: calls with the tokens of one guest (of one node),
/// refused naming the gateway's key and given back when the call ends; a connection with no
/// call is closed after `gateway.limits.idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_limits_calls_per_guest_and_closes_idle_connections() {
    let pki = Pki::new();
    let node = pki.node(false).await;
    let gateway = Gateway::start_with(
        &pki,
        "3s",
        "  limits:\n    calls_per_guest: 1\n    idle_timeout: 1s\n",
    )
    .await;
    let mut vm1 = console_with_guest(&node, "vm1").await;
    let mut vm2 = console_with_guest(&node, "vm2").await;
    vm1.write(b"one\n").await;
    vm2.write(b"two\n").await;
    let (first, second) = (
        node.token("vm1", "", Access::Read, 600).await,
        node.token("vm1", "", Access::Read, 600).await,
    );
    let other = node.token("vm2", "", Access::Read, 600).await;

    let (_, follow) = read_history(pki.client(gateway.address, &first).await, "vm1", 0, 4)
        .await
        .expect("the first call");
    let refused = read_history(pki.client(gateway.address, &second).await, "vm1", 0, 4).await;
    let message = expect_code(
        refused,
        Code::ResourceExhausted,
        "a second call of the guest",
    );
    assert!(
        message.contains("gateway.limits.calls_per_guest"),
        "{message}"
    );
    read_history(pki.client(gateway.address, &other).await, "vm2", 0, 4)
        .await
        .expect("another guest's call");

    // The place comes back when the call ends.
    drop(follow);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match read_history(pki.client(gateway.address, &second).await, "vm1", 0, 4).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(Instant::now() < deadline, "the place never came back");
                tokio::time::sleep(POLL).await;
            }
        }
    }

    // A TLS connection that sends nothing is closed (bounded by DEADLINE, not a timing).
    let response = https_http1(&pki, gateway.address, b"").await;
    assert!(
        response.is_empty(),
        "{}",
        String::from_utf8_lossy(&response)
    );
}

/// The plaintext health listener (for the kubelet's probes) answers `conlog.v1.Console`, and
/// `--print-config` prints every key with its default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_health_in_plaintext_and_prints_its_config() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let pki = Pki::new();
    let gateway = Gateway::start_with(&pki, "3s", "  health: 127.0.0.1:0\n").await;
    let log = gateway.log();
    let line = log
        .lines()
        .find(|l| l.contains("conlog-gateway ready"))
        .unwrap();
    let at = line.find("health=").expect("health= in the ready line") + 7;
    let health: SocketAddr = line[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let channel = bounded(
        "connect to health",
        Endpoint::from_shared(format!("http://{health}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let status = bounded(
        "Health.Check",
        HealthClient::new(channel).check(HealthCheckRequest {
            service: "conlog.v1.Console".into(),
        }),
    )
    .await
    .expect("served")
    .into_inner()
    .status;
    assert_eq!(status, 1, "SERVING");

    let config = pki.write("printed.yaml", &pki.gateway_yaml("3s"));
    let output = Command::new(gateway_bin())
        .arg("--config")
        .arg(&config)
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed: serde_yaml::Value = serde_yaml::from_slice(&output.stdout).unwrap();
    let gateway = &printed["gateway"];
    assert_eq!(gateway["upstream"]["stream_window"], "1MiB");
    assert_eq!(gateway["upstream"]["calls_per_node"], 256);
    assert_eq!(gateway["limits"]["calls_per_guest"], 64);
    assert_eq!(gateway["health"], serde_yaml::Value::Null);

    // A node connection's window is calls_per_node stream windows: over HTTP/2's largest
    // window is refused, naming the key.
    let config = pki.write(
        "too-many.yaml",
        &pki.gateway_yaml("3s\n    calls_per_node: 2048"),
    );
    let output = Command::new(gateway_bin())
        .arg("--config")
        .arg(&config)
        .arg("--print-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("gateway.upstream.calls_per_node") && stderr.contains("2GiB"),
        "{stderr}"
    );
}

/// A gRPC-web request over HTTP/1.1 to a gateway (binary, a `ReadHistory` path) with `token`,
/// announcing `length` body bytes and sending `sent` of them.
fn grpc_web_body(token: &str, length: usize, sent: usize) -> Vec<u8> {
    let mut request = format!(
        "POST /conlog.v1.Console/ReadHistory HTTP/1.1\r\nhost: localhost\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
         authorization: Bearer {token}\r\ncontent-length: {length}\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    request.resize(request.len() + sent, 0);
    request
}

/// Refusals at a gateway name the gateway's settings (`gateway.limits.*`), not a node's: an
/// HTTP/1.1 request body over `message_size`, one that does not arrive within
/// `body_timeout`, a connection over `connections_per_peer`; and a config whose
/// `web_body_bytes` cannot hold one message of `message_size` (the rule a node's `limits`
/// share) is refused naming the gateway's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_at_the_gateway_name_the_gateways_own_limits() {
    let pki = Pki::new();
    let node = pki.node(false).await;
    let gateway = Gateway::start_with(
        &pki,
        "3s",
        "  limits:\n    message_size: 4KiB\n    body_timeout: 1s\n    connections_per_peer: 2\n",
    )
    .await;
    let _guest = console_with_guest(&node, "vm1").await;
    let token = node.token("vm1", "", Access::Read, 600).await;

    // 4 KiB as base64 and 64 KiB of framing: 70,997 bytes at most.
    let over = https_http1(
        &pki,
        gateway.address,
        &grpc_web_body(&token, 80 << 10, 80 << 10),
    )
    .await;
    let text = String::from_utf8_lossy(&over);
    assert!(text.contains("gateway.limits.message_size"), "{text}");

    let late = https_http1(&pki, gateway.address, &grpc_web_body(&token, 100, 10)).await;
    let text = String::from_utf8_lossy(&late);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        String::from_utf8_lossy(body_of(&late)).contains("gateway.limits.body_timeout"),
        "{text}"
    );

    // Connections held open (a TCP connection holds its place from its accept, handshake
    // included) until the gateway refuses one.
    let mut held = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while !gateway
        .log()
        .contains("limits.connections_per_peer reached")
    {
        assert!(
            Instant::now() < deadline,
            "no connection refused:\n{}",
            gateway.log()
        );
        held.push(
            tokio::net::TcpStream::connect(gateway.address)
                .await
                .unwrap(),
        );
        tokio::time::sleep(POLL).await;
    }
    assert!(
        gateway
            .log()
            .contains("gateway.limits.connections_per_peer reached"),
        "{}",
        gateway.log()
    );
    drop(held);

    let mut small = pki.gateway_yaml("3s");
    small.push_str("  limits:\n    message_size: 1MiB\n    web_body_bytes: 1MiB\n");
    let config = pki.write("small.yaml", &small);
    let output = Command::new(gateway_bin())
        .arg("--config")
        .arg(&config)
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gateway.limits.web_body_bytes"), "{stderr}");
    assert!(
        stderr.contains("one request of gateway.limits.message_size"),
        "{stderr}"
    );
}

/// Calls in progress from one replica to one node are bounded by
/// `gateway.upstream.calls_per_node` (over it: `RESOURCE_EXHAUSTED` naming it), another node
/// is not affected, and the place comes back when a call ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_limits_calls_per_node() {
    let pki = Pki::new();
    let (a, b) = (pki.node(false).await, pki.node(false).await);
    let gateway = Gateway::start_with(&pki, "3s\n    calls_per_node: 1", "").await;
    let mut on_a = console_with_guest(&a, "vm1").await;
    let mut other_on_a = console_with_guest(&a, "vm2").await;
    let mut on_b = console_with_guest(&b, "vm1").await;
    for guest in [&mut on_a, &mut other_on_a, &mut on_b] {
        guest.write(b"one\n").await;
    }
    let first = a.token("vm1", "", Access::Read, 600).await;
    let second = a.token("vm2", "", Access::Read, 600).await;
    let third = b.token("vm1", "", Access::Read, 600).await;

    let (_, follow) = read_history(pki.client(gateway.address, &first).await, "vm1", 0, 4)
        .await
        .expect("the first call");
    let refused = read_history(pki.client(gateway.address, &second).await, "vm2", 0, 4).await;
    let message = match refused {
        Ok(_) => panic!("a second call to the node was served"),
        Err(status) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            status.message().to_owned()
        }
    };
    assert!(
        message.contains("gateway.upstream.calls_per_node"),
        "{message}"
    );
    read_history(pki.client(gateway.address, &third).await, "vm1", 0, 4)
        .await
        .expect("a call to another node");

    drop(follow);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match read_history(pki.client(gateway.address, &second).await, "vm2", 0, 4).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(Instant::now() < deadline, "the place never came back");
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

/// One tenant's following `ReadHistory` streams whose client stopped reading cannot stall
/// another tenant's calls to the same node through the same gateway: the node connection's
/// window is one stream window per call it may carry (`gateway.upstream.calls_per_node`), so
/// the stalled streams hold their own windows and never the others' (docs/gateway.md,
/// "Forwarding and backpressure"). With the old connection window (16 stream windows) the 32
/// stalled streams here hold all of it and the other tenant's read never gets a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_stop_reading_do_not_stall_other_tenants_on_the_node() {
    const STALLED: usize = 32;
    const BACKLOG: usize = 512 << 10;
    let pki = Pki::new();
    let node = pki.node(false).await;
    // The smallest stream window (the next upstream key rides on the connect timeout's line).
    let gateway = Gateway::start_with(&pki, "3s\n    stream_window: 16KiB", "").await;
    let mut vm1 = console_with_guest(&node, "vm1").await;
    let mut vm2 = console_with_guest(&node, "vm2").await;
    let line: Vec<u8> = (0..1024).map(|i| b'a' + (i % 26) as u8).collect();
    for _ in 0..BACKLOG / line.len() {
        vm1.write(&line).await;
    }
    vm2.write(b"two\n").await;
    let tenant = node.token("vm1", "", Access::Read, 600).await;
    let other = node.token("vm2", "", Access::Read, 600).await;
    // The backlog is in the log (read once, through the gateway).
    read_history(
        pki.client(gateway.address, &tenant).await,
        "vm1",
        0,
        BACKLOG,
    )
    .await
    .expect("the backlog");

    // The tenant's client: one connection, a window far larger than what its streams take,
    // so every stream stalls at the gateway (each at most its 16 KiB window) and none at
    // the client's connection.
    let stalled_client = bounded(
        "connect",
        pki.endpoint(gateway.address, false)
            .initial_stream_window_size(16 << 10)
            .initial_connection_window_size(16 << 20)
            .connect(),
    )
    .await
    .expect("connect to the gateway");
    let stalled_client = with_token(stalled_client, &tenant);
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        // Each stream's first chunk arrived: the node is sending it; then it is held unread.
        let (_, stream) = read_history(stalled_client.clone(), "vm1", 0, 1)
            .await
            .expect("a follow of the backlog");
        stalled.push(stream);
    }
    // Let the stalled streams fill their windows (the outcome asserted does not depend on
    // how long this takes: with the fix the read below completes whatever they hold).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    // Another tenant's read of the same node through the same gateway completes.
    for _ in 0..3 {
        let (data, _) = read_history(pki.client(gateway.address, &other).await, "vm2", 0, 4)
            .await
            .expect("another tenant's read");
        assert_eq!(data, b"two\n");
    }
    // And the stalled streams are still there, unread (the read above did not end them).
    assert_eq!(stalled.len(), STALLED);
    drop(stalled);
}
