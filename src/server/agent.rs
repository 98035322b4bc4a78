//! Handlers of the `conlog.v1.Agent` service (local socket only).
//!
//! Each handler identifies the peer (SO_PEERCRED), validates the request and calls the module
//! that owns the work: [`crate::guests`] for streams, [`crate::handoff`] for pipes. Handlers
//! hold no state of their own.

use super::conn::{ConnInfo, Peer};
use crate::config::{Config, LogMode};
use crate::console::Protocol;
use crate::error::{Error, Result};
use crate::guests::{Actor, Guests, LimitsOverride, StreamKind, StreamSnapshot};
use crate::handoff::{create_pipe, Handoffs};
use crate::log_owner::LogError;
use crate::logfile::Compression;
use crate::migration::import::{Import, Importer, Source};
use crate::names::{self, GuestName, StreamName};
use crate::proto::{self, agent_server::Agent};
use crate::tokens::{Access, Grant, TokenKey};
use crate::upgrade::trigger::Trigger;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The Agent service.
#[derive(Clone)]
pub struct AgentService {
    pub config: Arc<Config>,
    pub guests: Arc<Guests>,
    pub handoffs: Arc<Handoffs>,
    /// Absolute path of fd.sock, returned to clients.
    pub fd_socket: PathBuf,
    /// Asks the daemon's main loop for an upgrade.
    pub upgrades: Trigger,
    /// Signs console tokens.
    pub tokens: Arc<TokenKey>,
    /// Imports streams of guests that live-migrate here.
    pub importer: Arc<Importer>,
}

/// Agent-call log lines per call site and second; a local caller that goes beyond is told
/// about by `suppressed = N` ([`crate::ratelimit`]).
const AUDIT_BURST: u64 = crate::ratelimit::Throttle::AUDIT_BURST;

/// Logs who called `method` (pid, uid, gid of the local peer from SO_PEERCRED).
fn log_peer<T>(request: &Request<T>, method: &'static str) {
    match request
        .extensions()
        .get::<ConnInfo>()
        .map(|info| &info.peer)
    {
        Some(Peer::Local { pid, uid, gid }) => crate::limited!(
            burst: AUDIT_BURST,
            info,
            method,
            peer_pid = pid.unwrap_or(-1),
            peer_uid = uid.map_or(-1, i64::from),
            peer_gid = gid.map_or(-1, i64::from),
            "agent call"
        ),
        _ => crate::limited!(burst: AUDIT_BURST, info, method, "agent call from unidentified peer"),
    }
}

fn limits_from_proto(limits: Option<proto::LogLimits>) -> Result<LimitsOverride> {
    let Some(limits) = limits else {
        return Ok(LimitsOverride::default());
    };
    let mode = match proto::LogMode::try_from(limits.mode) {
        Ok(proto::LogMode::Unspecified) => None,
        Ok(proto::LogMode::Rotate) => Some(LogMode::Rotate),
        Ok(proto::LogMode::Truncate) => Some(LogMode::Truncate),
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "limits.mode {} is not a LogMode (ROTATE = 1, TRUNCATE = 2)",
                limits.mode
            )))
        }
    };
    let compress = match limits.compress.map(proto::Compression::try_from) {
        None | Some(Ok(proto::Compression::Unspecified)) => None,
        Some(Ok(proto::Compression::None)) => Some(Compression::None),
        Some(Ok(proto::Compression::Zstd)) => Some(Compression::Zstd),
        Some(Err(_)) => {
            return Err(Error::InvalidArgument(format!(
                "limits.compress {} is not a Compression (NONE = 1, ZSTD = 2)",
                limits.compress.unwrap_or_default()
            )))
        }
    };
    Ok(LimitsOverride {
        max_size: limits.max_size,
        max_backups: limits.max_backups,
        mode,
        compress,
        max_age: limits.max_age_seconds,
    })
}

