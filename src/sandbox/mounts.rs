//! The root's mounts: the overlay (the environment's one shared mount, or a run's own), the host
//! shares of the plan, and the switch into it.
//!
//! The shared overlay is made once per environment and upper. The first run mounts it in the
//! environment's base namespaces; a later run clones it, as a detached mount, from the mount
//! namespace of a live run (`open_tree` of that namespace's root, entered with `setns`), so there
//! is exactly one overlay superblock over an upper however many runs, identities and binds use it.
//! Either way the overlay arrives as a detached mount and is attached in the run's own mount
//! namespace, with the per-run mounts on top: nothing a run binds is seen by another.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustix::fs::{Mode, OFlags};
use rustix::mount::MountAttrFlags;
use rustix::thread::LinkNameSpaceType;

use super::namespaces::Base;
use super::{Op, Plan, RootSpec, Skel, Upper};
use crate::sys::mount::{self, Kind};
use crate::sys::ns;

/// The environment's shared overlay and its `base = "host"` overlays, as detached mounts.
pub(crate) struct Shared {
    root: OwnedFd,
    host_dirs: Vec<(String, OwnedFd)>,
}

/// Mounts the shared overlay fresh, or clones it from the joined run (see the module header).
/// Runs in the base namespaces; returns None for a root without a shared upper.
pub(crate) fn shared(root: &RootSpec, base: &Base) -> Result<Option<Shared>> {
    let Upper::Shared { upper, work } = &root.upper else { return Ok(None) };
    match &base.joined {
        None => {
            let Skel::Dir(skel) = &root.skel else { bail!("the shared mount needs its skeleton in the store") };
            let lowers: Vec<PathBuf> = std::iter::once(skel.clone()).chain(root.lowers.iter().cloned()).collect();
            fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
            let m = mount::overlay(&lowers, Some((upper, work)), root.volatile).context("cannot mount the environment's root (overlayfs); `plyroot doctor` checks what this kernel allows")?;
            if root.volatile {
                // A build step's root: a device node in a layer (an untrusted tarball's) opens
                // nothing, even for real root.
                mount::set_nodev(m.as_fd(), upper)?;
            }
            let mut host_dirs = Vec::new();
            for (name, lowers) in &root.host_dirs {
                let (u, w) = (upper.join(name), work.join(format!("host-{name}")));
                for d in [&u, &w] {
                    fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
                }
                let h = mount::overlay(lowers, Some((&u, &w)), root.volatile).with_context(|| union_error(name))?;
                host_dirs.push((name.clone(), h));
            }
            Ok(Some(Shared { root: m, host_dirs }))
        }
        Some(theirs) => {
            let own = ns::open_ns(rustix::process::getpid().as_raw_nonzero().get(), "mnt")?;
            // In their namespace our root is theirs: "/" is the overlay, "/usr" a host-dir one.
            ns::enter(theirs, LinkNameSpaceType::Mount)?;
            let cloned = (|| -> Result<Shared> {
                let m = clone_overlay(Path::new("/"))?;
                let mut host_dirs = Vec::new();
                for (name, _) in &root.host_dirs {
                    host_dirs.push((name.clone(), clone_overlay(&Path::new("/").join(name))?));
                }
                Ok(Shared { root: m, host_dirs })
            })();
            ns::enter(&own, LinkNameSpaceType::Mount)?;
            Ok(Some(cloned.context("cannot take the root of the live run of this environment")?))
        }
    }
}

impl Shared {
    /// Its mounts' fds.
    pub(crate) fn fds(&self) -> impl Iterator<Item = &OwnedFd> {
        std::iter::once(&self.root).chain(self.host_dirs.iter().map(|(_, m)| m))
    }

    /// New detached mounts of the same overlays, for a second namespace to attach.
    pub(crate) fn clone_detached(&self, r: &RootSpec) -> Result<Shared> {
        let root = mount::clone_detached(self.root.as_fd(), &r.mount_point)?;
        let host_dirs = self.host_dirs.iter().map(|(n, m)| Ok((n.clone(), mount::clone_detached(m.as_fd(), &Path::new("/").join(n))?))).collect::<Result<_>>()?;
        Ok(Shared { root, host_dirs })
    }
}

