//! A fleet: three relays, each with its own spool, in front of one RabbitMQ and one Kafka
//! (librdkafka's mock cluster), with clients spreading their posts round-robin.
//!
//! During the run relay 0 is `kill -9`ed mid-stream and restarted on its spool, and relay 1
//! is drained (`POST /api/admin/drain`) until it exits on its own. The promise checked at
//! the end: every message that got a 2xx from any relay is in a broker at least once, and
//! every duplicate is a message relay 0 held in its spool when it was killed (what was in
//! flight there may be sent again; nothing else may).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const AMQP_KEY: &str = "fleet.events";
const TOPIC: &str = "fleet.events";
const RELAYS: usize = 3;
const CLIENTS: usize = 4;

/// Queue `amqp` goes to RabbitMQ (routing key [`AMQP_KEY`]), every other one to Kafka.
fn policy(amqp_url: &str, brokers: &str) -> String {
    format!(
        r#"
kumo.on('get_queue_config', function(domain)
  local ctor = 'make.kafka'
  if domain == 'amqp' then ctor = 'make.amqp' end
  return kumo.make_queue_config {{
    protocol = {{ custom_lua = {{ constructor = ctor }} }},
    retry_interval = '200ms',
    max_retry_interval = '1s',
  }}
end)
kumo.on('make.amqp', function()
  local client = kumo.amqp.build_client '{amqp_url}'
  local sender = {{}}
  function sender:send(message)
    local result = client:publish {{ routing_key = '{AMQP_KEY}', payload = message:get_data() }}:wait()
    if result.status == 'Ack' then return '250 ' .. kumo.json_encode(result) end
    kumo.reject(451, kumo.json_encode(result))
  end
  function sender:close() client:close() end
  return sender
end)
kumo.on('make.kafka', function()
  local producer = kumo.kafka.build_producer {{
    ['bootstrap.servers'] = '{brokers}',
    ['linger.ms'] = '2',
  }}
  local sender = {{}}
  function sender:send(message)
    producer:send {{ topic = '{TOPIC}', payload = message:get_data(), timeout = '10s' }}
    return '250 ok'
  end
  function sender:close() producer:close() end
  return sender
end)
"#
    )
}

