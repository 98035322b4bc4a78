//! Request bodies of the Console service, bounded while they arrive.
//!
//! Owns [`InputBounded`], the wrapper of the Console service on both listeners. tonic holds a
//! request message in memory until it is complete, up to `limits.message_size`; a caller that
//! announces a large message and never finishes it would hold that much per call. Here:
//!
//! - a unary request body (`SendConsoleInput`, `WatchConsole`, `ReadHistory`) is refused with
//!   `RESOURCE_EXHAUSTED` as soon as it is over what the call can need: [`MAX_INPUT_BODY`] for
//!   input (at most [`MAX_PENDING_INPUT`] bytes of data), [`MAX_SMALL_BODY`] for the others;
//! - on TCP, a unary request body must arrive within `limits.body_timeout`;
//! - on TCP, each message of an `AttachConsole` stream may announce at most [`MAX_INPUT_BODY`]
//!   bytes (an attach frame, or one piece of input): a larger one ends the call at its header.
//!
//! It never looks into a message's contents beyond the gRPC length prefix.

use crate::console::MAX_PENDING_INPUT;
use crate::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::Status;

/// The path of `SendConsoleInput`.
const SEND_INPUT_PATH: &str = "/conlog.v1.Console/SendConsoleInput";
/// The path of `AttachConsole`.
const ATTACH_PATH: &str = "/conlog.v1.Console/AttachConsole";
/// Most bytes of a `SendConsoleInput` request body or of one `AttachConsole` message: the gRPC
/// frame header, the session id or attach fields and at most [`MAX_PENDING_INPUT`] bytes of
/// data, with room to spare.
pub const MAX_INPUT_BODY: usize = MAX_PENDING_INPUT + 4096;
/// Most bytes of a `WatchConsole` or `ReadHistory` request body: names and numbers only.
pub const MAX_SMALL_BODY: usize = 4096;

/// The largest request body a unary Console call may have, by path.
fn unary_limit(path: &str) -> Option<usize> {
    match path {
        SEND_INPUT_PATH => Some(MAX_INPUT_BODY),
        "/conlog.v1.Console/WatchConsole" | "/conlog.v1.Console/ReadHistory" => {
            Some(MAX_SMALL_BODY)
        }
        _ => None,
    }
}

/// The Console service with its request bodies bounded (see the module doc).
#[derive(Clone)]
pub struct InputBounded<S> {
    inner: S,
    /// On TCP: how long a unary request body may take (and that setting's name), and
    /// whether `AttachConsole` messages are bounded. `None` on the local socket (trusted
    /// callers).
    remote: Option<(Duration, &'static str)>,
}

impl<S> InputBounded<S> {
    /// For the local socket.
    pub fn local(inner: S) -> Self {
        Self {
            inner,
            remote: None,
        }
    }

