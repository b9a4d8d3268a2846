//! `spoolrelay demo`: the whole path in one process, on a machine with nothing installed.
//! Part of the binary (`src/main.rs` includes it by path), not of the daemon's library.
//!
//! librdkafka's mock cluster is a real Kafka-protocol broker on a random loopback port, so
//! the demo exercises exactly what production does: HTTP batch requests from several
//! concurrent clients → fsynced spool → the policy's Kafka producer → broker; then a
//! consumer reads every partition back and checks each payload arrived (once).
//! The mock keeps only ~5 MiB / 100k messages per partition, hence many partitions.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use spoolrelay::{Config, Shutdown};

#[allow(dead_code)] // the tests use all of it, the demo most
#[path = "mock_kafka.rs"]
mod mock_kafka;
use mock_kafka::{consume, MockKafka};

/// The queue `policy/examples/kafka.lua` routes to Kafka.
pub const DEMO_QUEUE: &str = "kafka";
const TOPIC: &str = "spoolrelay.demo";

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How many messages to push through.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Messages per NDJSON batch request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// The policy to run [default: policy/examples/kafka.lua of this source tree].
    #[arg(long)]
    pub policy: Option<PathBuf>,
}

fn payload(i: usize) -> String {
    format!("spoolrelay demo message {i:09} {}", "x".repeat(64))
}

fn index_of(payload: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(payload).ok()?;
    text.strip_prefix("spoolrelay demo message ")?
        .get(..9)?
        .parse()
        .ok()
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what:>9} [{{bar:40}}] {{pos}}/{{len}} {{per_sec}} {{elapsed}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let n = args.messages;
    let partitions = (n / 20_000).max(8) as i32;
    let kafka = MockKafka::start(TOPIC, partitions)?;
    kafka.export_env();
    let policy_path = args.policy.clone().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/policy/examples/kafka.lua").into()
    });
    let policy = policy::Policy::load(&policy_path)
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", policy_path.display()))?;
    let dir = tempfile::tempdir().context("cannot create a temporary spool directory")?;
    let mut config = Config::new(policy, dir.path().join("spool"));
    config.listen = "127.0.0.1:0".into();
    let daemon = spoolrelay::start(config, Shutdown::new()).await?;
    println!("kafka mock at {} (topic {TOPIC}, {partitions} partitions); spoolrelay at http://{}; pushing {n} messages",
        kafka.brokers, daemon.addr);

    let started = Instant::now();
    let (brokers, topic) = (kafka.brokers.clone(), kafka.topic.clone());
    let consumed_bar = bar(n as u64, "consumed");
    let cb = consumed_bar.clone();
    let consumer = tokio::task::spawn_blocking(move || {
        consume(
            &brokers,
            &topic,
            partitions,
            n,
            Duration::from_secs(60),
            &|c| cb.set_position(c as u64),
        )
    });

    let accepted = Arc::new(AtomicU64::new(0));
    let accepted_bar = bar(n as u64, "accepted");
    let url = format!("http://{}/api/v1/queues/{DEMO_QUEUE}/batch", daemon.addr);
    let http = reqwest::Client::new();
    let chunks: Vec<(usize, usize)> = (0..n)
        .step_by(args.batch.max(1))
        .map(|s| (s, (s + args.batch.max(1)).min(n)))
        .collect();
    let next = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..args.clients.max(1) {
        let (http, url, chunks, next, accepted, pb) = (
            http.clone(),
            url.clone(),
            chunks.clone(),
            next.clone(),
            accepted.clone(),
            accepted_bar.clone(),
        );
        clients.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&(from, to)) = chunks.get(k) else {
                    return anyhow::Ok(());
                };
                let body: String = (from..to)
                    .map(|i| format!("{{\"data\":\"{}\"}}\n", payload(i)))
                    .collect();
                let resp = http.post(&url).body(body).send().await?;
                if !resp.status().is_success() {
                    bail!(
                        "batch {from}..{to} refused: {} {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    );
                }
                accepted.fetch_add((to - from) as u64, Ordering::Relaxed);
                pb.inc((to - from) as u64);
            }
        }));
    }
    for c in clients {
        c.await??;
    }
    accepted_bar.finish();
    let ingest_secs = started.elapsed().as_secs_f64();

    let payloads = consumer.await.context("consumer thread failed")??;
    consumed_bar.finish();
    let total_secs = started.elapsed().as_secs_f64();
    // Delivered = acked by the dispatcher; give the last acks a moment after consumption.
    let deadline = Instant::now() + Duration::from_secs(10);
    let remaining = loop {
        let left: u64 = daemon
            .spool
            .stats(spool::now_ms())
            .queues
            .values()
            .map(|q| q.count)
            .sum();
        if left == 0 || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let accepted = accepted.load(Ordering::Relaxed);
    let mut seen = vec![false; n];
    let (mut verified, mut duplicates, mut foreign) = (0usize, 0usize, 0usize);
    for p in &payloads {
        match index_of(p).filter(|&i| i < n && p.as_slice() == payload(i).as_bytes()) {
            Some(i) if seen[i] => duplicates += 1,
            Some(i) => {
                seen[i] = true;
                verified += 1;
            }
            None => foreign += 1,
        }
    }
    daemon.stop().await?;
    println!();
    println!(
        "accepted   {accepted:>9}  ({:.0} msg/s over HTTP, fsynced)",
        accepted as f64 / ingest_secs
    );
    println!(
        "delivered  {:>9}  (acked by the dispatcher; {remaining} left in the spool)",
        accepted - remaining.min(accepted)
    );
    println!("verified   {verified:>9}  ({:.0} msg/s end to end, {duplicates} duplicates, {foreign} unknown)", verified as f64 / total_secs);
    if verified != n || accepted != n as u64 || remaining != 0 {
        bail!("demo failed: {} of {n} messages missing", n - verified);
    }
    println!("OK: every message went HTTP → spool → Kafka and was read back, in {total_secs:.1} s");
    Ok(())
}
