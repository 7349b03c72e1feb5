//! Creating entries inside a staging root, safely, for every source kind.
//!
//! Containment is the kernel's job, not string checks': every parent directory is opened with
//! `openat2(root, parent, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so `..` and symlinks (absolute
//! or relative) resolve as if the stage were `/`; the last component is then acted on with `*at`
//! syscalls that never follow it (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `mkdirat`, `symlinkat`,
//! `linkat` with flags 0). Names are still normalized first ([`normalize`]), to reject `..`, NUL
//! and empty names with a clear message rather than a surprising result.
//!
//! Also owned here: replacing an existing entry (the later entry of a tar wins), ownership per
//! [`Ownership`], xattrs (what cannot be set is recorded), devices, OCI whiteouts in their overlayfs
//! form, and the final pass that gives directories their modes and mtimes once nothing more will
//! be created in them.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

use super::error::UnpackError;
use super::tar_reader::Region;
use super::Unpacked;
use crate::progress::Progress;
use crate::store::meta::{Device, Overrides, Ownership};

/// Copy buffer for file data: large enough for throughput, small enough for the RSS budget.
const COPY_BUF: usize = 1024 * 1024;

/// The bits an unprivileged store needs on a directory to read it back: owner read and search.
const DIR_READABLE: u32 = 0o500;

/// Overlayfs (mounted with `userxattr`) reads these; an archive must not smuggle them in.
const OVERLAY_XATTR_PREFIX: &[u8] = b"user.overlay.";
const OPAQUE_XATTR: &str = "user.overlay.opaque";

/// The metadata every entry carries.
#[derive(Clone, Copy, Debug)]
pub(super) struct Meta {
    /// Permission bits, including setuid/setgid/sticky (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timespec,
}

