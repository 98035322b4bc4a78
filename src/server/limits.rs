//! Call limits of the gRPC listeners: calls in progress per connection and in total, and the
//! status of messages over the size limit.
//!
//! Owns the tower layer every listener's routes are wrapped in. A call counts from its request
//! until its response body is dropped (the end of a stream), on its connection's counter (in
//! [`ConnInfo`]) and on the shared total; a call over either limit gets `RESOURCE_EXHAUSTED`
//! naming the limit without reaching a handler. Health checks are exempt: a busy daemon must
//! not be restarted by its liveness probe. tonic reports a message over
//! `limits.message_size` as `OUT_OF_RANGE`; this layer turns that into `RESOURCE_EXHAUSTED`
//! naming the limit. It never looks at message contents.

use super::conn::ConnInfo;
use crate::config::Limits;
use crate::error::Error;
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The counters and limits shared by every connection of a listener set.
pub struct CallLimits {
    per_connection: u32,
    total_limit: u32,
    total: Arc<AtomicU32>,
}

impl CallLimits {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            per_connection: limits.calls_per_connection,
            total_limit: limits.calls_total,
            total: Arc::new(AtomicU32::new(0)),
        })
    }

    /// Calls in progress on all connections.
    pub fn in_progress(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }

    /// Counts one more call, or names the limit it would break.
    fn admit(&self, connection: Option<&ConnInfo>) -> Result<CallGuard, Error> {
        let total = Counted::take(&self.total, self.total_limit).ok_or(Error::LimitReached {
            limit: "limits.calls_total",
            value: self.total_limit.into(),
        })?;
        let on_connection = match connection {
            Some(info) => Some(Counted::take(&info.calls, self.per_connection).ok_or(
                Error::LimitReached {
                    limit: "limits.calls_per_connection",
                    value: self.per_connection.into(),
                },
            )?),
            None => None,
        };
        Ok(CallGuard {
            _total: total,
            _connection: on_connection,
        })
    }
}

/// One unit of a counter, given back on drop.
struct Counted(Arc<AtomicU32>);

impl Counted {
    fn take(counter: &Arc<AtomicU32>, limit: u32) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(counter.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds a call's place until its response body is dropped.
struct CallGuard {
    _total: Counted,
    _connection: Option<Counted>,
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
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        let guard = match self.limits.admit(request.extensions().get::<ConnInfo>()) {
            Ok(guard) => guard,
            Err(refusal) => {
                tracing::warn!(path = request.uri().path(), %refusal, "call refused");
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

/// The status a too-large message should have been reported with, if `status` is one.
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
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
