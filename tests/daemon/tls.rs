//! TLS on the TCP listener against the real `conlogd`: server certificates (`tls.cert`,
//! `tls.key`), mutual TLS (`tls.client_ca`), reloading on SIGHUP without dropping connections,
//! and the start-up errors of a bad or missing TLS setup.
//!
//! Every certificate is made here with `rcgen`: a CA, a server leaf for `localhost` and
//! `127.0.0.1` signed by it, client leaves, and unrelated CAs whose certificates must be
//! refused. Clients are tonic channels with `ClientTlsConfig` and `conlogctl --server https://`.
//! Nothing listens anywhere but on loopback: the non-loopback cases only check that the daemon
//! refuses to start, or use `--print-config`.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::history_common;
use crate::support;

use conlog::proto::{read_history_request::Start, Access, LogMode, ReadHistoryRequest};
use history_common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::*;
use tempfile::TempDir;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

// Certificates

/// A certificate authority made for one test.
struct Ca {
    /// Its common name, for messages.
    name: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate and its private key, as PEM.
#[derive(Clone)]
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self {
            name: name.to_owned(),
            cert,
            key,
        }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    fn sign(&self, mut params: CertificateParams, name: &str) -> Leaf {
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign the leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    fn server(&self) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, "conlogd test server")
    }

    /// A client certificate named `name`.
    fn client(&self, name: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, name)
    }

    /// A client certificate that expired in 2020.
    fn expired_client(&self, name: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        self.sign(params, name)
    }
}

/// A directory for the certificate files of one test, outside the daemon's directories.
struct Files(TempDir);

impl Files {
    fn new() -> Self {
        Self(
            tempfile::Builder::new()
                .prefix("conlog-tls-")
                .tempdir()
                .expect("temporary directory"),
        )
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Writes `text` to `name` (replacing it) and returns its absolute path.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

/// The `tls:` section of a config.
fn tls_yaml(cert: &Path, key: &Path, client_ca: Option<&Path>, handshake_timeout: &str) -> String {
    let mut yaml = format!(
        "tls:\n  cert: {}\n  key: {}\n  handshake_timeout: {handshake_timeout}\n",
        cert.display(),
        key.display()
    );
    if let Some(ca) = client_ca {
        yaml.push_str(&format!("  client_ca: {}\n", ca.display()));
    }
    yaml
}

// Clients

/// An `https://` endpoint to the daemon's TCP listener that trusts `ca` and presents
/// `identity` if given.
fn endpoint(daemon: &Daemon, ca: &Ca, identity: Option<&Leaf>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Endpoint::from_shared(format!("https://{}", daemon.tcp))
        .expect("valid URI")
        .connect_timeout(DEADLINE)
        .tls_config(tls)
        .expect("client TLS config")
}

/// An error and its sources, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// How one attempt to read a history went.
enum Outcome {
    /// The call succeeded with these bytes.
    Read(Vec<u8>),
    /// No connection (TCP, TLS or HTTP/2 handshake).
    ConnectFailed(String),
    /// Connected, but the call failed: with a status the server sent, or (`transport`) because
    /// the connection failed under it.
    CallFailed {
        code: Code,
        transport: bool,
        message: String,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Read(data) => write!(f, "read {} bytes", data.len()),
            Outcome::ConnectFailed(why) => write!(f, "connect failed: {why}"),
            Outcome::CallFailed {
                code,
                transport,
                message,
            } => write!(
                f,
                "call failed with {code:?} (transport: {transport}): {message}"
            ),
        }
    }
}

impl Outcome {
    /// Whether no call reached the service: no connection, or one that broke under the call.
    fn refused_by_transport(&self) -> bool {
        match self {
            Outcome::Read(_) => false,
            Outcome::ConnectFailed(_) => true,
            Outcome::CallFailed { transport, .. } => *transport,
        }
    }

