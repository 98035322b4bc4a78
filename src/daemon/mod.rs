//! Assembly and lifecycle of `conlogd`: directories, listeners, services, signals, upgrades and
//! clean shutdown.
//!
//! Owns the order of start-up, upgrade and shutdown and nothing else: every resource it creates
//! is handed to the module that owns it. The daemon starts fresh (binding everything), from the
//! state carried by an in-place upgrade, or by taking over from a running daemon. Then it serves
//! until one of:
//! - SIGTERM/SIGINT: stop accepting, end console clients and followers with `UNAVAILABLE`, let
//!   gRPC calls finish (bounded), drain every pipe into its log, sync, remove the sockets, exit.
//! - SIGUSR1 or `Agent.Upgrade`: check the binary, freeze, `execve` it with the carried state
//!   ([`crate::upgrade::exec`]); if that fails, thaw and serve on.
//! - a successor on `handover.sock` (one whose hello was exact; anything else is dropped
//!   without freezing anything): freeze, send the state ([`crate::upgrade::handover`]), exit 0
//!   once it confirms in time; if it does not, tell it so, thaw and serve on.
//!
//! The signals it handles are blocked from the first instruction of `main` until its handlers
//! exist: one that arrives during start-up (restoring thousands of streams takes a while) waits
//! and is acted on once serving. A freeze first closes the gate of registry and hand-off changes
//! ([`crate::upgrade::gate`]) so that everything made by a call in flight is carried. The
//! daemon-wide counters continue across upgrades, takeovers and restarts
//! ([`crate::metrics::Saved`]).

mod listeners;

use crate::config::Config;
use crate::guests::Guests;
use crate::handoff::Handoffs;
use crate::metrics::{Counters, Metrics, Saved};
use crate::server::{self, agent::AgentService, console::ConsoleService, Protection};
use crate::tls::Tls;
use crate::tokens::TokenKey;
use crate::upgrade::{self, exec::Image, gate::Gate, handover, State};
use listeners::{tokio_tcp, tokio_unix, Listeners};
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How long gRPC calls may take to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long they may take during an upgrade, while writers wait (only short unary calls are
/// left by then: console clients and followers were ended by the freeze).
const UPGRADE_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// Taking over from the running daemon failed.
    #[error("Cannot take over from the running daemon: {0}")]
    Takeover(io::Error),
    /// The listeners could not be served.
    #[error("Cannot serve: {0}")]
    Listen(io::Error),
    /// The TLS files named in the config could not be used.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The token key could not be read or created.
    #[error("Cannot use the token key {path}: {source}")]
    TokenKey { path: PathBuf, source: io::Error },
}

/// Checks what a start would need beyond the config (TLS files, the token key), so that an
/// upgrade to a binary or config that could not start is refused before the old image ends.
pub fn preflight(config: &Config) -> Result<(), StartError> {
    Security::load(config).map(drop)
}

/// What guards the listeners; built once, kept across upgrades that fail.
struct Security {
    tls: Option<Arc<Tls>>,
    tokens: Arc<TokenKey>,
    protection: Protection,
}

impl Security {
    fn load(config: &Config) -> Result<Self, StartError> {
        let path = TokenKey::path_in(&config.data_dir().join("state"));
        let tokens = TokenKey::load_or_create(&path)
            .map_err(|source| StartError::TokenKey { path, source })?;
        let tls = match &config.tls {
            Some(tls) => Some(Arc::new(Tls::load(tls)?)),
            None => None,
        };
        if config.insecure && tls.is_none() {
            tracing::warn!(
                listen = %config.listen,
                "insecure: true — console traffic and tokens on TCP are not encrypted; \
                 configure tls.cert and tls.key"
            );
        }
        let tokens = Arc::new(tokens);
        Ok(Self {
            tls,
            protection: Protection::new(&config.limits, tokens.clone()).with_web(&config.web),
            tokens,
        })
    }

    /// SIGHUP: reads the TLS files again; on error the old certificates stay.
    fn reload(&self) {
        let Some(tls) = &self.tls else {
            tracing::info!("SIGHUP: no TLS configured, nothing to reload");
            return;
        };
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the previous certificates")
            }
        }
    }
}

