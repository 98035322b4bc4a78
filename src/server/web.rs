//! The browser side of the TCP listener: the console page, CORS, and the HTTP/1.1 guard.
//!
//! Owns [`WebLayer`], the outermost layer of the TCP server. It answers `GET /console/` and
//! the page's two assets itself (embedded at build time from `web/dist/`, which `npm run build`
//! in `web/` produces and which is committed, so `cargo build` needs no npm), decides CORS for
//! requests that carry an `Origin` other than the listener's own (allowed only for
//! `web.allowed_origins`; any other is refused with 403 before a service sees the request),
//! and refuses HTTP/1.1 requests whose headers exceed the 16 KiB that HTTP/2 is held to.
//! Over HTTP/1.1 it reads a gRPC-web request's body (one message: gRPC-web has no client
//! streams) before passing the request on, bounded by `limits.message_size`: a call refused
//! before its body is read (no token, say) would otherwise close the connection under a client
//! still sending, which then sees a reset instead of the status. Everything else goes on to tonic-web, which translates gRPC-web (binary and text) into
//! gRPC, then to the call limits and the services with their interceptors: a gRPC-web call
//! meets the same token rules and limits as a native one. The page holds no secret: its token
//! comes from the URL the user was given.

use super::conn::{ConnInfo, Peer};
use super::limits::LimitKeys;
use crate::config::{Limits, Origin, WebConfig};
use crate::error::Error;
use crate::tokens::Verify;
use futures::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tonic::body::Body;
use tower::{Layer, Service};

/// Where the page is served.
pub const CONSOLE_PATH: &str = "/console/";

/// Largest header section accepted over HTTP/1.1 (HTTP/2's `max_header_list_size`).
pub const MAX_HEADER_BYTES: usize = 16 << 10;

/// Security headers of every page response. The page talks only to its own origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; font-src 'self' data:; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Request headers a gRPC-web client of another origin may send.
const ALLOW_HEADERS: &str = "authorization, content-type, grpc-timeout, grpc-accept-encoding, \
                             grpc-encoding, x-grpc-web, x-user-agent";
/// Response headers such a client may read.
const EXPOSE_HEADERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    /// Caching: the page's URL carries a token, so the page itself is never stored.
    cache: &'static str,
}

const ASSETS: [Asset; 3] = [
    Asset {
        path: CONSOLE_PATH,
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../web/dist/index.html"),
        cache: "no-store",
    },
    Asset {
        path: "/console/console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/dist/console.js"),
        cache: "no-cache",
    },
    Asset {
        path: "/console/console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../web/dist/console.css"),
        cache: "no-cache",
    },
];

/// `"<fnv-1a 64 of the body>"`, the asset's entity tag.
fn etag(index: usize) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    &TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|asset| {
                let hash = asset.body.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
                });
                format!("\"{hash:016x}\"")
            })
            .collect()
    })[index]
}

/// What the web layer needs from the configuration.
#[derive(Clone)]
pub struct WebOptions {
    allowed_origins: Arc<[Origin]>,
    /// Largest gRPC-web request body read over HTTP/1.1.
    body_limit: usize,
    /// Longest an HTTP/1.1 request body may take (`limits.body_timeout`).
    body_timeout: std::time::Duration,
    /// Bytes of HTTP/1.1 request bodies held at once, all connections (`limits.web_body_bytes`).
    body_bytes: Arc<tokio::sync::Semaphore>,
    body_bytes_limit: u64,
    /// Verifies a console call's token before its body is held in memory.
    tokens: Arc<dyn Verify>,
    /// The names of the limits above, as refusals give them.
    keys: &'static LimitKeys,
}

impl std::fmt::Debug for WebOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebOptions")
            .field("allowed_origins", &self.allowed_origins)
            .field("body_limit", &self.body_limit)
            .field("body_timeout", &self.body_timeout)
            .finish_non_exhaustive()
    }
}

