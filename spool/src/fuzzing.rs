//! The recovery scan without the filesystem, for the `spool_recovery` fuzz target
//! (feature `fuzzing`; not part of the spool's API).
//!
//! Opening a real spool costs milliseconds (sled reads its files, threads start and stop),
//! which caps a file-level fuzz target at tens of inputs a second. The decisions that
//! matter for the contract (what is indexed, what is quarantined with which bytes, which
//! copy of a duplicate wins, where ids continue) are all made by [`crate::recovery::scan`]
//! over the spool's trees ([`ScanSource`]). This harness hands it ordered maps the target
//! fills with any keys and values, so millions of inputs reach that code. The file-level
//! target (`spool_files`) still covers sled's own parsing, through [`open_small`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use crate::commit::{Op, TreeId};
use crate::error::Result as SpoolResult;
use crate::recovery::{self, RecoveryReport, ScanSource};
use crate::{Spool, SpoolOptions};

/// The trees a scan reads, by name, in the order [`ScanHarness::insert`] takes them.
pub const TREES: [&str; 4] = ["messages", "dead_letter", "quarantine", "meta"];

type Tree = BTreeMap<Vec<u8>, Vec<u8>>;

/// The spool's four trees as ordered maps: what sled's trees are to the scan, minus the
/// files (sled's own iteration is covered by the `spool_files` target and the tests).
#[derive(Default)]
pub struct ScanHarness {
    trees: RefCell<[Tree; 4]>,
}

/// What one scan found and did.
#[derive(Debug)]
pub struct ScanOutcome {
    /// The report an open would log.
    pub report: RecoveryReport,
    /// Per queue, how many messages the rebuilt index hands out when everything is due.
    pub leasable: BTreeMap<String, usize>,
}

impl ScanSource for ScanHarness {
    fn for_each(&self, tree: TreeId, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), sled::Error> {
        for (key, value) in &self.trees.borrow()[tree as usize] {
            f(key, value);
        }
        Ok(())
    }

    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, sled::Error> {
        Ok(self.trees.borrow()[tree as usize].get(key).cloned())
    }

    fn large_record(&self) -> usize {
        LARGE_RECORD
    }
}

/// The harness's large-message threshold: the same logic as the spool's 64 KiB, at a size
/// that costs the fuzzer nothing (records of a payload of [`LARGE_RECORD`] bytes reach it).
pub const LARGE_RECORD: usize = 96;

impl ScanHarness {
    /// Empty trees.
    pub fn new() -> ScanHarness {
        ScanHarness::default()
    }

    /// Stores `value` under `key` in tree number `tree` (an index into [`TREES`]).
    pub fn insert(&self, tree: usize, key: &[u8], value: &[u8]) {
        self.trees.borrow_mut()[tree % TREES.len()].insert(key.to_vec(), value.to_vec());
    }

    /// Every entry of tree number `tree`, in key order.
    pub fn entries(&self, tree: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let trees = self.trees.borrow();
        trees[tree % TREES.len()]
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Runs the recovery scan, applies its repairs as an open does, and reports what the
    /// rebuilt index would lease.
    pub fn scan_and_repair(&self) -> sled::Result<ScanOutcome> {
        let mut scan = recovery::scan(self)?;
        let mut trees = self.trees.borrow_mut();
        for op in &scan.repairs {
            match op {
                Op::Put(tree, key, value) => {
                    trees[*tree as usize].insert(key.clone(), value.clone());
                }
                Op::Del(tree, key) => {
                    trees[*tree as usize].remove(key);
                }
                // Only the commit thread resolves these; recovery writes bitmaps itself.
                Op::Settle(..) => {}
            }
        }
        let mut leasable = BTreeMap::new();
        for queue in scan.index.queue_names() {
            let taken = scan.index.take_due(&queue, u64::MAX, usize::MAX).len();
            leasable.insert(queue, taken);
        }
        Ok(ScanOutcome {
            report: scan.report,
            leasable,
        })
    }
}

/// The name a damaged record's `tree` field carries for tree number `tree`.
pub fn tree_label(tree: usize) -> String {
    let id = [
        TreeId::Messages,
        TreeId::DeadLetter,
        TreeId::Quarantine,
        TreeId::Meta,
    ][tree % TREES.len()];
    format!("{id:?}")
}

/// [`Spool::sync`] for a harness outside an async runtime. It waits without the spool's
/// commit deadline, so it is for the fuzz targets only: `spoolctl` and the daemon use
/// `sync`, which poisons the spool instead of hanging on a stuck fsync.
pub fn sync_blocking(spool: &Spool) -> SpoolResult<()> {
    crate::spool::wait(
        spool
            .submit(crate::commit::Job::with_capacity(0))?
            .blocking_recv(),
    )
}

/// sled's segment size in the `spool_files` target, in place of sled's 512 KiB. On every
/// open sled overwrites the rest of the segment it recovers its tip in (its "shred zone"):
/// half a megabyte written per input was most of what the target spent outside the code
/// under test. Small segments also put a small spool across several of them (and its larger
/// tree nodes in blob files: sled's blob threshold is a quarter segment), so the fuzzer's
/// damage lands on segment headers, segment boundaries and blobs instead of zeroed tail.
pub const SEGMENT_SIZE: usize = 8 * 1024;

/// [`Spool::open`] as the daemon does it, with two sled settings changed for the
/// `spool_files` target: [`SEGMENT_SIZE`] segments, and no background flusher thread (the
/// spool makes its own commits durable; the flusher only costs a thread per open). The
/// same sled recovery, spool recovery scan and ledger check run; a directory made by it
/// must be opened by it again (sled refuses a segment size other than the one it recorded).
pub fn open_small(dir: &Path, options: SpoolOptions) -> SpoolResult<(Spool, RecoveryReport)> {
    Spool::open_tuned(dir, options, |config| {
        config.segment_size(SEGMENT_SIZE).flush_every_ms(None)
    })
}
