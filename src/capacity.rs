//! Capacity and backpressure: ingest refuses (503 + `Retry-After`) while the spool holds
//! `--max-spool-bytes` or its filesystem has less than `--min-free-disk` free, and accepts
//! again once deliveries have drained it. Delivery is never gated: acks and retries are
//! what make room.
//!
//! The figures:
//! - **Spool bytes** are the bytes of queued messages (waiting or leased) as the spool's
//!   index records them ([`Spool::queued_bytes`], O(1)), not the size of sled's files:
//!   those never shrink when messages leave, so a limit on them could never be left.
//! - **Free disk** is `statvfs` on the spool directory (`f_bavail * f_frsize`: what an
//!   unprivileged writer may still use). A syscall that can stall on a sick filesystem is
//!   kept off the request path: a background task refreshes it every [`REFRESH`] and
//!   right after a request was accepted ([`Capacity::accepted`] wakes it).
//!
//! A request is refused whole when it would cross a limit, so nothing is ever accepted in
//! part: the gate reserves its body size ([`Capacity::reserve`]) until it is answered, so
//! requests in flight together count against the limits together, and an injection
//! reserves what its recipients expand to before anything is spooled.
//!
//! sled never returns disk space when messages leave (its files keep their size; freed
//! segments are reused for new writes), and acks themselves append to its log: after a
//! drain, free disk is *lower* than at the refusal (tests/limits.rs measured 24.0 MiB free
//! at the refusal, 21.0 MiB after the drain). So below `--min-free-disk` the gate
//! remembers the queued bytes it held when the reserve was first reached, and accepts new
//! messages while the spool holds less than that: they fit where the delivered ones were.
//! Below half the reserve it accepts nothing, whatever the spool holds.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::body::HttpBody as _;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use spool::Spool;
use tokio::sync::Notify;

use crate::Shutdown;

