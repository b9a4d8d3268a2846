//! Issue 10 A through the real daemon process: a policy that never yields, one that spins
//! inside `pcall`, and one that allocates without bound cost only their own queues.
//!
//! Before Lua ran on threads of its own, the first message to `spin` held a runtime worker
//! for good: ingest, `/healthz` and SIGTERM stopped answering on a 2-core machine. Every
//! wait here is bounded, so that failure shows as a failed assertion, not a hung test.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const POLICY: &str = r#"
kumo.on('get_queue_config', function(domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.' .. domain } },
    -- `hog` must reach the memory limit before its deadline, also on a loaded machine.
    send_timeout = domain == 'hog' and '20s' or '1s',
    retry_interval = '2s',
    max_retry_interval = '4s',
  }
end)
kumo.on('make.ok', function()
  return { send = function(self, message) return '250 ok' end }
end)
kumo.on('make.spin', function()
  local sender = {}
  function sender:send(message) while true do end end
  return sender
end)
kumo.on('make.pcallspin', function()
  local sender = {}
  function sender:send(message)
    while true do pcall(function() while true do end end) end
  end
  return sender
end)
kumo.on('make.hog', function()
  local sender = {}
  function sender:send(message)
    local t = {}
    for i = 1, 1e12 do t[i] = string.rep('x', 1024) .. i end
  end
  return sender
end)
"#;

const DRAIN: Duration = Duration::from_secs(2);

struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(policy: &Path, spool: &Path, port: u16, event_timeout: &str) -> Relay {
    let child = common::relay_command(policy, spool, port)
        .arg("--drain-timeout")
        .arg("2s")
        .arg("--lua-event-timeout")
        .arg(event_timeout)
        .arg("--lua-memory-limit")
        .arg("32")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn spoolrelay");
    Relay(child)
}

/// Every request must answer within 5 s: on the frozen daemon it never does.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn post(http: &reqwest::Client, port: u16, queue: &str, body: &str) -> reqwest::StatusCode {
    http.post(format!(
        "http://127.0.0.1:{port}/api/v1/queues/{queue}/messages"
    ))
    .body(body.to_owned())
    .send()
    .await
    .unwrap_or_else(|e| panic!("POST to queue {queue} got no answer: {e}"))
    .status()
}

async fn stats(http: &reqwest::Client, port: u16) -> serde_json::Value {
    http.get(format!("http://127.0.0.1:{port}/api/v1/stats"))
        .send()
        .await
        .expect("/api/v1/stats got no answer")
        .json()
        .await
        .unwrap()
}

/// Messages in `queue` with at least one recorded attempt, per the stats' histogram.
fn attempted(stats: &serde_json::Value, queue: &str) -> u64 {
    stats["queues"][queue]["attempts"]
        .as_object()
        .map(|h| {
            h.iter()
                .filter(|(n, _)| n.parse::<u32>().unwrap_or(0) >= 1)
                .map(|(_, c)| c.as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

fn count(stats: &serde_json::Value, queue: &str) -> u64 {
    stats["queues"][queue]["count"].as_u64().unwrap_or(0)
}

async fn wait_healthy(http: &reqwest::Client, port: u16) {
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
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then the process must exit 0 within the drain timeout + 5 s.
async fn sigterm_and_wait(relay: &mut Relay) {
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(relay.0.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = relay.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < DRAIN + Duration::from_secs(5),
            "daemon did not exit within --drain-timeout + 5 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "SIGTERM should exit 0, got {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_policies_cost_only_their_own_queues() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let policy = dir.path().join("runaway.lua");
    std::fs::write(&policy, POLICY).unwrap();
    let port = common::free_port();
    let mut relay = spawn(&policy, &spool_dir, port, "2s");
    let http = client();
    wait_healthy(&http, port).await;

    for queue in ["spin", "pcallspin", "hog"] {
        assert!(post(&http, port, queue, "runaway").await.is_success());
    }
    // While those run away (each retried every few seconds on a fresh Lua state), ingest to
    // another queue keeps answering 2xx, /healthz answers, and `ok` drains.
    let until = Instant::now() + Duration::from_secs(6);
    let mut sent = 0;
    while Instant::now() < until {
        let status = post(&http, port, "ok", &format!("ok {sent}")).await;
        assert!(
            status.is_success(),
            "ingest answered {status} while a policy ran away"
        );
        sent += 1;
        let health = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .expect("/healthz got no answer while a policy ran away");
        assert!(health.status().is_success());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let start = Instant::now();
    loop {
        let s = stats(&http, port).await;
        let done = count(&s, "ok") == 0
            && ["spin", "pcallspin", "hog"]
                .iter()
                .all(|q| attempted(&s, q) >= 1);
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "queue ok did not drain, or a runaway message got no recorded attempt: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGTERM stops the process within the drain timeout plus a few seconds, even while
    // the runaway sends are being retried.
    sigterm_and_wait(&mut relay).await;

    // What was not delivered is still spooled, with its attempts and why.
    let (spool, _) = spool::Spool::open(&spool_dir, Default::default()).unwrap();
    let expect = [
        ("spin", "send timed out after 1s"),
        ("pcallspin", "send timed out after 1s"),
        ("hog", "Lua memory limit of 32 MiB reached"),
    ];
    for (queue, why) in expect {
        let msgs = spool.list(queue, 10).unwrap();
        assert_eq!(msgs.len(), 1, "queue {queue} lost its message");
        let m = &msgs[0];
        assert!(m.attempts >= 1, "{queue}: attempts not persisted: {m:?}");
        let error = m.last_error.as_deref().unwrap_or("");
        assert!(error.starts_with("451 "), "{queue}: {error}");
        assert!(error.contains(why), "{queue}: {error:?} should say {why:?}");
        if why.contains("timed out") {
            assert!(error.contains("stopped at"), "{queue}: {error}");
            assert!(
                error.contains(&format!("message {}", m.id)),
                "{queue}: {error}"
            );
        }
    }
    assert!(
        spool.list("ok", 10).unwrap().is_empty(),
        "ok was not drained"
    );
}

/// `get_queue_config` and a constructor that never return, under a long event timeout:
/// SIGTERM does not wait for them (the queue worker was inside `fill`, waiting on the policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_stuck_constructor_or_queue_config() {
    const STUCK: &str = r#"
kumo.on('get_queue_config', function(domain)
  if domain == 'cfgspin' then while true do end end
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.' .. domain } },
  }
end)
kumo.on('make.ctorspin', function()
  while true do end
end)
"#;
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let policy = dir.path().join("stuck.lua");
    std::fs::write(&policy, STUCK).unwrap();
    let port = common::free_port();
    let mut relay = spawn(&policy, &spool_dir, port, "120s");
    let http = client();
    wait_healthy(&http, port).await;
    for queue in ["ctorspin", "cfgspin"] {
        assert!(post(&http, port, queue, "stuck").await.is_success());
    }
    // Both workers are now waiting on the policy (for up to 120 s).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let health = http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .expect("/healthz got no answer");
    assert!(health.status().is_success());
    sigterm_and_wait(&mut relay).await;
    let (spool, _) = spool::Spool::open(&spool_dir, Default::default()).unwrap();
    for queue in ["ctorspin", "cfgspin"] {
        assert_eq!(
            spool.list(queue, 10).unwrap().len(),
            1,
            "{queue} lost its message"
        );
    }
}
