//! `Policy::connect_with`: the dispatcher hands over the queue config it already resolved
//! (in the shared state), so a new connection costs only its constructor call.

use policy::{Policy, PolicyMessage, SendOutcome};

/// `get_queue_config` always names `make.sink`; `make.other` exists too.
const POLICY: &str = r#"
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  return kumo.make_queue_config { protocol = { custom_lua = { constructor = 'make.sink' } } }
end)
local function sender_answering(text)
  local sender = {}
  function sender:send(message) return text end
  return sender
end
kumo.on('make.sink', function() return sender_answering('250 from make.sink') end)
kumo.on('make.other', function() return sender_answering('250 from make.other') end)
"#;

fn message() -> PolicyMessage {
    PolicyMessage {
        id: "1".into(),
        queue: "example.com".into(),
        data: b"hi".to_vec(),
        meta: Default::default(),
        attempts: 0,
        sender: None,
        recipient: None,
    }
}

async fn response_of(conn: policy::Connection) -> String {
    match conn.send(message()).await {
        SendOutcome::Delivered { response } => response,
        other => panic!("not delivered: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_builds_from_the_given_config_without_asking_again() {
    let policy = Policy::from_source("connect_with.lua", POLICY).expect("policy loads");
    let mut config = policy.queue_config("example.com").await.expect("config");
    assert_eq!(config.constructor.as_deref(), Some("make.sink"));
    // A config the policy would not answer now: asking again would build `make.sink`.
    config.constructor = Some("make.other".into());
    let conn = policy
        .connect_with("example.com", config)
        .await
        .expect("connect_with");
    assert_eq!(response_of(conn).await, "250 from make.other");

    // The control: `connect` asks `get_queue_config` itself.
    let conn = policy.connect("example.com").await.expect("connect");
    assert_eq!(response_of(conn).await, "250 from make.sink");
}
