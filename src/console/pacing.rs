//! Pacing of what one writer types: at most `limits.input_rate` bytes per second, with a
//! burst of one second's worth.
//!
//! Owns nothing but the arithmetic (a virtual-scheduling token bucket). Input is never
//! dropped: a writer that sends faster is made to wait, and the wait reaches it as transport
//! back-pressure (gRPC flow control, a full socket buffer).

use std::time::Duration;
use tokio::time::Instant;

/// One writer's allowance.
#[derive(Debug)]
pub struct InputPacer {
    per_byte: Duration,
    burst: Duration,
    /// When the input accepted so far would have finished at exactly the rate.
    finish: Instant,
}

impl InputPacer {
    /// A pacer for `rate` bytes per second (at least 1).
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1);
        Self {
            per_byte: Duration::from_secs(1) / u32::try_from(rate).unwrap_or(u32::MAX),
            burst: Duration::from_secs(1),
            finish: Instant::now(),
        }
    }

    /// Counts `bytes` just accepted.
    pub fn record(&mut self, bytes: usize) {
        let now = Instant::now();
        let cost = self.per_byte * u32::try_from(bytes).unwrap_or(u32::MAX);
        self.finish = self.finish.max(now) + cost;
    }

    /// When more input may be taken (now or in the past when within the burst).
    pub fn ready_at(&self) -> Instant {
        self.finish
            .checked_sub(self.burst)
            .unwrap_or_else(Instant::now)
    }

    /// Whether more input may be taken now.
    pub fn is_ready(&self) -> bool {
        self.ready_at() <= Instant::now()
    }

    /// Counts `bytes` and waits until more input may be taken (within the burst, not at all:
    /// no timer is touched on the keystroke path).
    pub async fn pace(&mut self, bytes: usize) {
        self.record(bytes);
        if !self.is_ready() {
            tokio::time::sleep_until(self.ready_at()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_rate_after_a_one_second_burst() {
        let mut pacer = InputPacer::new(1000);
        let start = Instant::now();
        // The first second's worth goes through at once.
        pacer.pace(1000).await;
        assert_eq!(Instant::now(), start);
        // Then 500 bytes cost half a second each.
        pacer.pace(500).await;
        assert_eq!(Instant::now() - start, Duration::from_millis(500));
        pacer.pace(500).await;
        assert_eq!(Instant::now() - start, Duration::from_millis(1000));
        assert!(pacer.is_ready());
    }
}
