//! conlog: keeps every byte a virtual machine prints, in size-capped logs, and serves it live.
//!
//! The daemon (`conlogd`) is assembled in [`daemon`]; each other module owns one concern and
//! says in its doc what it must never do.
//!
//! # Public API
//!
//! Only what `conlogd`, `conlogctl`, the bench (`conlog-bench`) and the integration tests use
//! is `pub`: [`proto`], [`client`] (connecting, receiving hand-off pipes), [`config`] (loading,
//! [`config::ByteSize`], [`config::HumanDuration`], [`config::Limits`], the binaries'
//! diagnostics [`config::LogFormat::init_tracing`]), [`daemon::run`] and
//! [`daemon::preflight`], [`upgrade::exec`]'s start-up steps and the snapshot format version,
//! [`keeper`]'s server, check, systemd hand-over and wire protocol, [`logfile::backup_path`],
//! [`logfile::backups_of`] and the time index's reader and format ([`logfile::index`], tests
//! decode index files with it), [`clock::now`], [`names`]' defaults,
//! [`terminal_safety::QueryFilter`], [`tokens`]' keys (a node's, and the gateway's cluster key)
//! and grants, and [`gateway`] (`conlog-gateway`'s configuration and [`gateway::run`]).
//! Everything else is `pub(crate)`, so the compiler reports code
//! nothing uses.
//!
//! # Unsafe code
//!
//! `unsafe_code` is denied for the whole crate (`[lints]` in Cargo.toml), and every `unsafe`
//! block carries a `// SAFETY:` comment (`clippy::undocumented_unsafe_blocks`). Descriptors
//! otherwise go through `rustix` and std's owned types. Exactly these opt back in:
//! - `upgrade::fds` (the whole module, `#![allow(unsafe_code)]`): `OwnedFd::from_raw_fd`
//!   on descriptor numbers inherited across `execve` (an in-place upgrade's carried
//!   descriptors, systemd's descriptor store) and on the strays it closes at start-up. Nothing
//!   else turns a number into a descriptor; the caller adopts each number once
//!   (`upgrade::exec::inherited` refuses a snapshot that lists one twice).
//! - `upgrade::exec` (one function, `block_signals_at_exec`, `#[allow(unsafe_code)]`):
//!   `CommandExt::pre_exec`, to keep the handled signals blocked across `execve` so a signal
//!   sent during the exec waits for the new image's handlers.

#![allow(
    rustdoc::private_intra_doc_links,
    reason = "module docs are for maintainers, who read them with --document-private-items"
)]

pub mod client;
pub mod clock;
pub(crate) mod compress;
pub mod config;
pub(crate) mod console;
pub mod daemon;
pub(crate) mod error;
pub(crate) mod fault;
pub mod gateway;
pub(crate) mod guests;
pub(crate) mod handoff;
pub(crate) mod history;
pub(crate) mod ids;
pub mod keeper;
pub(crate) mod log_owner;
pub mod logfile;
pub(crate) mod metrics;
pub mod migration;
pub mod names;
pub(crate) mod pipe;
pub(crate) mod ratelimit;
pub(crate) mod retention;
pub(crate) mod server;
pub mod terminal_safety;
pub(crate) mod tls;
pub mod tokens;
pub(crate) mod tombstone;
pub mod upgrade;

/// Generated protobuf types and gRPC stubs of `conlog.v1`, and the descriptor sets served by
/// reflection.
pub mod proto {
    tonic::include_proto!("conlog.v1");

    /// Every file of the API (local socket reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/conlog_descriptor.bin"));
    /// The API without `agent.proto` (TCP reflection: the Agent service is not discoverable).
    pub const CONSOLE_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/conlog_console_descriptor.bin"));
}
