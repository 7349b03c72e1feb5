//! Conformance with GNU tar 1.34: whatever GNU tar extracts, plyroot imports with the same names,
//! types, sizes, modes, link targets, contents (and, as root, owners and device numbers), with
//! sparse files no larger on disk than GNU tar makes them; what GNU tar refuses, plyroot refuses
//! with an error naming the archive, leaving the store unchanged.
//!
//! The corpus: trees archived by GNU tar itself (`--format=gnu|oldgnu|pax|ustar|v7`, `-S` in
//! every sparse version, long names and link targets, xattrs, odd modes, hardlinks, symlinks,
//! FIFOs), and archives written byte by byte for what no archiver writes on purpose (GNU tar's
//! leniency, hand-made sparse maps, unenterable directories, damaged input). Each is extracted by
//! GNU tar and imported by plyroot, and the two trees are compared. Runs without namespaces, as any user; the
//! comparison covers what both can represent for that user (owners and devices only as root).

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------------------------
// Archives written byte by byte
// ---------------------------------------------------------------------------------------------

const GNU_MAGIC: &[u8] = b"ustar  \0";
const POSIX_MAGIC: &[u8] = b"ustar\x0000";

/// A tar stream written header by header, with every field under the test's control.
#[derive(Default, Clone)]
struct Raw(Vec<u8>);

/// One header's fields; `patch` overwrites bytes at offsets after the rest is laid out.
struct H<'a> {
    name: &'a [u8],
    flag: u8,
    mode: u32,
    size: u64,
    link: &'a [u8],
    magic: &'a [u8],
    patch: Vec<(usize, Vec<u8>)>,
}

fn h(name: &[u8], flag: u8) -> H<'_> {
    H { name, flag, mode: if flag == b'5' { 0o755 } else { 0o644 }, size: 0, link: b"", magic: GNU_MAGIC, patch: Vec::new() }
}

impl H<'_> {
    fn block(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..self.name.len().min(100)].copy_from_slice(&self.name[..self.name.len().min(100)]);
        b[100..108].copy_from_slice(format!("{:07o}\0", self.mode).as_bytes());
        b[108..116].copy_from_slice(b"0000000\0");
        b[116..124].copy_from_slice(b"0000000\0");
        b[124..136].copy_from_slice(&num12(self.size));
        b[136..148].copy_from_slice(format!("{MTIME:011o}\0").as_bytes());
        b[156] = self.flag;
        b[157..157 + self.link.len().min(100)].copy_from_slice(&self.link[..self.link.len().min(100)]);
        b[257..257 + self.magic.len()].copy_from_slice(self.magic);
        for (at, bytes) in &self.patch {
            b[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        checksum(&mut b);
        b
    }
}

fn checksum(b: &mut [u8; 512]) {
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// A 12-byte number as GNU tar writes it: octal when it fits, base-256 beyond.
fn num12(v: u64) -> [u8; 12] {
    let mut f = [0u8; 12];
    if v < 1 << 33 {
        f.copy_from_slice(format!("{v:011o}\0").as_bytes());
    } else {
        f[0] = 0x80;
        f[4..].copy_from_slice(&v.to_be_bytes());
    }
    f
}

impl Raw {
    fn header(mut self, h: H<'_>) -> Self {
        self.0.extend_from_slice(&h.block());
        self
    }
    fn data(mut self, d: &[u8]) -> Self {
        self.0.extend_from_slice(d);
        let pad = (512 - self.0.len() % 512) % 512;
        self.0.resize(self.0.len() + pad, 0);
        self
    }
    fn file(self, name: &str, d: &[u8]) -> Self {
        self.header(H { size: d.len() as u64, ..h(name.as_bytes(), b'0') }).data(d)
    }
    fn dir(self, name: &str, mode: u32) -> Self {
        self.header(H { mode, ..h(name.as_bytes(), b'5') })
    }
    fn long(self, flag: u8, value: &[u8]) -> Self {
        self.header(H { size: value.len() as u64, ..h(b"././@LongLink", flag) }).data(value)
    }
    /// A pax header: `x` (this member) or `g` (all after it).
    fn pax(self, flag: u8, records: &[(&str, &[u8])]) -> Self {
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
        self.header(H { size: body.len() as u64, magic: POSIX_MAGIC, ..h(b"PaxHeader", flag) }).data(&body)
    }
    /// An old GNU sparse member: the regions in the header and extension blocks, each region's
    /// data on a block boundary.
    fn old_sparse(self, name: &str, size: u64, regions: &[(u64, &[u8])]) -> Self {
        let entry = |off: u64, len: u64| [num12(off), num12(len)].concat();
        let stored: u64 = regions.iter().map(|(_, d)| (d.len() as u64).div_ceil(512) * 512).sum();
        let mut hd = H { size: stored, ..h(name.as_bytes(), b'S') };
        for (i, (off, d)) in regions.iter().take(4).enumerate() {
            hd.patch.push((386 + i * 24, entry(*off, d.len() as u64)));
        }
        hd.patch.push((482, vec![u8::from(regions.len() > 4)]));
        hd.patch.push((483, num12(size).to_vec()));
        let mut s = self.header(hd);
        let mut rest = regions.get(4..).unwrap_or_default();
        while !rest.is_empty() {
            let (now, later) = rest.split_at(rest.len().min(21));
            let mut ext = [0u8; 512];
            for (i, (off, d)) in now.iter().enumerate() {
                ext[i * 24..(i + 1) * 24].copy_from_slice(&entry(*off, d.len() as u64));
            }
            ext[504] = u8::from(!later.is_empty());
            s.0.extend_from_slice(&ext);
            rest = later;
        }
        for (_, d) in regions {
            s = s.data(d);
        }
        s
    }
    fn end(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0; 1024]);
        self.0
    }
}

