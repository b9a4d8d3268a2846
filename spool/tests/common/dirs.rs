//! Directory helpers shared by the spool's, spoolctl's and the daemon's tests (the latter
//! two include this file by path).

use std::path::Path;

/// Copies a directory tree (a whole spool: `data/` and `ledger` together).
pub fn copy_dir(from: &Path, to: &Path) {
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
