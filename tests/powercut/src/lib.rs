//! # powercut: a power-loss simulator for tests (LazyFS-style, in Rust, over FUSE)
//!
//! spoolrelay promises that nothing it acknowledged is lost after a power cut. A process
//! kill cannot test that: the kernel's page cache survives `kill -9`, so data that only
//! reached the page cache looks durable. This crate mounts a filesystem that keeps its own
//! "page cache" in memory, writes it to a backing directory only when asked to by `fsync`,
//! and can throw it away on command: the power cut. Jepsen's LazyFS is the model.
//!
//! ## The model
//! - **Data.** Every write to a file lands in the layer's memory (the file's bytes plus the
//!   set of 4 KiB pages written since the last sync, and the smallest size the file had
//!   since then). Readers of the mount see it at once. It reaches the backing directory
//!   only on that file's `fsync` or `fdatasync` (FUSE `fsync`; the two are treated alike:
//!   size is part of what `fdatasync` must persist anyway and no test here depends on
//!   timestamps).
//! - **`sync_file_range`** never reaches FUSE: Linux does not pass it down. It therefore
//!   persists nothing here, which is the truth on real disks too (it neither commits the
//!   file's metadata nor flushes the drive's cache): sled 0.34's `flush()` (sled #1452).
//! - **`close`** (FUSE `flush`/`release`) persists nothing.
//! - **`O_SYNC` / `O_DSYNC`.** A write on such a handle is synced before it returns (the
//!   layer reads the flags FUSE passes with each write; the kernel also sends an `fsync`
//!   after each such write). `O_DIRECT` is *not* a durability promise (the drive's cache
//!   may still hold the data) and is treated like any write.
//! - **Size changes** (`truncate`, `ftruncate`, `O_TRUNC`, `fallocate` mode 0) are
//!   changes to the file's data: durable at its next `fsync`. `fallocate` with
//!   `FALLOC_FL_KEEP_SIZE` is accepted and does nothing; other modes (punching holes)
//!   fail with `EOPNOTSUPP` (sled 0.34 uses none).
//! - **Directory entries: the strict model.** A create, `mkdir`, unlink, `rmdir` or rename
//!   changes only what readers see. A directory's entries become durable when that
//!   directory is fsynced (FUSE `fsyncdir`, what `File::open(dir)?.sync_all()` sends).
//!   So a file that was written and fsynced but whose directory was not is gone after a
//!   cut: the case that catches a missing directory fsync. A renamed file: the new name is
//!   durable once the new directory is synced (and the old name goes with it, as one
//!   journaled rename would); until then the old durable name stays. An unlinked file stays
//!   durable until its directory is synced. A new file whose directory was synced but that
//!   was never fsynced comes back empty (ext4 without `auto_da_alloc` does the same).
//!   Real filesystems are often kinder (ext4 commits a new entry with the file's fsync):
//!   code that passes here does not depend on that.
//! - **Everything else** (permissions, owners, times) is not modelled for durability;
//!   hard links, symlinks and special files are not supported (`EPERM`/`ENOSYS`). Files
//!   live in memory and are capped at 1 GiB (`EFBIG` beyond).
//!
//! ## The backing directory
//! It *is* the simulated disk: after a cut, and after an unmount, it holds exactly what was
//! made durable, as an ordinary directory tree. Data fsynced for a file that has no durable
//! name yet goes to `<backing>/.powercut-pending/<inode>` and is moved into place by the
//! `fsyncdir` that makes its name durable; that directory is hidden from the mount and
//! emptied on every load (unreachable after a crash, like an orphan inode).
//!
//! ## The power cut
//! [`PowerCut::cut`] (or `SIGUSR1` to the `powercut` binary) drops everything not durable:
//! the visible tree is rebuilt from the backing directory. Every handle open at the cut is
//! dead: its calls fail with `EIO` from then on, so a process that "survived" the cut in a
//! test cannot write into the world after it. Inode numbers are never reused and the kernel
//! is told to cache nothing (zero entry/attribute TTL, `direct_io`), so paths walked after
//! the cut see the new tree. Unmounting is also a cut: nothing dirty is written back.
//!
//! ## Performance
//! Every file is opened `direct_io`: no kernel page cache to keep coherent with a cut, and
//! each `write` reaches the layer as one request (no double caching). Data lives in memory
//! (whole files: the layer is for test-sized data) and a sync writes only the dirty pages.
//! `keep_cache` would be wrong: the kernel would serve data a cut dropped.

