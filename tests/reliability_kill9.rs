//! Contract (1) and (4): a 2xx means fsynced, and after `kill -9` + restart every
//! acknowledged message is delivered; duplicates only for what was in flight.
//!
//! The real binary runs `policy/examples/kafka.lua` against a librdkafka mock cluster that
//! lives in this test process (a real TCP broker). Concurrent HTTP clients post unique
//! payloads the whole time; the daemon is SIGKILLed at random moments (during ingest and
//! while it dispatches its backlog) and restarted on the same spool. At the end the topic
//! is read back from the beginning and compared with what got a 2xx.
//!
//! Client 0 posts every 64th single message with a payload over 128 KiB, which sled
//! stores as a separate blob file (`data/blobs/`): those cross the kills too.
//!
//! `RELIABILITY_CYCLES` (default 8) sets the number of kills; `RELIABILITY_CLIENTS`
//! (default 8) the concurrent HTTP clients. `bash tests/kill9.sh` is the long form.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

const TOPIC: &str = "relay.kill9";
// A mock partition keeps only ~5 MiB: enough partitions for the blobs of a 50-kill run.
const PARTITIONS: i32 = 16;
/// Payloads above sled's blob threshold (128 KiB by default) go to their own files.
const BIG_PAYLOAD: usize = 150 * 1024;

