//! Layers: import (unpack into staging, digest, publish by rename), listing and removal.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

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
        serde_json::from_slice(&data).with_context(|| format!("{} is corrupt", p.display()))
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
            let name = e.file_name().to_string_lossy().into_owned();
            if name.len() == 64 {
                out.push(self.layer_info(&format!("sha256:{name}"))?);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Resolves a full id or an unambiguous prefix (with or without `sha256:`).
    pub(crate) fn resolve_layer(&self, id: &str) -> Result<String> {
        let hex = id.trim_start_matches("sha256:");
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("'{id}' is not a layer id: expected sha256:<hex> or a prefix of one (see `plyroot layers`)");
        }
        if hex.len() == 64 && self.layer_dir(hex).join("layer.json").exists() {
            return Ok(format!("sha256:{hex}"));
        }
        let hits: Vec<_> = self.layers()?.into_iter().filter(|l| l.id["sha256:".len()..].starts_with(hex)).collect();
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
        let mut imp = Importer { store: self, current: None, pending: Vec::new(), devices: 0, xattrs: 0, early: 0 };
        if let Err(e) = source::unpack(src, ownership, progress, &mut imp) {
            return Err(match imp.early {
                0 => e.context(format!("cannot import {src}; the store is unchanged")),
                n => e.context(format!("cannot import {src}; the {n} complete and verified layer(s) before the failure are kept, so a second try resumes after them")),
            });
        }
        progress.finish();
        if imp.devices > 0 {
            crate::diag::warn(&format!(
                "{} device node(s) in {src} cannot be created without privileges; they are recorded in the layer's metadata (and kept by export/push) but absent inside",
                imp.devices
            ));
        }
        if imp.xattrs > 0 {
            crate::diag::warn(&format!(
                "{} extended attribute(s) in {src} (e.g. security.capability) cannot be set without privileges; they are recorded in the layer's metadata",
                imp.xattrs
            ));
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
}

impl Importer<'_> {
    /// Indexes `aliases` as names of layer `id` (best effort: the index only saves downloads).
    fn index(&self, aliases: &[impl AsRef<str>], id: &str) {
        for a in aliases {
            if let Err(e) = self.store.record_blob(a.as_ref(), id) {
                crate::diag::warn(&format!("{e:#}"));
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
        let info = LayerInfo { id: sum.id, size: sum.size, entries: sum.entries, source: u.description, created: now_secs() };
        write_atomic(&st.path.join("layer.json"), &serde_json::to_vec_pretty(&info)?)?;
        crate::diag::debug(&format!("unpacked {} as {}", info.source, info.id));
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
