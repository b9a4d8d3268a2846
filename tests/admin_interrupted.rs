//! An admin requeue whose client hangs up half-way still runs to the end: axum drops a
//! handler's future when its connection closes, so the rewrite runs in a task of its own.
//! Before, the chunks already committed stayed leased (invisible) until a restart.

mod common;

use std::time::Duration;

use spool::NewMessage;
use tokio::io::AsyncWriteExt;

const N: usize = 40_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_interrupted_by_a_client_hangup_still_completes() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(&common::hold_policy("held"), dir.path()).await;
    let http = reqwest::Client::new();
    let suspended = http
        .post(common::url(&daemon, "/api/admin/queues/from/suspend"))
        .send()
        .await
        .unwrap();
    assert!(suspended.status().is_success());
    for chunk in 0..N / 5_000 {
        let batch: Vec<NewMessage> = (0..5_000)
            .map(|i| NewMessage {
                queue: "from".into(),
                meta: Default::default(),
                payload: format!("m{chunk}-{i}").into_bytes(),
            })
            .collect();
        daemon.spool.enqueue(batch).await.unwrap();
    }
    let count = |queue: &str| {
        let stats = daemon.spool.stats(spool::now_ms());
        stats
            .queues
            .get(queue)
            .map_or((0, 0), |q| (q.count, q.leased))
    };

    // Rebind `from` to `to` over a raw connection, and hang up once the rewrite started.
    let mut conn = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let body = r#"{"to":"to"}"#;
    let request = format!(
        "POST /api/admin/queues/from/requeue HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    common::wait_until("the rewrite to start", Duration::from_secs(30), || {
        let (_, leased) = count("from");
        leased > 0 || count("to").0 > 0
    })
    .await;
    let moved_at_hangup = count("to").0;
    drop(conn);
    assert!(
        (moved_at_hangup as usize) < N,
        "the rewrite finished before the hang-up: the test proved nothing"
    );

    common::wait_until(
        "every message to be moved and none left leased",
        Duration::from_secs(60),
        || count("to") == (N as u64, 0) && count("from") == (0, 0),
    )
    .await;
    daemon.stop().await.unwrap();
}
