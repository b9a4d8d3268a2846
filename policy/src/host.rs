//! Loading a policy, creating Lua states, the `kumo.on` event registry and the small
//! core of `kumo.*` (reject, sleep, logging, init-time settings).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlua::{Function, Lua, RegistryKey, Table, Value, Variadic};

use crate::connection::Connection;
use crate::error::PolicyError;
use crate::outcome::Rejection;
use crate::queue_config::{self, QueueConfig};
use crate::queue_name::QueueName;
use crate::worker::{
    deadline_error, install_limits, is_memory_error, Bounded, LuaThread, PolicyLimits, Setup, Stop,
    WarmStates, Watch,
};

/// The event that asks for a queue's config; it may have several handlers (run in order,
/// first non-nil result wins).
const MULTI_HANDLER_EVENT: &str = "get_queue_config";

/// Events that may have several handlers, as in KumoMTA (which composes helpers this way):
/// each is run in registration order until one answers non-nil.
const MULTI_HANDLER_EVENTS: &[&str] = &[MULTI_HANDLER_EVENT, crate::log_hook::SHOULD_ENQUEUE];

/// Settings the optional `init` event makes through `kumo.define_spool{path=...}` and
/// `kumo.start_http_listener{listen=...}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitConfig {
    /// `kumo.define_spool{path=...}`: the spool directory.
    pub spool_path: Option<PathBuf>,
    /// `kumo.start_http_listener{listen=...}`: the HTTP listen address.
    pub listen: Option<String>,
    /// Names declared with `kumo.configure_log_hook{ name = ... }`.
    pub log_hooks: Vec<String>,
}

/// A loaded, validated policy. Cheap to clone; `Send + Sync`. Every clone sees a
/// [`Policy::reload`]: it swaps the [`Loaded`] generation all of them share.
#[derive(Clone)]
pub struct Policy {
    pub(crate) cell: Arc<crate::reload::Cell>,
}

/// One loaded generation of the policy: its source and the states built from it. A reload
/// builds a new one; the old one lives on in the connections still using it.
pub(crate) struct Loaded {
    /// Counts reloads: 0 for the first load. A connection remembers the generation it was
    /// built from, so the dispatcher can tell it is outdated.
    pub(crate) generation: u64,
    /// The chunk name (`kafka.lua`, shown in messages), its source, its directory and bounds.
    setup: Setup,
    /// The long-lived state `queue_config` runs in (thread `lua:shared`). Replaced by a
    /// fresh one when a call there breaks it (timeout, memory limit). The lock is never held
    /// across an await.
    shared: Mutex<Option<Arc<LuaThread>>>,
    /// Likewise for log hooks (thread `lua:hooks`, started on first use): apart from
    /// `shared`, so a hook that runs away does not delay every queue's config.
    hooks: Mutex<Option<Arc<LuaThread>>>,
    /// States of closed connections, reused by the next connection of any queue.
    warm: Arc<WarmStates>,
}

impl Loaded {
    /// A generation whose chunk already ran in `shared` (that run is the validation).
    pub(crate) fn new(generation: u64, setup: Setup, shared: LuaThread) -> Loaded {
        Loaded {
            generation,
            setup,
            shared: Mutex::new(Some(Arc::new(shared))),
            hooks: Mutex::new(None),
            warm: Arc::default(),
        }
    }

    /// The setup a reload starts from: same chunk name, directory and bounds.
    pub(crate) fn setup(&self) -> &Setup {
        &self.setup
    }
}

