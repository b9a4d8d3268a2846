//! The layer's memory: the visible tree, per-file dirty pages, and where each node's durable
//! copy lives in the backing directory. Every function here runs under the one state lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Dirty data is tracked in pages of this size.
pub const PAGE: u64 = 4096;
/// Backing directory entry that holds durable copies not (yet) linked into the durable tree.
/// It is hidden from the mount and emptied at every load: what only it holds is unreachable
/// after a power cut, like an orphan inode that fsck frees.
pub const PENDING_DIR: &str = ".powercut-pending";
pub const ROOT: u64 = 1;

/// Where a node's durable copy is in the backing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The backing directory itself (the root node only).
    Root,
    /// `<backing>/.powercut-pending/<ino>`: durable bytes, but no durable name.
    Pending,
    /// `<path of parent>/<name>`: reachable after a power cut.
    Linked(u64, OsString),
}

#[derive(Debug)]
pub enum Kind {
    File(FileNode),
    Dir(DirNode),
}

#[derive(Debug, Default)]
pub struct FileNode {
    /// What readers of the mount see: the durable bytes with every later write applied.
    pub data: Vec<u8>,
    /// Pages written since the last fsync.
    pub dirty: BTreeSet<u64>,
    /// The smallest size the file had since the last fsync, if it shrank.
    pub shrunk_to: Option<u64>,
    /// The durable copy (open while the node has a place; survives renames in the backing tree).
    pub backing: Option<File>,
}

#[derive(Debug, Default)]
pub struct DirNode {
    /// Entries as readers of the mount see them.
    pub entries: BTreeMap<OsString, u64>,
    /// Entries as the backing directory holds them (changed only by `fsyncdir`).
    pub durable: BTreeMap<OsString, u64>,
}

#[derive(Debug)]
pub struct Node {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// The node's visible name (hard links are not supported: one name at most).
    pub parent: Option<(u64, OsString)>,
    /// Where its durable copy is, if it has one.
    pub place: Option<Place>,
    /// Open file handles.
    pub open: u32,
}

impl Node {
    pub fn new(kind: Kind, perm: u16, uid: u32, gid: u32) -> Node {
        let now = SystemTime::now();
        Node {
            kind,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            parent: None,
            place: None,
            open: 0,
        }
    }

    pub fn dir(&self) -> Option<&DirNode> {
        match &self.kind {
            Kind::Dir(d) => Some(d),
            Kind::File(_) => None,
        }
    }

    pub fn dir_mut(&mut self) -> Option<&mut DirNode> {
        match &mut self.kind {
            Kind::Dir(d) => Some(d),
            Kind::File(_) => None,
        }
    }

    pub fn file_mut(&mut self) -> Option<&mut FileNode> {
        match &mut self.kind {
            Kind::File(f) => Some(f),
            Kind::Dir(_) => None,
        }
    }

    pub fn size(&self) -> u64 {
        match &self.kind {
            Kind::File(f) => f.data.len() as u64,
            Kind::Dir(d) => d.entries.len() as u64,
        }
    }
}

/// An open file or directory handle.
#[derive(Debug, Clone, Copy)]
pub struct Handle {
    pub ino: u64,
    /// `open(2)` flags, to see `O_SYNC`/`O_DSYNC`.
    pub flags: i32,
}

/// What a power cut threw away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files with writes or size changes that no fsync had made durable.
    pub files_with_unsynced_data: usize,
    /// Pages of unsynced data dropped.
    pub dirty_pages: usize,
    /// Directories whose visible entries differed from their durable ones (no `fsyncdir` since).
    pub dirs_with_unsynced_entries: usize,
    /// Open handles invalidated (their later calls fail with EIO).
    pub handles_invalidated: usize,
}

#[derive(Debug)]
pub struct State {
    pub backing: PathBuf,
    pub nodes: HashMap<u64, Node>,
    pub handles: HashMap<u64, Handle>,
    /// Never reused, also not across power cuts: the kernel may still hold old numbers.
    next_ino: u64,
    next_fh: u64,
    /// fsync/fdatasync/fsyncdir calls seen (for tests and the binary's log).
    pub syncs: u64,
    /// Descriptors open on the mount, including those a cut invalidated (until released).
    pub open_fds: u64,
}

