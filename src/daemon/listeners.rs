//! The daemon-wide descriptors: the single-instance lock and every listening socket.
//!
//! Owns binding them on a fresh start (mode 0660 sockets, replacing stale files), adopting them
//! after an upgrade, and handing out clones to the servers. The originals stay here for the
//! whole life of the process, so an upgrade can carry them while the servers' clones are
//! dropped: the sockets never close, and connections wait in their backlogs meanwhile.
//!
//! Carried listeners keep their addresses whatever the next image's config says, except the
//! health listener, which follows the config at every upgrade and takeover ([`Listeners::adopt`]):
//! probes are pointed at it, and a roll from an image without it must not leave the new pod
//! unready.

use super::StartError;
use crate::config::Config;
use crate::upgrade::FrozenListeners;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The lock and the listening sockets of the daemon.
pub(crate) struct Listeners {
    /// `conlogd.lock`, flock'ed: whoever holds it is the daemon of this runtime directory.
    pub lock: File,
    /// `conlogd.sock`: the local gRPC API.
    pub local: UnixListener,
    /// `fd.sock`: log pipe hand-off.
    pub fd_sock: UnixListener,
    /// `handover.sock`: takeover by a successor (mode 0600).
    pub handover: UnixListener,
    /// The Console service over TCP.
    pub tcp: std::net::TcpListener,
    /// `/metrics`.
    pub metrics: Option<std::net::TcpListener>,
    /// Plaintext `grpc.health.v1` only, for probes (config `health`).
    pub health: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Takes the lock and binds every socket, or adopts the one the keeper held through a
    /// crash of the previous daemon (the TCP ones only at the address `config` wants).
    pub(crate) fn bind(
        config: &Config,
        held: &mut crate::keeper::Held,
    ) -> Result<Self, StartError> {
        let runtime_dir = config.runtime_dir();
        let socket_path = runtime_dir.join("conlogd.sock");
        let held_local = held.take_listener("local").map(UnixListener::from);
        let lock = acquire_lock(runtime_dir, &socket_path, held_local.is_some())?;
        let group = resolve_group(config.socket_group.as_deref(), "socket_group")?;
        let tcp_error = |what, address: String| {
            move |source| StartError::Bind {
                what,
                address,
                source,
            }
        };
        let mut unix = |what: &str, path: &Path, group, mode| match held.take_listener(what) {
            Some(fd) => Ok(UnixListener::from(fd)),
            None => bind_unix(path, group, mode),
        };
        let local = match held_local {
            Some(listener) => listener,
            None => bind_unix(&socket_path, group, 0o660)?,
        };
        let fd_sock = unix("fd_sock", &runtime_dir.join("fd.sock"), group, 0o660)?;
        let handover = unix("handover", &runtime_dir.join("handover.sock"), None, 0o600)?;
        let mut tcp = |what: &'static str, address: SocketAddr| {
            let carried = held
                .take_listener(what)
                .map(std::net::TcpListener::from)
                .filter(|l| l.local_addr().is_ok_and(|at| same_address(at, address)));
            match carried {
                Some(listener) => Ok(listener),
                None => std::net::TcpListener::bind(address)
                    .map_err(tcp_error(what, address.to_string())),
            }
        };
        let listeners = Self {
            lock,
            local,
            fd_sock,
            handover,
            tcp: tcp("tcp", config.listen)?,
            metrics: config.metrics.map(|a| tcp("metrics", a)).transpose()?,
            health: config.health.map(|a| tcp("health", a)).transpose()?,
        };
        listeners.hold();
        Ok(listeners)
    }

    /// Gives the keeper a copy of every listener (see [`crate::keeper`]).
    fn hold(&self) {
        use crate::keeper::{hold, names::listener, release};
        use std::os::fd::AsFd;
        hold(&listener("local"), self.local.as_fd());
        hold(&listener("fd_sock"), self.fd_sock.as_fd());
        hold(&listener("handover"), self.handover.as_fd());
        hold(&listener("tcp"), self.tcp.as_fd());
        for (what, socket) in [("metrics", &self.metrics), ("health", &self.health)] {
            match socket {
                Some(socket) => hold(&listener(what), socket.as_fd()),
                None => release(&listener(what)),
            }
        }
    }

    /// The carried descriptors of a previous image (or of this one, after an upgrade that
    /// failed). The health listener follows `config`: see [`follow_health`]. `conlogd.lock`
    /// names this process from now on (a successor's pid differs from its predecessor's).
    pub(crate) fn adopt(fds: FrozenListeners, config: &Config) -> Self {
        let lock = File::from(fds.lock);
        name_holder(&lock);
        let listeners = Self {
            lock,
            local: UnixListener::from(fds.local),
            fd_sock: UnixListener::from(fds.fd_sock),
            handover: UnixListener::from(fds.handover),
            tcp: std::net::TcpListener::from(fds.tcp),
            metrics: fds.metrics.map(std::net::TcpListener::from),
            health: follow_health(fds.health.map(std::net::TcpListener::from), config.health),
        };
        listeners.hold();
        listeners
    }

    /// Gives the descriptors up for an upgrade or a takeover (adopted again by [`Listeners::adopt`]).
    pub(crate) fn freeze(self) -> FrozenListeners {
        FrozenListeners {
            lock: OwnedFd::from(self.lock),
            local: OwnedFd::from(self.local),
            fd_sock: OwnedFd::from(self.fd_sock),
            handover: OwnedFd::from(self.handover),
            tcp: OwnedFd::from(self.tcp),
            metrics: self.metrics.map(OwnedFd::from),
            health: self.health.map(OwnedFd::from),
        }
    }
}

