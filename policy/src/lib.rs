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
//! kept in memory; the file is never re-read. Running the chunk registers handlers with
//! `kumo.on(event, fn)`, which is only allowed while the chunk itself runs: a handler that
//! calls `kumo.on` gets an error. `get_queue_config` may have several handlers (run in
//! order, first non-nil wins); every other event has exactly one, and a second
//! registration names both places.
//!
//! ## One Lua state per connection
//!
//! Lua states are not shareable across threads in any useful way, so each
//! [`Connection`] owns a *new* state: the policy chunk is compiled and run again, then
//! `get_queue_config` and the constructor event named by `protocol.custom_lua.constructor`
//! run there. The sender table the constructor returns lives in that state's registry.
//! A connection may have many `send` futures in flight: each one is a Lua coroutine
//! (mlua `call_async`); mlua's `send` feature serialises access to the state, and a
//! coroutine waiting on a broker (a Kafka delivery report, an AMQP confirm) yields, so
//! the others run meanwhile. That is what lets librdkafka batch and lapin pipeline.
//! `queue_config` uses one long-lived shared state created at load time.
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
//! | did not finish within `send_timeout`                 | `Transient { 451 }`, "send timed out after …" |
//!
//! Nothing a policy does can panic the host: every failure becomes an outcome or a
//! [`PolicyError`].
//!
//! ## Modules
//!
//! `host` (states, `kumo.*` core, event registry), `queue_config` (`make_queue_config`),
//! `message` (the Message userdata), `outcome` (the result rule), `connection`
//! (constructor, send, batch, close), `kafka`, `amqp`, `json`.

mod amqp;
mod connection;
mod error;
mod host;
mod json;
mod kafka;
mod log_hook;
mod message;
pub mod outcome;
mod queue_config;
mod worker;

pub use connection::Connection;
pub use error::PolicyError;
pub use host::{InitConfig, Policy};
pub use log_hook::SHOULD_ENQUEUE as SHOULD_ENQUEUE_LOG_RECORD;
pub use message::MessageView;
pub use outcome::SendOutcome;
pub use queue_config::{PermanentFailure, QueueConfig, QueueName, Rate};
pub use worker::{
    PolicyLimits, DEFAULT_EVENT_TIMEOUT, DEFAULT_MEMORY_LIMIT, HOOK_EVERY, REPORT_GRACE,
};
