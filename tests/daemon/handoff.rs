//! The `fd.sock` hand-off and request validation against the real `conlogd`: single-use and
//! expiring tokens, garbage on the socket, invalid names and limits.

use crate::support;

use conlog::proto::{self, LogMode};
use std::time::Duration;
use support::*;
use tonic::Code;

/// A token is single use; garbage tokens and over-long lines are refused with an `error: `
/// line, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_single_use_and_garbage_is_refused() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;

    let reply = create_pipe(&mut agent, "vm-token", "", None).await.unwrap();
    assert_eq!(
        std::path::Path::new(&reply.fd_socket),
        daemon.fd_socket(),
        "fd_socket is <runtime_dir>/fd.sock"
    );
    assert_eq!(
        reply.expires_in_ms, 30_000,
        "default token lifetime is 30 s"
    );
    assert_eq!(reply.handoff_token.len(), 32, "{}", reply.handoff_token);
    let pipe = claim(&reply).await.expect("first claim succeeds");

    let again = claim(&reply).await.expect_err("a token is single use");
    assert!(
        again.to_string().contains("unknown or already used"),
        "second claim: {again}"
    );
    // The same over a raw connection: an error line, as a Python agent would see it.
    let answer = raw_fd_sock(&daemon, format!("{}\n", reply.handoff_token).as_bytes());
    assert!(
        answer.starts_with("error: ") && answer.contains("unknown or already used"),
        "{answer:?}"
    );

    let garbage = claim_token(&daemon.fd_socket(), "0123456789abcdef-not-a-token")
        .await
        .expect_err("a garbage token is refused");
    assert!(
        garbage.to_string().contains("unknown or already used"),
        "{garbage}"
    );
    let answer = raw_fd_sock(&daemon, &[b'x'; 300]);
    assert!(
        answer.starts_with("error: ") && answer.contains("longer than"),
        "over-long token line: {answer:?}"
    );
    let answer = raw_fd_sock(&daemon, b"\xff\xfe\n");
    assert!(answer.starts_with("error: "), "non-UTF-8 token: {answer:?}");

    // The claimed pipe still works, and the stream it feeds is the one requested ("qemu").
    write_and_close(std::fs::File::from(pipe), b"first\n".to_vec()).await;
    wait_closed(&mut agent, "vm-token", "qemu", 6).await;
    assert_still_serves(&daemon, "vm-token-after").await;
}

/// With `handoff.token_ttl: 1s`, a token not claimed in time is refused; the pending write end
/// is closed (the stream shows closed), while a pipe claimed in time keeps working.
///
/// `src/handoff.rs` sweeps expired tokens every second (closing their write ends) but remembers
/// their names, so a late claim is told "hand-off token expired" whether or not the sweep has
/// already run, and never "unknown".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_refused() {
    let daemon = Daemon::start_with(Some("handoff:\n  token_ttl: 1s\n"), &[]).await;
    let mut agent = daemon.agent().await;

    let late = create_pipe(&mut agent, "vm-expiry", "late", None)
        .await
        .unwrap();
    assert_eq!(late.expires_in_ms, 1000, "configured lifetime is reported");
    let (in_time, pipe) = open_pipe(&mut agent, "vm-expiry", "in-time", None).await;
    assert_eq!(in_time.offset, 0);

    // The expiry itself is the behaviour under test, so this wait cannot be a poll.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let err = claim(&late).await.expect_err("an expired token is refused");
    let text = err.to_string();
    assert!(text.contains("expired"), "late claim: {text}");
    // Still refused on a second try, and over a raw connection as an error line.
    let answer = raw_fd_sock(&daemon, format!("{}\n", late.handoff_token).as_bytes());
    assert!(
        answer.starts_with("error: ") && answer.contains("expired"),
        "{answer:?}"
    );
    // The unclaimed write end is closed once the token is gone, so the stream ends.
    let info = wait_stream(&mut agent, "vm-expiry", "late", "closed", |s| !s.open).await;
    assert_eq!(info.offset, 0);

    // The pipe claimed in time is not affected by the token's lifetime.
    write_and_close(pipe, pattern(0, 5000)).await;
    wait_closed(&mut agent, "vm-expiry", "in-time", 5000).await;
    assert_still_serves(&daemon, "vm-expiry-after").await;
}

/// Names outside design section 2's rules are `INVALID_ARGUMENT` naming the rule, and nothing
/// is created on disk for them; bad limits are `INVALID_ARGUMENT` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_limits_are_invalid_arguments() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;

    let long = "a".repeat(65);
    let bad_guests = ["../x", "a/b", "", long.as_str(), "a\0b", "..", ".x", "-a"];
    for guest in bad_guests {
        let status = create_pipe(&mut agent, guest, "qemu", None)
            .await
            .expect_err(guest);
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "guest {guest:?}: {status:?}"
        );
        assert!(
            status.message().contains("match") && status.message().contains("guest"),
            "guest {guest:?}: the message names the rule: {:?}",
            status.message()
        );
    }
    for stream in ["Bad", "x.y", "../x", "a/b", "-a", &"s".repeat(33)] {
        let status = create_pipe(&mut agent, "vm1", stream, None)
            .await
            .expect_err(stream);
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "stream {stream:?}: {status:?}"
        );
        assert!(
            status.message().contains("match") && status.message().contains("stream"),
            "stream {stream:?}: the message names the rule: {:?}",
            status.message()
        );
    }
    // The longest valid names are accepted.
    let longest = "g".repeat(64);
    let stream32 = "s".repeat(32);
    create_pipe(&mut agent, &longest, &stream32, None)
        .await
        .expect("64-character guest and 32-character stream are valid");

    let status = create_pipe(
        &mut agent,
        "vm1",
        "qemu",
        Some(limits(100, 3, LogMode::Rotate)),
    )
    .await
    .expect_err("max_size 100");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("max_size"),
        "{:?}",
        status.message()
    );
    let status = create_pipe(
        &mut agent,
        "vm1",
        "qemu",
        Some(proto::LogLimits {
            max_size: None,
            max_backups: None,
            mode: 7,
            compress: None,
            max_age_seconds: None,
        }),
    )
    .await
    .expect_err("mode 7");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Nothing escaped the log directory, and no stream was made for a refused request.
    assert!(!daemon.data_dir().join("x").exists());
    assert!(!daemon.log_dir().join("x").exists());
    let entries: Vec<String> = std::fs::read_dir(daemon.log_dir())
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        entries,
        std::slice::from_ref(&longest),
        "only the valid guest has a directory"
    );
    let listed = agent
        .list_guests(proto::ListGuestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.guests.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, [longest.as_str()]);
}
