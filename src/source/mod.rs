//! Sources of layers: parsing `KIND:VALUE`, and unpacking archives, image layouts and directories
//! into staging directories the store provides.
//!
//! Files:
//! - `mod.rs`: [`Source`], [`Unpacked`], [`LayerSink`] and [`unpack`], the dispatch over kinds.
//! - `stage.rs`: creating entries inside a staging root safely (kernel-enforced containment via
//!   `openat2(RESOLVE_IN_ROOT)`, `*at` syscalls on the last component), ownership, xattrs, devices,
//!   whiteouts, the final directory pass.
//! - `tar.rs`: [`unpack_tar`], one tar stream into a stage; `tar_reader.rs`: the stream read as GNU
//!   tar reads it (formats, extensions, sparse maps).
//! - `whiteout.rs`: [`classify`], the OCI whiteout naming rule as a pure function.
//! - `compress.rs`: [`decompress`] by magic bytes, and a hashing reader for digest checks.
//! - `oci.rs`: OCI image layouts; `docker_archive.rs`: `docker save` archives; `dir.rs`: directory trees.
//! - `registry.rs`: `docker://` images, streamed from a registry through `oci.rs`'s verified path.
//! - `debootstrap.rs`: `debootstrap:SUITE`, a Debian root built by the host's mmdebstrap/debootstrap.
//! - `error.rs`: [`UnpackError`].
//!
//! Nothing here spawns a thread: namespaces are created later in the same process.

mod compress;
mod debootstrap;
mod dir;
mod docker_archive;
mod error;
mod import;
mod oci;
#[cfg(feature = "registry")]
mod registry;
mod stage;
mod tar;
mod tar_reader;
#[cfg(test)]
mod testutil;
mod whiteout;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::progress::Progress;
use crate::store::meta::{Ownership, Overrides};

pub(crate) use compress::decompress;
pub(crate) use dir::copy_dir;
pub(crate) use error::UnpackError;
pub(crate) use tar::unpack_tar;
pub(crate) use whiteout::{classify, Whiteout};

/// Where a layer comes from, as written on the command line and in manifests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// A directory tree, copied as is.
    Dir(PathBuf),
    /// A tar file, plain or compressed; `-` is stdin.
    Tar(PathBuf),
    /// An OCI image layout directory, optionally `DIR:TAG`.
    Oci(PathBuf),
    /// A `docker save`/`podman save` archive, optionally `FILE:TAG`.
    DockerArchive(PathBuf),
    /// A layer already in the store: `sha256:HEX` or a unique prefix of it.
    Layer(String),
    /// The current layers of another environment.
    Env(String),
    /// An image in a registry: `docker://REF` (`debian:bookworm`, `host:port/x/y@sha256:…`).
    Docker(String),
    /// A Debian root bootstrapped by the host's tools: `SUITE[?mirror=URL&variant=V&include=P,P]`.
    Debootstrap(String),
}

const KINDS: &str = "dir:PATH, tar:FILE (or tar:- for stdin), oci:DIR[:TAG], docker-archive:FILE[:TAG], layer:sha256:HEX, env:NAME, docker://REF, debootstrap:SUITE[?mirror=URL&variant=minbase&include=PKG,…]";

/// Why a source string does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid source '{input}': {reason}; a source is one of {KINDS}")]
pub(crate) struct ParseSourceError {
    input: String,
    reason: &'static str,
}

impl FromStr for Source {
    type Err = ParseSourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseSourceError { input: s.to_owned(), reason };
        let (kind, value) = s.split_once(':').ok_or_else(|| err("missing KIND: prefix"))?;
        if value.is_empty() {
            return Err(err("nothing after the colon"));
        }
        Ok(match kind {
            "dir" => Source::Dir(value.into()),
            "tar" => Source::Tar(value.into()),
            "oci" => Source::Oci(value.into()),
            "docker-archive" => Source::DockerArchive(value.into()),
            "layer" => Source::Layer(value.to_owned()),
            "env" => Source::Env(value.to_owned()),
            "docker" => match value.strip_prefix("//") {
                Some(r) if !r.is_empty() => Source::Docker(r.to_owned()),
                _ => return Err(err("a registry image is docker://REF, e.g. docker://debian:bookworm")),
            },
            "debootstrap" => Source::Debootstrap(value.to_owned()),
            _ => return Err(err("unknown kind")),
        })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Dir(p) => write!(f, "dir:{}", p.display()),
            Source::Tar(p) => write!(f, "tar:{}", p.display()),
            Source::Oci(p) => write!(f, "oci:{}", p.display()),
            Source::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
            Source::Layer(id) => write!(f, "layer:{id}"),
            Source::Env(name) => write!(f, "env:{name}"),
            Source::Docker(r) => write!(f, "docker://{r}"),
            Source::Debootstrap(s) => write!(f, "debootstrap:{s}"),
        }
    }
}

