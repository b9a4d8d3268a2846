//! The HTTP server loop: our own accept loop around hyper's HTTP/1 connection, because
//! `axum::serve` has no time limits and no connection cap, and a client that trickles its
//! headers byte by byte would hold a connection (and shutdown) for ever.
//!
//! What bounds a client:
//! - **Headers**: hyper's `header_read_timeout`, counted from the moment the connection
//!   is ready for a request (accepted, or the previous response sent). Slowloris ends here.
//! - **Idle**: `IdleIo` ends a connection that sent nothing for `--http-idle-timeout`
//!   while none of its requests is being handled (keep-alive idle, or a stalled request).
//! - **Body**: [`read_body_within`] reads the whole body under one deadline (408 past it)
//!   and the size limit (413 as soon as it is passed, before reading the rest).
//! - **Count**: a semaphore of `--max-connections` permits. Over it, the connection is
//!   accepted and answered `503` with `Retry-After` (at most [`REFUSERS`] such answers at
//!   once; beyond that the socket is just closed), so a client learns why rather than
//!   hanging in the kernel's backlog behind the slow ones.
//!
//! - **TLS handshake** (with `--tls-cert`): done in the connection's own task under
//!   `--http-header-timeout`, and abandoned when shutdown begins, so a client that opens a
//!   socket and never finishes the handshake holds one permit for at most that long.
//!
//! Shutdown stops accepting at once, asks every connection to finish its current request
//! (idle ones close immediately), and drops whatever is still open after
//! `--http-shutdown-grace`. A trickling client therefore costs shutdown at most the grace.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::StreamExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use crate::config::Limits;
use crate::http_error::ApiError;
use crate::Shutdown;

/// How many over-the-cap connections may be answered 503 at once.
pub const REFUSERS: usize = 64;

/// The HTTP limits of one listener.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// `--http-header-timeout`: time to receive a request's headers.
    pub header_timeout: Duration,
    /// `--http-body-timeout`: time to receive a request's body.
    pub body_timeout: Duration,
    /// `--http-idle-timeout`: how long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// `--max-connections`: connections served at once; above it one gets a 503 and is closed.
    pub max_connections: usize,
    /// `--http-shutdown-grace`: how long in-flight requests may finish after shutdown is asked.
    pub shutdown_grace: Duration,
    /// `--max-body-bytes`.
    pub max_body_bytes: usize,
}

impl HttpLimits {
    /// The limits from the flags.
    pub fn new(limits: &Limits, max_body_bytes: usize) -> HttpLimits {
        HttpLimits {
            header_timeout: limits.http_header_timeout,
            body_timeout: limits.http_body_timeout,
            idle_timeout: limits.http_idle_timeout,
            max_connections: limits.max_connections,
            shutdown_grace: limits.http_shutdown_grace,
            max_body_bytes,
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then drains as described above.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<TlsAcceptor>,
    shutdown: Shutdown,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusers = Arc::new(Semaphore::new(REFUSERS));
    let (close_tx, close_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE and friends: wait a little rather than spin.
                        tracing::warn!(error = %e, "accept failed; retrying in 100 ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (app, limits, close) = (app.clone(), limits.clone(), close_rx.clone());
                        let tls = tls.clone();
                        conns.spawn(async move {
                            match tls {
                                None => serve_connection(stream, app, &limits, close).await,
                                Some(tls) => serve_tls(stream, tls, app, &limits, close).await,
                            }
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        if let Ok(slot) = refusers.clone().try_acquire_owned() {
                            let max = limits.max_connections;
                            tokio::spawn(async move {
                                refuse(stream, max).await;
                                drop(slot);
                            });
                        }
                    }
                }
            }
        }
    }
    drop(listener);
    close_tx.send_replace(true);
    let open = conns.len();
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open_at_shutdown = open,
            dropped = conns.len(),
            grace = ?limits.shutdown_grace,
            "HTTP connections still open after the shutdown grace were dropped \
             (--http-shutdown-grace)"
        );
        conns.shutdown().await;
    }
}

