//! Assembly and lifecycle of `conlogd`: directories, the single-instance lock, listeners,
//! services, signals and clean shutdown.
//!
//! Owns the order of start-up and shutdown and nothing else: every resource it creates is handed
//! to the module that owns it. On SIGTERM or SIGINT it stops accepting, lets gRPC calls finish
//! (bounded), drains every pipe into its log and syncs the files, removes its sockets and exits.

use crate::config::Config;
use crate::guests::Guests;
use crate::handoff::Handoffs;
use crate::metrics::Metrics;
use crate::server::{self, agent::AgentService, console::ConsoleService};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// How long gRPC calls may take to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the daemon could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// A directory could not be created.
    #[error("Cannot create directory {path}: {source}")]
    Directory { path: PathBuf, source: io::Error },
    /// Another daemon holds the runtime directory.
    #[error("Another conlogd{pid} is already serving {socket}; stop it first, or use --takeover to replace it")]
    AlreadyRunning { pid: String, socket: PathBuf },
    /// A listener could not be bound.
    #[error("Cannot listen on {what} {address}: {source}")]
    Bind {
        what: &'static str,
        address: String,
        source: io::Error,
    },
    /// The socket group does not exist.
    #[error("Invalid config value socket_group: no group named {0:?}")]
    Group(String),
    /// Restoring the registry failed.
    #[error("Cannot restore state: {0}")]
    Restore(#[from] crate::error::Error),
    /// A gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartError> {
    let config = Arc::new(config);
    raise_descriptor_limit();
    let runtime_dir = config.runtime_dir().to_owned();
    for dir in [config.runtime_dir(), config.data_dir(), config.log_dir()] {
        fs::create_dir_all(dir).map_err(|source| StartError::Directory {
            path: dir.to_owned(),
            source,
        })?;
    }
    let socket_path = runtime_dir.join("conlogd.sock");
    let _lock = acquire_lock(&runtime_dir, &socket_path)?;
    let group = resolve_group(config.socket_group.as_deref())?;

    let local = bind_unix(&socket_path, group)?;
    let fd_socket = runtime_dir.join("fd.sock");
    let fd_listener = bind_unix(&fd_socket, group)?;
    let tcp = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "TCP",
            address: config.listen.to_string(),
            source,
        })?;
    let metrics = Arc::new(Metrics::default());
    let metrics_listener = match config.metrics {
        Some(address) => {
            Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|source| StartError::Bind {
                        what: "metrics",
                        address: address.to_string(),
                        source,
                    })?,
            )
        }
        None => None,
    };

    let guests = Guests::new(config.clone(), metrics.clone());
    let restored = guests.restore().await?;
    let handoffs = Handoffs::new(
        config.handoff.token_ttl.get(),
        config.limits.pending_handoffs as usize,
        metrics.clone(),
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let agent = AgentService {
        config: config.clone(),
        guests: guests.clone(),
        handoffs: handoffs.clone(),
        fd_socket: fd_socket.clone(),
    };
    let console = ConsoleService::new(guests.clone(), config.history.chunk_size.bytes() as usize);
    let tcp_address = tcp.local_addr().map_err(|source| StartError::Bind {
        what: "TCP",
        address: config.listen.to_string(),
        source,
    })?;
    let metrics_address = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let local_server = tokio::spawn(server::serve_local(
        local,
        agent,
        console.clone(),
        stopped(),
    ));
    let tcp_server = tokio::spawn(server::serve_tcp(tcp, console, stopped()));
    let fd_server = tokio::spawn(
        handoffs
            .clone()
            .serve(fd_listener, config.handoff.read_timeout.get()),
    );
    let metrics_server = metrics_listener.map(|listener| {
        let registry = Arc::new(metrics.registry());
        tokio::spawn(crate::metrics::serve(listener, registry))
    });

    tracing::info!(
        socket = %socket_path.display(),
        tcp = %tcp_address,
        metrics = %metrics_address.map_or("off".into(), |a| a.to_string()),
        restored_streams = restored,
        pid = std::process::id(),
        "conlogd ready"
    );

    notify_systemd("READY=1");

    let signal_name = wait_for_stop_signal().await;
    notify_systemd("STOPPING=1");
    tracing::info!(signal = signal_name, "shutting down");
    let _ = stop_tx.send(true);
    fd_server.abort();
    if let Some(server) = metrics_server {
        server.abort();
    }
    // Close the streams first: consoles end their clients' calls with UNAVAILABLE and
    // followers of history end too, so the gRPC servers can drain at once.
    guests
        .close_all("conlogd is shutting down; reconnect and resume by offset")
        .await;
    let servers = async {
        let _ = local_server.await;
        let _ = tcp_server.await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, servers).await.is_err() {
        tracing::warn!("gRPC calls still running after {DRAIN_TIMEOUT:?}; closing them");
    }
    let _ = fs::remove_file(&socket_path);
    let _ = fs::remove_file(&fd_socket);
    tracing::info!("every log flushed; bye");
    Ok(())
}

/// Tells systemd (Type=notify) about the daemon's state through `$NOTIFY_SOCKET`, if set.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let address = match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    let message = format!("{state}\nMAINPID={}\n", std::process::id());
    let sent = address.and_then(|address| {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        socket.send_to_addr(message.as_bytes(), &address)
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Every guest costs several descriptors (pipe read ends, log files, sockets); raise the soft
/// RLIMIT_NOFILE to the hard limit so the configured guest limit, not the default 1024, binds.
fn raise_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the descriptor limit");
        }
    }
    tracing::debug!(nofile = ?getrlimit(Resource::Nofile).current, "descriptor limit");
}

async fn wait_for_stop_signal() -> &'static str {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Takes `conlogd.lock` (flock) in the runtime dir, or explains who holds it. A socket left by a
/// daemon that died is removed once the lock is ours.
fn acquire_lock(runtime_dir: &Path, socket_path: &Path) -> Result<File, StartError> {
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
    if socket_path.exists() {
        if std::os::unix::net::UnixStream::connect(socket_path).is_ok() {
            return Err(StartError::AlreadyRunning {
                pid: String::new(),
                socket: socket_path.to_owned(),
            });
        }
        tracing::info!(socket = %socket_path.display(), "removing stale socket");
    }
    file.set_len(0).ok();
    let _ = writeln!(file, "{}", std::process::id());
    Ok(file)
}

/// Binds a UNIX socket with mode 0660 (and group `group`), replacing a stale file.
fn bind_unix(path: &Path, group: Option<u32>) -> Result<UnixListener, StartError> {
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
    fs::set_permissions(path, fs::Permissions::from_mode(0o660)).map_err(bind_error)?;
    if let Some(gid) = group {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| bind_error(e.into()))?;
    }
    Ok(listener)
}

/// A group name or number → gid.
fn resolve_group(group: Option<&str>) -> Result<Option<u32>, StartError> {
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
        .ok_or_else(|| StartError::Group(group.to_owned()))
}
