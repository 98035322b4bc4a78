//! A real QEMU live migration between two `conlogd` nodes (docs/design.md, "Live migration"):
//! the Debian kernel + busybox initramfs guest of `qemu_guest.rs` boots under TCG on node A's
//! console; a destination QEMU started with `-incoming unix:…` has its serial port on node B's
//! console, created with `migrate_from` A; QMP `migrate` moves the running guest; A's agent
//! says where it went (`RemoveGuest` with `moved_to`). A command typed through `AttachConsole`
//! on B runs in the migrated guest and its output comes back, and B's history from its oldest
//! byte is A's boot output (imported) followed by the command's output, offsets continuous.
//!
//! One guest, 128 MiB of memory, bounded deadlines: it fits the 2-CPU test machine (about a
//! minute there under load, most of it the TCG boot).

use super::qemu_guest::{
    build_guest, one_guest_at_a_time, require_qemu, Client, Qemu, BANNER, BOOT_DEADLINE,
    COMMAND_DEADLINE, DEVICE, GUEST, KERNEL_LINE, PROMPT,
};
use crate::migration_common::*;
use crate::support::*;

use conlog::proto::{self, attach::Mode, history_event::Kind};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Migrating 128 MiB over a UNIX socket under TCG on a loaded machine.
const MIGRATE_DEADLINE: Duration = Duration::from_secs(120);
/// Printed only by the command typed on B (the shell computes the 42).
const MARKER: &str = "conlog-migrated-42";

/// The serial port of the guest on the console socket `path` (as `conlogctl create-console
/// --print qemu-legacy` renders it), plus `more` arguments.
fn wiring(path: &str, more: &[String]) -> Vec<String> {
    let id = format!("conlog-{DEVICE}");
    let mut args: Vec<String> = [
        "-chardev".to_owned(),
        format!("socket,id={id},path={path},reconnect=1"),
        "-serial".to_owned(),
        format!("chardev:{id}"),
    ]
    .into();
    args.extend_from_slice(more);
    args
}

