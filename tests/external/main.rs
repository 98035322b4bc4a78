//! The external-tools tier: the daemon against real third-party programs — `tmux` as a
//! terminal, `grpcurl`, Python's `grpcio`, QEMU booting a guest, headless Chromium driven by
//! `node`/`playwright-core`, `strace --inject`, and the `zstd` CLI (docs/testing.md "Test tiers"). Built only
//! with `--features external-tools`, which `bash scripts/test.sh` (the README's test command)
//! always enables after installing these tools; inside the tier a missing tool fails its test
//! with a message naming it, it is never skipped.

#[path = "../migration_common/mod.rs"]
mod migration_common;
#[path = "../support/mod.rs"]
mod support;
#[path = "../upgrade_common/mod.rs"]
mod upgrade_common;

mod conlogctl_terminal;
mod grpcurl;
mod python_agent;
mod qemu_guest;
mod qemu_migration;
mod takeover_failure;
mod web_console;
mod web_migration;
mod zstd_cli;
