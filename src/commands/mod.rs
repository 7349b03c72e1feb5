//! One function per subcommand: glue between the CLI, the store and the sandbox.

pub(crate) mod boot;
pub(crate) mod doctor;
pub(crate) mod envs;
pub(crate) mod export;
pub(crate) mod gc;
pub(crate) mod launchers;
pub(crate) mod layers;
#[cfg(feature = "registry")]
pub(crate) mod push;
pub(crate) mod run;
pub(crate) mod squash;
pub(crate) mod upper;

use std::io::Write;

use anyhow::{Context, Result};

/// Writes data to stdout. A closed pipe (`plyroot layers | head`) is not an error worth a word:
/// main ends quietly when it sees one.
pub(crate) fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes()).and_then(|_| o.flush()).context("cannot write to stdout")
}

pub(crate) fn out_json<T: serde::Serialize>(v: &T) -> Result<()> {
    out(&format!("{}\n", serde_json::to_string_pretty(v)?))
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

#[cfg(test)]
mod tests {
    #[test]
    fn human_sizes() {
        assert_eq!(super::human(512), "512 B");
        assert_eq!(super::human(1536), "1.5 KiB");
        assert_eq!(super::human(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
