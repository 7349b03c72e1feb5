//! [`unpack_tar`]: one (already decompressed) tar stream into one staging root.
//!
//! The `tar` crate parses headers (ustar, GNU long names, PAX); everything that touches the
//! filesystem goes through [`Stage`], which keeps writes inside the root. OCI whiteout entries
//! are converted here, by [`classify`], into their overlayfs form.

use std::io::Read;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::Timespec;
use tar::EntryType;

use super::error::UnpackError;
use super::stage::{normalize, Meta, Node, Stage};
use super::{classify, Whiteout};
use super::Unpacked;
use crate::progress::Progress;
use crate::store::meta::Ownership;

const XATTR_PAX_PREFIX: &[u8] = b"SCHILY.xattr.";

/// Unpacks the tar stream `r` into the directory `root`. `archive_name` names the source in
/// errors. Streams: memory does not grow with entry or archive size. Returns what the disk could
/// not hold; `description` is left empty for the caller.
pub(crate) fn unpack_tar(
    r: &mut dyn Read,
    archive_name: &str,
    root: BorrowedFd,
    ownership: Ownership,
    progress: &mut Progress,
) -> Result<Unpacked, UnpackError> {
    let mut stage = Stage::new(root, archive_name, ownership, progress);
    let mut archive = tar::Archive::new(r);
    let read_err = |e| UnpackError::read(archive_name, e);
    // Reused across entries, so a typical entry allocates nothing here.
    let mut path = Vec::new();
    let mut link = Vec::new();
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();

    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink) {
            continue;
        }
        {
            let raw = entry.path_bytes();
            normalize(&raw, &mut path).map_err(|reason| stage.unsafe_entry(&raw, reason))?;
        }

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

        let header_err = |e| UnpackError::Unpack {
            archive: archive_name.to_owned(),
            entry: String::from_utf8_lossy(&path).into_owned(),
            step: "read header",
            source: e,
        };
        let header = entry.header();
        let (uid, gid) = (header.uid().map_err(header_err)?, header.gid().map_err(header_err)?);
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(stage.unsafe_entry(&path, "the owner id does not fit in 32 bits"));
        };
        let mut meta = Meta {
            mode: header.mode().map_err(header_err)? & 0o7777,
            uid,
            gid,
            mtime: Timespec { tv_sec: i64::try_from(header.mtime().map_err(header_err)?).unwrap_or(i64::MAX), tv_nsec: 0 },
        };
        let device = match kind {
            EntryType::Char | EntryType::Block => Some((
                if kind == EntryType::Char { 'c' } else { 'b' },
                header.device_major().map_err(header_err)?.unwrap_or(0),
                header.device_minor().map_err(header_err)?.unwrap_or(0),
            )),
            _ => None,
        };

        xattrs.clear();
        if let Some(pax) = entry.pax_extensions().map_err(header_err)? {
            for ext in pax {
                let ext = ext.map_err(header_err)?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(XATTR_PAX_PREFIX) {
                    xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                } else if key == b"mtime" {
                    if let Some(t) = parse_pax_time(ext.value_bytes()) {
                        meta.mtime = t;
                    }
                }
            }
        }

        if matches!(kind, EntryType::Symlink | EntryType::Link) {
            let Some(target) = entry.link_name_bytes() else {
                return Err(stage.unsafe_entry(&path, "the link has no target"));
            };
            if kind == EntryType::Link {
                normalize(&target, &mut link).map_err(|reason| stage.unsafe_entry(&path, hardlink_reason(reason)))?;
            } else {
                link.clear();
                link.extend_from_slice(&target);
            }
        }

        let node = match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Node::File(&mut entry),
            EntryType::Directory => Node::Dir,
            EntryType::Symlink => Node::Symlink(&link),
            EntryType::Link => Node::Hardlink(&link),
            EntryType::Fifo => Node::Fifo,
            EntryType::Char | EntryType::Block => {
                let (kind, major, minor) = device.unwrap_or(('c', 0, 0));
                Node::Device { kind, major, minor }
            }
            // Volume labels, multi-volume continuations and unknown types carry no file.
            _ => continue,
        };
        stage.put(&path, &meta, node, &xattrs)?;
    }
    stage.finish()
}

fn hardlink_reason(reason: &'static str) -> &'static str {
    match reason {
        "the name is empty" => "the hardlink target is empty",
        "the name contains a NUL byte" => "the hardlink target contains a NUL byte",
        "the name has a '..' component" => "the hardlink target has a '..' component",
        other => other,
    }
}

/// Parses a PAX time (`SECONDS[.FRACTION]`, possibly negative) exactly, without floats.
fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(d - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if !neg {
        Timespec { tv_sec: secs, tv_nsec: nanos }
    } else if nanos == 0 {
        Timespec { tv_sec: -secs, tv_nsec: 0 }
    } else {
        Timespec { tv_sec: -secs - 1, tv_nsec: 1_000_000_000 - nanos }
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::Path;

    use super::*;
    use crate::source::testutil::{is_root, open_dir, TarBuilder, MTIME};

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
            assert_eq!(out.unset_xattrs, 2 + u64::from(!on_disk));
        } else {
            assert_eq!(recorded.get("trusted.x").map(String::as_str), Some("0102"));
            assert_eq!(out.unset_xattrs, 3);
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
    fn nul_and_empty_names_are_refused() {
        let (res, _t) = hostile(|b, _| {
            b.pax(&[("path", b"etc/pass\0wd")]);
            b.file("placeholder", 0o644, b"x");
        });
        let msg = res.err().unwrap().to_string();
        assert!(msg.contains("NUL") && msg.contains("test.tar"), "{msg}");
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
}
