//! An injection's envelope reaches the policy as documented in docs/lua-api.md:
//! `message:sender()` / `message:recipient()`, and the same values under `get_meta`.

mod common;

use std::time::Duration;

/// Delivers only when the message shows the injection's envelope both ways; otherwise the
/// send raises and the message stays, retried an hour later.
const CHECKING: &str = r#"
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.sink' } },
    retry_interval = '1h',
  }
end)
kumo.on('make.sink', function(domain, tenant, campaign)
  local sender = {}
  function sender:send(message)
    local got = {
      message:sender(), message:recipient(),
      message:get_meta('sender'), message:get_meta('recipient'),
    }
    local want = { 'a@b', 'someone@example.com', 'a@b', 'someone@example.com' }
    for i = 1, #want do
      if got[i] ~= want[i] then
        error(string.format('envelope value %d: got %s, want %s', i, tostring(got[i]), want[i]))
      end
    end
    return '250 ok'
  end
  return sender
end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_envelope_reaches_the_policy_as_sender_recipient_and_meta() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(CHECKING, dir.path()).await;
    let req = serde_json::json!({
        "envelope_sender": "a@b",
        "content": "Subject: hi\r\n\r\nhello\r\n",
        "recipients": [{"email": "someone@example.com"}],
    });
    let resp = reqwest::Client::new()
        .post(common::url(&daemon, "/api/inject/v1"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    common::wait_until(
        "the injected message is delivered",
        Duration::from_secs(15),
        || common::queued(&daemon) == 0,
    )
    .await;
    daemon.stop().await.unwrap();
}
