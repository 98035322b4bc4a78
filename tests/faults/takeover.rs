//! Takeover by a successor (`conlogd --takeover`) against the real binary: no byte lost and no
//! connection refused while writers, a guest and clients are busy; and the same with 2,000
//! guests, whose descriptors travel in many SCM_RIGHTS batches.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use crate::support;
use crate::upgrade_common;

use conlog::proto::LogMode;
use std::time::Instant;
use support::*;
use tonic::Code;
use upgrade_common::*;

/// Successive takeovers: the daemon started by the harness, then each successor in turn.
const TAKEOVERS: usize = 4;

/// While three writers push lines into log pipes, a fake guest prints on a console, two
/// readers follow (AttachConsole and ReadHistory, resuming by offset), and two probes connect
/// over and over to every listening socket and call the daemon: a successor takes over, then
/// another one takes over from it. Each old process exits 0, the new one serves with a new pid
/// on the same sockets (same inodes, same ports), the console keeps its guest connection,
/// every byte is logged exactly once and in order, the readers lose nothing, and no
/// connection is ever refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_loses_no_byte_and_refuses_no_connection() {
    let started = Instant::now();
    let mut daemon = Daemon::start().await;
    let socket = daemon.socket();
    let (tcp, metrics) = (daemon.tcp, daemon.metrics);
    let Workload {
        console,
        writers,
        console_reader,
        history_reader,
    } = Workload::start(
        &daemon,
        [limits(HUGE, 1, LogMode::Rotate); PIPES.len()],
        PIPES[1],
    )
    .await;

    let sockets = ["conlogd.sock", "fd.sock", "handover.sock"].map(|name| {
        let path = daemon.runtime_dir().join(name);
        let ino = inode(&path);
        (path, ino)
    });
    let guest_socket = std::path::PathBuf::from(&console.guest_socket);
    let guest_socket_inode = inode(&guest_socket);
    let connect_probe = ConnectProbe::start(vec![
        Target::Unix(socket.clone()),
        Target::Unix(daemon.fd_socket()),
        Target::Unix(std::path::PathBuf::from(&console.client_socket)),
        Target::Tcp(tcp),
        Target::Tcp(metrics),
    ]);
    let call_probe = CallProbe::start(&socket, tcp);
    connect_probe.wait_more(10).await;

    let mut before = wait_list(&socket, "every stream logging", |r| {
        PIPES
            .iter()
            .all(|g| find(r, g, "qemu").is_some_and(|s| s.offset > 0))
            && find(r, CONSOLE, DEVICE).is_some_and(|s| s.guest_connected && s.offset > 0)
    })
    .await;

    let mut successors: Vec<Successor> = Vec::new();
    let mut took = Vec::new();
    for n in 1..=TAKEOVERS {
        let old_pid = successors
            .last()
            .map_or_else(|| daemon.pid(), Successor::pid);
        let begun = Instant::now();
        let mut successor = Successor::spawn(&daemon, tcp, metrics);
        let ready = successor.wait_ready().await;
        took.push(begun.elapsed());
        assert_eq!(
            field::<u32>(&ready, "pid="),
            Some(successor.pid()),
            "{ready}"
        );
        assert_ne!(successor.pid(), old_pid);
        assert_eq!(field(&ready, "tcp="), Some(tcp), "same TCP port: {ready}");
        assert_eq!(
            field(&ready, "metrics="),
            Some(metrics),
            "same metrics port"
        );
        let status = match successors.last_mut() {
            None => daemon.wait_exit().await,
            Some(old) => old.wait_exit().await,
        };
        assert_eq!(
            status.code(),
            Some(0),
            "takeover {n}: the old daemon exits 0 once the successor confirmed:\n{}",
            successors
                .last()
                .map_or_else(|| daemon.stderr(), Successor::stderr)
        );
        successor.assert_took_over();
        call_probe.wait_served(&format!("after takeover {n}")).await;
        console_reader.wait_attaches(n as u32 + 1).await;
        history_reader.wait_attaches(n as u32 + 1).await;
        let now = wait_list(
            &socket,
            &format!("every stream logging after takeover {n}"),
            |r| {
                PIPES.iter().all(|g| {
                    let s = get(r, g, "qemu");
                    s.open && s.writers == 1 && s.offset > get(&before, g, "qemu").offset
                }) && {
                    let c = get(r, CONSOLE, DEVICE);
                    c.guest_connected && c.offset > get(&before, CONSOLE, DEVICE).offset
                }
            },
        )
        .await;
        before = now;
        connect_probe.wait_more(10).await;
        successors.push(successor);
    }

    let Written {
        pipes: written,
        guest: _guest,
        printed,
        ..
    } = writers.stop(&socket).await;
    let (connects, refused) = connect_probe.finish().await;
    let calls = call_probe.finish().await;
    let log_dir = daemon.log_dir();
    for (guest, wrote) in PIPES.iter().zip(&written) {
        assert_same(
            &format!("{guest}: log vs bytes written"),
            &read_log(&log_dir, guest, "qemu"),
            wrote,
        );
    }
    assert_same(
        "console log vs guest output",
        &read_log(&log_dir, CONSOLE, DEVICE),
        &printed,
    );
    let (seen, story) = console_reader.finish(printed.len() as u64).await;
    assert_same("AttachConsole client vs guest output", &seen, &printed);
    let (followed, follow_story) = history_reader.finish(written[1].len() as u64).await;
    assert_same(
        "ReadHistory follower vs bytes written",
        &followed,
        &written[1],
    );
    for (what, story) in [("console client", &story), ("follower", &follow_story)] {
        assert!(
            story.unexpected_failures().is_empty(),
            "{what}: reconnection attempts failed otherwise than by landing on the leaving \
             daemon: {:#?}",
            story.unexpected_failures()
        );
        // At least one "come back" per takeover. A client that comes back while the old daemon
        // is still draining is told again (same offset), so more ends are legitimate; the bytes
        // it collected are checked exactly above.
        assert!(story.ends.len() >= TAKEOVERS, "{what}: {story:?}");
        assert!(
            story
                .ends
                .iter()
                .all(|(code, _)| *code == Code::Unavailable),
            "{what}: ended with UNAVAILABLE at each takeover: {story:?}"
        );
    }
    assert!(story.guest_connected[1..].iter().all(|c| *c), "{story:?}");

    assert!(
        refused.is_empty(),
        "connections refused during the takeovers ({connects} succeeded): {refused:#?}"
    );
    assert!(
        calls.unexpected().is_empty(),
        "calls during the takeovers failed otherwise than by landing on the leaving daemon \
         (refused, the pre-takeover token refused, another status): {:#?}",
        calls.unexpected()
    );
    assert!(calls.served > 0, "{calls:?}");
    for (path, ino) in &sockets {
        assert_eq!(inode(path), *ino, "{} is the same socket", path.display());
    }
    assert_eq!(
        inode(&guest_socket),
        guest_socket_inode,
        "same guest socket"
    );

    let all_stderr: Vec<String> = std::iter::once(daemon.stderr())
        .chain(successors.iter().map(Successor::stderr))
        .collect();
    let pauses = intervals(
        &all_stderr.join("\n"),
        "a successor is taking over",
        "conlogd ready",
    );
    let mut last = successors.pop().unwrap();
    let status = last.stop().await;
    assert!(status.success(), "{status}\n{}", last.stderr());
    eprintln!(
        "{TAKEOVERS} takeovers, each ready after {took:.0?}; {connects} connects and {} calls \
         served meanwhile ({} calls failed and were retried: {:?}); logged {:?} bytes in pipes, \
         {} on the console; frozen to ready: {}; test {:.1?}",
        calls.served,
        calls.failed.len(),
        calls.failed.iter().take(3).collect::<Vec<_>>(),
        written.iter().map(Vec::len).collect::<Vec<_>>(),
        printed.len(),
        summary(&pauses),
        started.elapsed()
    );
}

