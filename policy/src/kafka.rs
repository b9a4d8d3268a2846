//! `kumo.kafka.build_producer{...}`: a librdkafka `FutureProducer` as Lua userdata.
//!
//! `producer:send{...}` awaits the delivery report; because it is an async method the
//! calling coroutine yields meanwhile, so concurrent sends pipeline into librdkafka.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlua::{Lua, LuaString, Table, UserData, UserDataMethods, Value};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::queue_config::parse_duration;

const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn install(lua: &Lua, kumo: &Table) -> mlua::Result<()> {
    let kafka = lua.create_table()?;
    kafka.set("build_producer", lua.create_function(build_producer)?)?;
    kumo.set("kafka", kafka)
}

type RelayProducer = FutureProducer<BrokerErrors>;

struct KafkaProducer {
    /// `None` once closed.
    inner: Mutex<Option<Arc<RelayProducer>>>,
    /// The producer context's record of broker errors (librdkafka keeps the context itself
    /// out of reach behind `FutureProducerContext`).
    errors: BrokerErrors,
}

/// Remembers librdkafka's last client-level error (e.g. "SSL handshake failed: certificate
/// verify failed"). A record that cannot reach a broker only times out, and "timed out" alone
/// does not tell the operator to fix the CA or the certificate: the send error adds this.
#[derive(Clone, Default)]
struct BrokerErrors {
    last: Arc<Mutex<Option<String>>>,
}

impl BrokerErrors {
    fn last(&self) -> Option<String> {
        self.last.lock().ok().and_then(|g| g.clone())
    }
}

impl ClientContext for BrokerErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", "librdkafka: {error}: {reason}");
        // "1/1 brokers are down" follows every connection failure and would hide its cause.
        let summary = matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown));
        if let Ok(mut g) = self.last.lock() {
            if !summary || g.is_none() {
                *g = Some(reason.to_string());
            }
        }
    }
}

fn build_producer(_: &Lua, config: Table) -> mlua::Result<KafkaProducer> {
    let mut cc = ClientConfig::new();
    for pair in config.pairs::<String, Value>() {
        let (k, v) = pair?;
        let v = match &v {
            Value::String(s) => s.to_str()?.to_string(),
            Value::Integer(i) => i.to_string(),
            Value::Number(n) => n.to_string(),
            Value::Boolean(b) => b.to_string(),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "kumo.kafka.build_producer: '{k}' must be a string, number or boolean, got {}",
                    crate::host::describe(other)
                )))
            }
        };
        cc.set(k, v);
    }
    let errors = BrokerErrors::default();
    let producer: RelayProducer = cc
        .create_with_context(errors.clone())
        .map_err(|e| mlua::Error::runtime(format!("kumo.kafka.build_producer: {e}")))?;
    Ok(KafkaProducer {
        inner: Mutex::new(Some(Arc::new(producer))),
        errors,
    })
}

/// One record, owned, parsed from a Lua table before any await.
struct Record {
    topic: Arc<str>,
    payload: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
    partition: Option<i32>,
    timeout: Duration,
}

/// The fields of one record table, as Lua values, before conversion.
#[derive(Default)]
struct Fields {
    topic: Option<Value>,
    payload: Option<Value>,
    key: Option<Value>,
    headers: Option<Value>,
    partition: Option<Value>,
    timeout: Option<Value>,
}

impl Fields {
    /// Takes every field of `t` in one walk, and refuses a field this API does not know, so
    /// a typo is an error, not a silent default. (A lookup per field name would make a Lua
    /// string of the name each time: that was half of parsing a batch in the P2 profile.)
    fn of(t: &Table) -> mlua::Result<Fields> {
        let mut fields = Fields::default();
        for pair in t.pairs::<Value, Value>() {
            let (k, v) = pair?;
            let slot = match &k {
                Value::String(name) => fields.slot(&name.as_bytes()),
                _ => None,
            };
            match slot {
                Some(slot) => *slot = Some(v),
                None => return Err(unknown_field(&k)),
            }
        }
        Ok(fields)
    }

    fn slot(&mut self, name: &[u8]) -> Option<&mut Option<Value>> {
        Some(match name {
            b"topic" => &mut self.topic,
            b"payload" => &mut self.payload,
            b"key" => &mut self.key,
            b"headers" => &mut self.headers,
            b"partition" => &mut self.partition,
            b"timeout" => &mut self.timeout,
            _ => return None,
        })
    }
}

fn unknown_field(k: &Value) -> mlua::Error {
    let name = match k {
        Value::String(s) => s.to_string_lossy(),
        Value::Integer(i) => i.to_string(),
        other => crate::host::describe(other),
    };
    mlua::Error::runtime(format!("kafka send: unknown field '{name}'"))
}

