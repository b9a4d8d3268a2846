//! HTTP error answers shared by ingest, admin and the server loop: [`ApiError`] (status
//! plus a message, sent as `{"error": "..."}`), the mapping from [`SpoolError`] to a status,
//! the queue-name check, and the JSON 404/405 fallbacks.

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use spool::SpoolError;

/// The answer for a path no route serves (also a queue name with a raw `/` in it).
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint at {}: ingest is POST /api/v1/queues/{{queue}}/messages, \
             /api/v1/queues/{{queue}}/batch or /api/inject/v1 (a queue name containing '/' \
             must be percent-encoded as %2F); see docs/http-api.md",
            uri.path()
        ),
    )
}

/// The answer for a known path asked with the wrong method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {}; see docs/http-api.md",
            uri.path()
        ),
    )
}

/// An error answer: status plus a human-readable message, sent as JSON.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    /// 400: the request is wrong.
    pub fn bad_request(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }

    /// 413: the request is too large.
    pub fn too_large(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::PAYLOAD_TOO_LARGE, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// 400 for a bad queue name, 404 for a message or queue that is not there, 503 for
/// everything else (not durable, writer stopped, storage, I/O: nothing was done; retry).
impl From<SpoolError> for ApiError {
    fn from(e: SpoolError) -> ApiError {
        let status = match e {
            SpoolError::InvalidQueueName { .. } => StatusCode::BAD_REQUEST,
            SpoolError::NotFound { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "spool operation failed; answering 503");
        }
        ApiError(status, e.to_string())
    }
}

/// A body that failed to arrive (too large, aborted) keeps axum's status, JSON-shaped.
impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> ApiError {
        ApiError(r.status(), r.body_text())
    }
}

/// 400 unless `queue` is a valid spool queue name.
pub fn check_queue(queue: &str) -> Result<(), ApiError> {
    spool::keys::check_queue_name(queue)
        .map_err(|why| ApiError::bad_request(format!("invalid queue name {queue:?}: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_errors_map_to_statuses() {
        let status = |e: SpoolError| ApiError::from(e).0;
        let bad_name = SpoolError::InvalidQueueName {
            name: String::new(),
            why: "queue name is empty",
        };
        assert_eq!(status(bad_name), StatusCode::BAD_REQUEST);
        let missing = SpoolError::NotFound {
            id: spool::MessageId(7),
        };
        assert_eq!(status(missing), StatusCode::NOT_FOUND);
        assert_eq!(
            status(SpoolError::WriterStopped),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let not_durable = SpoolError::NotDurable("EIO".into());
        assert_eq!(status(not_durable), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(check_queue("").unwrap_err().0, StatusCode::BAD_REQUEST);
        assert!(check_queue("kafka").is_ok());
    }
}
