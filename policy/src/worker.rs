//! Lua threads: every Lua state lives on an OS thread of its own, never on the daemon's
//! async runtime.
//!
//! A [`LuaThread`] is a `std::thread` (named `lua:<queue>`, `lua:shared`, `lua:hooks`, `lua:init`) that
//! builds one Lua state, runs the policy chunk in it and then serves requests: each
//! request is a closure that receives the state and returns a future, sent over a channel
//! and answered over a oneshot. The thread runs a current-thread tokio runtime with a
//! `LocalSet`, so many requests are in flight at once as Lua coroutines (mlua
//! `call_async`): a send awaiting a Kafka delivery report or an AMQP confirm yields and
//! the next one runs. Broker clients created by the policy (lapin's connection tasks,
//! rdkafka's timers) run on this thread's runtime, so a connection opened there is driven
//! by that thread.
//!
//! ## Deadlines that hold
//!
//! Every request carries a deadline, fixed by the caller when it asks. Two mechanisms
//! enforce it, one on each side:
//!
//! * **In the thread.** [`Bounded`] wraps the request's future: on each poll it records
//!   the deadline as the state's *current* one (in [`Watch`]); an instruction-count hook
//!   (every [`HOOK_EVERY`] VM instructions, installed with `Lua::set_global_hook`, which
//!   mlua applies to every coroutine it creates, pooled ones included) compares the clock
//!   with it. Past the deadline the hook first *yields* the coroutine (mlua 0.12 supports
//!   `VmState::Yield` from count hooks on Lua 5.4; the async poll returns `Pending`) and
//!   [`Bounded`] then ends the request with [`Overdue`], dropping the coroutine. A yield
//!   cannot be swallowed by `pcall`. Where Lua cannot yield (inside a metamethod or a
//!   callback called from C) the yield is ignored, so every other visit raises a Lua error
//!   instead; that one `pcall` could catch, but it is raised again a few thousand
//!   instructions later, for as long as the code runs.
//! * **At the caller.** The caller waits at most until the deadline plus [`REPORT_GRACE`]
//!   for the answer, whatever the thread does. The grace only gives the thread time to say
//!   *where* it stopped the code (`file:line`); a thread stuck beyond it (a C function
//!   that never returns, an unyieldable `pcall` loop) is abandoned: it holds nothing the
//!   relay needs, and it exits when it next gets control.
//!
//! A state whose request ran out of time, hit the memory limit, or whose thread went away
//! is **broken** ([`LuaThread::is_broken`]): its users stop sending to it and build a new
//! one. Dropping the last handle closes the channel; the thread then drops its state and
//! exits.
//!
//! ## Memory
//!
//! Each state has `Lua::set_memory_limit` ([`PolicyLimits::memory_limit`]): an allocation
//! past it fails with a Lua memory error inside the call that made it.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mlua::{HookTriggers, Lua, VmState};
use tokio::sync::{mpsc, oneshot};

use crate::error::PolicyError;

/// The hook runs every this many VM instructions: a few µs of Lua between checks, a
/// negligible cost (one clock read per visit).
pub const HOOK_EVERY: u32 = 10_000;

/// How long after a request's deadline the caller still waits to learn where the policy
/// was stopped. The caller's own answer never waits longer than deadline + this.
pub const REPORT_GRACE: Duration = Duration::from_millis(250);

/// Default bound on `init`, `get_queue_config`, the constructors, log hooks and the
/// policy chunk itself.
pub const DEFAULT_EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default memory limit per Lua state.
pub const DEFAULT_MEMORY_LIMIT: usize = 256 << 20;

/// Bounds for policy code, given at load ([`crate::Policy::load_with`]). `send` and
/// `send_batch` are bounded by the queue's own `send_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyLimits {
    /// Bound on the policy chunk, `init`, `get_queue_config`, constructors and log hooks.
    pub event_timeout: Duration,
    /// Bytes one Lua state may allocate.
    pub memory_limit: usize,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            event_timeout: DEFAULT_EVENT_TIMEOUT,
            memory_limit: DEFAULT_MEMORY_LIMIT,
        }
    }
}

impl PolicyLimits {
    /// The memory limit in MiB, for messages.
    pub fn memory_limit_mib(&self) -> usize {
        self.memory_limit >> 20
    }
}

/// The error the hook raises when it cannot yield a call that is past its deadline.
#[derive(Debug, Clone, thiserror::Error)]
#[error("policy code stopped at {at}: past its deadline")]
pub(crate) struct DeadlineExceeded {
    pub at: String,
}

