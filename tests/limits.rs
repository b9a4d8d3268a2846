//! Isolation and limits, ingest side (issue 10, B and C): no single request or client can
//! take the daemon's memory, connections or shutdown, and a full spool says so with a 503
//! that clears as deliveries drain it.
//!
//! The tests that are about the process (memory, file descriptors, SIGTERM) run the real
//! binary; the others run the daemon in process.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Messages stay queued: every send is a 451, retried an hour later.
fn hold() -> String {
    common::hold_policy("held by the limits test")
}

/// Delivers everything ('250 ok'): used with admin suspend/resume to hold, then drain.
const SINK: &str = r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.sink' } },
    retry_interval = '100ms',
  }
end)
kumo.on('make.sink', function()
  local sender = {}
  function sender:send(message) return '250 ok' end
  return sender
end)
"#;

/// The binary on `port` with the hold policy and `args`, its open-file limit set to
/// `nofile` and its address space to 4 GiB (so a memory bomb aborts it rather than the
/// machine).
fn spawn_relay(dir: &Path, port: u16, args: &[&str], nofile: u64) -> Child {
    let policy = dir.join("hold.lua");
    std::fs::write(&policy, hold()).unwrap();
    let mut cmd = common::relay_command(&policy, &dir.join("spool"), port);
    cmd.args(args).stderr(Stdio::inherit());
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let set = |what, n: u64| {
                let lim = libc::rlimit {
                    rlim_cur: n as libc::rlim_t,
                    rlim_max: n as libc::rlim_t,
                };
                if libc::setrlimit(what, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(libc::RLIMIT_NOFILE, nofile)?;
            set(libc::RLIMIT_AS, 4 << 30)
        });
    }
    cmd.spawn().expect("spawn spoolrelay")
}

/// Kills the child when the test ends, whatever happened.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (VmRSS, VmHWM) of `pid` in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn sigterm(child: &Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill -TERM failed");
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

async fn error_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    (status, body)
}

/// Suspends or resumes (`action`) the queue `held` through the admin API.
async fn held_queue(http: &reqwest::Client, daemon: &spoolrelay::Daemon, action: &str) {
    let resp = http
        .post(common::url(
            daemon,
            &format!("/api/admin/queues/held/{action}"),
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "{action} held: {}",
        resp.status()
    );
}

/// Posts `size`-byte bodies to `url` until one is refused: how many were accepted, and the
/// refusal. More than `max` acceptances fail the test.
async fn fill_until_refused(
    http: &reqwest::Client,
    url: &str,
    size: usize,
    max: usize,
) -> (usize, reqwest::Response) {
    let mut accepted = 0;
    loop {
        let resp = http.post(url).body(vec![b'm'; size]).send().await.unwrap();
        if !resp.status().is_success() {
            return (accepted, resp);
        }
        accepted += 1;
        assert!(
            accepted <= max,
            "accepted {accepted} requests without a refusal"
        );
    }
}

/// The issue's bomb: one 16 MiB request, 7 MiB of content, 250 000 recipients. With the
/// default bounds it is a 413 naming the limit, quickly, and the daemon's memory stays
/// small (it would have to copy the content 250 000 times to build the messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_bomb_gets_413_and_memory_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut relay = Reap(spawn_relay(dir.path(), port, &[], 4096));
    common::wait_live(port).await;

    let recipients: Vec<Value> = (0..250_000)
        .map(|i| json!({ "email": format!("r{i}@example.com") }))
        .collect();
    let body = serde_json::to_vec(&json!({
        "envelope_sender": "bomb@example.com",
        "content": "x".repeat(7 << 20),
        "recipients": recipients,
    }))
    .unwrap();
    assert!(
        body.len() <= 16 << 20,
        "the bomb must fit the default body limit"
    );
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/inject/v1"))
        .body(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the daemon answers the bomb (it did not abort)");
    let took = started.elapsed();
    let (status, error) = error_json(resp).await;
    let (rss, hwm) = memory_kib(relay.0.id());
    println!("inject bomb: status {status} in {took:?}; daemon VmRSS {rss} KiB, VmHWM {hwm} KiB; {error}");
    assert_eq!(status, 413, "{error}");
    let text = error["error"].as_str().unwrap();
    assert!(text.contains("--max-inject-recipients"), "{text}");
    // Liveness, not speed: the refusal comes before any expansion.
    assert!(took < Duration::from_secs(10), "413 took {took:?}");
    assert!(
        hwm < 200 << 10,
        "the daemon's peak RSS reached {hwm} KiB answering one request"
    );
    assert!(relay.0.try_wait().unwrap().is_none(), "the daemon died");
    let live = reqwest::get(format!("http://127.0.0.1:{port}/livez"))
        .await
        .unwrap();
    assert!(live.status().is_success());
}

#[tokio::test]
async fn ndjson_with_too_many_lines_gets_413_and_nothing_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(&hold(), dir.path(), |c| c.limits.max_batch_lines = 100).await;
    let http = reqwest::Client::new();
    let url = common::url(&daemon, "/api/v1/queues/q/batch");
    let lines = |n: usize| "{\"data\":\"x\"}\n".repeat(n);
    // 1.4 M blank lines (the issue's body) and one line over the limit.
    for body in ["\n".repeat(1_400_000), lines(101)] {
        let (status, error) = error_json(http.post(&url).body(body).send().await.unwrap()).await;
        assert_eq!(status, 413, "{error}");
        assert!(
            error["error"]
                .as_str()
                .unwrap()
                .contains("--max-batch-lines"),
            "{error}"
        );
    }
    assert_eq!(
        common::queued(&daemon),
        0,
        "part of a refused batch was accepted"
    );
    let ok = http.post(&url).body(lines(100)).send().await.unwrap();
    assert_eq!(ok.status(), 200, "a batch at the limit is accepted");
    assert_eq!(common::queued(&daemon), 100);
    daemon.stop().await.unwrap();
}

