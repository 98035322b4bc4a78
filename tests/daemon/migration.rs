//! Live migration between real `conlogd` nodes on loopback with TLS (docs/design.md, "Live
//! migration"): the destination imports the source's history by offset and follows it until
//! the source's stream is done; its guest's output comes after the last imported byte; the
//! source answers its clients with the moved status; log pipes too; an aborted migration, a
//! migration back and a chain keep the offsets continuous.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes and offsets in tests are small numbers"
)]

use crate::migration_common::*;
use crate::support::*;
use conlog::proto::{self, attach::Mode, history_event::Kind, read_history_request::Start, Access};
use tonic::Code;

/// A guest printing numbered lines migrates from A to B at a random line, while a watcher and
/// a history follower are attached to A over TLS: B's history from its oldest byte is every
/// line once, source history then destination output, offsets continuous from 0; the source's
/// clients get every byte A logged, then the moved status naming B and the offset where B
/// continues, and new calls on A get it at once; the move is an event on both nodes; B's guest
/// printed before the import was over, and its lines still come after every line of A's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_migrates_with_every_line_once_and_clients_are_redirected() {
    let fleet = Fleet::new();
    // B applies each imported chunk slowly: its guest prints while the import runs.
    let (a, b) = (
        fleet.node_with("history:\n  chunk_size: 1KiB\n", &[]).await,
        fleet
            .node_with(
                "",
                &[("CONLOG_FAULT_POINTS", "migration.import.apply=sleep:20")],
            )
            .await,
    );
    let mut agent_a = a.agent().await;
    let created = open_console(&mut agent_a, "vm1").await;
    let mut g1 = FakeGuest::connect(&created.guest_socket).await;
    wait_guest_connected(&mut agent_a, "vm1", DEVICE, true).await;
    let k = random_in(150, 400);
    let half = k / 2;
    g1.write(&lines(1, half)).await;
    wait_offset(&mut agent_a, "vm1", DEVICE, lines(1, half).len() as u64).await;

    // A direct watcher and a history follower of the source.
    let token = a.token("vm1", "", Access::Read, 600).await;
    let mut watcher = watch(
        fleet.client(&a, &token).await,
        watch_request("vm1", Mode::ReadOnly),
    )
    .await
    .expect("WatchConsole on the source");
    let follower = tokio::spawn({
        let channel = fleet.client(&a, &token).await;
        async move { read_all(channel, "vm1", "", Some(Start::FromOffset(0)), true).await }
    });

    // The destination creates the console from A; its guest (QEMU -incoming) connects.
    let from = migrate_from(&a, "vm1", 0).await;
    let on_b = create_migrating_console(&b, "vm1", from)
        .await
        .expect("CreateConsole with migrate_from");
    let info = stream_info(&b, "vm1", DEVICE).await.expect("listed on B");
    assert_eq!(info.migrating_from, endpoint_of(&a));
    let mut g2 = FakeGuest::connect(&on_b.guest_socket).await;
    wait_guest_connected(&mut b.agent().await, "vm1", DEVICE, true).await;

    // The source guest prints on, stops (QEMU on A exits), B's guest goes on at once.
    g1.write(&lines(half + 1, k)).await;
    let source_end = lines(1, k).len() as u64;
    wait_offset(&mut agent_a, "vm1", DEVICE, source_end).await;
    drop(g1);
    let total = 2 * k;
    g2.write(&lines(k + 1, total)).await;
    // A's agent: the guest is on B now.
    remove_moved(&a, "vm1", &b).await;
    wait_imported(&b, "vm1", DEVICE, lines(1, total).len() as u64).await;

    let history = whole_history(&b, "vm1", DEVICE).await;
    history.ended.clone().expect("B's history ends cleanly");
    assert_eq!(history.first_data(), Some(0));
    assert!(history.gaps().is_empty(), "{:?}", history.gaps());
    assert_lines("B's history", &history.data(), 1, total);
    let migrated_in = history.events(Kind::MigratedIn);
    assert_eq!(migrated_in.len(), 1, "{migrated_in:?}");
    assert_eq!(
        migrated_in[0].0, source_end,
        "MIGRATED_IN where B's own output starts"
    );
    assert!(
        migrated_in[0].1.contains(&endpoint_of(&a)),
        "{migrated_in:?}"
    );
    // The source's events travelled with the bytes (A's guest connected at 0); B's own guest
    // connected, recorded after the imported bytes.
    let connected: Vec<u64> = history
        .events(Kind::GuestConnected)
        .iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        connected,
        [0, source_end],
        "{:?}",
        history
            .chunks
            .iter()
            .filter_map(|c| c.event.as_ref())
            .collect::<Vec<_>>()
    );

    // The source's watcher: every byte A logged, then the moved status.
    let ended = loop {
        match watcher.next().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the watch ended without the moved status"),
            Err(status) => break status,
        }
    };
    assert_moved("the source's watcher", &ended, &b, source_end, DEVICE);
    assert_lines("the source's watcher", &watcher.output, half + 1, k);
    // The follower: the whole source history, then the status.
    let followed = bounded("the follower ends", follower).await.unwrap();
    assert_moved(
        "the source's follower",
        followed.ended.as_ref().unwrap_err(),
        &b,
        source_end,
        DEVICE,
    );
    assert_lines("the source's follower", &followed.data(), 1, k);

    // New calls on A: the status at once.
    let refused = watch(
        fleet.client(&a, &token).await,
        watch_request("vm1", Mode::ReadOnly),
    )
    .await
    .expect_err("WatchConsole on a moved console");
    assert_moved("a new watch", &refused, &b, source_end, DEVICE);
    let at_end = read_all(
        fleet.client(&a, &token).await,
        "vm1",
        "",
        Some(Start::FromOffset(source_end)),
        true,
    )
    .await;
    assert!(at_end.chunks.is_empty(), "{:?}", at_end.chunks);
    assert_moved(
        "a history read at the move",
        at_end.ended.as_ref().unwrap_err(),
        &b,
        source_end,
        DEVICE,
    );
    // A keeps its history with the move in it.
    let kept = whole_history(&a, "vm1", DEVICE).await;
    assert_lines("A's kept history", &kept.data(), 1, k);
    assert_eq!(
        kept.events(Kind::MigratedOut)
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        [source_end]
    );
    // Listed on A while the redirect is kept: where it went, and where B continues.
    let listed = stream_info(&a, "vm1", DEVICE)
        .await
        .expect("the moved stream is listed on A");
    assert_eq!(
        (listed.moved_to.as_str(), listed.offset, listed.open),
        (endpoint_of(&b).as_str(), source_end, false),
        "{listed:?}"
    );

    // The redirect is persisted: it survives a restart of the source.
    let mut a = a;
    a.stop().await;
    a.restart().await;
    let token = a.token("vm1", "", Access::Read, 600).await;
    let refused = watch(
        fleet.client(&a, &token).await,
        watch_request("vm1", Mode::ReadOnly),
    )
    .await
    .expect_err("WatchConsole on a moved console after a restart");
    assert_moved("a watch after a restart", &refused, &b, source_end, DEVICE);
    let listed = stream_info(&a, "vm1", DEVICE)
        .await
        .expect("the moved stream is listed on A after a restart");
    assert_eq!(listed.moved_to, endpoint_of(&b), "{listed:?}");
}