// ---------------------------------------------------------------------------------------------
// The two trees, as data
// ---------------------------------------------------------------------------------------------

/// What both GNU tar's extraction and plyroot's layer say about one entry.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: char,
    mode: u32,
    size: u64,
    link: Option<Vec<u8>>,
    content: Option<String>,
    /// `user.*` xattrs: what any user can set.
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Owners and device numbers: compared as root only (an unprivileged GNU tar cannot set them).
    owner: Option<(u32, u32)>,
    rdev: Option<(u32, u32)>,
}

struct Tree {
    entries: BTreeMap<Vec<u8>, Entry>,
    /// Allocated bytes of each regular file.
    allocated: BTreeMap<Vec<u8>, u64>,
}

/// Reads a tree: `ov` is plyroot's layer metadata (`overrides.json`), `None` for GNU tar's tree.
/// Directories the current user cannot read (GNU tar's 000) are opened up after their mode is
/// noted: the tree is the test's own scratch.
fn read_tree(root: &Path, ov: Option<&serde_json::Value>) -> Tree {
    let root_user = me().uid == 0;
    let mut t = Tree { entries: BTreeMap::new(), allocated: BTreeMap::new() };
    fn walk(root: &Path, dir: &Path, ov: Option<&serde_json::Value>, root_user: bool, t: &mut Tree) {
        let mut kids: Vec<_> = fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())).map(|e| e.unwrap().path()).collect();
        kids.sort();
        for p in kids {
            let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let key = String::from_utf8_lossy(&rel).into_owned();
            let recorded = ov.and_then(|o| o["entries"].get(&key));
            let mut mode = md.mode() & 0o7777;
            if let Some(m) = recorded.and_then(|r| r["dir_mode"].as_u64()) {
                mode = m as u32;
            }
            let owner = root_user.then(|| match (ov, recorded.and_then(|r| r["owner"].as_array())) {
                (_, Some(o)) => (o[0].as_u64().unwrap() as u32, o[1].as_u64().unwrap() as u32),
                (Some(o), None) if o["flattened"] == true => (0, 0),
                _ => (md.uid(), md.gid()),
            });
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_file() {
                'f'
            } else if ft.is_fifo() {
                'p'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else {
                '?'
            };
            let mut xattrs = BTreeMap::new();
            let mut names = vec![0u8; 65536];
            if let Ok(n) = rustix::fs::llistxattr(&p, &mut names) {
                for name in names[..n].split(|&b| b == 0).filter(|n| n.starts_with(b"user.") && !n.starts_with(b"user.overlay.")) {
                    let mut v = vec![0u8; 65536];
                    let len = rustix::fs::lgetxattr(&p, std::ffi::OsStr::from_bytes(name), &mut v).unwrap();
                    xattrs.insert(name.to_vec(), v[..len].to_vec());
                }
            }
            if kind == 'f' {
                t.allocated.insert(rel.clone(), md.blocks() * 512);
            }
            let content = (kind == 'f').then(|| {
                if md.mode() & 0o400 == 0 && !root_user {
                    fs::set_permissions(&p, fs::Permissions::from_mode(md.mode() | 0o400)).unwrap();
                }
                let data = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                sha256_hex(&data)
            });
            let rdev = (kind == 'c' || kind == 'b').then(|| (libc::major(md.rdev()), libc::minor(md.rdev())));
            let link = (kind == 'l').then(|| fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec());
            t.entries.insert(rel, Entry { kind, mode, size: if kind == 'f' { md.len() } else { 0 }, link, content, xattrs, owner, rdev });
            if kind == 'd' {
                if !root_user && md.mode() & 0o500 != 0o500 {
                    fs::set_permissions(&p, fs::Permissions::from_mode(md.mode() | 0o700)).unwrap();
                }
                walk(root, &p, ov, root_user, t);
            }
        }
    }
    walk(root, root, ov, root_user, &mut t);
    // plyroot records devices it could not create (unprivileged): not in the disk tree, and not
    // in GNU tar's either (it cannot make them).
    t
}

