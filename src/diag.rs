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

/// Writes one diagnostic line; called by the macros below once the level let it through.
pub(crate) fn emit(prefix: &str, msg: std::fmt::Arguments<'_>) {
    eprintln!("plyroot: {prefix}{}", crate::text::escape(&msg.to_string()));
}

/// `warn!("...", args)`: a warning, shown unless `-q`. The message is formatted only when shown.
macro_rules! warn_ {
    ($($arg:tt)*) => {
        if $crate::diag::level() >= 1 {
            $crate::diag::emit("warning: ", format_args!($($arg)*))
        }
    };
}

/// `info!("...", args)`: a line of progress or a note, shown unless `-q`.
macro_rules! info {
    ($($arg:tt)*) => {
        if $crate::diag::level() >= 1 {
            $crate::diag::emit("", format_args!($($arg)*))
        }
    };
}

/// `debug!("...", args)`: shown with `-v`; nothing is formatted otherwise.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::diag::level() >= 2 {
            $crate::diag::emit("", format_args!($($arg)*))
        }
    };
}

pub(crate) use {debug, info, warn_ as warn};

/// Quotes another program's output (a log's last lines) under the error that follows it, one
/// escaped line each, indented; shown even with `-q`, as the error is.
pub(crate) fn quote(output: &str) {
    for l in output.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("  {}", crate::text::escape(l));
    }
}