/// Which long-lived state a call runs in.
#[derive(Clone, Copy)]
pub(crate) enum Shared {
    QueueConfig,
    LogHooks,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("chunk", &self.inner().setup.chunk)
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
    /// Reads `path` and runs it once in a fresh state to validate it, with default
    /// [`PolicyLimits`].
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        Self::load_with(path, PolicyLimits::default())
    }

    /// Like [`Policy::load`] with explicit bounds. `require` finds modules in the file's
    /// directory.
    pub fn load_with(path: &Path, limits: PolicyLimits) -> Result<Policy, PolicyError> {
        let source = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let setup = Setup::new(&path.display().to_string(), &source, Some(dir), limits);
        let shared = LuaThread::start_blocking("lua:shared", &setup)?;
        Ok(Policy::new(Loaded::new(0, setup, shared), Some(path)))
    }

    /// Like [`Policy::load`] for an in-memory chunk; `chunk_name` appears in messages.
    /// Such a policy has no directory: `require` finds no files.
    pub fn from_source(chunk_name: &str, source: &str) -> Result<Policy, PolicyError> {
        Self::build(chunk_name, source, None, PolicyLimits::default())
    }

    /// [`Policy::from_source`] with explicit bounds.
    pub fn from_source_with(
        chunk_name: &str,
        source: &str,
        limits: PolicyLimits,
    ) -> Result<Policy, PolicyError> {
        Self::build(chunk_name, source, None, limits)
    }

    fn build(
        chunk_name: &str,
        source: &str,
        dir: Option<PathBuf>,
        limits: PolicyLimits,
    ) -> Result<Policy, PolicyError> {
        let setup = Setup::new(chunk_name, source, dir, limits);
        let shared = LuaThread::start_blocking("lua:shared", &setup)?;
        Ok(Policy::new(Loaded::new(0, setup, shared), None))
    }

    /// The chunk name used in messages.
    pub fn chunk_name(&self) -> String {
        self.chunk()
    }

    /// The bounds this policy runs under.
    pub fn limits(&self) -> PolicyLimits {
        self.inner().setup.limits
    }

    fn chunk(&self) -> String {
        self.inner().setup.chunk.clone()
    }

    /// Runs the optional `init` event in a fresh state and reports what it configured.
    pub async fn init_config(&self) -> Result<InitConfig, PolicyError> {
        let thread = LuaThread::start("lua:init", &self.inner().setup).await?;
        let chunk = self.chunk();
        self.event(&thread, "event 'init'".into(), move |lua| async move {
            if let Some(handler) = single_handler(&chunk, &lua, "init")? {
                handler
                    .call_async::<()>(())
                    .await
                    .map_err(|error| event_error(&chunk, "init", error))?;
            }
            let state = host_state_mut(&lua, "init").map_err(|e| lua_error(&chunk, e))?;
            Ok(state.init.clone())
        })
        .await
    }

    /// Runs the `get_queue_config` handlers for `queue_name` (in the shared state).
    pub async fn queue_config(&self, queue_name: &str) -> Result<QueueConfig, PolicyError> {
        let thread = self.shared(Shared::QueueConfig).await?;
        let (chunk, queue) = (self.chunk(), queue_name.to_string());
        self.event(
            &thread,
            format!("event '{MULTI_HANDLER_EVENT}' for queue '{queue_name}'"),
            move |lua| async move { queue_config_in(&chunk, &lua, &queue).await },
        )
        .await
    }

    /// Takes a warm Lua state of a closed connection, or creates a new one on its own thread
    /// (`lua:<queue>`, named after the first queue it serves), resolves the queue's config
    /// there and runs the constructor event it names. The returned sender table lives in
    /// that state. Each step has its own bound ([`PolicyLimits::event_timeout`]).
    pub async fn connect(&self, queue_name: &str) -> Result<Connection, PolicyError> {
        self.connect_from(queue_name, None).await
    }

    /// Like [`connect`](Self::connect), with the queue's config already resolved (the
    /// dispatcher caches it per queue): one policy call fewer per new connection, which is
    /// what a burst over thousands of new queues pays for. As in KumoMTA, the constructor
    /// may run in a different Lua state than the `get_queue_config` that named it.
    pub async fn connect_with(
        &self,
        queue_name: &str,
        config: QueueConfig,
    ) -> Result<Connection, PolicyError> {
        self.connect_from(queue_name, Some(config)).await
    }

    async fn connect_from(
        &self,
        queue_name: &str,
        known: Option<QueueConfig>,
    ) -> Result<Connection, PolicyError> {
        // One generation throughout: a reload meanwhile leaves this connection outdated
        // (the dispatcher then replaces it), never built from two policies.
        let inner = self.inner();
        let thread = match inner.warm.take() {
            Some(thread) => thread,
            None => LuaThread::start(&format!("lua:{queue_name}"), &inner.setup).await?,
        };
        let config = match known {
            Some(config) => config,
            None => {
                let (chunk, queue) = (self.chunk(), queue_name.to_string());
                self.event(
                    &thread,
                    format!("event '{MULTI_HANDLER_EVENT}' for queue '{queue_name}'"),
                    move |lua| async move { queue_config_in(&chunk, &lua, &queue).await },
                )
                .await?
            }
        };
        let constructor = config
            .constructor
            .clone()
            .ok_or_else(|| PolicyError::NoProtocol {
                queue: queue_name.to_string(),
            })?;
        let (chunk, queue, name) = (self.chunk(), queue_name.to_string(), constructor.clone());
        let send_who = self
            .event(
                &thread,
                format!("constructor '{constructor}' (queue '{queue_name}')"),
                move |lua| async move { construct(&chunk, &lua, &name, &queue).await },
            )
            .await?;
        Ok(Connection::new(
            thread,
            inner.setup.chunk.clone(),
            queue_name.to_string(),
            config,
            send_who,
            inner.setup.limits.memory_limit_mib(),
            inner.warm.clone(),
        )
        .of_generation(inner.generation))
    }

    /// Lets the warm states of closed connections go (their threads exit and free their
    /// memory); returns how many there were. The dispatcher calls it once traffic calmed.
    pub fn drop_warm_states(&self) -> usize {
        self.inner().warm.clear()
    }

    /// A long-lived state, started or rebuilt if a call broke it.
    async fn shared(&self, which: Shared) -> Result<Arc<LuaThread>, PolicyError> {
        let inner = self.inner();
        let (slot, name) = match which {
            Shared::QueueConfig => (&inner.shared, "lua:shared"),
            Shared::LogHooks => (&inner.hooks, "lua:hooks"),
        };
        let had = {
            let current = slot.lock().unwrap_or_else(|e| e.into_inner());
            match current.as_ref() {
                Some(thread) if !thread.is_broken() => return Ok(thread.clone()),
                other => other.is_some(),
            }
        };
        if had {
            tracing::warn!(target: "policy", chunk = %inner.setup.chunk, thread = name,
                "rebuilding a shared Lua state: a call there timed out or hit the memory limit");
        }
        let thread = Arc::new(LuaThread::start(name, &inner.setup).await?);
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread.clone());
        Ok(thread)
    }

    /// Runs `f` on a long-lived state under the event bound.
    pub(crate) async fn on_shared<T, F, Fut>(
        &self,
        which: Shared,
        what: String,
        f: F,
    ) -> Result<T, PolicyError>
    where
        T: Send + 'static,
        F: FnOnce(Lua) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, PolicyError>> + 'static,
    {
        let thread = self.shared(which).await?;
        self.event(&thread, what, f).await
    }

    /// Runs `f` on `thread` within the event bound. A timeout, a deadline error that
    /// escaped as a Lua error, or a memory error breaks the state and says so.
    async fn event<T, F, Fut>(
        &self,
        thread: &LuaThread,
        what: String,
        f: F,
    ) -> Result<T, PolicyError>
    where
        T: Send + 'static,
        F: FnOnce(Lua) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, PolicyError>> + 'static,
    {
        let limits = self.limits();
        let chunk = self.chunk();
        match thread.call(limits.event_timeout, f).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(fatal(thread, &chunk, &what, &limits, e)),
            Err(Stop::Timeout { at, .. }) => Err(PolicyError::Timeout {
                chunk,
                what,
                after: limits.event_timeout,
                at: at.unwrap_or_else(|| "?".into()),
            }),
            Err(Stop::Gone) => Err(PolicyError::Thread {
                chunk,
                name: thread.name().to_string(),
                error: format!("the thread ended before {what} finished"),
            }),
        }
    }
}

