//! The core tier's daemon tests: the real `conlogd` and `conlogctl` on temporary directories,
//! driven with nothing but Rust (docs/testing.md "Test tiers"). Plain `cargo test` builds and
//! runs this binary on a machine with only the Rust toolchain (and, as CI does, root for the
//! tmpfs and uid tests). One binary instead of one per file: each test binary links the whole
//! crate, so fewer binaries link faster. Tests share this process: none sets an environment
//! variable, rlimit or current directory of its own (a daemon gets its environment through
//! `Daemon::start_env`), and the heavy ones serialize on `support::heavy()`.

#[path = "../history_common/mod.rs"]
mod history_common;
#[path = "../migration_common/mod.rs"]
mod migration_common;
#[path = "../support/mod.rs"]
mod support;
#[path = "../upgrade_common/mod.rs"]
mod upgrade_common;

mod auth;
mod cli;
mod config;
mod config_sources;
mod console_break;
mod console_clients;
mod console_flood;
mod console_group;
mod console_hostile;
mod console_io;
mod console_lifecycle;
mod consoles;
mod gateway;
mod gateway_fanout;
mod guest_isolation;
mod handoff;
mod health_listener;
mod history;
mod history_follow;
mod history_large;
mod history_text;
mod history_time;
mod history_tools;
mod hostile_callers;
mod hostile_guest;
mod hostile_handoff;
mod lifecycle;
mod lifecycle_counters;
mod limits;
mod log_pipes;
mod metrics_alerts;
mod migration;
mod migration_clients;
mod permissions;
mod removal;
mod retention;
mod services;
mod systemd;
mod tls;
mod token_expiry;
