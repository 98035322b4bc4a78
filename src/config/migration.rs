//! The `migration:` section: how this node imports a guest's streams from another node when
//! the guest live-migrates here (docs/operations.md, "Live migration").
//!
//! Owns the keys, their defaults and their validation; it never opens a file or a connection
//! (`crate::migration` reads the certificate files when an import starts).

use super::units::{ByteSize, HumanDuration};
use super::ConfigError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Live migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    /// CA bundle that signs the other nodes' server certificates (their `tls.cert`); unset,
    /// this node imports from nobody (a `migrate_from` is refused).
    pub ca: Option<PathBuf>,
    /// This node's client certificate chain towards the other nodes, for sources whose
    /// `tls.client_ca` demands one (signed by that CA); with `key`.
    pub cert: Option<PathBuf>,
    /// The key of `cert`.
    pub key: Option<PathBuf>,
    /// How long connecting to a source (TCP and TLS) may take.
    pub connect_timeout: HumanDuration,
    /// How long the destination's guest output is held back, once the guest is there, while
    /// the source's stream is not done: past it the import ends and the guest's output is
    /// logged (what the source logs later is not here; history says so).
    pub switchover_timeout: HumanDuration,
    /// HTTP/2 keepalive towards a source: a ping every this long; a source that does not
    /// answer within it is given up (the import ends with a gap).
    pub keepalive: HumanDuration,
    /// The most one import holds in memory: the largest message and the HTTP/2 window of
    /// its stream.
    pub buffer: ByteSize,
    /// Imports running at once; more are refused (`RESOURCE_EXHAUSTED`).
    pub max_imports: u32,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            ca: None,
            cert: None,
            key: None,
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            switchover_timeout: HumanDuration(Duration::from_secs(10)),
            keepalive: HumanDuration(Duration::from_secs(10)),
            buffer: ByteSize(1 << 20),
            max_imports: 16,
        }
    }
}

fn refuse(key: &'static str, message: String) -> Result<(), ConfigError> {
    Err(ConfigError::Value { key, message })
}

impl MigrationConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for (key, path) in [
            ("migration.ca", &self.ca),
            ("migration.cert", &self.cert),
            ("migration.key", &self.key),
        ] {
            if let Some(path) = path {
                if !path.is_absolute() {
                    return refuse(
                        key,
                        format!("must be an absolute path (got {})", path.display()),
                    );
                }
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return refuse(
                "migration.cert",
                "migration.cert and migration.key go together (the client certificate and its \
                 key)"
                    .into(),
            );
        }
        let seconds = |d: &HumanDuration| d.get();
        for (key, value, max) in [
            ("migration.connect_timeout", &self.connect_timeout, 300),
            (
                "migration.switchover_timeout",
                &self.switchover_timeout,
                600,
            ),
            ("migration.keepalive", &self.keepalive, 600),
        ] {
            if seconds(value).is_zero() || seconds(value) > Duration::from_secs(max) {
                return refuse(key, format!("must be between 1ms and {max}s (got {value})"));
            }
        }
        if !((64 << 10)..=(64 << 20)).contains(&self.buffer.bytes()) {
            return refuse(
                "migration.buffer",
                format!("must be between 64KiB and 64MiB (got {})", self.buffer),
            );
        }
        if !(1..=1024).contains(&self.max_imports) {
            return refuse(
                "migration.max_imports",
                format!("must be between 1 and 1024 (got {})", self.max_imports),
            );
        }
        Ok(())
    }
}
