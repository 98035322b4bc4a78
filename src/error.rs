//! The one mapping from what went wrong to a gRPC status.
//!
//! Domain modules say what went wrong in their own words and know nothing of gRPC:
//! [`RegistryError`] (guests and streams), [`ConsoleError`] (writer lease, input, sessions),
//! [`HistoryError`] (start positions, a daemon going away), [`HandoffError`], [`UpgradeError`],
//! [`NameError`], and [`ActorGone`] for any stream whose actor has stopped. The handlers in
//! `server` return [`Error`](enum@Error), which carries one of those or a refusal the edge itself decided
//! (a malformed request field, credentials, call and body limits: the variants named after
//! their status). [`status`] picks the code: it walks the error's source chain (as
//! linkerd2-proxy's errors module does) to the first error that decides one, so a domain
//! error wrapped in context keeps its meaning.
//!
//! Internal errors (an operating-system call that failed, with a context that may name host
//! paths) never reach the client: it gets a short fixed message, and the whole chain is logged,
//! rate-limited, since any caller can cause one.

use crate::console::ConsoleError;
use crate::guests::RegistryError;
use crate::handoff::HandoffError;
use crate::history::HistoryError;
use crate::log_owner::{ActorGone, LogError};
use crate::names::NameError;
use crate::upgrade::trigger::UpgradeError;
use std::error::Error as StdError;
use thiserror::Error;
use tonic::{Code, Status};

/// What an internal error tells the client: nothing about the host.
pub const INTERNAL_MESSAGE: &str = "Internal error in conlogd; its log has the details";

