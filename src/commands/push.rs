//! push: an environment's current generation as an image in a registry.
//!
//! Each layer goes up as the gzip of its canonical tar (deterministic: no timestamps, fixed
//! level), so its diff_id in the config is the plyroot layer id, and `plyroot import` of the image
//! on another store yields the same ids. The uncommitted upper is not pushed: an image is exactly
//! a generation's layers (commit first). Layers are compressed once: the store remembers which
//! gzip blob it made of each layer, and a layer whose blob the registry already has (HEAD) is
//! neither compressed nor uploaded again.
//!
//! Order of work: registry questions first, then one helper process (inside the user namespace,
//! where every file of a layer is readable) compresses what must go up into the store's staging
//! area, then the uploads. No thread at any point.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{human, out};
use crate::export::{self as exp, oci, Compression, Encoder};
use crate::registry::http::Body;
use crate::registry::{Client, Reference};
use crate::sandbox::in_image_view;
use crate::store::canonical;
use crate::store::Store;

/// One compressed layer the helper made.
#[derive(Serialize, Deserialize)]
struct Made {
    id: String,
    digest: String,
    size: u64,
    file: PathBuf,
}

pub(crate) fn push(store: &Store, name: &str, target: &str) -> Result<i32> {
    let reference = target.strip_prefix("docker://").unwrap_or(target);
    let r = Reference::parse(reference)?;
    let env = store.env(name)?;
    // Commit, reset and rebase replace generations and the upper; hold them off.
    let _lock = env.lock()?;
    let generation = env.current()?;
    if !env.upper_is_empty() {
        bail!("'{name}' has uncommitted changes in its upper: `plyroot commit {name}` to push them as a layer (or `plyroot reset {name}` to set them aside); push sends a generation's layers only");
    }
    if generation.settings.base.as_deref() == Some("host") {
        crate::diag::warn!("'{name}' runs on the host's root (base = \"host\"): the image holds its layers, not the host's files");
    }
    let ids = generation.layers.clone();
    check_layers(store, name, &ids)?;
    let mut client = Client::new(&r, true)?;
    let (manifest_digest, uploaded, sent, unique) = push_image(store, &mut client, &r, name, &ids, &generation.settings.env)?;
    crate::diag::info!(
        "pushed '{name}' generation {} to {r}: {} layer(s), {uploaded} uploaded ({}), {} already there",
        generation.number,
        ids.len(),
        human(sent),
        unique - uploaded
    );
    drop(client);
    crate::diag::debug!("pushed; {} thread(s) in this process", crate::registry::threads());
    out(&format!("{manifest_digest}\n"))?;
    Ok(0)
}

/// Pushes the layers `ids` (bottom first, every one in the store) of `name` as an image under `r`
/// with `client` (of `r`'s repository). Returns the manifest's digest, how many blobs were
/// uploaded, their bytes, and how many distinct layers the image has.
pub(crate) fn push_image(store: &Store, client: &mut Client, r: &Reference, name: &str, ids: &[String], env: &BTreeMap<String, String>) -> Result<(String, usize, u64, usize)> {
    let unique: Vec<String> = ids.iter().collect::<BTreeSet<_>>().into_iter().cloned().collect();
    let mut blobs = blobs_in_registry(store, client, &unique)?;
    let todo: Vec<String> = unique.iter().filter(|id| !blobs.contains_key(*id)).cloned().collect();
    let staging = store.staging()?;
    let made = compress(store, name, &todo, &staging.path)?;
    let (uploaded, sent) = upload_layers(store, client, &made, &mut blobs)?;
    drop(staging);
    let layers: Vec<(String, u64)> = ids.iter().map(|id| blobs[id].clone()).collect();
    let digest = put_image(client, r, name, env, ids, &layers)?;
    Ok((digest, uploaded, sent, unique.len()))
}

/// There is something to push, and every layer is in the store.
fn check_layers(store: &Store, name: &str, ids: &[String]) -> Result<()> {
    if ids.is_empty() {
        bail!("'{name}' has no layers to push");
    }
    for id in ids {
        if !store.layer_root(id).is_dir() {
            bail!("layer {id} of '{name}' is missing from the store: see `plyroot verify`");
        }
    }
    Ok(())
}

/// The layers whose gzip blob we made before and the registry has: nothing to do for them.
/// Layer id → (blob digest, size).
fn blobs_in_registry(store: &Store, client: &mut Client, unique: &[String]) -> Result<BTreeMap<String, (String, u64)>> {
    let mut blobs = BTreeMap::new();
    for id in unique {
        if let Some((digest, size)) = store.pushed_blob(id) {
            if client.has_blob(&digest)? {
                crate::diag::debug!("layer {id}: the registry has its blob {digest}");
                blobs.insert(id.clone(), (digest, size));
            }
        }
    }
    Ok(blobs)
}

