//! Loading a policy, creating Lua states, the `kumo.on` event registry and the small
//! core of `kumo.*` (reject, sleep, logging, init-time settings).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mlua::{Function, Lua, RegistryKey, Table, Value, Variadic};

use crate::connection::Connection;
use crate::error::PolicyError;
use crate::outcome::Rejection;
use crate::queue_config::{self, QueueConfig, QueueName};

/// The event that may have several handlers (run in order, first non-nil result wins).
const MULTI_HANDLER_EVENT: &str = "get_queue_config";

/// Settings the optional `init` event makes through `kumo.define_spool{path=...}` and
/// `kumo.start_http_listener{listen=...}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitConfig {
    pub spool_path: Option<PathBuf>,
    pub listen: Option<String>,
    /// Names declared with `kumo.configure_log_hook{ name = ... }`.
    pub log_hooks: Vec<String>,
}

/// A loaded, validated policy. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Policy {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shown in messages (`kafka.lua:12:`); the chunk is loaded as `@{chunk}`.
    chunk: String,
    source: String,
    /// Long-lived state for `queue_config`; mlua locks it internally.
    shared: Lua,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("chunk", &self.inner.chunk)
            .finish()
    }
}

/// Per-state bookkeeping, kept in the state's app data.
pub(crate) struct HostState {
    /// True only while the chunk itself runs: `kumo.on` is refused otherwise.
    pub loading: bool,
    pub handlers: HashMap<String, Vec<Handler>>,
    pub init: InitConfig,
}

pub(crate) struct Handler {
    pub func: RegistryKey,
    /// `file:line` of the `kumo.on` call.
    pub location: String,
}

impl Policy {
    /// Reads `path` and runs it once in a fresh state to validate it.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let source = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_source(&path.display().to_string(), &source)
    }

    /// Like [`Policy::load`] for an in-memory chunk; `chunk_name` appears in messages.
    pub fn from_source(chunk_name: &str, source: &str) -> Result<Policy, PolicyError> {
        let chunk = chunk_name.trim_start_matches(['@', '=']).to_string();
        let shared = new_state(&chunk, source)?;
        Ok(Policy {
            inner: Arc::new(Inner {
                chunk,
                source: source.to_string(),
                shared,
            }),
        })
    }

    /// The chunk name used in messages.
    pub fn chunk_name(&self) -> &str {
        &self.inner.chunk
    }

    /// Runs the optional `init` event in a fresh state and reports what it configured.
    pub async fn init_config(&self) -> Result<InitConfig, PolicyError> {
        let lua = new_state(&self.inner.chunk, &self.inner.source)?;
        if let Some(handler) = self.single_handler(&lua, "init")? {
            handler
                .call_async::<()>(())
                .await
                .map_err(|error| self.event_error("init", error))?;
        }
        let state = lua
            .app_data_ref::<HostState>()
            .expect("host state is installed");
        Ok(state.init.clone())
    }

    /// Runs the `get_queue_config` handlers for `queue_name` (in the shared state).
    pub async fn queue_config(&self, queue_name: &str) -> Result<QueueConfig, PolicyError> {
        self.queue_config_in(&self.inner.shared, queue_name).await
    }

    /// Creates a new Lua state, resolves the queue's config there and runs the
    /// constructor event it names. The returned sender table lives in that state.
    pub async fn connect(&self, queue_name: &str) -> Result<Connection, PolicyError> {
        let chunk = &self.inner.chunk;
        let lua = new_state(chunk, &self.inner.source)?;
        let config = self.queue_config_in(&lua, queue_name).await?;
        let constructor = config
            .constructor
            .clone()
            .ok_or_else(|| PolicyError::NoProtocol {
                queue: queue_name.to_string(),
            })?;
        let handler =
            self.single_handler(&lua, &constructor)?
                .ok_or_else(|| PolicyError::NoConstructor {
                    chunk: chunk.clone(),
                    constructor: constructor.clone(),
                    queue: queue_name.to_string(),
                })?;
        let name = QueueName::parse(queue_name);
        let call = handler.call_async::<Value>((name.domain, name.tenant, name.campaign));
        let result = match tokio::time::timeout(config.send_timeout, call).await {
            Err(_) => {
                return Err(PolicyError::Timeout {
                    chunk: chunk.clone(),
                    what: format!("constructor '{constructor}' (queue '{queue_name}')"),
                    after: config.send_timeout,
                })
            }
            Ok(Err(error)) => {
                return Err(PolicyError::Constructor {
                    chunk: chunk.clone(),
                    constructor,
                    queue: queue_name.to_string(),
                    error: Box::new(error),
                })
            }
            Ok(Ok(value)) => value,
        };
        let sender = match result {
            Value::Table(t) => t,
            other => {
                return Err(PolicyError::ConstructorReturned {
                    chunk: chunk.clone(),
                    constructor,
                    queue: queue_name.to_string(),
                    defined_at: function_location(&handler),
                    got: describe(&other),
                })
            }
        };
        Connection::new(lua, sender, chunk.clone(), queue_name.to_string(), config)
    }

    async fn queue_config_in(
        &self,
        lua: &Lua,
        queue_name: &str,
    ) -> Result<QueueConfig, PolicyError> {
        let name = QueueName::parse(queue_name);
        for handler in handlers(lua, MULTI_HANDLER_EVENT).map_err(|e| self.lua_error(e))? {
            let args = (
                name.domain.clone(),
                name.tenant.clone(),
                name.campaign.clone(),
                name.routing_domain.clone(),
            );
            let value: Value = handler
                .call_async(args)
                .await
                .map_err(|error| self.event_error(MULTI_HANDLER_EVENT, error))?;
            if value.is_nil() {
                continue;
            }
            return queue_config::from_lua_value(value).map_err(|got| match got {
                queue_config::FromValueError::Invalid(error) => {
                    self.event_error(MULTI_HANDLER_EVENT, error)
                }
                queue_config::FromValueError::NotAConfig(got) => PolicyError::BadQueueConfig {
                    chunk: self.inner.chunk.clone(),
                    queue: queue_name.to_string(),
                    got,
                },
            });
        }
        Ok(QueueConfig::default())
    }

    /// The long-lived state `queue_config` and log hooks run in.
    pub(crate) fn shared_state(&self) -> &Lua {
        &self.inner.shared
    }

    pub(crate) fn single_handler(
        &self,
        lua: &Lua,
        event: &str,
    ) -> Result<Option<Function>, PolicyError> {
        Ok(handlers(lua, event)
            .map_err(|e| self.lua_error(e))?
            .into_iter()
            .next())
    }

    pub(crate) fn event_error(&self, event: &str, error: mlua::Error) -> PolicyError {
        PolicyError::Event {
            chunk: self.inner.chunk.clone(),
            event: event.to_string(),
            error: Box::new(error),
        }
    }

    fn lua_error(&self, error: mlua::Error) -> PolicyError {
        PolicyError::Lua {
            chunk: self.inner.chunk.clone(),
            error: Box::new(error),
        }
    }
}

