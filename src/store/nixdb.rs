//! A Nix store's database in an upper, for `rebase`. When both the upper and the new layers changed
//! `/nix/var/nix/db/db.sqlite`, neither side's file is right: each registers store paths the
//! other lacks. Rebase merges the two sides' registrations instead (what `nix-store --dump-db`
//! writes: path, hash, size, deriver, references) into a new database that the environment's own
//! `nix-store --load-db` writes; this module decides when, stages the two sides' files, merges the
//! registrations (a pure function), and puts the merged database into the upper.
//!
//! ```text
//! <tmp>/plyroot-nixdb-<pid>-<n>/  the merge's work, outside the store (bound into the runs of
//! │                                nix-store, where the store is read-only); removed after
//! ├── ours/db/                     a copy of the database the upper's runs saw (upper over the old layers)
//! ├── theirs/db/                   a copy of the new layers' database
//! ├── merged/                      the root of the store the merge loads (`local?root=`):
//! │   ├── nix/store/*.drv          copies of the merged derivations (registering one reads it)
//! │   └── nix/var/nix/db/          what `nix-store --load-db` wrote
//! envs/<name>/nixdb/               the merged db.sqlite and schema, copied durably from the work
//!                                  beside the upper, renamed into it by the rebase's journaled step
//! ```
//!
//! The merge writes nothing in the environment but `nixdb/` until the rebase's journal names it;
//! an interruption before that leaves the upper as it was, and the next rebase removes the
//! staging. From the journal on, the change is finished (`place` is idempotent: it renames each
//! staged file once).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::upper::{is_whiteout, lookup};

/// The directory of a Nix store's database, relative to the root.
pub(crate) const DB_DIR: &str = "nix/var/nix/db";

/// The files of the database and its SQLite and Nix companions: a rebase that merges the database
/// decides them all (the locks and the reserved space hold nothing of either side's).
const DB_FILES: &[&str] = &["db.sqlite", "db.sqlite-wal", "db.sqlite-shm", "db.sqlite-journal", "big-lock", "reserved", "schema"];

/// SQLite's files beside the database that belong to one database file only: never kept next to
/// another side's database (a write-ahead log replayed onto the wrong file corrupts it).
const SIDE_FILES: &[&str] = &["db.sqlite-wal", "db.sqlite-shm", "db.sqlite-journal"];

/// What the side copies hold: the database with its write-ahead log (committed transactions
/// not yet in the file) and the schema version.
const COPIED: &[&str] = &["db.sqlite", "db.sqlite-wal", "schema"];

/// Whether `path` (relative, bytes) is one of the database's files.
pub(crate) fn is_db_file(path: &[u8]) -> bool {
    path.strip_prefix(DB_DIR.as_bytes()).and_then(|r| r.strip_prefix(b"/")).is_some_and(|n| DB_FILES.iter().any(|f| f.as_bytes() == n))
}

fn rel(name: &str) -> String {
    format!("{DB_DIR}/{name}")
}

/// Whether a rebase of `upper` from the `old` lowers onto the `new` ones must merge the database:
/// the upper holds its own (a file, not a deletion), and the layers' database differs between
/// the two stacks.
pub(crate) fn needs_merge(upper: &Path, old: &[PathBuf], new: &[PathBuf]) -> io::Result<bool> {
    let ours = ["db.sqlite", "db.sqlite-wal"].iter().any(|n| fs::symlink_metadata(upper.join(rel(n))).is_ok_and(|m| m.is_file()));
    if !ours {
        return Ok(false);
    }
    for n in ["db.sqlite", "db.sqlite-wal"] {
        match (lookup(old, rel(n)), lookup(new, rel(n))) {
            (None, None) => {}
            (Some(a), Some(b)) if a.0 == b.0 => {}
            (Some(a), Some(b)) if super::upper::same_content(&a, &b)? => {}
            _ => return Ok(true),
        }
    }
    Ok(false)
}

