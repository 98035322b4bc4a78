//! Sessions of the split console API (`WatchConsole` + `SendConsoleInput`).
//!
//! Browsers over gRPC-web cannot stream upwards, so a watch returns a session id and input
//! comes in separate unary calls naming it. This module owns the map session id → attached
//! client; a session lives exactly as long as its watch stream. It never decides who may write:
//! the console actor does, by client id.

use super::pacing::InputPacer;
use super::ConsoleHandle;
use super::{ConsoleError, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One live session: the attached client, and the pacing of its input.
#[derive(Clone)]
pub struct Session {
    pub console: ConsoleHandle,
    pub client: u64,
    pub pacer: Arc<tokio::sync::Mutex<InputPacer>>,
}

/// Live sessions.
#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Registers client `client` of `console`; the session ends when the guard drops.
    pub fn open(
        self: &Arc<Self>,
        console: ConsoleHandle,
        client: u64,
        input_rate: u64,
    ) -> Result<SessionGuard> {
        let id = crate::ids::random_id()
            .map_err(|e| ConsoleError::io("cannot generate a session id", e))?;
        self.sessions.lock().expect("sessions poisoned").insert(
            id.clone(),
            Session {
                console,
                client,
                pacer: Arc::new(tokio::sync::Mutex::new(InputPacer::new(input_rate))),
            },
        );
        Ok(SessionGuard {
            sessions: self.clone(),
            id,
        })
    }

    /// Session `id`.
    pub fn get(&self, id: &str) -> Result<Session> {
        self.sessions
            .lock()
            .expect("sessions poisoned")
            .get(id)
            .cloned()
            .ok_or(ConsoleError::UnknownSession)
    }
}

/// Ends a session when dropped.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    pub id: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions
            .sessions
            .lock()
            .expect("sessions poisoned")
            .remove(&self.id);
    }
}
