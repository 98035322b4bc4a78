//! Neutralises the escape sequences that make a terminal answer, in output that is shown again
//! (a console's replay, history printed on a terminal).
//!
//! A guest's shell prints queries (`ESC[6n` after a prompt, device attributes, colour queries);
//! a terminal answers each one on its input. Live, that answer is the right reply to the guest,
//! as on a real serial line. Replayed, the same query makes the operator's terminal type an
//! answer into the guest (or into the operator's own shell after `conlogctl history`). This
//! module owns the streaming filter ([`QueryFilter`]) that removes those sequences; it never
//! changes any other byte, and it never decides what is replay and what is live (the caller
//! does, by offset: see `conlogctl console`).
//!
//! Neutralised sequences are **dropped**: a terminal shows nothing for a query, so the screen
//! looks as it did when the bytes were first printed. Dropped:
//! - CSI queries: DSR / CPR (`CSI … n`, any prefix), device attributes DA1/DA2/DA3
//!   (`CSI c`, `CSI > c`, `CSI = c`), DECRQM (`CSI … $ p`), XTVERSION (`CSI > … q`), window
//!   reports (`CSI 11/13/14/15/16/18/19/20/21 … t`), DECREQTPARM (`CSI … x`), XTSMGRAPHICS
//!   (`CSI ? … S`), the kitty keyboard query (`CSI ? u`), DECRQTSR / DECRQPSR (`CSI … $ u`,
//!   `CSI … $ w`), DECRQCRA (`CSI … * y`), XTQMODKEYS (`CSI ? … m`), XTREPORTSGR (`CSI … # |`);
//!   and malformed CSI sequences (a terminal ignores them).
//! - `ESC Z` (DECID) and ENQ (0x05, the answerback request).
//! - Every DCS, APC, PM and SOS string (`ESC P`, `ESC _`, `ESC ^`, `ESC X` … `ESC \`): they
//!   carry DECRQSS (`DCS $ q`), XTGETTCAP (`DCS + q`), kitty graphics queries and multiplexer
//!   pass-through wrappers that can carry any query to an outer terminal.
//! - OSC strings with a query field: a `;`-separated field that is `?` or ends in `=?` (colour
//!   queries `OSC 4;n;?`, `OSC 10/11/12;?`, the clipboard read `OSC 52;c;?`, kitty's
//!   `key=?`), iTerm2's `OSC 1337;Report…`/`RequestUpload`, and OSC strings longer than
//!   [`MAX_STRING`] (never a query a terminal would answer whole, but not worth the risk).
//!
//! C0 controls inside a CSI sequence are executed by terminals as they arrive and so are kept
//! even when the sequence around them is dropped. A sequence split across chunks is held back
//! (at most [`MAX_STRING`] bytes for an OSC string, [`MAX_CSI`] for a CSI) until it is complete.
//!
//! C1 controls: a lone 8-bit byte (0x9b, 0x90, …) is not an introducer (UTF-8 terminals read it
//! as part of a character), but a C1 control *encoded in UTF-8* (`C2 9B` for U+009B CSI, `C2 9D`
//! OSC, `C2 90` DCS, `C2 98`/`C2 9E`/`C2 9F` SOS/PM/APC, `C2 9C` ST) is one for terminals that
//! parse code points, xterm.js among them: `C2 9B 6 n` makes xterm.js report the cursor. Those
//! are judged exactly as their `ESC` forms; `C2 9A` (DECID) is dropped as `ESC Z` is; any other
//! C1 control ends a held sequence (dropped) and is shown. The same rules are in the console
//! page's filter (`web/src/terminal_safety.ts`); both meet the test vectors in
//! `tests/data/terminal_queries.json`.

/// Longest OSC string kept (bytes after `ESC ]`); a longer one is dropped whole.
pub(crate) const MAX_STRING: usize = 4096;
/// Longest CSI sequence kept; a longer one is dropped whole.
pub(crate) const MAX_CSI: usize = 256;

