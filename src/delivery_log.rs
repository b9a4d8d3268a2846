//! The JSONL delivery log: one line per reception and per send outcome.
//!
//! The send path never waits for it: [`DeliveryLog::log`] does a `try_send` on a bounded
//! channel and counts a drop when the writer is behind. One writer thread owns the file,
//! writes what queued up, flushes when the channel is momentarily empty, and rotates by
//! size (`PATH` → `PATH.1` → … → `PATH.5`, the oldest deleted).
//!
//! [`LogRecord`] is a plain owned value that serializes to exactly the line written, so a
//! later log hook (KumoMTA's `kumo.configure_log_hook` + `should_enqueue_log_record`) can
//! take the same records off the same channel and enqueue each line as a spool message,
//! off the hot path like the file writer.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

/// Records waiting for the writer before new ones are dropped.
const CHANNEL_CAPACITY: usize = 16 * 1024;
/// Rotated files kept besides the live one.
pub const KEEP_ROTATED: usize = 5;
/// Size at which the live file is rotated unless `--delivery-log-max-bytes` says otherwise
/// (64 MiB: six files bound the log at about 384 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// What happened to a message. Names follow KumoMTA's log record types where one exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordType {
    /// Accepted by HTTP ingest and fsynced.
    Reception,
    /// The broker accepted it; it was deleted from the spool.
    Delivery,
    /// The send failed temporarily; the message is retried (or dead-lettered if it would
    /// pass `max_age`, which logs a `DeadLetter` too).
    TransientFailure,
    /// The broker refused it for good; `on_permanent_failure` decides what follows.
    PermanentFailure,
    /// Moved to the dead-letter area.
    DeadLetter,
}

/// One line of the delivery log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// What happened; serialized as `type`, KumoMTA's field name.
    #[serde(rename = "type")]
    pub kind: RecordType,
    /// The queue the message was in.
    pub queue: String,
    /// Decimal string, like everywhere else in the API.
    pub id: String,
    /// 1-based number of the send attempt this is about; 0 for `Reception`.
    pub attempt: u32,
    /// The response code, when the outcome had one.
    pub code: Option<u16>,
    /// The broker's or policy's response text (empty for `Reception`).
    pub response: String,
    /// Seconds since the Unix epoch (KumoMTA's unit).
    pub timestamp: u64,
    /// The same instant in milliseconds, to order records within a second.
    pub timestamp_ms: u64,
}

impl LogRecord {
    /// A record about message `id` of `queue`, stamped with the current time. `attempt` is
    /// 1-based (0 for `Reception`), as in the [`attempt`](Self::attempt) field.
    pub fn new(
        kind: RecordType,
        queue: &str,
        id: spool::MessageId,
        attempt: u32,
        code: Option<u16>,
        response: impl Into<String>,
    ) -> LogRecord {
        let now = spool::now_ms();
        LogRecord {
            kind,
            queue: queue.to_owned(),
            id: id.to_string(),
            attempt,
            code,
            response: response.into(),
            timestamp: now / 1000,
            timestamp_ms: now,
        }
    }
}

enum Entry {
    Record(LogRecord),
    Stop,
}

/// A cheap handle for producers. `Default` is a disabled log that costs one branch.
#[derive(Clone, Default)]
pub struct DeliveryLog {
    tx: Option<SyncSender<Entry>>,
    dropped: Arc<AtomicU64>,
}

impl DeliveryLog {
    /// Opens (appending) `path` and starts the writer thread. `dropped` counts lost records.
    pub fn open(
        path: &Path,
        max_bytes: u64,
        dropped: Arc<AtomicU64>,
    ) -> io::Result<(DeliveryLog, LogWriter)> {
        let file = RotatingFile::open(path.to_path_buf(), max_bytes)?;
        let (tx, rx) = mpsc::sync_channel(CHANNEL_CAPACITY);
        let thread_dropped = dropped.clone();
        let thread = std::thread::Builder::new()
            .name("delivery-log".into())
            .spawn(move || write_loop(file, rx, thread_dropped))?;
        let log = DeliveryLog {
            tx: Some(tx.clone()),
            dropped,
        };
        Ok((log, LogWriter { tx, thread }))
    }