/// The handlers registered for `event`, in registration order.
fn handlers(lua: &Lua, event: &str) -> mlua::Result<Vec<Function>> {
    let state = lua
        .app_data_ref::<HostState>()
        .expect("host state is installed");
    match state.handlers.get(event) {
        None => Ok(Vec::new()),
        Some(list) => list.iter().map(|h| lua.registry_value(&h.func)).collect(),
    }
}

/// Coroutines kept for reuse per state: about what a connection has in flight (256).
const COROUTINE_POOL: usize = 256;

/// A fresh state with `kumo.*` installed and the policy chunk run in it.
///
/// Tuned for a connection's hot path, where every `send` is a short-lived coroutine that
/// leaves garbage behind (the message userdata, the record table, strings): coroutines are
/// recycled from a pool instead of created per call, and the generational collector
/// reclaims young garbage without re-marking the whole heap each cycle (the P2 profile
/// in docs/performance.md shows Lua's share of the send path).
pub(crate) fn new_state(chunk: &str, source: &str) -> Result<Lua, PolicyError> {
    let lua_err = |error| PolicyError::Lua {
        chunk: chunk.to_string(),
        error: Box::new(error),
    };
    let options = mlua::LuaOptions::default().thread_pool_size(COROUTINE_POOL);
    let lua = Lua::new_with(mlua::StdLib::ALL_SAFE, options).map_err(lua_err)?;
    lua.gc_set_mode(mlua::state::GcMode::Generational(Default::default()));
    lua.set_app_data(HostState {
        loading: true,
        handlers: HashMap::new(),
        init: InitConfig::default(),
    });
    install_kumo(&lua).map_err(lua_err)?;
    let run = lua.load(source).set_name(format!("@{chunk}")).exec();
    if let Some(mut state) = lua.app_data_mut::<HostState>() {
        state.loading = false;
    }
    run.map_err(|error| PolicyError::Load {
        chunk: chunk.to_string(),
        error: Box::new(error),
    })?;
    Ok(lua)
}

