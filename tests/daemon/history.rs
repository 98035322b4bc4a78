//! `Console.ReadHistory` against the real `conlogd`, without `follow`: every start position on a
//! rotated stream, `limit_bytes`, resuming by offset after a disconnect, bad requests, and the
//! same replies over the UNIX socket and over TCP. `follow` is in `history_follow.rs`, `text` in
//! `history_text.rs`, grpcurl and conlogctl in `history_tools.rs`, a 250 MiB history in
//! `history_large.rs`; shared helpers in `history_common/`.
//!
//! The streams are log pipes with `max_size` 4096 and 3 backups: 30 000 bytes written leave
//! offsets 16 384 .. 30 000 on disk in four files, so every read crosses file boundaries.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::history_common;
use crate::support;

use conlog::proto::{read_history_request::Start, HistoryChunk, LogMode};
use history_common::*;
use support::*;
use tonic::Code;

const MAX_SIZE: u64 = 4096;
const BACKUPS: u32 = 3;
const TOTAL: u64 = 30_000;
/// `TOTAL` rounded down to whole files, minus the backups kept.
const OLDEST: u64 = (TOTAL / MAX_SIZE - BACKUPS as u64) * MAX_SIZE;

/// A daemon with `vm1/qemu` holding `pattern(0, TOTAL)`, of which `OLDEST..TOTAL` is on disk.
async fn rotated() -> Daemon {
    let daemon = Daemon::start_with(Some(NO_TIME_INDEX), &[]).await;
    let info = logged_stream(
        &daemon,
        "vm1",
        "qemu",
        MAX_SIZE,
        BACKUPS,
        LogMode::Rotate,
        &pattern(0, TOTAL as usize),
    )
    .await;
    assert_eq!(info.first_offset, OLDEST, "{info:?}");
    assert_eq!(
        log_file_names(&daemon.log_dir(), "vm1", "qemu").len(),
        4,
        "three backups and the current file"
    );
    daemon
}

/// Reads `start` on `vm1/qemu` and checks the reply is exactly `pattern(from, TOTAL - from)`,
/// contiguous, without gaps.
async fn assert_reads_from(client: &mut Console, start: Option<Start>, from: u64) {
    let chunks = read_ok(client, request("vm1", "qemu", start)).await;
    let got = Received::of(&chunks, DEFAULT_CHUNK);
    assert!(
        got.gaps.is_empty(),
        "{start:?}: unexpected gaps {:?}",
        got.gaps
    );
    if from == TOTAL {
        assert!(
            chunks.is_empty(),
            "{start:?}: data past the end: {chunks:?}"
        );
        return;
    }
    assert_eq!(got.first, Some(from), "{start:?}: first offset");
    assert_eq!(got.position, Some(TOTAL), "{start:?}: end offset");
    assert!(
        got.data == pattern(from, (TOTAL - from) as usize),
        "{start:?}: data differs from the bytes written at {from}..{TOTAL}"
    );
    for chunk in &chunks {
        assert!(chunk.text.is_empty(), "text filled without text: true");
    }
}

/// No start position: everything still on disk, from the oldest byte, without a gap frame, in
/// chunks that never span two files (a chunk's bytes come from one file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_start_is_the_oldest_byte_on_disk() {
    let daemon = rotated().await;
    let mut client = local_console(&daemon).await;
    assert_reads_from(&mut client, None, OLDEST).await;
    // The default stream of a guest without a `serial0` console is `qemu`.
    let chunks = read_ok(&mut client, request("vm1", "", None)).await;
    let got = Received::of(&chunks, DEFAULT_CHUNK);
    assert_eq!(got.first, Some(OLDEST));
    assert!(got.data == pattern(OLDEST, (TOTAL - OLDEST) as usize));
    // With 64 KiB chunks, one chunk per file: 3 full backups and the current file.
    let offsets: Vec<u64> = chunks.iter().map(|c| c.offset).collect();
    assert_eq!(
        offsets,
        [
            OLDEST,
            OLDEST + MAX_SIZE,
            OLDEST + 2 * MAX_SIZE,
            OLDEST + 3 * MAX_SIZE
        ]
    );
}

