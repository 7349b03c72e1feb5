//! Import: a source unpacked into the store as layers. Each layer is unpacked into a staging
//! directory, digested, and published by rename; the store's index of registry blobs lets a pull
//! skip what the store already holds, and its index of local files lets a second import of an
//! unchanged `tar:FILE` skip reading it.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, Result};

use super::{LayerSink, Source, UnpackError, Unpacked};
use crate::progress::Progress;
use crate::store::blobs::FileStamp;
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
        let file = match src {
            // Not a squash's temporary tar (`source`): no user imports that file again.
            Source::Tar(path) if path != Path::new("-") && source.is_none() => {
                Some(LocalFile::open(path).map_err(|e| e.context(format!("cannot import {src}; the store is unchanged")))?)
            }
            _ => None,
        };
        if let Some(layers) = file.as_ref().and_then(|f| f.known(self)) {
            crate::diag::debug!("{src}: unchanged since it was imported (same device, inode, size, mtime and ctime): not read again");
            return layers.iter().map(|l| self.layer_info(l)).collect();
        }
        self.clean_leftovers()?;
        // Real root writes the archive's owners; root of some user namespace (`unshare -r`) is
        // a user like any other, whose disk owners would read differently on the host.
        let real_root = rustix::process::geteuid().is_root() && crate::userns::in_initial_userns();
        let ownership = if real_root { Ownership::Preserve } else { Ownership::Record };
        let mut imp = Importer { store: self, current: None, pending: Vec::new(), devices: 0, xattrs: Default::default(), early: 0, source };
        let unpacked = match &file {
            Some(f) => f.file.try_clone().with_context(|| format!("cannot read {src}")).and_then(|copy| super::unpack_tar_file(copy, &src.to_string(), ownership, progress, &mut imp)),
            None => super::unpack(src, ownership, progress, &mut imp),
        };
        if let Err(e) = unpacked {
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
        let x = &imp.xattrs;
        if !x.recorded.is_empty() {
            crate::diag::warn!(
                "{} extended attribute(s) in {src} cannot be set on the store's files here (not allowed for this user, or not supported by the filesystem): {}; they are recorded in the layer's metadata",
                x.recorded.values().sum::<u64>(),
                names(&x.recorded)
            );
        }
        if !x.dropped.is_empty() {
            crate::diag::warn!(
                "{} overlayfs attribute(s) in {src} were dropped: {}; overlayfs would act on them inside the stack, so no layer keeps them",
                x.dropped.values().sum::<u64>(),
                names(&x.dropped)
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
        if let Some(f) = file {
            f.remember(self, &out);
        }
        Ok(out)
    }
}

/// `a, b on 3 entries, …` for a warning: every name when there are a few, else the first 8.
fn names(counts: &std::collections::BTreeMap<String, u64>) -> String {
    let mut shown: Vec<String> = counts.iter().take(8).map(|(n, c)| if *c > 1 { format!("{n} on {c} entries") } else { n.clone() }).collect();
    if counts.len() > 8 {
        shown.push(format!("and {} more", counts.len() - 8));
    }
    shown.join(", ")
}

/// A `tar:` source's file, open, with its stamp when it was opened (see `store::blobs`).
struct LocalFile {
    file: fs::File,
    stamp: FileStamp,
    opened: SystemTime,
}

impl LocalFile {
    fn open(path: &Path) -> Result<LocalFile> {
        let opened = SystemTime::now();
        let file = fs::File::open(path).map_err(|source| UnpackError::Open { path: path.to_owned(), source })?;
        let stamp = FileStamp::of(&rustix::fs::fstat(&file).with_context(|| format!("cannot stat {}", path.display()))?);
        Ok(LocalFile { file, stamp, opened })
    }

    /// Whether it is a regular file (a pipe or a device has no stable content to remember).
    fn regular(&self) -> bool {
        self.file.metadata().is_ok_and(|m| m.is_file())
    }

    /// The layers it was imported as, when it has not changed since.
    fn known(&self, store: &Store) -> Option<Vec<String>> {
        self.regular().then(|| store.layers_for_file("tar", &self.stamp)).flatten()
    }

    /// Records the layers it unpacked to, unless it changed while it was read, or so shortly
    /// before that a change in the same clock tick would not show in its stamp. Best effort:
    /// the index only saves reading the file again.
    fn remember(&self, store: &Store, layers: &[LayerInfo]) {
        let now = rustix::fs::fstat(&self.file).map(|st| FileStamp::of(&st));
        if !self.regular() || now.as_ref() != Ok(&self.stamp) || !self.stamp.settled(self.opened) {
            crate::diag::debug!("not remembering this file's layers: it changed during the import, or within {:?} before it", crate::store::blobs::SETTLED);
            return;
        }
        let ids: Vec<String> = layers.iter().map(|l| l.id.clone()).collect();
        if let Err(e) = store.record_file("tar", &self.stamp, &ids) {
            crate::diag::warn!("{e:#}");
        }
    }
}

struct Importer<'s> {
    store: &'s Store,
    current: Option<Staging>,
    /// Layers to publish at the end, bottom first; `None`: already in place.
    pending: Vec<(Option<Staging>, LayerInfo)>,
    devices: u64,
    xattrs: super::UnsetXattrs,
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

    fn finish(&mut self, stage: OwnedFd, mut u: Unpacked) -> Result<()> {
        drop(stage);
        let st = self.current.take().context("finish() without stage()")?;
        self.devices += u.skipped_devices;
        self.xattrs.add(std::mem::take(&mut u.unset_xattrs));
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
            crate::store::owners::mark_new(&st.path)?;
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
