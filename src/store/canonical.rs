//! The canonical tar serialization of a layer tree: what a layer's id is the sha256 of, what
//! `export` writes and what a registry push uploads (so a layer id is its OCI diff_id).
//!
//! Rules, all of them deterministic functions of the content and its metadata, never of the
//! filesystem the store is on:
//! - entries in depth-first order, each directory's children sorted by their emitted name's bytes;
//!   a directory comes before its children; the layer's root itself is not an entry;
//! - names and link targets are bytes, as on disk;
//! - ustar headers with numeric owners only (no user/group names), permission bits incl.
//!   setuid/setgid/sticky, mtime in whole seconds (the floor: sub-second parts are not content,
//!   since most archives and filesystems cannot hold them);
//! - a PAX extended header (named `PaxHeader`, all its own fields zero) precedes an entry when a
//!   name or link target is longer than 100 bytes or not UTF-8 (`path`, `linkpath`, and then
//!   `hdrcharset=BINARY`), a number does not fit its ustar field (`uid`, `gid`, `size`, and `mtime`
//!   before 1970 or after 2242), the entry has xattrs (`SCHILY.xattr.NAME`), or the file is sparse
//!   (below); records sorted by key;
//! - sparse files: cut a regular file of at least [`HOLE`] bytes into chunks of [`HOLE`] bytes at
//!   multiples of [`HOLE`] (the last one may be shorter); when one or more chunks are all zeros,
//!   the file is written in the PAX sparse format 1.0 (GNU tar's
//!   `-S --format=pax`): records `GNU.sparse.major=1`, `GNU.sparse.minor=0`, `GNU.sparse.name`
//!   (the real name) and `GNU.sparse.realsize`; the ustar name `DIR/GNUSparseFile.0/NAME`; the
//!   member's data the map (`COUNT\n` then `OFFSET\nLENGTH\n` per data region, NUL-padded to 512)
//!   followed by the data regions. The holes are exactly the all-zero chunks, whatever holes the
//!   disk has: a dense copy and a sparse copy of one file serialize alike, and a file whose data
//!   ends in a hole ends its map with `SIZE\n0\n`, as GNU tar writes it. Every chunk that holds a
//!   non-zero byte is data. GNU tar, bsdtar, Go's archive/tar (so containerd and docker) and
//!   Python's tarfile read it; a file without such a chunk is an ordinary entry, as it always was;
//! - overlayfs whiteouts (char 0:0) become `.wh.NAME`, opaque directories get a `.wh..wh..opq`
//!   child right after the directory entry; both have mode 0, owner 0:0, mtime 0. A layer whose
//!   root is opaque is refused: overlayfs ignores that mark on a layer's root, so it could only
//!   mislead (see `source::stage`, which refuses such archives);
//! - a regular file whose inode was already emitted becomes a hardlink to its first path;
//! - owners, mtimes, xattrs and device nodes come from the layer's [`Overrides`] where the disk
//!   could not hold them; `user.overlay.*` and `security.selinux` (host-assigned) are never content.
//!
//! The tree is read with `*at` calls through a [`Cursor`]: any depth, a bounded number of open
//! directories, and directories of mode 000 readable by their unprivileged owner.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom, Stat};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use super::meta::{unkey, Device, Overrides};
use super::tree::{self, is_opaque_fd, is_whiteout, join, kind, shown, stat_at, Cursor, Lend};
use crate::sys::xattr::{self, Target};

/// The sparse granularity: a regular file's holes in the canonical form are its all-zero chunks
/// of this size at multiples of it. Large, so that ordinary files (whose zero runs are short)
/// keep the plain form and the ids they always had: no file of a Debian minbase root has such a
/// chunk, where nine (ELF libraries among them) have an all-zero 4 KiB page.
pub(crate) const HOLE: u64 = 64 * 1024;

