//! Call limits of the gRPC listeners: calls in progress per connection, per listener, and on
//! TCP per peer address and per guest, and the status of messages over the size limit.
//!
//! Owns the tower layer every listener's routes are wrapped in. A call counts from its request
//! until its response body is dropped (the end of a stream), on its connection's counter (in
//! [`ConnInfo`]), on its listener's total — the local socket and TCP have separate budgets, so
//! remote callers can never take the agent's places — and, on TCP, on its peer address and on
//! the guest its token is for (a token whose signature does not verify is charged to its peer
//! address only; the interceptor refuses it a moment later). A call over any limit gets
//! `RESOURCE_EXHAUSTED` naming the limit without reaching a handler. Health checks are exempt:
//! a busy daemon must not be restarted by its liveness probe (they still count as activity of
//! their connection). tonic reports a message over `limits.message_size` as `OUT_OF_RANGE`;
//! this layer turns that into `RESOURCE_EXHAUSTED` naming the limit. It never looks at message
//! contents.

use super::conn::{Activity, ConnInfo};
use super::tally::{Place, Tally};
use crate::config::Limits;
use crate::error::Error;
use crate::tokens::Verify;
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The config keys a TCP listener's limits are named by when they refuse a connection, a
/// call or a request body: a node's `limits.*`, or `gateway.limits.*` at a gateway, so that a
/// refusal names the setting of the process that refused.
#[derive(Debug)]
pub(crate) struct LimitKeys {
    pub total: &'static str,
    pub per_connection: &'static str,
    pub per_peer: &'static str,
    pub per_guest: &'static str,
    pub tcp_connections: &'static str,
    pub connections_per_peer: &'static str,
    pub idle_timeout: &'static str,
    pub body_timeout: &'static str,
    pub message_size: &'static str,
    pub web_body_bytes: &'static str,
}

/// A node's TCP listener.
pub(crate) const NODE_KEYS: LimitKeys = LimitKeys {
    total: "limits.remote_calls_total",
    per_connection: "limits.calls_per_connection",
    per_peer: "limits.calls_per_peer",
    per_guest: "limits.calls_per_guest",
    tcp_connections: "limits.tcp_connections",
    connections_per_peer: "limits.connections_per_peer",
    idle_timeout: "limits.idle_timeout",
    body_timeout: "limits.body_timeout",
    message_size: "limits.message_size",
    web_body_bytes: "limits.web_body_bytes",
};

/// `conlog-gateway`'s listener (docs/gateway.md, "Limits and deadlines").
pub(crate) const GATEWAY_KEYS: LimitKeys = LimitKeys {
    total: "gateway.limits.calls_total",
    per_connection: "gateway.limits.calls_per_connection",
    per_peer: "gateway.limits.calls_per_peer",
    per_guest: "gateway.limits.calls_per_guest",
    tcp_connections: "gateway.limits.tcp_connections",
    connections_per_peer: "gateway.limits.connections_per_peer",
    idle_timeout: "gateway.limits.idle_timeout",
    body_timeout: "gateway.limits.body_timeout",
    message_size: "gateway.limits.message_size",
    web_body_bytes: "gateway.limits.web_body_bytes",
};

/// The counters and limits of one listener's calls.
pub struct CallLimits {
    per_connection: u32,
    /// The config key of the per-connection limit.
    per_connection_key: &'static str,
    /// The config key of the listener's total.
    total_key: &'static str,
    total_limit: u32,
    total: Arc<AtomicU32>,
    /// TCP only: per peer address and per guest.
    remote: Option<RemoteLimits>,
}

struct RemoteLimits {
    per_peer: Arc<Tally<IpAddr>>,
    per_peer_key: &'static str,
    per_guest: Arc<Tally<String>>,
    per_guest_key: &'static str,
    tokens: Arc<dyn Verify>,
    /// Tokens of the nodes this node's guests migrated from, checked there (set once the
    /// importer exists; docs/design.md, "Live migration").
    foreign: std::sync::RwLock<Option<Arc<crate::migration::tokens::ForeignTokens>>>,
}

