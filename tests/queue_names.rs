//! Queue names built by ingest are read back the same way by the policy host: an injection
//! with a campaign and no tenant reaches `get_queue_config` as campaign + domain.

mod common;

use std::time::Duration;

/// Delivers only when `get_queue_config` and the constructor see domain `example.com`,
/// campaign `spring` and no tenant; otherwise the handler fails and the message stays.
const CHECKING: &str = r#"
local function expect(event, domain, tenant, campaign)
  if domain ~= 'example.com' or tenant ~= nil or campaign ~= 'spring' then
    error(string.format('%s got domain=%s tenant=%s campaign=%s', event,
      tostring(domain), tostring(tenant), tostring(campaign)))
  end
end
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  expect('get_queue_config', domain, tenant, campaign)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.sink' } },
    retry_interval = '1h',
  }
end)
kumo.on('make.sink', function(domain, tenant, campaign)
  expect('make.sink', domain, tenant, campaign)
  local sender = {}
  function sender:send(message) return '250 ok' end
  return sender
end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_campaign_without_tenant_reaches_get_queue_config_as_campaign_and_domain() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(CHECKING, dir.path()).await;
    let req = serde_json::json!({
        "envelope_sender": "a@b",
        "content": "Subject: hi\r\n\r\nhello\r\n",
        "recipients": [{"email": "someone@example.com", "metadata": {"campaign": "spring"}}],
    });
    let resp = reqwest::Client::new()
        .post(common::url(&daemon, "/api/inject/v1"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Delivered (and so removed) only if both events saw campaign `spring`, domain
    // `example.com` and no tenant; otherwise it stays, retried an hour later.
    common::wait_until(
        "the injected message is delivered",
        Duration::from_secs(15),
        || common::queued(&daemon) == 0,
    )
    .await;
    daemon.stop().await.unwrap();
}