/// The xattrs of an archive that its files on disk do not carry, by name (escaped for messages)
/// and how many entries had each: the warning after an import names them.
#[derive(Debug, Default)]
pub(crate) struct UnsetXattrs {
    /// Not allowed or not supported here: kept in the layer's metadata instead.
    pub recorded: std::collections::BTreeMap<String, u64>,
    /// overlayfs's own (`user.overlay.*`), which would change how the stack reads: not kept.
    pub dropped: std::collections::BTreeMap<String, u64>,
}

impl UnsetXattrs {
    pub(crate) fn record(&mut self, name: &[u8]) {
        *self.recorded.entry(crate::text::escape_bytes(name)).or_default() += 1;
    }

    pub(crate) fn drop(&mut self, name: &[u8]) {
        *self.dropped.entry(crate::text::escape_bytes(name)).or_default() += 1;
    }

    pub(crate) fn add(&mut self, other: UnsetXattrs) {
        for (n, c) in other.recorded {
            *self.recorded.entry(n).or_default() += c;
        }
        for (n, c) in other.dropped {
            *self.dropped.entry(n).or_default() += c;
        }
    }

    /// How many attributes, over all entries.
    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.recorded.values().chain(self.dropped.values()).sum()
    }
}

/// Result of unpacking one layer into a staging root.
#[derive(Debug, Default)]
pub(crate) struct Unpacked {
    /// What the disk could not hold (owners, devices, xattrs).
    pub overrides: Overrides,
    /// Where the layer came from, for messages: e.g. `oci:./img layer 2/3 (sha256:…)`.
    pub description: String,
    /// Device nodes recorded in `overrides` instead of created (unprivileged imports).
    pub skipped_devices: u64,
    /// xattrs recorded in `overrides` instead of set, and `user.overlay.*` ones dropped.
    pub unset_xattrs: UnsetXattrs,
    /// Digests a registry knows this layer by (its compressed blob's, its diff_id), all verified.
    /// The store indexes them, so that a later pull skips the download, and publishes such a
    /// layer at once, so that an interrupted pull keeps the layers it completed.
    pub aliases: Vec<String>,
    /// Valid tar headers read (tar streams only): 0 means the input was not a tar archive.
    pub headers: u64,
}

/// Where unpacked layers go. The store implements this.
pub(crate) trait LayerSink {
    /// A fresh, empty staging directory for the next layer (an O_DIRECTORY fd, not O_PATH).
    fn stage(&mut self) -> anyhow::Result<OwnedFd>;
    /// The layer in the last staging dir is complete.
    fn finish(&mut self, stage: OwnedFd, unpacked: Unpacked) -> anyhow::Result<()>;
    /// When the store already holds the layer a source knows by one of `digests` (a registry
    /// blob's, a diff_id), takes it as the next layer (indexing the other digests too) and
    /// returns its id: the source then skips it. `None`: unpack it.
    #[cfg(feature = "registry")]
    fn known(&mut self, _digests: &[&str]) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    /// An unnamed temporary file where the layers go (gone when closed, or when the process is
    /// killed): a downloaded blob waits there until its digest is checked.
    #[cfg(feature = "registry")]
    fn scratch(&mut self) -> anyhow::Result<std::fs::File> {
        scratch_in(&std::env::temp_dir())
    }
}

/// An O_TMPFILE in `dir`.
#[cfg(feature = "registry")]
pub(crate) fn scratch_in(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    let fd = rustix::fs::open(dir, rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::from_raw_mode(0o600))
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    Ok(std::fs::File::from(fd))
}

/// Unpacks every layer of a `dir:`, `tar:`, `oci:`, `docker-archive:`, `docker://` or
/// `debootstrap:` source into `sink`,
/// bottom layer first. An error leaves the current stage unfinished for the caller to discard;
/// layers finished before it stay finished.
pub(crate) fn unpack(
    src: &Source,
    ownership: Ownership,
    progress: &mut Progress,
    sink: &mut dyn LayerSink,
) -> anyhow::Result<()> {
    match src {
        Source::Dir(path) => {
            let path = follow_top_symlink(path)?;
            let stage = sink.stage()?;
            let mut unpacked = copy_dir(&path, stage.as_fd(), ownership, progress)?;
            unpacked.description = src.to_string();
            progress.finish();
            sink.finish(stage, unpacked)
        }
        Source::Tar(path) if path == Path::new("-") => {
            progress.set_total(None);
            unpack_tar_stream(Box::new(io::stdin().lock()), &src.to_string(), ownership, progress, sink)
        }
        Source::Tar(path) => {
            let file = File::open(path).map_err(|source| UnpackError::Open { path: path.clone(), source })?;
            unpack_tar_file(file, &src.to_string(), ownership, progress, sink)
        }
        Source::Oci(path) => oci::unpack(path, &src.to_string(), ownership, progress, sink),
        Source::DockerArchive(path) => docker_archive::unpack(path, &src.to_string(), ownership, progress, sink),
        #[cfg(feature = "registry")]
        Source::Docker(r) => registry::unpack(r, &src.to_string(), ownership, progress, sink),
        #[cfg(not(feature = "registry"))]
        Source::Docker(_) => anyhow::bail!("cannot import {src}: this plyroot was built without registry support (cargo feature `registry`)"),
        Source::Debootstrap(spec) => debootstrap::unpack(spec, &src.to_string(), ownership, progress, sink),
        Source::Layer(_) | Source::Env(_) => Err(UnpackError::NotUnpackable { name: src.to_string() }.into()),
    }
}

