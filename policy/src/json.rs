//! `kumo.json_encode` / `kumo.json_decode` (and `kumo.json_parse`, KumoMTA's name for the
//! same decoder, so KumoMTA policies run unchanged), via mlua's serde support.

use mlua::{Lua, LuaSerdeExt, Table, Value};

pub(crate) fn install(lua: &Lua, kumo: &Table) -> mlua::Result<()> {
    kumo.set(
        "json_encode",
        lua.create_function(|_, v: Value| {
            serde_json::to_string(&v)
                .map_err(|e| mlua::Error::runtime(format!("kumo.json_encode: {e}")))
        })?,
    )?;
    for name in ["json_decode", "json_parse"] {
        kumo.set(
            name,
            lua.create_function(move |lua, s: mlua::LuaString| {
                let v: serde_json::Value = serde_json::from_slice(&s.as_bytes())
                    .map_err(|e| mlua::Error::runtime(format!("kumo.{name}: {e}")))?;
                lua.to_value(&v)
            })?,
        )?;
    }
    Ok(())
}

/// JSON to Lua with JSON `null` as `nil` (used for message metadata).
pub(crate) fn to_lua_nil_null(lua: &Lua, v: &serde_json::Value) -> mlua::Result<Value> {
    lua.to_value_with(
        v,
        mlua::serde::SerializeOptions::new()
            .serialize_none_to_null(false)
            .serialize_unit_to_null(false),
    )
}