const MAX7: u64 = 0o7777777;
const MAX11: u64 = 0o77777777777;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CanonicalError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write the tar stream: {0}")]
    Write(#[source] io::Error),
    #[error("{root}: the layer's root is marked opaque (user.overlay.opaque), which overlayfs ignores on a layer's root; plyroot refuses to describe it: remove the mark (`setfattr -x user.overlay.opaque {root}`) if nothing below was meant to be hidden")]
    OpaqueRoot { root: String },
}

fn read_err(path: &[u8]) -> impl FnOnce(io::Error) -> CanonicalError + '_ {
    move |source| CanonicalError::Read { path: if path.is_empty() { ".".into() } else { shown(path) }, source }
}

/// What serializing a layer found.
#[derive(Clone, Debug, Default)]
pub(crate) struct Summary {
    /// `sha256:<hex>` of the canonical tar.
    pub id: String,
    /// Bytes of regular file content (their apparent sizes).
    pub size: u64,
    pub entries: u64,
}

/// Computes a tree's id without writing anything.
pub(crate) fn digest(root: &Path, ov: &Overrides) -> Result<Summary, CanonicalError> {
    write_tar(root, ov, &mut io::sink())
}

/// Writes the canonical tar of `root` to `out`, returning its digest and counts.
pub(crate) fn write_tar(root: &Path, ov: &Overrides, out: &mut dyn Write) -> Result<Summary, CanonicalError> {
    let mut w = Writer::new(out);
    w.tree(root, ov)?;
    w.finish()
}

type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The canonical serializer, one entry at a time. [`Writer::tree`] walks one layer tree in the
/// canonical order; `export` drives the same entry methods over a merged stack of layers, so
/// both write the one format a layer id is the digest of.
pub(crate) struct Writer<'a> {
    out: &'a mut dyn Write,
    hash: Sha256,
    /// First path and xattrs of every multiply-linked inode emitted.
    links: HashMap<(u64, u64), (Vec<u8>, Xattrs)>,
    buf: Vec<u8>,
    scratch: Xattrs,
    summary: Summary,
    /// SOURCE_DATE_EPOCH: no entry's mtime is written later than this.
    mtime_max: Option<i64>,
}

/// One tar entry's header fields.
struct Entry<'e> {
    name: &'e [u8],
    mode: u32,
    owner: (u32, u32),
    /// The file's (apparent) size; the member's data is shorter for a sparse file.
    size: u64,
    mtime: i64,
    kind: u8,
    link: &'e [u8],
    dev: (u32, u32),
    xattrs: &'e [(Vec<u8>, Vec<u8>)],
    /// Data regions of a sparse file (the canonical holes are what lies between them).
    sparse: Option<&'e [(u64, u64)]>,
}

