//! Contract (2), (3) and (6) against misbehaving brokers: an entry leaves the spool only
//! after a 2xx send; every other outcome keeps it with its attempts; a broker that goes
//! away, errors or hangs loses nothing and gets a clear error.
//!
//! - `rabbitmq_outage_loses_nothing_and_does_not_spin`: the seed-002 AMQP policy, verbatim,
//!   while `rabbitmqctl stop_app` / `start_app` takes the broker away and back.
//! - `kafka_broker_down_and_produce_errors_lose_nothing`: the mock cluster's broker down,
//!   then Produce requests failing.
//! - `a_broker_that_never_answers_keeps_messages_queued`: a TCP listener that accepts and
//!   says nothing, then the same messages delivered to the real RabbitMQ.
//!
//! RabbitMQ must run on 127.0.0.1:5672 (tests/run.sh starts it). The tests of this file
//! run one at a time (they share the broker and the process CPU figure).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use lapin::Channel;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Starts the RabbitMQ app again when dropped, whatever happened to the test.
struct RabbitBack;

impl Drop for RabbitBack {
    fn drop(&mut self) {
        if !rabbitmqctl(&["start_app"]) {
            eprintln!("WARNING: `rabbitmqctl start_app` failed; start RabbitMQ by hand");
        }
        rabbitmqctl(&["-q", "await_startup"]);
    }
}

