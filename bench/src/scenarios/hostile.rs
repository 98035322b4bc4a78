//! Scenario `hostile` (docs/performance.md, "Hostile callers"): what hostile remote callers cost a daemon running
//! at its **default limits**, and whether the local agent is still served meanwhile.
//!
//! One release daemon with no config file (only its directories and ports are the bench's),
//! guests `vm00`… each with a closed log pipe holding history and a console whose guest (a
//! UNIX socket this process holds) never reads its input. The attacks come from several
//! loopback addresses (127.0.0.2, 127.0.0.3, …: `limits.tcp_connections /
//! limits.connections_per_peer` of them), so that the per-peer limits do not hide the global
//! ones:
//!
//! 1. HTTP/1.1 gRPC-web bodies of 1.3 MB (of an announced 1.4 MB), then silence, on every
//!    connection the limits allow: (a) without a token, (b) with READ tokens.
//! 2. Connections filling `limits.tcp_connections` that never make a call: silent, slow-loris
//!    (a header byte a second), HTTP/2 preface without a stream. Whether a new connection is
//!    shut out, and (full size) how long the daemon takes to close them all itself.
//! 3. Following `ReadHistory` calls opened until refused: first with one READ token, then
//!    with every guest's.
//! 4. Stalled history readers: raw HTTP/2 connections advertising the largest windows, one
//!    following `ReadHistory` per stream (from the oldest byte), never reading their socket.
//! 5. Concurrent `SendConsoleInput` calls of 1 MiB and 64 KiB with READ_WRITE tokens to
//!    consoles whose guest does not read (its socket was filled first).
//! 6. Stalled console watchers: raw HTTP/2 connections with `WatchConsole` READ_ONLY streams
//!    asking for the largest replay (`consoles.max_replay`) of a console that wrote that much,
//!    never reading their socket (a tenant's own guest decides what its console prints).
//! 7. All of them (1 to 6) at once, on a fresh daemon (the first one's allocator keeps what the
//!    attacks before used, which would hide this one's growth).
//! 8. On a fresh daemon of its own: requests whose gRPC message never completes:
//!    one `ReadHistory` per raw HTTP/2 connection announcing just under `limits.message_size`
//!    and sending all of it but the last byte, with READ tokens.
//!
//! For each: the daemon's peak RSS (sampled from `/proc` and `VmHWM`), its descriptors, the
//! p50/p99 of local `ListGuests` (plus a `CreateLogPipe`, `CreateConsole` and `RemoveGuest` per
//! measurement) under attack against idle just before, whether every local call succeeded, and
//! whether descriptors came back to the baseline (within 2) after. The memory model (docs/performance.md,
//! "Hostile callers"): baseline + `tcp_connections` × a connection's cost + `remote_calls_total`
//! × a call's cost + `web_body_bytes`, with the unit costs measured here. The run is wrong (exit
//! status 1) when a local call failed, descriptors did not come back, or an attack took the
//! daemon over [`CEILING_MIB`].
//!
//! Attack clients run on a runtime of their own (two threads); the local probe runs on the
//! caller's, so its latency is not the attackers' queueing.

use crate::common;
use crate::daemon::Daemon;
use crate::procfs::{self, RssSampler};
use crate::report::{self, mib, percentile, Table, Verdict};
use crate::scenario::{Bench, Scenario};
use anyhow::{bail, Context};
use conlog::config::Limits;
use conlog::proto::agent_client::AgentClient;
use conlog::proto::console_client::ConsoleClient;
use conlog::proto::{
    read_history_request, server_frame, Access, CreateConsoleRequest, CreateLogPipeRequest,
    ListGuestsRequest, ReadHistoryRequest, RemoveGuestRequest, SendConsoleInputRequest,
    WatchConsoleRequest,
};
use prost::Message;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

/// The RSS the daemon must stay under with every attack at its default limits
/// (docs/performance.md, "Hostile callers"; SECURITY.md, "Resource model").
pub const CEILING_MIB: u64 = 256;
/// Bytes of history each guest holds (in files of [`HISTORY_FILE`]).
const HISTORY: usize = 1 << 20;
const HISTORY_FILE: u64 = 256 << 10;
/// The log pipe's stream (a guest's default history is its console's, which stays empty).
const HISTORY_STREAM: &str = "qemu";
/// Console output each guest wrote, and the replay a stalled watcher asks for (the default
/// `consoles.max_replay`).
const REPLAY: u64 = 1 << 20;
/// An HTTP/1.1 body: what is sent and what the headers announce.
const BODY_SENT: usize = 1_300_000;
const BODY_ANNOUNCED: usize = 1_400_000;
/// `SendConsoleInput` sizes: just under `limits.message_size`, and the pending-input bound.
const INPUT_LARGE: usize = (1 << 20) - 1024;
const INPUT_SMALL: usize = 64 << 10;
/// Longest wait for anything (an attack to be admitted, descriptors to come back).
const DEADLINE: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(50);
/// Loopback address of the one well-behaved remote client.
const PROBE_PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 250);

/// Options of `conlog-bench hostile`. With `--quick`: a few guests, 64 connections and calls
/// per attack, 50 local calls per measurement, no wait for idle connections to be closed by the
/// daemon itself.
#[derive(clap::Args)]
pub struct HostileArgs {
    /// Local `ListGuests` calls per measurement [default: 200, or 50 with --quick].
    #[arg(long)]
    probes: Option<usize>,
    /// Replay each stalled watcher of attack 6 asks for [default: 1MiB, `consoles.max_replay`];
    /// 0 shows what a watcher costs without one.
    #[arg(long, value_parser = conlog::config::ByteSize::parse)]
    replay: Option<conlog::config::ByteSize>,
}

/// How large each attack is.
#[derive(Clone)]
struct Sizes {
    /// Guests with history and a console.
    guests: usize,
    /// Attacking loopback addresses.
    peers: usize,
    /// Connections of attacks 1 and 2.
    connections: usize,
    /// Guests whose tokens attacks 3, 4 and 6 use (each up to `limits.calls_per_guest` calls).
    call_guests: usize,
    /// Consoles flooded by attack 5 and concurrent calls per console.
    input_guests: usize,
    input_calls: usize,
    probes: usize,
    /// Replay asked for by attack 6's watchers.
    replay: u64,
    /// Wait for the daemon to close attack 2's connections itself (`limits.idle_timeout`).
    wait_idle_close: bool,
}