impl CallLimits {
    /// The local socket's limits (`limits.calls_total`).
    pub fn local(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            per_connection: limits.calls_per_connection,
            per_connection_key: "limits.calls_per_connection",
            total_key: "limits.calls_total",
            total_limit: limits.calls_total,
            total: Arc::new(AtomicU32::new(0)),
            remote: None,
        })
    }

    /// TCP's limits (`limits.remote_calls_total`, per peer, per guest); `tokens` tells which
    /// guest a call's token is for.
    pub(crate) fn remote(limits: &Limits, tokens: Arc<dyn Verify>) -> Arc<Self> {
        Self::remote_named(limits, tokens, &NODE_KEYS)
    }

    /// The same, refusing calls in the name of `keys`.
    pub(crate) fn remote_named(
        limits: &Limits,
        tokens: Arc<dyn Verify>,
        keys: &'static LimitKeys,
    ) -> Arc<Self> {
        Arc::new(Self {
            per_connection: limits.calls_per_connection,
            per_connection_key: keys.per_connection,
            total_key: keys.total,
            total_limit: limits.remote_calls_total,
            total: Arc::new(AtomicU32::new(0)),
            remote: Some(RemoteLimits {
                per_peer: Tally::new(limits.calls_per_peer),
                per_peer_key: keys.per_peer,
                per_guest: Tally::new(limits.calls_per_guest),
                per_guest_key: keys.per_guest,
                tokens,
                foreign: std::sync::RwLock::new(None),
            }),
        })
    }

    /// Tokens of other nodes for guests imported here are checked by `foreign`.
    pub(crate) fn set_foreign(&self, foreign: Arc<crate::migration::tokens::ForeignTokens>) {
        if let Some(remote) = &self.remote {
            *remote
                .foreign
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(foreign);
        }
    }

    /// The checker, the claimed grant and the hop count (`conlog-token-hops`: how many nodes
    /// already passed the check along) of a request whose token did not verify here, for a
    /// guest imported here.
    fn foreign_candidate(
        &self,
        request: &http::Request<Body>,
    ) -> Option<(
        Arc<crate::migration::tokens::ForeignTokens>,
        String,
        crate::tokens::Grant,
        u32,
    )> {
        let foreign = self
            .remote
            .as_ref()?
            .foreign
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        let token = super::auth::bearer_token(request.headers())
            .ok()?
            .to_owned();
        let grant = foreign.candidate(&token)?;
        let hops = request
            .headers()
            .get(crate::migration::tokens::HOPS_HEADER)
            .and_then(|value| value.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        Some((foreign, token, grant, hops))
    }

    /// Calls in progress on this listener.
    pub fn in_progress(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }

    /// Counts one more call, or names the limit it would break.
    /// Counts one more call, or names the limit it would break; on TCP, also the grant of the
    /// call's token if its signature verifies (for [`super::auth::Signed`]).
    fn admit(
        &self,
        request: &http::Request<Body>,
    ) -> Result<(CallGuard, Option<crate::tokens::Grant>), Error> {
        let refused = |limit: &'static str, value: u32| Error::LimitReached {
            limit,
            value: value.into(),
        };
        let connection = request.extensions().get::<ConnInfo>();
        let total = Counted::take(&self.total, self.total_limit)
            .ok_or_else(|| refused(self.total_key, self.total_limit))?;
        let mut guard = CallGuard {
            _total: Some(total),
            ..CallGuard::default()
        };
        if let Some(info) = connection {
            guard.connection = Some(
                ConnCall::take(&info.activity, self.per_connection)
                    .ok_or_else(|| refused(self.per_connection_key, self.per_connection))?,
            );
        }
        let Some(remote) = &self.remote else {
            return Ok((guard, None));
        };
        if let Some(ip) = connection.and_then(ConnInfo::remote_ip) {
            guard._peer = Some(
                remote
                    .per_peer
                    .take(ip)
                    .ok_or_else(|| refused(remote.per_peer_key, remote.per_peer.limit()))?,
            );
        }
        let grant = token_grant(request, remote.tokens.as_ref());
        if let Some(grant) = &grant {
            guard._guest = Some(
                remote
                    .per_guest
                    .take(grant.scope())
                    .ok_or_else(|| refused(remote.per_guest_key, remote.per_guest.limit()))?,
            );
        }
        Ok((guard, grant))
    }
}

/// The grant of the request's bearer token, if its signature verifies (expiry is the
/// interceptor's to judge: an expired token is charged to its guest like a valid one).
fn token_grant(request: &http::Request<Body>, tokens: &dyn Verify) -> Option<crate::tokens::Grant> {
    let token = super::auth::bearer_token(request.headers()).ok()?;
    tokens.verify(token, 0).ok()
}

/// One unit of a counter, given back on drop.
struct Counted(Arc<AtomicU32>);

