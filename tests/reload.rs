//! Policy reload without a restart (issue 14): the routing key changes under load, nothing
//! is lost, and what comes in after the reload goes to the new destination; a broken policy
//! is refused with its `file:line` and delivery goes on with the old one. Against the real
//! RabbitMQ at `SPOOLRELAY_TEST_AMQP_URL` (tests/run.sh starts it).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use spoolrelay::{Config, Daemon, Shutdown};

/// Publishes every message of queue `reload` to the default exchange with `routing_key`.
fn amqp_policy(routing_key: &str) -> String {
    format!(
        r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {{
    protocol = {{ custom_lua = {{ constructor = 'make.amqp' }} }},
    retry_interval = '1s',
  }}
end)
kumo.on('make.amqp', function()
  local client = kumo.amqp.build_client '{url}'
  local sender = {{}}
  function sender:send(message)
    local result = client:publish {{ routing_key = '{routing_key}', payload = message:get_data() }}:wait()
    if result.status == 'Ack' then return '250 ok' end
    kumo.reject(451, kumo.json_encode(result))
  end
  function sender:close() client:close() end
  return sender
end)
"#,
        url = common::amqp::url()
    )
}

/// A daemon whose policy is loaded from `file` (so it can be reloaded).
async fn start_from_file(file: &Path, spool: &Path) -> Daemon {
    let policy = policy::Policy::load(file).expect("the first policy loads");
    let mut config = Config::new(policy, spool.to_path_buf());
    config.listen = "127.0.0.1:0".into();
    config.drain_timeout = Duration::from_secs(5);
    spoolrelay::start(config, Shutdown::new())
        .await
        .expect("daemon starts")
}

async fn post(http: &reqwest::Client, daemon: &Daemon, body: String) {
    let resp = http
        .post(common::url(daemon, "/api/v1/queues/reload/messages"))
        .body(body)
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(resp.status(), 200, "ingest refused a message");
}

async fn reload(http: &reqwest::Client, daemon: &Daemon) -> (u16, serde_json::Value) {
    let resp = http
        .post(common::url(daemon, "/api/admin/reload"))
        .send()
        .await
        .expect("admin API answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_switches_destination_and_loses_nothing() {
    let (_c1, a) = common::amqp::fresh_queue("spoolrelay_reload_a").await;
    let (_c2, b) = common::amqp::fresh_queue("spoolrelay_reload_b").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.lua");
    std::fs::write(&file, amqp_policy("spoolrelay_reload_a")).unwrap();
    let daemon = start_from_file(&file, &dir.path().join("spool")).await;
    let http = reqwest::Client::new();

    let mut before = Vec::new();
    for i in 0..300 {
        let body = format!("before {i}");
        post(&http, &daemon, body.clone()).await;
        before.push(body);
    }
    // A broken policy (an error on line 3) while messages flow: refused, the old one stays.
    std::fs::write(&file, "-- broken\nlocal x = 1\nerror('no such broker')\n").unwrap();
    let (status, answer) = reload(&http, &daemon).await;
    assert_eq!(status, 422, "a broken policy must be refused: {answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("policy.lua:3"),
        "the refusal names file:line: {error}"
    );
    let mut refused = Vec::new();
    for i in 0..200 {
        let body = format!("after refused reload {i}");
        post(&http, &daemon, body.clone()).await;
        refused.push(body);
    }
    // The real change, with messages still in flight from above.
    std::fs::write(&file, amqp_policy("spoolrelay_reload_b")).unwrap();
    let (status, answer) = reload(&http, &daemon).await;
    assert_eq!(status, 200, "the new policy must load: {answer}");
    assert_eq!(answer["generation"], 1, "{answer}");
    let mut after = Vec::new();
    for i in 0..300 {
        let body = format!("after reload {i}");
        post(&http, &daemon, body.clone()).await;
        after.push(body);
    }

    common::wait_until("the spool to empty", Duration::from_secs(60), || {
        common::queued(&daemon) == 0
    })
    .await;
    let idle = Duration::from_secs(1);
    let got_a: Vec<String> = common::amqp::take_all(&a, "spoolrelay_reload_a", idle)
        .await
        .into_iter()
        .map(|d| String::from_utf8(d).unwrap())
        .collect();
    let got_b: Vec<String> = common::amqp::take_all(&b, "spoolrelay_reload_b", idle)
        .await
        .into_iter()
        .map(|d| String::from_utf8(d).unwrap())
        .collect();
    let all: HashSet<&String> = got_a.iter().chain(&got_b).collect();
    for body in before.iter().chain(&refused).chain(&after) {
        assert!(all.contains(body), "lost across the reload: {body:?}");
    }
    let in_a: HashSet<&String> = got_a.iter().collect();
    for body in &after {
        assert!(
            !in_a.contains(body),
            "{body:?} came in after the reload but went to the old routing key"
        );
    }
    assert!(
        refused.iter().any(|m| in_a.contains(m)),
        "after the refused reload the old policy should have kept delivering to queue a"
    );
    daemon.stop().await.expect("daemon stops");
}

/// SIGHUP reloads the policy of a daemon process: a message the old policy keeps failing
/// (451, retried each second) is delivered by the new one, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy_file() {
    let (_c, ch) = common::amqp::fresh_queue("spoolrelay_reload_hup").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.lua");
    let failing = amqp_policy("spoolrelay_reload_hup").replace(
        "local result",
        "kumo.reject(451, 'old policy')\n    local result",
    );
    std::fs::write(&file, failing).unwrap();
    let port = common::free_port();
    let mut child = common::relay_command(&file, &dir.path().join("spool"), port)
        .spawn()
        .expect("start spoolrelay");
    common::wait_live(port).await;
    let http = reqwest::Client::new();
    let resp = http
        .post(format!(
            "http://127.0.0.1:{port}/api/v1/queues/reload/messages"
        ))
        .body("across a SIGHUP")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        common::spooled(&http, port).await,
        Some(1),
        "the old policy never delivers"
    );

    std::fs::write(&file, amqp_policy("spoolrelay_reload_hup")).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(sent, 0, "send SIGHUP");
    let got = common::amqp::take_all(&ch, "spoolrelay_reload_hup", Duration::from_secs(5)).await;
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "SIGHUP must not stop the daemon");
    assert_eq!(got, vec![b"across a SIGHUP".to_vec()]);
}