/// Opens `n` connections that never finish a request: even ones send nothing, odd ones
/// trickle a header a byte at a time (for as long as the socket lives). Returns the
/// sockets and a thread that trickles until `stop` is set.
fn slow_clients(
    port: u16,
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let socks: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    std::thread::spawn(move || {
        let header = b"POST /api/v1/queues/slow/messages HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        let mut sent = 0usize;
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (k, mut s) in socks.iter().enumerate() {
                if k % 2 == 1 {
                    let _ = s.write_all(&[header[i % header.len()]]);
                    sent += 1;
                }
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(socks);
        sent
    })
}

/// 300 slow clients against a daemon with 256 file descriptors: without time limits they
/// would hold every descriptor for good and nothing else would ever be accepted. With
/// them, a normal client gets a 503 naming the connection limit at worst, then a 2xx once
/// the slow ones timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_lock_out_a_normal_request() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let args = [
        "--max-connections",
        "100",
        "--http-header-timeout",
        "2s",
        "--http-idle-timeout",
        "1s",
    ];
    let _relay = Reap(spawn_relay(dir.path(), port, &args, 256));
    common::wait_live(port).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickler = slow_clients(port, 300, stop.clone());

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let started = Instant::now();
    let (mut refused, mut accepted) = (Vec::new(), None);
    while started.elapsed() < Duration::from_secs(20) {
        match http
            .post(format!(
                "http://127.0.0.1:{port}/api/v1/queues/normal/messages"
            ))
            .body("hello")
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                accepted = Some(started.elapsed());
                break;
            }
            Ok(r) if r.status() == 503 => {
                assert!(r.headers().contains_key("retry-after"));
                let (_, body) = error_json(r).await;
                assert_eq!(body["limit"], "max_connections", "{body}");
                refused.push(body);
            }
            Ok(r) => panic!("unexpected status {}", r.status()),
            Err(e) => refused.push(json!({ "client error": e.to_string() })),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let trickled = trickler.join().unwrap();
    println!(
        "slow clients: normal request accepted after {accepted:?}; {} refusals first; {trickled} bytes trickled",
        refused.len()
    );
    assert!(
        accepted.is_some(),
        "a normal request was never accepted while slow clients were connected: {:?}",
        refused.last()
    );
}

