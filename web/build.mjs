// Builds the console page that conlogd embeds (`npm run build`, after `npm ci`):
//   1. TypeScript for the Console API from ../proto into src/gen (buf + protoc-gen-es);
//   2. a type check of src/ (tsc);
//   3. one bundle into dist/: index.html, console.js, console.css (esbuild).
// dist/ and src/gen/ are committed, so that `cargo build` needs no npm. `--check` (`npm run
// check`) builds into memory and a temporary directory instead, and fails when the committed
// files differ from what the sources give.

import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const check = process.argv.includes("--check");

function fail(message) {
  console.error(`web/build.mjs: ${message}`);
  process.exit(1);
}

if (!existsSync(join(here, "node_modules", ".bin", "esbuild"))) {
  fail("web/node_modules is missing: run `npm ci` in web/ (bash scripts/test.sh does)");
}
const { build } = await import("esbuild");

function run(command, args) {
  const result = spawnSync(command, args, {
    cwd: here,
    stdio: "inherit",
    env: { ...process.env, PATH: `${join(here, "node_modules", ".bin")}:${process.env.PATH}` },
  });
  if (result.status !== 0) fail(`${command} ${args.join(" ")} failed (${result.error ?? `status ${result.status}`})`);
}

/** Every file under `dir`, as paths relative to it. */
function files(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true })
    .map(String)
    .filter((name) => statSync(join(dir, name)).isFile())
    .sort();
}

const stale = [];
function compare(name, built, committedPath) {
  if (!existsSync(committedPath) || !readFileSync(committedPath).equals(Buffer.from(built))) {
    stale.push(name);
  }
}

// 1. Generated code.
const generated = join(here, "src", "gen");
if (check) {
  const scratch = mkdtempSync(join(tmpdir(), "conlog-web-"));
  try {
    run("buf", ["generate", "--output", scratch]);
    const fresh = join(scratch, "src", "gen");
    const names = new Set([...files(fresh), ...files(generated)]);
    for (const name of names) {
      const path = join(fresh, name);
      compare(`src/gen/${name}`, existsSync(path) ? readFileSync(path) : Buffer.alloc(0), join(generated, name));
    }
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
} else {
  run("buf", ["generate"]);
}

// 2. Types.
run("tsc", ["--noEmit", "-p", "."]);

// 3. The bundle.
const dist = join(here, "dist");
const result = await build({
  absWorkingDir: here,
  entryPoints: ["src/main.ts"],
  outfile: "dist/console.js",
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020"],
  charset: "utf8",
  logLevel: "warning",
  write: false,
});
const outputs = [
  ...result.outputFiles.map((file) => ({ name: relative(dist, file.path), contents: file.contents })),
  { name: "index.html", contents: readFileSync(join(here, "src", "index.html")) },
];
for (const { name, contents } of outputs) {
  if (check) {
    compare(`dist/${name}`, contents, join(dist, name));
  } else {
    writeFileSync(join(dist, name), contents);
  }
}
const expected = new Set(outputs.map((o) => o.name));
for (const name of files(dist)) {
  if (!expected.has(name)) {
    if (check) stale.push(`dist/${name} (not built any more)`);
    else rmSync(join(dist, name));
  }
}

if (stale.length) {
  fail(
    `the committed page is not what the sources build: ${stale.join(", ")}.\n` +
      "Run `npm run build` in web/ and commit web/src/gen and web/dist.",
  );
}
console.log(check ? "web: src/gen and dist are up to date" : `web: built ${[...expected].map((n) => `dist/${n}`).join(", ")}`);
