//! [`unpack_tar`]: one (already decompressed) tar stream into one staging root.
//!
//! [`Reader`](super::tar_reader::Reader) parses the stream as GNU tar does (every format,
//! extension and sparse map); everything that touches the filesystem goes through [`Stage`],
//! which keeps writes inside the root. OCI whiteout entries are converted here, by [`classify`],
//! into their overlayfs form.

use std::io::Read;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::error::UnpackError;
use super::stage::{normalize, Meta, Node, Stage};
use super::tar_reader::{Kind, Member, ReadError, Reader};
use super::Unpacked;
use super::{classify, Whiteout};
use crate::progress::Progress;
use crate::store::meta::Ownership;

/// Unpacks the tar stream `r` into the directory `root`. `archive_name` names the source in
/// errors. Streams: memory does not grow with entry or archive size, and a sparse file costs the
/// disk only the data the archive holds. Returns what the disk could not hold; `description` is
/// left empty for the caller, `headers` counts the archive's valid headers (0: it had none).
pub(crate) fn unpack_tar(
    r: &mut dyn Read,
    archive_name: &str,
    root: BorrowedFd,
    ownership: Ownership,
    progress: &mut Progress,
) -> Result<Unpacked, UnpackError> {
    let mut stage = Stage::new(root, archive_name, ownership, progress);
    let mut reader = Reader::new(r);
    // Reused across entries, so a typical entry allocates nothing here.
    let mut path = Vec::new();
    let mut link = Vec::new();

    while let Some(mut m) = reader.next().map_err(|e| read_error(archive_name, e))? {
        if m.kind == Kind::Skip {
            continue;
        }
        entry_path(&stage, &m.name, &mut path)?;
        match classify(Path::new(std::ffi::OsStr::from_bytes(&path))) {
            Whiteout::None => {}
            Whiteout::Remove { dir, name } => {
                stage.whiteout(dir.as_os_str().as_bytes(), name.as_bytes(), &path)?;
                continue;
            }
            Whiteout::Opaque { dir } => {
                stage.opaque(dir.as_os_str().as_bytes(), &path)?;
                continue;
            }
            Whiteout::Ignore => continue,
            Whiteout::Invalid => return Err(stage.unsafe_entry(&path, "a whiteout must name an entry")),
        }
        if let Some(flag) = m.unknown_type {
            crate::diag::warn!(
                "{archive_name}: '{}' has the unknown type '{}'; unpacked as a regular file, as GNU tar does",
                String::from_utf8_lossy(&path),
                flag.escape_ascii()
            );
        }
        let meta = member_meta(&stage, &m, &path)?;
        match m.kind {
            Kind::Hardlink => {
                normalize(&m.link, &mut link).map_err(|reason| stage.unsafe_entry(&path, hardlink_reason(reason)))?;
            }
            Kind::Symlink => {
                link.clear();
                link.extend_from_slice(&m.link);
            }
            _ => {}
        }
        let xattrs = std::mem::take(&mut m.xattrs);
        let node = match m.kind {
            Kind::File => match m.sparse.take() {
                Some(map) => {
                    let mut data = reader.sparse_data(&map);
                    stage.put(&path, &meta, Node::Sparse { map: &map, data: &mut data }, &xattrs)?;
                    continue;
                }
                None => {
                    let mut data = reader.data();
                    stage.put(&path, &meta, Node::File(&mut data), &xattrs)?;
                    continue;
                }
            },
            Kind::Dir => Node::Dir,
            Kind::Symlink => Node::Symlink(&link),
            Kind::Hardlink => Node::Hardlink(&link),
            Kind::Fifo => Node::Fifo,
            Kind::Char | Kind::Block => Node::Device { kind: if m.kind == Kind::Char { 'c' } else { 'b' }, major: m.dev.0, minor: m.dev.1 },
            Kind::Skip => continue,
        };
        stage.put(&path, &meta, node, &xattrs)?;
    }
    if reader.dangling_extension() {
        crate::diag::warn!("{archive_name} ends with an extended header (a long name or pax records) that describes no entry; ignored, as GNU tar does");
    }
    let mut out = stage.finish()?;
    out.headers = reader.headers();
    Ok(out)
}

/// The normalized path of a member's name (`./a//b/` is `a/b`), or why it is refused.
fn entry_path(stage: &Stage, raw: &[u8], out: &mut Vec<u8>) -> Result<(), UnpackError> {
    normalize(raw, out).map_err(|reason| stage.unsafe_entry(raw, reason))
}

