//! Draining a node (`POST /api/admin/drain`), against the real binary: ingest and
//! readiness turn 503 at once, delivery goes on (retries due before the deadline
//! included), and the process exits with the code that says what is left:
//! 0 drained, 3 leftovers (suspended, due after the deadline, dead letters), 4 deadline.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// One sender, its fate by queue (the domain): `dead` is refused for good (dead-lettered),
/// `later` is retried in an hour, `failing` every 300 ms for ever; every other queue fails
/// its first attempt and is delivered on the retry 300 ms later.
const POLICY: &str = r#"
kumo.on('get_queue_config', function(domain)
  local interval = '300ms'
  if domain == 'later' then interval = '1h' end
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.sender' } },
    retry_interval = interval,
    max_retry_interval = interval,
    on_permanent_failure = 'dead_letter',
  }
end)
kumo.on('make.sender', function(domain)
  local sender = {}
  function sender:send(message)
    if domain == 'dead' then kumo.reject(550, 'refused for good') end
    if domain == 'later' or domain == 'failing' then kumo.reject(451, 'not now') end
    if message:num_attempts() == 0 then kumo.reject(451, 'first try fails') end
    return '250 ok'
  end
  return sender
end)
"#;

struct Relay {
    child: Child,
    port: u16,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Relay {
    async fn start() -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.lua");
        std::fs::write(&policy, POLICY).unwrap();
        let port = common::free_port();
        let child = common::relay_command(&policy, &dir.path().join("spool"), port)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn spoolrelay");
        common::wait_live(port).await;
        Relay {
            child,
            port,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn post(&self, queue: &str, n: usize) {
        for i in 0..n {
            let r = self
                .http
                .post(self.url(&format!("/api/v1/queues/{queue}/messages")))
                .body(format!("{queue}-{i}"))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{queue}-{i}: {}", r.status());
        }
    }

    async fn stats(&self) -> Value {
        let r = self.http.get(self.url("/api/v1/stats")).send().await;
        r.unwrap().json().await.unwrap()
    }

    /// Starts the drain; the answer is the drain's state (`?wait=30s`: at its end).
    async fn drain(&self, deadline: &str, query: &str) -> Value {
        let r = self
            .http
            .post(self.url(&format!("/api/admin/drain{query}")))
            .json(&json!({ "deadline": deadline }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "POST /api/admin/drain");
        r.json().await.unwrap()
    }

    /// The drain's final report (`GET /api/admin/drain?wait=`), read before the exit.
    async fn report(&self) -> Value {
        let r = self.http.get(self.url("/api/admin/drain?wait=30s")).send();
        r.await.unwrap().json().await.unwrap()
    }

    async fn exit_code(&mut self) -> i32 {
        let status = common::wait_exit(&mut self.child, "drained relay", Duration::from_secs(30));
        status.await.code().expect("exited, not killed")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for(what: &str, relay: &Relay, cond: impl Fn(&Value) -> bool) {
    let start = std::time::Instant::now();
    while !cond(&relay.stats().await) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_traffic_delivers_retries_and_exits_0() {
    let mut relay = Relay::start().await;
    relay.post("ok", 20).await;
    let started = relay.drain("30s", "").await;
    assert_eq!(started["draining"], true, "{started}");
    // Some messages still wait for their retry: the drain must deliver them to exit 0.
    let waiting = started["remaining"]["deliverable"].as_u64().unwrap();
    assert!(waiting > 0, "{started}");

    // At once: not ready, and ingest refused with Retry-After.
    let ready = relay.http.get(relay.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("draining"),
        "{body}"
    );
    let refused = relay
        .http
        .post(relay.url("/api/v1/queues/ok/messages"))
        .body("late")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let batch = relay.http.post(relay.url("/api/v1/queues/ok/batch"));
    let batch = batch.body("{\"data\":\"x\"}\n").send().await.unwrap();
    assert_eq!(batch.status(), 503, "batch ingest is refused too");
    // A second drain request changes nothing.
    let again = relay.http.post(relay.url("/api/admin/drain")).send().await;
    assert_eq!(again.unwrap().status(), 200);

    // Every message failed its first attempt: they leave only through a retry.
    let report = relay.report().await;
    assert_eq!(report["outcome"], "drained", "{report}");
    assert_eq!(report["remaining"]["deliverable"], 0, "{report}");
    assert_eq!(relay.exit_code().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_reports_leftovers_and_exits_3() {
    let mut relay = Relay::start().await;
    let suspend = relay.http.post(relay.url("/api/admin/queues/held/suspend"));
    assert!(suspend.send().await.unwrap().status().is_success());
    relay.post("held", 3).await;
    relay.post("later", 4).await;
    relay.post("dead", 2).await;
    relay.post("ok", 5).await;
    wait_for("later tried once and dead dead-lettered", &relay, |s| {
        s["dead_letter"] == 2 && s["queues"]["later"]["attempts"]["1"] == 4
    })
    .await;
    // Nothing is deliverable: the drain ends at once, so the request itself waits for the
    // report (a later GET could find the daemon gone).
    let report = relay.drain("30s", "?wait=30s").await;
    assert_eq!(report["outcome"], "leftovers", "{report}");
    assert_eq!(report["exit_code"], 3, "{report}");
    let left = &report["remaining"];
    assert_eq!(left["suspended"], json!({ "held": 3 }), "{report}");
    assert_eq!(left["past_deadline"], json!({ "later": 4 }), "{report}");
    assert_eq!(left["dead_letter"], 2, "{report}");
    assert_eq!(left["deliverable"], 0, "{report}");
    assert_eq!(relay.exit_code().await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_passing_first_exits_4() {
    let mut relay = Relay::start().await;
    relay.post("failing", 3).await;
    let start = std::time::Instant::now();
    let report = relay.drain("2s", "?wait=30s").await;
    assert_eq!(report["outcome"], "deadline_passed", "{report}");
    // At the deadline a failed message waits for its next retry (past the deadline) or is
    // in flight (deliverable): either way, unfinished work.
    let left = &report["remaining"];
    let unfinished = left["deliverable"].as_u64().unwrap()
        + left["past_deadline"]["failing"].as_u64().unwrap_or(0);
    assert_eq!(unfinished, 3, "{report}");
    assert_eq!(relay.exit_code().await, 4);
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "it stopped before its deadline"
    );
}

/// `spoolctl drain --wait` follows a drain with `GET ?wait=` requests one after another. A
/// drain that ends between two of them must still be answered: the daemon keeps its
/// listener open for a moment after the outcome (`OUTCOME_LINGER`), then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outcome_is_still_answered_after_the_drain_ended() {
    let mut relay = Relay::start().await;
    // Nothing queued: the drain ends at its first look, with no request waiting for it.
    let started = relay.drain("1m", "").await;
    assert!(started["outcome"].is_null(), "{started}");
    tokio::time::sleep(spoolrelay::drain::POLL * 2).await;
    let late = relay.http.get(relay.url("/api/admin/drain")).send().await;
    let late: Value = late
        .expect("the listener stays open after the outcome")
        .json()
        .await
        .unwrap();
    assert_eq!(late["outcome"], "drained", "{late}");
    assert_eq!(relay.exit_code().await, 0);
}
