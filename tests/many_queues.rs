//! Many queues: an idle queue is reaped (no worker, connection, Lua thread or metrics series
//! left), its counters fold into `queue="_reaped"`, and it works again on its next message.
//! A suspended queue is never reaped and stays suspended.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use spoolrelay::queue_series::QueueLabelMode;

/// Delivers everything at once.
const SINK: &str = r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.sink' } },
  }
end)
kumo.on('make.sink', function()
  local sender = {}
  function sender:send(message) return '250 ok' end
  return sender
end)
"#;

const REAP: Duration = Duration::from_secs(1);
const LIMIT: Duration = Duration::from_secs(20);

async fn start(dir: &std::path::Path, label: QueueLabelMode) -> spoolrelay::Daemon {
    common::start_with(SINK, dir, |c| {
        c.queues.queue_reap_interval = REAP;
        c.queues.metrics_queue_label = label;
    })
    .await
}

async fn post(daemon: &spoolrelay::Daemon, queue: &str) {
    let resp = reqwest::Client::new()
        .post(common::url(
            daemon,
            &format!("/api/v1/queues/{queue}/messages"),
        ))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

async fn admin(daemon: &spoolrelay::Daemon, queue: &str, action: &str) {
    let url = common::url(daemon, &format!("/api/admin/queues/{queue}/{action}"));
    let resp = reqwest::Client::new().post(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{action} {queue}");
}

/// `name{labels}` → value.
async fn metrics(daemon: &spoolrelay::Daemon) -> HashMap<String, f64> {
    let text = reqwest::get(common::url(daemon, "/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Polls `/metrics` until `cond` holds on it (panics after [`LIMIT`]).
async fn wait_metrics(
    daemon: &spoolrelay::Daemon,
    what: &str,
    cond: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let start = std::time::Instant::now();
    loop {
        let m = metrics(daemon).await;
        if cond(&m) {
            return m;
        }
        assert!(
            start.elapsed() < LIMIT,
            "timed out waiting for {what}: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Threads of this process whose name starts with `prefix` (Lua states run on `lua:<queue>`).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

fn delivered(queue: &str) -> String {
    format!("spoolrelay_delivered_total{{queue=\"{queue}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaped_queue_is_delivered_normally_when_a_new_message_comes() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), QueueLabelMode::Full).await;
    post(&daemon, "reapme").await;
    common::wait_until("the first message is delivered", LIMIT, || {
        common::queued(&daemon) == 0
    })
    .await;
    assert_eq!(metrics(&daemon).await.get(&delivered("reapme")), Some(&1.0));

    // Reaped: its series are gone, its count lives on in the aggregate, its Lua state too.
    let m = wait_metrics(&daemon, "the idle queue to be reaped", |m| {
        !m.contains_key(&delivered("reapme"))
    })
    .await;
    assert_eq!(m.get(&delivered("_reaped")), Some(&1.0), "{m:?}");
    assert!(!m.contains_key("spoolrelay_queue_depth{queue=\"reapme\"}"));
    common::wait_until("its Lua thread to end", LIMIT, || {
        threads_named("lua:reapme") == 0
    })
    .await;

    // A new message on the reaped queue: a new worker, delivered, counted from 1 again.
    post(&daemon, "reapme").await;
    common::wait_until("the second message is delivered", LIMIT, || {
        common::queued(&daemon) == 0
    })
    .await;
    let m = metrics(&daemon).await;
    let total = m.get(&delivered("reapme")).copied().unwrap_or(0.0)
        + m.get(&delivered("_reaped")).copied().unwrap_or(0.0);
    assert_eq!(total, 2.0, "no delivery is lost from the totals: {m:?}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_queue_is_not_reaped_and_stays_suspended() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), QueueLabelMode::Full).await;
    post(&daemon, "held").await;
    post(&daemon, "free").await;
    common::wait_until("both are delivered", LIMIT, || common::queued(&daemon) == 0).await;
    admin(&daemon, "held", "suspend").await;

    // The unsuspended queue is reaped; by then the suspended one had as long.
    wait_metrics(&daemon, "the free queue to be reaped", |m| {
        !m.contains_key(&delivered("free"))
    })
    .await;
    tokio::time::sleep(3 * REAP).await;
    let m = metrics(&daemon).await;
    assert_eq!(m.get(&delivered("held")), Some(&1.0), "{m:?}");
    assert_eq!(
        m.get("spoolrelay_queue_suspended{queue=\"held\"}"),
        Some(&1.0)
    );

    // Still suspended: a new message waits until the resume.
    post(&daemon, "held").await;
    tokio::time::sleep(3 * REAP).await;
    assert_eq!(
        common::queued(&daemon),
        1,
        "a suspended queue leases nothing"
    );
    admin(&daemon, "held", "resume").await;
    common::wait_until("the held message is delivered after resume", LIMIT, || {
        common::queued(&daemon) == 0
    })
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_labelled_by_tenant_sum_the_tenants_queues() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), QueueLabelMode::Tenant).await;
    for queue in ["acme@a.example", "acme@b.example", "other@a.example"] {
        post(&daemon, queue).await;
    }
    let m = wait_metrics(&daemon, "three deliveries", |m| {
        m.get(&delivered("acme")) == Some(&2.0) && m.get(&delivered("other")) == Some(&1.0)
    })
    .await;
    assert!(
        !m.keys().any(|k| k.contains("a.example")),
        "no series names a queue: {m:?}"
    );
    daemon.stop().await.unwrap();
}

/// With room for two connections, twelve queues still drain at once: a queue that needs a
/// connection takes the place of another queue's idle one instead of waiting for it to time
/// out (60 s here), and never more than two Lua connection states exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_past_the_connection_budget_take_idle_connections() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(SINK, dir.path(), |c| {
        c.queues.queue_reap_interval = Duration::from_secs(600);
        c.queues.max_broker_connections = 2;
    })
    .await;
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watcher = {
        let most = most.clone();
        tokio::spawn(async move {
            loop {
                most.fetch_max(
                    threads_named("lua:budget"),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    for i in 0..12 {
        post(&daemon, &format!("budget{i}")).await;
    }
    common::wait_until("twelve queues drain through two connections", LIMIT, || {
        common::queued(&daemon) == 0
    })
    .await;
    watcher.abort();
    let most = most.load(std::sync::atomic::Ordering::Relaxed);
    // A closed connection's thread ends a moment after its permit is back.
    assert!(most <= 3, "{most} connection threads at once");
    daemon.stop().await.unwrap();
}

/// Sends that take a minute: connections stay busy.
const SLOW: &str = r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.slow' } },
  }
end)
kumo.on('make.slow', function()
  local sender = {}
  function sender:send(message)
    kumo.sleep(60)
    return '250 ok'
  end
  return sender
end)
"#;

/// With room for two connections, both busy, a burst over twenty new queues starts at
/// most eight workers (four start slots per connection) beyond the two that hold the
/// connections: the other queues wait in line as names, not as workers (each a task with its
/// pool and series).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_queues_wait_for_a_start_slot_while_every_connection_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(SLOW, dir.path(), |c| {
        c.queues.max_broker_connections = 2;
        c.drain_timeout = Duration::from_millis(100);
    })
    .await;
    for i in 0..20 {
        post(&daemon, &format!("slow{i}")).await;
    }
    let dispatch = |m: &HashMap<String, f64>| {
        let get = |name: &str| m.get(name).copied();
        (
            get("spoolrelay_dispatch_workers"),
            get("spoolrelay_dispatch_queues_waiting_to_start"),
        )
    };
    wait_metrics(&daemon, "ten queues waiting to start", |m| {
        dispatch(m).1 == Some(10.0)
    })
    .await;
    // Steady: nothing moves until a send ends.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = metrics(&daemon).await;
    assert_eq!(dispatch(&m), (Some(10.0), Some(10.0)), "(workers, waiting)");
    assert_eq!(common::queued(&daemon), 20, "nothing was lost or sent");
    daemon.stop().await.unwrap();
}
