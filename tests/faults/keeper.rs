//! `conlogd keeper` against its documented protocol (src/keeper/protocol.rs), as a client other
//! than conlogd would speak it: mode 0600, one client at a time, its own uid only, names and
//! message sizes checked, a cap on descriptors from RLIMIT_NOFILE, descriptors handed back
//! intact, and it ends when told to or when its socket goes away.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;

use conlog::keeper::protocol::{self, CLEAR, ENTRY, ERROR, FETCH, OK, QUIT, REMOVE};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;
use support::*;

/// A pipe whose ends no child inherits: the tests of this binary run in parallel threads, and a
/// daemon another test spawns meanwhile must not hold an end this test expects to close.
fn cloexec_pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
}

struct Keeper {
    _dir: tempfile::TempDir,
    runtime_dir: PathBuf,
    child: Child,
}

impl Keeper {
    /// Starts a keeper, optionally under `prlimit --nofile=N`.
    fn start(nofile: Option<u64>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime_dir = dir.path().join("run");
        let mut cmd = match nofile {
            Some(n) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={n}:{n}")).arg(conlogd_bin());
                cmd
            }
            None => Command::new(conlogd_bin()),
        };
        let child = cmd
            .arg("keeper")
            .arg("--runtime-dir")
            .arg(&runtime_dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn conlogd keeper");
        let keeper = Self {
            _dir: dir,
            runtime_dir,
            child,
        };
        let deadline = Instant::now() + DEADLINE;
        while !keeper.socket().exists() {
            assert!(Instant::now() < deadline, "no keeper.sock");
            std::thread::sleep(POLL);
        }
        keeper
    }

    fn socket(&self) -> PathBuf {
        self.runtime_dir.join("keeper.sock")
    }

    /// Waits (bounded) for the process to exit.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the keeper did not exit");
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects and returns the socket and the greeting.
fn connect(path: &Path) -> (OwnedFd, Vec<u8>) {
    let socket = protocol::seqpacket().unwrap();
    rustix::net::connect(&socket, &rustix::net::SocketAddrUnix::new(path).unwrap()).unwrap();
    let greeting = protocol::recv(&socket).unwrap().bytes;
    (socket, greeting)
}

fn served(path: &Path) -> OwnedFd {
    let (socket, greeting) = connect(path);
    assert_eq!(greeting, [&[OK], protocol::HELLO].concat());
    socket
}

fn request(socket: &OwnedFd, bytes: &[u8], fd: Option<&OwnedFd>) -> Vec<u8> {
    let fds: Vec<_> = fd.iter().map(|fd| fd.as_fd()).collect();
    protocol::send(socket, bytes, &fds).unwrap();
    protocol::recv(socket).unwrap().bytes
}

fn fetch(socket: &OwnedFd) -> Vec<(String, OwnedFd)> {
    protocol::send(socket, &[FETCH], &[]).unwrap();
    let mut entries = Vec::new();
    loop {
        let mut message = protocol::recv(socket).unwrap();
        match message.bytes[0] {
            ENTRY => entries.push((
                String::from_utf8(message.bytes[1..].to_vec()).unwrap(),
                message.fds.pop().expect("a descriptor with each entry"),
            )),
            OK => {
                assert_eq!(message.bytes[1..], (entries.len() as u32).to_le_bytes());
                return entries;
            }
            other => panic!("unexpected reply 0x{other:02x}: {:?}", message.bytes),
        }
    }
}

#[test]
fn keeper_holds_and_hands_back_by_name() {
    let keeper = Keeper::start(None);
    let mode = std::fs::metadata(keeper.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "keeper.sock is {mode:o}");
    let client = served(&keeper.socket());

    // A second client is told the keeper is busy, and closed.
    let (second, greeting) = connect(&keeper.socket());
    assert_eq!(greeting[0], ERROR);
    assert!(greeting.starts_with(b"\x01busy"), "{greeting:?}");
    assert_eq!(
        protocol::recv(&second).unwrap_err().kind(),
        std::io::ErrorKind::UnexpectedEof
    );

    // Store a pipe's read end; the writer keeps writing while only the keeper holds it.
    let (read, write) = cloexec_pipe();
    assert_eq!(request(&client, b"Spipe/vm/qemu/1", Some(&read)), [OK]);
    drop(read);
    rustix::io::write(&write, b"kept\n").expect("no EPIPE: the keeper holds the read end");
    // Replacing a name closes what it held; removing an unknown name is fine.
    let (other, _other_write) = cloexec_pipe();
    assert_eq!(request(&client, b"Sother", Some(&other)), [OK]);
    assert_eq!(request(&client, b"Rnever-stored", None), [OK]);
    // Bad names are refused, the connection stays usable.
    for bad in [&b"S"[..], b"Sa:b", b"Sa b"] {
        let reply = request(&client, bad, Some(&other));
        assert_eq!(reply[0], ERROR, "{bad:?}: {reply:?}");
    }
    // Everything comes back, by name, and is the same pipe.
    let entries = fetch(&client);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["other", "pipe/vm/qemu/1"]);
    let mut buffer = [0u8; 16];
    let n = rustix::io::read(&entries[1].1, &mut buffer).unwrap();
    assert_eq!(&buffer[..n], b"kept\n");
    drop(entries);
    // Removed: the writer sees EPIPE once nobody holds the read end.
    assert_eq!(
        request(&client, &[&[REMOVE], &b"pipe/vm/qemu/1"[..]].concat(), None),
        [OK]
    );
    assert_eq!(
        rustix::io::write(&write, b"x").unwrap_err(),
        rustix::io::Errno::PIPE
    );
    assert_eq!(request(&client, &[CLEAR], None), [OK]);
    assert!(fetch(&client).is_empty());

