//! The gRPC listeners: which services are served where.
//!
//! Owns the composition of tonic servers: the local UNIX socket serves `Agent`, `Console`,
//! health and reflection of the whole API; TCP serves `Console`, health and reflection of the
//! console API only, so the `Agent` service cannot be called or even discovered over the
//! network. Handlers live in [`agent`] and [`console`] and do no work of their own beyond
//! validating requests and calling the owning module. The single `Error → Status` mapping is
//! in [`crate::error`].

pub mod agent;
mod authority;
pub mod console;

use crate::proto;
use std::future::Future;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::transport::Server;
use tonic_health::ServingStatus;

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
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let reflection_v1 = reflection(proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("embedded descriptors are valid");
    let reflection_v1alpha = reflection(proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("embedded descriptors are valid");
    Server::builder()
        .add_service(health(&[AGENT_SERVICE, CONSOLE_SERVICE]).await)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(proto::agent_server::AgentServer::new(agent))
        .add_service(proto::console_server::ConsoleServer::new(console))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener)
                .map(|stream| stream.map(authority::AuthorityFix::new)),
            shutdown,
        )
        .await
}

/// Serves the console API on TCP until `shutdown` resolves.
pub async fn serve_tcp(
    listener: TcpListener,
    console: console::ConsoleService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let reflection_v1 = reflection(proto::CONSOLE_FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("embedded descriptors are valid");
    let reflection_v1alpha = reflection(proto::CONSOLE_FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("embedded descriptors are valid");
    Server::builder()
        .add_service(health(&[CONSOLE_SERVICE]).await)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(proto::console_server::ConsoleServer::new(console))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
