//! `conlog-gateway`: one Console endpoint for a fleet (docs/gateway.md).
//!
//! Owns the assembly of the gateway: it loads the cluster key, the public TLS certificate and
//! the upstream client certificate, and serves the `conlog.v1.Console` service on TCP exactly
//! as a node's listener does (the same layers from [`crate::server`]: page, gRPC-web, call
//! limits, connection admission, idle deadlines, request body bounds), with [`forward`] in
//! place of the node's handlers. It serves nothing of the Agent API and keeps no state beyond
//! its open calls, so replicas share nothing. It decodes no Console message but the first of a
//! watch ([`fanout`]) and, to follow a guest to another node, the offsets of a call's messages
//! ([`migrate`]).
//!
//! Modules: [`config`] (the `gateway:` section), [`upstream`] (channels to the nodes),
//! [`forward`] (one call, token to node), [`fanout`] (read-only watchers sharing one stream),
//! [`migrate`] (a call following its guest to another node).

pub mod config;
mod fanout;
mod forward;
mod migrate;
mod upstream;

use crate::server::{bodies::InputBounded, Protection};
use crate::tls::Tls;
use crate::tokens::ClusterKey;
use config::GatewayConfig;
use std::sync::Arc;
use thiserror::Error;
use tracing::Instrument;

/// What the gateway can fail at; a call's failures reach its caller as
/// [`crate::error::Error::Unavailable`] with this message.
#[derive(Debug, Error)]
pub enum GatewayError {
    /// The node a token names cannot be reached (refused, timed out, a TLS failure).
    #[error("Node {node} is unavailable: {reason}")]
    NodeUnavailable { node: String, reason: String },
    /// A node's stream broke in the middle of a call.
    #[error("Node {node} ended the stream: {reason}; resume by offset")]
    StreamBroken { node: String, reason: String },
    /// A file named in the config cannot be read.
    #[error("Cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("Cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("Serving failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs the gateway until SIGTERM or SIGINT; SIGHUP reloads the public certificate.
pub async fn run(config: GatewayConfig) -> Result<(), GatewayError> {
    let keys =
        Arc::new(
            ClusterKey::load(&config.cluster_key).map_err(|source| GatewayError::File {
                what: "gateway.cluster_key",
                path: config.cluster_key.display().to_string(),
                source,
            })?,
        );
    let tls = Arc::new(Tls::load(&config.tls)?);
    let upstreams = Arc::new(upstream::Upstreams::new(&config.upstream)?);
    let limits = config.limits.as_node_limits();
    let protection = Protection::for_gateway(&limits, keys.clone()).with_web(&config.web);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| GatewayError::Listen {
            address: config.listen,
            source,
        })?;
    let address = listener
        .local_addr()
        .map_err(|source| GatewayError::Listen {
            address: config.listen,
            source,
        })?;
    tokio::spawn(watch_key(keys.clone()));
    let console = InputBounded::remote(
        forward::Forward::new(keys, upstreams, &config.fanout),
        limits.body_timeout.get(),
        protection.keys.body_timeout,
    );
    let window = u32::try_from(config.upstream.stream_window.bytes()).unwrap_or(u32::MAX);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let when_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let health = match config.health {
        None => None,
        Some(at) => {
            let listener =
                tokio::net::TcpListener::bind(at)
                    .await
                    .map_err(|source| GatewayError::Listen {
                        address: at,
                        source,
                    })?;
            let bound = listener.local_addr().ok();
            let serving = crate::server::serve_health(
                listener,
                protection.clone(),
                limits.max_tcp_connections(),
                when_stopped(),
            );
            tokio::spawn(serving.instrument(tracing::info_span!("health")));
            bound
        }
    };
    tokio::spawn(signals(tls.clone(), stop));
    match health {
        Some(health) => tracing::info!(tcp = %address, %health, "conlog-gateway ready"),
        None => tracing::info!(tcp = %address, "conlog-gateway ready"),
    }
    crate::server::serve_console_tcp(
        listener,
        console,
        Some(tls),
        Some(window),
        protection,
        when_stopped(),
    )
    .instrument(tracing::info_span!("gateway"))
    .await?;
    tracing::info!("conlog-gateway stopped");
    Ok(())
}

/// How often the cluster key file is looked at between calls.
const KEY_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Looks at the cluster key file every [`KEY_CHECK_INTERVAL`]: a new key ends the calls in
/// progress whose token it no longer verifies ([`forward`]).
async fn watch_key(keys: Arc<ClusterKey>) {
    let mut every = tokio::time::interval(KEY_CHECK_INTERVAL);
    loop {
        every.tick().await;
        keys.check();
    }
}

/// SIGTERM/SIGINT stop the gateway; SIGHUP reloads its public certificate.
async fn signals(tls: Arc<Tls>, stop: tokio::sync::watch::Sender<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the previous certificates"),
            },
        }
    }
    tracing::info!("stopping");
    let _ = stop.send(true);
}
