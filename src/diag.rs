//! Diagnostics on stderr, filtered by `-q`/`-v`. No logger crate: plyroot prints a handful of
//! lines, and each is a sentence for a person.

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
        eprintln!("plyroot: warning: {msg}");
    }
}

pub(crate) fn info(msg: &str) {
    if level() >= 1 {
        eprintln!("plyroot: {msg}");
    }
}

pub(crate) fn debug(msg: &str) {
    if level() >= 2 {
        eprintln!("plyroot: {msg}");
    }
}
