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

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
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
    Merge { tiers, devices }.dir(w, "", &roots)
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
    /// `dirs` (tier index and path, top first).
    fn dir(&self, w: &mut Writer<'_>, rel: &str, dirs: &[(usize, PathBuf)]) -> Result<(), CanonicalError> {
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
        // On Unix an OsString orders by its bytes: the canonical order.
        for name in names {
            let path = join(rel, &name);
            let (top, below) = self.resolve(dirs, &name, &path)?;
            match top {
                None => {}
                Some((tier, _, Found::Device(d))) => w.device(&path, d, &self.tiers[tier].overrides)?,
                Some((tier, abs, Found::Disk(md))) => {
                    w.disk(&abs, &path, &md, &self.tiers[tier].overrides)?;
                    if md.is_dir() {
                        self.dir(w, &path, &below)?;
                    }
                }
                Some((_, _, Found::Absent | Found::Whiteout)) => unreachable!("resolve never provides an absent entry"),
            }
        }
        Ok(())
    }

    /// The tier that provides `name` in the merged directory (none: deleted), and when that is a
    /// directory, the directories merged into it, top first.
    #[allow(clippy::type_complexity)]
    fn resolve(&self, dirs: &[(usize, PathBuf)], name: &OsStr, path: &str) -> Result<(Option<(usize, PathBuf, Found<'t>)>, Vec<(usize, PathBuf)>), CanonicalError> {
        let mut top: Option<(usize, PathBuf, Found<'t>)> = None;
        let mut below: Vec<(usize, PathBuf)> = Vec::new();
        for (tier, dir) in dirs {
            let abs = dir.join(name);
            let found = self.find(*tier, &abs, path)?;
            let is_dir = matches!(&found, Found::Disk(md) if md.is_dir());
            match (&top, found) {
                (_, Found::Absent) => continue,
                // A whiteout deletes the name in every tier below it.
                (_, Found::Whiteout) => break,
                (None, found) => {
                    top = Some((*tier, abs.clone(), found));
                    if !is_dir {
                        break;
                    }
                    below.push((*tier, abs.clone()));
                }
                // A directory hides a lower non-directory and everything under it.
                (Some(_), _) if !is_dir => break,
                (Some(_), _) => below.push((*tier, abs.clone())),
            }
            if is_opaque(&abs) {
                break;
            }
        }
        Ok((top, below))
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
