//! Namespaces and id maps for a launch.
//!
//! A launch is in three steps, each in the namespaces the previous one made:
//! 1. the environment's *base* user namespace with a mount namespace of its own — made fresh
//!    (`unshare`, maps written by newuidmap/newgidmap or by ourselves), or joined (`setns` into the
//!    base of a live run of the environment, then a mount namespace of our own);
//! 2. (the shared overlay is mounted or cloned here, in the base: see `mounts`);
//! 3. with ranges, the run's identity: a user namespace nested in the base, whose maps a helper
//!    still in the base writes, plus a mount namespace of its own.
//!
//! Everything here must run while plyroot is single-threaded: `unshare(CLONE_NEWUSER)` and
//! `setns` into a user namespace refuse a threaded process.

use std::cell::Cell;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};
use rustix::thread::LinkNameSpaceType;

use super::identity::{Inside, Mapping, Nested};
use super::Join;
use crate::sys::ns::{self, IdRange};
use crate::sys::process;
// The id-mapping helper and `unshare` live below the store, which uses them to remove what runs
// wrote; `enter_one_level` is re-exported for `in_image_view`.
pub(crate) use crate::userns::enter_one_level;
use crate::userns::{flags, unshare, Mapper};

/// The live run a launch was to join ended before it could (nothing has changed yet: decide
/// again).
#[derive(Debug, thiserror::Error)]
#[error("the live run (pid {0}) of this environment ended while this one started; try again")]
pub(crate) struct JoinGone(pub i32);

/// What step 1 found or made.
pub(crate) struct Base {
    /// The base user namespace's inode (0 when there is none: real root).
    pub user_ns: u64,
    /// Its id (0: none, or a kernel without namespace ids).
    pub user_ns_id: u64,
    /// The joined run's mount namespace, to clone the shared overlay from.
    pub joined: Option<OwnedFd>,
}

/// Makes the store read-only where it is (in the base's copy of the host's mounts), before any
/// share that holds it is copied into the run: every copy then carries the read-only mount, and
/// in the run's nested user namespace it is locked, so root inside cannot unmount it to reach the
/// writable store beneath, whichever share (home, /tmp, a bind of the store or of a directory in
/// it, a symlink to it) leads there.
fn protect(store: &std::path::Path) -> Result<()> {
    use std::os::fd::AsFd;
    let tree = crate::sys::mount::clone_tree(store, true).context("cannot make the store read-only inside")?;
    crate::sys::mount::set_readonly(tree.as_fd(), store)?;
    crate::sys::mount::attach_at(tree.as_fd(), store).context("cannot make the store read-only inside")?;
    Ok(())
}

