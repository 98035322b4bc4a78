//! The gateway's configuration: the `gateway:` section of `conlog-gateway --config FILE`
//! (docs/gateway.md, "Configuration"; every key in docs/operations.md).
//!
//! Owns the schema, its defaults and the validation of every value. It never opens the files
//! it names; [`super::run`] does.

use crate::config::{
    ByteSize, ConfigError, HumanDuration, Limits, LogFormat, TlsConfig, WebConfig,
};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file: one `gateway:` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub gateway: GatewayConfig,
}

/// The gateway's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where clients reach the Console service (gRPC, gRPC-web and `/console/`), over TLS.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Plaintext gRPC listener serving only `grpc.health.v1.Health` (for the kubelet's
    /// probes, which cannot speak TLS); `null` disables it.
    #[serde(default)]
    pub health: Option<SocketAddr>,
    /// The public certificate (always TLS); `client_ca` here would make clients present one.
    pub tls: TlsConfig,
    /// How the gateway calls nodes: mutual TLS.
    pub upstream: UpstreamConfig,
    /// The cluster key (64 hex digits) every node's token key is derived from.
    pub cluster_key: PathBuf,
    /// What one caller, and all together, may hold.
    #[serde(default)]
    pub limits: GatewayLimits,
    /// Read-only watchers of one console sharing one upstream stream (docs/gateway.md,
    /// "Fan-out").
    #[serde(default)]
    pub fanout: FanoutConfig,
    /// Other origins allowed to call with gRPC-web.
    #[serde(default)]
    pub web: WebConfig,
    /// `plain` or `json` diagnostics on stderr.
    #[serde(default = "default_log_format")]
    pub log_format: LogFormat,
    /// Diagnostics filter (overridden by `RUST_LOG`).
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

/// Mutual TLS towards the nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// CA bundle that signed the nodes' server certificates (which must name the node's
    /// `node.advertise` host).
    pub ca: PathBuf,
    /// The gateway's client certificate chain (nodes with `console.require_gateway` demand it).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// How long connecting to a node may take before a call gets `UNAVAILABLE` naming it.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// HTTP/2 receive window of each stream, both towards the client and towards the node:
    /// what the gateway holds of one stream in each direction at most (docs/gateway.md,
    /// "Backpressure").
    #[serde(default = "default_stream_window")]
    pub stream_window: ByteSize,
    /// Calls in progress from this replica to one node. The node connection's HTTP/2 window
    /// is this many stream windows, so streams that stop reading can never take the window
    /// of the others (docs/gateway.md, "Forwarding and backpressure").
    #[serde(default = "default_calls_per_node")]
    pub calls_per_node: u32,
}

/// The gateway's limits; hitting one is `RESOURCE_EXHAUSTED` naming it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayLimits {
    /// TCP connections open at once (TLS handshakes included).
    pub tcp_connections: u32,
    /// TCP connections open at once from one peer address.
    pub connections_per_peer: u32,
    /// Calls in progress on one connection.
    pub calls_per_connection: u32,
    /// Calls in progress together.
    pub calls_total: u32,
    /// Calls in progress from one peer address.
    pub calls_per_peer: u32,
    /// Calls in progress with tokens of one guest (of one node).
    pub calls_per_guest: u32,
    /// A connection with no call in progress is closed after this long.
    pub idle_timeout: HumanDuration,
    /// Longest an HTTP/1.1 gRPC-web request body (or a unary one) may take to arrive.
    pub body_timeout: HumanDuration,
    /// HTTP/1.1 gRPC-web request bodies held at once, all connections together.
    pub web_body_bytes: ByteSize,
    /// Largest gRPC-web request message accepted over HTTP/1.1 (native gRPC messages are
    /// forwarded as they come; the node enforces its own `limits.message_size`).
    pub message_size: ByteSize,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        let node = Limits::default();
        Self {
            tcp_connections: 4096,
            connections_per_peer: node.connections_per_peer,
            calls_per_connection: node.calls_per_connection,
            calls_total: 4096,
            calls_per_peer: node.calls_per_peer,
            calls_per_guest: node.calls_per_guest,
            idle_timeout: node.idle_timeout,
            body_timeout: node.body_timeout,
            web_body_bytes: node.web_body_bytes,
            message_size: node.message_size,
        }
    }
}

/// Fan-out of read-only watchers (docs/gateway.md, "Fan-out").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FanoutConfig {
    /// Read-only `WatchConsole` and `AttachConsole` calls share one upstream stream per
    /// console; `false` forwards each call on its own, like every other call.
    pub enabled: bool,
    /// Shared upstream streams open at once on this replica.
    pub streams: u32,
    /// Watchers of one shared stream.
    pub watchers_per_stream: u32,
    /// Recent output each shared stream keeps for late watchers' `replay_bytes` (a longer
    /// replay gets these bytes; `attached.offset` says where they start).
    pub replay_bytes: ByteSize,
    /// Output queued for one watcher that does not read, before it is skipped ahead and told
    /// the gap (`lagged`), as `consoles.client_queue` on a node (at least 128 KiB: two of a
    /// node's output chunks).
    pub watcher_queue: ByteSize,
    /// How long a shared stream stays open after its last watcher left.
    pub linger: HumanDuration,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            streams: 1024,
            watchers_per_stream: 1024,
            replay_bytes: ByteSize(256 << 10),
            watcher_queue: ByteSize(1 << 20),
            linger: HumanDuration(Duration::from_secs(5)),
        }
    }
}

