//! Serial consoles: one actor per console owns the guest connection, the log, the clients and
//! the writer lease.
//!
//! A console listens on `consoles/<guest>/<device>.guest.sock` (QEMU connects with
//! `-chardev socket,path=…,reconnect=1`) and on `<device>.client.sock` (raw bytes for `socat`
//! and `nc -U`). Everything the guest writes is appended to the capped log first and then
//! offered to every attached client with its absolute offset.
//!
//! Backpressure, decided once:
//! - guest → log: lossless; the actor writes each chunk before reading the next (a refused write
//!   is counted as dropped, never retried forever).
//! - guest → clients: never waits. Each client has a queue bounded in bytes
//!   ([`clients`]); a client that falls behind is skipped ahead and told the exact gap.
//! - client → guest: nothing is queued. The actor writes one piece of input at a time, at most
//!   [`MAX_PENDING_INPUT`] bytes, straight from the caller's buffer; its caller waits (in
//!   [`ConsoleHandle::write_input`]) until the guest's socket took every byte, and only then
//!   sends the next piece. A slow guest therefore pushes back on the typist (a stream is not read
//!   further, so HTTP/2 flow control or a full socket stops it; a `SendConsoleInput` call waits
//!   at most 10 s) and never on the guest's output. Input that arrives while a piece is
//!   being written is refused, not buffered.
//! - Input ends with its caller: a piece whose caller went away (a cancelled call, an ended
//!   stream, a closed raw connection), whose client lost the writer lease or detached, or whose
//!   guest connection went away is discarded at once; what the guest's socket had already taken
//!   stays taken, nothing of it is written later. Pieces are written in the order each writer
//!   sent them, and a writer sends its next piece only after the previous one is written.
//!
//! A second QEMU connection to `guest.sock` replaces the first only after the first is drained:
//! the actor shuts down the reading side of the old connection (from then on the old peer's
//! writes fail with `EPIPE`; none is accepted and lost), reads what its kernel buffer still holds
//! to the end and logs it, then reads the new connection. So every byte whose `write` the old
//! peer saw succeed is logged, in order, before the new connection's first byte; the drain reads
//! at most the old peer's socket send buffer (`net.core.wmem_max` bounds it) without waiting, so
//! an old peer that keeps writing cannot delay the switch.
//!
//! A console whose QEMU chardev has `mux=on` ([`Protocol::Mux`]) doubles Ctrl-A in input (so no
//! keystroke reaches QEMU's own commands) and carries a serial BREAK as `Ctrl-A b`
//! ([`ConsoleHandle::send_break`], [`mux`]); output is logged as with a raw socket. A raw console
//! refuses a break.
//!
//! Sockets are mode 0660, conlogd's; with `consoles.socket_group` the guest socket and its
//! directories (0750) belong to that group instead, also when carried from another image (so a
//! QEMU of another user in that group can connect). `client.sock` is never given away.
//!
//! Only the client holding the writer lease reaches the guest; input from anyone else is
//! dropped (and refused, for `SendConsoleInput`). This module never touches gRPC types: the
//! server maps [`Event`]s to frames, and what a console refuses or fails at is a
//! [`ConsoleError`] that `crate::error` maps to a status. It never looks up the registry or history: what every
//! stream answers about its log (limits, figures, segments, close) is [`crate::log_owner`]'s,
//! embedded in the handle ([`ConsoleHandle::log`]) and answered by the actor through its
//! [`LogOwner`]; the replay reads the log's own segments ([`crate::logfile::read_tail`]). The
//! actor and its raw clients run in a span naming the guest and stream, so their events carry
//! them.

mod actor;
pub mod clients;
mod error;
pub mod mux;
pub mod pacing;
mod raw;
pub mod sessions;

pub use clients::{ClientReceiver, Event};
pub use error::ConsoleError;
pub use mux::Protocol;

use crate::log_owner::{LogCommand, LogHandle, LogOwner};
use crate::logfile::LogFile;
use crate::metrics::Metrics;
use crate::upgrade::FrozenConsole;
use bytes::Bytes;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

