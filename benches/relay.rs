//! `cargo bench -p spoolrelay --bench relay`: the relay's throughput, memory and disk
//! figures, each printed next to a baseline measured in the same run on the same machine
//! (see docs/performance.md for what each figure means and the results).
//!
//! | figure | relay                                        | baseline(s)                         |
//! |--------|----------------------------------------------|-------------------------------------|
//! | P1     | HTTP NDJSON batches → fsynced spool           | raw `Spool::enqueue`; bare sled     |
//! | P2     | backlog → kafka.lua (acks=all) → MockCluster | direct pipelined FutureProducer     |
//! | P2t    | a trickle (enqueues of 10) → kafka.lua       | the same with `min_batch_size = 1`  |
//! | P3     | backlog → seed 002 amqp.lua → RabbitMQ       | direct lapin, pipelined confirms    |
//! | P4     | daemon binary: RSS with N queued, restart    | —                                   |
//! | P5     | bytes on disk (and in sled's blobs) after N in / N out, 3 cycles (`BENCH_P5_CYCLES`; `BENCH_P5_FORMAT=v1` or `v2` runs one format) | the live data size |
//! | P7     | daemon binary: N queues x 1 message, reaped  | RSS before the burst                |
//!
//! Environment: `BENCH_MESSAGES` (P2, P4, P5; default 200000), `BENCH_AMQP_MESSAGES`
//! (P3; default 50000), `BENCH_SECS` (each P1 measurement; default 3), `BENCH_ONLY`
//! (e.g. `P1,P3`), `BENCH_LOG` (a tracing filter for the in-process daemons, e.g. `info`), `AMQP_URL` (default amqp://127.0.0.1:5672/%2f; P3 is skipped when
//! RabbitMQ is unreachable). P7 has its own (`BENCH_P7_*`, see `relay/p7_queues.rs`).
//! Nothing here asserts: benchmarks are not tests.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use spool::{Meta, NewMessage, Spool, SpoolOptions};
use spoolrelay::{Config, Daemon, Shutdown};

#[path = "relay/p2_trickle.rs"]
mod p2_trickle;
#[path = "relay/p7_queues.rs"]
mod p7_queues;

const SMALL: usize = 256;
const KIB: usize = 1024;
/// Messages per HTTP batch request (and per raw enqueue call in P1's baseline).
const HTTP_BATCH: usize = 100;
/// Messages per enqueue call when a benchmark pre-fills a spool.
const FILL_BATCH: usize = 1000;
/// Deliveries in flight in the direct Kafka baseline (under librdkafka's 100k queue).
const KAFKA_WINDOW: usize = 50_000;
/// Unconfirmed publishes in flight in the direct AMQP baseline.
const AMQP_WINDOW: usize = 1024;
const KAFKA_QUEUE: &str = "kafka";
const AMQP_QUEUE: &str = "amqp";
const AMQP_ROUTING_KEY: &str = "logging";

struct Settings {
    messages: usize,
    amqp_messages: usize,
    run_for: Duration,
    only: Option<String>,
    amqp_url: String,
    /// P5's fill/drain cycles: enough of them tell growth from sled's lazy reclaim.
    p5_cycles: usize,
}

impl Settings {
    fn from_env() -> Settings {
        let num = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or(default)
        };
        Settings {
            messages: num("BENCH_MESSAGES", 200_000),
            amqp_messages: num("BENCH_AMQP_MESSAGES", 50_000),
            run_for: Duration::from_secs(num("BENCH_SECS", 3) as u64),
            only: std::env::var("BENCH_ONLY").ok().map(|s| s.to_uppercase()),
            amqp_url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://127.0.0.1:5672/%2f".into()),
            p5_cycles: num("BENCH_P5_CYCLES", 3),
        }
    }

    fn runs(&self, figure: &str) -> bool {
        self.only
            .as_deref()
            .is_none_or(|only| only.contains(figure))
    }
}

