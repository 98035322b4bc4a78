//! The destination's import of one stream from its source node (docs/design.md, "Live
//! migration").
//!
//! Owns the node-to-node connection (TLS with `migration.ca`, this node's client certificate
//! if configured, the connect timeout, HTTP/2 keepalive, a bounded message size and stream
//! window), the `ReadHistory` it runs on the source (follow, events, marks, with the source
//! agent's READ token) and when the import ends: the source answers the moved status, the
//! source's guest left (its console disconnected, its last pipe closed) while this node's guest
//! is here, the source cannot be reached, or the stream's actor ended it (the switchover
//! timeout). Everything it reads goes to the stream's actor as [`ImportStep`]s, one at a time
//! (the actor logs them at their offsets): an import holds at most one message in memory. It
//! never writes a file and never holds the guest's output itself (the actor does).

use super::{moved_of, Moved};
use crate::config::MigrationConfig;
use crate::error::Error;
use crate::log_owner::{ImportOver, ImportStep, LogHandle};
use crate::logfile::index::EventKind;
use crate::proto::{self, console_client::ConsoleClient, read_history_request, HistoryChunk};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Connection attempts to a source whose stream broke (a source restarting or upgrading
/// answers `UNAVAILABLE` and comes back): after these, the import ends with a gap.
const ATTEMPTS: u32 = 3;
/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// How often the import looks whether it should end without a message from the source (this
/// node's guest arrived after the source's left; the actor ended the import).
const CHECK: Duration = Duration::from_millis(50);
/// How long the source must have sent nothing before its guest's leaving ends the import.
const QUIET: Duration = Duration::from_millis(200);
/// Longest token accepted in a `MigrateFrom`.
const MAX_TOKEN: usize = 4096;

/// The node's imports: the certificates towards the sources and the limit on imports at once.
pub struct Importer {
    config: MigrationConfig,
    places: Arc<Semaphore>,
    /// The guests imported here and where from (their tokens are checked there,
    /// [`super::tokens`]).
    pub imported: super::tokens::Imported,
}

/// Where a stream is imported from (a checked `MigrateFrom`).
#[derive(Clone, Debug)]
pub struct Source {
    /// The source's Console endpoint.
    pub node: String,
    /// The source agent's READ token for the guest.
    pub token: String,
    /// The source's end offset as its agent last saw it (0: unknown).
    pub offset: u64,
}

impl Source {
    /// `from` checked: an endpoint, a token that fits a header.
    pub fn parse(from: proto::MigrateFrom) -> Result<Self, Error> {
        let node = super::parse_endpoint("migrate_from.node", &from.node)?;
        if from.token.is_empty()
            || from.token.len() > MAX_TOKEN
            || MetadataValue::try_from(format!("Bearer {}", from.token)).is_err()
        {
            return Err(Error::InvalidArgument(format!(
                "migrate_from.token must be the READ token the source's agent issued for the \
                 guest (Agent.IssueToken there): printable ASCII, at most {MAX_TOKEN} bytes"
            )));
        }
        Ok(Self {
            node,
            token: from.token,
            offset: from.offset,
        })
    }
}

/// One stream to import.
pub struct Import {
    pub guest: String,
    pub stream: String,
    pub source: Source,
    /// The stream's actor, which logs what is imported.
    pub log: LogHandle,
    /// Whether this node's guest is there (its console connected, a pipe handed over).
    pub guest_here: Arc<dyn Fn() -> bool + Send + Sync>,
    /// A console (its source's guest leaving is a disconnection), or a pipe stream (its last
    /// pipe closing).
    pub console: bool,
    /// Offsets the destination keeps (its cap): the most imported.
    pub cap: u64,
    /// The record of the import under way (`state/guests/<guest>/<stream>.import`), so that a
    /// restart resumes it; removed when it ends.
    pub marker: std::path::PathBuf,
}

/// What the marker of an import under way holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    node: String,
    token: String,
    #[serde(default)]
    offset: u64,
}

impl Importer {
    pub fn new(config: &MigrationConfig) -> Self {
        Self {
            config: config.clone(),
            places: Arc::new(Semaphore::new(config.max_imports as usize)),
            imported: super::tokens::Imported::default(),
        }
    }