/// Attaches the shared overlay at the root's mount point and its `base = "host"` overlays at
/// their places in it; returns the root.
pub(crate) fn attach_shared(s: &Shared, r: &RootSpec) -> Result<OwnedFd> {
    mount::attach_at(s.root.as_fd(), &r.mount_point)?;
    let root = open_dir(&r.mount_point)?;
    for (name, m) in &s.host_dirs {
        let at = Path::new("/").join(name);
        let target = mount::resolve_in(root.as_fd(), &at, Kind::Dir, true)?;
        let m = m.try_clone().context("cannot duplicate a mount's fd")?;
        mount::attach(m.as_fd(), target.as_fd(), &at).with_context(|| union_error(name))?;
    }
    Ok(root)
}

/// What failed when the host's directory /`name` could not be put under the layers.
fn union_error(name: &str) -> String {
    let why = if name.starts_with("nix/") { "nix = \"overlay\"" } else { "base = \"host\"" };
    format!("cannot union the host's /{name} under the layers ({why})")
}

/// A detached copy of the overlay mounted at `path` (only that mount, not what is on it).
fn clone_overlay(path: &Path) -> Result<OwnedFd> {
    let m = mount::clone_tree(path, false)?;
    let st = rustix::fs::fstatfs(&m).map_err(|e| crate::sys::err("statfs", path, e))?;
    // OVERLAYFS_SUPER_MAGIC: anything else is a mount a program put over the root.
    if st.f_type as i64 != 0x794c_7630 {
        bail!("{} in the live run is not its overlay (something is mounted over it)", path.display());
    }
    // A directory of the root's own overlay, not one of its own: the live run was started
    // without it (another `--nix`), and its view cannot change now.
    let mnt_id = |p: &Path| rustix::fs::statx(rustix::fs::CWD, p, rustix::fs::AtFlags::SYMLINK_NOFOLLOW, rustix::fs::StatxFlags::MNT_ID).map(|s| s.stx_mnt_id).map_err(|e| crate::sys::err("statx", p, e));
    if path != Path::new("/") && mnt_id(path)? == mnt_id(Path::new("/"))? {
        bail!("the live run of this environment has no overlay of its own at {}: it was started with another choice of /nix (--nix) or host directories; end it first, or run as it does", path.display());
    }
    Ok(m)
}

