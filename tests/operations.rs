//! What an operator relies on while the daemon runs: suspend/resume, requeue through the
//! admin API, metrics that count what happened, the delivery log, and the admin API's
//! protection. The policy's sender is pure Lua (no broker), so only the relay is tested.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use spoolrelay::delivery_log::{LogRecord, RecordType};

/// Delivers everything, except: data containing `flaky` fails once with 451, and data
/// containing `poison` is refused with 550 the first time this connection sees it (the
/// queue dead-letters it), then accepted. One connection per queue here (far below 256 in
/// flight), kept open while the test runs (idle timeout 60 s), so `seen` is stable.
const SINK: &str = r#"
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.sink' } },
    retry_interval = '100ms',
    max_retry_interval = '400ms',
    on_permanent_failure = 'dead_letter',
  }
end)
kumo.on('make.sink', function(domain, tenant, campaign)
  local seen = {}
  local sender = {}
  function sender:send(message)
    local data = message:get_data()
    if data:find('flaky') and message:num_attempts() == 0 then
      kumo.reject(451, 'not yet')
    end
    if data:find('poison') and not seen[message:id()] then
      seen[message:id()] = true
      kumo.reject(550, 'refused once')
    end
    return '250 ok'
  end
  function sender:close() end
  return sender
end)
"#;

const LIMIT: Duration = Duration::from_secs(15);

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn push(daemon: &spoolrelay::Daemon, queue: &str, payloads: &[String]) -> Vec<String> {
    let body: String = payloads
        .iter()
        .map(|p| format!("{}\n", json!({"data": p})))
        .collect();
    let resp = client()
        .post(common::url(
            daemon,
            &format!("/api/v1/queues/{queue}/batch"),
        ))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    serde_json::from_value(v["ids"].clone()).unwrap()
}

async fn admin_post(daemon: &spoolrelay::Daemon, path: &str, body: Value) -> Value {
    let resp = client()
        .post(common::url(daemon, path))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "POST {path}");
    resp.json().await.unwrap()
}

