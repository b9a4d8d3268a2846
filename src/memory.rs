//! The process allocator, and handing freed heap back to the system after a burst.
//!
//! A burst over many queues (P7 in docs/performance.md: one message on each of 100 000
//! queues) allocates ~1 GB that is freed again once the queues are reaped. With glibc the
//! daemon kept +116 to +153 MiB of it for good: the burst leaves ~30 000 small live blocks
//! (most of them sled's pages of the emptied messages tree) scattered over its pages, and a
//! page holding one live block cannot go back, `malloc_trim` or not.
//!
//! With the `jemalloc` feature (on by default) jemalloc is the process allocator, with its
//! per-thread caches off (`tcache:false`, read from `_rjem_malloc_conf` below). Thread
//! caches are what kept each thread's freed blocks on pages of its own; without them the
//! freed runs coalesce and [`release_free_memory`] purges them. Measured at 100 000 queues:
//! +27 to +32 MiB after the reap in six runs of seven (one +56 MiB), against +116 to +153
//! MiB with glibc; jemalloc with its default settings was no better than glibc, mimalloc
//! far worse (+617 MiB). P1 and P2 are in docs/performance.md beside the glibc figures.
//!
//! What stays after a purge follows the burst's *peak*, not what is still live: jemalloc
//! never returns its metadata for the extents it mapped (22 MB after a 1 GB peak). That is
//! why the vendored sled's long batches (over 4 096 writes) repin their epoch guard
//! (vendor/sled/PATCHES.md): the peak fell from ~960 to ~550 MiB and the RSS after the
//! reap to about +28 MiB.
//!
//! C libraries (librdkafka, OpenSSL) still call glibc's `malloc`: the `_rjem_` prefix keeps
//! jemalloc to Rust's allocations (Lua's too: mlua allocates through Rust), so a release
//! trims glibc as well.

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its first allocation. `tcache:false`: see the module
/// documentation. The symbol is what tikv-jemalloc-sys's prefixed jemalloc looks up.
#[cfg(feature = "jemalloc")]
#[used]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 13] = b"tcache:false\0";

/// Returns free heap pages to the system: jemalloc's dirty pages in every arena are purged,
/// and glibc's arenas are trimmed. Safe to call from any thread at any time; it takes the
/// allocators' own locks, so call it off the async threads after a burst, not per request.
pub fn release_free_memory() {
    #[cfg(feature = "jemalloc")]
    purge_jemalloc();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes the arena
    // locks itself and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena's unused dirty pages go back at once.
#[cfg(feature = "jemalloc")]
fn purge_jemalloc() {
    const PURGE_ALL_ARENAS: &std::ffi::CStr = c"arena.4096.purge";
    // SAFETY: a void mallctl (no old or new value) with a NUL-terminated name.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL_ARENAS.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(
            rc,
            "jemalloc purge failed; free pages stay until they decay"
        );
    }
}

/// Which allocator serves Rust's allocations, for the startup log line.
pub fn allocator() -> &'static str {
    if cfg!(feature = "jemalloc") {
        "jemalloc (tcache off)"
    } else {
        "system"
    }
}

#[cfg(all(test, feature = "jemalloc"))]
mod tests {
    /// The options reached jemalloc: a misspelt or unlinked `_rjem_malloc_conf` would
    /// leave the thread caches on, silently, and the reap would keep its garbage.
    #[test]
    fn jemalloc_runs_with_thread_caches_off() {
        let mut tcache = true;
        let mut len = std::mem::size_of::<bool>();
        // SAFETY: `opt.tcache` is a bool; old value and length point at a bool and its size.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"opt.tcache".as_ptr(),
                (&mut tcache as *mut bool).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "mallctl opt.tcache");
        assert!(
            !tcache,
            "jemalloc's thread caches are on: malloc_conf was not read"
        );
    }
}
