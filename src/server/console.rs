//! Handlers of the `conlog.v1.Console` service.
//!
//! They validate requests, find the console in [`crate::guests`], attach through
//! [`crate::console`] and map its [`Event`]s to `ServerFrame`s. A console that closes ends the
//! stream with `UNAVAILABLE` (shutdown, upgrade: reconnect and resume by offset) or `NOT_FOUND`
//! (removed), or with the moved status of a stream that live-migrated away
//! ([`crate::migration::moved_status`]: at once for a new call, after every byte for a live
//! one). `ReadHistory` streams from [`crate::history`]. Console input is written through
//! [`crate::console::ConsoleHandle::write_input`], which queues nothing: `SendConsoleInput`
//! takes at most 64 KiB per call (its request body is bounded while it arrives, by
//! [`super::bodies::InputBounded`]), one call at a time per session, and waits at most 10 s for the guest; an
//! `AttachConsole` stream reads its next frame only once the guest took the previous one. A
//! serial BREAK is input like any other (`ClientFrame.serial_break`,
//! `SendConsoleInputRequest.serial_break`): the writer's only; a console that cannot carry one
//! answers `FAILED_PRECONDITION` (it ends an `AttachConsole` call, which has no other answer).

use super::auth::{self, Caller, Need};
use super::conn::ConnInfo;
use crate::console::pacing::InputPacer;
use crate::console::sessions::{SessionGuard, Sessions};
use crate::console::{AttachRequest, Attachment, ConsoleError, Event, Mode, MAX_PENDING_INPUT};
use crate::error::{Error, Result};
use crate::guests::{Guests, RegistryError};
use crate::history::{self, HistoryItem, HistoryRequest, Start};
use crate::migration::{moved_status, Moved};
use crate::names::{self, GuestName, StreamName};
use crate::proto::{
    self, attach, client_frame, console_server::Console, read_history_request, server_frame,
    ClientFrame, HistoryChunk, ReadHistoryRequest, SendConsoleInputRequest,
    SendConsoleInputResponse, ServerFrame, WatchConsoleRequest,
};
use crate::tokens::TokenKey;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// How long an `AttachConsole` call may take to send its attach frame.
const ATTACH_FRAME_WAIT: Duration = Duration::from_secs(10);
/// How long `SendConsoleInput` waits for the guest to take its input (docs/operations.md,
/// "Consoles"): past it, what the guest has not taken is discarded and the call is
/// `RESOURCE_EXHAUSTED`.
const INPUT_WAIT: Duration = Duration::from_secs(10);

/// A boxed server stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Console service.
#[derive(Clone)]
pub struct ConsoleService {
    guests: Arc<Guests>,
    sessions: Arc<Sessions>,
    history_chunk: usize,
    input_rate: u64,
    tokens: Arc<TokenKey>,
    /// The descriptors remote callers may hold: a remote history reader holds one log file.
    remote_descriptors: Option<Arc<tokio::sync::Semaphore>>,
    /// Replay bytes remote clients may hold at once (`limits.remote_replay_bytes`).
    replay_budget: Option<Arc<tokio::sync::Semaphore>>,
    /// The longest replay a console gives (`consoles.max_replay`).
    max_replay: u64,
}

impl ConsoleService {
    pub fn new(
        guests: Arc<Guests>,
        history_chunk: usize,
        input_rate: u64,
        tokens: Arc<TokenKey>,
    ) -> Self {
        Self {
            guests,
            sessions: Arc::new(Sessions::default()),
            history_chunk,
            input_rate,
            tokens,
            remote_descriptors: None,
            replay_budget: None,
            max_replay: u64::MAX,
        }
    }

    /// Remote clients' replays (at most `max_replay` each) take their bytes from `budget`
    /// (`limits.remote_replay_bytes`).
    pub fn with_replay_budget(
        mut self,
        budget: Arc<tokio::sync::Semaphore>,
        max_replay: u64,
    ) -> Self {
        self.replay_budget = Some(budget);
        self.max_replay = max_replay;
        self
    }

