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
use super::whiteout::{classify, Whiteout};
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
