// The page's terminal-query filter (src/terminal_safety.ts) against the shared test vectors,
// tests/data/terminal_queries.json, which conlogd's Rust filter (src/terminal_safety.rs) meets
// too: both give the same bytes for every vector, fed whole, split in two at every position, and
// byte by byte. Run with `npm test` in web/ (tests/web_console.rs runs it); prints one JSON line
// with the counts, exits 1 with the first difference.

import { build } from "esbuild";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const web = join(dirname(fileURLToPath(import.meta.url)), "..");
const vectorsPath = join(web, "..", "tests", "data", "terminal_queries.json");

// The module as the page bundles it, imported from memory.
const bundle = await build({
  absWorkingDir: web,
  entryPoints: ["src/terminal_safety.ts"],
  bundle: true,
  format: "esm",
  target: ["es2020"],
  write: false,
  logLevel: "warning",
});
const source = Buffer.from(bundle.outputFiles[0].contents).toString("base64");
const { QueryFilter, MAX_STRING, MAX_CSI } = await import(`data:text/javascript;base64,${source}`);

function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

/** A vector string as bytes: one character per byte. */
function bytes(text) {
  return Uint8Array.from(text, (c) => {
    const code = c.charCodeAt(0);
    if (code > 0xff) fail(`${JSON.stringify(c)} is not a byte in ${JSON.stringify(text)}`);
    return code;
  });
}

const show = (data) => JSON.stringify(String.fromCharCode(...data));

function feed(chunks) {
  const filter = new QueryFilter();
  const out = [];
  for (const chunk of chunks) out.push(...filter.push(chunk));
  return Uint8Array.from(out);
}

function same(a, b) {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

let checks = 0;
/** Every split of `input` into two chunks, and byte by byte, gives `expected`. */
function check(input, expected) {
  const ways = [["whole", [input]]];
  for (let at = 0; at <= input.length; at++) {
    ways.push([`split at ${at}`, [input.subarray(0, at), input.subarray(at)]]);
  }
  ways.push(["byte by byte", Array.from(input, (_, i) => input.subarray(i, i + 1))]);
  for (const [how, chunks] of ways) {
    const out = feed(chunks);
    if (!same(out, expected)) {
      fail(`input ${show(input)} (${how}): got ${show(out)}, expected ${show(expected)}`);
    }
    checks += 1;
  }
}

const concat = (...parts) => Uint8Array.from(parts.flatMap((p) => [...p]));
const ascii = (text) => bytes(text);

const vectors = JSON.parse(readFileSync(vectorsPath, "utf8"));
if (vectors.limits.max_string !== MAX_STRING || vectors.limits.max_csi !== MAX_CSI) {
  fail(`limits ${JSON.stringify(vectors.limits)} but the page has MAX_STRING ${MAX_STRING}, MAX_CSI ${MAX_CSI}`);
}
for (const query of vectors.queries) {
  check(concat(ascii("ab"), bytes(query), ascii("cd\r\n")), ascii("abcd\r\n"));
}
for (const sequence of vectors.ordinary) {
  const input = concat(ascii("x"), bytes(sequence), ascii("y"));
  check(input, input);
}
for (const { input, output } of vectors.cases) {
  check(bytes(input), bytes(output));
}

// Oversized strings are dropped whole, and what is held stays bounded (as in the Rust tests).
{
  const input = concat(ascii("\x1b]52;c;"), new Uint8Array(MAX_STRING * 2).fill(0x41), ascii("\x07after"));
  const filter = new QueryFilter();
  const out = [];
  for (let at = 0; at < input.length; at += 1000) {
    out.push(...filter.push(input.subarray(at, at + 1000)));
    if (filter.pending > MAX_STRING + 16) fail(`an oversized OSC string holds ${filter.pending} bytes`);
  }
  if (!same(Uint8Array.from(out), ascii("after"))) fail(`oversized OSC: got ${show(out)}`);
}
{
  const input = concat(ascii("\x1b["), new Uint8Array(MAX_CSI * 10).fill(0x31), ascii("nafter"));
  const filter = new QueryFilter();
  const out = [];
  for (let at = 0; at < input.length; at += 100) {
    out.push(...filter.push(input.subarray(at, at + 100)));
    if (filter.pending > MAX_CSI * 4 + 1) fail(`an oversized CSI holds ${filter.pending} bytes`);
  }
  if (!same(Uint8Array.from(out), ascii("after"))) fail(`oversized CSI: got ${show(out)}`);
}

// takePending hands an unfinished sequence on (to live output, which completes it).
{
  const filter = new QueryFilter();
  const shown = filter.push(ascii("ok\x1b[1;3"));
  const held = filter.takePending();
  if (!same(shown, ascii("ok")) || !same(held, ascii("\x1b[1;3"))) {
    fail(`takePending: shown ${show(shown)}, held ${show(held)}`);
  }
  if (filter.pending !== 0 || !same(filter.push(ascii("1m")), ascii("1m"))) fail("takePending did not start afresh");
}

console.log(
  JSON.stringify({
    queries: vectors.queries.length,
    ordinary: vectors.ordinary.length,
    cases: vectors.cases.length,
    checks,
  }),
);