/// The health listener an adopting image serves: the carried one while it is where `wanted`
/// says (port 0: any port on that address), a new one when the previous image had none (it
/// predates the key, or had it off) or had it elsewhere, none when the config turns it off.
/// Never fails: a bind error here would end an upgrade that carries every pipe, so it is
/// logged and whatever was carried is kept.
fn follow_health(
    carried: Option<std::net::TcpListener>,
    wanted: Option<SocketAddr>,
) -> Option<std::net::TcpListener> {
    let Some(wanted) = wanted else {
        if carried.is_some() {
            tracing::info!("health is off in the config; closing the carried health listener");
        }
        return None;
    };
    let at = carried.as_ref().and_then(|l| l.local_addr().ok());
    if at.is_some_and(|at| same_address(at, wanted)) {
        return carried;
    }
    match std::net::TcpListener::bind(wanted) {
        Ok(listener) => {
            tracing::info!(health = %wanted, previous = ?at, "health listener bound");
            Some(listener)
        }
        Err(e) => {
            tracing::error!(health = %wanted, previous = ?at, error = %e, "cannot bind the health listener; keeping the carried one, if any");
            carried
        }
    }
}

/// True when a listener bound at `at` serves `wanted` (port 0: any port on that address).
fn same_address(at: SocketAddr, wanted: SocketAddr) -> bool {
    at.ip() == wanted.ip() && (wanted.port() == 0 || wanted.port() == at.port())
}

/// A tokio listener sharing the socket of `listener` (the original stays open here).
pub(crate) fn tokio_unix(listener: &UnixListener) -> io::Result<tokio::net::UnixListener> {
    let clone = listener.try_clone()?;
    clone.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(clone)
}

/// A tokio listener sharing the socket of `listener`.
pub(crate) fn tokio_tcp(listener: &std::net::TcpListener) -> io::Result<tokio::net::TcpListener> {
    let clone = listener.try_clone()?;
    clone.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(clone)
}

/// Takes `conlogd.lock` (flock) in the runtime dir, or explains who holds it. A socket left by a
/// daemon that died is removed once the lock is ours (unless the keeper held it: `adopted`).
fn acquire_lock(runtime_dir: &Path, socket_path: &Path, adopted: bool) -> Result<File, StartError> {
    let path = runtime_dir.join("conlogd.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|source| StartError::Directory {
            path: path.clone(),
            source,
        })?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        let pid = pid.trim();
        return Err(StartError::AlreadyRunning {
            pid: if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            },
            socket: socket_path.to_owned(),
        });
    }
    // Nobody holds the lock, so any socket here is stale, unless a daemon of an older layout
    // without the lock still answers on it.
    if socket_path.exists() && !adopted {
        if std::os::unix::net::UnixStream::connect(socket_path).is_ok() {
            return Err(StartError::AlreadyRunning {
                pid: String::new(),
                socket: socket_path.to_owned(),
            });
        }
        tracing::info!(socket = %socket_path.display(), "removing stale socket");
    }
    name_holder(&file);
    Ok(file)
}

/// Writes this process's pid into the (held) lock file, replacing what was there.
fn name_holder(lock: &File) {
    use std::os::unix::fs::FileExt;
    let pid = format!("{}\n", std::process::id());
    if let Err(e) = lock
        .set_len(0)
        .and_then(|()| lock.write_all_at(pid.as_bytes(), 0))
    {
        tracing::warn!(error = %e, "cannot write this pid into conlogd.lock");
    }
}

/// Binds a UNIX socket with `mode` (and group `group`), replacing a stale file.
fn bind_unix(path: &Path, group: Option<u32>, mode: u32) -> Result<UnixListener, StartError> {
    let bind_error = |source| StartError::Bind {
        what: "UNIX socket",
        address: path.display().to_string(),
        source,
    };
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(bind_error(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(bind_error)?;
    if let Some(gid) = group {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| bind_error(e.into()))?;
    }
    Ok(listener)
}

/// A group name or number (config key `key`) → gid.
pub(crate) fn resolve_group(
    group: Option<&str>,
    key: &'static str,
) -> Result<Option<u32>, StartError> {
    let Some(group) = group else {
        return Ok(None);
    };
    if let Ok(gid) = group.parse() {
        return Ok(Some(gid));
    }
    let table = fs::read_to_string("/etc/group").unwrap_or_default();
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .map(Some)
        .ok_or_else(|| StartError::Group {
            key,
            name: group.to_owned(),
        })
}