impl Sizes {
    fn new(limits: &Limits, args: &HostileArgs, quick: bool) -> Self {
        let per_guest = limits.calls_per_guest as usize;
        let remote_calls = limits.remote_calls_total as usize;
        let call_guests = remote_calls.div_ceil(per_guest);
        if quick {
            Self {
                guests: 3,
                peers: 2,
                connections: 64,
                call_guests: 1,
                input_guests: 2,
                input_calls: 16,
                probes: args.probes.unwrap_or(50),
                replay: args.replay.map_or(REPLAY, |r| r.bytes()),
                wait_idle_close: false,
            }
        } else {
            Self {
                // A few more than the call budget needs, so that it, not the guests, binds.
                guests: call_guests + 4,
                peers: (limits.tcp_connections / limits.connections_per_peer.max(1)) as usize,
                connections: limits.tcp_connections as usize,
                call_guests: call_guests + 4,
                input_guests: call_guests,
                input_calls: per_guest - 1,
                probes: args.probes.unwrap_or(200),
                replay: args.replay.map_or(REPLAY, |r| r.bytes()),
                wait_idle_close: true,
            }
        }
    }
}

/// The `i`-th attacking address of `peers` (127.0.0.2 up to 127.0.0.201).
fn peer(i: usize, peers: usize) -> Ipv4Addr {
    let i = u8::try_from(i % peers.clamp(1, 200)).unwrap_or(0);
    Ipv4Addr::new(127, 0, 0, 2 + i)
}

/// Bearer token on every call.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Remote = ConsoleClient<InterceptedService<Channel, Bearer>>;

/// A guest of the run and its tokens.
struct Guest {
    name: String,
    read: String,
    write: String,
}

/// What every attack needs to know.
struct Target {
    tcp: SocketAddr,
    metrics: SocketAddr,
    pid: u32,
    guests: Vec<Guest>,
    sizes: Sizes,
    limits: Limits,
}

impl Target {
    /// A Console client from `from` with `token`, on a connection of its own.
    async fn remote(&self, from: Ipv4Addr, token: &str) -> anyhow::Result<Remote> {
        let channel = Endpoint::from_shared(format!("http://{}", self.tcp))?
            .local_address(Some(IpAddr::V4(from)))
            .connect()
            .await
            .with_context(|| format!("connect from {from}"))?;
        let value = format!("Bearer {token}").parse()?;
        Ok(ConsoleClient::new(InterceptedService::new(
            channel,
            Bearer(value),
        )))
    }

    fn gauge(&self, name: &str) -> f64 {
        scrape(self.metrics)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    }
}

/// `GET /metrics`.
fn scrape(address: SocketAddr) -> String {
    let fetch = || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    };
    fetch().unwrap_or_default()
}

async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    socket.connect(to).await
}

fn open_fds(pid: u32) -> usize {
    procfs::open_fds(pid).unwrap_or(0)
}

/// What an attack holds while it is measured; dropping it ends the attack (sockets closed,
/// calls cancelled, tasks aborted).
#[derive(Default)]
struct Held {
    /// What was done, for the table.
    what: String,
    /// Connections or calls the daemon admitted and that are still open.
    units: u64,
    unit: &'static str,
    /// Refusals by what named them.
    refused: BTreeMap<String, u64>,
    sockets: Vec<tokio::net::TcpStream>,
    streams: Vec<Box<dyn std::any::Any + Send>>,
    /// Tasks of the attack (aborted on drop).
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Attack 2: leave the connections for the daemon to close.
    leave_to_daemon: bool,
}

impl Held {
    fn new(what: String, unit: &'static str) -> Self {
        let mut held = Self::default();
        held.what = what;
        held.unit = unit;
        held
    }

    fn refuse(&mut self, why: impl Into<String>) {
        *self.refused.entry(why.into()).or_default() += 1;
    }

    fn refused_text(&self) -> String {
        if self.refused.is_empty() {
            return "none".to_owned();
        }
        self.refused
            .iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn merge(&mut self, mut other: Held) {
        if !self.what.is_empty() {
            self.what.push_str(" + ");
        }
        self.what.push_str(&other.what);
        self.units += other.units;
        for (why, n) in &other.refused {
            *self.refused.entry(why.clone()).or_default() += n;
        }
        self.sockets.extend(std::mem::take(&mut other.sockets));
        self.streams.extend(std::mem::take(&mut other.streams));
        self.tasks.extend(std::mem::take(&mut other.tasks));
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

/// The limit a refusal names, short.
fn limit_named(status: &tonic::Status) -> String {
    let message = status.message();
    for key in [
        "limits.calls_per_guest",
        "limits.calls_per_peer",
        "limits.remote_calls_total",
        "limits.calls_per_connection",
        "limits.web_body_bytes",
        "limits.message_size",
        "RLIMIT_NOFILE",
        "at most 65536",
        "in progress",
        "has not read its input",
    ] {
        if message.contains(key) {
            return key.trim_start_matches("limits.").to_owned();
        }
    }
    format!(
        "{:?}: {}",
        status.code(),
        message.chars().take(60).collect::<String>()
    )
}

/// The headers of an HTTP/1.1 gRPC-web `ReadHistory` whose body will be `length` bytes.
fn grpc_web_headers(length: usize, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    format!(
        "POST /conlog.v1.Console/ReadHistory HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n{auth}\
         content-length: {length}\r\n\r\n"
    )
}

/// Attack 1: gRPC-web bodies on every connection the limits allow, without a token (1a) or
/// with READ tokens of every guest (1b: held, within `limits.web_body_bytes`).
async fn web_bodies(target: Arc<Target>, with_token: bool) -> Held {
    let body = Arc::new(vec![0u8; BODY_SENT]);
    let mut set = JoinSet::new();
    for i in 0..target.sizes.connections {
        let (target, body) = (target.clone(), body.clone());
        set.spawn(async move {
            let from = peer(i, target.sizes.peers);
            let token = with_token.then(|| {
                let guests = &target.guests;
                guests[i % guests.len()].read.clone()
            });
            let mut socket = connect_from(from, target.tcp).await?;
            socket
                .write_all(grpc_web_headers(BODY_ANNOUNCED, token.as_deref()).as_bytes())
                .await?;
            socket.write_all(&body).await?;
            std::io::Result::Ok(socket)
        });
    }
    let mut held = Held::new(
        format!(
            "{} HTTP/1.1 gRPC-web bodies of 1.3 MB (of 1.4 MB announced), {}",
            target.sizes.connections,
            if with_token {
                "READ tokens of every guest"
            } else {
                "no token"
            }
        ),
        "connection",
    );
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(socket)) => {
                held.units += 1;
                held.sockets.push(socket);
            }
            Ok(Err(e)) => held.refuse(format!("closed ({})", e.kind())),
            Err(e) => held.refuse(format!("task: {e}")),
        }
    }
    held
}

