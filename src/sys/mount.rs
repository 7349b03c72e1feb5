//! Mounts through the new mount API (`fsopen`/`fsconfig`/`fsmount`/`move_mount`/`open_tree`).
//!
//! Every mount is first made as a detached mount fd, configured, then attached onto a target that
//! was resolved as an fd inside the new root (`openat2` with `RESOLVE_IN_ROOT`), so no path string
//! from a layer can steer a mount onto the host.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
use rustix::mount::{
    fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
    open_tree, FsMountFlags, FsOpenFlags, MountAttrFlags, MountPropagationFlags, MoveMountFlags,
    OpenTreeFlags, UnmountFlags,
};

use super::{err, Result, SysError};

/// Reads the messages the kernel left in an fs-context fd (lines like `e overlayfs: …`).
fn fs_context_messages(fd: BorrowedFd<'_>) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let file = fd.try_clone_to_owned().map(std::fs::File::from);
    if let Ok(mut f) = file {
        // Each read returns one message; ENODATA ends the queue.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            out.push(line.trim_start_matches(['e', 'w', 'i', ' ']).trim_end().to_owned());
        }
    }
    out.join("; ")
}

fn fs_err(op: &'static str, path: &Path, fs: BorrowedFd<'_>, e: rustix::io::Errno) -> SysError {
    SysError { op, path: path.to_owned(), detail: Some(fs_context_messages(fs)), source: e.into() }
}

/// A detached overlay mount: `lowers` top first, `upper` = (upperdir, workdir) or none for a
/// read-only root. Uses `lowerdir+` (one call per layer), so the page-sized option string limit
/// of mount(2) does not apply; the kernel allows up to 500 lowers. `volatile`: no sync reaches
/// the upper's filesystem, not even at unmount (for an upper that is thrown away, or synced by
/// whoever keeps it).
pub(crate) fn overlay(lowers: &[PathBuf], upper: Option<(&Path, &Path)>, volatile: bool) -> Result<OwnedFd> {
    let what = Path::new("overlay");
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| err("fsopen", what, e))?;
    let f = fs.as_fd();
    fsconfig_set_string(f, "source", "plyroot").map_err(|e| fs_err("configure overlay", what, f, e))?;
    // userxattr in every mode, also as real root: whiteouts/opaque markers are user.overlay.*, so
    // one store works both ways.
    fsconfig_set_flag(f, "userxattr").map_err(|e| fs_err("configure overlay userxattr", what, f, e))?;
    for l in lowers {
        fsconfig_set_string(f, "lowerdir+", l.as_os_str()).map_err(|e| fs_err("add overlay lower", l, f, e))?;
    }
    if let Some((up, work)) = upper {
        fsconfig_set_string(f, "upperdir", up.as_os_str()).map_err(|e| fs_err("set overlay upper", up, f, e))?;
        fsconfig_set_string(f, "workdir", work.as_os_str()).map_err(|e| fs_err("set overlay workdir", work, f, e))?;
        if volatile {
            fsconfig_set_flag(f, "volatile").map_err(|e| fs_err("configure overlay volatile", what, f, e))?;
        }
    }
    fsconfig_create(f).map_err(|e| fs_err("create overlay", what, f, e))?;
    let attrs = if upper.is_none() { MountAttrFlags::MOUNT_ATTR_RDONLY } else { MountAttrFlags::empty() };
    fsmount(f, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(|e| fs_err("mount overlay", what, f, e))
}

/// A detached mount of a pseudo filesystem (`tmpfs`, `devpts`, `proc`) with string options.
pub(crate) fn pseudo(fstype: &'static str, options: &[(&str, &str)], attrs: MountAttrFlags) -> Result<OwnedFd> {
    let what = Path::new(fstype);
    let fs = fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| err("fsopen", what, e))?;
    let f = fs.as_fd();
    for (k, v) in options {
        fsconfig_set_string(f, *k, *v).map_err(|e| fs_err("configure", what, f, e))?;
    }
    fsconfig_create(f).map_err(|e| fs_err("create", what, f, e))?;
    fsmount(f, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(|e| fs_err("mount", what, f, e))
}

/// A detached copy of the host mount at `path` (and, with `recursive`, the mounts below it).
pub(crate) fn clone_tree(path: &Path, recursive: bool) -> Result<OwnedFd> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    open_tree(CWD, path, flags).map_err(|e| err("bind", path, e))
}

/// A second detached mount of what the detached mount `mnt` shows (one fd's mount can be attached
/// only once: a forked process that shares the fd needs its own).
pub(crate) fn clone_detached(mnt: BorrowedFd<'_>, shown: &Path) -> Result<OwnedFd> {
    open_tree(mnt, "", OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_EMPTY_PATH).map_err(|e| err("clone the mount of", shown, e))
}

