//! Walking trees of any depth: the canonical serializer, the merged export, the upper's diff and
//! removal all go through a [`Cursor`], so that none of them depends on how deep a tree is or on
//! whether the user may enter every directory in it.
//!
//! - Every name is resolved relative to an open directory (`*at` calls), never as a path from `/`:
//!   a run can make a tree far deeper than `PATH_MAX` (4096 bytes) allows a path to be.
//! - At most [`WINDOW`] directories are held open. Deeper ones are closed, shallowest first, and
//!   opened again from the nearest open ancestor (in steps shorter than `PATH_MAX`) when the walk
//!   comes back up to them, so a 2,045-level tree costs neither 2,045 fds nor `EMFILE`.
//! - A walk can stand in several trees at once (the tiers of a stack all hold one relative path),
//!   each directory in each tier its own slot.
//! - [`Lend`]: an unprivileged user reading (or removing) its own tree that holds a directory of
//!   mode 000, 0300 or 0111 adds the owner bits it needs while inside, and gives the mode back on
//!   the way out (and when the walk ends early). Root, also root in a user namespace over its own
//!   ids, needs no such help and gets none: a directory's mode is never touched then.
//!
//! Nothing here follows a symlink: the last component by `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`,
//! every other one by `RESOLVE_NO_SYMLINKS`.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

/// Directory fds a walk holds open at most (all tiers together).
const WINDOW: usize = 48;

/// The longest relative path given to one `openat2` when reopening a directory: below PATH_MAX.
const STEP: usize = 3072;

/// What an unprivileged owner adds to its own directories' modes while walking them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lend {
    /// Read and enter (`r-x` for the owner): listing and reading what is below.
    Read,
    /// Also change (`rwx`): removing what is below.
    Write,
}

impl Lend {
    fn bits(self) -> u32 {
        match self {
            Lend::Read => 0o500,
            Lend::Write => 0o700,
        }
    }
}

struct Slot {
    tier: usize,
    fd: Option<OwnedFd>,
    /// The directory's own mode, to give back, when the walk lent its owner more.
    lent: Option<u32>,
}

struct Frame {
    /// The directory's name in its parent (empty for the roots).
    name: Vec<u8>,
    slots: Vec<Slot>,
}

/// The directories on the path from the roots to where a depth-first walk is, in one or more
/// trees (tiers). Frame 0 holds the roots.
pub(crate) struct Cursor {
    roots: Vec<PathBuf>,
    frames: Vec<Frame>,
    open: usize,
    lend: Lend,
    /// The effective uid when it is not root: only then is a mode ever lent.
    lender: Option<u32>,
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// The lstat of `name` in `dir`.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Stat> {
    Ok(rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW)?)
}

/// The names in `dir` (without `.` and `..`) with the type the directory entry gives, which is
/// `Unknown` on filesystems that do not record it.
pub(crate) fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, FileType)>> {
    let mut out = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push((name.to_vec(), e.file_type()));
        }
    }
    Ok(out)
}

