//! Pipe hand-offs that the agent has not claimed yet when the daemon changes hands (an in-place
//! upgrade, a takeover): they are carried with everything else (docs/operations.md), so the
//! agent claims them from the new image with the token it already has, and the bytes written
//! into them are logged; a token already used stays used.

use crate::support;
use crate::upgrade_common;

use rustix::process::Signal;
use std::fs::File;
use std::io::Write;
use support::*;
use upgrade_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_handoffs_survive_an_upgrade_and_a_takeover() {
    let mut daemon = Daemon::start().await;
    let socket = daemon.socket();
    let mut setup = agent(&socket).await;
    // Two unclaimed hand-offs, and one claimed (its token must stay used).
    let first = create_pipe(&mut setup, "vm1", "qemu", None).await.unwrap();
    let second = create_pipe(&mut setup, "vm2", "qemu", None).await.unwrap();
    let (used, mut used_pipe) = open_pipe(&mut setup, "vm3", "qemu", None).await;
    drop(setup);

    daemon.signal(Signal::USR1);
    wait_ready_count("the upgrade", 2, || daemon.stderr()).await;
    let mut pipe = File::from(claim(&first).await.expect("claim after the upgrade"));
    pipe.write_all(b"vm1 after the upgrade\n").unwrap();
    drop(pipe);
    claim(&used)
        .await
        .expect_err("a token used before the upgrade stays used");

    let mut successor = Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    successor.wait_ready().await;
    assert_eq!(daemon.wait_exit().await.code(), Some(0));
    let mut pipe = File::from(claim(&second).await.expect("claim after the takeover"));
    pipe.write_all(b"vm2 after the takeover\n").unwrap();
    drop(pipe);
    used_pipe.write_all(b"vm3 all along\n").unwrap();
    drop(used_pipe);

    let mut agent = agent(&socket).await;
    wait_closed(&mut agent, "vm1", "qemu", 22).await;
    wait_closed(&mut agent, "vm2", "qemu", 23).await;
    wait_closed(&mut agent, "vm3", "qemu", 14).await;
    let log_dir = daemon.log_dir();
    assert_eq!(
        read_log(&log_dir, "vm1", "qemu"),
        b"vm1 after the upgrade\n"
    );
    assert_eq!(
        read_log(&log_dir, "vm2", "qemu"),
        b"vm2 after the takeover\n"
    );
    assert_eq!(read_log(&log_dir, "vm3", "qemu"), b"vm3 all along\n");
    assert!(successor.stop().await.success());
}