/// How this process begins.
pub enum Start {
    /// Bind everything; restore streams from the state directory.
    Fresh,
    /// `execve`'d by an upgrade: adopt the carried state.
    Upgraded(State),
    /// Take over from the daemon serving the runtime directory (`--takeover`).
    Takeover,
}

/// Behaviour switches from the command line.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// After handing over to a successor, stay alive (holding nothing) until SIGTERM instead of
    /// exiting. Kubernetes restarts a container that exits, even with status 0; a restarted
    /// old pod would take the daemon back from the new one.
    pub linger_after_handover: bool,
}

/// An upgrade request from `Agent.Upgrade`; the answer is this pid, or why not.
pub type UpgradeRequest = oneshot::Sender<Result<u32, String>>;

/// What ends a period of serving.
enum Event {
    Stop(&'static str),
    Upgrade(Option<UpgradeRequest>),
    Takeover(UnixStream),
}

/// Runs the daemon until it stops or hands over.
pub async fn run(
    config: Config,
    start: Start,
    image: Image,
    options: RunOptions,
) -> Result<(), StartError> {
    let config = Arc::new(config);
    raise_descriptor_limit();
    for dir in [config.runtime_dir(), config.data_dir(), config.log_dir()] {
        fs::create_dir_all(dir).map_err(|source| StartError::Directory {
            path: dir.to_owned(),
            source,
        })?;
    }
    let security = Security::load(&config)?;
    let metrics = Arc::new(Metrics::default());
    let guests = Guests::new(config.clone(), metrics.clone());
    let gate = Gate::new();
    let handoffs = Handoffs::new(
        config.handoff.token_ttl.get(),
        config.limits.pending_handoffs as usize,
        metrics.clone(),
        gate.clone(),
    );
    let counters_file = Saved::path_in(&config.data_dir().join("state"));
    let (state, mut took_over) = match start {
        Start::Fresh => (None, false),
        Start::Upgraded(state) => (Some(state), false),
        // A keeper may hold handover.sock for a daemon that died (crate::keeper): with the
        // lock free there is nobody to take over from.
        Start::Takeover if crate::keeper::no_daemon_running(config.runtime_dir()) => {
            tracing::info!(
                "no running daemon to take over from (conlogd.lock is free); starting fresh"
            );
            (None, false)
        }
        // Returns only once the running daemon has committed to the takeover (or died): from
        // here on nobody else writes these streams.
        Start::Takeover => match handover::receive(config.runtime_dir()).await {
            Ok(state) => (Some(state), true),
            // Nobody to take over from (first start on this node): start fresh. Anything else
            // (a daemon that answers but fails the protocol) is an error: two daemons must
            // never serve one runtime directory.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                tracing::info!(error = %e, "no running daemon to take over from; starting fresh");
                (None, false)
            }
            Err(e) => return Err(StartError::Takeover(e)),
        },
    };
    let carried = state.as_ref().map(|state| state.counters);
    // Crash survival (crate::keeper): what a keeper or systemd's store held through the end of
    // the previous daemon is adopted by name on a fresh start; carried state wins otherwise.
    let mut held = crate::keeper::start(&config).await;
    tracing::info!("restoring streams");
    crate::fault::point("start.restore");
    let mut listeners = match state {
        None => {
            let listeners = Listeners::bind(&config, &mut held)?;
            guests.restore(held.take_streams()).await?;
            handoffs.adopt(held.take_handoffs());
            listeners
        }
        Some(state) => thaw(state, &config, &guests, &handoffs, &gate).await?,
    };
    drop(held);
    crate::keeper::reconciled();
    // Once this process holds the lock: a daemon refused at start-up must not touch the file.
    continue_counters(&metrics, carried, &counters_file);
    let (upgrade_tx, mut upgrade_rx) = mpsc::channel::<UpgradeRequest>(4);
    let mut signals = Signals::new();
    // These signals have been blocked since the first instruction of `main` (or across the
    // exec of an upgrade); the handlers exist now, so take what is pending: it is acted on as
    // soon as the loop below serves.
    upgrade::exec::unblock_signals();
    loop {
        let mut serving = Serving::start(
            &config,
            &listeners,
            &guests,
            &handoffs,
            &metrics,
            upgrade_tx.clone(),
            &security,
        )
        .map_err(StartError::Listen)?;
        tracing::info!(
            socket = %config.runtime_dir().join("conlogd.sock").display(),
            tcp = %serving.tcp_address,
            tls = %security.tls.as_ref().map_or("off", |t| if t.mutual() { "mutual" } else { "on" }),
            metrics = %serving.metrics_address.map_or("off".into(), |a| a.to_string()),
            health = %serving.health_address.map_or("off".into(), |a| a.to_string()),
            restored_streams = guests.count().await,
            pid = std::process::id(),
            "conlogd ready"
        );
        if std::mem::take(&mut took_over) {
            tracing::info!("took over from the previous daemon");
        }
        notify_systemd("READY=1");
        let event = loop {
            let event = tokio::select! {
                // In this order when several are pending (signals that arrived during start-up
                // are all delivered at once): a reload asked for before an upgrade happens first.
                biased;
                _ = signals.term.recv() => Event::Stop("SIGTERM"),
                _ = signals.int.recv() => Event::Stop("SIGINT"),
                _ = signals.hup.recv() => {
                    security.reload();
                    continue;
                }
                _ = signals.usr1.recv() => Event::Upgrade(None),
                Some(reply) = upgrade_rx.recv() => Event::Upgrade(Some(reply)),
                Some(connection) = serving.successors.recv() => Event::Takeover(connection),
            };
            match event {
                Event::Upgrade(reply) => match upgrade::exec::preflight(&image).await {
                    Ok(()) => {
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(std::process::id()));
                        }
                        break Event::Upgrade(None);
                    }
                    Err(why) => {
                        tracing::error!(error = %why, "upgrade refused; serving on");
                        count_failure(&metrics, &counters_file);
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(why));
                        }
                    }
                },
                Event::Takeover(connection) => match handover::check_quiet(&connection).await {
                    Ok(()) => break Event::Takeover(connection),
                    Err(e) => tracing::warn!(error = %e, "ignoring a bad takeover request"),
                },
                stop => break stop,
            }
        };
        match event {
            Event::Stop(name) => {
                notify_systemd("STOPPING=1");
                tracing::info!(signal = name, "shutting down");
                serving.stop(&guests).await;
                crate::keeper::shutdown().await;
                for name in ["conlogd.sock", "fd.sock", "handover.sock"] {
                    let _ = fs::remove_file(config.runtime_dir().join(name));
                }
                // Every stream has stopped: these values are final, so the next start
                // continues from them exactly.
                let counters = metrics.counters();
                let saved = Saved {
                    at_stop: Some(counters),
                    ..Saved::running(&counters)
                };
                if let Err(e) = saved.save(&counters_file) {
                    tracing::warn!(error = %e, "cannot save the counters; the next start counts from 0");
                }
                tracing::info!("every log flushed; bye");
                return Ok(());
            }
            Event::Upgrade(_) => {
                tracing::info!(binary = %image.path.display(), "upgrading in place");
                let state = serving
                    .freeze(listeners, &guests, &handoffs, &gate, &metrics)
                    .await;
                let (state, error) = upgrade::exec::exec(&image, state);
                tracing::error!(error = %error, "cannot execute the new binary; serving on");
                upgrade::exec::unblock_signals();
                count_failure(&metrics, &counters_file);
                listeners = thaw(state, &config, &guests, &handoffs, &gate).await?;
            }
            Event::Takeover(mut connection) => {
                tracing::info!("a successor is taking over");
                let state = serving
                    .freeze(listeners, &guests, &handoffs, &gate, &metrics)
                    .await;
                match handover::send(&mut connection, state).await {
                    Ok(()) => {
                        crate::keeper::detach().await;
                        if options.linger_after_handover {
                            tracing::info!("handed over to the successor; idle until SIGTERM");
                            tokio::select! {
                                _ = signals.term.recv() => {}
                                _ = signals.int.recv() => {}
                            }
                        }
                        tracing::info!("handed over to the successor; bye");
                        return Ok(());
                    }
                    Err((state, e)) => {
                        tracing::error!(error = %e, "takeover failed; serving on");
                        count_failure(&metrics, &counters_file);
                        listeners = thaw(state, &config, &guests, &handoffs, &gate).await?;
                    }
                }
            }
        }
    }
}

