//! Rate-limited logging for events a peer or a guest can trigger.
//!
//! Owns [`Throttle`] and the [`limited!`](crate::limited) macro: at most [`Throttle::BURST`]
//! events per second per call site reach the log, and the first event of the next second says
//! how many were suppressed meanwhile (`suppressed = N`). Every log line that a remote caller,
//! a local peer or a guest can cause at will goes through it (a refused call, a failed TLS
//! handshake, a refused hand-off, a bad takeover request, a refused upgrade, an agent call,
//! a keeper client dropped), so nobody can fill the node's disk or journal through the
//! daemon's log. It never decides what to log, only how often.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// One call site's budget: [`Throttle::BURST`] events per second.
#[derive(Debug, Default)]
pub struct Throttle {
    /// The current second (since [`epoch`]) and events logged in it: `second << 16 | count`.
    window: AtomicU64,
    /// Events suppressed since the last one logged.
    suppressed: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Throttle {
    /// Events logged per call site and second.
    pub const BURST: u64 = 20;
    /// The burst of audit lines of calls that succeed (an agent call, a pipe created or
    /// handed over): far above what an agent does when a node starts all its guests at once,
    /// far below what fills a disk.
    pub const AUDIT_BURST: u64 = 200;

    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed)` if this event may be logged (with how many were left out before it),
    /// `None` if it is to be left out.
    #[cfg(test)]
    pub fn admit(&self) -> Option<u64> {
        self.admit_burst(Self::BURST)
    }

    /// The same with a burst of `burst` events per second.
    pub fn admit_burst(&self, burst: u64) -> Option<u64> {
        let second = epoch().elapsed().as_secs() + 1;
        let admitted = self
            .window
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |window| {
                let (current, count) = (window >> 16, window & 0xffff);
                if current != second {
                    Some(second << 16 | 1)
                } else if count < burst {
                    Some(window + 1)
                } else {
                    None
                }
            })
            .is_ok();
        if admitted {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::$level!(…)` at most [`Throttle::BURST`](crate::ratelimit::Throttle::BURST) times
/// per second from this call site (or `burst: N` times), with `suppressed = N` (events left
/// out since the last one logged).
#[macro_export]
macro_rules! limited {
    (burst: $burst:expr, $level:ident, $($rest:tt)+) => {{
        static THROTTLE: $crate::ratelimit::Throttle = $crate::ratelimit::Throttle::new();
        if let Some(suppressed) = THROTTLE.admit_burst($burst) {
            tracing::$level!(suppressed, $($rest)+);
        }
    }};
    ($level:ident, $($rest:tt)+) => {{
        $crate::limited!(burst: $crate::ratelimit::Throttle::BURST, $level, $($rest)+)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_second_and_the_count_of_the_rest() {
        let throttle = Throttle::new();
        // Start at the beginning of a second, so that the burst is not split by a tick.
        let start = epoch().elapsed();
        std::thread::sleep(std::time::Duration::from_nanos(
            1_000_000_000 - u64::from(start.subsec_nanos()) + 1_000_000,
        ));
        for _ in 0..Throttle::BURST {
            assert_eq!(throttle.admit(), Some(0), "within the burst: logged");
        }
        for _ in 0..99 {
            assert_eq!(throttle.admit(), None, "past the burst: suppressed");
        }
        std::thread::sleep(std::time::Duration::from_millis(1000));
        assert_eq!(
            throttle.admit(),
            Some(99),
            "the next one says how many were left out"
        );
    }
}
