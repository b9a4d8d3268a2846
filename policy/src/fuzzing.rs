//! `kumo.make_queue_config` in a bare Lua state, for the `queue_config` fuzz target
//! (feature `fuzzing`; not part of the policy API).
//!
//! A whole [`crate::Policy`] per input (a Lua state on its own thread, the sandbox, the
//! event round trip) caps the target at about a hundred inputs a second. The parsing under
//! test is `make_queue_config` itself and the conversion of a handler's answer, so one
//! state with only that function installed serves every input.

use mlua::{Lua, Value};

use crate::queue_config::{self, FromValueError, QueueConfig};

/// One Lua state with `kumo.make_queue_config`, reused across inputs.
pub struct QueueConfigProbe {
    lua: Lua,
}

impl QueueConfigProbe {
    /// A Lua state with a `kumo` table holding `make_queue_config`.
    pub fn new() -> mlua::Result<QueueConfigProbe> {
        let lua = Lua::new();
        let kumo = lua.create_table()?;
        queue_config::install(&lua, &kumo)?;
        lua.globals().set("kumo", kumo)?;
        Ok(QueueConfigProbe { lua })
    }

    /// Evaluates `kumo.make_queue_config <literal>` as a policy handler would and converts
    /// the answer as the host does; `Err` carries the message an operator would see.
    pub fn make(&self, literal: &str) -> Result<QueueConfig, String> {
        self.convert(&format!("return kumo.make_queue_config {literal}"))
    }

    /// Evaluates the literal as a plain table (a handler may return one instead of a
    /// `make_queue_config` result) and converts it.
    pub fn from_plain_table(&self, literal: &str) -> Result<QueueConfig, String> {
        self.convert(&format!("return {literal}"))
    }

    fn convert(&self, chunk: &str) -> Result<QueueConfig, String> {
        let value: Value = self
            .lua
            .load(chunk)
            .set_name("fuzz.lua")
            .eval()
            .map_err(|e| e.to_string())?;
        queue_config::from_lua_value(value).map_err(|e| match e {
            FromValueError::Invalid(e) => e.to_string(),
            FromValueError::NotAConfig(what) => format!("not a queue config: {what}"),
        })
    }
}
