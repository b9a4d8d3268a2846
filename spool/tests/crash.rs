//! Crash test: a child process enqueues batches from several threads and prints every id
//! the spool acknowledged; the parent SIGKILLs it at a random moment, reopens the spool and
//! checks the contract: every acknowledged message is there, exactly once, intact.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{lease_all, msg, open};
use rand::Rng;

const CHILD_ENV: &str = "SPOOL_CRASH_CHILD_DIR";
const QUEUE: &str = "crash";

fn payload_for(thread: u32, seq: u32) -> Vec<u8> {
    let mut p = format!("t{thread}-s{seq}-").into_bytes();
    p.extend((0..(seq % 300)).map(|i| (i * 31 + thread) as u8));
    p
}

/// The child's body. Ignored by normal runs; the parent runs it by name.
#[test]
#[ignore]
fn crash_child_process() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spool = open(std::path::Path::new(&dir));
    let run = std::process::id();
    let threads: Vec<_> = (0..4u32)
        .map(|thread| {
            let spool = spool.clone();
            std::thread::spawn(move || {
                let mut rng = rand::thread_rng();
                for seq in (0..).step_by(64) {
                    let n = rng.gen_range(1..64u32);
                    let batch = (seq..seq + n)
                        .map(|s| msg(QUEUE, &payload_for(thread, s)))
                        .collect();
                    let ids = spool.enqueue_blocking(batch).expect("enqueue");
                    // One line per acknowledged message, written only after enqueue returned.
                    let lines: String = ids
                        .iter()
                        .zip(seq..)
                        .map(|(id, s)| format!("ACK {id} {thread} {s} {run}\n"))
                        .collect();
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    out.write_all(lines.as_bytes()).unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn acked_message_survives_sigkill() {
    let cycles: usize = std::env::var("SPOOL_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut rng = rand::thread_rng();
    for cycle in 0..cycles {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        // Wait for the first ack so every cycle kills a process in the middle of writing.
        let kill_after = Duration::from_millis(rng.gen_range(30..400));
        let started = Instant::now();
        std::thread::sleep(kill_after);
        // SAFETY: sending a signal to our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let mut new = 0;
        for line in lines.iter().filter(|l| l.starts_with("ACK ")) {
            let f: Vec<&str> = line.split(' ').collect();
            let id: u64 = f[1].parse().unwrap();
            let payload = payload_for(f[2].parse().unwrap(), f[3].parse().unwrap());
            assert!(
                acked.insert(id, payload).is_none(),
                "id {id} acknowledged twice"
            );
            new += 1;
        }
        check_all_acked_present(dir.path(), &acked, cycle, new, started.elapsed());
    }
    assert!(
        acked.len() > cycles,
        "the children acknowledged too little to test anything: {}",
        acked.len()
    );
}

fn check_all_acked_present(
    dir: &std::path::Path,
    acked: &HashMap<u64, Vec<u8>>,
    cycle: usize,
    new: usize,
    ran: Duration,
) {
    let (spool, report) =
        spool::Spool::open(dir, spool::SpoolOptions::default()).expect("reopen after kill");
    assert_eq!(
        report.quarantined_now, 0,
        "cycle {cycle}: corrupt records after SIGKILL"
    );
    let present: Vec<_> = lease_all(&spool, QUEUE)
        .into_iter()
        .map(|l| l.message)
        .collect();
    let mut seen = HashMap::new();
    for m in &present {
        assert!(
            seen.insert(m.id.0, &m.payload).is_none(),
            "id {} present twice",
            m.id
        );
    }
    for (id, payload) in acked {
        match seen.get(id) {
            Some(p) => assert_eq!(*p, payload, "cycle {cycle}: payload of {id} differs"),
            None => panic!("cycle {cycle}: acknowledged id {id} lost after SIGKILL ({new} new acks, killed after {ran:?})"),
        }
    }
}