/// Compresses the layers `todo` into `dir`, in one helper process inside the user namespace
/// (where every file of a layer is readable), checking each against its id on the way.
fn compress(store: &Store, name: &str, todo: &[String], dir: &Path) -> Result<Vec<Made>> {
    if todo.is_empty() {
        return Ok(Vec::new());
    }
    crate::diag::info!("compressing {} layer(s) of '{name}'", todo.len());
    let mut tiers = Vec::new();
    for id in todo {
        tiers.push((id.clone(), store.layer_root(id), store.layer_overrides(id)?));
    }
    let dir = dir.to_owned();
    in_image_view(move || {
        let mut made = Vec::new();
        for (i, (id, root, overrides)) in tiers.iter().enumerate() {
            let file = dir.join(format!("{i}.tar.gz"));
            let f = File::create(&file).with_context(|| format!("cannot write {}", file.display()))?;
            let mut hashed = HashingWriter { inner: exp::buffered(f), hash: Sha256::new(), len: 0 };
            let mut enc = Encoder::new(Compression::Gzip, &mut hashed)?;
            let summary = canonical::write_tar(root, overrides, &mut enc)?;
            enc.finish().with_context(|| format!("cannot write {}", file.display()))?;
            hashed.flush().with_context(|| format!("cannot write {}", file.display()))?;
            if &summary.id != id {
                bail!("layer {id} no longer matches its id (its tree serializes to {}): it was changed in the store; see `plyroot verify`", summary.id);
            }
            let digest = format!("sha256:{}", hex::encode(hashed.hash.finalize()));
            made.push(Made { id: id.clone(), digest, size: hashed.len, file });
        }
        Ok(made)
    })
    .with_context(|| format!("cannot push '{name}': compressing its layers failed"))
}

/// Uploads the compressed layers the registry does not have, and records every blob made in
/// the store and in `blobs`. Returns how many were uploaded and their bytes.
fn upload_layers(store: &Store, client: &mut Client, made: &[Made], blobs: &mut BTreeMap<String, (String, u64)>) -> Result<(usize, u64)> {
    let (mut uploaded, mut sent) = (0, 0);
    for m in made {
        if let Err(e) = store.record_pushed_blob(&m.id, &m.digest, m.size) {
            crate::diag::warn!("{e:#}");
        }
        if client.has_blob(&m.digest)? {
            crate::diag::debug!("layer {}: the registry has its blob {}", m.id, m.digest);
        } else {
            crate::diag::info!("uploading layer {} ({})", m.id, human(m.size));
            let f = File::open(&m.file).with_context(|| format!("cannot read {}", m.file.display()))?;
            client.upload(&m.digest, Body::File(&f))?;
            uploaded += 1;
            sent += m.size;
        }
        blobs.insert(m.id.clone(), (m.digest.clone(), m.size));
    }
    Ok((uploaded, sent))
}

/// Uploads the config and puts the manifest under the reference's tag (or its digest, which
/// must then be the manifest's); returns the manifest's digest.
fn put_image(client: &mut Client, r: &Reference, name: &str, env: &BTreeMap<String, String>, ids: &[String], layers: &[(String, u64)]) -> Result<String> {
    let mut vars: Vec<String> = Vec::new();
    if !env.contains_key("PATH") {
        vars.push(format!("PATH={}", crate::sandbox::PATH));
    }
    vars.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    let created = exp::source_date_epoch()?.unwrap_or(0);
    let image = oci::Image { layers: ids.iter().map(|id| (id.clone(), 0)).collect(), env: vars, cmd: vec!["/bin/sh".to_owned()], created, tag: String::new() };
    let config = oci::config_bytes(&image)?;
    let config_digest = crate::registry::sha256(&config);
    if !client.has_blob(&config_digest)? {
        client.upload(&config_digest, Body::Bytes(&config))?;
    }
    let manifest = oci::manifest_bytes(&config, layers, crate::oci::MEDIA_LAYER_GZIP)?;
    let manifest_digest = crate::registry::sha256(&manifest);
    if let Some(d) = &r.digest {
        if *d != manifest_digest {
            bail!("cannot push '{name}' as {r}: its manifest is {manifest_digest}, not {d}; push to a tag instead");
        }
    }
    let put_as = r.tag.clone().unwrap_or_else(|| manifest_digest.clone());
    client.put_manifest(&put_as, crate::oci::MEDIA_MANIFEST, &manifest)?;
    Ok(manifest_digest)
}

/// Hashes and counts what passes through to `inner`.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
