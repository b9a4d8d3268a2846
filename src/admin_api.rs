//! The admin API (`/api/admin/...`): what `spoolctl` does offline, against a running daemon.
//!
//! Reads answer with the same JSON `spoolctl --json` prints (the types are shared through
//! [`spool::view`] and [`spool::SpoolStats`]); writes go through the same `Spool` operator
//! calls, so they are durable when they answer and never touch a message in flight.
//! Suspending a queue is the one thing only a running daemon can do: its worker stops
//! leasing until resumed or expired (kept in the spool: a restart keeps it).
//!
//! Draining (`/api/admin/drain`) is the other: it is [`crate::drain`]'s switch, and the
//! daemon exits when the drain ends.
//!
//! Protection: the daemon listens on loopback by default; with `--admin-token` every admin
//! request needs `Authorization: Bearer <token>`. `start` refuses a non-loopback listener
//! without a token (see [`check_exposure`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use spool::view::MessageView;
use spool::{Message, MessageId, Spool, SpoolStats};

use crate::drain::Drain;
use crate::http_error::{check_queue, ApiError};
use crate::suspensions::Suspensions;

/// What the admin handlers share.
#[derive(Clone)]
pub struct Admin {
    /// The daemon's spool, for reads and operator writes.
    pub spool: Spool,
    /// The operator's suspended queues.
    pub suspensions: Suspensions,
    /// The drain switch.
    pub drain: Drain,
    /// The running policy, for `POST /api/admin/reload`.
    pub policy: policy::Policy,
}

/// The admin routes, behind the bearer token when there is one.
pub fn router(state: Admin, token: Option<String>) -> Router {
    let token: Option<Arc<str>> = token.map(Into::into);
    Router::new()
        .route("/api/admin/queues", get(queues))
        .route("/api/admin/queues/{queue}/messages", get(list))
        .route("/api/admin/queues/{queue}/suspend", post(suspend))
        .route("/api/admin/queues/{queue}/resume", post(resume))
        .route("/api/admin/queues/{queue}/requeue", post(requeue))
        .route("/api/admin/suspended", get(suspended))
        .route("/api/admin/messages/{id}", get(show))
        .route("/api/admin/dead-letter", get(dead_letters))
        .route("/api/admin/dead-letter/requeue", post(requeue_dead_letters))
        .route("/api/admin/drain", post(drain).get(drain_status))
        .route("/api/admin/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(token, require_token))
        .with_state(state)
}

/// Refuses to serve the admin API on a non-loopback address without a token.
pub fn check_exposure(addr: SocketAddr, token: Option<&str>) -> anyhow::Result<()> {
    if token.is_none() && !addr.ip().is_loopback() {
        anyhow::bail!(
            "admin API would be exposed without a token: {addr} is not a loopback address; \
             set --admin-token (or SPOOLRELAY_ADMIN_TOKEN), listen on 127.0.0.1, \
             or turn the admin API off with --no-admin-api"
        );
    }
    Ok(())
}

async fn require_token(
    State(token): State<Option<Arc<str>>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|given| same(given.as_bytes(), token.as_bytes())) {
            let body = Json(json!({"error": "admin API: missing or wrong bearer token"}));
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                body,
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// sled reads may touch the disk: off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> spool::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

/// Runs a spool write where a client hanging up cannot cancel it: axum drops the handler's
/// future when the connection closes, and a rewrite stopped half-way would leave its work
/// half-done until an operator repeats it.
async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = spool::Result<T>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(op)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

/// An optional JSON body: empty means all defaults.
fn body<T: for<'de> Deserialize<'de> + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

async fn queues(State(admin): State<Admin>) -> Result<Json<SpoolStats>, ApiError> {
    // Counting the dead-letter and quarantine trees reads sled: off the async workers.
    let store = admin.spool.clone();
    blocking(move || Ok(store.stats(spool::now_ms())))
        .await
        .map(Json)
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    due: bool,
    #[serde(default)]
    failed: bool,
}

fn default_limit() -> usize {
    50
}

/// Messages of a queue in id order (leased ones included), filtered before the limit.
async fn list(
    State(admin): State<Admin>,
    Path(queue): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<MessageView>>, ApiError> {
    check_queue(&queue)?;
    let now = spool::now_ms();
    let filtered = q.due || q.failed;
    let msgs = blocking(move || {
        admin
            .spool
            .list(&queue, if filtered { usize::MAX } else { q.limit })
    })
    .await?;
    Ok(Json(
        msgs.iter()
            .filter(|m| (!q.due || m.due_ms <= now) && (!q.failed || m.attempts > 0))
            .take(q.limit)
            .map(|m| MessageView::of(m, false))
            .collect(),
    ))
}

#[derive(Deserialize)]
struct ShowQuery {
    #[serde(default)]
    data: bool,
}

/// One message, queued or dead-lettered; 404 when neither.
async fn show(
    State(admin): State<Admin>,
    Path(id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Result<Json<MessageView>, ApiError> {
    let id: MessageId = id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("message id {id:?} is not a decimal number"),
        )
    })?;
    let found: Option<Message> = blocking(move || match admin.spool.get(id)? {
        Some(m) => Ok(Some(m)),
        None => Ok(admin.spool.dead_letters()?.into_iter().find(|m| m.id == id)),
    })
    .await?;
    let msg = found.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("message {id} is neither queued nor dead-lettered"),
        )
    })?;
    Ok(Json(MessageView::of(&msg, q.data)))
}

