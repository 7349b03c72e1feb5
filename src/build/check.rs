//! `build --check`: which files of two outputs of one step differ, as `nix build --check` says.
//!
//! Two runs of a step never agree on mtimes (files are written at different times), so they are
//! not compared: the rerun has SOURCE_DATE_EPOCH set, and everything else a layer records is —
//! kind, mode, owners, content, link targets, device numbers and xattrs (overlayfs's own but the
//! opaque mark left out, as the canonical form leaves them out).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Reruns `step` of environment `name` on `below` with SOURCE_DATE_EPOCH set and names the files
/// whose content, metadata or presence differ from the layer `built` (see [`differences`]).
pub(crate) fn rerun(store: &crate::store::Store, name: &str, below: &[String], step: &crate::manifest::Step, built: &str, place: &str) -> Result<Vec<String>> {
    // One build of an environment at a time: an apply's steps use the same throwaway place.
    let _lock = store.lock_build(name)?;
    let epoch = store.layer_info(built).map(|i| i.created).unwrap_or(0);
    let env = super::step::run_only(store, name, below, step, place, &[("SOURCE_DATE_EPOCH".into(), epoch.to_string())])?;
    let (a, b) = (env.upper(), store.layer_root(built));
    let files = crate::sandbox::in_image_view(move || differences(&b, &a))?;
    store.remove_build_env(name)?;
    Ok(files)
}

/// What is compared of one entry.
#[derive(PartialEq, Eq)]
struct Entry {
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    /// A file's content digest or a link's target.
    data: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The paths (relative, `/`-separated) whose entries differ between the trees `a` and `b`, in
/// name order: present in one only, or different in anything but their mtime.
pub(crate) fn differences(a: &Path, b: &Path) -> Result<Vec<String>> {
    let (mut ea, mut eb) = (BTreeMap::new(), BTreeMap::new());
    walk(a, Vec::new(), &mut ea)?;
    walk(b, Vec::new(), &mut eb)?;
    let mut out: Vec<String> = ea.iter().filter(|(k, v)| eb.get(*k) != Some(v)).map(|(k, _)| k.clone()).collect();
    out.extend(eb.keys().filter(|k| !ea.contains_key(*k)).cloned());
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, rel: Vec<u8>, out: &mut BTreeMap<String, Entry>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = e.path();
        let m = fs::symlink_metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut name = rel.clone();
        if !name.is_empty() {
            name.push(b'/');
        }
        name.extend_from_slice(e.file_name().as_bytes());
        let data = if m.is_file() {
            super::inputs::file_digest(&path)?.to_vec()
        } else if m.file_type().is_symlink() {
            fs::read_link(&path).with_context(|| format!("cannot read {}", path.display()))?.as_os_str().as_bytes().to_vec()
        } else {
            Vec::new()
        };
        let mut xattrs = Vec::new();
        crate::sys::xattr::read_all(crate::sys::xattr::Target::Path(&path), &mut xattrs).with_context(|| format!("cannot read the xattrs of {}", path.display()))?;
        xattrs.retain(|(k, _)| !k.starts_with(b"user.overlay.") || k == b"user.overlay.opaque");
        xattrs.sort();
        out.insert(crate::text::escape_bytes(&name), Entry { mode: m.mode(), uid: m.uid(), gid: m.gid(), rdev: m.rdev(), data, xattrs });
        if m.is_dir() {
            walk(&path, name, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_changed_added_and_removed_path_but_not_mtimes() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for d in [&a, &b] {
            fs::create_dir_all(d.join("etc")).unwrap();
            fs::write(d.join("etc/same"), "x").unwrap();
            fs::write(d.join("etc/date"), format!("{d:?}")).unwrap();
        }
        fs::write(a.join("only-a"), "").unwrap();
        std::os::unix::fs::symlink("x", b.join("only-b")).unwrap();
        let old = fs::File::open(a.join("etc/same")).unwrap();
        old.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(differences(&a, &b).unwrap(), ["etc/date", "only-a", "only-b"]);
        assert!(differences(&a, &a).unwrap().is_empty());
    }
}
