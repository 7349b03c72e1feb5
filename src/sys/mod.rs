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
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}{}", path.display(), kernel_msg(.detail))]
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