const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;
const ENQ: u8 = 0x05;
const CAN: u8 = 0x18;
const SUB: u8 = 0x1a;
/// The UTF-8 lead byte of U+0080..U+00BF: `C2 80`..`C2 9F` are the C1 controls.
const C2: u8 = 0xc2;
/// C1 controls (the second byte of their UTF-8 form).
const C1_DCS: u8 = 0x90;
const C1_SOS: u8 = 0x98;
const C1_DECID: u8 = 0x9a;
const C1_CSI: u8 = 0x9b;
const C1_ST: u8 = 0x9c;
const C1_OSC: u8 = 0x9d;
const C1_PM: u8 = 0x9e;
const C1_APC: u8 = 0x9f;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ground,
    /// After ESC; `raw` holds ESC.
    Escape,
    /// ESC followed by intermediates (0x20–0x2F); `raw` holds them.
    EscapeIntermediate,
    /// After `ESC [`: `raw` holds everything, `seq` the bytes after `ESC [` minus controls.
    Csi,
    /// After `ESC ]`: `seq` holds the payload; `raw` the whole string.
    Osc {
        esc: bool,
        oversize: bool,
    },
    /// Inside a DCS/APC/PM/SOS string, which is dropped whole; `esc` after an ESC.
    DroppedString {
        esc: bool,
    },
}

/// A streaming filter: feed chunks with [`QueryFilter::push`], in order.
#[derive(Debug)]
pub struct QueryFilter {
    state: State,
    raw: Vec<u8>,
    seq: Vec<u8>,
    /// C0 controls seen inside the current CSI (kept when it is dropped).
    controls: Vec<u8>,
    /// A `C2` byte held: with the next byte it may be a C1 control.
    c2: bool,
}

impl Default for QueryFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl QueryFilter {
    pub fn new() -> Self {
        Self {
            state: State::Ground,
            raw: Vec::new(),
            seq: Vec::new(),
            controls: Vec::new(),
            c2: false,
        }
    }

