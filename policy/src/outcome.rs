//! The result rule: what a sender's `send` did, turned into a [`SendOutcome`].
//!
//! * a string whose leading code is 2xx (`'250 ok'`) => [`SendOutcome::Delivered`];
//! * `kumo.reject(code, msg)`: code >= 500 => [`SendOutcome::Permanent`], below => `Transient`;
//! * any other raised error, `nil`, a non-string, or a non-2xx string => `Transient`
//!   with [`TRANSIENT_CODE`] (or the string's own 4xx code) and a text that says where.
//!   A *returned* string without a 2xx code is also warned about, once per queue
//!   ([`warn_if_not_2xx`]): KumoMTA would have counted it as delivered.

use mlua::Value;

/// The code used for transient failures that carry no code of their own.
pub const TRANSIENT_CODE: u16 = 451;

/// The verdict on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The broker has it. `response` is what the policy returned (`'250 ...'`).
    Delivered {
        /// What the policy returned.
        response: String,
    },
    /// Try again later.
    Transient {
        /// The SMTP-style code (`kumo.reject`'s, or [`TRANSIENT_CODE`]).
        code: u16,
        /// The text that goes with it.
        response: String,
    },
    /// Retrying will not help (the policy said so with `kumo.reject(5xx, ...)`).
    Permanent {
        /// The SMTP-style code (`kumo.reject`'s, or [`TRANSIENT_CODE`]).
        code: u16,
        /// The text that goes with it.
        response: String,
    },
}

impl SendOutcome {
    /// Whether the broker has the message.
    pub fn is_delivered(&self) -> bool {
        matches!(self, SendOutcome::Delivered { .. })
    }

    /// The response text, whatever the outcome.
    pub fn response(&self) -> &str {
        match self {
            SendOutcome::Delivered { response }
            | SendOutcome::Transient { response, .. }
            | SendOutcome::Permanent { response, .. } => response,
        }
    }

    pub(crate) fn transient(response: impl Into<String>) -> SendOutcome {
        SendOutcome::Transient {
            code: TRANSIENT_CODE,
            response: response.into(),
        }
    }
}

/// The error `kumo.reject(code, message)` raises; recognised wherever it ends up in
/// the error chain (also after a Lua `pcall` + `error(e)` re-raise).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {message}")]
pub(crate) struct Rejection {
    pub code: u16,
    pub message: String,
}

/// The leading three-digit code of a response string, if any.
pub fn leading_code(s: &str) -> Option<u16> {
    let digits = s.get(..3)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match s.as_bytes().get(3) {
        None | Some(b' ') | Some(b'-') | Some(b'\t') => digits.parse().ok(),
        Some(_) => None,
    }
}

/// What a value a sender returned means, with the once-per-queue warning of
/// [`warn_if_not_2xx`] for a returned string without a 2xx code. `who` names the call for
/// those messages and is built only when the value is not a delivery: a batch's results
/// are 2xx strings nearly always, and naming each one ("... for message 17") cost an
/// allocation per message.
pub(crate) fn judge_value(queue: &str, value: &Value, who: impl FnOnce() -> String) -> SendOutcome {
    let Value::String(s) = value else {
        return SendOutcome::transient(format!(
            "{} returned {}; it must return a string like '250 ok' or raise",
            who(),
            crate::host::describe(value)
        ));
    };
    let text = s.to_string_lossy();
    let code = leading_code(&text);
    if matches!(code, Some(200..=299)) {
        return SendOutcome::Delivered { response: text };
    }
    let who = who();
    warn_if_not_2xx(queue, &text, &who);
    match code {
        Some(code @ 400..=499) => SendOutcome::Transient {
            code,
            response: format!("{who} returned a non-2xx response: {text}"),
        },
        _ => SendOutcome::transient(format!(
            "{who} returned {text:?}, which is not a 2xx response; use kumo.reject(code, msg) to fail a message"
        )),
    }
}

/// Most queues remembered by [`warn_if_not_2xx`]; past it, further queues are not warned
/// about (a bound on memory, not a rule anyone should meet).
const MAX_WARNED_QUEUES: usize = 10_000;

/// Warns, once per queue per process, that a sender *returned* `text`, a string without
/// a 2xx code. KumoMTA counts any returned string as delivered; here it is a transient failure
/// (the contract: delivered only on 2xx), so a policy ported from KumoMTA that returns
/// `'ok'` would retry for ever without a word. Raised errors and `kumo.reject` are meant and
/// not warned about.
fn warn_if_not_2xx(queue: &str, text: &str, who: &str) {
    static WARNED: std::sync::Mutex<Option<std::collections::HashSet<String>>> =
        std::sync::Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    let warned = warned.get_or_insert_with(Default::default);
    if warned.len() >= MAX_WARNED_QUEUES || !warned.insert(queue.to_owned()) {
        return;
    }
    tracing::warn!(target: "policy", %queue,
        "{who} returned {text:?}, which has no 2xx code: the message counts as a transient failure and is retried. KumoMTA treats any returned string as delivered; here return '250 ...' to mark a message delivered (or kumo.reject(code, msg) to fail it). Warned once per queue");
}

pub(crate) fn classify_error(e: &mlua::Error) -> SendOutcome {
    if let Some(r) = e.downcast_ref::<Rejection>() {
        let response = format!("{} {}", r.code, r.message);
        return if r.code >= 500 {
            SendOutcome::Permanent {
                code: r.code,
                response,
            }
        } else {
            SendOutcome::Transient {
                code: r.code,
                response,
            }
        };
    }
    SendOutcome::transient(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_codes() {
        assert_eq!(leading_code("250 ok"), Some(250));
        assert_eq!(leading_code("250"), Some(250));
        assert_eq!(leading_code("250-multi"), Some(250));
        assert_eq!(leading_code("2500 x"), None);
        assert_eq!(leading_code("ok 250"), None);
        assert_eq!(leading_code(""), None);
    }
}
