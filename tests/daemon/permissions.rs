//! Who may use what the daemon creates (docs/operations.md, SECURITY.md): `conlogd.sock` and
//! `fd.sock` are mode 0660 and belong to `socket_group` (the agent's group), `handover.sock` is
//! 0600 (only the daemon's own user may take over), log files are 0640 (never world-readable),
//! and the token key is 0600. Checked on a fresh start and again after a restart, which
//! replaces the sockets.

use crate::support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use support::*;

/// Mode bits (`& 0o7777`) and group of `path`.
fn mode_and_group(path: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (meta.permissions().mode() & 0o7777, meta.gid())
}

/// A group of `/etc/group` other than root's (by name, to check names are resolved).
fn some_named_group() -> (String, u32) {
    let table = std::fs::read_to_string("/etc/group").expect("read /etc/group");
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?.to_owned();
            let gid: u32 = fields.nth(1)?.parse().ok()?;
            (gid != 0).then_some((name, gid))
        })
        .next()
        .expect("a group other than root in /etc/group")
}

async fn assert_modes(daemon: &Daemon, gid: u32) {
    let run = daemon.runtime_dir();
    assert_eq!(
        mode_and_group(&run.join("conlogd.sock")),
        (0o660, gid),
        "conlogd.sock"
    );
    assert_eq!(
        mode_and_group(&run.join("fd.sock")),
        (0o660, gid),
        "fd.sock"
    );
    assert_eq!(
        mode_and_group(&run.join("handover.sock")).0,
        0o600,
        "handover.sock"
    );
    assert_eq!(
        mode_and_group(&daemon.data_dir().join("state/token.key")).0,
        0o600,
        "token.key"
    );
    for (guest, stream) in [("vm1", "qemu"), ("vm1", DEVICE)] {
        let files = log_files(&daemon.log_dir(), guest, stream);
        assert!(!files.is_empty(), "{guest}/{stream} has no log file");
        for file in files {
            assert_eq!(mode_and_group(&file).0, 0o640, "{}", file.display());
        }
    }
}

/// With `socket_group` given by number and by name, the agent's sockets are 0660 in that
/// group, `handover.sock` 0600, logs (current and rotated) 0640; a restart recreates them the
/// same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_and_logs_have_the_documented_modes() {
    let (name, named_gid) = some_named_group();
    for (group, gid) in [("64055".to_owned(), 64055), (name, named_gid)] {
        let config = format!("socket_group: \"{group}\"\nlogs:\n  max_size: 4KiB\n");
        let mut daemon = Daemon::start_with(Some(&config), &[]).await;
        let mut agent = daemon.agent().await;
        let (_, pipe) = open_pipe(&mut agent, "vm1", "qemu", None).await;
        // 10 KiB with 4 KiB files: the current file and two rotated ones.
        write_and_close(pipe, pattern(0, 10 << 10)).await;
        wait_closed(&mut agent, "vm1", "qemu", 10 << 10).await;
        assert_eq!(log_files(&daemon.log_dir(), "vm1", "qemu").len(), 3);
        let reply = open_console(&mut agent, "vm1").await;
        let mut guest = FakeGuest::connect(&reply.guest_socket).await;
        guest.write(b"console output\n").await;
        wait_offset(&mut agent, "vm1", DEVICE, 15).await;
        drop(agent);
        assert_modes(&daemon, gid).await;

        drop(guest);
        daemon.stop().await;
        daemon.restart().await;
        assert_modes(&daemon, gid).await;
    }
}