/// Builds the root per the plan (with `shared` when the upper is the environment's) and returns
/// an fd for it, ready for [`pivot`].
pub(crate) fn build(plan: &Plan, shared: Option<Shared>) -> Result<OwnedFd> {
    let r = &plan.root;
    let mp = &r.mount_point;
    // Every host path is copied before the root is attached at its mount point: a recursive copy
    // of a share that holds the store (the home, /tmp) must not carry the root itself along, or
    // each nested launch would copy every mount of the one it started in.
    let sources = clone_sources(&plan.ops, plan.sealed)?;
    let root = match (&r.upper, shared) {
        (Upper::Shared { .. }, Some(s)) => attach_shared(&s, r)?,
        (Upper::Shared { .. }, None) => bail!("the shared mount of this environment is missing"),
        (upper, _) => {
            // A tmpfs at the mount point holds what the run throws away: the upper and its
            // workdir, the skeleton when the store cannot hold it, and the root itself.
            let scratch = matches!(upper, Upper::Ephemeral) || matches!(r.skel, Skel::Tmpfs(_));
            let mut lowers = r.lowers.clone();
            let root_path = if scratch {
                let t = mount::pseudo("tmpfs", &[("mode", "0755")], MountAttrFlags::empty())?;
                mount::attach_at(t.as_fd(), mp)?;
                for d in ["upper", "work", "root"] {
                    rustix::fs::mkdirat(t.as_fd(), d, Mode::from_raw_mode(0o755)).with_context(|| format!("cannot create {}/{d}", mp.display()))?;
                }
                mp.join("root")
            } else {
                mp.clone()
            };
            match &r.skel {
                Skel::Dir(d) => lowers.insert(0, d.clone()),
                Skel::Tmpfs(spec) => {
                    super::skel::materialize(spec, &r.lowers, &mp.join("skel"))?;
                    lowers.insert(0, mp.join("skel"));
                }
            }
            let work = matches!(upper, Upper::Ephemeral).then(|| (mp.join("upper"), mp.join("work")));
            let m = mount::overlay(&lowers, work.as_ref().map(|(u, w)| (u.as_path(), w.as_path())), false).context("cannot mount the environment's root (overlayfs); `plyroot doctor` checks what this kernel allows")?;
            mount::attach_at(m.as_fd(), &root_path)?;
            let root = open_dir(&root_path)?;
            own_host_dirs(r, &root)?;
            root
        }
    };
    for (op, source) in plan.ops.iter().zip(sources) {
        match (op, source) {
            (Op::Bind { src, dst, kind, .. }, Source::Tree(tree)) => {
                if r.join.is_some() && mount::resolve_in(root.as_fd(), dst, *kind, false).is_err() {
                    // The live mount's skeleton was made for other binds; it cannot change now.
                    crate::diag::info!("{} does not exist in the environment's live mount: its mount point is made in the upper", dst.display());
                }
                let target = mount::resolve_in(root.as_fd(), dst, *kind, true)?;
                mount::attach(tree.as_fd(), target.as_fd(), dst).with_context(|| format!("cannot bind {} at {}", src.display(), dst.display()))?
            }
            (Op::Proc, _) => proc_fresh(&root).context("cannot mount a fresh /proc for the pid namespace")?,
            (Op::Dev { .. }, Source::Dev(nodes)) => dev(&root, nodes).context("cannot set up /dev")?,
            _ => bail!("a mount's source does not match its step"),
        }
    }
    Ok(root)
}

/// The `base = "host"` overlays of a root without a shared upper: a run's own.
fn own_host_dirs(r: &RootSpec, root: &OwnedFd) -> Result<()> {
    let mp = &r.mount_point;
    for (name, lowers) in &r.host_dirs {
        let at = Path::new("/").join(name);
        let work = matches!(r.upper, Upper::Ephemeral).then(|| (mp.join("upper").join(name), mp.join(format!("work-host-{name}"))));
        if let Some((u, w)) = &work {
            for d in [u, w] {
                fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            }
        }
        let m = mount::overlay(lowers, work.as_ref().map(|(u, w)| (u.as_path(), w.as_path())), false).with_context(|| union_error(name))?;
        let target = mount::resolve_in(root.as_fd(), &at, Kind::Dir, !matches!(r.upper, Upper::None))?;
        mount::attach(m.as_fd(), target.as_fd(), &at).with_context(|| union_error(name))?;
    }
    Ok(())
}

/// A per-run mount's host side, copied before the root exists.
enum Source {
    Tree(OwnedFd),
    Dev(DevNodes),
    None,
}

