//! Accepts HTTP/2 clients on the local UNIX socket that send the socket *path* as `:authority`.
//!
//! Several gRPC clients (grpcurl before 1.8.10, grpc-java, some crictl builds) put the UNIX
//! socket path, e.g. `/run/conlog/conlogd.sock`, into the `:authority` pseudo-header. The `h2`
//! crate under tonic rejects such a request as malformed (`RST_STREAM PROTOCOL_ERROR`, see
//! hyperium/h2#487, unmerged). Rather than patching `h2`, [`AuthorityFix`] sits between the
//! socket and the HTTP/2 server on the client → server direction only: it re-assembles each
//! header block (HEADERS + CONTINUATION), decodes it with HPACK (tracking the client's dynamic
//! table), replaces an `:authority` that is not a valid URI authority with `localhost`, and
//! re-encodes the block with an encoder whose table mirrors the server's decoder. Every other
//! frame passes through untouched, and so does the server → client direction.
//!
//! It never interprets anything but frame boundaries and header blocks, and it is only used on
//! the local socket. If a header block cannot be decoded it stops rewriting and passes the rest
//! of the connection through unchanged, so the HTTP/2 server reports the error as it would have.

use bytes::{Buf, BufMut, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The server's SETTINGS_MAX_FRAME_SIZE (HTTP/2 default; tonic does not change it).
const MAX_FRAME: usize = 16_384;
/// Largest header block re-assembled before giving up (matches h2's default list size order).
const MAX_BLOCK: usize = 1 << 20;

/// A header block waiting for its CONTINUATION frames.
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// A UNIX stream whose incoming header blocks get a valid `:authority`.
pub struct AuthorityFix {
    inner: UnixStream,
    raw: BytesMut,
    ready: BytesMut,
    preface_left: usize,
    pending: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    passthrough: bool,
    eof: bool,
}

impl AuthorityFix {
    pub fn new(inner: UnixStream) -> Self {
        Self {
            inner,
            raw: BytesMut::with_capacity(16 << 10),
            ready: BytesMut::with_capacity(16 << 10),
            preface_left: PREFACE_LEN,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            passthrough: false,
            eof: false,
        }
    }

    /// Moves every complete frame from `raw` to `ready`, rewriting header blocks.
    fn process(&mut self) {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.raw.len());
            self.ready.put(self.raw.split_to(n));
            self.preface_left -= n;
        }
        while self.preface_left == 0 {
            if self.passthrough {
                let all = self.raw.split();
                self.ready.put(all);
                return;
            }
            if self.raw.len() < FRAME_HEADER {
                return;
            }
            let length = (usize::from(self.raw[0]) << 16)
                | (usize::from(self.raw[1]) << 8)
                | usize::from(self.raw[2]);
            if self.raw.len() < FRAME_HEADER + length {
                return;
            }
            let kind = self.raw[3];
            if kind != HEADERS && kind != CONTINUATION {
                let frame = self.raw.split_to(FRAME_HEADER + length);
                self.ready.put(frame);
                continue;
            }
            let mut frame = self.raw.split_to(FRAME_HEADER + length);
            let flags = frame[4];
            let stream_id =
                u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            frame.advance(FRAME_HEADER);
            if !self.header_frame(kind, flags, stream_id, &frame) {
                // Not something we understand: hand it on as it came and stop rewriting.
                self.passthrough = true;
                let mut original = BytesMut::with_capacity(FRAME_HEADER + length);
                put_frame_header(&mut original, length, kind, flags, stream_id);
                original.put(frame);
                self.ready.put(original);
            }
        }
    }

    /// Handles one HEADERS or CONTINUATION payload; false if it cannot be rewritten.
    fn header_frame(&mut self, kind: u8, flags: u8, stream_id: u32, mut payload: &[u8]) -> bool {
        if kind == HEADERS {
            if self.pending.is_some() {
                return false;
            }
            let mut pad = 0;
            if flags & PADDED != 0 {
                let Some((&p, rest)) = payload.split_first() else {
                    return false;
                };
                pad = usize::from(p);
                payload = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                if payload.len() < 5 {
                    return false;
                }
                priority = Some([payload[0], payload[1], payload[2], payload[3], payload[4]]);
                payload = &payload[5..];
            }
            if pad > payload.len() {
                return false;
            }
            self.pending = Some(PendingBlock {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                priority,
                block: payload[..payload.len() - pad].to_vec(),
            });
        } else {
            match &mut self.pending {
                Some(p)
                    if p.stream_id == stream_id && p.block.len() + payload.len() <= MAX_BLOCK =>
                {
                    p.block.extend_from_slice(payload)
                }
                _ => return false,
            }
        }
        if flags & END_HEADERS == 0 {
            return true;
        }
        let pending = self.pending.take().expect("set above");
        let Ok(headers) = self.decoder.decode(&pending.block) else {
            return false;
        };
        let fixed: Vec<(Vec<u8>, Vec<u8>)> = headers
            .into_iter()
            .map(|(name, value)| {
                if name == b":authority"
                    && http::uri::Authority::try_from(value.as_slice()).is_err()
                {
                    (name, b"localhost".to_vec())
                } else {
                    (name, value)
                }
            })
            .collect();
        let block = self
            .encoder
            .encode(fixed.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        self.emit_block(&pending, &block);
        true
    }

    /// Writes `block` as a HEADERS frame and as many CONTINUATION frames as needed.
    fn emit_block(&mut self, pending: &PendingBlock, block: &[u8]) {
        let priority_len = if pending.priority.is_some() { 5 } else { 0 };
        let first_len = block.len().min(MAX_FRAME - priority_len);
        let (first, mut rest) = block.split_at(first_len);
        let mut flags = 0;
        if pending.end_stream {
            flags |= END_STREAM;
        }
        if pending.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        put_frame_header(
            &mut self.ready,
            first.len() + priority_len,
            HEADERS,
            flags,
            pending.stream_id,
        );
        if let Some(priority) = pending.priority {
            self.ready.put_slice(&priority);
        }
        self.ready.put_slice(first);
        while !rest.is_empty() {
            let n = rest.len().min(MAX_FRAME);
            let (chunk, tail) = rest.split_at(n);
            let flags = if tail.is_empty() { END_HEADERS } else { 0 };
            put_frame_header(&mut self.ready, n, CONTINUATION, flags, pending.stream_id);
            self.ready.put_slice(chunk);
            rest = tail;
        }
    }
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "the 24-bit HTTP/2 frame length, split into its three bytes"
)]
fn put_frame_header(out: &mut BytesMut, length: usize, kind: u8, flags: u8, stream_id: u32) {
    out.put_slice(&[
        (length >> 16) as u8,
        (length >> 8) as u8,
        length as u8,
        kind,
        flags,
    ]);
    out.put_u32(stream_id);
}

