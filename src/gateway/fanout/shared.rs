//! One shared stream: the task that owns the upstream watch of one console, its ring of
//! recent output and its watchers' queues (docs/gateway.md, "Fan-out"; the parent module says
//! what a watcher gets). It never waits for a watcher: output is offered to each queue
//! ([`crate::console::clients`]) and a full one is skipped ahead. It holds the table's lock
//! only to count or remove its own entry, never across an `.await`.

use super::super::migrate::MAX_MOVES;
use super::super::GatewayError;
use super::{now_unix, Fanout, StreamKey, OPEN_WAIT, OWN_TOKEN_TTL};
use crate::console::clients::{self, ClientQueue, ClientReceiver, Event, Offer};
use crate::error::Error;
use crate::migration::{moved_of as moved_of_status, Moved};
use crate::proto::{self, attach, server_frame, ServerFrame};
use crate::tokens::{Access, Grant, TokenError, Verify};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// A watcher asking to join a shared stream.
pub(super) struct Join {
    pub(super) watcher: u64,
    pub(super) replay_bytes: u64,
    pub(super) reply: oneshot::Sender<Result<Joined, Status>>,
}

/// What a watcher that joined receives from.
pub(super) struct Joined {
    pub(super) receiver: ClientReceiver,
    /// The upstream's session id (a new one after each move).
    pub(super) session: Arc<Mutex<String>>,
    /// The status the shared stream ended with, once it did.
    pub(super) ended: Arc<OnceLock<Status>>,
}

/// The recent output of a shared stream: contiguous chunks ending at `end`.
struct Ring {
    chunks: VecDeque<(u64, Bytes)>,
    held: u64,
    end: u64,
    cap: u64,
}

impl Ring {
    fn new(cap: u64) -> Self {
        Self {
            chunks: VecDeque::new(),
            held: 0,
            end: 0,
            cap,
        }
    }

    /// Forgets everything: the next byte is at `end`.
    fn reset(&mut self, end: u64) {
        self.chunks.clear();
        self.held = 0;
        self.end = end;
    }

    /// Appends the chunk at `self.end`, dropping the oldest bytes over the cap.
    fn push(&mut self, data: &Bytes) {
        self.chunks.push_back((self.end, data.clone()));
        self.held += data.len() as u64;
        self.end += data.len() as u64;
        while self.held > self.cap {
            let over = self.held - self.cap;
            let Some((offset, front)) = self.chunks.pop_front() else {
                break;
            };
            let len = front.len() as u64;
            if len <= over {
                self.held -= len;
            } else {
                // Below `len`, a usize.
                let cut = usize::try_from(over).unwrap_or(front.len());
                self.chunks.push_front((offset + over, front.slice(cut..)));
                self.held -= over;
            }
        }
    }

    /// The last `wanted` bytes (at most what it holds): where they start, and the chunks.
    fn tail(&self, wanted: u64) -> (u64, Vec<(u64, Bytes)>) {
        let start = self.end - wanted.min(self.held);
        let mut out = Vec::new();
        for (offset, data) in &self.chunks {
            let end = offset + data.len() as u64;
            if end <= start {
                continue;
            }
            if *offset < start {
                let cut = usize::try_from(start - offset).unwrap_or(data.len());
                out.push((start, data.slice(cut..)));
            } else {
                out.push((*offset, data.clone()));
            }
        }
        (start, out)
    }
}

/// One watcher's queue, as the shared stream's task holds it.
struct Watcher {
    queue: ClientQueue,
    /// Its queue skipped output since it last took some: its own `lagged` will cover a gap
    /// of the shared stream too.
    lagging: bool,
}

/// Replay asked of the node a stream moved to: what it logged before the re-attach is sent
/// again, and the part the watchers already have is dropped here (as [`super::super::migrate`]
/// does for a forwarded call).
const REPLAY_ON_MOVE: u64 = 1 << 20;

