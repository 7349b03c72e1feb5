//! Handing an environment's root to other tools: the merged root as one reproducible rootfs
//! tarball ([`merge`]), or an OCI image layout whose layers are the plyroot layers' own canonical
//! tars ([`oci`]). Both go through the canonical serializer (`store::canonical`), so what is
//! exported is exactly what a layer id is the digest of.
//!
//! Outputs are written under a temporary name beside the destination and renamed into place at
//! the end ([`PendingFile`], [`PendingDir`]): a failed export leaves no partial file, and an
//! existing one untouched.

pub(crate) mod merge;
pub(crate) mod oci;

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// How a tarball is compressed, chosen by the output's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
}

impl Compression {
    /// `.tar` (or any name without a compression suffix) → none; `.gz`/`.tgz`, `.xz`/`.txz`,
    /// `.zst`/`.tzst` → that compressor. Suffixes of compressors plyroot does not write are an
    /// error rather than a silently uncompressed file with a misleading name.
    pub(crate) fn for_path(path: &Path) -> Result<Compression> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
        Ok(match ext {
            "gz" | "tgz" => Compression::Gzip,
            "xz" | "txz" => Compression::Xz,
            "zst" | "zstd" | "tzst" => Compression::Zstd,
            "bz2" | "tbz" | "tbz2" | "lz4" | "lz" | "lzma" | "lzo" | "z" | "br" => {
                bail!("cannot write {}: plyroot compresses with gzip, xz or zstd only; name it .tar, .tar.gz, .tar.xz or .tar.zst (or use -o - and pipe to your compressor)", path.display())
            }
            _ => Compression::None,
        })
    }
}

/// A compressor whose output depends on nothing but its input: gzip with a zero mtime, no
/// file name and the "unknown" OS byte; xz and zstd single-threaded at fixed levels.
pub(crate) enum Encoder<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Xz(xz2::write::XzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    pub(crate) fn new(c: Compression, out: W) -> io::Result<Encoder<W>> {
        Ok(match c {
            Compression::None => Encoder::Plain(out),
            Compression::Gzip => Encoder::Gzip(flate2::GzBuilder::new().mtime(0).operating_system(255).write(out, flate2::Compression::default())),
            Compression::Xz => Encoder::Xz(xz2::write::XzEncoder::new(out, 6)),
            Compression::Zstd => {
                let mut z = zstd::stream::write::Encoder::new(out, zstd::DEFAULT_COMPRESSION_LEVEL)?;
                z.include_checksum(true)?;
                Encoder::Zstd(z)
            }
        })
    }

    /// Ends the compressed stream and gives the underlying writer back.
    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(w) => Ok(w),
            Encoder::Gzip(g) => g.finish(),
            Encoder::Xz(x) => x.finish(),
            Encoder::Zstd(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Xz(x) => x.write(buf),
            Encoder::Zstd(z) => z.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Gzip(g) => g.flush(),
            Encoder::Xz(x) => x.flush(),
            Encoder::Zstd(z) => z.flush(),
        }
    }
}

/// `SOURCE_DATE_EPOCH` (reproducible-builds.org): when set, no exported mtime is later.
pub(crate) fn source_date_epoch() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => v.trim().parse::<u64>().map(Some).with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970 (unset it, or set e.g. SOURCE_DATE_EPOCH=$(git log -1 --format=%ct))")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => bail!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970"),
    }
}

/// A temporary name beside `dest`, in the same directory so that the final rename is atomic.
fn temp_beside(dest: &Path) -> Result<PathBuf> {
    let name = dest.file_name().with_context(|| format!("cannot write {}: it names no file", dest.display()))?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(dir.join(format!(".{}.plyroot-{}.tmp", name.to_string_lossy(), std::process::id())))
}

/// An output file written under a temporary name and renamed over `dest` by [`commit`]; dropped
/// uncommitted, the temporary file is removed.
///
/// [`commit`]: PendingFile::commit
#[derive(Debug)]
pub(crate) struct PendingFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: File,
    done: bool,
}