/// A guest's log pipe migrates too: B's pipe stream continues A's offsets; A's pipe closing
/// (QEMU on A exits) while B's pipe is there ends the import; the source's history readers
/// get the moved status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_migrates_with_every_line_once() {
    let fleet = Fleet::new();
    let (a, b) = (fleet.node().await, fleet.node().await);
    let mut agent_a = a.agent().await;
    let k = random_in(100, 300);
    let (_, mut pipe_a) = open_pipe(&mut agent_a, "vm1", "qemu", None).await;
    std::io::Write::write_all(&mut pipe_a, &lines(1, k / 2)).unwrap();

    let from = migrate_from(&a, "vm1", 0).await;
    let mut agent_b = b.agent().await;
    let reply = bounded(
        "CreateLogPipe with migrate_from",
        agent_b.create_log_pipe(proto::CreateLogPipeRequest {
            guest: "vm1".into(),
            stream: "qemu".into(),
            migrate_from: Some(from),
            ..Default::default()
        }),
    )
    .await
    .expect("CreateLogPipe with migrate_from")
    .into_inner();
    let mut pipe_b = std::fs::File::from(claim(&reply).await.expect("the destination's pipe"));
    std::io::Write::write_all(&mut pipe_a, &lines(k / 2 + 1, k)).unwrap();
    drop(pipe_a);
    let source_end = lines(1, k).len() as u64;
    wait_closed(&mut agent_a, "vm1", "qemu", source_end).await;
    // B's guest writes at once: held until A's stream is done.
    std::io::Write::write_all(&mut pipe_b, &lines(k + 1, 2 * k)).unwrap();
    remove_moved(&a, "vm1", &b).await;
    wait_imported(&b, "vm1", "qemu", lines(1, 2 * k).len() as u64).await;
    let history = whole_history(&b, "vm1", "qemu").await;
    history.ended.clone().unwrap();
    assert!(history.gaps().is_empty(), "{:?}", history.gaps());
    assert_lines("B's pipe history", &history.data(), 1, 2 * k);
    assert_eq!(
        history
            .events(Kind::MigratedIn)
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        [source_end]
    );
    let token = a.token("vm1", "qemu", Access::Read, 600).await;
    let read = read_all(fleet.client(&a, &token).await, "vm1", "qemu", None, false).await;
    assert_lines("A's pipe history", &read.data(), 1, k);
    assert_moved(
        "a history read of A's pipe",
        read.ended.as_ref().unwrap_err(),
        &b,
        source_end,
        "qemu",
    );
    drop(pipe_b);
}