/// Steps 1 and 3 together, with the shared overlay obtained in between by `between` (which runs
/// in the base, with the joined run's mount namespace when there is one). `pid` and `machine`
/// (UTS, IPC) namespaces are made at the innermost level, so they belong to the run's identity.
pub(crate) fn enter<T>(inside: &Inside, join: Option<&Join>, store: Option<&std::path::Path>, pid: bool, machine: bool, between: impl FnOnce(&Base) -> Result<T>) -> Result<(Base, T)> {
    let nested = inside.nested.clone();
    let innermost = nested.is_none();
    let helper_maps = match &nested {
        Some(Nested::Maps(u, g)) => Some((u.clone(), g.clone())),
        _ => None,
    };
    let mut mapper = None;
    let base = match join {
        Some(j) => {
            // Through an fd: once it is checked, the namespace is the run's whatever the pid does.
            let same = |m: &OwnedFd| if j.mnt_ns_id != 0 { ns::mnt_ns_id(m).ok() == Some(j.mnt_ns_id) } else { ns::ns_ino(m).ok() == Some(j.mnt_ns) };
            let mnt = ns::open_ns(j.pid, "mnt").ok().filter(same).ok_or(JoinGone(j.pid))?;
            if inside.mapping != Mapping::Host {
                // The run's mount namespace belongs to the base itself (a keeper's, or a run
                // without a nested identity), or to its identity's user namespace, nested in it.
                let owner = ns::owner_userns(&mnt)?;
                let base = if ns::ns_ino(&owner)? == j.user_ns { owner } else { ns::parent_userns(&owner)? };
                if ns::ns_ino(&base)? != j.user_ns {
                    bail!("the live run (pid {}) of this environment is not in its user namespace", j.pid);
                }
                let user_ns_id = ns::ns_id(&base).unwrap_or(0);
                ns::enter(&base, LinkNameSpaceType::User)?;
                unshare(flags(false, pid && innermost, machine && innermost))?;
                Base { user_ns: j.user_ns, user_ns_id, joined: Some(mnt) }
            } else {
                unshare(flags(false, pid && innermost, machine && innermost))?;
                Base { user_ns: 0, user_ns_id: 0, joined: Some(mnt) }
            }
        }
        None => {
            match &inside.mapping {
                Mapping::Host => unshare(flags(false, pid && innermost, machine && innermost))?,
                Mapping::Single { inside_uid, inside_gid, uid, gid } => {
                    unshare(flags(true, pid && innermost, machine && innermost))?;
                    ns::map_single(*inside_uid, *uid, *inside_gid, *gid)?;
                }
                Mapping::Ranges { uids, gids } => {
                    let mut m = Mapper::start(Some((uids.clone(), gids.clone())), helper_maps.clone())?;
                    unshare(flags(true, pid && innermost, machine && innermost))?;
                    m.step("mapping the subordinate ids from /etc/subuid and /etc/subgid with newuidmap/newgidmap")?;
                    mapper = Some(m);
                }
            }
            let (user_ns, user_ns_id) = if inside.mapping == Mapping::Host { (0, 0) } else { own_user_ns()? };
            Base { user_ns, user_ns_id, joined: None }
        }
    };
    crate::sys::mount::make_private_recursive()?;
    // The overlay over the upper first: its upper and workdir must be reached writable.
    let shared = between(&base)?;
    if let Some(store) = store.filter(|s| s.is_dir()) {
        protect(store)?;
    }
    identity(nested, (inside.uid, inside.gid), join, mapper, pid, machine)?;
    if inside.nested.is_some() {
        crate::sys::mount::make_private_recursive()?;
    }
    Ok((base, shared))
}

/// Step 3: the run's identity, nested in the base (with ranges: an identity namespace the joined
/// keeper holds, entered with no helper, or one made here, whose maps `mapper` writes; the run
/// then becomes `id`, uid and gid, in it), with the pid and machine namespaces when asked.
fn identity(nested: Option<Nested>, id: (u32, u32), join: Option<&Join>, mapper: Option<Mapper>, pid: bool, machine: bool) -> Result<()> {
    let kept = match (&nested, join) {
        (Some(Nested::Maps(u, g)), Some(j)) if mapper.is_none() => match j.nested.iter().find(|n| &n.uids == u && &n.gids == g) {
            Some(n) => enter_kept(j.pid, n.fd, j.user_ns)?,
            None => false,
        },
        _ => false,
    };
    match nested {
        Some(Nested::Maps(..)) if kept => {
            unshare(flags(false, pid, machine))?;
            ns::clear_groups()?;
            ns::become_id(id.0, id.1)?;
        }
        Some(Nested::Maps(uids, gids)) => {
            let mut m = match mapper {
                Some(m) => m,
                None => Mapper::start(None, Some((uids, gids)))?,
            };
            unshare(flags(true, pid, machine))?;
            m.step("mapping the run's own ids")?;
            m.finish()?;
            // Host supplementary groups are unmapped inside: drop them.
            ns::clear_groups()?;
            ns::become_id(id.0, id.1)?;
        }
        Some(Nested::Same) => {
            unshare(flags(true, pid, machine))?;
            ns::map_single(0, 0, 0, 0)?;
        }
        None => {}
    }
    Ok(())
}

