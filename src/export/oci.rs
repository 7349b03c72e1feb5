//! Writing an OCI image layout (image-spec v1.1: `oci-layout`, `index.json`, `blobs/sha256/`).
//!
//! Layer blobs are stored uncompressed (`application/vnd.oci.image.layer.v1.tar`): a blob is then
//! the layer's canonical tar itself, so its digest, its diff_id and the plyroot layer id are one
//! value (anyone can check a layer against the id without decompressing), nothing in the bytes
//! depends on a compressor's version (so the same environment exports to the same blobs on every
//! machine and plyroot version), and exporting costs no CPU beyond reading. Compression is a
//! transport matter: `skopeo copy` / `podman push` compress on the way to a registry.
//!
//! Every JSON document is serialized from structs in a fixed field order with sorted maps, and
//! the only timestamp is `SOURCE_DATE_EPOCH` (or the epoch), so the layout is reproducible.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::oci::{host_platform, sha256, Config, Descriptor, Index, Manifest, RootFs, RunConfig, MEDIA_CONFIG, MEDIA_INDEX, MEDIA_LAYER, MEDIA_MANIFEST, REF_NAME};
use crate::store::canonical::{CanonicalError, Summary};

/// What goes into the image besides its layer blobs.
#[derive(Clone, Debug)]
pub(crate) struct Image {
    /// Layer digests (= diff_ids, the blobs being uncompressed) and blob sizes, bottom first.
    pub layers: Vec<(String, u64)>,
    /// `KEY=VALUE`, as the config's `Env`.
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    /// Seconds since the epoch.
    pub created: u64,
    /// The `org.opencontainers.image.ref.name` of the image in `index.json`.
    pub tag: String,
}

pub(crate) fn blobs_dir(layout: &Path) -> PathBuf {
    layout.join("blobs/sha256")
}

/// Writes one layer blob into `layout` with `write`, which returns the canonical summary of what
/// it wrote (its id is the sha256 of those bytes: the blob's digest). Returns digest and size.
pub(crate) fn write_layer_blob(layout: &Path, write: impl FnOnce(&mut dyn Write) -> Result<Summary, CanonicalError>) -> Result<(String, u64)> {
    let dir = blobs_dir(layout);
    let tmp = dir.join(".layer.tmp");
    let file = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    let mut out = super::buffered(file);
    let summary = write(&mut out)?;
    let file = out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", tmp.display()))?;
    let size = file.metadata().with_context(|| format!("cannot read {}", tmp.display()))?.len();
    let dest = dir.join(summary.id.trim_start_matches("sha256:"));
    fs::rename(&tmp, &dest).with_context(|| format!("cannot write {}", dest.display()))?;
    Ok((summary.id, size))
}

/// The image config of `image` as bytes (what its digest is taken of).
pub(crate) fn config_bytes(image: &Image) -> Result<Vec<u8>> {
    let platform = host_platform();
    let config = Config {
        created: Some(rfc3339(image.created)),
        architecture: Some(platform.architecture),
        os: Some(platform.os),
        variant: platform.variant,
        config: Some(RunConfig { env: Some(image.env.clone()), cmd: Some(image.cmd.clone()) }),
        rootfs: RootFs { kind: "layers".to_owned(), diff_ids: image.layers.iter().map(|(d, _)| d.clone()).collect() },
    };
    Ok(serde_json::to_vec(&config)?)
}

/// An image manifest as bytes: the config blob, and layer blobs (digest, size) of `media_type`.
pub(crate) fn manifest_bytes(config: &[u8], layers: &[(String, u64)], media_type: &str) -> Result<Vec<u8>> {
    let manifest = Manifest {
        schema_version: 2,
        media_type: MEDIA_MANIFEST.to_owned(),
        manifests: None,
        config: Some(Descriptor::new(MEDIA_CONFIG, sha256(config), config.len() as u64)),
        layers: layers.iter().map(|(digest, size)| Descriptor::new(media_type, digest.clone(), *size)).collect(),
    };
    Ok(serde_json::to_vec(&manifest)?)
}

/// Writes a blob named by its digest into `layout`; returns its descriptor.
fn raw_blob(layout: &Path, media_type: &str, data: &[u8]) -> Result<Descriptor> {
    let digest = sha256(data);
    let path = blobs_dir(layout).join(digest.trim_start_matches("sha256:"));
    fs::write(&path, data).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Descriptor::new(media_type, digest, data.len() as u64))
}

