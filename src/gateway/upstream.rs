//! Connections to the nodes: one HTTP/2 channel per node over mutual TLS, made on first use.
//!
//! Owns the table of channels (keyed by the node claim of verified tokens, so only nodes the
//! cluster key vouches for ever get an entry) and how each is made: the gateway's client
//! certificate, the nodes' CA, the connect timeout, the per-stream HTTP/2 window that
//! bounds what the gateway holds of a stream towards the node, the connection window (one
//! stream window for each call the node may carry, `gateway.upstream.calls_per_node`, so that
//! no set of stalled streams can take the window of the others), the count of calls in
//! progress per node, the largest frame it accepts and the read buffer beneath TLS
//! (docs/gateway.md, "Forwarding and backpressure"). It never reads a token and never decides
//! who may call.

use super::config::{UpstreamConfig, MAX_HTTP2_WINDOW};
use super::GatewayError;
use crate::server::tally::{Place, Tally};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tower::ServiceExt;

/// Most nodes kept in the table; a call to a node beyond it gets a channel of its own (its
/// connection ends with the call). Verified claims name real nodes only, so this bounds a
/// fleet, not an attacker.
const MAX_NODES: usize = 16_384;

/// Largest HTTP/2 DATA frame the gateway accepts from a node: a node sends each history
/// chunk (`history.chunk_size`, 64 KiB) as one frame, not four of HTTP/2's default 16 KiB,
/// so the gateway handles a quarter as many frames (and the node writes a quarter as often).
/// Within the stream window: never more is held.
const MAX_FRAME: u32 = 256 << 10;

/// The read buffer beneath the TLS session to a node (one per node connection).
const READ_BUFFER: usize = 64 << 10;

/// The channels to the nodes.
pub(crate) struct Upstreams {
    tls: ClientTlsConfig,
    connect_timeout: Duration,
    window: u32,
    /// The window of a node connection: `window` for each call it may carry.
    connection_window: u32,
    /// Calls in progress per node (`gateway.upstream.calls_per_node`).
    calls: std::sync::Arc<Tally<String>>,
    /// Channels by node endpoint (`host:port`). A std mutex held to look up or insert, never
    /// across an `.await` (channels connect lazily, on their first call).
    channels: Mutex<HashMap<String, Channel>>,
}

fn read(what: &'static str, path: &std::path::Path) -> Result<String, GatewayError> {
    std::fs::read_to_string(path).map_err(|source| GatewayError::File {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl Upstreams {
    /// Reads the certificate files of `config`.
    pub(crate) fn new(config: &UpstreamConfig) -> Result<Self, GatewayError> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(
                "gateway.upstream.ca",
                &config.ca,
            )?))
            .identity(Identity::from_pem(
                read("gateway.upstream.cert", &config.cert)?,
                read("gateway.upstream.key", &config.key)?,
            ));
        let window = u32::try_from(config.stream_window.bytes()).unwrap_or(u32::MAX);
        // Validated: calls_per_node x stream_window fits HTTP/2's largest window.
        let connection_window = u64::from(config.calls_per_node) * u64::from(window);
        let connection_window = u32::try_from(connection_window.min(MAX_HTTP2_WINDOW))
            .expect("within HTTP/2's largest window");
        Ok(Self {
            tls,
            connect_timeout: config.connect_timeout.get(),
            window,
            connection_window,
            calls: Tally::new(config.calls_per_node),
            channels: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more call to `node`, held until the call ends; `None` when the node
    /// carries `gateway.upstream.calls_per_node` calls from this replica already.
    pub(crate) fn place(&self, node: &str) -> Option<Place<String>> {
        self.calls.take(node.to_owned())
    }

    /// Most calls in progress to one node (`gateway.upstream.calls_per_node`).
    pub(crate) fn calls_per_node(&self) -> u32 {
        self.calls.limit()
    }

    /// The channel to `node` (`host:port`, from a verified token).
    pub(crate) fn channel(&self, node: &str) -> Result<Channel, GatewayError> {
        if let Some(channel) = self.channels.lock().expect("channels poisoned").get(node) {
            return Ok(channel.clone());
        }
        let unusable = |e: &dyn std::fmt::Display| GatewayError::NodeUnavailable {
            node: node.to_owned(),
            reason: format!("its endpoint is not usable: {e}"),
        };
        // The connect timeout covers the TLS handshake too (tonic applies it around the whole
        // connector only for a connector given this way): a node whose process is gone but
        // whose listener is still held (by its keeper, during a restart) accepts TCP and
        // never answers the handshake.
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        // TLS reads the socket 4 KiB at a time; a read buffer beneath it takes the node's
        // records in reads of up to READ_BUFFER (docs/gateway.md, "Forwarding and
        // backpressure").
        let tcp = tcp.map_response(|io| {
            TokioIo::new(tokio::io::BufReader::with_capacity(
                READ_BUFFER,
                io.into_inner(),
            ))
        });
        let channel = Endpoint::from_shared(format!("https://{node}"))
            .map_err(|e| unusable(&e))?
            .connect_timeout(self.connect_timeout)
            .initial_stream_window_size(self.window)
            // As many stream windows as the connection may carry calls: a stream holds at
            // most its own window, so streams whose clients stopped reading never exhaust
            // the connection's and stall the others (docs/gateway.md).
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(MAX_FRAME)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .tls_config(self.tls.clone())
            .map_err(|e| unusable(&e))?
            .connect_with_connector_lazy(tcp);
        let mut channels = self.channels.lock().expect("channels poisoned");
        if channels.len() < MAX_NODES {
            // Another call may have made one meanwhile: keep the first, so calls share it.
            return Ok(channels.entry(node.to_owned()).or_insert(channel).clone());
        }
        Ok(channel)
    }
}