/// What a [`Bounded`] request ended with when it ran out of time.
#[derive(Debug)]
pub(crate) struct Overdue {
    pub at: Option<String>,
}

/// Why a request got no answer.
#[derive(Debug)]
pub(crate) enum Stop {
    /// Past its deadline; `at` is where the hook stopped the code, if it got that far.
    /// `stuck`: the thread did not even answer by deadline + [`REPORT_GRACE`] (code in a C
    /// function, or a loop where Lua cannot yield).
    Timeout { at: Option<String>, stuck: bool },
    /// The thread is gone (its state failed to build, or it was abandoned).
    Gone,
}

/// Shared between a state's hook, its [`Bounded`] requests and its users.
pub(crate) struct Watch {
    base: Instant,
    /// Deadline of the request being polled, as nanoseconds since `base` plus one;
    /// 0 while no request is polled.
    current: AtomicU64,
    /// Where the hook last stopped code that was past its deadline, with that call's
    /// encoded deadline (so a request reports only its own stop).
    stopped_at: Mutex<Option<(u64, String)>>,
    /// How often the hook found the running code past its deadline (alternates yield/raise).
    overdue_visits: AtomicU64,
    broken: AtomicBool,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            base: Instant::now(),
            current: AtomicU64::new(0),
            stopped_at: Mutex::new(None),
            overdue_visits: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        }
    }

    fn encode(&self, deadline: Instant) -> u64 {
        let nanos = deadline.saturating_duration_since(self.base).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1
    }

    fn current(&self) -> Option<Instant> {
        match self.current.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.base + Duration::from_nanos(n - 1)),
        }
    }

    fn enter(&self, deadline: Instant) -> u64 {
        self.current.swap(self.encode(deadline), Ordering::Relaxed)
    }

    fn leave(&self, previous: u64) {
        self.current.store(previous, Ordering::Relaxed);
    }

    /// Where the hook last stopped a call (any call).
    fn stopped_at(&self) -> Option<String> {
        let last = self.stopped_at.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref().map(|(_, at)| at.clone())
    }

    /// Where the hook stopped the call with this deadline, if it did.
    fn stopped_at_for(&self, deadline: Instant) -> Option<String> {
        let code = self.encode(deadline);
        let last = self.stopped_at.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|(c, _)| *c == code)
            .map(|(_, at)| at.clone())
    }

    fn set_stopped_at(&self, code: u64, at: String) {
        *self.stopped_at.lock().unwrap_or_else(|e| e.into_inner()) = Some((code, at));
    }
}

/// Installs the deadline hook and the memory limit on a fresh state.
pub(crate) fn install_limits(
    lua: &Lua,
    watch: Arc<Watch>,
    limits: &PolicyLimits,
) -> mlua::Result<()> {
    lua.set_memory_limit(limits.memory_limit)?;
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        move |_lua, debug| {
            let code = watch.current.load(Ordering::Relaxed);
            let Some(deadline) = watch.current() else {
                return Ok(VmState::Continue);
            };
            if Instant::now() < deadline {
                return Ok(VmState::Continue);
            }
            let source = debug.source();
            let file = source.short_src.as_deref().unwrap_or("?").to_string();
            let at = match debug.current_line() {
                Some(line) => format!("{file}:{line}"),
                None => file,
            };
            watch.set_stopped_at(code, at.clone());
            if watch
                .overdue_visits
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(2)
            {
                // Ignored by Lua where the code cannot yield; then the next visit raises.
                Ok(VmState::Yield)
            } else {
                Err(mlua::Error::external(DeadlineExceeded { at }))
            }
        },
    )
}

/// A request's future under its deadline (see the module docs).
pub(crate) struct Bounded<F> {
    inner: Pin<Box<F>>,
    deadline: Instant,
    watch: Arc<Watch>,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<F: Future> Bounded<F> {
    pub(crate) fn new(inner: F, deadline: Instant, watch: Arc<Watch>) -> Self {
        Bounded {
            inner: Box::pin(inner),
            deadline,
            watch,
            timer: Box::pin(tokio::time::sleep_until(deadline.into())),
        }
    }

    fn overdue(&self) -> Overdue {
        Overdue {
            at: self.watch.stopped_at_for(self.deadline),
        }
    }
}

impl<F: Future> Future for Bounded<F> {
    type Output = Result<F::Output, Overdue>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if Instant::now() >= this.deadline {
            return Poll::Ready(Err(this.overdue()));
        }
        let previous = this.watch.enter(this.deadline);
        let polled = this.inner.as_mut().poll(cx);
        this.watch.leave(previous);
        if let Poll::Ready(value) = polled {
            return Poll::Ready(Ok(value));
        }
        if Instant::now() >= this.deadline || this.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(this.overdue()));
        }
        Poll::Pending
    }
}

