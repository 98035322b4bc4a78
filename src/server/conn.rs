//! Accepted connections and what every call learns about its connection.
//!
//! Owns [`Conn`], the wrapper each accepted socket (local, TCP, TLS over TCP) is served
//! through, and [`ConnInfo`], which tonic copies into the extensions of every request on that
//! connection: who the peer is, whether it is remote, and the connection's [`Activity`] (calls
//! in progress, used by [`super::limits`], and since when it has had none). A TCP connection
//! with no call in progress for `limits.idle_timeout` is closed here: one that never sends a
//! request, sends its headers a byte at a time, or keeps an HTTP/2 connection open with no
//! stream gives its place back within that time.
//!
//! Two bounds on what a remote peer makes the daemon buffer live here too. Reads from a TCP
//! connection return at most [`READ_CAP`] bytes, so HTTP/1.1's adaptive read buffer never
//! grows past its initial 8 KiB for a peer streaming a large body. And a connection whose
//! socket cannot take more (the peer stopped reading) is *write-blocked*: response bodies on
//! it produce no further frame until the socket drains ([`Activity::poll_writable`]), so a
//! stalled reader is held back by TCP and HTTP/2 flow control at a fixed cost instead of
//! filling HTTP/2's per-stream send buffers. It never reads or writes the bytes it passes
//! through.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tonic::transport::server::Connected;

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub enum Peer {
    /// A process on this host (local socket), identified by SO_PEERCRED when available.
    Local {
        pid: Option<i32>,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    /// A network client; `tls` says whether the connection is encrypted.
    Remote { address: SocketAddr, tls: bool },
}

/// Per-connection facts, in every request's extensions.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: Peer,
    /// Calls in progress on this connection and since when it has had none.
    pub activity: Arc<Activity>,
}

/// Largest read from a TCP connection: less than hyper's initial HTTP/1.1 read buffer, which
/// therefore never grows (it doubles only after a read that fills it).
pub const READ_CAP: usize = 8191;

/// A connection's calls in progress, the moment it last had none, and whether its socket is
/// write-blocked.
#[derive(Debug)]
pub struct Activity {
    /// Calls in progress (health checks included: a probe's call is activity, though it is
    /// exempt from the call limits).
    pub calls: AtomicU32,
    /// When `calls` last dropped to zero (or the connection was accepted): nanoseconds since
    /// [`epoch`].
    idle_since: AtomicU64,
    /// The last write to the socket would have blocked and none has succeeded since.
    write_blocked: std::sync::atomic::AtomicBool,
    /// Response bodies waiting for the socket to drain. Locked only to push or take wakers.
    writable_waiters: std::sync::Mutex<Vec<std::task::Waker>>,
}

/// The instant all `idle_since` values count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch(now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            calls: AtomicU32::new(0),
            idle_since: AtomicU64::new(since_epoch(Instant::now())),
            write_blocked: std::sync::atomic::AtomicBool::new(false),
            writable_waiters: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Ready when the connection's socket is not write-blocked; otherwise the task is woken
    /// when a write succeeds again.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.write_blocked.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.writable_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cx.waker().clone());
        // A write may have succeeded between the check and the push.
        if self.write_blocked.load(Ordering::Acquire) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Records the outcome of a write to the socket: pending blocks, anything else unblocks.
    fn wrote<T>(&self, outcome: &Poll<T>) {
        if outcome.is_pending() {
            self.write_blocked.store(true, Ordering::Release);
        } else if self.write_blocked.swap(false, Ordering::AcqRel) {
            let waiters = std::mem::take(
                &mut *self
                    .writable_waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            waiters.into_iter().for_each(std::task::Waker::wake);
        }
    }

    /// A call on this connection ended.
    pub fn call_ended(&self) {
        if self.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since
                .store(since_epoch(Instant::now()), Ordering::Release);
        }
    }

    /// When this connection's idle time ends, or `None` while a call is in progress.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.calls.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.idle_since.load(Ordering::Acquire);
        Some(epoch() + Duration::from_nanos(since) + timeout)
    }
}

impl ConnInfo {
    fn new(peer: Peer) -> Self {
        Self {
            peer,
            activity: Arc::new(Activity::new()),
        }
    }

    /// The peer's address, for a network client.
    pub fn remote_ip(&self) -> Option<IpAddr> {
        match &self.peer {
            Peer::Remote { address, .. } => Some(address.ip()),
            Peer::Local { .. } => None,
        }
    }

