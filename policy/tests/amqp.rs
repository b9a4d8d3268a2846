//! AMQP against a real RabbitMQ: seed 002 verbatim, plus the failure statuses.
//! RabbitMQ must be running (`bash tests/run.sh` starts it); these tests fail, not skip,
//! when it is not.

mod common;

use std::time::Duration;

use futures::future::join_all;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ConnectionProperties};
use policy::{Policy, PolicyError, PolicyMessage, SendOutcome};

fn amqp_url() -> String {
    std::env::var("SPOOLRELAY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A channel with `queue` declared (durable) and purged.
async fn fresh_queue(queue: &str) -> (lapin::Connection, Channel) {
    let url = amqp_url();
    let conn = tokio::time::timeout(Duration::from_secs(10), lapin::Connection::connect(&url, ConnectionProperties::default()))
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("RabbitMQ is not reachable at {url}: {e}. Run `bash tests/run.sh` (it installs and starts RabbitMQ)."));
    let channel = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), durable, FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    (conn, channel)
}

/// Up to `expect` messages from `queue`, waiting at most `patience` for them.
async fn drain_within(
    channel: &Channel,
    queue: &str,
    expect: usize,
    patience: Duration,
) -> Vec<Vec<u8>> {
    drain_props(channel, queue, expect, patience)
        .await
        .into_iter()
        .map(|(data, _)| data)
        .collect()
}

async fn drain(channel: &Channel, queue: &str, expect: usize) -> Vec<Vec<u8>> {
    drain_within(channel, queue, expect, Duration::from_secs(10)).await
}

