//! [`copy_dir`]: a `dir:` source, a directory tree copied into a stage as it is.
//!
//! Symlinks are copied, never followed; hardlinks are kept by (dev, ino); file data is copied by
//! the kernel (`copy_file_range` through `io::copy`). The tree is taken literally: `.wh.` names
//! are not whiteouts here, but char 0:0 nodes are (they are one already). Names, link targets
//! and xattrs are bytes, as on disk; every xattr is copied, whatever their number and size.

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
use crate::sys::xattr::Target;

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
        return Err(UnpackError::Open { path: src.to_owned(), source: rustix::io::Errno::NOTDIR.into() });
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
        crate::sys::xattr::read_all(Target::Path(path), &mut self.xattrs).map_err(Self::open_err(path))?;
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

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;
    use crate::source::testutil::{is_root, open_dir};

    fn set_mtime(p: &Path, secs: i64) {
        let t = Timespec { tv_sec: secs, tv_nsec: 7 };
        let times = rustix::fs::Timestamps { last_access: t, last_modification: t };
        rustix::fs::utimensat(rustix::fs::CWD, p, &times, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    #[test]
    fn copies_tree_faithfully() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir(s.join("ro")).unwrap();
        fs::write(s.join("ro/file"), b"data").unwrap();
        fs::write(s.join("suid"), b"x").unwrap();
        fs::set_permissions(s.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(s.join("suid"), s.join("suid-link")).unwrap();
        symlink("/etc", s.join("etc-link")).unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, s.join("fifo"), rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o600), 0).unwrap();
        rustix::fs::setxattr(s.join("ro/file"), "user.k", b"v", rustix::fs::XattrFlags::empty()).unwrap();
        let foreign = is_root();
        if foreign {
            rustix::fs::chown(s.join("ro/file"), Some(rustix::fs::Uid::from_raw(1000)), Some(rustix::fs::Gid::from_raw(1000))).unwrap();
        }
        for p in ["ro/file", "suid", "etc-link", "fifo"] {
            set_mtime(&s.join(p), 1_500_000_000);
        }
        fs::set_permissions(s.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
        set_mtime(&s.join("ro"), 1_400_000_000);

        let dst = tempfile::tempdir().unwrap();
        let d = dst.path();
        let out = copy_dir(s, open_dir(d).as_fd(), Ownership::Record, &mut Progress::hidden()).unwrap();
        fs::set_permissions(s.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();

        assert_eq!(fs::read(d.join("ro/file")).unwrap(), b"data");
        let ro = fs::metadata(d.join("ro")).unwrap();
        assert_eq!((ro.mode() & 0o7777, ro.mtime(), ro.mtime_nsec()), (0o555, 1_400_000_000, 7));
        assert_eq!(fs::metadata(d.join("suid")).unwrap().mode() & 0o7777, 0o4755);
        let (a, b) = (fs::metadata(d.join("suid")).unwrap(), fs::metadata(d.join("suid-link")).unwrap());
        assert_eq!(a.ino(), b.ino());
        assert_eq!(fs::read_link(d.join("etc-link")).unwrap(), Path::new("/etc"));
        assert_eq!(fs::symlink_metadata(d.join("etc-link")).unwrap().mtime(), 1_500_000_000);
        assert!(fs::symlink_metadata(d.join("fifo")).unwrap().file_type().is_fifo());
        let mut buf = [0u8; 4];
        assert_eq!(rustix::fs::getxattr(d.join("ro/file"), "user.k", &mut buf[..]).unwrap(), 1);
        let file_owner = out.overrides.entries.get("ro/file").and_then(|o| o.owner);
        assert_eq!(file_owner, foreign.then_some((1000, 1000)));
        assert_eq!(out.overrides.entries.len(), usize::from(foreign), "{:?}", out.overrides);
        fs::set_permissions(d.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn missing_source_names_the_path() {
        let dst = tempfile::tempdir().unwrap();
        let err = copy_dir(Path::new("/nonexistent/src"), open_dir(dst.path()).as_fd(), Ownership::Record, &mut Progress::hidden()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/src"), "{err}");
    }
}
