//! Owners on disk. With subordinate ids, the files of a layer are owned by the host ids that its
//! image's owners are inside an environment ([`userns::image_view`]: you are you, id k is the
//! k-th subordinate id, so root is the first): the kernel then shows them inside with the owners
//! the image gives them, enforces those owners (`/usr/bin` is not yours to write) and honours
//! setuid (`sudo` works).
//!
//! An unprivileged unpacker cannot write those owners itself: it writes every file as the user
//! and records the image's owners in the layer's metadata (`meta::Overrides`, where the layer's
//! id takes them from, so the id never depends on this). [`give_layer`] then hands each file to
//! its owner from inside the image view, in a forked child, before the layer is published.
//!
//! A store written before this had every file of an imported layer owned by the user, and a
//! commit's files owned as `--root` wrote them (the user's own id standing for root). [`migrate`]
//! brings such a store to the owners above once, under the store's exclusive lock, and marks it
//! done in the store's `owners` file. Uppers keep what runs wrote: what `--root` wrote before the
//! migration stays the user's. Real root and a user without subordinate ids have nothing to do:
//! their disk already holds the owners (real root) or can hold only one (the user, who is root
//! inside).

use std::ffi::OsStr;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result};
use rustix::fs::{AtFlags, FileType, Mode, Stat};
use rustix::io::Errno;

use super::meta::Overrides;
use super::tree::{join, kind, list, stat_at, Cursor, Lend};
use crate::userns::{self, HostUser, SubIds};