/// An aborted migration: the destination's agent removes the guest with its logs; the source
/// only served reads: its guest goes on, its clients stay attached, its history is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_migration_leaves_the_source_untouched() {
    let fleet = Fleet::new();
    let (a, b) = (fleet.node().await, fleet.node().await);
    let mut agent_a = a.agent().await;
    let created = open_console(&mut agent_a, "vm1").await;
    let mut g1 = FakeGuest::connect(&created.guest_socket).await;
    g1.write(&lines(1, 50)).await;
    let mut watcher = watch(
        local_channel(&a).await,
        watch_request("vm1", Mode::ReadOnly),
    )
    .await
    .unwrap();
    let from = migrate_from(&a, "vm1", 0).await;
    let on_b = create_migrating_console(&b, "vm1", from).await.unwrap();
    let _g2 = FakeGuest::connect(&on_b.guest_socket).await;
    // B has imported what A has; it keeps following.
    until("B imported A's lines", async || {
        stream_info(&b, "vm1", DEVICE)
            .await
            .is_some_and(|s| s.offset == lines(1, 50).len() as u64)
    })
    .await;
    let removed = bounded(
        "RemoveGuest delete_logs on B",
        b.agent().await.remove_guest(proto::RemoveGuestRequest {
            guest: "vm1".into(),
            delete_logs: true,
            ..Default::default()
        }),
    )
    .await
    .expect("abort on B")
    .into_inner();
    assert!(removed.logs_deleted >= 1, "{removed:?}");
    assert!(!b.log_path("vm1", DEVICE).exists());
    g1.write(&lines(51, 60)).await;
    watcher.wait_output(&lines(60, 60)).await;
    assert!(watcher.ended.is_none());
    let info = wait_offset(&mut agent_a, "vm1", DEVICE, lines(1, 60).len() as u64).await;
    assert!(info.guest_connected && info.moved_to.is_empty());
    assert_lines(
        "A's history",
        &whole_history(&a, "vm1", DEVICE).await.data(),
        1,
        60,
    );
}

