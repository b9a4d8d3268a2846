//! A librdkafka mock Kafka cluster and a consumer that reads a topic back: for the demo
//! (`spoolrelay demo`) and the tests (`tests/common`), which include this file by path. It
//! is not part of the daemon's library.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// A mock Kafka cluster with one topic, reachable over TCP by any client.
pub struct MockKafka {
    _cluster: MockCluster<'static, DefaultProducerContext>,
    pub brokers: String,
    pub topic: String,
    pub partitions: i32,
}

impl MockKafka {
    pub fn start(topic: &str, partitions: i32) -> anyhow::Result<MockKafka> {
        let cluster = MockCluster::new(1).context("cannot start the Kafka mock cluster")?;
        cluster
            .create_topic(topic, partitions, 1)
            .context("cannot create the mock topic")?;
        Ok(MockKafka {
            brokers: cluster.bootstrap_servers(),
            _cluster: cluster,
            topic: topic.into(),
            partitions,
        })
    }

    /// Points the example policy at this cluster (`policy/examples/kafka.lua` reads these).
    pub fn export_env(&self) {
        std::env::set_var("SPOOLRELAY_KAFKA_BROKERS", &self.brokers);
        std::env::set_var("SPOOLRELAY_KAFKA_TOPIC", &self.topic);
    }
}

/// Reads every partition of `topic` from the beginning until `want` messages arrived or
/// nothing new came for `idle`; blocking (run it on a blocking thread). `progress` gets
/// the running count.
pub fn consume(
    brokers: &str,
    topic: &str,
    partitions: i32,
    want: usize,
    idle: Duration,
    progress: &dyn Fn(usize),
) -> anyhow::Result<Vec<Vec<u8>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "spoolrelay-verify")
        .set("enable.auto.commit", "false")
        .create()
        .context("cannot create the Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::with_capacity(want);
    let mut last_progress = Instant::now();
    while out.len() < want && last_progress.elapsed() < idle {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(msg)) => {
                out.push(msg.payload().unwrap_or_default().to_vec());
                last_progress = Instant::now();
                if out.len() % 1000 == 0 {
                    progress(out.len());
                }
            }
            Some(Err(e)) => tracing::debug!(error = %e, "consumer error"),
            None => {}
        }
    }
    progress(out.len());
    Ok(out)
}
