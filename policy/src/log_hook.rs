//! Log hooks, KumoMTA style: the relay's own delivery records can be routed back into a
//! queue, and so to Kafka or AMQP like any message.
//!
//! In `init`, `kumo.configure_log_hook{ name = 'events' }` declares a hook. For each record
//! the daemon then asks `should_enqueue_log_record(message, hook_name)`: the message's data
//! is the record as JSON, its metadata carries the record's fields and, as in KumoMTA, the
//! whole record as `log_record`; a handler that returns true (usually after
//! `message:set_meta('queue', 'kafka')`) has it spooled. The daemon is the one that keeps
//! this loop-free: records about log-hook messages are not offered.
//!
//! Several handlers may be registered (KumoMTA composes helper modules this way): they run
//! in registration order, a `nil` answer asks the next one, and the first `true` or `false`
//! is final. Anything else a handler returns counts as true, as before.

use mlua::{AnyUserData, Function, Lua, Table, Value};

use crate::error::PolicyError;
use crate::host::{event_error, handlers, lua_error, Shared};
use crate::message::{LuaMessage, PolicyMessage};
use crate::Policy;

/// The event asked about every log record.
pub const SHOULD_ENQUEUE: &str = "should_enqueue_log_record";

/// Installs `kumo.configure_log_hook`.
pub(crate) fn install(lua: &Lua, kumo: &Table) -> mlua::Result<()> {
    let configure = lua.create_function(|lua, params: Table| {
        let name: String = params
            .get::<Option<String>>("name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                mlua::Error::runtime(
                    "kumo.configure_log_hook: 'name' (a non-empty string) is required",
                )
            })?;
        let mut state = crate::host::host_state_mut(lua, "kumo.configure_log_hook")?;
        if !state.init.log_hooks.contains(&name) {
            state.init.log_hooks.push(name);
        }
        Ok(())
    })?;
    kumo.set("configure_log_hook", configure)
}

impl Policy {
    /// Offers a log record to the policy's `should_enqueue_log_record` handler (in the
    /// long-lived log-hook state, within the event bound). Returns the message as the handler left it
    /// (metadata it set included) when it answered true, `None` when it answered
    /// false/nil or there is no handler.
    pub async fn should_enqueue_log_record(
        &self,
        record: PolicyMessage,
        hook: &str,
    ) -> Result<Option<PolicyMessage>, PolicyError> {
        let chunk = self.chunk_name().to_string();
        let hook = hook.to_owned();
        let what = format!("event '{SHOULD_ENQUEUE}' for log hook '{hook}'");
        self.on_shared(Shared::LogHooks, what, move |lua| async move {
            offer(&lua, &chunk, record, hook).await
        })
        .await
    }
}

/// On the shared state's thread: asks the handler about one record.
async fn offer(
    lua: &Lua,
    chunk: &str,
    record: PolicyMessage,
    hook: String,
) -> Result<Option<PolicyMessage>, PolicyError> {
    let handlers = handlers(lua, SHOULD_ENQUEUE).map_err(|e| lua_error(chunk, e))?;
    if handlers.is_empty() {
        return Ok(None);
    }
    let failed = |e| event_error(chunk, SHOULD_ENQUEUE, e);
    let message = lua.create_userdata(LuaMessage(record)).map_err(failed)?;
    for handler in &handlers {
        match call(handler, &message, hook.clone())
            .await
            .map_err(failed)?
        {
            Value::Nil => continue,
            Value::Boolean(false) => return Ok(None),
            _ => {
                let LuaMessage(view) = message.take::<LuaMessage>().map_err(failed)?;
                return Ok(Some(view));
            }
        }
    }
    Ok(None)
}

async fn call(handler: &Function, message: &AnyUserData, hook: String) -> mlua::Result<Value> {
    handler.call_async::<Value>((message.clone(), hook)).await
}
