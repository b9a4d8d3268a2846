//! Lua runs apart from its callers, under deadlines that hold for code that never yields,
//! within a memory limit, in a sandbox.
//!
//! Every test runs its body on a thread of its own and waits for it with a bound
//! ([`within`]): before the Lua host had its own threads and the hook, a spinning policy
//! held the caller's thread, and these tests must fail then, not hang.

use std::future::Future;
use std::time::{Duration, Instant};

use policy::{Policy, PolicyError, PolicyLimits, PolicyMessage, SendOutcome};

/// Runs `body` on its own thread and runtime; panics if it takes longer than `secs`.
fn within<F, Fut>(secs: u64, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body());
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the test body panicked"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("no answer within {secs} s: policy code held the caller's thread")
        }
    }
}

fn limits(event_ms: u64, memory_mib: usize) -> PolicyLimits {
    PolicyLimits {
        event_timeout: Duration::from_millis(event_ms),
        memory_limit: memory_mib << 20,
    }
}

fn msg(id: &str) -> PolicyMessage {
    PolicyMessage {
        id: id.into(),
        ..Default::default()
    }
}

/// The 1-based line of the first line containing `needle`.
fn line_of(src: &str, needle: &str) -> usize {
    src.lines().position(|l| l.contains(needle)).expect(needle) + 1
}

fn transient(o: &SendOutcome) -> (u16, &str) {
    match o {
        SendOutcome::Transient { code, response } => (*code, response),
        other => panic!("expected a transient outcome, got {other:?}"),
    }
}

/// Queues: `ok` (delivers), `spin` (never yields), `pcall` (spins inside pcall, in a
/// loop that swallows every error), `hog` (allocates without bound), `close` (writes a
/// file from sender:close, to prove the state still answers after a timeout).
const SENDERS: &str = r#"
kumo.on('get_queue_config', function(domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.' .. domain } },
    -- `hog` must reach the memory limit before its deadline, also on a loaded machine.
    send_timeout = domain == 'hog' and '20s' or '300ms',
  }
end)
kumo.on('make.ok', function()
  return { send = function(self, m) return '250 ok ' .. m:id() end }
end)
kumo.on('make.spin', function()
  local sender = {}
  function sender:send(message)
    while true do end
  end
  return sender
end)
kumo.on('make.pcall', function()
  local sender = {}
  function sender:send(message)
    while true do
      pcall(function() while true do end end)
    end
  end
  function sender:close()
    local f = assert(io.open(CLOSED_FILE, 'w'))
    f:write('closed')
    f:close()
  end
  return sender
end)
kumo.on('make.hog', function()
  local sender = {}
  function sender:send(message)
    local t = {}
    for i = 1, 1e12 do t[i] = string.rep('x', 1024) .. i end
    return '250 never'
  end
  return sender
end)
kumo.on('make.cstuck', function()
  local sender = {}
  function sender:send(message)
    -- One C call (the pattern matcher backtracking 2^40 times): no VM instruction runs,
    -- so the hook cannot stop it.
    local n = 40
    string.find(string.rep('a', n), string.rep('a?', n) .. string.rep('a', n))
    return '250 never'
  end
  return sender
end)
kumo.on('make.batch', function()
  local sender = {}
  function sender:send_batch(messages)
    while true do end
  end
  function sender:send(message) return '250 single' end
  return sender
end)
"#;

fn senders(closed_file: &std::path::Path) -> String {
    format!(
        "CLOSED_FILE = {:?}\n{SENDERS}",
        closed_file.display().to_string()
    )
}

