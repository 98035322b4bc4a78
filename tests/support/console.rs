//! Console helpers shared by the console tests: a fake guest playing QEMU's side of the guest
//! socket, and AttachConsole / WatchConsole clients.
//!
//! - [`create_console`] / [`open_console`]: `Agent.CreateConsole`.
//! - [`FakeGuest`] (and [`RawClient`], the same type on `client.sock`): a UNIX stream peer that
//!   writes bytes (in one write or one byte per write, as QEMU does), records everything it
//!   reads, and can disconnect, reconnect and echo.
//! - [`Session`]: an `AttachConsole` call (input frames up, [`Frames`] down).
//! - [`watch`] / [`send_input`]: the split API (`WatchConsole`, `SendConsoleInput`).
//! - [`Frames`]: a server-frame stream that checks offsets as it goes (every output frame must
//!   start where the previous one ended, or where a `lagged` frame says it resumes) and keeps
//!   the output and the other frames for assertions.
//! - Small helpers: [`local_channel`] (a new connection of its own), [`wait_clients`],
//!   [`wait_guest_connected`], [`assert_socket`], [`expect_code`], [`rss_bytes`], [`bounded`].
//!
//! Every wait is bounded by [`DEADLINE`] and panics with what it was waiting for and what it
//! had seen. Nothing here sleeps for a fixed time.

use conlog::proto::{
    self, agent_client::AgentClient, attach::Mode, client_frame, server_frame::Frame,
};
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::{Bearer, ConsoleChannel, Daemon, IntoConsole, DEADLINE, POLL};
use tonic::service::interceptor::InterceptedService;

/// The default console device.
pub const DEVICE: &str = "serial0";

/// Awaits `future` for at most [`DEADLINE`]; panics naming `what` when it takes longer.
pub async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done after {DEADLINE:?}"))
}

// Creating consoles

/// `Agent.CreateConsole(guest, device, limits)`.
pub async fn create_console(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    device: &str,
    limits: Option<proto::LogLimits>,
) -> Result<proto::CreateConsoleResponse, Status> {
    bounded(
        "CreateConsole",
        agent.create_console(proto::CreateConsoleRequest {
            guest: guest.into(),
            device: device.into(),
            limits,
            ..Default::default()
        }),
    )
    .await
    .map(|r| r.into_inner())
}

/// Creates (or returns) the console `guest/serial0` with default limits; panics on error.
pub async fn open_console(
    agent: &mut AgentClient<Channel>,
    guest: &str,
) -> proto::CreateConsoleResponse {
    create_console(agent, guest, "", None)
        .await
        .unwrap_or_else(|s| panic!("CreateConsole {guest}: {s:?}"))
}

/// A new connection (its own HTTP/2 connection, so its flow control is its own) to the
/// daemon's local socket.
pub async fn local_channel(daemon: &Daemon) -> ConsoleChannel {
    let channel = bounded("connect to the local socket", async {
        conlog::client::connect_local(&daemon.socket())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", daemon.socket().display()))
    })
    .await;
    InterceptedService::new(channel, Bearer(None))
}

/// Waits (bounded) until `ListGuests` shows `guest/device` with `clients` attached clients.
pub async fn wait_clients(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    device: &str,
    clients: u32,
) -> proto::StreamInfo {
    let what = format!("with {clients} clients");
    super::wait_stream(agent, guest, device, &what, |s| s.clients == clients).await
}

/// Waits (bounded) until `ListGuests` shows whether a guest is connected to `guest/device`.
pub async fn wait_guest_connected(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    device: &str,
    connected: bool,
) -> proto::StreamInfo {
    let what = format!("guest_connected == {connected}");
    super::wait_stream(agent, guest, device, &what, |s| {
        s.guest_connected == connected
    })
    .await
}

/// Asserts that `path` is a UNIX socket with mode 0660 whose path fits in `sun_path` (107
/// bytes plus the terminating NUL).
pub fn assert_socket(path: impl AsRef<Path>) {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let path = path.as_ref();
    let shown = path.display();
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {shown}: {e}"));
    assert!(meta.file_type().is_socket(), "{shown} is not a socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "mode of {shown}");
    assert!(
        path.as_os_str().len() <= 107,
        "{shown} is too long for a UNIX socket"
    );
}

/// Asserts that `result` is an error with `code`; returns the status message. `what` names the
/// request in the failure message.
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: tonic::Code,
    what: &str,
) -> String {
    match result {
        Ok(value) => panic!("{what}: expected {code:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            status.message().to_owned()
        }
    }
}

