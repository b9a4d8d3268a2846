//! The `powercut` binary, as scripts use it: SIGUSR1 cuts the power, SIGTERM unmounts.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read, sync_dir, write_synced};

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

fn is_mounted(path: &std::path::Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let path = path.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(path))
}

#[test]
fn sigusr1_cuts_the_power_and_sigterm_unmounts() {
    if let Some(why) = powercut::unavailable() {
        eprintln!("SKIPPED: the power-cut layer cannot be mounted here: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (disk, mnt) = (tmp.path().join("disk"), tmp.path().join("mnt"));
    std::fs::create_dir(&disk).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_powercut"))
        .arg(&disk)
        .arg(&mnt)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn powercut");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("mounted"), "{line}");
    let mnt = mnt.canonicalize().unwrap();
    assert!(is_mounted(&mnt));

    write_synced(&mnt.join("kept"), b"fsynced");
    sync_dir(&mnt);
    std::fs::write(mnt.join("dropped"), b"never fsynced").unwrap();
    signal(child.id(), libc::SIGUSR1);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("power cut"), "{line}");
    assert_eq!(read(&mnt.join("kept")).unwrap(), b"fsynced");
    assert_eq!(read(&mnt.join("dropped")), None);

    std::fs::write(mnt.join("also dropped"), b"x").unwrap();
    signal(child.id(), libc::SIGTERM);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "powercut did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&mnt));
    // The backing directory is the disk: exactly what was durable.
    let mut names: Vec<_> = std::fs::read_dir(&disk)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".powercut-pending")
        .collect();
    names.sort();
    assert_eq!(names, ["kept"]);
}
