//! KumoMTA's `overall_max_message_rate`: one limit for all the queues of a tenant, not for
//! each queue on its own (that is `max_message_rate`). Both count only messages sent: at
//! a low rate, messages that arrive one by one each get their token. `refresh_interval`
//! sets how soon a queue's config is asked again.

mod common;

use std::time::Duration;

/// Ten messages an hour for each tenant, over all its queues; queue `solo` (no tenant)
/// three an hour of its own.
const POLICY: &str = r#"
kumo.on('get_queue_config', function(domain, tenant, campaign)
  if domain == 'solo' then
    return kumo.make_queue_config {
      protocol = { custom_lua = { constructor = 'make.ok' } },
      max_message_rate = '3/h',
    }
  end
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.ok' } },
    overall_max_message_rate = '10/h',
  }
end)
kumo.on('make.ok', function()
  return { send = function() return '250 ok' end }
end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overall_max_message_rate_is_shared_by_a_tenants_queues() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(POLICY, dir.path()).await;
    let http = reqwest::Client::new();
    let queues = [
        ("c1:acme@a.com", 10),
        ("c2:acme@b.com", 10),
        ("c1:zeta@a.com", 5),
        ("solo", 5),
    ];
    for (queue, n) in queues {
        for _ in 0..n {
            let status = http
                .post(common::url(
                    &daemon,
                    &format!("/api/v1/queues/{queue}/messages"),
                ))
                .body("x")
                .send()
                .await
                .unwrap()
                .status();
            assert!(status.is_success(), "{queue}: {status}");
        }
    }
    // acme's two queues share ten sends an hour; zeta has ten of its own.
    common::wait_until(
        "ten of acme, all of zeta, three of solo",
        Duration::from_secs(10),
        || common::queued(&daemon) == 12,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acme =
        common::queued_in(&daemon, "c1:acme@a.com") + common::queued_in(&daemon, "c2:acme@b.com");
    assert_eq!(acme, 10, "acme's queues together sent only ten");
    assert_eq!(
        common::queued_in(&daemon, "c1:zeta@a.com"),
        0,
        "zeta is not limited by acme"
    );
    assert_eq!(
        common::queued_in(&daemon, "solo"),
        2,
        "max_message_rate let three through"
    );
    daemon.stop().await.unwrap();
}

/// The first answer allows one message an hour; every later one has no limit.
const REFRESHED: &str = r#"
local asked = 0
kumo.on('get_queue_config', function()
  asked = asked + 1
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.ok' } },
    max_message_rate = (asked == 1) and '1/h' or nil,
    refresh_interval = '1s',
  }
end)
kumo.on('make.ok', function()
  return { send = function() return '250 ok' end }
end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_interval_sets_how_soon_a_queue_config_is_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(REFRESHED, dir.path()).await;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let status = http
            .post(common::url(&daemon, "/api/v1/queues/refreshed/messages"))
            .body("x")
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "{status}");
    }
    // With the default 60 s, the '1/h' of the first answer would hold two of them.
    common::wait_until(
        "all three sent after the config was asked again",
        Duration::from_secs(10),
        || common::queued(&daemon) == 0,
    )
    .await;
    daemon.stop().await.unwrap();
}
