// Neutralises the escape sequences that make a terminal answer, in output the page shows again
// (the last screen read from history, output filled in from history after a reconnect or a
// skip). xterm.js answers queries (cursor position, device attributes, colour queries, …) on
// its input, and the page sends its input to the guest: replayed queries would type answers
// into the guest. Live output is never filtered, so a query the guest prints now is answered as
// on a real serial line. This module never decides what is replayed and what is live: the
// session does, by offset (see session.ts).
//
// This is the same filter as conlogd's `src/terminal_safety.rs` (conlogctl uses that one), byte
// for byte: both are checked against one set of test vectors, tests/data/terminal_queries.json
// (`cargo test --lib terminal_safety` and `node web/test/terminal_safety.test.mjs`). Change
// both and the vectors together. The rules, in short: every CSI query (DSR/CPR, DA1/DA2/DA3,
// DECRQM, XTVERSION, window reports, …) and malformed CSI, `ESC Z`, ENQ, every DCS/APC/PM/SOS
// string, and OSC strings with a query field (`?` or `…=?`) are dropped whole; C0 controls
// inside a dropped CSI are kept (terminals execute them); a sequence split across chunks is held
// back, bounded by MAX_STRING and MAX_CSI. C1 controls encoded in UTF-8 (`C2 9B` CSI, `C2 9D`
// OSC, `C2 90` DCS, …) are introducers too: xterm.js parses code points, so `C2 9B 6 n` makes it
// report the cursor; they are judged as their ESC forms (a lone 8-bit byte is not).

/** Longest OSC string kept (bytes after `ESC ]`); a longer one is dropped whole. */
export const MAX_STRING = 4096;
/** Longest CSI sequence kept; a longer one is dropped whole. */
export const MAX_CSI = 256;

const ESC = 0x1b;
const BEL = 0x07;
const ENQ = 0x05;
const CAN = 0x18;
const SUB = 0x1a;
const BACKSLASH = 0x5c;
/** The UTF-8 lead byte of U+0080..U+00BF: `C2 80`..`C2 9F` are the C1 controls. */
const C2 = 0xc2;
const C1_DCS = 0x90;
const C1_SOS = 0x98;
const C1_DECID = 0x9a;
const C1_CSI = 0x9b;
const C1_ST = 0x9c;
const C1_OSC = 0x9d;
const C1_PM = 0x9e;
const C1_APC = 0x9f;

const enum State {
  Ground,
  /** After ESC; `raw` holds ESC. */
  Escape,
  /** ESC followed by intermediates (0x20–0x2F); `raw` holds them. */
  EscapeIntermediate,
  /** After `ESC [`: `raw` holds everything, `seq` the bytes after `ESC [` minus controls. */
  Csi,
  /** After `ESC ]`: `seq` holds the payload, `raw` the whole string. */
  Osc,
  /** Inside a DCS/APC/PM/SOS string, which is dropped whole. */
  DroppedString,
}

/** A growable byte buffer. */
class Bytes {
  private buffer: Uint8Array;
  length = 0;

  constructor(capacity = 64) {
    this.buffer = new Uint8Array(capacity);
  }

  push(byte: number): void {
    if (this.length === this.buffer.length) {
      const grown = new Uint8Array(this.buffer.length * 2);
      grown.set(this.buffer);
      this.buffer = grown;
    }
    this.buffer[this.length++] = byte;
  }

  extend(bytes: Bytes | ArrayLike<number>): void {
    const view = bytes instanceof Bytes ? bytes.view() : bytes;
    for (let i = 0; i < view.length; i++) this.push(view[i]);
  }

  view(): Uint8Array {
    return this.buffer.subarray(0, this.length);
  }

  take(): Uint8Array {
    const out = this.view().slice();
    this.length = 0;
    return out;
  }

  clear(): void {
    this.length = 0;
  }

  truncate(length: number): void {
    this.length = Math.min(this.length, length);
  }
}

/** A streaming filter: feed chunks with `push`, in order. */
export class QueryFilter {
  private state = State.Ground;
  /** In State.Osc and State.DroppedString: after an ESC (a terminator may follow). */
  private esc = false;
  /** In State.Osc: the string outgrew MAX_STRING and is dropped. */
  private oversize = false;
  private readonly raw = new Bytes();
  private readonly seq = new Bytes();
  /** C0 controls seen inside the current CSI (kept when it is dropped). */
  private readonly controls = new Bytes();
  /** A `C2` byte held: with the next byte it may be a C1 control. */
  private c2 = false;
  private out = new Bytes();

  /** Filters `input`; returns what may be shown. Bytes of an unfinished sequence are held
   * until a later call completes it. */
  push(input: Uint8Array): Uint8Array {
    this.out = new Bytes(Math.max(16, input.length));
    for (let i = 0; i < input.length; i++) this.byte(input[i]);
    return this.out.view();
  }