/// Copies each side's database into the merge's `work` (`ours/db`, `theirs/db`): ours as the
/// upper's runs saw it (the upper over the old lowers), theirs as the new lowers hold it.
pub(crate) fn stage(work: &Path, upper: &Path, old: &[PathBuf], new: &[PathBuf]) -> Result<()> {
    let mut ours_stack = vec![upper.to_owned()];
    ours_stack.extend(old.iter().cloned());
    for (side, stack) in [("ours", &ours_stack[..]), ("theirs", new)] {
        let dir = work.join(side).join("db");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for n in COPIED {
            if let Some((p, m)) = lookup(stack, rel(n)) {
                if m.is_file() {
                    fs::copy(&p, dir.join(n)).with_context(|| format!("cannot copy {} to {}", p.display(), dir.display()))?;
                }
            }
        }
    }
    Ok(())
}

/// One valid store path as `nix-store --dump-db` writes it and `--load-db` reads it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Registration {
    pub path: String,
    /// The NAR hash, base16 (as the dump has it).
    pub hash: String,
    pub nar_size: u64,
    /// Empty when none.
    pub deriver: String,
    pub refs: Vec<String>,
}

/// Parses a `nix-store --dump-db` text: per path, lines path, hash, size, deriver, the number of
/// references, then the references.
pub(crate) fn parse_dump(text: &str) -> Result<Vec<Registration>> {
    let mut lines = text.lines();
    let mut out = Vec::new();
    let mut n = 0;
    while let Some(path) = lines.next() {
        n += 1;
        let mut next = |what: &str| lines.next().with_context(|| format!("the database dump ends inside entry {n} ({path}): no {what}"));
        let hash = next("hash")?.to_owned();
        let nar_size = next("size")?.parse().with_context(|| format!("entry {n} ({path}): the size is not a number"))?;
        let deriver = next("deriver")?.to_owned();
        let count: usize = next("reference count")?.parse().with_context(|| format!("entry {n} ({path}): the reference count is not a number"))?;
        let mut refs = Vec::with_capacity(count.min(4096));
        for _ in 0..count {
            refs.push(next("reference")?.to_owned());
        }
        if !path.starts_with('/') || hash.is_empty() {
            bail!("entry {n} of the database dump is not a store path registration: {path:?}");
        }
        out.push(Registration { path: path.to_owned(), hash, nar_size, deriver, refs });
    }
    Ok(out)
}

/// The `--load-db` text of `regs`.
pub(crate) fn format_dump(regs: &[Registration]) -> String {
    let mut s = String::new();
    for r in regs {
        s.push_str(&format!("{}\n{}\n{}\n{}\n{}\n", r.path, r.hash, r.nar_size, r.deriver, r.refs.len()));
        for x in &r.refs {
            s.push_str(x);
            s.push('\n');
        }
    }
    s
}

/// Where a store path's files are in the rebased view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shows {
    /// Nowhere (never there, deleted, or a whiteout hides it).
    Nowhere,
    /// The upper's copy.
    Upper,
    /// The new layers' copy.
    Lowers,
}

/// The merge of two sides' registrations.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Merged {
    /// Sorted by path, each path once.
    pub valid: Vec<Registration>,
    /// Paths registered on a side but left out: their files are not in the rebased view, or
    /// a path they reference is not valid (Nix keeps every reference of a valid path valid).
    pub dropped: Vec<String>,
}

