//! `consoles.socket_group` (docs/operations.md, "Consoles"): the guest sockets and their
//! directories belong to the configured group, so that QEMU running as another user in that
//! group (libvirt's `libvirt-qemu` in `kvm`) can connect, and nobody outside it can. Checked
//! against the real binary with a probe of another uid (this test binary run under `setpriv`,
//! as tests/faults/keeper.rs does), through an upgrade (a changed group applied to carried
//! sockets), a crash and a restart. An unknown group is a start-up error naming the key
//! (tests/daemon/config.rs).

use crate::support::*;
use crate::upgrade_common::wait_ready_count;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const PROBE_SOCKET: &str = "CONLOG_TEST_GROUP_PROBE_SOCKET";
const PROBE_SEND: &str = "CONLOG_TEST_GROUP_PROBE_SEND";
/// Groups no account here has: only the probe is given them.
const GROUP: u32 = 47_421;
const OTHER_GROUP: u32 = 47_422;
/// The probe's uid and primary gid (nobody, nogroup).
const NOBODY: u32 = 65_534;

/// Run only by the test below, as another uid: connects to the socket named in the
/// environment, sends a line, and says on stdout whether it could.
#[test]
#[ignore = "a probe run by guest_sockets_belong_to_the_socket_group as another uid"]
fn guest_socket_probe() {
    use std::io::Write;
    let Some(path) = std::env::var_os(PROBE_SOCKET) else {
        panic!("run only by guest_sockets_belong_to_the_socket_group, which sets {PROBE_SOCKET}");
    };
    // On a line of its own: libtest has just printed the test's name without a newline.
    match std::os::unix::net::UnixStream::connect(&path) {
        Ok(mut stream) => {
            let line = std::env::var(PROBE_SEND).unwrap_or_default();
            stream.write_all(line.as_bytes()).expect("write");
            println!("\nprobe connected");
        }
        Err(e) => println!("\nprobe refused: {:?}", e.kind()),
    }
}

/// A copy of this test binary that uid 65534 can execute wherever the checkout is.
struct Probe {
    _dir: tempfile::TempDir,
    binary: PathBuf,
}

impl Probe {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let binary = dir.path().join("probe");
        std::fs::copy(std::env::current_exe().unwrap(), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { _dir: dir, binary }
    }

    /// Runs the probe as uid 65534 with `groups` as its only supplementary groups; returns
    /// what it said ("connected" or "refused: KIND").
    fn connect(&self, socket: &Path, groups: &[u32], send: &str) -> String {
        let (_, module) = module_path!().split_once("::").expect("crate::module");
        let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
        let output = run_bounded(
            Command::new("setpriv")
                .arg(format!("--reuid={NOBODY}"))
                .arg(format!("--regid={NOBODY}"))
                .arg(format!("--groups={}", groups.join(",")))
                .arg(&self.binary)
                .args(["--exact", &format!("{module}::guest_socket_probe")])
                .args(["--ignored", "--nocapture", "--test-threads=1"])
                .env(PROBE_SOCKET, socket)
                .env(PROBE_SEND, send),
        );
        assert!(output.status.success(), "{}", describe(&output));
        let said = String::from_utf8_lossy(&output.stdout);
        said.lines()
            .find_map(|line| line.strip_prefix("probe "))
            .unwrap_or_else(|| panic!("the probe said nothing: {}", describe(&output)))
            .to_owned()
    }
}

/// Group and permission bits of `path`.
fn group_and_mode(path: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.gid(), meta.permissions().mode() & 0o777)
}

