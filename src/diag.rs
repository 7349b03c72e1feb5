//! Diagnostics on stderr, filtered by `-q`/`-v`. No logger crate: plyroot prints a handful of
//! lines, and each is a sentence for a person. Every line is escaped here ([`crate::text`]): a
//! message may quote an entry name or a source, which must not drive the terminal.

use std::sync::atomic::{AtomicU8, Ordering};

/// 0 quiet, 1 normal, 2+ verbose.
static LEVEL: AtomicU8 = AtomicU8::new(1);

pub(crate) fn set_level(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
}

pub(crate) fn level() -> u8 {
    LEVEL.load(Ordering::Relaxed)
}

pub(crate) fn warn(msg: &str) {
    if level() >= 1 {
        eprintln!("plyroot: warning: {}", crate::text::escape(msg));
    }
}

pub(crate) fn info(msg: &str) {
    if level() >= 1 {
        eprintln!("plyroot: {}", crate::text::escape(msg));
    }
}

pub(crate) fn debug(msg: &str) {
    if level() >= 2 {
        eprintln!("plyroot: {}", crate::text::escape(msg));
    }
}

/// Quotes another program's output (a log's last lines) under the error that follows it, one
/// escaped line each, indented; shown even with `-q`, as the error is.
pub(crate) fn quote(output: &str) {
    for l in output.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("  {}", crate::text::escape(l));
    }
}