    /// Asks `node` whether `token` is good for `guest` (`device`): a `ReadHistory` from past
    /// any end, which that node answers `OUT_OF_RANGE` (or with the moved status) only after
    /// checking the token as for any call; its refusal, or `UNAVAILABLE` when it cannot be
    /// asked.
    pub async fn ask_source(
        &self,
        node: &str,
        guest: &str,
        device: Option<&str>,
        token: &str,
        hops: u32,
    ) -> Result<(), tonic::Status> {
        let channel = self
            .connect(node)
            .await
            .map_err(tonic::Status::unavailable)?;
        let mut request = tonic::Request::new(proto::ReadHistoryRequest {
            guest: guest.to_owned(),
            stream: device.unwrap_or_default().to_owned(),
            start: Some(read_history_request::Start::FromOffset(u64::MAX)),
            ..Default::default()
        });
        let bearer = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| tonic::Status::unauthenticated("the token is not a header value"))?;
        request.metadata_mut().insert("authorization", bearer);
        request
            .metadata_mut()
            .insert(super::tokens::HOPS_HEADER, MetadataValue::from(hops));
        let answer = tokio::time::timeout(
            self.config.connect_timeout.get(),
            ConsoleClient::new(channel).read_history(request),
        )
        .await
        .map_err(|_| tonic::Status::unavailable("no answer within migration.connect_timeout"))?;
        match answer {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::OutOfRange => Ok(()),
            Err(status) if moved_of(&status).is_some() => Ok(()),
            Err(status) => Err(status),
        }
    }

    /// A place for one more import, or the refusal naming the limit.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, Error> {
        if self.config.ca.is_none() {
            return Err(Error::InvalidArgument(
                "this node imports from no other node: migration.ca (the CA of the other \
                 nodes' server certificates) is not set in its config"
                    .into(),
            ));
        }
        self.places
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::LimitReached {
                limit: "migration.max_imports",
                value: u64::from(self.config.max_imports),
            })
    }

    /// The TLS settings towards the sources, from the files (read at each import, so a
    /// renewed certificate is used by the next one).
    fn tls(&self) -> Result<ClientTlsConfig, String> {
        let read = |key: &str, path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {key}: {e}"))
        };
        let ca = self.config.ca.as_ref().ok_or("migration.ca is not set")?;
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("migration.ca", ca)?));
        if let (Some(cert), Some(key)) = (&self.config.cert, &self.config.key) {
            tls = tls.identity(Identity::from_pem(
                read("migration.cert", cert)?,
                read("migration.key", key)?,
            ));
        }
        Ok(tls)
    }

    /// Connects to `node` (bounded by `migration.connect_timeout`, handshake included).
    async fn connect(&self, node: &str) -> Result<Channel, String> {
        let window = u32::try_from(self.config.buffer.bytes()).unwrap_or(u32::MAX);
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(self.config.connect_timeout.get()));
        let keepalive = self.config.keepalive.get();
        let endpoint = Endpoint::from_shared(format!("https://{node}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(self.config.connect_timeout.get())
            .initial_stream_window_size(window)
            .initial_connection_window_size(window)
            .http2_keep_alive_interval(keepalive)
            .keep_alive_timeout(keepalive)
            .keep_alive_while_idle(true)
            .tls_config(self.tls()?)
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(
            self.config.connect_timeout.get(),
            endpoint.connect_with_connector(tcp),
        )
        .await
        .map_err(|_| {
            format!(
                "no connection within migration.connect_timeout ({})",
                self.config.connect_timeout
            )
        })?
        .map_err(|e| crate::error::error_chain(&e))
    }

    /// Runs `import` on its own task, holding `place` (if any) until it is over; its marker
    /// records it meanwhile.
    pub fn spawn(self: &Arc<Self>, import: Import, place: Option<OwnedSemaphorePermit>) {
        if let Ok(mut from) = import.log.stats.migrating_from.lock() {
            from.clone_from(&import.source.node);
        }
        self.imported.insert(&import.guest, &import.source.node);
        // Kept while the stream exists: the source's tokens are checked there after a restart.
        let imported = import.marker.with_extension("imported");
        if let Err(e) = crate::logfile::write_atomically(&imported, import.source.node.as_bytes()) {
            tracing::warn!(path = %imported.display(), error = %e, "cannot record where a guest was imported from: its source's tokens stop working here at a restart");
        }
        let marker = Marker {
            node: import.source.node.clone(),
            token: import.source.token.clone(),
            offset: import.source.offset,
        };
        let bytes = serde_json::to_vec(&marker).expect("markers serialize");
        if let Err(e) = crate::logfile::write_atomically(&import.marker, &bytes) {
            // The import runs; only a restart would not resume it.
            tracing::warn!(path = %import.marker.display(), error = %e, "cannot record the import under way");
        }
        let importer = self.clone();
        let span = tracing::info_span!("import", guest = %import.guest, stream = %import.stream, from = %import.source.node);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _place = place;
                let log = import.log.clone();
                let detail = importer.run(&import).await;
                // Refused if the actor ended the import already (switchover timeout, close).
                let _ = log.import(ImportStep::End { detail }).await;
                if let Err(e) = std::fs::remove_file(&import.marker) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %import.marker.display(), error = %e, "cannot remove the record of an import");
                    }
                }
            },
            span,
        ));
    }

    /// Resumes the imports that were under way when the daemon last stopped (restart, upgrade,
    /// takeover): each continues from its stream's end. One whose marker cannot be read ends
    /// at once (MIGRATED_IN says why).
    pub fn resume(self: &Arc<Self>, guests: &crate::guests::Guests) {
        // Where each guest imported here came from: its source's tokens are checked there.
        for (guest, node) in guests.imported_records() {
            self.imported.insert(&guest, &node);
        }
        for (guest, stream, actor) in guests.take_pending_imports() {
            let marker = guests.import_marker(&guest, &stream);
            let log = actor.log().clone();
            let read = std::fs::read(&marker)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Marker>(&bytes).ok());
            let Some(read) = read else {
                tracing::warn!(
                    guest,
                    stream,
                    "the record of an import under way is unreadable: the import ends"
                );
                tokio::spawn(async move {
                    let _ = log
                        .import(ImportStep::End {
                            detail: "the record of the import was lost in a restart".into(),
                        })
                        .await;
                    let _ = std::fs::remove_file(&marker);
                });
                continue;
            };
            let guest_here = guest_here(&actor);
            let cap = crate::names::GuestName::parse(guest.as_str())
                .ok()
                .zip(crate::names::StreamName::parse(stream.as_str()).ok())
                .and_then(|(g, s)| guests.disk_cap(&g, &s))
                .unwrap_or(u64::MAX);
            tracing::info!(guest, stream, from = %read.node, "resuming an import after a restart");
            // Admitted before the restart: it runs even if the places are taken.
            let place = self.places.clone().try_acquire_owned().ok();
            self.spawn(
                Import {
                    guest,
                    stream,
                    source: Source {
                        node: read.node,
                        token: read.token,
                        offset: read.offset,
                    },
                    log,
                    guest_here,
                    console: matches!(actor, crate::guests::Actor::Console(_)),
                    cap,
                    marker,
                },
                place,
            );
        }
    }

    /// Imports until the source's stream is done; returns what MIGRATED_IN says.
    async fn run(&self, import: &Import) -> String {
        let from = &import.source.node;
        let mut state = State::default();
        let mut last_error = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            match self.follow(import, &mut state).await {
                Ok(Ended::Moved(moved)) => {
                    let end = import.log.stats.end_offset.load(Relaxed);
                    if moved.offset > end {
                        let _ = import
                            .log
                            .import(ImportStep::Gap { to: moved.offset })
                            .await;
                        return format!(
                            "from {from}: the source moved the stream here at offset {}; \
                             offsets {end}..{} were not received",
                            moved.offset, moved.offset
                        );
                    }
                    return format!("from {from}: the source moved the stream here");
                }
                Ok(Ended::SourceGuestLeft) => {
                    return format!("from {from}: the guest left the source and is here")
                }
                Ok(Ended::ByActor) => return String::new(),
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "the import from the source broke");
                    last_error = e;
                }
            }
        }
        // The source cannot be reached: what its agent last saw of its end is a gap here.
        let end = import.log.stats.end_offset.load(Relaxed);
        if import.source.offset > end {
            let _ = import
                .log
                .import(ImportStep::Gap {
                    to: import.source.offset,
                })
                .await;
            format!(
                "from {from}: the source could not be reached ({last_error}); offsets \
                 {end}..{} (its end as its agent last saw it) were not imported",
                import.source.offset
            )
        } else {
            format!(
                "from {from}: the source could not be reached ({last_error}); the import \
                 stopped at offset {end} (migrate_from.offset gave no later end)"
            )
        }
    }

    /// One `ReadHistory` on the source from this log's end, applied until it ends.
    async fn follow(&self, import: &Import, state: &mut State) -> Result<Ended, String> {
        if import
            .log
            .stats
            .migrating_from
            .lock()
            .map_or(true, |f| f.is_empty())
        {
            return Ok(Ended::ByActor);
        }
        let channel = self.connect(&import.source.node).await?;
        let end = import.log.stats.end_offset.load(Relaxed);
        if end > 0 && !state.received && state.known_before.is_none() {
            // The stream has offsets of its own (it migrates back here, or the import
            // resumes): the events at its end that predate the import are its own already.
            state.known_before = Some((end, crate::clock::now().wall_ns));
        }
        let start = if end > 0 || state.received {
            read_history_request::Start::FromOffset(end)
        } else {
            read_history_request::Start::TailBytes(import.cap)
        };
        let mut request = tonic::Request::new(proto::ReadHistoryRequest {
            guest: import.guest.clone(),
            stream: import.stream.clone(),
            start: Some(start),
            follow: true,
            events: true,
            marks: true,
            ..Default::default()
        });
        let bearer = MetadataValue::try_from(format!("Bearer {}", import.source.token))
            .map_err(|e| e.to_string())?;
        request.metadata_mut().insert("authorization", bearer);
        let limit = usize::try_from(self.config.buffer.bytes()).unwrap_or(usize::MAX);
        let mut client = ConsoleClient::new(channel).max_decoding_message_size(limit);
        let mut chunks = match client.read_history(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return ended_by(&status),
        };
        let mut check = tokio::time::interval(CHECK);
        let mut last_message = tokio::time::Instant::now();
        loop {
            let message = tokio::select! {
                message = chunks.message() => message,
                _ = check.tick() => {
                    if import.log.stats.migrating_from.lock().map_or(true, |f| f.is_empty()) {
                        return Ok(Ended::ByActor);
                    }
                    // Only once the source has been quiet: its history comes as fast as it can
                    // be read, so a pause means the import is at the source's live end (an
                    // old disconnection in the history is no reason to end).
                    if state.source_guest_gone
                        && last_message.elapsed() >= QUIET
                        && (import.guest_here)()
                    {
                        return Ok(Ended::SourceGuestLeft);
                    }
                    continue;
                }
            };
            let chunk = match message {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Err("the source ended the stream without a status".into()),
                Err(status) => return ended_by(&status),
            };
            state.received = true;
            last_message = tokio::time::Instant::now();
            if self.apply(import, state, chunk).await.is_err() {
                return Ok(Ended::ByActor);
            }
        }
    }

    /// Hands one chunk of the source's history to the actor.
    async fn apply(
        &self,
        import: &Import,
        state: &mut State,
        chunk: HistoryChunk,
    ) -> Result<(), ImportOver> {
        // Tests slow the import down here, so the guest prints while it runs.
        crate::fault::point("migration.import.apply");
        if let Some(event) = chunk.event {
            let Some(kind) = u8::try_from(event.kind).ok().and_then(EventKind::from_code) else {
                return Ok(());
            };
            match kind {
                EventKind::GuestDisconnected if import.console => state.source_guest_gone = true,
                EventKind::GuestConnected if import.console => state.source_guest_gone = false,
                EventKind::PipeClosed if !import.console => {
                    state.source_guest_gone = event.detail.starts_with("0 ");
                }
                EventKind::PipeOpened if !import.console => state.source_guest_gone = false,
                _ => {}
            }
            let unix_nanos = event
                .time
                .map_or(0, |t| t.seconds * 1_000_000_000 + i64::from(t.nanos));
            if state
                .known_before
                .is_some_and(|(offset, started)| event.offset == offset && unix_nanos < started)
            {
                return Ok(());
            }
            import
                .log
                .import(ImportStep::Event {
                    kind,
                    unix_nanos,
                    detail: event.detail,
                })
                .await?;
            return Ok(());
        }
        if let Some(gap) = chunk.gap {
            import
                .log
                .import(ImportStep::Gap { to: gap.to_offset })
                .await?;
            return Ok(());
        }
        if chunk.data.is_empty() {
            return Ok(());
        }
        // Bytes after a disconnection: a guest prints there again.
        state.source_guest_gone = false;
        let marks = chunk
            .marks
            .iter()
            .map(|m| (m.offset, m.unix_nanos))
            .collect();
        import
            .log
            .import(ImportStep::Data {
                offset: chunk.offset,
                data: chunk.data,
                marks,
            })
            .await?;
        Ok(())
    }
}

