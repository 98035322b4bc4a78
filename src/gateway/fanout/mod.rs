//! Fan-out at the edge: read-only watchers of one console through this replica share one
//! upstream stream (docs/gateway.md, "Fan-out").
//!
//! Owns the table of shared streams, keyed by (node, guest, device), and everything a watcher
//! of one gets. A call is fanned out when it is `WatchConsole`, or `AttachConsole` whose first
//! `ClientFrame` is an attach, with mode `READ_ONLY` (or unspecified) and no `force`; every
//! other call, and a request this module cannot read (compressed, malformed, too slow), goes
//! back to [`super::forward`] with its body intact and is forwarded as it came.
//!
//! One task owns each shared stream ([`shared`]): the upstream `WatchConsole` (read-only,
//! opened with a token the gateway signs itself for that guest and device with the node's key
//! derived from the cluster key, valid 60 s: a node checks expiry when a call starts, so the
//! stream outlives it exactly as a watcher's does; its key's rotation ends it, as it ends every
//! watcher), a ring of the last `gateway.fanout.replay_bytes` of output, and one queue per
//! watcher: [`crate::console::clients`], the node's own queues, so a watcher that does not read
//! is skipped ahead and told the exact gap (`lagged`) exactly as on a node, and never delays
//! the shared stream or another watcher. The upstream asks the node for a ring's worth of
//! replay, and learns where the node's log ended (a `ReadHistory` of its last byte) so that
//! watchers are admitted only once that replay is in the ring: every watcher, the first or a
//! late one, gets its `attached` (the offset of its first byte), the last `replay_bytes` before
//! the end (at most `gateway.fanout.replay_bytes`; `attached.offset` says where they start,
//! older bytes are in `ReadHistory`), then the live output, the guest's connection state and
//! gaps as the node sends them. The stream ends for every watcher with the node's status
//! (removed: `NOT_FOUND`; shutdown, upgrade, a node lost: `UNAVAILABLE` naming it; resume by
//! offset), after each watcher has taken what was queued for it. The upstream closes
//! `gateway.fanout.linger` after its last watcher left. When the guest moves, the node's moved
//! status (parsed by [`super::migrate`]) is followed instead: the stream reopens at the node
//! it names (with a token signed for that node), at most [`super::migrate::MAX_MOVES`] times,
//! and its watchers stay attached (docs/gateway.md, "Fan-out", "A move").
//!
//! Each watcher's own token is verified when its call starts ([`super::forward`]), and here for
//! the guest and device it asks for; when the cluster key changes, a watcher whose token no
//! longer verifies ends with `UNAUTHENTICATED` (an expired token does not end an open watch,
//! as on a node), and so does the shared stream whose own token no longer verifies. The
//! per-identity call limits count a watcher like any call (the layers in front of
//! [`super::forward`]). It never forwards a byte of a watcher's input upstream: a read-only
//! watcher's input is read, paced like a node's and dropped, as a node drops it.

mod shared;

use self::shared::{Join, Joined, Shared};
use super::config::FanoutConfig;
use super::forward::{trailers, Recheck};
use super::upstream::Upstreams;
use super::GatewayError;
use crate::console::clients::{ClientReceiver, Event};
use crate::console::pacing::InputPacer;
use crate::error::Error;
use crate::names::{self, GuestName, StreamName};
use crate::proto::{self, attach, client_frame, ServerFrame};
use crate::server::auth::{self, Caller, Need};
use crate::tokens::{ClusterKey, Grant};
use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use prost::Message;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tonic::body::Body;
use tonic::Status;
use tracing::Instrument;

const WATCH_PATH: &str = "/conlog.v1.Console/WatchConsole";
const ATTACH_PATH: &str = "/conlog.v1.Console/AttachConsole";
/// How long an `AttachConsole` call may take to send its first frame before it is forwarded
/// as it is (the node then applies its own wait).
const FIRST_FRAME_WAIT: Duration = Duration::from_secs(10);
/// Most bytes read of a request to find its first message (an attach frame is far smaller;
/// the body bounds of `server::bodies` end larger ones before).
const FIRST_FRAME_MAX: usize = crate::server::bodies::MAX_INPUT_BODY + 5;
/// How long a watcher waits for its shared stream to answer (open included).
const JOIN_WAIT: Duration = Duration::from_secs(20);
/// How long opening the upstream may take (after the connect timeout of the channel).
const OPEN_WAIT: Duration = Duration::from_secs(15);
/// Validity of the gateway's own upstream token (checked by the node when the call starts).
const OWN_TOKEN_TTL: u64 = 60;
/// Joins waiting for a shared stream's task.
const JOIN_QUEUE: usize = 64;
/// Attempts to join when the stream found is retiring at that moment.
const JOIN_ATTEMPTS: usize = 3;