/// Merges the registrations of both sides: every path valid on either side whose files the
/// rebased view shows (`shows`) stays valid; a path on both sides is kept once, as registered by
/// the side whose files show. Then paths are dropped until every reference of a valid path is
/// valid. Pure.
pub(crate) fn merge(ours: Vec<Registration>, theirs: Vec<Registration>, shows: impl Fn(&str) -> Shows) -> Merged {
    let mut by_path: BTreeMap<String, Registration> = BTreeMap::new();
    let mut dropped: BTreeSet<String> = BTreeSet::new();
    // Theirs first: ours replaces a registration of both sides only where the upper's copy shows.
    for (is_ours, r) in theirs.into_iter().map(|r| (false, r)).chain(ours.into_iter().map(|r| (true, r))) {
        match shows(&r.path) {
            Shows::Nowhere => {
                dropped.insert(r.path);
            }
            Shows::Upper if is_ours => {
                by_path.insert(r.path.clone(), r);
            }
            Shows::Upper | Shows::Lowers => {
                by_path.entry(r.path.clone()).or_insert(r);
            }
        }
    }
    loop {
        let gone: Vec<String> = by_path.values().filter(|r| r.refs.iter().any(|x| !by_path.contains_key(x))).map(|r| r.path.clone()).collect();
        if gone.is_empty() {
            break;
        }
        for p in gone {
            by_path.remove(&p);
            dropped.insert(p);
        }
    }
    dropped.retain(|p| !by_path.contains_key(p));
    Merged { valid: by_path.into_values().collect(), dropped: dropped.into_iter().collect() }
}

/// [`Shows`] for the store path `path` (absolute) in the view of `upper` over `new`.
pub(crate) fn shows(upper: &Path, new: &[PathBuf], path: &str) -> Shows {
    let mut stack = vec![upper.to_owned()];
    stack.extend(new.iter().cloned());
    match lookup(&stack, path.trim_start_matches('/')) {
        None => Shows::Nowhere,
        Some((p, _)) if p.starts_with(upper) => Shows::Upper,
        Some(_) => Shows::Lowers,
    }
}

/// Copies the derivations `drvs` (store paths) from the view of `upper` over `new` into the
/// store directory of the store rooted at `root`.
pub(crate) fn copy_derivations(root: &Path, upper: &Path, new: &[PathBuf], drvs: &[String]) -> Result<()> {
    let dir = root.join("nix/store");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut stack = vec![upper.to_owned()];
    stack.extend(new.iter().cloned());
    for d in drvs {
        let Some(name) = d.strip_prefix("/nix/store/").filter(|n| !n.contains('/')) else { continue };
        if let Some((p, m)) = lookup(&stack, d.trim_start_matches('/')) {
            if m.is_file() {
                fs::copy(&p, dir.join(name)).with_context(|| format!("cannot copy {} to {}", p.display(), dir.display()))?;
            }
        }
    }
    Ok(())
}