#[test]
fn a_sender_that_never_yields_times_out_as_451_with_file_line_and_breaks_its_state() {
    within(20, || async {
        let dir = tempfile::tempdir().unwrap();
        let src = senders(&dir.path().join("closed"));
        let policy = Policy::from_source_with("iso.lua", &src, limits(2000, 64)).unwrap();
        let spin = policy.connect("spin").await.unwrap();
        let started = Instant::now();
        let out = spin.send(msg("m7")).await;
        let took = started.elapsed();
        let (code, text) = transient(&out);
        assert_eq!(code, 451, "{text}");
        let at = format!("iso.lua:{}", line_of(&src, "while true do end"));
        assert!(text.contains("send timed out after 300ms"), "{text}");
        assert!(
            text.contains(&format!("stopped at {at}")),
            "{text} should name {at}"
        );
        assert!(
            text.contains("queue 'spin'") && text.contains("message m7"),
            "{text}"
        );
        assert!(took < Duration::from_secs(5), "answered after {took:?}");
        assert!(spin.is_broken(), "a timed-out state must be thrown away");

        // Other connections are untouched, and a new connection for the queue is fresh.
        let ok = policy.connect("ok").await.unwrap();
        assert!(ok.send(msg("m8")).await.is_delivered());
        assert!(!ok.is_broken());
        let again = policy.connect("spin").await.unwrap();
        assert!(!again.is_broken());
    });
}

#[test]
fn a_sender_stuck_in_a_c_function_still_gets_its_answer_at_the_deadline() {
    within(20, || async {
        let dir = tempfile::tempdir().unwrap();
        let src = senders(&dir.path().join("closed"));
        let policy = Policy::from_source_with("iso.lua", &src, limits(2000, 64)).unwrap();
        let conn = policy.connect("cstuck").await.unwrap();
        let started = Instant::now();
        let out = conn.send(msg("c1")).await;
        let took = started.elapsed();
        let (code, text) = transient(&out);
        assert_eq!(code, 451);
        assert!(text.contains("send timed out after 300ms"), "{text}");
        assert!(text.contains("did not answer"), "{text}");
        // deadline (300 ms) + REPORT_GRACE (250 ms), with slack for a loaded machine
        assert!(took < Duration::from_secs(3), "answered after {took:?}");
        assert!(conn.is_broken());
        // The abandoned thread does not hold the policy: other queues still work.
        let ok = policy.connect("ok").await.unwrap();
        assert!(ok.send(msg("c2")).await.is_delivered());
    });
}

#[test]
fn pcall_in_a_loop_cannot_swallow_the_deadline() {
    within(20, || async {
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        let src = senders(&closed);
        let policy = Policy::from_source_with("iso.lua", &src, limits(2000, 64)).unwrap();
        let conn = policy.connect("pcall").await.unwrap();
        let out = conn.send(msg("p1")).await;
        let (code, text) = transient(&out);
        assert_eq!(code, 451);
        assert!(text.contains("send timed out"), "{text}");
        assert!(text.contains("stopped at iso.lua:"), "{text}");
        assert!(conn.is_broken());
        // The runaway coroutine was really stopped: the state's thread still answers, so
        // sender:close() runs there (it would time out if the loop still held the thread).
        conn.close().await;
        assert_eq!(
            std::fs::read_to_string(&closed).ok().as_deref(),
            Some("closed"),
            "sender:close() did not run: the pcall loop still holds the Lua thread"
        );
    });
}

#[test]
fn a_send_batch_that_never_yields_fails_every_message_of_the_batch() {
    within(20, || async {
        let dir = tempfile::tempdir().unwrap();
        let src = senders(&dir.path().join("closed"));
        let policy = Policy::from_source_with("iso.lua", &src, limits(2000, 64)).unwrap();
        let conn = policy.connect("batch").await.unwrap();
        let outs = conn.send_batch(vec![msg("b1"), msg("b2")]).await;
        assert_eq!(outs.len(), 2);
        for out in &outs {
            let (code, text) = transient(out);
            assert_eq!(code, 451);
            assert!(text.contains("message b1, b2"), "{text}");
            assert!(text.contains("stopped at iso.lua:"), "{text}");
            assert!(text.contains("send timed out"), "{text}");
        }
        assert!(conn.is_broken());
    });
}