/// Attack 2: connections that never make a call, filling `limits.tcp_connections`.
async fn idle_connections(target: Arc<Target>) -> Held {
    let mut set = JoinSet::new();
    for i in 0..target.sizes.connections {
        let target = target.clone();
        set.spawn(async move {
            let mut socket = connect_from(peer(i, target.sizes.peers), target.tcp).await?;
            match i % 3 {
                0 => {}
                1 => {
                    socket
                        .write_all(b"POST /conlog.v1.Console/ReadHistory HTTP/1.1\r\nx-a: ")
                        .await?
                }
                _ => {
                    socket
                        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                        .await?
                }
            }
            std::io::Result::Ok((i, socket))
        });
    }
    let mut held = Held::new(
        format!(
            "{} connections without a call (silent, slow-loris, HTTP/2 without a stream)",
            target.sizes.connections
        ),
        "connection",
    );
    held.leave_to_daemon = target.sizes.wait_idle_close;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok((i, socket))) if i % 3 == 1 => {
                held.units += 1;
                // Slow-loris: a header byte a second until the daemon closes the connection.
                let mut socket = socket;
                held.tasks.push(tokio::spawn(async move {
                    while socket.write_all(b"a").await.is_ok() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }));
            }
            Ok(Ok((_, socket))) => {
                held.units += 1;
                held.sockets.push(socket);
            }
            Ok(Err(e)) => held.refuse(format!("closed ({})", e.kind())),
            Err(e) => held.refuse(format!("task: {e}")),
        }
    }
    held
}

/// Whether a new connection from a well-behaved address is shut out (closed at once).
async fn shut_out(target: &Target) -> bool {
    let Ok(mut socket) = connect_from(PROBE_PEER, target.tcp).await else {
        return true;
    };
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read(&mut socket, &mut buf)
        )
        .await,
        Ok(Ok(0) | Err(_))
    )
}

fn follow(guest: &str, tail: u64) -> ReadHistoryRequest {
    ReadHistoryRequest {
        guest: guest.into(),
        stream: HISTORY_STREAM.into(),
        follow: true,
        start: Some(read_history_request::Start::TailBytes(tail)),
        ..Default::default()
    }
}

/// Opens following `ReadHistory` calls on `client` until one is refused.
async fn follows_until_refused(client: Remote, guest: String, at_most: usize) -> Held {
    let mut held = Held::new(String::new(), "call");
    for _ in 0..at_most {
        let mut client = client.clone();
        let opened = tokio::time::timeout(Duration::from_secs(20), async {
            let mut stream = client
                .read_history(follow(&guest, 4096))
                .await?
                .into_inner();
            stream.message().await?;
            Ok::<_, tonic::Status>(stream)
        })
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no first chunk in 20 s")));
        match opened {
            Ok(stream) => {
                held.units += 1;
                held.streams.push(Box::new(stream));
            }
            Err(status) => {
                held.refuse(limit_named(&status));
                break;
            }
        }
    }
    held
}

/// Attack 3: follows until refused, with one READ token, then with every guest's.
async fn follows(target: Arc<Target>) -> Held {
    let per_guest = target.limits.calls_per_guest as usize;
    let budget = target.limits.remote_calls_total as usize;
    let mut held = Held::new(String::new(), "call");
    // One token: refused at the guest's limit.
    let first = &target.guests[0];
    let one = match target
        .remote(peer(0, target.sizes.peers), &first.read)
        .await
    {
        Ok(client) => follows_until_refused(client, first.name.clone(), budget + 1).await,
        Err(e) => {
            held.refuse(format!("connect: {e}"));
            return held;
        }
    };
    let one_token = one.units;
    held.merge(one);
    // Every guest's token, concurrently, each from its own address.
    let mut set = JoinSet::new();
    for (g, guest) in target
        .guests
        .iter()
        .enumerate()
        .take(target.sizes.call_guests)
        .skip(1)
    {
        let (target, name, token) = (target.clone(), guest.name.clone(), guest.read.clone());
        set.spawn(async move {
            match target.remote(peer(g, target.sizes.peers), &token).await {
                Ok(client) => follows_until_refused(client, name, per_guest + 1).await,
                Err(e) => {
                    let mut held = Held::default();
                    held.refuse(format!("connect: {e}"));
                    held
                }
            }
        });
    }
    while let Some(joined) = set.join_next().await {
        if let Ok(other) = joined {
            held.merge(other);
        }
    }
    held.what = format!(
        "follows until refused: {one_token} with one READ token, {} with {} tokens",
        held.units, target.sizes.call_guests
    );
    held.unit = "call";
    held
}