fn stream_info(s: StreamSnapshot) -> proto::StreamInfo {
    let mode = match s.limits.mode {
        LogMode::Rotate => proto::LogMode::Rotate,
        LogMode::Truncate => proto::LogMode::Truncate,
    };
    let (kind, open) = match s.kind {
        StreamKind::Pipe => (proto::StreamKind::Pipe, s.figures.writers > 0),
        StreamKind::Console => (proto::StreamKind::Console, true),
    };
    let f = s.figures;
    let writer = f
        .attached
        .iter()
        .find(|c| c.writer)
        .map(|c| c.label.clone());
    proto::StreamInfo {
        name: s.name,
        kind: kind.into(),
        offset: f.end_offset,
        first_offset: f.first_offset,
        open,
        log_path: s.log_path.display().to_string(),
        bytes_on_disk: f.bytes_on_disk,
        max_size: s.limits.max_size,
        max_backups: s.limits.max_backups,
        mode: mode.into(),
        // Saturating: pipes and clients are bounded by the limits.
        writers: u32::try_from(f.writers).unwrap_or(u32::MAX),
        clients: u32::try_from(f.attached.len()).unwrap_or(u32::MAX),
        guest_connected: f.guest_connected,
        dropped_bytes: f.dropped,
        rotations: f.rotations,
        broken: f.broken,
        writer: writer.unwrap_or_default(),
        attached: f.attached.into_iter().map(|c| c.label).collect(),
        raw_bytes: f.raw_bytes,
        backups: f.backups,
        compression_backlog_bytes: f.compression_backlog,
        // A live stream has not moved (a moved one is listed from its tombstone).
        moved_to: String::new(),
        migrating_from: f.migrating_from,
    }
}

/// The guests with a directory of logs (live, removed or moved streams), by name.
fn guests_with_logs(guests: &Guests) -> Vec<String> {
    let Some(log_dir) = guests.guest_log_dir("-").parent().map(Path::to_owned) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(log_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| GuestName::parse(name.as_str()).is_ok())
        .collect();
    names.sort();
    names
}

/// The streams of `guest` that moved to another node and whose redirect is kept: listed with
/// `moved_to` and the offset where the destination continues (docs/design.md, "Live migration").
fn moved_streams(guests: &Guests, guest: &str) -> Vec<proto::StreamInfo> {
    let mut moved: Vec<proto::StreamInfo> = crate::tombstone::list(&guests.guest_log_dir(guest))
        .into_iter()
        .filter_map(|(stream, tombstone)| {
            let to = tombstone.moved()?;
            Some(proto::StreamInfo {
                log_path: guests.log_path(guest, &stream).display().to_string(),
                name: stream,
                offset: to.offset,
                moved_to: to.to,
                ..Default::default()
            })
        })
        .collect();
    moved.sort_by(|a, b| a.name.cmp(&b.name));
    moved
}

impl AgentService {
    /// The checked `migrate_from` of a create call and a place for its import; `None` without
    /// one. A stream with `migrate_from` is created by it: one that exists already is refused,
    /// unless it is importing from that very node (the call is repeated: nothing new starts).
    async fn migration(
        &self,
        guest: &GuestName,
        stream: &StreamName,
        from: Option<proto::MigrateFrom>,
    ) -> Result<Option<(Source, tokio::sync::OwnedSemaphorePermit)>> {
        let Some(from) = from else {
            return Ok(None);
        };
        let source = Source::parse(from)?;
        if let Ok((_, live)) = self.guests.stream(guest, Some(stream)).await {
            let importing = live
                .stats
                .migrating_from
                .lock()
                .map(|from| from.clone())
                .unwrap_or_default();
            if importing == source.node {
                return Ok(None);
            }
            return Err(Error::InvalidArgument(format!(
                "{guest}/{stream} already exists on this node: migrate_from creates the stream                  (remove it first, with delete_logs to abort a migration)"
            )));
        }
        let place = self.importer.admit()?;
        Ok(Some((source, place)))
    }