/// Adopts carried state: listeners (the health listener as `config` wants it), pending
/// hand-offs, and every stream with its descriptors; then admits changes again.
async fn thaw(
    state: State,
    config: &Config,
    guests: &Guests,
    handoffs: &Handoffs,
    gate: &Gate,
) -> Result<Listeners, StartError> {
    guests.set_going_away(false);
    handoffs.adopt(state.handoffs);
    guests.restore(state.streams).await?;
    let listeners = Listeners::adopt(state.listeners, config);
    gate.open();
    Ok(listeners)
}

/// Starts the daemon-wide counters where the previous image left them: exactly from an upgrade
/// snapshot; from `state/counters.json` otherwise (see [`Saved`]: after a clean stop every
/// counter, after a crash only the upgrade counters). Then keeps the rare counters on disk.
/// `carried` is `None` on a fresh start, `Some(None)` after an image that carries none.
fn continue_counters(metrics: &Metrics, carried: Option<Option<Counters>>, file: &std::path::Path) {
    let saved = Saved::load(file).start_values();
    let values = match carried {
        Some(Some(carried)) => carried,
        // From an image that does not carry counters: the saved ones, this upgrade counted.
        Some(None) => Counters {
            upgrades: saved.upgrades + 1,
            ..saved
        },
        None => saved,
    };
    metrics.continue_from(&values);
    if let Err(e) = Saved::running(&metrics.counters()).save(file) {
        tracing::warn!(file = %file.display(), error = %e, "cannot save the counters");
    }
}

