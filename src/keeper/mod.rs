//! Descriptors that outlive the process: a copy of every descriptor that must survive a crash
//! of conlogd is held by something that survives it, and handed back to the next conlogd.
//!
//! Held: the daemon-wide listening sockets, every pipe read end, every console's two
//! listening sockets and QEMU's connection, and the write ends of pending hand-offs (names:
//! [`names`]). The holder is either
//! - a keeper process ([`server`], `conlogd keeper`) on `keeper.sock` ([`protocol`]): started
//!   detached by conlogd when none answers (`keeper: auto`), or by someone else, such as a
//!   container of the same pod (`keeper: external`); or
//! - systemd's file descriptor store ([`systemd`]; `keeper: auto` under systemd, or
//!   `keeper: systemd`).
//!
//! This module owns the process-wide holder: the owners of descriptors call [`hold`] when
//! one comes into their hands and [`release`] when they close it for good (a stream ends, a
//! guest is removed, a hand-off is claimed or expires); nothing is released when descriptors
//! are carried to a next image (upgrade, takeover): the names stay the same. A dedicated
//! thread sends the changes; the owners never wait for it, except where a crash in between
//! would break the promise ([`flushed`]: a pipe's write end is handed out, or QEMU's new
//! connection is read, only once the keeper holds it).
//!
//! The holder keeps its own duplicate of each held descriptor (one descriptor per entry): if
//! the keeper dies, the thread starts a new one and registers everything again; nothing is
//! lost meanwhile, since conlogd still holds the originals.
//!
//! At start ([`start`]) conlogd takes everything held for a crashed predecessor
//! ([`Held`]); the daemon adopts it by name (listeners, then streams from the registry, then
//! hand-offs); once it has, [`reconciled`] releases every held name nobody claimed (a stream
//! removed, a name this image does not know). A pipe or console connection that ended while
//! conlogd was down is adopted like any other: its actor reads what is left, sees the end,
//! and releases it.
//!
//! This module never reads or writes a held descriptor.

mod client;
pub(crate) mod names;
pub mod protocol;
pub mod server;
pub mod systemd;

use crate::config::{Config, KeeperMode};
use crate::upgrade::{FrozenConsole, FrozenHandoff, FrozenStream};
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often the thread checks that the keeper is alive, and retries one that is not.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a start waits for a keeper busy with a daemon that died.
const BUSY_PATIENCE: Duration = Duration::from_secs(5);
/// How long a clean stop waits for the keeper to let go of everything.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

static HOLDER: OnceLock<Arc<Holder>> = OnceLock::new();

/// Holds `fd` as `name` (replacing what was held under it). Returns at once; see [`flushed`].
/// Does nothing when no keeper is configured.
pub(crate) fn hold(name: &str, fd: BorrowedFd<'_>) {
    let Some(holder) = HOLDER.get() else { return };
    match fd.try_clone_to_owned() {
        Ok(copy) => holder.change(name, Some(Arc::new(copy))),
        // Out of descriptors, perhaps because guests and clients hold many: once per change.
        Err(e) => {
            crate::limited!(warn, name, error = %e, "cannot duplicate a descriptor for the keeper")
        }
    }
}

/// Stops holding `name` (the keeper closes its copy).
pub(crate) fn release(name: &str) {
    if let Some(holder) = HOLDER.get() {
        holder.change(name, None);
    }
}

/// Resolves once every [`hold`] and [`release`] made before the call has reached the keeper,
/// or at once when there is no keeper or it is unreachable (conlogd never waits for a keeper
/// that is down; it registers everything again when one is back).
pub(crate) fn flushed() -> oneshot::Receiver<()> {
    let (done, receiver) = oneshot::channel();
    match HOLDER.get() {
        Some(holder) => {
            let mut state = holder.lock();
            let generation = state.generation;
            state.waiters.push((generation, done));
            holder.wake.notify_one();
        }
        None => {
            let _ = done.send(());
        }
    }
    receiver
}

/// The daemon has adopted what it wanted from [`Held`]: every name held for the previous
/// process that was not held again since is released.
pub(crate) fn reconciled() {
    let Some(holder) = HOLDER.get() else { return };
    let mut state = holder.lock();
    state.reconciled = true;
    let unclaimed: Vec<String> = std::mem::take(&mut state.unclaimed)
        .into_iter()
        .filter(|name| !state.held.contains_key(name))
        .collect();
    if !unclaimed.is_empty() {
        tracing::info!(
            count = unclaimed.len(),
            "releasing held descriptors no stream claimed"
        );
    }
    for name in unclaimed {
        state.dirty.insert(name, None);
    }
    state.generation += 1;
    holder.wake.notify_one();
}

