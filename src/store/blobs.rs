//! The blob index: which layer a registry blob unpacks to, so that a pull skips the layers the
//! store already holds, and which gzip blob `push` made of a layer, so that a second push asks
//! the registry about it without compressing anything.
//!
//! ```text
//! blobs/<hex>          "sha256:<layer hex>\n": the layer that the blob (a compressed layer, or an
//!                      image's uncompressed diff_id) with digest sha256:<hex> unpacks to
//! blobs/gzip/<hex>     "sha256:<blob hex> <size>\n": the gzip blob push made of layer sha256:<hex>
//! ```
//!
//! Entries are written atomically and only after their layer is published; an entry whose layer
//! was collected since is ignored (and overwritten by the next import of that blob).

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{write_atomic, Store};

/// The hex part of a well-formed `sha256:HEX` digest (which then cannot name a path outside).
fn hex_of(digest: &str) -> Option<&str> {
    digest.strip_prefix("sha256:").filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

impl Store {
    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    #[cfg(feature = "registry")]
    fn has_layer(&self, id: &str) -> bool {
        hex_of(id).is_some() && self.layer_dir(id).join("layer.json").is_file()
    }

    /// The layer in the store that a blob or diff_id with `digest` unpacks to: an index entry, or
    /// the digest itself when it is a layer id (a layer's canonical tar is its own diff_id).
    #[cfg(feature = "registry")]
    pub(crate) fn layer_for_blob(&self, digest: &str) -> Option<String> {
        let hex = hex_of(digest)?;
        if self.has_layer(digest) {
            return Some(digest.to_owned());
        }
        let id = fs::read_to_string(self.blobs_dir().join(hex)).ok()?;
        let id = id.trim();
        self.has_layer(id).then(|| id.to_owned())
    }

    /// Records that the blob `digest` unpacks to layer `id`.
    pub(crate) fn record_blob(&self, digest: &str, id: &str) -> Result<()> {
        let Some(hex) = hex_of(digest) else { return Ok(()) };
        if digest == id {
            return Ok(());
        }
        let dir = self.blobs_dir();
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(&dir.join(hex), format!("{id}\n").as_bytes())
    }

    /// The gzip blob (digest, size) push made of layer `id`.
    #[cfg(feature = "registry")]
    pub(crate) fn pushed_blob(&self, id: &str) -> Option<(String, u64)> {
        let text = fs::read_to_string(self.blobs_dir().join("gzip").join(hex_of(id)?)).ok()?;
        let (digest, size) = text.trim().split_once(' ')?;
        hex_of(digest)?;
        Some((digest.to_owned(), size.parse().ok()?))
    }

    #[cfg(feature = "registry")]
    pub(crate) fn record_pushed_blob(&self, id: &str, digest: &str, size: u64) -> Result<()> {
        let Some(hex) = hex_of(id) else { return Ok(()) };
        let dir = self.blobs_dir().join("gzip");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(&dir.join(hex), format!("{digest} {size}\n").as_bytes())?;
        self.record_blob(digest, id)
    }
}

#[cfg(all(test, feature = "registry"))]
mod tests {
    use super::*;

    #[test]
    fn index_maps_blobs_to_present_layers_only() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let id = format!("sha256:{}", "a".repeat(64));
        let blob = format!("sha256:{}", "b".repeat(64));
        s.record_blob(&blob, &id).unwrap();
        assert_eq!(s.layer_for_blob(&blob), None, "the layer is not in the store");
        fs::create_dir_all(s.layer_dir(&id)).unwrap();
        fs::write(s.layer_dir(&id).join("layer.json"), "{}").unwrap();
        assert_eq!(s.layer_for_blob(&blob), Some(id.clone()));
        assert_eq!(s.layer_for_blob(&id), Some(id.clone()), "a layer id is its own diff_id");
        assert_eq!(s.layer_for_blob("sha256:../../etc"), None);
        s.record_pushed_blob(&id, &blob, 42).unwrap();
        assert_eq!(s.pushed_blob(&id), Some((blob.clone(), 42)));
    }
}
