//! The merged view of a layer stack, serialized as one flat canonical tar: what overlayfs shows
//! at the root of a run, without the overlay's bookkeeping (no `.wh.` entries, no opaque
//! markers), each entry with the metadata of the layer that provides it.
//!
//! The resolution rules are overlayfs's ([`crate::store::tree::resolve`]), applied to whole
//! directories at once: for every name in a directory, the top-most tier that has it provides
//! it; a whiteout (char 0:0) deletes it and everything below; a non-directory, or a directory
//! that is opaque or stands over a lower non-directory, hides the tiers below it; directories
//! merge. A device recorded only in a layer's [`Overrides`] is an entry of that layer like any
//! on disk. All tiers are walked together through one [`Cursor`]: names as bytes, any depth,
//! a bounded number of open directories.
//!
//! The walk emits entries in the canonical order (depth first, names sorted by their bytes), and
//! every entry goes through the canonical [`Writer`], so the export of a stack is byte for byte
//! the canonical tar of the tree it unpacks to: `import` of it computes its sha256 as the id.
//!
//! [`write_squashed`] is the same merge for part of a stack (`plyroot squash --from N`): the
//! tiers become one layer that goes on top of other layers, so what they delete of those must
//! stay deleted. Where the merged directory still lets the layers below show through, a name the
//! tiers delete is written as a whiteout, and a directory that hides what is below it (opaque, or
//! standing over a whiteout or a non-directory of a lower tier) is written opaque.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rustix::fs::FileType;

use crate::store::canonical::{recorded_devices, CanonicalError, RecordedDevices, Writer};
use crate::store::meta::Overrides;
use crate::store::tree::{self, join, kind, resolve, shown, Cursor, Found, Lend};

/// One layer of a stack as the merge reads it: a tree and what its disk could not hold.
#[derive(Clone, Debug)]
pub(crate) struct Tier {
    pub root: PathBuf,
    pub overrides: Overrides,
}

fn read_err(path: &[u8]) -> impl FnOnce(std::io::Error) -> CanonicalError + '_ {
    move |source| CanonicalError::Read { path: if path.is_empty() { ".".into() } else { shown(path) }, source }
}

/// Writes the merged tree of `tiers` (bottom first) to `w`.
pub(crate) fn write_merged(tiers: &[Tier], w: &mut Writer<'_>) -> Result<(), CanonicalError> {
    write(tiers, w, false)
}

/// Writes `tiers` (bottom first) merged into one layer for the top of a stack: as
/// [`write_merged`], keeping what they delete of the layers below them (see the module header).
pub(crate) fn write_squashed(tiers: &[Tier], w: &mut Writer<'_>) -> Result<(), CanonicalError> {
    write(tiers, w, true)
}

/// `squash`: there are layers under the tiers whose content their deletions must keep hiding.
fn write(tiers: &[Tier], w: &mut Writer<'_>, squash: bool) -> Result<(), CanonicalError> {
    if tiers.is_empty() {
        return Ok(());
    }
    // Per tier: parent directory → the devices recorded only in its metadata.
    let devices: Vec<RecordedDevices<'_>> = tiers.iter().map(|t| recorded_devices(&t.overrides)).collect();
    let roots: Vec<&Path> = tiers.iter().map(|t| t.root.as_path()).collect();
    let mut cur = Cursor::new(&roots, Lend::Read).map_err(|source| CanonicalError::Read { path: tiers[0].root.display().to_string(), source })?;
    // The root merges every tier, top first: overlayfs never treats a layer's root as opaque.
    let top_first: Vec<usize> = (0..tiers.len()).rev().collect();
    let mut rel: Vec<u8> = Vec::new();
    let names = |cur: &mut Cursor, tiers_here: &[usize], rel: &[u8], below: bool| names_of(cur, tiers, &devices, tiers_here, rel, below);
    let mut levels = vec![Level { names: names(&mut cur, &top_first, &rel, squash)?, tiers: top_first, parent_len: 0, below: squash }];
    while let Some(level) = levels.last_mut() {
        let Some((key, name)) = level.names.pop() else {
            let parent_len = level.parent_len;
            levels.pop();
            if !levels.is_empty() {
                cur.leave().map_err(read_err(&rel))?;
                rel.truncate(parent_len);
            }
            continue;
        };
        if key != name {
            w.marker(&join(&rel, &key))?;
            continue;
        }
        let (here, below_here) = (level.tiers.clone(), level.below);
        let path = join(&rel, &name);
        let r = resolve(&mut cur, &here, &name, |t| tiers[t].overrides.get(&path).and_then(|o| o.device.as_ref())).map_err(read_err(&path))?;
        match r.top {
            None => {}
            Some((t, Found::Recorded(d))) => w.device(&path, d, &tiers[t].overrides)?,
            Some((t, Found::Disk(st))) if kind(&st) != FileType::Directory => {
                let at = cur.dir(t).map_err(read_err(&rel))?;
                w.disk(at, &name, &path, &st, &tiers[t].overrides)?;
            }
            Some((t, Found::Disk(st))) => {
                let with: Vec<(usize, &rustix::fs::Stat)> = r.dirs.iter().map(|(t, s)| (*t, s)).collect();
                cur.enter(&name, &with).map_err(read_err(&path))?;
                let fd = cur.dir(t).map_err(read_err(&path))?;
                w.dir(fd, &path, &st, &tiers[t].overrides)?;
                if below_here && r.cut {
                    w.marker(&[path.as_slice(), b"/.wh..wh..opq"].concat())?;
                }
                let merging: Vec<usize> = r.dirs.iter().map(|d| d.0).collect();
                let parent_len = rel.len();
                rel = path;
                let below = below_here && !r.cut;
                let names = names(&mut cur, &merging, &rel, below)?;
                levels.push(Level { names, tiers: merging, parent_len, below });
            }
        }
    }
    Ok(())
}

