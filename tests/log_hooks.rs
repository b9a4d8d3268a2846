//! Log hooks: the relay's own delivery records, routed by the policy into a Kafka queue,
//! arrive in the broker next to the messages they describe, once each, without loops.

mod common;

use std::time::Duration;

use serde_json::Value;

const MESSAGES: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_records_reach_kafka_through_a_log_hook_without_loops() {
    // The hooks below read the record from `log_record` and are three handlers; without
    // either, records go missing or Reception records get through (checked by reverting).
    let kafka = common::MockKafka::start("relay.hooks", 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hook = r#"
kumo.on('init', function()
  kumo.configure_log_hook { name = 'events' }
end)
-- KumoMTA style: several handlers, run in order; nil passes the record on, true or
-- false is final (the last handler would take every record if false were not).
kumo.on('should_enqueue_log_record', function(msg, hook_name)
  return nil
end)
kumo.on('should_enqueue_log_record', function(msg, hook_name)
  local record = msg:get_meta('log_record')
  if record.type ~= 'Delivery' or record.queue ~= 'app' then
    return false
  end
  msg:set_meta('queue', 'log.events')
  return true
end)
kumo.on('should_enqueue_log_record', function(msg, hook_name)
  msg:set_meta('queue', 'log.events')
  return true
end)
"#;
    let lua = common::kafka_policy(&kafka.brokers, &kafka.topic, "", "") + hook;
    let policy = policy::Policy::from_source("hooks.lua", &lua).unwrap();
    let hooks = policy.init_config().await.unwrap().log_hooks;
    assert_eq!(hooks, vec!["events".to_string()], "init declares the hook");
    let daemon = common::start_with(&lua, dir.path(), |c| c.log_hooks = hooks).await;

    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..MESSAGES {
        let answer: Value = http
            .post(common::url(&daemon, "/api/v1/queues/app/messages"))
            .body(format!("payload {i}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(answer["id"].as_str().unwrap().to_owned());
    }
    // Each message once, plus one Delivery record about it; the records' own deliveries
    // produce no further records. consume_sorted also fails on anything beyond 2N.
    let got = common::consume_sorted(&kafka, 2 * MESSAGES).await;
    let (records, payloads): (Vec<_>, Vec<_>) = got.iter().partition(|p| p.starts_with(b"{"));
    assert_eq!(payloads.len(), MESSAGES);
    let mut described: Vec<String> = records
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(r).unwrap();
            assert_eq!(v["type"], "Delivery");
            assert_eq!(v["queue"], "app");
            assert_eq!(v["code"], 250);
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    described.sort();
    ids.sort();
    assert_eq!(described, ids, "one Delivery record per message");
    common::wait_until("spool drained", Duration::from_secs(20), || {
        common::queued(&daemon) == 0
    })
    .await;
    daemon.stop().await.unwrap();
}
