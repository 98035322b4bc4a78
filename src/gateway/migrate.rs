//! Following a guest that moved to another node (docs/gateway.md, "Following moves").
//!
//! Owns one Console call across nodes. When a node ends a call with the moved status
//! (`FAILED_PRECONDITION` with the trailers `conlog-moved-to`, `conlog-moved-offset`,
//! `conlog-moved-stream`; docs/design.md, "Live migration"), the same call is opened again on
//! the node the trailer names (never the token's node claim: the destination checks the token
//! with the node it imported the guest from), with the same headers and token, and its client
//! sees one stream: every byte once, in order, after a pause.
//!
//! What it must hold and parse to do so, and nothing more:
//! - the call's first request message, to send it again: the whole body of `ReadHistory`,
//!   `WatchConsole` and `SendConsoleInput` (already bounded by [`crate::server::bodies`]: 4 KiB,
//!   4 KiB and [`MAX_INPUT_BODY`]), the `Attach` frame of `AttachConsole`; at most
//!   [`MAX_REQUEST_MESSAGE`] bytes per call. Later `AttachConsole` messages (input) are passed
//!   on whole and not kept: input that reached the old node after the guest left is lost.
//! - of each response message, read just far enough to know the offsets: a `HistoryChunk`'s
//!   offset and data length; a `ServerFrame`'s `Attached` (offset, writer, session id), `Output`
//!   (offset, data length), `Lagged` (to) and `WriterRevoked`. Before a move a large message
//!   is looked at by its first [`HEAD`] bytes and passed on in pieces as it arrives (no copy);
//!   small ones, and every message after a move (where output is dropped or cut), are
//!   collected whole, one at a time (at most [`MAX_RESPONSE_MESSAGE`] bytes; HTTP/2 flow
//!   control holds the rest at the node). Everything else passes as it came, unknown fields
//!   included.
//!
//! The request on the new node starts where the client is: `ReadHistory` gets `from_offset`
//! (and the rest of `limit_bytes`) appended to the encoded request (protobuf's last field wins,
//! oneof included); `WatchConsole` and the `Attach` frame get `replay_bytes` (so output logged
//! on the new node before the re-attach is not missed), and `READ_WRITE` with `force` when the
//! call held the writer lease (so the lease follows), else `READ_ONLY`. `Output` below the client's offset is dropped
//! (or cut at it). The new node's `Attached` frame is passed on: it carries the new
//! `session_id` (`SendConsoleInput` needs it) and whether the lease was kept; clients already
//! take a second `Attached` as a reconnect. When the new node's first byte is above the
//! client's offset (the bytes between are not in its replay), a `Lagged` frame naming the
//! range goes before that `Attached`. A call that has delivered nothing yet is sent again
//! unchanged. `SendConsoleInput` is sent again unchanged; it names only a session, so the
//! session ids of followed calls are registered with their new node while the call lasts
//! ([`sessions`]) and input for them goes there directly.
//!
//! Bounded: at most [`MAX_MOVES`] moves per call; the next moved status reaches the client as
//! the node sent it. A move back to a node the call left at the same offset is a loop: the
//! call ends with `FAILED_PRECONDITION` naming both nodes. It never decides who may call: the
//! nodes check the token.

use super::forward::trailers;
use super::upstream::Upstreams;
use super::GatewayError;
use crate::migration::{moved_of_headers as moved_of, Moved};
#[cfg(test)]
use crate::migration::{MOVED_OFFSET, MOVED_TO};
use crate::proto::{server_frame, Lagged, Output, ServerFrame};
use crate::server::bodies::MAX_INPUT_BODY;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};
use prost::Message;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::Status;
use tower::ServiceExt;
use tracing::Instrument;

/// Most moves one call follows.
pub(crate) const MAX_MOVES: usize = 4;
/// Most bytes of the request message kept to send again (gRPC prefix included).
pub(crate) const MAX_REQUEST_MESSAGE: usize = MAX_INPUT_BODY + 5;
/// Most bytes of one response message held while it is looked at (gRPC prefix included).
pub(crate) const MAX_RESPONSE_MESSAGE: usize = (4 << 20) + 5;
/// Replay asked for on a re-attach: output the new node logged before the re-attach is sent
/// again (and what the client already has is dropped here). The node caps it
/// (`limits.max_replay`, `limits.remote_replay_bytes`); beyond, a `Lagged` says what is missing.
const REPLAY_ON_MOVE: u64 = 1 << 20;

/// How long the first request message may take (a node waits as long for an attach frame;
/// unary bodies are also bounded by `limits.body_timeout`).
const FIRST_MESSAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The calls it follows, by path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    History,
    Watch,
    Attach,
    Input,
}

impl Kind {
    fn of(path: &str) -> Option<Self> {
        match path {
            "/conlog.v1.Console/ReadHistory" => Some(Self::History),
            "/conlog.v1.Console/WatchConsole" => Some(Self::Watch),
            "/conlog.v1.Console/AttachConsole" => Some(Self::Attach),
            "/conlog.v1.Console/SendConsoleInput" => Some(Self::Input),
            _ => None,
        }
    }
}

