//! `ReadHistory` by time against the real `conlogd` (docs/design.md, "Time index"): a writer
//! prints numbered lines in bursts with quiet gaps of 1.5 s; `since_time` and `until_time`
//! find the bursts to the byte, `lines` gives every line its time, `events` come in order with
//! the bytes, `follow` works from a past and a future time and ends at `until_time`, requests
//! without the new fields get exactly the frames they always got, and bad times are refused
//! naming the field. `conlogctl history --since/--until/--timestamps/--events` is checked on
//! the same stream.
//!
//! Times are checked against the test's own clock read around each burst: a burst's bytes are
//! logged after the test read `start` and before it read `end` (it waits until the daemon
//! logged them), and the first write after a quiet second gets an index entry of its own, so
//! every boundary below is exact, whatever the machine's load.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "sizes, offsets and times in tests are small numbers"
)]

use crate::history_common;
use crate::support;

use conlog::proto::{
    attach::Mode, history_event::Kind, read_history_request::Start, HistoryChunk, LogMode,
    ReadHistoryRequest,
};
use history_common::*;
use prost::Message;
use std::fs::File;
use std::process::Command;
use std::time::Duration;
use support::*;
use tonic::Code;

const GUEST: &str = "vm-time";
const MAX_SIZE: u64 = 4096;
/// Quiet time between bursts: more than the index's one second, so each burst starts with an
/// entry of its own.
const QUIET: Duration = Duration::from_millis(1500);

/// One burst of lines: its offsets and the test's clock around its logging.
#[derive(Clone, Debug)]
struct Burst {
    from: u64,
    to: u64,
    /// Read just before the burst was written.
    start: i64,
    /// Read once the daemon had logged all of it.
    end: i64,
}

/// The stream's bytes and bursts.
struct Written {
    data: Vec<u8>,
    bursts: Vec<Burst>,
}

impl Written {
    /// The bytes from `from` to `to`.
    fn bytes(&self, from: u64, to: u64) -> &[u8] {
        &self.data[from as usize..to as usize]
    }

    fn end(&self) -> u64 {
        self.data.len() as u64
    }
}

/// Lines `line NNNNN of burst B` up to about 3000 bytes (so bursts cross files of 4 KiB).
fn burst_text(burst: usize, first_line: &mut usize) -> Vec<u8> {
    let mut text = String::new();
    while text.len() < 3000 {
        text.push_str(&format!("line {:05} of burst {burst}\n", *first_line));
        *first_line += 1;
    }
    text.into_bytes()
}

/// Writes `count` bursts into `pipe` (stream `GUEST/stream`), `QUIET` apart, each in one
/// write, and waits for each to be logged.
async fn write_bursts(
    daemon: &Daemon,
    stream: &str,
    pipe: &mut File,
    written: &mut Written,
    count: usize,
) {
    let mut agent = daemon.agent().await;
    let mut line = written.data.iter().filter(|b| **b == b'\n').count();
    for _ in 0..count {
        if !written.bursts.is_empty() {
            tokio::time::sleep(QUIET).await;
        }
        let text = burst_text(written.bursts.len(), &mut line);
        let from = written.end();
        let start = now_ns();
        write_now(pipe, &text);
        written.data.extend_from_slice(&text);
        wait_offset(&mut agent, GUEST, stream, written.end()).await;
        written.bursts.push(Burst {
            from,
            to: written.end(),
            start,
            end: now_ns(),
        });
    }
}

/// A daemon with `GUEST/qemu` holding four bursts in files of 4 KiB (none rotated away); the
/// pipe stays open.
async fn four_bursts() -> (Daemon, File, Written) {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(
        &mut agent,
        GUEST,
        "qemu",
        Some(limits(MAX_SIZE, 50, LogMode::Rotate)),
    )
    .await;
    let mut written = Written {
        data: Vec::new(),
        bursts: Vec::new(),
    };
    write_bursts(&daemon, "qemu", &mut pipe, &mut written, 4).await;
    assert!(
        log_file_names(&daemon.log_dir(), GUEST, "qemu").len() >= 3,
        "the bursts span several files"
    );
    (daemon, pipe, written)
}

