//! The HTTP body parsers: NDJSON batches and KumoMTA injections. Any bytes must give a
//! parse or an error, never a panic; what parses must only hold valid queue names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spoolrelay::ingest::{parse_batch, plan_inject};

fuzz_target!(|data: &[u8]| {
    if let Ok(messages) = parse_batch("fuzz", data) {
        assert!(messages.iter().all(|m| m.queue == "fuzz"));
    }
    if let Ok(plan) = plan_inject(data, &spoolrelay::ingest::IngestLimits::default()) {
        for m in &plan.messages {
            assert!(
                spool::keys::check_queue_name(&m.queue).is_ok(),
                "{:?}",
                m.queue
            );
        }
    }
});