/// What a shared stream is of.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StreamKey {
    node: String,
    guest: String,
    device: String,
}

/// A shared stream as the table knows it.
struct Entry {
    /// Tells an entry from a later one of the same key.
    id: u64,
    joins: mpsc::Sender<Join>,
    leaves: mpsc::UnboundedSender<u64>,
    /// Watchers counted in (incremented before a join is sent, decremented when its call
    /// ends), so a stream retires only when no join is on its way.
    watchers: u32,
}

/// The fan-out of one gateway replica.
pub(crate) struct Fanout {
    config: FanoutConfig,
    keys: Arc<ClusterKey>,
    upstreams: Arc<Upstreams>,
    /// The shared streams. A std mutex held to look up, count or remove an entry, never
    /// across an `.await`.
    streams: Mutex<HashMap<StreamKey, Entry>>,
    next_id: AtomicU64,
    /// Bytes per second a read-only watcher's input is read at (a node's
    /// `limits.input_rate` default), before it is dropped.
    input_rate: u64,
}

/// What [`Fanout::route`] did with a call.
pub(crate) enum Routed {
    /// Served from a shared stream (or refused).
    Served(http::Response<Body>),
    /// Not a read-only watch: forward it (its body as it arrived).
    Forward(http::Request<Body>),
}

/// The attach fields of a read-only watch.
struct Fields {
    guest: String,
    device: String,
    replay_bytes: u64,
    /// `WatchConsole` (its `attached` carries the session id) or `AttachConsole`.
    watch: bool,
}

