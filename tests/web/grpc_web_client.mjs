// gRPC-web from Node against the real conlogd, with clients we did not write: Connect's
// gRPC-web transport (@connectrpc/connect-node) over HTTP/1.1 and HTTP/2, plain or TLS, and a
// hand-made gRPC-web-text request (base64 bodies, as browsers without binary streaming send).
// The service comes from the descriptor set the daemon serves (no generated code), so this
// client shares nothing with the page's. Prints one JSON object for tests/external/web_console.rs:
//   { reads: [{ httpVersion, data, chunks, offsets }], tail, text, codes }
// where data, tail and text are base64 of the exact bytes read.
//
// Parameters (JSON, first argument): baseUrl, guest, device, descriptorSet (path), tokens
// { readWrite, read, otherGuest }, ca (PEM path, for https), httpVersions, text (bool).

import { readFileSync } from "node:fs";
import { assert, fail, need, parameters } from "./lib.mjs";

const { Code, ConnectError, createClient } = need("@connectrpc/connect");
const { createGrpcWebTransport } = need("@connectrpc/connect-node");
const { create, createFileRegistry, fromBinary, toBinary } = need("@bufbuild/protobuf");
const { FileDescriptorSetSchema } = need("@bufbuild/protobuf/wkt");

const p = parameters();
const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(p.descriptorSet)));
const Console = registry.getService("conlog.v1.Console");
assert(Console, "conlog.v1.Console is not in the descriptor set");
const ca = p.ca ? readFileSync(p.ca) : undefined;

function client(token, httpVersion) {
  const interceptors = token
    ? [(next) => (request) => {
        request.header.set("authorization", `Bearer ${token}`);
        return next(request);
      }]
    : [];
  // Over TLS, HTTP/1.1 offers ALPN "http/1.1" only and HTTP/2 offers "h2": the daemon must
  // accept both.
  const nodeOptions = ca
    ? httpVersion === "2"
      ? { ca }
      : { ca, ALPNProtocols: ["http/1.1"] }
    : undefined;
  const transport = createGrpcWebTransport({ baseUrl: p.baseUrl, httpVersion, nodeOptions, interceptors });
  return createClient(Console, transport);
}

function concat(parts) {
  return Buffer.concat(parts.map((part) => Buffer.from(part)));
}

/** Every byte of the stream from offset 0, checking that chunks follow each other. */
async function readAll(console, start) {
  const parts = [];
  const offsets = [];
  let next;
  for await (const chunk of console.readHistory({ guest: p.guest, stream: p.device, start })) {
    assert(!chunk.gap, `unexpected gap ${JSON.stringify(chunk.gap)}`);
    if (next !== undefined) {
      assert(chunk.offset === next, `chunk at ${chunk.offset}, expected ${next}`);
    }
    offsets.push(Number(chunk.offset));
    parts.push(chunk.data);
    next = chunk.offset + BigInt(chunk.data.length);
  }
  return { data: concat(parts), offsets };
}

/** The code a call ends with (`null`: it succeeded). */
async function codeOf(call) {
  try {
    await call();
    return null;
  } catch (e) {
    return Code[ConnectError.from(e).code];
  }
}

async function drain(stream) {
  for await (const _ of stream) {
    // The first message proves the call was allowed.
    return;
  }
}

/** ReadHistory in gRPC-web-text mode with fetch: base64 request, base64 response. */
async function readAsText(token) {
  const Request = registry.getMessage("conlog.v1.ReadHistoryRequest");
  const Chunk = registry.getMessage("conlog.v1.HistoryChunk");
  const message = toBinary(Request, create(Request, { guest: p.guest, stream: p.device }));
  const frame = Buffer.alloc(5 + message.length);
  frame.writeUInt32BE(message.length, 1);
  frame.set(message, 5);
  const response = await fetch(`${p.baseUrl}/conlog.v1.Console/ReadHistory`, {
    method: "POST",
    headers: {
      "content-type": "application/grpc-web-text",
      accept: "application/grpc-web-text",
      "x-grpc-web": "1",
      authorization: `Bearer ${token}`,
    },
    body: frame.toString("base64"),
  });
  assert(response.status === 200, `grpc-web-text: HTTP ${response.status}`);
  const type = response.headers.get("content-type");
  assert(type?.startsWith("application/grpc-web-text"), `grpc-web-text: content-type ${type}`);
  // Each frame is base64 of its own, padded: decode four characters at a time.
  const text = (await response.text()).replace(/\s/g, "");
  const quads = [];
  for (let i = 0; i < text.length; i += 4) quads.push(Buffer.from(text.slice(i, i + 4), "base64"));
  const body = Buffer.concat(quads);
  const parts = [];
  let trailers = "";
  for (let at = 0; at < body.length; ) {
    const flags = body[at];
    const length = body.readUInt32BE(at + 1);
    const payload = body.subarray(at + 5, at + 5 + length);
    at += 5 + length;
    if (flags & 0x80) {
      trailers += payload.toString("latin1");
    } else {
      parts.push(fromBinary(Chunk, payload).data);
    }
  }
  assert(/grpc-status:\s*0\r?\n?/.test(trailers), `grpc-web-text trailers: ${JSON.stringify(trailers)}`);
  return concat(parts);
}

const out = { reads: [], codes: {} };
for (const httpVersion of p.httpVersions) {
  const { data, offsets } = await readAll(client(p.tokens.readWrite, httpVersion), {
    case: "fromOffset",
    value: 0n,
  });
  out.reads.push({ httpVersion, data: data.toString("base64"), chunks: offsets.length, offsets });
}
const version = p.httpVersions[0];
const reader = client(p.tokens.read, version);
out.tail = (await readAll(reader, { case: "tailBytes", value: 1000n })).data.toString("base64");
if (p.text) out.text = (await readAsText(p.tokens.read)).toString("base64");

// The token rules of native gRPC, through gRPC-web.
const history = (c) => () => drain(c.readHistory({ guest: p.guest, stream: p.device }));
out.codes.noToken = await codeOf(history(client(null, version)));
out.codes.badToken = await codeOf(history(client("conlog1.bad.token", version)));
out.codes.otherGuest = await codeOf(history(client(p.tokens.otherGuest, version)));
out.codes.readHistoryRead = await codeOf(history(reader));
out.codes.watchReadWriteWithRead = await codeOf(() =>
  drain(reader.watchConsole({ guest: p.guest, device: p.device, mode: 2 })),
);
// A READ session exists (its stream stays open meanwhile), but its input is refused.
const abort = new AbortController();
const frames = reader
  .watchConsole({ guest: p.guest, device: p.device, mode: 1 }, { signal: abort.signal })
  [Symbol.asyncIterator]();
let sessionId = "";
try {
  const first = await frames.next();
  if (first.value?.frame.case === "attached") sessionId = first.value.frame.value.sessionId;
} catch (e) {
  fail(`WatchConsole READ_ONLY with a READ token: ${e}`);
}
assert(sessionId, "WatchConsole READ_ONLY gave no session id");
out.codes.sendInputWithRead = await codeOf(() =>
  reader.sendConsoleInput({ sessionId, data: new TextEncoder().encode("no") }),
);
abort.abort();
await frames.return?.().catch(() => {});
console.log(JSON.stringify(out));
// HTTP/2 sessions would keep the process alive for their idle timeout.
process.exit(0);
