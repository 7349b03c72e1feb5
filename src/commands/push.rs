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

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Write};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{human, out};
use crate::export::{self as exp, oci, Compression, Encoder};
use crate::registry::http::Body;
use crate::registry::{Client, Reference};
use crate::sandbox::as_root_inside;
use crate::store::canonical;
use crate::store::Store;

/// One compressed layer the helper made.
#[derive(Serialize, Deserialize)]
struct Made {
    id: String,
    digest: String,
    size: u64,
    file: std::path::PathBuf,
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
    if ids.is_empty() {
        bail!("'{name}' has no layers to push");
    }
    for id in &ids {
        if !store.layer_root(id).is_dir() {
            bail!("layer {id} of '{name}' is missing from the store: see `plyroot verify`");
        }
    }
    let unique: Vec<String> = ids.iter().collect::<BTreeSet<_>>().into_iter().cloned().collect();
    let mut client = Client::new(&r, true)?;

    // Layers whose gzip blob we made before and the registry has: nothing to do.
    let mut blobs: std::collections::BTreeMap<String, (String, u64)> = Default::default();
    for id in &unique {
        if let Some((digest, size)) = store.pushed_blob(id) {
            if client.has_blob(&digest)? {
                crate::diag::debug!("layer {id}: the registry has its blob {digest}");
                blobs.insert(id.clone(), (digest, size));
            }
        }
    }
    let todo: Vec<String> = unique.iter().filter(|id| !blobs.contains_key(*id)).cloned().collect();
    let staging = store.staging()?;
    let mut made = Vec::new();
    if !todo.is_empty() {
        crate::diag::info!("compressing {} layer(s) of '{name}'", todo.len());
        let mut tiers = Vec::new();
        for id in &todo {
            tiers.push((id.clone(), store.layer_root(id), store.layer_overrides(id)?));
        }
        let dir = staging.path.clone();
        made = as_root_inside(move || {
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
        .with_context(|| format!("cannot push '{name}': compressing its layers failed"))?;
    }
    let (mut uploaded, mut sent) = (0, 0);
    for m in &made {
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
    drop(staging);

    let mut vars: Vec<String> = Vec::new();
    if !generation.settings.env.contains_key("PATH") {
        vars.push(format!("PATH={}", crate::sandbox::PATH));
    }
    vars.extend(generation.settings.env.iter().map(|(k, v)| format!("{k}={v}")));
    let created = exp::source_date_epoch()?.unwrap_or(0);
    let image = oci::Image { layers: ids.iter().map(|id| (id.clone(), 0)).collect(), env: vars, cmd: vec!["/bin/sh".to_owned()], created, tag: String::new() };
    let config = oci::config_bytes(&image)?;
    let config_digest = crate::registry::sha256(&config);
    if !client.has_blob(&config_digest)? {
        client.upload(&config_digest, Body::Bytes(&config))?;
    }
    let layers: Vec<(String, u64)> = ids.iter().map(|id| blobs[id].clone()).collect();
    let manifest = oci::manifest_bytes(&config, &layers, crate::oci::MEDIA_LAYER_GZIP)?;
    let manifest_digest = crate::registry::sha256(&manifest);
    if let Some(d) = &r.digest {
        if *d != manifest_digest {
            bail!("cannot push '{name}' as {r}: its manifest is {manifest_digest}, not {d}; push to a tag instead");
        }
    }
    let put_as = r.tag.clone().unwrap_or_else(|| manifest_digest.clone());
    client.put_manifest(&put_as, crate::oci::MEDIA_MANIFEST, &manifest)?;
    crate::diag::info!(
        "pushed '{name}' generation {} to {r}: {} layer(s), {uploaded} uploaded ({}), {} already there",
        generation.number,
        ids.len(),
        human(sent),
        unique.len() - uploaded
    );
    drop(client);
    crate::diag::debug!("pushed; {} thread(s) in this process", crate::registry::threads());
    out(&format!("{manifest_digest}\n"))?;
    Ok(0)
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
