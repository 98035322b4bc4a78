//! The security part of the schema: node protection limits, TLS files and token lifetimes
//! (design section 4), with their validation. Nothing here reads the files it names.

use super::{ByteSize, ConfigError, HumanDuration};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

fn refuse<T>(key: &'static str, message: String) -> Result<T, ConfigError> {
    Err(ConfigError::Value { key, message })
}

/// The largest HTTP/1.1 gRPC-web request body of one message of `message_size` bytes: the
/// message as base64 (gRPC-web-text) and 64 KiB of framing.
pub(crate) fn largest_web_body(message_size: u64) -> u64 {
    message_size.saturating_mul(4) / 3 + (64 << 10)
}

/// The rules a node's `limits` and a gateway's `gateway.limits` share: a `message_size`
/// between 4 KiB and 64 MiB, and a `web_body_bytes` that holds one request body of that
/// message ([`largest_web_body`]). `keys` names the two settings, in that order.
pub(crate) fn validate_message_bounds(
    message_size: ByteSize,
    web_body_bytes: ByteSize,
    [size_key, bytes_key]: [&'static str; 2],
) -> Result<(), ConfigError> {
    if !(4096..=(64 << 20)).contains(&message_size.bytes()) {
        return refuse(
            size_key,
            format!("must be between 4KiB and 64MiB (got {message_size})"),
        );
    }
    let largest_body = largest_web_body(message_size.bytes());
    if web_body_bytes.bytes() < largest_body {
        return refuse(
            bytes_key,
            format!(
                "must hold one request of {size_key} as base64, at least {largest_body}B (got {web_body_bytes})"
            ),
        );
    }
    Ok(())
}

/// Limits that protect the node. Hitting one is `RESOURCE_EXHAUSTED` naming it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Guests one daemon serves.
    pub guests: u32,
    /// Streams (pipes and consoles) per guest.
    pub streams_per_guest: u32,
    /// Hand-off tokens that may be outstanding at once.
    pub pending_handoffs: u32,
    /// Clients attached to one console at once.
    pub clients_per_console: u32,
    /// TCP connections open at once (TLS handshakes included); more are closed on accept.
    pub tcp_connections: u32,
    /// TCP connections open at once from one peer address.
    pub connections_per_peer: u32,
    /// gRPC calls in progress on one connection (streams count until they end).
    pub calls_per_connection: u32,
    /// gRPC calls in progress on the local socket together (the agent's own budget: remote
    /// callers never take from it).
    pub calls_total: u32,
    /// gRPC calls in progress on TCP together.
    pub remote_calls_total: u32,
    /// TCP calls in progress from one peer address.
    pub calls_per_peer: u32,
    /// TCP calls in progress with tokens of one guest (whoever holds them, from wherever).
    pub calls_per_guest: u32,
    /// A TCP connection with no call in progress (one that never sent a request, a slow-loris
    /// header, an HTTP/2 connection with no open stream) is closed after this long.
    pub idle_timeout: HumanDuration,
    /// Longest time an HTTP/1.1 gRPC-web request body may take to arrive.
    pub body_timeout: HumanDuration,
    /// HTTP/1.1 gRPC-web request bodies held in memory at once, all connections together
    /// (only after their token was verified).
    pub web_body_bytes: ByteSize,
    /// Console replay held in memory for remote clients at once, all consoles together: a
    /// replay is held until its client has taken it, so this bounds what watchers that never
    /// read can cost. A remote attach gets the replay that fits (its attach reply says where it
    /// starts).
    pub remote_replay_bytes: ByteSize,
    /// Bytes per second one writer may type into a console; faster input is paced, not lost.
    pub input_rate: ByteSize,
    /// Largest gRPC message the daemon accepts.
    pub message_size: ByteSize,
    /// Disk all logs may use together: the sum over streams of `max_size × (1 + max_backups)`
    /// (`max_size` in truncate mode). A stream that would push the sum over it is refused.
    pub total_log_bytes: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            guests: 10_000,
            streams_per_guest: 16,
            pending_handoffs: 1024,
            clients_per_console: 64,
            tcp_connections: 1024,
            connections_per_peer: 64,
            calls_per_connection: 256,
            calls_total: 16_384,
            remote_calls_total: 1024,
            calls_per_peer: 256,
            calls_per_guest: 64,
            idle_timeout: HumanDuration(Duration::from_secs(20)),
            body_timeout: HumanDuration(Duration::from_secs(10)),
            web_body_bytes: ByteSize(16 << 20),
            remote_replay_bytes: ByteSize(16 << 20),
            input_rate: ByteSize(256 << 10),
            message_size: ByteSize(1 << 20),
            // 10,000 guests × two streams × the default 2MiB × (1 + 3 backups).
            total_log_bytes: ByteSize(160 << 30),
        }
    }
}