fn install_kumo(lua: &Lua) -> mlua::Result<()> {
    let kumo = lua.create_table()?;
    kumo.set("on", lua.create_function(kumo_on)?)?;
    kumo.set(
        "reject",
        lua.create_function(|_, (code, message): (u16, Option<String>)| {
            Err::<(), _>(mlua::Error::external(Rejection {
                code,
                message: message.unwrap_or_default(),
            }))
        })?,
    )?;
    kumo.set(
        "sleep",
        lua.create_async_function(|_, seconds: f64| async move {
            let d = Duration::try_from_secs_f64(seconds)
                .map_err(|e| mlua::Error::runtime(format!("kumo.sleep: {e}")))?;
            tokio::time::sleep(d).await;
            Ok(())
        })?,
    )?;
    kumo.set(
        "define_spool",
        lua.create_function(|lua, params: Table| {
            let path: String = params.get("path")?;
            host_state_mut(lua, "kumo.define_spool")?.init.spool_path = Some(PathBuf::from(path));
            Ok(())
        })?,
    )?;
    kumo.set(
        "start_http_listener",
        lua.create_function(|lua, params: Table| {
            let listen: String = params.get("listen")?;
            host_state_mut(lua, "kumo.start_http_listener")?.init.listen = Some(listen);
            Ok(())
        })?,
    )?;
    for level in ["error", "warn", "info", "debug"] {
        kumo.set(format!("log_{level}"), log_function(lua, level)?)?;
    }
    lua.globals().set("print", log_function(lua, "info")?)?;
    queue_config::install(lua, &kumo)?;
    crate::json::install(lua, &kumo)?;
    crate::kafka::install(lua, &kumo)?;
    crate::amqp::install(lua, &kumo)?;
    crate::log_hook::install(lua, &kumo)?;
    lua.globals().set("kumo", kumo)?;
    Ok(())
}

/// `kumo.on(event, fn)`: only while loading; one handler per event except
/// `get_queue_config`.
fn kumo_on(lua: &Lua, (event, func): (String, Function)) -> mlua::Result<()> {
    let location = caller_location(lua);
    let key = lua.create_registry_value(func)?;
    let mut state = host_state_mut(lua, "kumo.on")?;
    if !state.loading {
        return Err(mlua::Error::runtime(format!(
            "kumo.on('{event}') at {location}: kumo.on may only be called while the policy loads, not from inside an event handler"
        )));
    }
    let list = state.handlers.entry(event.clone()).or_default();
    if event != MULTI_HANDLER_EVENT {
        if let Some(first) = list.first() {
            return Err(mlua::Error::runtime(format!(
                "kumo.on('{event}') at {location}: event '{event}' already has a handler, registered at {}; only '{MULTI_HANDLER_EVENT}' may have several",
                first.location
            )));
        }
    }
    list.push(Handler {
        func: key,
        location,
    });
    Ok(())
}

/// The state's bookkeeping, as a Lua error (never a panic) if it is unavailable.
pub(crate) fn host_state_mut<'a>(
    lua: &'a Lua,
    who: &str,
) -> mlua::Result<mlua::AppDataRefMut<'a, HostState>> {
    match lua.try_app_data_mut::<HostState>() {
        Ok(Some(state)) => Ok(state),
        Ok(None) => Err(mlua::Error::runtime(format!("{who}: host state missing"))),
        Err(_) => Err(mlua::Error::runtime(format!("{who}: host state is busy"))),
    }
}

fn log_function(lua: &Lua, level: &'static str) -> mlua::Result<Function> {
    lua.create_function(move |lua, args: Variadic<Value>| {
        let mut text = String::new();
        for (i, v) in args.iter().enumerate() {
            if i > 0 {
                text.push(if level == "info" { '\t' } else { ' ' });
            }
            text.push_str(&v.to_string().unwrap_or_else(|_| describe(v)));
        }
        let at = caller_location(lua);
        match level {
            "error" => tracing::error!(target: "policy", at = %at, "{text}"),
            "warn" => tracing::warn!(target: "policy", at = %at, "{text}"),
            "info" => tracing::info!(target: "policy", at = %at, "{text}"),
            _ => tracing::debug!(target: "policy", at = %at, "{text}"),
        }
        Ok(())
    })
}

/// `file:line` of the Lua code calling the current Rust callback.
pub(crate) fn caller_location(lua: &Lua) -> String {
    lua.inspect_stack(1, |d| {
        let src = d.source();
        let file = src.short_src.as_deref().unwrap_or("?").to_string();
        match d.current_line() {
            Some(line) => format!("{file}:{line}"),
            None => file,
        }
    })
    .unwrap_or_else(|| "?".to_string())
}

/// `file:line` where a Lua function was defined.
pub(crate) fn function_location(f: &Function) -> String {
    let info = f.info();
    let file = info.short_src.unwrap_or_else(|| "?".to_string());
    match info.line_defined {
        Some(line) => format!("{file}:{line}"),
        None => file,
    }
}

/// A short description of a Lua value for error messages: `nil`, `a number (42)`, ...
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Nil => "nil".to_string(),
        Value::Boolean(b) => format!("a boolean ({b})"),
        Value::Integer(i) => format!("a number ({i})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) => format!("a string ({:?})", s.to_string_lossy()),
        other => format!("a {}", other.type_name()),
    }
}