    /// The status code a call failed with, if it did.
    fn code(&self) -> Option<Code> {
        match self {
            Outcome::CallFailed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Connects a new channel with `endpoint` and reads all of `guest`'s default stream with
/// `token` (none when `None`).
async fn try_read(endpoint: Endpoint, token: Option<&str>, guest: &str) -> Outcome {
    bounded("connect and ReadHistory", async {
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => return Outcome::ConnectFailed(error_chain(&e)),
        };
        let mut client = match token {
            Some(token) => with_token(channel, token).console(),
            None => channel.console(),
        };
        match read_all(&mut client, request(guest, "", None)).await {
            Ok(chunks) => Outcome::Read(Received::of(&chunks, DEFAULT_CHUNK).data),
            // tonic keeps the cause of a status it made from a transport error; a status the
            // server sent has none.
            Err(status) => Outcome::CallFailed {
                code: status.code(),
                transport: std::error::Error::source(&status).is_some(),
                message: error_chain(&status),
            },
        }
    })
    .await
}

/// Lines of the daemon's diagnostics that contain `needle`.
fn count_lines(daemon: &Daemon, needle: &str) -> usize {
    daemon
        .stderr()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Waits (bounded) until at least `n` lines of the daemon's diagnostics contain `needle`.
async fn wait_lines(daemon: &Daemon, needle: &str, n: usize) {
    let what = format!("{n} lines with {needle:?} in the daemon's diagnostics");
    let deadline = std::time::Instant::now() + DEADLINE;
    while count_lines(daemon, needle) < n {
        if std::time::Instant::now() > deadline {
            panic!(
                "{what}: not within {DEADLINE:?}; stderr:\n{}",
                daemon.stderr()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

const HANDSHAKE_FAILED: &str = "TLS handshake failed";

/// Reads of one guest's history over the TCP listener ([`try_read`]: a new connection each),
/// made with `token` (none when `None`); each `expect_` method makes one and asserts how it
/// went, `what` naming it in the failure message.
#[derive(Clone, Copy)]
struct Reads<'a> {
    daemon: &'a Daemon,
    guest: &'a str,
    token: Option<&'a str>,
}

impl<'a> Reads<'a> {
    /// The same reads, made with `token` instead.
    fn with_token(self, token: Option<&'a str>) -> Self {
        Self { token, ..self }
    }

    /// A read through `endpoint` succeeds with exactly `expected`.
    async fn expect_served(self, endpoint: Endpoint, expected: &[u8], what: &str) {
        match try_read(endpoint, self.token, self.guest).await {
            Outcome::Read(data) => assert!(
                data == expected,
                "{what}: read {} bytes, not the expected {}",
                data.len(),
                expected.len()
            ),
            other => panic!(
                "{what}: expected to read, got {other}\n--- conlogd ---\n{}",
                self.daemon.stderr()
            ),
        }
    }

    /// A read through `endpoint` is refused by TLS: no connection, or a call that failed in the
    /// transport (never a status the service answered with); and the daemon logs one more failed
    /// handshake than it had before the attempt.
    async fn expect_refused_by_tls(self, endpoint: Endpoint, what: &str) {
        let failures_before = count_lines(self.daemon, HANDSHAKE_FAILED);
        let outcome = try_read(endpoint, self.token, self.guest).await;
        assert!(
            outcome.refused_by_transport(),
            "{what}: expected a TLS failure, got {outcome}\n--- conlogd ---\n{}",
            self.daemon.stderr()
        );
        wait_lines(self.daemon, HANDSHAKE_FAILED, failures_before + 1).await;
    }

    /// A read through `endpoint` gets through TLS and the service answers it with `code`.
    async fn expect_refused_by_service(self, endpoint: Endpoint, code: Code, what: &str) {
        let outcome = try_read(endpoint, self.token, self.guest).await;
        assert_eq!(
            (outcome.code(), outcome.refused_by_transport()),
            (Some(code), false),
            "{what}: {outcome}"
        );
    }
}

/// The `conlogd ready` line of the current run.
fn ready_line(daemon: &Daemon) -> String {
    daemon
        .stderr()
        .lines()
        .find(|l| l.contains("conlogd ready"))
        .expect("the daemon is ready")
        .to_owned()
}

/// Asserts that the ready line says `tls=<mode>`, as documented (`tls=off|on|mutual`, like
/// `tcp=` and `metrics=`: unquoted).
fn assert_tls_mode(daemon: &Daemon, mode: &str) {
    let line = ready_line(daemon);
    let value = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("tls="))
        .unwrap_or_else(|| panic!("no tls= in the ready line {line:?}"));
    assert_eq!(value, mode, "tls= in the ready line {line:?}");
}

/// `conlogctl` with `args`, bounded.
async fn ctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(conlogctl_bin());
    cmd.args(args).env("NO_COLOR", "1");
    run_bounded_async(cmd).await
}

/// Logs `data` into `guest/qemu` through a log pipe and waits until it is all on disk.
async fn log(daemon: &Daemon, guest: &str, data: &[u8]) {
    logged_stream(daemon, guest, "qemu", 1 << 20, 1, LogMode::Rotate, data).await;
}

/// Asserts that the daemon still answers on its local socket.
async fn assert_alive(daemon: &Daemon) {
    bounded("ListGuests on the local socket", async {
        daemon
            .agent()
            .await
            .list_guests(conlog::proto::ListGuestsRequest::default())
            .await
            .unwrap_or_else(|s| panic!("ListGuests: {s:?}\n{}", daemon.stderr()))
    })
    .await;
}

// 1. TLS

/// With `tls.cert` and `tls.key`: a client trusting the CA reads history with a token (tonic
/// and `conlogctl --server https://`); plaintext to the same port, and clients trusting another
/// CA, are refused at the handshake; a connection that never starts its handshake delays no
/// one; the ready line says `tls=on`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_ca_and_only_them() {
    let files = Files::new();
    let ca = Ca::new("conlog test CA");
    let other_ca = Ca::new("unrelated CA");
    let server = ca.server();
    let cert = files.write("server.pem", &server.cert);
    let key = files.write("server.key", &server.key);
    let ca_path = files.write("ca.pem", &ca.pem());
    let other_ca_path = files.write("other-ca.pem", &other_ca.pem());
    // A handshake timeout longer than any test: a client that never finishes its handshake
    // must not hold up the others.
    let daemon = Daemon::start_with(Some(&tls_yaml(&cert, &key, None, "1h")), &[]).await;

    let data = b"[    0.000000] Linux version 6.1\r\nlogin: \xff\x00binary\n".repeat(50);
    log(&daemon, "vm1", &data).await;
    let token = daemon.token("vm1", "", Access::Read, 3600).await;

    // A TCP connection that says nothing, open during everything below.
    let idle = std::net::TcpStream::connect(daemon.tcp).expect("raw TCP connection");

    let vm1 = Reads {
        daemon: &daemon,
        guest: "vm1",
        token: Some(&token),
    };
    let trusting = |ca: &Ca| endpoint(&daemon, ca, None);
    vm1.expect_served(trusting(&ca), &data, "TLS client trusting the CA")
        .await;
    // The same client without a token is turned away by the service, not by TLS.
    vm1.with_token(None)
        .expect_refused_by_service(trusting(&ca), Code::Unauthenticated, "TLS without a token")
        .await;
    // Plaintext HTTP/2 to the TLS port.
    let plain = Endpoint::from_shared(format!("http://{}", daemon.tcp))
        .expect("valid URI")
        .connect_timeout(DEADLINE);
    vm1.expect_refused_by_tls(plain, "plaintext client").await;
    // A client that trusts another CA refuses the server's certificate.
    vm1.expect_refused_by_tls(trusting(&other_ca), "client trusting another CA")
        .await;

    // conlogctl over https://, by IP address (the certificate names 127.0.0.1 too).
    let server_url = format!("https://{}", daemon.tcp);
    let output = ctl(&[
        "--server",
        &server_url,
        "--ca",
        ca_path.to_str().unwrap(),
        "--token",
        &token,
        "history",
        "vm1",
    ])
    .await;
    assert!(
        output.status.success() && output.stdout == data,
        "conlogctl history over TLS: {} bytes of {}\n{}",
        output.stdout.len(),
        data.len(),
        describe(&output)
    );
    let failures = count_lines(&daemon, HANDSHAKE_FAILED);
    let output = ctl(&[
        "--server",
        &server_url,
        "--ca",
        other_ca_path.to_str().unwrap(),
        "--token",
        &token,
        "history",
        "vm1",
    ])
    .await;
    assert!(
        !output.status.success() && output.stdout.is_empty(),
        "conlogctl trusting another CA: {}",
        describe(&output)
    );
    wait_lines(&daemon, HANDSHAKE_FAILED, failures + 1).await;

    // The silent connection is still open (1h handshake timeout) and still delays no one.
    vm1.expect_served(trusting(&ca), &data, "TLS client after the others")
        .await;
    drop(idle);
    // Last, so that a mismatch here does not hide the checks above.
    assert_tls_mode(&daemon, "on");
}

// 2. Mutual TLS

/// With `tls.client_ca`: a client certificate that CA signed is needed (and still a token);
/// none, one from another CA or an expired one are refused at the handshake; the ready line
/// says `tls=mutual`; a connection that never finishes its handshake is closed after
/// `handshake_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_from_the_client_ca_and_a_token() {
    let files = Files::new();
    let ca = Ca::new("conlog test CA");
    let other_ca = Ca::new("unrelated CA");
    let server = ca.server();
    let client = ca.client("operator");
    let stranger = other_ca.client("stranger");
    let expired = ca.expired_client("former operator");
    let cert = files.write("server.pem", &server.cert);
    let key = files.write("server.key", &server.key);
    let ca_path = files.write("ca.pem", &ca.pem());
    let client_cert = files.write("client.pem", &client.cert);
    let client_key = files.write("client.key", &client.key);
    let stranger_cert = files.write("stranger.pem", &stranger.cert);
    let stranger_key = files.write("stranger.key", &stranger.key);
    let daemon = Daemon::start_with(Some(&tls_yaml(&cert, &key, Some(&ca_path), "1s")), &[]).await;

    let data = b"mutual TLS console output\n".repeat(100);
    log(&daemon, "vm1", &data).await;
    let token = daemon.token("vm1", "", Access::Read, 3600).await;

    let vm1 = Reads {
        daemon: &daemon,
        guest: "vm1",
        token: Some(&token),
    };
    let presenting = |identity: Option<&Leaf>| endpoint(&daemon, &ca, identity);
    let as_operator = || presenting(Some(&client));
    vm1.expect_served(as_operator(), &data, "client certificate from the CA")
        .await;
    // A valid certificate is not a credential: the token is still needed.
    let what = "client certificate without a token";
    vm1.with_token(None)
        .expect_refused_by_service(as_operator(), Code::Unauthenticated, what)
        .await;
    // And a token for another guest does not open this one.
    let other_token = daemon.token("vm2", "", Access::Read, 3600).await;
    let what = "a token for vm2 reading vm1";
    vm1.with_token(Some(&other_token))
        .expect_refused_by_service(as_operator(), Code::PermissionDenied, what)
        .await;

    for (what, identity) in [
        ("no client certificate", None),
        ("a client certificate from another CA", Some(&stranger)),
        ("an expired client certificate", Some(&expired)),
    ] {
        vm1.expect_refused_by_tls(presenting(identity), what).await;
    }

    // conlogctl with --cert/--key, then with a certificate of another CA, then without one.
    let server_url = format!("https://localhost:{}", daemon.tcp.port());
    let base = [
        "--server",
        &server_url,
        "--ca",
        ca_path.to_str().unwrap(),
        "--token",
        &token,
    ];
    let mut args = base.to_vec();
    args.extend([
        "--cert",
        client_cert.to_str().unwrap(),
        "--key",
        client_key.to_str().unwrap(),
        "history",
        "vm1",
    ]);
    let output = ctl(&args).await;
    assert!(
        output.status.success() && output.stdout == data,
        "conlogctl history with a client certificate: {}",
        describe(&output)
    );
    let mut args = base.to_vec();
    args.extend([
        "--cert",
        stranger_cert.to_str().unwrap(),
        "--key",
        stranger_key.to_str().unwrap(),
        "history",
        "vm1",
    ]);
    let output = ctl(&args).await;
    assert!(
        !output.status.success() && output.stdout.is_empty(),
        "conlogctl with a certificate of another CA: {}",
        describe(&output)
    );
    let mut args = base.to_vec();
    args.extend(["history", "vm1"]);
    let output = ctl(&args).await;
    assert!(
        !output.status.success() && output.stdout.is_empty(),
        "conlogctl without a client certificate: {}",
        describe(&output)
    );

    // A connection that never sends a ClientHello is closed once handshake_timeout (1s) is up.
    let failures = count_lines(&daemon, HANDSHAKE_FAILED);
    let mut silent = std::net::TcpStream::connect(daemon.tcp).expect("raw TCP connection");
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    let closed = tokio::task::spawn_blocking(move || {
        let mut buffer = [0u8; 64];
        silent.read(&mut buffer)
    })
    .await
    .expect("reader thread");
    match closed {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a silent connection was not closed by the handshake timeout: {other:?}"),
    }
    wait_lines(&daemon, HANDSHAKE_FAILED, failures + 1).await;
    assert!(
        daemon.stderr().contains("tls.handshake_timeout"),
        "the timeout is not named in:\n{}",
        daemon.stderr()
    );

    // Everything above left the daemon serving.
    vm1.expect_served(
        as_operator(),
        &data,
        "client certificate from the CA, at the end",
    )
    .await;
    assert_tls_mode(&daemon, "mutual");
}

/// A TLS client that completes its handshake and then sends nothing holds its place only for
/// `limits.idle_timeout`: with every place taken by such clients, a console client gets in
/// again once they are closed (docs/operations.md, "What a caller can cost").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_that_send_nothing_after_the_handshake_are_closed_when_idle() {
    let files = Files::new();
    let ca = Ca::new("conlog test CA");
    let server = ca.server();
    let cert = files.write("server.pem", &server.cert);
    let key = files.write("server.key", &server.key);
    let yaml = format!(
        "{}limits:\n  tcp_connections: 4\n  idle_timeout: 2s\n",
        tls_yaml(&cert, &key, None, "1h")
    );
    let daemon = Daemon::start_with(Some(&yaml), &[]).await;
    log(&daemon, "vm1", b"hello over TLS\n").await;
    let token = daemon.token("vm1", "", Access::Read, 3600).await;

    // Four clients finish the handshake and then say nothing: every place is taken.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.cert.der().clone())
        .expect("the CA certificate");
    let config = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut silent = Vec::new();
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(daemon.tcp).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        silent.push(
            bounded("a TLS handshake", connector.connect(name, tcp))
                .await
                .expect("the handshake completes"),
        );
    }
    // Each is closed by the daemon (end of stream or reset) without having sent anything.
    for stream in &mut silent {
        use tokio::io::AsyncReadExt;
        let mut buffer = [0u8; 64];
        let read = bounded("the daemon closing an idle TLS connection", async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        });
        read.await;
    }
    // The places are free: a client is served.
    Reads {
        daemon: &daemon,
        guest: "vm1",
        token: Some(&token),
    }
    .expect_served(
        endpoint(&daemon, &ca, None),
        b"hello over TLS\n",
        "after idle TLS clients",
    )
    .await;
}

