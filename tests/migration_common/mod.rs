//! Helpers of the live-migration tests (`tests/daemon/migration.rs`,
//! `tests/faults/migration.rs`; docs/design.md "Live migration"): nodes with TLS and
//! `migration.ca` on loopback, a fake guest printing numbered lines, the agent calls of a
//! migration on both nodes, and reading a whole history back to check that every line is there
//! exactly once with continuous offsets.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes and offsets in tests are small numbers"
)]
#![allow(dead_code)]

use crate::support::*;
use conlog::proto::{
    self, history_event::Kind, read_history_request::Start, Access, HistoryChunk,
    ReadHistoryRequest,
};
use tokio::time::Instant;
use tonic::{Code, Status};

/// Lines `from ..= to`, numbered: `line 000042\n`.
pub fn lines(from: u64, to: u64) -> Vec<u8> {
    (from..=to)
        .flat_map(|n| format!("line {n:06}\n").into_bytes())
        .collect()
}

/// Checks that `data` is exactly lines `1 ..= last`, each once, in order; names the first
/// line out of place.
pub fn assert_lines(what: &str, data: &[u8], first: u64, last: u64) {
    let want = lines(first, last);
    if data != want.as_slice() {
        let text = String::from_utf8_lossy(data);
        let mut expected = first;
        for line in text.lines() {
            let n: Option<u64> = line.strip_prefix("line ").and_then(|n| n.parse().ok());
            assert_eq!(
                n,
                Some(expected),
                "{what}: line {expected} expected, found {line:?} ({} bytes, {} wanted)",
                data.len(),
                want.len()
            );
            expected += 1;
        }
        panic!(
            "{what}: lines {first}..={} found, {first}..={last} wanted",
            expected - 1
        );
    }
}

/// The fleet's certificates.
pub struct Fleet {
    pub pki: Pki,
}

impl Fleet {
    pub fn new() -> Self {
        Self { pki: Pki::new() }
    }

    /// A node's config: TLS, `migration.ca` (the fleet's server CA), `extra` YAML keys (an
    /// `extra` starting with `migration:` adds to that section).
    pub fn yaml(&self, extra: &str) -> String {
        let (more, extra) = match extra.strip_prefix("migration:\n") {
            Some(more) => (more, ""),
            None => ("", extra),
        };
        format!(
            "{}migration:\n  ca: {}\n  switchover_timeout: 20s\n  connect_timeout: 2s\n{more}{extra}",
            self.pki.node_yaml(false),
            self.pki.path("server-ca.pem").display()
        )
    }

    /// A node on loopback.
    pub async fn node(&self) -> Daemon {
        self.node_with("", &[]).await
    }

    /// A node with more config (`extra`, top-level YAML keys) and environment (fault points).
    pub async fn node_with(&self, extra: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_full(Some(&self.yaml(extra)), &[], None, env).await
    }

    /// A Console client of `node` over TLS with `token`.
    pub async fn client(&self, node: &Daemon, token: &str) -> ConsoleChannel {
        self.pki.client(node.tcp, token).await
    }
}

/// `MigrateFrom` naming `source` with a READ token its agent issues for `guest`.
pub async fn migrate_from(source: &Daemon, guest: &str, offset: u64) -> proto::MigrateFrom {
    proto::MigrateFrom {
        node: endpoint_of(source),
        token: source.token(guest, "", Access::Read, 600).await,
        offset,
    }
}

/// `CreateConsole(guest, migrate_from)` on `destination`.
pub async fn create_migrating_console(
    destination: &Daemon,
    guest: &str,
    from: proto::MigrateFrom,
) -> Result<proto::CreateConsoleResponse, Status> {
    bounded(
        "CreateConsole with migrate_from",
        destination
            .agent()
            .await
            .create_console(proto::CreateConsoleRequest {
                guest: guest.into(),
                migrate_from: Some(from),
                ..Default::default()
            }),
    )
    .await
    .map(|r| r.into_inner())
}

/// `RemoveGuest(guest, moved_to: to)` on `source`.
pub async fn remove_moved(source: &Daemon, guest: &str, to: &Daemon) {
    bounded(
        "RemoveGuest with moved_to",
        source
            .agent()
            .await
            .remove_guest(proto::RemoveGuestRequest {
                guest: guest.into(),
                moved_to: endpoint_of(to),
                ..Default::default()
            }),
    )
    .await
    .unwrap_or_else(|s| panic!("RemoveGuest moved_to: {s:?}"));
}

/// The stream's figures on `node`, if it is live there.
pub async fn stream_info(node: &Daemon, guest: &str, stream: &str) -> Option<proto::StreamInfo> {
    find_stream(&mut node.agent().await, guest, stream).await
}

