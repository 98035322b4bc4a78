//! The web console against the real `conlogd`: gRPC-web on the TCP listener and the console
//! page at `/console/`.
//!
//! - The page in headless Chromium (Debian's `/usr/bin/chromium`, driven by `playwright-core`
//!   through `tests/web/browser.mjs`) with a fake guest: the last screen from history, live
//!   output, typed text reaching the guest byte for byte, guest disconnects shown, a read-only
//!   token that cannot type, and a reconnect after an in-place upgrade with no text duplicated
//!   or missing. Screenshots go to `target/tmp/web_console/`.
//! - `ReadHistory` over gRPC-web from Node with Connect's client (`@connectrpc/connect-node`,
//!   `tests/web/grpc_web_client.mjs`): HTTP/1.1 and HTTP/2, plaintext and TLS, binary and text
//!   modes, exact bytes, and the token rules of native gRPC.
//! - The page's committed build (`web/dist`, `web/src/gen`) matches its sources.
//! - Terminal safety: a read-write page never answers the terminal queries in output it shows
//!   again (first load, history filled in after a reconnect), answers live ones, and its filter
//!   meets the test vectors shared with conlogd's (`tests/data/terminal_queries.json`).
//!
//! Nothing is installed here: `bash scripts/test.sh` installs `chromium` (apt) and runs `npm ci`
//! in `web/`; a missing piece fails with the step that installs it.

use crate::support;

use conlog::proto::{self, Access};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const GUEST: &str = "vm-web";
const CHROMIUM: &str = "/usr/bin/chromium";
/// How long a Node script may run (Chromium starts, tsc checks the page's sources).
const NODE_DEADLINE: Duration = Duration::from_secs(120);

// Tools

/// Fails with the install step when Node, web/node_modules or (for `browser`) Chromium is
/// missing.
pub(crate) fn require_tools(browser: bool) {
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        panic!("node is not installed: run `apt-get install -y nodejs npm` (bash scripts/test.sh does)");
    }
    if !repo_dir()
        .join("web/node_modules/.package-lock.json")
        .exists()
    {
        panic!("web/node_modules is missing: run `npm ci` in web/ (bash scripts/test.sh does)");
    }
    if browser && !Path::new(CHROMIUM).exists() {
        panic!(
            "{CHROMIUM} is missing: run `apt-get install -y chromium` (bash scripts/test.sh does)"
        );
    }
}