/// Resident memory of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"));
    kib * 1024
}

// UNIX stream peers: the fake guest and raw clients

/// One connection to a UNIX stream socket that records everything it reads.
///
/// As [`FakeGuest`] it plays QEMU on `<device>.guest.sock`: what it writes is guest output, what
/// it reads is console input. As [`RawClient`] it is a `socat`-like client of
/// `<device>.client.sock`. Reading happens only inside the `wait_*` methods (and [`echo`]), so a
/// peer that is not waited on is a peer that does not read.
///
/// [`echo`]: SocketPeer::echo
pub struct SocketPeer {
    stream: UnixStream,
    path: PathBuf,
    received: Vec<u8>,
    eof: bool,
}

/// QEMU's side of a console's guest socket.
pub type FakeGuest = SocketPeer;
/// A raw client of a console's `client.sock`.
pub type RawClient = SocketPeer;

impl SocketPeer {
    /// Connects to `path`, retrying (bounded) while the socket does not exist or refuses
    /// connections, like QEMU's `reconnect=1`.
    pub async fn connect(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref().to_owned();
        let deadline = Instant::now() + DEADLINE;
        loop {
            match UnixStream::connect(&path).await {
                Ok(stream) => {
                    return Self {
                        stream,
                        path,
                        received: Vec::new(),
                        eof: false,
                    }
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("connect to {}: {e} (for {DEADLINE:?})", path.display())
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// The connected socket (for socket options and ioctls).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The socket path this peer connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` (as few writes as the socket allows).
    pub async fn write(&mut self, data: &[u8]) {
        bounded("write to the console socket", self.stream.write_all(data))
            .await
            .unwrap_or_else(|e| panic!("write to {}: {e}", self.path.display()));
    }

    /// Writes `data` one byte per `write()`, as QEMU does with serial output.
    pub async fn write_bytewise(&mut self, data: &[u8]) {
        for byte in data {
            self.write(std::slice::from_ref(byte)).await;
        }
    }

    /// Everything read so far.
    pub fn received(&self) -> &[u8] {
        &self.received
    }

    /// Reads whatever arrives within `wait` (possibly nothing); returns how many bytes.
    pub async fn read_some(&mut self, wait: std::time::Duration) -> usize {
        let mut buffer = vec![0u8; 64 << 10];
        match tokio::time::timeout(wait, self.stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                0
            }
            Ok(Ok(n)) => {
                self.received.extend_from_slice(&buffer[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    /// Forgets what was read so far.
    pub fn clear_received(&mut self) {
        self.received.clear();
    }

    /// Whether the other side closed the connection (seen by a `wait_*` method).
    pub fn saw_eof(&self) -> bool {
        self.eof
    }

    /// Reads (bounded) until [`received`](Self::received) satisfies `done`; returns it.
    pub async fn wait_until(&mut self, what: &str, done: impl Fn(&[u8]) -> bool) -> &[u8] {
        let deadline = Instant::now() + DEADLINE;
        let mut buffer = vec![0u8; 64 << 10];
        while !done(&self.received) {
            if self.eof {
                panic!(
                    "{}: closed before {what}; read {:?}",
                    self.path.display(),
                    String::from_utf8_lossy(&self.received)
                );
            }
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut buffer)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => panic!("read from {}: {e}", self.path.display()),
                Err(_) => panic!(
                    "{}: not {what} after {DEADLINE:?}; read {:?}",
                    self.path.display(),
                    String::from_utf8_lossy(&self.received)
                ),
            };
            if n == 0 {
                self.eof = true;
            }
            self.received.extend_from_slice(&buffer[..n]);
        }
        &self.received
    }

    /// Reads (bounded) until at least `len` bytes were read in total; returns them all.
    pub async fn wait_len(&mut self, len: usize) -> &[u8] {
        self.wait_until(&format!("{len} bytes read"), |r| r.len() >= len)
            .await
    }

    /// Reads (bounded) until `needle` was read.
    pub async fn wait_for(&mut self, needle: &[u8]) -> &[u8] {
        let what = format!("{:?} read", String::from_utf8_lossy(needle));
        self.wait_until(&what, |r| contains(r, needle)).await
    }

    /// Reads (bounded) until the other side closes the connection; returns everything read.
    pub async fn wait_eof(&mut self) -> &[u8] {
        let deadline = Instant::now() + DEADLINE;
        let mut buffer = vec![0u8; 64 << 10];
        while !self.eof {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.received.extend_from_slice(&buffer[..n]),
                Err(_) => panic!(
                    "{}: still open after {DEADLINE:?}; read {:?}",
                    self.path.display(),
                    String::from_utf8_lossy(&self.received)
                ),
            }
        }
        &self.received
    }

    /// Closes the connection (QEMU stopping) and connects again to the same path (QEMU
    /// restarting with `reconnect=1`). What was read is forgotten.
    pub async fn reconnect(self) -> Self {
        let path = self.path.clone();
        drop(self);
        Self::connect(path).await
    }

    /// Hands the connection to a task that writes back everything it reads (a guest whose
    /// terminal echoes). The task stops when the connection ends or the handle drops.
    pub fn echo(self) -> EchoTask {
        let mut stream = self.stream;
        EchoTask(tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }))
    }
}

/// An echoing guest (see [`SocketPeer::echo`]); aborted when dropped.
pub struct EchoTask(tokio::task::JoinHandle<()>);

impl Drop for EchoTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether `needle` occurs in `haystack` (an empty needle always does).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

// Server frames

/// A check run on every output frame: `(offset, data)`.
pub type OutputCheck = Box<dyn FnMut(u64, &[u8]) + Send>;

/// A `ServerFrame` stream (of AttachConsole or WatchConsole) that checks offsets as it goes.
///
/// Every output frame must start at [`next_offset`](Self::next_offset): the attach offset
/// first, then the end of the previous output, or the `to_offset` of a `lagged` frame whose
/// `from_offset` is where output stopped. A violation panics at once.
pub struct Frames {
    stream: Streaming<proto::ServerFrame>,
    /// The first frame, `attached`.
    pub attached: proto::Attached,
    /// Offset the next output frame must start at.
    pub next_offset: u64,
    /// Output bytes received, in order, while [`keep_output`](Self::keep_output) is set
    /// (skipped ranges are simply absent; see [`events`](Self::events) for them).
    pub output: Vec<u8>,
    /// Whether output bytes are kept in [`output`](Self::output) (default true). Turn off for
    /// floods, and check data with [`check_output`](Self::check_output) instead.
    pub keep_output: bool,
    /// Called with every output frame's offset and data.
    pub check_output: Option<OutputCheck>,
    /// Total output bytes received.
    pub output_bytes: u64,
    /// `(offset, len)` of every output frame, in order.
    pub chunks: Vec<(u64, usize)>,
    /// Every frame but output, in order, each with the value of `next_offset` when it came (so
    /// its position in the output is known).
    pub events: Vec<(u64, Frame)>,
    /// How many of `events` [`wait_event`](Self::wait_event) has handed out.
    events_taken: usize,
    /// Why the stream ended, once it did (`Ok` for a clean end).
    pub ended: Option<Result<(), Status>>,
}

impl std::fmt::Debug for Frames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frames")
            .field("attached", &self.attached)
            .field("next_offset", &self.next_offset)
            .field("output_bytes", &self.output_bytes)
            .field("events", &self.events)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Frames {
    /// Reads the first frame, which must be `attached`.
    pub async fn start(mut stream: Streaming<proto::ServerFrame>) -> Result<Self, Status> {
        let first = bounded("the attached frame", stream.message()).await?;
        let attached = match first.and_then(|f| f.frame) {
            Some(Frame::Attached(attached)) => attached,
            other => panic!("first ServerFrame is not attached: {other:?}"),
        };
        Ok(Self {
            stream,
            next_offset: attached.offset,
            attached,
            output: Vec::new(),
            keep_output: true,
            check_output: None,
            output_bytes: 0,
            chunks: Vec::new(),
            events: Vec::new(),
            events_taken: 0,
            ended: None,
        })
    }

    /// The next frame (bounded), after checking and recording it. `Ok(None)` at a clean end,
    /// `Err` when the stream ended with a status (both also recorded in `ended`).
    pub async fn next(&mut self) -> Result<Option<Frame>, Status> {
        if let Some(ended) = &self.ended {
            return ended.clone().map(|()| None);
        }
        let message = tokio::time::timeout(DEADLINE, self.stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no ServerFrame for {DEADLINE:?} (next offset {}, events {:?})",
                    self.next_offset, self.events
                )
            });
        let frame = match message {
            Ok(Some(message)) => message
                .frame
                .unwrap_or_else(|| panic!("ServerFrame without a frame")),
            Ok(None) => {
                self.ended = Some(Ok(()));
                return Ok(None);
            }
            Err(status) => {
                self.ended = Some(Err(status.clone()));
                return Err(status);
            }
        };
        match &frame {
            Frame::Output(out) => {
                assert_eq!(
                    out.offset,
                    self.next_offset,
                    "output frame of {} bytes at offset {} where {} was expected",
                    out.data.len(),
                    out.offset,
                    self.next_offset
                );
                assert!(!out.data.is_empty(), "empty output frame at {}", out.offset);
                if let Some(check) = &mut self.check_output {
                    check(out.offset, &out.data);
                }
                if self.keep_output {
                    self.output.extend_from_slice(&out.data);
                }
                self.chunks.push((out.offset, out.data.len()));
                self.output_bytes += out.data.len() as u64;
                self.next_offset += out.data.len() as u64;
            }
            Frame::Lagged(lagged) => {
                assert_eq!(
                    lagged.from_offset, self.next_offset,
                    "lagged frame {lagged:?} does not start where output stopped"
                );
                assert!(
                    lagged.to_offset > lagged.from_offset,
                    "empty lagged range {lagged:?}"
                );
                self.events.push((self.next_offset, frame.clone()));
                self.next_offset = lagged.to_offset;
            }
            Frame::Attached(a) => panic!("a second attached frame: {a:?}"),
            _ => self.events.push((self.next_offset, frame.clone())),
        }
        Ok(Some(frame))
    }

    /// The next frame; panics if the stream ended.
    async fn next_live(&mut self, waiting_for: &str) -> Frame {
        match self.next().await {
            Ok(Some(frame)) => frame,
            other => panic!(
                "stream ended ({other:?}) while waiting for {waiting_for}; next offset {}, events {:?}",
                self.next_offset, self.events
            ),
        }
    }

    /// Reads (bounded) until output up to `offset` (exclusive) has arrived.
    pub async fn wait_offset(&mut self, offset: u64) {
        let deadline = Instant::now() + DEADLINE;
        while self.next_offset < offset {
            assert!(
                Instant::now() < deadline,
                "output up to {offset} not received after {DEADLINE:?} (at {})",
                self.next_offset
            );
            self.next_live(&format!("output up to offset {offset}"))
                .await;
        }
    }

    /// Reads (bounded) until `len` output bytes arrived in total; returns the kept output.
    pub async fn wait_output_len(&mut self, len: u64) -> &[u8] {
        let deadline = Instant::now() + DEADLINE;
        while self.output_bytes < len {
            assert!(
                Instant::now() < deadline,
                "{len} output bytes not received after {DEADLINE:?}"
            );
            self.next_live(&format!("{len} output bytes")).await;
        }
        &self.output
    }

    /// Reads (bounded) until the kept output contains `needle`.
    pub async fn wait_output(&mut self, needle: &[u8]) -> &[u8] {
        let deadline = Instant::now() + DEADLINE;
        let what = format!("output {:?}", String::from_utf8_lossy(needle));
        while !contains(&self.output, needle) {
            assert!(
                Instant::now() < deadline,
                "{what} not received after {DEADLINE:?}; got {:?}",
                String::from_utf8_lossy(&self.output)
            );
            self.next_live(&what).await;
        }
        &self.output
    }

    /// Returns the first event (a frame other than output) not handed out before that matches
    /// `matches`, reading (bounded) until one arrives. Earlier events that do not match are
    /// skipped over (they stay in [`events`](Self::events)).
    pub async fn wait_event(&mut self, what: &str, matches: impl Fn(&Frame) -> bool) -> Frame {
        let deadline = Instant::now() + DEADLINE;
        loop {
            while self.events_taken < self.events.len() {
                let (_, frame) = &self.events[self.events_taken];
                self.events_taken += 1;
                if matches(frame) {
                    return frame.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {what} after {DEADLINE:?}; events {:?}",
                self.events
            );
            self.next_live(what).await;
        }
    }

    /// Waits for a `guest {connected}` frame with this value.
    pub async fn wait_guest(&mut self, connected: bool) {
        let what = format!("guest {{ connected: {connected} }}");
        self.wait_event(
            &what,
            |f| matches!(f, Frame::Guest(g) if g.connected == connected),
        )
        .await;
    }

    /// Waits for a `writer_revoked` frame; returns its reason.
    pub async fn wait_revoked(&mut self) -> String {
        match self
            .wait_event("writer_revoked", |f| matches!(f, Frame::WriterRevoked(_)))
            .await
        {
            Frame::WriterRevoked(r) => r.reason,
            _ => unreachable!(),
        }
    }

    /// Reads (bounded) until the stream ends; returns its status, or panics on a clean end.
    pub async fn wait_end(&mut self) -> Status {
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(
                Instant::now() < deadline,
                "stream still open after {DEADLINE:?}"
            );
            match self.next().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("stream ended without a status"),
                Err(status) => return status,
            }
        }
    }

