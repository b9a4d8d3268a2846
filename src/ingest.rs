//! HTTP ingest: the axum handlers that turn requests into spooled messages.
//!
//! The one rule here: a 2xx answer is sent only after `Spool::enqueue` returned `Ok`,
//! which means the messages are fsynced. Every request is one enqueue call, so a batch is
//! accepted whole or not at all, and concurrent requests share fsyncs via the spool's
//! group commit. Errors are JSON `{"error": "..."}` with 400 (the request is wrong),
//! 413 (too large) or 503 (the spool could not make it durable: retry later).
//!
//! Access: with ingest tokens configured, [`crate::ingest_auth::authenticate`] answers 401
//! before any handler runs, and each handler asks the token's
//! [`Access`](crate::ingest_auth::Access) about every queue it would write (403) before
//! it enqueues anything.
//!
//! Bounds: a request is measured before it is expanded. An NDJSON batch's
//! lines are counted (one pass over the bytes, nothing allocated) before any is parsed;
//! an injection's recipients are counted and its `content` and `metadata` measured as
//! raw JSON before any recipient is built, so a small body that would expand into
//! gigabytes is refused with 413 at the cost of one parse.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::de::{IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use spool::{Meta, MetaValue, NewMessage, Spool};

use std::sync::Arc;

use crate::capacity::Capacity;
use crate::config::Limits;
use crate::http_error::{check_queue, ApiError};
use crate::ingest_auth::{Access, Tokens};
use crate::telemetry::Telemetry;

/// What the handlers share: the spool, where accepted messages are reported, and the
/// request bounds.
#[derive(Clone)]
pub struct Ingest {
    /// Where accepted messages go.
    pub spool: Spool,
    /// Where accepted messages are reported.
    pub telemetry: Telemetry,
    /// The request bounds.
    pub limits: IngestLimits,
    /// The capacity gate: an injection reserves what it expands to.
    pub capacity: Arc<Capacity>,
}

/// The bounds the handlers enforce (from `--max-inject-*` and `--max-batch-lines`).
#[derive(Clone, Copy, Debug)]
pub struct IngestLimits {
    /// `--max-inject-recipients`.
    pub max_inject_recipients: usize,
    /// `--max-inject-expanded-bytes`: what an injection may expand to (413 above it).
    pub max_inject_expanded_bytes: u64,
    /// `--max-batch-lines`.
    pub max_batch_lines: usize,
}

impl From<&Limits> for IngestLimits {
    fn from(l: &Limits) -> IngestLimits {
        IngestLimits {
            max_inject_recipients: l.max_inject_recipients,
            max_inject_expanded_bytes: l.max_inject_expanded_bytes,
            max_batch_lines: l.max_batch_lines,
        }
    }
}

impl Default for IngestLimits {
    fn default() -> IngestLimits {
        IngestLimits::from(&Limits::default())
    }
}

