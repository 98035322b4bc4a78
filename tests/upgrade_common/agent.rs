//! Agent calls that retry while the daemon is between two images.

use crate::support::*;
use conlog::proto::{self, agent_client::AgentClient};
use std::path::Path;
use std::time::Instant;
use tonic::transport::Channel;

// Agent calls that survive upgrades

/// An agent client on a new connection, retrying (bounded) while the socket refuses.
pub async fn agent(socket: &Path) -> AgentClient<Channel> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match conlog::client::connect_local(socket).await {
            Ok(channel) => return AgentClient::new(channel),
            Err(e) if Instant::now() > deadline => {
                panic!("connect to {}: {e:?} for {DEADLINE:?}", socket.display())
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// `ListGuests` on a new connection, retrying (bounded) while the daemon is between images.
pub async fn list_guests(socket: &Path) -> proto::ListGuestsResponse {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let attempt = async {
            let channel = conlog::client::connect_local(socket)
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            let reply = tokio::time::timeout(
                DEADLINE,
                AgentClient::new(channel).list_guests(proto::ListGuestsRequest::default()),
            )
            .await
            .map_err(|_| "ListGuests timed out".to_owned())?;
            reply
                .map(|r| r.into_inner())
                .map_err(|s| format!("ListGuests: {s:?}"))
        };
        match attempt.await {
            Ok(reply) => return reply,
            Err(e) if Instant::now() > deadline => panic!("{e} (for {DEADLINE:?})"),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// The stream `guest/stream` in a `ListGuests` reply.
pub fn find<'a>(
    reply: &'a proto::ListGuestsResponse,
    guest: &str,
    stream: &str,
) -> Option<&'a proto::StreamInfo> {
    reply
        .guests
        .iter()
        .find(|g| g.name == guest)?
        .streams
        .iter()
        .find(|s| s.name == stream)
}

/// Like [`find`], but the stream must be listed.
#[track_caller]
pub fn get<'a>(
    reply: &'a proto::ListGuestsResponse,
    guest: &str,
    stream: &str,
) -> &'a proto::StreamInfo {
    find(reply, guest, stream).unwrap_or_else(|| panic!("{guest}/{stream} is not listed"))
}

/// Polls `ListGuests` (bounded) until `done` holds; returns that reply.
pub async fn wait_list(
    socket: &Path,
    what: &str,
    done: impl Fn(&proto::ListGuestsResponse) -> bool,
) -> proto::ListGuestsResponse {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = list_guests(socket).await;
        if done(&reply) {
            return reply;
        }
        if Instant::now() > deadline {
            let streams: Vec<String> = reply
                .guests
                .iter()
                .flat_map(|g| {
                    g.streams.iter().map(move |s| {
                        format!(
                            "{}/{}: offset {} open {} writers {} clients {} guest_connected {} broken {}",
                            g.name, s.name, s.offset, s.open, s.writers, s.clients, s.guest_connected, s.broken
                        )
                    })
                })
                .take(20)
                .collect();
            panic!(
                "not {what} after {DEADLINE:?}; last ListGuests:\n{}",
                streams.join("\n")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