#[test]
fn a_sender_that_allocates_without_bound_hits_the_memory_limit() {
    within(30, || async {
        let dir = tempfile::tempdir().unwrap();
        let src = senders(&dir.path().join("closed"));
        let policy = Policy::from_source_with("iso.lua", &src, limits(5000, 16)).unwrap();
        let conn = policy.connect("hog").await.unwrap();
        let out = conn.send(msg("h1")).await;
        let (code, text) = transient(&out);
        assert_eq!(code, 451);
        assert!(
            text.contains("policy iso.lua: Lua memory limit of 16 MiB reached"),
            "{text}"
        );
        assert!(text.contains("message h1"), "{text}");
        assert!(
            conn.is_broken(),
            "a state that hit its memory limit is rebuilt"
        );
    });
}

#[test]
fn an_event_that_allocates_without_bound_hits_the_memory_limit() {
    let src = r#"
kumo.on('get_queue_config', function(domain)
  if domain == 'hog' then
    local t = {}
    for i = 1, 1e12 do t[i] = string.rep('y', 1024) .. i end
  end
  return kumo.make_queue_config {}
end)
"#;
    within(30, move || async move {
        let policy = Policy::from_source_with("mem.lua", src, limits(5000, 16)).unwrap();
        let err = policy.queue_config("hog").await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, PolicyError::MemoryLimit { .. }), "{text}");
        assert!(
            text.contains("policy mem.lua: Lua memory limit of 16 MiB reached in event 'get_queue_config' for queue 'hog'"),
            "{text}"
        );
        // Later lookups work (on a rebuilt state).
        policy.queue_config("fine").await.unwrap();
    });
}

#[test]
fn each_event_has_its_own_bound_and_the_shared_state_is_rebuilt() {
    let src = r#"
kumo.on('get_queue_config', function(domain)
  if domain == 'stuck' then
    while true do end
  end
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.' .. domain } },
  }
end)
kumo.on('make.slow', function()
  while true do end
end)
kumo.on('make.ok', function()
  return { send = function() return '250 ok' end }
end)
"#;
    let spin_line = line_of(src, "while true do end");
    let ctor_line = line_of(src, "kumo.on('make.slow'") + 1;
    within(30, move || async move {
        let policy = Policy::from_source_with("ev.lua", src, limits(300, 64)).unwrap();
        let started = Instant::now();
        let err = policy.queue_config("stuck").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let text = err.to_string();
        assert!(matches!(err, PolicyError::Timeout { .. }), "{text}");
        assert!(
            text.contains("'get_queue_config' for queue 'stuck'"),
            "{text}"
        );
        assert!(
            text.contains(&format!("stopped at ev.lua:{spin_line}")),
            "{text}"
        );
        // The shared state was thrown away and rebuilt: other queues still resolve.
        let cfg = policy.queue_config("ok").await.unwrap();
        assert_eq!(cfg.constructor.as_deref(), Some("make.ok"));

        let err = policy.connect("slow").await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, PolicyError::Timeout { .. }), "{text}");
        assert!(
            text.contains("constructor 'make.slow' (queue 'slow')"),
            "{text}"
        );
        assert!(text.contains(&format!("ev.lua:{ctor_line}")), "{text}");
        let conn = policy.connect("ok").await.unwrap();
        assert!(conn.send(msg("x")).await.is_delivered());
    });
}

