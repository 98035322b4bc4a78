//! Log pipes through the real API (`CreateLogPipe`, `fd.sock`, `ListGuests`), the
//! deterministic test data, and reading a stream's files on disk.

use conlog::proto::{self, agent_client::AgentClient};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tonic::transport::Channel;

use super::{DEADLINE, POLL};

/// Log limits for a request.
pub fn limits(max_size: u64, max_backups: u32, mode: proto::LogMode) -> proto::LogLimits {
    proto::LogLimits {
        max_size: Some(max_size),
        max_backups: Some(max_backups),
        mode: mode.into(),
    }
}

/// `Agent.CreateLogPipe`.
pub async fn create_pipe(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    stream: &str,
    limits: Option<proto::LogLimits>,
) -> Result<proto::CreateLogPipeResponse, tonic::Status> {
    agent
        .create_log_pipe(proto::CreateLogPipeRequest {
            guest: guest.into(),
            stream: stream.into(),
            limits,
        })
        .await
        .map(|r| r.into_inner())
}

/// Claims the write end of `reply` through its `fd.sock` (off the async threads).
pub async fn claim(reply: &proto::CreateLogPipeResponse) -> io::Result<OwnedFd> {
    claim_token(Path::new(&reply.fd_socket), &reply.handoff_token).await
}

/// Claims a write end with any token.
pub async fn claim_token(fd_socket: &Path, token: &str) -> io::Result<OwnedFd> {
    let fd_socket = fd_socket.to_owned();
    let token = token.to_owned();
    tokio::task::spawn_blocking(move || conlog::client::receive_pipe(&fd_socket, &token))
        .await
        .expect("receive_pipe task")
}

/// Creates a pipe and receives its write end; panics on any error.
pub async fn open_pipe(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    stream: &str,
    limits: Option<proto::LogLimits>,
) -> (proto::CreateLogPipeResponse, File) {
    let reply = create_pipe(agent, guest, stream, limits)
        .await
        .unwrap_or_else(|s| panic!("CreateLogPipe {guest}/{stream}: {s:?}"));
    let fd = claim(&reply)
        .await
        .unwrap_or_else(|e| panic!("hand-off of {guest}/{stream}: {e}"));
    (reply, File::from(fd))
}

/// Writes `data` into `pipe` from a blocking thread, then closes it.
pub async fn write_and_close(pipe: File, data: Vec<u8>) {
    tokio::task::spawn_blocking(move || {
        let mut pipe = pipe;
        pipe.write_all(&data).expect("write into the log pipe");
    })
    .await
    .expect("writer thread");
}

/// The stream `guest/stream` as `ListGuests` shows it, if listed.
pub async fn find_stream(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    stream: &str,
) -> Option<proto::StreamInfo> {
    let reply = agent
        .list_guests(proto::ListGuestsRequest::default())
        .await
        .unwrap_or_else(|s| panic!("ListGuests: {s:?}"))
        .into_inner();
    reply
        .guests
        .into_iter()
        .find(|g| g.name == guest)?
        .streams
        .into_iter()
        .find(|s| s.name == stream)
}

/// Polls `ListGuests` (bounded) until the stream is listed and `done` holds for it.
pub async fn wait_stream(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    stream: &str,
    what: &str,
    done: impl Fn(&proto::StreamInfo) -> bool,
) -> proto::StreamInfo {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let info = find_stream(agent, guest, stream).await;
        if let Some(info) = &info {
            if done(info) {
                return info.clone();
            }
        }
        if Instant::now() > deadline {
            panic!("{guest}/{stream}: not {what} after {DEADLINE:?}; last seen: {info:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until every writer of the stream has closed and its offset is `offset`; returns that
/// snapshot (`ListGuests` takes all of a stream's figures from its actor at one instant).
pub async fn wait_closed(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    stream: &str,
    offset: u64,
) -> proto::StreamInfo {
    let what = format!("closed at offset {offset}");
    wait_stream(agent, guest, stream, &what, |s| {
        !s.open && s.offset == offset
    })
    .await
}

/// Waits until the stream's offset is `offset` (writers may still be open).
pub async fn wait_offset(
    agent: &mut AgentClient<Channel>,
    guest: &str,
    stream: &str,
    offset: u64,
) -> proto::StreamInfo {
    let what = format!("at offset {offset}");
    wait_stream(agent, guest, stream, &what, |s| s.offset == offset).await
}

// Data and files

/// Byte `i` of the deterministic test sequence: a hash of the offset, so that any byte lost,
/// duplicated or moved shows up as a mismatch.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// `len` bytes of the test sequence starting at offset `start`.
pub fn pattern(start: u64, len: usize) -> Vec<u8> {
    (start..start + len as u64).map(pattern_byte).collect()
}

/// Odd chunk sizes, around page and pipe-buffer boundaries, cycled by writers.
pub const ODD_CHUNKS: &[usize] = &[1, 7, 4095, 4097, 333, 65537, 2, 8191, 8193, 100_000, 4096];

/// The log files of a stream, oldest first: `.log.N` … `.log.1`, then `.log`.
pub fn log_files(log_dir: &Path, guest: &str, stream: &str) -> Vec<PathBuf> {
    let dir = log_dir.join(guest);
    let base = format!("{stream}.log");
    let mut backups = Vec::new();
    let mut current = None;
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("read {}: {e}", dir.display()),
    };
    for entry in entries {
        let entry = entry.expect("directory entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == base {
            current = Some(entry.path());
        } else if let Some(n) = name
            .strip_prefix(&base)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|n| n.parse::<u32>().ok())
        {
            backups.push((n, entry.path()));
        }
    }
    backups.sort_by_key(|b| std::cmp::Reverse(b.0));
    let mut files: Vec<PathBuf> = backups.into_iter().map(|(_, p)| p).collect();
    files.extend(current);
    files
}

/// File names (relative to the guest's directory) of a stream's files, oldest first.
pub fn log_file_names(log_dir: &Path, guest: &str, stream: &str) -> Vec<String> {
    log_files(log_dir, guest, stream)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Concatenation of a stream's files, oldest first.
pub fn read_log(log_dir: &Path, guest: &str, stream: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for path in log_files(log_dir, guest, stream) {
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut out))
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    }
    out
}

/// Sizes of a stream's files right now, oldest first. A file that disappears between listing
/// and `stat` (a rotation in between) is skipped.
pub fn log_sizes(log_dir: &Path, guest: &str, stream: &str) -> Vec<(String, u64)> {
    log_files(log_dir, guest, stream)
        .into_iter()
        .filter_map(|p| {
            let size = std::fs::metadata(&p).ok()?.len();
            Some((p.file_name()?.to_string_lossy().into_owned(), size))
        })
        .collect()
}