/// What an entry is, with what it needs to be created.
pub(super) enum Node<'a> {
    /// A regular file whose contents are read from the stream.
    File(&'a mut dyn Read),
    /// A sparse file: `data` holds the bytes of each region of `map` in turn; the rest are holes.
    Sparse { map: &'a [Region], data: &'a mut dyn Read },
    /// A regular file copied from another file (`dir:` sources: lets the kernel copy).
    CopyOf(&'a File),
    Dir,
    Symlink(&'a [u8]),
    /// A hardlink to an earlier entry; the target is a normalized path.
    Hardlink(&'a [u8]),
    Device { kind: char, major: u32, minor: u32 },
    Fifo,
}

/// An xattr as read from the source.
pub(super) type Xattrs = [(Vec<u8>, Vec<u8>)];

/// Normalizes an archive path into `out` the way GNU tar does: leading `/`, empty and `.`
/// components are dropped. `..` and NUL are refused (the kernel would contain them, but an
/// archive that needs them is hostile or broken, and the user should hear so). An empty result
/// means the root itself (`./`).
pub(super) fn normalize(raw: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    out.clear();
    if raw.is_empty() {
        return Err("the name is empty");
    }
    if raw.contains(&0) {
        return Err("the name contains a NUL byte");
    }
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("the name has a '..' component"),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(())
}

/// Splits a normalized path into its parent directory (possibly empty) and last component.
fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn os(bytes: &[u8]) -> &std::ffi::OsStr {
    std::ffi::OsStr::from_bytes(bytes)
}

/// The key of an entry (or of an xattr name) in [`Overrides`]: its bytes, kept apart from every
/// other name's (see [`crate::store::meta::key`]).
fn key(path: &[u8]) -> Cow<'_, str> {
    crate::store::meta::key(path)
}

/// An entry's name as an error message shows it.
fn shown(path: &[u8]) -> String {
    crate::store::tree::shown(path)
}

/// Opens directories inside the root, caching the last one: archives list a directory's entries
/// together, so most entries reuse it. The cache is dropped whenever anything is removed, since a
/// removed directory's fd would still work and silently swallow what is written under it.
struct Resolver<'r> {
    root: BorrowedFd<'r>,
    cached: Option<(Vec<u8>, OwnedFd)>,
    /// Directories made because an entry below them needed them, not listed themselves.
    implied: Vec<Vec<u8>>,
}

impl<'r> Resolver<'r> {
    fn open(&self, dir: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat2(
            self.root,
            os(dir),
            flags | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )?)
    }

    /// An `O_PATH` fd of `dir` (normalized), created with its missing ancestors (mode 0755), as
    /// GNU tar does for archives that do not list every directory.
    fn parent(&mut self, dir: &[u8]) -> io::Result<BorrowedFd<'_>> {
        if dir.is_empty() {
            return Ok(self.root);
        }
        if !matches!(&self.cached, Some((p, _)) if p.as_slice() == dir) {
            let fd = match self.open(dir, OFlags::PATH) {
                Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => self.create_dirs(dir)?,
                r => r?,
            };
            match &mut self.cached {
                Some((p, f)) => {
                    p.clear();
                    p.extend_from_slice(dir);
                    *f = fd;
                }
                None => self.cached = Some((dir.to_vec(), fd)),
            }
        }
        Ok(self.cached.as_ref().map_or(self.root, |(_, fd)| fd.as_fd()))
    }

    fn create_dirs(&mut self, dir: &[u8]) -> io::Result<OwnedFd> {
        let mut parent: Option<OwnedFd> = None;
        let mut end = 0;
        loop {
            let next = dir[end..].iter().position(|&b| b == b'/').map_or(dir.len(), |i| end + i);
            let prefix = &dir[..next];
            let fd = match self.open(prefix, OFlags::PATH) {
                Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => {
                    let at = parent.as_ref().map_or(self.root, |f| f.as_fd());
                    let name = os(split(prefix).1);
                    match rustix::fs::mkdirat(at, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {
                            rustix::fs::chmodat(at, name, Mode::from_raw_mode(0o755), AtFlags::empty())?;
                            self.implied.push(prefix.to_vec());
                        }
                        // A dangling symlink: the open below reports it.
                        Err(Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    self.open(prefix, OFlags::PATH)?
                }
                r => r?,
            };
            if next == dir.len() {
                return Ok(fd);
            }
            parent = Some(fd);
            end = next + 1;
        }
    }

    fn invalidate(&mut self) {
        self.cached = None;
    }
}

/// A directory whose mode and mtime are set after everything in it exists.
struct DeferredDir {
    path: Vec<u8>,
    mode: u32,
    mtime: Timespec,
}

/// One staging root being filled from one source.
pub(super) struct Stage<'r, 'p> {
    resolver: Resolver<'r>,
    archive: &'r str,
    ownership: Ownership,
    progress: &'p mut Progress,
    out: Unpacked,
    dirs: Vec<DeferredDir>,
    buf: Vec<u8>,
}

impl<'r, 'p> Stage<'r, 'p> {
    pub(super) fn new(root: BorrowedFd<'r>, archive: &'r str, ownership: Ownership, progress: &'p mut Progress) -> Self {
        Self {
            resolver: Resolver { root, cached: None, implied: Vec::new() },
            archive,
            ownership,
            progress,
            out: Unpacked { overrides: Overrides::new(ownership), ..Unpacked::default() },
            dirs: Vec::new(),
            buf: vec![0; COPY_BUF],
        }
    }

    pub(super) fn unsafe_entry(&self, raw: &[u8], reason: &'static str) -> UnpackError {
        UnpackError::Unsafe { archive: self.archive.to_owned(), entry: shown(raw), reason }
    }

    /// Creates the entry at normalized `path`, replacing whatever an earlier entry left there.
    pub(super) fn put(&mut self, path: &[u8], meta: &Meta, node: Node<'_>, xattrs: &Xattrs) -> Result<(), UnpackError> {
        self.progress.add_entry();
        if path.is_empty() {
            // The root itself (`./`): the store owns the stage root's metadata.
            return match node {
                Node::Dir => Ok(()),
                _ => Err(self.unsafe_entry(b"", "a non-directory cannot replace the layer root")),
            };
        }
        let (dir, name) = split(path);
        let name = os(name);
        match node {
            Node::File(data) => self.put_file(path, dir, name, meta, Data::Stream(data), xattrs),
            Node::Sparse { map, data } => self.put_file(path, dir, name, meta, Data::Sparse(map, data), xattrs),
            Node::CopyOf(file) => self.put_file(path, dir, name, meta, Data::Copy(file), xattrs),
            Node::Dir => self.put_dir(path, dir, name, meta, xattrs),
            Node::Symlink(target) => {
                if target.is_empty() || target.contains(&0) {
                    return Err(self.unsafe_entry(path, "the symlink target is empty or contains a NUL byte"));
                }
                self.put_special(path, dir, name, meta, xattrs, |at, name| rustix::fs::symlinkat(os(target), at, name))
            }
            Node::Hardlink(target) => self.put_hardlink(path, dir, name, target),
            Node::Fifo => self.put_special(path, dir, name, meta, xattrs, |at, name| {
                rustix::fs::mknodat(at, name, FileType::Fifo, Mode::from_raw_mode(meta.mode & 0o777), 0)
            }),
            // char 0:0 is an overlayfs whiteout: it works unprivileged and means the same in any mode.
            Node::Device { kind: 'c', major: 0, minor: 0 } => self.put_whiteout_node(path, dir, name),
            Node::Device { kind, major, minor } => match self.ownership {
                Ownership::Preserve => {
                    let ft = if kind == 'b' { FileType::BlockDevice } else { FileType::CharacterDevice };
                    let dev = rustix::fs::makedev(major, minor);
                    self.put_special(path, dir, name, meta, xattrs, |at, name| {
                        rustix::fs::mknodat(at, name, ft, Mode::from_raw_mode(meta.mode & 0o777), dev)
                    })
                }
                Ownership::Record => {
                    let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
                    if remove_existing(at, name).map_err(fail(self.archive, path, "remove existing entry"))? {
                        self.replaced(path);
                    }
                    let entry = self.out.overrides.entry(&key(path));
                    entry.device = Some(Device { kind, major, minor, mode: meta.mode & 0o7777, mtime: meta.mtime.tv_sec });
                    if (meta.uid, meta.gid) != (0, 0) {
                        entry.owner = Some((meta.uid, meta.gid));
                    }
                    for (name, value) in xattrs {
                        if name.starts_with(OVERLAY_XATTR_PREFIX) {
                            self.out.unset_xattrs.drop(name);
                        } else {
                            entry.xattrs.insert(key(name).into_owned(), hex::encode(value));
                            self.out.unset_xattrs.record(name);
                        }
                    }
                    self.out.skipped_devices += 1;
                    Ok(())
                }
            },
        }
    }

    /// `dir/.wh.name`: removes `dir/name` from this stage and leaves an overlayfs whiteout there.
    pub(super) fn whiteout(&mut self, dir: &[u8], name: &[u8], entry: &[u8]) -> Result<(), UnpackError> {
        self.progress.add_entry();
        let mut path = dir.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        self.put_whiteout_node(&path, dir, os(name)).map_err(|e| match e {
            UnpackError::Unpack { archive, step, source, .. } => {
                UnpackError::Unpack { archive, entry: shown(entry), step, source }
            }
            e => e,
        })
    }

    fn put_whiteout_node(&mut self, path: &[u8], dir: &[u8], name: &std::ffi::OsStr) -> Result<(), UnpackError> {
        let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
        let whiteout = |at| rustix::fs::mknodat(at, name, FileType::CharacterDevice, Mode::empty(), rustix::fs::makedev(0, 0));
        let ((), removed) = create_replacing(at, name, whiteout).map_err(fail(self.archive, path, "create whiteout (char 0:0)"))?;
        if removed {
            self.replaced(path);
        }
        Ok(())
    }

    /// `dir/.wh..wh..opq`: marks `dir` (created if missing) opaque for overlayfs.
    pub(super) fn opaque(&mut self, dir: &[u8], entry: &[u8]) -> Result<(), UnpackError> {
        self.progress.add_entry();
        if dir.is_empty() {
            // Overlayfs ignores the mark on a layer's root, so the lower layers would stay
            // visible while the id said otherwise: refused, never silently dropped.
            return Err(self.unsafe_entry(
                entry,
                "an opaque marker at the layer's root ('hide every layer below') cannot be honoured, as overlayfs ignores it there, and is refused rather than ignored; remove this entry from the archive (a layer meant to replace everything below is an environment of its own: `plyroot create NAME --from` it alone)",
            ));
        }
        let fd = {
            let opened = match self.resolver.open(dir, OFlags::RDONLY) {
                Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => {
                    self.resolver.parent(dir).map_err(fail(self.archive, entry, "create directory"))?;
                    self.resolver.open(dir, OFlags::RDONLY)
                }
                r => r,
            };
            opened.map_err(fail(self.archive, entry, "open directory"))?
        };
        rustix::fs::fsetxattr(fd, OPAQUE_XATTR, b"y", XattrFlags::empty())
            .map_err(|e| fail(self.archive, entry, "set user.overlay.opaque")(e.into()))
    }

    /// The entry at `path` (and below) was removed or replaced: what was recorded for it is void,
    /// and a cached directory fd may now point at a removed directory.
    fn replaced(&mut self, path: &[u8]) {
        self.out.overrides.forget(&key(path));
        self.resolver.invalidate();
    }

    fn record_owner(&mut self, path: &[u8], meta: &Meta) {
        if self.ownership == Ownership::Record && (meta.uid, meta.gid) != (0, 0) {
            self.out.overrides.entry(&key(path)).owner = Some((meta.uid, meta.gid));
        }
    }

    fn put_file(&mut self, path: &[u8], dir: &[u8], name: &std::ffi::OsStr, meta: &Meta, data: Data<'_>, xattrs: &Xattrs) -> Result<(), UnpackError> {
        let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
        let flags = OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let create = |at| rustix::fs::openat(at, name, flags, Mode::from_raw_mode(0o600));
        let (fd, removed) = create_replacing(at, name, create).map_err(fail(self.archive, path, "create file"))?;
        if removed {
            self.replaced(path);
        }
        let mut file = File::from(fd);
        match data {
            Data::Stream(r) => loop {
                let n = match r.read(&mut self.buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(fail(self.archive, path, "read file data")(e)),
                };
                file.write_all(&self.buf[..n]).map_err(fail(self.archive, path, "write file"))?;
                self.progress.tick();
            },
            Data::Copy(src) => {
                let n = io::copy(&mut &*src, &mut file).map_err(fail(self.archive, path, "copy file"))?;
                self.progress.add_bytes(n);
            }
            Data::Sparse(map, data) => self.write_regions(path, &mut file, map, data)?,
        }
        // chown before chmod (chown clears setuid/setgid), xattrs after chown (it clears
        // security.capability), mtime last (everything before may change it).
        if self.ownership == Ownership::Preserve {
            rustix::fs::fchown(&file, Some(uid(meta.uid)), Some(gid(meta.gid))).map_err(|e| fail(self.archive, path, "change owner")(e.into()))?;
        }
        self.record_owner(path, meta);
        rustix::fs::fchmod(&file, Mode::from_raw_mode(meta.mode & 0o7777)).map_err(|e| fail(self.archive, path, "set mode")(e.into()))?;
        self.set_xattrs(path, XattrTarget::Fd(file.as_fd()), xattrs)?;
        let times = Timestamps { last_access: omit(), last_modification: meta.mtime };
        rustix::fs::futimens(&file, &times).map_err(|e| fail(self.archive, path, "set mtime")(e.into()))?;
        self.held_mtime(path, meta.mtime, rustix::fs::fstat(&file))
    }

    /// Records the archive's mtime in the layer's metadata when the disk holds another (`held`
    /// is the entry's stat after setting it): the store's filesystem could not represent it
    /// (ext4 with 128-byte inodes stops at 2038), and the id must not depend on that.
    fn held_mtime(&mut self, path: &[u8], wanted: Timespec, held: rustix::io::Result<rustix::fs::Stat>) -> Result<(), UnpackError> {
        let held = held.map_err(|e| fail(self.archive, path, "inspect mtime")(e.into()))?;
        if held.st_mtime != wanted.tv_sec {
            self.out.overrides.entry(&key(path)).mtime = Some(wanted.tv_sec);
        } else if let Some(o) = self.out.overrides.entries.get_mut(key(path).as_ref()) {
            o.mtime = None;
        }
        Ok(())
    }

    /// Writes a sparse file's regions where they belong and leaves holes between them, as GNU
    /// tar does: seek to each region and write its data; a region of length 0 sets the file's
    /// size to its offset. The disk holds the archive's data and nothing else, however large the
    /// file says it is.
    fn write_regions(&mut self, path: &[u8], file: &mut File, map: &[Region], data: &mut dyn Read) -> Result<(), UnpackError> {
        for r in map {
            if r.len == 0 {
                file.set_len(r.offset).map_err(fail(self.archive, path, "set the size of a sparse file"))?;
                continue;
            }
            file.seek(SeekFrom::Start(r.offset)).map_err(fail(self.archive, path, "seek in a sparse file"))?;
            let mut left = r.len;
            while left > 0 {
                let want = self.buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = match data.read(&mut self.buf[..want]) {
                    Ok(0) => return Err(fail(self.archive, path, "read file data")(io::ErrorKind::UnexpectedEof.into())),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(fail(self.archive, path, "read file data")(e)),
                };
                file.write_all(&self.buf[..n]).map_err(fail(self.archive, path, "write file"))?;
                left -= n as u64;
                self.progress.tick();
            }
        }
        Ok(())
    }

    fn put_dir(&mut self, path: &[u8], dir: &[u8], name: &std::ffi::OsStr, meta: &Meta, xattrs: &Xattrs) -> Result<(), UnpackError> {
        let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
        // 0700 while unpacking, so an unprivileged user can create the children of a 0555
        // directory; the real mode comes in `finish`.
        match rustix::fs::mkdirat(at, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                let st = rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fail(self.archive, path, "inspect existing entry")(e.into()))?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    // A directory over a directory keeps its contents; only its own metadata changes.
                    self.out.overrides.entries.remove(key(path).as_ref());
                } else {
                    let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
                    remove_existing(at, name).map_err(fail(self.archive, path, "remove existing entry"))?;
                    rustix::fs::mkdirat(at, name, Mode::from_raw_mode(0o700)).map_err(|e| fail(self.archive, path, "create directory")(e.into()))?;
                    self.replaced(path);
                }
            }
            Err(e) => return Err(fail(self.archive, path, "create directory")(e.into())),
        }
        let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
        if self.ownership == Ownership::Preserve {
            rustix::fs::chownat(at, name, Some(uid(meta.uid)), Some(gid(meta.gid)), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| fail(self.archive, path, "change owner")(e.into()))?;
        }
        if !xattrs.is_empty() {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let fd = rustix::fs::openat(at, name, flags, Mode::empty()).map_err(|e| fail(self.archive, path, "open directory")(e.into()))?;
            self.set_xattrs(path, XattrTarget::Fd(fd.as_fd()), xattrs)?;
        }
        self.record_owner(path, meta);
        self.dirs.push(DeferredDir { path: path.to_vec(), mode: meta.mode & 0o7777, mtime: meta.mtime });
        Ok(())
    }

    /// Symlinks, FIFOs and devices: created by `create`, then owned, moded and timed by name,
    /// never through the node (a FIFO would block an open, a device would be opened).
    fn put_special(
        &mut self,
        path: &[u8],
        dir: &[u8],
        name: &std::ffi::OsStr,
        meta: &Meta,
        xattrs: &Xattrs,
        create: impl FnMut(BorrowedFd<'_>, &std::ffi::OsStr) -> rustix::io::Result<()>,
    ) -> Result<(), UnpackError> {
        let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
        let mut create = create;
        let ((), removed) = create_replacing(at, name, |at| create(at, name)).map_err(fail(self.archive, path, "create"))?;
        if removed {
            self.replaced(path);
        }
        let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
        let st = rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fail(self.archive, path, "inspect created entry")(e.into()))?;
        let is_link = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
        if self.ownership == Ownership::Preserve {
            rustix::fs::chownat(at, name, Some(uid(meta.uid)), Some(gid(meta.gid)), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| fail(self.archive, path, "change owner")(e.into()))?;
        }
        if !is_link {
            // Not a symlink (checked just above), so following the last component is harmless.
            rustix::fs::chmodat(at, name, Mode::from_raw_mode(meta.mode & 0o7777), AtFlags::empty())
                .map_err(|e| fail(self.archive, path, "set mode")(e.into()))?;
        }
        if !xattrs.is_empty() {
            // xattrs by path through the parent's fd in /proc: `l*xattr` does not follow the last
            // component, and the parent was resolved inside the root.
            let at_raw = std::os::fd::AsRawFd::as_raw_fd(&at);
            let mut proc_path = format!("/proc/self/fd/{at_raw}/").into_bytes();
            proc_path.extend_from_slice(name.as_bytes());
            self.set_xattrs(path, XattrTarget::Path(&proc_path), xattrs)?;
        }
        let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
        let times = Timestamps { last_access: omit(), last_modification: meta.mtime };
        rustix::fs::utimensat(at, name, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fail(self.archive, path, "set mtime")(e.into()))?;
        let held = rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW);
        self.record_owner(path, meta);
        self.held_mtime(path, meta.mtime, held)
    }

    fn put_hardlink(&mut self, path: &[u8], dir: &[u8], name: &std::ffi::OsStr, target: &[u8]) -> Result<(), UnpackError> {
        if target == path {
            // A link to itself changes nothing, if the file is there: GNU tar does the same, and
            // refuses it when nothing came before (there is no file to keep).
            let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
            return match rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(_) => Ok(()),
                Err(e) => Err(UnpackError::LinkTarget { archive: self.archive.to_owned(), entry: key(path).into_owned(), target: key(target).into_owned(), source: e.into() }),
            };
        }
        let (tdir, tname) = split(target);
        if tname.is_empty() {
            return Err(self.unsafe_entry(path, "the hardlink target is the layer root"));
        }
        // A link to a device that was recorded instead of created is recorded the same way.
        let recorded_device = self.out.overrides.entries.get(key(target).as_ref()).filter(|o| o.device.is_some()).cloned();
        if let Some(o) = recorded_device {
            let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
            if remove_existing(at, name).map_err(fail(self.archive, path, "remove existing entry"))? {
                self.replaced(path);
            }
            self.out.overrides.entries.insert(key(path).into_owned(), o);
            self.out.skipped_devices += 1;
            return Ok(());
        }
        let link_err = |archive: &str, source: io::Error| UnpackError::LinkTarget {
            archive: archive.to_owned(),
            entry: shown(path),
            target: shown(target),
            source,
        };
        // The target's directory is resolved inside the root like any parent; `linkat` with
        // flags 0 then links the target name itself, never what a symlink there points to.
        let tfd = match tdir.is_empty() {
            true => None,
            false => Some(self.resolver.open(tdir, OFlags::PATH).map_err(|e| link_err(self.archive, e))?),
        };
        let archive = self.archive;
        let root = self.resolver.root;
        let troot = tfd.as_ref().map_or(root, |f| f.as_fd());
        let at = self.resolver.parent(dir).map_err(fail(self.archive, path, "open parent directory"))?;
        let link = |at| rustix::fs::linkat(troot, os(tname), at, name, AtFlags::empty());
        let removed = match link(at) {
            Ok(()) => false,
            Err(Errno::EXIST) => {
                let same = match (
                    rustix::fs::statat(troot, os(tname), AtFlags::SYMLINK_NOFOLLOW),
                    rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW),
                ) {
                    (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
                    _ => false,
                };
                if same {
                    false
                } else {
                    remove_existing(at, name).map_err(fail(self.archive, path, "remove existing entry"))?;
                    link(at).map_err(|e| link_err(archive, e.into()))?;
                    true
                }
            }
            Err(e) => return Err(link_err(archive, e.into())),
        };
        if removed {
            self.replaced(path);
        }
        // A hardlink is the same file: it carries the target's recorded metadata.
        if let Some(o) = self.out.overrides.entries.get(key(target).as_ref()).cloned() {
            self.out.overrides.entries.insert(key(path).into_owned(), o);
        }
        Ok(())
    }

    fn set_xattrs(&mut self, path: &[u8], target: XattrTarget<'_>, xattrs: &Xattrs) -> Result<(), UnpackError> {
        for (name, value) in xattrs {
            if name.starts_with(OVERLAY_XATTR_PREFIX) {
                self.out.unset_xattrs.drop(name);
                continue;
            }
            // An ACL names ids, which the kernel translates through the writer's user namespace
            // (and the reader's): unprivileged, it is kept in the metadata, where the id takes it
            // from, and set from inside the image view with the owners (`store::owners`).
            if self.ownership == Ownership::Record && crate::store::meta::names_ids(name) {
                self.out.overrides.entry(&key(path)).xattrs.insert(key(name).into_owned(), hex::encode(value));
                continue;
            }
            let set = match target {
                XattrTarget::Fd(fd) => rustix::fs::fsetxattr(fd, os(name), value, XattrFlags::empty()),
                XattrTarget::Path(p) => rustix::fs::lsetxattr(os(p), os(name), value, XattrFlags::empty()),
            };
            match set {
                Ok(()) => {}
                // Not allowed for this user or not supported by this filesystem (or, for
                // `user.*`, not allowed on this file type): the layer metadata keeps it.
                Err(Errno::PERM | Errno::NOTSUP | Errno::ACCESS) => {
                    let entry = self.out.overrides.entry(&key(path));
                    entry.xattrs.insert(key(name).into_owned(), hex::encode(value));
                    self.out.unset_xattrs.record(name);
                }
                Err(e) => return Err(fail(self.archive, path, "set xattr")(e.into())),
            }
        }
        Ok(())
    }

    /// Gives directories their modes and mtimes, deepest first, so that neither creating a child
    /// nor a parent's final mode (0555, or 0000) gets in the way, and returns the result.
    pub(super) fn finish(mut self) -> Result<Unpacked, UnpackError> {
        // Implied directories get fixed metadata (0755, mtime 0), so the same archive gives the
        // same layer id whenever it is unpacked; an entry listing the directory later wins.
        let implied = std::mem::take(&mut self.resolver.implied);
        let mut dirs: Vec<DeferredDir> = implied.into_iter().map(|path| DeferredDir { path, mode: 0o755, mtime: Timespec { tv_sec: 0, tv_nsec: 0 } }).collect();
        dirs.append(&mut self.dirs);
        // Stable sort: duplicates stay in archive order, and the last one wins below.
        dirs.sort_by(|a, b| depth(&b.path).cmp(&depth(&a.path)).then_with(|| a.path.cmp(&b.path)));
        for (i, d) in dirs.iter().enumerate() {
            if dirs.get(i + 1).is_some_and(|next| next.path == d.path) {
                continue;
            }
            let fd = match self.resolver.open(&d.path, OFlags::RDONLY | OFlags::NOFOLLOW) {
                Ok(fd) => fd,
                // Replaced by a later non-directory entry, or removed by a whiteout.
                Err(e) if matches!(Errno::from_io_error(&e), Some(Errno::NOENT | Errno::NOTDIR | Errno::LOOP)) => continue,
                Err(e) => return Err(fail(self.archive, &d.path, "open directory")(e)),
            };
            // An unprivileged store could not read back a directory its owner cannot list or
            // enter (000, 0300, 0111): it keeps such a one owner-readable and records the mode.
            let mut mode = d.mode;
            if self.ownership == Ownership::Record && mode & DIR_READABLE != DIR_READABLE {
                self.out.overrides.entry(&key(&d.path)).dir_mode = Some(mode);
                mode |= DIR_READABLE;
            }
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| fail(self.archive, &d.path, "set mode")(e.into()))?;
            let times = Timestamps { last_access: omit(), last_modification: d.mtime };
            rustix::fs::futimens(&fd, &times).map_err(|e| fail(self.archive, &d.path, "set mtime")(e.into()))?;
            self.held_mtime(&d.path, d.mtime, rustix::fs::fstat(&fd))?;
        }
        Ok(self.out)
    }
}

