//! The shutdown signal: one small type every long-running task holds a clone of.
//!
//! Triggering is idempotent and sticky, so a task that starts waiting after the signal
//! fired still sees it (a plain `Notify` would lose that race).

use tokio::sync::watch;

/// The shutdown signal: cheap to clone; every clone sees the trigger.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal not yet triggered.
    pub fn new() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        Shutdown {
            tx: std::sync::Arc::new(tx),
            rx,
        }
    }

    /// Asks every holder to stop. Safe to call more than once.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether shutdown was asked.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once [`trigger`](Self::trigger) was called (immediately if it already was).
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // The sender lives in `self`, so `wait_for` can only end by seeing `true`.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

/// Resolves on SIGINT or SIGTERM: what `main` passes to the daemon.
pub async fn os_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the daemon");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
