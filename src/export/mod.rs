//! Handing an environment's root to other tools: the merged root as one reproducible rootfs
//! tarball ([`merge`]), or an OCI image layout whose layers are the plyroot layers' own canonical
//! tars ([`oci`]). Both go through the canonical serializer (`store::canonical`), so what is
//! exported is exactly what a layer id is the digest of.
//!
//! Files and directories are built unnamed or under a temporary name beside the destination and
//! renamed into place at the end ([`PendingFile`], [`PendingDir`]): a failed export leaves no
//! partial file, and an existing one untouched. Devices and FIFOs are written through, never
//! replaced ([`Output`]).

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
    Ok(dir_of(dest).join(format!(".{}.plyroot-{}.tmp", name.to_string_lossy(), std::process::id())))
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Where `export -o` writes a tarball. What the user named decides how, so that an export never
/// replaces something it does not own:
///
/// - `-`: standard output.
/// - a character device, a FIFO (or a link to one: `/dev/stdout`, a shell's `>(…)`): written
///   through, as `cat > PATH` would; replacing it would break `/dev/null` for the whole machine.
///   A link to the file stdout is open on (`-o /dev/stdout > FILE`) is stdout.
/// - a new name or a regular file: written beside it and renamed over it at the end.
/// - anything else is refused. A link to a regular file (or to nothing) is refused rather than
///   followed: replacing the link would lose it, and following it would replace a file the user
///   did not name (in a shared directory, a link someone else planted).
#[derive(Debug)]
pub(crate) enum Output {
    Stdout,
    Stream(File),
    File(PendingFile),
}

impl Output {
    pub(crate) fn open(path: &Path) -> Result<Output> {
        if path == Path::new("-") {
            return Ok(Output::Stdout);
        }
        let shown = path.display();
        let meta = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return PendingFile::create(path).map(Output::File),
            Err(e) => return Err(e).with_context(|| format!("cannot write {shown}")),
            Ok(m) => m,
        };
        let kind = meta.file_type();
        if kind.is_file() {
            return PendingFile::create(path).map(Output::File);
        }
        if kind.is_symlink() {
            let target = fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
            return match fs::metadata(path) {
                Ok(m) if is_stream(&m.file_type()) => Output::stream(path),
                // `-o /dev/stdout > FILE`: the file the shell opened for us, written through our
                // own stdout as with `-o -`.
                Ok(m) if is_stdout(&m) => Ok(Output::Stdout),
                Ok(m) if m.is_dir() => bail!("cannot write {shown}: it is a symbolic link to the directory {target}; give a file name, e.g. {shown}/rootfs.tar.zst"),
                Ok(_) => bail!("cannot write {shown}: it is a symbolic link (to {target}); plyroot replaces neither a link nor the file behind it: give the file's own path, or remove the link"),
                Err(_) => bail!("cannot write {shown}: it is a symbolic link to {target}, which does not exist; give the file's own path, or remove the link"),
            };
        }
        if is_stream(&kind) {
            return Output::stream(path);
        }
        if kind.is_dir() {
            bail!("cannot write {shown}: it is a directory (give a file name, e.g. {shown}/rootfs.tar.zst)");
        }
        bail!("cannot write {shown}: it is {}, not a file; plyroot writes a tarball to a new or regular file, a FIFO or a character device (or -o - for stdout)", kind_name(&kind))
    }

    fn stream(path: &Path) -> Result<Output> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let shown = path.display();
        if fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            bail!("cannot write {shown}: it is a socket, which cannot be opened by name; redirect stdout to it and give -o -");
        }
        // No O_CREAT, no O_TRUNC: this only ever opens what is there. A FIFO blocks here until a
        // reader opens it, as with `cat > FIFO`.
        let file = fs::OpenOptions::new().write(true).custom_flags(libc::O_NOCTTY).open(path).with_context(|| format!("cannot write {shown}"))?;
        let meta = file.metadata().with_context(|| format!("cannot write {shown}"))?;
        if !is_stream(&meta.file_type()) {
            bail!("cannot write {shown}: it was replaced while plyroot opened it; nothing was written, try again");
        }
        if rustix::termios::isatty(&file) {
            bail!("refusing to write a tarball to the terminal {shown}: give -o FILE, or redirect stdout and give -o -");
        }
        Ok(Output::Stream(file))
    }
}

/// Whether `m` describes the file our stdout is open on.
pub(crate) fn is_stdout(m: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    rustix::fs::fstat(std::io::stdout()).is_ok_and(|s| (s.st_dev, s.st_ino) == (m.dev(), m.ino()))
}

/// Outputs written through rather than replaced: character devices, FIFOs (and sockets, which
/// are refused by name with their own message).
fn is_stream(kind: &fs::FileType) -> bool {
    use std::os::unix::fs::FileTypeExt;
    kind.is_char_device() || kind.is_fifo() || kind.is_socket()
}

fn kind_name(kind: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "something other than a file"
    }
}

/// An output file written unnamed (`O_TMPFILE`) or under a temporary name, and put in place over
/// `dest` by [`commit`]. Dropped uncommitted, nothing is left: an unnamed file disappears with the
/// process, however it ends (kill -9 included), and a named one is removed. Where the filesystem
/// has no `O_TMPFILE` (or `/proc` is missing, which linking it needs) the named one is used.
///
/// [`commit`]: PendingFile::commit
#[derive(Debug)]
pub(crate) struct PendingFile {
    dest: PathBuf,
    /// The temporary name: the file's from the start, or (unnamed) the one it is linked to at
    /// commit for the rename.
    tmp: PathBuf,
    file: File,
    unnamed: bool,
    named: bool,
}