/// The task of one shared stream (see the module doc).
pub(super) struct Shared {
    fanout: Arc<Fanout>,
    key: StreamKey,
    id: u64,
    /// The node serving the stream now: the key's node until the guest moves, then the node
    /// the moved status named.
    node: String,
    /// The nodes the stream left and at which offset (a move back to one at the same offset
    /// is a loop).
    left: Vec<(String, u64)>,
    /// The gateway's own token of the upstream call.
    own_token: String,
    watchers: HashMap<u64, Watcher>,
    ring: Ring,
    /// From the upstream's `attached`.
    session: Arc<Mutex<String>>,
    serial_break: bool,
    /// The guest's connection state as last told.
    guest_connected: bool,
    ended: Arc<OnceLock<Status>>,
    /// Set when the stream's own token stopped verifying while a watcher joined.
    revoked: Option<Status>,
    /// Where the node's log ended just after the upstream attached: the upstream's replay is
    /// in once the ring reaches it, and joins wait in `waiting` until then.
    replayed_to: u64,
    waiting: Vec<Join>,
    /// It ended because its own token no longer verifies (the cluster key changed).
    key_changed: bool,
}

impl Shared {
    /// The stream `id` of `key`, not opened yet ([`Self::run`] opens it on its first join).
    pub(super) fn new(fanout: Arc<Fanout>, key: StreamKey, id: u64) -> Self {
        Self {
            ring: Ring::new(fanout.config.replay_bytes.bytes()),
            fanout,
            node: key.node.clone(),
            left: Vec::new(),
            key,
            id,
            own_token: String::new(),
            watchers: HashMap::new(),
            session: Arc::new(Mutex::new(String::new())),
            serial_break: false,
            guest_connected: false,
            ended: Arc::new(OnceLock::new()),
            revoked: None,
            replayed_to: 0,
            waiting: Vec::new(),
            key_changed: false,
        }
    }

    /// Runs the stream until it ends or retires, then takes it out of the table.
    pub(super) async fn run(
        mut self,
        mut joins: mpsc::Receiver<Join>,
        mut leaves: mpsc::UnboundedReceiver<u64>,
    ) {
        let end = self.serve(&mut joins, &mut leaves).await;
        let Some(status) = end else {
            tracing::info!("shared stream closed: its last watcher left");
            return;
        };
        tracing::info!(code = ?status.code(), message = status.message(), "shared stream ended");
        self.remove_entry(false);
        // Joins waiting or on their way get the status too; after a revocation they are
        // dropped instead, so that each tries a new stream, with a new token.
        joins.close();
        let mut joining = std::mem::take(&mut self.waiting);
        while let Ok(join) = joins.try_recv() {
            joining.push(join);
        }
        for join in joining {
            if !self.key_changed {
                let _ = join.reply.send(Err(status.clone()));
            }
        }
        let _ = self.ended.set(status);
        // Every watcher takes what was queued for it, then the status.
        self.watchers.clear();
    }

