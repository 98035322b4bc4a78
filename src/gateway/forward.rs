//! The gateway's `conlog.v1.Console` service: every call is forwarded, undecoded, to the node
//! its token names.
//!
//! Owns what happens to one call: the bearer token is verified with the cluster key (before
//! anything is opened upstream), a read-only watch goes to [`super::fanout`] (which decodes
//! its first message and serves it from a stream shared with the other watchers of that
//! console), the node claim picks the channel, and the HTTP/2 request —
//! headers, the gRPC-framed message bytes, the client's half-close — goes to the node as it
//! arrives; the response comes back the same way. Forwarded messages are never decoded, so fields a
//! newer node adds pass through, and the gateway's memory per stream is what HTTP/2 flow
//! control lets in (docs/gateway.md, "Backpressure"). A node that cannot be reached, or that
//! breaks a stream, ends the call with `UNAVAILABLE` naming it; a call whose token the cluster
//! key no longer verifies (the key was replaced) ends with `UNAUTHENTICATED`. It never decides which guest
//! or device a token may touch: the node re-verifies the token and does.

use super::fanout::{Fanout, Routed};
use super::upstream::Upstreams;
use super::GatewayError;
use crate::error::Error;
use crate::server::auth::{bearer_token, verify_bearer};
use crate::server::tally::Place;
use crate::tokens::{ClusterKey, Grant, TokenError, Verify};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::Status;

/// Request headers not forwarded: those of the client's connection, not of the call; and the
/// browser's `Origin` and cookies, which the gateway's own web layer judged (a node would see
/// the gateway's page as a foreign origin and refuse the call).
const NOT_FORWARDED: [&str; 9] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "origin",
    "cookie",
];

/// The forwarding Console service.
#[derive(Clone)]
pub(crate) struct Forward {
    keys: Arc<ClusterKey>,
    upstreams: Arc<Upstreams>,
    /// Read-only watches are served from shared streams ([`super::fanout`]).
    fanout: Arc<Fanout>,
}

impl Forward {
    pub(crate) fn new(
        keys: Arc<ClusterKey>,
        upstreams: Arc<Upstreams>,
        fanout: &super::config::FanoutConfig,
    ) -> Self {
        let fanout = Fanout::new(fanout, keys.clone(), upstreams.clone());
        Self {
            keys,
            upstreams,
            fanout,
        }
    }
}

impl tonic::server::NamedService for Forward {
    const NAME: &'static str = "conlog.v1.Console";
}

impl tower::Service<http::Request<Body>> for Forward {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            Ok(match this.forward(request).await {
                Ok(response) => response,
                Err(refusal) => {
                    crate::limited!(info, %refusal, "call refused at the gateway");
                    crate::error::status(&refusal).into_http()
                }
            })
        })
    }
}

/// A gateway error as the status its caller gets (`UNAVAILABLE`, the message naming the node).
fn unavailable(error: GatewayError) -> Error {
    Error::Unavailable(error.to_string())
}

impl Forward {
    async fn forward(&self, request: http::Request<Body>) -> Result<http::Response<Body>, Error> {
        let grant = self.authenticate(&request)?;
        let grant_token = bearer_token(request.headers())?.to_owned();
        let node = grant
            .node
            .clone()
            .ok_or_else(|| Error::Unauthenticated("Token refused: it names no node".into()))?;
        let mut request = match self
            .fanout
            .route(request, &grant, grant_token.clone(), &node)
            .await
        {
            Routed::Served(response) => return Ok(response),
            Routed::Forward(request) => request,
        };
        let span = tracing::info_span!("forward", node = %node, guest = %grant.guest, path = request.uri().path());
        let _entered = span.enter();
        let place = self.upstreams.place(&node).ok_or(Error::LimitReached {
            limit: "gateway.upstream.calls_per_node",
            value: self.upstreams.calls_per_node().into(),
        })?;
        for name in NOT_FORWARDED {
            request.headers_mut().remove(name);
        }
        request
            .headers_mut()
            .insert("te", http::HeaderValue::from_static("trailers"));
        drop(_entered);
        // Opened on the token's node; a moved status is followed to the guest's new node
        // (docs/gateway.md, "Following moves").
        let response = super::migrate::open(request, node.clone(), self.upstreams.clone())
            .await
            .map_err(unavailable)?;
        let recheck = Recheck::new(self.keys.clone(), grant_token);
        Ok(response.map(|inner| {
            Body::new(UpstreamBody {
                inner,
                node: node.into(),
                recheck,
                done: false,
                _place: place,
            })
        }))
    }