/// What an import learnt from the source so far.
#[derive(Default)]
struct State {
    /// Something came from the source (a later attempt resumes by offset, not by tail).
    received: bool,
    /// The source's guest left (its console disconnected, its last pipe closed) and did not
    /// come back.
    source_guest_gone: bool,
    /// (offset, time): the stream had offsets up to here before the import started (at that
    /// time); the source's events there from before are not imported again.
    known_before: Option<(u64, i64)>,
}

/// How one follow of the source ended.
enum Ended {
    /// The source answered the moved status: it has sent everything.
    Moved(Moved),
    /// The source's guest left while this node's is here.
    SourceGuestLeft,
    /// The actor ended the import (switchover timeout, the stream closed).
    ByActor,
}

/// Whether the guest of `actor`'s stream is on this node: its console connected, or a pipe
/// handed over.
pub fn guest_here(actor: &crate::guests::Actor) -> Arc<dyn Fn() -> bool + Send + Sync> {
    match actor {
        crate::guests::Actor::Console(handle) => {
            let console = handle.console.clone();
            Arc::new(move || console.guest_connected.load(Relaxed))
        }
        crate::guests::Actor::Pipe(handle) => {
            let stats = handle.log.stats.clone();
            Arc::new(move || stats.writers.load(Relaxed) > 0)
        }
    }
}

/// A status from the source: the moved status ends the import; anything else is an error.
fn ended_by(status: &tonic::Status) -> Result<Ended, String> {
    match moved_of(status) {
        Some(moved) => Ok(Ended::Moved(moved)),
        None => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}
