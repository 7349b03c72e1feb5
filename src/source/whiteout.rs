//! The OCI whiteout naming rule, as one pure function of an entry's path.
//!
//! In an OCI (and docker) layer tar, `DIR/.wh.NAME` means "DIR/NAME of the layers below is
//! deleted" and `DIR/.wh..wh..opq` means "DIR hides everything below it". Other `.wh..wh.*`
//! names are aufs bookkeeping that docker ignores, and so do we. The unpacker turns these into
//! the overlayfs forms (a char 0:0 node, the `user.overlay.opaque` xattr).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const PREFIX: &[u8] = b".wh.";
const META_PREFIX: &[u8] = b".wh..wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Whiteout<'a> {
    /// An ordinary entry.
    None,
    /// `dir/.wh.name`: delete `dir/name`.
    Remove { dir: &'a Path, name: &'a OsStr },
    /// `dir/.wh..wh..opq`: `dir` is opaque.
    Opaque { dir: &'a Path },
    /// Other `.wh..wh.*` (aufs metadata): skip the entry.
    Ignore,
    /// `.wh.`, `.wh..` or `.wh...`: a whiteout of nothing, `.` or `..`, which no layer can mean.
    Invalid,
}

/// Classifies a normalized relative path (no leading `/`, no `.` or `..` components).
pub(crate) fn classify(path: &Path) -> Whiteout<'_> {
    let Some(file_name) = path.file_name() else { return Whiteout::None };
    let bytes = file_name.as_bytes();
    if !bytes.starts_with(PREFIX) {
        return Whiteout::None;
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    if bytes == OPAQUE {
        return Whiteout::Opaque { dir };
    }
    if bytes.starts_with(META_PREFIX) {
        return Whiteout::Ignore;
    }
    let name = &bytes[PREFIX.len()..];
    if name.is_empty() || name == b"." || name == b".." {
        return Whiteout::Invalid;
    }
    Whiteout::Remove { dir, name: OsStr::from_bytes(name) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remove<'a>(dir: &'a str, name: &'a str) -> Whiteout<'a> {
        Whiteout::Remove { dir: Path::new(dir), name: OsStr::new(name) }
    }

    #[test]
    fn table() {
        let cases: &[(&str, Whiteout)] = &[
            ("etc/passwd", Whiteout::None),
            ("etc", Whiteout::None),
            ("etc/wh.foo", Whiteout::None),
            ("etc/.whfoo", Whiteout::None),
            ("etc/foo.wh.bar", Whiteout::None),
            (".wh.foo/bar", Whiteout::None),
            ("etc/.wh.passwd", remove("etc", "passwd")),
            (".wh.etc", remove("", "etc")),
            ("a/b/c/.wh..hidden", remove("a/b/c", ".hidden")),
            ("a/.wh..wh.x", Whiteout::Ignore),
            ("a/.wh..wh.plnk", Whiteout::Ignore),
            ("usr/share/.wh..wh..opq", Whiteout::Opaque { dir: Path::new("usr/share") }),
            (".wh..wh..opq", Whiteout::Opaque { dir: Path::new("") }),
            ("a/.wh.", Whiteout::Invalid),
            ("a/.wh..", Whiteout::Invalid),
            ("a/.wh...", Whiteout::Invalid),
            ("a/.wh....", remove("a", "...")),
            ("", Whiteout::None),
        ];
        for (path, want) in cases {
            assert_eq!(&classify(Path::new(path)), want, "{path}");
        }
    }
}
