//! Environments and their generations.
//!
//! An environment is a directory under `envs/`; each generation is an immutable JSON record and
//! `current` is a symlink to one of them, switched by writing a new symlink and renaming it over
//! the old one, so a crash leaves either the old or the new generation current, never neither.
//!
//! The upper remembers the layer stack it was written on (`upper.json`). Changes of the upper
//! (commit, reset, rebase) and new generations are journaled (journal.rs): [`Env::recover`]
//! finishes or undoes one that a crash interrupted.
//!
//! The store, `envs/` and each environment's directory are 0700: an upper holds what the user
//! wrote (and setuid files a run made), for no other local user to read. The upper itself is
//! 0755: it is the mode of the environment's `/`.
//!
//! Runs record themselves in run slots (`runs.rs`); what is alive is read from the kernel.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{now_secs, private_dir, sync_dir, write_atomic, Store};
use crate::names::check_name;

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

/// An environment's settings, as recorded in each generation (and declared in a manifest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Settings {
    #[serde(default)]
    pub root: bool,
    #[serde(default = "yes")]
    pub persist: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_host: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<String>,
    /// `host`: the host's root is the bottom layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Which `/nix` runs see (a `NixStore` name); none: the layers' when they have one, else
    /// the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix: Option<String>,
}

fn yes() -> bool {
    true
}

impl Default for Settings {
    fn default() -> Self {
        Settings { root: false, persist: true, binds: Vec::new(), env: BTreeMap::new(), no_host: Vec::new(), init: None, exports: Vec::new(), base: None, nix: None }
    }
}

#[derive(Debug)]
pub(crate) struct Env {
    pub name: String,
    pub dir: PathBuf,
}

