//! A real spool directory with its sled files damaged: opening it must either fail with an
//! error, or open, hand out no more than it indexed, and account for every message the
//! template held: read back byte for byte, quarantined, or the damage hit the ledger (the
//! only witness of sled's lost writes). Never a panic outside sled, never a hang.
//!
//! The input is a list of edits to the files of a template spool built once per process
//! (files in path order): `[file selector, op, offset (4 bytes LE), value]` per 7-byte
//! chunk; op 0 flips bits, op 1 truncates the file at the offset.
//!
//! Speed (see fuzz/README.md): each input is a fresh directory on /dev/shm (fsync is nearly
//! free there), and the spool is opened through `spool::fuzzing::open_small` (8 KiB sled
//! segments, no flusher thread), which spares sled rewriting half a megabyte per open.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use spool::fuzzing::{open_small, sync_blocking};
use spool::{MessageId, Meta, NewMessage, Spool, SpoolOptions};

struct Template {
    /// Every file but the lock, by path relative to the spool directory, sorted so a
    /// selector names the same file in every process.
    files: Vec<(PathBuf, Vec<u8>)>,
    /// The directories under the spool directory, parents first.
    dirs: Vec<PathBuf>,
    /// The messages still queued when the template closed (enqueued, not acked), by id.
    queued: BTreeMap<u64, Vec<u8>>,
}

const QUEUES: [&str; 3] = ["kafka", "amqp", "camp:ten@example.com"];
/// Messages per queue and round: few, because every record costs each input a decode in
/// sled and in the recovery scan, but enough that the log spans two segments (with
/// [`spool::fuzzing::SEGMENT_SIZE`]), so sled's multi-segment recovery is in play.
const PER_QUEUE: usize = 6;

/// Where inputs' directories go: tmpfs when there is one (an fsync there is a memory
/// operation), else the usual temporary directory.
fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        install_panic_hook();
        let dir = tempfile::tempdir_in(scratch_root()).unwrap();
        let mut queued = BTreeMap::new();
        // Two opens: the second leaves sled a snapshot file and a log with history. The
        // first writes v1 records, the second chunks (the default): a spool upgraded in
        // place holds both.
        for round in 0..2 {
            let options = SpoolOptions {
                chunked_ingest: round == 1,
                ..SpoolOptions::default()
            };
            let (spool, _) = open_small(dir.path(), options).unwrap();
            fill(&spool, round, &mut queued);
        }
        let mut files = Vec::new();
        collect(dir.path(), dir.path(), &mut files);
        files.sort();
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .flat_map(|(path, _)| path.ancestors().skip(1))
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .collect();
        dirs.sort();
        dirs.dedup();
        eprintln!("spool_files template ({} messages queued):", queued.len());
        for (path, bytes) in &files {
            eprintln!("  {} ({} bytes)", path.display(), bytes.len());
        }
        Template {
            files,
            dirs,
            queued,
        }
    })
}

/// sled 0.34 asserts its way through recovery, and the spool turns those panics into
/// `SpoolError::Unrecoverable` (a caught panic is an answer, not a crash). A panic anywhere
/// else (the spool's recovery, its ledger check, this harness) is a bug even when the spool
/// catches it, so it aborts the process and libFuzzer keeps the input. Panics from the
/// standard library count as sled's only through sled's own call sites (`#[track_caller]`).
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let file = info.location().map(|l| l.file()).unwrap_or("");
        // sled is vendored (vendor/sled/PATCHES.md); a registry build's path is kept for
        // a checkout that drops the patch.
        let sleds = file.contains("vendor/sled/")
            || file.contains("/sled-0.34")
            || file.starts_with("/rustc/");
        if !sleds {
            eprintln!("panic outside sled: {info}");
            std::process::abort();
        }
    }));
}

fn payload(round: usize, queue: usize, n: usize) -> Vec<u8> {
    // One message per round over sled's blob threshold at 8 KiB segments (2 KiB), so its
    // tree node lives in a blob file. No spool-large message (64 KiB): its three blob
    // copies tripled the bytes copied per input, and the large-message markers are
    // covered by `spool_recovery` and spool/tests/sled_files.rs.
    let len = if (queue, n) == (0, 3) {
        3 * 1024
    } else {
        40 + 13 * n
    };
    (0..len).map(|i| (i * 7 + n * 31 + round) as u8).collect()
}

