#![allow(dead_code)] // each test binary uses part of this

use std::path::Path;

pub mod dirs;

use spool::{Leased, Message, Meta, MetaValue, NewMessage, Spool, SpoolOptions};

/// Opens with the daemon's options; `SPOOL_TEST_CHUNKED_INGEST=1` turns chunked ingest
/// (spool v2) on and `=0` off, so any spool test can be run either way.
pub fn open(dir: &Path) -> Spool {
    let default = SpoolOptions::default().chunked_ingest;
    open_chunked(
        dir,
        std::env::var_os("SPOOL_TEST_CHUNKED_INGEST").map_or(default, |v| v != "0"),
    )
}

/// Opens a bare sled database with no background flusher, for the tests that hold the
/// vendored sled's patches to account (`sled_*.rs`): what they count is then only what
/// their own writes caused. Waits out the lock of a handle just dropped, as
/// [`sled_open`] does.
pub fn bare_sled(dir: &Path) -> sled::Db {
    open_when_unlocked(dir, || {
        sled::Config::new().path(dir).flush_every_ms(None).open()
    })
}

/// Opens sled itself (to damage records behind the spool's back), waiting out the lock of
/// a spool just dropped.
pub fn sled_open(data_dir: &Path) -> sled::Db {
    open_when_unlocked(data_dir, || sled::open(data_dir))
}

/// Retries `open` while sled's file lock is held: sled lets go of it from a background
/// thread shortly after the last handle drops (later still while a blob write fsyncs).
pub fn open_when_unlocked(dir: &Path, open: impl Fn() -> sled::Result<sled::Db>) -> sled::Db {
    for _ in 0..250 {
        match open() {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            opened => return opened.expect("sled open"),
        }
    }
    panic!("sled stayed locked at {}", dir.display());
}

/// Opens with the daemon's options and chunked ingest on or off.
pub fn open_chunked(dir: &Path, chunked_ingest: bool) -> Spool {
    let options = SpoolOptions {
        chunked_ingest,
        ..SpoolOptions::default()
    };
    Spool::open(dir, options).expect("open spool").0
}

pub fn msg(queue: &str, payload: &[u8]) -> NewMessage {
    let mut meta = Meta::new();
    meta.insert("source".into(), MetaValue::Str("test".into()));
    NewMessage {
        queue: queue.into(),
        meta,
        payload: payload.to_vec(),
    }
}

/// Far in the future: everything is due.
pub const LATER: u64 = u64::MAX / 2;

pub fn lease_all(spool: &Spool, queue: &str) -> Vec<Leased> {
    spool.lease(queue, usize::MAX, LATER).expect("lease")
}

/// Every queued message of every queue (export's walk), by id.
pub fn all_queued(spool: &Spool) -> Vec<Message> {
    let mut all = Vec::new();
    spool
        .for_each_message(|m| {
            all.push(m);
            Ok(())
        })
        .expect("walk the messages");
    all.sort_by_key(|m| m.id);
    all
}
