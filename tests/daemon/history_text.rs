//! `ReadHistory` with `text: true` against the real `conlogd`: with 1 KiB chunks over
//! multibyte UTF-8, each chunk is whole characters, so its `text` has no U+FFFD, and the data
//! concatenated is exactly what was written.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::history_common;
use crate::support;

use conlog::proto::{read_history_request::Start, HistoryChunk, LogMode};
use history_common::*;
use support::*;

const MAX_SIZE: u64 = 4096;

/// "é€😀" and ASCII, so that 1 KiB chunk boundaries fall inside characters.
fn multibyte_text(total: usize) -> Vec<u8> {
    let mut out = String::new();
    let mut i = 0;
    while out.len() < total {
        out.push_str("é€😀");
        if i % 7 == 3 {
            out.push_str(" line\n");
        }
        i += 1;
    }
    out.into_bytes()
}

/// Checks a `text: true` reply: every chunk's data is whole characters, `text` renders it with
/// no replacement character, and the data concatenated is `expected`.
fn assert_clean_text(chunks: &[HistoryChunk], chunk_size: usize, expected: &[u8]) {
    let got = Received::of(chunks, chunk_size);
    assert!(got.gaps.is_empty());
    for chunk in chunks {
        let data = std::str::from_utf8(&chunk.data).unwrap_or_else(|e| {
            panic!(
                "the chunk at {} ({} bytes) is cut inside a character: {e}",
                chunk.offset,
                chunk.data.len()
            )
        });
        assert_eq!(chunk.text, data, "text is not the chunk's data");
        assert!(!chunk.text.contains('\u{FFFD}'));
    }
    assert!(
        got.data == expected,
        "the data concatenated differs from what was written"
    );
}

/// `text: true` with 1 KiB chunks over multibyte UTF-8: chunks are cut at character boundaries,
/// so every chunk's text is exact (no U+FFFD) and the data concatenated is the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_chunks_are_cut_at_character_boundaries() {
    let daemon = Daemon::start_with(Some("history:\n  chunk_size: 1KiB\n"), &[]).await;
    let data = multibyte_text(40_000);
    logged_stream(&daemon, "vm1", "qemu", 1 << 20, 1, LogMode::Rotate, &data).await;
    let mut client = local_console(&daemon).await;
    let req = conlog::proto::ReadHistoryRequest {
        text: true,
        ..request("vm1", "qemu", None)
    };
    let chunks = read_ok(&mut client, req.clone()).await;
    assert!(chunks.len() >= 40, "only {} chunks", chunks.len());
    assert!(
        chunks.iter().any(|c| c.data.len() < 1024),
        "no chunk was shortened to a character boundary"
    );
    assert_clean_text(&chunks, 1024, &data);
    // The same over TCP, and with tail_lines (which starts at a line, hence a character).
    let chunks = read_ok(&mut tcp_console(&daemon, "vm1").await, req).await;
    assert_clean_text(&chunks, 1024, &data);
    let req = conlog::proto::ReadHistoryRequest {
        text: true,
        ..request("vm1", "qemu", Some(Start::TailLines(50)))
    };
    let chunks = read_ok(&mut client, req).await;
    let from = model_tail_lines(&data, 0, 50);
    assert_clean_text(&chunks, 1024, &data[from..]);
    // Without text: true, text stays empty and chunks are full.
    let chunks = read_ok(&mut client, request("vm1", "qemu", None)).await;
    assert!(chunks.iter().all(|c| c.text.is_empty()));
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c.data.len() == 1024));
}

/// `text: true` on a rotated stream whose characters straddle file boundaries (the log cuts a
/// write at `max_size`, wherever that falls): the text of each chunk is still whole characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_chunks_are_whole_characters_across_rotated_files() {
    let daemon = Daemon::start_with(Some("history:\n  chunk_size: 1KiB\n"), &[]).await;
    let data = multibyte_text(40_000);
    let info = logged_stream(&daemon, "vm1", "qemu", MAX_SIZE, 20, LogMode::Rotate, &data).await;
    assert_eq!(info.first_offset, 0, "nothing rotated away");
    // At least one file boundary falls inside a character.
    assert!((1..data.len() / MAX_SIZE as usize)
        .any(|k| std::str::from_utf8(&data[..k * MAX_SIZE as usize]).is_err()));
    let mut client = local_console(&daemon).await;
    let req = conlog::proto::ReadHistoryRequest {
        text: true,
        ..request("vm1", "qemu", None)
    };
    let chunks = read_ok(&mut client, req).await;
    assert_clean_text(&chunks, 1024, &data);
}