/// Turns an error that means "this state is done for" (the hook's deadline error, a memory
/// error) into its own [`PolicyError`] and breaks the state; other errors pass unchanged.
fn fatal(
    thread: &LuaThread,
    chunk: &str,
    what: &str,
    limits: &PolicyLimits,
    e: PolicyError,
) -> PolicyError {
    let Some(lua_error) = e.lua_error() else {
        return e;
    };
    if let Some(deadline) = deadline_error(lua_error) {
        thread.mark_broken();
        return PolicyError::Timeout {
            chunk: chunk.to_string(),
            what: what.to_string(),
            after: limits.event_timeout,
            at: deadline.at.clone(),
        };
    }
    if is_memory_error(lua_error) {
        thread.mark_broken();
        let error = match e {
            PolicyError::Event { error, .. }
            | PolicyError::Constructor { error, .. }
            | PolicyError::Lua { error, .. }
            | PolicyError::Load { error, .. } => error,
            _ => unreachable!("lua_error() returned Some"),
        };
        return PolicyError::MemoryLimit {
            chunk: chunk.to_string(),
            what: what.to_string(),
            limit_mib: limits.memory_limit_mib(),
            error,
        };
    }
    e
}

/// Runs the `get_queue_config` handlers in `lua` (on its thread).
async fn queue_config_in(
    chunk: &str,
    lua: &Lua,
    queue_name: &str,
) -> Result<QueueConfig, PolicyError> {
    let name = QueueName::parse(queue_name);
    for handler in handlers(lua, MULTI_HANDLER_EVENT).map_err(|e| lua_error(chunk, e))? {
        let args = (
            name.domain.clone(),
            name.tenant.clone(),
            name.campaign.clone(),
            name.routing_domain.clone(),
        );
        let value: Value = handler
            .call_async(args)
            .await
            .map_err(|error| event_error(chunk, MULTI_HANDLER_EVENT, error))?;
        if value.is_nil() {
            continue;
        }
        return queue_config::from_lua_value(value).map_err(|got| match got {
            queue_config::FromValueError::Invalid(error) => {
                event_error(chunk, MULTI_HANDLER_EVENT, error)
            }
            queue_config::FromValueError::NotAConfig(got) => PolicyError::BadQueueConfig {
                chunk: chunk.to_string(),
                queue: queue_name.to_string(),
                got,
            },
        });
    }
    Ok(QueueConfig::default())
}