/// The owner an entry is to have, from its path relative to the tree's root and its lstat.
type Want<'a> = &'a dyn Fn(&[u8], &Stat) -> (u32, u32);
/// What [`walk`] calls for each entry: the directory it is in, its name, its path, its lstat.
type Visit<'a> = &'a mut dyn FnMut(BorrowedFd<'_>, &OsStr, &[u8], &Stat) -> Result<()>;
/// An ACL found on disk: the entry's path, the xattr's name, its value.
type DiskAcl = (Vec<u8>, Vec<u8>, Vec<u8>);

/// The file, in the store and in each layer's directory, that says its owners follow the rules
/// below, and for which ranges (or how far a migration got).
const MARKER: &str = "owners";

/// An unprivileged user in the host's user namespace, with or without subordinate ids: whose
/// store follows the rules above (real root's disk holds every owner as it is).
struct Regime {
    user: HostUser,
    subids: Option<SubIds>,
}

fn regime() -> Option<Regime> {
    if rustix::process::geteuid().is_root() || !userns::in_initial_userns() {
        return None;
    }
    let user = HostUser::current();
    let subids = userns::host_subids(&user);
    Some(Regime { user, subids })
}

impl Regime {
    /// What the store's marker, and each layer's, say once a layer follows these rules.
    fn done(&self) -> String {
        match &self.subids {
            Some(s) => format!("image view: uids {}+{}, gids {}+{}\n", s.uid.0, s.uid.1, s.gid.0, s.gid.1),
            None => "one id\n".to_owned(),
        }
    }
}

/// Marks a layer made by this version (its directory `dir`, before it is published) as following
/// the rules of this store, so that no migration ever touches it.
pub(crate) fn mark_new(dir: &Path) -> Result<()> {
    match regime() {
        Some(r) => super::write_atomic(&dir.join(MARKER), r.done().as_bytes()),
        None => Ok(()),
    }
}

/// Hands the files of the layer tree `root`, unpacked by the user with `ov` recording its owners,
/// to those owners (nothing to do for real root, without subordinate ids, or when the disk holds
/// the owners already). An owner the ranges cannot map stays the user's.
pub(crate) fn give_layer(root: &Path, ov: &Overrides) -> Result<()> {
    if !ov.flattened {
        return Ok(());
    }
    let Some(Regime { user, subids: Some(subids) }) = regime() else { return Ok(()) };
    let view = userns::image_view(&user, Some(subids));
    let unmapped = crate::sys::process::in_child(|| {
        userns::enter_one_level(&view)?;
        give(root, &|path, _| ov.owner(path, (0, 0)), Some(ov))
    })
    .with_context(|| format!("cannot give the files of {} their owners", root.display()))?;
    if unmapped > 0 {
        crate::diag::debug!("{unmapped} file(s) in {} have owners beyond your subordinate ids: they stay yours", root.display());
    }
    Ok(())
}

/// Gives the entries of a tree plyroot wrote itself (a skeleton) the owners `want` says, from each
/// entry's path relative to `root` (empty for `root`), in ids as they read inside; nothing to do
/// for real root or without subordinate ids.
pub(crate) fn give_tree(root: &Path, want: &(dyn Fn(&[u8]) -> (u32, u32) + Sync)) -> Result<()> {
    let Some(Regime { user, subids: Some(subids) }) = regime() else { return Ok(()) };
    let view = userns::image_view(&user, Some(subids));
    crate::sys::process::in_child(|| {
        userns::enter_one_level(&view)?;
        give(root, &|path, _| want(path), None)
    })
    .with_context(|| format!("cannot give the files of {} their owners", root.display()))?;
    Ok(())
}

/// Whether the store at `store` still has to be brought to these rules.
pub(crate) fn migration_due(store: &Path) -> bool {
    let Some(r) = regime() else { return false };
    std::fs::read_to_string(store.join(MARKER)).ok() != Some(r.done())
}

/// Brings every layer of the store at `store` that a plyroot before this wrote to the rules above,
/// then writes the store's marker. The caller holds the store exclusively.
///
/// Each layer goes through steps, each recorded in the layer's own marker once done, so that a
/// migration cut short resumes where it was and nothing is done twice (a commit's owners are
/// swapped, which done twice would undo itself): the ACLs on disk into the metadata, read as the
/// user on the host before any owner changes (`acls`); with subordinate ids, an import's files to
/// the owners its metadata records, or a commit's files written as the old `--root` (the user
/// standing for root: to root's id, step `a`; its own id then the user's, step `b`). Layers this
/// version made carry the final mark from the start ([`mark_new`]).
pub(crate) fn migrate(store: &Path) -> Result<()> {
    let Some(r) = regime() else { return Ok(()) };
    let mut todo = Vec::new();
    if let Ok(rd) = std::fs::read_dir(store.join("layers")) {
        for e in rd.flatten() {
            let dir = e.path();
            let state = std::fs::read_to_string(dir.join(MARKER)).unwrap_or_default();
            if state == r.done() || !dir.join("root").is_dir() {
                continue;
            }
            if state.starts_with("image view") {
                crate::diag::warn!("{} was given the owners of other subordinate ids ({}): your ranges in /etc/subuid and /etc/subgid changed; give the old ones back, or `plyroot unshare -- chown` its files yourself", dir.display(), state.trim());
                continue;
            }
            todo.push((dir, state));
        }
    }
    if !todo.is_empty() && r.subids.is_some() {
        crate::diag::info!("giving the {} layer(s) of the store the owners their images give them (once, after an upgrade of plyroot)", todo.len());
    } else if !todo.is_empty() {
        crate::diag::info!("keeping the ACLs of the {} layer(s) of the store in their metadata (once, after an upgrade of plyroot)", todo.len());
    }
    for (dir, state) in todo {
        migrate_layer(&r, &dir, state).with_context(|| format!("cannot bring {} to this version's owners", dir.display()))?;
    }
    super::write_atomic(&store.join(MARKER), r.done().as_bytes())
}

/// [`migrate`]'s steps for one layer directory, from `state` (its marker's steps done so far).
fn migrate_layer(r: &Regime, dir: &Path, mut state: String) -> Result<()> {
    let root = dir.join("root");
    let ov_path = dir.join("overrides.json");
    let mut ov: Overrides = match std::fs::read(&ov_path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("cannot read {}", ov_path.display()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Overrides::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", ov_path.display())),
    };
    let step = |state: &mut String, done: &str| -> Result<()> {
        state.push_str(done);
        state.push('\n');
        super::write_atomic(&dir.join(MARKER), state.as_bytes())
    };
    if ov.flattened && !state.lines().any(|l| l == "acls") {
        // ACLs set on disk by earlier versions: into the metadata, as the id read them.
        let mut changed = false;
        for (path, name, value) in disk_acls(&root)? {
            let entry = ov.entry(&super::meta::key(&path));
            changed |= entry.xattrs.insert(super::meta::key(&name).into_owned(), hex::encode(value)).is_none();
        }
        if changed {
            super::write_atomic(&ov_path, &serde_json::to_vec(&ov)?)?;
        }
        step(&mut state, "acls")?;
    }
    let Some(subids) = r.subids else {
        return super::write_atomic(&dir.join(MARKER), r.done().as_bytes());
    };
    let user = &r.user;
    if ov.flattened {
        let view = userns::image_view(user, Some(subids));
        let unmapped = crate::sys::process::in_child(|| {
            userns::enter_one_level(&view)?;
            give(&root, &|path, _| ov.owner(path, (0, 0)), Some(&ov))
        })?;
        if unmapped > 0 {
            crate::diag::debug!("{unmapped} file(s) in {} have owners beyond your subordinate ids: they stay yours", root.display());
        }
    } else {
        // In the namespace that maps every id: you are 0 there, subordinate id k is k + 1.
        let all = userns::all_ids(user, Some(subids));
        let (me_uid, me_gid) = (user.uid + 1, user.gid + 1);
        if !state.lines().any(|l| l == "a") {
            crate::sys::process::in_child(|| {
                userns::enter_one_level(&all)?;
                give(&root, &|_, st| (if st.st_uid == 0 { 1 } else { st.st_uid }, if st.st_gid == 0 { 1 } else { st.st_gid }), None)
            })?;
            step(&mut state, "a")?;
        }
        // What the old `--root` wrote as the user's own id (the subordinate id of that number).
        if user.uid < subids.uid.1 && user.gid < subids.gid.1 {
            crate::sys::process::in_child(|| {
                userns::enter_one_level(&all)?;
                give(&root, &|_, st| (if st.st_uid == me_uid { 0 } else { st.st_uid }, if st.st_gid == me_gid { 0 } else { st.st_gid }), None)
            })?;
        }
    }
    super::write_atomic(&dir.join(MARKER), r.done().as_bytes())
}

/// Gives every entry of the tree `root` (and `root` itself) the owner `want` says, from its path
/// relative to `root` and its lstat, keeping setuid and setgid bits (chown clears them), and the
/// ACLs `acls` records. Runs in the image view. Returns how many entries kept their owner because
/// the view cannot map `want`.
fn give(root: &Path, want: Want<'_>, acls: Option<&Overrides>) -> Result<u64> {
    let mut unmapped = 0;
    walk(root, &mut |at, name, path, st| {
        unmapped += settle(at, name, st, want(path, st)).context("cannot change its owner")?;
        if let Some(ov) = acls {
            set_acls(at, name, st, path, ov).context("cannot set its ACLs")?;
        }
        Ok(())
    })?;
    Ok(unmapped)
}

/// The ACLs on disk in the tree `root`, as (path, xattr name, value), read as the user on the host:
/// a layer unpacked before ACLs were kept in its metadata has them there only, with the image's
/// ids (the host's raw ones).
fn disk_acls(root: &Path) -> Result<Vec<DiskAcl>> {
    let mut found = Vec::new();
    let mut scratch = Vec::new();
    walk(root, &mut |at, name, path, st| {
        if kind(st) == FileType::Symlink {
            return Ok(());
        }
        let t = if path.is_empty() { crate::sys::xattr::Target::Path(root) } else { crate::sys::xattr::Target::At(at, name.as_bytes()) };
        crate::sys::xattr::read_all(t, &mut scratch).context("cannot read its xattrs")?;
        found.extend(scratch.drain(..).filter(|(k, _)| super::meta::names_ids(k)).map(|(k, v)| (path.to_vec(), k, v)));
        Ok(())
    })?;
    Ok(found)
}

/// Visits `root` (as `name` in the current directory, path empty) and every entry below it,
/// parents first, with the directory it is in, its name, its path relative to `root` and its
/// lstat; any depth (a [`Cursor`]), never following a symlink.
fn walk(root: &Path, visit: Visit<'_>) -> Result<()> {
    let top = rustix::fs::lstat(root).with_context(|| format!("cannot read {}", root.display()))?;
    visit(rustix::fs::CWD, root.as_os_str(), b"", &top).with_context(|| format!("{}", root.display()))?;
    let mut cur = Cursor::new(&[root], Lend::Read).with_context(|| format!("cannot read {}", root.display()))?;
    let mut rel: Vec<u8> = Vec::new();
    let here = |rel: &[u8]| format!("{}/{}", root.display(), super::tree::shown(rel));
    let mut levels = vec![list(cur.dir(0)?).with_context(|| format!("cannot read {}", root.display()))?];
    let mut lens: Vec<usize> = Vec::new();
    while let Some(level) = levels.last_mut() {
        let Some((name, _)) = level.pop() else {
            levels.pop();
            let Some(len) = lens.pop() else { break };
            cur.leave().with_context(|| format!("cannot read {}", here(&rel)))?;
            rel.truncate(len);
            continue;
        };
        let path = join(&rel, &name);
        let at = cur.dir(0).with_context(|| format!("cannot read {}", here(&rel)))?;
        let st = stat_at(at, &name).with_context(|| format!("cannot read {}", here(&path)))?;
        visit(at, OsStr::from_bytes(&name), &path, &st).with_context(|| here(&path))?;
        if kind(&st) == FileType::Directory {
            cur.enter(&name, &[(0, &st)]).with_context(|| format!("cannot read {}", here(&path)))?;
            lens.push(rel.len());
            rel = path;
            levels.push(list(cur.dir(0)?).with_context(|| format!("cannot read {}", here(&rel)))?);
        }
    }
    Ok(())
}

/// Makes `name` in `at` (lstat `st`) owned by `owner`: 0 when done or nothing to do, 1 when the
/// view cannot map `owner` (the entry keeps its owner).
fn settle(at: BorrowedFd<'_>, name: &OsStr, st: &Stat, owner: (u32, u32)) -> io::Result<u64> {
    if (st.st_uid, st.st_gid) == owner {
        return Ok(0);
    }
    match rustix::fs::chownat(at, name, Some(rustix::fs::Uid::from_raw(owner.0)), Some(rustix::fs::Gid::from_raw(owner.1)), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(()) => {}
        Err(Errno::INVAL) => return Ok(1),
        Err(e) => return Err(e.into()),
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o6000 != 0 && !matches!(kind(st), FileType::Directory | FileType::Symlink) {
        rustix::fs::chmodat(at, name, Mode::from_raw_mode(mode), AtFlags::empty())?;
    }
    Ok(0)
}

/// Sets the ACLs `ov` records for `path` (`name` in `at`, lstat `st`) from inside the image view,
/// where the kernel stores their ids as the host ids the image's ids are; the mode stays exact.
fn set_acls(at: BorrowedFd<'_>, name: &OsStr, st: &Stat, path: &[u8], ov: &Overrides) -> io::Result<()> {
    let Some(o) = ov.get(path) else { return Ok(()) };
    if kind(st) == FileType::Symlink {
        return Ok(());
    }
    let mut any = false;
    for (k, v) in &o.xattrs {
        let k = super::meta::unkey(k);
        if !super::meta::names_ids(&k) {
            continue;
        }
        let Ok(v) = hex::decode(v) else { continue };
        let fd = rustix::fs::openat(at, name, rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC, Mode::empty())?;
        let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        match rustix::fs::setxattr(proc.as_str(), OsStr::from_bytes(&k), &v, rustix::fs::XattrFlags::empty()) {
            Ok(()) => any = true,
            // Ids this view cannot map, or a filesystem without ACLs: the metadata still has it.
            Err(Errno::INVAL | Errno::NOTSUP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if any {
        rustix::fs::chmodat(at, name, Mode::from_raw_mode(st.st_mode & 0o7777), AtFlags::empty())?;
    }
    Ok(())
}
