//! The busy daemon of the upgrade and takeover tests: writers in log pipes, a guest printing on a
//! console, and two readers that resume by offset.

use super::{get, wait_list, GuestPrinter, PipeWriter, Reader, Source};
use crate::support::*;
use conlog::proto::{self, LogMode};
use std::path::Path;

/// The guests whose `qemu` log pipe a [`PipeWriter`] fills.
pub const PIPES: [&str; 3] = ["vm-a", "vm-b", "vm-c"];
/// The guest whose console (`support::DEVICE`) a fake guest prints on.
pub const CONSOLE: &str = "vm-console";
/// A cap that is never reached: every byte stays in one file.
pub const HUGE: u64 = 1 << 30;

/// Writers pushing numbered lines into the log pipes of [`PIPES`] and a fake guest printing on
/// the console of [`CONSOLE`], with two readers from offset 0 that resume by offset after every
/// end of their call: an `AttachConsole` client on [`CONSOLE`] and a `ReadHistory` follower of
/// one pipe.
pub struct Workload {
    /// The console as created (its guest and client sockets).
    pub console: proto::CreateConsoleResponse,
    pub writers: Writers,
    pub console_reader: Reader,
    pub history_reader: Reader,
}

/// The writers of a [`Workload`].
pub struct Writers {
    /// One a pipe, in the order of [`PIPES`].
    pipes: Vec<PipeWriter>,
    guest: GuestPrinter,
}

/// What the [`Writers`] wrote, all of it logged.
pub struct Written {
    /// What was written into each pipe, in the order of [`PIPES`].
    pub pipes: Vec<Vec<u8>>,
    /// The fake guest, still connected.
    pub guest: FakeGuest,
    /// What it printed on the console.
    pub printed: Vec<u8>,
    /// `ListGuests` once every byte was logged.
    pub listing: proto::ListGuestsResponse,
}

impl Workload {
    /// Starts it on `daemon`: pipe `PIPES[i]` capped by `pipe_limits[i]`, the console by
    /// [`HUGE`], the follower on `followed`'s pipe. Both readers start at offset 0 and have
    /// attached (bounded) when it returns: the console client before the guest connected.
    pub async fn start(
        daemon: &Daemon,
        pipe_limits: [proto::LogLimits; PIPES.len()],
        followed: &str,
    ) -> Self {
        let socket = daemon.socket();
        let mut agent = daemon.agent().await;
        let mut pipes = Vec::new();
        for (guest, cap) in PIPES.into_iter().zip(pipe_limits) {
            let (_, pipe) = open_pipe(&mut agent, guest, "qemu", Some(cap)).await;
            pipes.push(PipeWriter::start(guest, pipe));
        }
        let console = create_console(
            &mut agent,
            CONSOLE,
            "",
            Some(limits(HUGE, 1, LogMode::Rotate)),
        )
        .await
        .unwrap();
        drop(agent);
        let console_reader = Reader::start(
            &socket,
            Source::Console {
                guest: CONSOLE.into(),
            },
        );
        let history_reader = Reader::start(
            &socket,
            Source::History {
                guest: followed.into(),
                stream: "qemu".into(),
            },
        );
        console_reader.wait_attaches(1).await;
        history_reader.wait_attaches(1).await;
        let guest = GuestPrinter::start("console", FakeGuest::connect(&console.guest_socket).await);
        Self {
            console,
            writers: Writers { pipes, guest },
            console_reader,
            history_reader,
        }
    }
}

impl Writers {
    /// Stops every writer and the guest's printing, then waits (bounded, through the local
    /// `socket`) until the daemon logged all they wrote and every pipe is closed.
    pub async fn stop(self, socket: &Path) -> Written {
        let mut pipes = Vec::new();
        for writer in self.pipes {
            pipes.push(writer.finish().await);
        }
        let (guest, printed) = self.guest.finish().await;
        let listing = wait_list(socket, "every byte logged", |r| {
            PIPES.iter().zip(&pipes).all(|(g, w)| {
                let s = get(r, g, "qemu");
                !s.open && s.offset == w.len() as u64
            }) && get(r, CONSOLE, DEVICE).offset == printed.len() as u64
        })
        .await;
        Written {
            pipes,
            guest,
            printed,
            listing,
        }
    }
}
