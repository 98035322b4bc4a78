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
//! # What crosses an upgrade: one vocabulary
//!
//! Everything that crosses from one image to the next is spelled the same way (after
//! Firecracker's `Persist`):
//!
//! - **`freeze`** stops a thing and hands over what crosses, as a `Frozen…` value: the
//!   descriptors it owns (still open) and the little state the disk does not hold. The pipe
//!   actor ([`crate::pipe::PipeHandle::freeze`]: its read ends), the console actor
//!   ([`crate::console::ConsoleHandle::freeze`] → [`FrozenConsole`]), the registry
//!   ([`crate::guests`]'s `freeze_all` → [`FrozenStream`]s), the hand-off table
//!   ([`crate::handoff`]'s `freeze` → [`FrozenHandoff`]s), the listeners (the daemon's
//!   `Listeners::freeze` → [`FrozenListeners`]), and the whole daemon ([`FrozenDaemon`]).
//! - **`adopt`** takes a `Frozen…` value up (in the next image, or from the keeper after a
//!   crash): `Listeners::adopt`, the hand-off table's `adopt`, `ConsoleHandle::spawn` given a
//!   frozen console, the registry's `restore` given frozen streams.
//! - **`thaw`** is adopting back in the same image, after a hand-over failed
//!   (`daemon/transfer.rs`); nothing is adopted twice, and nothing a successor confirmed is
//!   thawed.
//! - **`index`** / **`resolve`**: a `Frozen…<OwnedFd>` value travels as the same type over
//!   `usize`, each descriptor replaced by its index into the list of descriptors sent beside
//!   the snapshot ([`FrozenDaemon::index`]), and back ([`FrozenDaemon::resolve`]). One type per
//!   thing carries both, so a field added to what crosses is added once.
//!
//! The actors' `freeze` is an async round trip to their task and the registry's and hand-off
//! table's work on `&self`, so this is a naming convention rather than a trait.
//!
//! This module owns the formats, the transports and the trigger; it imports none of the
//! modules that use it (daemon, server, keeper, handoff). Freezing and thawing belong to the
//! pipe and console actors ([`crate::pipe`], [`crate::console`]) and the registry
//! ([`crate::guests`]); the order freeze → offer → thaw on failure, shared by both ways, belongs
//! to the daemon (`daemon/transfer.rs`).

pub mod exec;
pub(crate) mod fds;
pub(crate) mod gate;
pub(crate) mod handover;
pub mod snapshot;
pub(crate) mod trigger;

use serde::{Deserialize, Serialize};
use snapshot::{Snapshot, SnapshotError};
use std::os::fd::OwnedFd;
use std::time::Duration;

/// A frozen console: its descriptors (`F` = [`OwnedFd`], or their indexes in a snapshot) and
/// the input it had not written to the guest yet.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FrozenConsole<F = OwnedFd> {
    pub guest_listener: F,
    pub client_listener: F,
    pub guest_connection: Option<F>,
    pub pending_input: Vec<u8>,
}

/// A frozen stream: its pipe read ends, or its console.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FrozenStream<F = OwnedFd> {
    pub guest: String,
    pub stream: String,
    /// Pipe read ends feeding the stream.
    pub pipes: Vec<F>,
    pub console: Option<FrozenConsole<F>>,
}

/// A frozen hand-off: a log pipe whose write end waits for its client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FrozenHandoff<F = OwnedFd> {
    pub token: String,
    pub guest: String,
    pub stream: String,
    pub write_end: F,
    /// The time the token has left; whole milliseconds in a snapshot.
    #[serde(rename = "expires_in_ms", with = "millis")]
    pub expires_in: Duration,
}

/// The frozen daemon-wide descriptors: the instance lock and every listening socket.
///
/// `health` came after snapshot format 1 was first written, and stays within format 1 on
/// purpose: an image that predates it reads a snapshot without the field as "no health
/// listener" (the next image binds one if its config asks), and an older image ignores the
/// field (serde skips unknown fields here) and closes the descriptor it does not adopt.
/// Neither side is refused, so upgrades and takeovers work in both directions across that
/// change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FrozenListeners<F = OwnedFd> {
    pub lock: F,
    pub local: F,
    pub fd_sock: F,
    pub handover: F,
    pub tcp: F,
    pub metrics: Option<F>,
    /// The plaintext health listener (config `health`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<F>,
}