    /// The replay a caller gets of the `wanted` bytes, and the memory place it holds: a local
    /// caller all of it; a remote one what the budget has room for now (maybe less, maybe
    /// none: the attach reply's offset says where its replay starts, and the rest is in
    /// history).
    fn replay(
        &self,
        caller: Option<&Caller>,
        wanted: u64,
    ) -> (u64, Option<Arc<tokio::sync::OwnedSemaphorePermit>>) {
        let (Some(Caller::Remote(_)), Some(budget)) = (caller, &self.replay_budget) else {
            return (wanted, None);
        };
        if wanted == 0 {
            return (0, None);
        }
        let want = u32::try_from(wanted.min(self.max_replay)).unwrap_or(u32::MAX);
        let fits = u32::try_from(budget.available_permits()).unwrap_or(u32::MAX);
        let granted = budget
            .clone()
            .try_acquire_many_owned(want)
            .or_else(|_| budget.clone().try_acquire_many_owned(fits.min(want)));
        match granted {
            Ok(permit) if permit.num_permits() > 0 => {
                (permit.num_permits() as u64, Some(Arc::new(permit)))
            }
            _ => {
                crate::limited!(
                    info,
                    wanted,
                    "limits.remote_replay_bytes reached; attaching without a replay"
                );
                (0, None)
            }
        }
    }

    /// Remote history readers take their log file's descriptor from `share` (see
    /// `Protection::remote_descriptors`).
    pub fn with_remote_descriptors(mut self, share: Arc<tokio::sync::Semaphore>) -> Self {
        self.remote_descriptors = Some(share);
        self
    }

    /// A remote caller's places for `count` more descriptors, or the refusal naming the limit.
    fn remote_descriptors(
        &self,
        caller: Option<&Caller>,
        count: u32,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Status> {
        let (Some(Caller::Remote(_)), Some(share)) = (caller, &self.remote_descriptors) else {
            return Ok(None);
        };
        share
            .clone()
            .try_acquire_many_owned(count)
            .map(Some)
            .map_err(|_| {
                Error::Exhausted(
                    "Limit reached: remote callers hold their share of RLIMIT_NOFILE (a quarter); \
                 try again when other calls end"
                        .to_owned(),
                )
                .into()
            })
    }

    /// `stream`, ended with `UNAUTHENTICATED` if the token key is rotated while it runs and
    /// the caller came with a token: a rotation revokes calls in progress too.
    fn revocable<T: Send + 'static>(
        &self,
        caller: Option<&Caller>,
        stream: BoxStream<T>,
    ) -> BoxStream<T> {
        if !matches!(caller, Some(Caller::Remote(_))) {
            return stream;
        }
        let mut rotations = self.tokens.rotations();
        rotations.mark_unchanged();
        Box::pin(futures::stream::unfold(
            Some((stream, rotations)),
            |state| async move {
                let (mut stream, mut rotations) = state?;
                tokio::select! {
                    item = stream.next() => item.map(|item| (item, Some((stream, rotations)))),
                    _ = rotations.changed() => Some((
                        Err(Error::Unauthenticated(
                            "The token key was rotated: this call's token is revoked".to_owned(),
                        )
                        .into()),
                        None,
                    )),
                }
            },
        ))
    }

    async fn attach(
        &self,
        fields: AttachFields,
        label: String,
        caller: Option<&Caller>,
    ) -> Result<(crate::console::ConsoleHandle, Attachment), AttachError> {
        let guest = GuestName::parse(fields.guest).map_err(Error::from)?;
        let device = StreamName::or_default(fields.device, names::DEFAULT_CONSOLE_DEVICE)
            .map_err(Error::from)?;
        let mode = match attach::Mode::try_from(fields.mode) {
            Ok(attach::Mode::ReadWrite) => Mode::ReadWrite,
            Ok(attach::Mode::ReadOnly | attach::Mode::Unspecified) => Mode::ReadOnly,
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "mode {} is not an Attach.Mode (READ_ONLY = 1, READ_WRITE = 2)",
                    fields.mode
                ))
                .into())
            }
        };
        let need = if mode == Mode::ReadWrite || fields.force {
            Need::Write
        } else {
            Need::Read
        };
        auth::authorize(caller, &guest, &device, need)?;
        let console = match self.guests.console(&guest, &device).await {
            Ok(console) => console,
            Err(
                missing @ (RegistryError::UnknownGuest(_)
                | RegistryError::UnknownStream { .. }
                | RegistryError::UnknownConsole { .. }),
            ) => {
                // A console that moved away answers with where it went.
                return Err(match self.guests.moved(&guest, &device) {
                    Some(moved) => AttachError::Moved(moved_status(&guest, &device, &moved)),
                    None => AttachError::Error(missing.into()),
                });
            }
            Err(e) => return Err(AttachError::Error(e.into())),
        };
        let (replay_bytes, replay_permit) = self.replay(caller, fields.replay_bytes);
        let attachment = console
            .attach(AttachRequest {
                mode,
                force: fields.force,
                replay_bytes,
                label,
                remote: matches!(caller, Some(Caller::Remote(_))),
                replay_permit,
            })
            .await
            .map_err(Error::from)?;
        Ok((console, attachment))
    }
}