/// Runs the constructor event in `lua` and keeps the sender table it returns in the
/// state's registry ([`SENDER_KEY`]). Returns `sender.send (file:line)` for messages.
async fn construct(
    chunk: &str,
    lua: &Lua,
    constructor: &str,
    queue_name: &str,
) -> Result<String, PolicyError> {
    let handler =
        single_handler(chunk, lua, constructor)?.ok_or_else(|| PolicyError::NoConstructor {
            chunk: chunk.to_string(),
            constructor: constructor.to_string(),
            queue: queue_name.to_string(),
        })?;
    let name = QueueName::parse(queue_name);
    let value = handler
        .call_async::<Value>((name.domain, name.tenant, name.campaign))
        .await
        .map_err(|error| PolicyError::Constructor {
            chunk: chunk.to_string(),
            constructor: constructor.to_string(),
            queue: queue_name.to_string(),
            error: Box::new(error),
        })?;
    let returned = |got: String| PolicyError::ConstructorReturned {
        chunk: chunk.to_string(),
        constructor: constructor.to_string(),
        queue: queue_name.to_string(),
        defined_at: function_location(&handler),
        got,
    };
    let Value::Table(sender) = value else {
        return Err(returned(describe(&value)));
    };
    let send: Value = sender.get("send").map_err(|e| lua_error(chunk, e))?;
    let Value::Function(send) = send else {
        return Err(returned(format!(
            "a table whose 'send' is {}",
            describe(&send)
        )));
    };
    lua.set_named_registry_value(SENDER_KEY, sender)
        .map_err(|e| lua_error(chunk, e))?;
    Ok(format!("sender.send ({})", function_location(&send)))
}

/// Where a connection's state keeps its sender table.
pub(crate) const SENDER_KEY: &str = "spoolrelay.sender";

pub(crate) fn single_handler(
    chunk: &str,
    lua: &Lua,
    event: &str,
) -> Result<Option<Function>, PolicyError> {
    Ok(handlers(lua, event)
        .map_err(|e| lua_error(chunk, e))?
        .into_iter()
        .next())
}

pub(crate) fn event_error(chunk: &str, event: &str, error: mlua::Error) -> PolicyError {
    PolicyError::Event {
        chunk: chunk.to_string(),
        event: event.to_string(),
        error: Box::new(error),
    }
}

pub(crate) fn lua_error(chunk: &str, error: mlua::Error) -> PolicyError {
    PolicyError::Lua {
        chunk: chunk.to_string(),
        error: Box::new(error),
    }
}

/// The handlers registered for `event`, in registration order.
pub(crate) fn handlers(lua: &Lua, event: &str) -> mlua::Result<Vec<Function>> {
    let state = lua
        .app_data_ref::<HostState>()
        .expect("host state is installed");
    match state.handlers.get(event) {
        None => Ok(Vec::new()),
        Some(list) => list.iter().map(|h| lua.registry_value(&h.func)).collect(),
    }
}

/// Coroutines kept for reuse per state: about what a connection has in flight (256).
///
/// The pool grows on demand: mlua 0.12 creates a coroutine when the pool is empty and keeps
/// a finished one only while fewer than this many wait (`create_recycled_thread` /
/// `recycle_thread` in mlua's `state/raw.rs`); at state creation it reserves 256 slots of
/// one `int` each, not 256 coroutines. A connection that sent one message holds one.
const COROUTINE_POOL: usize = 256;

