//! The scenarios, one module each, every one an implementation of
//! [`Scenario`](crate::scenario::Scenario). Each module's documentation says what it measures,
//! against which baseline, and what makes a run WRONG.

pub mod compress;
pub mod console;
pub mod gateway;
pub mod gateway_watchers;
pub mod guests;
pub mod history;
pub mod history_since;
pub mod hostile;
pub mod migration;
pub mod pipe;
pub mod upgrade;
