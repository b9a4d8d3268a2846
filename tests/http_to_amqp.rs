//! The AMQP example from the KumoMTA docs (seed 002), run verbatim against a real RabbitMQ:
//! what HTTP accepted for queue `amqp` is published to queue `logging`, byte for byte.
//! RabbitMQ must be running (tests/run.sh starts it); this test fails, not skips, without it.

mod common;

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

const SEED_NAME: &str = "002_eeb8a230251de371.txt";

/// Seed 002 from `shared/seeds` beside the repository, else its copy in
/// `policy/tests/seeds` (byte-identical; see policy/tests/common).
fn seed_path() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared/seeds").join(SEED_NAME);
    if shared.is_file() {
        shared
    } else {
        root.join("policy/tests/seeds").join(SEED_NAME)
    }
}

/// The seed's two Lua blocks, verbatim: `get_queue_config` through its `end)`, and the
/// `make.amqp` handler from its leading comment through the `end)` before the closing prose.
fn seed_policy() -> String {
    let path = seed_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let find = |from: usize, pred: &dyn Fn(&str) -> bool| {
        (from..lines.len())
            .find(|&i| pred(lines[i]))
            .unwrap_or_else(|| panic!("seed layout changed"))
    };
    let a = find(0, &|l| l.starts_with("kumo.on('get_queue_config'"));
    let a_end = find(a, &|l| l == "end)");
    let b = find(a_end, &|l| l.starts_with("-- This is a user-defined event"));
    let prose = find(b, &|l| l.starts_with("See the AMQP section"));
    let b_end = (b..prose)
        .rev()
        .find(|&i| lines[i] == "end)")
        .expect("end) before prose");
    let mut lua = lines[a..=a_end].join("\n");
    lua.push('\n');
    lua.push_str(&lines[b..=b_end].join("\n"));
    lua.push('\n');
    lua
}

fn amqp_url() -> String {
    std::env::var("SPOOLRELAY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[test]
fn seed_lua_is_extracted_whole() {
    let lua = seed_policy();
    assert!(lua.starts_with("kumo.on('get_queue_config'"));
    assert!(lua.contains("constructor = 'make.amqp'"));
    assert!(lua.contains("function sender:close()"));
    assert!(lua.trim_end().ends_with("end)"));
    assert!(!lua.contains("See the AMQP"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_002_policy_delivers_to_rabbitmq() {
    let url = amqp_url();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ unreachable at {url} (run tests/run.sh): {e}"));
    let channel = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare("logging".into(), durable, FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_purge("logging".into(), QueuePurgeOptions::default())
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(&seed_policy(), dir.path()).await;
    let http = reqwest::Client::new();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for i in 0..200u32 {
        let body = [
            format!("amqp single {i} ").as_bytes(),
            &i.to_le_bytes(),
            &[0, 255],
        ]
        .concat();
        let resp = http
            .post(common::url(&daemon, "/api/v1/queues/amqp/messages"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        sent.push(body);
    }
    let batch: String = (0..300)
        .map(|i| {
            let text = format!("amqp batch {i}");
            sent.push(text.clone().into_bytes());
            format!("{}\n", json!({"data": text}))
        })
        .collect();
    let resp = http
        .post(common::url(&daemon, "/api/v1/queues/amqp/batch"))
        .body(batch)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < sent.len() && Instant::now() < deadline {
        match channel
            .basic_get("logging".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(msg) => got.push(msg.delivery.data),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    common::wait_until("spool to empty", Duration::from_secs(20), || {
        common::queued(&daemon) == 0
    })
    .await;
    // Anything more would be a duplicate.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Some(msg) = channel
        .basic_get("logging".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(msg.delivery.data);
    }
    got.sort();
    sent.sort();
    assert_eq!(
        got.len(),
        sent.len(),
        "RabbitMQ got a different number of messages"
    );
    assert!(
        got == sent,
        "RabbitMQ payloads differ from what was accepted"
    );
    daemon.stop().await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}
