//! The way a caller asks the daemon for an in-place upgrade and learns the outcome.
//!
//! Owns one bounded channel: the [`Trigger`] side is held by whoever may ask (the handler of
//! `Agent.Upgrade`), the [`Requests`] side by the daemon's main loop, which runs the preflight
//! ([`super::exec::preflight`]) and answers each [`Request`] with its pid (the upgrade goes
//! ahead) or the reason it was refused ([`UpgradeError`]). It never decides whether to upgrade
//! and knows nothing of gRPC: the handler maps [`UpgradeError`] to a status once, in
//! [`crate::error`].

use super::exec::PreflightError;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

/// Requests that may wait for the main loop at once; more wait for a slot (the handler's call
/// is bounded by the local socket's call limits).
const PENDING: usize = 4;

/// Why an upgrade asked for through a [`Trigger`] did not happen.
#[derive(Debug, Error)]
pub enum UpgradeError {
    /// The main loop is gone or went away before answering: the daemon is stopping, or it is
    /// upgrading already (the caller's connection ends with the old image).
    #[error("The daemon is already stopping or upgrading")]
    Unavailable,
    /// The new binary failed its preflight; the daemon serves on unchanged.
    #[error("Upgrade refused: {0}")]
    Refused(PreflightError),
}

/// Asks for an upgrade (cloned into every handler that may).
#[derive(Clone, Debug)]
pub(crate) struct Trigger(mpsc::Sender<Request>);

/// The main loop's side: the upgrades asked for.
#[derive(Debug)]
pub(crate) struct Requests(mpsc::Receiver<Request>);

/// One upgrade asked for, waiting for its answer.
#[derive(Debug)]
pub(crate) struct Request(oneshot::Sender<Result<u32, PreflightError>>);

/// A connected trigger and its requests.
pub(crate) fn channel() -> (Trigger, Requests) {
    let (tx, rx) = mpsc::channel(PENDING);
    (Trigger(tx), Requests(rx))
}

impl Trigger {
    /// Asks for an upgrade and waits for the answer: the pid of the daemon that goes on to
    /// execute the new binary (its own), or why not.
    pub(crate) async fn upgrade(&self) -> Result<u32, UpgradeError> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(Request(reply))
            .await
            .map_err(|_| UpgradeError::Unavailable)?;
        answer
            .await
            .map_err(|_| UpgradeError::Unavailable)?
            .map_err(UpgradeError::Refused)
    }
}

impl Requests {
    /// The next request; `None` once every [`Trigger`] is gone.
    pub(crate) async fn recv(&mut self) -> Option<Request> {
        self.0.recv().await
    }
}

impl Request {
    /// Answers the caller (who may have gone away meanwhile: then nobody hears it).
    pub(crate) fn answer(self, outcome: Result<u32, PreflightError>) {
        let _ = self.0.send(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[tokio::test]
    async fn the_answer_reaches_the_caller_and_a_gone_loop_is_unavailable() {
        let (trigger, mut requests) = channel();
        let asked = tokio::spawn({
            let trigger = trigger.clone();
            async move { trigger.upgrade().await }
        });
        requests.recv().await.unwrap().answer(Ok(42));
        assert_eq!(asked.await.unwrap().unwrap(), 42);

        let asked = tokio::spawn({
            let trigger = trigger.clone();
            async move { trigger.upgrade().await }
        });
        requests
            .recv()
            .await
            .unwrap()
            .answer(Err(PreflightError::Timeout {
                path: PathBuf::from("/usr/bin/conlogd"),
            }));
        let refused = asked.await.unwrap().unwrap_err();
        assert_eq!(
            refused.to_string(),
            "Upgrade refused: /usr/bin/conlogd did not answer --snapshot-format within 10s"
        );

        // A request the loop drops unanswered (it exec'd), then a loop that is gone.
        let asked = tokio::spawn({
            let trigger = trigger.clone();
            async move { trigger.upgrade().await }
        });
        drop(requests.recv().await.unwrap());
        assert!(matches!(
            asked.await.unwrap(),
            Err(UpgradeError::Unavailable)
        ));
        drop(requests);
        assert!(matches!(
            trigger.upgrade().await,
            Err(UpgradeError::Unavailable)
        ));
    }
}
