//! The state snapshot handed from one daemon image to the next, and its binary envelope.
//!
//! Envelope (all integers little-endian):
//!
//! | bytes | content |
//! | --- | --- |
//! | 8 | magic `CONLOGSN` |
//! | 4 | format version ([`FORMAT_VERSION`]) |
//! | 8 | payload length (at most [`MAX_PAYLOAD`]) |
//! | 4 | CRC-32 of the payload |
//! | n | payload: the JSON of [`Envelope`] |
//!
//! Descriptors are not in the payload: the snapshot names them by index into the list of
//! descriptors that travels beside it (inherited across `execve`, or sent with SCM_RIGHTS).
//! Everything else the new image needs (limits, offsets, positions) is on disk already, in the
//! state directory, so the snapshot stays small.

use serde::{Deserialize, Serialize};
use std::os::fd::RawFd;
use thiserror::Error;

/// The first bytes of every snapshot.
pub const MAGIC: &[u8; 8] = b"CONLOGSN";
/// The snapshot format this image writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest payload accepted (a snapshot of 10,000 guests is a few MiB).
pub const MAX_PAYLOAD: u64 = 256 << 20;
const HEADER: usize = 8 + 4 + 8 + 4;

/// Why a snapshot was refused.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("Not a conlog snapshot (bad magic)")]
    Magic,
    #[error("Snapshot format {found} is not supported by this conlogd (it reads format {FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("Snapshot is truncated ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    #[error("Snapshot payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("Snapshot checksum mismatch (torn or corrupted)")]
    Checksum,
    #[error("Snapshot payload is not valid: {0}")]
    Payload(#[from] serde_json::Error),
    #[error("Snapshot refers to descriptor #{0}, which did not arrive")]
    MissingDescriptor(usize),
}

/// Indexes of the daemon-wide descriptors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListenerIndexes {
    pub lock: usize,
    pub local: usize,
    pub fd_sock: usize,
    pub handover: usize,
    pub tcp: usize,
    pub metrics: Option<usize>,
}

/// One stream's carried descriptors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamEntry {
    pub guest: String,
    pub stream: String,
    /// Pipe read ends feeding the stream.
    pub pipes: Vec<usize>,
    pub console: Option<ConsoleEntry>,
}

/// A console's carried descriptors and the input not yet written to the guest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConsoleEntry {
    pub guest_listener: usize,
    pub client_listener: usize,
    pub guest_connection: Option<usize>,
    pub pending_input: Vec<u8>,
}

/// A log pipe whose write end has not been claimed yet.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HandoffEntry {
    pub token: String,
    pub guest: String,
    pub stream: String,
    pub write_end: usize,
    pub expires_in_ms: u64,
}

/// Everything the next image needs beyond the state directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// Pid of the image that wrote it (for logs).
    pub from_pid: u32,
    pub listeners: ListenerIndexes,
    pub streams: Vec<StreamEntry>,
    pub handoffs: Vec<HandoffEntry>,
}

/// The payload: the snapshot and, for `execve`, the descriptor numbers (which survive exec).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub snapshot: Snapshot,
    /// How many descriptors travel with the snapshot.
    pub descriptors: usize,
    /// Their numbers in the new image, when inherited across `execve`.
    pub inherited: Option<Vec<RawFd>>,
}

/// Encodes an envelope with its header.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    let payload = serde_json::to_vec(envelope).expect("snapshot serializes");
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The total length announced by a header (to know how much to read), after checking it.
pub fn announced_len(header: &[u8]) -> Result<usize, SnapshotError> {
    if header.len() < HEADER {
        return Err(SnapshotError::Truncated {
            have: header.len(),
            want: HEADER,
        });
    }
    if &header[..8] != MAGIC {
        return Err(SnapshotError::Magic);
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { found: version });
    }
    let len = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge(len));
    }
    Ok(HEADER + len as usize)
}

/// Decodes and verifies an envelope.
pub fn decode(bytes: &[u8]) -> Result<Envelope, SnapshotError> {
    let total = announced_len(bytes)?;
    if bytes.len() < total {
        return Err(SnapshotError::Truncated {
            have: bytes.len(),
            want: total,
        });
    }
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER..total];
    if crc32fast::hash(payload) != crc {
        return Err(SnapshotError::Checksum);
    }
    Ok(serde_json::from_slice(payload)?)
}

/// The header length, for readers that read it first.
pub const HEADER_LEN: usize = HEADER;

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            snapshot: Snapshot {
                from_pid: 7,
                listeners: ListenerIndexes {
                    lock: 0,
                    local: 1,
                    fd_sock: 2,
                    handover: 3,
                    tcp: 4,
                    metrics: None,
                },
                streams: vec![StreamEntry {
                    guest: "vm1".into(),
                    stream: "serial0".into(),
                    pipes: vec![],
                    console: Some(ConsoleEntry {
                        guest_listener: 5,
                        client_listener: 6,
                        guest_connection: Some(7),
                        pending_input: b"ls\n".to_vec(),
                    }),
                }],
                handoffs: vec![],
            },
            descriptors: 8,
            inherited: Some((3..11).collect()),
        }
    }

    /// Decoding arbitrary damage never panics: truncations, bit flips and random bytes at
    /// every position, with the checksum both kept and recomputed (so the JSON decoder sees the
    /// damage too).
    #[test]
    fn fuzzed_decoding_never_panics() {
        let good = encode(&envelope());
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut accepted = 0;
        for round in 0..20_000 {
            let mut bytes = good.clone();
            match round % 4 {
                0 => bytes.truncate((next() as usize) % (good.len() + 1)),
                1 => {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] ^= 1 << (next() % 8);
                }
                2 => {
                    let len = (next() as usize) % 64;
                    bytes = (0..len).map(|_| next() as u8).collect();
                    if round % 8 == 2 {
                        bytes.splice(0..0, MAGIC.iter().copied());
                    }
                }
                _ => {
                    // Damage the payload and fix the checksum, so serde_json meets it.
                    let at = HEADER + (next() as usize) % (bytes.len() - HEADER);
                    bytes[at] = next() as u8;
                    let crc = crc32fast::hash(&bytes[HEADER..]);
                    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
                }
            }
            if decode(&bytes).is_ok() {
                accepted += 1;
            }
            let _ = announced_len(&bytes);
        }
        // Only damage that happens to keep valid JSON with the same meaning is accepted.
        assert!(
            accepted < 20_000 / 4,
            "{accepted} damaged snapshots accepted"
        );
    }

    #[test]
    fn round_trip_and_every_kind_of_damage() {
        let bytes = encode(&envelope());
        let back = decode(&bytes).unwrap();
        assert_eq!(back.descriptors, 8);
        assert_eq!(
            back.snapshot.streams[0]
                .console
                .as_ref()
                .unwrap()
                .pending_input,
            b"ls\n"
        );

        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(SnapshotError::Truncated { .. })
        ));
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(decode(&flipped), Err(SnapshotError::Checksum)));
        let mut foreign = bytes.clone();
        foreign[0] = b'X';
        assert!(matches!(decode(&foreign), Err(SnapshotError::Magic)));
        let mut future = bytes.clone();
        future[8] = 9;
        assert!(matches!(
            decode(&future),
            Err(SnapshotError::Version { found: 9 })
        ));
        let mut huge = bytes.clone();
        huge[12..20].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(decode(&huge), Err(SnapshotError::TooLarge(_))));
        assert!(matches!(
            decode(b"CONLOG"),
            Err(SnapshotError::Truncated { .. })
        ));
    }
}
