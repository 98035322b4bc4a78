//! The telnet framing of a guest connection whose QEMU chardev has `telnet=on`: what carries a
//! serial BREAK over a socket (docs/consoles.md, "Serial BREAK").
//!
//! What QEMU's socket chardev does in telnet mode (chardev/char-socket.c, unchanged from QEMU
//! 2.x to 9.x, checked with QEMU 7.2 by tests/external/qemu_guest.rs):
//! - On each new connection, before any guest output, it sends exactly four option commands:
//!   `IAC WILL ECHO`, `IAC WILL SGA`, `IAC WILL BINARY`, `IAC DO BINARY` (12 bytes). It needs no
//!   answer: it goes on as soon as they are written, and swallows any answer as a three-byte
//!   command.
//! - Guest output follows **unescaped**: a 0xFF the guest prints arrives as one 0xFF. So after
//!   the four commands, every byte is the guest's and is logged as it is; un-escaping `IAC IAC`
//!   there would change what the guest printed.
//! - Input: `IAC IAC` is one 0xFF for the guest, `IAC BREAK` (255 243) a serial BREAK, and `IAC`
//!   followed by any other byte swallows that byte and the next.
//!
//! So [`GuestDecoder`] strips the leading option commands of a connection (at most four, split
//! across reads anywhere) and passes everything after them untouched; [`escape`] doubles 0xFF
//! in input; [`BREAK`] is the break. This module never does I/O and never panics on any input.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Interpret As Command.
pub const IAC: u8 = 255;
/// `IAC BREAK`: a serial BREAK.
pub const BREAK: [u8; 2] = [IAC, 243];
/// The option commands (WILL, WONT, DO, DONT): three bytes with their option.
const OPTION_COMMANDS: std::ops::RangeInclusive<u8> = 251..=254;
/// Option commands QEMU sends when a connection opens (`tcp_chr_telnet_init`).
const PREAMBLE_COMMANDS: u8 = 4;

/// What conlogd speaks on a console's guest socket: fixed when the console is created, kept
/// in its stream record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Raw bytes both ways (QEMU's socket chardev without `telnet=on`); no serial BREAK.
    #[default]
    Raw,
    /// QEMU's `telnet=on`: a serial BREAK is `IAC BREAK`.
    Telnet,
}

impl Protocol {
    /// "raw" or "telnet", as in the stream record and the messages.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Raw => "raw",
            Protocol::Telnet => "telnet",
        }
    }
}

/// Where a connection's output is: still in QEMU's opening option commands, or past them.
/// Carried across an upgrade with the connection (`crate::upgrade::FrozenConsole`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestDecoder {
    /// Option commands seen so far, and the bytes of one not complete yet (at most two).
    Opening { commands: u8, partial: Vec<u8> },
    /// Every byte is the guest's.
    Data,
}

impl Default for GuestDecoder {
    fn default() -> Self {
        Self::Opening {
            commands: 0,
            partial: Vec::new(),
        }
    }
}

impl GuestDecoder {
    /// The guest's bytes in `input`: bytes held from an earlier read that turned out not to be
    /// a command (at most two, only at the start of a connection), then the rest of `input`.
    pub fn filter<'a>(&mut self, input: &'a [u8]) -> (Vec<u8>, &'a [u8]) {
        let mut at = 0;
        while let GuestDecoder::Opening { commands, partial } = self {
            let Some(&byte) = input.get(at) else {
                return (Vec::new(), &[]);
            };
            let fits = match partial.len() {
                0 => byte == IAC,
                1 => OPTION_COMMANDS.contains(&byte),
                _ => true,
            };
            if !fits {
                // Not an option command: the guest's output has begun.
                let held = std::mem::take(partial);
                *self = GuestDecoder::Data;
                return (held, &input[at..]);
            }
            partial.push(byte);
            at += 1;
            if partial.len() == 3 {
                partial.clear();
                *commands += 1;
                if *commands >= PREAMBLE_COMMANDS {
                    *self = GuestDecoder::Data;
                }
            }
        }
        (Vec::new(), &input[at..])
    }
}