fn timed(start: Option<Start>, until: Option<i64>) -> ReadHistoryRequest {
    ReadHistoryRequest {
        until_time: until.map(ts),
        ..request(GUEST, "qemu", start)
    }
}

fn since(ns: i64) -> Option<Start> {
    Some(Start::SinceTime(ts(ns)))
}

/// Reads `request` and checks it is exactly the bytes `from..to`, contiguous, every data chunk
/// with a time.
async fn assert_range(
    client: &mut Console,
    request: ReadHistoryRequest,
    written: &Written,
    from: u64,
    to: u64,
) -> Vec<HistoryChunk> {
    let what = format!("{request:?}");
    let chunks = read_ok(client, request).await;
    let got = Received::of(&chunks, DEFAULT_CHUNK);
    assert!(got.gaps.is_empty(), "{what}: gaps {:?}", got.gaps);
    assert_eq!(got.first, Some(from), "{what}: first offset");
    assert_eq!(got.position, Some(to), "{what}: end offset");
    assert!(
        got.data == written.bytes(from, to),
        "{what}: bytes differ from those written at {from}..{to}"
    );
    for chunk in &chunks {
        assert!(
            chunk.time.is_some(),
            "{what}: a chunk without time: {chunk:?}"
        );
    }
    chunks
}

/// `since_time` anywhere in a quiet gap starts at exactly the next burst's first byte (also in
/// another file than the previous burst's); `until_time` in a gap ends exactly at the burst
/// before it; a time older than everything starts at the oldest byte; one newer than everything
/// is `OUT_OF_RANGE`, like a `from_offset` past the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_and_until_find_the_bursts_to_the_byte() {
    let (daemon, _pipe, written) = four_bursts().await;
    let mut client = local_console(&daemon).await;
    let end = written.end();
    let b = &written.bursts;
    for (k, burst) in b.iter().enumerate() {
        let mut starts = vec![burst.start];
        if k > 0 {
            starts.push(b[k - 1].end + 1);
            starts.push((b[k - 1].end + burst.start) / 2);
        }
        for start in starts {
            assert_range(
                &mut client,
                timed(since(start), None),
                &written,
                burst.from,
                end,
            )
            .await;
            // Until the end of this burst (or anywhere in the gap after it).
            let until = b.get(k + 1).map_or(burst.end, |next| next.start - 1);
            for until in [burst.end, until] {
                assert_range(
                    &mut client,
                    timed(since(start), Some(until)),
                    &written,
                    burst.from,
                    burst.to,
                )
                .await;
            }
        }
        // From the oldest byte until this burst's end.
        assert_range(
            &mut client,
            timed(None, Some(burst.end)),
            &written,
            0,
            burst.to,
        )
        .await;
    }
    // Older than everything: the oldest byte. Until before everything: nothing.
    for old in [0, b[0].start - 3_600_000_000_000, b[0].start] {
        assert_range(&mut client, timed(since(old), None), &written, 0, end).await;
    }
    let nothing = read_ok(&mut client, timed(None, Some(b[0].start - 1))).await;
    assert!(
        nothing.is_empty(),
        "until before the first byte: {nothing:?}"
    );
    // Newer than everything, without follow: OUT_OF_RANGE, as from_offset past the end.
    for new in [b[3].end + 1, now_ns() + 3_600_000_000_000] {
        let status = expect_error(&mut client, timed(since(new), None), Code::OutOfRange).await;
        assert!(
            status.message().contains("since_time") && status.message().contains("follow"),
            "{status:?}"
        );
    }
    let status = expect_error(
        &mut client,
        request(GUEST, "qemu", Some(Start::FromOffset(end + 1))),
        Code::OutOfRange,
    )
    .await;
    assert!(status.message().contains("follow"), "{status:?}");
}