impl Fanout {
    pub(crate) fn new(
        config: &FanoutConfig,
        keys: Arc<ClusterKey>,
        upstreams: Arc<Upstreams>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config: config.clone(),
            keys,
            upstreams,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            input_rate: crate::config::Limits::default().input_rate.bytes(),
        })
    }

    /// Serves `request` (of a verified `grant` and its `token`, for `node`) from a shared
    /// stream if it is a read-only watch; otherwise hands it back to be forwarded.
    pub(crate) async fn route(
        self: &Arc<Self>,
        request: http::Request<Body>,
        grant: &Grant,
        token: String,
        node: &str,
    ) -> Routed {
        let watch = match request.uri().path() {
            WATCH_PATH => true,
            ATTACH_PATH => false,
            _ => return Routed::Forward(request),
        };
        if !self.config.enabled || compressed(&request) {
            return Routed::Forward(request);
        }
        let (parts, body) = request.into_parts();
        let (read, rest) = match first_message(body, watch).await {
            Ok(found) => found,
            Err(status) => return Routed::Served(status.into_http()),
        };
        let Some(fields) = read_only_watch(&read, watch) else {
            let body = Body::new(Prefixed {
                prefix: Some(read),
                rest,
            });
            return Routed::Forward(http::Request::from_parts(parts, body));
        };
        match self.watch(grant, token, node, fields, rest).await {
            Ok(response) => Routed::Served(response),
            Err(refusal) => {
                crate::limited!(info, code = ?refusal.code(), message = refusal.message(), "watch refused at the gateway");
                Routed::Served(refusal.into_http())
            }
        }
    }

    async fn watch(
        self: &Arc<Self>,
        grant: &Grant,
        token: String,
        node: &str,
        fields: Fields,
        rest: Body,
    ) -> Result<http::Response<Body>, Status> {
        let guest = GuestName::parse(fields.guest)?;
        let device = StreamName::or_default(fields.device, names::DEFAULT_CONSOLE_DEVICE)?;
        auth::authorize(
            Some(&Caller::Remote(grant.clone())),
            &guest,
            &device,
            Need::Read,
        )?;
        let key = StreamKey {
            node: node.to_owned(),
            guest: guest.as_str().to_owned(),
            device: device.as_str().to_owned(),
        };
        for _ in 0..JOIN_ATTEMPTS {
            let (joins, leave) = self.enter(&key)?;
            let (reply, replied) = oneshot::channel();
            let join = Join {
                watcher: leave.watcher,
                replay_bytes: fields.replay_bytes,
                reply,
            };
            if joins.send(join).await.is_err() {
                continue;
            }
            match tokio::time::timeout(JOIN_WAIT, replied).await {
                Ok(Ok(Ok(joined))) => {
                    return Ok(self.respond(joined, leave, fields.watch, token, rest))
                }
                Ok(Ok(Err(status))) => return Err(status),
                // The stream retired or was revoked as this watcher joined: a new one.
                Ok(Err(_)) => continue,
                Err(_) => {
                    return Err(Error::Unavailable(
                        GatewayError::NodeUnavailable {
                            node: node.to_owned(),
                            reason: format!(
                                "its console stream did not open within {}s",
                                JOIN_WAIT.as_secs()
                            ),
                        }
                        .to_string(),
                    )
                    .into())
                }
            }
        }
        Err(Error::Unavailable(format!(
            "The shared stream of console {}/{} on node {node} ended while this call joined it; \
             call again",
            key.guest, key.device
        ))
        .into())
    }

    /// Counts a watcher in on the stream of `key`, starting one if there is none.
    fn enter(self: &Arc<Self>, key: &StreamKey) -> Result<(mpsc::Sender<Join>, Leave), Error> {
        let watcher = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut streams = self.streams.lock().expect("fan-out table poisoned");
        if let Some(entry) = streams.get_mut(key) {
            if entry.watchers >= self.config.watchers_per_stream {
                return Err(Error::LimitReached {
                    limit: "gateway.fanout.watchers_per_stream",
                    value: u64::from(self.config.watchers_per_stream),
                });
            }
            entry.watchers += 1;
            let leave = Leave {
                fanout: self.clone(),
                key: key.clone(),
                stream: entry.id,
                watcher,
                leaves: entry.leaves.clone(),
            };
            return Ok((entry.joins.clone(), leave));
        }
        if streams.len() >= self.config.streams as usize {
            return Err(Error::LimitReached {
                limit: "gateway.fanout.streams",
                value: u64::from(self.config.streams),
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (joins, joins_rx) = mpsc::channel(JOIN_QUEUE);
        let (leaves, leaves_rx) = mpsc::unbounded_channel();
        streams.insert(
            key.clone(),
            Entry {
                id,
                joins: joins.clone(),
                leaves: leaves.clone(),
                watchers: 1,
            },
        );
        let span = tracing::info_span!("fanout", node = %key.node, guest = %key.guest, device = %key.device);
        let shared = Shared::new(self.clone(), key.clone(), id);
        tokio::spawn(shared.run(joins_rx, leaves_rx).instrument(span));
        Ok((
            joins,
            Leave {
                fanout: self.clone(),
                key: key.clone(),
                stream: id,
                watcher,
                leaves,
            },
        ))
    }

    /// The response of a watcher that joined.
    fn respond(
        &self,
        joined: Joined,
        leave: Leave,
        watch: bool,
        token: String,
        rest: Body,
    ) -> http::Response<Body> {
        let (input, input_failed) = if watch {
            (None, None)
        } else {
            // A read-only attach's input is read (paced) and dropped, as a node does; a limit
            // it breaks ends the call with it. It stops with the response.
            let (stop, stopped) = oneshot::channel();
            let (fail, failed) = oneshot::channel();
            tokio::spawn(drain(rest, self.input_rate, stopped, fail));
            (Some(stop), Some(failed))
        };
        let body = WatcherBody {
            receiver: joined.receiver,
            session: watch.then_some(joined.session),
            ended: joined.ended,
            recheck: Recheck::new(self.keys.clone(), token),
            input_failed,
            _input: input,
            _leave: leave,
            done: false,
        };
        let mut response = http::Response::new(Body::new(body));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    }
}

/// Whether the request's messages may be compressed (then they are forwarded undecoded).
fn compressed(request: &http::Request<Body>) -> bool {
    request
        .headers()
        .get("grpc-encoding")
        .is_some_and(|v| v.as_bytes() != b"identity")
}

/// Reads `body` until its first gRPC message is complete (or it ended, broke, grew past
/// [`FIRST_FRAME_MAX`] or, for `AttachConsole`, took [`FIRST_FRAME_WAIT`]); the bytes read and
/// the rest of the body. A broken body (a bound of `server::bodies`) is its status.
async fn first_message(mut body: Body, watch: bool) -> Result<(Bytes, Body), Status> {
    let mut read = BytesMut::new();
    let reading = async {
        while !complete(&read) && read.len() < FIRST_FRAME_MAX {
            match body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => read.extend_from_slice(&data),
                    // Trailers before a message: nothing to read here.
                    Err(_) => break,
                },
                Some(Err(status)) => return Err(status),
                None => break,
            }
        }
        Ok(())
    };
    if watch {
        // A unary body is bounded in time by `server::bodies`.
        reading.await?;
    } else if let Ok(result) = tokio::time::timeout(FIRST_FRAME_WAIT, reading).await {
        result?;
    }
    Ok((read.freeze(), body))
}

