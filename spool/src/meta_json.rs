//! Metadata as JSON, in both directions: the one translation between the spool's flat
//! [`MetaValue`] and the JSON that HTTP clients, operators and Lua policies see.
//!
//! The spool stores metadata flat (no recursion, see [`crate::record`]): scalars keep their
//! type and arrays/objects travel as compact JSON text ([`MetaValue::Json`]). Both
//! directions sit side by side here so they stay each other's inverse for everything JSON
//! can express; the only loss is an integer beyond `i64`, which becomes a float. Metadata
//! holds no binary values (payloads are bytes, metadata is JSON), so no base64 rule exists.
//!
//! The envelope of an injected message (its sender and one recipient) is stored as the
//! metadata keys [`SENDER_KEY`] and [`RECIPIENT_KEY`]; [`sender`] and [`recipient`] read
//! them back. Keeping them in metadata leaves record v1 unchanged and keeps them visible in
//! the admin view and to `message:get_meta` exactly as before.

use serde_json::{Map, Number, Value};

use crate::record::{Meta, MetaValue};

/// Metadata key under which an injected message's envelope sender is stored.
pub const SENDER_KEY: &str = "sender";
/// Metadata key under which an injected message's envelope recipient is stored.
pub const RECIPIENT_KEY: &str = "recipient";

/// JSON value → spool value. Integers that fit `i64` stay integers; larger ones and
/// fractions become floats; arrays and objects become compact JSON text.
pub fn value_from_json(value: Value) -> MetaValue {
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

/// Spool value → JSON value. `Json` text that no longer parses (only a bug or a
/// hand-edited spool gets there) is shown as a string rather than dropped; a float JSON
/// cannot express (NaN, infinity) is shown as `null`.
pub fn value_to_json(value: &MetaValue) -> Value {
    match value {
        MetaValue::Null => Value::Null,
        MetaValue::Bool(b) => Value::Bool(*b),
        MetaValue::Int(i) => Value::Number((*i).into()),
        MetaValue::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        MetaValue::Str(s) => Value::String(s.clone()),
        MetaValue::Json(text) => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
        }
    }
}

/// A JSON object's members as spool metadata.
pub fn meta_from_json(map: Map<String, Value>) -> Meta {
    map.into_iter()
        .map(|(k, v)| (k, value_from_json(v)))
        .collect()
}

/// All of a message's metadata as one JSON object.
pub fn meta_to_json(meta: &Meta) -> Map<String, Value> {
    meta.iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

/// The envelope sender stored by an injection, when it is a string.
pub fn sender(meta: &Meta) -> Option<String> {
    string(meta, SENDER_KEY)
}

/// The envelope recipient stored by an injection, when it is a string.
pub fn recipient(meta: &Meta) -> Option<String> {
    string(meta, RECIPIENT_KEY)
}

fn string(meta: &Meta, key: &str) -> Option<String> {
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
        let meta = meta_from_json(map);
        assert_eq!(
            meta["a"],
            MetaValue::Json(r#"[1,"two",{"three":3}]"#.into())
        );
        assert_eq!(meta["i"], MetaValue::Int(-42));
        let back = Value::Object(meta_to_json(&meta));
        let mut expected = original;
        expected["big"] = json!(18446744073709551615u64 as f64);
        assert_eq!(back, expected);
    }

    #[test]
    fn meta_round_trips_through_json() {
        let mut meta = Meta::new();
        meta.insert("n".into(), MetaValue::Null);
        meta.insert("b".into(), MetaValue::Bool(false));
        meta.insert("i".into(), MetaValue::Int(i64::MIN));
        meta.insert("f".into(), MetaValue::Float(-0.25));
        meta.insert("s".into(), MetaValue::Str("ü\u{0}".into()));
        meta.insert("j".into(), MetaValue::Json(r#"{"x":[1,null]}"#.into()));
        assert_eq!(meta_from_json(meta_to_json(&meta)), meta);
    }

    #[test]
    fn damaged_json_text_is_kept_as_string() {
        assert_eq!(
            value_to_json(&MetaValue::Json("{oops".into())),
            json!("{oops")
        );
    }

    #[test]
    fn envelope_is_read_only_from_string_values() {
        let Value::Object(map) = json!({"sender": "a@x", "recipient": 7}) else {
            unreachable!()
        };
        let meta = meta_from_json(map);
        assert_eq!(sender(&meta).as_deref(), Some("a@x"));
        assert_eq!(recipient(&meta), None);
    }
}
