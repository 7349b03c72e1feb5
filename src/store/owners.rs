//! Owners on disk. With subordinate ids, the files of a layer are owned by the host ids that its
//! image's owners are inside an environment ([`userns::image_view`]: you are you, id k is the
//! k-th subordinate id, so root is the first): the kernel then shows them inside with the owners
//! the image gives them, enforces those owners (`/usr/bin` is not yours to write) and honours
//! setuid (`sudo` works).
//!
//! An unprivileged unpacker cannot write those owners itself: it writes every file as the user
//! and records the image's owners in the layer's metadata (`meta::Overrides`, where the layer's
//! id takes them from, so the id never depends on this). [`give_layer`] then hands each file to
//! its owner, in a forked child, before the layer is published. Every chown here is done from
//! the namespace that maps every id the user has ([`userns::all_ids`]), image ids translated by
//! [`all_ids_of`]; the image view itself is for reading.
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
    give_image(root, ov, &user, subids).with_context(|| format!("cannot give the files of {} their owners", root.display()))
}

/// Where an image's id is in the namespace that maps every id ([`userns::all_ids`]: you are 0,
/// subordinate id k is k + 1): the image view's host id for it, or, for an id the ranges cannot
/// map, the one host id that view leaves out (the subordinate id of your own number), which reads
/// as nobody inside, where setuid of it is ignored and nobody may write what it owns. None: no
/// such id (your uid is past your range).
fn all_ids_of(k: u32, me: u32, count: u32) -> Option<u32> {
    if k == me {
        Some(0)
    } else if k < count {
        Some(k + 1)
    } else {
        (me < count).then_some(me + 1)
    }
}

/// [`give_layer`] for a user with `subids`: from inside the namespace that maps every id, so that
/// owners the image view cannot map still get a host id of their own ([`all_ids_of`]).
fn give_image(root: &Path, ov: &Overrides, user: &HostUser, subids: SubIds) -> Result<()> {
    let all = userns::all_ids(user, Some(subids));
    let (uid_of, gid_of) = (|k: u32| all_ids_of(k, user.uid, subids.uid.1), |k: u32| all_ids_of(k, user.gid, subids.gid.1));
    let ids = Ids { uid: &uid_of, gid: &gid_of };
    let kept = crate::sys::process::in_child(|| {
        userns::enter_one_level(&all)?;
        let kept = std::cell::Cell::new(0u64);
        let want = |path: &[u8], st: &Stat| {
            let (u, g) = ov.owner(path, (0, 0));
            let (u, g) = (uid_of(u), gid_of(g));
            kept.set(kept.get() + u64::from(u.is_none() || g.is_none()));
            (u.unwrap_or(st.st_uid), g.unwrap_or(st.st_gid))
        };
        give(root, &want, Some((ov, &ids)))?;
        Ok(kept.get())
    })?;
    if kept > 0 {
        crate::diag::debug!("{kept} file(s) in {} have owners no host id of yours can hold: they stay yours", root.display());
    }
    Ok(())
}

/// How image ids become ids of the namespace a give runs in (for the ids inside ACLs).
struct Ids<'a> {
    uid: &'a dyn Fn(u32) -> Option<u32>,
    gid: &'a dyn Fn(u32) -> Option<u32>,
}

