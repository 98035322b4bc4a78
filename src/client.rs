//! Client-side helpers shared by `conlogctl`, the benchmark harness and the tests: a gRPC
//! channel over the local UNIX socket, and the client half of the `fd.sock` hand-off.
//!
//! Owns nothing of the daemon; it speaks the same wire protocols as any external client.

use std::io::{self, ErrorKind, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

/// The default local socket: `<runtime_dir>/conlogd.sock` with design section 2's defaults.
pub fn default_socket() -> PathBuf {
    let mut config = crate::config::Config::default();
    config.resolve_paths();
    config.runtime_dir().join("conlogd.sock")
}

/// A gRPC channel to the daemon's local UNIX socket.
pub async fn connect_local(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    Endpoint::try_from("http://localhost")
        .expect("static URI is valid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// Claims a log pipe's write end from `fd_socket` with `token` (the `fd.sock` protocol, see
/// [`crate::handoff`]). Blocking; the descriptor comes back close-on-exec.
pub fn receive_pipe(fd_socket: &Path, token: &str) -> io::Result<OwnedFd> {
    let mut stream = UnixStream::connect(fd_socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("{token}\n").as_bytes())?;
    receive_handoff_answer(&stream)
}

/// The client's side of step 2 or 3 of the `fd.sock` protocol, once the token line is sent:
/// the write end, or the server's `error: ` text as an error. Blocking.
pub fn receive_handoff_answer(stream: &UnixStream) -> io::Result<OwnedFd> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut status = [0u8; 1];
    let received = recvmsg(
        stream,
        &mut [io::IoSliceMut::new(&mut status)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let fd = control.drain().find_map(|message| match message {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    match (received.bytes, status[0], fd) {
        (1, 0, Some(fd)) => Ok(fd),
        (0, _, _) => Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            "fd.sock closed without an answer",
        )),
        _ => {
            let mut text = vec![status[0]];
            let mut reader = stream;
            let _ = reader.read_to_end(&mut text);
            let text = String::from_utf8_lossy(&text);
            Err(io::Error::other(format!(
                "hand-off refused: {}",
                text.trim().trim_start_matches("error: ")
            )))
        }
    }
}