/// Copies the merged database from the merge's `work` (`merged/nix/var/nix/db`) to `staging` beside the
/// upper, durably: the files the journaled step renames into the upper.
pub(crate) fn keep(work: &Path, staging: &Path) -> Result<()> {
    super::private_dir(staging).with_context(|| format!("cannot create {}", staging.display()))?;
    for n in ["schema", "db.sqlite"] {
        let from = work.join("merged").join(DB_DIR).join(n);
        if !from.exists() {
            continue;
        }
        let to = staging.join(n);
        fs::copy(&from, &to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        fs::File::open(&to).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", to.display()))?;
    }
    super::sync_dir(staging)
}

/// Puts the merged database staged in `staging` into `upper`, over the lowers `new`: with the
/// owner and mode the upper's database had, the upper's write-ahead log and shared memory go
/// first (they belong to the upper's old file), then the schema and the database are renamed
/// into place, then whiteouts hide any such files of the lowers. Idempotent: a staged file
/// already renamed is not staged any more. Call where the upper's files can be changed (as
/// their owner).
pub(crate) fn place(staging: &Path, upper: &Path, new: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let db = upper.join(DB_DIR);
    let staged = staging.join("db.sqlite");
    if staged.exists() {
        let like = fs::metadata(db.join("db.sqlite")).ok().or_else(|| lookup(new, rel("db.sqlite")).map(|l| l.1));
        if let Some(m) = like {
            for n in ["schema", "db.sqlite"] {
                let p = staging.join(n);
                if p.exists() {
                    std::os::unix::fs::lchown(&p, Some(m.uid()), Some(m.gid())).with_context(|| format!("cannot give {} the owner of the upper's database", p.display()))?;
                    fs::set_permissions(&p, fs::Permissions::from_mode(m.mode() & 0o7777)).with_context(|| format!("cannot set the mode of {}", p.display()))?;
                }
            }
        }
        for n in SIDE_FILES {
            let p = db.join(n);
            match fs::symlink_metadata(&p) {
                Ok(m) if !is_whiteout(&m) => fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?,
                _ => {}
            }
        }
        for n in ["schema", "db.sqlite"] {
            let from = staging.join(n);
            if from.exists() {
                fs::rename(&from, db.join(n)).with_context(|| format!("cannot move the merged {} to {}", from.display(), db.display()))?;
            }
        }
    }
    for n in SIDE_FILES {
        let p = db.join(n);
        if lookup(new, rel(n)).is_some() && fs::symlink_metadata(&p).is_err() {
            // A whiteout (char 0:0): the lowers' file must not meet the merged database.
            rustix::fs::mknodat(rustix::fs::CWD, &p, rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::empty(), rustix::fs::makedev(0, 0))
                .with_context(|| format!("cannot hide the layers' {} under {}", n, db.display()))?;
        }
    }
    super::sync_dir(&db)
}

/// Where Nix keeps profiles: `NAME` (the current generation: a symlink to `NAME-N-link`) and
/// its generations `NAME-N-link` (each a symlink to a store path).
pub(crate) const PROFILES: &str = "nix/var/nix/profiles";

/// How a rebase settles conflicts between profiles' links. Generations are kept from both
/// sides: where both made generation N of one profile, the layers' keeps the name and the
/// upper's moves to the next number free on both sides. A profile's current-generation link
/// takes the newer side's (the later `nix-env` or `nix profile` switch, by the link's mtime in
/// whole seconds; a tie keeps the upper's), re-pointed when the generation it names moved.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Profiles {
    /// Conflicting paths (relative) that take the layers' version: the upper's is removed.
    pub theirs: Vec<Vec<u8>>,
    /// Conflicting paths that keep the upper's version.
    pub ours: Vec<Vec<u8>>,
    /// Symlinks (relative path, target) to write into the upper after the removals.
    pub links: Vec<(Vec<u8>, Vec<u8>)>,
}

/// `NAME-N-link` → (`NAME`, N).
fn generation_of(name: &[u8]) -> Option<(&[u8], u64)> {
    let stem = name.strip_suffix(b"-link")?;
    let dash = stem.iter().rposition(|&b| b == b'-')?;
    let n = std::str::from_utf8(&stem[dash + 1..]).ok()?.parse().ok()?;
    (dash > 0).then(|| (&stem[..dash], n))
}

fn split_dir(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&path[..0], path),
    }
}