/// `node tests/web/<script> '<params>'` to completion within [`NODE_DEADLINE`]; its stdout.
async fn node(script: &str, params: &Value) -> String {
    let mut command = Command::new("node");
    command
        .arg(repo_dir().join("tests/web").join(script))
        .arg(params.to_string())
        .current_dir(repo_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(NODE_DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("node {script} still running after {NODE_DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("run node {script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "node {script}: {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn base64(value: &Value, what: &str) -> Vec<u8> {
    use base64::Engine;
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {value}"));
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `text` with everything but unreserved URL characters percent-encoded.
pub(crate) fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where test artifacts (screenshots) go: `target/tmp/web_console/`.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web_console");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// One raw HTTP/1.1 exchange (`Connection: close`); the status line and the header block.
fn http_exchange(address: std::net::SocketAddr, request: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let head = response.split("\r\n\r\n").next().unwrap_or_default();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_ascii_lowercase())
}

// The committed build

/// `web/dist` and `web/src/gen` are what `npm run build` makes of the sources today.
#[tokio::test]
async fn committed_page_is_built_from_its_sources() {
    require_tools(false);
    let started = Instant::now();
    let mut command = Command::new("node");
    command
        .arg("build.mjs")
        .arg("--check")
        .current_dir(repo_dir().join("web"))
        .kill_on_drop(true);
    let output = tokio::time::timeout(NODE_DEADLINE, command.output())
        .await
        .expect("web/build.mjs --check still running")
        .expect("run node web/build.mjs --check");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("web/build.mjs --check: {:?}", started.elapsed());
}

/// The page's terminal-query filter (`web/src/terminal_safety.ts`) gives what conlogd's
/// (`src/terminal_safety.rs`, checked by its unit tests) gives for every shared test vector
/// (`tests/data/terminal_queries.json`): the two cannot drift apart.
#[tokio::test]
async fn page_filter_meets_the_shared_vectors() {
    require_tools(false);
    let mut command = Command::new("node");
    command
        .arg("test/terminal_safety.test.mjs")
        .current_dir(repo_dir().join("web"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(NODE_DEADLINE, command.output())
        .await
        .expect("web/test/terminal_safety.test.mjs still running")
        .expect("run node web/test/terminal_safety.test.mjs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let counts: Value = serde_json::from_str(stdout.trim()).expect("the test's counts");
    let vectors: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_dir().join("tests/data/terminal_queries.json")).unwrap(),
    )
    .unwrap();
    for key in ["queries", "ordinary", "cases"] {
        assert_eq!(
            counts[key].as_u64(),
            vectors[key].as_array().map(|a| a.len() as u64),
            "every {key} vector checked: {counts}"
        );
    }
}

// The page and CORS on the listener

/// The page and its assets come from the TCP listener, as committed in web/dist; gRPC-web
/// from an origin that is neither the listener's own nor configured is refused before any
/// service sees it; native gRPC still works on the same port.
#[tokio::test]
async fn page_is_served_and_foreign_origins_are_refused() {
    let daemon = Daemon::start().await;
    let (status, body) = http_get(daemon.tcp, "/console/?guest=x");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("console.js") && body.contains("id=\"terminal\""));
    for (path, file) in [
        ("/console/console.js", "web/dist/console.js"),
        ("/console/console.css", "web/dist/console.css"),
    ] {
        let (status, body) = http_get(daemon.tcp, path);
        assert!(status.contains("200"), "{path}: {status}");
        let committed = std::fs::read_to_string(repo_dir().join(file)).unwrap();
        assert!(body == committed, "{path} is not {file}");
    }
    let (status, _) = http_get(daemon.tcp, "/console");
    assert!(status.contains("308"), "{status}");

    let tcp = daemon.tcp;
    let preflight = format!(
        "OPTIONS /conlog.v1.Console/ReadHistory HTTP/1.1\r\nHost: {tcp}\r\n\
         Origin: https://evil.example.com\r\nAccess-Control-Request-Method: POST\r\n\
         Access-Control-Request-Headers: authorization,content-type,x-grpc-web\r\n\
         Connection: close\r\n\r\n"
    );
    let (status, headers) = http_exchange(tcp, &preflight);
    assert!(status.contains("403"), "{status}");
    assert!(
        !headers.contains("access-control-allow-origin"),
        "{headers}"
    );
    let call = |origin: &str| {
        format!(
            "POST /conlog.v1.Console/ReadHistory HTTP/1.1\r\nHost: {tcp}\r\nOrigin: {origin}\r\n\
             Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\nContent-Length: 5\r\n\
             Connection: close\r\n\r\n\0\0\0\0\0"
        )
    };
    let (status, _) = http_exchange(tcp, &call("https://evil.example.com"));
    assert!(status.contains("403"), "{status}");
    // The listener's own origin passes, and meets the token rules: no token, UNAUTHENTICATED.
    let (status, headers) = http_exchange(tcp, &call(&format!("http://{tcp}")));
    assert!(status.contains("200"), "{status}");
    assert!(headers.contains("grpc-status: 16"), "{headers}");
    assert!(
        headers.contains("content-type: application/grpc-web"),
        "{headers}"
    );

    // Native gRPC on the same port.
    let mut agent = daemon.agent().await;
    open_console(&mut agent, GUEST).await;
    let channel = daemon.tcp_channel(GUEST).await;
    let reply = channel
        .console()
        .read_history(proto::ReadHistoryRequest {
            guest: GUEST.into(),
            ..Default::default()
        })
        .await;
    assert!(reply.is_ok(), "native gRPC on TCP: {reply:?}");
}

/// `web.allowed_origins` reaches the listener: a configured origin gets its preflight
/// answered and CORS headers on calls.
#[tokio::test]
async fn configured_origins_get_cors() {
    let daemon = Daemon::start_with(
        Some("web:\n  allowed_origins: [https://dash.example.com]\n"),
        &[],
    )
    .await;
    let tcp = daemon.tcp;
    let preflight = format!(
        "OPTIONS /conlog.v1.Console/ReadHistory HTTP/1.1\r\nHost: {tcp}\r\n\
         Origin: https://dash.example.com\r\nAccess-Control-Request-Method: POST\r\n\
         Connection: close\r\n\r\n"
    );
    let (status, headers) = http_exchange(tcp, &preflight);
    assert!(status.contains("204"), "{status}");
    assert!(
        headers.contains("access-control-allow-origin: https://dash.example.com"),
        "{headers}"
    );
}

// gRPC-web from Node

/// What the guest prints for the Node clients: every byte value, invalid UTF-8, escapes.
fn guest_bytes() -> Vec<u8> {
    let mut data = b"hello from the guest\r\n\x1b[1mbold\x1b[0m \xff\xfe\xc3\r\n".to_vec();
    data.extend((0..=255u8).chain((0..=255u8).rev()));
    data.extend(pattern(0, 5000));
    data
}

/// A console whose guest printed [`guest_bytes`], and the tokens the Node client needs.
async fn printed_console(daemon: &Daemon) -> (Vec<u8>, Value) {
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, GUEST).await;
    open_console(&mut agent, "vm-other").await;
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    let data = guest_bytes();
    guest.write(&data).await;
    wait_offset(&mut agent, GUEST, DEVICE, data.len() as u64).await;
    let tokens = json!({
        "readWrite": daemon.token(GUEST, DEVICE, Access::ReadWrite, 600).await,
        "read": daemon.token(GUEST, "", Access::Read, 600).await,
        "otherGuest": daemon.token("vm-other", "", Access::ReadWrite, 600).await,
    });
    (data, tokens)
}

fn descriptor_set(dir: &Path) -> PathBuf {
    let path = dir.join("console.binpb");
    std::fs::write(&path, proto::CONSOLE_FILE_DESCRIPTOR_SET).unwrap();
    path
}

/// Checks the Node client's report: every read is `data`, the tail its last 1000 bytes, and
/// the token rules are native gRPC's.
fn check_report(report: &str, data: &[u8], versions: &[&str], text: bool) {
    let report: Value = serde_json::from_str(report.trim())
        .unwrap_or_else(|e| panic!("Node report {report:?}: {e}"));
    let reads = report["reads"].as_array().expect("reads");
    assert_eq!(reads.len(), versions.len(), "{report}");
    for (read, version) in reads.iter().zip(versions) {
        assert_eq!(read["httpVersion"], *version);
        let what = format!("ReadHistory over gRPC-web, HTTP/{version}");
        assert_same(&what, &base64(&read["data"], &what), data);
        assert!(
            read["chunks"].as_u64().unwrap() > 1,
            "{what}: history.chunk_size is 1KiB, so several chunks: {read}"
        );
    }
    assert_same(
        "tail_bytes 1000 over gRPC-web",
        &base64(&report["tail"], "tail"),
        &data[data.len() - 1000..],
    );
    if text {
        assert_same(
            "ReadHistory in gRPC-web-text mode",
            &base64(&report["text"], "text"),
            data,
        );
    }
    let codes = &report["codes"];
    for (call, code) in [
        ("noToken", json!("Unauthenticated")),
        ("badToken", json!("Unauthenticated")),
        ("otherGuest", json!("PermissionDenied")),
        ("readHistoryRead", Value::Null),
        ("watchReadWriteWithRead", json!("PermissionDenied")),
        ("sendInputWithRead", json!("PermissionDenied")),
    ] {
        assert_eq!(codes[call], code, "{call}: {codes}");
    }
}

/// Connect's gRPC-web client reads the exact bytes over HTTP/1.1 and HTTP/2 (h2c), a
/// hand-made gRPC-web-text request too, and the token rules hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_from_node_reads_exact_bytes() {
    require_tools(false);
    let started = Instant::now();
    let daemon = Daemon::start_with(Some("history:\n  chunk_size: 1KiB\n"), &[]).await;
    let (data, tokens) = printed_console(&daemon).await;
    let dir = tempfile::tempdir().unwrap();
    let report = node(
        "grpc_web_client.mjs",
        &json!({
            "baseUrl": format!("http://{}", daemon.tcp),
            "guest": GUEST,
            "device": DEVICE,
            "descriptorSet": descriptor_set(dir.path()),
            "tokens": tokens,
            "httpVersions": ["1.1", "2"],
            "text": true,
        }),
    )
    .await;
    check_report(&report, &data, &["1.1", "2"], true);
    eprintln!("gRPC-web from Node: {:?}", started.elapsed());
}

/// The same over TLS: HTTP/1.1 (ALPN `http/1.1`) and HTTP/2 (ALPN `h2`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_from_node_over_tls() {
    require_tools(false);
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(dir.path());
    let yaml = format!(
        "history:\n  chunk_size: 1KiB\ntls:\n  cert: {}\n  key: {}\n",
        cert.display(),
        key.display()
    );
    let daemon = Daemon::start_with(Some(&yaml), &[]).await;
    let (data, tokens) = printed_console(&daemon).await;
    let report = node(
        "grpc_web_client.mjs",
        &json!({
            "baseUrl": format!("https://localhost:{}", daemon.tcp.port()),
            "guest": GUEST,
            "device": DEVICE,
            "descriptorSet": descriptor_set(dir.path()),
            "tokens": tokens,
            "ca": ca,
            "httpVersions": ["1.1", "2"],
            "text": false,
        }),
    )
    .await;
    check_report(&report, &data, &["1.1", "2"], false);
}

/// The same through `conlog-gateway` (docs/gateway.md) in front of a node: a browser's client
/// cannot tell it from the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_through_a_gateway() {
    require_tools(false);
    let pki = Pki::new();
    let daemon = pki.node_with(false, "history:\n  chunk_size: 1KiB\n").await;
    let gateway = Gateway::start(&pki, "3s").await;
    let (data, tokens) = printed_console(&daemon).await;
    let report = node(
        "grpc_web_client.mjs",
        &json!({
            "baseUrl": format!("https://localhost:{}", gateway.address.port()),
            "guest": GUEST,
            "device": DEVICE,
            "descriptorSet": descriptor_set(pki.dir.path()),
            "tokens": tokens,
            "ca": pki.path("server-ca.pem"),
            "httpVersions": ["1.1", "2"],
            "text": false,
        }),
    )
    .await;
    check_report(&report, &data, &["1.1", "2"], false);
}