fn main() {
    // `cargo bench` passes --bench; there is no filter to honour (use BENCH_ONLY).
    let settings = Settings::from_env();
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        // e.g. BENCH_LOG=info: the in-process daemons' logs (connections opened, ...).
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "spoolrelay relay benchmark: {} cores, BENCH_MESSAGES={} BENCH_AMQP_MESSAGES={} BENCH_SECS={}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        settings.messages,
        settings.amqp_messages,
        settings.run_for.as_secs()
    );
    if settings.runs("P1") {
        rt.block_on(p1_ingest(&settings));
    }
    if settings.runs("P2") {
        rt.block_on(p2_kafka(&settings));
    }
    if settings.runs("P3") {
        rt.block_on(p3_amqp(&settings));
    }
    if settings.runs("P4") {
        rt.block_on(p4_memory(&settings));
    }
    if settings.runs("P5") {
        rt.block_on(p5_disk(&settings));
    }
    if settings.runs("P7") {
        rt.block_on(p7_queues::p7_queues());
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn message(queue: &str, size: usize, i: usize) -> NewMessage {
    let mut payload = vec![b'x'; size];
    let tag = format!("{i:012}");
    payload[..tag.len()].copy_from_slice(tag.as_bytes());
    NewMessage {
        queue: queue.into(),
        meta: Meta::new(),
        payload,
    }
}

/// Enqueues `n` messages of `size` bytes into `queue`, `FILL_BATCH` per durable enqueue.
async fn fill(spool: &Spool, queue: &str, n: usize, size: usize) {
    for start in (0..n).step_by(FILL_BATCH) {
        let batch = (start..(start + FILL_BATCH).min(n))
            .map(|i| message(queue, size, i))
            .collect();
        spool.enqueue(batch).await.expect("pre-fill enqueue");
    }
}

/// Partitions so that no mock partition passes ~4 MiB or 80k messages (it keeps ~5 MiB /
/// 100k), and at least 16.
fn partitions_for(n: usize, size: usize) -> i32 {
    let by_bytes = (n * (size + 100)).div_ceil(4 << 20);
    let by_count = n.div_ceil(80_000);
    by_bytes.max(by_count).max(16) as i32
}

fn mock_kafka(topics: &[&str], partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("Kafka mock cluster");
    for topic in topics {
        cluster
            .create_topic(topic, partitions, 1)
            .expect("mock topic");
    }
    cluster
}

/// Process CPU time (user + system) so far, from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Wall time and CPU use of `f`, as (result, seconds, cpu % of one core).
async fn timed<T>(f: impl Future<Output = T>) -> (T, f64, f64) {
    let (cpu0, t0) = (cpu_time(), Instant::now());
    let out = f.await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    (out, secs, 100.0 * cpu / secs)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The daemons and the pre-filled spools of every figure run on the default format (v1
/// records); `SPOOLRELAY_SPOOL_CHUNKED_INGEST=1` (the daemon's `--spool-chunked-ingest`)
/// puts them on spool v2's chunks. The binary that P4 and P7 start reads the same variable. P1 and P5 measure both formats in every run.
fn chunked_from_env() -> bool {
    std::env::var_os("SPOOLRELAY_SPOOL_CHUNKED_INGEST")
        .map_or(SpoolOptions::default().chunked_ingest, |v| v != "0")
}

/// The daemon binary P4 and P7 start: this build's, or `BENCH_DAEMON_BIN` (to compare
/// two builds, e.g. two allocators, in one session on the same harness).
fn daemon_binary() -> PathBuf {
    std::env::var_os("BENCH_DAEMON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_spoolrelay")))
}

fn spool_options(chunked_ingest: bool) -> SpoolOptions {
    SpoolOptions {
        chunked_ingest,
        ..SpoolOptions::default()
    }
}

async fn start_daemon(lua_name: &str, lua: &str, dir: &Path) -> Daemon {
    let policy = policy::Policy::from_source(lua_name, lua).expect("policy loads");
    let mut config = Config::new(policy, dir.to_path_buf());
    config.listen = "127.0.0.1:0".into();
    config.spool_options.chunked_ingest = chunked_from_env();
    spoolrelay::start(config, Shutdown::new())
        .await
        .expect("daemon starts")
}

async fn admin(daemon: &Daemon, action: &str, queue: &str) {
    let url = format!("http://{}/api/admin/queues/{queue}/{action}", daemon.addr);
    let resp = reqwest::Client::new()
        .post(url)
        .send()
        .await
        .expect("admin request");
    assert!(
        resp.status().is_success(),
        "{action} {queue}: {}",
        resp.status()
    );
}

async fn wait_empty(daemon: &Daemon, limit: Duration) -> bool {
    let start = Instant::now();
    while !daemon.spool.queue_names().is_empty() {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

fn example_policy(name: &str) -> (String, String) {
    let path = format!("{}/policy/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("example policy");
    (path, text)
}

/// Drains a pre-filled backlog through the daemon: warm up (connection open, producer
/// ready), suspend the queue, enqueue `n`, resume, time until the spool is empty.
async fn relay_drain(policy: (String, String), queue: &str, n: usize, size: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = start_daemon(&policy.0, &policy.1, dir.path()).await;
    fill(&daemon.spool, queue, 100, size).await;
    assert!(
        wait_empty(&daemon, Duration::from_secs(30)).await,
        "warm-up messages were not delivered"
    );
    admin(&daemon, "suspend", queue).await;
    fill(&daemon.spool, queue, n, size).await;
    let ((), secs, cpu) = timed(async {
        admin(&daemon, "resume", queue).await;
        if !wait_empty(&daemon, Duration::from_secs(600)).await {
            println!("  (relay did not drain within 600 s)");
        }
    })
    .await;
    daemon.stop().await.expect("daemon stops");
    (n as f64 / secs, cpu)
}

fn row(what: &str, rate: f64, cpu: f64, base: &str, base_rate: f64, base_cpu: f64) {
    println!(
        "  {what:<34} {rate:>11.0} msg/s (cpu {cpu:>3.0}%)   {base:<28} {base_rate:>11.0} msg/s (cpu {base_cpu:>3.0}%)   {:>5.1}%",
        100.0 * rate / base_rate
    );
}

// ---------------------------------------------------------------------------------------
// P1: ingest

const NO_DELIVERY_POLICY: &str = r#"
kumo.on('get_queue_config', function() return kumo.make_queue_config {} end)
"#;

async fn p1_ingest(s: &Settings) {
    println!(
        "\nP1 ingest: {SMALL} B messages, {HTTP_BATCH} per request/enqueue, fsync before ack, {} s per measurement",
        s.run_for.as_secs()
    );
    println!(
        "  (HTTP on {}; the spool alone both ways: v1 one record per message, v2 chunks)",
        if chunked_from_env() {
            "v2 chunks"
        } else {
            "v1 records"
        }
    );
    println!(
        "  {:>5} {:>14} {:>14} {:>14} {:>16} {:>9} {:>9} {:>9} {:>11} {:>11}",
        "conns",
        "HTTP msg/s",
        "spool msg/s",
        "v2 spool",
        "bare sled msg/s",
        "HTTP/spl",
        "spl/bare",
        "v2/bare",
        "HTTP group",
        "spool group"
    );
    for conns in [1usize, 16, 64] {
        let (http, http_group) = http_ingest(conns, s.run_for).await;
        let (raw, raw_group) = spool_ingest(conns, s.run_for, false).await;
        let (v2, _) = spool_ingest(conns, s.run_for, true).await;
        let run_for = s.run_for;
        let bare = tokio::task::spawn_blocking(move || bare_sled(conns * HTTP_BATCH, run_for))
            .await
            .expect("bare sled");
        let spool_same = if chunked_from_env() { v2 } else { raw };
        println!(
            "  {conns:>5} {http:>14.0} {raw:>14.0} {v2:>14.0} {bare:>16.0} {:>8.0}% {:>8.0}% {:>8.0}% {http_group:>11.1} {raw_group:>11.1}",
            100.0 * http / spool_same,
            100.0 * raw / bare,
            100.0 * v2 / bare
        );
    }
}

/// One NDJSON request body of `HTTP_BATCH` lines, built once and reused.
fn ndjson_batch() -> String {
    let data = "x".repeat(SMALL);
    format!("{{\"data\":\"{data}\"}}\n").repeat(HTTP_BATCH)
}

/// Messages per second acknowledged over HTTP by `conns` concurrent clients, and the
/// average number of requests sharing one fsync.
async fn http_ingest(conns: usize, run_for: Duration) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = start_daemon("bench-ingest.lua", NO_DELIVERY_POLICY, dir.path()).await;
    // Nothing is delivered: the queue has no protocol, and suspending it keeps its worker
    // from even trying to connect.
    admin(&daemon, "suspend", "bench").await;
    let body = ndjson_batch();
    let url = format!("http://{}/api/v1/queues/bench/batch", daemon.addr);
    let http = reqwest::Client::new();
    let (groups0, jobs0, _) = daemon.spool.commit_stats();
    let started = Instant::now();
    let clients: Vec<_> = (0..conns)
        .map(|_| {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let mut sent = 0u64;
                while started.elapsed() < run_for {
                    let resp = http
                        .post(&url)
                        .body(body.clone())
                        .send()
                        .await
                        .expect("POST batch");
                    assert!(
                        resp.status().is_success(),
                        "batch refused: {}",
                        resp.status()
                    );
                    resp.bytes().await.expect("response body");
                    sent += HTTP_BATCH as u64;
                }
                sent
            })
        })
        .collect();
    let mut total = 0;
    for c in clients {
        total += c.await.expect("client task");
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let (groups, jobs, _) = daemon.spool.commit_stats();
    daemon.stop().await.expect("daemon stops");
    (
        rate,
        (jobs - jobs0) as f64 / (groups - groups0).max(1) as f64,
    )
}

/// The same load without HTTP: `conns` tasks each enqueueing `HTTP_BATCH` messages per call.
async fn spool_ingest(conns: usize, run_for: Duration, chunked: bool) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(dir.path(), spool_options(chunked)).expect("spool opens");
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let spool = spool.clone();
            tokio::spawn(async move {
                let mut sent = 0u64;
                while started.elapsed() < run_for {
                    let batch = (0..HTTP_BATCH)
                        .map(|i| message("bench", SMALL, i))
                        .collect();
                    spool.enqueue(batch).await.expect("enqueue");
                    sent += HTTP_BATCH as u64;
                }
                sent
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("producer task");
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let (groups, jobs, _) = spool.commit_stats();
    (rate, jobs as f64 / groups.max(1) as f64)
}

/// sled alone: `batch` inserts, one flush and one fdatasync, in a loop (a perfect group
/// commit of `conns` requests of `HTTP_BATCH`, with no spool around it).
fn bare_sled(batch: usize, run_for: Duration) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(32 << 20)
        .open()
        .expect("sled opens");
    let tree = db.open_tree("bench").expect("tree");
    let log = std::fs::File::open(dir.path().join("db")).expect("sled log file");
    let payload = [b'x'; SMALL];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < run_for {
        for _ in 0..batch {
            tree.insert(n.to_be_bytes(), &payload[..]).expect("insert");
            n += 1;
        }
        db.flush().expect("flush");
        log.sync_data().expect("fdatasync");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------
// P2: Kafka drain

async fn p2_kafka(s: &Settings) {
    let n = s.messages;
    let partitions = partitions_for(n, SMALL);
    let cluster = mock_kafka(&["bench.relay", "bench.direct"], partitions);
    let brokers = cluster.bootstrap_servers();
    println!(
        "\nP2 Kafka drain: {n} x {SMALL} B backlog, acks=all, linger.ms=5, MockCluster with {partitions} partitions"
    );
    let (direct, direct_cpu) = direct_kafka(&brokers, "bench.direct", n).await;
    std::env::set_var("SPOOLRELAY_KAFKA_BROKERS", &brokers);
    std::env::set_var("SPOOLRELAY_KAFKA_TOPIC", "bench.relay");
    let (relay, relay_cpu) = relay_drain(example_policy("kafka.lua"), KAFKA_QUEUE, n, SMALL).await;
    row(
        "relay (kafka.lua)",
        relay,
        relay_cpu,
        "direct FutureProducer",
        direct,
        direct_cpu,
    );
    p2_trickle::p2_trickle(n / 4).await;
}

/// A FutureProducer configured like kafka.lua's, warmed up, then `n` sends with up to
/// `KAFKA_WINDOW` deliveries awaited at once.
async fn direct_kafka(brokers: &str, topic: &str, n: usize) -> (f64, f64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| message("", SMALL, i).payload).collect();
    let send = |p| kafka_send(&producer, topic, p);
    // Warm-up: metadata and connections, as the relay's connection is warm too.
    futures::future::join_all(payloads.iter().take(100).map(|p| send(p))).await;
    let ((), secs, cpu) = timed(async {
        let mut in_flight = FuturesUnordered::new();
        for p in &payloads {
            if in_flight.len() >= KAFKA_WINDOW {
                in_flight.next().await;
            }
            in_flight.push(send(p));
        }
        while in_flight.next().await.is_some() {}
    })
    .await;
    (n as f64 / secs, cpu)
}

/// One send whose delivery report is awaited (a failed delivery aborts the benchmark).
async fn kafka_send(producer: &FutureProducer, topic: &str, payload: &[u8]) {
    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(payload);
    producer
        .send(record, Timeout::After(Duration::from_secs(60)))
        .await
        .expect("direct delivery");
}

// ---------------------------------------------------------------------------------------
// P3: AMQP drain

async fn amqp_channel(url: &str) -> Option<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .ok()?;
    let channel = conn.create_channel().await.ok()?;
    Some((conn, channel))
}

/// Declares the durable `logging` queue, empties it, and returns how many it held.
async fn purge_logging(channel: &lapin::Channel) -> u32 {
    let durable = lapin::options::QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(
            AMQP_ROUTING_KEY.into(),
            durable,
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare logging");
    channel
        .queue_purge(AMQP_ROUTING_KEY.into(), Default::default())
        .await
        .expect("purge logging")
}

async fn p3_amqp(s: &Settings) {
    let n = s.amqp_messages;
    println!(
        "\nP3 AMQP drain: {n} x {SMALL} B backlog, persistent, confirms awaited, RabbitMQ at {}",
        s.amqp_url
    );
    let Some((conn, channel)) = amqp_channel(&s.amqp_url).await else {
        println!("  skipped: RabbitMQ unreachable at {}", s.amqp_url);
        return;
    };
    purge_logging(&channel).await;
    let (direct, direct_cpu) = direct_amqp(&s.amqp_url, n).await;
    let direct_stored = purge_logging(&channel).await;
    let (relay, relay_cpu) = relay_drain(example_policy("amqp.lua"), AMQP_QUEUE, n, SMALL).await;
    // The relay also delivered its 100 warm-up messages.
    let relay_stored = purge_logging(&channel).await;
    row(
        "relay (amqp.lua, seed 002)",
        relay,
        relay_cpu,
        "direct lapin, pipelined",
        direct,
        direct_cpu,
    );
    println!(
        "  stored in 'logging': direct {direct_stored} (of {n}), relay {relay_stored} (of {} incl. 100 warm-up)",
        n + 100
    );
    let _ = conn.close(200, "bench done".into()).await;
}

async fn direct_amqp(url: &str, n: usize) -> (f64, f64) {
    let (conn, channel) = amqp_channel(url).await.expect("RabbitMQ");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirm_select");
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| message("", SMALL, i).payload).collect();
    // The publish resolves to the broker's confirm, itself a future awaited later in a
    // window: that is the pipelining being measured.
    #[allow(clippy::async_yields_async)]
    let publish = |p: &[u8]| {
        let channel = channel.clone();
        let p = p.to_vec();
        async move {
            let props = lapin::BasicProperties::default().with_delivery_mode(2);
            channel
                .basic_publish(
                    "".into(),
                    AMQP_ROUTING_KEY.into(),
                    Default::default(),
                    &p,
                    props,
                )
                .await
                .expect("publish")
        }
    };
    let ((), secs, cpu) = timed(async {
        let mut pending: FuturesUnordered<lapin::PublisherConfirm> = FuturesUnordered::new();
        for p in &payloads {
            if pending.len() >= AMQP_WINDOW {
                pending.next().await.expect("pending").expect("confirm");
            }
            pending.push(publish(p).await);
        }
        while let Some(confirm) = pending.next().await {
            confirm.expect("confirm");
        }
    })
    .await;
    let _ = conn.close(200, "bench done".into()).await;
    (n as f64 / secs, cpu)
}

// ---------------------------------------------------------------------------------------
// P4: memory and restart

async fn p4_memory(s: &Settings) {
    let n = s.messages;
    let partitions = partitions_for(n, KIB);
    let topic = "bench.restart";
    let cluster = mock_kafka(&[topic], partitions);
    let brokers = cluster.bootstrap_servers();
    println!("\nP4 memory/restart: the spoolrelay binary restarted on a spool holding {n} x {KIB} B (kafka.lua, {partitions} partitions)");
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("spool");
    let fill_secs = {
        let options = spool_options(chunked_from_env());
        let (spool, _) = Spool::open(&spool_dir, options).expect("spool opens");
        let t0 = Instant::now();
        fill(&spool, KAFKA_QUEUE, n, KIB).await;
        spool.sync().await.expect("sync");
        t0.elapsed().as_secs_f64()
    };
    println!(
        "  pre-filled in {fill_secs:.1} s ({:.0} msg/s, {:.0} MiB on disk)",
        n as f64 / fill_secs,
        dir_bytes(&spool_dir).1 as f64 / (1 << 20) as f64
    );

    // First delivery: a consumer already reading every partition sees it.
    let first = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (brokers, first, stop) = (brokers.clone(), first.clone(), stop.clone());
        std::thread::spawn(move || watch_first(&brokers, topic, partitions, &first, &stop))
    };
    std::thread::sleep(Duration::from_millis(800)); // let the consumer's assignment settle

    let (policy_path, _) = example_policy("kafka.lua");
    let started = Instant::now();
    let mut child = Command::new(daemon_binary())
        .args([
            "--policy",
            &policy_path,
            "--listen",
            "127.0.0.1:0",
            "--spool",
        ])
        .arg(&spool_dir)
        .env("SPOOLRELAY_KAFKA_BROKERS", &brokers)
        .env("SPOOLRELAY_KAFKA_TOPIC", topic)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spoolrelay");
    let pid = child.id();
    let ready = Arc::new(std::sync::Mutex::new(None::<(Instant, u64)>));
    let stderr = child.stderr.take().expect("stderr");
    {
        let ready = ready.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("HTTP API listening") {
                    *ready.lock().expect("ready") =
                        Some((Instant::now(), status_kib(pid, "VmRSS:")));
                }
            }
        });
    }
    // Sample RSS until every message is in Kafka.
    let counter = watermark_reader(&brokers);
    let mut rss_at_first = None;
    let mut last_check = Instant::now();
    let drained_at = loop {
        std::thread::sleep(Duration::from_millis(10));
        if rss_at_first.is_none() && first.lock().expect("first").is_some() {
            rss_at_first = Some(status_kib(pid, "VmRSS:"));
        }
        if last_check.elapsed() > Duration::from_millis(250) {
            last_check = Instant::now();
            let stored = stored_messages(&counter, topic, partitions);
            if stored >= n as i64 {
                break Some(Instant::now());
            }
            if started.elapsed() > Duration::from_secs(900) {
                println!("  (not drained after 900 s: {stored} of {n} in Kafka)");
                break None;
            }
        }
    };
    let (rss_end, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let exited = child.wait();
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();

    let ready = *ready.lock().expect("ready");
    let first = *first.lock().expect("first");
    let since = |t: Option<Instant>| t.map_or(f64::NAN, |t| (t - started).as_secs_f64());
    let rss_ready = ready.map_or(0, |(_, rss)| rss);
    println!("  start → HTTP listening (spool recovered)   {:>8.2} s   RSS {:>7.1} MiB  ← with {n} queued", since(ready.map(|r| r.0)), mib(rss_ready));
    println!(
        "  start → first delivery in Kafka           {:>8.2} s   RSS {:>7.1} MiB",
        since(first),
        mib(rss_at_first.unwrap_or(0))
    );
    if let Some(drained) = drained_at {
        let secs = first.map_or(f64::NAN, |f| (drained - f).as_secs_f64());
        println!(
            "  first delivery → all {n} in Kafka       {secs:>8.2} s   ({:.0} msg/s of {KIB} B)",
            n as f64 / secs
        );
    }
    println!(
        "  peak RSS (VmHWM) {:.1} MiB, RSS when drained {:.1} MiB; exit {:?}",
        mib(hwm),
        mib(rss_end),
        exited.map(|s| s.code())
    );
}