    /// `(from_offset, to_offset)` of every lagged frame so far.
    pub fn lagged(&self) -> Vec<(u64, u64)> {
        self.events
            .iter()
            .filter_map(|(_, f)| match f {
                Frame::Lagged(l) => Some((l.from_offset, l.to_offset)),
                _ => None,
            })
            .collect()
    }

    /// The `guest {connected}` frames so far, each with the output offset it came at.
    pub fn guest_frames(&self) -> Vec<(u64, bool)> {
        self.events
            .iter()
            .filter_map(|(at, f)| match f {
                Frame::Guest(g) => Some((*at, g.connected)),
                _ => None,
            })
            .collect()
    }
}

// AttachConsole

/// An attach frame's fields for `guest` (device serial0, no force, no replay).
pub fn attach(guest: &str, mode: Mode) -> proto::Attach {
    proto::Attach {
        guest: guest.into(),
        mode: mode.into(),
        ..Default::default()
    }
}

/// A `ClientFrame` carrying `attach`.
pub fn attach_frame(attach: proto::Attach) -> proto::ClientFrame {
    proto::ClientFrame {
        frame: Some(client_frame::Frame::Attach(attach)),
    }
}

/// A `ClientFrame` carrying input.
pub fn input_frame(data: &[u8]) -> proto::ClientFrame {
    proto::ClientFrame {
        frame: Some(client_frame::Frame::Input(proto::Input {
            data: data.to_vec().into(),
        })),
    }
}