    /// Filters `input`, appending what may be shown to `out`. Bytes of an unfinished sequence
    /// are held until a later call completes it.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &byte in input {
            self.byte(byte, out);
        }
    }

    /// Convenience: filters one chunk into a new vector.
    #[cfg(test)]
    pub(crate) fn filter(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        self.push(input, &mut out);
        out
    }

    /// Bytes held for an unfinished sequence (not yet shown).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.raw.len() + usize::from(self.c2)
    }

    /// Ends filtering: returns the bytes held for an unfinished sequence (they go on in output
    /// that is not filtered, e.g. live output after a replay) and starts afresh.
    pub fn take_pending(&mut self) -> Vec<u8> {
        let mut held = std::mem::take(&mut self.raw);
        match self.state {
            State::Osc {
                esc: true,
                oversize: false,
            } => held.push(ESC),
            State::Osc { oversize: true, .. } | State::DroppedString { .. } => held.clear(),
            _ => {}
        }
        let dropped = matches!(
            self.state,
            State::Osc { oversize: true, .. } | State::DroppedString { .. }
        );
        if self.c2 && !dropped {
            held.push(C2);
        }
        self.c2 = false;
        self.reset();
        held
    }

    fn reset(&mut self) {
        self.state = State::Ground;
        self.raw.clear();
        self.seq.clear();
        self.controls.clear();
    }

    fn start_escape(&mut self) {
        self.reset();
        self.state = State::Escape;
        self.raw.push(ESC);
    }

    /// One input byte: a `C2` is held until the next byte says whether the two are a C1
    /// control.
    fn byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        if self.c2 {
            self.c2 = false;
            if (0x80..=0x9f).contains(&byte) {
                self.c1(byte, out);
                return;
            }
            self.step(C2, out);
        }
        if byte == C2 {
            self.c2 = true;
        } else {
            self.step(byte, out);
        }
    }

    /// A C1 control encoded in UTF-8 (`C2 code`), in any state.
    fn c1(&mut self, code: u8, out: &mut Vec<u8>) {
        match (self.state, code) {
            (
                State::Osc {
                    esc: false,
                    oversize,
                },
                C1_ST,
            ) => return self.finish_osc(oversize, &[C2, C1_ST], out),
            (State::DroppedString { esc: false }, C1_ST) => return self.reset(),
            _ => {}
        }
        // Anything held is aborted (dropped); controls inside a CSI were executed, so shown.
        if self.state == State::Csi {
            out.extend_from_slice(&self.controls);
        }
        self.reset();
        match code {
            C1_CSI => {
                self.raw.extend_from_slice(&[C2, code]);
                self.state = State::Csi;
            }
            C1_OSC => {
                self.raw.extend_from_slice(&[C2, code]);
                self.state = State::Osc {
                    esc: false,
                    oversize: false,
                };
            }
            C1_DCS | C1_SOS | C1_PM | C1_APC => self.state = State::DroppedString { esc: false },
            C1_DECID => {}
            _ => out.extend_from_slice(&[C2, code]),
        }
    }

    /// One byte through the state machine.
    fn step(&mut self, byte: u8, out: &mut Vec<u8>) {
        match self.state {
            State::Ground => match byte {
                ESC => self.start_escape(),
                ENQ => {}
                _ => out.push(byte),
            },
            State::Escape | State::EscapeIntermediate => match byte {
                b'[' if self.state == State::Escape => {
                    self.raw.push(byte);
                    self.state = State::Csi;
                }
                b']' if self.state == State::Escape => {
                    self.raw.push(byte);
                    self.state = State::Osc {
                        esc: false,
                        oversize: false,
                    };
                }
                b'P' | b'_' | b'^' | b'X' if self.state == State::Escape => {
                    self.reset();
                    self.state = State::DroppedString { esc: false };
                }
                b'Z' if self.state == State::Escape => self.reset(),
                ESC => self.start_escape(),
                CAN | SUB => self.abort(byte, out),
                0x20..=0x2f => {
                    self.raw.push(byte);
                    self.state = State::EscapeIntermediate;
                    if self.raw.len() > MAX_CSI {
                        self.abort_silently();
                    }
                }
                0x00..=0x1f => {
                    // Executed by the terminal without leaving the escape.
                    if byte != ENQ {
                        out.push(byte);
                    }
                }
                _ => {
                    out.extend_from_slice(&self.raw);
                    out.push(byte);
                    self.reset();
                }
            },
            State::Csi => match byte {
                ESC => {
                    // Aborts the sequence; the terminal acts on none of it.
                    out.extend_from_slice(&self.controls);
                    self.start_escape();
                }
                CAN | SUB => {
                    out.extend_from_slice(&self.controls);
                    self.abort(byte, out);
                }
                0x00..=0x1f => {
                    if byte != ENQ {
                        self.raw.push(byte);
                        self.controls.push(byte);
                    }
                }
                0x40..=0x7e => {
                    self.seq.push(byte);
                    self.raw.push(byte);
                    if self.raw.len() <= MAX_CSI && !csi_is_query(&self.seq) {
                        out.extend_from_slice(&self.raw);
                    } else {
                        out.extend_from_slice(&self.controls);
                    }
                    self.reset();
                }
                _ => {
                    // Parameters, intermediates, DEL and anything else: held.
                    self.seq.push(byte);
                    self.raw.push(byte);
                    if self.raw.len() > MAX_CSI {
                        // Too long to be shown: what is held is dropped, and so is the rest up
                        // to the final byte (controls inside are still shown).
                        out.extend_from_slice(&std::mem::take(&mut self.controls));
                        self.raw.truncate(MAX_CSI + 1);
                        self.seq.truncate(MAX_CSI + 1);
                    }
                }
            },
            State::Osc { esc, oversize } => {
                if esc {
                    if byte == b'\\' {
                        self.finish_osc(oversize, &[ESC, b'\\'], out);
                    } else {
                        // Aborted: dropped, and a new escape begins.
                        self.start_escape();
                        self.step(byte, out);
                    }
                    return;
                }
                match byte {
                    BEL => self.finish_osc(oversize, &[BEL], out),
                    ESC => {
                        self.state = State::Osc {
                            esc: true,
                            oversize,
                        }
                    }
                    CAN | SUB => self.abort(byte, out),
                    _ if oversize => {}
                    _ => {
                        self.raw.push(byte);
                        self.seq.push(byte);
                        if self.seq.len() > MAX_STRING {
                            self.raw.clear();
                            self.seq.clear();
                            self.state = State::Osc {
                                esc: false,
                                oversize: true,
                            };
                        }
                    }
                }
            }
            State::DroppedString { esc } => match (esc, byte) {
                (true, b'\\') => self.reset(),
                // A doubled ESC is an escaped ESC in a multiplexer's pass-through string.
                (true, ESC) => self.state = State::DroppedString { esc: false },
                (true, _) => {
                    self.start_escape();
                    self.step(byte, out);
                }
                (false, ESC) => self.state = State::DroppedString { esc: true },
                (false, CAN | SUB) => self.abort(byte, out),
                (false, _) => {}
            },
        }
    }

    /// CAN or SUB ends the held sequence without effect: it is dropped and the byte shown (SUB
    /// shows a substitute character on some terminals, as it did when first printed).
    fn abort(&mut self, byte: u8, out: &mut Vec<u8>) {
        out.push(byte);
        self.reset();
    }

    fn abort_silently(&mut self) {
        self.reset();
    }

    /// Decides a complete OSC string: shown (with its terminator) unless it is a query or
    /// oversized.
    fn finish_osc(&mut self, oversize: bool, terminator: &[u8], out: &mut Vec<u8>) {
        if !oversize && !osc_is_query(&self.seq) {
            out.extend_from_slice(&self.raw);
            out.extend_from_slice(terminator);
        }
        self.reset();
    }
}

