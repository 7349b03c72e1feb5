//! `oci:DIR[:TAG]`: an OCI image layout directory (what `skopeo copy … oci:DIR` and `umoci`
//! write).
//!
//! Reads `index.json`, picks one image manifest (by tag, then by host platform, following nested
//! indexes), reads its config, and unpacks each layer blob into its own stage, bottom first. Every
//! blob is hashed while it streams and checked against its digest, and each layer's uncompressed
//! stream against the config's `rootfs.diff_ids`: a mismatch is an error naming the blob and both
//! digests, and the stage it was written to is never finished. A layer's uncompressed tar is
//! bounded ([`ExpansionLimit`]), and progress counts it, not the blob.
//!
//! The JSON types and blob reading are shared with `docker_archive.rs`.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::compress::{decompress, HashingReader};
use super::error::UnpackError;
use super::{split_tag, unpack_tar, LayerSink};
use crate::oci::{layer_type_supported, Config, Descriptor, Index, Manifest, INDEX_TYPES, REF_NAME};
use crate::progress::Progress;
use crate::store::meta::Ownership;

/// JSON documents (index, manifest, config) are read whole; past this they are not what they
/// claim to be, and reading them would break the memory budget.
pub(super) const MAX_JSON: u64 = 16 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Layout {
    image_layout_version: String,
}

/// `sha256:HEX` with exactly 64 lowercase hex digits: anything else could be a path (`../`) when
/// turned into a blob file name.
pub(super) fn check_digest(image: &str, digest: &str) -> Result<(), UnpackError> {
    let ok = digest
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(UnpackError::Image { image: image.to_owned(), reason: format!("unsupported or malformed digest '{digest}' (only sha256 is supported)") })
    }
}

/// Parses a small JSON document from `r`, refusing more than [`MAX_JSON`] bytes.
pub(super) fn read_json<T: serde::de::DeserializeOwned>(r: impl Read, what: &str) -> Result<T, UnpackError> {
    let mut buf = Vec::new();
    r.take(MAX_JSON + 1).read_to_end(&mut buf).map_err(|e| UnpackError::read(what, e))?;
    if buf.len() as u64 > MAX_JSON {
        return Err(UnpackError::Image { image: what.to_owned(), reason: format!("larger than {MAX_JSON} bytes") });
    }
    serde_json::from_slice(&buf).map_err(|source| UnpackError::Json { what: what.to_owned(), source })
}

/// Reads a JSON blob whose content must hash to `digest`.
pub(super) fn read_json_verified<T: serde::de::DeserializeOwned>(r: impl Read, what: &str, digest: &str) -> Result<T, UnpackError> {
    let mut buf = Vec::new();
    let mut hashing = HashingReader::new(r.take(MAX_JSON + 1));
    hashing.read_to_end(&mut buf).map_err(|e| UnpackError::read(what, e))?;
    if buf.len() as u64 > MAX_JSON {
        return Err(UnpackError::Image { image: what.to_owned(), reason: format!("larger than {MAX_JSON} bytes") });
    }
    let actual = hashing.drain_and_digest().map_err(|e| UnpackError::read(what, e))?;
    if actual != digest {
        return Err(UnpackError::Digest { what: what.to_owned(), expected: digest.to_owned(), actual });
    }
    serde_json::from_slice(&buf).map_err(|source| UnpackError::Json { what: what.to_owned(), source })
}

/// One layer to unpack: where its bytes are and what they must hash to.
pub(super) struct LayerBlob<R> {
    pub reader: R,
    /// Digest of the blob as stored (compressed), when known.
    pub digest: Option<String>,
    /// Size of the blob as stored (0 when not known): what [`expansion_limit`] multiplies.
    pub size: u64,
    /// Digest of the uncompressed tar, from the config.
    pub diff_id: String,
    /// For messages and errors: e.g. `oci:./img layer 2/3 (sha256:…)`.
    pub description: String,
    /// Index the layer under its digests and publish it at once ([`super::Unpacked::aliases`]):
    /// for registry layers.
    pub index: bool,
}

