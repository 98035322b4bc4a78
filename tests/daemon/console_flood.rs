//! A guest flooding 100 MiB while one client is stuck: the stuck client is skipped ahead and
//! told the exact gap, while a normal client and the log get every byte and the daemon's memory
//! stays bounded.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;

use conlog::proto::{self, attach::Mode};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use support::*;
use tokio::time::Instant;

/// Bytes the guest floods.
const FLOOD: u64 = 100 << 20;
/// Size of one guest write during the flood.
const CHUNK: usize = 64 << 10;
/// How far the guest may run ahead of the normal client: well below the 1 MiB client queue,
/// so that the normal client cannot legitimately lag (the stuck one is never waited for).
const WINDOW: u64 = 512 << 10;
/// Room for output written after the flood, while the stuck client catches up.
const TAIL_ROOM: u64 = 8 << 20;
/// The console's client queue (config `consoles.client_queue`).
const CLIENT_QUEUE: u64 = 1 << 20;
/// The HTTP/2 stream window a tonic (hyper) client grants by default: what the daemon may send
/// a client that does not read, beyond its queue.
const CLIENT_STREAM_WINDOW: u64 = 2 << 20;
/// Most the daemon's resident memory may grow during the flood: the stuck client's queue
/// (1 MiB, docs/operations.md "Sizing") and the normal client's, which drains; the rest is
/// room for allocator arenas of the worker threads and the guest's read buffer (2 MiB growth
/// measured). Buffering the stuck client's 100 MiB, or even 8 of its queues, would exceed it.
const RSS_GROWTH: u64 = 8 << 20;
/// Room, beyond the queue and the stream window, for the bytes the stuck client receives
/// before its first gap: one guest read of output in flight plus HTTP/2 framing (measured:
/// 64 KiB over queue and window).
const LAG_SLACK: u64 = 512 << 10;

fn assert_rss_bounded(before: u64, max: u64, during: &str) {
    let growth = max.saturating_sub(before);
    assert!(
        growth < RSS_GROWTH,
        "daemon RSS grew by {} MiB during {during} ({} -> {} MiB)",
        growth >> 20,
        before >> 20,
        max >> 20
    );
}

