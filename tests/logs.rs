//! The daemon's own log lines (stderr), as a log file or a log shipper sees them: no ANSI
//! escape codes when stderr is not a terminal, and `--log-format json` writes one JSON
//! object per line.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

/// Kills the child when the test ends, whatever happened.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the binary with `args` and RUST_LOG=info, stderr into a file; stops it with
/// SIGTERM once it listens, and returns everything it logged.
async fn logs_of_a_run(dir: &Path, args: &[&str]) -> String {
    let policy = dir.join("policy.lua");
    std::fs::write(&policy, common::hold_policy("held")).unwrap();
    let log_path = dir.join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let port = common::free_port();
    let mut cmd = common::relay_command(&policy, &dir.join("spool"), port);
    cmd.args(args)
        .env("RUST_LOG", "info")
        .env_remove("SPOOLRELAY_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(log);
    let mut relay = Reap(cmd.spawn().expect("spawn spoolrelay"));
    common::wait_until(
        "the daemon logs that it listens",
        Duration::from_secs(60),
        || std::fs::read_to_string(&log_path).is_ok_and(|t| t.contains("HTTP API listening")),
    )
    .await;
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(relay.0.id() as i32, libc::SIGTERM) }, 0);
    let status = relay.0.wait().unwrap();
    assert!(
        status.success(),
        "the daemon exits cleanly on SIGTERM: {status}"
    );
    std::fs::read_to_string(&log_path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_written_to_a_file_carry_no_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let text = logs_of_a_run(dir.path(), &[]).await;
    assert!(
        text.contains("INFO") && text.contains("stopped; spool synced"),
        "the run logged its start and stop at info:\n{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "no ANSI escape codes in a log file:\n{text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = logs_of_a_run(dir.path(), &["--log-format", "json"]).await;
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() >= 2,
        "at least the start and stop lines:\n{text}"
    );
    let mut messages = Vec::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not one JSON object ({e}): {line:?}"));
        assert!(v.is_object(), "{line}");
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_owned());
    }
    assert!(
        messages.iter().any(|m| m == "HTTP API listening"),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "stopped; spool synced"),
        "{messages:?}"
    );
}

/// A daemon that cannot start says why in the format it was asked for: under
/// `--log-format json` the fatal error is a JSON object too, not a bare line.
#[test]
fn log_format_json_reports_a_fatal_start_error_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-policy.lua");
    let out = common::relay_command(&missing, &dir.path().join("spool"), common::free_port())
        .arg("--log-format")
        .arg("json")
        .output()
        .expect("run spoolrelay");
    assert!(!out.status.success());
    let text = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty(), "the error is reported");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a stderr line is not JSON ({e}): {line:?}"));
        assert_eq!(v["level"], "ERROR", "{line}");
        let error = v["fields"]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("no-such-policy.lua"),
            "names the file: {line}"
        );
    }
}