/// Everything carried from one image to the next: the frozen daemon.
#[derive(Debug)]
pub struct FrozenDaemon {
    pub listeners: FrozenListeners,
    pub streams: Vec<FrozenStream>,
    pub handoffs: Vec<FrozenHandoff>,
    /// The daemon-wide counters the next image continues from (None from older images).
    pub counters: Option<crate::metrics::Counters>,
}

impl<F> FrozenConsole<F> {
    fn map<G, E>(self, f: &mut impl FnMut(F) -> Result<G, E>) -> Result<FrozenConsole<G>, E> {
        Ok(FrozenConsole {
            guest_listener: f(self.guest_listener)?,
            client_listener: f(self.client_listener)?,
            guest_connection: self.guest_connection.map(&mut *f).transpose()?,
            pending_input: self.pending_input,
        })
    }
}

impl<F> FrozenStream<F> {
    fn map<G, E>(self, f: &mut impl FnMut(F) -> Result<G, E>) -> Result<FrozenStream<G>, E> {
        Ok(FrozenStream {
            guest: self.guest,
            stream: self.stream,
            pipes: self
                .pipes
                .into_iter()
                .map(&mut *f)
                .collect::<Result<_, _>>()?,
            console: self.console.map(|c| c.map(f)).transpose()?,
        })
    }
}

impl<F> FrozenHandoff<F> {
    fn map<G, E>(self, f: &mut impl FnMut(F) -> Result<G, E>) -> Result<FrozenHandoff<G>, E> {
        Ok(FrozenHandoff {
            token: self.token,
            guest: self.guest,
            stream: self.stream,
            write_end: f(self.write_end)?,
            expires_in: self.expires_in,
        })
    }
}

impl<F> FrozenListeners<F> {
    fn map<G, E>(self, f: &mut impl FnMut(F) -> Result<G, E>) -> Result<FrozenListeners<G>, E> {
        Ok(FrozenListeners {
            lock: f(self.lock)?,
            local: f(self.local)?,
            fd_sock: f(self.fd_sock)?,
            handover: f(self.handover)?,
            tcp: f(self.tcp)?,
            metrics: self.metrics.map(&mut *f).transpose()?,
            health: self.health.map(&mut *f).transpose()?,
        })
    }
}

impl FrozenDaemon {
    /// The snapshot and the descriptors it indexes.
    pub(crate) fn index(self) -> (Snapshot, Vec<OwnedFd>) {
        let mut fds = Vec::new();
        let mut push = |fd: OwnedFd| -> Result<usize, std::convert::Infallible> {
            fds.push(fd);
            Ok(fds.len() - 1)
        };
        let Ok(listeners) = self.listeners.map(&mut push);
        let Ok(streams) = self.streams.into_iter().map(|s| s.map(&mut push)).collect();
        let Ok(handoffs) = self
            .handoffs
            .into_iter()
            .map(|h| h.map(&mut push))
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

    /// Rebuilds the frozen daemon from a snapshot and the descriptors that came with it.
    pub(crate) fn resolve(snapshot: Snapshot, fds: Vec<OwnedFd>) -> Result<Self, SnapshotError> {
        let mut slots: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut take = |i: usize| -> Result<OwnedFd, SnapshotError> {
            slots
                .get_mut(i)
                .and_then(Option::take)
                .ok_or(SnapshotError::MissingDescriptor(i))
        };
        Ok(Self {
            listeners: snapshot.listeners.map(&mut take)?,
            streams: snapshot
                .streams
                .into_iter()
                .map(|s| s.map(&mut take))
                .collect::<Result<_, _>>()?,
            handoffs: snapshot
                .handoffs
                .into_iter()
                .map(|h| h.map(&mut take))
                .collect::<Result<_, _>>()?,
            counters: snapshot.counters,
        })
    }
}

/// A [`Duration`] as whole milliseconds (what snapshots have always carried).
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(crate) fn serialize<S: Serializer>(
        duration: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        // A token lives for minutes: far below u64::MAX milliseconds; saturate all the same.
        serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}