impl WebOptions {
    /// No other origin allowed; request bodies bounded for messages of `message_size`
    /// (`limits.message_size`), base64 (gRPC-web-text) included, and by the body limits of
    /// `limits`.
    pub(crate) fn new(
        message_size: usize,
        limits: &Limits,
        tokens: Arc<dyn Verify>,
        keys: &'static LimitKeys,
    ) -> Self {
        let body_bytes_limit = limits.web_body_bytes.bytes();
        Self {
            allowed_origins: Arc::new([]),
            body_limit: usize::try_from(crate::config::largest_web_body(
                u64::try_from(message_size).unwrap_or(u64::MAX),
            ))
            .unwrap_or(usize::MAX),
            body_timeout: limits.body_timeout.get(),
            body_bytes: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(body_bytes_limit)
                    .unwrap_or(usize::MAX)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            body_bytes_limit,
            tokens,
            keys,
        }
    }

    /// What may be held of `request`'s body: a console call whose bearer token verifies now,
    /// up to a whole message; another service's call (health, reflection: no token, and
    /// small), up to [`SMALL_BODY`]; a console call without a valid token, nothing (its body is
    /// read and discarded).
    fn allowance(&self, request: &Request<Body>) -> Allowance {
        if !request.uri().path().starts_with(CONSOLE_SERVICE_PREFIX) {
            return Allowance::Hold(SMALL_BODY);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        super::auth::bearer_token(request.headers())
            .ok()
            .filter(|token| self.tokens.verify(token, now).is_ok())
            .map_or(Allowance::Discard, |_| Allowance::Hold(self.body_limit))
    }

    /// With the origins of a validated `web` section (one that does not parse is skipped:
    /// validation refused it already).
    pub fn with_origins(mut self, config: &WebConfig) -> Self {
        self.allowed_origins = config
            .allowed_origins
            .iter()
            .filter_map(|o| Origin::parse(o).ok())
            .collect();
        self
    }
}

/// The layer, for `Server::layer`; outermost on TCP.
#[derive(Clone, Debug)]
pub struct WebLayer(pub WebOptions);

impl<S> Layer<S> for WebLayer {
    type Service = WebService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WebService {
            inner,
            options: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct WebService<S> {
    inner: S,
    options: WebOptions,
}

/// How a request's `Origin` relates to the listener.
enum Cross {
    /// No `Origin`, or the listener's own (the console page).
    SameOrigin,
    /// An origin in `web.allowed_origins`.
    Allowed(HeaderValue),
    Refused,
}

impl<S> WebService<S> {
    fn cross(&self, request: &Request<Body>) -> Cross {
        let Some(value) = request.headers().get(header::ORIGIN) else {
            return Cross::SameOrigin;
        };
        let Some(origin) = value.to_str().ok().and_then(|o| Origin::parse(o).ok()) else {
            return Cross::Refused;
        };
        if own_origin(request).as_ref() == Some(&origin) {
            Cross::SameOrigin
        } else if self.options.allowed_origins.contains(&origin) {
            Cross::Allowed(value.clone())
        } else {
            Cross::Refused
        }
    }
}

/// The origin a browser gives pages loaded from this request's target: the scheme of the
/// connection, the host the client addressed (`:authority` or `Host`).
fn own_origin(request: &Request<Body>) -> Option<Origin> {
    let tls = matches!(
        request.extensions().get::<ConnInfo>().map(|i| &i.peer),
        Some(Peer::Remote { tls: true, .. })
    );
    let scheme = if tls { "https" } else { "http" };
    let authority = match request.uri().authority() {
        Some(authority) => authority.as_str(),
        None => request.headers().get(header::HOST)?.to_str().ok()?,
    };
    Origin::with_authority(scheme, authority)
}

fn is_grpc_web(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc-web"))
}

/// Prefix of the console service's paths: its calls need a token.
const CONSOLE_SERVICE_PREFIX: &str = "/conlog.v1.Console/";

/// Largest body held for a call of another service (health, reflection) over HTTP/1.1.
const SMALL_BODY: usize = 4096;

/// What may be held in memory of a request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Allowance {
    /// Up to this many bytes (more is refused with `RESOURCE_EXHAUSTED`).
    Hold(usize),
    /// Nothing: read within the size and time limits, and thrown away.
    Discard,
}

/// A request whose body was read, and the memory places its bytes hold until it is answered.
struct Buffered {
    request: Request<Body>,
    _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// `request` with its body read (into memory within `allowance`; a call that will be refused
/// for its token costs no memory: its body is read and discarded), within `options`' size, time
/// and memory limits, or the response refusing it.
async fn buffered(
    request: Request<Body>,
    options: &WebOptions,
    allowance: Allowance,
) -> Result<Buffered, Response<Body>> {
    let (keep, limit) = match allowance {
        Allowance::Hold(limit) => (true, limit.min(options.body_limit)),
        Allowance::Discard => (false, options.body_limit),
    };
    use http_body_util::BodyExt;
    let (parts, mut body) = request.into_parts();
    let grpc_refusal = |status: tonic::Status| {
        let mut response = status.into_http::<Body>();
        if let Some(content_type) = parts.headers.get(header::CONTENT_TYPE) {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type.clone());
        }
        response
    };
    let deadline = tokio::time::Instant::now() + options.body_timeout;
    let mut held = bytes::BytesMut::new();
    let mut permit: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut total = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                let key = options.keys.body_timeout;
                tracing::debug!("an HTTP/1.1 request body did not arrive within {key}");
                return Err(respond(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the request body did not arrive within {key}\n"),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err(respond(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read\n",
                ))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: a gRPC-web request has none worth keeping
        };
        total = total.saturating_add(data.len());
        if total > limit {
            let what = if limit == options.body_limit {
                format!("Limit {} reached: the", options.keys.message_size)
            } else {
                "The".to_owned()
            };
            return Err(grpc_refusal(
                Error::Exhausted(format!("{what} request body is over {limit} bytes")).into(),
            ));
        }
        if !keep {
            continue;
        }
        let more = u32::try_from(data.len()).unwrap_or(u32::MAX);
        match options.body_bytes.clone().try_acquire_many_owned(more) {
            Ok(more) => match &mut permit {
                Some(permit) => permit.merge(more),
                None => permit = Some(more),
            },
            Err(_) => {
                let key = options.keys.web_body_bytes;
                crate::limited!(warn, "{key} reached; refusing an HTTP/1.1 request");
                return Err(grpc_refusal(
                    Error::Exhausted(format!(
                        "Limit {key} reached: {} bytes of request bodies are held",
                        options.body_bytes_limit
                    ))
                    .into(),
                ));
            }
        }
        held.extend_from_slice(&data);
    }
    Ok(Buffered {
        request: Request::from_parts(parts, Body::new(http_body_util::Full::new(held.freeze()))),
        _bytes: permit,
    })
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

fn respond(status: StatusCode, text: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut response = Response::new(Body::new(http_body_util::Full::new(text.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `GET`/`HEAD` of the page and its assets; a redirect from `/console`.
fn page(request: &Request<Body>) -> Response<Body> {
    let path = request.uri().path();
    if path == "/console" {
        let location = match request.uri().query() {
            Some(query) => format!("{CONSOLE_PATH}?{query}"),
            None => CONSOLE_PATH.to_owned(),
        };
        let mut response = respond(StatusCode::PERMANENT_REDIRECT, "");
        if let Ok(location) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        return response;
    }
    let Some(index) = ASSETS.iter().position(|a| a.path == path) else {
        return respond(
            StatusCode::NOT_FOUND,
            "not found: the console is at /console/\n",
        );
    };
    let head = request.method() == Method::HEAD;
    if !head && request.method() != Method::GET {
        let mut response = respond(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let asset = &ASSETS[index];
    let tag = etag(index);
    let fresh = request
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let (status, body) = if fresh {
        (StatusCode::NOT_MODIFIED, Body::empty())
    } else if head {
        (StatusCode::OK, Body::empty())
    } else {
        (
            StatusCode::OK,
            Body::new(http_body_util::Full::new(bytes::Bytes::from_static(
                asset.body,
            ))),
        )
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, asset.content_type),
        (header::CACHE_CONTROL, asset.cache),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        header::ETAG,
        HeaderValue::from_str(tag).expect("hex in quotes"),
    );
    if head && !fresh {
        headers.insert(header::CONTENT_LENGTH, asset.body.len().into());
    }
    response
}

/// The answer to a CORS preflight from an allowed origin.
fn preflight(origin: HeaderValue) -> Response<Body> {
    let mut response = respond(StatusCode::NO_CONTENT, "");
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_TYPE);
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(header::VARY, HeaderValue::from_static("origin"));
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_METHODS, "POST"),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOW_HEADERS),
        (header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE_HEADERS),
        (header::ACCESS_CONTROL_MAX_AGE, "600"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

impl<S> Service<Request<Body>> for WebService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let http1 = request.version() < Version::HTTP_2;
        if http1 && header_bytes(request.headers()) > MAX_HEADER_BYTES {
            let response = respond(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request headers over 16 KiB\n",
            );
            return Box::pin(async move { Ok(response) });
        }
        let path = request.uri().path();
        if path == "/console" || path.starts_with(CONSOLE_PATH) {
            let response = page(&request);
            return Box::pin(async move { Ok(response) });
        }
        let allow_origin = match self.cross(&request) {
            Cross::SameOrigin => None,
            Cross::Refused => {
                crate::limited!(
                    info,
                    origin = ?request.headers().get(header::ORIGIN),
                    path,
                    "refused a request from an origin not in web.allowed_origins"
                );
                let response = respond(
                    StatusCode::FORBIDDEN,
                    "this origin is not in web.allowed_origins\n",
                );
                return Box::pin(async move { Ok(response) });
            }
            Cross::Allowed(origin) => {
                let preflight_request = request.method() == Method::OPTIONS
                    && request
                        .headers()
                        .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
                if preflight_request {
                    let response = preflight(origin);
                    return Box::pin(async move { Ok(response) });
                }
                Some(origin)
            }
        };
        let buffer = http1 && is_grpc_web(request.headers());
        let allowance = if buffer {
            self.options.allowance(&request)
        } else {
            Allowance::Discard
        };
        let options = self.options.clone();
        // The clone that was made ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (request, held) = if buffer {
                match buffered(request, &options, allowance).await {
                    Ok(Buffered { request, _bytes }) => (request, _bytes),
                    Err(response) => return Ok(response),
                }
            } else {
                (request, None)
            };
            let mut response = inner.call(request).await?;
            // The body was decoded by now (a gRPC-web call has one request message).
            drop(held);
            if let Some(origin) = allow_origin {
                let headers = response.headers_mut();
                headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                headers.append(header::VARY, HeaderValue::from_static("origin"));
                headers.insert(
                    header::ACCESS_CONTROL_EXPOSE_HEADERS,
                    HeaderValue::from_static(EXPOSE_HEADERS),
                );
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::TokenKey;
    use std::convert::Infallible;

    /// Answers every request with 200 and `x-inner: yes`.
    #[derive(Clone)]
    struct Inner;

    impl Service<Request<Body>> for Inner {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            let mut response = Response::new(Body::empty());
            response
                .headers_mut()
                .insert("x-inner", HeaderValue::from_static("yes"));
            Box::pin(async { Ok(response) })
        }
    }

    fn service(origins: &[&str]) -> WebService<Inner> {
        let config = WebConfig {
            allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
        };
        let dir = tempfile::tempdir().unwrap();
        let tokens = Arc::new(TokenKey::load_or_create(&dir.path().join("token.key")).unwrap());
        WebLayer(
            WebOptions::new(
                4096,
                &Limits::default(),
                tokens,
                &crate::server::limits::NODE_KEYS,
            )
            .with_origins(&config),
        )
        .layer(Inner)
    }

    fn request(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .version(Version::HTTP_11)
            .header("host", "127.0.0.1:7770");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Body::empty()).unwrap()
    }

    async fn call(service: &mut WebService<Inner>, request: Request<Body>) -> Response<Body> {
        service.call(request).await.unwrap()
    }

    #[tokio::test]
    async fn serves_the_page_and_its_assets() {
        let mut web = service(&[]);
        let response = call(&mut web, request(Method::GET, "/console/?guest=a", &[])).await;
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        assert_eq!(headers["cache-control"], "no-store");
        assert_eq!(headers["referrer-policy"], "no-referrer");
        assert!(headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("connect-src 'self'"));
        let tag = headers["etag"].clone();

        let response = call(
            &mut web,
            request(
                Method::GET,
                "/console/console.js",
                &[("if-none-match", tag.to_str().unwrap())],
            ),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK, "another asset's tag");
        let tag = response.headers()["etag"].to_str().unwrap().to_owned();
        let response = call(
            &mut web,
            request(
                Method::GET,
                "/console/console.js",
                &[("if-none-match", &tag)],
            ),
        )
        .await;
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);

        let response = call(&mut web, request(Method::GET, "/console?guest=a", &[])).await;
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(response.headers()["location"], "/console/?guest=a");
        let response = call(&mut web, request(Method::GET, "/console/nope", &[])).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let response = call(&mut web, request(Method::POST, "/console/", &[])).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn only_the_own_and_configured_origins_pass() {
        let mut web = service(&["https://dash.example.com"]);
        let grpc_web = [("content-type", "application/grpc-web+proto")];
        let path = "/conlog.v1.Console/ReadHistory";

        // No Origin (native clients) and the page's own origin go through, without CORS.
        for origin in [None, Some("http://127.0.0.1:7770")] {
            let mut headers = grpc_web.to_vec();
            headers.extend(origin.map(|o| ("origin", o)));
            let response = call(&mut web, request(Method::POST, path, &headers)).await;
            assert_eq!(response.headers()["x-inner"], "yes", "{origin:?}");
            assert!(!response
                .headers()
                .contains_key("access-control-allow-origin"));
        }

        // A configured origin: preflight answered here, calls get CORS headers.
        let response = call(
            &mut web,
            request(
                Method::OPTIONS,
                path,
                &[
                    ("origin", "https://dash.example.com"),
                    ("access-control-request-method", "POST"),
                    (
                        "access-control-request-headers",
                        "authorization,content-type",
                    ),
                ],
            ),
        )
        .await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let headers = response.headers();
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://dash.example.com"
        );
        assert!(headers["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization"));
        assert!(!headers.contains_key("x-inner"));
        let mut headers = grpc_web.to_vec();
        headers.push(("origin", "https://dash.example.com"));
        let response = call(&mut web, request(Method::POST, path, &headers)).await;
        assert_eq!(response.headers()["x-inner"], "yes");
        assert_eq!(
            response.headers()["access-control-allow-origin"],
            "https://dash.example.com"
        );
        assert!(response.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("grpc-status"));

        // Any other origin, even the listener's with another scheme or port, is refused before
        // a service sees it.
        for origin in [
            "https://evil.example.com",
            "https://127.0.0.1:7770",
            "http://127.0.0.1:7771",
            "null",
        ] {
            for method in [Method::POST, Method::OPTIONS] {
                let headers = [
                    ("origin", origin),
                    ("access-control-request-method", "POST"),
                    grpc_web[0],
                ];
                let response = call(&mut web, request(method.clone(), path, &headers)).await;
                assert_eq!(
                    response.status(),
                    StatusCode::FORBIDDEN,
                    "{origin} {method}"
                );
                assert!(!response.headers().contains_key("x-inner"));
            }
        }
    }

    #[tokio::test]
    async fn http1_grpc_web_bodies_are_read_first_and_bounded() {
        let mut web = service(&[]);
        let body =
            |n: usize| Body::new(http_body_util::Full::new(bytes::Bytes::from(vec![0u8; n])));
        let request = |n: usize| {
            let mut request = request(
                Method::POST,
                "/conlog.v1.Console/ReadHistory",
                &[("content-type", "application/grpc-web-text")],
            );
            *request.body_mut() = body(n);
            request
        };
        let response = call(&mut web, request(4096)).await;
        assert_eq!(response.headers()["x-inner"], "yes");
        let response = call(&mut web, request(1 << 20)).await;
        assert!(!response.headers().contains_key("x-inner"));
        assert_eq!(response.headers()["grpc-status"], "8");
        assert_eq!(
            response.headers()["content-type"],
            "application/grpc-web-text"
        );
    }

    #[tokio::test]
    async fn http1_headers_are_bounded_like_http2() {
        let mut web = service(&[]);
        let big = "x".repeat(MAX_HEADER_BYTES);
        let response = call(
            &mut web,
            request(
                Method::POST,
                "/conlog.v1.Console/ReadHistory",
                &[("x-big", &big)],
            ),
        )
        .await;
        assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
}