/// An `AttachConsole` call: input frames go up, [`Frames`] come down (dereferences to them).
/// Dropping it cancels the call, which detaches the client.
#[derive(Debug)]
pub struct Session {
    frames: Frames,
    input: Option<mpsc::Sender<proto::ClientFrame>>,
}

impl Session {
    /// `AttachConsole` on `channel` with `attach` as the first frame; returns once the
    /// `attached` frame arrived, or the call's error status.
    pub async fn attach(channel: impl IntoConsole, attach: proto::Attach) -> Result<Self, Status> {
        Self::open(channel, Some(attach_frame(attach))).await
    }

    /// `AttachConsole` whose first frame is `first`; with `None` the client stream ends
    /// without any frame.
    pub async fn open(
        channel: impl IntoConsole,
        first: Option<proto::ClientFrame>,
    ) -> Result<Self, Status> {
        let (sender, receiver) = mpsc::channel(64);
        let input = match first {
            Some(frame) => {
                sender.send(frame).await.expect("request stream open");
                Some(sender)
            }
            None => {
                drop(sender);
                None
            }
        };
        let response = bounded(
            "AttachConsole",
            channel
                .console()
                .attach_console(tokio_stream::wrappers::ReceiverStream::new(receiver)),
        )
        .await?;
        let frames = Frames::start(response.into_inner()).await?;
        Ok(Self { frames, input })
    }