/// An HTTP/2 frame.
fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("small frame");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The bytes of a raw HTTP/2 client that opens `streams` calls of `path` with `request`,
/// advertising the largest flow-control windows (and then never reads its socket).
fn stalled_h2_calls(token: &str, path: &str, request: &[u8], streams: u32) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let mut settings = vec![0, 4];
    settings.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    frame(&mut out, 4, 0, 0, &settings);
    frame(&mut out, 4, 1, 0, &[]);
    frame(&mut out, 8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes());
    let mut message = vec![0u8];
    message.extend_from_slice(&u32::try_from(request.len()).expect("small").to_be_bytes());
    message.extend_from_slice(request);
    let authorization = format!("Bearer {token}");
    let mut encoder = loona_hpack::Encoder::new();
    for i in 0..streams {
        let id = 1 + 2 * i;
        let headers = encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", b"127.0.0.1"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"authorization", authorization.as_bytes()),
        ]);
        frame(&mut out, 1, 4, id, &headers);
        frame(&mut out, 0, 1, id, &message);
    }
    out
}

/// Which stalled calls a raw HTTP/2 client makes.
#[derive(Clone, Copy)]
enum Stalled {
    /// Attack 4: following `ReadHistory` from the oldest byte of the guest's log pipe.
    Readers,
    /// Attack 6: `WatchConsole` READ_ONLY asking for a replay (by default the largest,
    /// `consoles.max_replay`).
    Watchers,
}

impl Stalled {
    fn bytes(self, guest: &Guest, streams: u32, replay: u64) -> Vec<u8> {
        match self {
            Self::Readers => {
                let request = ReadHistoryRequest {
                    guest: guest.name.clone(),
                    stream: HISTORY_STREAM.into(),
                    follow: true,
                    ..Default::default()
                };
                stalled_h2_calls(
                    &guest.read,
                    "/conlog.v1.Console/ReadHistory",
                    &request.encode_to_vec(),
                    streams,
                )
            }
            Self::Watchers => {
                let request = WatchConsoleRequest {
                    guest: guest.name.clone(),
                    mode: conlog::proto::attach::Mode::ReadOnly.into(),
                    replay_bytes: replay,
                    ..Default::default()
                };
                stalled_h2_calls(
                    &guest.read,
                    "/conlog.v1.Console/WatchConsole",
                    &request.encode_to_vec(),
                    streams,
                )
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Readers => "follows from the oldest byte",
            Self::Watchers => "READ_ONLY WatchConsole asking for a replay",
        }
    }
}

/// Attacks 4 and 6: stalled calls, `limits.calls_per_guest` per guest on one connection each.
async fn stalled(target: Arc<Target>, kind: Stalled) -> Held {
    let per_guest = target.limits.calls_per_guest;
    let guests = target.sizes.call_guests.min(target.guests.len());
    let mut held = Held::new(
        format!(
            "{guests} raw HTTP/2 connections × {per_guest} {}, windows 2^31, never read",
            kind.describe()
        ),
        "call",
    );
    let before = target.gauge("conlog_remote_calls_in_progress");
    for (g, guest) in target.guests.iter().enumerate().take(guests) {
        match connect_from(peer(g, target.sizes.peers), target.tcp).await {
            Ok(mut socket) => {
                let bytes = kind.bytes(guest, per_guest, target.sizes.replay);
                match socket.write_all(&bytes).await {
                    Ok(()) => held.sockets.push(socket),
                    Err(e) => held.refuse(format!("closed ({})", e.kind())),
                }
            }
            Err(e) => held.refuse(format!("connect ({})", e.kind())),
        }
    }
    // The daemon admits what it can; count what it holds once the figure settles.
    let wanted = f64::from(per_guest) * held.sockets.len() as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = f64::NAN;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = target.gauge("conlog_remote_calls_in_progress") - before;
        if now >= wanted || now == last || Instant::now() > deadline {
            held.units = count(now);
            break;
        }
        last = now;
    }
    let refused = count(wanted).saturating_sub(held.units);
    if refused > 0 {
        held.refuse(format!("not admitted (limits; unread answers) ×{refused}"));
    }
    held
}

/// Bytes of a partial request: a gRPC message announcing [`PARTIAL_ANNOUNCED`] bytes, all but
/// the last [`PARTIAL_MISSING`] sent.
const PARTIAL_ANNOUNCED: usize = 1_000_000;
const PARTIAL_MISSING: usize = 1;

/// Attack 8: requests whose message never completes. One `ReadHistory` stream per raw HTTP/2
/// connection, with a READ token; its gRPC message announces just under `limits.message_size`
/// and arrives but for its last byte, within the windows the daemon advertised (1 MiB), after
/// which the client sends nothing more and never reads.
async fn partial_requests(target: Arc<Target>) -> Held {
    let per_guest = target.limits.calls_per_guest as usize;
    let guests = target.sizes.call_guests.min(target.guests.len());
    let connections = (guests * per_guest).min(target.sizes.connections);
    let mut held = Held::new(
        format!(
            "{connections} raw HTTP/2 connections × 1 ReadHistory whose message (announced \
             {PARTIAL_ANNOUNCED} B) stops 1 byte short, READ tokens, never read"
        ),
        "call",
    );
    let before = target.gauge("conlog_remote_calls_in_progress");
    let mut set = JoinSet::new();
    for c in 0..connections {
        let target = target.clone();
        set.spawn(async move {
            let guest = &target.guests[c / per_guest % target.guests.len()];
            let mut socket = connect_from(peer(c, target.sizes.peers), target.tcp).await?;
            let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            frame(&mut out, 4, 0, 0, &[]);
            frame(&mut out, 4, 1, 0, &[]);
            let authorization = format!("Bearer {}", guest.read);
            let headers = loona_hpack::Encoder::new().encode([
                (&b":method"[..], &b"POST"[..]),
                (b":scheme", b"http"),
                (b":path", b"/conlog.v1.Console/ReadHistory"),
                (b":authority", b"127.0.0.1"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"authorization", authorization.as_bytes()),
            ]);
            frame(&mut out, 1, 4, 1, &headers);
            socket.write_all(&out).await?;
            // The daemon's SETTINGS and WINDOW_UPDATE (1 MiB windows) are sent at once.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut message = vec![0u8];
            message.extend_from_slice(
                &u32::try_from(PARTIAL_ANNOUNCED)
                    .expect("small")
                    .to_be_bytes(),
            );
            message.resize(5 + PARTIAL_ANNOUNCED - PARTIAL_MISSING, b'p');
            let mut out = Vec::with_capacity(message.len() + 1024);
            for piece in message.chunks(16_384) {
                frame(&mut out, 0, 0, 1, piece);
            }
            socket.write_all(&out).await?;
            std::io::Result::Ok(socket)
        });
    }
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(socket)) => held.sockets.push(socket),
            Ok(Err(e)) => held.refuse(format!("closed ({})", e.kind())),
            Err(e) => held.refuse(format!("task: {e}")),
        }
    }
    // Admitted calls are counted at their headers; wait for the bodies to be taken.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = target.gauge("conlog_remote_calls_in_progress") - before;
    held.units = count(now);
    held
}

