use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use super::*;
use crate::store::meta::key;

fn set_mtime(p: &Path, secs: i64, nsec: i64) {
    let tv = rustix::fs::Timespec { tv_sec: secs, tv_nsec: nsec as _ };
    rustix::fs::utimensat(rustix::fs::CWD, p, &rustix::fs::Timestamps { last_access: tv, last_modification: tv }, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

fn tar_of(root: &Path, ov: &Overrides) -> (Summary, Vec<u8>) {
    let mut out = Vec::new();
    let s = write_tar(root, ov, &mut out).unwrap();
    (s, out)
}

/// (path bytes, entry type, uid) of every entry, as the tar crate reads them.
fn entries(tar: &[u8]) -> Vec<(Vec<u8>, u8, u64)> {
    tar::Archive::new(tar)
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path_bytes().into_owned(), e.header().entry_type().as_byte(), e.header().uid().unwrap())
        })
        .collect()
}

fn xattrs_supported(p: &Path) -> bool {
    rustix::fs::lsetxattr(p, "user.probe", b"x", rustix::fs::XattrFlags::empty()).is_ok() && rustix::fs::lremovexattr(p, "user.probe").is_ok()
}

fn gnu_tar() -> Option<&'static str> {
    Command::new("tar").arg("--version").output().ok().filter(|o| String::from_utf8_lossy(&o.stdout).contains("GNU tar")).map(|_| "tar")
}

