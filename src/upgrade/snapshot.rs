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

use super::{FrozenHandoff, FrozenListeners, FrozenStream};
use serde::{Deserialize, Serialize};
use std::os::fd::RawFd;
use thiserror::Error;

/// The first bytes of every snapshot.
pub(crate) const MAGIC: &[u8; 8] = b"CONLOGSN";
/// The snapshot format this image writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest payload accepted (a snapshot of 10,000 guests is a few MiB).
pub(crate) const MAX_PAYLOAD: u64 = 256 << 20;
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
    #[error("Snapshot is followed by {0} unexpected bytes")]
    Trailing(usize),
    #[error("Snapshot payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("Snapshot checksum mismatch (torn or corrupted)")]
    Checksum,
    #[error("Snapshot payload is not valid: {0}")]
    Payload(#[from] serde_json::Error),
    #[error("Snapshot refers to descriptor #{0}, which did not arrive")]
    MissingDescriptor(usize),
    #[error("Snapshot announces {descriptors} descriptors but lists {inherited} inherited ones")]
    Inconsistent {
        descriptors: usize,
        inherited: usize,
    },
}

/// Everything the next image needs beyond the state directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    /// Pid of the image that wrote it (for logs).
    pub from_pid: u32,
    /// Each descriptor is an index into the list that travels beside the snapshot.
    pub listeners: FrozenListeners<usize>,
    pub streams: Vec<FrozenStream<usize>>,
    pub handoffs: Vec<FrozenHandoff<usize>>,
    /// The daemon-wide counters, the upgrade being made counted. Absent from snapshots of
    /// images that predate it (the next image then continues from `state/counters.json`);
    /// ignored by such images. Within format 1 for the reasons given at [`FrozenListeners`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<crate::metrics::Counters>,
    /// The sender gives a takeover verdict (see [`super::handover`], step 6). False in
    /// snapshots of images that predate it.
    #[serde(default)]
    pub verdicts: bool,
}

/// The payload: the snapshot and, for `execve`, the descriptor numbers (which survive exec).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub snapshot: Snapshot,
    /// How many descriptors travel with the snapshot.
    pub descriptors: usize,
    /// Their numbers in the new image, when inherited across `execve`.
    pub inherited: Option<Vec<RawFd>>,
}

/// Encodes an envelope with its header.
pub(crate) fn encode(envelope: &Envelope) -> Vec<u8> {
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
pub(crate) fn announced_len(header: &[u8]) -> Result<usize, SnapshotError> {
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
    let len = usize::try_from(len).map_err(|_| SnapshotError::TooLarge(len))?;
    Ok(HEADER + len)
}

/// Decodes and verifies an envelope: exactly the announced length, intact, well formed, and
/// with as many inherited descriptor numbers (if any) as descriptors announced. Whether the
/// indexes point at descriptors that arrived is checked by [`super::FrozenDaemon::resolve`].
pub(crate) fn decode(bytes: &[u8]) -> Result<Envelope, SnapshotError> {
    let total = announced_len(bytes)?;
    if bytes.len() < total {
        return Err(SnapshotError::Truncated {
            have: bytes.len(),
            want: total,
        });
    }
    if bytes.len() > total {
        return Err(SnapshotError::Trailing(bytes.len() - total));
    }
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER..total];
    if crc32fast::hash(payload) != crc {
        return Err(SnapshotError::Checksum);
    }
    let envelope: Envelope = serde_json::from_slice(payload)?;
    match &envelope.inherited {
        Some(numbers) if numbers.len() != envelope.descriptors => {
            Err(SnapshotError::Inconsistent {
                descriptors: envelope.descriptors,
                inherited: numbers.len(),
            })
        }
        _ => Ok(envelope),
    }
}

