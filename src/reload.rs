//! Policy reload from outside: `SIGHUP` and `POST /api/admin/reload` both end here.
//!
//! The policy crate does the work ([`Policy::reload`]: load and check in a fresh Lua state,
//! swap only on success); the dispatcher follows on its own (queue workers watch
//! [`Policy::generations`]). This module only logs the result the same way for both
//! triggers, so an operator who sent a signal finds the refusal in the log.

use policy::{Policy, PolicyError, Reloaded};

use crate::shutdown::Shutdown;

/// Reloads the policy file and logs the outcome. A refused policy leaves the old one
/// running; the error names the file and line.
pub async fn reload(policy: &Policy, trigger: &str) -> Result<Reloaded, PolicyError> {
    match policy.reload().await {
        Ok(done) => {
            tracing::info!(chunk = %done.chunk, generation = done.generation, trigger,
                "policy reloaded; connections reconnect through the new policy once their in-flight sends end");
            Ok(done)
        }
        Err(e) => {
            tracing::error!(error = %e, trigger,
                "policy reload refused; the previous policy keeps running (fix the file and reload again)");
            Err(e)
        }
    }
}

/// Reloads on every `SIGHUP` until shutdown. Without a signal handler (not unix, or the
/// handler cannot be installed) only the admin API reloads.
pub fn on_sighup(policy: Policy, shutdown: Shutdown) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(hup) => hup,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /api/admin/reload");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = hup.recv() => if got.is_none() { return },
                    _ = shutdown.wait() => return,
                }
                let _ = reload(&policy, "SIGHUP").await;
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (policy, shutdown);
}