    /// Runs the stream; the status it ended with, or `None` when it retired (no watchers).
    async fn serve(
        &mut self,
        joins: &mut mpsc::Receiver<Join>,
        leaves: &mut mpsc::UnboundedReceiver<u64>,
    ) -> Option<Status> {
        let first = loop {
            tokio::select! {
                Some(join) = joins.recv() => break join,
                Some(_) = leaves.recv() => {
                    if self.remove_entry(true) {
                        return None;
                    }
                }
                else => return None,
            }
        };
        let mut upstream = match self.open_following(false).await {
            Ok(upstream) => upstream,
            Err(status) => {
                let _ = first.reply.send(Err(status.clone()));
                return Some(status);
            }
        };
        self.admit(first);
        let mut changes = self.fanout.keys.changes();
        changes.mark_unchanged();
        let linger = self.fanout.config.linger.get();
        let mut retire_at: Option<tokio::time::Instant> = None;
        loop {
            if let Some(revoked) = self.revoked.take() {
                return Some(revoked);
            }
            let retire = async {
                match retire_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = upstream.message() => match message {
                    Ok(Some(frame)) => {
                        self.upstream_frame(frame);
                        if self.ring.end >= self.replayed_to {
                            for join in std::mem::take(&mut self.waiting) {
                                self.join(join);
                            }
                        }
                    }
                    Ok(None) => return Some(self.node_status(Status::unknown("the stream ended without a status"), false)),
                    Err(status) if moved_of_status(&status).is_some() => {
                        // The guest moved: the same stream continues at its new node.
                        if let Err(status) = self.redirect(status) {
                            return Some(status);
                        }
                        upstream = match self.open_following(true).await {
                            Ok(upstream) => upstream,
                            Err(status) => return Some(status),
                        };
                        if self.ring.end >= self.replayed_to {
                            for join in std::mem::take(&mut self.waiting) {
                                self.join(join);
                            }
                        }
                    }
                    Err(status) => return Some(self.node_status(status, false)),
                },
                Some(join) = joins.recv() => {
                    self.admit(join);
                    retire_at = None;
                }
                Some(watcher) = leaves.recv() => {
                    self.watchers.remove(&watcher);
                    if self.counted() == 0 {
                        retire_at = Some(tokio::time::Instant::now() + linger);
                    }
                }
                () = retire => {
                    if self.remove_entry(true) {
                        return None;
                    }
                    retire_at = None;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Some(Status::unavailable("The gateway is stopping"));
                    }
                    if let Some(revoked) = self.own_token_revoked() {
                        self.key_changed = true;
                        return Some(revoked);
                    }
                }
            }
        }
    }

    /// Watchers counted in on this stream's entry.
    fn counted(&self) -> u32 {
        let streams = self.fanout.streams.lock().expect("fan-out table poisoned");
        streams
            .get(&self.key)
            .filter(|e| e.id == self.id)
            .map_or(0, |e| e.watchers)
    }

    /// Removes this stream's entry from the table (with `only_if_idle`, only if no watcher is
    /// counted in); whether it did.
    fn remove_entry(&self, only_if_idle: bool) -> bool {
        let mut streams = self.fanout.streams.lock().expect("fan-out table poisoned");
        match streams.get(&self.key) {
            Some(e) if e.id == self.id && (!only_if_idle || e.watchers == 0) => {
                streams.remove(&self.key);
                true
            }
            _ => false,
        }
    }

    /// Decides about a status that ended (or refused) the upstream: the moved status is
    /// followed (the stream's node becomes the one it names) unless the stream moved
    /// [`MAX_MOVES`] times already (then it ends with the status as the node sent it) or the
    /// move goes back to a node it left at the same offset (a loop: `FAILED_PRECONDITION`);
    /// any other status ends it.
    fn redirect(&mut self, status: Status) -> Result<(), Status> {
        let moved = follow(&self.left, &self.node, status)?;
        tracing::info!(from = %self.node, to = %moved.to, offset = moved.offset, "shared stream following a move");
        let from = std::mem::replace(&mut self.node, moved.to);
        self.left.push((from, moved.offset));
        Ok(())
    }

    /// [`Self::open`] at the stream's node, following moves (a new stream for a guest that
    /// moved is answered with the moved status at once).
    async fn open_following(
        &mut self,
        live: bool,
    ) -> Result<tonic::Streaming<ServerFrame>, Status> {
        loop {
            match self.open(live).await {
                Ok(upstream) => return Ok(upstream),
                Err(status) => self.redirect(status)?,
            }
        }
    }

    /// Opens the upstream watch at the stream's node with the gateway's own token for that
    /// node, reads its `attached`, and learns where the node's log ended then
    /// ([`Self::replayed_to`]). A new stream (`live` false) asks for a ring's worth of replay
    /// and starts its ring at the node's first offset; a stream that moved (`live`) asks for
    /// [`REPLAY_ON_MOVE`] and continues at the next byte its watchers expect: replay below it
    /// is dropped, a first byte above it is a gap (`lagged` with the exact range), and each
    /// watcher gets the new node's `attached` at that byte, as a reconnect.
    async fn open(&mut self, live: bool) -> Result<tonic::Streaming<ServerFrame>, Status> {
        let node = self.node.clone();
        let now = now_unix();
        let grant = Grant {
            guest: self.key.guest.clone(),
            device: Some(self.key.device.clone()),
            access: Access::Read,
            expires_unix: now + OWN_TOKEN_TTL,
            key_id: String::new(),
            issued_unix: None,
            node: Some(node.clone()),
        };
        self.own_token = self.fanout.keys.issue(grant).map_err(|e| {
            crate::error::status(&Error::Unauthenticated(format!("Token refused: {e}")))
        })?;
        let channel = self
            .fanout
            .upstreams
            .channel(&node)
            .map_err(|e| crate::error::status(&Error::Unavailable(e.to_string())))?;
        let mut request = tonic::Request::new(proto::WatchConsoleRequest {
            guest: self.key.guest.clone(),
            device: self.key.device.clone(),
            mode: attach::Mode::ReadOnly.into(),
            force: false,
            replay_bytes: if live {
                self.ring.cap.max(REPLAY_ON_MOVE)
            } else {
                self.ring.cap
            },
        });
        let bearer = format!("Bearer {}", self.own_token);
        request.metadata_mut().insert(
            "authorization",
            bearer
                .parse()
                .map_err(|_| Status::internal("the gateway's token is not a header value"))?,
        );
        let mut client = proto::console_client::ConsoleClient::new(channel);
        let opening = async {
            let mut stream = client.watch_console(request).await?.into_inner();
            let first = stream.message().await?;
            Ok::<_, Status>((stream, first))
        };
        let (stream, first) = match tokio::time::timeout(OPEN_WAIT, opening).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(status)) => return Err(self.node_status(status, true)),
            Err(_) => {
                return Err(self.node_status(
                    Status::unavailable(format!("no answer within {}s", OPEN_WAIT.as_secs())),
                    true,
                ))
            }
        };
        let Some(ServerFrame {
            frame: Some(server_frame::Frame::Attached(attached)),
        }) = first
        else {
            return Err(self.node_status(Status::unknown("its first frame is not attached"), true));
        };
        *self.session.lock().expect("session poisoned") = attached.session_id;
        self.serial_break = attached.serial_break;
        self.guest_connected = attached.guest_connected;
        if live {
            let next = self.ring.end;
            if attached.offset > next {
                self.gap(next, attached.offset);
            }
            let event = Event::Attached {
                offset: self.ring.end,
                writer: false,
                guest_connected: self.guest_connected,
                serial_break: self.serial_break,
            };
            self.watchers.retain(|_, w| w.queue.control(event.clone()));
        } else {
            self.ring.reset(attached.offset);
        }
        self.replayed_to = match self.log_end().await {
            Ok(end) => end,
            Err(status) => {
                crate::limited!(warn, code = ?status.code(), message = status.message(),
                    "cannot learn the end of the node's log: late watchers get what the ring holds");
                0
            }
        };
        tracing::info!(
            offset = attached.offset,
            end = self.replayed_to,
            "shared stream opened"
        );
        Ok(stream)
    }

    /// The end offset of the console's log now, from a `ReadHistory` of its last byte: the
    /// upstream's replay (queued by the node when it attached, before anything live) ends no
    /// later.
    async fn log_end(&self) -> Result<u64, Status> {
        let channel = self
            .fanout
            .upstreams
            .channel(&self.node)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(proto::ReadHistoryRequest {
            guest: self.key.guest.clone(),
            stream: self.key.device.clone(),
            start: Some(proto::read_history_request::Start::TailBytes(1)),
            ..Default::default()
        });
        let bearer = format!("Bearer {}", self.own_token);
        request.metadata_mut().insert(
            "authorization",
            bearer
                .parse()
                .map_err(|_| Status::internal("the gateway's token is not a header value"))?,
        );
        let mut client = proto::console_client::ConsoleClient::new(channel);
        let reading = async {
            let mut chunks = client.read_history(request).await?.into_inner();
            let mut end = 0;
            while let Some(chunk) = chunks.message().await? {
                end = end.max(chunk.offset + chunk.data.len() as u64);
                if let Some(gap) = chunk.gap {
                    end = end.max(gap.to_offset);
                }
            }
            Ok(end)
        };
        tokio::time::timeout(OPEN_WAIT, reading)
            .await
            .map_err(|_| Status::unavailable("no answer"))?
    }

    /// Serves `join` once the ring holds the upstream's replay (so a watcher's replay is
    /// counted back from the node's end, as on a node), or keeps it until then.
    fn admit(&mut self, join: Join) {
        if self.ring.end >= self.replayed_to {
            self.join(join);
        } else {
            self.waiting.push(join);
        }
    }

    /// A status from the node as the watchers get it: the node's own (it ended the call) as
    /// it is; a transport failure as `UNAVAILABLE` naming the node.
    fn node_status(&self, status: Status, opening: bool) -> Status {
        use std::error::Error as _;
        let transport = status.source().is_some()
            || matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled);
        if !transport {
            return status;
        }
        let node = self.node.clone();
        let reason = status.message().to_owned();
        let error = if opening {
            GatewayError::NodeUnavailable { node, reason }
        } else {
            GatewayError::StreamBroken { node, reason }
        };
        crate::error::status(&Error::Unavailable(error.to_string()))
    }

    /// Why the stream must end now, if the cluster key changed and no longer verifies its own
    /// token (its expiry does not matter: the node checked it when the call started).
    fn own_token_revoked(&self) -> Option<Status> {
        match self.fanout.keys.verify(&self.own_token, now_unix()) {
            Ok(_) | Err(TokenError::Expired(_)) => None,
            Err(e) => Some(crate::error::status(&Error::Unauthenticated(format!(
                "The gateway's own token of this console's shared stream is refused: {e} (the \
                 cluster key changed)"
            )))),
        }
    }

    fn join(&mut self, join: Join) {
        if let Some(revoked) = self.own_token_revoked() {
            // Out of the table now, so the joining watcher (whose reply is dropped) opens a
            // new stream with a new token.
            self.remove_entry(false);
            self.revoked = Some(revoked);
            self.key_changed = true;
            return;
        }
        let (mut queue, receiver) = clients::queue(self.watcher_queue());
        let (start, replay) = self.ring.tail(join.replay_bytes);
        queue.control(Event::Attached {
            offset: start,
            writer: false,
            guest_connected: self.guest_connected,
            serial_break: self.serial_break,
        });
        for (offset, data) in replay {
            queue.control(Event::Output { offset, data });
        }
        let joined = Joined {
            receiver,
            session: self.session.clone(),
            ended: self.ended.clone(),
        };
        if join.reply.send(Ok(joined)).is_ok() {
            self.watchers.insert(
                join.watcher,
                Watcher {
                    queue,
                    lagging: false,
                },
            );
        }
    }

    fn watcher_queue(&self) -> usize {
        usize::try_from(self.fanout.config.watcher_queue.bytes()).unwrap_or(usize::MAX)
    }

    fn upstream_frame(&mut self, frame: ServerFrame) {
        match frame.frame {
            Some(server_frame::Frame::Output(output)) => {
                let mut output = output;
                let end = output.offset + output.data.len() as u64;
                if end <= self.ring.end {
                    // Empty, or replay of a node the stream moved to that its watchers have.
                    return;
                }
                if output.offset < self.ring.end {
                    let cut = usize::try_from(self.ring.end - output.offset).unwrap_or(0);
                    output.data = output.data.slice(cut..);
                    output.offset = self.ring.end;
                }
                if output.offset != self.ring.end {
                    // Not expected of a node (it reports gaps with `lagged`): a gap all the same.
                    self.gap(self.ring.end, output.offset);
                }
                self.ring.push(&output.data);
                self.watchers
                    .retain(|_, w| match w.queue.offer(output.offset, &output.data) {
                        Offer::Queued => {
                            w.lagging = false;
                            true
                        }
                        Offer::Skipped(_) => {
                            w.lagging = true;
                            true
                        }
                        Offer::Gone => false,
                    });
            }
            Some(server_frame::Frame::Lagged(lagged)) => {
                // The gateway itself fell behind the node.
                crate::limited!(
                    warn,
                    from = lagged.from_offset,
                    to = lagged.to_offset,
                    "shared stream lagged at the node"
                );
                self.gap(lagged.from_offset, lagged.to_offset);
            }
            Some(server_frame::Frame::Guest(state)) => {
                self.guest_connected = state.connected;
                self.watchers.retain(|_, w| {
                    w.queue.control(Event::Guest {
                        connected: state.connected,
                    })
                });
            }
            // A read-only watch holds no lease; a second attached is not a node's.
            Some(server_frame::Frame::WriterRevoked(_) | server_frame::Frame::Attached(_))
            | None => {}
        }
    }

    /// The shared stream missed `from .. to`: every watcher that is not already skipping
    /// is told so (one that is will be told its own, larger, gap).
    fn gap(&mut self, from: u64, to: u64) {
        self.ring.reset(to);
        if to <= from {
            return;
        }
        self.watchers
            .retain(|_, w| w.lagging || w.queue.control(Event::Lagged { from, to }));
    }
}