/// Opens `request` on `node`, following moves for the Console calls that can move.
pub(crate) async fn open(
    request: http::Request<Body>,
    node: String,
    upstreams: Arc<Upstreams>,
) -> Result<http::Response<Body>, GatewayError> {
    let Some(kind) = Kind::of(request.uri().path()) else {
        return send(&upstreams, &node, request).await;
    };
    let (parts, body) = request.into_parts();
    let mut client = Messages::new(body, MAX_REQUEST_MESSAGE);
    let first = async {
        match kind {
            Kind::Attach => client.next().await,
            _ => client.whole().await,
        }
    };
    let first = match tokio::time::timeout(FIRST_MESSAGE_WAIT, first).await {
        Ok(Ok(Some(first))) => first,
        Ok(Ok(None)) => Bytes::new(),
        Ok(Err(status)) => return Ok(status.into_http()),
        Err(_) => {
            return Ok(Status::invalid_argument(format!(
                "The call's first message must come within {}s of the call",
                FIRST_MESSAGE_WAIT.as_secs()
            ))
            .into_http())
        }
    };
    let span = tracing::info_span!("follow", path = parts.uri.path());
    let mut call = Call {
        parts,
        upstreams,
        client_open: kind == Kind::Attach,
        follow: Follow {
            kind,
            node: match kind {
                Kind::Input => input_session(&first)
                    .and_then(|session| sessions::node_of(&session))
                    .unwrap_or(node),
                _ => node,
            },
            first,
            moves: 0,
            left: Vec::new(),
            at: Position::default(),
            session: None,
        },
    };
    let (mut response, mut input) = call.attempt().await?;
    // A new call for a stream that moved is answered at once, in the response's headers.
    while let Some(moved) = moved_of(response.headers()) {
        match call.follow.redirect(moved) {
            Redirect::Follow => (response, input) = call.attempt().await?,
            Redirect::Pass => break,
            Redirect::End(status) => return Ok(status.into_http()),
        }
    }
    let (parts, upstream) = response.into_parts();
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(call.pump(upstream, input, client, tx).instrument(span));
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(http::Response::from_parts(parts, Body::new(body)))
}

/// Sends one request to `node`.
async fn send(
    upstreams: &Upstreams,
    node: &str,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, GatewayError> {
    let channel = upstreams.channel(node)?;
    channel
        .oneshot(request)
        .await
        .map_err(|e| GatewayError::NodeUnavailable {
            node: node.to_owned(),
            reason: super::forward::error_chain(&e),
        })
}

/// Where the client is in the stream.
#[derive(Debug, Default)]
struct Position {
    /// The next offset the client needs (unknown until something with an offset passed).
    next: Option<u64>,
    /// Data bytes delivered (`ReadHistory`'s `limit_bytes`).
    delivered: u64,
    /// The call holds the writer lease (from the last `Attached` or `WriterRevoked`).
    writer: bool,
    /// Since a move: output below this was delivered already.
    floor: Option<u64>,
    /// Since a move: the new node's `Attached` not seen yet.
    reattaching: bool,
}

/// What to do with a moved status.
enum Redirect {
    Follow,
    /// Give it to the client as it is (moves used up, or the request cannot be rewritten).
    Pass,
    /// End the call with this status.
    End(Status),
}

/// One call across nodes: how to open it.
struct Call {
    /// Method, URI and headers (token included) of the client's request, for every node.
    parts: http::request::Parts,
    upstreams: Arc<Upstreams>,
    /// `AttachConsole`: the client has not half-closed.
    client_open: bool,
    follow: Follow,
}

/// One call across nodes: where it is and what it asks each node.
struct Follow {
    kind: Kind,
    /// The first request message, gRPC prefix included (the whole body of unary requests).
    first: Bytes,
    /// The node serving the call now.
    node: String,
    moves: usize,
    /// The nodes the call left, with the offset it left them at (loops).
    left: Vec<(String, u64)>,
    at: Position,
    /// The session id the current node gave the call after a move, while it is registered in
    /// [`sessions`].
    session: Option<String>,
}

impl Drop for Follow {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            sessions::ended(&session);
        }
    }
}

/// Where the sessions of calls that followed a move are: `SendConsoleInput` names only a
/// session id, so the token's node (the old one) cannot say the session moved. A followed
/// `WatchConsole`/`AttachConsole` registers its new session id with its node while its call
/// lasts; `SendConsoleInput` for that id goes there. At most [`MAX_MOVED_SESSIONS`] entries
/// (beyond, input for a further moved session goes to the token's node, which answers
/// `NOT_FOUND`; clients then attach again). Only routing: the node checks the token.
mod sessions {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};

    /// Most sessions registered at once.
    pub(super) const MAX_MOVED_SESSIONS: usize = 65_536;

    /// Session id → node. A std mutex held for one map operation, never across an `.await`.
    static SESSIONS: LazyLock<Mutex<HashMap<String, String>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));

    /// Registers `session` at `node` in place of `previous`; the id registered, if any.
    pub(super) fn moved(session: &str, node: &str, previous: Option<String>) -> Option<String> {
        let mut sessions = SESSIONS.lock().expect("sessions poisoned");
        if let Some(previous) = previous {
            sessions.remove(&previous);
        }
        if session.is_empty() || sessions.len() >= MAX_MOVED_SESSIONS {
            return None;
        }
        sessions.insert(session.to_owned(), node.to_owned());
        Some(session.to_owned())
    }

    pub(super) fn ended(session: &str) {
        SESSIONS.lock().expect("sessions poisoned").remove(session);
    }

    /// The node a moved session is on.
    pub(super) fn node_of(session: &str) -> Option<String> {
        SESSIONS
            .lock()
            .expect("sessions poisoned")
            .get(session)
            .cloned()
    }
}