/// Waits (bounded) until `guest/stream` on `node` imports nothing any more and has logged up
/// to `end`.
pub async fn wait_imported(node: &Daemon, guest: &str, stream: &str, end: u64) {
    let what = format!("import over and offset {end}");
    wait_stream(&mut node.agent().await, guest, stream, &what, |s| {
        s.migrating_from.is_empty() && s.offset >= end
    })
    .await;
}

/// A whole history read (not following), from `start`, over the local socket: the chunks in
/// order and how the read ended.
pub struct History {
    pub chunks: Vec<HistoryChunk>,
    pub ended: Result<(), Status>,
}

impl History {
    /// The bytes, checking that data and gaps are contiguous from the first chunk on.
    pub fn data(&self) -> Vec<u8> {
        let mut data = Vec::new();
        let mut next = None;
        for chunk in &self.chunks {
            if chunk.event.is_some() {
                continue;
            }
            let start = match &chunk.gap {
                Some(gap) => gap.from_offset,
                None => chunk.offset,
            };
            if let Some(next) = next {
                assert_eq!(start, next, "history is contiguous: {chunk:?}");
            }
            next = Some(match &chunk.gap {
                Some(gap) => gap.to_offset,
                None => {
                    data.extend_from_slice(&chunk.data);
                    chunk.offset + chunk.data.len() as u64
                }
            });
        }
        data
    }

    /// The first data offset.
    pub fn first_data(&self) -> Option<u64> {
        self.chunks
            .iter()
            .find(|c| c.gap.is_none() && c.event.is_none() && !c.data.is_empty())
            .map(|c| c.offset)
    }

    /// The gaps: (from, to).
    pub fn gaps(&self) -> Vec<(u64, u64)> {
        self.chunks
            .iter()
            .filter_map(|c| c.gap.as_ref().map(|g| (g.from_offset, g.to_offset)))
            .collect()
    }

    /// The events of `kind`: (offset, detail).
    pub fn events(&self, kind: Kind) -> Vec<(u64, String)> {
        self.chunks
            .iter()
            .filter_map(|c| c.event.as_ref())
            .filter(|e| e.kind == kind as i32)
            .map(|e| (e.offset, e.detail.clone()))
            .collect()
    }
}

/// Reads `guest/stream` of `channel` from `start`, with events, to its end (or, following,
/// until `until` bytes arrived past `start` or the read ended with a status).
pub async fn read_all(
    channel: impl IntoConsole,
    guest: &str,
    stream: &str,
    start: Option<Start>,
    follow: bool,
) -> History {
    let response = bounded(
        "ReadHistory",
        channel.console().read_history(ReadHistoryRequest {
            guest: guest.into(),
            stream: stream.into(),
            start,
            follow,
            events: true,
            ..Default::default()
        }),
    )
    .await;
    let mut chunks = Vec::new();
    let mut stream = match response {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return History {
                chunks,
                ended: Err(status),
            }
        }
    };
    loop {
        match bounded("a history chunk", stream.message()).await {
            Ok(Some(chunk)) => chunks.push(chunk),
            Ok(None) => {
                return History {
                    chunks,
                    ended: Ok(()),
                }
            }
            Err(status) => {
                return History {
                    chunks,
                    ended: Err(status),
                }
            }
        }
    }
}

/// The whole history of `guest/stream` on `node` from its oldest byte (local caller).
pub async fn whole_history(node: &Daemon, guest: &str, stream: &str) -> History {
    read_all(local_channel(node).await, guest, stream, None, false).await
}

/// Asserts that `status` is the moved status to `to` at `offset` for `stream`.
pub fn assert_moved(what: &str, status: &Status, to: &Daemon, offset: u64, stream: &str) {
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{what}: {status:?}"
    );
    let node = endpoint_of(to);
    assert!(
        status.message().contains(&format!(
            "moved to {node}; continue there from offset {offset}"
        )),
        "{what}: {status:?}"
    );
    let trailer = |key: &str| {
        status
            .metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(trailer("conlog-moved-to"), Some(node), "{what}: {status:?}");
    assert_eq!(
        trailer("conlog-moved-offset"),
        Some(offset.to_string()),
        "{what}: {status:?}"
    );
    assert_eq!(
        trailer("conlog-moved-stream").as_deref(),
        Some(stream),
        "{what}: {status:?}"
    );
}

/// A number in `lo ..= hi` that changes from run to run (where a guest migrates).
pub fn random_in(lo: u64, hi: u64) -> u64 {
    let mut bytes = [0u8; 8];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).unwrap();
    lo + u64::from_le_bytes(bytes) % (hi - lo + 1)
}

/// Waits (bounded) until `done` holds, polling.
pub async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not after {DEADLINE:?}");
        tokio::time::sleep(POLL).await;
    }
}
