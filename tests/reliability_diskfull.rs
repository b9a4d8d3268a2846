//! Contract (1) when the disk fills: a 2xx still means on disk; what could not be made
//! durable gets a 5xx; the daemon keeps running; the spool is then poisoned (no write is
//! accepted until a restart rereads the disk, even once space is freed); SIGTERM stops the
//! daemon within `--drain-timeout` plus a few seconds; after a restart every acknowledged
//! message is there.
//!
//! The daemon is a real process (SIGTERM, exit). Its spool lives on a 16 MiB tmpfs mounted
//! for the test (needs root and `mount`; the test says so and fails without them rather
//! than pass having asserted nothing). The policy never delivers, so the spool only grows.
//! Three messages in four are larger than sled's blob threshold (128 KiB): a blob write that
//! fails on a full disk used to wedge sled, and shutdown hung for ever (issue 10, symptom 3).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A tmpfs mounted at `dir`; unmounted (lazily, so it never blocks) when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "remount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("diskfull {i:06} ").into_bytes();
    // Most go to a sled blob file, so that the write that meets the full disk is
    // likely a blob write (the one that wedged sled).
    let size = if i.is_multiple_of(4) {
        8 << 10
    } else {
        200 << 10
    };
    p.resize(size, b'0' + (i % 10) as u8);
    p
}

const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Kills the daemon if the test fails before it exited, so no process outlives the test.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_healthy(http: &reqwest::Client, port: u16, relay: &mut Relay, log: &Path) {
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
        if let Ok(Some(status)) = relay.0.try_wait() {
            panic!(
                "daemon exited with {status} before serving: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "daemon never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_a_full_disk() {
    let work = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&work.path().join("mnt"), "16m");
    let spool_dir = fs.dir.join("spool");
    let policy = work.path().join("hold.lua");
    std::fs::write(&policy, common::hold_policy("held for the disk-full test")).unwrap();
    let log = work.path().join("daemon.log");
    let port = common::free_port();
    let mut relay = Relay(
        common::relay_command(&policy, &spool_dir, port)
            .arg("--drain-timeout")
            .arg(format!("{}s", DRAIN_TIMEOUT.as_secs()))
            // This test is about sled meeting ENOSPC itself: no free-space reserve in front.
            .arg("--min-free-disk")
            .arg("0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn spoolrelay"),
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    wait_healthy(&http, port, &mut relay, &log).await;
    let url = format!("http://127.0.0.1:{port}/api/v1/queues/full/messages");

    let (mut acked, mut refused, mut other) = (Vec::new(), 0usize, Vec::new());
    let mut failing_in_a_row = 0;
    let mut first_error = None;
    let mut i = 0;
    while failing_in_a_row < 30 && i < 20_000 {
        let resp = http.post(&url).body(payload(i)).send().await;
        match resp {
            Ok(r) if r.status().is_success() => {
                acked.push(i);
                failing_in_a_row = 0;
            }
            Ok(r) if r.status().is_server_error() => {
                refused += 1;
                failing_in_a_row += 1;
                let text = r.text().await.unwrap_or_default();
                first_error.get_or_insert(text);
            }
            Ok(r) => other.push(r.status().as_u16()),
            Err(e) => panic!("the daemon stopped answering after {i} posts: {e}"),
        }
        i += 1;
    }
    let healthy = http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false);
    // The admin summary (what `spoolctl --url .. summary` reads) still answers.
    let summary = http
        .get(format!("http://127.0.0.1:{port}/api/admin/queues"))
        .send()
        .await
        .map(|r| r.status().as_u16());

    // Free space while the daemon still runs: the spool stays poisoned until a restart,
    // because a write after a failed fsync could be reported durable without being so.
    fs.resize("128m");
    let after_freeing = http.post(&url).body(payload(1_000_000)).send().await;
    let (freed_status, freed_error) = match after_freeing {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    };

    let term = Command::new("kill")
        .arg("-TERM")
        .arg(relay.0.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let asked = Instant::now();
    let limit = DRAIN_TIMEOUT + Duration::from_secs(10);
    let exit = loop {
        if let Some(status) = relay.0.try_wait().unwrap() {
            break Some(status);
        }
        if asked.elapsed() > limit {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stop_took = asked.elapsed();
    let daemon_log = std::fs::read_to_string(&log).unwrap_or_default();
    drop(relay);

    // Restart on the same spool (now with room): every acknowledged message is there.
    let (reopened, report) = tokio::task::spawn_blocking({
        let dir = spool_dir.clone();
        move || spool::Spool::open(&dir, spool::SpoolOptions::default())
    })
    .await
    .unwrap()
    .expect("spool reopens after the disk full");
    let mut found: HashSet<Vec<u8>> = HashSet::new();
    reopened
        .for_each_message(|m| {
            found.insert(m.payload);
            Ok(())
        })
        .unwrap();
    assert!(
        reopened.poisoned().is_none(),
        "a reopen reads the disk again and accepts writes"
    );
    drop(reopened);
    let lost: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|&n| !found.contains(&payload(n)))
        .collect();
    let unacked_but_present = found.len().saturating_sub(acked.len() - lost.len());
    println!(
        "disk full (16 MiB tmpfs, 8 KiB + 200 KiB messages): posts={i} acked={} refused_5xx={refused} \
         other_status={other:?} healthz_while_full={healthy} summary={summary:?} first_error={first_error:?} \
         after_freeing={freed_status} {freed_error:?} sigterm_to_exit={stop_took:?} exit={exit:?} \
         after_restart: present={} lost={} unacked_but_present={unacked_but_present} quarantined={}",
        acked.len(),
        found.len(),
        lost.len(),
        report.quarantine_total,
    );
    assert!(
        refused > 0,
        "the disk never filled: the test proved nothing"
    );
    assert!(
        acked.iter().any(|n| !n.is_multiple_of(4)),
        "no blob-sized message was acknowledged: the test proved nothing about blobs"
    );
    assert!(
        other.is_empty(),
        "unexpected statuses while full: {other:?}"
    );
    assert!(healthy, "the daemon stopped serving once the disk was full");
    assert!(
        matches!(summary, Ok(200)),
        "the admin summary did not answer: {summary:?}"
    );
    assert_eq!(
        freed_status, 503,
        "a poisoned spool must refuse writes until restarted: {freed_error}"
    );
    assert!(
        freed_error.contains("restart"),
        "the refusal should say to restart: {freed_error}"
    );
    assert!(
        exit.is_some(),
        "the daemon did not exit within {limit:?} of SIGTERM (drain timeout {DRAIN_TIMEOUT:?}); log:\n{}",
        &daemon_log[daemon_log.len().saturating_sub(4000)..]
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged messages are missing after the restart, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    drop(fs);
}