mod fs;
mod state;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use state::CutReport;
use state::State;

/// A mounted power-loss layer. Dropping it unmounts, discarding everything not durable.
pub struct PowerCut {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    dev: u64,
    mountpoint: PathBuf,
    backing: PathBuf,
}

impl PowerCut {
    /// Mounts the layer at `mountpoint` (an existing, empty directory), showing what
    /// `backing` (an existing directory, the simulated disk) holds.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<PowerCut> {
        let state = Arc::new(Mutex::new(State::load(backing)?));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("powercut".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        config.n_threads = Some(1);
        let fs = fs::PowerCutFs {
            state: state.clone(),
        };
        let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "mounting the power-cut layer at {} (needs /dev/fuse and root or fusermount3 from Debian's fuse3): {e}",
                    mountpoint.display()
                ),
            )
        })?;
        // The mount's device number names its FUSE connection (see `abort_connection`).
        let dev = std::fs::metadata(mountpoint).map(|m| m.dev()).unwrap_or(0);
        Ok(PowerCut {
            state,
            dev,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            backing: backing.to_path_buf(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Simulates a power cut: drops every write not fsynced and every directory change not
    /// made durable by `fsyncdir`, and invalidates every open handle. The mount stays up,
    /// showing what a reboot would find.
    pub fn cut(&self) -> io::Result<CutReport> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let report = state.unsynced();
        state.reload()?;
        Ok(report)
    }

    /// What a cut would drop right now.
    pub fn unsynced(&self) -> CutReport {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unsynced()
    }

    /// `fsync`, `fdatasync` and `fsyncdir` calls the layer received (across cuts).
    pub fn syncs(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).syncs
    }

    /// Unmounts; whatever was not durable is lost (a cut). Descriptors still open on the
    /// mount (an instance a test left "crashed") are cut off first: see [`Drop`].
    pub fn unmount(mut self) -> io::Result<CutReport> {
        let report = self.unsynced();
        self.shut_down()?;
        Ok(report)
    }

    fn shut_down(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let open_fds = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open_fds;
        if open_fds == 0 {
            return session.umount_and_join();
        }
        // Descriptors still open (a leaked, "crashed" instance): a plain unmount fails with
        // EBUSY, and if this process exits with them, closing them waits for a server that
        // is gone: the exit hangs. Abort the connection (their calls fail with ENOTCONN from
        // now on), detach the mount, and let the server thread see the end.
        abort_connection(self.dev)?;
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
            .map_err(io::Error::other)?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        session.join()
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            eprintln!(
                "powercut: unmounting {} failed: {e} (try `fusermount3 -u {}`)",
                self.mountpoint.display(),
                self.mountpoint.display()
            );
        }
    }
}

/// Aborts the FUSE connection of the mount whose device is `dev` (fusectl's `abort`).
fn abort_connection(dev: u64) -> io::Result<()> {
    const FUSECTL: &str = "/sys/fs/fuse/connections";
    // Linux's new_decode_dev: the connection directory is named after the minor number.
    let minor = ((dev >> 12) & 0xfff00) | (dev & 0xff);
    let abort = Path::new(FUSECTL).join(minor.to_string()).join("abort");
    if !abort.exists() {
        // fusectl is not always mounted (containers): mount it, as root can.
        let (fstype, target) = (c"fusectl", c"/sys/fs/fuse/connections");
        // SAFETY: valid NUL-terminated strings, no data argument.
        unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
    }
    std::fs::write(&abort, b"1").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("aborting the FUSE connection ({}): {e}", abort.display()),
        )
    })
}

/// Why this machine cannot mount the layer, if it cannot: tests skip with this message.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing (load the fuse module or run the container with --device /dev/fuse)".into());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let fusermount = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join("fusermount3").exists())
    });
    if !root && !fusermount {
        return Some("not root and no fusermount3 on PATH (apt-get install fuse3)".into());
    }
    None
}