/// What a thread needs to build its state: the policy and its bounds.
#[derive(Clone)]
pub(crate) struct Setup {
    pub chunk: String,
    pub source: Arc<str>,
    /// The policy file's directory: `require` looks there.
    pub dir: Option<PathBuf>,
    pub limits: PolicyLimits,
}

impl Setup {
    /// `chunk_name` loses a leading `@` or `=` (Lua's chunk-name markers).
    pub(crate) fn new(
        chunk_name: &str,
        source: &str,
        dir: Option<PathBuf>,
        limits: PolicyLimits,
    ) -> Setup {
        Setup {
            chunk: chunk_name.trim_start_matches(['@', '=']).to_string(),
            source: source.into(),
            dir,
            limits,
        }
    }
}

type Job = Box<dyn FnOnce(Lua) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// How a new thread reports that its state is built (or why not).
enum Ready {
    Blocking(std::sync::mpsc::SyncSender<Result<(), PolicyError>>),
    Async(oneshot::Sender<Result<(), PolicyError>>),
}

impl Ready {
    fn send(self, result: Result<(), PolicyError>) {
        match self {
            Ready::Blocking(tx) => drop(tx.send(result)),
            Ready::Async(tx) => drop(tx.send(result)),
        }
    }
}

/// The handle of one Lua state's thread. Dropping it lets the thread exit.
pub(crate) struct LuaThread {
    name: String,
    chunk: String,
    tx: mpsc::UnboundedSender<Job>,
    watch: Arc<Watch>,
}

impl std::fmt::Debug for LuaThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuaThread")
            .field("name", &self.name)
            .field("broken", &self.is_broken())
            .finish()
    }
}

impl LuaThread {
    /// Starts a thread and waits (blocking the caller) until its state is built.
    pub(crate) fn start_blocking(name: &str, setup: &Setup) -> Result<LuaThread, PolicyError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let limit = setup.limits.event_timeout + REPORT_GRACE;
        let thread = Self::spawn(name, setup, Ready::Blocking(tx))?;
        match rx.recv_timeout(limit) {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => Err(e),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(thread.load_timeout(setup)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(thread.gone("loading")),
        }
    }

