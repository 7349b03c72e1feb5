//! One function per subcommand: glue between the CLI, the store and the sandbox.

pub(crate) mod boot;
pub(crate) mod completions;
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

/// Sizes for people, as `push` names them (`super::human`).
#[cfg(feature = "registry")]
pub(crate) use crate::text::human;

/// Writes data to stdout. A closed pipe (`plyroot layers | head`) is not an error worth a word:
/// main ends quietly when it sees one.
pub(crate) fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes()).and_then(|_| o.flush()).context("cannot write to stdout")
}

pub(crate) fn out_json<T: serde::Serialize>(v: &T) -> Result<()> {
    out(&format!("{}\n", serde_json::to_string_pretty(v)?))
}
