//! Suspensions that last (issue 14): kept in the spool, so a restart keeps a queue
//! suspended with its reason; one with an expiry ends by itself, without a resume.

mod common;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use spoolrelay::Daemon;

/// Every send is delivered at once: a message leaves the spool as soon as it is sent.
const DELIVER: &str = r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config { protocol = { custom_lua = { constructor = 'make.ok' } } }
end)
kumo.on('make.ok', function()
  local sender = {}
  function sender:send(message) return '250 ok' end
  return sender
end)
"#;

async fn admin(daemon: &Daemon, path: &str, body: Value) -> Value {
    let resp = reqwest::Client::new()
        .post(common::url(daemon, path))
        .json(&body)
        .send()
        .await
        .expect("admin API answers");
    assert_eq!(resp.status(), 200, "{path}");
    resp.json().await.expect("JSON")
}

async fn ingest(daemon: &Daemon, queue: &str) {
    let resp = reqwest::Client::new()
        .post(common::url(
            daemon,
            &format!("/api/v1/queues/{queue}/messages"),
        ))
        .body("m")
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(resp.status(), 200);
}

async fn restart(daemon: Daemon, dir: &Path) -> Daemon {
    daemon.stop().await.expect("daemon stops");
    common::start(DELIVER, dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_survives_a_restart_and_expires_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(DELIVER, dir.path()).await;
    let brief = admin(
        &daemon,
        "/api/admin/queues/brief/suspend",
        json!({"for": "4s", "reason": "broker maintenance"}),
    )
    .await;
    assert!(brief["until_ms"].as_u64().is_some(), "{brief}");
    admin(
        &daemon,
        "/api/admin/queues/held/suspend",
        json!({"reason": "until fixed"}),
    )
    .await;
    ingest(&daemon, "brief").await;
    ingest(&daemon, "held").await;

    let daemon = restart(daemon, dir.path()).await;
    let listed: Value = reqwest::get(common::url(&daemon, "/api/admin/suspended"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["suspended"], json!(["brief", "held"]), "{listed}");
    assert_eq!(listed["details"]["brief"]["reason"], "broker maintenance");
    assert_eq!(listed["details"]["held"]["until_ms"], Value::Null);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        (
            common::queued_in(&daemon, "brief"),
            common::queued_in(&daemon, "held")
        ),
        (1, 1),
        "suspended queues deliver nothing after the restart"
    );

    // `brief` ends by itself (4 s after it was set); `held` waits for its resume.
    common::wait_until(
        "brief's expiry to deliver it",
        Duration::from_secs(10),
        || common::queued_in(&daemon, "brief") == 0,
    )
    .await;
    assert_eq!(common::queued_in(&daemon, "held"), 1);
    let resumed = admin(&daemon, "/api/admin/queues/held/resume", json!({})).await;
    assert_eq!(resumed["changed"], true);
    common::wait_until("held to be delivered", Duration::from_secs(10), || {
        common::queued_in(&daemon, "held") == 0
    })
    .await;

    // A resume is kept too: after another restart nothing is suspended.
    let daemon = restart(daemon, dir.path()).await;
    let listed: Value = reqwest::get(common::url(&daemon, "/api/admin/suspended"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["suspended"], json!([]), "{listed}");
    daemon.stop().await.unwrap();
}
