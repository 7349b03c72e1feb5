//! Test helpers shared by the source tests: building tar archives (hostile ones included, with
//! raw header bytes where the `tar` crate refuses), and a [`LayerSink`] over a temp directory.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use super::{LayerSink, Unpacked};

pub(crate) fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Builds tar archives entry by entry.
pub(crate) struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

pub(crate) const MTIME: u64 = 1_600_000_000;

impl TarBuilder {
    pub(crate) fn new() -> Self {
        Self { b: tar::Builder::new(Vec::new()) }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    pub(crate) fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_owned(path, mode, data, (0, 0))
    }

    pub(crate) fn file_owned(&mut self, path: &str, mode: u32, data: &[u8], (uid, gid): (u64, u64)) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    pub(crate) fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub(crate) fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub(crate) fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub(crate) fn node(&mut self, path: &str, kind: tar::EntryType, mode: u32, dev: (u32, u32), owner: (u64, u64)) -> &mut Self {
        let mut h = Self::header(kind, mode, 0);
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// PAX records that apply to the next entry.
    pub(crate) fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.b.append_pax_extensions(records.iter().copied()).unwrap();
        self
    }

    /// An entry whose name bytes are written as given, bypassing the crate's path checks.
    pub(crate) fn raw(&mut self, name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) -> &mut Self {
        let mut h = Self::header(kind, 0o644, data.len() as u64);
        let slot = &mut h.as_old_mut().name;
        slot.fill(0);
        slot[..name.len()].copy_from_slice(name);
        if !link.is_empty() {
            h.set_link_name_literal(link).unwrap();
        }
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

/// A sink that stages layers as numbered directories under a temp dir.
pub(crate) struct DirSink {
    pub base: tempfile::TempDir,
    pub staged: Vec<PathBuf>,
    pub finished: Vec<(PathBuf, Unpacked)>,
}

impl DirSink {
    pub(crate) fn new() -> Self {
        Self { base: tempfile::tempdir().unwrap(), staged: Vec::new(), finished: Vec::new() }
    }
}

impl LayerSink for DirSink {
    fn stage(&mut self) -> anyhow::Result<OwnedFd> {
        let path = self.base.path().join(self.staged.len().to_string());
        fs::create_dir(&path)?;
        self.staged.push(path.clone());
        Ok(open_dir(&path))
    }

    fn finish(&mut self, _stage: OwnedFd, unpacked: Unpacked) -> anyhow::Result<()> {
        let path = self.staged.last().unwrap().clone();
        self.finished.push((path, unpacked));
        Ok(())
    }
}

pub(crate) fn open_dir(path: &Path) -> OwnedFd {
    rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap()
}

pub(crate) fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

pub(crate) fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 1).unwrap()
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Two layers: the first has `etc/a`, `etc/b`, `o/old`; the second whites out `etc/a`, makes `o`
/// opaque and adds `o/new`.
pub(crate) fn two_layers() -> (Vec<u8>, Vec<u8>) {
    let first = TarBuilder::new()
        .dir("etc", 0o755)
        .file("etc/a", 0o644, b"a")
        .file("etc/b", 0o644, b"b")
        .dir("o", 0o755)
        .file("o/old", 0o644, b"old")
        .finish();
    let second = TarBuilder::new()
        .file("etc/.wh.a", 0o644, b"")
        .file("o/.wh..wh..opq", 0o644, b"")
        .file("o/new", 0o644, b"new")
        .finish();
    (first, second)
}

pub(crate) fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap()
}

/// Checks what [`two_layers`] must leave in two stages.
pub(crate) fn check_two_layers(sink: &DirSink) {
    assert_eq!(sink.finished.len(), 2);
    let (first, second) = (&sink.finished[0].0, &sink.finished[1].0);
    assert_eq!(fs::read(first.join("etc/a")).unwrap(), b"a");
    assert_eq!(fs::read(first.join("o/old")).unwrap(), b"old");
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = fs::symlink_metadata(second.join("etc/a")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert!(!second.join("etc/b").exists());
    assert_eq!(fs::read(second.join("o/new")).unwrap(), b"new");
    let mut buf = [0u8; 8];
    let n = rustix::fs::getxattr(second.join("o"), "user.overlay.opaque", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"y");
}
