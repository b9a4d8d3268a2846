//! sled's rebuildable files, checked before sled opens.
//!
//! Two of the files sled 0.34 keeps in `data/` are derived, not data:
//!
//! * `snap.<lsn>`: a snapshot of the page table, rewritten at every open, an accelerator
//!   for replaying the log (sled regenerates it from `db` when there is none);
//! * `conf`: the storage parameters (segment size, compression, version), which the spool
//!   never changes from sled's defaults, so sled rewrites the same file when it is missing.
//!
//! Each ends with a CRC-32 of its contents, but sled refuses to open on a bad one
//! (`Read corrupted data`), and `spoolctl` opens the same way: one flipped byte in a
//! cache would keep every acknowledged message locked away. So before sled opens, a file
//! whose CRC fails is moved to `<spool>/damaged/` (kept for inspection, never deleted) and
//! sled rebuilds it. That cannot hide a loss: if the log alone holds less than sled had
//! made durable, the ledger check refuses the open as for any other lost write.

use std::io;
use std::path::{Path, PathBuf};

/// Where damaged sled files are moved, inside the spool directory (outside `data/`, where
/// sled would read anything named `snap.*`).
pub const DAMAGED_DIR: &str = "damaged";

/// Moves a `conf` or `snap.*` in `sled_dir` that fails its CRC to `<spool_dir>/damaged/`,
/// durably. Returns the new paths.
pub fn set_aside_damaged(sled_dir: &Path, spool_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(sled_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut moved = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let damaged = if name == "conf" {
            !conf_checks_out(&std::fs::read(&path)?)
        } else if name.starts_with("snap.") && !name.ends_with(".generating") {
            !snapshot_checks_out(&std::fs::read(&path)?)
        } else {
            false
        };
        if !damaged {
            continue;
        }
        let aside_dir = spool_dir.join(DAMAGED_DIR);
        std::fs::create_dir_all(&aside_dir)?;
        let aside = aside_dir.join(format!("{name}.{}", crate::now_ms()));
        std::fs::rename(&path, &aside)?;
        crate::durability::sync_dir(&aside_dir)?;
        crate::durability::sync_dir(sled_dir)?;
        crate::durability::sync_dir(spool_dir)?;
        tracing::warn!(file = %path.display(), moved_to = %aside.display(),
            "sled file failed its checksum; moved aside for sled to rebuild it (the ledger check still guards against lost writes)");
        moved.push(aside);
    }
    Ok(moved)
}

/// `conf`: the parameters, then their CRC-32 (little endian). sled itself treats a file of
/// 8 bytes or less as missing, so only longer ones are judged.
fn conf_checks_out(raw: &[u8]) -> bool {
    if raw.len() <= 8 {
        return true;
    }
    let (body, crc) = raw.split_at(raw.len() - 4);
    crc32fast::hash(body).to_le_bytes() == crc
}

/// `snap.<lsn>`: the snapshot, its length (8 bytes), then a CRC-32 of the snapshot.
fn snapshot_checks_out(raw: &[u8]) -> bool {
    if raw.len() <= 12 {
        return false;
    }
    let body = &raw[..raw.len() - 12];
    crc32fast::hash(body).to_le_bytes() == raw[raw.len() - 4..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_follow_sleds_formats() {
        let mut conf = b"params".to_vec();
        conf.extend(crc32fast::hash(b"params").to_le_bytes());
        assert!(conf_checks_out(&conf));
        conf[0] ^= 1;
        assert!(!conf_checks_out(&conf));
        assert!(conf_checks_out(b""), "sled rewrites an empty conf itself");

        let mut snap = b"page table".to_vec();
        snap.extend(10u64.to_le_bytes());
        snap.extend(crc32fast::hash(b"page table").to_le_bytes());
        assert!(snapshot_checks_out(&snap));
        snap[3] ^= 1;
        assert!(!snapshot_checks_out(&snap));
        assert!(!snapshot_checks_out(&[0; 12]));
    }
}
