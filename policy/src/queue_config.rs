//! `kumo.make_queue_config{...}`: validation of queue settings, durations and rates.
//! Queue names are parsed in [`crate::QueueName`].

use std::time::Duration;

use mlua::{Lua, Table, UserData, Value};

/// What to do with a message whose send ended in a permanent failure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PermanentFailure {
    /// Keep it in the spool and retry later (the safe default: a relay loses nothing).
    #[default]
    Requeue,
    /// Move it to the dead-letter area.
    DeadLetter,
}

/// A message rate: at most `limit` messages per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// How many messages.
    pub limit: u64,
    /// In how long.
    pub per: Duration,
}

impl Rate {
    /// Parses `'1000/s'`, `'50/m'`, `'3600/h'`, `'10/d'` (also `sec`, `minute`, `hour`, `day`).
    pub fn parse(s: &str) -> Result<Rate, String> {
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid rate '{s}': expected N/s, N/m, N/h or N/d"))?;
        let limit: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("invalid rate '{s}': '{n}' is not a whole number"))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hr" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86400),
            other => {
                return Err(format!(
                    "invalid rate '{s}': unknown unit '{other}' (use s, m, h or d)"
                ))
            }
        };
        if limit == 0 {
            return Err(format!("invalid rate '{s}': must be at least 1"));
        }
        Ok(Rate { limit, per })
    }
}

/// How one queue is delivered; built by `kumo.make_queue_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    /// Event that builds a sender (`protocol.custom_lua.constructor`). `None`: the queue
    /// has no protocol, which is an error at connect time, not a crash.
    pub constructor: Option<String>,
    /// Most messages per `send_batch` call (`protocol.custom_lua.batch_size`).
    pub batch_size: usize,
    /// Fewest messages per batch (`protocol.custom_lua.min_batch_size`).
    pub min_batch_size: usize,
    /// How long a batch may wait to fill (`protocol.custom_lua.max_batch_latency`).
    pub max_batch_latency: Duration,
    /// Base retry delay, doubled per attempt (`retry_interval`).
    pub retry_interval: Duration,
    /// Cap on the retry delay (`max_retry_interval`); `None`: no cap.
    pub max_retry_interval: Option<Duration>,
    /// Age after which a message is dead-lettered (`max_age`).
    pub max_age: Duration,
    /// Send rate limit for the queue (`max_message_rate`); `None`: unlimited.
    pub max_message_rate: Option<Rate>,
    /// Send rate limit shared by every queue of the same tenant that declares the same
    /// rate (`overall_max_message_rate`, KumoMTA's "collective" limit); `None`: unlimited.
    pub overall_max_message_rate: Option<Rate>,
    /// Most connections (senders) the queue opens at once (`connection_limit`).
    pub connection_limit: usize,
    /// How long a queue's config is used before `get_queue_config` is asked again
    /// (`refresh_interval`, KumoMTA's field and default).
    pub refresh_interval: Duration,
    /// Limit for one `send`, `send_batch`, constructor or `close` (`send_timeout`).
    pub send_timeout: Duration,
    /// What a permanent failure does to a message (`on_permanent_failure`).
    pub on_permanent_failure: PermanentFailure,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            constructor: None,
            batch_size: 1,
            min_batch_size: 1,
            max_batch_latency: Duration::ZERO,
            retry_interval: Duration::from_secs(20 * 60),
            max_retry_interval: None,
            max_age: Duration::from_secs(7 * 86400),
            max_message_rate: None,
            overall_max_message_rate: None,
            connection_limit: 32,
            refresh_interval: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            on_permanent_failure: PermanentFailure::Requeue,
        }
    }
}

/// The Lua face of a [`QueueConfig`] (what `make_queue_config` returns).
pub(crate) struct LuaQueueConfig(pub QueueConfig);
impl UserData for LuaQueueConfig {}

/// KumoMTA queue-config fields (`kumod/src/queue/config.rs`) accepted for compatibility
/// that have no effect here: SMTP egress pools, in-memory queue strategies and memory
/// shrinking, metrics rollups by provider, per-queue reaping (the daemon's
/// `--queue-reap-interval` applies to every queue) and epoch-driven refreshes.
pub const IGNORED_KUMO_FIELDS: &[&str] = &[
    "egress_pool",
    "provider_name",
    "reap_interval",
    "refresh_strategy",
    "shrink_policy",
    "strategy",
    "timerwheel_tick_interval",
];