impl GatewayLimits {
    /// The same limits in the node's terms, for the layers the gateway shares with a node.
    pub(crate) fn as_node_limits(&self) -> Limits {
        Limits {
            tcp_connections: self.tcp_connections,
            connections_per_peer: self.connections_per_peer,
            calls_per_connection: self.calls_per_connection,
            remote_calls_total: self.calls_total,
            calls_per_peer: self.calls_per_peer,
            calls_per_guest: self.calls_per_guest,
            idle_timeout: self.idle_timeout,
            body_timeout: self.body_timeout,
            web_body_bytes: self.web_body_bytes,
            message_size: self.message_size,
            ..Limits::default()
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7780))
}
fn default_log_format() -> LogFormat {
    LogFormat::Plain
}
fn default_log_level() -> String {
    "info".into()
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(3))
}
fn default_stream_window() -> ByteSize {
    ByteSize(1 << 20)
}

fn default_calls_per_node() -> u32 {
    256
}

/// HTTP/2's largest flow-control window (RFC 9113, 6.9.1).
pub(crate) const MAX_HTTP2_WINDOW: u64 = (1 << 31) - 1;

fn refuse<T>(key: &'static str, message: String) -> Result<T, ConfigError> {
    Err(ConfigError::Value { key, message })
}

impl GatewayConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: GatewayFile = serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse {
            origin: path.display().to_string(),
            message: e.to_string(),
        })?;
        file.gateway.validate()?;
        Ok(file.gateway)
    }

    /// The effective configuration as YAML (`--print-config`): every key, defaults filled in.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(&GatewayFile {
            gateway: self.clone(),
        })
        .expect("the config serializes")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self
            .health
            .is_some_and(|h| h == self.listen && h.port() != 0)
        {
            return refuse(
                "gateway.health",
                format!("must differ from gateway.listen ({})", self.listen),
            );
        }
        self.tls.validate()?;
        for (key, path) in [
            ("gateway.upstream.ca", &self.upstream.ca),
            ("gateway.upstream.cert", &self.upstream.cert),
            ("gateway.upstream.key", &self.upstream.key),
            ("gateway.cluster_key", &self.cluster_key),
        ] {
            if !path.is_absolute() {
                return refuse(
                    key,
                    format!("must be an absolute path (got {})", path.display()),
                );
            }
        }
        let timeout = self.upstream.connect_timeout;
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&timeout.get()) {
            return refuse(
                "gateway.upstream.connect_timeout",
                format!("must be between 100ms and 60s (got {timeout})"),
            );
        }
        let window = self.upstream.stream_window;
        if !((16 << 10)..=(16 << 20)).contains(&window.bytes()) {
            return refuse(
                "gateway.upstream.stream_window",
                format!("must be between 16KiB and 16MiB (got {window})"),
            );
        }
        let calls = self.upstream.calls_per_node;
        if calls == 0 {
            return refuse(
                "gateway.upstream.calls_per_node",
                "must be at least 1".into(),
            );
        }
        if u64::from(calls) * window.bytes() > MAX_HTTP2_WINDOW {
            return refuse(
                "gateway.upstream.calls_per_node",
                format!(
                    "times gateway.upstream.stream_window must be at most 2GiB - 1, HTTP/2's \
                     largest window (got {calls} x {window})"
                ),
            );
        }
        let l = &self.limits;
        for (key, limit) in [
            ("gateway.limits.tcp_connections", l.tcp_connections),
            (
                "gateway.limits.connections_per_peer",
                l.connections_per_peer,
            ),
            (
                "gateway.limits.calls_per_connection",
                l.calls_per_connection,
            ),
            ("gateway.limits.calls_total", l.calls_total),
            ("gateway.limits.calls_per_peer", l.calls_per_peer),
            ("gateway.limits.calls_per_guest", l.calls_per_guest),
        ] {
            if limit == 0 {
                return refuse(key, "must be at least 1".into());
            }
        }
        for (key, timeout) in [
            ("gateway.limits.idle_timeout", l.idle_timeout),
            ("gateway.limits.body_timeout", l.body_timeout),
        ] {
            if timeout.get() < Duration::from_secs(1) {
                return refuse(key, format!("must be at least 1s (got {timeout})"));
            }
        }
        crate::config::validate_message_bounds(
            l.message_size,
            l.web_body_bytes,
            [
                "gateway.limits.message_size",
                "gateway.limits.web_body_bytes",
            ],
        )?;
        let f = &self.fanout;
        for (key, limit) in [
            ("gateway.fanout.streams", f.streams),
            ("gateway.fanout.watchers_per_stream", f.watchers_per_stream),
        ] {
            if limit == 0 {
                return refuse(key, "must be at least 1".into());
            }
        }
        if f.replay_bytes.bytes() > (64 << 20) {
            return refuse(
                "gateway.fanout.replay_bytes",
                format!("must be at most 64MiB (got {})", f.replay_bytes),
            );
        }
        // A node sends output in chunks of up to 64 KiB: a queue must hold two.
        if !((128 << 10)..=(64 << 20)).contains(&f.watcher_queue.bytes()) {
            return refuse(
                "gateway.fanout.watcher_queue",
                format!(
                    "must be between 128KiB (two of a node's 64KiB output chunks) and 64MiB (got {})",
                    f.watcher_queue
                ),
            );
        }
        if f.linger.get() > Duration::from_secs(600) {
            return refuse(
                "gateway.fanout.linger",
                format!("must be at most 10m (got {})", f.linger),
            );
        }
        for origin in &self.web.allowed_origins {
            crate::config::Origin::parse(origin).map_err(|message| ConfigError::Value {
                key: "gateway.web.allowed_origins",
                message,
            })?;
        }
        Ok(())
    }
}