/// Payloads with their delivery mode.
async fn drain_props(
    channel: &Channel,
    queue: &str,
    expect: usize,
    patience: Duration,
) -> Vec<(Vec<u8>, Option<u8>)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + patience;
    while got.len() < expect && tokio::time::Instant::now() < deadline {
        let get = BasicGetOptions { no_ack: true };
        match channel.basic_get(queue.into(), get).await.unwrap() {
            Some(m) => got.push((
                m.delivery.data.clone(),
                *m.delivery.properties.delivery_mode(),
            )),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    got
}

const N: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_002_verbatim_publishes_every_payload_byte_for_byte() {
    let (_conn, channel) = fresh_queue("logging").await;
    let policy =
        Policy::from_source("seed002.lua", &common::amqp_seed_lua()).expect("seed 002 loads");
    let conn = policy
        .connect("amqp")
        .await
        .expect("connect to amqp://localhost");

    let sends = (0..N).map(|i| conn.send(common::message(i, common::binary_payload(i))));
    for (i, outcome) in join_all(sends).await.into_iter().enumerate() {
        match outcome {
            SendOutcome::Delivered { response } => {
                assert_eq!(response, r#"250 {"status":"Ack"}"#, "message {i}")
            }
            other => panic!("message {i} not delivered: {other:?}"),
        }
    }
    conn.close().await;

    let got = drain_props(&channel, "logging", N, Duration::from_secs(10)).await;
    assert_eq!(got.len(), N, "consumed {} of {N}", got.len());
    assert!(
        got.iter().all(|(_, mode)| *mode == Some(2)),
        "messages must be persistent"
    );
    let mut got: Vec<Vec<u8>> = got.into_iter().map(|(data, _)| data).collect();
    got.sort();
    let mut sent: Vec<Vec<u8>> = (0..N).map(common::binary_payload).collect();
    sent.sort();
    assert_eq!(got, sent);
    // nothing extra
    assert!(
        drain_within(&channel, "logging", 1, Duration::from_millis(300))
            .await
            .is_empty()
    );
}

/// Like seed 002, but the URL, routing key, mandatory flag and confirms are steerable.
fn steerable_policy(url: &str, confirm: bool) -> Policy {
    let src = format!(
        r#"
kumo.on('get_queue_config', function(domain)
  return kumo.make_queue_config {{ protocol = {{ custom_lua = {{ constructor = 'make.amqp' }} }}, send_timeout = '10s' }}
end)
kumo.on('make.amqp', function()
  local client = kumo.amqp.build_client {{ url = {url:?}, confirm = {confirm} }}
  local sender = {{}}
  function sender:send(message)
    if message:get_meta('close_first') then client:close() end
    local confirm = client:publish {{
      routing_key = message:get_meta('routing_key'),
      payload = message:get_data(),
      options = {{ mandatory = message:get_meta('mandatory') or false }},
      properties = {{ content_type = 'application/octet-stream' }},
    }}
    local result = confirm:wait()
    if result.status == 'Ack' or result.status == 'NotRequested' then
      return string.format('250 %s', kumo.json_encode(result))
    end
    kumo.reject(500, kumo.json_encode(result))
  end
  return sender
end)
"#
    );
    Policy::from_source("steer.lua", &src).unwrap()
}

fn steer(routing_key: &str, mandatory: bool, close_first: bool) -> PolicyMessage {
    let mut m = common::message(1, b"hello".to_vec());
    m.meta.insert("routing_key".into(), routing_key.into());
    m.meta.insert("mandatory".into(), mandatory.into());
    if close_first {
        m.meta.insert("close_first".into(), true.into());
    }
    m
}

#[tokio::test]
async fn unroutable_mandatory_publish_is_returned_not_acked() {
    let _ = fresh_queue("spoolrelay.policy.routable").await;
    let conn = steerable_policy(&amqp_url(), true)
        .connect("amqp")
        .await
        .unwrap();
    let out = conn
        .send(steer("spoolrelay.policy.nowhere", true, false))
        .await;
    match out {
        SendOutcome::Permanent {
            code: 500,
            response,
        } => {
            assert!(response.contains(r#""status":"Returned""#), "{response}");
            assert!(response.contains(r#""reply_code":312"#), "{response}");
            assert!(response.contains("NO_ROUTE"), "{response}");
        }
        other => panic!("expected a Permanent 'Returned' rejection, got {other:?}"),
    }
    // The same client still delivers a routable message.
    let ok = conn
        .send(steer("spoolrelay.policy.routable", true, false))
        .await;
    assert!(ok.is_delivered(), "{ok:?}");
    conn.close().await;
}

#[tokio::test]
async fn publish_after_close_is_not_delivered() {
    let _ = fresh_queue("spoolrelay.policy.closed").await;
    let conn = steerable_policy(&amqp_url(), true)
        .connect("amqp")
        .await
        .unwrap();
    let out = conn
        .send(steer("spoolrelay.policy.closed", false, true))
        .await;
    match out {
        SendOutcome::Transient { response, .. } => {
            assert!(response.contains("steer.lua:"), "{response}")
        }
        other => panic!("expected Transient, got {other:?}"),
    }
}

#[tokio::test]
async fn unreachable_broker_fails_the_constructor() {
    let err = steerable_policy("amqp://guest:guest@127.0.0.1:1/%2f", true)
        .connect("amqp")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PolicyError::Constructor { .. }), "{text}");
    assert!(
        text.contains("'make.amqp'") && text.contains("cannot connect"),
        "{text}"
    );
}

#[tokio::test]
async fn confirms_off_reports_not_requested() {
    let (_c, channel) = fresh_queue("spoolrelay.policy.noconfirm").await;
    let conn = steerable_policy(&amqp_url(), false)
        .connect("amqp")
        .await
        .unwrap();
    let out = conn
        .send(steer("spoolrelay.policy.noconfirm", false, false))
        .await;
    assert_eq!(
        out,
        SendOutcome::Delivered {
            response: r#"250 {"status":"NotRequested"}"#.into()
        }
    );
    conn.close().await;
    assert_eq!(
        drain(&channel, "spoolrelay.policy.noconfirm", 1).await,
        vec![b"hello".to_vec()]
    );
}

/// A real broker Nack: a queue capped at one message with `x-overflow = reject-publish`
/// makes RabbitMQ nack the second publish. Seed 002's rule then rejects it (not delivered).
#[tokio::test]
async fn a_broker_nack_is_not_delivered() {
    let queue = "spoolrelay.policy.full";
    let (_c, channel) = fresh_queue("spoolrelay.policy.bootstrap").await;
    // Arguments are part of a queue's identity: start from a fresh one.
    let _ = channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declare the capped queue");
    let conn = steerable_policy(&amqp_url(), true)
        .connect("amqp")
        .await
        .unwrap();
    let first = conn.send(steer(queue, false, false)).await;
    assert!(first.is_delivered(), "the first fits: {first:?}");
    match conn.send(steer(queue, false, false)).await {
        SendOutcome::Permanent {
            code: 500,
            response,
        } => {
            assert!(response.contains(r#""status":"Nack""#), "{response}")
        }
        other => panic!("expected the broker's Nack as a rejection, got {other:?}"),
    }
    conn.close().await;
    assert_eq!(
        drain(&channel, queue, 2).await.len(),
        1,
        "only the acked one is queued"
    );
}
