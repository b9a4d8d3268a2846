//! The packaging in `deploy/`: the systemd readiness protocol against the real binary, and
//! the unit, Dockerfile and Kubernetes example checked by their own tools where those are
//! installed (`tests/run.sh` installs them), plus the timeouts they must agree on.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(deploy(file)).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

/// Whether `tool` runs here; when not, the check says so on stderr (and tests/run.sh
/// installs it, so CI runs the check).
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("SKIPPED: {tool} is not installed (tests/run.sh installs it)");
    }
    found
}

/// The value of the first `--flag VALUE` or `--flag=VALUE` in a unit or manifest that is a
/// duration (comments may name the flag without one).
fn flag(text: &str, flag: &str) -> Duration {
    text.match_indices(flag)
        .find_map(|(at, _)| {
            let value: String = text[at + flag.len()..]
                .trim_start_matches(['=', ' '])
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            humantime::parse_duration(&value).ok()
        })
        .unwrap_or_else(|| panic!("no {flag} with a duration"))
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A datagram from the daemon on our NOTIFY_SOCKET within 20 s.
fn notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_once_serving_and_stopping_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let policy = dir.path().join("hold.lua");
    std::fs::write(&policy, common::hold_policy("held")).unwrap();
    let port = common::free_port();
    let child = common::relay_command(&policy, &dir.path().join("spool"), port)
        .env("NOTIFY_SOCKET", &path)
        .spawn()
        .expect("spawn spoolrelay");
    // Killed if an assertion fails: an orphan would hold the test harness's stderr open.
    let mut child = KillOnDrop(child);

    let socket = std::sync::Arc::new(socket);
    let s = socket.clone();
    let ready = tokio::task::spawn_blocking(move || notification(&s)).await;
    assert_eq!(ready.unwrap().trim(), "READY=1");
    // Ready means serving: the listener answers now, without waiting.
    let live = reqwest::get(format!("http://127.0.0.1:{port}/livez")).await;
    assert!(live
        .expect("listener bound at READY=1")
        .status()
        .is_success());

    let term = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    assert!(term.unwrap().success());
    let s = socket.clone();
    let stopping = tokio::task::spawn_blocking(move || notification(&s)).await;
    assert_eq!(stopping.unwrap().trim(), "STOPPING=1");
    let status = common::wait_exit(&mut child.0, "SIGTERM", Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
}

#[test]
fn systemd_unit_verifies_and_outlasts_the_drain_timeout() {
    let unit = read("systemd/spoolrelay.service");
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec");
    let stop = humantime::parse_duration(stop.trim()).expect("TimeoutStopSec duration");
    // SIGTERM's own deadlines: in-flight sends, then the HTTP grace (default 2 s).
    let needed = flag(&unit, "--drain-timeout") + Duration::from_secs(2);
    assert!(
        stop > needed,
        "TimeoutStopSec {stop:?} must outlast --drain-timeout + grace {needed:?}"
    );
    assert!(unit.contains("Type=notify"));
    if !have("systemd-analyze") {
        return;
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("spoolrelay.service");
    let unit = unit.replace(
        "/usr/local/bin/spoolrelay",
        env!("CARGO_BIN_EXE_spoolrelay"),
    );
    std::fs::write(&copy, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn dockerfile_passes_hadolint() {
    let docker = read("Dockerfile");
    assert!(docker.contains("HEALTHCHECK") && docker.contains("/livez"));
    assert!(docker.contains("USER 10001"), "runs as a non-root user");
    if !have("hadolint") {
        return;
    }
    let out = Command::new("hadolint")
        .arg(deploy("Dockerfile"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn kubernetes_grace_period_outlasts_the_prestop_drain() {
    let k8s = read("kubernetes/spoolrelay.yaml");
    let grace: u64 = k8s
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .expect("terminationGracePeriodSeconds")
        .trim()
        .parse()
        .unwrap();
    let needed = flag(&k8s, "--deadline") + flag(&k8s, "--drain-timeout");
    assert!(
        Duration::from_secs(grace) > needed,
        "terminationGracePeriodSeconds {grace} must outlast the drain deadline + \
         --drain-timeout ({needed:?})"
    );
    for probe in [
        "readinessProbe",
        "livenessProbe",
        "preStop",
        "volumeClaimTemplates",
    ] {
        assert!(k8s.contains(probe), "{probe} missing");
    }
}

/// `cargo install --path .` installs the binaries of the root package, so both must be
/// binaries of that package (cargo installs one package per path). Checked through
/// `cargo metadata`, the same target list `cargo install` reads, without a release build.
#[test]
fn cargo_install_from_the_root_installs_both_binaries() {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let root = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "spoolrelay")
        .expect("the spoolrelay package");
    let mut bins: Vec<&str> = root["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .map(|t| t["name"].as_str().expect("target name"))
        .collect();
    bins.sort_unstable();
    assert_eq!(
        bins,
        ["spoolctl", "spoolrelay"],
        "binaries of the root package"
    );
    assert_eq!(
        root["default_run"], "spoolrelay",
        "`cargo run` means the daemon"
    );
}