fn member_meta(stage: &Stage, m: &Member, path: &[u8]) -> Result<Meta, UnpackError> {
    let (Ok(uid), Ok(gid)) = (u32::try_from(m.uid), u32::try_from(m.gid)) else {
        return Err(stage.unsafe_entry(path, "the owner id does not fit in 32 bits"));
    };
    Ok(Meta { mode: m.mode, uid, gid, mtime: m.mtime })
}

fn read_error(archive: &str, e: ReadError) -> UnpackError {
    match e {
        ReadError::Io(e) => UnpackError::read(archive, e),
        ReadError::Damaged { offset, reason } => UnpackError::Damaged { archive: archive.to_owned(), offset, reason },
        ReadError::NotTar => UnpackError::NotTar { archive: archive.to_owned(), reason: "its first block is not a tar header" },
    }
}

fn hardlink_reason(reason: &'static str) -> &'static str {
    match reason {
        "the name is empty" => "the hardlink target is empty",
        "the name contains a NUL byte" => "the hardlink target contains a NUL byte",
        "the name has a '..' component" => "the hardlink target has a '..' component",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::Path;

    use super::*;
    use super::super::tar_reader::parse_pax_time;
    use rustix::fs::Timespec;
    use crate::source::testutil::{is_root, old_gnu_sparse, open_dir, pax_header, push_data, raw_header, set_checksum, TarBuilder, MTIME};

    fn unpack(archive: &[u8], root: &Path, ownership: Ownership) -> Result<Unpacked, UnpackError> {
        let fd = open_dir(root);
        unpack_tar(&mut &archive[..], "test.tar", fd.as_fd(), ownership, &mut Progress::hidden())
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        let n = rustix::fs::lgetxattr(p, name, &mut buf[..]).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    #[test]
    fn types_modes_links_and_times() {
        let archive = TarBuilder::new()
            .dir("ro", 0o555)
            .file("ro/suid", 0o4755, b"#!/bin/sh\n")
            .file("ro/sgid", 0o2711, b"x")
            .dir("tmp", 0o1777)
            .symlink("ro/link", "suid")
            .hardlink("hard", "ro/suid")
            .node("fifo", tar::EntryType::Fifo, 0o640, (0, 0), (0, 0))
            .file("deep/er/file", 0o600, b"implicit parents")
            .finish();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let out = unpack(&archive, r, Ownership::Record).unwrap();
        assert_eq!(out.skipped_devices, 0);
        assert!(out.overrides.entries.is_empty(), "{:?}", out.overrides);
        assert!(out.overrides.flattened);

        assert_eq!(mode(&r.join("ro")), 0o555);
        assert_eq!(mode(&r.join("ro/suid")), 0o4755);
        assert_eq!(mode(&r.join("ro/sgid")), 0o2711);
        assert_eq!(mode(&r.join("tmp")), 0o1777);
        assert_eq!(mode(&r.join("deep")), 0o755);
        assert_eq!(fs::read(r.join("ro/suid")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(fs::read(r.join("deep/er/file")).unwrap(), b"implicit parents");
        assert_eq!(fs::read_link(r.join("ro/link")).unwrap(), Path::new("suid"));
        let (a, b) = (fs::metadata(r.join("ro/suid")).unwrap(), fs::metadata(r.join("hard")).unwrap());
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
        let fifo = fs::symlink_metadata(r.join("fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o640);
        for p in ["ro", "ro/suid", "ro/link", "tmp", "fifo", "hard"] {
            assert_eq!(fs::symlink_metadata(r.join(p)).unwrap().mtime(), MTIME as i64, "{p}");
        }
        // The store must be able to remove a finished stage with 0555 directories.
        fs::set_permissions(r.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn pax_mtime_keeps_nanoseconds() {
        let archive = TarBuilder::new().pax(&[("mtime", b"1600000000.25")]).file("f", 0o644, b"").finish();
        let root = tempfile::tempdir().unwrap();
        unpack(&archive, root.path(), Ownership::Record).unwrap();
        let md = fs::metadata(root.path().join("f")).unwrap();
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 250_000_000));
        assert_eq!(parse_pax_time(b"-1.5"), Some(Timespec { tv_sec: -2, tv_nsec: 500_000_000 }));
        assert_eq!(parse_pax_time(b"x"), None);
    }

    #[test]
    fn record_mode_records_owners_and_devices() {
        let archive = TarBuilder::new()
            .file_owned("etc/shadow", 0o640, b"", (0, 42))
            .file_owned("home/u/f", 0o644, b"", (1000, 1000))
            .file("root-owned", 0o644, b"")
            .node("dev/null", tar::EntryType::Char, 0o666, (1, 3), (0, 0))
            .node("dev/sda", tar::EntryType::Block, 0o660, (8, 0), (0, 6))
            .hardlink("dev/sda-link", "dev/sda")
            .finish();
        let root = tempfile::tempdir().unwrap();
        let out = unpack(&archive, root.path(), Ownership::Record).unwrap();
        let e = &out.overrides.entries;
        assert_eq!(e["etc/shadow"].owner, Some((0, 42)));
        assert_eq!(e["dev/sda-link"], e["dev/sda"]);
        assert_eq!(e["home/u/f"].owner, Some((1000, 1000)));
        assert!(!e.contains_key("root-owned"));
        assert_eq!(out.skipped_devices, 3);
        let null = e["dev/null"].device.clone().unwrap();
        assert_eq!((null.kind, null.major, null.minor, null.mode, null.mtime), ('c', 1, 3, 0o666, MTIME as i64));
        assert_eq!(e["dev/null"].owner, None);
        assert_eq!(e["dev/sda"].device.as_ref().unwrap().kind, 'b');
        assert_eq!(e["dev/sda"].owner, Some((0, 6)));
        assert!(!root.path().join("dev/null").exists());
        assert!(!root.path().join("dev/sda").exists());
    }

    #[test]
    fn preserve_mode_chowns_and_creates_devices() {
        if !is_root() {
            eprintln!("skipped: Ownership::Preserve needs real root");
            return;
        }
        let archive = TarBuilder::new()
            .file_owned("f", 0o4755, b"x", (1000, 42))
            .node("null", tar::EntryType::Char, 0o666, (1, 3), (0, 0))
            .finish();
        let root = tempfile::tempdir().unwrap();
        let out = unpack(&archive, root.path(), Ownership::Preserve).unwrap();
        assert!(out.overrides.is_empty() && !out.overrides.flattened);
        let md = fs::metadata(root.path().join("f")).unwrap();
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (1000, 42, 0o4755));
        let null = fs::symlink_metadata(root.path().join("null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    }

    #[test]
    fn xattrs_set_recorded_or_skipped() {
        let archive = TarBuilder::new()
            .pax(&[
                ("SCHILY.xattr.user.mime", b"text/plain"),
                ("SCHILY.xattr.trusted.x", b"\x01\x02"),
                ("SCHILY.xattr.user.overlay.opaque", b"y"),
            ])
            .file("f", 0o644, b"data")
            .pax(&[("SCHILY.xattr.user.overlay.redirect", b"/x")])
            .dir("d", 0o755)
            .finish();
        let root = tempfile::tempdir().unwrap();
        let out = unpack(&archive, root.path(), Ownership::Record).unwrap();
        let f = root.path().join("f");
        assert_eq!(xattr(&f, "user.mime").as_deref(), Some(&b"text/plain"[..]));
        assert_eq!(xattr(&f, "user.overlay.opaque"), None);
        assert_eq!(xattr(&root.path().join("d"), "user.overlay.redirect"), None);
        let recorded = out.overrides.entries.get("f").map(|o| o.xattrs.clone()).unwrap_or_default();
        assert!(!recorded.contains_key("user.overlay.opaque"));
        if is_root() {
            // Root may set trusted.*; either way it is on disk or in the overrides, not lost.
            let on_disk = xattr(&f, "trusted.x").is_some();
            assert!(on_disk || recorded.get("trusted.x").map(String::as_str) == Some("0102"));
            assert_eq!(out.unset_xattrs.total(), 2 + u64::from(!on_disk));
            assert_eq!(out.unset_xattrs.dropped.keys().collect::<Vec<_>>(), ["user.overlay.opaque", "user.overlay.redirect"]);
            assert_eq!(out.unset_xattrs.recorded.contains_key("trusted.x"), !on_disk);
        } else {
            assert_eq!(recorded.get("trusted.x").map(String::as_str), Some("0102"));
            assert_eq!(out.unset_xattrs.total(), 3);
        }
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let archive = TarBuilder::new()
            .file("a/x", 0o644, b"replaced by the whiteout")
            .file("a/.wh.x", 0o644, b"")
            .file(".wh.gone", 0o644, b"")
            .file("o/keep", 0o644, b"")
            .file("o/.wh..wh..opq", 0o644, b"")
            .file("new/.wh..wh..opq", 0o644, b"")
            .file("m/.wh..wh.plnk", 0o644, b"")
            .finish();
        let root = tempfile::tempdir().unwrap();
        unpack(&archive, root.path(), Ownership::Record).unwrap();
        let r = root.path();
        for p in ["a/x", "gone"] {
            let md = fs::symlink_metadata(r.join(p)).unwrap();
            assert!(md.file_type().is_char_device(), "{p}");
            assert_eq!(md.rdev(), 0, "{p}");
        }
        assert!(!r.join("a/.wh.x").exists());
        assert_eq!(xattr(&r.join("o"), "user.overlay.opaque").as_deref(), Some(&b"y"[..]));
        assert!(r.join("o/keep").exists(), "opaque hides lower layers, not this one");
        assert_eq!(xattr(&r.join("new"), "user.overlay.opaque").as_deref(), Some(&b"y"[..]));
        assert!(!r.join("m/.wh..wh.plnk").exists());
    }

    #[test]
    fn later_duplicates_win() {
        let archive = TarBuilder::new()
            .file_owned("f", 0o644, b"first", (5, 5))
            .file("f", 0o600, b"second")
            .dir("d", 0o755)
            .file_owned("d/child", 0o644, b"", (7, 7))
            .file("d", 0o644, b"now a file")
            .file("s", 0o644, b"")
            .symlink("s", "f")
            .dir("k", 0o700)
            .file("k/stays", 0o644, b"")
            .dir("k", 0o751)
            .hardlink("h", "f")
            .hardlink("h", "f")
            .finish();
        let root = tempfile::tempdir().unwrap();
        let out = unpack(&archive, root.path(), Ownership::Record).unwrap();
        let r = root.path();
        assert_eq!(fs::read(r.join("f")).unwrap(), b"second");
        assert_eq!(mode(&r.join("f")), 0o600);
        assert_eq!(fs::read(r.join("d")).unwrap(), b"now a file");
        assert_eq!(fs::read_link(r.join("s")).unwrap(), Path::new("f"));
        assert!(r.join("k/stays").exists());
        assert_eq!(mode(&r.join("k")), 0o751);
        assert_eq!(fs::read(r.join("h")).unwrap(), b"second");
        assert!(out.overrides.entries.is_empty(), "replaced entries are forgotten: {:?}", out.overrides);
    }

    /// Unpacks a hostile archive into `stage/` and checks that `outside/` is untouched.
    fn hostile(build: impl FnOnce(&mut TarBuilder, &Path)) -> (Result<Unpacked, UnpackError>, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let (stage, outside) = (tmp.path().join("stage"), tmp.path().join("outside"));
        fs::create_dir(&stage).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"original").unwrap();
        let mut b = TarBuilder::new();
        build(&mut b, &outside);
        let res = unpack(&b.finish(), &stage, Ownership::Record);
        let names: Vec<_> = fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["victim"], "something was written outside the stage");
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"original");
        assert_eq!(fs::metadata(outside.join("victim")).unwrap().nlink(), 1);
        (res, tmp)
    }

    fn assert_refused(res: Result<Unpacked, UnpackError>, entry: &str) {
        let msg = res.expect_err("hostile archive was accepted").to_string();
        assert!(msg.contains(&format!("'{entry}'")) && msg.contains("test.tar"), "{msg}");
    }

    #[test]
    fn absolute_paths_are_made_relative() {
        let (res, tmp) = hostile(|b, outside| {
            let abs = format!("{}/victim", outside.display());
            b.raw(abs.as_bytes(), tar::EntryType::Regular, b"", b"pwned");
            b.raw(b"/./abs/./x", tar::EntryType::Regular, b"", b"in");
        });
        res.unwrap();
        let stage = tmp.path().join("stage");
        let inside = stage.join(tmp.path().join("outside/victim").strip_prefix("/").unwrap());
        assert_eq!(fs::read(inside).unwrap(), b"pwned");
        assert_eq!(fs::read(stage.join("abs/x")).unwrap(), b"in");
    }

    #[test]
    fn dotdot_is_refused() {
        let (res, _t) = hostile(|b, _| {
            b.raw(b"../outside/victim", tar::EntryType::Regular, b"", b"pwned");
        });
        assert_refused(res, "../outside/victim");
        let (res, _t) = hostile(|b, _| {
            b.raw(b"a/../../outside/new", tar::EntryType::Regular, b"", b"pwned");
        });
        assert_refused(res, "a/../../outside/new");
    }

    #[test]
    fn symlinks_cannot_lead_outside() {
        let up = "../".repeat(32);
        // An absolute symlink to the real directory, and a relative one that climbs past `/`.
        // Inside the stage they point at a directory that does not exist there, so writing
        // through them must fail (or land in the stage), never reach the real one.
        for target in [String::new(), up] {
            let (res, tmp) = hostile(|b, outside| {
                b.symlink("link", &format!("{target}{}", outside.display()));
                b.raw(b"link/victim", tar::EntryType::Regular, b"", b"pwned");
                b.raw(b"link/new", tar::EntryType::Regular, b"", b"pwned");
            });
            let mirrored = tmp.path().join("stage").join(tmp.path().join("outside").strip_prefix("/").unwrap());
            match res {
                Ok(_) => assert_eq!(fs::read(mirrored.join("victim")).unwrap(), b"pwned"),
                Err(e) => assert!(e.to_string().contains("'link/victim'"), "{e}"),
            }
        }
        // A symlink to `/` is the stage root: what is written through it lands there.
        let (res, tmp) = hostile(|b, _| {
            b.symlink("esc", "/");
            b.raw(b"esc/root-file", tar::EntryType::Regular, b"", b"pwned");
            b.symlink("dots", "../../../..");
            b.raw(b"dots/dots-file", tar::EntryType::Regular, b"", b"pwned");
        });
        res.unwrap();
        let stage = tmp.path().join("stage");
        assert_eq!(fs::read(stage.join("root-file")).unwrap(), b"pwned");
        assert_eq!(fs::read(stage.join("dots-file")).unwrap(), b"pwned");
        assert!(!Path::new("/root-file").exists() && !Path::new("/dots-file").exists());
        assert!(!tmp.path().join("dots-file").exists());
        // The links themselves are kept as written.
        assert_eq!(fs::read_link(stage.join("esc")).unwrap(), Path::new("/"));
    }

    #[test]
    fn symlink_as_last_component_is_replaced_not_followed() {
        let (res, tmp) = hostile(|b, outside| {
            b.symlink("victim", &outside.join("victim").display().to_string());
            b.file("victim", 0o644, b"replaces the link");
        });
        res.unwrap();
        assert_eq!(fs::read(tmp.path().join("stage/victim")).unwrap(), b"replaces the link");
    }

    #[test]
    fn hardlinks_cannot_reach_outside() {
        let (res, _t) = hostile(|b, _| {
            b.hardlink("passwd", "/etc/passwd");
        });
        assert!(matches!(res, Err(UnpackError::LinkTarget { .. })), "{res:?}");
        let (res, _t) = hostile(|b, outside| {
            b.hardlink("v", &outside.join("victim").display().to_string());
        });
        assert_refused(res, "v");
        let (res, _t) = hostile(|b, outside| {
            b.symlink("out", &outside.display().to_string());
            b.hardlink("v", "out/victim");
        });
        assert_refused(res, "v");
        let (res, _t) = hostile(|b, _| {
            b.raw(b"v", tar::EntryType::Link, b"../outside/victim", b"");
        });
        assert_refused(res, "v");
        let passwd = fs::metadata("/etc/passwd").map(|m| m.nlink()).unwrap_or(1);
        assert_eq!(passwd, 1);
    }

    #[test]
    fn nul_ends_a_name_and_empty_names_are_refused() {
        // GNU tar reads a pax path (or a long name) as a C string: a NUL ends it.
        let (res, tmp) = hostile(|b, _| {
            b.pax(&[("path", b"etc/pass\0wd")]);
            b.file("placeholder", 0o644, b"x");
        });
        res.unwrap();
        assert_eq!(fs::read(tmp.path().join("stage/etc/pass")).unwrap(), b"x");
        assert!(!tmp.path().join("stage/placeholder").exists());
        let (res, _t) = hostile(|b, _| {
            b.raw(b"", tar::EntryType::Regular, b"", b"x");
        });
        assert!(res.err().unwrap().to_string().contains("empty"));
        let (res, _t) = hostile(|b, _| {
            b.raw(b"a/.wh..", tar::EntryType::Regular, b"", b"");
        });
        assert_refused(res, "a/.wh..");
    }

    #[test]
    fn root_entry_is_skipped() {
        let archive = TarBuilder::new().raw(b"./", tar::EntryType::Directory, b"", b"").file("f", 0o644, b"").finish();
        let root = tempfile::tempdir().unwrap();
        unpack(&archive, root.path(), Ownership::Record).unwrap();
        assert!(root.path().join("f").exists());
    }

    #[test]
    fn truncated_archive_is_an_error() {
        let archive = TarBuilder::new().file("f", 0o644, &[1u8; 5000]).finish();
        let root = tempfile::tempdir().unwrap();
        let err = unpack(&archive[..2000], root.path(), Ownership::Record).unwrap_err();
        assert!(err.to_string().contains("test.tar"), "{err}");
    }

    fn end(mut v: Vec<u8>) -> Vec<u8> {
        v.extend_from_slice(&[0; 1024]);
        v
    }

    /// Allocated bytes of a file (st_blocks are 512-byte units).
    fn allocated(p: &Path) -> u64 {
        fs::metadata(p).unwrap().blocks() * 512
    }

    /// Whether `p` reads as `data` at each `(offset, data)` and as zeros everywhere else.
    fn assert_sparse_content(p: &Path, size: u64, regions: &[(u64, &[u8])]) {
        use std::io::{Read, Seek, SeekFrom};
        assert_eq!(fs::metadata(p).unwrap().len(), size, "{}", p.display());
        let mut f = fs::File::open(p).unwrap();
        for (off, d) in regions {
            let mut got = vec![0; d.len()];
            f.seek(SeekFrom::Start(*off)).unwrap();
            f.read_exact(&mut got).unwrap();
            assert_eq!(&got, d, "data at {off}");
        }
        if size < 64 << 20 {
            let mut all = Vec::new();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.read_to_end(&mut all).unwrap();
            let mut want = vec![0u8; size as usize];
            for (off, d) in regions {
                want[*off as usize..*off as usize + d.len()].copy_from_slice(d);
            }
            assert!(all == want, "holes read as zeros");
        }
    }

    #[test]
    fn old_gnu_sparse_writes_holes() {
        // Six regions: four in the header, two in an extension block; the file ends in a hole
        // (GNU tar's last region has length 0 at the file's size).
        let regions: Vec<(u64, &[u8])> = vec![(0, b"head"), (1 << 20, b"a"), (2 << 20, &[7u8; 1000]), (3 << 20, b"c"), (5 << 20, b"d"), (8 << 20, b"")];
        let mut a = Vec::new();
        old_gnu_sparse(&mut a, b"lastlog", 8 << 20, &regions);
        a.extend(TarBuilder::new().file("after", 0o644, b"next member").finish());
        let root = tempfile::tempdir().unwrap();
        unpack(&a, root.path(), Ownership::Record).unwrap();
        let f = root.path().join("lastlog");
        assert_sparse_content(&f, 8 << 20, &regions);
        assert!(allocated(&f) <= 6 * 4096 * 2, "holes were written: {} bytes allocated", allocated(&f));
        assert_eq!(fs::read(root.path().join("after")).unwrap(), b"next member");
    }

    #[test]
    fn sixty_gigabytes_of_holes_cost_nothing() {
        // A few KB of archive describing a 60 GB file: it must take the time and the disk of the
        // data it holds, not of the size it declares.
        let size = 60u64 << 30;
        let mut a = Vec::new();
        old_gnu_sparse(&mut a, b"huge", size, &[(0, b"first"), (30 << 30, b"middle"), (size - 3, b"end")]);
        let root = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        unpack(&end(a), root.path(), Ownership::Record).unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "took {:?}", t.elapsed());
        let f = root.path().join("huge");
        assert_eq!(fs::metadata(&f).unwrap().len(), size);
        assert!(allocated(&f) <= 3 * 8192, "{} bytes allocated", allocated(&f));
        assert_sparse_content(&f, size, &[(0, b"first"), (30 << 30, b"middle"), (size - 3, b"end")]);
    }

    /// The three pax sparse formats, as `tar -S --format=pax --sparse-version=…` writes them.
    fn pax_sparse(version: &str, name: &str, size: u64, regions: &[(u64, &[u8])]) -> Vec<u8> {
        let mut a = Vec::new();
        let map: Vec<String> = regions.iter().flat_map(|(o, d)| [o.to_string(), d.len().to_string()]).collect();
        let stored_name = format!("./GNUSparseFile.1234/{name}");
        let size_s = size.to_string();
        let count = regions.len().to_string();
        let mut data = Vec::new();
        let header_name = match version {
            "0.0" => {
                let mut recs: Vec<(&str, &[u8])> = vec![("GNU.sparse.size", size_s.as_bytes()), ("GNU.sparse.numblocks", count.as_bytes())];
                for pair in map.chunks(2) {
                    recs.push(("GNU.sparse.offset", pair[0].as_bytes()));
                    recs.push(("GNU.sparse.numbytes", pair[1].as_bytes()));
                }
                pax_header(&mut a, b'x', &recs);
                name.to_owned()
            }
            "0.1" => {
                let joined = map.join(",");
                pax_header(&mut a, b'x', &[("GNU.sparse.size", size_s.as_bytes()), ("GNU.sparse.numblocks", count.as_bytes()), ("GNU.sparse.name", name.as_bytes()), ("GNU.sparse.map", joined.as_bytes())]);
                stored_name
            }
            _ => {
                pax_header(&mut a, b'x', &[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0"), ("GNU.sparse.name", name.as_bytes()), ("GNU.sparse.realsize", size_s.as_bytes())]);
                let mut m = format!("{count}\n").into_bytes();
                for n in &map {
                    m.extend_from_slice(format!("{n}\n").as_bytes());
                }
                push_data(&mut data, &m);
                stored_name
            }
        };
        for (_, d) in regions {
            push_data(&mut data, d);
        }
        a.extend_from_slice(&raw_header(header_name.as_bytes(), b'0', data.len() as u64, &[(257, b"ustar\x0000")]));
        a.extend_from_slice(&data);
        a
    }

    #[test]
    fn pax_sparse_formats_write_holes_under_the_real_name() {
        let regions: Vec<(u64, &[u8])> = vec![(4096, b"one"), (3 << 20, &[9u8; 700]), (4 << 20, b"")];
        for version in ["0.0", "0.1", "1.0"] {
            let a = end(pax_sparse(version, "var/log/lastlog", 4 << 20, &regions));
            let root = tempfile::tempdir().unwrap();
            unpack(&a, root.path(), Ownership::Record).unwrap_or_else(|e| panic!("{version}: {e}"));
            let f = root.path().join("var/log/lastlog");
            assert_sparse_content(&f, 4 << 20, &regions);
            assert!(allocated(&f) <= 4 * 4096, "{version}: {} bytes allocated", allocated(&f));
            let names: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, ["var"], "{version}: no GNUSparseFile directory");
        }
    }

    #[test]
    fn sparse_maps_that_lie_are_refused() {
        // A region past the declared size, and regions that need more data than the member has.
        let mut past = Vec::new();
        old_gnu_sparse(&mut past, b"s", 100, &[(0, b"hello"), (200, b"abc")]);
        let mut more = pax_sparse("1.0", "t", 1 << 20, &[(0, &[1u8; 600])]);
        // Cut the member's size field to one block of data (the map block plus one of two).
        let h = more.len() - 4 * 512;
        let mut hdr: [u8; 512] = more[h..h + 512].try_into().unwrap();
        hdr[124..136].copy_from_slice(format!("{:011o}\0", 1024).as_bytes());
        set_checksum(&mut hdr);
        more[h..h + 512].copy_from_slice(&hdr);
        more.truncate(more.len() - 512);
        for (what, a) in [("past the end", past), ("more data", more)] {
            let root = tempfile::tempdir().unwrap();
            let err = unpack(&end(a), root.path(), Ownership::Record).expect_err(what).to_string();
            assert!(err.contains("test.tar") && err.contains("sparse"), "{what}: {err}");
        }
    }

    #[test]
    fn gnu_leniency() {
        let mut a = Vec::new();
        // Blank and NUL-only numeric fields read as 0.
        a.extend_from_slice(&raw_header(b"blank", b'0', 1, &[(108, b"        "), (116, &[0; 8]), (136, b"            ")]));
        push_data(&mut a, b"b");
        // Of two long names the last counts, and a NUL ends it.
        for long in [&b"first-long-name\0"[..], b"second\0ignored\0"] {
            a.extend_from_slice(&raw_header(b"././@LongLink", b'L', long.len() as u64, &[]));
            push_data(&mut a, long);
        }
        a.extend_from_slice(&raw_header(b"short", b'0', 1, &[]));
        push_data(&mut a, b"L");
        // Of two pax headers the last counts, whole.
        pax_header(&mut a, b'x', &[("path", b"p1"), ("mtime", b"5")]);
        pax_header(&mut a, b'x', &[("path", b"p2")]);
        a.extend_from_slice(&raw_header(b"short2", b'0', 1, &[]));
        push_data(&mut a, b"P");
        // A regular-file member named with a slash is a directory; a directory's size is no data.
        a.extend_from_slice(&raw_header(b"olddir/", b'\0', 0, &[]));
        a.extend_from_slice(&raw_header(b"sized-dir/", b'5', 4096, &[]));
        a.extend_from_slice(&raw_header(b"sized-dir/f", b'0', 2, &[]));
        push_data(&mut a, b"in");
        // An unknown type is a regular file; a base-256 uid is a number.
        a.extend_from_slice(&raw_header(b"unknown", b'Z', 3, &[]));
        push_data(&mut a, b"zzz");
        a.extend_from_slice(&raw_header(b"big-uid", b'0', 0, &[(108, &[0x80, 0, 0, 0, 0, 0, 0x01, 0x00])]));
        // A self-link after its file is a no-op, and the data stays.
        a.extend_from_slice(&raw_header(b"second", b'1', 0, &[(157, b"second")]));
        // A pax header with no member after it is ignored.
        pax_header(&mut a, b'x', &[("path", b"ghost")]);
        let root = tempfile::tempdir().unwrap();
        let out = unpack(&end(a), root.path(), Ownership::Record).unwrap();
        let r = root.path();
        assert_eq!(fs::read(r.join("blank")).unwrap(), b"b");
        assert_eq!(fs::metadata(r.join("blank")).unwrap().mtime(), 0);
        assert!(!out.overrides.entries.contains_key("blank"), "owner 0:0: {:?}", out.overrides);
        assert_eq!(fs::read(r.join("second")).unwrap(), b"L");
        assert_eq!(fs::read(r.join("p2")).unwrap(), b"P");
        assert_eq!(fs::metadata(r.join("p2")).unwrap().mtime(), MTIME as i64, "nothing of the first pax header");
        assert!(fs::metadata(r.join("olddir")).unwrap().is_dir());
        assert_eq!(fs::read(r.join("sized-dir/f")).unwrap(), b"in");
        assert_eq!(fs::read(r.join("unknown")).unwrap(), b"zzz");
        assert_eq!(out.overrides.entries["big-uid"].owner, Some((256, 0)));
        assert!(!r.join("ghost").exists());
        assert_eq!(out.headers, 14);
    }

    #[test]
    fn a_self_link_with_nothing_before_it_is_refused() {
        let a = end(raw_header(b"me", b'1', 0, &[(157, b"me")]).to_vec());
        let root = tempfile::tempdir().unwrap();
        let err = unpack(&a, root.path(), Ownership::Record).unwrap_err().to_string();
        assert!(err.contains("'me'") && err.contains("hardlink target"), "{err}");
    }

    #[test]
    fn damaged_and_empty_input() {
        let root = tempfile::tempdir().unwrap();
        for empty in [&[][..], &[0u8; 10240][..]] {
            assert_eq!(unpack(empty, root.path(), Ownership::Record).unwrap().headers, 0);
        }
        let err = unpack(&[b'x'; 1024], root.path(), Ownership::Record).unwrap_err();
        assert!(matches!(err, UnpackError::NotTar { .. }), "{err}");
        let mut a = TarBuilder::new().file("ok", 0o644, b"fine").finish();
        a.truncate(1024);
        a.extend_from_slice(&[b'x'; 512]);
        let err = unpack(&a, root.path(), Ownership::Record).unwrap_err().to_string();
        assert!(err.contains("checksum") && err.contains("at byte 1024") && err.contains("test.tar"), "{err}");
    }

    #[test]
    fn unenterable_directories_import_and_keep_their_mode() {
        let a = TarBuilder::new()
            .dir("none", 0o000)
            .file("none/f", 0o644, b"in 000")
            .dir("wx", 0o300)
            .dir("wx/x", 0o111)
            .file("wx/x/f", 0o600, b"deep")
            .dir("ro", 0o555)
            .finish();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let out = unpack(&a, r, if is_root() { Ownership::Preserve } else { Ownership::Record }).unwrap();
        let out_record = {
            let root2 = tempfile::tempdir().unwrap();
            let o = unpack(&a, root2.path(), Ownership::Record).unwrap();
            assert_eq!(fs::read(root2.path().join("wx/x/f")).unwrap(), b"deep");
            assert_eq!(mode(&root2.path().join("none")), 0o500);
            assert_eq!(mode(&root2.path().join("wx")), 0o700);
            assert_eq!(mode(&root2.path().join("wx/x")), 0o511);
            assert_eq!(mode(&root2.path().join("ro")), 0o555);
            o
        };
        let e = &out_record.overrides.entries;
        assert_eq!((e["none"].dir_mode, e["wx"].dir_mode, e["wx/x"].dir_mode), (Some(0), Some(0o300), Some(0o111)));
        assert!(!e.contains_key("ro"), "a 0555 directory is held as it is");
        if is_root() {
            // Real root holds every mode on disk.
            assert!(out.overrides.is_empty());
            assert_eq!(mode(&r.join("none")), 0);
            assert_eq!(mode(&r.join("wx/x")), 0o111);
        }
        for d in ["none", "wx/x", "wx"] {
            fs::set_permissions(r.join(d), fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}