/// A writer session of a console, with the stream that keeps it.
struct Writer {
    client: Remote,
    session: String,
    _frames: tonic::Streaming<conlog::proto::ServerFrame>,
}

/// Setup of attack 5: a READ_WRITE session on each flooded console, and its guest's socket
/// filled (input sent until the daemon says the guest has not read it).
async fn writer(target: Arc<Target>, g: usize) -> anyhow::Result<Writer> {
    let guest = &target.guests[g];
    let mut client = target
        .remote(peer(g, target.sizes.peers), &guest.write)
        .await?;
    let mut frames = client
        .watch_console(WatchConsoleRequest {
            guest: guest.name.clone(),
            mode: conlog::proto::attach::Mode::ReadWrite.into(),
            ..Default::default()
        })
        .await
        .context("WatchConsole")?
        .into_inner();
    let session = loop {
        let frame = frames.message().await?.context("WatchConsole ended")?;
        if let Some(server_frame::Frame::Attached(attached)) = frame.frame {
            if !attached.writer {
                bail!("{}: not the writer", guest.name);
            }
            break attached.session_id;
        }
    };
    let filler = bytes::Bytes::from(vec![b'F'; 16 << 10]);
    for _ in 0..4096 {
        let sent = client
            .send_console_input(SendConsoleInputRequest {
                session_id: session.clone(),
                data: filler.clone(),
                ..Default::default()
            })
            .await;
        match sent {
            Ok(_) => continue,
            Err(s) if s.message().contains("has not read its input") => {
                return Ok(Writer {
                    client,
                    session,
                    _frames: frames,
                })
            }
            Err(s) => bail!("{}: filler input: {s:?}", guest.name),
        }
    }
    bail!("{}: the guest socket never filled", guest.name)
}