  /** Bytes held for an unfinished sequence (not yet shown). */
  get pending(): number {
    return this.raw.length + (this.c2 ? 1 : 0);
  }

  /** Ends filtering: returns the bytes held for an unfinished sequence (they go on in output
   * that is not filtered, e.g. live output after a replay) and starts afresh. */
  takePending(): Uint8Array {
    const held = new Bytes();
    held.extend(this.raw);
    if (this.state === State.Osc && this.esc && !this.oversize) held.push(ESC);
    const dropped = (this.state === State.Osc && this.oversize) || this.state === State.DroppedString;
    if (dropped) held.clear();
    if (this.c2 && !dropped) held.push(C2);
    this.c2 = false;
    this.reset();
    return held.view();
  }

  private reset(): void {
    this.state = State.Ground;
    this.esc = false;
    this.oversize = false;
    this.raw.clear();
    this.seq.clear();
    this.controls.clear();
  }

  private startEscape(): void {
    this.reset();
    this.state = State.Escape;
    this.raw.push(ESC);
  }

  /** One input byte: a `C2` is held until the next byte says whether the two are a C1 control. */
  private byte(byte: number): void {
    if (this.c2) {
      this.c2 = false;
      if (byte >= 0x80 && byte <= 0x9f) {
        this.c1(byte);
        return;
      }
      this.step(C2);
    }
    if (byte === C2) this.c2 = true;
    else this.step(byte);
  }

  /** A C1 control encoded in UTF-8 (`C2 code`), in any state. */
  private c1(code: number): void {
    if (code === C1_ST && !this.esc) {
      if (this.state === State.Osc) return this.finishOsc([C2, C1_ST]);
      if (this.state === State.DroppedString) return this.reset();
    }
    // Anything held is aborted (dropped); controls inside a CSI were executed, so shown.
    if (this.state === State.Csi) this.out.extend(this.controls);
    this.reset();
    if (code === C1_CSI) {
      this.raw.extend([C2, code]);
      this.state = State.Csi;
    } else if (code === C1_OSC) {
      this.raw.extend([C2, code]);
      this.state = State.Osc;
    } else if (code === C1_DCS || code === C1_SOS || code === C1_PM || code === C1_APC) {
      this.state = State.DroppedString;
    } else if (code !== C1_DECID) {
      this.out.extend([C2, code]);
    }
  }

  /** One byte through the state machine. */
  private step(byte: number): void {
    const out = this.out;
    switch (this.state) {
      case State.Ground:
        if (byte === ESC) this.startEscape();
        else if (byte !== ENQ) out.push(byte);
        return;
      case State.Escape:
      case State.EscapeIntermediate: {
        const plain = this.state === State.Escape;
        if (plain && byte === 0x5b /* [ */) {
          this.raw.push(byte);
          this.state = State.Csi;
        } else if (plain && byte === 0x5d /* ] */) {
          this.raw.push(byte);
          this.state = State.Osc;
          this.esc = false;
          this.oversize = false;
        } else if (plain && (byte === 0x50 || byte === 0x5f || byte === 0x5e || byte === 0x58)) {
          // P _ ^ X: DCS, APC, PM, SOS.
          this.reset();
          this.state = State.DroppedString;
        } else if (plain && byte === 0x5a /* Z */) {
          this.reset();
        } else if (byte === ESC) {
          this.startEscape();
        } else if (byte === CAN || byte === SUB) {
          this.abort(byte);
        } else if (byte >= 0x20 && byte <= 0x2f) {
          this.raw.push(byte);
          this.state = State.EscapeIntermediate;
          if (this.raw.length > MAX_CSI) this.reset();
        } else if (byte <= 0x1f) {
          // Executed by the terminal without leaving the escape.
          if (byte !== ENQ) out.push(byte);
        } else {
          out.extend(this.raw);
          out.push(byte);
          this.reset();
        }
        return;
      }
      case State.Csi:
        if (byte === ESC) {
          // Aborts the sequence; the terminal acts on none of it.
          out.extend(this.controls);
          this.startEscape();
        } else if (byte === CAN || byte === SUB) {
          out.extend(this.controls);
          this.abort(byte);
        } else if (byte <= 0x1f) {
          if (byte !== ENQ) {
            this.raw.push(byte);
            this.controls.push(byte);
          }
        } else if (byte >= 0x40 && byte <= 0x7e) {
          this.seq.push(byte);
          this.raw.push(byte);
          if (this.raw.length <= MAX_CSI && !csiIsQuery(this.seq.view())) {
            out.extend(this.raw);
          } else {
            out.extend(this.controls);
          }
          this.reset();
        } else {
          // Parameters, intermediates, DEL and anything else: held.
          this.seq.push(byte);
          this.raw.push(byte);
          if (this.raw.length > MAX_CSI) {
            // Too long to be shown: what is held is dropped, and so is the rest up to the
            // final byte (controls inside are still shown).
            out.extend(this.controls);
            this.controls.clear();
            this.raw.truncate(MAX_CSI + 1);
            this.seq.truncate(MAX_CSI + 1);
          }
        }
        return;
      case State.Osc:
        if (this.esc) {
          if (byte === BACKSLASH) {
            this.finishOsc([ESC, BACKSLASH]);
          } else {
            // Aborted: dropped, and a new escape begins.
            this.startEscape();
            this.step(byte);
          }
          return;
        }
        if (byte === BEL) {
          this.finishOsc([BEL]);
        } else if (byte === ESC) {
          this.esc = true;
        } else if (byte === CAN || byte === SUB) {
          this.abort(byte);
        } else if (!this.oversize) {
          this.raw.push(byte);
          this.seq.push(byte);
          if (this.seq.length > MAX_STRING) {
            this.raw.clear();
            this.seq.clear();
            this.oversize = true;
          }
        }
        return;
      case State.DroppedString:
        if (this.esc) {
          if (byte === BACKSLASH) {
            this.reset();
          } else if (byte === ESC) {
            // A doubled ESC is an escaped ESC in a multiplexer's pass-through string.
            this.esc = false;
          } else {
            this.startEscape();
            this.step(byte);
          }
        } else if (byte === ESC) {
          this.esc = true;
        } else if (byte === CAN || byte === SUB) {
          this.abort(byte);
        }
        return;
    }
  }

