//! Crash guarantees under systemd (`keeper: auto` with `$NOTIFY_SOCKET` set), against the real
//! binary. systemd cannot run as PID 1 here, so the test plays its part exactly as its
//! documentation says (sd_notify(3), sd_listen_fds(3), systemd.service(5)
//! `FileDescriptorStoreMax=`): a datagram socket at `$NOTIFY_SOCKET` that stores each
//! descriptor sent with `FDSTORE=1` under its `FDNAME=` (the same file sent twice is stored
//! once, two files under one name are both kept), drops every descriptor of a name on
//! `FDSTOREREMOVE=1`, and passes the store to the next start as descriptors 3… with
//! `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`.
//!
//! A log pipe and a console guest write numbered lines across three `kill -9`s: no EPIPE, the
//! console connection is never closed, every byte is logged but what a killed process had
//! read (at most one read per kill). Streams that end leave the store; a clean stop empties it.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::crash_common;
use crate::support;

use command_fds::{CommandFdExt, FdMapping};
use crash_common::*;
use std::fs::File;
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

/// One stored descriptor.
struct Stored {
    name: String,
    fd: OwnedFd,
    file: (u64, u64, u32),
}

/// The service manager's side: the notify socket and the descriptor store.
struct FakeSystemd {
    path: PathBuf,
    store: Arc<Mutex<Vec<Stored>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Which open file a descriptor refers to, as systemd's `same_fd()` tells them apart without
/// kcmp(2): the inode and the access mode (a pipe's two ends are two files).
fn file_of(fd: impl AsFd) -> (u64, u64, u32) {
    let stat = rustix::fs::fstat(&fd).expect("fstat a stored descriptor");
    let mode = rustix::fs::fcntl_getfl(&fd).expect("fcntl F_GETFL") & rustix::fs::OFlags::RWMODE;
    (stat.st_dev, stat.st_ino, mode.bits())
}

impl FakeSystemd {
    fn start(path: PathBuf) -> Self {
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let store = Arc::new(Mutex::new(Vec::<Stored>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some((text, fds)) = receive(&socket) {
                        apply(&store, &text, fds);
                    }
                }
            })
        };
        Self {
            path,
            store,
            stop,
            thread: Some(thread),
        }
    }

    /// Names in the store, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .store
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Waits (bounded) until `done` holds for the names in the store.
    async fn wait(&self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let names = self.names();
            if done(&names) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "store: not {what} after {DEADLINE:?}: {names:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// What the next start receives: a copy of every stored descriptor, in store order.
    fn passed(&self) -> Vec<(String, OwnedFd)> {
        self.store
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.name.clone(), s.fd.try_clone().unwrap()))
            .collect()
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One notification: its text and descriptors.
fn receive(socket: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut buffer = [0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        socket,
        &mut [std::io::IoSliceMut::new(&mut buffer)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .ok()?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    let text = String::from_utf8(buffer[..received.bytes].to_vec()).expect("UTF-8 notification");
    Some((text, fds))
}

/// What systemd does with one notification's descriptor store fields.
fn apply(store: &Mutex<Vec<Stored>>, text: &str, fds: Vec<OwnedFd>) {
    let fields: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let field = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let name = field("FDNAME").unwrap_or("stored").to_owned();
    let mut store = store.lock().unwrap();
    if field("FDSTOREREMOVE") == Some("1") {
        store.retain(|s| s.name != name);
    }
    if field("FDSTORE") == Some("1") {
        assert_eq!(field("FDPOLL"), Some("0"), "pipes must stay stored: {text}");
        for fd in fds {
            let file = file_of(&fd);
            if !store.iter().any(|s| s.file == file) {
                store.push(Stored {
                    name: name.clone(),
                    fd,
                    file,
                });
            }
        }
    }
}

/// A `conlogd` run as systemd would start it.
struct Run {
    child: Child,
    stderr: PathBuf,
}

impl Run {
    /// Starts conlogd on `dir` with `$NOTIFY_SOCKET`, passing `passed` as descriptors 3… (the
    /// pid is only known after the fork: a shell sets `LISTEN_PID` to its own and `exec`s).
    async fn start(
        dir: &Path,
        systemd: &FakeSystemd,
        passed: Vec<(String, OwnedFd)>,
        n: u32,
    ) -> Self {
        let stderr = dir.join(format!("conlogd.{n}.stderr"));
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"[ -n "$LISTEN_FDS" ] && export LISTEN_PID=$$; exec "$0" "$@""#)
            .arg(conlogd_bin())
            .arg("--runtime-dir")
            .arg(dir.join("run"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .env("NOTIFY_SOCKET", &systemd.path)
            .env("FDSTORE", "4096")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(&stderr).unwrap())
            .stderr(File::create(&stderr).unwrap());
        if !passed.is_empty() {
            let names: Vec<&str> = passed.iter().map(|(n, _)| n.as_str()).collect();
            cmd.env("LISTEN_FDS", passed.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            let mappings = passed
                .into_iter()
                .enumerate()
                .map(|(i, (_, fd))| FdMapping {
                    parent_fd: fd,
                    child_fd: 3 + i as i32,
                })
                .collect();
            cmd.fd_mappings(mappings).unwrap();
        }
        let child = cmd.spawn().expect("spawn conlogd");
        drop(cmd);
        let run = Self { child, stderr };
        let deadline = Instant::now() + DEADLINE;
        while !run.text().contains("conlogd ready") {
            assert!(
                Instant::now() < deadline,
                "conlogd not ready: {}",
                run.text()
            );
            tokio::time::sleep(POLL).await;
        }
        run
    }

    fn text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_store_keeps_pipes_and_consoles_through_kill_9() {
    let dir = tempfile::Builder::new()
        .prefix("conlog-test-")
        .tempdir()
        .unwrap();
    let systemd = FakeSystemd::start(dir.path().join("notify.sock"));
    let socket = dir.path().join("run/conlogd.sock");
    let log_dir = dir.path().join("data/logs");
    let mut run = Run::start(dir.path(), &systemd, Vec::new(), 1).await;
    let mut agent = conlog::proto::agent_client::AgentClient::new(
        conlog::client::connect_local(&socket).await.unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (_, pipe) = open_pipe(&mut agent, "vm-p", "qemu", None).await;
    let pipe_writer = {
        let stop = stop.clone();
        std::thread::spawn(move || write_lines("pipe".into(), pipe, stop))
    };
    let console = open_console(&mut agent, "vm-c").await;
    let guest = UnixStream::connect(&console.guest_socket).unwrap();
    wait_guest_connected(&mut agent, "vm-c", "serial0", true).await;
    let console_writer = {
        let (guest, stop) = (guest.try_clone().unwrap(), stop.clone());
        std::thread::spawn(move || write_lines("console".into(), guest, stop))
    };
    systemd
        .wait("holding every descriptor", |names| {
            names.iter().any(|n| n.starts_with("pipe/vm-p/qemu/"))
                && names.iter().any(|n| n == "console/vm-c/serial0/connection")
                && names.iter().any(|n| n == "listener/local")
        })
        .await;
    drop(agent);

    let kills = 3;
    for n in 0..kills {
        tokio::time::sleep(Duration::from_millis(150)).await;
        run.kill();
        run = Run::start(dir.path(), &systemd, systemd.passed(), n + 2).await;
        assert!(
            run.text().contains("took back the descriptors"),
            "{}",
            run.text()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let pipe_outcome = pipe_writer.join().unwrap();
    let console_outcome = console_writer.join().unwrap();
    for outcome in [&pipe_outcome, &console_outcome] {
        assert!(
            outcome.error.is_none(),
            "{}: {:?}; conlogd:\n{}",
            outcome.who,
            outcome.error,
            run.text()
        );
    }
    let mut guest = guest;
    guest.write_all(b"the same connection\n").unwrap();

    let mut agent = conlog::proto::agent_client::AgentClient::new(
        conlog::client::connect_local(&socket).await.unwrap(),
    );
    // The writer closed its end: the stream ends and leaves the store (FDSTOREREMOVE).
    let info = wait_stream(&mut agent, "vm-p", "qemu", "closed", |s| !s.open).await;
    assert!(!info.broken, "{info:?}");
    let log = read_log(&log_dir, "vm-p", "qemu");
    let cut = cuts("vm-p", &log, &written("pipe", pipe_outcome.lines));
    assert!(
        cut.len() <= kills as usize && cut.iter().all(|c| *c <= PIPE_READ),
        "{cut:?}"
    );
    systemd
        .wait("without the ended pipe", |names| {
            !names.iter().any(|n| n.starts_with("pipe/"))
        })
        .await;
    let mut want = written("console", console_outcome.lines);
    want.extend_from_slice(b"the same connection\n");
    let deadline = Instant::now() + DEADLINE;
    let log = loop {
        let log = read_log(&log_dir, "vm-c", "serial0");
        if log.ends_with(b"the same connection\n") {
            break log;
        }
        assert!(Instant::now() < deadline, "the console's last line");
        tokio::time::sleep(POLL).await;
    };
    let cut = cuts("vm-c", &log, &want);
    assert!(
        cut.len() <= kills as usize && cut.iter().all(|c| *c <= CONSOLE_READ),
        "{cut:?}"
    );
    println!("{kills} kills under systemd: lost {cut:?} (console)");

    // A removed guest leaves the store.
    agent
        .remove_guest(conlog::proto::RemoveGuestRequest {
            guest: "vm-c".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    systemd
        .wait("without the removed console", |names| {
            !names.iter().any(|n| n.starts_with("console/"))
        })
        .await;
    // No duplicates: each name once (re-registrations of the same file are stored once).
    let names = systemd.names();
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(names, unique);
    // A clean stop empties the store: nothing is held for a daemon that is not coming back.
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&run.child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = run.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", run.text());
    systemd.wait("empty", |names| names.is_empty()).await;
}
