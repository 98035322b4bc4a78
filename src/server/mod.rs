//! The gRPC listeners: which services are served where.
//!
//! Owns the composition of tonic servers: the local UNIX socket serves `Agent`, `Console`,
//! health and reflection of the whole API; TCP serves `Console`, health and reflection of the
//! console API only, so the `Agent` service cannot be called or even discovered over the
//! network. Handlers live in [`agent`] and [`console`] and do no work of their own beyond
//! validating requests (names are parsed here into [`crate::names::GuestName`] and
//! [`crate::names::StreamName`] and passed inward as such) and calling the owning module. The
//! single mapping from errors to statuses is in [`crate::error`]; a refusal the edge decides
//! (a request field, credentials, a call or body limit) is an [`crate::error::Error`] variant
//! mapped there too. The one status built here is [`limits::message_size_status`], which
//! renames a status tonic's transport chose. On TCP every `Console` call needs a bearer token ([`auth`]); on both,
//! calls in progress and message sizes are limited ([`limits`]). TCP also speaks gRPC-web
//! (binary and text, over HTTP/1.1 or HTTP/2) and serves the console page at `/console/`
//! ([`web`]); its layers run, outermost first: [`web::WebLayer`] (page, CORS), tonic-web's
//! translation into gRPC, [`limits::CallLimitsLayer`], then the services behind their
//! interceptors, so a gRPC-web call is a gRPC call by the time limits and tokens see it.
//! `conlog-gateway` ([`crate::gateway`]) serves its forwarding Console service through the
//! same TCP composition ([`serve_console_tcp`]), with its own limits' names and its writes to
//! HTTP/2 clients over TLS coalesced ([`Protection::for_gateway`], [`coalesce`]); tokens are checked through [`crate::tokens::Verify`], a node's
//! key or the gateway's cluster key.

pub mod agent;
pub mod auth;
mod authority;
pub mod bodies;
pub mod coalesce;
pub mod conn;
pub mod console;
pub mod limits;
pub mod tally;
pub mod web;

