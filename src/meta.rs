//! Metadata conversion between the spool's flat [`MetaValue`] and JSON.
//!
//! The spool stores metadata flat (no recursion, see `spool::record`): scalars keep their
//! type and arrays/objects travel as JSON text. HTTP clients and Lua policies see plain
//! JSON, so this is the one place that translates, in both directions, losslessly for
//! everything JSON can express.

use serde_json::{Map, Value};
use spool::{Meta, MetaValue};

/// JSON value → spool value. Integers that fit `i64` stay integers; larger ones and
/// fractions become floats; arrays and objects become compact JSON text.
pub fn from_json(value: Value) -> MetaValue {
    match value {
        Value::Null => MetaValue::Null,
        Value::Bool(b) => MetaValue::Bool(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => MetaValue::Int(i),
            None => MetaValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => MetaValue::Str(s),
        nested @ (Value::Array(_) | Value::Object(_)) => MetaValue::Json(nested.to_string()),
    }
}

/// Spool value → JSON value (the spool's own rule, shared with `spoolctl` and the admin
/// API through [`spool::view`]).
pub fn to_json(value: &MetaValue) -> Value {
    spool::view::meta_value_json(value)
}

/// A JSON object's members as spool metadata.
pub fn meta_from_map(map: Map<String, Value>) -> Meta {
    map.into_iter().map(|(k, v)| (k, from_json(v))).collect()
}

/// Spool metadata as a JSON object, for the policy's `PolicyMessage`.
pub fn meta_to_map(meta: &Meta) -> Map<String, Value> {
    spool::view::meta_json(meta)
}

/// A metadata value as a plain string, when it is one (for `sender` / `recipient`).
pub fn as_str(meta: &Meta, key: &str) -> Option<String> {
    match meta.get(key) {
        Some(MetaValue::Str(s)) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_through_meta() {
        let original = json!({
            "n": null, "b": true, "i": -42, "big": 18446744073709551615u64, "f": 1.5,
            "s": "text", "a": [1, "two", {"three": 3}], "o": {"k": [true]}
        });
        let Value::Object(map) = original.clone() else {
            unreachable!()
        };
        let meta = meta_from_map(map);
        assert_eq!(
            meta["a"],
            MetaValue::Json(r#"[1,"two",{"three":3}]"#.into())
        );
        let back = Value::Object(meta_to_map(&meta));
        let mut expected = original;
        expected["big"] = json!(18446744073709551615u64 as f64);
        assert_eq!(back, expected);
    }

    #[test]
    fn damaged_json_text_is_kept_as_string() {
        assert_eq!(to_json(&MetaValue::Json("{oops".into())), json!("{oops"));
    }
}
