//! Helpers of the upgrade, takeover and crash-recovery tests (`tests/faults/upgrade.rs`,
//! `tests/faults/upgrade_failures.rs`, `tests/faults/takeover.rs`, `tests/faults/crash_recovery.rs`,
//! `tests/faults/hostile_handover.rs`, `tests/daemon/health_listener.rs`):
//!
//! - [`data`]: deterministic numbered lines ([`line`], [`lines`]) pushed continuously into log
//!   pipes by writer threads ([`PipeWriter`]) and into a console by a fake guest
//!   ([`GuestPrinter`]); `support::assert_same` shows where two byte strings first differ.
//! - [`agent`]: agent calls that retry while the daemon is between two images
//!   ([`list_guests`], [`wait_list`], [`agent()`]).
//! - [`readers`]: clients that reconnect by offset after every end of their call ([`Reader`]):
//!   an `AttachConsole` client that fills the gap with `ReadHistory` ([`fill_gap`]), or a
//!   `ReadHistory` follower.
//! - [`probes`]: raw `connect()`s to every listening socket ([`ConnectProbe`]) and gRPC calls on
//!   new connections ([`CallProbe`]), over and over, to show no connection is refused.
//! - [`processes`]: a `conlogd --takeover` on the directories and ports of a running daemon
//!   ([`Successor`]), "conlogd ready" lines ([`ready_lines`]) and the daemon's own timestamps
//!   ([`intervals`], for reports only). A process's descriptors are counted by
//!   `support::open_fds`.
//! - [`workload`]: the busy daemon of `upgrade.rs` and `takeover.rs` ([`Workload`]): writers in
//!   the log pipes of [`PIPES`], a fake guest printing on the console of [`CONSOLE`], an
//!   `AttachConsole` client and a `ReadHistory` follower; [`Writers::stop`] waits until the
//!   daemon logged everything written.
//!
//! Every wait is bounded by `support::DEADLINE`; nothing sleeps for a fixed time to let
//! something happen (writers pace themselves with short sleeps so that they write for the whole
//! test without filling the disk).
#![allow(dead_code)]

mod agent;
mod data;
mod probes;
mod processes;
mod readers;
mod workload;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use agent::*;
#[allow(unused_imports)]
pub use data::*;
#[allow(unused_imports)]
pub use probes::*;
#[allow(unused_imports)]
pub use processes::*;
#[allow(unused_imports)]
pub use readers::*;
#[allow(unused_imports)]
pub use workload::*;
