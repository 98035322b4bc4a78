//! systemd's file descriptor store as the keeper (`FileDescriptorStoreMax=` in the unit).
//!
//! Owns the two halves of the protocol, through the `sd-notify` crate:
//! - holding: a datagram to `$NOTIFY_SOCKET` with `FDSTORE=1`, `FDNAME=<name>` and
//!   `FDPOLL=0` (systemd must keep a pipe whose writer left while conlogd was down: its
//!   bytes are still to be logged) and the descriptor attached (SCM_RIGHTS); releasing:
//!   `FDSTOREREMOVE=1` and `FDNAME=<name>`, which closes every descriptor stored under it.
//! - getting them back: systemd passes the store to the next start as descriptors 3… with
//!   `LISTEN_FDS`, `LISTEN_FDNAMES` (names joined by `:`) and `LISTEN_PID`. [`take_listen_fds`]
//!   adopts them first thing in `main` (before any thread exists, because it unsets those
//!   variables, which an in-place upgrade must not see again).
//!
//! systemd stores two different descriptors sent under one name side by side (the same one
//! sent twice is stored once), so a name whose descriptor changed (QEMU reconnected to a
//! console) is removed before the new one is stored.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

/// The descriptors systemd passed at start, until the daemon takes them.
static PASSED: Mutex<Vec<(String, OwnedFd)>> = Mutex::new(Vec::new());

/// True when a service manager listens for notifications.
pub(crate) fn available() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Adopts the descriptors systemd passed (`LISTEN_FDS`), keeps them for [`take_passed`], and
/// unsets the variables. Call first thing in `main`, while the process has one thread.
pub fn take_listen_fds() {
    let passed = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds.collect::<Vec<_>>(),
        Err(e) => {
            eprintln!("conlogd: ignoring the descriptors passed by systemd: {e}");
            Vec::new()
        }
    };
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    let mut adopted = Vec::with_capacity(passed.len());
    for (raw, name) in passed {
        match crate::upgrade::fds::adopt(raw) {
            Ok(fd) => adopted.push((name, fd)),
            Err(e) => {
                eprintln!("conlogd: cannot adopt descriptor {raw} ({name}) from systemd: {e}")
            }
        }
    }
    *PASSED.lock().expect("not poisoned") = adopted;
}

/// What systemd passed at start (once).
pub(crate) fn take_passed() -> Vec<(String, OwnedFd)> {
    std::mem::take(&mut *PASSED.lock().expect("not poisoned"))
}

/// The store's side of the keeper thread.
#[derive(Default)]
pub(crate) struct Store {
    /// Which file (device, inode) each name holds, to tell a re-registration (stored once by
    /// systemd) from a replacement (remove first).
    sent: HashMap<String, (u64, u64, u32)>,
}

/// Which open file `fd` refers to: its inode and access mode (a pipe's two ends differ).
fn identity(fd: BorrowedFd<'_>) -> Option<(u64, u64, u32)> {
    let stat = rustix::fs::fstat(fd).ok()?;
    let mode = rustix::fs::fcntl_getfl(fd).ok()? & rustix::fs::OFlags::RWMODE;
    Some((stat.st_dev as u64, stat.st_ino as u64, mode.bits()))
}

impl Store {
    /// Names systemd passed at start are believed held with these descriptors.
    pub(crate) fn believe(&mut self, name: &str, fd: impl AsFd) {
        if let Some(id) = identity(fd.as_fd()) {
            self.sent.insert(name.to_owned(), id);
        }
    }

    /// Every name sent and not removed.
    pub(crate) fn names(&self) -> Vec<String> {
        self.sent.keys().cloned().collect()
    }

    /// `FDSTORE=1`.
    pub(crate) fn store(&mut self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        use sd_notify::NotifyState::{Custom, FdName, FdStore};
        let id = identity(fd);
        match (self.sent.get(name), id) {
            (Some(old), Some(new)) if *old == new => {}
            (Some(_), _) => self.remove(name)?,
            (None, _) => {}
        }
        sd_notify::notify_with_fds(&[FdStore, FdName(name), Custom("FDPOLL=0")], &[fd])?;
        if let Some(id) = id {
            self.sent.insert(name.to_owned(), id);
        }
        Ok(())
    }

    /// `FDSTOREREMOVE=1`.
    pub(crate) fn remove(&mut self, name: &str) -> io::Result<()> {
        use sd_notify::NotifyState::{FdName, FdStoreRemove};
        self.sent.remove(name);
        sd_notify::notify(&[FdStoreRemove, FdName(name)])
    }
}
