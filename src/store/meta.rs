//! Layer metadata: what an unprivileged store cannot hold faithfully on disk.
//!
//! A layer unpacked by an unprivileged user has every file owned by that user, cannot hold device
//! nodes, and cannot set `security.*`/`trusted.*` xattrs. The original values are kept here, beside
//! the layer tree, so that the layer's id, `verify`, `export` and a push still describe the original
//! content. A layer unpacked by real root holds everything on disk and records (almost) nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How an unpacker treats ownership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// Real root: `lchown` to the archive's ids, `mknod` devices.
    Preserve,
    /// Unprivileged: files stay owned by the store's user; the archive's owners that are not 0:0
    /// are recorded in [`Overrides`], devices too.
    Record,
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

    /// Forget everything recorded for `path` and below it (the entry was replaced or removed).
    pub(crate) fn forget(&mut self, path: &str) {
        let prefix = format!("{path}/");
        self.entries.retain(|k, _| k != path && !k.starts_with(&prefix));
    }

    /// The owner the canonical form gives `path`, whose on-disk owner is `disk`.
    pub(crate) fn owner(&self, path: &str, disk: (u32, u32)) -> (u32, u32) {
        match self.entries.get(path).and_then(|o| o.owner) {
            Some(o) => o,
            None if self.flattened => (0, 0),
            None => disk,
        }
    }

    /// The permission bits the canonical form gives `path`, whose on-disk bits are `disk`.
    pub(crate) fn mode(&self, path: &str, disk: u32) -> u32 {
        self.entries.get(path).and_then(|o| o.dir_mode).unwrap_or(disk)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