/// Why an attach failed: an error, or the moved status (a status with trailers, which the
/// error mapping cannot carry).
enum AttachError {
    Error(Error),
    Moved(Status),
}

impl From<Error> for AttachError {
    fn from(error: Error) -> Self {
        AttachError::Error(error)
    }
}

impl From<AttachError> for Status {
    fn from(error: AttachError) -> Self {
        match error {
            AttachError::Error(e) => e.into(),
            AttachError::Moved(status) => status,
        }
    }
}

/// The attach parameters common to AttachConsole and WatchConsole.
struct AttachFields {
    guest: String,
    device: String,
    mode: i32,
    force: bool,
    replay_bytes: u64,
}

/// Who is calling, for logs and the writer-held message.
fn peer_label<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<ConnInfo>()
        .map_or_else(|| "grpc client".to_owned(), ConnInfo::label)
}

/// A remote caller's label with its token's access ("… token read-write"): who an operator
/// sees attached in `ListGuests`. Tokens carry no user name; the address and the access are
/// what the daemon knows.
fn with_access(label: String, caller: Option<&auth::Caller>) -> String {
    match caller {
        Some(auth::Caller::Remote(grant)) => {
            let access = match grant.access {
                crate::tokens::Access::Read => "read",
                crate::tokens::Access::ReadWrite => "read-write",
            };
            format!("{label} token {access}")
        }
        _ => label,
    }
}

/// `event` as the frame a console client gets, or, for the console's end, how it ended (its
/// reason, whether the guest was removed, where it moved): that ends the call with a status.
/// The node's calls and the gateway's shared watches ([`crate::gateway`]) both encode with it.
pub(crate) fn frame_of(
    event: Event,
    session_id: &str,
) -> std::result::Result<server_frame::Frame, (String, bool, Option<Moved>)> {
    Ok(match event {
        Event::Attached {
            offset,
            writer,
            guest_connected,
            serial_break,
        } => server_frame::Frame::Attached(proto::Attached {
            offset,
            writer,
            session_id: session_id.to_owned(),
            guest_connected,
            serial_break,
        }),
        Event::Output { offset, data } => {
            server_frame::Frame::Output(proto::Output { offset, data })
        }
        Event::Lagged { from, to } => server_frame::Frame::Lagged(proto::Lagged {
            from_offset: from,
            to_offset: to,
        }),
        Event::Guest { connected } => server_frame::Frame::Guest(proto::GuestState { connected }),
        Event::WriterRevoked { reason } => {
            server_frame::Frame::WriterRevoked(proto::WriterRevoked { reason })
        }
        Event::Closed {
            reason,
            removed,
            moved,
        } => return Err((reason, removed, moved)),
    })
}

fn frame(
    event: Event,
    session_id: &str,
    names: &(String, String),
) -> std::result::Result<ServerFrame, Status> {
    match frame_of(event, session_id) {
        Ok(frame) => Ok(ServerFrame { frame: Some(frame) }),
        Err((_, _, Some(moved))) => Err(moved_status(&names.0, &names.1, &moved)),
        Err((reason, removed, None)) => Err(ConsoleError::Ended { reason, removed }.into()),
    }
}

/// The guest and device names of `console`, for the moved status.
fn console_names(console: &crate::console::ConsoleHandle) -> (String, String) {
    let (guest, device) = console.guest_and_device();
    (guest.to_string(), device.to_string())
}

