//! The main path against a real Kafka-protocol broker (librdkafka's mock cluster on TCP):
//! 10 000 messages over all three ingest endpoints arrive byte for byte, once, and the
//! spool is empty afterwards.

mod common;

use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const SINGLE: usize = 2_000;
const BATCHES: usize = 70;
const PER_BATCH: usize = 100;
const INJECTS: usize = 100;
const RECIPIENTS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_accepted_message_reaches_kafka_byte_for_byte() {
    let kafka = common::MockKafka::start("relay.e2e", 4).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lua = common::kafka_policy(&kafka.brokers, &kafka.topic, "", "");
    let daemon = common::start(&lua, dir.path()).await;
    let http = reqwest::Client::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut sent: Vec<Vec<u8>> = Vec::new();

    // 1. Single-message endpoint, binary bodies, 32 requests at a time.
    let singles: Vec<Vec<u8>> = (0..SINGLE)
        .map(|i| {
            let mut body = format!("single {i} ").into_bytes();
            body.extend((0..rng.gen_range(0..64)).map(|_| rng.gen::<u8>()));
            body
        })
        .collect();
    let single_url = common::url(&daemon, "/api/v1/queues/events.single/messages");
    let answers: Vec<Value> = futures::stream::iter(singles.clone())
        .map(|body| {
            let req = http
                .post(&single_url)
                .header("X-Meta-Source", "test")
                .body(body);
            async move {
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.json::<Value>().await.unwrap()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(answers
        .iter()
        .all(|a| a["id"].as_str().unwrap().parse::<u64>().is_ok()));
    sent.extend(singles);

    // 2. NDJSON batches: half text, half binary through data_b64, with metadata.
    let batch_url = common::url(&daemon, "/api/v1/queues/events.batch/batch");
    for b in 0..BATCHES {
        let mut body = String::new();
        for i in 0..PER_BATCH {
            let line = if i % 2 == 0 {
                let text = format!("batch {b}/{i} text ünïcode");
                sent.push(text.clone().into_bytes());
                json!({"data": text, "meta": {"n": i, "tags": ["a", "b"]}})
            } else {
                let bytes: Vec<u8> = (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect();
                let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
                sent.push(bytes);
                json!({"data_b64": b64})
            };
            body.push_str(&line.to_string());
            body.push('\n');
        }
        let resp = http.post(&batch_url).body(body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let ids: Value = resp.json().await.unwrap();
        assert_eq!(ids["ids"].as_array().unwrap().len(), PER_BATCH);
    }

    // 3. KumoMTA injection: one message per recipient, queued by recipient domain.
    let inject_url = common::url(&daemon, "/api/inject/v1");
    for n in 0..INJECTS {
        let content = format!("Subject: inject {n}\r\n\r\nhello {n}\r\n");
        let recipients: Vec<Value> = (0..RECIPIENTS)
            .map(|r| json!({"email": format!("user{r}@example{}.com", r % 3), "metadata": {"tenant": "t1"}}))
            .collect();
        let req = json!({"envelope_sender": "sender@example.org", "recipients": recipients, "content": content});
        let resp = http.post(&inject_url).json(&req).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["success_count"], RECIPIENTS);
        assert_eq!(answer["fail_count"], 0);
        sent.extend((0..RECIPIENTS).map(|_| content.clone().into_bytes()));
    }
    assert_eq!(sent.len(), 10_000);

    let got = common::consume_sorted(&kafka, sent.len()).await;
    sent.sort();
    assert_eq!(got.len(), sent.len(), "messages missing from Kafka");
    assert!(got == sent, "Kafka payloads differ from what was accepted");
    common::wait_until("spool to empty", Duration::from_secs(20), || {
        common::queued(&daemon) == 0
    })
    .await;
    let stats = daemon.spool.stats(spool::now_ms());
    assert_eq!(stats.dead_letter, 0);
    daemon.stop().await.unwrap();
}
