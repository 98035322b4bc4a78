//! Accepted connections and what every call learns about its connection.
//!
//! Owns [`Conn`], the wrapper each accepted socket (local, TCP, TLS over TCP) is served
//! through, and [`ConnInfo`], which tonic copies into the extensions of every request on that
//! connection: who the peer is, whether it is remote, and the connection's in-flight call
//! counter used by [`super::limits`]. It never reads or writes the bytes it passes through.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
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
    /// Calls in progress on this connection (see `limits`).
    pub calls: Arc<AtomicU32>,
}

impl ConnInfo {
    fn new(peer: Peer) -> Self {
        Self {
            peer,
            calls: Arc::new(AtomicU32::new(0)),
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
            Peer::Local { pid: Some(pid), .. } => format!("grpc local pid {pid}"),
            Peer::Local { pid: None, .. } => "grpc local".to_owned(),
        }
    }
}

/// An accepted connection with its [`ConnInfo`].
pub struct Conn<IO> {
    io: IO,
    info: ConnInfo,
    /// The connection's place under `limits.tcp_connections`, given back when it closes.
    _slot: Option<OwnedSemaphorePermit>,
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
            _slot: None,
        }
    }

    /// A TCP connection (plain or TLS) from `address`, holding its place `slot`.
    pub fn remote(io: IO, address: SocketAddr, tls: bool, slot: OwnedSemaphorePermit) -> Self {
        Self {
            io,
            info: ConnInfo::new(Peer::Remote { address, tls }),
            _slot: Some(slot),
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
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