/// The console page served by a gateway (docs/gateway.md) in headless Chromium: history then
/// live output of the node's guest, and typing that reaches it, as from a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_page_through_a_gateway_in_headless_chromium() {
    require_tools(true);
    let pki = Pki::new();
    let daemon = pki.node(false).await;
    let gateway = Gateway::start(&pki, "3s").await;
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, GUEST).await;
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    wait_guest_connected(&mut agent, GUEST, DEVICE, true).await;
    guest.write(b"booted behind the gateway\r\n").await;
    wait_offset(&mut agent, GUEST, DEVICE, 27).await;
    let token = daemon.token(GUEST, DEVICE, Access::ReadWrite, 600).await;
    let url = format!(
        "https://localhost:{}/console/?guest={GUEST}&device={DEVICE}#token={}",
        gateway.address.port(),
        url_encode(&token)
    );
    let mut browser = Browser::launch().await;
    browser.open_insecure("gw", &url).await;
    browser.wait("gw", LIVE).await;
    browser
        .wait(
            "gw",
            "window.conlog.text().includes('booted behind the gateway')",
        )
        .await;
    guest.write(b"live through it\r\n").await;
    browser
        .wait("gw", "window.conlog.text().includes('live through it')")
        .await;
    browser.click("gw", "#terminal").await;
    browser.type_text("gw", "typed").await;
    guest.wait_len(5).await;
    assert_same(
        "typed in the page, through the gateway",
        guest.received(),
        b"typed",
    );
}

/// A CA and a server certificate for `localhost` signed by it, as PEM files in `dir`:
/// (ca, cert, key).
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "web console test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "web console test server");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    (
        write("ca.pem", ca.pem()),
        write("cert.pem", cert.pem()),
        write("key.pem", key.serialize_pem()),
    )
}

// The page in Chromium

/// Chromium under `tests/web/browser.mjs`, one JSON command per line.
pub(crate) struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
    next_id: u64,
}