/// Gives the entries of a tree plyroot wrote itself (a skeleton) the owners `want` says, from each
/// entry's path relative to `root` (empty for `root`), in ids as they read inside; nothing to do
/// for real root or without subordinate ids.
pub(crate) fn give_tree(root: &Path, want: &(dyn Fn(&[u8]) -> (u32, u32) + Sync)) -> Result<()> {
    let Some(Regime { user, subids: Some(subids) }) = regime() else { return Ok(()) };
    let all = userns::all_ids(&user, Some(subids));
    crate::sys::process::in_child(|| {
        userns::enter_one_level(&all)?;
        give(
            root,
            &|path, st| {
                let (u, g) = want(path);
                (all_ids_of(u, user.uid, subids.uid.1).unwrap_or(st.st_uid), all_ids_of(g, user.gid, subids.gid.1).unwrap_or(st.st_gid))
            },
            None,
        )
    })
    .with_context(|| format!("cannot give the files of {} their owners", root.display()))
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
        give_image(&root, &ov, user, subids)?;
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
/// ACLs `acls` records. Runs in the namespace that maps every id (`want` gives its ids).
fn give(root: &Path, want: Want<'_>, acls: Option<(&Overrides, &Ids<'_>)>) -> Result<()> {
    walk(root, &mut |at, name, path, st| {
        settle(at, name, st, want(path, st)).context("cannot change its owner")?;
        if let Some((ov, ids)) = acls {
            set_acls(at, name, st, path, ov, ids).context("cannot set its ACLs")?;
        }
        Ok(())
    })?;
    Ok(())
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

/// Makes `name` in `at` (lstat `st`) owned by `owner` (ids of the namespace that maps every id,
/// so every owner asked for is mapped there).
fn settle(at: BorrowedFd<'_>, name: &OsStr, st: &Stat, owner: (u32, u32)) -> io::Result<()> {
    if (st.st_uid, st.st_gid) == owner {
        return Ok(());
    }
    rustix::fs::chownat(at, name, Some(rustix::fs::Uid::from_raw(owner.0)), Some(rustix::fs::Gid::from_raw(owner.1)), AtFlags::SYMLINK_NOFOLLOW)?;
    let mode = st.st_mode & 0o7777;
    if mode & 0o6000 != 0 && !matches!(kind(st), FileType::Directory | FileType::Symlink) {
        rustix::fs::chmodat(at, name, Mode::from_raw_mode(mode), AtFlags::empty())?;
    }
    Ok(())
}

/// Sets the ACLs `ov` records for `path` (`name` in `at`, lstat `st`), their ids translated by
/// `ids` so that the kernel stores the host ids the image's ids are; the mode stays exact.
fn set_acls(at: BorrowedFd<'_>, name: &OsStr, st: &Stat, path: &[u8], ov: &Overrides, ids: &Ids<'_>) -> io::Result<()> {
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
        let Some(v) = acl_in(&v, ids) else { continue };
        let fd = rustix::fs::openat(at, name, rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC, Mode::empty())?;
        let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        match rustix::fs::setxattr(proc.as_str(), OsStr::from_bytes(&k), &v, rustix::fs::XattrFlags::empty()) {
            Ok(()) => any = true,
            // A filesystem without ACLs, or one the kernel refuses: the metadata still has it.
            Err(Errno::INVAL | Errno::NOTSUP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if any {
        rustix::fs::chmodat(at, name, Mode::from_raw_mode(st.st_mode & 0o7777), AtFlags::empty())?;
    }
    Ok(())
}

/// A POSIX ACL xattr value (version 2: a 4-byte header, then entries of tag u16, perm u16, id u32,
/// little-endian) with the ids of its named-user (tag 2) and named-group (tag 8) entries in the
/// namespace the give runs in; None when it is not such a value or an id has no place there.
fn acl_in(v: &[u8], ids: &Ids<'_>) -> Option<Vec<u8>> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) || v[..4] != 2u32.to_le_bytes() {
        return None;
    }
    let mut out = v.to_vec();
    for e in out[4..].chunks_exact_mut(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let of: &dyn Fn(u32) -> Option<u32> = match tag {
            2 => ids.uid,
            8 => ids.gid,
            _ => continue,
        };
        let id = of(u32::from_le_bytes([e[4], e[5], e[6], e[7]]))?;
        e[4..].copy_from_slice(&id.to_le_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_in_the_namespace_of_every_id() {
        // you are 1000, 65536 subordinate ids: you → 0, k → k + 1, past the range → your hole.
        assert_eq!([0, 42, 1000, 1001, 65535, 65536, 70000].map(|k| all_ids_of(k, 1000, 65536)), [Some(1), Some(43), Some(0), Some(1002), Some(65536), Some(1001), Some(1001)]);
        assert_eq!(all_ids_of(70000, 70000, 65536), Some(0));
        assert_eq!(all_ids_of(80000, 70000, 65536), None, "no hole: your uid is past your range");
    }

    #[test]
    fn acl_ids_are_moved_and_the_rest_kept() {
        let entry = |tag: u16, perm: u16, id: u32| [tag.to_le_bytes().as_slice(), &perm.to_le_bytes(), &id.to_le_bytes()].concat();
        let acl = |es: &[Vec<u8>]| [2u32.to_le_bytes().to_vec(), es.concat()].concat();
        let v = acl(&[entry(1, 7, u32::MAX), entry(2, 5, 42), entry(4, 5, u32::MAX), entry(8, 4, 70000), entry(0x10, 7, u32::MAX), entry(0x20, 0, u32::MAX)]);
        let (u, g) = (|k: u32| all_ids_of(k, 1000, 65536), |k: u32| all_ids_of(k, 1000, 65536));
        let ids = Ids { uid: &u, gid: &g };
        let want = acl(&[entry(1, 7, u32::MAX), entry(2, 5, 43), entry(4, 5, u32::MAX), entry(8, 4, 1001), entry(0x10, 7, u32::MAX), entry(0x20, 0, u32::MAX)]);
        assert_eq!(acl_in(&v, &ids), Some(want));
        assert_eq!(acl_in(&v[..7], &ids), None, "not an ACL");
    }
}
