//! The daemon's configuration: embedded defaults, the YAML file, and command-line overrides.
//!
//! Owns the schema (design section 6), default paths (design section 2) and validation of every
//! value. It never opens sockets or files other than the config file itself; the daemon takes a
//! validated [`Config`] and trusts it.

mod migration;
mod security;
mod units;

pub use migration::MigrationConfig;
pub use security::Limits;
pub(crate) use security::{largest_web_body, validate_message_bounds, TlsConfig, TokenConfig};

pub use units::{ByteSize, HumanDuration};

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Why a configuration could not be used. Each message fits on one line.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("Cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// YAML syntax, an unknown key or a badly formed value, with line and column.
    #[error("Invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    /// A well-formed value outside its allowed range.
    #[error("Invalid config value {key}: {message}")]
    Value { key: &'static str, message: String },
}

/// How a log file is capped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogMode {
    /// `<stream>.log` is renamed to `.log.1` (older ones shift up) when full.
    Rotate,
    /// The single file restarts at zero length when full.
    Truncate,
}

/// Whether a stream's rotated files are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Rotated files stay as they are (and `max_backups` counts them).
    #[default]
    None,
    /// Rotated files are compressed with zstd in the seekable format, and kept by disk bytes.
    Zstd,
}

/// Format of the daemon's own diagnostics on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

impl LogFormat {
    /// Sends the process's own diagnostics to stderr in this format, filtered by `RUST_LOG`, or
    /// else by `level`. Colour codes only for a person at a terminal: journald, files and pipes
    /// get plain text, and `NO_COLOR` (any non-empty value, <https://no-color.org>) turns colour
    /// off everywhere. Shared by `conlogd` and `conlog-gateway`.
    pub fn init_tracing(self, level: &str) {
        use std::io::IsTerminal;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(!no_color && std::io::stderr().is_terminal())
            .with_writer(std::io::stderr);
        match self {
            Self::Plain => builder.init(),
            Self::Json => builder.json().init(),
        }
    }
}

/// What keeps the daemon's descriptors through a crash (`keeper`; docs/operations.md, "Crash
/// guarantees").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeeperMode {
    /// systemd's descriptor store when started by systemd (`$NOTIFY_SOCKET`), else a keeper
    /// process that conlogd starts when none answers on `keeper.sock`.
    #[default]
    Auto,
    /// A keeper process started by someone else (a container of the same pod); conlogd
    /// connects to it and never starts one.
    External,
    /// systemd's descriptor store only.
    Systemd,
    /// Nothing: a crash closes every pipe and console connection.
    Off,
}

/// Default limits of every stream's log; a request may override them per stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogDefaults {
    /// Size at which the current file is rotated or truncated.
    pub max_size: ByteSize,
    /// Rotated files kept (`.log.1` … `.log.N`).
    pub max_backups: u32,
    /// Rotate or truncate.
    pub mode: LogMode,
    /// Keep a time index beside each log file (docs/design.md "Time index"): when each byte
    /// was logged and what happened around it. Off, no index file is written and history has
    /// no times for what is logged meanwhile.
    pub time_index: bool,
    /// Rotated files whose newest byte is older than this are deleted (checked at start and
    /// hourly), and any file of a stream nobody writes any more; `0s`: off, only the size cap
    /// removes files (docs/operations.md, "Retention").
    pub max_age: HumanDuration,
    /// The logs of a removed guest (or stream) are deleted this long after the removal;
    /// `0s`: off, they stay until deleted by hand or by `RemoveGuest` with `delete_logs`.
    pub removed_retention: HumanDuration,
    /// Compress rotated files (`none` or `zstd`; docs/design.md "Compressed backups"):
    /// with `zstd`, `max_size × (max_backups + 1)` is a budget in disk bytes and as many
    /// rotated files are kept as fit.
    pub compress: Compression,
}

impl Default for LogDefaults {
    fn default() -> Self {
        Self {
            max_size: ByteSize(2 << 20),
            max_backups: 3,
            mode: LogMode::Rotate,
            time_index: true,
            max_age: HumanDuration(Duration::ZERO),
            removed_retention: HumanDuration(Duration::ZERO),
            compress: Compression::None,
        }
    }
}

