//! Log pipes and their hand-off through `fd.sock`.
//!
//! Owns the pending hand-offs (token → the pipe's write end) and the `fd.sock` listener. It
//! creates pipes but never reads them: the read end goes to the stream's actor at once, the
//! write end waits here until a client claims it or its token expires (then it is closed, and
//! the stream sees end-of-file if nobody else writes).
//!
//! # Wire protocol of `fd.sock` (SOCK_STREAM UNIX socket)
//!
//! 1. The client connects and sends the hand-off token returned by `Agent.CreateLogPipe`,
//!    followed by `\n`: 1 to 127 printable ASCII bytes (`0x21..=0x7e`), an optional `\r`
//!    before the `\n`, at most [`MAX_LINE`] (128) bytes in all, and the whole line within
//!    `handoff.read_timeout` (a total, not per read). The line may arrive in any number of
//!    writes; anything after the `\n` is ignored.
//! 2. On success the server sends exactly one byte, `0x00`, with one descriptor attached as
//!    `SCM_RIGHTS` ancillary data: the pipe's write end (blocking, close-on-exec set on the
//!    receiving side by `MSG_CMSG_CLOEXEC` if the client asks for it). The token is consumed.
//!    If the descriptor cannot be sent (the client went away first), the token stays valid
//!    until it expires.
//! 3. On failure (any other byte before the `\n`, which is refused as soon as it arrives; a
//!    line too long; end of stream or the timeout before the `\n`; an unknown, used or expired
//!    token) the server sends a line of UTF-8 text starting with `error: ` and no descriptor.
//! 4. Either way the server then closes the connection. One token per connection.
//!
//! While the daemon freezes for an upgrade or a takeover, a token line is answered with
//! `error: conlogd is upgrading; retry in a moment: connect again with the same token`: the
//! token is carried to the next image, which serves it (connections that wait in the listening
//! socket's backlog are carried too and served by the next image). A claim already under way
//! when the freeze begins is finished first.
//!
//! Every connection is served on its own task and holds one descriptor for at most the read
//! timeout plus about a second, so silent, trickling or garbage-sending clients never delay
//! another client and leave nothing behind.
//!
//! A Python agent does: `sock.sendall(token.encode() + b"\n")`, then
//! `msg, fds, _, _ = socket.recv_fds(sock, 1024, 1)` and checks `msg == b"\0" and fds`.

use crate::metrics::Metrics;
use crate::names::{GuestName, StreamName};
use crate::upgrade::gate::{Admission, Gate};
use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tracing::Instrument;

/// Longest token line accepted on fd.sock, `\n` included.
pub const MAX_LINE: usize = 128;
/// How long a refused client is given to take its error line before the connection closes.
const REFUSAL_GRACE: Duration = Duration::from_secs(1);

/// Outstanding tokens, and recently expired ones (their write ends already closed).
#[derive(Default)]
struct Tokens {
    live: HashMap<String, Pending>,
    expired: HashMap<String, Instant>,
}

impl Tokens {
    /// Closes the write ends of expired tokens and remembers their names for a while.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .live
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(token, _)| token.clone())
            .collect();
        for token in expired {
            if let Some(pending) = self.live.remove(&token) {
                crate::keeper::release(&pending.held_as);
            }
            self.expired.insert(token, now);
        }
        if self.expired.len() > REMEMBER_EXPIRED {
            let mut by_age: Vec<(Instant, String)> =
                self.expired.drain().map(|(t, at)| (at, t)).collect();
            by_age.sort_unstable();
            self.expired = by_age
                .into_iter()
                .rev()
                .take(REMEMBER_EXPIRED / 2)
                .map(|(at, t)| (t, at))
                .collect();
        }
    }
}

/// A pipe's write end waiting for its client.
struct Pending {
    guest: String,
    stream: String,
    write_end: OwnedFd,
    expires: Instant,
    /// The name the keeper holds the write end under ([`crate::keeper`]).
    held_as: String,
}

/// How many expired tokens are remembered, so a late client is told "expired" rather than
/// "unknown".
const REMEMBER_EXPIRED: usize = 4096;

/// The table of outstanding hand-off tokens.
pub struct Handoffs {
    pending: Mutex<Tokens>,
    ttl: Duration,
    max_pending: usize,
    metrics: Arc<Metrics>,
    /// Closed while the daemon freezes for an upgrade (see [`crate::upgrade::gate`]).
    gate: Arc<Gate>,
}