    /// Sends an input frame with `data`.
    pub async fn send(&self, data: &[u8]) {
        self.input().send(data).await;
    }

    /// Sends any client frame.
    pub async fn send_frame(&self, frame: proto::ClientFrame) {
        self.input().send_frame(frame).await;
    }

    /// A handle that sends input on this call from another task (for typing while reading).
    /// The request stream stays open while any handle lives.
    pub fn input(&self) -> SessionInput {
        SessionInput(self.input.clone().expect("input already closed"))
    }

    /// Ends the client stream (half-close) unless an [`input`](Self::input) handle still
    /// lives; server frames keep coming.
    pub fn close_input(&mut self) {
        self.input = None;
    }
}

/// Sends client frames on an AttachConsole call (see [`Session::input`]).
#[derive(Clone, Debug)]
pub struct SessionInput(mpsc::Sender<proto::ClientFrame>);

impl SessionInput {
    /// Sends an input frame with `data`.
    pub async fn send(&self, data: &[u8]) {
        self.send_frame(input_frame(data)).await;
    }

    /// Sends any client frame.
    pub async fn send_frame(&self, frame: proto::ClientFrame) {
        bounded("send a client frame", self.0.send(frame))
            .await
            .expect("AttachConsole request stream closed");
    }
}

impl Session {
    /// Its frames alone; its input half is closed.
    pub fn into_frames(self) -> Frames {
        self.frames
    }
}

