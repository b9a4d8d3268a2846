//! `spoolctl --url` against a real daemon (in-process, on a random port): it prints what
//! the offline commands print for the same spool, and changes a live spool safely.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use spool::{Meta, MetaValue, NewMessage};

/// Every send fails: 451 (retried in an hour) or, for `poison`, 550 (dead-lettered). So
/// the spool holds still while the test looks at it.
const STALLED: &str = r#"
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.stalled' } },
    retry_interval = '1h',
    max_age = '1d',
    on_permanent_failure = 'dead_letter',
  }
end)
kumo.on('make.stalled', function(domain, tenant, campaign)
  local sender = {}
  function sender:send(message)
    if message:get_data():find('poison') then kumo.reject(550, 'poisoned') end
    kumo.reject(451, 'broker away')
  end
  function sender:close() end
  return sender
end)
"#;

async fn start(dir: &Path, token: Option<&str>) -> spoolrelay::Daemon {
    let policy = policy::Policy::from_source("stalled.lua", STALLED).expect("policy loads");
    let mut config = spoolrelay::Config::new(policy, dir.to_path_buf());
    config.listen = "127.0.0.1:0".into();
    config.admin_token = token.map(Into::into);
    spoolrelay::start(config, spoolrelay::Shutdown::new())
        .await
        .expect("daemon starts")
}

async fn spoolctl(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_spoolctl"))
            .env_remove("SPOOLRELAY_ADMIN_TOKEN")
            .env_remove("SPOOLRELAY_URL")
            .args(args)
            .output()
            .expect("run spoolctl")
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn json(list: &[&str]) -> Value {
    json_of(args(list)).await
}

async fn json_of(list: Vec<String>) -> Value {
    let out = spoolctl(list.clone()).await;
    assert!(
        out.status.success(),
        "spoolctl {list:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Enqueues 3 messages in `a`, 1 in `b`, 1 poison in `dead`, and waits until each was
/// tried once: 4 waiting with one failed attempt, 1 dead-lettered.
async fn populate(daemon: &spoolrelay::Daemon) -> Vec<String> {
    let mut meta = Meta::new();
    meta.insert("tenant".into(), MetaValue::Str("acme".into()));
    meta.insert("tags".into(), MetaValue::Json(r#"["x",1]"#.into()));
    let m = |q: &str, p: &[u8]| NewMessage {
        queue: q.into(),
        meta: meta.clone(),
        payload: p.to_vec(),
    };
    let ids = daemon
        .spool
        .enqueue(vec![
            m("a", b"\x00\xffbinary"),
            m("a", b"two"),
            m("a", b"three"),
            m("b", b"bee"),
            m("dead", b"poison"),
        ])
        .await
        .unwrap();
    wait_until("every message tried once", || {
        let s = daemon.spool.stats(spool::now_ms());
        s.dead_letter == 1
            && s.queues
                .values()
                .map(|q| q.attempts.get(&1).copied().unwrap_or(0))
                .sum::<u64>()
                == 4
            && s.queues.values().all(|q| q.leased == 0)
    })
    .await;
    ids.iter().map(ToString::to_string).collect()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_and_offline_print_the_same_for_the_same_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().to_str().unwrap().to_owned();
    let daemon = start(dir.path(), None).await;
    let ids = populate(&daemon).await;
    let url = format!("http://{}", daemon.addr);

    let reads: [Vec<&str>; 5] = [
        vec!["summary"],
        vec!["ls", "a"],
        vec!["ls", "a", "--failed", "--limit", "2"],
        vec!["show", &ids[0], "--data"],
        vec!["dead-letter", "ls"],
    ];
    let mut online = Vec::new();
    for read in &reads {
        let mut all = vec!["--url", &url, "--json"];
        all.extend(read);
        online.push(json(&all).await);
    }
    assert_eq!(online[0]["queues"]["a"]["count"], 3);
    assert_eq!(online[0]["queues"]["a"]["attempts"]["1"], 3);
    assert_eq!(online[0]["dead_letter"], 1);
    assert_eq!(online[2].as_array().unwrap().len(), 2);
    assert_eq!(online[3]["meta"]["tags"], serde_json::json!(["x", 1]));
    assert_eq!(online[4][0]["last_error"], "550 poisoned");
    let raw = spoolctl(args(&["--url", &url, "show", &ids[0], "--data"])).await;
    assert_eq!(
        raw.stdout, b"\x00\xffbinary",
        "payload byte for byte, online too"
    );
    let missing = spoolctl(args(&["--url", &url, "show", "999999"])).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));

    daemon.stop().await.unwrap();
    for (read, online) in reads.iter().zip(&online) {
        let mut all = vec!["--spool", &spool_dir, "--json"];
        all.extend(read);
        assert_eq!(
            &json(&all).await,
            online,
            "spoolctl {read:?} online vs offline"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_go_through_the_daemon_with_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), Some("tok")).await;
    populate(&daemon).await;
    let url = format!("http://{}", daemon.addr);
    let with_token = |rest: &[&str]| {
        let mut all = vec!["--url", url.as_str(), "--token", "tok", "--json"];
        all.extend(rest);
        all.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };

    let refused = spoolctl(args(&["--url", &url, "summary"])).await;
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("401") && err.contains("--token"), "{err}");

    // Suspend shows in the human summary; the queue's messages stay put.
    let out = spoolctl(with_token(&["suspend", "a"])).await;
    assert!(out.status.success());
    let mut human = with_token(&["summary"]);
    human.retain(|a| a != "--json");
    let text = String::from_utf8(spoolctl(human).await.stdout).unwrap();
    assert!(text.contains("a (suspended)"), "{text}");

    // Requeue (expedite) a suspended queue: due now, but not sent while suspended.
    let made_due = json_of(with_token(&["requeue", "--queue", "a"])).await;
    assert_eq!(made_due["count"], 3);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let a = daemon.spool.stats(spool::now_ms()).queues["a"].clone();
    assert_eq!((a.due_now, a.attempts.get(&1).copied()), (3, Some(3)));

    // Resume: they are tried again at once (and fail again: attempts 2).
    assert!(spoolctl(with_token(&["resume", "a"]))
        .await
        .status
        .success());
    wait_until("a second attempt for a's messages", || {
        let s = daemon.spool.stats(spool::now_ms());
        s.queues["a"].attempts.get(&2) == Some(&3) && s.queues["a"].leased == 0
    })
    .await;

    let moved = json_of(with_token(&["requeue", "--queue", "a", "--to", "c"])).await;
    assert_eq!(moved["count"], 3);
    let requeued = json_of(with_token(&["dead-letter", "requeue", "--queue", "dead"])).await;
    assert_eq!(requeued["count"], 1);
    let stats = daemon.spool.stats(spool::now_ms());
    assert!(!stats.queues.contains_key("a"));
    assert_eq!(stats.queues["c"].count, 3);

    // What needs the directory says so; what needs a daemon says so.
    let offline_only = spoolctl(with_token(&["verify"])).await;
    assert_eq!(offline_only.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&offline_only.stderr).contains("spool directory only"));
    let no_url = spoolctl(args(&["--spool", "/nonexistent", "suspend", "a"])).await;
    assert_eq!(no_url.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_url.stderr).contains("--url"));
    daemon.stop().await.unwrap();
}