/// A fresh state with `kumo.*` installed, the sandbox and limits applied, and the policy
/// chunk run in it (within `deadline`). Runs on the state's own thread.
///
/// Tuned for a connection's hot path, where every `send` is a short-lived coroutine that
/// leaves garbage behind (the message userdata, the record table, strings): coroutines are
/// recycled from a pool instead of created per call, and the generational collector
/// reclaims young garbage without re-marking the whole heap each cycle (the P2 profile
/// in docs/performance.md shows Lua's share of the send path).
pub(crate) async fn new_state(
    setup: &Setup,
    watch: Arc<Watch>,
    deadline: Instant,
) -> Result<Lua, PolicyError> {
    let chunk = setup.chunk.as_str();
    let lua_err = |error| lua_error(chunk, error);
    let options = mlua::LuaOptions::default().thread_pool_size(COROUTINE_POOL);
    let lua = Lua::new_with(mlua::StdLib::ALL_SAFE, options).map_err(lua_err)?;
    lua.gc_set_mode(mlua::state::GcMode::Generational(Default::default()));
    lua.set_app_data(HostState {
        loading: true,
        handlers: HashMap::new(),
        init: InitConfig::default(),
    });
    install_kumo(&lua).map_err(lua_err)?;
    sandbox(&lua, setup.dir.as_deref()).map_err(lua_err)?;
    install_limits(&lua, watch.clone(), &setup.limits).map_err(lua_err)?;
    let run = lua
        .load(&*setup.source)
        .set_name(format!("@{chunk}"))
        .exec_async();
    let run = Bounded::new(run, deadline, watch).await;
    if let Some(mut state) = lua.app_data_mut::<HostState>() {
        state.loading = false;
    }
    let what = "loading the policy";
    match run {
        Ok(Ok(())) => Ok(lua),
        Err(overdue) => Err(PolicyError::Timeout {
            chunk: chunk.to_string(),
            what: what.into(),
            after: setup.limits.event_timeout,
            at: overdue.at.unwrap_or_else(|| "?".into()),
        }),
        Ok(Err(error)) => {
            if let Some(d) = deadline_error(&error) {
                return Err(PolicyError::Timeout {
                    chunk: chunk.to_string(),
                    what: what.into(),
                    after: setup.limits.event_timeout,
                    at: d.at.clone(),
                });
            }
            if is_memory_error(&error) {
                return Err(PolicyError::MemoryLimit {
                    chunk: chunk.to_string(),
                    what: what.into(),
                    limit_mib: setup.limits.memory_limit_mib(),
                    error: Box::new(error),
                });
            }
            Err(PolicyError::Load {
                chunk: chunk.to_string(),
                error: Box::new(error),
            })
        }
    }
}

/// No process control, and `require` only from the policy's directory (Lua files only).
/// See docs/lua-api.md, "What a policy can use".
fn sandbox(lua: &Lua, dir: Option<&Path>) -> mlua::Result<()> {
    let globals = lua.globals();
    let os: Table = globals.get("os")?;
    os.set("exit", Value::Nil)?;
    os.set("execute", Value::Nil)?;
    let io: Table = globals.get("io")?;
    io.set("popen", Value::Nil)?;
    let package: Table = globals.get("package")?;
    package.set("loadlib", Value::Nil)?;
    package.set("cpath", "")?;
    let path = match dir {
        Some(dir) => {
            let dir = dir.display().to_string();
            format!("{dir}/?.lua;{dir}/?/init.lua")
        }
        None => String::new(),
    };
    package.set("path", path)?;
    Ok(())
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
    crate::http::install(lua, &kumo)?;
    crate::log_hook::install(lua, &kumo)?;
    lua.globals().set("kumo", kumo)?;
    Ok(())
}

/// `kumo.on(event, fn)`: only while loading; one handler per event except those in
/// [`MULTI_HANDLER_EVENTS`].
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
    if !MULTI_HANDLER_EVENTS.contains(&event.as_str()) {
        if let Some(first) = list.first() {
            return Err(mlua::Error::runtime(format!(
                "kumo.on('{event}') at {location}: event '{event}' already has a handler, registered at {}; only {} may have several",
                first.location,
                MULTI_HANDLER_EVENTS
                    .iter()
                    .map(|e| format!("'{e}'"))
                    .collect::<Vec<_>>()
                    .join(" and ")
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
