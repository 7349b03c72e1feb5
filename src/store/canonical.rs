//! The canonical tar serialization of a layer tree: what a layer's id is the sha256 of, what
//! `export` writes and what a registry push uploads (so a layer id is its OCI diff_id).
//!
//! Rules, all of them deterministic functions of the content:
//! - entries in depth-first order, each directory's children sorted by their emitted name's bytes;
//!   a directory comes before its children; the layer's root itself is not an entry;
//! - ustar headers with numeric owners only (no user/group names), permission bits incl.
//!   setuid/setgid/sticky, mtime in whole seconds (negative clamped to 0);
//! - a PAX extended header (named `PaxHeader`, all its own fields zero) precedes an entry when a
//!   name does not fit ustar, a number overflows it, or the entry has xattrs (`SCHILY.xattr.*`,
//!   keys sorted);
//! - overlayfs whiteouts (char 0:0) become `.wh.NAME`, opaque directories get a `.wh..wh..opq`
//!   child right after the directory entry; both have mode 0, owner 0:0, mtime 0;
//! - a regular file whose inode was already emitted becomes a hardlink to its first path;
//! - owners, xattrs and device nodes come from the layer's [`Overrides`] where the disk could not
//!   hold them; `user.overlay.*` and `security.selinux` (host-assigned) are never content.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::meta::{Device, Overrides};
use super::upper::{is_opaque, is_whiteout};

#[derive(Debug, thiserror::Error)]
pub(crate) enum CanonicalError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write the tar stream: {0}")]
    Write(#[source] io::Error),
}

/// What serializing a layer found.
#[derive(Clone, Debug, Default)]
pub(crate) struct Summary {
    /// `sha256:<hex>` of the canonical tar.
    pub id: String,
    /// Bytes of regular file content.
    pub size: u64,
    pub entries: u64,
}

/// Computes a tree's id without writing anything.
pub(crate) fn digest(root: &Path, ov: &Overrides) -> Result<Summary, CanonicalError> {
    write_tar(root, ov, &mut io::sink())
}

/// Writes the canonical tar of `root` to `out`, returning its digest and counts.
pub(crate) fn write_tar(root: &Path, ov: &Overrides, out: &mut dyn Write) -> Result<Summary, CanonicalError> {
    let mut w = Writer::new(out);
    w.tree(root, ov)?;
    w.finish()
}

/// The canonical serializer, one entry at a time. [`Writer::tree`] walks one layer tree in the
/// canonical order; `export` drives the same entry methods over a merged stack of layers, so
/// both write the one format a layer id is the digest of.
pub(crate) struct Writer<'a> {
    out: &'a mut dyn Write,
    hash: Sha256,
    links: HashMap<(u64, u64), String>,
    buf: Vec<u8>,
    summary: Summary,
    /// SOURCE_DATE_EPOCH: no entry's mtime is written later than this.
    mtime_max: Option<u64>,
}

enum Child<'a> {
    Disk(std::ffi::OsString),
    Device(&'a str, &'a Device),
}

