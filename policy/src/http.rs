//! `kumo.http`: HTTP requests from a policy, shaped like KumoMTA's (`build_client`,
//! `client:post(url)`, `request:header/headers/body/basic_auth/bearer_auth/timeout`,
//! `request:send()`, `response:status_code()/status_reason()/status_is_success()/...
//! /headers()/text()/bytes()`), so a `custom_lua` sender can deliver a message as a
//! webhook (policy/examples/webhook.lua).
//!
//! The client is reqwest on the connection's own Lua thread (its runtime drives the
//! connection pool). `send()` answers for any status: what a status means is the policy's
//! choice (the example maps 2xx to delivered, 408/429/5xx to a retry, other 4xx to a
//! permanent failure). A transport error or a timeout raises, which the result rule turns
//! into a transient failure (451) like a broker that is away. Request methods change the
//! request in place and return it, so they chain (`client:post(u):header(k, v):send()`)
//! or can be called one by one as in KumoMTA's docs.
//!
//! `https://` goes through the system OpenSSL (reqwest's native-tls), as the Kafka and AMQP
//! clients do, so one set of trust settings serves every destination: the system roots,
//! or `SSL_CERT_FILE` / `SSL_CERT_DIR` (docs/connecting.md).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlua::{AnyUserData, Lua, Table, UserData, UserDataMethods, Value};
use reqwest::{Client, Method, RequestBuilder};

use crate::queue_config::parse_duration;

/// The largest response body `send()` reads; a larger one raises (a transient failure).
const MAX_RESPONSE_BODY: usize = 16 << 20;

/// KumoMTA's default per-request timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn install(lua: &Lua, kumo: &Table) -> mlua::Result<()> {
    let http = lua.create_table()?;
    http.set("build_client", lua.create_function(build_client)?)?;
    kumo.set("http", http)
}

fn err(what: &str, e: impl std::fmt::Display) -> mlua::Error {
    mlua::Error::runtime(format!("kumo.http {what}: {e}"))
}

fn duration_param(params: &Table, key: &str) -> mlua::Result<Option<Duration>> {
    match params.get::<Value>(key)? {
        Value::Nil => Ok(None),
        v => parse_duration(&v)
            .map(Some)
            .map_err(|e| err("build_client", format!("'{key}': {e}"))),
    }
}

fn build_client(_: &Lua, params: Option<Table>) -> mlua::Result<HttpClient> {
    // native-tls, not rustls (which the workspace's tests also compile in): the brokers'
    // trust settings apply only through OpenSSL.
    let mut builder = Client::builder().use_native_tls().timeout(DEFAULT_TIMEOUT);
    if let Some(params) = params {
        if let Some(agent) = params.get::<Option<String>>("user_agent")? {
            builder = builder.user_agent(agent);
        }
        if let Some(t) = duration_param(&params, "timeout")? {
            builder = builder.timeout(t);
        }
        if let Some(t) = duration_param(&params, "pool_idle_timeout")? {
            builder = builder.pool_idle_timeout(t);
        }
        if let Some(t) = duration_param(&params, "connect_timeout")? {
            builder = builder.connect_timeout(t);
        }
    }
    let client = builder.build().map_err(|e| err("build_client", e))?;
    Ok(HttpClient(client))
}

struct HttpClient(Client);

impl UserData for HttpClient {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        for (name, method) in [
            ("get", Method::GET),
            ("post", Method::POST),
            ("put", Method::PUT),
        ] {
            methods.add_method(name, move |_, this, url: String| {
                let builder = this.0.request(method.clone(), &url);
                Ok(HttpRequest {
                    url,
                    builder: Arc::new(Mutex::new(Some(builder))),
                })
            });
        }
        methods.add_method("close", |_, _, ()| Ok(()));
    }
}

/// A request not yet sent. The builder is taken by `send()`; using the request after that
/// is an error.
#[derive(Clone)]
struct HttpRequest {
    url: String,
    builder: Arc<Mutex<Option<RequestBuilder>>>,
}

impl HttpRequest {
    /// Applies `f` to the builder; the request (`this`) is returned for chaining.
    fn apply(
        this: AnyUserData,
        what: &str,
        f: impl FnOnce(RequestBuilder) -> RequestBuilder,
    ) -> mlua::Result<AnyUserData> {
        {
            let req = this.borrow::<HttpRequest>()?;
            let mut slot = req.builder.lock().unwrap_or_else(|e| e.into_inner());
            let builder = slot
                .take()
                .ok_or_else(|| err(what, "the request was already sent"))?;
            *slot = Some(f(builder));
        }
        Ok(this)
    }
}