/// Queues [`PER_QUEUE`] messages in each queue and acks two per queue, noting what stays
/// queued.
fn fill(spool: &Spool, round: usize, queued: &mut BTreeMap<u64, Vec<u8>>) {
    for (q, queue) in QUEUES.iter().enumerate() {
        let payloads: Vec<Vec<u8>> = (0..PER_QUEUE).map(|n| payload(round, q, n)).collect();
        let batch = payloads
            .iter()
            .map(|p| NewMessage {
                queue: queue.to_string(),
                meta: Meta::new(),
                payload: p.clone(),
            })
            .collect();
        let ids = spool.enqueue_blocking(batch).unwrap();
        queued.extend(ids.iter().map(|id| id.0).zip(payloads));
        for m in spool.lease(queue, 2, u64::MAX).unwrap() {
            spool.ack(&m.lease).unwrap();
            queued.remove(&m.message.id.0);
        }
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(root, &path, out);
        } else if path.file_name().is_some_and(|n| n != "spool.lock") {
            out.push((
                path.strip_prefix(root).unwrap().to_path_buf(),
                std::fs::read(&path).unwrap(),
            ));
        }
    }
}

/// Applies the input's edits to a copy of the template's files; says whether the ledger
/// was among the files edited.
fn damage(t: &Template, data: &[u8]) -> (Vec<(PathBuf, Vec<u8>)>, bool) {
    let mut files = t.files.clone();
    let mut ledger_hit = false;
    for edit in data.chunks_exact(7) {
        let (path, bytes) = &mut files[edit[0] as usize % t.files.len()];
        if bytes.is_empty() {
            continue;
        }
        ledger_hit |= path.as_os_str() == spool::ledger::FILE_NAME;
        let offset =
            u32::from_le_bytes([edit[2], edit[3], edit[4], edit[5]]) as usize % bytes.len();
        match edit[1] % 2 {
            0 => bytes[offset] ^= edit[6].max(1),
            _ => bytes.truncate(offset),
        }
    }
    (files, ledger_hit)
}

/// The promise of an open that succeeded: no lease beyond the index, no message changed,
/// and none missing beyond what was reported (quarantined by the open, or by a lease that
/// found a chunk record damaged) unless the ledger itself was damaged (then sled's lost
/// writes can go unseen, by design: see ledger.rs).
fn check_opened(
    t: &Template,
    spool: &Spool,
    report: &spool::recovery::RecoveryReport,
    ledger_hit: bool,
) {
    // The open scan reads chunk heads, not their records: a lease quarantines a damaged
    // record when it reaches it, in the background. Those count as reported too.
    let quarantined = || spool.quarantined().map_or(0, |q| q.len() as u64);
    let before_leases = quarantined();
    for (queue, (count, _)) in &report.queues {
        let leased = spool.lease(queue, usize::MAX, u64::MAX).unwrap_or_default();
        assert!(
            leased.len() as u64 <= *count,
            "{queue}: leased more than indexed"
        );
    }
    let mut missing = 0;
    for (id, bytes) in &t.queued {
        match spool.get(MessageId(*id)) {
            Ok(Some(m)) => assert!(&m.payload == bytes, "message {id} changed"),
            Ok(None) => missing += 1,
            Err(_) => {} // an error on read names the message: reported
        }
    }
    let at_lease = match sync_blocking(spool) {
        Ok(()) => quarantined().saturating_sub(before_leases),
        Err(_) => return, // the spool refused a write: nothing it acknowledges is at stake
    };
    let reported = report.quarantined_now + at_lease + report.lost_large.len() as u64;
    assert!(
        missing <= reported || ledger_hit,
        "silent loss: {missing} queued messages missing, {reported} reported: {report:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let t = template();
    let (files, ledger_hit) = damage(t, data);
    let dir = tempfile::tempdir_in(scratch_root()).unwrap();
    for sub in &t.dirs {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    for (path, bytes) in &files {
        std::fs::write(dir.path().join(path), bytes).unwrap();
    }
    // A refusal is an answer (its wording is checked by spool/tests/sled_files.rs).
    if let Ok((spool, report)) = open_small(dir.path(), SpoolOptions::default()) {
        check_opened(t, &spool, &report, ledger_hit);
    }
});
