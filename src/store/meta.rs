//! Layer metadata: what the store's disk cannot hold faithfully.
//!
//! A layer unpacked by an unprivileged user has every file owned by that user, cannot hold device
//! nodes, and cannot set `security.*`/`trusted.*` xattrs; and a filesystem may not hold every mtime
//! (ext4 with 128-byte inodes keeps 1901 to 2038 only), whoever unpacks. The original values are
//! kept here, beside the layer tree, so that the layer's id, `verify`, `export` and a push still
//! describe the original content. A layer unpacked by real root on a filesystem that holds its
//! times records (almost) nothing. Paths and xattr names are keys made by [`key`]: names are bytes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The key of an entry's path (or of an xattr name) in these records, which JSON makes strings:
/// the name itself when it is UTF-8 (so records written before names were bytes read the same),
/// otherwise a NUL followed by the name's bytes in hex. No path or xattr name holds a NUL, so the
/// two forms never meet, and `etc/a\xff` and `etc/a\u{FFFD}` stay two keys.
pub(crate) fn key(name: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(name) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(format!("\0{}", hex::encode(name))),
    }
}

/// The name a [`key`] stands for. A NUL-prefixed key that is not hex (hand-edited) is taken as
/// written, which matches no entry on disk.
pub(crate) fn unkey(key: &str) -> Cow<'_, [u8]> {
    match key.strip_prefix('\0').map(hex::decode) {
        Some(Ok(bytes)) => Cow::Owned(bytes),
        _ => Cow::Borrowed(key.as_bytes()),
    }
}

/// How an unpacker treats ownership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// Real root: `lchown` to the archive's ids, `mknod` devices.
    Preserve,
    /// Unprivileged: files stay owned by the store's user; the archive's owners that are not 0:0
    /// are recorded in [`Overrides`], devices too.
    Record,
}

/// Whether the xattr `name` holds user or group ids (a POSIX ACL), which read differently in each
/// user namespace: an unprivileged store keeps it here, never takes it from the disk.
pub(crate) fn names_ids(name: &[u8]) -> bool {
    name == b"system.posix_acl_access" || name == b"system.posix_acl_default"
}

/// A device node that could not be created on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Device {
    /// `'c'` or `'b'`.
    pub kind: char,
    pub major: u32,
    pub minor: u32,
    /// Permission bits (07777).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Override {
    /// The archive's owner, when it differs from what the disk holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<(u32, u32)>,
    /// Extended attributes that could not be set on disk: name → value as hex.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// A device node that is absent from disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    /// A directory's mode (07777) where the disk holds another: an unprivileged store keeps each
    /// directory readable and searchable by its owner (the mode | 0500), so that the layer can be
    /// digested, verified, exported and removed; the archive's mode (000, 0300, 0111…) is this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir_mode: Option<u32>,
    /// The archive's mtime (whole seconds since the epoch), when the disk holds another: the
    /// store's filesystem could not represent it (ext4 with 128-byte inodes stops at 2038 and
    /// before 1901), so the id, `export` and a push take it from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<i64>,
}

/// Per-layer overrides, keyed by the entry's path relative to the layer root, without a leading
/// `/` or `./` (e.g. `usr/bin/ping`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Overrides {
    /// True when the layer was unpacked with [`Ownership::Record`]: an entry's owner is then its
    /// `owner` override or 0:0, never what the disk says.
    pub flattened: bool,
    #[serde(default)]
    pub entries: BTreeMap<String, Override>,
}

impl Overrides {
    pub(crate) fn new(ownership: Ownership) -> Self {
        Self { flattened: ownership == Ownership::Record, entries: BTreeMap::new() }
    }

    pub(crate) fn entry(&mut self, path: &str) -> &mut Override {
        self.entries.entry(path.to_owned()).or_default()
    }

    /// Forget everything recorded for `path` (a [`key`]) and below it (the entry was replaced or
    /// removed). Compared as bytes: a UTF-8 directory may hold names that are not.
    pub(crate) fn forget(&mut self, path: &str) {
        let path = unkey(path).into_owned();
        self.entries.retain(|k, _| {
            let k = unkey(k);
            !(k.starts_with(&path) && (k.len() == path.len() || k[path.len()] == b'/'))
        });
    }

    /// What is recorded for the entry at `path` (bytes, relative to the layer root).
    pub(crate) fn get(&self, path: &[u8]) -> Option<&Override> {
        if self.entries.is_empty() {
            return None;
        }
        self.entries.get(key(path).as_ref())
    }

    /// The owner the canonical form gives `path`, whose on-disk owner is `disk`.
    pub(crate) fn owner(&self, path: &[u8], disk: (u32, u32)) -> (u32, u32) {
        match self.get(path).and_then(|o| o.owner) {
            Some(o) => o,
            None if self.flattened => (0, 0),
            None => disk,
        }
    }

    /// The permission bits the canonical form gives `path`, whose on-disk bits are `disk`.
    pub(crate) fn mode(&self, path: &[u8], disk: u32) -> u32 {
        self.get(path).and_then(|o| o.dir_mode).unwrap_or(disk)
    }

    /// The mtime (whole seconds) the canonical form gives `path`, whose on-disk mtime is `disk`.
    pub(crate) fn mtime(&self, path: &[u8], disk: i64) -> i64 {
        self.get(path).and_then(|o| o.mtime).unwrap_or(disk)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_names_that_are_not_utf8_apart() {
        let names: [&[u8]; 4] = [b"etc/a\xff", b"etc/a\xfe", "etc/a\u{FFFD}".as_bytes(), b"usr/bin/ls"];
        let keys: Vec<String> = names.iter().map(|n| key(n).into_owned()).collect();
        assert_eq!(keys[3], "usr/bin/ls", "a UTF-8 name is its own key");
        assert_eq!(keys[2], "etc/a\u{FFFD}");
        assert_eq!(keys[0], format!("\0{}", "6574632f61ff"), "NUL, then the hex of the bytes");
        for (n, k) in names.iter().zip(&keys) {
            assert_eq!(unkey(k).as_ref(), *n);
        }
        let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn forget_compares_bytes() {
        let mut ov = Overrides::default();
        for p in [&b"d"[..], b"d/x\xff", b"d/y", b"d\xff/z", b"dd"] {
            ov.entry(&key(p)).owner = Some((1, 1));
        }
        ov.forget("d");
        let mut left: Vec<Vec<u8>> = ov.entries.keys().map(|k| unkey(k).into_owned()).collect();
        left.sort();
        assert_eq!(left, [b"dd".to_vec(), b"d\xff/z".to_vec()]);
    }

    #[test]
    fn old_records_read_the_same() {
        let old = r#"{"flattened":true,"entries":{"etc/shadow":{"owner":[0,42]}}}"#;
        let ov: Overrides = serde_json::from_str(old).unwrap();
        assert_eq!(ov.owner(b"etc/shadow", (7, 7)), (0, 42));
        assert_eq!(ov.mtime(b"etc/shadow", 5), 5);
    }
}
