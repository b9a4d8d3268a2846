//! Read-only views: summary, ls, show. Each is a fetch (offline here, online in
//! [`crate::remote`]) and a shared `print_*`, so both modes print the same thing.

use std::process::ExitCode;

use anyhow::Context;
use spool::view::MessageView;
use spool::{Message, Spool, SpoolStats};

use crate::output::{age, relative, table, Output};

pub fn summary(out: &Output, spool: &Spool) -> anyhow::Result<ExitCode> {
    let now = spool::now_ms();
    print_summary(out, &spool.stats(now), now, &[])
}

/// `suspended` is only known online (a running daemon's state); offline it is empty.
/// A suspended queue as the daemon reports it (`GET /api/admin/suspended`).
pub struct Suspended {
    pub queue: String,
    pub reason: Option<String>,
    /// When it ends by itself; `None`: until resumed.
    pub until_ms: Option<u64>,
}

impl Suspended {
    /// `reason: broker maintenance; 59m59s left`, or `until resumed`.
    fn describe(&self, now: u64) -> String {
        let left = match self.until_ms {
            Some(until) => format!("{} left", age(until.saturating_sub(now))),
            None => "until resumed".into(),
        };
        match &self.reason {
            Some(reason) => format!("reason: {reason}; {left}"),
            None => left,
        }
    }
}

pub fn print_summary(
    out: &Output,
    stats: &SpoolStats,
    now: u64,
    suspended: &[Suspended],
) -> anyhow::Result<ExitCode> {
    if out.json {
        out.json(&serde_json::to_value(stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = stats
        .queues
        .iter()
        .map(|(name, q)| {
            let attempts: Vec<String> =
                q.attempts.iter().map(|(a, n)| format!("{a}:{n}")).collect();
            let name = if suspended.iter().any(|s| &s.queue == name) {
                format!("{name} (suspended)")
            } else {
                name.clone()
            };
            vec![
                name,
                q.count.to_string(),
                q.bytes.to_string(),
                q.oldest_created_ms
                    .map_or("-".into(), |t| age(now.saturating_sub(t))),
                q.due_now.to_string(),
                attempts.join(" "),
            ]
        })
        .collect();
    table(
        &[
            "QUEUE",
            "COUNT",
            "BYTES",
            "OLDEST",
            "DUE NOW",
            "ATTEMPTS (n:count)",
        ],
        &rows,
    );
    println!(
        "\ndead-letter: {}   quarantine: {}",
        stats.dead_letter, stats.quarantine
    );
    for s in suspended {
        println!("suspended: {} ({})", s.queue, s.describe(now));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn ls(
    out: &Output,
    spool: &Spool,
    queue: &str,
    limit: usize,
    due: bool,
    failed: bool,
) -> anyhow::Result<ExitCode> {
    let now = spool::now_ms();
    // Filters apply before the limit: read the queue, keep what matches.
    let selected: Vec<MessageView> = spool
        .list(queue, usize::MAX)?
        .into_iter()
        .filter(|m| (!due || m.due_ms <= now) && (!failed || m.attempts > 0))
        .take(limit)
        .map(|m| MessageView::of(&m, false))
        .collect();
    print_ls(out, &selected, now)
}

pub fn print_ls(out: &Output, selected: &[MessageView], now: u64) -> anyhow::Result<ExitCode> {
    if out.json {
        out.json(&serde_json::to_value(selected)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = selected
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.bytes.to_string(),
                age(now.saturating_sub(m.created_ms)),
                m.attempts.to_string(),
                relative(m.due_ms, now),
                m.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &["ID", "BYTES", "AGE", "ATTEMPTS", "DUE", "LAST ERROR"],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub fn show(out: &Output, spool: &Spool, id: u64, data: bool) -> anyhow::Result<ExitCode> {
    let id = spool::MessageId(id);
    let msg: Message = match spool.get(id)? {
        Some(m) => m,
        None => spool
            .dead_letters()?
            .into_iter()
            .find(|m| m.id == id)
            .with_context(|| format!("message {id} is neither queued nor dead-lettered"))?,
    };
    print_show(out, &MessageView::of(&msg, data), data)
}

/// `view` carries `data_b64` when `data` was asked for.
pub fn print_show(out: &Output, view: &MessageView, data: bool) -> anyhow::Result<ExitCode> {
    if out.json {
        out.json(&serde_json::to_value(view)?);
    } else if data {
        use std::io::Write;
        let payload = view
            .payload()
            .context("the message came without its payload")?
            .context("the payload is not valid base64")?;
        // Binary-safe: the payload exactly as spooled, nothing else.
        std::io::stdout().write_all(&payload)?;
    } else {
        println!("{}", serde_json::to_string_pretty(view)?);
    }
    Ok(ExitCode::SUCCESS)
}