/// Drains queue `name` until `want` distinct payloads are in `got` or `limit` passes.
async fn drain_amqp(
    channel: &Channel,
    name: &str,
    want: &HashSet<Vec<u8>>,
    got: &mut Vec<Vec<u8>>,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let have: HashSet<&Vec<u8>> = got.iter().collect();
        if want.iter().all(|p| have.contains(p)) || Instant::now() > deadline {
            return;
        }
        match channel
            .basic_get(name.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            Some(msg) => got.push(msg.delivery.data),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// (missing, duplicates) of `got` against `want`. Payloads that are not ours (another
/// test publishing to the same broker queue) are ignored.
fn compare(want: &HashSet<Vec<u8>>, got: &[Vec<u8>]) -> (usize, usize) {
    let ours: Vec<&Vec<u8>> = got.iter().filter(|p| want.contains(*p)).collect();
    let distinct: HashSet<&Vec<u8>> = ours.iter().copied().collect();
    (want.len() - distinct.len(), ours.len() - distinct.len())
}

fn foreign(want: &HashSet<Vec<u8>>, got: &[Vec<u8>]) -> usize {
    got.iter().filter(|p| !want.contains(*p)).count()
}

async fn post(
    http: &reqwest::Client,
    daemon: &spoolrelay::Daemon,
    queue: &str,
    body: &[u8],
) -> u64 {
    let resp = http
        .post(common::url(
            daemon,
            &format!("/api/v1/queues/{queue}/messages"),
        ))
        .body(body.to_vec())
        .send()
        .await
        .expect("daemon answers HTTP");
    assert_eq!(resp.status(), 200, "ingest refused a message");
    let answer: serde_json::Value = resp.json().await.expect("json");
    answer["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("numeric id")
}

/// CPU seconds (user + system) this process used so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    ticks / hz
}

/// Attempts histogram of one queue (attempts → messages).
fn attempts(daemon: &spoolrelay::Daemon, queue: &str) -> BTreeMap<u32, u64> {
    daemon
        .spool
        .stats(spool::now_ms())
        .queues
        .get(queue)
        .map(|q| q.attempts.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_outage_loses_nothing_and_does_not_spin() {
    let _serial = SERIAL.lock().await;
    let seed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policy/examples/amqp.lua"
    ))
    .expect("seed-002 policy");
    let (conn, channel) = common::amqp::fresh_queue("logging").await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(&seed, dir.path()).await;
    let http = reqwest::Client::new();
    let mut want: HashSet<Vec<u8>> = HashSet::new();
    let mut got: Vec<Vec<u8>> = Vec::new();

    // 1. Broker up: the connection is made and used.
    for i in 0..100 {
        let p = format!("outage before {i}").into_bytes();
        post(&http, &daemon, "amqp", &p).await;
        want.insert(p);
    }
    drain_amqp(
        &channel,
        "logging",
        &want,
        &mut got,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        compare(&want, &got).0,
        0,
        "delivery before the outage failed"
    );
    let _ = conn.close(200, "bye".into()).await;

    // 2. Broker away: ingest keeps answering 2xx (the spool has it), sends fail.
    let back = RabbitBack;
    assert!(rabbitmqctl(&["stop_app"]), "rabbitmqctl stop_app failed");
    let outage_started = Instant::now();
    for i in 0..300 {
        let p = format!("outage during {i}").into_bytes();
        post(&http, &daemon, "amqp", &p).await;
        want.insert(p);
    }
    // A quiet window: a daemon that spins on a dead broker burns a core here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu_rate = (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
    let during = attempts(&daemon, "amqp");
    let queued_during = common::queued(&daemon);
    // Broker back.
    drop(back);
    let outage = outage_started.elapsed();

    // 3. New traffic after the broker returned must flow without an operator.
    let (conn, channel) = common::amqp::declared_queue("logging").await;
    let mut after: HashSet<Vec<u8>> = HashSet::new();
    for i in 0..100 {
        let p = format!("outage after {i}").into_bytes();
        post(&http, &daemon, "amqp", &p).await;
        after.insert(p.clone());
        want.insert(p);
    }
    let mut got_after = Vec::new();
    drain_amqp(
        &channel,
        "logging",
        &after,
        &mut got_after,
        Duration::from_secs(60),
    )
    .await;
    let (after_missing, _) = compare(&after, &got_after);
    got.extend(got_after);
    let stuck_detail = format!(
        "{:?}",
        daemon.spool.stats(spool::now_ms()).queues.get("amqp")
    );

    // 4. What failed during the outage waits for the seed policy's retry_interval (20 min);
    //    the operator's "retry now" (the admin requeue) brings it forward.
    let resp = http
        .post(common::url(&daemon, "/api/admin/queues/amqp/requeue"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drain_amqp(
        &channel,
        "logging",
        &want,
        &mut got,
        Duration::from_secs(60),
    )
    .await;
    common::wait_until("spool to empty", Duration::from_secs(30), || {
        common::queued(&daemon) == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain_amqp(
        &channel,
        "logging",
        &HashSet::new(),
        &mut got,
        Duration::ZERO,
    )
    .await;
    while let Some(m) = channel
        .basic_get("logging".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(m.delivery.data);
    }
    let (missing, duplicates) = compare(&want, &got);
    println!(
        "rabbitmq outage: outage={outage:?} accepted={} received={} missing={missing} \
         duplicates={duplicates} queued_during_outage={queued_during} attempts_during={during:?} \
         cpu_during_outage={cpu_rate:.3} core-s/s after_outage_missing_before_requeue={after_missing} \
         foreign={}",
        want.len(),
        got.len(),
        foreign(&want, &got),
    );
    assert!(
        during.keys().any(|&a| a >= 1) || queued_during > 0,
        "the outage did not reach the daemon"
    );
    assert!(
        cpu_rate < 0.5,
        "the daemon busy-loops while the broker is away: {cpu_rate:.2} CPU s per s"
    );
    assert_eq!(
        after_missing, 0,
        "messages posted after the broker came back were not delivered within 60 s \
         without operator action (stale connection kept?): {stuck_detail}"
    );
    assert_eq!(missing, 0, "messages lost across the RabbitMQ outage");
    daemon.stop().await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_down_and_produce_errors_lose_nothing() {
    let _serial = SERIAL.lock().await;
    const TOPIC: &str = "relay.faults";
    let cluster: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 2, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    // The producer's own timeout (10 s) is longer than send_timeout: a send cut off here
    // may still be delivered by librdkafka later (a duplicate, never a loss).
    let lua = common::kafka_policy(&brokers, TOPIC, "", "send_timeout = '3s',");
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(&lua, dir.path()).await;
    let http = reqwest::Client::new();
    let mut want: HashSet<Vec<u8>> = HashSet::new();

    for i in 0..50 {
        let p = format!("kafka before {i}").into_bytes();
        post(&http, &daemon, "k", &p).await;
        want.insert(p);
    }
    common::wait_until("first messages delivered", Duration::from_secs(30), || {
        common::queued(&daemon) == 0
    })
    .await;

    // Broker down for 6 s (longer than send_timeout): sends fail, messages wait.
    cluster.broker_down(-1).expect("broker_down");
    for i in 0..200 {
        let p = format!("kafka broker down {i}").into_bytes();
        post(&http, &daemon, "k", &p).await;
        want.insert(p);
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during_down = attempts(&daemon, "k");
    let queued_down = common::queued(&daemon);
    cluster.broker_up(-1).expect("broker_up");
    common::wait_until(
        "backlog delivered after broker_up",
        Duration::from_secs(60),
        || common::queued(&daemon) == 0,
    )
    .await;

    // Produce errors: retriable ones (librdkafka retries them itself) and a
    // non-retriable one, which reaches the policy as an error and the spool as a retry.
    let mut errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 10];
    errors.extend([RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 10]);
    cluster.request_errors(RDKafkaApiKey::Produce, &errors);
    let mut max_attempts_seen = 0;
    for i in 0..200 {
        let p = format!("kafka produce errors {i}").into_bytes();
        post(&http, &daemon, "k", &p).await;
        want.insert(p);
        if i % 20 == 0 {
            max_attempts_seen =
                max_attempts_seen.max(attempts(&daemon, "k").keys().copied().max().unwrap_or(0));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::queued(&daemon) > 0 && Instant::now() < deadline {
        max_attempts_seen =
            max_attempts_seen.max(attempts(&daemon, "k").keys().copied().max().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        common::queued(&daemon),
        0,
        "spool not drained after the errors"
    );
    assert_eq!(daemon.spool.stats(spool::now_ms()).dead_letter, 0);

    let got = tokio::task::spawn_blocking(move || {
        common::consume(&brokers, TOPIC, 2, 10_000, Duration::from_secs(4), &|_| {})
    })
    .await
    .unwrap()
    .expect("consume");
    let (missing, duplicates) = compare(&want, &got);
    println!(
        "kafka faults: accepted={} received={} missing={missing} duplicates={duplicates} \
         queued_while_down={queued_down} attempts_while_down={during_down:?} \
         max_attempts_during_produce_errors={max_attempts_seen}",
        want.len(),
        got.len()
    );
    assert!(
        during_down.keys().any(|&a| a >= 1),
        "the broker outage never reached the spool as a failed attempt: {during_down:?}"
    );
    assert_eq!(missing, 0, "messages lost across Kafka faults");
    daemon.stop().await.unwrap();
}

/// Accepts TCP connections and never writes a byte; keeps them open.
async fn silent_broker() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (port, task)
}

/// Two queues at `url`, publishing to routing key `key`: `hang.ctor` connects in its
/// constructor (the usual shape), `hang.send` connects inside `send`.
fn amqp_policy(url: &str, key: &str) -> String {
    format!(
        r#"
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  local ctor = 'make.ctor'
  if domain == 'hang.send' then ctor = 'make.lazy' end
  return kumo.make_queue_config {{
    protocol = {{ custom_lua = {{ constructor = ctor }} }},
    retry_interval = '300ms',
    max_retry_interval = '1s',
    send_timeout = '1s',
  }}
end)
local function publish(client, message)
  local result = client:publish {{ routing_key = '{key}', payload = message:get_data() }}:wait()
  if result.status == 'Ack' then return '250 ' .. kumo.json_encode(result) end
  kumo.reject(451, kumo.json_encode(result))
end
kumo.on('make.ctor', function()
  local client = kumo.amqp.build_client '{url}'
  local sender = {{}}
  function sender:send(message) return publish(client, message) end
  function sender:close() client:close() end
  return sender
end)
kumo.on('make.lazy', function()
  local sender = {{}}
  function sender:send(message)
    if not self.client then self.client = kumo.amqp.build_client '{url}' end
    return publish(self.client, message)
  end
  function sender:close() if self.client then self.client:close() end end
  return sender
end)
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_never_answers_keeps_messages_queued() {
    let _serial = SERIAL.lock().await;
    const KEY: &str = "reliability.hang";
    let (port, silent) = silent_broker().await;
    let dir = tempfile::tempdir().unwrap();
    let hanging = amqp_policy(&format!("amqp://127.0.0.1:{port}"), KEY);
    let daemon = common::start(&hanging, dir.path()).await;
    let http = reqwest::Client::new();
    let mut want: HashSet<Vec<u8>> = HashSet::new();
    let mut lazy_ids = Vec::new();
    for i in 0..20 {
        let p = format!("hang ctor {i}").into_bytes();
        post(&http, &daemon, "hang.ctor", &p).await;
        want.insert(p);
        let p = format!("hang send {i}").into_bytes();
        lazy_ids.push(post(&http, &daemon, "hang.send", &p).await);
        want.insert(p);
    }
    // Several send_timeouts pass; HTTP keeps being served the whole time.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            http.get(common::url(&daemon, "/healthz")).send(),
        )
        .await
        .expect("HTTP stalled while the broker hangs")
        .expect("healthz");
        assert!(resp.status().is_success());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let stats = daemon.spool.stats(spool::now_ms());
    let ctor = stats.queues.get("hang.ctor").cloned().unwrap_or_default();
    let lazy = stats.queues.get("hang.send").cloned().unwrap_or_default();
    let sample = daemon
        .spool
        .get(spool::MessageId(lazy_ids[0]))
        .unwrap()
        .expect("hung message still spooled");
    println!(
        "silent broker: hang.ctor count={} attempts={:?}; hang.send count={} attempts={:?}; \
         sample last_error={:?}",
        ctor.count, ctor.attempts, lazy.count, lazy.attempts, sample.last_error
    );
    assert_eq!(ctor.count, 20, "hang.ctor lost messages");
    assert_eq!(lazy.count, 20, "hang.send lost messages");
    assert!(
        lazy.attempts.keys().all(|&a| a >= 1),
        "hung sends were not counted as attempts: {:?}",
        lazy.attempts
    );
    let error = sample.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("timed out"),
        "last_error does not say the send timed out: {error:?}"
    );
    daemon.stop().await.unwrap();
    silent.abort();

    // The same spool, pointed at the real broker: every message arrives.
    let (conn, channel) = common::amqp::fresh_queue(KEY).await;
    let daemon = common::start(&amqp_policy(&common::amqp::url(), KEY), dir.path()).await;
    let mut got = Vec::new();
    drain_amqp(&channel, KEY, &want, &mut got, Duration::from_secs(60)).await;
    common::wait_until("spool to empty", Duration::from_secs(30), || {
        common::queued(&daemon) == 0
    })
    .await;
    let (missing, duplicates) = compare(&want, &got);
    println!(
        "silent broker, then real broker: accepted={} received={} missing={missing} duplicates={duplicates}",
        want.len(),
        got.len()
    );
    assert_eq!(missing, 0, "messages lost after a hanging broker");
    daemon.stop().await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
}
