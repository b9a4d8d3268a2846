//! Loading a policy, the event registry, init settings and make_queue_config validation.

use std::time::Duration;

use policy::{InitConfig, PermanentFailure, Policy, PolicyError, QueueConfig, Rate};

#[test]
fn syntax_error_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.lua");
    std::fs::write(
        &path,
        "-- fine\nkumo.on('init', function()\n  local x = = 1\nend)\n",
    )
    .unwrap();
    let err = Policy::load(&path).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PolicyError::Load { .. }), "{text}");
    assert!(text.contains("broken.lua:3:"), "{text}");
}

#[test]
fn missing_file_names_the_path() {
    let err = Policy::load(std::path::Path::new("/nonexistent/policy.lua")).unwrap_err();
    assert!(matches!(err, PolicyError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/policy.lua"), "{err}");
}

#[test]
fn top_level_error_names_file_and_line() {
    let text = Policy::from_source("top.lua", "local a = 1\nerror('no good')\n")
        .unwrap_err()
        .to_string();
    assert!(text.contains("top.lua:2: no good"), "{text}");
}

#[test]
fn duplicate_handler_names_both_places() {
    let src = "kumo.on('make.x', function() end)\n\nkumo.on('make.x', function() end)\n";
    let text = Policy::from_source("dup.lua", src).unwrap_err().to_string();
    eprintln!("{text}");
    assert!(text.contains("dup.lua:3"), "second place missing: {text}");
    assert!(
        text.contains("registered at dup.lua:1"),
        "first place missing: {text}"
    );
    assert!(text.contains("'make.x'"), "{text}");
}

#[test]
fn several_get_queue_config_handlers_are_fine() {
    let src = "kumo.on('get_queue_config', function() end)\nkumo.on('get_queue_config', function() end)\n";
    Policy::from_source("multi.lua", src).unwrap();
}

#[tokio::test]
async fn kumo_on_inside_a_handler_is_an_error() {
    let src = "kumo.on('get_queue_config', function()\n  kumo.on('late', function() end)\nend)\n";
    let p = Policy::from_source("late.lua", src).unwrap();
    let text = p.queue_config("q").await.unwrap_err().to_string();
    assert!(text.contains("late.lua:2"), "{text}");
    assert!(
        text.contains("only be called while the policy loads"),
        "{text}"
    );
}

#[tokio::test]
async fn init_event_sets_spool_and_listener() {
    let src = r#"
kumo.on('init', function()
  kumo.define_spool { name = 'data', path = '/var/spool/relay' }
  kumo.start_http_listener { listen = '127.0.0.1:8000' }
end)
"#;
    let p = Policy::from_source("init.lua", src).unwrap();
    let init = p.init_config().await.unwrap();
    assert_eq!(
        init,
        InitConfig {
            spool_path: Some("/var/spool/relay".into()),
            listen: Some("127.0.0.1:8000".into()),
            log_hooks: Vec::new(),
        }
    );
    // No init handler: defaults.
    let none = Policy::from_source("none.lua", "").unwrap();
    assert_eq!(none.init_config().await.unwrap(), InitConfig::default());
}

#[tokio::test]
async fn init_error_names_the_event() {
    let p = Policy::from_source(
        "initerr.lua",
        "kumo.on('init', function()\n  error('bad init')\nend)\n",
    )
    .unwrap();
    let text = p.init_config().await.unwrap_err().to_string();
    assert!(
        text.contains("event 'init'") && text.contains("initerr.lua:2: bad init"),
        "{text}"
    );
}

#[tokio::test]
async fn no_handler_gives_defaults() {
    let p = Policy::from_source("empty.lua", "").unwrap();
    let c = p.queue_config("anything").await.unwrap();
    assert_eq!(c, QueueConfig::default());
    assert_eq!(c.constructor, None);
    assert_eq!(c.batch_size, 1);
    assert_eq!(c.retry_interval, Duration::from_secs(1200));
    assert_eq!(c.max_age, Duration::from_secs(7 * 86400));
    assert_eq!(c.connection_limit, 32);
    assert_eq!(c.send_timeout, Duration::from_secs(60));
    assert_eq!(c.on_permanent_failure, PermanentFailure::Requeue);
}

#[tokio::test]
async fn every_field_is_parsed() {
    let src = r#"
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  assert(domain == 'd' and tenant == 't' and campaign == 'c' and routing_domain == 'r')
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.k', batch_size = 100, min_batch_size = 10, max_batch_latency = '50ms' } },
    retry_interval = '1 minute',
    max_retry_interval = 3600,
    max_age = '2d',
    max_message_rate = '50/m',
    overall_max_message_rate = '100/s',
    refresh_interval = '5m',
    connection_limit = 4,
    send_timeout = 1.5,
    on_permanent_failure = 'dead_letter',
    egress_pool = 'ignored',
  }
end)
"#;
    let c = Policy::from_source("all.lua", src)
        .unwrap()
        .queue_config("c:t@d!r")
        .await
        .unwrap();
    assert_eq!(
        c,
        QueueConfig {
            constructor: Some("make.k".into()),
            batch_size: 100,
            min_batch_size: 10,
            max_batch_latency: Duration::from_millis(50),
            retry_interval: Duration::from_secs(60),
            max_retry_interval: Some(Duration::from_secs(3600)),
            max_age: Duration::from_secs(2 * 86400),
            max_message_rate: Some(Rate {
                limit: 50,
                per: Duration::from_secs(60)
            }),
            overall_max_message_rate: Some(Rate {
                limit: 100,
                per: Duration::from_secs(1)
            }),
            connection_limit: 4,
            refresh_interval: Duration::from_secs(300),
            send_timeout: Duration::from_millis(1500),
            on_permanent_failure: PermanentFailure::DeadLetter,
        }
    );
}