/// A new pipe: the read end (non-blocking, for the stream actor) and the write end (blocking,
/// for the writer).
pub struct NewPipe {
    pub read_end: OwnedFd,
    pub write_end: OwnedFd,
}

/// Creates a close-on-exec pipe with a kernel buffer of about `buffer` bytes.
pub fn create_pipe(buffer: usize) -> io::Result<NewPipe> {
    let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    rustix::fs::fcntl_setfl(&read_end, rustix::fs::OFlags::NONBLOCK)?;
    // The kernel may refuse a large buffer for unprivileged users over their pipe quota; the
    // default buffer still works, so this is best effort.
    if let Err(e) = rustix::pipe::fcntl_setpipe_size(&read_end, buffer) {
        tracing::debug!(error = %e, "cannot enlarge pipe buffer");
    }
    Ok(NewPipe {
        read_end,
        write_end,
    })
}

impl Handoffs {
    pub fn new(
        ttl: Duration,
        max_pending: usize,
        metrics: Arc<Metrics>,
        gate: Arc<Gate>,
    ) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Tokens::default()),
            ttl,
            max_pending,
            metrics,
            gate,
        })
    }

    /// Admits a change that an upgrade must carry (a new pipe or stream, a removed guest), to
    /// be held until its result is in the registry and this table; `UNAVAILABLE` while the
    /// daemon freezes for an upgrade or a takeover, before anything is created.
    pub fn admit(&self) -> Result<Admission, HandoffError> {
        Ok(self.gate.enter()?)
    }

    /// Keeps `write_end` for the client that presents the returned token.
    pub fn register(
        &self,
        guest: &GuestName,
        stream: &StreamName,
        write_end: OwnedFd,
    ) -> Result<String, HandoffError> {
        let (guest, stream) = (guest.as_str(), stream.as_str());
        crate::fault::point("handoff.register");
        let token = crate::ids::random_id().map_err(HandoffError::Token)?;
        let mut pending = self.pending.lock().expect("hand-off table poisoned");
        let now = Instant::now();
        pending.expire(now);
        if pending.live.len() >= self.max_pending {
            return Err(HandoffError::LimitReached {
                limit: "limits.pending_handoffs",
                value: self.max_pending as u64,
            });
        }
        let held_as = crate::keeper::names::handoff(&token, guest, stream, self.ttl);
        crate::keeper::hold(&held_as, write_end.as_fd());
        pending.live.insert(
            token.clone(),
            Pending {
                guest: guest.to_owned(),
                stream: stream.to_owned(),
                write_end,
                expires: now + self.ttl,
                held_as,
            },
        );
        Ok(token)
    }

    /// How long a new token stays valid.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Takes the write end for `token` if it exists and has not expired.
    fn claim(&self, token: &str) -> std::result::Result<Pending, &'static str> {
        let mut pending = self.pending.lock().expect("hand-off table poisoned");
        pending.expire(Instant::now());
        match pending.live.remove(token) {
            Some(p) => Ok(p),
            None if pending.expired.contains_key(token) => Err("hand-off token expired"),
            None => Err("unknown or already used hand-off token"),
        }
    }

    /// Closes the write ends of expired tokens. Called periodically.
    pub fn sweep(&self) {
        self.pending
            .lock()
            .expect("hand-off table poisoned")
            .expire(Instant::now());
    }

    /// Freezes every pending hand-off (for an upgrade or a takeover): takes them, with the time
    /// each has left, for the next image to [`adopt`](Self::adopt).
    pub fn freeze(&self) -> Vec<crate::upgrade::FrozenHandoff> {
        let mut tokens = self.pending.lock().expect("hand-off table poisoned");
        let now = Instant::now();
        tokens.expire(now);
        tokens
            .live
            .drain()
            .map(|(token, p)| crate::upgrade::FrozenHandoff {
                token,
                guest: p.guest,
                stream: p.stream,
                write_end: p.write_end,
                expires_in: p.expires.saturating_duration_since(now),
            })
            .collect()
    }

    /// Takes over pending hand-offs carried by an upgrade; their tokens stay valid.
    pub fn adopt(&self, carried: Vec<crate::upgrade::FrozenHandoff>) {
        let mut tokens = self.pending.lock().expect("hand-off table poisoned");
        let now = Instant::now();
        for h in carried {
            let held_as =
                crate::keeper::names::handoff(&h.token, &h.guest, &h.stream, h.expires_in);
            crate::keeper::hold(&held_as, h.write_end.as_fd());
            tokens.live.insert(
                h.token,
                Pending {
                    guest: h.guest,
                    stream: h.stream,
                    write_end: h.write_end,
                    expires: now + h.expires_in,
                    held_as,
                },
            );
        }
    }

    /// Forgets the pending hand-offs of a guest (it was removed).
    pub fn forget_guest(&self, guest: &GuestName) {
        self.forget(guest, None);
    }

    /// Forgets the pending hand-offs of one stream of a guest (it is being removed).
    pub fn forget_stream(&self, guest: &GuestName, stream: &StreamName) {
        self.forget(guest, Some(stream.as_str()));
    }

    fn forget(&self, guest: &GuestName, stream: Option<&str>) {
        let guest = guest.as_str();
        self.pending
            .lock()
            .expect("hand-off table poisoned")
            .live
            .retain(|_, p| {
                let keep = p.guest != guest || stream.is_some_and(|s| p.stream != s);
                if !keep {
                    crate::keeper::release(&p.held_as);
                }
                keep
            });
    }

    /// Accepts fd.sock clients until the task is dropped; each is served on its own task so
    /// a slow client never delays another.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, read_timeout: Duration) {
        let sweeper = {
            let this = self.clone();
            tokio::spawn(
                async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        this.sweep();
                    }
                }
                .instrument(tracing::info_span!("handoff_sweeper")),
            )
        };
        let _sweeper = AbortOnDrop(sweeper);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    crate::limited!(warn, error = %e, "fd.sock accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid());
            tokio::spawn(
                async move { this.serve_one(stream, read_timeout).await }
                    .instrument(tracing::info_span!("handoff", peer_pid)),
            );
        }
    }

    async fn serve_one(&self, mut stream: UnixStream, read_timeout: Duration) {
        // Held from the claim until the write end is sent or put back, so a freeze never
        // carries the table while a claim is half done (see `crate::upgrade::gate`).
        let mut admission = None;
        let mut upgrading = false;
        let claimed = match tokio::time::timeout(read_timeout, read_token(&mut stream)).await {
            Err(_) => Err("timed out waiting for the token line".to_owned()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(token)) => match self.gate.enter() {
                // The token stays valid in the next image: the client connects again.
                Err(closed) => {
                    upgrading = true;
                    Err(format!("{closed}: connect again with the same token"))
                }
                Ok(admitted) => {
                    admission = Some(admitted);
                    crate::fault::point("handoff.claim");
                    match self.claim(&token) {
                        Ok(pending) => Ok((token, pending)),
                        Err(reason) => Err(reason.to_owned()),
                    }
                }
            },
        };
        let (token, pending) = match claimed {
            Ok(claimed) => claimed,
            Err(reason) => {
                // A refusal during a freeze is no failure: the token stays valid.
                drop(admission.take());
                if !upgrading {
                    self.metrics.handoff_failures.inc();
                }
                crate::limited!(warn, reason, "hand-off refused");
                let _ = tokio::time::timeout(REFUSAL_GRACE, refuse(&mut stream, &reason)).await;
                return;
            }
        };
        // The keeper lets go of the write end before it goes out: a crash after the send
        // must not leave a second writer that keeps the stream open (crate::keeper).
        crate::keeper::release(&pending.held_as);
        let _ = crate::keeper::flushed().await;
        let sent = tokio::time::timeout(read_timeout, send_fd(&stream, &pending.write_end)).await;
        match sent.unwrap_or_else(|_| Err(io::Error::from(ErrorKind::TimedOut))) {
            Ok(()) => {
                crate::fault::point("handoff.sent");
                self.metrics.handoffs.inc();
                crate::limited!(burst: crate::ratelimit::Throttle::AUDIT_BURST, info, guest = %pending.guest, stream = %pending.stream, "log pipe handed over");
            }
            Err(e) => {
                self.metrics.handoff_failures.inc();
                // The client can go away at will, and then claim the same token again.
                crate::limited!(warn, guest = %pending.guest, stream = %pending.stream, error = %e, "hand-off send failed; the token stays valid");
                self.unclaim(token, pending);
            }
        }
        drop(admission);
    }

    /// Puts back a hand-off whose descriptor was not delivered (`sendmsg` with SCM_RIGHTS
    /// delivers all or nothing), so its client can try again until the token expires.
    fn unclaim(&self, token: String, pending: Pending) {
        crate::keeper::hold(&pending.held_as, pending.write_end.as_fd());
        let mut tokens = self.pending.lock().expect("hand-off table poisoned");
        tokens.live.insert(token, pending);
        tokens.expire(Instant::now());
    }
}

