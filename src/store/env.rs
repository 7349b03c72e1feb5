//! Environments and their generations.
//!
//! An environment is a directory under `envs/`; each generation is an immutable JSON record and
//! `current` is a symlink to one of them, switched by writing a new symlink and renaming it over
//! the old one, so a crash leaves either the old or the new generation current, never neither.
//!
//! The upper remembers the layer stack it was written on (`upper.json`). Replacing the upper
//! (commit, reset) prepares `upper.new/` + `upper.new.json` first; the switch of `current` is the
//! commit point, and [`Env::recover`] finishes or undoes a replacement a crash interrupted.
//!
//! Runs record themselves in run slots (`runs.rs`); what is alive is read from the kernel.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{now_secs, write_atomic, Store};
use crate::manifest::Settings;

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
    #[serde(default)]
    pub settings: Settings,
    /// Why this generation exists (create, apply, commit message, …).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Layers `commit` added on top of the declared ones; `apply` keeps them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commits: Vec<String>,
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
    pub(crate) fn create_env(&self, name: &str, layers: Vec<String>, sources: Vec<String>, settings: Settings, reason: &str) -> Result<Env> {
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
        write_atomic(&dir.join("upper.json"), &serde_json::to_vec(&layers)?)?;
        let g = Generation { number: 1, created: now_secs(), layers, sources, settings, reason: reason.to_owned(), commits: Vec::new() };
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
        if env.booted().is_some() {
            bail!("'{name}' is booted: `plyroot stop {name}` first");
        }
        env.ensure_unused("remove")?;
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

    pub(crate) fn generation(&self, n: u32) -> Result<Generation> {
        let p = self.dir.join("generations").join(format!("{n}.json"));
        if !p.exists() {
            bail!("environment '{}' has no generation {n} (see `plyroot generations {}`)", self.name, self.name);
        }
        read_generation(&p)
    }

    /// Takes the environment's exclusive lock for a change of its record or upper.
    pub(crate) fn lock(&self) -> Result<fs::File> {
        let p = self.dir.join("lock");
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).with_context(|| format!("cannot open {}", p.display()))?;
        if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            crate::diag::info(&format!("waiting for another plyroot command changing '{}'", self.name));
            rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).with_context(|| format!("cannot lock {}", p.display()))?;
        }
        Ok(f)
    }

    /// The layer stack the upper was written on.
    pub(crate) fn upper_base(&self) -> Result<Vec<String>> {
        let p = self.dir.join("upper.json");
        let fix = "delete it, and plyroot takes the upper as written on the current generation";
        match fs::read(&p) {
            Ok(d) => {
                let ids: Vec<String> = serde_json::from_slice(&d).with_context(|| format!("{} is damaged (not a list of layer ids); {fix}", p.display()))?;
                super::layer::check_ids(&ids, &p, fix)?;
                Ok(ids)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(self.current()?.layers),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    pub(crate) fn set_upper_base(&self, layers: &[String]) -> Result<()> {
        write_atomic(&self.dir.join("upper.json"), &serde_json::to_vec(layers)?)
    }

    pub(crate) fn upper_is_empty(&self) -> bool {
        fs::read_dir(self.upper()).map(|mut rd| rd.next().is_none()).unwrap_or(true)
    }

    /// Points `current` at generation `n`: a new symlink renamed over the old one.
    pub(crate) fn switch(&self, n: u32) -> Result<()> {
        self.generation(n)?;
        let tmp = self.dir.join(format!("current.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("generations/{n}.json"), &tmp).context("cannot write the current generation link")?;
        fs::rename(&tmp, self.dir.join("current")).context("cannot switch the current generation")
    }

    /// Writes a new generation record (not yet current).
    pub(crate) fn write_generation(&self, layers: Vec<String>, sources: Vec<String>, settings: Settings, reason: &str) -> Result<Generation> {
        let number = self.generations()?.last().map(|g| g.number).unwrap_or(0) + 1;
        let g = Generation { number, created: now_secs(), layers, sources, settings, reason: reason.to_owned(), commits: Vec::new() };
        self.rewrite_generation(&g)?;
        Ok(g)
    }

    /// Writes a generation record that is not current yet (used while building it).
    pub(crate) fn rewrite_generation(&self, g: &Generation) -> Result<()> {
        write_atomic(&self.dir.join("generations").join(format!("{}.json", g.number)), &serde_json::to_vec_pretty(g)?)
    }

    /// Prepares an empty replacement upper, based on `layers`, for [`Env::replace_upper`].
    pub(crate) fn prepare_upper(&self, layers: &[String]) -> Result<()> {
        let new = self.dir.join("upper.new");
        super::remove_tree(&new)?;
        fs::create_dir(&new).with_context(|| format!("cannot create {}", new.display()))?;
        write_atomic(&self.dir.join("upper.new.json"), &serde_json::to_vec(layers)?)
    }

    /// Puts the prepared upper in place; the old one is returned (moved to `dest`, or deleted).
    pub(crate) fn replace_upper(&self, keep_old_at: Option<&Path>, remove: fn(&Path) -> Result<()>) -> Result<()> {
        let up = self.upper();
        let old = self.dir.join("upper.old");
        if up.exists() {
            fs::rename(&up, &old).with_context(|| format!("cannot move {}", up.display()))?;
        }
        fs::rename(self.dir.join("upper.new"), &up).with_context(|| format!("cannot move the new upper into {}", up.display()))?;
        fs::rename(self.dir.join("upper.new.json"), self.dir.join("upper.json")).context("cannot record the new upper's base")?;
        if old.exists() {
            match keep_old_at {
                Some(dest) => fs::rename(&old, dest).with_context(|| format!("cannot keep the old upper at {}", dest.display()))?,
                None => remove(&old)?,
            }
        }
        Ok(())
    }

    /// Finishes or undoes an upper replacement a crash interrupted: a prepared upper whose base
    /// is the current stack was committed (finish); any other was not (drop it).
    pub(crate) fn recover(&self, remove: fn(&Path) -> Result<()>) -> Result<()> {
        let new = self.dir.join("upper.new");
        if new.exists() {
            let base: Option<Vec<String>> = fs::read(self.dir.join("upper.new.json")).ok().and_then(|d| serde_json::from_slice(&d).ok());
            if base.is_some_and(|b| b == self.current().map(|g| g.layers).unwrap_or_default()) {
                self.replace_upper(None, remove)?;
            } else {
                remove(&new)?;
                let _ = fs::remove_file(self.dir.join("upper.new.json"));
            }
        }
        let old = self.dir.join("upper.old");
        if old.exists() {
            if self.upper().exists() {
                // Never delete what an interrupted command was replacing: keep it and say where.
                let dest = self.saved_dir().join(format!("recovered-{}", now_secs()));
                fs::create_dir_all(self.saved_dir()).with_context(|| format!("cannot create {}", self.saved_dir().display()))?;
                fs::rename(&old, &dest).with_context(|| format!("cannot keep {} at {}", old.display(), dest.display()))?;
                crate::diag::warn(&format!("an interrupted change of '{}' left its previous upper; it is kept at {}", self.name, dest.display()));
            } else {
                fs::rename(&old, self.upper()).context("cannot restore the upper")?;
            }
        }
        if !self.upper().exists() {
            fs::create_dir(self.upper()).with_context(|| format!("cannot create {}", self.upper().display()))?;
        }
        Ok(())
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

    /// Where `reset` keeps discarded uppers.
    pub(crate) fn saved_dir(&self) -> PathBuf {
        self.dir.join("saved")
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

/// Reads a generation record, checked: every layer id well formed (ids become paths), and the
/// number the one its file is named by (`switch` and gc go by the name).
fn read_generation(path: &Path) -> Result<Generation> {
    // `current` is a link: name the record itself in errors, which is what the user must fix.
    let path = &match fs::read_link(path) {
        Ok(target) => path.parent().unwrap_or(Path::new("/")).join(target),
        Err(_) => path.to_owned(),
    };
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let env = path.parent().and_then(Path::parent).and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "ENV".into());
    let fix = format!("it was changed outside plyroot: restore it, or delete it (if it is the current generation, `plyroot switch {env} N` to another one first)");
    let g: Generation = serde_json::from_slice(&data).with_context(|| format!("{} is damaged (not a generation record); {fix}", path.display()))?;
    super::layer::check_ids(g.layers.iter().chain(&g.commits), path, &fix)?;
    let named = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u32>().ok());
    if named.is_some_and(|n| n != g.number) {
        bail!("{} is damaged: it records generation {} under another number; {fix}", path.display(), g.number);
    }
    Ok(g)
}
