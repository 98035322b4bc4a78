//! One period of serving: the servers and background tasks started on the listeners, and the
//! two ways such a period ends (a shutdown, or a freeze for an upgrade or a takeover).
//!
//! Owns the tasks it spawns (each in a span naming its listener) and stops them; the listening
//! sockets themselves stay in [`Listeners`], so a period can end and the next begin on the same
//! sockets. Never decides when a period ends: the main loop ([`super::Daemon`]) does.

use super::listeners::{tokio_tcp, tokio_unix, Listeners};
use super::Daemon;
use crate::guests::Guests;
use crate::server::{self, agent::AgentService, console::ConsoleService};
use crate::upgrade::{handover, trigger::Trigger, FrozenDaemon};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// How long gRPC calls may take to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long they may take during an upgrade, while writers wait (only short unary calls are
/// left by then: console clients and followers were ended by the freeze).
const UPGRADE_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The servers of one period of serving.
pub(super) struct Serving {
    /// Tells the gRPC servers to stop accepting and finish their calls.
    stop: watch::Sender<bool>,
    /// The gRPC servers, awaited (bounded) when the period ends.
    grpc: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The other listeners' tasks (fd.sock, /metrics, handover.sock), aborted when it ends.
    tasks: Vec<JoinHandle<()>>,
    /// Successors on `handover.sock` whose hello was exact.
    pub(super) successors: mpsc::Receiver<UnixStream>,
    pub(super) tcp_address: SocketAddr,
    pub(super) metrics_address: Option<SocketAddr>,
    pub(super) health_address: Option<SocketAddr>,
}

/// The span of the task serving `listener`: every event inside names it.
fn span(listener: &'static str) -> tracing::Span {
    tracing::info_span!("serve", listener)
}

impl Serving {
    pub(super) fn start(
        daemon: &Daemon,
        listeners: &Listeners,
        upgrades: Trigger,
    ) -> io::Result<Self> {
        let Daemon {
            config,
            security,
            metrics,
            guests,
            handoffs,
            ..
        } = daemon;
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
            importer: Arc::new(crate::migration::import::Importer::new(&config.migration)),
        };
        // Imports under way when the daemon last stopped continue.
        agent.importer.resume(guests);
        // Tokens of the nodes guests migrated from are checked there.
        security.protection.remote_calls.set_foreign(Arc::new(
            crate::migration::tokens::ForeignTokens::new(agent.importer.clone()),
        ));
        let console = ConsoleService::new(
            guests.clone(),
            config.history.chunk_size.bytes_usize(),
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
        let advertise = config.node.advertise_for(tcp_address);
        tracing::info!(%advertise, require_gateway = config.console.require_gateway, "node claim of the tokens issued here");
        security
            .tokens
            .set_node(advertise, config.console.require_gateway);
        let mut grpc = vec![
            tokio::spawn(
                server::serve_local(
                    tokio_unix(&listeners.local)?,
                    agent,
                    console.clone(),
                    security.protection.clone(),
                    stopped(),
                )
                .instrument(span("conlogd.sock")),
            ),
            tokio::spawn(
                server::serve_tcp(
                    tcp,
                    console,
                    security.tls.clone(),
                    security.tokens.clone(),
                    security.protection.clone(),
                    stopped(),
                )
                .instrument(span("tcp")),
            ),
        ];
        let mut health_address = None;
        if let Some(listener) = &listeners.health {
            let listener = tokio_tcp(listener)?;
            health_address = listener.local_addr().ok();
            grpc.push(tokio::spawn(
                server::serve_health(
                    listener,
                    security.protection.clone(),
                    config.limits.max_tcp_connections(),
                    stopped(),
                )
                .instrument(span("health")),
            ));
        }
        let mut tasks = vec![tokio::spawn(
            handoffs
                .clone()
                .serve(
                    tokio_unix(&listeners.fd_sock)?,
                    config.handoff.read_timeout.get(),
                )
                .instrument(span("fd.sock")),
        )];
        let mut metrics_address = None;
        if let Some(listener) = &listeners.metrics {
            let listener = tokio_tcp(listener)?;
            metrics_address = listener.local_addr().ok();
            let mut registry = metrics.registry();
            registry.register_collector(Box::new(security.protection.figures()));
            tasks.push(tokio::spawn(
                crate::metrics::serve(listener, Arc::new(registry)).instrument(span("metrics")),
            ));
        }
        tasks.push(tokio::spawn(
            crate::retention::run(
                guests.clone(),
                config.log_dir().to_owned(),
                config.logs.max_age.get(),
                config.logs.removed_retention.get(),
            )
            .instrument(span("retention")),
        ));
        let (successor_tx, successors) = mpsc::channel(1);
        tasks.push(tokio::spawn(
            handover::accept(tokio_unix(&listeners.handover)?, successor_tx)
                .instrument(span("handover.sock")),
        ));
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
    pub(super) async fn stop(mut self, guests: &Guests) {
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

    /// Upgrade or takeover: freezes every stream (clients are told to come back), drains the
    /// servers and collects everything to carry, the counters with this upgrade counted.
    pub(super) async fn freeze(mut self, listeners: Listeners, daemon: &Daemon) -> FrozenDaemon {
        let Daemon {
            guests,
            handoffs,
            gate,
            metrics,
            ..
        } = daemon;
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
        let handoffs = handoffs.freeze();
        crate::fault::point("upgrade.frozen");
        // Every stream is frozen: no counter moves any more.
        let mut counters = metrics.counters();
        counters.upgrades += 1;
        FrozenDaemon {
            listeners: listeners.freeze(),
            streams,
            handoffs,
            counters: Some(counters),
        }
    }
}

/// The signals the daemon acts on.
pub(super) struct Signals {
    pub(super) term: Signal,
    pub(super) int: Signal,
    pub(super) usr1: Signal,
    pub(super) hup: Signal,
}

impl Signals {
    pub(super) fn new() -> Self {
        let install = |kind| signal(kind).expect("signal handlers install");
        Self {
            term: install(SignalKind::terminate()),
            int: install(SignalKind::interrupt()),
            usr1: install(SignalKind::user_defined1()),
            hup: install(SignalKind::hangup()),
        }
    }

    /// SIGTERM or SIGINT.
    pub(super) async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