/// Warns, once per field per process, that a KumoMTA field has no effect here: the
/// policy asks for queue configs again and again, and one line says it.
fn warn_ignored(field: &str) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.iter().any(|f| f == field) {
        return;
    }
    warned.push(field.to_owned());
    tracing::warn!(target: "policy", field,
        "make_queue_config: KumoMTA field '{field}' is accepted but has no effect in spoolrelay (see docs/lua-api.md, compatibility)");
}

pub(crate) fn install(lua: &Lua, kumo: &Table) -> mlua::Result<()> {
    kumo.set(
        "make_queue_config",
        lua.create_function(|lua, t: Option<Table>| {
            let config = match t {
                Some(t) => parse_table(&t).map_err(|e| match e {
                    // prefix the caller's file:line, like a Lua error() would
                    mlua::Error::RuntimeError(msg) => mlua::Error::RuntimeError(format!(
                        "{}: {msg}",
                        crate::host::caller_location(lua)
                    )),
                    other => other,
                })?,
                None => QueueConfig::default(),
            };
            Ok(LuaQueueConfig(config))
        })?,
    )
}

pub(crate) enum FromValueError {
    Invalid(mlua::Error),
    NotAConfig(String),
}

/// Accepts what a `get_queue_config` handler returned: a `make_queue_config` result or a
/// plain table with the same fields.
pub(crate) fn from_lua_value(v: Value) -> Result<QueueConfig, FromValueError> {
    match &v {
        Value::UserData(ud) if ud.is::<LuaQueueConfig>() => ud
            .borrow::<LuaQueueConfig>()
            .map(|c| c.0.clone())
            .map_err(FromValueError::Invalid),
        Value::Table(t) => parse_table(t).map_err(FromValueError::Invalid),
        other => Err(FromValueError::NotAConfig(crate::host::describe(other))),
    }
}

fn bad(field: &str, why: impl std::fmt::Display) -> mlua::Error {
    mlua::Error::runtime(format!("make_queue_config: field '{field}': {why}"))
}

pub(crate) fn parse_table(t: &Table) -> mlua::Result<QueueConfig> {
    let mut c = QueueConfig::default();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair?;
        let Value::String(k) = k else {
            return Err(mlua::Error::runtime(format!(
                "make_queue_config: field names must be strings, got {}",
                crate::host::describe(&k)
            )));
        };
        let key = k.to_str()?.to_string();
        match key.as_str() {
            "protocol" => parse_protocol(&v, &mut c)?,
            "retry_interval" => c.retry_interval = duration(&key, &v)?,
            "max_retry_interval" => c.max_retry_interval = Some(duration(&key, &v)?),
            "max_age" => c.max_age = duration(&key, &v)?,
            "send_timeout" => c.send_timeout = duration(&key, &v)?,
            "refresh_interval" => c.refresh_interval = duration(&key, &v)?,
            "connection_limit" => c.connection_limit = count(&key, &v)?,
            "max_message_rate" => c.max_message_rate = Some(rate(&key, &v)?),
            "overall_max_message_rate" => c.overall_max_message_rate = Some(rate(&key, &v)?),
            "on_permanent_failure" => {
                c.on_permanent_failure = match string(&key, &v)?.as_str() {
                    "requeue" => PermanentFailure::Requeue,
                    "dead_letter" => PermanentFailure::DeadLetter,
                    other => {
                        return Err(bad(
                            &key,
                            format!("'{other}' is neither 'requeue' nor 'dead_letter'"),
                        ))
                    }
                }
            }
            k if IGNORED_KUMO_FIELDS.contains(&k) => warn_ignored(k),
            _ => {
                return Err(mlua::Error::runtime(format!(
                    "make_queue_config: unknown field '{key}'"
                )))
            }
        }
    }
    if let Some(max) = c.max_retry_interval {
        if max < c.retry_interval {
            return Err(bad(
                "max_retry_interval",
                "must not be smaller than retry_interval",
            ));
        }
    }
    Ok(c)
}

