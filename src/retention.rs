//! Retention by time: the periodic sweep that deletes rotated files older than their stream's
//! `max_age` (and the files of streams nobody writes any more older than `logs.max_age`), and
//! the logs of removed streams once `logs.removed_retention` has passed since their removal
//! (docs/operations.md, "Retention").
//!
//! Owns the sweep's schedule (at the start of every serving period, then hourly) and the walk
//! of the log directory for tombstones. It never deletes a file itself: a live stream's actor
//! deletes its own expired backups ([`crate::log_owner::LogHandle::expire`], so a deletion
//! never races a rotation), and the registry deletes a removed stream's logs
//! ([`Guests::delete_removed`], under the lock that creating a stream takes, so a guest created
//! again is never touched). A sweep that fails is logged and tried again at the next one.

use crate::guests::Guests;
use crate::names::GuestName;
use crate::tombstone;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How often the sweep runs after the first: virtlogd's cleaner runs daily (first a day after
/// it starts); an hour bounds how long an expired file outlives its age.
const INTERVAL: Duration = Duration::from_secs(3600);

/// The sweep's interval; in a debug build `CONLOG_RETENTION_INTERVAL_MS` shortens it for tests
/// (a release build has no such knob).
fn interval() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("CONLOG_RETENTION_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
    {
        return Duration::from_millis(ms);
    }
    INTERVAL
}

/// Sweeps now and then every [`interval`] until the task is dropped. `max_age` is
/// `logs.max_age`: what applies to the files of removed streams (their own override went with
/// them).
pub(crate) async fn run(
    guests: Arc<Guests>,
    log_dir: PathBuf,
    max_age: Duration,
    removed_retention: Duration,
) {
    let mut tick = tokio::time::interval(interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut expired = guests.expire_all().await;
        if !max_age.is_zero() {
            expired += sweep_unwritten(&guests, &log_dir, max_age).await;
        }
        let deleted = if removed_retention.is_zero() {
            0
        } else {
            sweep_removed(&guests, &log_dir, removed_retention).await
        };
        if expired + deleted > 0 {
            tracing::info!(
                expired_files = expired,
                removed_files = deleted,
                "retention sweep"
            );
        }
    }
}

/// Deletes the logs of every stream removed longer than `retention` ago; returns how many log
/// files went.
async fn sweep_removed(guests: &Guests, log_dir: &Path, retention: Duration) -> u32 {
    let now = tombstone::now_unix();
    let due = {
        let log_dir = log_dir.to_owned();
        let wait = retention.as_secs();
        // Thousands of directories: read off the runtime's worker threads.
        tokio::task::spawn_blocking(move || due_tombstones(&log_dir, now, wait))
            .await
            .unwrap_or_default()
    };
    let mut deleted = 0;
    for (guest, stream, removed_unix) in due {
        match guests.delete_removed(&guest, &stream, removed_unix).await {
            Ok(n) => deleted += n,
            Err(e) => {
                tracing::warn!(guest, stream, error = %crate::error::error_chain(&e), "cannot delete the logs of a removed stream");
            }
        }
    }
    deleted
}

/// Deletes the files older than `max_age` of every stream nobody writes (removed, or left by
/// something else), whole logs included, as virtlogd's `max_age_days` does for the logs of
/// guests that are not running; returns how many log files went.
async fn sweep_unwritten(guests: &Guests, log_dir: &Path, max_age: Duration) -> u32 {
    let Some(cutoff) = std::time::SystemTime::now().checked_sub(max_age) else {
        return 0;
    };
    let candidates = {
        let log_dir = log_dir.to_owned();
        tokio::task::spawn_blocking(move || streams_on_disk(&log_dir))
            .await
            .unwrap_or_default()
    };
    let mut deleted = 0;
    for (guest, stream) in candidates {
        match guests.expire_unwritten(&guest, &stream, cutoff).await {
            Ok(n) => deleted += n,
            Err(e) => {
                tracing::warn!(guest, stream, error = %crate::error::error_chain(&e), "cannot delete the expired files of a removed stream");
            }
        }
    }
    deleted
}

/// Every (guest, stream) with files in `log_dir`.
fn streams_on_disk(log_dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(log_dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(guest) = name.to_str() else { continue };
        if GuestName::parse(guest).is_err() {
            continue;
        }
        for stream in crate::guests::streams_on_disk(&entry.path()) {
            found.push((guest.to_owned(), stream));
        }
    }
    found
}

/// (guest, stream, removal time) of every tombstone in `log_dir` at least `wait` seconds old.
fn due_tombstones(log_dir: &Path, now: u64, wait: u64) -> Vec<(String, String, u64)> {
    let Ok(entries) = std::fs::read_dir(log_dir) else {
        return Vec::new();
    };
    let mut due = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(guest) = name.to_str() else { continue };
        if GuestName::parse(guest).is_err() {
            continue;
        }
        for (stream, t) in tombstone::list(&entry.path()) {
            if now >= t.removed_unix.saturating_add(wait) {
                due.push((guest.to_owned(), stream, t.removed_unix));
            }
        }
    }
    due
}
