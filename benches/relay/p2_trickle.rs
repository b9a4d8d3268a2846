//! P2t: the Kafka drain when messages trickle in (enqueues of 10 while the relay sends),
//! with and without KumoMTA's batch gathering (`min_batch_size` / `max_batch_latency`).
//! A backlog (P2) fills every batch anyway; a trickle is where gathering shows.

use std::time::Duration;

use spoolrelay::Daemon;

use super::{
    example_policy, fill, message, row, start_daemon, timed, wait_empty, KAFKA_QUEUE, SMALL,
};

/// Messages per enqueue call in the trickle: what a busy HTTP client sends at once.
const TRICKLE_CHUNK: usize = 10;

/// P2t: messages arrive in small enqueues while the relay sends, so each fill finds only a
/// few due. kafka.lua as shipped (`batch_size = 100`, `min_batch_size` 1) against the same
/// with `min_batch_size = 100, max_batch_latency = '20ms'` (KumoMTA's batching knobs).
pub async fn p2_trickle(n: usize) {
    println!("\nP2t Kafka trickle: {n} x {SMALL} B in enqueues of {TRICKLE_CHUNK}, sent while they arrive");
    let shipped = example_policy("kafka.lua");
    let gathering = (
        shipped.0.clone(),
        shipped.1.replacen(
            "batch_size = 100,",
            "batch_size = 100, min_batch_size = 100, max_batch_latency = '20ms',",
            1,
        ),
    );
    assert_ne!(
        shipped.1, gathering.1,
        "kafka.lua still sets batch_size = 100"
    );
    let (base, base_cpu, base_per_send) = relay_trickle(shipped, n).await;
    let (relay, relay_cpu, per_send) = relay_trickle(gathering, n).await;
    row(
        "min_batch_size 100, 20ms",
        relay,
        relay_cpu,
        "min_batch_size 1",
        base,
        base_cpu,
    );
    println!(
        "  messages per send_batch: {per_send:.1} (min_batch_size 100) vs {base_per_send:.1} (1)"
    );
}

/// Enqueues `n` messages in chunks of [`TRICKLE_CHUNK`] (each awaited: fsynced) while the
/// daemon sends; times until the spool is empty. Returns msg/s, CPU % and messages per send.
async fn relay_trickle(policy: (String, String), n: usize) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = start_daemon(&policy.0, &policy.1, dir.path()).await;
    fill(&daemon.spool, KAFKA_QUEUE, 100, SMALL).await;
    assert!(
        wait_empty(&daemon, Duration::from_secs(30)).await,
        "warm-up messages were not delivered"
    );
    let sends_before = send_calls(&daemon).await;
    let ((), secs, cpu) = timed(async {
        for start in (0..n).step_by(TRICKLE_CHUNK) {
            let chunk = (start..(start + TRICKLE_CHUNK).min(n))
                .map(|i| message(KAFKA_QUEUE, SMALL, i))
                .collect();
            daemon.spool.enqueue(chunk).await.expect("trickle enqueue");
        }
        if !wait_empty(&daemon, Duration::from_secs(600)).await {
            println!("  (relay did not drain within 600 s)");
        }
    })
    .await;
    let sends = send_calls(&daemon).await - sends_before;
    daemon.stop().await.expect("daemon stops");
    (n as f64 / secs, cpu, n as f64 / sends.max(1.0))
}

/// How many send calls the daemon made for the kafka queue (its batch-size histogram's count).
async fn send_calls(daemon: &Daemon) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", daemon.addr))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find(|l| {
            l.starts_with("spoolrelay_send_batch_size_count")
                && l.contains(&format!("queue=\"{KAFKA_QUEUE}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
