// One browser console session: WatchConsole for output, SendConsoleInput for keystrokes,
// ReadHistory for the last screen and for any range the live stream did not deliver.
//
// Every byte the guest printed has an absolute offset (design section 2). `next` is the offset
// of the first byte the terminal has not shown yet: output below it is dropped (a replay after a
// reconnect, history read after attaching), output above it first fills the hole from history
// (a reconnect after an upgrade, a `lagged` skip). So the terminal shows each byte once, in
// order, whatever the connection does.
//
// Terminal safety (docs/consoles.md, "Terminal safety"): bytes the terminal shows again — the
// last screen read from history on the first attach, and every range filled in from history (a
// reconnect, a `lagged` skip) — go through a QueryFilter, so xterm.js never answers a replayed
// query (its answers are keystrokes the page would send to the guest). Live output frames are
// shown unchanged, so a query the guest prints now is answered as on a real serial line. The page
// attaches with replay_bytes 0: the attached offset is then exactly the first live byte, and
// everything before it comes from history, filtered.
//
// Times (docs/consoles.md, "Times on the page"): history is read with `marks`, so every byte
// read back has the time conlogd's index gives it (the entry covering it); the session tells
// the view the time of each line start before the line's bytes. Live output has no index time
// on the wire: its lines get the browser's clock when they arrive, flagged as such.

import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { Attach_Mode, Console, type Attached, type HistoryChunk } from "./gen/conlog/v1/console_pb";
import { QueryFilter } from "./terminal_safety";

export type ConnectionState = "connecting" | "live" | "reconnecting" | "ended";
export type Access = "unknown" | "read-write" | "read-only";
/** Why the page cannot type: the token is READ, another client holds the keyboard, or it was
 * taken from this page. */
export type ReadOnlyReason = "token" | "held" | "revoked";

/** When a line was logged. */
export interface LineTime {
  /** Nanoseconds since the Unix epoch, UTC. */
  nanos: bigint;
  /** From conlogd's index, recorded while the wall clock was behind (a backwards step). */
  approximate: boolean;
  /** Not from the index: the browser's clock when live output arrived. */
  live: boolean;
}

/** What the session shows; the page implements it. */
export interface View {
  /** Bytes (or a conlog notice) for the terminal. */
  write(data: Uint8Array | string): void;
  /** The next bytes written start a line logged at `time` (null: unknown). */
  lineTime(time: LineTime | null): void;
  connection(state: ConnectionState, detail: string): void;
  guest(connected: boolean): void;
  access(access: Access, reason: ReadOnlyReason | null, detail: string): void;
  /** Whether this page may send a serial BREAK now (it holds the keyboard of a console whose
   * QEMU chardev has mux=on). */
  serialBreak(available: boolean): void;
  notice(text: string): void;
  /** What the session did, for diagnostics (`window.conlog.events`). */
  event(what: string, detail: string): void;
  /** The guest moved to the node `to` (`host:port`): open the same console there, resuming
   * at `offset` (undefined: nothing was shown yet, open it afresh). */
  moved(to: string, offset: bigint | undefined): void;
}

export interface Options {
  /** Where the Console service is (the daemon serving the page, by default). */
  baseUrl: string;
  guest: string;
  device: string;
  token: string;
  /** Lines of history shown before live output. */
  tailLines: number;
  /** Open at this time (nanoseconds since the Unix epoch): history from the first byte logged
   * at or after it (at most `SINCE_BYTES`), then the last screen and live output. */
  since?: bigint;
  /** Resume at this offset (the page reopened on a guest's new node after a move): no last
   * screen; history from here up to the first live byte, then live output. */
  from?: bigint;
}

/** The node a moved status names and the offset the stream continues at there
 * (docs/operations.md, "When a guest moves"), or null for any other error. */
export function movedTo(error: ConnectError): { to: string; offset: bigint } | null {
  if (error.code !== Code.FailedPrecondition) return null;
  const to = error.metadata.get("conlog-moved-to")?.trim() ?? "";
  const offset = error.metadata.get("conlog-moved-offset")?.trim() ?? "";
  if (!/^[A-Za-z0-9.:_\[\]-]{1,255}$/.test(to) || !/^\d{1,20}$/.test(offset)) return null;
  return { to, offset: BigInt(offset) };
}