/// Seals a built root for a build step: a user namespace nested in the current one, mapping every
/// id to itself, with mount, UTS and IPC namespaces of its own. The copy of the mounts a less
/// privileged namespace gets has their flags locked (the kernel's `MNT_LOCK_*`): root there can
/// neither remount an input's read-only bind writable nor unmount what covers it, and, as real
/// root, has no capability over the host's kernel settings (`/proc/sys`, devices, the hostname).
/// A helper still in the current namespace writes the maps (multi-range maps need its caps).
pub(crate) fn seal() -> Result<()> {
    let identity = |file: &str| -> Result<Vec<IdRange>> {
        let text = fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
        let mut out = Vec::new();
        for l in text.lines() {
            let f: Vec<u32> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if let [inside, _, count] = f[..] {
                out.push(IdRange { inside, outside: inside, count });
            }
        }
        Ok(out)
    };
    let (uids, gids) = (identity("/proc/self/uid_map")?, identity("/proc/self/gid_map")?);
    // A process that changed its ids (`--root`'s become_id) is not dumpable, and its /proc files
    // then belong to root of the outermost namespace: the helper could not open our maps.
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::Dumpable).context("cannot let the helper write the sealed namespace's maps")?;
    let mut m = Mapper::start(None, Some((uids, gids)))?;
    unshare(rustix::thread::UnshareFlags::NEWUSER | flags(false, false, true))?;
    m.step("sealing the build step's mounts in a user namespace of its own")?;
    m.finish()?;
    // Not dumpable again: the step is root in this namespace, and could otherwise ptrace us (its
    // PID 1) and stop the build forever. Our memory map belongs to the initial namespace, where
    // it has no capability.
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable).context("cannot keep the build step from tracing its PID 1")?;
    Ok(())
}

/// The inode and id of our user namespace.
fn own_user_ns() -> Result<(u64, u64)> {
    let fd = ns::open_ns(rustix::process::getpid().as_raw_nonzero().get(), "user")?;
    Ok((ns::ns_ino(&fd)?, ns::ns_id(&fd).unwrap_or(0)))
}

/// A user namespace nested in the current one (the base), with `uids` and `gids` mapped, held by
/// the fd returned: made by a short-lived child, whose maps this process writes (it has the
/// capabilities in the base that multi-range maps need).
pub(crate) fn nested_user_ns(uids: &[IdRange], gids: &[IdRange]) -> Result<OwnedFd> {
    let (made_rd, made_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe")?;
    let (end_rd, end_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe")?;
    let (made_rd, end_wr) = (Cell::new(Some(made_rd)), Cell::new(Some(end_wr)));
    let (theirs_made, theirs_end) = (&made_rd, &end_wr);
    let child = process::spawn(move || {
        drop((theirs_made.take(), theirs_end.take()));
        ns::unshare_flags(rustix::thread::UnshareFlags::NEWUSER)?;
        fs::File::from(made_wr).write_all(b"1")?;
        // Until the parent has what it needs (it closes its end).
        let _ = fs::File::from(end_rd).read(&mut [0u8; 1]);
        Ok(0)
    })?;
    let made = made_rd.take().map(|rd| fs::File::from(rd).read(&mut [0u8; 1]).unwrap_or(0) == 1).unwrap_or(false);
    let r = if made {
        ns::write_maps(child, uids, gids).and_then(|_| ns::open_ns(child, "user")).map_err(anyhow::Error::from)
    } else {
        Err(anyhow::anyhow!("the helper making a nested user namespace failed"))
    };
    drop(end_wr.take());
    process::waitpid(child)?;
    r
}

/// Enters an identity namespace a keeper holds (as its fd `fd`), nested in the base `base` (its
/// inode); false when it cannot be reached (the launch makes its own then).
fn enter_kept(keeper: i32, fd: i32, base: u64) -> Result<bool> {
    let Ok(user) = ns::open_fd_of(keeper, fd) else { return Ok(false) };
    let parent_ok = ns::parent_userns(&user).and_then(|p| ns::ns_ino(&p)).is_ok_and(|ino| ino == base);
    if !parent_ok || ns::enter(&user, LinkNameSpaceType::User).is_err() {
        return Ok(false);
    }
    Ok(true)
}

/// A mount namespace of our own (a copy of the current one), in the current user namespace.
pub(crate) fn unshare_mount_ns() -> Result<()> {
    unshare(flags(false, false, false))
}

/// The inode and the id of our current mount namespace (a run's, once it is made); the id is 0
/// where the kernel has none to give.
pub(crate) fn mnt_ns() -> Result<(u64, u64)> {
    let fd = ns::open_ns(rustix::process::getpid().as_raw_nonzero().get(), "mnt")?;
    Ok((ns::ns_ino(&fd)?, ns::mnt_ns_id(&fd).unwrap_or(0)))
}
