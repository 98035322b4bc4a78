// The console page: a terminal for one guest's console device, from the URL
// `/console/?guest=G&device=D&token=T` (or the same parameters in the fragment, `#token=T`,
// which the browser never sends to a server; the fragment wins). `&since=WHEN` opens history
// at a time: an RFC 3339 time (2026-12-05T03:12:00Z) or a duration back from now (10m, 2h).
// The time of the line under the mouse shows in the status bar (docs/consoles.md, "Times on
// the page"). When the guest moves to another node, a page loaded from a node opens the same
// console on the new node with `&from=OFFSET` (resume there; docs/operations.md, "When a guest
// moves"); through a gateway the gateway follows and the page goes on.

import "@xterm/xterm/css/xterm.css";
import "./console.css";
import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import {
  ConsoleSession,
  type Access,
  type ConnectionState,
  type LineTime,
  type ReadOnlyReason,
  type View,
} from "./session";
import type { IMarker } from "@xterm/xterm";

/** A page event, for the curious (and the tests): `window.conlog.events`. */
interface PageEvent {
  at: number;
  what: string;
  detail: string;
}

declare global {
  interface Window {
    conlog?: {
      session: ConsoleSession;
      terminal: Terminal;
      events: PageEvent[];
      /** The terminal's scrollback and screen as text, one line per row. */
      text(): string;
      /** The time shown for buffer row `row` (as in the status bar), or null if unknown. */
      timeOfRow(row: number): string | null;
    };
  }
}

const MAX_EVENTS = 500;