/// A clean stop: the keeper lets go of everything (a keeper this daemon started exits).
pub(crate) async fn shutdown() {
    stop(Stop::Finish).await;
}

/// After a takeover: this process leaves the keeper to its successor (one client at a time)
/// without letting go of anything; the successor holds everything under the same names.
pub(crate) async fn detach() {
    stop(Stop::Detach).await;
}

async fn stop(kind: Stop) {
    let Some(holder) = HOLDER.get() else { return };
    let (done, finished) = oneshot::channel();
    {
        let mut state = holder.lock();
        state.held.clear();
        state.dirty.clear();
        state.stop = Some((kind, done));
        holder.wake.notify_one();
    }
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, finished)
        .await
        .is_err()
    {
        tracing::warn!("the keeper did not confirm the stop");
    }
}

/// What was held for a crashed predecessor, by name, until the daemon adopts it. What is
/// left when this is dropped is closed here (and released by [`reconciled`]).
#[derive(Default)]
pub(crate) struct Held {
    entries: BTreeMap<String, OwnedFd>,
}

impl Held {
    /// How many descriptors came back.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing came back.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The daemon-wide listener `what` (see [`names::listener`]).
    pub(crate) fn take_listener(&mut self, what: &str) -> Option<OwnedFd> {
        self.entries.remove(&names::listener(what))
    }

    /// Every stream's pipes and console sockets. A console comes back only with both its
    /// listening sockets (anything else of it is closed).
    pub(crate) fn take_streams(&mut self) -> Vec<FrozenStream> {
        let mut streams: BTreeMap<(String, String), FrozenStream> = BTreeMap::new();
        let mut consoles: BTreeMap<(String, String), BTreeMap<String, OwnedFd>> = BTreeMap::new();
        let taken: Vec<String> = self
            .entries
            .keys()
            .filter(|name| name.starts_with("pipe/") || name.starts_with("console/"))
            .cloned()
            .collect();
        for name in taken {
            let fd = self.entries.remove(&name).expect("listed");
            match names::parse(&name) {
                Some(names::Parsed::Pipe { guest, stream }) => streams
                    .entry((guest.clone(), stream.clone()))
                    .or_insert_with(|| FrozenStream {
                        guest,
                        stream,
                        pipes: Vec::new(),
                        console: None,
                    })
                    .pipes
                    .push(fd),
                Some(names::Parsed::Console {
                    guest,
                    device,
                    part,
                }) => {
                    consoles
                        .entry((guest, device))
                        .or_default()
                        .insert(part, fd);
                }
                // What a keeper (maybe not ours: `keeper: external`) handed back, once per name.
                _ => crate::limited!(warn, name, "closing a held descriptor of unknown name"),
            }
        }
        for ((guest, device), mut parts) in consoles {
            let (Some(guest_listener), Some(client_listener)) = (
                parts.remove(names::GUEST_LISTENER),
                parts.remove(names::CLIENT_LISTENER),
            ) else {
                crate::limited!(
                    warn,
                    guest,
                    device,
                    "closing a console's held descriptors: its listening sockets are missing"
                );
                continue;
            };
            let entry = streams
                .entry((guest.clone(), device.clone()))
                .or_insert_with(|| FrozenStream {
                    guest,
                    stream: device,
                    pipes: Vec::new(),
                    console: None,
                });
            entry.console = Some(FrozenConsole {
                guest_listener,
                client_listener,
                guest_connection: parts.remove(names::CONNECTION),
                pending_input: Vec::new(),
            });
        }
        streams.into_values().collect()
    }

    /// Pending hand-offs that have not expired (expired ones are closed).
    pub(crate) fn take_handoffs(&mut self) -> Vec<FrozenHandoff> {
        let taken: Vec<String> = self
            .entries
            .keys()
            .filter(|name| name.starts_with("handoff/"))
            .cloned()
            .collect();
        let mut handoffs = Vec::new();
        for name in taken {
            let fd = self.entries.remove(&name).expect("listed");
            if let Some(names::Parsed::Handoff {
                token,
                guest,
                stream,
                expires_in,
            }) = names::parse(&name)
            {
                if !expires_in.is_zero() {
                    handoffs.push(FrozenHandoff {
                        token,
                        guest,
                        stream,
                        write_end: fd,
                        expires_in,
                    });
                }
            }
        }
        handoffs
    }
}