  /** CAN or SUB ends the held sequence without effect: it is dropped and the byte shown. */
  private abort(byte: number): void {
    this.out.push(byte);
    this.reset();
  }

  /** Decides a complete OSC string: shown (with its terminator) unless it is a query or
   * oversized. */
  private finishOsc(terminator: number[]): void {
    if (!this.oversize && !oscIsQuery(this.seq.view())) {
      this.out.extend(this.raw);
      this.out.extend(terminator);
    }
    this.reset();
  }
}

const isDigitOrSeparator = (b: number) => (b >= 0x30 && b <= 0x39) || b === 0x3b || b === 0x3a;
const ascii = (bytes: Uint8Array) => String.fromCharCode(...bytes);

/** Whether a complete CSI sequence (the bytes after `ESC [`, controls removed) makes a terminal
 * answer, or is malformed. */
function csiIsQuery(seq: Uint8Array): boolean {
  if (seq.length === 0) return true;
  const last = String.fromCharCode(seq[seq.length - 1]);
  let body = seq.subarray(0, seq.length - 1);
  let prefix = "";
  if (body.length && [0x3c, 0x3d, 0x3e, 0x3f].includes(body[0])) {
    prefix = String.fromCharCode(body[0]);
    body = body.subarray(1);
  }
  let paramsEnd = body.findIndex((b) => !isDigitOrSeparator(b));
  if (paramsEnd < 0) paramsEnd = body.length;
  const params = body.subarray(0, paramsEnd);
  const intermediates = body.subarray(paramsEnd);
  if (!intermediates.every((b) => b >= 0x20 && b <= 0x2f)) {
    return true; // malformed: parameters after intermediates, private bytes inside
  }
  const firstText = ascii(params).split(/[;:]/)[0];
  const first = /^[0-9]+$/.test(firstText) && firstText.length <= 10 ? Number(firstText) : undefined;
  const inter = ascii(intermediates);
  if (inter === "") {
    if (last === "n") return true;
    if (last === "c" && (prefix === "" || prefix === ">" || prefix === "=")) return true;
    if (last === "q" && prefix === ">") return true;
    if (last === "t" && prefix === "") return first !== undefined && [11, 13, 14, 15, 16, 18, 19, 20, 21].includes(first);
    if (last === "x" && prefix === "") return true;
    if (prefix === "?" && (last === "S" || last === "u" || last === "m")) return true;
    return false;
  }
  if (inter === "$") return last === "p" || last === "u" || last === "w";
  if (inter === "*") return last === "y";
  if (inter === "#") return last === "|";
  return false;
}

/** Whether an OSC payload (the bytes between `ESC ]` and its terminator) is a query. */
function oscIsQuery(payload: Uint8Array): boolean {
  const text = ascii(payload);
  if (text.startsWith("1337;Report") || text.startsWith("1337;RequestUpload")) return true;
  return text.split(";").some((field) => field === "?" || field.endsWith("=?"));
}
