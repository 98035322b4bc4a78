//! Admission of the changes an upgrade must carry: new streams, new pipes, hand-off claims,
//! removed guests.
//!
//! Owns one gate. Each change holds an [`Admission`] from before it touches the registry or the
//! hand-off table until its result is recorded there (a pipe's read end attached to its stream
//! and its write end registered; a claimed write end sent). A freeze closes the gate
//! ([`Gate::close`]): it waits for the admitted changes to finish, so everything they made is in
//! the registry and the hand-off table when those are frozen and carried, and every change that
//! asks later is refused at once ([`Gate::enter`] fails) before it creates anything, so its
//! caller can retry against the next image. A failed upgrade reopens the gate
//! ([`Gate::open`]). Never held while waiting for a client, only for the daemon's own work.
//!
//! Without it a `CreateLogPipe` in flight during the freeze could start a stream the freeze no
//! longer sees (its read end closed at exec, or a second writer of its log after a failed
//! takeover) or register a write end after the hand-off table was carried.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// How often a freeze that still waits for admitted changes says so.
const WAIT_WARNING: Duration = Duration::from_secs(5);

/// The gate of registry and hand-off changes.
#[derive(Default)]
pub(crate) struct Gate {
    lock: Arc<RwLock<()>>,
    /// Held while the gate is closed.
    closed: Mutex<Option<OwnedRwLockWriteGuard<()>>>,
}

/// A change in progress; the gate cannot close until it is dropped.
#[must_use = "the change is admitted only while this is held"]
pub(crate) struct Admission {
    _guard: OwnedRwLockReadGuard<()>,
}

/// The gate is closed: the daemon is freezing for an upgrade or a takeover.
#[derive(Debug, thiserror::Error)]
#[error("conlogd is upgrading; retry in a moment")]
pub struct Closed;

impl Gate {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Admits a change, or refuses it at once while a freeze is closing or has closed the gate.
    pub(crate) fn enter(&self) -> Result<Admission, Closed> {
        // tokio's RwLock is fair: once a writer (the freeze) waits, no reader gets in.
        self.lock
            .clone()
            .try_read_owned()
            .map(|guard| Admission { _guard: guard })
            .map_err(|_| Closed)
    }

    /// Closes the gate: refuses new changes and waits until every admitted one has finished.
    pub(crate) async fn close(&self) {
        let acquire = self.lock.clone().write_owned();
        tokio::pin!(acquire);
        let guard = loop {
            match tokio::time::timeout(WAIT_WARNING, &mut acquire).await {
                Ok(guard) => break guard,
                Err(_) => tracing::warn!("the freeze still waits for changes in progress"),
            }
        };
        *self.closed.lock().expect("gate poisoned") = Some(guard);
    }

    /// Reopens the gate (the upgrade failed; this image serves on).
    pub(crate) fn open(&self) {
        self.closed.lock().expect("gate poisoned").take();
    }

    /// True while closed (or closing).
    #[cfg(test)]
    pub(crate) fn is_closed(&self) -> bool {
        self.lock.try_read().is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_waits_for_admitted_changes_and_refuses_new_ones() {
        let gate = Gate::new();
        let admitted = gate.enter().unwrap();
        let closing = tokio::spawn({
            let gate = gate.clone();
            async move { gate.close().await }
        });
        // The freeze waits for the admitted change, and nothing new gets in meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!closing.is_finished());
        assert!(gate.enter().is_err());
        drop(admitted);
        closing.await.unwrap();
        assert!(gate.is_closed());
        assert!(gate.enter().is_err());
        gate.open();
        assert!(!gate.is_closed());
        drop(gate.enter().unwrap());
    }
}