/// `lines`: one line per chunk, each with the time it was logged (inside its burst's window,
/// never decreasing); `marks` start with the entry covering the chunk's first byte;
/// `times` alone keeps today's chunks and adds their times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_carry_the_time_each_line_was_logged() {
    let (daemon, _pipe, written) = four_bursts().await;
    let mut client = local_console(&daemon).await;
    let request = ReadHistoryRequest {
        lines: true,
        marks: true,
        ..timed(None, None)
    };
    let chunks = assert_range(&mut client, request, &written, 0, written.end()).await;
    // One line per chunk; a line across two log files is two chunks (each file's bytes have
    // their own entries).
    let lines = written.data.iter().filter(|b| **b == b'\n').count();
    let files = log_file_names(&daemon.log_dir(), GUEST, "qemu").len();
    assert!(
        (lines..lines + files).contains(&chunks.len()),
        "{} chunks for {lines} lines in {files} files",
        chunks.len()
    );
    let mut last = i64::MIN;
    for chunk in &chunks {
        let newline = chunk.data.iter().position(|b| *b == b'\n');
        assert!(
            newline.is_none_or(|at| at == chunk.data.len() - 1),
            "a chunk with more than one line: {chunk:?}"
        );

        let burst = written
            .bursts
            .iter()
            .find(|b| (b.from..b.to).contains(&chunk.offset))
            .unwrap();
        let time = ns_of(chunk.time.as_ref().unwrap());
        assert!(
            (burst.start..=burst.end).contains(&time),
            "line at {} logged at {time}, outside its burst's window {burst:?}",
            chunk.offset
        );
        assert!(time >= last, "times went back at offset {}", chunk.offset);
        last = time;
        let first = chunk
            .marks
            .first()
            .expect("marks start with the covering entry");
        assert!(first.offset <= chunk.offset, "{chunk:?}");
        assert_eq!(first.unix_nanos, time, "{chunk:?}");
        for mark in &chunk.marks[1..] {
            assert!(
                (chunk.offset + 1..chunk.offset + chunk.data.len() as u64).contains(&mark.offset),
                "a mark outside its chunk: {chunk:?}"
            );
        }
    }
    // The first line of each burst has an entry of its own (exact time).
    for burst in &written.bursts {
        let chunk = chunks.iter().find(|c| c.offset == burst.from).unwrap();
        assert_eq!(chunk.marks[0].offset, burst.from, "{burst:?}");
    }
    // `times` alone: the chunks an old client gets, each with its first byte's time.
    let plain = read_ok(&mut client, timed(None, None)).await;
    let times = read_ok(
        &mut client,
        ReadHistoryRequest {
            times: true,
            ..timed(None, None)
        },
    )
    .await;
    let cuts = |chunks: &[HistoryChunk]| {
        chunks
            .iter()
            .map(|c| (c.offset, c.data.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(cuts(&plain), cuts(&times));
    assert!(times.iter().all(|c| c.time.is_some() && c.marks.is_empty()));
}

/// The frames of a request without any of the new fields, encoded, are byte for byte those of
/// a frame holding only the fields that existed before (offset, data, text, gap): old clients
/// see exactly what they saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_style_requests_get_byte_identical_frames() {
    let (daemon, _pipe, written) = four_bursts().await;
    let mut client = local_console(&daemon).await;
    let starts = [
        None,
        Some(Start::FromOffset(100)),
        Some(Start::TailBytes(5000)),
        Some(Start::TailLines(10)),
    ];
    for start in starts {
        for text in [false, true] {
            let request = ReadHistoryRequest {
                text,
                ..request(GUEST, "qemu", start)
            };
            let chunks = read_ok(&mut client, request).await;
            assert!(!chunks.is_empty());
            let mut bytes = Vec::new();
            for chunk in &chunks {
                let old = HistoryChunk {
                    offset: chunk.offset,
                    data: chunk.data.clone(),
                    text: chunk.text.clone(),
                    gap: chunk.gap.clone(),
                    ..Default::default()
                };
                assert_eq!(
                    chunk.encode_to_vec(),
                    old.encode_to_vec(),
                    "{start:?}: a frame carries new fields"
                );
                bytes.extend_from_slice(&chunk.data);
            }
            let end = written.end();
            assert!(bytes == written.bytes(end - bytes.len() as u64, end));
        }
    }
    // A gap frame too: a stream whose oldest bytes were rotated away.
    let mut agent = daemon.agent().await;
    let (_, pipe) = open_pipe(
        &mut agent,
        GUEST,
        "rotated",
        Some(limits(MAX_SIZE, 1, LogMode::Rotate)),
    )
    .await;
    write_and_close(pipe, pattern(0, 20_000)).await;
    wait_closed(&mut agent, GUEST, "rotated", 20_000).await;
    let chunks = read_ok(
        &mut client,
        request(GUEST, "rotated", Some(Start::FromOffset(0))),
    )
    .await;
    assert!(chunks[0].gap.is_some(), "{:?}", chunks[0]);
    let old = HistoryChunk {
        offset: chunks[0].offset,
        gap: chunks[0].gap.clone(),
        ..Default::default()
    };
    assert_eq!(chunks[0].encode_to_vec(), old.encode_to_vec());
}

/// One frame of a reply with `events`, for comparing sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Data(u64, Vec<u8>),
    Event(Kind, u64, String),
}

