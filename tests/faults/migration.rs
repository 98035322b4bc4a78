//! Live migration when a node fails (docs/design.md, "Live migration"): the source killed in
//! the middle of an import, a source that cannot be reached at all, and the destination killed
//! during an import (it resumes the import when it starts again). Fault points make each window
//! deterministic.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes and offsets in tests are small numbers"
)]

use crate::migration_common::*;
use crate::support::*;
use conlog::proto::{self, history_event::Kind};

/// Lines 1..=`n` on A, whose history comes in 1 KiB chunks.
async fn source_with_lines(fleet: &Fleet, n: u64) -> (Daemon, FakeGuest) {
    let a = fleet.node_with("history:\n  chunk_size: 1KiB\n", &[]).await;
    let created = open_console(&mut a.agent().await, "vm1").await;
    let mut g1 = FakeGuest::connect(&created.guest_socket).await;
    g1.write(&lines(1, n)).await;
    wait_offset(
        &mut a.agent().await,
        "vm1",
        DEVICE,
        lines(1, n).len() as u64,
    )
    .await;
    (a, g1)
}

/// The source is killed while the destination imports (held after its first chunk): the
/// destination goes on alone; what it could not import, up to the end the source's agent last
/// saw, is a gap; MIGRATED_IN says why; the guest's output continues after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_killed_mid_import_leaves_a_gap_with_the_reason() {
    let fleet = Fleet::new();
    // More than B's import buffer (its HTTP/2 window) holds: A still has bytes to send when it
    // dies.
    let (mut a, _g1) = source_with_lines(&fleet, 30_000).await;
    let b = fleet
        .node_with(
            "migration:\n  buffer: 64KiB\n",
            &[("CONLOG_FAULT_POINTS", "migration.import.apply=sleep:3000@2")],
        )
        .await;
    let source_end = lines(1, 30_000).len() as u64;
    let from = migrate_from(&a, "vm1", source_end).await;
    let on_b = create_migrating_console(&b, "vm1", from).await.unwrap();
    // The first chunk is in; the second waits at the fault point.
    wait_stream(
        &mut b.agent().await,
        "vm1",
        DEVICE,
        "the first chunk imported",
        |s| s.offset >= 1024,
    )
    .await;
    a.kill().await;
    let mut g2 = FakeGuest::connect(&on_b.guest_socket).await;
    g2.write(&lines(30_001, 30_050)).await;
    wait_imported(&b, "vm1", DEVICE, lines(1, 30_050).len() as u64).await;
    let history = whole_history(&b, "vm1", DEVICE).await;
    history.ended.clone().unwrap();
    let gaps = history.gaps();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let (from, to) = gaps[0];
    assert!(from >= 1024 && from < source_end, "{gaps:?}");
    assert_eq!(to, source_end);
    let data = history.data();
    let imported = from as usize;
    assert_eq!(&data[..imported], &lines(1, 30_000)[..imported]);
    assert_lines("B's own output", &data[imported..], 30_001, 30_050);
    let migrated_in = history.events(Kind::MigratedIn);
    assert_eq!(migrated_in.len(), 1, "{migrated_in:?}");
    assert_eq!(migrated_in[0].0, source_end);
    assert!(
        migrated_in[0].1.contains("could not be reached")
            && migrated_in[0].1.contains(&format!("{from}..{source_end}")),
        "{migrated_in:?}"
    );
}

/// A source that cannot be reached at all: the destination starts at the offset its agent
/// gave (the source's end as last seen) and says so; without one, it starts at its own end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_unreachable_at_start_is_said_in_history() {
    let fleet = Fleet::new();
    let b = fleet.node().await;
    for (guest, offset) in [("vm1", 5000), ("vm2", 0)] {
        let from = proto::MigrateFrom {
            node: "127.0.0.1:1".into(),
            token: "a.b.c".into(),
            offset,
        };
        let on_b = create_migrating_console(&b, guest, from).await.unwrap();
        let mut guest_peer = FakeGuest::connect(&on_b.guest_socket).await;
        guest_peer.write(&lines(1, 10)).await;
        wait_imported(&b, guest, DEVICE, offset + lines(1, 10).len() as u64).await;
        let history = whole_history(&b, guest, DEVICE).await;
        assert_eq!(history.first_data(), Some(offset));
        assert_lines("B's output", &history.data(), 1, 10);
        let migrated_in = history.events(Kind::MigratedIn);
        assert_eq!(migrated_in.len(), 1, "{migrated_in:?}");
        assert_eq!(migrated_in[0].0, offset);
        let detail = &migrated_in[0].1;
        assert!(
            detail.contains("127.0.0.1:1: the source could not be reached"),
            "{detail}"
        );
        if offset > 0 {
            assert!(detail.contains("offsets 0..5000"), "{detail}");
        } else {
            assert!(detail.contains("gave no later end"), "{detail}");
        }
    }
}

/// The destination is killed in the middle of an import (at its third chunk): started again,
/// it resumes the import from its end, its guest's output still waits for it, and its history
/// is every line once with continuous offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_killed_mid_import_resumes_it() {
    let fleet = Fleet::new();
    let (a, g1) = source_with_lines(&fleet, 300).await;
    let mut b = fleet
        .node_with(
            "",
            &[("CONLOG_FAULT_POINTS", "migration.import.apply=kill@3")],
        )
        .await;
    let from = migrate_from(&a, "vm1", 0).await;
    create_migrating_console(&b, "vm1", from).await.unwrap();
    let status = b.wait_exit().await;
    assert!(
        status.code().is_none(),
        "B was killed at the fault point: {status}"
    );
    b.env.clear();
    b.restart().await;
    // What B imported before the kill is kept (the resumed import may already have the rest:
    // it starts with the restart).
    let info = stream_info(&b, "vm1", DEVICE).await.expect("restored");
    assert!(
        info.offset >= 1024 && info.offset <= lines(1, 300).len() as u64,
        "{info:?}"
    );
    // The guest on B (QEMU there) prints at once; the import is not over.
    let on_b = open_console(&mut b.agent().await, "vm1").await;
    let mut g2 = FakeGuest::connect(&on_b.guest_socket).await;
    g2.write(&lines(301, 400)).await;
    drop(g1);
    remove_moved(&a, "vm1", &b).await;
    wait_imported(&b, "vm1", DEVICE, lines(1, 400).len() as u64).await;
    let history = whole_history(&b, "vm1", DEVICE).await;
    history.ended.clone().unwrap();
    assert!(history.gaps().is_empty(), "{:?}", history.gaps());
    assert_lines("B's history", &history.data(), 1, 400);
    let migrated_in = history.events(Kind::MigratedIn);
    assert_eq!(
        migrated_in.iter().map(|e| e.0).collect::<Vec<_>>(),
        [lines(1, 300).len() as u64],
        "{migrated_in:?}"
    );
    assert!(!b
        .data_dir()
        .join("state/guests/vm1/serial0.import")
        .exists());
}