/// Builds the router. `max_body_bytes` bounds every request body (413 above it); the
/// capacity gate runs before every ingest handler (503 at the limit), and the drain gate
/// before it (503 while draining), and the token check before both (401 without a token
/// when `tokens` is not empty).
pub fn router(
    state: Ingest,
    max_body_bytes: usize,
    capacity: Arc<Capacity>,
    drain: crate::drain::Drain,
    tokens: Tokens,
) -> Router {
    let ingest = Router::new()
        .route("/api/v1/queues/{queue}/messages", post(post_message))
        .route("/api/v1/queues/{queue}/batch", post(post_batch))
        .route("/api/inject/v1", post(inject))
        .route_layer(axum::middleware::from_fn_with_state(
            capacity,
            crate::capacity::gate,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            drain,
            crate::drain::gate,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            tokens,
            crate::ingest_auth::authenticate,
        ));
    Router::new()
        .route("/api/v1/stats", get(stats))
        .merge(ingest)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn stats(State(ingest): State<Ingest>) -> Result<Json<spool::SpoolStats>, ApiError> {
    // Counting the dead-letter and quarantine trees reads sled: off the async workers.
    let store = ingest.spool.clone();
    tokio::task::spawn_blocking(move || store.stats(spool::now_ms()))
        .await
        .map(Json)
        .map_err(|e| ApiError(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// One message: the body verbatim, `X-Meta-<name>` headers as string metadata.
async fn post_message(
    State(Ingest {
        spool, telemetry, ..
    }): State<Ingest>,
    Path(queue): Path<String>,
    Extension(access): Extension<Access>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    check_queue(&queue)?;
    access.check([queue.as_str()])?;
    let body = body?;
    let mut meta = Meta::new();
    for (name, value) in &headers {
        // HeaderName is already lowercase.
        if let Some(key) = name.as_str().strip_prefix("x-meta-") {
            let value = value.to_str().map_err(|_| {
                ApiError::bad_request(format!("header {name} is not visible ASCII"))
            })?;
            meta.insert(key.to_owned(), MetaValue::Str(value.to_owned()));
        }
    }
    let ids = spool
        .enqueue(vec![NewMessage {
            queue: queue.clone(),
            meta,
            // The body's own buffer when it is the only owner (it is, after the server read it).
            payload: Vec::from(body),
        }])
        .await?;
    telemetry.accepted(&queue, &ids);
    Ok(Json(json!({ "id": ids[0].to_string() })))
}

/// One NDJSON line of a batch.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    data: Option<String>,
    data_b64: Option<String>,
    #[serde(default)]
    meta: Map<String, Value>,
}

/// Parses a whole NDJSON batch; the first bad line fails it, named by its 1-based number.
pub fn parse_batch(queue: &str, body: &[u8]) -> Result<Vec<NewMessage>, ApiError> {
    let mut out = Vec::new();
    for (n, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |why: String| ApiError::bad_request(format!("line {}: {why}", n + 1));
        let parsed: BatchLine = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
        let payload = match (parsed.data, parsed.data_b64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| bad(format!("data_b64 is not valid base64: {e}")))?,
            _ => {
                return Err(bad(
                    "exactly one of \"data\" or \"data_b64\" is required".into()
                ))
            }
        };
        out.push(NewMessage {
            queue: queue.to_owned(),
            meta: spool::meta_json::meta_from_json(parsed.meta),
            payload,
        });
    }
    Ok(out)
}

/// Refuses a batch of more than `max_lines` lines, blank ones included, before anything
/// is parsed: one scan of the bytes, stopping as soon as the count is over.
pub fn check_batch_lines(body: &[u8], max_lines: usize) -> Result<(), ApiError> {
    // Lines are the pieces between '\n's; a last piece without '\n' counts too.
    let mut lines = usize::from(!body.is_empty() && !body.ends_with(b"\n"));
    for _ in body.iter().filter(|b| **b == b'\n') {
        lines += 1;
        if lines > max_lines {
            break;
        }
    }
    if lines > max_lines {
        return Err(ApiError::too_large(format!(
            "the batch has more than {max_lines} lines (blank lines count), the limit set by \
             --max-batch-lines; nothing was accepted: split it into smaller batches"
        )));
    }
    Ok(())
}

/// NDJSON batch: every line is spooled in one durable enqueue, or none is.
async fn post_batch(
    State(Ingest {
        spool,
        telemetry,
        limits,
        ..
    }): State<Ingest>,
    Path(queue): Path<String>,
    Extension(access): Extension<Access>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    check_queue(&queue)?;
    access.check([queue.as_str()])?;
    let body = body?;
    check_batch_lines(&body, limits.max_batch_lines)?;
    let messages = parse_batch(&queue, &body)?;
    let ids = if messages.is_empty() {
        Vec::new()
    } else {
        spool.enqueue(messages).await?
    };
    telemetry.accepted(&queue, &ids);
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    Ok(Json(json!({ "ids": ids })))
}

/// The KumoMTA injection request, as far as a relay needs it.
#[derive(Deserialize)]
struct InjectRequest {
    envelope_sender: String,
    recipients: Vec<InjectRecipient>,
    content: Value,
    /// Metadata for every recipient (a spoolrelay extension; per-recipient wins).
    #[serde(default)]
    metadata: Map<String, Value>,
}

#[derive(Deserialize)]
struct InjectRecipient {
    email: String,
    #[serde(default)]
    metadata: Map<String, Value>,
}

/// KumoMTA's queue name for a recipient domain and its metadata (`campaign`, `tenant`,
/// `routing_domain`), written by [`policy::QueueName::format`], unless metadata `queue`
/// names one outright.
pub fn kumo_queue_name(domain: &str, meta: &Map<String, Value>) -> String {
    let text = |key: &str| {
        meta.get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    if let Some(queue) = text("queue") {
        return queue.to_owned();
    }
    policy::QueueName {
        domain: Some(domain.to_owned()),
        tenant: text("tenant").map(str::to_owned),
        campaign: text("campaign").map(str::to_owned),
        routing_domain: text("routing_domain").map(str::to_owned),
    }
    .format()
}

/// What an injection request turns into: the messages to spool, and the recipients that
/// could not be queued (no domain, bad queue name), with why.
pub struct InjectPlan {
    /// One message per recipient that could be queued.
    pub messages: Vec<NewMessage>,
    /// The recipients that could not be queued.
    pub failed_recipients: Vec<String>,
    /// Why each of them could not.
    pub errors: Vec<String>,
}

/// An injection's size before expansion: the recipients counted (each skipped unparsed)
/// and `content` and `metadata` kept as raw JSON slices of the body (no copy).
#[derive(Deserialize)]
struct InjectShape<'a> {
    #[serde(default)]
    recipients: Count,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
}

/// The length of a JSON array, counted without keeping its elements.
#[derive(Default)]
struct Count(usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct Counter;
        impl<'de> Visitor<'de> for Counter {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of recipients")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
        }
        d.deserialize_seq(Counter)
    }
}

/// Refuses an injection that names too many recipients or would expand past
/// `max_inject_expanded_bytes`: recipients x (content + shared metadata), measured as
/// raw JSON (never less than what a message will hold). Allocates nothing per recipient.
fn check_inject_bounds(body: &[u8], limits: &IngestLimits) -> Result<(), ApiError> {
    let shape: InjectShape = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid injection request: {e}")))?;
    let recipients = shape.recipients.0;
    if recipients > limits.max_inject_recipients {
        return Err(ApiError::too_large(format!(
            "the injection names {recipients} recipients; the limit is {} \
             (--max-inject-recipients); nothing was accepted: split it into smaller requests",
            limits.max_inject_recipients
        )));
    }
    let raw_len = |v: Option<&RawValue>| v.map_or(0, |v| v.get().len() as u64);
    let each = raw_len(shape.content) + raw_len(shape.metadata);
    let expanded = (recipients as u64).saturating_mul(each);
    if expanded > limits.max_inject_expanded_bytes {
        return Err(ApiError::too_large(format!(
            "the injection would expand to {expanded} bytes ({recipients} recipients x {each} \
             bytes of content and metadata); the limit is {} (--max-inject-expanded-bytes); \
             nothing was accepted: send fewer recipients per request",
            limits.max_inject_expanded_bytes
        )));
    }
    Ok(())
}

/// Parses a KumoMTA injection body into one message per recipient, after checking its
/// bounds (413 above them, before any message is built). Pure, so it can be fuzzed; the
/// handler only adds the enqueue.
pub fn plan_inject(body: &[u8], limits: &IngestLimits) -> Result<InjectPlan, ApiError> {
    check_inject_bounds(body, limits)?;
    let req: InjectRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid injection request: {e}")))?;
    let Value::String(content) = req.content else {
        return Err(ApiError::bad_request(
            "\"content\" must be the message text (content builders are not supported)",
        ));
    };
    let mut plan = InjectPlan {
        messages: Vec::new(),
        failed_recipients: Vec::new(),
        errors: Vec::new(),
    };
    for rcpt in req.recipients {
        let domain = match rcpt.email.rsplit_once('@') {
            Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
                domain.to_ascii_lowercase()
            }
            _ => {
                plan.errors
                    .push(format!("{}: not an email address", rcpt.email));
                plan.failed_recipients.push(rcpt.email);
                continue;
            }
        };
        let mut map = req.metadata.clone();
        map.extend(rcpt.metadata);
        let queue = kumo_queue_name(&domain, &map);
        if let Err(why) = spool::keys::check_queue_name(&queue) {
            plan.errors.push(format!(
                "{}: invalid queue name {queue:?}: {why}",
                rcpt.email
            ));
            plan.failed_recipients.push(rcpt.email);
            continue;
        }
        map.insert(
            spool::meta_json::SENDER_KEY.into(),
            Value::String(req.envelope_sender.clone()),
        );
        map.insert(
            spool::meta_json::RECIPIENT_KEY.into(),
            Value::String(rcpt.email),
        );
        plan.messages.push(NewMessage {
            queue,
            meta: spool::meta_json::meta_from_json(map),
            payload: content.clone().into_bytes(),
        });
    }
    Ok(plan)
}

