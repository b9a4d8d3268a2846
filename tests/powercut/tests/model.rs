//! The layer's model, case by case: what a power cut keeps and what it drops. Each case has
//! its negative control (the same steps without the sync loses the change).

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

use common::{read, sync_dir, write_synced, Rig};

/// A file whose name is already durable, holding `data` durably.
fn durable_file(rig: &Rig, name: &str, data: &[u8]) -> std::path::PathBuf {
    let path = rig.path(name);
    write_synced(&path, data);
    sync_dir(path.parent().unwrap());
    path
}

#[test]
fn fsynced_data_survives_a_cut_and_unsynced_data_is_lost() {
    let Some(rig) = Rig::new() else { return };
    let path = durable_file(&rig, "log", b"acked;");
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"synced;").unwrap();
    f.sync_data().unwrap();
    f.write_all(b"not synced;").unwrap();
    // Readers see every write at once.
    assert_eq!(read(&path).unwrap(), b"acked;synced;not synced;");
    rig.cut();
    assert_eq!(read(&path).unwrap(), b"acked;synced;");
}

#[test]
fn an_overwrite_without_fsync_is_undone() {
    let Some(rig) = Rig::new() else { return };
    let old: Vec<u8> = (0..3 * 4096u32).map(|i| i as u8).collect();
    let path = durable_file(&rig, "pages", &old);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xEE; 100], 4090).unwrap(); // spans two pages
    assert_ne!(read(&path).unwrap(), old);
    rig.cut();
    assert_eq!(read(&path).unwrap(), old);
}

#[test]
fn sync_file_range_persists_nothing() {
    let Some(rig) = Rig::new() else { return };
    let path = durable_file(&rig, "db", b"");
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"flushed the sled way", 0).unwrap();
    // What sled 0.34's flush() does (sled #1452). Linux never passes it to FUSE.
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a valid open fd and plain integer arguments.
    let ret = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 20, flags) };
    assert_eq!(
        ret,
        0,
        "sync_file_range: {}",
        std::io::Error::last_os_error()
    );
    rig.cut();
    assert_eq!(read(&path).unwrap(), b"");
}

#[test]
fn a_new_file_needs_its_directory_fsynced() {
    let Some(rig) = Rig::new() else { return };
    let path = rig.path("new");
    write_synced(&path, b"data fsynced, entry not");
    rig.cut();
    assert_eq!(
        read(&path),
        None,
        "strict model: the entry was never made durable"
    );

    write_synced(&path, b"data and entry fsynced");
    sync_dir(&rig.root);
    let late = rig.path("after-dir-sync");
    write_synced(&late, b"created after the directory sync");
    rig.cut();
    assert_eq!(read(&path).unwrap(), b"data and entry fsynced");
    assert_eq!(read(&late), None);
}

#[test]
fn an_entry_made_durable_without_its_data_comes_back_empty() {
    let Some(rig) = Rig::new() else { return };
    let path = rig.path("entry-only");
    std::fs::write(&path, b"never fsynced").unwrap();
    sync_dir(&rig.root);
    rig.cut();
    assert_eq!(read(&path).unwrap(), b"");
}

#[test]
fn a_new_directory_needs_its_parent_fsynced() {
    let Some(rig) = Rig::new() else { return };
    let (dir, file) = (rig.path("d"), rig.path("d/f"));
    std::fs::create_dir(&dir).unwrap();
    write_synced(&file, b"x");
    sync_dir(&dir);
    rig.cut();
    assert!(
        !dir.exists(),
        "the directory's own entry was never made durable"
    );

    std::fs::create_dir(&dir).unwrap();
    write_synced(&file, b"y");
    sync_dir(&dir);
    sync_dir(&rig.root);
    rig.cut();
    assert_eq!(read(&file).unwrap(), b"y");
}