fn sha256_hex(data: &[u8]) -> String {
    // A short, dependency-free content fingerprint is enough to compare; sha256 via the CLI
    // would cost a process per file.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    format!("{:016x}:{}", h.finish(), data.len())
}

/// Cases where a member replaces a non-empty directory: GNU tar does that only when told to
/// (`--recursive-unlink`), plyroot always does (a later entry wins, as in an OCI layer).
const REPLACES_DIRECTORIES: &[&str] = &["dir-then-file", "dir-then-symlink"];

/// GNU tar's extraction of `archive` into `dest`: exit status and stderr. Its default mode
/// otherwise: with `--recursive-unlink` it would also drop a file that a member hardlinks to itself.
fn gnu_extract(archive: &Path, dest: &Path, replace_dirs: bool) -> Out {
    fs::create_dir_all(dest).unwrap();
    let mut c = Command::new("tar");
    c.args(["-x", "-p", "--xattrs", "--xattrs-include=*"]);
    if replace_dirs {
        c.arg("--recursive-unlink");
    }
    if me().uid == 0 {
        c.args(["--numeric-owner", "--same-owner"]);
    }
    c.arg("-f").arg(archive).arg("-C").arg(dest).env("LC_ALL", "C");
    run_with(&mut c, None, TIMEOUT)
}

/// The layer directory of `id` in `s`.
fn layer_dir(s: &Store, id: &str) -> PathBuf {
    s.home.join("layers").join(id.trim_start_matches("sha256:"))
}

fn overrides(s: &Store, id: &str) -> Option<serde_json::Value> {
    fs::read(layer_dir(s, id).join("overrides.json")).ok().map(|d| serde_json::from_slice(&d).unwrap())
}

/// The layer tree `root`, where the test can read it: with subordinate ids its files are owned
/// by those ids (as the image gives them), so a copy made where they are root's (`plyroot
/// unshare`) and given to the user, every mode, mtime, xattr and hardlink kept.
fn readable(s: &Store, name: &str, root: &Path) -> PathBuf {
    if me().regime != Regime::SubIds {
        return root.to_owned();
    }
    let copy = s.path(&format!("copy-{name}"));
    let (u, g) = (me().uid, me().gid);
    let script = format!(
        "cp -a {0} {1} && find {1} -exec sh -c 'for f; do m=$(stat -c %a \"$f\"); chown -h {u}:{g} \"$f\"; [ -L \"$f\" ] || chmod \"$m\" \"$f\"; done' sh {{}} +",
        shell_quote(&root.to_string_lossy()),
        shell_quote(&copy.to_string_lossy())
    );
    as_owner(&["sh", "-c", &script]).ok();
    copy
}