fn items(chunks: &[HistoryChunk]) -> Vec<Item> {
    chunks
        .iter()
        .map(|c| match &c.event {
            Some(event) => {
                assert!(c.data.is_empty() && c.gap.is_none(), "{c:?}");
                assert_eq!(c.offset, event.offset, "{c:?}");
                assert_eq!(c.time, event.time, "{c:?}");
                Item::Event(
                    Kind::try_from(event.kind).unwrap(),
                    event.offset,
                    event.detail.clone(),
                )
            }
            None => Item::Data(c.offset, c.data.to_vec()),
        })
        .collect()
}

/// Console events (guest connected and disconnected, the writer lease taken and given back)
/// come as frames of their own, in order with the bytes: each at the offset of the byte logged
/// after it, the bytes between them exactly the guest's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_come_in_order_with_the_bytes() {
    const VM: &str = "vm-events";
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, VM).await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    guest.write(b"one\n").await;
    wait_offset(&mut agent, VM, "serial0", 4).await;
    let session = Session::attach(local_channel(&daemon).await, attach(VM, Mode::ReadWrite))
        .await
        .unwrap();
    assert!(session.attached.writer);
    guest.write(b"two\n").await;
    wait_offset(&mut agent, VM, "serial0", 8).await;
    drop(session);
    wait_clients(&mut agent, VM, "serial0", 0).await;
    drop(guest);
    wait_guest_connected(&mut agent, VM, "serial0", false).await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, VM, "serial0", true).await;
    guest.write(b"three\n").await;
    wait_offset(&mut agent, VM, "serial0", 14).await;

    let mut client = local_console(&daemon).await;
    let chunks = read_ok(
        &mut client,
        ReadHistoryRequest {
            events: true,
            ..request(VM, "serial0", None)
        },
    )
    .await;
    let items = items(&chunks);
    // The bytes, exactly; every event at the offset of the next byte.
    let mut position = 0;
    let mut data = Vec::new();
    for item in &items {
        match item {
            Item::Data(offset, bytes) => {
                assert_eq!(*offset, position, "{items:?}");
                position += bytes.len() as u64;
                data.extend_from_slice(bytes);
            }
            Item::Event(_, offset, _) => assert_eq!(*offset, position, "{items:?}"),
        }
    }
    assert_eq!(data, b"one\ntwo\nthree\n");
    let events: Vec<(Kind, u64)> = items
        .iter()
        .filter_map(|i| match i {
            Item::Event(kind, offset, _) => Some((*kind, *offset)),
            Item::Data(..) => None,
        })
        .collect();
    let expected = [
        (Kind::GuestConnected, 0),
        (Kind::WriterChanged, 4),
        (Kind::WriterChanged, 8),
        (Kind::GuestDisconnected, 8),
        (Kind::GuestConnected, 8),
    ];
    let mut from = 0;
    for want in expected {
        let at = events[from..]
            .iter()
            .position(|e| *e == want)
            .unwrap_or_else(|| panic!("{want:?} missing or out of order in {events:?}"));
        from += at + 1;
    }
    // The writer's label names who took the lease.
    let writer = items
        .iter()
        .find_map(|i| match i {
            Item::Event(Kind::WriterChanged, 4, detail) => Some(detail.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        writer.contains("local") && writer.contains("uid"),
        "writer label {writer:?}"
    );
    // Without `events`, the same bytes in the same chunks as always.
    let plain = read_ok(&mut client, request(VM, "serial0", None)).await;
    assert!(plain.iter().all(|c| c.event.is_none()));
    // From a time: the events before it are not sent.
    let second = chunks
        .iter()
        .find(|c| c.offset == 4 && !c.data.is_empty())
        .unwrap();
    let since = ns_of(second.time.as_ref().unwrap());
    let later = read_ok(
        &mut client,
        ReadHistoryRequest {
            events: true,
            ..request(VM, "serial0", Some(Start::SinceTime(ts(since))))
        },
    )
    .await;
    assert!(
        later.iter().all(|c| c
            .event
            .as_ref()
            .is_none_or(|e| ns_of(e.time.as_ref().unwrap()) >= since)),
        "{later:?}"
    );
    // ... and those after it are (the check above holds for an empty answer too).
    let kinds_at = |kind: Kind, offset: u64| {
        later.iter().any(|c| {
            c.event
                .as_ref()
                .is_some_and(|e| e.kind == kind as i32 && e.offset == offset)
        })
    };
    assert!(kinds_at(Kind::WriterChanged, 4), "{later:?}");
    assert!(kinds_at(Kind::GuestDisconnected, 8), "{later:?}");
}

/// `follow` from a past time reads on live; from a future time it passes over what is logged
/// before it and starts at the first byte logged after it; `until_time` ends a follow by
/// itself when the clock passes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_from_a_past_or_future_time_and_until_a_time() {
    let (daemon, mut pipe, mut written) = four_bursts().await;
    let mut client = local_console(&daemon).await;
    let follow = |start: Option<Start>, until: Option<i64>| ReadHistoryRequest {
        follow: true,
        lines: true,
        ..timed(start, until)
    };
    let past = open(&mut client, follow(since(written.bursts[2].start), None))
        .await
        .unwrap();
    let future_since = now_ns() + QUIET.as_nanos() as i64;
    let future = open(&mut client, follow(since(future_since), None))
        .await
        .unwrap();
    // Ends by itself once the clock passes `until`, before burst 4 is written.
    let until = future_since;
    let bounded = open(&mut client, follow(None, Some(until))).await.unwrap();
    // Logged before `future_since`: the follower from that time passes over it.
    let early = b"early line\n";
    write_now(&mut pipe, early);
    written.data.extend_from_slice(early);
    let mut agent = daemon.agent().await;
    wait_offset(&mut agent, GUEST, "qemu", written.end()).await;
    assert!(
        now_ns() < future_since,
        "the machine took more than {QUIET:?} to log a line"
    );
    let before = written.end();
    // The bounded follow: everything up to `until`, then the end of the call (OK) once the
    // clock passed it, with nothing written after it.
    let mut chunks = bounded;
    let mut got = Received::new(DEFAULT_CHUNK);
    while let Some(chunk) = next(&mut chunks).await.expect("the follow ends with OK") {
        got.push(&chunk);
    }
    assert!(
        now_ns() >= until,
        "ended before the clock passed until_time"
    );
    assert_eq!(got.first, Some(0));
    assert_eq!(got.position, Some(before));
    // Burst 4 comes after QUIET: after `future_since`.
    write_bursts(&daemon, "qemu", &mut pipe, &mut written, 2).await;
    assert!(written.bursts[4].start > future_since);
    let end = written.end();

    async fn read_to(mut chunks: tonic::Streaming<HistoryChunk>, to: u64) -> Received {
        let mut got = Received::new(DEFAULT_CHUNK);
        while got.position.is_none_or(|p| p < to) {
            let chunk = next(&mut chunks)
                .await
                .unwrap()
                .expect("the follow went on");
            assert!(chunk.time.is_some(), "{chunk:?}");
            got.push(&chunk);
        }
        got
    }
    let got = read_to(past, end).await;
    assert_eq!(got.first, Some(written.bursts[2].from));
    assert!(got.data == written.bytes(written.bursts[2].from, end));
    let got = read_to(future, end).await;
    assert_eq!(
        got.first,
        Some(written.bursts[4].from),
        "first byte after the future time"
    );
    assert!(got.data == written.bytes(written.bursts[4].from, end));

    // What was written after it is found from it.
    let later = read_ok(&mut client, timed(since(until), None)).await;
    assert_eq!(later.first().map(|c| c.offset), Some(before));
}