impl UserData for HttpRequest {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_function(
            "header",
            |_, (this, k, v): (AnyUserData, String, String)| {
                HttpRequest::apply(this, "request:header", |b| b.header(k, v))
            },
        );
        methods.add_function("headers", |_, (this, t): (AnyUserData, Table)| {
            let pairs: Vec<(String, String)> = t.pairs().collect::<mlua::Result<_>>()?;
            HttpRequest::apply(this, "request:headers", |mut b| {
                for (k, v) in pairs {
                    b = b.header(k, v);
                }
                b
            })
        });
        methods.add_function("body", |_, (this, body): (AnyUserData, mlua::LuaString)| {
            let bytes = body.as_bytes().to_vec();
            HttpRequest::apply(this, "request:body", |b| b.body(bytes))
        });
        methods.add_function(
            "basic_auth",
            |_, (this, user, password): (AnyUserData, String, Option<String>)| {
                HttpRequest::apply(this, "request:basic_auth", |b| b.basic_auth(user, password))
            },
        );
        methods.add_function("bearer_auth", |_, (this, token): (AnyUserData, String)| {
            HttpRequest::apply(this, "request:bearer_auth", |b| b.bearer_auth(token))
        });
        methods.add_function("timeout", |_, (this, t): (AnyUserData, Value)| {
            let t = parse_duration(&t).map_err(|e| err("request:timeout", e))?;
            HttpRequest::apply(this, "request:timeout", |b| b.timeout(t))
        });
        methods.add_async_method("send", |_, this, ()| async move {
            let url = this.url.clone();
            let builder = this
                .builder
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            drop(this);
            let builder =
                builder.ok_or_else(|| err("request:send", "the request was already sent"))?;
            let response = builder
                .send()
                .await
                .map_err(|e| err("request:send", format!("{url}: {}", describe(&e))))?;
            let status = response.status();
            let headers: Vec<(String, String)> = response
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let body = read_body(response, &url).await?;
            Ok(HttpResponse {
                status: status.as_u16(),
                reason: status.canonical_reason(),
                headers,
                body,
            })
        });
    }
}

/// Reads a response body of at most [`MAX_RESPONSE_BODY`] bytes. The body is held outside
/// the Lua state, where the policy's memory limit does not reach: without a bound, one
/// endpoint answering without end would take the relay's memory, not only its queue's.
async fn read_body(mut response: reqwest::Response, url: &str) -> mlua::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        err(
            "request:send",
            format!("{url}: reading the body: {}", describe(&e)),
        )
    })? {
        if body.len() + chunk.len() > MAX_RESPONSE_BODY {
            return Err(err(
                "request:send",
                format!(
                    "{url}: the response body is larger than {} MiB; a webhook should answer \
                     briefly",
                    MAX_RESPONSE_BODY >> 20
                ),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error with its causes (reqwest's own text stops at "error sending request").
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        format!("timed out: {e}")
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A response, read whole (webhook answers are small).
struct HttpResponse {
    status: u16,
    reason: Option<&'static str>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl UserData for HttpResponse {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("status_code", |_, this, ()| Ok(this.status));
        methods.add_method("status_reason", |_, this, ()| Ok(this.reason));
        let ranges: [(&str, u16); 5] = [
            ("status_is_informational", 100),
            ("status_is_success", 200),
            ("status_is_redirection", 300),
            ("status_is_client_error", 400),
            ("status_is_server_error", 500),
        ];
        for (name, low) in ranges {
            methods.add_method(name, move |_, this, ()| {
                Ok((low..low + 100).contains(&this.status))
            });
        }
        methods.add_method("content_length", |_, this, ()| Ok(this.body.len()));
        methods.add_method("text", |_, this, ()| {
            Ok(String::from_utf8_lossy(&this.body).into_owned())
        });
        methods.add_method("bytes", |lua, this, ()| lua.create_string(&this.body));
        methods.add_method("headers", |lua, this, ()| {
            // Lower-case names (HTTP/2 style, as reqwest gives them): index with lower case.
            let t = lua.create_table()?;
            for (k, v) in &this.headers {
                t.set(k.as_str(), v.as_str())?;
            }
            Ok(t)
        });
    }
}