// 3. Reloading on SIGHUP

/// A `ReadHistory` with `follow` on `guest/qemu` from offset 0.
fn follow_request(guest: &str) -> ReadHistoryRequest {
    ReadHistoryRequest {
        follow: true,
        ..request(guest, "qemu", Some(Start::FromOffset(0)))
    }
}

/// Reads a followed reply until it reaches `until`; checks every byte against the pattern.
async fn follow_until(
    chunks: &mut tonic::Streaming<conlog::proto::HistoryChunk>,
    got: &mut Received,
    until: u64,
) {
    while got.position.unwrap_or(0) < until {
        let chunk = next(chunks)
            .await
            .unwrap_or_else(|s| panic!("the followed reply failed at {:?}: {s:?}", got.position))
            .unwrap_or_else(|| panic!("the followed reply ended at {:?}", got.position));
        let offset = chunk.offset;
        assert_pattern(offset, got.push(&chunk));
    }
    assert_eq!(got.position, Some(until), "followed past the data written");
    assert!(
        got.gaps.is_empty(),
        "gaps in a followed reply: {:?}",
        got.gaps
    );
}

/// SIGHUP reloads `tls.cert`/`tls.key`: new connections get the new certificate (clients that
/// trust only the old CA are refused) while a connection made before keeps streaming. Files
/// that cannot be used (garbage, a broken certificate, a key of another certificate, an empty
/// file) log an error naming the file, keep the previous certificate and the daemon serving;
/// a good reload after them still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    const GUEST: &str = "vm-reload";
    const RELOADED: &str = "TLS certificates reloaded";
    const RELOAD_FAILED: &str = "TLS reload failed";
    let files = Files::new();
    let (ca_a, ca_b) = (Ca::new("CA A"), Ca::new("CA B"));
    let (server_a, server_b) = (ca_a.server(), ca_b.server());
    let cert = files.write("server.pem", &server_a.cert);
    let key = files.write("server.key", &server_a.key);
    let daemon = Daemon::start_with(Some(&tls_yaml(&cert, &key, None, "10s")), &[]).await;

    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(1 << 20, 1, LogMode::Rotate)),
    )
    .await;
    let mut written = 0u64;
    let mut write = |pipe: &mut std::fs::File, len: usize| {
        write_now(pipe, &pattern(written, len));
        written += len as u64;
        written
    };
    let end = write(&mut pipe, 1000);
    wait_offset(&mut agent, GUEST, "qemu", end).await;
    let token = daemon.token(GUEST, "", Access::Read, 3600).await;

    // A long-lived connection made with certificate A.
    let old_channel = bounded(
        "connect with CA A",
        endpoint(&daemon, &ca_a, None).connect(),
    )
    .await
    .unwrap_or_else(|e| panic!("connect with CA A: {}", error_chain(&e)));
    let mut old = with_token(old_channel, &token).console();
    let mut followed = open(&mut old, follow_request(GUEST))
        .await
        .expect("follow over TLS");
    let mut got = Received::new(DEFAULT_CHUNK);
    follow_until(&mut followed, &mut got, end).await;

    // Certificate B replaces A in the same files.
    files.write("server.pem", &server_b.cert);
    files.write("server.key", &server_b.key);
    daemon.signal(rustix::process::Signal::HUP);
    wait_lines(&daemon, RELOADED, 1).await;

    let reads = Reads {
        daemon: &daemon,
        guest: GUEST,
        token: Some(&token),
    };
    // New clients trusting `current` read everything written so far; those trusting only
    // `previous` are refused.
    let expect_certificate_of = async |current: &Ca, previous: &Ca, what: &str| {
        let data = pattern(0, written_now(&daemon, GUEST).await as usize);
        let trusting = |ca: &Ca| endpoint(&daemon, ca, None);
        let served = format!("{what}: client trusting {}", current.name);
        reads.expect_served(trusting(current), &data, &served).await;
        let refused = format!("{what}: client trusting only {}", previous.name);
        reads
            .expect_refused_by_tls(trusting(previous), &refused)
            .await;
    };
    expect_certificate_of(&ca_b, &ca_a, "after the reload to B").await;

    // The connection made with A carries on: the followed reply gets new output, and a new
    // call on the same channel works (a new connection would fail: it trusts only CA A).
    let end = write(&mut pipe, 1500);
    follow_until(&mut followed, &mut got, end).await;
    let chunks = read_ok(&mut old, request(GUEST, "qemu", None)).await;
    assert!(
        Received::of(&chunks, DEFAULT_CHUNK).data == pattern(0, end as usize),
        "a new call on the connection made before the reload"
    );

    // Files that cannot be used: the error names the file; B stays.
    let garbage_block = "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZSwgbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
    let cases: [(&str, &str, &str, &str); 5] = [
        (
            "garbage in both files",
            "garbage\n",
            "garbage\n",
            "tls.cert",
        ),
        (
            "a certificate block that is no certificate",
            garbage_block,
            &server_b.key,
            "tls.cert",
        ),
        ("a garbage key", &server_b.cert, "not a key\n", "tls.key"),
        (
            "the key of another certificate",
            &server_b.cert,
            &server_a.key,
            "tls.key",
        ),
        ("an empty certificate file", "", &server_b.key, "tls.cert"),
    ];
    for (n, (what, cert_text, key_text, names)) in cases.into_iter().enumerate() {
        files.write("server.pem", cert_text);
        files.write("server.key", key_text);
        daemon.signal(rustix::process::Signal::HUP);
        wait_lines(&daemon, RELOAD_FAILED, n + 1).await;
        let line = daemon
            .stderr()
            .lines()
            .filter(|l| l.contains(RELOAD_FAILED))
            .nth(n)
            .expect("the reload error")
            .to_owned();
        assert!(
            line.contains("ERROR"),
            "{what}: not logged as an error: {line}"
        );
        assert!(
            line.contains(names),
            "{what}: {names} is not named in {line}"
        );
        assert_eq!(
            count_lines(&daemon, RELOADED),
            1,
            "{what}: reported as reloaded"
        );
        assert_alive(&daemon).await;
        expect_certificate_of(&ca_b, &ca_a, what).await;
        let end = write(&mut pipe, 100);
        follow_until(&mut followed, &mut got, end).await;
    }

    // A good reload after the failed ones: back to A.
    files.write("server.pem", &server_a.cert);
    files.write("server.key", &server_a.key);
    daemon.signal(rustix::process::Signal::HUP);
    wait_lines(&daemon, RELOADED, 2).await;
    expect_certificate_of(&ca_a, &ca_b, "after the reload back to A").await;
    let end = write(&mut pipe, 2000);
    follow_until(&mut followed, &mut got, end).await;
    drop(pipe);
    assert_tls_mode(&daemon, "on");
}

