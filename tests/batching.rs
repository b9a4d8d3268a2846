//! `min_batch_size` / `max_batch_latency`, as in KumoMTA: messages that trickle in are sent
//! as one batch once `min_batch_size` of them are due, a lone message still goes out when
//! the latency has passed, and a gathering batch never holds up shutdown.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Every `send_batch` answers `'250 batch of N'`, every single `send` `'250 single'`, so the
/// delivery log shows how each message was sent. `slow` gathers for an hour.
const POLICY: &str = r#"
kumo.on('get_queue_config', function(domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = {
      constructor = 'make.count',
      batch_size = 5,
      min_batch_size = 5,
      max_batch_latency = (domain == 'slow') and '1h' or '2s',
    } },
  }
end)
kumo.on('make.count', function()
  local sender = {}
  function sender:send(message) return '250 single' end
  function sender:send_batch(messages)
    local results = {}
    for i = 1, #messages do results[i] = '250 batch of ' .. #messages end
    return results
  end
  return sender
end)
"#;

async fn post(http: &reqwest::Client, daemon: &spoolrelay::Daemon, queue: &str) {
    let status = http
        .post(common::url(
            daemon,
            &format!("/api/v1/queues/{queue}/messages"),
        ))
        .body("x")
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
}

/// The responses of the Delivery records of `queue` in the delivery log.
fn deliveries(log: &Path, queue: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["type"] == "Delivery" && r["queue"] == queue)
        .map(|r| r["response"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_messages_are_sent_as_one_batch_and_a_lone_one_after_the_latency() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("delivery.jsonl");
    let daemon = common::start_with(POLICY, &dir.path().join("spool"), |c| {
        c.delivery_log = Some(log.clone());
    })
    .await;
    let http = reqwest::Client::new();

    // Five messages, one by one, well within the 2 s latency: one batch of five.
    for _ in 0..5 {
        post(&http, &daemon, "app").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::wait_until("five deliveries", Duration::from_secs(10), || {
        deliveries(&log, "app").len() == 5
    })
    .await;
    assert_eq!(deliveries(&log, "app"), vec!["250 batch of 5"; 5]);

    // A lone message waits for company, then goes alone once the latency has passed.
    let posted = Instant::now();
    post(&http, &daemon, "lone").await;
    common::wait_until("the lone delivery", Duration::from_secs(10), || {
        deliveries(&log, "lone").len() == 1
    })
    .await;
    assert!(
        posted.elapsed() >= Duration::from_millis(1500),
        "sent after {:?}, before the 2 s latency",
        posted.elapsed()
    );
    assert_eq!(deliveries(&log, "lone"), vec!["250 single"]);

    // A batch gathering for an hour does not hold up shutdown, and its message stays.
    post(&http, &daemon, "slow").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(common::queued(&daemon), 1, "the slow queue's message waits");
    let spool = daemon.spool.clone();
    let stopping = Instant::now();
    daemon.stop().await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    assert!(spool.next_due("slow").is_some(), "still spooled");
}