impl PendingFile {
    pub(crate) fn create(dest: &Path) -> Result<PendingFile> {
        if dest.is_dir() {
            bail!("cannot write {}: it is a directory (give a file name, e.g. {}/rootfs.tar.zst)", dest.display(), dest.display());
        }
        let tmp = temp_beside(dest)?;
        let dir = dir_of(dest);
        let unnamed = Path::new("/proc/self/fd").is_dir().then(|| {
            use rustix::fs::{Mode, OFlags, CWD};
            rustix::fs::openat(CWD, dir, OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC, Mode::from_raw_mode(0o666))
        });
        let file = match unnamed {
            Some(Ok(fd)) => return Ok(PendingFile { dest: dest.to_owned(), tmp, file: File::from(fd), unnamed: true, named: false }),
            // The filesystem has no O_TMPFILE: a named temporary file instead.
            Some(Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL)) | None => {
                let _ = fs::remove_file(&tmp);
                fs::OpenOptions::new().write(true).create_new(true).open(&tmp)
            }
            Some(Err(e)) => Err(io::Error::from(e)),
        };
        let file = file.with_context(|| format!("cannot write {} (creating a file in {} failed)", dest.display(), dir.display()))?;
        Ok(PendingFile { dest: dest.to_owned(), tmp, file, unnamed: false, named: true })
    }

    /// A handle on the temporary file (for a helper process to write through).
    pub(crate) fn handle(&self) -> Result<File> {
        self.file.try_clone().with_context(|| format!("cannot write {}", self.dest.display()))
    }

    /// Makes the file durable and puts it in place; returns its size.
    pub(crate) fn commit(mut self) -> Result<u64> {
        let dest = self.dest.display().to_string();
        self.file.sync_all().with_context(|| format!("cannot write {dest}"))?;
        let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        // What was a regular file (or nothing) when the export began may have been replaced
        // since; a rename would replace that too.
        if fs::symlink_metadata(&self.dest).is_ok_and(|m| !m.is_file()) {
            bail!("cannot write {dest}: it was replaced by something other than a file during the export; it is left as it is");
        }
        if self.unnamed {
            // linkat cannot replace a name: link to the temporary name, then rename that.
            let _ = fs::remove_file(&self.tmp);
            let fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&self.file));
            rustix::fs::linkat(rustix::fs::CWD, fd.as_str(), rustix::fs::CWD, &self.tmp, rustix::fs::AtFlags::SYMLINK_FOLLOW)
                .with_context(|| format!("cannot write {dest} (linking the new file as {} failed)", self.tmp.display()))?;
            self.named = true;
        }
        fs::rename(&self.tmp, &self.dest).with_context(|| format!("cannot write {dest} (renaming {} failed)", self.tmp.display()))?;
        self.named = false;
        // The rename is durable once the directory is.
        if let Ok(d) = File::open(dir_of(&self.dest)) {
            let _ = d.sync_all();
        }
        Ok(len)
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if self.named {
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
        // A link (even to an empty directory) is not followed: the layout would land wherever
        // it points, and replacing it would lose the link.
        Ok(m) if m.file_type().is_symlink() => {
            let target = fs::read_link(dest).map(|t| t.display().to_string()).unwrap_or_default();
            bail!("cannot write an OCI image layout into {}: it is a symbolic link (to {target}); give the directory's own path, or a new name", dest.display())
        }
        Ok(_) => bail!("cannot write an OCI image layout into {}: it exists and is not a directory; give a new name", dest.display()),
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
    fn output_writes_through_fifos_and_refuses_links() {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        assert!(matches!(Output::open(Path::new("-")).unwrap(), Output::Stdout));
        assert!(matches!(Output::open(&p("new.tar")).unwrap(), Output::File(_)));
        fs::write(p("old.tar"), "old").unwrap();
        assert!(matches!(Output::open(&p("old.tar")).unwrap(), Output::File(_)));
        rustix::fs::mknodat(rustix::fs::CWD, p("fifo"), rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o600), 0).unwrap();
        // A reader first, so that opening the write end does not wait.
        let _reader = rustix::fs::open(p("fifo"), rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK, rustix::fs::Mode::empty()).unwrap();
        std::os::unix::fs::symlink("fifo", p("to-fifo")).unwrap();
        assert!(matches!(Output::open(&p("fifo")).unwrap(), Output::Stream(_)));
        assert!(matches!(Output::open(&p("to-fifo")).unwrap(), Output::Stream(_)));
        std::os::unix::fs::symlink("old.tar", p("to-file")).unwrap();
        std::os::unix::fs::symlink("nothing", p("dangling")).unwrap();
        for refused in ["to-file", "dangling"] {
            let e = Output::open(&p(refused)).unwrap_err().to_string();
            assert!(e.contains("symbolic link") && e.contains(refused), "{e}");
        }
        assert!(Output::open(t.path()).unwrap_err().to_string().contains("directory"));
        let names: Vec<_> = fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 5, "opening made no file: {names:?}");
        assert_eq!(fs::read(p("old.tar")).unwrap(), b"old");
    }

    #[test]
    fn pending_file_does_not_replace_what_took_the_files_place() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("out.tar");
        let p = PendingFile::create(&dest).unwrap();
        p.handle().unwrap().write_all(b"new").unwrap();
        std::os::unix::fs::symlink("elsewhere", &dest).unwrap();
        assert!(p.commit().unwrap_err().to_string().contains("replaced"));
        assert_eq!(fs::read_link(&dest).unwrap(), Path::new("elsewhere"));
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1, "no temporary file left");
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
