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

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::store::canonical::{CanonicalError, Summary};

pub(crate) const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// What `plyroot push` uploads: registries and their clients expect compressed layers.
#[cfg_attr(not(feature = "registry"), allow(dead_code))]
pub(crate) const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";

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

#[derive(Serialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
}

#[derive(Clone, Serialize)]
struct Platform {
    architecture: String,
    os: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
}

#[derive(Serialize)]
struct Config<'a> {
    created: String,
    architecture: &'a str,
    os: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    config: RunConfig<'a>,
    rootfs: RootFs,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig<'a> {
    env: &'a [String],
    cmd: &'a [String],
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: Vec<Descriptor>,
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
        created: rfc3339(image.created),
        architecture: &platform.architecture,
        os: platform.os,
        variant: platform.variant.as_deref(),
        config: RunConfig { env: &image.env, cmd: &image.cmd },
        rootfs: RootFs { kind: "layers", diff_ids: image.layers.iter().map(|(d, _)| d.clone()).collect() },
    };
    Ok(serde_json::to_vec(&config)?)
}

/// An image manifest as bytes: the config blob, and layer blobs (digest, size) of `media_type`.
pub(crate) fn manifest_bytes(config: &[u8], layers: &[(String, u64)], media_type: &'static str) -> Result<Vec<u8>> {
    let config = Descriptor { media_type: MEDIA_CONFIG, digest: sha256(config), size: config.len() as u64, annotations: BTreeMap::new(), platform: None };
    let layers = layers
        .iter()
        .map(|(digest, size)| Descriptor { media_type, digest: digest.clone(), size: *size, annotations: BTreeMap::new(), platform: None })
        .collect();
    Ok(serde_json::to_vec(&Manifest { schema_version: 2, media_type: MEDIA_MANIFEST, config, layers })?)
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes a blob named by its digest into `layout`; returns its descriptor.
fn raw_blob(layout: &Path, media_type: &'static str, data: &[u8]) -> Result<Descriptor> {
    let digest = sha256(data);
    let path = blobs_dir(layout).join(digest.trim_start_matches("sha256:"));
    fs::write(&path, data).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Descriptor { media_type, digest, size: data.len() as u64, annotations: BTreeMap::new(), platform: None })
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
    let index = Index { schema_version: 2, media_type: MEDIA_INDEX, manifests: vec![manifest] };
    let p = layout.join("index.json");
    fs::write(&p, serde_json::to_vec(&index)?).with_context(|| format!("cannot write {}", p.display()))?;
    let p = layout.join("oci-layout");
    fs::write(&p, br#"{"imageLayoutVersion":"1.0.0"}"#).with_context(|| format!("cannot write {}", p.display()))?;
    Ok(digest)
}

/// The running kernel's machine as the image-spec's (Go's) architecture and variant.
#[cfg_attr(not(feature = "registry"), allow(dead_code))]
pub(crate) fn host_arch() -> (String, Option<String>) {
    let p = host_platform();
    (p.architecture, p.variant)
}

/// The running kernel's machine in the image-spec's (Go's) names.
fn host_platform() -> Platform {
    let uname = rustix::system::uname();
    let machine = uname.machine().to_string_lossy().into_owned();
    let (arch, variant) = go_arch(&machine);
    Platform { architecture: arch.to_owned(), os: "linux", variant: variant.map(str::to_owned) }
}

fn go_arch(machine: &str) -> (&str, Option<&'static str>) {
    match machine {
        "x86_64" | "amd64" => ("amd64", None),
        "aarch64" | "arm64" | "aarch64_be" => ("arm64", None),
        "i386" | "i486" | "i586" | "i686" => ("386", None),
        m if m.starts_with("armv7") => ("arm", Some("v7")),
        m if m.starts_with("armv6") => ("arm", Some("v6")),
        m if m.starts_with("armv5") => ("arm", Some("v5")),
        "ppc64le" => ("ppc64le", None),
        "ppc64" => ("ppc64", None),
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        "loongarch64" => ("loong64", None),
        "mips64" => ("mips64le", None),
        m => (m, None),
    }
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

    #[test]
    fn go_arch_names() {
        assert_eq!(go_arch("x86_64"), ("amd64", None));
        assert_eq!(go_arch("aarch64"), ("arm64", None));
        assert_eq!(go_arch("armv7l"), ("arm", Some("v7")));
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