/// The offset of `guest/qemu` as listed.
async fn written_now(daemon: &Daemon, guest: &str) -> u64 {
    find_stream(&mut daemon.agent().await, guest, "qemu")
        .await
        .expect("stream listed")
        .offset
}

/// SIGHUP reloads `tls.client_ca` as well: after it names CA 2 instead of CA 1, new clients
/// need a certificate from CA 2; a connection authenticated before goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_client_ca() {
    let files = Files::new();
    let server_ca = Ca::new("server CA");
    let (ca_1, ca_2) = (Ca::new("client CA 1"), Ca::new("client CA 2"));
    let server = server_ca.server();
    let (client_1, client_2) = (ca_1.client("client 1"), ca_2.client("client 2"));
    let cert = files.write("server.pem", &server.cert);
    let key = files.write("server.key", &server.key);
    let client_ca = files.write("client-ca.pem", &ca_1.pem());
    let daemon =
        Daemon::start_with(Some(&tls_yaml(&cert, &key, Some(&client_ca), "10s")), &[]).await;
    let data = b"client CA reload\n".repeat(20);
    log(&daemon, "vm1", &data).await;
    let token = daemon.token("vm1", "", Access::Read, 3600).await;

    let vm1 = Reads {
        daemon: &daemon,
        guest: "vm1",
        token: Some(&token),
    };
    let presenting = |leaf: &Leaf| endpoint(&daemon, &server_ca, Some(leaf));
    vm1.expect_served(presenting(&client_1), &data, "client 1 before the reload")
        .await;
    vm1.expect_refused_by_tls(presenting(&client_2), "client 2 before the reload")
        .await;

    let old_channel = bounded("connect as client 1", presenting(&client_1).connect())
        .await
        .unwrap_or_else(|e| panic!("connect as client 1: {}", error_chain(&e)));
    let mut old = with_token(old_channel, &token).console();
    assert!(read_ok(&mut old, request("vm1", "", None)).await.len() == 1);

    files.write("client-ca.pem", &ca_2.pem());
    daemon.signal(rustix::process::Signal::HUP);
    wait_lines(&daemon, "TLS certificates reloaded", 1).await;

    vm1.expect_served(presenting(&client_2), &data, "client 2 after the reload")
        .await;
    vm1.expect_refused_by_tls(presenting(&client_1), "client 1 after the reload")
        .await;
    // The connection client 1 made before the reload is still served.
    let chunks = read_ok(&mut old, request("vm1", "", None)).await;
    assert!(Received::of(&chunks, DEFAULT_CHUNK).data == data);
    assert_tls_mode(&daemon, "mutual");
}