impl<'e> Entry<'e> {
    fn plain(name: &'e [u8], kind: u8) -> Entry<'e> {
        Entry { name, mode: 0, owner: (0, 0), size: 0, mtime: 0, kind, link: b"", dev: (0, 0), xattrs: &[], sparse: None }
    }
}

/// A child of a directory being serialized.
enum Kid<'o> {
    Disk { name: Vec<u8>, whiteout: bool },
    Device { name: Vec<u8>, device: &'o Device },
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut dyn Write) -> Writer<'a> {
        Writer { out, hash: Sha256::new(), links: HashMap::new(), buf: vec![0; 1 << 20], scratch: Vec::new(), summary: Summary::default(), mtime_max: None }
    }

    /// Clamps every mtime to `max` (reproducible builds' SOURCE_DATE_EPOCH).
    pub(crate) fn clamp_mtimes(&mut self, max: u64) {
        self.mtime_max = Some(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// Ends the archive and returns its digest and counts.
    pub(crate) fn finish(mut self) -> Result<Summary, CanonicalError> {
        self.emit(&[0u8; 1024])?;
        let mut s = self.summary;
        s.id = format!("sha256:{}", hex::encode(self.hash.finalize()));
        Ok(s)
    }

    /// Writes every entry of the layer tree `root`, whose metadata is `ov`.
    pub(crate) fn tree(&mut self, root: &Path, ov: &Overrides) -> Result<(), CanonicalError> {
        let devices = recorded_devices(ov);
        let root_shown = root.display().to_string();
        let mut cur = Cursor::new(&[root], Lend::Read).map_err(|source| CanonicalError::Read { path: root_shown.clone(), source })?;
        if is_opaque_fd(cur.dir(0).map_err(read_err(b""))?).map_err(read_err(b""))? {
            return Err(CanonicalError::OpaqueRoot { root: root_shown });
        }
        let mut rel: Vec<u8> = Vec::new();
        // Per directory on the path: its children still to write (reversed, so pop is next),
        // and the length of its parent's path.
        let mut levels: Vec<(Vec<Kid<'_>>, usize)> = vec![(self.kids(&mut cur, &rel, &devices)?, 0)];
        while let Some((kids, parent_len)) = levels.last_mut() {
            let Some(kid) = kids.pop() else {
                let parent_len = *parent_len;
                levels.pop();
                if !levels.is_empty() {
                    cur.leave().map_err(read_err(&rel))?;
                    rel.truncate(parent_len);
                }
                continue;
            };
            match kid {
                Kid::Device { name, device } => self.device(&join(&rel, &name), device, ov)?,
                Kid::Disk { name, whiteout: true } => {
                    let mut marker = b".wh.".to_vec();
                    marker.extend_from_slice(&name);
                    self.marker(&join(&rel, &marker))?;
                }
                Kid::Disk { name, whiteout: false } => {
                    let path = join(&rel, &name);
                    let at = cur.dir(0).map_err(read_err(&rel))?;
                    let st = stat_at(at, &name).map_err(read_err(&path))?;
                    if kind(&st) != FileType::Directory {
                        self.disk(at, &name, &path, &st, ov)?;
                        continue;
                    }
                    cur.enter(&name, &[(0, &st)]).map_err(read_err(&path))?;
                    let here = cur.dir(0).map_err(read_err(&path))?;
                    self.dir(here, &path, &st, ov)?;
                    if is_opaque_fd(here).map_err(read_err(&path))? {
                        self.marker(&join(&path, b".wh..wh..opq"))?;
                    }
                    let parent_len = rel.len();
                    rel = path;
                    let kids = self.kids(&mut cur, &rel, &devices)?;
                    levels.push((kids, parent_len));
                }
            }
        }
        Ok(())
    }

    /// The children of the current directory (`rel`), in reverse canonical order.
    fn kids<'o>(&self, cur: &mut Cursor, rel: &[u8], devices: &RecordedDevices<'o>) -> Result<Vec<Kid<'o>>, CanonicalError> {
        let dir = cur.dir(0).map_err(read_err(rel))?;
        let mut kids: Vec<(Vec<u8>, Kid<'o>)> = Vec::new();
        for (name, ft) in tree::list(dir).map_err(read_err(rel))? {
            let whiteout = matches!(ft, FileType::CharacterDevice | FileType::Unknown) && stat_at(dir, &name).is_ok_and(|st| is_whiteout(&st));
            let emitted = if whiteout { [b".wh.", name.as_slice()].concat() } else { name.clone() };
            kids.push((emitted, Kid::Disk { name, whiteout }));
        }
        for (name, d) in devices.get(rel).into_iter().flatten() {
            kids.push((name.clone(), Kid::Device { name: name.clone(), device: d }));
        }
        kids.sort_by(|a, b| b.0.cmp(&a.0));
        Ok(kids.into_iter().map(|k| k.1).collect())
    }

    fn emit(&mut self, b: &[u8]) -> Result<(), CanonicalError> {
        self.hash.update(b);
        self.out.write_all(b).map_err(CanonicalError::Write)
    }

    /// A whiteout (`.wh.NAME`) or opaque (`.wh..wh..opq`) marker entry: mode 0, owner 0:0, mtime 0.
    pub(crate) fn marker(&mut self, name: &[u8]) -> Result<(), CanonicalError> {
        self.header(&Entry::plain(name, b'0'))
    }

    /// A device node that exists only in the layer's metadata.
    pub(crate) fn device(&mut self, path: &[u8], d: &Device, ov: &Overrides) -> Result<(), CanonicalError> {
        let xattrs = self.xattrs(None, path, ov)?;
        let kind = if d.kind == 'b' { b'4' } else { b'3' };
        let owner = ov.owner(path, (0, 0));
        self.summary.entries += 1;
        self.header(&Entry { mode: d.mode, owner, mtime: d.mtime, dev: (d.major, d.minor), xattrs: &xattrs, ..Entry::plain(path, kind) })
    }

    /// The entry of the directory open as `fd` (its lstat `st`), named `path`, with the metadata
    /// `ov` of the layer it is in. Its own entry only: the caller walks its children.
    pub(crate) fn dir(&mut self, fd: BorrowedFd<'_>, path: &[u8], st: &Stat, ov: &Overrides) -> Result<(), CanonicalError> {
        let xattrs = self.xattrs(Some(Target::Fd(fd)), path, ov)?;
        self.summary.entries += 1;
        let name_slash = [path, b"/"].concat();
        self.header(&Entry { xattrs: &xattrs, ..self.common(&name_slash, path, st, ov, b'5') })
    }

    /// The header fields every entry takes from its lstat and the layer's metadata.
    fn common<'e>(&self, name: &'e [u8], path: &[u8], st: &Stat, ov: &Overrides, kind: u8) -> Entry<'e> {
        Entry {
            mode: ov.mode(path, st.st_mode & 0o7777),
            owner: ov.owner(path, (st.st_uid, st.st_gid)),
            mtime: ov.mtime(path, st.st_mtime),
            ..Entry::plain(name, kind)
        }
    }

    /// The entry `name` of the directory `at` (not a directory, not a whiteout; `st` is its
    /// lstat), named `path`, with the metadata `ov` of the layer it is in.
    pub(crate) fn disk(&mut self, at: BorrowedFd<'_>, name: &[u8], path: &[u8], st: &Stat, ov: &Overrides) -> Result<(), CanonicalError> {
        self.summary.entries += 1;
        match kind(st) {
            FileType::RegularFile => self.file(at, name, path, st, ov),
            FileType::Symlink => {
                let xattrs = self.xattrs(Some(Target::At(at, name)), path, ov)?;
                let target = rustix::fs::readlinkat(at, std::ffi::OsStr::from_bytes(name), Vec::new()).map_err(|e| read_err(path)(e.into()))?;
                self.header(&Entry { link: target.as_bytes(), xattrs: &xattrs, ..self.common(path, path, st, ov, b'2') })
            }
            FileType::Fifo => {
                let xattrs = self.xattrs(Some(Target::At(at, name)), path, ov)?;
                self.header(&Entry { xattrs: &xattrs, ..self.common(path, path, st, ov, b'6') })
            }
            k @ (FileType::CharacterDevice | FileType::BlockDevice) => {
                let xattrs = self.xattrs(Some(Target::At(at, name)), path, ov)?;
                let kind = if k == FileType::CharacterDevice { b'3' } else { b'4' };
                let dev = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
                self.header(&Entry { dev, xattrs: &xattrs, ..self.common(path, path, st, ov, kind) })
            }
            // Sockets are not content: tar cannot hold them.
            _ => Ok(()),
        }
    }

    fn file(&mut self, at: BorrowedFd<'_>, name: &[u8], path: &[u8], st: &Stat, ov: &Overrides) -> Result<(), CanonicalError> {
        let inode = (st.st_dev, st.st_ino);
        if st.st_nlink > 1 {
            if let Some((first, xattrs)) = self.links.get(&inode) {
                let (first, xattrs) = (first.clone(), xattrs.clone());
                return self.header(&Entry { link: &first, xattrs: &xattrs, ..self.common(path, path, st, ov, b'1') });
            }
        }
        let (f, xattrs) = self.open_file(at, name, path, st, ov)?;
        if st.st_nlink > 1 {
            self.links.insert(inode, (path.to_vec(), xattrs.clone()));
        }
        let size = st.st_size as u64;
        let mut buf = std::mem::take(&mut self.buf);
        let map = sparse_map(&f, size, &mut buf).map_err(read_err(path));
        self.buf = buf;
        let map = map?;
        self.header(&Entry { size, xattrs: &xattrs, sparse: map.as_deref(), ..self.common(path, path, st, ov, b'0') })?;
        let data = match &map {
            None => vec![(0, size)],
            Some(map) => {
                let block = map_block(map);
                self.emit(&block)?;
                map.clone()
            }
        };
        let mut written = 0u64;
        for (offset, len) in data {
            self.content(&f, path, offset, len)?;
            written += len;
        }
        let pad = (512 - (written % 512) as usize) % 512;
        self.emit(&[0u8; 512][..pad])?;
        self.summary.size += size;
        Ok(())
    }

    /// Opens a regular file for reading and reads its xattrs. A file whose owner may not read
    /// it (mode 0000 in an unprivileged store) is lent read access for the open and the xattrs
    /// (`user.*` ones need it too), then given its mode back.
    fn open_file(&mut self, at: BorrowedFd<'_>, name: &[u8], path: &[u8], st: &Stat, ov: &Overrides) -> Result<(File, Xattrs), CanonicalError> {
        let name_os = std::ffi::OsStr::from_bytes(name);
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC;
        let open = || rustix::fs::openat(at, name_os, flags, Mode::empty());
        let mode = st.st_mode & 0o7777;
        match open() {
            Ok(fd) => {
                let xattrs = self.xattrs(Some(Target::Fd(fd.as_fd())), path, ov)?;
                Ok((File::from(fd), xattrs))
            }
            Err(Errno::ACCESS) if !rustix::process::geteuid().is_root() => {
                // Not a link (O_NOFOLLOW would have said ELOOP), so following `name` is harmless.
                rustix::fs::chmodat(at, name_os, Mode::from_raw_mode(mode | 0o400), AtFlags::empty()).map_err(|e| read_err(path)(e.into()))?;
                let opened = open().map_err(io::Error::from).map(|fd| {
                    let x = self.xattrs(Some(Target::Fd(fd.as_fd())), path, ov);
                    (fd, x)
                });
                let restored = rustix::fs::chmodat(at, name_os, Mode::from_raw_mode(mode), AtFlags::empty());
                let (fd, xattrs) = opened.map_err(read_err(path))?;
                restored.map_err(|e| read_err(path)(e.into()))?;
                Ok((File::from(fd), xattrs?))
            }
            Err(e) => Err(read_err(path)(e.into())),
        }
    }

    /// Emits `len` bytes of `f` from `offset`.
    fn content(&mut self, f: &File, path: &[u8], offset: u64, len: u64) -> Result<(), CanonicalError> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = (|| {
            let mut done = 0u64;
            while done < len {
                let want = buf.len().min((len - done) as usize);
                let n = f.read_at(&mut buf[..want], offset + done).map_err(read_err(path))?;
                if n == 0 {
                    // The file shrank while being read: the layer is not the immutable tree it must be.
                    return Err(read_err(path)(io::Error::new(io::ErrorKind::UnexpectedEof, "file changed while reading")));
                }
                self.emit(&buf[..n])?;
                done += n as u64;
            }
            Ok(())
        })();
        self.buf = buf;
        r
    }

    /// The entry's xattrs, sorted by name: those on disk (`from`), except the overlay's own and
    /// host-assigned labels, then those the layer's metadata records.
    fn xattrs(&mut self, from: Option<Target<'_>>, path: &[u8], ov: &Overrides) -> Result<Xattrs, CanonicalError> {
        let mut out: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        if let Some(t) = from {
            xattr::read_all(t, &mut self.scratch).map_err(read_err(path))?;
            for (k, v) in self.scratch.drain(..) {
                // An unprivileged layer's ACLs are its metadata's (the disk's read per namespace).
                let recorded = ov.flattened && crate::store::meta::names_ids(&k);
                if !k.starts_with(b"user.overlay.") && k != b"security.selinux" && !recorded {
                    out.insert(k, v);
                }
            }
        }
        if let Some(o) = ov.get(path) {
            for (k, v) in &o.xattrs {
                if let Ok(v) = hex::decode(v) {
                    out.insert(unkey(k).into_owned(), v);
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    fn header(&mut self, e: &Entry<'_>) -> Result<(), CanonicalError> {
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let utf8 = |b: &[u8]| std::str::from_utf8(b).is_ok();
        let mut binary = false;
        let mut member_size = e.size;
        let mut name = e.name.to_vec();
        if let Some(map) = e.sparse {
            pax.push((b"GNU.sparse.major".to_vec(), b"1".to_vec()));
            pax.push((b"GNU.sparse.minor".to_vec(), b"0".to_vec()));
            pax.push((b"GNU.sparse.name".to_vec(), e.name.to_vec()));
            pax.push((b"GNU.sparse.realsize".to_vec(), e.size.to_string().into_bytes()));
            binary |= !utf8(e.name);
            member_size = map_block(map).len() as u64 + map.iter().map(|r| r.1).sum::<u64>();
            // What a reader that knows no sparse files extracts: the map and data under a name
            // that says so, as GNU tar does (with 0 where it puts its pid).
            let (dir, base) = match e.name.iter().rposition(|&b| b == b'/') {
                Some(i) => (&e.name[..=i], &e.name[i + 1..]),
                None => (&b""[..], e.name),
            };
            name = [dir, b"GNUSparseFile.0/", base].concat();
        } else if e.name.len() > 100 || !utf8(e.name) {
            pax.push((b"path".to_vec(), e.name.to_vec()));
            binary |= !utf8(e.name);
        }
        if e.link.len() > 100 || !utf8(e.link) {
            pax.push((b"linkpath".to_vec(), e.link.to_vec()));
            binary |= !utf8(e.link);
        }
        if binary {
            pax.push((b"hdrcharset".to_vec(), b"BINARY".to_vec()));
        }
        if u64::from(e.owner.0) > MAX7 {
            pax.push((b"uid".to_vec(), e.owner.0.to_string().into_bytes()));
        }
        if u64::from(e.owner.1) > MAX7 {
            pax.push((b"gid".to_vec(), e.owner.1.to_string().into_bytes()));
        }
        if member_size > MAX11 {
            pax.push((b"size".to_vec(), member_size.to_string().into_bytes()));
        }
        let mtime = self.mtime_max.map_or(e.mtime, |max| e.mtime.min(max));
        if !(0..=MAX11 as i64).contains(&mtime) {
            pax.push((b"mtime".to_vec(), mtime.to_string().into_bytes()));
        }
        for (k, v) in e.xattrs {
            pax.push(([b"SCHILY.xattr.", k.as_slice()].concat(), v.clone()));
        }
        pax.sort_by(|a, b| a.0.cmp(&b.0));
        if !pax.is_empty() {
            let mut body = Vec::new();
            for (k, v) in &pax {
                body.extend_from_slice(&pax_record(k, v));
            }
            let h = ustar(b"PaxHeader", 0o644, (0, 0), body.len() as u64, 0, b'x', b"", (0, 0));
            self.emit(&h)?;
            let pad = (512 - body.len() % 512) % 512;
            body.resize(body.len() + pad, 0);
            self.emit(&body)?;
        }
        let h = ustar(
            &name[..name.len().min(100)],
            e.mode,
            (e.owner.0.min(MAX7 as u32), e.owner.1.min(MAX7 as u32)),
            member_size.min(MAX11),
            mtime.clamp(0, MAX11 as i64) as u64,
            e.kind,
            &e.link[..e.link.len().min(100)],
            e.dev,
        );
        self.emit(&h)
    }
}

/// Devices recorded only in a layer's metadata: parent directory → (name, device).
pub(crate) type RecordedDevices<'o> = HashMap<Vec<u8>, Vec<(Vec<u8>, &'o Device)>>;

/// The devices recorded only in `ov`, by parent directory.
pub(crate) fn recorded_devices(ov: &Overrides) -> RecordedDevices<'_> {
    let mut devices = RecordedDevices::new();
    for (k, o) in &ov.entries {
        if let Some(d) = &o.device {
            let path = unkey(k);
            let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
                Some(i) => (&path[..i], &path[i + 1..]),
                None => (&[][..], &path[..]),
            };
            devices.entry(parent.to_vec()).or_default().push((name.to_vec(), d));
        }
    }
    devices
}

