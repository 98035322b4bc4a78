//! What several scenarios do the same way with a daemon and its files: the scratch directory,
//! creating and claiming log pipes, creating consoles and connecting their guest, reading a stream's counters from `ListGuests`, waiting for
//! a stream or a listing, and hanging up before a daemon is stopped.
//!
//! Client-side only: nothing here starts or stops a daemon ([`crate::daemon`] does) or times
//! anything (each scenario owns its clock).

use anyhow::{bail, Context};
use conlog::proto::agent_client::AgentClient;
use conlog::proto::{
    Access, CreateConsoleRequest, CreateConsoleResponse, CreateLogPipeRequest,
    CreateLogPipeResponse, IssueTokenRequest, ListGuestsRequest, LogLimits, LogMode, StreamInfo,
};
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Longest any single wait for a stream's state may take.
pub const DEADLINE: Duration = Duration::from_secs(120);
/// Largest `ListGuests` answer accepted (tens of thousands of streams).
pub const MAX_MESSAGE: usize = 256 << 20;

/// A scratch directory removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `conlog-bench-NAME.PID` under `parent`, empty.
    pub fn create(parent: &Path, name: &str) -> anyhow::Result<Self> {
        let dir = parent.join(format!("conlog-bench-{name}.{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The conlogd version line, for the report.
pub fn version(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Limits that rotate at `max_size` keeping `max_backups` files.
pub fn rotating(max_size: u64, max_backups: u32) -> LogLimits {
    LogLimits {
        max_size: Some(max_size),
        max_backups: Some(max_backups),
        mode: LogMode::Rotate.into(),
        compress: None,
        max_age_seconds: None,
    }
}

/// `CreateLogPipe` for `guest/stream`, its write end claimed through `fd.sock` as QEMU's
/// launcher would: the write end, and the answer (log path, socket, token).
pub async fn create_pipe(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    stream: &str,
    limits: Option<LogLimits>,
) -> anyhow::Result<(OwnedFd, CreateLogPipeResponse)> {
    let created = agent
        .create_log_pipe(CreateLogPipeRequest {
            guest: guest.into(),
            stream: stream.into(),
            limits,
            ..Default::default()
        })
        .await
        .context("CreateLogPipe failed")?
        .into_inner();
    let fd = conlog::client::receive_pipe(Path::new(&created.fd_socket), &created.handoff_token)
        .context("cannot claim the pipe from fd.sock")?;
    Ok((fd, created))
}

/// `CreateConsole` for `guest/device` (empty: the default device), its guest socket connected
/// as QEMU would (the daemon binds it before it answers): the guest's end, and the answer.
pub async fn create_console(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    device: &str,
    limits: Option<LogLimits>,
) -> anyhow::Result<(UnixStream, CreateConsoleResponse)> {
    let created = agent
        .create_console(CreateConsoleRequest {
            guest: guest.into(),
            device: device.into(),
            limits,
            ..Default::default()
        })
        .await
        .context("CreateConsole failed")?
        .into_inner();
    let guest_end = UnixStream::connect(&created.guest_socket)
        .with_context(|| format!("cannot connect to {}", created.guest_socket))?;
    Ok((guest_end, created))
}

/// A token for `guest` (every device) with `access`, valid for an hour: what a remote client
/// of the guest's tenant presents.
pub async fn issue_token(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    access: Access,
) -> anyhow::Result<String> {
    let issued = agent
        .issue_token(IssueTokenRequest {
            guest: guest.into(),
            device: String::new(),
            access: access.into(),
            ttl_seconds: 3600,
        })
        .await
        .context("IssueToken failed")?;
    Ok(issued.into_inner().token)
}

/// `guest/stream` as `ListGuests` shows it.
pub async fn stream_info(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    stream: &str,
) -> anyhow::Result<StreamInfo> {
    let guests = agent
        .list_guests(ListGuestsRequest {
            guest: guest.into(),
        })
        .await
        .context("ListGuests failed")?
        .into_inner();
    guests
        .guests
        .into_iter()
        .flat_map(|g| g.streams)
        .find(|s| s.name == stream)
        .with_context(|| format!("{guest}/{stream} is missing from ListGuests"))
}

/// Polls `ListGuests` every `poll` until `done` holds (bounded by [`DEADLINE`]).
pub async fn wait_stream(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    stream: &str,
    poll: Duration,
    what: &str,
    done: impl Fn(&StreamInfo) -> bool,
) -> anyhow::Result<StreamInfo> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let info = stream_info(agent, guest, stream).await?;
        if done(&info) {
            return Ok(info);
        }
        if Instant::now() > deadline {
            bail!("{guest}/{stream}: not {what} after {DEADLINE:?}: {info:?}");
        }
        tokio::time::sleep(poll).await;
    }
}

/// Polls, every `poll` and on a new connection each time (a restarting or upgrading daemon
/// refuses or drops connections), until the daemon on `socket` lists exactly `guests` guests;
/// the client that saw it (its caller takes the time, then [`hang_up`]s), or an error at
/// `deadline`.
pub async fn wait_listed(
    socket: &Path,
    guests: usize,
    poll: Duration,
    deadline: Instant,
) -> anyhow::Result<AgentClient<Channel>> {
    loop {
        if let Ok(channel) = conlog::client::connect_local(socket).await {
            let mut agent = AgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
            if let Ok(reply) = agent.list_guests(ListGuestsRequest::default()).await {
                if reply.into_inner().guests.len() == guests {
                    return Ok(agent);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the daemon did not list {guests} guests in time");
        }
        tokio::time::sleep(poll).await;
    }
}

/// Drops a client and gives its connection's task a moment to close the socket: a daemon
/// stopped afterwards would otherwise wait for the call to end (up to its drain timeout).
pub async fn hang_up<T>(client: T) {
    drop(client);
    tokio::time::sleep(Duration::from_millis(20)).await;
}