fn parse_protocol(v: &Value, c: &mut QueueConfig) -> mlua::Result<()> {
    let Value::Table(p) = v else {
        return Err(bad(
            "protocol",
            format!("expected a table, got {}", crate::host::describe(v)),
        ));
    };
    for pair in p.pairs::<String, Value>() {
        let (kind, body) = pair?;
        if kind != "custom_lua" {
            return Err(bad(
                "protocol",
                format!("protocol '{kind}' is not supported; use custom_lua"),
            ));
        }
        let Value::Table(body) = body else {
            return Err(bad("protocol.custom_lua", "expected a table"));
        };
        for pair in body.pairs::<String, Value>() {
            let (key, v) = pair?;
            let field = format!("protocol.custom_lua.{key}");
            match key.as_str() {
                "constructor" => c.constructor = Some(string(&field, &v)?),
                "batch_size" => c.batch_size = count(&field, &v)?,
                "min_batch_size" => c.min_batch_size = count(&field, &v)?,
                "max_batch_latency" => c.max_batch_latency = duration(&field, &v)?,
                _ => {
                    return Err(mlua::Error::runtime(format!(
                        "make_queue_config: unknown field '{field}'"
                    )))
                }
            }
        }
        if c.constructor.is_none() {
            return Err(bad("protocol.custom_lua.constructor", "is required"));
        }
        if c.min_batch_size > c.batch_size {
            return Err(bad(
                "protocol.custom_lua.min_batch_size",
                "must not exceed batch_size",
            ));
        }
    }
    Ok(())
}

fn string(field: &str, v: &Value) -> mlua::Result<String> {
    match v {
        Value::String(s) => Ok(s.to_str()?.to_string()),
        other => Err(bad(
            field,
            format!("expected a string, got {}", crate::host::describe(other)),
        )),
    }
}

fn rate(field: &str, v: &Value) -> mlua::Result<Rate> {
    Rate::parse(&string(field, v)?).map_err(|e| bad(field, e))
}

/// A positive whole number.
fn count(field: &str, v: &Value) -> mlua::Result<usize> {
    let n = match v {
        Value::Integer(i) => *i,
        Value::Number(n) if n.fract() == 0.0 && n.is_finite() => *n as i64,
        other => {
            return Err(bad(
                field,
                format!(
                    "expected a whole number, got {}",
                    crate::host::describe(other)
                ),
            ))
        }
    };
    if n < 1 {
        return Err(bad(field, format!("must be at least 1, got {n}")));
    }
    usize::try_from(n).map_err(|_| bad(field, "too large"))
}

fn duration(field: &str, v: &Value) -> mlua::Result<Duration> {
    parse_duration(v).map_err(|e| bad(field, e))
}

/// The longest duration a policy may give. Durations become milliseconds added to the
/// current time (due times, expiry); a bound far below `u64::MAX` ms keeps every such sum
/// exact instead of wrapping or truncating.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86400);

/// A humantime string (`'20m'`, `'1 minute'`, `'7d'`, `'200ms'`) or a number of seconds,
/// at most [`MAX_DURATION`].
pub(crate) fn parse_duration(v: &Value) -> Result<Duration, String> {
    let secs = match v {
        Value::String(s) => {
            let s = s.to_string_lossy();
            let d = humantime::parse_duration(s.trim())
                .map_err(|e| format!("invalid duration '{s}': {e}"))?;
            return bounded(d, &s);
        }
        Value::Integer(i) => *i as f64,
        Value::Number(n) => *n,
        other => {
            return Err(format!(
                "expected a duration like '20m' or seconds, got {}",
                crate::host::describe(other)
            ))
        }
    };
    let d = Duration::try_from_secs_f64(secs).map_err(|_| {
        format!("invalid duration {secs}: must be a non-negative number of seconds")
    })?;
    bounded(d, &secs.to_string())
}

fn bounded(d: Duration, given: &str) -> Result<Duration, String> {
    if d > MAX_DURATION {
        return Err(format!(
            "duration {given} is longer than the maximum of 100 years ({} s)",
            MAX_DURATION.as_secs()
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let r = |l, s| Rate {
            limit: l,
            per: Duration::from_secs(s),
        };
        assert_eq!(Rate::parse("1000/s"), Ok(r(1000, 1)));
        assert_eq!(Rate::parse("50/m"), Ok(r(50, 60)));
        assert_eq!(Rate::parse("3600/h"), Ok(r(3600, 3600)));
        assert!(Rate::parse("fast").is_err());
        assert!(Rate::parse("10/fortnight").is_err());
        assert!(Rate::parse("-1/s").is_err());
        assert!(Rate::parse("0/s").is_err());
    }
}
