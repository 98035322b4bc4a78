//! The names descriptors are held under, and reading them back.
//!
//! | name | descriptor |
//! | --- | --- |
//! | `listener/<local\|fd_sock\|handover\|tcp\|metrics\|health>` | a daemon-wide listening socket |
//! | `pipe/<guest>/<stream>/<inode>` | a pipe read end feeding the stream (the pipe's inode tells pipes apart) |
//! | `console/<guest>/<device>/<guest-listener\|client-listener\|connection>` | a console's sockets and QEMU's connection |
//! | `handoff/<token>/<guest>/<stream>/<expiry, unix ms>` | the write end of a pending hand-off |
//!
//! Every name is printable ASCII without `:` (guest, stream and token alphabets never contain
//! `/` or `:`), at most 255 bytes: valid for the keeper and for systemd's `FDNAME=`.

use crate::names;
use std::os::fd::AsFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A console's listener for QEMU.
pub(crate) const GUEST_LISTENER: &str = "guest-listener";
/// A console's listener for raw clients.
pub(crate) const CLIENT_LISTENER: &str = "client-listener";
/// QEMU's connection to a console.
pub(crate) const CONNECTION: &str = "connection";

/// `listener/<what>`.
pub(crate) fn listener(what: &str) -> String {
    format!("listener/{what}")
}

/// `pipe/<guest>/<stream>/<inode>`; `None` if the pipe cannot be identified.
pub(crate) fn pipe(prefix: &str, fd: impl AsFd) -> Option<String> {
    let stat = rustix::fs::fstat(fd).ok()?;
    Some(format!("{prefix}/{}", stat.st_ino))
}

/// `pipe/<guest>/<stream>`: the prefix of a stream's pipe names.
pub(crate) fn pipe_prefix(guest: &str, stream: &str) -> String {
    format!("pipe/{guest}/{stream}")
}

/// `console/<guest>/<device>/<part>`.
pub(crate) fn console(guest: &str, device: &str, part: &str) -> String {
    format!("console/{guest}/{device}/{part}")
}

/// `handoff/<token>/<guest>/<stream>/<expiry>`, the expiry `expires_in` from now.
pub(crate) fn handoff(token: &str, guest: &str, stream: &str, expires_in: Duration) -> String {
    let expiry = SystemTime::now()
        .checked_add(expires_in)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis());
    format!("handoff/{token}/{guest}/{stream}/{expiry}")
}

/// A held name, read back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    Listener(String),
    Pipe {
        guest: String,
        stream: String,
    },
    Console {
        guest: String,
        device: String,
        part: String,
    },
    Handoff {
        token: String,
        guest: String,
        stream: String,
        /// Time left (zero if past).
        expires_in: Duration,
    },
}

/// Reads a name back; `None` for anything this image does not know (closed as stale).
pub(crate) fn parse(name: &str) -> Option<Parsed> {
    let parts: Vec<&str> = name.split('/').collect();
    let stream_ok = |guest: &str, stream: &str| {
        names::validate_guest(guest).is_ok() && names::validate_stream(stream).is_ok()
    };
    match parts.as_slice() {
        ["listener", what] => Some(Parsed::Listener((*what).to_owned())),
        ["pipe", guest, stream, inode] if stream_ok(guest, stream) => {
            inode.parse::<u64>().ok()?;
            Some(Parsed::Pipe {
                guest: (*guest).to_owned(),
                stream: (*stream).to_owned(),
            })
        }
        ["console", guest, device, part]
            if stream_ok(guest, device)
                && [GUEST_LISTENER, CLIENT_LISTENER, CONNECTION].contains(part) =>
        {
            Some(Parsed::Console {
                guest: (*guest).to_owned(),
                device: (*device).to_owned(),
                part: (*part).to_owned(),
            })
        }
        ["handoff", token, guest, stream, expiry]
            if stream_ok(guest, stream)
                && !token.is_empty()
                && token.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            let expiry = UNIX_EPOCH + Duration::from_millis(expiry.parse().ok()?);
            Some(Parsed::Handoff {
                token: (*token).to_owned(),
                guest: (*guest).to_owned(),
                stream: (*stream).to_owned(),
                expires_in: expiry
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back() {
        assert_eq!(
            parse(&listener("tcp")),
            Some(Parsed::Listener("tcp".into()))
        );
        assert_eq!(
            parse("pipe/vm-1/qemu/1234"),
            Some(Parsed::Pipe {
                guest: "vm-1".into(),
                stream: "qemu".into()
            })
        );
        assert_eq!(
            parse(&console("vm-1", "serial0", CONNECTION)),
            Some(Parsed::Console {
                guest: "vm-1".into(),
                device: "serial0".into(),
                part: CONNECTION.into()
            })
        );
        let name = handoff("abc123", "vm-1", "qemu", Duration::from_secs(30));
        match parse(&name) {
            Some(Parsed::Handoff {
                token, expires_in, ..
            }) => {
                assert_eq!(token, "abc123");
                assert!(expires_in > Duration::from_secs(20), "{expires_in:?}");
            }
            other => panic!("{name}: {other:?}"),
        }
        for stale in [
            "pipe/../qemu/1",
            "pipe/vm/qemu/x",
            "console/vm/serial0/other",
            "handoff/a-b/vm/qemu/1",
            "something",
        ] {
            assert_eq!(parse(stale), None, "{stale}");
        }
        assert!(
            crate::keeper::protocol::check_name(name.as_bytes()).is_ok(),
            "{name}"
        );
    }
}