/// Settles the `conflicts` (relative paths) that are profiles' symlinks on both sides, in the
/// view of `upper` over the `new` lowers (see [`Profiles`]); the others are not its business.
pub(crate) fn settle_profiles(upper: &Path, new: &[PathBuf], conflicts: &[Vec<u8>]) -> io::Result<Profiles> {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mut out = Profiles::default();
    let link_at = |root: &Path, rel: &[u8]| -> Option<(Vec<u8>, fs::Metadata)> {
        let p = root.join(OsStr::from_bytes(rel));
        let m = fs::symlink_metadata(&p).ok().filter(|m| m.file_type().is_symlink())?;
        Some((fs::read_link(&p).ok()?.into_os_string().into_vec(), m))
    };
    let theirs_link = |rel: &[u8]| -> Option<(Vec<u8>, fs::Metadata)> {
        let (p, m) = lookup(new, rel)?;
        m.file_type().is_symlink().then_some(())?;
        Some((fs::read_link(&p).ok()?.into_os_string().into_vec(), m))
    };
    let ours_of = |c: &Vec<u8>| c.starts_with(PROFILES.as_bytes()).then(|| link_at(upper, c)).flatten();
    // Generations both sides made under one name: the upper's moves to a free number.
    let mut moved: BTreeMap<(Vec<u8>, Vec<u8>, u64), u64> = BTreeMap::new();
    let mut taken: BTreeMap<(Vec<u8>, Vec<u8>), u64> = BTreeMap::new();
    for c in conflicts {
        let (dir, name) = split_dir(c);
        let (Some((pname, n)), Some((target, _)), Some(_)) = (generation_of(name), ours_of(c), theirs_link(c)) else { continue };
        let key = (dir.to_vec(), pname.to_vec());
        let next = match taken.get(&key) {
            Some(k) => k + 1,
            None => highest_generation(upper, new, dir, pname) + 1,
        };
        taken.insert(key, next);
        moved.insert((dir.to_vec(), pname.to_vec(), n), next);
        let mut to = dir.to_vec();
        to.extend_from_slice(format!("/{}-{next}-link", String::from_utf8_lossy(pname)).as_bytes());
        out.links.push((to, target));
        out.theirs.push(c.clone());
    }
    // Current-generation links: the newer side's, following a generation that moved. Those the
    // conflicts name, and the upper's in directories where a generation moved: the same target
    // on both sides is no conflict, but names two generations once one moved.
    let repoint = |dir: &[u8], pname: &[u8], target: &[u8]| -> Option<Vec<u8>> {
        let (tname, n) = generation_of(target).filter(|(t, _)| *t == pname)?;
        let m = moved.get(&(dir.to_vec(), tname.to_vec(), n))?;
        Some(format!("{}-{m}-link", String::from_utf8_lossy(pname)).into_bytes())
    };
    let mut candidates: Vec<Vec<u8>> = conflicts.iter().filter(|c| c.starts_with(PROFILES.as_bytes())).cloned().collect();
    let dirs: BTreeSet<&Vec<u8>> = moved.keys().map(|k| &k.0).collect();
    for dir in dirs {
        let Ok(rd) = fs::read_dir(upper.join(OsStr::from_bytes(dir))) else { continue };
        for e in rd.flatten() {
            let mut rel = dir.clone();
            rel.push(b'/');
            rel.extend_from_slice(&e.file_name().into_vec());
            if !candidates.contains(&rel) {
                candidates.push(rel);
            }
        }
    }
    for c in &candidates {
        let (dir, name) = split_dir(c);
        if generation_of(name).is_some() {
            continue;
        }
        let is_pointer = |t: &[u8]| generation_of(t).is_some_and(|(p, _)| p == name);
        let Some((ours, om)) = ours_of(c).filter(|(t, _)| is_pointer(t)) else { continue };
        let moved_to = repoint(dir, name, &ours);
        let theirs = theirs_link(c).filter(|(t, _)| is_pointer(t));
        let conflict = conflicts.contains(c);
        match theirs {
            // In whole seconds, as layers keep them; a tie keeps the upper's, which the user sees now.
            Some((_, tm)) if conflict || moved_to.is_some() => {
                use std::os::unix::fs::MetadataExt;
                if om.mtime() >= tm.mtime() {
                    if let Some(t) = moved_to {
                        out.links.push((c.clone(), t));
                    }
                    out.ours.push(c.clone());
                } else {
                    out.theirs.push(c.clone());
                }
            }
            _ => {
                if let Some(t) = moved_to {
                    out.links.push((c.clone(), t));
                }
            }
        }
    }
    Ok(out)
}

/// The highest generation number of profile `pname` in `dir` (relative) on either side.
fn highest_generation(upper: &Path, new: &[PathBuf], dir: &[u8], pname: &[u8]) -> u64 {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mut high = 0;
    for root in std::iter::once(upper).chain(new.iter().map(|p| p.as_path())) {
        let Ok(rd) = fs::read_dir(root.join(OsStr::from_bytes(dir))) else { continue };
        for e in rd.flatten() {
            if let Some((p, n)) = generation_of(e.file_name().as_bytes()) {
                if p == pname {
                    high = high.max(n);
                }
            }
        }
    }
    high
}

/// Writes the symlinks of [`Profiles::links`] (relative to `upper`) in place of whatever is
/// there: to a temp name beside, then renamed over. Idempotent.
pub(crate) fn write_links(upper: &Path, links: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    for (rel, target) in links {
        let p = upper.join(OsStr::from_bytes(rel));
        let (dir, name) = split_dir(rel);
        let tmp = upper.join(OsStr::from_bytes(dir)).join(format!(".{}.plyroot-link", String::from_utf8_lossy(name)));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        fs::rename(&tmp, &p).with_context(|| format!("cannot put the profile link {} in place", p.display()))?;
    }
    Ok(())
}

