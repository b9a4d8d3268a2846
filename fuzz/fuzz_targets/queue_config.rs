//! `kumo.make_queue_config` with arbitrary Lua values: the input is turned into a Lua
//! table literal (known field names mixed with junk, values of every Lua type, nesting),
//! and the policy must answer with a config or an error naming the problem, never panic.
//! One bare Lua state serves every input (`policy::fuzzing`), not a policy per input.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use policy::fuzzing::QueueConfigProbe;

const FIELDS: &[&str] = &[
    "protocol",
    "custom_lua",
    "constructor",
    "batch_size",
    "min_batch_size",
    "max_batch_latency",
    "retry_interval",
    "max_retry_interval",
    "max_age",
    "max_message_rate",
    "connection_limit",
    "send_timeout",
    "on_permanent_failure",
    "egress_pool",
    "x",
];
const STRINGS: &[&str] = &[
    "'make.kafka'",
    "'20m'",
    "'1 minute'",
    "'7d'",
    "'0s'",
    "'1000/s'",
    "'5/x'",
    "'dead_letter'",
    "'requeue'",
    "''",
    "'-1s'",
    "'99999999999999999999d'",
    "'\\0'",
];

/// A tiny grammar driven by the input bytes, depth-limited.
fn value(bytes: &mut impl Iterator<Item = u8>, depth: u32, out: &mut String) {
    match bytes.next().unwrap_or(0) % 8 {
        0 => out.push_str("nil"),
        1 => out.push_str(if bytes.next().unwrap_or(0) % 2 == 0 {
            "true"
        } else {
            "false"
        }),
        2 => out.push_str(&(bytes.next().unwrap_or(0) as i8 as i64 * 1_000_003).to_string()),
        3 => out.push_str(&format!("{}.5", bytes.next().unwrap_or(0) as i8)),
        4 | 5 => out.push_str(STRINGS[bytes.next().unwrap_or(0) as usize % STRINGS.len()]),
        6 => out.push_str("function() end"),
        _ if depth < 3 => table(bytes, depth + 1, out),
        _ => out.push_str("{}"),
    }
}

fn table(bytes: &mut impl Iterator<Item = u8>, depth: u32, out: &mut String) {
    out.push('{');
    let n = bytes.next().unwrap_or(0) % 6;
    for _ in 0..n {
        let key = bytes.next().unwrap_or(0) as usize;
        if key % 5 == 0 {
            value(bytes, depth, out); // array part
        } else {
            out.push_str(&format!("['{}'] = ", FIELDS[key % FIELDS.len()]));
            value(bytes, depth, out);
        }
        out.push_str(", ");
    }
    out.push('}');
}

fn probe() -> &'static QueueConfigProbe {
    static PROBE: OnceLock<QueueConfigProbe> = OnceLock::new();
    PROBE.get_or_init(|| QueueConfigProbe::new().expect("a Lua state"))
}

fuzz_target!(|data: &[u8]| {
    let mut literal = String::new();
    table(&mut data.iter().copied(), 0, &mut literal);
    let probe = probe();
    // Both ways a handler can answer; an error must name make_queue_config and the field.
    for answer in [probe.make(&literal), probe.from_plain_table(&literal)] {
        if let Err(e) = answer {
            assert!(
                e.contains("make_queue_config") || e.contains("field"),
                "unhelpful error: {e}"
            );
        }
    }
});