type Sender = mpsc::Sender<Result<Frame<Bytes>, Status>>;

impl Call {
    /// Opens the call on the current node; for `AttachConsole`, also the sender of the
    /// client's later messages towards it.
    async fn attempt(&self) -> Result<(http::Response<Body>, Option<Sender>), GatewayError> {
        let message = if self.follow.moves == 0 {
            self.follow.first.clone()
        } else {
            self.follow.rewritten()
        };
        let (body, input) = if self.follow.kind == Kind::Attach {
            let (tx, rx) = mpsc::channel(8);
            let _ = tx.try_send(Ok(Frame::data(message)));
            let body =
                http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            (Body::new(body), self.client_open.then_some(tx))
        } else {
            (Body::new(http_body_util::Full::new(message)), None)
        };
        let mut request = http::Request::new(body);
        *request.method_mut() = self.parts.method.clone();
        *request.uri_mut() = self.parts.uri.clone();
        *request.headers_mut() = self.parts.headers.clone();
        let response = send(&self.upstreams, &self.follow.node, request).await?;
        Ok((response, input))
    }
}

impl Follow {
    /// Decides about a moved status; on `Follow` the call's node is the new one.
    fn redirect(&mut self, moved: Moved) -> Redirect {
        if self.moves >= MAX_MOVES || self.first.first() != Some(&0) {
            return Redirect::Pass;
        }
        if self.left.contains(&(moved.to.clone(), moved.offset)) {
            return Redirect::End(Status::failed_precondition(format!(
                "The stream moved in a loop between {} and {} at offset {}; ask the nodes' \
                 operators (each names the other as the guest's new node)",
                self.node, moved.to, moved.offset
            )));
        }
        if self.kind == Kind::History {
            let limit = decode_limit(&self.first);
            if limit > 0 && self.at.delivered >= limit {
                return Redirect::End(Status::ok(""));
            }
        }
        crate::limited!(info, from = %self.node, to = %moved.to, offset = moved.offset, "following a moved stream");
        self.left
            .push((std::mem::take(&mut self.node), moved.offset));
        self.node = moved.to;
        self.moves += 1;
        self.at.floor = self.at.next;
        self.at.reattaching = self.at.next.is_some();
        Redirect::Follow
    }

    /// The first request message for the next node: unchanged if the client has nothing yet.
    fn rewritten(&self) -> Bytes {
        let payload = &self.first[5.min(self.first.len())..];
        let Some(next) = self.at.next else {
            return self.first.clone();
        };
        let mut message = BytesMut::from(payload);
        match self.kind {
            Kind::History => {
                encode_key(3, WireType::Varint, &mut message);
                encode_varint(next, &mut message);
                let limit = decode_limit(&self.first);
                if limit > 0 {
                    encode_key(7, WireType::Varint, &mut message);
                    encode_varint(limit.saturating_sub(self.at.delivered).max(1), &mut message);
                }
            }
            Kind::Watch => reattach_fields(&mut message, self.at.writer),
            Kind::Attach => {
                // A second `attach` member merges into the first (embedded messages merge).
                let mut attach = BytesMut::new();
                reattach_fields(&mut attach, self.at.writer);
                encode_key(1, WireType::LengthDelimited, &mut message);
                encode_varint(attach.len() as u64, &mut message);
                message.put(attach);
            }
            Kind::Input => {}
        }
        grpc_frame(&message)
    }
}

impl Call {
    /// Passes the node's response on, following moves, until the call ends or the client
    /// goes away.
    async fn pump(
        mut self,
        mut upstream: Body,
        mut input: Option<Sender>,
        mut client: Messages,
        tx: Sender,
    ) {
        let mut responses = Responses::default();
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                frame = upstream.frame() => {
                    let frame = match frame {
                        None => return,
                        Some(Err(status)) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        Some(Ok(frame)) => frame,
                    };
                    let frame = match frame.into_data() {
                        Ok(data) if self.follow.kind == Kind::Input => {
                            if tx.send(Ok(Frame::data(data))).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        Ok(data) => {
                            let pieces = match responses.push(data, &mut self.follow) {
                                Ok(pieces) => pieces,
                                Err(status) => {
                                    let _ = tx.send(Ok(trailers(&status))).await;
                                    return;
                                }
                            };
                            for piece in pieces {
                                if tx.send(Ok(Frame::data(piece))).await.is_err() {
                                    return;
                                }
                            }
                            continue;
                        }
                        Err(frame) => frame,
                    };
                    let Some(moved) = frame.trailers_ref().and_then(moved_of) else {
                        let _ = tx.send(Ok(frame)).await;
                        return;
                    };
                    let mut redirect = self.follow.redirect(moved);
                    loop {
                        match redirect {
                            Redirect::Pass => {
                                let _ = tx.send(Ok(frame)).await;
                                return;
                            }
                            Redirect::End(status) => {
                                let _ = tx.send(Ok(trailers(&status))).await;
                                return;
                            }
                            Redirect::Follow => {}
                        }
                        let (response, sender) = match self.attempt().await {
                            Ok(opened) => opened,
                            Err(e) => {
                                let status = crate::error::status(&crate::error::Error::Unavailable(e.to_string()));
                                let _ = tx.send(Ok(trailers(&status))).await;
                                return;
                            }
                        };
                        let (parts, body) = response.into_parts();
                        if !parts.headers.contains_key("grpc-status") {
                            upstream = body;
                            input = sender;
                            responses = Responses::default();
                            break;
                        }
                        // Trailers-only: moved on again, or refused.
                        match moved_of(&parts.headers) {
                            Some(moved) => redirect = self.follow.redirect(moved),
                            None => {
                                let _ = tx.send(Ok(Frame::trailers(status_headers(&parts.headers)))).await;
                                return;
                            }
                        }
                    }
                }
                message = client.next(), if self.client_open => match message {
                    Ok(Some(message)) => {
                        if let Some(input) = &input {
                            // The node reads input apart from output: this wait is its flow
                            // control, never the client's output.
                            let _ = input.send(Ok(Frame::data(message))).await;
                        }
                    }
                    Ok(None) => {
                        self.client_open = false;
                        input = None;
                    }
                    Err(status) => {
                        let _ = tx.send(Ok(trailers(&status))).await;
                        return;
                    }
                },
            }
        }
    }
}