/// Attack 5: concurrent large input to consoles whose guest does not read.
async fn input_flood(target: Arc<Target>, writers: Arc<Vec<Writer>>) -> Held {
    let calls = target.sizes.input_calls;
    let mut held = Held::new(
        format!(
            "{} consoles × {calls} concurrent SendConsoleInput (half 1 MiB, half 64 KiB), READ_WRITE",
            writers.len()
        ),
        "call",
    );
    let large = bytes::Bytes::from(vec![b'X'; INPUT_LARGE]);
    let small = bytes::Bytes::from(vec![b'Y'; INPUT_SMALL]);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for w in 0..writers.len() {
        for i in 0..calls {
            let (writers, done_tx) = (writers.clone(), done_tx.clone());
            let data = if i % 2 == 0 {
                large.clone()
            } else {
                small.clone()
            };
            held.tasks.push(tokio::spawn(async move {
                let writer = &writers[w];
                let mut client = writer.client.clone();
                let outcome = client
                    .send_console_input(SendConsoleInputRequest {
                        session_id: writer.session.clone(),
                        data,
                        ..Default::default()
                    })
                    .await;
                let _ = done_tx.send(outcome.map(|_| ()).map_err(|s| limit_named(&s)));
            }));
        }
    }
    drop(done_tx);
    // Measured while calls are in flight: everything but one call per session is answered at
    // once; that one waits for the guest (up to 10 s).
    let total = writers.len() * calls;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut answered = 0;
    while answered + writers.len() < total && Instant::now() < deadline {
        match tokio::time::timeout(POLL, done_rx.recv()).await {
            Ok(Some(Ok(()))) => answered += 1,
            Ok(Some(Err(why))) => {
                answered += 1;
                held.refuse(why);
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    held.units = (total - answered) as u64;
    held
}

/// Local calls timed, and what failed.
struct Probe {
    latencies_ms: Vec<f64>,
    calls: usize,
    failures: Vec<String>,
}

impl Probe {
    fn percentile(&self, q: f64) -> f64 {
        percentile(&self.latencies_ms, q)
    }
}

/// `n` local `ListGuests`, timed, then a `CreateLogPipe` (claimed), a `CreateConsole` and a
/// `RemoveGuest` of a guest of its own.
async fn probe(agent: &mut AgentClient<Channel>, n: usize, round: usize) -> Probe {
    let mut probe = Probe {
        latencies_ms: Vec::with_capacity(n),
        calls: 0,
        failures: Vec::new(),
    };
    for _ in 0..n {
        let start = Instant::now();
        let result = agent.list_guests(ListGuestsRequest::default()).await;
        probe.calls += 1;
        match result {
            Ok(_) => probe
                .latencies_ms
                .push(start.elapsed().as_secs_f64() * 1000.0),
            Err(s) => probe.failures.push(format!("ListGuests: {s:?}")),
        }
    }
    let guest = format!("probe{round}");
    probe.calls += 3;
    match agent
        .create_log_pipe(CreateLogPipeRequest {
            guest: guest.clone(),
            stream: "qemu".into(),
            limits: None,
            ..Default::default()
        })
        .await
    {
        Ok(created) => {
            let created = created.into_inner();
            if let Err(e) =
                conlog::client::receive_pipe(Path::new(&created.fd_socket), &created.handoff_token)
            {
                probe.failures.push(format!("claiming the pipe: {e}"));
            }
        }
        Err(s) => probe.failures.push(format!("CreateLogPipe: {s:?}")),
    }
    if let Err(s) = agent
        .create_console(CreateConsoleRequest {
            guest: guest.clone(),
            device: String::new(),
            limits: None,
            ..Default::default()
        })
        .await
    {
        probe.failures.push(format!("CreateConsole: {s:?}"));
    }
    if let Err(s) = agent
        .remove_guest(RemoveGuestRequest {
            guest,
            ..Default::default()
        })
        .await
    {
        probe.failures.push(format!("RemoveGuest: {s:?}"));
    }
    probe
}

/// One row of the report.
struct Row {
    name: String,
    what: String,
    held: String,
    refused: String,
    baseline_kib: u64,
    peak_kib: u64,
    per_unit_kib: Option<f64>,
    fds_before: usize,
    fds_peak: usize,
    fds_after: Option<usize>,
    /// RSS once the attack ended (what the allocator kept).
    rss_after_kib: u64,
    idle: Probe,
    attacked: Probe,
    note: String,
}

/// Everything needed between attacks.
struct Attacks<'a> {
    runtime: &'a Runtime,
    attackers: &'a Runtime,
    target: Arc<Target>,
    agent: AgentClient<Channel>,
    rounds: usize,
}

impl Attacks<'_> {
    fn probe(&mut self) -> Probe {
        self.rounds += 1;
        let (n, round) = (self.target.sizes.probes, self.rounds);
        self.runtime.block_on(probe(&mut self.agent, n, round))
    }

    fn wait_fds(&self, at_most: usize, within: Duration) -> Option<usize> {
        let deadline = Instant::now() + within;
        loop {
            let fds = open_fds(self.target.pid);
            if fds <= at_most {
                return Some(fds);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Measures one attack: idle probe, attack launched and held, probe under attack, release.
    fn measure<F>(&mut self, name: &str, launch: F) -> anyhow::Result<Row>
    where
        F: std::future::Future<Output = Held> + Send + 'static,
    {
        let pid = self.target.pid;
        let idle = self.probe();
        // Whatever the probe and the previous attack left settles first.
        std::thread::sleep(Duration::from_millis(300));
        let fds_before = open_fds(pid);
        let baseline_kib = procfs::rss_kib(pid)?;
        procfs::reset_peak_rss(pid)?;
        let sampler = RssSampler::start(pid, Duration::from_millis(10));
        let fd_peak = Arc::new(std::sync::atomic::AtomicUsize::new(fds_before));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fd_sampler = {
            let (peak, stop) = (fd_peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak.fetch_max(open_fds(pid), std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        eprintln!("  {name}: launching");
        let started = Instant::now();
        let held = self.attackers.block_on(launch);
        eprintln!(
            "  {name}: holding {} {}(s) after {:.1}s; refused: {}",
            held.units,
            held.unit,
            started.elapsed().as_secs_f64(),
            held.refused_text()
        );
        let rss_holding = procfs::rss_kib(pid)?;
        let mut note = String::new();
        if name.starts_with("2 ") || name.starts_with("7 ") {
            let locked = self.attackers.block_on(shut_out(&self.target));
            let _ = write!(
                note,
                "{} ({} TCP connections open by conlog_tcp_connections_open)",
                if locked {
                    "a new connection from another address is closed at once while they are open"
                } else {
                    "a new connection from another address is not closed within 2 s"
                },
                self.target.gauge("conlog_tcp_connections_open")
            );
        }
        let attacked = self.probe();
        let peak_kib = sampler
            .finish()
            .max(procfs::status_kib(pid, "VmHWM").unwrap_or(0))
            .max(rss_holding);
        // Mixed units (connections and calls) have no cost per unit.
        let per_unit_kib = (held.units > 0 && held.unit != "unit")
            .then(|| rss_holding.saturating_sub(baseline_kib) as f64 / held.units as f64);
        let (what, units, unit, refused) = (
            held.what.clone(),
            held.units,
            held.unit,
            held.refused_text(),
        );
        let leave = held.leave_to_daemon;
        let released = Instant::now();
        if leave {
            // The daemon must close them itself: hold the sockets, wait for the descriptors.
            let idle_timeout = self.target.limits.idle_timeout.get();
            let back = self.wait_fds(fds_before + 2, idle_timeout + Duration::from_secs(30));
            let _ = write!(
                note,
                "; the daemon closed them all itself in {:.1}s (limits.idle_timeout {}s)",
                released.elapsed().as_secs_f64(),
                idle_timeout.as_secs()
            );
            if back.is_none() {
                note.push_str(" — NOT all closed");
            }
            let _guard = self.attackers.enter();
            drop(held);
        } else {
            let _guard = self.attackers.enter();
            drop(held);
        }
        let fds_after = self.wait_fds(fds_before + 2, DEADLINE);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = fd_sampler.join();
        let rss_after_kib = procfs::rss_kib(pid)?;
        if fds_after.is_none() {
            eprintln!(
                "  {name}: descriptors did not come back to {fds_before} within {DEADLINE:?} ({} open)",
                open_fds(pid)
            );
        }
        Ok(Row {
            name: name.to_owned(),
            what,
            held: format!("{units} {unit}s"),
            refused,
            baseline_kib,
            peak_kib,
            per_unit_kib,
            fds_before,
            fds_peak: fd_peak.load(std::sync::atomic::Ordering::Relaxed),
            fds_after,
            rss_after_kib,
            idle,
            attacked,
            note,
        })
    }
}

/// Sets the guests up: history through a log pipe, a console whose guest never reads.
async fn setup_guests(
    agent: &mut AgentClient<Channel>,
    count: usize,
) -> anyhow::Result<(Vec<Guest>, Vec<UnixStream>)> {
    let mut guests = Vec::new();
    let mut guest_sockets = Vec::new();
    let history: Vec<u8> = (0..HISTORY)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz"[i % 26])
        .collect();
    for g in 0..count {
        let name = format!("vm{g:02}");
        let limits = common::rotating(HISTORY_FILE, 8);
        let (fd, _) = common::create_pipe(agent, &name, HISTORY_STREAM, Some(limits)).await?;
        fs::File::from(fd).write_all(&history)?;
        let (guest_socket, _) = common::create_console(agent, &name, "", None).await?;
        // Console output for watchers to replay (the guest never reads its input).
        let output = history.clone();
        let mut writer = guest_socket.try_clone()?;
        std::thread::spawn(move || {
            writer.write_all(&output[..usize::try_from(REPLAY).expect("1 MiB")])
        });
        guest_sockets.push(guest_socket);
        let read = common::issue_token(agent, &name, Access::Read).await?;
        let write = common::issue_token(agent, &name, Access::ReadWrite).await?;
        guests.push(Guest { name, read, write });
    }
    // Every byte logged before the run starts.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let listed = agent
            .list_guests(ListGuestsRequest::default())
            .await?
            .into_inner();
        let logged = listed
            .guests
            .iter()
            .flat_map(|g| &g.streams)
            .filter(|s| {
                (s.name == HISTORY_STREAM && s.offset >= HISTORY as u64)
                    || (s.name == "serial0" && s.offset >= REPLAY)
            })
            .count();
        if logged >= 2 * count {
            break;
        }
        if Instant::now() > deadline {
            bail!("the guests' history was not logged within {DEADLINE:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok((guests, guest_sockets))
}

/// A daemon with the run's guests, tokens and attack 5's writer sessions in place.
struct Served {
    daemon: Daemon,
    target: Arc<Target>,
    agent: AgentClient<Channel>,
    writers: Arc<Vec<Writer>>,
    /// The consoles' guests (they never read).
    _guest_sockets: Vec<UnixStream>,
}

impl Served {
    fn start(
        bench: &Bench,
        attackers: &Runtime,
        dir: &Path,
        sizes: &Sizes,
    ) -> anyhow::Result<Self> {
        let runtime = &bench.runtime;
        fs::create_dir_all(dir)?;
        let daemon = bench.start(dir)?;
        let tcp: SocketAddr = daemon.ready_field("tcp")?.parse()?;
        let metrics: SocketAddr = daemon.ready_field("metrics")?.parse()?;
        let mut agent = runtime.block_on(daemon.agent())?;
        let (guests, guest_sockets) = runtime.block_on(setup_guests(&mut agent, sizes.guests))?;
        let target = Arc::new(Target {
            tcp,
            metrics,
            pid: daemon.pid(),
            guests,
            sizes: sizes.clone(),
            limits: Limits::default(),
        });
        // Attack 5's sessions and filled guest sockets, before any measurement.
        eprintln!(
            "  filling the guest sockets of {} consoles",
            sizes.input_guests
        );
        let writers: Vec<Writer> = attackers.block_on(async {
            let mut set = JoinSet::new();
            for g in 0..sizes.input_guests {
                set.spawn(writer(target.clone(), g));
            }
            let mut writers = Vec::new();
            while let Some(joined) = set.join_next().await {
                writers.push(joined??);
            }
            anyhow::Ok(writers)
        })?;
        Ok(Self {
            daemon,
            target,
            agent,
            writers: Arc::new(writers),
            _guest_sockets: guest_sockets,
        })
    }

    fn stop(self, runtime: &Runtime) -> anyhow::Result<()> {
        let Self {
            daemon,
            mut agent,
            writers,
            ..
        } = self;
        drop(writers);
        runtime.block_on(async {
            let _ = agent.list_guests(ListGuestsRequest::default()).await;
        });
        daemon.stop()
    }
}

impl Scenario for HostileArgs {
    const NAME: &'static str = "hostile";

    fn run(&self, bench: &Bench) -> anyhow::Result<Verdict> {
        run(bench, self)
    }
}

/// Runs the scenario and prints its report.
fn run(bench: &Bench, args: &HostileArgs) -> anyhow::Result<Verdict> {
    let runtime = &bench.runtime;
    let limits = Limits::default();
    let sizes = Sizes::new(&limits, args, bench.quick());
    let scratch = bench.scratch.path();
    let attackers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Every attacking address must be usable (Linux routes all of 127/8 to lo).
    for i in 0..sizes.peers {
        std::net::TcpListener::bind((peer(i, sizes.peers), 0))
            .with_context(|| format!("loopback address {} not usable", peer(i, sizes.peers)))?;
    }

    let first = Served::start(bench, &attackers, &scratch.join("a"), &sizes)?;
    let pid = first.target.pid;
    let nofile = fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    println!(
        "hostile callers: conlogd at its default limits, {}",
        bench.machine
    );
    println!(
        "  limits: tcp_connections {}, connections_per_peer {}, remote_calls_total {}, calls_per_peer {}, \
         calls_per_guest {}, calls_per_connection {}, web_body_bytes {}, idle_timeout {}, body_timeout {}; \
         RLIMIT_NOFILE {nofile} (remote share {})",
        limits.tcp_connections,
        limits.connections_per_peer,
        limits.remote_calls_total,
        limits.calls_per_peer,
        limits.calls_per_guest,
        limits.calls_per_connection,
        limits.web_body_bytes,
        limits.idle_timeout,
        limits.body_timeout,
        first.target.gauge("conlog_remote_descriptors_limit"),
    );
    println!(
        "  {} guests with {} of history and a console whose guest never reads (16 KiB of input \
         sent until it stopped taking it); attacks from {} loopback addresses; {} local \
         ListGuests per measurement; attack 6's watchers ask for a replay of {}; attacks 1-6 on \
         one daemon, 7 on a fresh one",
        first.target.guests.len(),
        report::size(HISTORY as u64),
        first.target.sizes.peers,
        first.target.sizes.probes,
        report::size(sizes.replay),
    );

    let mut rows = Vec::new();
    {
        let (target, writers) = (first.target.clone(), first.writers.clone());
        let mut bench = Attacks {
            runtime,
            attackers: &attackers,
            target: target.clone(),
            agent: first.agent.clone(),
            rounds: 0,
        };
        rows.push(bench.measure("1a web bodies, no token", web_bodies(target.clone(), false))?);
        rows.push(bench.measure(
            "1b web bodies, READ token",
            web_bodies(target.clone(), true),
        )?);
        rows.push(bench.measure("2 idle connections", idle_connections(target.clone()))?);
        rows.push(bench.measure("3 follows", follows(target.clone()))?);
        rows.push(bench.measure(
            "4 stalled readers",
            stalled(target.clone(), Stalled::Readers),
        )?);
        rows.push(bench.measure("5 console input", input_flood(target.clone(), writers))?);
        rows.push(bench.measure("6 stalled watchers", stalled(target, Stalled::Watchers))?);
    }
    first.stop(runtime)?;

    // All at once on a fresh daemon: what the first one's allocator kept from the attacks
    // before would otherwise hide (or be counted as) this one's growth.
    let fresh = Served::start(bench, &attackers, &scratch.join("b"), &sizes)?;
    {
        let (target, writers) = (fresh.target.clone(), fresh.writers.clone());
        let mut bench = Attacks {
            runtime,
            attackers: &attackers,
            target: target.clone(),
            agent: fresh.agent.clone(),
            rounds: 0,
        };
        let all = async move {
            let (a, b, c, d, e, f, g) = tokio::join!(
                stalled(target.clone(), Stalled::Watchers),
                stalled(target.clone(), Stalled::Readers),
                follows(target.clone()),
                input_flood(target.clone(), writers),
                web_bodies(target.clone(), true),
                web_bodies(target.clone(), false),
                idle_connections(target.clone()),
            );
            let mut held = Held::new(String::new(), "unit");
            for part in [a, b, c, d, e, f, g] {
                held.merge(part);
            }
            // The daemon's own closing of idle connections is attack 2's row; here the bench
            // closes everything.
            held.leave_to_daemon = false;
            held.what = "attacks 6, 4, 3, 5, 1b, 1a and 2 launched together".into();
            held
        };
        rows.push(bench.measure("7 all at once", all)?);
    }
    fresh.stop(runtime)?;

    // Partial requests on a fresh daemon too (the same reason).
    let third = Served::start(bench, &attackers, &scratch.join("c"), &sizes)?;
    {
        let mut bench = Attacks {
            runtime,
            attackers: &attackers,
            target: third.target.clone(),
            agent: third.agent.clone(),
            rounds: 0,
        };
        rows.push(bench.measure("8 partial requests", partial_requests(third.target.clone()))?);
    }
    third.stop(runtime)?;

    let mut verdict = Verdict::Correct;
    let mut table = Table::new(&[
        "attack",
        "held",
        "peak RSS MiB",
        "+RSS MiB",
        "KiB/unit",
        "RSS after MiB",
        "fds before",
        "fds peak",
        "fds after",
        "ListGuests p50/p99 idle ms",
        "p50/p99 attacked ms",
        "p99 ratio",
        "local calls ok",
    ]);
    for row in &rows {
        let ok = row.attacked.calls - row.attacked.failures.len();
        let ratio = row.attacked.percentile(0.99) / row.idle.percentile(0.99);
        table.row(vec![
            row.name.clone(),
            row.held.clone(),
            mib(row.peak_kib),
            mib(row.peak_kib.saturating_sub(row.baseline_kib)),
            row.per_unit_kib.map_or("-".into(), |k| format!("{k:.0}")),
            mib(row.rss_after_kib),
            row.fds_before.to_string(),
            row.fds_peak.to_string(),
            row.fds_after.map_or("NOT BACK".into(), |f| f.to_string()),
            format!(
                "{:.2}/{:.2}",
                row.idle.percentile(0.5),
                row.idle.percentile(0.99)
            ),
            format!(
                "{:.2}/{:.2}",
                row.attacked.percentile(0.5),
                row.attacked.percentile(0.99)
            ),
            format!("{ratio:.1}"),
            format!("{ok}/{}", row.attacked.calls),
        ]);
        let failed = !row.attacked.failures.is_empty() || !row.idle.failures.is_empty();
        if failed {
            verdict = Verdict::Wrong;
            eprintln!(
                "WRONG: {}: local calls failed: {:?}",
                row.name,
                row.attacked
                    .failures
                    .iter()
                    .chain(&row.idle.failures)
                    .take(5)
                    .collect::<Vec<_>>()
            );
        }
        if row.fds_after.is_none() {
            verdict = Verdict::Wrong;
            eprintln!(
                "WRONG: {}: descriptors did not come back to the baseline",
                row.name
            );
        }
        if row.peak_kib > CEILING_MIB << 10 {
            verdict = Verdict::Wrong;
            eprintln!(
                "WRONG: {}: peak RSS {} MiB over the ceiling of {CEILING_MIB} MiB",
                row.name,
                mib(row.peak_kib)
            );
        }
    }
    println!();
    print!("{}", table.text());
    println!();
    for row in &rows {
        println!("  {}: {}; refused: {}", row.name, row.what, row.refused);
        if !row.note.is_empty() {
            println!("    {}", row.note.trim_start_matches("; "));
        }
    }
    // The memory model with the unit costs measured in this run.
    let unit = |prefix: &str| {
        rows.iter()
            .filter(|r| r.name.starts_with(prefix))
            .filter_map(|r| r.per_unit_kib)
            .fold(0.0f64, f64::max)
    };
    let connection = unit("1a ").max(unit("2 "));
    // Attack 5 holds one call per session; its refused calls are transient.
    let call = unit("3 ").max(unit("4 ")).max(unit("6 ")).max(unit("8 "));
    let baseline = rows.first().map_or(0, |r| r.baseline_kib);
    let model_kib = baseline as f64
        + f64::from(limits.tcp_connections) * connection
        + f64::from(limits.remote_calls_total) * call
        + (limits.web_body_bytes.bytes() >> 10) as f64;
    println!();
    println!(
        "  memory model at the default limits: baseline {} MiB + {} connections × {connection:.0} KiB \
         + {} calls × {call:.0} KiB + web_body_bytes {} = {:.0} MiB; ceiling {CEILING_MIB} MiB; \
         all at once measured {} MiB",
        mib(baseline),
        limits.tcp_connections,
        limits.remote_calls_total,
        limits.web_body_bytes,
        model_kib / 1024.0,
        rows.iter()
            .find(|r| r.name.starts_with("7 "))
            .map_or("-".into(), |r| mib(r.peak_kib)),
    );
    println!();
    report::print_markdown(None, &[&table]);
    Ok(verdict)
}

/// A gauge's value (or a number of calls computed from gauges) as a count; negative is 0.
#[allow(
    clippy::cast_possible_truncation,
    reason = "gauges hold whole numbers far below u64::MAX"
)]
fn count(value: f64) -> u64 {
    value.max(0.0) as u64
}