/// Checks that a keeper answers on `runtime_dir`'s `keeper.sock` (serving a client or not),
/// for a container's probe.
pub fn check(runtime_dir: &std::path::Path) -> std::io::Result<()> {
    match client::Connection::connect(&server::socket_path(runtime_dir)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => Ok(()),
        Err(e) => Err(e),
    }
}

/// True when no daemon holds `conlogd.lock` in `runtime_dir` (it died, or never ran): nobody
/// to take over from even though a keeper may still hold `handover.sock` for it, and a keeper
/// still busy with it is about to notice its end.
pub(crate) fn no_daemon_running(runtime_dir: &std::path::Path) -> bool {
    let Ok(file) = std::fs::File::open(runtime_dir.join("conlogd.lock")) else {
        return true;
    };
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
}

/// Connects to what holds the descriptors (starting a keeper if `keeper: auto` and none
/// answers), takes what it holds for a crashed predecessor, and starts the thread that keeps
/// it up to date. With `keeper: off`, or if called twice, returns nothing held.
pub(crate) async fn start(config: &Config) -> Held {
    if config.keeper == KeeperMode::Off || HOLDER.get().is_some() {
        return Held::default();
    }
    let use_systemd = match config.keeper {
        KeeperMode::Systemd => true,
        KeeperMode::Auto => systemd::available(),
        _ => false,
    };
    let runtime_dir = config.runtime_dir().to_owned();
    let spawn = config.keeper == KeeperMode::Auto;
    // Every event of the link to the holder, at start and on its thread, is in this span.
    let span = tracing::info_span!("keeper");
    let start_span = span.clone();
    let (link, entries) = tokio::task::spawn_blocking(move || {
        let _entered = start_span.enter();
        if use_systemd {
            if std::env::var_os("FDSTORE").is_none() {
                tracing::warn!("started by systemd without a descriptor store (FDSTORE is not set): set FileDescriptorStoreMax= in the unit, or nothing survives a crash");
            }
            let entries = systemd::take_passed();
            let mut store = systemd::Store::default();
            for (name, fd) in &entries {
                store.believe(name, fd);
            }
            return (Link::Systemd(store), entries);
        }
        let mut keeper = KeeperLink::new(runtime_dir.clone(), spawn);
        // A keeper still busy with a daemon that died answers "busy" until it notices; with
        // no daemon holding the lock, it will shortly.
        let deadline = Instant::now() + BUSY_PATIENCE;
        let entries = loop {
            match keeper.connect_and_fetch() {
                Ok(entries) => break entries,
                Err(busy)
                    if busy
                        && Instant::now() < deadline
                        && no_daemon_running(&runtime_dir) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => break Vec::new(),
            }
        };
        keeper.next_attempt = Instant::now();
        (Link::Keeper(keeper), entries)
    })
    .await
    .expect("keeper start-up does not panic");
    let mut held = Held::default();
    let mut unclaimed = BTreeSet::new();
    for (name, fd) in entries {
        unclaimed.insert(name.clone());
        held.entries.insert(name, fd);
    }
    if !held.is_empty() {
        tracing::info!(
            descriptors = held.len(),
            "took back the descriptors held through the previous daemon's end"
        );
    }
    let holder = Arc::new(Holder {
        state: Mutex::new(State {
            unclaimed,
            ..State::default()
        }),
        wake: Condvar::new(),
    });
    if HOLDER.set(holder.clone()).is_ok() {
        std::thread::Builder::new()
            .name("conlog-keeper".into())
            .spawn(move || span.in_scope(|| holder.run(link)))
            .expect("spawn the keeper thread");
    }
    held
}

/// The process-wide record of what must be held, and the thread that sends it.
struct Holder {
    /// Locked for a few instructions at a time (never while talking to the keeper).
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Everything that must be held, with this process's duplicate.
    held: BTreeMap<String, Arc<OwnedFd>>,
    /// Changes not sent yet: the latest per name (`None`: release).
    dirty: BTreeMap<String, Option<Arc<OwnedFd>>>,
    /// Counts changes, so [`flushed`] knows which are sent.
    generation: u64,
    waiters: Vec<(u64, oneshot::Sender<()>)>,
    /// Names held for the previous process, not claimed yet.
    unclaimed: BTreeSet<String>,
    /// Set by [`reconciled`].
    reconciled: bool,
    /// A stop was asked.
    stop: Option<(Stop, oneshot::Sender<()>)>,
}

