//! `powercut BACKING MOUNTPOINT`: mounts the power-loss layer for scripts.
//! `kill -USR1 <pid>` cuts the power (drops everything not fsynced); `SIGINT`/`SIGTERM`
//! unmount (also dropping everything not fsynced) and exit.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 || args[1].starts_with('-') {
        eprintln!("usage: powercut BACKING MOUNTPOINT\n  SIGUSR1: power cut (drop every write not fsynced); SIGINT/SIGTERM: unmount and exit");
        return ExitCode::from(2);
    }
    let (backing, mountpoint) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    if let Some(why) = powercut::unavailable() {
        eprintln!("powercut: cannot mount: {why}");
        return ExitCode::FAILURE;
    }
    // Block the signals before any thread starts, so that only sigwait below sees them.
    // SAFETY: plain libc signal-set calls on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGUSR1, libc::SIGINT, libc::SIGTERM] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let layer = match powercut::PowerCut::mount(&backing, &mountpoint) {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("powercut: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "powercut: {} mounted over {} (pid {}; SIGUSR1 cuts the power)",
        mountpoint.display(),
        backing.display(),
        std::process::id()
    );
    loop {
        let mut sig = 0;
        // SAFETY: `set` is initialised; sigwait writes the signal number into `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        if sig == libc::SIGUSR1 {
            match layer.cut() {
                Ok(report) => println!("powercut: power cut, dropped {report:?}"),
                Err(e) => {
                    eprintln!(
                        "powercut: power cut failed reloading {}: {e}",
                        backing.display()
                    );
                    return ExitCode::FAILURE;
                }
            }
        } else {
            return match layer.unmount() {
                Ok(report) => {
                    println!("powercut: unmounted, dropped {report:?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("powercut: unmounting {} failed: {e}", mountpoint.display());
                    ExitCode::FAILURE
                }
            };
        }
    }
}