/// `from_offset` anywhere on disk (file boundaries and their neighbours included) resumes at
/// exactly that byte; at the end it is an empty, successful reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_offset_on_disk_starts_at_exactly_that_byte() {
    let daemon = rotated().await;
    let mut client = local_console(&daemon).await;
    let mut offsets = vec![OLDEST, OLDEST + 1, TOTAL - 1, TOTAL, 20_000];
    for boundary in (OLDEST..TOTAL).step_by(MAX_SIZE as usize).skip(1) {
        offsets.extend([boundary - 1, boundary, boundary + 1]);
    }
    for offset in offsets {
        assert_reads_from(&mut client, Some(Start::FromOffset(offset)), offset).await;
    }
}

/// `from_offset` older than the oldest byte on disk: first a gap frame naming exactly the
/// missing range (offset = first available byte, no data), then everything from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_offset_before_the_oldest_byte_reports_the_exact_gap() {
    let daemon = rotated().await;
    let mut client = local_console(&daemon).await;
    for from in [0, 1, 4096, OLDEST - 1] {
        let chunks = read_ok(
            &mut client,
            request("vm1", "qemu", Some(Start::FromOffset(from))),
        )
        .await;
        let gap = chunks[0]
            .gap
            .as_ref()
            .unwrap_or_else(|| panic!("from {from}: the first chunk is no gap: {:?}", chunks[0]));
        assert_eq!((gap.from_offset, gap.to_offset), (from, OLDEST));
        let got = Received::of(&chunks, DEFAULT_CHUNK);
        assert_eq!(got.gaps, [(from, OLDEST)], "from {from}: exactly one gap");
        assert_eq!(chunks[1].offset, OLDEST);
        assert_eq!(got.position, Some(TOTAL));
        assert!(got.data == pattern(OLDEST, (TOTAL - OLDEST) as usize));
    }
}

/// `from_offset` beyond the end without `follow` is `OUT_OF_RANGE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_offset_beyond_the_end_is_out_of_range() {
    let daemon = rotated().await;
    let mut client = local_console(&daemon).await;
    for from in [TOTAL + 1, TOTAL + MAX_SIZE, u64::MAX] {
        expect_error(
            &mut client,
            request("vm1", "qemu", Some(Start::FromOffset(from))),
            Code::OutOfRange,
        )
        .await;
    }
    // Exactly the end is not beyond it.
    assert_reads_from(&mut client, Some(Start::FromOffset(TOTAL)), TOTAL).await;
}

/// `tail_bytes N`: the last N bytes, across files; more than is on disk starts at the oldest
/// byte without a gap; 0 is an empty reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_bytes_returns_the_last_bytes() {
    let daemon = rotated().await;
    let mut client = local_console(&daemon).await;
    let current = TOTAL % MAX_SIZE;
    for n in [
        0,
        1,
        current - 1,
        current,
        current + 1,
        5000,
        TOTAL - OLDEST,
    ] {
        assert_reads_from(&mut client, Some(Start::TailBytes(n)), TOTAL - n).await;
    }
    for n in [TOTAL - OLDEST + 1, TOTAL, u64::MAX] {
        assert_reads_from(&mut client, Some(Start::TailBytes(n)), OLDEST).await;
    }
}

/// Lines of lengths 1 (empty lines) to 300 bytes, crossing file boundaries.
fn text_lines(total: usize, final_newline: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0u64;
    while out.len() < total {
        let len = ((i * 37 + i * i * 11) % 300) as usize;
        let len = if i % 9 == 4 { 0 } else { len };
        out.extend((0..len).map(|k| b'a' + ((i as usize + k) % 26) as u8));
        out.push(b'\n');
        i += 1;
    }
    out.truncate(total);
    if final_newline {
        *out.last_mut().unwrap() = b'\n';
    } else if out.last() == Some(&b'\n') {
        *out.last_mut().unwrap() = b'z';
    }
    out
}