/// The node's compression worker (`logs.compress: zstd` streams).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Worker threads (at `nice 19`), shared by every stream of the node.
    pub threads: usize,
    /// zstd level (1–19).
    pub level: i32,
    /// Raw bytes per independent frame: what a read from any offset decompresses at most
    /// before its first byte (64KiB–1MiB).
    pub frame_size: ByteSize,
    /// Rotated files waiting for the worker at most; past it a file stays raw until the next
    /// start (the cap still holds).
    pub queue: usize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            level: 3,
            frame_size: ByteSize(64 << 10),
            queue: 1024,
        }
    }
}

/// The FD hand-off of log pipes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoffConfig {
    /// How long a hand-off token stays valid.
    pub token_ttl: HumanDuration,
    /// Kernel buffer of each log pipe (F_SETPIPE_SZ); larger buffers absorb bursts.
    pub pipe_buffer: ByteSize,
    /// How long a client of fd.sock may take to send its token line.
    pub read_timeout: HumanDuration,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        Self {
            token_ttl: HumanDuration(Duration::from_secs(30)),
            pipe_buffer: ByteSize(256 << 10),
            read_timeout: HumanDuration(Duration::from_secs(5)),
        }
    }
}

/// Console clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Output queued for one client before it is skipped ahead (and told what it missed).
    pub client_queue: ByteSize,
    /// Most recent output replayed to a client that attaches.
    pub max_replay: ByteSize,
    /// Group (name or number) given the consoles' guest sockets (mode 0660) and their
    /// directories (mode 0750), so that QEMU running as another user in that group can connect
    /// (libvirt's `libvirt-qemu` in `kvm`); `null`: conlogd's own group, as for every other file.
    pub socket_group: Option<String>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            client_queue: ByteSize(1 << 20),
            max_replay: ByteSize(1 << 20),
            socket_group: None,
        }
    }
}

/// History reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Largest chunk of a ReadHistory reply.
    pub chunk_size: ByteSize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            chunk_size: ByteSize(64 << 10),
        }
    }
}

/// The browser side of the TCP listener: the console page (`/console/`) and gRPC-web.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Origins (`https://host[:port]`) of other web pages allowed to call the Console service
    /// with gRPC-web from a browser (CORS). The daemon's own console page, served from the
    /// listener itself, needs no entry; every other origin is refused.
    pub allowed_origins: Vec<String>,
}

/// A web origin: scheme, host and port (the scheme's default port when none is written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// Parses `http://host[:port]` or `https://host[:port]` (what browsers send in `Origin`):
    /// no path, no user, no trailing slash. Host names are compared without case.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let (scheme, rest) = if let Some(rest) = text.strip_prefix("https://") {
            ("https", rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            ("http", rest)
        } else {
            return Err(format!(
                "{text:?} is not an origin: it must start with http:// or https://"
            ));
        };
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', '*']) {
            return Err(format!(
                "{text:?} is not an origin: write scheme://host[:port] only, like \
                 https://console.example.com"
            ));
        }
        Self::with_authority(scheme, rest)
            .ok_or_else(|| format!("{text:?} is not an origin: bad host or port"))
    }

    /// The origin of a request made with `scheme` to `authority` (a `Host` header).
    pub(crate) fn with_authority(scheme: &'static str, authority: &str) -> Option<Self> {
        let authority: http::uri::Authority = authority.parse().ok()?;
        let host = authority.host();
        if host.is_empty() || authority.as_str().contains('@') {
            return None;
        }
        let port = match authority.as_str().get(host.len()..)? {
            "" => {
                if scheme == "https" {
                    443
                } else {
                    80
                }
            }
            written => written.strip_prefix(':')?.parse().ok()?,
        };
        Some(Self {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl WebConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for origin in &self.allowed_origins {
            Origin::parse(origin).map_err(|message| ConfigError::Value {
                key: "web.allowed_origins",
                message,
            })?;
        }
        Ok(())
    }
}

/// This node as a gateway reaches it (docs/gateway.md).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// The Console endpoint (`host:port`) a gateway reaches this node at, named in every token
    /// the node issues (the token's node claim). `null`: the TCP listener's address, or this
    /// host's name and the listener's port when it listens on every address.
    pub advertise: Option<String>,
}