/** The most history shown from `since` before the last screen: the terminal keeps 10,000
 * lines, a longer read would only scroll out. */
const SINCE_BYTES = 2n << 20n;

/** A chunk's index entries (the first covers its first byte), as line times. */
type Marks = HistoryChunk["marks"];

function timeAt(marks: Marks, offset: bigint, chunk: HistoryChunk): LineTime | null {
  let found: LineTime | null = null;
  for (const mark of marks) {
    if (mark.offset > offset) break;
    found = { nanos: mark.unixNanos, approximate: mark.approximate, live: false };
  }
  if (!found && chunk.time) {
    found = {
      nanos: chunk.time.seconds * 1_000_000_000n + BigInt(chunk.time.nanos),
      approximate: false,
      live: false,
    };
  }
  return found;
}

/** Input kept while (re)connecting; typing more than this is refused with a notice. */
const MAX_PENDING_INPUT = 64 << 10;
const FIRST_RETRY_MS = 250;
/** A serial BREAK among the pending input. */
const BREAK = Symbol("serial BREAK");
const LAST_RETRY_MS = 5000;

/** How one WatchConsole call ended. */
type Outcome =
  | { kind: "retry"; attached: boolean; message: string }
  | { kind: "again" }
  | { kind: "final"; message: string };

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

export class ConsoleSession {
  private readonly client: Client<typeof Console>;
  /** Offset of the next byte the terminal needs; unknown until the first attach. */
  private next: bigint | undefined;
  private sessionId = "";
  private writer = false;
  /** Ask for the writer lease when attaching (false once the token proved read-only). */
  private wantWrite = true;
  private readOnly: ReadOnlyReason | null = null;
  private force = false;
  private current: AbortController | null = null;
  private restart = false;
  /** Input and serial BREAKs not sent yet, in the order they were asked for. */
  private pending: (Uint8Array | typeof BREAK)[] = [];
  /** The console can carry a serial BREAK (from the attached reply). */
  private canBreak = false;
  private pendingBytes = 0;
  private sending = false;
  private attaches = 0;
  private ended = false;
  /** Filters output shown again (history); holds a sequence cut at the end of a history read
   * until live output (which completes it, unfiltered) or more history follows. */
  private readonly replayed = new QueryFilter();
  /** Whether the next byte shown starts a line (its time is then given to the view). */
  private atLineStart = true;

  constructor(
    private readonly options: Options,
    private readonly view: View,
  ) {
    const bearer: Interceptor = (next) => (request) => {
      request.header.set("authorization", `Bearer ${options.token}`);
      return next(request);
    };
    this.client = createClient(
      Console,
      createGrpcWebTransport({ baseUrl: options.baseUrl, interceptors: [bearer] }),
    );
  }

  /** Offset of the next byte to show (for tests and the status line). */
  get offset(): bigint | undefined {
    return this.next;
  }

  /** Times the page attached again after its first attach. */
  get reconnects(): number {
    return Math.max(0, this.attaches - 1);
  }

  /** Connects, and reconnects until the console or the token is gone. */
  async run(): Promise<void> {
    let delay = FIRST_RETRY_MS;
    while (!this.ended) {
      this.view.connection(this.attaches ? "reconnecting" : "connecting", "attaching…");
      const outcome = await this.watch();
      if (outcome.kind === "again") continue;
      if (outcome.kind === "final") {
        this.ended = true;
        this.view.connection("ended", outcome.message);
        return;
      }
      if (outcome.attached) delay = FIRST_RETRY_MS;
      this.view.connection(
        "reconnecting",
        `${outcome.message}; reconnecting in ${(delay / 1000).toFixed(1)} s`,
      );
      await sleep(delay);
      delay = Math.min(delay * 2, LAST_RETRY_MS);
    }
  }

  /** Takes the writer lease from whoever holds it (Attach.force). */
  takeOver(): void {
    if (this.readOnly === "token") return;
    this.wantWrite = true;
    this.force = true;
    this.restart = true;
    this.current?.abort();
  }