/// `tail_lines N` for every N from 0 to more lines than are on disk, on a log ending with a
/// newline and on one ending with a partial line, lines of varying length (empty ones too)
/// crossing file boundaries: the reply is exactly the last N lines, or everything on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_lines_counts_newlines_across_files() {
    let daemon = Daemon::start_with(Some(NO_TIME_INDEX), &[]).await;
    let mut client = local_console(&daemon).await;
    for (stream, final_newline) in [("complete", true), ("partial", false)] {
        let data = text_lines(TOTAL as usize, final_newline);
        let info = logged_stream(
            &daemon,
            "vm1",
            stream,
            MAX_SIZE,
            BACKUPS,
            LogMode::Rotate,
            &data,
        )
        .await;
        let oldest = info.first_offset as usize;
        assert_eq!(oldest as u64, OLDEST);
        let lines_on_disk = data[oldest..].iter().filter(|b| **b == b'\n').count();
        let mut crossed = 0;
        for n in 0..lines_on_disk + 3 {
            let from = model_tail_lines(&data, oldest, n);
            let chunks = read_ok(
                &mut client,
                request("vm1", stream, Some(Start::TailLines(n as u64))),
            )
            .await;
            let got = Received::of(&chunks, DEFAULT_CHUNK);
            assert!(got.gaps.is_empty());
            assert!(
                got.data == data[from..],
                "{stream}: tail_lines {n} gave {} bytes from {:?}, expected {} bytes from {from}",
                got.data.len(),
                got.first,
                data.len() - from
            );
            if from < data.len() {
                assert_eq!(got.first, Some(from as u64), "{stream}: tail_lines {n}");
            }
            if chunks.len() > 1 {
                crossed += 1;
            }
        }
        assert!(
            crossed > 10,
            "{stream}: too few replies crossed a file boundary"
        );
    }
}

/// `limit_bytes` caps the data of a reply in every start mode (a gap frame is not data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_bytes_caps_the_reply() {
    let daemon = rotated().await;
    let mut client = local_console(&daemon).await;
    let cases = [
        (None, OLDEST),
        (Some(Start::FromOffset(20_000)), 20_000),
        (Some(Start::FromOffset(0)), OLDEST),
        (Some(Start::TailBytes(9000)), TOTAL - 9000),
    ];
    for (start, from) in cases {
        for limit in [1, 100, 4095, 4096, 4097, 5000] {
            let mut req = request("vm1", "qemu", start);
            req.limit_bytes = limit;
            let chunks = read_ok(&mut client, req).await;
            let got = Received::of(&chunks, DEFAULT_CHUNK);
            let expected = limit.min(TOTAL - from);
            assert_eq!(got.bytes, expected, "{start:?} limit {limit}");
            assert_eq!(
                got.position,
                Some(from + expected),
                "{start:?} limit {limit}"
            );
            assert!(got.data == pattern(from, expected as usize));
        }
    }
    // A limit above what is there changes nothing.
    let mut req = request("vm1", "qemu", Some(Start::TailBytes(10)));
    req.limit_bytes = 1 << 40;
    let got = Received::of(&read_ok(&mut client, req).await, DEFAULT_CHUNK);
    assert!(got.data == pattern(TOTAL - 10, 10));
    // The gap frame of a start before the oldest byte still comes first.
    let mut req = request("vm1", "qemu", Some(Start::FromOffset(5)));
    req.limit_bytes = 10;
    let got = Received::of(&read_ok(&mut client, req).await, DEFAULT_CHUNK);
    assert_eq!(got.gaps, [(5, OLDEST)]);
    assert!(got.data == pattern(OLDEST, 10));
}