/// Unpacks one layer blob into a new stage, verifying both digests before finishing the stage.
pub(super) fn unpack_layer<R: Read>(
    blob: LayerBlob<R>,
    ownership: Ownership,
    progress: &mut Progress,
    sink: &mut dyn LayerSink,
) -> anyhow::Result<()> {
    let LayerBlob { reader, digest, size, diff_id, description, index } = blob;
    let read_err = |e| UnpackError::read(&description, e);
    let limit = expansion_limit(size)?;
    let stage = sink.stage()?;
    let mut stored = HashingReader::new(reader);
    let over = std::rc::Rc::new(std::cell::Cell::new(false));
    let unpacked = (|| {
        // Progress counts the uncompressed tar: what the disk gets, not what the network sent.
        let bounded = Bounded { inner: decompress(&mut stored).map_err(read_err)?, left: limit.bytes, over: over.clone() };
        let mut tar = HashingReader::new(progress.counting(bounded));
        let unpacked = unpack_tar(&mut tar, &description, stage.as_fd(), ownership, progress)?;
        // The tar ended at its end-of-archive marker; the diff_id covers the padding after it.
        Ok::<_, UnpackError>((unpacked, tar.drain_and_digest().map_err(read_err)?))
    })();
    // Past the bound, whatever the tar reader made of the refusal (a read error, a damaged
    // entry), the bound is what happened.
    let unpacked = if over.get() { Err(limit.exceeded(&description)) } else { unpacked };
    // Hash the whole blob even when unpacking failed: a corrupt blob usually shows up as a
    // decompression or tar error first, and "the blob is corrupt" is the more useful message.
    let actual_blob = stored.drain_and_digest().map_err(read_err)?;
    if let Some(expected) = digest {
        if actual_blob != expected {
            return Err(UnpackError::Digest { what: format!("{description}: blob"), expected, actual: actual_blob }.into());
        }
    }
    let (mut unpacked, actual_diff) = unpacked?;
    if actual_diff != diff_id {
        return Err(UnpackError::Digest { what: format!("{description}: uncompressed layer (diff_id)"), expected: diff_id, actual: actual_diff }.into());
    }
    unpacked.description = description;
    if index {
        unpacked.aliases = registry_aliases(diff_id, &actual_blob);
    }
    sink.finish(stage, unpacked)
}

/// How much a layer's uncompressed tar may hold, and why: a blob with the right digest is what
/// the image's author published, but 129 KiB of zstd can hold 4 GiB of zeros, and a pull must
/// not fill the disk for it. [`DEFAULT_EXPANSION`] times the blob, at least [`EXPANSION_FLOOR`];
/// `PLYROOT_MAX_LAYER_SIZE` sets the bound instead (bytes, or with K, M, G, T; 0: none).
struct ExpansionLimit {
    bytes: u64,
    /// The blob's size, for the message; None when the bound came from the environment.
    blob: Option<u64>,
}

/// Layers larger than this many times their blob stop, unless they are under [`EXPANSION_FLOOR`]
/// (a small layer of zero-filled files can expand this far, and costs little).
const DEFAULT_EXPANSION: u64 = 1000;
const EXPANSION_FLOOR: u64 = 1 << 30;
const MAX_LAYER_SIZE_VAR: &str = "PLYROOT_MAX_LAYER_SIZE";

fn expansion_limit(blob: u64) -> Result<ExpansionLimit, UnpackError> {
    match std::env::var(MAX_LAYER_SIZE_VAR) {
        Ok(v) if !v.trim().is_empty() => {
            let bytes = parse_size(v.trim()).ok_or_else(|| UnpackError::Image {
                image: format!("{MAX_LAYER_SIZE_VAR}={v}"),
                reason: "not a size: write bytes, or a number with K, M, G or T (0: no bound)".into(),
            })?;
            Ok(ExpansionLimit { bytes: if bytes == 0 { u64::MAX } else { bytes }, blob: None })
        }
        _ => Ok(ExpansionLimit { bytes: blob.saturating_mul(DEFAULT_EXPANSION).max(EXPANSION_FLOOR), blob: Some(blob) }),
    }
}