/// A client that stops reading while the guest floods 100 MiB gets, once it reads again, one
/// `lagged` frame whose range starts exactly where its output stopped and ends exactly where
/// its next output frame starts, with the right bytes on both sides. Meanwhile a normal client
/// receives every byte with contiguous offsets, the log holds every byte, the guest is never
/// held up (every write completes) and the daemon's RSS grows by less than 8 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_client_lags_while_the_guest_floods_and_others_get_every_byte() {
    let _heavy = heavy().await; // one heavy test at a time: support::heavy
    let daemon = Daemon::start_with(Some("consoles:\n  client_queue: 1MiB\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let reply = create_console(
        &mut agent,
        "vm-flood",
        "",
        Some(limits(256 << 20, 1, proto::LogMode::Rotate)),
    )
    .await
    .unwrap();
    let reference = Arc::new(pattern(0, (FLOOD + TAIL_ROOM) as usize));
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm-flood", "serial0", true).await;

    // Checks every output frame against the reference and publishes how far it got.
    let checked = |progress: Arc<AtomicU64>| {
        let reference = reference.clone();
        Box::new(move |offset: u64, data: &[u8]| {
            let at = offset as usize;
            assert!(
                reference.get(at..at + data.len()) == Some(data),
                "wrong bytes at offset {offset} (+{})",
                data.len()
            );
            progress.store(offset + data.len() as u64, Relaxed);
        })
    };

    // The stuck client: attached over TCP, then not polled at all until the flood is over.
    let mut stuck = Session::attach(
        daemon.tcp_channel("vm-flood").await,
        attach("vm-flood", Mode::ReadOnly),
    )
    .await
    .unwrap();
    stuck.keep_output = false;
    let stuck_progress = Arc::new(AtomicU64::new(0));
    stuck.check_output = Some(checked(stuck_progress.clone()));
    assert_eq!(stuck.attached.offset, 0);

    // The normal client reads all the time, on its own connection.
    let mut normal = Session::attach(
        local_channel(&daemon).await,
        attach("vm-flood", Mode::ReadOnly),
    )
    .await
    .unwrap();
    normal.keep_output = false;
    let normal_progress = Arc::new(AtomicU64::new(0));
    normal.check_output = Some(checked(normal_progress.clone()));
    // It follows what the guest has written so far (published after every write) until the
    // guest is done (the sender dropped), so it never waits for bytes not written yet.
    let (written_tx, mut written_rx) = tokio::sync::watch::channel(0u64);
    let normal_task = tokio::spawn(async move {
        loop {
            let target = *written_rx.borrow_and_update();
            normal.wait_offset(target).await;
            if written_rx.changed().await.is_err() {
                let target = *written_rx.borrow();
                normal.wait_offset(target).await;
                return normal;
            }
        }
    });
    wait_clients(&mut agent, "vm-flood", "serial0", 2).await;

    let pid = daemon.pid();
    let rss_before = rss_bytes(pid);
    let mut rss_max = rss_before;
    let mut written = 0u64;
    // Waits until the normal client is at most WINDOW behind (it is never the stuck one).
    let pace = |written: u64, deadline: Instant| {
        let progress = normal_progress.clone();
        async move {
            while written - progress.load(Relaxed) > WINDOW {
                assert!(
                    Instant::now() < deadline,
                    "normal client stuck at {} of {written}",
                    progress.load(Relaxed)
                );
                tokio::time::sleep(POLL / 4).await;
            }
        }
    };

    // The flood.
    let deadline = Instant::now() + DEADLINE * 4;
    while written < FLOOD {
        pace(written, deadline).await;
        let at = written as usize;
        guest.write(&reference[at..at + CHUNK]).await;
        written += CHUNK as u64;
        written_tx.send_replace(written);
        rss_max = rss_max.max(rss_bytes(pid));
    }
    assert!(
        stuck_progress.load(Relaxed) < FLOOD,
        "the stuck client was polled during the flood"
    );
    assert_rss_bounded(rss_before, rss_max, "the flood");

    // The stuck client reads again; the guest goes on with small writes until the stuck client
    // has been told its gap and received output after it.
    let stuck_task = tokio::spawn(async move {
        let lagged = stuck
            .wait_event("lagged", |f| {
                matches!(f, proto::server_frame::Frame::Lagged(_))
            })
            .await;
        let proto::server_frame::Frame::Lagged(lagged) = lagged else {
            unreachable!()
        };
        stuck.wait_offset(lagged.to_offset + 1).await;
        stuck
    });
    let deadline = Instant::now() + DEADLINE;
    while !stuck_task.is_finished() {
        assert!(
            written + 4096 <= FLOOD + TAIL_ROOM,
            "the stuck client never caught up"
        );
        assert!(
            Instant::now() < deadline,
            "the stuck client never caught up"
        );
        pace(written, deadline).await;
        let at = written as usize;
        guest.write(&reference[at..at + 4096]).await;
        written += 4096;
        written_tx.send_replace(written);
        rss_max = rss_max.max(rss_bytes(pid));
        tokio::time::sleep(POLL).await;
    }
    let stuck = bounded("stuck client", stuck_task)
        .await
        .expect("stuck client task");

    // Exactly one gap; it starts where output stopped and ends where output resumed (Frames
    // checks both as the frames arrive; here explicitly), after the whole flood.
    let lagged = stuck.lagged();
    assert_eq!(lagged.len(), 1, "lagged frames: {lagged:?}");
    let (from, to) = lagged[0];
    let before = stuck
        .chunks
        .iter()
        .take_while(|c| c.0 < from)
        .last()
        .copied();
    let after = stuck.chunks.iter().find(|c| c.0 >= to).copied();
    assert_eq!(
        before.map(|(o, n)| o + n as u64),
        Some(from),
        "output before the gap"
    );
    assert_eq!(after.map(|c| c.0), Some(to), "output after the gap");
    assert!(
        from < FLOOD && to >= FLOOD,
        "gap {from}..{to} does not cover the flood's end"
    );
    assert!(
        from <= CLIENT_QUEUE + CLIENT_STREAM_WINDOW + LAG_SLACK,
        "the stuck client received {from} bytes without reading: more than its queue and \
         its stream window"
    );
    assert_eq!(stuck.output_bytes, from + (stuck.next_offset - to));

    // What the stuck client missed can be fetched from history, exactly.
    let mut history =
        conlog::proto::console_client::ConsoleClient::new(local_channel(&daemon).await)
            .read_history(proto::ReadHistoryRequest {
                guest: "vm-flood".into(),
                stream: "serial0".into(),
                start: Some(proto::read_history_request::Start::FromOffset(from)),
                limit_bytes: to - from,
                ..Default::default()
            })
            .await
            .expect("ReadHistory")
            .into_inner();
    let mut at = from;
    while let Some(chunk) = bounded("ReadHistory", history.message())
        .await
        .expect("history")
    {
        assert!(chunk.gap.is_none(), "{:?}", chunk.gap);
        assert_eq!(chunk.offset, at);
        let range = at as usize..at as usize + chunk.data.len();
        assert!(
            reference[range] == chunk.data[..],
            "history differs at {at}"
        );
        at += chunk.data.len() as u64;
    }
    assert_eq!(at, to, "history of the missed range");

    // The normal client and the log got everything.
    drop(written_tx);
    let normal = bounded("normal client", normal_task)
        .await
        .expect("normal client task");
    assert!(
        normal.lagged().is_empty(),
        "normal client lagged: {:?}",
        normal.lagged()
    );
    assert_eq!(normal.output_bytes, written);
    let info = wait_offset(&mut agent, "vm-flood", "serial0", written).await;
    assert_eq!(info.dropped_bytes, 0, "{info:?}");
    let log = read_log(&daemon.log_dir(), "vm-flood", "serial0");
    assert_eq!(log.len() as u64, written);
    assert!(
        log[..] == reference[..written as usize],
        "log differs from what the guest wrote"
    );

    assert_rss_bounded(rss_before, rss_max, "the flood and the catch-up");
    let metrics = daemon.metrics;
    let (_, body) = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
        .await
        .unwrap();
    // One client lagged, once.
    let lagged_total = metric(&body, "conlog_lagged_clients_total").unwrap_or(0.0);
    assert_eq!(lagged_total, 1.0, "{body}");
    eprintln!(
        "flood: {written} bytes, stuck client got {from} then resumed at {to}; RSS {} -> {} MiB",
        rss_before >> 20,
        rss_max >> 20
    );
}