/// The data regions (offset, length) of a file of `len` bytes by the canonical rule, or `None`
/// when it has no hole (see the module header). The disk's own holes (`SEEK_DATA`) are skipped
/// without reading; a chunk on disk is read only until its first non-zero byte, which for
/// ordinary data is within the first page.
fn sparse_map(f: &File, len: u64, buf: &mut [u8]) -> io::Result<Option<Vec<(u64, u64)>>> {
    if len < HOLE {
        return Ok(None);
    }
    let mut regions: Vec<(u64, u64)> = Vec::new();
    let mut holes = false;
    let mut last_was_hole = false;
    let mut next_data: Option<u64> = None;
    let mut off = 0;
    while off < len {
        let end = (off + HOLE).min(len);
        // Where the disk next holds data at or after `off`; what lies before is a hole.
        let data_at = match next_data {
            Some(d) if d >= off => d,
            _ => match rustix::fs::seek(f, SeekFrom::Data(off)) {
                Ok(d) => d,
                Err(Errno::NXIO) => len,
                // No SEEK_DATA here: everything is data, to be read.
                Err(_) => off,
            },
        };
        next_data = Some(data_at);
        let mut data = false;
        let mut pos = data_at.max(off);
        let mut piece = 4096u64;
        while pos < end {
            let want = piece.min(end - pos).min(buf.len() as u64) as usize;
            let n = f.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file changed while reading"));
            }
            if buf[..n].iter().any(|&b| b != 0) {
                data = true;
                break;
            }
            pos += n as u64;
            piece = HOLE;
        }
        if data {
            match regions.last_mut() {
                Some(r) if r.0 + r.1 == off => r.1 += end - off,
                _ => regions.push((off, end - off)),
            }
        } else {
            holes = true;
        }
        last_was_hole = !data;
        off = end;
    }
    if !holes {
        return Ok(None);
    }
    if last_was_hole {
        regions.push((len, 0));
    }
    Ok(Some(regions))
}

