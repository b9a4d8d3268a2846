//! A connection: one Lua state on its own thread (see [`crate::worker`]) plus the sender
//! table its constructor returned (kept in that state's registry).
//!
//! Every `send` is its own Lua coroutine on that thread, so many may be in flight at once;
//! a coroutine awaiting a broker yields and the others run. Each call is bounded by the
//! queue's `send_timeout`, also for code that never yields. A call that runs out of time or
//! memory *breaks* the connection ([`Connection::is_broken`]): the dispatcher retires it
//! and builds a fresh one.

use std::time::Duration;

use mlua::{Function, Lua, Table, Value};

use crate::host::function_location;
use crate::host::SENDER_KEY;
use crate::message::{LuaMessage, PolicyMessage};
use crate::outcome::{classify_error, judge_value, SendOutcome};
use crate::queue_config::QueueConfig;
use crate::worker::{deadline_error, is_memory_error, LuaThread, Stop, WarmStates};

/// How long `close` waits on a broken connection's thread (it may be stuck for good).
const BROKEN_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A live sender for one queue. `Send + Sync`: share it (`Arc`) between tasks and call
/// [`Connection::send`] concurrently.
pub struct Connection {
    thread: LuaThread,
    chunk: String,
    queue: String,
    config: QueueConfig,
    /// `sender.send (file:line)`, for messages.
    send_who: String,
    memory_limit_mib: usize,
    /// Where the state goes after a clean close.
    warm: std::sync::Arc<WarmStates>,
    /// The policy generation it was built from (see `reload`).
    generation: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("chunk", &self.chunk)
            .field("queue", &self.queue)
            .field("thread", &self.thread)
            .finish()
    }
}

impl Connection {
    pub(crate) fn new(
        thread: LuaThread,
        chunk: String,
        queue: String,
        config: QueueConfig,
        send_who: String,
        memory_limit_mib: usize,
        warm: std::sync::Arc<WarmStates>,
    ) -> Connection {
        Connection {
            thread,
            chunk,
            queue,
            config,
            send_who,
            memory_limit_mib,
            warm,
            generation: 0,
        }
    }

    /// Marks the policy generation the connection was built from.
    pub(crate) fn of_generation(mut self, generation: u64) -> Connection {
        self.generation = generation;
        self
    }

    /// The policy generation this connection was built from: once
    /// [`crate::Policy::generation`] moved past it, the connection runs an old policy.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The queue this connection serves.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The queue's config as resolved in this connection's state.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Whether a call on this connection ran out of time or memory (or its thread is gone):
    /// it must take no more sends; close it and connect again.
    pub fn is_broken(&self) -> bool {
        self.thread.is_broken()
    }

    /// Calls `sender:send(message)` and applies the result rule, within `send_timeout`.
    pub async fn send(&self, msg: PolicyMessage) -> SendOutcome {
        let ids = msg.id.clone();
        let who = self.send_who.clone();
        let result = self
            .thread
            .call(self.config.send_timeout, move |lua| async move {
                call_send(&lua, msg, &who).await
            })
            .await;
        match result {
            Ok(outcome) => self.judge(outcome, &ids),
            Err(stop) => self.stopped(stop, &ids),
        }
    }

    /// Calls `sender:send_batch(messages)` if the sender defines it, else runs
    /// `sender:send` for every message concurrently (on the state's thread). One outcome
    /// per message, in order; the whole batch shares one `send_timeout`.
    ///
    /// `send_batch` returns either one value for the whole batch (a `'250 ...'` string)
    /// or an array with one result per message; raising (or `kumo.reject`) fails all.
    pub async fn send_batch(&self, msgs: Vec<PolicyMessage>) -> Vec<SendOutcome> {
        let n = msgs.len();
        let ids = msgs
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let who = self.send_who.clone();
        let result = self
            .thread
            .call(self.config.send_timeout, move |lua| async move {
                call_send_batch(&lua, msgs, &who).await
            })
            .await;
        match result {
            Ok(outcomes) => outcomes.into_iter().map(|o| self.judge(o, &ids)).collect(),
            Err(stop) => {
                let outcome = self.stopped(stop, &ids);
                vec![outcome; n]
            }
        }
    }

    /// Applies the result rule to what the thread answered; a deadline or memory error
    /// breaks the connection.
    fn judge(&self, result: mlua::Result<SendOutcome>, ids: &str) -> SendOutcome {
        let e = match result {
            Ok(outcome) => return outcome,
            Err(e) => e,
        };
        if let Some(d) = deadline_error(&e) {
            self.thread.mark_broken();
            return self.timed_out(Some(d.at.clone()), false, ids);
        }
        if is_memory_error(&e) {
            self.thread.mark_broken();
            let text = format!(
                "policy {}: Lua memory limit of {} MiB reached in {} (queue '{}', message {ids}); its Lua state is discarded: {e}",
                self.chunk, self.memory_limit_mib, self.send_who, self.queue
            );
            tracing::warn!(target: "policy", queue = %self.queue, ids, "{text}");
            return SendOutcome::transient(text);
        }
        classify_error(&e)
    }