impl Browser {
    pub(crate) async fn launch() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("browser.stderr");
        let mut child = Command::new("node")
            .arg(repo_dir().join("tests/web/browser.mjs"))
            .current_dir(repo_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("run node tests/web/browser.mjs: {e}"));
        let mut browser = Self {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
            child,
            stderr,
            _dir: dir,
            next_id: 1,
        };
        let version = browser.answer(0, "start Chromium").await;
        eprintln!("Chromium {version}");
        browser
    }

    fn diagnostics(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    async fn answer(&mut self, id: u64, what: &str) -> Value {
        let line = tokio::time::timeout(NODE_DEADLINE, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("browser: no answer to {what}"));
        let Ok(Some(line)) = line else {
            let status = self.child.try_wait();
            panic!(
                "browser exited ({status:?}) during {what}; stderr:\n{}",
                self.diagnostics()
            );
        };
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["id"], id, "{answer}");
        if answer["ok"] != true {
            panic!(
                "browser: {what} failed: {}\n--- browser stderr ---\n{}",
                answer["error"].as_str().unwrap_or_default(),
                self.diagnostics()
            );
        }
        answer["value"].clone()
    }

    async fn call(&mut self, mut command: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = id.into();
        let what = command.to_string();
        self.stdin
            .write_all(format!("{what}\n").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("browser stdin: {e}; stderr:\n{}", self.diagnostics()));
        self.answer(id, &what).await
    }

    pub(crate) async fn open(&mut self, page: &str, url: &str) {
        self.call(json!({"op": "open", "page": page, "url": url}))
            .await;
    }

    /// Opens `url` served with a certificate the browser does not know (the test's CA).
    pub(crate) async fn open_insecure(&mut self, page: &str, url: &str) {
        self.call(json!({"op": "open", "page": page, "url": url, "insecure": true}))
            .await;
    }

    pub(crate) async fn eval(&mut self, page: &str, expr: &str) -> Value {
        self.call(json!({"op": "eval", "page": page, "expr": expr}))
            .await
    }

    /// Waits until `until` (JavaScript) holds in `page`; on failure shows the page's state.
    pub(crate) async fn wait(&mut self, page: &str, until: &str) {
        let id = self.next_id;
        self.next_id += 1;
        let command = json!({"id": id, "op": "wait", "page": page, "until": until});
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        let line = tokio::time::timeout(NODE_DEADLINE, self.stdout.next_line())
            .await
            .ok()
            .and_then(|l| l.ok().flatten())
            .unwrap_or_default();
        let answer: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if answer["ok"] != true {
            let state = self
                .eval(
                    page,
                    "JSON.stringify({body: {...document.body.dataset}, \
                     banner: document.getElementById('banner').textContent, \
                     events: window.conlog?.events.slice(-20), text: window.conlog?.text()})",
                )
                .await;
            panic!(
                "page {page}: not `{until}`: {}\npage state: {}\n--- browser stderr ---\n{}",
                answer["error"].as_str().unwrap_or(&line),
                state.as_str().unwrap_or_default(),
                self.diagnostics()
            );
        }
    }

    pub(crate) async fn text(&mut self, page: &str) -> String {
        let text = self.eval(page, "window.conlog.text()").await;
        text.as_str().unwrap_or_default().to_owned()
    }

    async fn dataset(&mut self, page: &str, key: &str) -> String {
        let value = self
            .eval(page, &format!("document.body.dataset[{key:?}]"))
            .await;
        value.as_str().unwrap_or_default().to_owned()
    }

    pub(crate) async fn type_text(&mut self, page: &str, text: &str) {
        self.call(json!({"op": "type", "page": page, "text": text}))
            .await;
    }

    pub(crate) async fn press(&mut self, page: &str, key: &str) {
        self.call(json!({"op": "press", "page": page, "key": key}))
            .await;
    }

    /// Clicks the page's terminal, types `text` and presses Enter.
    pub(crate) async fn type_line(&mut self, page: &str, text: &str) {
        self.click(page, "#terminal").await;
        self.type_text(page, text).await;
        self.press(page, "Enter").await;
    }

    pub(crate) async fn click(&mut self, page: &str, selector: &str) {
        self.call(json!({"op": "click", "page": page, "selector": selector}))
            .await;
    }

    async fn screenshot(&mut self, page: &str, path: &Path) {
        self.call(json!({"op": "screenshot", "page": page, "path": path}))
            .await;
    }

    /// Holds the page's new requests to `url` (a glob) until [`release`](Self::release).
    async fn hold(&mut self, page: &str, url: &str) {
        self.call(json!({"op": "hold", "page": page, "url": url}))
            .await;
    }

    /// How many requests [`hold`](Self::hold) holds.
    async fn held(&mut self, page: &str) -> u64 {
        let held = self.call(json!({"op": "held", "page": page})).await;
        held.as_u64().unwrap_or_default()
    }

    /// Lets the held requests go on, and stops holding.
    async fn release(&mut self, page: &str, url: &str) {
        self.call(json!({"op": "release", "page": page, "url": url}))
            .await;
    }

    pub(crate) async fn exit(mut self) {
        let _ = self.stdin.write_all(b"{\"id\":0,\"op\":\"exit\"}\n").await;
        let _ = tokio::time::timeout(DEADLINE, self.child.wait()).await;
    }
}

/// Saves `page` as `target/tmp/web_console/console-<name>.png`, for a person to look at.
async fn screenshot(browser: &mut Browser, page: &str, name: &str) {
    let path = artifacts().join(format!("console-{name}.png"));
    browser.screenshot(page, &path).await;
    println!("screenshot: {}", path.display());
}

