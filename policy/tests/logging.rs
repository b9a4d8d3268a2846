//! print / kumo.log_* go to tracing with the calling file:line, also from inside a send.

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