fn watch_first(
    brokers: &str,
    topic: &str,
    partitions: i32,
    first: &std::sync::Mutex<Option<Instant>>,
    stop: &AtomicBool,
) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "spoolrelay-bench")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    while !stop.load(Ordering::Relaxed) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(5)) {
            first
                .lock()
                .expect("first")
                .get_or_insert_with(Instant::now);
            return;
        }
    }
}

fn watermark_reader(brokers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "spoolrelay-bench-count")
        .create()
        .expect("consumer")
}

fn stored_messages(consumer: &BaseConsumer, topic: &str, partitions: i32) -> i64 {
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                // The topic is fresh: the high watermark counts everything ever stored
                // (the low one moves up when the mock drops old segments).
                .map_or(0, |(_, high)| high)
        })
        .sum()
}

// ---------------------------------------------------------------------------------------
// P5: disk

/// (apparent bytes, allocated bytes) of every file under `dir`.
fn dir_bytes(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total.0 += meta.len();
                total.1 += meta.blocks() * 512;
            }
        }
    }
    total
}

async fn p5_disk(s: &Settings) {
    // BENCH_P5_FORMAT=v1 or v2 runs one format (a long run on one of them); unset runs both.
    let only = std::env::var("BENCH_P5_FORMAT").ok();
    for chunked in [false, true] {
        let name = if chunked { "v2" } else { "v1" };
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        p5_disk_of(s, chunked).await;
    }
}