/// Input for the guest in telnet framing: every 0xFF doubled (no copy when there is none).
pub fn escape(data: Bytes) -> Bytes {
    let doubled = data.iter().filter(|&&b| b == IAC).count();
    if doubled == 0 {
        return data;
    }
    let mut out = Vec::with_capacity(data.len() + doubled);
    for &byte in data.iter() {
        out.push(byte);
        if byte == IAC {
            out.push(IAC);
        }
    }
    out.into()
}

/// How many bytes of `data` (taken from the front) escape to at most `max` bytes, at least one
/// when `data` is not empty (`max` ≥ 2).
pub fn fitting(data: &[u8], max: usize) -> usize {
    let mut size = 0;
    for (taken, &byte) in data.iter().enumerate() {
        size += if byte == IAC { 2 } else { 1 };
        if size > max {
            return taken.max(1);
        }
    }
    data.len()
}

/// Whether writing `written` (escaped bytes, or [`BREAK`]) after a point where `half` said
/// whether the last byte written began a two-byte sequence leaves a sequence begun: the next
/// byte written must then be its second byte, whatever happens to the rest of the input.
pub fn ends_half(mut half: bool, written: &[u8]) -> bool {
    for &byte in written {
        half = !half && byte == IAC;
    }
    half
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: [u8; 12] = [
        255, 251, 1, 255, 251, 3, 255, 251, 0, 255, 253, 0,
    ];

    fn run(decoder: &mut GuestDecoder, reads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for read in reads {
            let (held, rest) = decoder.filter(read);
            out.extend_from_slice(&held);
            out.extend_from_slice(rest);
        }
        out
    }

    #[test]
    fn strips_qemus_opening_split_anywhere_and_keeps_every_guest_byte() {
        let guest = b"\xff\xfb\x01login: \xff\xff\xff x";
        let mut whole = QEMU.to_vec();
        whole.extend_from_slice(guest);
        for cut in 0..=whole.len() {
            for cut2 in cut..=whole.len() {
                let mut decoder = GuestDecoder::default();
                let out = run(
                    &mut decoder,
                    &[&whole[..cut], &whole[cut..cut2], &whole[cut2..]],
                );
                assert_eq!(out, guest, "cut at {cut} and {cut2}");
                assert_eq!(decoder, GuestDecoder::Data);
            }
        }
        // One byte per read.
        let mut decoder = GuestDecoder::default();
        let reads: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(run(&mut decoder, &reads), guest);
    }

    #[test]
    fn a_peer_without_the_opening_loses_nothing() {
        for input in [
            &b"plain"[..],
            b"\xff",
            b"\xffA rest",
            b"\xff\xfb\x01\xff\xf3 after one command",
        ] {
            let mut decoder = GuestDecoder::default();
            let out = run(&mut decoder, &[input, b"!"]);
            let expected: Vec<u8> = match input {
                b"\xff\xfb\x01\xff\xf3 after one command" => b"\xff\xf3 after one command!".to_vec(),
                b"\xff" => b"\xff!".to_vec(),
                other => [other, b"!"].concat(),
            };
            assert_eq!(out, expected, "{input:?}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut decoder = GuestDecoder::default();
            let mut input = Vec::new();
            for _ in 0..(seed % 40) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                input.push(if seed % 3 == 0 { 255 } else { (seed >> 8) as u8 });
            }
            let cut = (seed as usize) % (input.len() + 1);
            let out = run(&mut decoder, &[&input[..cut], &input[cut..]]);
            assert!(out.len() <= input.len());
            assert_eq!(out, input[input.len() - out.len()..]);
        }
    }

    #[test]
    fn escapes_input_and_tracks_half_written_sequences() {
        assert_eq!(&escape(Bytes::from_static(b"ab"))[..], b"ab");
        assert_eq!(&escape(Bytes::from_static(b"a\xffb\xff"))[..], b"a\xff\xffb\xff\xff");
        assert_eq!(fitting(b"\xff\xff\xff", 4), 2);
        assert_eq!(fitting(b"\xff\xff\xff", 1), 1);
        assert_eq!(fitting(b"abc", 2), 2);
        assert!(ends_half(false, b"a\xff"));
        assert!(!ends_half(false, b"a\xff\xff"));
        assert!(!ends_half(true, b"\xff"));
        assert!(ends_half(true, b"\xff\xff"));
        assert!(ends_half(false, &BREAK[..1]));
        assert!(!ends_half(false, &BREAK));
    }
}
