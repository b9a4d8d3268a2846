//! Policy reload: a new generation of the policy, checked before it replaces the old one.
//!
//! A [`Policy`] is a handle on a [`Cell`] that holds the current [`Loaded`] generation. Every
//! call takes the current one at its start and keeps it to its end, so a call never mixes
//! two policies. [`Policy::reload`] reads the file again, runs it in a fresh Lua state (the
//! new `lua:shared`), and only if that succeeds swaps it in; a policy that fails to load
//! leaves the old one running and comes back as the error (`file:line`).
//!
//! What happens to work in progress is the dispatcher's choice, not ours: connections carry
//! the generation they were built from ([`crate::Connection::generation`]), and
//! [`Policy::generations`] ticks on each swap, so a queue can retire its outdated
//! connections (their in-flight sends finish on the old state) and ask its config again.
//! The old generation's states go away with its last connection.
//!
//! Settings of the `init` event (spool path, listener, log hook names) are read once at
//! start-up; a reload does not apply them again (they need a restart).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::error::PolicyError;
use crate::host::Loaded;
use crate::worker::{LuaThread, Setup};
use crate::Policy;

/// What every clone of a [`Policy`] shares.
pub(crate) struct Cell {
    current: RwLock<Arc<Loaded>>,
    /// The file to read again on reload; `None` for in-memory policies.
    path: Option<PathBuf>,
    /// The current generation, for those who wait for a reload.
    generation: watch::Sender<u64>,
    /// One reload at a time: two racing ones would number their generations alike.
    reloading: tokio::sync::Mutex<()>,
}

/// What a successful reload reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The chunk name of the policy now running.
    pub chunk: String,
    /// The new generation (1 after the first reload).
    pub generation: u64,
}

impl Policy {
    pub(crate) fn new(loaded: Loaded, path: Option<&Path>) -> Policy {
        let generation = watch::channel(loaded.generation).0;
        Policy {
            cell: Arc::new(Cell {
                current: RwLock::new(Arc::new(loaded)),
                path: path.map(Path::to_path_buf),
                generation,
                reloading: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The generation every call made now uses.
    pub(crate) fn inner(&self) -> Arc<Loaded> {
        self.cell
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current generation: 0 until the first successful [`Policy::reload`].
    pub fn generation(&self) -> u64 {
        *self.cell.generation.borrow()
    }

    /// Ticks with the new generation on every successful reload.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.cell.generation.subscribe()
    }

    /// Reads the policy file again and runs it in a fresh Lua state, under the same bounds;
    /// on success the new policy replaces the old one for every later call. On failure
    /// (unreadable file, syntax error, error at load time: with `file:line`) the old one
    /// keeps running. A policy built from source has no file and cannot be reloaded.
    pub async fn reload(&self) -> Result<Reloaded, PolicyError> {
        let path = self
            .cell
            .path
            .clone()
            .ok_or_else(|| PolicyError::NotReloadable {
                chunk: self.chunk_name(),
            })?;
        let source = tokio::fs::read_to_string(&path)
            .await
            .map_err(|source| PolicyError::Io {
                path: path.clone(),
                source,
            })?;
        self.reload_source(&source).await
    }

    /// Like [`Policy::reload`] with the new source given (same chunk name and directory).
    pub async fn reload_source(&self, source: &str) -> Result<Reloaded, PolicyError> {
        let _one = self.cell.reloading.lock().await;
        let old = self.inner();
        let old_setup = old.setup();
        let setup = Setup::new(
            &old_setup.chunk,
            source,
            old_setup.dir.clone(),
            old_setup.limits,
        );
        let shared = LuaThread::start("lua:shared", &setup).await?;
        let generation = old.generation + 1;
        let loaded = Arc::new(Loaded::new(generation, setup, shared));
        *self.cell.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        self.cell.generation.send_replace(generation);
        Ok(Reloaded {
            chunk: self.chunk_name(),
            generation,
        })
    }
}