/// [`write_links`] as the owner of the upper's files (the image view's root; real root directly).
pub(crate) fn write_links_as_owner(upper: PathBuf, links: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
    if links.is_empty() {
        return Ok(());
    }
    as_owner(move || write_links(&upper, &links))
}

/// Runs `f` as the owner of an upper's files: the image view's root (real root directly).
fn as_owner(f: impl FnOnce() -> Result<()>) -> Result<()> {
    if rustix::process::geteuid().is_root() {
        return f();
    }
    let user = crate::userns::HostUser::current();
    let view = crate::userns::image_view(&user, crate::userns::host_subids(&user));
    crate::sys::process::in_child(move || {
        crate::userns::enter_one_level(&view)?;
        f()
    })
}

/// The merge's staging directory of an environment (see the module header).
pub(crate) fn staging(env: &super::env::Env) -> PathBuf {
    env.dir.join("nixdb")
}

/// The journaled step of a rebase that merged the database: [`place`] as the owner of the
/// upper's files (the image view's root; real root directly), then the staging goes.
pub(crate) fn finish(env: &super::env::Env, new: Vec<PathBuf>) -> Result<()> {
    let (staging, upper) = (staging(env), env.upper());
    let s = staging.clone();
    as_owner(move || place(&s, &upper, &new))?;
    remove_staging(&staging)
}