/// The header length, for readers that read it first.
pub(crate) const HEADER_LEN: usize = HEADER;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::FrozenConsole;

    fn envelope() -> Envelope {
        Envelope {
            snapshot: Snapshot {
                from_pid: 7,
                listeners: FrozenListeners {
                    lock: 0,
                    local: 1,
                    fd_sock: 2,
                    handover: 3,
                    tcp: 4,
                    metrics: None,
                    health: None,
                },
                streams: vec![FrozenStream {
                    guest: "vm1".into(),
                    stream: "serial0".into(),
                    pipes: vec![],
                    console: Some(FrozenConsole {
                        guest_listener: 5,
                        client_listener: 6,
                        guest_connection: Some(7),
                        pending_input: b"ls\n".to_vec(),
                    }),
                }],
                handoffs: vec![],
                counters: None,
                verdicts: true,
            },
            descriptors: 8,
            inherited: Some((3..11).collect()),
        }
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

    /// The frozen types carry descriptor indexes in the same JSON as the index structs of
    /// older images did (same field names, the time left in whole milliseconds), so images on
    /// either side of that change read each other's snapshots.
    #[test]
    fn frozen_types_keep_the_format_1_field_names() {
        let handoff = FrozenHandoff {
            token: "t".into(),
            guest: "vm1".into(),
            stream: "qemu".into(),
            write_end: 3usize,
            expires_in: std::time::Duration::from_millis(1500),
        };
        assert_eq!(
            serde_json::to_value(&handoff).unwrap(),
            serde_json::json!({
                "token": "t", "guest": "vm1", "stream": "qemu",
                "write_end": 3, "expires_in_ms": 1500
            })
        );
        let console = serde_json::json!({
            "guest_listener": 5, "client_listener": 6,
            "guest_connection": null, "pending_input": [108, 115]
        });
        let stream: FrozenStream<usize> = serde_json::from_value(serde_json::json!({
            "guest": "vm1", "stream": "serial0", "pipes": [1, 2], "console": console
        }))
        .unwrap();
        assert_eq!(stream.pipes, vec![1, 2]);
        assert_eq!(stream.console.unwrap().pending_input, b"ls");
    }

    /// A snapshot written before the health listener existed (same format version) is read
    /// as having none, and one that has it is still read by a decoder that does not know the
    /// field (serde ignores unknown fields of these structs).
    #[test]
    fn health_listener_index_is_optional_in_format_1() {
        let mut old = envelope();
        let json = serde_json::to_value(&old).unwrap();
        assert!(json["snapshot"]["listeners"].get("health").is_none());
        let back = decode(&encode(&old)).unwrap();
        assert_eq!(back.snapshot.listeners.health, None);

        old.snapshot.listeners.health = Some(8);
        old.descriptors = 9;
        old.inherited = Some((3..12).collect());
        let bytes = encode(&old);
        assert_eq!(decode(&bytes).unwrap().snapshot.listeners.health, Some(8));

        // The struct as it was before `health`.
        #[derive(Deserialize)]
        struct Before {
            lock: usize,
            local: usize,
            fd_sock: usize,
            handover: usize,
            tcp: usize,
            metrics: Option<usize>,
        }
        let json = serde_json::to_value(&old.snapshot.listeners).unwrap();
        let b: Before = serde_json::from_value(json).unwrap();
        assert_eq!(
            (b.lock, b.local, b.fd_sock, b.handover, b.tcp, b.metrics),
            (0, 1, 2, 3, 4, None)
        );
    }

    /// Strategies for random envelopes.
    mod arb {
        use super::*;
        use proptest::collection::vec;
        use proptest::option;
        use proptest::prelude::*;

        fn index() -> impl Strategy<Value = usize> {
            0usize..600
        }

        fn listeners() -> impl Strategy<Value = FrozenListeners<usize>> {
            (
                index(),
                index(),
                index(),
                index(),
                index(),
                option::of(index()),
                option::of(index()),
            )
                .prop_map(|(lock, local, fd_sock, handover, tcp, metrics, health)| {
                    FrozenListeners {
                        lock,
                        local,
                        fd_sock,
                        handover,
                        tcp,
                        metrics,
                        health,
                    }
                })
        }

        fn console() -> impl Strategy<Value = FrozenConsole<usize>> {
            (
                index(),
                index(),
                option::of(index()),
                vec(any::<u8>(), 0..32),
            )
                .prop_map(
                    |(guest_listener, client_listener, guest_connection, pending_input)| {
                        FrozenConsole {
                            guest_listener,
                            client_listener,
                            guest_connection,
                            pending_input,
                        }
                    },
                )
        }

        fn stream() -> impl Strategy<Value = FrozenStream<usize>> {
            (
                ".{0,12}",
                "[a-z0-9_-]{1,8}",
                vec(index(), 0..4),
                option::of(console()),
            )
                .prop_map(|(guest, stream, pipes, console)| FrozenStream {
                    guest,
                    stream,
                    pipes,
                    console,
                })
        }

        fn handoff() -> impl Strategy<Value = FrozenHandoff<usize>> {
            (
                "[0-9a-f]{32}",
                ".{0,12}",
                "[a-z]{1,8}",
                index(),
                any::<u64>(),
            )
                .prop_map(|(token, guest, stream, write_end, expires_in_ms)| {
                    FrozenHandoff {
                        token,
                        guest,
                        stream,
                        write_end,
                        expires_in: std::time::Duration::from_millis(expires_in_ms),
                    }
                })
        }

        pub(crate) fn envelope() -> impl Strategy<Value = Envelope> {
            let snapshot = (
                any::<u32>(),
                listeners(),
                vec(stream(), 0..5),
                vec(handoff(), 0..3),
            )
                .prop_map(|(from_pid, listeners, streams, handoffs)| Snapshot {
                    from_pid,
                    listeners,
                    streams,
                    handoffs,
                    counters: (from_pid % 2 == 0).then(|| crate::metrics::Counters {
                        bytes_logged: u64::from(from_pid),
                        upgrades: 1,
                        ..Default::default()
                    }),
                    verdicts: from_pid % 3 == 0,
                });
            (snapshot, vec(any::<i32>(), 0..40), any::<bool>()).prop_map(
                |(snapshot, numbers, inherited)| Envelope {
                    snapshot,
                    descriptors: numbers.len(),
                    inherited: inherited.then_some(numbers),
                },
            )
        }
    }

    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;
        use proptest::sample::Index;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

            /// Arbitrary bytes, alone or behind the magic and version, never panic and are
            /// refused (an envelope also needs its exact length, its CRC and its JSON).
            #[test]
            fn arbitrary_bytes_are_refused(
                mut bytes in vec(any::<u8>(), 0..256),
                header: bool,
            ) {
                if header {
                    let prefix = [MAGIC.as_slice(), &FORMAT_VERSION.to_le_bytes()].concat();
                    bytes.splice(0..0, prefix);
                }
                let _ = announced_len(&bytes);
                prop_assert!(decode(&bytes).is_err());
            }

            /// Every valid envelope round-trips to the same bytes.
            #[test]
            fn valid_envelopes_round_trip(envelope in arb::envelope()) {
                let bytes = encode(&envelope);
                prop_assert_eq!(announced_len(&bytes).unwrap(), bytes.len());
                let back = decode(&bytes).unwrap();
                prop_assert_eq!(encode(&back), bytes);
            }

            /// Any damage of up to 4 consecutive bytes anywhere (CRC-32 catches every burst of
            /// 32 bits or fewer), any truncation and any trailing bytes are refused.
            #[test]
            fn damaged_envelopes_are_refused(
                envelope in arb::envelope(),
                at: Index,
                burst in vec(1u8..=255, 1..=4),
                cut: Index,
                trailing in vec(any::<u8>(), 1..16),
            ) {
                let good = encode(&envelope);
                let mut damaged = good.clone();
                let at = at.index(good.len());
                for (byte, flip) in damaged[at..].iter_mut().zip(&burst) {
                    *byte ^= flip;
                }
                prop_assert!(decode(&damaged).is_err(), "damage at {} accepted", at);
                let cut = cut.index(good.len());
                prop_assert!(decode(&good[..cut]).is_err(), "truncation to {} accepted", cut);
                let longer = [good.as_slice(), &trailing].concat();
                prop_assert!(matches!(decode(&longer), Err(SnapshotError::Trailing(_))));
            }

            /// A damaged payload with a recomputed checksum reaches the JSON decoder: it never
            /// panics, and what it accepts is a consistent envelope that encodes back to a
            /// valid snapshot.
            #[test]
            fn damaged_payloads_with_fixed_checksums_never_panic(
                envelope in arb::envelope(),
                edits in vec((any::<Index>(), any::<u8>()), 1..4),
            ) {
                let mut bytes = encode(&envelope);
                let payload_len = bytes.len() - HEADER;
                for (at, value) in edits {
                    bytes[HEADER + at.index(payload_len)] = value;
                }
                let crc = crc32fast::hash(&bytes[HEADER..]);
                bytes[20..24].copy_from_slice(&crc.to_le_bytes());
                if let Ok(accepted) = decode(&bytes) {
                    if let Some(numbers) = &accepted.inherited {
                        prop_assert_eq!(numbers.len(), accepted.descriptors);
                    }
                    prop_assert!(decode(&encode(&accepted)).is_ok());
                }
            }
        }
    }
}