/// How the thread ends.
enum Stop {
    /// Let go of everything: a clean stop of the daemon.
    Finish,
    /// Leave the keeper holding everything for a successor.
    Detach,
}

impl Holder {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("keeper state poisoned")
    }

    fn change(&self, name: &str, fd: Option<Arc<OwnedFd>>) {
        let mut state = self.lock();
        match &fd {
            Some(fd) => {
                state.held.insert(name.to_owned(), fd.clone());
            }
            None => {
                state.held.remove(name);
            }
        }
        state.dirty.insert(name.to_owned(), fd);
        state.generation += 1;
        self.wake.notify_one();
    }

    /// The thread: sends changes as they come, checks the link every second, and registers
    /// everything again over a new link.
    fn run(&self, mut link: Link) {
        loop {
            let (batch, generation, stop) = {
                let mut state = self.lock();
                if state.dirty.is_empty() && state.waiters.is_empty() && state.stop.is_none() {
                    state = self
                        .wake
                        .wait_timeout(state, CHECK_EVERY)
                        .expect("keeper state poisoned")
                        .0;
                }
                (
                    std::mem::take(&mut state.dirty),
                    state.generation,
                    state.stop.take(),
                )
            };
            match link.ensure() {
                Ensure::Down => {}
                Ensure::Resync => self.resync(&mut link),
                Ensure::Up if matches!(stop, Some((Stop::Detach, _))) => {}
                Ensure::Up => {
                    if !batch.is_empty() {
                        crate::fault::point("keeper.apply");
                    }
                    for (name, fd) in &batch {
                        if let Err(e) = link.apply(name, fd.as_deref().map(AsFd::as_fd)) {
                            tracing::warn!(error = %e, "lost the keeper; holding again once one answers");
                            link.drop_connection();
                            break;
                        }
                    }
                }
            }
            let mut state = self.lock();
            let waiters = std::mem::take(&mut state.waiters);
            for (at, done) in waiters {
                if at <= generation {
                    let _ = done.send(());
                } else {
                    state.waiters.push((at, done));
                }
            }
            drop(state);
            if let Some((kind, done)) = stop {
                match kind {
                    Stop::Finish => link.finish(),
                    Stop::Detach => link.drop_connection(),
                }
                let _ = done.send(());
                return;
            }
        }
    }

    /// A new link: what it holds that this process does not is released (once reconciled),
    /// then everything this process holds is stored again.
    fn resync(&self, link: &mut Link) {
        let held: Vec<(String, Arc<OwnedFd>)> = {
            let state = self.lock();
            state
                .held
                .iter()
                .map(|(name, fd)| (name.clone(), fd.clone()))
                .collect()
        };
        let known = link.names();
        let (reconciled, keep) = {
            let mut state = self.lock();
            if !state.reconciled {
                state.unclaimed.extend(known.iter().cloned());
            }
            (
                state.reconciled,
                state.held.keys().cloned().collect::<BTreeSet<_>>(),
            )
        };
        let mut result = Ok(());
        if reconciled {
            for name in known.iter().filter(|n| !keep.contains(*n)) {
                result = result.and_then(|()| link.apply(name, None));
            }
        }
        for (name, fd) in &held {
            result = result.and_then(|()| link.apply(name, Some(fd.as_fd())));
        }
        match result {
            Ok(()) => tracing::info!(
                descriptors = held.len(),
                "the keeper holds every descriptor"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "lost the keeper while registering; trying again");
                link.drop_connection();
            }
        }
    }
}

/// What the thread talks to.
enum Link {
    Keeper(KeeperLink),
    Systemd(systemd::Store),
}

/// The state of a link before a batch.
enum Ensure {
    Up,
    /// Newly (re)connected: everything must be registered again.
    Resync,
    Down,
}

impl Link {
    fn ensure(&mut self) -> Ensure {
        match self {
            Link::Keeper(keeper) => keeper.ensure(),
            Link::Systemd(_) => Ensure::Up,
        }
    }

    fn apply(&mut self, name: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        match (self, fd) {
            (Link::Keeper(keeper), fd) => {
                let connection = keeper
                    .connection
                    .as_ref()
                    .ok_or_else(|| std::io::Error::other("not connected"))?;
                match fd {
                    Some(fd) => connection.store(name, fd),
                    None => connection.remove(name),
                }
            }
            (Link::Systemd(store), Some(fd)) => store.store(name, fd),
            (Link::Systemd(store), None) => store.remove(name),
        }
    }

