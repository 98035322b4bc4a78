//! Sessions of the split console API (`WatchConsole` + `SendConsoleInput`).
//!
//! Browsers over gRPC-web cannot stream upwards, so a watch returns a session id and input
//! comes in separate unary calls naming it. This module owns the map session id → attached
//! client; a session lives exactly as long as its watch stream. It never decides who may write:
//! the console actor does, by client id.

use super::ConsoleHandle;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Live sessions.
#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, (ConsoleHandle, u64)>>,
}

impl Sessions {
    /// Registers client `client` of `console`; the session ends when the guard drops.
    pub fn open(self: &Arc<Self>, console: ConsoleHandle, client: u64) -> Result<SessionGuard> {
        let id =
            crate::ids::random_id().map_err(|e| Error::io("cannot generate a session id", e))?;
        self.sessions
            .lock()
            .expect("sessions poisoned")
            .insert(id.clone(), (console, client));
        Ok(SessionGuard {
            sessions: self.clone(),
            id,
        })
    }

    /// The console and client of session `id`.
    pub fn get(&self, id: &str) -> Result<(ConsoleHandle, u64)> {
        self.sessions
            .lock()
            .expect("sessions poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(
                    "No console session with that id; it ends when its WatchConsole stream ends"
                        .into(),
                )
            })
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
