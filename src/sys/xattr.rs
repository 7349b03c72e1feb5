//! Extended attributes of any number and size, names and values as bytes.
//!
//! The kernel caps a name list and one value at 64 KiB each (`XATTR_LIST_MAX`, `XATTR_SIZE_MAX`),
//! but a fixed buffer of any smaller size silently loses attributes when `ERANGE` is taken for
//! "none": buffers here start small and grow to the size the kernel reports. Every error other
//! than "this filesystem has no xattrs" and "removed since it was listed" is returned, so that a
//! caller that digests or copies a tree never drops one without saying so.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;

/// Whose xattrs: an open file (any type but a symlink, which cannot be opened), a path whose last
/// component is not followed, or `name` in the directory `dir` (not followed either).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target<'a> {
    Fd(BorrowedFd<'a>),
    Path(&'a Path),
    At(BorrowedFd<'a>, &'a [u8]),
}

/// `name` in `dir` as a path the `l*xattr` calls can take: through `/proc/self/fd`, which
/// resolves the directory by its fd whatever its depth, and leaves the last component unfollowed.
/// (`getxattrat(2)` would do without /proc, but only from Linux 6.13.)
fn at_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    PathBuf::from(OsStr::from_bytes(&p))
}

fn list_into(t: Target<'_>, buf: &mut [u8]) -> rustix::io::Result<usize> {
    match t {
        Target::Fd(fd) => rustix::fs::flistxattr(fd, buf),
        Target::Path(p) => rustix::fs::llistxattr(p, buf),
        Target::At(dir, name) => rustix::fs::llistxattr(at_path(dir, name), buf),
    }
}

fn get_into(t: Target<'_>, name: &OsStr, buf: &mut [u8]) -> rustix::io::Result<usize> {
    match t {
        Target::Fd(fd) => rustix::fs::fgetxattr(fd, name, buf),
        Target::Path(p) => rustix::fs::lgetxattr(p, name, buf),
        Target::At(dir, n) => rustix::fs::lgetxattr(at_path(dir, n), name, buf),
    }
}

/// Calls `f` with `buf`, growing `buf` to the size the kernel asks for (a call with an empty
/// buffer) for as long as `f` says `ERANGE`: the attribute may grow between the two calls.
fn sized(buf: &mut Vec<u8>, mut f: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>) -> rustix::io::Result<usize> {
    if buf.is_empty() {
        buf.resize(256, 0);
    }
    loop {
        match f(buf) {
            Err(Errno::RANGE) => {
                let need = f(&mut [])?;
                buf.resize(need.max(buf.len() * 2), 0);
            }
            r => return r,
        }
    }
}

/// The names of the xattrs of `t`, NUL-separated as the kernel lists them, into `buf`; returns
/// the length used. A filesystem without xattrs has none.
pub(crate) fn list(t: Target<'_>, buf: &mut Vec<u8>) -> io::Result<usize> {
    match sized(buf, |b| list_into(t, b)) {
        Ok(n) => Ok(n),
        Err(Errno::NOTSUP) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The value of the xattr `name` of `t` into `buf`; `None` when there is no such xattr.
pub(crate) fn get(t: Target<'_>, name: &[u8], buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    match sized(buf, |b| get_into(t, OsStr::from_bytes(name), b)) {
        Ok(n) => Ok(Some(n)),
        Err(Errno::NODATA | Errno::NOTSUP) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Every xattr of `t` as (name, value), sorted by name; `out` is cleared first. An xattr removed
/// between listing and reading is left out; any other failure is an error.
pub(crate) fn read_all(t: Target<'_>, out: &mut Vec<(Vec<u8>, Vec<u8>)>) -> io::Result<()> {
    out.clear();
    let mut names = Vec::new();
    let n = list(t, &mut names)?;
    let mut value = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        if let Some(len) = get(t, name, &mut value)? {
            out.push((name.to_vec(), value[..len].to_vec()));
        }
    }
    out.sort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Whether the temp dir's filesystem takes `user.*` xattrs at all.
    fn supported(p: &Path) -> bool {
        rustix::fs::lsetxattr(p, "user.probe", b"x", rustix::fs::XattrFlags::empty()).is_ok()
    }

    #[test]
    fn many_and_large_xattrs_are_all_read_by_every_target() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"").unwrap();
        if !supported(&f) {
            eprintln!("skipped: {} takes no user.* xattrs", t.path().display());
            return;
        }
        rustix::fs::lremovexattr(&f, "user.probe").unwrap();
        // 40 names of ordinary length overflow a 256-byte first guess (and the 1 KiB buffer
        // plyroot once had); one value does too. All of it fits ext4's 4 KiB xattr block.
        let mut want: Vec<(Vec<u8>, Vec<u8>)> = (0..40).map(|i| (format!("user.attribute.number.{i:02}").into_bytes(), vec![b'a' + (i % 26) as u8; 16])).collect();
        want.push((b"user.big".to_vec(), vec![7u8; 1000]));
        for (k, v) in &want {
            rustix::fs::lsetxattr(&f, OsStr::from_bytes(k), v, rustix::fs::XattrFlags::empty()).unwrap();
        }
        want.sort();
        let file = std::fs::File::open(&f).unwrap();
        let dir = std::fs::File::open(t.path()).unwrap();
        for target in [Target::Path(&f), Target::Fd(file.as_fd()), Target::At(dir.as_fd(), b"f")] {
            let mut got = Vec::new();
            read_all(target, &mut got).unwrap();
            assert_eq!(got, want, "{target:?}");
        }
        let mut buf = Vec::new();
        assert_eq!(get(Target::Path(&f), b"user.none", &mut buf).unwrap(), None);
    }

    #[test]
    fn errors_are_returned_not_swallowed() {
        let mut out = vec![(b"stale".to_vec(), Vec::new())];
        let e = read_all(Target::Path(Path::new("/nonexistent/plyroot")), &mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