impl AsyncRead for AuthorityFix {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A truncated frame at end of stream goes on as it is; the server reports it.
                let rest = this.raw.split();
                if rest.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.ready.put(rest);
                continue;
            }
            let mut chunk = [0u8; 16 << 10];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    if read.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.raw.put_slice(read.filled());
                        this.process();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for AuthorityFix {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for AuthorityFix {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers_frame(block: &[u8], flags: u8, stream_id: u32) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame_header(&mut out, block.len(), HEADERS, flags, stream_id);
        out.put_slice(block);
        out.to_vec()
    }

    #[tokio::test]
    async fn rewrites_path_authority_and_keeps_other_frames() {
        let (client, server) = UnixStream::pair().unwrap();
        let mut fixed = AuthorityFix::new(server);
        let mut client_encoder = loona_hpack::Encoder::new();
        let request: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":authority", b"/run/conlog/conlogd.sock"),
            (b":path", b"/conlog.v1.Agent/ListGuests"),
        ];
        let block = client_encoder.encode(request.iter().copied());
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
                                                  // Split the block over HEADERS + CONTINUATION.
        let (a, b) = block.split_at(5);
        wire.extend(headers_frame(a, END_STREAM, 1));
        let mut cont = BytesMut::new();
        put_frame_header(&mut cont, b.len(), CONTINUATION, END_HEADERS, 1);
        cont.put_slice(b);
        wire.extend(&cont[..]);
        // The same request again: now indexed from the client's dynamic table.
        let again = client_encoder.encode(request.iter().copied());
        wire.extend(headers_frame(&again, END_STREAM | END_HEADERS, 3));
        let mut client = client;
        client.write_all(&wire).await.unwrap();
        drop(client);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();

        assert_eq!(&out[..24 + 9], &wire[..24 + 9]);
        let mut decoder = loona_hpack::Decoder::new();
        let mut rest = &out[33..];
        for stream in [1u32, 3] {
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            assert_eq!(rest[3], HEADERS);
            assert_eq!(rest[4], END_STREAM | END_HEADERS);
            assert_eq!(
                u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]),
                stream
            );
            let headers = decoder.decode(&rest[9..9 + len]).unwrap();
            assert_eq!(headers[1], (b":authority".to_vec(), b"localhost".to_vec()));
            assert_eq!(headers[2].1, b"/conlog.v1.Agent/ListGuests".to_vec());
            rest = &rest[9 + len..];
        }
        assert!(rest.is_empty());
    }
}