    fn stopped(&self, stop: Stop, ids: &str) -> SendOutcome {
        match stop {
            Stop::Timeout { at, stuck } => self.timed_out(at, stuck, ids),
            Stop::Gone => SendOutcome::transient(format!(
                "policy {}: the Lua thread of queue '{}' is gone (an earlier call ran out of time or memory); message {ids} is retried on a new state",
                self.chunk, self.queue
            )),
        }
    }

    fn timed_out(&self, at: Option<String>, stuck: bool, ids: &str) -> SendOutcome {
        let at = match (at, stuck) {
            (Some(at), false) => format!("the policy was stopped at {at}"),
            (Some(at), true) => format!(
                "the policy was last seen at {at} and its thread did not answer (stuck where Lua cannot be interrupted)"
            ),
            (None, false) => format!("the policy ({}) was waiting (yielded)", self.chunk),
            (None, true) => format!(
                "the policy's ({}) thread did not answer (stuck in a C function or where Lua cannot be interrupted)",
                self.chunk
            ),
        };
        let text = format!(
            "send timed out after {} (queue '{}', message {ids}): {at}, in {}; its Lua state is discarded",
            humantime::format_duration(self.config.send_timeout),
            self.queue,
            self.send_who
        );
        tracing::warn!(target: "policy", queue = %self.queue, ids, "{text}");
        SendOutcome::transient(text)
    }

    /// Calls `sender:close()` if the sender defines it (bounded by `send_timeout`, or one
    /// second on a broken connection), then lets the thread exit.
    pub async fn close(self) {
        let limit = if self.is_broken() {
            BROKEN_CLOSE_TIMEOUT.min(self.config.send_timeout)
        } else {
            self.config.send_timeout
        };
        let result = self
            .thread
            .call(limit, |lua| async move {
                if let Some((sender, close)) = method(&lua, "close")? {
                    close.call_async::<()>(sender).await?;
                }
                // Ready for another queue: no sender, this one's garbage collected.
                lua.unset_named_registry_value(SENDER_KEY)?;
                lua.gc_collect()
            })
            .await;
        match result {
            Ok(Ok(())) => self.warm.put(self.thread),
            Ok(Err(e)) => {
                tracing::warn!(target: "policy", queue = %self.queue, "sender:close() failed: {e}")
            }
            Err(Stop::Timeout { .. }) => {
                tracing::warn!(target: "policy", queue = %self.queue, "sender:close() timed out after {}", humantime::format_duration(limit))
            }
            Err(Stop::Gone) => {}
        }
    }
}

/// On the state's thread: `sender:send(message)`, its value classified there.
async fn call_send(lua: &Lua, msg: PolicyMessage, who: &str) -> mlua::Result<SendOutcome> {
    let Some((sender, send)) = method(lua, "send")? else {
        return Ok(SendOutcome::transient(format!(
            "{who}: sender has no send method"
        )));
    };
    let queue = msg.queue.clone();
    let message = lua.create_userdata(LuaMessage(msg))?;
    let value = send.call_async::<Value>((sender, message)).await?;
    Ok(judge_value(&queue, &value, || who.to_owned()))
}

/// On the state's thread: `sender:send_batch(messages)`, or `send` for each.
async fn call_send_batch(
    lua: &Lua,
    msgs: Vec<PolicyMessage>,
    who: &str,
) -> Vec<mlua::Result<SendOutcome>> {
    let n = msgs.len();
    let (sender, f) = match method(lua, "send_batch") {
        Ok(Some(found)) => found,
        Ok(None) => {
            return futures::future::join_all(msgs.into_iter().map(|m| call_send(lua, m, who)))
                .await
        }
        Err(e) => return vec![Err(e); n],
    };
    let who = format!("sender.send_batch ({})", function_location(&f));
    let queue = msgs.first().map(|m| m.queue.clone()).unwrap_or_default();
    let list = match lua.create_sequence_from(msgs.into_iter().map(LuaMessage)) {
        Ok(list) => list,
        Err(e) => return vec![Err(e); n],
    };
    match f.call_async::<Value>((sender, list)).await {
        Err(e) => vec![Err(e); n],
        Ok(Value::Table(results)) => (1..=n)
            .map(|i| {
                results
                    .get::<Value>(i)
                    .map(|v| judge_value(&queue, &v, || format!("{who} for message {i}")))
            })
            .collect(),
        Ok(v) => vec![Ok(judge_value(&queue, &v, || who)); n],
    }
}

/// The sender table and its method `name`, if it is a function.
fn method(lua: &Lua, name: &str) -> mlua::Result<Option<(Table, Function)>> {
    let sender: Table = lua.named_registry_value(SENDER_KEY)?;
    match sender.get::<Value>(name)? {
        Value::Function(f) => Ok(Some((sender, f))),
        _ => Ok(None),
    }
}
