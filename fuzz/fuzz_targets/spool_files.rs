//! A real spool directory with its sled files damaged: opening it must either fail with an
//! error or open and serve every record it indexed, never panic or hang.
//!
//! The input is a list of edits to the files of a template spool built once per process:
//! `[file selector, op, offset (4 bytes LE), value]` per 7-byte chunk; op 0 flips bits,
//! op 1 truncates the file at the offset.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use spool::{Meta, NewMessage, Spool, SpoolOptions};

struct Template {
    files: Vec<(PathBuf, Vec<u8>)>,
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        // Panics are results here (see below), not aborts.
        let _ = std::panic::take_hook();
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            let rt = tokio_free_batches(&spool);
            assert!(rt > 0);
        }
        let mut files = Vec::new();
        collect(dir.path(), dir.path(), &mut files);
        Template { files }
    })
}

/// Fills the template with messages in three queues, some acked.
fn tokio_free_batches(spool: &Spool) -> usize {
    let mut n = 0;
    for (i, queue) in ["kafka", "amqp", "camp:ten@example.com"].iter().enumerate() {
        let batch = (0..20)
            .map(|j| NewMessage {
                queue: queue.to_string(),
                meta: Meta::new(),
                payload: vec![(i * j) as u8; 64 + j],
            })
            .collect();
        n += spool.enqueue_blocking(batch).unwrap().len();
        for m in spool.lease(queue, 5, u64::MAX).unwrap() {
            spool.ack(&m.lease).unwrap();
        }
    }
    n
}

fn collect(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
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

fuzz_target!(|data: &[u8]| {
    let t = template();
    let mut files = t.files.clone();
    for edit in data.chunks_exact(7) {
        let (path, bytes) = &mut files[edit[0] as usize % t.files.len()];
        let _ = path;
        if bytes.is_empty() {
            continue;
        }
        let offset =
            u32::from_le_bytes([edit[2], edit[3], edit[4], edit[5]]) as usize % bytes.len();
        match edit[1] % 2 {
            0 => bytes[offset] ^= edit[6].max(1),
            _ => bytes.truncate(offset),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for (path, bytes) in &files {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, bytes).unwrap();
    }
    if let Ok((spool, report)) = Spool::open(dir.path(), SpoolOptions::default()) {
        for (queue, (count, _)) in &report.queues {
            let leased = spool.lease(queue, usize::MAX, u64::MAX).unwrap_or_default();
            assert!(leased.len() as u64 <= *count);
        }
    }
});