#[test]
fn pax_record_length_counts_itself() {
    for (k, v) in [("path", "a".repeat(5)), ("path", "b".repeat(92)), ("path", "c".repeat(993))] {
        let r = pax_record(k.as_bytes(), v.as_bytes());
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
            set_mtime(&root.join(p), 1_600_000_000, 0);
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

/// The canonical bytes of a small tree, pinned (the digest plyroot gave it before names were bytes
/// and files could be sparse): the form (and so every layer id) must not change
/// by accident. A deliberate change of the form updates this digest and says why in its commit.
#[test]
fn the_canonical_form_of_ordinary_content_is_unchanged() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    fs::create_dir_all(r.join("etc/sub")).unwrap();
    fs::write(r.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::set_permissions(r.join("etc/passwd"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(r.join("etc/sub/big"), vec![b'x'; 70_000]).unwrap();
    fs::set_permissions(r.join("etc/sub/big"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("passwd", r.join("etc/link")).unwrap();
    fs::set_permissions(r.join("etc/sub"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(r.join("etc"), fs::Permissions::from_mode(0o755)).unwrap();
    for p in ["etc/passwd", "etc/sub/big", "etc/link", "etc/sub", "etc"] {
        set_mtime(&r.join(p), 1_700_000_000, 0);
    }
    let mut ov = Overrides { flattened: true, ..Default::default() };
    ov.entry("etc/passwd").owner = Some((0, 42));
    assert_eq!(digest(r, &ov).unwrap().id, "sha256:7a23773f10eaba22ea011de9a55e9a082f1ae36293e7999abbbc0754ceb6e41f");
}

#[test]
fn canonical_tar_round_trips_through_the_tar_crate() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let long = "d".repeat(120);
    fs::create_dir_all(root.join(&long)).unwrap();
    fs::write(root.join(&long).join("f"), b"data").unwrap();
    rustix::fs::mknodat(rustix::fs::CWD, root.join("gone"), rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::empty(), 0).unwrap();
    let mut ov = Overrides { flattened: true, ..Default::default() };
    ov.entry(&format!("{long}/f")).owner = Some((1000, 1000));
    ov.entry("dev/null").device = Some(Device { kind: 'c', major: 1, minor: 3, mode: 0o666, mtime: 5 });
    fs::create_dir(root.join("dev")).unwrap();
    let (s, out) = tar_of(root, &ov);
    assert_eq!(s.id, format!("sha256:{}", hex::encode(Sha256::digest(&out))));
    let got = entries(&out);
    let names: Vec<String> = got.iter().map(|g| String::from_utf8_lossy(&g.0).trim_end_matches('/').to_owned()).collect();
    assert_eq!(names, vec![".wh.gone".to_owned(), long.clone(), format!("{long}/f"), "dev".into(), "dev/null".into()]);
    assert_eq!(got[2].2, 1000, "owner override applies");
    assert_eq!(got[1].2, 0, "a flattened layer's default owner is root");
    assert_eq!(got[4].1, b'3', "the recorded device is emitted");
}

#[test]
fn many_and_large_xattrs_are_all_in_the_id() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("f");
    fs::write(&f, b"x").unwrap();
    if !xattrs_supported(&f) {
        eprintln!("skipped: {} takes no user.* xattrs", t.path().display());
        return;
    }
    for i in 0..40 {
        // 40 names of ordinary length: more than 1 KiB of name list.
        rustix::fs::lsetxattr(&f, format!("user.org.example.attribute.{i:02}").as_str(), &[b'v'; 32], rustix::fs::XattrFlags::empty()).unwrap();
    }
    let ov = Overrides::default();
    let (before, tar) = tar_of(t.path(), &ov);
    let mut ar = tar::Archive::new(&tar[..]);
    let mut e = ar.entries().unwrap().next().unwrap().unwrap();
    let n = e.pax_extensions().unwrap().unwrap().filter(|x| x.as_ref().unwrap().key_bytes().starts_with(b"SCHILY.xattr.user.org.example.attribute")).count();
    assert_eq!(n, 40, "every xattr is in the canonical form");
    rustix::fs::lsetxattr(&f, "user.org.example.attribute.39", &[b'w'; 32], rustix::fs::XattrFlags::empty()).unwrap();
    assert_ne!(digest(t.path(), &ov).unwrap().id, before.id, "one xattr value changes the id");
}

#[test]
fn names_are_bytes_and_distinct() {
    let names: [&[u8]; 3] = [b"a\xff", b"a\xfe", "a\u{FFFD}".as_bytes()];
    let mut ids = Vec::new();
    let all = tempfile::tempdir().unwrap();
    for n in names {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join(OsStr::from_bytes(n)), b"").unwrap();
        fs::write(all.path().join(OsStr::from_bytes(n)), b"").unwrap();
        set_mtime(&t.path().join(OsStr::from_bytes(n)), 1, 0);
        let (s, tar) = tar_of(t.path(), &Overrides::default());
        assert_eq!(entries(&tar)[0].0, n, "the name is written as its bytes");
        ids.push(s.id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "three names, three ids");
    let (_, tar) = tar_of(all.path(), &Overrides::default());
    let mut got: Vec<Vec<u8>> = entries(&tar).into_iter().map(|e| e.0).collect();
    got.dedup();
    assert_eq!(got.len(), 3);
    // The name that is not UTF-8 says so: a `path` record and hdrcharset=BINARY.
    let text = String::from_utf8_lossy(&tar);
    assert!(text.contains("hdrcharset=BINARY"), "no hdrcharset record");
}

#[test]
fn mtimes_beyond_ustar_and_before_1970_are_kept_and_overrides_win() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("f");
    fs::write(&f, b"").unwrap();
    let id_at = |secs: i64, nsec: i64| {
        set_mtime(&f, secs, nsec);
        let (s, tar) = tar_of(t.path(), &Overrides::default());
        let mut ar = tar::Archive::new(&tar[..]);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        let pax: Option<String> = e.pax_extensions().unwrap().and_then(|mut x| x.find(|r| r.as_ref().unwrap().key_bytes() == b"mtime").map(|r| r.unwrap().value().unwrap().to_owned()));
        (s.id, e.header().mtime().unwrap(), pax)
    };
    let (a, field, pax) = id_at(-86_400, 0);
    assert_eq!((field, pax.as_deref()), (0, Some("-86400")), "a time before 1970 is a PAX record");
    let (b, _, _) = id_at(-86_399, 0);
    assert_ne!(a, b);
    let (y2100, field, pax) = id_at(4_102_444_800, 0);
    assert_eq!((field, pax), (4_102_444_800, None), "2100 fits the ustar field");
    let (ns, _, _) = id_at(4_102_444_800, 999_999_999);
    assert_eq!(ns, y2100, "sub-second parts are not content");
    let (far, _, pax) = id_at((1 << 33) + 1, 0);
    assert_eq!(pax.as_deref(), Some("8589934593"), "past the ustar field's range (2242) is a PAX record");
    // What the disk could not hold comes from the layer's metadata.
    set_mtime(&f, 2_147_483_647, 0);
    let mut ov = Overrides::default();
    ov.entry("f").mtime = Some(4_102_444_800);
    assert_eq!(digest(t.path(), &ov).unwrap().id, y2100, "the recorded mtime, not the disk's clamped one");
    assert_ne!(far, y2100);
}

#[test]
fn an_opaque_layer_root_is_refused() {
    let t = tempfile::tempdir().unwrap();
    if !xattrs_supported(t.path()) {
        eprintln!("skipped: no user.* xattrs here");
        return;
    }
    rustix::fs::lsetxattr(t.path(), "user.overlay.opaque", b"y", rustix::fs::XattrFlags::empty()).unwrap();
    let e = digest(t.path(), &Overrides::default()).unwrap_err().to_string();
    assert!(e.contains("opaque") && e.contains(&t.path().display().to_string()), "{e}");
}

#[test]
fn recorded_devices_and_xattrs_with_names_that_are_not_utf8() {
    let t = tempfile::tempdir().unwrap();
    fs::create_dir(t.path().join(OsStr::from_bytes(b"d\xff"))).unwrap();
    let mut ov = Overrides { flattened: true, ..Default::default() };
    ov.entry(&key(b"d\xff/null\xfe")).device = Some(Device { kind: 'c', major: 1, minor: 3, mode: 0o666, mtime: 0 });
    ov.entry(&key(b"d\xff")).xattrs.insert(key(b"trusted.x\xff").into_owned(), "01".into());
    let (_, tar) = tar_of(t.path(), &ov);
    let got: Vec<Vec<u8>> = entries(&tar).into_iter().map(|e| e.0).collect();
    assert_eq!(got, [b"d\xff/".to_vec(), b"d\xff/null\xfe".to_vec()]);
    assert!(tar.windows(b"SCHILY.xattr.trusted.x\xff=\x01".len()).any(|w| w == b"SCHILY.xattr.trusted.x\xff=\x01"));
}

#[test]
fn sparse_map_is_a_function_of_the_bytes() {
    let t = tempfile::tempdir().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut map_of = |data: &[u8], sparse_copy: bool| {
        let p = t.path().join("f");
        let _ = fs::remove_file(&p);
        let f = fs::File::create(&p).unwrap();
        if sparse_copy {
            // Only the non-zero pages are written: the rest are holes on disk.
            f.set_len(data.len() as u64).unwrap();
            for (i, page) in data.chunks(4096).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    f.write_at(page, (i * 4096) as u64).unwrap();
                }
            }
        } else {
            f.write_all_at(data, 0).unwrap();
        }
        let f = fs::File::open(&p).unwrap();
        sparse_map(&f, data.len() as u64, &mut buf).unwrap()
    };
    let h = HOLE as usize;
    let small = vec![0u8; h - 1];
    assert_eq!(map_of(&small, false), None, "shorter than one chunk: never sparse");
    let mut dense = vec![1u8; 3 * h];
    dense[h..2 * h - 1].fill(0);
    assert_eq!(map_of(&dense, false), None, "no chunk is all zeros");
    let mut data = vec![0u8; 4 * h + 100];
    data[h + 5] = 1;
    data[2 * h] = 2;
    let want = Some(vec![(h as u64, 2 * h as u64), ((4 * h + 100) as u64, 0)]);
    assert_eq!(map_of(&data, false), want);
    assert_eq!(map_of(&data, true), want, "the disk's holes make no difference");
    data[4 * h + 99] = 3;
    assert_eq!(map_of(&data, true), Some(vec![(h as u64, 2 * h as u64), (4 * h as u64, 100)]), "a partial last chunk with data is data");
    assert_eq!(map_of(&vec![0u8; 2 * h], true), Some(vec![(2 * h as u64, 0)]), "all holes");
}

#[test]
fn a_sparse_file_is_written_sparse_and_gnu_tar_restores_it() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    // 1 GiB apparent, 8 KiB of data: the serialization reads and writes only the data.
    let f = fs::File::create(src.join("lastlog")).unwrap();
    f.set_len(1 << 30).unwrap();
    f.write_all_at(b"first", 3 * HOLE + 7).unwrap();
    f.write_all_at(b"last", (1 << 30) - 4).unwrap();
    drop(f);
    fs::write(src.join("dense"), vec![0u8; 3 * HOLE as usize]).unwrap();
    let start = std::time::Instant::now();
    let (s, tar) = tar_of(&src, &Overrides::default());
    assert!(start.elapsed() < std::time::Duration::from_secs(20), "a sparse file is not read as a whole");
    assert_eq!(s.size, (1 << 30) + 3 * HOLE, "sizes count apparent bytes");
    assert!(tar.len() < 3 * HOLE as usize, "only the two data chunks are in the tar ({} bytes)", tar.len());
    let text = String::from_utf8_lossy(&tar);
    for want in ["GNU.sparse.major=1", "GNU.sparse.minor=0", "GNU.sparse.name=lastlog", "GNU.sparse.realsize=1073741824", "GNUSparseFile.0/lastlog"] {
        assert!(text.contains(want), "no {want:?}");
    }
    // A dense copy of the same bytes is the same content.
    let copy = t.path().join("copy");
    fs::create_dir(&copy).unwrap();
    fs::write(copy.join("dense"), vec![0u8; 3 * HOLE as usize]).unwrap();
    let mut data = vec![0u8; 4 * HOLE as usize];
    data[3 * HOLE as usize + 7..3 * HOLE as usize + 12].copy_from_slice(b"first");
    let f = fs::File::create(copy.join("lastlog")).unwrap();
    f.write_all_at(&data, 0).unwrap();
    f.set_len(1 << 30).unwrap();
    f.write_all_at(b"last", (1 << 30) - 4).unwrap();
    drop(f);
    for p in ["dense", "lastlog"] {
        let m = fs::metadata(src.join(p)).unwrap();
        set_mtime(&copy.join(p), m.mtime(), 0);
        fs::set_permissions(copy.join(p), m.permissions()).unwrap();
    }
    assert_eq!(digest(&copy, &Overrides::default()).unwrap().id, s.id, "dense and sparse copies of one file are one content");
    let Some(gnu) = gnu_tar() else {
        eprintln!("skipped the GNU tar half: no GNU tar");
        return;
    };
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    let mut child = Command::new(gnu).args(["-x", "-C"]).arg(&out).stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &tar).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let m = fs::metadata(out.join("lastlog")).unwrap();
    assert_eq!(m.len(), 1 << 30);
    assert!(m.blocks() * 512 < 16 << 20, "GNU tar restored the holes as holes ({} blocks)", m.blocks());
    let mut got = [0u8; 5];
    fs::File::open(out.join("lastlog")).unwrap().read_exact_at(&mut got, 3 * HOLE + 7).unwrap();
    assert_eq!(&got, b"first");
    let mut tail = [0u8; 4];
    fs::File::open(out.join("lastlog")).unwrap().read_exact_at(&mut tail, (1 << 30) - 4).unwrap();
    assert_eq!(&tail, b"last");
    assert_eq!(fs::read(out.join("dense")).unwrap(), vec![0u8; 3 * HOLE as usize]);
    assert!(!out.join("GNUSparseFile.0").exists());
    assert_eq!(digest(&out, &Overrides::default()).unwrap().id, s.id, "GNU tar's extraction serializes to the same id");
    let mut rest = Vec::new();
    fs::File::open(out.join("dense")).unwrap().read_to_end(&mut rest).unwrap();
}

#[test]
fn a_tree_deeper_than_path_max_serializes() {
    let t = tempfile::tempdir().unwrap();
    let mut fd = rustix::fs::open(t.path(), rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
    for _ in 0..2045 {
        rustix::fs::mkdirat(&fd, "a", rustix::fs::Mode::from_raw_mode(0o755)).unwrap();
        fd = rustix::fs::openat(&fd, "a", rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
    }
    let f = rustix::fs::openat(&fd, "f", rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY, rustix::fs::Mode::from_raw_mode(0o644)).unwrap();
    rustix::io::write(&f, b"deep").unwrap();
    let (s, tar) = tar_of(t.path(), &Overrides::default());
    assert_eq!(s.entries, 2046);
    let last = entries(&tar).pop().unwrap().0;
    assert_eq!(last.len(), 2045 * 2 + 1);
    crate::store::tree::remove_dir_tree(t.path()).unwrap();
}
