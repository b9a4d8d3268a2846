//! Errors of the policy host. Lua errors keep mlua's rendering, which carries the
//! `file:line:` prefix and the Lua traceback.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while loading a policy or setting up a connection.
/// (Failures of an individual send are not errors: they are [`crate::SendOutcome`]s.)
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Io {
        /// The policy file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },

    /// [`crate::Policy::reload`] on a policy built from source (it has no file to read).
    #[error("policy {chunk} was not loaded from a file, so it cannot be reloaded")]
    NotReloadable {
        /// The policy's chunk name.
        chunk: String,
    },

    /// The chunk did not compile, or raised while running at load time.
    #[error("loading policy {chunk}: {error}")]
    Load {
        /// The policy's chunk name (its file name).
        chunk: String,
        /// The Lua error, with its `file:line:` prefix and traceback.
        error: Box<mlua::Error>,
    },

    /// An event handler (`init`, `get_queue_config`, ...) raised.
    #[error("policy {chunk}: event '{event}' failed: {error}")]
    Event {
        /// The policy's chunk name (its file name).
        chunk: String,
        /// The event whose handler raised.
        event: String,
        /// The Lua error, with its `file:line:` prefix and traceback.
        error: Box<mlua::Error>,
    },

    /// `get_queue_config` returned something that is not a queue config.
    #[error("policy {chunk}: get_queue_config for queue '{queue}' returned {got}, expected kumo.make_queue_config{{...}} or nil")]
    BadQueueConfig {
        /// The policy's chunk name (its file name).
        chunk: String,
        /// The queue it was for.
        queue: String,
        /// What was returned instead, described.
        got: String,
    },

    /// `get_queue_config` gave the queue no `protocol.custom_lua.constructor`.
    #[error("queue '{queue}' has no protocol: get_queue_config returned no protocol.custom_lua.constructor")]
    NoProtocol {
        /// The queue without a protocol.
        queue: String,
    },

    /// No handler is registered for the constructor event the queue config names.
    #[error("policy {chunk}: constructor '{constructor}' (queue '{queue}') has no handler: add kumo.on('{constructor}', function(domain, tenant, campaign) ... end)")]
    NoConstructor {
        /// The policy's chunk name (its file name).
        chunk: String,
        /// The constructor event's name.
        constructor: String,
        /// The queue it was for.
        queue: String,
    },

    /// The constructor raised.
    #[error("policy {chunk}: constructor '{constructor}' (queue '{queue}') failed: {error}")]
    Constructor {
        /// The policy's chunk name (its file name).
        chunk: String,
        /// The constructor event's name.
        constructor: String,
        /// The queue it was for.
        queue: String,
        /// The Lua error, with its `file:line:` prefix and traceback.
        error: Box<mlua::Error>,
    },

    /// The constructor returned something other than a sender table.
    #[error("policy {chunk}: constructor '{constructor}' (queue '{queue}', defined at {defined_at}) returned {got}, expected a sender table with a send(message) method")]
    ConstructorReturned {
        /// The policy's chunk name (its file name).
        chunk: String,
        /// The constructor event's name.
        constructor: String,
        /// The queue it was for.
        queue: String,
        /// Where the constructor's handler is defined (`file:line`).
        defined_at: String,
        /// What was returned instead, described.
        got: String,
    },

    /// Policy code ran past its bound; `at` is where it was stopped (`file:line`, or `?`).
    /// The state it ran in is thrown away; the caller retries later on a new one.
    #[error("policy {chunk}: {what} did not finish within {} (stopped at {at}); its Lua state is discarded and the call is retried later (fix the loop, or raise --lua-event-timeout if it needs longer)", humantime::format_duration(*.after))]
    Timeout {
        /// The policy's chunk name (its file name).
        chunk: String,
        /// What was running (an event, a send).
        what: String,
        /// The bound it ran past.
        after: Duration,
        /// Where it was stopped (`file:line`, or `?`).
        at: String,
    },

    /// A Lua state reached its memory limit (`--lua-memory-limit`).
    #[error("policy {chunk}: Lua memory limit of {limit_mib} MiB reached in {what}; its Lua state is discarded (raise --lua-memory-limit if the policy really needs more): {error}")]
    MemoryLimit {
        /// The policy's chunk name (its file name).
        chunk: String,
        /// What was running (an event, a send).
        what: String,
        /// The limit, in MiB.
        limit_mib: usize,
        /// The Lua error, with its `file:line:` prefix and traceback.
        error: Box<mlua::Error>,
    },

    /// The OS thread that owns a Lua state could not start or went away.
    #[error("policy {chunk}: Lua thread '{name}': {error}")]
    Thread {
        /// The policy's chunk name (its file name).
        chunk: String,
        /// The thread's name.
        name: String,
        /// What the OS said.
        error: String,
    },

    /// Failure of the host itself while talking to Lua (out of memory, ...).
    #[error("policy {chunk}: lua: {error}")]
    Lua {
        /// The policy's chunk name (its file name).
        chunk: String,
        /// The Lua error, with its `file:line:` prefix and traceback.
        error: Box<mlua::Error>,
    },
}

impl PolicyError {
    /// The Lua error inside, if this error carries one.
    pub fn lua_error(&self) -> Option<&mlua::Error> {
        match self {
            PolicyError::Load { error, .. }
            | PolicyError::Event { error, .. }
            | PolicyError::Constructor { error, .. }
            | PolicyError::Lua { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Whether this is a timeout (the state it ran in was discarded).
    pub fn is_timeout(&self) -> bool {
        matches!(self, PolicyError::Timeout { .. })
    }
}
