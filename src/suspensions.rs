//! The operator's brake (admin API `suspend`/`resume`): a suspended queue's worker stops
//! leasing, so its messages stay waiting while ingest keeps accepting new ones.
//!
//! Its own module, beside `dispatch` (which reads it) and `admin`/`metrics` (which set and
//! report it), so none of those needs to import another to reach it.
//!
//! Suspensions last: each is kept in the spool's meta tree (the spool's operator settings,
//! `suspend/<queue>` -> JSON [`Suspension`]) before the call answers, and read back at
//! start, so a restart keeps a queue suspended. A suspension may carry a reason and an
//! expiry (`--for 1h`): past it the queue is delivered again by itself (its worker wakes at
//! that moment); the expired record is deleted at the next start, or by the next
//! suspend/resume of that queue.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spool::{Spool, SpoolError};
use tokio::sync::watch;

/// Prefix of the spool settings that hold suspensions.
const SETTING_PREFIX: &str = "suspend/";

/// One queue's suspension, as stored and as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// Why, as the operator wrote it (`--reason`).
    #[serde(default)]
    pub reason: Option<String>,
    /// When it was suspended (ms since the epoch).
    #[serde(default)]
    pub since_ms: u64,
    /// When it ends by itself (ms since the epoch); `None`: until resumed.
    #[serde(default)]
    pub until_ms: Option<u64>,
}

impl Suspension {
    /// Whether it still holds at `now_ms`.
    pub fn active(&self, now_ms: u64) -> bool {
        self.until_ms.is_none_or(|until| until > now_ms)
    }
}

/// Queues an operator suspended: their workers lease nothing until resumed or until the
/// suspension expires. Cheap to clone; every clone sees the same set. Built with
/// [`Suspensions::load`] it is kept in the spool; `Default` is memory only (for tests).
#[derive(Clone)]
pub struct Suspensions {
    map: Arc<Mutex<BTreeMap<String, Suspension>>>,
    store: Option<Spool>,
    /// Ticks on every change, so a resumed queue's worker wakes at once.
    changed: Arc<watch::Sender<u64>>,
}

impl Default for Suspensions {
    fn default() -> Self {
        Suspensions {
            map: Arc::default(),
            store: None,
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

impl Suspensions {
    /// The suspensions kept in `spool`, expired ones deleted. A record that does not parse
    /// (only a hand-edited or future spool gets there) keeps its queue suspended, without
    /// reason or expiry: the safe side of a brake.
    pub async fn load(spool: Spool) -> Result<Suspensions, SpoolError> {
        let now = spool::now_ms();
        let mut map = BTreeMap::new();
        for (name, raw) in spool.settings(SETTING_PREFIX)? {
            let queue = name[SETTING_PREFIX.len()..].to_string();
            let suspension = serde_json::from_slice::<Suspension>(&raw).unwrap_or_else(|e| {
                tracing::warn!(%queue, error = %e, "unreadable suspension record; the queue stays suspended until resumed");
                Suspension { reason: None, since_ms: 0, until_ms: None }
            });
            if suspension.active(now) {
                tracing::warn!(%queue, reason = suspension.reason.as_deref().unwrap_or(""),
                    until_ms = suspension.until_ms, "queue is suspended (kept from before the restart)");
                map.insert(queue, suspension);
            } else {
                spool.delete_setting(&name).await?;
            }
        }
        Ok(Suspensions {
            map: Arc::new(Mutex::new(map)),
            store: Some(spool),
            changed: Arc::new(watch::channel(0).0),
        })
    }

    fn with_map<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Suspension>) -> T) -> T {
        f(&mut self.map.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Suspends `queue` (replacing an earlier suspension's reason and expiry), durably
    /// before it takes effect; `lasting` bounds it. True if it was not suspended before.
    pub async fn suspend(
        &self,
        queue: &str,
        reason: Option<String>,
        lasting: Option<Duration>,
    ) -> Result<(bool, Suspension), SpoolError> {
        let now = spool::now_ms();
        let until_ms =
            lasting.map(|d| now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
        let suspension = Suspension {
            reason,
            since_ms: now,
            until_ms,
        };
        if let Some(spool) = &self.store {
            let json = serde_json::to_vec(&suspension).expect("a suspension serializes");
            spool.put_setting(&setting(queue), &json).await?;
        }
        let old = self.with_map(|m| m.insert(queue.to_owned(), suspension.clone()));
        self.changed.send_modify(|n| *n += 1);
        Ok((!old.is_some_and(|s| s.active(now)), suspension))
    }

    /// Resumes `queue`, durably; false if it was not suspended (or its suspension expired).
    pub async fn resume(&self, queue: &str) -> Result<bool, SpoolError> {
        if let Some(spool) = &self.store {
            spool.delete_setting(&setting(queue)).await?;
        }
        let was = self.with_map(|m| m.remove(queue));
        self.changed.send_modify(|n| *n += 1);
        Ok(was.is_some_and(|s| s.active(spool::now_ms())))
    }

    /// Whether `queue` is suspended now.
    pub fn is_suspended(&self, queue: &str) -> bool {
        self.get(queue).is_some()
    }

    /// `queue`'s suspension, if one holds now.
    pub fn get(&self, queue: &str) -> Option<Suspension> {
        let now = spool::now_ms();
        self.with_map(|m| m.get(queue).filter(|s| s.active(now)).cloned())
    }

    /// The suspended queues, sorted.
    pub fn list(&self) -> Vec<String> {
        self.details().into_keys().collect()
    }

    /// The suspensions that hold now, by queue.
    pub fn details(&self) -> BTreeMap<String, Suspension> {
        let now = spool::now_ms();
        self.with_map(|m| {
            m.iter()
                .filter(|(_, s)| s.active(now))
                .map(|(q, s)| (q.clone(), s.clone()))
                .collect()
        })
    }

    /// Ticks on every suspend and resume.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

fn setting(queue: &str) -> String {
    format!("{SETTING_PREFIX}{queue}")
}
