//! `kumo.amqp.build_client(url | {url=, confirm=, tls=, heartbeat=, connect_timeout=})`: one
//! lapin connection + channel (how it connects: [`crate::amqp_connect`]).
//!
//! Publisher confirms are ON by default, so `client:publish{...}:wait()` reports what the
//! broker really did: `Ack`, `Nack`, `NotRequested` (confirms off), or `Returned` for a
//! mandatory message the broker could not route (lapin reports that as
//! `Ack(Some(returned))`; calling it `Ack` would make a lost message look delivered).

use std::sync::Mutex;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use mlua::{Lua, Table, UserData, UserDataMethods, Value};

pub(crate) fn install(lua: &Lua, kumo: &Table) -> mlua::Result<()> {
    let amqp = lua.create_table()?;
    amqp.set("build_client", lua.create_async_function(build_client)?)?;
    kumo.set("amqp", amqp)
}

pub(crate) fn err(what: &str, e: impl std::fmt::Display) -> mlua::Error {
    mlua::Error::runtime(format!("amqp {what}: {e}"))
}

struct AmqpClient {
    conn: std::sync::Arc<lapin::Connection>,
    channel: lapin::Channel,
}

async fn build_client(_: Lua, arg: Value) -> mlua::Result<AmqpClient> {
    let opts = crate::amqp_connect::parse(&arg)?;
    let shown = opts.shown_url();
    let conn = crate::amqp_connect::connect(&opts)
        .await
        .map_err(|e| err("build_client", format!("cannot connect to {shown}: {e}")))?;
    let channel = conn.create_channel().await.map_err(|e| {
        err(
            "build_client",
            format!("cannot open a channel on {shown}: {e}"),
        )
    })?;
    if opts.confirm {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| err("build_client", format!("confirm_select on {shown}: {e}")))?;
    }
    Ok(AmqpClient {
        conn: std::sync::Arc::new(conn),
        channel,
    })
}

struct Publish {
    exchange: String,
    routing_key: String,
    payload: Vec<u8>,
    options: BasicPublishOptions,
    properties: BasicProperties,
}

fn parse_publish(t: &Table) -> mlua::Result<Publish> {
    for pair in t.pairs::<String, Value>() {
        let (k, _) = pair?;
        if !matches!(
            k.as_str(),
            "routing_key" | "payload" | "exchange" | "options" | "properties"
        ) {
            return Err(err("publish", format!("unknown field '{k}'")));
        }
    }
    let mut options = BasicPublishOptions::default();
    if let Some(o) = t.get::<Option<Table>>("options")? {
        options.mandatory = o.get::<Option<bool>>("mandatory")?.unwrap_or(false);
        options.immediate = o.get::<Option<bool>>("immediate")?.unwrap_or(false);
    }
    Ok(Publish {
        exchange: t.get::<Option<String>>("exchange")?.unwrap_or_default(),
        routing_key: t
            .get::<Option<String>>("routing_key")?
            .ok_or_else(|| err("publish", "'routing_key' is required"))?,
        payload: t
            .get::<Option<mlua::LuaString>>("payload")?
            .map(|s| s.as_bytes().to_vec())
            .unwrap_or_default(),
        options,
        properties: parse_properties(t.get::<Option<Table>>("properties")?)?,
    })
}

/// AMQP basic properties; `delivery_mode` defaults to 2 (persistent).
fn parse_properties(t: Option<Table>) -> mlua::Result<BasicProperties> {
    let mut p = BasicProperties::default();
    let Some(t) = t else {
        return Ok(p.with_delivery_mode(2));
    };
    let s = |name: &str| -> mlua::Result<Option<ShortString>> {
        Ok(t.get::<Option<String>>(name)?.map(ShortString::from))
    };
    p = p.with_delivery_mode(t.get::<Option<u8>>("delivery_mode")?.unwrap_or(2));
    if let Some(v) = s("content_type")? {
        p = p.with_content_type(v);
    }
    if let Some(v) = s("content_encoding")? {
        p = p.with_content_encoding(v);
    }
    if let Some(v) = t.get::<Option<u8>>("priority")? {
        p = p.with_priority(v);
    }
    if let Some(v) = s("correlation_id")? {
        p = p.with_correlation_id(v);
    }
    if let Some(v) = s("reply_to")? {
        p = p.with_reply_to(v);
    }
    if let Some(v) = s("expiration")? {
        p = p.with_expiration(v);
    }
    if let Some(v) = s("message_id")? {
        p = p.with_message_id(v);
    }
    if let Some(v) = s("type")? {
        p = p.with_type(v);
    }
    if let Some(v) = s("app_id")? {
        p = p.with_app_id(v);
    }
    if let Some(v) = s("user_id")? {
        p = p.with_user_id(v);
    }
    if let Some(h) = t.get::<Option<Table>>("headers")? {
        let mut ft = FieldTable::default();
        for pair in h.pairs::<String, mlua::LuaString>() {
            let (k, v) = pair?;
            ft.insert(
                k.into(),
                AMQPValue::LongString(v.as_bytes().to_vec().into()),
            );
        }
        p = p.with_headers(ft);
    }
    Ok(p)
}

impl UserData for AmqpClient {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_async_method("publish", |_, this, t: Table| async move {
            let p = parse_publish(&t)?;
            let channel = this.channel.clone();
            drop(this);
            let confirm = channel
                .basic_publish(
                    p.exchange.as_str().into(),
                    p.routing_key.as_str().into(),
                    p.options,
                    &p.payload,
                    p.properties,
                )
                .await
                .map_err(|e| err("publish", e))?;
            Ok(AmqpConfirm(Mutex::new(Some(confirm))))
        });
        methods.add_async_method("close", |_, this, ()| async move {
            let conn = this.conn.clone();
            drop(this);
            if conn.status().connected() {
                conn.close(200, "closed by policy".into())
                    .await
                    .map_err(|e| err("close", e))?;
            }
            Ok(())
        });
    }
}

/// A pending publisher confirm; `wait()` resolves it once.
struct AmqpConfirm(Mutex<Option<PublisherConfirm>>);

impl UserData for AmqpConfirm {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_async_method("wait", |lua, this, ()| async move {
            let pending = this.0.lock().ok().and_then(|mut g| g.take());
            drop(this);
            let pending = pending.ok_or_else(|| err("confirm:wait", "already waited on"))?;
            let confirmation = pending.await.map_err(|e| err("confirm:wait", e))?;
            let result = lua.create_table()?;
            let (status, returned) = match confirmation {
                Confirmation::Ack(None) => ("Ack", None),
                Confirmation::Ack(Some(r)) => ("Returned", Some(r)),
                Confirmation::Nack(r) => ("Nack", r),
                Confirmation::NotRequested => ("NotRequested", None),
            };
            result.set("status", status)?;
            if let Some(r) = returned {
                result.set("reply_code", r.reply_code)?;
                result.set("reply_text", r.reply_text.as_str())?;
            }
            Ok(result)
        });
    }
}
