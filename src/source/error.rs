//! The errors of reading a source: one variant per failed operation, each naming the archive (or
//! image) and, where there is one, the entry; the cause is the `source`, printed once by `main`.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub(crate) enum UnpackError {
    /// Opening a source file or directory, or a blob in it.
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Reading the archive stream itself (a tar header, a compressed block, a seek).
    #[error("cannot read {archive}")]
    Read {
        archive: String,
        #[source]
        source: io::Error,
    },

    /// Creating one entry in the staging directory; `step` says which syscall's job failed.
    #[error("cannot unpack '{entry}' from {archive}: {step}")]
    Unpack {
        archive: String,
        entry: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },

    /// An entry that would escape the staging root or that no filesystem can hold.
    #[error("refusing to unpack '{entry}' from {archive}: {reason}")]
    Unsafe { archive: String, entry: String, reason: &'static str },

    /// A hardlink whose target is not (yet) in the staging directory.
    #[error("cannot unpack '{entry}' from {archive}: its hardlink target '{target}' is not in the layer")]
    LinkTarget {
        archive: String,
        entry: String,
        target: String,
        #[source]
        source: io::Error,
    },

    /// A tar stream damaged or malformed where GNU tar reports an error too: a bad checksum after
    /// the first header, a malformed extended header or sparse map.
    #[error("cannot unpack {archive}: {reason} (at byte {offset}); the archive is damaged, or was not written by a tar program")]
    Damaged { archive: String, offset: u64, reason: String },

    /// Input with no tar header before its end: empty, all zeros, or something else entirely.
    #[error("{archive} is not a tar archive: {reason}")]
    NotTar { archive: String, reason: &'static str },

    /// A blob or an uncompressed layer whose sha256 is not the one it is named by.
    #[error("{what} is corrupt: expected {expected}, got {actual}")]
    Digest { what: String, expected: String, actual: String },

    /// A JSON document (index, manifest, config) that does not parse.
    #[error("cannot parse {what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },

    /// A well-formed image description that plyroot cannot use; `reason` says why and what to do.
    #[error("{image}: {reason}")]
    Image { image: String, reason: String },

    /// `layer:` and `env:` name things in the store, not archives.
    #[error("{name} is not an archive or a directory; the store resolves it")]
    NotUnpackable { name: String },
}

impl UnpackError {
    pub(crate) fn read(archive: &str, source: io::Error) -> Self {
        Self::Read { archive: archive.to_owned(), source }
    }
}
