//! Zero-loss upgrades: the state snapshot and the two ways it travels to the next image.
//!
//! - In place ([`exec`]): on SIGUSR1 or `Agent.Upgrade` the daemon freezes every actor (they stop
//!   reading, so unread bytes stay in the kernel's pipes and sockets), writes a [`snapshot`] to a
//!   memfd, keeps exactly the carried descriptors across `execve` of its binary path, and the new
//!   image adopts them. Same pid.
//! - Takeover ([`handover`]): a new process started with `--takeover` connects to
//!   `handover.sock`; the running daemon freezes and sends the snapshot and every descriptor
//!   with SCM_RIGHTS, the new one confirms, the old one commits (a verdict the new one waits
//!   for before it touches anything) and exits 0.
//!
//! In both, if the next image cannot take over, the frozen state is thawed in the running image
//! and it keeps serving: nothing logged or pending is lost. Before a freeze, [`gate`] lets the
//! calls in flight that create streams or pipes, or claim them, finish (so what they made is
//! carried) and refuses later ones. The snapshot also carries the daemon-wide counters.
//! [`trigger`] is how `Agent.Upgrade` asks the daemon's main loop for an in-place upgrade and
//! learns the outcome (typed: [`trigger::UpgradeError`], [`exec::PreflightError`]).
//!
//! This module owns the formats, the transports and the trigger; it imports none of the
//! modules that use it (daemon, server, keeper, handoff). Freezing and thawing belong to the
//! pipe and console actors ([`crate::pipe`], [`crate::console`]) and the registry
//! ([`crate::guests`]); the order freeze → offer → thaw on failure, shared by both ways, belongs
//! to the daemon (`daemon/transfer.rs`).

pub mod exec;
pub mod fds;
pub mod gate;
pub mod handover;
pub mod snapshot;
pub mod trigger;

use snapshot::{ConsoleEntry, HandoffEntry, ListenerIndexes, Snapshot, SnapshotError, StreamEntry};
use std::os::fd::OwnedFd;
use std::time::Duration;

/// A frozen console's descriptors and the input it had not written to the guest yet.
#[derive(Debug)]
pub struct ConsoleFds {
    pub guest_listener: OwnedFd,
    pub client_listener: OwnedFd,
    pub guest_connection: Option<OwnedFd>,
    pub pending_input: Vec<u8>,
}

/// A frozen stream: its pipe read ends, or its console.
#[derive(Debug)]
pub struct StreamFds {
    pub guest: String,
    pub stream: String,
    pub pipes: Vec<OwnedFd>,
    pub console: Option<ConsoleFds>,
}

/// A pipe whose write end waits for its client.
#[derive(Debug)]
pub struct HandoffFds {
    pub token: String,
    pub guest: String,
    pub stream: String,
    pub write_end: OwnedFd,
    pub expires_in: Duration,
}

/// The daemon-wide descriptors: the instance lock and every listening socket.
#[derive(Debug)]
pub struct ListenerFds {
    pub lock: OwnedFd,
    pub local: OwnedFd,
    pub fd_sock: OwnedFd,
    pub handover: OwnedFd,
    pub tcp: OwnedFd,
    pub metrics: Option<OwnedFd>,
    pub health: Option<OwnedFd>,
}

/// Everything carried from one image to the next.
#[derive(Debug)]
pub struct State {
    pub listeners: ListenerFds,
    pub streams: Vec<StreamFds>,
    pub handoffs: Vec<HandoffFds>,
    /// The daemon-wide counters the next image continues from (None from older images).
    pub counters: Option<crate::metrics::Counters>,
}

impl State {
    /// The snapshot and the descriptors it indexes.
    pub fn into_parts(self) -> (Snapshot, Vec<OwnedFd>) {
        let mut fds = Vec::new();
        let mut push = |fd: OwnedFd| {
            fds.push(fd);
            fds.len() - 1
        };
        let l = self.listeners;
        let listeners = ListenerIndexes {
            lock: push(l.lock),
            local: push(l.local),
            fd_sock: push(l.fd_sock),
            handover: push(l.handover),
            tcp: push(l.tcp),
            metrics: l.metrics.map(&mut push),
            health: l.health.map(&mut push),
        };
        let streams = self
            .streams
            .into_iter()
            .map(|s| StreamEntry {
                guest: s.guest,
                stream: s.stream,
                pipes: s.pipes.into_iter().map(&mut push).collect(),
                console: s.console.map(|c| ConsoleEntry {
                    guest_listener: push(c.guest_listener),
                    client_listener: push(c.client_listener),
                    guest_connection: c.guest_connection.map(&mut push),
                    pending_input: c.pending_input,
                }),
            })
            .collect();
        let handoffs = self
            .handoffs
            .into_iter()
            .map(|h| HandoffEntry {
                token: h.token,
                guest: h.guest,
                stream: h.stream,
                write_end: push(h.write_end),
                expires_in_ms: h.expires_in.as_millis() as u64,
            })
            .collect();
        let snapshot = Snapshot {
            from_pid: std::process::id(),
            listeners,
            streams,
            handoffs,
            counters: self.counters,
            verdicts: true,
        };
        (snapshot, fds)
    }

    /// Rebuilds the state from a snapshot and the descriptors that came with it.
    pub fn from_parts(snapshot: Snapshot, fds: Vec<OwnedFd>) -> Result<Self, SnapshotError> {
        let mut slots: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut take = |i: usize| -> Result<OwnedFd, SnapshotError> {
            slots
                .get_mut(i)
                .and_then(Option::take)
                .ok_or(SnapshotError::MissingDescriptor(i))
        };
        let l = snapshot.listeners;
        let listeners = ListenerFds {
            lock: take(l.lock)?,
            local: take(l.local)?,
            fd_sock: take(l.fd_sock)?,
            handover: take(l.handover)?,
            tcp: take(l.tcp)?,
            metrics: l.metrics.map(&mut take).transpose()?,
            health: l.health.map(&mut take).transpose()?,
        };
        let mut streams = Vec::with_capacity(snapshot.streams.len());
        for s in snapshot.streams {
            let pipes = s
                .pipes
                .into_iter()
                .map(&mut take)
                .collect::<Result<_, _>>()?;
            let console = match s.console {
                Some(c) => Some(ConsoleFds {
                    guest_listener: take(c.guest_listener)?,
                    client_listener: take(c.client_listener)?,
                    guest_connection: c.guest_connection.map(&mut take).transpose()?,
                    pending_input: c.pending_input,
                }),
                None => None,
            };
            streams.push(StreamFds {
                guest: s.guest,
                stream: s.stream,
                pipes,
                console,
            });
        }
        let mut handoffs = Vec::with_capacity(snapshot.handoffs.len());
        for h in snapshot.handoffs {
            handoffs.push(HandoffFds {
                token: h.token,
                guest: h.guest,
                stream: h.stream,
                write_end: take(h.write_end)?,
                expires_in: Duration::from_millis(h.expires_in_ms),
            });
        }
        Ok(Self {
            listeners,
            streams,
            handoffs,
            counters: snapshot.counters,
        })
    }
}