    /// Starts importing the created stream `guest/stream` (fed by `actor`) from `source`.
    fn start_import(
        &self,
        guest: &GuestName,
        stream: &StreamName,
        source: Source,
        place: tokio::sync::OwnedSemaphorePermit,
        actor: &Actor,
    ) {
        let cap = self.guests.disk_cap(guest, stream).unwrap_or(u64::MAX);
        let (log, console) = (actor.log().clone(), matches!(actor, Actor::Console(_)));
        let guest_here = crate::migration::import::guest_here(actor);
        let marker = self.guests.import_marker(guest.as_str(), stream.as_str());
        crate::limited!(burst: AUDIT_BURST, info, guest = %guest, stream = %stream, from = %source.node, "importing a migrating guest's stream");
        self.importer.spawn(
            Import {
                guest: guest.to_string(),
                stream: stream.to_string(),
                source,
                log,
                guest_here,
                console,
                cap,
                marker,
            },
            Some(place),
        );
    }

    fn issue_token(&self, request: proto::IssueTokenRequest) -> Result<proto::IssueTokenResponse> {
        let guest = GuestName::parse(request.guest)?;
        let device = if request.device.is_empty() {
            None
        } else {
            Some(StreamName::parse(request.device)?)
        };
        let access = match proto::Access::try_from(request.access) {
            Ok(proto::Access::Read) => Access::Read,
            Ok(proto::Access::ReadWrite) => Access::ReadWrite,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "access {} is not an Access (READ = 1, READ_WRITE = 2)",
                    request.access
                )))
            }
        };
        let max_ttl = self.config.tokens.max_ttl.get().as_secs();
        if !(1..=max_ttl).contains(&request.ttl_seconds) {
            return Err(Error::InvalidArgument(format!(
                "ttl_seconds must be between 1 and {max_ttl} (tokens.max_ttl; got {})",
                request.ttl_seconds
            )));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let expires_unix = now + request.ttl_seconds;
        let token = self.tokens.issue(Grant {
            guest: guest.into(),
            device: device.map(String::from),
            access,
            expires_unix,
            key_id: String::new(),
            issued_unix: None,
            node: None,
        });
        Ok(proto::IssueTokenResponse {
            token,
            expires_at_unix: expires_unix,
        })
    }

    async fn create_log_pipe(
        &self,
        request: proto::CreateLogPipeRequest,
    ) -> Result<proto::CreateLogPipeResponse> {
        let guest = GuestName::parse(request.guest)?;
        let stream = StreamName::or_default(request.stream, names::DEFAULT_PIPE_STREAM)?;
        let limits = limits_from_proto(request.limits)?;
        let migrate = self
            .migration(&guest, &stream, request.migrate_from)
            .await?;
        // Until the write end is registered: an upgrade carries the pipe, or refuses the call.
        let _admitted = self.handoffs.admit()?;
        crate::fault::point("agent.create_log_pipe");
        let opened = self
            .guests
            .open_stream(
                &guest,
                &stream,
                StreamKind::Pipe,
                limits,
                None,
                migrate
                    .as_ref()
                    .map(|_| self.config.migration.switchover_timeout.get()),
            )
            .await?;
        let (Actor::Pipe(handle), log_path) = (opened.actor, opened.log_path) else {
            unreachable!("open_stream returns the kind asked for");
        };
        if let Some((source, place)) = migrate {
            self.start_import(&guest, &stream, source, place, &Actor::Pipe(handle.clone()));
        }
        let pipe = create_pipe(self.config.handoff.pipe_buffer.bytes_usize())
            .map_err(|e| Error::io("cannot create a pipe", e))?;
        let offset = handle.add_pipe(pipe.read_end).await.map_err(|e| match e {
            LogError::Io(e) => Error::io("cannot attach the pipe to its stream", e),
            gone => Error::Log(gone),
        })?;
        // If this fails the write end is dropped here and the stream sees end-of-file.
        let token = self.handoffs.register(&guest, &stream, pipe.write_end)?;
        // The keeper holds the read end and the write end before the token goes out: a crash
        // after the writer has its end must not break the pipe (crate::keeper).
        let _ = crate::keeper::flushed().await;
        crate::limited!(burst: AUDIT_BURST, info, guest = %guest, stream = %stream, offset, "log pipe created");
        Ok(proto::CreateLogPipeResponse {
            handoff_token: token,
            fd_socket: self.fd_socket.display().to_string(),
            log_path: log_path.display().to_string(),
            offset,
            expires_in_ms: u64::try_from(self.handoffs.ttl().as_millis()).unwrap_or(u64::MAX),
        })
    }

    async fn list_guests(
        &self,
        request: proto::ListGuestsRequest,
    ) -> Result<proto::ListGuestsResponse> {
        let filter = if request.guest.is_empty() {
            None
        } else {
            Some(GuestName::parse(request.guest)?)
        };
        let guests = match self.guests.list(filter.as_ref()).await {
            Ok(guests) => guests,
            // A guest whose streams all moved away is listed with them.
            Err(e) => match &filter {
                Some(guest) if !moved_streams(&self.guests, guest.as_str()).is_empty() => {
                    Vec::new()
                }
                _ => return Err(e.into()),
            },
        };
        let mut listed: Vec<proto::GuestInfo> = guests
            .into_iter()
            .map(|(name, streams)| proto::GuestInfo {
                name,
                streams: streams.into_iter().map(stream_info).collect(),
            })
            .collect();
        // Streams that moved away, while their redirect is kept (their tombstone: until
        // `logs.removed_retention` or the stream is created here again).
        let names: Vec<String> = match &filter {
            Some(guest) => vec![guest.as_str().to_owned()],
            None => guests_with_logs(&self.guests),
        };
        for name in names {
            let moved = moved_streams(&self.guests, &name);
            if moved.is_empty() {
                continue;
            }
            let index = match listed.iter().position(|g| g.name == name) {
                Some(index) => index,
                None => {
                    listed.push(proto::GuestInfo {
                        name: name.clone(),
                        streams: Vec::new(),
                    });
                    listed.len() - 1
                }
            };
            let streams = &mut listed[index].streams;
            for info in moved {
                if !streams.iter().any(|s| s.name == info.name) {
                    streams.push(info);
                }
            }
        }
        Ok(proto::ListGuestsResponse { guests: listed })
    }

    async fn create_console(
        &self,
        request: proto::CreateConsoleRequest,
    ) -> Result<proto::CreateConsoleResponse> {
        let guest = GuestName::parse(request.guest)?;
        let device = StreamName::or_default(request.device, names::DEFAULT_CONSOLE_DEVICE)?;
        let limits = limits_from_proto(request.limits)?;
        let protocol = match proto::ConsoleProtocol::try_from(request.protocol) {
            Ok(proto::ConsoleProtocol::Unspecified) => None,
            Ok(proto::ConsoleProtocol::Raw) => Some(Protocol::Raw),
            Ok(proto::ConsoleProtocol::Mux) => Some(Protocol::Mux),
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "protocol {} is not a ConsoleProtocol (RAW = 1, MUX = 2)",
                    request.protocol
                )))
            }
        };
        let migrate = self
            .migration(&guest, &device, request.migrate_from)
            .await?;
        let _admitted = self.handoffs.admit()?;
        let opened = self
            .guests
            .open_stream(
                &guest,
                &device,
                StreamKind::Console,
                limits,
                protocol,
                migrate
                    .as_ref()
                    .map(|_| self.config.migration.switchover_timeout.get()),
            )
            .await?;
        let Actor::Console(handle) = opened.actor else {
            unreachable!("open_stream returns the kind asked for");
        };
        if let Some((source, place)) = migrate {
            self.start_import(
                &guest,
                &device,
                source,
                place,
                &Actor::Console(handle.clone()),
            );
        }
        Ok(proto::CreateConsoleResponse {
            guest_socket: handle.paths.guest_socket.display().to_string(),
            client_socket: handle.paths.client_socket.display().to_string(),
            log_path: opened.log_path.display().to_string(),
            protocol: match handle.protocol {
                Protocol::Raw => proto::ConsoleProtocol::Raw,
                Protocol::Mux => proto::ConsoleProtocol::Mux,
            } as i32,
            offset: handle
                .log
                .stats
                .end_offset
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    async fn remove_guest(
        &self,
        request: proto::RemoveGuestRequest,
    ) -> Result<proto::RemoveGuestResponse> {
        let guest = GuestName::parse(request.guest)?;
        let stream = if request.stream.is_empty() {
            None
        } else {
            Some(StreamName::parse(request.stream)?)
        };
        let moved_to = if request.moved_to.is_empty() {
            None
        } else {
            if request.delete_logs {
                return Err(Error::InvalidArgument(
                    "moved_to keeps the logs (the destination imports them, clients are                      redirected): it cannot go with delete_logs"
                        .into(),
                ));
            }
            Some(crate::migration::parse_endpoint(
                "moved_to",
                &request.moved_to,
            )?)
        };
        let _admitted = self.handoffs.admit()?;
        match &stream {
            Some(stream) => self.handoffs.forget_stream(&guest, stream),
            None => self.handoffs.forget_guest(&guest),
        }
        let removed = self
            .guests
            .remove(&guest, stream.as_ref(), request.delete_logs, moved_to)
            .await?;
        Ok(proto::RemoveGuestResponse {
            streams_removed: removed.streams,
            logs_deleted: removed.logs_deleted,
        })
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn create_log_pipe(
        &self,
        request: Request<proto::CreateLogPipeRequest>,
    ) -> Result<Response<proto::CreateLogPipeResponse>, Status> {
        log_peer(&request, "CreateLogPipe");
        Ok(Response::new(
            self.create_log_pipe(request.into_inner()).await?,
        ))
    }

    async fn create_console(
        &self,
        request: Request<proto::CreateConsoleRequest>,
    ) -> Result<Response<proto::CreateConsoleResponse>, Status> {
        log_peer(&request, "CreateConsole");
        Ok(Response::new(
            self.create_console(request.into_inner()).await?,
        ))
    }

    async fn remove_guest(
        &self,
        request: Request<proto::RemoveGuestRequest>,
    ) -> Result<Response<proto::RemoveGuestResponse>, Status> {
        log_peer(&request, "RemoveGuest");
        Ok(Response::new(
            self.remove_guest(request.into_inner()).await?,
        ))
    }

    async fn list_guests(
        &self,
        request: Request<proto::ListGuestsRequest>,
    ) -> Result<Response<proto::ListGuestsResponse>, Status> {
        Ok(Response::new(self.list_guests(request.into_inner()).await?))
    }

    async fn issue_token(
        &self,
        request: Request<proto::IssueTokenRequest>,
    ) -> Result<Response<proto::IssueTokenResponse>, Status> {
        log_peer(&request, "IssueToken");
        Ok(Response::new(self.issue_token(request.into_inner())?))
    }

    async fn rotate_token_key(
        &self,
        request: Request<proto::RotateTokenKeyRequest>,
    ) -> Result<Response<proto::RotateTokenKeyResponse>, Status> {
        log_peer(&request, "RotateTokenKey");
        let key_id = self
            .tokens
            .rotate()
            .map_err(|e| Error::io("cannot write a new token key", e))?;
        crate::limited!(
            warn,
            key_id,
            "token key rotated: every token issued before is revoked"
        );
        Ok(Response::new(proto::RotateTokenKeyResponse { key_id }))
    }

    async fn upgrade(
        &self,
        request: Request<proto::UpgradeRequest>,
    ) -> Result<Response<proto::UpgradeResponse>, Status> {
        log_peer(&request, "Upgrade");
        let pid = self.upgrades.upgrade().await.map_err(Error::from)?;
        Ok(Response::new(proto::UpgradeResponse { pid }))
    }
}