/// Adds one to `counter` unless it is at `limit`; whether it did.
fn increment_below(counter: &AtomicU32, limit: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok()
}

impl Counted {
    fn take(counter: &Arc<AtomicU32>, limit: u32) -> Option<Self> {
        increment_below(counter, limit).then(|| Self(counter.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One call of a connection, ended on drop (the connection's idle time starts at the last).
struct ConnCall(Arc<Activity>);

impl ConnCall {
    fn take(activity: &Arc<Activity>, limit: u32) -> Option<Self> {
        increment_below(&activity.calls, limit).then(|| Self(activity.clone()))
    }
}

impl Drop for ConnCall {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}

/// Holds a call's places until its response body is dropped.
#[derive(Default)]
struct CallGuard {
    _total: Option<Counted>,
    connection: Option<ConnCall>,
    _peer: Option<Place<IpAddr>>,
    _guest: Option<Place<String>>,
}

/// The layer, for `Server::layer`.
#[derive(Clone)]
pub struct CallLimitsLayer(pub Arc<CallLimits>);

impl<S> Layer<S> for CallLimitsLayer {
    type Service = CallLimitsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLimitsService {
            inner,
            limits: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallLimitsService<S> {
    inner: S,
    limits: Arc<CallLimits>,
}

impl<S> Service<http::Request<Body>> for CallLimitsService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            // Not limited, but activity of its connection while it runs.
            let guard = CallGuard {
                connection: request
                    .extensions()
                    .get::<ConnInfo>()
                    .and_then(|info| ConnCall::take(&info.activity, u32::MAX)),
                ..CallGuard::default()
            };
            let response = self.inner.call(request);
            return Box::pin(async move {
                Ok(response.await?.map(|body| {
                    Body::new(Guarded {
                        inner: body,
                        _guard: guard,
                    })
                }))
            });
        }
        let guard = match self.limits.admit(&request) {
            Ok((guard, Some(grant))) => {
                request.extensions_mut().insert(super::auth::Signed(grant));
                guard
            }
            Ok((guard, None)) => match self.limits.foreign_candidate(&request) {
                // A token of the node its guest migrated from: that node checks it first.
                Some((foreign, token, claimed, hops)) => {
                    let mut inner = self.inner.clone();
                    std::mem::swap(&mut self.inner, &mut inner);
                    return Box::pin(async move {
                        match foreign.check(&token, claimed, hops).await {
                            Ok(grant) => {
                                request.extensions_mut().insert(super::auth::Signed(grant));
                            }
                            Err(status) => return Ok(status.into_http()),
                        }
                        let mut response = inner.call(request).await?;
                        rename_too_large(response.headers_mut());
                        Ok(response.map(|body| {
                            Body::new(Guarded {
                                inner: body,
                                _guard: guard,
                            })
                        }))
                    });
                }
                None => guard,
            },
            Err(refusal) => {
                crate::limited!(warn, path = request.uri().path(), %refusal, "call refused");
                let status = Status::from(refusal);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            rename_too_large(response.headers_mut());
            Ok(response.map(|body| {
                Body::new(Guarded {
                    inner: body,
                    _guard: guard,
                })
            }))
        })
    }
}

/// tonic's "decoded message length too large" (`OUT_OF_RANGE`) → `RESOURCE_EXHAUSTED` naming
/// `limits.message_size`, in a trailers-only response.
fn rename_too_large(headers: &mut http::HeaderMap) {
    if let Some(status) = Status::from_header_map(headers) {
        if let Some(renamed) = message_size_status(&status) {
            let _ = renamed.add_header(headers);
        }
    }
}

/// The status a too-large message should have been reported with, if `status` is one. Built
/// here, not in `crate::error`: it rewrites a status tonic's transport already chose (its
/// decoder's `OUT_OF_RANGE`), which no error of ours stands behind.
pub fn message_size_status(status: &Status) -> Option<Status> {
    (status.code() == tonic::Code::OutOfRange
        && status.message().contains("message length too large"))
    .then(|| {
        Status::resource_exhausted(format!(
            "Limit limits.message_size reached: {}",
            status.message()
        ))
    })
}

/// A response body that keeps its call counted until it is dropped.
struct Guarded {
    inner: Body,
    _guard: CallGuard,
}

impl HttpBody for Guarded {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        // No new frame while the connection's socket is write-blocked (see `conn`): a peer
        // that stopped reading holds back its streams, not the daemon's memory.
        if let Some(ConnCall(activity)) = &self._guard.connection {
            if activity.poll_writable(cx).is_pending() {
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::conn::{Activity, Peer};
    use crate::tokens::{Access, Grant, TokenKey};
    use std::net::SocketAddr;

    fn request(
        peer: [u8; 4],
        connection: &Arc<Activity>,
        token: Option<&str>,
    ) -> http::Request<Body> {
        let mut request = http::Request::new(Body::empty());
        request.extensions_mut().insert(ConnInfo {
            peer: Peer::Remote {
                address: SocketAddr::from((peer, 40_000)),
                tls: false,
            },
            activity: connection.clone(),
        });
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().unwrap();
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value);
        }
        request
    }

    /// The config key a call was refused by, or "admitted".
    fn outcome(result: &Result<(CallGuard, Option<crate::tokens::Grant>), Error>) -> &'static str {
        match result {
            Ok(_) => "admitted",
            Err(Error::LimitReached { limit, .. }) => limit,
            Err(e) => panic!("not a limit: {e}"),
        }
    }

    /// Each remote limit refuses exactly at its value, names its key, gives back every place
    /// a refused call took, and a token charges its guest only if its signature verifies.
    #[test]
    fn each_remote_limit_is_counted_and_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let key = Arc::new(TokenKey::load_or_create(&dir.path().join("token.key")).unwrap());
        let limits = Limits {
            calls_per_connection: 2,
            remote_calls_total: 4,
            calls_per_peer: 3,
            calls_per_guest: 1,
            ..Limits::default()
        };
        let calls = CallLimits::remote(&limits, key.clone());
        let token = key.issue(Grant {
            guest: "vm1".into(),
            device: None,
            access: Access::Read,
            expires_unix: u64::MAX,
            key_id: String::new(),
            issued_unix: None,
            node: None,
        });
        let (a, b, c, d) = (
            Arc::new(Activity::new()),
            Arc::new(Activity::new()),
            Arc::new(Activity::new()),
            Arc::new(Activity::new()),
        );

        let first = calls.admit(&request([10, 0, 0, 1], &a, Some(&token)));
        assert_eq!(outcome(&first), "admitted");
        assert_eq!(
            first.as_ref().unwrap().1.as_ref().map(|g| g.guest.as_str()),
            Some("vm1")
        );
        // The guest's one place is taken, whoever calls with its token.
        let refused = calls.admit(&request([10, 0, 0, 2], &b, Some(&token)));
        assert_eq!(outcome(&refused), "limits.calls_per_guest");
        drop(refused);
        assert_eq!(
            calls.in_progress(),
            1,
            "a refused call gives its places back"
        );
        assert_eq!(b.calls.load(Ordering::Relaxed), 0);
        // A token whose signature does not verify charges its peer only.
        // Its last character changed (whatever it was), so the signature cannot match.
        let last = if token.ends_with('A') { "B" } else { "A" };
        let forged = format!("{}{last}", &token[..token.len() - 1]);
        let unsigned = calls.admit(&request([10, 0, 0, 2], &b, Some(&forged)));
        assert_eq!(outcome(&unsigned), "admitted");
        assert!(unsigned.as_ref().unwrap().1.is_none());
        // Two calls per connection.
        let second = calls.admit(&request([10, 0, 0, 1], &a, None));
        assert_eq!(outcome(&second), "admitted");
        let third_on_a = calls.admit(&request([10, 0, 0, 1], &a, None));
        assert_eq!(outcome(&third_on_a), "limits.calls_per_connection");
        drop(third_on_a);
        // Three per peer address, across its connections; four in all.
        let on_c = calls.admit(&request([10, 0, 0, 1], &c, None));
        assert_eq!(outcome(&on_c), "admitted");
        assert_eq!(calls.in_progress(), 4);
        let over_total = calls.admit(&request([10, 0, 0, 9], &d, None));
        assert_eq!(outcome(&over_total), "limits.remote_calls_total");
        drop(over_total);
        drop(unsigned);
        let over_peer = calls.admit(&request([10, 0, 0, 1], &c, None));
        assert_eq!(outcome(&over_peer), "limits.calls_per_peer");
        drop(over_peer);
        assert_eq!(c.calls.load(Ordering::Relaxed), 1);
        // The guest's place comes back with its call.
        drop(first);
        let again = calls.admit(&request([10, 0, 0, 2], &b, Some(&token)));
        assert_eq!(outcome(&again), "admitted");
        assert_eq!(calls.in_progress(), 3, "second, on_c and again");
    }
}
