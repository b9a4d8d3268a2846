//! RabbitMQ's read-back side for tests: the broker at `SPOOLRELAY_TEST_AMQP_URL`
//! (`tests/run.sh` starts one on 127.0.0.1:5672).

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

/// The test broker's URL.
pub fn url() -> String {
    std::env::var("SPOOLRELAY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Connects and declares the durable queue `name`, keeping what it holds.
pub async fn declared_queue(name: &str) -> (Connection, Channel) {
    let url = url();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ unreachable at {url} (run tests/run.sh): {e}"));
    let channel = conn.create_channel().await.expect("AMQP channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(name.into(), durable, FieldTable::default())
        .await
        .expect("declare the AMQP queue");
    (conn, channel)
}

/// Connects, declares the durable queue `name` and empties it.
pub async fn fresh_queue(name: &str) -> (Connection, Channel) {
    let (conn, channel) = declared_queue(name).await;
    channel
        .queue_purge(name.into(), QueuePurgeOptions::default())
        .await
        .expect("purge the AMQP queue");
    (conn, channel)
}

/// Takes every message of queue `name` until none came for `idle`.
pub async fn take_all(channel: &Channel, name: &str, idle: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < idle {
        match channel
            .basic_get(name.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            Some(msg) => {
                got.push(msg.delivery.data);
                last = Instant::now();
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    got
}