/// What a stat says the entry is.
pub(crate) fn kind(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Whether `st` is an overlayfs whiteout: a char device 0:0.
pub(crate) fn is_whiteout(st: &Stat) -> bool {
    kind(st) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Whether the directory `name` in `dir` is opaque (`user.overlay.opaque=y`).
pub(crate) fn is_opaque_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<bool> {
    opaque(crate::sys::xattr::Target::At(dir, name))
}

/// Whether the open directory `fd` is opaque.
pub(crate) fn is_opaque_fd(fd: BorrowedFd<'_>) -> io::Result<bool> {
    opaque(crate::sys::xattr::Target::Fd(fd))
}

fn opaque(t: crate::sys::xattr::Target<'_>) -> io::Result<bool> {
    let mut buf = Vec::with_capacity(8);
    Ok(crate::sys::xattr::get(t, b"user.overlay.opaque", &mut buf)?.is_some_and(|n| &buf[..n] == b"y"))
}

/// Opens the directory `rel` (names joined by `/`, none `..`, none a symlink) below `base`, in
/// steps shorter than PATH_MAX.
fn open_below(base: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    let mut held: Option<OwnedFd> = None;
    let mut rest = rel;
    loop {
        let cut = if rest.len() <= STEP { rest.len() } else { rest[..STEP].iter().rposition(|&b| b == b'/').unwrap_or(rest.len()) };
        let at = held.as_ref().map_or(base, |f| f.as_fd());
        let fd = rustix::fs::openat2(at, os(&rest[..cut]), dir_flags(), Mode::empty(), resolve)?;
        rest = rest.get(cut + 1..).unwrap_or_default();
        if rest.is_empty() {
            return Ok(fd);
        }
        held = Some(fd);
    }
}

impl Cursor {
    /// A walk standing at the roots of `roots` (tier i is `roots[i]`).
    pub(crate) fn new(roots: &[&Path], lend: Lend) -> io::Result<Cursor> {
        let euid = rustix::process::geteuid();
        let mut c = Cursor {
            roots: roots.iter().map(|p| p.to_path_buf()).collect(),
            frames: vec![Frame { name: Vec::new(), slots: (0..roots.len()).map(|tier| Slot { tier, fd: None, lent: None }).collect() }],
            open: 0,
            lend,
            lender: (!euid.is_root()).then(|| euid.as_raw()),
        };
        // Fail early, naming nothing below: a root that cannot be opened is the caller's error.
        for tier in 0..roots.len().min(WINDOW) {
            c.dir(tier)?;
        }
        Ok(c)
    }

    /// How many directories below the roots the walk stands in.
    #[cfg(test)]
    fn depth(&self) -> usize {
        self.frames.len() - 1
    }

    /// The current directory in `tier` (which must hold it), opened again if it was closed.
    pub(crate) fn dir(&mut self, tier: usize) -> io::Result<BorrowedFd<'_>> {
        let f = self.frames.len() - 1;
        let s = self.frames[f].slots.iter().position(|s| s.tier == tier).ok_or_else(|| io::Error::other(format!("tier {tier} does not hold this directory")))?;
        if self.frames[f].slots[s].fd.is_none() {
            let fd = self.reopen(f, tier)?;
            self.frames[f].slots[s].fd = Some(fd);
            self.open += 1;
            self.evict((f, s));
        }
        Ok(self.frames[f].slots[s].fd.as_ref().expect("just opened").as_fd())
    }

    /// Opens frame `f`'s directory in `tier` from its nearest open ancestor (or its root).
    fn reopen(&self, f: usize, tier: usize) -> io::Result<OwnedFd> {
        let held = (0..f).rev().find_map(|g| self.frames[g].slots.iter().find(|s| s.tier == tier).and_then(|s| s.fd.as_ref()).map(|fd| (g, fd)));
        let (from, rel) = match held {
            Some((g, fd)) => (fd.as_fd(), g + 1),
            None if f == 0 => return Ok(rustix::fs::open(&self.roots[tier], dir_flags(), Mode::empty())?),
            None => {
                let root = rustix::fs::open(&self.roots[tier], dir_flags(), Mode::empty())?;
                let path: Vec<u8> = self.frames[1..=f].iter().map(|fr| fr.name.as_slice()).collect::<Vec<_>>().join(&b'/');
                return open_below(root.as_fd(), &path);
            }
        };
        let path: Vec<u8> = self.frames[rel..=f].iter().map(|fr| fr.name.as_slice()).collect::<Vec<_>>().join(&b'/');
        open_below(from, &path)
    }

    /// Closes the shallowest open directories (never `keep`) until at most WINDOW are open.
    fn evict(&mut self, keep: (usize, usize)) {
        'frames: for f in 0..self.frames.len() {
            for s in 0..self.frames[f].slots.len() {
                if self.open <= WINDOW {
                    break 'frames;
                }
                if (f, s) != keep && self.frames[f].slots[s].fd.take().is_some() {
                    self.open -= 1;
                }
            }
        }
    }

    /// Enters the directory `name` of the current directory, in each tier of `dirs` (with the
    /// lstat that showed it is a directory there), lending the owner what the walk needs.
    pub(crate) fn enter(&mut self, name: &[u8], dirs: &[(usize, &Stat)]) -> io::Result<()> {
        let mut slots: Vec<Slot> = Vec::with_capacity(dirs.len());
        let mut result = Ok(());
        for &(tier, st) in dirs {
            let need = self.lend.bits();
            let mode = st.st_mode & 0o7777;
            let lend = self.lender.is_some_and(|me| me == st.st_uid) && mode & need != need;
            let opened = (|| -> io::Result<(OwnedFd, Option<u32>)> {
                let parent = self.dir(tier)?;
                if !lend {
                    return Ok((rustix::fs::openat(parent, os(name), dir_flags(), Mode::empty())?, None));
                }
                // Following `name` here is safe: it was just seen as a directory, not a link.
                rustix::fs::chmodat(parent, os(name), Mode::from_raw_mode(mode | need), AtFlags::empty())?;
                match rustix::fs::openat(parent, os(name), dir_flags(), Mode::empty()) {
                    Ok(fd) => Ok((fd, Some(mode))),
                    Err(e) => {
                        let _ = rustix::fs::chmodat(parent, os(name), Mode::from_raw_mode(mode), AtFlags::empty());
                        Err(e.into())
                    }
                }
            })();
            match opened {
                Ok((fd, lent)) => {
                    slots.push(Slot { tier, fd: Some(fd), lent });
                    self.open += 1;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Pushed even when one failed, so that `leave` (or drop) gives back what was lent.
        self.frames.push(Frame { name: name.to_vec(), slots });
        let top = self.frames.len() - 1;
        self.evict((top, usize::MAX));
        if result.is_err() {
            let _ = self.leave();
        }
        result
    }

    /// Leaves the current directory for its parent, giving back any mode lent on the way in.
    pub(crate) fn leave(&mut self) -> io::Result<()> {
        if self.frames.len() < 2 {
            return Ok(());
        }
        let mut first_err = Ok(());
        let top = self.frames.len() - 1;
        for s in 0..self.frames[top].slots.len() {
            let Some(mode) = self.frames[top].slots[s].lent.take() else { continue };
            let tier = self.frames[top].slots[s].tier;
            let r = match &self.frames[top].slots[s].fd {
                Some(fd) => rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(io::Error::from),
                None => {
                    let name = self.frames[top].name.clone();
                    let frame = self.frames.pop().expect("top frame");
                    let r = self.dir(tier).and_then(|p| Ok(rustix::fs::chmodat(p, os(&name), Mode::from_raw_mode(mode), AtFlags::empty())?));
                    self.frames.push(frame);
                    r
                }
            };
            if first_err.is_ok() {
                first_err = r;
            }
        }
        let frame = self.frames.pop().expect("top frame");
        self.open -= frame.slots.iter().filter(|s| s.fd.is_some()).count();
        first_err
    }
}

impl Drop for Cursor {
    /// A walk that ended early (an error) still gives back every mode it lent, deepest first.
    fn drop(&mut self) {
        while self.frames.len() > 1 {
            let _ = self.leave();
        }
    }
}

/// What one tier of a stack has at a name.
pub(crate) enum Found<T> {
    /// On disk, with its lstat.
    Disk(Stat),
    /// Not on disk, but recorded in the tier's metadata (a device an unprivileged import could
    /// not create).
    Recorded(T),
}

/// How a stack of tiers resolves one name, the way overlayfs does.
pub(crate) struct Resolved<T> {
    /// The tier that provides the name, and what it has there; `None`: deleted or absent.
    pub top: Option<(usize, Found<T>)>,
    /// When that is a directory: the tiers whose directories merge into it, top first, with
    /// their lstats (the top's included).
    pub dirs: Vec<(usize, Stat)>,
    /// Whether the tiers cut off what lies below them at the name: a whiteout, an opaque
    /// directory, or a directory over a lower non-directory (a non-directory on top hides what
    /// is below by being there, and does not count).
    pub cut: bool,
}

/// Resolves `name` in the current directory of the tiers `tiers` (top first): the top-most tier
/// that has it provides it; a whiteout deletes it in every tier below; a non-directory, or an
/// opaque directory, hides the tiers below it; a directory over a lower non-directory hides that
/// one and everything under it; directories merge. `recorded(tier)`: what the tier's metadata
/// holds at the name when its disk does not.
pub(crate) fn resolve<T>(cur: &mut Cursor, tiers: &[usize], name: &[u8], mut recorded: impl FnMut(usize) -> Option<T>) -> io::Result<Resolved<T>> {
    let mut top: Option<(usize, Found<T>)> = None;
    let mut dirs: Vec<(usize, Stat)> = Vec::new();
    let mut cut = false;
    for &tier in tiers {
        let dir = cur.dir(tier)?;
        let st = match stat_at(dir, name) {
            Ok(st) => st,
            Err(e) if e.kind() == io::ErrorKind::NotFound => match recorded(tier) {
                Some(r) if top.is_none() => {
                    top = Some((tier, Found::Recorded(r)));
                    break;
                }
                // Below a directory, a recorded device is a non-directory: hidden.
                Some(_) => {
                    cut = true;
                    break;
                }
                None => continue,
            },
            Err(e) => return Err(e),
        };
        if is_whiteout(&st) {
            cut = true;
            break;
        }
        let is_dir = kind(&st) == FileType::Directory;
        if top.is_some() && !is_dir {
            cut = true;
            break;
        }
        let opaque = is_dir && is_opaque_at(cur.dir(tier)?, name)?;
        cut |= opaque;
        if is_dir {
            dirs.push((tier, st));
        }
        if top.is_none() {
            top = Some((tier, Found::Disk(st)));
        }
        if !is_dir || opaque {
            break;
        }
    }
    Ok(Resolved { top, dirs, cut })
}

/// Removes the directory `path` and everything below it, however deep, lending its owner the
/// write access it needs; the first failure is returned with the path (relative to `path`) it
/// happened at, after giving back what was lent.
pub(crate) fn remove_dir_tree(path: &Path) -> Result<(), (Vec<u8>, io::Error)> {
    let top = rustix::fs::lstat(path).map_err(|e| (Vec::new(), e.into()))?;
    let euid = rustix::process::geteuid();
    if !euid.is_root() && top.st_uid == euid.as_raw() && top.st_mode & 0o700 != 0o700 {
        rustix::fs::chmod(path, Mode::from_raw_mode((top.st_mode & 0o7777) | 0o700)).map_err(|e| (Vec::new(), e.into()))?;
    }
    let mut cur = Cursor::new(&[path], Lend::Write).map_err(|e| (Vec::new(), e))?;
    let mut rel: Vec<u8> = Vec::new();
    let err = |rel: &[u8], e: io::Error| (rel.to_vec(), e);
    let mut levels: Vec<Vec<(Vec<u8>, FileType)>> = vec![list(cur.dir(0).map_err(|e| err(&rel, e))?).map_err(|e| err(&rel, e))?];
    let mut lens: Vec<usize> = Vec::new();
    while let Some(level) = levels.last_mut() {
        match level.pop() {
            Some((name, ft)) => {
                let at = cur.dir(0).map_err(|e| err(&rel, e))?;
                let st = match ft {
                    FileType::Directory | FileType::Unknown => match stat_at(at, &name) {
                        Ok(st) => Some(st),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(err(&join(&rel, &name), e)),
                    },
                    _ => None,
                };
                match st.filter(|st| kind(st) == FileType::Directory) {
                    Some(st) => {
                        lens.push(rel.len());
                        rel = join(&rel, &name);
                        cur.enter(&name, &[(0, &st)]).map_err(|e| err(&rel, e))?;
                        levels.push(list(cur.dir(0).map_err(|e| err(&rel, e))?).map_err(|e| err(&rel, e))?);
                    }
                    None => match rustix::fs::unlinkat(at, os(&name), AtFlags::empty()) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        Err(e) => return Err(err(&join(&rel, &name), e.into())),
                    },
                }
            }
            None => {
                levels.pop();
                let Some(len) = lens.pop() else { break };
                let name = rel[if len == 0 { 0 } else { len + 1 }..].to_vec();
                // Nothing to give back: the directory goes.
                cur.leave().map_err(|e| err(&rel, e))?;
                let here = rel.clone();
                rel.truncate(len);
                match rustix::fs::unlinkat(cur.dir(0).map_err(|e| err(&rel, e))?, os(&name), AtFlags::REMOVEDIR) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(err(&here, e.into())),
                }
            }
        }
    }
    drop(cur);
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err((Vec::new(), e)),
    }
}