impl Follow {
    /// Learns where a large message is from its first payload bytes, as [`Self::inspect`]
    /// would from all of it, before any move (nothing is dropped or cut then); false when
    /// they do not say (it is then collected whole).
    fn track(&mut self, head: &[u8]) -> bool {
        let located = |fields: &[(u32, u64, &[u8])]| match fields {
            [(1, offset, []), (2, len, _), ..] => Some((*offset, *len)),
            _ => None,
        };
        let at = &mut self.at;
        match self.kind {
            Kind::History => {
                let Some((offset, len)) = located(&head_fields(head)) else {
                    return false;
                };
                let end = offset + len;
                at.next = Some(at.next.map_or(end, |n| n.max(end)));
                at.delivered += len;
                true
            }
            Kind::Watch | Kind::Attach => {
                let top = head_fields(head);
                let Some((2, _, inner)) = top.first().copied() else {
                    return false;
                };
                let Some((offset, len)) = located(&head_fields(inner)) else {
                    return false;
                };
                let end = offset + len;
                at.next = Some(at.next.map_or(end, |n| n.max(end)));
                true
            }
            Kind::Input => false,
        }
    }

    /// One response message (gRPC prefix included) as what the client gets for it.
    fn inspect(&mut self, message: Bytes) -> Vec<Bytes> {
        if message.first() != Some(&0) {
            return vec![message]; // compressed: nothing to learn
        }
        let payload = message.slice(5..);
        let at = &mut self.at;
        match self.kind {
            Kind::History => {
                let (offset, len) = history_chunk(&payload);
                if len > 0 {
                    let end = offset + len;
                    if at.floor.is_some_and(|floor| end <= floor) {
                        return Vec::new();
                    }
                    at.next = Some(at.next.map_or(end, |n| n.max(end)));
                    at.delivered += len;
                }
                vec![message]
            }
            Kind::Watch | Kind::Attach => match server_frame(&payload) {
                Seen::Attached {
                    offset,
                    writer,
                    session,
                } => {
                    at.writer = writer;
                    if self.moves > 0 {
                        self.session = sessions::moved(&session, &self.node, self.session.take());
                    }
                    let mut out = Vec::new();
                    if at.reattaching {
                        at.reattaching = false;
                        if let Some(floor) = at.floor.filter(|floor| offset > *floor) {
                            out.push(encode(&ServerFrame {
                                frame: Some(server_frame::Frame::Lagged(Lagged {
                                    from_offset: floor,
                                    to_offset: offset,
                                })),
                            }));
                        }
                    }
                    at.next = Some(at.next.map_or(offset, |n| n.max(offset)));
                    out.push(message);
                    out
                }
                Seen::Output { offset, len } => {
                    let end = offset + len;
                    let floor = at.floor.unwrap_or(0);
                    at.next = Some(at.next.map_or(end, |n| n.max(end)));
                    if end <= floor {
                        Vec::new()
                    } else if offset < floor {
                        let cut = usize::try_from(floor - offset).unwrap_or(usize::MAX);
                        let data = output_data(&payload).slice(cut..);
                        vec![encode(&ServerFrame {
                            frame: Some(server_frame::Frame::Output(Output {
                                offset: floor,
                                data,
                            })),
                        })]
                    } else {
                        vec![message]
                    }
                }
                Seen::Lagged { to } => {
                    at.next = Some(at.next.map_or(to, |n| n.max(to)));
                    vec![message]
                }
                Seen::Revoked => {
                    at.writer = false;
                    vec![message]
                }
                Seen::Other => vec![message],
            },
            Kind::Input => vec![message],
        }
    }
}