/// `123`, `64K`, `8M`, `2G`, `1T` (powers of 1024; a trailing `B` or `iB` is allowed).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim_end_matches('B').trim_end_matches('i');
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        b'T' | b't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

impl ExpansionLimit {
    fn exceeded(&self, description: &str) -> UnpackError {
        let why = match self.blob {
            Some(blob) => format!(
                "the bound for its {} blob ({DEFAULT_EXPANSION} times it, at least {})",
                crate::text::human(blob),
                crate::text::human(EXPANSION_FLOOR)
            ),
            None => format!("the bound {MAX_LAYER_SIZE_VAR} sets"),
        };
        UnpackError::Image {
            image: description.to_owned(),
            reason: format!(
                "it expands to more than {}, {why}: stopped, and nothing of it is kept; if the image is what you expect, allow it with {MAX_LAYER_SIZE_VAR}=SIZE (e.g. 64G; 0 for no bound)",
                crate::text::human(self.bytes)
            ),
        }
    }
}

/// The uncompressed tar, refused past `left` more bytes: the first byte past the bound fails the
/// read and sets `over`.
struct Bounded<R> {
    inner: R,
    left: u64,
    over: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // At the bound: fine if the stream ends here.
            if buf.is_empty() || self.inner.read(&mut [0u8; 1])? == 0 {
                return Ok(0);
            }
            self.over.set(true);
            return Err(std::io::Error::other("the layer is larger than its bound"));
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

struct Image<'a> {
    dir: &'a Path,
    name: &'a str,
}

impl Image<'_> {
    fn blob_path(&self, digest: &str) -> Result<PathBuf, UnpackError> {
        check_digest(self.name, digest)?;
        Ok(self.dir.join("blobs/sha256").join(&digest["sha256:".len()..]))
    }

    fn open_blob(&self, digest: &str) -> Result<File, UnpackError> {
        let path = self.blob_path(digest)?;
        File::open(&path).map_err(|source| UnpackError::Open { path, source })
    }

    fn json_blob<T: serde::de::DeserializeOwned>(&self, desc: &Descriptor, what: &str) -> Result<T, UnpackError> {
        let file = self.open_blob(&desc.digest)?;
        read_json_verified(file, &format!("{} {what} {}", self.name, desc.digest), &desc.digest)
    }

    /// Picks the image manifest descriptor from `manifests`: by tag (top level only), then the one
    /// for this platform, or the only one; follows nested indexes.
    fn select(&self, manifests: Vec<Descriptor>, tag: Option<&str>, depth: u32) -> Result<Manifest, UnpackError> {
        let image_err = |reason: String| UnpackError::Image { image: self.name.to_owned(), reason };
        if depth > 4 {
            return Err(image_err("image indexes are nested too deeply".into()));
        }
        let mut candidates = manifests;
        if let Some(tag) = tag {
            let tags: Vec<String> = candidates.iter().filter_map(|d| d.annotations.get(REF_NAME).cloned()).collect();
            candidates.retain(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(tag));
            if candidates.is_empty() {
                return Err(image_err(format!("no image tagged '{tag}' (tags: {})", list(&tags))));
            }
        }
        let chosen = if candidates.len() == 1 {
            candidates.remove(0)
        } else {
            let arch = crate::oci::host_platform().architecture;
            let pos = candidates
                .iter()
                .position(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch));
            match pos {
                Some(i) => candidates.swap_remove(i),
                None if candidates.is_empty() => return Err(image_err("the index lists no manifests".into())),
                None => {
                    let tags: Vec<String> = candidates.iter().filter_map(|d| d.annotations.get(REF_NAME).cloned()).collect();
                    return Err(image_err(format!(
                        "{} manifests and none for linux/{arch}; choose one with oci:DIR:TAG (tags: {})",
                        candidates.len(),
                        list(&tags)
                    )));
                }
            }
        };
        let manifest: Manifest = self.json_blob(&chosen, "manifest")?;
        let nested = INDEX_TYPES.contains(&chosen.media_type.as_str())
            || INDEX_TYPES.contains(&manifest.media_type.as_str())
            || (manifest.config.is_none() && manifest.manifests.is_some());
        if nested {
            return self.select(manifest.manifests.unwrap_or_default(), None, depth + 1);
        }
        Ok(manifest)
    }
}