/// Whether `read` holds a whole gRPC message.
fn complete(read: &[u8]) -> bool {
    read.len() >= 5
        && read.len() - 5 >= u32::from_be_bytes([read[1], read[2], read[3], read[4]]) as usize
}

/// The watch `read` asks for, if it is a whole uncompressed message of a read-only watch.
fn read_only_watch(read: &Bytes, watch: bool) -> Option<Fields> {
    if !complete(read) || read[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([read[1], read[2], read[3], read[4]]) as usize;
    let message = read.slice(5..5 + len);
    let (guest, device, mode, force, replay_bytes) = if watch {
        let r = proto::WatchConsoleRequest::decode(message).ok()?;
        (r.guest, r.device, r.mode, r.force, r.replay_bytes)
    } else {
        let frame = proto::ClientFrame::decode(message).ok()?;
        let Some(client_frame::Frame::Attach(a)) = frame.frame else {
            return None;
        };
        (a.guest, a.device, a.mode, a.force, a.replay_bytes)
    };
    let read_only = matches!(
        attach::Mode::try_from(mode),
        Ok(attach::Mode::ReadOnly | attach::Mode::Unspecified)
    );
    (read_only && !force).then_some(Fields {
        guest,
        device,
        replay_bytes,
        watch,
    })
}

/// A request body of which `prefix` was read already.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Body,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(prefix) = self.prefix.take().filter(|p| !p.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.as_ref().is_none_or(Bytes::is_empty) && self.rest.is_end_stream()
    }
}

/// Reads a read-only attach's input until the call ends, at `rate` bytes per second, and
/// drops it; a bound the input broke (`RESOURCE_EXHAUSTED` from `server::bodies`) goes to
/// `fail`.
async fn drain(
    mut rest: Body,
    rate: u64,
    mut stopped: oneshot::Receiver<()>,
    fail: oneshot::Sender<Status>,
) {
    let mut pacer = InputPacer::new(rate);
    loop {
        let frame = tokio::select! {
            frame = rest.frame() => frame,
            _ = &mut stopped => return,
        };
        match frame {
            Some(Ok(frame)) => {
                let bytes = frame.data_ref().map_or(0, Bytes::len);
                tokio::select! {
                    () = pacer.pace(bytes) => {}
                    _ = &mut stopped => return,
                }
            }
            Some(Err(status)) => {
                if status.code() == tonic::Code::ResourceExhausted {
                    let _ = fail.send(status);
                }
                return;
            }
            None => return,
        }
    }
}

/// Counts a watcher out of its stream when its call ends.
struct Leave {
    fanout: Arc<Fanout>,
    key: StreamKey,
    stream: u64,
    watcher: u64,
    leaves: mpsc::UnboundedSender<u64>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        let mut streams = self.fanout.streams.lock().expect("fan-out table poisoned");
        if let Some(entry) = streams.get_mut(&self.key) {
            if entry.id == self.stream {
                entry.watchers = entry.watchers.saturating_sub(1);
            }
        }
        drop(streams);
        let _ = self.leaves.send(self.watcher);
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One watcher's response: its queue's events as gRPC messages, ended by the shared stream's
/// status, by its token's revocation, or by a bound its input broke.
struct WatcherBody {
    receiver: ClientReceiver,
    /// The shared stream's session id, for `WatchConsole` (it changes when the guest moves).
    session: Option<Arc<Mutex<String>>>,
    ended: Arc<OnceLock<Status>>,
    /// Its token, checked again when the cluster key changes (as for a forwarded call).
    recheck: Recheck,
    input_failed: Option<oneshot::Receiver<Status>>,
    /// Dropped with the response: stops the input reader.
    _input: Option<oneshot::Sender<()>>,
    /// Dropped with the response: counts the watcher out.
    _leave: Leave,
    done: bool,
}

impl WatcherBody {
    fn end(&mut self, status: &Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        Poll::Ready(Some(Ok(trailers(status))))
    }
}

/// `event` as a gRPC message (length-prefixed, uncompressed `ServerFrame`).
fn message(event: Event, session_id: &str) -> Option<Bytes> {
    // A read-only watcher is never revoked; the end of the console ends the call.
    let frame = crate::server::console::frame_of(event, session_id).ok()?;
    let frame = ServerFrame { frame: Some(frame) };
    let len = frame.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).ok()?);
    frame.encode(&mut buf).ok()?;
    Some(buf.freeze())
}

