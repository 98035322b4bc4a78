//! The input framing of a guest connection whose QEMU chardev has `mux=on`: what carries a
//! serial BREAK over the socket QEMU connects to (docs/consoles.md, "Serial BREAK").
//!
//! QEMU's socket chardev as a *client* (no `server=on`, which is how QEMU meets conlogd) has no
//! way to receive a break: its telnet handling (`IAC BREAK`) is switched on only for a listening
//! socket (chardev/char-socket.c sets `do_telnetopt` in `qmp_chardev_open_socket_server` only;
//! with `telnet=on` a client sends no options and passes `IAC IAC` to the guest as two bytes,
//! checked with QEMU 7.2 in tests/external/qemu_guest.rs). The multiplexer above any chardev
//! (`mux=on`, chardev/char-mux.c) does, in either direction: of the bytes QEMU reads, the escape
//! character (Ctrl-A, 0x01, unless `-echr` changed it) starts a command: `Ctrl-A b` is a serial
//! BREAK, `Ctrl-A Ctrl-A` one Ctrl-A for the guest, and other keys are QEMU's own commands
//! (`x` quits QEMU, `s` commits disks, `c` switches to a monitor, `t` adds timestamps to the
//! output, `h` prints help into it) or are swallowed. Output passes unchanged, so the log holds
//! exactly what the guest printed.
//!
//! So every Ctrl-A of a client's input is doubled ([`escape`]): no keystroke can reach QEMU's
//! commands, and [`BREAK`] is the only command conlogd sends. A sequence is never cut: the actor
//! writes the second byte of a half-written one even when the rest of the input is discarded
//! ([`ends_half`]). This module never does I/O and never panics on any input.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// QEMU's mux escape character (Ctrl-A; `-echr` changes it, which a mux console must not).
pub const ESCAPE: u8 = 0x01;
/// `Ctrl-A b`: a serial BREAK.
pub const BREAK: [u8; 2] = [ESCAPE, b'b'];

/// What conlogd speaks on a console's guest socket: fixed when the console is created, kept
/// in its stream record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Raw bytes both ways (QEMU's socket chardev as it is); no serial BREAK.
    #[default]
    Raw,
    /// QEMU's `mux=on`: Ctrl-A in input is escaped, a serial BREAK is `Ctrl-A b`.
    Mux,
}

impl Protocol {
    /// "raw" or "mux", as in the stream record and the messages.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Raw => "raw",
            Protocol::Mux => "mux",
        }
    }
}

/// Input for a mux guest: every Ctrl-A doubled (no copy when there is none).
pub fn escape(data: Bytes) -> Bytes {
    let doubled = data.iter().filter(|&&b| b == ESCAPE).count();
    if doubled == 0 {
        return data;
    }
    let mut out = Vec::with_capacity(data.len() + doubled);
    for &byte in data.iter() {
        out.push(byte);
        if byte == ESCAPE {
            out.push(ESCAPE);
        }
    }
    out.into()
}

/// How many bytes of `data` (from the front) escape to at most `max` bytes; at least one when
/// `data` is not empty.
pub fn fitting(data: &[u8], max: usize) -> usize {
    let mut size = 0;
    for (taken, &byte) in data.iter().enumerate() {
        size += if byte == ESCAPE { 2 } else { 1 };
        if size > max {
            return taken.max(1);
        }
    }
    data.len()
}

/// Whether the last byte written, after writing `written` (escaped input or [`BREAK`]) at a
/// point where `half` said the same, begins a two-byte sequence: the next byte QEMU reads is
/// then a command, so the sequence's second byte must follow whatever happens to the rest.
pub fn ends_half(mut half: bool, written: &[u8]) -> bool {
    for &byte in written {
        half = !half && byte == ESCAPE;
    }
    half
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's reading of mux input (chardev/char-mux.c `mux_proc_byte`): what the guest gets
    /// and how many breaks, or `None` if a command other than a break ran.
    fn qemu_reads(input: &[u8]) -> Option<(Vec<u8>, usize)> {
        let (mut guest, mut breaks, mut escaped) = (Vec::new(), 0, false);
        for &byte in input {
            if std::mem::take(&mut escaped) {
                match byte {
                    ESCAPE => guest.push(byte),
                    b'b' => breaks += 1,
                    _ => return None,
                }
            } else if byte == ESCAPE {
                escaped = true;
            } else {
                guest.push(byte);
            }
        }
        Some((guest, breaks))
    }

    #[test]
    fn every_key_reaches_the_guest_and_no_command_runs() {
        let every: Vec<u8> = (0..=255).chain([1, 1, b'x', 1, b'b', 1]).collect();
        let escaped = escape(Bytes::from(every.clone()));
        assert_eq!(qemu_reads(&escaped), Some((every, 0)));
        let with_break = [&escape(Bytes::from_static(b"\x01x"))[..], &BREAK, b"h"].concat();
        assert_eq!(qemu_reads(&with_break), Some((b"\x01xh".to_vec(), 1)));
        assert_eq!(&escape(Bytes::from_static(b"ab"))[..], b"ab");
    }

    #[test]
    fn pieces_fit_and_half_written_sequences_are_seen() {
        assert_eq!(fitting(b"\x01\x01\x01", 4), 2);
        assert_eq!(fitting(b"\x01\x01\x01", 1), 1);
        assert_eq!(fitting(b"abc", 2), 2);
        assert_eq!(fitting(b"abc", 9), 3);
        assert!(ends_half(false, b"a\x01"));
        assert!(!ends_half(false, b"a\x01\x01"));
        assert!(!ends_half(true, b"\x01"));
        assert!(ends_half(true, b"\x01\x01"));
        assert!(ends_half(false, &BREAK[..1]));
        assert!(!ends_half(false, &BREAK));
        // Any cut of escaped input: the half flag says exactly whether the cut is inside a pair.
        let wire = escape(Bytes::from_static(b"a\x01\x01b\x01"));
        for cut in 0..=wire.len() {
            let half = ends_half(false, &wire[..cut]);
            let prefix_ok = qemu_reads(&wire[..cut]).is_some();
            assert!(prefix_ok);
            let completed = if half {
                [&wire[..cut], &wire[cut..=cut]].concat()
            } else {
                wire[..cut].to_vec()
            };
            // Completed, the prefix leaves QEMU outside a command.
            assert!(!ends_half(false, &completed), "cut {cut}");
        }
    }
}
