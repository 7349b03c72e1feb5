//! Names a user writes that the rest of plyroot relies on, checked in one place: environment
//! names (they become directory and launcher names), host shares (`no_host`, `--no-host`) and
//! the choice of `/nix` (`nix`, `--nix`).
//! Plain domain types: the manifest, the store and the sandbox use them, and `cli` maps its
//! arguments to them.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

/// Checks an environment name: it becomes a directory name and a launcher name.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with(['.', '-']);
    if !ok {
        bail!("'{name}' is not a valid environment name: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'");
    }
    Ok(())
}

/// A host resource shared into an environment by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum HostShare {
    All,
    Proc,
    Dev,
    Gpu,
    Sys,
    Tmp,
    Home,
    RuntimeDir,
    X11,
    Resolv,
    Hosts,
    Localtime,
    Nix,
}

impl HostShare {
    /// Every share, in the order `--help` and errors list them.
    pub(crate) const ALL: [HostShare; 13] = [
        HostShare::All,
        HostShare::Proc,
        HostShare::Dev,
        HostShare::Gpu,
        HostShare::Sys,
        HostShare::Tmp,
        HostShare::Home,
        HostShare::RuntimeDir,
        HostShare::X11,
        HostShare::Resolv,
        HostShare::Hosts,
        HostShare::Localtime,
        HostShare::Nix,
    ];

    /// The name users write.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HostShare::All => "all",
            HostShare::Proc => "proc",
            HostShare::Dev => "dev",
            HostShare::Gpu => "gpu",
            HostShare::Sys => "sys",
            HostShare::Tmp => "tmp",
            HostShare::Home => "home",
            HostShare::RuntimeDir => "runtime-dir",
            HostShare::X11 => "x11",
            HostShare::Resolv => "resolv",
            HostShare::Hosts => "hosts",
            HostShare::Localtime => "localtime",
            HostShare::Nix => "nix",
        }
    }

    /// What the share is, for `--help`.
    pub(crate) fn about(self) -> &'static str {
        match self {
            HostShare::All => "Every item below",
            HostShare::Proc => "/proc",
            HostShare::Dev => "a minimal /dev (null, zero, full, random, urandom, tty, pts, shm)",
            HostShare::Gpu => "GPU device nodes (/dev/dri, /dev/nvidia*)",
            HostShare::Sys => "/sys, read-only",
            HostShare::Tmp => "/tmp (also carries the X11 socket)",
            HostShare::Home => "your home directory",
            HostShare::RuntimeDir => "$XDG_RUNTIME_DIR (Wayland, PipeWire/PulseAudio, D-Bus)",
            HostShare::X11 => "the X11 socket and $XAUTHORITY",
            HostShare::Resolv => "/etc/resolv.conf",
            HostShare::Hosts => "/etc/hosts",
            HostShare::Localtime => "/etc/localtime",
            HostShare::Nix => "/nix, when the host has it",
        }
    }
}

/// Which `/nix` an environment sees (`nix = …` in a manifest, `run --nix`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum NixStore {
    /// The host's `/nix`, bound read-write over whatever the layers have there.
    Host,
    /// The layers' `/nix` (and the upper's), never the host's.
    Layers,
    /// The host's `/nix/store` as a read-only lower under the layers' and the environment's
    /// upper, with the environment's own copy of the host's Nix database.
    Overlay,
}

impl NixStore {
    pub(crate) const ALL: [NixStore; 3] = [NixStore::Host, NixStore::Layers, NixStore::Overlay];

    /// The name users write.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NixStore::Host => "host",
            NixStore::Layers => "layers",
            NixStore::Overlay => "overlay",
        }
    }

    /// What the choice means, for `--help`.
    pub(crate) fn about(self) -> &'static str {
        match self {
            NixStore::Host => "the host's /nix, shared read-write (hides the layers' /nix)",
            NixStore::Layers => "the layers' /nix, never the host's",
            NixStore::Overlay => "the host's /nix/store read-only under the environment's own writes, with its own copy of the host's Nix database",
        }
    }
}

/// A name that is no `/nix` choice; says which are.
#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a choice of /nix; accepted: {accepted}", accepted = NixStore::ALL.map(NixStore::as_str).join(", "))]
pub(crate) struct NotANixStore(pub String);

impl FromStr for NixStore {
    type Err = NotANixStore;

    fn from_str(s: &str) -> Result<NixStore, NotANixStore> {
        NixStore::ALL.into_iter().find(|n| n.as_str() == s).ok_or_else(|| NotANixStore(s.to_owned()))
    }
}

/// A name that is no host share; says which are.
#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a host share; accepted: {accepted}", accepted = HostShare::ALL.map(HostShare::as_str).join(", "))]
pub(crate) struct NotAShare(pub String);

impl FromStr for HostShare {
    type Err = NotAShare;

    /// Exact names, as `as_str` gives them (case matters, as it did for the CLI).
    fn from_str(s: &str) -> Result<HostShare, NotAShare> {
        HostShare::ALL.into_iter().find(|h| h.as_str() == s).ok_or_else(|| NotAShare(s.to_owned()))
    }
}

impl fmt::Display for HostShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        for ok in ["dev", "a", "x.y_z-1", &"n".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "é", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shares_round_trip_by_name() {
        for h in HostShare::ALL {
            assert_eq!(h.as_str().parse::<HostShare>().unwrap(), h);
            assert!(!h.about().is_empty());
        }
        let e = "x12".parse::<HostShare>().unwrap_err().to_string();
        assert!(e.starts_with("'x12' is not a host share; accepted: all, proc, dev,"), "{e}");
        assert!("Home".parse::<HostShare>().is_err(), "case matters");
    }

    #[test]
    fn nix_choices_round_trip_by_name() {
        for n in NixStore::ALL {
            assert_eq!(n.as_str().parse::<NixStore>().unwrap(), n);
            assert!(!n.about().is_empty());
        }
        let e = "both".parse::<NixStore>().unwrap_err().to_string();
        assert_eq!(e, "'both' is not a choice of /nix; accepted: host, layers, overlay");
    }
}