fn list(tags: &[String]) -> String {
    if tags.is_empty() {
        "none".to_owned()
    } else {
        tags.join(", ")
    }
}

/// Unpacks `oci:path` (`name` is the source as written, for messages).
pub(super) fn unpack(path: &Path, name: &str, ownership: Ownership, progress: &mut Progress, sink: &mut dyn LayerSink) -> anyhow::Result<()> {
    let (dir, tag) = split_tag(path);
    let image = Image { dir: &dir, name };
    let layout_path = dir.join("oci-layout");
    let layout_file = File::open(&layout_path).map_err(|source| UnpackError::Open { path: layout_path.clone(), source })?;
    let layout: Layout = read_json(layout_file, &layout_path.display().to_string())?;
    if !layout.image_layout_version.starts_with("1.") {
        return Err(UnpackError::Image { image: name.to_owned(), reason: format!("unsupported imageLayoutVersion {}", layout.image_layout_version) }.into());
    }
    let index_path = dir.join("index.json");
    let index_file = File::open(&index_path).map_err(|source| UnpackError::Open { path: index_path.clone(), source })?;
    let index: Index = read_json(index_file, &index_path.display().to_string())?;

    let manifest = image.select(index.manifests, tag.as_deref(), 0)?;
    let config_desc = manifest
        .config
        .ok_or_else(|| UnpackError::Image { image: name.to_owned(), reason: "the manifest has no config".into() })?;
    let config: Config = image.json_blob(&config_desc, "config")?;
    let layers = manifest.layers;
    check_layer_count(name, layers.len(), config.rootfs.diff_ids.len())?;

    // Check everything cheap before the first stage, so a bad image fails before any work.
    for layer in &layers {
        check_digest(name, &layer.digest)?;
        if !layer_type_supported(&layer.media_type) {
            return Err(UnpackError::Image { image: name.to_owned(), reason: format!("layer {} has unsupported media type {}", layer.digest, layer.media_type) }.into());
        }
    }

    let n = layers.len();
    for (i, (layer, diff_id)) in layers.into_iter().zip(config.rootfs.diff_ids).enumerate() {
        let description = format!("{name} layer {}/{n} ({})", i + 1, layer.digest);
        progress.set_label(&format!("{name} layer {}/{n}", i + 1));
        let reader = image.open_blob(&layer.digest)?;
        unpack_layer(LayerBlob { reader, digest: Some(layer.digest), size: layer.size, diff_id, description, index: false }, ownership, progress, sink)?;
    }
    progress.finish();
    Ok(())
}

/// The digests a verified registry layer is known by: its blob's and its diff_id.
fn registry_aliases(diff_id: String, blob: &str) -> Vec<String> {
    if blob == diff_id {
        vec![diff_id]
    } else {
        vec![blob.to_owned(), diff_id]
    }
}

