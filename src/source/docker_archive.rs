//! `docker-archive:FILE[:TAG]`: the tar that `docker save` and `podman save` write.
//!
//! `manifest.json` names the config and the layer files by their paths inside the archive (old
//! `<id>/layer.tar`, podman's `<hex>.tar`, or newer docker's OCI `blobs/sha256/<hex>`). The outer
//! tar is indexed once without reading file data (`entries_with_seek`), then each layer is
//! streamed from its offset in the file: nothing is extracted to disk or held in memory. Layers go
//! through the same verified path as OCI layers (`oci::unpack_layer`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Deserialize;

use super::error::UnpackError;
use super::oci::{check_layer_count, read_json, read_json_verified, unpack_layer, LayerBlob};
use super::stage::normalize;
use super::{split_tag, LayerSink};
use crate::oci::Config;
use crate::progress::Progress;
use crate::store::meta::Ownership;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ImageEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// What a member of the outer tar is, as far as finding layer data goes.
enum Member {
    Data { offset: u64, size: u64 },
    /// A symlink or hardlink to another member, as a normalized path in the archive.
    Link(Vec<u8>),
}

struct Archive<'a> {
    file: File,
    name: &'a str,
    members: HashMap<Vec<u8>, Member>,
}

impl Archive<'_> {
    fn err(&self, reason: String) -> UnpackError {
        UnpackError::Image { image: self.name.to_owned(), reason }
    }

    /// Offset and size of the data of the member at `path`, following links.
    fn locate(&self, path: &str) -> Result<(u64, u64), UnpackError> {
        let mut key = Vec::new();
        normalize(path.as_bytes(), &mut key).map_err(|r| self.err(format!("manifest.json names '{path}': {r}")))?;
        for _ in 0..16 {
            match self.members.get(&key) {
                Some(Member::Data { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Link(target)) => key.clone_from(target),
                None => return Err(self.err(format!("manifest.json names '{path}', which is not in the archive"))),
            }
        }
        Err(self.err(format!("'{path}' is a loop of links")))
    }

    fn member(&self, path: &str) -> Result<std::io::Take<&File>, UnpackError> {
        let (offset, size) = self.locate(path)?;
        let mut f = &self.file;
        f.seek(SeekFrom::Start(offset)).map_err(|e| UnpackError::read(self.name, e))?;
        Ok(f.take(size))
    }
}

/// Joins a symlink target onto the directory of the link, lexically (this only looks up names in
/// an index; nothing on disk is touched).
fn resolve_symlink(link: &[u8], target: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    if !target.starts_with(b"/") {
        parts.extend(link.split(|&b| b == b'/'));
        parts.pop();
    }
    for comp in target.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join(&b'/')
}

/// A digest implied by a member's name (`blobs/sha256/HEX`, or `HEX.json` for old configs).
fn digest_from_name(path: &str) -> Option<String> {
    let base = path.strip_prefix("blobs/sha256/").or_else(|| path.strip_suffix(".json"))?;
    let ok = base.len() == 64 && base.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then(|| format!("sha256:{base}"))
}

fn index(file: &File, name: &str) -> Result<HashMap<Vec<u8>, Member>, UnpackError> {
    let read_err = |e| UnpackError::read(name, e);
    let mut magic = [0u8; 4];
    let n = (&*file).read(&mut magic).map_err(read_err)?;
    if magic[..n].starts_with(&[0x1f, 0x8b]) || magic[..n] == [0x28, 0xb5, 0x2f, 0xfd] || magic[..n] == [0xfd, b'7', b'z', b'X'] {
        return Err(UnpackError::Image {
            image: name.to_owned(),
            reason: "the archive is compressed; decompress it first (docker-archive reads layers in place)".into(),
        });
    }
    (&*file).seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut members = HashMap::new();
    let mut archive = tar::Archive::new(file);
    let mut path = Vec::new();
    for entry in archive.entries_with_seek().map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if normalize(&entry.path_bytes(), &mut path).is_err() {
            continue;
        }
        let member = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                Member::Data { offset: entry.raw_file_position(), size: entry.size() }
            }
            tar::EntryType::Symlink => match entry.link_name_bytes() {
                Some(t) => Member::Link(resolve_symlink(&path, &t)),
                None => continue,
            },
            tar::EntryType::Link => match entry.link_name_bytes() {
                Some(t) => Member::Link(resolve_symlink(b"", &t)),
                None => continue,
            },
            _ => continue,
        };
        members.insert(path.clone(), member);
    }
    Ok(members)
}