/// Resume after a disconnect: read part of the history (by limit, or by dropping the call and
/// its connection after a few chunks), reconnect, continue from the last offset + length.
/// The concatenation is byte for byte what is on disk: nothing repeated, nothing skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_disconnect_is_byte_exact() {
    let daemon = Daemon::start_with(Some("history:\n  chunk_size: 1KiB\n"), &[]).await;
    let data = pattern(0, TOTAL as usize);
    let info = logged_stream(
        &daemon,
        "vm1",
        "qemu",
        MAX_SIZE,
        BACKUPS,
        LogMode::Rotate,
        &data,
    )
    .await;
    let on_disk = read_log(&daemon.log_dir(), "vm1", "qemu");

    let mut assembled: Vec<u8> = Vec::new();
    let mut next_offset: Option<u64> = None;
    let limits = [1u64, 777, 1024, 4095, 4097, 1, 3000];
    let mut round = 0;
    loop {
        // A new connection for every round, alternating UNIX socket and TCP.
        let mut client = if round % 2 == 0 {
            local_console(&daemon).await
        } else {
            tcp_console(&daemon, "vm1").await
        };
        let start = next_offset.map(Start::FromOffset);
        let mut req = request("vm1", "qemu", start);
        let mut got = Received::new(1024);
        if round % 3 == 2 {
            // Drop the call (and the connection) after two chunks.
            let mut chunks = open(&mut client, req).await.expect("ReadHistory");
            for _ in 0..2 {
                match next(&mut chunks).await.expect("chunk") {
                    Some(chunk) => {
                        got.push(&chunk);
                    }
                    None => break,
                }
            }
            drop(chunks);
        } else {
            req.limit_bytes = limits[round % limits.len()];
            for chunk in read_ok(&mut client, req).await {
                got.push(&chunk);
            }
        }
        drop(client);
        assert!(got.gaps.is_empty(), "round {round}: gaps {:?}", got.gaps);
        if got.bytes == 0 {
            break;
        }
        if let Some(expected) = next_offset {
            assert_eq!(
                got.first,
                Some(expected),
                "round {round}: resumed elsewhere"
            );
        } else {
            assert_eq!(got.first, Some(info.first_offset));
        }
        assembled.extend_from_slice(&got.data);
        next_offset = got.position;
        round += 1;
        assert!(round < 1000, "no end after {round} rounds");
    }
    assert!(round >= 5, "only {round} rounds");
    assert_eq!(next_offset, Some(TOTAL));
    assert!(
        assembled == on_disk,
        "the resumed pieces ({} bytes) are not the {} bytes on disk",
        assembled.len(),
        on_disk.len()
    );
    assert!(assembled == data[info.first_offset as usize..]);
}

/// Malformed names are `INVALID_ARGUMENT`; a guest or stream that does not exist is
/// `NOT_FOUND` (also when the default stream does not exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_unknown_streams() {
    let daemon = Daemon::start().await;
    logged_stream(
        &daemon,
        "vm1",
        "qemu",
        MAX_SIZE,
        1,
        LogMode::Rotate,
        b"hi\n",
    )
    .await;
    logged_stream(
        &daemon,
        "vm2",
        "serial-out",
        MAX_SIZE,
        1,
        LogMode::Rotate,
        b"x",
    )
    .await;
    let long_guest = "g".repeat(65);
    let long_stream = "s".repeat(33);
    let bad = [
        ("", "qemu"),
        ("-vm", "qemu"),
        ("vm/1", "qemu"),
        ("..", "qemu"),
        ("vm 1", "qemu"),
        (long_guest.as_str(), "qemu"),
        ("vm1", "Qemu"),
        ("vm1", "../qemu"),
        ("vm1", "a/b"),
        ("vm1", "_x"),
        ("vm1", long_stream.as_str()),
    ];
    let missing = [
        ("nosuch", "qemu"),
        ("nosuch", ""),
        ("vm1", "serial0"),
        ("vm1", "qemu2"),
        ("vm2", ""),
        ("vm2", "qemu"),
    ];
    // Over TCP each request carries a token for its guest (invalid names are refused before
    // any token is looked at).
    let client_for = |tcp: bool, guest: &'static str| {
        let daemon = &daemon;
        async move {
            if tcp {
                tcp_console(daemon, guest).await
            } else {
                local_console(daemon).await
            }
        }
    };
    for tcp in [false, true] {
        let mut client = client_for(tcp, "vm1").await;
        for (guest, stream) in bad {
            for start in [None, Some(Start::TailLines(1))] {
                expect_error(
                    &mut client,
                    request(guest, stream, start),
                    Code::InvalidArgument,
                )
                .await;
            }
        }
        for (guest, stream) in missing {
            let mut req = request(guest, stream, None);
            req.follow = true;
            expect_error(&mut client_for(tcp, guest).await, req, Code::NotFound).await;
        }
        // The longest valid names are fine (NOT_FOUND, not INVALID_ARGUMENT).
        let guest: &'static str = "g".repeat(64).leak();
        let stream = "s".repeat(32);
        expect_error(
            &mut client_for(tcp, guest).await,
            request(guest, &stream, None),
            Code::NotFound,
        )
        .await;
        // And the good ones work.
        let mut client = client_for(tcp, "vm2").await;
        let got = Received::of(
            &read_ok(&mut client, request("vm2", "serial-out", None)).await,
            DEFAULT_CHUNK,
        );
        assert_eq!(got.data, b"x");
    }
}

