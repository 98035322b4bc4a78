//! The log-pipe hand-off done from Python exactly as a Python compute agent would: grpcio stubs
//! generated from `proto/`, `grpc.insecure_channel("unix:…")` and `socket.recv_fds`
//! (`tests/python/agent_handoff.py`).
//!
//! Needs `python3` with `grpcio` and `grpcio-tools` (`pip install grpcio grpcio-tools`); when
//! they are missing the test fails and says so: it is never skipped.

use crate::support;

use std::process::Command;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_agent_hands_off_a_log_pipe() {
    let mut probe = Command::new("python3");
    probe.args([
        "-c",
        "import grpc, grpc_tools.protoc, socket; socket.recv_fds",
    ]);
    let output = match probe.output() {
        Ok(output) => output,
        Err(e) => panic!(
            "python3 is required by this test and could not be run ({e}); install Python 3.9+ \
             and `pip install grpcio grpcio-tools`"
        ),
    };
    assert!(
        output.status.success(),
        "python3 lacks grpcio / grpcio-tools (or socket.recv_fds, Python 3.9+); run \
         `pip install grpcio grpcio-tools`. {}",
        describe(&output)
    );

    let daemon = Daemon::start().await;
    let mut cmd = Command::new("python3");
    cmd.arg(repo_dir().join("tests/python/agent_handoff.py"))
        .arg(daemon.socket())
        .arg(repo_dir().join("proto"))
        .arg(daemon.log_dir());
    let output = run_bounded_async(cmd).await;
    assert!(
        output.status.success(),
        "the Python agent failed: {}\n--- conlogd ---\n{}",
        describe(&output),
        daemon.stderr()
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("python agent hand-off: ok"));

    // The daemon agrees with what the script saw.
    let mut agent = daemon.agent().await;
    let info = find_stream(&mut agent, "py-agent-vm", "qemu")
        .await
        .unwrap();
    assert!(!info.open);
    assert_eq!(info.offset, 2000 * 18 + 256 * 40);
}