/// Unpacks `docker-archive:path` (`name` is the source as written, for messages).
pub(super) fn unpack(path: &Path, name: &str, ownership: Ownership, progress: &mut Progress, sink: &mut dyn LayerSink) -> anyhow::Result<()> {
    let (file_path, tag) = split_tag(path);
    let file = File::open(&file_path).map_err(|source| UnpackError::Open { path: file_path.clone(), source })?;
    let members = index(&file, name)?;
    let archive = Archive { file, name, members };

    if !archive.members.contains_key(b"manifest.json".as_slice()) {
        // Without it this is some other tar: say what it is likely to be instead.
        let oci = archive.members.contains_key(b"index.json".as_slice()) && archive.members.contains_key(b"oci-layout".as_slice());
        let hint = if oci {
            "it holds an OCI image layout (index.json, oci-layout): extract it and import oci:DIR"
        } else {
            "for a root filesystem tarball use tar:FILE"
        };
        return Err(archive.err(format!("it has no manifest.json, so it is not a `docker save` / `podman save` archive; {hint}")).into());
    }
    let images: Vec<ImageEntry> = read_json(archive.member("manifest.json")?, &format!("{name}: manifest.json"))?;
    let all_tags = || images.iter().flat_map(|i| i.repo_tags.iter().flatten().cloned()).collect::<Vec<_>>().join(", ");
    let image = match tag {
        Some(tag) => images
            .iter()
            .find(|i| i.repo_tags.iter().flatten().any(|t| *t == tag || t.rsplit_once(':').is_some_and(|(_, t)| t == tag)))
            .ok_or_else(|| archive.err(format!("no image tagged '{tag}' (tags: {})", all_tags())))?,
        None => match images.as_slice() {
            [one] => one,
            [] => return Err(archive.err("manifest.json lists no images".into()).into()),
            _ => return Err(archive.err(format!("{} images; choose one with docker-archive:FILE:TAG (tags: {})", images.len(), all_tags())).into()),
        },
    };

    let config_what = format!("{name}: config {}", image.config);
    let config: Config = match digest_from_name(&image.config) {
        Some(digest) => read_json_verified(archive.member(&image.config)?, &config_what, &digest)?,
        None => read_json(archive.member(&image.config)?, &config_what)?,
    };
    check_layer_count(name, image.layers.len(), config.rootfs.diff_ids.len())?;

    // Progress counts uncompressed bytes (oci::unpack_layer), which the archive does not state.
    progress.set_total(None);

    let n = image.layers.len();
    for (i, (layer, diff_id)) in image.layers.iter().zip(config.rootfs.diff_ids).enumerate() {
        let description = format!("{name} layer {}/{n} ({layer})", i + 1);
        progress.set_label(&format!("{name} layer {}/{n}", i + 1));
        let size = archive.locate(layer)?.1;
        let reader = archive.member(layer)?;
        let blob = LayerBlob { reader, digest: digest_from_name(layer).filter(|_| layer.starts_with("blobs/")), size, diff_id, description, index: false };
        unpack_layer(blob, ownership, progress, sink)?;
    }
    progress.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::source::testutil::{check_two_layers, config_json, gzip, sha256, two_layers, DirSink, TarBuilder};
    use crate::source::{unpack as unpack_source, Source};

    /// A `docker save` archive of [`two_layers`]: the legacy layout (`<id>/layer.tar`, the second
    /// reached through a symlink, as docker writes for shared layers) or the OCI one.
    fn archive(oci_layout: bool, diff_ids: Option<Vec<String>>) -> tempfile::NamedTempFile {
        let (first, second) = two_layers();
        let diff_ids = diff_ids.unwrap_or_else(|| vec![sha256(&first), sha256(&second)]);
        let config = config_json(&diff_ids);
        let mut b = TarBuilder::new();
        let (config_path, layers) = if oci_layout {
            let (gz, cfg) = (gzip(&second), sha256(&config));
            let layers = vec![format!("blobs/sha256/{}", &sha256(&first)[7..]), format!("blobs/sha256/{}", &sha256(&gz)[7..])];
            b.file(&layers[0], 0o644, &first).file(&layers[1], 0o644, &gz);
            (format!("blobs/sha256/{}", &cfg[7..]), layers)
        } else {
            b.file("aaa/layer.tar", 0o644, &first).file("bbb/layer.tar", 0o644, &gzip(&second)).symlink("ccc/layer.tar", "../bbb/layer.tar");
            (format!("{}.json", &sha256(&config)[7..]), vec!["aaa/layer.tar".to_owned(), "ccc/layer.tar".to_owned()])
        };
        b.file(&config_path, 0o644, &config);
        let manifest = serde_json::json!([{ "Config": config_path, "RepoTags": ["img:latest"], "Layers": layers }]);
        b.file("manifest.json", 0o644, &serde_json::to_vec(&manifest).unwrap());
        let file = tempfile::NamedTempFile::new().unwrap();
        fs::write(file.path(), b.finish()).unwrap();
        file
    }

    fn run(src: &str) -> (anyhow::Result<()>, DirSink) {
        let mut sink = DirSink::new();
        let src: Source = src.parse().unwrap();
        let res = unpack_source(&src, Ownership::Record, &mut Progress::hidden(), &mut sink);
        (res, sink)
    }

    #[test]
    fn legacy_layout_with_symlinked_layer() {
        let file = archive(false, None);
        let (res, sink) = run(&format!("docker-archive:{}", file.path().display()));
        res.unwrap();
        check_two_layers(&sink);
        let (res, sink) = run(&format!("docker-archive:{}:latest", file.path().display()));
        res.unwrap();
        assert_eq!(sink.finished.len(), 2);
        let (res, _) = run(&format!("docker-archive:{}:other", file.path().display()));
        assert!(format!("{:#}", res.unwrap_err()).contains("img:latest"));
    }

    #[test]
    fn oci_layout_inside() {
        let file = archive(true, None);
        let (res, sink) = run(&format!("docker-archive:{}", file.path().display()));
        res.unwrap();
        check_two_layers(&sink);
    }

    #[test]
    fn wrong_diff_id_is_an_error() {
        let wrong = format!("sha256:{}", "f".repeat(64));
        let file = archive(false, Some(vec![wrong.clone(), wrong.clone()]));
        let (res, sink) = run(&format!("docker-archive:{}", file.path().display()));
        let msg = format!("{:#}", res.unwrap_err());
        assert!(msg.contains(&wrong) && msg.contains("layer 1/2"), "{msg}");
        assert!(sink.finished.is_empty());
    }

    #[test]
    fn compressed_outer_archive_is_refused_with_advice() {
        let file = archive(false, None);
        let gz = tempfile::NamedTempFile::new().unwrap();
        fs::write(gz.path(), gzip(&fs::read(file.path()).unwrap())).unwrap();
        let (res, _) = run(&format!("docker-archive:{}", gz.path().display()));
        assert!(format!("{:#}", res.unwrap_err()).contains("decompress it first"));
    }

    #[test]
    fn an_archive_without_manifest_json_says_so() {
        let (first, _) = two_layers();
        for (oci, hint) in [(false, "tar:FILE"), (true, "oci:DIR")] {
            let mut b = TarBuilder::new();
            b.file("etc/hostname", 0o644, b"x\n").file("layer.tar", 0o644, &first);
            if oci {
                b.file("index.json", 0o644, b"{}").file("oci-layout", 0o644, b"{}");
            }
            let file = tempfile::NamedTempFile::new().unwrap();
            fs::write(file.path(), b.finish()).unwrap();
            let (res, sink) = run(&format!("docker-archive:{}", file.path().display()));
            let msg = format!("{:#}", res.unwrap_err());
            assert!(msg.contains("no manifest.json") && msg.contains("docker save") && msg.contains(hint), "{msg}");
            assert!(!msg.contains("names 'manifest.json'"), "{msg}");
            assert!(sink.finished.is_empty());
        }
    }

    #[test]
    fn symlink_targets_resolve_lexically() {
        assert_eq!(resolve_symlink(b"ccc/layer.tar", b"../bbb/layer.tar"), b"bbb/layer.tar");
        assert_eq!(resolve_symlink(b"a/b", b"/x/./y"), b"x/y");
        assert_eq!(resolve_symlink(b"a", b"../../x"), b"x");
    }
}