/// SIGTERM with clients trickling headers (and time limits far longer than the test):
/// the daemon stops accepting, gives requests the shutdown grace, and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_trickling_clients() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let args = [
        "--http-header-timeout",
        "120s",
        "--http-idle-timeout",
        "120s",
        "--http-body-timeout",
        "120s",
        "--http-shutdown-grace",
        "1s",
        "--drain-timeout",
        "1s",
    ];
    let mut relay = Reap(spawn_relay(dir.path(), port, &args, 4096));
    common::wait_live(port).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickler = slow_clients(port, 50, stop.clone());
    // A body that never completes, too.
    let mut body_trickle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    body_trickle
        .write_all(
            b"POST /api/v1/queues/q/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",
        )
        .unwrap();
    let ok = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{port}/api/v1/queues/normal/messages"
        ))
        .body("hello")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("a normal request is served beside 50 slow clients");
    assert_eq!(ok.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    sigterm(&relay.0);
    let status = wait_exit(&mut relay.0, Duration::from_secs(20));
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickler.join().unwrap();
    println!("SIGTERM with 51 slow clients: exited {status:?} after {took:?}");
    let status = status.expect("the daemon did not exit within 20 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
}

/// The remaining HTTP limits, in process: connection cap, body deadline, idle keep-alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_body_deadline_and_idle_limit_hold() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(&hold(), dir.path(), |c| {
        c.limits.max_connections = 4;
        c.limits.http_header_timeout = Duration::from_secs(60);
        c.limits.http_idle_timeout = Duration::from_millis(1500);
        c.limits.http_body_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = daemon.addr;
    let read_all = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let res = s.read_to_end(&mut out);
        (String::from_utf8_lossy(&out).into_owned(), res)
    };

    // Body deadline: 3 of 100 bytes, then nothing: a 408, not a connection held open.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        b"POST /api/v1/queues/q/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",
    )
    .unwrap();
    let (answer, res) = tokio::task::spawn_blocking(move || read_all(&mut s))
        .await
        .unwrap();
    assert!(
        res.is_ok(),
        "no answer to a stalled body: {res:?} {answer:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--http-body-timeout"), "{answer}");

    // Idle keep-alive: after one answered request, an idle connection is closed.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (answer, res) = tokio::task::spawn_blocking(move || read_all(&mut s))
        .await
        .unwrap();
    assert!(
        res.is_ok(),
        "an idle keep-alive connection stayed open: {res:?} {answer:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Connection cap: 4 silent connections (well inside the idle limit), then a fifth.
    let http = reqwest::Client::new();
    let url = common::url(&daemon, "/api/v1/queues/q/messages");
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /api/v1/queues/q/messages HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = http.post(&url).body("x").send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let (_, body) = error_json(resp).await;
    assert_eq!(body["limit"], "max_connections");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--max-connections"),
        "{body}"
    );
    drop(held);
    // The slots come back as the silent connections go away.
    let start = Instant::now();
    loop {
        let resp = http.post(&url).body("x").send().await.unwrap();
        if resp.status().is_success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await.unwrap();
}