#[derive(Deserialize)]
struct DeadLetterQuery {
    queue: Option<String>,
}

async fn dead_letters(
    State(admin): State<Admin>,
    Query(q): Query<DeadLetterQuery>,
) -> Result<Json<Vec<MessageView>>, ApiError> {
    let dead = blocking(move || admin.spool.dead_letters()).await?;
    Ok(Json(
        dead.iter()
            .filter(|m| q.queue.as_ref().is_none_or(|queue| &m.queue == queue))
            .map(|m| MessageView::of(m, false))
            .collect(),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeadLetterRequeue {
    queue: Option<String>,
    /// Decimal string or number.
    id: Option<Value>,
}

async fn requeue_dead_letters(
    State(admin): State<Admin>,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: DeadLetterRequeue = body(&bytes)?;
    let id = match &req.id {
        None => None,
        Some(Value::Number(n)) => n.as_u64().map(MessageId),
        Some(Value::String(s)) => s.parse().ok(),
        Some(_) => None,
    };
    if req.id.is_some() && id.is_none() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "\"id\" must be a message id (decimal string or number)".into(),
        ));
    }
    let queue = req.queue.clone();
    let n = detached(async move { admin.spool.requeue_dead_letters(queue.as_deref(), id).await })
        .await?;
    tracing::info!(queue = ?req.queue, ?id, count = n, "admin: dead letters requeued");
    Ok(Json(json!({ "count": n })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Requeue {
    to: Option<String>,
}

/// Makes the waiting messages of a queue due now, or moves them to `to`. Messages in
/// flight are not touched (the spool leases the ones it rewrites first).
async fn requeue(
    State(admin): State<Admin>,
    Path(queue): Path<String>,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    check_queue(&queue)?;
    let req: Requeue = body(&bytes)?;
    let (from, to) = (queue.clone(), req.to.clone());
    let n = detached(async move {
        match &to {
            Some(to) => admin.spool.rebind(&from, to).await,
            None => admin.spool.expedite(&from).await,
        }
    })
    .await?;
    tracing::info!(%queue, to = ?req.to, count = n, "admin: queue requeued");
    Ok(Json(json!({ "count": n })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SuspendRequest {
    /// Why (shown by `summary`).
    reason: Option<String>,
    /// How long, e.g. `"1h"`; absent: until resumed.
    #[serde(rename = "for")]
    lasting: Option<String>,
}

/// Suspends a queue, durably (kept in the spool: a restart keeps it), with an optional
/// reason and duration; a second suspend replaces both.
async fn suspend(
    State(admin): State<Admin>,
    Path(queue): Path<String>,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    check_queue(&queue)?;
    let req: SuspendRequest = body(&bytes)?;
    let lasting = req
        .lasting
        .as_deref()
        .map(|d| duration("for", d))
        .transpose()?;
    let (suspensions, q) = (admin.suspensions.clone(), queue.clone());
    let (changed, s) =
        detached(async move { suspensions.suspend(&q, req.reason, lasting).await }).await?;
    tracing::warn!(%queue, reason = s.reason.as_deref().unwrap_or(""), until_ms = s.until_ms,
        "admin: queue suspended (no deliveries until resumed or expired)");
    Ok(Json(json!({
        "queue": queue, "suspended": true, "changed": changed,
        "reason": s.reason, "until_ms": s.until_ms,
    })))
}

async fn resume(
    State(admin): State<Admin>,
    Path(queue): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_queue(&queue)?;
    let (suspensions, q) = (admin.suspensions.clone(), queue.clone());
    let changed = detached(async move { suspensions.resume(&q).await }).await?;
    tracing::info!(%queue, "admin: queue resumed");
    Ok(Json(
        json!({ "queue": queue, "suspended": false, "changed": changed }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    /// A duration such as `"5m"` or `"90s"` [default: `drain::DEFAULT_DEADLINE`].
    deadline: Option<String>,
}

/// The longest `GET /api/admin/drain?wait=` holds a request.
const MAX_DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn duration(what: &str, text: &str) -> Result<std::time::Duration, ApiError> {
    humantime::parse_duration(text).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{what} {text:?} is not a duration such as \"5m\" or \"90s\": {e}"),
        )
    })
}

/// Starts draining: 202 with the drain's state, or 200 with the state of the drain already
/// under way (its deadline unchanged). With `?wait=`, the answer waits for the drain's end
/// like `GET` does: a drain with nothing to do ends at once, and the daemon closes its
/// listener right after, so a client that asked first and looked later would find it gone.
/// A request in flight is still answered (the shutdown lets it finish).
async fn drain(
    State(admin): State<Admin>,
    Query(q): Query<DrainQuery>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let req: DrainRequest = body(&bytes)?;
    let deadline = match &req.deadline {
        Some(text) => duration("deadline", text)?,
        None => crate::drain::DEFAULT_DEADLINE,
    };
    let wait = q.wait.as_deref().map(|w| duration("wait", w)).transpose()?;
    let (code, started) = match admin.drain.begin(deadline).await {
        Ok(status) => (StatusCode::ACCEPTED, status),
        Err(status) => (StatusCode::OK, status),
    };
    let status = match wait {
        Some(wait) => admin.drain.wait_outcome(wait.min(MAX_DRAIN_WAIT)).await,
        None => None,
    };
    Ok((code, Json(status.unwrap_or(started))).into_response())
}

#[derive(Deserialize)]
struct DrainQuery {
    /// Hold the answer until the drain ends or this long passes (at most a minute).
    wait: Option<String>,
}

/// The drain's state; with `?wait=`, once it ended (or the wait passed).
async fn drain_status(
    State(admin): State<Admin>,
    Query(q): Query<DrainQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match &q.wait {
        Some(text) => {
            let wait = duration("wait", text)?.min(MAX_DRAIN_WAIT);
            admin.drain.wait_outcome(wait).await
        }
        None => admin.drain.status(),
    };
    Ok(Json(match status {
        Some(status) => json!(status),
        None => json!({ "draining": false }),
    }))
}

/// Reloads the policy file: 200 with the new generation, or 422 with the load error
/// (`file:line`) while the old policy keeps running.
async fn reload(State(admin): State<Admin>) -> Result<Json<Value>, ApiError> {
    // Detached: a client hanging up must not cancel a reload half-way.
    let policy = admin.policy.clone();
    let done = tokio::spawn(async move { crate::reload::reload(&policy, "admin API").await })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("policy reload refused, the previous policy keeps running: {e}"),
            )
        })?;
    Ok(Json(
        json!({ "reloaded": true, "chunk": done.chunk, "generation": done.generation }),
    ))
}

/// The suspended queues, and each one's reason, start and expiry.
async fn suspended(State(admin): State<Admin>) -> Json<Value> {
    let details = admin.suspensions.details();
    let names: Vec<&String> = details.keys().collect();
    Json(json!({ "suspended": names, "details": details }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_may_go_without_a_token() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(check_exposure(addr("127.0.0.1:8000"), None).is_ok());
        assert!(check_exposure(addr("[::1]:8000"), None).is_ok());
        let err = check_exposure(addr("0.0.0.0:8000"), None).unwrap_err();
        assert!(err.to_string().contains("without a token"), "{err}");
        assert!(check_exposure(addr("0.0.0.0:8000"), Some("t")).is_ok());
    }

    #[test]
    fn token_comparison() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
    }
}
