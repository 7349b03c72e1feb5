//! OCI registries: the protocol under `docker://REF` sources (read by `source::registry`) and
//! `plyroot push` (`commands::push`).
//!
//! Files:
//! - `reference.rs`: [`Reference`] (`debian` → `docker.io/library/debian:latest`) and [`Platform`].
//! - `http.rs`: HTTP over ureq (rustls/ring): one connection pool per operation, redirects,
//!   per-registry CAs, deadlines; no threads.
//! - `socket.rs`: the TCP transport under ureq, which holds a send to the same deadlines as a
//!   receive.
//! - `proxy.rs`: which proxy a request goes through (`HTTPS_PROXY`, `NO_PROXY`, …).
//! - `auth.rs`: credential files (podman's `auth.json`, docker's `config.json`), challenges, base64.
//! - `client.rs`: [`Client`], the distribution API for one repository, with token auth.
//!
//! Settings that come from the command line (`--insecure`, `--platform`) are process-wide, as
//! diag's level is: a `docker://` source is resolved deep inside the store's import, and the same
//! source string appears in manifests and lock files, where no flag can ride along. Environment
//! variables give the same settings without flags: `PLYROOT_INSECURE_REGISTRIES=host:port,…`,
//! `PLYROOT_PLATFORM=os/arch[/variant]`.
//!
//! Everything here runs on the main thread and before any namespace is created: network work
//! never overlaps with `unshare` (ARCHITECTURE).

pub(crate) mod auth;
pub(crate) mod client;
pub(crate) mod http;
pub(crate) mod proxy;
pub(crate) mod reference;
mod socket;

use std::sync::OnceLock;

pub(crate) use client::Client;
pub(crate) use reference::{Platform, Reference};

/// A failed registry operation: each names what was being done and where.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// An HTTP failure in the middle of a named step (an upload).
    #[error("{what}")]
    During {
        what: String,
        #[source]
        source: http::HttpError,
    },
    #[error("{what}: the registry answered HTTP {status}{hint}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Status { what: String, status: u16, detail: String, hint: String },
    #[error("cannot authenticate with {registry}: {reason}")]
    Auth { registry: String, reason: String },
    #[error("{what} is corrupt: expected {expected}, got {actual}")]
    Digest { what: String, expected: String, actual: String },
    #[error("{what}: {reason}")]
    Protocol { what: String, reason: String },
}

/// Registry settings from the command line.
#[derive(Clone, Debug, Default)]
pub(crate) struct Options {
    /// Talk plain HTTP to every registry this command names.
    pub insecure: bool,
    /// The platform to choose from multi-platform images.
    pub platform: Option<Platform>,
}

static OPTIONS: OnceLock<Options> = OnceLock::new();

/// Sets the command line's registry settings; the first call wins (main calls it once).
pub(crate) fn set_options(o: Options) {
    let _ = OPTIONS.set(o);
}

/// Whether to use plain HTTP for `registry` (`host[:port]`): `--insecure`, or the registry is
/// listed in `PLYROOT_INSECURE_REGISTRIES`.
pub(crate) fn insecure(registry: &str) -> bool {
    if OPTIONS.get().is_some_and(|o| o.insecure) {
        return true;
    }
    std::env::var("PLYROOT_INSECURE_REGISTRIES").is_ok_and(|list| list.split([',', ' ']).any(|r| !r.is_empty() && r.trim() == registry))
}

/// The platform to pull: `--platform`, else `PLYROOT_PLATFORM`, else this machine's.
pub(crate) fn platform() -> anyhow::Result<Platform> {
    if let Some(p) = OPTIONS.get().and_then(|o| o.platform.clone()) {
        return Ok(p);
    }
    match std::env::var("PLYROOT_PLATFORM") {
        Ok(v) if !v.trim().is_empty() => Platform::parse(v.trim()).map_err(|e| anyhow::anyhow!("PLYROOT_PLATFORM: {e}")),
        _ => Ok(Platform::host()),
    }
}

pub(crate) use crate::oci::sha256;

/// How many threads this process has (`Threads:` in `/proc/self/status`). A registry operation
/// must leave exactly one: plyroot makes user namespaces later in the same process, and
/// `unshare(CLONE_NEWUSER)` fails in a threaded one. Shown at `-v` after a pull or push, where
/// the tests check it.
pub(crate) fn threads() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).map_or_else(|| "an unknown number of".to_owned(), |n| n.trim().to_owned())
}
