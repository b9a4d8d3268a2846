//! The result rule and the error paths of the policy host, with no broker involved.

mod common;

use std::time::{Duration, Instant};

use common::message;
use policy::{Policy, PolicyError, PolicyMessage, SendOutcome};

const POLICY: &str = r#"
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  if domain == 'noproto' then
    return kumo.make_queue_config {}
  end
  if domain == 'first' then
    return kumo.make_queue_config { protocol = { custom_lua = { constructor = 'make.first' } } }
  end
  return nil -- let the next handler decide
end)

kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.' .. domain } },
    send_timeout = (domain == 'slow') and '30s' or '200ms',
  }
end)

kumo.on('make.first', function() return { send = function() return '250 first' end } end)

kumo.on('make.test', function(domain, tenant, campaign)
  local sender = {}
  function sender:send(message)
    local mode = message:get_meta('mode')
    if mode == 'ok' then return '250 ok ' .. message:id() end
    if mode == 'reject4' then kumo.reject(421, 'try later') end
    if mode == 'reject5' then kumo.reject(550, 'no such topic') end
    if mode == 'raise' then error('boom in send') end
    if mode == 'nil' then return nil end
    if mode == 'number' then return 250 end
    if mode == 'string5' then return '550 nope' end
    if mode == 'sleep' then kumo.sleep(10) return '250 late' end
    if mode == 'rethrown' then
      local ok, e = pcall(kumo.reject, 552, 'mailbox full')
      error(e)
    end
    if mode == 'echo' then
      message:set_meta('seen', { n = 1 })
      return '250 ' .. kumo.json_encode {
        id = message:id(),
        queue = message:queue_name(),
        attempts = message:num_attempts(),
        sender = message:sender(),
        recipient = message:recipient(),
        seen = message:get_meta('seen'),
        len = #message:get_data(),
        decoded = kumo.json_decode('{"a":[1,2,3]}'),
        parsed = kumo.json_parse('{"b":true}'),
      }
    end
    if mode == 'data' then
      return '250 ' .. message:get_data()
    end
    return '250 default'
  end
  return sender
end)

kumo.on('make.nil', function() return nil end)
kumo.on('make.number', function() return 42 end)
kumo.on('make.raise', function() error('constructor exploded') end)
kumo.on('make.nosend', function() return { close = function() end } end)

kumo.on('make.batch', function()
  local sender = {}
  function sender:send(message) return '250 single' end
  function sender:send_batch(messages)
    local results = {}
    for i, m in ipairs(messages) do
      if m:get_meta('mode') == 'ok' then
        results[i] = '250 batched ' .. m:id()
      else
        results[i] = '451 not this one'
      end
    end
    return results
  end
  return sender
end)

kumo.on('make.slow', function()
  local sender = {}
  function sender:send(message)
    kumo.sleep(0.2)
    return '250 slept'
  end
  return sender
end)
"#;

fn policy() -> Policy {
    Policy::from_source("rules.lua", POLICY).expect("policy loads")
}

/// 1-based line of the first line of POLICY containing `needle`.
fn line_of(needle: &str) -> usize {
    POLICY
        .lines()
        .position(|l| l.contains(needle))
        .expect("needle in policy")
        + 1
}

fn with_mode(id: usize, mode: &str) -> PolicyMessage {
    let mut m = message(id, b"payload".to_vec());
    m.meta.insert("mode".into(), mode.into());
    m
}

async fn outcome(mode: &str) -> SendOutcome {
    let conn = policy().connect("test").await.expect("connect");
    conn.send(with_mode(1, mode)).await
}

fn transient_text(o: SendOutcome) -> (u16, String) {
    match o {
        SendOutcome::Transient { code, response } => (code, response),
        other => panic!("expected Transient, got {other:?}"),
    }
}

#[tokio::test]
async fn a_2xx_string_is_delivered() {
    assert_eq!(
        outcome("ok").await,
        SendOutcome::Delivered {
            response: "250 ok m1".into()
        }
    );
}

#[tokio::test]
async fn reject_4xx_is_transient() {
    assert_eq!(
        outcome("reject4").await,
        SendOutcome::Transient {
            code: 421,
            response: "421 try later".into()
        }
    );
}

