//! What every request passes before it is routed, and what every answer gets on its way out.
//!
//! In order: the request target and headers are held to [`MAX_URI_BYTES`], [`MAX_HEADERS`]
//! and [`MAX_HEADER_BYTES`] (414 and 431, as JSON), a declared `Content-Length` over the body
//! limit is refused at once (413), the `Host` is checked when keys are not required (a DNS
//! rebinding page cannot reach a keyless loopback server), and a state-changing request from a
//! foreign `Origin` is refused (403) whether keys are required or not. An answer given before
//! the request's body was read to its end carries `Connection: close`, so a keep-alive client
//! is told not to reuse the connection. Every request is counted in the metrics and written to
//! the access log (target `access`).

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    body::{Body, Bytes},
    extract::{ConnectInfo, MatchedPath, Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body::{Frame, SizeHint};

use crate::{
    AppState,
    error::ApiError,
    metrics::{RequestLabels, RouteLabels},
};

/// The longest request target (path and query) accepted.
pub const MAX_URI_BYTES: usize = 16 << 10;
/// The most header fields a request may carry.
pub const MAX_HEADERS: usize = 100;
/// The most bytes of header fields (names and values) a request may carry.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// Host names a keyless server answers to, besides `--allowed-host`.
const LOOPBACK_NAMES: [&str; 3] = ["127.0.0.1", "localhost", "[::1]"];

/// The limits, the Host and Origin checks and `Connection: close` after an early answer.
pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let had_body = !http_body::Body::is_end_stream(req.body());
    let read = Arc::new(AtomicBool::new(!had_body));
    let mut response = match check(&state, &req) {
        Err(e) => e.into_response(),
        Ok(()) => {
            let req = req.map(|body| {
                Body::new(Tracked {
                    inner: body,
                    read: read.clone(),
                })
            });
            next.run(req).await
        }
    };
    if !read.load(Ordering::SeqCst) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn check(state: &AppState, req: &Request) -> Result<(), ApiError> {
    let config = &state.inner.config;
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is {target} bytes, above the limit of {MAX_URI_BYTES}"),
        ));
    }
    let headers = req.headers();
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || header_bytes > MAX_HEADER_BYTES {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request has {} header fields of {header_bytes} bytes: at most {MAX_HEADERS} \
                 fields and {MAX_HEADER_BYTES} bytes are accepted",
                headers.len()
            ),
        ));
    }
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        && length > config.max_body as u64
    {
        return Err(ApiError::too_large(
            "body_too_large",
            format!(
                "the body declares {length} bytes, above the limit of {} bytes",
                config.max_body
            ),
        ));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if !config.require_keys
        && let Some(host) = &host
        && !host_allowed(host, &config.allowed_hosts)
    {
        return Err(ApiError::forbidden_code(
            "forbidden_host",
            format!(
                "this server answers keyless requests only for {} and --allowed-host names, \
                 not `{}`",
                LOOPBACK_NAMES.join(", "),
                host.chars().take(100).collect::<String>()
            ),
        ));
    }
    let changes_state = !matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    if changes_state && let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let own = host.as_deref().is_some_and(|h| origin_is_host(origin, h));
        if !own && !config.cors_origins.iter().any(|o| o == origin) {
            return Err(ApiError::forbidden_code(
                "forbidden_origin",
                format!(
                    "requests that change state are refused from the origin `{}`: only this \
                     server's own pages and --cors-origin origins may send them",
                    origin.chars().take(100).collect::<String>()
                ),
            ));
        }
    }
    Ok(())
}

/// The name of a `Host` value without its port, lower-cased (`[::1]` keeps its brackets).
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a keyless server answers to `host` (any port).
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = host_name(host);
    LOOPBACK_NAMES.contains(&name.as_str()) || allowed.iter().any(|a| host_name(a) == name)
}

/// Whether `origin` (`scheme://host[:port]`) is the server itself, reached as `host`.
fn origin_is_host(origin: &str, host: &str) -> bool {
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|rest| rest.eq_ignore_ascii_case(host.trim()))
}

/// A request body that notes when it has been read to its end.
struct Tracked {
    inner: Body,
    read: Arc<AtomicBool>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.read.store(true, Ordering::SeqCst);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.read.store(true, Ordering::SeqCst);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The answer to a request whose handler panicked: the JSON 500, logged with the panic's
/// message (the client gets none of it). The connection and the server go on.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!("a handler panicked: {message}");
    ApiError::internal("the server failed on this request").into_response()
}

/// Counts requests and their latency by route pattern, and writes the access log.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // A fixed set: invented methods must not create series.
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
    .to_string();
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip().to_string())
        .unwrap_or_default();
    // The path only: queries may carry cursors and search text.
    let path: String = req.uri().path().chars().take(200).collect();
    let started = Instant::now();
    let response = next.run(req).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    tracing::info!(
        target: "access",
        client,
        method,
        path,
        status,
        ms = (elapsed.as_secs_f64() * 1e4).round() / 10.0,
    );
    let m = &state.inner.metrics;
    m.requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status,
        })
        .inc();
    m.latency
        .get_or_create(&RouteLabels { route })
        .observe(elapsed.as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_the_json_500() {
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    if true {
                        panic!("boom");
                    }
                    "never"
                }),
            )
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                panic_response,
            ));
        let r = app
            .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["error"]["code"], "internal");
        assert!(!j["error"]["message"].as_str().unwrap().contains("boom"));
    }

    #[test]
    fn hosts_are_compared_by_name_at_any_port() {
        let none: Vec<String> = Vec::new();
        for ok in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "localhost:1",
            "LOCALHOST",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(host_allowed(ok, &none), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:8080",
            "127.0.0.1.attacker.example",
            "localhost.evil",
            "[::2]:80",
            "",
        ] {
            assert!(!host_allowed(bad, &none), "{bad}");
        }
        let allowed = vec!["inspector.plant.lan".to_string()];
        assert!(host_allowed("inspector.plant.lan:8080", &allowed));
        assert!(!host_allowed("other.plant.lan", &allowed));
    }

    #[test]
    fn an_origin_matches_its_host() {
        assert!(origin_is_host("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(origin_is_host("https://Inspector.lan", "inspector.lan"));
        assert!(!origin_is_host("https://evil.example", "127.0.0.1:8080"));
        assert!(!origin_is_host("http://127.0.0.1:9999", "127.0.0.1:8080"));
        assert!(!origin_is_host("null", "127.0.0.1:8080"));
    }
}