/// A → B → A → ... and A → B → C: every node's history continues the same offsets; migrating
/// back imports only what the old source lacks (its kept stream keeps its offsets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_back_and_in_a_chain_keeps_offsets_continuous() {
    let fleet = Fleet::new();
    let (a, b, c) = (fleet.node().await, fleet.node().await, fleet.node().await);
    let created = open_console(&mut a.agent().await, "vm1").await;
    let mut guest = FakeGuest::connect(&created.guest_socket).await;
    guest.write(&lines(1, 100)).await;
    let mut printed = 100;
    // A → B → A → C.
    for (from, to) in [(&a, &b), (&b, &a), (&a, &c)] {
        let end = lines(1, printed).len() as u64;
        wait_offset(&mut from.agent().await, "vm1", DEVICE, end).await;
        let migrate = migrate_from(from, "vm1", 0).await;
        let on = create_migrating_console(to, "vm1", migrate)
            .await
            .expect("CreateConsole with migrate_from");
        let mut next = FakeGuest::connect(&on.guest_socket).await;
        drop(guest);
        next.write(&lines(printed + 1, printed + 100)).await;
        printed += 100;
        remove_moved(from, "vm1", to).await;
        wait_imported(to, "vm1", DEVICE, lines(1, printed).len() as u64).await;
        let history = whole_history(to, "vm1", DEVICE).await;
        assert_eq!(history.first_data(), Some(0));
        assert!(history.gaps().is_empty(), "{:?}", history.gaps());
        assert_lines("the destination's history", &history.data(), 1, printed);
        guest = next;
    }
    // C's history has the moves into A (at B's end) and into C (at A's end); A does not
    // import again what it had when it got the guest back (B's move-in at A's old end).
    let c_history = whole_history(&c, "vm1", DEVICE).await;
    let moved_in: Vec<u64> = c_history
        .events(Kind::MigratedIn)
        .iter()
        .map(|e| e.0)
        .collect();
    let at = |n| lines(1, n).len() as u64;
    assert_eq!(moved_in, [at(200), at(300)]);
    // A's history: its own first lines, B's lines, then its own again: one stream.
    let a_history = whole_history(&a, "vm1", DEVICE).await;
    assert_lines("A's kept history", &a_history.data(), 1, 300);
    let moved_out: Vec<u64> = a_history
        .events(Kind::MigratedOut)
        .iter()
        .map(|e| e.0)
        .collect();
    // Its own moves out; B's (at the end of B's stream) came with B's bytes if the follow
    // delivered it before B's moved status (an event at the very end of a followed stream
    // comes with the next byte, or at its end).
    assert!(
        moved_out == [at(100), at(300)] || moved_out == [at(100), at(200), at(300)],
        "{moved_out:?}"
    );
    drop(guest);
}

/// Bad `migrate_from` and `moved_to` get INVALID_ARGUMENT naming the rule; a node without
/// `migration.ca` imports from nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_migration_requests_are_refused_with_the_rule() {
    let fleet = Fleet::new();
    let a = fleet.node().await;
    let plain = Daemon::start().await;
    let mut agent = a.agent().await;
    for (from, needle) in [
        (
            proto::MigrateFrom {
                node: "nowhere".into(),
                token: "t".into(),
                offset: 0,
            },
            "migrate_from.node must be host:port",
        ),
        (
            proto::MigrateFrom {
                node: "127.0.0.1:1".into(),
                token: String::new(),
                offset: 0,
            },
            "migrate_from.token",
        ),
    ] {
        let refused = create_migrating_console(&a, "vm1", from).await;
        let message = expect_code(refused, Code::InvalidArgument, needle);
        assert!(message.contains(needle), "{message}");
    }
    let from = migrate_from(&a, "vm1", 0).await;
    let message = expect_code(
        create_migrating_console(&plain, "vm1", from).await,
        Code::InvalidArgument,
        "migration.ca",
    );
    assert!(message.contains("migration.ca"), "{message}");
    open_console(&mut agent, "vm2").await;
    for (moved_to, delete_logs, needle) in [
        ("no port", false, "moved_to must be host:port"),
        ("node2:7770", true, "cannot go with delete_logs"),
    ] {
        let refused = agent
            .remove_guest(proto::RemoveGuestRequest {
                guest: "vm2".into(),
                moved_to: moved_to.into(),
                delete_logs,
                ..Default::default()
            })
            .await;
        let message = expect_code(refused, Code::InvalidArgument, needle);
        assert!(message.contains(needle), "{message}");
    }
    assert!(stream_info(&a, "vm2", DEVICE).await.is_some());
}