/// What the records of one `send_batch` usually share, converted once and reused while the
/// next record gives the same string: kafka.lua gives every record the same topic and
/// timeout, and parsing the timeout again for each record cost a tenth of the batch.
#[derive(Default)]
struct Shared {
    topic: LastConverted<Arc<str>>,
    timeout: LastConverted<Duration>,
}

/// The value converted from the last string given, with that string.
struct LastConverted<T>(Option<(Vec<u8>, T)>);

impl<T> Default for LastConverted<T> {
    fn default() -> Self {
        LastConverted(None)
    }
}

impl<T: Clone> LastConverted<T> {
    /// `convert`'s value for `s`, reused if `s` is the string last given.
    fn of(&mut self, s: &LuaString, convert: impl FnOnce() -> mlua::Result<T>) -> mlua::Result<T> {
        let bytes = s.as_bytes();
        if let Some((last, value)) = &self.0 {
            if last[..] == bytes[..] {
                return Ok(value.clone());
            }
        }
        let value = convert()?;
        self.0 = Some((bytes.to_vec(), value.clone()));
        Ok(value)
    }
}

impl Shared {
    fn topic(&mut self, lua: &Lua, v: Value) -> mlua::Result<Arc<str>> {
        match &v {
            Value::String(s) => self.topic.of(s, || Ok(Arc::from(&*s.to_str()?))),
            // Not a string: converted as before (a number is coerced, a table refused).
            _ => Ok(lua.unpack::<String>(v)?.into()),
        }
    }

    fn timeout(&mut self, v: Option<Value>) -> mlua::Result<Duration> {
        match &v {
            None | Some(Value::Nil) => Ok(DEFAULT_SEND_TIMEOUT),
            Some(v @ Value::String(s)) => self.timeout.of(s, || parse_timeout(v)),
            Some(v) => parse_timeout(v),
        }
    }
}

fn parse_timeout(v: &Value) -> mlua::Result<Duration> {
    parse_duration(v).map_err(|e| mlua::Error::runtime(format!("kafka send: 'timeout': {e}")))
}

fn parse_record(lua: &Lua, t: &Table, shared: &mut Shared) -> mlua::Result<Record> {
    let fields = Fields::of(t)?;
    let topic = match fields.topic {
        None | Some(Value::Nil) => {
            return Err(mlua::Error::runtime("kafka send: 'topic' is required"));
        }
        Some(v) => shared.topic(lua, v)?,
    };
    let nil = |v: Option<Value>| v.unwrap_or(Value::Nil);
    let headers = match lua.unpack::<Option<Table>>(nil(fields.headers))? {
        None => None,
        Some(h) => {
            let mut owned = OwnedHeaders::new();
            for pair in h.pairs::<String, LuaString>() {
                let (name, value) = pair?;
                owned = owned.insert(Header {
                    key: &name,
                    value: Some(&value.as_bytes()[..]),
                });
            }
            Some(owned)
        }
    };
    let timeout = shared.timeout(fields.timeout)?;
    let bytes = |v: Option<Value>| -> mlua::Result<Option<Vec<u8>>> {
        Ok(lua
            .unpack::<Option<LuaString>>(nil(v))?
            .map(|s| s.as_bytes().to_vec()))
    };
    Ok(Record {
        topic,
        payload: bytes(fields.payload)?,
        key: bytes(fields.key)?,
        headers,
        partition: lua.unpack(nil(fields.partition))?,
        timeout,
    })
}

impl KafkaProducer {
    fn producer(&self) -> mlua::Result<Arc<RelayProducer>> {
        self.inner
            .lock()
            .map_err(|_| mlua::Error::runtime("kafka producer lock poisoned"))?
            .clone()
            .ok_or_else(|| mlua::Error::runtime("kafka producer is closed"))
    }
}

/// Sends one record and waits for its delivery report: `(partition, offset)`.
async fn send_record(
    producer: &RelayProducer,
    errors: &BrokerErrors,
    r: Record,
) -> Result<(i32, i64), String> {
    let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic);
    if let Some(p) = &r.payload {
        fr = fr.payload(&p[..]);
    }
    if let Some(k) = &r.key {
        fr = fr.key(&k[..]);
    }
    if let Some(h) = r.headers {
        fr = fr.headers(h);
    }
    if let Some(p) = r.partition {
        fr = fr.partition(p);
    }
    // The queue timeout bounds waiting for room in librdkafka's queue; the outer one
    // bounds the whole delivery (librdkafka's own message.timeout.ms still applies).
    let send = producer.send(fr, Timeout::After(r.timeout));
    let result = match tokio::time::timeout(r.timeout, send).await {
        Err(_) => Err(format!(
            "kafka send to '{}' timed out after {}",
            r.topic,
            humantime::format_duration(r.timeout)
        )),
        Ok(Err((e, _))) => Err(format!("kafka send to '{}' failed: {e}", r.topic)),
        Ok(Ok(d)) => return Ok((d.partition, d.offset)),
    };
    result.map_err(|e| match errors.last() {
        Some(last) => format!("{e} (last broker error: {last})"),
        None => e,
    })
}

