//! The Message userdata a sender's `send` receives.

use mlua::{LuaSerdeExt, UserData, UserDataMethods, Value};

/// One message as the policy sees it (`send(message)`). The daemon builds it from a spool
/// record; not to be confused with `spool::view::MessageView`, the operator's JSON view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyMessage {
    /// The spool's message id, as text (`message:id()`).
    pub id: String,
    /// The queue the message is in (`message:queue_name()`).
    pub queue: String,
    /// The payload, any bytes.
    pub data: Vec<u8>,
    /// The message's metadata (`message:get_meta(k)`).
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Earlier delivery attempts (0 on the first try).
    pub attempts: u32,
    /// The envelope sender of an injected message (`message:sender()`).
    pub sender: Option<String>,
    /// The envelope recipient of an injected message (`message:recipient()`).
    pub recipient: Option<String>,
}

/// Lua face of a [`PolicyMessage`]: `id()`, `get_data()`, `get_meta(k)`, `set_meta(k, v)`,
/// `queue_name()`, `num_attempts()`, `sender()`, `recipient()`.
pub(crate) struct LuaMessage(pub PolicyMessage);

impl UserData for LuaMessage {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("id", |_, m, ()| Ok(m.0.id.clone()));
        methods.add_method("get_data", |lua, m, ()| lua.create_string(&m.0.data));
        methods.add_method("queue_name", |_, m, ()| Ok(m.0.queue.clone()));
        methods.add_method("num_attempts", |_, m, ()| Ok(m.0.attempts));
        methods.add_method("sender", |_, m, ()| Ok(m.0.sender.clone()));
        methods.add_method("recipient", |_, m, ()| Ok(m.0.recipient.clone()));
        methods.add_method("get_meta", |lua, m, key: String| match m.0.meta.get(&key) {
            None => Ok(Value::Nil),
            Some(v) => crate::json::to_lua_nil_null(lua, v),
        });
        methods.add_method_mut("set_meta", |lua, m, (key, value): (String, Value)| {
            let v: serde_json::Value = lua.from_value(value)?;
            m.0.meta.insert(key, v);
            Ok(())
        });
        methods.add_meta_method("__tostring", |_, m, ()| Ok(format!("Message({})", m.0.id)));
    }
}