  /** A serial BREAK, sent after the input typed before it. */
  serialBreak(): void {
    if (this.readOnly) {
      this.view.notice("Read-only: the serial BREAK was not sent");
      return;
    }
    if (!this.canBreak) {
      this.view.notice("This console cannot carry a serial BREAK: its guest socket is raw");
      return;
    }
    this.pending.push(BREAK);
    void this.flushInput();
  }

  /** Keystrokes from the terminal. */
  input(data: Uint8Array): void {
    if (this.readOnly) {
      this.view.notice("Read-only: your input was not sent");
      return;
    }
    if (this.pendingBytes + data.length > MAX_PENDING_INPUT) {
      this.view.notice("Not connected: input dropped");
      return;
    }
    this.pending.push(data);
    this.pendingBytes += data.length;
    void this.flushInput();
  }

  private async watch(): Promise<Outcome> {
    const abort = new AbortController();
    this.current = abort;
    this.restart = false;
    const mode = this.wantWrite ? Attach_Mode.READ_WRITE : Attach_Mode.READ_ONLY;
    const force = this.force;
    this.force = false;
    let attached = false;
    try {
      const frames = this.client.watchConsole(
        {
          guest: this.options.guest,
          device: this.options.device,
          mode,
          force,
          // No replay: the attached offset is the first live byte; what came before is read
          // from history, where the page knows it is history (terminal safety, above).
          replayBytes: 0n,
        },
        { signal: abort.signal },
      );
      for await (const { frame } of frames) {
        switch (frame.case) {
          case "attached":
            await this.attached(frame.value, abort.signal);
            attached = true;
            break;
          case "output":
            await this.show(frame.value.offset, frame.value.data, abort.signal);
            break;
          case "lagged":
            // The next output starts at to_offset; show() fills the hole from history.
            break;
          case "guest":
            this.view.guest(frame.value.connected);
            break;
          case "writerRevoked":
            // Watch on; take the keyboard back only when asked (takeOver), not at a reconnect.
            this.writer = false;
            this.wantWrite = false;
            this.view.serialBreak(false);
            this.setReadOnly("revoked", frame.value.reason || "another client took the keyboard");
            break;
        }
      }
      return { kind: "retry", attached, message: "The daemon ended the stream" };
    } catch (e) {
      if (this.restart) return { kind: "again" };
      const error = ConnectError.from(e);
      const message = error.rawMessage || Code[error.code];
      const moved = movedTo(error);
      if (moved) {
        // Loaded from a node: the page goes to the same console on the new node. (Through a
        // gateway the gateway follows the move and this status never comes.)
        this.view.event("moved", `guest moved to ${moved.to}; resuming there at ${this.next ?? "the end"}`);
        this.view.moved(moved.to, this.next);
        return { kind: "final", message: `The guest moved to ${moved.to}; opening its console there` };
      }
      if (!attached && mode === Attach_Mode.READ_WRITE) {
        if (error.code === Code.PermissionDenied) {
          // A READ token: watch without the lease.
          this.setReadOnly("token", message);
          this.wantWrite = false;
          return { kind: "again" };
        }
        if (error.code === Code.FailedPrecondition) {
          this.setReadOnly("held", message);
          this.wantWrite = false;
          return { kind: "again" };
        }
      }
      switch (error.code) {
        case Code.Unauthenticated:
          return { kind: "final", message: `Token refused: ${message}` };
        case Code.PermissionDenied:
          return { kind: "final", message: `Not allowed: ${message}` };
        case Code.NotFound:
          return { kind: "final", message: `No such console: ${message}` };
        case Code.InvalidArgument:
          return { kind: "final", message: `Bad request: ${message}` };
        default:
          return { kind: "retry", attached, message: `Connection lost (${message})` };
      }
    } finally {
      this.current = null;
      this.sessionId = "";
      this.writer = false;
      this.view.serialBreak(false);
    }
  }