/// One tar entry's header fields.
struct Entry<'e> {
    name: &'e [u8],
    mode: u32,
    owner: (u32, u32),
    size: u64,
    mtime: i64,
    kind: u8,
    link: &'e [u8],
    dev: (u32, u32),
    xattrs: &'e BTreeMap<String, Vec<u8>>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut dyn Write) -> Writer<'a> {
        Writer { out, hash: Sha256::new(), links: HashMap::new(), buf: vec![0; 1 << 20], summary: Summary::default(), mtime_max: None }
    }

    /// Clamps every mtime to `max` (reproducible builds' SOURCE_DATE_EPOCH).
    pub(crate) fn clamp_mtimes(&mut self, max: u64) {
        self.mtime_max = Some(max);
    }

    /// Ends the archive and returns its digest and counts.
    pub(crate) fn finish(mut self) -> Result<Summary, CanonicalError> {
        self.emit(&[0u8; 1024])?;
        let mut s = self.summary;
        s.id = format!("sha256:{}", hex::encode(self.hash.finalize()));
        Ok(s)
    }

    /// Writes every entry of the layer tree `root`, whose metadata is `ov`.
    pub(crate) fn tree(&mut self, root: &Path, ov: &Overrides) -> Result<(), CanonicalError> {
        let mut devices: HashMap<&str, Vec<(&str, &Device)>> = HashMap::new();
        for (path, o) in &ov.entries {
            if let Some(d) = &o.device {
                let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
                devices.entry(parent).or_default().push((name, d));
            }
        }
        self.dir(root, "", ov, &devices)
    }

    fn emit(&mut self, b: &[u8]) -> Result<(), CanonicalError> {
        self.hash.update(b);
        self.out.write_all(b).map_err(CanonicalError::Write)
    }

    fn dir(&mut self, abs: &Path, rel: &str, ov: &Overrides, devices: &HashMap<&str, Vec<(&str, &Device)>>) -> Result<(), CanonicalError> {
        let rd = fs::read_dir(abs).map_err(|e| CanonicalError::Read { path: shown(rel), source: e })?;
        let mut kids: Vec<(Vec<u8>, Child<'_>)> = Vec::new();
        for e in rd {
            let e = e.map_err(|e| CanonicalError::Read { path: shown(rel), source: e })?;
            let name = e.file_name();
            let is_whiteout = e.file_type().map(|t| t.is_char_device()).unwrap_or(false) && fs::symlink_metadata(e.path()).is_ok_and(|m| is_whiteout(&m));
            let emitted = if is_whiteout { [b".wh.", name.as_bytes()].concat() } else { name.as_bytes().to_vec() };
            kids.push((emitted, Child::Disk(name)));
        }
        if let Some(devs) = devices.get(rel) {
            for &(name, d) in devs {
                kids.push((name.as_bytes().to_vec(), Child::Device(name, d)));
            }
        }
        kids.sort_by(|a, b| a.0.cmp(&b.0));
        for (emitted, kid) in kids {
            let rel_kid = join(rel, OsStr::from_bytes(&emitted));
            match kid {
                Child::Device(name, d) => self.device(&join(rel, OsStr::new(name)), d, ov)?,
                Child::Disk(name) => {
                    let kid_abs = abs.join(&name);
                    let path = join(rel, &name);
                    let md = fs::symlink_metadata(&kid_abs).map_err(|e| CanonicalError::Read { path: path.clone(), source: e })?;
                    if is_whiteout(&md) {
                        self.marker(&rel_kid)?;
                        continue;
                    }
                    self.disk(&kid_abs, &path, &md, ov)?;
                    if md.is_dir() {
                        if is_opaque(&kid_abs) {
                            self.marker(&format!("{path}/.wh..wh..opq"))?;
                        }
                        self.dir(&kid_abs, &path, ov, devices)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A whiteout (`.wh.NAME`) or opaque (`.wh..wh..opq`) marker entry: mode 0, owner 0:0, mtime 0.
    pub(crate) fn marker(&mut self, name: &str) -> Result<(), CanonicalError> {
        self.header(&Entry { name: name.as_bytes(), mode: 0, owner: (0, 0), size: 0, mtime: 0, kind: b'0', link: b"", dev: (0, 0), xattrs: &BTreeMap::new() })
    }

    /// A device node that exists only in the layer's metadata.
    pub(crate) fn device(&mut self, path: &str, d: &Device, ov: &Overrides) -> Result<(), CanonicalError> {
        let xattrs = self.xattrs(None, path, ov);
        let kind = if d.kind == 'b' { b'4' } else { b'3' };
        let owner = ov.owner(path, (0, 0));
        self.header(&Entry { name: path.as_bytes(), mode: d.mode, owner, size: 0, mtime: d.mtime, kind, link: b"", dev: (d.major, d.minor), xattrs: &xattrs })
    }

    /// The entry for `abs` (not a whiteout; `md` is its lstat), named `path`, with the metadata
    /// `ov` of the layer it is in. A directory's own entry only: the caller walks its children.
    pub(crate) fn disk(&mut self, abs: &Path, path: &str, md: &fs::Metadata, ov: &Overrides) -> Result<(), CanonicalError> {
        let ft = md.file_type();
        let xattrs = self.xattrs(Some(abs), path, ov);
        let owner = ov.owner(path, (md.uid(), md.gid()));
        let mode = ov.mode(path, md.mode() & 0o7777);
        let mtime = md.mtime();
        self.summary.entries += 1;
        if ft.is_dir() {
            let name_slash = format!("{path}/");
            self.header(&Entry { name: name_slash.as_bytes(), mode, owner, size: 0, mtime, kind: b'5', link: b"", dev: (0, 0), xattrs: &xattrs })?;
        } else if ft.is_symlink() {
            let target = fs::read_link(abs).map_err(|e| CanonicalError::Read { path: path.to_owned(), source: e })?;
            self.header(&Entry { name: path.as_bytes(), mode, owner, size: 0, mtime, kind: b'2', link: target.as_os_str().as_bytes(), dev: (0, 0), xattrs: &xattrs })?;
        } else if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = self.links.get(&(md.dev(), md.ino())).cloned() {
                    return self.header(&Entry { name: path.as_bytes(), mode, owner, size: 0, mtime, kind: b'1', link: first.as_bytes(), dev: (0, 0), xattrs: &xattrs });
                }
                self.links.insert((md.dev(), md.ino()), path.to_owned());
            }
            self.header(&Entry { name: path.as_bytes(), mode, owner, size: md.len(), mtime, kind: b'0', link: b"", dev: (0, 0), xattrs: &xattrs })?;
            self.content(abs, path, md.len(), md.permissions().mode())?;
        } else if ft.is_fifo() {
            self.header(&Entry { name: path.as_bytes(), mode, owner, size: 0, mtime, kind: b'6', link: b"", dev: (0, 0), xattrs: &xattrs })?;
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() { b'3' } else { b'4' };
            let dev = (libc::major(md.rdev()), libc::minor(md.rdev()));
            self.header(&Entry { name: path.as_bytes(), mode, owner, size: 0, mtime, kind, link: b"", dev, xattrs: &xattrs })?;
        }
        // Sockets are not content: tar cannot hold them.
        Ok(())
    }

    fn xattrs(&self, abs: Option<&Path>, rel: &str, ov: &Overrides) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        if let Some(abs) = abs {
            for (k, v) in read_xattrs(abs) {
                if !k.starts_with("user.overlay.") && k != "security.selinux" {
                    out.insert(k, v);
                }
            }
        }
        if let Some(o) = ov.entries.get(rel) {
            for (k, v) in &o.xattrs {
                if let Ok(v) = hex::decode(v) {
                    out.insert(k.clone(), v);
                }
            }
        }
        out
    }

    fn content(&mut self, abs: &Path, rel: &str, len: u64, mode: u32) -> Result<(), CanonicalError> {
        let rerr = |e| CanonicalError::Read { path: rel.to_owned(), source: e };
        let open = || fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(abs);
        let mut f = match open() {
            Ok(f) => f,
            // A file with no read permission for its owner (mode 0000 in an unprivileged store):
            // lend ourselves read access for the copy, then put the mode back.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                fs::set_permissions(abs, fs::Permissions::from_mode(mode | 0o400)).map_err(rerr)?;
                let f = open();
                fs::set_permissions(abs, fs::Permissions::from_mode(mode)).map_err(rerr)?;
                f.map_err(rerr)?
            }
            Err(e) => return Err(rerr(e)),
        };
        let mut left = len;
        let mut buf = std::mem::take(&mut self.buf);
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = f.read(&mut buf[..want]).map_err(rerr)?;
            if n == 0 {
                // The file shrank while being read: the layer is not the immutable tree it must be.
                return Err(rerr(io::Error::new(io::ErrorKind::UnexpectedEof, "file changed while reading")));
            }
            self.emit(&buf[..n])?;
            left -= n as u64;
        }
        self.buf = buf;
        let pad = (512 - (len % 512) as usize) % 512;
        self.emit(&[0u8; 512][..pad])?;
        self.summary.size += len;
        Ok(())
    }

    fn header(&mut self, e: &Entry<'_>) -> Result<(), CanonicalError> {
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        const MAX7: u64 = 0o7777777;
        const MAX11: u64 = 0o77777777777;
        if e.name.len() > 100 {
            pax.push(("path".into(), e.name.to_vec()));
        }
        if e.link.len() > 100 {
            pax.push(("linkpath".into(), e.link.to_vec()));
        }
        if u64::from(e.owner.0) > MAX7 {
            pax.push(("uid".into(), e.owner.0.to_string().into_bytes()));
        }
        if u64::from(e.owner.1) > MAX7 {
            pax.push(("gid".into(), e.owner.1.to_string().into_bytes()));
        }
        if e.size > MAX11 {
            pax.push(("size".into(), e.size.to_string().into_bytes()));
        }
        for (k, v) in e.xattrs {
            pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
        }
        pax.sort_by(|a, b| a.0.cmp(&b.0));
        if !pax.is_empty() {
            let mut body = Vec::new();
            for (k, v) in &pax {
                body.extend_from_slice(&pax_record(k, v));
            }
            let h = ustar(b"PaxHeader", 0o644, (0, 0), body.len() as u64, 0, b'x', b"", (0, 0));
            self.emit(&h)?;
            let pad = (512 - body.len() % 512) % 512;
            body.resize(body.len() + pad, 0);
            self.emit(&body)?;
        }
        let mtime = e.mtime.max(0) as u64;
        let mtime = self.mtime_max.map_or(mtime, |max| mtime.min(max));
        let h = ustar(
            &e.name[..e.name.len().min(100)],
            e.mode,
            (e.owner.0.min(MAX7 as u32), e.owner.1.min(MAX7 as u32)),
            e.size.min(MAX11),
            mtime.min(MAX11),
            e.kind,
            &e.link[..e.link.len().min(100)],
            e.dev,
        );
        self.emit(&h)
    }
}

