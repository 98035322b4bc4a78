//! Where a running daemon's configuration comes from (docs/operations.md): command-line flags
//! win over the config file, and an in-place upgrade reads the file again (limits and log
//! defaults take effect; the carried `listen` and `metrics` sockets stay where they are).

use crate::support;
use crate::upgrade_common;

use conlog::proto;
use rustix::process::Signal;
use std::net::TcpListener;
use support::*;
use tonic::Code;
use upgrade_common::*;

/// The file names a runtime, data and log directory and both addresses; the flags name others.
/// The daemon serves on the flags' values: the file's addresses are held by the test (binding
/// them would fail) and its directories stay empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_override_the_config_file() {
    let elsewhere = tempfile::tempdir().unwrap();
    let held_listen = TcpListener::bind("127.0.0.1:0").unwrap();
    let held_metrics = TcpListener::bind("127.0.0.1:0").unwrap();
    let file_dir = |name: &str| elsewhere.path().join(name);
    let flag_logs = elsewhere.path().join("flag-logs");
    let yaml = format!(
        "listen: {}\nmetrics: {}\nruntime_dir: {}\ndata_dir: {}\nlog_dir: {}\n",
        held_listen.local_addr().unwrap(),
        held_metrics.local_addr().unwrap(),
        file_dir("file-run").display(),
        file_dir("file-data").display(),
        file_dir("file-logs").display(),
    );
    // Daemon::command passes --runtime-dir, --data-dir, --listen and --metrics.
    let daemon = Daemon::start_with(Some(&yaml), &["--log-dir", flag_logs.to_str().unwrap()]).await;
    assert_ne!(daemon.tcp, held_listen.local_addr().unwrap());
    assert_ne!(daemon.metrics, held_metrics.local_addr().unwrap());
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
    write_and_close(pipe, b"hello\n".to_vec()).await;
    wait_closed(&mut agent, "vm1", "qemu", 6).await;
    assert_eq!(read_log(&flag_logs, "vm1", "qemu"), b"hello\n");
    assert!(daemon.socket().exists());
    assert!(daemon.data_dir().join("state/token.key").exists());
    for name in ["file-run", "file-data", "file-logs"] {
        assert!(
            !file_dir(name).exists(),
            "{name} from the config file was used"
        );
    }
    // The file's other settings still apply (only what a flag names is overridden).
    let (_, metrics) = http_get(daemon.metrics, "/metrics");
    assert!(metrics.contains("conlog_"), "{metrics}");
}

/// `limits.guests: 1` and the default `max_size`; the file is changed to allow three guests
/// with 8 KiB files and to move `listen`, then SIGUSR1: a second guest is accepted, a new
/// stream gets the new default `max_size`, and the TCP listener is still the carried one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_reads_the_config_file_again() {
    let daemon = Daemon::start_with(Some("limits:\n  guests: 1\n"), &[]).await;
    let socket = daemon.socket();
    let mut first = agent(&socket).await;
    open_pipe(&mut first, "vm1", "qemu", None).await;
    let status = create_pipe(&mut first, "vm2", "qemu", None)
        .await
        .expect_err("one guest at most");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limits.guests"), "{status:?}");

    let config = daemon.data_dir().parent().unwrap().join("config.yaml");
    let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
    std::fs::write(
        &config,
        format!(
            "limits:\n  guests: 3\nlogs:\n  max_size: 8KiB\nlisten: {}\n",
            elsewhere.local_addr().unwrap()
        ),
    )
    .unwrap();
    drop(first);
    daemon.signal(Signal::USR1);
    let ready = wait_ready_count("the upgrade", 2, || daemon.stderr()).await;
    assert_eq!(field::<u32>(&ready, "pid="), Some(daemon.pid()), "{ready}");
    // The carried TCP listener, not the file's new address (a flag names it here anyway, but
    // the file's must not be bound either).
    assert_eq!(
        field::<std::net::SocketAddr>(&ready, "tcp="),
        Some(daemon.tcp),
        "{ready}"
    );

    let mut agent = agent(&socket).await;
    let (reply, _pipe) = open_pipe(&mut agent, "vm2", "qemu", None).await;
    assert!(reply.log_path.ends_with("vm2/qemu.log"), "{reply:?}");
    let listed = list_guests(&socket).await;
    let vm2 = get(&listed, "vm2", "qemu");
    assert_eq!(vm2.max_size, 8 << 10, "the new log default: {vm2:?}");
    open_pipe(&mut agent, "vm3", "qemu", None).await;
    let status = create_pipe(&mut agent, "vm4", "qemu", None)
        .await
        .expect_err("three guests at most");
    assert!(status.message().contains("limits.guests"), "{status:?}");
    // Still served on the carried port.
    let mut remote = daemon.tcp_channel("vm1").await.console();
    remote
        .read_history(proto::ReadHistoryRequest {
            guest: "vm1".into(),
            ..Default::default()
        })
        .await
        .expect("ReadHistory on the carried TCP listener");
}
