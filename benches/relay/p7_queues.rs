//! P7: many queues. One injection of N recipients on N domains (so N queues of one message
//! each) into the daemon binary, delivered by a sender that answers `'250 ok'` at once.
//! Reports the drain time, peak RSS, and RSS and idle CPU once the queues were reaped,
//! beside the RSS before the burst (the baseline of the same run).
//!
//! Environment: `BENCH_P7_QUEUES` (default `1000,10000,100000`), `BENCH_P7_REAP_SECS` (the
//! `--queue-reap-interval` given to the daemon, default 5), `BENCH_P7_SETTLE_SECS` (how
//! long after the drain RSS is read; default reap + 5 s), `BENCH_P7_NO_REAP_FLAG=1` (do not
//! pass `--queue-reap-interval`: for a build that predates it), `BENCH_P7_STDERR` (a file for
//! the daemon's warnings; discarded otherwise).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{mib, status_kib};

const SINK_POLICY: &str = r#"
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.sink' } },
  }
end)
kumo.on('make.sink', function(domain, tenant, campaign)
  local sender = {}
  function sender:send(message) return '250 ok' end
  return sender
end)
"#;

/// How long idle CPU is sampled after the reap.
const IDLE_SAMPLE: Duration = Duration::from_secs(10);

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.replace('_', "").parse().ok()
}

pub async fn p7_queues() {
    let sizes: Vec<usize> = std::env::var("BENCH_P7_QUEUES")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|n| n.trim().replace('_', "").parse().ok())
        .collect();
    let reap = env_num("BENCH_P7_REAP_SECS").unwrap_or(5);
    let flag = std::env::var("BENCH_P7_NO_REAP_FLAG").map_or(true, |v| v != "1");
    let settle = Duration::from_secs(env_num("BENCH_P7_SETTLE_SECS").unwrap_or(reap + 5));
    println!(
        "\nP7 many queues: one injection of N recipients on N domains, sender answers '250 ok'; \
         --queue-reap-interval {} ; RSS read {} s after the drain",
        if flag {
            format!("{reap}s")
        } else {
            "(not passed)".into()
        },
        settle.as_secs()
    );
    println!(
        "  {:>7} {:>9} {:>10} {:>12} {:>12} {:>14} {:>9}",
        "queues", "drain s", "µs/queue", "RSS before", "peak RSS", "RSS after reap", "idle CPU"
    );
    for n in sizes {
        let dir = tempfile::tempdir().expect("tempdir");
        let row = run(n, dir.path(), flag.then_some(reap), settle).await;
        println!(
            "  {n:>7} {:>9.2} {:>10.1} {:>8.1} MiB {:>8.1} MiB {:>10.1} MiB {:>8.2}%",
            row.drain_secs,
            1e6 * row.drain_secs / n as f64,
            mib(row.rss_before),
            mib(row.peak),
            mib(row.rss_after),
            row.idle_cpu
        );
    }
}

struct Row {
    drain_secs: f64,
    rss_before: u64,
    peak: u64,
    rss_after: u64,
    idle_cpu: f64,
}

async fn run(n: usize, dir: &Path, reap: Option<u64>, settle: Duration) -> Row {
    let policy = dir.join("sink.lua");
    std::fs::write(&policy, SINK_POLICY).expect("write policy");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut cmd = Command::new(super::daemon_binary());
    cmd.arg("--policy")
        .arg(&policy)
        .arg("--spool")
        .arg(dir.join("spool"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--max-inject-recipients", &n.to_string()])
        .args(["--max-body-bytes", &(64usize << 20).to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(match std::env::var("BENCH_P7_STDERR") {
            Ok(path) => std::fs::File::create(path).expect("BENCH_P7_STDERR").into(),
            Err(_) => Stdio::null(),
        });
    if let Some(secs) = reap {
        cmd.args(["--queue-reap-interval", &format!("{secs}s")]);
    }
    let mut child = cmd.spawn().expect("spawn spoolrelay");
    let pid = child.id();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_listening(&http, &base, &mut child).await;
    let rss_before = status_kib(pid, "VmRSS:");

    let recipients: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({ "email": format!("r@d{i}.example") }))
        .collect();
    let body = serde_json::json!({
        "envelope_sender": "bench@example.com",
        "content": "Subject: p7\r\n\r\nhello\r\n",
        "recipients": recipients,
    });
    let t0 = Instant::now();
    let resp = http
        .post(format!("{base}/api/inject/v1"))
        .json(&body)
        .send()
        .await
        .expect("inject");
    assert!(resp.status().is_success(), "inject: {}", resp.status());
    let mut pause = Duration::from_millis(10);
    loop {
        if queued(&http, &base).await == Some(0) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(900) {
            println!("  ({n} queues not drained after 900 s)");
            break;
        }
        tokio::time::sleep(pause).await;
        // A stats request walks every queue under the index lock: poll gently.
        pause = (pause * 3 / 2).min(Duration::from_secs(1));
    }
    let drain_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let rss_after = status_kib(pid, "VmRSS:");
    let cpu0 = cpu_ticks(pid);
    tokio::time::sleep(IDLE_SAMPLE).await;
    let idle_cpu = (cpu_ticks(pid) - cpu0) as f64 / IDLE_SAMPLE.as_secs_f64(); // ticks/s = %
    let peak = status_kib(pid, "VmHWM:");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = child.wait();
    Row {
        drain_secs,
        rss_before,
        peak,
        rss_after,
        idle_cpu,
    }
}

async fn wait_listening(http: &reqwest::Client, base: &str, child: &mut Child) {
    let t0 = Instant::now();
    while http.get(format!("{base}/livez")).send().await.is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("spoolrelay exited at start: {status}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "daemon did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Messages still spooled, from `/api/v1/stats`.
async fn queued(http: &reqwest::Client, base: &str) -> Option<u64> {
    let stats: serde_json::Value = http
        .get(format!("{base}/api/v1/stats"))
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

/// utime + stime of `pid` in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let at = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    at(11) + at(12)
}