/// A PAX record: "<len> <key>=<value>\n" where len counts the whole record, its own digits too.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

#[allow(clippy::too_many_arguments)]
fn ustar(name: &[u8], mode: u32, owner: (u32, u32), size: u64, mtime: u64, kind: u8, link: &[u8], dev: (u32, u32)) -> [u8; 512] {
    fn octal(field: &mut [u8], v: u64) {
        let s = format!("{:0width$o}", v, width = field.len() - 1);
        field[..s.len()].copy_from_slice(s.as_bytes());
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], u64::from(owner.0));
    octal(&mut h[116..124], u64::from(owner.1));
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    if kind == b'3' || kind == b'4' {
        octal(&mut h[329..337], u64::from(dev.0));
        octal(&mut h[337..345], u64::from(dev.1));
    }
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// The entry name of `name` in the directory `rel` (`""` is the root).
pub(crate) fn join(rel: &str, name: &OsStr) -> String {
    let name = name.to_string_lossy();
    if rel.is_empty() {
        name.into_owned()
    } else {
        format!("{rel}/{name}")
    }
}

fn shown(rel: &str) -> String {
    if rel.is_empty() { ".".into() } else { rel.to_owned() }
}

/// All xattrs of a path (not following symlinks); unreadable ones are left out.
pub(crate) fn read_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; 1024];
    let n = match rustix::fs::llistxattr(path, &mut names) {
        Ok(0) | Err(_) => return Vec::new(),
        Ok(n) => n,
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else { continue };
        let mut val = vec![0u8; 256];
        loop {
            match rustix::fs::lgetxattr(path, name, &mut val) {
                Ok(len) => {
                    val.truncate(len);
                    out.push((name.to_owned(), val));
                    break;
                }
                Err(rustix::io::Errno::RANGE) if val.len() < 65536 => val.resize(val.len() * 4, 0),
                Err(_) => break,
            }
        }
    }
    out
}

