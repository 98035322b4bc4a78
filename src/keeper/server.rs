//! The keeper process (`conlogd keeper`): holds descriptors by name and hands them back.
//!
//! Owns `keeper.sock` and `keeper.lock` in the runtime directory and the table name →
//! descriptor. It must never read or write a held descriptor (guest bytes never pass through
//! it), never listen on the network, and never hold more than one entry per name: its memory
//! is a constant per descriptor. One client at a time, of its own uid only; at most
//! `RLIMIT_NOFILE` (hard) minus a reserve of descriptors; messages of at most 256 bytes
//! ([`super::protocol`]). Single-threaded and blocking: it has nothing to do concurrently.
//!
//! It runs until told to quit (`Q`, sent by a daemon that stops cleanly), until its socket
//! file is removed or replaced (the runtime directory went away: nobody can reach it), or
//! until SIGTERM/SIGKILL. Its death loses nothing while conlogd lives: conlogd holds its own
//! copies and registers them again with a new keeper.

use super::protocol::{self, Message, CLEAR, ENTRY, FETCH, OK, QUIT, REMOVE, STORE};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Descriptors kept free for the keeper's own use (socket, lock, a client, a message).
const RESERVED_FDS: u64 = 32;
/// How often the keeper checks that its socket file is still its own.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The socket of the keeper serving `runtime_dir`.
pub(crate) fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("keeper.sock")
}

/// Why the keeper could not start.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("Cannot use {path}: {source}")]
    Path { path: PathBuf, source: io::Error },
}

/// What ends the keeper.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Another keeper holds `keeper.lock`.
    AlreadyRunning,
    /// A client sent `Q`.
    Quit,
    /// The socket file was removed or replaced.
    SocketGone,
}

/// The table of held descriptors.
struct Table {
    held: BTreeMap<String, OwnedFd>,
    cap: usize,
}

/// Runs the keeper of `runtime_dir` until it is told to quit or its socket goes away. If
/// another keeper serves the directory it returns at once, or with `standby` waits until that
/// one ends and then serves (a new pod's keeper container beside the old pod's, in a rolling
/// update).
pub fn run(runtime_dir: &Path, standby: bool) -> Result<Exit, KeeperError> {
    // Its own session: a terminal hang-up or the group of the conlogd that started it does not
    // reach it. Fails harmlessly when it already leads one (PID 1 of a container).
    let _ = rustix::process::setsid();
    // Whatever the starter leaked (a listener, conlogd.lock) must not be held here.
    let _ = crate::upgrade::fds::close_inherited_except(&[]);
    let path_error = |path: &Path| {
        let path = path.to_owned();
        move |source| KeeperError::Path { path, source }
    };
    fs::create_dir_all(runtime_dir).map_err(path_error(runtime_dir))?;
    let lock_path = runtime_dir.join("keeper.lock");
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(path_error(&lock_path))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        tracing::info!(dir = %runtime_dir.display(), standby, "another keeper serves this runtime directory");
        if !standby {
            return Ok(Exit::AlreadyRunning);
        }
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| path_error(&lock_path)(e.into()))?;
        tracing::info!("the other keeper has ended; taking over its socket");
    }
    // The lock names its holder, for operators (and tests) looking for the keeper.
    let _ = lock.set_len(0);
    let _ = std::io::Write::write_all(&mut &lock, format!("{}\n", std::process::id()).as_bytes());
    let socket = socket_path(runtime_dir);
    let listener = bind(&socket).map_err(path_error(&socket))?;
    let inode = fs::metadata(&socket).map_err(path_error(&socket))?.ino();
    let table = Table {
        held: BTreeMap::new(),
        cap: descriptor_cap(),
    };
    tracing::info!(socket = %socket.display(), cap = table.cap, pid = std::process::id(), "keeper ready");
    let exit = serve(&listener, &socket, inode, table);
    if exit != Exit::SocketGone {
        let _ = fs::remove_file(&socket);
    }
    tracing::info!(?exit, "keeper exits");
    drop(lock);
    Ok(exit)
}

/// Raises the soft descriptor limit to the hard one; the cap leaves a reserve below it.
fn descriptor_cap() -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(1 << 20);
    usize::try_from(soft.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX)
}

/// Binds `keeper.sock` with mode 0600 from the start (umask), replacing a stale file.
fn bind(path: &Path) -> io::Result<OwnedFd> {
    use rustix::net::{bind, listen, SocketAddrUnix};
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let socket = protocol::seqpacket()?;
    let address = SocketAddrUnix::new(path)?;
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = bind(&socket, &address);
    rustix::process::umask(old);
    bound?;
    listen(&socket, 8)?;
    Ok(socket)
}

fn serve(listener: &OwnedFd, socket: &Path, inode: u64, mut table: Table) -> Exit {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut client: Option<OwnedFd> = None;
    let timeout = rustix::event::Timespec::try_from(CHECK_EVERY).expect("a small duration");
    loop {
        let (listener_ready, client_ready) = {
            let mut fds = vec![PollFd::new(listener, PollFlags::IN)];
            if let Some(client) = &client {
                fds.push(PollFd::new(client, PollFlags::IN));
            }
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "poll failed");
                    std::thread::sleep(CHECK_EVERY);
                }
            }
            (
                !fds[0].revents().is_empty(),
                fds.get(1).is_some_and(|fd| !fd.revents().is_empty()),
            )
        };
        if fs::metadata(socket).map(|m| m.ino()).ok() != Some(inode) {
            return Exit::SocketGone;
        }
        if client_ready && drain(&mut table, &mut client) {
            return Exit::Quit;
        }
        // After the client's requests: a daemon that died has been noticed before its
        // successor connects.
        if listener_ready {
            // Whatever the client sent meanwhile first: a daemon that died is noticed before
            // its successor is told the keeper is busy.
            if client.as_ref().is_some_and(has_input) && drain(&mut table, &mut client) {
                return Exit::Quit;
            }
            accept(listener, &mut client);
        }
    }
}

