//! Layers: import (unpack into staging, digest, publish by rename), listing and removal.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::meta::{Ownership, Overrides};
use super::{canonical, now_secs, write_atomic, Staging, Store};
use crate::progress::Progress;
use crate::source::{self, LayerSink, Source, Unpacked};

/// What `layer.json` records about a layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LayerInfo {
    /// `sha256:<hex>` of the canonical tar.
    pub id: String,
    /// Bytes of regular file content.
    pub size: u64,
    pub entries: u64,
    /// Where the content first came from.
    pub source: String,
    /// Seconds since the epoch.
    pub created: u64,
}

/// Whether `id` is a layer id as the store writes it: `sha256:` and 64 lowercase hex digits.
/// Ids read back from records become path names under `layers/`, so nothing else may pass.
pub(crate) fn is_layer_id(id: &str) -> bool {
    id.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Checks the layer ids a record read from `file` holds; an error names the file, shows the
/// first bad value, and ends with `fix` (what the user can do about it).
pub(crate) fn check_ids<'a>(ids: impl IntoIterator<Item = &'a String>, file: &Path, fix: &str) -> Result<()> {
    match ids.into_iter().find(|id| !is_layer_id(id)) {
        None => Ok(()),
        Some(bad) => bail!("{} is damaged: {} is not a layer id (sha256: and 64 lowercase hex digits); {fix}", file.display(), shown(bad)),
    }
}

