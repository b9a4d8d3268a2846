//! Health endpoints: `/livez` (the process answers; `/healthz` is an alias) and
//! `/readyz` (whether ingest should be sent traffic now).
//!
//! Readiness is one function, [`not_ready_reasons`], that gathers every reason at once,
//! so a load balancer's log and an operator's `curl` say all that is wrong. A spool that
//! refused to open never gets here: the daemon does not start.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::capacity::Capacity;
use crate::Shutdown;

/// What readiness looks at.
#[derive(Clone)]
pub struct Health {
    /// The spool (a poisoned spool is not ready).
    pub spool: spool::Spool,
    /// The capacity gate (over a limit is not ready).
    pub capacity: Arc<Capacity>,
    /// Shutting down is not ready.
    pub shutdown: Shutdown,
    /// Draining is not ready.
    pub drain: crate::drain::Drain,
}

/// Every reason the daemon should not get new traffic now; empty when ready.
pub fn not_ready_reasons(health: &Health) -> Vec<String> {
    let mut reasons = Vec::new();
    if health.drain.is_draining() {
        reasons.push("draining (POST /api/admin/drain): accepting nothing new".to_owned());
    }
    if health.shutdown.is_triggered() {
        reasons.push("shutting down: draining in-flight deliveries".to_owned());
    }
    if let Err(over) = health.capacity.check(0) {
        reasons.push(over.reason);
    }
    // A durability error poisoned the spool: nothing is accepted until a restart.
    if let Some(why) = health.spool.poisoned() {
        reasons.push(why);
    }
    reasons
}

/// The `/livez` and `/readyz` routes.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/livez", get(live))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .with_state(health)
}

async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(health): State<Health>) -> Response {
    let reasons = not_ready_reasons(&health);
    if reasons.is_empty() {
        return Json(json!({ "ready": true })).into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "ready": false,
            "error": format!("not ready: {}", reasons.join("; ")),
            "reasons": reasons,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_and_capacity_are_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = spool::Spool::open(dir.path(), Default::default()).unwrap();
        let shutdown = Shutdown::new();
        let drain = crate::drain::Drain::new(spool.clone(), Default::default(), shutdown.clone());
        let health = Health {
            spool: spool.clone(),
            capacity: Capacity::new(spool, dir.path(), None, 0),
            shutdown,
            drain,
        };
        assert!(not_ready_reasons(&health).is_empty());
        health.shutdown.trigger();
        let reasons = not_ready_reasons(&health);
        assert_eq!(reasons.len(), 1);
        assert!(reasons[0].contains("shutting down"), "{reasons:?}");
    }
}
