//! The journal of an environment: the one change of its upper or of `current` in progress, kept
//! in `envs/<name>/journal.json`, written (atomically and durably) before the change's first step
//! that an interruption could leave half done, and removed after its last. [`Env::recover`] reads
//! it under the environment's lock and rolls the change back or forward, deciding from the
//! journal and from what is on disk, so that an interruption at any syscall (kill -9, ENOSPC)
//! leaves the user's files in the upper, in a published layer, or under `saved/`:
//!
//! | change | steps after the journal | recovery |
//! | --- | --- | --- |
//! | reset | upper → `saved/…` (or into a staging dir: `--force`); an empty upper; upper.json | upper still holding files: back (nothing moved); else forward |
//! | commit, staging | upper → `commit/root`; an empty upper; digest; `commit/layer.json` | back: `commit/root` → upper |
//! | commit, publish | `commit/` → `layers/<id>`; `generations/<n>.json`; `current`; upper.json | forward |
//! | rebase --theirs, or merging a Nix database | remove the conflicting paths the user chose to drop; the merged Nix database (staged in `nixdb/` before the journal) renamed into the upper; upper.json | forward |
//! | new generation (apply) | `generations/<n>.json`; `current` | forward |
//! | squash | (its layer is published before the journal) `generations/<n>.json`; `current`; upper.json if it was on the old layers | forward |
//!
//! Rewriting the journal from commit-staging to commit-publish is the commit's commit point. A
//! generation's number is chosen before the journal is written, so finishing a change twice
//! never makes a second, orphan generation.
//!
//! Recovery deletes nothing but what the interrupted command was asked to delete: the paths of
//! `rebase --theirs`, and a staged copy of a layer the store already holds. (`reset --force` moves
//! the old upper into a staging directory, which the store's leftover cleaning removes.) It also
//! undoes the intermediate states of plyroot versions before this journal (`upper.old`,
//! `upper.new`, `commit.json`) without deleting anything.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::env::{Env, Generation};
use super::{now_secs, private_dir, remove_tree, remove_tree_mapped, sync_dir, write_atomic};

/// A change in progress, with what recovery needs to finish or undo it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub(crate) enum Journal {
    /// `reset`: the upper moves out (to `saved/<saved>`, or for `--force` into a staging
    /// directory) for an empty one written on `base`.
    Reset {
        base: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        saved: Option<String>,
    },
    /// `commit` before its commit point: the upper may be at `commit/root`. Undone.
    CommitStaging,
    /// `commit` past its commit point: `commit/` is layer `layer`; `generation` is written and made
    /// current if generation `from` still is. Finished.
    CommitPublish { layer: String, from: u32, generation: Generation },
    /// `rebase --theirs`, or one that settles Nix's files: `remove` (paths relative to the upper)
    /// are dropped; `links` are written; with `nixdb`, the merged Nix database staged in `nixdb/`
    /// replaces the upper's (see `nixdb`); then the upper's base becomes `onto`. Finished.
    Rebase {
        onto: Vec<String>,
        remove: Vec<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        nixdb: bool,
        /// Nix profiles' symlinks (path, target; store keys) written after the removals.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        links: Vec<(String, String)>,
    },
    /// A new generation (`apply`): written, then made current if generation `from` still is.
    /// Finished.
    NewGeneration { from: u32, generation: Generation },
    /// `squash`: a new generation whose layers show what `before` (generation `from`'s) show,
    /// some merged into one. Written and made current as a new generation is; an upper written
    /// on `before` is then written on its layers too (the same tree under it). Finished.
    Squash { from: u32, before: Vec<String>, generation: Generation },
}

impl Journal {
    /// The layers the change still needs: gc keeps them.
    pub(crate) fn layers(&self) -> Vec<String> {
        match self {
            Journal::Reset { base, .. } => base.clone(),
            Journal::CommitStaging => Vec::new(),
            Journal::CommitPublish { layer, generation, .. } => generation.layers.iter().chain([layer]).cloned().collect(),
            Journal::Rebase { onto, .. } => onto.clone(),
            Journal::NewGeneration { generation, .. } => generation.layers.clone(),
            Journal::Squash { before, generation, .. } => generation.layers.iter().chain(before).cloned().collect(),
        }
    }
}

