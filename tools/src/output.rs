//! Tables for people, JSON for scripts.

use std::process::ExitCode;

pub struct Output {
    pub json: bool,
}

impl Output {
    pub fn json(&self, value: &serde_json::Value) {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("JSON values serialize")
        );
    }

    /// A result that is only a count.
    pub fn done(&self, what: &str, n: u64) -> anyhow::Result<ExitCode> {
        if self.json {
            self.json(&serde_json::json!({ "action": what, "count": n }));
        } else {
            println!("{what}: {n}");
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// "3m12s" from milliseconds.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// Relative time of `at_ms` from `now_ms`: "in 5s", "3m ago".
pub fn relative(at_ms: u64, now_ms: u64) -> String {
    if at_ms > now_ms {
        format!("in {}", age(at_ms - now_ms))
    } else {
        format!("{} ago", age(now_ms - at_ms))
    }
}

/// Bytes as lowercase hex, for keys and damaged records in reports.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