/// Bad times are `INVALID_ARGUMENT` naming the field and the rule; nothing is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_times_are_refused_naming_the_field() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    let t = now_ns();
    write_now(&mut pipe, b"x\n");
    wait_offset(&mut agent, GUEST, "qemu", 2).await;
    let mut client = local_console(&daemon).await;
    let bad = |seconds: i64, nanos: i32| prost_types::Timestamp { seconds, nanos };
    let cases = [
        (Some(Start::SinceTime(bad(1, -1))), None, "since_time.nanos"),
        (
            Some(Start::SinceTime(bad(1, 1_000_000_000))),
            None,
            "since_time.nanos",
        ),
        (
            Some(Start::SinceTime(bad(-1, 0))),
            None,
            "since_time.seconds",
        ),
        (
            Some(Start::SinceTime(bad(i64::MAX, 0))),
            None,
            "since_time.seconds",
        ),
        (None, Some(bad(t / 1_000_000_000, -5)), "until_time.nanos"),
        (None, Some(bad(253_402_300_800, 0)), "until_time.seconds"),
        (since(t), Some(ts(t - 1)), "until_time is before since_time"),
    ];
    for (start, until, needle) in cases {
        let request = ReadHistoryRequest {
            until_time: until,
            ..request(GUEST, "qemu", start)
        };
        let status = expect_error(&mut client, request, Code::InvalidArgument).await;
        assert!(status.message().contains(needle), "{needle}: {status:?}");
    }
    // Equal since and until is a valid (short) window.
    read_ok(&mut client, timed(since(t), Some(t))).await;

    // A stream without a time index (logs.time_index off): a time cannot be found in it.
    let daemon = Daemon::start_with(Some("logs:\n  time_index: false\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    write_now(&mut pipe, b"x\n");
    wait_offset(&mut agent, GUEST, "qemu", 2).await;
    let mut client = local_console(&daemon).await;
    let status = expect_error(&mut client, timed(since(t), None), Code::FailedPrecondition).await;
    assert!(status.message().contains("time index"), "{status:?}");
    // Times asked of its bytes: none, the bytes as always.
    let chunks = read_ok(
        &mut client,
        ReadHistoryRequest {
            lines: true,
            ..timed(None, None)
        },
    )
    .await;
    assert_eq!(chunks.len(), 1);
    assert!(chunks[0].time.is_none() && chunks[0].data == b"x\n"[..]);
    // A follow from a time not reached yet, on a stream without an index: its first bytes
    // cannot be placed in time, and the call says so.
    let (_, mut empty) = open_pipe(&mut agent, GUEST, "empty", None).await;
    let mut waiting = open(
        &mut client,
        ReadHistoryRequest {
            follow: true,
            ..request(GUEST, "empty", since(now_ns() + 3_600_000_000_000))
        },
    )
    .await
    .expect("a follow from a future time waits");
    write_now(&mut empty, b"y\n");
    let status = next(&mut waiting)
        .await
        .expect_err("no time for these bytes");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("time index"), "{status:?}");
    // conlogctl --timestamps: `- ` for the unknown time, and it says why.
    let mut cmd = Command::new(conlogctl_bin());
    cmd.args([
        "--socket",
        daemon.socket().to_str().unwrap(),
        "history",
        GUEST,
    ])
    .arg("--timestamps");
    let output = run_bounded(&mut cmd);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(output.stdout, b"- x\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no times in conlogd's reply"), "{stderr}");
}