/// What recovery did with an interrupted change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recovered {
    /// There was none.
    Nothing,
    /// It was rolled back: the environment is as it was before the command.
    Undone,
    /// It was rolled forward: the environment is as the command would have left it.
    Finished,
}

/// What commit.json of plyroot versions before this journal held (between publishing a
/// commit's layer and switching to its generation).
#[derive(Deserialize)]
struct LegacyCommit {
    layer: String,
    base: Vec<String>,
    reason: String,
}

impl Env {
    pub(crate) fn journal_path(&self) -> PathBuf {
        self.dir.join("journal.json")
    }

    /// Where `commit` stages the upper while it becomes a layer.
    pub(crate) fn commit_dir(&self) -> PathBuf {
        self.dir.join("commit")
    }

    /// The change in progress, if any. A journal that does not parse is an error naming the
    /// file: guessing could delete or misplace the user's files.
    pub(crate) fn journal(&self) -> Result<Option<Journal>> {
        let p = self.journal_path();
        match fs::read(&p) {
            Ok(d) => serde_json::from_slice(&d).map(Some).with_context(|| format!("{} is corrupt: it records an interrupted change of '{}'; look at it and at {}, then remove it", p.display(), self.name, self.dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    /// The layers interrupted changes still need, for gc: those of the journal and of a
    /// commit.json an older plyroot left.
    pub(crate) fn pending_layers(&self) -> Result<Vec<String>> {
        let mut out = self.journal()?.map(|j| j.layers()).unwrap_or_default();
        if let Some(l) = self.legacy_commit()? {
            out.push(l.layer);
            out.extend(l.base);
        }
        Ok(out)
    }

    /// Whether a change was interrupted here. Cheap (four stats, as many as before the journal):
    /// the launch path calls it before deciding to take the lock and recover.
    pub(crate) fn needs_recovery(&self) -> bool {
        [self.journal_path(), self.commit_dir(), self.dir.join("upper.new"), self.dir.join("upper.old")].iter().any(|p| fs::symlink_metadata(p).is_ok())
    }

    /// Finishes or undoes whatever change an interrupted command left, and removes temp files
    /// of finished writers. Call with the environment's lock held. Never deletes the user's files.
    pub(crate) fn recover(&self) -> Result<()> {
        self.recover_change(true).map(|_| ())
    }

    /// [`Env::recover`], saying what it did with an interrupted change when `say`.
    fn recover_change(&self, say: bool) -> Result<Recovered> {
        self.recover_legacy()?;
        let r = match self.journal()? {
            None if self.commit_dir().exists() => {
                // Staged by a plyroot before the journal, never published: give it back.
                self.undo_commit_staging()?;
                Recovered::Undone
            }
            None => Recovered::Nothing,
            Some(j) => {
                let r = self.roll(&j)?;
                self.end()?;
                match (&j, r) {
                    _ if !say => {}
                    (_, Recovered::Nothing) => {}
                    (Journal::Reset { saved: Some(s), .. }, Recovered::Finished) => {
                        crate::diag::info!("{}: finished an interrupted reset; the previous upper is at {}", self.name, self.saved_dir().join(s).display())
                    }
                    (_, Recovered::Finished) => crate::diag::info!("{}: finished an interrupted {}", self.name, describe(&j)),
                    (_, Recovered::Undone) => crate::diag::info!("{}: undid an interrupted {}; the upper is as it was", self.name, describe(&j)),
                }
                r
            }
        };
        self.ensure_upper()?;
        self.clean_own_temps();
        Ok(r)
    }

    /// Runs a journaled change: writes `j`, runs `steps`, removes the journal. When a step fails,
    /// recovery undoes or finishes the change at once: an undone change is the step's error (the
    /// environment is as it was), a finished one succeeds with a warning.
    pub(crate) fn journaled(&self, j: &Journal, what: &str, steps: impl FnOnce() -> Result<()>) -> Result<()> {
        let err = match self.begin(j).and_then(|()| steps()).and_then(|()| self.end()) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        match self.recover_change(false) {
            Ok(Recovered::Finished) => {
                crate::diag::warn!("{what} of '{}': a step failed ({err:#}), but a second try finished it", self.name);
                Ok(())
            }
            Ok(_) => Err(err.context(format!("cannot {what} '{}'; nothing was changed", self.name))),
            Err(r) => Err(err.context(format!(
                "cannot {what} '{}', and finishing or undoing it failed too ({r:#}); {} records where it stopped: the next plyroot command on '{}' takes it up",
                self.name,
                self.journal_path().display(),
                self.name
            ))),
        }
    }

    /// Records the next phase of the change in progress.
    pub(crate) fn begin(&self, j: &Journal) -> Result<()> {
        write_atomic(&self.journal_path(), &serde_json::to_vec_pretty(j)?)
    }

    /// The change is complete: make its renames durable, then forget it.
    fn end(&self) -> Result<()> {
        sync_dir(&self.dir)?;
        match fs::remove_file(self.journal_path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", self.journal_path().display())),
        }
    }

    pub(crate) fn roll(&self, j: &Journal) -> Result<Recovered> {
        match j {
            Journal::Reset { base, .. } => {
                let up = self.upper();
                if up.exists() && !dir_is_empty(&up)? {
                    // The upper never moved (a reset journals only an upper with files).
                    return Ok(Recovered::Undone);
                }
                self.finish_reset(base)?;
                Ok(Recovered::Finished)
            }
            Journal::CommitStaging => {
                self.undo_commit_staging()?;
                Ok(Recovered::Undone)
            }
            Journal::CommitPublish { layer, from, generation } => {
                self.finish_publish(layer, *from, generation.clone())?;
                Ok(Recovered::Finished)
            }
            Journal::Rebase { onto, remove: paths, nixdb, links } => {
                self.finish_rebase(onto, paths, *nixdb, links)?;
                Ok(Recovered::Finished)
            }
            Journal::NewGeneration { from, generation } => {
                self.finish_generation(*from, generation.clone(), |g| Journal::NewGeneration { from: *from, generation: g.clone() })?;
                Ok(Recovered::Finished)
            }
            Journal::Squash { from, before, generation } => {
                let g = self.finish_generation(*from, generation.clone(), |g| Journal::Squash { from: *from, before: before.clone(), generation: g.clone() })?;
                // Only an upper that was not stale already: one written on yet other layers stays
                // for the user to rebase, as before the squash.
                if self.current()?.number == g.number && self.upper_base()? == *before {
                    self.set_upper_base(&g.layers)?;
                }
                Ok(Recovered::Finished)
            }
        }
    }

    /// The rest of a reset once the old upper has moved out: an empty upper written on `base`.
    pub(crate) fn finish_reset(&self, base: &[String]) -> Result<()> {
        self.ensure_upper()?;
        self.set_upper_base(base)
    }

    /// Gives an upper staged by a commit that did not reach its commit point back to the
    /// environment, and drops the rest of the staging (at most its layer.json).
    fn undo_commit_staging(&self) -> Result<()> {
        let staged = self.commit_dir();
        let root = staged.join("root");
        if root.exists() {
            let up = self.upper();
            if up.exists() && !dir_is_empty(&up)? {
                // Files in the fresh upper: a run wrote there before anything recovered. Both are
                // the user's; keep the staged one aside rather than merge.
                self.keep_aside(&root, "interrupted-commit")?;
            } else {
                match fs::remove_dir(&up) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("cannot replace the empty {}", up.display())),
                }
                fs::rename(&root, &up).with_context(|| format!("cannot move {} back to {}", root.display(), up.display()))?;
            }
        }
        if staged.exists() {
            if root.exists() {
                bail!("{} is still there: not removing {}", root.display(), staged.display());
            }
            remove_tree(&staged)?;
        }
        Ok(())
    }

    /// Publishes a commit's staged layer (unless the store has it already), then records its
    /// generation, makes it current and records the upper's new base.
    pub(crate) fn finish_publish(&self, layer: &str, from: u32, generation: Generation) -> Result<u32> {
        let staged = self.commit_dir();
        let layers = self.store_root().join("layers");
        let dest = layers.join(layer.trim_start_matches("sha256:"));
        if staged.exists() {
            let published = if dest.exists() {
                false
            } else {
                fs::create_dir_all(&layers).with_context(|| format!("cannot create {}", layers.display()))?;
                match fs::rename(&staged, &dest) {
                    Ok(()) => true,
                    // Someone published the same content first.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) => false,
                    Err(e) => return Err(e).with_context(|| format!("cannot publish the committed layer at {}", dest.display())),
                }
            };
            if !published {
                // Same id, same content: the store's copy holds every file of this one.
                remove_tree_mapped(&staged)?;
            }
        }
        if !dest.join("layer.json").exists() {
            bail!(
                "the committed layer {layer} is neither staged at {} nor in the store (removed by hand?): its generation cannot be recorded; remove {} to go on without that commit",
                staged.display(),
                self.journal_path().display()
            );
        }
        let g = self.finish_generation(from, generation, |g| Journal::CommitPublish { layer: layer.to_owned(), from, generation: g.clone() })?;
        if self.current()?.number == g.number {
            self.set_upper_base(&g.layers)?;
        }
        Ok(g.number)
    }

    /// Writes a journaled generation (once: a record already written is kept) and makes it
    /// current unless another generation than `from` was made current meanwhile. When its number
    /// was taken by another record, it takes the next free one, journaled by `rejournal` first.
    fn finish_generation(&self, from: u32, mut g: Generation, rejournal: impl Fn(&Generation) -> Journal) -> Result<Generation> {
        let path = self.generation_path(g.number);
        match super::env::read_generation(&path) {
            Ok(existing) if existing == g => {}
            Ok(_) => {
                g.number = self.next_number()?;
                self.begin(&rejournal(&g))?;
                write_atomic(&self.generation_path(g.number), &serde_json::to_vec_pretty(&g)?)?;
            }
            Err(_) if !path.exists() => write_atomic(&path, &serde_json::to_vec_pretty(&g)?)?,
            Err(e) => return Err(e),
        }
        let cur = self.current()?.number;
        if cur == from {
            self.switch(g.number)?;
        } else if cur != g.number {
            crate::diag::warn!("{}: generation {} is recorded but not made current: generation {cur} was made current meanwhile", self.name, g.number);
        }
        Ok(g)
    }

    /// Drops the paths `rebase --theirs` chose to take from the layers (and the Nix profiles'
    /// links the layers' win), writes the profiles' `links`, puts a merged Nix database in place
    /// (`nixdb`), then records the upper's new base. Each removal is whole or not done;
    /// a second pass skips what is gone, and a staged database already moved.
    pub(crate) fn finish_rebase(&self, onto: &[String], paths: &[String], nixdb: bool, links: &[(String, String)]) -> Result<()> {
        let up = self.upper();
        for p in paths {
            // A path is recorded as a store key (see `meta::key`): bytes that are not UTF-8 too.
            let bytes = super::meta::unkey(p);
            let rel = Path::new(std::ffi::OsStr::from_bytes(&bytes));
            if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                bail!("{} names {p:?}, which is not a path inside the upper: not removing it", self.journal_path().display());
            }
            remove_tree_mapped(&up.join(rel)).with_context(|| format!("cannot take the layers' version of /{}", super::tree::shown(&bytes)))?;
        }
        let mut settled = Vec::with_capacity(links.len());
        for (p, t) in links {
            let bytes = super::meta::unkey(p).into_owned();
            if Path::new(std::ffi::OsStr::from_bytes(&bytes)).components().any(|c| !matches!(c, Component::Normal(_))) {
                bail!("{} names {p:?}, which is not a path inside the upper: not writing it", self.journal_path().display());
            }
            settled.push((bytes, super::meta::unkey(t).into_owned()));
        }
        super::nixdb::write_links_as_owner(up.clone(), settled).context("cannot write the Nix profiles' links into the upper")?;
        if nixdb {
            let root = self.store_root();
            let new = onto.iter().rev().map(|l| root.join("layers").join(l.trim_start_matches("sha256:")).join("root")).collect();
            super::nixdb::finish(self, new).context("cannot put the merged Nix database into the upper")?;
        }
        self.set_upper_base(onto)
    }

    /// Moves `path` to a new name under saved/ and says so.
    fn keep_aside(&self, path: &Path, label: &str) -> Result<PathBuf> {
        let dest = self.new_saved_name(label)?;
        fs::rename(path, &dest).with_context(|| format!("cannot keep {} at {}", path.display(), dest.display()))?;
        crate::diag::warn!("{}: an interrupted change left {}; it is kept at {}", self.name, path.display(), dest.display());
        Ok(dest)
    }

    /// A name under saved/ (created, 0700) that does not exist yet: `LABEL-SECONDS[-N]`.
    pub(crate) fn new_saved_name(&self, label: &str) -> Result<PathBuf> {
        let saved = self.saved_dir();
        match private_dir(&saved) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", saved.display())),
        }
        let stem = format!("{label}-{}", now_secs());
        let mut dest = saved.join(&stem);
        let mut n = 1;
        while fs::symlink_metadata(&dest).is_ok() {
            n += 1;
            dest = saved.join(format!("{stem}-{n}"));
        }
        Ok(dest)
    }