/// /dev's host nodes (name, copy), GPU nodes (path, copy, kind), the caller's terminal (N, copy).
type DevNodes = (Vec<(&'static str, OwnedFd)>, Vec<(PathBuf, OwnedFd, Kind)>, Option<(u32, OwnedFd)>);

/// `nodev`: binds refuse device nodes (a build step's inputs: real root could write to a device
/// node in one, since the seal does not reach mounts of the initial user namespace).
fn clone_sources(ops: &[Op], nodev: bool) -> Result<Vec<Source>> {
    ops.iter()
        .map(|op| {
            Ok(match op {
                Op::Bind { src, dst, ro, recursive, .. } => {
                    let tree = mount::clone_tree(src, *recursive).with_context(|| format!("cannot bind {} at {}", src.display(), dst.display()))?;
                    if *ro {
                        mount::set_readonly(tree.as_fd(), src)?;
                    }
                    if nodev {
                        mount::set_nodev(tree.as_fd(), src)?;
                    }
                    Source::Tree(tree)
                }
                Op::Dev { gpu, pty } => {
                    let mut nodes = Vec::new();
                    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
                        let host = Path::new("/dev").join(node);
                        let tree = mount::clone_tree(&host, false).context("cannot set up /dev")?;
                        // Read-only binds: the devices still read and write, but their inodes are
                        // the host's, and real root inside must not chmod or chown them.
                        mount::set_readonly(tree.as_fd(), &host)?;
                        nodes.push((node, tree));
                    }
                    let mut gpus = Vec::new();
                    for g in gpu {
                        let kind = if g.is_dir() { Kind::Dir } else { Kind::File };
                        gpus.push((g.clone(), mount::clone_tree(g, true).context("cannot set up /dev")?, kind));
                    }
                    // The caller's terminal as this process sees it: the host's, or the one a
                    // launcher's environment bound at that name.
                    let pty = match pty {
                        Some(n) => {
                            let host = PathBuf::from(format!("/dev/pts/{n}"));
                            let tree = mount::clone_tree(&host, false).context("cannot set up /dev")?;
                            mount::set_readonly(tree.as_fd(), &host)?;
                            Some((*n, tree))
                        }
                        None => None,
                    };
                    Source::Dev((nodes, gpus, pty))
                }
                Op::Proc => Source::None,
            })
        })
        .collect()
}

fn open_dir(p: &Path) -> Result<OwnedFd> {
    rustix::fs::open(p, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).with_context(|| format!("cannot open {}", p.display()))
}

/// Gives the root of a mount (its fd, an `O_PATH` one) to root inside, where root is mapped.
fn root_owned(m: std::os::fd::BorrowedFd<'_>) {
    let _ = rustix::fs::chownat(m, "", Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::ROOT), rustix::fs::AtFlags::EMPTY_PATH);
}

fn dev(root: &OwnedFd, (nodes, gpus, pty): DevNodes) -> Result<()> {
    let target = mount::resolve_in(root.as_fd(), Path::new("/dev"), Kind::Dir, true)?;
    let t = mount::pseudo("tmpfs", &[("mode", "0755")], MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NOEXEC)?;
    mount::attach(t.as_fd(), target.as_fd(), Path::new("/dev"))?;
    let d = t.as_fd();
    // Root's, as on any system (a tmpfs is its mounter's): you may not add to /dev as yourself.
    // Best effort: where root inside is not mapped (a launch inside an environment), it stays.
    root_owned(d);
    for (node, tree) in nodes {
        // Device nodes cannot be made in a user namespace: bind the host's over empty files.
        drop(rustix::fs::openat(d, node, OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC, Mode::from_raw_mode(0o666)).with_context(|| format!("cannot create /dev/{node}"))?);
        let tgt = rustix::fs::openat(d, node, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()).with_context(|| format!("cannot open /dev/{node}"))?;
        mount::attach(tree.as_fd(), tgt.as_fd(), &Path::new("/dev").join(node))?;
    }
    for (name, target) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"), ("core", "/proc/kcore")] {
        rustix::fs::symlinkat(target, d, name).with_context(|| format!("cannot create /dev/{name}"))?;
    }
    for (dir, fstype, opts) in [("pts", "devpts", &[("ptmxmode", "0666"), ("mode", "0620")][..]), ("shm", "tmpfs", &[("mode", "1777")][..])] {
        rustix::fs::mkdirat(d, dir, Mode::from_raw_mode(0o755)).with_context(|| format!("cannot create /dev/{dir}"))?;
        let m = mount::pseudo(fstype, opts, MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NOEXEC)?;
        let tgt = rustix::fs::openat(d, dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()).with_context(|| format!("cannot open /dev/{dir}"))?;
        mount::attach(m.as_fd(), tgt.as_fd(), Path::new(dir))?;
        if dir == "shm" {
            root_owned(m.as_fd());
        }
        if let (Some((n, tree)), "pts") = (&pty, dir) {
            // Not fatal: the terminal works without its name.
            if let Err(e) = terminal_name(m.as_fd(), *n, tree.as_fd()) {
                crate::diag::debug!("the terminal keeps no name inside: {e:#}");
            }
        }
    }
    for (g, tree, kind) in gpus {
        let target = mount::resolve_in(root.as_fd(), &g, kind, true)?;
        mount::attach(tree.as_fd(), target.as_fd(), &g)?;
    }
    Ok(())
}

