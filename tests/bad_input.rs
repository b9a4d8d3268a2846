//! Bad requests are refused whole, with a status and a JSON error that says what is wrong,
//! and the daemon keeps serving. A broken policy stops the binary with the Lua error.

mod common;

use serde_json::Value;
use std::io::ErrorKind;

/// A policy with no protocol: messages stay queued, which is what these tests inspect.
const HOLD: &str = "kumo.on('get_queue_config', function() return kumo.make_queue_config {} end)\n";

async fn healthy(daemon: &spoolrelay::Daemon) {
    let r = reqwest::get(common::url(daemon, "/healthz")).await.unwrap();
    assert!(r.status().is_success(), "daemon stopped serving");
}

async fn error_of(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    (
        status,
        body["error"].as_str().expect("error field").to_owned(),
    )
}

#[tokio::test]
async fn malformed_ndjson_is_refused_whole_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(HOLD, dir.path()).await;
    let http = reqwest::Client::new();
    for (body, line) in [
        (
            "{\"data\":\"ok\"}\n{\"data\":\"ok\"}\n{\"data\": oops}\n",
            3,
        ),
        ("{\"data\":\"ok\"}\n\n{\"data_b64\":\"not base64!\"}\n", 3),
        ("{\"data\":\"ok\",\"data_b64\":\"b2s=\"}\n", 1),
        ("\n{\"data\":\"ok\"}\n[1,2]\n", 3),
    ] {
        let resp = http
            .post(common::url(&daemon, "/api/v1/queues/q/batch"))
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, error) = error_of(resp).await;
        assert_eq!(status, 400);
        assert!(error.starts_with(&format!("line {line}:")), "{error}");
        healthy(&daemon).await;
    }
    assert_eq!(
        common::queued(&daemon),
        0,
        "part of a bad batch was accepted"
    );
    let resp = http
        .post(common::url(&daemon, "/api/inject/v1"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, 400);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn oversize_body_gets_413_and_nothing_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(HOLD, dir.path(), |c| c.max_body_bytes = 1024).await;
    let http = reqwest::Client::new();
    for path in [
        "/api/v1/queues/q/messages",
        "/api/v1/queues/q/batch",
        "/api/inject/v1",
    ] {
        let resp = http
            .post(common::url(&daemon, path))
            .body(vec![b'a'; 4096])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 413, "{path}");
        healthy(&daemon).await;
    }
    let ok = http
        .post(common::url(&daemon, "/api/v1/queues/q/messages"))
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(common::queued(&daemon), 1);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_queue_name_is_a_400() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(HOLD, dir.path()).await;
    let http = reqwest::Client::new();
    let long = "q".repeat(300);
    for queue in ["bad%01name", long.as_str()] {
        let resp = http
            .post(common::url(
                &daemon,
                &format!("/api/v1/queues/{queue}/messages"),
            ))
            .body("x")
            .send()
            .await
            .unwrap();
        let (status, error) = error_of(resp).await;
        assert_eq!(status, 400);
        assert!(error.contains("invalid queue name"), "{error}");
        healthy(&daemon).await;
    }
    // A raw '/' makes no route match; a wrong method on a known path: both JSON errors.
    let resp = http
        .post(common::url(&daemon, "/api/v1/queues/a/b/messages"))
        .body("x")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(resp).await;
    assert_eq!(status, 404);
    assert!(error.contains("%2F"), "{error}");
    let resp = http
        .get(common::url(&daemon, "/api/v1/queues/a/messages"))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(resp).await;
    assert_eq!(status, 405);
    assert!(error.contains("GET is not allowed"), "{error}");
    // An injection whose metadata names a bad queue fails that recipient only.
    let req = serde_json::json!({"envelope_sender": "a@b", "content": "hi", "recipients": [
        {"email": "ok@example.com"}, {"email": "no-at-sign"}, {"email": "x@example.com", "metadata": {"queue": long}}]});
    let resp = http
        .post(common::url(&daemon, "/api/inject/v1"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["success_count"], 1);
    assert_eq!(answer["fail_count"], 2);
    assert_eq!(
        answer["failed_recipients"],
        serde_json::json!(["no-at-sign", "x@example.com"])
    );
    assert_eq!(common::queued(&daemon), 1);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn spool_that_cannot_fsync_answers_503_until_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let faults = spool::SyncFaults::default();
    let injected = faults.clone();
    let daemon = common::start_with(HOLD, dir.path(), |c| c.spool_options.faults = injected).await;
    let http = reqwest::Client::new();
    faults.fail_with(ErrorKind::StorageFull);
    let resp = http
        .post(common::url(&daemon, "/api/v1/queues/q/messages"))
        .body("x")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(resp).await;
    assert_eq!(status, 503);
    assert!(error.contains("durable"), "{error}");
    healthy(&daemon).await;
    // fsyncgate: a healed disk is not trusted again before a restart.
    faults.heal();
    let resp = http
        .post(common::url(&daemon, "/api/v1/queues/q/messages"))
        .body("x")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(resp).await;
    assert_eq!(status, 503);
    assert!(error.contains("restart"), "{error}");
    assert!(daemon.spool.poisoned().is_some());
    healthy(&daemon).await;
    let readyz = http
        .get(common::url(&daemon, "/readyz"))
        .send()
        .await
        .unwrap();
    let (status, why) = (readyz.status(), readyz.text().await.unwrap());
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("restart"), "/readyz says why: {why}");
    // The final sync is refused too: stopping says so instead of claiming a clean sync.
    let stopped = daemon.stop().await;
    assert!(stopped.is_err(), "{stopped:?}");
}

#[test]
fn broken_policy_exits_nonzero_with_the_lua_error() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("broken.lua");
    std::fs::write(
        &policy,
        "kumo.on('get_queue_config', function()\n  return {\nend)\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spoolrelay"))
        .arg("--policy")
        .arg(&policy)
        .arg("--spool")
        .arg(dir.path().join("spool"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "broken policy must not start: {stderr}"
    );
    assert!(
        stderr.contains("broken.lua"),
        "error should name the file: {stderr}"
    );
    assert!(
        stderr.contains(":3:") || stderr.contains(":2:"),
        "error should carry the line: {stderr}"
    );
}