/// Everything a handler can fail with: a domain error, or a refusal decided at the edge.
#[derive(Debug, Error)]
pub enum Error {
    /// A name broke its rule (design section 2).
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    #[error(transparent)]
    Log(#[from] LogError),
    /// The edge: a request field is malformed or out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The edge: a configured per-caller limit was hit; `limit` is its config key.
    #[error("Limit {limit} reached ({value})")]
    LimitReached { limit: &'static str, value: u64 },
    /// The edge: a fixed bound on a call that is not a config key (the message names it).
    #[error("{0}")]
    Exhausted(String),
    /// The edge: no valid credentials (no token, a bad signature, an expired token).
    #[error("{0}")]
    Unauthenticated(String),
    /// The edge: valid credentials that do not cover the request.
    #[error("{0}")]
    PermissionDenied(String),
    /// The edge: what the call needs is not there now; come back later (a gateway's node that
    /// cannot be reached, or whose stream broke).
    #[error("{0}")]
    Unavailable(String),
    /// The RPC is part of the API but not served yet.
    #[error("{0} is not implemented yet")]
    Unimplemented(&'static str),
    /// An operating-system call of a handler failed (internal).
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The result type of the handlers.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The code `error` itself decides, or `None` when its source decides (a wrapper adding
/// context). [`Code::Internal`] for failures of the host, not of the request.
fn code_of(error: &(dyn StdError + 'static)) -> Option<Code> {
    if let Some(error) = error.downcast_ref::<Error>() {
        return match error {
            Error::Name(_) | Error::InvalidArgument(_) => Some(Code::InvalidArgument),
            Error::Registry(e) => code_of(e),
            Error::Console(e) => code_of(e),
            Error::History(e) => code_of(e),
            Error::Handoff(e) => code_of(e),
            Error::Upgrade(e) => code_of(e),
            Error::Log(e) => code_of(e),
            Error::LimitReached { .. } | Error::Exhausted(_) => Some(Code::ResourceExhausted),
            Error::Unauthenticated(_) => Some(Code::Unauthenticated),
            Error::PermissionDenied(_) => Some(Code::PermissionDenied),
            Error::Unimplemented(_) => Some(Code::Unimplemented),
            Error::Unavailable(_) => Some(Code::Unavailable),
            Error::Io { .. } => None,
        };
    }
    if let Some(error) = error.downcast_ref::<RegistryError>() {
        return match error {
            RegistryError::UnknownGuest(_)
            | RegistryError::UnknownStream { .. }
            | RegistryError::UnknownConsole { .. } => Some(Code::NotFound),
            RegistryError::KindMismatch { .. } | RegistryError::ProtocolMismatch { .. } => {
                Some(Code::FailedPrecondition)
            }
            RegistryError::MaxSizeTooSmall { .. }
            | RegistryError::MaxSizeTooLarge { .. }
            | RegistryError::TooManyBackups { .. }
            | RegistryError::MaxAgeTooLong { .. } => Some(Code::InvalidArgument),
            RegistryError::LimitReached { .. } => Some(Code::ResourceExhausted),
            RegistryError::Console(e) => code_of(e),
            RegistryError::Gone(e) => code_of(e),
            RegistryError::Unrestorable { .. }
            | RegistryError::Removal(_)
            | RegistryError::Io { .. } => None,
        };
    }
    if let Some(error) = error.downcast_ref::<ConsoleError>() {
        return match error {
            ConsoleError::SocketPathTooLong { .. } => Some(Code::InvalidArgument),
            ConsoleError::LimitReached { .. } | ConsoleError::StillWriting(_) => {
                Some(Code::ResourceExhausted)
            }
            ConsoleError::WriterHeld { .. }
            | ConsoleError::NotWriter(_)
            | ConsoleError::LeaseTaken { .. }
            | ConsoleError::NoGuest(_)
            | ConsoleError::NoBreak(_) => Some(Code::FailedPrecondition),
            ConsoleError::Closing(_)
            | ConsoleError::ClientsEnded { .. }
            | ConsoleError::ClientLeft(_)
            | ConsoleError::GuestReplaced(_)
            | ConsoleError::GuestLeft { .. }
            | ConsoleError::Upgrading
            | ConsoleError::ClosedWhileWriting { .. } => Some(Code::Unavailable),
            ConsoleError::UnknownSession => Some(Code::NotFound),
            ConsoleError::Ended { removed: true, .. } => Some(Code::NotFound),
            ConsoleError::Ended { removed: false, .. } => Some(Code::Unavailable),
            ConsoleError::Io { .. } => None,
        };
    }
    if let Some(error) = error.downcast_ref::<HistoryError>() {
        return match error {
            HistoryError::BeyondEnd { .. } | HistoryError::AfterNewest { .. } => {
                Some(Code::OutOfRange)
            }
            HistoryError::NoTimeIndex => Some(Code::FailedPrecondition),
            HistoryError::GoingAway { .. } => Some(Code::Unavailable),
            HistoryError::Open(_) | HistoryError::Io { .. } => None,
        };
    }
    if let Some(error) = error.downcast_ref::<HandoffError>() {
        return match error {
            HandoffError::Upgrading(_) => Some(Code::Unavailable),
            HandoffError::LimitReached { .. } => Some(Code::ResourceExhausted),
            HandoffError::Token(_) => None,
        };
    }
    if let Some(error) = error.downcast_ref::<UpgradeError>() {
        return Some(match error {
            UpgradeError::Unavailable => Code::Unavailable,
            UpgradeError::Refused(_) => Code::FailedPrecondition,
        });
    }
    if let Some(error) = error.downcast_ref::<LogError>() {
        return match error {
            LogError::Gone(e) => code_of(e),
            LogError::Io(_) => None,
        };
    }
    if error.is::<ActorGone>() {
        // The stream was closed, removed or frozen for an upgrade meanwhile: come back later.
        return Some(Code::Unavailable);
    }
    if error.is::<NameError>() {
        return Some(Code::InvalidArgument);
    }
    if let Some(error) = error.downcast_ref::<std::io::Error>() {
        // An I/O error carrying a domain error (`io::Error::other`): that one decides.
        return error.get_ref().and_then(|inner| code_of(inner));
    }
    None
}

/// The status `error` stands for: the first error in its source chain that decides a code,
/// with its own message; [`Code::Internal`] (logged with the whole chain, rate-limited, and
/// told the client as [`INTERNAL_MESSAGE`]) when none does.
pub fn status(error: &(dyn StdError + 'static)) -> Status {
    let mut level = Some(error);
    while let Some(current) = level {
        match code_of(current) {
            Some(code) => return Status::new(code, current.to_string()),
            None => level = current.source(),
        }
    }
    crate::limited!(error, error = %error_chain(error), "internal error");
    Status::internal(INTERNAL_MESSAGE)
}

/// "outer: inner: innermost", for logs.
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// `?` from a handler: every error type a handler meets maps through [`status`].
macro_rules! into_status {
    ($($error:ty),+) => {$(
        impl From<$error> for Status {
            fn from(error: $error) -> Self {
                status(&error)
            }
        }
    )+};
}

into_status!(
    Error,
    NameError,
    RegistryError,
    ConsoleError,
    HistoryError,
    HandoffError,
    UpgradeError,
    LogError,
    ActorGone
);

#[cfg(test)]
mod tests {
    use super::*;

    fn io(path: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, path.to_owned())
    }

    #[test]
    fn internal_errors_tell_the_client_nothing_of_the_host() {
        let errors: Vec<Box<dyn StdError + 'static>> = vec![
            Box::new(Error::io(
                "cannot open /var/log/conlog/vm1/qemu.log",
                io("/x"),
            )),
            Box::new(RegistryError::io(
                "cannot write /var/lib/conlog/state",
                io("/y"),
            )),
            Box::new(ConsoleError::io(
                "cannot bind /run/conlog/consoles/vm1",
                io("/z"),
            )),
            Box::new(HistoryError::Open(LogError::Io(io("/var/log/conlog/vm1")))),
        ];
        for error in errors {
            let status = status(error.as_ref());
            assert_eq!(status.code(), Code::Internal, "{error}");
            assert_eq!(status.message(), INTERNAL_MESSAGE);
            assert!(!status.message().contains('/'));
        }
    }

    #[test]
    fn domain_errors_keep_their_code_and_message_through_wrappers() {
        let unknown = RegistryError::UnknownGuest("vm1".into());
        let status = Status::from(Error::from(unknown));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "No guest named \"vm1\"");
        // A domain error carried inside an I/O error and context still decides.
        let carried = Error::io("the removal failed", std::io::Error::other(ActorGone));
        assert_eq!(Status::from(carried).code(), Code::Unavailable);
        let gone = HistoryError::Open(LogError::Gone(ActorGone));
        assert_eq!(Status::from(gone).code(), Code::Unavailable);
        let held = RegistryError::Console(ConsoleError::NotWriter("vm1/serial0".into()));
        let status = Status::from(held);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "This client does not hold the writer lease of console vm1/serial0"
        );
        let far = HistoryError::BeyondEnd { offset: 9, end: 3 };
        assert_eq!(Status::from(far).code(), Code::OutOfRange);
    }
}
