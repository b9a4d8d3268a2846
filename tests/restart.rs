//! The binary, stopped by SIGTERM with a backlog (its policy rejects everything), exits 0;
//! started again with a policy that delivers, it sends the whole backlog, once.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

fn spawn(policy: &Path, spool: &Path, port: u16) -> Child {
    common::relay_command(policy, spool, port)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn spoolrelay")
}

async fn wait_healthy(port: u16) {
    let start = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await {
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

fn sigterm_and_wait(child: &mut Child) -> std::process::ExitStatus {
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "daemon did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_survives_sigterm_and_is_delivered_after_restart() {
    let kafka = common::MockKafka::start("relay.restart", 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let rejecting = dir.path().join("rejecting.lua");
    let delivering = dir.path().join("delivering.lua");
    std::fs::write(
        &rejecting,
        common::kafka_policy(
            &kafka.brokers,
            &kafka.topic,
            "kumo.reject(451, 'broker on holiday')",
            "",
        ),
    )
    .unwrap();
    std::fs::write(
        &delivering,
        common::kafka_policy(&kafka.brokers, &kafka.topic, "", ""),
    )
    .unwrap();

    let port = common::free_port();
    let mut first = spawn(&rejecting, &spool, port);
    wait_healthy(port).await;
    let payloads: Vec<String> = (0..1000).map(|i| format!("backlog {i}")).collect();
    let body: String = payloads
        .iter()
        .map(|p| format!("{}\n", json!({"data": p})))
        .collect();
    let resp = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{port}/api/v1/queues/backlog/batch"
        ))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Let a few rejections happen, so the backlog carries attempts.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = sigterm_and_wait(&mut first);
    assert!(status.success(), "SIGTERM should exit 0, got {status}");

    let port = common::free_port();
    let mut second = spawn(&delivering, &spool, port);
    wait_healthy(port).await;
    let got = common::consume_sorted(&kafka, payloads.len()).await;
    let mut want: Vec<Vec<u8>> = payloads.iter().map(|p| p.clone().into_bytes()).collect();
    want.sort();
    assert_eq!(
        got.len(),
        want.len(),
        "backlog not fully delivered after restart"
    );
    assert!(got == want, "payloads differ after restart");
    let status = sigterm_and_wait(&mut second);
    assert!(status.success());
}
