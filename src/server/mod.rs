//! The gRPC listeners: which services are served where.
//!
//! Owns the composition of tonic servers: the local UNIX socket serves `Agent`, `Console`,
//! health and reflection of the whole API; TCP serves `Console`, health and reflection of the
//! console API only, so the `Agent` service cannot be called or even discovered over the
//! network. Handlers live in [`agent`] and [`console`] and do no work of their own beyond
//! validating requests and calling the owning module. The single `Error → Status` mapping is
//! in [`crate::error`]. On TCP every `Console` call needs a bearer token ([`auth`]); on both,
//! calls in progress and message sizes are limited ([`limits`]). TCP also speaks gRPC-web
//! (binary and text, over HTTP/1.1 or HTTP/2) and serves the console page at `/console/`
//! ([`web`]); its layers run, outermost first: [`web::WebLayer`] (page, CORS), tonic-web's
//! translation into gRPC, [`limits::CallLimitsLayer`], then the services behind their
//! interceptors, so a gRPC-web call is a gRPC call by the time limits and tokens see it.

pub mod agent;
pub mod auth;
mod authority;
pub mod conn;
pub mod console;
pub mod limits;
pub mod web;

use crate::proto;
use crate::tls::Tls;
use crate::tokens::TokenKey;
use conn::Conn;
use limits::{CallLimits, CallLimitsLayer};
use std::future::Future;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;

/// What protects both listeners: call limits and the largest message accepted.
#[derive(Clone)]
pub struct Protection {
    pub calls: Arc<CallLimits>,
    pub message_size: usize,
    pub calls_per_connection: u32,
    /// Places for TCP connections (`limits.tcp_connections`).
    pub tcp_connections: Arc<tokio::sync::Semaphore>,
    /// Origins allowed to call over gRPC-web from other pages (`web`).
    pub web: web::WebOptions,
}

impl Protection {
    pub fn new(limits: &crate::config::Limits) -> Self {
        Self {
            calls: CallLimits::new(limits),
            message_size: limits.message_size.bytes() as usize,
            calls_per_connection: limits.calls_per_connection,
            tcp_connections: Arc::new(tokio::sync::Semaphore::new(limits.tcp_connections as usize)),
            web: web::WebOptions::new(limits.message_size.bytes() as usize),
        }
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
    ) -> Server<tower::layer::util::Stack<CallLimitsLayer, tower::layer::util::Identity>> {
        self.builder().layer(CallLimitsLayer(self.calls.clone()))
    }

    fn builder(&self) -> Server {
        Server::builder()
            .max_concurrent_streams(self.calls_per_connection.saturating_mul(2))
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .http2_max_header_list_size(web::MAX_HEADER_BYTES as u32)
    }

    fn console(
        &self,
        console: console::ConsoleService,
    ) -> console::InputBounded<proto::console_server::ConsoleServer<console::ConsoleService>> {
        console::InputBounded(
            proto::console_server::ConsoleServer::new(console)
                .max_decoding_message_size(self.message_size),
        )
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
        .server()
        .add_service(health(&[AGENT_SERVICE, CONSOLE_SERVICE]).await)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            proto::agent_server::AgentServer::new(agent)
                .max_decoding_message_size(protection.message_size),
        )
        .add_service(InterceptedService::new(
            protection.console(console),
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
    let reflection_v1 = reflection(proto::CONSOLE_FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("embedded descriptors are valid");
    let reflection_v1alpha = reflection(proto::CONSOLE_FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("embedded descriptors are valid");
    let router = protection
        .builder()
        .accept_http1(true)
        .layer(web::WebLayer(protection.web.clone()))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(CallLimitsLayer(protection.calls.clone()))
        .add_service(health(&[CONSOLE_SERVICE]).await)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            protection.console(console),
            auth::BearerTokens(tokens),
        ));
    let slots = protection.tcp_connections.clone();
    match tls {
        None => {
            let incoming = tcp_incoming(listener, slots, false, |tcp| async move { Ok(tcp) });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        Some(tls) => {
            let incoming = tcp_incoming(listener, slots, true, move |tcp| {
                let tls = tls.clone();
                async move { tls.accept(tcp).await }
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
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let incoming = tcp_incoming(listener, slots, false, |tcp| async move { Ok(tcp) });
    protection
        .server()
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

/// Accepted TCP connections, after `handshake` (TLS, or nothing). Each handshake runs on its
/// own task, so a client that never finishes one delays nobody; a connection over
/// `limits.tcp_connections` (handshakes included) is closed at once. The accept loop ends when
/// the stream is dropped.
fn tcp_incoming<IO, H, F>(
    listener: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    tls: bool,
    handshake: H,
) -> ReceiverStream<std::io::Result<Conn<IO>>>
where
    IO: Send + 'static,
    H: Fn(tokio::net::TcpStream) -> F + Send + 'static,
    F: Future<Output = std::io::Result<IO>> + Send + 'static,
{
    let (ready, incoming) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut refused = 0u64;
        loop {
            let (tcp, address) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "TCP accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = ready.closed() => break,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(peer = %address, refused, "limits.tcp_connections reached; closing new connections");
                }
                continue;
            };
            keep_alive(&tcp);
            let (connection, ready) = (handshake(tcp), ready.clone());
            tokio::spawn(async move {
                match connection.await {
                    Ok(io) => {
                        let _ = ready.send(Ok(Conn::remote(io, address, tls, slot))).await;
                    }
                    Err(e) => tracing::info!(peer = %address, error = %e, "TLS handshake failed"),
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}