#[test]
fn a_rename_is_durable_only_after_its_directory_is_fsynced() {
    let Some(rig) = Rig::new() else { return };
    durable_file(&rig, "old", b"contents");
    std::fs::rename(rig.path("old"), rig.path("new")).unwrap();
    rig.cut();
    assert_eq!(read(&rig.path("old")).unwrap(), b"contents");
    assert_eq!(read(&rig.path("new")), None);

    std::fs::rename(rig.path("old"), rig.path("new")).unwrap();
    sync_dir(&rig.root);
    rig.cut();
    assert_eq!(read(&rig.path("old")), None);
    assert_eq!(read(&rig.path("new")).unwrap(), b"contents");
}

#[test]
fn replacing_a_file_by_rename_is_atomic_at_the_directory_fsync() {
    let Some(rig) = Rig::new() else { return };
    durable_file(&rig, "conf", b"version 1");
    // The classic pattern: write a temporary file, fsync it, rename it over the target.
    write_synced(&rig.path("conf.tmp"), b"version 2");
    std::fs::rename(rig.path("conf.tmp"), rig.path("conf")).unwrap();
    assert_eq!(read(&rig.path("conf")).unwrap(), b"version 2");
    rig.cut();
    assert_eq!(
        read(&rig.path("conf")).unwrap(),
        b"version 1",
        "no directory fsync yet"
    );
    assert_eq!(read(&rig.path("conf.tmp")), None);

    write_synced(&rig.path("conf.tmp"), b"version 2");
    std::fs::rename(rig.path("conf.tmp"), rig.path("conf")).unwrap();
    sync_dir(&rig.root);
    rig.cut();
    assert_eq!(read(&rig.path("conf")).unwrap(), b"version 2");
    assert_eq!(read(&rig.path("conf.tmp")), None);
}

#[test]
fn a_rename_across_directories_is_durable_with_the_new_directory() {
    let Some(rig) = Rig::new() else { return };
    for dir in ["a", "b"] {
        std::fs::create_dir(rig.path(dir)).unwrap();
    }
    sync_dir(&rig.root);
    durable_file(&rig, "a/f", b"moving");
    std::fs::rename(rig.path("a/f"), rig.path("b/f")).unwrap();
    sync_dir(&rig.path("a")); // only the old directory: the old name stays durable
    rig.cut();
    assert_eq!(read(&rig.path("a/f")).unwrap(), b"moving");
    assert_eq!(read(&rig.path("b/f")), None);

    std::fs::rename(rig.path("a/f"), rig.path("b/f")).unwrap();
    sync_dir(&rig.path("b"));
    rig.cut();
    assert_eq!(read(&rig.path("a/f")), None);
    assert_eq!(read(&rig.path("b/f")).unwrap(), b"moving");
}

#[test]
fn an_unlink_is_durable_only_after_its_directory_is_fsynced() {
    let Some(rig) = Rig::new() else { return };
    durable_file(&rig, "victim", b"still here");
    std::fs::remove_file(rig.path("victim")).unwrap();
    assert_eq!(read(&rig.path("victim")), None);
    rig.cut();
    assert_eq!(read(&rig.path("victim")).unwrap(), b"still here");

    std::fs::remove_file(rig.path("victim")).unwrap();
    sync_dir(&rig.root);
    rig.cut();
    assert_eq!(read(&rig.path("victim")), None);
    assert_eq!(std::fs::read_dir(&rig.root).unwrap().count(), 0);
}

#[test]
fn a_truncate_is_durable_only_after_fsync() {
    let Some(rig) = Rig::new() else { return };
    let old = vec![7u8; 10_000];
    let path = durable_file(&rig, "t", &old);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(100).unwrap();
    rig.cut();
    assert_eq!(
        read(&path).unwrap(),
        old,
        "ftruncate without fsync is undone"
    );

    // Shrink, grow again, fsync: what lay beyond the shrink point reads as zeros.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(10).unwrap();
    f.set_len(8192).unwrap();
    f.write_all_at(b"tail", 8000).unwrap();
    f.sync_all().unwrap();
    rig.cut();
    let now = read(&path).unwrap();
    assert_eq!(now.len(), 8192);
    assert_eq!(&now[..10], &[7u8; 10]);
    assert!(now[10..8000].iter().all(|b| *b == 0));
    assert_eq!(&now[8000..8004], b"tail");
}

