//! Probes that connect and call over and over while the daemon changes hands.

use super::PACE;
use crate::support::*;
use conlog::proto::{self, agent_client::AgentClient};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
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

/// How soon calls must be served again after the test saw the new image's "conlogd ready"
/// line (after an upgrade or a takeover). The daemon promises a pause of well under a second
/// (docs/performance.md, "Upgrade pause": p99 < 100 ms with 2,000 guests); the test sees the
/// ready line by polling a file, and its probe paces itself and connects anew for each call on
/// a shared 2-CPU machine, hence 2 s. A daemon answering UNAVAILABLE for seconds after each
/// upgrade, or whose new image serves only some connections, does not make it.
pub const RECOVERY: Duration = Duration::from_secs(2);

/// Whether a failed attempt (a connect error or a status, as `{:?}`) is the one kind an
/// upgrade or a takeover may cause: the call or connection landed on the image that is
/// leaving and was ended, either with UNAVAILABLE or by the connection closing under it (a
/// transport error: reset, broken pipe, end of stream, HTTP/2 stream or connection closed).
/// A refused connection, a token that stopped working, or any other status the daemon
/// answers is a bug.
pub fn leaving_image_failure(failure: &str) -> bool {
    let refused = failure.contains("refused") || failure.contains("os error 111");
    let unavailable = failure.contains("code: Unavailable");
    // Statuses made by the client from a transport failure, not answered by the daemon.
    let transport = failure.contains("tonic::transport::Error")
        || failure.contains("hyper::Error")
        || failure.contains("h2 protocol error")
        || failure.starts_with("connect");
    (unavailable || transport) && !refused
}

/// A task calling `ListGuests` on a new connection of the local socket, and `ReadHistory` on
/// a new TCP connection with a token issued before any upgrade, over and over. Calls may fail
/// only as [`leaving_image_failure`] allows, and must be served again within [`RECOVERY`] of
/// each new image being ready ([`CallProbe::wait_served`]); a connection may never be refused.
pub struct CallProbe {
    stop: Arc<AtomicBool>,
    /// Calls served so far: `[local, remote]`.
    served: Arc<[AtomicU64; 2]>,
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
    /// The failures an upgrade or a takeover may not cause (see [`leaving_image_failure`]):
    /// refused connections, a pre-upgrade token refused, any other status.
    pub fn unexpected(&self) -> Vec<&String> {
        self.failed
            .iter()
            .filter(|e| !leaving_image_failure(e))
            .collect()
    }
}

impl CallProbe {
    pub fn start(socket: &Path, tcp: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let socket = socket.to_owned();
        let task = tokio::spawn({
            let (stop, served) = (stop.clone(), served.clone());
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
                        // NOT_FOUND: the token was accepted and the guest looked up.
                        match client.read_history(request).await {
                            Err(s) if s.code() == Code::NotFound => Ok(()),
                            other => Err(format!("ReadHistory over TCP: {other:?}")),
                        }
                    };
                    for (i, outcome) in [local.await, remote.await].into_iter().enumerate() {
                        match outcome {
                            Ok(()) => {
                                stats.served += 1;
                                served[i].fetch_add(1, SeqCst);
                            }
                            Err(e) => stats.failed.push(e),
                        }
                    }
                    tokio::time::sleep(PACE * 2).await;
                }
                stats
            }
        });
        Self { stop, served, task }
    }

    /// Waits until a local and a remote call that started after this call were served; panics
    /// (naming `what`) if that takes longer than [`RECOVERY`].
    pub async fn wait_served(&self, what: &str) {
        // The next count may be a call already under way: two more mean one started after.
        let want = [0, 1].map(|i| self.served[i].load(SeqCst) + 2);
        let deadline = Instant::now() + RECOVERY;
        while (0..2).any(|i| self.served[i].load(SeqCst) < want[i]) {
            assert!(!self.task.is_finished(), "{what}: the call probe stopped");
            assert!(
                Instant::now() < deadline,
                "{what}: calls not served again within {RECOVERY:?} (local, remote served: \
                 {:?} of {want:?})",
                [0, 1].map(|i| self.served[i].load(SeqCst))
            );
            tokio::time::sleep(POLL).await;
        }
    }

    pub async fn finish(self) -> CallStats {
        self.stop.store(true, SeqCst);
        bounded("the call probe to stop", self.task)
            .await
            .expect("call probe panicked")
    }
}
