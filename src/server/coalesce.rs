//! Write coalescing for HTTP/2 over TLS on a gateway's client connections (docs/gateway.md,
//! "Forwarding and backpressure").
//!
//! Owns [`Coalesce`], a wrapper beneath HTTP/2 and above TLS. HTTP/2 (the `h2` crate) writes
//! each DATA frame of 256 bytes or more on its own and flushes after each: towards a client
//! that allows 16 KiB frames (tonic's and browsers' default), a 64 KiB history chunk is four
//! writes, eight TLS records (a frame and its 9-byte header do not fit one 16 KiB record) and
//! four `writev` calls, each pushing a TCP segment. When coalescing is on, writes are copied
//! into one buffer of at most [`CAP`] bytes, and a flush right after new bytes is put off
//! once: the connection task is woken at once, and the frames HTTP/2 has ready in the same
//! turn join the buffer; the next flush with nothing new (HTTP/2 flushes whenever it has
//! nothing more to send), or a full buffer, hands everything to TLS in one write. So the
//! bytes wait for one more turn of their own connection's task, never for a timer or for
//! another peer.
//!
//! Bounds: at most [`CAP`] bytes per connection, allocated when bytes come and kept while
//! they keep coming (allocating it for every batch cost page faults), freed at the second
//! flush in a row with nothing to write; a write that finds the buffer full waits for TLS to take it, so a
//! peer that stops reading is held back by TCP exactly as without the wrapper. It never
//! looks at the bytes it holds.

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes held per connection: six 16 KiB frames with their headers.
pub const CAP: usize = 96 << 10;

/// An I/O stream whose writes may be coalesced (see the module doc).
pub struct Coalesce<IO> {
    io: IO,
    on: bool,
    /// Bytes accepted and not yet handed to `io`, from `written` on.
    held: Vec<u8>,
    written: usize,
    /// Whether bytes were accepted since the last flush that was put off.
    fresh: bool,
    /// Flushes in a row that found nothing to write: the buffer is freed at the second (a
    /// streaming connection keeps it from one batch to the next; a quiet one gives it back
    /// by its next HTTP/2 keepalive ping at the latest).
    idle_flushes: u8,
}

impl<IO> Coalesce<IO> {
    /// `io`, its writes coalesced if `on`.
    pub fn new(io: IO, on: bool) -> Self {
        Self {
            io,
            on,
            held: Vec::new(),
            written: 0,
            fresh: false,
            idle_flushes: 0,
        }
    }

    #[cfg(test)]
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Hands every held byte to `io` (the buffer is kept for the next ones).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.held.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.held[self.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.held.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Room for more bytes: waits for `io` to take a full buffer first.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.held.len() >= CAP {
            std::task::ready!(self.poll_drain(cx))?;
        }
        if self.held.capacity() == 0 {
            self.held.reserve_exact(CAP);
        }
        Poll::Ready(Ok(CAP - self.held.len()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if !this.on {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        }
        let room = std::task::ready!(this.poll_room(cx))?;
        let n = room.min(buf.len());
        this.held.extend_from_slice(&buf[..n]);
        this.fresh |= n > 0;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if !this.on {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        let mut room = std::task::ready!(this.poll_room(cx))?;
        let mut n = 0;
        for buf in bufs {
            let take = room.min(buf.len());
            this.held.extend_from_slice(&buf[..take]);
            (n, room) = (n + take, room - take);
            if room == 0 {
                break;
            }
        }
        this.fresh |= n > 0;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        // Coalesced writes are copied anyway: HTTP/2 need not copy a frame to join its header.
        self.on || self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.on {
            if this.fresh && this.held.len() < CAP {
                // Put off once: the task runs again at once and flushes then at the latest.
                this.fresh = false;
                this.idle_flushes = 0;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            if this.held.is_empty() {
                this.idle_flushes = this.idle_flushes.saturating_add(1);
                if this.idle_flushes >= 2 {
                    this.held = Vec::new();
                }
            } else {
                std::task::ready!(this.poll_drain(cx))?;
            }
            this.fresh = false;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        this.held = Vec::new();
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach the stream beneath.
    struct Counting {
        inner: tokio::io::DuplexStream,
        writes: usize,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let outcome = Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(outcome, Poll::Ready(Ok(_))) {
                self.writes += 1;
            }
            outcome
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Writes each frame then flushes, as HTTP/2 does; the writes that reached the stream.
    async fn frames(on: bool, frames: usize, size: usize) -> (usize, Vec<u8>) {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut io = Coalesce::new(
            Counting {
                inner: near,
                writes: 0,
            },
            on,
        );
        let mut sent = Vec::new();
        for i in 0..frames {
            let frame = vec![u8::try_from(i % 251).unwrap(); size];
            io.write_all(&frame).await.unwrap();
            io.flush().await.unwrap();
            sent.extend_from_slice(&frame);
        }
        // A flush with nothing new hands everything over.
        io.flush().await.unwrap();
        let writes = io.get_ref().writes;
        let mut received = vec![0; sent.len()];
        far.read_exact(&mut received).await.unwrap();
        assert_eq!(received, sent, "every byte, in order");
        (writes, received)
    }

    #[tokio::test]
    async fn frames_flushed_one_by_one_reach_the_stream_together_and_whole() {
        let (plain, _) = frames(false, 12, 16 << 10).await;
        assert_eq!(plain, 12);
        let (coalesced, _) = frames(true, 12, 16 << 10).await;
        // 192 KiB through a 96 KiB buffer: two writes.
        assert_eq!(coalesced, 2, "coalesced writes");
    }

    #[tokio::test]
    async fn a_lone_write_is_handed_over_by_the_next_flush_with_nothing_new() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let mut io = Coalesce::new(near, true);
        io.write_all(b"echo").await.unwrap();
        io.flush().await.unwrap();
        let mut byte = [0u8; 4];
        use futures::FutureExt;
        assert!(
            far.read(&mut byte).now_or_never().is_none(),
            "the first flush was put off"
        );
        io.flush().await.unwrap();
        far.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"echo");
    }

    #[tokio::test]
    async fn the_buffer_is_kept_while_bytes_flow_and_freed_when_they_stop() {
        let (near, _far) = tokio::io::duplex(1 << 20);
        let mut io = Coalesce::new(near, true);
        for _ in 0..3 {
            io.write_all(&[7; 1000]).await.unwrap();
            io.flush().await.unwrap(); // put off
            io.flush().await.unwrap(); // written
            assert_eq!(io.held.capacity(), CAP, "kept between batches");
        }
        io.flush().await.unwrap();
        assert_eq!(
            io.held.capacity(),
            CAP,
            "one flush with nothing new keeps it"
        );
        io.flush().await.unwrap();
        assert_eq!(io.held.capacity(), 0, "the second frees it");
    }
}
