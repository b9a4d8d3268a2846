//! The FUSE side: translates kernel requests into [`State`] calls. Every request takes the
//! one state lock, so the layer is single-threaded by design (tests need it correct, not fast).

use std::ffi::OsStr;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::state::{DirNode, FileNode, Kind, Node, State, PAGE, ROOT};

/// Zero: the kernel asks again on every path walk, so nothing it cached outlives a power cut.
const TTL: Duration = Duration::ZERO;
/// Files live in memory: a write or size beyond this fails with EFBIG instead of exhausting it.
const MAX_FILE: u64 = 1 << 30;

pub struct PowerCutFs {
    pub state: Arc<Mutex<State>>,
}

fn errno(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn err(code: i32) -> Errno {
    Errno::from_i32(code)
}

fn attr(ino: u64, node: &Node) -> FileAttr {
    let (kind, nlink) = match node.kind {
        Kind::Dir(_) => (FileType::Directory, 2),
        Kind::File(_) => (FileType::RegularFile, 1),
    };
    let size = node.size();
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: node.atime,
        mtime: node.mtime,
        ctime: node.ctime,
        crtime: node.ctime,
        kind,
        perm: node.perm,
        nlink,
        uid: node.uid,
        gid: node.gid,
        rdev: 0,
        blksize: PAGE as u32,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// `O_SYNC` includes the `O_DSYNC` bit on Linux: each write is durable when it returns.
fn is_dsync(flags: i32) -> bool {
    flags & libc::O_DSYNC != 0
}

impl PowerCutFs {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(state: &State, ino: u64, reply: ReplyEntry) {
        match state.node(ino) {
            Ok(node) => reply.entry(&TTL, &attr(ino, node), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// The handle `fh` if it is still valid for `ino` (a power cut invalidates every handle).
    fn handle(state: &State, ino: u64, fh: FileHandle) -> Result<crate::state::Handle, Errno> {
        match state.handles.get(&fh.0) {
            Some(h) if h.ino == ino => Ok(*h),
            _ => Err(err(libc::EIO)),
        }
    }

    fn resize(state: &mut State, ino: u64, size: u64) -> io::Result<()> {
        if size > MAX_FILE {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let node = state.node_mut(ino)?;
        let f = node
            .file_mut()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EISDIR))?;
        let old = f.data.len() as u64;
        if size < old {
            f.shrunk_to = Some(f.shrunk_to.map_or(size, |s| s.min(size)));
            f.dirty.retain(|page| page * PAGE < size);
        }
        f.data.resize(size as usize, 0);
        node.mtime = SystemTime::now();
        node.ctime = node.mtime;
        Ok(())
    }
}

impl Filesystem for PowerCutFs {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> io::Result<()> {
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = self.lock();
        match state.lookup(parent.0, name) {
            Ok(ino) => Self::entry(&state, ino, reply),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let state = self.lock();
        match state.node(ino.0) {
            Ok(node) => reply.attr(&TTL, &attr(ino.0, node)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.lock();
        let result = (|| {
            if let Some(size) = size {
                Self::resize(&mut state, ino.0, size)?;
            }
            let node = state.node_mut(ino.0)?;
            if let Some(mode) = mode {
                node.perm = (mode & 0o7777) as u16;
            }
            if let Some(uid) = uid {
                node.uid = uid;
            }
            if let Some(gid) = gid {
                node.gid = gid;
            }
            if let Some(t) = atime {
                node.atime = time(t);
            }
            if let Some(t) = mtime {
                node.mtime = time(t);
            }
            Ok(attr(ino.0, node))
        })();
        match result {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut state = self.lock();
        let perm = (mode & !umask & 0o7777) as u16;
        let node = Node::new(Kind::Dir(DirNode::default()), perm, req.uid(), req.gid());
        match state.insert(parent.0, name, node) {
            Ok(ino) => Self::entry(&state, ino, reply),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.lock();
        let result = state.lookup(parent.0, name).and_then(|ino| {
            if state.node(ino)?.dir().is_some() {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            state.unlink(parent.0, name)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.lock();
        let result = state.lookup(parent.0, name).and_then(|ino| {
            match state.node(ino)?.dir() {
                None => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                Some(d) if !d.entries.is_empty() => {
                    return Err(io::Error::from_raw_os_error(libc::ENOTEMPTY))
                }
                Some(_) => {}
            }
            state.unlink(parent.0, name)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut state = self.lock();
        let result = (|| {
            if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let ino = state.lookup(parent.0, name)?;
            let moving_dir = state.node(ino)?.dir().is_some();
            // A directory cannot move below itself.
            let mut up = Some(newparent.0);
            while let Some(at) = up {
                if at == ino {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                up = state.node(at)?.parent.as_ref().map(|(p, _)| *p);
            }
            if let Ok(target) = state.lookup(newparent.0, newname) {
                if target == ino {
                    return Ok(());
                }
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(io::Error::from_raw_os_error(libc::EEXIST));
                }
                match (moving_dir, state.node(target)?.dir()) {
                    (true, None) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                    (false, Some(_)) => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
                    (true, Some(d)) if !d.entries.is_empty() => {
                        return Err(io::Error::from_raw_os_error(libc::ENOTEMPTY))
                    }
                    _ => {}
                }
                state.unlink(newparent.0, newname)?;
            }
            state.dir_mut(parent.0)?.entries.remove(name);
            state
                .dir_mut(newparent.0)?
                .entries
                .insert(newname.to_os_string(), ino);
            let node = state.node_mut(ino)?;
            node.parent = Some((newparent.0, newname.to_os_string()));
            node.ctime = SystemTime::now();
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.lock();
        match state.node(ino.0) {
            Ok(node) if node.dir().is_some() => reply.error(err(libc::EISDIR)),
            Ok(_) => {
                let fh = state.open_handle(ino.0, flags.0);
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.lock();
        let perm = (mode & !umask & 0o7777) as u16;
        let node = Node::new(Kind::File(FileNode::default()), perm, req.uid(), req.gid());
        match state.insert(parent.0, name, node) {
            Ok(ino) => {
                let fh = state.open_handle(ino, flags);
                match state.node(ino) {
                    Ok(node) => reply.created(
                        &TTL,
                        &attr(ino, node),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::FOPEN_DIRECT_IO,
                    ),
                    Err(e) => reply.error(errno(e)),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let state = self.lock();
        if let Err(e) = Self::handle(&state, ino.0, fh) {
            return reply.error(e);
        }
        match state.node(ino.0).map(|n| &n.kind) {
            Ok(Kind::File(f)) => {
                let start = (offset as usize).min(f.data.len());
                let end = (start + size as usize).min(f.data.len());
                reply.data(&f.data[start..end]);
            }
            Ok(Kind::Dir(_)) => reply.error(err(libc::EISDIR)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.lock();
        let handle = match Self::handle(&state, ino.0, fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let result = (|| {
            let node = state.node_mut(ino.0)?;
            let f = node
                .file_mut()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EISDIR))?;
            if data.is_empty() {
                return Ok(());
            }
            if offset + data.len() as u64 > MAX_FILE {
                return Err(io::Error::from_raw_os_error(libc::EFBIG));
            }
            let end = offset as usize + data.len();
            if f.data.len() < end {
                f.data.resize(end, 0);
            }
            f.data[offset as usize..end].copy_from_slice(data);
            f.dirty.extend(offset / PAGE..=(end as u64 - 1) / PAGE);
            node.mtime = SystemTime::now();
            node.ctime = node.mtime;
            if is_dsync(flags.0) || is_dsync(handle.flags) {
                state.sync_file(ino.0)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) promises nothing about durability.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.lock().close_handle(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.lock();
        if let Err(e) = Self::handle(&state, ino.0, fh) {
            return reply.error(e);
        }
        match state.sync_file(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing_free_log(&e);
                reply.error(errno(e))
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.lock();
        match state.node(ino.0) {
            Ok(node) if node.dir().is_none() => reply.error(err(libc::ENOTDIR)),
            Ok(_) => {
                let fh = state.open_handle(ino.0, flags.0);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = self.lock();
        if let Err(e) = Self::handle(&state, ino.0, fh) {
            return reply.error(e);
        }
        let node = match state.node(ino.0) {
            Ok(node) => node,
            Err(e) => return reply.error(errno(e)),
        };
        let Some(dir) = node.dir() else {
            return reply.error(err(libc::ENOTDIR));
        };
        let parent = node.parent.as_ref().map_or(ROOT, |(p, _)| *p);
        let mut all = vec![
            (ino.0, FileType::Directory, OsStr::new(".")),
            (parent, FileType::Directory, OsStr::new("..")),
        ];
        for (name, child) in &dir.entries {
            let kind = match state.nodes.get(child).map(|n| &n.kind) {
                Some(Kind::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((*child, kind, name.as_os_str()));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        match self.lock().close_handle(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.lock();
        if let Err(e) = Self::handle(&state, ino.0, fh) {
            return reply.error(e);
        }
        match state.sync_dir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing_free_log(&e);
                reply.error(errno(e))
            }
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Plenty of room: running out of space is another test's business.
        reply.statfs(
            1 << 24,
            1 << 23,
            1 << 23,
            1 << 20,
            1 << 19,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut state = self.lock();
        if let Err(e) = Self::handle(&state, ino.0, fh) {
            return reply.error(e);
        }
        // Plain preallocation only: it is a size change, durable at the next fsync like any.
        let result = match mode {
            0 => {
                let size = state.node(ino.0).map(Node::size).unwrap_or(0);
                if offset + length > size {
                    Self::resize(&mut state, ino.0, offset + length)
                } else {
                    Ok(())
                }
            }
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// A failing write-back is the layer's own fault (its backing directory), not the caller's:
/// say so on stderr, since the caller only sees EIO.
fn tracing_free_log(e: &io::Error) {
    eprintln!("powercut: write-back to the backing directory failed: {e}");
}
