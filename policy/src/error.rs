//! Errors of the policy host. Lua errors keep mlua's rendering, which carries the
//! `file:line:` prefix and the Lua traceback.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while loading a policy or setting up a connection.
/// (Failures of an individual send are not errors: they are [`crate::SendOutcome`]s.)
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The chunk did not compile, or raised while running at load time.
    #[error("loading policy {chunk}: {error}")]
    Load {
        chunk: String,
        error: Box<mlua::Error>,
    },

    /// An event handler (`init`, `get_queue_config`, ...) raised.
    #[error("policy {chunk}: event '{event}' failed: {error}")]
    Event {
        chunk: String,
        event: String,
        error: Box<mlua::Error>,
    },

    /// `get_queue_config` returned something that is not a queue config.
    #[error("policy {chunk}: get_queue_config for queue '{queue}' returned {got}, expected kumo.make_queue_config{{...}} or nil")]
    BadQueueConfig {
        chunk: String,
        queue: String,
        got: String,
    },

    #[error("queue '{queue}' has no protocol: get_queue_config returned no protocol.custom_lua.constructor")]
    NoProtocol { queue: String },

    #[error("policy {chunk}: constructor '{constructor}' (queue '{queue}') has no handler: add kumo.on('{constructor}', function(domain, tenant, campaign) ... end)")]
    NoConstructor {
        chunk: String,
        constructor: String,
        queue: String,
    },

    /// The constructor raised.
    #[error("policy {chunk}: constructor '{constructor}' (queue '{queue}') failed: {error}")]
    Constructor {
        chunk: String,
        constructor: String,
        queue: String,
        error: Box<mlua::Error>,
    },

    /// The constructor returned something other than a sender table.
    #[error("policy {chunk}: constructor '{constructor}' (queue '{queue}', defined at {defined_at}) returned {got}, expected a sender table with a send(message) method")]
    ConstructorReturned {
        chunk: String,
        constructor: String,
        queue: String,
        defined_at: String,
        got: String,
    },

    #[error("policy {chunk}: {what} did not finish within {}", humantime::format_duration(*.after))]
    Timeout {
        chunk: String,
        what: String,
        after: Duration,
    },

    /// Failure of the host itself while talking to Lua (out of memory, ...).
    #[error("policy {chunk}: lua: {error}")]
    Lua {
        chunk: String,
        error: Box<mlua::Error>,
    },
}
