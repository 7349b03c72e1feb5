//! `docker://REF`: an image in a registry, pulled layer by layer into stages.
//!
//! The manifest (or index, narrowed to `--platform`/the host's platform) and the config are
//! fetched and checked against their digests; then each layer is either found in the store by
//! its blob digest or diff_id (the store's blob index), or downloaded into an unnamed temporary
//! file where the store is, checked against its digest, and only then unpacked through the same
//! verifying unpacker as `oci:` layers (the uncompressed diff_id must match before the stage is
//! finished). A blob that is not what the manifest names writes nothing but itself, bounded by
//! its declared size, however much it would expand to; a killed pull leaves no file behind. A
//! blob that is what the manifest names may still expand without end: `oci::unpack_layer` bounds
//! it (1000 times the blob, at least 1 GiB, or `PLYROOT_MAX_LAYER_SIZE`), and its progress line
//! counts uncompressed bytes.
//!
//! Each verified layer is published as it completes, so a pull killed half-way keeps the layers
//! it finished, and the next pull downloads only the rest.

use std::io::Read;

use anyhow::Context;

use super::error::UnpackError;
use super::oci::{check_digest, check_layer_count, unpack_layer, LayerBlob};
use crate::oci::{layer_type_supported, Config, Descriptor, Manifest, INDEX_TYPES};
use super::LayerSink;
use crate::progress::Progress;
use crate::registry::{Client, Platform, Reference};
use crate::store::meta::Ownership;

/// Media types of the manifests we can read.
const SCHEMA1: [&str; 2] = ["application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws"];

pub(super) fn unpack(reference: &str, name: &str, ownership: Ownership, progress: &mut Progress, sink: &mut dyn LayerSink) -> anyhow::Result<()> {
    let r = Reference::parse(reference)?;
    let mut client = Client::new(&r, false)?;
    let platform = crate::registry::platform()?;
    let manifest = resolve(&mut client, name, &platform)?;
    let config_desc = manifest.config.ok_or_else(|| image_err(name, "the manifest has no config".into()))?;
    check_digest(name, &config_desc.digest)?;
    let config_bytes = client.blob_bytes(&config_desc.digest)?;
    let config: Config = serde_json::from_slice(&config_bytes).map_err(|source| UnpackError::Json { what: format!("{name} config {}", config_desc.digest), source })?;
    let layers = manifest.layers;
    check_layer_count(name, layers.len(), config.rootfs.diff_ids.len())?;
    for layer in &layers {
        check_digest(name, &layer.digest)?;
        if layer.size == 0 {
            // The size bounds the download; without it a registry could send without end.
            return Err(image_err(name, format!("layer {} has no size in the manifest (the image spec requires one; plyroot bounds each download by it)", layer.digest)).into());
        }
        if !layer_type_supported(&layer.media_type) {
            return Err(image_err(name, format!("layer {} has media type '{}', which plyroot cannot unpack", layer.digest, layer.media_type)).into());
        }
    }
    for d in &config.rootfs.diff_ids {
        check_digest(name, d)?;
    }

    let n = layers.len();
    let (mut fetched, mut bytes) = (0, 0);
    for (i, (layer, diff_id)) in layers.into_iter().zip(config.rootfs.diff_ids).enumerate() {
        let description = format!("{name} layer {}/{n} ({})", i + 1, layer.digest);
        if let Some(id) = sink.known(&[&layer.digest, &diff_id])? {
            crate::diag::debug!("{description}: already in the store as {id}, not downloaded");
            continue;
        }
        crate::diag::debug!("{description}: downloading {} bytes", layer.size);
        let resp = client.blob(&layer.digest)?;
        let mut p = progress.sub(&format!("{name} layer {}/{n}", i + 1), Some(layer.size));
        let blob = download(resp, &layer, &description, &mut p, sink)?;
        p.finish();
        // Counted in uncompressed bytes, which the image does not state: no total.
        let mut p = progress.sub(&format!("{name} layer {}/{n}: unpacking", i + 1), None);
        unpack_layer(LayerBlob { reader: blob, digest: Some(layer.digest), size: layer.size, diff_id, description, index: true }, ownership, &mut p, sink)?;
        p.finish();
        fetched += 1;
        bytes += layer.size;
    }
    drop(client);
    crate::diag::info!(
        "{name}: {n} layer(s), {fetched} downloaded ({}), {} already in the store",
        crate::text::human(bytes),
        n - fetched
    );
    crate::diag::debug!("{name}: pulled; {} thread(s) in this process", crate::registry::threads());
    Ok(())
}