#[tokio::test]
async fn reject_5xx_is_permanent() {
    assert_eq!(
        outcome("reject5").await,
        SendOutcome::Permanent {
            code: 550,
            response: "550 no such topic".into()
        }
    );
}

#[tokio::test]
async fn reject_survives_pcall_and_rethrow() {
    assert!(matches!(
        outcome("rethrown").await,
        SendOutcome::Permanent { code: 552, .. }
    ));
}

#[tokio::test]
async fn raised_error_is_transient_with_file_line_and_traceback() {
    let (code, text) = transient_text(outcome("raise").await);
    assert_eq!(code, 451);
    let at = format!("rules.lua:{}:", line_of("error('boom in send')"));
    assert!(text.contains(&at), "{text:?} should contain {at:?}");
    assert!(text.contains("boom in send"), "{text}");
    assert!(text.contains("traceback"), "{text}");
}

#[tokio::test]
async fn nil_return_is_transient() {
    let (_, text) = transient_text(outcome("nil").await);
    assert!(text.contains("returned nil"), "{text}");
    // names the sender's send function by its definition line
    let at = format!(
        "sender.send (rules.lua:{})",
        line_of("function sender:send(message)")
    );
    assert!(text.contains(&at), "{text:?} should contain {at:?}");
}

#[tokio::test]
async fn non_string_return_is_transient() {
    let (_, text) = transient_text(outcome("number").await);
    assert!(text.contains("a number (250)"), "{text}");
}

#[tokio::test]
async fn non_2xx_string_is_transient() {
    let (_, text) = transient_text(outcome("string5").await);
    assert!(text.contains("550 nope"), "{text}");
}

#[tokio::test]
async fn hanging_send_times_out_as_transient() {
    let start = Instant::now();
    let (_, text) = transient_text(outcome("sleep").await);
    assert!(text.starts_with("send timed out after 200ms"), "{text}");
    assert!(text.contains("message m1"), "{text}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn message_api_round_trips() {
    let conn = policy().connect("test").await.unwrap();
    let mut m = with_mode(7, "echo");
    m.queue = "test".into();
    m.attempts = 3;
    m.sender = Some("a@example.com".into());
    let out = conn.send(m).await;
    let SendOutcome::Delivered { response } = out else {
        panic!("{out:?}")
    };
    let json: serde_json::Value =
        serde_json::from_str(response.strip_prefix("250 ").unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "id": "m7", "queue": "test", "attempts": 3, "sender": "a@example.com",
            "seen": {"n": 1}, "len": 7, "decoded": {"a": [1, 2, 3]}, "parsed": {"b": true}
        })
    );
}

#[tokio::test]
async fn get_data_is_binary_safe() {
    let conn = policy().connect("test").await.unwrap();
    let data = common::binary_payload(1);
    let mut m = with_mode(1, "data");
    m.data = data.clone();
    let out = conn.send(m).await;
    // The response is built from the Lua string: the bytes went in and out intact
    // (the response is lossy UTF-8, so compare the ASCII part and the length).
    let response = out.response().to_string();
    assert!(out.is_delivered(), "{out:?}");
    assert!(response.starts_with("250 \u{0}\u{1}\u{2}"), "{response:?}");
    assert!(response.ends_with("#1\u{0}"), "{response:?}");
}

#[tokio::test]
async fn first_non_nil_get_queue_config_wins() {
    let p = policy();
    let first = p.queue_config("first").await.unwrap();
    assert_eq!(first.constructor.as_deref(), Some("make.first"));
    assert_eq!(
        first.send_timeout,
        Duration::from_secs(60),
        "second handler must not run"
    );
    let other = p.queue_config("test").await.unwrap();
    assert_eq!(other.constructor.as_deref(), Some("make.test"));
    assert_eq!(other.send_timeout, Duration::from_millis(200));
}

#[tokio::test]
async fn queue_without_protocol_is_an_error_not_a_crash() {
    let err = policy().connect("noproto").await.unwrap_err();
    assert!(matches!(err, PolicyError::NoProtocol { .. }), "{err}");
    assert!(
        err.to_string().contains("'noproto' has no protocol"),
        "{err}"
    );
}

