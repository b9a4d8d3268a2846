//! `kumo.kafka.build_producer{...}`: a librdkafka `FutureProducer` as Lua userdata.
//!
//! `producer:send{...}` awaits the delivery report; because it is an async method the
//! calling coroutine yields meanwhile, so concurrent sends pipeline into librdkafka.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlua::{Lua, Table, UserData, UserDataMethods, Value};
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
    topic: String,
    payload: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
    partition: Option<i32>,
    timeout: Duration,
}

fn parse_record(t: &Table) -> mlua::Result<Record> {
    let bytes = |name: &str| -> mlua::Result<Option<Vec<u8>>> {
        Ok(t.get::<Option<mlua::LuaString>>(name)?
            .map(|s| s.as_bytes().to_vec()))
    };
    for pair in t.pairs::<String, Value>() {
        let (k, _) = pair?;
        if !matches!(
            k.as_str(),
            "topic" | "payload" | "key" | "headers" | "partition" | "timeout"
        ) {
            return Err(mlua::Error::runtime(format!(
                "kafka send: unknown field '{k}'"
            )));
        }
    }
    let topic: String = t
        .get::<Option<String>>("topic")?
        .ok_or_else(|| mlua::Error::runtime("kafka send: 'topic' is required"))?;
    let headers = match t.get::<Option<Table>>("headers")? {
        None => None,
        Some(h) => {
            let mut owned = OwnedHeaders::new();
            for pair in h.pairs::<String, mlua::LuaString>() {
                let (name, value) = pair?;
                owned = owned.insert(Header {
                    key: &name,
                    value: Some(&value.as_bytes()[..]),
                });
            }
            Some(owned)
        }
    };
    let timeout = match t.get::<Value>("timeout")? {
        Value::Nil => DEFAULT_SEND_TIMEOUT,
        v => parse_duration(&v)
            .map_err(|e| mlua::Error::runtime(format!("kafka send: 'timeout': {e}")))?,
    };
    Ok(Record {
        topic,
        payload: bytes("payload")?,
        key: bytes("key")?,
        headers,
        partition: t.get("partition")?,
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
        methods.add_async_method("send", |_, this, t: Table| async move {
            let record = parse_record(&t)?;
            let producer = this.producer()?;
            let errors = this.errors.clone();
            drop(this);
            send_record(&producer, &errors, record)
                .await
                .map_err(mlua::Error::runtime)
        });
        methods.add_async_method("send_batch", |lua, this, list: Table| async move {
            let mut records = Vec::new();
            for rec in list.sequence_values::<Table>() {
                records.push(parse_record(&rec?)?);
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
