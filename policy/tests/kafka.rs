//! Kafka: seed 000 as published (broken: it must fail clearly) and the corrected
//! policy/examples/kafka.lua against librdkafka's mock cluster.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::{Policy, PolicyError, SendOutcome};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

#[tokio::test]
async fn seed_000_loads_but_its_constructor_fails_clearly() {
    let src = common::kafka_seed_lua();
    let policy = Policy::from_source("seed000.lua", &src).expect("seed 000 loads");
    let config = policy.queue_config("kafka").await.unwrap();
    assert_eq!(config.constructor.as_deref(), Some("make.kafka"));

    let err = policy.connect("kafka").await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PolicyError::Constructor { .. }), "{text}");
    assert!(text.contains("'make.kafka'"), "{text}");
    let line = src
        .lines()
        .position(|l| l.contains("message:get_data()"))
        .unwrap()
        + 1;
    let expected = format!("seed000.lua:{line}: attempt to index a nil value (global 'message')");
    assert!(
        text.contains(&expected),
        "{text:?} should contain {expected:?}"
    );
}

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

const TOPIC: &str = "spoolrelay.test";
const PARTITIONS: i32 = 4;
const N: usize = 1000;
const BATCH: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_kafka_policy_delivers_1000_concurrent_sends_to_the_mock_cluster() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    cluster
        .create_topic(TOPIC, PARTITIONS, 3)
        .expect("create topic");
    let brokers = cluster.bootstrap_servers();
    // Only this test in this binary reads these variables.
    std::env::set_var("SPOOLRELAY_KAFKA_BROKERS", &brokers);
    std::env::set_var("SPOOLRELAY_KAFKA_TOPIC", TOPIC);

    let policy = Policy::load(&example("kafka.lua")).expect("example loads");
    let conn = Arc::new(policy.connect("kafka").await.expect("connect"));

    // Warm up: the first delivery after producer start is slow (~0.5 s).
    let first = conn
        .send(common::message(N, common::binary_payload(N)))
        .await;
    assert!(first.is_delivered(), "{first:?}");

    let start = Instant::now();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move {
                conn.send(common::message(i, common::binary_payload(i)))
                    .await
            })
        })
        .collect();
    for t in tasks {
        match t.await.unwrap() {
            SendOutcome::Delivered { response } => {
                assert!(
                    response.starts_with(&format!("250 {TOPIC} partition=")),
                    "{response}"
                )
            }
            other => panic!("not delivered: {other:?}"),
        }
    }
    // Not asserted (speed is the benchmark's business, docs/performance.md): one await
    // at a time with linger.ms=5 would take >= 5 s here, pipelined well under one.
    eprintln!("{N} concurrent sends took {:?}", start.elapsed());

    // The example's send_batch (the dispatcher uses it: batch_size = 100): one result
    // per message.
    let batch: Vec<_> = (N + 1..N + 1 + BATCH)
        .map(|i| common::message(i, common::binary_payload(i)))
        .collect();
    for (i, out) in conn.send_batch(batch).await.into_iter().enumerate() {
        match out {
            SendOutcome::Delivered { response } => assert_eq!(response, format!("250 {TOPIC}")),
            other => panic!("batch message {i} not delivered: {other:?}"),
        }
    }

    let conn = Arc::try_unwrap(conn).expect("all tasks done");
    conn.close().await;

    // Read everything back, byte for byte.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "policy-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let total = N + 1 + BATCH;
    while got.len() < total && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            got.push(m.unwrap().payload().unwrap_or_default().to_vec());
        }
    }
    assert_eq!(
        got.len(),
        total,
        "consumed {} of {total} records",
        got.len()
    );
    let got: BTreeSet<Vec<u8>> = got.into_iter().collect();
    let sent: BTreeSet<Vec<u8>> = (0..total).map(common::binary_payload).collect();
    assert_eq!(got, sent);
}

fn batch_policy(brokers: &str) -> Policy {
    let src = format!(
        r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {{ protocol = {{ custom_lua = {{ constructor = 'make.k', batch_size = 10 }} }} }}
end)
kumo.on('make.k', function()
  local producer = kumo.kafka.build_producer {{ ['bootstrap.servers'] = {brokers:?}, ['linger.ms'] = 5 }}
  local sender = {{}}
  function sender:send(message)
    local p, o = producer:send {{ topic = 'batch', payload = message:get_data(), key = message:id(),
                                  headers = {{ id = message:id() }}, timeout = '300ms' }}
    return '250 ' .. p .. ':' .. o
  end
  function sender:send_batch(messages)
    local records = {{}}
    for i, m in ipairs(messages) do
      records[i] = {{ topic = 'batch', payload = m:get_data(), timeout = '300ms' }}
    end
    local failed, errors = producer:send_batch(records)
    local results = {{}}
    for i = 1, #messages do results[i] = '250 batched' end
    for j, i in ipairs(failed) do results[i] = '451 ' .. errors[j] end
    return results
  end
  function sender:close() producer:close() end
  return sender
end)
"#
    );
    Policy::from_source("batch.lua", &src).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_send_batch_reports_per_record_results() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("batch", 1, 1).unwrap();
    let conn = batch_policy(&cluster.bootstrap_servers())
        .connect("k")
        .await
        .unwrap();
    let msgs = (0..10)
        .map(|i| common::message(i, common::binary_payload(i)))
        .collect();
    let out = conn.send_batch(msgs).await;
    assert_eq!(out.len(), 10);
    for o in &out {
        assert_eq!(
            o,
            &SendOutcome::Delivered {
                response: "250 batched".into()
            }
        );
    }
    conn.close().await;
}

#[tokio::test]
async fn unreachable_kafka_is_a_transient_failure() {
    let conn = batch_policy("127.0.0.1:1").connect("k").await.unwrap();
    let start = Instant::now();
    match conn.send(common::message(1, b"x".to_vec())).await {
        SendOutcome::Transient { response, .. } => {
            assert!(response.contains("timed out after 300ms"), "{response}");
            assert!(response.contains("batch.lua:"), "{response}");
        }
        other => panic!("expected Transient, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    // batch path: every record reported failed, per index
    let out = conn
        .send_batch((0..3).map(|i| common::message(i, b"y".to_vec())).collect())
        .await;
    for o in out {
        assert!(
            matches!(&o, SendOutcome::Transient { code: 451, response } if response.contains("timed out")),
            "{o:?}"
        );
    }
}