function parameters(): URLSearchParams {
  const merged = new URLSearchParams(location.search);
  for (const [key, value] of new URLSearchParams(location.hash.replace(/^#/, ""))) {
    merged.set(key, value);
  }
  return merged;
}

/** This page on the node `to`: same guest, device and token, resuming at `offset`. */
function movedPage(to: string, offset: bigint | undefined): string {
  const url = new URL(location.href);
  url.host = to;
  const edit = (params: URLSearchParams) => {
    params.delete("since");
    params.delete("from");
    return params;
  };
  const search = edit(new URLSearchParams(url.search));
  if (offset !== undefined) search.set("from", offset.toString());
  url.search = search.toString();
  url.hash = edit(new URLSearchParams(url.hash.replace(/^#/, ""))).toString();
  return url.href;
}

function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`the page has no #${id}`);
  return found as T;
}

const encoder = new TextEncoder();

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** `since=` as nanoseconds since the epoch: `10m` back from now, or an RFC 3339 time (the
 * seconds may be left out). Undefined if absent or not understood. */
function parseSince(text: string | null): bigint | undefined {
  if (!text) return undefined;
  const duration = /^(\d+)(ms|s|m|h|d)$/.exec(text.trim());
  if (duration) {
    return BigInt(Date.now() - Number(duration[1]) * DURATION_UNITS[duration[2]]) * 1_000_000n;
  }
  const match = /^(\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2})(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:\d{2})$/.exec(text.trim());
  if (!match) return undefined;
  const ms = Date.parse(`${match[1]}${match[2] ? match[2].slice(0, 3) : ":00"}${match[4]}`);
  if (Number.isNaN(ms)) return undefined;
  // Fractions of a second to the nanosecond.
  const fraction = (match[3] ?? ".").slice(1).padEnd(9, "0").slice(0, 9);
  return BigInt(ms) * 1_000_000n + BigInt(fraction);
}

/** `2026-12-05T03:12:07.123456789Z`, with `~` when approximate and a note for live lines. */
function formatTime(time: LineTime): string {
  const ms = time.nanos / 1_000_000n;
  const iso = new Date(Number(ms)).toISOString();
  const digits = (time.nanos % 1_000_000_000n).toString().padStart(9, "0");
  const text = `${iso.slice(0, 19)}.${digits}Z`;
  if (time.live) return `${text} (received)`;
  return time.approximate ? `~${text}` : text;
}

function binary(text: string): Uint8Array {
  return Uint8Array.from(text, (c) => c.charCodeAt(0) & 0xff);
}

function start(): void {
  const params = parameters();
  const guest = params.get("guest") ?? "";
  const device = params.get("device") || "serial0";
  const token = params.get("token") ?? "";

  const body = document.body;
  const target = element("target");
  const connection = element("connection");
  const guestBadge = element("guest");
  const access = element("access");
  const takeover = element<HTMLButtonElement>("takeover");
  const sendBreak = element<HTMLButtonElement>("break");
  const banner = element("banner");
  const lineTime = element("linetime");
  const notice = element("notice");
  const events: PageEvent[] = [];
  const log = (what: string, detail: string) => {
    events.push({ at: Date.now(), what, detail });
    if (events.length > MAX_EVENTS) events.splice(0, events.length - MAX_EVENTS);
  };

  target.textContent = `${guest || "?"} / ${device}`;
  document.title = `${guest || "?"}/${device} · conlog console`;

  let state: ConnectionState = "connecting";
  let stateDetail = "";
  let guestConnected: boolean | null = null;
  const showBanner = () => {
    let text = "";
    let kind = "";
    if (state === "ended") {
      [text, kind] = [`Console closed: ${stateDetail}`, "error"];
    } else if (state === "reconnecting") {
      [text, kind] = [`Connection to conlogd lost. ${stateDetail}`, "error"];
    } else if (guestConnected === false) {
      [text, kind] = ["Guest disconnected: output resumes when the guest connects again", "warning"];
    }
    banner.hidden = !text;
    banner.textContent = text;
    banner.className = kind;
    body.classList.toggle("offline", state !== "live");
  };

  if (!guest || !token) {
    state = "ended";
    stateDetail = "the URL needs ?guest=NAME&token=TOKEN (and optionally &device=NAME)";
    body.dataset.connection = state;
    connection.textContent = "not connected";
    showBanner();
    return;
  }

  /** Where lines start in the buffer (a marker follows its row as the terminal scrolls) and
   * when they were logged; as many as the scrollback holds. */
  const lineTimes: { marker: IMarker; time: LineTime | null }[] = [];
  const timeOfRow = (row: number): LineTime | null | undefined => {
    for (let i = lineTimes.length - 1; i >= 0; i--) {
      const { marker, time } = lineTimes[i];
      if (!marker.isDisposed && marker.line <= row) return time;
    }
    return undefined;
  };

  const terminal = new Terminal({
    cursorBlink: true,
    scrollback: 10_000,
    fontFamily: '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    theme: { background: "#101418" },
  });
  const fit = new FitAddon();
  terminal.loadAddon(fit);
  const area = element("terminal");
  terminal.open(area);
  fit.fit();
  // The banner and notices come and go above the terminal: follow the space left to it.
  new ResizeObserver(() => fit.fit()).observe(area);

  let noticeTimer: ReturnType<typeof setTimeout> | undefined;
  const view: View = {
    write(data) {
      terminal.write(data);
    },
    lineTime(time) {
      // After what was written before has been parsed: the cursor is where this line starts.
      terminal.write("", () => {
        const marker = terminal.registerMarker(0);
        if (!marker) return;
        lineTimes.push({ marker, time });
        while (lineTimes.length && (lineTimes[0].marker.isDisposed || lineTimes.length > 10_000)) {
          lineTimes.shift()?.marker.dispose();
        }
      });
    },
    connection(next, detail) {
      state = next;
      stateDetail = detail;
      body.dataset.connection = next;
      connection.textContent = {
        connecting: "connecting…",
        live: "live",
        reconnecting: "reconnecting…",
        ended: "closed",
      }[next];
      connection.title = detail;
      log(`connection:${next}`, detail);
      showBanner();
    },
    guest(connected) {
      guestConnected = connected;
      body.dataset.guest = connected ? "connected" : "disconnected";
      guestBadge.textContent = connected ? "guest connected" : "guest disconnected";
      log(`guest:${body.dataset.guest}`, "");
      showBanner();
    },
    access(level: Access, reason: ReadOnlyReason | null, detail: string) {
      body.dataset.access = level;
      const why = {
        token: "read-only token",
        held: "read-only: another client has the keyboard",
        revoked: "read-only: another client took the keyboard",
      };
      access.textContent = level === "read-only" ? why[reason ?? "held"] : level;
      access.title = detail;
      terminal.options.disableStdin = level === "read-only";
      takeover.hidden = level !== "read-only" || reason === "token";
      log(`access:${level}`, reason ? `${reason}: ${detail}` : detail);
    },
    serialBreak(available) {
      sendBreak.hidden = !available;
    },
    notice(text) {
      notice.textContent = text;
      notice.hidden = false;
      log("notice", text);
      clearTimeout(noticeTimer);
      noticeTimer = setTimeout(() => (notice.hidden = true), 6000);
    },
    event: log,
    moved(to, offset) {
      location.assign(movedPage(to, offset));
    },
  };

  const session = new ConsoleSession(
    {
      // The Console service is where the page came from: `<base>/console/` → `<base>/`.
      baseUrl: new URL("..", location.href).href.replace(/\/$/, ""),
      guest,
      device,
      token,
      tailLines: Math.max(terminal.rows, 24),
      since: parseSince(params.get("since")),
      from: /^\d{1,20}$/.test(params.get("from") ?? "") ? BigInt(params.get("from") ?? "0") : undefined,
    },
    view,
  );
  // The time of the line under the mouse, in the status bar.
  area.addEventListener("mousemove", (event) => {
    const screen = area.querySelector(".xterm-screen");
    if (!screen) return;
    const rect = screen.getBoundingClientRect();
    const row = Math.floor(((event.clientY - rect.top) / rect.height) * terminal.rows);
    if (row < 0 || row >= terminal.rows) return;
    const time = timeOfRow(row + terminal.buffer.active.viewportY);
    lineTime.hidden = time === undefined;
    lineTime.textContent = time ? formatTime(time) : "time unknown";
  });
  area.addEventListener("mouseleave", () => (lineTime.hidden = true));
  terminal.onData((text) => session.input(encoder.encode(text)));
  terminal.onBinary((text) => session.input(binary(text)));
  sendBreak.addEventListener("click", () => {
    session.serialBreak();
    terminal.focus();
  });
  takeover.addEventListener("click", () => {
    session.takeOver();
    terminal.focus();
  });

  window.conlog = {
    session,
    terminal,
    events,
    text() {
      const buffer = terminal.buffer.active;
      const lines: string[] = [];
      for (let row = 0; row < buffer.length; row++) {
        const line = buffer.getLine(row);
        if (!line) continue;
        // A wrapped row continues the previous line, whose trailing blanks are then text.
        const text = line.translateToString(!buffer.getLine(row + 1)?.isWrapped);
        if (line.isWrapped && lines.length) {
          lines[lines.length - 1] += text;
        } else {
          lines.push(text);
        }
      }
      while (lines.length && lines[lines.length - 1] === "") lines.pop();
      return lines.join("\n");
    },
    timeOfRow(row) {
      const time = timeOfRow(row);
      return time ? formatTime(time) : null;
    },
  };
  terminal.focus();
  if (params.get("since") && parseSince(params.get("since")) === undefined) {
    view.notice(
      `since=${params.get("since")} is neither a duration (10m, 2h) nor an RFC 3339 time ` +
        "(2026-12-05T03:12:00Z): showing the last screen",
    );
  }
  void session.run();
}

start();
