//! How a message looks to operators: the one JSON shape that `spoolctl --json` prints
//! offline and the daemon's admin API serves online.
//!
//! It lives here, not in `spoolctl` or the daemon, because both must print the same thing
//! and `spoolctl` must not depend on the daemon (Lua, brokers, HTTP server). It is a plain
//! `Serialize`/`Deserialize` struct, so `spoolctl --url` reads the daemon's answer back into
//! the same type it renders offline. Metadata is turned into JSON by [`crate::meta_json`].

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::meta_json::meta_to_json;
use crate::record::Message;

/// A message for people and scripts: everything but the payload, unless asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    /// Decimal string: ids are u64 and JSON numbers lose precision past 2^53.
    pub id: String,
    /// The queue it waits in.
    pub queue: String,
    /// When the spool accepted it (ms since the Unix epoch).
    pub created_ms: u64,
    /// Failed delivery attempts so far.
    pub attempts: u32,
    /// Not to be delivered before this time (ms since the Unix epoch).
    pub due_ms: u64,
    /// The last failure, or the dead-letter reason.
    pub last_error: Option<String>,
    /// Payload size in bytes.
    pub bytes: usize,
    /// The metadata as JSON, nested values parsed back from their stored JSON text.
    pub meta: Map<String, Value>,
    /// The payload in standard base64, only when it was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
}

impl MessageView {
    /// The view of `msg`; the payload is included (base64) only when `with_data` is set, as
    /// listings of large queues should not carry every body.
    pub fn of(msg: &Message, with_data: bool) -> MessageView {
        MessageView {
            id: msg.id.to_string(),
            queue: msg.queue.clone(),
            created_ms: msg.created_ms,
            attempts: msg.attempts,
            due_ms: msg.due_ms,
            last_error: msg.last_error.clone(),
            bytes: msg.payload.len(),
            meta: meta_to_json(&msg.meta),
            data_b64: with_data
                .then(|| base64::engine::general_purpose::STANDARD.encode(&msg.payload)),
        }
    }

    /// The payload back from `data_b64` (`None` when the view was made without data).
    pub fn payload(&self) -> Option<Result<Vec<u8>, base64::DecodeError>> {
        self.data_b64
            .as_ref()
            .map(|b64| base64::engine::general_purpose::STANDARD.decode(b64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{MessageId, Meta, MetaValue};

    #[test]
    fn view_round_trips_through_json_and_keeps_the_payload() {
        let mut meta = Meta::new();
        meta.insert("tags".into(), MetaValue::Json(r#"["a",1]"#.into()));
        meta.insert("broken".into(), MetaValue::Json("{oops".into()));
        let msg = Message {
            id: MessageId(u64::MAX),
            queue: "q".into(),
            created_ms: 1,
            attempts: 2,
            due_ms: 3,
            last_error: Some("451 later".into()),
            meta,
            payload: vec![0, 255, 7],
        };
        let view = MessageView::of(&msg, true);
        let text = serde_json::to_string(&view).unwrap();
        assert!(text.contains(r#""id":"18446744073709551615""#), "{text}");
        assert!(text.contains(r#""tags":["a",1]"#), "{text}");
        assert!(text.contains(r#""broken":"{oops""#), "{text}");
        let back: MessageView = serde_json::from_str(&text).unwrap();
        assert_eq!(back.payload().unwrap().unwrap(), msg.payload);
        let bare = serde_json::to_value(MessageView::of(&msg, false)).unwrap();
        assert!(bare.get("data_b64").is_none());
    }
}
