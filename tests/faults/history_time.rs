//! `ReadHistory` by time across an in-place upgrade (SIGUSR1) and a takeover
//! (`conlogd --takeover`): a follower opened with `since_time` and `lines` ends with
//! `UNAVAILABLE` naming the offset to resume from; resumed there it gets the daemon's stop and
//! start as events at that offset, then what the guest wrote after, each line with its time;
//! and `since_time` finds the same bytes in the new daemon as in the old one (the index files
//! are carried with the logs, never rebuilt).
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "sizes, offsets and times in tests are small numbers"
)]

use crate::history_common;
use crate::support;
use crate::upgrade_common;

use conlog::proto::{history_event::Kind, read_history_request::Start, ReadHistoryRequest};
use history_common::*;
use std::fs::File;
use std::time::Duration;
use support::*;
use tonic::Code;
use upgrade_common::*;

const GUEST: &str = "vm-time";
/// More than the index's quiet second: each burst starts with an entry of its own.
const QUIET: Duration = Duration::from_millis(1500);

/// A burst's first offset and the test's clock just before it was written.
struct Burst {
    from: u64,
    start: i64,
}

/// Writes `text` after a quiet gap and waits until it is logged at `from..`.
async fn burst(socket: &std::path::Path, pipe: &mut File, from: u64, text: &[u8]) -> Burst {
    tokio::time::sleep(QUIET).await;
    let start = now_ns();
    write_now(pipe, text);
    let to = from + text.len() as u64;
    wait_list(socket, "the burst logged", |r| {
        find(r, GUEST, "qemu").is_some_and(|s| s.offset == to)
    })
    .await;
    Burst { from, start }
}

fn by_time(start: Option<Start>, follow: bool) -> ReadHistoryRequest {
    ReadHistoryRequest {
        follow,
        lines: true,
        events: true,
        ..request(GUEST, "qemu", start)
    }
}

/// How the running daemon is replaced.
#[derive(Clone, Copy, Debug)]
enum Replace {
    Upgrade,
    Takeover,
}

async fn time_queries_survive(how: Replace) {
    let mut daemon = Daemon::start().await;
    let socket = daemon.socket();
    let (tcp, metrics) = (daemon.tcp, daemon.metrics);
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    let a = b"a 1\na 2\n";
    let b = b"b 1\nb 2\nb 3\n";
    let c = b"c 1\nc 2\n";
    let first = burst(&socket, &mut pipe, 0, a).await;
    let b_burst = burst(&socket, &mut pipe, a.len() as u64, b).await;
    let b_end = (a.len() + b.len()) as u64;

    let mut client = local_console(&daemon).await;
    let mut follower = open(
        &mut client,
        by_time(Some(Start::SinceTime(ts(b_burst.start))), true),
    )
    .await
    .unwrap();
    let mut got = Received::new(DEFAULT_CHUNK);
    while got.position.is_none_or(|p| p < b_end) {
        let chunk = next(&mut follower).await.unwrap().unwrap();
        if chunk.event.is_none() {
            assert!(chunk.time.is_some(), "{chunk:?}");
            got.push(&chunk);
        }
    }
    assert_eq!(got.first, Some(b_burst.from));
    assert_eq!(got.data, b);

    let mut successor = None;
    match how {
        Replace::Upgrade => {
            daemon.signal(rustix::process::Signal::USR1);
            wait_ready_count("the upgrade", 2, || daemon.stderr()).await;
        }
        Replace::Takeover => {
            let mut next = Successor::spawn(&daemon, tcp, metrics);
            next.wait_ready().await;
            let status = daemon.wait_exit().await;
            assert_eq!(status.code(), Some(0), "the old daemon exits once replaced");
            successor = Some(next);
        }
    }
    // The follower is told where to resume.
    let status = loop {
        match next(&mut follower).await {
            Ok(Some(chunk)) => assert!(chunk.data.is_empty(), "bytes after b: {chunk:?}"),
            Ok(None) => panic!("the follow ended with OK at the {how:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&format!("from_offset {b_end}")),
        "{status:?}"
    );

    let c_burst = burst(&socket, &mut pipe, b_end, c).await;
    let mut client = local_console(&daemon).await;
    let chunks = read_ok(&mut client, by_time(Some(Start::FromOffset(b_end)), false)).await;
    // The stop and the start, at the offset where the old daemon left, then c's lines.
    let events: Vec<(Kind, u64, String)> = chunks
        .iter()
        .filter_map(|c| c.event.as_ref())
        .map(|e| (Kind::try_from(e.kind).unwrap(), e.offset, e.detail.clone()))
        .collect();
    let stopped = events
        .iter()
        .position(|(kind, offset, _)| *kind == Kind::DaemonStopped && *offset == b_end);
    let started = events
        .iter()
        .position(|(kind, offset, _)| *kind == Kind::DaemonStarted && *offset == b_end);
    assert!(
        stopped.is_some() && started > stopped,
        "{how:?}: daemon stopped then started at {b_end}: {events:?}"
    );
    let data: Vec<u8> = chunks
        .iter()
        .filter(|c| c.event.is_none())
        .flat_map(|c| c.data.to_vec())
        .collect();
    assert_eq!(data, c);
    for chunk in chunks.iter().filter(|c| c.event.is_none()) {
        assert!(
            ns_of(chunk.time.as_ref().unwrap()) >= c_burst.start,
            "{chunk:?}"
        );
    }
    // The new daemon finds each burst by its time as the old one did.
    for (since, from) in [
        (first.start - 60_000_000_000, 0),
        (b_burst.start, b_burst.from),
        (c_burst.start, c_burst.from),
    ] {
        let chunks = read_ok(
            &mut client,
            ReadHistoryRequest {
                times: true,
                ..request(GUEST, "qemu", Some(Start::SinceTime(ts(since))))
            },
        )
        .await;
        assert_eq!(
            chunks.first().map(|c| c.offset),
            Some(from),
            "since {since}"
        );
    }
    drop(successor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_queries_survive_an_upgrade() {
    time_queries_survive(Replace::Upgrade).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_queries_survive_a_takeover() {
    time_queries_survive(Replace::Takeover).await;
}
