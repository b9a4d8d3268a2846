//! Shared test harness: an in-process daemon around a Lua policy, HTTP helpers, and the
//! brokers' read-back sides.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use spoolrelay::{Config, Daemon, Shutdown};

#[path = "../../src/demo/mock_kafka.rs"]
mod mock_kafka;
pub use mock_kafka::{consume, MockKafka};

#[path = "../../spool/tests/common/dirs.rs"]
pub mod dirs;

pub mod amqp;

/// A port nobody listens on right now (the OS's choice), for a daemon started as a process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// The last `lines` lines of a log file (empty if it cannot be read), for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Messages a daemon process still holds (queued or leased), from its `/api/v1/stats`;
/// `None` while it does not answer.
pub async fn spooled(http: &reqwest::Client, port: u16) -> Option<u64> {
    let stats: serde_json::Value = http
        .get(format!("http://127.0.0.1:{port}/api/v1/stats"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        stats["queues"]
            .as_object()?
            .values()
            .map(|q| q["count"].as_u64().unwrap_or(0))
            .sum(),
    )
}

/// A policy whose sender never delivers: every send is a 451 with `reason`, retried an
/// hour later, so whatever is spooled stays there.
pub fn hold_policy(reason: &str) -> String {
    format!(
        r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {{
    protocol = {{ custom_lua = {{ constructor = 'make.hold' }} }},
    retry_interval = '1h',
  }}
end)
kumo.on('make.hold', function()
  local sender = {{}}
  function sender:send(message) kumo.reject(451, '{reason}') end
  return sender
end)
"#
    )
}

/// The `spoolrelay` binary with `--policy`, `--spool` and `--listen 127.0.0.1:port`, logging
/// warnings: for the tests that need a real process to stop or kill.
pub fn relay_command(
    policy: impl AsRef<std::ffi::OsStr>,
    spool: &Path,
    port: u16,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_spoolrelay"));
    cmd.arg("--policy")
        .arg(policy)
        .arg("--spool")
        .arg(spool)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn");
    cmd
}

/// Starts a daemon on a random port with `lua` as its policy and `dir` as its spool.
pub async fn start(lua: &str, dir: &Path) -> Daemon {
    start_with(lua, dir, |_| {}).await
}

pub async fn start_with(lua: &str, dir: &Path, tweak: impl FnOnce(&mut Config)) -> Daemon {
    let policy = policy::Policy::from_source("test-policy.lua", lua)
        .unwrap_or_else(|e| panic!("test policy does not load: {e}\n{lua}"));
    let mut config = Config::new(policy, dir.to_path_buf());
    config.listen = "127.0.0.1:0".into();
    // As the binary's --spool-chunked-ingest[=false] does, so the suite can run either way.
    if let Some(chunked) = std::env::var_os("SPOOLRELAY_SPOOL_CHUNKED_INGEST") {
        config.spool_options.chunked_ingest = chunked != "0";
    }
    config.drain_timeout = Duration::from_secs(5);
    tweak(&mut config);
    spoolrelay::start(config, Shutdown::new())
        .await
        .expect("daemon starts")
}

pub fn url(daemon: &Daemon, path: &str) -> String {
    format!("http://{}{path}", daemon.addr)
}

/// Messages still in the spool (queued or leased), all queues.
pub fn queued(daemon: &Daemon) -> u64 {
    daemon
        .spool
        .stats(spool::now_ms())
        .queues
        .values()
        .map(|q| q.count)
        .sum()
}

/// Messages still in the spool (queued or leased) in `queue`.
pub fn queued_in(daemon: &Daemon, queue: &str) -> u64 {
    daemon
        .spool
        .stats(spool::now_ms())
        .queues
        .get(queue)
        .map_or(0, |q| q.count)
}

/// Waits until `cond` holds, or panics with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A policy routing every queue to Kafka topic `topic` at `brokers`, with `extra` Lua
/// inside the sender's `send` before producing (e.g. a conditional `kumo.reject`), and
/// `queue_extra` added to the queue config table.
pub fn kafka_policy(brokers: &str, topic: &str, send_prelude: &str, queue_extra: &str) -> String {
    format!(
        r#"
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  return kumo.make_queue_config {{
    protocol = {{ custom_lua = {{ constructor = 'make.kafka' }} }},
    retry_interval = '100ms',
    max_retry_interval = '400ms',
    {queue_extra}
  }}
end)
kumo.on('make.kafka', function(domain, tenant, campaign)
  local producer = kumo.kafka.build_producer {{
    ['bootstrap.servers'] = '{brokers}',
    ['linger.ms'] = '2',
  }}
  local sender = {{}}
  function sender:send(message)
    {send_prelude}
    producer:send {{ topic = '{topic}', payload = message:get_data(), timeout = '10s' }}
    return '250 ok'
  end
  function sender:close()
    producer:close()
  end
  return sender
end)
"#
    )
}

/// Reads `topic` back and returns the payloads sorted (a multiset to compare).
pub async fn consume_sorted(kafka: &MockKafka, want: usize) -> Vec<Vec<u8>> {
    let (brokers, topic, parts) = (kafka.brokers.clone(), kafka.topic.clone(), kafka.partitions);
    let mut got = tokio::task::spawn_blocking(move || {
        consume(
            &brokers,
            &topic,
            parts,
            want,
            Duration::from_secs(20),
            &|_| {},
        )
    })
    .await
    .expect("consumer thread")
    .expect("consume");
    got.sort();
    // Read the topic again, past `want`: anything beyond it would be a duplicate.
    let (brokers, topic) = (kafka.brokers.clone(), kafka.topic.clone());
    let recount = tokio::task::spawn_blocking(move || {
        consume(
            &brokers,
            &topic,
            parts,
            want + 1,
            Duration::from_secs(2),
            &|_| {},
        )
    })
    .await
    .expect("consumer thread")
    .expect("consume")
    .len();
    assert!(
        recount <= want,
        "Kafka holds {recount} messages, {want} expected: duplicates"
    );
    got
}

/// Waits until a daemon process on `port` answers `/livez`, or panics after 30 s (generous:
/// some tests start it with tight file and memory limits on a loaded machine).
pub async fn wait_live(port: u16) {
    let start = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/livez")).await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the daemon on port {port} did not come up within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for a child process to exit, or panics with `what` after `limit`.
pub async fn wait_exit(
    child: &mut std::process::Child,
    what: &str,
    limit: Duration,
) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(start.elapsed() < limit, "{what}: no exit within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