/// KumoMTA-shaped injection: one message per recipient, all spooled in one enqueue.
/// Recipients that cannot be queued are reported in `failed_recipients`; the others are
/// accepted.
async fn inject(
    State(Ingest {
        spool,
        telemetry,
        limits,
        capacity,
    }): State<Ingest>,
    Extension(access): Extension<Access>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Response> {
    let body = body.map_err(|e| ApiError::from(e).into_response())?;
    let plan = plan_inject(&body, &limits).map_err(IntoResponse::into_response)?;
    // Every recipient's queue, before anything is spooled: one refused refuses the request.
    access
        .check(plan.messages.iter().map(|m| m.queue.as_str()))
        .map_err(IntoResponse::into_response)?;
    // The gate reserved the body; the recipients' copies of the content are the rest.
    let expanded: u64 = plan.messages.iter().map(|m| m.payload.len() as u64).sum();
    let _reservation = capacity
        .reserve(expanded.saturating_sub(body.len() as u64))
        .map_err(|over| capacity.refuse(over))?;
    let accepted = plan.messages.len();
    if accepted > 0 {
        let queues: Vec<String> = plan.messages.iter().map(|m| m.queue.clone()).collect();
        let ids = spool
            .enqueue(plan.messages)
            .await
            .map_err(|e| ApiError::from(e).into_response())?;
        for (queue, id) in queues.iter().zip(ids) {
            telemetry.accepted(queue, &[id]);
        }
    }
    Ok(Json(json!({
        "success_count": accepted,
        "fail_count": plan.failed_recipients.len(),
        "failed_recipients": plan.failed_recipients,
        "errors": plan.errors,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn queue_names_follow_kumo_rules() {
        let meta = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(kumo_queue_name("example.com", &Map::new()), "example.com");
        assert_eq!(
            kumo_queue_name(
                "example.com",
                &meta(json!({"campaign": "c", "tenant": "t", "routing_domain": "r"}))
            ),
            "c:t@example.com!r"
        );
        assert_eq!(
            kumo_queue_name("x", &meta(json!({"queue": "amqp", "tenant": "t"}))),
            "amqp"
        );
        // KumoMTA writes a campaign without a tenant as `campaign:@domain`.
        assert_eq!(
            kumo_queue_name("example.com", &meta(json!({"campaign": "c"}))),
            "c:@example.com"
        );
    }

    #[test]
    fn batch_names_the_bad_line_and_accepts_nothing() {
        let body = b"{\"data\":\"a\"}\n\n{\"data_b64\":\"AAEC/w==\"}\n{nope}\n";
        let err = parse_batch("q", body).unwrap_err();
        assert_eq!(err.0, StatusCode::BAD_REQUEST);
        assert!(err.1.starts_with("line 4:"), "{}", err.1);
        let ok = parse_batch("q", &body[..body.len() - 7]).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].payload, vec![0, 1, 2, 255]);
    }

    #[test]
    fn batch_line_count_includes_blank_lines() {
        assert!(check_batch_lines(b"", 0).is_ok());
        assert!(check_batch_lines(b"a\nb\n", 2).is_ok());
        assert!(check_batch_lines(b"a\nb", 2).is_ok());
        assert!(check_batch_lines(b"a\nb\nc", 2).is_err());
        let blank = vec![b'\n'; 1000];
        let err = check_batch_lines(&blank, 999).unwrap_err();
        assert_eq!(err.0, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(err.1.contains("--max-batch-lines"), "{}", err.1);
    }

    #[test]
    fn inject_bounds_are_checked_before_expansion() {
        let limits = IngestLimits {
            max_inject_recipients: 3,
            max_inject_expanded_bytes: 100,
            max_batch_lines: 10,
        };
        let body = |n: usize, content: &str| {
            let rcpts: Vec<Value> = (0..n)
                .map(|i| json!({"email": format!("u{i}@x.org")}))
                .collect();
            serde_json::to_vec(
                &json!({"envelope_sender": "s@x.org", "recipients": rcpts, "content": content}),
            )
            .unwrap()
        };
        assert_eq!(
            plan_inject(&body(3, "hi"), &limits).unwrap().messages.len(),
            3
        );
        let refused = |body: &[u8]| match plan_inject(body, &limits) {
            Ok(_) => panic!("accepted: {}", String::from_utf8_lossy(body)),
            Err(e) => e,
        };
        let err = refused(&body(4, "hi"));
        assert_eq!(err.0, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(err.1.contains("--max-inject-recipients"), "{}", err.1);
        let err = refused(&body(3, &"x".repeat(40)));
        assert_eq!(err.0, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(err.1.contains("--max-inject-expanded-bytes"), "{}", err.1);
        let bad = refused(br#"{"recipients": 5}"#);
        assert_eq!(bad.0, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn batch_line_needs_exactly_one_data_field() {
        assert!(parse_batch("q", br#"{"data":"a","data_b64":"YQ=="}"#).is_err());
        assert!(parse_batch("q", br#"{"meta":{}}"#).is_err());
        assert!(parse_batch("q", br#"{"data_b64":"!!"}"#).is_err());
    }
}