/// Puts the caller's terminal at its name /dev/pts/N in the run's private devpts `pts`, so that
/// `tty`, ttyname(3) and sudo find it (they stat the name /proc gives for the fd, or scan
/// /dev/pts), while ptys opened inside still come from the private instance.
///
/// devpts holds only the ptys its ptmx made, and no file can be created in it: the name N exists
/// only while the private pty N's master is open. So this opens masters until it gets index N
/// (a fresh instance counts from 0), binds the terminal over that slave's name, closes the
/// others, and leaves master N open across exec, at a high descriptor that scripts do not use:
/// closing it (as a daemon that closes every fd does) takes the name away, not the terminal.
fn terminal_name(pts: std::os::fd::BorrowedFd<'_>, n: u32, tree: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    const HELD_AT: i32 = 300;
    let mut masters = Vec::new();
    let master = loop {
        let m = rustix::fs::openat(pts, "ptmx", OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC, Mode::empty()).context("cannot open /dev/pts/ptmx")?;
        let name = rustix::pty::ptsname(&m, Vec::new()).context("cannot name a pty")?;
        let index: u32 = name.to_string_lossy().rsplit('/').next().and_then(|i| i.parse().ok()).context("a pty without a number")?;
        if index == n {
            break m;
        }
        if index > n || masters.len() > 4096 {
            bail!("the private devpts gave pty {index}, past {n}");
        }
        masters.push(m);
    };
    drop(masters);
    let at = Path::new("/dev/pts").join(n.to_string());
    let target = rustix::fs::openat(pts, n.to_string(), OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()).with_context(|| format!("cannot open {}", at.display()))?;
    mount::attach(tree, target.as_fd(), &at)?;
    let held = rustix::io::fcntl_dupfd_cloexec(&master, HELD_AT).or_else(|_| rustix::io::fcntl_dupfd_cloexec(&master, 3)).context("cannot keep the pty")?;
    rustix::io::fcntl_setfd(&held, rustix::io::FdFlags::empty()).context("cannot keep the pty")?;
    // Deliberately leaked: the program inherits it (see above).
    std::mem::forget(held);
    Ok(())
}

fn proc_fresh(root: &OwnedFd) -> Result<()> {
    let target = mount::resolve_in(root.as_fd(), Path::new("/proc"), Kind::Dir, true)?;
    let m = mount::pseudo("proc", &[], MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOEXEC)?;
    mount::attach(m.as_fd(), target.as_fd(), Path::new("/proc"))?;
    Ok(())
}

/// The parts of a fresh /proc through which root's uid reaches the host's kernel whatever its
/// capabilities (the kernel checks only file permissions there): the sysctls and the SysRq
/// trigger. Bound read-only over themselves before a build step is sealed, which locks them.
const PROC_READ_ONLY: &[&str] = &["/proc/sys", "/proc/sysrq-trigger"];

/// Makes [`PROC_READ_ONLY`] read-only, after the pivot (where /proc is the run's own).
pub(crate) fn proc_read_only() -> Result<()> {
    for p in PROC_READ_ONLY.iter().map(Path::new).filter(|p| p.exists()) {
        let m = mount::clone_tree(p, true)?;
        mount::set_readonly(m.as_fd(), p)?;
        mount::attach_at(m.as_fd(), p).with_context(|| format!("cannot make {} read-only", p.display()))?;
    }
    Ok(())
}

/// Makes the built root this process's (and its mount namespace's) root.
pub(crate) fn pivot(root: &OwnedFd) -> Result<()> {
    Ok(mount::pivot_into(root.as_fd(), Path::new("/"))?)
}