impl NodeConfig {
    /// `node.advertise`, or the default for a TCP listener bound at `listener`.
    pub(crate) fn advertise_for(&self, listener: SocketAddr) -> String {
        if let Some(advertise) = &self.advertise {
            return advertise.clone();
        }
        if listener.ip().is_unspecified() {
            // The host's name (with hostNetwork in Kubernetes, the node's).
            if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
                if !name.trim().is_empty() {
                    return format!("{}:{}", name.trim(), listener.port());
                }
            }
        }
        listener.to_string()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let Some(advertise) = &self.advertise else {
            return Ok(());
        };
        let parsed: Option<http::uri::Authority> = advertise.parse().ok();
        let ok = parsed.is_some_and(|a| {
            a.port_u16().is_some() && !a.host().is_empty() && !a.as_str().contains('@')
        });
        if !ok {
            return Err(ConfigError::Value {
                key: "node.advertise",
                message: format!(
                    "must be host:port, the node's Console endpoint as a gateway reaches it, \
                     like node17.example.com:7770 (got {advertise:?})"
                ),
            });
        }
        Ok(())
    }
}

/// The Console service on TCP.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleServiceConfig {
    /// Remote callers must come through the gateway: they must present a client certificate
    /// signed by `tls.client_ca` (which must then be the CA of the gateway's client
    /// certificates and sign nothing else); the node still verifies every token itself and
    /// also refuses tokens that name another node.
    pub require_gateway: bool,
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// TCP listener for the Console service (gRPC).
    pub listen: SocketAddr,
    /// Prometheus `/metrics` HTTP listener; `null` disables it.
    pub metrics: Option<SocketAddr>,
    /// Plaintext gRPC listener serving only `grpc.health.v1.Health`, for probes that cannot
    /// speak TLS (Kubernetes); `null` disables it. It reveals serving status only, so a
    /// non-loopback address needs neither TLS nor `insecure`.
    pub health: Option<SocketAddr>,
    /// Sockets: conlogd.sock, fd.sock, handover.sock, consoles/.
    pub runtime_dir: Option<PathBuf>,
    /// Persistent state (`state/`) and, unless `log_dir` is set, `logs/`.
    pub data_dir: Option<PathBuf>,
    /// Where `<guest>/<stream>.log` files go.
    pub log_dir: Option<PathBuf>,
    /// Group owning conlogd.sock (name or number); the socket is mode 0660.
    pub socket_group: Option<String>,
    /// Allow plaintext TCP on a non-loopback address.
    pub insecure: bool,
    /// TLS for the TCP listener; `null`: plaintext (loopback only unless `insecure`).
    pub tls: Option<TlsConfig>,
    /// Console access tokens for TCP clients.
    pub tokens: TokenConfig,
    /// `plain` or `json` diagnostics on stderr.
    pub log_format: LogFormat,
    /// Default diagnostics filter (overridden by `RUST_LOG`).
    pub log_level: String,
    /// Default log limits per stream.
    pub logs: LogDefaults,
    /// Log pipe hand-off.
    pub handoff: HandoffConfig,
    /// Console clients.
    pub consoles: ConsoleConfig,
    /// History reads.
    pub history: HistoryConfig,
    /// The compression worker.
    pub compression: CompressionConfig,
    /// Node protection limits.
    pub limits: Limits,
    /// The console page and gRPC-web on the TCP listener.
    pub web: WebConfig,
    /// What holds the descriptors through a crash: `auto`, `external`, `systemd` or `off`.
    pub keeper: KeeperMode,
    /// This node as a gateway reaches it.
    pub node: NodeConfig,
    /// The Console service on TCP.
    pub console: ConsoleServiceConfig,
    /// Importing guests' streams from other nodes (live migration).
    pub migration: MigrationConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7770)),
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], 7771))),
            health: None,
            runtime_dir: None,
            data_dir: None,
            log_dir: None,
            socket_group: None,
            insecure: false,
            tls: None,
            tokens: TokenConfig::default(),
            log_format: LogFormat::Plain,
            log_level: "info".into(),
            logs: LogDefaults::default(),
            handoff: HandoffConfig::default(),
            consoles: ConsoleConfig::default(),
            history: HistoryConfig::default(),
            compression: CompressionConfig::default(),
            limits: Limits::default(),
            web: WebConfig::default(),
            keeper: KeeperMode::default(),
            node: NodeConfig::default(),
            console: ConsoleServiceConfig::default(),
            migration: MigrationConfig::default(),
        }
    }
}