/// After a move, a token the source issued for the guest works at the destination: the
/// destination asks the source to check it (and caches the answer); a token of the source for
/// another guest is refused without asking; with the source down, an unchecked token is
/// `UNAVAILABLE` naming the source, and a token from the destination's agent works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sources_tokens_work_at_the_destination() {
    let fleet = Fleet::new();
    let (mut a, b) = (fleet.node().await, fleet.node().await);
    let created = open_console(&mut a.agent().await, "vm1").await;
    open_console(&mut a.agent().await, "vm2").await;
    let mut g1 = FakeGuest::connect(&created.guest_socket).await;
    g1.write(&lines(1, 10)).await;
    let read = a.token("vm1", "", Access::Read, 600).await;
    let unchecked = a.token("vm1", DEVICE, Access::Read, 600).await;
    let other_guest = a.token("vm2", "", Access::Read, 600).await;
    wait_offset(
        &mut a.agent().await,
        "vm1",
        DEVICE,
        lines(1, 10).len() as u64,
    )
    .await;
    let from = migrate_from(&a, "vm1", 0).await;
    let on_b = create_migrating_console(&b, "vm1", from).await.unwrap();
    let mut g2 = FakeGuest::connect(&on_b.guest_socket).await;
    drop(g1);
    g2.write(&lines(11, 20)).await;
    remove_moved(&a, "vm1", &b).await;
    wait_imported(&b, "vm1", DEVICE, lines(1, 20).len() as u64).await;

    let history = read_all(fleet.client(&b, &read).await, "vm1", "", None, false).await;
    history
        .ended
        .clone()
        .expect("A's token reads the guest's history on B");
    assert_lines("B's history with A's token", &history.data(), 1, 20);
    let mut watcher = watch(
        fleet.client(&b, &read).await,
        watch_request("vm1", Mode::ReadOnly),
    )
    .await
    .expect("A's token watches the guest on B");
    g2.write(&lines(21, 21)).await;
    watcher.wait_output(&lines(21, 21)).await;
    // Read-only stays read-only.
    let refused = watch(
        fleet.client(&b, &read).await,
        watch_request("vm1", Mode::ReadWrite),
    )
    .await
    .expect_err("a read token takes no writer lease");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // A's token for a guest that did not move here is refused as any foreign token.
    let refused = read_all(fleet.client(&b, &other_guest).await, "vm2", "", None, false).await;
    let status = refused.ended.expect_err("A's token for vm2 on B");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A is down: what B checked stays good for a while; a token B never saw cannot be checked.
    a.stop().await;
    let history = read_all(fleet.client(&b, &read).await, "vm1", "", None, false).await;
    history.ended.clone().expect("a checked token, cached");
    let history = read_all(fleet.client(&b, &unchecked).await, "vm1", "", None, false).await;
    let status = history.ended.expect_err("an unchecked token with A down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&endpoint_of(&a)), "{status:?}");
    let own = b.token("vm1", "", Access::Read, 600).await;
    let history = read_all(fleet.client(&b, &own).await, "vm1", "", None, false).await;
    history.ended.clone().expect("B's own token");
}

/// A history follower with `events` waiting at the live end gets the guest's disconnect as
/// soon as it is in the history, with no later byte (what lets an import end on the source
/// guest's leaving; docs/design.md, "Live migration").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_gets_an_event_at_the_live_end_without_a_later_byte() {
    let node = Fleet::new().node().await;
    let mut agent = node.agent().await;
    let created = open_console(&mut agent, "vm1").await;
    let mut guest = FakeGuest::connect(&created.guest_socket).await;
    wait_guest_connected(&mut agent, "vm1", DEVICE, true).await;
    let data = lines(1, 20);
    guest.write(&data).await;
    wait_offset(&mut agent, "vm1", DEVICE, data.len() as u64).await;

    let mut chunks = bounded(
        "ReadHistory follow",
        local_channel(&node)
            .await
            .console()
            .read_history(proto::ReadHistoryRequest {
                guest: "vm1".into(),
                start: Some(Start::FromOffset(0)),
                follow: true,
                events: true,
                ..Default::default()
            }),
    )
    .await
    .expect("ReadHistory")
    .into_inner();
    let mut got = 0;
    while got < data.len() as u64 {
        let chunk = bounded("a chunk", chunks.message())
            .await
            .expect("ReadHistory")
            .expect("a chunk");
        if chunk.event.is_none() && chunk.gap.is_none() {
            got = chunk.offset + chunk.data.len() as u64;
        }
    }
    // The follower waits at the live end; the guest leaves and prints nothing more.
    drop(guest);
    let event = loop {
        let chunk = bounded(
            "the disconnect at the live end, with no later byte",
            chunks.message(),
        )
        .await
        .expect("ReadHistory")
        .expect("a chunk");
        assert!(
            chunk.event.is_some(),
            "only events after the end: {chunk:?}"
        );
        let event = chunk.event.unwrap();
        if event.kind == Kind::GuestDisconnected as i32 {
            break event;
        }
    };
    assert_eq!(event.offset, data.len() as u64);
}

