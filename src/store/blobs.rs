//! The blob index: which layer a registry blob unpacks to, so that a pull skips the layers the
//! store already holds, and which gzip blob `push` made of a layer, so that a second push asks
//! the registry about it without compressing anything.
//!
//! ```text
//! blobs/<hex>          "sha256:<layer hex>\n": the layer that the blob (a compressed layer, or an
//!                      image's uncompressed diff_id) with digest sha256:<hex> unpacks to
//! blobs/gzip/<hex>     "sha256:<blob hex> <size>\n": the gzip blob push made of layer sha256:<hex>
//! blobs/files/<hex>    "sha256:<layer hex>\n" per layer, bottom first: the layers a local file
//!                      (`tar:FILE`) unpacked to, <hex> the sha256 of its kind and [`FileStamp`]
//! ```
//!
//! Entries are written atomically and only after their layer is published; an entry whose layer
//! was collected since is ignored (and overwritten by the next import of that blob). gc removes
//! the file records whose layers it collected.
//!
//! A local file is known by its stamp (device, inode, size, mtime and ctime, to the nanosecond),
//! not by its content: reading a Debian root again only to learn that it is the same costs
//! seconds. Any write to the file changes its ctime, which no user can set back, so a file whose
//! stamp is unchanged has the content that was imported. Only a stamp whose ctime was already
//! [`SETTLED`] in the past when the import began is recorded: a write in the same clock tick as
//! the last one would otherwise leave the stamp as it was (git's "racily clean" index entries).

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::{write_atomic, Store};

/// The hex part of a well-formed `sha256:HEX` digest (which then cannot name a path outside).
fn hex_of(digest: &str) -> Option<&str> {
    digest.strip_prefix("sha256:").filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// How long before an import a file's last change must lie for its stamp to be recorded: more
/// than a filesystem's timestamp granularity (FAT's 2 s) plus the lag of the coarse clock the
/// kernel stamps files with.
pub(crate) const SETTLED: Duration = Duration::from_secs(3);

/// What identifies a local file's content without reading it (see the module header).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub(crate) fn of(st: &rustix::fs::Stat) -> FileStamp {
        FileStamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime, st.st_ctime_nsec as i64),
        }
    }

    pub(crate) fn of_metadata(m: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp { dev: m.dev(), ino: m.ino(), size: m.size() as i64, mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()) }
    }

    /// Whether the file last changed at least [`SETTLED`] before `now`.
    pub(crate) fn settled(&self, now: SystemTime) -> bool {
        let Ok(now) = now.duration_since(SystemTime::UNIX_EPOCH) else { return false };
        let Ok(ctime) = u64::try_from(self.ctime.0) else { return false };
        Duration::new(ctime, self.ctime.1.clamp(0, 999_999_999) as u32) + SETTLED <= now
    }

    /// The index file's name for a file of `kind` (a source kind: the same file read as another
    /// kind is other layers).
    fn name(&self, kind: &str) -> String {
        let FileStamp { dev, ino, size, mtime, ctime } = self;
        let text = format!("{kind}\0{dev}\0{ino}\0{size}\0{}.{:09}\0{}.{:09}", mtime.0, mtime.1, ctime.0, ctime.1);
        hex::encode(Sha256::digest(text.as_bytes()))
    }
}

impl Store {
    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
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

    /// The layers, bottom first, that a file of `kind` with this stamp was imported as; `None`
    /// when it was not, or one of them is no longer in the store.
    pub(crate) fn layers_for_file(&self, kind: &str, stamp: &FileStamp) -> Option<Vec<String>> {
        let text = fs::read_to_string(self.blobs_dir().join("files").join(stamp.name(kind))).ok()?;
        let ids: Vec<String> = text.lines().map(str::to_owned).collect();
        (!ids.is_empty() && ids.iter().all(|id| self.has_layer(id))).then_some(ids)
    }

    /// Records that a file of `kind` with this stamp unpacks to `ids` (published layers).
    pub(crate) fn record_file(&self, kind: &str, stamp: &FileStamp, ids: &[String]) -> Result<()> {
        let dir = self.blobs_dir().join("files");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
        write_atomic(&dir.join(stamp.name(kind)), text.as_bytes())
    }

    /// Removes the records of local files whose layers are not all in the store any more (gc,
    /// after collecting): they would never be used again, and a file rebuilt often leaves one per
    /// version. Best effort, like the index itself.
    pub(crate) fn prune_file_index(&self) {
        let Ok(rd) = fs::read_dir(self.blobs_dir().join("files")) else { return };
        for e in rd.flatten() {
            let Ok(text) = fs::read_to_string(e.path()) else { continue };
            if text.lines().any(|id| !self.has_layer(id)) {
                let _ = fs::remove_file(e.path());
            }
        }
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

#[cfg(test)]
mod file_tests {
    use super::*;

    fn stamp(ino: u64, ctime: i64) -> FileStamp {
        FileStamp { dev: 1, ino, size: 10, mtime: (ctime, 0), ctime: (ctime, 5) }
    }

    #[test]
    fn files_map_to_present_layers_only() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let ids = [format!("sha256:{}", "a".repeat(64)), format!("sha256:{}", "c".repeat(64))];
        s.record_file("tar", &stamp(7, 100), &ids).unwrap();
        assert_eq!(s.layers_for_file("tar", &stamp(7, 100)), None, "the layers are not in the store");
        for id in &ids {
            fs::create_dir_all(s.layer_dir(id)).unwrap();
            fs::write(s.layer_dir(id).join("layer.json"), "{}").unwrap();
        }
        assert_eq!(s.layers_for_file("tar", &stamp(7, 100)), Some(ids.to_vec()));
        assert_eq!(s.layers_for_file("docker-archive", &stamp(7, 100)), None, "another kind");
        assert_eq!(s.layers_for_file("tar", &stamp(8, 100)), None, "another inode");
        assert_eq!(s.layers_for_file("tar", &stamp(7, 101)), None, "another ctime");
        let mut nanos = stamp(7, 100);
        nanos.ctime.1 = 6;
        assert_eq!(s.layers_for_file("tar", &nanos), None, "another ctime, to the nanosecond");
        s.record_file("tar", &stamp(9, 100), &ids[..1]).unwrap();
        fs::remove_dir_all(s.layer_dir(&ids[1])).unwrap();
        assert_eq!(s.layers_for_file("tar", &stamp(7, 100)), None, "one layer was removed");
        s.prune_file_index();
        let left: Vec<_> = fs::read_dir(s.blobs_dir().join("files")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from(stamp(9, 100).name("tar"))], "gc keeps the record whose layers remain");
    }

    #[test]
    fn only_settled_stamps_count() {
        let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        assert!(stamp(1, 100).settled(at(104)));
        assert!(!stamp(1, 100).settled(at(102)), "changed 2 s before");
        assert!(!stamp(1, 100).settled(at(50)), "changed in the future");
        assert!(!stamp(1, -5).settled(at(50)));
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