/// Removes a merge's staging or work (files `nix-store` wrote there as root inside included).
pub(crate) fn remove_staging(staging: &Path) -> Result<()> {
    if fs::symlink_metadata(staging).is_err() {
        return Ok(());
    }
    super::remove_tree_mapped(staging)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(path: &str, refs: &[&str]) -> Registration {
        Registration { path: format!("/nix/store/{path}"), hash: format!("h-{path}"), nar_size: 8, deriver: String::new(), refs: refs.iter().map(|r| format!("/nix/store/{r}")).collect() }
    }

    #[test]
    fn dumps_round_trip_and_damaged_ones_are_errors() {
        let text = "/nix/store/a-x\n0123\n288\n\n0\n/nix/store/b-y\nabcd\n300\n/nix/store/c.drv\n2\n/nix/store/a-x\n/nix/store/b-y\n";
        let regs = parse_dump(text).unwrap();
        assert_eq!(regs.len(), 2);
        assert_eq!(regs[1].deriver, "/nix/store/c.drv");
        assert_eq!(regs[1].refs, ["/nix/store/a-x", "/nix/store/b-y"]);
        assert_eq!(format_dump(&regs), text);
        assert!(parse_dump("").unwrap().is_empty());
        for bad in ["/nix/store/a\n0123\n288\n\n2\n/nix/store/a\n", "/nix/store/a\n0123\nbig\n\n0\n", "garbage\n\n1\n\n0\n"] {
            assert!(parse_dump(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn merge_keeps_both_sides_once_and_drops_what_is_not_there() {
        use Shows::*;
        // x: the old layers' (on both sides), y: ours, z: theirs, w: theirs but hidden by the
        // upper (collected there), v: ours, referencing w, so it goes with it.
        let ours = vec![reg("x", &[]), reg("y", &["x", "y"]), reg("v", &["w"])];
        let theirs = vec![reg("x", &[]), reg("z", &["x"]), reg("w", &[])];
        let shows = |p: &str| match p.trim_start_matches("/nix/store/") {
            "y" | "v" => Upper,
            "w" => Nowhere,
            _ => Lowers,
        };
        let m = merge(ours, theirs, shows);
        let paths: Vec<&str> = m.valid.iter().map(|r| r.path.trim_start_matches("/nix/store/")).collect();
        assert_eq!(paths, ["x", "y", "z"]);
        assert_eq!(m.dropped, ["/nix/store/v", "/nix/store/w"]);
    }

    #[test]
    fn a_path_on_both_sides_is_registered_by_the_side_whose_files_show() {
        let mut mine = reg("p", &[]);
        mine.hash = "ours".into();
        let mut layers = reg("p", &[]);
        layers.hash = "theirs".into();
        let m = merge(vec![mine.clone()], vec![layers.clone()], |_| Shows::Upper);
        assert_eq!(m.valid, [mine.clone()]);
        let m = merge(vec![mine], vec![layers.clone()], |_| Shows::Lowers);
        assert_eq!(m.valid, [layers]);
    }

    /// A profile `p` in the lowers at generation 2 (Z, switched at second 100) and in the upper
    /// at its own generation 2 (W, switched at `ours_at`).
    fn profiles(ours_at: i64) -> (tempfile::TempDir, Profiles) {
        let t = tempfile::tempdir().unwrap();
        let (upper, lower) = (t.path().join("upper"), t.path().join("lower"));
        let link = |root: &Path, name: &str, target: &str, at: i64| {
            let dir = root.join(PROFILES);
            fs::create_dir_all(&dir).unwrap();
            std::os::unix::fs::symlink(target, dir.join(name)).unwrap();
            let ts = rustix::fs::Timespec { tv_sec: at, tv_nsec: 0 };
            rustix::fs::utimensat(rustix::fs::CWD, dir.join(name), &rustix::fs::Timestamps { last_access: ts, last_modification: ts }, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
        };
        link(&lower, "p-1-link", "/nix/store/x", 50);
        link(&lower, "p-2-link", "/nix/store/z", 100);
        link(&lower, "p", "p-2-link", 100);
        link(&upper, "p-2-link", "/nix/store/w", ours_at);
        link(&upper, "p", "p-2-link", ours_at);
        // The same target on both sides: `p` is no conflict by itself.
        let conflicts = vec![format!("{PROFILES}/p-2-link").into_bytes()];
        let out = settle_profiles(&upper, &[lower], &conflicts).unwrap();
        (t, out)
    }

    #[test]
    fn profiles_keep_both_sides_generations_and_the_newer_switch() {
        let at = |n: &str| format!("{PROFILES}/{n}").into_bytes();
        // The upper switched later: its generation moves to 3, and `p` follows it.
        let (_t, out) = profiles(200);
        assert_eq!(out.theirs, [at("p-2-link")]);
        assert_eq!(out.ours, [at("p")]);
        assert_eq!(out.links, [(at("p-3-link"), b"/nix/store/w".to_vec()), (at("p"), b"p-3-link".to_vec())]);
        // The layers switched later: their `p` (generation 2, Z) shows; the upper's generation
        // is still kept, as 3.
        let (_t, out) = profiles(60);
        assert_eq!(out.theirs, [at("p-2-link"), at("p")]);
        assert!(out.ours.is_empty());
        assert_eq!(out.links, [(at("p-3-link"), b"/nix/store/w".to_vec())]);
    }

    #[test]
    fn generation_links_are_named_name_n_link() {
        assert_eq!(generation_of(b"profile-12-link"), Some((&b"profile"[..], 12)));
        assert_eq!(generation_of(b"my-env-3-link"), Some((&b"my-env"[..], 3)));
        assert_eq!(generation_of(b"profile"), None);
        assert_eq!(generation_of(b"-3-link"), None);
        assert_eq!(generation_of(b"profile-x-link"), None);
    }

    #[test]
    fn db_files_are_the_databases_and_its_companions_only() {
        assert!(is_db_file(b"nix/var/nix/db/db.sqlite"));
        assert!(is_db_file(b"nix/var/nix/db/db.sqlite-wal"));
        assert!(is_db_file(b"nix/var/nix/db/big-lock"));
        assert!(!is_db_file(b"nix/var/nix/db"));
        assert!(!is_db_file(b"nix/var/nix/gc.lock"));
        assert!(!is_db_file(b"nix/var/nix/db/other"));
        assert!(!is_db_file(b"nix/var/nix/profiles/default"));
    }
}