/// Reads a file fully, for small metadata files.
#[allow(dead_code)]
pub(crate) fn read_small(path: &Path) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        for (k, v) in [("path", "a".repeat(5)), ("path", "b".repeat(92)), ("path", "c".repeat(993))] {
            let r = pax_record(k, v.as_bytes());
            let s = String::from_utf8(r.clone()).unwrap();
            let (len, _) = s.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), r.len(), "{s:?}");
        }
    }

    #[test]
    fn ustar_header_checksum_is_valid_and_tar_crate_reads_it() {
        let h = ustar(b"usr/bin/x", 0o4755, (0, 42), 3, 1_700_000_000, b'0', b"", (0, 0));
        let mut data = h.to_vec();
        data.extend_from_slice(b"abc");
        data.resize(1024, 0);
        data.extend_from_slice(&[0; 1024]);
        let mut ar = tar::Archive::new(&data[..]);
        let mut entries = ar.entries().unwrap();
        let e = entries.next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some("usr/bin/x"));
        assert_eq!(e.header().mode().unwrap(), 0o4755);
        assert_eq!(e.header().gid().unwrap(), 42);
        assert_eq!(e.header().mtime().unwrap(), 1_700_000_000);
    }

    #[test]
    fn same_tree_same_id_and_content_changes_id() {
        let t = tempfile::tempdir().unwrap();
        let mk = |root: &Path| {
            fs::create_dir_all(root.join("usr/bin")).unwrap();
            fs::write(root.join("usr/bin/tool"), b"hello").unwrap();
            std::os::unix::fs::symlink("tool", root.join("usr/bin/alias")).unwrap();
            fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool2")).unwrap();
            for p in ["usr/bin/tool", "usr/bin/alias", "usr/bin/tool2", "usr/bin", "usr"] {
                let tv = rustix::fs::Timespec { tv_sec: 1_600_000_000, tv_nsec: 0 };
                rustix::fs::utimensat(rustix::fs::CWD, &root.join(p), &rustix::fs::Timestamps { last_access: tv, last_modification: tv }, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
            }
        };
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        mk(&a);
        mk(&b);
        let ov = Overrides::default();
        let (da, db) = (digest(&a, &ov).unwrap(), digest(&b, &ov).unwrap());
        assert_eq!(da.id, db.id);
        assert_eq!(da.entries, 5);
        assert_eq!(da.size, 5);
        fs::write(b.join("usr/bin/new"), b"x").unwrap();
        assert_ne!(digest(&b, &ov).unwrap().id, da.id);
    }

    #[test]
    fn canonical_tar_round_trips_through_the_tar_crate() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let long = "d".repeat(120);
        fs::create_dir_all(root.join(&long)).unwrap();
        fs::write(root.join(&long).join("f"), b"data").unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, &root.join("gone"), rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::empty(), 0).unwrap();
        let mut ov = Overrides { flattened: true, ..Default::default() };
        ov.entry(&format!("{long}/f")).owner = Some((1000, 1000));
        ov.entry("dev/null").device = Some(Device { kind: 'c', major: 1, minor: 3, mode: 0o666, mtime: 5 });
        fs::create_dir(root.join("dev")).unwrap();
        let mut out = Vec::new();
        let s = write_tar(root, &ov, &mut out).unwrap();
        assert_eq!(s.id, format!("sha256:{}", hex::encode(Sha256::digest(&out))));
        let mut ar = tar::Archive::new(&out[..]);
        let got: Vec<(String, u64, u8)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().to_string_lossy().trim_end_matches('/').to_owned(), e.header().uid().unwrap(), e.header().entry_type().as_byte())
            })
            .collect();
        let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(names, vec![".wh.gone", &long, &format!("{long}/f"), "dev", "dev/null"]);
        assert_eq!(got[2].1, 1000, "owner override applies");
        assert_eq!(got[1].1, 0, "a flattened layer's default owner is root");
        assert_eq!(got[4].2, b'3', "the recorded device is emitted");
    }
}