async fn get(daemon: &spoolrelay::Daemon, path: &str) -> (u16, String) {
    let resp = client()
        .get(common::url(daemon, path))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// `name{labels}` → value, from a Prometheus text exposition.
fn scrape_values(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn metrics(daemon: &spoolrelay::Daemon) -> HashMap<String, f64> {
    let (status, text) = get(daemon, "/metrics").await;
    assert_eq!(status, 200);
    scrape_values(&text)
}

/// `/metrics` read by a real Prometheus text parser (`prometheus-parse`): every sample
/// line is understood, and the histograms (send latency, batch size, ingest to delivery,
/// fsync latency, writes per group commit) come out as histograms with cumulative buckets
/// whose `+Inf` bucket equals `_count`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_with_a_prometheus_parser_histograms_included() {
    use prometheus_parse::{Scrape, Value as P};
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(SINK, &dir.path().join("spool")).await;
    let mut payloads: Vec<String> = (0..8).map(|i| format!("plain {i}")).collect();
    payloads.extend((0..2).map(|i| format!("flaky {i}")));
    push(&daemon, "parsed", &payloads).await;
    common::wait_until("the spool to empty", LIMIT, || common::queued(&daemon) == 0).await;

    let resp = client()
        .get(common::url(&daemon, "/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();

    // Nothing skipped: each sample line is one sample or one bucket of a histogram (the
    // parser reads a histogram's `_sum` and `_count` as samples of their own).
    let sample_lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    let parsed: usize = scrape
        .samples
        .iter()
        .map(|s| match &s.value {
            P::Histogram(b) => b.len(),
            _ => 1,
        })
        .sum();
    assert_eq!(parsed, sample_lines, "{text}");

    let value = |metric: &str, queue: Option<&str>| -> &P {
        &scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && s.labels.get("queue") == queue)
            .unwrap_or_else(|| panic!("{metric} {queue:?} not in the scrape:\n{text}"))
            .value
    };
    let count_of = |name: &str| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == format!("{name}_count"))
            .map(|s| match s.value {
                P::Untyped(v) | P::Counter(v) | P::Gauge(v) => v,
                _ => panic!("{name}_count is a number"),
            })
            .unwrap()
    };
    for (name, queue, at_least) in [
        ("spoolrelay_send_latency_seconds", Some("parsed"), 12.0),
        ("spoolrelay_send_batch_size", Some("parsed"), 1.0),
        (
            "spoolrelay_ingest_to_delivery_seconds",
            Some("parsed"),
            10.0,
        ),
        ("spoolrelay_spool_fsync_duration_seconds", None, 1.0),
        ("spoolrelay_spool_commit_batch_size", None, 1.0),
    ] {
        let P::Histogram(buckets) = value(name, queue) else {
            panic!(
                "{name} is a histogram to the parser: {:?}",
                value(name, queue)
            );
        };
        assert!(buckets.len() > 5, "{name}: {buckets:?}");
        assert!(
            buckets
                .windows(2)
                .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count),
            "{name}: buckets are cumulative: {buckets:?}"
        );
        let inf = buckets.last().unwrap();
        assert!(inf.less_than.is_infinite(), "{name}: {buckets:?}");
        assert!(inf.count >= at_least, "{name}: {buckets:?}");
        assert_eq!(inf.count, count_of(name), "{name}: +Inf bucket = _count");
    }
    // Exactly one latency observation per attempt: 10 deliveries + 2 retried failures.
    assert_eq!(count_of("spoolrelay_send_latency_seconds"), 12.0);
    assert_eq!(count_of("spoolrelay_ingest_to_delivery_seconds"), 10.0);
    // Counters and gauges keep the names dashboards use.
    assert!(
        matches!(value("spoolrelay_delivered_total", Some("parsed")), P::Untyped(v) | P::Counter(v) if *v == 10.0)
    );
    assert!(matches!(value("spoolrelay_queue_depth", Some("parsed")), P::Gauge(v) if *v == 0.0));
    assert!(matches!(value("spoolrelay_spool_bytes", None), P::Gauge(_)));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_delivery_log_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("delivery.jsonl");
    let path = log_path.clone();
    let daemon = common::start_with(SINK, &dir.path().join("spool"), move |c| {
        c.delivery_log = Some(path);
    })
    .await;
    let mut payloads: Vec<String> = (0..15).map(|i| format!("plain {i}")).collect();
    payloads.extend((0..5).map(|i| format!("flaky {i}")));
    let ids = push(&daemon, "ops", &payloads).await;
    common::wait_until("the spool to empty", LIMIT, || common::queued(&daemon) == 0).await;

    // Counters are bumped before the spool settles; the ack is what emptied the queue.
    let m = metrics(&daemon).await;
    let q = |name: &str| m[&format!("{name}{{queue=\"ops\"}}")];
    assert_eq!(q("spoolrelay_accepted_total"), 20.0);
    assert_eq!(q("spoolrelay_delivered_total"), 20.0);
    assert_eq!(q("spoolrelay_transient_failures_total"), 5.0);
    assert_eq!(q("spoolrelay_permanent_failures_total"), 0.0);
    assert_eq!(q("spoolrelay_dead_lettered_total"), 0.0);
    assert_eq!(q("spoolrelay_queue_depth"), 0.0);
    assert_eq!(q("spoolrelay_connections"), 1.0);
    assert_eq!(
        m["spoolrelay_send_latency_seconds_count{queue=\"ops\"}"],
        25.0
    );
    assert_eq!(
        m["spoolrelay_send_latency_seconds_bucket{le=\"+Inf\",queue=\"ops\"}"],
        25.0
    );
    assert!(m["spoolrelay_spool_commit_groups_total"] >= 1.0);
    assert!(m["spoolrelay_spool_commit_jobs_total"] >= m["spoolrelay_spool_commit_groups_total"]);
    assert_eq!(m["spoolrelay_delivery_log_dropped_total"], 0.0);
    daemon.stop().await.unwrap();

    // Stopping flushed the log: one Reception and one Delivery per message, one
    // TransientFailure per flaky one.
    let text = std::fs::read_to_string(&log_path).unwrap();
    let records: Vec<LogRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let count = |id: &str, kind: RecordType| {
        records
            .iter()
            .filter(|r| r.id == id && r.kind == kind)
            .count()
    };
    for id in &ids {
        assert_eq!(count(id, RecordType::Reception), 1, "reception of {id}");
        assert_eq!(count(id, RecordType::Delivery), 1, "delivery of {id}");
    }
    let transient: Vec<&LogRecord> = records
        .iter()
        .filter(|r| r.kind == RecordType::TransientFailure)
        .collect();
    assert_eq!(transient.len(), 5);
    assert!(transient
        .iter()
        .all(|r| r.code == Some(451) && r.attempt == 1 && r.queue == "ops"));
    assert_eq!(records.len(), 45);
    let delivery = records
        .iter()
        .find(|r| r.kind == RecordType::Delivery)
        .unwrap();
    assert_eq!(
        (delivery.code, delivery.response.as_str()),
        (Some(250), "250 ok")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_suspended_queue_accepts_but_does_not_deliver_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(SINK, dir.path()).await;
    let answer = admin_post(&daemon, "/api/admin/queues/held/suspend", json!({})).await;
    assert_eq!(answer["suspended"], true);
    let payloads: Vec<String> = (0..10).map(|i| format!("held {i}")).collect();
    push(&daemon, "held", &payloads).await;
    // Another queue is not affected.
    push(&daemon, "free", &["free 1".to_owned()]).await;
    common::wait_until("the free queue to drain", LIMIT, || {
        common::queued_in(&daemon, "free") == 0
    })
    .await;

    // Due, but untouched, for well over the worker's nap.
    for _ in 0..12 {
        let stats = daemon.spool.stats(spool::now_ms());
        let held = &stats.queues["held"];
        assert_eq!((held.count, held.due_now, held.leased), (10, 10, 0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, suspended) = get(&daemon, "/api/admin/suspended").await;
    let suspended = serde_json::from_str::<Value>(&suspended).unwrap();
    assert_eq!(suspended["suspended"], json!(["held"]), "{suspended}");
    assert_eq!(suspended["details"]["held"]["until_ms"], Value::Null);
    let m = metrics(&daemon).await;
    assert_eq!(m["spoolrelay_queue_suspended{queue=\"held\"}"], 1.0);
    assert_eq!(m["spoolrelay_queue_depth{queue=\"held\"}"], 10.0);
    assert_eq!(
        m.get("spoolrelay_delivered_total{queue=\"held\"}")
            .copied()
            .unwrap_or(0.0),
        0.0
    );

    let answer = admin_post(&daemon, "/api/admin/queues/held/resume", json!({})).await;
    assert_eq!(
        (answer["suspended"].clone(), answer["changed"].clone()),
        (false.into(), true.into())
    );
    common::wait_until("the resumed queue to drain", LIMIT, || {
        common::queued_in(&daemon, "held") == 0
    })
    .await;
    assert_eq!(
        metrics(&daemon).await["spoolrelay_delivered_total{queue=\"held\"}"],
        10.0
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requeue_moves_a_suspended_queue_to_another_route() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(SINK, dir.path()).await;
    admin_post(&daemon, "/api/admin/queues/stuck/suspend", json!({})).await;
    let payloads: Vec<String> = (0..5).map(|i| format!("stuck {i}")).collect();
    push(&daemon, "stuck", &payloads).await;
    let answer = admin_post(
        &daemon,
        "/api/admin/queues/stuck/requeue",
        json!({"to": "moved"}),
    )
    .await;
    assert_eq!(answer["count"], 5);
    common::wait_until("the moved messages to be delivered", LIMIT, || {
        common::queued(&daemon) == 0
    })
    .await;
    assert_eq!(
        metrics(&daemon).await["spoolrelay_delivered_total{queue=\"moved\"}"],
        5.0
    );
    let resp = client()
        .post(common::url(&daemon, "/api/admin/queues/stuck/requeue"))
        .body("{\"to\": 7}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "a bad body is refused");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_requeued_through_the_api_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(SINK, dir.path()).await;
    let payloads: Vec<String> = (0..3).map(|i| format!("poison {i}")).collect();
    let ids = push(&daemon, "dl", &payloads).await;
    common::wait_until("three dead letters", LIMIT, || {
        daemon.spool.stats(spool::now_ms()).dead_letter == 3
    })
    .await;
    assert_eq!(common::queued(&daemon), 0);

    let (status, shown) = get(&daemon, &format!("/api/admin/messages/{}", ids[0])).await;
    assert_eq!(status, 200);
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["last_error"], "550 refused once");
    assert_eq!(shown["queue"], "dl");
    assert_eq!(get(&daemon, "/api/admin/messages/999999").await.0, 404);
    assert_eq!(get(&daemon, "/api/admin/messages/x").await.0, 400);
    let m = metrics(&daemon).await;
    assert_eq!(m["spoolrelay_permanent_failures_total{queue=\"dl\"}"], 3.0);
    assert_eq!(m["spoolrelay_dead_lettered_total{queue=\"dl\"}"], 3.0);
    assert_eq!(m["spoolrelay_dead_letter_depth"], 3.0);

    let answer = admin_post(
        &daemon,
        "/api/admin/dead-letter/requeue",
        json!({"queue": "dl"}),
    )
    .await;
    assert_eq!(answer["count"], 3);
    common::wait_until("the requeued messages to be delivered", LIMIT, || {
        common::queued(&daemon) == 0
    })
    .await;
    assert_eq!(daemon.spool.stats(spool::now_ms()).dead_letter, 0);
    assert_eq!(
        metrics(&daemon).await["spoolrelay_delivered_total{queue=\"dl\"}"],
        3.0
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_is_required_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(SINK, dir.path(), |c| {
        c.admin_token = Some("s3cret".into());
    })
    .await;
    let url = common::url(&daemon, "/api/admin/queues");
    let status = |req: reqwest::RequestBuilder| async move { req.send().await.unwrap().status() };
    assert_eq!(status(client().get(&url)).await, 401);
    assert_eq!(status(client().get(&url).bearer_auth("wrong")).await, 401);
    assert_eq!(status(client().get(&url).bearer_auth("s3cret")).await, 200);
    let suspend = common::url(&daemon, "/api/admin/queues/q/suspend");
    assert_eq!(status(client().post(&suspend)).await, 401);
    // Ingest and metrics stay open.
    push(&daemon, "q", &["x".to_owned()]).await;
    assert_eq!(get(&daemon, "/metrics").await.0, 200);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_listener_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let policy = || policy::Policy::from_source("sink.lua", SINK).unwrap();
    let config = |token: Option<&str>, admin_api: bool| {
        let mut c = spoolrelay::Config::new(policy(), dir.path().to_path_buf());
        c.listen = "0.0.0.0:0".into();
        c.admin_token = token.map(Into::into);
        c.admin_api = admin_api;
        c
    };
    match spoolrelay::start(config(None, true), spoolrelay::Shutdown::new()).await {
        Ok(_) => panic!("started with an exposed admin API"),
        Err(e) => assert!(
            e.to_string()
                .contains("admin API would be exposed without a token"),
            "{e:#}"
        ),
    }
    // The refusal released the spool: the same directory starts with a token, or without
    // the admin API.
    for (token, admin_api) in [(Some("t"), true), (None, false)] {
        let daemon = spoolrelay::start(config(token, admin_api), spoolrelay::Shutdown::new())
            .await
            .expect("starts");
        daemon.stop().await.unwrap();
    }
}