/// `chunks`, ended with the moved status of `guest`'s `stream` when the read reached the
/// stream's end and the stream moved away (`moved`, asked when the read is over: a stream
/// being followed may move while it is read). A read that ended before the end (a limit,
/// `until_time`) or with an error ends as it did.
fn ending_moved(
    chunks: BoxStream<HistoryChunk>,
    start: Option<u64>,
    names: (String, String),
    moved: impl FnOnce() -> Option<Moved> + Send + 'static,
) -> BoxStream<HistoryChunk> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    // A read that is not from an explicit offset and gets no byte started at the end.
    let position = Arc::new(AtomicU64::new(start.unwrap_or(u64::MAX)));
    let failed = Arc::new(AtomicBool::new(false));
    let (seen, errored) = (position.clone(), failed.clone());
    let chunks = futures::StreamExt::inspect(chunks, move |item| match item {
        Ok(chunk) => {
            let end = match &chunk.gap {
                Some(gap) => gap.to_offset,
                None if chunk.event.is_some() => return,
                None => chunk.offset + chunk.data.len() as u64,
            };
            // The first chunk places an open start; later ones move it on.
            let _ = seen.fetch_update(Relaxed, Relaxed, |at| {
                Some(if at == u64::MAX { end } else { at.max(end) })
            });
        }
        Err(_) => errored.store(true, Relaxed),
    });
    let tail = futures::StreamExt::filter_map(
        futures::stream::once(async move {
            if failed.load(Relaxed) {
                return None;
            }
            let moved = moved()?;
            (position.load(Relaxed) >= moved.offset)
                .then(|| Err(moved_status(&names.0, &names.1, &moved)))
        }),
        |item| async move { item },
    );
    Box::pin(futures::StreamExt::chain(chunks, tail))
}

/// What a client's response stream keeps alive: its attachment (the lease), its session, and
/// the sender whose drop tells the call's input task to stop.
struct Held {
    attachment: Attachment,
    _session: Option<SessionGuard>,
    _call: Option<tokio::sync::oneshot::Sender<()>>,
    input_failed: Option<tokio::sync::oneshot::Receiver<Status>>,
    finished: bool,
}

/// The client's frames; everything in [`Held`] lives exactly as long as the stream. A status
/// from `input_failed` (the client's input broke a limit) ends the stream with it.
fn frames(
    names: (String, String),
    attachment: Attachment,
    session: Option<SessionGuard>,
    call: Option<tokio::sync::oneshot::Sender<()>>,
    input_failed: Option<tokio::sync::oneshot::Receiver<Status>>,
) -> BoxStream<ServerFrame> {
    let session_id = session.as_ref().map(|s| s.id.clone()).unwrap_or_default();
    let names = Arc::new(names);
    let held = Held {
        attachment,
        _session: session,
        _call: call,
        input_failed,
        finished: false,
    };
    Box::pin(futures::stream::unfold(held, move |mut held| {
        let session_id = session_id.clone();
        let names = names.clone();
        async move {
            if held.finished {
                return None;
            }
            let event = match held.input_failed.as_mut() {
                Some(failed) => tokio::select! {
                    event = held.attachment.events.recv() => event?,
                    status = failed => match status {
                        Ok(status) => {
                            held.finished = true;
                            return Some((Err(status), held));
                        }
                        // The input task ended normally; only events matter now.
                        Err(_) => {
                            held.input_failed = None;
                            held.attachment.events.recv().await?
                        }
                    },
                },
                None => held.attachment.events.recv().await?,
            };
            let item = frame(event, &session_id, &names);
            held.finished = item.is_err();
            Some((item, held))
        }
    }))
}

/// The latest time a request may name: what nanoseconds since the epoch in an `i64` can hold.
const LATEST_SECONDS: i64 = i64::MAX / 1_000_000_000;

/// A request's timestamp as nanoseconds since the Unix epoch, or `INVALID_ARGUMENT` naming the
/// field and the rule it breaks.
fn unix_nanos(field: &str, time: &prost_types::Timestamp) -> Result<i64> {
    if !(0..1_000_000_000).contains(&time.nanos) {
        return Err(Error::InvalidArgument(format!(
            "{field}.nanos is {}: it must be in 0..=999999999",
            time.nanos
        )));
    }
    if !(0..LATEST_SECONDS).contains(&time.seconds) {
        return Err(Error::InvalidArgument(format!(
            "{field}.seconds is {}: times must lie between 1970-01-01T00:00:00Z and \
             2262-04-11T23:47:15Z (seconds 0..{LATEST_SECONDS})",
            time.seconds
        )));
    }
    Ok(time.seconds * 1_000_000_000 + i64::from(time.nanos))
}