    /// Starts a thread and waits until its state is built.
    pub(crate) async fn start(name: &str, setup: &Setup) -> Result<LuaThread, PolicyError> {
        let (tx, rx) = oneshot::channel();
        let limit = setup.limits.event_timeout + REPORT_GRACE;
        let thread = Self::spawn(name, setup, Ready::Async(tx))?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(Ok(()))) => Ok(thread),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(thread.gone("loading")),
            Err(_) => Err(thread.load_timeout(setup)),
        }
    }

    fn spawn(name: &str, setup: &Setup, ready: Ready) -> Result<LuaThread, PolicyError> {
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        let watch = Arc::new(Watch::new());
        let thread = LuaThread {
            name: name.to_string(),
            chunk: setup.chunk.clone(),
            tx,
            watch: watch.clone(),
        };
        let setup = setup.clone();
        // Policy log lines go where the caller's go (its scoped subscriber, in tests).
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _log = tracing::dispatcher::set_default(&dispatch);
                serve(setup, watch, rx, ready)
            })
            .map_err(|e| PolicyError::Thread {
                chunk: thread.chunk.clone(),
                name: thread.name.clone(),
                error: e.to_string(),
            })?;
        Ok(thread)
    }

    fn load_timeout(&self, setup: &Setup) -> PolicyError {
        self.mark_broken();
        PolicyError::Timeout {
            chunk: setup.chunk.clone(),
            what: format!("loading the policy (thread {})", self.name),
            after: setup.limits.event_timeout,
            at: self.watch.stopped_at().unwrap_or_else(|| "?".into()),
        }
    }

    fn gone(&self, what: &str) -> PolicyError {
        self.mark_broken();
        PolicyError::Thread {
            chunk: self.chunk.clone(),
            name: self.name.clone(),
            error: format!("the thread ended while {what}"),
        }
    }

    /// Runs `f` on the thread within `limit`. The answer comes at the latest
    /// [`REPORT_GRACE`] after the deadline; a timeout breaks the state.
    pub(crate) async fn call<T, F, Fut>(&self, limit: Duration, f: F) -> Result<T, Stop>
    where
        T: Send + 'static,
        F: FnOnce(Lua) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let deadline = Instant::now() + limit;
        let (tx, rx) = oneshot::channel();
        let watch = self.watch.clone();
        let job: Job = Box::new(move |lua| {
            Box::pin(async move {
                let result = Bounded::new(f(lua), deadline, watch).await;
                let _ = tx.send(result);
            })
        });
        if self.tx.send(job).is_err() {
            self.mark_broken();
            return Err(Stop::Gone);
        }
        let stop = match tokio::time::timeout_at((deadline + REPORT_GRACE).into(), rx).await {
            Ok(Ok(Ok(value))) => return Ok(value),
            Ok(Ok(Err(overdue))) => Stop::Timeout {
                at: overdue.at,
                stuck: false,
            },
            Ok(Err(_)) => Stop::Gone,
            Err(_) => Stop::Timeout {
                at: self.watch.stopped_at_for(deadline),
                stuck: true,
            },
        };
        self.mark_broken();
        Err(stop)
    }

    /// Whether this state must not be used any more (see the module docs).
    pub(crate) fn is_broken(&self) -> bool {
        self.watch.broken.load(Ordering::Relaxed) || self.tx.is_closed()
    }

    pub(crate) fn mark_broken(&self) {
        self.watch.broken.store(true, Ordering::Relaxed);
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

/// The thread's body: build the state, then serve requests until every handle is gone.
fn serve(setup: Setup, watch: Arc<Watch>, mut rx: mpsc::UnboundedReceiver<Job>, ready: Ready) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            ready.send(Err(PolicyError::Thread {
                chunk: setup.chunk.clone(),
                name: std::thread::current().name().unwrap_or("lua").to_string(),
                error: format!("cannot start its runtime: {e}"),
            }));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let deadline = Instant::now() + setup.limits.event_timeout;
        let lua = match crate::host::new_state(&setup, watch.clone(), deadline).await {
            Ok(lua) => lua,
            Err(e) => {
                watch.broken.store(true, Ordering::Relaxed);
                ready.send(Err(e));
                return;
            }
        };
        ready.send(Ok(()));
        while let Some(job) = rx.recv().await {
            tokio::task::spawn_local(job(lua.clone()));
        }
    });
}

/// Connection states kept warm for the next connection of any queue (see [`WarmStates`]).
pub const WARM_STATES: usize = 64;

/// Lua states of closed connections, ready for the next connection, so a burst over many
/// queues does not build a thread, a runtime and a state (and run the policy chunk) for
/// each one. A state is only ever used by one connection at a time, and a broken one (a
/// call ran out of time or memory) is never kept, so a runaway policy still costs only its
/// own queue. Like KumoMTA's pooled Lua contexts, a reused state keeps what earlier
/// connections left in its globals: policies should keep per-queue data in the sender.
/// At most [`WARM_STATES`] are kept (a few MiB); the rest exit, and
/// [`crate::Policy::drop_warm_states`] lets them all go once the burst is over.
#[derive(Default)]
pub(crate) struct WarmStates {
    threads: Mutex<Vec<LuaThread>>,
}

impl WarmStates {
    /// A warm state that is still healthy, if any.
    pub(crate) fn take(&self) -> Option<LuaThread> {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(thread) = threads.pop() {
            if !thread.is_broken() {
                return Some(thread);
            }
        }
        None
    }

    /// Lets every warm state go (their threads exit); returns how many there were.
    pub(crate) fn clear(&self) -> usize {
        std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner())).len()
    }

    /// Keeps `thread` for a later connection, unless it is broken or enough are kept.
    pub(crate) fn put(&self, thread: LuaThread) {
        if thread.is_broken() {
            return;
        }
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if threads.len() < WARM_STATES {
            threads.push(thread);
        }
    }
}

/// Whether `e` (or what it wraps) is the hook's deadline error.
pub(crate) fn deadline_error(e: &mlua::Error) -> Option<&DeadlineExceeded> {
    e.downcast_ref::<DeadlineExceeded>()
}

/// Whether `e` (or what it wraps) is a Lua memory error.
pub(crate) fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. }
        | mlua::Error::WithContext { cause, .. }
        | mlua::Error::BadArgument { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}
