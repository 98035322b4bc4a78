//! Prometheus metrics and the `/metrics` HTTP endpoint.
//!
//! Owns the metric registry and the plain-HTTP listener that exposes it in the Prometheus text
//! format. Stream actors update counters directly (atomics, no lock on the data path); this
//! module never touches streams.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
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