#[test]
fn init_log_hooks_and_the_chunk_itself_are_bounded() {
    let src = r#"
kumo.on('init', function()
  while true do end
end)
kumo.on('should_enqueue_log_record', function(msg, hook)
  while true do pcall(function() while true do end end) end
end)
"#;
    within(30, move || async move {
        let policy = Policy::from_source_with("hooks.lua", src, limits(300, 64)).unwrap();
        let err = policy.init_config().await.unwrap_err();
        assert!(matches!(err, PolicyError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("event 'init'"), "{err}");
        assert!(err.to_string().contains("hooks.lua:3"), "{err}");

        let err = policy
            .should_enqueue_log_record(msg("r1"), "events")
            .await
            .unwrap_err();
        assert!(matches!(err, PolicyError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("log hook 'events'"), "{err}");
        // and again: the shared state was rebuilt, and is bounded again
        let err = policy
            .should_enqueue_log_record(msg("r2"), "events")
            .await
            .unwrap_err();
        assert!(matches!(err, PolicyError::Timeout { .. }), "{err}");

        let started = Instant::now();
        let err = Policy::from_source_with(
            "top.lua",
            "local n = 0\nwhile true do n = n + 1 end\n",
            limits(300, 64),
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, PolicyError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("loading the policy"), "{err}");
        assert!(err.to_string().contains("top.lua:2"), "{err}");
    });
}

#[test]
fn a_stuck_log_hook_does_not_delay_queue_configs() {
    // Stuck where Lua cannot yield (a table.sort comparator is called from C) and every
    // raised deadline error is swallowed: the hook's thread is lost for good.
    let src = r#"
kumo.on('should_enqueue_log_record', function(msg, hook)
  table.sort({ 3, 2, 1 }, function(a, b)
    while true do pcall(function() while true do end end) end
  end)
end)
kumo.on('get_queue_config', function()
  return kumo.make_queue_config { protocol = { custom_lua = { constructor = 'make' } } }
end)
"#;
    within(20, move || async move {
        let policy = Policy::from_source_with("stuck.lua", src, limits(500, 64)).unwrap();
        let hooks = policy.clone();
        let hook =
            tokio::spawn(async move { hooks.should_enqueue_log_record(msg("r1"), "events").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cfg = policy.queue_config("q").await;
        assert!(
            cfg.is_ok(),
            "queue_config waited on the stuck log hook: {cfg:?}"
        );
        let err = hook.await.unwrap().unwrap_err();
        assert!(matches!(err, PolicyError::Timeout { .. }), "{err}");
    });
}

#[test]
fn the_sandbox_has_no_process_control_and_no_c_modules() {
    let src = r#"
assert(os.exit == nil, 'os.exit')
assert(os.execute == nil, 'os.execute')
assert(io.popen == nil, 'io.popen')
assert(package.loadlib == nil, 'package.loadlib')
assert(package.cpath == '', 'package.cpath')
assert(debug == nil, 'debug')
-- what stays: the safe standard libraries
assert(string.format and table.concat and math.floor and os.time and os.getenv and io.open and coroutine.wrap and utf8.char)
"#;
    Policy::from_source("sandbox.lua", src).unwrap();
}

#[test]
fn require_loads_modules_from_the_policy_directory_only() {
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("policy");
    std::fs::create_dir_all(policy_dir.join("routes")).unwrap();
    std::fs::write(
        policy_dir.join("helpers.lua"),
        "return { greet = function() return '250 from helpers' end }\n",
    )
    .unwrap();
    std::fs::write(
        policy_dir.join("routes/init.lua"),
        "return { topic = 'events' }\n",
    )
    .unwrap();
    // Beside the policy's directory, not in it: must not be found.
    std::fs::write(dir.path().join("outside.lua"), "return {}\n").unwrap();
    let main = policy_dir.join("main.lua");
    std::fs::write(
        &main,
        r#"
local helpers = require('helpers')
local routes = require('routes')
assert(routes.topic == 'events')
local ok, err = pcall(require, 'outside')
assert(not ok, 'outside.lua must not be found')
OUTSIDE_ERROR = tostring(err)
assert(not pcall(require, '../outside'))
kumo.on('get_queue_config', function()
  assert(not OUTSIDE_ERROR:find('%.so'), 'no C searcher paths: ' .. OUTSIDE_ERROR)
  return kumo.make_queue_config { protocol = { custom_lua = { constructor = 'make' } } }
end)
kumo.on('make', function()
  return { send = function() return helpers.greet() end }
end)
"#,
    )
    .unwrap();
    within(20, move || async move {
        let policy = Policy::load(&main).unwrap();
        let conn = policy.connect("q").await.unwrap();
        let out = conn.send(msg("r1")).await;
        assert_eq!(
            out,
            SendOutcome::Delivered {
                response: "250 from helpers".into()
            }
        );
    });
    // An in-memory policy has no directory: require finds nothing.
    let err = Policy::from_source("mem.lua", "require('helpers')\n").unwrap_err();
    assert!(
        err.to_string().contains("module 'helpers' not found"),
        "{err}"
    );
}
