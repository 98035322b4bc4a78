//! Live migration: a guest's streams continue on another node with the same offsets
//! (docs/design.md, "Live migration").
//!
//! Owns the moved status a source answers once a stream moved away ([`moved_status`]), the
//! shape of a node endpoint, and the destination's import ([`import`]): reading the source's
//! history over the node-to-node connection and handing it to the stream's actor, which logs it
//! at the source's offsets before its own guest's output. It never writes a log itself (the
//! stream's actor does, through [`crate::log_owner::ImportStep`]) and never decides what a
//! removal keeps (`guests`, `tombstone`). A token the source issued for an imported guest is
//! checked by asking the source ([`tokens`]).

pub(crate) mod import;
pub(crate) mod tokens;

use crate::error::Error;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// Trailer naming the node a stream moved to.
pub const MOVED_TO: &str = "conlog-moved-to";
/// Trailer with the offset the destination continues at.
pub const MOVED_OFFSET: &str = "conlog-moved-offset";
/// Trailer naming the stream (device) that moved.
pub const MOVED_STREAM: &str = "conlog-moved-stream";

/// Where a stream went: the destination's Console endpoint and the offset of the
/// destination's first byte after the source's last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moved {
    pub to: String,
    pub offset: u64,
}

/// The moved status of `guest`'s `stream` (docs/design.md, "Live migration"):
/// `FAILED_PRECONDITION` with the redirect in the message and in trailing metadata.
pub fn moved_status(guest: &str, stream: &str, moved: &Moved) -> Status {
    let mut status = Status::new(
        Code::FailedPrecondition,
        format!(
            "guest {guest} {stream} moved to {}; continue there from offset {}",
            moved.to, moved.offset
        ),
    );
    let metadata = status.metadata_mut();
    // Endpoints and names are ASCII (checked where they come in): never refused here.
    if let Ok(to) = MetadataValue::try_from(moved.to.as_str()) {
        metadata.insert(MOVED_TO, to);
    }
    metadata.insert(MOVED_OFFSET, MetadataValue::from(moved.offset));
    if let Ok(stream) = MetadataValue::try_from(stream) {
        metadata.insert(MOVED_STREAM, stream);
    }
    status
}

/// The redirect a status carries, if it is a moved status naming a bare `host:port`. The one
/// reading of the moved trailers: the importer, conlogctl and the gateway all use it.
pub fn moved_of(status: &Status) -> Option<Moved> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    moved_fields(|name| status.metadata().get(name)?.to_str().ok())
}

/// [`moved_of`] from a response's trailers (or a trailers-only response's headers), as the
/// gateway sees them.
pub fn moved_of_headers(headers: &http::HeaderMap) -> Option<Moved> {
    let code = headers.get("grpc-status")?.to_str().ok()?;
    if code.trim() != (Code::FailedPrecondition as i32).to_string() {
        return None;
    }
    moved_fields(|name| headers.get(name)?.to_str().ok())
}

/// The moved trailers' fields, validated: the node a bare `host:port` (nothing that would make
/// a different URI when a client follows it).
fn moved_fields<'a>(get: impl Fn(&'static str) -> Option<&'a str>) -> Option<Moved> {
    let to = get(MOVED_TO)?.trim();
    let offset = get(MOVED_OFFSET)?.trim().parse().ok()?;
    let valid = !to.is_empty()
        && to.len() <= 255
        && to
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
    valid.then(|| Moved {
        to: to.to_owned(),
        offset,
    })
}

/// Longest endpoint accepted.
const MAX_ENDPOINT: usize = 253 + 6;

/// `value` as a node endpoint (`host:port`, like `node.advertise`), or `INVALID_ARGUMENT`
/// naming `field` and the rule.
pub fn parse_endpoint(field: &str, value: &str) -> Result<String, Error> {
    let parsed: Option<http::uri::Authority> = value.parse().ok();
    let ok = value.len() <= MAX_ENDPOINT
        && value.is_ascii()
        && parsed.is_some_and(|a| {
            a.port_u16().is_some() && !a.host().is_empty() && !a.as_str().contains('@')
        });
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "{field} must be host:port, the other node's Console endpoint (its node.advertise), \
             like node17.example.com:7770 (got {value:?})"
        )));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_status_carries_its_redirect() {
        let moved = Moved {
            to: "node2:7770".into(),
            offset: 1234,
        };
        let status = moved_status("vm1", "serial0", &moved);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "guest vm1 serial0 moved to node2:7770; continue there from offset 1234"
        );
        assert_eq!(status.metadata().get(MOVED_STREAM).unwrap(), "serial0");
        assert_eq!(moved_of(&status), Some(moved));
        assert_eq!(moved_of(&Status::failed_precondition("other")), None);
    }

    #[test]
    fn endpoints_are_host_and_port() {
        assert!(parse_endpoint("f", "node2:7770").is_ok());
        assert!(parse_endpoint("f", "[::1]:7770").is_ok());
        for bad in ["", "node2", "user@node2:1", "node2:x", "nöde:1", "a b:1"] {
            assert!(parse_endpoint("f", bad).is_err(), "{bad}");
        }
    }
}
