//! Handlers of the `conlog.v1.Agent` service (local socket only).
//!
//! Each handler identifies the peer (SO_PEERCRED), validates the request and calls the module
//! that owns the work: [`crate::guests`] for streams, [`crate::handoff`] for pipes. Handlers
//! hold no state of their own.

use crate::config::{Config, LogMode};
use crate::error::{Error, Result};
use crate::guests::{Actor, Guests, LimitsOverride, StreamKind, StreamSnapshot};
use crate::handoff::{create_pipe, Handoffs};
use crate::names;
use crate::proto::{self, agent_server::Agent};
use std::path::PathBuf;
use std::sync::Arc;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

/// The Agent service.
#[derive(Clone)]
pub struct AgentService {
    pub config: Arc<Config>,
    pub guests: Arc<Guests>,
    pub handoffs: Arc<Handoffs>,
    /// Absolute path of fd.sock, returned to clients.
    pub fd_socket: PathBuf,
    /// Where `Upgrade` requests go (the daemon's main loop).
    pub upgrades: tokio::sync::mpsc::Sender<crate::daemon::UpgradeRequest>,
}

/// Logs who called `method` (pid, uid, gid of the local peer).
fn log_peer<T>(request: &Request<T>, method: &'static str) {
    let cred = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred);
    match cred {
        Some(cred) => tracing::info!(
            method,
            peer_pid = cred.pid().unwrap_or(-1),
            peer_uid = cred.uid(),
            peer_gid = cred.gid(),
            "agent call"
        ),
        None => tracing::info!(method, "agent call from unidentified peer"),
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
    Ok(LimitsOverride {
        max_size: limits.max_size,
        max_backups: limits.max_backups,
        mode,
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
        writers: f.writers as u32,
        clients: f.clients as u32,
        guest_connected: f.guest_connected,
        dropped_bytes: f.dropped,
        rotations: f.rotations,
        broken: f.broken,
    }
}

impl AgentService {
    async fn create_log_pipe(
        &self,
        request: proto::CreateLogPipeRequest,
    ) -> Result<proto::CreateLogPipeResponse> {
        names::validate_guest(&request.guest)?;
        let stream = names::stream_or_default(&request.stream, names::DEFAULT_PIPE_STREAM)?;
        let limits = limits_from_proto(request.limits)?;
        let opened = self
            .guests
            .open_stream(&request.guest, stream, StreamKind::Pipe, limits)
            .await?;
        let (Actor::Pipe(handle), log_path) = (opened.actor, opened.log_path) else {
            unreachable!("open_stream returns the kind asked for");
        };
        let pipe = create_pipe(self.config.handoff.pipe_buffer.bytes() as usize)
            .map_err(|e| Error::io("cannot create a pipe", e))?;
        let offset = handle
            .add_pipe(pipe.read_end)
            .await
            .map_err(|e| Error::io("cannot attach the pipe to its stream", e))?;
        // If this fails the write end is dropped here and the stream sees end-of-file.
        let token = self
            .handoffs
            .register(&request.guest, stream, pipe.write_end)?;
        tracing::info!(guest = %request.guest, stream, offset, "log pipe created");
        Ok(proto::CreateLogPipeResponse {
            handoff_token: token,
            fd_socket: self.fd_socket.display().to_string(),
            log_path: log_path.display().to_string(),
            offset,
            expires_in_ms: self.handoffs.ttl().as_millis() as u64,
        })
    }

    async fn list_guests(
        &self,
        request: proto::ListGuestsRequest,
    ) -> Result<proto::ListGuestsResponse> {
        let filter = (!request.guest.is_empty()).then_some(request.guest.as_str());
        if let Some(name) = filter {
            names::validate_guest(name)?;
        }
        let guests = self.guests.list(filter).await?;
        Ok(proto::ListGuestsResponse {
            guests: guests
                .into_iter()
                .map(|(name, streams)| proto::GuestInfo {
                    name,
                    streams: streams.into_iter().map(stream_info).collect(),
                })
                .collect(),
        })
    }

    async fn create_console(
        &self,
        request: proto::CreateConsoleRequest,
    ) -> Result<proto::CreateConsoleResponse> {
        names::validate_guest(&request.guest)?;
        let device = names::stream_or_default(&request.device, names::DEFAULT_CONSOLE_DEVICE)?;
        let limits = limits_from_proto(request.limits)?;
        let opened = self
            .guests
            .open_stream(&request.guest, device, StreamKind::Console, limits)
            .await?;
        let Actor::Console(handle) = opened.actor else {
            unreachable!("open_stream returns the kind asked for");
        };
        Ok(proto::CreateConsoleResponse {
            guest_socket: handle.paths.guest_socket.display().to_string(),
            client_socket: handle.paths.client_socket.display().to_string(),
            log_path: opened.log_path.display().to_string(),
            offset: handle
                .stats
                .end_offset
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    async fn remove_guest(
        &self,
        request: proto::RemoveGuestRequest,
    ) -> Result<proto::RemoveGuestResponse> {
        names::validate_guest(&request.guest)?;
        self.handoffs.forget_guest(&request.guest);
        let streams_removed = self.guests.remove_guest(&request.guest).await?;
        Ok(proto::RemoveGuestResponse { streams_removed })
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
        Err(Error::Unimplemented("Agent.IssueToken").into())
    }

    async fn upgrade(
        &self,
        request: Request<proto::UpgradeRequest>,
    ) -> Result<Response<proto::UpgradeResponse>, Status> {
        log_peer(&request, "Upgrade");
        let (reply, answer) = tokio::sync::oneshot::channel();
        let unavailable =
            || Error::Unavailable("The daemon is already stopping or upgrading".into());
        self.upgrades.send(reply).await.map_err(|_| unavailable())?;
        match answer.await.map_err(|_| unavailable())? {
            Ok(pid) => Ok(Response::new(proto::UpgradeResponse { pid })),
            Err(why) => Err(Error::FailedPrecondition(format!("Upgrade refused: {why}")).into()),
        }
    }
}
