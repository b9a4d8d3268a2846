//! print / kumo.log_* go to tracing with the calling file:line, also from inside a send;
//! KumoMTA queue-config fields that do nothing here are accepted with one warning each;
//! a sender that returns a string without a 2xx code is warned about once per queue.

use std::io::Write;
use std::sync::{Arc, Mutex};

use policy::{Policy, PolicyMessage};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const SRC: &str = r#"
print('loaded', 1)
kumo.on('get_queue_config', function()
  return kumo.make_queue_config { protocol = { custom_lua = { constructor = 'make' } } }
end)
kumo.on('make', function()
  return {
    send = function(self, message)
      kumo.log_warn('sending', message:id())
      kumo.sleep(0)
      kumo.log_error('sent', message:id())
      return '250 ok'
    end,
  }
end)
"#;

#[tokio::test]
async fn log_lines_carry_the_policy_location() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let policy = Policy::from_source("log.lua", SRC).unwrap();
    let conn = policy.connect("q").await.unwrap();
    let out = conn
        .send(PolicyMessage {
            id: "m1".into(),
            ..Default::default()
        })
        .await;
    assert!(out.is_delivered(), "{out:?}");

    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("loaded\t1") && text.contains("at=log.lua:2"),
        "{text}"
    );
    assert!(
        text.contains("WARN") && text.contains("sending m1") && text.contains("at=log.lua:9"),
        "{text}"
    );
    // after a yield, still the right place
    assert!(
        text.contains("ERROR") && text.contains("sent m1") && text.contains("at=log.lua:11"),
        "{text}"
    );
}

/// Every KumoMTA `make_queue_config` field with no effect here (the list in
/// `queue_config.rs`), given as KumoMTA's own documentation does.
const KUMO_FIELDS: &str = r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make' } },
    egress_pool = 'pool',
    provider_name = 'Yahoo',
    reap_interval = '10m',
    refresh_strategy = 'Epoch',
    shrink_policy = { { interval = '1m', policy = 'ShrinkDataAndMeta' } },
    strategy = 'SingletonTimerWheel',
    timerwheel_tick_interval = '1s',
  }
end)
"#;

#[tokio::test]
async fn kumomta_fields_without_effect_are_accepted_with_one_warning_each() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let policy = Policy::from_source("kumo.lua", KUMO_FIELDS).unwrap();
    for queue in ["a", "b", "c"] {
        let cfg = policy.queue_config(queue).await.unwrap();
        assert_eq!(cfg.constructor.as_deref(), Some("make"));
    }
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    for field in policy::IGNORED_KUMO_FIELDS {
        let line = format!("KumoMTA field '{field}' is accepted but has no effect");
        assert_eq!(text.matches(&line).count(), 1, "{field}: {text}");
    }
    assert_eq!(policy::IGNORED_KUMO_FIELDS.len(), 7);
}

const NOT_2XX: &str = r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config { protocol = { custom_lua = { constructor = 'make' } } }
end)
kumo.on('make', function()
  return {
    send = function(self, message)
      if message:get_meta('mode') == 'reject' then kumo.reject(451, 'meant') end
      return message:get_meta('mode') == 'ok' and '250 ok' or 'queued'
    end,
  }
end)
"#;

#[tokio::test]
async fn a_returned_string_without_2xx_is_warned_about_once_per_queue() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let policy = Policy::from_source("not2xx.lua", NOT_2XX).unwrap();
    let msg = |queue: &str, mode: &str| {
        let mut meta = serde_json::Map::new();
        meta.insert("mode".into(), mode.into());
        PolicyMessage {
            id: "m".into(),
            queue: queue.into(),
            meta,
            ..Default::default()
        }
    };
    for queue in ["warned.one", "warned.two"] {
        let conn = policy.connect(queue).await.unwrap();
        for mode in ["ok", "reject", "plain", "plain"] {
            let out = conn.send(msg(queue, mode)).await;
            assert_eq!(out.is_delivered(), mode == "ok", "{mode}: {out:?}");
        }
        // a second connection of the same queue, and send_batch's path (send per message)
        let again = policy.connect(queue).await.unwrap();
        let outs = again
            .send_batch(vec![msg(queue, "plain"), msg(queue, "plain")])
            .await;
        assert!(outs.iter().all(|o| !o.is_delivered()), "{outs:?}");
    }
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("which has no 2xx code"))
        .collect();
    assert_eq!(warnings.len(), 2, "{text}");
    assert!(warnings[0].contains("warned.one") && warnings[0].contains("\"queued\""));
    assert!(warnings[1].contains("warned.two"), "{text}");
    assert!(warnings[0].contains("return '250 ...'"), "{text}");
}