/// `count` numbered lines `tick NNNN` from `first`.
fn ticks(first: u32, count: u32) -> Vec<u8> {
    (first..first + count)
        .flat_map(|i| format!("tick {i:04}\r\n").into_bytes())
        .collect()
}

/// The `tick` lines of a terminal's text, which must be exactly `tick 0001`…`tick last`.
fn assert_ticks(page: &str, text: &str, last: u32) {
    let seen: Vec<&str> = text.lines().filter(|l| l.starts_with("tick ")).collect();
    let expected: Vec<String> = (1..=last).map(|i| format!("tick {i:04}")).collect();
    if seen != expected {
        let first_bad = seen
            .iter()
            .zip(&expected)
            .position(|(s, e)| s != e)
            .unwrap_or(seen.len().min(expected.len()));
        panic!(
            "page {page}: {} tick lines, expected {last}; first difference at line {first_bad}: \
             {:?} vs {:?}\n{text}",
            seen.len(),
            seen.get(first_bad),
            expected.get(first_bad)
        );
    }
}

pub(crate) const LIVE: &str = "document.body.dataset.connection === 'live'";

/// The console page in headless Chromium against the real daemon and a fake guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_page_in_headless_chromium() {
    require_tools(true);
    let started = Instant::now();
    // The page attaches without a replay and reads what it missed from history; a small
    // max_replay keeps it honest.
    let daemon = Daemon::start_with(Some("consoles:\n  max_replay: 1KiB\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, GUEST).await;
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    wait_guest_connected(&mut agent, GUEST, DEVICE, true).await;
    let boot: Vec<u8> = (1..=60)
        .flat_map(|i| format!("boot line {i:03}\r\n").into_bytes())
        .collect();
    guest.write(&boot).await;
    wait_offset(&mut agent, GUEST, DEVICE, boot.len() as u64).await;

    let read_write = daemon.token(GUEST, DEVICE, Access::ReadWrite, 600).await;
    let read = daemon.token(GUEST, "", Access::Read, 600).await;
    let url = |token: &str| {
        format!(
            "http://{}/console/?guest={GUEST}&device={DEVICE}#token={}",
            daemon.tcp,
            url_encode(token)
        )
    };
    let mut browser = Browser::launch().await;

    // 1. The last screen from history, then live output.
    browser.open("rw", &url(&read_write)).await;
    browser.wait("rw", LIVE).await;
    let text = browser.text("rw").await;
    let lines: Vec<&str> = text.lines().collect();
    let first: u32 = lines
        .first()
        .and_then(|l| l.strip_prefix("boot line "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the page starts with history: {text:?}"));
    let expected: Vec<String> = (first..=60).map(|i| format!("boot line {i:03}")).collect();
    assert_eq!(
        lines, expected,
        "the last screen of history, once, in order"
    );
    assert!(
        (2..=60 - 23).contains(&first),
        "a screenful of the tail (at least 24 lines), not everything: from line {first}"
    );
    assert_eq!(browser.dataset("rw", "access").await, "read-write");
    assert_eq!(browser.dataset("rw", "guest").await, "connected");
    guest
        .write(b"live: \x1b[1mbold\x1b[0m and \xc3\xa9t\xc3\xa9\r\n")
        .await;
    browser
        .wait("rw", "window.conlog.text().includes('live: bold and été')")
        .await;

    // 2. Typed text reaches the guest byte for byte: UTF-8, Enter, Tab, Backspace, arrows,
    // Ctrl-C.
    browser.click("rw", "#terminal").await;
    browser.type_text("rw", "echo héllo wörld €").await;
    for key in ["Enter", "Tab", "Backspace", "ArrowUp", "Control+c"] {
        browser.press("rw", key).await;
    }
    let typed = "echo héllo wörld €\r\t\x7f\x1b[A\x03".as_bytes();
    guest.wait_len(typed.len()).await;
    assert_same(
        "typed in the page, read by the guest",
        guest.received(),
        typed,
    );

    // 3. The guest disconnects and comes back.
    drop(guest);
    browser
        .wait(
            "rw",
            "document.body.dataset.guest === 'disconnected' && \
             document.getElementById('banner').textContent.includes('Guest disconnected')",
        )
        .await;
    screenshot(&mut browser, "rw", "guest-disconnected").await;
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    browser
        .wait(
            "rw",
            "document.body.dataset.guest === 'connected' && document.getElementById('banner').hidden",
        )
        .await;

    // 4. A read-only token: watches, shows it, cannot type.
    browser.open("ro", &url(&read)).await;
    browser.wait("ro", LIVE).await;
    assert_eq!(browser.dataset("ro", "access").await, "read-only");
    let badge = browser
        .eval("ro", "document.getElementById('access').textContent")
        .await;
    assert_eq!(badge, "read-only token");
    let stdin_off = browser
        .eval("ro", "window.conlog.terminal.options.disableStdin")
        .await;
    assert_eq!(stdin_off, true);
    let takeover = browser
        .eval("ro", "document.getElementById('takeover').hidden")
        .await;
    assert_eq!(
        takeover, true,
        "no way to take the keyboard with a READ token"
    );
    browser.type_line("ro", "ro-secret").await;
    browser.type_line("rw", "rw-marker").await;
    expect_typed(&mut guest, "only the read-write page's input", "rw-marker").await;
    guest.write(b"for both pages\r\n").await;
    for page in ["rw", "ro"] {
        browser
            .wait(page, "window.conlog.text().includes('for both pages')")
            .await;
    }

    // 5. An in-place upgrade: both pages reconnect and resume by offset, with every line
    // printed before, during and after it exactly once.
    guest.write(&ticks(1, 100)).await;
    for page in ["rw", "ro"] {
        browser
            .wait(page, "window.conlog.text().includes('tick 0100')")
            .await;
    }
    daemon.signal(rustix::process::Signal::USR1);
    browser
        .wait(
            "rw",
            "document.body.dataset.connection === 'reconnecting' && \
             document.getElementById('banner').textContent.includes('Connection to conlogd lost')",
        )
        .await;
    // Printed while the pages are away: more than the replay (1KiB), the rest from history.
    guest.write(&ticks(101, 300)).await;
    let deadline = Instant::now() + DEADLINE;
    while daemon.stderr().matches("conlogd ready").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no second ready line:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(POLL).await;
    }
    guest.write(&ticks(401, 100)).await;
    for page in ["rw", "ro"] {
        browser
            .wait(
                page,
                "window.conlog.text().includes('tick 0500') && \
                 window.conlog.session.reconnects >= 1 && document.body.dataset.connection === 'live'",
            )
            .await;
        let text = browser.text(page).await;
        assert_ticks(page, &text, 500);
        let seen = browser
            .eval(
                page,
                "window.conlog.events.some(e => e.what === 'connection:reconnecting')",
            )
            .await;
        assert_eq!(seen, true, "page {page} showed the dropped connection");
        let fills = browser
            .eval(
                page,
                "window.conlog.events.filter(e => e.what === 'history').map(e => e.detail)",
            )
            .await;
        eprintln!("page {page} resumed after the upgrade; history reads: {fills}");
    }
    assert_eq!(browser.dataset("ro", "access").await, "read-only");
    guest.clear_received();
    browser.type_line("rw", "after the upgrade").await;
    expect_typed(&mut guest, "input after the reconnect", "after the upgrade").await;

    screenshot(&mut browser, "rw", "read-write").await;
    screenshot(&mut browser, "ro", "read-only").await;

    // 6. A second read-write page finds the keyboard held, takes it (force), and the first
    // page says it lost it.
    browser.open("rw2", &url(&read_write)).await;
    browser.wait("rw2", LIVE).await;
    let held = "document.getElementById('access').textContent";
    assert_eq!(
        browser.eval("rw2", held).await,
        "read-only: another client has the keyboard"
    );
    browser.click("rw2", "#takeover").await;
    browser
        .wait("rw2", "document.body.dataset.access === 'read-write'")
        .await;
    browser
        .wait(
            "rw",
            "document.getElementById('access').textContent === \
             'read-only: another client took the keyboard' && \
             !document.getElementById('takeover').hidden",
        )
        .await;
    screenshot(&mut browser, "rw", "keyboard-taken").await;
    guest.clear_received();
    browser.type_line("rw2", "from the second page").await;
    expect_typed(
        &mut guest,
        "input of the page that took the keyboard",
        "from the second page",
    )
    .await;

    // 7. Rotating the token key ends the pages, and they say why.
    agent = daemon.agent().await;
    agent
        .rotate_token_key(proto::RotateTokenKeyRequest {})
        .await
        .expect("RotateTokenKey");
    for page in ["rw", "ro", "rw2"] {
        browser
            .wait(
                page,
                "document.body.dataset.connection === 'ended' && \
                 document.getElementById('banner').textContent.includes('Token refused')",
            )
            .await;
    }
    browser.exit().await;
    eprintln!("console page in Chromium: {:?}", started.elapsed());
}

/// Waits until the guest has read `line` and Enter, and checks it read exactly that (nothing
/// else since its last `clear_received`).
async fn expect_typed(guest: &mut FakeGuest, what: &str, line: &str) {
    let want = format!("{line}\r");
    guest.wait_for(want.as_bytes()).await;
    assert_same(what, guest.received(), want.as_bytes());
}

// Terminal safety in the page

/// What a guest's shell and tools print that makes a terminal answer (docs/consoles.md,
/// "Terminal safety"): xterm.js answers every one of these, and the page would send the answers
/// to the guest as keystrokes.
const QUERIES: &[&[u8]] = &[
    b"\x1b[6n",         // DSR: cursor position report
    b"\x1b[5n",         // DSR: status
    b"\x1b[c",          // DA1
    b"\x1b[>c",         // DA2
    b"\x1b[=c",         // DA3
    b"\x1b[?2004$p",    // DECRQM
    b"\x1bP$qm\x1b\\",  // DECRQSS
    b"\x1b[>0q",        // XTVERSION
    b"\x1b]10;?\x07",   // foreground colour
    b"\x1b]11;?\x1b\\", // background colour
    b"\x1b]12;?\x07",   // cursor colour
    b"\x1b[14t",        // window size in pixels
    b"\x1b[18t",        // text area size in characters
    // C1 controls encoded in UTF-8: xterm.js parses code points (U+009B is CSI, U+009D OSC,
    // U+0090 DCS, U+009C ST).
    b"\xc2\x9b6n",
    b"\xc2\x9d11;?\xc2\x9c",
    b"\xc2\x90$qm\xc2\x9c",
];

/// Output of a guest's shell with every query of [`QUERIES`] after its prompts: `lines`
/// lines `<tag> NN` in colour, each followed by queries.
fn prompts_with_queries(tag: &str, lines: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for line in 0..lines {
        out.extend(format!("\x1b[1;32m{tag} {line:02}\x1b[0m:~# ").bytes());
        for query in QUERIES.iter().cycle().skip(line).take(QUERIES.len()) {
            out.extend_from_slice(query);
        }
        out.extend_from_slice(b"ls\r\n");
    }
    out
}

/// Whether `received` is exactly one or more terminal answers: `ESC [ … R` (cursor position)
/// or `ESC [ ? … c` (device attributes).
fn answers_only(received: &[u8]) -> bool {
    let text = String::from_utf8_lossy(received);
    let mut rest = text.as_ref();
    if rest.is_empty() {
        return false;
    }
    while let Some(after) = rest.strip_prefix("\x1b[") {
        let Some(end) = after.find(['R', 'c']) else {
            return false;
        };
        let body = &after[..end];
        if !body
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b';' || b == b'?')
        {
            return false;
        }
        rest = &after[end + 1..];
    }
    rest.is_empty()
}

/// A read-write page never answers the queries in what it shows again (the last screen on its
/// first load, output filled in from history after a reconnect): the guest receives exactly
/// what was typed on the page. A query the guest prints live is answered by xterm.js, as on a
/// real serial line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_answers_live_queries_only() {
    require_tools(true);
    let daemon = Daemon::start_with(Some("history:\n  chunk_size: 1KiB\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, GUEST).await;
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    wait_guest_connected(&mut agent, GUEST, DEVICE, true).await;
    // Printed before the page attaches: the page shows it from history.
    let mut before = prompts_with_queries("before", 12);
    before.extend_from_slice(b"end of boot\r\n");
    guest.write(&before).await;
    wait_offset(&mut agent, GUEST, DEVICE, before.len() as u64).await;

    let token = daemon.token(GUEST, DEVICE, Access::ReadWrite, 600).await;
    let url = format!(
        "http://{}/console/?guest={GUEST}&device={DEVICE}#token={}",
        daemon.tcp,
        url_encode(&token)
    );
    let mut browser = Browser::launch().await;

    // 1. The first load: the prompts are shown (colours and all), their queries unanswered.
    browser.open("rw", &url).await;
    browser.wait("rw", LIVE).await;
    browser
        .wait("rw", "window.conlog.text().includes('end of boot')")
        .await;
    let text = browser.text("rw").await;
    for line in 0..12 {
        assert!(
            text.contains(&format!("before {line:02}:~# ls")),
            "prompt {line} shown without its queries:\n{text}"
        );
    }
    assert_eq!(browser.dataset("rw", "access").await, "read-write");
    browser.type_line("rw", "typed-on-load").await;
    expect_typed(
        &mut guest,
        "the guest after the page loaded",
        "typed-on-load",
    )
    .await;

    // 2. Live queries are answered, as on a serial line: the cursor position report (DSR) and
    // the device attributes (DA1).
    guest.clear_received();
    guest.write(b"live prompt# \x1b[6n").await;
    guest
        .wait_until("xterm.js's cursor position report", |r| r.ends_with(b"R"))
        .await;
    assert!(
        answers_only(guest.received()),
        "a cursor position report: {:?}",
        guest.received().escape_ascii().to_string()
    );
    guest.clear_received();
    guest.write(b"\x1b[c").await;
    guest
        .wait_until("xterm.js's device attributes", |r| r.ends_with(b"c"))
        .await;
    assert!(
        guest.received().starts_with(b"\x1b[?") && answers_only(guest.received()),
        "device attributes: {:?}",
        guest.received().escape_ascii().to_string()
    );
    guest.write(b"\r\n").await;

    // 3. Output printed while the page is away (an upgrade; its new attach is held until the
    // output is logged) is filled in from history when it reconnects: queries unanswered.
    let watch = "**/conlog.v1.Console/WatchConsole";
    browser.hold("rw", watch).await;
    daemon.signal(rustix::process::Signal::USR1);
    browser
        .wait("rw", "document.body.dataset.connection === 'reconnecting'")
        .await;
    let deadline = Instant::now() + DEADLINE;
    while daemon.stderr().matches("conlogd ready").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no second ready line:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(POLL).await;
    }
    guest.clear_received();
    let mut away = prompts_with_queries("away", 6);
    away.extend_from_slice(b"end of away\r\n");
    guest.write(&away).await;
    let mut agent = daemon.agent().await;
    let live = b"live prompt# \x1b[6n\x1b[c\r\n".len();
    wait_offset(
        &mut agent,
        GUEST,
        DEVICE,
        (before.len() + live + away.len()) as u64,
    )
    .await;
    let deadline = Instant::now() + DEADLINE;
    while browser.held("rw").await == 0 {
        assert!(
            Instant::now() < deadline,
            "the page never tried to reconnect"
        );
        tokio::time::sleep(POLL).await;
    }
    browser.release("rw", watch).await;
    browser
        .wait(
            "rw",
            "window.conlog.text().includes('end of away') && \
             window.conlog.session.reconnects >= 1 && document.body.dataset.connection === 'live'",
        )
        .await;
    let fills = browser
        .eval(
            "rw",
            "window.conlog.events.filter(e => e.what === 'history').map(e => e.detail)",
        )
        .await;
    assert!(
        fills.as_array().is_some_and(|f| !f.is_empty()),
        "what was printed while away came from history: {fills}"
    );
    let text = browser.text("rw").await;
    for line in 0..6 {
        assert!(
            text.contains(&format!("away {line:02}:~# ls")),
            "prompt {line} printed while away, shown without its queries:\n{text}"
        );
    }
    browser.type_line("rw", "typed-after-reconnect").await;
    expect_typed(
        &mut guest,
        "the guest after the page reconnected",
        "typed-after-reconnect",
    )
    .await;
    screenshot(&mut browser, "rw", "queries").await;
    browser.exit().await;
}

/// The page opened with `since=` (an RFC 3339 time) shows history from the first line logged
/// at or after it, not before; the time of a line shows in the status bar when the mouse is
/// over it, and is the time that line was logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_page_opens_at_a_time_and_shows_line_times() {
    require_tools(true);
    let rfc = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let console = open_console(&mut agent, GUEST).await;
    let mut guest = FakeGuest::connect(&console.guest_socket).await;
    wait_guest_connected(&mut agent, GUEST, DEVICE, true).await;
    let early = b"early 1\r\nearly 2\r\n";
    guest.write(early).await;
    wait_offset(&mut agent, GUEST, DEVICE, early.len() as u64).await;
    // More than the index's quiet second: the next line has an entry of its own.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let since = time::OffsetDateTime::now_utc();
    let later = b"later 1\r\nlater 2\r\n";
    guest.write(later).await;
    wait_offset(
        &mut agent,
        GUEST,
        DEVICE,
        (early.len() + later.len()) as u64,
    )
    .await;
    let logged = time::OffsetDateTime::now_utc();

    let token = daemon.token(GUEST, DEVICE, Access::Read, 600).await;
    let url = format!(
        "http://{}/console/?guest={GUEST}&device={DEVICE}&since={}#token={}",
        daemon.tcp,
        url_encode(&rfc(since)),
        url_encode(&token)
    );
    let mut browser = Browser::launch().await;
    browser.open("t", &url).await;
    browser.wait("t", LIVE).await;
    let text = browser.text("t").await;
    assert_eq!(text, "later 1\nlater 2", "history from the time asked");
    // The time of row 0, as the status bar shows it when the mouse is over it.
    let shown = browser
        .eval(
            "t",
            "(() => { const r = document.querySelector('#terminal .xterm-screen').getBoundingClientRect(); \
             document.getElementById('terminal').dispatchEvent(new MouseEvent('mousemove', \
             {clientX: r.left + 5, clientY: r.top + 2, bubbles: true})); \
             const t = document.getElementById('linetime'); return t.hidden ? '' : t.textContent; })()",
        )
        .await;
    let shown = shown.as_str().unwrap_or_default().to_owned();
    assert_eq!(
        browser.eval("t", "window.conlog.timeOfRow(0)").await,
        shown.as_str()
    );
    let at = time::OffsetDateTime::parse(&shown, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("status bar time {shown:?}: {e}"));
    assert!(
        since <= at && at <= logged,
        "{shown} not within {since}..{logged}"
    );
    // Live output: the time it arrived, marked as such.
    guest.write(b"live 1\r\n").await;
    browser
        .wait("t", "window.conlog.text().includes('live 1')")
        .await;
    let live = browser.eval("t", "window.conlog.timeOfRow(2)").await;
    assert!(
        live.as_str().unwrap_or_default().ends_with("(received)"),
        "{live}"
    );
}

