//! `kumo.http` end to end (issue 14): policy/examples/webhook.lua, pointed at a local HTTP
//! server this test runs, delivers on 2xx, retries on 503 and on a timeout, and
//! dead-letters on 400.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;

#[derive(Default)]
struct Seen {
    /// Every body the endpoint was sent, in order (retries included).
    bodies: Vec<String>,
}

/// `ok*` → 200; `flaky` → 503 the first time, 200 after; `bad` → 400; `slow` → answers
/// after 3 s (past the 1 s request timeout the test sets).
async fn endpoint(State(seen): State<Arc<Mutex<Seen>>>, body: String) -> StatusCode {
    let tries = {
        let mut seen = seen.lock().unwrap();
        seen.bodies.push(body.clone());
        seen.bodies.iter().filter(|b| **b == body).count()
    };
    match body.as_str() {
        "flaky" if tries == 1 => StatusCode::SERVICE_UNAVAILABLE,
        "bad" => StatusCode::BAD_REQUEST,
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            StatusCode::OK
        }
        _ => StatusCode::OK,
    }
}

fn example(url: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/policy/examples/webhook.lua");
    let lua = std::fs::read_to_string(path).expect("the example exists");
    assert!(lua.contains("'http://127.0.0.1:4242/log'") && lua.contains("timeout = '10s'"));
    lua.replace("'http://127.0.0.1:4242/log'", &format!("'{url}'"))
        .replace("timeout = '10s'", "timeout = '1s'")
        .replace("retry_interval = '10s'", "retry_interval = '1s'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_example_delivers_retries_and_dead_letters() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let app = Router::new()
        .route("/log", post(endpoint))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(&example(&format!("http://{addr}/log")), dir.path()).await;
    let http = reqwest::Client::new();
    for body in ["ok 1", "ok 2", "flaky", "bad", "slow"] {
        let resp = http
            .post(common::url(&daemon, "/api/v1/queues/webhook/messages"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // Delivered: the two oks and flaky (second try); dead-lettered: bad; `slow` times out
    // each time and stays spooled with a retry.
    common::wait_until(
        "ok, flaky and bad to leave the queue",
        Duration::from_secs(20),
        || common::queued(&daemon) == 1,
    )
    .await;
    let left = daemon.spool.list("webhook", 10).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].payload, b"slow");
    let error = left[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    let dead = daemon.spool.dead_letters().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, b"bad");
    assert!(
        dead[0].last_error.as_deref().unwrap_or("").contains("400"),
        "{:?}",
        dead[0].last_error
    );
    let bodies = seen.lock().unwrap().bodies.clone();
    assert_eq!(
        bodies.iter().filter(|b| *b == "flaky").count(),
        2,
        "{bodies:?}"
    );
    assert_eq!(
        bodies.iter().filter(|b| *b == "ok 1").count(),
        1,
        "{bodies:?}"
    );
    daemon.stop().await.unwrap();
}

/// A response body past kumo.http's bound (16 MiB) is not read whole into the relay's
/// memory: `send()` raises, and the message stays spooled for a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_response_body_is_cut_off_and_the_message_stays() {
    let app = Router::new().route("/log", post(|| async { vec![b'x'; (16 << 20) + 1] }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(&example(&format!("http://{addr}/log")), dir.path()).await;
    let resp = reqwest::Client::new()
        .post(common::url(&daemon, "/api/v1/queues/webhook/messages"))
        .body("big answer")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut error = String::new();
    common::wait_until("a failed attempt", Duration::from_secs(20), || {
        let left = daemon.spool.list("webhook", 10).unwrap();
        error = left
            .first()
            .and_then(|m| m.last_error.clone())
            .unwrap_or_default();
        !error.is_empty()
    })
    .await;
    assert!(error.contains("larger than 16 MiB"), "{error}");
    assert_eq!(common::queued(&daemon), 1, "the message stays spooled");
    daemon.stop().await.unwrap();
}
