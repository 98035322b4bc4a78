//! The narrowest window of a log pipe, made deterministic with fault points: conlogd is killed
//! right after it handed a pipe's write end to its writer, while the keeper is slow to take
//! what it is given. The pipe's read end must already be held (CreateLogPipe answers, and
//! fd.sock sends the write end, only once the keeper holds what came before): after a restart
//! the writer's pipe still works and its bytes are logged, and the stream ends as soon as the
//! writer closes (the keeper let go of the hand-off's write end before it went out).
//!
//! Alone in its binary: the fault points are armed through this process's environment, which
//! the daemon inherits.

use crate::support;

use std::io::Write;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_right_after_a_hand_off_breaks_no_pipe() {
    let mut daemon = Daemon::start_env(&[(
        "CONLOG_FAULT_POINTS",
        "keeper.apply=sleep:300,handoff.sent=kill",
    )])
    .await;
    // Only the first run is armed: the restart below runs without fault points.
    daemon.env.clear();
    let mut agent = daemon.agent().await;
    let reply = create_pipe(&mut agent, "vm-f", "qemu", None)
        .await
        .expect("CreateLogPipe");
    let mut pipe = std::fs::File::from(claim(&reply).await.expect("the write end"));
    // The daemon killed itself right after sending the write end.
    let status = daemon.wait_exit().await;
    assert!(status.code().is_none(), "killed at handoff.sent: {status}");
    pipe.write_all(b"written while conlogd is down\n")
        .expect("the keeper holds the read end");
    daemon.restart().await;
    pipe.write_all(b"and after\n").unwrap();
    drop(pipe);
    let mut agent = daemon.agent().await;
    let want = b"written while conlogd is down\nand after\n";
    let info = wait_closed(&mut agent, "vm-f", "qemu", want.len() as u64).await;
    assert!(!info.broken, "{info:?}");
    assert_same("vm-f", &read_log(&daemon.log_dir(), "vm-f", "qemu"), want);
    daemon.stop().await;
}