/// The move to follow for `status`, from `node` after leaving `left`: the moved status's, if
/// fewer than [`MAX_MOVES`] were followed and it does not go back to a node left at the same
/// offset (a loop: `FAILED_PRECONDITION` naming both); else the status to end with.
fn follow(left: &[(String, u64)], node: &str, status: Status) -> Result<Moved, Status> {
    let Some(moved) = moved_of_status(&status) else {
        return Err(status);
    };
    if left.len() >= MAX_MOVES {
        return Err(status);
    }
    if left.contains(&(moved.to.clone(), moved.offset)) {
        return Err(Status::failed_precondition(format!(
            "The stream moved in a loop between {node} and {} at offset {}; ask the nodes' \
             operators (each names the other as the guest's new node)",
            moved.to, moved.offset
        )));
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(to: &str, offset: u64) -> Status {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("conlog-moved-to", to.parse().unwrap());
        metadata.insert("conlog-moved-offset", offset.to_string().parse().unwrap());
        Status::with_metadata(tonic::Code::FailedPrecondition, "moved", metadata)
    }

    #[test]
    fn moves_are_followed_at_most_max_moves_times_and_a_loop_ends_the_stream() {
        let mut left = Vec::new();
        let got = follow(&left, "a:1", moved("b:2", 5)).unwrap();
        assert_eq!((got.to.as_str(), got.offset), ("b:2", 5));
        left.push(("a:1".to_owned(), 5));
        let looped = follow(&left, "b:2", moved("a:1", 5)).unwrap_err();
        assert_eq!(looped.code(), tonic::Code::FailedPrecondition);
        assert!(
            looped.message().contains("loop between b:2 and a:1"),
            "{looped:?}"
        );
        // Back to a node at a later offset is a new move, not a loop.
        assert!(follow(&left, "b:2", moved("a:1", 9)).is_ok());
        while left.len() < MAX_MOVES {
            left.push((format!("n{}:1", left.len()), 10));
        }
        let passed = follow(&left, "z:1", moved("y:1", 99)).unwrap_err();
        assert_eq!(passed.message(), "moved", "the node's status as it sent it");
        let other = follow(&[], "a:1", Status::not_found("removed")).unwrap_err();
        assert_eq!(other.code(), tonic::Code::NotFound);
    }

    fn bytes(n: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; n])
    }

    #[test]
    fn the_ring_keeps_the_last_bytes_and_serves_any_tail_of_them() {
        let mut ring = Ring::new(10);
        ring.reset(100);
        ring.push(&bytes(4, b'a'));
        ring.push(&bytes(4, b'b'));
        assert_eq!(ring.tail(0), (108, vec![]));
        assert_eq!(
            ring.tail(5),
            (103, vec![(103, bytes(1, b'a')), (104, bytes(4, b'b'))])
        );
        ring.push(&bytes(6, b'c'));
        // 14 bytes pushed, 10 kept: the first 4 'a' are gone.
        assert_eq!(ring.held, 10);
        let (start, chunks) = ring.tail(100);
        assert_eq!(start, 104);
        assert_eq!(chunks, vec![(104, bytes(4, b'b')), (108, bytes(6, b'c'))]);
        ring.push(&bytes(7, b'd'));
        let (start, chunks) = ring.tail(10);
        assert_eq!(
            (start, chunks),
            (111, vec![(111, bytes(3, b'c')), (114, bytes(7, b'd'))])
        );
        // One chunk larger than the ring: its tail only.
        ring.push(&bytes(25, b'e'));
        assert_eq!(ring.tail(100), (136, vec![(136, bytes(10, b'e'))]));
        ring.reset(500);
        assert_eq!(ring.tail(100), (500, vec![]));
    }
}