/// `conlogctl history --since/--until --timestamps` prints each line of the window with its
/// RFC 3339 time; `--events` adds event lines on stderr; a time it cannot read is a usage
/// error naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conlogctl_prints_a_window_with_timestamps() {
    let (daemon, _pipe, written) = four_bursts().await;
    let b = &written.bursts;
    let rfc = |ns: i64| {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns)).unwrap();
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let run = |args: &[String]| {
        let mut cmd = Command::new(conlogctl_bin());
        cmd.args([
            "--socket",
            daemon.socket().to_str().unwrap(),
            "history",
            GUEST,
        ])
        .args(args);
        run_bounded(&mut cmd)
    };
    let args = [
        "--since".to_owned(),
        rfc(b[1].start),
        "--until".to_owned(),
        rfc(b[2].end),
        "--timestamps".to_owned(),
        "--events".to_owned(),
    ];
    let output = run(&args);
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    let expected = String::from_utf8(written.bytes(b[1].from, b[2].to).to_vec()).unwrap();
    let mut lines = 0;
    for (line, want) in stdout.lines().zip(expected.lines()) {
        let (stamp, text) = line.split_once(' ').unwrap();
        assert_eq!(text, want);
        // 2026-12-05T03:12:07.123456789Z: nine digits, UTC.
        assert_eq!(stamp.len(), 30, "{stamp}");
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.',
            "{stamp}"
        );
        let t = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp_nanos() as i64;
        assert!(t >= b[1].start && t <= b[2].end, "{line}");
        lines += 1;
    }
    assert_eq!(lines, expected.lines().count(), "{stdout}");
    assert_eq!(stdout.lines().count(), lines);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("no times"), "{stderr}");
    // A relative --since (the last hour): everything; raw bytes without --timestamps.
    let output = run(&["--since".to_owned(), "1h".to_owned()]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(output.stdout == written.data);
    // Without seconds, to the minute: valid.
    let minute = rfc(b[0].start - 120_000_000_000)[..16].to_owned() + "Z";
    let output = run(&["--since".to_owned(), minute]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(output.stdout == written.data);
    // Nonsense: a usage error naming the flag.
    let output = run(&["--since".to_owned(), "yesterday-ish".to_owned()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--since"), "{stderr}");
}

/// `conlogctl history --events` on a console: event lines on stderr (stdout keeps the guest's
/// bytes exactly), or inline on lines of their own with `--events=inline`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conlogctl_shows_events() {
    const VM: &str = "vm-ctl-events";
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, VM).await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    guest.write(b"hello\n").await;
    wait_offset(&mut agent, VM, "serial0", 6).await;
    drop(guest);
    wait_guest_connected(&mut agent, VM, "serial0", false).await;
    let run = |args: &[&str]| {
        let mut cmd = Command::new(conlogctl_bin());
        cmd.args(["--socket", daemon.socket().to_str().unwrap(), "history", VM])
            .args(args);
        run_bounded(&mut cmd)
    };
    let output = run(&["--events"]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(output.stdout, b"hello\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let connected = stderr
        .lines()
        .position(|l| l.starts_with("[conlog: ") && l.contains(" guest connected"));
    let disconnected = stderr
        .lines()
        .position(|l| l.starts_with("[conlog: ") && l.contains(" guest disconnected"));
    assert!(connected.is_some() && disconnected > connected, "{stderr}");
    let output = run(&["--events=inline"]);
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    let hello = lines.iter().position(|l| *l == "hello").expect(&stdout);
    assert!(
        lines[..hello].iter().any(|l| l.contains("guest connected")),
        "{stdout}"
    );
    assert!(
        lines[hello..]
            .iter()
            .any(|l| l.contains("guest disconnected")),
        "{stdout}"
    );
}

/// A reader by time holds its log file and that file's index, and both count against the
/// remote callers' share of descriptors; a reader by offset lets the index go and counts one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_by_time_holds_and_counts_two_descriptors() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    write_now(&mut pipe, b"one line\n");
    wait_offset(&mut agent, GUEST, "qemu", 9).await;
    let token = daemon
        .token(GUEST, "", conlog::proto::Access::Read, 600)
        .await;
    let channel = with_token(daemon.plain_tcp_channel().await, &token);
    let held = || {
        let (_, text) = http_get(daemon.metrics, "/metrics");
        metric(&text, "conlog_remote_descriptors_held").unwrap_or(-1.0)
    };
    let log_dir = daemon.log_dir().join(GUEST);
    // The connection's own place, once the daemon accepted it (the only remote caller).
    let before = 1.0;
    wait_until("the connection counted", || held() == before).await;
    let pid = daemon.pid();
    let files = fds_under(pid, &log_dir);
    for (lines, descriptors) in [(false, 1), (true, 2)] {
        let mut stream = channel
            .clone()
            .console()
            .read_history(ReadHistoryRequest {
                follow: true,
                lines,
                ..request(GUEST, "qemu", None)
            })
            .await
            .unwrap()
            .into_inner();
        next(&mut stream).await.unwrap().expect("the line");
        assert_eq!(held(), before + f64::from(descriptors), "lines: {lines}");
        assert_eq!(
            fds_under(pid, &log_dir),
            files + descriptors as usize,
            "lines: {lines}: {}",
            describe_fds(pid)
        );
        drop(stream);
        wait_until("the reader's descriptors given back", || {
            held() == before && fds_under(pid, &log_dir) == files
        })
        .await;
    }
}

/// The daemon's wall clock steps back 5 s (its test clock): history shows a `clock stepped`
/// event before the first byte logged after it, that line's time stays at the step's moment
/// (never before the lines logged earlier) and is marked approximate, and `conlogctl
/// --timestamps` prints it with a `~`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_back_shows_as_an_event_and_approximate_times() {
    let scratch = tempfile::tempdir().unwrap();
    let clock = scratch.path().join("clock");
    std::fs::write(&clock, "0").unwrap();
    let daemon = Daemon::start_env(&[("CONLOG_TEST_CLOCK", clock.to_str().unwrap())]).await;
    let mut agent = daemon.agent().await;
    let (_, mut pipe) = open_pipe(&mut agent, GUEST, "qemu", None).await;
    write_now(&mut pipe, b"before the step\n");
    wait_offset(&mut agent, GUEST, "qemu", 16).await;
    std::fs::write(&clock, "-5000000000").unwrap();
    // A quiet second (the next write gets an entry), longer than the clock file's re-read.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write_now(&mut pipe, b"after the step\n");
    wait_offset(&mut agent, GUEST, "qemu", 31).await;

    let mut client = local_console(&daemon).await;
    let chunks = read_ok(
        &mut client,
        ReadHistoryRequest {
            lines: true,
            events: true,
            marks: true,
            ..timed(None, None)
        },
    )
    .await;
    let step = chunks
        .iter()
        .position(|c| {
            c.event
                .as_ref()
                .is_some_and(|e| e.kind == Kind::ClockStepped as i32)
        })
        .unwrap_or_else(|| panic!("no clock stepped event: {chunks:?}"));
    let event = chunks[step].event.as_ref().unwrap();
    assert_eq!(event.offset, 16, "{event:?}");
    assert!(event.detail.contains("stepped back"), "{event:?}");
    let before = chunks
        .iter()
        .find(|c| c.offset == 0 && c.event.is_none())
        .unwrap();
    let after = chunks[step + 1..]
        .iter()
        .find(|c| c.offset == 16 && c.event.is_none())
        .unwrap_or_else(|| panic!("the line after the step follows the event: {chunks:?}"));
    assert!(!before.marks[0].approximate);
    assert!(after.marks[0].approximate, "{after:?}");
    assert!(
        ns_of(after.time.as_ref().unwrap()) >= ns_of(before.time.as_ref().unwrap()),
        "times went back"
    );

    let mut cmd = Command::new(conlogctl_bin());
    cmd.args([
        "--socket",
        daemon.socket().to_str().unwrap(),
        "history",
        GUEST,
    ])
    .args(["--timestamps"]);
    let output = run_bounded(&mut cmd);
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        !lines[0].starts_with('~') && lines[0].ends_with(" before the step"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with('~') && lines[1].ends_with(" after the step"),
        "{stdout}"
    );
}