use crate::proto;
use crate::tls::Tls;
use crate::tokens::TokenKey;
use conn::Conn;
use limits::{CallLimits, CallLimitsLayer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;

/// What protects the listeners: call limits (the local socket's and TCP's apart), connection
/// places, idle deadlines, the descriptors remote callers may hold, and the largest message
/// accepted.
#[derive(Clone)]
pub struct Protection {
    /// The local socket's calls (`limits.calls_total`): the agent's own budget.
    pub local_calls: Arc<CallLimits>,
    /// TCP's calls (`limits.remote_calls_total`, per peer, per guest).
    pub remote_calls: Arc<CallLimits>,
    pub message_size: usize,
    pub calls_per_connection: u32,
    /// Places for TCP connections (`limits.tcp_connections`).
    pub tcp_connections: Arc<tokio::sync::Semaphore>,
    /// TCP connections per peer address (`limits.connections_per_peer`).
    pub connections_per_peer: Arc<tally::Tally<std::net::IpAddr>>,
    /// A TCP connection with no call for this long is closed (`limits.idle_timeout`).
    pub idle_timeout: std::time::Duration,
    /// A TCP request body must arrive within this (`limits.body_timeout`).
    pub body_timeout: std::time::Duration,
    /// Descriptors remote callers may hold at once (TCP connections, history readers' log
    /// files): a share of RLIMIT_NOFILE, so that the daemon's own descriptors (rotations,
    /// guests reconnecting, the local API) never run out because of them.
    pub remote_descriptors: Arc<tokio::sync::Semaphore>,
    remote_descriptors_limit: usize,
    tcp_limit: usize,
    /// Origins allowed to call over gRPC-web from other pages (`web`), body limits.
    pub web: web::WebOptions,
    /// The names refusals give these limits (a node's `limits.*`, a gateway's own).
    pub(crate) keys: &'static limits::LimitKeys,
    /// Whether writes to HTTP/2 clients over TLS are coalesced ([`coalesce`]): a gateway's.
    pub(crate) coalesce_writes: bool,
}

/// The share of RLIMIT_NOFILE remote callers may hold: a quarter (docs/operations.md,
/// "Sizing"); the other three quarters are the guests' and the daemon's own.
pub fn remote_descriptor_share(nofile: u64) -> usize {
    usize::try_from(nofile / 4).unwrap_or(usize::MAX).max(16)
}

impl Protection {
    pub(crate) fn new(
        limits: &crate::config::Limits,
        tokens: Arc<dyn crate::tokens::Verify>,
    ) -> Self {
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let message_size = usize::try_from(limits.message_size.bytes()).unwrap_or(usize::MAX);
        let share = remote_descriptor_share(nofile);
        Self {
            local_calls: CallLimits::local(limits),
            remote_calls: CallLimits::remote(limits, tokens.clone()),
            message_size,
            calls_per_connection: limits.calls_per_connection,
            tcp_connections: Arc::new(tokio::sync::Semaphore::new(limits.max_tcp_connections())),
            connections_per_peer: tally::Tally::new(limits.connections_per_peer),
            idle_timeout: limits.idle_timeout.get(),
            body_timeout: limits.body_timeout.get(),
            remote_descriptors: Arc::new(tokio::sync::Semaphore::new(share)),
            remote_descriptors_limit: share,
            tcp_limit: limits.max_tcp_connections(),
            web: web::WebOptions::new(message_size, limits, tokens, &limits::NODE_KEYS),
            keys: &limits::NODE_KEYS,
            coalesce_writes: false,
        }
    }

    /// `conlog-gateway`'s: the same layers, its limits named `gateway.limits.*`.
    pub(crate) fn for_gateway(
        limits: &crate::config::Limits,
        tokens: Arc<dyn crate::tokens::Verify>,
    ) -> Self {
        let mut protection = Self::new(limits, tokens.clone());
        protection.remote_calls =
            CallLimits::remote_named(limits, tokens.clone(), &limits::GATEWAY_KEYS);
        protection.web = web::WebOptions::new(
            protection.message_size,
            limits,
            tokens,
            &limits::GATEWAY_KEYS,
        );
        protection.keys = &limits::GATEWAY_KEYS;
        protection.coalesce_writes = true;
        protection
    }

    /// The same, with the `web` section's allowed origins for the TCP listener.
    pub fn with_web(mut self, config: &crate::config::WebConfig) -> Self {
        self.web = self.web.with_origins(config);
        self
    }

    /// A server builder with these limits. HTTP/2's own stream cap sits above the call
    /// limit, so that a client over it gets `RESOURCE_EXHAUSTED` naming the limit rather than
    /// silently waiting for a stream. Keepalive pings find peers that vanished without a FIN
    /// (their calls would otherwise hold places forever); headers are bounded (a token is at
    /// most 1 KiB).
    fn server(
        &self,
        calls: &Arc<CallLimits>,
    ) -> Server<tower::layer::util::Stack<CallLimitsLayer, tower::layer::util::Identity>> {
        self.builder().layer(CallLimitsLayer(calls.clone()))
    }

    /// How the console listener admits TCP connections.
    fn admission(&self, tls: bool) -> Admission {
        Admission {
            slots: self.tcp_connections.clone(),
            per_peer: self.connections_per_peer.clone(),
            descriptors: self.remote_descriptors.clone(),
            idle_timeout: self.idle_timeout,
            tls,
            keys: self.keys,
        }
    }

    fn builder(&self) -> Server {
        Server::builder()
            .max_concurrent_streams(self.calls_per_connection.saturating_mul(2))
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .http2_max_header_list_size(u32::try_from(web::MAX_HEADER_BYTES).unwrap_or(u32::MAX))
    }

    /// The Console service for the local socket (`remote: false`) or TCP, its request bodies
    /// bounded ([`bodies`]).
    fn console(
        &self,
        console: console::ConsoleService,
        remote: bool,
    ) -> bodies::InputBounded<proto::console_server::ConsoleServer<console::ConsoleService>> {
        let server = proto::console_server::ConsoleServer::new(console)
            .max_decoding_message_size(self.message_size);
        if remote {
            bodies::InputBounded::remote(server, self.body_timeout, self.keys.body_timeout)
        } else {
            bodies::InputBounded::local(server)
        }
    }
}

const AGENT_SERVICE: &str = "conlog.v1.Agent";
const CONSOLE_SERVICE: &str = "conlog.v1.Console";

fn reflection(descriptors: &'static [u8]) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptors)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

async fn health(
    services: &[&str],
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    for name in services {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    service
}

/// Serves the full API on the local socket until `shutdown` resolves.
pub async fn serve_local(
    listener: UnixListener,
    agent: agent::AgentService,
    console: console::ConsoleService,
    protection: Protection,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let reflection_v1 = reflection(proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("embedded descriptors are valid");
    let reflection_v1alpha = reflection(proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("embedded descriptors are valid");
    protection
        .server(&protection.local_calls)
        .add_service(health(&[AGENT_SERVICE, CONSOLE_SERVICE]).await)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            proto::agent_server::AgentServer::new(agent)
                .max_decoding_message_size(protection.message_size),
        )
        .add_service(InterceptedService::new(
            protection.console(console, false),
            auth::LocalTrust,
        ))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|stream| {
                stream.map(|stream| {
                    let cred = stream.peer_cred().ok();
                    Conn::local(authority::AuthorityFix::new(stream), cred)
                })
            }),
            shutdown,
        )
        .await
}

/// Serves the console API on TCP (with TLS when `tls` is set) until `shutdown` resolves:
/// native gRPC over HTTP/2, gRPC-web over HTTP/1.1 or HTTP/2, and the console page.
pub async fn serve_tcp(
    listener: TcpListener,
    console: console::ConsoleService,
    tls: Option<Arc<Tls>>,
    tokens: Arc<TokenKey>,
    protection: Protection,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let service = InterceptedService::new(
        protection.console(console, true),
        auth::BearerTokens(tokens),
    );
    serve_console_tcp(listener, service, tls, None, protection, shutdown).await
}

/// Serves `console` (a `conlog.v1.Console` service: the node's, or the gateway's forwarder)
/// on TCP the way a node does: the same layers (page, gRPC-web, call limits), health,
/// reflection of the console API, connection admission and idle deadlines. `stream_window`
/// sets HTTP/2's per-stream receive window (`None`: hyper's default).
pub(crate) async fn serve_console_tcp<S, B>(
    listener: TcpListener,
    console: S,
    tls: Option<Arc<Tls>>,
    stream_window: Option<u32>,
    protection: Protection,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let reflection_v1 = reflection(proto::CONSOLE_FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("embedded descriptors are valid");
    let reflection_v1alpha = reflection(proto::CONSOLE_FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("embedded descriptors are valid");
    let router = protection
        .builder()
        .initial_stream_window_size(stream_window)
        .accept_http1(true)
        .layer(web::WebLayer(protection.web.clone()))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(CallLimitsLayer(protection.remote_calls.clone()))
        .add_service(health(&[CONSOLE_SERVICE]).await)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(console);
    match tls {
        None => {
            let incoming = tcp_incoming(listener, protection.admission(false), |tcp| async move {
                Ok(tcp)
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        Some(tls) => {
            let coalesce = protection.coalesce_writes;
            let incoming = tcp_incoming(listener, protection.admission(true), move |tcp| {
                let tls = tls.clone();
                async move {
                    let io = tls.accept(tcp).await?;
                    // HTTP/2 only: HTTP/1.1 buffers its writes itself.
                    let h2 = io.get_ref().1.alpn_protocol() == Some(b"h2");
                    Ok(coalesce::Coalesce::new(io, coalesce && h2))
                }
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
}

/// Serves only `grpc.health.v1.Health`, in plaintext, on the health listener (config
/// `health`) until `shutdown` resolves: for probes that cannot speak TLS, such as the
/// kubelet's native gRPC probes. It answers `""` and `conlog.v1.Console`; neither `Console`
/// nor reflection is registered, so every other method is `UNIMPLEMENTED` and nothing but
/// serving status is revealed. The call limits and HTTP/2 settings are the other listeners';
/// connections are capped at `max_connections` with a budget of their own, so that a flood of
/// console connections cannot fail the liveness probe (nor a flood here take console places).
pub async fn serve_health(
    listener: TcpListener,
    protection: Protection,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // A budget of its own (connections and their descriptors), so that a flood of console
    // connections cannot fail the liveness probe.
    let admission = Admission {
        slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        per_peer: tally::Tally::new(u32::MAX),
        descriptors: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        idle_timeout: protection.idle_timeout,
        tls: false,
        keys: protection.keys,
    };
    let incoming = tcp_incoming(listener, admission, |tcp| async move { Ok(tcp) });
    protection
        .server(&protection.remote_calls)
        .add_service(health(&[CONSOLE_SERVICE]).await)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// TCP keepalive on an accepted connection: a peer that vanished without a FIN (a laptop put
/// to sleep) is found within about two minutes even on HTTP/1.1, where a gRPC-web stream has no
/// HTTP/2 ping to find it, so its call and its console place are given back.
fn keep_alive(tcp: &tokio::net::TcpStream) {
    use rustix::net::sockopt;
    let set = sockopt::set_socket_keepalive(tcp, true)
        .and_then(|()| sockopt::set_tcp_keepidle(tcp, std::time::Duration::from_secs(60)))
        .and_then(|()| sockopt::set_tcp_keepintvl(tcp, std::time::Duration::from_secs(15)))
        .and_then(|()| sockopt::set_tcp_keepcnt(tcp, 4));
    if let Err(e) = set {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// What a TCP listener holds every connection to.
struct Admission {
    /// `limits.tcp_connections` (the health listener: its own).
    slots: Arc<tokio::sync::Semaphore>,
    /// `limits.connections_per_peer`.
    per_peer: Arc<tally::Tally<std::net::IpAddr>>,
    /// The descriptors remote callers may hold (a connection is one).
    descriptors: Arc<tokio::sync::Semaphore>,
    idle_timeout: std::time::Duration,
    tls: bool,
    /// The names of the limits it refuses connections by.
    keys: &'static limits::LimitKeys,
}

impl Admission {
    /// The connection's places, or the limit that refuses it.
    fn admit(&self, address: SocketAddr) -> Result<conn::Places, &'static str> {
        let total = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.keys.tcp_connections)?;
        let peer = self
            .per_peer
            .take(address.ip())
            .ok_or(self.keys.connections_per_peer)?;
        let descriptor = self
            .descriptors
            .clone()
            .try_acquire_owned()
            .map_err(|_| "the remote share of RLIMIT_NOFILE")?;
        Ok(conn::Places {
            total,
            peer,
            descriptor,
        })
    }
}

/// Accepted TCP connections, after `handshake` (TLS, or nothing). Each handshake runs on its
/// own task, so a client that never finishes one delays nobody; a connection over
/// `limits.tcp_connections` or `limits.connections_per_peer` (handshakes included), or past
/// the descriptors remote callers may hold, is closed at once. The accept loop ends when the
/// stream is dropped.
fn tcp_incoming<IO, H, F>(
    listener: TcpListener,
    admission: Admission,
    handshake: H,
) -> ReceiverStream<std::io::Result<Conn<IO>>>
where
    IO: Send + 'static,
    H: Fn(tokio::net::TcpStream) -> F + Send + 'static,
    F: Future<Output = std::io::Result<IO>> + Send + 'static,
{
    let (ready, incoming) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, address) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        crate::limited!(warn, error = %e, "TCP accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = ready.closed() => break,
            };
            let places = match admission.admit(address) {
                Ok(places) => places,
                Err(limit) => {
                    crate::limited!(warn, peer = %address, "{limit} reached; closing new connections");
                    continue;
                }
            };
            keep_alive(&tcp);
            // gRPC writes whole frames: a small one (console output, a trailer) goes out at
            // once instead of waiting for the peer's delayed ACK (docs/performance.md, "Live
            // migration").
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let (connection, ready) = (handshake(tcp), ready.clone());
            let (tls, idle) = (
                admission.tls,
                (admission.idle_timeout, admission.keys.idle_timeout),
            );
            tokio::spawn(async move {
                match connection.await {
                    Ok(io) => {
                        let conn = Conn::remote(io, address, tls, places, idle);
                        let _ = ready.send(Ok(conn)).await;
                    }
                    // An operator debugging certificates wants every failure; a flood of them is
                    // bounded all the same.
                    Err(e) => {
                        crate::limited!(burst: 200, info, peer = %address, error = %e, "TLS handshake failed")
                    }
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

/// The protection figures, read at each scrape of `/metrics`: calls in progress per listener,
/// TCP connections open, descriptors held by remote callers, request body bytes held.
#[derive(Clone)]
pub struct ProtectionFigures(Protection);

impl std::fmt::Debug for ProtectionFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProtectionFigures")
    }
}

impl Protection {
    /// Its figures, for [`crate::metrics`].
    pub fn figures(&self) -> ProtectionFigures {
        ProtectionFigures(self.clone())
    }
}

impl prometheus_client::collector::Collector for ProtectionFigures {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let p = &self.0;
        let share = p.remote_descriptors_limit;
        let gauges: [(&str, &str, i64); 5] = [
            (
                "local_calls_in_progress",
                "gRPC calls in progress on the local socket",
                p.local_calls.in_progress().into(),
            ),
            (
                "remote_calls_in_progress",
                "gRPC calls in progress on TCP",
                p.remote_calls.in_progress().into(),
            ),
            (
                "tcp_connections_open",
                "TCP connections open (TLS handshakes included)",
                i64::try_from(p.tcp_limit - p.tcp_connections.available_permits()).unwrap_or(0),
            ),
            (
                "remote_descriptors_held",
                "Descriptors held by remote callers (connections, history readers' log files)",
                i64::try_from(share - p.remote_descriptors.available_permits()).unwrap_or(0),
            ),
            (
                "remote_descriptors_limit",
                "Descriptors remote callers may hold: a quarter of RLIMIT_NOFILE",
                i64::try_from(share).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}
