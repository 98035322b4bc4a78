//! The bytes a benchmark writes: console-like text lines generated once, repeated with a period
//! that is aligned to nothing (not to the write size, the page size or a log file's size), so a
//! byte misplaced, lost or duplicated anywhere shows up when the output is checked.

use std::io::{self, Write};

/// At least this many bytes before the pattern repeats.
const MIN_PERIOD: usize = 4 << 20;

/// A repeating byte pattern: the byte at absolute offset `o` is `bytes[o % period]`.
pub struct Pattern {
    /// One period followed by its first `max_write` bytes again, so any write of up to
    /// `max_write` bytes is one contiguous slice.
    bytes: Vec<u8>,
    period: usize,
    max_write: usize,
}

/// A tiny deterministic generator (no extra crate needed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

const SOURCES: [&str; 6] = ["kernel", "systemd", "virtio_net", "ext4", "sshd", "qemu"];

impl Pattern {
    /// A pattern for writes of at most `max_write` bytes.
    pub fn new(max_write: usize) -> Self {
        let mut rng = Lcg(0x5eed);
        let mut bytes = Vec::with_capacity(MIN_PERIOD + max_write + 256);
        let mut line = 0u64;
        while bytes.len() < MIN_PERIOD {
            line += 1;
            let pick = rng.next() % SOURCES.len() as u64;
            let source = SOURCES[usize::try_from(pick).expect("below the number of sources")];
            let _ = write!(
                bytes,
                "[{:5}.{:06}] {source}: line {line} ",
                line / 1000,
                rng.next() % 1_000_000
            );
            for _ in 0..rng.next() % 12 {
                let _ = write!(bytes, "{:x} ", rng.next());
            }
            bytes.push(b'\n');
        }
        let period = bytes.len();
        // Whole periods, then a partial one: the copy always starts at a period boundary.
        while bytes.len() < period + max_write {
            let missing = (period + max_write - bytes.len()).min(period);
            bytes.extend_from_within(..missing);
        }
        Self {
            bytes,
            period,
            max_write,
        }
    }

    /// Writes the first `size` bytes of the stream to `out` in writes of `chunk` bytes.
    pub fn write(&self, out: &mut impl Write, size: u64, chunk: usize) -> io::Result<()> {
        assert!(chunk > 0 && chunk <= self.max_write, "chunk out of range");
        let mut offset = 0u64;
        while offset < size {
            let len = usize::try_from(size - offset).map_or(chunk, |rest| rest.min(chunk));
            let start = usize::try_from(offset % self.period as u64).expect("below the period");
            out.write_all(&self.bytes[start..start + len])?;
            offset += len as u64;
        }
        Ok(())
    }

    /// Checks that `data` is the stream's content from absolute offset `offset` on; the offset
    /// of the first wrong byte otherwise.
    pub fn check(&self, offset: u64, data: &[u8]) -> Result<(), u64> {
        let mut checked = 0usize;
        while checked < data.len() {
            let at = offset + checked as u64;
            let start = usize::try_from(at % self.period as u64).expect("below the period");
            let len = (data.len() - checked).min(self.period - start);
            let want = &self.bytes[start..start + len];
            let got = &data[checked..checked + len];
            // One memcmp when equal (every client of the console scenario checks every byte);
            // the position only when not.
            if want != got {
                let i = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
                return Err(at + i as u64);
            }
            checked += len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_stream_checks_out_at_any_offset() {
        let pattern = Pattern::new(100_000);
        let mut out = Vec::new();
        pattern.write(&mut out, 9_000_123, 100_000).unwrap();
        assert_eq!(out.len(), 9_000_123);
        assert!(out.iter().all(|b| *b != 0));
        assert_eq!(pattern.check(0, &out), Ok(()));
        assert_eq!(pattern.check(4_999_999, &out[4_999_999..]), Ok(()));
        out[7_000_000] ^= 1;
        assert_eq!(pattern.check(0, &out), Err(7_000_000));
        // Shifted by one byte, the data no longer matches.
        assert!(pattern.check(1, &out[..1000]).is_err());
    }
}
