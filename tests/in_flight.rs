//! What one connection holds in flight: at most `MAX_BYTES_IN_FLIGHT_PER_CONNECTION` (16
//! MiB) of payloads, whatever the message count allows, so a backlog of large messages
//! cannot make the relay hold gigabytes in its sends. Checked with a sender that never
//! finishes: the leased messages are what is in flight.

mod common;

use std::time::Duration;

use spool::{Meta, NewMessage};

/// One connection whose sends sleep for an hour: whatever is leased stays in flight.
const POLICY: &str = r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.stuck' } },
    connection_limit = 1,
  }
end)
kumo.on('make.stuck', function()
  local sender = {}
  function sender:send(message)
    kumo.sleep(3600)
    return '250 too late'
  end
  return sender
end)
"#;

const MIB: usize = 1 << 20;

/// Enqueues one message of each size, in one call (so one lease can see them all).
async fn enqueue(daemon: &spoolrelay::Daemon, sizes: &[usize]) {
    let messages = sizes
        .iter()
        .map(|&size| NewMessage {
            queue: "big".into(),
            meta: Meta::new(),
            payload: vec![b'x'; size],
        })
        .collect();
    daemon.spool.enqueue(messages).await.expect("enqueue");
}

fn leased(daemon: &spoolrelay::Daemon) -> u64 {
    let stats = daemon.spool.stats(spool::now_ms());
    stats.queues.get("big").map_or(0, |q| q.leased)
}

/// Enqueues `sizes` (as [`enqueue`]) on a fresh relay whose sends never finish, and
/// returns it once its worker has filled its one connection: the first sends started, and
/// the worker had a few rounds to lease more whenever it looked for room.
async fn stuck_relay_with(dir: &std::path::Path, sizes: &[usize]) -> spoolrelay::Daemon {
    let daemon = common::start(POLICY, dir).await;
    enqueue(&daemon, sizes).await;
    common::wait_until("the first sends to start", Duration::from_secs(20), || {
        leased(&daemon) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_at_most_16_mib_of_payloads_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    // 40 messages of 1 MiB: the message count (up to 256 sends of one) would take them all.
    let daemon = stuck_relay_with(dir.path(), &[MIB; 40]).await;
    assert_eq!(
        leased(&daemon),
        16,
        "16 MiB of 1 MiB payloads are in flight, and no more"
    );
    assert_eq!(common::queued_in(&daemon, "big"), 40, "nothing lost");

    // With the budget spent, even a message that would go alone waits for room.
    enqueue(&daemon, &[17 * MIB]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(leased(&daemon), 16, "no room while the budget is spent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_budget_goes_alone() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = stuck_relay_with(dir.path(), &[17 * MIB, MIB, MIB, MIB]).await;
    assert_eq!(
        leased(&daemon),
        1,
        "the 17 MiB message is in flight alone: its connection has no room left"
    );
    assert_eq!(common::queued_in(&daemon, "big"), 4, "nothing lost");
}
