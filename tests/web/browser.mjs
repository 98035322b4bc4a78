// Headless Debian Chromium, driven by playwright-core, for tests/external/web_console.rs: the test
// sends one JSON command per line on stdin and reads one JSON answer per line on stdout, so
// that the Rust side can drive the fake guest and the daemon between browser steps.
//
// Commands ({ id, op, page, … }):
//   open { url }                 a new page (own browser context) at url; waits for the script
//   wait { until, timeout? }     until the JavaScript expression `until` is true in the page
//   eval { expr }                the value of a JavaScript expression in the page
//   type { text } / press { key } / click { selector }
//   screenshot { path }
//   hold { url }                 holds the page's new requests to url (a glob) until release
//   held                         how many requests are held
//   release { url }              lets the held requests go on, and stops holding
//   exit
// Answers: { id, ok: true, value } or { id, ok: false, error }. Page errors and console
// messages go to stderr.

import { createInterface } from "node:readline";
import { existsSync } from "node:fs";
import { fail, need } from "./lib.mjs";

const CHROMIUM = "/usr/bin/chromium";
if (!existsSync(CHROMIUM)) {
  fail(`${CHROMIUM} is missing: run \`apt-get install -y chromium\` (bash scripts/test.sh does)`);
}
const { chromium } = need("playwright-core");

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  // No sandbox as root; no traffic but the test's (this machine reaches nothing else).
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const pages = new Map();
/** Requests held by `hold`, per page. */
const holds = new Map();

function page(name) {
  const found = pages.get(name);
  if (!found) throw new Error(`no page named ${name}`);
  return found;
}

async function run(command) {
  switch (command.op) {
    case "open": {
      // `insecure`: a page served with a certificate of the test's own CA (a gateway's).
      const context = await browser.newContext({
        viewport: { width: 1000, height: 640 },
        ignoreHTTPSErrors: command.insecure === true,
      });
      const opened = await context.newPage();
      opened.on("pageerror", (e) => console.error(`[${command.page}] page error: ${e.message}`));
      opened.on("console", (m) => console.error(`[${command.page}] console.${m.type()}: ${m.text()}`));
      pages.set(command.page, opened);
      await opened.goto(command.url);
      await run({ op: "wait", page: command.page, until: "window.conlog !== undefined" });
      return null;
    }
    case "wait": {
      // Polled with evaluate: waitForFunction compiles its string in the page, which the
      // page's Content-Security-Policy (no 'unsafe-eval') forbids, as it should.
      const deadline = Date.now() + (command.timeout ?? 20_000);
      for (;;) {
        // A page that navigates (a console following its guest to another node) loses its
        // context mid-evaluate: asked again in the new document.
        const holds = await page(command.page)
          .evaluate(command.until)
          .catch((e) => {
            if (/context was destroyed|navigat/i.test(String(e))) return false;
            throw e;
          });
        if (holds) return null;
        if (Date.now() > deadline) throw new Error(`still false after ${command.timeout ?? 20_000} ms`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    case "eval":
      return page(command.page).evaluate(command.expr);
    case "type":
      await page(command.page).keyboard.type(command.text);
      return null;
    case "press":
      await page(command.page).keyboard.press(command.key);
      return null;
    case "click":
      await page(command.page).click(command.selector);
      return null;
    case "screenshot":
      await page(command.page).screenshot({ path: command.path });
      return command.path;
    case "hold": {
      const held = [];
      holds.set(command.page, held);
      await page(command.page).route(command.url, (route) => held.push(route));
      return null;
    }
    case "held":
      return holds.get(command.page)?.length ?? 0;
    case "release": {
      await page(command.page).unroute(command.url);
      const held = holds.get(command.page) ?? [];
      holds.delete(command.page);
      for (const route of held) {
        // A request the page gave up meanwhile cannot go on; the page retries by itself.
        await route.continue().catch((e) => console.error(`[${command.page}] release: ${e.message}`));
      }
      return held.length;
    }
    case "exit":
      await browser.close();
      process.exit(0);
    default:
      throw new Error(`unknown op ${command.op}`);
  }
}

const answer = (reply) => process.stdout.write(`${JSON.stringify(reply)}\n`);
answer({ id: 0, ok: true, value: browser.version() });
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  try {
    answer({ id: command.id, ok: true, value: (await run(command)) ?? null });
  } catch (e) {
    answer({ id: command.id, ok: false, error: String(e?.stack ?? e) });
  }
}
// stdin closed: the test is over (or gone).
await browser.close();
process.exit(0);