#[test]
fn o_trunc_and_fallocate_are_size_changes_durable_at_fsync() {
    let Some(rig) = Rig::new() else { return };
    let path = durable_file(&rig, "f", b"old contents");
    drop(File::create(&path).unwrap()); // O_TRUNC
    assert_eq!(read(&path).unwrap(), b"");
    rig.cut();
    assert_eq!(read(&path).unwrap(), b"old contents");

    let f = OpenOptions::new().write(true).open(&path).unwrap();
    // SAFETY: a valid fd; mode 0 preallocates and extends the file.
    let ret = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 65536) };
    assert_eq!(ret, 0, "fallocate: {}", std::io::Error::last_os_error());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 65536);
    rig.cut();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 12);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    // SAFETY: as above.
    let ret = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 65536) };
    assert_eq!(ret, 0);
    f.sync_data().unwrap();
    rig.cut();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 65536);
}

#[test]
fn o_dsync_writes_are_durable_when_they_return() {
    let Some(rig) = Rig::new() else { return };
    let path = durable_file(&rig, "dsync", b"");
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(&path)
        .unwrap();
    f.write_all(b"written with O_DSYNC").unwrap();
    let mut plain = OpenOptions::new().append(true).open(&path).unwrap();
    plain.write_all(b"; not this").unwrap();
    rig.cut();
    assert_eq!(read(&path).unwrap(), b"written with O_DSYNC");
}

#[test]
fn handles_open_at_the_cut_are_dead() {
    let Some(rig) = Rig::new() else { return };
    let path = durable_file(&rig, "f", b"before");
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    rig.cut();
    // A process that "survived" the cut cannot write into the world after it...
    let err = f.write_all_at(b"from beyond", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(err.raw_os_error(), f.sync_all().unwrap_err().raw_os_error());
    // ...and the file itself is what the disk held.
    assert_eq!(read(&path).unwrap(), b"before");
}

#[test]
fn the_backing_directory_holds_exactly_what_is_durable() {
    let Some(rig) = Rig::new() else { return };
    durable_file(&rig, "durable", b"yes");
    std::fs::write(rig.path("volatile"), b"no").unwrap();
    let backing = rig.layer.backing().to_path_buf();
    assert_eq!(read(&backing.join("durable")).unwrap(), b"yes");
    assert_eq!(read(&backing.join("volatile")), None);
    let report = rig.layer.cut().unwrap();
    assert_eq!(report.files_with_unsynced_data, 1);
    assert_eq!(report.dirs_with_unsynced_entries, 1);
}

#[test]
fn o_direct_writes_are_not_durable_without_fsync() {
    let Some(rig) = Rig::new() else { return };
    let path = durable_file(&rig, "direct", b"");
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    // O_DIRECT wants an aligned buffer on most filesystems: give it one.
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: a non-zero size; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buf.is_null());
    // SAFETY: `buf` points to 4096 initialised (zeroed) bytes.
    let page = unsafe { std::slice::from_raw_parts_mut(buf, 4096) };
    page[..6].copy_from_slice(b"direct");
    let written = f.write_at(page, 0);
    // SAFETY: allocated above with `layout`.
    unsafe { std::alloc::dealloc(buf, layout) };
    assert_eq!(written.unwrap(), 4096);
    assert_eq!(&read(&path).unwrap()[..6], b"direct");
    rig.cut();
    assert_eq!(
        read(&path).unwrap(),
        b"",
        "O_DIRECT is no durability promise"
    );
}

#[test]
fn writes_beyond_the_in_memory_cap_fail_cleanly() {
    let Some(rig) = Rig::new() else { return };
    let f = File::create(rig.path("huge")).unwrap();
    let err = f.write_all_at(b"x", 1 << 31).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    assert_eq!(f.metadata().unwrap().len(), 0);
}