/// A value from a damaged record as it can be shown on one line: quoted, escaped, cut short.
fn shown(v: &str) -> String {
    let cut: String = v.chars().take(80).collect();
    if cut.len() < v.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// The first 12 hex digits of an id, for tables (`sha256:` + 12 = 19 characters); never panics,
/// whatever the string.
pub(crate) fn short_id(id: &str) -> &str {
    id.get(..19).unwrap_or(id)
}

impl Store {
    /// The directory of layer `id` (`sha256:<hex>`).
    pub(crate) fn layer_dir(&self, id: &str) -> PathBuf {
        self.layers_dir().join(id.trim_start_matches("sha256:"))
    }

    /// The tree of layer `id`, as used for an overlay lower.
    pub(crate) fn layer_root(&self, id: &str) -> PathBuf {
        self.layer_dir(id).join("root")
    }

    pub(crate) fn layer_info(&self, id: &str) -> Result<LayerInfo> {
        let p = self.layer_dir(id).join("layer.json");
        let data = fs::read(&p).with_context(|| format!("layer {id} is not in the store ({})", p.display()))?;
        let fix = format!("restore it, or remove the directory {} and import its source again", self.layer_dir(id).display());
        let info: LayerInfo = serde_json::from_slice(&data).with_context(|| format!("{} is damaged (not a layer record); {fix}", p.display()))?;
        // The directory's name is the id the rest of the store refers to; a record that says
        // otherwise would make gc and `layer rm` act on another path.
        if info.id != id {
            check_ids([&info.id], &p, &fix)?;
            bail!("{} is damaged: it names layer {} but lies in the directory of {id}; {fix}", p.display(), info.id);
        }
        Ok(info)
    }

    pub(crate) fn layer_overrides(&self, id: &str) -> Result<Overrides> {
        let p = self.layer_dir(id).join("overrides.json");
        match fs::read(&p) {
            Ok(d) => serde_json::from_slice(&d).with_context(|| format!("{} is corrupt", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Overrides::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    /// Every layer in the store, sorted by id.
    pub(crate) fn layers(&self) -> Result<Vec<LayerInfo>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(self.layers_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", self.layers_dir().display())),
        };
        for e in rd.flatten() {
            let id = format!("sha256:{}", e.file_name().to_string_lossy());
            if is_layer_id(&id) {
                out.push(self.layer_info(&id)?);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Resolves a full id or an unambiguous prefix (with or without `sha256:`), in any case: ids
    /// are copied from tools that print hex in capitals, and `SHA256:` is the same algorithm.
    pub(crate) fn resolve_layer(&self, id: &str) -> Result<String> {
        let hex = match id.get(..7) {
            Some(p) if p.eq_ignore_ascii_case("sha256:") => &id[7..],
            _ => id,
        };
        let hex = hex.to_ascii_lowercase();
        let hex = hex.as_str();
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("'{id}' is not a layer id: expected sha256:<hex> or a prefix of one (see `plyroot layers`)");
        }
        if hex.len() == 64 && self.layer_dir(hex).join("layer.json").exists() {
            return Ok(format!("sha256:{hex}"));
        }
        let hits: Vec<_> = self.layers()?.into_iter().filter(|l| l.id.trim_start_matches("sha256:").starts_with(hex)).collect();
        match hits.len() {
            0 => bail!("no layer {id} in the store (see `plyroot layers`)"),
            1 => Ok(hits[0].id.clone()),
            n => bail!("layer id prefix {id} is ambiguous: {n} layers match; give more digits"),
        }
    }

    /// Imports a source, returning its layers bottom first. Nothing is published unless every
    /// layer of the source unpacked and verified, except registry layers: each is verified on its
    /// own (blob digest and diff_id) and published as it completes, so that an interrupted pull
    /// resumes after it; layers the store already holds (blob index) are not fetched at all.
    pub(crate) fn import(&self, src: &Source, progress: &mut Progress) -> Result<Vec<LayerInfo>> {
        self.import_as(src, None, progress)
    }

    /// [`Store::import`], recording `source` as where new layers came from instead of `src`
    /// (a squash's temporary tar is no source a user could import again).
    pub(crate) fn import_as(&self, src: &Source, source: Option<&str>, progress: &mut Progress) -> Result<Vec<LayerInfo>> {
        match src {
            Source::Layer(id) => return Ok(vec![self.layer_info(&self.resolve_layer(id)?)?]),
            Source::Env(name) => {
                let env = self.env(name)?;
                let g = env.current()?;
                return g.layers.iter().map(|l| self.layer_info(l)).collect();
            }
            _ => {}
        }
        self.clean_leftovers()?;
        let ownership = if rustix::process::geteuid().is_root() { Ownership::Preserve } else { Ownership::Record };
        let mut imp = Importer { store: self, current: None, pending: Vec::new(), devices: 0, xattrs: 0, early: 0, source };
        if let Err(e) = source::unpack(src, ownership, progress, &mut imp) {
            return Err(match imp.early {
                0 => e.context(format!("cannot import {src}; the store is unchanged")),
                n => e.context(format!("cannot import {src}; the {n} complete and verified layer(s) before the failure are kept, so a second try resumes after them")),
            });
        }
        progress.finish();
        if imp.devices > 0 {
            crate::diag::warn!(
                "{} device node(s) in {src} cannot be created without privileges; they are recorded in the layer's metadata (and kept by export/push) but absent inside",
                imp.devices
            );
        }
        if imp.xattrs > 0 {
            crate::diag::warn!(
                "{} extended attribute(s) in {src} (e.g. security.capability) cannot be set without privileges; they are recorded in the layer's metadata",
                imp.xattrs
            );
        }
        fs::create_dir_all(self.layers_dir()).with_context(|| format!("cannot create {}", self.layers_dir().display()))?;
        let mut out = Vec::new();
        for (staging, info) in imp.pending {
            // Registry layers were published as they completed (`Importer::finish`).
            let Some(staging) = staging else {
                out.push(info);
                continue;
            };
            let dest = self.layer_dir(&info.id);
            if dest.exists() {
                drop(staging);
                out.push(self.layer_info(&info.id)?);
            } else if staging.publish(&dest)? {
                out.push(info);
            } else {
                out.push(self.layer_info(&info.id)?);
            }
        }
        Ok(out)
    }

    /// Removes a layer no environment uses.
    pub(crate) fn remove_layer(&self, id: &str) -> Result<()> {
        let users = self.layer_users(id)?;
        if !users.is_empty() {
            bail!("layer {id} is used by environment(s) {}: remove them first (`plyroot rm NAME`)", users.join(", "));
        }
        let st = self.staging()?;
        let grave = st.path.join("layer");
        fs::rename(self.layer_dir(id), &grave).with_context(|| format!("cannot remove layer {id}"))?;
        drop(st);
        Ok(())
    }

    /// Environments whose generations reference `id`.
    pub(crate) fn layer_users(&self, id: &str) -> Result<Vec<String>> {
        let mut users = Vec::new();
        for env in self.envs()? {
            if env.generations()?.iter().any(|g| g.layers.iter().any(|l| l == id)) {
                users.push(env.name.clone());
            }
        }
        Ok(users)
    }
}

struct Importer<'s> {
    store: &'s Store,
    current: Option<Staging>,
    /// Layers to publish at the end, bottom first; `None`: already in place.
    pending: Vec<(Option<Staging>, LayerInfo)>,
    devices: u64,
    xattrs: u64,
    /// Layers published before the end.
    early: usize,
    /// What to record as the layers' source, instead of the unpacker's description.
    source: Option<&'s str>,
}

impl Importer<'_> {
    /// Indexes `aliases` as names of layer `id` (best effort: the index only saves downloads).
    fn index(&self, aliases: &[impl AsRef<str>], id: &str) {
        for a in aliases {
            if let Err(e) = self.store.record_blob(a.as_ref(), id) {
                crate::diag::warn!("{e:#}");
            }
        }
    }
}

impl LayerSink for Importer<'_> {
    fn stage(&mut self) -> Result<OwnedFd> {
        let st = self.store.staging()?;
        let root = st.path.join("root");
        fs::create_dir(&root).with_context(|| format!("cannot create {}", root.display()))?;
        let fd = rustix::fs::open(&root, rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())
            .with_context(|| format!("cannot open {}", root.display()))?;
        self.current = Some(st);
        Ok(fd)
    }

    fn finish(&mut self, stage: OwnedFd, u: Unpacked) -> Result<()> {
        drop(stage);
        let st = self.current.take().context("finish() without stage()")?;
        self.devices += u.skipped_devices;
        self.xattrs += u.unset_xattrs;
        let sum = canonical::digest(&st.path.join("root"), &u.overrides).with_context(|| format!("cannot digest {}", u.description))?;
        if !u.overrides.is_empty() || u.overrides.flattened {
            write_atomic(&st.path.join("overrides.json"), &serde_json::to_vec(&u.overrides)?)?;
        }
        let source = self.source.map_or(u.description, str::to_owned);
        let info = LayerInfo { id: sum.id, size: sum.size, entries: sum.entries, source, created: now_secs() };
        write_atomic(&st.path.join("layer.json"), &serde_json::to_vec_pretty(&info)?)?;
        crate::diag::debug!("unpacked {} as {}", info.source, info.id);
        if u.aliases.is_empty() {
            self.pending.push((Some(st), info));
            return Ok(());
        }
        // A verified registry layer: publish it now, so an interrupted pull keeps it.
        fs::create_dir_all(self.store.layers_dir()).with_context(|| format!("cannot create {}", self.store.layers_dir().display()))?;
        let dest = self.store.layer_dir(&info.id);
        let info = if !dest.exists() && st.publish(&dest)? { info } else { self.store.layer_info(&info.id)? };
        self.index(&u.aliases, &info.id);
        self.early += 1;
        self.pending.push((None, info));
        Ok(())
    }

    fn known(&mut self, digests: &[&str]) -> Result<Option<String>> {
        let Some(id) = digests.iter().find_map(|d| self.store.layer_for_blob(d)) else { return Ok(None) };
        self.index(digests, &id);
        self.pending.push((None, self.store.layer_info(&id)?));
        Ok(Some(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_are_checked_and_shortened_without_panics() {
        let good = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert!(is_layer_id(&good));
        for bad in ["", "sha256:", "sha256:abc", &good[7..], &good.to_uppercase(), &format!("{good}0"), "sha256:../../../../../../../../../../../../../../../../../../etc", &good.replace('0', "é")] {
            assert!(!is_layer_id(bad), "{bad:?}");
        }
        let file = Path::new("/s/envs/t/generations/1.json");
        let e = check_ids(&[good.clone(), "sha256:ab\ncd".to_owned()], file, "restore it").unwrap_err().to_string();
        assert!(e.starts_with("/s/envs/t/generations/1.json is damaged: \"sha256:ab\\ncd\" is not a layer id") && e.ends_with("restore it") && !e.contains('\n'), "{e}");
        let long = "x".repeat(500);
        assert!(check_ids(&[long], file, "fix").unwrap_err().to_string().len() < 250, "a huge value is cut short");
        assert_eq!(short_id(&good), &good[..19]);
        for s in ["", "sha256:ab", "ééééééééééé"] {
            assert_eq!(short_id(s), s);
        }
    }
}
