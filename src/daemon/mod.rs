//! Assembly and lifecycle of `conlogd`: directories, listeners, services, signals, upgrades and
//! clean shutdown.
//!
//! Owns the order of start-up, upgrade and shutdown and nothing else: every resource it creates
//! is handed to the module that owns it. The daemon starts fresh (binding everything), from the
//! state carried by an in-place upgrade, or by taking over from a running daemon. Then it serves
//! until one of:
//! - SIGTERM/SIGINT: stop accepting, end console clients and followers with `UNAVAILABLE`, let
//!   gRPC calls finish (bounded), drain every pipe into its log (no fsync: docs/operations.md,
//!   "Durability"), remove the sockets, exit.
//! - SIGUSR1 or `Agent.Upgrade` (which asks through [`crate::upgrade::trigger`]): check the
//!   binary, freeze, `execve` it with the carried state ([`crate::upgrade::exec`]); if that
//!   fails, thaw and serve on.
//! - a successor on `handover.sock` (one whose hello was exact; anything else is dropped
//!   without freezing anything): freeze, send the state ([`crate::upgrade::handover`]), exit 0
//!   once it confirms in time; if it does not, tell it so, thaw and serve on.
//!
//! [`run`] reads as its steps: assemble (directories, TLS and tokens, the empty registry),
//! receive the carried state (upgrade, takeover), restore, then serve period after period.
//! A period of serving (`serving.rs`) ends in a stop or a hand-over; both hand-overs follow the
//! one sequence freeze → offer → thaw on failure (`transfer.rs`).
//!
//! The signals it handles are blocked from the first instruction of `main` until its handlers
//! exist: one that arrives during start-up (restoring thousands of streams takes a while) waits
//! and is acted on once serving. A freeze first closes the gate of registry and hand-off changes
//! ([`crate::upgrade::gate`]) so that everything made by a call in flight is carried. The
//! daemon-wide counters continue across upgrades, takeovers and restarts
//! ([`crate::metrics::Saved`]).

mod listeners;
mod security;
mod serving;
mod transfer;