impl PendingFile {
    pub(crate) fn create(dest: &Path) -> Result<PendingFile> {
        if dest.is_dir() {
            bail!("cannot write {}: it is a directory (give a file name, e.g. {}/rootfs.tar.zst)", dest.display(), dest.display());
        }
        let tmp = temp_beside(dest)?;
        let _ = fs::remove_file(&tmp);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("cannot write {} (creating {} failed)", dest.display(), tmp.display()))?;
        Ok(PendingFile { dest: dest.to_owned(), tmp, file, done: false })
    }

    /// A handle on the temporary file (for a helper process to write through).
    pub(crate) fn handle(&self) -> Result<File> {
        self.file.try_clone().with_context(|| format!("cannot write {}", self.tmp.display()))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.dest
    }

    /// Makes the file durable and puts it in place.
    pub(crate) fn commit(mut self) -> Result<u64> {
        self.file.sync_all().with_context(|| format!("cannot write {}", self.tmp.display()))?;
        let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        fs::rename(&self.tmp, &self.dest).with_context(|| format!("cannot write {} (renaming {} failed)", self.dest.display(), self.tmp.display()))?;
        self.done = true;
        Ok(len)
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// An output directory built under a temporary name and renamed to `dest` by [`commit`]; dropped
/// uncommitted, the temporary tree is removed. `dest` must not exist, or be an empty directory.
///
/// [`commit`]: PendingDir::commit
#[derive(Debug)]
pub(crate) struct PendingDir {
    dest: PathBuf,
    pub tmp: PathBuf,
    done: bool,
}

impl PendingDir {
    pub(crate) fn create(dest: &Path) -> Result<PendingDir> {
        check_free(dest)?;
        let tmp = temp_beside(dest)?;
        let _ = crate::store::remove_tree(&tmp);
        fs::create_dir(&tmp).with_context(|| format!("cannot write {} (creating {} failed)", dest.display(), tmp.display()))?;
        Ok(PendingDir { dest: dest.to_owned(), tmp, done: false })
    }

    pub(crate) fn commit(mut self) -> Result<()> {
        check_free(&self.dest)?;
        if self.dest.is_dir() {
            fs::remove_dir(&self.dest).with_context(|| format!("cannot replace the empty directory {}", self.dest.display()))?;
        }
        fs::rename(&self.tmp, &self.dest).with_context(|| format!("cannot write {} (renaming {} failed)", self.dest.display(), self.tmp.display()))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for PendingDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = crate::store::remove_tree(&self.tmp);
        }
    }
}

/// An image layout is never merged into an existing directory's content: that would mix blobs
/// and indexes of other images with this one.
fn check_free(dest: &Path) -> Result<()> {
    match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot write {}", dest.display())),
        Ok(m) if m.is_dir() => {
            let empty = fs::read_dir(dest).with_context(|| format!("cannot read {}", dest.display()))?.next().is_none();
            if !empty {
                bail!("cannot write an OCI image layout into {}: it exists and is not empty; remove it or name a new directory", dest.display());
            }
            Ok(())
        }
        Ok(_) => bail!("cannot write an OCI image layout into {}: it exists and is not a directory", dest.display()),
    }
}

/// Buffered output for the canonical writer (which writes 512-byte headers).
pub(crate) fn buffered<W: Write>(w: W) -> BufWriter<W> {
    BufWriter::with_capacity(1 << 20, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_by_name() {
        let c = |n: &str| Compression::for_path(Path::new(n));
        assert_eq!(c("root.tar").unwrap(), Compression::None);
        assert_eq!(c("/x/root.tar.gz").unwrap(), Compression::Gzip);
        assert_eq!(c("root.tgz").unwrap(), Compression::Gzip);
        assert_eq!(c("root.tar.xz").unwrap(), Compression::Xz);
        assert_eq!(c("root.tar.ZST").unwrap(), Compression::Zstd);
        assert_eq!(c("rootfs").unwrap(), Compression::None);
        assert!(c("root.tar.bz2").unwrap_err().to_string().contains("root.tar.bz2"));
    }

    #[test]
    fn compressed_output_is_deterministic_and_decodes() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for c in [Compression::None, Compression::Gzip, Compression::Xz, Compression::Zstd] {
            let enc = |d: &[u8]| {
                let mut e = Encoder::new(c, Vec::new()).unwrap();
                e.write_all(d).unwrap();
                e.finish().unwrap()
            };
            let (a, b) = (enc(&data), enc(&data));
            assert_eq!(a, b, "{c:?}");
            let mut back = Vec::new();
            io::Read::read_to_end(&mut crate::source::decompress(&a[..]).unwrap(), &mut back).unwrap();
            assert_eq!(back, data, "{c:?}");
            if c == Compression::Gzip {
                assert_eq!(&a[4..8], &[0, 0, 0, 0], "gzip mtime is zero");
                assert_eq!(a[3] & 0x08, 0, "no file name in the gzip header");
            }
        }
    }

    #[test]
    fn pending_file_leaves_nothing_unless_committed() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("out.tar");
        fs::write(&dest, "old").unwrap();
        {
            let p = PendingFile::create(&dest).unwrap();
            p.handle().unwrap().write_all(b"partial").unwrap();
        }
        assert_eq!(fs::read(&dest).unwrap(), b"old");
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1, "no temporary file left");
        let p = PendingFile::create(&dest).unwrap();
        p.handle().unwrap().write_all(b"new").unwrap();
        p.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn pending_dir_refuses_a_non_empty_directory() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("img");
        fs::create_dir(&dest).unwrap();
        let p = PendingDir::create(&dest).unwrap();
        fs::write(p.tmp.join("oci-layout"), "{}").unwrap();
        p.commit().unwrap();
        assert!(dest.join("oci-layout").exists());
        assert!(PendingDir::create(&dest).unwrap_err().to_string().contains("not empty"));
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
    }
}