/// Most bytes of input waiting to be written to a console's guest: the one piece being written
/// (docs/operations.md, "Consoles"). Larger input is written piece by piece.
pub const MAX_PENDING_INPUT: usize = 64 << 10;
/// Longest UNIX socket path (sun_path is 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How a client wants to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Watch only.
    ReadOnly,
    /// Take the writer lease (refused if held, unless `force`).
    ReadWrite,
    /// Take the lease if nobody holds it, else watch (raw `client.sock` connections).
    WriterIfFree,
}

/// An attach request.
#[derive(Clone, Debug)]
pub struct AttachRequest {
    pub mode: Mode,
    pub force: bool,
    /// Recent output to send before going live (bounded by `consoles.max_replay`).
    pub replay_bytes: u64,
    /// Who this is, for logs and for the "has a writer" message.
    pub label: String,
    /// A network client (token holder): remote clients may take only part of
    /// `limits.clients_per_console` ([`remote_client_share`]).
    pub remote: bool,
    /// The memory place of a remote client's replay (`limits.remote_replay_bytes`): held by
    /// the replayed bytes until the client has taken them.
    pub replay_permit: Option<std::sync::Arc<tokio::sync::OwnedSemaphorePermit>>,
}

/// Of `max_clients` places on a console, those remote clients may take: a quarter (at least
/// one) stays for local clients (the agent, `client.sock`, conlogctl on the node), so that one
/// token holder filling a console with watchers cannot lock the operator out.
pub fn remote_client_share(max_clients: usize) -> usize {
    if max_clients < 2 {
        return max_clients;
    }
    max_clients - (max_clients / 4).max(1)
}

/// What a console starts with: the tunables of every console, and its own protocol.
#[derive(Clone, Copy, Debug)]
pub struct ConsoleSettings {
    pub client_queue: usize,
    pub max_replay: u64,
    pub max_clients: usize,
    /// Bytes per second one writer may type (`limits.input_rate`).
    pub input_rate: u64,
    /// The gid given the guest socket and its directories (`consoles.socket_group`).
    pub socket_group: Option<u32>,
    /// What this console's guest socket speaks (fixed for its life).
    pub protocol: Protocol,
}

/// Counters of a console readable without asking the actor.
#[derive(Debug, Default)]
pub struct ConsoleStats {
    pub clients: AtomicU64,
    pub guest_connected: AtomicBool,
    /// The client holding the writer lease ([`NO_WRITER`]: none), so that input of anyone
    /// else is refused without a round trip to the actor (which checks again).
    pub writer: AtomicU64,
}

/// What console operations return.
pub type Result<T, E = ConsoleError> = std::result::Result<T, E>;

/// [`ConsoleStats::writer`] when nobody holds the lease (client ids start at 1).
pub(crate) const NO_WRITER: u64 = 0;

/// Socket paths of a console.
#[derive(Clone, Debug)]
pub struct ConsolePaths {
    pub guest_socket: PathBuf,
    pub client_socket: PathBuf,
}

impl ConsolePaths {
    /// `<runtime>/consoles/<guest>/<device>.{guest,client}.sock`, refused if too long for a
    /// UNIX socket address.
    pub fn new(runtime_dir: &Path, guest: &str, device: &str) -> Result<Self> {
        let dir = runtime_dir.join("consoles").join(guest);
        let paths = Self {
            guest_socket: dir.join(format!("{device}.guest.sock")),
            client_socket: dir.join(format!("{device}.client.sock")),
        };
        for path in [&paths.guest_socket, &paths.client_socket] {
            let shown = path.display().to_string();
            if shown.len() > MAX_SOCKET_PATH {
                return Err(ConsoleError::SocketPathTooLong {
                    len: shown.len(),
                    path: shown,
                    max: MAX_SOCKET_PATH,
                });
            }
        }
        Ok(paths)
    }
}

enum Command {
    Attach(
        AttachRequest,
        oneshot::Sender<Result<(u64, ClientReceiver)>>,
    ),
    Detach(u64),
    /// What every stream answers (a close tells every client why, closes the sockets, removing
    /// their files, and syncs the log).
    Log(LogCommand),
    /// Stop (clients are told to come back), keep the sockets open and hand them back.
    Freeze(oneshot::Sender<FrozenConsole>),
    /// End every client's stream (they are told why), keep serving the guest.
    EndClients(String, oneshot::Sender<()>),
}

