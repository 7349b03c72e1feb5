//! Import: a source unpacked into the store as layers. Each layer is unpacked into a staging
//! directory, digested, and published by rename; the store's index of registry blobs lets a pull
//! skip what the store already holds.

use std::fs;
use std::os::fd::OwnedFd;

use anyhow::{Context, Result};

use super::{LayerSink, Source, Unpacked};
use crate::progress::Progress;
use crate::store::layer::LayerInfo;
use crate::store::meta::Ownership;
use crate::store::{canonical, now_secs, write_atomic, Staging, Store};

impl Store {
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
        // Real root writes the archive's owners; root of some user namespace (`unshare -r`) is
        // a user like any other, whose disk owners would read differently on the host.
        let real_root = rustix::process::geteuid().is_root() && crate::userns::in_initial_userns();
        let ownership = if real_root { Ownership::Preserve } else { Ownership::Record };
        let mut imp = Importer { store: self, current: None, pending: Vec::new(), devices: 0, xattrs: 0, early: 0, source };
        if let Err(e) = super::unpack(src, ownership, progress, &mut imp) {
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
    #[cfg(feature = "registry")]
    fn scratch(&mut self) -> Result<fs::File> {
        let tmp = self.store.root.join("tmp");
        fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        super::scratch_in(&tmp)
    }

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
        // Digested as the user wrote it; inside, its files have the owners the image gives them.
        if !self.store.layer_dir(&info.id).exists() {
            crate::store::owners::give_layer(&st.path.join("root"), &u.overrides)?;
        }
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

    #[cfg(feature = "registry")]
    fn known(&mut self, digests: &[&str]) -> Result<Option<String>> {
        let Some(id) = digests.iter().find_map(|d| self.store.layer_for_blob(d)) else { return Ok(None) };
        self.index(digests, &id);
        self.pending.push((None, self.store.layer_info(&id)?));
        Ok(Some(id))
    }
}