/// A directory's entries: (the name the tar gives it, the name in the tiers); they differ for a
/// deletion written as a whiteout.
type Names = Vec<(Vec<u8>, Vec<u8>)>;

/// One directory being merged by [`write`].
struct Level {
    /// Entries still to write, reversed.
    names: Names,
    /// The tiers whose directories merge here, top first.
    tiers: Vec<usize>,
    parent_len: usize,
    /// Layers below the tiers still show through here (squash only).
    below: bool,
}

/// The entries of directory `rel`, merged from the tiers `tiers_here` (the cursor is in it), in
/// the order [`Level::names`] keeps them. `below`: layers under the tiers show through here.
fn names_of(cur: &mut Cursor, tiers: &[Tier], devices: &[RecordedDevices<'_>], tiers_here: &[usize], rel: &[u8], below: bool) -> Result<Names, CanonicalError> {
    let mut set: BTreeSet<Vec<u8>> = BTreeSet::new();
    for &t in tiers_here {
        set.extend(tree::list(cur.dir(t).map_err(read_err(rel))?).map_err(read_err(rel))?.into_iter().map(|e| e.0));
        if let Some(devs) = devices[t].get(rel) {
            set.extend(devs.iter().map(|d| d.0.clone()));
        }
    }
    let mut out = Vec::with_capacity(set.len());
    for name in set {
        if below {
            // A deletion of what lies below the tiers is an entry of its own: `.wh.NAME`.
            let path = join(rel, &name);
            let r = resolve(cur, tiers_here, &name, |t| tiers[t].overrides.get(&path).and_then(|o| o.device.as_ref())).map_err(read_err(&path))?;
            if r.top.is_none() {
                if r.cut {
                    out.push(([b".wh.".as_slice(), &name].concat(), name));
                }
                continue;
            }
        }
        out.push((name.clone(), name));
    }
    // By the bytes of the names the tar gives them: the canonical order.
    out.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::canonical;
    use crate::store::meta::Device;
    use std::fs;

    fn whiteout(p: &Path) {
        rustix::fs::mknodat(rustix::fs::CWD, p, rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::empty(), 0).unwrap();
    }

    fn names(tar: &[u8]) -> Vec<String> {
        tar::Archive::new(tar).entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().trim_end_matches('/').to_owned()).collect()
    }

    fn merged(tiers: &[Tier]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        write_merged(tiers, &mut w).unwrap();
        w.finish().unwrap();
        out
    }

    fn tier(root: &Path) -> Tier {
        Tier { root: root.to_owned(), overrides: Overrides { flattened: true, ..Default::default() } }
    }

    #[test]
    fn one_tier_is_the_layers_own_canonical_tar() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("l");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::write(root.join("usr/bin/a"), "a").unwrap();
        fs::hard_link(root.join("usr/bin/a"), root.join("usr/bin/b")).unwrap();
        std::os::unix::fs::symlink("a", root.join("usr/bin/c")).unwrap();
        let mut ti = tier(&root);
        ti.overrides.entry("usr/bin/a").owner = Some((7, 8));
        ti.overrides.entry("dev/null").device = Some(Device { kind: 'c', major: 1, minor: 3, mode: 0o666, mtime: 1 });
        fs::create_dir(root.join("dev")).unwrap();
        let mut layer = Vec::new();
        canonical::write_tar(&root, &ti.overrides, &mut layer).unwrap();
        assert_eq!(merged(&[ti]), layer);
    }

    #[test]
    fn overlay_rules_whiteouts_opaque_dirs_and_shadowing() {
        let t = tempfile::tempdir().unwrap();
        let [mut b, mid, top] = deleting_tiers(t.path());
        // A whiteout in the bottom tier deletes nothing and is no entry; a device only in the
        // bottom tier's metadata is kept (another, dev/gone, the top deletes).
        whiteout(&b.root.join("never"));
        b.overrides.entry("dev/kept").device = Some(Device { kind: 'b', major: 8, minor: 0, mode: 0o660, mtime: 1 });
        let tar = merged(&[b, mid, top]);
        assert_eq!(
            names(&tar),
            [
                "dev", "dev/kept", "dir-then-file", "etc", "etc/a", "file-then-dir", "file-then-dir/sub", "opt", "opt/z", "srv", "srv/new",
            ]
        );
        let mut ar = tar::Archive::new(&tar[..]);
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let mut s = String::new();
            if p == "etc/a" || p == "dir-then-file" {
                std::io::Read::read_to_string(&mut e, &mut s).unwrap();
                assert_eq!(s, if p == "etc/a" { "middle" } else { "now a file" });
            }
            if p == "dev/kept" {
                assert_eq!(e.header().entry_type(), tar::EntryType::Block);
                assert_eq!(e.header().device_major().unwrap(), Some(8));
            }
        }
    }

    #[test]
    fn mtimes_are_clamped_when_asked() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("l");
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/f"), "f").unwrap();
        let ts = |s| rustix::fs::Timestamps { last_access: rustix::fs::Timespec { tv_sec: s, tv_nsec: 0 }, last_modification: rustix::fs::Timespec { tv_sec: s, tv_nsec: 0 } };
        rustix::fs::utimensat(rustix::fs::CWD, root.join("d/f"), &ts(500), rustix::fs::AtFlags::empty()).unwrap();
        rustix::fs::utimensat(rustix::fs::CWD, root.join("d"), &ts(2000), rustix::fs::AtFlags::empty()).unwrap();
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.clamp_mtimes(1000);
        write_merged(&[tier(&root)], &mut w).unwrap();
        w.finish().unwrap();
        let mtimes: Vec<u64> = tar::Archive::new(&out[..]).entries().unwrap().map(|e| e.unwrap().header().mtime().unwrap()).collect();
        assert_eq!(mtimes, [1000, 500]);
    }

    fn deleting_tiers(t: &Path) -> [Tier; 3] {
        let (bot, mid, top) = (t.join("bot"), t.join("mid"), t.join("top"));
        for d in [&bot, &mid, &top] {
            fs::create_dir_all(d.join("etc")).unwrap();
        }
        fs::write(bot.join("etc/a"), "bottom").unwrap();
        fs::write(bot.join("etc/b"), "bottom").unwrap();
        fs::create_dir_all(bot.join("opt/x")).unwrap();
        fs::write(bot.join("opt/y"), "y").unwrap();
        fs::create_dir_all(bot.join("srv/old")).unwrap();
        fs::write(bot.join("file-then-dir"), "f").unwrap();
        fs::create_dir_all(bot.join("dir-then-file/inner")).unwrap();
        fs::write(mid.join("etc/a"), "middle").unwrap();
        whiteout(&top.join("etc/b"));
        fs::create_dir_all(mid.join("opt/z")).unwrap();
        rustix::fs::lsetxattr(mid.join("opt"), "user.overlay.opaque", b"y", rustix::fs::XattrFlags::empty()).unwrap();
        fs::create_dir_all(top.join("file-then-dir/sub")).unwrap();
        fs::write(mid.join("dir-then-file"), "now a file").unwrap();
        whiteout(&mid.join("srv"));
        fs::create_dir_all(top.join("srv/new")).unwrap();
        fs::create_dir(bot.join("dev")).unwrap();
        fs::create_dir(top.join("dev")).unwrap();
        whiteout(&top.join("dev/gone"));
        let mut b = tier(&bot);
        b.overrides.entry("dev/gone").device = Some(Device { kind: 'c', major: 1, minor: 5, mode: 0o666, mtime: 1 });
        [b, tier(&mid), tier(&top)]
    }

    #[test]
    fn squashed_tiers_keep_their_deletions_of_what_is_below() {
        let t = tempfile::tempdir().unwrap();
        let [bot, mid, top] = deleting_tiers(t.path());
        let mut squashed = Vec::new();
        let mut w = Writer::new(&mut squashed);
        write_squashed(&[mid.clone(), top.clone()], &mut w).unwrap();
        let id = w.finish().unwrap().id;
        assert_eq!(
            names(&squashed),
            [
                "dev", "dev/.wh.gone", "dir-then-file", "etc", "etc/.wh.b", "etc/a", "file-then-dir", "file-then-dir/sub", "opt", "opt/.wh..wh..opq", "opt/z", "srv",
                "srv/.wh..wh..opq", "srv/new",
            ]
        );
        // Unpacked as a layer (as `plyroot squash` imports it) and stacked on the bottom tier, it
        // shows exactly what the two tiers showed there; and its id is its tar's digest.
        let root = t.path().join("squashed");
        fs::create_dir(&root).unwrap();
        let fd = rustix::fs::open(&root, rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
        let own = if rustix::process::geteuid().is_root() { crate::store::meta::Ownership::Preserve } else { crate::store::meta::Ownership::Record };
        let u = crate::source::unpack_tar(&mut &squashed[..], "squashed", std::os::fd::AsFd::as_fd(&fd), own, &mut crate::progress::Progress::hidden()).unwrap();
        let layer = Tier { root, overrides: u.overrides };
        assert_eq!(canonical::digest(&layer.root, &layer.overrides).unwrap().id, id);
        assert_eq!(merged(&[bot.clone(), layer]), merged(&[bot, mid, top]));
    }
}