/// The import ends when the source's guest leaves (QEMU on A exits after the switchover) and
/// B's guest is there, with no `RemoveGuest` from A's agent: B's output is not held until the
/// switchover timeout, and MIGRATED_IN says why the import ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_ends_on_the_source_guests_disconnect() {
    let fleet = Fleet::new();
    let (a, b) = (fleet.node().await, fleet.node().await);
    let mut agent_a = a.agent().await;
    let created = open_console(&mut agent_a, "vm1").await;
    let mut g1 = FakeGuest::connect(&created.guest_socket).await;
    wait_guest_connected(&mut agent_a, "vm1", DEVICE, true).await;
    let k = random_in(50, 200);
    g1.write(&lines(1, k)).await;
    let source_end = lines(1, k).len() as u64;
    wait_offset(&mut agent_a, "vm1", DEVICE, source_end).await;

    let from = migrate_from(&a, "vm1", 0).await;
    let on_b = create_migrating_console(&b, "vm1", from)
        .await
        .expect("CreateConsole with migrate_from");
    let mut g2 = FakeGuest::connect(&on_b.guest_socket).await;
    wait_guest_connected(&mut b.agent().await, "vm1", DEVICE, true).await;
    // B's import has all of A's bytes: it waits at A's live end. A's guest leaves there (A's
    // agent says nothing, no later byte); B's guest prints.
    wait_stream(
        &mut b.agent().await,
        "vm1",
        DEVICE,
        "A's bytes imported",
        |s| s.offset >= source_end,
    )
    .await;
    drop(g1);
    wait_guest_connected(&mut agent_a, "vm1", DEVICE, false).await;
    let total = 2 * k;
    g2.write(&lines(k + 1, total)).await;
    wait_imported(&b, "vm1", DEVICE, lines(1, total).len() as u64).await;

    let history = whole_history(&b, "vm1", DEVICE).await;
    history.ended.clone().expect("B's history ends cleanly");
    assert!(history.gaps().is_empty(), "{:?}", history.gaps());
    assert_lines("B's history", &history.data(), 1, total);
    let migrated_in = history.events(Kind::MigratedIn);
    assert_eq!(migrated_in.len(), 1, "{migrated_in:?}");
    assert_eq!(migrated_in[0].0, source_end, "{migrated_in:?}");
    assert!(
        migrated_in[0].1.contains("the guest left the source"),
        "ended on the source guest's leaving, not the switchover timeout: {migrated_in:?}"
    );
}

/// Where a guest was imported from outlives the destination's restart: A's token for the guest
/// still works on B afterwards (checked at A), and B's own token too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sources_tokens_work_at_the_destination_after_it_restarts() {
    let fleet = Fleet::new();
    let (a, mut b) = (fleet.node().await, fleet.node().await);
    let created = open_console(&mut a.agent().await, "vm1").await;
    let mut g1 = FakeGuest::connect(&created.guest_socket).await;
    g1.write(&lines(1, 10)).await;
    let read = a.token("vm1", "", Access::Read, 600).await;
    wait_offset(
        &mut a.agent().await,
        "vm1",
        DEVICE,
        lines(1, 10).len() as u64,
    )
    .await;
    let from = migrate_from(&a, "vm1", 0).await;
    let on_b = create_migrating_console(&b, "vm1", from).await.unwrap();
    let mut g2 = FakeGuest::connect(&on_b.guest_socket).await;
    drop(g1);
    g2.write(&lines(11, 20)).await;
    remove_moved(&a, "vm1", &b).await;
    wait_imported(&b, "vm1", DEVICE, lines(1, 20).len() as u64).await;
    drop(g2);

    // B restarts (its memory of the import is gone); A's token, never shown to B before.
    b.stop().await;
    b.restart().await;
    let history = read_all(fleet.client(&b, &read).await, "vm1", "", None, false).await;
    history
        .ended
        .clone()
        .expect("A's token reads the guest's history on B after B restarted");
    assert_lines("B's history with A's token", &history.data(), 1, 20);
}
