//! `Policy::reload`: a file that does not load is refused with `file:line` and changes
//! nothing; one that loads is used by every later call, while a connection built before
//! keeps its own (old) Lua state until it is closed.

mod common;

use policy::{Policy, PolicyError, SendOutcome};

fn answering(text: &str) -> String {
    format!(
        r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {{ protocol = {{ custom_lua = {{ constructor = 'make.s' }} }} }}
end)
kumo.on('make.s', function()
  return {{ send = function(self, message) return '250 {text}' end }}
end)
"#
    )
}

async fn answer(conn: &policy::Connection) -> String {
    match conn.send(common::message(1, b"x".to_vec())).await {
        SendOutcome::Delivered { response } => response,
        other => panic!("not delivered: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_only_a_policy_that_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.lua");
    std::fs::write(&file, answering("old")).unwrap();
    let policy = Policy::load(&file).unwrap();
    let before = policy.connect("test").await.unwrap();
    assert_eq!(
        (answer(&before).await, before.generation()),
        ("250 old".into(), 0)
    );

    std::fs::write(&file, "local ok = true\nthis is not lua\n").unwrap();
    let refused = policy.reload().await.unwrap_err();
    assert!(matches!(refused, PolicyError::Load { .. }), "{refused}");
    assert!(refused.to_string().contains("p.lua:2"), "{refused}");
    assert_eq!(policy.generation(), 0);
    let still = policy.connect("test").await.unwrap();
    assert_eq!(answer(&still).await, "250 old");

    let ticks = policy.generations();
    std::fs::write(&file, answering("new")).unwrap();
    let done = policy.reload().await.unwrap();
    assert_eq!(done.generation, 1);
    assert!(
        ticks.has_changed().unwrap(),
        "a reload ticks the generation watch"
    );
    let after = policy.connect("test").await.unwrap();
    assert_eq!(
        (answer(&after).await, after.generation()),
        ("250 new".into(), 1)
    );
    assert_eq!(
        answer(&before).await,
        "250 old",
        "an old connection keeps its state"
    );

    let in_memory = Policy::from_source("m.lua", &answering("x")).unwrap();
    let err = in_memory.reload().await.unwrap_err();
    assert!(matches!(err, PolicyError::NotReloadable { .. }), "{err}");
}
