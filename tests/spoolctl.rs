//! Every spoolctl command against a real spool on disk.

#[path = "../spool/tests/common/dirs.rs"]
mod dirs;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use spool::{Meta, MetaValue, NewMessage, Spool, SpoolOptions};

fn spoolctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spoolctl"))
        .arg("--spool")
        .arg(dir)
        .args(args)
        .output()
        .expect("run spoolctl")
}

fn json(dir: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = spoolctl(dir, &all);
    assert!(
        out.status.success(),
        "spoolctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Opens a spool, waiting out the moment after a sibling test forked a child: the child
/// briefly shares every open descriptor, our flock included, until it execs.
fn open_retrying(dir: &Path) -> Spool {
    for _ in 0..50 {
        match Spool::open(dir, SpoolOptions::default()) {
            Ok((spool, _)) => return spool,
            Err(spool::SpoolError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("open: {e}"),
        }
    }
    panic!("spool stayed locked");
}

/// Opens sled directly (to damage records), waiting out the lock of a spool just closed:
/// sled releases its file lock from a background thread shortly after the last handle drops.
fn sled_open_retrying(dir: &Path) -> sled::Db {
    for _ in 0..250 {
        match sled::open(dir.join("data")) {
            Ok(db) => return db,
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("sled open: {e}"),
        }
    }
    panic!("sled stayed locked");
}

/// A spool with 3 messages in `a` (one failed once), 1 in `b`, 1 dead-lettered.
fn populated() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let spool = open_retrying(dir.path());
    let mut meta = Meta::new();
    meta.insert("tenant".into(), MetaValue::Str("acme".into()));
    let m = |q: &str, p: &[u8]| NewMessage {
        queue: q.into(),
        meta: meta.clone(),
        payload: p.to_vec(),
    };
    spool
        .enqueue_blocking(vec![
            m("a", b"\x00\xffbinary"),
            m("a", b"two"),
            m("a", b"three"),
            m("b", b"bee"),
            m("dead", b"x"),
        ])
        .unwrap();
    let first = spool.lease("a", 1, u64::MAX).unwrap().remove(0);
    rt.block_on(spool.retry(&first, "451 later", spool::now_ms() + 3_600_000))
        .unwrap();
    let dead = spool.lease("dead", 1, u64::MAX).unwrap().remove(0);
    rt.block_on(spool.dead_letter(&dead, "550 nope")).unwrap();
    dir
}

#[test]
fn summary_ls_and_show() {
    let dir = populated();
    let s = json(dir.path(), &["summary"]);
    assert_eq!(s["queues"]["a"]["count"], 3);
    assert_eq!(s["queues"]["a"]["due_now"], 2);
    assert_eq!(s["queues"]["a"]["attempts"]["1"], 1);
    assert_eq!(s["queues"]["b"]["count"], 1);
    assert_eq!(
        (s["dead_letter"].clone(), s["quarantine"].clone()),
        (1.into(), 0.into())
    );
    let human = spoolctl(dir.path(), &["summary"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("dead-letter: 1"));

    assert_eq!(json(dir.path(), &["ls", "a"]).as_array().unwrap().len(), 3);
    let failed = json(dir.path(), &["ls", "a", "--failed"]);
    assert_eq!(failed.as_array().unwrap().len(), 1);
    assert_eq!(failed[0]["last_error"], "451 later");
    assert_eq!(
        json(dir.path(), &["ls", "a", "--due", "--limit", "1"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let id = failed[0]["id"].as_str().unwrap().to_owned();
    let shown = spoolctl(dir.path(), &["show", &id, "--data"]);
    assert_eq!(
        shown.stdout, b"\x00\xffbinary",
        "payload is written byte for byte"
    );
    assert_eq!(json(dir.path(), &["show", &id])["meta"]["tenant"], "acme");
    assert!(!spoolctl(dir.path(), &["show", "999999"]).status.success());
}

/// Flips the last byte of the messages-tree entry `pick` chooses, behind the spool's back.
fn flip_last_byte(dir: &Path, pick: impl FnOnce(&sled::Tree) -> (sled::IVec, sled::IVec)) {
    let db = sled_open_retrying(dir);
    let tree = db.open_tree("messages").unwrap();
    let (key, value) = pick(&tree);
    let mut bad = value.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    tree.insert(key, bad).unwrap();
    db.flush().unwrap();
}

/// `verify` fails on one checksum failure and repairs nothing; `verify --repair` moves
/// that one record to quarantine and the spool is clean after. Returns the quarantine.
fn verify_then_repair_one_checksum_failure(dir: &Path) -> Value {
    let out = spoolctl(dir, &["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("DAMAGED Messages key"), "{stdout}");
    assert!(stdout.contains("checksum mismatch"), "{stdout}");
    let before = json(dir, &["quarantine", "ls"]);
    assert_eq!(
        before.as_array().unwrap().len(),
        0,
        "verify alone repairs nothing"
    );
    assert!(spoolctl(dir, &["verify", "--repair"]).status.success());
    assert!(
        spoolctl(dir, &["verify"]).status.success(),
        "clean after repair"
    );
    let q = json(dir, &["quarantine", "ls"]);
    assert_eq!(q.as_array().unwrap().len(), 1, "{q}");
    assert!(q[0]["reason"].as_str().unwrap().contains("checksum"));
    q
}

#[test]
fn verify_reports_damage_and_repair_quarantines_it() {
    let dir = populated();
    assert!(
        spoolctl(dir.path(), &["verify"]).status.success(),
        "a fresh spool is clean"
    );
    // The first single record (`keys::SINGLES_START`): `a`'s retried message. The chunk area
    // sorts first, and the open scan reads heads, not the records in a chunk.
    flip_last_byte(dir.path(), |tree| {
        tree.range(spool::keys::SINGLES_START..)
            .next()
            .unwrap()
            .unwrap()
    });
    verify_then_repair_one_checksum_failure(dir.path());
    let export = tempfile::tempdir().unwrap();
    assert!(spoolctl(
        dir.path(),
        &["quarantine", "export", export.path().to_str().unwrap()]
    )
    .status
    .success());
    assert!(export.path().join("0.raw").exists() && export.path().join("0.json").exists());
}

/// A record inside a chunk is read by no open scan (that reads heads and bitmaps): `verify`
/// reads the chunks too, and `--repair` quarantines only the damaged record.
#[test]
fn verify_reads_the_records_in_chunks() {
    if std::env::var_os("SPOOLRELAY_SPOOL_CHUNKED_INGEST").is_some_and(|v| v == "0") {
        return; // v1 records only: no chunk to damage (the test above covers them)
    }
    let dir = populated();
    // `a`'s chunk: "\x00\xffbinary" moved out with its retry; "two" and "three" are in it.
    // The last byte is "three"'s payload, so only its record's checksum fails.
    flip_last_byte(dir.path(), |tree| {
        let prefix = spool::keys::chunk_part_prefix(spool::keys::ChunkPart::Chunk);
        tree.scan_prefix(prefix).next().unwrap().unwrap()
    });
    verify_then_repair_one_checksum_failure(dir.path());
    // "two" stays queued beside the retried message; "three" is in quarantine, not lost.
    assert_eq!(json(dir.path(), &["summary"])["queues"]["a"]["count"], 2);
}

#[test]
fn dead_letter_requeue_rebind_and_purge() {
    let dir = populated();
    let dead = json(dir.path(), &["dead-letter", "ls"]);
    assert_eq!(dead[0]["last_error"], "550 nope");
    assert_eq!(
        json(dir.path(), &["dead-letter", "requeue", "--queue", "dead"])["count"],
        1
    );
    assert_eq!(json(dir.path(), &["summary"])["queues"]["dead"]["count"], 1);
    assert_eq!(
        json(dir.path(), &["dead-letter", "ls"])
            .as_array()
            .unwrap()
            .len(),
        0
    );

    assert_eq!(
        json(dir.path(), &["requeue", "--queue", "a", "--to", "c"])["count"],
        3
    );
    let s = json(dir.path(), &["summary"]);
    assert!(s["queues"].get("a").is_none());
    assert_eq!(s["queues"]["c"]["count"], 3);
    assert_eq!(json(dir.path(), &["requeue", "--queue", "c"])["count"], 3);
    assert_eq!(json(dir.path(), &["summary"])["queues"]["c"]["due_now"], 3);

    let refused = spoolctl(dir.path(), &["purge", "--queue", "c"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    assert_eq!(
        json(dir.path(), &["purge", "--queue", "c", "--yes"])["count"],
        3
    );
    assert!(json(dir.path(), &["summary"])["queues"].get("c").is_none());
}

#[test]
fn export_then_import_elsewhere_is_exact_and_idempotent() {
    let dir = populated();
    let file = dir.path().join("backup.ndjson");
    // 4 queued + 1 dead letter.
    assert_eq!(
        json(dir.path(), &["export", file.to_str().unwrap()])["count"],
        5
    );
    let other = tempfile::tempdir().unwrap();
    let first = json(other.path(), &["import", file.to_str().unwrap()]);
    assert_eq!(
        (first["imported"].clone(), first["skipped_existing"].clone()),
        (5.into(), 0.into())
    );
    let again = json(other.path(), &["import", file.to_str().unwrap()]);
    assert_eq!(
        (again["imported"].clone(), again["skipped_existing"].clone()),
        (0.into(), 5.into())
    );
    let dead = |d: &Path| json(d, &["dead-letter", "ls"]);
    assert_eq!(
        dead(dir.path()),
        dead(other.path()),
        "dead letters move too"
    );
    assert_eq!(dead(other.path()).as_array().map(Vec::len), Some(1));
    let ls = |d: &Path| json(d, &["ls", "a"]);
    assert_eq!(
        ls(dir.path()),
        ls(other.path()),
        "ids, attempts, errors and meta survive the move"
    );
    let id = ls(other.path())[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        spoolctl(other.path(), &["show", &id, "--data"]).stdout,
        b"\x00\xffbinary"
    );
}

#[test]
fn a_spool_held_by_a_daemon_is_refused_with_a_pointer_to_url() {
    let dir = populated();
    let _held = open_retrying(dir.path());
    let out = spoolctl(dir.path(), &["summary"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("locked by pid") && err.contains("--url"),
        "{err}"
    );
}

/// sled losing commits (an older `data/` put back while the ledger remembers more): read
/// commands still work and warn, changes and `verify` refuse / fail until `verify --repair`
/// recorded the loss.
#[test]
fn lost_writes_are_reported_until_verify_repair_records_them() {
    let dir = populated();
    let old = tempfile::tempdir().unwrap();
    dirs::copy_dir(&dir.path().join("data"), old.path());
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let spool = open_retrying(dir.path());
        let msg = NewMessage {
            queue: "a".into(),
            meta: Meta::new(),
            payload: b"lost".to_vec(),
        };
        rt.block_on(spool.enqueue(vec![msg])).unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    dirs::copy_dir(old.path(), &dir.path().join("data"));

    let verify = spoolctl(dir.path(), &["verify"]);
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(
        !verify.status.success(),
        "verify passed a lossy spool: {stdout}"
    );
    assert!(
        stdout.contains("LOST WRITES: sled lost 1 group commit"),
        "{stdout}"
    );

    let summary = spoolctl(dir.path(), &["summary"]);
    assert!(summary.status.success());
    assert!(String::from_utf8_lossy(&summary.stderr).contains("WARNING: sled lost"));

    let purge = spoolctl(dir.path(), &["purge", "--queue", "b", "--yes"]);
    assert!(
        !purge.status.success(),
        "a change went through on a lossy spool"
    );
    assert!(String::from_utf8_lossy(&purge.stderr).contains("verify --repair"));

    let repaired = spoolctl(dir.path(), &["verify", "--repair"]);
    assert!(repaired.status.success());
    let quarantine = json(dir.path(), &["quarantine", "ls"]);
    let text = quarantine.to_string();
    assert!(
        text.contains("ledger") && text.contains("lost 1 group commit"),
        "{text}"
    );
    assert!(spoolctl(dir.path(), &["verify"]).status.success());
}

/// A damaged record used to vanish from an export with nothing but a smaller count: it is
/// listed (tree, key, reason) and fails the export unless --skip-damaged.
#[test]
fn export_lists_damaged_records_and_fails_unless_skip_damaged() {
    let dir = populated();
    let damaged_key = {
        let db = sled_open_retrying(dir.path());
        let tree = db.open_tree("messages").unwrap();
        // The first single record (`keys::SINGLES_START`): `a`'s retried message. The chunk
        // area sorts first, and the open scan reads heads, not the records in a chunk.
        let (key, value) = tree
            .range(spool::keys::SINGLES_START..)
            .next()
            .unwrap()
            .unwrap();
        let mut bad = value.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        tree.insert(key.clone(), bad).unwrap();
        db.flush().unwrap();
        key.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let file = dir.path().join("backup.ndjson");
    let out = spoolctl(dir.path(), &["export", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("tree messages key {damaged_key}")) && stderr.contains("checksum"),
        "the damaged record is named with its reason: {stderr}"
    );
    assert!(stderr.contains("--skip-damaged"), "{stderr}");
    let lines = |f: &Path| std::fs::read_to_string(f).unwrap().lines().count();
    assert_eq!(lines(&file), 4, "what could be read is still exported");
    let out = spoolctl(
        dir.path(),
        &["export", "--skip-damaged", file.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&damaged_key));
    assert_eq!(lines(&file), 4);
}