/// `spoolctl --url U drain` waits for the drain to end and exits with the daemon's code; its
/// report names what is left and why. Here every message waits an hour for its retry (past
/// the deadline) or is a dead letter: 3. The daemon stops by itself (the drain ended it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_the_end_and_exits_with_the_daemons_code() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), None).await;
    populate(&daemon).await;
    let url = format!("http://{}", daemon.addr);
    let out = spoolctl(args(&["--url", &url, "drain", "--deadline", "30s"])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{text}\n{said}");
    assert!(
        text.contains("a: 3 waiting for a retry due after the deadline"),
        "{text}"
    );
    assert!(text.contains("b: 1 waiting"), "{text}");
    assert!(text.contains("dead letters: 1"), "{text}");
    let stopped = tokio::time::timeout(Duration::from_secs(15), daemon.wait()).await;
    stopped.expect("the drain stops the daemon").unwrap();
    let offline = spoolctl(args(&["--spool", dir.path().to_str().unwrap(), "summary"])).await;
    assert!(
        offline.status.success(),
        "the drained daemon released its spool"
    );
}

/// `spoolctl --url U reload` loads the daemon's policy file again: a good file answers with
/// the new generation; a broken one exits 2 with the error's `file:line`, and the daemon
/// keeps its policy (a later good reload is generation 2, not 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reports_the_new_generation_or_the_load_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stalled.lua");
    std::fs::write(&file, STALLED).unwrap();
    let policy = policy::Policy::load(&file).expect("policy loads");
    let mut config = spoolrelay::Config::new(policy, dir.path().join("spool"));
    config.listen = "127.0.0.1:0".into();
    let daemon = spoolrelay::start(config, spoolrelay::Shutdown::new())
        .await
        .expect("daemon starts");
    let url = format!("http://{}", daemon.addr);

    let done = json(&["--url", &url, "--json", "reload"]).await;
    assert_eq!(done["generation"], 1, "{done}");
    std::fs::write(
        &file,
        "kumo.on('get_queue_config', function() end)\nlocal x = = 1\n",
    )
    .unwrap();
    let refused = spoolctl(args(&["--url", &url, "reload"])).await;
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("stalled.lua:2") && err.contains("422"),
        "{err}"
    );
    std::fs::write(&file, STALLED).unwrap();
    let out = spoolctl(args(&["--url", &url, "reload"])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("reloaded (generation 2)"), "{text}");
    daemon.stop().await.unwrap();
}

/// `spoolctl suspend Q --for 1h --reason R`: `summary` shows the reason and the time left,
/// also after the daemon restarted (the suspension is kept in the spool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_with_reason_and_expiry_shows_in_summary_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), None).await;
    let url = format!("http://{}", daemon.addr);
    let out = spoolctl(args(&[
        "--url",
        &url,
        "suspend",
        "a",
        "--for",
        "1h",
        "--reason",
        "broker maintenance",
    ]))
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("suspended for 59m"),
        "{text}"
    );
    let bad = spoolctl(args(&["--url", &url, "suspend", "a", "--for", "soon"])).await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"soon\""));
    daemon.stop().await.unwrap();

    let daemon = start(dir.path(), None).await;
    let url = format!("http://{}", daemon.addr);
    let out = spoolctl(args(&["--url", &url, "summary"])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("suspended: a (reason: broker maintenance; 59m"),
        "{text}"
    );
    assert!(text.contains("left)"), "{text}");
    daemon.stop().await.unwrap();
}
