// Shared by the Node scripts of tests/external/web_console.rs. Their packages are web/'s (one lock file,
// installed by `npm ci` in web/, which scripts/test.sh runs); nothing is installed here.

import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const repo = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const web = join(repo, "web");
const requireFromWeb = createRequire(join(web, "package.json"));

/** Fails the script with a message for the test to show. */
export function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

/** A package from web/node_modules, or a failure naming the install step. */
export function need(name) {
  if (!existsSync(join(web, "node_modules"))) {
    fail(`web/node_modules is missing: run \`npm ci\` in web/ (bash scripts/test.sh does)`);
  }
  try {
    return requireFromWeb(name);
  } catch (e) {
    fail(`${name} is not installed in web/node_modules (${e.message}): run \`npm ci\` in web/`);
  }
}

/** The script's parameters: one JSON object, the first argument. */
export function parameters() {
  const text = process.argv[2];
  if (!text) fail("usage: node SCRIPT.mjs '{…json…}'");
  return JSON.parse(text);
}

export function assert(condition, message) {
  if (!condition) fail(message);
}