/// The same requests over the UNIX socket and over TCP give the same chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_and_tcp_serve_the_same_history() {
    let daemon = rotated().await;
    let mut local = local_console(&daemon).await;
    let mut tcp = tcp_console(&daemon, "vm1").await;
    let requests = [
        request("vm1", "qemu", None),
        request("vm1", "", Some(Start::FromOffset(3))),
        request("vm1", "qemu", Some(Start::FromOffset(20_001))),
        request("vm1", "qemu", Some(Start::TailBytes(5000))),
        request("vm1", "qemu", Some(Start::TailLines(3))),
        conlog::proto::ReadHistoryRequest {
            limit_bytes: 4097,
            text: true,
            ..request("vm1", "qemu", None)
        },
    ];
    for req in requests {
        let a: Vec<HistoryChunk> = read_ok(&mut local, req.clone()).await;
        let b: Vec<HistoryChunk> = read_ok(&mut tcp, req.clone()).await;
        assert!(!a.is_empty(), "{req:?}: empty");
        assert!(a == b, "{req:?}: the UNIX socket and TCP replies differ");
    }
    expect_error(
        &mut tcp,
        request("vm1", "qemu", Some(Start::FromOffset(TOTAL + 1))),
        Code::OutOfRange,
    )
    .await;
}

/// An internal error on a remote call reaches the client as `INTERNAL` with a short message
/// that names nothing of the host, and the daemon's log has the whole chain. Provoked for
/// real: the oldest backup is replaced by a directory behind the daemon's back (root ignores
/// file modes, a directory does not read): opening it works, reading it fails with `EISDIR`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_error_tells_a_remote_client_nothing_of_the_host() {
    let daemon = rotated().await;
    let oldest = log_files(&daemon.log_dir(), "vm1", "qemu")
        .into_iter()
        .next()
        .expect("a backup");
    std::fs::remove_file(&oldest).unwrap();
    std::fs::create_dir(&oldest).unwrap();
    let mut tcp = tcp_console(&daemon, "vm1").await;
    let status = expect_error(&mut tcp, request("vm1", "qemu", None), Code::Internal).await;
    assert_eq!(
        status.message(),
        "Internal error in conlogd; its log has the details"
    );
    let root = daemon.data_dir().to_string_lossy().into_owned();
    for host in [root.as_str(), "/", "os error"] {
        assert!(!status.message().contains(host), "{host:?} in {status:?}");
    }
    // The operator learns what happened, with the cause.
    wait_until("the internal error in the daemon's log", || {
        let log = daemon.stderr();
        log.contains("internal error") && log.contains("cannot read a log file: Is a directory")
    })
    .await;
    // Bytes still readable are served as before: the current file from its first offset.
    let chunks = read_ok(
        &mut tcp,
        request("vm1", "qemu", Some(Start::FromOffset(TOTAL - 100))),
    )
    .await;
    assert_eq!(Received::of(&chunks, DEFAULT_CHUNK).position, Some(TOTAL));
}
