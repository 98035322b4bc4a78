//! The daemon's error type and its single mapping to gRPC status codes.
//!
//! Every handler returns [`Error`]; [`From<Error> for tonic::Status`] is the only place where a
//! status code is chosen. Internal errors are logged with their whole source chain here and the
//! client gets a short message without host details.

use crate::names::NameError;
use thiserror::Error;

/// Everything that can go wrong while serving a request.
#[derive(Debug, Error)]
pub enum Error {
    /// A name broke its rule (design section 2).
    #[error(transparent)]
    Name(#[from] NameError),
    /// A request field is malformed or out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named guest or stream does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A configured limit was hit; `limit` is its config key.
    #[error("Limit {limit} reached ({value})")]
    LimitReached { limit: &'static str, value: u64 },
    /// A fixed bound that is not a config key was hit (the message names it).
    #[error("{0}")]
    Exhausted(String),
    /// A position outside what exists.
    #[error("{0}")]
    OutOfRange(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No valid credentials: no token, a bad signature, an expired token.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials that do not cover the request.
    #[error("{0}")]
    PermissionDenied(String),
    /// The daemon is going away (shutdown or upgrade); retry.
    #[error("{0}")]
    Unavailable(String),
    /// The RPC is part of the API but not served yet.
    #[error("{0} is not implemented yet")]
    Unimplemented(&'static str),
    /// An operating-system call failed.
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

/// The result type of the daemon's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        use tonic::Status;
        match &error {
            Error::Name(_) | Error::InvalidArgument(_) => {
                Status::invalid_argument(error.to_string())
            }
            Error::NotFound(_) => Status::not_found(error.to_string()),
            Error::LimitReached { .. } | Error::Exhausted(_) => {
                Status::resource_exhausted(error.to_string())
            }
            Error::FailedPrecondition(_) => Status::failed_precondition(error.to_string()),
            Error::OutOfRange(_) => Status::out_of_range(error.to_string()),
            Error::Unavailable(_) => Status::unavailable(error.to_string()),
            Error::Unauthenticated(_) => Status::unauthenticated(error.to_string()),
            Error::PermissionDenied(_) => Status::permission_denied(error.to_string()),
            Error::Unimplemented(_) => Status::unimplemented(error.to_string()),
            Error::Io { .. } => {
                tracing::error!(error = %error_chain(&error), "internal error");
                Status::internal(error.to_string())
            }
        }
    }
}

/// "outer: inner: innermost", for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

impl From<NameError> for tonic::Status {
    fn from(error: NameError) -> Self {
        Error::from(error).into()
    }
}

/// An upgrade that did not happen ([`crate::upgrade::trigger`]): refused by the preflight, or
/// asked for while the daemon was already going away.
impl From<crate::upgrade::trigger::UpgradeError> for Error {
    fn from(error: crate::upgrade::trigger::UpgradeError) -> Self {
        use crate::upgrade::trigger::UpgradeError;
        match error {
            UpgradeError::Unavailable => Error::Unavailable(error.to_string()),
            UpgradeError::Refused(_) => Error::FailedPrecondition(error.to_string()),
        }
    }
}