    /// Whether a file is being written; a disabled log (`Default`) drops every record unmade.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands a record to the writer without waiting; `make` runs only when logging is on.
    pub fn log(&self, make: impl FnOnce() -> LogRecord) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Entry::Record(make())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
            // The writer stopped (shutdown): late records of in-flight sends are lost.
            Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// The writer thread, stopped at daemon shutdown after every producer is done.
pub struct LogWriter {
    tx: SyncSender<Entry>,
    thread: JoinHandle<()>,
}

impl LogWriter {
    /// Writes what is queued, flushes, and stops the thread. Blocking.
    pub fn finish(self) {
        if self.tx.send(Entry::Stop).is_ok() {
            let _ = self.thread.join();
        }
    }
}

fn write_loop(mut file: RotatingFile, rx: Receiver<Entry>, dropped: Arc<AtomicU64>) {
    let mut line = Vec::with_capacity(256);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(entry) = next.take() {
            let Entry::Record(record) = entry else {
                file.flush_or_report();
                return;
            };
            line.clear();
            if serde_json::to_writer(&mut line, &record).is_ok() {
                line.push(b'\n');
                if let Err(e) = file.write_line(&line) {
                    dropped.fetch_add(1, Relaxed);
                    file.report(&e);
                }
            }
            next = rx.try_recv().ok();
        }
        file.flush_or_report();
    }
    file.flush_or_report();
}

/// The live file plus its rotation. Write errors are reported once until a write works
/// again, so a full disk does not flood the log.
struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    out: Option<BufWriter<File>>,
    size: u64,
    failing: bool,
}

impl RotatingFile {
    fn open(path: PathBuf, max_bytes: u64) -> io::Result<RotatingFile> {
        let mut file = RotatingFile {
            path,
            max_bytes: max_bytes.max(1),
            out: None,
            size: 0,
            failing: false,
        };
        file.reopen()?;
        Ok(file)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = f.metadata()?.len();
        self.out = Some(BufWriter::with_capacity(64 * 1024, f));
        Ok(())
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.out.is_none() {
            self.reopen()?;
        }
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let out = self.out.as_mut().expect("opened above");
        out.write_all(line)?;
        self.size += line.len() as u64;
        self.failing = false;
        Ok(())
    }

    /// `PATH.4` → `PATH.5`, …, `PATH` → `PATH.1`, then a fresh `PATH`.
    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut out) = self.out.take() {
            out.flush()?;
        }
        let numbered = |n: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        for n in (1..KEEP_ROTATED).rev() {
            match std::fs::rename(numbered(n), numbered(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        self.reopen()
    }

    fn flush_or_report(&mut self) {
        if let Some(out) = &mut self.out {
            if let Err(e) = out.flush() {
                self.report(&e);
                // The buffer may hold a partial line; start over on a fresh handle.
                self.out = None;
            }
        }
    }

    fn report(&mut self, e: &io::Error) {
        if !self.failing {
            tracing::error!(path = %self.path.display(), error = %e,
                "cannot write the delivery log; records are dropped until it works again");
            self.failing = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> LogRecord {
        LogRecord::new(
            RecordType::Delivery,
            "q",
            spool::MessageId(n),
            1,
            Some(250),
            "250 ok",
        )
    }

    #[test]
    fn rotates_by_size_and_keeps_five_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delivery.jsonl");
        let dropped = Arc::new(AtomicU64::new(0));
        let (log, writer) = DeliveryLog::open(&path, 1000, dropped.clone()).unwrap();
        for n in 0..200 {
            log.log(|| record(n));
        }
        writer.finish();
        let mut lines = 0;
        for name in ["", ".1", ".2", ".3", ".4", ".5"] {
            let p = dir.path().join(format!("delivery.jsonl{name}"));
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.len() as u64 <= 1000, "{name} is {} bytes", text.len());
            for line in text.lines() {
                let r: LogRecord = serde_json::from_str(line).unwrap();
                assert_eq!(r.kind, RecordType::Delivery);
                lines += 1;
            }
        }
        assert!(!dir.path().join("delivery.jsonl.6").exists());
        assert!(lines < 200, "older files were deleted");
        assert_eq!(dropped.load(Relaxed), 0);
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(
            last.contains(r#""id":"199""#),
            "newest record is in the live file"
        );
    }

    #[test]
    fn a_disabled_log_never_builds_records() {
        DeliveryLog::default().log(|| panic!("built a record for a disabled log"));
    }
}