/// `replay_bytes`, `force` and `mode` (`READ_WRITE` with the lease, else `READ_ONLY`), appended to an encoded
/// `WatchConsoleRequest` or `Attach` (the same field numbers).
fn reattach_fields(message: &mut BytesMut, writer: bool) {
    // The lease stays where it was: the writer takes it back (force), every other client
    // re-attaches read-only, so that a client that asked for the lease and was refused it
    // cannot win it at the new node by re-attaching first.
    encode_key(3, WireType::Varint, message);
    encode_varint(if writer { 2 } else { 1 }, message);
    encode_key(4, WireType::Varint, message);
    encode_varint(u64::from(writer), message);
    encode_key(5, WireType::Varint, message);
    encode_varint(REPLAY_ON_MOVE, message);
}

/// A protobuf message in a gRPC frame (uncompressed).
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(message.len() + 5);
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.put_slice(message);
    framed.freeze()
}

fn encode(frame: &ServerFrame) -> Bytes {
    grpc_frame(&frame.encode_to_vec())
}

/// The status of a trailers-only response, as trailers.
fn status_headers(headers: &http::HeaderMap) -> http::HeaderMap {
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            name.starts_with("grpc-") || name.starts_with("conlog-")
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// The fields of an encoded message: (number, varint value or the bytes of a length-delimited
/// field). Stops at the first malformed field.
fn fields(buf: &[u8]) -> Vec<(u32, u64, &[u8])> {
    fields_of(buf, false)
}

/// [`fields`] of the first bytes of a message: a length-delimited field cut short is listed
/// with its full length and the bytes there are, and ends the list.
fn head_fields(buf: &[u8]) -> Vec<(u32, u64, &[u8])> {
    fields_of(buf, true)
}

fn fields_of(mut buf: &[u8], cut_ok: bool) -> Vec<(u32, u64, &[u8])> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Ok((number, wire)) = decode_key(&mut buf) else {
            break;
        };
        match wire {
            WireType::Varint => match decode_varint(&mut buf) {
                Ok(value) => out.push((number, value, &[][..])),
                Err(_) => break,
            },
            WireType::LengthDelimited => {
                let Ok(len) = decode_varint(&mut buf) else {
                    break;
                };
                let Some(len) = usize::try_from(len).ok() else {
                    break;
                };
                if len > buf.len() {
                    if cut_ok {
                        out.push((number, len as u64, buf));
                    }
                    break;
                }
                out.push((number, len as u64, &buf[..len]));
                buf.advance(len);
            }
            WireType::SixtyFourBit if buf.len() >= 8 => buf.advance(8),
            WireType::ThirtyTwoBit if buf.len() >= 4 => buf.advance(4),
            _ => break,
        }
    }
    out
}

/// `ReadHistoryRequest.limit_bytes` (field 7; the last one wins) of a gRPC-framed request.
fn decode_limit(framed: &[u8]) -> u64 {
    fields(framed.get(5..).unwrap_or_default())
        .into_iter()
        .rfind(|(number, _, bytes)| *number == 7 && bytes.is_empty())
        .map_or(0, |(_, value, _)| value)
}

/// `SendConsoleInputRequest.session_id` (field 1) of a gRPC-framed request.
fn input_session(framed: &[u8]) -> Option<String> {
    fields(framed.get(5..)?)
        .into_iter()
        .rfind(|(number, _, _)| *number == 1)
        .map(|(_, _, bytes)| String::from_utf8_lossy(bytes).into_owned())
}

/// A `HistoryChunk`'s offset (1) and data length (2).
fn history_chunk(payload: &[u8]) -> (u64, u64) {
    let (mut offset, mut len) = (0, 0);
    for (number, value, _) in fields(payload) {
        match number {
            1 => offset = value,
            2 => len = value,
            _ => {}
        }
    }
    (offset, len)
}

/// What a `ServerFrame` is, as far as following needs.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Attached {
        offset: u64,
        writer: bool,
        session: String,
    },
    Output {
        offset: u64,
        len: u64,
    },
    Lagged {
        to: u64,
    },
    Revoked,
    Other,
}

fn server_frame(payload: &[u8]) -> Seen {
    let Some((number, _, inner)) = fields(payload).pop() else {
        return Seen::Other;
    };
    let inner = fields(inner);
    let varint = |n: u32| {
        inner
            .iter()
            .rfind(|(number, _, bytes)| *number == n && bytes.is_empty())
            .map_or(0, |(_, value, _)| *value)
    };
    match number {
        1 => Seen::Attached {
            offset: varint(1),
            writer: varint(2) != 0,
            session: inner
                .iter()
                .rfind(|(n, _, _)| *n == 3)
                .map(|(_, _, bytes)| String::from_utf8_lossy(bytes).into_owned())
                .unwrap_or_default(),
        },
        2 => Seen::Output {
            offset: varint(1),
            len: inner
                .iter()
                .rfind(|(n, _, _)| *n == 2)
                .map_or(0, |(_, len, _)| *len),
        },
        3 => Seen::Lagged { to: varint(2) },
        5 => Seen::Revoked,
        _ => Seen::Other,
    }
}

/// An `Output` frame's data.
fn output_data(payload: &Bytes) -> Bytes {
    match ServerFrame::decode(payload.clone()) {
        Ok(ServerFrame {
            frame: Some(server_frame::Frame::Output(output)),
        }) => output.data,
        _ => Bytes::new(),
    }
}

/// Payload bytes of a response message looked at before it is passed on.
const HEAD: usize = 64;
/// Response messages up to this size (payload) are collected whole before they are looked at.
const SMALL: usize = 1024;

