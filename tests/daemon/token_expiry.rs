//! A token that expires while its call is open (SECURITY.md, "Revocation"): expiry is checked
//! when a call starts, so a console watched with it stays open and keeps receiving output,
//! while every new call with it, `SendConsoleInput` included, is `UNAUTHENTICATED`; rotating the
//! key ends the open call.

use crate::support;

use conlog::proto::{self, attach::Mode, Access};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::*;
use tonic::Code;

/// The expiry (Unix seconds) written in a token's payload.
fn expiry_of(token: &str) -> u64 {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("conlog1.<payload>.<mac>");
    let json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    json["e"].as_u64().expect("an expiry")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outlives_its_token_until_the_key_is_rotated() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm1").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm1", DEVICE, true).await;

    let token = daemon.token("vm1", "", Access::ReadWrite, 1).await;
    let expiry = expiry_of(&token);
    let channel = with_token(daemon.plain_tcp_channel().await, &token);
    let mut frames = watch(channel.clone(), watch_request("vm1", Mode::ReadWrite))
        .await
        .expect("WatchConsole with a fresh token");
    let session = frames.attached.session_id.clone();
    guest.write(b"before expiry\n").await;
    frames.wait_output(b"before expiry\n").await;

    // Wait (bounded) until the token has expired by the daemon's clock (the same machine's).
    let deadline = std::time::Instant::now() + DEADLINE;
    while now_unix() <= expiry {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock stands still"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new call with the expired token is refused, naming the expiry ...
    let refused = watch(channel.clone(), watch_request("vm1", Mode::ReadOnly)).await;
    let message = expect_code(refused, Code::Unauthenticated, "a new call, token expired");
    assert!(message.contains("expired"), "{message}");
    let refused = send_input(channel.clone(), &session, b"typed\n").await;
    let message = expect_code(refused, Code::Unauthenticated, "SendConsoleInput, expired");
    assert!(message.contains("expired"), "{message}");
    // ... while the open watch goes on (the refused input never reached the guest: the
    // marker typed over the local socket is the first thing it reads).
    guest.write(b"after expiry\n").await;
    frames.wait_output(b"after expiry\n").await;
    send_input(local_channel(&daemon).await, &session, b"marker\n")
        .await
        .expect("input for the session over the local socket");
    assert_eq!(
        guest.wait_for(b"marker\n").await,
        b"marker\n",
        "the guest's input"
    );

    // Rotating the key ends it.
    agent
        .rotate_token_key(proto::RotateTokenKeyRequest {})
        .await
        .expect("RotateTokenKey");
    let status = frames.wait_end().await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}