#[tokio::test]
async fn constructor_returning_nil_names_the_constructor() {
    let err = policy().connect("nil").await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, PolicyError::ConstructorReturned { .. }),
        "{text}"
    );
    assert!(
        text.contains("'make.nil'") && text.contains("returned nil"),
        "{text}"
    );
    assert!(
        text.contains(&format!("rules.lua:{}", line_of("kumo.on('make.nil'"))),
        "{text}"
    );
}

#[tokio::test]
async fn constructor_returning_a_number_names_the_constructor() {
    let text = policy().connect("number").await.unwrap_err().to_string();
    assert!(
        text.contains("'make.number'") && text.contains("a number (42)"),
        "{text}"
    );
}

#[tokio::test]
async fn constructor_raising_names_the_constructor_and_line() {
    let err = policy().connect("raise").await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PolicyError::Constructor { .. }), "{text}");
    assert!(text.contains("'make.raise'"), "{text}");
    assert!(
        text.contains(&format!(
            "rules.lua:{}: constructor exploded",
            line_of("constructor exploded")
        )),
        "{text}"
    );
}

#[tokio::test]
async fn sender_without_send_is_an_error() {
    let text = policy().connect("nosend").await.unwrap_err().to_string();
    assert!(
        text.contains("'make.nosend'") && text.contains("'send' is nil"),
        "{text}"
    );
}

#[tokio::test]
async fn missing_constructor_handler_is_an_error() {
    let err = policy().connect("nobody").await.unwrap_err();
    assert!(matches!(err, PolicyError::NoConstructor { .. }), "{err}");
    assert!(err.to_string().contains("'make.nobody'"), "{err}");
}

#[tokio::test]
async fn send_batch_uses_the_senders_batch_method() {
    let conn = policy().connect("batch").await.unwrap();
    let out = conn
        .send_batch(vec![
            with_mode(1, "ok"),
            with_mode(2, "no"),
            with_mode(3, "ok"),
        ])
        .await;
    assert_eq!(
        out[0],
        SendOutcome::Delivered {
            response: "250 batched m1".into()
        }
    );
    assert!(
        matches!(out[1], SendOutcome::Transient { code: 451, .. }),
        "{:?}",
        out[1]
    );
    assert_eq!(
        out[2],
        SendOutcome::Delivered {
            response: "250 batched m3".into()
        }
    );
}

#[tokio::test]
async fn send_batch_falls_back_to_send() {
    let conn = policy().connect("test").await.unwrap();
    let out = conn
        .send_batch(vec![
            with_mode(1, "ok"),
            with_mode(2, "reject5"),
            with_mode(3, "ok"),
        ])
        .await;
    assert!(out[0].is_delivered() && out[2].is_delivered(), "{out:?}");
    assert!(
        matches!(out[1], SendOutcome::Permanent { code: 550, .. }),
        "{out:?}"
    );
}

/// Concurrent sends on one connection interleave: a sender awaiting something (here
/// kumo.sleep, in production a broker) yields to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_on_one_connection_overlap() {
    let conn = std::sync::Arc::new(policy().connect("slow").await.unwrap());
    let start = Instant::now();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.send(message(i, vec![])).await })
        })
        .collect();
    for t in tasks {
        let out = t.await.unwrap();
        assert!(out.is_delivered(), "{out:?}");
    }
    // 100 x 200 ms would be 20 s serially.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn close_calls_the_senders_close() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("closed");
    let src = format!(
        r#"
kumo.on('get_queue_config', function() return kumo.make_queue_config {{ protocol = {{ custom_lua = {{ constructor = 'make' }} }} }} end)
kumo.on('make', function()
  return {{
    send = function() return '250' end,
    close = function() local f = io.open({marker:?}, 'w'); f:write('bye'); f:close() end,
  }}
end)
"#
    );
    let conn = Policy::from_source("close.lua", &src)
        .unwrap()
        .connect("q")
        .await
        .unwrap();
    assert!(!marker.exists());
    conn.close().await;
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "bye");
}