/// Whether a complete CSI sequence (the bytes after `ESC [`, controls removed) makes a terminal
/// answer, or is malformed.
fn csi_is_query(seq: &[u8]) -> bool {
    let Some((&last, body)) = seq.split_last() else {
        return true;
    };
    let (prefix, body) = match body.first() {
        Some(&p @ (b'<' | b'=' | b'>' | b'?')) => (Some(p), &body[1..]),
        _ => (None, body),
    };
    let params_end = body
        .iter()
        .position(|b| !matches!(b, b'0'..=b'9' | b';' | b':'))
        .unwrap_or(body.len());
    let (params, intermediates) = body.split_at(params_end);
    if !intermediates.iter().all(|b| (0x20..=0x2f).contains(b)) {
        return true; // malformed: parameters after intermediates, private bytes inside
    }
    let first: Option<u32> = params
        .split(|b| *b == b';' || *b == b':')
        .next()
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(|p| p.parse().ok());
    match (prefix, intermediates, last) {
        (_, [], b'n') => true,
        (None | Some(b'>') | Some(b'='), [], b'c') => true,
        (_, b"$", b'p') => true,
        (Some(b'>'), [], b'q') => true,
        (None, [], b't') => matches!(first, Some(11 | 13 | 14 | 15 | 16 | 18 | 19 | 20 | 21)),
        (None, [], b'x') => true,
        (Some(b'?'), [], b'S' | b'u' | b'm') => true,
        (_, b"$", b'u' | b'w') => true,
        (_, b"*", b'y') => true,
        (_, b"#", b'|') => true,
        _ => false,
    }
}