impl UserData for KafkaProducer {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_async_method("send", |lua, this, t: Table| async move {
            let record = parse_record(&lua, &t, &mut Shared::default())?;
            let producer = this.producer()?;
            let errors = this.errors.clone();
            drop(this);
            send_record(&producer, &errors, record)
                .await
                .map_err(mlua::Error::runtime)
        });
        methods.add_async_method("send_batch", |lua, this, list: Table| async move {
            let mut records = Vec::new();
            let mut shared = Shared::default();
            for rec in list.sequence_values::<Table>() {
                records.push(parse_record(&lua, &rec?, &mut shared)?);
            }
            let producer = this.producer()?;
            let errors = this.errors.clone();
            drop(this);
            let results = futures::future::join_all(
                records
                    .into_iter()
                    .map(|r| send_record(&producer, &errors, r)),
            )
            .await;
            let failed = lua.create_table()?;
            let errors = lua.create_table()?;
            for (i, r) in results.into_iter().enumerate() {
                if let Err(e) = r {
                    failed.push(i + 1)?;
                    errors.push(e)?;
                }
            }
            Ok((failed, errors))
        });
        methods.add_async_method("close", |_, this, ()| async move {
            let taken = this.inner.lock().ok().and_then(|mut g| g.take());
            drop(this);
            if let Some(p) = taken {
                tokio::task::spawn_blocking(move || p.flush(Timeout::After(CLOSE_FLUSH_TIMEOUT)))
                    .await
                    .map_err(|e| mlua::Error::runtime(format!("kafka close: {e}")))?
                    .map_err(|e| mlua::Error::runtime(format!("kafka close: flush failed: {e}")))?;
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(lua: &Lua, records: &str) -> mlua::Result<Vec<Record>> {
        let list: Table = lua.load(records).eval()?;
        let mut shared = Shared::default();
        list.sequence_values::<Table>()
            .map(|t| parse_record(lua, &t?, &mut shared))
            .collect()
    }

    fn error(records: &str) -> String {
        match parse_all(&Lua::new(), records) {
            Ok(_) => panic!("{records} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_batch_takes_each_records_own_topic_and_timeout() {
        let lua = Lua::new();
        let records = parse_all(
            &lua,
            "return { { topic = 'a', payload = 'x', timeout = '2s' },
                      { topic = 'a', payload = 'y', timeout = '2s', key = 'k', partition = 3 },
                      { topic = 'b', timeout = 5 },
                      { topic = 'b', headers = { h = 'v' } },
                      { topic = 42, timeout = '2s' } }",
        )
        .unwrap();
        let seen: Vec<(&str, Duration)> = records.iter().map(|r| (&*r.topic, r.timeout)).collect();
        let s = Duration::from_secs;
        assert_eq!(
            seen,
            [
                ("a", s(2)),
                ("a", s(2)),
                ("b", s(5)),
                ("b", DEFAULT_SEND_TIMEOUT),
                ("42", s(2))
            ]
        );
        assert_eq!(records[1].payload.as_deref(), Some(&b"y"[..]));
        assert_eq!(records[1].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(records[1].partition, Some(3));
        assert!(records[3].headers.is_some() && records[0].headers.is_none());
    }

    #[test]
    fn bad_records_are_refused_with_the_field_named() {
        let cases = [
            (
                "return { { topic = 't', topik = 'x' } }",
                "kafka send: unknown field 'topik'",
            ),
            (
                "return { { topic = 't', 'positional' } }",
                "kafka send: unknown field '1'",
            ),
            (
                "return { { payload = 'x' } }",
                "kafka send: 'topic' is required",
            ),
            (
                "return { { topic = 't', timeout = 'soon' } }",
                "kafka send: 'timeout': invalid duration 'soon'",
            ),
            (
                "return { { topic = 't', timeout = '1s' }, { topic = 't', timeout = 'later' } }",
                "kafka send: 'timeout': invalid duration 'later'",
            ),
        ];
        for (records, want) in cases {
            let got = error(records);
            assert!(got.contains(want), "{records}: {got}");
        }
        assert!(error("return { { topic = {} } }").contains("table"));
    }
}
