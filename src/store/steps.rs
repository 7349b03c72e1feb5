//! Build steps on disk: which layer each step key built, and the throwaway environment a step runs
//! in.
//!
//! ```text
//! steps/<key hex>        {"layer": "sha256:…"}: the layer the step with this key made (written
//!                        after the layer is published, so it never names a missing one; gc
//!                        removes records whose layer it collected)
//! builds/<env>.lock      flock: held by the build of <env> for as long as it runs
//! lockfiles.json         the lock files (plyroot.lock) apply and build wrote: the layers they
//!                        pin are gc roots while the file exists (a `build` without `apply`)
//! builds/<env>/          the environment a step of <env> runs in (an ordinary environment
//!                        directory: generation 1 = the layers below the step, its upper = what
//!                        the step writes). Removed when its layer is published; kept after a
//!                        failure (with step.json and log) until the next build of <env> or gc
//! ```
//!
//! The lock file's format ([`LockFile`]) is here too: `apply` writes it, gc reads what it pins.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::env::{Env, Settings};
use super::{private_dir, write_atomic, Store};

/// `plyroot.lock`: each source, as written in the manifest, pinned to its layer ids, and each
/// environment's build steps, in order, pinned to the layer their key built.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LockFile {
    pub version: u32,
    pub sources: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub steps: BTreeMap<String, Vec<StepPin>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StepPin {
    pub key: String,
    pub layer: String,
}

impl LockFile {
    /// Every layer it pins, sources' and steps'.
    pub(crate) fn layers(&self) -> impl Iterator<Item = &String> {
        self.sources.values().flatten().chain(self.steps.values().flatten().map(|p| &p.layer))
    }

    /// Every step key the lock pins, with its layer.
    pub(crate) fn step_pins(&self) -> BTreeMap<String, String> {
        self.steps.values().flatten().map(|p| (p.key.clone(), p.layer.clone())).collect()
    }
}

#[derive(Serialize, Deserialize)]
struct Record {
    layer: String,
}

/// What a failed step was, for `build --shell` to open a shell in the state it left.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct FailedStep {
    /// `[3/7]`-style position and the step's one-line title.
    pub title: String,
    pub network: bool,
}

impl Store {
    fn steps_dir(&self) -> PathBuf {
        self.root.join("steps")
    }

    fn builds_dir(&self) -> PathBuf {
        self.root.join("builds")
    }

    /// The layer step `key` built, when the store still has it.
    pub(crate) fn step_layer(&self, key: &str) -> Option<String> {
        let d = fs::read(self.steps_dir().join(key.trim_start_matches("sha256:"))).ok()?;
        let r: Record = serde_json::from_slice(&d).ok()?;
        self.has_layer(&r.layer).then_some(r.layer)
    }

    /// Records that step `key` built `layer` (already published).
    pub(crate) fn record_step(&self, key: &str, layer: &str) -> Result<()> {
        let dir = self.steps_dir();
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(&dir.join(key.trim_start_matches("sha256:")), &serde_json::to_vec(&Record { layer: layer.to_owned() })?)
    }

    /// Remembers the lock file at `path` (absolute): gc keeps what it pins.
    pub(crate) fn remember_lock_file(&self, path: &std::path::Path) -> Result<()> {
        let mut known = self.lock_files();
        if known.iter().any(|p| p == path) {
            return Ok(());
        }
        known.push(path.to_owned());
        write_atomic(&self.root.join("lockfiles.json"), &serde_json::to_vec_pretty(&known)?)
    }

    /// The lock files apply and build wrote, that still exist.
    pub(crate) fn lock_files(&self) -> Vec<PathBuf> {
        let all: Vec<PathBuf> = fs::read(self.root.join("lockfiles.json")).ok().and_then(|d| serde_json::from_slice(&d).ok()).unwrap_or_default();
        all.into_iter().filter(|p| p.is_file()).collect()
    }

    /// Every layer the remembered lock files pin (sources and steps): gc roots. A lock file that
    /// cannot be read pins nothing.
    pub(crate) fn lock_file_layers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in self.lock_files() {
            let Some(lock) = fs::read(&p).ok().and_then(|d| serde_json::from_slice::<LockFile>(&d).ok()) else { continue };
            out.extend(lock.layers().filter(|id| super::layer::is_layer_id(id)).cloned());
        }
        out
    }

    /// Takes the lock of the build of environment `name`: one build of it at a time.
    pub(crate) fn lock_build(&self, name: &str) -> Result<fs::File> {
        let dir = self.builds_dir();
        match private_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
            _ => {}
        }
        let waiting = || crate::diag::info!("waiting for another build of '{name}'");
        Ok(super::lock::open_locked(&dir.join(format!("{name}.lock")), super::lock::Kind::Exclusive, false, waiting)?)
    }

    /// The environment a step of `name` runs in, made fresh on `layers` with `settings` (what an
    /// earlier build left there is removed first). Call with [`Store::lock_build`] held.
    pub(crate) fn fresh_build_env(&self, name: &str, layers: Vec<String>, settings: Settings, step: &FailedStep) -> Result<Env> {
        self.remove_build_env(name)?;
        let st = self.staging()?;
        let dir = self.env_dir_in(&st, layers, Vec::new(), settings, "build step", false)?;
        fs::write(dir.join("step.json"), serde_json::to_vec(step)?).with_context(|| format!("cannot write {}", dir.join("step.json").display()))?;
        let dest = self.builds_dir().join(name);
        fs::rename(&dir, &dest).with_context(|| format!("cannot create {}", dest.display()))?;
        drop(st);
        Ok(Env { name: name.to_owned(), dir: dest })
    }

    /// The state the last failed step of `name` left, if it is still kept.
    pub(crate) fn failed_build(&self, name: &str) -> Option<(Env, FailedStep)> {
        let dir = self.builds_dir().join(name);
        let step: FailedStep = serde_json::from_slice(&fs::read(dir.join("step.json")).ok()?).ok()?;
        dir.join("current").exists().then(|| (Env { name: name.to_owned(), dir }, step))
    }

    /// Removes what a build of `name` left (its files may be owned by subordinate ids).
    pub(crate) fn remove_build_env(&self, name: &str) -> Result<()> {
        let dir = self.builds_dir().join(name);
        if fs::symlink_metadata(&dir).is_err() {
            return Ok(());
        }
        self.discard(&dir, &format!("what a build of '{name}' left ({})", dir.display()))
    }

    /// gc: removes what builds that are not running left, and the records of steps whose layer is
    /// gone. Returns how many of each.
    pub(crate) fn collect_builds(&self) -> Result<(usize, usize)> {
        let mut builds = 0;
        if let Ok(rd) = fs::read_dir(self.builds_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".lock") || crate::names::check_name(&name).is_err() {
                    continue;
                }
                let Ok(lock) = fs::File::open(self.builds_dir().join(format!("{name}.lock"))) else { continue };
                if super::lock::try_exclusive(&lock) {
                    self.remove_build_env(&name)?;
                    builds += 1;
                }
            }
        }
        let mut records = 0;
        if let Ok(rd) = fs::read_dir(self.steps_dir()) {
            for e in rd.flatten() {
                let key = e.file_name().to_string_lossy().into_owned();
                if key.len() == 64 && self.step_layer(&key).is_none() {
                    let _ = fs::remove_file(e.path());
                    records += 1;
                }
            }
        }
        Ok((builds, records))
    }
}