/// The page's Send BREAK button (docs/consoles.md, "Serial BREAK"): shown while the page holds
/// the keyboard of a mux console, it sends `Ctrl-A b` after what was typed before it (a Ctrl-A
/// typed is escaped); hidden for a read-only token and on a raw console, which cannot carry a
/// break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_button_sends_a_serial_break_on_a_mux_console() {
    require_tools(true);
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let mux = agent
        .create_console(proto::CreateConsoleRequest {
            guest: GUEST.into(),
            protocol: proto::ConsoleProtocol::Mux as i32,
            ..Default::default()
        })
        .await
        .expect("CreateConsole mux")
        .into_inner();
    let raw = open_console(&mut agent, "vm-web-raw").await;
    let mut guest = FakeGuest::connect(&mux.guest_socket).await;
    let _raw_guest = FakeGuest::connect(&raw.guest_socket).await;
    wait_guest_connected(&mut agent, GUEST, DEVICE, true).await;
    let url = |guest: &str, token: &str| {
        format!(
            "http://{}/console/?guest={guest}&device={DEVICE}#token={}",
            daemon.tcp,
            url_encode(token)
        )
    };
    let mut browser = Browser::launch().await;
    let hidden = "document.getElementById('break').hidden";

    let read_write = daemon.token(GUEST, DEVICE, Access::ReadWrite, 600).await;
    browser.open("rw", &url(GUEST, &read_write)).await;
    browser.wait("rw", LIVE).await;
    browser.wait("rw", &format!("!{hidden}")).await;
    browser.click("rw", "#terminal").await;
    browser.type_text("rw", "ls").await;
    browser.press("rw", "Control+a").await;
    browser.click("rw", "#break").await;
    browser.type_text("rw", "h").await;
    let wire = b"ls\x01\x01\x01bh";
    guest.wait_len(wire.len()).await;
    guest.read_some(Duration::from_millis(300)).await;
    assert_same("typed and a break, read by QEMU", guest.received(), wire);
    let events = browser
        .eval(
            "rw",
            "JSON.stringify(window.conlog.events.map((e) => e.what))",
        )
        .await;
    assert!(
        events.as_str().is_some_and(|e| e.contains("break")),
        "{events}"
    );

    let read = daemon.token(GUEST, DEVICE, Access::Read, 600).await;
    browser.open("ro", &url(GUEST, &read)).await;
    browser.wait("ro", LIVE).await;
    assert_eq!(browser.eval("ro", hidden).await, true, "read-only token");

    let raw_token = daemon
        .token("vm-web-raw", DEVICE, Access::ReadWrite, 600)
        .await;
    browser.open("raw", &url("vm-web-raw", &raw_token)).await;
    browser.wait("raw", LIVE).await;
    assert_eq!(browser.dataset("raw", "access").await, "read-write");
    assert_eq!(browser.eval("raw", hidden).await, true, "raw console");
    browser.exit().await;
}