/// Client 0's every 64th single post: a unique prefix, then filler past the blob threshold.
fn is_big(client: usize, seq: u64) -> bool {
    client == 0 && seq % 64 == 1
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The daemon under test; SIGKILLed on drop so a failing test leaves no process behind.
struct Relay {
    child: Child,
}

impl Relay {
    fn spawn(spool: &Path, port: u16, kafka: &common::MockKafka, log: &Path) -> Relay {
        let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/policy/examples/kafka.lua");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open daemon log");
        let child = common::relay_command(policy, spool, port)
            .env("SPOOLRELAY_KAFKA_BROKERS", &kafka.brokers)
            .env("SPOOLRELAY_KAFKA_TOPIC", &kafka.topic)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn spoolrelay");
        Relay { child }
    }

    fn kill9(&mut self) {
        // std's Child::kill is SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn assert_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "daemon exited on its own ({status}); log:\n{}",
                common::tail(log, 40)
            );
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn wait_healthy(http: &reqwest::Client, port: u16, relay: &mut Relay, log: &Path) {
    let start = Instant::now();
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
        {
            if r.status().is_success() {
                return;
            }
        }
        relay.assert_running(log);
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "daemon did not come up in 60 s; log:\n{}",
            common::tail(log, 40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Default)]
struct Ledger {
    /// Payloads answered with a 2xx.
    acked: Mutex<Vec<String>>,
    /// Requests that failed (connection error, 5xx): may or may not arrive.
    failed: AtomicU64,
    status_5xx: AtomicU64,
}

/// One HTTP client: posts unique payloads until `stop`, alternating single messages and
/// small NDJSON batches; records what was acknowledged.
async fn client(n: usize, port: Arc<AtomicU64>, stop: Arc<AtomicBool>, ledger: Arc<Ledger>) -> u64 {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let port = port.load(Ordering::Relaxed);
        let batch = seq % 4 == 3;
        let mut payloads: Vec<String> = (0..if batch { 10 } else { 1 })
            .map(|i| format!("kill9 client={n} seq={seq} part={i}"))
            .collect();
        if !batch && is_big(n, seq) {
            let filler = (b'a' + (seq % 26) as u8) as char;
            payloads[0] = format!("{} big ", payloads[0]);
            payloads[0].extend(std::iter::repeat_n(filler, BIG_PAYLOAD));
        }
        seq += 1;
        let req = if batch {
            let body: String = payloads
                .iter()
                .map(|p| format!("{}\n", serde_json::json!({ "data": p })))
                .collect();
            http.post(format!("http://127.0.0.1:{port}/api/v1/queues/kafka/batch"))
                .body(body)
        } else {
            http.post(format!(
                "http://127.0.0.1:{port}/api/v1/queues/kafka/messages"
            ))
            .body(payloads[0].clone())
        };
        match req.send().await {
            Ok(resp) if resp.status().is_success() => {
                ledger.acked.lock().unwrap().extend(payloads);
            }
            Ok(resp) => {
                if resp.status().is_server_error() {
                    ledger.status_5xx.fetch_add(1, Ordering::Relaxed);
                }
                ledger.failed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                // The daemon is down (killed mid-request, or not up yet).
                ledger.failed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_repeated_sigkill() {
    let cycles = env_usize("RELIABILITY_CYCLES", 8);
    let clients = env_usize("RELIABILITY_CLIENTS", 8);
    let kafka = common::MockKafka::start(TOPIC, PARTITIONS).expect("mock kafka");
    let dir = tempfile::tempdir().expect("tempdir");
    let spool: PathBuf = dir.path().join("spool");
    let log = dir.path().join("daemon.log");
    let http = reqwest::Client::new();
    let mut rng = rand::thread_rng();

    let port = Arc::new(AtomicU64::new(common::free_port() as u64));
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Ledger::default());
    let mut relay = Relay::spawn(&spool, port.load(Ordering::Relaxed) as u16, &kafka, &log);
    wait_healthy(&http, port.load(Ordering::Relaxed) as u16, &mut relay, &log).await;
    let load: Vec<_> = (0..clients)
        .map(|n| tokio::spawn(client(n, port.clone(), stop.clone(), ledger.clone())))
        .collect();

    let started = Instant::now();
    let mut backlog_at_kill = Vec::new();
    for cycle in 0..cycles {
        // Short lives hit the restart itself (recovery, producer start, backlog);
        // longer ones hit steady ingest + dispatch.
        let life = if cycle % 3 == 0 {
            rng.gen_range(50..400)
        } else {
            rng.gen_range(300..2000)
        };
        tokio::time::sleep(Duration::from_millis(life)).await;
        relay.assert_running(&log);
        backlog_at_kill.push(common::spooled(&http, port.load(Ordering::Relaxed) as u16).await);
        relay.kill9();
        let acked = ledger.acked.lock().unwrap().len();
        println!(
            "cycle {cycle}: killed after {life} ms, {acked} acknowledged so far, spool held {:?}",
            backlog_at_kill.last().unwrap()
        );
        // Restart on the same spool, sometimes on a new port (a fresh listener each time).
        let next = if cycle % 2 == 0 {
            common::free_port()
        } else {
            port.load(Ordering::Relaxed) as u16
        };
        port.store(next as u64, Ordering::Relaxed);
        relay = Relay::spawn(&spool, next, &kafka, &log);
        wait_healthy(&http, next, &mut relay, &log).await;
    }

    // Final run: stop the load, let the daemon drain the spool.
    stop.store(true, Ordering::Relaxed);
    let mut requests = 0;
    for task in load {
        requests += task.await.expect("client task");
    }
    let port = port.load(Ordering::Relaxed) as u16;
    let drain_start = Instant::now();
    loop {
        relay.assert_running(&log);
        if common::spooled(&http, port).await == Some(0) {
            break;
        }
        assert!(
            drain_start.elapsed() < Duration::from_secs(120),
            "spool not drained after 120 s: {:?} left; log:\n{}",
            common::spooled(&http, port).await,
            common::tail(&log, 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_in = drain_start.elapsed();

    let acked = std::mem::take(&mut *ledger.acked.lock().unwrap());
    let (brokers, topic) = (kafka.brokers.clone(), kafka.topic.clone());
    // More than can be there (every request's payloads, twice): read until idle.
    let ceiling = 2 * (acked.len() + 10 * ledger.failed.load(Ordering::Relaxed) as usize) + 1000;
    let got = tokio::task::spawn_blocking(move || {
        common::consume(
            &brokers,
            &topic,
            PARTITIONS,
            ceiling,
            Duration::from_secs(5),
            &|_| {},
        )
    })
    .await
    .expect("consumer thread")
    .expect("consume");
    let mut copies: HashMap<String, u64> = HashMap::new();
    for payload in got.iter() {
        *copies
            .entry(String::from_utf8_lossy(payload).into_owned())
            .or_default() += 1;
    }
    let acked_set: HashSet<&String> = acked.iter().collect();
    assert_eq!(
        acked_set.len(),
        acked.len(),
        "test bug: payloads not unique"
    );
    let lost: Vec<&&String> = acked_set
        .iter()
        .filter(|p| !copies.contains_key(p.as_str()))
        .collect();
    let duplicates: u64 = copies.values().map(|n| n - 1).sum();
    let big_acked = acked.iter().filter(|p| p.len() > BIG_PAYLOAD).count();
    let big_delivered = copies.keys().filter(|p| p.len() > BIG_PAYLOAD).count();
    let unacked_delivered = copies.keys().filter(|p| !acked_set.contains(p)).count();
    let panics = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("panicked")
        .count();
    println!(
        "kill9 summary: cycles={cycles} clients={clients} requests={requests} acked={} \
         failed_requests={} (5xx={}) delivered_records={} distinct={} lost={} duplicates={} \
         unacked_but_delivered={unacked_delivered} big_acked={big_acked} \
         big_delivered={big_delivered} drain_after_last_restart={drained_in:?} \
         total={:?} daemon_panics={panics}",
        acked.len(),
        ledger.failed.load(Ordering::Relaxed),
        ledger.status_5xx.load(Ordering::Relaxed),
        got.len(),
        copies.len(),
        lost.len(),
        duplicates,
        started.elapsed(),
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged messages were never delivered, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(!acked.is_empty(), "the load generator got no 2xx at all");
    assert!(
        big_acked > 0,
        "no payload over 128 KiB was acknowledged: the blob path was not exercised"
    );
    assert_eq!(
        panics,
        0,
        "the daemon panicked; log:\n{}",
        common::tail(&log, 40)
    );
    // Duplicates come only from what was in flight (leased, or delivered with its delete
    // not yet on disk) at a kill. A loose bound: 256 sends in flight per connection, plus a
    // second of unflushed deletes at the observed rate, per kill.
    let bound = cycles as u64 * (256 + 2000);
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates for {cycles} kills (bound {bound})"
    );
    drop(relay);
}
