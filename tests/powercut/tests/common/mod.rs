#![allow(dead_code)] // each test binary uses part of this

use std::fs::File;
use std::path::{Path, PathBuf};

use powercut::PowerCut;

/// A layer mounted over a fresh backing directory, both in one temporary directory.
pub struct Rig {
    pub layer: PowerCut,
    pub root: PathBuf,
    // Dropped last: the mount must go before its directories.
    _tmp: tempfile::TempDir,
}

impl Rig {
    /// `None` (with the reason on stderr) where FUSE cannot be mounted.
    pub fn new() -> Option<Rig> {
        if let Some(why) = powercut::unavailable() {
            eprintln!("SKIPPED: the power-cut layer cannot be mounted here: {why}");
            return None;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let backing = tmp.path().join("disk");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&backing).expect("backing dir");
        std::fs::create_dir(&mnt).expect("mountpoint");
        let layer = PowerCut::mount(&backing, &mnt).expect("mount the power-cut layer");
        Some(Rig {
            layer,
            root: mnt,
            _tmp: tmp,
        })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn cut(&self) {
        self.layer.cut().expect("power cut");
    }
}

/// What `fsync` of a directory does in Rust: open it and `sync_all`.
pub fn sync_dir(path: &Path) {
    File::open(path)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync of directory {}: {e}", path.display()));
}

/// Writes `data` to a new file and fsyncs it (not its directory).
pub fn write_synced(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = File::create(path).expect("create");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

pub fn read(path: &Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(data) => Some(data),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}
