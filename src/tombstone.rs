//! Tombstones: the record, beside a removed stream's logs, of when it was removed.
//!
//! Owns the files `<log_dir>/<guest>/<stream>.removed` (a line of JSON:
//! `{"removed_unix": SECONDS, "with_guest": BOOL}`, and for a stream that live-migrated away
//! `"moved_to": "HOST:PORT", "moved_offset": N`: the redirect its clients get, docs/design.md
//! "Live migration"), written when a stream is removed and its
//! logs stay on disk (docs/design.md §3, `RemoveGuest`; docs/operations.md, "Retention"). They
//! say two things: when `logs.removed_retention` lets the logs go, and which tokens may still
//! read them (only a token issued before the removal). Creating the stream again cancels its
//! tombstone, and creating any stream of the guest cancels those written when the whole guest
//! was removed (`with_guest`). This module only reads, writes and removes these files; it never
//! deletes a log and never decides when one goes (`guests` and `retention` do).

use serde::{Deserialize, Serialize};
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// File name suffix of a tombstone.
const SUFFIX: &str = ".removed";

/// Longest tombstone read (anything longer was not written here).
const MAX_LEN: u64 = 4096;

/// When a stream was removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// Unix seconds of the removal.
    pub removed_unix: u64,
    /// The whole guest was removed (creating any stream of the guest cancels it).
    #[serde(default)]
    pub with_guest: bool,
    /// The stream moved to this node (its Console endpoint)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// ... and the destination continues at this offset (the source's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_offset: Option<u64>,
}

impl Tombstone {
    /// The redirect of a stream that moved away.
    pub fn moved(&self) -> Option<crate::migration::Moved> {
        Some(crate::migration::Moved {
            to: self.moved_to.clone()?,
            offset: self.moved_offset?,
        })
    }
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `<guest_dir>/<stream>.removed`.
pub fn path(guest_dir: &Path, stream: &str) -> PathBuf {
    guest_dir.join(format!("{stream}{SUFFIX}"))
}

/// Records that `stream` (whose logs are in `guest_dir`) was removed now; `moved`: it moved
/// to another node.
pub fn write(
    guest_dir: &Path,
    stream: &str,
    with_guest: bool,
    moved: Option<&crate::migration::Moved>,
) -> io::Result<()> {
    let tombstone = Tombstone {
        removed_unix: now_unix(),
        with_guest,
        moved_to: moved.map(|m| m.to.clone()),
        moved_offset: moved.map(|m| m.offset),
    };
    let mut bytes = serde_json::to_vec(&tombstone).expect("tombstones serialize");
    bytes.push(b'\n');
    std::fs::create_dir_all(guest_dir)?;
    crate::logfile::write_atomically(&path(guest_dir, stream), &bytes)
}

/// The tombstone of `stream`, if it has a readable one.
pub fn read(guest_dir: &Path, stream: &str) -> Option<Tombstone> {
    read_file(&path(guest_dir, stream))
}

fn read_file(path: &Path) -> Option<Tombstone> {
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, MAX_LEN), &mut bytes).ok()?;
    serde_json::from_slice(bytes.trim_ascii()).ok()
}

/// Removes the tombstone of `stream`.
pub fn remove(guest_dir: &Path, stream: &str) -> io::Result<()> {
    match std::fs::remove_file(path(guest_dir, stream)) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every tombstone in `guest_dir`: (stream, tombstone). Unreadable ones are left out.
pub fn list(guest_dir: &Path) -> Vec<(String, Tombstone)> {
    let Ok(entries) = std::fs::read_dir(guest_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let stream = name.to_str()?.strip_suffix(SUFFIX)?.to_owned();
            crate::names::StreamName::parse(stream.as_str()).ok()?;
            Some((stream, read_file(&entry.path())?))
        })
        .collect()
}

/// A stream `stream` is created in `guest_dir`: its own tombstone and those of the guest's
/// last removal go.
pub fn cancel(guest_dir: &Path, stream: &str) -> io::Result<()> {
    remove(guest_dir, stream)?;
    for (other, tombstone) in list(guest_dir) {
        if tombstone.with_guest {
            remove(guest_dir, &other)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creating_a_stream_cancels_its_own_and_the_guests_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let guest = dir.path().join("vm1");
        write(&guest, "serial1", false, None).unwrap();
        write(&guest, "qemu", true, None).unwrap();
        let moved = crate::migration::Moved {
            to: "node2:7770".into(),
            offset: 77,
        };
        write(&guest, "serial0", true, Some(&moved)).unwrap();
        assert_eq!(read(&guest, "serial0").unwrap().moved(), Some(moved));
        assert_eq!(read(&guest, "qemu").unwrap().moved(), None);
        assert_eq!(list(&guest).len(), 3);
        let t = read(&guest, "qemu").unwrap();
        assert!(t.with_guest && t.removed_unix > 0);
        // A stream of its own removal stays removed when another is created.
        cancel(&guest, "qemu").unwrap();
        let left: Vec<String> = list(&guest).into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, ["serial1"]);
        cancel(&guest, "serial1").unwrap();
        assert!(list(&guest).is_empty());
        // Foreign or torn files are no tombstones.
        std::fs::write(guest.join("x.removed"), b"{torn").unwrap();
        std::fs::write(guest.join("..removed"), b"{}").unwrap();
        assert!(list(&guest).is_empty());
    }
}
