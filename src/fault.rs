//! Test-only fault points: make a narrow window in the daemon deterministic.
//!
//! Owns [`point`], which code calls at a place where a crash or a delay must be testable
//! (between an unlink and a record save, say). In a debug build the environment variable
//! `CONLOG_FAULT_POINTS` lists the points armed for this process, comma-separated, each
//! `name=action`:
//!
//! - `kill`: SIGKILL to this process (exactly what `kill -9` does; nothing is flushed);
//! - `sleep:MS`: sleep that many milliseconds on the calling thread (on a tokio worker, after
//!   handing its other tasks over with `block_in_place`, so that only the caller waits);
//! - `kill@N` / `sleep:MS@N`: the same, only at the N-th time the point is reached (1-based).
//!
//! In a release build [`point`] is an empty inline function: no lookup, no branch, nothing an
//! operator could arm. This module must never be used for behaviour, only for tests.

/// Reaches the fault point `name`: does what `CONLOG_FAULT_POINTS` arms for it, if anything.
#[inline(always)]
pub fn point(name: &'static str) {
    #[cfg(debug_assertions)]
    armed::reach(name);
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(debug_assertions)]
mod armed {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Duration;

    #[derive(Debug)]
    enum Action {
        Kill,
        Sleep(Duration),
    }

    #[derive(Debug)]
    struct Armed {
        action: Action,
        /// Only at this reach (1-based), or at every one.
        at: Option<u64>,
        reached: AtomicU64,
    }

    fn table() -> &'static HashMap<String, Armed> {
        static TABLE: OnceLock<HashMap<String, Armed>> = OnceLock::new();
        TABLE.get_or_init(|| {
            std::env::var("CONLOG_FAULT_POINTS")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .filter_map(|spec| {
                    let parsed = parse(spec.trim());
                    if parsed.is_none() {
                        eprintln!("conlog: ignoring malformed fault point {spec:?}");
                    }
                    parsed
                })
                .collect()
        })
    }

    fn parse(spec: &str) -> Option<(String, Armed)> {
        let (name, action) = spec.split_once('=')?;
        let (action, at) = match action.split_once('@') {
            Some((action, at)) => (action, Some(at.parse().ok()?)),
            None => (action, None),
        };
        let action = match action.split_once(':') {
            None if action == "kill" => Action::Kill,
            Some(("sleep", ms)) => Action::Sleep(Duration::from_millis(ms.parse().ok()?)),
            _ => return None,
        };
        Some((
            name.to_owned(),
            Armed {
                action,
                at,
                reached: AtomicU64::new(0),
            },
        ))
    }

    pub(super) fn reach(name: &'static str) {
        let Some(armed) = table().get(name) else {
            return;
        };
        let n = armed.reached.fetch_add(1, Ordering::AcqRel) + 1;
        if armed.at.is_some_and(|at| at != n) {
            return;
        }
        match armed.action {
            Action::Kill => {
                eprintln!("conlog: fault point {name} reached: SIGKILL");
                let _ = rustix::process::kill_process(
                    rustix::process::getpid(),
                    rustix::process::Signal::KILL,
                );
                // SIGKILL to oneself is delivered before kill returns; never go on regardless.
                std::process::abort();
            }
            Action::Sleep(duration) => {
                // Tests wait for this line to act while the point holds.
                eprintln!("conlog: fault point {name} reached: sleeping {duration:?}");
                // On a runtime worker, hand its other tasks to another thread first (tasks
                // woken onto this worker could not be stolen while it sleeps), so only the
                // caller is held, as a real delay at this point would hold it.
                use tokio::runtime::{Handle, RuntimeFlavor};
                match Handle::try_current() {
                    Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
                        tokio::task::block_in_place(|| std::thread::sleep(duration))
                    }
                    _ => std::thread::sleep(duration),
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn specs_parse() {
            let (name, armed) = parse("rotate.after_unlink=kill@2").unwrap();
            assert_eq!(name, "rotate.after_unlink");
            assert!(matches!(armed.action, Action::Kill));
            assert_eq!(armed.at, Some(2));
            let (_, armed) = parse("x=sleep:250").unwrap();
            assert!(matches!(armed.action, Action::Sleep(d) if d == Duration::from_millis(250)));
            assert_eq!(armed.at, None);
            assert!(parse("x=explode").is_none());
            assert!(parse("x").is_none());
            assert!(parse("x=kill@first").is_none());
        }
    }
}
