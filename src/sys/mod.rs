//! Mechanism: thin wrappers over the Linux syscalls plyroot needs. This is the only module allowed
//! `unsafe`; every block says why it is sound. Policy (what to mount where) lives in `sandbox/`.

pub(crate) mod mount;
pub(crate) mod ns;
pub(crate) mod process;
pub(crate) mod procs;
pub(crate) mod xattr;

use std::io;
use std::path::PathBuf;

/// A failed kernel operation: what was attempted, on which path, and the kernel's own words
/// (the fs-context error text) where it gave any.
///
/// The OS error is the `source`, not part of this message: `main` prints the cause chain, and a
/// message that also quoted it printed `…: No such file or directory (os error 2): No such file
/// or directory (os error 2)`.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}{}", path.display(), kernel_msg(.detail))]
pub(crate) struct SysError {
    pub op: &'static str,
    pub path: PathBuf,
    pub detail: Option<String>,
    #[source]
    pub source: io::Error,
}

fn kernel_msg(d: &Option<String>) -> String {
    match d {
        Some(d) if !d.is_empty() => format!(" (kernel: {d})"),
        _ => String::new(),
    }
}

pub(crate) type Result<T> = std::result::Result<T, SysError>;

pub(crate) fn err(op: &'static str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> SysError {
    SysError { op, path: path.into(), detail: None, source: source.into() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_os_error_is_said_once() {
        let e = anyhow::Error::new(super::err("open", "/nonexistent", std::io::Error::from_raw_os_error(libc::ENOENT)));
        let os = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
        let line = format!("{e:#}");
        assert_eq!(line, format!("open /nonexistent: {os}"));
        let mut k = super::err("add overlay lower", "/l", std::io::Error::from_raw_os_error(libc::EINVAL));
        k.detail = Some("overlayfs: too many lower directories".into());
        assert_eq!(format!("{:#}", anyhow::Error::new(k)).matches("os error").count(), 1);
    }
}