/// Completes the TLS handshake within `--http-header-timeout` (or until shutdown), then
/// serves the connection like a plain one. A failed handshake (no client certificate under
/// mutual TLS, an untrusted one, plain HTTP on the TLS port) only closes this connection.
async fn serve_tls(
    stream: TcpStream,
    tls: TlsAcceptor,
    app: Router,
    limits: &HttpLimits,
    mut close: watch::Receiver<bool>,
) {
    let peer = stream.peer_addr().ok();
    let handshake = tokio::time::timeout(limits.header_timeout, tls.accept(stream));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(?peer, error = %e, "TLS handshake failed; connection closed");
                return;
            }
            Err(_) => {
                tracing::debug!(?peer, timeout = ?limits.header_timeout,
                    "TLS handshake not finished within --http-header-timeout; connection closed");
                return;
            }
        },
        _ = close.wait_for(|closing| *closing) => return,
    };
    serve_connection(stream, app, limits, close).await;
}

async fn serve_connection<S>(
    stream: S,
    app: Router,
    limits: &HttpLimits,
    mut close: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(IdleIo::new(stream, limits.idle_timeout, activity.clone()));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let busy = activity.begin();
        let mut app = app.clone();
        async move {
            // A Router is always ready; its error type is Infallible.
            let response = tower_service::Service::call(&mut app, req.map(Body::new)).await;
            drop(busy);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        _ = close.wait_for(|closing| *closing) => conn.as_mut().graceful_shutdown(),
    }
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "HTTP connection ended with an error during shutdown");
    }
}

/// Answers a connection over `--max-connections` with a 503 and closes it. The request's
/// head is read first (briefly), since HTTP clients do not expect an answer before they
/// sent their request, and the rest is drained after the answer, so closing does not
/// reset the socket before the client has read it.
async fn refuse(mut stream: TcpStream, max: usize) {
    let body = serde_json::json!({
        "error": format!(
            "too many connections: the limit is {max} (--max-connections); retry shortly"
        ),
        "limit": "max_connections",
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while head.len() < 16 << 10 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        while stream.read(&mut chunk).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// What a connection is doing: requests being handled, and when it last did anything.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }
    }
}

impl Activity {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }
}

/// A request being handled; idle time counts again from when it is dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream that reads as closed once the peer sent nothing for `idle` while no
/// request of the connection was being handled. The timer is reset lazily: when it
/// fires, the real deadline is computed from the last activity.
struct IdleIo<S> {
    inner: S,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    activity: Arc<Activity>,
}

impl<S> IdleIo<S> {
    fn new(inner: S, idle: Duration, activity: Arc<Activity>) -> IdleIo<S> {
        IdleIo {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            activity,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.activity.touch();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let deadline = if self.activity.in_flight.load(Ordering::Relaxed) > 0 {
                now + self.idle
            } else {
                self.activity.last() + self.idle
            };
            if deadline <= now {
                tracing::debug!(idle = ?self.idle, "closing an idle HTTP connection");
                // Reads as end of stream: hyper closes the connection.
                return Poll::Ready(Ok(()));
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Middleware: reads the whole request body within `--http-body-timeout` (408 past it)
/// and `--max-body-bytes` (413 as soon as it is passed), then hands the handler a body
/// that is already here. Handlers' own limits still apply; they just never wait.
pub async fn read_body_within(
    State(limits): State<HttpLimits>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let max = limits.max_body_bytes;
    let too_large = |size: String| {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body ({size}) is over the limit of {max} bytes (--max-body-bytes); \
                 nothing was accepted"
            ),
        )
        .into_response()
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > max as u64) {
        return too_large(format!("{n} bytes"));
    }
    let deadline = Instant::now() + limits.body_timeout;
    let mut stream = body.into_data_stream();
    // One buffer, grown as data arrives (not sized from Content-Length: an idle client
    // must not claim --max-body-bytes per connection), instead of a list of chunks: a
    // body trickled in tiny segments would cost a list entry per segment.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => {
                let mut resp = ApiError(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {:?} (--http-body-timeout); \
                         {} bytes came; nothing was accepted",
                        limits.body_timeout,
                        buf.len()
                    ),
                )
                .into_response();
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("the request body could not be read: {e}"),
                )
                .into_response()
            }
            Ok(Some(Ok(chunk))) => {
                let len = buf.len() + chunk.len();
                if len > max {
                    return too_large(format!("at least {len} bytes"));
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    next.run(Request::from_parts(parts, Body::from(buf))).await
}