/// Sends the `error: ` line, then reads what the client still sends (an over-long line)
/// before the caller closes, so the close does not reset the connection and destroy the
/// error text in flight. The caller bounds the time this takes.
async fn refuse(stream: &mut UnixStream, reason: &str) {
    let line = format!("error: {reason}\n");
    if send_bytes(stream, line.as_bytes()).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// What registering a hand-off refuses or fails at. The mapping to status codes is
/// `crate::error`'s.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The daemon is freezing for an upgrade or a takeover: nothing new is admitted.
    #[error(transparent)]
    Upgrading(#[from] crate::upgrade::gate::Closed),
    /// `limits.pending_handoffs` hand-offs wait for their clients already.
    #[error("Limit {limit} reached ({value})")]
    LimitReached { limit: &'static str, value: u64 },
    /// No random token could be had.
    #[error("cannot generate a hand-off token")]
    Token(#[source] io::Error),
}

/// Why no token was read from an `fd.sock` connection (the text after `error: ` on the wire).
#[derive(Debug, thiserror::Error)]
enum TokenError {
    #[error("read failed: {0}")]
    Read(#[source] io::Error),
    #[error("connection closed before the token line ended")]
    Closed,
    #[error(transparent)]
    Line(#[from] LineError),
}

/// Why a token line was refused (the text after `error: ` on the wire).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// No `\n` within [`MAX_LINE`] bytes.
    #[error("token line longer than {MAX_LINE} bytes")]
    TooLong,
    /// A byte that cannot be part of a token.
    #[error("byte 0x{0:02x} in the token line (tokens are printable ASCII)")]
    BadByte(u8),
    /// The line has no token.
    #[error("empty token line")]
    Empty,
}

/// Parses the bytes received so far on an `fd.sock` connection: `Ok(Some(token))` once a
/// well-formed line (see the module doc) is complete, `Ok(None)` while it may still become one,
/// and an error as soon as it cannot. `Ok(None)` implies fewer than [`MAX_LINE`] bytes.
pub fn parse_token_line(received: &[u8]) -> std::result::Result<Option<&str>, LineError> {
    let window = &received[..received.len().min(MAX_LINE)];
    let end = window.iter().position(|b| *b == b'\n');
    let line = &window[..end.unwrap_or(window.len())];
    // A `\r` may only come last, right before the `\n` (or as the last byte received so far).
    let token = line.strip_suffix(b"\r").unwrap_or(line);
    if let Some(bad) = token.iter().find(|b| !b.is_ascii_graphic()) {
        return Err(LineError::BadByte(*bad));
    }
    match end {
        Some(_) if token.is_empty() => Err(LineError::Empty),
        // Printable ASCII is UTF-8.
        Some(_) => std::str::from_utf8(token)
            .map(Some)
            .map_err(|e| LineError::BadByte(token[e.valid_up_to()])),
        None if window.len() >= MAX_LINE => Err(LineError::TooLong),
        None => Ok(None),
    }
}

/// Reads one token line (see [`parse_token_line`]).
async fn read_token(stream: &mut UnixStream) -> Result<String, TokenError> {
    let mut received = [0u8; MAX_LINE];
    let mut len = 0;
    loop {
        // `parse_token_line` answered `Ok(None)`, so there is room left.
        let n = stream
            .read(&mut received[len..])
            .await
            .map_err(TokenError::Read)?;
        if n == 0 {
            return Err(TokenError::Closed);
        }
        len += n;
        match parse_token_line(&received[..len]) {
            Ok(Some(token)) => return Ok(token.to_owned()),
            Ok(None) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends the status byte 0x00 with `fd` attached.
async fn send_fd(stream: &UnixStream, fd: &OwnedFd) -> io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    loop {
        stream.writable().await?;
        let result = stream.try_io(Interest::WRITABLE, || {
            let fds = [fd.as_fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            let status = [0u8];
            sendmsg(
                stream,
                &[io::IoSlice::new(&status)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(io::Error::from)
        });
        match result {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(io::Error::new(ErrorKind::WriteZero, "status byte not sent")),
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn send_bytes(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Aborts a background task when its owner goes away.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// Bytes that reach every branch of the parser: mostly token bytes, some line ends, and
    /// anything (mapped from plain integers: much cheaper to generate than a union).
    fn bytes(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
        vec(any::<u16>(), len).prop_map(|raw| {
            raw.into_iter()
                .map(|r| {
                    let value = (r >> 4).to_le_bytes()[0];
                    match r % 16 {
                        0 => b'\n',
                        1 => b'\r',
                        2 | 3 => value,
                        _ => b'!' + value % 94,
                    }
                })
                .collect()
        })
    }

    #[test]
    fn real_tokens_parse() {
        let token = crate::ids::random_id().unwrap();
        let line = format!("{token}\n");
        assert_eq!(parse_token_line(line.as_bytes()), Ok(Some(token.as_str())));
        let line = format!("{token}\r\n");
        assert_eq!(parse_token_line(line.as_bytes()), Ok(Some(token.as_str())));
        assert_eq!(parse_token_line(b""), Ok(None));
        assert_eq!(parse_token_line(b"\n"), Err(LineError::Empty));
        assert_eq!(parse_token_line(b"\r\n"), Err(LineError::Empty));
        assert_eq!(parse_token_line(b"ab\0"), Err(LineError::BadByte(0)));
        assert_eq!(parse_token_line(&[b'a'; MAX_LINE]), Err(LineError::TooLong));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic; an accepted token is a well-formed line's, and an
        /// incomplete answer means the bytes can still become one.
        #[test]
        fn arbitrary_bytes_are_accepted_only_as_well_formed_lines(
            bytes in bytes(0..2 * MAX_LINE),
        ) {
            match parse_token_line(&bytes) {
                Ok(Some(token)) => {
                    prop_assert!(!token.is_empty());
                    prop_assert!(token.bytes().all(|b| b.is_ascii_graphic()));
                    prop_assert!(bytes.starts_with(token.as_bytes()));
                    let end = match &bytes[token.len()..] {
                        [b'\n', ..] => 1,
                        [b'\r', b'\n', ..] => 2,
                        other => return Err(TestCaseError::fail(format!(
                            "token {token:?} followed by {other:?}"
                        ))),
                    };
                    prop_assert!(token.len() + end <= MAX_LINE);
                }
                Ok(None) => {
                    prop_assert!(bytes.len() < MAX_LINE);
                    let body = bytes.strip_suffix(b"\r").unwrap_or(&bytes);
                    prop_assert!(body.iter().all(u8::is_ascii_graphic));
                }
                Err(_) => {}
            }
        }

        /// A well-formed line is accepted with its token whatever follows it; each of its
        /// prefixes is incomplete, never refused (a line may arrive in pieces).
        #[test]
        fn well_formed_lines_are_accepted_in_pieces(
            token in "[!-~]{1,127}",
            cr: bool,
            rest in vec(any::<u8>(), 0..64),
        ) {
            let mut line = token.clone().into_bytes();
            if cr {
                line.push(b'\r');
            }
            line.push(b'\n');
            let whole = [line.as_slice(), &rest].concat();
            if line.len() <= MAX_LINE {
                prop_assert_eq!(parse_token_line(&whole), Ok(Some(token.as_str())));
            } else {
                prop_assert_eq!(parse_token_line(&whole), Err(LineError::TooLong));
            }
            for cut in 0..line.len() {
                let expected = if cut < MAX_LINE { Ok(None) } else { Err(LineError::TooLong) };
                prop_assert_eq!(parse_token_line(&line[..cut]), expected, "prefix of {}", cut);
            }
        }

        /// One byte that is not printable ASCII anywhere in a token is refused as soon as it
        /// arrives, newline or not (a `\r` is only allowed last).
        #[test]
        fn a_bad_byte_is_refused_at_once(
            token in "[!-~]{1,100}",
            at: Index,
            bad in any::<u8>().prop_filter("not a token byte", |b| !b.is_ascii_graphic()),
            newline: bool,
        ) {
            let mut bytes = token.into_bytes();
            let at = at.index(bytes.len());
            let last = at == bytes.len() - 1;
            bytes[at] = bad;
            if newline {
                bytes.push(b'\n');
            }
            let expected = match bad {
                b'\n' | b'\r' if at == 0 && (bad == b'\n' || last && newline) => {
                    Err(LineError::Empty)
                }
                b'\n' => Ok(Some(at)),
                b'\r' if last && newline => Ok(Some(at)),
                b'\r' if last => Ok(None),
                _ => Err(LineError::BadByte(bad)),
            };
            prop_assert_eq!(parse_token_line(&bytes).map(|t| t.map(str::len)), expected);
        }
    }
}