    // A protocol error (a store without its descriptor) ends the connection with a reason;
    // the next client is served.
    protocol::send(&client, b"Sname", &[]).unwrap();
    let reply = protocol::recv(&client).unwrap().bytes;
    assert_eq!(reply[0], ERROR, "{reply:?}");
    assert_eq!(
        protocol::recv(&client).unwrap_err().kind(),
        std::io::ErrorKind::UnexpectedEof
    );
    let client = served(&keeper.socket());
    // An oversized message too.
    rustix::net::send(&client, &[b'S'; 600], rustix::net::SendFlags::empty()).unwrap();
    assert_eq!(protocol::recv(&client).unwrap().bytes[0], ERROR);
    drop(client);

    // Q: the keeper lets go and exits, removing its socket.
    let mut keeper = keeper;
    let client = served(&keeper.socket());
    assert_eq!(request(&client, &[QUIT], None), [OK]);
    assert!(keeper.wait_exit().success());
    assert!(!keeper.socket().exists());
}

/// Names the keeper socket [`other_uid_probe`] connects to; set only on the probe's command.
const PROBE_SOCKET: &str = "CONLOG_TEST_KEEPER_PROBE_SOCKET";

/// The client of [`keeper_refuses_other_uids`]: run by that test, as uid 65534, from a copy of
/// this test binary; connects to the keeper's socket and prints what it received (`[]` when
/// the keeper closed the connection without a greeting). Ignored in a normal run.
#[test]
#[ignore = "a helper, run as another uid by keeper_refuses_other_uids"]
fn other_uid_probe() {
    let Some(path) = std::env::var_os(PROBE_SOCKET) else {
        panic!("run only by keeper_refuses_other_uids, which sets {PROBE_SOCKET}");
    };
    let socket = protocol::seqpacket().unwrap();
    rustix::net::connect(&socket, &rustix::net::SocketAddrUnix::new(path).unwrap())
        .expect("connect to the keeper's socket");
    rustix::net::sockopt::set_socket_timeout(
        &socket,
        rustix::net::sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(10)),
    )
    .unwrap();
    let received = match protocol::recv(&socket) {
        Ok(message) => message.bytes,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Vec::new(),
        Err(e) => panic!("no answer and no end from the keeper: {e}"),
    };
    // On a line of its own: libtest has just printed the test's name without a newline.
    println!("\nprobe received: {received:?}");
}

#[test]
fn keeper_refuses_other_uids() {
    let keeper = Keeper::start(Some(64));
    // Another uid, even through a socket made reachable for it, gets no greeting.
    std::fs::set_permissions(&keeper.runtime_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(keeper.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    // The client is this binary's `other_uid_probe`, from a copy uid 65534 can execute
    // wherever the checkout is.
    let copy = tempfile::tempdir().unwrap();
    std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = copy.path().join("probe");
    std::fs::copy(std::env::current_exe().unwrap(), &probe).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_, module) = module_path!().split_once("::").expect("crate::module");
    let output = run_bounded(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&probe)
            .args(["--exact", &format!("{module}::other_uid_probe")])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env(PROBE_SOCKET, keeper.socket()),
    );
    assert!(output.status.success(), "{}", describe(&output));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.lines().any(|line| line == "probe received: []"),
        "a client of another uid is closed without a greeting: {}",
        describe(&output)
    );
}

#[test]
fn keeper_caps_descriptors() {
    let mut keeper = Keeper::start(Some(64));
    // The cap: RLIMIT_NOFILE (64) less the keeper's reserve of 32.
    let client = served(&keeper.socket());
    let (read, _write) = cloexec_pipe();
    let mut stored = 0;
    let refusal = loop {
        let reply = request(&client, format!("S{stored}").as_bytes(), Some(&read));
        if reply[0] != OK {
            break String::from_utf8_lossy(&reply[1..]).into_owned();
        }
        stored += 1;
        assert!(stored <= 64, "no cap");
    };
    assert_eq!(stored, 32, "{refusal}");
    assert!(refusal.contains("cap"), "{refusal}");
    // Replacing a held name is still allowed at the cap.
    assert_eq!(request(&client, b"S0", Some(&read)), [OK]);
    assert_eq!(fetch(&client).len(), 32);
    drop(client);

    // Its socket removed, the keeper has nothing left to do.
    std::fs::remove_file(keeper.socket()).unwrap();
    assert!(keeper.wait_exit().success());
}