impl Store {
    pub(crate) fn env(&self, name: &str) -> Result<Env> {
        check_name(name)?;
        let dir = self.envs_dir().join(name);
        match fs::metadata(dir.join("current")) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.remains(name).is_some() {
                    bail!("'{name}' is what is left of an environment whose files were deleted by hand ({} has no generation): `plyroot rm {name}` removes the rest", dir.display());
                }
                bail!("no environment named '{name}' in {} (see `plyroot list`, or create it with `plyroot create {name} --from SOURCE`)", self.root.display())
            }
            // Not "no such environment": the user can fix this one (permissions, a broken disk).
            Err(e) => return Err(e).with_context(|| format!("cannot read environment '{name}' at {}", dir.join("current").display())),
        }
        Ok(Env { name: name.to_owned(), dir })
    }

    /// The directory of environment `name` when it is what a deletion by hand left (no `current`:
    /// files of subordinate ids the user could not delete), so that `rm` can finish the job.
    pub(crate) fn remains(&self, name: &str) -> Option<PathBuf> {
        let dir = self.envs_dir().join(name);
        (check_name(name).is_ok() && !dir.join("current").exists() && fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())).then_some(dir)
    }

    /// Every environment directory that is such remains (see [`Store::remains`]).
    pub(crate) fn all_remains(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.envs_dir()) else { return Vec::new() };
        let mut out: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| self.remains(n).is_some()).collect();
        out.sort();
        out
    }

    /// Removes what a deletion by hand left of environment `name` (see [`Store::remains`]).
    pub(crate) fn remove_remains(&self, name: &str) -> Result<()> {
        let Some(dir) = self.remains(name) else { bail!("no remains of an environment named '{name}'") };
        self.discard(&dir, &format!("the remains of '{name}' ({})", dir.display()))
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
        if self.remains(name).is_some() {
            bail!("what is left of an environment named '{name}' (its files deleted by hand) is in the way: `plyroot rm {name}` removes it");
        }
        if dest.exists() {
            bail!("environment '{name}' already exists: use another name, or remove it first with `plyroot rm {name}`");
        }
        let st = self.staging()?;
        let dir = self.env_dir_in(&st, layers, sources, settings, reason, true)?;
        match private_dir(&self.envs_dir()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", self.envs_dir().display())),
        }
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

    /// Writes an environment's directory, with generation 1 current, into the staging directory
    /// `st`, for the caller to rename into place. `durable`: its records are synced (not for a
    /// build step's throwaway environment, which a crash only leaves for the next build to remove).
    pub(crate) fn env_dir_in(&self, st: &super::Staging, layers: Vec<String>, sources: Vec<String>, settings: Settings, reason: &str, durable: bool) -> Result<PathBuf> {
        let write = |p: &Path, d: &[u8]| if durable { write_atomic(p, d) } else { fs::write(p, d).with_context(|| format!("cannot write {}", p.display())) };
        let dir = st.path.join("env");
        private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        super::upper_dir(&dir.join("upper")).with_context(|| format!("cannot create {}", dir.join("upper").display()))?;
        for sub in ["generations", "work", "runs", "mnt", "skel"] {
            fs::DirBuilder::new().mode(0o755).create(dir.join(sub)).with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        write(&dir.join("upper.json"), &serde_json::to_vec(&layers)?)?;
        let g = Generation { number: 1, created: now_secs(), layers, sources, settings, reason: reason.to_owned(), commits: Vec::new() };
        write(&dir.join("generations/1.json"), &serde_json::to_vec_pretty(&g)?)?;
        std::os::unix::fs::symlink("generations/1.json", dir.join("current")).context("cannot write the current generation link")?;
        Ok(dir)
    }

    /// Removes an environment: it disappears at once (renamed into tmp/), then is deleted.
    pub(crate) fn remove_env(&self, name: &str) -> Result<()> {
        let env = self.env(name)?;
        if env.booted().is_some() {
            bail!("'{name}' is booted: `plyroot stop {name}` first");
        }
        env.ensure_unused("remove")?;
        self.discard(&env.dir, &format!("environment '{name}'"))
    }
}

impl Env {
    pub(crate) fn current(&self) -> Result<Generation> {
        read_generation(&self.dir.join("current"))
    }

    pub(crate) fn generation_path(&self, n: u32) -> PathBuf {
        self.dir.join("generations").join(format!("{n}.json"))
    }

    /// The store this environment belongs to (`<store>/envs/<name>`).
    pub(crate) fn store_root(&self) -> &Path {
        self.dir.parent().and_then(Path::parent).unwrap_or(Path::new("/"))
    }

    pub(crate) fn generation(&self, n: u32) -> Result<Generation> {
        let p = self.generation_path(n);
        if !p.exists() {
            bail!("environment '{}' has no generation {n} (see `plyroot generations {}`)", self.name, self.name);
        }
        read_generation(&p)
    }

    /// Takes the environment's exclusive lock for a change of its record or upper.
    pub(crate) fn lock(&self) -> Result<fs::File> {
        let waiting = || crate::diag::info!("waiting for another plyroot command changing '{}'", self.name);
        Ok(super::lock::open_locked(&self.dir.join("lock"), super::lock::Kind::Exclusive, false, waiting)?)
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

    /// Points `current` at generation `n`: a new symlink renamed over the old one, made durable.
    /// Call with the environment's lock held (recovery removes the temp links of dead writers).
    pub(crate) fn switch(&self, n: u32) -> Result<()> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        self.generation(n)?;
        let tmp = self.dir.join(format!(".current.plyroot-{}-{}.tmp", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("generations/{n}.json"), &tmp).context("cannot write the current generation link")?;
        if let Err(e) = fs::rename(&tmp, self.dir.join("current")) {
            let _ = fs::remove_file(&tmp);
            return Err(e).context("cannot switch the current generation");
        }
        sync_dir(&self.dir)
    }

    /// The number the next generation gets.
    pub(crate) fn next_number(&self) -> Result<u32> {
        Ok(self.generations()?.last().map(|g| g.number).unwrap_or(0) + 1)
    }

    /// A new generation record, numbered after the last one; not written yet.
    pub(crate) fn next_generation(&self, layers: Vec<String>, sources: Vec<String>, settings: Settings, reason: &str, commits: Vec<String>) -> Result<Generation> {
        Ok(Generation { number: self.next_number()?, created: now_secs(), layers, sources, settings, reason: reason.to_owned(), commits })
    }

    /// Writes generation `g` and makes it current, journaled: interrupted, the next command on
    /// the environment finishes it, with the same number. `from` is the generation current now.
    /// Call with the environment's lock held, after [`Env::recover`].
    pub(crate) fn add_generation(&self, from: u32, g: Generation, what: &str) -> Result<u32> {
        let j = super::journal::Journal::NewGeneration { from, generation: g };
        self.journaled(&j, what, || self.roll(&j).map(|_| ()))?;
        Ok(self.current()?.number)
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
pub(crate) fn read_generation(path: &Path) -> Result<Generation> {
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