/// Seconds the calling thread has run on a CPU (Linux's schedstat; 0 where it is missing).
/// P5 prints it beside the drain's wall time: the difference is time the draining thread
/// waited (for sled's batch lock, the index lock or the disk) rather than worked.
fn thread_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

async fn p5_disk_of(s: &Settings, chunked: bool) {
    let n = s.messages;
    let format = if chunked { "v2 chunks" } else { "v1 records" };
    let cycles = s.p5_cycles;
    println!("\nP5 disk ({format}): {n} x {KIB} B in (enqueue, fsynced), then out (lease + ack, as the dispatcher does), {cycles} cycles");
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(dir.path(), spool_options(chunked)).expect("spool opens");
    let record = (spool::keys::message_key(KAFKA_QUEUE, spool::MessageId(1)).len()
        + spool::record::encode(&spool::Message {
            id: spool::MessageId(1),
            queue: KAFKA_QUEUE.into(),
            created_ms: 0,
            attempts: 0,
            due_ms: 0,
            last_error: None,
            meta: Meta::new(),
            payload: vec![0; KIB],
        })
        .len()) as u64;
    let live_in = n as u64 * record;
    println!(
        "  {:<7} {:<10} {:>14} {:>14} {:>14} {:>9} {:>14}",
        "cycle", "after", "live data", "on disk", "allocated", "disk/live", "of it blobs"
    );
    let blobs = dir.path().join("data").join("blobs");
    let mut out_secs = 0.0;
    let mut sync_secs = 0.0;
    let (mut loop_secs, mut on_cpu_secs) = (0.0, 0.0);
    for cycle in 1..=cycles {
        fill(&spool, KAFKA_QUEUE, n, KIB).await;
        spool.sync().await.expect("sync");
        let (size, alloc) = dir_bytes(dir.path());
        println!(
            "  {cycle:<7} {:<10} {:>11.1} MiB {:>10.1} MiB {:>10.1} MiB {:>8.2}x {:>10.1} MiB",
            "N in",
            live_in as f64 / 1048576.0,
            size as f64 / 1048576.0,
            alloc as f64 / 1048576.0,
            size as f64 / live_in as f64,
            dir_bytes(&blobs).0 as f64 / 1048576.0
        );
        let t0 = Instant::now();
        let cpu0 = thread_cpu_secs();
        loop {
            let leased = spool
                .lease(KAFKA_QUEUE, 1024, spool::now_ms())
                .expect("lease");
            if leased.is_empty() {
                break;
            }
            // One ack of the whole batch, as the dispatcher's `deliver` acks what one send
            // delivered (one index lock per batch, not per message).
            let leases: Vec<&spool::Lease> = leased.iter().map(|m| &m.lease).collect();
            spool.ack_many(&leases).expect("ack");
        }
        let t1 = Instant::now();
        loop_secs += (t1 - t0).as_secs_f64();
        on_cpu_secs += thread_cpu_secs() - cpu0;
        spool.sync().await.expect("sync");
        sync_secs += t1.elapsed().as_secs_f64();
        out_secs += t0.elapsed().as_secs_f64();
        let (size, alloc) = dir_bytes(dir.path());
        println!(
            "  {cycle:<7} {:<10} {:>11.1} MiB {:>10.1} MiB {:>10.1} MiB {:>9} {:>10.1} MiB",
            "N out",
            0.0,
            size as f64 / 1048576.0,
            alloc as f64 / 1048576.0,
            "-",
            dir_bytes(&blobs).0 as f64 / 1048576.0
        );
    }
    println!(
        "  (lease + ack alone ({format}): {:.0} msg/s; live record = {record} B = v1 key + encoded message)",
        (cycles * n) as f64 / out_secs
    );
    println!(
        "  (of the drain's {out_secs:.2} s, {sync_secs:.2} s were the final sync after the last ack; \
         the lease + ack loop took {loop_secs:.2} s, on a CPU for {on_cpu_secs:.2} s)"
    );
}