/// How often free disk space is read when nothing is accepted.
pub const REFRESH: Duration = Duration::from_secs(1);
/// The `Retry-After` of a capacity refusal, in seconds.
pub const RETRY_AFTER_SECS: u64 = 5;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-spool-bytes`: the queued payload bytes would pass the cap.
    MaxSpoolBytes,
    /// `--min-free-disk`: the spool's filesystem has too little free space.
    MinFreeDisk,
}

impl Limit {
    /// The limit's name in metrics labels (`max_spool_bytes`, `min_free_disk`).
    pub fn name(self) -> &'static str {
        match self {
            Limit::MaxSpoolBytes => "max_spool_bytes",
            Limit::MinFreeDisk => "min_free_disk",
        }
    }
}

/// A refusal: which limit, and a message for the client and the operator.
#[derive(Debug, Clone)]
pub struct OverCapacity {
    /// The limit that refused.
    pub limit: Limit,
    /// Why, for the client (503 body) and the operator (`/readyz`).
    pub reason: String,
}

/// The capacity gate, shared by ingest, `/readyz` and `/metrics`.
pub struct Capacity {
    spool: Spool,
    dir: PathBuf,
    /// `--max-spool-bytes` (`None`: no cap).
    pub max_spool_bytes: Option<u64>,
    /// `--min-free-disk`, in bytes.
    pub min_free_disk: u64,
    /// Last `statvfs` reading; `u64::MAX` until the first one (or when it fails).
    free_disk: AtomicU64,
    /// Bytes of requests that passed the gate and are not spooled yet: counted as used,
    /// so concurrent requests cannot all pass against the same reading.
    pending: AtomicU64,
    refused_spool_bytes: AtomicU64,
    refused_free_disk: AtomicU64,
    /// Queued bytes when free disk first fell below `--min-free-disk` ([`NO_WATERMARK`]
    /// while above it): how much the spool's existing files are known to hold.
    full_at: AtomicU64,
    /// Whether the last gated request was refused (to log transitions only).
    refusing: AtomicBool,
    wake: Notify,
}

const NO_WATERMARK: u64 = u64::MAX;

impl Capacity {
    /// Builds the gate and takes a first reading, so the limits hold from the first request.
    pub fn new(
        spool: Spool,
        dir: &Path,
        max_spool_bytes: Option<u64>,
        min_free_disk: u64,
    ) -> Arc<Capacity> {
        let capacity = Arc::new(Capacity {
            spool,
            dir: dir.to_path_buf(),
            max_spool_bytes,
            min_free_disk,
            free_disk: AtomicU64::new(u64::MAX),
            pending: AtomicU64::new(0),
            refused_spool_bytes: AtomicU64::new(0),
            refused_free_disk: AtomicU64::new(0),
            full_at: AtomicU64::new(NO_WATERMARK),
            refusing: AtomicBool::new(false),
            wake: Notify::new(),
        });
        capacity.refresh();
        capacity
    }

    /// Reads free disk space now.
    pub fn refresh(&self) {
        match free_bytes(&self.dir) {
            Ok(free) => self.free_disk.store(free, Relaxed),
            Err(e) => {
                // Not knowing is not a reason to refuse: sled's own ENOSPC still answers 503.
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read free disk space (statvfs); --min-free-disk is not enforced until it can");
                self.free_disk.store(u64::MAX, Relaxed);
            }
        }
    }

    /// Refreshes in the background until `shutdown`: every [`REFRESH`], and after accepts.
    pub fn spawn_refresher(self: &Arc<Self>, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(REFRESH) => {}
                    _ = me.wake.notified() => {}
                }
                let again = me.clone();
                let _ = tokio::task::spawn_blocking(move || again.refresh()).await;
            }
        })
    }

    /// A request was accepted: take a fresh reading soon.
    pub fn accepted(&self) {
        self.wake.notify_one();
    }

    /// The queued messages' payload bytes (what `--max-spool-bytes` bounds).
    pub fn spool_bytes(&self) -> u64 {
        self.spool.queued_bytes()
    }

    /// Free bytes at the last reading (`None` if unknown).
    pub fn free_disk(&self) -> Option<u64> {
        Some(self.free_disk.load(Relaxed)).filter(|f| *f != u64::MAX)
    }

    /// Whether `incoming` more bytes would cross a limit, and which.
    pub fn check(&self, incoming: u64) -> Result<(), OverCapacity> {
        self.check_with(self.pending.load(Relaxed), incoming)
    }

    /// Reserves `bytes` for a request about to be spooled, or says which limit it would
    /// cross. The reservation counts as used until it is dropped (after the enqueue
    /// answered), so requests in flight together cannot overshoot a limit together.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, OverCapacity> {
        let others = self.pending.fetch_add(bytes, Relaxed);
        match self.check_with(others, bytes) {
            Ok(()) => Ok(Reservation {
                capacity: self.clone(),
                bytes,
            }),
            Err(over) => {
                self.pending.fetch_sub(bytes, Relaxed);
                Err(over)
            }
        }
    }

    /// Like [`check`](Self::check), with `pending` bytes of other requests counted as used.
    fn check_with(&self, pending: u64, incoming: u64) -> Result<(), OverCapacity> {
        let used = self.spool_bytes().saturating_add(pending);
        if let Some(max) = self.max_spool_bytes {
            // At the limit exactly, the spool is full (and /readyz, asking with 0, says so).
            if used >= max || used.saturating_add(incoming) > max {
                return Err(OverCapacity {
                    limit: Limit::MaxSpoolBytes,
                    reason: format!(
                        "the spool is full: queued messages hold {used} bytes{}, the limit is \
                         {max} (--max-spool-bytes); nothing was accepted: retry after \
                         deliveries drain it",
                        if incoming > 0 {
                            format!(" and this request would add {incoming}")
                        } else {
                            String::new()
                        }
                    ),
                });
            }
        }
        if let Some(free) = self.free_disk() {
            if free.saturating_sub(incoming) >= self.min_free_disk {
                // Room again (space was freed, or sled truncated): forget the watermark.
                self.full_at.store(NO_WATERMARK, Relaxed);
                return Ok(());
            }
            // Below the reserve. sled does not give space back when messages leave, but
            // reuses it: up to the queued bytes the spool held when the reserve was first
            // reached, new messages fit in the files it already has. The first refusal sets
            // that watermark; below half the reserve nothing is accepted at all.
            let full_at = match self
                .full_at
                .compare_exchange(NO_WATERMARK, used, Relaxed, Relaxed)
            {
                Ok(_) => used,
                Err(set) => set,
            };
            // `incoming` 0 is /readyz asking: ready while there is any room left.
            let fits = if incoming == 0 {
                used < full_at
            } else {
                used.saturating_add(incoming) <= full_at
            };
            let reuse = free >= self.min_free_disk / 2 && fits;
            if !reuse {
                return Err(OverCapacity {
                    limit: Limit::MinFreeDisk,
                    reason: format!(
                        "the spool's disk ({}) has {free} bytes free, less than the {} kept \
                         free for deliveries (--min-free-disk), and the spool holds {used} \
                         bytes of messages (it took new ones up to {full_at} in the space it \
                         has); nothing was accepted: retry after deliveries drain the spool or \
                         free disk space",
                        self.dir.display(),
                        self.min_free_disk
                    ),
                });
            }
        }
        Ok(())
    }

    /// Counts and logs a refusal and builds its 503 (`Retry-After`, JSON naming the limit).
    pub fn refuse(&self, over: OverCapacity) -> Response {
        match over.limit {
            Limit::MaxSpoolBytes => &self.refused_spool_bytes,
            Limit::MinFreeDisk => &self.refused_free_disk,
        }
        .fetch_add(1, Relaxed);
        // One line when refusing starts, not one per request.
        if !self.refusing.swap(true, Relaxed) {
            tracing::warn!(
                limit = over.limit.name(),
                reason = %over.reason,
                "ingest refused: over capacity (further refusals are counted in \
                 spoolrelay_ingest_refused_total)"
            );
        }
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
            Json(json!({ "error": over.reason, "limit": over.limit.name() })),
        )
            .into_response()
    }

    /// The capacity part of `/metrics`.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::ConstGauge;
        let mut gauge = |name: &str, help: &str, value: i64| {
            r.register(name, help, ConstGauge::new(value));
        };
        gauge(
            "spoolrelay_spool_bytes",
            "Bytes of queued messages (waiting and in flight), what --max-spool-bytes bounds",
            self.spool_bytes() as i64,
        );
        gauge(
            "spoolrelay_spool_max_bytes",
            "--max-spool-bytes (0: no limit)",
            self.max_spool_bytes.unwrap_or(0) as i64,
        );
        gauge(
            "spoolrelay_spool_disk_bytes",
            "Size of the spool's sled files (they do not shrink as messages leave)",
            self.spool.disk_bytes().map_or(-1, |b| b as i64),
        );
        gauge(
            "spoolrelay_disk_free_bytes",
            "Free bytes on the spool's filesystem at the last reading (-1: unknown)",
            self.free_disk().map_or(-1, |f| f as i64),
        );
        gauge(
            "spoolrelay_disk_min_free_bytes",
            "--min-free-disk",
            self.min_free_disk as i64,
        );
        #[derive(
            Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet,
        )]
        struct LimitLabel {
            limit: &'static str,
        }
        let refused = Family::<LimitLabel, Counter>::default();
        for (limit, n) in [
            (Limit::MaxSpoolBytes, &self.refused_spool_bytes),
            (Limit::MinFreeDisk, &self.refused_free_disk),
        ] {
            refused
                .get_or_create(&LimitLabel {
                    limit: limit.name(),
                })
                .inc_by(n.load(Relaxed));
        }
        r.register(
            "spoolrelay_ingest_refused",
            "Ingest requests refused with 503 because a capacity limit was reached",
            refused,
        );
    }
}

/// Bytes reserved by [`Capacity::reserve`]; given back when dropped.
pub struct Reservation {
    capacity: Arc<Capacity>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.capacity.pending.fetch_sub(self.bytes, Relaxed);
    }
}

/// Middleware on the ingest routes: refuses a request that would cross a limit, before
/// its handler runs; wakes the refresher after an accepted one. Runs after
/// `server::read_body_within`, so the body is here and its size is exact.
pub async fn gate(State(capacity): State<Arc<Capacity>>, req: Request, next: Next) -> Response {
    let incoming = req.body().size_hint().exact().unwrap_or(0);
    let reservation = match capacity.reserve(incoming) {
        Ok(reservation) => reservation,
        Err(over) => return capacity.refuse(over),
    };
    if capacity.refusing.swap(false, Relaxed) {
        tracing::info!("ingest below the capacity limits again; accepting");
    }
    let response = next.run(req).await;
    drop(reservation);
    if response.status().is_success() {
        capacity.accepted();
    }
    response
}

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `st` is writable memory of the right type;
    // statvfs initialises it when it returns 0.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: rc == 0, so statvfs filled `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_bytes_reads_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn limits_refuse_whole_requests() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), Default::default()).unwrap();
        let cap = Capacity::new(spool, dir.path(), Some(100), 0);
        assert!(cap.check(100).is_ok());
        assert_eq!(cap.check(101).unwrap_err().limit, Limit::MaxSpoolBytes);
        let full = Capacity::new(cap.spool.clone(), dir.path(), Some(0), 0);
        assert!(full.check(0).is_err(), "at the limit is full");
        let cap = Capacity::new(cap.spool.clone(), dir.path(), None, u64::MAX - 1);
        let over = cap.check(0).unwrap_err();
        assert_eq!(over.limit, Limit::MinFreeDisk);
        assert!(over.reason.contains("--min-free-disk"), "{}", over.reason);
    }
}
