// The console page: a terminal for one guest's console device, from the URL
// `/console/?guest=G&device=D&token=T` (or the same parameters in the fragment, `#token=T`,
// which the browser never sends to a server; the fragment wins).

import "@xterm/xterm/css/xterm.css";
import "./console.css";
import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import {
  ConsoleSession,
  type Access,
  type ConnectionState,
  type ReadOnlyReason,
  type View,
} from "./session";

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

function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`the page has no #${id}`);
  return found as T;
}

const encoder = new TextEncoder();

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
  };

  const session = new ConsoleSession(
    {
      // The Console service is where the page came from: `<base>/console/` → `<base>/`.
      baseUrl: new URL("..", location.href).href.replace(/\/$/, ""),
      guest,
      device,
      token,
      tailLines: Math.max(terminal.rows, 24),
    },
    view,
  );
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
  };
  terminal.focus();
  void session.run();
}

start();
