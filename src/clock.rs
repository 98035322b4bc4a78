//! The daemon's clocks: wall-clock time (UTC) for the time index, monotonic time for spacing.
//!
//! Owns [`now`]. It never stores a time anywhere and never decides what a time means (the
//! index writer in `logfile::index` does). In a debug build the environment variable
//! `CONLOG_TEST_CLOCK=<file>` adds the signed nanoseconds written in that file to the wall
//! clock (re-read at most every 10 ms), so a test steps the clock, backwards too, by
//! rewriting the file (like `fault`, nothing an operator of a release build could arm). The
//! monotonic clock is never shifted.

use std::time::{SystemTime, UNIX_EPOCH};

/// Both clocks read at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// CLOCK_REALTIME, nanoseconds since the Unix epoch (UTC).
    pub wall_ns: i64,
    /// CLOCK_MONOTONIC, nanoseconds.
    pub mono_ns: u64,
}

/// Reads both clocks (vDSO calls, no system call).
pub fn now() -> Now {
    let wall = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    };
    let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let mono_ns = u64::try_from(mono.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(mono.tv_nsec).unwrap_or(0);
    Now {
        wall_ns: wall.saturating_add(shift::wall_shift(mono_ns)),
        mono_ns,
    }
}

#[cfg(debug_assertions)]
mod shift {
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

    /// The shift last read and when (monotonic ns; 0: never).
    static SHIFT: AtomicI64 = AtomicI64::new(0);
    static READ_AT: AtomicU64 = AtomicU64::new(0);
    const REREAD_NS: u64 = 10_000_000;

    /// Nanoseconds to add to the wall clock: the test clock file's number, or 0.
    pub(super) fn wall_shift(mono_ns: u64) -> i64 {
        let Some(path) = std::env::var_os("CONLOG_TEST_CLOCK") else {
            return 0;
        };
        let last = READ_AT.load(Relaxed);
        if last == 0 || mono_ns.saturating_sub(last) >= REREAD_NS {
            if let Ok(text) = std::fs::read_to_string(path) {
                // A file being rewritten may read empty or torn: keep the last good value.
                if let Ok(n) = text.trim().parse::<i64>() {
                    SHIFT.store(n, Relaxed);
                }
            }
            READ_AT.store(mono_ns.max(1), Relaxed);
        }
        SHIFT.load(Relaxed)
    }
}

#[cfg(not(debug_assertions))]
mod shift {
    #[inline(always)]
    pub(super) fn wall_shift(_mono_ns: u64) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_move_forward_and_the_wall_clock_is_utc_now() {
        let a = now();
        let b = now();
        assert!(b.mono_ns >= a.mono_ns);
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let secs = u64::try_from(b.wall_ns / 1_000_000_000).unwrap();
        // Unit tests never set CONLOG_TEST_CLOCK.
        assert!(secs.abs_diff(unix) <= 1, "{secs} vs {unix}");
    }
}
