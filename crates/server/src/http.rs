//! The accept loop, ours rather than `axum::serve`, so that connections are bounded:
//!
//! - request headers must arrive within `header_timeout` (an idle keep-alive connection waits
//!   for its next request's headers under the same clock), so half-sent headers cannot hold
//!   sockets;
//! - at most `max_connections` are open; further ones wait in the kernel's backlog until one
//!   closes (the process never runs out of file descriptors, and `/health` keeps answering);
//! - on shutdown the listener closes, idle connections close at once, requests in flight get
//!   up to `shutdown_grace` to finish, and whatever is still open then is closed;
//! - the refusals hyper writes itself before a request reaches the router (400 for a request
//!   that is not HTTP, 414 and 431 past hyper's own parser limits) carry the same JSON error
//!   body as every other refusal ([`JsonRefusals`]).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Body, extract::ConnectInfo};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::Semaphore,
    task::JoinSet,
};
use tower::ServiceExt;

use crate::guard::{MAX_HEADERS, MAX_URI_BYTES};

/// hyper's own limits, above the router's ([`crate::guard`]) so that the router answers the
/// usual refusals: a request head may take 1 MiB and 4× our header count.
const HYPER_MAX_BUF: usize = 1 << 20;
const HYPER_MAX_HEADERS: usize = 4 * MAX_HEADERS;

/// How connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `stop` resolves, then shuts down within the grace.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    transport: Transport,
    stop: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(transport.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(transport.header_timeout)
        .max_headers(HYPER_MAX_HEADERS)
        .max_buf_size(HYPER_MAX_BUF);
    tokio::pin!(stop);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = tower::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(remote));
            app.clone().oneshot(req.map(Body::new))
        });
        let connection = builder.serve_connection(
            TokioIo::new(JsonRefusals::new(stream)),
            TowerToHyperService::new(service),
        );
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection from {remote}: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(transport.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} connections still open {} s after shutdown began; closing them",
            connections.len(),
            transport.shutdown_grace.as_secs()
        );
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// A connection whose automatic refusals from hyper are rewritten as JSON errors.
///
/// hyper answers a request head it cannot parse by itself (400, 414, 431) with an empty body
/// and closes the connection. Those answers are recognised by their shape: a status line of
/// one of those codes and no header but `content-length: 0` and `date`, whereas every answer
/// of the router carries `content-type`. Writes are not vectored, so hyper hands over each
/// answer head in one buffer.
pub struct JsonRefusals<S> {
    inner: S,
    /// A rewritten answer being written, and how much of it is out.
    rewrite: Option<(Vec<u8>, usize)>,
}

impl<S> JsonRefusals<S> {
    pub fn new(inner: S) -> Self {
        JsonRefusals {
            inner,
            rewrite: None,
        }
    }
}

/// The JSON answer that replaces hyper's automatic refusal `head`, if it is one.
pub fn automatic_refusal(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let rest = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    let (reason, code, message) = match status {
        400 => (
            "Bad Request",
            "bad_request",
            "the request is not valid HTTP/1.1".to_string(),
        ),
        414 => (
            "URI Too Long",
            "uri_too_long",
            format!("the request target is longer than {MAX_URI_BYTES} bytes"),
        ),
        431 => (
            "Request Header Fields Too Large",
            "headers_too_large",
            format!(
                "the request headers are too large: at most {MAX_HEADERS} fields and {} bytes",
                crate::guard::MAX_HEADER_BYTES
            ),
        ),
        _ => return None,
    };
    let head = text.strip_suffix("\r\n\r\n")?;
    for line in head.split("\r\n").skip(1) {
        let (name, value) = line.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" if value.trim() == "0" => {}
            "date" | "connection" => {}
            _ => return None,
        }
    }
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\nx-content-type-options: nosniff\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonRefusals<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonRefusals<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_none()
            && let Some(answer) = automatic_refusal(buf)
        {
            this.rewrite = Some((answer, 0));
        }
        let Some((answer, written)) = &mut this.rewrite else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        while *written < answer.len() {
            match Pin::new(&mut this.inner).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.rewrite = None;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_s_bare_refusals_are_rewritten() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Sat, 05 Dec 2026 03:00:00 GMT\r\n\r\n";
        let json = String::from_utf8(automatic_refusal(bare).unwrap()).unwrap();
        assert!(json.starts_with("HTTP/1.1 431 "), "{json}");
        let body: serde_json::Value =
            serde_json::from_str(json.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "headers_too_large");
        // The router's own answers carry a content type, and other statuses pass.
        assert!(
            automatic_refusal(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
            )
            .is_none()
        );
        assert!(automatic_refusal(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(automatic_refusal(b"{\"error\": 1}").is_none());
    }
}
