//! Environments and their generations.
//!
//! An environment is a directory under `envs/`; each generation is an immutable JSON record and
//! `current` is a symlink to one of them, switched by writing a new symlink and renaming it over
//! the old one, so a crash leaves either the old or the new generation current, never neither.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{now_secs, write_atomic, Store};

/// One immutable record of an environment's resolved content.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Generation {
    pub number: u32,
    /// Seconds since the epoch.
    pub created: u64,
    /// Layer ids, bottom first.
    pub layers: Vec<String>,
    /// The sources the layers were resolved from, as given.
    pub sources: Vec<String>,
}

#[derive(Debug)]
pub(crate) struct Env {
    pub name: String,
    pub dir: PathBuf,
}

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

impl Store {
    pub(crate) fn env(&self, name: &str) -> Result<Env> {
        check_name(name)?;
        let dir = self.envs_dir().join(name);
        if !dir.join("current").exists() {
            bail!("no environment named '{name}' in {} (see `plyroot list`, or create it with `plyroot create {name} --from SOURCE`)", self.root.display());
        }
        Ok(Env { name: name.to_owned(), dir })
    }

    pub(crate) fn envs(&self) -> Result<Vec<Env>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(self.envs_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", self.envs_dir().display())),
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_ok() && e.path().join("current").exists() {
                out.push(Env { name, dir: e.path() });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Creates an environment whose first generation holds `layers`. The directory is built under
    /// tmp/ and renamed into place, so a half-created environment is never visible.
    pub(crate) fn create_env(&self, name: &str, layers: Vec<String>, sources: Vec<String>) -> Result<Env> {
        check_name(name)?;
        let dest = self.envs_dir().join(name);
        if dest.exists() {
            bail!("environment '{name}' already exists: use another name, or remove it first with `plyroot rm {name}`");
        }
        let st = self.staging()?;
        let dir = st.path.join("env");
        for sub in ["generations", "upper", "work", "runs", "mnt", "skel"] {
            fs::DirBuilder::new().recursive(true).mode(0o755).create(dir.join(sub)).with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let g = Generation { number: 1, created: now_secs(), layers, sources };
        write_atomic(&dir.join("generations/1.json"), &serde_json::to_vec_pretty(&g)?)?;
        std::os::unix::fs::symlink("generations/1.json", dir.join("current")).context("cannot write the current generation link")?;
        fs::create_dir_all(self.envs_dir()).with_context(|| format!("cannot create {}", self.envs_dir().display()))?;
        // rename(2) of a directory onto an existing non-empty one fails: a concurrent create of
        // the same name loses cleanly.
        fs::rename(&dir, &dest).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) {
                anyhow::anyhow!("environment '{name}' already exists: use another name, or remove it first with `plyroot rm {name}`")
            } else {
                anyhow::Error::new(e).context(format!("cannot create {}", dest.display()))
            }
        })?;
        drop(st);
        Ok(Env { name: name.to_owned(), dir: dest })
    }

    /// Removes an environment: it disappears at once (renamed into tmp/), then is deleted.
    pub(crate) fn remove_env(&self, name: &str) -> Result<()> {
        let env = self.env(name)?;
        let st = self.staging()?;
        let grave = st.path.join("env");
        fs::rename(&env.dir, &grave).with_context(|| format!("cannot remove environment '{name}'"))?;
        (self.remover)(&grave).with_context(|| format!("environment '{name}' was removed, but deleting its files in {} failed", grave.display()))?;
        drop(st);
        Ok(())
    }
}

impl Env {
    pub(crate) fn current(&self) -> Result<Generation> {
        read_generation(&self.dir.join("current"))
    }

    pub(crate) fn generations(&self) -> Result<Vec<Generation>> {
        let mut out = Vec::new();
        let dir = self.dir.join("generations");
        for e in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                out.push(read_generation(&e.path())?);
            }
        }
        out.sort_by_key(|g| g.number);
        Ok(out)
    }

    pub(crate) fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }

    pub(crate) fn mount_point(&self) -> PathBuf {
        self.dir.join("mnt")
    }

    /// Bytes used by the upper (an estimate from a walk; listing only).
    pub(crate) fn upper_size(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = fs::read_dir(p) else { return 0 };
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path()),
                    Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
                    _ => 0,
                })
                .sum()
        }
        walk(&self.upper())
    }
}

fn read_generation(path: &Path) -> Result<Generation> {
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&data).with_context(|| format!("{} is corrupt", path.display()))
}