const BAD: &str = r#"
local bad = {
  unknown = { retry_intervall = '1m' },
  duration = { retry_interval = 'soon' },
  negdur = { max_age = -5 },
  hugeage = { max_age = 1e18 },
  hugeretry = { retry_interval = '500000000000y' },
  rate = { max_message_rate = 'fast' },
  overall = { overall_max_message_rate = '10/fortnight' },
  limit = { connection_limit = -1 },
  limittype = { connection_limit = 'many' },
  failure = { on_permanent_failure = 'drop' },
  proto = { protocol = { smtp = {} } },
  ctor = { protocol = { custom_lua = { constructor = 7 } } },
  batch = { protocol = { custom_lua = { constructor = 'x', batch_size = 0 } } },
  inner = { protocol = { custom_lua = { constructor = 'x', batchsize = 2 } } },
}
kumo.on('get_queue_config', function(domain)
  return kumo.make_queue_config(bad[domain])
end)
"#;

async fn bad_config(queue: &str) -> String {
    let p = Policy::from_source("bad.lua", BAD).unwrap();
    let err = p.queue_config(queue).await.unwrap_err();
    assert!(matches!(err, PolicyError::Event { .. }), "{err}");
    err.to_string()
}

#[tokio::test]
async fn bad_fields_are_named() {
    for (queue, needle) in [
        (
            "unknown",
            "make_queue_config: unknown field 'retry_intervall'",
        ),
        (
            "duration",
            "field 'retry_interval': invalid duration 'soon'",
        ),
        ("negdur", "field 'max_age'"),
        (
            "hugeage",
            "field 'max_age': duration 1000000000000000000 is longer than the maximum",
        ),
        (
            "hugeretry",
            "field 'retry_interval': duration 500000000000y is longer than the maximum",
        ),
        ("rate", "field 'max_message_rate': invalid rate 'fast'"),
        (
            "overall",
            "field 'overall_max_message_rate': invalid rate '10/fortnight'",
        ),
        (
            "limit",
            "field 'connection_limit': must be at least 1, got -1",
        ),
        (
            "limittype",
            "field 'connection_limit': expected a whole number",
        ),
        ("failure", "field 'on_permanent_failure'"),
        ("proto", "protocol 'smtp' is not supported"),
        (
            "ctor",
            "field 'protocol.custom_lua.constructor': expected a string",
        ),
        (
            "batch",
            "field 'protocol.custom_lua.batch_size': must be at least 1",
        ),
        ("inner", "unknown field 'protocol.custom_lua.batchsize'"),
    ] {
        let text = bad_config(queue).await;
        eprintln!("{text}");
        assert!(
            text.contains(needle),
            "queue {queue}: {text:?} should contain {needle:?}"
        );
        assert!(
            text.contains("bad.lua:"),
            "queue {queue}: no location in {text:?}"
        );
    }
}

#[tokio::test]
async fn non_config_return_is_an_error() {
    let p = Policy::from_source("bad.lua", BAD).unwrap();
    // bad['other'] is nil => make_queue_config() => defaults.
    assert_eq!(
        p.queue_config("other").await.unwrap(),
        QueueConfig::default()
    );
    let p = Policy::from_source(
        "num.lua",
        "kumo.on('get_queue_config', function() return 42 end)",
    )
    .unwrap();
    let err = p.queue_config("q").await.unwrap_err();
    assert!(matches!(err, PolicyError::BadQueueConfig { .. }), "{err}");
    assert!(err.to_string().contains("a number (42)"), "{err}");
}

#[test]
fn policy_is_send_sync_clone() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<Policy>();
    fn assert_conn<T: Send + Sync + 'static>() {}
    assert_conn::<policy::Connection>();
}

#[tokio::test]
async fn log_hooks_are_declared_in_init_and_offered_records_come_back_rerouted() {
    let policy = policy::Policy::from_source(
        "hooks.lua",
        r#"
        kumo.on('init', function()
          kumo.configure_log_hook { name = 'events' }
        end)
        kumo.on('should_enqueue_log_record', function(msg, hook)
          if hook ~= 'events' or msg:get_meta('type') == 'Reception' then
            return false
          end
          msg:set_meta('queue', 'kafka')
          return true
        end)
        "#,
    )
    .unwrap();
    assert_eq!(
        policy.init_config().await.unwrap().log_hooks,
        vec!["events".to_string()]
    );
    let record = |kind: &str| {
        let mut meta = serde_json::Map::new();
        meta.insert("type".into(), kind.into());
        policy::PolicyMessage {
            id: "1".into(),
            data: b"{}".to_vec(),
            meta,
            ..Default::default()
        }
    };
    let taken = policy
        .should_enqueue_log_record(record("Delivery"), "events")
        .await
        .unwrap();
    let taken = taken.expect("a Delivery record is enqueued");
    assert_eq!(taken.meta["queue"], "kafka");
    assert_eq!(taken.data, b"{}");
    assert!(policy
        .should_enqueue_log_record(record("Reception"), "events")
        .await
        .unwrap()
        .is_none());
    assert!(policy
        .should_enqueue_log_record(record("Delivery"), "other")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn configure_log_hook_needs_a_name() {
    let policy = policy::Policy::from_source(
        "hooks.lua",
        "kumo.on('init', function() kumo.configure_log_hook {} end)",
    )
    .unwrap();
    let err = policy.init_config().await.unwrap_err().to_string();
    assert!(
        err.contains("'name'") && err.contains("hooks.lua:1"),
        "{err}"
    );
}
