//! What systemd sees (deploy/systemd: `Type=notify`; docs/operations.md, "Troubleshooting"):
//! `READY=1` with the daemon's pid on `$NOTIFY_SOCKET` once it serves (path and abstract
//! sockets), again after an in-place upgrade (same pid), `STOPPING=1` at SIGTERM and exit 0;
//! a start that fails sends nothing and exits 2 (configuration) or 1 (start).

use crate::support;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// A datagram socket playing systemd's notification socket.
struct NotifySocket {
    socket: UnixDatagram,
    /// The value for `$NOTIFY_SOCKET`.
    env: String,
}

impl NotifySocket {
    fn path(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        Self::new(socket, path.display().to_string())
    }

    fn abstract_named(name: &str) -> Self {
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&address).expect("bind the abstract notify socket");
        Self::new(socket, format!("@{name}"))
    }

    fn new(socket: UnixDatagram, env: String) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self { socket, env }
    }

    /// The next message, waiting at most [`DEADLINE`]; panics with `what` if none comes.
    fn next(&self, what: &str) -> String {
        self.try_next(DEADLINE)
            .unwrap_or_else(|| panic!("no notification ({what}) within {DEADLINE:?}"))
    }

    /// The next state notification: descriptor-store messages (`FDSTORE=1`,
    /// `FDSTOREREMOVE=1`, the crash keeper's, tested in tests/faults/crash_systemd.rs) are skipped.
    fn try_next(&self, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        let mut buffer = [0u8; 4096];
        loop {
            match self.socket.recv(&mut buffer) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                    if text.contains("FDSTORE=1") || text.contains("FDSTOREREMOVE=1") {
                        continue;
                    }
                    return Some(text);
                }
                Err(_) if Instant::now() < deadline => continue,
                Err(_) => return None,
            }
        }
    }
}

/// `conlogd` on fresh directories with `$NOTIFY_SOCKET` set, not yet started.
struct Unit {
    dir: tempfile::TempDir,
}

impl Unit {
    fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("conlog-systemd-")
                .tempdir()
                .unwrap(),
        }
    }

    fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn command(&self, notify: &NotifySocket, extra: &[&str]) -> Command {
        let mut cmd = Command::new(conlogd_bin());
        cmd.arg("--runtime-dir")
            .arg(self.runtime_dir())
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--metrics", "127.0.0.1:0"])
            .args(extra)
            .env("NOTIFY_SOCKET", &notify.env)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }
}

/// `--listen` on a free port.
const LOCAL: &[&str] = &["--listen", "127.0.0.1:0"];

/// Waits (bounded) for `child` to exit; its status code.
fn wait_code(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "conlogd did not exit");
        std::thread::sleep(POLL);
    }
}

fn signal(child: &Child, signal: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_child(child), signal).unwrap();
}

/// `READY=1` comes with the daemon's pid once it serves (the local socket answers at once),
/// again after an in-place upgrade with the same pid; SIGTERM sends `STOPPING=1` and exits 0.
/// Both forms of `$NOTIFY_SOCKET` (a path, and `@name` for an abstract socket) are used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_notified_once_serving_and_after_each_upgrade() {
    let unit = Unit::new();
    let path_socket = NotifySocket::path(&unit.dir.path().join("notify"));
    let name = format!("conlog-test-notify-{}", std::process::id());
    for notify in [path_socket, NotifySocket::abstract_named(&name)] {
        let mut child = unit.command(&notify, LOCAL).spawn().unwrap();
        let pid = child.id();
        let ready = notify.next("start");
        assert!(
            ready.lines().any(|l| l == "READY=1"),
            "{}: {ready:?}",
            notify.env
        );
        assert!(
            ready.lines().any(|l| l == format!("MAINPID={pid}")),
            "{ready:?}"
        );
        // Ready means serving: the local socket answers now, with no retry.
        let channel = conlog::client::connect_local(&unit.runtime_dir().join("conlogd.sock"))
            .await
            .expect("the local socket accepts at READY=1");
        conlog::proto::agent_client::AgentClient::new(channel)
            .list_guests(conlog::proto::ListGuestsRequest::default())
            .await
            .expect("ListGuests at READY=1");

        signal(&child, rustix::process::Signal::USR1);
        let again = notify.next("after the upgrade");
        assert!(
            again.lines().any(|l| l == "READY=1")
                && again.lines().any(|l| l == format!("MAINPID={pid}")),
            "after the upgrade: {again:?}"
        );

        signal(&child, rustix::process::Signal::TERM);
        let stopping = notify.next("SIGTERM");
        assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
        assert_eq!(wait_code(&mut child), Some(0), "exit code after SIGTERM");
    }
}

/// A configuration error exits 2, a start error (another daemon holds the runtime directory,
/// the TCP address is taken) exits 1; each prints one line and notifies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_exit_2_or_1_and_notify_nothing() {
    let unit = Unit::new();
    let notify = NotifySocket::path(&unit.dir.path().join("notify"));
    let config = unit.dir.path().join("bad.yaml");
    std::fs::write(&config, "logs:\n  max_sise: 3\n").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_address = taken.local_addr().unwrap().to_string();

    let mut running = unit.command(&notify, LOCAL).spawn().unwrap();
    assert!(notify.next("the first daemon").contains("READY=1"));

    let other = Unit::new();
    let other_notify = NotifySocket::path(&other.dir.path().join("notify"));
    for (what, mut cmd, code, needle) in [
        (
            "an unknown config key",
            unit.command(
                &notify,
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--config",
                    config.to_str().unwrap(),
                ],
            ),
            2,
            "max_sise",
        ),
        (
            "a second daemon on the same runtime directory",
            unit.command(&notify, LOCAL),
            1,
            "Another conlogd",
        ),
        (
            "a TCP address in use",
            other.command(&other_notify, &["--listen", &taken_address]),
            1,
            &taken_address,
        ),
    ] {
        let output = run_bounded(&mut cmd);
        assert_eq!(
            output.status.code(),
            Some(code),
            "{what}: {}",
            describe(&output)
        );
        let stderr = strip_ansi(String::from_utf8_lossy(&output.stderr).trim());
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.contains(needle), "{what}: {stderr}");
        assert!(
            last.starts_with("conlogd: "),
            "{what}: the reason is the last line: {stderr}"
        );
        for socket in [&notify, &other_notify] {
            assert_eq!(
                socket.try_next(Duration::from_millis(200)),
                None,
                "{what}: a failed start notified systemd"
            );
        }
    }
    signal(&running, rustix::process::Signal::TERM);
    assert!(notify.next("SIGTERM").contains("STOPPING=1"));
    assert_eq!(wait_code(&mut running), Some(0));
}