/// Extracts `archive` with GNU tar and imports it with plyroot, and compares the trees; returns
/// the layer id. `Err` describes every difference.
fn compare(s: &Store, name: &str, archive: &Path) -> Result<String, String> {
    let gnu_dir = s.path(&format!("gnu-{name}"));
    let g = gnu_extract(archive, &gnu_dir, REPLACES_DIRECTORIES.contains(&name));
    let out = s.plyroot(&["import", &format!("tar:{}", archive.display())]);
    if out.code != 0 {
        return Err(format!("{name}: GNU tar extracts it (exit {}), plyroot refuses it: {out}", g.code));
    }
    let id = out.line();
    let ov = overrides(s, &id);
    let (gt, pt) = (read_tree(&gnu_dir, None), read_tree(&readable(s, name, &layer_dir(s, &id).join("root")), ov.as_ref()));
    let mut diffs = Vec::new();
    for (path, ge) in &gt.entries {
        let shown = String::from_utf8_lossy(path);
        match pt.entries.get(path) {
            None => diffs.push(format!("  {shown}: in GNU tar's tree only: {ge:?}")),
            Some(pe) if pe != ge => diffs.push(format!("  {shown}: GNU tar {ge:?}\n  {:w$}  plyroot {pe:?}", "", w = shown.len())),
            Some(_) => {}
        }
        if let (Some(ga), Some(pa)) = (gt.allocated.get(path), pt.allocated.get(path)) {
            if *pa > ga + 8192 {
                diffs.push(format!("  {shown}: plyroot allocates {pa} bytes, GNU tar {ga}"));
            }
        }
    }
    for path in pt.entries.keys().filter(|p| !gt.entries.contains_key(*p)) {
        diffs.push(format!("  {}: in plyroot's layer only: {:?}", String::from_utf8_lossy(path), pt.entries[path]));
    }
    if diffs.is_empty() {
        Ok(id)
    } else {
        Err(format!("{name}: plyroot's layer {id} differs from GNU tar's extraction (tar exit {}, {}):\n{}", g.code, g.stderr.trim(), diffs.join("\n")))
    }
}