impl From<LogCommand> for Command {
    fn from(command: LogCommand) -> Self {
        Command::Log(command)
    }
}

/// One piece of input (at most [`MAX_PENDING_INPUT`] bytes) for the guest from client `client`.
struct Input {
    client: u64,
    /// Wire bytes, in the console's framing.
    data: Bytes,
    /// The caller's bytes these are (what the reply counts).
    counted: usize,
    /// Answered once the guest's socket took every byte (or the piece was refused or
    /// discarded); dropping its receiver withdraws what is not written yet.
    reply: oneshot::Sender<Result<usize>>,
}

/// A cheap, cloneable handle to a console actor.
#[derive(Clone)]
pub struct ConsoleHandle {
    commands: mpsc::Sender<Command>,
    input: mpsc::Sender<Input>,
    /// `guest/device`, for messages.
    pub name: Arc<str>,
    /// The log commands, counters and end offset every stream has.
    pub log: LogHandle,
    pub console: Arc<ConsoleStats>,
    pub paths: Arc<ConsolePaths>,
    /// What the guest socket speaks (fixed for the console's life).
    pub protocol: Protocol,
}

impl ConsoleHandle {
    /// The guest and device this console belongs to.
    pub fn guest_and_device(&self) -> (&str, &str) {
        // Names never contain '/' (crate::names), so the split is exact.
        self.name.split_once('/').unwrap_or((&self.name, ""))
    }
}

fn not_writer(name: &Arc<str>) -> ConsoleError {
    ConsoleError::NotWriter(name.clone())
}

fn gone(name: &Arc<str>) -> ConsoleError {
    ConsoleError::Closing(name.clone())
}

impl ConsoleHandle {
    /// Binds the console's sockets and starts its actor.
    /// With `frozen` (an upgrade), it adopts the carried sockets instead of binding new ones,
    /// so QEMU's connection and the listening sockets stay the same.
    pub fn spawn(
        guest: &str,
        device: &str,
        paths: ConsolePaths,
        log: LogFile,
        settings: ConsoleSettings,
        metrics: Arc<Metrics>,
        frozen: Option<FrozenConsole>,
    ) -> Result<Self> {
        let adopt = |e| {
            ConsoleError::io(
                format!("cannot adopt the sockets of console {guest}/{device}"),
                e,
            )
        };
        let carried = frozen.is_some();
        let (guest_listener, client_listener, guest_connection, pending_input) = match frozen {
            Some(fds) => (
                listener_from(fds.guest_listener).map_err(adopt)?,
                listener_from(fds.client_listener).map_err(adopt)?,
                fds.guest_connection
                    .map(stream_from)
                    .transpose()
                    .map_err(adopt)?,
                fds.pending_input,
            ),
            None => {
                create_socket_dir(&paths.guest_socket, settings.socket_group)?;
                (
                    bind(&paths.guest_socket, settings.socket_group)?,
                    bind(&paths.client_socket, None)?,
                    None,
                    Vec::new(),
                )
            }
        };
        if carried && regroup(&paths, settings.socket_group) {
            // Carried sockets kept the group they were given; a changed config gives the new
            // one to them and their directories.
            let dir = paths.guest_socket.parent();
            for dir in [dir.and_then(Path::parent), dir].into_iter().flatten() {
                give_dir_to_group(dir, settings.socket_group)?;
            }
            give_to_group(&paths.guest_socket, settings.socket_group)?;
        }
        hold_sockets(
            guest,
            device,
            &guest_listener,
            &client_listener,
            guest_connection.as_ref(),
        );
        let (commands, command_rx) = mpsc::channel(64);
        // Pieces are answered at once unless they become the one being written, so this
        // channel only holds pieces on their way to that answer.
        let (input, input_rx) = mpsc::channel(16);
        let (owner, log) = LogOwner::new(log, metrics, commands.clone());
        let handle = Self {
            commands,
            input,
            name: format!("{guest}/{device}").into(),
            log,
            console: Arc::new(ConsoleStats::default()),
            paths: Arc::new(paths),
            protocol: settings.protocol,
        };
        let actor = actor::ConsoleActor::new(
            handle.clone(),
            owner,
            guest_listener,
            client_listener,
            guest_connection,
            pending_input,
            settings,
        );
        tokio::spawn(
            actor
                .run(command_rx, input_rx)
                .instrument(tracing::info_span!("console", guest, stream = device)),
        );
        Ok(handle)
    }

