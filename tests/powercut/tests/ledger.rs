//! The spool's lost-writes ledger across a power cut. The ledger (`<spool>/ledger`, outside
//! sled) is what notices sled dropping the tail of its log; it is not fsynced per commit, so
//! a cut rolls it back to its last sync. Unless something syncs it soon after each commit,
//! the rolled-back ledger agrees with a sled that lost those same commits, and the loss of
//! acknowledged messages goes unseen. `spool::ledger::SYNC_INTERVAL` is that something.
//!
//! The damage to sled stands in for its recovery stopping early in a damaged log (as in
//! spool/tests/lost_writes.rs): an older copy of `data/` put back after the cut.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Rig;
use spool::{Meta, NewMessage, Spool, SpoolError, SpoolOptions};

fn batch(tag: &str, n: usize) -> Vec<NewMessage> {
    (0..n)
        .map(|i| NewMessage {
            queue: "q".into(),
            meta: Meta::new(),
            payload: format!("{tag} {i}").into_bytes(),
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Waits (generously) until what a reboot would find of the ledger, the layer's backing
/// file, equals what the running spool last wrote. Returns whether it got there.
fn ledger_reaches_the_disk(rig: &Rig, rel: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let visible = std::fs::read(rig.path(rel)).unwrap();
        if std::fs::read(rig.layer.backing().join(rel)).ok() == Some(visible) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn ledger_sees_lost_commits_after_a_power_cut() {
    let Some(rig) = Rig::new() else { return };
    let dir = rig.path("spool");
    let old = tempfile::tempdir().unwrap();

    // First batch, a clean close (which syncs the ledger), and a copy of sled as it was.
    {
        let (spool, _) = Spool::open(&dir, SpoolOptions::default()).expect("open");
        spool.enqueue_blocking(batch("first", 10)).expect("enqueue");
    }
    copy_dir(&dir.join("data"), old.path());

    // Second batch, acknowledged; then the power goes.
    let (spool, _) = Spool::open(&dir, SpoolOptions::default()).expect("reopen");
    let lost = spool.enqueue_blocking(batch("second", 5)).expect("enqueue");
    let synced = ledger_reaches_the_disk(&rig, "spool/ledger");
    rig.cut();
    std::mem::forget(spool); // a process that lost its power runs no destructors

    // sled comes back without the second batch's commits.
    std::fs::remove_dir_all(dir.join("data")).unwrap();
    copy_dir(old.path(), &dir.join("data"));

    match Spool::open(&dir, SpoolOptions::default()) {
        Err(SpoolError::LostWrites { lost: found, .. }) => {
            assert!(found.commits >= 1, "{found}");
            assert_eq!(found.ledger_highest_id, lost.last().unwrap().0, "{found}");
        }
        Err(e) => panic!("unexpected error reopening: {e}"),
        Ok(_) => panic!(
            "the spool opened without a word although acknowledged messages {lost:?} are gone \
             (ledger synced before the cut: {synced}): the power cut rolled the ledger back"
        ),
    }
}