    /// "grpc 127.0.0.1:5555", "grpc tls 10.0.0.2:443" or "grpc local pid 42", for logs and
    /// the writer-held message.
    pub fn label(&self) -> String {
        match &self.peer {
            Peer::Remote { address, tls: true } => format!("grpc tls {address}"),
            Peer::Remote {
                address,
                tls: false,
            } => format!("grpc {address}"),
            Peer::Local {
                pid: Some(pid),
                uid: Some(uid),
                ..
            } => format!("grpc local pid {pid} uid {uid}"),
            Peer::Local { pid: Some(pid), .. } => format!("grpc local pid {pid}"),
            Peer::Local { pid: None, .. } => "grpc local".to_owned(),
        }
    }
}

/// What a TCP connection holds while it is open: its places under `limits.tcp_connections`
/// and `limits.connections_per_peer`, given back when it closes.
#[allow(
    dead_code,
    reason = "every field is held for its Drop, which gives the place back"
)]
pub struct Places {
    pub total: OwnedSemaphorePermit,
    pub peer: super::tally::Place<IpAddr>,
    /// Its descriptor, out of the share remote callers may hold.
    pub descriptor: OwnedSemaphorePermit,
}

/// An accepted connection with its [`ConnInfo`].
pub struct Conn<IO> {
    io: IO,
    info: ConnInfo,
    _places: Option<Places>,
    /// Closes a TCP connection that has no call in progress for too long.
    idle: Option<IdleTimer>,
}

/// The idle deadline of one connection (see the module doc).
struct IdleTimer {
    timeout: Duration,
    /// The setting's name (a node's `limits.idle_timeout`, a gateway's own).
    key: &'static str,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimer {
    fn new(timeout: Duration, key: &'static str) -> Self {
        Self {
            timeout,
            key,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Ready once the connection has been without a call for the whole timeout; otherwise
    /// the timer is set for the next moment that could be true, and this task woken then.
    fn poll_expired(&mut self, cx: &mut Context<'_>, activity: &Activity) -> Poll<()> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            match activity.idle_deadline(self.timeout) {
                Some(deadline) if deadline <= now => return Poll::Ready(()),
                Some(deadline) => self.sleep.as_mut().reset(deadline),
                // Busy: look again a whole timeout later (the call may end meanwhile).
                None => self.sleep.as_mut().reset(now + self.timeout),
            }
        }
    }
}

impl<IO> Conn<IO> {
    /// A connection on the local socket from a peer with these credentials.
    pub fn local(io: IO, cred: Option<tokio::net::unix::UCred>) -> Self {
        let peer = Peer::Local {
            pid: cred.and_then(|c| c.pid()),
            uid: cred.map(|c| c.uid()),
            gid: cred.map(|c| c.gid()),
        };
        Self {
            io,
            info: ConnInfo::new(peer),
            _places: None,
            idle: None,
        }
    }

    /// A TCP connection (plain or TLS) from `address`, holding its `places`, closed after
    /// `idle_timeout` without a call (the setting named as given, e.g. `limits.idle_timeout`).
    pub fn remote(
        io: IO,
        address: SocketAddr,
        tls: bool,
        places: Places,
        (idle_timeout, idle_key): (Duration, &'static str),
    ) -> Self {
        Self {
            io,
            info: ConnInfo::new(Peer::Remote { address, tls }),
            _places: Some(places),
            idle: Some(IdleTimer::new(idle_timeout, idle_key)),
        }
    }
}

impl<IO> Connected for Conn<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(idle) = &mut this.idle {
            if idle.poll_expired(cx, &this.info.activity).is_ready() {
                let key = idle.key;
                tracing::debug!(peer = %this.info.label(), "closing an idle connection ({key})");
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no call for {key}"),
                )));
            }
        }
        if this.idle.is_none() || buf.remaining() <= READ_CAP {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        // A remote connection: read at most READ_CAP bytes (see the module doc).
        let mut capped = ReadBuf::new(buf.initialize_unfilled_to(READ_CAP));
        let outcome = Pin::new(&mut this.io).poll_read(cx, &mut capped);
        let filled = capped.filled().len();
        buf.advance(filled);
        outcome
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let outcome = Pin::new(&mut self.io).poll_write(cx, buf);
        self.info.activity.wrote(&outcome);
        outcome
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let outcome = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.info.activity.wrote(&outcome);
        outcome
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let outcome = Pin::new(&mut self.io).poll_flush(cx);
        self.info.activity.wrote(&outcome);
        outcome
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