    /// An environment always has an upper directory.
    fn ensure_upper(&self) -> Result<()> {
        let up = self.upper();
        if up.is_dir() {
            return Ok(());
        }
        match super::upper_dir(&up) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot create {}", up.display())),
        }
    }

    /// Removes temp files whose writers are gone: locked ones of atomic writes (lock-proven), and
    /// the temp symlinks of `switch`, which only a holder of this environment's lock (the caller)
    /// could be writing.
    fn clean_own_temps(&self) {
        super::clean_temps(&self.dir, None);
        super::clean_temps(&self.dir.join("generations"), None);
        self.remove_switch_temps();
    }

    /// Removes the temp links `switch` makes. Only with this environment's lock, or the store's
    /// exclusive lock, held: a link cannot be flock'd to show it is in use.
    pub(crate) fn remove_switch_temps(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let temp = (name.starts_with(".current.plyroot-") && name.ends_with(".tmp")) || name.starts_with("current.tmp-");
            if temp && e.file_type().is_ok_and(|t| t.is_symlink()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    fn legacy_commit(&self) -> Result<Option<LegacyCommit>> {
        let p = self.dir.join("commit.json");
        match fs::read(&p) {
            Ok(d) => serde_json::from_slice(&d).map(Some).with_context(|| format!("{} (the journal of an interrupted commit) is corrupt", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    /// Undoes what plyroot versions before the journal left, without deleting anything: their
    /// half-replaced upper (`upper.old`, `upper.new`), and turns their commit.json into a journal.
    fn recover_legacy(&self) -> Result<()> {
        let (old, new, up) = (self.dir.join("upper.old"), self.dir.join("upper.new"), self.upper());
        if new.exists() {
            if dir_is_empty(&new)? {
                fs::remove_dir(&new).with_context(|| format!("cannot remove the empty {}", new.display()))?;
            } else {
                self.keep_aside(&new, "recovered")?;
            }
        }
        if self.dir.join("upper.new.json").exists() {
            let _ = fs::remove_file(self.dir.join("upper.new.json"));
        }
        if old.exists() {
            if up.exists() && !dir_is_empty(&up)? {
                self.keep_aside(&old, "recovered")?;
            } else {
                let _ = fs::remove_dir(&up);
                fs::rename(&old, &up).with_context(|| format!("cannot move {} back to {}", old.display(), up.display()))?;
            }
        }
        let Some(l) = self.legacy_commit()? else { return Ok(()) };
        let cur = self.current()?;
        let layers: Vec<String> = l.base.iter().chain([&l.layer]).cloned().collect();
        if cur.layers != layers && self.journal()?.is_none() {
            let mut sources = cur.sources.clone();
            sources.push(format!("layer:{}", l.layer));
            let generation = Generation {
                number: self.next_number()?,
                created: now_secs(),
                layers,
                sources,
                settings: cur.settings.clone(),
                reason: l.reason,
                commits: cur.commits.iter().chain([&l.layer]).cloned().collect(),
            };
            // A generation number that is never current: not made current if the stack moved.
            let from = if cur.layers == l.base { cur.number } else { 0 };
            self.begin(&Journal::CommitPublish { layer: l.layer, from, generation })?;
        }
        fs::remove_file(self.dir.join("commit.json")).context("cannot remove the old commit journal")
    }
}

fn describe(j: &Journal) -> &'static str {
    match j {
        Journal::Reset { .. } => "reset",
        Journal::CommitStaging | Journal::CommitPublish { .. } => "commit",
        Journal::Rebase { .. } => "rebase",
        Journal::NewGeneration { .. } => "switch to a new generation",
        Journal::Squash { .. } => "squash",
    }
}

/// Whether a directory has no entries. Unlike a best-effort check, an unreadable directory is an
/// error: recovery must not mistake a full upper for an empty one.
pub(crate) fn dir_is_empty(dir: &Path) -> Result<bool> {
    Ok(fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?.next().is_none())
}
