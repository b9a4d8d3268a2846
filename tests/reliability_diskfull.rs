//! Contract (1) when the disk fills: a 2xx still means on disk; what could not be made
//! durable gets a 5xx; the daemon keeps running; after space is freed and a restart,
//! every acknowledged message is there.
//!
//! The spool lives on a 16 MiB tmpfs mounted for the test (needs root and `mount`; the
//! test says so and fails without them rather than pass having asserted nothing). The
//! policy never delivers, so the spool only grows.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use spoolrelay::{Config, Shutdown};

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
    p.resize(8 << 10, b'0' + (i % 10) as u8);
    p
}

async fn start(dir: &Path) -> anyhow::Result<spoolrelay::Daemon> {
    let policy = policy::Policy::from_source(
        "hold.lua",
        &common::hold_policy("held for the disk-full test"),
    )
    .unwrap();
    let mut config = Config::new(policy, dir.to_path_buf());
    config.listen = "127.0.0.1:0".into();
    config.drain_timeout = Duration::from_secs(5);
    // This test is about sled meeting ENOSPC itself: no free-space reserve in front of it.
    config.limits.min_free_disk = 0;
    spoolrelay::start(config, Shutdown::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_a_full_disk() {
    let work = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&work.path().join("mnt"), "16m");
    let spool_dir = fs.dir.join("spool");
    let daemon = start(&spool_dir).await.expect("daemon starts on the tmpfs");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = format!("http://{}/api/v1/queues/full/messages", daemon.addr);

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
        .get(format!("http://{}/healthz", daemon.addr))
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false);

    // Free space while the daemon still runs: does it accept again without a restart?
    fs.resize("128m");
    let mut accepted_after_freeing = 0;
    for j in 0..20 {
        let n = 1_000_000 + j;
        if let Ok(r) = http.post(&url).body(payload(n)).send().await {
            if r.status().is_success() {
                accepted_after_freeing += 1;
                acked.push(n);
            }
        }
    }
    let stopped = tokio::time::timeout(Duration::from_secs(60), daemon.stop())
        .await
        .expect("daemon stop hung after a full disk")
        .map_err(|e| format!("{e:#}"));

    // Restart on the same spool (now with room): every acknowledged message is there.
    let reopened = start(&spool_dir)
        .await
        .expect("daemon restarts after the disk full");
    let mut found: HashSet<Vec<u8>> = HashSet::new();
    reopened
        .spool
        .for_each_message(|m| {
            found.insert(m.payload);
            Ok(())
        })
        .unwrap();
    let quarantined = reopened.spool.stats(spool::now_ms()).quarantine;
    reopened.stop().await.unwrap();
    let lost: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|&n| !found.contains(&payload(n)))
        .collect();
    let unacked_but_present = found.len().saturating_sub(acked.len() - lost.len());
    println!(
        "disk full (16 MiB tmpfs, 8 KiB messages): posts={i} acked_before_full={} refused_5xx={refused} \
         other_status={other:?} healthz_while_full={healthy} first_error={first_error:?} \
         accepted_after_freeing={accepted_after_freeing}/20 stop_result={stopped:?} \
         after_restart: present={} lost={} unacked_but_present={unacked_but_present} quarantined={quarantined}",
        acked.len() - accepted_after_freeing,
        found.len(),
        lost.len()
    );
    assert!(
        refused > 0,
        "the disk never filled: the test proved nothing"
    );
    assert!(
        other.is_empty(),
        "unexpected statuses while full: {other:?}"
    );
    assert!(healthy, "the daemon stopped serving once the disk was full");
    assert!(
        lost.is_empty(),
        "{} acknowledged messages are missing after the restart, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    drop(fs);
}
