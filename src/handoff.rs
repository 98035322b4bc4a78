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
//!    followed by `\n` (at most 128 bytes in all, within `handoff.read_timeout`).
//! 2. On success the server sends exactly one byte, `0x00`, with one descriptor attached as
//!    `SCM_RIGHTS` ancillary data: the pipe's write end (blocking, close-on-exec set on the
//!    receiving side by `MSG_CMSG_CLOEXEC` if the client asks for it). The token is consumed.
//! 3. On failure the server sends a line of UTF-8 text starting with `error: ` and no descriptor.
//! 4. Either way the server then closes the connection. One token per connection.
//!
//! A Python agent does: `sock.sendall(token.encode() + b"\n")`, then
//! `msg, fds, _, _ = socket.recv_fds(sock, 1024, 1)` and checks `msg == b"\0" and fds`.

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

/// Longest token line accepted on fd.sock.
const MAX_LINE: usize = 128;

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
            self.live.remove(&token);
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
    pub fn new(ttl: Duration, max_pending: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Tokens::default()),
            ttl,
            max_pending,
            metrics,
        })
    }

    /// Keeps `write_end` for the client that presents the returned token.
    pub fn register(&self, guest: &str, stream: &str, write_end: OwnedFd) -> Result<String> {
        let token = crate::ids::random_id()
            .map_err(|e| Error::io("cannot generate a hand-off token", e))?;
        let mut pending = self.pending.lock().expect("hand-off table poisoned");
        let now = Instant::now();
        pending.expire(now);
        if pending.live.len() >= self.max_pending {
            return Err(Error::LimitReached {
                limit: "limits.pending_handoffs",
                value: self.max_pending as u64,
            });
        }
        pending.live.insert(
            token.clone(),
            Pending {
                guest: guest.to_owned(),
                stream: stream.to_owned(),
                write_end,
                expires: now + self.ttl,
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

    /// Takes every pending hand-off (for an upgrade), with the time each has left.
    pub fn take_all(&self) -> Vec<crate::upgrade::HandoffFds> {
        let mut tokens = self.pending.lock().expect("hand-off table poisoned");
        let now = Instant::now();
        tokens.expire(now);
        tokens
            .live
            .drain()
            .map(|(token, p)| crate::upgrade::HandoffFds {
                token,
                guest: p.guest,
                stream: p.stream,
                write_end: p.write_end,
                expires_in: p.expires.saturating_duration_since(now),
            })
            .collect()
    }

    /// Takes over pending hand-offs carried by an upgrade; their tokens stay valid.
    pub fn adopt(&self, carried: Vec<crate::upgrade::HandoffFds>) {
        let mut tokens = self.pending.lock().expect("hand-off table poisoned");
        let now = Instant::now();
        for h in carried {
            tokens.live.insert(
                h.token,
                Pending {
                    guest: h.guest,
                    stream: h.stream,
                    write_end: h.write_end,
                    expires: now + h.expires_in,
                },
            );
        }
    }

    /// Forgets the pending hand-offs of a guest (it was removed).
    pub fn forget_guest(&self, guest: &str) {
        self.pending
            .lock()
            .expect("hand-off table poisoned")
            .live
            .retain(|_, p| p.guest != guest);
    }

    /// Accepts fd.sock clients until the task is dropped; each is served on its own task so
    /// a slow client never delays another.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, read_timeout: Duration) {
        let sweeper = {
            let this = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    this.sweep();
                }
            })
        };
        let _sweeper = AbortOnDrop(sweeper);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "fd.sock accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move { this.serve_one(stream, read_timeout).await });
        }
    }

    async fn serve_one(&self, mut stream: UnixStream, read_timeout: Duration) {
        let outcome = match tokio::time::timeout(read_timeout, read_token(&mut stream)).await {
            Err(_) => Err("timed out waiting for the token line".to_owned()),
            Ok(Err(e)) => Err(e),
            Ok(Ok(token)) => self.claim(&token).map_err(str::to_owned),
        };
        match outcome {
            Ok(pending) => match send_fd(&stream, &pending.write_end).await {
                Ok(()) => {
                    self.metrics.handoffs.inc();
                    tracing::info!(guest = %pending.guest, stream = %pending.stream, "log pipe handed over");
                }
                Err(e) => {
                    self.metrics.handoff_failures.inc();
                    tracing::warn!(guest = %pending.guest, stream = %pending.stream, error = %e, "hand-off send failed");
                }
            },
            Err(reason) => {
                self.metrics.handoff_failures.inc();
                tracing::warn!(reason, "hand-off refused");
                let line = format!("error: {reason}\n");
                let _ = send_bytes(&stream, line.as_bytes()).await;
                // Read what the client still sends (an over-long line) before closing, so the
                // close does not reset the connection and destroy the error text in flight.
                let _ = stream.shutdown().await;
                let mut sink = [0u8; 4096];
                let drain =
                    async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
                let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            }
        }
    }
}

/// Reads one `token\n` line of at most [`MAX_LINE`] bytes.
async fn read_token(stream: &mut UnixStream) -> std::result::Result<String, String> {
    let mut line = Vec::with_capacity(MAX_LINE);
    let mut buf = [0u8; MAX_LINE];
    loop {
        let n = stream
            .read(&mut buf[..MAX_LINE - line.len()])
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            return Err("connection closed before the token line ended".into());
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            let token = String::from_utf8(line).map_err(|_| "token is not UTF-8".to_owned())?;
            return Ok(token.trim_end_matches('\r').to_owned());
        }
        if line.len() >= MAX_LINE {
            return Err(format!("token line longer than {MAX_LINE} bytes"));
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