/// The sparse map block of format 1.0: the count, then offset and length of each region, one
/// decimal number per line, NUL-padded to a multiple of 512 bytes.
fn map_block(map: &[(u64, u64)]) -> Vec<u8> {
    let mut b = format!("{}\n", map.len()).into_bytes();
    for (o, l) in map {
        b.extend_from_slice(format!("{o}\n{l}\n").as_bytes());
    }
    b.resize(b.len().div_ceil(512) * 512, 0);
    b
}

/// A PAX record: "<len> <key>=<value>\n" where len counts the whole record, its own digits too.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

#[allow(clippy::too_many_arguments)]
fn ustar(name: &[u8], mode: u32, owner: (u32, u32), size: u64, mtime: u64, kind: u8, link: &[u8], dev: (u32, u32)) -> [u8; 512] {
    fn octal(field: &mut [u8], v: u64) {
        let s = format!("{:0width$o}", v, width = field.len() - 1);
        field[..s.len()].copy_from_slice(s.as_bytes());
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], u64::from(owner.0));
    octal(&mut h[116..124], u64::from(owner.1));
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    if kind == b'3' || kind == b'4' {
        octal(&mut h[329..337], u64::from(dev.0));
        octal(&mut h[337..345], u64::from(dev.1));
    }
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

#[cfg(test)]
mod tests;
