//! A connection: one Lua state plus the sender table its constructor returned.
//!
//! Every `send` is its own Lua coroutine (`call_async`), so many may be in flight at
//! once; mlua serialises access to the state and a coroutine awaiting a broker yields.

use std::time::Duration;

use mlua::{Function, Lua, RegistryKey, Table, Value};

use crate::error::PolicyError;
use crate::host::{describe, function_location};
use crate::message::{LuaMessage, MessageView};
use crate::outcome::{classify, classify_error, classify_value, SendOutcome};
use crate::queue_config::QueueConfig;

/// A live sender for one queue. `Send + Sync`: share it (`Arc`) between tasks and call
/// [`Connection::send`] concurrently.
pub struct Connection {
    lua: Lua,
    sender: RegistryKey,
    chunk: String,
    queue: String,
    config: QueueConfig,
    /// `sender.send (file:line)`, for messages.
    send_who: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("chunk", &self.chunk)
            .field("queue", &self.queue)
            .finish()
    }
}

impl Connection {
    pub(crate) fn new(
        lua: Lua,
        sender: Table,
        chunk: String,
        queue: String,
        config: QueueConfig,
    ) -> Result<Connection, PolicyError> {
        let constructor = config.constructor.clone().unwrap_or_default();
        let send: Value = sender.get("send").map_err(|error| PolicyError::Lua {
            chunk: chunk.clone(),
            error: Box::new(error),
        })?;
        let Value::Function(send) = send else {
            return Err(PolicyError::ConstructorReturned {
                chunk,
                constructor,
                queue,
                defined_at: "?".to_string(),
                got: format!("a table whose 'send' is {}", describe(&send)),
            });
        };
        let send_who = format!("sender.send ({})", function_location(&send));
        let sender = lua
            .create_registry_value(sender)
            .map_err(|error| PolicyError::Lua {
                chunk: chunk.clone(),
                error: Box::new(error),
            })?;
        Ok(Connection {
            lua,
            sender,
            chunk,
            queue,
            config,
            send_who,
        })
    }

    /// The queue this connection serves.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The queue's config as resolved in this connection's state.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Calls `sender:send(message)` and applies the result rule, within `send_timeout`.
    pub async fn send(&self, msg: MessageView) -> SendOutcome {
        let limit = self.config.send_timeout;
        match tokio::time::timeout(limit, self.call_send(msg)).await {
            Ok(outcome) => outcome,
            Err(_) => timed_out(limit),
        }
    }

    async fn call_send(&self, msg: MessageView) -> SendOutcome {
        let (sender, send) = match self.method("send") {
            Ok(Some(found)) => found,
            Ok(None) => {
                return SendOutcome::transient(format!("{}: sender has no send method", self.chunk))
            }
            Err(e) => return classify_error(&e),
        };
        let message = match self.lua.create_userdata(LuaMessage(msg)) {
            Ok(m) => m,
            Err(e) => return classify_error(&e),
        };
        classify(
            send.call_async::<Value>((sender, message)).await,
            &self.send_who,
        )
    }

    /// Calls `sender:send_batch(messages)` if the sender defines it, else runs
    /// [`Connection::send`] for every message concurrently. One outcome per message,
    /// in order.
    ///
    /// `send_batch` returns either one value for the whole batch (a `'250 ...'` string)
    /// or an array with one result per message; raising (or `kumo.reject`) fails all.
    pub async fn send_batch(&self, msgs: Vec<MessageView>) -> Vec<SendOutcome> {
        let batch = match self.method("send_batch") {
            Ok(Some(found)) => found,
            Ok(None) => {
                return futures::future::join_all(msgs.into_iter().map(|m| self.send(m))).await
            }
            Err(e) => return vec![classify_error(&e); msgs.len()],
        };
        let n = msgs.len();
        let limit = self.config.send_timeout;
        match tokio::time::timeout(limit, self.call_send_batch(batch, msgs)).await {
            Ok(outcomes) => outcomes,
            Err(_) => vec![timed_out(limit); n],
        }
    }

    async fn call_send_batch(
        &self,
        (sender, f): (Table, Function),
        msgs: Vec<MessageView>,
    ) -> Vec<SendOutcome> {
        let n = msgs.len();
        let who = format!("sender.send_batch ({})", function_location(&f));
        let list = match self
            .lua
            .create_sequence_from(msgs.into_iter().map(LuaMessage))
        {
            Ok(list) => list,
            Err(e) => return vec![classify_error(&e); n],
        };
        match f.call_async::<Value>((sender, list)).await {
            Err(e) => vec![classify_error(&e); n],
            Ok(Value::Table(results)) => (1..=n)
                .map(|i| match results.get::<Value>(i) {
                    Ok(v) => classify_value(&v, &format!("{who} for message {i}")),
                    Err(e) => classify_error(&e),
                })
                .collect(),
            Ok(v) => vec![classify_value(&v, &who); n],
        }
    }

    /// Calls `sender:close()` if the sender defines it (bounded by `send_timeout`).
    pub async fn close(self) {
        let (sender, close) = match self.method("close") {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(target: "policy", queue = %self.queue, "close: {e}");
                return;
            }
        };
        let limit = self.config.send_timeout;
        match tokio::time::timeout(limit, close.call_async::<()>(sender)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(target: "policy", queue = %self.queue, "sender:close() failed: {e}")
            }
            Err(_) => {
                tracing::warn!(target: "policy", queue = %self.queue, "sender:close() timed out after {}", humantime::format_duration(limit))
            }
        }
    }

    /// The sender table and its method `name`, if it is a function.
    fn method(&self, name: &str) -> mlua::Result<Option<(Table, Function)>> {
        let sender: Table = self.lua.registry_value(&self.sender)?;
        match sender.get::<Value>(name)? {
            Value::Function(f) => Ok(Some((sender, f))),
            _ => Ok(None),
        }
    }
}

fn timed_out(limit: Duration) -> SendOutcome {
    SendOutcome::transient(format!(
        "send timed out after {}",
        humantime::format_duration(limit)
    ))
}