    /// Attaches a client. The first event it receives is [`Event::Attached`].
    pub async fn attach(&self, request: AttachRequest) -> Result<Attachment> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Attach(request, reply))
            .await
            .map_err(|_| gone(&self.name))?;
        let (id, events) = answer.await.map_err(|_| gone(&self.name))??;
        Ok(Attachment {
            id,
            events,
            guard: DetachGuard {
                commands: self.commands.clone(),
                id,
            },
        })
    }

    /// Writes input of client `client` to the guest, piece by piece (at most
    /// [`MAX_PENDING_INPUT`] bytes each), and returns once the guest's socket took every byte.
    /// Refused (`FAILED_PRECONDITION`) when the client does not hold the writer lease or no
    /// guest is connected, and (`RESOURCE_EXHAUSTED`) while earlier input of another call is
    /// still being written. Cancel-safe in the strong sense: dropping the future withdraws what
    /// is not written yet, and none of it reaches the guest later.
    pub async fn write_input(&self, client: u64, data: Bytes) -> Result<usize> {
        // Watchers' input costs the actor nothing (a READ token may type as fast as it likes).
        if self
            .console
            .writer
            .load(std::sync::atomic::Ordering::Relaxed)
            != client
        {
            return Err(not_writer(&self.name));
        }
        let mut rest = data;
        let mut written = 0;
        loop {
            let piece = match self.protocol {
                Protocol::Raw => rest.split_to(rest.len().min(MAX_PENDING_INPUT)),
                // Escaped, a piece stays within MAX_PENDING_INPUT too.
                Protocol::Mux => rest.split_to(mux::fitting(&rest, MAX_PENDING_INPUT)),
            };
            let counted = piece.len();
            let data = match self.protocol {
                Protocol::Raw => piece,
                Protocol::Mux => mux::escape(piece),
            };
            written += self.send_piece(client, data, counted).await?;
            if rest.is_empty() {
                return Ok(written);
            }
        }
    }

    /// Sends a serial BREAK to the guest for client `client`, under the same rules as
    /// [`ConsoleHandle::write_input`]; refused (`FAILED_PRECONDITION`) by a console whose guest
    /// socket is raw, which cannot carry one.
    pub async fn send_break(&self, client: u64) -> Result<()> {
        if self.protocol != Protocol::Mux {
            return Err(ConsoleError::NoBreak(self.name.clone()));
        }
        if self
            .console
            .writer
            .load(std::sync::atomic::Ordering::Relaxed)
            != client
        {
            return Err(not_writer(&self.name));
        }
        self.send_piece(client, Bytes::from_static(&mux::BREAK), 0)
            .await
            .map(drop)
    }

    /// Hands one piece of wire bytes to the actor and waits until the guest took it.
    async fn send_piece(&self, client: u64, data: Bytes, counted: usize) -> Result<usize> {
        let (reply, answer) = oneshot::channel();
        self.input
            .send(Input {
                client,
                data,
                counted,
                reply,
            })
            .await
            .map_err(|_| gone(&self.name))?;
        answer.await.map_err(|_| gone(&self.name))?
    }

    /// Ends every attached client (gRPC streams end with `UNAVAILABLE`, raw connections close)
    /// while the guest stays connected and logged; new clients may still attach.
    pub async fn end_clients(&self, reason: &str) {
        let (done, finished) = oneshot::channel();
        if self
            .commands
            .send(Command::EndClients(reason.to_owned(), done))
            .await
            .is_ok()
        {
            let _ = finished.await;
        }
    }

    /// Stops the actor for an upgrade and returns its sockets and pending input. Clients end
    /// with `UNAVAILABLE` and resume by offset; the socket files stay.
    pub async fn freeze(&self) -> Option<FrozenConsole> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Freeze(reply)).await.ok()?;
        answer.await.ok()
    }
}

/// An attached client: its id, its events, and a guard that detaches it when dropped.
pub struct Attachment {
    pub id: u64,
    pub events: ClientReceiver,
    #[allow(dead_code, reason = "held for its Drop, which detaches the client")]
    pub guard: DetachGuard,
}