  private async attached(attached: Attached, signal: AbortSignal): Promise<void> {
    this.sessionId = attached.sessionId;
    this.writer = attached.writer;
    this.canBreak = attached.serialBreak;
    this.view.serialBreak(attached.writer && attached.serialBreak);
    this.view.guest(attached.guestConnected);
    if (attached.writer) {
      this.readOnly = null;
      this.view.access("read-write", null, "you hold the keyboard");
    } else if (!this.readOnly) {
      this.setReadOnly("held", "watching without the keyboard");
    } else {
      this.view.access("read-only", this.readOnly, "");
    }
    if (this.next === undefined && this.options.from !== undefined) {
      // Reopened after a move: everything before `from` is on the previous page.
      this.next = this.options.from;
      this.view.event("history", `resuming at offset ${this.next} after a move`);
    }
    if (this.next === undefined) {
      if (this.options.since !== undefined) await this.openAt(this.options.since, attached.offset, signal);
      // First attach: the last screen from history up to attached.offset (the first live
      // byte; history read after attaching reaches at least that far), then live output.
      const chunks = this.client.readHistory(
        {
          guest: this.options.guest,
          stream: this.options.device,
          start: { case: "tailLines", value: BigInt(this.options.tailLines) },
          marks: true,
        },
        { signal },
      );
      for await (const chunk of chunks) {
        if (chunk.offset >= attached.offset) break;
        if (chunk.gap) {
          // Before anything was shown it is only where the last screen starts.
          if (this.next !== undefined) this.skip(chunk.gap.toOffset, "no longer on disk");
        } else if (chunk.data.length > 0) {
          const shown = chunk.data.subarray(0, Number(attached.offset - chunk.offset));
          if (this.next !== undefined && chunk.offset > this.next) this.skip(chunk.offset, "not shown (see conlogctl history)");
          this.put(chunk.offset, shown, true, chunk);
        }
      }
      if (this.next === undefined || this.next > attached.offset) this.next = attached.offset;
    }
    if (attached.offset > this.next) {
      await this.fill(attached.offset, signal);
    }
    this.attaches += 1;
    this.view.connection("live", this.attaches > 1 ? `reconnected at offset ${this.next}` : "");
    void this.flushInput();
  }

  /** Shows history from the first byte logged at or after `since` (at most SINCE_BYTES of
   * it, before `to`). */
  private async openAt(since: bigint, to: bigint, signal: AbortSignal): Promise<void> {
    this.view.event("history", `opening at ${since} ns`);
    const chunks = this.client.readHistory(
      {
        guest: this.options.guest,
        stream: this.options.device,
        start: {
          case: "sinceTime",
          value: { seconds: since / 1_000_000_000n, nanos: Number(since % 1_000_000_000n) },
        },
        limitBytes: SINCE_BYTES,
        marks: true,
      },
      { signal },
    );
    try {
      for await (const chunk of chunks) {
        if (chunk.offset >= to) break;
        if (chunk.gap) {
          if (this.next !== undefined) this.skip(chunk.gap.toOffset, "no longer on disk");
        } else if (chunk.data.length > 0) {
          this.put(chunk.offset, chunk.data.subarray(0, Number(to - chunk.offset)), true, chunk);
        }
      }
    } catch (e) {
      const error = ConnectError.from(e);
      if (error.code !== Code.OutOfRange) throw e;
      // Nothing logged at or after that time yet: the last screen and live output follow.
      this.view.notice(`Nothing was logged at or after that time: ${error.rawMessage}`);
    }
  }

  /** Shows live output at `offset`: only what the terminal has not shown, after any hole. */
  private async show(offset: bigint, data: Uint8Array, signal: AbortSignal): Promise<void> {
    if (this.next === undefined) this.next = offset;
    if (offset > this.next) await this.fill(offset, signal);
    this.put(offset, data, false, null);
  }

