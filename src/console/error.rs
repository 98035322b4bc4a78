//! What a console refuses or fails at, in its own words ([`ConsoleError`]).
//!
//! Each variant says what happened; none chooses how a caller hears of it. The one mapping to
//! gRPC status codes is `crate::error`'s. Messages are shown to clients: they name the console
//! (`guest/device`) and never a host path, except where the path is the refusal itself (a
//! socket path too long for its configured directory, which only the operator can fix).

use std::sync::Arc;
use thiserror::Error;

/// Most bytes of pending input, for the "still writing" message ([`super::MAX_PENDING_INPUT`]).
const PENDING: usize = super::MAX_PENDING_INPUT;

/// Everything a console refuses or fails at.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// A socket path would not fit a UNIX socket address (the caller's names are too long for
    /// this runtime directory).
    #[error(
        "Console socket path {path} is {len} bytes; UNIX sockets allow {max}: \
         use a shorter runtime_dir, guest or device name"
    )]
    SocketPathTooLong {
        path: String,
        len: usize,
        max: usize,
    },
    /// A configured limit on clients was hit; `limit` is its config key.
    #[error("Limit {limit} reached ({value})")]
    LimitReached { limit: &'static str, value: u64 },
    /// A read-write attach without `force` while another client holds the writer lease.
    #[error(
        "Console {console} has a writer ({holder}); attach READ_ONLY, or set force to take over"
    )]
    WriterHeld { console: Arc<str>, holder: String },
    /// Input from a client that does not hold the writer lease.
    #[error("This client does not hold the writer lease of console {0}")]
    NotWriter(Arc<str>),
    /// The writer lease was taken over while this writer's input was being written.
    #[error(
        "{by} took the writer lease of console {console}; input not yet written was discarded"
    )]
    LeaseTaken { by: String, console: Arc<str> },
    /// Input while no guest is connected.
    #[error("No guest is connected to console {0}; input dropped")]
    NoGuest(Arc<str>),
    /// Input while earlier input of the same writer is still being written.
    #[error(
        "Console {0} is still writing earlier input to the guest (at most {PENDING} \
         bytes wait for it, one input at a time); send the next input after the previous \
         one returned"
    )]
    StillWriting(Arc<str>),
    /// A serial BREAK asked of a console whose guest socket is raw.
    #[error(
        "Console {0} cannot carry a serial BREAK: its guest socket is raw; create the console \
         with the mux protocol (conlogctl create-console --mux) and give QEMU's chardev mux=on \
         (docs/consoles.md, \"Serial BREAK\")"
    )]
    NoBreak(Arc<str>),
    /// The console's actor has stopped (closed, removed or frozen).
    #[error("Console {0} is closing")]
    Closing(Arc<str>),
    /// Every client was ended (an upgrade is about to start) while input was being written.
    #[error(
        "Every client of console {console} was ended ({reason}); input not yet written was discarded"
    )]
    ClientsEnded { console: Arc<str>, reason: String },
    /// The writer detached while its input was being written.
    #[error("The client left console {0}; its input not yet written was discarded")]
    ClientLeft(Arc<str>),
    /// A new guest connection replaced the one the input was written to.
    #[error(
        "A new guest connection replaced the one of console {0}; input not yet written was discarded"
    )]
    GuestReplaced(Arc<str>),
    /// The guest disconnected while input was being written.
    #[error(
        "The guest of console {console} disconnected ({why}); input not yet written was discarded"
    )]
    GuestLeft { console: Arc<str>, why: String },
    /// The daemon froze the console for an upgrade while input was being written.
    #[error("conlogd is upgrading; input not yet written was discarded")]
    Upgrading,
    /// The console closed while input was being written.
    #[error("Console {console} is closing ({reason}); input not yet written was discarded")]
    ClosedWhileWriting { console: Arc<str>, reason: String },
    /// The console ended a client's stream and said why: it was removed with its guest
    /// (`removed`: it will not come back), or it closed, froze for an upgrade, or ended every
    /// client (come back later, resume by offset).
    #[error("{reason}")]
    Ended { reason: String, removed: bool },
    /// No live session has that id (`SendConsoleInput` with a session of `WatchConsole`).
    #[error("No console session with that id; it ends when its WatchConsole stream ends")]
    UnknownSession,
    /// An operating-system call failed; `context` says what was being done (it may name a
    /// host path: never shown to a remote client).
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConsoleError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
