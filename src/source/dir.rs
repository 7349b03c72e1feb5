//! [`copy_dir`]: a `dir:` source, a directory tree copied into a stage as it is.
//!
//! Symlinks are copied, never followed; hardlinks are kept by (dev, ino); file data is copied by
//! the kernel (`copy_file_range` through `io::copy`). The tree is taken literally: `.wh.` names
//! are not whiteouts here, but char 0:0 nodes are (they are one already).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use rustix::fs::Timespec;

use super::error::UnpackError;
use super::stage::{Meta, Node, Stage};
use super::Unpacked;
use crate::progress::Progress;
use crate::store::meta::Ownership;

/// Copies the tree at `src` into the directory `root`.
///
/// With [`Ownership::Record`], files owned by the calling user count as owned by root (0:0):
/// an unprivileged user's copy of a root filesystem is owned by that user, and that owner means
/// "root" in the user namespace plyroot runs it in. Other owners are recorded.
pub(crate) fn copy_dir(src: &Path, root: BorrowedFd, ownership: Ownership, progress: &mut Progress) -> Result<Unpacked, UnpackError> {
    let name = format!("dir:{}", src.display());
    let me = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    let mut stage = Stage::new(root, &name, ownership, progress);
    let mut walk = Walk { stage: &mut stage, ownership, me, links: HashMap::new(), xattrs: Vec::new() };
    let top = fs::symlink_metadata(src).map_err(|source| UnpackError::Open { path: src.to_owned(), source })?;
    if !top.is_dir() {
        return Err(UnpackError::Open { path: src.to_owned(), source: io::Error::from(io::ErrorKind::NotADirectory) });
    }
    let mut rel = Vec::new();
    walk.dir(src, &mut rel)?;
    stage.finish()
}

struct Walk<'s, 'r, 'p> {
    stage: &'s mut Stage<'r, 'p>,
    ownership: Ownership,
    me: (u32, u32),
    /// First path seen for each multiply-linked inode.
    links: HashMap<(u64, u64), Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Walk<'_, '_, '_> {
    fn open_err(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
        move |source| UnpackError::Open { path: path.to_owned(), source }
    }

    /// Copies the children of `dir` (whose path relative to the root is `rel`).
    fn dir(&mut self, dir: &Path, rel: &mut Vec<u8>) -> Result<(), UnpackError> {
        let mut children: Vec<_> = fs::read_dir(dir)
            .map_err(Self::open_err(dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(Self::open_err(dir))?;
        // Sorted, so that which path of a hardlinked inode becomes the file is deterministic.
        children.sort();
        for child in children {
            let path = dir.join(&child);
            let len = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(child.as_bytes());
            self.entry(&path, rel)?;
            rel.truncate(len);
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path, rel: &mut Vec<u8>) -> Result<(), UnpackError> {
        let md = fs::symlink_metadata(path).map_err(Self::open_err(path))?;
        let (mut uid, mut gid) = (md.uid(), md.gid());
        if self.ownership == Ownership::Record {
            if uid == self.me.0 {
                uid = 0;
            }
            if gid == self.me.1 {
                gid = 0;
            }
        }
        let meta = Meta {
            mode: md.mode() & 0o7777,
            uid,
            gid,
            mtime: Timespec { tv_sec: md.mtime(), tv_nsec: md.mtime_nsec() },
        };
        read_xattrs(path, &mut self.xattrs).map_err(Self::open_err(path))?;
        let ft = md.file_type();
        if !ft.is_dir() && md.nlink() > 1 {
            if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                return self.stage.put(rel, &meta, Node::Hardlink(first), &self.xattrs);
            }
            self.links.insert((md.dev(), md.ino()), rel.clone());
        }
        if ft.is_dir() {
            self.stage.put(rel, &meta, Node::Dir, &self.xattrs)?;
            self.dir(path, rel)
        } else if ft.is_file() {
            let file = File::open(path).map_err(Self::open_err(path))?;
            self.stage.put(rel, &meta, Node::CopyOf(&file), &self.xattrs)
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(Self::open_err(path))?;
            self.stage.put(rel, &meta, Node::Symlink(target.as_os_str().as_bytes()), &self.xattrs)
        } else if ft.is_fifo() {
            self.stage.put(rel, &meta, Node::Fifo, &self.xattrs)
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() { 'c' } else { 'b' };
            let dev = md.rdev();
            let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
            self.stage.put(rel, &meta, Node::Device { kind, major, minor }, &self.xattrs)
        } else {
            // Sockets belong to a running program, not to a filesystem image.
            Ok(())
        }
    }
}

/// Reads all xattrs of `path` (not following a symlink) into `out`.
fn read_xattrs(path: &Path, out: &mut Vec<(Vec<u8>, Vec<u8>)>) -> io::Result<()> {
    out.clear();
    let size = match rustix::fs::llistxattr(path, &mut [0u8; 0][..]) {
        Ok(0) => return Ok(()),
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut names = vec![0u8; size];
    let n = rustix::fs::llistxattr(path, &mut names[..])?;
    names.truncate(n);
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::ffi::OsStr::from_bytes(name);
        let len = match rustix::fs::lgetxattr(path, name, &mut [0u8; 0][..]) {
            Ok(len) => len,
            // Removed since listing, or not readable by us: nothing to copy.
            Err(rustix::io::Errno::NODATA | rustix::io::Errno::PERM | rustix::io::Errno::ACCESS) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut value = vec![0u8; len];
        let n = rustix::fs::lgetxattr(path, name, &mut value[..])?;
        value.truncate(n);
        out.push((name.as_bytes().to_vec(), value));
    }
    Ok(())
}
