//! `cargo bench -p spool`: durable enqueue throughput of 256 B messages with 1, 16 and 64
//! concurrent producers, each printed next to a baseline measured in the same run: a bare
//! sled insert loop with one flush + fdatasync per batch of the same size (what a perfect
//! group commit of that many producers could do, with no spool around it).

use std::fs::File;
use std::time::{Duration, Instant};

use spool::{Meta, NewMessage, Spool, SpoolOptions};

const PAYLOAD: [u8; 256] = [0x5a; 256];
const RUN_FOR: Duration = Duration::from_secs(3);

fn main() {
    // `cargo bench` passes --bench; a filter argument would be ignored anyway.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{:>10} {:>16} {:>18} {:>8} {:>12}",
        "producers", "spool msg/s", "bare sled msg/s", "ratio", "avg group"
    );
    for producers in [1usize, 16, 64] {
        let (spool_rate, group) = rt.block_on(spool_rate(producers));
        let bare = bare_sled_rate(producers);
        println!(
            "{producers:>10} {spool_rate:>16.0} {bare:>18.0} {:>7.0}% {group:>12.1}",
            100.0 * spool_rate / bare
        );
    }
}

async fn spool_rate(producers: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let spool = spool.clone();
            tokio::spawn(async move {
                let mut sent = 0u64;
                while started.elapsed() < RUN_FOR {
                    let m = NewMessage {
                        queue: "bench".into(),
                        meta: Meta::new(),
                        payload: PAYLOAD.to_vec(),
                    };
                    spool.enqueue(vec![m]).await.unwrap();
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let (groups, jobs, _) = spool.commit_stats();
    (rate, jobs as f64 / groups.max(1) as f64)
}

fn bare_sled_rate(batch: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let tree = db.open_tree("bench").unwrap();
    let log = File::open(dir.path().join("db")).unwrap();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < RUN_FOR {
        for _ in 0..batch {
            tree.insert(n.to_be_bytes(), &PAYLOAD[..]).unwrap();
            n += 1;
        }
        db.flush().unwrap();
        log.sync_data().unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}