/// `rel/name` (just `name` at the root).
pub(crate) fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(rel.len() + 1 + name.len());
    p.extend_from_slice(rel);
    if !rel.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// A name as it can be shown on one line of a terminal: printable UTF-8 as is; a backslash,
/// control characters and bytes that are not UTF-8 as `\\`, `\n`, `\xNN` (so two distinct
/// names always show distinctly, and none can move the cursor or set a title).
pub(crate) fn shown(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => {
                    let mut b = [0u8; 4];
                    for byte in c.encode_utf8(&mut b).bytes() {
                        out.push_str(&format!("\\x{byte:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    /// A chain of `n` directories `d/d/…` under `root` with a file at the bottom, made with
    /// `*at` calls (a path to the bottom is longer than PATH_MAX).
    fn chain(root: &Path, n: usize) {
        let mut fd = rustix::fs::open(root, dir_flags(), Mode::empty()).unwrap();
        for _ in 0..n {
            rustix::fs::mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
            fd = rustix::fs::openat(&fd, "d", dir_flags(), Mode::empty()).unwrap();
        }
        let f = rustix::fs::openat(&fd, "bottom", OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC, Mode::from_raw_mode(0o644)).unwrap();
        rustix::io::write(&f, b"x").unwrap();
    }

    #[test]
    fn a_walk_deeper_than_path_max_holds_few_fds() {
        let t = tempfile::tempdir().unwrap();
        chain(t.path(), 2100);
        let mut cur = Cursor::new(&[t.path()], Lend::Read).unwrap();
        let mut depth = 0;
        loop {
            let names = list(cur.dir(0).unwrap()).unwrap();
            if names.iter().any(|(n, _)| n == b"bottom") {
                break;
            }
            let st = stat_at(cur.dir(0).unwrap(), b"d").unwrap();
            cur.enter(b"d", &[(0, &st)]).unwrap();
            depth += 1;
            assert!(cur.open <= WINDOW + 1, "{} fds open at depth {depth}", cur.open);
        }
        assert_eq!(depth, 2100);
        // Back up, reopening what was closed on the way down.
        while cur.depth() > 0 {
            cur.leave().unwrap();
            let names = list(cur.dir(0).unwrap()).unwrap();
            assert_eq!(names.len(), 1);
        }
        drop(cur);
        remove_dir_tree(t.path()).unwrap();
        assert!(!t.path().exists());
    }

    #[test]
    fn removal_lends_write_access_and_a_failed_walk_gives_modes_back() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("r");
        for (d, mode) in [("r", 0o755), ("r/a", 0o555), ("r/a/b", 0o000), ("r/c", 0o111)] {
            fs::create_dir(t.path().join(d)).unwrap();
            fs::write(t.path().join(d).join("f"), b"x").unwrap();
            fs::set_permissions(t.path().join(d), fs::Permissions::from_mode(mode)).unwrap();
        }
        {
            let mut cur = Cursor::new(&[r.as_path()], Lend::Read).unwrap();
            let st = stat_at(cur.dir(0).unwrap(), b"a").unwrap();
            cur.enter(b"a", &[(0, &st)]).unwrap();
            let st = stat_at(cur.dir(0).unwrap(), b"b").unwrap();
            cur.enter(b"b", &[(0, &st)]).unwrap();
            assert_eq!(list(cur.dir(0).unwrap()).unwrap().len(), 1);
            // Dropped here without leaving: the modes come back all the same.
        }
        let mode = |p: &str| fs::symlink_metadata(t.path().join(p)).unwrap().permissions().mode() & 0o7777;
        if !rustix::process::geteuid().is_root() {
            assert_eq!((mode("r/a"), mode("r/a/b"), mode("r/c")), (0o555, 0o000, 0o111));
        }
        remove_dir_tree(&r).unwrap();
        assert!(!r.exists());
    }

    #[test]
    fn shown_escapes_what_a_terminal_would_act_on() {
        assert_eq!(shown(b"usr/bin/ls"), "usr/bin/ls");
        assert_eq!(shown("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_eq!(shown(b"a\xffb"), "a\\xffb");
        assert_eq!(shown(b"\x1b]0;title\x07\x1b[2J"), "\\x1b]0;title\\x07\\x1b[2J");
        assert_eq!(shown(b"back\\slash\n"), "back\\\\slash\\n");
        assert_eq!(shown("\u{9b}".as_bytes()), "\\xc2\\x9b", "C1 controls too");
        assert_ne!(shown(b"a\xff"), shown("a\u{FFFD}".as_bytes()));
    }
}
