//! Failed sends keep the message and try again: a 4xx rejection, a send that hangs past
//! `send_timeout`, and a 5xx that dead-letters. Every message arrives, none twice.

mod common;

use std::time::Duration;

use serde_json::json;

async fn push(daemon: &spoolrelay::Daemon, queue: &str, payloads: &[String]) {
    let body: String = payloads
        .iter()
        .map(|p| format!("{}\n", json!({"data": p})))
        .collect();
    let resp = reqwest::Client::new()
        .post(common::url(
            daemon,
            &format!("/api/v1/queues/{queue}/batch"),
        ))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

fn sorted_bytes(payloads: &[String]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = payloads.iter().map(|p| p.clone().into_bytes()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_messages_are_retried_with_backoff_until_delivered() {
    let kafka = common::MockKafka::start("relay.requeue", 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prelude = "if message:num_attempts() < 2 then kumo.reject(451, 'not yet') end";
    let daemon = common::start(
        &common::kafka_policy(&kafka.brokers, &kafka.topic, prelude, ""),
        dir.path(),
    )
    .await;
    let payloads: Vec<String> = (0..500).map(|i| format!("requeue {i}")).collect();
    let started = std::time::Instant::now();
    push(&daemon, "retry.me", &payloads).await;

    let got = common::consume_sorted(&kafka, payloads.len()).await;
    assert_eq!(got, sorted_bytes(&payloads));
    // Two rejections: at least retry_interval (100 ms) + 2 * retry_interval before delivery.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "retries did not back off"
    );
    common::wait_until("spool to empty", Duration::from_secs(10), || {
        common::queued(&daemon) == 0
    })
    .await;
    assert_eq!(daemon.spool.stats(spool::now_ms()).dead_letter, 0);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_that_hangs_past_send_timeout_is_retried() {
    let kafka = common::MockKafka::start("relay.timeout", 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prelude = "if message:num_attempts() == 0 then kumo.sleep(30) end";
    let lua = common::kafka_policy(
        &kafka.brokers,
        &kafka.topic,
        prelude,
        "send_timeout = '500ms',",
    );
    let daemon = common::start(&lua, dir.path()).await;
    let payloads: Vec<String> = (0..50).map(|i| format!("slow {i}")).collect();
    let started = std::time::Instant::now();
    push(&daemon, "slow", &payloads).await;

    let got = common::consume_sorted(&kafka, payloads.len()).await;
    assert_eq!(got, sorted_bytes(&payloads));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the hung sends were not cut off"
    );
    common::wait_until("spool to empty", Duration::from_secs(10), || {
        common::queued(&daemon) == 0
    })
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permanent_failures_are_dead_lettered_and_kept() {
    let kafka = common::MockKafka::start("relay.dead", 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prelude =
        "if message:get_data():find('poison') then kumo.reject(550, 'refused for good') end";
    let lua = common::kafka_policy(
        &kafka.brokers,
        &kafka.topic,
        prelude,
        "on_permanent_failure = 'dead_letter',",
    );
    let daemon = common::start(&lua, dir.path()).await;
    let good: Vec<String> = (0..20).map(|i| format!("good {i}")).collect();
    let mut all = good.clone();
    all.extend((0..5).map(|i| format!("poison {i}")));
    push(&daemon, "mixed", &all).await;

    let got = common::consume_sorted(&kafka, good.len()).await;
    assert_eq!(got, sorted_bytes(&good));
    common::wait_until("spool to empty", Duration::from_secs(10), || {
        common::queued(&daemon) == 0
    })
    .await;
    let dead = daemon.spool.dead_letters().unwrap();
    assert_eq!(dead.len(), 5);
    assert!(dead.iter().all(|m| m
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("550 refused for good")));
    daemon.stop().await.unwrap();
}
