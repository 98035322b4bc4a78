//! What the daemon serves besides the data path: `conlogctl run` and `guests`, the Prometheus
//! endpoint, and which gRPC services the TCP listener exposes.

use crate::support;

use conlog::proto::{self, agent_client::AgentClient};
use std::process::Command;
use support::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn conlogctl(daemon: &Daemon, args: &[&str]) -> Command {
    let mut cmd = Command::new(conlogctl_bin());
    cmd.arg("--socket").arg(daemon.socket()).args(args);
    cmd
}

/// `conlogctl run` exits with CMD's status and logs both its stdout and stderr; `conlogctl
/// guests` shows the guest, stream and offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conlogctl_run_logs_stdout_and_stderr_and_returns_the_status() {
    let daemon = Daemon::start().await;
    let output = run_bounded_async(conlogctl(
        &daemon,
        &[
            "run",
            "--guest",
            "vm-ctl",
            "--",
            "sh",
            "-c",
            "echo to-stdout; echo to-stderr >&2; exit 3",
        ],
    ))
    .await;
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));

    let mut agent = daemon.agent().await;
    let expected = b"to-stdout\nto-stderr\n";
    let info = wait_closed(&mut agent, "vm-ctl", "qemu", expected.len() as u64).await;
    assert_eq!(read_log(&daemon.log_dir(), "vm-ctl", "qemu"), expected);

    // A named stream, and a command that succeeds.
    let output = run_bounded_async(conlogctl(
        &daemon,
        &[
            "run", "--guest", "vm-ctl", "--stream", "boot", "--", "printf", "%s", "12345",
        ],
    ))
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    wait_closed(&mut agent, "vm-ctl", "boot", 5).await;

    let output = run_bounded_async(conlogctl(&daemon, &["guests"])).await;
    assert!(output.status.success(), "{}", describe(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    let row = |stream: &str| {
        table
            .lines()
            .find(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.first() == Some(&"vm-ctl") && cols.get(1) == Some(&stream)
            })
            .unwrap_or_else(|| panic!("no row for vm-ctl/{stream} in:\n{table}"))
            .to_owned()
    };
    let qemu = row("qemu");
    let cols: Vec<&str> = qemu.split_whitespace().collect();
    assert!(
        cols.contains(&info.offset.to_string().as_str()),
        "offset {} missing: {qemu}",
        info.offset
    );
    assert!(cols.contains(&"closed"), "{qemu}");
    assert!(row("boot").split_whitespace().any(|c| c == "5"), "{table}");

    // A failing request is reported and gives a non-zero status.
    let output = run_bounded_async(conlogctl(
        &daemon,
        &["run", "--guest", "../evil", "--", "true"],
    ))
    .await;
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("InvalidArgument"),
        "{}",
        describe(&output)
    );
}

/// `GET /metrics` reports bytes logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_bytes_logged() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, "vm-metrics", "qemu", None).await;
    let total = 123_457;
    write_and_close(pipe, pattern(0, total)).await;
    wait_closed(&mut agent, "vm-metrics", "qemu", total as u64).await;
    // A refused hand-off, counted as a failure.
    claim_token(&daemon.fd_socket(), "nope").await.unwrap_err();

    let metrics = daemon.metrics;
    let (status, body) = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}");
    assert_eq!(
        metric(&body, "conlog_bytes_logged_total"),
        Some(total as f64),
        "{body}"
    );
    assert_eq!(metric(&body, "conlog_handoffs_total"), Some(1.0), "{body}");
    assert_eq!(
        metric(&body, "conlog_handoff_failures_total"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(metric(&body, "conlog_guests"), Some(1.0), "{body}");

    let (status, _) = tokio::task::spawn_blocking(move || http_get(metrics, "/nope"))
        .await
        .unwrap();
    assert!(status.contains("404"), "{status}");
}

async fn health(channel: tonic::transport::Channel, service: &str) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// The `Agent` service is not served on TCP; `Console` and health are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_service_is_not_served_on_tcp() {
    let daemon = Daemon::start().await;
    let tcp = daemon.plain_tcp_channel().await;

    let status = AgentClient::new(tcp.clone())
        .list_guests(proto::ListGuestsRequest::default())
        .await
        .expect_err("Agent.ListGuests over TCP");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let status = AgentClient::new(tcp.clone())
        .create_log_pipe(proto::CreateLogPipeRequest {
            guest: "vm1".into(),
            ..Default::default()
        })
        .await
        .expect_err("Agent.CreateLogPipe over TCP");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    let serving = ServingStatus::Serving as i32;
    assert_eq!(
        health(tcp.clone(), "conlog.v1.Console").await.unwrap(),
        serving
    );
    assert_eq!(health(tcp.clone(), "").await.unwrap(), serving);
    let agent_on_tcp = health(tcp.clone(), "conlog.v1.Agent").await;
    assert!(
        !matches!(agent_on_tcp, Ok(s) if s == serving),
        "TCP health must not report the Agent service as serving: {agent_on_tcp:?}"
    );

    // The local socket serves both.
    let local = conlog::client::connect_local(&daemon.socket())
        .await
        .unwrap();
    for service in ["conlog.v1.Agent", "conlog.v1.Console"] {
        assert_eq!(
            health(local.clone(), service).await.unwrap(),
            serving,
            "{service}"
        );
    }
    AgentClient::new(local)
        .list_guests(proto::ListGuestsRequest::default())
        .await
        .expect("Agent.ListGuests on the local socket");

    // No guest was created through TCP.
    assert!(!daemon.log_dir().join("vm1").exists());
}