/// Waits until `guest`'s console log holds `text`.
async fn wait_logged(daemon: &Daemon, guest: &str, text: &str) {
    let path = daemon.log_path(guest, DEVICE);
    let until = std::time::Instant::now() + DEADLINE;
    while !String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).contains(text) {
        assert!(
            std::time::Instant::now() < until,
            "{text:?} never reached the log of {guest}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Checks the group and modes of a console's sockets and directories.
fn assert_owned(socket: &Path, gid: u32, when: &str) {
    let dir = socket.parent().unwrap();
    let consoles = dir.parent().unwrap();
    assert_eq!(group_and_mode(socket), (gid, 0o660), "guest socket, {when}");
    assert_eq!(group_and_mode(dir), (gid, 0o750), "guest directory, {when}");
    assert_eq!(group_and_mode(consoles), (gid, 0o750), "consoles/, {when}");
    let client = dir.join("serial0.client.sock");
    let own = rustix::process::getgid().as_raw();
    assert_eq!(
        group_and_mode(&client),
        (own, 0o660),
        "client.sock stays conlogd's, {when}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_sockets_belong_to_the_socket_group() {
    let config = |gid: u32| format!("consoles:\n  socket_group: \"{gid}\"\n");
    let mut daemon = Daemon::start_with(Some(&config(GROUP)), &[]).await;
    // The test's directories must let another uid through, as /run/conlog (0755) does.
    let root = daemon.runtime_dir().parent().unwrap().to_owned();
    for dir in [&root, &daemon.runtime_dir().to_owned()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, "grp1").await;
    let socket = PathBuf::from(&console.guest_socket);
    assert_owned(&socket, GROUP, "created");

    let probe = Probe::new();
    assert_eq!(
        probe.connect(&socket, &[OTHER_GROUP], "outsider"),
        "refused: PermissionDenied",
        "a uid outside the group"
    );
    assert_eq!(probe.connect(&socket, &[GROUP], "member-1\n"), "connected");
    wait_logged(&daemon, "grp1", "member-1").await;

    // An upgrade carries the sockets; they keep their group.
    daemon.signal(rustix::process::Signal::USR1);
    wait_ready_count("after SIGUSR1", 2, || daemon.stderr()).await;
    assert_owned(&socket, GROUP, "after an upgrade");
    assert_eq!(probe.connect(&socket, &[GROUP], "member-2\n"), "connected");
    wait_logged(&daemon, "grp1", "member-2").await;

    // Another group in the config: the next image gives it to the carried sockets.
    std::fs::write(root.join("config.yaml"), config(OTHER_GROUP)).unwrap();
    daemon.signal(rustix::process::Signal::USR1);
    wait_ready_count("after the second SIGUSR1", 3, || daemon.stderr()).await;
    assert_owned(&socket, OTHER_GROUP, "after an upgrade with another group");
    assert_eq!(
        probe.connect(&socket, &[GROUP], "old-group"),
        "refused: PermissionDenied"
    );
    assert_eq!(
        probe.connect(&socket, &[OTHER_GROUP], "member-3\n"),
        "connected"
    );
    wait_logged(&daemon, "grp1", "member-3").await;

    // A crash (the keeper holds the sockets) and a clean restart (bound anew).
    daemon.kill().await;
    daemon.restart().await;
    assert_owned(&socket, OTHER_GROUP, "after a crash");
    daemon.stop().await;
    daemon.restart().await;
    assert_owned(&socket, OTHER_GROUP, "after a restart");
    assert_eq!(
        probe.connect(&socket, &[OTHER_GROUP], "member-4\n"),
        "connected"
    );
    wait_logged(&daemon, "grp1", "member-4").await;
}

/// A group given by name is looked up in /etc/group; without the key the sockets stay
/// conlogd's, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_name_is_looked_up_and_no_key_changes_nothing() {
    let groups = std::fs::read_to_string("/etc/group").expect("/etc/group");
    let (name, gid) = groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid: u32 = fields.nth(1)?.parse().ok()?;
            (gid != 0 && gid != NOBODY).then(|| (name.to_owned(), gid))
        })
        .next()
        .expect("a group other than root and nogroup in /etc/group");
    let daemon =
        Daemon::start_with(Some(&format!("consoles:\n  socket_group: {name}\n")), &[]).await;
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, "grp2").await;
    assert_owned(Path::new(&console.guest_socket), gid, "by name");

    let plain = Daemon::start().await;
    let mut agent = plain.agent().await;
    let console = open_console(&mut agent, "grp3").await;
    let own = rustix::process::getgid().as_raw();
    let socket = Path::new(&console.guest_socket);
    assert_eq!(group_and_mode(socket), (own, 0o660));
    let (dir_gid, _) = group_and_mode(socket.parent().unwrap());
    assert_eq!(dir_gid, own, "no key: the directory stays conlogd's");
}