/// Detaches a client (releasing its writer lease) when dropped.
pub struct DetachGuard {
    commands: mpsc::Sender<Command>,
    id: u64,
}

impl Drop for DetachGuard {
    fn drop(&mut self) {
        if let Err(mpsc::error::TrySendError::Full(command)) =
            self.commands.try_send(Command::Detach(self.id))
        {
            let commands = self.commands.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = commands.send(command).await;
                });
            }
        }
    }
}

/// Creates the directory of a console's sockets: one `mkdir` when its parent exists (a stop
/// removes it, so a restart creates thousands). With a socket group, the directory and
/// `consoles/` above it are given to that group, mode 0750, when created: its members can reach
/// the guest sockets whatever conlogd's umask.
fn create_socket_dir(socket: &Path, group: Option<u32>) -> Result<()> {
    let Some(dir) = socket.parent() else {
        return Ok(());
    };
    let io = |e| ConsoleError::io(format!("cannot create {}", dir.display()), e);
    match std::fs::create_dir(dir) {
        Ok(()) => give_dir_to_group(dir, group),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            if let Some(consoles) = dir.parent() {
                give_dir_to_group(consoles, group)?;
            }
            give_dir_to_group(dir, group)
        }
        Err(e) => Err(io(e)),
    }
}

/// `dir` to `group` with mode 0750 (nothing without a group).
fn give_dir_to_group(dir: &Path, group: Option<u32>) -> Result<()> {
    if group.is_none() {
        return Ok(());
    }
    give_to_group(dir, group)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        .map_err(|e| ConsoleError::io(format!("cannot set the mode of {}", dir.display()), e))
}

/// Changes the group of `path` (not its owner); nothing without a group.
fn give_to_group(path: &Path, group: Option<u32>) -> Result<()> {
    let Some(gid) = group else {
        return Ok(());
    };
    rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(|e| {
        ConsoleError::io(
            format!(
                "cannot give {} to group {gid} (consoles.socket_group)",
                path.display()
            ),
            e.into(),
        )
    })
}

/// Whether a carried guest socket (an upgrade, a takeover, a crash) must be given the
/// configured group: when one is configured and the socket has another.
fn regroup(paths: &ConsolePaths, group: Option<u32>) -> bool {
    use std::os::unix::fs::MetadataExt;
    group.is_some_and(|gid| {
        std::fs::metadata(&paths.guest_socket).is_ok_and(|meta| meta.gid() != gid)
    })
}

/// Binds a console socket (mode 0660, given to `group` if any) in its existing directory,
/// replacing a stale file: one `bind` in the common case.
fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener> {
    let io = |e| ConsoleError::io(format!("cannot bind {}", path.display()), e);
    let listener = match UnixListener::bind(path) {
        Ok(listener) => listener,
        // A socket left by a daemon that did not stop cleanly (the state lock says no
        // other daemon serves this runtime directory).
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            std::fs::remove_file(path).map_err(io)?;
            UnixListener::bind(path).map_err(io)?
        }
        // The directory went away meanwhile (the guest's last other console closed).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            create_socket_dir(path, group)?;
            UnixListener::bind(path).map_err(io)?
        }
        Err(e) => return Err(io(e)),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    give_to_group(path, group)?;
    Ok(listener)
}

/// Gives the keeper a copy of a console's sockets ([`crate::keeper`]); a connection carried
/// by an upgrade is held already under the same name.
fn hold_sockets(
    guest: &str,
    device: &str,
    guest_listener: &UnixListener,
    client_listener: &UnixListener,
    connection: Option<&tokio::net::UnixStream>,
) {
    use crate::keeper::{hold, names};
    use std::os::fd::AsFd;
    hold(
        &names::console(guest, device, names::GUEST_LISTENER),
        guest_listener.as_fd(),
    );
    hold(
        &names::console(guest, device, names::CLIENT_LISTENER),
        client_listener.as_fd(),
    );
    if let Some(connection) = connection {
        hold(
            &names::console(guest, device, names::CONNECTION),
            connection.as_fd(),
        );
    }
}

fn listener_from(fd: OwnedFd) -> std::io::Result<UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

fn stream_from(fd: OwnedFd) -> std::io::Result<tokio::net::UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}