fn io_at(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

impl State {
    /// Loads the durable tree under `backing`: what a machine sees after power comes back.
    pub fn load(backing: &Path) -> io::Result<State> {
        let mut state = State {
            backing: backing.to_path_buf(),
            nodes: HashMap::new(),
            handles: HashMap::new(),
            next_ino: ROOT + 1,
            next_fh: 1,
            syncs: 0,
            open_fds: 0,
        };
        state.reload()?;
        Ok(state)
    }

    /// Forgets everything not durable and rebuilds the visible tree from the backing directory.
    pub fn reload(&mut self) -> io::Result<()> {
        self.nodes.clear();
        self.handles.clear();
        let pending = self.backing.join(PENDING_DIR);
        match fs::remove_dir_all(&pending) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(e, "emptying", &pending)),
        }
        fs::create_dir_all(&pending).map_err(|e| io_at(e, "creating", &pending))?;
        let meta = fs::metadata(&self.backing).map_err(|e| io_at(e, "reading", &self.backing))?;
        let mut root = Node::new(Kind::Dir(DirNode::default()), 0o755, 0, 0);
        root.perm = (meta.mode() & 0o7777) as u16;
        root.uid = meta.uid();
        root.gid = meta.gid();
        root.place = Some(Place::Root);
        self.nodes.insert(ROOT, root);
        let backing = self.backing.clone();
        self.load_dir(ROOT, &backing)
    }

    fn load_dir(&mut self, dir_ino: u64, path: &Path) -> io::Result<()> {
        let listing = fs::read_dir(path).map_err(|e| io_at(e, "listing", path))?;
        for entry in listing {
            let entry = entry.map_err(|e| io_at(e, "listing", path))?;
            let name = entry.file_name();
            if dir_ino == ROOT && name == PENDING_DIR {
                continue;
            }
            let child_path = entry.path();
            let meta =
                fs::symlink_metadata(&child_path).map_err(|e| io_at(e, "reading", &child_path))?;
            let kind = if meta.is_dir() {
                Kind::Dir(DirNode::default())
            } else if meta.is_file() {
                let backing = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&child_path)
                    .map_err(|e| io_at(e, "opening", &child_path))?;
                let data = fs::read(&child_path).map_err(|e| io_at(e, "reading", &child_path))?;
                Kind::File(FileNode {
                    data,
                    backing: Some(backing),
                    ..FileNode::default()
                })
            } else {
                // Symlinks, fifos, sockets: not modelled, so not shown.
                continue;
            };
            let is_dir = meta.is_dir();
            let mut node = Node::new(kind, (meta.mode() & 0o7777) as u16, meta.uid(), meta.gid());
            if let Ok(t) = meta.modified() {
                node.mtime = t;
                node.ctime = t;
            }
            node.parent = Some((dir_ino, name.clone()));
            node.place = Some(Place::Linked(dir_ino, name.clone()));
            let ino = self.alloc_ino();
            self.nodes.insert(ino, node);
            let dir = self.dir_mut(dir_ino)?;
            dir.entries.insert(name.clone(), ino);
            dir.durable.insert(name, ino);
            if is_dir {
                self.load_dir(ino, &child_path)?;
            }
        }
        Ok(())
    }

    /// What a power cut would throw away right now.
    pub fn unsynced(&self) -> CutReport {
        let mut report = CutReport {
            handles_invalidated: self.handles.len(),
            ..CutReport::default()
        };
        for node in self.nodes.values() {
            match &node.kind {
                Kind::File(f) => {
                    if !f.dirty.is_empty() || f.shrunk_to.is_some() {
                        report.files_with_unsynced_data += 1;
                    }
                    report.dirty_pages += f.dirty.len();
                }
                Kind::Dir(d) => {
                    if d.entries != d.durable {
                        report.dirs_with_unsynced_entries += 1;
                    }
                }
            }
        }
        report
    }

    pub fn alloc_ino(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    pub fn open_handle(&mut self, ino: u64, flags: i32) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.open_fds += 1;
        self.handles.insert(fh, Handle { ino, flags });
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.open += 1;
        }
        fh
    }

    pub fn close_handle(&mut self, fh: u64) -> io::Result<()> {
        self.open_fds = self.open_fds.saturating_sub(1);
        if let Some(handle) = self.handles.remove(&fh) {
            if let Some(node) = self.nodes.get_mut(&handle.ino) {
                node.open = node.open.saturating_sub(1);
            }
            self.maybe_forget(handle.ino)?;
        }
        Ok(())
    }

    pub fn node(&self, ino: u64) -> io::Result<&Node> {
        self.nodes.get(&ino).ok_or_else(stale)
    }

    pub fn node_mut(&mut self, ino: u64) -> io::Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or_else(stale)
    }

    pub fn dir_mut(&mut self, ino: u64) -> io::Result<&mut DirNode> {
        self.node_mut(ino)?
            .dir_mut()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTDIR))
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> io::Result<u64> {
        let dir = self
            .node(parent)?
            .dir()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTDIR))?;
        dir.entries
            .get(name)
            .copied()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    /// Links a new node under `parent` (visible only).
    pub fn insert(&mut self, parent: u64, name: &OsStr, mut node: Node) -> io::Result<u64> {
        if self.lookup(parent, name).is_ok() {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        let ino = self.alloc_ino();
        node.parent = Some((parent, name.to_os_string()));
        self.nodes.insert(ino, node);
        self.dir_mut(parent)?
            .entries
            .insert(name.to_os_string(), ino);
        self.touch_dir(parent);
        Ok(ino)
    }

    /// Removes the visible entry `parent/name` (unlink, rmdir, or the target of a rename).
    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> io::Result<()> {
        let ino = self.lookup(parent, name)?;
        self.dir_mut(parent)?.entries.remove(name);
        self.touch_dir(parent);
        self.node_mut(ino)?.parent = None;
        self.maybe_forget(ino)
    }

    fn touch_dir(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.mtime = SystemTime::now();
            node.ctime = node.mtime;
        }
    }

    /// Drops a node nobody can reach any more: no visible name, no open handle and no
    /// durable name (a durable name goes only at the parent's `fsyncdir`).
    fn maybe_forget(&mut self, ino: u64) -> io::Result<()> {
        let Some(node) = self.nodes.get(&ino) else {
            return Ok(());
        };
        if node.parent.is_some()
            || node.open > 0
            || matches!(node.place, Some(Place::Linked(..)) | Some(Place::Root))
        {
            return Ok(());
        }
        self.discard(ino)
    }

    /// Removes a node and its durable copy (which is pending or unlinked by now).
    fn discard(&mut self, ino: u64) -> io::Result<()> {
        let children: Vec<u64> = match self.nodes.get(&ino).and_then(Node::dir) {
            Some(d) => d.durable.values().copied().collect(),
            None => Vec::new(),
        };
        // Durable children of a directory that goes: those still in use keep a pending copy.
        for child in children {
            let alive = self
                .nodes
                .get(&child)
                .is_some_and(|c| c.parent.is_some() || c.open > 0);
            if alive {
                self.move_to_pending(child)?;
            } else {
                self.nodes.remove(&child);
            }
        }
        let path = self.path_of(ino);
        let Some(node) = self.nodes.remove(&ino) else {
            return Ok(());
        };
        if let Some(path) = path {
            let result = match node.kind {
                Kind::Dir(_) => fs::remove_dir_all(&path),
                Kind::File(_) => fs::remove_file(&path),
            };
            match result {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(e, "removing", &path)),
            }
        }
        Ok(())
    }

    /// The backing path of a node's durable copy.
    pub fn path_of(&self, ino: u64) -> Option<PathBuf> {
        match &self.nodes.get(&ino)?.place {
            None => None,
            Some(Place::Root) => Some(self.backing.clone()),
            Some(Place::Pending) => Some(self.backing.join(PENDING_DIR).join(ino.to_string())),
            Some(Place::Linked(parent, name)) => Some(self.path_of(*parent)?.join(name)),
        }
    }

    /// Gives a node a durable copy (empty file, empty directory) if it has none yet.
    fn materialize(&mut self, ino: u64) -> io::Result<()> {
        if self.node(ino)?.place.is_some() {
            return Ok(());
        }
        let path = self.backing.join(PENDING_DIR).join(ino.to_string());
        let node = self.node_mut(ino)?;
        let perm = fs::Permissions::from_mode(u32::from(node.perm));
        match &mut node.kind {
            Kind::Dir(_) => fs::create_dir(&path).map_err(|e| io_at(e, "creating", &path))?,
            Kind::File(f) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| io_at(e, "creating", &path))?;
                // Everything the file holds is dirty relative to an empty durable copy.
                f.dirty = (0..(f.data.len() as u64).div_ceil(PAGE)).collect();
                f.shrunk_to = Some(0);
                f.backing = Some(file);
            }
        }
        fs::set_permissions(&path, perm).map_err(|e| io_at(e, "chmod", &path))?;
        node.place = Some(Place::Pending);
        Ok(())
    }

    fn move_to_pending(&mut self, ino: u64) -> io::Result<()> {
        let Some(from) = self.path_of(ino) else {
            return Ok(());
        };
        let to = self.backing.join(PENDING_DIR).join(ino.to_string());
        fs::rename(&from, &to).map_err(|e| io_at(e, "moving aside", &from))?;
        self.set_place(ino, Place::Pending)
    }

    fn set_place(&mut self, ino: u64, place: Place) -> io::Result<()> {
        if let Some(Place::Linked(old_parent, old_name)) = self.node(ino)?.place.clone() {
            if let Some(dir) = self.nodes.get_mut(&old_parent).and_then(Node::dir_mut) {
                if dir.durable.get(&old_name) == Some(&ino) {
                    dir.durable.remove(&old_name);
                }
            }
        }
        if let Place::Linked(parent, name) = &place {
            self.dir_mut(*parent)?.durable.insert(name.clone(), ino);
        }
        self.node_mut(ino)?.place = Some(place);
        Ok(())
    }

    /// FUSE `fsync`/`fdatasync` of a file: its data and size become durable (not its name).
    pub fn sync_file(&mut self, ino: u64) -> io::Result<()> {
        self.syncs += 1;
        self.materialize(ino)?;
        let path = self.path_of(ino).unwrap_or_default();
        let node = self.node_mut(ino)?;
        let Some(f) = node.file_mut() else {
            return Ok(());
        };
        let Some(backing) = f.backing.as_ref() else {
            return Ok(());
        };
        let len = f.data.len() as u64;
        let fail = |e| io_at(e, "writing back", &path);
        if let Some(shrunk) = f.shrunk_to {
            backing.set_len(shrunk).map_err(fail)?;
        }
        for page in &f.dirty {
            let start = page * PAGE;
            if start >= len {
                continue;
            }
            let end = (start + PAGE).min(len);
            backing
                .write_all_at(&f.data[start as usize..end as usize], start)
                .map_err(fail)?;
        }
        backing.set_len(len).map_err(fail)?;
        f.dirty.clear();
        f.shrunk_to = None;
        Ok(())
    }

    /// FUSE `fsyncdir`: the directory's entries as readers see them become its durable entries.
    /// A node renamed here from another directory moves with it (its old durable name goes
    /// too, as one journaled rename would); a node renamed from here to another directory
    /// keeps its old durable name until that directory is synced.
    pub fn sync_dir(&mut self, dir_ino: u64) -> io::Result<()> {
        self.syncs += 1;
        self.materialize(dir_ino)?;
        let (visible, durable) = match self.node(dir_ino)?.dir() {
            Some(d) => (d.entries.clone(), d.durable.clone()),
            None => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        };
        // Durable entries that readers no longer see under that name.
        for (name, ino) in &durable {
            if visible.get(name) == Some(ino) {
                continue;
            }
            let Some(node) = self.nodes.get(ino) else {
                continue;
            };
            let renamed_away = node.parent.is_some();
            if renamed_away && !visible.contains_key(name) {
                // Its new directory's fsyncdir will move it.
                continue;
            }
            if renamed_away || node.open > 0 {
                self.move_to_pending(*ino)?;
            } else {
                // Gone for good: its durable copy goes with the durable name.
                self.discard(*ino)?;
                self.dir_mut(dir_ino)?.durable.remove(name);
            }
        }
        // Visible entries not durable under that name yet.
        let dir_path = self.path_of(dir_ino).unwrap_or_default();
        for (name, ino) in &visible {
            let place = Place::Linked(dir_ino, name.clone());
            if self.node(*ino)?.place.as_ref() == Some(&place) {
                continue;
            }
            self.materialize(*ino)?;
            let from = self.path_of(*ino).unwrap_or_default();
            let to = dir_path.join(name);
            fs::rename(&from, &to).map_err(|e| io_at(e, "linking", &to))?;
            self.set_place(*ino, place)?;
        }
        Ok(())
    }
}

pub fn stale() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}