/// A node's response messages as they pass. Until the call moved, a large message whose first
/// bytes say where it is (a `HistoryChunk`'s or `Output`'s offset and data length, which
/// encoders write first) is passed on piece by piece as it arrives, never copied; others, and
/// every message after a move (where output may be dropped or cut), are collected whole and
/// looked at by [`Follow::inspect`].
#[derive(Default)]
struct Responses {
    part: Part,
}

enum Part {
    /// A message's prefix and first payload bytes, being collected.
    Head(BytesMut),
    /// The rest of a message being passed on: bytes left.
    Rest(usize),
    /// A whole message being collected, and its length (prefix included).
    Whole(BytesMut, usize),
}

impl Default for Part {
    fn default() -> Self {
        Part::Head(BytesMut::new())
    }
}

impl Responses {
    /// What the client gets for `data`, the next bytes of the response.
    fn push(&mut self, mut data: Bytes, follow: &mut Follow) -> Result<Vec<Bytes>, Status> {
        let mut out = Vec::new();
        loop {
            match &mut self.part {
                Part::Rest(left) => {
                    if data.is_empty() {
                        break;
                    }
                    let n = (*left).min(data.len());
                    out.push(data.split_to(n));
                    *left -= n;
                    if *left == 0 {
                        self.part = Part::default();
                    }
                }
                Part::Whole(buffer, total) => {
                    let n = (*total - buffer.len()).min(data.len());
                    buffer.extend_from_slice(&data.split_to(n));
                    if buffer.len() < *total {
                        break;
                    }
                    let message = std::mem::take(buffer).freeze();
                    self.part = Part::default();
                    out.extend(follow.inspect(message));
                }
                Part::Head(head) => {
                    let n = 5usize.saturating_sub(head.len()).min(data.len());
                    head.extend_from_slice(&data.split_to(n));
                    if head.len() < 5 {
                        break;
                    }
                    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                    if len + 5 > MAX_RESPONSE_MESSAGE {
                        return Err(Status::resource_exhausted(format!(
                            "A message of {len} bytes is over the gateway's limit for a call \
                             it follows across nodes ({} bytes)",
                            MAX_RESPONSE_MESSAGE - 5
                        )));
                    }
                    let want = 5 + len.min(HEAD);
                    let n = (want - head.len()).min(data.len());
                    head.extend_from_slice(&data.split_to(n));
                    if head.len() < want {
                        break;
                    }
                    let head = std::mem::take(head);
                    let passes = len > SMALL
                        && head[0] == 0
                        && follow.at.floor.is_none()
                        && follow.track(&head[5..]);
                    let rest = 5 + len - head.len();
                    self.part = match (passes, rest) {
                        (true, 0) | (false, 0) => {
                            let head = head.freeze();
                            if passes {
                                out.push(head);
                            } else {
                                out.extend(follow.inspect(head));
                            }
                            Part::default()
                        }
                        (true, rest) => {
                            out.push(head.freeze());
                            Part::Rest(rest)
                        }
                        (false, _) => Part::Whole(head, 5 + len),
                    };
                }
            }
        }
        Ok(out)
    }
}

/// gRPC messages out of a body's data frames, each whole (prefix included), at most `max`
/// bytes each.
struct Messages {
    body: Option<Body>,
    buffer: BytesMut,
    max: usize,
}

impl Messages {
    fn new(body: Body, max: usize) -> Self {
        Self {
            body: Some(body),
            buffer: BytesMut::new(),
            max,
        }
    }

    fn push(&mut self, data: Bytes) {
        self.buffer.extend_from_slice(&data);
    }

    /// The next whole message in the buffer.
    fn take(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buffer.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if len + 5 > self.max {
            return Err(Status::resource_exhausted(format!(
                "A message of {len} bytes is over the gateway's limit for a call it follows \
                 across nodes ({} bytes)",
                self.max - 5
            )));
        }
        if self.buffer.len() < len + 5 {
            return Ok(None);
        }
        Ok(Some(self.buffer.split_to(len + 5).freeze()))
    }

