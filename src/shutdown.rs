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

/// Listens for SIGINT and SIGTERM from this call on, and returns what resolves on the
/// first of them: what `main` passes to the daemon. The handlers are installed here, not
/// when the future is first polled: a SIGTERM sent the moment the daemon says it listens
/// (a test, or systemd right after READY=1) would otherwise find the default action and
/// kill the process without its clean stop.
#[cfg(unix)]
pub fn os_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let listen = |name: &str, kind: SignalKind| -> Option<Signal> {
        signal(kind)
            .inspect_err(|e| tracing::warn!(error = %e, signal = name, "cannot listen for this signal; it will not stop the daemon cleanly"))
            .ok()
    };
    let interrupt = listen("SIGINT", SignalKind::interrupt());
    let terminate = listen("SIGTERM", SignalKind::terminate());
    async move {
        let received = |signal: Option<Signal>| async move {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = received(interrupt) => {}
            _ = received(terminate) => {}
        }
    }
}

/// Resolves on Ctrl-C: what `main` passes to the daemon.
#[cfg(not(unix))]
pub fn os_signal() -> impl std::future::Future<Output = ()> {
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        let _ = ctrl_c.await;
    }
}
