//! Shared by the crash tests: writers of numbered lines, the keeper's pid, and the check that a
//! log is what was written with only whole reads cut out.
#![allow(dead_code)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest single read of a pipe stream (`pipe.rs`, `COPY_BUFFER_LEN`).
pub const PIPE_READ: usize = 128 << 10;
/// Largest single read of a console (`console/actor.rs`, `READ_CHUNK`).
pub const CONSOLE_READ: usize = 64 << 10;
/// Lines per write (each line is 24 bytes: one write stays under PIPE_BUF).
pub const LINES_PER_WRITE: u64 = 100;

/// Line `n` of writer `who`: 24 bytes, unique.
pub fn line(who: &str, n: u64) -> String {
    format!("{who:>8} {n:014}\n")
}

/// Lines `0..count` of `who`, as written.
pub fn written(who: &str, count: u64) -> Vec<u8> {
    (0..count)
        .map(|n| line(who, n))
        .collect::<String>()
        .into_bytes()
}

/// What a writer did.
#[derive(Debug)]
pub struct Outcome {
    pub who: String,
    pub lines: u64,
    pub error: Option<std::io::Error>,
}

/// Writes numbered lines into `sink` until `stop`, a batch at a time, paced so the logs stay
/// within their caps; returns how many lines were written whole.
pub fn write_lines(who: String, sink: impl Write, stop: Arc<AtomicBool>) -> Outcome {
    write_lines_paced(who, sink, stop, Duration::from_millis(2))
}

/// [`write_lines`] with `pause` between two batches.
pub fn write_lines_paced(
    who: String,
    mut sink: impl Write,
    stop: Arc<AtomicBool>,
    pause: Duration,
) -> Outcome {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let batch: String = (n..n + LINES_PER_WRITE).map(|i| line(&who, i)).collect();
        if let Err(error) = sink.write_all(batch.as_bytes()) {
            return Outcome {
                who,
                lines: n,
                error: Some(error),
            };
        }
        n += LINES_PER_WRITE;
        std::thread::sleep(pause);
    }
    Outcome {
        who,
        lines: n,
        error: None,
    }
}

/// Checks that `log` is `want` with some ranges cut out; returns each cut's length.
pub fn cuts(what: &str, log: &[u8], want: &[u8]) -> Vec<usize> {
    const KEY: usize = 96;
    let (mut at_log, mut at_want) = (0, 0);
    let mut cuts = Vec::new();
    loop {
        let same = log[at_log..]
            .iter()
            .zip(&want[at_want..])
            .take_while(|(a, b)| a == b)
            .count();
        at_log += same;
        at_want += same;
        if at_log == log.len() {
            break;
        }
        // The log goes on with bytes written later: find where.
        let key = &log[at_log..(at_log + KEY).min(log.len())];
        let resumed = want[at_want..]
            .windows(key.len())
            .position(|w| w == key)
            .unwrap_or_else(|| {
                panic!(
                    "{what}: logged bytes at {at_log} were never written after byte {at_want}: {:?}",
                    String::from_utf8_lossy(key)
                )
            });
        cuts.push(resumed);
        at_want += resumed;
    }
    assert!(
        at_want <= want.len(),
        "{what}: the log holds more than was written"
    );
    if at_want < want.len() {
        panic!(
            "{what}: the last {} written bytes never reached the log",
            want.len() - at_want
        );
    }
    cuts
}

/// A small pseudo-random sequence (the seed is printed, so a failure can be replayed).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// The pid in `<runtime_dir>/keeper.lock`.
pub fn keeper_pid(runtime_dir: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(runtime_dir.join("keeper.lock"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether process `pid` is alive; a zombie (the keeper's parent may be a dead daemon of the
/// test) counts as gone.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}