/// A QMP connection to a QEMU's monitor socket.
struct Qmp {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &Path) -> Self {
        let stream = bounded("connect to QMP", async {
            loop {
                if let Ok(stream) = UnixStream::connect(path).await {
                    return stream;
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        let (read, write) = stream.into_split();
        let mut qmp = Self {
            lines: BufReader::new(read).lines(),
            write,
        };
        let greeting = qmp.line().await;
        assert!(greeting.contains("\"QMP\""), "QMP greeting: {greeting}");
        let answer = qmp.execute(r#"{"execute":"qmp_capabilities"}"#).await;
        assert!(answer.contains("\"return\""), "qmp_capabilities: {answer}");
        qmp
    }

    async fn line(&mut self) -> String {
        bounded("a QMP line", self.lines.next_line())
            .await
            .expect("read QMP")
            .expect("QMP closed")
    }

    /// Sends `command` and returns its answer (events in between are skipped).
    async fn execute(&mut self, command: &str) -> String {
        self.write
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("write QMP");
        loop {
            let line = self.line().await;
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return line;
            }
        }
    }
}

/// Waits until `done` holds on `node`'s whole history file of the guest, failing if `qemu`
/// exits first.
async fn wait_log(
    what: &str,
    log: &Path,
    qemu: &mut Qemu,
    deadline: Duration,
    done: impl Fn(&str) -> bool,
) {
    let until = Instant::now() + deadline;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        if done(&text) {
            return;
        }
        if let Some(status) = qemu.exited() {
            panic!(
                "QEMU exited ({status}) waiting for {what}:\n{}\nlog:\n{text}",
                qemu.output()
            );
        }
        assert!(
            Instant::now() < until,
            "no {what} within {deadline:?}; QEMU:\n{}\nlog:\n{text}",
            qemu.output()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The guest boots on A, QEMU migrates it to a destination QEMU on B, and the console goes on
/// on B: typed commands run, history is one stream from offset 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_qemu_guest_live_migrates_and_its_console_goes_on_on_the_destination() {
    let started = Instant::now();
    require_qemu();
    let _one = one_guest_at_a_time().await;
    let (kernel, initrd) = build_guest().await;
    let fleet = Fleet::new();
    let (a, b) = (fleet.node().await, fleet.node().await);
    let dir = tempfile::Builder::new()
        .prefix("conlog-qemu-mig-")
        .tempdir()
        .expect("temporary directory");
    let mig_socket = dir.path().join("mig.sock");
    let qmp_socket = dir.path().join("qmp-a.sock");

    // The guest boots on A.
    let mut agent_a = a.agent().await;
    let on_a = agent_a
        .create_console(proto::CreateConsoleRequest {
            guest: GUEST.into(),
            device: DEVICE.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("CreateConsole on A: {s:?}"))
        .into_inner();
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_socket.display());
    let mut source = Qemu::start_with(
        &kernel,
        &initrd,
        "128",
        &wiring(&on_a.guest_socket, &["-qmp".into(), qmp_arg]),
    );
    let log_a = a.log_path(GUEST, DEVICE);
    let booting = Instant::now();
    wait_log(
        "the shell prompt on A",
        &log_a,
        &mut source,
        BOOT_DEADLINE,
        |t| t.contains(BANNER) && t.contains(PROMPT),
    )
    .await;
    let booted = booting.elapsed();

    // B creates the console from A; the destination QEMU waits for the migration.
    let from = migrate_from(&a, GUEST, 0).await;
    let on_b = create_migrating_console(&b, GUEST, from)
        .await
        .expect("CreateConsole with migrate_from on B");
    let incoming = format!("unix:{}", mig_socket.display());
    let mut destination = Qemu::start_with(
        &kernel,
        &initrd,
        "128",
        &wiring(&on_b.guest_socket, &["-incoming".into(), incoming.clone()]),
    );
    until("the destination's migration socket", async || {
        mig_socket.exists()
    })
    .await;

    // QMP migrate on A, until it completed.
    let migrating = Instant::now();
    let mut qmp = Qmp::connect(&qmp_socket).await;
    let answer = qmp
        .execute(&format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"{incoming}"}}}}"#
        ))
        .await;
    assert!(answer.contains("\"return\""), "migrate: {answer}");
    let until_done = Instant::now() + MIGRATE_DEADLINE;
    loop {
        let status = qmp.execute(r#"{"execute":"query-migrate"}"#).await;
        if status.contains("\"completed\"") {
            break;
        }
        assert!(
            !status.contains("\"failed\"") && !status.contains("\"cancelled\""),
            "migration failed: {status}\nsource QEMU:\n{}\ndestination QEMU:\n{}",
            source.output(),
            destination.output()
        );
        if let Some(status) = destination.exited() {
            panic!(
                "the destination QEMU exited ({status}) during the migration:\n{}",
                destination.output()
            );
        }
        assert!(
            Instant::now() < until_done,
            "migration not completed within {MIGRATE_DEADLINE:?}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let migrated = migrating.elapsed();

    // The source QEMU is done (paused): it exits, A's agent says where the guest went.
    drop(qmp);
    source.kill();
    wait_guest_connected(&mut agent_a, GUEST, DEVICE, false).await;
    let source_end = stream_info(&a, GUEST, DEVICE)
        .await
        .expect("listed on A")
        .offset;
    remove_moved(&a, GUEST, &b).await;
    wait_imported(&b, GUEST, DEVICE, source_end).await;

    // A command typed on B runs in the migrated guest.
    let channel = conlog::client::connect_local(&b.socket())
        .await
        .expect("connect to B's local socket");
    let writer = Client::attach(channel, "writer on B", Mode::ReadWrite).await;
    writer.type_text("echo conlog-migrated-$((6*7))\n").await;
    let typed = Instant::now();
    let until_echo = Instant::now() + COMMAND_DEADLINE;
    while !writer.snapshot(|t| t.text().contains(MARKER)) {
        if let Some(status) = destination.exited() {
            panic!(
                "the destination QEMU exited ({status}):\n{}",
                destination.output()
            );
        }
        assert!(
            Instant::now() < until_echo,
            "no {MARKER} on B within {COMMAND_DEADLINE:?}\n{}\ndestination QEMU:\n{}\nB:\n{}",
            writer.describe(),
            destination.output(),
            b.all_stderr()
        );
        tokio::time::sleep(POLL).await;
    }
    let echoed = typed.elapsed();

    // B's history: A's boot output, then the command's output; offsets continuous from 0.
    let history = whole_history(&b, GUEST, DEVICE).await;
    history.ended.clone().expect("B's history ends cleanly");
    assert_eq!(history.first_data(), Some(0));
    assert!(history.gaps().is_empty(), "{:?}", history.gaps());
    let data = history.data();
    let text = String::from_utf8_lossy(&data);
    let (imported, own) = data.split_at(usize::try_from(source_end).expect("a small offset"));
    let imported = String::from_utf8_lossy(imported);
    let own = String::from_utf8_lossy(own);
    assert!(
        imported.contains(KERNEL_LINE) && imported.contains(BANNER),
        "the boot output is in B's history before {source_end}:\n{imported}"
    );
    assert_eq!(text.matches(MARKER).count(), 1, "{text}");
    assert!(own.contains(MARKER), "after {source_end}: {own}");
    let migrated_in = history.events(Kind::MigratedIn);
    assert_eq!(migrated_in.len(), 1, "{migrated_in:?}");
    assert_eq!(migrated_in[0].0, source_end, "{migrated_in:?}");
    eprintln!(
        "qemu migration: boot {booted:?}, migrate {migrated:?}, echo on B {echoed:?}, \
         whole test {:?} ({source_end} bytes imported)",
        started.elapsed()
    );
}