    /// The call's grant: its bearer token verified with the cluster key (once per call: the
    /// call limits already checked the signature when they could) and not expired; the same
    /// check as a node's ([`crate::server::auth::verify_bearer`]).
    fn authenticate(&self, request: &http::Request<Body>) -> Result<Grant, Error> {
        verify_bearer(request.headers(), request.extensions(), self.keys.as_ref())
    }
}

/// What a call in progress needs to check its token again when the cluster key changes.
/// Forwarded calls and fanned-out watchers ([`super::fanout`]) both hold one.
pub(super) struct Recheck {
    changes: tokio_stream::wrappers::WatchStream<u64>,
    token: String,
    keys: Arc<ClusterKey>,
}

impl Recheck {
    /// Rechecks `token` with `keys` at each change of the cluster key from now on.
    pub(super) fn new(keys: Arc<ClusterKey>, token: String) -> Self {
        let mut changes = keys.changes();
        changes.mark_unchanged();
        Self {
            changes: tokio_stream::wrappers::WatchStream::from_changes(changes),
            token,
            keys,
        }
    }

    /// Why the call must end now, if the key changed and no longer verifies its token.
    pub(super) fn poll_revoked(&mut self, cx: &mut Context<'_>) -> Option<Error> {
        use futures::Stream;
        while let Poll::Ready(Some(_)) = Pin::new(&mut self.changes).poll_next(cx) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // Only the signature and key: an expired token does not end an open call, as on
            // a node (docs/gateway.md, "Keys").
            match self.keys.verify(&self.token, now) {
                Ok(_) | Err(TokenError::Expired(_)) => {}
                Err(e) => {
                    return Some(Error::Unauthenticated(format!(
                        "Token refused: {e} (the cluster key changed during the call)"
                    )));
                }
            }
        }
        None
    }
}

/// An error and its sources, on one line.
pub(super) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// A node's response body: passed through frame by frame; if the node's stream breaks (the
/// node died, the connection dropped), the call ends with `UNAVAILABLE` naming the node in
/// its trailers instead of a reset, so clients resume by offset as after a node's upgrade.
struct UpstreamBody {
    inner: Body,
    node: Arc<str>,
    /// Ends the call when the cluster key changes and no longer verifies its token (the
    /// inner body is dropped with the call, which cancels it at the node).
    recheck: Recheck,
    done: bool,
    /// The call's place among the node's `gateway.upstream.calls_per_node`, given back when
    /// the response ends or is dropped.
    _place: Place<String>,
}

/// A status as the trailers that end a response.
pub(super) fn trailers(status: &Status) -> Frame<Bytes> {
    let mut trailers = http::HeaderMap::new();
    let _ = status.add_header(&mut trailers);
    Frame::trailers(trailers)
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(revoked) = self.recheck.poll_revoked(cx) {
            self.done = true;
            crate::limited!(info, node = %self.node, "call ended: its token no longer verifies");
            return Poll::Ready(Some(Ok(trailers(&crate::error::status(&revoked)))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                let broken = GatewayError::StreamBroken {
                    node: self.node.to_string(),
                    reason: e.message().to_owned(),
                };
                crate::limited!(info, error = %broken, "upstream stream broken");
                Poll::Ready(Some(Ok(trailers(&crate::error::status(&unavailable(
                    broken,
                ))))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