/// Whether an OSC payload (the bytes between `ESC ]` and its terminator) is a query.
fn osc_is_query(payload: &[u8]) -> bool {
    if payload.starts_with(b"1337;Report") || payload.starts_with(b"1337;RequestUpload") {
        return true;
    }
    payload
        .split(|b| *b == b';')
        .any(|field| field == b"?" || field.ends_with(b"=?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every split of `input` into two chunks (and byte by byte) gives `expected`.
    fn check(input: &[u8], expected: &[u8]) {
        let whole = QueryFilter::new().filter(input);
        assert_eq!(
            whole.escape_ascii().to_string(),
            expected.escape_ascii().to_string(),
            "input {}",
            input.escape_ascii()
        );
        for at in 0..=input.len() {
            let mut filter = QueryFilter::new();
            let mut out = filter.filter(&input[..at]);
            out.extend(filter.filter(&input[at..]));
            assert_eq!(
                out.escape_ascii().to_string(),
                expected.escape_ascii().to_string(),
                "input {} split at {at}",
                input.escape_ascii()
            );
        }
        let mut filter = QueryFilter::new();
        let mut out = Vec::new();
        for byte in input {
            filter.push(std::slice::from_ref(byte), &mut out);
        }
        assert_eq!(out, expected, "byte by byte: {}", input.escape_ascii());
    }

    /// The shared test vectors (`tests/data/terminal_queries.json`), which the console page's
    /// filter (`web/src/terminal_safety.ts`) is checked against too.
    const VECTORS: &str = include_str!("../tests/data/terminal_queries.json");

    struct Vectors {
        doc: serde_json::Value,
    }

    impl Vectors {
        fn load() -> Self {
            Self {
                doc: serde_json::from_str(VECTORS).expect("tests/data/terminal_queries.json"),
            }
        }

        /// A list of byte strings (one character per byte).
        fn list(&self, key: &str) -> Vec<Vec<u8>> {
            let list = self.doc[key]
                .as_array()
                .unwrap_or_else(|| panic!("no {key}"));
            assert!(!list.is_empty(), "{key} is empty");
            list.iter().map(bytes).collect()
        }
    }

    /// A vector string as bytes: each character is one byte (U+0000..U+00FF).
    fn bytes(value: &serde_json::Value) -> Vec<u8> {
        let text = value
            .as_str()
            .unwrap_or_else(|| panic!("not a string: {value}"));
        text.chars()
            .map(|c| {
                u8::try_from(u32::from(c))
                    .unwrap_or_else(|_| panic!("{c:?} is not a byte in {text:?}"))
            })
            .collect()
    }

    #[test]
    fn every_query_is_dropped_whole_at_every_split() {
        for query in Vectors::load().list("queries") {
            let mut input = b"ab".to_vec();
            input.extend_from_slice(&query);
            input.extend_from_slice(b"cd\r\n");
            check(&input, b"abcd\r\n");
        }
    }

    #[test]
    fn ordinary_sequences_pass_unchanged_at_every_split() {
        for sequence in Vectors::load().list("ordinary") {
            let mut input = b"x".to_vec();
            input.extend_from_slice(&sequence);
            input.extend_from_slice(b"y");
            check(&input, &input);
        }
    }

    #[test]
    fn every_case_gives_its_output_at_every_split() {
        let vectors = Vectors::load();
        let cases = vectors.doc["cases"].as_array().expect("cases");
        assert!(!cases.is_empty());
        for case in cases {
            check(&bytes(&case["input"]), &bytes(&case["output"]));
        }
    }

    #[test]
    fn limits_are_the_shared_ones() {
        let vectors = Vectors::load();
        assert_eq!(vectors.doc["limits"]["max_string"], MAX_STRING);
        assert_eq!(vectors.doc["limits"]["max_csi"], MAX_CSI);
    }

    #[test]
    fn oversized_strings_are_dropped_and_bounded() {
        let mut input = b"\x1b]52;c;".to_vec();
        input.extend(std::iter::repeat_n(b'A', MAX_STRING * 2));
        input.extend_from_slice(b"\x07after");
        let mut filter = QueryFilter::new();
        let mut out = Vec::new();
        for chunk in input.chunks(1000) {
            filter.push(chunk, &mut out);
            assert!(filter.pending() <= MAX_STRING + 16);
        }
        assert_eq!(out, b"after");
        let mut input = b"\x1b[".to_vec();
        input.extend(std::iter::repeat_n(b'1', MAX_CSI * 10));
        input.extend_from_slice(b"nafter");
        let mut filter = QueryFilter::new();
        let mut out = Vec::new();
        for chunk in input.chunks(100) {
            filter.push(chunk, &mut out);
            assert!(filter.pending() <= MAX_CSI * 4 + 1);
        }
        assert_eq!(out, b"after");
    }
}