    /// Names the other side holds (a keeper reached again after a while).
    fn names(&mut self) -> Vec<String> {
        match self {
            Link::Keeper(keeper) => keeper
                .connection
                .as_ref()
                .and_then(|c| c.fetch().ok())
                .map(|entries| entries.into_iter().map(|(name, _)| name).collect())
                .unwrap_or_default(),
            Link::Systemd(_) => Vec::new(),
        }
    }

    fn drop_connection(&mut self) {
        if let Link::Keeper(keeper) = self {
            keeper.connection = None;
        }
    }

    /// A clean stop: let go of everything; a keeper this daemon may have started exits.
    fn finish(&mut self) {
        match self {
            Link::Keeper(keeper) => {
                let Some(connection) = keeper.connection.as_ref() else {
                    return;
                };
                let result = if keeper.spawn {
                    connection.quit()
                } else {
                    connection.clear()
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "cannot tell the keeper to let go");
                }
                if let Some(mut child) = keeper.child.take() {
                    let _ = child.wait();
                }
            }
            Link::Systemd(store) => {
                for name in store.names() {
                    let _ = store.remove(&name);
                }
            }
        }
    }
}

/// A connection to a keeper process, re-established (and the keeper restarted, in
/// `keeper: auto`) when lost.
struct KeeperLink {
    socket: PathBuf,
    runtime_dir: PathBuf,
    /// Start a keeper when none answers.
    spawn: bool,
    connection: Option<client::Connection>,
    /// A keeper this daemon started, reaped when it exits.
    child: Option<std::process::Child>,
    /// No new attempt before this.
    next_attempt: Instant,
    /// Why the last attempt failed, to log each new reason once.
    last_error: Option<String>,
    /// The last attempt found the keeper serving another client.
    busy: bool,
}

impl KeeperLink {
    fn new(runtime_dir: PathBuf, spawn: bool) -> Self {
        Self {
            socket: server::socket_path(&runtime_dir),
            runtime_dir,
            spawn,
            connection: None,
            child: None,
            next_attempt: Instant::now(),
            last_error: None,
            busy: false,
        }
    }

    /// At start: connect (or start a keeper) and take what it holds; the error says whether
    /// the keeper was busy with another client.
    fn connect_and_fetch(&mut self) -> Result<Vec<(String, OwnedFd)>, bool> {
        if !self.connect() {
            return Err(self.busy);
        }
        match self.connection.as_ref().map(client::Connection::fetch) {
            Some(Ok(entries)) => Ok(entries),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot take back what the keeper holds");
                self.connection = None;
                Err(false)
            }
            None => Err(false),
        }
    }

    fn connect(&mut self) -> bool {
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                tracing::warn!(%status, "the keeper this daemon started has exited");
                self.child = None;
            }
        }
        let attempt = match client::Connection::connect(&self.socket) {
            Err(e)
                if self.spawn
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                client::spawn(&self.runtime_dir).map(|(child, connection)| {
                    tracing::info!(pid = child.id(), socket = %self.socket.display(), "started a keeper");
                    self.child = Some(child);
                    connection
                })
            }
            other => other,
        };
        match attempt {
            Ok(connection) => {
                tracing::info!(socket = %self.socket.display(), "connected to the keeper");
                self.connection = Some(connection);
                self.last_error = None;
                true
            }
            Err(e) => {
                self.busy = e.kind() == std::io::ErrorKind::ResourceBusy;
                let text = e.to_string();
                if self.last_error.as_deref() != Some(text.as_str()) {
                    if self.busy {
                        // A successor while its predecessor lets go of the keeper (takeover).
                        tracing::info!(socket = %self.socket.display(), "the keeper serves another daemon; holding once it is free");
                    } else {
                        tracing::warn!(socket = %self.socket.display(), error = %text, "no keeper: descriptors are not held until one answers");
                    }
                    self.last_error = Some(text);
                }
                self.next_attempt = Instant::now() + CHECK_EVERY;
                false
            }
        }
    }

    fn ensure(&mut self) -> Ensure {
        if let Some(connection) = &self.connection {
            if connection.alive() {
                return Ensure::Up;
            }
            tracing::warn!("the keeper went away; holding again with a new one");
            self.connection = None;
        }
        if Instant::now() < self.next_attempt || !self.connect() {
            return Ensure::Down;
        }
        Ensure::Resync
    }
}