/// Counts an upgrade or takeover that failed (on disk first, so no scrape sees a value a
/// crash would take back).
fn count_failure(metrics: &Metrics, file: &std::path::Path) {
    let mut counters = metrics.counters();
    counters.upgrade_failures += 1;
    if let Err(e) = Saved::running(&counters).save(file) {
        tracing::warn!(file = %file.display(), error = %e, "cannot save the counters");
    }
    metrics.upgrade_failures.inc();
}

/// The servers of one period of serving.
struct Serving {
    stop: watch::Sender<bool>,
    grpc: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    tasks: Vec<JoinHandle<()>>,
    successors: mpsc::Receiver<UnixStream>,
    tcp_address: SocketAddr,
    metrics_address: Option<SocketAddr>,
    health_address: Option<SocketAddr>,
}

impl Serving {
    fn start(
        config: &Arc<Config>,
        listeners: &Listeners,
        guests: &Arc<Guests>,
        handoffs: &Arc<Handoffs>,
        metrics: &Arc<Metrics>,
        upgrades: mpsc::Sender<UpgradeRequest>,
        security: &Security,
    ) -> io::Result<Self> {
        let (stop, stop_rx) = watch::channel(false);
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
            fd_socket: config.runtime_dir().join("fd.sock"),
            upgrades,
            tokens: security.tokens.clone(),
        };
        let console = ConsoleService::new(
            guests.clone(),
            config.history.chunk_size.bytes() as usize,
            config.limits.input_rate.bytes(),
            security.tokens.clone(),
        )
        .with_remote_descriptors(security.protection.remote_descriptors.clone())
        .with_replay_budget(
            Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(config.limits.remote_replay_bytes.bytes())
                    .unwrap_or(usize::MAX)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            config.consoles.max_replay.bytes(),
        );
        let tcp = tokio_tcp(&listeners.tcp)?;
        let tcp_address = tcp.local_addr()?;
        let mut grpc = vec![
            tokio::spawn(server::serve_local(
                tokio_unix(&listeners.local)?,
                agent,
                console.clone(),
                security.protection.clone(),
                stopped(),
            )),
            tokio::spawn(server::serve_tcp(
                tcp,
                console,
                security.tls.clone(),
                security.tokens.clone(),
                security.protection.clone(),
                stopped(),
            )),
        ];
        let mut health_address = None;
        if let Some(listener) = &listeners.health {
            let listener = tokio_tcp(listener)?;
            health_address = listener.local_addr().ok();
            grpc.push(tokio::spawn(server::serve_health(
                listener,
                security.protection.clone(),
                config.limits.tcp_connections as usize,
                stopped(),
            )));
        }
        let mut tasks = vec![tokio::spawn(handoffs.clone().serve(
            tokio_unix(&listeners.fd_sock)?,
            config.handoff.read_timeout.get(),
        ))];
        let mut metrics_address = None;
        if let Some(listener) = &listeners.metrics {
            let listener = tokio_tcp(listener)?;
            metrics_address = listener.local_addr().ok();
            let mut registry = metrics.registry();
            registry.register_collector(Box::new(security.protection.figures()));
            tasks.push(tokio::spawn(crate::metrics::serve(
                listener,
                Arc::new(registry),
            )));
        }
        let (successor_tx, successors) = mpsc::channel(1);
        tasks.push(tokio::spawn(handover::accept(
            tokio_unix(&listeners.handover)?,
            successor_tx,
        )));
        Ok(Self {
            stop,
            grpc,
            tasks,
            successors,
            tcp_address,
            metrics_address,
            health_address,
        })
    }

    /// Stops accepting and ends the background tasks (their listener clones close; the
    /// originals stay open in [`Listeners`]).
    fn stop_accepting(&mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }

    /// Waits (bounded) for the gRPC servers to finish their calls.
    async fn drain(&mut self, timeout: Duration) {
        let servers = futures::future::join_all(self.grpc.drain(..));
        if tokio::time::timeout(timeout, servers).await.is_err() {
            tracing::warn!("gRPC calls or connections still open after {timeout:?}; closing them");
        }
    }

    /// Shutdown: streams close first (consoles end their clients with UNAVAILABLE, followers
    /// end), so the servers can drain at once; pipes are drained into their logs.
    async fn stop(mut self, guests: &Guests) {
        self.stop_accepting();
        guests
            .close_all("conlogd is shutting down; reconnect and resume by offset")
            .await;
        // No sync to stable storage: the next daemon reads the same page cache, and a power
        // cut costs what the kernel had not written back whether or not conlogd had stopped.
        // (`syncfs` was tried: it also flushes every other process's dirty data on the file
        // system, so a stop took as long as, say, a guest disk image's writeback.)
        self.drain(DRAIN_TIMEOUT).await;
    }

    /// Upgrade: freezes every stream (clients are told to come back), drains the servers and
    /// collects everything to carry, the counters with this upgrade counted.
    async fn freeze(
        mut self,
        listeners: Listeners,
        guests: &Guests,
        handoffs: &Handoffs,
        gate: &Gate,
        metrics: &Metrics,
    ) -> State {
        // Logging goes on while the servers drain (console clients are told to come back so
        // their calls end; idle connections and followers are bounded by the timeout); the
        // streams freeze only after, so the pause of logging is the freeze, exec and restore.
        self.stop_accepting();
        // Calls that create streams or pipes, or claim them, finish before anything is frozen
        // (so what they made is carried); later ones are refused with UNAVAILABLE.
        gate.close().await;
        guests.set_going_away(true);
        guests
            .end_console_clients("conlogd is upgrading; reconnect and resume by offset")
            .await;
        self.drain(UPGRADE_DRAIN_TIMEOUT).await;
        let streams = guests.freeze_all().await;
        let handoffs = handoffs.take_all();
        crate::fault::point("upgrade.frozen");
        // Every stream is frozen: no counter moves any more.
        let mut counters = metrics.counters();
        counters.upgrades += 1;
        State {
            listeners: listeners.into_fds(),
            streams,
            handoffs,
            counters: Some(counters),
        }
    }
}

/// The signals the daemon acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Self {
        let install = |kind| signal(kind).expect("signal handlers install");
        Self {
            term: install(SignalKind::terminate()),
            int: install(SignalKind::interrupt()),
            usr1: install(SignalKind::user_defined1()),
            hup: install(SignalKind::hangup()),
        }
    }
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