    /// The next message of the body (`None` at its end). Cancel-safe: bytes read stay
    /// buffered.
    async fn next(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            if let Some(message) = self.take()? {
                return Ok(Some(message));
            }
            let Some(body) = &mut self.body else {
                return Ok(None);
            };
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.push(data);
                    }
                }
                Some(Err(status)) => return Err(status),
                None => {
                    self.body = None;
                    if !self.buffer.is_empty() {
                        return Err(Status::invalid_argument(
                            "The request ended inside a message",
                        ));
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// The whole body (a unary request: one message).
    async fn whole(&mut self) -> Result<Option<Bytes>, Status> {
        let first = self.next().await?;
        while self.next().await?.is_some() {}
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{read_history_request::Start, Attach, ClientFrame, ReadHistoryRequest};

    fn call(kind: Kind, first: Bytes) -> Follow {
        Follow {
            kind,
            first,
            node: "a:1".into(),
            moves: 1,
            left: Vec::new(),
            at: Position::default(),
            session: None,
        }
    }

    #[test]
    fn history_requests_are_rewritten_to_the_next_offset_and_the_rest_of_the_limit() {
        let request = ReadHistoryRequest {
            guest: "g".into(),
            start: Some(Start::TailLines(10)),
            follow: true,
            limit_bytes: 100,
            ..Default::default()
        };
        let mut call = call(Kind::History, grpc_frame(&request.encode_to_vec()));
        assert_eq!(call.rewritten(), call.first, "nothing delivered: unchanged");
        call.at.next = Some(1234);
        call.at.delivered = 40;
        let again = ReadHistoryRequest::decode(&call.rewritten()[5..]).unwrap();
        assert_eq!(again.start, Some(Start::FromOffset(1234)));
        assert_eq!(again.limit_bytes, 60);
        assert!(again.follow);
        assert_eq!(again.guest, "g");
    }

    #[test]
    fn attach_frames_keep_the_lease_and_ask_for_a_replay() {
        let frame = ClientFrame {
            frame: Some(crate::proto::client_frame::Frame::Attach(Attach {
                guest: "g".into(),
                device: "serial0".into(),
                mode: 2,
                force: true,
                replay_bytes: 0,
            })),
        };
        let mut call = call(Kind::Attach, grpc_frame(&frame.encode_to_vec()));
        call.at.next = Some(7);
        call.at.writer = true;
        let again = ClientFrame::decode(&call.rewritten()[5..]).unwrap();
        let Some(crate::proto::client_frame::Frame::Attach(attach)) = again.frame else {
            panic!("not an attach: {again:?}");
        };
        assert_eq!(
            (attach.guest.as_str(), attach.device.as_str()),
            ("g", "serial0")
        );
        assert_eq!((attach.mode, attach.force), (2, true));
        assert_eq!(attach.replay_bytes, REPLAY_ON_MOVE);
        call.at.writer = false;
        let again = ClientFrame::decode(&call.rewritten()[5..]).unwrap();
        let Some(crate::proto::client_frame::Frame::Attach(attach)) = again.frame else {
            panic!("not an attach: {again:?}");
        };
        assert_eq!(
            (attach.mode, attach.force),
            (1, false),
            "a watcher never forces"
        );
    }

    fn output(offset: u64, data: &[u8]) -> Bytes {
        encode(&ServerFrame {
            frame: Some(server_frame::Frame::Output(Output {
                offset,
                data: Bytes::copy_from_slice(data),
            })),
        })
    }

    fn attached(offset: u64, writer: bool) -> Bytes {
        encode(&ServerFrame {
            frame: Some(server_frame::Frame::Attached(crate::proto::Attached {
                offset,
                writer,
                session_id: "s".into(),
                guest_connected: true,
                serial_break: false,
            })),
        })
    }

    #[test]
    fn output_below_the_clients_offset_is_dropped_or_cut_after_a_move() {
        let mut call = call(Kind::Watch, grpc_frame(b""));
        call.moves = 0;
        assert_eq!(call.inspect(attached(0, true)).len(), 1);
        assert_eq!(call.inspect(output(0, b"0123456789")).len(), 1);
        assert_eq!(call.at.next, Some(10));
        assert!(call.at.writer);
        assert!(matches!(
            call.redirect(Moved {
                to: "b:2".into(),
                offset: 10
            }),
            Redirect::Follow
        ));
        // The replay comes again from 4: the Attached passes, 4..10 is dropped, 8..14 is cut.
        assert_eq!(call.inspect(attached(4, true)), vec![attached(4, true)]);
        assert!(call.inspect(output(4, b"456789")).is_empty());
        assert_eq!(
            call.inspect(output(8, b"89abcd")),
            vec![output(10, b"abcd")]
        );
        assert_eq!(call.inspect(output(14, b"e")), vec![output(14, b"e")]);
        assert_eq!(call.at.next, Some(15));
    }

    #[test]
    fn a_new_node_starting_above_the_clients_offset_is_reported_as_lagged() {
        let mut call = call(Kind::Attach, grpc_frame(b""));
        call.moves = 0;
        call.inspect(output(0, b"0123"));
        assert!(matches!(
            call.redirect(Moved {
                to: "b:2".into(),
                offset: 4
            }),
            Redirect::Follow
        ));
        let lagged = encode(&ServerFrame {
            frame: Some(server_frame::Frame::Lagged(Lagged {
                from_offset: 4,
                to_offset: 9,
            })),
        });
        assert_eq!(
            call.inspect(attached(9, false)),
            vec![lagged, attached(9, false)]
        );
    }

    #[test]
    fn sessions_of_followed_calls_route_their_input_while_the_call_lasts() {
        let mut call = call(Kind::Watch, grpc_frame(b""));
        call.moves = 0;
        let attached = |session: &str| {
            encode(&ServerFrame {
                frame: Some(server_frame::Frame::Attached(crate::proto::Attached {
                    offset: 0,
                    writer: true,
                    session_id: session.into(),
                    ..Default::default()
                })),
            })
        };
        call.inspect(attached("at-a-1"));
        assert_eq!(
            sessions::node_of("at-a-1"),
            None,
            "not moved: the token's node"
        );
        call.inspect(output(0, b"x"));
        assert!(matches!(
            call.redirect(Moved {
                to: "b:2".into(),
                offset: 1
            }),
            Redirect::Follow
        ));
        call.inspect(attached("at-b-1"));
        assert_eq!(sessions::node_of("at-b-1").as_deref(), Some("b:2"));
        let request = crate::proto::SendConsoleInputRequest {
            session_id: "at-b-1".into(),
            ..Default::default()
        };
        assert_eq!(
            input_session(&grpc_frame(&request.encode_to_vec())).as_deref(),
            Some("at-b-1")
        );
        drop(call);
        assert_eq!(sessions::node_of("at-b-1"), None, "gone with its call");
    }

    /// `stream` fed in pieces of `sizes` (cycled) through [`Responses`]: the bytes out.
    fn through(call: &mut Follow, stream: &[u8], sizes: &[usize]) -> Vec<u8> {
        through_counted(call, stream, sizes).0
    }

    /// [`through`], and how many pieces came out.
    fn through_counted(call: &mut Follow, stream: &[u8], sizes: &[usize]) -> (Vec<u8>, usize) {
        let mut responses = Responses::default();
        let mut out = Vec::new();
        let mut pieces = 0;
        let mut at = 0;
        for size in sizes.iter().cycle() {
            if at >= stream.len() {
                break;
            }
            let end = (at + size).min(stream.len());
            for piece in responses
                .push(Bytes::copy_from_slice(&stream[at..end]), call)
                .unwrap()
            {
                pieces += 1;
                out.extend_from_slice(&piece);
            }
            at = end;
        }
        (out, pieces)
    }

    #[test]
    fn large_messages_pass_in_pieces_and_are_tracked_as_whole_ones_would_be() {
        let big = vec![b'x'; 5000];
        let chunk = |offset: u64, data: &[u8]| {
            grpc_frame(
                &crate::proto::HistoryChunk {
                    offset,
                    data: Bytes::copy_from_slice(data),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        };
        // Offset 0 has no offset field (proto3): collected whole; the others pass in pieces.
        let history: Vec<u8> = [
            chunk(0, &big),
            chunk(5000, b"small"),
            chunk(5005, &big),
            chunk(10005, &big),
        ]
        .concat();
        for sizes in [&[1usize][..], &[7, 3000, 11], &[16384], &[5, 64, 2]] {
            let mut call = call(Kind::History, grpc_frame(b""));
            call.moves = 0;
            assert_eq!(through(&mut call, &history, sizes), history, "{sizes:?}");
            assert_eq!((call.at.next, call.at.delivered), (Some(15005), 15005));
        }
        // Byte by byte, the large messages with an offset field pass as they come.
        let mut follow = call(Kind::History, grpc_frame(b""));
        follow.moves = 0;
        let (_, pieces) = through_counted(&mut follow, &history, &[1]);
        assert!(
            pieces > 9000,
            "{pieces} pieces: large messages were collected"
        );
        let frames: Vec<u8> = [
            attached(0, true),
            output(0, &big),
            output(5000, b"abc"),
            output(5003, &big),
        ]
        .concat();
        for sizes in [&[1usize][..], &[9, 4096], &[100_000]] {
            let mut call = call(Kind::Attach, grpc_frame(b""));
            call.moves = 0;
            assert_eq!(through(&mut call, &frames, sizes), frames, "{sizes:?}");
            assert_eq!(call.at.next, Some(10003));
            assert!(call.at.writer);
            // After a move, what the client has is dropped, even from large messages.
            assert!(matches!(
                call.redirect(Moved {
                    to: "b:2".into(),
                    offset: 10003
                }),
                Redirect::Follow
            ));
            let again = [attached(0, true), output(0, &big), output(10003, b"new")].concat();
            let shown = through(&mut call, &again, sizes);
            assert_eq!(shown, [attached(0, true), output(10003, b"new")].concat());
        }
    }

    #[test]
    fn moves_are_bounded_and_loops_end_the_call() {
        let mut call = call(Kind::Watch, grpc_frame(b""));
        call.moves = 0;
        call.node = "a:1".into();
        let moved = |to: &str, offset| Moved {
            to: to.into(),
            offset,
        };
        assert!(matches!(call.redirect(moved("b:2", 5)), Redirect::Follow));
        match call.redirect(moved("a:1", 5)) {
            Redirect::End(status) => {
                assert_eq!(status.code(), tonic::Code::FailedPrecondition);
                assert!(status.message().contains("b:2") && status.message().contains("a:1"));
            }
            _ => panic!("a loop must end the call"),
        }
        for n in 2..=MAX_MOVES {
            assert!(matches!(
                call.redirect(moved(&format!("n{n}:1"), 10 + n as u64)),
                Redirect::Follow
            ));
        }
        assert!(matches!(call.redirect(moved("z:1", 99)), Redirect::Pass));
    }

    #[test]
    fn moved_statuses_are_read_from_trailers() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", "9".parse().unwrap());
        assert_eq!(moved_of(&headers), None);
        headers.insert(MOVED_TO, "node-b:7770".parse().unwrap());
        headers.insert(MOVED_OFFSET, "42".parse().unwrap());
        assert_eq!(
            moved_of(&headers),
            Some(Moved {
                to: "node-b:7770".into(),
                offset: 42
            })
        );
        headers.insert(MOVED_TO, "evil/path?x".parse().unwrap());
        assert_eq!(moved_of(&headers), None, "only host:port");
        headers.insert(MOVED_TO, "b:1".parse().unwrap());
        headers.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(moved_of(&headers), None, "only FAILED_PRECONDITION");
    }
}