const GUESTS: usize = 2000;
/// Descriptors the successor may hold more or fewer than the old daemon (client connections
/// being set up or torn down at the two moments they are counted), as in `upgrade.rs`.
const FD_SLACK: usize = 4;
const CONSOLES: usize = 200;

fn guest_name(i: usize) -> String {
    format!("g{i:04}")
}

/// Raises this process's RLIMIT_NOFILE to its hard limit (the test holds thousands of pipe
/// write ends and guest sockets); returns the new soft limit.
fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).expect("raise RLIMIT_NOFILE");
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// 2,000 guests with a claimed log pipe each (write ends held here) and 200 of them with a
/// console and a connected fake guest: a successor takes over (the descriptors travel in
/// batches of at most 253). Every stream is still listed and open afterwards, every console
/// still has its guest, and a line written into each pipe and by each guest after the
/// takeover lands in its log after the line written before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_with_2000_guests() {
    let _heavy = heavy().await; // one heavy test at a time: support::heavy
    let started = Instant::now();
    let nofile = raise_nofile();
    assert!(
        nofile >= (GUESTS + CONSOLES + 200) as u64,
        "RLIMIT_NOFILE {nofile} is too low for {GUESTS} pipes"
    );
    let mut daemon = Daemon::start().await;
    let socket = daemon.socket();

    // Create and claim the pipes from a few tasks, each on its own connection.
    const TASKS: usize = 8;
    let mut creators = Vec::new();
    for t in 0..TASKS {
        let socket = socket.clone();
        creators.push(tokio::spawn(async move {
            let mut agent = agent(&socket).await;
            let mut pipes = Vec::new();
            for i in (t..GUESTS).step_by(TASKS) {
                let name = guest_name(i);
                let (_, pipe) = bounded(
                    &format!("creating and claiming the pipe of {name}"),
                    open_pipe(&mut agent, &name, "qemu", None),
                )
                .await;
                pipes.push((i, pipe));
            }
            pipes
        }));
    }
    let mut pipes: Vec<Option<std::fs::File>> = (0..GUESTS).map(|_| None).collect();
    for creator in creators {
        // Each step of the creators is bounded.
        for (i, pipe) in creator.await.expect("pipe creator panicked") {
            pipes[i] = Some(pipe);
        }
    }
    let mut pipes: Vec<std::fs::File> = pipes.into_iter().map(Option::unwrap).collect();
    let mut agent = agent(&socket).await;
    let mut guests = Vec::new();
    for i in 0..CONSOLES {
        let reply = create_console(&mut agent, &guest_name(i), "", None)
            .await
            .unwrap();
        guests.push(FakeGuest::connect(&reply.guest_socket).await);
    }
    let created = started.elapsed();

    let before = |i: usize| format!("{} before\n", guest_name(i)).into_bytes();
    let after = |i: usize| format!("{} after the takeover\n", guest_name(i)).into_bytes();
    use std::io::Write;
    for (i, pipe) in pipes.iter_mut().enumerate() {
        pipe.write_all(&before(i)).unwrap();
    }
    for (i, guest) in guests.iter_mut().enumerate() {
        guest.write(&before(i)).await;
    }
    let all_there = |r: &conlog::proto::ListGuestsResponse, line: &dyn Fn(usize) -> Vec<u8>| {
        r.guests.len() == GUESTS
            && (0..GUESTS).all(|i| {
                find(r, &guest_name(i), "qemu")
                    .is_some_and(|s| s.open && s.writers == 1 && s.offset == line(i).len() as u64)
            })
            && (0..CONSOLES).all(|i| {
                find(r, &guest_name(i), DEVICE)
                    .is_some_and(|s| s.guest_connected && s.offset == line(i).len() as u64)
            })
    };
    wait_list(&socket, "every stream open with its first line", |r| {
        all_there(r, &before)
    })
    .await;
    let old_fds = open_fds(daemon.pid());

    let begun = Instant::now();
    let mut successor = Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    let ready = successor.wait_ready().await;
    let took = begun.elapsed();
    assert_eq!(field::<u32>(&ready, "pid="), Some(successor.pid()));
    let status = daemon.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    let new_fds = open_fds(successor.pid());
    // The successor holds what the old daemon held: every stream's descriptors (none lost)
    // and nothing more (none leaked per guest, which 2,000 guests would show), give or take
    // the few of connections being set up or torn down.
    assert!(
        new_fds + FD_SLACK >= old_fds && new_fds <= old_fds + FD_SLACK,
        "the successor holds {new_fds} descriptors, the old daemon held {old_fds}: {}",
        describe_fds(successor.pid())
    );

    // Everything is still there, open, and at the same offsets.
    wait_list(&socket, "every stream still open after the takeover", |r| {
        all_there(r, &before)
    })
    .await;
    for (i, pipe) in pipes.iter_mut().enumerate() {
        pipe.write_all(&after(i)).unwrap();
    }
    for (i, guest) in guests.iter_mut().enumerate() {
        guest.write(&after(i)).await;
    }
    let both = |i: usize| [before(i), after(i)].concat();
    wait_list(&socket, "the second line of every stream logged", |r| {
        all_there(r, &both)
    })
    .await;
    let log_dir = daemon.log_dir();
    for i in 0..GUESTS {
        assert_same(
            &format!("{}/qemu", guest_name(i)),
            &read_log(&log_dir, &guest_name(i), "qemu"),
            &both(i),
        );
    }
    for i in 0..CONSOLES {
        assert_same(
            &format!("{}/serial0", guest_name(i)),
            &read_log(&log_dir, &guest_name(i), DEVICE),
            &both(i),
        );
    }
    let diagnostics = successor.stderr();
    let pause = intervals(
        &format!("{}\n{diagnostics}", daemon.stderr()),
        "a successor is taking over",
        "conlogd ready",
    );
    assert!(
        !diagnostics.contains("WARN") && !diagnostics.contains("ERROR"),
        "{diagnostics}"
    );

    // Closing every write end closes every stream.
    drop(pipes);
    wait_list(&socket, "every pipe closed", |r| {
        (0..GUESTS).all(|i| find(r, &guest_name(i), "qemu").is_some_and(|s| !s.open))
    })
    .await;
    let status = successor.stop().await;
    assert!(status.success(), "{status}\n{}", successor.stderr());
    eprintln!(
        "{GUESTS} guests ({CONSOLES} consoles): set up in {created:.1?}; takeover ready after \
         {took:.1?} (frozen to ready: {}), {old_fds} descriptors before, {new_fds} after; test {:.1?}",
        summary(&pause),
        started.elapsed()
    );
}