/// Makes a detached mount (and everything below it) read-only before it is attached.
pub(crate) fn set_readonly(mnt: BorrowedFd<'_>, path: &Path) -> Result<()> {
    set_attrs(mnt, libc::MOUNT_ATTR_RDONLY, path)
}

/// Makes a detached mount (and everything below it) refuse to open device nodes.
pub(crate) fn set_nodev(mnt: BorrowedFd<'_>, path: &Path) -> Result<()> {
    set_attrs(mnt, libc::MOUNT_ATTR_NODEV, path)
}

/// Sets the `MOUNT_ATTR_*` flags `set` on a detached mount and everything below it.
fn set_attrs(mnt: BorrowedFd<'_>, set: u64, path: &Path) -> Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr { attr_set: set, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes from a valid, initialized struct
    // laid out as the kernel's `struct mount_attr`; the path is a NUL-terminated empty string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(err(if set == libc::MOUNT_ATTR_NODEV { "refuse device nodes on" } else { "make read-only" }, path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Attaches a detached mount onto the object `target` refers to.
pub(crate) fn attach(mnt: BorrowedFd<'_>, target: BorrowedFd<'_>, shown: &Path) -> Result<()> {
    move_mount(
        mnt,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| err("attach mount on", shown, e))
}

/// Attaches a detached mount onto a host path (the root's mount point, outside the new root).
pub(crate) fn attach_at(mnt: BorrowedFd<'_>, target: &Path) -> Result<()> {
    move_mount(mnt, "", CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .map_err(|e| err("attach mount on", target, e))
}

/// Stops mount events propagating between our mount namespace and the host's.
pub(crate) fn make_private_recursive() -> Result<()> {
    rustix::mount::mount_change("/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)
        .map_err(|e| err("make mounts private", "/", e))
}

/// Switches the root to `new_root` and detaches the old one.
pub(crate) fn pivot_into(new_root: BorrowedFd<'_>, shown: &Path) -> Result<()> {
    rustix::process::fchdir(new_root).map_err(|e| err("chdir", shown, e))?;
    // pivot_root(".", ".") stacks the old root on top of the new one at the same place, so no
    // put_old directory has to exist inside the new root; unmounting "." then drops the old root.
    rustix::process::pivot_root(".", ".").map_err(|e| err("pivot_root", shown, e))?;
    rustix::mount::unmount(".", UnmountFlags::DETACH).map_err(|e| err("detach old root", "/", e))?;
    rustix::process::chdir("/").map_err(|e| err("chdir", "/", e))
}

/// The kind of a mount point to create when it is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
}

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// An `O_PATH` fd for `path` resolved inside `root` as if `root` were `/` (symlinks and `..`
/// cannot leave it). With `create`, missing directories and the final entry are made.
pub(crate) fn resolve_in(root: BorrowedFd<'_>, path: &Path, kind: Kind, create: bool) -> Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::CLOEXEC;
    match rustix::fs::openat2(root, path, flags, Mode::empty(), RESOLVE) {
        Ok(fd) => return Ok(fd),
        Err(rustix::io::Errno::NOENT) if create => {}
        Err(e) => return Err(err("resolve mount point", path, e)),
    }
    // Walk down from the root one component at a time, always resolving the whole prefix from
    // the root, so a symlinked directory inside the root resolves as it would after pivot_root.
    let mut dir = rustix::fs::openat2(root, "/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty(), RESOLVE)
        .map_err(|e| err("open root", "/", e))?;
    let comps: Vec<_> = path.components().filter(|c| matches!(c, std::path::Component::Normal(_))).collect();
    let mut prefix = PathBuf::from("/");
    for (i, c) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let name = c.as_os_str();
        prefix.push(name);
        let fl = if last { flags } else { flags | OFlags::DIRECTORY };
        match rustix::fs::openat2(root, &prefix, fl, Mode::empty(), RESOLVE) {
            Ok(fd) => {
                dir = fd;
                continue;
            }
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(err("resolve mount point", &prefix, e)),
        }
        let made = if last && kind == Kind::File {
            rustix::fs::openat(&dir, name, OFlags::CREATE | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::from_raw_mode(0o644)).map(drop)
        } else {
            rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755))
        };
        match made {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(err("create mount point", &prefix, e)),
        }
        dir = rustix::fs::openat2(root, &prefix, fl, Mode::empty(), RESOLVE).map_err(|e| err("resolve mount point", &prefix, e))?;
    }
    Ok(dir)
}