impl HttpBody for WatcherBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        use futures::Stream;
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(revoked) = self.recheck.poll_revoked(cx) {
            crate::limited!(info, "watcher ended: its token no longer verifies");
            return self.end(&crate::error::status(&revoked));
        }
        if let Some(failed) = self.input_failed.as_mut() {
            match std::future::Future::poll(Pin::new(failed), cx) {
                Poll::Ready(Ok(status)) => return self.end(&status),
                Poll::Ready(Err(_)) => self.input_failed = None,
                Poll::Pending => {}
            }
        }
        loop {
            match Pin::new(&mut self.receiver).poll_next(cx) {
                Poll::Ready(Some(event)) => {
                    let session = match (&event, &self.session) {
                        (Event::Attached { .. }, Some(session)) => {
                            session.lock().expect("session poisoned").clone()
                        }
                        _ => String::new(),
                    };
                    if let Some(bytes) = message(event, &session) {
                        return Poll::Ready(Some(Ok(Frame::data(bytes))));
                    }
                }
                Poll::Ready(None) => {
                    let status = self.ended.get().cloned().unwrap_or_else(|| {
                        Status::unavailable("The gateway's shared stream ended; resume by offset")
                    });
                    return self.end(&status);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc(message: &impl Message) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_u8(0);
        buf.put_u32(u32::try_from(message.encoded_len()).unwrap());
        message.encode(&mut buf).unwrap();
        buf.freeze()
    }

    #[test]
    fn only_read_only_watches_fan_out() {
        let watch = |mode: attach::Mode, force: bool| proto::WatchConsoleRequest {
            guest: "vm1".into(),
            mode: mode.into(),
            force,
            replay_bytes: 7,
            ..Default::default()
        };
        let fields = read_only_watch(&grpc(&watch(attach::Mode::ReadOnly, false)), true).unwrap();
        assert_eq!((fields.guest.as_str(), fields.replay_bytes), ("vm1", 7));
        assert!(read_only_watch(&grpc(&watch(attach::Mode::Unspecified, false)), true).is_some());
        assert!(read_only_watch(&grpc(&watch(attach::Mode::ReadWrite, false)), true).is_none());
        assert!(read_only_watch(&grpc(&watch(attach::Mode::ReadOnly, true)), true).is_none());
        let mut invalid = watch(attach::Mode::ReadOnly, false);
        invalid.mode = 9;
        assert!(read_only_watch(&grpc(&invalid), true).is_none());
        // Half a message, or a compressed one: forwarded.
        let whole = grpc(&watch(attach::Mode::ReadOnly, false));
        assert!(read_only_watch(&whole.slice(..whole.len() - 1), true).is_none());
        let mut flagged = whole.to_vec();
        flagged[0] = 1;
        assert!(read_only_watch(&Bytes::from(flagged), true).is_none());

        let attach_frame = |mode: attach::Mode| proto::ClientFrame {
            frame: Some(client_frame::Frame::Attach(proto::Attach {
                guest: "vm1".into(),
                mode: mode.into(),
                ..Default::default()
            })),
        };
        assert!(read_only_watch(&grpc(&attach_frame(attach::Mode::ReadOnly)), false).is_some());
        assert!(read_only_watch(&grpc(&attach_frame(attach::Mode::ReadWrite)), false).is_none());
        let input = proto::ClientFrame {
            frame: Some(client_frame::Frame::Input(proto::Input {
                data: Bytes::from_static(b"x"),
            })),
        };
        assert!(read_only_watch(&grpc(&input), false).is_none());
    }
}
