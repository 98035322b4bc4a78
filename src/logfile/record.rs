//! The position record of a stream: its format, reading it, and overwriting it in place.
//!
//! Owns the bytes of `<stream>.pos` in the state directory. It never decides what the record
//! says (that is [`super::LogFile`]'s job); it only keeps the format readable by older and newer
//! versions (every field added since the first version has a default, so an old record reads
//! as "nothing dropped, no gaps") and the write a single `pwrite` of a padded record.

use super::gaps::Gaps;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The persisted position record of a stream.
///
/// `start` is the absolute offset of the first byte of the file with inode `inode` (0: no file
/// is open, a rotation could not create one). While a rotation is under way `next_start`
/// holds the first offset of the file that replaces it. `end` is the offset of the next byte
/// when the record was saved: a floor for the offsets after a restart, whatever happened to the
/// files. `gaps` are the offsets handed out without bytes on disk, as far back as the oldest
/// file still there; `dropped` counts every byte that could not be logged, ever.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Position {
    pub inode: u64,
    pub start: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start: Option<u64>,
    #[serde(default)]
    pub end: u64,
    /// A writer (pipe) was feeding the stream; still true after a stop means the writer was
    /// lost with the daemon (the stream is "broken" until a new pipe comes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
    #[serde(default, skip_serializing_if = "Gaps::is_empty")]
    pub gaps: Gaps,
    /// Offsets below this may have been handed out: it is on stable storage before any of them
    /// is. After the machine restarted (a power cut may have lost later saves and bytes) the
    /// offsets go on from here.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reserved: u64,
    /// The kernel's boot id when the record was saved.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The kernel's boot id (empty if unknown): a record saved under another one may be older than
/// what was handed out before a power cut.
pub(crate) fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|id| id.trim().to_owned())
            .unwrap_or_default()
    })
}

/// Size of a position record file: the JSON, padded with spaces to a multiple of this (a record
/// with many gaps takes more, and the file never shrinks so an older, longer record never
/// leaves a tail behind).
pub(crate) const POSITION_RECORD_LEN: usize = 256;

/// Opens (creating) the position record for in-place updates.
pub(crate) fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .custom_flags(rustix::fs::OFlags::CLOEXEC.bits().cast_signed())
        .open(path)
}

/// Reads the open position record (empty or unreadable: none) and the record file's length.
pub(crate) fn read(file: &File, path: &Path) -> io::Result<(Option<Position>, usize)> {
    // Not `read_to_end` on the file itself: that asks for the size first (one more system
    // call per stream at a restart) for a record of 256 bytes.
    let mut bytes = Vec::with_capacity(POSITION_RECORD_LEN + 1);
    io::Read::read_to_end(&mut io::Read::take(file, 64 << 10), &mut bytes)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok((None, bytes.len()));
    }
    match serde_json::from_slice(bytes.trim_ascii_end()) {
        Ok(record) => Ok((Some(record), bytes.len())),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable position record");
            Ok((None, bytes.len()))
        }
    }
}

/// Writes `record` over the record file at offset 0 in one `pwrite`, padded to at least
/// `min_len` bytes; returns the length written. No temporary file, no rename, no block freed
/// per save; a process crash cannot tear a single write.
pub(crate) fn write(file: &File, record: &Position, min_len: usize) -> io::Result<usize> {
    let mut bytes = serde_json::to_vec(record)?;
    let len = (bytes.len() + 1)
        .div_ceil(POSITION_RECORD_LEN)
        .max(1)
        .saturating_mul(POSITION_RECORD_LEN)
        .max(min_len);
    bytes.resize(len - 1, b' ');
    bytes.push(b'\n');
    file.write_all_at(&bytes, 0)?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_record_reads_as_nothing_dropped() {
        let old = br#"{"inode":12,"start":4096,"end":5000,"open":true}"#;
        let record: Position = serde_json::from_slice(old).unwrap();
        assert_eq!(record.dropped, 0);
        assert_eq!(record.reserved, 0);
        assert!(record.gaps.is_empty());
        assert_eq!(record.end, 5000);
    }

    #[test]
    fn records_pad_and_never_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.pos");
        let file = open(&path).unwrap();
        let mut record = Position {
            inode: 1,
            dropped: 7,
            ..Position::default()
        };
        assert_eq!(write(&file, &record, 0).unwrap(), POSITION_RECORD_LEN);
        for n in 0..20 {
            record
                .gaps
                .insert(n * 1_000_000_000, n * 1_000_000_000 + 10);
        }
        let long = write(&file, &record, POSITION_RECORD_LEN).unwrap();
        assert!(long > POSITION_RECORD_LEN && long.is_multiple_of(POSITION_RECORD_LEN));
        record.gaps = Gaps::default();
        assert_eq!(write(&file, &record, long).unwrap(), long);
        let (read_back, len) = read(&open(&path).unwrap(), &path).unwrap();
        assert_eq!(read_back, Some(record));
        assert_eq!(len, long);
    }

    #[test]
    fn a_record_omits_what_is_at_its_default() {
        // Fields at their default are left out: the record stays small and reads the same in
        // versions that predate them.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.pos");
        let file = open(&path).unwrap();
        let mut record = Position {
            inode: 1,
            start: 2,
            end: 3,
            ..Position::default()
        };
        write(&file, &record, 0).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.trim_ascii_end(), br#"{"inode":1,"start":2,"end":3}"#);
        record.dropped = 7;
        record.reserved = 9;
        write(&file, &record, 0).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            bytes.trim_ascii_end(),
            br#"{"inode":1,"start":2,"end":3,"dropped":7,"reserved":9}"#
        );
    }

    #[test]
    fn every_record_length_reads_back_and_fills_whole_pages() {
        // The JSON and its newline must fit: a JSON of exactly a page takes two.
        let dir = tempfile::tempdir().unwrap();
        for n in 0..2 * POSITION_RECORD_LEN {
            let path = dir.path().join(format!("{n}.pos"));
            let file = open(&path).unwrap();
            let record = Position {
                inode: 1,
                boot: "b".repeat(n),
                ..Position::default()
            };
            let json = serde_json::to_vec(&record).unwrap().len();
            let len = write(&file, &record, 0).unwrap();
            assert_eq!(len, (json / POSITION_RECORD_LEN + 1) * POSITION_RECORD_LEN);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), len as u64);
            assert_eq!(read(&file, &path).unwrap(), (Some(record), len));
        }
    }

    #[test]
    fn the_boot_id_is_the_kernels() {
        let id = boot_id();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        assert_eq!(id, kernel.trim());
        assert_eq!(id.len(), 36, "a UUID: {id}");
    }
}
