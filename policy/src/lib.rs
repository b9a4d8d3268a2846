//! # policy — the KumoMTA-compatible Lua host of spoolrelay
//!
//! The daemon hands this crate a policy file (Lua) and asks three questions: *how is the
//! relay set up* ([`Policy::init_config`]), *how is queue X delivered*
//! ([`Policy::queue_config`]) and *give me a connection for queue X* ([`Policy::connect`]).
//! It then pushes messages through [`Connection::send`] and gets a [`SendOutcome`] back.
//! The crate knows nothing of sled, HTTP or the spool: bytes in, verdict out.
//!
//! ## Loading
//!
//! [`Policy::load`] reads the file once and runs it in a fresh Lua state to validate it
//! (syntax errors and top-level errors surface here, with `file:line`). The source text is
//! kept in memory; the file is read again only by [`Policy::reload`] (see `reload`).
//! Running the chunk registers handlers with `kumo.on(event, fn)`, which is only allowed
//! while the chunk itself runs: a handler that calls `kumo.on` gets an error.
//! `get_queue_config` and `should_enqueue_log_record` may have several handlers (run in
//! order, first non-nil wins), as in KumoMTA; every other event has exactly one, and a
//! second registration names both places.
//!
//! ## One Lua state per connection, each on its own thread
//!
//! Lua states are not shareable across threads in any useful way, so each
//! [`Connection`] owns a *new* state: the policy chunk is compiled and run again, then
//! `get_queue_config` and the constructor event named by `protocol.custom_lua.constructor`
//! run there. The sender table the constructor returns lives in that state's registry.
//! `queue_config` uses one long-lived *shared* state and log hooks another (so a runaway
//! hook does not delay every queue's config); `init` runs in a throw-away one.
//!
//! **Policy code never runs on the caller's threads.** Every state is owned by an OS thread
//! of its own (`lua:<queue>`, `lua:shared`, `lua:hooks`, `lua:init`; see `worker`), which runs a
//! current-thread tokio runtime with a `LocalSet`. The public methods are async and cheap
//! for the caller: they send a closure over a channel and await a oneshot. On the state's
//! thread, each request is a Lua coroutine (mlua `call_async`), so a connection may have
//! many `send`s in flight: a coroutine waiting on a broker (a Kafka delivery report, an AMQP
//! confirm) yields and the others run. That is what lets librdkafka batch and lapin
//! pipeline. Broker clients a constructor creates are driven by that thread's runtime.
//! A policy that loops for ever therefore holds one thread of its own, never the daemon's
//! runtime (HTTP ingest, the spool's commits, the dispatcher, signal handling).
//!
//! ## Deadlines and limits
//!
//! Every call has a bound: `send` and `send_batch` the queue's `send_timeout`; the chunk,
//! `init`, `get_queue_config`, constructors and log hooks [`PolicyLimits::event_timeout`].
//! It holds for code that never yields: an instruction-count hook checks the clock every
//! [`HOOK_EVERY`] instructions against the deadline of the call being polled, and past it
//! *yields* the coroutine (which `pcall` cannot catch), after which the call ends; where
//! Lua cannot yield it raises instead, again and again. The caller never waits longer than
//! the deadline plus [`REPORT_GRACE`], whatever the thread does. A call that timed out, or
//! failed on the state's memory limit ([`PolicyLimits::memory_limit`]), *breaks* its state:
//! a broken [`Connection`] says so ([`Connection::is_broken`]) and the dispatcher replaces
//! it; a long-lived state is rebuilt on its next use.
//!
//! ## The sandbox
//!
//! The safe standard libraries (no `debug`), minus process control (`os.exit`,
//! `os.execute`, `io.popen`) and C modules (`package.loadlib`, an empty `package.cpath`).
//! `require` loads Lua files from the policy file's own directory only
//! (`<dir>/?.lua;<dir>/?/init.lua`). docs/lua-api.md lists what a policy can use.
//!
//! ## The result rule
//!
//! `sender:send(message)` decides a message's fate (see [`outcome`]):
//!
//! | what the Lua code did                                | outcome                       |
//! |------------------------------------------------------|-------------------------------|
//! | returned a string starting with a 2xx code (`'250 ok'`) | [`SendOutcome::Delivered`] |
//! | called `kumo.reject(4xx, msg)`                       | `Transient { code: 4xx }`     |
//! | called `kumo.reject(5xx, msg)`                       | `Permanent { code: 5xx }`     |
//! | raised any other error                               | `Transient { 451 }`, text with `file:line` + traceback |
//! | returned nil, a non-string, or a non-2xx string      | `Transient { 451 }`           |
//! | did not finish within `send_timeout` (even a loop that never yields) | `Transient { 451 }`, "send timed out after …", queue, message ids, `file:line` where stopped |
//! | reached the state's memory limit                     | `Transient { 451 }`, "Lua memory limit of N MiB reached …" |
//!
//! Nothing a policy does can panic the host: every failure becomes an outcome or a
//! [`PolicyError`].
//!
//! ## Modules
//!
//! `worker` (the state threads, deadlines, limits), `host` (states, sandbox, `kumo.*`
//! core, event registry), `queue_config` (`make_queue_config`), `queue_name` (KumoMTA queue
//! names, read here and written by the daemon's ingest),
//! `message` (the Message userdata), `outcome` (the result rule), `connection`
//! (constructor, send, batch, close), `log_hook` (`should_enqueue_log_record`), `error`
//! ([`PolicyError`]), `kafka`, `amqp`, `http` (`kumo.http`, webhooks), `json`, `reload`
//! ([`Policy::reload`]: a new generation, swapped in only if it loads).
//! `#![warn(missing_docs)]`: every public item is documented.

#![warn(missing_docs)]

mod amqp;
mod amqp_connect;
mod connection;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod host;
mod http;
mod json;
mod kafka;
mod log_hook;
mod message;
pub mod outcome;
mod queue_config;
mod queue_name;
mod reload;
mod worker;

pub use connection::Connection;
pub use error::PolicyError;
pub use host::{InitConfig, Policy};
pub use log_hook::SHOULD_ENQUEUE as SHOULD_ENQUEUE_LOG_RECORD;
pub use message::PolicyMessage;
pub use outcome::SendOutcome;
pub use queue_config::{PermanentFailure, QueueConfig, Rate, IGNORED_KUMO_FIELDS};
pub use queue_name::QueueName;
pub use reload::Reloaded;
pub use worker::{
    PolicyLimits, DEFAULT_EVENT_TIMEOUT, DEFAULT_MEMORY_LIMIT, HOOK_EVERY, REPORT_GRACE,
};
