//! The merged view of a layer stack, serialized as one flat canonical tar: what overlayfs shows
//! at the root of a run, without the overlay's bookkeeping (no `.wh.` entries, no opaque
//! markers), each entry with the metadata of the layer that provides it.
//!
//! The resolution rules are overlayfs's (and [`crate::store::upper::lookup`]'s), applied to whole
//! directories at once: for every name in a directory, the top-most tier that has it provides
//! it; a whiteout (char 0:0) deletes it and everything below; a non-directory, or a directory
//! that is opaque or stands over a lower non-directory, hides the tiers below it; directories
//! merge. A device recorded only in a layer's [`Overrides`] is an entry of that layer like any
//! on disk.
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

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::store::canonical::{join, CanonicalError, Writer};
use crate::store::meta::{Device, Overrides};
use crate::store::upper::is_opaque;

/// One layer of a stack as the merge reads it: a tree and what its disk could not hold.
#[derive(Clone, Debug)]
pub(crate) struct Tier {
    pub root: PathBuf,
    pub overrides: Overrides,
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

/// `below`: there are layers under the tiers whose content their deletions must keep hiding.
fn write(tiers: &[Tier], w: &mut Writer<'_>, below: bool) -> Result<(), CanonicalError> {
    let mut devices: Vec<HashMap<&str, Vec<&str>>> = Vec::with_capacity(tiers.len());
    for t in tiers {
        let mut by_parent: HashMap<&str, Vec<&str>> = HashMap::new();
        for (path, o) in &t.overrides.entries {
            if o.device.is_some() {
                let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
                by_parent.entry(parent).or_default().push(name);
            }
        }
        devices.push(by_parent);
    }
    // The root merges every tier: overlayfs never treats a layer's root as opaque.
    let roots: Vec<(usize, PathBuf)> = tiers.iter().enumerate().rev().map(|(i, t)| (i, t.root.clone())).collect();
    Merge { tiers, devices }.dir(w, "", &roots, below)
}

struct Merge<'t> {
    tiers: &'t [Tier],
    /// Per tier: parent directory → names of the devices recorded only in its metadata.
    devices: Vec<HashMap<&'t str, Vec<&'t str>>>,
}

/// What one tier has at a path.
enum Found<'t> {
    Absent,
    Whiteout,
    Device(&'t Device),
    Disk(fs::Metadata),
}

