//! Prometheus metrics and the `/metrics` HTTP endpoint.
//!
//! Owns the metric registry, the plain-HTTP listener that exposes it in the Prometheus text
//! format, and the daemon-wide counters' values across images ([`Counters`]): carried exactly in
//! the upgrade snapshot, and kept in `<data_dir>/state/counters.json` across restarts
//! ([`Saved`]; which ones and why: docs/operations.md, "Metrics to alert on"). Stream actors
//! update counters directly (atomics, no lock on the data path); this module never touches
//! streams.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Every metric the daemon exports.
#[derive(Default)]
pub struct Metrics {
    /// Bytes written to log files.
    pub bytes_logged: Counter,
    /// Bytes read from guests that could not be written (disk errors).
    pub bytes_dropped: Counter,
    /// Log rotations and truncations.
    pub rotations: Counter,
    /// Guests known to the daemon.
    pub guests: Gauge,
    /// Streams (pipes and consoles).
    pub streams: Gauge,
    /// Pipes currently feeding a stream.
    pub pipe_writers: Gauge,
    /// Log pipes handed over through fd.sock.
    pub handoffs: Counter,
    /// Hand-off attempts refused (bad, reused or expired tokens, protocol errors).
    pub handoff_failures: Counter,
    /// Console clients attached.
    pub clients: Gauge,
    /// Clients skipped ahead because they fell behind.
    pub lagged_clients: Counter,
    /// In-place upgrades and takeovers performed.
    pub upgrades: Counter,
    /// Upgrades and takeovers that failed (refused binary, failed exec, failed takeover).
    pub upgrade_failures: Counter,
    /// Time index entries that could not be written (the log's bytes were).
    pub index_write_failures: Counter,
    /// Raw bytes of rotated files queued for (or being) compressed on this node.
    pub compression_backlog_bytes: Gauge,
    /// Raw bytes of rotated files compressed and installed.
    pub compressed_bytes_in: Counter,
    /// Disk bytes of the compressed files that replaced them.
    pub compressed_bytes_out: Counter,
}

/// The values of every daemon-wide counter at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub bytes_logged: u64,
    pub bytes_dropped: u64,
    pub rotations: u64,
    pub handoffs: u64,
    pub handoff_failures: u64,
    pub lagged_clients: u64,
    pub upgrades: u64,
    pub upgrade_failures: u64,
    pub index_write_failures: u64,
    /// Raw bytes compressed and installed, and the disk bytes they became.
    pub compressed_bytes_in: u64,
    pub compressed_bytes_out: u64,
}

/// A count (a length, a number of clients) as a gauge value, saturating: no count in this
/// daemon comes near `i64::MAX`.
pub fn gauge_value(count: impl TryInto<i64>) -> i64 {
    count.try_into().unwrap_or(i64::MAX)
}

impl Metrics {
    /// The counters' values now.
    pub fn counters(&self) -> Counters {
        Counters {
            bytes_logged: self.bytes_logged.get(),
            bytes_dropped: self.bytes_dropped.get(),
            rotations: self.rotations.get(),
            handoffs: self.handoffs.get(),
            handoff_failures: self.handoff_failures.get(),
            lagged_clients: self.lagged_clients.get(),
            upgrades: self.upgrades.get(),
            upgrade_failures: self.upgrade_failures.get(),
            index_write_failures: self.index_write_failures.get(),
            compressed_bytes_in: self.compressed_bytes_in.get(),
            compressed_bytes_out: self.compressed_bytes_out.get(),
        }
    }

    /// Adds the counts of the previous image (or of the run before a restart) to this one's.
    pub fn continue_from(&self, values: &Counters) {
        let raise = |counter: &Counter, by: u64| {
            counter.inc_by(by);
        };
        raise(&self.bytes_logged, values.bytes_logged);
        raise(&self.bytes_dropped, values.bytes_dropped);
        raise(&self.rotations, values.rotations);
        raise(&self.handoffs, values.handoffs);
        raise(&self.handoff_failures, values.handoff_failures);
        raise(&self.lagged_clients, values.lagged_clients);
        raise(&self.upgrades, values.upgrades);
        raise(&self.upgrade_failures, values.upgrade_failures);
        raise(&self.index_write_failures, values.index_write_failures);
        raise(&self.compressed_bytes_in, values.compressed_bytes_in);
        raise(&self.compressed_bytes_out, values.compressed_bytes_out);
    }
}

/// The counters kept on disk (`state/counters.json`) for the next fresh start.
///
/// `upgrades` and `upgrade_failures` are written (durably) each time they change, before the
/// new value can be scraped, so they are exact after a crash too. The byte and event counters
/// change on every write; they are saved only by a clean stop (`at_stop`), which the next start
/// consumes: a value restored after a crash would be older than what was scraped, and
/// Prometheus reads a counter that goes down as a reset to zero followed by the whole restored
/// value as new increase, a false spike; a counter that really restarts at 0 is handled right.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Saved {
    pub upgrades: u64,
    pub upgrade_failures: u64,
    /// Every counter, exact, written by a clean stop; removed by the next start.
    pub at_stop: Option<Counters>,
}

