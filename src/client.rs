//! Client-side helpers shared by `conlogctl`, the benchmark harness and the tests: a gRPC
//! channel over the local UNIX socket, the client half of the `fd.sock` hand-off, and following
//! a guest that moved to another node ([`moved_of`], [`Route`]; docs/operations.md, "When a
//! guest moves").
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

/// Most moves one command follows.
pub const MAX_MOVES: usize = 4;

/// The moved status (docs/operations.md, "When a guest moves"), read as the node writes it.
pub use crate::migration::{moved_of, Moved, MOVED_OFFSET, MOVED_TO};

/// Why a move cannot be followed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error(
        "guest moved to {to} (continue there from offset {offset}); this command reached \
         conlogd over its local socket: run it again with --server https://{to} --ca CA \
         --token TOKEN --from {offset}"
    )]
    Local { to: String, offset: u64 },
    #[error("guest moved {moves} times during this command (at most {max} are followed); now at {to}, offset {offset}", max = MAX_MOVES)]
    TooMany {
        moves: usize,
        to: String,
        offset: u64,
    },
    #[error("guest moved in a loop: {from} and {to} each name the other as its new node at offset {offset}")]
    Loop {
        from: String,
        to: String,
        offset: u64,
    },
}

/// Where a Console client connects (its `--server`), and the moves it followed.
#[derive(Debug, Clone)]
pub struct Route {
    server: Option<String>,
    /// The nodes left, with the offset each said the next one continues at.
    left: Vec<(String, u64)>,
}

impl Route {
    pub fn new(server: Option<String>) -> Self {
        Self {
            server,
            left: Vec::new(),
        }
    }

    /// The server URL to connect to now (`None`: the local socket).
    pub fn server(&self) -> Option<&str> {
        self.server.as_deref()
    }

    /// The node connected to now, as `host:port`.
    fn node(&self) -> String {
        let server = self.server.as_deref().unwrap_or("the local conlogd");
        let bare = server.split_once("://").map_or(server, |(_, rest)| rest);
        bare.trim_end_matches('/').to_owned()
    }

    /// Moves to where `moved` says, with the same scheme (and so the same TLS settings).
    pub fn follow(&mut self, moved: &Moved) -> Result<(), RouteError> {
        let Some(server) = &self.server else {
            return Err(RouteError::Local {
                to: moved.to.clone(),
                offset: moved.offset,
            });
        };
        if self.left.len() >= MAX_MOVES {
            return Err(RouteError::TooMany {
                moves: self.left.len() + 1,
                to: moved.to.clone(),
                offset: moved.offset,
            });
        }
        if self.left.contains(&(moved.to.clone(), moved.offset)) {
            return Err(RouteError::Loop {
                from: self.node(),
                to: moved.to.clone(),
                offset: moved.offset,
            });
        }
        let scheme = server
            .split_once("://")
            .map_or("https", |(scheme, _)| scheme);
        let next = format!("{scheme}://{}", moved.to);
        self.left.push((self.node(), moved.offset));
        self.server = Some(next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(to: &str, offset: u64) -> Moved {
        Moved {
            to: to.into(),
            offset,
        }
    }

    #[test]
    fn moved_statuses_are_read_from_trailers() {
        let mut status = tonic::Status::failed_precondition("guest g serial0 moved to b:2");
        assert_eq!(moved_of(&status), None);
        status
            .metadata_mut()
            .insert(MOVED_TO, "b:2".parse().unwrap());
        status
            .metadata_mut()
            .insert(MOVED_OFFSET, "77".parse().unwrap());
        assert_eq!(moved_of(&status), Some(moved("b:2", 77)));
        let other =
            tonic::Status::with_metadata(tonic::Code::Unavailable, "x", status.metadata().clone());
        assert_eq!(moved_of(&other), None, "only FAILED_PRECONDITION");
    }

    #[test]
    fn routes_follow_moves_keep_the_scheme_and_stop_at_loops_and_after_four() {
        let mut route = Route::new(Some("https://a:1".into()));
        route.follow(&moved("b:2", 10)).unwrap();
        assert_eq!(route.server(), Some("https://b:2"));
        assert_eq!(
            route.follow(&moved("a:1", 10)),
            Err(RouteError::Loop {
                from: "b:2".into(),
                to: "a:1".into(),
                offset: 10
            })
        );
        // Back to A later (more was logged on B) is a move, not a loop.
        route.follow(&moved("a:1", 20)).unwrap();
        route.follow(&moved("c:3", 30)).unwrap();
        route.follow(&moved("d:4", 40)).unwrap();
        assert!(matches!(
            route.follow(&moved("e:5", 50)),
            Err(RouteError::TooMany { moves: 5, .. })
        ));
        let mut local = Route::new(None);
        assert!(matches!(
            local.follow(&moved("b:2", 1)),
            Err(RouteError::Local { .. })
        ));
    }
}