/// Writes the config, the manifest, `index.json` and `oci-layout` into `layout`, whose
/// `blobs/sha256/` already holds the layer blobs. Returns the manifest's digest.
pub(crate) fn write_layout(layout: &Path, image: &Image) -> Result<String> {
    let platform = host_platform();
    let config = config_bytes(image)?;
    raw_blob(layout, MEDIA_CONFIG, &config)?;
    let manifest = manifest_bytes(&config, &image.layers, MEDIA_LAYER)?;
    let mut manifest = raw_blob(layout, MEDIA_MANIFEST, &manifest)?;
    manifest.annotations.insert(REF_NAME.to_owned(), image.tag.clone());
    manifest.platform = Some(platform);
    let digest = manifest.digest.clone();
    let index = Index { schema_version: 2, media_type: MEDIA_INDEX.to_owned(), manifests: vec![manifest] };
    let p = layout.join("index.json");
    fs::write(&p, serde_json::to_vec(&index)?).with_context(|| format!("cannot write {}", p.display()))?;
    let p = layout.join("oci-layout");
    fs::write(&p, br#"{"imageLayoutVersion":"1.0.0"}"#).with_context(|| format!("cannot write {}", p.display()))?;
    Ok(digest)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (UTC; proleptic Gregorian calendar).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    /// The exact bytes of what plyroot writes: a change here changes every pushed and exported
    /// image's digest.
    #[test]
    fn documents_have_one_byte_form() {
        let p = host_platform();
        let variant = p.variant.as_deref().map(|v| format!(r#""variant":"{v}","#)).unwrap_or_default();
        let image = Image { layers: vec![(format!("sha256:{}", "a".repeat(64)), 5)], env: vec!["PATH=/bin".into()], cmd: vec!["/bin/sh".into()], created: 1_700_000_000, tag: "t".into() };
        let config = config_bytes(&image).unwrap();
        assert_eq!(
            String::from_utf8(config.clone()).unwrap(),
            format!(r#"{{"created":"2023-11-14T22:13:20Z","architecture":"{}","os":"linux",{variant}"config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{}"]}}}}"#, p.architecture, "a".repeat(64))
        );
        let manifest = manifest_bytes(&config, &image.layers, MEDIA_LAYER).unwrap();
        assert_eq!(
            String::from_utf8(manifest).unwrap(),
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{}","size":5}}]}}"#,
                sha256(&config),
                config.len(),
                "a".repeat(64)
            )
        );
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(blobs_dir(t.path())).unwrap();
        let digest = write_layout(t.path(), &image).unwrap();
        let size = fs::metadata(blobs_dir(t.path()).join(&digest[7..])).unwrap().len();
        let platform = format!(r#"{{"architecture":"{}","os":"linux"{}}}"#, p.architecture, p.variant.as_deref().map(|v| format!(r#","variant":"{v}""#)).unwrap_or_default());
        assert_eq!(
            fs::read_to_string(t.path().join("index.json")).unwrap(),
            format!(r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{size},"annotations":{{"org.opencontainers.image.ref.name":"t"}},"platform":{platform}}}]}}"#)
        );
    }

    #[test]
    fn layout_is_reproducible_and_names_the_tag() {
        let t = tempfile::tempdir().unwrap();
        let write = |dir: &Path| {
            fs::create_dir_all(blobs_dir(dir)).unwrap();
            let layer = write_layer_blob(dir, |out| {
                let w = crate::store::canonical::Writer::new(out);
                w.finish()
            })
            .unwrap();
            let image = Image { layers: vec![layer], env: vec!["PATH=/bin".into()], cmd: vec!["/bin/sh".into()], created: 0, tag: "latest".into() };
            write_layout(dir, &image).unwrap()
        };
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        assert_eq!(write(&a), write(&b));
        let index: serde_json::Value = serde_json::from_slice(&fs::read(a.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["annotations"][REF_NAME], "latest");
        let m = index["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
        let manifest: serde_json::Value = serde_json::from_slice(&fs::read(blobs_dir(&a).join(m)).unwrap()).unwrap();
        // The empty canonical tar: 1024 zero bytes.
        assert_eq!(manifest["layers"][0]["size"], 1024);
        assert_eq!(manifest["layers"][0]["mediaType"], MEDIA_LAYER);
    }
}
