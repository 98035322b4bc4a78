//! Log pipes through the real API (`CreateLogPipe`, `fd.sock`, `ListGuests`), raw exchanges
//! on the daemon's UNIX sockets, the deterministic test data, comparing bytes, and reading a
//! stream's files on disk.

use conlog::proto::{self, agent_client::AgentClient};
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tonic::transport::Channel;

use super::{Daemon, DEADLINE, POLL};

/// Log limits for a request.
pub fn limits(max_size: u64, max_backups: u32, mode: proto::LogMode) -> proto::LogLimits {
    proto::LogLimits {
        max_size: Some(max_size),
        max_backups: Some(max_backups),
        mode: mode.into(),
        compress: None,
        max_age_seconds: None,
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
            ..Default::default()
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

/// Sends `line` on a raw `fd.sock` connection of `daemon` and returns everything it answers.
pub fn raw_fd_sock(daemon: &Daemon, line: &[u8]) -> String {
    fd_sock_exchange(&daemon.fd_socket(), line, false)
}

/// Sends `line` on a new `fd.sock` connection (see [`raw_exchange`]) and returns the answer
/// as text. Blocking.
pub fn fd_sock_exchange(fd_socket: &Path, line: &[u8], half_close: bool) -> String {
    String::from_utf8_lossy(&raw_exchange(fd_socket, line, half_close)).into_owned()
}

/// Sends `bytes` on a new connection to the UNIX socket `path` (from a thread, so a huge line
/// the daemon stops reading cannot block the exchange; write errors are ignored), then
/// half-closes if `half_close`, and returns everything the daemon sends until it closes
/// (bounded by [`DEADLINE`]). Blocking.
///
/// When the daemon closes with bytes of ours still unread (an over-long line), the kernel
/// reports ECONNRESET after the answer; that ends the answer like end-of-file.
pub fn raw_exchange(path: &Path, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut stream =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut writer = stream.try_clone().expect("clone the connection");
    let bytes = bytes.to_vec();
    let shown = bytes[..bytes.len().min(40)].escape_ascii().to_string();
    let writing = std::thread::spawn(move || {
        if writer.write_all(&bytes).is_ok() && half_close {
            let _ = writer.shutdown(std::net::Shutdown::Write);
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{}: read the answer to {shown}: {e}", path.display()),
        }
    }
    drop(stream);
    writing.join().expect("writer thread");
    answer
}

/// The daemon still hands out working pipes: a new pipe of `guest` logs a line.
pub async fn assert_still_serves(daemon: &Daemon, guest: &str) {
    let mut agent = daemon.agent().await;
    let (reply, pipe) = open_pipe(&mut agent, guest, "qemu", None).await;
    write_and_close(pipe, b"still alive\n".to_vec()).await;
    wait_closed(&mut agent, guest, "qemu", reply.offset + 12).await;
    let log = read_log(&daemon.log_dir(), guest, "qemu");
    assert!(log.ends_with(b"still alive\n"), "{log:?}");
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

/// Where two byte strings first differ, with some context, for failure messages.
pub fn first_difference(got: &[u8], want: &[u8]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let around = |data: &[u8]| {
        let start = at.saturating_sub(80);
        let end = (at + 80).min(data.len());
        data[start.min(end)..end].escape_ascii().to_string()
    };
    format!(
        "lengths {} (got) vs {} (want), first difference at byte {at}\n  got:  \"{}\"\n  want: \"{}\"",
        got.len(),
        want.len(),
        around(got),
        around(want)
    )
}

/// Asserts that `got` equals `want`, showing the first difference otherwise.
#[track_caller]
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert!(got == want, "{what}: {}", first_difference(got, want));
}

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