/// A client queue smaller than one of the console's output chunks (`consoles.client_queue`
/// may be as small as 4 KiB; chunks are up to 64 KiB): the client still gets output from
/// within a large write, and every byte it misses in an exact `lagged` range (the session
/// checks offsets are contiguous across output and gaps), never only gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_smaller_than_an_output_chunk_gets_output_and_exact_gaps() {
    let daemon = Daemon::start_with(Some("consoles:\n  client_queue: 4KiB\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-small").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm-small", "serial0", true).await;
    let mut session = Session::attach(
        local_channel(&daemon).await,
        attach("vm-small", Mode::ReadOnly),
    )
    .await
    .unwrap();
    let big = vec![b'a'; 256 << 10];
    guest.write(&big).await;
    // A gap at the end of a burst is told with the next output: the guest goes on with small
    // lines.
    let ticks = tokio::spawn(async move {
        loop {
            guest.write(b"tick\n").await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    session.wait_offset(big.len() as u64 + 5).await;
    ticks.abort();
    let within = session
        .chunks
        .iter()
        .filter(|(offset, _)| *offset < big.len() as u64)
        .count();
    assert!(
        within > 0,
        "some output from within the large write arrived, not only gaps: {:?}",
        session.lagged()
    );
}

/// A client that fell behind during a burst is told what it missed as soon as it has read what
/// was queued, even if the guest prints nothing more (docs/consoles.md, slow clients): the
/// report does not wait for the next output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_at_the_end_of_a_burst_is_told_without_more_output() {
    let daemon = Daemon::start_with(Some("consoles:\n  client_queue: 4KiB\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, "vm-burst").await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    wait_guest_connected(&mut agent, "vm-burst", "serial0", true).await;
    let mut session = Session::attach(
        local_channel(&daemon).await,
        attach("vm-burst", Mode::ReadOnly),
    )
    .await
    .unwrap();
    let big = vec![b'a'; 256 << 10];
    guest.write(&big).await;
    // Nothing more from the guest: every byte of the burst arrives or is reported missing.
    session.wait_offset(big.len() as u64).await;
    assert!(
        !session.lagged().is_empty(),
        "a 4 KiB queue skipped part of a 256 KiB burst"
    );
    drop(guest);
}