/// A time for the wire.
fn timestamp(unix_nanos: i64) -> prost_types::Timestamp {
    let nanos = unix_nanos.rem_euclid(1_000_000_000);
    prost_types::Timestamp {
        seconds: unix_nanos.div_euclid(1_000_000_000),
        // Below 10^9.
        nanos: i32::try_from(nanos).unwrap_or_default(),
    }
}

/// A history item as the frame a client receives. Nothing the request did not ask for is set:
/// an old client's frames are byte for byte what they were before the time index.
fn chunk(item: HistoryItem, text: bool) -> HistoryChunk {
    match item {
        HistoryItem::Data {
            offset,
            data,
            time,
            marks,
        } => HistoryChunk {
            offset,
            text: if text {
                String::from_utf8_lossy(&data).into_owned()
            } else {
                String::new()
            },
            data: data.into(),
            gap: None,
            time: time.map(|t| timestamp(t.unix_nanos)),
            event: None,
            marks: marks
                .into_iter()
                .map(|m| proto::TimeMark {
                    offset: m.offset,
                    unix_nanos: m.unix_nanos,
                    approximate: m.approximate,
                })
                .collect(),
        },
        HistoryItem::Gap { from, to, reason } => HistoryChunk {
            offset: to,
            gap: Some(proto::Gap {
                from_offset: from,
                to_offset: to,
                reason,
            }),
            ..Default::default()
        },
        HistoryItem::Event(event) => HistoryChunk {
            offset: event.offset,
            time: Some(timestamp(event.unix_nanos)),
            event: Some(proto::HistoryEvent {
                kind: i32::from(event.kind),
                offset: event.offset,
                time: Some(timestamp(event.unix_nanos)),
                detail: event.detail,
            }),
            ..Default::default()
        },
    }
}

#[tonic::async_trait]
impl Console for ConsoleService {
    type AttachConsoleStream = BoxStream<ServerFrame>;
    type WatchConsoleStream = BoxStream<ServerFrame>;
    type ReadHistoryStream = BoxStream<HistoryChunk>;