/// One relay process: its port and spool stay the same across restarts.
struct Relay {
    port: u16,
    spool: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Relay {
    async fn start(&mut self, policy: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the relay's log");
        let child = common::relay_command(policy, &self.spool, self.port)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn spoolrelay");
        self.child = Some(child);
        common::wait_live(self.port).await;
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the clients were told: payload → the relay that answered 2xx.
type Acked = Arc<Mutex<HashMap<Vec<u8>, usize>>>;

/// One client: posts unique payloads, one at a time, to relay `seq % RELAYS`, alternating
/// the RabbitMQ and the Kafka queue; a refusal or a dead relay just moves it on.
async fn client(n: usize, ports: Vec<u16>, stop: Arc<AtomicBool>, acked: Acked) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client");
    let mut seq = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let relay = (seq + n) % RELAYS;
        let queue = if seq.is_multiple_of(2) {
            "amqp"
        } else {
            "kafka"
        };
        let payload = format!("fleet client={n} seq={seq} queue={queue}");
        seq += 1;
        let url = format!(
            "http://127.0.0.1:{}/api/v1/queues/{queue}/messages",
            ports[relay]
        );
        match http.post(url).body(payload.clone()).send().await {
            Ok(r) if r.status().is_success() => {
                acked.lock().unwrap().insert(payload.into_bytes(), relay);
            }
            // Killed, draining or gone: the client tries the next relay.
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Payloads a stopped relay's spool holds (queued or leased), read offline.
fn held(spool: &Path) -> HashSet<Vec<u8>> {
    let (spool, _) = spool::Spool::open(spool, Default::default()).expect("open killed spool");
    let mut held = HashSet::new();
    for queue in spool.queue_names() {
        for msg in spool.list(&queue, usize::MAX).expect("list") {
            held.insert(msg.payload);
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_survives_a_kill_and_a_drain_without_losing_an_acked_message() {
    let kafka = common::MockKafka::start(TOPIC, 4).expect("Kafka mock");
    let (_conn, channel) = common::amqp::fresh_queue(AMQP_KEY).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("fleet.lua");
    std::fs::write(&policy, policy_text(&kafka)).unwrap();
    let mut relays: Vec<Relay> = (0..RELAYS)
        .map(|i| Relay {
            port: common::free_port(),
            spool: dir.path().join(format!("spool-{i}")),
            log: dir.path().join(format!("relay-{i}.log")),
            child: None,
        })
        .collect();
    for relay in &mut relays {
        relay.start(&policy).await;
    }
    let ports: Vec<u16> = relays.iter().map(|r| r.port).collect();
    let log_paths: Vec<PathBuf> = relays.iter().map(|r| r.log.clone()).collect();
    let logs = || {
        log_paths
            .iter()
            .map(|log| format!("--- {}:\n{}", log.display(), common::tail(log, 20)))
            .collect::<Vec<_>>()
            .join("\n")
    };

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(client(n, ports.clone(), stop.clone(), acked.clone())))
        .collect();
    let count = |relay: usize| {
        acked
            .lock()
            .unwrap()
            .values()
            .filter(|r| **r == relay)
            .count()
    };

    // Mid-stream: relay 0 dies with whatever it has in flight, and comes back.
    common::wait_until(
        "relay 0 acked 300 messages",
        Duration::from_secs(30),
        || count(0) >= 300,
    )
    .await;
    relays[0].kill9();
    let held_at_kill = held(&relays[0].spool);
    relays[0].start(&policy).await;

    // Relay 1 drains: it refuses new posts (the clients move on) and exits 0 once it
    // delivered everything it accepted.
    let before = count(2);
    let drain = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/api/admin/drain", ports[1]))
        .json(&serde_json::json!({ "deadline": "60s" }))
        .send()
        .await
        .expect("POST /api/admin/drain");
    assert_eq!(drain.status(), 202);
    let mut drained = relays[1].child.take().expect("relay 1 runs");
    let status = common::wait_exit(&mut drained, "relay 1 draining", Duration::from_secs(60));
    assert_eq!(status.await.code(), Some(0), "relay 1's drain:\n{}", logs());
    // Exit 0 promises an empty spool (the volume may be thrown away): a request answered
    // after the drain's last look must not leave a message behind.
    let left = held(&relays[1].spool);
    assert!(
        left.is_empty(),
        "relay 1 exited 0 with {} messages in its spool, e.g. {:?}",
        left.len(),
        left.iter()
            .take(3)
            .map(|p| String::from_utf8_lossy(p))
            .collect::<Vec<_>>()
    );
    // The others kept taking traffic meanwhile.
    common::wait_until("relay 2 acked 100 more", Duration::from_secs(30), || {
        count(2) >= before + 100
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client task");
    }

    let http = reqwest::Client::new();
    for i in [0, 2] {
        let port = ports[i];
        let start = std::time::Instant::now();
        while common::spooled(&http, port).await != Some(0) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "relay {i} did not deliver its spool:\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let mut got = common::amqp::take_all(&channel, AMQP_KEY, Duration::from_secs(2)).await;
    let (brokers, parts) = (kafka.brokers.clone(), kafka.partitions);
    // Read until the topic is quiet: up to every acked message plus every possible duplicate.
    let most = acked.lock().unwrap().len() + held_at_kill.len() + 1;
    let from_kafka = tokio::task::spawn_blocking(move || {
        common::consume(
            &brokers,
            TOPIC,
            parts,
            most,
            Duration::from_secs(3),
            &|_| {},
        )
    })
    .await
    .unwrap()
    .expect("read Kafka back");
    got.extend(from_kafka);

    let acked = acked.lock().unwrap();
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    for p in &got {
        *seen.entry(p.as_slice()).or_default() += 1;
    }
    let missing: Vec<String> = acked
        .keys()
        .filter(|p| !seen.contains_key(p.as_slice()))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages never reached a broker, e.g. {:?}\n{}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)],
        logs()
    );
    let duplicates: Vec<&[u8]> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(p, _)| *p)
        .collect();
    let unexplained: Vec<String> = duplicates
        .iter()
        .filter(|p| !held_at_kill.contains(**p))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(
        unexplained.is_empty(),
        "duplicates that were not in relay 0's spool at the kill: {unexplained:?}"
    );
    let foreign = seen.keys().filter(|p| !acked.contains_key(**p)).count();
    eprintln!(
        "fleet: {} acked (relay 0: {}, 1: {}, 2: {}), {} delivered, {} duplicates \
         (relay 0 held {} at the kill), {} delivered without a 2xx (in flight at the kill)",
        acked.len(),
        acked.values().filter(|r| **r == 0).count(),
        acked.values().filter(|r| **r == 1).count(),
        acked.values().filter(|r| **r == 2).count(),
        got.len(),
        duplicates.len(),
        held_at_kill.len(),
        foreign,
    );
}

fn policy_text(kafka: &common::MockKafka) -> String {
    policy(&common::amqp::url(), &kafka.brokers)
}