use crate::config::Config;
use crate::guests::Guests;
use crate::handoff::Handoffs;
use crate::logfile::index::StartKind;
use crate::metrics::{Metrics, Saved};
use crate::upgrade::trigger::{self, Request, Requests};
use crate::upgrade::{self, exec::Image, gate::Gate, handover, FrozenDaemon};
use listeners::Listeners;
use security::Security;
use serving::{Serving, Signals};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use tokio::net::UnixStream;
use tracing::Instrument;
use transfer::{Handed, Successor};

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
    /// A socket group (config key `key`) does not exist.
    #[error("Invalid config value {key}: no group named {name:?} (give a group name from /etc/group or a number)")]
    Group { key: &'static str, name: String },
    /// Restoring the registry failed.
    #[error("Cannot restore state: {0}")]
    Restore(#[from] crate::guests::RegistryError),
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

/// How this process begins.
pub enum Start {
    /// Bind everything; restore streams from the state directory.
    Fresh,
    /// `execve`'d by an upgrade: adopt the carried state.
    Upgraded(FrozenDaemon),
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

/// What ends a period of serving.
enum Event<'a> {
    /// SIGTERM or SIGINT (named).
    Stop(&'static str),
    /// An upgrade whose binary passed its preflight, or a successor who said an exact hello.
    HandOver(Successor<'a>),
}

/// Runs the daemon until it stops or hands over.
pub async fn run(
    config: Config,
    start: Start,
    image: Image,
    options: RunOptions,
) -> Result<(), StartError> {
    let daemon = Daemon::assemble(config)?;
    let (state, took_over) = receive(&daemon.config, start).await?;
    let start = match (&state, took_over) {
        (None, _) => StartKind::Fresh,
        (Some(_), false) => StartKind::Upgraded,
        (Some(_), true) => StartKind::TakenOver,
    };
    let listeners = daemon.restore(state, start).await?;
    daemon.serve(listeners, &image, options, took_over).await
}

/// What lives for the whole process, whichever period of serving it is in.
struct Daemon {
    config: Arc<Config>,
    /// TLS and the token key, kept across upgrades that fail.
    security: Security,
    metrics: Arc<Metrics>,
    /// The registry of streams (frozen and thawed, never rebuilt).
    guests: Arc<Guests>,
    /// The pending hand-offs of log pipes.
    handoffs: Arc<Handoffs>,
    /// Closed by a freeze, so that every change in flight is carried.
    gate: Arc<Gate>,
    /// `state/counters.json`: the counters that survive a crash or a stop.
    counters_file: PathBuf,
}

/// Before anything is restored: the carried state, if this process starts from one, and
/// whether it was taken over from a running daemon.
async fn receive(
    config: &Config,
    start: Start,
) -> Result<(Option<FrozenDaemon>, bool), StartError> {
    match start {
        Start::Fresh => Ok((None, false)),
        Start::Upgraded(state) => Ok((Some(state), false)),
        // A keeper may hold handover.sock for a daemon that died (crate::keeper): with the
        // lock free there is nobody to take over from.
        Start::Takeover if crate::keeper::no_daemon_running(config.runtime_dir()) => {
            tracing::info!(
                "no running daemon to take over from (conlogd.lock is free); starting fresh"
            );
            Ok((None, false))
        }
        // Returns only once the running daemon has committed to the takeover (or died): from
        // here on nobody else writes these streams.
        Start::Takeover => match handover::receive(config.runtime_dir())
            .instrument(tracing::info_span!("takeover"))
            .await
        {
            Ok(state) => Ok((Some(state), true)),
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
                Ok((None, false))
            }
            Err(e) => Err(StartError::Takeover(e)),
        },
    }
}

impl Daemon {
    /// Directories, TLS and tokens, and the empty registry and hand-off table.
    fn assemble(config: Config) -> Result<Self, StartError> {
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
        let console_group = listeners::resolve_group(
            config.consoles.socket_group.as_deref(),
            "consoles.socket_group",
        )?;
        let guests = Guests::new(config.clone(), metrics.clone(), console_group);
        let gate = Gate::new();
        let handoffs = Handoffs::new(
            config.handoff.token_ttl.get(),
            config.limits.max_pending_handoffs(),
            metrics.clone(),
            gate.clone(),
        );
        let counters_file = Saved::path_in(&config.data_dir().join("state"));
        Ok(Self {
            config,
            security,
            metrics,
            guests,
            handoffs,
            gate,
            counters_file,
        })
    }

    /// Fills the registry and the hand-off table: from the carried state, or (fresh) by
    /// binding the listeners and restoring the streams of the state directory. What a keeper
    /// or systemd's store held through the end of the previous daemon is adopted by name on a
    /// fresh start (crash survival, [`crate::keeper`]); carried state wins otherwise.
    async fn restore(
        &self,
        state: Option<FrozenDaemon>,
        start: StartKind,
    ) -> Result<Listeners, StartError> {
        let carried = state.as_ref().map(|state| state.counters);
        let mut held = crate::keeper::start(&self.config).await;
        tracing::info!("restoring streams");
        crate::fault::point("start.restore");
        let listeners = match state {
            None => {
                let listeners = Listeners::bind(&self.config, &mut held)?;
                self.guests.restore(held.take_streams(), start).await?;
                self.handoffs.adopt(held.take_handoffs());
                listeners
            }
            Some(state) => self.thaw(state, start).await?,
        };
        drop(held);
        crate::keeper::reconciled();
        // Once this process holds the lock: a daemon refused at start-up must not touch the file.
        transfer::continue_counters(&self.metrics, carried, &self.counters_file);
        Ok(listeners)
    }

    /// Serves period after period (an upgrade or takeover that fails starts the next one on
    /// the same listeners) until a stop signal or a successor that took everything.
    async fn serve(
        &self,
        mut listeners: Listeners,
        image: &Image,
        options: RunOptions,
        mut took_over: bool,
    ) -> Result<(), StartError> {
        let (upgrades, mut requests) = trigger::channel();
        let mut signals = Signals::new();
        // These signals have been blocked since the first instruction of `main` (or across the
        // exec of an upgrade); the handlers exist now, so take what is pending: it is acted on
        // as soon as the loop below serves.
        upgrade::exec::unblock_signals();
        loop {
            let mut serving =
                Serving::start(self, &listeners, upgrades.clone()).map_err(StartError::Listen)?;
            self.announce_ready(&serving, std::mem::take(&mut took_over))
                .await;
            let successor = match self
                .next_event(&mut serving, &mut signals, &mut requests, image)
                .await
            {
                Event::Stop(signal) => return self.shut_down(serving, signal).await,
                Event::HandOver(successor) => successor,
            };
            listeners = match self.hand_over(serving, listeners, successor).await? {
                Handed::Back(listeners) => listeners,
                Handed::Over => return self.leave(&mut signals, options).await,
            };
        }
    }

    async fn announce_ready(&self, serving: &Serving, took_over: bool) {
        // Before the ready line: whoever saw it finds the pid file naming this process.
        if let Err(e) = write_pid_file(self.config.runtime_dir()) {
            tracing::warn!(error = %e, "cannot write conlogd.pid");
        }
        let security = &self.security;
        tracing::info!(
            socket = %self.config.runtime_dir().join("conlogd.sock").display(),
            tcp = %serving.tcp_address,
            tls = %security.tls.as_ref().map_or("off", |t| if t.mutual() { "mutual" } else { "on" }),
            metrics = %serving.metrics_address.map_or("off".into(), |a| a.to_string()),
            health = %serving.health_address.map_or("off".into(), |a| a.to_string()),
            restored_streams = self.guests.count().await,
            pid = std::process::id(),
            "conlogd ready"
        );
        if took_over {
            tracing::info!("took over from the previous daemon");
        }
        notify_systemd("READY=1");
    }

    /// Waits for what ends this period: a stop signal, an upgrade whose binary passed its
    /// preflight, or a successor that is still quiet after its hello. SIGHUP, refused upgrades
    /// and bad successors are dealt with here and serving goes on.
    async fn next_event<'a>(
        &self,
        serving: &mut Serving,
        signals: &mut Signals,
        requests: &mut Requests,
        image: &'a Image,
    ) -> Event<'a> {
        /// What woke the loop.
        enum Wake {
            Stop(&'static str),
            Reload,
            Upgrade(Option<Request>),
            Successor(UnixStream),
        }
        loop {
            let wake = tokio::select! {
                // In this order when several are pending (signals that arrived during start-up
                // are all delivered at once): a reload asked for before an upgrade happens first.
                biased;
                _ = signals.term.recv() => Wake::Stop("SIGTERM"),
                _ = signals.int.recv() => Wake::Stop("SIGINT"),
                _ = signals.hup.recv() => Wake::Reload,
                _ = signals.usr1.recv() => Wake::Upgrade(None),
                Some(request) = requests.recv() => Wake::Upgrade(Some(request)),
                Some(connection) = serving.successors.recv() => Wake::Successor(connection),
            };
            match wake {
                Wake::Stop(signal) => return Event::Stop(signal),
                Wake::Reload => self.security.reload(),
                Wake::Upgrade(request) => {
                    if self.preflight(image, request).await {
                        return Event::HandOver(Successor::Exec(image));
                    }
                }
                Wake::Successor(connection) => match handover::check_quiet(&connection).await {
                    Ok(()) => return Event::HandOver(Successor::Process(connection)),
                    Err(e) => {
                        let peer_pid = connection.peer_cred().ok().and_then(|c| c.pid());
                        crate::limited!(warn, peer_pid, error = %e, "ignoring a bad takeover request");
                    }
                },
            }
        }
    }

    /// Runs the new binary's preflight and answers whoever asked (`Agent.Upgrade`): true if
    /// the upgrade goes ahead.
    async fn preflight(&self, image: &Image, request: Option<Request>) -> bool {
        let outcome = upgrade::exec::preflight(image).await;
        if let Err(why) = &outcome {
            // Each refusal costs the caller a run of the binary, but a local caller may repeat.
            crate::limited!(error, error = %why, "upgrade refused; serving on");
            self.count_failure();
        }
        let ahead = outcome.is_ok();
        if let Some(request) = request {
            request.answer(outcome.map(|()| std::process::id()));
        }
        ahead
    }

    /// SIGTERM/SIGINT: ends every stream and call, removes the sockets and saves the final
    /// counters.
    async fn shut_down(&self, serving: Serving, signal: &'static str) -> Result<(), StartError> {
        notify_systemd("STOPPING=1");
        tracing::info!(signal, "shutting down");
        serving.stop(&self.guests).await;
        crate::keeper::shutdown().await;
        for name in ["conlogd.sock", "fd.sock", "handover.sock"] {
            let _ = fs::remove_file(self.config.runtime_dir().join(name));
        }
        remove_pid_file(self.config.runtime_dir());
        // Every stream has stopped: these values are final, so the next start continues from
        // them exactly.
        let counters = self.metrics.counters();
        let saved = Saved {
            at_stop: Some(counters),
            ..Saved::running(&counters)
        };
        if let Err(e) = saved.save(&self.counters_file) {
            tracing::warn!(error = %e, "cannot save the counters; the next start counts from 0");
        }
        tracing::info!("every log flushed; bye");
        Ok(())
    }

    /// After a successor took everything: the keeper lets go, and this process exits (or
    /// idles until SIGTERM with `--linger-after-handover`).
    async fn leave(&self, signals: &mut Signals, options: RunOptions) -> Result<(), StartError> {
        crate::keeper::detach().await;
        if options.linger_after_handover {
            tracing::info!("handed over to the successor; idle until SIGTERM");
            signals.stop().await;
        }
        tracing::info!("handed over to the successor; bye");
        Ok(())
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

/// The file that names the serving daemon's pid (`<runtime_dir>/conlogd.pid`), for signals
/// from scripts: `kill -HUP "$(cat /run/conlog/conlogd.pid)"` reaches this daemon and not
/// every `conlogd` on the host (keepers, a lingering predecessor, other instances).
const PID_FILE: &str = "conlogd.pid";

/// Writes the pid file whenever the daemon starts serving (a start, after an upgrade, after a
/// takeover, which replaces the predecessor's): written aside and renamed, so a reader never
/// sees a partial number.
fn write_pid_file(runtime_dir: &Path) -> std::io::Result<()> {
    let pid = std::process::id();
    let aside = runtime_dir.join(format!("{PID_FILE}.{pid}.tmp"));
    fs::write(&aside, format!("{pid}\n"))?;
    fs::rename(&aside, runtime_dir.join(PID_FILE)).inspect_err(|_| {
        let _ = fs::remove_file(&aside);
    })
}

/// At a clean stop: removes the pid file if it still names this process (a successor that
/// took over has written its own).
fn remove_pid_file(runtime_dir: &Path) {
    let path = runtime_dir.join(PID_FILE);
    let ours =
        fs::read_to_string(&path).is_ok_and(|text| text.trim() == std::process::id().to_string());
    if ours {
        let _ = fs::remove_file(path);
    }
}