impl Saved {
    /// `state/counters.json` under the state directory.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("counters.json")
    }

    /// Reads the saved counters; nothing saved (or an unreadable file, which is logged) is
    /// all zeros.
    pub fn load(path: &Path) -> Self {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable saved counters");
                Self::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::default(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the saved counters");
                Self::default()
            }
        }
    }

    /// The counters a fresh start continues from.
    pub fn start_values(&self) -> Counters {
        let mut values = self.at_stop.unwrap_or_default();
        values.upgrades = values.upgrades.max(self.upgrades);
        values.upgrade_failures = values.upgrade_failures.max(self.upgrade_failures);
        values
    }

    /// What to keep on disk while `counters` run: the rare counters only.
    pub fn running(counters: &Counters) -> Self {
        Self {
            upgrades: counters.upgrades,
            upgrade_failures: counters.upgrade_failures,
            at_stop: None,
        }
    }

    /// Writes the file durably (a temporary file, fsync, rename, fsync of the directory).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let temporary = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&serde_json::to_vec(self).expect("counters serialize"))?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

impl Metrics {
    /// Registers every metric under the `conlog_` prefix.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::with_prefix("conlog");
        let m = self.as_ref();
        registry.register(
            "bytes_logged",
            "Bytes written to log files",
            m.bytes_logged.clone(),
        );
        registry.register(
            "bytes_dropped",
            "Bytes that could not be logged",
            m.bytes_dropped.clone(),
        );
        registry.register(
            "rotations",
            "Log rotations and truncations",
            m.rotations.clone(),
        );
        registry.register("guests", "Guests known to the daemon", m.guests.clone());
        registry.register("streams", "Log pipes and consoles", m.streams.clone());
        registry.register(
            "pipe_writers",
            "Pipes feeding a stream",
            m.pipe_writers.clone(),
        );
        registry.register("handoffs", "Log pipes handed over", m.handoffs.clone());
        registry.register(
            "handoff_failures",
            "Refused hand-off attempts",
            m.handoff_failures.clone(),
        );
        registry.register("clients", "Console clients attached", m.clients.clone());
        registry.register(
            "lagged_clients",
            "Clients skipped ahead",
            m.lagged_clients.clone(),
        );
        registry.register("upgrades", "Upgrades and takeovers", m.upgrades.clone());
        registry.register(
            "upgrade_failures",
            "Upgrades and takeovers that failed",
            m.upgrade_failures.clone(),
        );
        registry.register(
            "index_write_failures",
            "Time index entries that could not be written (the bytes were logged)",
            m.index_write_failures.clone(),
        );
        registry.register(
            "compression_backlog_bytes",
            "Raw bytes of rotated files waiting for (or in) compression",
            m.compression_backlog_bytes.clone(),
        );
        registry.register(
            "compressed_bytes_in",
            "Raw bytes of rotated files compressed",
            m.compressed_bytes_in.clone(),
        );
        registry.register(
            "compressed_bytes_out",
            "Disk bytes those became",
            m.compressed_bytes_out.clone(),
        );
        registry
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors (or memory): back off instead of spinning on the error.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let registry = registry.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&request, &registry)) }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), connection).await;
        });
    }
}

fn respond(request: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let reply = |status, content_type, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".into(),
        );
    }
    let mut text = String::new();
    match encode(&mut text, registry) {
        Ok(()) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_continue_from_the_previous_image() {
        let metrics = Metrics::default();
        metrics.bytes_logged.inc_by(3);
        metrics.compressed_bytes_out.inc_by(1);
        let carried = Counters {
            bytes_logged: 7,
            upgrades: 3,
            compressed_bytes_in: 50,
            compressed_bytes_out: 9,
            ..Counters::default()
        };
        metrics.continue_from(&carried);
        let now = metrics.counters();
        assert_eq!((now.bytes_logged, now.upgrades), (10, 3));
        // The compression worker's counters carry on like the others.
        assert_eq!(
            (now.compressed_bytes_in, now.compressed_bytes_out),
            (50, 10)
        );
        assert_eq!(now.upgrade_failures, 0);
    }

    #[test]
    fn saved_counters_round_trip_and_a_crash_keeps_only_the_rare_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = Saved::path_in(dir.path());
        assert_eq!(Saved::load(&path), Saved::default());
        let all = Counters {
            bytes_logged: 100,
            upgrades: 2,
            upgrade_failures: 1,
            ..Counters::default()
        };
        let stopped = Saved {
            at_stop: Some(all),
            ..Saved::running(&all)
        };
        stopped.save(&path).unwrap();
        assert_eq!(Saved::load(&path).start_values(), all);
        Saved::running(&all).save(&path).unwrap();
        let after_crash = Saved::load(&path).start_values();
        assert_eq!(after_crash.bytes_logged, 0);
        assert_eq!((after_crash.upgrades, after_crash.upgrade_failures), (2, 1));
        std::fs::write(&path, b"{torn").unwrap();
        assert_eq!(Saved::load(&path), Saved::default());
    }
}
