//! Helpers shared by the policy integration tests: seed extraction and messages.
#![allow(dead_code)]

use std::path::PathBuf;

use policy::PolicyMessage;

/// The seed documents: `shared/seeds` beside the repository (where every developer and CI
/// run has them), else the byte-identical copies in `policy/tests/seeds`, so a clone
/// elsewhere still tests the same text.
pub fn seeds_dir() -> PathBuf {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shared = crate_dir.join("../../shared/seeds");
    if shared.is_dir() {
        shared
    } else {
        crate_dir.join("tests/seeds")
    }
}

pub fn read_seed(name: &str) -> String {
    let path = seeds_dir().join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read seed {}: {e}", path.display()))
}

/// Lines `[first line starting with start ..= end line]`, where the end line is the
/// first line equal to `end)` — or, with `before`, the last `end)` before the first
/// line starting with `before`.
pub fn extract_block(text: &str, start: &str, before: Option<&str>) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("seed has no line starting with {start:?}"));
    let j = match before {
        None => (i..lines.len()).find(|&k| lines[k].trim() == "end)"),
        Some(b) => {
            let stop = (i..lines.len())
                .find(|&k| lines[k].starts_with(b))
                .unwrap_or_else(|| panic!("seed has no line starting with {b:?}"));
            (i..stop).rev().find(|&k| lines[k].trim() == "end)")
        }
    }
    .expect("block has no closing `end)`");
    lines[i..=j].join("\n")
}

/// Seed 002's Lua, verbatim: the get_queue_config block and the make.amqp block.
pub fn amqp_seed_lua() -> String {
    let text = read_seed("002_eeb8a230251de371.txt");
    let a = extract_block(&text, "kumo.on('get_queue_config'", None);
    let b = extract_block(
        &text,
        "-- This is a user-defined event",
        Some("See the AMQP section"),
    );
    format!("{a}\n{b}\n")
}

/// Seed 000's Lua, verbatim: its two ```lua blocks.
pub fn kafka_seed_lua() -> String {
    let text = read_seed("000_0ca928573e02fbba.txt");
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        match (&mut current, line.trim()) {
            (None, "```lua") => current = Some(Vec::new()),
            (Some(b), "```") => {
                blocks.push(b.join("\n"));
                current = None;
            }
            (Some(b), _) => b.push(line),
            (None, _) => {}
        }
    }
    assert_eq!(blocks.len(), 2, "seed 000 should have two lua blocks");
    blocks.join("\n")
}

pub fn message(id: usize, data: Vec<u8>) -> PolicyMessage {
    PolicyMessage {
        id: format!("m{id}"),
        queue: "test".to_string(),
        data,
        ..Default::default()
    }
}

/// A payload that covers every byte value and differs per message.
pub fn binary_payload(i: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..=255u8).collect();
    p.extend_from_slice(format!("#{i}").as_bytes());
    p.push(0);
    p
}