/// The limits that bound what is held in memory, as the `usize` counts they are compared with.
/// A `u32` always fits a `usize` on the targets conlog runs on; saturating all the same.
impl Limits {
    /// `guests`, as a count.
    pub(crate) fn max_guests(&self) -> usize {
        count(self.guests)
    }

    /// `streams_per_guest`, as a count.
    pub(crate) fn max_streams_per_guest(&self) -> usize {
        count(self.streams_per_guest)
    }

    /// `pending_handoffs`, as a count.
    pub(crate) fn max_pending_handoffs(&self) -> usize {
        count(self.pending_handoffs)
    }

    /// `clients_per_console`, as a count.
    pub(crate) fn max_clients_per_console(&self) -> usize {
        count(self.clients_per_console)
    }

    /// `tcp_connections`, as a count.
    pub(crate) fn max_tcp_connections(&self) -> usize {
        count(self.tcp_connections)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, limit) in [
            ("limits.guests", self.guests),
            ("limits.streams_per_guest", self.streams_per_guest),
            ("limits.pending_handoffs", self.pending_handoffs),
            ("limits.clients_per_console", self.clients_per_console),
            ("limits.tcp_connections", self.tcp_connections),
            ("limits.calls_per_connection", self.calls_per_connection),
            ("limits.calls_total", self.calls_total),
            ("limits.connections_per_peer", self.connections_per_peer),
            ("limits.remote_calls_total", self.remote_calls_total),
            ("limits.calls_per_peer", self.calls_per_peer),
            ("limits.calls_per_guest", self.calls_per_guest),
        ] {
            if limit == 0 {
                return refuse(key, "must be at least 1".into());
            }
        }
        if self.input_rate.bytes() < 64 {
            return refuse(
                "limits.input_rate",
                format!("must be at least 64B (got {})", self.input_rate),
            );
        }
        for (key, timeout) in [
            ("limits.idle_timeout", self.idle_timeout),
            ("limits.body_timeout", self.body_timeout),
        ] {
            if timeout.get() < Duration::from_secs(1) {
                return refuse(key, format!("must be at least 1s (got {timeout})"));
            }
        }
        validate_message_bounds(
            self.message_size,
            self.web_body_bytes,
            ["limits.message_size", "limits.web_body_bytes"],
        )?;
        if self.total_log_bytes.bytes() < super::MIN_MAX_SIZE {
            return refuse(
                "limits.total_log_bytes",
                format!("must be at least 4KiB (got {})", self.total_log_bytes),
            );
        }
        Ok(())
    }
}

/// TLS of the TCP listener. Files are PEM; they are read at start and again on SIGHUP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA bundle: when set, clients must present a certificate it signed (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// How long a TLS handshake may take before the connection is dropped.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: HumanDuration,
}

fn default_handshake_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

impl TlsConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let files = [
            ("tls.cert", Some(&self.cert)),
            ("tls.key", Some(&self.key)),
            ("tls.client_ca", self.client_ca.as_ref()),
        ];
        for (key, path) in files {
            if let Some(path) = path {
                if !path.is_absolute() {
                    return refuse(
                        key,
                        format!("must be an absolute path (got {})", path.display()),
                    );
                }
            }
        }
        if self.handshake_timeout.get().is_zero() {
            return refuse("tls.handshake_timeout", "must be longer than 0s".into());
        }
        Ok(())
    }
}

/// Console access tokens (`Agent.IssueToken`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Longest lifetime a token may be issued with.
    pub max_ttl: HumanDuration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            max_ttl: HumanDuration(Duration::from_secs(24 * 3600)),
        }
    }
}

impl TokenConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_ttl.get() < Duration::from_secs(1) {
            return refuse("tokens.max_ttl", "must be at least 1s".into());
        }
        Ok(())
    }
}

/// A limit as a count of things in memory.
fn count(limit: u32) -> usize {
    usize::try_from(limit).unwrap_or(usize::MAX)
}