/// Values from the command line that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub runtime_dir: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub log_dir: Option<PathBuf>,
}

/// Smallest `max_size` accepted: one page, so that a file always holds a useful amount.
pub(crate) const MIN_MAX_SIZE: u64 = 4096;
/// Largest `max_size` accepted: a time index slot holds offsets within a file in 40 bits.
pub(crate) const MAX_MAX_SIZE: u64 = 1 << 40;
/// Largest number of backups accepted.
pub(crate) const MAX_BACKUPS: u32 = 1000;
/// Longest `max_age` (and `logs.removed_retention`) accepted, in seconds: ten years.
pub(crate) const MAX_AGE_SECONDS: u64 = 10 * 365 * 86_400;

impl Config {
    /// Parses YAML text; `origin` names it in errors (a file path or "embedded defaults").
    pub(crate) fn from_yaml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text).map_err(|e| {
            let mut message = e.to_string();
            // serde_yaml leaves the position out of its message at line 1 column 1.
            if let (Some(at), false) = (e.location(), message.contains(" at line ")) {
                message.push_str(&format!(" at line {} column {}", at.line(), at.column()));
            }
            ConfigError::Parse {
                origin: origin.to_owned(),
                message,
            }
        })
    }

    /// Loads the file (if any), applies overrides, fills default paths and validates.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::from_yaml(&text, &path.display().to_string())?
            }
            None => Self::default(),
        };
        config.apply(overrides);
        config.resolve_paths();
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, o: Overrides) {
        if let Some(v) = o.listen {
            self.listen = v;
        }
        if let Some(v) = o.metrics {
            self.metrics = Some(v);
        }
        if let Some(v) = o.runtime_dir {
            self.runtime_dir = Some(v);
        }
        if let Some(v) = o.data_dir {
            self.data_dir = Some(v);
        }
        if let Some(v) = o.log_dir {
            self.log_dir = Some(v);
        }
    }

    /// Fills unset directories with design section 2's defaults for this user.
    pub(crate) fn resolve_paths(&mut self) {
        let root = rustix::process::geteuid().is_root();
        let env_dir = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if self.runtime_dir.is_none() {
            self.runtime_dir = Some(if root {
                PathBuf::from("/run/conlog")
            } else if let Some(dir) = env_dir("XDG_RUNTIME_DIR") {
                dir.join("conlog")
            } else {
                PathBuf::from(format!(
                    "/tmp/conlog-{}",
                    rustix::process::geteuid().as_raw()
                ))
            });
        }
        if self.data_dir.is_none() {
            self.data_dir = Some(if root {
                PathBuf::from("/var/lib/conlog")
            } else if let Some(dir) = env_dir("XDG_STATE_HOME") {
                dir.join("conlog")
            } else {
                env_dir("HOME")
                    .unwrap_or_else(|| PathBuf::from("/tmp"))
                    .join(".local/state/conlog")
            });
        }
        if self.log_dir.is_none() {
            // Root on the default data dir logs to /var/log as a system daemon would; a data dir
            // chosen by the user keeps its logs inside it.
            self.log_dir = Some(
                if root && self.data_dir.as_deref() == Some(Path::new("/var/lib/conlog")) {
                    PathBuf::from("/var/log/conlog")
                } else {
                    self.data_dir().join("logs")
                },
            );
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let value = |key, message: String| Err(ConfigError::Value { key, message });
        if self.logs.max_size.bytes() < MIN_MAX_SIZE {
            return value(
                "logs.max_size",
                format!("must be at least 4KiB (got {})", self.logs.max_size),
            );
        }
        if self.logs.max_size.bytes() > MAX_MAX_SIZE {
            return value(
                "logs.max_size",
                format!("must be at most 1TiB (got {})", self.logs.max_size),
            );
        }
        if self.logs.max_backups > MAX_BACKUPS {
            return value(
                "logs.max_backups",
                format!(
                    "must be at most {MAX_BACKUPS} (got {})",
                    self.logs.max_backups
                ),
            );
        }
        for (key, age) in [
            ("logs.max_age", self.logs.max_age),
            ("logs.removed_retention", self.logs.removed_retention),
        ] {
            if age.get().subsec_nanos() != 0 || age.get().as_secs() > MAX_AGE_SECONDS {
                return value(
                    key,
                    format!("must be whole seconds up to 3650d, or 0s for off (got {age})"),
                );
            }
        }
        if self.handoff.token_ttl.get().is_zero() {
            return value("handoff.token_ttl", "must be longer than 0s".into());
        }
        if self.handoff.read_timeout.get().is_zero() {
            return value("handoff.read_timeout", "must be longer than 0s".into());
        }
        if !(4096..=(1 << 30)).contains(&self.handoff.pipe_buffer.bytes()) {
            return value(
                "handoff.pipe_buffer",
                format!(
                    "must be between 4KiB and 1GiB (got {})",
                    self.handoff.pipe_buffer
                ),
            );
        }
        self.limits.validate()?;
        self.tokens.validate()?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        self.web.validate()?;
        self.node.validate()?;
        self.migration.validate()?;
        if self.console.require_gateway
            && self
                .tls
                .as_ref()
                .and_then(|t| t.client_ca.as_ref())
                .is_none()
        {
            return value(
                "console.require_gateway",
                "needs tls.cert, tls.key and tls.client_ca (the CA of the gateway's client \
                 certificates): remote callers are told apart by their certificate"
                    .into(),
            );
        }
        if self.consoles.client_queue.bytes() < 4096 {
            return value(
                "consoles.client_queue",
                format!("must be at least 4KiB (got {})", self.consoles.client_queue),
            );
        }
        if !(1024..=(4 << 20)).contains(&self.history.chunk_size.bytes()) {
            return value(
                "history.chunk_size",
                format!(
                    "must be between 1KiB and 4MiB (got {})",
                    self.history.chunk_size
                ),
            );
        }
        if !(1..=64).contains(&self.compression.threads) {
            return value(
                "compression.threads",
                format!(
                    "must be between 1 and 64 (got {})",
                    self.compression.threads
                ),
            );
        }
        if !(1..=19).contains(&self.compression.level) {
            return value(
                "compression.level",
                format!("must be between 1 and 19 (got {})", self.compression.level),
            );
        }
        if !((64 << 10)..=(1 << 20)).contains(&self.compression.frame_size.bytes()) {
            return value(
                "compression.frame_size",
                format!(
                    "must be between 64KiB and 1MiB (got {})",
                    self.compression.frame_size
                ),
            );
        }
        if !(1..=1_000_000).contains(&self.compression.queue) {
            return value(
                "compression.queue",
                format!(
                    "must be between 1 and 1000000 (got {})",
                    self.compression.queue
                ),
            );
        }
        for (key, dir) in [
            ("runtime_dir", &self.runtime_dir),
            ("data_dir", &self.data_dir),
            ("log_dir", &self.log_dir),
        ] {
            if let Some(dir) = dir {
                if !dir.is_absolute() {
                    return value(
                        key,
                        format!("must be an absolute path (got {})", dir.display()),
                    );
                }
            }
        }
        if !self.listen.ip().is_loopback() && !self.insecure && self.tls.is_none() {
            return value(
                "listen",
                format!(
                    "{} is not a loopback address and TLS is not configured; plaintext TCP is \
                     only allowed on loopback. Set tls.cert and tls.key (see SECURITY.md), listen \
                     on 127.0.0.1, or set `insecure: true` in the config",
                    self.listen
                ),
            );
        }
        Ok(())
    }

    /// The resolved runtime directory.
    pub fn runtime_dir(&self) -> &Path {
        self.runtime_dir
            .as_deref()
            .expect("paths resolved by Config::load")
    }

    /// The resolved data directory.
    pub(crate) fn data_dir(&self) -> &Path {
        self.data_dir
            .as_deref()
            .expect("paths resolved by Config::load")
    }

    /// The resolved log directory.
    pub(crate) fn log_dir(&self) -> &Path {
        self.log_dir
            .as_deref()
            .expect("paths resolved by Config::load")
    }

    /// The effective configuration as YAML, as `--print-config` shows it.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("config always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_yaml() {
        let mut config = Config::default();
        config.resolve_paths();
        let yaml = config.to_yaml();
        assert!(yaml.contains("max_size: 2MiB"), "{yaml}");
        assert!(yaml.contains("token_ttl: 30s"), "{yaml}");
        assert_eq!(Config::from_yaml(&yaml, "test").unwrap(), config);
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err =
            Config::from_yaml("logs:\n  max_size: 1MiB\n  max_sise: 3\n", "test.yaml").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("max_sise"), "{text}");
        assert!(text.contains("line 3 column 3"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn bad_values_are_one_line_errors() {
        let err = Config::from_yaml("logs:\n  max_size: 2XB\n", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unit") && err.contains("line 2"), "{err}");
        let err = Config::from_yaml("logs:\n  mode: sideways\n", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rotate") && err.contains("truncate"), "{err}");

        let mut config = Config::from_yaml("logs:\n  max_size: 1KiB\n", "t").unwrap();
        config.resolve_paths();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("logs.max_size") && err.contains("4KiB"),
            "{err}"
        );
        // A time index slot holds offsets within a file in 40 bits.
        let mut config = Config::from_yaml("logs:\n  max_size: 2TiB\n", "t").unwrap();
        config.resolve_paths();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("logs.max_size") && err.contains("1TiB"),
            "{err}"
        );
        let mut config = Config::from_yaml("logs:\n  max_size: 1TiB\n", "t").unwrap();
        config.resolve_paths();
        config.validate().unwrap();
        assert!(config.logs.time_index, "on by default");
        let off = Config::from_yaml("logs:\n  time_index: false\n", "t").unwrap();
        assert!(!off.logs.time_index);

        let mut config = Config::from_yaml("listen: 0.0.0.0:7770\n", "t").unwrap();
        config.resolve_paths();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("insecure: true"), "{err}");
    }

    #[test]
    fn web_allowed_origins_are_checked_origins() {
        assert!(Config::default().web.allowed_origins.is_empty());
        let yaml = "web:\n  allowed_origins: [https://console.example.com, 'http://[::1]:8080']\n";
        let mut config = Config::from_yaml(yaml, "t").unwrap();
        config.resolve_paths();
        config.validate().unwrap();
        assert!(config.to_yaml().contains("https://console.example.com"));
        for bad in [
            "console.example.com",
            "https://console.example.com/",
            "https://console.example.com/path",
            "https://user@console.example.com",
            "ftp://console.example.com",
            "*",
            "https://*.example.com",
            "https://host:99999",
            "null",
        ] {
            let mut config = Config::default();
            config.web.allowed_origins = vec![bad.into()];
            config.resolve_paths();
            let err = match config.validate() {
                Ok(()) => panic!("{bad} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains("web.allowed_origins") && !err.contains('\n'),
                "{bad}: {err}"
            );
        }
        assert_eq!(
            Origin::parse("https://Console.Example.com").unwrap(),
            Origin {
                scheme: "https",
                host: "console.example.com".into(),
                port: 443
            }
        );
        assert_eq!(
            Origin::parse("http://127.0.0.1:7770"),
            Ok(Origin::with_authority("http", "127.0.0.1:7770").unwrap())
        );
    }

    #[test]
    fn health_is_off_by_default_and_any_address_needs_no_tls() {
        assert_eq!(Config::default().health, None);
        let mut config = Config::from_yaml("health: 0.0.0.0:7772\n", "t").unwrap();
        config.resolve_paths();
        config.validate().unwrap();
        assert_eq!(config.health, Some(SocketAddr::from(([0, 0, 0, 0], 7772))));
        assert!(config.to_yaml().contains("health: 0.0.0.0:7772"));
    }
}
