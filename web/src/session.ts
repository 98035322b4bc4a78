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

import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { Attach_Mode, Console, type Attached } from "./gen/conlog/v1/console_pb";
import { QueryFilter } from "./terminal_safety";

export type ConnectionState = "connecting" | "live" | "reconnecting" | "ended";
export type Access = "unknown" | "read-write" | "read-only";
/** Why the page cannot type: the token is READ, another client holds the keyboard, or it was
 * taken from this page. */
export type ReadOnlyReason = "token" | "held" | "revoked";

/** What the session shows; the page implements it. */
export interface View {
  /** Bytes (or a conlog notice) for the terminal. */
  write(data: Uint8Array | string): void;
  connection(state: ConnectionState, detail: string): void;
  guest(connected: boolean): void;
  access(access: Access, reason: ReadOnlyReason | null, detail: string): void;
  /** Whether this page may send a serial BREAK now (it holds the keyboard of a console whose
   * QEMU chardev has mux=on). */
  serialBreak(available: boolean): void;
  notice(text: string): void;
  /** What the session did, for diagnostics (`window.conlog.events`). */
  event(what: string, detail: string): void;
}

export interface Options {
  /** Where the Console service is (the daemon serving the page, by default). */
  baseUrl: string;
  guest: string;
  device: string;
  token: string;
  /** Lines of history shown before live output. */
  tailLines: number;
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
    if (this.next === undefined) {
      // First attach: the last screen from history up to attached.offset (the first live
      // byte; history read after attaching reaches at least that far), then live output.
      let end: bigint | undefined;
      const chunks = this.client.readHistory(
        {
          guest: this.options.guest,
          stream: this.options.device,
          start: { case: "tailLines", value: BigInt(this.options.tailLines) },
        },
        { signal },
      );
      for await (const chunk of chunks) {
        if (chunk.offset >= attached.offset) break;
        if (chunk.gap) {
          end = chunk.gap.toOffset;
        } else if (chunk.data.length > 0) {
          const shown = chunk.data.subarray(0, Number(attached.offset - chunk.offset));
          this.historic(shown);
          end = chunk.offset + BigInt(shown.length);
        }
      }
      this.next = end === undefined || end > attached.offset ? attached.offset : end;
    }
    if (attached.offset > this.next) {
      await this.fill(attached.offset, signal);
    }
    this.attaches += 1;
    this.view.connection("live", this.attaches > 1 ? `reconnected at offset ${this.next}` : "");
    void this.flushInput();
  }

  /** Shows live output at `offset`: only what the terminal has not shown, after any hole. */
  private async show(offset: bigint, data: Uint8Array, signal: AbortSignal): Promise<void> {
    if (this.next === undefined) this.next = offset;
    if (offset > this.next) await this.fill(offset, signal);
    this.put(offset, data, false);
  }

  /** Shows the part of `data` (at `offset`) the terminal has not shown yet; `historic` bytes
   * (read from history) go through the query filter, live ones do not. */
  private put(offset: bigint, data: Uint8Array, historic: boolean): void {
    const next = this.next ?? offset;
    const end = offset + BigInt(data.length);
    if (end <= next || offset > next) return;
    const fresh = data.subarray(Number(next - offset));
    if (historic) {
      this.historic(fresh);
    } else {
      // A sequence cut at the end of history is completed by live output: shown as it comes.
      const held = this.replayed.takePending();
      if (held.length) this.view.write(held);
      this.view.write(fresh);
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
      },
      { signal },
    );
    for await (const chunk of chunks) {
      if (chunk.gap) {
        this.skip(chunk.gap.toOffset, "no longer on disk");
      } else {
        this.put(chunk.offset, chunk.data, true);
      }
    }
    this.skip(to, "missing from history");
  }

  private skip(to: bigint, why: string): void {
    if (this.next === undefined || to <= this.next) return;
    // A hole ends any sequence held from before it.
    this.replayed.takePending();
    this.view.write(`\r\n\x1b[7m[conlog: ${to - this.next} bytes ${why}]\x1b[0m\r\n`);
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
          if (error.code === Code.NotFound) {
            // The session ended with its stream; the next attach sends it.
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