/// Downloads a layer's blob into a temporary file where the store is, and checks its digest
/// before anything is unpacked: a blob that is not what the manifest names writes nothing but
/// itself (at most its declared size), however much it would expand to. Refused up front when
/// the store's filesystem has less room than the blob.
fn download(resp: impl Read, layer: &Descriptor, description: &str, progress: &mut Progress, sink: &mut dyn LayerSink) -> anyhow::Result<std::fs::File> {
    use std::io::Seek;
    let mut file = sink.scratch()?;
    if let Ok(st) = rustix::fs::fstatvfs(&file) {
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < layer.size {
            anyhow::bail!(
                "{description}: the blob is {}, but the store's filesystem has {} free: make room, or move the store (PLYROOT_HOME)",
                crate::text::human(layer.size),
                crate::text::human(free)
            );
        }
    }
    let read_err = |e| UnpackError::read(description, e);
    // A registry that sends more than the descriptor's size is sending something else.
    let mut hashing = crate::source::compress::HashingReader::new(resp.take(layer.size.saturating_add(1)));
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match hashing.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e).into()),
        };
        std::io::Write::write_all(&mut file, &buf[..n]).with_context(|| format!("cannot keep the download of {description} where the store is"))?;
        progress.add_bytes(n as u64);
    }
    let actual = hashing.drain_and_digest().map_err(read_err)?;
    if actual != layer.digest {
        return Err(UnpackError::Digest { what: format!("{description}: blob"), expected: layer.digest.clone(), actual }.into());
    }
    file.rewind().map_err(read_err)?;
    Ok(file)
}

fn image_err(name: &str, reason: String) -> UnpackError {
    UnpackError::Image { image: name.to_owned(), reason }
}

/// Fetches the reference's manifest and, through indexes, the image manifest for `platform`.
fn resolve(client: &mut Client, name: &str, platform: &Platform) -> anyhow::Result<Manifest> {
    let mut reference = client.reference.manifest_ref().to_owned();
    for _ in 0..4 {
        let (body, content_type) = client.manifest(&reference)?;
        let what = format!("{name} manifest {reference}");
        let m: Manifest = serde_json::from_slice(&body).map_err(|source| UnpackError::Json { what: what.clone(), source })?;
        if m.schema_version == 1 || SCHEMA1.contains(&content_type.as_str()) {
            return Err(image_err(name, "the registry serves it as a schema 1 manifest, which plyroot does not read (it predates 2017; re-push the image with a current tool)".into()).into());
        }
        let is_index = INDEX_TYPES.contains(&content_type.as_str()) || INDEX_TYPES.contains(&m.media_type.as_str()) || (m.config.is_none() && m.manifests.is_some());
        if !is_index {
            return Ok(m);
        }
        let chosen = choose(m.manifests.unwrap_or_default(), platform).map_err(|reason| image_err(name, reason))?;
        check_digest(name, &chosen.digest)?;
        crate::diag::debug!("{name}: {platform} is {}", chosen.digest);
        reference = chosen.digest;
    }
    Err(image_err(name, "image indexes are nested too deeply".into()).into())
}

/// The entry of an index for `platform`: os and architecture equal, and the variant too when
/// one is asked for (else the first of any variant, as registries list the preferred first).
fn choose(manifests: Vec<Descriptor>, platform: &Platform) -> Result<Descriptor, String> {
    let fits = |d: &Descriptor, strict_variant: bool| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == platform.os
                && p.architecture == platform.architecture
                && match (&platform.variant, strict_variant) {
                    (Some(v), _) => p.variant.as_deref() == Some(v.as_str()),
                    (None, true) => p.variant.is_none(),
                    (None, false) => true,
                }
        })
    };
    if let Some(i) = manifests.iter().position(|d| fits(d, true)).or_else(|| manifests.iter().position(|d| fits(d, false))) {
        return Ok(manifests.into_iter().nth(i).expect("position is in range"));
    }
    if manifests.len() == 1 && manifests[0].platform.is_none() {
        return Ok(manifests.into_iter().next().expect("one manifest"));
    }
    let mut have: Vec<String> = manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .filter(|p| p.os != "unknown")
        .map(|p| Platform { os: p.os.clone(), architecture: p.architecture.clone(), variant: p.variant.clone() }.to_string())
        .collect();
    have.dedup();
    Err(format!(
        "the image has no variant for {platform} (it has: {}); choose one with --platform OS/ARCH[/VARIANT] or PLYROOT_PLATFORM",
        if have.is_empty() { "none with a platform".to_owned() } else { have.join(", ") }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(os: &str, arch: &str, variant: Option<&str>, n: u8) -> Descriptor {
        let v = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", format!("{n:02x}").repeat(32)),
            "size": 1,
            "platform": { "os": os, "architecture": arch, "variant": variant },
        });
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn chooses_the_platform() {
        let list = || vec![desc("linux", "amd64", None, 1), desc("linux", "arm", Some("v6"), 2), desc("linux", "arm", Some("v7"), 3), desc("linux", "arm64", Some("v8"), 4), desc("unknown", "unknown", None, 5)];
        let pick = |p: &str| choose(list(), &Platform::parse(p).unwrap()).map(|d| d.digest[7..9].to_owned());
        assert_eq!(pick("linux/amd64").unwrap(), "01");
        assert_eq!(pick("linux/arm/v7").unwrap(), "03");
        assert_eq!(pick("linux/arm").unwrap(), "02", "no variant asked: the first one");
        assert_eq!(pick("linux/arm64").unwrap(), "04");
        let e = pick("linux/s390x").unwrap_err();
        assert!(e.contains("linux/s390x") && e.contains("linux/arm/v7") && !e.contains("unknown") && e.contains("--platform"), "{e}");
    }

    #[test]
    fn a_single_manifest_without_platform_is_taken() {
        let mut d = desc("linux", "amd64", None, 9);
        d.platform = None;
        assert_eq!(choose(vec![d], &Platform::parse("linux/riscv64").unwrap()).unwrap().digest[7..9].to_owned(), "09");
    }
}