/// The manifest's layers and the config's diff_ids agree, and there is at least one: an image
/// of no layers has no files to import, and "imported" with no id would be a silent nothing.
pub(super) fn check_layer_count(name: &str, layers: usize, diff_ids: usize) -> Result<(), UnpackError> {
    if layers == 0 && diff_ids == 0 {
        return Err(UnpackError::Image { image: name.to_owned(), reason: "the image has no layers: there are no files to import".into() });
    }
    if layers == diff_ids {
        Ok(())
    } else {
        Err(UnpackError::Image {
            image: name.to_owned(),
            reason: format!("the manifest lists {layers} layers but the config's rootfs.diff_ids has {diff_ids}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::source::testutil::{check_two_layers, config_json, gzip, sha256, two_layers, zstd, DirSink};
    use crate::source::{unpack as unpack_source, Source};

    use crate::oci::{MEDIA_INDEX as INDEX, MEDIA_MANIFEST as MANIFEST};

    /// Writes `data` as a blob and returns its descriptor.
    fn blob(dir: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
        let digest = sha256(data);
        fs::write(dir.join("blobs/sha256").join(&digest[7..]), data).unwrap();
        json!({ "mediaType": media_type, "digest": digest, "size": data.len() })
    }

    /// An image manifest for [`two_layers`] (gzip, then zstd); returns its descriptor.
    fn image(dir: &Path, diff_ids: Option<Vec<String>>) -> serde_json::Value {
        let (first, second) = two_layers();
        let diff_ids = diff_ids.unwrap_or_else(|| vec![sha256(&first), sha256(&second)]);
        let config = blob(dir, "application/vnd.oci.image.config.v1+json", &config_json(&diff_ids));
        let layers = [
            blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", &gzip(&first)),
            blob(dir, "application/vnd.oci.image.layer.v1.tar+zstd", &zstd(&second)),
        ];
        let manifest = json!({ "schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": layers });
        blob(dir, MANIFEST, &serde_json::to_vec(&manifest).unwrap())
    }

    fn layout(manifests: impl FnOnce(&Path) -> Vec<serde_json::Value>) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let manifests = manifests(dir);
        fs::write(dir.join("index.json"), serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": manifests })).unwrap()).unwrap();
        tmp
    }

    fn tagged(mut desc: serde_json::Value, tag: &str) -> serde_json::Value {
        desc["annotations"] = json!({ REF_NAME: tag });
        desc
    }

    fn run(src: &str) -> (anyhow::Result<()>, DirSink) {
        let mut sink = DirSink::new();
        let src: Source = src.parse().unwrap();
        let res = unpack_source(&src, Ownership::Record, &mut Progress::hidden(), &mut sink);
        (res, sink)
    }

    #[test]
    fn two_layers_with_whiteouts() {
        let img = layout(|d| vec![tagged(image(d, None), "v1")]);
        let (res, sink) = run(&format!("oci:{}", img.path().display()));
        res.unwrap();
        check_two_layers(&sink);
        let desc = &sink.finished[1].1.description;
        assert!(desc.contains("layer 2/2 (sha256:"), "{desc}");
    }

    #[test]
    fn selects_by_tag() {
        let img = layout(|d| vec![tagged(image(d, None), "v1"), tagged(image(d, Some(vec![])), "broken")]);
        let (res, sink) = run(&format!("oci:{}:v1", img.path().display()));
        res.unwrap();
        check_two_layers(&sink);
        let (res, _) = run(&format!("oci:{}:nope", img.path().display()));
        let msg = format!("{:#}", res.unwrap_err());
        assert!(msg.contains("nope") && msg.contains("v1, broken"), "{msg}");
        let (res, _) = run(&format!("oci:{}", img.path().display()));
        assert!(format!("{:#}", res.unwrap_err()).contains("oci:DIR:TAG"));
    }

    #[test]
    fn follows_nested_index_to_host_platform() {
        let img = layout(|d| {
            let mut host = image(d, None);
            host["platform"] = json!({ "os": "linux", "architecture": crate::oci::host_platform().architecture });
            let mut other = image(d, Some(vec![]));
            other["platform"] = json!({ "os": "linux", "architecture": "s390x-not-this-one" });
            let nested = json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": [other, host] });
            vec![blob(d, INDEX, &serde_json::to_vec(&nested).unwrap())]
        });
        let (res, sink) = run(&format!("oci:{}", img.path().display()));
        res.unwrap();
        check_two_layers(&sink);
    }

    #[test]
    fn corrupt_blob_is_named_and_nothing_finished() {
        for flip in [true, false] {
            corrupt_blob(flip);
        }
    }

    fn corrupt_blob(flip: bool) {
        let (first, _) = two_layers();
        let mut bad = String::new();
        let img = layout(|d| {
            let desc = image(d, None);
            // Corrupt the first layer blob in place, keeping its name.
            let manifest: serde_json::Value = serde_json::from_slice(&fs::read(d.join("blobs/sha256").join(&desc["digest"].as_str().unwrap()[7..])).unwrap()).unwrap();
            bad = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
            let mut tampered = gzip(&first);
            if flip {
                let mid = tampered.len() / 2;
                tampered[mid] ^= 0x55;
            } else {
                tampered.extend_from_slice(b"trailing junk");
            }
            fs::write(d.join("blobs/sha256").join(&bad[7..]), tampered).unwrap();
            vec![desc]
        });
        let (res, sink) = run(&format!("oci:{}", img.path().display()));
        let msg = format!("{:#}", res.unwrap_err());
        assert!(msg.contains(&bad) && msg.contains("corrupt"), "{msg}");
        assert!(sink.finished.is_empty());
    }

    #[test]
    fn wrong_diff_id_is_an_error() {
        let wrong = format!("sha256:{}", "0".repeat(64));
        let img = layout(|d| vec![image(d, Some(vec![wrong.clone(), wrong.clone()]))]);
        let (res, sink) = run(&format!("oci:{}", img.path().display()));
        let msg = format!("{:#}", res.unwrap_err());
        assert!(msg.contains("diff_id") && msg.contains(&wrong), "{msg}");
        assert!(sink.finished.is_empty());
    }

    #[test]
    fn sizes_and_the_expansion_bound() {
        for (text, bytes) in [("0", Some(0)), ("4096", Some(4096)), ("64K", Some(64 << 10)), ("8M", Some(8 << 20)), ("8MiB", Some(8 << 20)), ("2g", Some(2 << 30)), ("1T", Some(1 << 40)), ("", None), ("M", None), ("lots", None), ("-1", None), ("99999999999T", None)] {
            assert_eq!(parse_size(text), bytes, "{text:?}");
        }
        // The tar as it is, up to the bound; one byte past it is refused.
        let data = vec![7u8; 1000];
        for (left, ok) in [(1000, true), (2000, true), (999, false), (0, false)] {
            let over = std::rc::Rc::new(std::cell::Cell::new(false));
            let mut r = Bounded { inner: &data[..], left, over: over.clone() };
            let mut out = Vec::new();
            assert_eq!(r.read_to_end(&mut out).is_ok(), ok, "{left}");
            assert_eq!(over.get(), !ok, "{left}");
            assert!(out.len() as u64 <= left);
        }
        if std::env::var_os(MAX_LAYER_SIZE_VAR).is_none() {
            assert_eq!(expansion_limit(1 << 20).unwrap().bytes, EXPANSION_FLOOR, "a small blob: the floor");
            assert_eq!(expansion_limit(10 << 20).unwrap().bytes, (10 << 20) * DEFAULT_EXPANSION);
            assert_eq!(expansion_limit(u64::MAX).unwrap().bytes, u64::MAX, "no overflow");
        }
    }

    #[test]
    fn malformed_digest_is_refused() {
        let img = layout(|_| vec![json!({ "mediaType": MANIFEST, "digest": "sha256:../../../etc/passwd", "size": 1 })]);
        let (res, sink) = run(&format!("oci:{}", img.path().display()));
        assert!(format!("{:#}", res.unwrap_err()).contains("malformed digest"));
        assert!(sink.staged.is_empty());
    }
}
