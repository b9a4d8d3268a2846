//! Checking and repairing: verify, dead-letter and quarantine.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use spool::{RecoveryReport, Spool};

use spool::view::MessageView;

use crate::output::{hex, table, Output};

/// Reports what the (non-repairing, unless asked) open found. Exit 0 only when clean.
pub fn verify(out: &Output, report: &RecoveryReport, repaired: bool) -> ExitCode {
    let checked: u64 = report.queues.values().map(|(n, _)| n).sum::<u64>() + report.dead_letter;
    if out.json {
        out.json(&json!({
            "checked": checked,
            "damaged": report.damaged.iter().map(|d| json!({
                "tree": d.tree, "key": String::from_utf8_lossy(&d.key), "reason": d.reason,
            })).collect::<Vec<_>>(),
            "queued_and_dead_lettered": report.duplicates_resolved,
            "chunk_heads_restored": report.heads_restored,
            "lost_writes": report.lost_writes,
            "repaired": repaired,
        }));
    } else {
        println!("checked {checked} intact records");
        for d in &report.damaged {
            println!(
                "DAMAGED {} key {:?}: {}",
                d.tree,
                String::from_utf8_lossy(&d.key),
                d.reason
            );
        }
        if let Some(lost) = &report.lost_writes {
            println!("LOST WRITES: {lost}");
            if repaired {
                println!("the loss is recorded in quarantine (`spoolctl quarantine ls`)");
            }
        }
        if report.duplicates_resolved > 0 {
            println!(
                "{} messages are both queued and dead-lettered",
                report.duplicates_resolved
            );
        }
        if report.heads_restored > 0 {
            println!(
                "{} chunks had lost their head; it is rebuilt from the chunk's own header",
                report.heads_restored
            );
        }
        let damaged = !report.damaged.is_empty() || report.lost_writes.is_some();
        match (!damaged, repaired) {
            (true, _) => println!("spool is clean"),
            (false, true) => println!(
                "moved {} damaged records to quarantine",
                report.damaged.len()
            ),
            (false, false) => println!("run `spoolctl verify --repair` to move them to quarantine"),
        }
    }
    let clean = report.damaged.is_empty()
        && report.duplicates_resolved == 0
        && report.heads_restored == 0
        && report.lost_writes.is_none();
    if clean || repaired {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub fn dead_letter_ls(
    out: &Output,
    spool: &Spool,
    queue: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let dead: Vec<MessageView> = spool
        .dead_letters()?
        .iter()
        .filter(|m| queue.is_none_or(|q| m.queue == q))
        .map(|m| MessageView::of(m, false))
        .collect();
    print_dead_letters(out, &dead)
}

pub fn print_dead_letters(out: &Output, dead: &[MessageView]) -> anyhow::Result<ExitCode> {
    if out.json {
        out.json(&serde_json::to_value(dead)?);
    } else {
        let rows: Vec<Vec<String>> = dead
            .iter()
            .map(|m| {
                vec![
                    m.id.clone(),
                    m.queue.clone(),
                    m.attempts.to_string(),
                    m.last_error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(&["ID", "QUEUE", "ATTEMPTS", "REASON"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn quarantine_ls(out: &Output, spool: &Spool) -> anyhow::Result<ExitCode> {
    let entries = spool.quarantined()?;
    if out.json {
        out.json(&json!(entries
            .iter()
            .map(|e| json!({"tree": e.tree, "key": String::from_utf8_lossy(&e.key), "bytes": e.raw.len(), "reason": e.reason, "at_ms": e.at_ms}))
            .collect::<Vec<_>>()));
    } else {
        let rows: Vec<Vec<String>> = entries
            .iter()
            .map(|e| {
                vec![
                    e.tree.clone(),
                    format!("{:?}", String::from_utf8_lossy(&e.key)),
                    e.raw.len().to_string(),
                    e.reason.clone(),
                ]
            })
            .collect();
        table(&["TREE", "KEY", "BYTES", "REASON"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `<n>.raw` (the record's bytes as found) and `<n>.json` (where and why) per entry.
pub fn quarantine_export(out: &Output, spool: &Spool, dir: &Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let entries = spool.quarantined()?;
    // Written and fsynced one by one, then the directory: all of it survives power loss.
    let write_synced = |name: String, bytes: &[u8]| -> anyhow::Result<()> {
        let path = dir.join(name);
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        std::io::Write::write_all(&mut f, bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))
    };
    for (n, e) in entries.iter().enumerate() {
        write_synced(format!("{n}.raw"), &e.raw)?;
        let about =
            json!({"tree": e.tree, "key_hex": hex(&e.key), "reason": e.reason, "at_ms": e.at_ms});
        write_synced(format!("{n}.json"), &serde_json::to_vec_pretty(&about)?)?;
    }
    spool::durability::sync_dir(dir).with_context(|| format!("syncing {}", dir.display()))?;
    crate::transfer::sync_parent(dir)?;
    out.done("exported quarantine records", entries.len() as u64)
}
