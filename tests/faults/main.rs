//! The core tier's fault tests: crashes, power cuts, full disks, upgrades, takeovers and
//! hand-offs racing them, against the real `conlogd` (docs/testing.md "Test tiers"). Plain
//! `cargo test` builds and runs this binary; it needs only the Rust toolchain and util-linux
//! (`prlimit`, `mount`, `setpriv`), and root as CI runs it. A daemon's fault points are set on
//! its own command (`Daemon::start_env`), never in this process's environment: the tests share
//! it.

#[path = "../crash_common/mod.rs"]
mod crash_common;
#[path = "../history_common/mod.rs"]
mod history_common;
#[path = "../migration_common/mod.rs"]
mod migration_common;
#[path = "../support/mod.rs"]
mod support;
#[path = "../upgrade_common/mod.rs"]
mod upgrade_common;

mod compression;
mod crash_keeper;
mod crash_keeper_fault;
mod crash_recovery;
mod crash_soak;
mod crash_systemd;
mod disk_full;
mod dropped_bytes;
mod handoff_carried;
mod handoff_races;
mod history_time;
mod hostile_handover;
mod keeper;
mod linger;
mod log_integrity;
mod migration;
mod power_cut;
mod registry_races;
mod removal_crash;
mod startup_signals;
mod takeover;
mod takeover_verdict;
mod time_index;
mod upgrade;
mod upgrade_failures;