    /// For TCP, with `limits.body_timeout` (a gateway's own, named `key`).
    pub fn remote(inner: S, body_timeout: Duration, key: &'static str) -> Self {
        Self {
            inner,
            remote: Some((body_timeout, key)),
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for InputBounded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for InputBounded<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path();
        let bound = match (unary_limit(path), self.remote) {
            (Some(limit), timeout) => Bound::Unary {
                limit,
                seen: 0,
                input: path == SEND_INPUT_PATH,
                deadline: timeout.map(|(t, key)| (Box::pin(tokio::time::sleep(t)), key)),
            },
            (None, Some(_)) if path == ATTACH_PATH => Bound::Messages {
                header: [0; 5],
                header_len: 0,
                remaining: 0,
            },
            _ => return self.inner.call(request),
        };
        self.inner
            .call(request.map(|inner| tonic::body::Body::new(BoundedBody { inner, bound })))
    }
}

/// What a [`BoundedBody`] enforces.
enum Bound {
    /// A unary call's body: at most `limit` bytes, complete before `deadline` (if any).
    Unary {
        limit: usize,
        seen: usize,
        /// `SendConsoleInput`'s (the refusal says how to send input).
        input: bool,
        /// With the name of the setting it comes from.
        deadline: Option<(Pin<Box<tokio::time::Sleep>>, &'static str)>,
    },
    /// A stream of gRPC messages, each announcing at most [`MAX_INPUT_BODY`] bytes.
    Messages {
        /// The 5-byte gRPC header being read (flags, big-endian length).
        header: [u8; 5],
        header_len: usize,
        /// Bytes of the current message still to come.
        remaining: usize,
    },
}

/// A request body under a [`Bound`].
struct BoundedBody {
    inner: tonic::body::Body,
    bound: Bound,
}

impl Bound {
    /// Accounts for `data`; the refusal if it breaks the bound.
    fn take(&mut self, data: &[u8]) -> Result<(), Status> {
        match self {
            Bound::Unary {
                limit, seen, input, ..
            } => {
                *seen += data.len();
                if *seen <= *limit {
                    return Ok(());
                }
                let why = if *input {
                    format!(
                        "SendConsoleInput data is over {MAX_PENDING_INPUT} bytes: at most \
                         {MAX_PENDING_INPUT} (64 KiB) of console input may wait for the guest; \
                         send it in pieces, one call after the other"
                    )
                } else {
                    format!("The request is over {limit} bytes")
                };
                Err(Error::Exhausted(why).into())
            }
            Bound::Messages {
                header,
                header_len,
                remaining,
            } => {
                let mut data = data;
                while !data.is_empty() {
                    if *remaining > 0 {
                        let n = (*remaining).min(data.len());
                        *remaining -= n;
                        data = &data[n..];
                        continue;
                    }
                    header[*header_len] = data[0];
                    *header_len += 1;
                    data = &data[1..];
                    if *header_len < header.len() {
                        continue;
                    }
                    *header_len = 0;
                    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                    let len = usize::try_from(len).unwrap_or(usize::MAX);
                    if len > MAX_INPUT_BODY {
                        return Err(Error::Exhausted(format!(
                            "An AttachConsole message of {len} bytes: at most {MAX_INPUT_BODY} \
                             (one attach frame, or 64 KiB of input)"
                        ))
                        .into());
                    }
                    *remaining = len;
                }
                Ok(())
            }
        }
    }

    /// Ready with the refusal once a unary body's time is up.
    fn poll_late(&mut self, cx: &mut Context<'_>) -> Poll<Status> {
        match self {
            Bound::Unary {
                deadline: Some((deadline, key)),
                ..
            } => deadline.as_mut().poll(cx).map(|()| {
                Error::Exhausted(format!("The request did not arrive within {key}")).into()
            }),
            _ => Poll::Pending,
        }
    }
}

impl http_body::Body for BoundedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(refusal) = this.bound.take(data) {
                        return Poll::Ready(Some(Err(refusal)));
                    }
                }
            }
            Poll::Pending => {
                if let Poll::Ready(refusal) = this.bound.poll_late(cx) {
                    return Poll::Ready(Some(Err(refusal)));
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn attach_messages_are_bounded_at_their_header_however_the_bytes_are_cut() {
        let ok = [message(10), message(MAX_INPUT_BODY), message(0)].concat();
        for cut in [1, 2, 3, 5, 7, 4096, ok.len()] {
            let mut bound = Bound::Messages {
                header: [0; 5],
                header_len: 0,
                remaining: 0,
            };
            for piece in ok.chunks(cut) {
                bound.take(piece).expect("messages within the bound");
            }
        }
        let big = message(MAX_INPUT_BODY + 1);
        let mut bound = Bound::Messages {
            header: [0; 5],
            header_len: 0,
            remaining: 0,
        };
        bound.take(&message(3)).unwrap();
        assert!(
            bound.take(&big[..5]).is_err(),
            "refused at its header, before its bytes"
        );
    }

    #[test]
    fn unary_bodies_are_bounded() {
        let mut bound = Bound::Unary {
            limit: 10,
            seen: 0,
            input: false,
            deadline: None,
        };
        bound.take(&[0; 10]).unwrap();
        let refusal = bound.take(&[0]).unwrap_err();
        assert_eq!(refusal.code(), tonic::Code::ResourceExhausted);
        assert!(refusal.message().contains("over 10 bytes"), "{refusal:?}");
    }
}