impl Deref for Session {
    type Target = Frames;

    fn deref(&self) -> &Frames {
        &self.frames
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Frames {
        &mut self.frames
    }
}

// WatchConsole and SendConsoleInput

/// A `WatchConsole` request for `guest` (device serial0, no force, no replay).
pub fn watch_request(guest: &str, mode: Mode) -> proto::WatchConsoleRequest {
    proto::WatchConsoleRequest {
        guest: guest.into(),
        mode: mode.into(),
        ..Default::default()
    }
}

/// `WatchConsole`: returns once the `attached` frame (with the session id) arrived. Dropping
/// the frames cancels the call, which ends the session.
pub async fn watch(
    channel: impl IntoConsole,
    request: proto::WatchConsoleRequest,
) -> Result<Frames, Status> {
    let response = bounded("WatchConsole", channel.console().watch_console(request)).await?;
    let frames = Frames::start(response.into_inner()).await?;
    assert!(
        !frames.attached.session_id.is_empty(),
        "WatchConsole's attached frame has no session id: {:?}",
        frames.attached
    );
    Ok(frames)
}

/// `SendConsoleInput(session_id, data)`; returns `accepted_bytes`.
pub async fn send_input(
    channel: impl IntoConsole,
    session_id: &str,
    data: &[u8],
) -> Result<u64, Status> {
    bounded(
        "SendConsoleInput",
        channel
            .console()
            .send_console_input(proto::SendConsoleInputRequest {
                session_id: session_id.into(),
                data: data.to_vec().into(),
                ..Default::default()
            }),
    )
    .await
    .map(|r| r.into_inner().accepted_bytes)
}

/// A `ReadHistory` of `guest`'s default stream from the oldest byte, following.
pub fn follow_request(guest: &str) -> proto::ReadHistoryRequest {
    proto::ReadHistoryRequest {
        guest: guest.into(),
        follow: true,
        ..Default::default()
    }
}

/// A following `ReadHistory` whose first reply arrived (so the call is counted).
pub async fn follower(
    channel: ConsoleChannel,
    guest: &str,
) -> Result<tonic::Streaming<proto::HistoryChunk>, tonic::Status> {
    let mut stream = channel
        .console()
        .read_history(follow_request(guest))
        .await?
        .into_inner();
    stream.message().await?;
    Ok(stream)
}