    async fn attach_console(
        &self,
        request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<Self::AttachConsoleStream>, Status> {
        let caller = auth::caller(&request);
        let label = with_access(peer_label(&request), caller.as_ref());
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(ATTACH_FRAME_WAIT, inbound.message())
            .await
            .map_err(|_| {
                Error::InvalidArgument(format!(
                    "The attach frame must be the first ClientFrame, sent within {}s of the call",
                    ATTACH_FRAME_WAIT.as_secs()
                ))
            })??
            .ok_or_else(|| {
                Error::InvalidArgument("The stream ended before its attach frame".into())
            })?;
        let Some(client_frame::Frame::Attach(a)) = first.frame else {
            return Err(
                Error::InvalidArgument("The first ClientFrame must be attach".into()).into(),
            );
        };
        let fields = AttachFields {
            guest: a.guest,
            device: a.device,
            mode: a.mode,
            force: a.force,
            replay_bytes: a.replay_bytes,
        };
        let (console, attachment) = self.attach(fields, label, caller.as_ref()).await?;
        let names = console_names(&console);
        let client = attachment.id;
        let mut pacer = InputPacer::new(self.input_rate);
        let (fail, input_failed) = tokio::sync::oneshot::channel::<Status>();
        // The input task ends with the call: when the client stops sending, or when the
        // response stream is dropped (console closed or removed, client gone).
        let (ended, mut call_over) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    frame = inbound.message() => frame,
                    _ = &mut call_over => break,
                };
                let frame = match frame {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(status) => {
                        // A limit the input broke (message size, or an `AttachConsole`
                        // message over its bound, `server::bodies`) ends the call with it.
                        let refusal = super::limits::message_size_status(&status).or_else(|| {
                            (status.code() == tonic::Code::ResourceExhausted).then_some(status)
                        });
                        if let Some(status) = refusal {
                            let _ = fail.send(status);
                        }
                        break;
                    }
                };
                match frame.frame {
                    Some(client_frame::Frame::Input(input)) => {
                        // The next frame is read only once the guest took this one: a guest
                        // that does not read stops the client through HTTP/2 flow control.
                        // Input of a client without the lease, or with no guest, is dropped
                        // (streams have no per-frame answer); the end of the call (the
                        // `call_over` branch) withdraws what is not written yet.
                        let bytes = input.data.len();
                        tokio::select! {
                            _ = console.write_input(client, input.data) => {},
                            _ = &mut call_over => break,
                        }
                        pacer.pace(bytes).await;
                    }
                    Some(client_frame::Frame::SerialBreak(_)) => {
                        // Like input: a watcher's is dropped; one the console cannot carry
                        // ends the call with the reason.
                        let sent = tokio::select! {
                            sent = console.send_break(client) => sent,
                            _ = &mut call_over => break,
                        };
                        if let Err(e @ ConsoleError::NoBreak(_)) = sent {
                            let _ = fail.send(Error::from(e).into());
                            break;
                        }
                        pacer.pace(1).await;
                    }
                    Some(client_frame::Frame::Resize(_)) | None => {}
                    Some(client_frame::Frame::Attach(_)) => {
                        tracing::debug!(console = %console.name, "ignoring a second attach frame");
                    }
                }
            }
        });
        let frames = frames(names, attachment, None, Some(ended), Some(input_failed));
        Ok(Response::new(self.revocable(caller.as_ref(), frames)))
    }

    async fn watch_console(
        &self,
        request: Request<WatchConsoleRequest>,
    ) -> Result<Response<Self::WatchConsoleStream>, Status> {
        let caller = auth::caller(&request);
        let label = format!(
            "{} (watch session)",
            with_access(peer_label(&request), caller.as_ref())
        );
        let r = request.into_inner();
        let fields = AttachFields {
            guest: r.guest,
            device: r.device,
            mode: r.mode,
            force: r.force,
            replay_bytes: r.replay_bytes,
        };
        let (console, attachment) = self.attach(fields, label, caller.as_ref()).await?;
        let names = console_names(&console);
        let session = self
            .sessions
            .open(console, attachment.id, self.input_rate)?;
        let frames = frames(names, attachment, Some(session), None, None);
        Ok(Response::new(self.revocable(caller.as_ref(), frames)))
    }

    async fn send_console_input(
        &self,
        request: Request<SendConsoleInputRequest>,
    ) -> Result<Response<SendConsoleInputResponse>, Status> {
        let caller = auth::caller(&request);
        let r = request.into_inner();
        let session = self.sessions.get(&r.session_id)?;
        let (guest, device) = session.console.guest_and_device();
        auth::authorize(caller.as_ref(), guest, device, Need::Write)?;
        let bytes = r.data.len();
        if bytes > MAX_PENDING_INPUT {
            return Err(Error::Exhausted(format!(
                "SendConsoleInput data is {bytes} bytes; at most {MAX_PENDING_INPUT} (64 KiB) of \
                 console input may wait for the guest: send it in pieces, one call after the other"
            ))
            .into());
        }
        // One call at a time per session: a second one is refused, never queued, so that the
        // input of a session reaches the guest in the order of its calls.
        let Ok(mut pacer) = session.pacer.try_lock() else {
            return Err(Error::Exhausted(
                "Another SendConsoleInput call of this session is in progress (one at a time per \
                 session): send the next input after the previous call returned"
                    .into(),
            )
            .into());
        };
        let written = tokio::time::timeout(
            INPUT_WAIT,
            session.console.write_input(session.client, r.data),
        )
        .await
        .map_err(|_| {
            Error::Exhausted(format!(
                "The guest of console {} has not read its input for {}s (at most \
                 {MAX_PENDING_INPUT} bytes wait for it); the input of this call that it had not \
                 taken was discarded",
                session.console.name,
                INPUT_WAIT.as_secs()
            ))
        })??;
        if r.serial_break {
            tokio::time::timeout(INPUT_WAIT, session.console.send_break(session.client))
                .await
                .map_err(|_| {
                    Error::Exhausted(format!(
                        "The guest of console {} has not read its input for {}s; the serial \
                         BREAK was not sent",
                        session.console.name,
                        INPUT_WAIT.as_secs()
                    ))
                })??;
        }
        pacer.pace(bytes).await;
        Ok(Response::new(SendConsoleInputResponse {
            accepted_bytes: written as u64,
        }))
    }

    async fn read_history(
        &self,
        request: Request<ReadHistoryRequest>,
    ) -> Result<Response<Self::ReadHistoryStream>, Status> {
        let caller = auth::caller(&request);
        let r = request.into_inner();
        let guest = GuestName::parse(r.guest)?;
        let stream = if r.stream.is_empty() {
            // A token limited to one device reads that device by default.
            auth::granted_device(caller.as_ref())
                .map(StreamName::parse)
                .transpose()?
        } else {
            Some(StreamName::parse(r.stream)?)
        };
        // The guest is checked before it is looked up: a token for another guest learns
        // nothing, not even whether this one exists.
        auth::authorize_guest(caller.as_ref(), &guest)?;
        let (name, actor, moved) = match self.guests.stream(&guest, stream.as_ref()).await {
            Ok((name, actor)) => {
                auth::authorize(caller.as_ref(), &guest, &name, Need::Read)?;
                (name, actor, None)
            }
            // No live stream: a removed one's logs are read while they are on disk.
            Err(
                missing @ (RegistryError::UnknownGuest(_) | RegistryError::UnknownStream { .. }),
            ) => {
                let (name, actor, tombstone) = self
                    .guests
                    .removed_stream(&guest, stream.as_ref())
                    .map_err(|e| match e {
                        RegistryError::Io { .. } => e,
                        _ => missing,
                    })?;
                auth::authorize_removed(
                    caller.as_ref(),
                    &guest,
                    &name,
                    tombstone.as_ref().map(|t| t.removed_unix),
                )?;
                // A stream that moved away: its kept history, then the moved status.
                let moved = tombstone
                    .as_ref()
                    .and_then(crate::tombstone::Tombstone::moved);
                (name, actor, moved)
            }
            Err(e) => return Err(e.into()),
        };
        let start = match r.start {
            None => Start::Oldest,
            Some(read_history_request::Start::FromOffset(offset)) => Start::Offset(offset),
            Some(read_history_request::Start::TailBytes(n)) => Start::TailBytes(n),
            Some(read_history_request::Start::TailLines(n)) => Start::TailLines(n),
            Some(read_history_request::Start::SinceTime(t)) => {
                Start::Time(unix_nanos("since_time", &t)?)
            }
        };
        let until = r
            .until_time
            .as_ref()
            .map(|t| unix_nanos("until_time", t))
            .transpose()?;
        if let (Start::Time(since), Some(until)) = (start, until) {
            if until < since {
                return Err(Error::InvalidArgument(
                    "until_time is before since_time: nothing can lie between them".into(),
                )
                .into());
            }
        }
        let request = HistoryRequest {
            start,
            follow: r.follow,
            limit: (r.limit_bytes > 0).then_some(r.limit_bytes),
            chunk_size: self.history_chunk,
            utf8_boundaries: r.text,
            until,
            lines: r.lines,
            events: r.events,
            marks: r.marks,
            times: r.times,
        };
        // A timed reader holds the log file and its index (docs/operations.md, "Sizing").
        let descriptors = if request.timed() { 2 } else { 1 };
        let descriptor = self.remote_descriptors(caller.as_ref(), descriptors)?;
        let going_away = self.guests.going_away();
        let stats = actor.stats.clone();
        let items = history::read(actor, request, going_away).await?;
        let text = r.text;
        let chunks = tokio_stream::wrappers::ReceiverStream::new(items).map(move |item| {
            // Held as long as the stream is.
            let _descriptor = &descriptor;
            item.map(|item| chunk(item, text)).map_err(Status::from)
        });
        // A live stream may move while it is followed: asked when the read is over.
        let moved = move || {
            moved.or_else(|| {
                let to = stats.moved_to.get()?;
                Some(Moved {
                    to: to.clone(),
                    offset: stats.end_offset.load(std::sync::atomic::Ordering::Relaxed),
                })
            })
        };
        let start = match start {
            Start::Offset(offset) => Some(offset),
            _ => None,
        };
        let chunks = ending_moved(Box::pin(chunks), start, (guest.to_string(), name), moved);
        Ok(Response::new(self.revocable(caller.as_ref(), chunks)))
    }
}
