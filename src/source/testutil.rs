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

/// One tar header block written field by field, for what no archiver writes (blank numbers,
/// unknown types, sparse maps): `fields` are `(offset, bytes)` pairs over a GNU header.
pub(crate) fn raw_header(name: &[u8], flag: u8, size: u64, fields: &[(usize, &[u8])]) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(format!("{MTIME:011o}\0").as_bytes());
    h[156] = flag;
    h[257..265].copy_from_slice(b"ustar  \0");
    for (at, bytes) in fields {
        h[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    set_checksum(&mut h);
    h
}

pub(crate) fn set_checksum(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// Appends `data` padded to a block.
pub(crate) fn push_data(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// A pax extended header (`x`, or `g` for a global one) holding `records` in order.
pub(crate) fn pax_header(out: &mut Vec<u8>, flag: u8, records: &[(&str, &[u8])]) {
    let mut body = Vec::new();
    for (k, v) in records {
        let rest = k.len() + v.len() + 3;
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        body.extend_from_slice(format!("{len} {k}=").as_bytes());
        body.extend_from_slice(v);
        body.push(b'\n');
    }
    out.extend_from_slice(&raw_header(b"PaxHeader", flag, body.len() as u64, &[(257, b"ustar\x0000")]));
    push_data(out, &body);
}

/// An old GNU sparse member (`S`): `regions` of the file of `size` bytes, each region's data
/// starting on a block boundary as GNU tar writes them; more than four regions go to
/// extension blocks.
pub(crate) fn old_gnu_sparse(out: &mut Vec<u8>, name: &[u8], size: u64, regions: &[(u64, &[u8])]) {
    let entry = |offset: u64, len: usize| {
        let mut e = [0u8; 24];
        e[..12].copy_from_slice(&number12(offset));
        e[12..].copy_from_slice(&number12(len as u64));
        e
    };
    let stored: u64 = regions.iter().map(|(_, d)| (d.len() as u64).div_ceil(512) * 512).sum();
    let mut h = raw_header(name, b'S', stored, &[(483, &number12(size))]);
    for (i, (off, d)) in regions.iter().take(4).enumerate() {
        h[386 + i * 24..386 + (i + 1) * 24].copy_from_slice(&entry(*off, d.len()));
    }
    h[482] = u8::from(regions.len() > 4);
    set_checksum(&mut h);
    out.extend_from_slice(&h);
    let mut rest = regions.get(4..).unwrap_or_default();
    while !rest.is_empty() {
        let (now, later) = rest.split_at(rest.len().min(21));
        let mut ext = [0u8; 512];
        for (i, (off, d)) in now.iter().enumerate() {
            ext[i * 24..(i + 1) * 24].copy_from_slice(&entry(*off, d.len()));
        }
        ext[504] = u8::from(!later.is_empty());
        out.extend_from_slice(&ext);
        rest = later;
    }
    for (_, d) in regions {
        push_data(out, d);
    }
}

/// A 12-byte numeric field as GNU tar writes it: octal when it fits, else base-256.
pub(crate) fn number12(v: u64) -> [u8; 12] {
    let mut f = [0u8; 12];
    if v < 1 << 33 {
        f.copy_from_slice(format!("{v:011o}\0").as_bytes());
    } else {
        f[0] = 0x80;
        f[4..].copy_from_slice(&v.to_be_bytes());
    }
    f
}