async fn metric(daemon: &spoolrelay::Daemon, line_prefix: &str) -> Option<f64> {
    let text = reqwest::get(common::url(daemon, "/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// At `--max-spool-bytes` ingest answers 503 with Retry-After, refuses a batch whole,
/// `/readyz` is 503, and deliveries go on; once they drained the spool ingest accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_refuses_with_503_then_accepts_after_a_drain() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(SINK, dir.path(), |c| {
        c.limits.max_spool_bytes = Some(9 * 1024);
    })
    .await;
    let http = reqwest::Client::new();
    let post = |q: &str| common::url(&daemon, &format!("/api/v1/queues/{q}/messages"));
    let ready = || async {
        let r = http
            .get(common::url(&daemon, "/readyz"))
            .send()
            .await
            .unwrap();
        error_json(r).await
    };
    assert_eq!(ready().await.0, 200);
    held_queue(&http, &daemon, "suspend").await;

    // 1 KiB messages into a suspended queue until the spool is full.
    let (accepted, refusal) = fill_until_refused(&http, &post("held"), 1024, 9).await;
    assert_eq!(refusal.status(), 503);
    assert_eq!(refusal.headers()["retry-after"], "5");
    let (_, body) = error_json(refusal).await;
    assert_eq!(body["limit"], "max_spool_bytes", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--max-spool-bytes"),
        "{body}"
    );
    assert_eq!(
        accepted, 9,
        "9 KiB fit under 10 000 bytes, a tenth KiB does not"
    );

    // Whole or nothing: a small batch that would cross the limit is refused whole.
    let batch = http
        .post(common::url(&daemon, "/api/v1/queues/held/batch"))
        .body("{\"data\":\"a\"}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), 503);
    assert_eq!(common::queued(&daemon), 9);
    let (status, readiness) = ready().await;
    assert_eq!(status, 503, "{readiness}");
    assert!(
        readiness["error"]
            .as_str()
            .unwrap()
            .contains("--max-spool-bytes"),
        "{readiness}"
    );
    assert_eq!(
        metric(
            &daemon,
            "spoolrelay_ingest_refused_total{limit=\"max_spool_bytes\"}"
        )
        .await,
        Some(2.0)
    );
    assert_eq!(
        metric(&daemon, "spoolrelay_spool_max_bytes").await,
        Some(9.0 * 1024.0)
    );
    assert_eq!(
        metric(&daemon, "spoolrelay_spool_bytes").await,
        Some(9.0 * 1024.0)
    );
    assert!(
        metric(&daemon, "spoolrelay_spool_disk_bytes")
            .await
            .unwrap()
            > 0.0
    );
    assert!(metric(&daemon, "spoolrelay_disk_free_bytes").await.unwrap() > 0.0);
    // Other queues are refused as well: the limit is the spool's.
    let other = http
        .post(post("other"))
        .body(vec![b'o'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 503);

    // Deliveries are not gated: resume, the queue drains, ingest accepts again.
    held_queue(&http, &daemon, "resume").await;
    common::wait_until("the held queue to drain", Duration::from_secs(20), || {
        common::queued(&daemon) == 0
    })
    .await;
    let again = http
        .post(post("held"))
        .body(vec![b'm'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200, "ingest did not accept after the drain");
    assert_eq!(ready().await.0, 200);
    daemon.stop().await.unwrap();
}

/// Below `--min-free-disk` ingest is refused with the limit named, and `/readyz` says so.
#[tokio::test]
async fn low_free_disk_refuses_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(&hold(), dir.path(), |c| {
        c.limits.min_free_disk = u64::MAX / 2;
    })
    .await;
    let http = reqwest::Client::new();
    let resp = http
        .post(common::url(&daemon, "/api/v1/queues/q/messages"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let (_, body) = error_json(resp).await;
    assert_eq!(body["limit"], "min_free_disk", "{body}");
    let r = http
        .get(common::url(&daemon, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("--min-free-disk"));
    let live = http
        .get(common::url(&daemon, "/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        live.status(),
        200,
        "/livez is about the process, not capacity"
    );
    assert_eq!(common::queued(&daemon), 0);
    daemon.stop().await.unwrap();
}

/// A tmpfs mounted at `dir` (needs root and `mount`); unmounted lazily when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// On a real small filesystem: `--min-free-disk` refuses ingest before sled meets ENOSPC
/// (whose error latches until restart), deliveries drain the spool at the limit, and
/// ingest accepts again once sled gave the space back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_free_disk_refuses_before_enospc_and_clears_after_a_drain() {
    let work = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&work.path().join("mnt"), "48m");
    let spool_dir = fs.0.join("spool");
    let daemon = common::start_with(SINK, &spool_dir, |c| {
        c.limits.min_free_disk = 24 << 20;
    })
    .await;
    let http = reqwest::Client::new();
    let post = common::url(&daemon, "/api/v1/queues/held/messages");
    held_queue(&http, &daemon, "suspend").await;
    let free = || spoolrelay::capacity::free_bytes(&spool_dir).unwrap();
    let (accepted, refusal) = fill_until_refused(&http, &post, 8 << 10, 10_000).await;
    let (status, body) = error_json(refusal).await;
    println!(
        "min-free-disk: {accepted} accepted, then {status} {body}; free now {} KiB",
        free() >> 10
    );
    assert_eq!(status, 503);
    assert_eq!(
        body["limit"], "min_free_disk",
        "refused by the gate, not by ENOSPC: {body}"
    );
    assert!(
        accepted > 100,
        "the reserve left almost no room: {accepted}"
    );

    held_queue(&http, &daemon, "resume").await;
    common::wait_until("the held queue to drain", Duration::from_secs(30), || {
        common::queued(&daemon) == 0
    })
    .await;
    let drained_free = free();
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(30) {
        let resp = http
            .post(&post)
            .body(vec![b'd'; 8 << 10])
            .send()
            .await
            .unwrap();
        if resp.status().is_success() {
            last = None;
            break;
        }
        last = Some(error_json(resp).await.1);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "min-free-disk: drained; free right after {} KiB, {} KiB at the end; accepted again after {:?}: {}",
        drained_free >> 10,
        free() >> 10,
        start.elapsed(),
        last.is_none()
    );
    assert!(
        last.is_none(),
        "ingest still refused 30 s after the drain: {last:?}"
    );
    let ready = http
        .get(common::url(&daemon, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);

    // A second fill reuses the space the first one left: refused by the gate again, at
    // about the same point, and never by ENOSPC.
    held_queue(&http, &daemon, "suspend").await;
    let (again, refusal) = fill_until_refused(&http, &post, 8 << 10, 10_000).await;
    let (status, body) = error_json(refusal).await;
    println!(
        "min-free-disk: second fill: {again} accepted, then {status} {}; free now {} KiB",
        body["limit"],
        free() >> 10
    );
    assert_eq!(body["limit"], "min_free_disk", "{body}");
    assert!(
        free() >= (24 << 20) / 2,
        "the second fill ate into the reserve's half"
    );
    daemon.stop().await.unwrap();
    drop(fs);
}

/// A client that keeps trickling its headers is cut off at `--http-header-timeout`, even
/// though it is never idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_that_trickles_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(&hold(), dir.path(), |c| {
        c.limits.http_header_timeout = Duration::from_secs(1);
        c.limits.http_idle_timeout = Duration::from_secs(60);
    })
    .await;
    let addr = daemon.addr;
    let closed_after = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let header = b"POST /api/v1/queues/q/messages HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        for i in 0.. {
            if start.elapsed() > Duration::from_secs(10) {
                return None;
            }
            if s.write_all(&[header[i % header.len()]]).is_err() {
                return Some(start.elapsed());
            }
            match s.read(&mut buf) {
                Ok(0) => return Some(start.elapsed()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Some(start.elapsed()),
            }
        }
        None
    })
    .await
    .unwrap();
    println!("trickling header: closed after {closed_after:?}");
    assert!(
        closed_after.is_some(),
        "a connection trickling its header was still open after 10 s"
    );
    daemon.stop().await.unwrap();
}

/// An injection is charged what its recipients expand to, not its body: a 1 KiB content
/// for 20 recipients (a body of about 2 KiB) does not fit under a 9 KiB cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injection_is_charged_what_it_expands_to() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(&hold(), dir.path(), |c| {
        c.limits.max_spool_bytes = Some(9 * 1024);
    })
    .await;
    let recipients: Vec<_> = (0..20)
        .map(|i| json!({ "email": format!("r{i}@example.com") }))
        .collect();
    let request = json!({
        "envelope_sender": "s@example.com",
        "recipients": recipients,
        "content": "c".repeat(1024),
    });
    let resp = reqwest::Client::new()
        .post(common::url(&daemon, "/api/inject/v1"))
        .json(&request)
        .send()
        .await
        .unwrap();
    let (status, body) = error_json(resp).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["limit"], "max_spool_bytes", "{body}");
    assert_eq!(
        common::queued(&daemon),
        0,
        "part of the injection was spooled"
    );
    daemon.stop().await.unwrap();
}