  /** Shows the part of `data` (at `offset`) the terminal has not shown yet; `historic` bytes
   * (read from history, `chunk`) go through the query filter, live ones do not. */
  private put(offset: bigint, data: Uint8Array, historic: boolean, chunk: HistoryChunk | null): void {
    const next = this.next ?? offset;
    const end = offset + BigInt(data.length);
    if (end <= next || offset > next) return;
    let at = next;
    let rest = data.subarray(Number(next - offset));
    if (!historic) {
      // A sequence cut at the end of history is completed by live output: shown as it comes.
      const held = this.replayed.takePending();
      if (held.length) this.view.write(held);
    }
    const arrived = BigInt(Date.now()) * 1_000_000n;
    while (rest.length) {
      const newline = rest.indexOf(0x0a);
      const line = newline < 0 ? rest : rest.subarray(0, newline + 1);
      if (this.atLineStart) {
        this.view.lineTime(
          chunk ? timeAt(chunk.marks, at, chunk) : { nanos: arrived, approximate: false, live: true },
        );
      }
      if (historic) {
        this.historic(line);
      } else {
        this.view.write(line);
      }
      this.atLineStart = line[line.length - 1] === 0x0a;
      at += BigInt(line.length);
      rest = rest.subarray(line.length);
    }
    this.next = end;
  }

  /** Shows bytes read from history, with the sequences that make a terminal answer removed. */
  private historic(data: Uint8Array): void {
    const shown = this.replayed.push(data);
    if (shown.length) this.view.write(shown);
  }

  /** Shows [next, to) from history; what is no longer on disk is marked as such. */
  private async fill(to: bigint, signal: AbortSignal): Promise<void> {
    const from = this.next ?? to;
    this.view.event("history", `filling ${from}..${to} from history`);
    const chunks = this.client.readHistory(
      {
        guest: this.options.guest,
        stream: this.options.device,
        start: { case: "fromOffset", value: from },
        limitBytes: to - from,
        marks: true,
      },
      { signal },
    );
    for await (const chunk of chunks) {
      if (chunk.gap) {
        this.skip(chunk.gap.toOffset, "no longer on disk");
      } else {
        this.put(chunk.offset, chunk.data, true, chunk);
      }
    }
    this.skip(to, "missing from history");
  }

  private skip(to: bigint, why: string): void {
    if (this.next === undefined || to <= this.next) return;
    // A hole ends any sequence held from before it.
    this.replayed.takePending();
    this.view.write(`\r\n\x1b[7m[conlog: ${to - this.next} bytes ${why}]\x1b[0m\r\n`);
    this.atLineStart = true;
    this.next = to;
  }

  private setReadOnly(reason: ReadOnlyReason, detail: string): void {
    this.readOnly = reason;
    this.view.access("read-only", reason, detail);
    this.view.serialBreak(false);
    if (this.pending.length) {
      this.view.notice(`Read-only: ${this.pendingBytes} bytes of input were not sent`);
      this.pending = [];
      this.pendingBytes = 0;
    }
  }

  /** Sends queued input in order, one call at a time, while this page holds the keyboard. */
  private async flushInput(): Promise<void> {
    if (this.sending) return;
    this.sending = true;
    try {
      while (this.pending.length && this.sessionId && this.writer) {
        // Input up to the first BREAK, sent with it in one call (the break goes after the data).
        const upTo = this.pending.indexOf(BREAK);
        const taken = this.pending.splice(0, upTo < 0 ? this.pending.length : upTo + 1);
        const serialBreak = upTo >= 0;
        const batch = concat(taken.filter((part): part is Uint8Array => part !== BREAK));
        this.pendingBytes -= batch.length;
        try {
          await this.client.sendConsoleInput({ sessionId: this.sessionId, data: batch, serialBreak });
          if (serialBreak) this.view.event("break", "serial BREAK sent");
        } catch (e) {
          const error = ConnectError.from(e);
          const message = error.rawMessage || Code[error.code];
          if (error.code === Code.NotFound || movedTo(error)) {
            // The session ended with its stream (or the guest moved): the next attach sends it.
            this.pending.unshift(...taken);
            this.pendingBytes += batch.length;
            break;
          } else if (serialBreak && error.code === Code.FailedPrecondition && message.includes("serial BREAK")) {
            this.view.notice(`The serial BREAK was not sent: ${message}`);
          } else if (error.code === Code.PermissionDenied) {
            this.wantWrite = false;
            this.setReadOnly("token", message);
          } else if (error.code === Code.FailedPrecondition) {
            this.wantWrite = false;
            this.setReadOnly("revoked", message);
          } else {
            this.view.notice(`${batch.length} bytes of input may not have reached the guest: ${message}`);
          }
        }
      }
    } finally {
      this.sending = false;
    }
  }
}
