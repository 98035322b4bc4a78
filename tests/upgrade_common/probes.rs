//! Probes that connect and call over and over while the daemon changes hands.

use super::PACE;
use crate::support::*;
use conlog::proto::{self, agent_client::AgentClient};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;

/// A thread connecting over and over to the daemon's listening sockets (raw `connect()`,
/// closed at once): while the daemon changes hands, no connection may be refused.
pub struct ConnectProbe {
    stop: Arc<AtomicBool>,
    connects: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

/// A socket [`ConnectProbe`] connects to.
#[derive(Clone, Debug)]
pub enum Target {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl ConnectProbe {
    pub fn start(targets: Vec<Target>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, connects) = (stop.clone(), connects.clone());
            move || {
                let mut failures = Vec::new();
                while !stop.load(SeqCst) {
                    for target in &targets {
                        let result = match target {
                            Target::Unix(path) => {
                                std::os::unix::net::UnixStream::connect(path).map(drop)
                            }
                            Target::Tcp(address) => {
                                std::net::TcpStream::connect_timeout(address, DEADLINE).map(drop)
                            }
                        };
                        match result {
                            Ok(()) => {
                                connects.fetch_add(1, SeqCst);
                            }
                            Err(e) => failures.push(format!("{target:?}: {e}")),
                        }
                    }
                    std::thread::sleep(PACE * 2);
                }
                failures
            }
        });
        Self {
            stop,
            connects,
            thread: Some(thread),
        }
    }

    /// Successful connections so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(SeqCst)
    }

    /// Waits (bounded) until `more` connections succeeded after this call.
    pub async fn wait_more(&self, more: u64) {
        let want = self.connects() + more;
        let deadline = Instant::now() + DEADLINE;
        while self.connects() < want {
            assert!(
                Instant::now() < deadline,
                "connections stopped succeeding ({} of {want})",
                self.connects()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops probing; returns the failures (each naming its target and error).
    pub async fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, SeqCst);
        let thread = self.thread.take().unwrap();
        let deadline = Instant::now() + DEADLINE;
        while !thread.is_finished() {
            assert!(
                Instant::now() < deadline,
                "connect probe stuck in connect()"
            );
            tokio::time::sleep(POLL).await;
        }
        (self.connects(), thread.join().expect("probe thread"))
    }
}

impl Drop for ConnectProbe {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// A task calling `ListGuests` on a new connection of the local socket, and `ReadHistory` on
/// a new TCP connection, over and over. Calls may fail while the daemon changes hands (the
/// connection was accepted by the image that is leaving); a connection may never be refused.
pub struct CallProbe {
    stop: Arc<AtomicBool>,
    task: JoinHandle<CallStats>,
}

/// What a [`CallProbe`] saw.
#[derive(Debug, Default)]
pub struct CallStats {
    pub served: u64,
    /// Calls that failed otherwise (retried), with their errors.
    pub failed: Vec<String>,
}

impl CallStats {
    /// The failures that were refused connections.
    pub fn refused(&self) -> Vec<&String> {
        self.failed
            .iter()
            .filter(|e| e.contains("refused") || e.contains("os error 111"))
            .collect()
    }
}

impl CallProbe {
    pub fn start(socket: &Path, tcp: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = socket.to_owned();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut stats = CallStats::default();
                // Issued once, before any upgrade: tokens must survive them.
                let token = {
                    let channel = conlog::client::connect_local(&socket)
                        .await
                        .expect("connect to the local socket");
                    AgentClient::new(channel)
                        .issue_token(proto::IssueTokenRequest {
                            guest: "no-such-guest".into(),
                            access: proto::Access::Read.into(),
                            ttl_seconds: 3600,
                            ..Default::default()
                        })
                        .await
                        .expect("IssueToken")
                        .into_inner()
                        .token
                };
                while !stop.load(SeqCst) {
                    let local = async {
                        let channel = conlog::client::connect_local(&socket)
                            .await
                            .map_err(|e| format!("connect {}: {e:?}", socket.display()))?;
                        AgentClient::new(channel)
                            .list_guests(proto::ListGuestsRequest::default())
                            .await
                            .map(drop)
                            .map_err(|s| format!("ListGuests: {s:?}"))
                    };
                    let remote = async {
                        let channel = Channel::from_shared(format!("http://{tcp}"))
                            .unwrap()
                            .connect()
                            .await
                            .map_err(|e| format!("connect {tcp}: {e:?}"))?;
                        let request = proto::ReadHistoryRequest {
                            guest: "no-such-guest".into(),
                            ..Default::default()
                        };
                        let mut client = with_token(channel, &token).console();
                        match client.read_history(request).await {
                            Err(s) if s.code() == Code::NotFound => Ok(()),
                            other => Err(format!("ReadHistory over TCP: {other:?}")),
                        }
                    };
                    for outcome in [local.await, remote.await] {
                        match outcome {
                            Ok(()) => stats.served += 1,
                            Err(e) => stats.failed.push(e),
                        }
                    }
                    tokio::time::sleep(PACE * 2).await;
                }
                stats
            }
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> CallStats {
        self.stop.store(true, SeqCst);
        bounded("the call probe to stop", self.task)
            .await
            .expect("call probe panicked")
    }
}
