//! Read-only views: summary, ls, show.

use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use spool::{Message, MetaValue, Spool};

use crate::output::{age, relative, table, Output};

pub fn summary(out: &Output, spool: &Spool) -> anyhow::Result<ExitCode> {
    let now = spool::now_ms();
    let stats = spool.stats(now);
    if out.json {
        out.json(&serde_json::to_value(&stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = stats
        .queues
        .iter()
        .map(|(name, q)| {
            let attempts: Vec<String> =
                q.attempts.iter().map(|(a, n)| format!("{a}:{n}")).collect();
            vec![
                name.clone(),
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
    let selected: Vec<Message> = spool
        .list(queue, usize::MAX)?
        .into_iter()
        .filter(|m| (!due || m.due_ms <= now) && (!failed || m.attempts > 0))
        .take(limit)
        .collect();
    if out.json {
        out.json(&json!(selected
            .iter()
            .map(|m| describe(m, false))
            .collect::<Vec<_>>()));
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = selected
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.payload.len().to_string(),
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
    let msg = match spool.get(id)? {
        Some(m) => m,
        None => spool
            .dead_letters()?
            .into_iter()
            .find(|m| m.id == id)
            .with_context(|| format!("message {id} is neither queued nor dead-lettered"))?,
    };
    if out.json {
        out.json(&describe(&msg, data));
    } else if data {
        use std::io::Write;
        // Binary-safe: the payload exactly as spooled, nothing else.
        std::io::stdout().write_all(&msg.payload)?;
    } else {
        println!("{}", serde_json::to_string_pretty(&describe(&msg, false))?);
    }
    Ok(ExitCode::SUCCESS)
}

/// A message as JSON; the payload in base64 when asked for.
pub fn describe(m: &Message, data: bool) -> serde_json::Value {
    let meta: serde_json::Map<String, serde_json::Value> = m
        .meta
        .iter()
        .map(|(k, v)| (k.clone(), meta_json(v)))
        .collect();
    let mut v = json!({
        "id": m.id.to_string(),
        "queue": m.queue,
        "created_ms": m.created_ms,
        "attempts": m.attempts,
        "due_ms": m.due_ms,
        "last_error": m.last_error,
        "bytes": m.payload.len(),
        "meta": meta,
    });
    if data {
        use base64::Engine;
        v["data_b64"] = json!(base64::engine::general_purpose::STANDARD.encode(&m.payload));
    }
    v
}

pub fn meta_json(v: &MetaValue) -> serde_json::Value {
    match v {
        MetaValue::Null => serde_json::Value::Null,
        MetaValue::Bool(b) => json!(b),
        MetaValue::Int(i) => json!(i),
        MetaValue::Float(f) => json!(f),
        MetaValue::Str(s) => json!(s),
        MetaValue::Json(text) => serde_json::from_str(text).unwrap_or_else(|_| json!(text)),
    }
}
