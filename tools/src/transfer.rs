//! Export and import: NDJSON, one message a line, payload in base64, every field kept, so
//! a spool can be backed up or moved to another host. Queued messages come first, then
//! dead letters (`"dead_letter": true`), which import puts back in the dead-letter area.
//! Import keeps ids and skips ids it already has, so it can be re-run after an
//! interruption. (Quarantined records are not messages: `quarantine export` saves them.)

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine;
use serde::{Deserialize, Serialize};
use spool::{Message, MessageId, Spool};

use crate::output::Output;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One line of an export file.
#[derive(Serialize, Deserialize)]
struct Line {
    id: u64,
    queue: String,
    created_ms: u64,
    attempts: u32,
    due_ms: u64,
    last_error: Option<String>,
    meta: spool::Meta,
    data_b64: String,
    /// A dead letter (its reason is `last_error`); absent for queued messages.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    dead_letter: bool,
}

impl Line {
    fn of(m: Message, dead_letter: bool) -> Line {
        Line {
            id: m.id.0,
            queue: m.queue,
            created_ms: m.created_ms,
            attempts: m.attempts,
            due_ms: m.due_ms,
            last_error: m.last_error,
            meta: m.meta,
            data_b64: B64.encode(&m.payload),
            dead_letter,
        }
    }
}

/// Writes the export and fsyncs it and its directory. Damaged records are not exported:
/// they are listed (tree, key, reason) on stderr, and the exit code is 1 unless
/// `skip_damaged`.
pub fn export(
    out: &Output,
    spool: &Spool,
    path: &Path,
    skip_damaged: bool,
) -> anyhow::Result<ExitCode> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(file);
    let stats = spool.stats(spool::now_ms());
    let total = stats.queues.values().map(|q| q.count).sum::<u64>() + stats.dead_letter;
    let bar = indicatif::ProgressBar::new(total).with_message("exporting");
    let mut n = 0u64;
    let mut write = |line: Line| -> spool::Result<()> {
        serde_json::to_writer(&mut w, &line)
            .map_err(std::io::Error::from)
            .map_err(io)?;
        w.write_all(b"\n").map_err(io)?;
        n += 1;
        bar.inc(1);
        Ok(())
    };
    let mut damaged = Vec::new();
    spool.for_each_record(|record| match record {
        Ok(m) => write(Line::of(m, false)),
        Err(bad) => {
            damaged.push(bad);
            Ok(())
        }
    })?;
    let (dead, bad_dead) = spool.dead_letter_records()?;
    damaged.extend(bad_dead);
    for m in dead {
        write(Line::of(m, true))?;
    }
    w.into_inner()?
        .sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    sync_parent(path)?;
    bar.finish_and_clear();
    for bad in &damaged {
        eprintln!(
            "DAMAGED, not exported: tree {} key {} ({})",
            bad.tree,
            crate::output::hex(&bad.key),
            bad.reason
        );
    }
    if damaged.is_empty() || skip_damaged {
        return out.done("exported", n);
    }
    if out.json {
        out.json(&serde_json::json!({"count": n, "damaged": damaged.len()}));
    }
    eprintln!(
        "spoolctl export: {} damaged record(s) were not exported (listed above), {n} exported to {}. \
         Rerun with --skip-damaged to accept that, or run `spoolctl verify` and `quarantine export` to look at them",
        damaged.len(),
        path.display()
    );
    Ok(ExitCode::from(1))
}

/// Fsyncs the directory holding `path`, so a newly created file survives power loss.
pub fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    spool::durability::sync_dir(dir).with_context(|| format!("syncing directory {}", dir.display()))
}

fn io(e: std::io::Error) -> spool::SpoolError {
    spool::SpoolError::Io {
        path: "export file".into(),
        source: e,
    }
}

pub fn import(
    out: &Output,
    rt: &tokio::runtime::Runtime,
    spool: &Spool,
    path: &Path,
) -> anyhow::Result<ExitCode> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (mut queued, mut dead) = (Vec::new(), Vec::new());
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not an export line", path.display(), n + 1))?;
        let payload = B64
            .decode(&l.data_b64)
            .with_context(|| format!("{}:{}: bad data_b64", path.display(), n + 1))?;
        let into = if l.dead_letter {
            &mut dead
        } else {
            &mut queued
        };
        into.push(Message {
            id: MessageId(l.id),
            queue: l.queue,
            created_ms: l.created_ms,
            attempts: l.attempts,
            due_ms: l.due_ms,
            last_error: l.last_error,
            meta: l.meta,
            payload,
        });
    }
    let (imported, skipped) = rt.block_on(spool.import(queued, dead))?;
    if out.json {
        out.json(&serde_json::json!({"imported": imported, "skipped_existing": skipped}));
    } else {
        println!("imported: {imported}, skipped (already present): {skipped}");
    }
    Ok(ExitCode::SUCCESS)
}