enum Data<'a> {
    Stream(&'a mut dyn Read),
    Copy(&'a File),
    Sparse(&'a [Region], &'a mut dyn Read),
}

#[derive(Clone, Copy)]
enum XattrTarget<'a> {
    Fd(BorrowedFd<'a>),
    Path(&'a [u8]),
}

/// Builds the error for a failed `step` on `path`, for `map_err`.
fn fail(archive: &str, path: &[u8], step: &'static str) -> impl FnOnce(io::Error) -> UnpackError {
    let archive = archive.to_owned();
    let entry = shown(path);
    move |source| UnpackError::Unpack { archive, entry, step, source }
}

fn depth(path: &[u8]) -> usize {
    path.iter().filter(|&&b| b == b'/').count()
}

fn omit() -> Timespec {
    Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT }
}

fn uid(id: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(id)
}

fn gid(id: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(id)
}

/// Runs `create` (which fails with EEXIST if `name` exists); on EEXIST removes what is there and
/// runs it again. Returns whether something was replaced. Trying first keeps the common case (a
/// fresh stage) at one syscall.
fn create_replacing<'a, T>(
    at: BorrowedFd<'a>,
    name: &std::ffi::OsStr,
    mut create: impl FnMut(BorrowedFd<'a>) -> rustix::io::Result<T>,
) -> io::Result<(T, bool)> {
    match create(at) {
        Ok(t) => Ok((t, false)),
        Err(Errno::EXIST) => {
            remove_existing(at, name)?;
            Ok((create(at)?, true))
        }
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` under `at` if it exists, recursively if it is a directory; never follows it.
/// Returns whether anything was there.
fn remove_existing(at: BorrowedFd<'_>, name: &std::ffi::OsStr) -> io::Result<bool> {
    let st = match rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        remove_tree(at, name)?;
    } else {
        rustix::fs::unlinkat(at, name, AtFlags::empty())?;
    }
    Ok(true)
}

fn remove_tree(at: BorrowedFd<'_>, name: &std::ffi::OsStr) -> io::Result<()> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(at, name, flags, Mode::empty())?;
    // Directories made while unpacking are 0700 at least, so they can be listed and emptied.
    let mut children = Vec::new();
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let child = entry.file_name().to_bytes();
        if child != b"." && child != b".." {
            children.push(child.to_vec());
        }
    }
    for child in children {
        remove_existing(fd.as_fd(), os(&child))?;
    }
    rustix::fs::unlinkat(at, name, AtFlags::REMOVEDIR)?;
    Ok(())
}
