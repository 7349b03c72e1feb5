//! Text for people: text from outside (archive entry names, layer sources, manifest strings,
//! registry replies, command lines, file names) made safe to show on a terminal, and sizes
//! ([`human`]).
//!
//! The rule, in one place:
//! - **stderr** (errors, warnings, notes, progress): every message is escaped where it is
//!   printed — in `main`, `diag` and `progress` — so no call site can forget it. A terminal never
//!   receives a control character from plyroot's diagnostics, and an error stays one line.
//! - **stdout data** (`layers`, `list`, `which`, `conflicts`, `diff`, …): each field that holds
//!   outside text goes through [`field`], which escapes only when stdout is a terminal. Piped or
//!   redirected, data stays exact (a name with a tab is that name); `--json` is always exact.
//!
//! Escaped are the C0 controls and DEL (`\n`, `\t`, `\r`, else `\xNN`), the C1 controls, and the
//! Unicode marks that reorder how a line reads (bidi overrides and isolates: `\u{202e}`).
//! Everything else, including non-ASCII letters and the backslash, is shown as it is.

use std::borrow::Cow;
use std::fmt::Write;
use std::sync::OnceLock;

/// Whether `c` must not reach a terminal as it is.
fn unsafe_char(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character escaped; borrowed when there is none (the common case).
pub(crate) fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        push_char(&mut out, c);
    }
    Cow::Owned(out)
}

fn push_char(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\t' => out.push_str("\\t"),
        '\r' => out.push_str("\\r"),
        c if (c as u32) < 0x80 && unsafe_char(c) => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if unsafe_char(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// Bytes (a file name, a command line) as escaped text: valid UTF-8 as [`escape`] shows it, every
/// other byte as `\xNN`, so two different names never look the same.
pub(crate) fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_char(&mut out, c);
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// Whether stdout is a terminal (asked once).
fn stdout_is_terminal() -> bool {
    static TTY: OnceLock<bool> = OnceLock::new();
    *TTY.get_or_init(|| rustix::termios::isatty(std::io::stdout()))
}

/// A field of data for stdout: escaped on a terminal, exact otherwise (see the module header).
pub(crate) fn field(s: &str) -> Cow<'_, str> {
    if stdout_is_terminal() {
        escape(s)
    } else {
        Cow::Borrowed(s)
    }
}

/// `12.3 MiB`-style sizes for people.
pub(crate) fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", units[u]) }
}

/// An error and its causes on one line, each separated by `: `, a cause left out when the line
/// already ends with it: an error that shows its source in its own message (`cannot read x:
/// {source}`) and also returns it as its source would otherwise print the OS's words twice.
pub(crate) fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if m.is_empty() || out.ends_with(&m) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_borrowed() {
        let cases: &[(&str, &str)] = &[
            ("usr/bin/gcc", "usr/bin/gcc"),
            ("naïve/日本語", "naïve/日本語"),
            ("a\\b", "a\\b"),
            ("title\x1b]0;owned\x07", "title\\x1b]0;owned\\x07"),
            ("clear\x1b[2J\x1b[H", "clear\\x1b[2J\\x1b[H"),
            ("two\nlines\r\tx", "two\\nlines\\r\\tx"),
            ("nul\0del\x7f", "nul\\x00del\\x7f"),
            ("csi\u{9b}2J", "csi\\u{9b}2J"),
            ("abc\u{202e}fed", "abc\\u{202e}fed"),
            ("iso\u{2066}x\u{2069}", "iso\\u{2066}x\\u{2069}"),
        ];
        for (raw, shown) in cases {
            assert_eq!(escape(raw), *shown, "{raw:?}");
            assert!(!escape(raw).chars().any(unsafe_char), "{raw:?}");
        }
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn bytes_keep_every_name_distinct() {
        assert_eq!(escape_bytes(b"etc/a\xff"), "etc/a\\xff");
        assert_eq!(escape_bytes(b"etc/a\xfe"), "etc/a\\xfe");
        assert_eq!(escape_bytes("etc/a\u{fffd}".as_bytes()), "etc/a\u{fffd}");
        assert_eq!(escape_bytes(b"x\x1b[31m"), "x\\x1b[31m");
    }

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let os = io.to_string();
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read x: {source}")]
        struct Doubling {
            source: std::io::Error,
        }
        let e = anyhow::Error::new(Doubling { source: io }).context("cannot import tar:x");
        let line = chain(&e);
        assert_eq!(line, format!("cannot import tar:x: cannot read x: {os}"));
        assert_eq!(line.matches(&os).count(), 1, "{line}");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(chain(&e), "outer: inner");
    }
}