/// Unpacks a `tar:` source's file, already open (the importer opens it to know it by its stamp,
/// and the stamp must be the file that is read).
pub(crate) fn unpack_tar_file(file: File, name: &str, ownership: Ownership, progress: &mut Progress, sink: &mut dyn LayerSink) -> anyhow::Result<()> {
    progress.set_total(file.metadata().ok().map(|m| m.len()));
    unpack_tar_stream(Box::new(file), name, ownership, progress, sink)
}

/// One tar stream (plain or compressed) as one layer.
fn unpack_tar_stream(input: Box<dyn io::Read + '_>, name: &str, ownership: Ownership, progress: &mut Progress, sink: &mut dyn LayerSink) -> anyhow::Result<()> {
    let mut input = decompress(progress.counting(input)).map_err(|e| UnpackError::read(name, e))?;
    let stage = sink.stage()?;
    let mut unpacked = unpack_tar(&mut input, name, stage.as_fd(), ownership, progress)?;
    // Empty input, or only zeros (`tar:/dev/null`, `tar:/dev/zero`, a failed download piped
    // into `tar:-`), is not an empty layer: the user would get an empty root.
    if unpacked.headers == 0 {
        return Err(UnpackError::NotTar { archive: name.to_owned(), reason: "it holds no tar header before its end (empty input, or only zeros)" }.into());
    }
    unpacked.description = name.to_owned();
    progress.finish();
    sink.finish(stage, unpacked)
}

/// The directory a `dir:` source names: a symlink given as the source itself is followed (only
/// that one; symlinks inside the tree are copied as symlinks).
fn follow_top_symlink(path: &Path) -> Result<PathBuf, UnpackError> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_symlink() => std::fs::canonicalize(path).map_err(|source| UnpackError::Open { path: path.to_owned(), source }),
        _ => Ok(path.to_owned()),
    }
}

/// Splits an optional `:TAG` off a path when the path as written does not exist, so that a
/// directory whose name contains a colon still works.
fn split_tag(path: &Path) -> (PathBuf, Option<String>) {
    if path.exists() {
        return (path.to_owned(), None);
    }
    if let Some((base, tag)) = path.to_str().and_then(|s| s.rsplit_once(':')) {
        if !base.is_empty() && !tag.is_empty() && !tag.contains('/') {
            return (base.into(), Some(tag.to_owned()));
        }
    }
    (path.to_owned(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        for s in [
            "dir:/tmp/root",
            "tar:-",
            "tar:debian.tar.zst",
            "oci:./img:latest",
            "docker-archive:img.tar",
            "layer:sha256:abc",
            "env:dev",
            "docker://debian:bookworm",
            "docker://127.0.0.1:5000/x/y@sha256:abc",
            "debootstrap:bookworm?variant=minbase",
        ] {
            let src: Source = s.parse().unwrap();
            assert_eq!(src.to_string(), s);
        }
        assert_eq!("tar:-".parse::<Source>().unwrap(), Source::Tar("-".into()));
        assert_eq!("layer:sha256:ab".parse::<Source>().unwrap(), Source::Layer("sha256:ab".into()));
    }

    #[test]
    fn rejects_unknown_kinds_naming_input_and_kinds() {
        for s in ["foo:bar", "debian.tar", "dir:", "docker:debian", "docker://"] {
            let msg = s.parse::<Source>().unwrap_err().to_string();
            assert!(msg.contains(&format!("'{s}'")), "{msg}");
            assert!(msg.contains("docker-archive:FILE"), "{msg}");
        }
    }

    #[test]
    fn splits_tag_only_when_path_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let with_colon = dir.path().join("a:b");
        std::fs::create_dir(&with_colon).unwrap();
        assert_eq!(split_tag(&with_colon), (with_colon.clone(), None));
        let tagged = dir.path().join("img:v1");
        assert_eq!(split_tag(&tagged), (dir.path().join("img"), Some("v1".to_owned())));
    }
}