/// Runs `compare` over every case and fails once, listing all the cases that differ.
fn compare_all(s: &Store, cases: &[(String, PathBuf)]) {
    let failures: Vec<String> = cases.iter().filter_map(|(name, p)| compare(s, name, p).err()).collect();
    assert!(failures.is_empty(), "{} of {} archives differ:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

fn write_case(s: &Store, name: &str, bytes: &[u8]) -> (String, PathBuf) {
    let p = s.path(&format!("{name}.tar"));
    fs::write(&p, bytes).unwrap();
    (name.to_owned(), p)
}

// ---------------------------------------------------------------------------------------------
// Trees for GNU tar to archive
// ---------------------------------------------------------------------------------------------

fn write(p: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Short names, files, directories, symlinks and hardlinks: what every format holds (v7 too).
fn simple_tree(root: &Path) {
    write(&root.join("etc/hostname"), b"conformance\n", 0o644);
    write(&root.join("etc/shadow"), b"root:*:1::::::\n", 0o640);
    write(&root.join("bin/tool"), &[0x7f, b'E', b'L', b'F', 1, 2, 3], 0o755);
    write(&root.join("empty"), b"", 0o600);
    write(&root.join("exactly-512"), &[b'x'; 512], 0o444);
    write(&root.join("data/big"), &(0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(), 0o644);
    fs::hard_link(root.join("bin/tool"), root.join("bin/tool-link")).unwrap();
    symlink("../etc/hostname", root.join("bin/hostname-link")).unwrap();
    symlink("/nonexistent/dangling", root.join("dangling")).unwrap();
    fs::create_dir_all(root.join("srv/empty-dir")).unwrap();
    set_mtimes(root, MTIME);
}

/// Everything GNU tar's own formats hold on top: long names (> 100 and > 256 bytes), long link
/// targets, odd modes, a FIFO, a non-UTF-8 name, user xattrs (pax only).
fn full_tree(root: &Path, xattrs: bool) {
    simple_tree(root);
    let long_dir = format!("usr/share/{}", "long-directory-name-".repeat(6));
    let long_file = format!("{long_dir}/{}", "f".repeat(150));
    write(&root.join(&long_file), b"at the end of a long path\n", 0o644);
    symlink(format!("../{}", "t".repeat(180)), root.join("long-target-link")).unwrap();
    fs::hard_link(root.join(&long_file), root.join("link-to-long")).unwrap();
    write(&root.join("suid"), b"#!/bin/sh\n", 0o4755);
    write(&root.join("sgid"), b"x", 0o2711);
    fs::create_dir(root.join("tmp")).unwrap();
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir(root.join("private")).unwrap();
    write(&root.join("private/f"), b"p", 0o600);
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    rustix::fs::mknodat(rustix::fs::CWD, root.join("fifo"), rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o640), 0).unwrap();
    fs::set_permissions(root.join("fifo"), fs::Permissions::from_mode(0o640)).unwrap();
    write(&root.join(std::ffi::OsStr::from_bytes(b"caf\xe9-latin1")), b"bytes", 0o644);
    if xattrs {
        for (k, v) in [("user.mime_type", &b"text/plain"[..]), ("user.binary", &[0u8, 1, 2, 255][..])] {
            rustix::fs::setxattr(root.join("etc/hostname"), k, v, rustix::fs::XattrFlags::empty()).unwrap();
        }
    }
    set_mtimes(root, MTIME);
}

/// Sparse files: data between holes, a file that is one hole, a file ending in data.
fn sparse_tree(root: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    fs::create_dir_all(root.join("var/log")).unwrap();
    let mut f = fs::File::create(root.join("var/log/lastlog")).unwrap();
    for (off, d) in [(0u64, &b"head"[..]), (1 << 20, &[7u8; 5000][..]), (20 << 20, b"middle")] {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(d).unwrap();
    }
    f.set_len(32 << 20).unwrap();
    fs::File::create(root.join("hole-only")).unwrap().set_len(8 << 20).unwrap();
    let mut f = fs::File::create(root.join("ends-in-data")).unwrap();
    f.seek(SeekFrom::Start(3 << 20)).unwrap();
    f.write_all(b"tail").unwrap();
    write(&root.join("dense"), b"not sparse", 0o644);
    set_mtimes(root, MTIME);
}

fn gnu_tar_create(src: &Path, out: &Path, args: &[&str]) -> Result<(), String> {
    tool("tar")?;
    let mut c = Command::new("tar");
    c.args(["--numeric-owner", "--owner=0", "--group=0"]).args(args).arg("-cf").arg(out).arg("-C").arg(src).arg(".").env("LC_ALL", "C");
    let o = run_with(&mut c, None, TIMEOUT);
    if o.code != 0 {
        return Err(format!("GNU tar could not create {}: {o}", out.display()));
    }
    Ok(())
}

/// Whether the scratch filesystem keeps `user.*` xattrs.
fn user_xattrs(dir: &Path) -> bool {
    let p = dir.join(".xattr-probe");
    fs::write(&p, b"").unwrap();
    let ok = rustix::fs::setxattr(&p, "user.probe", b"1", rustix::fs::XattrFlags::empty()).is_ok();
    fs::remove_file(&p).unwrap();
    ok
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn archives_made_by_gnu_tar_import_as_gnu_tar_extracts_them() {
    let s = Store::new();
    need!(tool("tar"));
    let (simple, full, full_x) = (s.path("simple"), s.path("full"), s.path("full-xattrs"));
    simple_tree(&simple);
    full_tree(&full, false);
    let xattrs = user_xattrs(s.tmp.path());
    full_tree(&full_x, xattrs);
    let mut cases = Vec::new();
    for (name, src, args) in [
        ("v7", &simple, &["--format=v7"][..]),
        ("ustar", &simple, &["--format=ustar"]),
        ("gnu", &full, &["--format=gnu"]),
        ("oldgnu", &full, &["--format=oldgnu"]),
        ("pax", &full, &["--format=pax"]),
        ("pax-xattrs", &full_x, &["--format=pax", "--xattrs"]),
    ] {
        let p = s.path(&format!("{name}.tar"));
        need!(gnu_tar_create(src, &p, args));
        cases.push((name.to_owned(), p));
    }
    compare_all(&s, &cases);
}

#[test]
fn sparse_archives_of_every_version_import_with_holes() {
    let s = Store::new();
    need!(tool("tar"));
    let src = s.path("sparse-src");
    sparse_tree(&src);
    let mut cases = Vec::new();
    for (name, args) in [
        ("gnu-S", &["--format=gnu", "-S"][..]),
        ("oldgnu-S", &["--format=oldgnu", "-S"]),
        ("pax-S", &["--format=pax", "-S"]),
        ("pax-S-0.0", &["--format=pax", "-S", "--sparse-version=0.0"]),
        ("pax-S-0.1", &["--format=pax", "-S", "--sparse-version=0.1"]),
        ("pax-S-1.0", &["--format=pax", "-S", "--sparse-version=1.0"]),
        ("gnu-dense", &["--format=gnu"]),
    ] {
        let p = s.path(&format!("{name}.tar"));
        need!(gnu_tar_create(&src, &p, args));
        cases.push((name.to_owned(), p));
    }
    compare_all(&s, &cases);
    // The sparse archives hold a few KB of data: so must the layers.
    for (name, _) in cases.iter().filter(|(n, _)| n.contains("-S")) {
        let id = s.plyroot(&["import", &format!("tar:{}", s.path(&format!("{name}.tar")).display())]).ok().line();
        let f = layer_dir(&s, &id).join("root/var/log/lastlog");
        let blocks = fs::metadata(&f).unwrap().blocks() * 512;
        assert!(blocks <= 64 << 10, "{name}: a 32 MiB file with 5 KB of data takes {blocks} bytes in the layer");
    }
}

/// Archives that say what GNU tar reads leniently, written byte by byte.
fn hand_made_cases() -> Vec<(&'static str, Vec<u8>)> {
    let blank = |name: &'static [u8]| H { size: 1, patch: vec![(108, b"        ".to_vec()), (116, vec![0; 8]), (136, b"            ".to_vec())], ..h(name, b'0') };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("blank-numeric-fields", Raw::default().header(blank(b"blank")).data(b"b").end()),
        ("two-long-names", Raw::default().long(b'L', b"first-long-name\0").long(b'L', b"second\0").file("short", b"x").end()),
        ("two-long-links", Raw::default().file("t1", b"1").file("t2", b"2").long(b'K', b"t1\0").long(b'K', b"t2\0").header(h(b"sym", b'2')).end()),
        ("two-pax-headers", Raw::default().pax(b'x', &[("path", b"p1"), ("mode", b"777")]).pax(b'x', &[("path", b"p2")]).file("short", b"x").end()),
        ("nul-in-long-name", Raw::default().long(b'L', b"ab\0cd\0").file("short", b"x").end()),
        ("nul-in-pax-path", Raw::default().pax(b'x', &[("path", b"ab\0cd")]).file("short", b"x").end()),
        ("pax-header-at-the-end", Raw::default().file("f", b"x").pax(b'x', &[("path", b"ghost")]).end()),
        ("long-name-at-the-end", Raw::default().file("f", b"x").long(b'L', b"ghost\0").end()),
        ("global-pax-header", Raw::default().pax(b'g', &[("mtime", b"1600000000"), ("comment", b"git archive")]).file("a", b"1").file("b", b"2").end()),
        ("file-then-dir", Raw::default().file("a", b"x").dir("a/", 0o750).file("a/b", b"y").end()),
        ("dir-then-file", Raw::default().dir("a/", 0o755).file("a/b", b"y").file("a", b"x").end()),
        ("dir-then-symlink", Raw::default().dir("a/", 0o755).file("a/b", b"y").header(H { link: b"elsewhere", ..h(b"a", b'2') }).end()),
        ("self-hardlink", Raw::default().file("f", b"data").header(H { link: b"f", ..h(b"f", b'1') }).end()),
        ("hardlink-chain", Raw::default().file("f", b"data").header(H { link: b"f", ..h(b"g", b'1') }).header(H { link: b"g", ..h(b"h", b'1') }).end()),
        ("trailing-slashes", Raw::default().dir("d/", 0o700).dir("e//", 0o711).header(h(b"olddir/", b'\0')).file("olddir/x", b"q").end()),
        ("directory-size-field", Raw::default().header(H { size: 4096, ..h(b"d/", b'5') }).file("d/f", b"abc").end()),
        ("unknown-type-flag", Raw::default().header(H { size: 3, ..h(b"vendor", b'Z') }).data(b"zzz").end()),
        ("no-end-blocks", Raw::default().file("f", b"abc").0),
        ("one-end-block", {
            let mut v = Raw::default().file("f", b"abc").0;
            v.extend_from_slice(&[0; 512]);
            v
        }),
        ("garbage-after-the-end", {
            let mut v = Raw::default().file("f", b"abc").end();
            v.extend_from_slice(&b"garbage".repeat(100));
            v
        }),
        ("ustar-prefix", Raw::default().header(H { size: 1, magic: POSIX_MAGIC, patch: vec![(345, b"usr/share/a-prefix".to_vec())], ..h(b"in-prefix", b'0') }).data(b"p").end()),
        ("gnu-ignores-prefix", Raw::default().header(H { size: 1, patch: vec![(345, b"not-a-prefix".to_vec())], ..h(b"plain", b'0') }).data(b"g").end()),
        ("base-256-uid-and-size", Raw::default().header(H { size: 0, patch: vec![(108, vec![0x80, 0, 0, 0, 0, 0, 1, 0]), (124, [0x80u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3].to_vec())], ..h(b"b256", b'0') }).data(b"abc").end()),
        (
            "odd-directory-modes",
            Raw::default().dir("none/", 0).file("none/f", b"in a 000 directory").header(H { size: 6, mode: 0, ..h(b"none/secret", b'0') }).data(b"secret").dir("wx/", 0o300).dir("wx/x/", 0o111).file("wx/x/f", b"deep").dir("sticky/", 0o1777).end(),
        ),
        (
            "old-gnu-sparse-by-hand",
            Raw::default().old_sparse("s", 64 << 20, &(0..30u64).map(|i| (i << 21, &b"x"[..])).chain([(64 << 20, &b""[..])]).collect::<Vec<_>>()).file("after", b"next").end(),
        ),
        ("old-gnu-sparse-no-final-region", Raw::default().old_sparse("s", 1 << 20, &[(0, b"hello")]).end()),
        ("pax-sparse-0.1-by-hand", {
            let r = Raw::default().pax(b'x', &[("GNU.sparse.size", b"3000000"), ("GNU.sparse.numblocks", b"2"), ("GNU.sparse.name", b"real-name"), ("GNU.sparse.map", b"1000000,3,3000000,0")]);
            r.header(H { size: 3, magic: POSIX_MAGIC, ..h(b"GNUSparseFile.7/real-name", b'0') }).data(b"abc").end()
        }),
    ];
    if me().uid == 0 {
        let dev = |name: &'static [u8], flag: u8, major: &[u8], minor: &[u8]| H { mode: 0o660, patch: vec![(329, major.to_vec()), (337, minor.to_vec())], ..h(name, flag) };
        cases.push(("devices", Raw::default().header(dev(b"null", b'3', b"0000001\0", b"0000003\0")).header(dev(b"sda", b'4', b"0000010\0", b"0000000\0")).end()));
    }
    cases
}

#[test]
fn hand_made_archives_import_as_gnu_tar_extracts_them() {
    let s = Store::new();
    need!(tool("tar"));
    let cases: Vec<_> = hand_made_cases().iter().map(|(name, bytes)| write_case(&s, name, bytes)).collect();
    compare_all(&s, &cases);
}

/// Archives GNU tar refuses (exits non-zero having extracted nothing of the damaged part):
/// plyroot refuses them too, naming the archive, and the store keeps no layer.
#[test]
fn what_gnu_tar_refuses_plyroot_refuses() {
    let s = Store::new();
    need!(tool("tar"));
    let ok = Raw::default().file("f", b"abc").end();
    let mut bad_checksum = ok.clone();
    bad_checksum[148] = b'7';
    let mut damaged_second = Raw::default().file("f", b"abc").0;
    damaged_second.extend_from_slice(&b"garbage".repeat(100));
    let mut truncated = Raw::default().file("f", &[1u8; 5000]).0;
    truncated.truncate(2000);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("junk", b"this is not a tar archive at all".repeat(40), "is not a tar archive"),
        ("bad-checksum", bad_checksum, "is not a tar archive"),
        ("damaged-second-header", damaged_second, "checksum"),
        ("truncated", truncated, "ends inside"),
        ("sparse-region-past-the-end", Raw::default().old_sparse("s", 100, &[(0, b"hello"), (200, b"abc")]).end(), "sparse"),
        ("multi-volume-continuation", Raw::default().header(H { size: 3, ..h(b"cont", b'M') }).data(b"abc").end(), "volume"),
    ];
    for (name, bytes, needle) in cases {
        let (_, p) = write_case(&s, name, &bytes);
        let g = gnu_extract(&p, &s.path(&format!("gnu-{name}")), false);
        assert_ne!(g.code, 0, "{name}: GNU tar accepts it, so plyroot must too: {g}");
        let shown = format!("tar:{}", p.display());
        s.plyroot(&["import", &shown]).plyroot_error(&[&shown, needle]);
        assert_eq!(s.layer_dir_entries(), 0, "{name}: a refused import left a layer");
    }
}

#[test]
fn empty_input_is_not_a_tar_archive() {
    let s = Store::new();
    let zeros = s.path("zeros.tar");
    fs::write(&zeros, vec![0u8; 10240]).unwrap();
    for src in ["tar:/dev/null", "tar:/dev/zero", &format!("tar:{}", zeros.display())] {
        s.plyroot(&["import", src]).plyroot_error(&[src, "is not a tar archive"]);
    }
    s.plyroot_stdin(&["import", "tar:-"], b"").plyroot_error(&["tar:-", "is not a tar archive"]);
    // A failed download piped into create makes no environment.
    s.plyroot_stdin(&["create", "dev", "--from", "tar:-"], b"").plyroot_error(&["tar:-", "is not a tar archive"]);
    assert_eq!(s.layer_dir_entries(), 0, "the store is unchanged");
    assert!(s.plyroot(&["list"]).ok().lines().iter().all(|l| !l.contains("dev")), "no environment was created");
}

/// The 60 GB case through the whole import path needs the canonical form to keep sparse files
/// sparse (issue 10, identity part): until then the digest reads 60 GB of zeros. This smaller
/// case runs the same path today: 1 GiB declared, a few KB of data.
#[test]
fn a_sparse_file_costs_the_store_only_its_data() {
    let s = Store::new();
    let size = 1u64 << 30;
    let a = Raw::default().old_sparse("var/log/lastlog", size, &[(0, &b"first"[..]), (size / 2, b"middle"), (size, b"")]).end();
    let (_, p) = write_case(&s, "sparse-1g", &a);
    let id = s.import(&format!("tar:{}", p.display()))[0].clone();
    let f = layer_dir(&s, &id).join("root/var/log/lastlog");
    let md = fs::metadata(&f).unwrap();
    assert_eq!(md.len(), size);
    assert!(md.blocks() * 512 <= 64 << 10, "1 GiB declared, 11 bytes of data: the layer holds {} bytes", md.blocks() * 512);
}

#[test]
fn sixty_gigabytes_declared_import_in_the_time_of_their_data() {
    let s = Store::new();
    let size = 60u64 << 30;
    let a = Raw::default().old_sparse("huge", size, &[(0, &b"first"[..]), (30 << 30, b"middle"), (size, b"")]).end();
    assert!(a.len() < 10 << 10);
    let (_, p) = write_case(&s, "sparse-60g", &a);
    let t = Instant::now();
    let id = s.import(&format!("tar:{}", p.display()))[0].clone();
    assert!(t.elapsed() < Duration::from_secs(10), "a {}-byte archive took {:?} to import", a.len(), t.elapsed());
    let md = fs::metadata(layer_dir(&s, &id).join("root/huge")).unwrap();
    assert_eq!(md.len(), size);
    assert!(md.blocks() * 512 <= 64 << 10, "{} bytes allocated", md.blocks() * 512);
}

/// The id of `odd-directory-modes` as real root imports it (every mode on disk, nothing
/// recorded); also the id before this change, for root.
const ODD_MODES_ID: &str = "sha256:907f3804e42504da0101e460331d4e5582739dfe1febdcc79e88529851aa83e2";

#[test]
fn unenterable_directories_import_for_every_user_with_the_archives_id() {
    let s = Store::new();
    let a = hand_made_cases().into_iter().find(|(n, _)| *n == "odd-directory-modes").unwrap().1;
    let (_, p) = write_case(&s, "odd-modes", &a);
    let id = s.import(&format!("tar:{}", p.display()))[0].clone();
    assert_eq!(id, ODD_MODES_ID, "the id must be the archive's, whoever imports it");
    let out = s.plyroot(&["verify"]);
    assert_eq!(out.code, 0, "verify: {out}");
    need!(userns());
    let bb = s.path("busybox-root");
    need!(busybox_rootfs(&bb));
    s.create("odd", &[&format!("dir:{}", bb.display()), &format!("tar:{}", p.display())]);
    let out = s.run("odd", &["--root"], &["sh", "-c", "cat /none/f /wx/x/f; stat -c '%a %n' /none /wx /wx/x"]).ok();
    assert!(out.stdout.starts_with("in a 000 directorydeep"), "{out}");
    if me().uid == 0 {
        // Real root's store holds the modes themselves; an unprivileged store keeps its
        // directories owner-readable (r-x added) and the modes in the layer's metadata.
        assert!(out.stdout.ends_with("0 /none\n300 /wx\n111 /wx/x\n"), "{out}");
    }
}

#[test]
fn a_dir_source_may_be_a_symlink_to_a_directory() {
    let s = Store::new();
    let real = s.path("real-rootfs");
    simple_tree(&real);
    symlink(&real, s.path("rootfs")).unwrap();
    let direct = s.import(&format!("dir:{}", real.display()));
    assert_eq!(s.import(&format!("dir:{}", s.path("rootfs").display())), direct);
    // Relative, as a user types it.
    assert_eq!(s.plyroot(&["import", "dir:./rootfs"]).ok().lines(), direct);
}