// 4. Start-up errors

/// Runs `conlogd` (bounded) with `yaml` as its config and `args`, on throw-away directories;
/// returns its output and whether it created its local socket.
async fn conlogd(yaml: &str, args: &[&str]) -> (Output, bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("conlogd.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut cmd = Command::new(conlogd_bin());
    cmd.arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .args(["--metrics", "127.0.0.1:0"])
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    let output = run_bounded_async(cmd).await;
    let bound = dir.path().join("run/conlogd.sock").exists();
    (output, bound)
}

/// A refusal to start: non-zero exit, nothing bound, one line on stderr (returned).
fn refusal(output: &Output, bound: bool, what: &str) -> String {
    assert!(
        !output.status.success(),
        "{what}: conlogd did not refuse to start: {}",
        describe(output)
    );
    assert!(!bound, "{what}: conlogd bound its sockets before refusing");
    let text = strip_ansi(String::from_utf8_lossy(&output.stderr).trim_end());
    assert!(
        !text.is_empty() && !text.contains('\n'),
        "{what}: not a one-line error: {}",
        describe(output)
    );
    text
}

/// A missing or unusable TLS file stops the start with one line naming the key and the file;
/// a non-loopback listen without TLS is refused before anything is bound, naming the ways out;
/// `insecure: true` (checked with `--print-config` only) and TLS make it valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_setups_and_plaintext_on_the_network_are_refused_at_start() {
    let files = Files::new();
    let ca = Ca::new("conlog test CA");
    let server = ca.server();
    let cert = files.write("server.pem", &server.cert);
    let key = files.write("server.key", &server.key);
    let ca_path = files.write("ca.pem", &ca.pem());
    let garbage = files.write("garbage.pem", "garbage\n");
    let missing = files.path("missing.pem");
    let loopback = ["--listen", "127.0.0.1:0"];

    for (what, yaml, names, path) in [
        (
            "missing tls.cert",
            tls_yaml(&missing, &key, None, "10s"),
            "tls.cert",
            &missing,
        ),
        (
            "missing tls.key",
            tls_yaml(&cert, &missing, None, "10s"),
            "tls.key",
            &missing,
        ),
        (
            "missing tls.client_ca",
            tls_yaml(&cert, &key, Some(&missing), "10s"),
            "tls.client_ca",
            &missing,
        ),
        (
            "garbage tls.cert",
            tls_yaml(&garbage, &key, None, "10s"),
            "tls.cert",
            &garbage,
        ),
        (
            "garbage tls.client_ca",
            tls_yaml(&cert, &key, Some(&garbage), "10s"),
            "tls.client_ca",
            &garbage,
        ),
    ] {
        let (output, bound) = conlogd(&yaml, &loopback).await;
        let line = refusal(&output, bound, what);
        let path = path.display().to_string();
        assert!(
            line.contains(names) && line.contains(&path),
            "{what}: {names} and {path} are not named in {line:?}"
        );
    }

    // A relative path is a config error (exit 2), naming the key.
    let (output, bound) = conlogd("tls:\n  cert: server.pem\n  key: server.key\n", &loopback).await;
    let line = refusal(&output, bound, "relative tls.cert");
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(
        line.contains("tls.cert") && line.contains("absolute"),
        "{line}"
    );

    // Plaintext on a non-loopback address: refused before binding anything.
    let (output, bound) = conlogd("log_level: info\n", &["--listen", "0.0.0.0:0"]).await;
    let line = refusal(&output, bound, "plaintext on 0.0.0.0");
    assert!(
        line.contains("tls.cert") && line.contains("insecure: true") && line.contains("0.0.0.0"),
        "the refusal does not name the ways out: {line:?}"
    );

    // insecure: true makes it a valid config (only printed here: nothing may listen beyond
    // loopback in tests).
    let (output, bound) = conlogd(
        "insecure: true\n",
        &["--listen", "0.0.0.0:0", "--print-config"],
    )
    .await;
    assert!(output.status.success() && !bound, "{}", describe(&output));
    let yaml = String::from_utf8_lossy(&output.stdout);
    assert!(
        yaml.contains("insecure: true") && yaml.contains("listen: 0.0.0.0:0"),
        "{yaml}"
    );
    // So does TLS; its section is printed with the default handshake timeout.
    let with_tls = format!(
        "tls:\n  cert: {}\n  key: {}\n  client_ca: {}\n",
        cert.display(),
        key.display(),
        ca_path.display()
    );
    let (output, bound) = conlogd(&with_tls, &["--listen", "0.0.0.0:0", "--print-config"]).await;
    assert!(output.status.success() && !bound, "{}", describe(&output));
    let yaml = String::from_utf8_lossy(&output.stdout);
    for expected in [
        format!("cert: {}", cert.display()),
        format!("key: {}", key.display()),
        format!("client_ca: {}", ca_path.display()),
        "handshake_timeout: 10s".to_owned(),
        "insecure: false".to_owned(),
    ] {
        assert!(yaml.contains(&expected), "missing {expected:?} in:\n{yaml}");
    }
}
