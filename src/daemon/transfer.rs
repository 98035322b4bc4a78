//! Handing the daemon's state to a successor, the one sequence both an in-place upgrade and a
//! takeover follow: freeze → offer the state → on failure, thaw and serve on.
//!
//! Owns that order ([`Daemon::hand_over`]), the thaw that adopts carried state (also at the
//! start of an upgraded image or a successor, [`Daemon::thaw`]), and the upgrade counters kept
//! on disk. The formats and transports belong to [`crate::upgrade`]; freezing belongs to the
//! period of serving ([`super::serving::Serving::freeze`]). Never offers a state twice, and
//! never thaws one that a successor confirmed.

use super::listeners::Listeners;
use super::serving::Serving;
use super::{Daemon, StartError};
use crate::logfile::index::StartKind;
use crate::metrics::{Counters, Metrics, Saved};
use crate::upgrade::{self, exec::Image, handover, FrozenDaemon};
use std::io;
use std::path::Path;
use tokio::net::UnixStream;
use tracing::Instrument;

/// Where a frozen state goes.
pub(super) enum Successor<'a> {
    /// This process's next image: `execve` of the binary, which passed its preflight.
    Exec(&'a Image),
    /// Another process on `handover.sock`, whose hello was exact and who said nothing more.
    Process(UnixStream),
}

/// How a hand-over ended.
pub(super) enum Handed {
    /// The successor has the state and confirmed it: this process must never use it again.
    Over,
    /// The successor could not take it: the state is thawed here and serving goes on.
    Back(Listeners),
}

impl Successor<'_> {
    /// The span of the whole hand-over: every event inside says which kind it is.
    fn span(&self) -> tracing::Span {
        match self {
            Self::Exec(image) => {
                tracing::info_span!("upgrade", binary = %image.path.display())
            }
            Self::Process(_) => tracing::info_span!("takeover"),
        }
    }

    fn announce(&self) {
        match self {
            Self::Exec(_) => tracing::info!("upgrading in place"),
            Self::Process(_) => tracing::info!("a successor is taking over"),
        }
    }

    /// What is logged when the successor could not take over.
    fn failure(&self) -> &'static str {
        match self {
            Self::Exec(_) => "cannot execute the new binary; serving on",
            Self::Process(_) => "takeover failed; serving on",
        }
    }

    /// Offers the state: `Ok` once the successor has it (never returned by an exec, which
    /// replaces this process when it succeeds); on failure the state comes back intact.
    async fn offer(self, state: FrozenDaemon) -> Result<(), (FrozenDaemon, io::Error)> {
        match self {
            Self::Exec(image) => {
                let (state, error) = upgrade::exec::exec(image, state);
                // The signals stayed blocked for the new image's start-up; this one serves on.
                upgrade::exec::unblock_signals();
                Err((state, error))
            }
            Self::Process(mut connection) => handover::send(&mut connection, state).await,
        }
    }
}

impl Daemon {
    /// Ends `serving`, freezes everything and offers it to `successor`; if the successor
    /// cannot take it, counts the failure, thaws and returns the listeners to serve on.
    pub(super) async fn hand_over(
        &self,
        serving: Serving,
        listeners: Listeners,
        successor: Successor<'_>,
    ) -> Result<Handed, StartError> {
        let span = successor.span();
        async move {
            successor.announce();
            let failure = successor.failure();
            let state = serving.freeze(listeners, self).await;
            match successor.offer(state).await {
                Ok(()) => Ok(Handed::Over),
                Err((state, error)) => {
                    // A successor (a local peer on handover.sock) can fail at will.
                    crate::limited!(error, error = %error, "{failure}");
                    self.count_failure();
                    Ok(Handed::Back(self.thaw(state, StartKind::Resumed).await?))
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Adopts carried state: listeners (the health listener as the config wants it), pending
    /// hand-offs, and every stream with its descriptors; then admits changes again.
    pub(super) async fn thaw(
        &self,
        state: FrozenDaemon,
        start: StartKind,
    ) -> Result<Listeners, StartError> {
        self.guests.set_going_away(false);
        self.handoffs.adopt(state.handoffs);
        self.guests.restore(state.streams, start).await?;
        let listeners = Listeners::adopt(state.listeners, &self.config);
        self.gate.open();
        Ok(listeners)
    }

    /// Counts an upgrade or takeover that failed or was refused (on disk first, so no scrape
    /// sees a value a crash would take back).
    pub(super) fn count_failure(&self) {
        let mut counters = self.metrics.counters();
        counters.upgrade_failures += 1;
        save(&Saved::running(&counters), &self.counters_file);
        self.metrics.upgrade_failures.inc();
    }
}

/// Starts the daemon-wide counters where the previous image left them: exactly from an upgrade
/// snapshot; from `state/counters.json` otherwise (see [`Saved`]: after a clean stop every
/// counter, after a crash only the upgrade counters). Then keeps the rare counters on disk.
/// `carried` is `None` on a fresh start, `Some(None)` after an image that carries none.
pub(super) fn continue_counters(metrics: &Metrics, carried: Option<Option<Counters>>, file: &Path) {
    let saved = Saved::load(file).start_values();
    let values = match carried {
        Some(Some(carried)) => carried,
        // From an image that does not carry counters: the saved ones, this upgrade counted.
        Some(None) => Counters {
            upgrades: saved.upgrades + 1,
            ..saved
        },
        None => saved,
    };
    metrics.continue_from(&values);
    save(&Saved::running(&metrics.counters()), file);
}

fn save(saved: &Saved, file: &Path) {
    if let Err(e) = saved.save(file) {
        // After each refused upgrade too, which a local caller may ask for at will.
        crate::limited!(warn, file = %file.display(), error = %e, "cannot save the counters");
    }
}