impl<'t> Merge<'t> {
    fn find(&self, tier: usize, abs: &Path, path: &str) -> Result<Found<'t>, CanonicalError> {
        match fs::symlink_metadata(abs) {
            Ok(md) if crate::store::upper::is_whiteout(&md) => Ok(Found::Whiteout),
            Ok(md) => Ok(Found::Disk(md)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Ok(match self.tiers[tier].overrides.entries.get(path).and_then(|o| o.device.as_ref()) {
                    Some(d) => Found::Device(d),
                    None => Found::Absent,
                })
            }
            Err(e) => Err(CanonicalError::Read { path: path.to_owned(), source: e }),
        }
    }

    /// Writes the children of the merged directory `rel`, whose contributing directories are
    /// `dirs` (tier index and path, top first). `below`: content under the tiers shows through
    /// this directory, so deletions are written (whiteouts, opaque directories).
    fn dir(&self, w: &mut Writer<'_>, rel: &str, dirs: &[(usize, PathBuf)], below: bool) -> Result<(), CanonicalError> {
        let shown = || if rel.is_empty() { ".".to_owned() } else { rel.to_owned() };
        let mut names: BTreeSet<OsString> = BTreeSet::new();
        for (tier, dir) in dirs {
            let rd = fs::read_dir(dir).map_err(|e| CanonicalError::Read { path: shown(), source: e })?;
            for e in rd {
                names.insert(e.map_err(|e| CanonicalError::Read { path: shown(), source: e })?.file_name());
            }
            if let Some(devs) = self.devices[*tier].get(rel) {
                names.extend(devs.iter().map(OsString::from));
            }
        }
        // Each name as the tar names it: itself, or `.wh.NAME` for a deletion that is written.
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let path = join(rel, &name);
            let (top, merged, cut) = self.resolve(dirs, &name, &path)?;
            let key = match &top {
                Some(_) => name.as_bytes().to_vec(),
                None if below && cut => [b".wh.".as_slice(), name.as_bytes()].concat(),
                None => continue,
            };
            entries.push((key, path, top, merged, cut));
        }
        // By bytes: the canonical order.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, path, top, merged, cut) in entries {
            match top {
                None => w.marker(&join(rel, OsStr::from_bytes(&key)))?,
                Some((tier, _, Found::Device(d))) => w.device(&path, d, &self.tiers[tier].overrides)?,
                Some((tier, abs, Found::Disk(md))) => {
                    w.disk(&abs, &path, &md, &self.tiers[tier].overrides)?;
                    if md.is_dir() {
                        if below && cut {
                            w.marker(&format!("{path}/.wh..wh..opq"))?;
                        }
                        self.dir(w, &path, &merged, below && !cut)?;
                    }
                }
                Some((_, _, Found::Absent | Found::Whiteout)) => unreachable!("resolve never provides an absent entry"),
            }
        }
        Ok(())
    }

    /// The tier that provides `name` in the merged directory (none: deleted, or absent), when
    /// that is a directory the directories merged into it (top first), and whether the tiers cut
    /// off what is below them at `name`: a whiteout, an opaque directory, or a directory over a
    /// lower non-directory. (A non-directory on top also hides what is below, by being there.)
    #[allow(clippy::type_complexity)]
    fn resolve(&self, dirs: &[(usize, PathBuf)], name: &OsStr, path: &str) -> Result<(Option<(usize, PathBuf, Found<'t>)>, Vec<(usize, PathBuf)>, bool), CanonicalError> {
        let mut top: Option<(usize, PathBuf, Found<'t>)> = None;
        let mut below: Vec<(usize, PathBuf)> = Vec::new();
        let mut cut = false;
        for (tier, dir) in dirs {
            let abs = dir.join(name);
            let found = self.find(*tier, &abs, path)?;
            let is_dir = matches!(&found, Found::Disk(md) if md.is_dir());
            match (&top, found) {
                (_, Found::Absent) => continue,
                // A whiteout deletes the name in every tier below it.
                (_, Found::Whiteout) => {
                    cut = true;
                    break;
                }
                (None, found) => {
                    top = Some((*tier, abs.clone(), found));
                    if !is_dir {
                        break;
                    }
                    below.push((*tier, abs.clone()));
                }
                // A directory hides a lower non-directory and everything under it.
                (Some(_), _) if !is_dir => {
                    cut = true;
                    break;
                }
                (Some(_), _) => below.push((*tier, abs.clone())),
            }
            if is_opaque(&abs) {
                cut = true;
                break;
            }
        }
        Ok((top, below, cut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::canonical;
    use crate::store::meta::Device;

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
        let (bot, mid, top) = (t.path().join("bot"), t.path().join("mid"), t.path().join("top"));
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
        // A whiteout in the bottom tier deletes nothing and is no entry.
        whiteout(&bot.join("never"));
        // A device only in the bottom tier's metadata, deleted by the top; another kept.
        let mut b = tier(&bot);
        fs::create_dir(bot.join("dev")).unwrap();
        b.overrides.entry("dev/gone").device = Some(Device { kind: 'c', major: 1, minor: 5, mode: 0o666, mtime: 1 });
        b.overrides.entry("dev/kept").device = Some(Device { kind: 'b', major: 8, minor: 0, mode: 0o660, mtime: 1 });
        fs::create_dir(top.join("dev")).unwrap();
        whiteout(&top.join("dev/gone"));
        let tar = merged(&[b, tier(&mid), tier(&top)]);
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

    /// The fixture of `overlay_rules_whiteouts_opaque_dirs_and_shadowing`: three tiers whose
    /// top two delete, replace and hide things of the bottom one.
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
}