/// Serves every request queued on the client (one that died may have left some), and its end;
/// true when told to quit.
fn drain(table: &mut Table, client: &mut Option<OwnedFd>) -> bool {
    while let Some(connection) = client.as_ref() {
        match protocol::recv(connection) {
            Ok(message) => match handle(table, connection, message) {
                Ok(true) => return true,
                Ok(false) if has_input(connection) => {}
                Ok(false) => break,
                Err(e) => {
                    crate::limited!(warn, error = %e, "client dropped");
                    let _ = protocol::send(connection, &protocol::error_message(&e), &[]);
                    *client = None;
                }
            },
            Err(e) => {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    crate::limited!(warn, error = %e, "client dropped");
                    let text = format!("protocol error: {e}");
                    let _ = protocol::send(connection, &protocol::error_message(&text), &[]);
                }
                *client = None;
            }
        }
    }
    false
}

/// Accepts one connection: a peer of another uid is closed at once, a second client is told
/// the keeper is busy.
fn accept(listener: &OwnedFd, client: &mut Option<OwnedFd>) {
    let connection = match rustix::net::accept_with(listener, rustix::net::SocketFlags::CLOEXEC) {
        Ok(connection) => connection,
        Err(e) => {
            crate::limited!(warn, error = %e, "accept failed");
            return;
        }
    };
    let ours = rustix::process::getuid();
    match rustix::net::sockopt::socket_peercred(&connection) {
        Ok(peer) if peer.uid == ours => {}
        Ok(peer) => {
            crate::limited!(
                warn,
                peer_uid = peer.uid.as_raw(),
                peer_pid = peer.pid.as_raw_nonzero().get(),
                "refusing a client of another uid"
            );
            return;
        }
        Err(e) => {
            crate::limited!(warn, error = %e, "cannot identify a client; refused");
            return;
        }
    }
    if protocol::bound_sends(&connection).is_err() {
        return;
    }
    if client.is_some() {
        let _ = protocol::send(
            &connection,
            &protocol::error_message("busy: another client is connected"),
            &[],
        );
        return;
    }
    let mut hello = vec![OK];
    hello.extend_from_slice(protocol::HELLO);
    if protocol::send(&connection, &hello, &[]).is_ok() {
        *client = Some(connection);
    }
}

/// The poll events of `connection` now.
fn events(connection: &OwnedFd) -> rustix::event::PollFlags {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(connection, PollFlags::IN)];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&zero)) {
        Ok(_) => fds[0].revents(),
        Err(_) => PollFlags::empty(),
    }
}

/// True when a request (or the end) waits on `connection`.
fn has_input(connection: &OwnedFd) -> bool {
    !events(connection).is_empty()
}

/// Serves one request; `Ok(true)` means quit. An error is a protocol error (the connection is
/// dropped after the error text); a refused request is answered here and is not an error.
fn handle(table: &mut Table, client: &OwnedFd, message: Message) -> Result<bool, String> {
    let Message { bytes, mut fds } = message;
    let (&op, rest) = bytes.split_first().ok_or("empty message")?;
    let want_fds = usize::from(op == STORE);
    if fds.len() != want_fds {
        return Err(format!(
            "operation 0x{op:02x} carries {want_fds} descriptor(s), not {}",
            fds.len()
        ));
    }
    let reply = |bytes: &[u8]| protocol::send(client, bytes, &[]).map_err(|e| e.to_string());
    match op {
        STORE | REMOVE => {
            let name = match protocol::check_name(rest) {
                Ok(name) => name.to_owned(),
                Err(e) => {
                    reply(&protocol::error_message(&e.to_string()))?;
                    return Ok(false);
                }
            };
            if op == REMOVE {
                table.held.remove(&name);
            } else if !table.held.contains_key(&name) && table.held.len() >= table.cap {
                let text = format!(
                    "the keeper holds {} descriptors, its cap (RLIMIT_NOFILE less {RESERVED_FDS})",
                    table.cap
                );
                reply(&protocol::error_message(&text))?;
                return Ok(false);
            } else {
                table.held.insert(name, fds.pop().expect("one descriptor"));
            }
            reply(&[OK])?;
        }
        FETCH | CLEAR | QUIT if !rest.is_empty() => {
            return Err(format!("operation 0x{op:02x} takes no name"));
        }
        FETCH => {
            for (name, fd) in &table.held {
                let mut entry = vec![ENTRY];
                entry.extend_from_slice(name.as_bytes());
                protocol::send(client, &entry, &[fd.as_fd()]).map_err(|e| e.to_string())?;
            }
            let mut done = vec![OK];
            // Bounded by the descriptor limit.
            let held = u32::try_from(table.held.len()).unwrap_or(u32::MAX);
            done.extend_from_slice(&held.to_le_bytes());
            reply(&done)?;
        }
        CLEAR => {
            table.held.clear();
            reply(&[OK])?;
        }
        QUIT => {
            table.held.clear();
            reply(&[OK])?;
            return Ok(true);
        }
        other => return Err(format!("unknown operation 0x{other:02x}")),
    }
    Ok(false)
}
