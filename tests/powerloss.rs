//! Contract (1) and (4) under power loss: the real daemon keeps its spool on the power-cut
//! layer (`tests/powercut`), which loses every write not fsynced when the power goes.
//!
//! Concurrent HTTP clients post unique payloads and record every 2xx. Each cycle ends with
//! kill -9 *and* a power cut, then a restart on what the simulated disk kept. Odd cycles
//! run with a broker that cannot be reached (acknowledged messages pile up in the spool,
//! their sends hanging), even cycles with the real one (deliveries race the cut). At the end
//! the daemon drains to the broker and every payload that got a 2xx must be there.
//!
//! The negative control runs the same with the daemon's fdatasync disabled
//! (`SPOOLRELAY_TEST_SKIP_FSYNC=1`, the `SyncFaults` hook) and must lose acknowledged
//! messages, or see the daemon refuse to start because its ledger saw the loss.
//!
//! `POWERLOSS_CYCLES` (default 4) sets the number of cuts.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

const PARTITIONS: i32 = 4;

/// The daemon under test; SIGKILLed on drop.
struct Relay {
    child: Child,
}

impl Relay {
    fn spawn(
        spool: &Path,
        port: u16,
        brokers: &str,
        topic: &str,
        log: &Path,
        skip_fsync: bool,
    ) -> Relay {
        let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/policy/examples/kafka.lua");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open daemon log");
        let mut cmd = common::relay_command(policy, spool, port);
        cmd.env("SPOOLRELAY_KAFKA_BROKERS", brokers)
            .env("SPOOLRELAY_KAFKA_TOPIC", topic)
            .stdout(Stdio::null())
            .stderr(log);
        if skip_fsync {
            cmd.env("SPOOLRELAY_TEST_SKIP_FSYNC", "1");
        }
        Relay {
            child: cmd.spawn().expect("spawn spoolrelay"),
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits for /healthz; `Err` with the log's tail if the daemon exits instead.
async fn wait_healthy(
    http: &reqwest::Client,
    port: u16,
    relay: &mut Relay,
    log: &Path,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
        {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if let Some(status) = relay.exited() {
            return Err(format!(
                "daemon exited ({status}); log:\n{}",
                common::tail(log, 20)
            ));
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "daemon did not come up in 60 s; log:\n{}",
            common::tail(log, 40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One client: posts unique payloads until `stop`, records each one answered with a 2xx.
async fn client(
    n: usize,
    port: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let port = port.load(Ordering::Relaxed);
        let payload = format!("powerloss client={n} seq={seq}");
        seq += 1;
        let sent = http
            .post(format!(
                "http://127.0.0.1:{port}/api/v1/queues/kafka/messages"
            ))
            .body(payload.clone())
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status().is_success() => acked.lock().unwrap().push(payload),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// What one run showed.
struct Outcome {
    acked: usize,
    lost: usize,
    /// The daemon refused to start after a cut (its ledger saw sled lose commits).
    refused: Option<String>,
}

async fn run_mounted(skip_fsync: bool, cycles: usize) -> Outcome {
    let topic = if skip_fsync {
        "relay.powerloss.nofsync"
    } else {
        "relay.powerloss"
    };
    let kafka = common::MockKafka::start(topic, PARTITIONS).expect("mock kafka");
    let unreachable = format!("127.0.0.1:{}", common::free_port());
    let tmp = tempfile::tempdir().expect("tempdir");
    let (disk, mnt) = (tmp.path().join("disk"), tmp.path().join("mnt"));
    std::fs::create_dir(&disk).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let layer = powercut::PowerCut::mount(&disk, &mnt).expect("mount the power-cut layer");
    let spool = mnt.join("spool");
    let log = tmp.path().join("daemon.log");
    let http = reqwest::Client::new();
    let mut rng = rand::thread_rng();

    let port = Arc::new(AtomicU64::new(common::free_port() as u64));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let brokers_for = |cycle: usize| {
        if cycle % 2 == 1 {
            unreachable.as_str()
        } else {
            kafka.brokers.as_str()
        }
    };
    let mut relay = Relay::spawn(
        &spool,
        port.load(Ordering::Relaxed) as u16,
        brokers_for(0),
        topic,
        &log,
        skip_fsync,
    );
    wait_healthy(&http, port.load(Ordering::Relaxed) as u16, &mut relay, &log)
        .await
        .expect("first start");
    let load: Vec<_> = (0..4)
        .map(|n| tokio::spawn(client(n, port.clone(), stop.clone(), acked.clone())))
        .collect();

    let mut refused = None;
    for cycle in 0..cycles {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(400..1200))).await;
        if let Some(status) = relay.exited() {
            panic!(
                "daemon exited on its own ({status}); log:\n{}",
                common::tail(&log, 40)
            );
        }
        relay.kill9();
        let dropped = layer.cut().expect("power cut");
        println!(
            "cycle {cycle}: kill -9 + power cut, {} acknowledged so far, cut dropped {dropped:?}",
            acked.lock().unwrap().len()
        );
        let next = common::free_port();
        port.store(next as u64, Ordering::Relaxed);
        // The last restart gets the real broker, to drain.
        let brokers = if cycle + 1 == cycles {
            kafka.brokers.as_str()
        } else {
            brokers_for(cycle + 1)
        };
        relay = Relay::spawn(&spool, next, brokers, topic, &log, skip_fsync);
        if let Err(e) = wait_healthy(&http, next, &mut relay, &log).await {
            refused = Some(e);
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("client task");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    if refused.is_some() {
        drop(relay);
        drop(layer);
        return Outcome {
            acked: acked.len(),
            lost: 0,
            refused,
        };
    }

    let port = port.load(Ordering::Relaxed) as u16;
    let drain = Instant::now();
    while common::spooled(&http, port).await != Some(0) {
        assert!(
            relay.exited().is_none(),
            "daemon exited while draining; log:\n{}",
            common::tail(&log, 40)
        );
        assert!(
            drain.elapsed() < Duration::from_secs(60),
            "spool not drained in 60 s: {:?} left; log:\n{}",
            common::spooled(&http, port).await,
            common::tail(&log, 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (brokers, topic) = (kafka.brokers.clone(), kafka.topic.clone());
    let ceiling = 2 * acked.len() + 10_000;
    let got = tokio::task::spawn_blocking(move || {
        common::consume(
            &brokers,
            &topic,
            PARTITIONS,
            ceiling,
            Duration::from_secs(3),
            &|_| {},
        )
    })
    .await
    .expect("consumer thread")
    .expect("consume");
    let delivered: HashSet<String> = got
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let lost = acked.iter().filter(|p| !delivered.contains(*p)).count();
    let panics = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("panicked")
        .count();
    println!(
        "powerloss summary: skip_fsync={skip_fsync} cycles={cycles} acked={} delivered_records={} lost={lost} daemon_panics={panics}",
        acked.len(),
        got.len()
    );
    assert_eq!(
        panics,
        0,
        "the daemon panicked; log:\n{}",
        common::tail(&log, 40)
    );
    drop(relay);
    drop(layer);
    Outcome {
        acked: acked.len(),
        lost,
        refused: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_power_cuts() {
    if let Some(why) = powercut::unavailable() {
        eprintln!("SKIPPED: the power-cut layer cannot be mounted here: {why}");
        return;
    }
    let cycles = std::env::var("POWERLOSS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let outcome = run_mounted(false, cycles).await;
    if let Some(why) = outcome.refused {
        panic!("the daemon did not start after a power cut: {why}");
    }
    assert!(outcome.acked > 0, "the clients got no 2xx at all");
    assert_eq!(
        outcome.lost, 0,
        "{} of {} acknowledged messages lost",
        outcome.lost, outcome.acked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fsync_power_cuts_lose_acked_messages() {
    if let Some(why) = powercut::unavailable() {
        eprintln!("SKIPPED: the power-cut layer cannot be mounted here: {why}");
        return;
    }
    let outcome = run_mounted(true, 2).await;
    assert!(outcome.acked > 0, "the clients got no 2xx at all");
    assert!(
        outcome.lost > 0 || outcome.refused.is_some(),
        "no acknowledged message lost with fsync disabled ({} acked): the power-loss test cannot see a missing fsync",
        outcome.acked
    );
}
